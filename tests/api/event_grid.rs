//! The Event Grid sink against the topic stand-in: both schemas on the wire, keys and their
//! rotation, and how every answer is classified.

use crate::helpers::{telemetry, twin_create};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use time::macros::datetime;
use twinroute::config::{EndpointSpec, Secret};
use twinroute::delivery::Envelope;
use twinroute::event::parse_structured;
use twinroute::sinks::event_grid::{EventGridSink, MAX_REQUEST_BYTES};
use twinroute::sinks::{DeliveryOutcome, Sink};
use twinroute_emulator::eventgrid::{EventGridConfig, EventGridStandIn, Fault, InputSchema};

const KEY1: &str = "primary-key-0123456789";
const KEY2: &str = "secondary-key-9876543210";

async fn topic(schema: InputSchema, keys: &[&str]) -> EventGridStandIn {
    let keys = keys.iter().map(|k| (*k).to_owned()).collect();
    EventGridStandIn::start(EventGridConfig { keys, schema }).await.unwrap()
}

/// The sink for `topic_endpoint` with the given keys and schema name.
fn sink(topic_endpoint: &str, schema: &str, key1: &str, key2: Option<&str>) -> EventGridSink {
    let spec = EndpointSpec {
        endpoint_type: Some("EventGrid".into()),
        topic_endpoint: Some(topic_endpoint.into()),
        access_key1: Some(Secret::new(key1)),
        access_key2: key2.map(Secret::new),
        schema: Some(schema.into()),
        ..Default::default()
    };
    EventGridSink::new(&spec.validate("grid-out").unwrap()).unwrap()
}

fn envelope(event: Value) -> Arc<Envelope> {
    Arc::new(Envelope::new(parse_structured(event.to_string().as_bytes()).unwrap()))
}

#[tokio::test]
async fn cloud_events_schema_sends_the_array_of_structured_events() {
    let topic = topic(InputSchema::CloudEvents, &[KEY1, KEY2]).await;
    let sink = sink(&topic.topic_endpoint(), "CloudEvents", KEY1, Some(KEY2));
    let batch = vec![envelope(twin_create("room-1")), envelope(telemetry("thermo-7", 20.5))];
    assert_eq!(sink.deliver(&batch).await, DeliveryOutcome::Delivered);

    let requests = topic.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.content_type.as_deref(), Some("application/cloudevents-batch+json; charset=utf-8"));
    assert_eq!(request.sas_key.as_deref(), Some(KEY1));
    assert_eq!(request.api_version.as_deref(), Some("2018-01-01"));
    // The body is exactly `[<event>,<event>]`, each event in its structured form.
    let structured: Vec<Vec<u8>> = batch.iter().map(|e| e.event.to_structured_json()).collect();
    assert_eq!(request.body_len, 2 + structured.iter().map(Vec::len).sum::<usize>() + 1);
    let expected: Vec<Value> = structured.iter().map(|s| serde_json::from_slice(s).unwrap()).collect();
    assert_eq!(topic.received(), expected);
}

#[tokio::test]
async fn event_grid_schema_maps_every_field_as_adt_does() {
    let topic = topic(InputSchema::EventGrid, &[KEY1]).await;
    let sink = sink(&topic.topic_endpoint(), "EventGrid", KEY1, None);
    let create = twin_create("room-1");
    let mut reading =
        Envelope::new(parse_structured(telemetry("thermo-7", 20.5).to_string().as_bytes()).unwrap());
    reading.accepted_at = datetime!(2024-05-06 07:08:09.25 UTC);
    let batch = vec![envelope(create.clone()), Arc::new(reading)];
    assert_eq!(sink.deliver(&batch).await, DeliveryOutcome::Delivered);

    let requests = topic.requests();
    assert_eq!(requests[0].content_type.as_deref(), Some("application/json"));
    let telemetry_id = batch[1].event.id();
    assert_eq!(
        topic.received(),
        vec![
            json!({
                "id": create["id"],
                "subject": "room-1",
                "eventType": "Microsoft.DigitalTwins.Twin.Create",
                "dataVersion": "1.0",
                "metadataVersion": "1",
                "eventTime": "2021-12-09T20:28:52.6745538Z",
                "data": {
                    "data": create["data"],
                    "contenttype": "application/json",
                    "traceparent": "00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01"
                }
            }),
            json!({
                "id": telemetry_id,
                // No subject on twin-level telemetry: the twin id stands in.
                "subject": "thermo-7",
                "eventType": "microsoft.iot.telemetry",
                "dataVersion": "1.0",
                "metadataVersion": "1",
                // No time on telemetry: the moment twinroute accepted it.
                "eventTime": "2024-05-06T07:08:09.25Z",
                "data": {
                    "data": {"temperature": 20.5},
                    "contenttype": "application/json",
                    "dataschema": "dtmi:com:example:Room;1"
                }
            }),
        ]
    );
}

#[tokio::test]
async fn a_refused_first_key_is_retried_with_the_second_and_remembered() {
    // The topic's keys were rotated: only the second key the endpoint knows is still valid.
    let topic = topic(InputSchema::CloudEvents, &[KEY2, "another-new-key"]).await;
    let sink = sink(&topic.topic_endpoint(), "CloudEvents", KEY1, Some(KEY2));
    assert_eq!(sink.deliver(&[envelope(twin_create("a"))]).await, DeliveryOutcome::Delivered);
    assert_eq!(sink.deliver(&[envelope(twin_create("b"))]).await, DeliveryOutcome::Delivered);
    let sent: Vec<(Option<String>, u16)> =
        topic.requests().into_iter().map(|r| (r.sas_key, r.status)).collect();
    assert_eq!(
        sent,
        vec![(Some(KEY1.into()), 401), (Some(KEY2.into()), 200), (Some(KEY2.into()), 200)],
        "key2 is used at once after key1 is refused, and first from then on"
    );
    assert_eq!(topic.received().len(), 2);
}

#[tokio::test]
async fn refused_keys_are_an_auth_failure_that_shows_no_key() {
    let topic = topic(InputSchema::CloudEvents, &["the-only-valid-key"]).await;
    let endpoint = topic.topic_endpoint();
    let sink = sink(&endpoint, "CloudEvents", KEY1, Some(KEY2));
    let outcome = sink.deliver(&[envelope(twin_create("a"))]).await;
    let DeliveryOutcome::AuthFailure { reason } = &outcome else { panic!("{outcome:?}") };
    assert!(
        reason.contains(&format!("the access key was refused by the Event Grid topic {endpoint}")),
        "{reason}"
    );
    assert!(reason.contains("check access_key1/access_key2"), "{reason}");
    for key in [KEY1, KEY2] {
        assert!(!reason.contains(key) && !format!("{sink:?}").contains(key));
    }
    assert_eq!(topic.requests().len(), 2, "each key is tried once");

    // With a single key there is nothing to rotate to.
    let sink = self::sink(&endpoint, "CloudEvents", KEY1, None);
    assert!(matches!(sink.deliver(&[envelope(twin_create("a"))]).await, DeliveryOutcome::AuthFailure { .. }));
    assert_eq!(topic.requests().len(), 3);
}

#[tokio::test]
async fn a_bad_request_is_permanent_with_the_services_message() {
    // The endpoint says CloudEvents, the topic takes the EventGrid schema: Event Grid answers 400.
    let topic = topic(InputSchema::EventGrid, &[KEY1]).await;
    let sink = sink(&topic.topic_endpoint(), "CloudEvents", KEY1, None);
    let outcome = sink.deliver(&[envelope(twin_create("a"))]).await;
    let DeliveryOutcome::Permanent { reason } = &outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("rejected the events (400: BadRequest: Unsupported content type"), "{reason}");

    topic.push_faults([Fault::status(413), Fault::status(404)]);
    let sink = self::sink(&topic.topic_endpoint(), "EventGrid", KEY1, None);
    for expected in ["too large (413", "not found (404"] {
        let outcome = sink.deliver(&[envelope(twin_create("a"))]).await;
        let DeliveryOutcome::Permanent { reason } = &outcome else { panic!("{outcome:?}") };
        assert!(reason.contains(expected), "{reason}");
    }
}

#[tokio::test]
async fn throttling_and_outages_are_transient_with_the_services_wait() {
    let topic = topic(InputSchema::CloudEvents, &[KEY1]).await;
    let sink = sink(&topic.topic_endpoint(), "CloudEvents", KEY1, None);
    topic.push_faults([Fault::with_retry_after(503, 7), Fault::status(429), Fault::status(500)]);
    let batch = [envelope(twin_create("a"))];
    let outcome = sink.deliver(&batch).await;
    let DeliveryOutcome::Transient { reason, after } = &outcome else { panic!("{outcome:?}") };
    assert_eq!(*after, Some(Duration::from_secs(7)));
    assert!(reason.contains("answered 503"), "{reason}");
    assert!(matches!(sink.deliver(&batch).await, DeliveryOutcome::Transient { after: None, .. }));
    assert!(matches!(sink.deliver(&batch).await, DeliveryOutcome::Transient { .. }));
    assert_eq!(sink.deliver(&batch).await, DeliveryOutcome::Delivered);
}

#[tokio::test]
async fn an_unreachable_topic_is_transient() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sink = sink(&format!("http://127.0.0.1:{port}/api/events"), "CloudEvents", KEY1, None);
    let outcome = sink.deliver(&[envelope(twin_create("a"))]).await;
    let DeliveryOutcome::Transient { reason, .. } = &outcome else { panic!("{outcome:?}") };
    assert!(reason.contains(&format!("http://127.0.0.1:{port}/api/events")), "{reason}");
    assert!(!reason.contains("api-version"), "{reason}");
}

/// An event whose data is about `kb` kilobytes.
fn big_event(kb: usize) -> Arc<Envelope> {
    let mut event = twin_create("big");
    event["data"] = json!({"blob": "x".repeat(kb * 1024)});
    envelope(event)
}

#[tokio::test]
async fn batches_are_split_under_one_megabyte() {
    for (schema, name) in [(InputSchema::CloudEvents, "CloudEvents"), (InputSchema::EventGrid, "EventGrid")] {
        let topic = topic(schema, &[KEY1]).await;
        let sink = sink(&topic.topic_endpoint(), name, KEY1, None);
        let batch: Vec<_> = (0..7).map(|_| big_event(300)).collect();
        assert_eq!(sink.deliver(&batch).await, DeliveryOutcome::Delivered);
        let requests = topic.requests();
        // Three 300 KB events fit in a megabyte, four do not.
        assert_eq!(requests.iter().map(|r| r.events).collect::<Vec<_>>(), [3, 3, 1], "{name}");
        assert!(requests.iter().all(|r| r.status == 200 && r.body_len <= MAX_REQUEST_BYTES));
        let ids: Vec<Value> = topic.received().iter().map(|e| e["id"].clone()).collect();
        let sent: Vec<Value> = batch.iter().map(|e| e.event.id().into()).collect();
        assert_eq!(ids, sent, "{name}: every event, in order");
    }
}

#[tokio::test]
async fn an_event_over_one_megabyte_is_permanent_and_the_rest_delivered() {
    let topic = topic(InputSchema::CloudEvents, &[KEY1]).await;
    let sink = sink(&topic.topic_endpoint(), "CloudEvents", KEY1, None);
    let batch = vec![envelope(twin_create("a")), big_event(1100), envelope(twin_create("b"))];
    let outcome = sink.deliver(&batch).await;
    // The others are reported delivered; only the oversized one is refused.
    let DeliveryOutcome::Partial { delivered, rest } = &outcome else { panic!("{outcome:?}") };
    assert_eq!(delivered, &[0, 2]);
    let DeliveryOutcome::Permanent { reason } = rest.as_ref() else { panic!("{outcome:?}") };
    assert!(reason.contains(batch[1].event.id()), "{reason}");
    assert!(reason.contains("over Event Grid's limit of 1048576 bytes"), "{reason}");
    let ids: Vec<Value> = topic.received().iter().map(|e| e["id"].clone()).collect();
    assert_eq!(ids, vec![Value::from(batch[0].event.id()), Value::from(batch[2].event.id())]);
}
