//! Encoding one ADT event into each destination's wire form: the per-event work of every sink.
//! (The IO is measured by the load-test harness, not here.)

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::sync::Arc;
use twinroute::config::EventGridSchema;
use twinroute::delivery::Envelope;
use twinroute::event::parse_structured;
use twinroute::sinks::amqp::message::{batch_envelope, encode, event_message, MessageOptions};
use twinroute::sinks::blob::blob_name;
use twinroute::sinks::event_grid::request::build_requests;

fn twin_update_1kb() -> String {
    let patch: Vec<serde_json::Value> = (0..12)
        .map(|i| serde_json::json!({"value": 20.5 + i as f64, "path": format!("/sensors/s{i}/temperature"), "op": "replace"}))
        .collect();
    serde_json::json!({
        "specversion": "1.0",
        "id": "6ccdb1cd-0dc3-450f-8730-ceccda8439be",
        "type": "Microsoft.DigitalTwins.Twin.Update",
        "source": "contoso-adt.api.wus2.digitaltwins.azure.net",
        "subject": "building-7-floor-3-room-12",
        "time": "2021-12-09T20:28:52.9795363Z",
        "datacontenttype": "application/json",
        "traceparent": "00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01",
        "data": {"modelId": "dtmi:com:contoso:Room;3", "patch": patch}
    })
    .to_string()
}

fn bench(c: &mut Criterion) {
    let event = parse_structured(twin_update_1kb().as_bytes()).unwrap();
    let envelope = Arc::new(Envelope::new(event));
    let batch: Vec<Arc<Envelope>> = (0..100).map(|_| envelope.clone()).collect();
    let keyed = MessageOptions { partition_key: Some("building-7-floor-3-room-12".into()), session_id: None };

    let mut group = c.benchmark_group("sink_encoding_1kb");
    group.throughput(Throughput::Elements(1));
    group.bench_function("amqp_message_build", |b| {
        b.iter(|| event_message(black_box(&envelope.event), &keyed))
    });
    group.bench_function("amqp_message_build_and_encode", |b| {
        b.iter(|| encode(&event_message(black_box(&envelope.event), &keyed)).unwrap())
    });
    group.bench_function("structured_json_file_and_blob_body", |b| {
        b.iter(|| black_box(&envelope.event).to_structured_json())
    });
    group.bench_function("blob_name", |b| {
        b.iter(|| blob_name("twin-archive", envelope.accepted_at, black_box(envelope.event.id()), "json"))
    });
    group.finish();

    let mut group = c.benchmark_group("sink_batch_of_100_1kb");
    group.throughput(Throughput::Elements(100));
    group.bench_function("amqp_batch_envelope", |b| {
        b.iter_batched(
            || batch.iter().map(|e| encode(&event_message(&e.event, &keyed)).unwrap()).collect::<Vec<_>>(),
            |encoded| {
                let first = event_message(&envelope.event, &keyed);
                encode(&batch_envelope(&first, encoded)).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    for (name, schema) in [
        ("event_grid_cloudevents", EventGridSchema::CloudEvents),
        ("event_grid_eventgrid", EventGridSchema::EventGrid),
    ] {
        group.bench_function(name, |b| b.iter(|| build_requests(schema, black_box(&batch), 1_000_000)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
