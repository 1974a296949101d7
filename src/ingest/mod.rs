//! Intake: the HTTP endpoint (`POST /events`) and the sources that read events from elsewhere
//! (NDJSON files or stdin, the sample generator). All of them hand events to the dispatcher,
//! which queues a submission whole or refuses it whole.

pub mod eventhubs;
pub mod http;
pub mod ndjson;
pub mod sample;

use serde::Serialize;

/// The error body every API of twinroute answers with, in ADT's shape
/// (`{"error": {"code", "message"}}`), with the individual problems in `details`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<D: Serialize> {
    pub error: ErrorDetail<D>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<D: Serialize> {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<D>,
}
