//! Configuration: a TOML file (or the embedded local default) with environment overrides, checked
//! strictly. Unknown keys are errors, and every problem in the file is reported at once so a user
//! fixes them in one pass; `twinroute` then exits with status 78 (`EX_CONFIG`).
//!
//! Environment overrides use the prefix `TWINROUTE_` and `__` between levels, e.g.
//! `TWINROUTE_INGEST__LISTEN=0.0.0.0:8080` or `TWINROUTE_LOG__FORMAT=json`.

mod connection_string;
mod endpoint;
mod listen;
mod secret;

pub use connection_string::ConnectionString;
pub use endpoint::{
    validate_endpoint_name, AuthenticationType, BlobFormat, DeadLetter, EndpointConfig, EndpointSpec,
    EndpointTarget, EndpointType, EventGridSchema, Identity, IdentitySpec, Partitioning, ServiceBusEntity,
    SessionIdFrom,
};
pub use listen::{
    deserialize_token, token_problem, ListenAddr, ListenerSettings, ListenerView, SocketMode, TlsFiles,
    TokenSource, DEFAULT_BODY_READ_TIMEOUT_SECONDS, DEFAULT_HEADER_READ_TIMEOUT_SECONDS,
    DEFAULT_IDLE_TIMEOUT_SECONDS, DEFAULT_SOCKET_MODE,
};
pub use secret::Secret;

use crate::filter::Filter;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration `twinroute run` uses when given none: the local demo (sample events routed
/// to stdout and a file). Also what `config/local.toml` in the repository holds.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/local.toml");

/// Exit status for configuration errors (`EX_CONFIG` from sysexits.h), which systemd and
/// supervisors recognise as "do not restart in a loop".
pub const EXIT_CONFIG: i32 = 78;

/// Ingest listens on loopback unless told otherwise: exposing it is a deliberate choice.
pub const DEFAULT_INGEST_LISTEN: &str = "127.0.0.1:8080";
/// The admin API (routes, endpoints, metrics, health) is on its own port, loopback by default.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
/// Largest HTTP request body ingest reads: 4 MiB, room for a batch of many ADT-sized events.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Largest single event: 1 MiB, the Event Hubs (standard tier) and Event Grid per-event limit, so
/// an accepted event can be delivered anywhere.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Most events in one batch request.
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 1000;
/// Events each endpoint's queue holds before ingest pushes back with 503.
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;
/// The `Retry-After` ingest sends with a 503.
pub const DEFAULT_RETRY_AFTER_SECONDS: u64 = 1;
/// How long a shutdown waits for queues to drain before giving up and reporting what is left.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: u64 = 30;
/// Route and endpoint caps (ADT allows 6 of each; twinroute is not so tight, but still bounded).
pub const DEFAULT_MAX_ROUTES: usize = 1000;
pub const DEFAULT_MAX_ENDPOINTS: usize = 100;

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the configuration came from (a path, or "embedded default").
    pub origin: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "configuration {} has {n} problem{}:", self.origin, if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// `[ingest]`: the HTTP intake.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct IngestConfig {
    /// `address:port` or `unix:<path>`.
    pub listen: String,
    pub max_request_bytes: usize,
    pub max_event_bytes: usize,
    pub max_batch_events: usize,
    pub retry_after_seconds: u64,
    /// The bearer token producers must send (`TWINROUTE_INGEST__TOKEN`); see [`listen`].
    #[serde(deserialize_with = "deserialize_token", skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A file holding the token, re-read when it changes.
    pub token_file: Option<PathBuf>,
    /// Beyond loopback without a token: only with this set, deliberately.
    pub allow_unauthenticated: bool,
    /// TLS: the certificate chain and private key (PEM).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// A Unix socket's permission bits (`"0660"` by default).
    pub socket_mode: Option<SocketMode>,
    /// Time allowed for a request's headers (and a TLS handshake), between requests of a
    /// kept-alive connection, and for a request's body.
    pub header_read_timeout_seconds: u64,
    pub idle_timeout_seconds: u64,
    pub body_read_timeout_seconds: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_INGEST_LISTEN.into(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
            retry_after_seconds: DEFAULT_RETRY_AFTER_SECONDS,
            token: None,
            token_file: None,
            allow_unauthenticated: false,
            tls_cert_file: None,
            tls_key_file: None,
            socket_mode: None,
            header_read_timeout_seconds: DEFAULT_HEADER_READ_TIMEOUT_SECONDS,
            idle_timeout_seconds: DEFAULT_IDLE_TIMEOUT_SECONDS,
            body_read_timeout_seconds: DEFAULT_BODY_READ_TIMEOUT_SECONDS,
        }
    }
}

/// `[admin]`: the control plane and observability API.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct AdminConfig {
    /// `address:port` or `unix:<path>`.
    pub listen: String,
    pub max_routes: usize,
    pub max_endpoints: usize,
    /// The bearer token operators must send (`TWINROUTE_ADMIN__TOKEN`); see [`listen`].
    #[serde(deserialize_with = "deserialize_token", skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A file holding the token, re-read when it changes.
    pub token_file: Option<PathBuf>,
    /// Beyond loopback without a token: only with this set, deliberately.
    pub allow_unauthenticated: bool,
    /// `/metrics` without the token (for scrapers that cannot send one); `/healthz` and
    /// `/readyz` are always open to probes.
    pub metrics_unauthenticated: bool,
    /// TLS: the certificate chain and private key (PEM).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// A Unix socket's permission bits (`"0660"` by default).
    pub socket_mode: Option<SocketMode>,
    /// Time allowed for a request's headers (and a TLS handshake), between requests of a
    /// kept-alive connection, and for a request's body.
    pub header_read_timeout_seconds: u64,
    pub idle_timeout_seconds: u64,
    pub body_read_timeout_seconds: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN.into(),
            max_routes: DEFAULT_MAX_ROUTES,
            max_endpoints: DEFAULT_MAX_ENDPOINTS,
            token: None,
            token_file: None,
            allow_unauthenticated: false,
            metrics_unauthenticated: false,
            tls_cert_file: None,
            tls_key_file: None,
            socket_mode: None,
            header_read_timeout_seconds: DEFAULT_HEADER_READ_TIMEOUT_SECONDS,
            idle_timeout_seconds: DEFAULT_IDLE_TIMEOUT_SECONDS,
            body_read_timeout_seconds: DEFAULT_BODY_READ_TIMEOUT_SECONDS,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event (the default on a terminal).
    #[default]
    Human,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Where accepted events wait for delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolMode {
    /// In memory: fast, lost if the process dies.
    Memory,
    /// On disk, synced before ingest answers 202: survives a crash.
    Disk,
}

pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Under load, how long the spool's writer gathers requests into one write and sync.
pub const DEFAULT_SPOOL_COMMIT_INTERVAL_MS: u64 = 3;
/// Memory the disk spool's storage engine may hold for recent events (its memtable): 4 MiB.
/// Smaller saves memory but flushes more often, and the flushes delay synced writes: at 1,000
/// events/s 3 MiB saved ~3 MB of resident memory for +2.5 to +5 ms of end-to-end p99 and ~10 %
/// more CPU, and 15 % less throughput at full speed (benches/RESULTS.md).
pub const DEFAULT_SPOOL_MEMORY_BYTES: u64 = 4 * 1024 * 1024;

/// `[spool]` (or `spool = "memory" | "disk"`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct SpoolConfig {
    /// `None`: on disk when there is a state directory, in memory otherwise.
    pub mode: Option<SpoolMode>,
    /// The spool's directory; `<state_dir>/spool` by default.
    pub path: Option<PathBuf>,
    /// Most bytes of events held on disk; beyond it ingest answers 503.
    pub max_bytes: u64,
    /// Under load (requests queueing), how long the writer may wait to gather more submissions
    /// into one write and sync (0: never wait). A request arriving alone is written at once.
    pub commit_interval_ms: u64,
    /// Bytes of recent events the disk spool keeps in memory before writing them out (its
    /// memtable; about twice this while one is written out). More: fewer, larger writes under
    /// heavy load, at the cost of resident memory.
    pub memory_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            mode: None,
            path: None,
            max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            commit_interval_ms: DEFAULT_SPOOL_COMMIT_INTERVAL_MS,
            memory_bytes: DEFAULT_SPOOL_MEMORY_BYTES,
        }
    }
}

/// The spool a configuration asks for, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolChoice {
    Memory,
    Disk { path: PathBuf, max_bytes: u64, commit_interval: Duration, memory_bytes: u64 },
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `twinroute=debug,info`); `RUST_LOG` overrides it.
    pub level: String,
    /// Every this many seconds, one line per endpoint that delivered or is failing (0: never).
    pub summary_interval_seconds: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Human, level: "info".into(), summary_interval_seconds: 10 }
    }
}

/// The retry schedule modelled on Event Grid's: about 10 s, 30 s, 1 min, 5 min, 10 min, 30 min,
/// 1 h, 3 h, 6 h, then every 12 h (the last step repeats).
pub const DEFAULT_RETRY_SCHEDULE_SECONDS: [u64; 10] = [10, 30, 60, 300, 600, 1800, 3600, 10800, 21600, 43200];
/// Event Grid's defaults: 30 attempts, 24 h time-to-live, whichever comes first.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 30;
pub const DEFAULT_TTL_SECONDS: u64 = 24 * 3600;
/// Each wait is moved by up to ±20 % at random so retries of many events do not arrive together.
pub const DEFAULT_JITTER: f64 = 0.2;
/// Bytes of events held for delivery (all endpoints) before ingest answers 503: 256 MiB.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 256 * 1024 * 1024;
/// A delivery batch holds at most this many events and bytes.
pub const DEFAULT_BATCH_MAX_EVENTS: usize = 1000;
pub const DEFAULT_BATCH_MAX_BYTES: usize = 1024 * 1024;
/// After the first event of a batch, wait this long for more before sending. 0 (the default):
/// send at once, a batch being whatever is waiting then (under load, batches fill by themselves).
pub const DEFAULT_LINGER_MS: u64 = 0;

/// Retry and batching settings; `[delivery]` sets the defaults, an endpoint's `delivery = {..}`
/// overrides any of them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeliveryOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_schedule_seconds: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_max_events: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_max_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linger_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

/// `[delivery]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct DeliveryConfig {
    pub queue_capacity: usize,
    pub max_queued_bytes: usize,
    pub shutdown_timeout_seconds: u64,
    pub max_attempts: u32,
    pub ttl_seconds: u64,
    pub retry_schedule_seconds: Vec<u64>,
    pub jitter: f64,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub linger_ms: u64,
    /// Batches delivered at once per endpoint. 1 (the default) keeps each endpoint's events in
    /// order; more raises throughput to slow destinations at the cost of order.
    pub concurrency: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            shutdown_timeout_seconds: DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            ttl_seconds: DEFAULT_TTL_SECONDS,
            retry_schedule_seconds: DEFAULT_RETRY_SCHEDULE_SECONDS.to_vec(),
            jitter: DEFAULT_JITTER,
            batch_max_events: DEFAULT_BATCH_MAX_EVENTS,
            batch_max_bytes: DEFAULT_BATCH_MAX_BYTES,
            linger_ms: DEFAULT_LINGER_MS,
            concurrency: 1,
        }
    }
}

impl DeliveryConfig {
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_seconds)
    }

    /// These settings with an endpoint's overrides applied.
    pub fn with(&self, o: Option<&DeliveryOverrides>) -> DeliveryConfig {
        let Some(o) = o else { return self.clone() };
        DeliveryConfig {
            max_attempts: o.max_attempts.unwrap_or(self.max_attempts),
            ttl_seconds: o.ttl_seconds.unwrap_or(self.ttl_seconds),
            retry_schedule_seconds: o
                .retry_schedule_seconds
                .clone()
                .unwrap_or_else(|| self.retry_schedule_seconds.clone()),
            jitter: o.jitter.unwrap_or(self.jitter),
            batch_max_events: o.batch_max_events.unwrap_or(self.batch_max_events),
            batch_max_bytes: o.batch_max_bytes.unwrap_or(self.batch_max_bytes),
            linger_ms: o.linger_ms.unwrap_or(self.linger_ms),
            concurrency: o.concurrency.unwrap_or(self.concurrency),
            ..self.clone()
        }
    }

    /// Every problem with these settings, each naming its key under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_attempts == 0 {
            p.push(format!("{prefix}.max_attempts: must be at least 1"));
        }
        if self.ttl_seconds == 0 {
            p.push(format!("{prefix}.ttl_seconds: must be positive"));
        }
        if self.retry_schedule_seconds.is_empty() || self.retry_schedule_seconds.contains(&0) {
            p.push(format!("{prefix}.retry_schedule_seconds: must list positive waits, e.g. [10, 30, 60]"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            p.push(format!("{prefix}.jitter: must be between 0 and 1"));
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            p.push(format!("{prefix}.concurrency: must be between 1 and 64"));
        }
        if self.batch_max_events == 0 || self.batch_max_bytes == 0 {
            p.push(format!("{prefix}: batch_max_events and batch_max_bytes must be positive"));
        }
        p
    }
}

/// Where managed-identity tokens come from on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySourceKind {
    /// The Instance Metadata Service of Azure VMs and scale sets (the default).
    #[default]
    Imds,
    /// AKS workload identity: a federated service-account token exchanged with Entra ID.
    WorkloadIdentity,
    /// App Service and Container Apps (`IDENTITY_ENDPOINT` and `IDENTITY_HEADER`).
    AppService,
    /// Azure Arc-enabled servers (the local agent's challenge-protected endpoint).
    AzureArc,
    /// An app registration's client secret: for development only.
    ClientSecret,
}

impl IdentitySourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySourceKind::Imds => "imds",
            IdentitySourceKind::WorkloadIdentity => "workload_identity",
            IdentitySourceKind::AppService => "app_service",
            IdentitySourceKind::AzureArc => "azure_arc",
            IdentitySourceKind::ClientSecret => "client_secret",
        }
    }
}

/// `[identity]`: how identity-based endpoints get their tokens.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct IdentityConfig {
    pub source: IdentitySourceKind,
    /// The IMDS token endpoint; the documented Azure address by default. Point it at a local
    /// stand-in for tests and demos.
    pub imds_endpoint: String,
    /// How long one token request may take.
    pub request_timeout_seconds: u64,
    /// `workload_identity` / `client_secret`: the Entra tenant (default `AZURE_TENANT_ID`).
    pub tenant_id: Option<String>,
    /// `workload_identity` / `client_secret`: the application (default `AZURE_CLIENT_ID`).
    pub client_id: Option<String>,
    /// `client_secret`: the secret.
    pub client_secret: Option<Secret>,
    /// `workload_identity`: the projected token (default `AZURE_FEDERATED_TOKEN_FILE`).
    pub federated_token_file: Option<String>,
    /// `azure_arc`: where the agent writes challenge keys.
    pub arc_key_directory: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            source: IdentitySourceKind::Imds,
            imds_endpoint: crate::identity::DEFAULT_IMDS_ENDPOINT.to_owned(),
            request_timeout_seconds: crate::identity::imds::DEFAULT_REQUEST_TIMEOUT.as_secs(),
            tenant_id: None,
            client_id: None,
            client_secret: None,
            federated_token_file: None,
            arc_key_directory: crate::identity::sources::ARC_KEY_DIRECTORY.to_owned(),
        }
    }
}

/// `[standins]`: local stand-ins for Azure services started inside the daemon, so the demo and
/// development setups need no Azure account. Each is started when its address is set; point
/// `identity.imds_endpoint` and endpoints' `custom_endpoint` at them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct StandinsConfig {
    /// The IMDS stand-in's address (e.g. `127.0.0.1:40342`).
    pub imds_listen: Option<String>,
    /// The Event Hubs / Service Bus AMQP stand-in's address (e.g. `127.0.0.1:5672`).
    pub amqp_listen: Option<String>,
}

/// How often a watched configuration file is read for changes: an edit takes effect within about
/// a second, and reading a file of a few kilobytes once a second costs nothing.
pub const DEFAULT_RELOAD_POLL_INTERVAL_MS: u64 = 1000;
/// The shortest poll interval accepted: faster polling buys nothing an operator would notice.
pub const MIN_RELOAD_POLL_INTERVAL_MS: u64 = 100;

/// Most threads `runtime.worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 256;

/// `[runtime]`: how many threads run ingest, routing and delivery.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct RuntimeConfig {
    /// 1 (the default): one thread runs everything (HTTP ingest, routing, delivery and the AMQP
    /// connections), with no hand-offs between threads: the least CPU per event, and on a
    /// two-core machine as fast as several threads. More: a multi-threaded runtime with this
    /// many workers, plus one thread for every AMQP connection; 0: one worker per core. (The
    /// disk spool's writer and the blocking file work have threads of their own either way.)
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { worker_threads: 1 }
    }
}

/// `[reload]`: hot reload of the configuration file (see `crate::reload`). SIGHUP reloads
/// whatever these say; they only decide whether the file is also watched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct ReloadConfig {
    /// Reload when the file's content changes. Only a configuration read from a file is
    /// watched, never the embedded default.
    pub watch: bool,
    /// How often the file is read and compared with the configuration in force.
    pub poll_interval_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self { watch: true, poll_interval_ms: DEFAULT_RELOAD_POLL_INTERVAL_MS }
    }
}

/// A route as written in `[routes.<id>]`, or sent to `PUT /eventroutes/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub endpoint_name: String,
    /// The filter; `true` (every event) when absent, as `az dt route create` does.
    #[serde(default = "default_filter")]
    pub filter: String,
}

fn default_filter() -> String {
    "true".into()
}

/// A checked route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub id: String,
    pub endpoint_name: String,
    pub filter: Filter,
}

/// Route ids: 1 to 128 letters, digits, `-`, `_` and `.`, starting with a letter or digit
/// (ADT documents ids as case-sensitive and unique; twinroute also keeps them URL-safe).
pub fn validate_route_id(id: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && id.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid route id {id:?}: use 1 to 128 letters, digits, '-', '_' and '.', starting with a letter or digit"
        ))
    }
}

impl RouteSpec {
    /// Checks the id and compiles the filter. Whether the endpoint exists is the caller's check
    /// (it depends on the other endpoints).
    pub fn validate(&self, id: &str) -> Result<RouteConfig, Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = validate_route_id(id) {
            problems.push(e);
        }
        if self.endpoint_name.trim().is_empty() {
            problems.push("endpoint_name: required".into());
        }
        let filter = match Filter::parse(&self.filter) {
            Ok(f) => Some(f),
            Err(e) => {
                problems.push(format!("filter: {e}"));
                None
            }
        };
        match filter {
            Some(filter) if problems.is_empty() => {
                Ok(RouteConfig { id: id.to_owned(), endpoint_name: self.endpoint_name.clone(), filter })
            }
            _ => Err(problems),
        }
    }
}

/// `[sources.<name>]`: inputs other than HTTP.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// Generates realistic ADT events for a small twin population: the local demo's input.
    Sample {
        #[serde(default = "default_sample_rate")]
        events_per_second: f64,
        #[serde(default = "default_sample_twins")]
        twins: usize,
        /// Stop after this many events (run forever when absent).
        #[serde(default)]
        limit: Option<u64>,
    },
    /// Newline-delimited JSON CloudEvents from a file, or stdin when `path = "-"`.
    Ndjson { path: String },
    /// An Event Hubs hub whose partitions the replicas of a consumer group share.
    Eventhubs(Box<crate::ingest::eventhubs::EventHubsSourceConfig>),
}

fn default_sample_rate() -> f64 {
    2.0
}
fn default_sample_twins() -> usize {
    5
}

/// The whole, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where API changes to routes and endpoints are stored so they survive a restart. Without
    /// it, such changes last until the process exits (and a warning says so).
    pub state_dir: Option<PathBuf>,
    pub ingest: IngestConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub delivery: DeliveryConfig,
    pub spool: SpoolConfig,
    pub identity: IdentityConfig,
    pub standins: StandinsConfig,
    pub endpoints: BTreeMap<String, EndpointConfig>,
    pub routes: BTreeMap<String, RouteConfig>,
    pub sources: BTreeMap<String, SourceConfig>,
    /// `[reload]`: whether the file is watched for changes.
    pub reload: ReloadConfig,
    /// `[runtime]`: the threads that run twinroute.
    pub runtime: RuntimeConfig,
    /// Where this configuration came from, for messages.
    pub origin: String,
    /// [`text_digest`] of the text it was parsed from: the file watcher compares the file with it,
    /// so an edit made while twinroute was starting is not missed.
    pub digest: u64,
}

/// A digest of a configuration's text, to notice that a file changed (not a security measure).
pub fn text_digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

impl Config {
    /// The spool to use: on disk by default when there is a state directory.
    pub fn spool_choice(&self) -> SpoolChoice {
        let dir = self.spool.path.clone().or_else(|| self.state_dir.as_ref().map(|d| d.join("spool")));
        match (self.spool.mode, dir) {
            (Some(SpoolMode::Memory), _) | (None, None) | (Some(SpoolMode::Disk), None) => {
                SpoolChoice::Memory
            }
            (_, Some(path)) => SpoolChoice::Disk {
                path,
                max_bytes: self.spool.max_bytes,
                commit_interval: Duration::from_millis(self.spool.commit_interval_ms),
                memory_bytes: self.spool.memory_bytes,
            },
        }
    }
}

const TOP_LEVEL_KEYS: [&str; 13] = [
    "state_dir",
    "ingest",
    "admin",
    "log",
    "delivery",
    "spool",
    "identity",
    "standins",
    "endpoints",
    "routes",
    "sources",
    "reload",
    "runtime",
];

/// Deserializes one section, reporting unknown keys and type errors with their full path.
fn section<T: DeserializeOwned + Default>(
    prefix: &str,
    value: Option<&serde_json::Value>,
    problems: &mut Vec<String>,
) -> T {
    let Some(value) = value else { return T::default() };
    item::<T>(prefix, value, problems).unwrap_or_default()
}

fn item<T: DeserializeOwned>(
    prefix: &str,
    value: &serde_json::Value,
    problems: &mut Vec<String>,
) -> Option<T> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut record);
    let result: Result<T, _> = serde_path_to_error::deserialize(de);
    for key in unknown {
        problems.push(format!("{prefix}.{key}: unknown key"));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let at = if path == "." { prefix.to_owned() } else { format!("{prefix}.{path}") };
            problems.push(format!("{at}: {}", e.into_inner()));
            None
        }
    }
}

fn table<'a>(
    name: &str,
    value: Option<&'a serde_json::Value>,
    problems: &mut Vec<String>,
) -> Vec<(&'a String, &'a serde_json::Value)> {
    match value {
        None => Vec::new(),
        Some(serde_json::Value::Object(map)) => map.iter().collect(),
        Some(_) => {
            problems.push(format!("{name}: must be a table of [{name}.<name>] sections"));
            Vec::new()
        }
    }
}

impl Config {
    /// Loads the file at `path` (the embedded default when `None`) with overrides from the
    /// process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => (t, p.display().to_string()),
                Err(e) => {
                    return Err(ConfigError {
                        origin: p.display().to_string(),
                        problems: vec![format!("cannot read the file: {e}")],
                    })
                }
            },
            None => (EMBEDDED_DEFAULT.to_owned(), "embedded default (config/local.toml)".to_owned()),
        };
        Self::from_toml(&text, &origin, None)
    }

    /// Parses TOML text. `env` replaces the process environment for overrides (tests pass a
    /// map; `None` reads the real environment).
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError { origin: origin.to_owned(), problems };
        let environment = config::Environment::with_prefix("TWINROUTE")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(env);
        let layered = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(environment)
            .build()
            .map_err(|e| fail(vec![e.to_string()]))?;
        let raw: serde_json::Value = layered.try_deserialize().map_err(|e| fail(vec![e.to_string()]))?;
        let mut config = Self::from_value(&raw, origin).map_err(fail)?;
        config.digest = text_digest(text);
        Ok(config)
    }

    fn from_value(raw: &serde_json::Value, origin: &str) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let empty = serde_json::Map::new();
        let top = raw.as_object().unwrap_or(&empty);
        for key in top.keys() {
            if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
                problems.push(format!("{key}: unknown key (known: {})", TOP_LEVEL_KEYS.join(", ")));
            }
        }
        let state_dir = match top.get("state_dir") {
            None => None,
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(PathBuf::from(s)),
            Some(_) => {
                problems.push("state_dir: must be a directory path".into());
                None
            }
        };
        let ingest: IngestConfig = section("ingest", top.get("ingest"), &mut problems);
        let admin: AdminConfig = section("admin", top.get("admin"), &mut problems);
        let log: LogConfig = section("log", top.get("log"), &mut problems);
        let delivery: DeliveryConfig = section("delivery", top.get("delivery"), &mut problems);
        let spool: SpoolConfig = match top.get("spool") {
            // The short form: `spool = "memory"`.
            Some(serde_json::Value::String(mode)) => {
                let mode =
                    item::<SpoolMode>("spool", &serde_json::Value::String(mode.clone()), &mut problems);
                SpoolConfig { mode, ..SpoolConfig::default() }
            }
            other => section("spool", other, &mut problems),
        };
        if !(1 << 20..=1 << 30).contains(&spool.memory_bytes) {
            problems.push("spool.memory_bytes: must be between 1 MiB (1048576) and 1 GiB".into());
        }
        if spool.max_bytes == 0 {
            problems.push("spool.max_bytes: must be positive".into());
        }
        if spool.mode == Some(SpoolMode::Disk) && spool.path.is_none() && state_dir.is_none() {
            problems.push(
                "spool.mode = \"disk\" needs a directory: set state_dir or spool.path (or use spool.mode = \"memory\")"
                    .into(),
            );
        }
        let identity: IdentityConfig = section("identity", top.get("identity"), &mut problems);
        let standins: StandinsConfig = section("standins", top.get("standins"), &mut problems);
        let reload: ReloadConfig = section("reload", top.get("reload"), &mut problems);
        let runtime: RuntimeConfig = section("runtime", top.get("runtime"), &mut problems);
        if runtime.worker_threads > MAX_WORKER_THREADS {
            problems.push(format!(
                "runtime.worker_threads: {} is too many (at most {MAX_WORKER_THREADS}; 0 means one per core)",
                runtime.worker_threads
            ));
        }
        if reload.poll_interval_ms < MIN_RELOAD_POLL_INTERVAL_MS {
            problems.push(format!(
                "reload.poll_interval_ms: {} is too short (at least {MIN_RELOAD_POLL_INTERVAL_MS})",
                reload.poll_interval_ms
            ));
        }
        for (key, listen) in
            [("standins.imds_listen", &standins.imds_listen), ("standins.amqp_listen", &standins.amqp_listen)]
        {
            if let Some(listen) = listen {
                match listen.parse::<SocketAddr>() {
                    Ok(a) if a.ip().is_loopback() => {}
                    Ok(_) => problems
                        .push(format!("{key}: {listen:?}: stand-ins listen on loopback addresses only")),
                    Err(_) => problems.push(format!("{key}: {listen:?} is not an address:port")),
                }
            }
        }
        match url::Url::parse(&identity.imds_endpoint) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => problems.push(format!(
                "identity.imds_endpoint: {:?} is not an http:// URL (the default is {})",
                identity.imds_endpoint,
                crate::identity::DEFAULT_IMDS_ENDPOINT
            )),
        }
        // Addresses, tokens (required beyond loopback), TLS, socket modes, time limits.
        for listener in [ingest.listener(), admin.listener()] {
            problems.extend(listener.settings().err().unwrap_or_default());
        }
        if ingest.max_event_bytes == 0 || ingest.max_request_bytes == 0 || ingest.max_batch_events == 0 {
            problems.push(
                "ingest: max_event_bytes, max_request_bytes and max_batch_events must be positive".into(),
            );
        }
        if delivery.queue_capacity == 0 {
            problems.push("delivery.queue_capacity: must be positive".into());
        }
        if delivery.max_queued_bytes == 0 {
            problems.push("delivery.max_queued_bytes: must be positive".into());
        }
        problems.extend(delivery.problems("delivery"));
        if let Err(e) = log.level.parse::<tracing_subscriber::EnvFilter>() {
            problems.push(format!("log.level: {:?} is not a log filter ({e})", log.level));
        }

        let mut endpoints = BTreeMap::new();
        for (name, value) in table("endpoints", top.get("endpoints"), &mut problems) {
            let prefix = format!("endpoints.{name}");
            if let Some(spec) = item::<EndpointSpec>(&prefix, value, &mut problems) {
                match spec.validate(name) {
                    Ok(e) => {
                        endpoints.insert(name.clone(), e);
                    }
                    Err(ps) => problems.extend(ps.into_iter().map(|p| format!("{prefix}: {p}"))),
                }
            }
        }
        let mut routes = BTreeMap::new();
        let route_table = table("routes", top.get("routes"), &mut problems);
        for (id, value) in &route_table {
            let prefix = format!("routes.{id}");
            if let Some(spec) = item::<RouteSpec>(&prefix, value, &mut problems) {
                match spec.validate(id) {
                    Ok(r) => {
                        if !endpoints.contains_key(&r.endpoint_name) {
                            problems.push(format!(
                                "{prefix}.endpoint_name: no endpoint named {:?} (define [endpoints.{}])",
                                r.endpoint_name, r.endpoint_name
                            ));
                        }
                        routes.insert((*id).clone(), r);
                    }
                    Err(ps) => problems.extend(ps.into_iter().map(|p| format!("{prefix}: {p}"))),
                }
            }
        }
        let mut sources = BTreeMap::new();
        for (name, value) in table("sources", top.get("sources"), &mut problems) {
            if let Some(s) = item::<SourceConfig>(&format!("sources.{name}"), value, &mut problems) {
                if let SourceConfig::Eventhubs(hub) = &s {
                    problems.extend(hub.validate(&format!("sources.{name}")).err().unwrap_or_default());
                }
                sources.insert(name.clone(), s);
            }
        }
        if endpoints.len() > admin.max_endpoints {
            problems.push(format!(
                "endpoints: {} defined, more than admin.max_endpoints = {}",
                endpoints.len(),
                admin.max_endpoints
            ));
        }
        if route_table.len() > admin.max_routes {
            problems.push(format!(
                "routes: {} defined, more than admin.max_routes = {}",
                route_table.len(),
                admin.max_routes
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Config {
            state_dir,
            ingest,
            admin,
            log,
            delivery,
            spool,
            identity,
            standins,
            endpoints,
            routes,
            sources,
            reload,
            runtime,
            origin: origin.to_owned(),
            digest: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "test.toml", Some(HashMap::new()))
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::from_toml(EMBEDDED_DEFAULT, "embedded", Some(HashMap::new())).unwrap();
        assert!(!c.routes.is_empty());
        assert!(!c.sources.is_empty());
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.ingest.listen, DEFAULT_INGEST_LISTEN);
        assert_eq!(c.admin.listen, DEFAULT_ADMIN_LISTEN);
        assert_eq!(c.ingest.max_event_bytes, DEFAULT_MAX_EVENT_BYTES);
        assert_eq!(c.delivery.queue_capacity, DEFAULT_QUEUE_CAPACITY);
        assert!(c.routes.is_empty() && c.endpoints.is_empty());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = load(
            r#"
            colour = "blue"
            [ingest]
            listen = "nowhere"
            max_event_bytes = "big"
            [log]
            verbosity = 3
            [endpoints.out]
            type = "File"
            pth = "/tmp/x"
            [endpoints.sink2]
            type = "Stdout"
            [routes.r1]
            endpoint_name = "missing"
            filter = "type = 'x'"
            [routes.r2]
            endpoint_name = "sink2"
            filter = "type = "
            "#,
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "colour: unknown key",
            "ingest.max_event_bytes: invalid type",
            "log.verbosity: unknown key",
            "endpoints.out.pth: unknown key",
            "endpoints.out: path: required",
            "routes.r1.endpoint_name: no endpoint named \"missing\"",
            "routes.r2: filter:",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = HashMap::from([
            ("TWINROUTE_INGEST__LISTEN".to_owned(), "0.0.0.0:9999".to_owned()),
            // Beyond loopback ingest needs a token: from the environment too.
            ("TWINROUTE_INGEST__TOKEN".to_owned(), "token-from-the-environment".to_owned()),
            ("TWINROUTE_LOG__FORMAT".to_owned(), "json".to_owned()),
            ("TWINROUTE_DELIVERY__QUEUE_CAPACITY".to_owned(), "5".to_owned()),
        ]);
        let c = Config::from_toml("[ingest]\nlisten = \"127.0.0.1:1\"\n", "t", Some(env)).unwrap();
        assert_eq!(c.ingest.listen, "0.0.0.0:9999");
        assert_eq!(c.ingest.token, Some(Secret::new("token-from-the-environment")));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.delivery.queue_capacity, 5);
    }

    #[test]
    fn route_filter_defaults_to_true_and_route_ids_are_checked() {
        let c = load("[endpoints.out]\ntype='Stdout'\n[routes.all]\nendpoint_name='out'\n").unwrap();
        assert_eq!(c.routes["all"].filter.constant(), Some(true));
        let err = load("[endpoints.out]\ntype='Stdout'\n[routes.'-x']\nendpoint_name='out'\n").unwrap_err();
        assert!(err.to_string().contains("invalid route id"), "{err}");
    }

    #[test]
    fn secrets_are_not_echoed_in_errors() {
        let err = load(
            "[endpoints.hub]\ntype='EventHub'\nconnection_string='Endpoint=sb://ns/;SharedAccessKeyName=k;SharedAccessKey=TOPSECRET'\nbogus=1\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("bogus") && text.contains("entity_path"), "{text}");
        assert!(!text.contains("TOPSECRET"), "{text}");
    }

    #[test]
    fn one_thread_runs_everything_unless_more_are_asked_for() {
        assert_eq!(load("").unwrap().runtime.worker_threads, 1);
        assert_eq!(load("[runtime]\nworker_threads = 4\n").unwrap().runtime.worker_threads, 4);
        assert_eq!(load("[runtime]\nworker_threads = 0\n").unwrap().runtime.worker_threads, 0);
        let env = HashMap::from([("TWINROUTE_RUNTIME__WORKER_THREADS".to_owned(), "3".to_owned())]);
        assert_eq!(Config::from_toml("", "t", Some(env)).unwrap().runtime.worker_threads, 3);
        let err = load("[runtime]\nworker_threads = 100000\n").unwrap_err().to_string();
        assert!(err.contains("runtime.worker_threads: 100000 is too many"), "{err}");
        let err = load("[runtime]\nthreads = 2\n").unwrap_err().to_string();
        assert!(err.contains("runtime.threads: unknown key"), "{err}");
    }

    #[test]
    fn sources_are_typed() {
        let c = load("[sources.demo]\ntype='sample'\nevents_per_second=5.0\n[sources.replay]\ntype='ndjson'\npath='-'\n").unwrap();
        assert_eq!(c.sources["demo"], SourceConfig::Sample { events_per_second: 5.0, twins: 5, limit: None });
        let err = load("[sources.x]\ntype='kafka'\n").unwrap_err();
        assert!(err.to_string().contains("sources.x"), "{err}");
    }

    #[test]
    fn the_spool_is_on_disk_with_a_state_directory_and_in_memory_without() {
        assert_eq!(load("").unwrap().spool_choice(), SpoolChoice::Memory);
        let c = load("state_dir = '/var/lib/tr'\n").unwrap();
        assert_eq!(
            c.spool_choice(),
            SpoolChoice::Disk {
                path: PathBuf::from("/var/lib/tr/spool"),
                max_bytes: DEFAULT_SPOOL_MAX_BYTES,
                commit_interval: Duration::from_millis(DEFAULT_SPOOL_COMMIT_INTERVAL_MS),
                memory_bytes: DEFAULT_SPOOL_MEMORY_BYTES,
            }
        );
        let c = load("state_dir = '/var/lib/tr'\nspool = 'memory'\n").unwrap();
        assert_eq!(c.spool_choice(), SpoolChoice::Memory, "the short form");
        let c =
            load("[spool]\nmode = 'disk'\npath = '/data/spool'\nmax_bytes = 5000\ncommit_interval_ms = 2\nmemory_bytes = 16777216\n")
                .unwrap();
        assert_eq!(
            c.spool_choice(),
            SpoolChoice::Disk {
                path: PathBuf::from("/data/spool"),
                max_bytes: 5000,
                commit_interval: Duration::from_millis(2),
                memory_bytes: 16 << 20,
            }
        );
        let env = HashMap::from([("TWINROUTE_SPOOL__MODE".to_owned(), "memory".to_owned())]);
        let c = Config::from_toml("state_dir = '/x'\n", "test", Some(env)).unwrap();
        assert_eq!(c.spool_choice(), SpoolChoice::Memory, "environment override");
        let err = load("[spool]\nmode = 'disk'\n").unwrap_err().to_string();
        assert!(err.contains("set state_dir or spool.path"), "{err}");
        let err = load("spool = 'tape'\n").unwrap_err().to_string();
        assert!(err.contains("spool") && err.contains("tape"), "{err}");
        let err = load("[spool]\nmax_bytes = 0\nsize = 1\n").unwrap_err().to_string();
        assert!(
            err.contains("spool.max_bytes: must be positive") && err.contains("spool.size: unknown key"),
            "{err}"
        );
    }
}
