//! Where an API listens and who may call it: `listen` (an `address:port` or `unix:<path>`), the
//! bearer token (in the file, from the environment, or from a token file), TLS, the Unix
//! socket's mode, and the time limits on reading a request. The same keys serve `[ingest]` and
//! `[admin]`; [`ListenerView::settings`] checks them and [`crate::server`] applies them.
//!
//! The rule a reviewer should find here: **an API bound beyond loopback has a token, or says
//! explicitly that it runs open** (`allow_unauthenticated = true`). A configured token is
//! enforced on every kind of listener, loopback and Unix sockets included.

use super::{AdminConfig, IngestConfig, Secret};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A Unix socket twinroute creates can be used by its owner and group (a sidecar sharing the
/// group, through the pod's `fsGroup` or a setgid directory), not by other users.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// A client has this long to send a request's headers (from connecting, or from the first byte
/// of a later request on a kept-alive connection) and to finish a TLS handshake; then the
/// connection is closed. Short enough that a slowloris client holds a connection for seconds,
/// long enough for any real client, however far away.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECONDS: u64 = 10;
/// A kept-alive connection may wait this long for its next request: longer than HTTP clients
/// keep idle connections in their pools (reqwest and Go: 90 s), so that a client never sends a
/// request into a connection the server is closing.
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u64 = 120;
/// A request's whole body must arrive within this long of its headers, or the answer is 408:
/// a 4 MiB batch (`max_request_bytes`) needs about 1 Mbit/s.
pub const DEFAULT_BODY_READ_TIMEOUT_SECONDS: u64 = 60;
/// The shortest token accepted: 16 characters, 64 bits from a hex generator at the least
/// (`openssl rand -hex 32` gives 64 characters).
pub const MIN_TOKEN_CHARS: usize = 16;
/// The longest Unix socket path the kernel accepts (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// An API's address: TCP, or a Unix domain socket (`unix:/run/twinroute/ingest.sock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    pub fn parse(text: &str) -> Result<ListenAddr, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let p = Path::new(path);
            if !p.is_absolute() || path.ends_with('/') {
                return Err(format!("{text:?}: a Unix socket is unix:<absolute path of the socket file>, e.g. unix:/run/twinroute/ingest.sock"));
            }
            if path.len() > MAX_SOCKET_PATH_BYTES {
                return Err(format!(
                    "{text:?}: the socket path is longer than the {MAX_SOCKET_PATH_BYTES} bytes a Unix socket address holds"
                ));
            }
            return Ok(ListenAddr::Unix(p.to_path_buf()));
        }
        text.parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("{text:?} is not an address:port (e.g. 127.0.0.1:8080) nor unix:<path>"))
    }

    /// Whether other hosts may reach it: any TCP address but a loopback one (`0.0.0.0` and
    /// `::` included). A Unix socket is reached through the file system, guarded by its mode.
    pub fn beyond_loopback(&self) -> bool {
        match self {
            ListenAddr::Tcp(a) => !a.ip().is_loopback(),
            ListenAddr::Unix(_) => false,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A Unix socket's permission bits, written as octal digits in a string (`"0660"`).
///
/// From the environment (`TWINROUTE_INGEST__SOCKET_MODE=0660`) the value arrives as the integer
/// 660, whose decimal digits are then read as octal. A TOML octal literal (`0o660`, which is 432)
/// would be misread that way, so a mode must let its owner read and write (first digit 6 or 7):
/// every common literal then fails loudly instead.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl fmt::Debug for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl SocketMode {
    fn from_digits(digits: &str) -> Result<SocketMode, String> {
        let digits = digits.strip_prefix("0o").unwrap_or(digits);
        let mode = u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| !digits.is_empty() && *m <= 0o777)
            .ok_or_else(|| format!("{digits:?} is not a mode of octal digits such as \"0660\""))?;
        if mode & 0o600 != 0o600 {
            return Err(format!(
                "{mode:04o} does not let the owner read and write the socket; write the mode as a string, e.g. \"0660\""
            ));
        }
        Ok(SocketMode(mode))
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) if n.is_u64() => n.to_string(),
            _ => return Err(serde::de::Error::custom("must be a string of octal digits, e.g. \"0660\"")),
        };
        SocketMode::from_digits(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

/// `token = "..."`: a string, never echoed. A token of digits only reaches the configuration as a
/// number when it comes from the environment (the loader parses values); it is refused with a
/// message that does not repeat it, as serde's own message would.
pub fn deserialize_token<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(Secret::new(s))),
        Some(_) => Err(serde::de::Error::custom(
            "must be a string (a token of digits only is read as a number: generate one with letters, e.g. `openssl rand -hex 32`)",
        )),
    }
}

/// Checks a token's form without showing it: long enough, printable ASCII without spaces (what
/// an `Authorization: Bearer` header can carry).
pub fn token_problem(token: &str) -> Option<String> {
    if token.chars().count() < MIN_TOKEN_CHARS {
        Some(format!(
            "is shorter than {MIN_TOKEN_CHARS} characters; generate one, e.g. `openssl rand -hex 32`"
        ))
    } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
        Some("must be printable ASCII without spaces (it travels in an HTTP header)".into())
    } else {
        None
    }
}

/// One API's listener settings as written in its section, borrowed for checking.
#[derive(Debug, Clone, Copy)]
pub struct ListenerView<'a> {
    /// `ingest` or `admin`: the section, for messages and metrics.
    pub section: &'static str,
    pub listen: &'a str,
    pub token: Option<&'a Secret>,
    pub token_file: Option<&'a Path>,
    pub allow_unauthenticated: bool,
    pub tls_cert_file: Option<&'a Path>,
    pub tls_key_file: Option<&'a Path>,
    pub socket_mode: Option<SocketMode>,
    pub header_read_timeout_seconds: u64,
    pub idle_timeout_seconds: u64,
    pub body_read_timeout_seconds: u64,
    /// Admin only: `/metrics` without the token.
    pub metrics_unauthenticated: bool,
}

/// Where an API's bearer token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// In the configuration (file or `TWINROUTE_<SECTION>__TOKEN`): read once, at start.
    Inline(Secret),
    /// A file holding the token (one or more, one per line, so a rotation can overlap): read at
    /// start, and again whenever it changes.
    File(PathBuf),
}

/// A TLS certificate chain and its private key, PEM files (re-read when they change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One API's listener settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSettings {
    pub section: &'static str,
    pub listen: ListenAddr,
    /// `None`: no token, which beyond loopback means `allow_unauthenticated = true` was set.
    pub token: Option<TokenSource>,
    pub tls: Option<TlsFiles>,
    /// Permission bits of a Unix socket.
    pub socket_mode: u32,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    pub metrics_unauthenticated: bool,
}

impl ListenerView<'_> {
    /// The checked settings, or every problem with them.
    pub fn settings(&self) -> Result<ListenerSettings, Vec<String>> {
        let s = self.section;
        let mut problems = Vec::new();
        let listen =
            ListenAddr::parse(self.listen).map_err(|e| problems.push(format!("{s}.listen: {e}"))).ok();
        if let Some(token) = self.token {
            if let Some(p) = token_problem(token.expose()) {
                problems.push(format!("{s}.token: {p}"));
            }
        }
        if self.token_file.is_some_and(|p| p.as_os_str().is_empty()) {
            problems.push(format!("{s}.token_file: must be a file path"));
        }
        let token = match (self.token, self.token_file) {
            (Some(_), Some(_)) => {
                problems.push(format!("{s}.token and {s}.token_file are both set: keep one"));
                None
            }
            (Some(t), None) => Some(TokenSource::Inline(t.clone())),
            (None, Some(f)) => Some(TokenSource::File(f.to_path_buf())),
            (None, None) => None,
        };
        if token.is_some() && self.allow_unauthenticated {
            problems.push(format!(
                "{s}.allow_unauthenticated = true and a token are both set: a configured token is always required; remove one"
            ));
        }
        if let Some(addr) = listen.as_ref().filter(|a| a.beyond_loopback()) {
            if token.is_none() && !self.allow_unauthenticated {
                let who = if s == "ingest" { "post events" } else { "change routes and endpoints" };
                let env = s.to_ascii_uppercase();
                problems.push(format!(
                    "{s}.listen = \"{addr}\" is reachable beyond loopback, so {s} needs a bearer token: set {s}.token_file \
                     (a file holding the token) or {s}.token (e.g. TWINROUTE_{env}__TOKEN); or listen on 127.0.0.1 or \
                     unix:<path>; or set {s}.allow_unauthenticated = true to let anyone who reaches it {who}"
                ));
            }
        }
        let tls = match (self.tls_cert_file, self.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.to_path_buf(), key: key.to_path_buf() }),
            (None, None) => None,
            _ => {
                problems.push(format!("{s}.tls_cert_file and {s}.tls_key_file: set both (TLS) or neither"));
                None
            }
        };
        if self.socket_mode.is_some() && !matches!(listen, Some(ListenAddr::Unix(_)) | None) {
            problems
                .push(format!("{s}.socket_mode: applies to a Unix socket only (listen = \"unix:<path>\")"));
        }
        if self.header_read_timeout_seconds == 0
            || self.idle_timeout_seconds == 0
            || self.body_read_timeout_seconds == 0
        {
            problems.push(format!(
                "{s}: header_read_timeout_seconds, idle_timeout_seconds and body_read_timeout_seconds must be positive"
            ));
        }
        match listen {
            Some(listen) if problems.is_empty() => Ok(ListenerSettings {
                section: s,
                listen,
                token,
                tls,
                socket_mode: self.socket_mode.map_or(DEFAULT_SOCKET_MODE, |m| m.0),
                header_read_timeout: Duration::from_secs(self.header_read_timeout_seconds),
                idle_timeout: Duration::from_secs(self.idle_timeout_seconds),
                body_read_timeout: Duration::from_secs(self.body_read_timeout_seconds),
                metrics_unauthenticated: self.metrics_unauthenticated,
            }),
            _ => Err(problems),
        }
    }
}

impl IngestConfig {
    /// The listener keys of `[ingest]`.
    pub fn listener(&self) -> ListenerView<'_> {
        ListenerView {
            section: "ingest",
            listen: &self.listen,
            token: self.token.as_ref(),
            token_file: self.token_file.as_deref(),
            allow_unauthenticated: self.allow_unauthenticated,
            tls_cert_file: self.tls_cert_file.as_deref(),
            tls_key_file: self.tls_key_file.as_deref(),
            socket_mode: self.socket_mode,
            header_read_timeout_seconds: self.header_read_timeout_seconds,
            idle_timeout_seconds: self.idle_timeout_seconds,
            body_read_timeout_seconds: self.body_read_timeout_seconds,
            metrics_unauthenticated: false,
        }
    }
}

impl AdminConfig {
    /// The listener keys of `[admin]`.
    pub fn listener(&self) -> ListenerView<'_> {
        ListenerView {
            section: "admin",
            listen: &self.listen,
            token: self.token.as_ref(),
            token_file: self.token_file.as_deref(),
            allow_unauthenticated: self.allow_unauthenticated,
            tls_cert_file: self.tls_cert_file.as_deref(),
            tls_key_file: self.tls_key_file.as_deref(),
            socket_mode: self.socket_mode,
            header_read_timeout_seconds: self.header_read_timeout_seconds,
            idle_timeout_seconds: self.idle_timeout_seconds,
            body_read_timeout_seconds: self.body_read_timeout_seconds,
            metrics_unauthenticated: self.metrics_unauthenticated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;
    use std::collections::HashMap;

    const TOKEN: &str = "s3cr3t-t0ken-0123456789abcdef";

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<HashMap<_, _>>();
        Config::from_toml(text, "test.toml", Some(env)).map_err(|e| e.to_string())
    }

    #[test]
    fn listen_addresses_and_unix_sockets_parse() {
        assert_eq!(
            ListenAddr::parse("127.0.0.1:80").unwrap(),
            ListenAddr::Tcp("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(ListenAddr::parse("unix:/run/t.sock").unwrap(), ListenAddr::Unix("/run/t.sock".into()));
        for bad in ["unix:relative.sock", "unix:/run/", "localhost:80", "unix:"] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad}");
        }
        let long = format!("unix:/{}", "a".repeat(120));
        assert!(ListenAddr::parse(&long).unwrap_err().contains("longer than"));
        for (addr, beyond) in [
            ("127.0.0.1:1", false),
            ("[::1]:1", false),
            ("0.0.0.0:1", true),
            ("[::]:1", true),
            ("10.1.2.3:1", true),
        ] {
            assert_eq!(ListenAddr::parse(addr).unwrap().beyond_loopback(), beyond, "{addr}");
        }
        assert!(!ListenAddr::parse("unix:/x.sock").unwrap().beyond_loopback());
    }

    #[test]
    fn beyond_loopback_without_a_token_is_refused_naming_the_ways_out() {
        let err =
            load("[ingest]\nlisten = '0.0.0.0:8080'\n[admin]\nlisten = '[::]:8081'\n", &[]).unwrap_err();
        for needle in [
            "ingest.listen = \"0.0.0.0:8080\" is reachable beyond loopback",
            "set ingest.token_file",
            "TWINROUTE_INGEST__TOKEN",
            "ingest.allow_unauthenticated = true",
            "admin.listen = \"[::]:8081\" is reachable beyond loopback",
            "change routes and endpoints",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from {err}");
        }
        // A token from the environment, a token file, or an explicit opt-out: each is enough.
        let c = load(
            "[ingest]\nlisten = '0.0.0.0:8080'\n[admin]\nlisten = '0.0.0.0:8081'\ntoken_file = '/run/secrets/admin'\n",
            &[("TWINROUTE_INGEST__TOKEN", TOKEN)],
        )
        .unwrap();
        let ingest = c.ingest.listener().settings().unwrap();
        assert_eq!(ingest.token, Some(TokenSource::Inline(Secret::new(TOKEN))));
        assert_eq!(
            c.admin.listener().settings().unwrap().token,
            Some(TokenSource::File("/run/secrets/admin".into()))
        );
        let c = load("[ingest]\nlisten = '0.0.0.0:8080'\nallow_unauthenticated = true\n", &[]).unwrap();
        assert_eq!(c.ingest.listener().settings().unwrap().token, None);
        // Loopback and Unix sockets need none.
        load("[ingest]\nlisten = 'unix:/run/twinroute/ingest.sock'\n", &[]).unwrap();
    }

    #[test]
    fn token_settings_are_checked_without_echoing_the_token() {
        let err = load(
            "[ingest]\ntoken = 'short'\n[admin]\ntoken = 'abcdefghijklmnop qrstuv'\ntoken_file = '/x'\n",
            &[],
        )
        .unwrap_err();
        assert!(err.contains("ingest.token: is shorter than 16"), "{err}");
        assert!(err.contains("admin.token: must be printable ASCII"), "{err}");
        assert!(err.contains("admin.token and admin.token_file are both set"), "{err}");
        assert!(!err.contains("short'") && !err.contains("qrstuv"), "{err}");
        // Digits only, from the environment: a number, refused without being repeated.
        let err = load("", &[("TWINROUTE_ADMIN__TOKEN", "12345678901234567")]).unwrap_err();
        assert!(err.contains("admin.token: must be a string"), "{err}");
        assert!(!err.contains("12345678901234567"), "{err}");
        let err =
            load(&format!("[ingest]\ntoken = '{TOKEN}'\nallow_unauthenticated = true\n"), &[]).unwrap_err();
        assert!(err.contains("allow_unauthenticated = true and a token are both set"), "{err}");
        assert!(!err.contains(TOKEN), "{err}");
        // Debug output of the configuration never shows it.
        let c = load(&format!("[ingest]\ntoken = '{TOKEN}'\n"), &[]).unwrap();
        assert!(!format!("{c:?}").contains(TOKEN));
    }

    #[test]
    fn tls_socket_mode_and_timeouts() {
        let c = load(
            "[ingest]\nlisten = 'unix:/run/t/i.sock'\nsocket_mode = '0600'\nheader_read_timeout_seconds = 3\n\
             tls_cert_file = '/c.pem'\ntls_key_file = '/k.pem'\n",
            &[],
        )
        .unwrap();
        let s = c.ingest.listener().settings().unwrap();
        assert_eq!(s.socket_mode, 0o600);
        assert_eq!(s.header_read_timeout, Duration::from_secs(3));
        assert_eq!(s.idle_timeout, Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECONDS));
        assert_eq!(s.body_read_timeout, Duration::from_secs(DEFAULT_BODY_READ_TIMEOUT_SECONDS));
        assert_eq!(s.tls, Some(TlsFiles { cert: "/c.pem".into(), key: "/k.pem".into() }));
        let c =
            load("[ingest]\nlisten = 'unix:/run/t/i.sock'\n", &[("TWINROUTE_INGEST__SOCKET_MODE", "0666")])
                .unwrap();
        assert_eq!(c.ingest.listener().settings().unwrap().socket_mode, 0o666, "from the environment");
        assert_eq!(
            load("", &[]).unwrap().ingest.listener().settings().unwrap().socket_mode,
            DEFAULT_SOCKET_MODE
        );

        let err = load(
            "[ingest]\nsocket_mode = '0660'\ntls_cert_file = '/c.pem'\nbody_read_timeout_seconds = 0\n\
             [admin]\nlisten = 'unix:/a.sock'\nsocket_mode = 0o660\n",
            &[],
        )
        .unwrap_err();
        for needle in [
            "ingest.socket_mode: applies to a Unix socket only",
            "ingest.tls_cert_file and ingest.tls_key_file: set both",
            "ingest: header_read_timeout_seconds, idle_timeout_seconds and body_read_timeout_seconds must be positive",
            // 0o660 is 432: read as octal digits it would be 0432, which is refused.
            "admin.socket_mode: 0432 does not let the owner read and write",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from {err}");
        }
        assert!(load("[admin]\nlisten = 'unix:/a.sock'\nsocket_mode = '0999'\n", &[]).is_err());
        assert!(load("[admin]\nlisten = 'unix:/a.sock'\nsocket_mode = '1777'\n", &[]).is_err());
    }
}
