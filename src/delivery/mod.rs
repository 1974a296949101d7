//! Delivery: one bounded queue and one worker per endpoint, fed by the dispatcher.
//!
//! The dispatcher holds the current [`Snapshot`] (route table plus the endpoints it routes to)
//! behind an `ArcSwap`: ingest loads it without a lock, a control-plane change builds a new one
//! and swaps it in whole. An endpoint whose configuration did not change keeps its queue and
//! worker across swaps; one that changed or went away drains what it had, against the
//! configuration those events were accepted with, then stops.

use crate::config::EndpointConfig;
use crate::event::CloudEvent;
use crate::routing::{Route, RouteTable};
use crate::sinks::{DeliveryOutcome, Sink, SinkBuildError, SinkFactory};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Most events a worker hands its sink at once.
pub const MAX_BATCH_EVENTS: usize = 256;
/// Backoff between attempts of a failing batch: doubling from the first to the cap. The full
/// retry policy (schedule, TTL, dead-lettering) replaces this with the delivery engine.
const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(200);
const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// An accepted event on its way: shared by every endpoint it was routed to.
#[derive(Debug)]
pub struct Envelope {
    pub event: CloudEvent,
    /// When ingest accepted it, for delivery latency.
    pub received_at: Instant,
    /// The same moment on the wall clock (UTC), for blob paths and dead-letter metadata.
    pub accepted_at: time::OffsetDateTime,
}

impl Envelope {
    pub fn new(event: CloudEvent) -> Self {
        Self { event, received_at: Instant::now(), accepted_at: time::OffsetDateTime::now_utc() }
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
    pub queued: AtomicU64,
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dropped: AtomicU64,
    /// Health and its reason; a watch so tests and the admin API can wait for a change.
    health: tokio::sync::watch::Sender<(Health, Option<String>)>,
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self {
            queued: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            health: tokio::sync::watch::Sender::new((Health::Healthy, None)),
        }
    }
}

impl EndpointStats {
    fn set_health(&self, health: Health, reason: Option<String>) {
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
    sender: mpsc::Sender<Arc<Envelope>>,
    pub stats: Arc<EndpointStats>,
}

impl EndpointHandle {
    pub fn name(&self) -> &str {
        &self.config.name
    }
    /// Events waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
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
    queue_capacity: usize,
    /// Builds the sink of each new or changed endpoint.
    factory: Arc<dyn SinkFactory>,
    /// Every worker ever started, so shutdown can wait for all of them, including those of
    /// endpoints replaced by a reconfiguration and still draining.
    workers: Mutex<Vec<Worker>>,
}

impl Dispatcher {
    /// A dispatcher with no routes and no endpoints.
    pub fn new(queue_capacity: usize, factory: Arc<dyn SinkFactory>) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                table: RouteTable::new(Vec::new()),
                targets: Vec::new(),
                endpoints: BTreeMap::new(),
            }),
            open: AtomicBool::new(true),
            queue_capacity,
            factory,
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
        let current = self.snapshot.load_full();
        let mut handles = BTreeMap::new();
        let mut started = Vec::new();
        for (name, config) in endpoints {
            let handle = match current.endpoints.get(name) {
                Some(h) if h.config == *config => h.clone(),
                _ => {
                    let sink = self.factory.build(config).await?;
                    let (handle, worker) = self.start_endpoint(config.clone(), sink);
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

    fn start_endpoint(&self, config: EndpointConfig, sink: Arc<dyn Sink>) -> (Arc<EndpointHandle>, Worker) {
        let (sender, receiver) = mpsc::channel(self.queue_capacity);
        let stats = Arc::new(EndpointStats::default());
        let name = config.name.clone();
        let worker = tokio::spawn(run_worker(name.clone(), sink, receiver, stats.clone()));
        (Arc::new(EndpointHandle { config, sender, stats: stats.clone() }), (name, stats, worker))
    }

    /// Routes `events` and queues each on every endpoint it matched: all of them, or none
    /// (when a queue is full, or at shutdown). `source` labels the metrics.
    pub fn submit(&self, events: Vec<CloudEvent>, source: &'static str) -> Result<Accepted, Refusal> {
        if !self.open.load(Ordering::Acquire) {
            metrics::counter!("twinroute_events_rejected_total", "reason" => "shutting_down")
                .increment(events.len() as u64);
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
        // Reserve room in every queue first, so a batch is queued whole or not at all.
        let mut permits = Vec::with_capacity(needed.len());
        for (i, &n) in needed.iter().enumerate() {
            if n == 0 {
                permits.push(None);
                continue;
            }
            match snapshot.targets[i].sender.try_reserve_many(n) {
                Ok(p) => permits.push(Some(p)),
                Err(mpsc::error::TrySendError::Full(())) => {
                    metrics::counter!("twinroute_events_rejected_total", "reason" => "backpressure")
                        .increment(events.len() as u64);
                    return Err(Refusal::Full { endpoint: snapshot.targets[i].name().to_owned() });
                }
                Err(mpsc::error::TrySendError::Closed(())) => return Err(Refusal::ShuttingDown),
            }
        }
        let mut accepted = Accepted { events: events.len(), unmatched: 0 };
        let histogram = metrics::histogram!("twinroute_routing_duration_seconds");
        for (event, set) in events.into_iter().zip(&sets) {
            histogram.record(per_event.as_secs_f64());
            if set.is_empty() {
                accepted.unmatched += 1;
                continue;
            }
            let envelope = Arc::new(Envelope::new(event));
            for i in set.iter() {
                let permit = permits[i]
                    .as_mut()
                    .and_then(Iterator::next)
                    .expect("a permit was reserved per routed event");
                permit.send(envelope.clone());
            }
        }
        for (i, &n) in needed.iter().enumerate() {
            if n > 0 {
                let target = &snapshot.targets[i];
                target.stats.queued.fetch_add(n as u64, Ordering::Relaxed);
                metrics::counter!("twinroute_events_routed_total", "endpoint" => target.name().to_owned())
                    .increment(n as u64);
            }
        }
        metrics::counter!("twinroute_events_received_total", "source" => source)
            .increment(accepted.events as u64);
        metrics::counter!("twinroute_events_unmatched_total").increment(accepted.unmatched as u64);
        Ok(accepted)
    }

    /// Stops accepting events; queued ones are still delivered.
    pub fn close_intake(&self) {
        self.open.store(false, Ordering::Release);
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
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
            let delivered = stats.delivered.load(Ordering::Relaxed) + stats.dropped.load(Ordering::Relaxed);
            let remaining = stats.queued.load(Ordering::Relaxed).saturating_sub(delivered);
            if remaining > 0 {
                left.push((name, remaining));
            }
        }
        left
    }
}

async fn run_worker(
    name: String,
    sink: Arc<dyn Sink>,
    mut queue: mpsc::Receiver<Arc<Envelope>>,
    stats: Arc<EndpointStats>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH_EVENTS);
    let depth = metrics::gauge!("twinroute_endpoint_queue_depth", "endpoint" => name.clone());
    let delivered = metrics::counter!("twinroute_events_delivered_total", "endpoint" => name.clone());
    let latency = metrics::histogram!("twinroute_delivery_duration_seconds", "endpoint" => name.clone());
    while queue.recv_many(&mut batch, MAX_BATCH_EVENTS).await > 0 {
        depth.set(queue.len() as f64);
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            match sink.deliver(&batch).await {
                DeliveryOutcome::Delivered => {
                    let n = batch.len() as u64;
                    stats.delivered.fetch_add(n, Ordering::Relaxed);
                    delivered.increment(n);
                    for envelope in &batch {
                        latency.record(envelope.received_at.elapsed().as_secs_f64());
                    }
                    if attempt > 0 {
                        tracing::info!(endpoint = %name, attempts = attempt + 1, "delivery recovered");
                    }
                    stats.set_health(Health::Healthy, None);
                    break;
                }
                DeliveryOutcome::Permanent { reason } => {
                    let n = batch.len() as u64;
                    stats.dropped.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!("twinroute_delivery_failures_total", "endpoint" => name.clone(), "reason" => "permanent").increment(n);
                    metrics::counter!("twinroute_events_dropped_total", "endpoint" => name.clone())
                        .increment(n);
                    tracing::error!(endpoint = %name, events = n, %reason, "delivery refused permanently; events dropped");
                    break;
                }
                DeliveryOutcome::AuthFailure { reason } if !refreshed => {
                    // Once per batch: fresh credentials, then straight back to it.
                    refreshed = true;
                    stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("twinroute_delivery_failures_total", "endpoint" => name.clone(), "reason" => "auth").increment(1);
                    tracing::warn!(endpoint = %name, %reason, "delivery refused for credentials; refreshing them and retrying");
                    sink.refresh_credentials().await;
                }
                outcome @ (DeliveryOutcome::Transient { .. } | DeliveryOutcome::AuthFailure { .. }) => {
                    let (label, health, reason, hint) = match outcome {
                        DeliveryOutcome::Transient { reason, after } => {
                            ("transient", Health::Degraded, reason, after)
                        }
                        DeliveryOutcome::AuthFailure { reason } => ("auth", Health::Unhealthy, reason, None),
                        _ => unreachable!("matched above"),
                    };
                    attempt += 1;
                    stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("twinroute_delivery_failures_total", "endpoint" => name.clone(), "reason" => label).increment(1);
                    let wait = hint.unwrap_or_else(|| backoff(attempt));
                    tracing::warn!(endpoint = %name, attempt, retry_in_ms = wait.as_millis() as u64, %reason, "delivery failed; will retry");
                    stats.set_health(health, Some(reason));
                    tokio::time::sleep(wait).await;
                }
            }
        }
        batch.clear();
        depth.set(queue.len() as f64);
    }
    if let Err(e) = sink.flush().await {
        tracing::error!(endpoint = %name, error = %e, "flushing the endpoint at shutdown failed");
    }
}

fn backoff(attempt: u32) -> Duration {
    RETRY_BACKOFF_FIRST.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(RETRY_BACKOFF_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(2), Duration::from_millis(400));
        assert_eq!(backoff(5), Duration::from_millis(3200));
        assert_eq!(backoff(30), RETRY_BACKOFF_CAP);
    }
}
