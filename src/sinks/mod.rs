//! Destinations. Each sink lives in its own folder with the same shape: a pure part that builds
//! what goes on the wire, and one service that does the IO and *classifies* the result. Whether
//! and when to retry is decided by the delivery workers, in one place, never by a sink.

pub mod file;
pub mod memory;
pub mod stdout;

use crate::config::{EndpointConfig, EndpointTarget};
use crate::delivery::Envelope;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// What happened to a batch, as the sink sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The destination has every event of the batch.
    Delivered,
    /// Worth trying again (throttling, timeouts, the destination briefly down), optionally no
    /// sooner than `after` (a server's hint).
    Transient { reason: String, after: Option<Duration> },
    /// The destination refused our credentials: refresh them once and retry, then report the
    /// endpoint unhealthy with `reason` if it persists.
    AuthFailure { reason: String },
    /// Retrying cannot help (bad request, too large, entity not found): dead-letter at once.
    Permanent { reason: String },
}

/// A destination for routed events.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Delivers a batch (one or more events, in queue order).
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome;

    /// Makes delivered data durable where the sink buffers it (files); called before shutdown.
    async fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a sink could not be built for an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SinkBuildError {
    #[error(
        "endpoint {endpoint}: {endpoint_type} endpoints are not supported by this build of twinroute yet"
    )]
    Unsupported { endpoint: String, endpoint_type: String },
    #[error("endpoint {endpoint}: {source}")]
    Io { endpoint: String, source: std::io::Error },
}

/// Makes the sink for each endpoint. The daemon uses [`DefaultSinkFactory`]; tests and embedders
/// can supply their own (e.g. [`memory::MemorySinkFactory`]).
#[async_trait]
pub trait SinkFactory: Send + Sync + 'static {
    /// Whether this factory can deliver to the endpoint at all (checked before a change is accepted).
    fn supports(&self, endpoint: &EndpointConfig) -> bool;
    /// Builds the sink; IO errors (a file that cannot be opened) are reported here.
    async fn build(&self, endpoint: &EndpointConfig) -> Result<Arc<dyn Sink>, SinkBuildError>;
}

/// The sinks of this build.
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultSinkFactory;

#[async_trait]
impl SinkFactory for DefaultSinkFactory {
    fn supports(&self, endpoint: &EndpointConfig) -> bool {
        matches!(endpoint.target, EndpointTarget::File { .. } | EndpointTarget::Stdout)
    }

    async fn build(&self, endpoint: &EndpointConfig) -> Result<Arc<dyn Sink>, SinkBuildError> {
        match &endpoint.target {
            EndpointTarget::File { path } => file::FileSink::open(path)
                .await
                .map(|s| Arc::new(s) as Arc<dyn Sink>)
                .map_err(|source| SinkBuildError::Io { endpoint: endpoint.name.clone(), source }),
            EndpointTarget::Stdout => Ok(Arc::new(stdout::StdoutSink::new())),
            _ => Err(SinkBuildError::Unsupported {
                endpoint: endpoint.name.clone(),
                endpoint_type: endpoint.endpoint_type.to_string(),
            }),
        }
    }
}

/// The NDJSON form used by the file and stdout sinks: one structured CloudEvent per line.
pub fn ndjson_lines(batch: &[Arc<Envelope>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|e| e.event.size_hint() + 1).sum());
    for envelope in batch {
        envelope.event.write_structured_json(&mut out);
        out.push(b'\n');
    }
    out
}
