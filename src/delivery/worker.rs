//! One endpoint's worker: takes events from the endpoint's queue in batches (by count, bytes and
//! a short linger), delivers them through the sink, and acts on the outcome the sink reports:
//! delivered; transient (each event retried on the policy's schedule, honouring server hints);
//! auth failure (credentials refreshed once, then retried like a transient failure while the
//! endpoint is reported unhealthy); permanent (dead-lettered at once). Events past their
//! time-to-live or out of attempts are dead-lettered, or, with no dead-letter store, dropped and
//! counted. While an endpoint is failing no new events are sent to it before the next retry is
//! due, and its retry buffer is bounded: the queue then backs up and ingest answers 503.

use super::deadletter::{DeadLetterRecord, DeadLetterStore};
use super::queue::QueueReader;
use super::retry::{Decision, GiveUp, RetryPolicy};
use super::{EndpointStats, Envelope, Health};
use crate::sinks::{DeliveryOutcome, Sink};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;

/// First and longest wait between attempts to write a dead letter while the store fails.
const DEAD_LETTER_RETRY_FIRST: Duration = Duration::from_secs(1);
const DEAD_LETTER_RETRY_CAP: Duration = Duration::from_secs(60);

/// What a worker needs.
pub(super) struct WorkerContext {
    pub name: String,
    pub sink: Arc<dyn Sink>,
    pub dead_letters: Option<Arc<dyn DeadLetterStore>>,
    pub policy: RetryPolicy,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub linger: Duration,
    /// Most events held for retry before the worker stops taking new ones.
    pub max_retrying: usize,
    /// Most batches delivered at once (1 keeps an endpoint's events in order).
    pub concurrency: usize,
    pub stats: Arc<EndpointStats>,
}

/// An event with its delivery history at this endpoint.
struct Pending {
    envelope: Arc<Envelope>,
    attempts: u32,
    first_attempt: Option<OffsetDateTime>,
    last_attempt: Option<OffsetDateTime>,
    last_error: Option<String>,
}

impl Pending {
    fn new(envelope: Arc<Envelope>) -> Self {
        Self { envelope, attempts: 0, first_attempt: None, last_attempt: None, last_error: None }
    }

    /// Age since acceptance (what the time-to-live counts).
    fn age(&self) -> Duration {
        self.envelope.received_at.elapsed()
    }
}

struct Worker {
    ctx: WorkerContext,
    /// The endpoint's queue, told when each event is done.
    queue: Box<dyn QueueReader>,
    /// Events waiting for their retry, by due time (ties in arrival order).
    retries: BTreeMap<(Instant, u64), Pending>,
    sequence: u64,
    /// Events taken from the queue and not yet in a batch.
    inbox: VecDeque<Arc<Envelope>>,
    /// After a failure: no new events are sent before this (the endpoint is probed by retries).
    blocked_until: Option<Instant>,
    /// Whether credentials were refreshed since the last success (once per failure streak).
    refreshed: bool,
    /// `twinroute_events_delivered_total` and `twinroute_delivery_duration_seconds` of this
    /// endpoint, looked up once (a lookup per batch hashed the labels and cloned the name).
    delivered: metrics::Counter,
    latency: metrics::Histogram,
}

pub(super) async fn run(ctx: WorkerContext, queue: Box<dyn QueueReader>) {
    let name = ctx.name.clone();
    let sink = ctx.sink.clone();
    let concurrency = ctx.concurrency.max(1);
    let mut worker = Worker {
        ctx,
        queue,
        retries: BTreeMap::new(),
        sequence: 0,
        inbox: VecDeque::new(),
        blocked_until: None,
        refreshed: false,
        delivered: metrics::counter!("twinroute_events_delivered_total", "endpoint" => name.clone()),
        latency: metrics::histogram!("twinroute_delivery_duration_seconds", "endpoint" => name.clone()),
    };
    let depth = metrics::gauge!("twinroute_endpoint_queue_depth", "endpoint" => name.clone());
    let retrying = metrics::gauge!("twinroute_endpoint_retrying", "endpoint" => name.clone());
    let in_flight_gauge = metrics::gauge!("twinroute_endpoint_in_flight", "endpoint" => name.clone());
    // Deliveries under way (at most `concurrency`), each yielding its batch and outcome.
    let mut in_flight: FuturesUnordered<BoxFuture<'static, (Vec<Pending>, DeliveryOutcome)>> =
        FuturesUnordered::new();
    let mut in_flight_events = 0usize;
    let mut closed = false;
    loop {
        depth.set((worker.queue.len() + worker.inbox.len()) as f64);
        retrying.set(worker.retries.len() as f64);
        in_flight_gauge.set(in_flight_events as f64);
        worker.ctx.stats.retrying.store(worker.retries.len() as u64, Ordering::Relaxed);
        let now = Instant::now();
        if worker.blocked_until.is_some_and(|b| b <= now) {
            worker.blocked_until = None;
        }
        // Start what may start: due retries first, then new events.
        if in_flight.len() < concurrency {
            let batch = if worker.retries.keys().next().is_some_and(|k| k.0 <= now) {
                worker.due_retries(now)
            } else if worker.may_take_new() && !worker.inbox.is_empty() {
                worker.fresh_batch()
            } else {
                Vec::new()
            };
            if !batch.is_empty() {
                in_flight_events += batch.len();
                in_flight.push(worker.start(batch));
                continue;
            }
        }
        if closed && worker.inbox.is_empty() && worker.retries.is_empty() && in_flight.is_empty() {
            break;
        }
        let next_retry = worker.retries.keys().next().map(|k| k.0);
        let wake = match (next_retry, worker.blocked_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let room = in_flight.len() < concurrency;
        let may_receive = room && !closed && worker.may_take_new() && worker.inbox.is_empty();
        tokio::select! {
            Some((batch, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                in_flight_events -= batch.len();
                worker.handle(batch, outcome).await;
            }
            received = receive(&mut worker.inbox, &mut worker.queue, worker.ctx.batch_max_events, worker.ctx.linger), if may_receive => {
                if !received {
                    closed = true;
                }
            }
            () = sleep_until(wake), if wake.is_some() && room => {}
            // Unreachable by the checks above (something is always in flight, due or awaited);
            // yielding keeps a mistake from becoming a crash.
            else => tokio::task::yield_now().await,
        }
    }
    if let Err(e) = sink.flush().await {
        tracing::error!(endpoint = %name, error = %e, "closing the endpoint failed");
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Takes what the queue holds (at least one event, waiting for it), then lingers briefly for
/// more. False when the queue is closed and empty.
async fn receive(
    inbox: &mut VecDeque<Arc<Envelope>>,
    queue: &mut Box<dyn QueueReader>,
    max: usize,
    linger: Duration,
) -> bool {
    let mut buffer = Vec::with_capacity(max);
    if queue.recv_many(&mut buffer, max).await == 0 {
        return false;
    }
    if !linger.is_zero() && buffer.len() < max {
        let until = Instant::now() + linger;
        while buffer.len() < max {
            let room = max - buffer.len();
            match tokio::time::timeout_at(until, queue.recv_many(&mut buffer, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    inbox.extend(buffer);
    true
}

impl Worker {
    /// Whether new events may be sent: not while failing before the next retry is due, and not
    /// with a full retry buffer.
    fn may_take_new(&self) -> bool {
        self.blocked_until.is_none() && self.retries.len() < self.ctx.max_retrying
    }

    /// Up to a batch of new events, by count and bytes (at least one).
    fn fresh_batch(&mut self) -> Vec<Pending> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(next) = self.inbox.front() {
            let size = next.event.size_hint();
            if !batch.is_empty()
                && (batch.len() >= self.ctx.batch_max_events || bytes + size > self.ctx.batch_max_bytes)
            {
                break;
            }
            bytes += size;
            batch.push(Pending::new(self.inbox.pop_front().expect("front exists")));
        }
        batch
    }

    /// Every retry due by `now`, up to a batch.
    fn due_retries(&mut self, now: Instant) -> Vec<Pending> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(entry) = self.retries.first_entry() {
            let size = entry.get().envelope.event.size_hint();
            if entry.key().0 > now
                || (!batch.is_empty()
                    && (batch.len() >= self.ctx.batch_max_events || bytes + size > self.ctx.batch_max_bytes))
            {
                break;
            }
            bytes += size;
            batch.push(entry.remove());
        }
        batch
    }

    /// Counts an attempt of each event and starts delivering the batch.
    fn start(&mut self, mut batch: Vec<Pending>) -> BoxFuture<'static, (Vec<Pending>, DeliveryOutcome)> {
        let now = OffsetDateTime::now_utc();
        for p in &mut batch {
            p.attempts += 1;
            p.first_attempt.get_or_insert(now);
            p.last_attempt = Some(now);
        }
        let sink = self.ctx.sink.clone();
        Box::pin(async move {
            let envelopes: Vec<Arc<Envelope>> = batch.iter().map(|p| p.envelope.clone()).collect();
            let outcome = sink.deliver(&envelopes).await;
            (batch, outcome)
        })
    }

    /// Acts on the outcome of a delivery.
    async fn handle(&mut self, batch: Vec<Pending>, outcome: DeliveryOutcome) {
        let stats = self.ctx.stats.clone();
        let name = self.ctx.name.clone();
        let outcome = match outcome {
            DeliveryOutcome::Partial { delivered, rest } => {
                // The delivered events are done; the others get the rest of the outcome.
                let mut done = Vec::new();
                let mut left = Vec::new();
                for (i, p) in batch.into_iter().enumerate() {
                    if delivered.contains(&i) {
                        done.push(p);
                    } else {
                        left.push(p);
                    }
                }
                Box::pin(self.handle(done, DeliveryOutcome::Delivered)).await;
                if left.is_empty() {
                    return;
                }
                return Box::pin(self.handle(left, *rest)).await;
            }
            other => other,
        };
        let batch = batch;
        match outcome {
            DeliveryOutcome::Partial { .. } => unreachable!("split above"),
            DeliveryOutcome::Delivered => {
                let n = batch.len() as u64;
                stats.delivered.fetch_add(n, Ordering::Relaxed);
                self.delivered.increment(n);
                for p in &batch {
                    self.latency.record(p.envelope.received_at.elapsed().as_secs_f64());
                    self.queue.done(&p.envelope);
                }
                if stats.health().0 != Health::Healthy {
                    tracing::info!(endpoint = %name, "delivery recovered");
                }
                stats.set_health(Health::Healthy, None);
                self.blocked_until = None;
                self.refreshed = false;
            }
            DeliveryOutcome::Permanent { reason } => {
                metrics::counter!("twinroute_delivery_failures_total", "endpoint" => name.clone(), "reason" => "permanent")
                    .increment(1);
                tracing::error!(endpoint = %name, events = batch.len(), %reason, "delivery refused permanently");
                stats.set_health(Health::Unhealthy, Some(reason.clone()));
                for mut p in batch {
                    p.last_error = Some(reason.clone());
                    self.give_up(p, GiveUp::Permanent).await;
                }
            }
            DeliveryOutcome::AuthFailure { reason } if !self.refreshed => {
                // Once per failure streak: fresh credentials, then straight back to it.
                self.refreshed = true;
                stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("twinroute_delivery_failures_total", "endpoint" => name.clone(), "reason" => "auth")
                    .increment(1);
                tracing::warn!(endpoint = %name, %reason, "delivery refused for credentials; refreshing them and retrying");
                self.ctx.sink.refresh_credentials().await;
                for mut p in batch {
                    p.last_error = Some(reason.clone());
                    self.schedule(p, Instant::now());
                }
            }
            DeliveryOutcome::Transient { reason, after } => self.failed(batch, reason, after, false).await,
            DeliveryOutcome::AuthFailure { reason } => self.failed(batch, reason, None, true).await,
        }
    }

    /// A transient or persisting auth failure: each event retried on the schedule or given up.
    async fn failed(&mut self, batch: Vec<Pending>, reason: String, hint: Option<Duration>, auth: bool) {
        let stats = self.ctx.stats.clone();
        let name = self.ctx.name.clone();
        let label = if auth { "auth" } else { "transient" };
        stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("twinroute_delivery_failures_total", "endpoint" => name.clone(), "reason" => label)
            .increment(1);
        stats.set_health(if auth { Health::Unhealthy } else { Health::Degraded }, Some(reason.clone()));
        let now = Instant::now();
        let mut earliest: Option<Duration> = None;
        let mut retried = 0u64;
        // One draw of jitter per batch: events of a batch that share a history keep their order.
        let random = fastrand::f64();
        for mut p in batch {
            p.last_error = Some(reason.clone());
            match self.ctx.policy.decide(p.attempts, p.age(), hint, random) {
                Decision::RetryAfter(wait) => {
                    earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
                    retried += 1;
                    self.schedule(p, now + wait);
                }
                Decision::GiveUp(why) => self.give_up(p, why).await,
            }
        }
        metrics::counter!("twinroute_delivery_retries_total", "endpoint" => name.clone()).increment(retried);
        if let Some(wait) = earliest {
            self.blocked_until = Some(now + wait);
            tracing::warn!(endpoint = %name, events = retried, retry_in_ms = wait.as_millis() as u64, %reason, "delivery failed; will retry");
        }
    }

    fn schedule(&mut self, p: Pending, at: Instant) {
        self.sequence += 1;
        self.retries.insert((at, self.sequence), p);
    }

    /// Dead-letters an event (retrying the store until it takes it), or, with no store, drops
    /// it: counted and logged, never silently.
    async fn give_up(&mut self, p: Pending, why: GiveUp) {
        let name = self.ctx.name.clone();
        let stats = &self.ctx.stats;
        let Some(store) = self.ctx.dead_letters.clone() else {
            self.queue.done(&p.envelope);
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("twinroute_events_dropped_total", "endpoint" => name.clone(), "reason" => why.as_str()).increment(1);
            tracing::warn!(
                endpoint = %name,
                event = p.envelope.event.id(),
                reason = why.as_str(),
                attempts = p.attempts,
                last_error = p.last_error.as_deref().unwrap_or(""),
                "event dropped: given up on, and the endpoint has no dead-letter store"
            );
            return;
        };
        let record = DeadLetterRecord {
            endpoint: &name,
            envelope: &p.envelope,
            reason: why,
            attempts: p.attempts,
            first_attempt: p.first_attempt,
            last_attempt: p.last_attempt,
            last_error: p.last_error.as_deref(),
        };
        let mut wait = DEAD_LETTER_RETRY_FIRST;
        loop {
            match store.put(&record).await {
                DeliveryOutcome::Delivered => break,
                outcome => {
                    tracing::error!(endpoint = %name, store = %store.describe(), ?outcome, retry_in_s = wait.as_secs(), "the dead-letter store refused an event; retrying");
                    metrics::counter!("twinroute_dead_letter_failures_total", "endpoint" => name.clone())
                        .increment(1);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(DEAD_LETTER_RETRY_CAP);
                }
            }
        }
        self.queue.done(&p.envelope);
        stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("twinroute_events_dead_lettered_total", "endpoint" => name.clone(), "reason" => why.as_str()).increment(1);
        tracing::warn!(endpoint = %name, event = p.envelope.event.id(), reason = why.as_str(), attempts = p.attempts, "event dead-lettered");
    }
}
