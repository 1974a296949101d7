//! The HTTP admin surface, for steering an out-of-process stand-in:
//!
//! | request | effect |
//! |---|---|
//! | `POST /_standin/faults` | `{"entity":"twins","faults":[{"kind":"reject","condition":"com.microsoft:server-busy"}, {"kind":"detach_link"}, {"kind":"drop_connection"}, {"kind":"delay","ms":1500}]}` queues faults |
//! | `GET /_standin/stats` | counters and pending faults ([`AmqpStats`]) |
//! | `POST /_standin/drop-connections` | closes every client connection abruptly |
//!
//! Every request answers with the stats JSON; malformed bodies get a 4xx with the reason.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::broker::Broker;
use super::{AmqpFault, AmqpFaultSpec, AmqpStats};

/// Body of `POST /_standin/faults`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsRequest {
    /// Entity path the faults apply to: `twins`, `twins/Partitions/1`, `twin-queue`.
    pub entity: String,
    /// Faults, consumed in order by transfers to the entity.
    pub faults: Vec<AmqpFaultSpec>,
}

pub(crate) fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/_standin/faults", post(faults))
        .route("/_standin/stats", get(stats))
        .route("/_standin/drop-connections", post(drop_connections))
        .with_state(broker)
}

async fn faults(
    State(broker): State<Arc<Broker>>,
    request: Result<Json<FaultsRequest>, JsonRejection>,
) -> Response {
    match request {
        Ok(Json(request)) => {
            broker.push_faults(&request.entity, request.faults.into_iter().map(AmqpFault::from));
            Json(broker.stats()).into_response()
        }
        Err(rejection) => {
            let body =
                serde_json::json!({"error": "invalid_request", "error_description": rejection.body_text()});
            (rejection.status(), Json(body)).into_response()
        }
    }
}

async fn stats(State(broker): State<Arc<Broker>>) -> Json<AmqpStats> {
    Json(broker.stats())
}

async fn drop_connections(State(broker): State<Arc<Broker>>) -> (StatusCode, Json<AmqpStats>) {
    broker.drop_connections();
    (StatusCode::OK, Json(broker.stats()))
}
