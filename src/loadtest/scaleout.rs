//! `twinroute loadtest --scaleout 1,2,3`: how fast a group of replicas drains an Event Hubs hub.
//!
//! In this process: an Event Hubs stand-in (a hub of 8 partitions per round, and the hub the
//! replicas route to, which notes every event it receives), and an IMDS stand-in for the
//! replicas' managed identity. The Blob service for checkpoints and ownership is given
//! (`--blob-service`, e.g. Azurite); a container is made for the run and deleted after it.
//!
//! Each round fills a fresh hub with the same backlog (the twin-population model's events, in
//! ADT's Event Hubs wire form with the twin id as partition key, stored in-process so publishing
//! costs nothing during the measurement), then starts N `twinroute run` replicas with an
//! `eventhubs` source on it and one route to the output hub, and measures until every event has
//! been routed: the rate from the first routed event to the last, the replicas' CPU, the
//! partitions each ended up owning, and the duplicates (events routed twice, when a partition
//! moved between replicas before its checkpoint caught up).
//!
//! Duplicates come from partitions handed over while being read: the new owner starts at the
//! last checkpoint, and the old one reads on until the new owner's receiver (with the
//! processor's owner level) displaces it. Replicas that start together hand partitions over
//! several times while the ownership settles; the counts show what that costs.
//!
//! All replicas, the stand-ins and Azurite share this machine's cores, so on a small machine
//! more replicas cannot go faster: the rounds show the cost of coordination, not a cluster's
//! capacity.

use super::compare::{connection_string, sum_metric, Daemon, Spool, NAMESPACE};
use super::procstat::ProcSampler;
use crate::event::CloudEvent;
use crate::identity::{ImdsOptions, ManagedIdentityId};
use crate::ingest::sample::SampleGenerator;
use crate::sinks::amqp::message::{encode_event, MessageOptions};
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use serde::Serialize;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use twinroute_emulator::amqp::{AmqpConfig, AmqpStandIn, HubDef, NamespaceDef, ReceiptHook};
use twinroute_emulator::amqp::{DEV_SAS_KEY, DEV_SAS_KEY_NAME};
use twinroute_emulator::imds::{ImdsConfig, ImdsStandIn};

/// Partitions of each round's input hub.
pub const PARTITIONS: u32 = 8;
/// The hub the replicas route to.
const OUTPUT: &str = "routed";

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleoutOptions {
    /// Replica counts, one round each, in this order.
    pub replicas: Vec<usize>,
    /// Events in each round's backlog.
    pub events: usize,
    pub twins: usize,
    pub seed: u64,
    pub payload_bytes: usize,
    /// The Blob service's account URL (`https://127.0.0.1:10000/devstoreaccount1`).
    pub blob_service: String,
    /// Extra trusted CA certificates (PEM) for it.
    pub ca_file: Option<PathBuf>,
    /// The twinroute binary to run as the replicas.
    pub daemon: PathBuf,
    pub spool: Spool,
    /// The longest a round may take before it is reported incomplete.
    pub round_limit: Duration,
    pub progress: bool,
}

/// One round: N replicas draining the backlog.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub replicas: usize,
    /// Events in the backlog.
    pub published: usize,
    /// Distinct events that reached the output hub.
    pub routed: u64,
    /// Events that reached it more than once (counted per repeat).
    pub duplicates: u64,
    /// From starting the replicas to the first routed event (start-up, partition claims).
    pub first_routed_after_seconds: f64,
    /// From the first routed event to the last.
    pub drain_seconds: f64,
    /// `routed / drain_seconds`.
    pub events_per_second: f64,
    /// This round's rate over the first round's.
    pub scaling: f64,
    /// CPU of all replicas together over the round (start-up included), in cores.
    pub cpu_cores: f64,
    /// The largest resident set of each replica, MB.
    pub rss_mb: Vec<f64>,
    /// Partitions each replica said it owned at the end (its own view: a partition being handed
    /// over can show on two replicas until the new owner's receiver displaces the old one).
    pub owned_partitions: Vec<u64>,
    /// Whether every event was routed within the round's time limit.
    pub complete: bool,
}

/// Every round.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleoutReport {
    pub scenario: String,
    pub partitions: u32,
    pub spool: Spool,
    pub rounds: Vec<RoundReport>,
}

impl ScaleoutReport {
    /// The summary printed at the end.
    pub fn table(&self) -> String {
        let mut out = format!(
            "scenario   {}\n\n\
             replicas  routed    duplicates  drain s  events/s  scaling  CPU cores  RSS MB each      partitions each\n",
            self.scenario
        );
        for r in &self.rounds {
            let rss: Vec<String> = r.rss_mb.iter().map(|m| format!("{m:.0}")).collect();
            let owned: Vec<String> = r.owned_partitions.iter().map(u64::to_string).collect();
            out += &format!(
                "{:<9} {:<9} {:<11} {:<8.2} {:<9.0} {:<8} {:<10.2} {:<16} {}{}\n",
                r.replicas,
                r.routed,
                r.duplicates,
                r.drain_seconds,
                r.events_per_second,
                format!("{:.2}x", r.scaling),
                r.cpu_cores,
                rss.join(" / "),
                owned.join(" / "),
                if r.complete { "" } else { "  INCOMPLETE" },
            );
        }
        out += "\nAll replicas, the stand-ins and the Blob service share this machine's cores.";
        out
    }
}

/// What the output hub received.
#[derive(Default)]
struct Routed {
    state: Mutex<RoutedState>,
}

#[derive(Default)]
struct RoutedState {
    ids: HashSet<String>,
    duplicates: u64,
    first: Option<Instant>,
    /// When the last new event arrived.
    last: Option<Instant>,
}

impl Routed {
    fn record(&self, ids: &[Option<&str>]) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.first.get_or_insert(now);
        for id in ids.iter().flatten() {
            if state.ids.insert((*id).to_owned()) {
                state.last = Some(now);
            } else {
                state.duplicates += 1;
            }
        }
    }

    fn snapshot(&self) -> (u64, u64, Option<Instant>, Option<Instant>) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.ids.len() as u64, state.duplicates, state.first, state.last)
    }

    fn reset(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = RoutedState::default();
    }
}

fn input_hub(round: usize) -> String {
    format!("input-{round}")
}

/// A replica's configuration: the round's hub as its source, everything routed to [`OUTPUT`].
#[allow(clippy::too_many_arguments)]
fn replica_config(
    ingest: &str,
    admin: &str,
    state_dir: Option<&std::path::Path>,
    imds: &str,
    amqp: &str,
    hub: &str,
    container_url: &str,
    ca_file: Option<&std::path::Path>,
) -> String {
    let mut toml = String::new();
    if let Some(dir) = state_dir {
        toml += &format!("state_dir = {:?}\n\n", dir.display().to_string());
    }
    toml += &format!(
        "[ingest]\nlisten = \"{ingest}\"\n\n[admin]\nlisten = \"{admin}\"\n\n\
         [log]\nformat = \"human\"\nlevel = \"warn\"\nsummary_interval_seconds = 0\n\n\
         [identity]\nimds_endpoint = \"{imds}\"\n\n\
         [endpoints.out]\ntype = \"EventHub\"\nconnection_string = \"{}\"\ncustom_endpoint = \"amqp://{amqp}\"\n\n\
         [routes.all]\nendpoint_name = \"out\"\n\n\
         [sources.twins]\ntype = \"eventhubs\"\nnamespace = \"{NAMESPACE}\"\nhub = \"{hub}\"\n\
         custom_endpoint = \"amqp://{amqp}\"\nblob_container_url = \"{container_url}\"\n\
         load_balancing_interval_seconds = 1.0\nownership_expiration_seconds = 5.0\n",
        connection_string(OUTPUT)
    );
    if let Some(ca) = ca_file {
        toml += &format!("ca_file = {:?}\n", ca.display().to_string());
    }
    toml
}

/// The backlog: `events` generated events, encoded as twinroute's Event Hubs endpoints send them
/// (ADT's wire form), with the twin id as partition key.
fn backlog(options: &ScaleoutOptions) -> anyhow::Result<Vec<(Option<String>, Vec<u8>)>> {
    let mut generator = SampleGenerator::new(options.twins, options.seed);
    let mut out = Vec::with_capacity(options.events);
    while out.len() < options.events {
        let n = (options.events - out.len()).min(1000);
        let values = super::batch_values(&mut generator, n, options.payload_bytes, super::unix_nanos());
        let events: Vec<CloudEvent> = super::parse_values(&values)
            .map_err(|e| anyhow::anyhow!("the generator made an invalid event: {e:?}"))?;
        for event in events {
            let key = event.twin_id().map(str::to_owned);
            let bytes =
                encode_event(&event, &MessageOptions { partition_key: key.clone(), session_id: None });
            out.push((key, bytes));
        }
    }
    Ok(out)
}

/// The run's checkpoint container, created for it and deleted after it.
struct Checkpoints {
    client: BlobContainerClient,
    url: String,
}

impl Checkpoints {
    async fn create(options: &ScaleoutOptions, credential: Arc<dyn TokenCredential>) -> anyhow::Result<Self> {
        let http = crate::sinks::http::client(options.ca_file.as_deref()).map_err(anyhow::Error::msg)?;
        let client_options = BlobContainerClientOptions {
            client_options: ClientOptions {
                transport: Some(Transport::new(Arc::new(http))),
                retry: RetryOptions::none(),
                ..Default::default()
            },
            ..Default::default()
        };
        let name = format!("twinroute-loadtest-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let url = format!("{}/{name}", options.blob_service.trim_end_matches('/'));
        let client =
            BlobContainerClient::new(url::Url::parse(&url)?, Some(credential), Some(client_options))?;
        client.create(None).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot create the checkpoint container at {}: {}",
                url,
                crate::sinks::http::error_chain(&e)
            )
        })?;
        Ok(Self { client, url })
    }

    async fn delete(self) {
        let _ = self.client.delete(None).await;
    }
}

/// Runs every round.
pub async fn run(options: &ScaleoutOptions) -> anyhow::Result<ScaleoutReport> {
    let routed = Arc::new(Routed::default());
    let hook = routed.clone();
    let mut namespace = NamespaceDef::new(NAMESPACE);
    namespace.hubs = (0..options.replicas.len())
        .map(|i| HubDef { name: input_hub(i), partition_count: PARTITIONS })
        .chain([HubDef { name: OUTPUT.into(), partition_count: 4 }])
        .collect();
    namespace.sas_keys = vec![(DEV_SAS_KEY_NAME.to_owned(), DEV_SAS_KEY.to_owned())];
    let amqp = AmqpStandIn::start(AmqpConfig {
        namespaces: vec![namespace],
        receipt_hook: Some(ReceiptHook {
            property: "cloudEvents:id".into(),
            callback: Arc::new(move |_entity, ids| hook.record(ids)),
        }),
        ..Default::default()
    })
    .await?;
    let imds = ImdsStandIn::start(ImdsConfig::default()).await?;
    let credential: Arc<dyn TokenCredential> =
        Arc::new(ImdsOptions::new(imds.token_url().parse()?, ManagedIdentityId::SystemAssigned).credential());
    let checkpoints = Checkpoints::create(options, credential).await?;
    let backlog = backlog(options)?;
    let result = rounds(options, &amqp, &imds, &checkpoints.url, &backlog, &routed).await;
    checkpoints.delete().await;
    amqp.shutdown().await;
    let rounds = result?;
    Ok(ScaleoutReport {
        scenario: format!(
            "{} events ({} twins, {} B payload) in a hub of {PARTITIONS} partitions, drained by twinroute \
             replicas ({:?} spool) routing all of them to one event hub; checkpoints in Blob",
            options.events, options.twins, options.payload_bytes, options.spool
        ),
        partitions: PARTITIONS,
        spool: options.spool,
        rounds,
    })
}

async fn rounds(
    options: &ScaleoutOptions,
    amqp: &AmqpStandIn,
    imds: &ImdsStandIn,
    container_url: &str,
    backlog: &[(Option<String>, Vec<u8>)],
    routed: &Routed,
) -> anyhow::Result<Vec<RoundReport>> {
    let mut reports: Vec<RoundReport> = Vec::new();
    // Redrawn in place on a terminal; nothing between the round lines otherwise.
    let progress = options.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    for (round, &count) in options.replicas.iter().enumerate() {
        let hub = input_hub(round);
        for (key, bytes) in backlog {
            amqp.publish(NAMESPACE, &hub, key.as_deref(), std::slice::from_ref(bytes))
                .map_err(anyhow::Error::msg)?;
        }
        routed.reset();
        eprintln!(
            "twinroute loadtest: round {}/{}: {count} replica(s) draining {} events",
            round + 1,
            options.replicas.len(),
            backlog.len()
        );
        let started = Instant::now();
        let replicas = futures::future::try_join_all((0..count).map(|_| {
            Daemon::launch(&options.daemon, options.spool, |ingest, admin, state| {
                replica_config(
                    ingest,
                    admin,
                    state,
                    &imds.token_url(),
                    &amqp.addr().to_string(),
                    &hub,
                    container_url,
                    options.ca_file.as_deref(),
                )
            })
        }))
        .await?;
        let mut samplers: Vec<Option<ProcSampler>> =
            replicas.iter().map(|r| ProcSampler::new(r.pid()).ok()).collect();
        let total = backlog.len() as u64;
        let deadline = started + options.round_limit;
        let mut last_progress = Instant::now();
        let mut seen = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (unique, duplicates, _, _) = routed.snapshot();
            if progress {
                eprint!(
                    "\r  routed {unique}/{total}, {duplicates} duplicates, {:.1} s   ",
                    started.elapsed().as_secs_f64()
                );
            }
            if unique >= total || Instant::now() >= deadline {
                break;
            }
            if unique > seen {
                seen = unique;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > Duration::from_secs(30) {
                eprintln!("twinroute loadtest: nothing routed for 30 s; ending the round");
                break;
            }
        }
        if progress {
            eprintln!();
        }
        // Let late repeats (a partition read again after a move) arrive before counting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut cpu = 0.0;
        let mut rss_mb = Vec::new();
        for sampler in samplers.iter_mut().flatten() {
            let _ = sampler.sample();
            let totals = sampler.totals();
            cpu += totals.cpu_cores_mean;
            rss_mb.push(totals.rss_bytes_max as f64 / 1e6);
        }
        let mut owned_partitions = Vec::new();
        for replica in &replicas {
            let text = replica.metrics().await.unwrap_or_default();
            owned_partitions.push(sum_metric(&text, "twinroute_eventhubs_owned_partitions"));
        }
        futures::future::join_all(replicas.into_iter().map(Daemon::stop)).await;
        let (unique, duplicates, first, last) = routed.snapshot();
        let drain = match (first, last) {
            (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
            _ => 0.0,
        };
        let events_per_second = if drain > 0.0 { unique as f64 / drain } else { 0.0 };
        let scaling = reports.first().map_or(1.0, |r| {
            if r.events_per_second > 0.0 {
                events_per_second / r.events_per_second
            } else {
                0.0
            }
        });
        reports.push(RoundReport {
            replicas: count,
            published: backlog.len(),
            routed: unique,
            duplicates,
            first_routed_after_seconds: first.map_or(0.0, |f| f.duration_since(started).as_secs_f64()),
            drain_seconds: drain,
            events_per_second,
            scaling,
            cpu_cores: cpu,
            rss_mb,
            owned_partitions,
            complete: unique >= total,
        });
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_replica_configuration_is_valid_and_reads_the_rounds_hub() {
        let text = replica_config(
            "127.0.0.1:1",
            "127.0.0.1:2",
            None,
            "http://127.0.0.1:3/metadata/identity/oauth2/token",
            "127.0.0.1:4",
            "input-2",
            "https://127.0.0.1:10000/devstoreaccount1/c",
            Some(std::path::Path::new("/tmp/ca.pem")),
        );
        let config = Config::from_toml(&text, "test", Some(Default::default())).expect("valid");
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.endpoints.len(), 1);
        assert!(text.contains("hub = \"input-2\""));
        assert!(text.contains("ca_file = \"/tmp/ca.pem\""));
    }

    #[test]
    fn the_backlog_is_reproducible_and_keyed_by_twin() {
        let options = ScaleoutOptions {
            replicas: vec![1],
            events: 30,
            twins: 5,
            seed: 3,
            payload_bytes: 512,
            blob_service: String::new(),
            ca_file: None,
            daemon: PathBuf::new(),
            spool: Spool::Memory,
            round_limit: Duration::from_secs(1),
            progress: false,
        };
        let a = backlog(&options).unwrap();
        assert_eq!(a.len(), 30);
        assert!(a.iter().all(|(key, bytes)| key.is_some() && bytes.len() > 512));
        let keys: HashSet<_> = a.iter().map(|(k, _)| k.clone()).collect();
        // The 5 rooms, and the floor their relationships start from.
        assert!(keys.len() > 1 && keys.len() <= 6, "keys are the twins: {keys:?}");
        assert!(keys.iter().flatten().all(|k| k.starts_with("room-") || k == "floor-1"), "{keys:?}");
        let again: Vec<_> = backlog(&options).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(a.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), again);
    }

    #[test]
    fn duplicates_are_counted_and_only_new_events_move_the_end() {
        let routed = Routed::default();
        routed.record(&[Some("a"), Some("b"), None]);
        let (_, _, first, last_after_new) = routed.snapshot();
        std::thread::sleep(Duration::from_millis(5));
        routed.record(&[Some("a")]);
        let (unique, duplicates, first_again, last) = routed.snapshot();
        assert_eq!((unique, duplicates), (2, 1));
        assert_eq!(first, first_again);
        assert_eq!(last, last_after_new, "a repeat does not extend the drain");
        routed.reset();
        assert_eq!(routed.snapshot().0, 0);
    }
}
