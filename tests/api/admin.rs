//! The admin API: ADT's event routes and endpoint resources, their codes and shapes, persistence
//! across a restart, and route changes taking effect without one.

use crate::helpers::{spawn_app, spawn_in, telemetry, twin_create};
use serde_json::json;

async fn json_of(response: reqwest::Response) -> serde_json::Value {
    response.json().await.unwrap()
}

#[tokio::test]
async fn route_lifecycle_with_adt_codes_and_shapes() {
    let app = spawn_app("").await;
    let filter = "type = 'Microsoft.DigitalTwins.Twin.Create'";
    assert_eq!(app.put_route("route-1", "hub-a", filter).await.status(), 204);

    let got = app
        .client
        .get(format!("{}/eventroutes/route-1?api-version=2023-10-31", app.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(json_of(got).await, json!({"id": "route-1", "endpointName": "hub-a", "filter": filter}));

    let list = json_of(app.client.get(format!("{}/eventroutes", app.admin)).send().await.unwrap()).await;
    assert_eq!(
        list,
        json!({"value": [{"id": "route-1", "endpointName": "hub-a", "filter": filter}], "nextLink": null})
    );

    // Replacing is a PUT too.
    assert_eq!(app.put_route("route-1", "hub-b", "true").await.status(), 204);
    let got =
        json_of(app.client.get(format!("{}/eventroutes/route-1", app.admin)).send().await.unwrap()).await;
    assert_eq!(got["endpointName"], "hub-b");

    let deleted = app.client.delete(format!("{}/eventroutes/route-1", app.admin)).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    let missing = app.client.get(format!("{}/eventroutes/route-1", app.admin)).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["x-ms-error-code"], "EventRouteNotFound");
    assert_eq!(json_of(missing).await["error"]["code"], "EventRouteNotFound");
    let again = app.client.delete(format!("{}/eventroutes/route-1", app.admin)).send().await.unwrap();
    assert_eq!(again.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn route_refusals_carry_adt_error_codes() {
    let app = spawn_app("[admin]\nmax_routes = 1\n").await;
    let cases = [
        ("r1", "no-such-endpoint", "true", "EventRouteEndpointInvalid"),
        ("r1", "hub-a", "type = ", "EventRouteFilterInvalid"),
        ("-bad-id", "hub-a", "true", "EventRouteIdInvalid"),
    ];
    for (id, endpoint, filter, code) in cases {
        let response = app.put_route(id, endpoint, filter).await;
        assert_eq!(response.status(), 400, "{code}");
        assert_eq!(json_of(response).await["error"]["code"], code);
    }
    // The filter error carries the position and a caret.
    let body = json_of(app.put_route("r1", "hub-a", "type = 'a' AND").await).await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("offset") && message.contains('^'), "{message}");

    assert_eq!(app.put_route("r1", "hub-a", "true").await.status(), 204);
    let over = app.put_route("r2", "hub-a", "true").await;
    assert_eq!(over.status(), 400);
    assert_eq!(json_of(over).await["error"]["code"], "LimitExceeded");
    // Replacing an existing route is not over the limit.
    assert_eq!(app.put_route("r1", "hub-b", "false").await.status(), 204);

    // Bodies ADT requires.
    let no_filter = app
        .client
        .put(format!("{}/eventroutes/r1", app.admin))
        .json(&json!({"endpointName": "hub-a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(no_filter).await["error"]["code"], "EventRouteFilterInvalid");
    let garbage = app.client.put(format!("{}/eventroutes/r1", app.admin)).body("nope").send().await.unwrap();
    assert_eq!(garbage.status(), 400);
    let version =
        app.client.get(format!("{}/eventroutes?api-version=1999-01-01", app.admin)).send().await.unwrap();
    assert_eq!(version.status(), 400);
    assert_eq!(json_of(version).await["error"]["code"], "InvalidApiVersion");
    // Every admin request checks it, writes included (and nothing is written).
    for request in [
        app.client
            .put(format!("{}/eventroutes/r9?api-version=1999-01-01", app.admin))
            .json(&json!({"endpointName": "hub-a", "filter": "true"})),
        app.client.delete(format!("{}/endpoints/hub-b?api-version=1999-01-01", app.admin)),
        app.client.get(format!("{}/endpoints?api-version=1999-01-01", app.admin)),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(response.headers()["x-ms-error-code"], "InvalidApiVersion");
    }
    let r9 = app.client.get(format!("{}/eventroutes/r9", app.admin)).send().await.unwrap();
    assert_eq!(r9.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn route_changes_take_effect_without_a_restart() {
    let app = spawn_app("").await;
    // No route: accepted, unmatched.
    let before = json_of(app.post_event(&telemetry("room-1", 30.0)).await).await;
    assert_eq!(before["unmatched"], 1);
    assert_eq!(app.put_route("hot", "hub-a", "$body.temperature > 25").await.status(), 204);
    let after = json_of(app.post_event(&telemetry("room-1", 30.0)).await).await;
    assert_eq!(after["unmatched"], 0);
    app.sink("hub-a").wait_for(1).await;
    // Moving the route moves the traffic.
    assert_eq!(app.put_route("hot", "hub-b", "$body.temperature > 25").await.status(), 204);
    assert_eq!(app.post_event(&telemetry("room-2", 30.0)).await.status(), 202);
    app.sink("hub-b").wait_for(1).await;
    let (_, sinks) = app.stop().await;
    assert_eq!(sinks.sink("hub-a").delivered().len(), 1);
    assert_eq!(sinks.sink("hub-b").delivered()[0].event.twin_id(), Some("room-2"));
}

#[tokio::test]
async fn paging_follows_next_link() {
    let app = spawn_app("").await;
    for i in 0..5 {
        assert_eq!(app.put_route(&format!("r{i}"), "hub-a", "true").await.status(), 204);
    }
    let mut url = format!("{}/eventroutes?api-version=2023-10-31", app.admin);
    let mut seen = Vec::new();
    loop {
        let page =
            json_of(app.client.get(&url).header("max-items-per-page", "2").send().await.unwrap()).await;
        let ids: Vec<String> =
            page["value"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
        assert!(ids.len() <= 2);
        seen.extend(ids);
        match page["nextLink"].as_str() {
            Some(next) => url = format!("{}{next}", app.admin),
            None => break,
        }
    }
    assert_eq!(seen, ["r0", "r1", "r2", "r3", "r4"]);
    app.stop().await;
}

fn event_hub_key_based() -> serde_json::Value {
    json!({"properties": {
        "endpointType": "EventHub",
        "authenticationType": "KeyBased",
        "connectionStringPrimaryKey": "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=PRIMARYSECRET;EntityPath=twins",
        "connectionStringSecondaryKey": "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=SECONDARYSECRET;EntityPath=twins",
        "deadLetterSecret": "https://acct.blob.core.windows.net/dl?sv=2020&sig=DEADLETTERSECRET"
    }})
}

#[tokio::test]
async fn endpoint_resources_in_the_arm_shape_never_return_secrets() {
    let app = spawn_app("").await;
    let url = format!("{}/endpoints/twin-hub?api-version=2023-10-31", app.admin);
    let created = app.client.put(&url).json(&event_hub_key_based()).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let created_text = created.text().await.unwrap();
    let got = app.client.get(&url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    let got_text = got.text().await.unwrap();
    let list_text =
        app.client.get(format!("{}/endpoints", app.admin)).send().await.unwrap().text().await.unwrap();
    for text in [&created_text, &got_text, &list_text] {
        for secret in ["PRIMARYSECRET", "SECONDARYSECRET", "DEADLETTERSECRET"] {
            assert!(!text.contains(secret), "{secret} returned in {text}");
        }
    }
    let body: serde_json::Value = serde_json::from_str(&got_text).unwrap();
    assert_eq!(body["name"], "twin-hub");
    assert_eq!(body["type"], "Microsoft.DigitalTwins/digitalTwinsInstances/endpoints");
    let p = &body["properties"];
    assert_eq!(p["endpointType"], "EventHub");
    assert_eq!(p["authenticationType"], "KeyBased");
    assert_eq!(p["provisioningState"], "Succeeded");
    assert!(p["connectionStringPrimaryKey"].is_null() && p.get("connectionStringPrimaryKey").is_some());
    assert!(p["deadLetterSecret"].is_null() && p.get("deadLetterSecret").is_some());

    // Replacing keeps the auth type: 200.
    let replaced = app.client.put(&url).json(&event_hub_key_based()).send().await.unwrap();
    assert_eq!(replaced.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn an_endpoints_authentication_type_cannot_change() {
    let app = spawn_app("").await;
    let url = format!("{}/endpoints/twin-hub", app.admin);
    assert_eq!(app.client.put(&url).json(&event_hub_key_based()).send().await.unwrap().status(), 201);
    let identity = json!({"properties": {
        "endpointType": "EventHub",
        "authenticationType": "IdentityBased",
        "endpointUri": "sb://contoso.servicebus.windows.net/",
        "entityPath": "twins",
        "identity": {"type": "SystemAssigned"}
    }});
    let refused = app.client.put(&url).json(&identity).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body = json_of(refused).await;
    assert_eq!(body["error"]["code"], "AuthenticationTypeCannotBeChanged");
    assert!(body["error"]["message"].as_str().unwrap().contains("Delete the endpoint"), "{body}");
    // Delete and re-create is the way.
    assert_eq!(app.client.delete(&url).send().await.unwrap().status(), 204);
    assert_eq!(app.client.put(&url).json(&identity).send().await.unwrap().status(), 201);
    let got = json_of(app.client.get(&url).send().await.unwrap()).await;
    assert_eq!(got["properties"]["authenticationType"], "IdentityBased");
    assert_eq!(got["properties"]["identity"], json!({"type": "SystemAssigned"}));
    app.stop().await;
}

#[tokio::test]
async fn endpoint_refusals() {
    let app = spawn_app("[routes.uses-a]\nendpoint_name = \"hub-a\"\n").await;
    // In use by a route: 409.
    let in_use = app.client.delete(format!("{}/endpoints/hub-a", app.admin)).send().await.unwrap();
    assert_eq!(in_use.status(), 409);
    let body = json_of(in_use).await;
    assert_eq!(body["error"]["code"], "EndpointInUse");
    assert!(body["error"]["message"].as_str().unwrap().contains("uses-a"));
    // Unknown: 404.
    let missing = app.client.get(format!("{}/endpoints/nope-nope", app.admin)).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(json_of(missing).await["error"]["code"], "EndpointNotFound");
    // Invalid: every problem, unknown properties named.
    let bad = app
        .client
        .put(format!("{}/endpoints/eg-1", app.admin))
        .json(&json!({"properties": {"endpointType": "EventGrid", "authenticationType": "IdentityBased"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let message = json_of(bad).await["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("support only KeyBased") && message.contains("TopicEndpoint")
            || message.contains("topic_endpoint"),
        "{message}"
    );
    let typo = app
        .client
        .put(format!("{}/endpoints/out-1", app.admin))
        .json(&json!({"properties": {"endpointType": "Stdout", "colour": "blue"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(typo.status(), 400);
    assert!(json_of(typo).await["error"]["message"].as_str().unwrap().contains("properties.colour"));
    let bad_name = app
        .client
        .put(format!("{}/endpoints/-x", app.admin))
        .json(&json!({"properties": {"endpointType": "Stdout"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(bad_name).await["error"]["code"], "EndpointNameInvalid");
    app.stop().await;
}

#[tokio::test]
async fn api_changes_survive_a_restart() {
    let app = spawn_app("[routes.from-file]\nendpoint_name = \"hub-a\"\n").await;
    let url = format!("{}/endpoints/twin-hub", app.admin);
    assert_eq!(app.client.put(&url).json(&event_hub_key_based()).send().await.unwrap().status(), 201);
    assert_eq!(app.put_route("to-hub", "twin-hub", "type = 'microsoft.iot.telemetry'").await.status(), 204);
    let deleted = app.client.delete(format!("{}/eventroutes/from-file", app.admin)).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    let (dir, sinks) = app.stop().await;

    let state = std::fs::read_to_string(dir.path().join("control-plane.json")).unwrap();
    assert!(state.contains("to-hub"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("control-plane.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the state file holds secrets and must be private");
    }

    let app = spawn_in(dir, "[routes.from-file]\nendpoint_name = \"hub-a\"\n", sinks).await;
    let url = format!("{}/endpoints/twin-hub", app.admin);
    let routes = json_of(app.client.get(format!("{}/eventroutes", app.admin)).send().await.unwrap()).await;
    let ids: Vec<&str> =
        routes["value"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["to-hub"], "the API's route is back and the deleted file route stays deleted");
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(app.post_event(&telemetry("room-1", 1.0)).await.status(), 202);
    assert_eq!(app.post_event(&twin_create("room-1")).await.status(), 202);
    let (_, sinks) = app.stop().await;
    assert_eq!(sinks.sink("twin-hub").delivered().len(), 1);
    assert!(sinks.sink("hub-a").delivered().is_empty());
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = spawn_app("[routes.all]\nendpoint_name = \"hub-a\"\n").await;
    assert_eq!(app.client.get(format!("{}/healthz", app.admin)).send().await.unwrap().status(), 200);
    let ready = app.client.get(format!("{}/readyz", app.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body = json_of(ready).await;
    assert_eq!(body["status"], "ready");
    let names: Vec<&str> =
        body["endpoints"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hub-a", "hub-b"]);
    assert_eq!(app.post_event(&twin_create("m-1")).await.status(), 202);
    app.sink("hub-a").wait_for(1).await;
    let resource =
        json_of(app.client.get(format!("{}/endpoints/hub-a", app.admin)).send().await.unwrap()).await;
    assert_eq!(resource["status"]["health"], "healthy");
    assert_eq!(resource["status"]["delivered"], 1);
    assert_eq!(resource["status"]["deadLettered"], 0);
    let text = app.client.get(format!("{}/metrics", app.admin)).send().await.unwrap().text().await.unwrap();
    for metric in [
        "twinroute_endpoint_health{endpoint=\"hub-a\"} 0",
        "twinroute_events_received_total",
        "twinroute_events_routed_total{endpoint=\"hub-a\"}",
        "twinroute_routing_duration_seconds_bucket",
    ] {
        assert!(text.contains(metric), "{metric} missing from /metrics:\n{text}");
    }
    app.stop().await;
}
