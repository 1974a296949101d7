//! Event parsing and encoding on ADT-sized events: (d) parsing and validating a 1 KB event.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use twinroute::event::{parse_batch, parse_structured};

/// A Twin.Update of about 1 KB, as ADT sends it: a JSON Patch of several properties.
fn twin_update_1kb() -> String {
    let patch: Vec<serde_json::Value> = (0..12)
        .map(|i| serde_json::json!({"value": 20.5 + i as f64, "path": format!("/sensors/s{i}/temperature"), "op": "replace"}))
        .collect();
    let event = serde_json::json!({
        "specversion": "1.0",
        "id": "6ccdb1cd-0dc3-450f-8730-ceccda8439be",
        "type": "Microsoft.DigitalTwins.Twin.Update",
        "source": "contoso-adt.api.wus2.digitaltwins.azure.net",
        "subject": "building-7-floor-3-room-12",
        "time": "2021-12-09T20:28:52.9795363Z",
        "datacontenttype": "application/json",
        "traceparent": "00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01",
        "data": {"modelId": "dtmi:com:contoso:Room;3", "patch": patch}
    });
    let text = event.to_string();
    assert!((900..1200).contains(&text.len()), "{} bytes", text.len());
    text
}

fn bench(c: &mut Criterion) {
    let text = twin_update_1kb();
    let mut group = c.benchmark_group("event");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("parse_validate_1kb_twin_update", |b| {
        b.iter(|| parse_structured(black_box(text.as_bytes())).unwrap())
    });
    let event = parse_structured(text.as_bytes()).unwrap();
    group.bench_function("encode_structured_1kb", |b| b.iter(|| black_box(&event).to_structured_json()));
    group.bench_function("body_parse_1kb", |b| {
        b.iter_batched(|| event.clone(), |e| e.body().is_some(), criterion::BatchSize::SmallInput)
    });
    let batch = format!("[{}]", vec![text.as_str(); 100].join(","));
    group.throughput(Throughput::Elements(100));
    group.bench_function("parse_validate_batch_of_100", |b| {
        b.iter(|| parse_batch(black_box(batch.as_bytes())).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
