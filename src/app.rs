//! The daemon assembled: dispatcher, control plane, listeners and sources, started together and
//! stopped in order (intake first, then the queues drain, then the listeners close).

use crate::admin::{self, AdminState};
use crate::config::SpoolChoice;
use crate::config::{Config, ConfigError, SourceConfig};
use crate::control::ControlPlane;
use crate::delivery::spool::{DiskSpool, SpoolOptions};
use crate::delivery::Dispatcher;
use crate::identity::{IdentityProvider, ImdsTransport};
use crate::ingest::{self, http::IngestState, ndjson::NdjsonReport};
use crate::server::Bound;
use crate::sinks::{DefaultSinkFactory, SinkFactory};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long an Event Hubs source may take to stop (last checkpoints, ownerships given up).
const SOURCE_STOP_GRACE: Duration = Duration::from_secs(10);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spool(#[from] crate::delivery::spool::SpoolError),
    #[error("cannot listen on {addr} ({what}): {source}; is another twinroute running? set {key} to another address")]
    Bind { what: &'static str, key: &'static str, addr: String, source: std::io::Error },
}

/// How to run, beyond the configuration.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Read NDJSON events from this file (`-` for stdin) and exit once they are delivered,
    /// without opening the HTTP listeners: replays and shell pipelines.
    pub input: Option<String>,
    /// The sinks to deliver with; [`DefaultSinkFactory`] when `None`.
    pub sinks: Option<Arc<dyn SinkFactory>>,
    /// Replaces HTTP for IMDS requests (tests that drive time themselves).
    pub imds_transport: Option<Arc<dyn ImdsTransport>>,
    /// Embedded in another command (`loadtest --endpoints`): no listeners and no sources; the
    /// caller submits to [`Running::dispatcher`] itself.
    pub embedded: bool,
    /// The file the configuration was read from, which reloads read again (`None`: the
    /// embedded default, never reloaded).
    pub config_file: Option<std::path::PathBuf>,
}

/// What a stop found.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Events not delivered when the drain deadline passed, per endpoint.
    pub undelivered: Vec<(String, u64)>,
    /// The result of the `--input` stream, if there was one.
    pub input: Option<NdjsonReport>,
    /// Whether undelivered events stay in the durable spool for the next start.
    pub spooled: bool,
}

/// Stand-ins started in-process (`[standins]`), kept alive for the daemon's life.
#[derive(Default)]
struct Standins {
    imds: Option<twinroute_emulator::imds::ImdsStandIn>,
    amqp: Option<twinroute_emulator::amqp::AmqpStandIn>,
}

async fn start_standins(config: &crate::config::StandinsConfig) -> Result<Standins, StartError> {
    let mut standins = Standins::default();
    if let Some(listen) = &config.imds_listen {
        let addr = listen.parse().map_err(|e| StartError::Bind {
            what: "IMDS stand-in",
            key: "standins.imds_listen",
            addr: listen.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let imds = twinroute_emulator::imds::ImdsStandIn::start_on(addr, Default::default()).await.map_err(
            |source| StartError::Bind {
                what: "IMDS stand-in",
                key: "standins.imds_listen",
                addr: listen.clone(),
                source,
            },
        )?;
        tracing::info!(token_url = %imds.token_url(), "IMDS stand-in started (development only)");
        standins.imds = Some(imds);
    }
    if let Some(listen) = &config.amqp_listen {
        let bind_error = |source| StartError::Bind {
            what: "Event Hubs / Service Bus stand-in",
            key: "standins.amqp_listen",
            addr: listen.clone(),
            source,
        };
        let addr = listen
            .parse()
            .map_err(|e| bind_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let amqp = twinroute_emulator::amqp::AmqpStandIn::start_on(addr, Default::default())
            .await
            .map_err(bind_error)?;
        tracing::info!(
            endpoint = %amqp.endpoint(),
            namespace = twinroute_emulator::amqp::DEFAULT_NAMESPACE,
            "Event Hubs / Service Bus stand-in started (development only)"
        );
        standins.amqp = Some(amqp);
    }
    Ok(standins)
}

/// A started daemon.
pub struct Running {
    /// Where ingest listens (`None` in `--input` mode, and on a Unix socket).
    pub ingest_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// The Unix sockets, when `listen = "unix:<path>"`.
    pub ingest_socket: Option<std::path::PathBuf>,
    pub admin_socket: Option<std::path::PathBuf>,
    pub dispatcher: Arc<Dispatcher>,
    pub control: Arc<ControlPlane>,
    /// Reloads the configuration file into the running daemon (`crate::reload::spawn` drives it).
    pub reloader: Arc<crate::reload::Reloader>,
    drain_deadline: Duration,
    /// The durable spool, when events are kept on disk.
    pub spool: Option<DiskSpool>,
    /// Tells the HTTP servers to stop accepting connections.
    stop_servers: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    sources: Vec<JoinHandle<()>>,
    /// Sources that finish on their own when told to stop (Event Hubs: last checkpoints,
    /// ownerships given up), and the signal.
    graceful: Vec<JoinHandle<()>>,
    stop_sources: watch::Sender<bool>,
    input: Option<JoinHandle<std::io::Result<NdjsonReport>>>,
    /// In-process stand-ins; dropped (stopped) after everything else.
    _standins: Standins,
}

/// Binds an API's listener as its section says (address or Unix socket, token, TLS, limits).
async fn bind(listener: crate::config::ListenerView<'_>, origin: &str) -> Result<Bound, StartError> {
    let settings =
        listener.settings().map_err(|problems| ConfigError { origin: origin.to_owned(), problems })?;
    Bound::bind(settings, origin).await
}

/// Logs, every `period`, what each endpoint delivered since the last line, and any endpoint that
/// is not healthy: a heartbeat an operator (or a newcomer running the demo) can read.
async fn summarize(dispatcher: Arc<Dispatcher>, period: Duration) {
    use std::sync::atomic::Ordering;
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let snapshot = dispatcher.snapshot();
        for (name, handle) in &snapshot.endpoints {
            let delivered = handle.stats.delivered.load(Ordering::Relaxed);
            let before = last.insert(name.clone(), delivered).unwrap_or(0);
            let (health, reason) = handle.stats.health();
            if delivered > before || health != crate::delivery::Health::Healthy {
                tracing::info!(
                    endpoint = %name,
                    delivered = delivered.saturating_sub(before),
                    queued = handle.queue_len(),
                    health = ?health,
                    reason = reason.as_deref().unwrap_or(""),
                    "endpoint summary"
                );
            }
        }
    }
}

/// Opens the durable spool the configuration asks for, reporting what it found.
fn open_spool(config: &Config) -> Result<Option<DiskSpool>, StartError> {
    let (path, max_bytes, commit_interval, memory_bytes) = match config.spool_choice() {
        SpoolChoice::Memory => {
            tracing::info!("spool in memory: accepted events not yet delivered are lost if twinroute dies (set state_dir for a durable spool)");
            return Ok(None);
        }
        SpoolChoice::Disk { path, max_bytes, commit_interval, memory_bytes } => {
            (path, max_bytes, commit_interval, memory_bytes)
        }
    };
    let spool = DiskSpool::open(&SpoolOptions { path, max_bytes, commit_interval, memory_bytes })?;
    let recovery = spool.recovery();
    if recovery.torn_tail_bytes > 0 {
        tracing::warn!(
            bytes = recovery.torn_tail_bytes,
            "the spool's journal ended in an incomplete write (power loss or crash during a sync): cut off; it held nothing that was acknowledged"
        );
    }
    if let Some(d) = &recovery.damaged {
        tracing::error!(
            first_seq = d.first_seq, last_seq = d.last_seq, records = d.records, reason = %d.reason,
            "the spool's tail is damaged: the intact records before it are kept, the damaged ones removed"
        );
    }
    tracing::info!(path = %spool.path().display(), waiting = recovery.events, bytes = spool.stored_bytes(), "spool on disk opened");
    Ok(Some(spool))
}

impl Running {
    /// Starts everything the configuration describes.
    pub async fn start(config: Config, options: RunOptions) -> Result<Running, StartError> {
        // Metric handles bind to the recorder present when they are made: install it first.
        crate::telemetry::prometheus();
        let standins = start_standins(&config.standins).await?;
        let identity = Arc::new(IdentityProvider::new(&config.identity, options.imds_transport.clone()));
        let factory =
            options.sinks.clone().unwrap_or_else(|| Arc::new(DefaultSinkFactory::new(identity.clone())));
        let spool = open_spool(&config)?;
        let mut dispatcher = Dispatcher::new(config.delivery.clone(), factory);
        if let Some(spool) = &spool {
            dispatcher = dispatcher.with_queues(Arc::new(spool.clone()));
        }
        let dispatcher = Arc::new(dispatcher);
        let control = match ControlPlane::start(&config, dispatcher.clone(), identity.clone()).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                if let Some(spool) = &spool {
                    spool.close();
                }
                return Err(e.into());
            }
        };
        if let Some(spool) = &spool {
            for (endpoint, events) in spool.release_unclaimed() {
                tracing::warn!(
                    %endpoint, events,
                    "endpoint no longer configured: its events left in the spool are dropped"
                );
            }
        }
        let (stop_servers, stop_rx) = watch::channel(false);
        let mut servers = Vec::new();
        let mut sources = Vec::new();
        let mut graceful = Vec::new();
        let (stop_sources, sources_stop) = watch::channel(false);
        let (mut ingest_addr, mut admin_addr) = (None, None);
        let (mut ingest_socket, mut admin_socket) = (None, None);
        let mut input = None;
        if let Some(path) = options.input {
            let dispatcher = dispatcher.clone();
            let max = config.ingest.max_event_bytes;
            input = Some(tokio::spawn(async move {
                if path == "-" {
                    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
                    ingest::ndjson::run(stdin, "stdin", &dispatcher, max).await
                } else {
                    let file = tokio::fs::File::open(&path)
                        .await
                        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot open {path}: {e}")))?;
                    ingest::ndjson::run(tokio::io::BufReader::new(file), &path, &dispatcher, max).await
                }
            }));
        } else if !options.embedded {
            let ingest_listener = bind(config.ingest.listener(), &config.origin).await?;
            let admin_listener = bind(config.admin.listener(), &config.origin).await?;
            (ingest_addr, admin_addr) = (ingest_listener.tcp_addr(), admin_listener.tcp_addr());
            ingest_socket = ingest_listener.socket_path().map(ToOwned::to_owned);
            admin_socket = admin_listener.socket_path().map(ToOwned::to_owned);
            let ingest_state =
                IngestState { dispatcher: dispatcher.clone(), limits: Arc::new(config.ingest.clone()) };
            servers.push(ingest_listener.serve(ingest::http::router(ingest_state), stop_rx.clone()));
            let admin_state = AdminState { control: control.clone(), dispatcher: dispatcher.clone() };
            servers.push(admin_listener.serve(admin::router(admin_state), stop_rx.clone()));
            tracing::info!(ingest = ?ingest_addr, admin = ?admin_addr, ingest_socket = ?ingest_socket, admin_socket = ?admin_socket, "listening");
            for (name, source) in &config.sources {
                let dispatcher = dispatcher.clone();
                let name = name.clone();
                let max = config.ingest.max_event_bytes;
                let source = source.clone();
                let identity = identity.clone();
                match source {
                    SourceConfig::Eventhubs(hub) => {
                        let stop = sources_stop.clone();
                        graceful.push(tokio::spawn(ingest::eventhubs::run(
                            name, *hub, dispatcher, identity, stop,
                        )));
                    }
                    SourceConfig::Sample { events_per_second, twins, limit } => {
                        sources.push(tokio::spawn(async move {
                            ingest::sample::run(&dispatcher, events_per_second, twins, limit).await
                        }));
                    }
                    SourceConfig::Ndjson { path } => {
                        sources.push(tokio::spawn(async move {
                            let result = if path == "-" {
                                ingest::ndjson::run(tokio::io::BufReader::new(tokio::io::stdin()), &name, &dispatcher, max).await
                            } else {
                                match tokio::fs::File::open(&path).await {
                                    Ok(f) => ingest::ndjson::run(tokio::io::BufReader::new(f), &name, &dispatcher, max).await,
                                    Err(e) => Err(e),
                                }
                            };
                            match result {
                                Ok(r) => tracing::info!(source = %name, accepted = r.accepted, invalid = r.invalid, "source finished"),
                                Err(e) => tracing::error!(source = %name, error = %e, "source failed"),
                            }
                        }));
                    }
                }
            }
        }
        if config.log.summary_interval_seconds > 0 {
            let period = Duration::from_secs(config.log.summary_interval_seconds);
            sources.push(tokio::spawn(summarize(dispatcher.clone(), period)));
        }
        let reloader =
            Arc::new(crate::reload::Reloader::new(&config, options.config_file.clone(), control.clone()));
        let routes = control.routes().await.len();
        let endpoints = control.endpoints().await.len();
        tracing::info!(config = %config.origin, routes, endpoints, "twinroute started");
        Ok(Running {
            ingest_addr,
            admin_addr,
            ingest_socket,
            admin_socket,
            dispatcher,
            control,
            drain_deadline: config.delivery.shutdown_timeout(),
            spool,
            stop_servers,
            servers,
            sources,
            graceful,
            stop_sources,
            input,
            reloader,
            _standins: standins,
        })
    }

    /// Where ingest and the admin API listen, for status lines: `ingest 127.0.0.1:8080, admin
    /// unix:/run/twinroute/admin.sock` (`-` for none).
    pub fn listening(&self) -> String {
        let show = |addr: Option<SocketAddr>, socket: &Option<std::path::PathBuf>| match (addr, socket) {
            (Some(a), _) => a.to_string(),
            (None, Some(p)) => format!("unix:{}", p.display()),
            (None, None) => "-".to_owned(),
        };
        format!(
            "ingest {}, admin {}",
            show(self.ingest_addr, &self.ingest_socket),
            show(self.admin_addr, &self.admin_socket)
        )
    }

    /// In `--input` mode: waits until the whole input has been read and submitted.
    pub async fn input_finished(&mut self) -> Option<std::io::Result<NdjsonReport>> {
        let handle = self.input.take()?;
        Some(handle.await.unwrap_or_else(|e| Err(std::io::Error::other(e))))
    }

    /// Stops: refuses new events (503), drains the queues up to the deadline, closes the listeners.
    pub async fn stop(self) -> ShutdownReport {
        self.stop_with(None).await
    }

    async fn stop_with(self, input: Option<NdjsonReport>) -> ShutdownReport {
        self.dispatcher.close_intake();
        for source in &self.sources {
            source.abort();
        }
        // Event Hubs inputs checkpoint what was accepted (when it is on disk) and give up their
        // partitions, so another replica takes them at once instead of after the ownership
        // expires; bounded, then stopped regardless.
        let _ = self.stop_sources.send(true);
        for source in self.graceful {
            let abort = source.abort_handle();
            if tokio::time::timeout(SOURCE_STOP_GRACE, source).await.is_err() {
                tracing::warn!("an event hubs source did not stop within {SOURCE_STOP_GRACE:?}; stopping it");
                abort.abort();
            }
        }
        if let Some(i) = &self.input {
            i.abort();
        }
        tracing::info!(
            deadline_s = self.drain_deadline.as_secs(),
            "shutting down: intake closed, draining queues"
        );
        let undelivered = self.dispatcher.shutdown(self.drain_deadline).await;
        let _ = self.stop_servers.send(true);
        for server in self.servers {
            let _ = server.await;
        }
        let spooled = self.spool.is_some();
        if let Some(spool) = &self.spool {
            spool.close();
        }
        if undelivered.is_empty() {
            tracing::info!("shutdown complete: every accepted event was delivered");
        } else {
            for (endpoint, n) in &undelivered {
                if spooled {
                    tracing::warn!(%endpoint, events = n, "shutdown deadline passed: undelivered events stay in the spool for the next start");
                } else {
                    tracing::error!(%endpoint, events = n, "shutdown deadline passed with events undelivered (spool in memory: they are lost)");
                }
            }
        }
        ShutdownReport { undelivered, input, spooled }
    }

    /// `--input` mode from start to end: read everything, deliver it, stop.
    pub async fn run_input(mut self) -> std::io::Result<ShutdownReport> {
        let report = match self.input_finished().await {
            Some(r) => Some(r?),
            None => None,
        };
        Ok(self.stop_with(report).await)
    }
}
