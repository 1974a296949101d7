//! The HTTP servers of ingest and the admin API: listening (TCP, TLS, Unix sockets), bearer
//! tokens, and the time limits on reading requests.
//!
//! twinroute serves connections itself, with hyper, rather than through `axum::serve`, for the
//! limits `axum::serve` does not set:
//!
//! - **headers**: a client has `header_read_timeout_seconds` to send a request's headers (and to
//!   finish a TLS handshake); then the connection is closed. This is what stops a slowloris
//!   client, which opens connections and sends headers a byte at a time, from holding them.
//! - **idle connections**: after a response, a kept-alive connection may wait
//!   `idle_timeout_seconds` for the next request (the header limit then runs from its first
//!   byte), longer than clients' pools keep idle connections, so a client does not send into a
//!   connection being closed.
//! - **bodies**: a request's body must arrive within `body_read_timeout_seconds` of its headers;
//!   a handler reading it then gets [`BodyReadTimeout`], which ingest and the admin API answer
//!   with 408.
//!
//! `src/server/limits.rs` says how.
//!
//! Bearer tokens are checked by [`auth::require_token`] before any handler runs (and before any
//! body is read). A Unix socket ([`bind_unix`]) is created with its mode already set, replaces a
//! stale socket file left by a previous run, refuses to start when another process is serving on
//! it, and is removed at stop.

pub mod auth;
mod limits;
pub mod tls;

pub use limits::{is_body_timeout, BodyReadTimeout};

use crate::app::StartError;
use crate::config::{ConfigError, ListenAddr, ListenerSettings};
use auth::{Guard, Peer};
use axum::body::Body;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use limits::{Activity, ConnectionTimer, DeadlineBody, Tracked};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;

/// A Unix socket file twinroute created: removed when dropped, if it is still the same file
/// (another process may have replaced it since).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                match std::fs::remove_file(&self.path) {
                    Ok(()) => tracing::debug!(path = %self.path.display(), "socket file removed"),
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket file")
                    }
                }
            }
        }
    }
}

/// Binds a Unix socket at `path` with permission bits `mode`, race-free: the socket is bound
/// under a temporary name beside it, given its mode, then renamed into place, so it is never
/// reachable with looser permissions. A socket file already at `path` is removed when nobody
/// answers on it (a previous run that did not stop cleanly); when a process does, or when the
/// path holds something other than a socket, binding fails.
pub fn bind_unix(path: &Path, mode: u32) -> std::io::Result<(tokio::net::UnixListener, SocketFile)> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::AddrInUse,
                    "another process is serving on this socket (twinroute removes only stale ones)",
                ))
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?;
                tracing::info!(path = %path.display(), "removed a stale socket file left by a previous run");
            }
            Err(e) => return Err(e),
        },
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "the path exists and is not a socket (twinroute replaces only stale sockets)",
            ))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if path.parent().is_some_and(|dir| !dir.is_dir()) {
        return Err(Error::new(
            ErrorKind::NotFound,
            "the socket's directory does not exist (twinroute does not create it: systemd's RuntimeDirectory=, a Kubernetes emptyDir)",
        ));
    }
    let name = path.file_name().ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no file name"))?;
    let temporary = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let staged = temporary.as_os_str().len() <= 107;
    let bind_at = if staged { temporary.as_path() } else { path };
    if staged {
        let _ = std::fs::remove_file(&temporary);
    }
    let listener = std::os::unix::net::UnixListener::bind(bind_at)?;
    let finish = || -> std::io::Result<()> {
        std::fs::set_permissions(bind_at, std::fs::Permissions::from_mode(mode))?;
        if staged {
            std::fs::rename(bind_at, path)?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(bind_at);
        return Err(e);
    }
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile { path: path.to_path_buf(), id: (meta.dev(), meta.ino()) };
    listener.set_nonblocking(true)?;
    Ok((tokio::net::UnixListener::from_std(listener)?, file))
}

enum Socket {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, SocketFile),
}

/// An API's listener, bound, with its token check and TLS ready: what [`Bound::serve`] needs.
pub struct Bound {
    settings: ListenerSettings,
    socket: Socket,
    guard: Arc<Guard>,
    tls: Option<(tokio_rustls::TlsAcceptor, Arc<tls::CertStore>)>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound").field("listen", &self.settings.listen).field("guard", &self.guard).finish()
    }
}

/// The paths an API answers without a token.
fn open_paths(settings: &ListenerSettings) -> Vec<&'static str> {
    match settings.section {
        // Liveness only: events need the token.
        "ingest" => vec!["/healthz"],
        // The orchestrator's probes; /readyz without the token says only ready or not.
        _ if settings.metrics_unauthenticated => vec!["/healthz", "/readyz", "/metrics"],
        _ => vec!["/healthz", "/readyz"],
    }
}

impl Bound {
    /// Reads the token file and TLS files and binds the listener. A file that cannot be used is
    /// a configuration error (exit 78); an address in use, a bind error (exit 69).
    pub async fn bind(settings: ListenerSettings, origin: &str) -> Result<Bound, StartError> {
        let section = settings.section;
        let mut problems = Vec::new();
        let guard = Guard::new(section, settings.token.as_ref(), open_paths(&settings))
            .map_err(|p| problems.push(p))
            .ok();
        let tls = match &settings.tls {
            Some(files) => tls::CertStore::acceptor(section, files).map_err(|p| problems.push(p)).ok(),
            None => None,
        };
        let Some(guard) = guard.filter(|_| problems.is_empty()) else {
            return Err(StartError::Config(ConfigError { origin: origin.to_owned(), problems }));
        };
        let (what, key) =
            if section == "ingest" { ("ingest", "ingest.listen") } else { ("admin API", "admin.listen") };
        let bind_error = |source| StartError::Bind { what, key, addr: settings.listen.to_string(), source };
        let socket = match &settings.listen {
            ListenAddr::Tcp(addr) => {
                Socket::Tcp(tokio::net::TcpListener::bind(addr).await.map_err(bind_error)?)
            }
            ListenAddr::Unix(path) => {
                let (listener, file) = bind_unix(path, settings.socket_mode).map_err(bind_error)?;
                Socket::Unix(listener, file)
            }
        };
        let bound = Bound { settings, socket, guard: Arc::new(guard), tls };
        bound.log_exposure();
        Ok(bound)
    }

    /// Says at start what protects the listener, when it matters.
    fn log_exposure(&self) {
        let api = self.settings.section;
        let listen = self.settings.listen.to_string();
        let beyond = self.settings.listen.beyond_loopback();
        if !self.guard.enabled() && beyond {
            tracing::warn!(api, %listen, "{api} is reachable beyond loopback WITHOUT a bearer token ({api}.allow_unauthenticated = true): anyone who reaches it can use it");
        } else if self.guard.enabled() && beyond && self.tls.is_none() {
            tracing::info!(api, %listen, "{api} requires a bearer token; without TLS ({api}.tls_cert_file) the token crosses the network in clear text: keep that network private");
        }
    }

    /// The TCP address bound (the port chosen, for `:0`).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().ok(),
            Socket::Unix(..) => None,
        }
    }

    /// The Unix socket's path.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.socket {
            Socket::Unix(_, f) => Some(&f.path),
            Socket::Tcp(_) => None,
        }
    }

    /// Serves `router` until `stop` turns true, then stops accepting, lets requests in progress
    /// finish (connections close gracefully), and removes a Unix socket file.
    pub fn serve(self, router: Router, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let Bound { settings, socket, guard, tls } = self;
        let router = router.layer(axum::middleware::from_fn_with_state(guard.clone(), auth::require_token));
        let mut watchers = vec![tokio::spawn(guard.clone().watch())];
        if let Some((_, store)) = &tls {
            watchers.push(tokio::spawn(store.clone().watch()));
        }
        let context = Arc::new(Connections {
            api: settings.section,
            router,
            tls: tls.map(|(acceptor, _)| acceptor),
            header_read_timeout: settings.header_read_timeout,
            idle_timeout: settings.idle_timeout,
            body_read_timeout: settings.body_read_timeout,
        });
        tokio::spawn(async move {
            context.accept_until_stopped(socket, stop).await;
            for w in watchers {
                w.abort();
            }
        })
    }
}

/// What every connection of one API shares.
struct Connections {
    api: &'static str,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    body_read_timeout: Duration,
}

/// Errors of `accept` that concern one connection only (the listener is fine).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

impl Connections {
    async fn accept_until_stopped(self: Arc<Self>, socket: Socket, mut stop: watch::Receiver<bool>) {
        // Each connection task holds a receiver; the sender's `closed()` says all are done.
        let (done_tx, done_rx) = watch::channel(());
        loop {
            let accepted = tokio::select! {
                a = accept(&socket) => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            match accepted {
                Ok((Stream::Tcp(s), peer)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(self.clone().connection(s, peer, stop.clone(), done_rx.clone()));
                }
                Ok((Stream::Unix(s), peer)) => {
                    tokio::spawn(self.clone().connection(s, peer, stop.clone(), done_rx.clone()));
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // Out of file descriptors, typically: wait rather than spin.
                    tracing::error!(api = self.api, error = %e, "cannot accept connections");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Stop listening (and remove a socket file) before waiting for the connections.
        drop(socket);
        drop(done_rx);
        done_tx.closed().await;
    }

    async fn connection<S>(
        self: Arc<Self>,
        stream: S,
        peer: Peer,
        stop: watch::Receiver<bool>,
        _done: watch::Receiver<()>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match &self.tls {
            None => self.serve_http(stream, peer, stop).await,
            Some(acceptor) => {
                match tokio::time::timeout(self.header_read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.serve_http(tls, peer, stop).await,
                    Ok(Err(e)) => {
                        metrics::counter!("twinroute_tls_handshake_failures_total", "api" => self.api)
                            .increment(1);
                        tracing::debug!(api = self.api, peer = %peer.0, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!("twinroute_http_timeouts_total", "api" => self.api, "phase" => "tls_handshake").increment(1);
                        tracing::debug!(api = self.api, peer = %peer.0, "TLS handshake not finished in time: connection closed");
                    }
                }
            }
        }
    }

    async fn serve_http<S>(&self, stream: S, peer: Peer, mut stop: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (router, api, limit) = (self.router.clone(), self.api, self.body_read_timeout);
        let peer_for_log = peer.0.clone();
        let activity = Activity::new();
        let timer = ConnectionTimer {
            activity: activity.clone(),
            header: self.header_read_timeout,
            idle: self.idle_timeout,
        };
        let stream = Tracked { inner: stream, activity: activity.clone() };
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            activity.served();
            let (mut parts, inner) = request.into_parts();
            parts.extensions.insert(peer.clone());
            let body = Body::new(DeadlineBody::new(inner, limit, api));
            router.clone().oneshot(Request::from_parts(parts, body))
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(timer).header_read_timeout(self.header_read_timeout).keep_alive(true);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let mut stopping = false;
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break result,
                _ = stop.wait_for(|s| *s), if !stopping => {
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(e) = result {
            if e.is_timeout() {
                metrics::counter!("twinroute_http_timeouts_total", "api" => api, "phase" => "header")
                    .increment(1);
                tracing::debug!(api, peer = %peer_for_log, "request headers not received in time: connection closed");
            } else {
                tracing::debug!(api, peer = %peer_for_log, error = %e, "connection ended with an error");
            }
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(socket: &Socket) -> std::io::Result<(Stream, Peer)> {
    match socket {
        Socket::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            Ok((Stream::Tcp(s), Peer(addr.to_string().into())))
        }
        Socket::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), Peer("unix".into())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn unix_sockets_get_their_mode_replace_stale_files_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (listener, file) = bind_unix(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // In use: refused, and the live socket is left alone.
        let err = bind_unix(&path, 0o660).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert!(path.exists());
        // Closed without removing the file (a crash): the next start replaces it.
        std::mem::forget(file);
        drop(listener);
        let (_listener, file) = bind_unix(&path, 0o660).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(file);
        assert!(!path.exists(), "removed at stop");

        let err = bind_unix(&dir.path().join("missing/api.sock"), 0o660).unwrap_err();
        assert!(err.to_string().contains("directory does not exist"), "{err}");

        // Something that is not a socket is never removed.
        std::fs::write(&path, "data").unwrap();
        let err = bind_unix(&path, 0o660).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
