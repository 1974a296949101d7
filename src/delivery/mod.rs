//! Delivery: one bounded queue and one worker per endpoint, fed by the dispatcher.
//!
//! The dispatcher holds the current [`Snapshot`] (route table plus the endpoints it routes to)
//! behind an `ArcSwap`: ingest loads it without a lock, a control-plane change builds a new one
//! and swaps it in whole. An endpoint whose configuration did not change keeps its queue and
//! worker across swaps; one that changed or went away drains what it had, against the
//! configuration those events were accepted with, then stops.

pub mod deadletter;
pub mod queue;
pub mod retry;
pub mod spool;
mod worker;

use crate::config::{DeliveryConfig, EndpointConfig};
use crate::event::CloudEvent;
use crate::routing::{Route, RouteTable};
use crate::sinks::{Sink, SinkBuildError, SinkFactory};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// An accepted event on its way: shared by every endpoint it was routed to.
#[derive(Debug)]
pub struct Envelope {
    pub event: CloudEvent,
    /// When ingest accepted it, on tokio's clock: delivery latency and the time-to-live count
    /// from it (a paused test clock drives both).
    pub received_at: tokio::time::Instant,
    /// The same moment on the wall clock (UTC), for blob paths, TTLs and dead-letter metadata.
    pub accepted_at: time::OffsetDateTime,
    /// Its share of the queued-bytes budget, given back when the last endpoint is done with it.
    /// `None` in memory for an event the durable spool keeps on disk only (accepted while the
    /// budget was spent): endpoints read it from the spool when they get to it.
    budget: Option<BudgetShare>,
    /// Its sequence number in the durable spool (0 when not spooled).
    spool_seq: AtomicU64,
}

impl Envelope {
    pub fn new(event: CloudEvent) -> Self {
        Self {
            event,
            received_at: tokio::time::Instant::now(),
            accepted_at: time::OffsetDateTime::now_utc(),
            budget: None,
            spool_seq: AtomicU64::new(0),
        }
    }

    /// An event accepted earlier (`accepted_at`), read back from the spool: its age, for the
    /// time-to-live and latency, counts from then.
    pub(crate) fn restored(event: CloudEvent, accepted_at: time::OffsetDateTime, seq: u64) -> Self {
        let age = (time::OffsetDateTime::now_utc() - accepted_at).max(time::Duration::ZERO);
        let now = tokio::time::Instant::now();
        let received_at =
            std::time::Duration::try_from(age).ok().and_then(|age| now.checked_sub(age)).unwrap_or(now);
        Self { event, received_at, accepted_at, budget: None, spool_seq: AtomicU64::new(seq) }
    }

    /// Whether the event is held in memory for its endpoints (else they read it from the spool).
    fn in_memory(&self) -> bool {
        self.budget.is_some()
    }
}

/// Bytes taken from the dispatcher's budget by one envelope.
#[derive(Debug)]
struct BudgetShare {
    budget: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// An endpoint's health, as `/readyz` and the admin API report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The last delivery succeeded (or none was needed yet).
    Healthy,
    /// Deliveries are failing and being retried.
    Degraded,
    /// Deliveries fail for a reason that needs an operator (credentials, permissions).
    Unhealthy,
}

/// Counters and state of one endpoint, read by the admin API.
#[derive(Debug)]
pub struct EndpointStats {
    /// Events routed to the endpoint.
    pub queued: AtomicU64,
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    /// Events given up on and written to the dead-letter store.
    pub dead_lettered: AtomicU64,
    /// Events given up on with no dead-letter store (counted and logged, as ADT drops them).
    pub dropped: AtomicU64,
    /// Events waiting for a retry (in the worker, out of the queue).
    pub retrying: AtomicU64,
    /// Health and its reason; a watch so tests and the admin API can wait for a change.
    health: tokio::sync::watch::Sender<(Health, Option<String>)>,
    /// `twinroute_endpoint_health{endpoint}`: 0 healthy, 1 degraded, 2 unhealthy.
    health_gauge: Option<metrics::Gauge>,
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self {
            queued: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            retrying: AtomicU64::new(0),
            health: tokio::sync::watch::Sender::new((Health::Healthy, None)),
            health_gauge: None,
        }
    }
}

impl EndpointStats {
    /// Events accepted for this endpoint and not yet delivered, dead-lettered or dropped.
    pub fn outstanding(&self) -> u64 {
        let done = self.delivered.load(Ordering::Relaxed)
            + self.dead_lettered.load(Ordering::Relaxed)
            + self.dropped.load(Ordering::Relaxed);
        self.queued.load(Ordering::Relaxed).saturating_sub(done)
    }

    /// Stats of the endpoint `name`, exporting its health as a metric.
    pub fn named(name: &str) -> Self {
        let gauge = metrics::gauge!("twinroute_endpoint_health", "endpoint" => name.to_owned());
        gauge.set(0.0);
        Self { health_gauge: Some(gauge), ..Self::default() }
    }

    fn set_health(&self, health: Health, reason: Option<String>) {
        if let Some(g) = &self.health_gauge {
            g.set(health as u8 as f64);
        }
        self.health.send_if_modified(|current| {
            let changed = current.0 != health || current.1 != reason;
            *current = (health, reason);
            changed
        });
    }

    pub fn health(&self) -> (Health, Option<String>) {
        self.health.borrow().clone()
    }

    /// Waits until the health satisfies `condition`; returns it with its reason.
    pub async fn wait_for_health(&self, condition: impl Fn(Health) -> bool) -> (Health, Option<String>) {
        let mut rx = self.health.subscribe();
        let result = rx.wait_for(|(h, _)| condition(*h)).await.map(|v| v.clone());
        result.unwrap_or_else(|_| self.health())
    }
}

/// One endpoint's queue, as the dispatcher sees it. Dropping the last handle closes the queue;
/// the worker then drains it and stops.
pub struct EndpointHandle {
    pub config: EndpointConfig,
    /// The retry and batching settings its worker runs with (the defaults in force when it
    /// started, with the endpoint's overrides): a reload that changes them replaces the worker.
    settings: DeliveryConfig,
    queue: Box<dyn queue::QueueWriter>,
    pub stats: Arc<EndpointStats>,
    /// `twinroute_events_routed_total{endpoint}`, looked up once rather than per submission.
    routed: metrics::Counter,
}

impl EndpointHandle {
    pub fn name(&self) -> &str {
        &self.config.name
    }
    /// Events waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }
}

/// The routes and endpoints in force: swapped whole on every change.
pub struct Snapshot {
    pub table: RouteTable,
    /// `targets[i]` is the endpoint `table.endpoints()[i]`.
    targets: Vec<Arc<EndpointHandle>>,
    /// Every endpoint, routed to or not.
    pub endpoints: BTreeMap<String, Arc<EndpointHandle>>,
}

/// Why a submission was refused. Nothing of it was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the queue of endpoint {endpoint} is full")]
    Full { endpoint: String },
    #[error(
        "{queued} bytes of events are waiting for delivery, the limit is {limit} (delivery.max_queued_bytes)"
    )]
    Bytes { queued: usize, limit: usize },
    #[error(
        "the spool holds {used} bytes of events waiting for delivery, the limit is {limit} (spool.max_bytes)"
    )]
    SpoolFull { used: u64, limit: u64 },
    #[error("the events could not be stored: {0}")]
    Storage(String),
    #[error("twinroute is shutting down and accepts no more events")]
    ShuttingDown,
}

/// What happened to an accepted submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accepted {
    pub events: usize,
    /// Events that matched no route: accepted and dropped, as ADT does, and counted.
    pub unmatched: usize,
}

/// A started worker: its endpoint's name, its counters, its task.
type Worker = (String, Arc<EndpointStats>, JoinHandle<()>);

/// Routes events to endpoint queues and owns the workers.
pub struct Dispatcher {
    snapshot: ArcSwap<Snapshot>,
    /// Cleared at shutdown: from then on every submission is refused.
    open: AtomicBool,
    /// Queue sizes and the byte bound, fixed for the process's life.
    config: DeliveryConfig,
    /// The retry and batching defaults endpoints override: `config`'s at first, replaced by
    /// [`Dispatcher::apply_with_defaults`] (a configuration reload).
    defaults: ArcSwap<DeliveryConfig>,
    /// Bytes of accepted events not yet done with (all endpoints): the backpressure bound.
    queued_bytes: Arc<AtomicUsize>,
    /// Builds the sink of each new or changed endpoint.
    factory: Arc<dyn SinkFactory>,
    /// Makes each endpoint's queue (in memory by default).
    queues: Arc<dyn queue::QueueBackend>,
    /// Every worker ever started, so shutdown can wait for all of them, including those of
    /// endpoints replaced by a reconfiguration and still draining.
    workers: Mutex<Vec<Worker>>,
}

impl Dispatcher {
    /// A dispatcher with no routes and no endpoints.
    pub fn new(config: DeliveryConfig, factory: Arc<dyn SinkFactory>) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                table: RouteTable::new(Vec::new()),
                targets: Vec::new(),
                endpoints: BTreeMap::new(),
            }),
            open: AtomicBool::new(true),
            defaults: ArcSwap::from_pointee(config.clone()),
            config,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            factory,
            queues: Arc::new(queue::MemoryQueues),
            workers: Mutex::new(Vec::new()),
        }
    }

    /// The sink factory, to ask whether an endpoint can be served before accepting it.
    pub fn factory(&self) -> &dyn SinkFactory {
        &*self.factory
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Makes `endpoints` and `routes` the configuration in force, atomically. Endpoints whose
    /// configuration is unchanged keep their queue; new or changed ones get a new sink and worker.
    /// On error nothing changes.
    pub async fn apply(
        &self,
        endpoints: &BTreeMap<String, EndpointConfig>,
        routes: Vec<Route>,
    ) -> Result<(), SinkBuildError> {
        self.apply_inner(self.defaults.load_full(), endpoints, routes).await
    }

    /// [`Dispatcher::apply`] with new retry and batching defaults (`[delivery]` of a reloaded
    /// configuration; its queue sizes and byte bound are ignored: they need a restart). Endpoints
    /// whose effective settings change get a new worker; the old one drains what it had with
    /// the settings those events were accepted under. On error nothing changes.
    pub async fn apply_with_defaults(
        &self,
        defaults: &DeliveryConfig,
        endpoints: &BTreeMap<String, EndpointConfig>,
        routes: Vec<Route>,
    ) -> Result<(), SinkBuildError> {
        let defaults = Arc::new(DeliveryConfig {
            queue_capacity: self.config.queue_capacity,
            max_queued_bytes: self.config.max_queued_bytes,
            shutdown_timeout_seconds: self.config.shutdown_timeout_seconds,
            ..defaults.clone()
        });
        self.apply_inner(defaults.clone(), endpoints, routes).await?;
        self.defaults.store(defaults);
        Ok(())
    }

    /// The retry and batching defaults in force (see [`Dispatcher::apply_with_defaults`]).
    pub fn defaults(&self) -> Arc<DeliveryConfig> {
        self.defaults.load_full()
    }

    async fn apply_inner(
        &self,
        defaults: Arc<DeliveryConfig>,
        endpoints: &BTreeMap<String, EndpointConfig>,
        routes: Vec<Route>,
    ) -> Result<(), SinkBuildError> {
        let current = self.snapshot.load_full();
        let mut handles = BTreeMap::new();
        let mut started = Vec::new();
        for (name, config) in endpoints {
            let settings = defaults.with(config.spec.delivery.as_ref());
            let handle = match current.endpoints.get(name) {
                Some(h) if h.config == *config && h.settings == settings => h.clone(),
                _ => {
                    let sink = self.factory.build(config).await?;
                    let dead_letters = self.factory.dead_letters(config).await?;
                    let (handle, worker) = self.start_endpoint(config.clone(), settings, sink, dead_letters);
                    started.push(worker);
                    handle
                }
            };
            handles.insert(name.clone(), handle);
        }
        let table = RouteTable::new(routes);
        let targets = table
            .endpoints()
            .iter()
            .map(|name| {
                handles.get(name).cloned().ok_or_else(|| SinkBuildError::Unsupported {
                    endpoint: name.clone(),
                    endpoint_type: "missing".into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.workers.lock().unwrap_or_else(|e| e.into_inner()).extend(started);
        self.snapshot.store(Arc::new(Snapshot { table, targets, endpoints: handles }));
        Ok(())
    }

    fn start_endpoint(
        &self,
        config: EndpointConfig,
        settings: DeliveryConfig,
        sink: Arc<dyn Sink>,
        dead_letters: Option<Arc<dyn deadletter::DeadLetterStore>>,
    ) -> (Arc<EndpointHandle>, Worker) {
        let (writer, reader) = self.queues.open(&config.name, self.config.queue_capacity);
        let stats = Arc::new(EndpointStats::named(&config.name));
        // Events a durable queue kept from an earlier run count as queued for this endpoint.
        stats.queued.store(reader.len() as u64, Ordering::Relaxed);
        let name = config.name.clone();
        let context = worker::WorkerContext {
            name: name.clone(),
            sink,
            dead_letters,
            policy: retry::RetryPolicy::from_config(&settings),
            batch_max_events: settings.batch_max_events,
            batch_max_bytes: settings.batch_max_bytes,
            linger: Duration::from_millis(settings.linger_ms),
            // Hold at most a queue's worth of events for retry; beyond that the queue backs up
            // and ingest answers 503.
            max_retrying: self.config.queue_capacity,
            concurrency: settings.concurrency,
            stats: stats.clone(),
        };
        let task = tokio::spawn(worker::run(context, reader));
        let routed = metrics::counter!("twinroute_events_routed_total", "endpoint" => name.clone());
        (
            Arc::new(EndpointHandle { config, settings, queue: writer, stats: stats.clone(), routed }),
            (name, stats, task),
        )
    }

    /// Routes `events` and queues each on every endpoint it matched: all of them, or none
    /// (when a queue or the spool is full, or at shutdown). With a durable spool, returns once
    /// the events are stored. `source` labels the metrics.
    pub async fn submit(
        &self,
        mut events: Vec<CloudEvent>,
        source: &'static str,
    ) -> Result<Accepted, Refusal> {
        self.submit_from(&mut events, source).await
    }

    /// [`Dispatcher::submit`] for callers that offer the same events again when refused (file
    /// sources waiting out backpressure): the events are taken from `events` only when accepted.
    pub async fn submit_from(
        &self,
        events: &mut Vec<CloudEvent>,
        source: &'static str,
    ) -> Result<Accepted, Refusal> {
        let (accepted, durability) = self.queue(events)?;
        if let queue::Durability::Pending(stored) = durability {
            let result = stored.await.unwrap_or_else(|_| Err("the spool stopped".to_owned()));
            if let Err(e) = result {
                metrics::counter!("twinroute_events_rejected_total", "reason" => "storage")
                    .increment(accepted.events as u64);
                return Err(Refusal::Storage(e));
            }
        }
        metrics::counter!("twinroute_events_received_total", "source" => source)
            .increment(accepted.events as u64);
        metrics::counter!("twinroute_events_unmatched_total").increment(accepted.unmatched as u64);
        Ok(accepted)
    }

    /// Routes and queues; the durable part, if any, is left to the caller to wait for.
    fn queue(&self, events: &mut Vec<CloudEvent>) -> Result<(Accepted, queue::Durability), Refusal> {
        let rejected = |reason: &'static str, n: usize| {
            metrics::counter!("twinroute_events_rejected_total", "reason" => reason).increment(n as u64);
        };
        if !self.open.load(Ordering::Acquire) {
            rejected("shutting_down", events.len());
            return Err(Refusal::ShuttingDown);
        }
        let snapshot = self.snapshot.load();
        let started = Instant::now();
        let sets: Vec<_> = events.iter().map(|e| snapshot.table.route(e)).collect();
        let per_event = started.elapsed() / events.len().max(1) as u32;
        let mut needed = vec![0usize; snapshot.targets.len()];
        for set in &sets {
            for i in set.iter() {
                needed[i] += 1;
            }
        }
        // The byte bound first: memory stays bounded whatever the queue lengths. A spilling
        // (disk) backend accepts beyond it and keeps those events on disk only.
        let sizes: Vec<usize> =
            events.iter().zip(&sets).map(|(e, s)| if s.is_empty() { 0 } else { e.size_hint() }).collect();
        let bytes: usize = sizes.iter().sum();
        let queued = self.queued_bytes.load(Ordering::Acquire);
        let over_budget = bytes > 0 && queued + bytes > self.config.max_queued_bytes;
        if over_budget && !self.queues.spills() {
            rejected("backpressure", events.len());
            return Err(Refusal::Bytes { queued, limit: self.config.max_queued_bytes });
        }
        let mut accepted = Accepted { events: events.len(), unmatched: 0 };
        let histogram = metrics::histogram!("twinroute_routing_duration_seconds");
        let mut routed = Vec::with_capacity(events.len());
        // Events that matched no route, with their places (kept only to give a refused
        // submission back in its order; usually none, so no allocation).
        let mut unmatched = Vec::new();
        for (i, ((event, set), bytes)) in std::mem::take(events).into_iter().zip(sets).zip(sizes).enumerate()
        {
            histogram.record(per_event.as_secs_f64());
            if set.is_empty() {
                accepted.unmatched += 1;
                unmatched.push((i, event));
                continue;
            }
            let mut envelope = Envelope::new(event);
            if !over_budget {
                self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
                envelope.budget = Some(BudgetShare { budget: self.queued_bytes.clone(), bytes });
            }
            routed.push((Arc::new(envelope), set));
        }
        let targets: Vec<&dyn queue::QueueWriter> = snapshot.targets.iter().map(|t| &*t.queue).collect();
        let result =
            self.queues.append(queue::Routed { targets: &targets, events: routed, per_target: &needed });
        let durability = match result {
            Ok(d) => d,
            Err((refused, routed)) => {
                // Nothing was queued: give the caller its events back, in their order (the
                // envelopes are ours alone, and dropping them gives their budget back).
                events.extend(routed.into_iter().map(|(envelope, _)| {
                    Arc::try_unwrap(envelope).map(|e| e.event).unwrap_or_else(|shared| shared.event.clone())
                }));
                // In ascending order of place, so each lands where it was.
                for (i, event) in unmatched {
                    events.insert(i, event);
                }
                let refusal = match refused {
                    queue::ReserveError::Full { target } => {
                        Refusal::Full { endpoint: snapshot.targets[target].name().to_owned() }
                    }
                    queue::ReserveError::SpoolFull { used, limit } => Refusal::SpoolFull { used, limit },
                    queue::ReserveError::Storage(e) => Refusal::Storage(e),
                    queue::ReserveError::Closed => Refusal::ShuttingDown,
                };
                let reason = match refusal {
                    Refusal::Storage(_) => "storage",
                    Refusal::ShuttingDown => "shutting_down",
                    _ => "backpressure",
                };
                rejected(reason, events.len());
                return Err(refusal);
            }
        };
        for (i, &n) in needed.iter().enumerate() {
            if n > 0 {
                let target = &snapshot.targets[i];
                target.stats.queued.fetch_add(n as u64, Ordering::Relaxed);
                target.routed.increment(n as u64);
            }
        }
        Ok((accepted, durability))
    }

    /// Stops accepting events; queued ones are still delivered.
    pub fn close_intake(&self) {
        self.open.store(false, Ordering::Release);
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Whether an accepted event is on disk (a disk spool) rather than only in memory: what an
    /// input may promise its source when it acknowledges events (an Event Hubs checkpoint).
    pub fn durable(&self) -> bool {
        self.queues.spills()
    }

    /// Stops intake, lets every queue drain for up to `deadline`, then stops what is left.
    /// Returns, per endpoint, the events that were not delivered (empty when all drained).
    pub async fn shutdown(&self, deadline: Duration) -> Vec<(String, u64)> {
        self.close_intake();
        // Drop our senders: each queue closes once in-flight submissions let go of theirs.
        self.snapshot.store(Arc::new(Snapshot {
            table: RouteTable::new(Vec::new()),
            targets: Vec::new(),
            endpoints: BTreeMap::new(),
        }));
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        let until = tokio::time::Instant::now() + deadline;
        let mut left = Vec::new();
        for (name, stats, mut worker) in workers {
            if tokio::time::timeout_at(until, &mut worker).await.is_err() {
                worker.abort();
                let _ = worker.await;
            }
            let remaining = stats.outstanding();
            if remaining > 0 {
                left.push((name, remaining));
            }
        }
        left
    }
}

impl Dispatcher {
    /// Uses `queues` for the endpoints started from now on (instead of in-memory queues).
    pub fn with_queues(mut self, queues: Arc<dyn queue::QueueBackend>) -> Self {
        self.queues = queues;
        self
    }

    /// Why accepted events can no longer be stored (the disk spool failed), if so.
    pub fn storage_failure(&self) -> Option<String> {
        self.queues.failure()
    }

    /// Bytes of accepted events held for delivery now (the backpressure gauge).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }
}
