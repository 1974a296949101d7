//! Hot reload of the configuration file: on SIGHUP, and when the watched file's content changes.
//!
//! A reload reads the file, parses and checks it completely (the same checks as at start, with the
//! same environment overrides), then hands it to [`ControlPlane::reload`], which checks what it
//! would put in force (the file's endpoints and routes with the admin API's changes) and swaps it
//! in at once. Anything wrong, and nothing changes: the reload is refused, every problem is logged
//! in one error event, counted (`twinroute_config_reloads_total{result="refused"}`) and shown in
//! `/readyz`, and the previous configuration stays in force.
//!
//! What a reload changes live: routes, endpoints (with their `delivery` overrides), the
//! `[delivery]` retry and batching defaults, `admin.max_routes` / `admin.max_endpoints`,
//! `log.level` and `[reload]`. Everything else (listen addresses, `state_dir`, the spool, the
//! identity source, stand-ins, sources, queue sizes...) is read once at start: a reload that
//! changes one of them applies the rest and warns, naming each setting that waits for a restart
//! ([`restart_required`]).
//!
//! Events already accepted are delivered with the configuration they were accepted under: a
//! changed endpoint gets a new queue and worker, and the old worker drains its queue with the old
//! settings before it stops (see [`crate::delivery::Dispatcher::apply`]).

use crate::config::{text_digest, Config, ConfigError, ReloadConfig};
use crate::control::{ControlPlane, ReloadChanges};
use crate::systemd::Notifier;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// After the watcher first sees new content, it looks again this soon (at most one poll interval)
/// and reloads only if the content is the same: an editor's half-written file is not taken.
pub const SETTLE: Duration = Duration::from_millis(200);

/// What started a reload (a log field, and `trigger` in `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// SIGHUP (`systemctl reload`, `kill -HUP`).
    Signal,
    /// The watched file's content changed.
    FileChanged,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChanged => "file changed",
        }
    }
}

/// The last reload attempt, as `/readyz` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadAttempt {
    /// `ok` or `refused`, as the metric's label.
    pub result: &'static str,
    pub trigger: Trigger,
    /// When it happened (RFC 3339, UTC).
    pub at: String,
    /// Why it was refused (empty when applied).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Where the configuration in force came from and how its last reload went (`/readyz`'s
/// `config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigStatus {
    /// The configuration file, or the embedded default.
    pub source: String,
    /// Whether the file is watched for changes (SIGHUP reloads either way).
    pub watching: bool,
    /// When the configuration in force was loaded: the start, or the last applied reload.
    pub loaded_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<ReloadAttempt>,
    /// Settings the file changed that take effect only after a restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_required: Vec<String>,
}

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// In force now.
    Applied { changes: ReloadChanges, restart_required: Vec<String> },
    /// Nothing changed; every problem found.
    Refused { problems: Vec<String> },
    /// Running the embedded default configuration: there is no file to read again.
    NoFile,
}

/// The settings a reload cannot change, by key, as JSON (only their keys are ever shown).
fn restart_only(config: &Config) -> serde_json::Value {
    let d = &config.delivery;
    let mut value = serde_json::json!({
        "state_dir": config.state_dir,
        "spool": config.spool,
        "ingest": config.ingest,
        "admin": config.admin,
        "log": config.log,
        "identity": config.identity,
        "standins": config.standins,
        "sources": config.sources,
        "runtime": config.runtime,
        "delivery": {
            "queue_capacity": d.queue_capacity,
            "max_queued_bytes": d.max_queued_bytes,
            "shutdown_timeout_seconds": d.shutdown_timeout_seconds,
        },
    });
    // Live: applied by a reload.
    for (section, key) in [("admin", "max_routes"), ("admin", "max_endpoints"), ("log", "level")] {
        if let Some(object) = value.get_mut(section).and_then(|s| s.as_object_mut()) {
            object.remove(key);
        }
    }
    value
}

/// Every key under `prefix` whose value differs between `a` and `b`, down to the leaves.
fn changed_keys(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            let null = serde_json::Value::Null;
            for key in keys {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                changed_keys(&path, a.get(key).unwrap_or(&null), b.get(key).unwrap_or(&null), out);
            }
        }
        (a, b) if a != b => out.push(prefix.to_owned()),
        _ => {}
    }
}

/// The settings that differ between the configuration the process started with and `new` but
/// take effect only at a restart (e.g. `ingest.listen`, `state_dir`), by key.
pub fn restart_required(started: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    changed_keys("", &restart_only(started), &restart_only(new), &mut keys);
    keys
}

/// What the watcher makes of one reading of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The content is the one last loaded (applied or refused).
    Unchanged,
    /// New content, seen once: look again after [`SETTLE`].
    Settling,
    /// New content, the same twice in a row: reload it.
    Changed,
}

/// Decides, reading after reading, when the file changed for good.
#[derive(Debug, Clone)]
pub struct ChangeDetector {
    /// Digest of the content last loaded (applied or refused): not tried again until it changes.
    seen: u64,
    /// New content seen once and waiting for a second look.
    candidate: Option<u64>,
}

impl ChangeDetector {
    pub fn new(seen: u64) -> Self {
        Self { seen, candidate: None }
    }

    /// One reading of the file, by digest.
    pub fn observe(&mut self, digest: u64) -> Observation {
        if digest == self.seen {
            self.candidate = None;
            Observation::Unchanged
        } else if self.candidate == Some(digest) {
            Observation::Changed
        } else {
            self.candidate = Some(digest);
            Observation::Settling
        }
    }

    /// Content with this digest was loaded (by the watcher or by SIGHUP).
    pub fn loaded(&mut self, digest: u64) {
        self.seen = digest;
        self.candidate = None;
    }

    /// New content was seen once and waits for a second look.
    pub fn is_settling(&self) -> bool {
        self.candidate.is_some()
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| now.to_string())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Reloads the configuration into a running daemon; one reload at a time.
pub struct Reloader {
    /// The file to read again; `None` for the embedded default (never reloaded).
    path: Option<PathBuf>,
    /// The configuration the process started with: restart-only settings are compared with it,
    /// so one that changed keeps being reported until the restart.
    started: Config,
    control: Arc<ControlPlane>,
    /// The `[reload]` and `log.level` in force (a reload changes them).
    live: Mutex<(ReloadConfig, String)>,
    /// Reloads one at a time (SIGHUP and the watcher, or callers embedding the daemon).
    serial: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// For a daemon started with `config`, read from `path` (`None`: the embedded default).
    pub fn new(config: &Config, path: Option<PathBuf>, control: Arc<ControlPlane>) -> Self {
        for result in ["ok", "refused"] {
            metrics::counter!("twinroute_config_reloads_total", "result" => result).increment(0);
        }
        metrics::gauge!("twinroute_config_last_reload_successful").set(1.0);
        metrics::gauge!("twinroute_config_last_reload_success_timestamp_seconds").set(unix_now());
        let watching = path.is_some() && config.reload.watch;
        control.update_config_status(|s| {
            *s = ConfigStatus {
                source: config.origin.clone(),
                watching,
                loaded_at: now_rfc3339(),
                last_reload: None,
                restart_required: Vec::new(),
            }
        });
        Self {
            path,
            started: config.clone(),
            control,
            live: Mutex::new((config.reload.clone(), config.log.level.clone())),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    /// The file reloads read, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The digest of the text the daemon started with.
    pub fn started_digest(&self) -> u64 {
        self.started.digest
    }

    /// How often to read the file, when it is watched.
    pub fn poll_interval(&self) -> Option<Duration> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        (self.path.is_some() && live.0.watch).then(|| Duration::from_millis(live.0.poll_interval_ms))
    }

    /// Reads the file again and applies it. Returns the digest of the text read (when it could
    /// be read) with the outcome.
    pub async fn reload(&self, trigger: Trigger) -> (Option<u64>, ReloadOutcome) {
        let Some(path) = &self.path else {
            tracing::info!(
                trigger = trigger.as_str(),
                "running the embedded default configuration: there is no file to reload"
            );
            return (None, ReloadOutcome::NoFile);
        };
        match tokio::fs::read_to_string(path).await {
            Ok(text) => {
                let digest = text_digest(&text);
                (Some(digest), self.reload_text(&text, trigger).await)
            }
            Err(e) => {
                let origin = path.display().to_string();
                let error = ConfigError { origin, problems: vec![format!("cannot read the file: {e}")] };
                (None, self.apply(Err(error), trigger).await)
            }
        }
    }

    /// Applies the file's text as already read (the watcher applies exactly the text it saw
    /// settle, not a third reading).
    async fn reload_text(&self, text: &str, trigger: Trigger) -> ReloadOutcome {
        let origin = self.path.as_ref().map_or_else(String::new, |p| p.display().to_string());
        self.apply(Config::from_toml(text, &origin, None), trigger).await
    }

    /// Applies a configuration parsed (or refused) by the caller: the whole of a reload after the
    /// file is read. Logs, counts and records the outcome.
    pub async fn apply(&self, loaded: Result<Config, ConfigError>, trigger: Trigger) -> ReloadOutcome {
        let _one_at_a_time = self.serial.lock().await;
        let config = match loaded {
            Ok(c) => c,
            Err(e) => return self.refused(trigger, e),
        };
        let changes = match self.control.reload(&config).await {
            Ok(c) => c,
            Err(problems) => {
                return self.refused(trigger, ConfigError { origin: config.origin.clone(), problems })
            }
        };
        let restart = restart_required(&self.started, &config);
        let level_changed = {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.0 = config.reload.clone();
            let changed = live.1 != config.log.level;
            live.1 = config.log.level.clone();
            changed
        };
        // Counted and recorded before it is logged: whoever reads the log line finds both.
        metrics::counter!("twinroute_config_reloads_total", "result" => "ok").increment(1);
        metrics::gauge!("twinroute_config_last_reload_successful").set(1.0);
        metrics::gauge!("twinroute_config_last_reload_success_timestamp_seconds").set(unix_now());
        let watching = self.poll_interval().is_some();
        self.control.update_config_status(|s| {
            let at = now_rfc3339();
            s.watching = watching;
            s.loaded_at = at.clone();
            s.last_reload = Some(ReloadAttempt { result: "ok", trigger, at, problems: Vec::new() });
            s.restart_required = restart.clone();
        });
        tracing::info!(
            trigger = trigger.as_str(),
            config = %config.origin,
            endpoints = %changes.endpoints,
            routes = %changes.routes,
            "configuration reloaded"
        );
        for message in &changes.overridden {
            tracing::warn!(
                trigger = trigger.as_str(),
                change = %message,
                "the configuration file overrides a change made through the admin API"
            );
        }
        if !restart.is_empty() {
            tracing::warn!(
                settings = %restart.join(", "),
                "the reloaded configuration changes settings that take effect only after a restart; \
                 they keep their previous values until then"
            );
        }
        if level_changed {
            match crate::telemetry::set_log_level(&config.log.level) {
                Ok(true) => tracing::info!(level = %config.log.level, "log level changed"),
                Ok(false) => tracing::info!(
                    "log.level changed, but the log filter is not the configuration's (RUST_LOG is set): unchanged"
                ),
                Err(e) => tracing::warn!(error = %e, "log.level could not be applied"),
            }
        }
        ReloadOutcome::Applied { changes, restart_required: restart }
    }

    fn refused(&self, trigger: Trigger, error: ConfigError) -> ReloadOutcome {
        // Counted and recorded before it is logged: whoever reads the log line finds both.
        metrics::counter!("twinroute_config_reloads_total", "result" => "refused").increment(1);
        metrics::gauge!("twinroute_config_last_reload_successful").set(0.0);
        self.control.update_config_status(|s| {
            s.last_reload = Some(ReloadAttempt {
                result: "refused",
                trigger,
                at: now_rfc3339(),
                problems: error.problems.clone(),
            });
        });
        tracing::error!(
            trigger = trigger.as_str(),
            error = %error,
            "configuration reload refused: the previous configuration stays in force"
        );
        ReloadOutcome::Refused { problems: error.problems }
    }
}

/// One systemd status line for an outcome.
fn status_line(outcome: &ReloadOutcome) -> String {
    match outcome {
        ReloadOutcome::Applied { changes, restart_required } if restart_required.is_empty() => {
            format!("reloaded: endpoints {}; routes {}", changes.endpoints, changes.routes)
        }
        ReloadOutcome::Applied { restart_required, .. } => {
            format!("reloaded; a restart is needed for {}", restart_required.join(", "))
        }
        ReloadOutcome::Refused { problems } => format!(
            "reload refused ({} problem{}): the previous configuration stays in force",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        ),
        ReloadOutcome::NoFile => "running the embedded default: nothing to reload".to_owned(),
    }
}

/// Starts reloading on SIGHUP and, when `[reload] watch` says so, on changes of the file. The
/// SIGHUP handler is installed before this returns (so a SIGHUP no longer ends the process);
/// systemd hears `RELOADING=1` when a reload begins and `READY=1` when it is over. Runs until
/// aborted.
pub fn spawn(reloader: Arc<Reloader>, notifier: Arc<Notifier>) -> JoinHandle<()> {
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot catch SIGHUP: the configuration reloads only when the file changes");
            None
        }
    };
    tokio::spawn(serve(reloader, notifier, hangups))
}

async fn serve(
    reloader: Arc<Reloader>,
    notifier: Arc<Notifier>,
    mut hangups: Option<tokio::signal::unix::Signal>,
) {
    let mut detector = ChangeDetector::new(reloader.started_digest());
    // The last error reading the watched file, logged once until it changes.
    let mut read_error: Option<String> = None;
    if let (Some(path), Some(every)) = (reloader.path(), reloader.poll_interval()) {
        tracing::info!(path = %path.display(), poll_interval_ms = every.as_millis() as u64, "watching the configuration file for changes");
    }
    loop {
        let poll = reloader.poll_interval();
        let wait = match poll {
            Some(every) if detector.is_settling() => SETTLE.min(every),
            Some(every) => every,
            // Not watched: the timer branch is disabled, this is never waited for.
            None => Duration::from_secs(3600),
        };
        let hangup = async {
            match hangups.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        let trigger = tokio::select! {
            received = hangup => received.map(|()| Trigger::Signal),
            () = tokio::time::sleep(wait), if poll.is_some() => Some(Trigger::FileChanged),
        };
        let Some(trigger) = trigger else {
            // The signal stream ended (the runtime is going away): no more SIGHUPs to wait for.
            hangups = None;
            continue;
        };
        // The text the watcher saw settle; a SIGHUP reads the file itself.
        let mut settled = None;
        if trigger == Trigger::FileChanged {
            let Some(path) = reloader.path() else { continue };
            match tokio::fs::read_to_string(path).await {
                Ok(text) => {
                    if read_error.take().is_some() {
                        tracing::info!(path = %path.display(), "the configuration file can be read again");
                    }
                    let digest = text_digest(&text);
                    match detector.observe(digest) {
                        Observation::Unchanged | Observation::Settling => continue,
                        Observation::Changed => settled = Some((digest, text)),
                    }
                }
                Err(e) => {
                    // Likely mid-replacement (an editor or a ConfigMap update): keep the
                    // configuration in force and look again; a SIGHUP reports it as a refusal.
                    let message = e.to_string();
                    if read_error.as_deref() != Some(message.as_str()) {
                        tracing::warn!(path = %path.display(), error = %message, "cannot read the watched configuration file; the configuration in force stays");
                        read_error = Some(message);
                    }
                    continue;
                }
            }
        } else {
            tracing::info!("SIGHUP received: reloading the configuration");
        }
        notifier.reloading("reloading the configuration");
        let (digest, outcome) = match settled {
            Some((digest, text)) => (Some(digest), reloader.reload_text(&text, trigger).await),
            None => reloader.reload(trigger).await,
        };
        if let Some(digest) = digest {
            detector.loaded(digest);
        }
        notifier.ready(&status_line(&outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(text: &str) -> Config {
        Config::from_toml(text, "test.toml", Some(HashMap::new())).unwrap()
    }

    #[test]
    fn the_reload_section_is_checked_strictly_with_documented_defaults() {
        let c = config("");
        assert_eq!(c.reload, ReloadConfig { watch: true, poll_interval_ms: 1000 });
        let c = config("[reload]\nwatch = false\npoll_interval_ms = 250\n");
        assert_eq!(c.reload, ReloadConfig { watch: false, poll_interval_ms: 250 });
        let err =
            Config::from_toml("[reload]\npoll_interval_ms = 5\nwatched = true\n", "t", Some(HashMap::new()))
                .unwrap_err()
                .to_string();
        assert!(err.contains("reload.poll_interval_ms: 5 is too short"), "{err}");
        assert!(err.contains("reload.watched: unknown key"), "{err}");
        let env = HashMap::from([("TWINROUTE_RELOAD__WATCH".to_owned(), "false".to_owned())]);
        assert!(!Config::from_toml("", "t", Some(env)).unwrap().reload.watch, "environment override");
    }

    #[test]
    fn the_digest_follows_the_text() {
        let a = config("[endpoints.out]\ntype = 'Stdout'\n");
        let b = config("[endpoints.out]\ntype = 'Stdout'\n");
        let c = config("[endpoints.out]\ntype = \"Stdout\"\n");
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        assert_eq!(a.digest, text_digest("[endpoints.out]\ntype = 'Stdout'\n"));
    }

    #[test]
    fn restart_only_settings_are_named_and_live_ones_are_not() {
        let started = config(
            "[ingest]\nlisten = '127.0.0.1:8080'\n[admin]\nmax_routes = 10\n[log]\nlevel = 'info'\n\
             [endpoints.out]\ntype = 'Stdout'\n",
        );
        let live = config(
            "[ingest]\nlisten = '127.0.0.1:8080'\n[admin]\nmax_routes = 20\n[log]\nlevel = 'debug'\n\
             [delivery]\nmax_attempts = 3\nlinger_ms = 5\n[reload]\nwatch = false\n\
             [endpoints.out]\ntype = 'Stdout'\n[endpoints.more]\ntype = 'Stdout'\n\
             [routes.all]\nendpoint_name = 'more'\n",
        );
        assert_eq!(restart_required(&started, &live), Vec::<String>::new());
        let restart = config(
            "state_dir = '/var/lib/x'\n[ingest]\nlisten = '127.0.0.1:9090'\nmax_batch_events = 5\n\
             [admin]\nlisten = '127.0.0.1:9091'\n[log]\nformat = 'json'\n\
             [delivery]\nqueue_capacity = 7\n[standins]\nimds_listen = '127.0.0.1:4000'\n\
             [identity]\nsource = 'workload_identity'\n[sources.demo]\ntype = 'sample'\n",
        );
        assert_eq!(
            restart_required(&started, &restart),
            [
                "admin.listen",
                "delivery.queue_capacity",
                "identity.source",
                "ingest.listen",
                "ingest.max_batch_events",
                "log.format",
                "sources.demo",
                "standins.imds_listen",
                "state_dir",
            ]
        );
    }

    #[test]
    fn a_change_is_taken_once_it_reads_the_same_twice() {
        let mut d = ChangeDetector::new(1);
        assert_eq!(d.observe(1), Observation::Unchanged);
        // Half-written, then complete: each new content gets a second look first.
        assert_eq!(d.observe(2), Observation::Settling);
        assert_eq!(d.observe(3), Observation::Settling);
        assert_eq!(d.observe(3), Observation::Changed);
        d.loaded(3);
        assert_eq!(d.observe(3), Observation::Unchanged, "loaded content is not tried again");
        // Changed and changed back before the second look: nothing to do.
        assert_eq!(d.observe(4), Observation::Settling);
        assert_eq!(d.observe(3), Observation::Unchanged);
        assert_eq!(d.observe(4), Observation::Settling, "a fresh first sight");
        // SIGHUP loaded something else meanwhile.
        d.loaded(5);
        assert_eq!(d.observe(5), Observation::Unchanged);
    }

    #[test]
    fn status_lines_are_short_and_say_what_happened() {
        let refused = ReloadOutcome::Refused { problems: vec!["a".into(), "b".into()] };
        assert_eq!(
            status_line(&refused),
            "reload refused (2 problems): the previous configuration stays in force"
        );
        let mut changes = ReloadChanges::default();
        changes.routes.added.push("r1".into());
        let applied = ReloadOutcome::Applied { changes, restart_required: vec![] };
        assert_eq!(status_line(&applied), "reloaded: endpoints unchanged; routes added r1");
    }
}
