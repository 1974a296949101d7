//! The admin API, on its own port (loopback by default): ADT's data-plane event routes
//! (`/eventroutes`), ADT's endpoint resources (`/endpoints`, in the ARM shape), and the
//! operational endpoints (`/healthz`, `/readyz`, `/metrics`).
//!
//! Errors have ADT's body (`{"error": {"code", "message"}}`) and its `x-ms-error-code` header.
//! `api-version` is accepted as ADT's clients send it; an unknown version is refused.
//!
//! With a token (`admin.token`, `admin.token_file`), every request needs it except the probes:
//! `/healthz`, and `/readyz`, which then tells a caller without the token only whether the
//! instance is ready, not the endpoints' details (and `/metrics` when
//! `admin.metrics_unauthenticated = true`). See [`crate::server::auth`].

mod endpoints;

use crate::config::RouteSpec;
use crate::control::{route_not_found, ControlError, ControlPlane, Upsert};
use crate::delivery::{Dispatcher, Health};
use crate::ingest::{ErrorBody, ErrorDetail};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// ADT data-plane API versions whose `/eventroutes` shape this API serves.
pub const API_VERSIONS: [&str; 4] = ["2020-10-31", "2022-05-31", "2023-06-30", "2023-10-31"];
/// Page size of list answers when the client sets no `max-items-per-page`.
const DEFAULT_PAGE_SIZE: usize = 100;

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub control: Arc<ControlPlane>,
    pub dispatcher: Arc<Dispatcher>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/eventroutes", get(list_routes))
        .route("/eventroutes/{id}", get(get_route).put(put_route).delete(delete_route))
        .route("/endpoints", get(endpoints::list))
        .route("/endpoints/{name}", get(endpoints::get_one).put(endpoints::put).delete(endpoints::delete))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .layer(axum::middleware::from_fn(read_body))
        .with_state(state)
}

/// The largest admin request body: a route or an endpoint's properties are a few kilobytes.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Reads a request's body before the handler runs, so that a body that is too large (413) or
/// too slow (408, `admin.body_read_timeout_seconds`) is answered in ADT's shape.
async fn read_body(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            let mut response = if crate::server::is_body_timeout(&e) {
                error_response(408, "RequestTimeout", e.to_string())
            } else {
                error_response(
                    413,
                    "RequestTooLarge",
                    format!("the request body exceeds {MAX_BODY_BYTES} bytes or could not be read"),
                )
            };
            response.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// An error answer in ADT's shape.
pub(crate) fn error_response(status: u16, code: &'static str, message: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response =
        (status, Json(ErrorBody::<()> { error: ErrorDetail { code, message, details: None } }))
            .into_response();
    if let Ok(v) = HeaderValue::from_str(code) {
        response.headers_mut().insert("x-ms-error-code", v);
    }
    response
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        error_response(self.status, self.code, self.message)
    }
}

/// The query of every admin request, with `api-version` already checked: a handler taking it
/// never sees an unsupported version (the request is answered 400 `InvalidApiVersion` first).
pub(crate) struct Api(pub(crate) ApiQuery);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Api {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        let Query(query) =
            Query::<ApiQuery>::from_request_parts(parts, state).await.map_err(IntoResponse::into_response)?;
        query.check()?;
        Ok(Api(query))
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ApiQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
    #[serde(rename = "continuationToken")]
    continuation_token: Option<String>,
}

impl ApiQuery {
    /// Refuses an `api-version` this API does not serve; an absent one is accepted.
    // The error is the answer to send, an axum `Response`: boxing it would only add a step.
    #[allow(clippy::result_large_err)]
    pub(crate) fn check(&self) -> Result<(), Response> {
        match self.api_version.as_deref() {
            Some(v) if !API_VERSIONS.contains(&v) => Err(error_response(
                400,
                "InvalidApiVersion",
                format!("api-version {v:?} is not supported; use one of {}", API_VERSIONS.join(", ")),
            )),
            _ => Ok(()),
        }
    }
}

/// A page of `items` after the continuation token, and the next link if more remain.
pub(crate) fn page<T: Serialize>(
    items: Vec<(String, T)>,
    query: &ApiQuery,
    headers: &HeaderMap,
    path: &str,
) -> Response {
    let size = headers
        .get("max-items-per-page")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_PAGE_SIZE);
    let after = query.continuation_token.as_deref().unwrap_or("");
    let rest: Vec<(String, T)> = items.into_iter().filter(|(key, _)| key.as_str() > after).collect();
    let more = rest.len() > size;
    let taken: Vec<(String, T)> = rest.into_iter().take(size).collect();
    let next_link = match (more, taken.last()) {
        (true, Some((last, _))) => {
            let token: String = url::form_urlencoded::byte_serialize(last.as_bytes()).collect();
            let version = query.api_version.as_deref().unwrap_or("2023-10-31");
            Some(format!("{path}?api-version={version}&continuationToken={token}"))
        }
        _ => None,
    };
    let value: Vec<T> = taken.into_iter().map(|(_, v)| v).collect();
    Json(serde_json::json!({ "value": value, "nextLink": next_link })).into_response()
}

/// An event route as ADT's data plane shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EventRouteBody {
    id: String,
    endpoint_name: String,
    filter: String,
}

/// The body of `PUT /eventroutes/{id}`; ADT requires both fields.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventRouteIn {
    /// Clients may echo the id; when present it must match the path.
    id: Option<String>,
    endpoint_name: Option<String>,
    filter: Option<String>,
}

async fn list_routes(State(state): State<AdminState>, Api(query): Api, headers: HeaderMap) -> Response {
    let routes = state.control.routes().await;
    let items = routes
        .into_iter()
        .map(|r| {
            let body = EventRouteBody {
                id: r.id.clone(),
                endpoint_name: r.endpoint_name,
                filter: r.filter.text().to_owned(),
            };
            (r.id, body)
        })
        .collect();
    page(items, &query, &headers, "/eventroutes")
}

async fn get_route(State(state): State<AdminState>, Path(id): Path<String>, _: Api) -> Response {
    match state.control.route(&id).await {
        Some(r) => Json(EventRouteBody {
            id: r.id,
            endpoint_name: r.endpoint_name,
            filter: r.filter.text().to_owned(),
        })
        .into_response(),
        None => route_not_found(&id).into_response(),
    }
}

async fn put_route(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    _: Api,
    body: axum::body::Bytes,
) -> Response {
    let input: EventRouteIn = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(400, "InvalidRequestBody", format!("the body is not an event route: {e}"))
        }
    };
    if input.id.as_deref().is_some_and(|body_id| body_id != id) {
        return error_response(
            400,
            "EventRouteIdInvalid",
            format!("the body's id {:?} differs from the path's {id:?}", input.id.unwrap_or_default()),
        );
    }
    let Some(endpoint_name) = input.endpoint_name.filter(|e| !e.is_empty()) else {
        return error_response(400, "EventRouteEndpointInvalid", "endpointName is required".into());
    };
    let Some(filter) = input.filter else {
        return error_response(
            400,
            "EventRouteFilterInvalid",
            "filter is required (use 'true' to route every event)".into(),
        );
    };
    match state.control.put_route(&id, RouteSpec { endpoint_name, filter }).await {
        Ok(Upsert::Created | Upsert::Replaced) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete_route(State(state): State<AdminState>, Path(id): Path<String>, _: Api) -> Response {
    match state.control.delete_route(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Serialize)]
struct EndpointHealth {
    name: String,
    status: Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    queued: usize,
}

/// Ready while intake is open and every identity-based endpoint holds its tokens (the body says
/// which one is missing and why); the body also lists every endpoint's health. An unhealthy
/// endpoint does not make the instance unready: events for the other endpoints still flow, and
/// the failing one keeps its queue.
async fn readyz(
    State(state): State<AdminState>,
    authorized: Option<axum::Extension<crate::server::auth::Authorized>>,
) -> Response {
    let snapshot = state.dispatcher.snapshot();
    let endpoints: Vec<EndpointHealth> = snapshot
        .endpoints
        .values()
        .map(|h| {
            let (status, reason) = h.stats.health();
            EndpointHealth { name: h.name().to_owned(), status, reason, queued: h.queue_len() }
        })
        .collect();
    let configured = state.control.endpoints().await;
    let missing: Vec<serde_json::Value> = state
        .control
        .identity()
        .missing_tokens(&configured)
        .into_iter()
        .map(|(endpoint, reason)| serde_json::json!({"endpoint": endpoint, "reason": reason}))
        .collect();
    let open = state.dispatcher.is_open();
    let storage = state.dispatcher.storage_failure();
    let ready = open && missing.is_empty() && storage.is_none();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let label = if !open {
        "shutting down"
    } else if let Some(reason) = &storage {
        reason.as_str()
    } else if !missing.is_empty() {
        "waiting for identity tokens"
    } else {
        "ready"
    };
    // Probes without the admin token learn only the verdict.
    if authorized.is_some_and(|a| !a.0 .0) {
        return (status, Json(serde_json::json!({ "status": if ready { "ready" } else { "not ready" } })))
            .into_response();
    }
    let body = serde_json::json!({
        "status": label,
        "endpoints": endpoints,
        "missing_tokens": missing,
        // Where the configuration came from and how its last reload went (src/reload.rs).
        "config": state.control.config_status(),
    });
    (status, Json(body)).into_response()
}

async fn metrics_text() -> Response {
    let text = crate::telemetry::prometheus().render();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
