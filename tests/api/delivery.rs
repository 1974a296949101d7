//! The delivery engine on tokio's paused clock (the dispatcher and its workers, in-memory sinks
//! and dead-letter stores): retry schedule, time-to-live, attempts, dead-lettering, isolation,
//! and the accounting rule every test ends with: delivered + dead-lettered + dropped = accepted.

use crate::helpers::{telemetry, twin_create};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use twinroute::config::Config;
use twinroute::delivery::deadletter::{
    META_ATTEMPTS, META_FIRST_ATTEMPT, META_LAST_ATTEMPT, META_LAST_ERROR, META_REASON,
};
use twinroute::delivery::{Dispatcher, EndpointStats};
use twinroute::event::parse_structured;
use twinroute::routing::Route;
use twinroute::sinks::memory::MemorySinkFactory;
use twinroute::sinks::DeliveryOutcome;

const SAS: &str = "https://127.0.0.1:10000/devstoreaccount1/deadletters?sv=2022-11-02&sp=cw&sig=x";

/// A dispatcher over memory sinks for `toml` (endpoints, routes, `[delivery]`).
async fn dispatcher(toml: &str) -> (Arc<Dispatcher>, Arc<MemorySinkFactory>) {
    let config = Config::from_toml(toml, "test", Some(HashMap::new())).unwrap();
    let factory = Arc::new(MemorySinkFactory::default());
    let dispatcher = Arc::new(Dispatcher::new(config.delivery.clone(), factory.clone()));
    let routes = config
        .routes
        .values()
        .map(|r| Route { id: r.id.clone(), endpoint: r.endpoint_name.clone(), filter: r.filter.clone() })
        .collect();
    dispatcher.apply(&config.endpoints, routes).await.unwrap();
    (dispatcher, factory)
}

fn event(v: serde_json::Value) -> twinroute::event::CloudEvent {
    parse_structured(v.to_string().as_bytes()).unwrap()
}

fn stats(d: &Dispatcher, endpoint: &str) -> Arc<EndpointStats> {
    d.snapshot().endpoints[endpoint].stats.clone()
}

/// Nothing is unaccounted for.
fn assert_accounted(s: &EndpointStats, accepted: u64) {
    let delivered = s.delivered.load(Ordering::Relaxed);
    let dead = s.dead_lettered.load(Ordering::Relaxed);
    let dropped = s.dropped.load(Ordering::Relaxed);
    assert_eq!(s.queued.load(Ordering::Relaxed), accepted);
    assert_eq!(
        delivered + dead + dropped,
        accepted,
        "delivered {delivered} + dead-lettered {dead} + dropped {dropped}"
    );
}

const ONE_ENDPOINT: &str = "[endpoints.hub-a]\ntype = \"Stdout\"\n[routes.all]\nendpoint_name = \"hub-a\"\n";

#[tokio::test(start_paused = true)]
async fn refused_n_times_then_accepted_follows_the_schedule_and_counts_duplicates() {
    let (d, sinks) = dispatcher(&format!("{ONE_ENDPOINT}[delivery]\njitter = 0.0\n")).await;
    let sink = sinks.sink("hub-a");
    let busy = || DeliveryOutcome::Transient { reason: "server busy".into(), after: None };
    sink.fail_next([busy(), busy(), busy()]);
    let started = Instant::now();
    d.submit(vec![event(twin_create("room-1"))], "test").await.unwrap();
    sink.wait_for(1).await;
    // Retries after 10 s, 30 s and 60 s (Event Grid's schedule), then delivered.
    assert_eq!(started.elapsed().as_secs(), 100);
    assert_eq!(sink.attempts(), 4);
    let ids: Vec<String> = sink.delivered().iter().map(|e| e.event.id().to_owned()).collect();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), ids.len() - unique.len()), (1, 0), "delivered once, no duplicates");
    let s = stats(&d, "hub-a");
    assert_eq!(s.failed_attempts.load(Ordering::Relaxed), 3);
    assert_accounted(&s, 1);
    assert!(d.shutdown(Duration::from_secs(5)).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn server_hints_are_honoured() {
    let (d, sinks) = dispatcher(&format!("{ONE_ENDPOINT}[delivery]\njitter = 0.0\n")).await;
    let sink = sinks.sink("hub-a");
    sink.fail_next([DeliveryOutcome::Transient {
        reason: "429".into(),
        after: Some(Duration::from_secs(42)),
    }]);
    let started = Instant::now();
    d.submit(vec![event(twin_create("room-1"))], "test").await.unwrap();
    sink.wait_for(1).await;
    assert_eq!(started.elapsed().as_secs(), 42);
    d.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_permanent_refusal_is_dead_lettered_at_once_with_metadata() {
    let (d, sinks) = dispatcher(&format!(
        "[endpoints.grid-a]\ntype = \"EventGrid\"\ntopic_endpoint = \"https://t.example/api/events\"\naccess_key1 = \"k\"\n\
         dead_letter_secret = \"{SAS}\"\n[routes.all]\nendpoint_name = \"grid-a\"\n"
    ))
    .await;
    sinks.sink("grid-a").fail_with(Some(DeliveryOutcome::Permanent { reason: "400 bad event".into() }));
    let sent = twin_create("room-1");
    let id = sent["id"].as_str().unwrap().to_owned();
    d.submit(vec![event(sent.clone())], "test").await.unwrap();
    let letters = sinks.dead_letters("grid-a");
    letters.wait_for(1).await;
    let letter = &letters.letters()[0];
    let now = time::OffsetDateTime::now_utc();
    assert_eq!(
        letter.blob_name,
        format!(
            "grid-a/{:04}/{:02}/{:02}/{:02}/{id}.json",
            now.year(),
            now.month() as u8,
            now.day(),
            now.hour()
        )
    );
    let body: serde_json::Value = serde_json::from_slice(&letter.body).unwrap();
    assert_eq!(body, sent, "the original structured CloudEvent");
    assert_eq!(letter.meta(META_REASON), Some("permanent"));
    assert_eq!(letter.meta(META_ATTEMPTS), Some("1"));
    assert_eq!(letter.meta(META_LAST_ERROR), Some("400 bad event"));
    assert!(letter.meta(META_FIRST_ATTEMPT).is_some() && letter.meta(META_LAST_ATTEMPT).is_some());
    let s = stats(&d, "grid-a");
    assert_eq!(s.dead_lettered.load(Ordering::Relaxed), 1);
    assert_accounted(&s, 1);
    d.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn the_time_to_live_and_the_attempt_limit_end_retries() {
    let (d, sinks) = dispatcher(&format!(
        "[delivery]\njitter = 0.0\nretry_schedule_seconds = [30]\n\
         [endpoints.grid-ttl]\ntype = \"EventGrid\"\ntopic_endpoint = \"https://t.example/api/events\"\naccess_key1 = \"k\"\n\
         dead_letter_secret = \"{SAS}\"\ndelivery = {{ ttl_seconds = 100 }}\n\
         [endpoints.grid-max]\ntype = \"EventGrid\"\ntopic_endpoint = \"https://t.example/api/events\"\naccess_key1 = \"k\"\n\
         dead_letter_secret = \"{SAS}\"\ndelivery = {{ max_attempts = 3 }}\n\
         [routes.ttl]\nendpoint_name = \"grid-ttl\"\n[routes.max]\nendpoint_name = \"grid-max\"\n"
    ))
    .await;
    for name in ["grid-ttl", "grid-max"] {
        sinks.sink(name).fail_with(Some(DeliveryOutcome::Transient { reason: "down".into(), after: None }));
    }
    let started = Instant::now();
    d.submit(vec![event(telemetry("room-1", 1.0))], "test").await.unwrap();
    let max = sinks.dead_letters("grid-max");
    max.wait_for(1).await;
    assert_eq!(started.elapsed().as_secs(), 60, "attempts at 0, 30 and 60 s");
    assert_eq!(max.letters()[0].meta(META_REASON), Some("max_attempts"));
    assert_eq!(max.letters()[0].meta(META_ATTEMPTS), Some("3"));
    let ttl = sinks.dead_letters("grid-ttl");
    ttl.wait_for(1).await;
    // Attempts at 0, 30, 60, 90 and 100 s (the last wait is cut to the time-to-live).
    assert_eq!(started.elapsed().as_secs(), 100);
    assert_eq!(ttl.letters()[0].meta(META_REASON), Some("ttl_expired"));
    assert_eq!(ttl.letters()[0].meta(META_ATTEMPTS), Some("5"));
    assert_eq!(sinks.sink("grid-ttl").attempts(), 5);
    assert_accounted(&stats(&d, "grid-ttl"), 1);
    assert_accounted(&stats(&d, "grid-max"), 1);
    d.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn without_a_dead_letter_store_expired_events_are_dropped_and_counted() {
    let (d, sinks) = dispatcher(&format!("{ONE_ENDPOINT}[delivery]\nmax_attempts = 2\njitter = 0.0\n")).await;
    sinks.sink("hub-a").fail_with(Some(DeliveryOutcome::Transient { reason: "down".into(), after: None }));
    d.submit(vec![event(twin_create("a")), event(twin_create("b"))], "test").await.unwrap();
    let s = stats(&d, "hub-a");
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(s.dropped.load(Ordering::Relaxed), 2);
    assert_accounted(&s, 2);
    assert!(d.shutdown(Duration::from_secs(5)).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failing_dead_letter_store_is_retried_until_it_takes_the_event() {
    let (d, sinks) = dispatcher(&format!(
        "[endpoints.grid-a]\ntype = \"EventGrid\"\ntopic_endpoint = \"https://t.example/api/events\"\naccess_key1 = \"k\"\n\
         dead_letter_secret = \"{SAS}\"\n[routes.all]\nendpoint_name = \"grid-a\"\n"
    ))
    .await;
    sinks.sink("grid-a").fail_with(Some(DeliveryOutcome::Permanent { reason: "404".into() }));
    let letters = sinks.dead_letters("grid-a");
    letters.fail_with(Some(DeliveryOutcome::Transient { reason: "storage down".into(), after: None }));
    d.submit(vec![event(twin_create("a"))], "test").await.unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
    let s = stats(&d, "grid-a");
    assert_eq!(s.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(s.outstanding(), 1, "still held, not lost");
    letters.fail_with(None);
    letters.wait_for(1).await;
    assert_accounted(&s, 1);
    d.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn one_endpoint_down_does_not_slow_another() {
    // Real time: how long the healthy endpoint takes to deliver 2,000 events, alone and next to
    // an endpoint that refuses everything.
    let toml = "[endpoints.down-a]\ntype = \"Stdout\"\n[endpoints.up-b]\ntype = \"Stdout\"\n\
                [routes.a]\nendpoint_name = \"down-a\"\n[routes.b]\nendpoint_name = \"up-b\"\n";
    let mut timings = Vec::new();
    for down in [false, true] {
        let (d, sinks) = dispatcher(toml).await;
        if down {
            sinks
                .sink("down-a")
                .fail_with(Some(DeliveryOutcome::Transient { reason: "down".into(), after: None }));
        }
        let started = std::time::Instant::now();
        for chunk in 0..20 {
            let batch = (0..100).map(|i| event(twin_create(&format!("t{chunk}-{i}")))).collect();
            d.submit(batch, "test").await.unwrap();
        }
        sinks.sink("up-b").wait_for(2000).await;
        timings.push(started.elapsed());
        if down {
            assert_eq!(sinks.sink("down-a").delivered().len(), 0);
            assert!(stats(&d, "down-a").outstanding() == 2000);
        }
        d.shutdown(Duration::from_millis(100)).await;
    }
    eprintln!(
        "healthy endpoint delivered 2000 events in {:?} alone, {:?} next to a failing one",
        timings[0], timings[1]
    );
    assert!(timings[1] < Duration::from_secs(5), "{timings:?}");
}

#[tokio::test]
async fn the_queued_bytes_bound_pushes_back() {
    let (d, sinks) = dispatcher(&format!("{ONE_ENDPOINT}[delivery]\nmax_queued_bytes = 20000\n")).await;
    sinks.sink("hub-a").fail_with(Some(DeliveryOutcome::Transient { reason: "down".into(), after: None }));
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..100 {
        match d.submit(vec![event(twin_create(&format!("t{i}")))], "test").await {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refusal = refused.expect("the bound was reached").to_string();
    assert!(refusal.contains("delivery.max_queued_bytes"), "{refusal}");
    assert!(d.queued_bytes() <= 20000);
    assert!(accepted > 5);
    // Delivered events give their bytes back.
    sinks.sink("hub-a").fail_with(None);
    sinks.sink("hub-a").wait_for(accepted).await;
    let s = stats(&d, "hub-a");
    assert_accounted(&s, accepted as u64);
    assert!(d.shutdown(Duration::from_secs(30)).await.is_empty());
    // The memory sink keeps what it received; once it lets go, every byte is back.
    assert_eq!(sinks.sink("hub-a").take_delivered().len(), accepted);
    assert_eq!(d.queued_bytes(), 0);
}

/// A sink that takes a while and records how many deliveries overlapped.
#[derive(Default)]
struct SlowSink {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    delivered: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl twinroute::sinks::Sink for SlowSink {
    async fn deliver(&self, batch: &[Arc<twinroute::delivery::Envelope>]) -> DeliveryOutcome {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.delivered.fetch_add(batch.len(), Ordering::SeqCst);
        DeliveryOutcome::Delivered
    }
}

struct SlowFactory(Arc<SlowSink>);

#[async_trait::async_trait]
impl twinroute::sinks::SinkFactory for SlowFactory {
    fn supports(&self, _: &twinroute::config::EndpointConfig) -> bool {
        true
    }
    async fn build(
        &self,
        _: &twinroute::config::EndpointConfig,
    ) -> Result<Arc<dyn twinroute::sinks::Sink>, twinroute::sinks::SinkBuildError> {
        Ok(self.0.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_limit_bounds_overlapping_deliveries() {
    for (concurrency, expected) in [(1usize, 1usize), (4, 4)] {
        let toml = format!(
            "{ONE_ENDPOINT}[delivery]\nbatch_max_events = 1\nlinger_ms = 0\nconcurrency = {concurrency}\n"
        );
        let config = Config::from_toml(&toml, "test", Some(HashMap::new())).unwrap();
        let sink = Arc::new(SlowSink::default());
        let d = Dispatcher::new(config.delivery.clone(), Arc::new(SlowFactory(sink.clone())));
        let routes = config
            .routes
            .values()
            .map(|r| Route { id: r.id.clone(), endpoint: r.endpoint_name.clone(), filter: r.filter.clone() })
            .collect();
        d.apply(&config.endpoints, routes).await.unwrap();
        let started = Instant::now();
        d.submit((0..8).map(|i| event(twin_create(&format!("t{i}")))).collect(), "test").await.unwrap();
        assert!(d.shutdown(Duration::from_secs(60)).await.is_empty());
        assert_eq!(sink.delivered.load(Ordering::SeqCst), 8);
        assert_eq!(sink.most.load(Ordering::SeqCst), expected, "concurrency {concurrency}");
        assert_eq!(started.elapsed().as_millis() as usize, 800 / expected);
    }
}

#[tokio::test(start_paused = true)]
async fn a_partial_outcome_finishes_what_was_delivered_and_acts_on_the_rest() {
    let (d, sinks) = dispatcher(&format!(
        "[endpoints.grid-a]\ntype = \"EventGrid\"\ntopic_endpoint = \"https://t.example/api/events\"\naccess_key1 = \"k\"\n\
         dead_letter_secret = \"{SAS}\"\n[routes.all]\nendpoint_name = \"grid-a\"\n"
    ))
    .await;
    let sink = sinks.sink("grid-a");
    sink.fail_next([DeliveryOutcome::Partial {
        delivered: vec![0, 2],
        rest: Box::new(DeliveryOutcome::Permanent { reason: "event over the size limit".into() }),
    }]);
    let events: Vec<serde_json::Value> = (0..3).map(|i| twin_create(&format!("t{i}"))).collect();
    d.submit(events.iter().map(|e| event(e.clone())).collect(), "test").await.unwrap();
    let letters = sinks.dead_letters("grid-a");
    letters.wait_for(1).await;
    let dead: serde_json::Value = serde_json::from_slice(&letters.letters()[0].body).unwrap();
    assert_eq!(dead["id"], events[1]["id"], "only the refused event is dead-lettered");
    let delivered: Vec<String> = sink.delivered().iter().map(|e| e.event.id().to_owned()).collect();
    assert_eq!(delivered, [events[0]["id"].as_str().unwrap(), events[2]["id"].as_str().unwrap()]);
    assert_eq!(sink.attempts(), 1, "nothing delivered is sent again");
    assert_accounted(&stats(&d, "grid-a"), 3);
    d.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_refused_submission_gives_every_event_back_in_its_order() {
    let (d, factory) = dispatcher(
        "[endpoints.hub-a]\ntype = \"Stdout\"\n[routes.hot]\nendpoint_name = \"hub-a\"\nfilter = \"type = 'hot'\"\n\
         [delivery]\nqueue_capacity = 1\n",
    )
    .await;
    factory.sink("hub-a").fail_with(Some(DeliveryOutcome::Transient { reason: "down".into(), after: None }));
    let e = |id: &str, ty: &str| {
        event(serde_json::json!({"specversion": "1.0", "id": id, "source": "s", "type": ty}))
    };
    // Fill the queue (and the worker), then offer a mix of matched and unmatched events.
    let mut filled = 0;
    while d.submit(vec![e(&format!("f{filled}"), "hot")], "test").await.is_ok() {
        filled += 1;
        assert!(filled < 100, "the queue never filled");
    }
    let mut events = vec![e("a", "cold"), e("b", "hot"), e("c", "cold"), e("d", "hot"), e("z", "cold")];
    assert!(d.submit_from(&mut events, "test").await.is_err());
    let ids: Vec<&str> = events.iter().map(|e| e.id()).collect();
    assert_eq!(ids, ["a", "b", "c", "d", "z"]);
}
