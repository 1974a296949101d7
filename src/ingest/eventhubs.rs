//! The `eventhubs` source: twin-change events read from an Event Hubs hub by a group of
//! twinroute replicas that share its partitions.
//!
//! The distribution is Event Hubs' own: `azure_messaging_eventhubs`' `EventProcessor` balances
//! partition ownership across every process of the consumer group through ownership blobs, and
//! keeps each partition's checkpoint in a checkpoint blob (the official
//! `azure_messaging_eventhubs_checkpointstore_blob` store, so the layout is the one every Event
//! Hubs SDK uses: `<namespace>/<hub>/<group>/ownership/<partition>` and `.../checkpoint/<partition>`).
//!
//! The at-least-once rule: a checkpoint is written only after every event up to it was accepted by
//! the dispatcher, which means stored (synced) in the disk spool when there is one, or queued in
//! memory when there is not. A replica that dies therefore loses nothing that its checkpoint
//! covers when it has a disk spool; the replica taking over its partitions starts after the last
//! checkpoint and reads again what came after it, so duplicates are bounded by the checkpoint
//! interval (`checkpoint_every_events` or `checkpoint_interval_seconds`, whichever comes first).
//! Within one process nothing is routed twice: a partition opened again here (the processor
//! built again after a failure, a revoked renewal) skips what this process already accepted.
//!
//! Wire format read: ADT's own Event Hubs format (what twinroute's `EventHub` endpoints send): the
//! body is the event's `data`, the attributes are `cloudEvents:<name>` application properties and
//! `datacontenttype` is the AMQP content type. A message without `cloudEvents:` properties is read
//! as a structured CloudEvent (JSON) body. An event that is neither is logged, counted
//! (`twinroute_eventhubs_events_invalid_total`) and skipped: it cannot be routed, and stopping the
//! partition for it would stop every event behind it.

use crate::config::{Identity, IdentitySpec};
use crate::delivery::{Dispatcher, Refusal};
use crate::event::{from_binary, parse_structured, CloudEvent, EventProblem};
use crate::identity::{IdentityProvider, ManagedIdentityId};
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_messaging_eventhubs::models::{AmqpSimpleValue, ReceivedEventData, StartPositions};
use azure_messaging_eventhubs::processor::PartitionClient;
use azure_messaging_eventhubs::{ConsumerClient, EventProcessor, StartLocation, StartPosition};
use azure_messaging_eventhubs_checkpointstore_blob::BlobCheckpointStore;
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The consumer group when none is named: the one every hub has.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";
/// Checkpoint after this many accepted events of a partition (at most this many duplicates
/// per partition after a replica dies).
pub const DEFAULT_CHECKPOINT_EVERY_EVENTS: u64 = 100;
/// ... or after this long with accepted events not yet checkpointed.
pub const DEFAULT_CHECKPOINT_INTERVAL_SECONDS: f64 = 5.0;
/// How often a replica renews its ownerships and claims its share (the SDK's default is 30 s;
/// shorter reacts faster to a replica joining or leaving, at one List Blobs call per cycle).
pub const DEFAULT_LOAD_BALANCING_INTERVAL_SECONDS: f64 = 10.0;
/// How long an ownership not renewed stays valid: the time until a dead replica's partitions
/// move. Must exceed the load-balancing interval (twice or more is advised).
pub const DEFAULT_OWNERSHIP_EXPIRATION_SECONDS: f64 = 60.0;
/// Events the SDK receives ahead per partition.
pub const DEFAULT_PREFETCH: u32 = 300;
/// How often lag (partition properties) and checkpoint age are measured.
pub const DEFAULT_METRICS_INTERVAL_SECONDS: f64 = 10.0;
/// Events submitted to the dispatcher together, at most.
const SUBMIT_BATCH: usize = 64;
/// How long a partition waits for more events before submitting a partial batch.
const BATCH_WAIT: Duration = Duration::from_millis(20);
/// How long a partition waits before offering a refused batch again (backpressure).
const FULL_WAIT: Duration = Duration::from_millis(50);
/// How long the partition readers may take to write their last checkpoints when twinroute stops.
const READERS_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait before building the processor again after it failed.
const RESTART_WAIT: Duration = Duration::from_secs(3);
/// The metrics `source` label of events from this input.
const SOURCE_LABEL: &str = "eventhubs";

/// Where a partition without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    /// Every event the hub still retains (no event published before the first replica started
    /// is missed).
    #[default]
    Earliest,
    /// Only events published after the partition is first owned.
    Latest,
}

/// `[sources.<name>] type = "eventhubs"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventHubsSourceConfig {
    /// The fully qualified namespace: `contoso.servicebus.windows.net`.
    pub namespace: String,
    /// The event hub's name.
    pub hub: String,
    /// Every replica of one deployment uses the same group; another deployment reading the same
    /// hub needs its own.
    #[serde(default = "default_consumer_group")]
    pub consumer_group: String,
    /// `amqp://host:port` (an emulator, a stand-in) or `amqps://...` (a proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_endpoint: Option<String>,
    /// The managed identity to read with (system-assigned when absent). It needs **Azure Event
    /// Hubs Data Receiver** on the hub and **Storage Blob Data Contributor** on the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySpec>,
    /// The container holding ownership and checkpoint blobs (https://), created beforehand.
    pub blob_container_url: String,
    /// Extra trusted CA certificates (PEM) for the checkpoint container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_checkpoint_every_events")]
    pub checkpoint_every_events: u64,
    #[serde(default = "default_checkpoint_interval_seconds")]
    pub checkpoint_interval_seconds: f64,
    #[serde(default = "default_load_balancing_interval_seconds")]
    pub load_balancing_interval_seconds: f64,
    #[serde(default = "default_ownership_expiration_seconds")]
    pub ownership_expiration_seconds: f64,
    #[serde(default)]
    pub start: StartAt,
    #[serde(default = "default_prefetch")]
    pub prefetch: u32,
    #[serde(default = "default_metrics_interval_seconds")]
    pub metrics_interval_seconds: f64,
}

fn default_consumer_group() -> String {
    DEFAULT_CONSUMER_GROUP.to_owned()
}
fn default_checkpoint_every_events() -> u64 {
    DEFAULT_CHECKPOINT_EVERY_EVENTS
}
fn default_checkpoint_interval_seconds() -> f64 {
    DEFAULT_CHECKPOINT_INTERVAL_SECONDS
}
fn default_load_balancing_interval_seconds() -> f64 {
    DEFAULT_LOAD_BALANCING_INTERVAL_SECONDS
}
fn default_ownership_expiration_seconds() -> f64 {
    DEFAULT_OWNERSHIP_EXPIRATION_SECONDS
}
fn default_prefetch() -> u32 {
    DEFAULT_PREFETCH
}
fn default_metrics_interval_seconds() -> f64 {
    DEFAULT_METRICS_INTERVAL_SECONDS
}

impl EventHubsSourceConfig {
    /// Every problem of the section at once, each naming its key.
    pub fn validate(&self, section: &str) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.namespace.is_empty() || self.namespace.contains('/') {
            problems.push(format!(
                "{section}.namespace: give the fully qualified namespace (contoso.servicebus.windows.net), not a URL"
            ));
        }
        if self.hub.is_empty() {
            problems.push(format!("{section}.hub: the event hub's name is required"));
        }
        if self.consumer_group.is_empty() {
            problems.push(format!("{section}.consumer_group: must not be empty"));
        }
        if let Some(e) = &self.custom_endpoint {
            if url::Url::parse(e).is_err() {
                problems.push(format!("{section}.custom_endpoint: {e:?} is not a URL (amqp://host:port)"));
            }
        }
        match url::Url::parse(&self.blob_container_url) {
            Ok(u) if u.scheme() == "https" => {}
            Ok(_) => problems.push(format!(
                "{section}.blob_container_url: bearer tokens are only sent over https; use an https:// URL"
            )),
            Err(e) => problems.push(format!("{section}.blob_container_url: not a URL ({e})")),
        }
        if let Err(e) = self.identity_id() {
            problems.push(format!("{section}.{e}"));
        }
        if self.checkpoint_every_events == 0 {
            problems.push(format!("{section}.checkpoint_every_events: must be at least 1"));
        }
        for (key, value) in [
            ("checkpoint_interval_seconds", self.checkpoint_interval_seconds),
            ("load_balancing_interval_seconds", self.load_balancing_interval_seconds),
            ("ownership_expiration_seconds", self.ownership_expiration_seconds),
            ("metrics_interval_seconds", self.metrics_interval_seconds),
        ] {
            if !(value.is_finite() && value > 0.0) {
                problems.push(format!("{section}.{key}: must be a positive number of seconds"));
            }
        }
        if self.ownership_expiration_seconds <= self.load_balancing_interval_seconds {
            problems.push(format!(
                "{section}.ownership_expiration_seconds ({}) must be longer than load_balancing_interval_seconds ({}): \
                 otherwise ownerships expire between renewals and replicas keep taking partitions from each other",
                self.ownership_expiration_seconds, self.load_balancing_interval_seconds
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The managed identity this source reads with (named as an endpoint names one).
    pub fn identity_id(&self) -> Result<ManagedIdentityId, String> {
        let identity = self.identity.as_ref().map_or(Ok(Identity::SystemAssigned), IdentitySpec::resolve)?;
        Ok(ManagedIdentityId::from(&identity))
    }
}

/// Why the processor could not be built or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EventHubsSourceError {
    #[error("identity: {0}")]
    Identity(String),
    #[error("checkpoint container {url}: {message}")]
    CheckpointStore { url: String, message: String },
    #[error("event hub {namespace}/{hub}: {message}")]
    EventHubs { namespace: String, hub: String, message: String },
}

/// What the metrics task needs to know about one owned partition.
#[derive(Debug)]
struct PartitionState {
    /// The sequence number of the last event received (accepted or not yet).
    last_received: Option<i64>,
    /// When the last checkpoint was written (or the partition was taken, before the first).
    last_checkpoint: Instant,
    /// Told when the ownership blob names another owner. The SDK's own revocation ends the event
    /// stream only when the next event arrives, so an idle partition would stay "owned" here.
    revoked: Arc<tokio::sync::Notify>,
}

type Owned = Arc<Mutex<HashMap<String, PartitionState>>>;

/// Where this process's acceptance of a partition reached: its last accepted event.
#[derive(Debug, Clone, Copy)]
struct Accepted {
    sequence_number: i64,
    enqueued: SystemTime,
}

/// What this process accepted from each partition, kept across its readers and processors.
///
/// A partition opened again in the same process starts at its last checkpoint, which can be
/// behind what an earlier reader here already read and handed to the dispatcher: when the SDK
/// revokes a partition (a renewal that did not go through) and opens it again at its next
/// balancing while the old reader still drains its receiver, or when the processor is built
/// again after a failure (its readers stop without a last checkpoint). Those events are skipped
/// instead of routed twice. Sequence numbers alone would not do: a hub deleted and created
/// again under the same name numbers from 0 again, and its events, enqueued later than anything
/// accepted here, must not be skipped.
type AcceptedUpTo = Arc<Mutex<HashMap<String, Accepted>>>;

impl Accepted {
    fn of(event: &ReceivedEventData) -> Option<Accepted> {
        Some(Accepted { sequence_number: event.sequence_number()?, enqueued: event.enqueued_time()? })
    }

    /// Whether `event` is at or before this position (so it was accepted already).
    fn covers(&self, event: &ReceivedEventData) -> bool {
        Accepted::of(event).is_some_and(|e| self.covers_position(&e))
    }

    fn covers_position(&self, other: &Accepted) -> bool {
        other.sequence_number <= self.sequence_number && other.enqueued <= self.enqueued
    }
}

/// The process-wide state of a source, kept across rebuilds of the processor.
struct SourceState {
    /// This process's owner id in the ownership blobs (also its connection's name), kept across
    /// rebuilds of the processor so it renews its own ownerships instead of waiting for them to
    /// expire. Unique per process: replicas sharing one would each believe they own everything.
    owner_id: String,
    owned: Owned,
    accepted: AcceptedUpTo,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the source until the task is aborted (at shutdown), building the processor again after
/// any failure (a checkpoint store or hub that cannot be reached, a lost connection).
///
/// When `stop` turns true (twinroute is stopping, intake already closed) it stops reading,
/// checkpoints what the dispatcher accepted if that is on disk, gives up its partitions' ownership
/// so other replicas take them at their next balancing instead of after the ownership expires,
/// and returns.
pub async fn run(
    name: String,
    config: EventHubsSourceConfig,
    dispatcher: Arc<Dispatcher>,
    identity: Arc<IdentityProvider>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let state = SourceState {
        owner_id: format!("twinroute-{}", uuid::Uuid::new_v4()),
        owned: Default::default(),
        accepted: Default::default(),
    };
    let metrics = tokio::spawn(measure(name.clone(), config.clone(), identity.clone(), state.owned.clone()));
    let _stop_metrics = AbortOnDrop(metrics);
    loop {
        match run_once(&name, &config, &dispatcher, &identity, &state, stop.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(source = %name, error = %e, "event hubs source failed; starting again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RESTART_WAIT) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn credential(
    config: &EventHubsSourceConfig,
    identity: &IdentityProvider,
) -> Result<Arc<dyn TokenCredential>, EventHubsSourceError> {
    let id = config.identity_id().map_err(EventHubsSourceError::Identity)?;
    let credential = identity.credential(&id).map_err(|e| EventHubsSourceError::Identity(e.to_string()))?;
    Ok(Arc::new(credential))
}

async fn open_consumer(
    config: &EventHubsSourceConfig,
    credential: Arc<dyn TokenCredential>,
    owner_id: &str,
) -> Result<ConsumerClient, EventHubsSourceError> {
    // The application id is also the connection's id, which the processor uses as its owner id
    // in the ownership blobs: it must be unique per process, or every replica believes it owns
    // what the others claimed (and all of them read every partition).
    let mut builder = ConsumerClient::builder()
        .with_consumer_group(config.consumer_group.clone())
        .with_application_id(owner_id.to_owned());
    if let Some(endpoint) = &config.custom_endpoint {
        builder = builder.with_custom_endpoint(endpoint.clone());
    }
    builder
        .open(&config.namespace, config.hub.clone(), credential)
        .await
        .map_err(|e| hub_error(config, crate::sinks::http::error_chain(&e)))
}

/// The source's failure, naming the hub.
fn hub_error(config: &EventHubsSourceConfig, message: String) -> EventHubsSourceError {
    EventHubsSourceError::EventHubs { namespace: config.namespace.clone(), hub: config.hub.clone(), message }
}

/// The checkpoint container's client: the managed identity, `ca_file`, and the SDK's retries
/// kept short (a failed load-balancing cycle is simply tried again).
fn checkpoint_container(
    config: &EventHubsSourceConfig,
    credential: Arc<dyn TokenCredential>,
) -> Result<BlobContainerClient, EventHubsSourceError> {
    // The URL is checked by `validate`; its query (a SAS) never appears in messages.
    let url = url::Url::parse(&config.blob_container_url).map_err(|e| {
        EventHubsSourceError::CheckpointStore { url: "(not a URL)".into(), message: e.to_string() }
    })?;
    let shown = crate::sinks::http::redact_url(&url);
    let error = |message: String| EventHubsSourceError::CheckpointStore { url: shown.clone(), message };
    let http = crate::sinks::http::client(config.ca_file.as_deref()).map_err(error)?;
    let options = BlobContainerClientOptions {
        client_options: ClientOptions {
            transport: Some(Transport::new(Arc::new(http))),
            retry: RetryOptions::exponential(azure_core::http::ExponentialRetryOptions {
                max_retries: 2,
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    BlobContainerClient::new(url, Some(credential), Some(options))
        .map_err(|e| error(crate::sinks::http::error_chain(&e)))
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn sdk_duration(s: f64) -> azure_core::time::Duration {
    azure_core::time::Duration::milliseconds((s * 1000.0) as i64)
}

async fn run_once(
    name: &str,
    config: &EventHubsSourceConfig,
    dispatcher: &Arc<Dispatcher>,
    identity: &IdentityProvider,
    state: &SourceState,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(), EventHubsSourceError> {
    let (owned, owner_id) = (&state.owned, state.owner_id.as_str());
    if *stopping.borrow() {
        return Ok(());
    }
    let credential = credential(config, identity)?;
    let container = checkpoint_container(config, credential.clone())?;
    let consumer = open_consumer(config, credential, owner_id).await?;
    let store = BlobCheckpointStore::new(container);
    let start = StartPosition {
        location: match config.start {
            StartAt::Earliest => StartLocation::Earliest,
            StartAt::Latest => StartLocation::Latest,
        },
        inclusive: false,
    };
    let processor = EventProcessor::builder()
        .with_update_interval(sdk_duration(config.load_balancing_interval_seconds))
        .with_partition_expiration_duration(sdk_duration(config.ownership_expiration_seconds))
        .with_start_positions(StartPositions { per_partition: HashMap::new(), default: start })
        .with_prefetch(config.prefetch)
        .build(consumer, store.clone())
        .await
        .map_err(|e| hub_error(config, crate::sinks::http::error_chain(&e)))?;
    tracing::info!(source = %name, namespace = %config.namespace, hub = %config.hub, consumer_group = %config.consumer_group, owner_id = %owner_id, "event hubs source started");
    let _watch = AbortOnDrop(tokio::spawn(watch_ownership(
        name.to_owned(),
        config.clone(),
        store.clone(),
        owner_id.to_owned(),
        owned.clone(),
    )));
    let mut partitions = tokio::task::JoinSet::new();
    let (stop, _) = tokio::sync::watch::channel(());
    let runner = {
        let processor = processor.clone();
        tokio::spawn(async move { processor.run().await })
    };
    let mut runner = runner;
    // Told to the readers when twinroute stops: each ends after its last checkpoint.
    let (finish_readers, finishing) = tokio::sync::watch::channel(false);
    let result = loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => break Ok(()),
            finished = &mut runner => {
                let message = match finished {
                    Ok(Ok(())) => "the processor stopped".to_owned(),
                    Ok(Err(e)) => crate::sinks::http::error_chain(&e),
                    Err(e) => e.to_string(),
                };
                break Err(hub_error(config, message));
            }
            next = processor.next_partition_client() => {
                match next {
                    Ok(client) => {
                        // The SDK's event stream is not `Send`: each partition is read on a
                        // blocking-pool thread driving its future on this runtime, and stops
                        // when `stop` is dropped (this function returns or is aborted).
                        let (name, dispatcher, config, owned, accepted) = (
                            name.to_owned(),
                            dispatcher.clone(),
                            config.clone(),
                            owned.clone(),
                            state.accepted.clone(),
                        );
                        let mut stopped = stop.subscribe();
                        let finishing = finishing.clone();
                        let handle = tokio::runtime::Handle::current();
                        partitions.spawn_blocking(move || {
                            handle.block_on(async move {
                                tokio::select! {
                                    broken = read_partition(name, client, dispatcher, config, owned, accepted, finishing) => broken,
                                    _ = stopped.changed() => None,
                                }
                            })
                        });
                    }
                    Err(e) => {
                        runner.abort();
                        break Err(hub_error(config, crate::sinks::http::error_chain(&e)));
                    }
                }
            }
            Some(joined) = partitions.join_next(), if !partitions.is_empty() => {
                if let Ok(Some(broken)) = joined {
                    break Err(hub_error(config, format!("the connection is broken: {broken}")));
                }
            }
        }
    };
    // No more renewals or claims from this process.
    runner.abort();
    if result.is_ok() {
        // Stopping: let the readers write their last checkpoints, then give the partitions up.
        let _ = finish_readers.send(true);
        let finished = async { while partitions.join_next().await.is_some() {} };
        if tokio::time::timeout(READERS_STOP_GRACE, finished).await.is_err() {
            tracing::warn!(source = %name, "partition readers did not finish within {READERS_STOP_GRACE:?}");
        }
        relinquish(name, config, &store, owner_id).await;
    }
    drop(stop);
    while partitions.join_next().await.is_some() {}
    lock(owned).clear();
    metrics::gauge!("twinroute_eventhubs_owned_partitions", "source" => name.to_owned()).set(0.0);
    result
}

/// Each partition's checkpointed sequence number (none when the checkpoints cannot be read).
async fn checkpointed(
    name: &str,
    config: &EventHubsSourceConfig,
    identity: &IdentityProvider,
    store: &mut Option<Arc<BlobCheckpointStore>>,
) -> HashMap<String, i64> {
    use azure_messaging_eventhubs::CheckpointStore as _;
    if store.is_none() {
        match credential(config, identity).and_then(|c| checkpoint_container(config, c)) {
            Ok(container) => *store = Some(BlobCheckpointStore::new(container)),
            Err(e) => {
                tracing::debug!(source = %name, error = %e, "checkpoints not read for the lag");
                return HashMap::new();
            }
        }
    }
    let store = store.as_ref().expect("set above");
    match store.list_checkpoints(&config.namespace, &config.hub, &config.consumer_group).await {
        Ok(list) => list.into_iter().filter_map(|c| Some((c.partition_id, c.sequence_number?))).collect(),
        Err(e) => {
            tracing::debug!(source = %name, error = %crate::sinks::http::error_chain(&e), "checkpoints not read for the lag");
            HashMap::new()
        }
    }
}

/// Gives up this process's ownerships (an empty owner, as the SDKs' processors do when they
/// stop), so the other replicas claim the partitions at their next balancing.
async fn relinquish(name: &str, config: &EventHubsSourceConfig, store: &BlobCheckpointStore, owner_id: &str) {
    use azure_messaging_eventhubs::CheckpointStore as _;
    let listed = store.list_ownerships(&config.namespace, &config.hub, &config.consumer_group).await;
    let ours: Vec<_> = match listed {
        Ok(all) => all
            .into_iter()
            .filter(|o| o.owner_id.as_deref() == Some(owner_id))
            .map(|mut o| {
                o.owner_id = None;
                o
            })
            .collect(),
        Err(e) => {
            tracing::warn!(source = %name, error = %crate::sinks::http::error_chain(&e), "ownerships not listed; the partitions move when they expire");
            return;
        }
    };
    if ours.is_empty() {
        return;
    }
    match store.claim_ownership(&ours).await {
        Ok(given_up) => {
            tracing::info!(source = %name, partitions = given_up.len(), "partition ownerships given up")
        }
        Err(e) => {
            tracing::warn!(source = %name, error = %crate::sinks::http::error_chain(&e), "ownerships not given up; the partitions move when they expire")
        }
    }
}

/// Every load-balancing interval: tells the reader of each partition whose ownership blob names
/// another owner (or has expired) to stop.
async fn watch_ownership(
    name: String,
    config: EventHubsSourceConfig,
    store: Arc<BlobCheckpointStore>,
    owner_id: String,
    owned: Owned,
) {
    use azure_messaging_eventhubs::CheckpointStore as _;
    let expiry = seconds(config.ownership_expiration_seconds);
    let mut ticker = tokio::time::interval(seconds(config.load_balancing_interval_seconds));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let ownerships = match store
            .list_ownerships(&config.namespace, &config.hub, &config.consumer_group)
            .await
        {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(source = %name, error = %crate::sinks::http::error_chain(&e), "ownerships not listed");
                continue;
            }
        };
        let now = time::OffsetDateTime::now_utc();
        let owned = lock(&owned);
        for o in ownerships {
            let ours = o.owner_id.as_deref() == Some(owner_id.as_str());
            let expired = o.last_modified_time.is_some_and(|t| t + expiry < now);
            if !ours || expired {
                if let Some(state) = owned.get(&o.partition_id) {
                    tracing::debug!(source = %name, partition = %o.partition_id, owner = ?o.owner_id, expired, "ownership lost");
                    state.revoked.notify_one();
                }
            }
        }
    }
}

/// Reads one owned partition until it is taken away (another replica's claim, or a receive
/// error), submitting its events and checkpointing behind the dispatcher's acceptance.
async fn read_partition(
    name: String,
    client: Arc<PartitionClient>,
    dispatcher: Arc<Dispatcher>,
    config: EventHubsSourceConfig,
    owned: Owned,
    accepted: AcceptedUpTo,
    mut finishing: tokio::sync::watch::Receiver<bool>,
) -> Option<String> {
    let partition = client.get_partition_id().to_owned();
    // What the dispatcher accepts is on disk: a checkpoint may cover it even when stopping.
    let durable = dispatcher.durable();
    // Set when the connection itself is broken: the SDK does not recover from that, so the
    // whole processor is built again.
    let mut broken = None;
    let revoked = Arc::new(tokio::sync::Notify::new());
    lock(&owned).insert(
        partition.clone(),
        PartitionState { last_received: None, last_checkpoint: Instant::now(), revoked: revoked.clone() },
    );
    let owned_gauge = metrics::gauge!("twinroute_eventhubs_owned_partitions", "source" => name.clone());
    owned_gauge.set(lock(&owned).len() as f64);
    tracing::info!(source = %name, partition = %partition, "partition owned: reading");
    let received = metrics::counter!("twinroute_eventhubs_events_received_total", "source" => name.clone());
    let invalid = metrics::counter!("twinroute_eventhubs_events_invalid_total", "source" => name.clone());
    let reread = metrics::counter!("twinroute_eventhubs_events_reread_total", "source" => name.clone());
    // Told once per reader when it reads again what this process accepted (see `AcceptedUpTo`).
    let mut skipping = false;
    let checkpoints = metrics::counter!("twinroute_eventhubs_checkpoints_total", "source" => name.clone(), "result" => "ok");
    let checkpoint_failures = metrics::counter!("twinroute_eventhubs_checkpoints_total", "source" => name.clone(), "result" => "error");
    let interval = seconds(config.checkpoint_interval_seconds);
    // A batch never spans more than one checkpoint interval, so a checkpoint is at most
    // `checkpoint_every_events` behind what was read and accepted.
    let batch_limit = config.checkpoint_every_events.min(SUBMIT_BATCH as u64);
    let why_stopped = {
        let mut stream = std::pin::pin!(client.stream_events());
        let mut batch: Vec<CloudEvent> = Vec::with_capacity(SUBMIT_BATCH);
        // The last event accepted and not yet checkpointed, and how many are behind it.
        let mut uncheckpointed: Option<ReceivedEventData> = None;
        let mut since_checkpoint = 0u64;
        let mut last_checkpoint = Instant::now();
        let mut last_in_batch: Option<ReceivedEventData> = None;
        // The last event this reader took. The SDK's receiver can hand events over again after
        // it recovers from a dropped connection, some of them still in the open batch (so not
        // yet in `accepted`): taken twice, they would be routed twice.
        let mut taken: Option<Accepted> = None;
        // Events received since the last submission (valid or skipped).
        let mut pending = 0u64;
        loop {
            // Wait briefly for more when a batch is open; otherwise until the checkpoint is due.
            let wait = if !batch.is_empty() || last_in_batch.is_some() {
                BATCH_WAIT
            } else if uncheckpointed.is_some() {
                interval.saturating_sub(last_checkpoint.elapsed()).max(Duration::from_millis(1))
            } else {
                interval
            };
            let mut stopping = false;
            let next = tokio::select! {
                next = tokio::time::timeout(wait, stream.next()) => next,
                _ = revoked.notified() => Ok(None),
                _ = finishing.wait_for(|f| *f) => {
                    stopping = true;
                    Ok(None)
                }
            };
            let mut ended = None;
            match next {
                Ok(Some(Ok(event))) => {
                    received.increment(1);
                    // Looked up for each event: an old reader of this partition may still be
                    // draining its receiver while this one starts.
                    let before = lock(&accepted).get(&partition).copied();
                    let again = taken.filter(|t| t.covers(&event));
                    if let Some(before) = before.filter(|a| a.covers(&event)).or(again) {
                        if !skipping {
                            tracing::info!(source = %name, partition = %partition, from = ?event.sequence_number(), to = before.sequence_number, "reading again what this process already took: skipped, not routed twice");
                            skipping = true;
                        }
                        reread.increment(1);
                        // Taken here already: for the lag it counts as read (a partition opened
                        // again at an older checkpoint has no work left once it has skipped up).
                        note_received(&owned, &partition, event.sequence_number());
                        continue;
                    }
                    pending += 1;
                    taken = Accepted::of(&event).or(taken);
                    match to_cloud_event(&event) {
                        Ok(e) => batch.push(e),
                        Err(problems) => {
                            invalid.increment(1);
                            tracing::warn!(
                                source = %name, partition = %partition, sequence_number = ?event.sequence_number(),
                                problems = %crate::event::describe_problems(&problems),
                                "event refused: not a CloudEvent; skipped"
                            );
                        }
                    }
                    last_in_batch = Some(event);
                    if (batch.len() as u64) < batch_limit {
                        continue;
                    }
                }
                Ok(Some(Err(e))) => {
                    let text = crate::sinks::http::error_chain(&e);
                    if text.contains("Connection dropped") || text.contains("Failed to ensure AMQP CBS") {
                        broken = Some(text.clone());
                    }
                    ended = Some(format!("receive failed: {text}"))
                }
                Ok(None) if stopping => ended = Some("twinroute is stopping".to_owned()),
                Ok(None) => ended = Some("the receiver was closed (ownership moved)".to_owned()),
                Err(_elapsed) => {}
            }
            // Submit what is batched; the checkpoint may move only past accepted events. (When
            // stopping, intake is closed: the batch is refused and read again by the next owner.)
            if let Some(last) = last_in_batch.take() {
                // For the lag gauge: once per batch, not per event.
                note_received(&owned, &partition, last.sequence_number());
                // Submitted and recorded in a task of its own: a reader is cancelled when the
                // processor is built again, and if that happened while the dispatcher took the
                // batch (the disk spool syncs it first) the events would be routed but not
                // recorded, and the next reader here would route them again.
                let submitting = {
                    let (dispatcher, accepted, partition) =
                        (dispatcher.clone(), accepted.clone(), partition.clone());
                    let (mut events, position) = (std::mem::take(&mut batch), Accepted::of(&last));
                    tokio::spawn(async move {
                        let taken = submit(&dispatcher, &mut events).await;
                        if let (true, Some(position)) = (taken, position) {
                            // Only forward: an old reader finishing its last batch must not move
                            // the position back behind what a newer one accepted.
                            let mut accepted = lock(&accepted);
                            if !accepted.get(&partition).is_some_and(|a| a.covers_position(&position)) {
                                accepted.insert(partition, position);
                            }
                        }
                        taken
                    })
                };
                let taken = match submitting.await {
                    Ok(taken) => taken,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => false,
                };
                if taken {
                    since_checkpoint += std::mem::take(&mut pending);
                    uncheckpointed = Some(last);
                } else {
                    // Refused: twinroute is stopping. What was accepted before may still be
                    // checkpointed below.
                    stopping = true;
                    ended = Some("twinroute is stopping".to_owned());
                }
            }
            let due =
                since_checkpoint >= config.checkpoint_every_events || last_checkpoint.elapsed() >= interval;
            // When stopping with the spool in memory, what was accepted may yet be lost with the
            // process: no last checkpoint, the next owner reads it again.
            if (due || ended.is_some()) && uncheckpointed.is_some() && (!stopping || durable) {
                let event = uncheckpointed.take().expect("checked");
                match client.update_checkpoint(&event).await {
                    Ok(()) => {
                        checkpoints.increment(1);
                        since_checkpoint = 0;
                        last_checkpoint = Instant::now();
                        if let Some(state) = lock(&owned).get_mut(&partition) {
                            state.last_checkpoint = last_checkpoint;
                        }
                        tracing::debug!(source = %name, partition = %partition, sequence_number = ?event.sequence_number(), "checkpoint written");
                    }
                    Err(e) => {
                        // Kept: the next checkpoint covers these events too.
                        checkpoint_failures.increment(1);
                        tracing::warn!(source = %name, partition = %partition, error = %crate::sinks::http::error_chain(&e), "checkpoint not written; trying again with the next one");
                        uncheckpointed = Some(event);
                    }
                }
            }
            if let Some(why) = ended {
                break why;
            }
        }
    };
    finish(&name, &partition, client, &owned, &owned_gauge, &why_stopped).await;
    broken
}

/// Releases a partition: closes its receiver so the processor opens it again (here or on the
/// replica that took it), and forgets it in the metrics.
async fn finish(
    name: &str,
    partition: &str,
    client: Arc<PartitionClient>,
    owned: &Owned,
    owned_gauge: &metrics::Gauge,
    why: &str,
) {
    tracing::info!(source = %name, partition = %partition, reason = why, "partition released");
    {
        let mut owned = lock(owned);
        owned.remove(partition);
        owned_gauge.set(owned.len() as f64);
    }
    metrics::gauge!("twinroute_eventhubs_partition_lag", "source" => name.to_owned(), "partition" => partition.to_owned())
        .set(0.0);
    metrics::gauge!("twinroute_eventhubs_checkpoint_age_seconds", "source" => name.to_owned(), "partition" => partition.to_owned())
        .set(0.0);
    match Arc::try_unwrap(client) {
        Ok(client) => {
            let closed = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
            if let Ok(Err(e)) = closed {
                tracing::debug!(source = %name, partition = %partition, error = %crate::sinks::http::error_chain(&e), "closing the partition receiver failed");
            }
        }
        Err(_) => {
            tracing::debug!(source = %name, partition = %partition, "partition client still shared; not closed")
        }
    }
}

/// For the lag gauge: the last sequence number read from `partition`.
fn note_received(owned: &Owned, partition: &str, sequence_number: Option<i64>) {
    if let (Some(seq), Some(state)) = (sequence_number, lock(owned).get_mut(partition)) {
        state.last_received = Some(seq);
    }
}

/// Offers `batch` to the dispatcher until it is accepted, waiting out backpressure. False when
/// twinroute is shutting down (the events are then not accepted, and not checkpointed).
async fn submit(dispatcher: &Dispatcher, batch: &mut Vec<CloudEvent>) -> bool {
    while !batch.is_empty() {
        match dispatcher.submit_from(batch, SOURCE_LABEL).await {
            Ok(_) => return true,
            Err(Refusal::ShuttingDown) => return false,
            Err(Refusal::Storage(e)) => {
                tracing::warn!(error = %e, "events from event hubs could not be stored; trying again");
                tokio::time::sleep(FULL_WAIT * 10).await;
            }
            Err(Refusal::Full { .. } | Refusal::Bytes { .. } | Refusal::SpoolFull { .. }) => {
                tokio::time::sleep(FULL_WAIT).await;
            }
        }
    }
    true
}

/// The application property prefix ADT's Event Hubs format gives attributes.
const ATTRIBUTE_PREFIX: &str = "cloudEvents:";

fn simple_value_text(value: &AmqpSimpleValue) -> Option<String> {
    Some(match value {
        AmqpSimpleValue::String(s) => s.clone(),
        AmqpSimpleValue::Symbol(s) => s.0.clone(),
        AmqpSimpleValue::Boolean(b) => b.to_string(),
        AmqpSimpleValue::Int(n) => n.to_string(),
        AmqpSimpleValue::Long(n) => n.to_string(),
        AmqpSimpleValue::UInt(n) => n.to_string(),
        AmqpSimpleValue::ULong(n) => n.to_string(),
        _ => return None,
    })
}

/// The CloudEvent a received message carries (see the module doc for the two formats).
pub fn to_cloud_event(event: &ReceivedEventData) -> Result<CloudEvent, Vec<EventProblem>> {
    let data = event.event_data();
    let body = data.body().unwrap_or_default();
    let attributes: Vec<(String, String)> = data
        .properties()
        .into_iter()
        .flatten()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix(ATTRIBUTE_PREFIX)?;
            Some((name.to_ascii_lowercase(), simple_value_text(value)?))
        })
        .collect();
    if attributes.is_empty() {
        return parse_structured(body);
    }
    // `from_binary` percent-decodes header values (the HTTP binding); AMQP properties are not
    // encoded, so encode them first and the decoding gives them back exactly.
    let encoded: Vec<(String, String)> = attributes
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string(),
            )
        })
        .collect();
    let headers: Vec<(&str, &[u8])> = encoded.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
    from_binary(&headers, data.content_type(), bytes::Bytes::copy_from_slice(body))
}

/// Every `metrics_interval_seconds`: each owned partition's lag (last enqueued sequence number
/// from the partition properties minus the last received) and checkpoint age.
async fn measure(name: String, config: EventHubsSourceConfig, identity: Arc<IdentityProvider>, owned: Owned) {
    let mut ticker = tokio::time::interval(seconds(config.metrics_interval_seconds));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut management: Option<ConsumerClient> = None;
    let mut store: Option<Arc<BlobCheckpointStore>> = None;
    loop {
        ticker.tick().await;
        let partitions: Vec<(String, Option<i64>, f64)> = lock(&owned)
            .iter()
            .map(|(p, s)| (p.clone(), s.last_received, s.last_checkpoint.elapsed().as_secs_f64()))
            .collect();
        for (partition, _, age) in &partitions {
            metrics::gauge!("twinroute_eventhubs_checkpoint_age_seconds", "source" => name.clone(), "partition" => partition.clone())
                .set(*age);
        }
        if partitions.is_empty() {
            continue;
        }
        if management.is_none() {
            let client = match credential(&config, &identity) {
                Ok(c) => open_consumer(&config, c, &format!("twinroute-{}", uuid::Uuid::new_v4())).await,
                Err(e) => Err(e),
            };
            match client {
                Ok(c) => management = Some(c),
                Err(e) => {
                    tracing::debug!(source = %name, error = %e, "lag not measured");
                    continue;
                }
            }
        }
        let client = management.as_ref().expect("set above");
        // A partition that received nothing since it was taken is read from its checkpoint: the
        // lag counts from there (a caught-up partition taken over has none).
        let checkpoints = if partitions.iter().any(|(_, last, _)| last.is_none()) {
            checkpointed(&name, &config, &identity, &mut store).await
        } else {
            HashMap::new()
        };
        for (partition, last_received, _) in partitions {
            match client.get_partition_properties(&partition).await {
                Ok(p) => {
                    let lag = match last_received.or_else(|| checkpoints.get(&partition).copied()) {
                        Some(seq) => (p.last_enqueued_sequence_number - seq).max(0),
                        None if p.is_empty => 0,
                        // No checkpoint and nothing received yet: everything retained is ahead.
                        None => (p.last_enqueued_sequence_number - p.beginning_sequence_number + 1).max(0),
                    };
                    metrics::gauge!("twinroute_eventhubs_partition_lag", "source" => name.clone(), "partition" => partition)
                        .set(lag as f64);
                }
                Err(e) => {
                    tracing::debug!(source = %name, partition = %partition, error = %crate::sinks::http::error_chain(&e), "partition properties not read");
                    management = None;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<EventHubsSourceConfig, String> {
        let text = format!(
            "namespace = 'contoso.servicebus.windows.net'\nhub = 'twins'\nblob_container_url = 'https://acct.blob.core.windows.net/checkpoints'\n{extra}"
        );
        toml::from_str(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn an_accepted_position_covers_what_was_read_before_it_and_not_a_recreated_hubs_events() {
        let at = |sequence_number, secs| Accepted {
            sequence_number,
            enqueued: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        };
        let accepted = at(209, 1_000);
        assert!(accepted.covers_position(&at(209, 1_000)), "the last accepted event itself");
        assert!(accepted.covers_position(&at(201, 999)), "an earlier one, read again");
        assert!(!accepted.covers_position(&at(217, 1_001)), "a later one");
        // A hub deleted and created again numbers from 0, with events enqueued later.
        assert!(!accepted.covers_position(&at(3, 2_000)), "a recreated hub's event");
    }

    #[test]
    fn defaults_are_the_named_constants() {
        let c = config("").unwrap();
        assert_eq!(c.consumer_group, "$Default");
        assert_eq!(c.checkpoint_every_events, DEFAULT_CHECKPOINT_EVERY_EVENTS);
        assert_eq!(c.start, StartAt::Earliest);
        assert_eq!(c.identity_id().unwrap(), ManagedIdentityId::SystemAssigned);
        c.validate("sources.hub").unwrap();
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        assert!(config("bogus = 1").unwrap_err().contains("bogus"));
        let mut c = config("checkpoint_every_events = 0\nload_balancing_interval_seconds = 90.0").unwrap();
        c.blob_container_url = "http://acct/c".into();
        c.identity =
            Some(IdentitySpec { identity_type: "UserAssigned".into(), user_assigned_identity: None });
        let problems = c.validate("sources.hub").unwrap_err();
        let text = problems.join("\n");
        for key in
            ["checkpoint_every_events", "blob_container_url", "identity", "ownership_expiration_seconds"]
        {
            assert!(text.contains(&format!("sources.hub.{key}")), "{key} missing in {text}");
        }
    }
}
