//! Route filter benchmarks.
//!
//! - `spec/*`: every example filter of spec §3 on a matching and a non-matching event, evaluated
//!   by twinroute and, written in CEL, by the `cel` crate (program compiled once, outside).
//!   Per evaluation: `twinroute/...` on a prepared event (body already parsed, as
//!   `CloudEvent::body` leaves it) against `cel/...` on a prebuilt context. Per event:
//!   `twinroute+event/...` (body filters only) on a fresh event, reading `$body` from the bytes,
//!   against `cel+context/...`, which builds the context (attributes map, parsed body) each time.
//! - `table/*`: a 100-route table (attribute and `$body` filters, twin events and telemetry) on
//!   ~1 KB Twin.Update and Twin.Create events. Each iteration gets a fresh clone of the parsed
//!   event (made outside the timing), so the body is read anew every time.
//! - `body/*`: reference costs: `CloudEvent::body()` (a full `serde_json::Value` parse, which
//!   filters do not use) and parsing the whole structured event.
//!
//! Run: `cargo bench --bench filter` (about two minutes), or `-- --quick`, or a filter such as
//! `-- table`.

use cel::{Context, Env, Program};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use twinroute::event::{parse_structured, Attribute, CloudEvent};
use twinroute::filter::Filter;
use twinroute::routing::{Route, RouteTable};

const HOST: &str = "contoso-adt.api.wus2.digitaltwins.azure.net";

fn event(attrs: &str, data: &str) -> CloudEvent {
    let json = format!(
        r#"{{"specversion":"1.0","id":"6ccdb1cd-0dc3-450f-8730-ceccda8439be",{attrs},"time":"2021-12-09T20:28:52.6745538Z","traceparent":"00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01","data":{data}}}"#
    );
    parse_structured(json.as_bytes()).unwrap_or_else(|p| panic!("{json}: {p:?}"))
}

/// A ~1 KB Twin.Create of a room (or of `model`).
fn twin_create(subject: &str, model: &str) -> CloudEvent {
    let mut metadata = format!(r#""$model":"{model}""#);
    for prop in
        ["name", "temperature", "humidity", "occupied", "capacity", "hvac", "floorArea", "lastCleaned"]
    {
        metadata.push_str(&format!(
            r#","{prop}":{{"lastUpdateTime":"2021-12-09T20:28:52.6651216Z","sourceTime":"2021-12-09T20:28:50.1Z"}}"#
        ));
    }
    let data = format!(
        r#"{{"$dtId":"{subject}","$etag":"W/\"ecf81d6c-8c1a-4a95-afd8-13bd4cea436f\"","name":"Room 12, second floor","temperature":21.5,"humidity":40,"occupied":true,"capacity":12,"floorArea":31.75,"lastCleaned":"2021-12-08T18:00:00Z","hvac":{{"mode":"auto","setpoint":21.0,"fan":{{"speed":3,"auto":true}}}},"$metadata":{{{metadata}}}}}"#
    );
    event(
        &format!(
            r#""type":"Microsoft.DigitalTwins.Twin.Create","source":"{HOST}","subject":"{subject}","datacontenttype":"application/json""#
        ),
        &data,
    )
}

/// A ~1 KB Twin.Update: `{"modelId", "patch": [...]}`.
fn twin_update(subject: &str, model: &str) -> CloudEvent {
    let mut patch = Vec::new();
    for (path, value) in [
        ("/temperature", "22.25"),
        ("/humidity", "41"),
        ("/occupied", "false"),
        ("/name", r#""Room 12, second floor (east)""#),
        ("/hvac/mode", r#""cooling""#),
        ("/hvac/setpoint", "20.5"),
        ("/hvac/fan/speed", "4"),
        ("/capacity", "14"),
        ("/lastCleaned", r#""2021-12-09T18:00:00Z""#),
        ("/floorArea", "31.75"),
        ("/tags", r#"["meeting","video","accessible"]"#),
        ("/alerts", r#"{"overheat":false,"co2":{"level":612,"threshold":1000}}"#),
    ] {
        patch.push(format!(r#"{{"value":{value},"path":"{path}","op":"replace"}}"#));
    }
    let data = format!(r#"{{"modelId":"{model}","patch":[{}]}}"#, patch.join(","));
    event(
        &format!(
            r#""type":"Microsoft.DigitalTwins.Twin.Update","source":"{HOST}","subject":"{subject}","datacontenttype":"application/json""#
        ),
        &data,
    )
}

/// Telemetry as ADT forwards it: no datacontenttype unless `json`, source names the twin.
fn telemetry(twin: &str, component: Option<&str>, schema: &str, json: bool, body: &str) -> CloudEvent {
    let mut attrs = format!(
        r#""type":"microsoft.iot.telemetry","source":"{HOST}/digitaltwins/{twin}","dataschema":"{schema}""#
    );
    if let Some(c) = component {
        attrs.push_str(&format!(r#","subject":"{c}""#));
    }
    if json {
        attrs.push_str(r#","datacontenttype":"application/json""#);
    }
    event(&attrs, body)
}

/// One spec example: twinroute text, CEL text, a matching and a non-matching event.
struct Case {
    name: &'static str,
    filter: &'static str,
    cel: &'static str,
    matching: CloudEvent,
    other: CloudEvent,
}

fn spec_cases() -> Vec<Case> {
    let room = twin_create("building-7/floor-2/room-12", "dtmi:contoso:building:room;3");
    let floor = twin_create("twin-12", "dtmi:example:com:floor;1");
    let floor4 = twin_create("twin-1", "dtmi:example:com:floor4;2");
    let tel = |body: &str| telemetry("thermostat-1", Some("comp1"), "dtmi:example:com:floor4;2", false, body);
    let tel_json =
        telemetry("thermostat-1", None, "dtmi:example:com:floor4;1", true, r#"{"temperature": 21.5}"#);
    vec![
        Case {
            name: "not-telemetry-and-json",
            filter: "type != 'microsoft.iot.telemetry' AND datacontenttype = 'application/json'",
            cel: "ce.type != 'microsoft.iot.telemetry' && has(ce.datacontenttype) && ce.datacontenttype == 'application/json'",
            matching: room.clone(),
            other: tel_json.clone(),
        },
        Case {
            name: "or-parenthesized",
            filter: "(type != 'microsoft.iot.telemetry' OR datacontenttype = 'application/json') OR (specversion != '1.0')",
            cel: "(ce.type != 'microsoft.iot.telemetry' || (has(ce.datacontenttype) && ce.datacontenttype == 'application/json')) || ce.specversion != '1.0'",
            matching: tel_json.clone(),
            other: tel(r#"{"temperature": 21.5}"#),
        },
        Case {
            name: "starts-with-model",
            filter: "STARTS_WITH($body.$metadata.$model, 'dtmi:example:com:floor')",
            cel: "'$metadata' in body && '$model' in body['$metadata'] && body['$metadata']['$model'].startsWith('dtmi:example:com:floor')",
            matching: floor4.clone(),
            other: room.clone(),
        },
        Case {
            name: "ends-with-model",
            filter: "ENDS_WITH($body.$metadata.$model, 'floor;1')",
            cel: "'$metadata' in body && '$model' in body['$metadata'] && body['$metadata']['$model'].endsWith('floor;1')",
            matching: floor.clone(),
            other: room.clone(),
        },
        Case {
            name: "contains-subject",
            filter: "CONTAINS(subject, 'twin-1')",
            cel: "has(ce.subject) && ce.subject.contains('twin-1')",
            matching: floor.clone(),
            other: room.clone(),
        },
        Case {
            name: "dataschema",
            filter: "dataschema = 'dtmi:example:com:floor4;2'",
            cel: "has(ce.dataschema) && ce.dataschema == 'dtmi:example:com:floor4;2'",
            matching: tel(r#"{"temperature": 21.5}"#),
            other: tel_json.clone(),
        },
        Case {
            name: "type-or-type",
            filter: "type = 'Microsoft.DigitalTwins.Twin.Create' OR type = 'microsoft.iot.telemetry'",
            cel: "ce.type == 'Microsoft.DigitalTwins.Twin.Create' || ce.type == 'microsoft.iot.telemetry'",
            matching: tel_json.clone(),
            other: twin_update("twin-1", "dtmi:example:com:floor;1"),
        },
        Case {
            name: "body-errorcode-gt",
            filter: "$body.errorCode > 200",
            cel: "has(body.errorCode) && body.errorCode > 200",
            matching: tel(r#"{"errorCode": 404, "message": "not found", "temperature": 21.5}"#),
            other: tel(r#"{"errorCode": 200, "message": "ok", "temperature": 21.5}"#),
        },
        Case {
            name: "body-temperature-le",
            filter: "$body.temperature <= 5.5",
            cel: "has(body.temperature) && body.temperature <= 5.5",
            matching: tel(r#"{"temperature": 4, "humidity": 80}"#),
            other: tel(r#"{"temperature": 21.5, "humidity": 40}"#),
        },
        Case {
            name: "body-poweredon-eq-true",
            filter: "$body.poweredOn = true",
            cel: "has(body.poweredOn) && body.poweredOn == true",
            matching: tel(r#"{"poweredOn": true, "watts": 1200}"#),
            other: tel(r#"{"poweredOn": false, "watts": 0}"#),
        },
        Case {
            name: "body-prop-not-null",
            filter: "$body.prop != null",
            cel: "has(body.prop) && body.prop != null",
            matching: tel(r#"{"prop": "x", "temperature": 21.5}"#),
            other: tel(r#"{"prop": null, "temperature": 21.5}"#),
        },
    ]
}

/// The CEL context for an event: `ce` (attributes present, as strings) and `body` (the JSON data).
fn cel_context(env: &Arc<Env>, event: &CloudEvent) -> Context<'static, 'static> {
    let mut ctx = Context::with_env(Arc::clone(env));
    let attributes: HashMap<&str, &str> =
        Attribute::ALL.iter().filter_map(|a| event.attribute(*a).map(|v| (a.name(), v))).collect();
    ctx.add_variable("ce", attributes).expect("attributes convert");
    let body: serde_json::Value = event
        .data()
        .and_then(|d| serde_json::from_slice(&d.bytes).ok())
        .unwrap_or(serde_json::Value::Object(Default::default()));
    ctx.add_variable("body", body).expect("body converts");
    ctx
}

fn cel_matches(program: &Program, ctx: &Context) -> bool {
    program.execute(ctx).expect("CEL evaluates") == cel::Value::Bool(true)
}

fn spec(c: &mut Criterion) {
    let env = Arc::new(Env::stdlib());
    let mut group = c.benchmark_group("spec");
    for case in spec_cases() {
        let filter = Filter::parse(case.filter).expect("spec filter parses");
        let program = env.compile(case.cel).expect("CEL compiles");
        for (suffix, event, expected) in [("match", &case.matching, true), ("no-match", &case.other, false)] {
            let id = format!("{}/{suffix}", case.name);
            // Per evaluation: the event is prepared once, as CEL's context is: its body parsed
            // (`CloudEvent::body`), which filters then read instead of the bytes.
            let prepared = event.clone();
            let _ = prepared.body();
            assert_eq!(filter.matches(&prepared), expected, "twinroute on {id}");
            assert_eq!(filter.matches(&event.clone()), expected, "twinroute on fresh {id}");
            let ctx = cel_context(&env, event);
            assert_eq!(cel_matches(&program, &ctx), expected, "CEL on {id}");

            group.bench_function(format!("twinroute/{id}"), |b| {
                b.iter(|| filter.matches(black_box(&prepared)))
            });
            group.bench_function(format!("cel/{id}"), |b| b.iter(|| cel_matches(&program, black_box(&ctx))));
            // Per event: a fresh event each time (cloned outside the timing), so twinroute reads
            // `$body` from the bytes; CEL builds its context, body included.
            if filter.reads_body() {
                group.bench_function(format!("twinroute+event/{id}"), |b| {
                    b.iter_batched_ref(|| event.clone(), |fresh| filter.matches(fresh), BatchSize::SmallInput)
                });
            }
            group.bench_function(format!("cel+context/{id}"), |b| {
                b.iter(|| {
                    let ctx = cel_context(&env, black_box(event));
                    cel_matches(&program, &ctx)
                })
            });
        }
    }
    group.finish();
}

/// 100 routes over 25 endpoints, as a building operator might write them.
fn hundred_routes() -> Vec<Route> {
    let mut filters: Vec<String> = Vec::new();
    for i in 0..15 {
        filters.push(format!(
            "type = 'Microsoft.DigitalTwins.Twin.Update' AND $body.modelId = 'dtmi:contoso:building:floor;{i}'"
        ));
    }
    for i in 0..15 {
        filters.push(format!(
            "type = 'Microsoft.DigitalTwins.Twin.Create' AND STARTS_WITH($body.$metadata.$model, 'dtmi:contoso:site{i}:')"
        ));
    }
    for i in 0..15 {
        filters
            .push(format!("subject = 'building-{i}/floor-1/room-1' OR STARTS_WITH(subject, 'campus-{i}/')"));
    }
    for i in 0..15 {
        filters.push(format!(
            "type = 'microsoft.iot.telemetry' AND dataschema = 'dtmi:contoso:thermostat;{i}' AND $body.temperature > {}",
            25 + i
        ));
    }
    for i in 0..10 {
        filters.push(format!("$body.$dtId = 'pump-{i}' AND $body.pressure >= {}.5", i * 10));
    }
    for i in 0..10 {
        filters.push(format!(
            "type != 'microsoft.iot.telemetry' AND ENDS_WITH(subject, '/relationships/feeds-{i}')"
        ));
    }
    for i in 0..10 {
        filters.push(format!(
            "(type = 'Microsoft.DigitalTwins.Twin.Delete' OR type = 'Microsoft.DigitalTwins.Relationship.Delete') AND CONTAINS(subject, 'wing-{i}')"
        ));
    }
    for i in 0..5 {
        filters.push(format!(
            "$body.$metadata.$model = 'dtmi:contoso:building:room;{}' AND $body.occupied = true",
            i + 4
        ));
    }
    for i in 0..5 {
        filters
            .push(format!("NOT (source = '{HOST}') AND $body.poweredOn = true AND $body.errorCode != {i}"));
    }
    assert_eq!(filters.len(), 100);
    filters
        .into_iter()
        .enumerate()
        .map(|(i, f)| Route {
            id: format!("route-{i}"),
            endpoint: format!("endpoint-{}", i % 25),
            filter: Filter::parse(&f).unwrap_or_else(|e| panic!("{e}")),
        })
        .collect()
}

fn table(c: &mut Criterion) {
    let table = RouteTable::new(hundred_routes());
    // One Update route and one Create route match; the rest are evaluated and fail.
    let update = twin_update("building-3/floor-2/room-12", "dtmi:contoso:building:floor;7");
    let create = twin_create("building-3/floor-2/room-12", "dtmi:contoso:site4:room;3");
    let unmatched = twin_update("building-99/floor-2/room-12", "dtmi:contoso:building:kiosk;1");
    for (name, event) in [("update", &update), ("create", &create), ("update-unmatched", &unmatched)] {
        let size = event.data().map_or(0, |d| d.bytes.len());
        let routed: Vec<&str> = table.route(event).iter().map(|i| table.endpoints()[i].as_str()).collect();
        eprintln!("table/{name}: body {size} bytes, routed to {routed:?}");
    }
    assert_eq!(table.route(&update).len(), 1);
    assert_eq!(table.route(&create).len(), 1);
    assert!(table.route(&unmatched).is_empty());

    let mut group = c.benchmark_group("table");
    for (name, event) in [("update", &update), ("create", &create), ("update-unmatched", &unmatched)] {
        group.bench_function(format!("100-routes/{name}"), |b| {
            // The clone is made, and dropped, outside the timing; `route` reads its body anew.
            b.iter_batched_ref(|| event.clone(), |fresh| table.route(fresh), BatchSize::SmallInput)
        });
    }
    group.finish();

    let mut group = c.benchmark_group("body");
    group.bench_function("serde-json-value/update", |b| {
        b.iter_batched_ref(|| update.clone(), |fresh| fresh.body().is_some(), BatchSize::SmallInput)
    });
    group.bench_function("serde-json-value/create", |b| {
        b.iter_batched_ref(|| create.clone(), |fresh| fresh.body().is_some(), BatchSize::SmallInput)
    });
    let structured = update.to_structured_json();
    group.bench_function("parse-structured/update", |b| {
        b.iter(|| parse_structured(black_box(&structured)).is_ok())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000))
        .sample_size(30);
    targets = spec, table
}
criterion_main!(benches);
