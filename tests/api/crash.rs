//! The durable spool's promise, tested the hard way: the daemon (the real binary, disk spool)
//! takes a stream of events and delivers them to Event Hubs (the AMQP stand-in, with tokens from
//! the IMDS stand-in, both in this process so they outlive the daemon), and is killed with
//! SIGKILL at random moments and restarted, several times. Every event that got a 202 must reach
//! the hub at least once; duplicates (events delivered before a kill and again after it) are
//! counted and reported.

use crate::helpers::{free_port, twinroute};
use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use twinroute_emulator::amqp::{AmqpConfig, AmqpFault, AmqpStandIn, DEFAULT_NAMESPACE};
use twinroute_emulator::imds::{ImdsConfig, ImdsStandIn};

const KILLS: usize = 4;
const LOADERS: usize = 4;
const BATCH: usize = 20;

struct Daemon {
    config: std::path::PathBuf,
    dir: std::path::PathBuf,
    ingest: String,
    starts: usize,
}

impl Daemon {
    fn start(&mut self) -> Child {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("daemon-{}.log", self.starts))).unwrap();
        twinroute()
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the daemon starts")
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", self.ingest)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < until, "the daemon did not come up: see {}", self.dir.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `waiting=` figure each start's log reported when it opened the spool.
    fn waiting_at_starts(&self) -> Vec<u64> {
        (1..=self.starts)
            .filter_map(|n| {
                let log = std::fs::read_to_string(self.dir.join(format!("daemon-{n}.log"))).ok()?;
                let line = log.lines().find(|l| l.contains("spool on disk opened"))?;
                let value = line.split("waiting=").nth(1)?.split_whitespace().next()?;
                value.parse().ok()
            })
            .collect()
    }
}

fn kill(child: &mut Child) {
    // std's kill is SIGKILL on Unix: no shutdown, no drain, no final sync.
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A daemon (not started) with a disk spool, delivering every event to the stand-in's hub.
fn daemon(dir: &std::path::Path, imds: &ImdsStandIn, amqp: &AmqpStandIn) -> Daemon {
    let ingest = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let config = dir.join("twinroute.toml");
    std::fs::write(
        &config,
        format!(
            r#"
state_dir = "{state}"
[ingest]
listen = "{ingest}"
[admin]
listen = "{admin}"
[log]
summary_interval_seconds = 0
[identity]
imds_endpoint = "{imds}"
[endpoints.twin-hub]
type = "EventHub"
authentication_type = "IdentityBased"
endpoint_uri = "sb://{ns}/"
entity_path = "twins"
custom_endpoint = "{amqp}"
[routes.all]
endpoint_name = "twin-hub"
"#,
            state = dir.join("state").display(),
            imds = imds.token_url(),
            ns = DEFAULT_NAMESPACE,
            amqp = amqp.endpoint(),
        ),
    )
    .unwrap();
    Daemon { config, dir: dir.to_owned(), ingest: format!("http://{ingest}"), starts: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_survives_repeated_sigkill() {
    let imds = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let amqp = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = daemon(dir.path(), &imds, &amqp);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let mut child = daemon.start();
    daemon.wait_ready(&client).await;

    // Loaders post batches with unique ids, remembering those acknowledged with 202.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for l in 0..LOADERS {
        let (client, url) = (client.clone(), format!("{}/events", daemon.ingest));
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        loaders.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let ids: Vec<String> = (0..BATCH).map(|i| format!("l{l}-{}", n + i)).collect();
                n += BATCH;
                let batch: Vec<serde_json::Value> = ids
                    .iter()
                    .map(|id| {
                        serde_json::json!({
                            "specversion": "1.0", "id": id, "type": "Microsoft.DigitalTwins.Twin.Update",
                            "source": "crash-test.api.wus2.digitaltwins.azure.net", "subject": format!("room-{}", n % 7),
                            "datacontenttype": "application/json",
                            "data": {"modelId": "dtmi:com:contoso:Room;1", "patch": [{"op": "replace", "path": "/t", "value": n}]}
                        })
                    })
                    .collect();
                let sent = client
                    .post(&url)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(serde_json::Value::Array(batch).to_string())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 202 => acknowledged.lock().unwrap().extend(ids),
                    // Refused (503) or the daemon is down: not acknowledged, nothing owed.
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }));
    }

    for _ in 0..KILLS {
        // Slow the hub down for a moment so events are waiting in the spool when the kill comes.
        amqp.push_faults("twins", [AmqpFault::Delay(Duration::from_millis(1500))]);
        tokio::time::sleep(Duration::from_millis(fastrand::u64(300..1200))).await;
        kill(&mut child);
        child = daemon.start();
        daemon.wait_ready(&client).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    let acknowledged: Vec<String> = acknowledged.lock().unwrap().clone();
    let expected: HashSet<&String> = acknowledged.iter().collect();
    assert!(expected.len() > 1000, "the load was too light to prove anything: {}", expected.len());

    // Wait for delivery to finish, then compare with what the hub received.
    let until = Instant::now() + Duration::from_secs(90);
    let counts = loop {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for m in amqp.stored(DEFAULT_NAMESPACE, "twins") {
            if let Some(id) = m.message_id() {
                *counts.entry(id).or_default() += 1;
            }
        }
        let missing = expected.iter().filter(|id| !counts.contains_key(id.as_str())).count();
        if missing == 0 {
            break counts;
        }
        assert!(
            Instant::now() < until,
            "{missing} of {} acknowledged events never reached the hub (logs in {})",
            expected.len(),
            dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let received: usize = counts.values().sum();
    let duplicates = received - counts.len();
    let unacknowledged = counts.keys().filter(|id| !expected.contains(id)).count();
    let waiting = daemon.waiting_at_starts();
    eprintln!(
        "crash test: {KILLS} SIGKILLs; {} events acknowledged, all delivered; {received} deliveries \
         ({duplicates} duplicates, {:.2}%); {unacknowledged} delivered without a 202 (in flight at a kill); \
         events waiting in the spool at each start: {waiting:?}",
        expected.len(),
        100.0 * duplicates as f64 / expected.len() as f64
    );
    assert!(
        waiting.iter().skip(1).any(|&w| w > 0),
        "no restart found events waiting, so recovery was not exercised: {waiting:?}"
    );
    kill(&mut child);
}

fn received_ids(amqp: &AmqpStandIn) -> Vec<String> {
    amqp.stored(DEFAULT_NAMESPACE, "twins").iter().filter_map(|m| m.message_id()).collect()
}

async fn post(client: &reqwest::Client, daemon: &Daemon, ids: &[&str]) {
    let batch: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| serde_json::json!({"specversion": "1.0", "id": id, "type": "t", "source": "s", "data": {"n": id}}))
        .collect();
    let response = client
        .post(format!("{}/events", daemon.ingest))
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::Value::Array(batch).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_tail_is_cut_off_and_reported_and_the_intact_prefix_delivered() {
    let imds = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let amqp = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = daemon(dir.path(), &imds, &amqp);
    let client = reqwest::Client::new();
    let mut child = daemon.start();
    daemon.wait_ready(&client).await;
    // The hub holds the first delivery for a long time: everything stays in the spool.
    amqp.push_faults("twins", [AmqpFault::Delay(Duration::from_secs(30))]);
    post(&client, &daemon, &["prefix-1"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    post(&client, &daemon, &["torn-1", "torn-2", "torn-3"]).await;
    kill(&mut child);
    // Power loss in the middle of the last write: its end never reached the disk. (A real
    // power loss can only tear a write that was not synced, hence not acknowledged; here the
    // last, acknowledged, batch stands in for it.)
    let spool = dir.path().join("state/spool");
    let journal = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .max_by_key(|p| p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()))
        .expect("a journal file");
    let len = std::fs::metadata(&journal).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&journal).unwrap().set_len(len - 300).unwrap();

    let mut child = daemon.start();
    daemon.wait_ready(&client).await;
    let until = Instant::now() + Duration::from_secs(30);
    while !received_ids(&amqp).iter().any(|id| id == "prefix-1") {
        assert!(
            Instant::now() < until,
            "the intact prefix was not delivered (logs in {})",
            dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(&mut child);
    let log = std::fs::read_to_string(dir.path().join("daemon-2.log")).unwrap();
    let report =
        log.lines().find(|l| l.contains("incomplete write")).unwrap_or_else(|| panic!("no report: {log}"));
    let bytes: u64 =
        report.split("bytes=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(bytes > 0 && bytes < len, "{report}");
    for id in received_ids(&amqp) {
        assert!(
            ["prefix-1", "torn-1", "torn-2", "torn-3"].contains(&id.as_str()),
            "delivered {id}, never sent"
        );
    }
}
