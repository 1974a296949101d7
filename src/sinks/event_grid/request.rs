//! Event Grid request bodies (pure): a batch in the topic's input schema, split into requests
//! under Event Grid's 1 MB limit.
//!
//! - CloudEvents schema: a JSON array of structured CloudEvents, exactly the events' structured
//!   form (`application/cloudevents-batch+json; charset=utf-8`).
//! - EventGrid schema: a JSON array of EventGridEvents as ADT writes them (`application/json`):
//!   `id`; `subject`; `eventType` = the CloudEvent `type`; `dataVersion` `"1.0"`;
//!   `metadataVersion` `"1"`; `eventTime` = the CloudEvent `time`, or the moment twinroute accepted
//!   the event (RFC 3339, UTC) when it has none (telemetry); `topic` left out (Event Grid fills it
//!   in); `data` = `{"data": <the event's data, untouched>, "contenttype", "traceparent",
//!   "dataschema"}`, each present only when the event has it (binary data goes in as
//!   `data_base64`, as in CloudEvents' JSON form). Event Grid requires a subject; an event without
//!   one (twin-level telemetry) gets its twin id, else its source (open in ADT; twinroute's choice).

use crate::config::EventGridSchema;
use crate::delivery::Envelope;
use crate::event::encode::{write_str, Members};
use crate::event::CloudEvent;
use std::sync::Arc;
use time::format_description::well_known::Rfc3339;

/// Event Grid's limit on one publish request (and so on one event): 1 MB.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Content type of a CloudEvents-schema batch.
pub const CONTENT_TYPE_CLOUDEVENTS_BATCH: &str = "application/cloudevents-batch+json; charset=utf-8";
/// Content type of an EventGrid-schema batch.
pub const CONTENT_TYPE_EVENT_GRID: &str = "application/json";

/// `dataVersion` of the EventGridEvents ADT sends.
pub const DATA_VERSION: &str = "1.0";
/// `metadataVersion` of EventGridEvents.
pub const METADATA_VERSION: &str = "1";

/// One publish request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventGridRequest {
    /// The JSON array.
    pub body: bytes::Bytes,
    pub content_type: &'static str,
    /// Which events of the batch it carries (positions, ascending).
    pub events: Vec<usize>,
}

/// An event that cannot be sent at all: alone it is over the request limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// Position in the batch.
    pub index: usize,
    pub id: String,
    /// Bytes of the request it alone would need.
    pub size: usize,
}

/// A batch as requests, plus the events too large to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventGridRequests {
    pub requests: Vec<EventGridRequest>,
    pub oversized: Vec<Oversized>,
}

/// The content type of a schema's requests.
pub fn content_type(schema: EventGridSchema) -> &'static str {
    match schema {
        EventGridSchema::CloudEvents => CONTENT_TYPE_CLOUDEVENTS_BATCH,
        EventGridSchema::EventGrid => CONTENT_TYPE_EVENT_GRID,
    }
}

/// One event in the schema's JSON form (an element of the request array).
pub fn encode_event(schema: EventGridSchema, envelope: &Envelope) -> Vec<u8> {
    match schema {
        EventGridSchema::CloudEvents => envelope.event.to_structured_json(),
        EventGridSchema::EventGrid => event_grid_event(envelope),
    }
}

/// The batch as requests of at most `max_bytes` each, events in order, each request as full as
/// it can be. An event that alone does not fit is left out and reported in `oversized`.
pub fn build_requests(
    schema: EventGridSchema,
    batch: &[Arc<Envelope>],
    max_bytes: usize,
) -> EventGridRequests {
    let mut out = EventGridRequests::default();
    let mut body: Vec<u8> = Vec::new();
    let mut events: Vec<usize> = Vec::new();
    let finish = |body: &mut Vec<u8>, events: &mut Vec<usize>, out: &mut EventGridRequests| {
        let mut done = std::mem::take(body);
        done.push(b']');
        out.requests.push(EventGridRequest {
            body: done.into(),
            content_type: content_type(schema),
            events: std::mem::take(events),
        });
    };
    for (index, envelope) in batch.iter().enumerate() {
        let element = encode_event(schema, envelope);
        if element.len() + 2 > max_bytes {
            out.oversized.push(Oversized {
                index,
                id: envelope.event.id().to_owned(),
                size: element.len() + 2,
            });
            continue;
        }
        // The request as it would be with this event: the open array, a comma, it, the `]`.
        if !events.is_empty() && body.len() + 1 + element.len() + 1 > max_bytes {
            finish(&mut body, &mut events, &mut out);
        }
        if events.is_empty() {
            body.reserve(element.len() + 2);
            body.push(b'[');
        } else {
            body.push(b',');
        }
        body.extend_from_slice(&element);
        events.push(index);
    }
    if !events.is_empty() {
        finish(&mut body, &mut events, &mut out);
    }
    out
}

/// An EventGridEvent, written by hand so the event's data bytes go out untouched.
pub fn event_grid_event(envelope: &Envelope) -> Vec<u8> {
    let event = &envelope.event;
    let mut out = Vec::with_capacity(event.size_hint() + 160);
    out.extend_from_slice(b"{\"id\":");
    write_str(&mut out, event.id());
    out.extend_from_slice(b",\"subject\":");
    write_str(&mut out, subject(event));
    out.extend_from_slice(b",\"eventType\":");
    write_str(&mut out, event.ty());
    out.extend_from_slice(b",\"dataVersion\":");
    write_str(&mut out, DATA_VERSION);
    out.extend_from_slice(b",\"metadataVersion\":");
    write_str(&mut out, METADATA_VERSION);
    out.extend_from_slice(b",\"eventTime\":");
    match event.time() {
        Some(time) => write_str(&mut out, time),
        None => {
            let accepted = envelope.accepted_at.to_offset(time::UtcOffset::UTC);
            // Formatting a valid UTC date-time as RFC 3339 cannot fail for years 0..=9999.
            let text = accepted.format(&Rfc3339).unwrap_or_else(|_| accepted.to_string());
            write_str(&mut out, &text);
        }
    }
    out.extend_from_slice(b",\"data\":{");
    let mut members = Members::default();
    if let Some(data) = event.data() {
        members.data(&mut out, data);
    }
    for (name, value) in [
        ("contenttype", event.datacontenttype()),
        ("traceparent", event.traceparent()),
        ("dataschema", event.dataschema()),
    ] {
        if let Some(value) = value {
            members.key(&mut out, name);
            write_str(&mut out, value);
        }
    }
    out.extend_from_slice(b"}}");
    out
}

/// The EventGridEvent subject: the CloudEvent's, else the twin id, else the source.
fn subject(event: &CloudEvent) -> &str {
    event.subject().or_else(|| event.twin_id()).unwrap_or_else(|| event.source())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_structured;
    use serde_json::{json, Value};
    use time::macros::datetime;

    fn envelope(json: &str) -> Arc<Envelope> {
        Arc::new(Envelope::new(parse_structured(json.as_bytes()).unwrap()))
    }

    const CREATE: &str = r#"{"specversion":"1.0","id":"6ccdb1cd","type":"Microsoft.DigitalTwins.Twin.Create","source":"adt.api.sea.digitaltwins.azure.net","subject":"twin1","time":"2021-12-09T20:28:52.6745538Z","datacontenttype":"application/json","traceparent":"00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01","data":{"$dtId":"twin1","n": 1.50}}"#;

    #[test]
    fn event_grid_schema_maps_every_field() {
        let e = envelope(CREATE);
        let text = String::from_utf8(event_grid_event(&e)).unwrap();
        // The data bytes are untouched (`1.50` is not re-serialized as `1.5`).
        assert!(text.contains(r#""data":{"data":{"$dtId":"twin1","n": 1.50},"#), "{text}");
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({
                "id": "6ccdb1cd",
                "subject": "twin1",
                "eventType": "Microsoft.DigitalTwins.Twin.Create",
                "dataVersion": "1.0",
                "metadataVersion": "1",
                "eventTime": "2021-12-09T20:28:52.6745538Z",
                "data": {
                    "data": {"$dtId": "twin1", "n": 1.50},
                    "contenttype": "application/json",
                    "traceparent": "00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01"
                }
            })
        );
    }

    #[test]
    fn telemetry_gets_a_subject_and_the_accepted_time() {
        let mut e = Envelope::new(
            parse_structured(
                br#"{"specversion":"1.0","id":"m1","type":"microsoft.iot.telemetry","source":"adt.example/digitaltwins/thermo-7","dataschema":"dtmi:ex:t;1","data":{"t":21}}"#,
            )
            .unwrap(),
        );
        e.accepted_at = datetime!(2024-05-06 07:08:09.5 UTC);
        let value: Value = serde_json::from_slice(&event_grid_event(&e)).unwrap();
        assert_eq!(value["subject"], "thermo-7");
        assert_eq!(value["eventTime"], "2024-05-06T07:08:09.5Z");
        assert_eq!(value["data"], json!({"data": {"t": 21}, "dataschema": "dtmi:ex:t;1"}));
    }

    #[test]
    fn cloud_events_schema_is_the_structured_form() {
        let batch = vec![envelope(CREATE), envelope(CREATE)];
        let requests = build_requests(EventGridSchema::CloudEvents, &batch, MAX_REQUEST_BYTES);
        assert_eq!(requests.requests.len(), 1);
        let one = String::from_utf8(batch[0].event.to_structured_json()).unwrap();
        assert_eq!(requests.requests[0].body, format!("[{one},{one}]").into_bytes());
        assert_eq!(requests.requests[0].content_type, CONTENT_TYPE_CLOUDEVENTS_BATCH);
        assert_eq!(requests.requests[0].events, vec![0, 1]);
    }

    #[test]
    fn batches_are_split_under_the_limit() {
        let batch: Vec<_> = (0..10).map(|_| envelope(CREATE)).collect();
        let one = batch[0].event.to_structured_json().len();
        // Room for exactly three events per request: `[` + 3 events + 2 commas + `]`.
        let limit = 3 * one + 4;
        let requests = build_requests(EventGridSchema::CloudEvents, &batch, limit);
        let split: Vec<_> = requests.requests.iter().map(|r| r.events.clone()).collect();
        assert_eq!(split, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]);
        for r in &requests.requests {
            assert!(r.body.len() <= limit);
            let parsed: Vec<Value> = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(parsed.len(), r.events.len());
        }
        let requests = build_requests(EventGridSchema::CloudEvents, &batch, limit - 1);
        assert_eq!(requests.requests.len(), 5);
    }

    #[test]
    fn an_event_alone_over_the_limit_is_set_aside() {
        let big = format!(
            r#"{{"specversion":"1.0","id":"big","type":"t","source":"s","data":{{"x":"{}"}}}}"#,
            "a".repeat(2000)
        );
        let batch = vec![envelope(CREATE), envelope(&big), envelope(CREATE)];
        // Exactly two ordinary events fit in one request.
        let limit = event_grid_event(&batch[0]).len() * 2 + 3;
        let requests = build_requests(EventGridSchema::EventGrid, &batch, limit);
        assert_eq!(requests.oversized.len(), 1);
        assert_eq!((requests.oversized[0].index, requests.oversized[0].id.as_str()), (1, "big"));
        assert!(requests.oversized[0].size > limit);
        assert_eq!(requests.requests.len(), 1);
        assert_eq!(requests.requests[0].events, vec![0, 2]);
        assert_eq!(requests.requests[0].body.len(), limit);
        assert_eq!(requests.requests[0].content_type, CONTENT_TYPE_EVENT_GRID);
    }
}
