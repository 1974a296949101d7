//! The IMDS stand-in over real HTTP on loopback, with `reqwest` as the client.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use twinroute_emulator::imds::{self, Fault, ImdsConfig, ImdsStandIn, ImdsStats};
use twinroute_emulator::jwt::{self, JwtError};
use twinroute_emulator::DEV_SIGNING_KEY;

const EVENT_HUBS: &str = "https://eventhubs.azure.net/";
const STORAGE: &str = "https://storage.azure.com";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        // No idle-pool timer: with a paused clock it would be the next timer auto-advance jumps to.
        .pool_idle_timeout(None)
        .build()
        .unwrap()
}

/// `base?k=v&...`, form-encoded (reqwest's `query` needs a feature the workspace does not enable).
fn with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.extend_pairs(pairs);
    format!("{base}?{}", query.finish())
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    content_type: Option<String>,
    body: Value,
}

/// A token request with `Metadata: true` and api-version 2018-02-01 plus `extra` query pairs.
async fn get_token(client: &reqwest::Client, standin: &ImdsStandIn, extra: &[(&str, &str)]) -> Answer {
    let mut query = vec![("api-version", "2018-02-01")];
    query.extend_from_slice(extra);
    send(client.get(with_query(&standin.token_url(), &query)).header("Metadata", "true")).await
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("the stand-in answers");
    let header = |name| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let (status, retry_after, content_type) =
        (response.status().as_u16(), header("retry-after"), header("content-type"));
    let body = response.json().await.expect("a JSON body");
    Answer { status, retry_after, content_type, body }
}

fn assert_error(answer: &Answer, status: u16, error: &str, description_contains: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["error"], error, "{}", answer.body);
    let description = answer.body["error_description"].as_str().unwrap();
    assert!(description.contains(description_contains), "{description:?} lacks {description_contains:?}");
}

/// Checks a 200 body and returns the verified claims of its token.
fn token_claims(answer: &Answer, resource: &str, client_id: &str) -> jwt::Claims {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.content_type.as_deref(), Some("application/json"));
    let body = answer.body.as_object().unwrap();
    for field in ["access_token", "refresh_token", "expires_in", "expires_on", "not_before", "token_type"] {
        assert!(body[field].is_string(), "{field} must be a string: {}", answer.body);
    }
    assert_eq!(body["resource"], resource);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["client_id"], client_id);
    assert_eq!(body["refresh_token"], "");
    let number = |field: &str| body[field].as_str().unwrap().parse::<i64>().unwrap();
    let claims = jwt::verify(body["access_token"].as_str().unwrap(), DEV_SIGNING_KEY, now()).unwrap();
    assert_eq!(number("expires_on"), claims.exp);
    assert_eq!(number("not_before"), claims.nbf);
    assert_eq!(number("expires_in"), claims.exp - claims.iat);
    claims
}

#[tokio::test]
async fn system_assigned_token_has_the_documented_shape_and_claims() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    assert!(standin.token_url().starts_with("http://127.0.0.1:"));
    assert!(standin.token_url().ends_with("/metadata/identity/oauth2/token"));
    let before = now();
    let answer = get_token(&client(), &standin, &[("resource", EVENT_HUBS)]).await;
    let claims = token_claims(&answer, EVENT_HUBS, imds::DEFAULT_SYSTEM_CLIENT_ID);
    let after = now();

    assert_eq!(answer.body["expires_in"], "86400");
    assert_eq!(claims.aud, EVENT_HUBS);
    assert_eq!(claims.iss, format!("https://sts.windows.net/{}/", imds::DEFAULT_TENANT_ID));
    assert_eq!(claims.tid, imds::DEFAULT_TENANT_ID);
    assert_eq!(claims.appid, imds::DEFAULT_SYSTEM_CLIENT_ID);
    assert_eq!(claims.oid, imds::DEFAULT_SYSTEM_OBJECT_ID);
    assert_eq!(claims.sub, imds::DEFAULT_SYSTEM_OBJECT_ID);
    assert_eq!(claims.xms_mirid, None);
    assert!((before..=after).contains(&claims.iat));
    assert_eq!(claims.nbf, claims.iat - 60);
    assert_eq!(claims.exp, claims.iat + 86_400);

    // What Azurite's `--oauth basic` checks: issuer prefix, audience, a current time window.
    let storage = get_token(&client(), &standin, &[("resource", STORAGE)]).await;
    let claims = token_claims(&storage, STORAGE, imds::DEFAULT_SYSTEM_CLIENT_ID);
    assert!(claims.iss.starts_with("https://sts.windows.net/"));
    assert_eq!(claims.aud, "https://storage.azure.com");
    assert!(claims.nbf <= now() && now() < claims.exp);

    assert_eq!(standin.requests(), 2);
    assert_eq!(standin.requests_for(EVENT_HUBS), 1);
    assert_eq!(standin.requests_for(STORAGE), 1);
    assert_eq!(standin.requests_for("https://servicebus.azure.net"), 0);
}

#[tokio::test]
async fn user_assigned_by_each_selector() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let client = client();
    let res_id = imds::DEFAULT_USER_MSI_RES_ID;
    let upper_client_id = imds::DEFAULT_USER_CLIENT_ID.to_ascii_uppercase();
    for (selector, value) in [
        ("client_id", imds::DEFAULT_USER_CLIENT_ID),
        ("client_id", upper_client_id.as_str()),
        ("object_id", imds::DEFAULT_USER_OBJECT_ID),
        ("msi_res_id", res_id),
        ("mi_res_id", res_id),
    ] {
        let answer = get_token(&client, &standin, &[("resource", EVENT_HUBS), (selector, value)]).await;
        let claims = token_claims(&answer, EVENT_HUBS, imds::DEFAULT_USER_CLIENT_ID);
        assert_eq!(claims.appid, imds::DEFAULT_USER_CLIENT_ID, "{selector}");
        assert_eq!(claims.oid, imds::DEFAULT_USER_OBJECT_ID, "{selector}");
        assert_eq!(claims.xms_mirid.as_deref(), Some(res_id), "{selector}");
        // The ARM id survives URL encoding both ways.
        let expected: Vec<(String, String)> =
            [("api-version", "2018-02-01"), ("resource", EVENT_HUBS), (selector, value)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(standin.last_query(), Some(expected));
    }
    assert_eq!(standin.requests_for(EVENT_HUBS), 5);
}

#[tokio::test]
async fn default_identity_without_a_system_assigned_one() {
    // IMDS falls back to the only user-assigned identity...
    let config = ImdsConfig { system_assigned: None, ..ImdsConfig::default() };
    let standin = ImdsStandIn::start(config).await.unwrap();
    let answer = get_token(&client(), &standin, &[("resource", EVENT_HUBS)]).await;
    token_claims(&answer, EVENT_HUBS, imds::DEFAULT_USER_CLIENT_ID);

    // ...and finds nothing when there is none (or several).
    let config = ImdsConfig { system_assigned: None, user_assigned: vec![], ..ImdsConfig::default() };
    let standin = ImdsStandIn::start(config).await.unwrap();
    let answer = get_token(&client(), &standin, &[("resource", EVENT_HUBS)]).await;
    assert_error(&answer, 400, "invalid_request", "Identity not found");
}

#[tokio::test]
async fn rejected_requests() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let client = client();
    let url = standin.token_url();
    let with_resource = [("api-version", "2018-02-01"), ("resource", EVENT_HUBS)];

    for (selector, value) in [
        ("client_id", "11111111-1111-1111-1111-111111111111"),
        ("object_id", "22222222-2222-2222-2222-222222222222"),
        (
            "msi_res_id",
            "/subscriptions/x/resourceGroups/y/providers/Microsoft.ManagedIdentity/userAssignedIdentities/z",
        ),
        // The system-assigned identity's client id does not select it.
        ("client_id", imds::DEFAULT_SYSTEM_CLIENT_ID),
    ] {
        let answer = get_token(&client, &standin, &[("resource", EVENT_HUBS), (selector, value)]).await;
        assert_error(&answer, 400, "invalid_request", "Identity not found");
    }

    let answer = send(client.get(with_query(&url, &with_resource))).await;
    assert_error(&answer, 400, "invalid_request", "Required metadata header not specified");
    let answer = send(client.get(with_query(&url, &with_resource)).header("Metadata", "yes")).await;
    assert_error(&answer, 400, "invalid_request", "Required metadata header not specified");

    let answer = get_token(
        &client,
        &standin,
        &[
            ("resource", EVENT_HUBS),
            ("client_id", imds::DEFAULT_USER_CLIENT_ID),
            ("object_id", imds::DEFAULT_USER_OBJECT_ID),
        ],
    )
    .await;
    assert_error(&answer, 400, "invalid_request", "Only one of");
    let answer = get_token(
        &client,
        &standin,
        &[
            ("resource", EVENT_HUBS),
            ("msi_res_id", imds::DEFAULT_USER_MSI_RES_ID),
            ("mi_res_id", imds::DEFAULT_USER_MSI_RES_ID),
        ],
    )
    .await;
    assert_error(&answer, 400, "invalid_request", "Only one of");

    let answer = get_token(&client, &standin, &[]).await;
    assert_error(&answer, 400, "invalid_request", "'resource' is missing");
    let answer = get_token(&client, &standin, &[("resource", "")]).await;
    assert_error(&answer, 400, "invalid_request", "'resource' is missing");

    let answer =
        send(client.get(with_query(&url, &[("resource", EVENT_HUBS)])).header("Metadata", "true")).await;
    assert_error(&answer, 400, "invalid_request", "'api-version' is missing");
    let bad_version = [("api-version", "2017-09-01"), ("resource", EVENT_HUBS)];
    let answer = send(client.get(with_query(&url, &bad_version)).header("Metadata", "true")).await;
    assert_error(&answer, 400, "invalid_request", "Unsupported api-version '2017-09-01'");

    let proxied = client
        .get(with_query(&url, &with_resource))
        .header("Metadata", "true")
        .header("X-Forwarded-For", "10.0.0.1");
    assert_error(&send(proxied).await, 400, "invalid_request", "X-Forwarded-For");

    let answer = send(client.post(with_query(&url, &with_resource)).header("Metadata", "true")).await;
    assert_error(&answer, 405, "invalid_request", "only answers GET");

    let other_path = format!("http://{}/metadata/instance?api-version=2021-02-01", standin.addr());
    let answer = send(client.get(other_path).header("Metadata", "true")).await;
    assert_error(&answer, 404, "not_found", "/metadata/instance");

    // Everything that reached the token path is counted, rejected or not; the 404 is not.
    assert_eq!(standin.requests(), 14);
    assert_eq!(standin.requests_for(EVENT_HUBS), 12);
    assert_eq!(standin.requests_for(""), 1);
}

#[tokio::test]
async fn faults_are_consumed_in_order() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let client = client();
    standin.push_faults([Fault::Status(500), Fault::StatusWithRetryAfter(429, 3)]);
    assert_eq!(standin.stats().pending_faults.len(), 2);

    let first = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
    assert_error(&first, 500, "internal_server_error", "Injected fault");
    assert_eq!(first.retry_after, None);
    let second = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
    assert_error(&second, 429, "too_many_requests", "Injected fault");
    assert_eq!(second.retry_after.as_deref(), Some("3"));
    let third = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
    token_claims(&third, EVENT_HUBS, imds::DEFAULT_SYSTEM_CLIENT_ID);

    assert_eq!(standin.requests(), 3);
    assert_eq!(standin.requests_for(EVENT_HUBS), 3);
    assert!(standin.stats().pending_faults.is_empty());

    // A fault is consumed even by a request that would have been rejected.
    standin.push_faults([Fault::Status(503)]);
    let answer = send(client.get(standin.token_url())).await;
    assert_error(&answer, 503, "service_unavailable", "Injected fault");
    assert_eq!(standin.requests(), 4);
}

#[tokio::test]
async fn close_connection_drops_the_request_unanswered() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let client = client();
    standin.push_faults([Fault::CloseConnection]);
    let query = [("api-version", "2018-02-01"), ("resource", EVENT_HUBS)];
    let error = client
        .get(with_query(&standin.token_url(), &query))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap_err();
    assert!(error.is_request() || error.is_connect(), "{error:?}");
    // The next request (on a new connection) is answered normally.
    let answer = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
    token_claims(&answer, EVENT_HUBS, imds::DEFAULT_SYSTEM_CLIENT_ID);
    assert_eq!(standin.requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn gone_window_ends_on_the_tokio_clock() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let client = client();
    standin.set_gone_for(Duration::from_secs(70));

    let answer = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
    assert_error(&answer, 410, "gone", "updating");
    tokio::time::advance(Duration::from_secs(69)).await;
    let answer = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
    assert_eq!(answer.status, 410);
    tokio::time::advance(Duration::from_secs(2)).await;
    let answer = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
    token_claims(&answer, EVENT_HUBS, imds::DEFAULT_SYSTEM_CLIENT_ID);
    assert_eq!(standin.requests(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_retry_loop_on_a_paused_clock_rides_out_the_gone_window() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let client = client();
    standin.set_gone_for(Duration::from_secs(70));
    // Queued faults wait until the window is over.
    standin.push_faults([Fault::Status(500)]);
    let start = tokio::time::Instant::now();
    let mut statuses = Vec::new();
    loop {
        let answer = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
        statuses.push(answer.status);
        if answer.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let mut expected = vec![410; 7];
    expected.extend([500, 200]);
    assert_eq!(statuses, expected);
    assert_eq!(start.elapsed(), Duration::from_secs(80));
}

#[tokio::test(start_paused = true)]
async fn delays_drive_client_timeouts() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let client = client();
    let query = [("api-version", "2018-02-01"), ("resource", EVENT_HUBS)];
    let request = || client.get(with_query(&standin.token_url(), &query)).header("Metadata", "true");

    standin.set_delay(Duration::from_secs(30));
    let error = request().timeout(Duration::from_secs(5)).send().await.unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
    standin.set_delay(Duration::ZERO);

    // The first handler is still asleep (hyper does not notice the client leaving); its timer must
    // not matter here, hence a client timeout far beyond it.
    standin.push_faults([Fault::Delay(Duration::from_secs(3))]);
    let start = tokio::time::Instant::now();
    let answer = send(request().timeout(Duration::from_secs(120))).await;
    assert_eq!(answer.status, 200);
    assert!(start.elapsed() >= Duration::from_secs(3));
    assert_eq!(standin.requests(), 2);
}

#[tokio::test]
async fn outage_answers_503_and_lifetime_is_adjustable() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let client = client();
    standin.set_available(false);
    let answer = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
    assert_error(&answer, 503, "service_unavailable", "outage");
    standin.set_available(true);

    standin.set_token_lifetime(Duration::from_secs(300));
    let answer = get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await;
    let claims = token_claims(&answer, EVENT_HUBS, imds::DEFAULT_SYSTEM_CLIENT_ID);
    assert_eq!(answer.body["expires_in"], "300");
    assert_eq!(claims.exp - claims.iat, 300);

    standin.reset();
    assert_eq!(standin.requests(), 0);
    assert_eq!(standin.last_query(), None);
    assert_eq!(standin.stats().token_lifetime_seconds, 86_400);
}

#[tokio::test]
async fn token_round_trip_and_expiry() {
    let config = ImdsConfig { token_lifetime: Duration::from_secs(1), ..ImdsConfig::default() };
    let standin = ImdsStandIn::start(config).await.unwrap();
    let answer = get_token(&client(), &standin, &[("resource", STORAGE)]).await;
    let token = answer.body["access_token"].as_str().unwrap();
    // Checked at its issue time: a 1 s token may already have expired by `now()`.
    let unverified = jwt::decode_unverified(token).unwrap();
    let claims = jwt::verify(token, DEV_SIGNING_KEY, unverified.iat).unwrap();
    assert_eq!(claims, unverified);
    assert_eq!(claims.exp - claims.iat, 1);
    assert_eq!(
        jwt::verify(token, DEV_SIGNING_KEY, claims.exp + 1),
        Err(JwtError::Expired { exp: claims.exp, now: claims.exp + 1 })
    );
    assert_eq!(jwt::verify(token, b"some other key", claims.iat), Err(JwtError::BadSignature));

    // A custom key is honoured.
    let config = ImdsConfig { signing_key: b"custom".to_vec(), ..ImdsConfig::default() };
    let standin = ImdsStandIn::start(config).await.unwrap();
    let answer = get_token(&client(), &standin, &[("resource", STORAGE)]).await;
    let token = answer.body["access_token"].as_str().unwrap();
    assert!(jwt::verify(token, b"custom", now()).is_ok());
    assert_eq!(jwt::verify(token, DEV_SIGNING_KEY, now()), Err(JwtError::BadSignature));
}

#[tokio::test]
async fn admin_surface_steers_an_out_of_process_stand_in() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let client = client();
    let admin = |path: &str| format!("http://{}/_standin/{path}", standin.addr());

    let faults = serde_json::json!([
        {"kind": "status", "status": 500},
        {"kind": "status", "status": 429, "retry_after_seconds": 3},
        {"kind": "delay", "ms": 10},
        {"kind": "close_connection"}
    ]);
    let answer = send(client.post(admin("faults")).json(&faults)).await;
    assert_eq!(answer.status, 200);
    let stats: ImdsStats = serde_json::from_value(answer.body).unwrap();
    assert_eq!(serde_json::to_value(&stats.pending_faults).unwrap(), faults);
    assert_eq!(
        standin.stats().pending_faults.len(),
        4,
        "the admin surface and the handle share the same queue"
    );

    let bad = send(client.post(admin("faults")).json(&serde_json::json!([{"kind": "explode"}]))).await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    assert_eq!(bad.body["error"], "invalid_request");

    assert_eq!(get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await.status, 500);
    assert_eq!(get_token(&client, &standin, &[("resource", STORAGE)]).await.status, 429);
    let stats = send(client.get(admin("stats"))).await.body;
    assert_eq!(stats["requests"], 2);
    assert_eq!(stats["requests_by_resource"], serde_json::json!({EVENT_HUBS: 1, STORAGE: 1}));
    assert_eq!(stats["pending_faults"].as_array().unwrap().len(), 2);

    // Config: an outage leaves the admin surface reachable, so it can be lifted again.
    let config = serde_json::json!({"available": false, "lifetime_seconds": 120, "delay_ms": 0});
    let stats = send(client.post(admin("config")).json(&config)).await.body;
    assert_eq!(stats["available"], false);
    assert_eq!(stats["token_lifetime_seconds"], 120);
    assert_eq!(get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await.status, 503);
    let stats = send(client.post(admin("config")).json(&serde_json::json!({"available": true}))).await.body;
    assert_eq!(stats["available"], true);
    let unknown = send(client.post(admin("config")).json(&serde_json::json!({"lifetime": 5}))).await;
    assert_eq!(unknown.status, 422, "{}", unknown.body);

    let stats =
        send(client.post(admin("config")).json(&serde_json::json!({"gone_for_ms": 60_000}))).await.body;
    assert!(stats["gone_remaining_ms"].as_u64().unwrap() > 50_000);
    assert_eq!(get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await.status, 410);

    let stats = send(client.post(admin("reset"))).await.body;
    assert_eq!(stats["requests"], 0);
    assert_eq!(stats["pending_faults"], serde_json::json!([]));
    assert_eq!(stats["gone_remaining_ms"], 0);
    assert_eq!(stats["token_lifetime_seconds"], 86_400);
    assert_eq!(get_token(&client, &standin, &[("resource", EVENT_HUBS)]).await.status, 200);
    assert_eq!(standin.requests(), 1, "admin requests are not token requests");
}

#[tokio::test]
async fn shutdown_and_drop_stop_the_server() {
    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let addr = standin.addr();
    let clone = standin.clone();
    standin.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed after shutdown");
    drop(clone);

    let standin = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let addr = standin.addr();
    drop(standin);
    // The abort takes effect when the runtime next polls the task.
    tokio::task::yield_now().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed after drop");
}

#[tokio::test]
async fn refuses_non_loopback_addresses() {
    let addr = "0.0.0.0:0".parse().unwrap();
    let error = ImdsStandIn::start_on(addr, ImdsConfig::default()).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}
