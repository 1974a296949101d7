//! Dead-lettering: events given up on are written, as structured CloudEvents, to the endpoint's
//! dead-letter container at `<endpoint>/<yyyy>/<mm>/<dd>/<hh>/<event-id>.json` (UTC, the hour they
//! were dead-lettered), with why, how many attempts, the last error and the first and last
//! attempt times as blob metadata. `twinroute deadletter list|replay` reads them back.

use super::retry::GiveUp;
use super::Envelope;
use crate::sinks::blob::{blob_name, BlobWriter, CONTENT_TYPE_JSON};
use crate::sinks::DeliveryOutcome;
use async_trait::async_trait;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Blob metadata names (Azure allows C# identifiers; lower case by convention).
pub const META_REASON: &str = "deadletterreason";
pub const META_ATTEMPTS: &str = "deliveryattempts";
pub const META_LAST_ERROR: &str = "lasterror";
pub const META_FIRST_ATTEMPT: &str = "firstattempttime";
pub const META_LAST_ATTEMPT: &str = "lastattempttime";
pub const META_ENDPOINT: &str = "endpointname";
/// Blob metadata values are HTTP header values: ASCII, and kept short.
const MAX_ERROR_METADATA: usize = 1024;

/// One event given up on, and why.
#[derive(Debug, Clone)]
pub struct DeadLetterRecord<'a> {
    pub endpoint: &'a str,
    pub envelope: &'a Envelope,
    pub reason: GiveUp,
    pub attempts: u32,
    pub first_attempt: Option<OffsetDateTime>,
    pub last_attempt: Option<OffsetDateTime>,
    pub last_error: Option<&'a str>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Makes text safe as a metadata value: printable ASCII, bounded.
pub fn metadata_value(text: &str) -> String {
    let mut out: String =
        text.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    if out.len() > MAX_ERROR_METADATA {
        out.truncate(MAX_ERROR_METADATA);
        out.push_str("...");
    }
    out
}

impl DeadLetterRecord<'_> {
    /// The blob name at `at` (when it is dead-lettered).
    pub fn blob_name(&self, at: OffsetDateTime) -> String {
        blob_name(self.endpoint, at, self.envelope.event.id(), "json")
    }

    /// The blob's metadata.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        let mut m = vec![
            (META_REASON, self.reason.as_str().to_owned()),
            (META_ATTEMPTS, self.attempts.to_string()),
            (META_ENDPOINT, metadata_value(self.endpoint)),
        ];
        if let Some(e) = self.last_error {
            m.push((META_LAST_ERROR, metadata_value(e)));
        }
        if let Some(t) = self.first_attempt {
            m.push((META_FIRST_ATTEMPT, rfc3339(t)));
        }
        if let Some(t) = self.last_attempt {
            m.push((META_LAST_ATTEMPT, rfc3339(t)));
        }
        m
    }
}

/// Where an endpoint's dead letters go.
#[async_trait]
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Stores one dead letter; anything but `Delivered` is retried by the caller, forever.
    async fn put(&self, record: &DeadLetterRecord<'_>) -> DeliveryOutcome;
    /// Where, for messages (never with a SAS).
    fn describe(&self) -> String;
}

/// Dead letters in a Blob container.
pub struct BlobDeadLetters {
    writer: BlobWriter,
}

impl BlobDeadLetters {
    pub fn new(writer: BlobWriter) -> Self {
        Self { writer }
    }
}

#[async_trait]
impl DeadLetterStore for BlobDeadLetters {
    async fn put(&self, record: &DeadLetterRecord<'_>) -> DeliveryOutcome {
        let name = record.blob_name(OffsetDateTime::now_utc());
        let metadata = record.metadata();
        let pairs: Vec<(&str, String)> = metadata.iter().map(|(k, v)| (*k, v.clone())).collect();
        self.writer.put(&name, record.envelope.event.to_structured_json(), CONTENT_TYPE_JSON, &pairs).await
    }

    fn describe(&self) -> String {
        self.writer.display_url().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_structured;

    #[test]
    fn metadata_says_why_how_often_and_when() {
        let event =
            parse_structured(br#"{"specversion":"1.0","id":"ev/1","source":"s","type":"t"}"#).unwrap();
        let envelope = Envelope::new(event);
        let first = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let record = DeadLetterRecord {
            endpoint: "twin-hub",
            envelope: &envelope,
            reason: GiveUp::MaxAttempts,
            attempts: 30,
            first_attempt: Some(first),
            last_attempt: Some(first + time::Duration::hours(23)),
            last_error: Some("server busy\nüber"),
        };
        let m = record.metadata();
        let get = |k: &str| m.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get(META_REASON), "max_attempts");
        assert_eq!(get(META_ATTEMPTS), "30");
        assert_eq!(get(META_LAST_ERROR), "server busy??ber");
        assert_eq!(get(META_FIRST_ATTEMPT), "2023-11-14T22:13:20Z");
        assert_eq!(record.blob_name(first), "twin-hub/2023/11/14/22/ev%2F1.json");
    }
}
