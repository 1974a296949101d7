//! The `twinroute` command line. `main.rs` only calls [`main`].

use crate::app::{RunOptions, Running, StartError};
use crate::config::{Config, EXIT_CONFIG};
use crate::event::{describe_problems, parse_structured, CloudEvent};
use crate::filter::Filter;
use crate::identity::{IdentityProvider, ManagedIdentityId, UserAssignedId};
use crate::routing::{Route, RouteTable};
use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit status for bad input data (`EX_DATAERR`): an invalid event file, bad NDJSON lines.
pub const EXIT_DATA: u8 = 65;
/// Exit status when a listener cannot be bound (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// sysexits' EX_CANTCREAT: the spool's directory cannot be created, written or opened.
pub const EXIT_CANTCREAT: u8 = 73;
/// Exit status of `filter check` for an invalid filter.
pub const EXIT_BAD_FILTER: u8 = 2;
/// Exit status for a bad command-line value clap cannot check (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "twinroute",
    version,
    about = "Event-forwarding data plane for digital twins (ADT-compatible routes and endpoints)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: ingest, routing and delivery (the local demo when no --config is given).
    Run {
        /// Configuration file (TOML). Without it, the embedded local demo configuration.
        #[arg(long, short, env = "TWINROUTE_CONFIG")]
        config: Option<PathBuf>,
        /// Read NDJSON CloudEvents from FILE (or - for stdin), deliver them, and exit;
        /// no HTTP listeners are opened.
        #[arg(long, value_name = "FILE|-")]
        input: Option<String>,
    },
    /// Check a configuration and report every problem (exit status 78 when there are any).
    CheckConfig {
        #[arg(long, short, env = "TWINROUTE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Route filters.
    Filter {
        #[command(subcommand)]
        command: FilterCommand,
    },
    /// Routes of a configuration.
    Route {
        #[command(subcommand)]
        command: RouteCommand,
    },
    /// Managed identities of this host.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Dead letters of an endpoint: list them, or replay them to the endpoint.
    #[command(after_help = crate::deadletter_cli::EXIT_STATUS_HELP)]
    Deadletter {
        #[command(subcommand)]
        command: DeadletterCommand,
    },
    /// Load a daemon's ingest (or a configuration's endpoints) with a reproducible ADT event
    /// stream and report throughput and latency; --compare measures twinroute against the SDK
    /// straight to a stand-in.
    #[command(after_help = crate::loadtest::command::EXIT_STATUS_HELP)]
    Loadtest(Box<crate::loadtest::command::LoadtestArgs>),
}

pub use crate::deadletter_cli::DeadletterCommand;

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Get a token as twinroute would, and show which source answered, the audience and the
    /// expiry (the token itself only with --show-token), like `az account get-access-token`.
    GetToken {
        /// The resource (audience), e.g. https://eventhubs.azure.net/
        #[arg(long)]
        resource: String,
        /// A user-assigned identity by client id.
        #[arg(long, conflicts_with_all = ["object_id", "msi_res_id"])]
        client_id: Option<String>,
        /// A user-assigned identity by object (principal) id.
        #[arg(long, conflicts_with_all = ["client_id", "msi_res_id"])]
        object_id: Option<String>,
        /// A user-assigned identity by ARM resource id.
        #[arg(long, conflicts_with_all = ["client_id", "object_id"])]
        msi_res_id: Option<String>,
        /// The IMDS token endpoint (default: the configuration's identity.imds_endpoint).
        #[arg(long)]
        imds_endpoint: Option<String>,
        /// The configuration whose [identity] section to use (default: the embedded one).
        #[arg(long, short, env = "TWINROUTE_CONFIG")]
        config: Option<PathBuf>,
        /// Print the token too.
        #[arg(long)]
        show_token: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FilterCommand {
    /// Validate a filter; with --event, print `true` or `false` for that event.
    Check {
        /// The filter, in ADT's route filter language.
        #[arg(long)]
        filter: String,
        /// A structured CloudEvent (JSON) file, or - for stdin.
        #[arg(long, value_name = "FILE|-")]
        event: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Show, for each route, whether an event matches it and, when not, which clause failed.
    Explain {
        #[arg(long, short, env = "TWINROUTE_CONFIG")]
        config: Option<PathBuf>,
        /// A structured CloudEvent (JSON) file, or - for stdin.
        #[arg(long, value_name = "FILE|-")]
        event: String,
    },
}

/// Runs the command line; returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, input } => run(config.as_deref(), input),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Filter { command: FilterCommand::Check { filter, event } } => {
            filter_check(&filter, event.as_deref())
        }
        Command::Route { command: RouteCommand::Explain { config, event } } => {
            route_explain(config.as_deref(), &event)
        }
        Command::Identity {
            command:
                IdentityCommand::GetToken {
                    resource,
                    client_id,
                    object_id,
                    msi_res_id,
                    imds_endpoint,
                    config,
                    show_token,
                },
        } => {
            let id = match (client_id, object_id, msi_res_id) {
                (Some(v), _, _) => ManagedIdentityId::UserAssigned(UserAssignedId::ClientId(v)),
                (_, Some(v), _) => ManagedIdentityId::UserAssigned(UserAssignedId::ObjectId(v)),
                (_, _, Some(v)) => ManagedIdentityId::UserAssigned(UserAssignedId::ResourceId(v)),
                _ => ManagedIdentityId::SystemAssigned,
            };
            get_token(config.as_deref(), &resource, id, imds_endpoint, show_token)
        }
        Command::Deadletter { command } => crate::deadletter_cli::main(command),
        Command::Loadtest(args) => crate::loadtest::command::main(*args),
    }
}

/// The async runtime a command runs on, or the exit status after saying why there is none:
/// `worker_threads` 1 is one thread (a current-thread runtime: one-off requests, and the daemon's
/// default, `[runtime]`), more a multi-threaded runtime with that many workers, 0 one per core.
pub(crate) fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("twinroute: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("twinroute: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

fn read_input(source: &str) -> std::io::Result<Vec<u8>> {
    if source == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(source)
    }
}

fn read_event(source: &str) -> Result<CloudEvent, ExitCode> {
    let bytes = read_input(source).map_err(|e| {
        eprintln!("twinroute: cannot read the event from {source}: {e}");
        ExitCode::from(EXIT_DATA)
    })?;
    parse_structured(&bytes).map_err(|problems| {
        eprintln!("twinroute: the event in {source} is invalid:\n{}", describe_problems(&problems));
        ExitCode::from(EXIT_DATA)
    })
}

fn check_config(path: Option<&Path>) -> ExitCode {
    match load_config(path) {
        Ok(c) => {
            println!(
                "configuration {} is valid: {} endpoints, {} routes, {} sources",
                c.origin,
                c.endpoints.len(),
                c.routes.len(),
                c.sources.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn filter_check(text: &str, event: Option<&str>) -> ExitCode {
    let filter = match Filter::parse(text) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("twinroute: invalid filter: {e}");
            return ExitCode::from(EXIT_BAD_FILTER);
        }
    };
    match event {
        None => {
            println!("valid: {filter}");
            ExitCode::SUCCESS
        }
        Some(source) => match read_event(source) {
            Ok(event) => {
                println!("{}", filter.matches(&event));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

fn route_explain(config: Option<&Path>, event: &str) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let event = match read_event(event) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let table = RouteTable::new(
        config
            .routes
            .values()
            .map(|r| Route { id: r.id.clone(), endpoint: r.endpoint_name.clone(), filter: r.filter.clone() })
            .collect(),
    );
    let mut delivered_to = Vec::new();
    for (route, endpoint, explanation) in table.explain(&event) {
        let verdict = if explanation.matched { "MATCH" } else { "no match" };
        println!("route {route} -> {endpoint}: {verdict}");
        let detail = explanation.to_string();
        for line in detail.lines() {
            println!("    {line}");
        }
        if explanation.matched && !delivered_to.contains(&endpoint) {
            delivered_to.push(endpoint);
        }
    }
    if delivered_to.is_empty() {
        println!(
            "the event matches no route: it would be dropped (counted in twinroute_events_unmatched_total)"
        );
    } else {
        println!("the event would be delivered to: {}", delivered_to.join(", "));
    }
    ExitCode::SUCCESS
}

/// The claims of a JWT that help an operator (never the signature), if the token is a JWT.
fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn get_token(
    config: Option<&Path>,
    resource: &str,
    id: ManagedIdentityId,
    imds_endpoint: Option<String>,
    show_token: bool,
) -> ExitCode {
    let mut identity = match load_config(config) {
        Ok(c) => c.identity,
        Err(code) => return code,
    };
    if let Some(endpoint) = imds_endpoint {
        identity.imds_endpoint = endpoint;
    }
    let runtime = match runtime(1) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let provider = IdentityProvider::new(&identity, None);
        let credential = match provider.credential(&id) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("twinroute: {e}");
                return ExitCode::FAILURE;
            }
        };
        let source = credential.cache().source_name();
        match credential.token(resource).await {
            Ok(token) => {
                let now = time::OffsetDateTime::now_utc();
                let left = token.expires_on - now;
                let expires = token
                    .expires_on
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_else(|_| token.expires_on.to_string());
                let where_ = if identity.source == crate::config::IdentitySourceKind::Imds {
                    format!("imds ({})", identity.imds_endpoint)
                } else {
                    source.to_owned()
                };
                println!("source:   {where_}");
                println!("identity: {id}");
                let claims = jwt_claims(token.secret.expose());
                let claim = |name: &str| {
                    claims.as_ref().and_then(|c| c.get(name)).and_then(|v| v.as_str()).map(str::to_owned)
                };
                println!("audience: {}", claim("aud").unwrap_or_else(|| resource.to_owned()));
                if let Some(oid) = claim("oid") {
                    println!("object:   {oid}");
                }
                if let Some(appid) = claim("appid") {
                    println!("client:   {appid}");
                }
                println!("expires:  {expires} (in {}m)", left.whole_minutes());
                if show_token {
                    println!("token:    {}", token.secret.expose());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("twinroute: no token for {resource} from {source}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn run(config_path: Option<&Path>, input: Option<String>) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::telemetry::init_logging(&config.log);
    // Under systemd (`Type=notify`): READY=1, watchdog keep-alives, STOPPING=1, STATUS= lines.
    // Without NOTIFY_SOCKET it sends nothing.
    let notifier = std::sync::Arc::new(crate::systemd::Notifier::from_env());
    let runtime = match runtime(config.runtime.worker_threads) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        // Install the recorder before anything records.
        crate::telemetry::prometheus();
        let one_shot = input.is_some();
        // The stop may take this long; systemd is told so when it begins (plus closing time).
        let drain_deadline = config.delivery.shutdown_timeout();
        let options =
            RunOptions { input, config_file: config_path.map(Path::to_path_buf), ..Default::default() };
        let running = match Running::start(config, options).await {
            Ok(r) => r,
            Err(e) => {
                notifier.status(&format!("failed to start: {e}"));
                eprintln!("twinroute: {e}");
                return ExitCode::from(match e {
                    StartError::Config(_) => EXIT_CONFIG as u8,
                    StartError::Bind { .. } => EXIT_UNAVAILABLE,
                    StartError::Spool(_) => EXIT_CANTCREAT,
                });
            }
        };
        if one_shot {
            let report = tokio::select! {
                r = running.run_input() => r,
                () = shutdown_signal() => {
                    // The input task is aborted by the stop; what was accepted is drained.
                    return ExitCode::SUCCESS;
                }
            };
            return match report {
                Ok(report) => {
                    let input = report.input.unwrap_or_default();
                    eprintln!(
                        "twinroute: input done: {} accepted ({} matched no route), {} invalid",
                        input.accepted, input.unmatched, input.invalid
                    );
                    if !report.undelivered.is_empty() {
                        ExitCode::FAILURE
                    } else if input.invalid > 0 {
                        ExitCode::from(EXIT_DATA)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("twinroute: reading the input failed: {e}");
                    ExitCode::from(EXIT_DATA)
                }
            };
        }
        // Catch SIGINT/SIGTERM from here on (the first poll installs the handlers): once READY=1
        // is sent, systemd may stop the service at any moment, and an uncaught SIGTERM would
        // kill the process without a drain.
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        let signalled = futures::poll!(&mut shutdown).is_ready();
        // Start-up is done: the configuration is loaded and the listeners are bound.
        let listening = running.listening();
        // SIGHUP and the watched file reload the configuration (src/reload.rs).
        let reloads = crate::reload::spawn(running.reloader.clone(), notifier.clone());
        notifier.ready(&format!("ready: {listening}"));
        let keep_alive = tokio::spawn(notifier.clone().keep_alive(running.dispatcher.clone(), listening));
        if !signalled {
            shutdown.await;
        }
        // No reload once the stop begins (awaited: none is half-way through the dispatcher).
        reloads.abort();
        let _ = reloads.await;
        notifier.stopping(
            &format!("stopping: intake closed, draining queues (deadline {}s)", drain_deadline.as_secs()),
            drain_deadline + crate::systemd::STOP_MARGIN,
        );
        let report = running.stop().await;
        keep_alive.abort();
        let undelivered: u64 = report.undelivered.iter().map(|(_, n)| n).sum();
        if report.undelivered.is_empty() {
            notifier.status("stopped: every accepted event was delivered");
        } else if report.spooled {
            notifier.status(&format!("stopped: {undelivered} events undelivered, kept in the spool"));
        } else {
            notifier.status(&format!("stopped: {undelivered} events undelivered and lost (memory spool)"));
        }
        // Even when the drain deadline passed with events left (logged per endpoint), a
        // deliberate stop exits 0 so supervisors do not treat it as a crash.
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
