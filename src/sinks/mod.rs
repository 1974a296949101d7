//! Destinations. Each sink lives in its own folder with the same shape: a pure part that builds
//! what goes on the wire, and one service that does the IO and *classifies* the result. Whether
//! and when to retry is decided by the delivery workers, in one place, never by a sink.

pub mod amqp;
pub mod blob;
pub mod event_grid;
pub mod event_hubs;
pub mod file;
pub mod http;
pub mod memory;
pub mod service_bus;
pub mod stdout;

use crate::config::{EndpointConfig, EndpointTarget};
use crate::delivery::Envelope;
use crate::identity::{IdentityProvider, ManagedIdentityId, AUDIENCE_EVENT_HUBS, AUDIENCE_SERVICE_BUS};
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
    /// Some events of the batch were delivered (their positions in `delivered`); the others had
    /// the outcome `rest` (never itself `Partial` or `Delivered`).
    Partial { delivered: Vec<usize>, rest: Box<DeliveryOutcome> },
}

impl DeliveryOutcome {
    /// `rest` for the events not in `delivered`: `Partial`, or just `rest` when nothing was
    /// delivered.
    pub fn partial(delivered: Vec<usize>, rest: DeliveryOutcome) -> DeliveryOutcome {
        match rest {
            DeliveryOutcome::Delivered => DeliveryOutcome::Delivered,
            rest if delivered.is_empty() => rest,
            DeliveryOutcome::Partial { delivered: more, rest } => {
                let mut all = delivered;
                all.extend(more);
                DeliveryOutcome::Partial { delivered: all, rest }
            }
            rest => DeliveryOutcome::Partial { delivered, rest: Box::new(rest) },
        }
    }
}

/// A destination for routed events.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Delivers a batch (one or more events, in queue order).
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome;

    /// After an [`DeliveryOutcome::AuthFailure`]: get fresh credentials (a forced token refresh)
    /// before the next attempt. Sinks without refreshable credentials do nothing.
    async fn refresh_credentials(&self) {}

    /// Makes delivered data durable where the sink buffers it (files) and closes connections;
    /// called when the endpoint's worker stops.
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
    #[error("endpoint {endpoint}: {reason}")]
    Invalid { endpoint: String, reason: String },
}

/// Makes the sink for each endpoint. The daemon uses [`DefaultSinkFactory`]; tests and embedders
/// can supply their own (e.g. [`memory::MemorySinkFactory`]).
#[async_trait]
pub trait SinkFactory: Send + Sync + 'static {
    /// Whether this factory can deliver to the endpoint at all (checked before a change is accepted).
    fn supports(&self, endpoint: &EndpointConfig) -> bool;
    /// Builds the sink; IO errors (a file that cannot be opened) are reported here.
    async fn build(&self, endpoint: &EndpointConfig) -> Result<Arc<dyn Sink>, SinkBuildError>;

    /// The endpoint's dead-letter store, if it has one.
    async fn dead_letters(
        &self,
        _endpoint: &EndpointConfig,
    ) -> Result<Option<Arc<dyn crate::delivery::deadletter::DeadLetterStore>>, SinkBuildError> {
        Ok(None)
    }
}

/// The sinks of this build. Identity-based endpoints get their credentials from `identity`.
#[derive(Debug, Clone)]
pub struct DefaultSinkFactory {
    identity: Arc<IdentityProvider>,
}

impl DefaultSinkFactory {
    pub fn new(identity: Arc<IdentityProvider>) -> Self {
        Self { identity }
    }

    /// A Blob writer for a dead-letter container, with the endpoint's identity or SAS.
    pub fn dead_letter_writer(
        &self,
        endpoint: &EndpointConfig,
    ) -> Result<Option<blob::BlobWriter>, SinkBuildError> {
        let invalid = |reason: String| SinkBuildError::Invalid { endpoint: endpoint.name.clone(), reason };
        let (url, credential) = match &endpoint.dead_letter {
            None => return Ok(None),
            Some(crate::config::DeadLetter::Identity(url)) => {
                let identity = endpoint
                    .identity
                    .as_ref()
                    .ok_or_else(|| invalid("dead_letter_uri needs an identity".into()))?;
                let credential = self
                    .identity
                    .credential(&ManagedIdentityId::from(identity))
                    .map_err(|e| invalid(e.message))?;
                (url.clone(), Some(Arc::new(credential) as Arc<dyn azure_core::credentials::TokenCredential>))
            }
            Some(crate::config::DeadLetter::Sas(sas)) => {
                let url = url::Url::parse(sas.expose())
                    .map_err(|_| invalid("dead_letter_secret is not a URL".into()))?;
                (url, None)
            }
        };
        blob::BlobWriter::new(&url, credential, endpoint.ca_file.as_deref())
            .map(Some)
            .map_err(|e| invalid(format!("dead-letter store: {e}")))
    }

    /// The AMQP credentials of an Event Hubs / Service Bus endpoint.
    fn amqp_auth(
        &self,
        endpoint: &EndpointConfig,
        connection: Option<&crate::config::ConnectionString>,
        audience: &'static str,
    ) -> Result<amqp::AmqpAuth, SinkBuildError> {
        match (&endpoint.identity, connection) {
            (Some(identity), _) => {
                let credential =
                    self.identity.credential(&ManagedIdentityId::from(identity)).map_err(|e| {
                        SinkBuildError::Invalid { endpoint: endpoint.name.clone(), reason: e.message }
                    })?;
                Ok(amqp::AmqpAuth::Identity { credential, audience })
            }
            (None, Some(connection)) => Ok(amqp::AmqpAuth::Sas { connection: connection.clone() }),
            (None, None) => Err(SinkBuildError::Invalid {
                endpoint: endpoint.name.clone(),
                reason: "neither an identity nor a connection string".into(),
            }),
        }
    }

    /// The identity provider sinks take credentials from.
    pub fn identity(&self) -> &Arc<IdentityProvider> {
        &self.identity
    }
}

#[async_trait]
impl SinkFactory for DefaultSinkFactory {
    async fn dead_letters(
        &self,
        endpoint: &EndpointConfig,
    ) -> Result<Option<Arc<dyn crate::delivery::deadletter::DeadLetterStore>>, SinkBuildError> {
        Ok(self.dead_letter_writer(endpoint)?.map(|w| {
            Arc::new(crate::delivery::deadletter::BlobDeadLetters::new(w))
                as Arc<dyn crate::delivery::deadletter::DeadLetterStore>
        }))
    }

    fn supports(&self, endpoint: &EndpointConfig) -> bool {
        matches!(
            endpoint.target,
            EndpointTarget::File { .. }
                | EndpointTarget::Stdout
                | EndpointTarget::EventHub { .. }
                | EndpointTarget::ServiceBus { .. }
                | EndpointTarget::EventGrid { .. }
                | EndpointTarget::Blob { .. }
        )
    }

    async fn build(&self, endpoint: &EndpointConfig) -> Result<Arc<dyn Sink>, SinkBuildError> {
        match &endpoint.target {
            EndpointTarget::File { path } => file::FileSink::open(path)
                .await
                .map(|s| Arc::new(s) as Arc<dyn Sink>)
                .map_err(|source| SinkBuildError::Io { endpoint: endpoint.name.clone(), source }),
            EndpointTarget::Stdout => Ok(Arc::new(stdout::StdoutSink::new())),
            EndpointTarget::EventHub { connection, .. } => {
                let auth = self.amqp_auth(endpoint, connection.as_ref(), AUDIENCE_EVENT_HUBS)?;
                event_hubs::EventHubsSink::new(endpoint, auth)
                    .map(|s| Arc::new(s) as Arc<dyn Sink>)
                    .map_err(|reason| SinkBuildError::Invalid { endpoint: endpoint.name.clone(), reason })
            }
            EndpointTarget::ServiceBus { connection, .. } => {
                let auth = self.amqp_auth(endpoint, connection.as_ref(), AUDIENCE_SERVICE_BUS)?;
                service_bus::ServiceBusSink::new(endpoint, auth)
                    .map(|s| Arc::new(s) as Arc<dyn Sink>)
                    .map_err(|reason| SinkBuildError::Invalid { endpoint: endpoint.name.clone(), reason })
            }
            EndpointTarget::EventGrid { .. } => event_grid::EventGridSink::new(endpoint)
                .map(|s| Arc::new(s) as Arc<dyn Sink>)
                .map_err(|reason| SinkBuildError::Invalid { endpoint: endpoint.name.clone(), reason }),
            EndpointTarget::Blob { .. } => {
                let credential = match &endpoint.identity {
                    Some(identity) => Some(Arc::new(
                        self.identity.credential(&ManagedIdentityId::from(identity)).map_err(|e| {
                            SinkBuildError::Invalid { endpoint: endpoint.name.clone(), reason: e.message }
                        })?,
                    )
                        as Arc<dyn azure_core::credentials::TokenCredential>),
                    None => None,
                };
                blob::BlobSink::new(endpoint, credential)
                    .map(|s| Arc::new(s) as Arc<dyn Sink>)
                    .map_err(|reason| SinkBuildError::Invalid { endpoint: endpoint.name.clone(), reason })
            }
            #[allow(unreachable_patterns)]
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
