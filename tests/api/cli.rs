//! The `twinroute` binary: exit statuses, output, signals.

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};

use crate::helpers::{free_port, twinroute};

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const EVENT: &str = r#"{"specversion":"1.0","id":"e1","type":"microsoft.iot.telemetry","source":"h/digitaltwins/room-1","datacontenttype":"application/json","data":{"temperature":31.5}}"#;

#[test]
fn check_config_reports_every_problem_with_status_78() {
    let dir = tempfile::tempdir().unwrap();
    let ok = write(
        dir.path(),
        "ok.toml",
        "[endpoints.out]\ntype = \"Stdout\"\n[routes.all]\nendpoint_name = \"out\"\n",
    );
    let out = twinroute().args(["check-config", "--config"]).arg(&ok).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 endpoints, 1 routes"));

    let bad = write(
        dir.path(),
        "bad.toml",
        "[ingest]\nlisten = \"x\"\nspeed = 1\n[endpoints.out]\ntype = \"Stdout\"\n[routes.r]\nendpoint_name = \"out\"\nfilter = \"type = 'a' AND\"\n",
    );
    for command in ["check-config", "run"] {
        let out = twinroute().args([command, "--config"]).arg(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for needle in ["3 problems", "ingest.speed: unknown key", "ingest.listen", "routes.r: filter:"] {
            assert!(stderr.contains(needle), "{command}: {needle} missing from {stderr}");
        }
    }
    let missing =
        twinroute().args(["check-config", "--config", "/nonexistent/twinroute.toml"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(78));
    // The embedded default is valid.
    assert_eq!(twinroute().arg("check-config").output().unwrap().status.code(), Some(0));
}

#[test]
fn filter_check_prints_true_or_false_and_exits_2_on_a_bad_filter() {
    let dir = tempfile::tempdir().unwrap();
    let event = write(dir.path(), "event.json", EVENT);
    let run = |filter: &str, event: Option<&std::path::Path>| {
        let mut c = twinroute();
        c.args(["filter", "check", "--filter", filter]);
        if let Some(e) = event {
            c.arg("--event").arg(e);
        }
        c.output().unwrap()
    };
    let yes = run("$body.temperature > 30 AND type = 'microsoft.iot.telemetry'", Some(&event));
    assert_eq!((yes.status.code(), yes.stdout.as_slice()), (Some(0), &b"true\n"[..]));
    let no = run("$body.temperature > 40", Some(&event));
    assert_eq!((no.status.code(), no.stdout.as_slice()), (Some(0), &b"false\n"[..]));
    let valid = run("true", None);
    assert_eq!(valid.status.code(), Some(0));
    let bad = run("type = 'a' AND", Some(&event));
    assert_eq!(bad.status.code(), Some(2));
    assert!(bad.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("offset 14") && stderr.contains("type = 'a' AND\n") && stderr.contains('^'),
        "{stderr}"
    );

    // The event from stdin.
    let mut child = twinroute()
        .args(["filter", "check", "--filter", "subject = 'x'", "--event", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(EVENT.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!((out.status.code(), out.stdout.as_slice()), (Some(0), &b"false\n"[..]));

    let invalid_event = write(dir.path(), "bad.json", r#"{"specversion":"1.0"}"#);
    let out = run("true", Some(&invalid_event));
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("id: required attribute is missing"));
}

#[test]
fn route_explain_names_the_failing_clause() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "c.toml",
        "[endpoints.hot]\ntype = \"Stdout\"\n[endpoints.cold]\ntype = \"Stdout\"\n\
         [routes.hot-rooms]\nendpoint_name = \"hot\"\nfilter = \"$body.temperature > 30\"\n\
         [routes.cold-rooms]\nendpoint_name = \"cold\"\nfilter = \"type = 'microsoft.iot.telemetry' AND $body.temperature < 10\"\n",
    );
    let event = write(dir.path(), "event.json", EVENT);
    let out = twinroute()
        .args(["route", "explain", "--config"])
        .arg(&config)
        .arg("--event")
        .arg(&event)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("route hot-rooms -> hot: MATCH"), "{stdout}");
    assert!(stdout.contains("route cold-rooms -> cold: no match"), "{stdout}");
    assert!(stdout.contains("31.5"), "the failing clause shows the value it saw:\n{stdout}");
    assert!(stdout.contains("would be delivered to: hot"), "{stdout}");
}

#[test]
fn run_with_input_replays_ndjson_and_reports_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.ndjson");
    let config = write(
        dir.path(),
        "c.toml",
        &format!(
            "[endpoints.out]\ntype = \"File\"\npath = \"{}\"\n[routes.all]\nendpoint_name = \"out\"\n",
            out_file.display()
        ),
    );
    let good = |i: usize| {
        format!(r#"{{"specversion":"1.0","id":"e{i}","type":"t","source":"s","data":{{"n":{i}}}}}"#)
    };
    let mut input = String::new();
    for i in 0..200 {
        input.push_str(&good(i));
        input.push('\n');
        if i == 100 {
            input.push_str("{not json\n\n");
        }
    }
    let input_file = write(dir.path(), "in.ndjson", &input);
    let out =
        twinroute().args(["run", "--config"]).arg(&config).arg("--input").arg(&input_file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "one bad line makes the exit status 65: {stderr}");
    assert!(stderr.contains("line=102") || stderr.contains("line: 102"), "the bad line is named: {stderr}");
    assert!(stderr.contains("200 accepted"), "{stderr}");
    let written = std::fs::read_to_string(&out_file).unwrap();
    let lines: Vec<&str> = written.lines().collect();
    assert_eq!(lines.len(), 200);
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    assert_eq!(json(lines[0]), json(&good(0)));
    assert_eq!(json(lines[199]), json(&good(199)));

    // From stdin, in a pipeline, with nothing wrong: exit 0.
    let mut child = twinroute()
        .args(["run", "--config"])
        .arg(&config)
        .args(["--input", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{}\n{}\n", good(500), good(501)).as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&out_file).unwrap().lines().count(), 202);
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.ndjson");
    let config = write(
        dir.path(),
        "c.toml",
        &format!(
            "[ingest]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n\
             [endpoints.out]\ntype = \"File\"\npath = \"{}\"\n[routes.all]\nendpoint_name = \"out\"\n",
            out_file.display()
        ),
    );
    let mut child = twinroute()
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut ingest = None;
    let mut line = String::new();
    while ingest.is_none() {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the daemon exited before listening");
        let log: serde_json::Value = serde_json::from_str(&line).unwrap();
        if log["message"] == "listening" {
            let text = log["ingest"].as_str().unwrap();
            ingest = Some(text.trim_start_matches("Some(").trim_end_matches(')').to_owned());
        }
    }
    let ingest = ingest.unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let batch: Vec<serde_json::Value> = (0..50)
            .map(|i| serde_json::json!({"specversion":"1.0","id":format!("e{i}"),"type":"t","source":"s"}))
            .collect();
        let r = client
            .post(format!("http://{ingest}/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_string(&batch).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    });
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let rest: Vec<String> = stderr.lines().map_while(Result::ok).collect();
    assert_eq!(exit.code(), Some(0), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("SIGTERM received")), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("every accepted event was delivered")), "{rest:?}");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap().lines().count(), 50);
}

/// A port nobody listens on right now.
#[test]
fn the_quick_start_demo_forwards_sample_events() {
    // `twinroute run`'s embedded demo, on free ports (so the test neither collides with a running
    // daemon nor waits long): the same file with only the addresses and the rate changed.
    let dir = tempfile::tempdir().unwrap();
    let demo = include_str!("../../config/local.toml")
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:40342", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:5672", &format!("127.0.0.1:{}", free_port()))
        .replace("events_per_second = 2.0", "events_per_second = 200.0");
    let config = write(dir.path(), "local.toml", &demo);
    let mut child = twinroute()
        .args(["run", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The console endpoint prints routed events on stdout: read a few of them.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    for _ in 0..3 {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the demo printed no events");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        let ty = event["type"].as_str().unwrap();
        assert!(
            ty == "microsoft.iot.telemetry" || ty.starts_with("Microsoft.DigitalTwins.Relationship."),
            "{ty}"
        );
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("every accepted event was delivered"), "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
    let file = std::fs::read_to_string(dir.path().join("twinroute-demo-events.ndjson")).unwrap();
    assert!(file.lines().count() > 0, "twin lifecycle events were written to the file endpoint");
    for line in file.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(event["type"].as_str().unwrap().starts_with("Microsoft.DigitalTwins.Twin."));
    }
}

#[test]
fn the_example_configurations_are_valid() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/production.toml");
    let out = twinroute().args(["check-config", "--config", config]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 endpoints, 4 routes"));
    // The embedded demo is valid too.
    assert_eq!(twinroute().arg("check-config").output().unwrap().status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_drives_ingest_at_the_requested_rate_and_reports_it() {
    let app = crate::helpers::spawn_app("[routes.all]\nendpoint_name = \"hub-a\"\n").await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let mut command = twinroute();
    command
        .args(["loadtest", "--target", &app.ingest, "--rate", "400", "--duration", "1s", "--batch", "10"])
        .args(["--connections", "2", "--payload-bytes", "1024", "--json"])
        .arg(&report_path);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("p99"), "the summary table: {stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let accepted = report["events_accepted"].as_u64().unwrap();
    // Open loop at 400 events/s for 1 s: 40 requests of 10 (the schedule, not the server, sets it).
    assert_eq!(report["events_sent"], 400, "{report}");
    assert_eq!(accepted, 400, "{report}");
    assert_eq!(report["errors"], 0);
    let l = &report["latency_us"];
    let (p50, p99, max) =
        (l["p50"].as_u64().unwrap(), l["p99"].as_u64().unwrap(), l["max"].as_u64().unwrap());
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{l}");
    // What was acknowledged reached the endpoint.
    app.sink("hub-a").wait_for(accepted as usize).await;
    app.stop().await;
}

/// A ramp: the rate rises linearly over the run; the number sent is the integral of the rate,
/// most of it in the second half (the per-second timeline shows the rise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_ramps_the_rate_over_the_run() {
    let app = crate::helpers::spawn_app("[routes.all]\nendpoint_name = \"hub-a\"\n").await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("ramp.json");
    let mut command = twinroute();
    command
        .args(["loadtest", "--target", &app.ingest, "--rate", "100..500", "--duration", "2s"])
        .args(["--batch", "10", "--connections", "2", "--warmup", "0", "--quiet", "--json"])
        .arg(&report_path);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ramp 100/s to 500/s"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    // (100 + 500) / 2 events/s for 2 s.
    assert_eq!(report["events_sent"], 600, "{report}");
    assert_eq!(report["events_accepted"], 600, "{report}");
    assert_eq!((report["rate"].as_f64(), report["ramp_to"].as_f64()), (Some(100.0), Some(500.0)));
    app.sink("hub-a").wait_for(600).await;
    app.stop().await;
}

#[test]
fn loadtest_refuses_bad_values_and_reports_an_unreachable_target() {
    let out = twinroute().args(["loadtest", "--rate", "fast"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate"));
    let out = twinroute().args(["loadtest", "--duration", "5h"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    let port = free_port();
    let out = twinroute()
        .args([
            "loadtest",
            "--target",
            &format!("http://127.0.0.1:{port}"),
            "--rate",
            "100",
            "--duration",
            "300ms",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "requests failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("request failed"), "{stderr}");
}

/// The CI smoke run of the comparison: both phases, against the in-process stand-in and the real
/// binary as the daemon; what twinroute says it delivered is what the stand-in received. (No
/// thresholds: the figures are the harness's output, not a test's.)
#[test]
fn loadtest_compare_runs_both_phases_and_accounts_for_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let (json, chart) = (dir.path().join("compare.json"), dir.path().join("compare.svg"));
    let out = twinroute()
        .args(["loadtest", "--compare", "--rate", "300", "--duration", "2s", "--warmup", "0"])
        .args(["--batch", "10", "--connections", "2", "--payload-bytes", "1024", "--quiet", "--json"])
        .arg(&json)
        .arg("--chart")
        .arg(&chart)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ratio") && stdout.contains("added latency"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for phase in ["baseline", "twinroute"] {
        let r = &report[phase];
        assert_eq!(r["events_accepted"], 600, "{phase}: {r}");
        assert_eq!(r["errors"], 0, "{phase}: {r}");
        // Every event reaches at least one of the three entities; some fan out.
        assert!(r["received"].as_u64().unwrap() > 600, "{phase}: {r}");
        assert!(r["end_to_end_us"]["p50"].as_u64().unwrap() > 0, "{phase}: {r}");
        assert!(!r["timeline"].as_array().unwrap().is_empty(), "{phase}");
    }
    // Same seed, same events, same routes: the same deliveries on both paths.
    assert_eq!(report["baseline"]["received"], report["twinroute"]["received"], "{report}");
    assert_eq!(report["twinroute_delivered"], report["twinroute"]["received"], "{report}");
    assert!(report["twinroute"]["cpu_cores_mean"].as_f64().unwrap() > 0.0);
    assert!(report["twinroute"]["rss_bytes_max"].as_u64().unwrap() > 1_000_000);
    for path in [chart.clone(), dir.path().join("compare-baseline.svg")] {
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{}", path.display());
    }
}

/// The CI smoke run of `--scaleout`: rounds of 1 and 2 replicas (the real binary) drain a hub on
/// the in-process stand-in with Azurite holding the checkpoints; every event is routed in every
/// round and the partitions end up owned by the replicas. (No thresholds.)
#[test]
fn loadtest_scaleout_drains_the_hub_with_each_replica_count() {
    let az = crate::blob::azurite();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("scaleout.json");
    let out = twinroute()
        .args(["loadtest", "--scaleout", "1,2", "--events", "400", "--payload-bytes", "256", "--quiet"])
        .args(["--round-limit", "60s", "--blob-service", &az.blob, "--ca-file"])
        .arg(&az.ca)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("events/s") && stdout.contains("partitions each"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{report}");
    for (round, replicas) in rounds.iter().zip([1u64, 2]) {
        assert_eq!(round["replicas"], replicas, "{round}");
        assert_eq!(round["published"], 400, "{round}");
        assert_eq!(round["routed"], 400, "every event, once or more: {round}");
        assert_eq!(round["complete"], true, "{round}");
        assert!(round["events_per_second"].as_f64().unwrap() > 0.0, "{round}");
        let owned: Vec<u64> =
            round["owned_partitions"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(owned.len() as u64, replicas, "{round}");
        // Each replica's own count at the end: a partition being handed over can show on both
        // (the old owner reads until the new owner's receiver displaces it).
        assert!(owned.iter().all(|&n| n <= 8) && owned.iter().sum::<u64>() > 0, "{round}");
    }
    // One replica reads all 8 partitions itself. (Duplicates are reported, not asserted: on a
    // loaded machine even one replica may re-open a partition at its last checkpoint.)
    assert_eq!(rounds[0]["owned_partitions"][0], 8, "{report}");
}

/// `--endpoints`: the load goes through the delivery pipeline to the configuration's endpoints.
#[test]
fn loadtest_through_a_configurations_endpoints_delivers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = (dir.path().join("load.toml"), dir.path().join("events.ndjson"));
    std::fs::write(
        &config,
        format!(
            "[endpoints.file]\ntype = \"File\"\npath = {:?}\n\n[routes.all]\nendpoint_name = \"file\"\nfilter = \"true\"\n",
            events.display().to_string()
        ),
    )
    .unwrap();
    let out = twinroute()
        .args(["loadtest", "--endpoints"])
        .arg(&config)
        .args(["--rate", "500", "--duration", "1s", "--batch", "10", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("endpoint file: 500 delivered, 0 dead-lettered"), "{stderr}");
    let written = std::fs::read_to_string(&events).unwrap();
    assert_eq!(written.lines().count(), 500);
    assert!(written.lines().all(|l| l.contains("\"loadtestsent\"")), "the send time travels in the event");
    // An invalid configuration is refused before any load.
    std::fs::write(&config, "[endpoints.file]\ntype = \"Nope\"\n").unwrap();
    let out = twinroute().args(["loadtest", "--endpoints"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A token-protected ingest: without the token every request fails (401); with `--token-file`
/// the load goes through, and the token is not echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_sends_the_ingest_token_from_a_file() {
    const TOKEN: &str = "loadtest-ingest-token-5c1d9e";
    let app = crate::helpers::spawn_app(&format!(
        "[ingest]\ntoken = \"{TOKEN}\"\n[routes.all]\nendpoint_name = \"hub-a\"\n"
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let load = |with_token: bool| {
        let mut command = twinroute();
        command.args([
            "loadtest",
            "--target",
            &app.ingest,
            "--rate",
            "200",
            "--duration",
            "500ms",
            "--quiet",
        ]);
        if with_token {
            command.arg("--token-file").arg(&token_file);
        }
        command
    };
    let mut without = load(false);
    let out = tokio::task::spawn_blocking(move || without.output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut with = load(true);
    let out = tokio::task::spawn_blocking(move || with.output().unwrap()).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("100 sent, 100 accepted"), "{stdout}");
    assert!(!stdout.contains(TOKEN) && !stderr.contains(TOKEN));
    app.sink("hub-a").wait_for(100).await;
    app.stop().await;
}
