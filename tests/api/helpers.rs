//! `spawn_app`: a daemon on ephemeral ports with in-memory sinks (or the real ones), its own
//! state directory, and an HTTP client.

use std::collections::HashMap;
use std::sync::Arc;
use twinroute::app::{RunOptions, Running};
use twinroute::config::Config;
use twinroute::sinks::memory::{MemorySink, MemorySinkFactory};

pub struct TestApp {
    pub ingest: String,
    pub admin: String,
    pub client: reqwest::Client,
    pub sinks: Arc<MemorySinkFactory>,
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
}

/// The base configuration every test starts from: a state directory and two endpoints (`hub-a`,
/// `hub-b`) with no routes. The ports (ephemeral) come from environment overrides, so tests can
/// still add their own `[ingest]` and `[admin]` sections.
pub fn base_config(state_dir: &std::path::Path) -> String {
    format!(
        r#"
state_dir = "{}"
[endpoints.hub-a]
type = "Stdout"
[endpoints.hub-b]
type = "Stdout"
"#,
        state_dir.display()
    )
}

pub async fn spawn_app(extra: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    spawn_in(dir, extra, Arc::new(MemorySinkFactory::default())).await
}

/// A daemon with the real sinks (Event Hubs, Service Bus, ...) instead of in-memory ones.
pub async fn spawn_real(extra: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    start(dir, extra, Arc::new(MemorySinkFactory::default()), false).await
}

/// Starts a daemon whose configuration is the base plus `extra` TOML, in `dir`.
pub async fn spawn_in(dir: tempfile::TempDir, extra: &str, sinks: Arc<MemorySinkFactory>) -> TestApp {
    start(dir, extra, sinks, true).await
}

async fn start(dir: tempfile::TempDir, extra: &str, sinks: Arc<MemorySinkFactory>, memory: bool) -> TestApp {
    let text = format!("{}\n{extra}", base_config(dir.path()));
    let env = HashMap::from([
        ("TWINROUTE_INGEST__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("TWINROUTE_ADMIN__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
    ]);
    let config = Config::from_toml(&text, "test", Some(env)).expect("test config is valid");
    let factory: Option<Arc<dyn twinroute::sinks::SinkFactory>> =
        if memory { Some(sinks.clone()) } else { None };
    let running = Running::start(config, RunOptions { sinks: factory, ..Default::default() })
        .await
        .expect("the daemon starts");
    TestApp {
        ingest: format!("http://{}", running.ingest_addr.unwrap()),
        admin: format!("http://{}", running.admin_addr.unwrap()),
        client: reqwest::Client::new(),
        sinks,
        running: Some(running),
        dir,
    }
}

impl TestApp {
    pub fn sink(&self, endpoint: &str) -> Arc<MemorySink> {
        self.sinks.sink(endpoint)
    }

    pub async fn post(&self, content_type: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(format!("{}/events", self.ingest))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_event(&self, event: &serde_json::Value) -> reqwest::Response {
        self.post("application/cloudevents+json", event.to_string()).await
    }

    pub async fn put_route(&self, id: &str, endpoint: &str, filter: &str) -> reqwest::Response {
        self.client
            .put(format!("{}/eventroutes/{id}?api-version=2023-10-31", self.admin))
            .json(&serde_json::json!({"endpointName": endpoint, "filter": filter}))
            .send()
            .await
            .unwrap()
    }

    /// Stops the daemon (draining every queue) and hands back its directory.
    pub async fn stop(mut self) -> (tempfile::TempDir, Arc<MemorySinkFactory>) {
        let report = self.running.take().unwrap().stop().await;
        assert!(report.undelivered.is_empty(), "undelivered at stop: {:?}", report.undelivered);
        (self.dir, self.sinks)
    }
}

/// An ADT Twin.Create event for twin `twin`, with a unique id.
pub fn twin_create(twin: &str) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "Microsoft.DigitalTwins.Twin.Create",
        "source": "contoso.api.wus2.digitaltwins.azure.net",
        "subject": twin,
        "time": "2021-12-09T20:28:52.6745538Z",
        "datacontenttype": "application/json",
        "traceparent": "00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01",
        "data": {"$dtId": twin, "$etag": "W/\"1\"", "temperature": 21.5, "$metadata": {"$model": "dtmi:com:example:Room;1"}}
    })
}

/// Telemetry from `twin` with `temperature`.
pub fn telemetry(twin: &str, temperature: f64) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "microsoft.iot.telemetry",
        "source": format!("contoso.api.wus2.digitaltwins.azure.net/digitaltwins/{twin}"),
        "datacontenttype": "application/json",
        "dataschema": "dtmi:com:example:Room;1",
        "data": {"temperature": temperature}
    })
}

/// The `twinroute` binary with a clean environment: no log filter or configuration inherited,
/// and loopback never proxied.
pub fn twinroute() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_twinroute"));
    c.env_remove("RUST_LOG").env_remove("TWINROUTE_CONFIG").env("NO_PROXY", "127.0.0.1,localhost");
    c
}

/// A loopback port free at the time of asking (for processes that bind it themselves).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `f`, failing the test if it takes over 20 s.
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("{what} took over 20 s"))
}
