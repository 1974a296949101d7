//! `POST /events` in each mode, and every refusal.

use crate::helpers::{spawn_app, telemetry, twin_create};
use twinroute::sinks::DeliveryOutcome;

const ALL_TO_A: &str = "[routes.all]\nendpoint_name = \"hub-a\"\nfilter = \"true\"\n";

#[tokio::test]
async fn structured_event_is_accepted_and_delivered_untouched() {
    let app = spawn_app(ALL_TO_A).await;
    let event = twin_create("room-1");
    let response = app.post_event(&event).await;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"accepted": 1, "unmatched": 0}));
    let sink = app.sink("hub-a");
    sink.wait_for(1).await;
    let delivered = sink.delivered();
    let got: serde_json::Value = serde_json::from_slice(&delivered[0].event.to_structured_json()).unwrap();
    assert_eq!(got, event);
    app.stop().await;
}

#[tokio::test]
async fn batch_is_accepted_whole() {
    let app = spawn_app(ALL_TO_A).await;
    let batch = serde_json::json!([twin_create("a"), twin_create("b"), telemetry("c", 3.0)]);
    let response = app.post("application/cloudevents-batch+json; charset=utf-8", batch.to_string()).await;
    assert_eq!(response.status(), 202);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["accepted"], 3);
    let sink = app.sink("hub-a");
    sink.wait_for(3).await;
    let ids: Vec<String> = sink.delivered().iter().map(|e| e.event.id().to_owned()).collect();
    let sent: Vec<String> =
        batch.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, sent, "delivered in the batch's order");
    app.stop().await;
}

#[tokio::test]
async fn batch_with_one_bad_event_is_refused_whole_listing_every_problem() {
    let app = spawn_app(ALL_TO_A).await;
    let mut bad = twin_create("b");
    bad.as_object_mut().unwrap().remove("id");
    bad["time"] = "yesterday".into();
    let batch = serde_json::json!([twin_create("a"), bad, 42]);
    let response = app.post("application/cloudevents-batch+json", batch.to_string()).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-ms-error-code"], "InvalidEvents");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidEvents");
    let details = body["error"]["details"].as_array().unwrap();
    let pairs: Vec<(u64, Option<&str>)> =
        details.iter().map(|d| (d["index"].as_u64().unwrap(), d["attribute"].as_str())).collect();
    assert_eq!(pairs, [(1, Some("id")), (1, Some("time")), (2, None)]);
    let (_, sinks) = app.stop().await;
    assert!(sinks.sink("hub-a").delivered().is_empty(), "nothing of a refused batch is delivered");
}

#[tokio::test]
async fn binary_mode_reads_ce_headers() {
    let app = spawn_app(ALL_TO_A).await;
    let response = app
        .client
        .post(format!("{}/events", app.ingest))
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .header("ce-id", "tel-1")
        .header("ce-type", "microsoft.iot.telemetry")
        .header("ce-source", "contoso.api.wus2.digitaltwins.azure.net/digitaltwins/room-9")
        .header("ce-dataschema", "dtmi:com:example:Room;1")
        .header("ce-tracestate", "vendor=a%3Db")
        .body(r#"{"temperature": 30.5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let sink = app.sink("hub-a");
    sink.wait_for(1).await;
    let event = &sink.delivered()[0].event;
    assert_eq!(event.id(), "tel-1");
    assert_eq!(event.twin_id(), Some("room-9"));
    assert_eq!(event.datacontenttype(), Some("application/json"));
    assert_eq!(&event.data().unwrap().bytes[..], br#"{"temperature": 30.5}"#);
    let ext: Vec<_> = event.extensions().map(|(k, v)| (k.to_owned(), v.to_string())).collect();
    assert_eq!(ext, [("tracestate".to_owned(), "vendor=a=b".to_owned())]);
    app.stop().await;
}

#[tokio::test]
async fn binary_mode_missing_attributes_are_named() {
    let app = spawn_app(ALL_TO_A).await;
    let response = app
        .client
        .post(format!("{}/events", app.ingest))
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    let attrs: Vec<&str> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["attribute"].as_str().unwrap())
        .collect();
    assert_eq!(attrs, ["id", "source", "type"]);
    app.stop().await;
}

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = spawn_app(ALL_TO_A).await;
    let response = app.post("application/cloudevents+json", "{\"specversion\": \"1.0\",").await;
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("not valid JSON"), "{body}");
    app.stop().await;
}

#[tokio::test]
async fn other_content_types_are_a_415() {
    let app = spawn_app(ALL_TO_A).await;
    for ct in ["text/plain", "application/json"] {
        let response = app.post(ct, twin_create("x").to_string()).await;
        assert_eq!(response.status(), 415, "{ct}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "UnsupportedMediaType");
        assert!(body["error"]["message"].as_str().unwrap().contains("application/cloudevents+json"));
    }
    let response = app.client.post(format!("{}/events", app.ingest)).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 415);
    let (_, sinks) = app.stop().await;
    assert!(sinks.sink("hub-a").delivered().is_empty());
}

#[tokio::test]
async fn size_limits_are_413s() {
    let app = spawn_app(&format!(
        "{ALL_TO_A}[ingest]\nmax_request_bytes = 4000\nmax_event_bytes = 1500\nmax_batch_events = 2\n"
    ))
    .await;
    // A request body over max_request_bytes.
    let big = "x".repeat(5000);
    let mut event = twin_create("big");
    event["data"]["blob"] = big.into();
    let response = app.post_event(&event).await;
    assert_eq!(response.status(), 413);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["error"]["code"], "RequestTooLarge");
    // One event over max_event_bytes, inside a request that fits.
    let mut event = twin_create("big");
    event["data"]["blob"] = "y".repeat(2000).into();
    let response = app.post_event(&event).await;
    assert_eq!(response.status(), 413);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["error"]["code"], "EventTooLarge");
    let response = app
        .post("application/cloudevents-batch+json", serde_json::json!([twin_create("a"), event]).to_string())
        .await;
    assert_eq!(response.status(), 413);
    assert!(response.json::<serde_json::Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("event 1"));
    // More events than max_batch_events.
    let batch = serde_json::json!([twin_create("a"), twin_create("b"), twin_create("c")]);
    let response = app.post("application/cloudevents-batch+json", batch.to_string()).await;
    assert_eq!(response.status(), 413);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["error"]["code"], "BatchTooLarge");
    let (_, sinks) = app.stop().await;
    assert!(sinks.sink("hub-a").delivered().is_empty());
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_loses_nothing_accepted() {
    // In memory the queue's capacity is the bound; on disk events beyond it wait in the spool,
    // and the spool's byte bound is what fills.
    for (spool, expect) in [
        ("[spool]\nmode = \"memory\"\n", "the queue of endpoint hub-a is full"),
        ("[spool]\nmax_bytes = 3000\n", "spool.max_bytes"),
    ] {
        let app = spawn_app(&format!(
            "{ALL_TO_A}{spool}[delivery]\nqueue_capacity = 2\nretry_schedule_seconds = [1]\n"
        ))
        .await;
        let sink = app.sink("hub-a");
        sink.fail_with(Some(DeliveryOutcome::Transient { reason: "down for the test".into(), after: None }));
        let mut accepted = Vec::new();
        let mut refused = 0;
        // The worker holds what it took before the first failure (it then takes nothing new
        // until the retry is due); the queue holds the rest up to its bound; then 503.
        for i in 0..40 {
            let event = twin_create(&format!("t{i}"));
            let response = app.post_event(&event).await;
            match response.status().as_u16() {
                202 => accepted.push(event["id"].as_str().unwrap().to_owned()),
                503 => {
                    assert_eq!(response.headers()["retry-after"], "1");
                    let body: serde_json::Value = response.json().await.unwrap();
                    let message = body["error"]["message"].as_str().unwrap();
                    assert!(message.contains(expect), "{spool}: {message}");
                    refused += 1;
                }
                other => panic!("unexpected status {other}"),
            }
        }
        assert!(refused > 0, "{spool}: the queue never filled");
        assert!(accepted.len() >= 2);
        sink.fail_with(None);
        sink.wait_for(accepted.len()).await;
        let (_, sinks) = app.stop().await;
        let delivered: Vec<String> =
            sinks.sink("hub-a").delivered().iter().map(|e| e.event.id().to_owned()).collect();
        assert_eq!(
            delivered, accepted,
            "{spool}: every accepted event delivered once, in order, nothing else"
        );
    }
}

#[tokio::test]
async fn events_matching_no_route_are_accepted_and_counted_unmatched() {
    let app =
        spawn_app("[routes.hot]\nendpoint_name = \"hub-a\"\nfilter = \"$body.temperature > 30\"\n").await;
    let batch = serde_json::json!([telemetry("a", 31.0), telemetry("b", 12.0)]);
    let response = app.post("application/cloudevents-batch+json", batch.to_string()).await;
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"accepted": 2, "unmatched": 1})
    );
    let (_, sinks) = app.stop().await;
    let delivered = sinks.sink("hub-a").delivered();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].event.twin_id(), Some("a"));
}

#[tokio::test]
async fn an_event_matching_several_routes_of_one_endpoint_is_delivered_once() {
    let app = spawn_app(
        "[routes.r1]\nendpoint_name = \"hub-a\"\n[routes.r2]\nendpoint_name = \"hub-a\"\nfilter = \"type = 'microsoft.iot.telemetry'\"\n[routes.r3]\nendpoint_name = \"hub-b\"\nfilter = \"$body.temperature >= 10\"\n",
    )
    .await;
    assert_eq!(app.post_event(&telemetry("a", 10.0)).await.status(), 202);
    let (_, sinks) = app.stop().await;
    assert_eq!(sinks.sink("hub-a").delivered().len(), 1);
    assert_eq!(sinks.sink("hub-b").delivered().len(), 1);
}

#[tokio::test]
async fn shutdown_refuses_new_events_with_503_and_drains_the_rest() {
    let app = spawn_app(ALL_TO_A).await;
    for i in 0..20 {
        assert_eq!(app.post_event(&twin_create(&format!("t{i}"))).await.status(), 202);
    }
    let running = app.running.as_ref().unwrap();
    running.dispatcher.close_intake();
    let response = app.post_event(&twin_create("late")).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let ready = app.client.get(format!("{}/readyz", app.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let (_, sinks) = app.stop().await;
    assert_eq!(sinks.sink("hub-a").delivered().len(), 20);
}
