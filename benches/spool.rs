//! Throughput of the whole daemon, HTTP ingest to delivery, with the durable disk spool and with
//! the in-memory queue, measured in the same run: the cost of durability (fsync before the 202).
//!
//! Each measurement posts batches of 1 KiB ADT events from concurrent HTTP clients to a daemon
//! delivering to an in-memory sink, and stops the clock when the last event is delivered.
//! After criterion's figures, the two modes are run alternately a few more times and the ratio
//! of their medians is printed: `disk/memory throughput`.
//!
//! `cargo bench --bench spool` (add `-- --quick` for a shorter run).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use twinroute::app::{RunOptions, Running};
use twinroute::config::Config;
use twinroute::sinks::memory::MemorySinkFactory;

/// Concurrent HTTP clients.
const CLIENTS: usize = 128;
/// Events per request.
const BATCH: usize = 50;
/// Requests per client per measurement.
const REQUESTS: usize = 10;
const EVENTS: usize = CLIENTS * BATCH * REQUESTS;

fn twin_update(i: usize) -> serde_json::Value {
    let patch: Vec<serde_json::Value> = (0..12)
        .map(|j| serde_json::json!({"value": 20.5 + j as f64, "path": format!("/sensors/s{j}/temperature"), "op": "replace"}))
        .collect();
    serde_json::json!({
        "specversion": "1.0",
        "id": format!("ev-{i}"),
        "type": "Microsoft.DigitalTwins.Twin.Update",
        "source": "contoso-adt.api.wus2.digitaltwins.azure.net",
        "subject": format!("building-7-floor-3-room-{}", i % 100),
        "time": "2021-12-09T20:28:52.9795363Z",
        "datacontenttype": "application/json",
        "traceparent": "00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01",
        "data": {"modelId": "dtmi:com:contoso:Room;3", "patch": patch}
    })
}

struct Daemon {
    running: Option<Running>,
    sinks: Arc<MemorySinkFactory>,
    url: String,
    client: reqwest::Client,
    bodies: Vec<bytes::Bytes>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(spool: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
state_dir = "{}"
[spool]
mode = "{spool}"
[log]
summary_interval_seconds = 0
[endpoints.hub]
type = "Stdout"
[routes.all]
endpoint_name = "hub"
"#,
            dir.path().display()
        );
        let env = HashMap::from([
            ("TWINROUTE_INGEST__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            ("TWINROUTE_ADMIN__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ]);
        let config = Config::from_toml(&text, "bench", Some(env)).unwrap();
        let sinks = Arc::new(MemorySinkFactory::default());
        let running = Running::start(config, RunOptions { sinks: Some(sinks.clone()), ..Default::default() })
            .await
            .unwrap();
        let url = format!("http://{}/events", running.ingest_addr.unwrap());
        let bodies = (0..CLIENTS * REQUESTS)
            .map(|r| {
                let batch: Vec<_> = (0..BATCH).map(|i| twin_update(r * BATCH + i)).collect();
                bytes::Bytes::from(serde_json::Value::Array(batch).to_string())
            })
            .collect();
        Daemon { running: Some(running), sinks, url, client: reqwest::Client::new(), bodies, _dir: dir }
    }

    fn delivered(&self) -> u64 {
        let running = self.running.as_ref().unwrap();
        running.dispatcher.snapshot().endpoints["hub"].stats.delivered.load(Ordering::Relaxed)
    }

    /// Posts EVENTS events and waits until all are delivered; the elapsed time.
    async fn round(&self) -> Duration {
        let before = self.delivered();
        let started = Instant::now();
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let client = self.client.clone();
            let url = self.url.clone();
            let bodies: Vec<bytes::Bytes> = self.bodies[c * REQUESTS..(c + 1) * REQUESTS].to_vec();
            clients.push(tokio::spawn(async move {
                for body in bodies {
                    loop {
                        let response = client
                            .post(&url)
                            .header("content-type", "application/cloudevents-batch+json")
                            .body(body.clone())
                            .send()
                            .await
                            .unwrap();
                        match response.status().as_u16() {
                            202 => break,
                            503 => tokio::time::sleep(Duration::from_millis(5)).await,
                            other => panic!("unexpected status {other}"),
                        }
                    }
                }
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
        while self.delivered() < before + EVENTS as u64 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // The disk spool's background work (deleting delivered records, the storage engine's
        // flushes and compactions) is part of its cost: the round ends when it is done.
        if let Some(spool) = &self.running.as_ref().unwrap().spool {
            spool.housekeeping().await;
            while !spool.is_quiet() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let elapsed = started.elapsed();
        // The memory sink keeps what it got; let it go between rounds.
        self.sinks.sink("hub").take_delivered();
        elapsed
    }

    async fn stop(mut self) {
        self.running.take().unwrap().stop().await;
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let memory = runtime.block_on(Daemon::start("memory"));
    let disk = runtime.block_on(Daemon::start("disk"));
    let mut group = c.benchmark_group("daemon_http_to_delivery_1kb");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    for (name, daemon) in [("memory_spool", &memory), ("disk_spool", &disk)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        total += daemon.round().await;
                    }
                    total
                })
            })
        });
    }
    group.finish();

    // The ratio, from rounds of the two modes run alternately (so both see the same machine).
    let rounds = if std::env::args().any(|a| a == "--test") { 1 } else { 9 };
    let (mut m, mut d) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        for _ in 0..rounds {
            m.push(memory.round().await.as_secs_f64());
            d.push(disk.round().await.as_secs_f64());
        }
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m, d) = (median(&mut m), median(&mut d));
    let (m_rate, d_rate) = (EVENTS as f64 / m, EVENTS as f64 / d);
    println!(
        "spool throughput ({CLIENTS} clients x {BATCH}-event batches, {rounds} alternating rounds): \
         memory {m_rate:.0} events/s, disk {d_rate:.0} events/s, disk/memory = {:.0}%",
        100.0 * d_rate / m_rate
    );
    runtime.block_on(async {
        memory.stop().await;
        disk.stop().await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
