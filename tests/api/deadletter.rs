//! `twinroute deadletter list|replay`, the real binary, against dead letters in Azurite (seeded
//! with the daemon's own `DeadLetterRecord` / `BlobDeadLetters`, through a container SAS) for an
//! Event Grid endpoint on the topic stand-in. Needs Azurite: run ./scripts/test, or
//! `eval "$(scripts/azurite start)"` before cargo test.

use crate::blob::{
    azurite, container_sas, create_container, identity, in_an_hour, read_back, unique, Azurite,
};
use crate::helpers::{telemetry, twin_create};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use time::OffsetDateTime;
use twinroute::delivery::deadletter::{BlobDeadLetters, DeadLetterRecord, DeadLetterStore as _};
use twinroute::delivery::retry::GiveUp;
use twinroute::delivery::Envelope;
use twinroute::event::parse_structured;
use twinroute::sinks::blob::{safe_event_id, BlobWriter, CONTENT_TYPE_JSON};
use twinroute::sinks::DeliveryOutcome;
use twinroute_emulator::eventgrid::{EventGridConfig, EventGridStandIn, Fault, InputSchema};
use twinroute_emulator::imds::ImdsStandIn;

const ENDPOINT: &str = "grid-out";
const KEY: &str = "deadletter-test-key-0123456789";

/// A dead-letter container in Azurite, an Event Grid topic stand-in, and a configuration whose
/// endpoint `grid-out` delivers to the topic and dead-letters to the container.
struct Fixture {
    _imds: ImdsStandIn,
    admin: azure_storage_blob::BlobContainerClient,
    /// The container SAS URL (a secret: it must never be printed).
    sas_url: String,
    /// The SAS's signature, to check outputs for.
    sig: String,
    ca: PathBuf,
    topic: EventGridStandIn,
    _dir: tempfile::TempDir,
    config: PathBuf,
}

async fn fixture() -> Fixture {
    let az: Azurite = azurite();
    let (imds, credential) = identity().await;
    let container = unique("deadletters");
    let admin = create_container(&az, &container, credential).await;
    let sas = container_sas(&container, "rcwdl", in_an_hour());
    let sig = url::form_urlencoded::parse(sas.as_bytes()).find(|(k, _)| k == "sig").unwrap().1.into_owned();
    let sas_url = format!("{}/{container}?{sas}", az.blob);
    let topic = EventGridStandIn::start(EventGridConfig {
        keys: vec![KEY.to_owned()],
        schema: InputSchema::CloudEvents,
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twinroute.toml");
    let text = format!(
        r#"
[endpoints.{ENDPOINT}]
type = "EventGrid"
topic_endpoint = '{topic}'
access_key1 = '{KEY}'
dead_letter_secret = '{sas_url}'
ca_file = '{ca}'

[routes.all]
endpoint_name = "{ENDPOINT}"
"#,
        topic = topic.topic_endpoint(),
        ca = az.ca.display(),
    );
    std::fs::write(&config, text).unwrap();
    Fixture { _imds: imds, admin, sas_url, sig, ca: az.ca.clone(), topic, _dir: dir, config }
}

impl Fixture {
    fn writer(&self) -> BlobWriter {
        BlobWriter::new(&url::Url::parse(&self.sas_url).unwrap(), None, Some(&self.ca)).unwrap()
    }

    /// Dead-letters `event` for `endpoint` as the delivery workers do: in the hour `at` (through
    /// the record's name and metadata), or now (through `BlobDeadLetters`). Returns its blob name.
    async fn seed(
        &self,
        endpoint: &str,
        event: Value,
        reason: GiveUp,
        attempts: u32,
        last_error: &str,
        at: Option<OffsetDateTime>,
    ) -> Letter {
        let envelope = Envelope::new(parse_structured(event.to_string().as_bytes()).unwrap());
        let last = at.unwrap_or_else(OffsetDateTime::now_utc);
        let record = DeadLetterRecord {
            endpoint,
            envelope: &envelope,
            reason,
            attempts,
            first_attempt: Some(last - time::Duration::minutes(50)),
            last_attempt: Some(last),
            last_error: Some(last_error),
        };
        let writer = self.writer();
        let blob = match at {
            Some(at) => {
                let name = record.blob_name(at);
                let metadata = record.metadata();
                let pairs: Vec<(&str, String)> = metadata.iter().map(|(k, v)| (*k, v.clone())).collect();
                let body = envelope.event.to_structured_json();
                assert_eq!(
                    writer.put(&name, body, CONTENT_TYPE_JSON, &pairs).await,
                    DeliveryOutcome::Delivered
                );
                name
            }
            None => {
                assert_eq!(BlobDeadLetters::new(writer).put(&record).await, DeliveryOutcome::Delivered);
                let file = format!("/{}.json", safe_event_id(envelope.event.id()));
                let names = self.writer().list(&format!("{endpoint}/")).await.unwrap();
                names.into_iter().find(|n| n.ends_with(&file)).expect("the dead letter was written")
            }
        };
        let wire: Value = serde_json::from_slice(&envelope.event.to_structured_json()).unwrap();
        Letter { blob, id: envelope.event.id().to_owned(), wire }
    }

    /// The three dead letters most tests use, oldest first, and a blob under the endpoint's
    /// folder that is no dead letter, and another endpoint's dead letter.
    async fn seed_three(&self) -> [Letter; 3] {
        let now = OffsetDateTime::now_utc();
        let old = self
            .seed(
                ENDPOINT,
                twin_create("room-2"),
                GiveUp::TtlExpired,
                12,
                "timed out",
                Some(now - time::Duration::days(3)),
            )
            .await;
        let mut awkward = twin_create("room-1");
        awkward["id"] = "msg/42 ü".into();
        let recent = self
            .seed(
                ENDPOINT,
                awkward,
                GiveUp::MaxAttempts,
                30,
                "the Event Grid topic answered 503 (ServerBusy)",
                Some(now - time::Duration::hours(2)),
            )
            .await;
        let current = self
            .seed(
                ENDPOINT,
                telemetry("thermo-7", 21.5),
                GiveUp::Permanent,
                1,
                "the Event Grid topic rejected the events (400: BadRequest: Unsupported content type)",
                None,
            )
            .await;
        let writer = self.writer();
        let outcome = writer.put(&format!("{ENDPOINT}/notes.txt"), b"hi".to_vec(), "text/plain", &[]).await;
        assert_eq!(outcome, DeliveryOutcome::Delivered);
        self.seed(ENDPOINT.trim_end_matches("-out"), twin_create("x"), GiveUp::Permanent, 1, "no", None)
            .await;
        [old, recent, current]
    }

    /// Runs `twinroute deadletter <args> --endpoint grid-out --config <file>`.
    async fn run(&self, args: &[&str]) -> Run {
        self.run_for(ENDPOINT, args).await
    }

    async fn run_for(&self, endpoint: &str, args: &[&str]) -> Run {
        let mut command = twinroute();
        command.arg("deadletter").args(args).args(["--endpoint", endpoint, "--config"]).arg(&self.config);
        let run = run(command).await;
        for secret in [self.sig.as_str(), "sig=", KEY] {
            assert!(
                !run.stdout.contains(secret) && !run.stderr.contains(secret),
                "a secret was printed: {run:?}"
            );
        }
        run
    }

    /// Names of the blobs left in the container.
    async fn blobs(&self) -> Vec<String> {
        read_back(&self.admin).await.into_keys().collect()
    }
}

/// A seeded dead letter.
#[derive(Debug)]
struct Letter {
    blob: String,
    id: String,
    /// The event as the topic receives it (CloudEvents schema: the structured event).
    wire: Value,
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

use crate::helpers::twinroute;

/// Runs the binary off the runtime, so the in-process stand-ins keep answering meanwhile.
async fn run(mut command: std::process::Command) -> Run {
    let out: Output = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The table line of a dead letter.
fn line_of<'a>(run: &'a Run, id: &str) -> &'a str {
    run.stdout.lines().find(|l| l.contains(id)).unwrap_or_else(|| panic!("no line for {id}: {run:?}"))
}

#[tokio::test]
async fn list_shows_every_dead_letter_with_why_and_narrows_by_filter_and_time() {
    let f = fixture().await;
    let [old, recent, current] = f.seed_three().await;

    let all = f.run(&["list"]).await;
    assert_eq!(all.code, Some(0), "{all:?}");
    for (letter, reason, attempts, ty) in [
        (&old, "ttl_expired", "12", "Microsoft.DigitalTwins.Twin.Create"),
        (&recent, "max_attempts", "30", "Microsoft.DigitalTwins.Twin.Create"),
        (&current, "permanent", "1", "microsoft.iot.telemetry"),
    ] {
        let line = line_of(&all, &letter.id);
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert!(cells.contains(&reason) && cells.contains(&attempts) && cells.contains(&ty), "{line}");
        let hour = &letter.blob[ENDPOINT.len() + 1..ENDPOINT.len() + 14];
        assert!(line.starts_with(&hour.replacen('/', "-", 2).replace('/', "T")), "{line} for {hour}");
    }
    assert!(line_of(&all, &recent.id).contains("room-1  "), "the subject is shown");
    assert!(line_of(&all, &recent.id).contains("answered 503 (ServerBusy)"), "the last error is shown");
    assert!(line_of(&all, &current.id).contains('…'), "a long last error is cut");
    assert!(all.stdout.starts_with("HOUR (UTC)"), "{}", all.stdout);
    // Oldest first; the summary counts by reason; the blob that is no dead letter is passed over
    // and the other endpoint's dead letter not shown.
    let ids: Vec<&str> = all.stdout.lines().skip(1).take(3).collect();
    assert!(
        ids[0].contains(&old.id) && ids[1].contains(&recent.id) && ids[2].contains(&current.id),
        "{ids:?}"
    );
    assert_eq!(all.stdout.lines().count(), 5, "{}", all.stdout);
    let summary = all.stdout.lines().last().unwrap();
    assert_eq!(
        summary,
        "3 dead letters of endpoint grid-out: 1 max_attempts, 1 permanent, 1 ttl_expired; \
         1 blob not named as dead letters ignored"
    );

    let telemetry_only = f.run(&["list", "--filter", "type = 'microsoft.iot.telemetry'"]).await;
    assert_eq!(telemetry_only.code, Some(0), "{telemetry_only:?}");
    assert!(telemetry_only.stdout.contains(&current.id), "{telemetry_only:?}");
    assert!(!telemetry_only.stdout.contains(&old.id) && !telemetry_only.stdout.contains(&recent.id));
    assert!(telemetry_only
        .stdout
        .contains("1 dead letter of endpoint grid-out: 1 permanent; 2 more did not match"));

    let last_day = f.run(&["list", "--since", "24h"]).await;
    assert_eq!(last_day.code, Some(0), "{last_day:?}");
    assert!(last_day.stdout.contains(&recent.id) && last_day.stdout.contains(&current.id), "{last_day:?}");
    assert!(!last_day.stdout.contains(&old.id), "{last_day:?}");
    assert!(last_day.stdout.contains("2 dead letters of endpoint grid-out since "), "{last_day:?}");

    let four_days = OffsetDateTime::now_utc() - time::Duration::days(4);
    let since = four_days.format(&time::format_description::well_known::Rfc3339).unwrap();
    let everything =
        f.run(&["list", "--since", &since, "--filter", "type = 'Microsoft.DigitalTwins.Twin.Create'"]).await;
    assert_eq!(everything.code, Some(0), "{everything:?}");
    assert!(everything.stdout.contains(&old.id) && everything.stdout.contains(&recent.id), "{everything:?}");
    assert!(!everything.stdout.contains(&current.id), "{everything:?}");

    let json = f.run(&["list", "--json"]).await;
    assert_eq!(json.code, Some(0), "{json:?}");
    let records: Vec<Value> = json.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 3, "{json:?}");
    for (record, (letter, reason)) in
        records.iter().zip([(&old, "ttl_expired"), (&recent, "max_attempts"), (&current, "permanent")])
    {
        assert_eq!(record["blob"], letter.blob.as_str());
        assert_eq!(record["event"], letter.wire);
        assert_eq!(record["metadata"]["deadletterreason"], reason);
        assert_eq!(record["metadata"]["endpointname"], ENDPOINT);
        assert!(record["metadata"]["firstattempttime"].as_str().unwrap().ends_with('Z'));
        assert!(record["hour"].as_str().unwrap().ends_with(":00:00Z"), "{record}");
    }
    assert!(
        json.stderr.contains("3 dead letters of endpoint grid-out"),
        "the count goes to stderr: {json:?}"
    );

    // Nothing was delivered or deleted by listing.
    assert!(f.topic.requests().is_empty());
    assert_eq!(f.blobs().await.len(), 5);
}

#[tokio::test]
async fn replay_delivers_each_once_in_the_wire_form_and_deletes_only_what_it_delivered() {
    let f = fixture().await;
    let [old, recent, current] = f.seed_three().await;
    let before = f.blobs().await;

    let dry = f.run(&["replay", "--dry-run"]).await;
    assert_eq!(dry.code, Some(0), "{dry:?}");
    assert_eq!(dry.stdout.matches(" would replay ").count(), 3, "{dry:?}");
    assert!(dry.stdout.contains("dry run for endpoint grid-out: 3 would be replayed, 0 skipped by filter"));
    assert!(f.topic.requests().is_empty(), "a dry run delivers nothing");
    assert_eq!(f.blobs().await, before, "a dry run deletes nothing");

    let twins = f.run(&["replay", "--filter", "type = 'Microsoft.DigitalTwins.Twin.Create'"]).await;
    assert_eq!(twins.code, Some(0), "{twins:?}");
    assert!(
        twins
            .stdout
            .contains("replay of endpoint grid-out: 2 replayed, 1 skipped by filter, 0 failed, 0 left"),
        "{twins:?}"
    );
    assert!(line_of(&twins, &old.id).starts_with("[1/3] replayed"), "{twins:?}");
    // The structured events, oldest first, each once.
    assert_eq!(f.topic.received(), vec![old.wire.clone(), recent.wire.clone()]);
    let left = f.blobs().await;
    assert!(
        left.contains(&current.blob) && !left.contains(&old.blob) && !left.contains(&recent.blob),
        "{left:?}"
    );
    assert_eq!(left.len(), 3, "the filtered-out letter, the other blob and the other endpoint's: {left:?}");

    // The topic is briefly busy: the event is retried and delivered.
    f.topic.push_faults([Fault::status(503), Fault::with_retry_after(503, 1)]);
    let rest = f.run(&["replay", "--rate", "5"]).await;
    assert_eq!(rest.code, Some(0), "{rest:?}");
    assert_eq!(rest.stderr.matches("retrying in").count(), 2, "{rest:?}");
    assert!(rest.stdout.contains("1 replayed, 0 skipped by filter, 0 failed, 0 left"), "{rest:?}");
    assert_eq!(f.topic.received(), vec![old.wire.clone(), recent.wire.clone(), current.wire.clone()]);
    let left = f.blobs().await;
    assert_eq!(left.len(), 2, "only blobs that are not this endpoint's dead letters: {left:?}");
    assert!(left.iter().all(|b| !b.starts_with(&format!("{ENDPOINT}/20"))), "{left:?}");

    let none = f.run(&["replay"]).await;
    assert_eq!(none.code, Some(0), "{none:?}");
    assert!(none.stdout.contains("0 replayed, 0 skipped by filter, 0 failed, 0 left"), "{none:?}");
    assert_eq!(f.topic.received().len(), 3, "nothing delivered twice");
}

#[tokio::test]
async fn an_outage_stops_the_replay_leaving_the_rest_and_a_refusal_leaves_only_its_letter() {
    let f = fixture().await;
    let [old, recent, current] = f.seed_three().await;
    let dead_letters =
        |blobs: &[String]| blobs.iter().filter(|b| b.starts_with(&format!("{ENDPOINT}/20"))).count();

    // The topic answers 503 for longer than the replay retries: it stops at the first event.
    f.topic.push_faults((0..10).map(|_| Fault::status(503)));
    let outage = f.run(&["replay"]).await;
    assert_eq!(outage.code, Some(1), "{outage:?}");
    assert!(outage.stdout.contains("0 replayed, 0 skipped by filter, 1 failed, 2 left"), "{outage:?}");
    assert!(outage.stderr.contains("replay stopped") && outage.stderr.contains("answered 503"), "{outage:?}");
    assert!(outage.stderr.contains("3 dead letters not replayed yet"), "{outage:?}");
    assert_eq!(f.topic.requests().len(), 4, "4 attempts, then the replay stops");
    assert!(f.topic.received().is_empty());
    assert_eq!(dead_letters(&f.blobs().await), 3, "every dead letter is still there");

    // A refusal with --stop-on-error: nothing else is tried.
    f.topic.reset();
    f.topic.push_faults([Fault::status(400)]);
    let stop = f.run(&["replay", "--stop-on-error"]).await;
    assert_eq!(stop.code, Some(1), "{stop:?}");
    assert!(line_of(&stop, &old.id).contains("refused"), "{stop:?}");
    assert!(stop.stdout.contains("0 replayed, 0 skipped by filter, 1 failed, 2 left"), "{stop:?}");
    assert!(f.topic.received().is_empty());
    assert_eq!(dead_letters(&f.blobs().await), 3);

    // A refusal without it: that letter stays, the others are replayed.
    f.topic.push_faults([Fault::status(400)]);
    let refused = f.run(&["replay"]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stdout.contains("2 replayed, 0 skipped by filter, 1 failed, 0 left"), "{refused:?}");
    assert!(line_of(&refused, &old.id).contains("left in place"), "{refused:?}");
    assert_eq!(f.topic.received(), vec![recent.wire.clone(), current.wire.clone()]);
    let left = f.blobs().await;
    assert_eq!(dead_letters(&left), 1);
    assert!(left.contains(&old.blob), "{left:?}");

    // Once the topic takes it, the last one goes too.
    let last = f.run(&["replay"]).await;
    assert_eq!(last.code, Some(0), "{last:?}");
    assert_eq!(f.topic.received(), vec![recent.wire, current.wire, old.wire]);
    assert_eq!(dead_letters(&f.blobs().await), 0);
}

/// Argument and configuration problems are reported before anything is read (no Azurite needed).
#[tokio::test]
async fn bad_arguments_and_configurations_exit_with_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twinroute.toml");
    std::fs::write(
        &config,
        "[endpoints.grid-out]\ntype = \"EventGrid\"\ntopic_endpoint = \"http://127.0.0.1:9/api/events\"\n\
         access_key1 = \"k\"\n[endpoints.console]\ntype = \"Stdout\"\n",
    )
    .unwrap();
    let deadletter = |args: &[&str]| {
        let mut c = twinroute();
        c.arg("deadletter").args(args).arg("--config").arg(&config);
        c
    };

    let bad_filter = run(deadletter(&["list", "--endpoint", "grid-out", "--filter", "type = 'a' AND"])).await;
    assert_eq!(bad_filter.code, Some(2), "{bad_filter:?}");
    assert!(bad_filter.stderr.contains("invalid filter") && bad_filter.stderr.contains("type = 'a' AND\n"));
    assert!(bad_filter.stderr.contains("              ^"), "{bad_filter:?}");

    let bad_since = run(deadletter(&["replay", "--endpoint", "grid-out", "--since", "yesterday"])).await;
    assert_eq!(bad_since.code, Some(65), "{bad_since:?}");
    assert!(bad_since.stderr.contains("--since \"yesterday\": expected an RFC 3339 time"), "{bad_since:?}");

    let unknown = run(deadletter(&["replay", "--endpoint", "nope"])).await;
    assert_eq!(unknown.code, Some(78), "{unknown:?}");
    assert!(
        unknown.stderr.contains("has no endpoint \"nope\" (its endpoints: console, grid-out)"),
        "{unknown:?}"
    );

    for (command, endpoint, hint) in [
        ("list", "grid-out", "set dead_letter_secret"),
        ("replay", "console", "Stdout endpoints cannot have one"),
    ] {
        let no_store = run(deadletter(&[command, "--endpoint", endpoint])).await;
        assert_eq!(no_store.code, Some(78), "{no_store:?}");
        assert!(
            no_store.stderr.contains(&format!("endpoint {endpoint} has no dead-letter store"))
                && no_store.stderr.contains(hint),
            "{no_store:?}"
        );
    }

    let broken = run({
        let mut c = twinroute();
        c.args(["deadletter", "list", "--endpoint", "grid-out", "--config"])
            .arg(Path::new("/nonexistent.toml"));
        c
    })
    .await;
    assert_eq!(broken.code, Some(78), "{broken:?}");

    let help = run({
        let mut c = twinroute();
        c.args(["deadletter", "replay", "--help"]);
        c
    })
    .await;
    assert_eq!(help.code, Some(0));
    for status in [
        "0   success",
        "1   replay incomplete",
        "2   invalid --filter",
        "65  invalid --since",
        "78  configuration",
    ] {
        assert!(help.stdout.contains(status), "{status} missing from {}", help.stdout);
    }
}

#[tokio::test]
async fn a_permanent_refusal_in_the_daemon_lands_in_the_store_and_replay_brings_it_back() {
    let f = fixture().await;
    // The topic refuses the event as malformed: permanent, dead-lettered at once.
    f.topic.push_faults([Fault::status(400)]);
    let text = std::fs::read_to_string(&f.config).unwrap();
    let env = std::collections::HashMap::from([
        ("TWINROUTE_INGEST__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("TWINROUTE_ADMIN__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
    ]);
    let config = twinroute::config::Config::from_toml(&text, "test", Some(env)).unwrap();
    let running = twinroute::app::Running::start(config, Default::default()).await.unwrap();
    let sent = crate::helpers::twin_create("room-dl");
    let id = sent["id"].as_str().unwrap().to_owned();
    let response = reqwest::Client::new()
        .post(format!("http://{}/events", running.ingest_addr.unwrap()))
        .header("content-type", "application/cloudevents+json")
        .body(sent.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let stats = running.dispatcher.snapshot().endpoints[ENDPOINT].stats.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(stats);
    assert!(running.stop().await.undelivered.is_empty());

    // At <endpoint>/<yyyy>/<mm>/<dd>/<hh>/<event-id>.json, the original event, with why.
    let writer = f.writer();
    let names = writer.list(&format!("{ENDPOINT}/")).await.unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    let now = OffsetDateTime::now_utc();
    let hour = format!("{ENDPOINT}/{:04}/{:02}/{:02}/", now.year(), now.month() as u8, now.day());
    assert!(names[0].starts_with(&hour) && names[0].ends_with(&format!("/{id}.json")), "{}", names[0]);
    let stored = writer.get(&names[0]).await.unwrap().unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&stored.body).unwrap(), sent);
    let meta = |k: &str| stored.metadata.iter().find(|(n, _)| n.as_str() == k).map(|(_, v)| v.clone());
    assert_eq!(meta("deadletterreason").as_deref(), Some("permanent"));
    assert_eq!(meta("deliveryattempts").as_deref(), Some("1"));
    assert!(meta("lasterror").unwrap().contains("400"));
    assert!(meta("firstattempttime").is_some() && meta("lastattempttime").is_some());

    // The topic is fixed: replay delivers it and removes the dead letter.
    let before = f.topic.received().len();
    let mut replay = twinroute();
    replay.args(["deadletter", "replay", "--endpoint", ENDPOINT, "--config"]).arg(&f.config);
    let out = run(replay).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let received = f.topic.received();
    assert_eq!(received.len(), before + 1);
    assert_eq!(received.last().unwrap()["id"], id.as_str());
    assert!(writer.list(&format!("{ENDPOINT}/")).await.unwrap().is_empty());
    assert!(!out.stdout.contains(&f.sig) && !out.stderr.contains(&f.sig));
}
