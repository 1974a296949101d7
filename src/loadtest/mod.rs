//! `twinroute loadtest`: drives a daemon's HTTP ingest with a reproducible ADT event stream
//! (the sample twin population: creates, JSON-Patch updates, telemetry, relationships, deletes)
//! and reports throughput and acceptance latency.
//!
//! Open loop by default: each connection sends its batches on a fixed schedule, and a batch's
//! latency counts from when it was *due*, not from when it went out, so a stalled server shows
//! up as latency instead of silently lowering the send rate (no coordinated omission).

pub mod chart;
pub mod command;
pub mod compare;
pub mod direct;
pub mod procstat;
pub mod progress;
pub mod scaleout;

use crate::event::CloudEvent;
use crate::ingest::sample::SampleGenerator;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The ingest base URL (`/events` is appended).
    pub target: String,
    /// Events per second in total; `None`: as fast as the server takes them (closed loop).
    pub rate: Option<f64>,
    /// With a rate: ramp linearly from `rate` at the start to this at the end of `duration`.
    pub ramp_to: Option<f64>,
    pub duration: Duration,
    /// Events per request.
    pub batch: usize,
    /// Concurrent connections (each with its own share of the rate).
    pub connections: usize,
    /// Twins in the generated population.
    pub twins: usize,
    pub seed: u64,
    /// Pad each event's data to about this many bytes (0: as generated, about 400 bytes).
    pub payload_bytes: usize,
    /// Sent but not measured at the start (connections opening, links attaching): the
    /// percentiles describe the steady state. The timeline shows it all.
    pub warmup: Duration,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// One interval (about a second) of a run, for the chart and the JSON report's timeline.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Sample {
    /// Seconds from the start of the run to the end of this interval.
    pub t: f64,
    /// Events accepted (202) per second in this interval.
    pub accepted_per_second: f64,
    /// Events received at the stand-ins per second in this interval (end-to-end runs only).
    pub received_per_second: Option<f64>,
    /// Latency in this interval, microseconds: end to end when measured, else the 202's.
    pub p50_us: u64,
    pub p99_us: u64,
    /// The daemon's CPU use in this interval, in cores (1.0 = one core busy), when measured.
    pub cpu_cores: Option<f64>,
    /// The daemon's resident set at the end of this interval, bytes, when measured.
    pub rss_bytes: Option<u64>,
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub target: String,
    /// The requested rate (events/s), or `null` for as fast as possible.
    pub rate: Option<f64>,
    /// The rate at the end of a ramp (from `rate` at the start), or `null` for a constant rate.
    pub ramp_to: Option<f64>,
    pub duration_seconds: f64,
    pub batch: usize,
    pub connections: usize,
    pub requests: u64,
    pub events_sent: u64,
    /// Events answered with 202.
    pub events_accepted: u64,
    /// Events answered with 503 (backpressure).
    pub events_refused: u64,
    /// Requests that failed otherwise (other statuses, connection errors).
    pub errors: u64,
    /// The first few error messages, for the reader.
    pub error_samples: Vec<String>,
    pub accepted_per_second: f64,
    /// From when a request was due (open loop) or sent (closed loop) to its acceptance (the
    /// 202), microseconds.
    pub latency_us: Percentiles,
    /// Messages received at the stand-ins since the run started (including the drain after it),
    /// when they are observed.
    pub received: Option<u64>,
    /// Messages received at the stand-ins per second during the run (sustained end-to-end
    /// throughput), when observed.
    pub received_per_second: Option<f64>,
    /// From when an event was due to its receipt at the stand-ins, microseconds, when observed.
    pub end_to_end_us: Option<Percentiles>,
    /// The daemon's mean CPU use in cores over the run, when its process is observed.
    pub cpu_cores_mean: Option<f64>,
    /// The daemon's largest resident set seen, bytes, when its process is observed.
    pub rss_bytes_max: Option<u64>,
    /// About one sample per second.
    pub timeline: Vec<Sample>,
}

impl LoadReport {
    /// The summary table printed at the end of a run.
    pub fn table(&self) -> String {
        let rate = match (self.rate, self.ramp_to) {
            (Some(from), Some(to)) => format!("ramp {from:.0}/s to {to:.0}/s"),
            (Some(r), None) => format!("{r:.0}/s"),
            (None, _) => "max".to_owned(),
        };
        let mut out = format!(
            "target          {}\n\
             rate            {rate} for {:.1} s, {} events/request, {} connections\n\
             events          {} sent, {} accepted, {} refused (503), {} request errors\n\
             throughput      {:.0} events/s accepted\n\
             accepted in     {}",
            self.target,
            self.duration_seconds,
            self.batch,
            self.connections,
            self.events_sent,
            self.events_accepted,
            self.events_refused,
            self.errors,
            self.accepted_per_second,
            self.latency_us.line(),
        );
        if let (Some(received), Some(per_second)) = (self.received, self.received_per_second) {
            out += &format!(
                "\nreceived        {received} messages at the stand-ins, {per_second:.0}/s during the run"
            );
        }
        if let Some(e2e) = &self.end_to_end_us {
            out += &format!("\nend to end      {}", e2e.line());
        }
        if let (Some(cpu), Some(rss)) = (self.cpu_cores_mean, self.rss_bytes_max) {
            out += &format!(
                "\ndaemon          {cpu:.3} cores (mean), {:.1} MB resident (max)",
                rss as f64 / 1e6
            );
        }
        out
    }
}

impl Percentiles {
    /// `p50 … µs, p90 …, p99 …, p99.9 …, max …`.
    pub fn line(&self) -> String {
        format!(
            "p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

/// The extension attribute carrying when an event was due to be sent (Unix time in
/// nanoseconds, a string): the stand-ins read it on receipt for end-to-end latency. Through
/// twinroute it arrives as the application property `cloudEvents:loadtestsent`.
pub const SENT_EXTENSION: &str = "loadtestsent";

/// How long a connection waits after a 503 when sending as fast as possible.
const REFUSED_BACKOFF: Duration = Duration::from_millis(20);

/// Now, as Unix nanoseconds.
pub fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// One generated batch: `batch` events, data padded to `payload_bytes`, stamped with `sent`
/// (Unix nanoseconds) in [`SENT_EXTENSION`].
pub fn batch_values(
    generator: &mut SampleGenerator,
    batch: usize,
    payload_bytes: usize,
    sent: u128,
) -> Vec<serde_json::Value> {
    (0..batch)
        .map(|_| {
            let event = generator.next_event();
            let mut value: serde_json::Value =
                serde_json::from_slice(&event.to_structured_json()).expect("generated events are JSON");
            let size = event.size_hint();
            if payload_bytes > size {
                if let Some(data) = value.get_mut("data").and_then(|d| d.as_object_mut()) {
                    data.insert("padding".into(), "x".repeat(payload_bytes - size).into());
                }
            }
            value[SENT_EXTENSION] = sent.to_string().into();
            value
        })
        .collect()
}

/// One generated batch body (a JSON array of structured events).
#[cfg(test)]
fn batch_body(generator: &mut SampleGenerator, batch: usize, payload_bytes: usize) -> String {
    serde_json::Value::Array(batch_values(generator, batch, payload_bytes, unix_nanos())).to_string()
}

/// Generated events as twinroute's events, for targets that do not go through HTTP (the
/// error is the request's outcome: the generator made an invalid event).
pub(crate) fn parse_values(events: &[serde_json::Value]) -> Result<Vec<CloudEvent>, SendOutcome> {
    events
        .iter()
        .map(|v| crate::event::parse_structured(v.to_string().as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|problems| SendOutcome::Error(format!("a generated event is invalid: {problems:?}")))
}

/// What became of one request.
#[derive(Debug)]
pub enum SendOutcome {
    /// Taken (202, or queued by the pipeline, or accepted by the service).
    Accepted,
    /// Refused for now (503, backpressure).
    Refused,
    /// Failed otherwise; the message says how.
    Error(String),
}

/// Where the load goes: a daemon's ingest, a configuration's endpoints, or the service directly.
#[async_trait::async_trait]
pub trait Target: Send + Sync {
    /// Sends one batch of structured events on behalf of connection `connection`.
    async fn send(&self, connection: usize, events: Vec<serde_json::Value>) -> SendOutcome;
}

/// A daemon's HTTP ingest.
pub struct HttpIngest {
    url: String,
    client: reqwest::Client,
    /// `Authorization: Bearer …` when the ingest requires a token.
    authorization: Option<reqwest::header::HeaderValue>,
}

impl HttpIngest {
    /// Posts to `<base>/events` over up to `connections` kept-alive connections.
    pub fn new(base: &str, connections: usize) -> Self {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client");
        Self { url: format!("{}/events", base.trim_end_matches('/')), client, authorization: None }
    }

    /// Sends `token` as a bearer token with every request.
    pub fn with_token(mut self, token: &str) -> Result<Self, String> {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the token has characters a header cannot carry".to_owned())?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }
}

#[async_trait::async_trait]
impl Target for HttpIngest {
    async fn send(&self, _connection: usize, events: Vec<serde_json::Value>) -> SendOutcome {
        let body = serde_json::Value::Array(events).to_string();
        let mut request =
            self.client.post(&self.url).header("content-type", "application/cloudevents-batch+json");
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        let response = request.body(body).send().await;
        match response {
            Ok(r) if r.status() == 202 => SendOutcome::Accepted,
            Ok(r) if r.status() == 503 => SendOutcome::Refused,
            Ok(r) => SendOutcome::Error(format!("HTTP {}", r.status())),
            Err(e) => SendOutcome::Error(e.to_string()),
        }
    }
}

/// Measurements taken alongside the load, once per interval.
#[derive(Default)]
pub struct Observers {
    /// Receipts at the stand-ins (end-to-end latency).
    pub receipts: Option<Arc<Receipts>>,
    /// The daemon's process.
    pub process: Option<procstat::ProcSampler>,
    /// Draw a progress line on stderr.
    pub progress: bool,
}

/// Latency histograms: the whole run and the current interval.
struct Histograms {
    total: Histogram<u64>,
    interval: Histogram<u64>,
}

impl Histograms {
    fn new() -> Self {
        Self {
            total: Histogram::new(3).expect("a histogram"),
            interval: Histogram::new(3).expect("a histogram"),
        }
    }

    /// Records in the interval (the timeline shows everything) and, when `measured` (past the
    /// warm-up), in the total.
    fn record(&mut self, micros: u64, measured: bool) {
        if measured {
            let _ = self.total.record(micros);
        }
        let _ = self.interval.record(micros);
    }

    /// (p50, p99) of the interval, which starts over.
    fn take_interval(&mut self) -> (u64, u64) {
        let h = &mut self.interval;
        let p = if h.is_empty() { (0, 0) } else { (h.value_at_quantile(0.5), h.value_at_quantile(0.99)) };
        h.reset();
        p
    }
}

/// Events received at the stand-ins, with their end-to-end latency (from when each was due to
/// be sent, read from [`SENT_EXTENSION`], to its receipt).
pub struct Receipts {
    state: std::sync::Mutex<(Histograms, u64)>,
    /// Messages stamped before this (Unix nanoseconds) are counted but not measured (warm-up).
    measure_from: AtomicU64,
}

impl Default for Receipts {
    fn default() -> Self {
        Self { state: std::sync::Mutex::new((Histograms::new(), 0)), measure_from: AtomicU64::new(0) }
    }
}

impl Receipts {
    /// Records the receipt now of messages stamped with these values (Unix nanoseconds).
    pub fn record(&self, stamps: &[Option<&str>]) {
        let now = unix_nanos();
        let from = u128::from(self.measure_from.load(Ordering::Relaxed));
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for stamp in stamps {
            state.1 += 1;
            if let Some(sent) = stamp.and_then(|s| s.parse::<u128>().ok()) {
                state.0.record((now.saturating_sub(sent) / 1000) as u64, sent >= from);
            }
        }
    }

    /// Messages received so far.
    pub fn count(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Starts over (between runs).
    pub fn reset(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (Histograms::new(), 0);
    }

    fn take_interval(&self) -> (u64, u64, u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (p50, p99) = state.0.take_interval();
        (state.1, p50, p99)
    }

    /// End-to-end latency percentiles so far.
    pub fn percentiles(&self) -> Percentiles {
        percentiles(&self.state.lock().unwrap_or_else(|e| e.into_inner()).0.total)
    }
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

/// An open-loop arrival schedule: `from` events/s at the start, changing linearly to `to` at
/// the end of `duration` seconds (a constant rate when they are equal), in requests of `batch`.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    from: f64,
    to: f64,
    duration: f64,
    batch: f64,
}

impl Schedule {
    /// When request `n` (from 0) is due after the start: when the events sent so far, the
    /// integral of the rate `from + (to - from) t / duration`, reach `n * batch`. `None` past
    /// what the schedule holds.
    fn offset(&self, n: u64) -> Option<Duration> {
        let events = n as f64 * self.batch;
        let slope = (self.to - self.from) / self.duration.max(f64::MIN_POSITIVE);
        let t = if slope.abs() < 1e-9 {
            events / self.from
        } else {
            // slope/2 t² + from t - events = 0, the root that starts at t = 0.
            let discriminant = self.from * self.from + 2.0 * slope * events;
            if discriminant < 0.0 {
                return None;
            }
            (discriminant.sqrt() - self.from) / slope
        };
        (t.is_finite() && t >= 0.0).then(|| Duration::from_secs_f64(t))
    }
}

/// Runs the load against `target`, sampling `observers` about once a second.
pub async fn run(options: &LoadOptions, target: Arc<dyn Target>, mut observers: Observers) -> LoadReport {
    let counters = Arc::new(Counters::default());
    let latency = Arc::new(std::sync::Mutex::new(Histograms::new()));
    let started = Instant::now();
    let started_unix = unix_nanos();
    let until = started + options.duration;
    let connections = options.connections.max(1);
    // When each request is due: the schedule's n-th request, n counting over all connections in
    // turn (connection c sends requests c, c + connections, ...), so they are spread evenly.
    let schedule = options.rate.map(|from| Schedule {
        from,
        to: options.ramp_to.unwrap_or(from),
        duration: options.duration.as_secs_f64(),
        batch: options.batch as f64,
    });
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let received_before = observers.receipts.as_ref().map_or(0, |r| r.count());
    let measure_from = started + options.warmup.min(options.duration / 2);
    if let Some(receipts) = &observers.receipts {
        let from = started_unix + (measure_from - started).as_nanos();
        receipts.measure_from.store(u64::try_from(from).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (target, counters, errors, latency) =
            (target.clone(), counters.clone(), errors.clone(), latency.clone());
        let (batch, payload, twins) = (options.batch, options.payload_bytes, options.twins);
        let mut generator = SampleGenerator::new(twins, options.seed.wrapping_add(c as u64));
        tasks.push(tokio::spawn(async move {
            let mut n = c as u64;
            loop {
                let due = match &schedule {
                    Some(s) => match s.offset(n) {
                        Some(offset) if started + offset < until => started + offset,
                        _ => break,
                    },
                    None if Instant::now() >= until => break,
                    None => Instant::now(),
                };
                if schedule.is_some() {
                    tokio::time::sleep_until(due).await;
                }
                let sent_at = due;
                let stamp = started_unix + (sent_at - started).as_nanos();
                let events = batch_values(&mut generator, batch, payload, stamp);
                let outcome = target.send(c, events).await;
                counters.requests.fetch_add(1, Ordering::Relaxed);
                counters.sent.fetch_add(batch as u64, Ordering::Relaxed);
                match outcome {
                    SendOutcome::Accepted => {
                        counters.accepted.fetch_add(batch as u64, Ordering::Relaxed);
                        let micros = sent_at.elapsed().as_micros() as u64;
                        latency
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(micros, sent_at >= measure_from);
                    }
                    SendOutcome::Refused => {
                        counters.refused.fetch_add(batch as u64, Ordering::Relaxed);
                        if schedule.is_none() {
                            // As fast as possible still means as a well-behaved client: back
                            // off briefly when told to, instead of hammering a full queue.
                            tokio::time::sleep(REFUSED_BACKOFF).await;
                        }
                    }
                    SendOutcome::Error(message) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        let mut errors = errors.lock().unwrap_or_else(|e| e.into_inner());
                        if errors.len() < 5 {
                            errors.push(message);
                        }
                    }
                }
                n += connections as u64;
            }
        }));
    }
    let mut progress = observers.progress.then(|| progress::Progress::new(options.duration));
    let mut timeline = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let (mut last_t, mut last_accepted, mut last_received) = (0.0, 0, received_before);
    // Received at the stand-ins by the last pass (the run's end): the sustained rate.
    let mut received_total = None;
    let all = futures::future::join_all(tasks);
    tokio::pin!(all);
    loop {
        let done = tokio::select! {
            _ = &mut all => true,
            _ = ticker.tick() => false,
        };
        let t = started.elapsed().as_secs_f64();
        let accepted = counters.accepted.load(Ordering::Relaxed);
        let span = (t - last_t).max(1e-3);
        let (mut p50_us, mut p99_us) = latency.lock().unwrap_or_else(|e| e.into_inner()).take_interval();
        let mut received_per_second = None;
        if let Some(receipts) = &observers.receipts {
            let (count, p50, p99) = receipts.take_interval();
            received_per_second = Some((count - last_received) as f64 / span);
            received_total = Some(count - received_before);
            last_received = count;
            (p50_us, p99_us) = (p50, p99);
        }
        let (mut cpu_cores, mut rss_bytes) = (None, None);
        if let Some(sampler) = &mut observers.process {
            if let Ok(sample) = sampler.sample() {
                (cpu_cores, rss_bytes) = (Some(sample.cpu_cores), Some(sample.rss_bytes));
            }
        }
        if t - last_t >= 0.2 {
            timeline.push(Sample {
                t,
                accepted_per_second: (accepted - last_accepted) as f64 / span,
                received_per_second,
                p50_us,
                p99_us,
                cpu_cores,
                rss_bytes,
            });
        }
        if let Some(p) = &mut progress {
            p.update(started.elapsed(), accepted, received_total, Some(p99_us));
        }
        (last_t, last_accepted) = (t, accepted);
        if done {
            break;
        }
    }
    if let Some(p) = &mut progress {
        p.finish();
    }
    let elapsed = started.elapsed().max(options.duration);
    let latency = latency.lock().unwrap_or_else(|e| e.into_inner());
    let accepted = counters.accepted.load(Ordering::Relaxed);
    let error_samples = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (cpu_cores_mean, rss_bytes_max) = match &observers.process {
        Some(sampler) => {
            let totals = sampler.totals();
            (Some(totals.cpu_cores_mean), Some(totals.rss_bytes_max))
        }
        None => (None, None),
    };
    LoadReport {
        target: String::new(),
        rate: options.rate,
        ramp_to: options.rate.and(options.ramp_to),
        duration_seconds: elapsed.as_secs_f64(),
        batch: options.batch,
        connections,
        requests: counters.requests.load(Ordering::Relaxed),
        events_sent: counters.sent.load(Ordering::Relaxed),
        events_accepted: accepted,
        events_refused: counters.refused.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        error_samples,
        accepted_per_second: accepted as f64 / elapsed.as_secs_f64(),
        latency_us: percentiles(&latency.total),
        received: observers.receipts.as_ref().map(|r| r.count() - received_before),
        received_per_second: received_total.map(|n| n as f64 / elapsed.as_secs_f64()),
        end_to_end_us: observers.receipts.as_ref().map(|r| r.percentiles()),
        cpu_cores_mean,
        rss_bytes_max,
        timeline,
    }
}

/// [`parse_duration`], also taking zero (`0`, `0s`).
pub fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    match text.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse::<f64>() {
        Ok(0.0) => Ok(Duration::ZERO),
        _ => parse_duration(text),
    }
}

/// Parses a duration like `10s`, `500ms`, `2m` (or plain seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 =
        number.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s or m)")),
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("{text:?}: the duration must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_rate_spaces_requests_evenly() {
        let s = Schedule { from: 200.0, to: 200.0, duration: 10.0, batch: 10.0 };
        assert_eq!(s.offset(0), Some(Duration::ZERO));
        assert_eq!(s.offset(1), Some(Duration::from_millis(50)));
        assert_eq!(s.offset(200), Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_ramp_sends_the_integral_of_its_rate() {
        // 100/s rising to 300/s over 10 s: 2,000 events, 750 of them in the first half.
        let up = Schedule { from: 100.0, to: 300.0, duration: 10.0, batch: 10.0 };
        let within = |s: &Schedule, limit: f64| {
            (0..1000).take_while(|&n| s.offset(n).unwrap().as_secs_f64() < limit).count()
        };
        assert_eq!(within(&up, 10.0), 200);
        assert_eq!(within(&up, 5.0), 75);
        // Requests get closer together as the rate rises: 1/100 s apart at first, 1/300 at the end.
        let gap = |s: &Schedule, n: u64| (s.offset(n + 1).unwrap() - s.offset(n).unwrap()).as_secs_f64();
        assert!((gap(&up, 0) - 0.1).abs() < 0.002, "{}", gap(&up, 0));
        assert!((gap(&up, 198) - 10.0 / 300.0).abs() < 0.002, "{}", gap(&up, 198));
        // Down again: the same total, most of it in the first half; nothing beyond the end.
        let down = Schedule { from: 300.0, to: 100.0, duration: 10.0, batch: 10.0 };
        assert_eq!(within(&down, 10.0), 200);
        assert_eq!(within(&down, 5.0), 125);
        assert!(down.offset(200).is_none_or(|t| t.as_secs_f64() >= 9.99));
        assert!(down.offset(10_000).is_none(), "the rate would go negative past the end");
    }

    #[test]
    fn durations_in_the_usual_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration_or_zero("-1s").is_err());
    }

    #[test]
    fn batches_are_valid_reproducible_and_padded() {
        let ids = |body: &str| -> Vec<(String, String)> {
            let events = crate::event::parse_batch(body.as_bytes()).expect("a valid CloudEvents batch");
            events.iter().map(|e| (e.id().to_owned(), e.ty().to_owned())).collect()
        };
        let body = batch_body(&mut SampleGenerator::new(10, 7), 5, 2048);
        let again = batch_body(&mut SampleGenerator::new(10, 7), 5, 2048);
        assert_eq!(ids(&body), ids(&again), "the same seed, the same events (times aside)");
        let other = batch_body(&mut SampleGenerator::new(10, 8), 5, 2048);
        assert_ne!(ids(&body), ids(&other), "another seed, other events");
        let events = crate::event::parse_batch(body.as_bytes()).unwrap();
        assert_eq!(events.len(), 5);
        for e in &events {
            assert!(e.size_hint() >= 2048, "padded to the payload size: {}", e.size_hint());
        }
    }
}
