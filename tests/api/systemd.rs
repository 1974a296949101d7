//! `twinroute run` under a fake systemd: `NOTIFY_SOCKET` is a datagram socket this test reads.
//! READY=1 comes only once ingest answers, WATCHDOG=1 at half of `WATCHDOG_USEC`, STOPPING=1 on
//! SIGTERM, and the stop still exits 0.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::twinroute;

/// Receives one notification, or `None` when none comes before `deadline`.
fn receive(socket: &UnixDatagram, deadline: Instant) -> Option<String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    socket.set_read_timeout(Some(left)).unwrap();
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8(buf[..n].to_vec()).expect("notifications are UTF-8")),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
        Err(e) => panic!("reading the notify socket: {e}"),
    }
}

fn has(message: &str, assignment: &str) -> bool {
    message.lines().any(|l| l == assignment)
}

fn status(message: &str) -> Option<&str> {
    message.lines().find_map(|l| l.strip_prefix("STATUS="))
}

#[test]
fn run_notifies_systemd_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.ndjson");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[ingest]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [endpoints.out]\ntype = \"File\"\npath = \"{}\"\n[routes.all]\nendpoint_name = \"out\"\n",
            dir.path().join("state").display(),
            out_file.display()
        ),
    )
    .unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let log_path = dir.path().join("stderr.log");
    let mut child = twinroute()
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Nothing but READY=1 (with the addresses in its status) comes first.
    let ready = receive(&socket, Instant::now() + Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no READY=1 within 60 s; the daemon's log:\n{}", log()));
    assert!(has(&ready, "READY=1"), "the first notification is READY=1: {ready:?}\n{}", log());
    let ready_status = status(&ready).expect("READY=1 comes with a STATUS=");
    let address = |what: &str| {
        ready_status
            .split(", ")
            .find_map(|part| part.rsplit_once(' ').filter(|(name, _)| name.ends_with(what)).map(|(_, a)| a))
            .unwrap_or_else(|| panic!("no {what} address in {ready_status:?}"))
            .to_owned()
    };
    let (ingest, admin) = (address("ingest"), address("admin"));
    let ready_at = Instant::now();

    // At READY=1 ingest and admin already answer: no retry, no waiting.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let health = client.get(format!("http://{admin}/healthz")).send().await.expect("admin answers");
        assert_eq!(health.status(), 200);
        let ready = client.get(format!("http://{admin}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        let accepted = client
            .post(format!("http://{ingest}/events"))
            .header("content-type", "application/cloudevents+json")
            .body(r#"{"specversion":"1.0","id":"e1","type":"t","source":"s"}"#)
            .send()
            .await
            .expect("ingest answers");
        assert_eq!(accepted.status(), 202);
    });

    // WATCHDOG_USEC=200000: a keep-alive every 100 ms; a second's worth holds several.
    let mut keep_alives = 0;
    let mut statuses = Vec::new();
    while let Some(message) = receive(&socket, ready_at + Duration::from_secs(1)) {
        assert!(!has(&message, "READY=1"), "READY=1 is sent once: {message:?}");
        keep_alives += usize::from(has(&message, "WATCHDOG=1"));
        statuses.extend(status(&message).map(str::to_owned));
    }
    assert!(keep_alives >= 2, "{keep_alives} WATCHDOG=1 in the second after READY=1\n{}", log());
    assert!(
        statuses.iter().any(|s| s.starts_with("running: ") && s.contains("endpoints: 1 healthy, 0 degraded")),
        "a running status: {statuses:?}"
    );

    // SIGTERM: STOPPING=1 (telling systemd how long the drain may take), then exit 0.
    let status_code = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status_code.success());
    let mut stopping = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_status = None;
    while let Some(message) = receive(&socket, deadline) {
        if has(&message, "STOPPING=1") {
            stopping = Some(message.clone());
        }
        if let Some(s) = status(&message) {
            last_status = Some(s.to_owned());
            if s.starts_with("stopped: ") {
                break;
            }
        }
    }
    let stopping = stopping.unwrap_or_else(|| panic!("no STOPPING=1 after SIGTERM\n{}", log()));
    assert!(stopping.lines().any(|l| l.starts_with("EXTEND_TIMEOUT_USEC=")), "{stopping:?}");
    assert_eq!(last_status.as_deref(), Some("stopped: every accepted event was delivered"));
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "{}", log());
    assert_eq!(std::fs::read_to_string(&out_file).unwrap().lines().count(), 1);
}

#[test]
fn a_watchdog_meant_for_another_process_gets_no_keep_alives() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[ingest]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n")
        .unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut child = twinroute()
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        // systemd sets WATCHDOG_PID to the process it watches: here, not this one.
        .env("WATCHDOG_PID", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = receive(&socket, Instant::now() + Duration::from_secs(60)).expect("READY=1");
    assert!(has(&ready, "READY=1"), "{ready:?}");
    let ready_at = Instant::now();
    while let Some(message) = receive(&socket, ready_at + Duration::from_millis(500)) {
        assert!(!has(&message, "WATCHDOG=1"), "a keep-alive for another process's watchdog: {message:?}");
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
