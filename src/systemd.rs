//! systemd's service notification protocol (`sd_notify`), spoken directly: one datagram of
//! `NAME=value` lines to the Unix socket named by `NOTIFY_SOCKET`; no libsystemd, no crate.
//!
//! Under `Type=notify` (`deploy/systemd/twinroute.service`) `twinroute run` sends `READY=1` once
//! the configuration is loaded and the listeners are bound, `WATCHDOG=1` keep-alives at half of
//! `WATCHDOG_USEC` (`WatchdogSec=`), `STOPPING=1` when a stop begins, `RELOADING=1` (with
//! `MONOTONIC_USEC=`) when a configuration reload begins and `READY=1` again when it is over, and
//! `STATUS=` lines that `systemctl status` shows. Without `NOTIFY_SOCKET` every call does nothing. A failed send is
//! logged at debug level and never stops the daemon: systemd notices a missing `READY=1` or
//! keep-alive by itself, and acts on it as the unit says.

use crate::delivery::{Dispatcher, Health};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often `STATUS=` is refreshed when there is no watchdog to piggyback on: often enough for
/// `systemctl status` to be current, rarely enough to cost nothing.
pub const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// Time a stop needs beyond the drain deadline (closing the listeners, syncing and closing the
/// spool), asked of systemd with `EXTEND_TIMEOUT_USEC` when the stop begins.
pub const STOP_MARGIN: Duration = Duration::from_secs(10);

/// Where notifications go: the value of `NOTIFY_SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddress {
    /// A socket file, e.g. `/run/systemd/notify`.
    Path(PathBuf),
    /// A Linux abstract socket: `@name` in the variable, the name without the `@` here.
    Abstract(Vec<u8>),
}

/// Why `NOTIFY_SOCKET` names no socket twinroute can send to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyAddressError {
    #[error("NOTIFY_SOCKET is empty")]
    Empty,
    #[error(
        "NOTIFY_SOCKET={0:?} is neither an absolute path nor an @abstract socket name \
         (other kinds, such as vsock:, are not supported)"
    )]
    Unsupported(String),
}

impl NotifyAddress {
    /// Parses `NOTIFY_SOCKET` as systemd sets it: an absolute path, or `@` and an abstract name.
    pub fn parse(value: &OsStr) -> Result<NotifyAddress, NotifyAddressError> {
        let bytes = value.as_bytes();
        match bytes {
            [] => Err(NotifyAddressError::Empty),
            [b'/', ..] => Ok(NotifyAddress::Path(PathBuf::from(value))),
            [b'@', name @ ..] if !name.is_empty() => Ok(NotifyAddress::Abstract(name.to_vec())),
            _ => Err(NotifyAddressError::Unsupported(value.to_string_lossy().into_owned())),
        }
    }

    fn send(&self, socket: &UnixDatagram, message: &[u8]) -> std::io::Result<usize> {
        match self {
            NotifyAddress::Path(path) => socket.send_to(message, path),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            NotifyAddress::Abstract(name) => {
                #[cfg(target_os = "android")]
                use std::os::android::net::SocketAddrExt;
                #[cfg(target_os = "linux")]
                use std::os::linux::net::SocketAddrExt;
                let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message, &address)
            }
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            NotifyAddress::Abstract(_) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "abstract Unix sockets exist on Linux only",
            )),
        }
    }
}

/// One assignment of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State<'a> {
    /// `READY=1`: start-up is finished (configuration loaded, listeners bound).
    Ready,
    /// `STOPPING=1`: a stop has begun.
    Stopping,
    /// `RELOADING=1`: a configuration reload has begun (`READY=1` says it is over).
    Reloading,
    /// `MONOTONIC_USEC=`: `CLOCK_MONOTONIC` when the reload began, which systemd wants with
    /// `RELOADING=1`.
    MonotonicUsec(u64),
    /// `WATCHDOG=1`: a keep-alive.
    Watchdog,
    /// `STATUS=`: one line for `systemctl status`.
    Status(&'a str),
    /// `EXTEND_TIMEOUT_USEC=`: the current phase (here, the drain) may take this much longer
    /// than the unit's timeout, so a drain deadline above `TimeoutStopSec=` is still honoured.
    ExtendTimeout(Duration),
}

/// The datagram for `states`: one `NAME=value` line each (a status is kept to one line).
pub fn message(states: &[State<'_>]) -> String {
    let mut text = String::new();
    for state in states {
        match state {
            State::Ready => text.push_str("READY=1"),
            State::Stopping => text.push_str("STOPPING=1"),
            State::Reloading => text.push_str("RELOADING=1"),
            State::MonotonicUsec(usec) => text.push_str(&format!("MONOTONIC_USEC={usec}")),
            State::Watchdog => text.push_str("WATCHDOG=1"),
            State::Status(status) => {
                text.push_str("STATUS=");
                text.extend(status.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }));
            }
            State::ExtendTimeout(by) => text.push_str(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros())),
        }
        text.push('\n');
    }
    text
}

/// The keep-alive interval systemd asks for: half of `WATCHDOG_USEC`, when it is set, positive,
/// and meant for this process (`WATCHDOG_PID` unset or equal to `pid`).
pub fn watchdog_interval(usec: Option<&OsStr>, watchdog_pid: Option<&OsStr>, pid: u32) -> Option<Duration> {
    if let Some(for_pid) = watchdog_pid {
        if for_pid.to_str()?.trim().parse::<u32>().ok()? != pid {
            return None;
        }
    }
    let usec = usec?.to_str()?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec) / 2)
}

/// The connection to the service manager, or nothing when twinroute was not started by one
/// (then every method does nothing).
#[derive(Debug)]
pub struct Notifier {
    /// The socket and address to send to; `None` without a usable `NOTIFY_SOCKET`.
    target: Option<(UnixDatagram, NotifyAddress)>,
    /// The keep-alive interval, when systemd watches this process.
    watchdog: Option<Duration>,
    /// Set by [`Notifier::stopping`]: status lines then describe the drain.
    stopping: AtomicBool,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None, watchdog: None, stopping: AtomicBool::new(false) }
    }

    /// From this process's environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        Self::from_vars(|name| std::env::var_os(name), std::process::id())
    }

    /// From the variables `var` returns, for the process `pid`.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>, pid: u32) -> Notifier {
        let Some(value) = var("NOTIFY_SOCKET") else {
            return Self::disabled();
        };
        let address = match NotifyAddress::parse(&value) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "systemd notifications disabled");
                return Self::disabled();
            }
        };
        let socket = match UnixDatagram::unbound() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "systemd notifications disabled: cannot create a Unix datagram socket");
                return Self::disabled();
            }
        };
        let watchdog =
            watchdog_interval(var("WATCHDOG_USEC").as_deref(), var("WATCHDOG_PID").as_deref(), pid);
        Notifier { target: Some((socket, address)), watchdog, stopping: AtomicBool::new(false) }
    }

    /// Whether there is a service manager to notify.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`, when systemd watches this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// Sends `states` in one datagram. A failure is logged at debug level, nothing more.
    pub fn notify(&self, states: &[State<'_>]) {
        let Some((socket, address)) = &self.target else {
            return;
        };
        if states.is_empty() {
            return;
        }
        let text = message(states);
        if let Err(e) = address.send(socket, text.as_bytes()) {
            tracing::debug!(error = %e, socket = ?address, message = %text.trim_end(), "systemd notification not sent");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&[State::Ready, State::Status(status)]);
    }

    /// `STOPPING=1` with a status line; the stop may take `drain` longer than the unit allows.
    pub fn stopping(&self, status: &str, drain: Duration) {
        self.stopping.store(true, Ordering::Relaxed);
        self.notify(&[State::Stopping, State::Status(status), State::ExtendTimeout(drain)]);
    }

    /// `RELOADING=1` with the time and a status line; [`Notifier::ready`] ends the reload.
    pub fn reloading(&self, status: &str) {
        self.notify(&[State::Reloading, State::MonotonicUsec(monotonic_usec()), State::Status(status)]);
    }

    /// A status line alone.
    pub fn status(&self, status: &str) {
        self.notify(&[State::Status(status)]);
    }

    /// Until aborted: `WATCHDOG=1` every keep-alive interval (when systemd watches), and a fresh
    /// `STATUS=` (`listening`, endpoints' health, events waiting) whenever it changed. Running on
    /// the daemon's runtime, the keep-alives stop if that runtime stops scheduling tasks, and
    /// systemd restarts the service as `WatchdogSec=` says.
    pub async fn keep_alive(self: Arc<Self>, dispatcher: Arc<Dispatcher>, listening: String) {
        if !self.is_enabled() {
            return;
        }
        let watchdog = self.watchdog_interval();
        let mut ticker = tokio::time::interval(watchdog.unwrap_or(STATUS_REFRESH).min(STATUS_REFRESH));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = String::new();
        loop {
            ticker.tick().await;
            let status = status_line(&dispatcher, &listening, self.stopping.load(Ordering::Relaxed));
            let mut states = Vec::with_capacity(2);
            if watchdog.is_some() {
                states.push(State::Watchdog);
            }
            if status != last {
                states.push(State::Status(&status));
            }
            self.notify(&states);
            last = status;
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock `MONOTONIC_USEC=` is read against.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } == 0;
    if !ok {
        return 0;
    }
    (now.tv_sec as u64).saturating_mul(1_000_000).saturating_add(now.tv_nsec as u64 / 1_000)
}

/// What `systemctl status` shows while twinroute runs: where it listens, endpoints by health and
/// events waiting.
pub fn status_line(dispatcher: &Dispatcher, listening: &str, stopping: bool) -> String {
    let snapshot = dispatcher.snapshot();
    let (mut healthy, mut degraded, mut unhealthy, mut waiting) = (0, 0, 0, 0u64);
    for handle in snapshot.endpoints.values() {
        match handle.stats.health().0 {
            Health::Healthy => healthy += 1,
            Health::Degraded => degraded += 1,
            Health::Unhealthy => unhealthy += 1,
        }
        waiting += handle.stats.outstanding();
    }
    let phase = if stopping { "stopping, draining" } else { "running" };
    format!(
        "{phase}: {listening}; endpoints: {healthy} healthy, {degraded} degraded, {unhealthy} unhealthy; \
         events waiting: {waiting}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), OsString::from(v))).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn notify_socket_values_parse_as_systemd_sets_them() {
        assert_eq!(
            NotifyAddress::parse(OsStr::new("/run/systemd/notify")),
            Ok(NotifyAddress::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifyAddress::parse(OsStr::new("@/org/freedesktop/systemd1/notify/123")),
            Ok(NotifyAddress::Abstract(b"/org/freedesktop/systemd1/notify/123".to_vec()))
        );
        assert_eq!(NotifyAddress::parse(OsStr::new("")), Err(NotifyAddressError::Empty));
        for unsupported in ["@", "relative/notify", "vsock:2:1234"] {
            assert!(
                matches!(
                    NotifyAddress::parse(OsStr::new(unsupported)),
                    Err(NotifyAddressError::Unsupported(_))
                ),
                "{unsupported}"
            );
        }
    }

    #[test]
    fn messages_are_one_assignment_per_line_and_statuses_one_line() {
        let text = message(&[
            State::Stopping,
            State::Status("draining\nqueues"),
            State::ExtendTimeout(Duration::from_secs(40)),
        ]);
        assert_eq!(text, "STOPPING=1\nSTATUS=draining queues\nEXTEND_TIMEOUT_USEC=40000000\n");
        assert_eq!(message(&[State::Ready, State::Watchdog]), "READY=1\nWATCHDOG=1\n");
        assert_eq!(
            message(&[State::Reloading, State::MonotonicUsec(42)]),
            "RELOADING=1\nMONOTONIC_USEC=42\n"
        );
        let (a, b) = (monotonic_usec(), monotonic_usec());
        assert!(0 < a && a <= b, "CLOCK_MONOTONIC: {a} then {b}");
    }

    #[test]
    fn the_watchdog_is_kept_alive_at_half_its_timeout_and_only_for_this_process() {
        let interval = |usec: Option<&str>, pid: Option<&str>| {
            watchdog_interval(usec.map(OsStr::new), pid.map(OsStr::new), 4242)
        };
        assert_eq!(interval(Some("30000000"), None), Some(Duration::from_secs(15)));
        assert_eq!(interval(Some("200000"), Some("4242")), Some(Duration::from_millis(100)));
        assert_eq!(interval(Some("200000"), Some("1")), None, "meant for another process");
        assert_eq!(interval(Some("200000"), Some("x")), None);
        assert_eq!(interval(Some("0"), None), None);
        assert_eq!(interval(Some("soon"), None), None);
        assert_eq!(interval(None, Some("4242")), None);
    }

    #[test]
    fn without_notify_socket_nothing_is_sent_and_nothing_is_watched() {
        let notifier = Notifier::from_vars(vars(&[("WATCHDOG_USEC", "200000")]), 1);
        assert!(!notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready("ready"); // nowhere to send: no effect, no panic
        let bad = Notifier::from_vars(vars(&[("NOTIFY_SOCKET", "relative")]), 1);
        assert!(!bad.is_enabled());
    }

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification arrives");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifications_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::from_vars(
            vars(&[("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "2000000")]),
            std::process::id(),
        );
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(1)));
        notifier.ready("ready: listening");
        assert_eq!(receive(&receiver), "READY=1\nSTATUS=ready: listening\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("twinroute-test-notify-{}-{}", std::process::id(), fastrand::u64(..));
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        let notifier = Notifier::from_vars(vars(&[("NOTIFY_SOCKET", &format!("@{name}"))]), 1);
        assert!(notifier.is_enabled());
        notifier.notify(&[State::Watchdog]);
        assert_eq!(receive(&receiver), "WATCHDOG=1\n");
    }

    #[test]
    fn a_failed_send_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nobody-listens");
        let notifier = Notifier::from_vars(vars(&[("NOTIFY_SOCKET", gone.to_str().unwrap())]), 1);
        assert!(notifier.is_enabled());
        notifier.ready("ready"); // ENOENT: logged at debug, nothing else
    }
}
