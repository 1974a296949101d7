//! `twinroute loadtest`: drives a daemon's HTTP ingest with a reproducible ADT event stream
//! (the sample twin population: creates, JSON-Patch updates, telemetry, relationships, deletes)
//! and reports throughput and acceptance latency.
//!
//! Open loop by default: each connection sends its batches on a fixed schedule, and a batch's
//! latency counts from when it was *due*, not from when it went out, so a stalled server shows
//! up as latency instead of silently lowering the send rate (no coordinated omission).

pub mod chart;
pub mod command;
pub mod procstat;
pub mod progress;

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
    /// From when a request was due (open loop) or sent (closed loop) to its 202, microseconds.
    pub latency_us: Percentiles,
}

impl LoadReport {
    /// The summary table printed at the end of a run.
    pub fn table(&self) -> String {
        let rate = self.rate.map_or("max".to_owned(), |r| format!("{r:.0}/s"));
        let l = &self.latency_us;
        format!(
            "target          {}\n\
             rate            {rate} for {:.1} s, {} events/request, {} connections\n\
             events          {} sent, {} accepted, {} refused (503), {} request errors\n\
             throughput      {:.0} events/s accepted\n\
             latency (202)   p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            self.target,
            self.duration_seconds,
            self.batch,
            self.connections,
            self.events_sent,
            self.events_accepted,
            self.events_refused,
            self.errors,
            self.accepted_per_second,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
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

/// One generated batch body.
fn batch_body(generator: &mut SampleGenerator, batch: usize, payload_bytes: usize) -> String {
    let events: Vec<serde_json::Value> = (0..batch)
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
            value
        })
        .collect();
    serde_json::Value::Array(events).to_string()
}

/// Runs the load; `progress` is called about once a second with (elapsed, accepted so far).
pub async fn run(options: &LoadOptions, progress: impl Fn(Duration, u64)) -> LoadReport {
    let url = format!("{}/events", options.target.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client");
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let until = started + options.duration;
    let connections = options.connections.max(1);
    // Each connection's interval between requests, for its share of the rate.
    let interval =
        options.rate.map(|r| Duration::from_secs_f64(options.batch as f64 * connections as f64 / r));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (client, url, counters, errors) = (client.clone(), url.clone(), counters.clone(), errors.clone());
        let (batch, payload, twins) = (options.batch, options.payload_bytes, options.twins);
        let mut generator = SampleGenerator::new(twins, options.seed.wrapping_add(c as u64));
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).expect("a histogram");
            // Connections start spread over one interval, not all at once.
            let mut due = started + interval.map_or(Duration::ZERO, |i| i * c as u32 / connections as u32);
            loop {
                if interval.is_some() {
                    if due >= until {
                        break;
                    }
                    tokio::time::sleep_until(due).await;
                } else if Instant::now() >= until {
                    break;
                }
                let body = batch_body(&mut generator, batch, payload);
                let sent_at = if interval.is_some() { due } else { Instant::now() };
                let response = client
                    .post(&url)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(body)
                    .send()
                    .await;
                counters.requests.fetch_add(1, Ordering::Relaxed);
                counters.sent.fetch_add(batch as u64, Ordering::Relaxed);
                match response {
                    Ok(r) if r.status() == 202 => {
                        counters.accepted.fetch_add(batch as u64, Ordering::Relaxed);
                        let _ = histogram.record(sent_at.elapsed().as_micros() as u64);
                    }
                    Ok(r) if r.status() == 503 => {
                        counters.refused.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                    other => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        let message = match other {
                            Ok(r) => format!("HTTP {}", r.status()),
                            Err(e) => e.to_string(),
                        };
                        let mut errors = errors.lock().unwrap_or_else(|e| e.into_inner());
                        if errors.len() < 5 {
                            errors.push(message);
                        }
                    }
                }
                if let Some(i) = interval {
                    due += i;
                }
            }
            histogram
        }));
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let all = futures::future::join_all(tasks);
    tokio::pin!(all);
    let results = loop {
        tokio::select! {
            results = &mut all => break results,
            _ = ticker.tick() => progress(started.elapsed(), counters.accepted.load(Ordering::Relaxed)),
        }
    };
    let elapsed = started.elapsed().max(options.duration);
    let mut histogram = Histogram::<u64>::new(3).expect("a histogram");
    for h in results.into_iter().flatten() {
        let _ = histogram.add(h);
    }
    let percentile = |q: f64| if histogram.is_empty() { 0 } else { histogram.value_at_quantile(q) };
    let accepted = counters.accepted.load(Ordering::Relaxed);
    let error_samples = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    LoadReport {
        target: options.target.clone(),
        rate: options.rate,
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
        latency_us: Percentiles {
            p50: percentile(0.5),
            p90: percentile(0.9),
            p99: percentile(0.99),
            p999: percentile(0.999),
            max: if histogram.is_empty() { 0 } else { histogram.max() },
        },
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
    fn durations_in_the_usual_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("fast").is_err());
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
