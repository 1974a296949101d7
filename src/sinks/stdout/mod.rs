//! The `Stdout` endpoint: NDJSON on standard output, for pipelines and the local demo.
//! Logs go to standard error, so stdout carries only events.

use super::{ndjson_lines, DeliveryOutcome, Sink};
use crate::delivery::Envelope;
use async_trait::async_trait;
use std::io::Write;
use std::sync::Arc;

/// Writes each event as one line to the process's standard output.
#[derive(Default)]
pub struct StdoutSink;

impl StdoutSink {
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl Sink for StdoutSink {
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        let bytes = ndjson_lines(batch);
        // A short blocking write under the stdout lock keeps lines of concurrent sinks whole.
        let mut out = std::io::stdout().lock();
        match out.write_all(&bytes).and_then(|()| out.flush()) {
            Ok(()) => DeliveryOutcome::Delivered,
            Err(e) => DeliveryOutcome::Transient { reason: format!("writing to stdout: {e}"), after: None },
        }
    }
}
