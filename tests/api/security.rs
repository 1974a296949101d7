//! Secured APIs: bearer tokens on ingest and admin, TLS, the time limits on reading requests
//! (slowloris), Unix sockets, and a whole session of the real binary whose logs, at debug
//! level, must not contain any configured secret.

use crate::helpers::{base_config, spawn_app, telemetry, twin_create, twinroute};
use serde_json::Value;
use std::collections::HashMap;
use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twinroute::app::{RunOptions, Running, StartError};
use twinroute::config::Config;

const INGEST_TOKEN: &str = "ingest-token-7f3a9c1e5b2d4f60";
const ADMIN_TOKEN: &str = "admin-token-0b8e2d6a4c9f1e37";
/// The in-memory spool, for tests on a paused clock (no spool writer thread to wait for).
const MEMORY: &str = "[spool]\nmode = \"memory\"\n";

/// `[ingest]` and `[admin]` with tokens (the listeners stay on loopback: a configured token is
/// enforced there too), plus `more`.
fn with_tokens(more: &str) -> String {
    format!("[ingest]\ntoken = \"{INGEST_TOKEN}\"\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n{more}\n")
}

async fn body(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

#[tokio::test]
async fn a_configured_token_is_required_with_401_in_adt_shape() {
    let app = spawn_app(&with_tokens("[routes.all]\nendpoint_name = \"hub-a\"\n")).await;
    let event = twin_create("room-1").to_string();
    let post = |token: Option<&str>| {
        let mut r = app
            .client
            .post(format!("{}/events", app.ingest))
            .header("content-type", "application/cloudevents+json")
            .body(event.clone());
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };

    let missing = post(None).await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer realm=\"twinroute\"");
    assert_eq!(missing.headers()["x-ms-error-code"], "Unauthorized");
    let error = body(missing).await;
    assert_eq!(error["error"]["code"], "Unauthorized");
    assert!(error["error"]["message"].as_str().unwrap().contains("Authorization: Bearer"), "{error}");

    let wrong = post(Some(&format!("{INGEST_TOKEN}x"))).await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer realm=\"twinroute\", error=\"invalid_token\"");
    assert_eq!(body(wrong).await["error"]["code"], "InvalidAuthenticationToken");
    // Each API has its own token.
    assert_eq!(post(Some(ADMIN_TOKEN)).await.unwrap().status(), 401);

    let accepted = post(Some(INGEST_TOKEN)).await.unwrap();
    assert_eq!(accepted.status(), 202);
    app.sink("hub-a").wait_for(1).await;
    // One endpoint, delivered in order: had a refused request been taken, it would be here first.
    assert_eq!(app.sink("hub-a").delivered().len(), 1, "nothing refused was taken");
    // Ingest's liveness probe is open.
    let health = app.client.get(format!("{}/healthz", app.ingest)).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // Admin: the API needs its token; an unknown path too (it does not reveal what exists).
    for path in ["/eventroutes", "/endpoints/hub-a", "/metrics", "/no-such-path"] {
        let r = app.client.get(format!("{}{path}", app.admin)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r =
            app.client.get(format!("{}{path}", app.admin)).bearer_auth(INGEST_TOKEN).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} with the ingest token");
    }
    let routes =
        app.client.get(format!("{}/eventroutes", app.admin)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(routes.status(), 200);
    let metrics =
        app.client.get(format!("{}/metrics", app.admin)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("twinroute_auth_failures_total{api=\"ingest\",reason=\"invalid\"}"),
        "{metrics}"
    );
    // Probes stay open; without the token /readyz gives the verdict, not the endpoints.
    let health = app.client.get(format!("{}/healthz", app.admin)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.client.get(format!("{}/readyz", app.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(body(ready).await, serde_json::json!({"status": "ready"}));
    let ready =
        app.client.get(format!("{}/readyz", app.admin)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert!(body(ready).await["endpoints"].as_array().unwrap().len() == 2);
    app.stop().await;

    // For scrapers that cannot send a token, /metrics alone can be opened.
    let app = spawn_app(&with_tokens("metrics_unauthenticated = true\n")).await;
    let metrics = app.client.get(format!("{}/metrics", app.admin)).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let routes = app.client.get(format!("{}/eventroutes", app.admin)).send().await.unwrap();
    assert_eq!(routes.status(), 401);
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_token_file_is_read_again_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ingest-token");
    let (old, new) = ("first-token-0123456789", "second-token-0123456789");
    std::fs::write(&file, format!("{old}\n")).unwrap();
    let app = spawn_app(&format!(
        "{MEMORY}[ingest]\ntoken_file = \"{}\"\n[routes.all]\nendpoint_name = \"hub-a\"\n",
        file.display()
    ))
    .await;
    let post = |token: &'static str| {
        app.client
            .post(format!("{}/events", app.ingest))
            .header("content-type", "application/cloudevents+json")
            .bearer_auth(token)
            .body(telemetry("t-1", 20.0).to_string())
            .send()
    };
    assert_eq!(post(old).await.unwrap().status(), 202);
    assert_eq!(post(new).await.unwrap().status(), 401);
    std::fs::write(&file, format!("{new}\n")).unwrap();
    // The file is polled: within two intervals the new token is in force (paused clock).
    tokio::time::sleep(twinroute::server::auth::TOKEN_FILE_POLL_INTERVAL * 2).await;
    assert_eq!(post(new).await.unwrap().status(), 202);
    assert_eq!(post(old).await.unwrap().status(), 401);
    // A file emptied by mistake leaves the token in force.
    std::fs::write(&file, "").unwrap();
    tokio::time::sleep(twinroute::server::auth::TOKEN_FILE_POLL_INTERVAL * 2).await;
    assert_eq!(post(new).await.unwrap().status(), 202);
    app.stop().await;
}

/// A self-signed certificate for 127.0.0.1 and localhost, made by openssl at test time.
pub(crate) fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=twinroute-test"])
        .args([
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success());
    (cert, key)
}

#[tokio::test]
async fn ingest_and_admin_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let tls = format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", cert.display(), key.display());
    let app = spawn_app(&format!(
        "[ingest]\ntoken = \"{INGEST_TOKEN}\"\n{tls}[admin]\n{tls}[routes.all]\nendpoint_name = \"hub-a\"\n"
    ))
    .await;
    let https = |url: &str| url.replacen("http://", "https://", 1);
    let trusted = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&std::fs::read(&cert).unwrap()).unwrap())
        .build()
        .unwrap();
    let accepted = trusted
        .post(format!("{}/events", https(&app.ingest)))
        .header("content-type", "application/cloudevents-batch+json")
        .bearer_auth(INGEST_TOKEN)
        .body(serde_json::to_string(&[twin_create("room-1"), telemetry("room-1", 22.0)]).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    app.sink("hub-a").wait_for(2).await;
    let routes = trusted.get(format!("{}/eventroutes", https(&app.admin))).send().await.unwrap();
    assert_eq!(routes.status(), 200, "admin over TLS (no admin token configured)");

    // Plain HTTP to the TLS port gets no HTTP answer; a client that does not trust the
    // certificate refuses it.
    assert!(app.client.get(format!("{}/healthz", app.ingest)).send().await.is_err());
    let untrusting = reqwest::Client::new();
    let err = untrusting.get(format!("{}/healthz", https(&app.ingest))).send().await.unwrap_err();
    assert!(format!("{err:?}").to_lowercase().contains("certificate"), "{err:?}");
    app.stop().await;
}

/// Reads from `stream` until it closes (or 64 KiB), returning what came.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 65536 {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(start_paused = true)]
async fn slow_clients_are_cut_off_at_the_header_and_body_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let limits = "header_read_timeout_seconds = 2\nidle_timeout_seconds = 5\nbody_read_timeout_seconds = 3\n";
    let app = spawn_app(&format!("{MEMORY}[ingest]\n{limits}[admin]\n{limits}")).await;
    let addr = |url: &str| url.trim_start_matches("http://").to_owned();

    // Slowloris: the headers never end. The connection is closed at the header limit.
    let start = tokio::time::Instant::now();
    let mut slow = tokio::net::TcpStream::connect(addr(&app.ingest)).await.unwrap();
    slow.write_all(b"POST /events HTTP/1.1\r\nhost: twinroute\r\ncontent-type: application/cloud")
        .await
        .unwrap();
    let answer = read_until_closed(&mut slow).await;
    let waited = start.elapsed();
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(3), "{waited:?}");

    // The headers arrive, the body stalls: 408 at the body limit, in ADT's shape, and the
    // connection closes.
    for (base, path) in [(&app.ingest, "/events"), (&app.admin, "/eventroutes/r1")] {
        let start = tokio::time::Instant::now();
        let mut stalled = tokio::net::TcpStream::connect(addr(base)).await.unwrap();
        let method = if path == "/events" { "POST" } else { "PUT" };
        stalled
            .write_all(
                format!("{method} {path} HTTP/1.1\r\nhost: twinroute\r\ncontent-type: application/cloudevents+json\r\ncontent-length: 1000\r\n\r\n{{\"specversion\"")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let answer = read_until_closed(&mut stalled).await;
        let waited = start.elapsed();
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(
            answer.contains("\"code\":\"RequestTimeout\"") && answer.contains("body_read_timeout_seconds"),
            "{answer}"
        );
        assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(4), "{path}: {waited:?}");
    }
    // A kept-alive connection may idle longer than the header limit between requests (a client
    // posting every few seconds is not cut off), and is closed at the idle limit.
    let mut kept = tokio::net::TcpStream::connect(addr(&app.ingest)).await.unwrap();
    let healthz = b"GET /healthz HTTP/1.1\r\nhost: twinroute\r\n\r\n";
    let mut answer = [0u8; 512];
    for _ in 0..2 {
        kept.write_all(healthz).await.unwrap();
        let n = kept.read(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("ok"), "{text}");
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let start = tokio::time::Instant::now();
    assert_eq!(read_until_closed(&mut kept).await, "");
    assert_eq!(start.elapsed(), Duration::from_secs(1), "closed 5 s after the last response");
    app.stop().await;

    // Behind TLS, a client that never finishes the handshake is cut off at the header limit.
    let tls = format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", cert.display(), key.display());
    let app = spawn_app(&format!("{MEMORY}[ingest]\n{limits}{tls}")).await;
    let start = tokio::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr(&app.ingest)).await.unwrap();
    silent.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    assert_eq!(read_until_closed(&mut silent).await, "");
    assert!(start.elapsed() >= Duration::from_secs(2) && start.elapsed() < Duration::from_secs(3));
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_without_the_token_is_refused_before_its_body_is_read() {
    let app = spawn_app(&format!("{MEMORY}{}", with_tokens(""))).await;
    let start = tokio::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(app.ingest.trim_start_matches("http://")).await.unwrap();
    stream
        .write_all(b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents+json\r\ncontent-length: 4000000\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
    assert!(start.elapsed() < Duration::from_secs(1), "answered at once, not after a body or a timeout");
    app.stop().await;
}

/// A daemon on Unix sockets (the listen addresses from the environment, as `spawn_app` does
/// for its ports), in `dir`.
async fn start_on_sockets(dir: &Path, extra: &str) -> Result<Running, StartError> {
    let text = format!("{}\n{MEMORY}{extra}", base_config(dir));
    let env = HashMap::from([
        ("TWINROUTE_INGEST__LISTEN".to_owned(), format!("unix:{}", dir.join("ingest.sock").display())),
        ("TWINROUTE_ADMIN__LISTEN".to_owned(), format!("unix:{}", dir.join("admin.sock").display())),
    ]);
    let config = Config::from_toml(&text, "test", Some(env)).expect("valid");
    let sinks = std::sync::Arc::new(twinroute::sinks::memory::MemorySinkFactory::default());
    Running::start(config, RunOptions { sinks: Some(sinks), ..Default::default() }).await
}

fn over(socket: &Path) -> reqwest::Client {
    reqwest::Client::builder().unix_socket(socket).build().unwrap()
}

#[tokio::test]
async fn ingest_and_admin_on_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let (ingest, admin) = (dir.path().join("ingest.sock"), dir.path().join("admin.sock"));
    // A socket file left by a run that died: replaced.
    drop(std::os::unix::net::UnixListener::bind(&ingest).unwrap());
    let running = start_on_sockets(dir.path(), "[admin]\nsocket_mode = \"0600\"\n").await.unwrap();
    assert_eq!(running.ingest_socket.as_deref(), Some(ingest.as_path()));
    assert_eq!((running.ingest_addr, running.admin_addr), (None, None));
    assert_eq!(
        running.listening(),
        format!("ingest unix:{}, admin unix:{}", ingest.display(), admin.display())
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&ingest), mode(&admin)), (0o660, 0o600));

    // A sidecar: the admin API, then an event, over the sockets (the host name is not used).
    let put = over(&admin)
        .put("http://twinroute/eventroutes/all")
        .json(&serde_json::json!({"endpointName": "hub-a", "filter": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let posted = over(&ingest)
        .post("http://localhost/events")
        .header("content-type", "application/cloudevents+json")
        .body(twin_create("room-1").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 202);
    assert_eq!(body(posted).await, serde_json::json!({"accepted": 1, "unmatched": 0}));

    // A second daemon on the same sockets is refused; the first keeps them.
    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let text = format!("{}\n{MEMORY}", base_config(&second));
    let env = HashMap::from([("TWINROUTE_INGEST__LISTEN".to_owned(), format!("unix:{}", ingest.display()))]);
    let err = Running::start(Config::from_toml(&text, "test", Some(env)).unwrap(), RunOptions::default())
        .await
        .err()
        .expect("the socket is in use");
    assert!(matches!(err, StartError::Bind { key: "ingest.listen", .. }), "{err}");
    assert!(err.to_string().contains("another process is serving on this socket"), "{err}");
    assert!(ingest.exists());

    running.stop().await;
    assert!(!ingest.exists() && !admin.exists(), "removed at stop");

    // A configured token is required on a socket too.
    let running =
        start_on_sockets(dir.path(), &format!("[ingest]\ntoken = \"{INGEST_TOKEN}\"\n")).await.unwrap();
    let refused = over(&ingest).post("http://localhost/events").body("{}").send().await.unwrap();
    assert_eq!(refused.status(), 401);
    running.stop().await;
}

#[test]
fn starting_beyond_loopback_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("open.toml");
    std::fs::write(&config, "[ingest]\nlisten = \"0.0.0.0:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    for command in ["check-config", "run"] {
        let out = twinroute().args([command, "--config"]).arg(&config).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{command}: {stderr}");
        assert!(
            stderr.contains("ingest needs a bearer token") && stderr.contains("ingest.token_file"),
            "{stderr}"
        );
    }
    // A token file that cannot be read stops the start with status 78, naming the file.
    std::fs::write(
        &config,
        "[ingest]\nlisten = \"0.0.0.0:0\"\ntoken_file = \"/nonexistent/token\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = twinroute().args(["run", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("ingest.token_file /nonexistent/token: cannot read it"), "{stderr}");
}

/// Lines of a child's output, collected by a thread; `listening` gets the daemon's addresses.
fn collect(
    reader: impl std::io::Read + Send + 'static,
    listening: Option<std::sync::mpsc::Sender<Value>>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(reader).lines().map_while(Result::ok) {
            if let (Some(tx), Ok(log)) = (&listening, serde_json::from_str::<Value>(&line)) {
                if log["message"] == "listening" {
                    let _ = tx.send(log);
                }
            }
            lines.push(line);
        }
        lines
    })
}

/// A whole session of the real binary at debug level, with every kind of secret configured (in
/// the file, in the environment, in a token file, through the admin API), an auth failure, a
/// refused SAS token: none of them may appear anywhere in stdout or stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configured_secret_appears_in_a_debug_session() {
    use twinroute_emulator::amqp::{AmqpConfig, AmqpStandIn, NamespaceDef, DEFAULT_NAMESPACE};
    use twinroute_emulator::eventgrid::{EventGridConfig, EventGridStandIn, InputSchema};

    const SAS_KEY_NAME: &str = "send-only";
    const SAS_KEY: &str = "c2FzLWtleS10aGF0LW11c3QtbmV2ZXItYmUtbG9nZ2Vk";
    const WRONG_SAS_KEY: &str = "d3Jvbmctc2FzLWtleS10aGF0LW11c3Qtbm90LWxlYWs=";
    const GRID_KEY1: &str = "grid-key-one-5d1c8f2a9b7e4c30";
    const GRID_KEY2: &str = "grid-key-two-83b6e0f4a2c9d157";
    const API_GRID_KEY: &str = "grid-key-via-api-6a2f9d0c4e81";
    const DEAD_LETTER_SIG: &str = "sig=dead-letter-signature-3e7b1a9f";
    const WRONG_TOKEN: &str = "someone-elses-token-4f0e9a7c2b";

    let amqp = AmqpStandIn::start(AmqpConfig {
        namespaces: vec![NamespaceDef {
            sas_keys: vec![(SAS_KEY_NAME.to_owned(), SAS_KEY.to_owned())],
            ..NamespaceDef::default()
        }],
        ..AmqpConfig::default()
    })
    .await
    .unwrap();
    let grid = EventGridStandIn::start(EventGridConfig {
        keys: vec![GRID_KEY1.to_owned(), GRID_KEY2.to_owned(), API_GRID_KEY.to_owned()],
        schema: InputSchema::CloudEvents,
    })
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let admin_token_file = dir.path().join("admin-token");
    std::fs::write(&admin_token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let connection = |key: &str| {
        format!("Endpoint=sb://{DEFAULT_NAMESPACE}/;SharedAccessKeyName={SAS_KEY_NAME};SharedAccessKey={key};EntityPath=twins")
    };
    let dead_letter = format!("https://127.0.0.1:1/deadletters?sv=2022-11-02&sp=cw&{DEAD_LETTER_SIG}");
    let config = dir.path().join("twinroute.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "{state}"
[ingest]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
token_file = "{admin_token}"
[log]
level = "debug"
format = "json"
summary_interval_seconds = 1
[delivery]
shutdown_timeout_seconds = 5
retry_schedule_seconds = [1]
[endpoints.hub-k]
type = "EventHub"
connection_string = "{hub}"
custom_endpoint = "{amqp}"
dead_letter_secret = "{dead_letter}"
[endpoints.hub-wrong]
type = "EventHub"
connection_string = "{wrong}"
custom_endpoint = "{amqp}"
[endpoints.grid]
type = "EventGrid"
topic_endpoint = "{topic}"
[routes.to-hub]
endpoint_name = "hub-k"
filter = "type != 'never'"
[routes.to-grid]
endpoint_name = "grid"
filter = "type != 'never'"
[routes.to-wrong]
endpoint_name = "hub-wrong"
filter = "type = 'never'"
"#,
            state = dir.path().join("state").display(),
            admin_token = admin_token_file.display(),
            hub = connection(SAS_KEY),
            wrong = connection(WRONG_SAS_KEY),
            amqp = amqp.endpoint(),
            topic = grid.topic_endpoint(),
        ),
    )
    .unwrap();
    let mut child = twinroute()
        .args(["run", "--config"])
        .arg(&config)
        // Secrets from the environment too, as a container or systemd would pass them.
        .env("TWINROUTE_INGEST__TOKEN", INGEST_TOKEN)
        .env("TWINROUTE_ENDPOINTS__GRID__ACCESS_KEY1", GRID_KEY1)
        .env("TWINROUTE_ENDPOINTS__GRID__ACCESS_KEY2", GRID_KEY2)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = collect(child.stderr.take().unwrap(), Some(tx));
    let stdout = collect(child.stdout.take().unwrap(), None);
    let listening = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("the daemon listens");
    let address = |key: &str| {
        let text = listening[key].as_str().unwrap();
        format!("http://{}", text.trim_start_matches("Some(").trim_end_matches(')'))
    };
    let (ingest, admin) = (address("ingest"), address("admin"));
    let client = reqwest::Client::new();

    // Events in, with the ingest token; an auth failure with someone else's token, and none.
    let events: Vec<Value> = (0..5).map(|i| telemetry(&format!("room-{i}"), 20.0 + i as f64)).collect();
    let posted = client
        .post(format!("{ingest}/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .bearer_auth(INGEST_TOKEN)
        .body(serde_json::to_string(&events).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 202);
    let refused =
        client.post(format!("{ingest}/events")).bearer_auth(WRONG_TOKEN).body("{}").send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(client.get(format!("{admin}/endpoints")).send().await.unwrap().status(), 401);

    // The admin API: an endpoint with a key created, everything read back.
    let created = client
        .put(format!("{admin}/endpoints/grid-api"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"properties": {
            "endpointType": "EventGrid", "TopicEndpoint": grid.topic_endpoint(), "accessKey1": API_GRID_KEY}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());
    let mut answers = String::new();
    for path in ["/endpoints", "/endpoints/hub-k", "/endpoints/grid", "/eventroutes", "/readyz", "/metrics"] {
        let r = client.get(format!("{admin}{path}")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        answers.push_str(&r.text().await.unwrap());
    }
    // The wrong key is refused by the stand-in (an auth failure, retried and logged).
    let never = serde_json::json!({"specversion": "1.0", "id": "w-1", "type": "never", "source": "s"});
    let posted = client
        .post(format!("{ingest}/events"))
        .header("content-type", "application/cloudevents+json")
        .bearer_auth(INGEST_TOKEN)
        .body(never.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 202);

    // Stop; the drain delivers what reached the good endpoints.
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let (stderr, stdout) = (stderr.join().unwrap(), stdout.join().unwrap());
    assert_eq!(status.code(), Some(0), "{}", stderr.join("\n"));
    assert_eq!(amqp.stored(DEFAULT_NAMESPACE, "twins").len(), 5, "the hub received every event");
    assert_eq!(grid.received().len(), 5, "the topic received every event");

    let logs = format!("{}\n{}", stderr.join("\n"), stdout.join("\n"));
    // The session did log at debug level, the refusal included (so the check means something).
    assert!(logs.contains("\"level\":\"DEBUG\""), "no debug lines");
    assert!(logs.contains("request refused: bearer token invalid"), "the auth failure is logged");
    assert!(amqp.stats().put_tokens_refused >= 1, "the wrong SAS key was used");
    assert!(logs.contains("the SAS key \\\"send-only\\\" was refused"), "the refusal is logged");
    let secrets = [
        INGEST_TOKEN,
        ADMIN_TOKEN,
        WRONG_TOKEN,
        SAS_KEY,
        WRONG_SAS_KEY,
        GRID_KEY1,
        GRID_KEY2,
        API_GRID_KEY,
        DEAD_LETTER_SIG,
        &connection(SAS_KEY),
    ];
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
        assert!(!answers.contains(secret), "{secret} appears in an admin API answer");
    }
    // The SAS keys are base64: nor in another encoding of it.
    for key in [SAS_KEY, WRONG_SAS_KEY] {
        let url_encoded: String = url::form_urlencoded::byte_serialize(key.as_bytes()).collect();
        assert!(!logs.contains(&url_encoded), "{key} (URL-encoded) appears in the logs");
    }
}
