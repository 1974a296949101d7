//! Hot reload: the real binary reloading its configuration file on SIGHUP and when the watched
//! file changes, refusing an invalid one (logged, counted, shown in `/readyz`) while the old one
//! keeps delivering; in process, events accepted before a reload delivered with the endpoint
//! configuration they were accepted under, and the file's changes meeting the admin API's.

use std::collections::HashMap;
use std::io::BufRead;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;
use twinroute::app::{RunOptions, Running};
use twinroute::config::{Config, EndpointConfig};
use twinroute::delivery::Envelope;
use twinroute::reload::{ReloadOutcome, Trigger};
use twinroute::sinks::{DeliveryOutcome, Sink, SinkBuildError, SinkFactory};

use crate::helpers::{base_config, spawn_in, twinroute};

/// How long a test waits for the daemon to do something before it gives up.
const PATIENCE: Duration = Duration::from_secs(60);

/// `twinroute run` on a configuration file, its JSON log read line by line.
struct Daemon {
    child: Child,
    /// Log lines as the reader thread parses them (non-JSON lines as `{"raw": line}`).
    lines: mpsc::Receiver<serde_json::Value>,
    /// Every line received so far, for assertions and failure messages.
    log: Vec<serde_json::Value>,
    ingest: String,
    admin: String,
    client: reqwest::Client,
    /// Runs the HTTP requests of these synchronous tests.
    runtime: tokio::runtime::Runtime,
}

impl Daemon {
    fn start(config: &Path, notify_socket: Option<&Path>) -> Daemon {
        let mut command = twinroute();
        command.args(["run", "--config"]).arg(config).stdout(Stdio::null()).stderr(Stdio::piped());
        if let Some(socket) = notify_socket {
            command.env("NOTIFY_SOCKET", socket).env_remove("WATCHDOG_USEC");
        }
        let mut child = command.spawn().unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let value =
                    serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child,
            lines,
            log: Vec::new(),
            ingest: String::new(),
            admin: String::new(),
            client: reqwest::Client::new(),
            runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
        };
        let listening = daemon.wait_for("the listening line", |l| l["message"] == "listening");
        let address = |key: &str| {
            let text = listening[key].as_str().unwrap();
            format!("http://{}", text.trim_start_matches("Some(").trim_end_matches(')'))
        };
        (daemon.ingest, daemon.admin) = (address("ingest"), address("admin"));
        daemon
    }

    /// Waits for the first log line from now on that satisfies `condition`.
    fn wait_for(&mut self, what: &str, condition: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if condition(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line for {what} within {PATIENCE:?}; the log:\n{}", self.log_text()),
            }
        }
    }

    fn log_text(&self) -> String {
        self.log.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("\n")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Posts one event of type `ty`; returns its id and the answer's body.
    fn post(&self, id: &str, ty: &str) -> serde_json::Value {
        self.runtime.block_on(async {
            let response = self
                .client
                .post(format!("{}/events", self.ingest))
                .header("content-type", "application/cloudevents+json")
                .body(
                    serde_json::json!({"specversion": "1.0", "id": id, "type": ty, "source": "s"})
                        .to_string(),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202, "{id}");
            response.json().await.unwrap()
        })
    }

    fn get(&self, path: &str) -> String {
        self.runtime.block_on(async {
            self.client.get(format!("{}{path}", self.admin)).send().await.unwrap().text().await.unwrap()
        })
    }

    fn readyz_config(&self) -> serde_json::Value {
        let body: serde_json::Value = serde_json::from_str(&self.get("/readyz")).unwrap();
        body["config"].clone()
    }

    /// The value of the metric sample `series` (name with labels, as rendered), if present.
    fn metric(&self, series: &str) -> Option<f64> {
        let text = self.get("/metrics");
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// SIGTERM, which drains every queue; returns once the process exited 0.
    fn stop(mut self) -> Vec<serde_json::Value> {
        self.signal("-TERM");
        let status = self.child.wait().unwrap();
        self.log.extend(self.lines.iter());
        assert_eq!(status.code(), Some(0), "{}", self.log_text());
        assert!(
            self.log.iter().any(|l| l["message"]
                .as_str()
                .is_some_and(|m| m.contains("every accepted event was delivered"))),
            "{}",
            self.log_text()
        );
        self.log
    }
}

/// The ids of the events in an NDJSON file (none when it does not exist).
fn ids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A configuration on ephemeral ports with JSON logs, a state directory, and `rest`.
fn config_text(dir: &Path, rest: &str) -> String {
    format!(
        "state_dir = \"{}\"\n[ingest]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [log]\nformat = \"json\"\n{rest}",
        dir.join("state").display()
    )
}

fn file_endpoint(name: &str, path: &Path) -> String {
    format!("[endpoints.{name}]\ntype = \"File\"\npath = \"{}\"\n", path.display())
}

fn route(id: &str, endpoint: &str, filter: &str) -> String {
    format!("[routes.{id}]\nendpoint_name = \"{endpoint}\"\nfilter = \"{filter}\"\n")
}

/// Reads notifications until `READY=1`; returns them all.
fn notifications_until_ready(socket: &UnixDatagram) -> Vec<String> {
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).expect("a notification");
        let message = String::from_utf8(buf[..n].to_vec()).unwrap();
        let ready = message.lines().any(|l| l == "READY=1");
        messages.push(message);
        if ready {
            return messages;
        }
    }
}

#[test]
fn sighup_reloads_routes_and_endpoints_from_the_rewritten_file() {
    let dir = tempfile::tempdir().unwrap();
    let (out_a, out_b) = (dir.path().join("a.ndjson"), dir.path().join("b.ndjson"));
    let config = dir.path().join("twinroute.toml");
    // Not watched: only the signal can reload it.
    let before = format!(
        "[reload]\nwatch = false\n{}{}",
        file_endpoint("file-a", &out_a),
        route("to-a", "file-a", "type = 'a'")
    );
    std::fs::write(&config, config_text(dir.path(), &before)).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut daemon = Daemon::start(&config, Some(&socket_path));
    notifications_until_ready(&socket);
    assert_eq!(daemon.post("a-1", "a")["unmatched"], 0);
    assert_eq!(daemon.post("b-1", "b")["unmatched"], 1, "no route for type b yet");

    // A second endpoint and a route to it, and a setting that needs a restart.
    let after = format!(
        "{before}{}{}[delivery]\nshutdown_timeout_seconds = 5\n",
        file_endpoint("file-b", &out_b),
        route("to-b", "file-b", "type = 'b'")
    );
    std::fs::write(&config, config_text(dir.path(), &after)).unwrap();
    daemon.signal("-HUP");
    let reloaded = daemon.wait_for("the reload", |l| l["message"] == "configuration reloaded");
    assert_eq!(reloaded["trigger"], "SIGHUP");
    assert_eq!(reloaded["endpoints"], "added file-b");
    assert_eq!(reloaded["routes"], "added to-b");
    let restart = daemon.wait_for("the restart warning", |l| l["level"] == "WARN");
    assert_eq!(restart["settings"], "delivery.shutdown_timeout_seconds", "{restart}");
    // systemd heard RELOADING=1 (with the monotonic time) and then READY=1.
    let messages = notifications_until_ready(&socket).join("");
    let reloading = messages.find("RELOADING=1").unwrap_or_else(|| panic!("{messages:?}"));
    assert!(messages.contains("MONOTONIC_USEC="), "{messages:?}");
    assert!(reloading < messages.find("READY=1").unwrap(), "{messages:?}");

    assert_eq!(daemon.post("b-2", "b")["unmatched"], 0, "type b is routed now");
    assert_eq!(daemon.post("a-2", "a")["unmatched"], 0);
    let status = daemon.readyz_config();
    assert_eq!(status["source"], config.display().to_string());
    assert_eq!(status["watching"], false);
    assert_eq!(status["last_reload"]["result"], "ok", "{status}");
    assert_eq!(status["last_reload"]["trigger"], "signal", "{status}");
    assert_eq!(status["restart_required"], serde_json::json!(["delivery.shutdown_timeout_seconds"]));
    assert_eq!(daemon.metric("twinroute_config_reloads_total{result=\"ok\"}"), Some(1.0));
    assert_eq!(daemon.metric("twinroute_config_reloads_total{result=\"refused\"}"), Some(0.0));
    assert_eq!(daemon.metric("twinroute_config_last_reload_successful"), Some(1.0));
    daemon.stop();
    assert_eq!(ids(&out_a), ["a-1", "a-2"]);
    assert_eq!(ids(&out_b), ["b-2"]);
}

#[test]
fn a_change_of_the_watched_file_is_picked_up_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let (out_a, out_b) = (dir.path().join("a.ndjson"), dir.path().join("b.ndjson"));
    let config = dir.path().join("twinroute.toml");
    let watched = "[reload]\npoll_interval_ms = 100\n";
    std::fs::write(
        &config,
        config_text(
            dir.path(),
            &format!("{watched}{}{}", file_endpoint("file-a", &out_a), route("all", "file-a", "true")),
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, None);
    daemon.wait_for("the watch", |l| l["message"] == "watching the configuration file for changes");
    daemon.post("e-1", "t");

    // The route now leads to a new endpoint; the file is rewritten in place, as an editor does.
    std::fs::write(
        &config,
        config_text(
            dir.path(),
            &format!(
                "{watched}{}{}{}",
                file_endpoint("file-a", &out_a),
                file_endpoint("file-b", &out_b),
                route("all", "file-b", "true")
            ),
        ),
    )
    .unwrap();
    let reloaded = daemon.wait_for("the reload", |l| l["message"] == "configuration reloaded");
    assert_eq!(reloaded["trigger"], "file changed");
    assert_eq!(reloaded["endpoints"], "added file-b");
    assert_eq!(reloaded["routes"], "changed all");
    daemon.post("e-2", "t");
    assert_eq!(daemon.readyz_config()["last_reload"]["trigger"], "file_changed");
    assert_eq!(daemon.readyz_config()["watching"], true);
    let log = daemon.stop();
    assert_eq!(ids(&out_a), ["e-1"]);
    assert_eq!(ids(&out_b), ["e-2"]);
    let reloads = log.iter().filter(|l| l["message"] == "configuration reloaded").count();
    assert_eq!(reloads, 1, "one change, one reload");
}

#[test]
fn an_invalid_file_is_refused_and_the_old_configuration_keeps_delivering() {
    let dir = tempfile::tempdir().unwrap();
    let out_a = dir.path().join("a.ndjson");
    let config = dir.path().join("twinroute.toml");
    let good = format!(
        "[reload]\nwatch = false\n{}{}",
        file_endpoint("file-a", &out_a),
        route("all", "file-a", "true")
    );
    std::fs::write(&config, config_text(dir.path(), &good)).unwrap();
    let mut daemon = Daemon::start(&config, None);
    daemon.post("before", "t");

    // Three problems: an unknown key, a bad filter, a route to an endpoint that does not exist.
    let bad = format!(
        "{good}{}{}",
        route("broken", "file-a", "type = 'a' AND"),
        route("nowhere", "missing", "true")
    );
    std::fs::write(&config, format!("colour = \"blue\"\n{}", config_text(dir.path(), &bad))).unwrap();
    daemon.signal("-HUP");
    let refused = daemon.wait_for("the refusal", |l| l["level"] == "ERROR");
    assert_eq!(
        refused["message"], "configuration reload refused: the previous configuration stays in force",
        "{refused}"
    );
    assert_eq!(refused["trigger"], "SIGHUP");
    let error = refused["error"].as_str().unwrap();
    for problem in [
        "3 problems",
        "colour: unknown key",
        "routes.broken: filter:",
        "routes.nowhere.endpoint_name: no endpoint named \"missing\"",
    ] {
        assert!(error.contains(problem), "{problem:?} missing from {error}");
    }
    // The old routes still deliver.
    assert_eq!(daemon.post("during", "t")["unmatched"], 0);
    assert_eq!(daemon.metric("twinroute_config_reloads_total{result=\"refused\"}"), Some(1.0));
    assert_eq!(daemon.metric("twinroute_config_reloads_total{result=\"ok\"}"), Some(0.0));
    assert_eq!(daemon.metric("twinroute_config_last_reload_successful"), Some(0.0));
    let status = daemon.readyz_config();
    assert_eq!(status["last_reload"]["result"], "refused", "{status}");
    assert_eq!(status["last_reload"]["problems"].as_array().unwrap().len(), 3, "{status}");

    // Valid TOML that cannot be put in force (a File endpoint below a plain file, which cannot
    // be a directory) is refused too, with nothing changed.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "").unwrap();
    let unopenable = format!(
        "{good}{}{}",
        file_endpoint("file-x", &blocker.join("x.ndjson")),
        route("to-x", "file-x", "true")
    );
    std::fs::write(&config, config_text(dir.path(), &unopenable)).unwrap();
    daemon.signal("-HUP");
    let refused = daemon.wait_for("the second refusal", |l| l["level"] == "ERROR");
    assert!(refused["error"].as_str().unwrap().contains("file-x"), "{refused}");
    assert_eq!(daemon.metric("twinroute_config_reloads_total{result=\"refused\"}"), Some(2.0));

    // Fixed: applied, and the success gauges say so.
    std::fs::write(&config, config_text(dir.path(), &good)).unwrap();
    daemon.signal("-HUP");
    daemon.wait_for("the reload", |l| l["message"] == "configuration reloaded");
    assert_eq!(daemon.metric("twinroute_config_last_reload_successful"), Some(1.0));
    assert!(daemon.metric("twinroute_config_last_reload_success_timestamp_seconds").unwrap() > 1.7e9);
    daemon.post("after", "t");
    daemon.stop();
    assert_eq!(ids(&out_a), ["before", "during", "after"]);
}

/// A sink that holds every delivery until its gate opens, recording what it delivered.
struct GatedSink {
    /// The endpoint's `path`: which configuration this sink was built from.
    label: String,
    open: watch::Sender<bool>,
    attempts: watch::Sender<usize>,
    delivered: Mutex<Vec<String>>,
    count: watch::Sender<usize>,
}

impl GatedSink {
    async fn wait_delivered(&self, n: usize) {
        let _ = self.count.subscribe().wait_for(|&c| c >= n).await;
    }
    fn delivered(&self) -> Vec<String> {
        self.delivered.lock().unwrap().clone()
    }
}

#[async_trait]
impl Sink for GatedSink {
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        self.attempts.send_modify(|n| *n += 1);
        let _ = self.open.subscribe().wait_for(|&open| open).await;
        let mut delivered = self.delivered.lock().unwrap();
        delivered.extend(batch.iter().map(|e| e.event.id().to_owned()));
        self.count.send_replace(delivered.len());
        DeliveryOutcome::Delivered
    }
}

/// Builds a closed [`GatedSink`] for every endpoint configuration it is asked for.
#[derive(Default)]
struct GatedFactory {
    built: Mutex<Vec<Arc<GatedSink>>>,
    builds: AtomicUsize,
}

impl GatedFactory {
    fn sink(&self, label_ends_with: &str) -> Arc<GatedSink> {
        let built = self.built.lock().unwrap();
        let found = built.iter().find(|s| s.label.ends_with(label_ends_with)).cloned();
        found.unwrap_or_else(|| panic!("no sink built for {label_ends_with}"))
    }
}

#[async_trait]
impl SinkFactory for GatedFactory {
    fn supports(&self, _: &EndpointConfig) -> bool {
        true
    }
    async fn build(&self, endpoint: &EndpointConfig) -> Result<Arc<dyn Sink>, SinkBuildError> {
        self.builds.fetch_add(1, Ordering::Relaxed);
        let sink = Arc::new(GatedSink {
            label: endpoint.spec.path.clone().unwrap_or_default(),
            open: watch::Sender::new(false),
            attempts: watch::Sender::new(0),
            delivered: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
        });
        self.built.lock().unwrap().push(sink.clone());
        Ok(sink)
    }
}

/// The helpers' base configuration (state directory, so the disk spool) plus `extra`, on
/// ephemeral ports.
fn in_process_config(dir: &Path, extra: &str) -> Config {
    let env = HashMap::from([
        ("TWINROUTE_INGEST__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("TWINROUTE_ADMIN__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
    ]);
    Config::from_toml(&format!("{}\n{extra}", base_config(dir)), "test.toml", Some(env)).unwrap()
}

async fn post(client: &reqwest::Client, ingest: &str, id: &str) {
    let response = client
        .post(format!("{ingest}/events"))
        .header("content-type", "application/cloudevents+json")
        .body(serde_json::json!({"specversion": "1.0", "id": id, "type": "t", "source": "s"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_accepted_before_a_reload_are_delivered_with_the_old_endpoint_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = |path: &str| {
        format!(
            "[endpoints.out]\ntype = \"File\"\npath = \"{path}\"\n[routes.all]\nendpoint_name = \"out\"\n"
        )
    };
    let factory = Arc::new(GatedFactory::default());
    let config = in_process_config(dir.path(), &endpoint("/old/out.ndjson"));
    let running = Running::start(config, RunOptions { sinks: Some(factory.clone()), ..Default::default() })
        .await
        .unwrap();
    let ingest = format!("http://{}", running.ingest_addr.unwrap());
    let client = reqwest::Client::new();
    let old = factory.sink("/old/out.ndjson");
    let before: Vec<String> = (0..5).map(|i| format!("before-{i}")).collect();
    for id in &before {
        post(&client, &ingest, id).await;
    }
    // The old sink holds its first batch: events are in flight in it, others wait in its queue.
    let _ = old.attempts.subscribe().wait_for(|&n| n >= 1).await;

    // The endpoint changes (another path): a new sink and queue from now on.
    let outcome = running
        .reloader
        .apply(Ok(in_process_config(dir.path(), &endpoint("/new/out.ndjson"))), Trigger::Signal)
        .await;
    let ReloadOutcome::Applied { changes, .. } = outcome else { panic!("{outcome:?}") };
    assert_eq!(changes.endpoints.changed, ["out"]);
    let new = factory.sink("/new/out.ndjson");
    let after: Vec<String> = (0..5).map(|i| format!("after-{i}")).collect();
    for id in &after {
        post(&client, &ingest, id).await;
    }
    new.open.send_replace(true);
    new.wait_delivered(after.len()).await;
    assert_eq!(new.delivered(), after, "events accepted after the reload use the new configuration");
    assert!(old.delivered().is_empty(), "the old sink is still held, and nothing was moved off it");

    old.open.send_replace(true);
    old.wait_delivered(before.len()).await;
    assert_eq!(old.delivered(), before, "events accepted before the reload use the old configuration");
    let report = running.stop().await;
    assert!(report.undelivered.is_empty(), "{:?}", report.undelivered);
    assert_eq!(old.delivered().len() + new.delivered().len(), 10, "none lost, none twice");
    // hub-a and hub-b (unchanged) kept their sinks; `out` got one per configuration.
    assert_eq!(factory.builds.load(Ordering::Relaxed), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_wins_for_what_it_changes_and_api_changes_to_the_rest_stay() {
    let dir = tempfile::tempdir().unwrap();
    let file_routes = "[routes.from-file]\nendpoint_name = \"hub-a\"\nfilter = \"type = 'a'\"\n\
                       [routes.kept]\nendpoint_name = \"hub-a\"\nfilter = \"type = 'k'\"\n";
    let state_dir = dir.path().to_owned();
    let app = spawn_in(dir, file_routes, Default::default()).await;
    // Through the admin API: a new route, and both file routes replaced.
    for (id, filter) in
        [("from-api", "type = 'x'"), ("from-file", "type = 'api'"), ("kept", "type = 'api-kept'")]
    {
        assert_eq!(app.put_route(id, "hub-b", filter).await.status(), 204, "{id}");
    }
    let running = app.running.as_ref().unwrap();

    // The file changes `from-file` only: its version wins (with a warning); `kept` and
    // `from-api` keep the API's versions.
    let changed = "[routes.from-file]\nendpoint_name = \"hub-a\"\nfilter = \"type = 'file'\"\n\
                   [routes.kept]\nendpoint_name = \"hub-a\"\nfilter = \"type = 'k'\"\n";
    let outcome =
        running.reloader.apply(Ok(in_process_config(&state_dir, changed)), Trigger::FileChanged).await;
    let ReloadOutcome::Applied { changes, .. } = outcome else { panic!("{outcome:?}") };
    assert_eq!(changes.routes.changed, ["from-file"]);
    assert_eq!(changes.overridden.len(), 1, "{:?}", changes.overridden);
    assert!(changes.overridden[0].starts_with("route from-file: the configuration file changed it"));
    let route = |id: &str| {
        let body = running.control.clone();
        let id = id.to_owned();
        async move { body.route(&id).await.map(|r| (r.endpoint_name, r.filter.to_string())) }
    };
    assert_eq!(route("from-file").await, Some(("hub-a".into(), "type = 'file'".into())));
    assert_eq!(route("kept").await, Some(("hub-b".into(), "type = 'api-kept'".into())));
    assert_eq!(route("from-api").await, Some(("hub-b".into(), "type = 'x'".into())));
    // The state file lost the overridden change only, so a restart agrees.
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("control-plane.json")).unwrap()).unwrap();
    let stored_routes: Vec<&String> = stored["routes"].as_object().unwrap().keys().collect();
    assert_eq!(stored_routes, ["from-api", "kept"]);

    // A file that drops the endpoint an API-made route uses is refused, saying why.
    let without_hub_b =
        in_process_config(&state_dir, changed).endpoints.into_iter().filter(|(n, _)| n != "hub-b");
    let mut config = in_process_config(&state_dir, changed);
    config.endpoints = without_hub_b.collect();
    let outcome = running.reloader.apply(Ok(config), Trigger::Signal).await;
    let ReloadOutcome::Refused { problems } = outcome else { panic!("{outcome:?}") };
    assert!(
        problems.iter().any(|p| p.contains("routes.from-api: its endpoint \"hub-b\" does not exist")),
        "{problems:?}"
    );
    assert_eq!(route("from-api").await, Some(("hub-b".into(), "type = 'x'".into())), "nothing changed");
    let status = running.control.config_status();
    assert_eq!(status.last_reload.unwrap().result, "refused");
    app.stop().await;
}

#[tokio::test]
async fn new_delivery_defaults_replace_the_workers_of_the_endpoints_they_change() {
    use twinroute::delivery::Dispatcher;
    use twinroute::sinks::memory::MemorySinkFactory;
    let text = |delivery: &str| {
        format!(
            "[delivery]\n{delivery}\n[endpoints.plain]\ntype = \"Stdout\"\n\
             [endpoints.pinned]\ntype = \"Stdout\"\ndelivery = {{ max_attempts = 3 }}\n"
        )
    };
    let config = |delivery: &str| Config::from_toml(&text(delivery), "t", Some(HashMap::new())).unwrap();
    let first = config("max_attempts = 10");
    let dispatcher = Dispatcher::new(first.delivery.clone(), Arc::new(MemorySinkFactory::default()));
    dispatcher.apply(&first.endpoints, Vec::new()).await.unwrap();
    let worker = |name: &str| Arc::as_ptr(&dispatcher.snapshot().endpoints[name].stats);
    let (plain, pinned) = (worker("plain"), worker("pinned"));

    // The same defaults: nothing restarts.
    dispatcher.apply_with_defaults(&first.delivery, &first.endpoints, Vec::new()).await.unwrap();
    assert_eq!((worker("plain"), worker("pinned")), (plain, pinned));
    // Another default: the endpoint using it gets a new worker; the one overriding it does not.
    let second = config("max_attempts = 20\nqueue_capacity = 5");
    dispatcher.apply_with_defaults(&second.delivery, &second.endpoints, Vec::new()).await.unwrap();
    assert_ne!(worker("plain"), plain);
    assert_eq!(worker("pinned"), pinned);
    assert_eq!(dispatcher.defaults().max_attempts, 20);
    assert_eq!(dispatcher.defaults().queue_capacity, first.delivery.queue_capacity, "needs a restart");
    assert!(dispatcher.shutdown(Duration::from_secs(5)).await.is_empty());
}
