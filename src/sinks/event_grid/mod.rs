//! The `EventGrid` endpoint: events published to an Event Grid topic over HTTPS, in the topic's
//! input schema (CloudEvents or EventGrid), authenticated with an access key (`aeg-sas-key`), as
//! ADT does (key-based only).
//!
//! - [`request`] (pure): bodies in either schema, split under Event Grid's 1 MB request limit.
//! - [`EventGridSink`]: the one service doing IO: posts each request, rotates between the two
//!   access keys, and classifies the answer.
//!
//! Keys: `access_key1` is tried first; when the topic refuses it (401/403) and `access_key2` is
//! configured, the same request is sent again at once with `access_key2`, and later requests
//! start with the key that worked, so a key rotation costs one extra request, not one per batch.
//! Keys travel only in the `aeg-sas-key` header (marked sensitive) and never reach a message.

pub mod request;

pub use request::{build_requests, EventGridRequest, EventGridRequests, MAX_REQUEST_BYTES};

use super::{http, DeliveryOutcome, Sink};
use crate::config::{EndpointConfig, EndpointTarget, EventGridSchema};
use crate::delivery::Envelope;
use async_trait::async_trait;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The Event Grid publish API version, added to the topic URL when it names none.
pub const API_VERSION: &str = "2018-01-01";

/// The header carrying a topic access key.
pub const KEY_HEADER: &str = "aeg-sas-key";

/// How much of an error answer is read for its message.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Publishes batches to one Event Grid topic.
pub struct EventGridSink {
    /// Where requests go: the topic endpoint with its `api-version`.
    url: url::Url,
    /// The topic endpoint without its query, the only form that goes into messages.
    display_url: String,
    schema: EventGridSchema,
    /// `access_key1`, then `access_key2` if configured; header values marked sensitive.
    keys: Vec<HeaderValue>,
    /// The key that was last accepted (an index into `keys`): after a rotation, later requests
    /// start with the key that works.
    preferred_key: AtomicUsize,
    client: reqwest::Client,
}

impl std::fmt::Debug for EventGridSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventGridSink")
            .field("topic", &self.display_url)
            .field("schema", &self.schema)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// How a single request went.
enum Answer {
    Delivered,
    /// Every configured key was refused.
    KeysRefused {
        status: u16,
    },
    Failed(DeliveryOutcome),
}

impl EventGridSink {
    /// The sink of an `EventGrid` endpoint (its keys, schema and `ca_file`).
    pub fn new(endpoint: &EndpointConfig) -> Result<EventGridSink, String> {
        let name = &endpoint.name;
        let EndpointTarget::EventGrid { topic_endpoint, schema } = &endpoint.target else {
            return Err(format!("endpoint {name}: not an EventGrid endpoint"));
        };
        let mut keys = Vec::new();
        for (field, key) in
            [("access_key1", &endpoint.spec.access_key1), ("access_key2", &endpoint.spec.access_key2)]
        {
            let Some(key) = key.as_ref().filter(|k| !k.expose().is_empty()) else {
                continue;
            };
            let mut value = HeaderValue::from_str(key.expose()).map_err(|_| {
                format!("endpoint {name}: {field} holds characters an HTTP header cannot carry (its value is not shown)")
            })?;
            value.set_sensitive(true);
            keys.push(value);
        }
        if endpoint.spec.access_key1.as_ref().is_none_or(|k| k.expose().is_empty()) {
            return Err(format!("endpoint {name}: access_key1 is required for EventGrid endpoints"));
        }
        let mut url = topic_endpoint.clone();
        if !url.query_pairs().any(|(k, _)| k == "api-version") {
            url.query_pairs_mut().append_pair("api-version", API_VERSION);
        }
        let client =
            http::client(endpoint.ca_file.as_deref()).map_err(|e| format!("endpoint {name}: {e}"))?;
        Ok(EventGridSink {
            display_url: http::redact_url(topic_endpoint),
            url,
            schema: *schema,
            keys,
            preferred_key: AtomicUsize::new(0),
            client,
        })
    }

    /// Sends one request, with the preferred key first and the other one if it is refused.
    async fn send(&self, request: &EventGridRequest) -> Answer {
        let first = self.preferred_key.load(Ordering::Relaxed) % self.keys.len();
        let order = (0..self.keys.len()).map(|i| (first + i) % self.keys.len());
        let mut refused = 0;
        for index in order {
            let response = self
                .client
                .post(self.url.clone())
                .header(CONTENT_TYPE, request.content_type)
                .header(KEY_HEADER, self.keys[index].clone())
                .body(request.body.clone())
                .send()
                .await;
            let response = match response {
                Ok(response) => response,
                Err(e) => return Answer::Failed(self.transport_failure(&e)),
            };
            let status = response.status().as_u16();
            match status {
                200..=299 => {
                    self.preferred_key.store(index, Ordering::Relaxed);
                    return Answer::Delivered;
                }
                401 | 403 => refused = status,
                _ => return Answer::Failed(self.refusal(response).await),
            }
        }
        Answer::KeysRefused { status: refused }
    }

    fn transport_failure(&self, e: &reqwest::Error) -> DeliveryOutcome {
        let cause = http::error_chain(e);
        let what = if e.is_timeout() { "timed out" } else { "failed" };
        DeliveryOutcome::Transient {
            reason: format!(
                "publishing to the Event Grid topic {} {what}: {cause}{}",
                self.display_url,
                http::tls_hint(&cause)
            ),
            after: None,
        }
    }

    /// Classifies an answer other than success or a refused key.
    async fn refusal(&self, response: reqwest::Response) -> DeliveryOutcome {
        let status = response.status().as_u16();
        let after = {
            let headers = response.headers();
            http::retry_after(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        };
        let detail = error_detail(response).await;
        let topic = &self.display_url;
        match status {
            408 | 429 | 500..=599 => DeliveryOutcome::Transient {
                reason: format!("the Event Grid topic {topic} answered {status}{detail}"),
                after,
            },
            400 => DeliveryOutcome::Permanent {
                reason: format!("the Event Grid topic {topic} rejected the events (400{detail})"),
            },
            413 => DeliveryOutcome::Permanent {
                reason: format!(
                    "the Event Grid topic {topic} refused the request as too large (413{detail})"
                ),
            },
            404 => DeliveryOutcome::Permanent {
                reason: format!(
                    "the Event Grid topic {topic} was not found (404{detail}): check topic_endpoint"
                ),
            },
            _ => DeliveryOutcome::Permanent {
                reason: format!("the Event Grid topic {topic} refused the request ({status}{detail})"),
            },
        }
    }
}

/// `: <code>: <message>` from Event Grid's `{"error": {"code", "message"}}`, or the start of a
/// text body, or nothing.
async fn error_detail(response: reqwest::Response) -> String {
    let Ok(body) = response.bytes().await else {
        return String::new();
    };
    let body = &body[..body.len().min(MAX_ERROR_BODY)];
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let error = &value["error"];
        let code = error["code"].as_str().unwrap_or("");
        let message = error["message"].as_str().unwrap_or("");
        return match (code.is_empty(), message.is_empty()) {
            (true, true) => String::new(),
            (false, true) => format!(": {code}"),
            (true, false) => format!(": {message}"),
            (false, false) => format!(": {code}: {message}"),
        };
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {}", http::redact_urls(&text.chars().take(500).collect::<String>()))
    }
}

#[async_trait]
impl Sink for EventGridSink {
    /// Sends the batch's requests in order and stops at the first failure, reporting the events
    /// of the requests that succeeded as delivered (`Partial`), so only the rest is retried.
    /// Events too large to send at all are refused (permanent) while the others are delivered.
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        let EventGridRequests { requests, oversized } = build_requests(self.schema, batch, MAX_REQUEST_BYTES);
        let mut delivered = Vec::new();
        for request in &requests {
            match self.send(request).await {
                Answer::Delivered => delivered.extend(request.events.iter().copied()),
                Answer::KeysRefused { status } => {
                    let refused = DeliveryOutcome::AuthFailure {
                        reason: format!(
                            "the access key was refused by the Event Grid topic {} ({status}); check \
                             access_key1/access_key2",
                            self.display_url
                        ),
                    };
                    return DeliveryOutcome::partial(delivered, refused);
                }
                Answer::Failed(outcome) => return DeliveryOutcome::partial(delivered, outcome),
            }
        }
        if oversized.is_empty() {
            return DeliveryOutcome::Delivered;
        }
        let ids: Vec<String> = oversized.iter().map(|o| format!("{} ({} bytes)", o.id, o.size)).collect();
        let refused = DeliveryOutcome::Permanent {
            reason: format!(
                "event(s) {} over Event Grid's limit of {} bytes per request; the other {} event(s) of the \
                 batch were delivered",
                ids.join(", "),
                MAX_REQUEST_BYTES,
                batch.len() - oversized.len()
            ),
        };
        DeliveryOutcome::partial(delivered, refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EndpointSpec, Secret};

    fn spec(url: &str) -> EndpointSpec {
        EndpointSpec {
            endpoint_type: Some("EventGrid".into()),
            topic_endpoint: Some(url.into()),
            access_key1: Some(Secret::new("KEY-ONE")),
            ..Default::default()
        }
    }

    #[test]
    fn the_api_version_is_added_and_keys_stay_hidden() {
        let sink = EventGridSink::new(
            &spec("https://t.westus2-1.eventgrid.azure.net/api/events").validate("grid").unwrap(),
        )
        .unwrap();
        assert_eq!(
            sink.url.as_str(),
            "https://t.westus2-1.eventgrid.azure.net/api/events?api-version=2018-01-01"
        );
        assert_eq!(sink.keys.len(), 1);
        assert!(!format!("{sink:?}").contains("KEY-ONE"));
        let sink = EventGridSink::new(
            &spec("https://t.westus2-1.eventgrid.azure.net/api/events?api-version=2024-06-01")
                .validate("grid")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(sink.url.query(), Some("api-version=2024-06-01"));
    }

    #[test]
    fn keys_must_fit_in_a_header() {
        let mut s = spec("https://t.eventgrid.azure.net/api/events");
        s.access_key2 = Some(Secret::new("bad\nKEY-TWO"));
        let e = EventGridSink::new(&s.validate("grid").unwrap()).unwrap_err();
        assert!(e.contains("access_key2") && !e.contains("KEY-TWO"), "{e}");
    }
}
