//! Managed-identity tokens against the IMDS stand-in. Timing tests run on tokio's paused clock,
//! with the stand-in answering in-process (no sockets), so every wait is exact and instant.

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::ServiceExt;
use twinroute::identity::imds::{HttpAnswer, TransportError};
use twinroute::identity::{
    CachedCredential, IdentityErrorKind, ImdsOptions, ImdsSource, ImdsTransport, ManagedIdentityId,
    UserAssignedId, AUDIENCE_EVENT_HUBS, AUDIENCE_STORAGE,
};
use twinroute_emulator::imds::{self as standin, Fault, ImdsConfig, ImdsStandIn};

/// Calls the stand-in's router directly: IMDS without a network.
#[derive(Debug, Clone)]
struct InProcess(axum::Router);

#[async_trait]
impl ImdsTransport for InProcess {
    async fn get(&self, url: &url::Url, headers: &[(&str, &str)]) -> Result<HttpAnswer, TransportError> {
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let mut request = axum::http::Request::get(path);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response =
            self.0.clone().oneshot(request.body(axum::body::Body::empty()).unwrap()).await.unwrap();
        let (retry_after, www_authenticate) = {
            let header = |n: &str| response.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
            (
                header("retry-after").and_then(|v| v.parse().ok()).map(Duration::from_secs),
                header("www-authenticate"),
            )
        };
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        Ok(HttpAnswer { status, retry_after, www_authenticate, body })
    }
}

async fn standin(lifetime: Duration) -> ImdsStandIn {
    ImdsStandIn::start(ImdsConfig { token_lifetime: lifetime, ..Default::default() }).await.unwrap()
}

fn credential(imds: &ImdsStandIn, identity: ManagedIdentityId) -> CachedCredential {
    let options = ImdsOptions::new(imds.token_url().parse().unwrap(), identity);
    CachedCredential::new(Arc::new(ImdsSource::new(options, Arc::new(InProcess(imds.router())))))
}

fn system(imds: &ImdsStandIn) -> CachedCredential {
    credential(imds, ManagedIdentityId::SystemAssigned)
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_ahead_of_expiry_in_the_background() {
    // One-hour tokens: refreshed 5 minutes before expiry, less at most a minute of jitter.
    let imds = standin(Duration::from_secs(3600)).await;
    let cred = system(&imds);
    let first = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
    assert_eq!(imds.requests(), 1);
    tokio::time::sleep(Duration::from_secs(53 * 60 + 50)).await;
    assert_eq!(cred.token(AUDIENCE_EVENT_HUBS).await.unwrap().secret, first.secret, "served from cache");
    assert_eq!(imds.requests(), 1, "no refresh before 54 minutes");
    tokio::time::sleep(Duration::from_secs(70)).await;
    assert_eq!(imds.requests(), 2, "refreshed in the background by 55 minutes");
    // A day-long token is refreshed at half its lifetime.
    let imds = standin(Duration::from_secs(24 * 3600)).await;
    let cred = system(&imds);
    cred.token(AUDIENCE_STORAGE).await.unwrap();
    tokio::time::sleep(Duration::from_secs(12 * 3600 - 61)).await;
    assert_eq!(imds.requests(), 1);
    tokio::time::sleep(Duration::from_secs(62)).await;
    assert_eq!(imds.requests(), 2);
    assert!(cred.cache().status()[0].refresh_in.unwrap() > Duration::from_secs(11 * 3600));
}

#[tokio::test(start_paused = true)]
async fn transient_failures_follow_the_imds_retry_schedule() {
    let imds = standin(Duration::from_secs(3600)).await;
    imds.push_faults([
        Fault::Status(500),
        Fault::Status(404),
        Fault::Status(503),
        Fault::StatusWithRetryAfter(429, 20),
    ]);
    let cred = system(&imds);
    let started = Instant::now();
    cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
    // Waits 0, 2, 4, then max(8, Retry-After 20) = 20.
    assert_eq!(started.elapsed().as_secs(), 26);
    assert_eq!(imds.requests(), 5);
}

#[tokio::test(start_paused = true)]
async fn retries_end_after_five_with_a_clear_error() {
    let imds = standin(Duration::from_secs(3600)).await;
    imds.set_available(false);
    let cred = system(&imds);
    let started = Instant::now();
    let err = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap_err();
    assert_eq!(started.elapsed().as_secs(), 30, "retries at 0, 2, 6, 14 and 30 s");
    assert_eq!(imds.requests(), 6);
    assert_eq!(err.kind, IdentityErrorKind::Unavailable);
    assert!(err.message.contains("after 6 attempts") && err.message.contains("503"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn gone_is_retried_for_up_to_70_seconds() {
    let imds = standin(Duration::from_secs(3600)).await;
    imds.set_gone_for(Duration::from_secs(45));
    let cred = system(&imds);
    let started = Instant::now();
    cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
    assert!((45..=56).contains(&started.elapsed().as_secs()), "{:?}", started.elapsed());

    let imds = standin(Duration::from_secs(3600)).await;
    imds.set_gone_for(Duration::from_secs(300));
    let cred = system(&imds);
    let started = Instant::now();
    let err = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap_err();
    assert!(started.elapsed() <= Duration::from_secs(70), "{:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_secs(55), "{:?}", started.elapsed());
    assert!(err.message.contains("updating (410)"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn identity_not_found_is_not_retried_and_says_what_to_do() {
    let imds = standin(Duration::from_secs(3600)).await;
    let cred = credential(&imds, ManagedIdentityId::UserAssigned(UserAssignedId::ClientId("nope-1".into())));
    let err = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap_err();
    assert_eq!(imds.requests(), 1);
    assert_eq!(err.kind, IdentityErrorKind::NotFound);
    assert!(
        err.message.contains("no user-assigned identity with client_id nope-1 is attached to this host"),
        "{err}"
    );
    // Other 4xx: no retry either.
    imds.push_faults([Fault::Status(403)]);
    let err = system(&imds).token(AUDIENCE_STORAGE).await.unwrap_err();
    assert_eq!(err.kind, IdentityErrorKind::Refused);
    assert_eq!(imds.requests(), 2);
    // No system-assigned identity on the host.
    let bare =
        ImdsStandIn::start(ImdsConfig { system_assigned: None, user_assigned: vec![], ..Default::default() })
            .await
            .unwrap();
    let err = system(&bare).token(AUDIENCE_STORAGE).await.unwrap_err();
    assert!(err.message.contains("no system-assigned managed identity"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_callers_cause_one_request() {
    let imds = standin(Duration::from_secs(3600)).await;
    imds.set_delay(Duration::from_millis(200));
    let cred = system(&imds);
    let callers: Vec<_> = (0..1000)
        .map(|_| {
            let cred = cred.clone();
            tokio::spawn(async move { cred.token(AUDIENCE_EVENT_HUBS).await.unwrap().secret })
        })
        .collect();
    let mut tokens = Vec::new();
    for c in callers {
        tokens.push(c.await.unwrap());
    }
    assert_eq!(imds.requests(), 1, "exactly one request to IMDS");
    assert!(tokens.windows(2).all(|w| w[0] == w[1]));
}

#[tokio::test(start_paused = true)]
async fn a_valid_token_is_served_through_an_outage_and_an_expired_one_never() {
    let imds = standin(Duration::from_secs(3600)).await;
    let cred = system(&imds);
    let held = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
    imds.set_available(false);
    // Past the refresh point: the background refresh fails, the held token is still served.
    tokio::time::sleep(Duration::from_secs(57 * 60)).await;
    assert!(imds.requests() > 1, "the background refresh tried");
    assert_eq!(cred.token(AUDIENCE_EVENT_HUBS).await.unwrap().secret, held.secret);
    let status = &cred.cache().status()[0];
    assert!(status.last_error.as_deref().unwrap().contains("503"), "{status:?}");
    // Past expiry (less the margin): no token is served; the error says why.
    tokio::time::sleep(Duration::from_secs(3 * 60)).await;
    let err = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap_err();
    assert_eq!(err.kind, IdentityErrorKind::Unavailable);
    // IMDS back: a fresh token.
    imds.set_available(true);
    let before = imds.requests();
    let fresh = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
    assert_eq!(imds.requests(), before + 1);
    assert!(fresh.generation > held.generation);
}

#[tokio::test(start_paused = true)]
async fn user_assigned_identities_are_selected_by_query_parameter() {
    let imds = standin(Duration::from_secs(3600)).await;
    let cases = [
        (UserAssignedId::ClientId(standin::DEFAULT_USER_CLIENT_ID.into()), "client_id"),
        (UserAssignedId::ObjectId(standin::DEFAULT_USER_OBJECT_ID.into()), "object_id"),
        (UserAssignedId::ResourceId(standin::DEFAULT_USER_MSI_RES_ID.into()), "msi_res_id"),
    ];
    for (id, key) in cases {
        let expected = match &id {
            UserAssignedId::ClientId(v) | UserAssignedId::ObjectId(v) | UserAssignedId::ResourceId(v) => {
                v.clone()
            }
        };
        let cred = credential(&imds, ManagedIdentityId::UserAssigned(id));
        let token = cred.token(AUDIENCE_STORAGE).await.unwrap();
        let query = imds.last_query().unwrap();
        assert!(query.contains(&(key.to_owned(), expected)), "{query:?}");
        assert!(query.contains(&("api-version".to_owned(), "2018-02-01".to_owned())));
        assert!(query.contains(&("resource".to_owned(), AUDIENCE_STORAGE.to_owned())));
        let claims = twinroute_emulator::jwt::decode_unverified(token.secret.expose()).unwrap();
        assert_eq!(claims.oid, standin::DEFAULT_USER_OBJECT_ID);
    }
}

#[tokio::test(start_paused = true)]
async fn an_auth_failure_forces_one_refresh() {
    let imds = standin(Duration::from_secs(3600)).await;
    let cred = system(&imds);
    let rejected = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
    let a = cred.cache().force_refresh(AUDIENCE_EVENT_HUBS, &rejected);
    let b = cred.cache().force_refresh(AUDIENCE_EVENT_HUBS, &rejected);
    let (a, b) = tokio::join!(a, b);
    assert_eq!(a.unwrap().secret, b.unwrap().secret);
    assert_eq!(imds.requests(), 2, "two sinks reporting the same token cause one refresh");
    assert!(cred.token(AUDIENCE_EVENT_HUBS).await.unwrap().generation > rejected.generation);
    // A later refusal of the new token refreshes again.
    let newer = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
    cred.cache().force_refresh(AUDIENCE_EVENT_HUBS, &newer).await.unwrap();
    assert_eq!(imds.requests(), 3);
}

#[tokio::test]
async fn imds_unreachable_says_what_to_do() {
    // A port nobody listens on, over real HTTP; retries without waiting.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut options = ImdsOptions::new(
        format!("http://127.0.0.1:{port}/metadata/identity/oauth2/token").parse().unwrap(),
        ManagedIdentityId::SystemAssigned,
    );
    options.retry.delays = vec![Duration::ZERO; 2];
    let err = options.credential().token(AUDIENCE_EVENT_HUBS).await.unwrap_err();
    assert!(err.message.contains(&format!("IMDS unreachable at http://127.0.0.1:{port}/")), "{err}");
    assert!(err.message.contains("set identity.imds_endpoint or choose another identity source"), "{err}");
}

#[tokio::test]
async fn the_credential_serves_azure_sdk_clients() {
    use azure_core::credentials::TokenCredential;
    let imds = standin(Duration::from_secs(3600)).await;
    let cred =
        ImdsOptions::new(imds.token_url().parse().unwrap(), ManagedIdentityId::SystemAssigned).credential();
    let token = cred.get_token(&["https://eventhubs.azure.net/.default"], None).await.unwrap();
    let claims = twinroute_emulator::jwt::verify(
        token.token.secret(),
        twinroute_emulator::DEV_SIGNING_KEY,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )
    .unwrap();
    assert_eq!(claims.aud, "https://eventhubs.azure.net/");
    assert_eq!(imds.requests_for("https://eventhubs.azure.net/"), 1);
    assert!(!format!("{cred:?}").contains(token.token.secret()));
}

use crate::helpers::twinroute;

#[tokio::test]
async fn get_token_shows_source_audience_and_expiry_but_not_the_token() {
    let imds = standin(Duration::from_secs(3600)).await;
    let url = imds.token_url();
    let run = |args: Vec<String>| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                twinroute()
                    .args(["identity", "get-token", "--imds-endpoint", &url])
                    .args(args)
                    .env("RUST_LOG", "trace")
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = run(vec!["--resource".into(), AUDIENCE_EVENT_HUBS.into()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains(&format!("source:   imds ({url})")), "{stdout}");
    assert!(stdout.contains("identity: the system-assigned identity"), "{stdout}");
    assert!(stdout.contains("audience: https://eventhubs.azure.net/"), "{stdout}");
    assert!(stdout.contains(&format!("object:   {}", standin::DEFAULT_SYSTEM_OBJECT_ID)), "{stdout}");
    assert!(stdout.contains("expires:") && stdout.contains("(in 59m)"), "{stdout}");
    assert!(!stdout.contains("token:") && !stdout.contains("eyJ"), "no token without --show-token: {stdout}");
    assert!(!stderr.contains("eyJ"), "no token in the logs, even at trace level: {stderr}");

    let out = run(vec![
        "--resource".into(),
        AUDIENCE_STORAGE.into(),
        "--client-id".into(),
        standin::DEFAULT_USER_CLIENT_ID.into(),
        "--show-token".into(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains(&format!(
        "identity: the user-assigned identity with client_id {}",
        standin::DEFAULT_USER_CLIENT_ID
    )));
    let token = stdout.lines().find_map(|l| l.strip_prefix("token:    ")).expect("the token is shown");
    let claims = twinroute_emulator::jwt::decode_unverified(token).unwrap();
    assert_eq!(claims.appid, standin::DEFAULT_USER_CLIENT_ID);

    let out = run(vec![
        "--resource".into(),
        AUDIENCE_STORAGE.into(),
        "--object-id".into(),
        "unknown-object".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no user-assigned identity with object_id unknown-object is attached to this host"),
        "{stderr}"
    );
}

#[tokio::test]
async fn readiness_waits_for_every_identity_based_endpoint_to_hold_its_tokens() {
    let imds = standin(Duration::from_secs(3600)).await;
    // The first requests fail: the warmer retries, and /readyz says what is missing.
    imds.push_faults([Fault::Status(400)]);
    let extra = format!(
        r#"
[identity]
imds_endpoint = "{}"
[endpoints.twin-hub]
type = "EventHub"
authentication_type = "IdentityBased"
endpoint_uri = "sb://contoso.servicebus.windows.net/"
entity_path = "twins"
dead_letter_uri = "https://127.0.0.1:10000/devstoreaccount1/deadletters"
"#,
        imds.token_url()
    );
    let app = crate::helpers::spawn_app(&extra).await;
    let ready = app.client.get(format!("{}/readyz", app.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "waiting for identity tokens");
    let missing = body["missing_tokens"].as_array().unwrap();
    assert!(missing.iter().all(|m| m["endpoint"] == "twin-hub"), "{body}");
    assert!(!missing.is_empty());
    // Once the tokens are held (the warmer's retry, or this request), the instance is ready.
    let provider = app.running.as_ref().unwrap().control.identity().clone();
    let cred = provider.credential(&ManagedIdentityId::SystemAssigned).unwrap();
    cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
    cred.token(AUDIENCE_STORAGE).await.unwrap();
    let ready = app.client.get(format!("{}/readyz", app.admin)).send().await.unwrap();
    let status = ready.status();
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["missing_tokens"], serde_json::json!([]));
    app.stop().await;
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn tokens_and_keys_never_reach_the_logs_or_errors() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let mut secrets: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    runtime.block_on(async {
        let imds = standin(Duration::from_secs(600)).await;
        imds.push_faults([Fault::Status(500), Fault::StatusWithRetryAfter(429, 1)]);
        let cred = system(&imds);
        // Fetched after retries, refreshed ahead, refused and force-refreshed, then an outage.
        let token = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
        secrets.push(token.secret.expose().to_owned());
        tokio::time::sleep(Duration::from_secs(400)).await;
        let token = cred.token(AUDIENCE_EVENT_HUBS).await.unwrap();
        secrets.push(token.secret.expose().to_owned());
        let token = cred.cache().force_refresh(AUDIENCE_EVENT_HUBS, &token).await.unwrap();
        secrets.push(token.secret.expose().to_owned());
        imds.set_available(false);
        tokio::time::sleep(Duration::from_secs(1200)).await;
        errors.push(cred.token(AUDIENCE_EVENT_HUBS).await.unwrap_err().to_string());
        errors.extend(cred.cache().status().into_iter().filter_map(|s| s.last_error));
    });
    // Keys: a connection string and SAS signing, and a configuration refused for another reason.
    let key = "c2VjcmV0LWtleS1mb3ItdGhlLXRlc3Q=";
    let connection =
        format!("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={key}");
    let cs = twinroute::config::ConnectionString::parse(&connection).unwrap();
    let sas = twinroute::identity::sas::for_entity(&cs, "hub", Duration::from_secs(60));
    tracing::info!(?cs, ?sas, "signed");
    secrets.push(key.to_owned());
    secrets.push(sas.secret.expose().to_owned());
    let bad =
        format!("[endpoints.hub]\ntype = \"EventHub\"\nconnection_string = \"{connection}\"\nunknown = 1\n");
    errors.push(
        twinroute::config::Config::from_toml(&bad, "t", Some(Default::default())).unwrap_err().to_string(),
    );
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("retrying"), "the capture works: {logs}");
    assert!(errors.iter().any(|e| e.contains("503")), "{errors:?}");
    for secret in &secrets {
        let signature = secret.rsplit('.').next().unwrap();
        assert!(!logs.contains(secret.as_str()) && !logs.contains(signature), "a secret reached the logs");
        for e in &errors {
            assert!(!e.contains(secret.as_str()), "a secret reached an error: {e}");
        }
    }
}
