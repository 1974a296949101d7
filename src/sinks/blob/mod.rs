//! The `Blob` endpoint: events stored as blobs in an Azure Storage container, in the layout of
//! ADT's dead-letter store (spec §5). The same [`BlobWriter`] is the dead-letter store's writer.
//!
//! - [`naming`] (pure): blob names, `<endpoint>/<yyyy>/<mm>/<dd>/<hh>/<event-id>.<ext>` (UTC, the
//!   hour the event was accepted).
//! - [`writer`]: [`BlobWriter`], the one service doing IO (write, list, read, delete) and
//!   classifying failures.
//! - [`BlobSink`]: the wiring: which blobs a batch becomes.
//!
//! Formats: `json` (the default) writes one blob per event holding its structured CloudEvents
//! JSON (`application/cloudevents+json`), exactly what a dead-letter blob holds; `ndjson` writes
//! one blob per delivered batch, one structured event per line (`application/x-ndjson`), named
//! after the batch's first event.
//!
//! Authentication: identity-based endpoints send managed-identity tokens for
//! `https://storage.azure.com/` (the identity needs *Storage Blob Data Contributor*); key-based
//! ones use a container SAS URL (`container_sas_url`) with write permission.

pub mod naming;
pub mod writer;

pub use naming::{blob_name, safe_event_id};
pub use writer::{BlobError, BlobWriter, StoredBlob};

use super::{ndjson_lines, DeliveryOutcome, Sink};
use crate::config::{AuthenticationType, BlobFormat, EndpointConfig, EndpointTarget};
use crate::delivery::Envelope;
use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use std::sync::Arc;
use tokio::task::JoinSet;

/// Content type of a blob holding one structured CloudEvent.
pub const CONTENT_TYPE_JSON: &str = "application/cloudevents+json";
/// Content type of a blob holding one structured CloudEvent per line.
pub const CONTENT_TYPE_NDJSON: &str = "application/x-ndjson";

/// How many blobs of one batch are written at once (format `json`): enough to hide round trips,
/// few enough not to trip the account's throttling on a large batch.
const MAX_CONCURRENT_PUTS: usize = 8;

/// Delivers batches to a Blob container.
#[derive(Debug)]
pub struct BlobSink {
    /// The endpoint's name: the first level of every blob name.
    endpoint: String,
    format: BlobFormat,
    /// Shared with the tasks writing a batch's blobs concurrently.
    writer: Arc<BlobWriter>,
}

impl BlobSink {
    /// The sink of a `Blob` endpoint. Identity-based endpoints need `credential` (the endpoint
    /// identity's, for Storage); key-based ones use the endpoint's container SAS URL and ignore it.
    pub fn new(
        endpoint: &EndpointConfig,
        credential: Option<Arc<dyn TokenCredential>>,
    ) -> Result<BlobSink, String> {
        let name = &endpoint.name;
        let EndpointTarget::Blob { container_url, format } = &endpoint.target else {
            return Err(format!("endpoint {name}: not a Blob endpoint"));
        };
        let writer = match endpoint.authentication_type {
            AuthenticationType::IdentityBased => {
                let Some(credential) = credential else {
                    return Err(format!(
                        "endpoint {name}: an identity-based Blob endpoint needs a managed-identity credential"
                    ));
                };
                BlobWriter::new(container_url, Some(credential), endpoint.ca_file.as_deref())
            }
            AuthenticationType::KeyBased => {
                let Some(sas) = &endpoint.spec.container_sas_url else {
                    return Err(format!("endpoint {name}: container_sas_url is required for key-based Blob endpoints"));
                };
                let url = url::Url::parse(sas.expose()).map_err(|_| {
                    format!("endpoint {name}: container_sas_url is not a URL (its value is not shown: it holds a SAS)")
                })?;
                BlobWriter::new(&url, None, endpoint.ca_file.as_deref())
            }
        }
        .map_err(|e| format!("endpoint {name}: {e}"))?;
        Ok(BlobSink { endpoint: name.clone(), format: *format, writer: Arc::new(writer) })
    }

    /// The writer, for callers that need the container directly (tests, replay tooling).
    pub fn writer(&self) -> &Arc<BlobWriter> {
        &self.writer
    }

    /// One blob per event, written concurrently. Blob names are deterministic (endpoint, the
    /// hour the event was accepted, its id), so when part of a batch failed and the whole batch
    /// is delivered again, the blobs already written are overwritten with identical content:
    /// re-delivery is idempotent.
    async fn deliver_json(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        let mut tasks = JoinSet::new();
        let mut worst = DeliveryOutcome::Delivered;
        for envelope in batch {
            if tasks.len() >= MAX_CONCURRENT_PUTS {
                if let Some(done) = tasks.join_next().await {
                    worst = worse(worst, joined(done));
                }
            }
            let name = blob_name(&self.endpoint, envelope.accepted_at, envelope.event.id(), "json");
            let body = envelope.event.to_structured_json();
            let writer = self.writer.clone();
            tasks.spawn(async move { writer.put(&name, body, CONTENT_TYPE_JSON, &[]).await });
        }
        while let Some(done) = tasks.join_next().await {
            worst = worse(worst, joined(done));
        }
        worst
    }

    /// One blob for the whole batch, named after its first event (and the hour it was accepted),
    /// so delivering the same batch again overwrites the same blob.
    async fn deliver_ndjson(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        let Some(first) = batch.first() else {
            return DeliveryOutcome::Delivered;
        };
        let name = blob_name(&self.endpoint, first.accepted_at, first.event.id(), "ndjson");
        self.writer.put(&name, ndjson_lines(batch), CONTENT_TYPE_NDJSON, &[]).await
    }
}

/// The outcome of one blob-writing task; a task that panicked is retried (it wrote nothing
/// we know of).
fn joined(result: Result<DeliveryOutcome, tokio::task::JoinError>) -> DeliveryOutcome {
    result.unwrap_or_else(|e| DeliveryOutcome::Transient {
        reason: format!("writing a blob failed unexpectedly: {e}"),
        after: None,
    })
}

/// The outcome of a batch from the outcomes of its blobs: the one that says most about the
/// whole batch wins. Refused credentials concern every blob; a permanent refusal cannot be
/// retried away; a transient failure keeps the longest wait the service asked for.
fn worse(a: DeliveryOutcome, b: DeliveryOutcome) -> DeliveryOutcome {
    fn rank(o: &DeliveryOutcome) -> u8 {
        match o {
            DeliveryOutcome::Delivered => 0,
            DeliveryOutcome::Transient { .. } => 1,
            DeliveryOutcome::Permanent { .. } => 2,
            DeliveryOutcome::AuthFailure { .. } => 3,
            DeliveryOutcome::Partial { rest, .. } => rank(rest),
        }
    }
    match (a, b) {
        (DeliveryOutcome::Transient { reason, after: x }, DeliveryOutcome::Transient { after: y, .. }) => {
            DeliveryOutcome::Transient { reason, after: x.max(y) }
        }
        (a, b) if rank(&b) > rank(&a) => b,
        (a, _) => a,
    }
}

#[async_trait]
impl Sink for BlobSink {
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        match self.format {
            BlobFormat::Json => self.deliver_json(batch).await,
            BlobFormat::Ndjson => self.deliver_ndjson(batch).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EndpointSpec, Secret};
    use std::time::Duration;

    fn transient(after: Option<u64>) -> DeliveryOutcome {
        DeliveryOutcome::Transient { reason: "t".into(), after: after.map(Duration::from_secs) }
    }

    #[test]
    fn the_most_telling_outcome_wins() {
        let permanent = DeliveryOutcome::Permanent { reason: "p".into() };
        let auth = DeliveryOutcome::AuthFailure { reason: "a".into() };
        assert_eq!(worse(DeliveryOutcome::Delivered, DeliveryOutcome::Delivered), DeliveryOutcome::Delivered);
        assert_eq!(worse(DeliveryOutcome::Delivered, transient(None)), transient(None));
        assert_eq!(worse(transient(Some(2)), transient(Some(5))), transient(Some(5)));
        assert_eq!(worse(transient(Some(2)), transient(None)), transient(Some(2)));
        assert_eq!(worse(permanent.clone(), transient(None)), permanent);
        assert_eq!(worse(permanent.clone(), auth.clone()), auth);
        assert_eq!(worse(auth.clone(), DeliveryOutcome::Delivered), auth);
    }

    #[test]
    fn building_needs_the_right_credentials() {
        let spec = EndpointSpec {
            endpoint_type: Some("Blob".into()),
            authentication_type: Some("IdentityBased".into()),
            container_url: Some("https://acct.blob.core.windows.net/events".into()),
            ..Default::default()
        };
        let endpoint = spec.validate("blob-out").unwrap();
        let e = BlobSink::new(&endpoint, None).unwrap_err();
        assert!(e.contains("needs a managed-identity credential"), "{e}");

        let spec = EndpointSpec {
            endpoint_type: Some("Blob".into()),
            container_sas_url: Some(Secret::new("https://acct.blob.core.windows.net/events?sv=1&sig=SECRET")),
            ..Default::default()
        };
        let mut endpoint = spec.validate("blob-out").unwrap();
        if let EndpointTarget::Blob { format, .. } = &mut endpoint.target {
            *format = BlobFormat::Ndjson;
        }
        let sink = BlobSink::new(&endpoint, None).unwrap();
        assert_eq!(sink.format, BlobFormat::Ndjson);
        assert_eq!(sink.writer().display_url(), "https://acct.blob.core.windows.net/events");
        assert!(!format!("{sink:?}").contains("SECRET"));
    }
}
