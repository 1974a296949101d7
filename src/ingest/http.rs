//! `POST /events`: CloudEvents over HTTP in the three modes of the CloudEvents HTTP binding.
//!
//! | request | answer |
//! |---|---|
//! | accepted (all events queued, or matched no route) | 202 `{"accepted": n, "unmatched": m}` |
//! | any event invalid (the whole request is refused) | 400, every problem with its event index and attribute |
//! | body over `max_request_bytes`, an event over `max_event_bytes`, more than `max_batch_events` | 413 |
//! | a content type that is none of the three modes | 415 |
//! | a queue is full, or twinroute is shutting down | 503 with `Retry-After` |
//! | the body did not arrive within `body_read_timeout_seconds` | 408 (the connection is closed) |
//!
//! Without the bearer token, when ingest has one, every request but `/healthz` is answered 401
//! before its body is read ([`crate::server::auth`]).

use super::{ErrorBody, ErrorDetail};
use crate::config::IngestConfig;
use crate::delivery::{Dispatcher, Refusal};
use crate::event::{self, CloudEvent, EventProblem};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;

/// Media type of one structured-mode event.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// Media type of a batch.
pub const BATCH: &str = "application/cloudevents-batch+json";

/// What the ingest handlers share.
#[derive(Clone)]
pub struct IngestState {
    pub dispatcher: Arc<Dispatcher>,
    pub limits: Arc<IngestConfig>,
}

/// The ingest router: `POST /events` and a liveness probe.
pub fn router(state: IngestState) -> Router {
    Router::new()
        .route("/events", post(post_events))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

#[derive(Serialize)]
struct AcceptedBody {
    accepted: usize,
    unmatched: usize,
}

fn error<D: Serialize>(
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<D>,
) -> Response {
    let mut response =
        (status, Json(ErrorBody { error: ErrorDetail { code, message, details } })).into_response();
    if let Ok(v) = HeaderValue::from_str(code) {
        response.headers_mut().insert("x-ms-error-code", v);
    }
    response
}

fn reject(status: StatusCode, code: &'static str, reason: &'static str, message: String) -> Response {
    metrics::counter!("twinroute_requests_rejected_total", "reason" => reason).increment(1);
    error::<()>(status, code, message, None)
}

fn unavailable(retry_after: u64, message: String) -> Response {
    metrics::counter!("twinroute_requests_rejected_total", "reason" => "unavailable").increment(1);
    let mut response = error::<()>(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", message, None);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

/// The media type without parameters, lower-cased.
fn essence(value: &str) -> String {
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

async fn post_events(State(state): State<IngestState>, headers: HeaderMap, body: Body) -> Response {
    let limits = &state.limits;
    if !state.dispatcher.is_open() {
        return unavailable(
            limits.retry_after_seconds,
            "twinroute is shutting down; send to another instance or retry".into(),
        );
    }
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_request_bytes as u64) {
        return too_large_request(limits);
    }
    let bytes = match axum::body::to_bytes(body, limits.max_request_bytes).await {
        Ok(b) => b,
        Err(e) if crate::server::is_body_timeout(&e) => {
            let mut response =
                reject(StatusCode::REQUEST_TIMEOUT, "RequestTimeout", "body_timeout", e.to_string());
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        Err(_) => return too_large_request(limits),
    };
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let media = content_type.map(essence);
    let binary = headers.contains_key("ce-specversion");
    let parsed: Result<Vec<CloudEvent>, Vec<EventProblem>> = match media.as_deref() {
        Some(STRUCTURED) => {
            if bytes.len() > limits.max_event_bytes {
                return too_large_event(limits, None);
            }
            event::parse_structured(&bytes).map(|e| vec![e])
        }
        Some(BATCH) => match event::parse_batch(&bytes) {
            Ok(events) => {
                if events.len() > limits.max_batch_events {
                    return reject(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "BatchTooLarge",
                        "too_many_events",
                        format!(
                            "the batch holds {} events; at most {} are accepted per request (ingest.max_batch_events)",
                            events.len(),
                            limits.max_batch_events
                        ),
                    );
                }
                if let Some(i) = events.iter().position(|e| e.size_hint() > limits.max_event_bytes) {
                    return too_large_event(limits, Some(i));
                }
                Ok(events)
            }
            Err(p) => Err(p),
        },
        _ if binary => {
            if bytes.len() > limits.max_event_bytes {
                return too_large_event(limits, None);
            }
            let ce: Vec<(&str, &[u8])> = headers
                .iter()
                .filter_map(|(name, value)| name.as_str().strip_prefix("ce-").map(|n| (n, value.as_bytes())))
                .collect();
            event::from_binary(&ce, content_type, bytes).map(|e| vec![e])
        }
        other => {
            let found = match (other, content_type) {
                (Some(_), Some(ct)) => format!("Content-Type {ct:?}"),
                _ => "no Content-Type".to_owned(),
            };
            return reject(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                "unsupported_media_type",
                format!(
                    "{found} without ce-specversion header: send {STRUCTURED} (one event), {BATCH} \
                     (a JSON array of events) or binary mode (ce-* headers with the data as the body)"
                ),
            );
        }
    };
    let events = match parsed {
        Ok(events) => events,
        Err(problems) => {
            metrics::counter!("twinroute_requests_rejected_total", "reason" => "invalid").increment(1);
            let n = problems.len();
            let summary = problems.first().map(ToString::to_string).unwrap_or_default();
            let message = if n == 1 {
                format!("the request was refused: {summary}")
            } else {
                format!("the request was refused with {n} problems; the first: {summary}")
            };
            return error(StatusCode::BAD_REQUEST, "InvalidEvents", message, Some(problems));
        }
    };
    match state.dispatcher.submit(events, "http").await {
        Ok(accepted) => (
            StatusCode::ACCEPTED,
            Json(AcceptedBody { accepted: accepted.events, unmatched: accepted.unmatched }),
        )
            .into_response(),
        Err(refusal @ (Refusal::Full { .. } | Refusal::Bytes { .. } | Refusal::SpoolFull { .. })) => {
            unavailable(
                limits.retry_after_seconds,
                format!("{refusal}; nothing of this request was accepted, retry after the delay"),
            )
        }
        Err(refusal @ (Refusal::ShuttingDown | Refusal::Storage(_))) => unavailable(
            limits.retry_after_seconds,
            format!("{refusal}; nothing of this request was accepted"),
        ),
    }
}

fn too_large_request(limits: &IngestConfig) -> Response {
    reject(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestTooLarge",
        "request_too_large",
        format!("the request body exceeds {} bytes (ingest.max_request_bytes)", limits.max_request_bytes),
    )
}

fn too_large_event(limits: &IngestConfig, index: Option<usize>) -> Response {
    let which = index.map_or("the event".to_owned(), |i| format!("event {i}"));
    reject(
        StatusCode::PAYLOAD_TOO_LARGE,
        "EventTooLarge",
        "event_too_large",
        format!("{which} exceeds {} bytes (ingest.max_event_bytes)", limits.max_event_bytes),
    )
}
