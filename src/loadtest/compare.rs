//! `twinroute loadtest --compare`: twinroute against the limit of this machine, in one run.
//!
//! An Event Hubs / Service Bus stand-in runs in this process and notes when each message
//! arrives. Two phases send the same generated events (same seed, same payload, same rate):
//!
//! 1. **baseline**: straight to the stand-in with the Azure SDK's AMQP client
//!    (`azure_core_amqp`), no twinroute in between: each event goes, in ADT's wire form, to the
//!    entities the scenario's routes select, batched per partition key as a producer would;
//! 2. **twinroute**: to a `twinroute run` child process over HTTP ingest, which routes and
//!    delivers them to the same entities; its CPU and memory are read from `/proc`.
//!
//! Both measure end-to-end latency (from when an event was due to its receipt at the stand-in)
//! and the sustained receive rate, and the report gives twinroute's figures as ratios to the
//! baseline's. The scenario is the issue's: 10 routes, 3 endpoints (two event hubs and a
//! Service Bus queue), key-based.

use super::{HttpIngest, LoadOptions, LoadReport, Observers, Receipts, SendOutcome, Target};
use crate::config::{Config, ConnectionString};
use crate::event::CloudEvent;
use crate::identity::sas::{self, SAS_TOKEN_TYPE};
use crate::routing::{Route, RouteTable};
use crate::sinks::amqp::message::{batch_envelope, encode, event_message, MessageOptions};
use crate::sinks::amqp::AmqpThread;
use azure_core_amqp::{
    AmqpClaimsBasedSecurity, AmqpClaimsBasedSecurityApis, AmqpConnection, AmqpConnectionApis,
    AmqpConnectionOptions, AmqpSendOptions, AmqpSendOutcome, AmqpSender, AmqpSenderApis, AmqpSession,
    AmqpSessionApis,
};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use twinroute_emulator::amqp::{
    AmqpConfig, AmqpStandIn, HubDef, NamespaceDef, ReceiptHook, BATCH_MESSAGE_FORMAT, DEV_SAS_KEY,
    DEV_SAS_KEY_NAME,
};

/// The stand-in namespace of the scenario.
pub(super) const NAMESPACE: &str = "twinroute-loadtest.servicebus.windows.net";

/// The scenario's endpoints: (name, entity, is an event hub).
const ENDPOINTS: [(&str, &str, bool); 3] =
    [("twin-hub", "twins", true), ("telemetry-hub", "telemetry", true), ("changes-queue", "changes", false)];

/// The scenario's routes: (id, endpoint, filter). Every event matches at least one; some match
/// several routes to one endpoint (delivered once) or routes to several endpoints (fan-out).
const ROUTES: [(&str, &str, &str); 10] = [
    ("all-twin-changes", "twin-hub", "type != 'microsoft.iot.telemetry'"),
    (
        "room-updates",
        "twin-hub",
        "type = 'Microsoft.DigitalTwins.Twin.Update' AND STARTS_WITH($body.modelId, 'dtmi:com:example:Room')",
    ),
    ("floor", "twin-hub", "subject = 'floor-1'"),
    ("telemetry", "telemetry-hub", "type = 'microsoft.iot.telemetry'"),
    ("humid-rooms", "telemetry-hub", "type = 'microsoft.iot.telemetry' AND $body.humidity >= 55"),
    ("room-telemetry", "telemetry-hub", "dataschema = 'dtmi:com:example:Room;1'"),
    (
        "lifecycle",
        "changes-queue",
        "type = 'Microsoft.DigitalTwins.Twin.Create' OR type = 'Microsoft.DigitalTwins.Twin.Delete'",
    ),
    ("relationships", "changes-queue", "STARTS_WITH(type, 'Microsoft.DigitalTwins.Relationship.')"),
    ("hot-rooms", "changes-queue", "type = 'microsoft.iot.telemetry' AND $body.temperature > 30"),
    ("deletes", "changes-queue", "ENDS_WITH(type, '.Delete')"),
];

/// Which spool the daemon runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Spool {
    Memory,
    Disk,
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Rate, duration, batch, connections, twins, seed, payload (the target is ignored).
    pub load: LoadOptions,
    pub spool: Spool,
    /// Event Hubs partition key: the twin id (twinroute's default: one twin's events stay in
    /// order, one message per twin per batch), or none (one message per batch).
    pub by_twin: bool,
    /// Events per send in the baseline (default: the load's batch). twinroute gathers events
    /// of many requests into each delivery batch; giving the baseline larger sends shows what
    /// the SDK does with the same gathering.
    pub baseline_batch: Option<usize>,
    /// The twinroute binary to run as the daemon.
    pub daemon: PathBuf,
    /// Draw a progress line on stderr.
    pub progress: bool,
}

/// Both phases and the ratios.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub scenario: String,
    /// The event hubs' partition key: `twin_id` or `none`.
    pub partition_key: &'static str,
    pub spool: Spool,
    pub baseline: LoadReport,
    pub twinroute: LoadReport,
    /// Events delivered by twinroute (its metrics) and received at the stand-in in its phase:
    /// equal when nothing was lost or duplicated.
    pub twinroute_delivered: u64,
    /// twinroute's sustained receive rate over the baseline's.
    pub throughput_ratio: f64,
    /// twinroute's end-to-end p50 / p99 minus the baseline's, microseconds.
    pub added_p50_us: i64,
    pub added_p99_us: i64,
}

impl CompareReport {
    /// The summary printed at the end.
    pub fn table(&self) -> String {
        let (b, t) = (&self.baseline, &self.twinroute);
        let rate = |r: &LoadReport| r.received_per_second.unwrap_or(0.0);
        let e2e = |r: &LoadReport| r.end_to_end_us.clone().unwrap_or_default();
        format!(
            "scenario        {}\n\
             \n\
             baseline (SDK straight to the stand-in)\n{}\n\
             \n\
             twinroute ({:?} spool)\n{}\n\
             \n\
             ratio           twinroute receives {:.0} messages/s, the baseline {:.0}: {:.1} %\n\
             added latency   p50 {:+} µs, p99 {:+} µs (end to end {} / {} µs vs {} / {} µs)\n\
             delivered       {} by twinroute, {} received at the stand-in",
            self.scenario,
            indent(&b.table()),
            self.spool,
            indent(&t.table()),
            rate(t),
            rate(b),
            self.throughput_ratio * 100.0,
            self.added_p50_us,
            self.added_p99_us,
            e2e(t).p50,
            e2e(t).p99,
            e2e(b).p50,
            e2e(b).p99,
            self.twinroute_delivered,
            t.received.unwrap_or(0),
        )
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

/// The scenario's routes as a table (the baseline decides where events go with it).
fn route_table() -> RouteTable {
    let routes = ROUTES
        .iter()
        .map(|(id, endpoint, filter)| Route {
            id: (*id).to_owned(),
            endpoint: (*endpoint).to_owned(),
            filter: crate::filter::Filter::parse(filter).expect("the scenario's filters parse"),
        })
        .collect();
    RouteTable::new(routes)
}

pub(super) fn connection_string(entity: &str) -> String {
    format!(
        "Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName={DEV_SAS_KEY_NAME};SharedAccessKey={DEV_SAS_KEY};EntityPath={entity}"
    )
}

/// The daemon's configuration: the scenario's endpoints on the stand-in at `amqp`.
pub fn daemon_config(
    ingest: &str,
    admin: &str,
    amqp: &str,
    state_dir: Option<&std::path::Path>,
    by_twin: bool,
) -> String {
    let mut toml = String::new();
    if let Some(dir) = state_dir {
        toml += &format!("state_dir = {:?}\n\n", dir.display().to_string());
    }
    toml += &format!(
        "[ingest]\nlisten = \"{ingest}\"\n\n[admin]\nlisten = \"{admin}\"\n\n[log]\nformat = \"human\"\nlevel = \"warn\"\nsummary_interval_seconds = 0\n\n"
    );
    for (name, entity, hub) in ENDPOINTS {
        toml += &format!("[endpoints.{name}]\n");
        if hub {
            toml += "type = \"EventHub\"\n";
            if !by_twin {
                toml += "partition_key = \"none\"\n";
            }
        } else {
            toml += "type = \"ServiceBus\"\nentity_kind = \"queue\"\n";
        }
        toml += &format!(
            "connection_string = \"{}\"\ncustom_endpoint = \"amqp://{amqp}\"\n\n",
            connection_string(entity)
        );
    }
    for (id, endpoint, filter) in ROUTES {
        toml += &format!("[routes.{id}]\nendpoint_name = \"{endpoint}\"\nfilter = {filter:?}\n\n");
    }
    toml
}

/// The stand-in namespace the scenario needs.
fn namespace() -> NamespaceDef {
    let mut ns = NamespaceDef::new(NAMESPACE);
    ns.hubs = vec![
        HubDef { name: "twins".into(), partition_count: 4 },
        HubDef { name: "telemetry".into(), partition_count: 4 },
    ];
    ns.queues = vec!["changes".into()];
    ns.sas_keys = vec![(DEV_SAS_KEY_NAME.to_owned(), DEV_SAS_KEY.to_owned())];
    ns
}

/// Runs both phases.
pub async fn run(options: &CompareOptions) -> anyhow::Result<CompareReport> {
    let receipts = Arc::new(Receipts::default());
    let hook_receipts = receipts.clone();
    let config = AmqpConfig {
        namespaces: vec![namespace()],
        receipt_hook: Some(ReceiptHook {
            property: format!("cloudEvents:{}", super::SENT_EXTENSION),
            callback: Arc::new(move |_entity, stamps| hook_receipts.record(stamps)),
        }),
        ..Default::default()
    };
    let standin = AmqpStandIn::start(config).await?;
    let amqp = standin.addr().to_string();

    eprintln!("twinroute loadtest: phase 1/2, baseline: the SDK straight to the stand-in at {amqp}");
    let baseline_target =
        Arc::new(SdkBaseline::connect(&amqp, options.load.connections.max(1), options.by_twin).await?);
    let baseline_load =
        LoadOptions { batch: options.baseline_batch.unwrap_or(options.load.batch), ..options.load.clone() };
    let mut baseline = super::run(
        &baseline_load,
        baseline_target.clone(),
        Observers { receipts: Some(receipts.clone()), process: None, progress: options.progress },
    )
    .await;
    baseline.target = format!("stand-in amqp://{amqp} (SDK)");
    settle(&receipts, baseline.received.unwrap_or(0), Duration::from_secs(10)).await;
    baseline.received = Some(receipts.count());
    drop(baseline_target);

    receipts.reset();
    eprintln!(
        "twinroute loadtest: phase 2/2, twinroute ({:?} spool) in front of the same stand-in",
        options.spool
    );
    let daemon = Daemon::start(options, &amqp).await?;
    let process = super::procstat::ProcSampler::new(daemon.pid()).ok();
    let ingest = Arc::new(HttpIngest::new(&daemon.ingest_url(), options.load.connections));
    let mut twinroute = super::run(
        &options.load,
        ingest,
        Observers { receipts: Some(receipts.clone()), process, progress: options.progress },
    )
    .await;
    twinroute.target = format!("twinroute {} (pid {})", daemon.ingest_url(), daemon.pid());
    // Let what was accepted reach the stand-in, until what twinroute counts as delivered and
    // what the stand-in received agree (or stop changing).
    let mut delivered = 0;
    let mut last = (u64::MAX, u64::MAX);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        delivered = daemon.delivered().await.unwrap_or(delivered);
        let now = (delivered, receipts.count());
        if (delivered > 0 && now.0 == now.1) || now == last {
            break;
        }
        last = now;
    }
    delivered = daemon.delivered().await.unwrap_or(delivered);
    twinroute.received = Some(receipts.count());
    daemon.stop().await;

    let rate = |r: &LoadReport| r.received_per_second.unwrap_or(0.0);
    let e2e = |r: &LoadReport| r.end_to_end_us.clone().unwrap_or_default();
    let throughput_ratio = if rate(&baseline) > 0.0 { rate(&twinroute) / rate(&baseline) } else { 0.0 };
    Ok(CompareReport {
        scenario: format!(
            "{} routes, {} endpoints (2 event hubs with partition key {}, 1 Service Bus queue; key-based), {} twins, {} B payload",
            ROUTES.len(),
            ENDPOINTS.len(),
            if options.by_twin { "twin id" } else { "none" },
            options.load.twins,
            options.load.payload_bytes
        ),
        spool: options.spool,
        partition_key: if options.by_twin { "twin_id" } else { "none" },
        added_p50_us: e2e(&twinroute).p50 as i64 - e2e(&baseline).p50 as i64,
        added_p99_us: e2e(&twinroute).p99 as i64 - e2e(&baseline).p99 as i64,
        baseline,
        twinroute,
        twinroute_delivered: delivered,
        throughput_ratio,
    })
}

/// Waits until `receipts` has `expected` messages or stops growing.
async fn settle(receipts: &Receipts, expected: u64, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = receipts.count();
    while tokio::time::Instant::now() < deadline && receipts.count() < expected {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = receipts.count();
        if now == last {
            break;
        }
        last = now;
    }
}

/// The baseline: per load connection, an SDK connection (on its own thread, as twinroute's
/// clients run theirs) with a sender link per entity.
struct SdkBaseline {
    connections: Vec<SdkConnection>,
    routes: RouteTable,
    by_twin: bool,
}

struct SdkConnection {
    senders: Vec<Arc<AmqpSender>>,
    /// Kept open for the senders (dropping the session ends it).
    _open: (Arc<AmqpConnection>, AmqpSession, AmqpClaimsBasedSecurity),
    /// Declared last: the connection's handles are dropped before its thread stops.
    io: AmqpThread,
}

impl SdkBaseline {
    async fn connect(amqp: &str, connections: usize, by_twin: bool) -> anyhow::Result<Self> {
        let mut all = Vec::new();
        for _ in 0..connections {
            all.push(SdkConnection::open(amqp).await?);
        }
        Ok(Self { connections: all, routes: route_table(), by_twin })
    }
}

impl SdkConnection {
    async fn open(amqp: &str) -> anyhow::Result<Self> {
        // Its own thread per connection, as twinroute's clients run theirs (the fe2o3 race).
        let io = AmqpThread::start("loadtest-sdk")?;
        let endpoint = url::Url::parse(&format!("amqp://{amqp}"))?;
        let setup = async move {
            let connection = Arc::new(AmqpConnection::new());
            let options = AmqpConnectionOptions { custom_endpoint: Some(endpoint), ..Default::default() };
            let url = url::Url::parse(&format!("amqps://{NAMESPACE}"))?;
            connection.open("twinroute-loadtest-baseline".into(), url, Some(options)).await?;
            let session = AmqpSession::new();
            session.begin(&connection, None).await?;
            let cbs = AmqpClaimsBasedSecurity::new(session.clone())?;
            cbs.attach().await?;
            let mut senders = Vec::new();
            for (_, entity, _) in ENDPOINTS {
                let key = ConnectionString::parse(&connection_string(entity)).map_err(anyhow::Error::msg)?;
                let token = sas::for_entity(&key, entity, Duration::from_secs(3600));
                let secret = azure_core::credentials::Secret::new(token.secret.expose().to_owned());
                cbs.authorize_path(
                    format!("sb://{NAMESPACE}/{entity}"),
                    Some(SAS_TOKEN_TYPE.to_owned()),
                    &secret,
                    token.expires_on,
                )
                .await?;
                let sender = Arc::new(AmqpSender::new());
                sender
                    .attach(
                        &session,
                        format!("baseline-{entity}-{}", uuid::Uuid::new_v4()),
                        format!("amqps://{NAMESPACE}/{entity}"),
                        None,
                    )
                    .await?;
                senders.push(sender);
            }
            anyhow::Ok((connection, session, cbs, senders))
        };
        let (connection, session, cbs, senders) = io.spawn(setup).await.map_err(anyhow::Error::msg)??;
        Ok(Self { senders, _open: (connection, session, cbs), io })
    }
}

/// The messages one batch of events makes: per endpoint (its index in [`ENDPOINTS`]) and
/// partition key, one batch message.
fn baseline_messages(
    routes: &RouteTable,
    events: &[CloudEvent],
    by_twin: bool,
) -> Vec<(usize, azure_core_amqp::AmqpMessage)> {
    // (endpoint, key) -> the events' positions, in order of first appearance.
    type Key<'e> = (usize, Option<&'e str>);
    let mut groups: Vec<(Key, Vec<usize>)> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        for target in routes.route(event).iter() {
            let name = &routes.endpoints()[target];
            let endpoint = ENDPOINTS.iter().position(|(n, _, _)| n == name).expect("a scenario endpoint");
            let key = (by_twin && ENDPOINTS[endpoint].2).then(|| event.twin_id()).flatten();
            match groups.iter_mut().find(|(k, _)| *k == (endpoint, key)) {
                Some((_, members)) => members.push(i),
                None => groups.push(((endpoint, key), vec![i])),
            }
        }
    }
    groups
        .into_iter()
        .map(|((endpoint, key), members)| {
            let options = MessageOptions { partition_key: key.map(str::to_owned), session_id: None };
            let messages: Vec<_> = members.iter().map(|&i| event_message(&events[i], &options)).collect();
            let encoded = messages.iter().map(|m| encode(m).expect("events encode")).collect();
            (endpoint, batch_envelope(&messages[0], encoded))
        })
        .collect()
}

#[async_trait::async_trait]
impl Target for SdkBaseline {
    async fn send(&self, connection: usize, events: Vec<serde_json::Value>) -> SendOutcome {
        let events = match super::parse_values(&events) {
            Ok(e) => e,
            Err(outcome) => return outcome,
        };
        let conn = &self.connections[connection % self.connections.len()];
        for (endpoint, message) in baseline_messages(&self.routes, &events, self.by_twin) {
            let sender = conn.senders[endpoint].clone();
            let options =
                AmqpSendOptions { message_format: Some(BATCH_MESSAGE_FORMAT), ..Default::default() };
            let sent = conn.io.spawn(async move { sender.send(message, Some(options)).await }).await;
            match sent {
                Ok(Ok(AmqpSendOutcome::Accepted)) => {}
                Ok(Ok(AmqpSendOutcome::Rejected(e))) => {
                    return SendOutcome::Error(format!("the stand-in rejected a batch: {e:?}"))
                }
                Ok(Ok(_)) => return SendOutcome::Error("the stand-in released a batch".into()),
                Ok(Err(e)) => return SendOutcome::Error(e.to_string()),
                Err(e) => return SendOutcome::Error(e),
            }
        }
        SendOutcome::Accepted
    }
}

/// A `twinroute run` child process.
pub(super) struct Daemon {
    child: tokio::process::Child,
    ingest: String,
    admin: String,
    client: reqwest::Client,
    _dir: TempDir,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory under the system's temporary directory.
    fn new() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("twinroute-loadtest-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Daemon {
    async fn start(options: &CompareOptions, amqp: &str) -> anyhow::Result<Self> {
        Daemon::launch(&options.daemon, options.spool, |ingest, admin, state| {
            daemon_config(ingest, admin, amqp, state, options.by_twin)
        })
        .await
    }

    /// Runs `binary run` in a new directory (its configuration, log and, with the disk spool,
    /// state) with the configuration `config` makes for its ingest and admin addresses and state
    /// directory, and waits until its admin API says it is ready.
    pub(super) async fn launch(
        binary: &std::path::Path,
        spool: Spool,
        config: impl FnOnce(&str, &str, Option<&std::path::Path>) -> String,
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new()?;
        let (ingest, admin) = (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?));
        let state = (spool == Spool::Disk).then(|| dir.0.join("state"));
        let text = config(&ingest, &admin, state.as_deref());
        // Checked here so a mistake in the scenario reads as one, not as a daemon that died.
        Config::from_toml(&text, "the load test's daemon configuration", Some(Default::default()))?;
        let path = dir.0.join("twinroute.toml");
        std::fs::write(&path, &text)?;
        let log = std::fs::File::create(dir.0.join("twinroute.log"))?;
        let child = tokio::process::Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", binary.display()))?;
        let mut daemon = Daemon {
            child,
            ingest: format!("http://{ingest}"),
            admin: format!("http://{admin}"),
            client: reqwest::Client::new(),
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = daemon.client.get(format!("{}/readyz", daemon.admin)).send().await {
                if r.status().is_success() {
                    return Ok(daemon);
                }
            }
            if let Some(status) = daemon.child.try_wait()? {
                let log = std::fs::read_to_string(daemon._dir.0.join("twinroute.log")).unwrap_or_default();
                anyhow::bail!("the daemon exited ({status}) before it was ready:\n{log}");
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("the daemon was not ready within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    fn ingest_url(&self) -> String {
        self.ingest.clone()
    }

    pub(super) async fn metrics(&self) -> Option<String> {
        self.client.get(format!("{}/metrics", self.admin)).send().await.ok()?.text().await.ok()
    }

    /// Events delivered, summed over endpoints (`twinroute_events_delivered_total`).
    async fn delivered(&self) -> Option<u64> {
        Some(sum_metric(&self.metrics().await?, "twinroute_events_delivered_total"))
    }

    /// SIGTERM, then wait (the daemon drains and exits).
    pub(super) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }
}

/// The sum of a metric's samples (a counter's or a gauge's series) in Prometheus text; 0 when
/// absent.
pub(super) fn sum_metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::sample::SampleGenerator;

    #[test]
    fn the_scenario_configuration_is_valid_and_every_event_is_routed() {
        let text = daemon_config("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", None, true);
        let config = Config::from_toml(&text, "test", Some(Default::default())).expect("valid");
        assert_eq!(config.routes.len(), 10);
        assert_eq!(config.endpoints.len(), 3);
        let routes = route_table();
        let mut generator = SampleGenerator::new(50, 1);
        let mut fan_out = 0;
        for _ in 0..2000 {
            let event = generator.next_event();
            let targets = routes.route(&event);
            assert!(!targets.is_empty(), "every generated event goes somewhere: {}", event.ty());
            fan_out += targets.len();
        }
        assert!(fan_out > 2000, "some events fan out to several endpoints");
    }

    #[test]
    fn baseline_messages_group_by_endpoint_and_twin() {
        let routes = route_table();
        let mut generator = SampleGenerator::new(3, 2);
        let events: Vec<CloudEvent> = (0..40).map(|_| generator.next_event()).collect();
        let messages = baseline_messages(&routes, &events, true);
        let deliveries: usize = events.iter().map(|e| routes.route(e).len()).sum();
        let batched: usize = messages
            .iter()
            .map(|(_, m)| match &m.body {
                azure_core_amqp::message::AmqpMessageBody::Binary(parts) => parts.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(batched, deliveries, "every delivery is in exactly one batch");
        assert!(messages.len() < deliveries, "events of one twin share a batch");
        // Without partition keys: one batch per endpoint.
        let unkeyed = baseline_messages(&routes, &events, false);
        let endpoints: std::collections::HashSet<usize> = unkeyed.iter().map(|(e, _)| *e).collect();
        assert_eq!(unkeyed.len(), endpoints.len());
    }

    #[test]
    fn counters_are_summed_over_labels() {
        let text = "# TYPE twinroute_events_delivered_total counter\n\
                    twinroute_events_delivered_total{endpoint=\"a\"} 10\n\
                    twinroute_events_delivered_total{endpoint=\"b\"} 5\n\
                    twinroute_events_delivered_totalx 99\n";
        assert_eq!(sum_metric(text, "twinroute_events_delivered_total"), 15);
    }
}
