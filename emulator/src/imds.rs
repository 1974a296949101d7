//! A local stand-in for the Azure Instance Metadata Service managed-identity token endpoint.
//!
//! It answers `GET /metadata/identity/oauth2/token` the way IMDS on a VM does (same query
//! parameters, same `Metadata: true` requirement, numbers as strings in the body, the same error
//! shape), issuing HS256 JWTs (see [`crate::jwt`]) for a configurable set of identities. Tests
//! steer it through the [`ImdsStandIn`] handle; an out-of-process stand-in (the
//! `twinroute-standins imds` binary) is steered through an admin surface on the same port:
//!
//! | request | effect |
//! |---|---|
//! | `POST /_standin/faults` | queue faults: a JSON list such as `[{"kind":"status","status":500}, {"kind":"status","status":429,"retry_after_seconds":3}, {"kind":"delay","ms":2000}, {"kind":"close_connection"}]` |
//! | `POST /_standin/reset` | drop queued faults and counters; restore lifetime, availability, no delay, no 410 window |
//! | `GET /_standin/stats` | request counts (total and per resource), queued faults, current settings |
//! | `POST /_standin/config` | any of `{"lifetime_seconds": N, "available": bool, "gone_for_ms": N, "delay_ms": N}` |
//!
//! Every admin request answers with the stats JSON. The admin surface is never subject to
//! faults, outages or delays, so a stand-in that was switched off can be switched on again.
//!
//! Time: token claims use the wall clock (`SystemTime`), because consumers such as Azurite check
//! them against theirs. Delays and the 410 window use `tokio::time`, so a test running on a paused
//! clock (`tokio::time::pause()`, current-thread runtime) drives them without real waiting.
//!
//! The stand-in binds loopback addresses only: [`ImdsStandIn::start_on`] refuses anything else.
//! It does not cache tokens (real IMDS does, handing out the same token until close to its
//! expiry): every successful request gets a freshly issued token, so lifetime changes take effect
//! at once.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::jwt::{self, Claims};

/// The token endpoint's path, as on a VM (`http://169.254.169.254` + this).
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// API versions the token endpoint accepts. `2018-02-01` is the documented one; the
/// `azure_identity` crate's VM credential sends `2019-08-01`, which IMDS also serves.
pub const SUPPORTED_API_VERSIONS: &[&str] = &["2018-02-01", "2019-08-01"];

/// Query parameters that select a user-assigned identity; at most one may be given
/// (`mi_res_id` is the older spelling of `msi_res_id`).
pub const IDENTITY_SELECTORS: &[&str] = &["client_id", "object_id", "msi_res_id", "mi_res_id"];

/// Tenant of the default configuration (an obviously fake GUID).
pub const DEFAULT_TENANT_ID: &str = "00000000-0000-4000-8000-00000000a000";
/// Client id of the default system-assigned identity.
pub const DEFAULT_SYSTEM_CLIENT_ID: &str = "00000000-0000-4000-8000-00000000c001";
/// Object (principal) id of the default system-assigned identity.
pub const DEFAULT_SYSTEM_OBJECT_ID: &str = "00000000-0000-4000-8000-00000000b001";
/// Client id of the default user-assigned identity.
pub const DEFAULT_USER_CLIENT_ID: &str = "00000000-0000-4000-8000-00000000c002";
/// Object (principal) id of the default user-assigned identity.
pub const DEFAULT_USER_OBJECT_ID: &str = "00000000-0000-4000-8000-00000000b002";
/// ARM resource id of the default user-assigned identity.
pub const DEFAULT_USER_MSI_RES_ID: &str = "/subscriptions/00000000-0000-4000-8000-000000005000/resourceGroups/twinroute-dev/providers/Microsoft.ManagedIdentity/userAssignedIdentities/twinroute-dev";
/// Managed-identity tokens usually live 24 h; so do the stand-in's unless configured otherwise.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// How far in the past `nbf` is put, so a consumer whose clock is slightly behind accepts it.
pub const NOT_BEFORE_SKEW_SECS: i64 = 60;

/// The identities "attached to the VM", the tenant, the token lifetime and the signing key.
#[derive(Clone)]
pub struct ImdsConfig {
    /// Tenant put in `tid` and in the issuer `https://sts.windows.net/<tenant>/`.
    pub tenant_id: String,
    /// The system-assigned identity, if the host has one.
    pub system_assigned: Option<IdentityDef>,
    /// User-assigned identities attached to the host.
    pub user_assigned: Vec<IdentityDef>,
    /// Lifetime of issued tokens (whole seconds are used).
    pub token_lifetime: Duration,
    /// HMAC-SHA256 key tokens are signed with; consumers verify with the same key.
    pub signing_key: Vec<u8>,
}

impl Default for ImdsConfig {
    /// A system-assigned identity plus one user-assigned identity, 24 h tokens, signed with
    /// [`crate::DEV_SIGNING_KEY`].
    fn default() -> Self {
        ImdsConfig {
            tenant_id: DEFAULT_TENANT_ID.to_owned(),
            system_assigned: Some(IdentityDef {
                client_id: DEFAULT_SYSTEM_CLIENT_ID.to_owned(),
                object_id: DEFAULT_SYSTEM_OBJECT_ID.to_owned(),
                msi_res_id: None,
            }),
            user_assigned: vec![IdentityDef {
                client_id: DEFAULT_USER_CLIENT_ID.to_owned(),
                object_id: DEFAULT_USER_OBJECT_ID.to_owned(),
                msi_res_id: Some(DEFAULT_USER_MSI_RES_ID.to_owned()),
            }],
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            signing_key: crate::DEV_SIGNING_KEY.to_vec(),
        }
    }
}

impl fmt::Debug for ImdsConfig {
    // The signing key stays out of logs even though the default one is public.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImdsConfig")
            .field("tenant_id", &self.tenant_id)
            .field("system_assigned", &self.system_assigned)
            .field("user_assigned", &self.user_assigned)
            .field("token_lifetime", &self.token_lifetime)
            .field("signing_key", &"<redacted>")
            .finish()
    }
}

/// One managed identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityDef {
    /// Client (application) id: `client_id` selects it; it becomes `appid` and the response's
    /// `client_id`.
    pub client_id: String,
    /// Object (principal) id: `object_id` selects it; it becomes `oid` and `sub`.
    pub object_id: String,
    /// ARM resource id of a user-assigned identity: `msi_res_id`/`mi_res_id` select it; it
    /// becomes `xms_mirid`.
    pub msi_res_id: Option<String>,
}

/// A scripted misbehaviour, consumed by one token request (in the order pushed) before normal
/// answers resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an IMDS-style error body. Codes outside 100..=999 are
    /// answered as 500.
    Status(u16),
    /// Like [`Fault::Status`], with a `Retry-After` header of this many seconds.
    StatusWithRetryAfter(u16, u64),
    /// Wait this long (on the tokio clock), then answer normally.
    Delay(Duration),
    /// Close the TCP connection without answering (the client sees the connection reset or
    /// closed before a response).
    CloseConnection,
}

/// The JSON form of a [`Fault`] on the admin surface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultSpec {
    /// `{"kind":"status","status":429,"retry_after_seconds":3}` (`retry_after_seconds` optional).
    Status {
        /// HTTP status to answer with.
        status: u16,
        /// Value of a `Retry-After` header, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_seconds: Option<u64>,
    },
    /// `{"kind":"delay","ms":2000}`.
    Delay {
        /// Milliseconds to wait before answering normally.
        ms: u64,
    },
    /// `{"kind":"close_connection"}`.
    CloseConnection,
}

impl From<FaultSpec> for Fault {
    fn from(spec: FaultSpec) -> Self {
        match spec {
            FaultSpec::Status { status, retry_after_seconds: None } => Fault::Status(status),
            FaultSpec::Status { status, retry_after_seconds: Some(s) } => {
                Fault::StatusWithRetryAfter(status, s)
            }
            FaultSpec::Delay { ms } => Fault::Delay(Duration::from_millis(ms)),
            FaultSpec::CloseConnection => Fault::CloseConnection,
        }
    }
}

impl From<&Fault> for FaultSpec {
    fn from(fault: &Fault) -> Self {
        match *fault {
            Fault::Status(status) => FaultSpec::Status { status, retry_after_seconds: None },
            Fault::StatusWithRetryAfter(status, s) => {
                FaultSpec::Status { status, retry_after_seconds: Some(s) }
            }
            Fault::Delay(d) => FaultSpec::Delay { ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX) },
            Fault::CloseConnection => FaultSpec::CloseConnection,
        }
    }
}

/// What `GET /_standin/stats` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImdsStats {
    /// Token requests received, faulted and rejected ones included.
    pub requests: u64,
    /// The same, per `resource` query value (requests without one are only in `requests`).
    pub requests_by_resource: BTreeMap<String, u64>,
    /// Faults still queued, next first.
    pub pending_faults: Vec<FaultSpec>,
    /// `false` while an outage (503 to everything) is switched on.
    pub available: bool,
    /// Milliseconds left in the 410 window (0 when none).
    pub gone_remaining_ms: u64,
    /// Delay before every answer, in milliseconds.
    pub delay_ms: u64,
    /// Lifetime of tokens issued now, in seconds.
    pub token_lifetime_seconds: u64,
}

/// Body of `POST /_standin/config`; absent fields are left as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigUpdate {
    lifetime_seconds: Option<u64>,
    available: Option<bool>,
    gone_for_ms: Option<u64>,
    delay_ms: Option<u64>,
}

/// A running stand-in. Cheap to clone; the server stops when [`ImdsStandIn::shutdown`] is called
/// or the last clone is dropped.
#[derive(Clone)]
pub struct ImdsStandIn {
    /// Configuration and mutable state shared with the request handlers.
    shared: Arc<Shared>,
    /// Owns the accept loop; dropping the last clone aborts it.
    server: Arc<ServerTask>,
    /// Where it listens.
    addr: SocketAddr,
}

impl fmt::Debug for ImdsStandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImdsStandIn").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl ImdsStandIn {
    /// Starts on an ephemeral loopback port (`127.0.0.1:0`).
    pub async fn start(config: ImdsConfig) -> std::io::Result<ImdsStandIn> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// Starts on `addr`, which must be a loopback address: the stand-in is for local tests and
    /// demos, never for a network.
    pub async fn start_on(addr: SocketAddr, config: ImdsConfig) -> std::io::Result<ImdsStandIn> {
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the IMDS stand-in binds loopback addresses only, not {addr}"),
            ));
        }
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let task = tokio::spawn(accept_loop(listener, router(shared.clone())));
        Ok(ImdsStandIn { shared, server: Arc::new(ServerTask(Mutex::new(Some(task)))), addr })
    }

    /// The stand-in's HTTP surface as a `Router` sharing this stand-in's state, to be called
    /// in-process (e.g. with `tower::ServiceExt::oneshot`): no sockets, so a test on a paused
    /// clock controls every wait. [`Fault::CloseConnection`] has no connection to close there and
    /// is answered as a 500.
    pub fn router(&self) -> Router {
        router(self.shared.clone())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to configure as the IMDS token endpoint, e.g.
    /// `http://127.0.0.1:40342/metadata/identity/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr)
    }

    /// Token requests received so far, including faulted and rejected ones.
    pub fn requests(&self) -> u64 {
        self.shared.state().requests
    }

    /// Token requests received whose `resource` was exactly `resource`.
    pub fn requests_for(&self, resource: &str) -> u64 {
        self.shared.state().by_resource.get(resource).copied().unwrap_or(0)
    }

    /// The decoded query pairs of the last token request, in order (to assert which identity
    /// selector a client sent).
    pub fn last_query(&self) -> Option<Vec<(String, String)>> {
        self.shared.state().last_query.clone()
    }

    /// Queues faults; each token request consumes the next one, in order. Faults wait while an
    /// outage or a 410 window is on: those answer first.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().faults.extend(faults);
    }

    /// Answers 410 (IMDS "updating") to every token request for `d` from now, measured on the
    /// tokio clock. `Duration::ZERO` ends a window.
    pub fn set_gone_for(&self, d: Duration) {
        self.shared.state().gone_until = Some(Instant::now() + d);
    }

    /// Delays every answer by `d` (on the tokio clock), e.g. to exercise client timeouts.
    /// `Duration::ZERO` switches it off.
    pub fn set_delay(&self, d: Duration) {
        self.shared.state().delay = d;
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.shared.state().lifetime = d;
    }

    /// `false` starts an outage: 503 to every request except the admin surface; `true` ends it.
    pub fn set_available(&self, up: bool) {
        self.shared.state().available = up;
    }

    /// Forgets counters, the last query and queued faults, and restores the configured lifetime,
    /// availability, no delay and no 410 window.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Counters and current settings (what `GET /_standin/stats` returns).
    pub fn stats(&self) -> ImdsStats {
        self.shared.stats()
    }

    /// The configuration it was started with (lifetime as configured, not as changed since).
    pub fn config(&self) -> &ImdsConfig {
        &self.shared.config
    }

    /// Stops the server now, even if other clones of the handle exist, and waits until the
    /// listener and every connection are closed.
    pub async fn shutdown(self) {
        let task = self.server.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task {
            task.abort();
            // The only possible error is the cancellation just requested.
            let _ = task.await;
        }
    }
}

/// The accept loop's task, aborted when the last handle goes away.
struct ServerTask(Mutex<Option<JoinHandle<()>>>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        if let Some(task) = self.0.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

/// What the handlers share with the handle.
struct Shared {
    config: ImdsConfig,
    state: Mutex<MutableState>,
}

/// Everything tests change or observe at run time.
struct MutableState {
    requests: u64,
    by_resource: BTreeMap<String, u64>,
    last_query: Option<Vec<(String, String)>>,
    faults: VecDeque<Fault>,
    /// End of the 410 window, on the tokio clock.
    gone_until: Option<Instant>,
    delay: Duration,
    lifetime: Duration,
    available: bool,
}

impl MutableState {
    fn new(config: &ImdsConfig) -> Self {
        MutableState {
            requests: 0,
            by_resource: BTreeMap::new(),
            last_query: None,
            faults: VecDeque::new(),
            gone_until: None,
            delay: Duration::ZERO,
            lifetime: config.token_lifetime,
            available: true,
        }
    }

    fn gone_remaining(&self) -> Duration {
        self.gone_until.map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()))
    }
}

impl Shared {
    fn new(config: ImdsConfig) -> Self {
        let state = Mutex::new(MutableState::new(&config));
        Shared { config, state }
    }

    /// A handler panicking while holding the lock must not take the stand-in down with it.
    fn state(&self) -> MutexGuard<'_, MutableState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reset(&self) {
        *self.state() = MutableState::new(&self.config);
    }

    fn stats(&self) -> ImdsStats {
        let state = self.state();
        ImdsStats {
            requests: state.requests,
            requests_by_resource: state.by_resource.clone(),
            pending_faults: state.faults.iter().map(FaultSpec::from).collect(),
            available: state.available,
            gone_remaining_ms: millis(state.gone_remaining()),
            delay_ms: millis(state.delay),
            token_lifetime_seconds: state.lifetime.as_secs(),
        }
    }

    fn apply(&self, update: ConfigUpdate) {
        let mut state = self.state();
        if let Some(s) = update.lifetime_seconds {
            state.lifetime = Duration::from_secs(s);
        }
        if let Some(up) = update.available {
            state.available = up;
        }
        if let Some(ms) = update.gone_for_ms {
            state.gone_until = Some(Instant::now() + Duration::from_millis(ms));
        }
        if let Some(ms) = update.delay_ms {
            state.delay = Duration::from_millis(ms);
        }
    }

    /// Finds the identity a request selects (`selector` is `(parameter, value)`; none means the
    /// default identity). GUIDs and ARM ids compare case-insensitively, as in Azure.
    fn identity(&self, selector: Option<(&str, &str)>) -> Option<&IdentityDef> {
        let users = &self.config.user_assigned;
        match selector {
            // IMDS's default: the system-assigned identity, or else the only user-assigned one.
            None => self.config.system_assigned.as_ref().or(match users.as_slice() {
                [only] => Some(only),
                _ => None,
            }),
            Some((name, value)) => users.iter().find(|id| match name {
                "client_id" => id.client_id.eq_ignore_ascii_case(value),
                "object_id" => id.object_id.eq_ignore_ascii_case(value),
                _ => id.msi_res_id.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(value)),
            }),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Lets a handler close its own connection without answering ([`Fault::CloseConnection`]).
#[derive(Clone)]
struct ConnectionAbort(Arc<Notify>);

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(TOKEN_PATH, any(token))
        .route("/_standin/faults", post(admin_faults))
        .route("/_standin/reset", post(admin_reset))
        .route("/_standin/stats", get(admin_stats))
        .route("/_standin/config", post(admin_config))
        .fallback(not_found)
        .with_state(shared)
}

/// Serves connections until aborted; dropping the `JoinSet` aborts every connection with it.
async fn accept_loop(listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, router.clone()));
                }
                // Out of file descriptors and the like: let the pressure drop rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, router: Router) {
    // Small request/response exchanges: don't let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let abort = Arc::new(Notify::new());
    let tag = ConnectionAbort(abort.clone());
    let inner = TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(tag.clone());
        hyper::service::Service::call(&inner, request)
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        // Errors here are clients going away mid-request; nothing to do about them.
        _ = connection => {}
        // Dropping the connection closes the socket with the request unanswered.
        () = abort.notified() => {}
    }
}

/// What a token request gets before the request itself is looked at.
enum Preempt {
    Outage,
    Gone,
    Fault(Fault),
}

async fn token(
    State(shared): State<Arc<Shared>>,
    abort: Option<Extension<ConnectionAbort>>,
    request: Request,
) -> Response {
    let query: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let delay = {
        let mut state = shared.state();
        state.requests += 1;
        if let Some((_, resource)) = query.iter().find(|(k, _)| k == "resource") {
            *state.by_resource.entry(resource.clone()).or_default() += 1;
        }
        state.last_query = Some(query.clone());
        state.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let preempt = {
        let mut state = shared.state();
        if !state.available {
            Some(Preempt::Outage)
        } else if !state.gone_remaining().is_zero() {
            Some(Preempt::Gone)
        } else {
            state.faults.pop_front().map(Preempt::Fault)
        }
    };
    match preempt {
        None => {}
        Some(Preempt::Outage) => return outage(),
        Some(Preempt::Gone) => {
            return error(StatusCode::GONE, "gone", "IMDS is updating; it will be back within 70 seconds")
        }
        Some(Preempt::Fault(Fault::Delay(d))) => tokio::time::sleep(d).await,
        Some(Preempt::Fault(Fault::Status(status))) => return fault_response(status, None),
        Some(Preempt::Fault(Fault::StatusWithRetryAfter(status, secs))) => {
            return fault_response(status, Some(secs))
        }
        Some(Preempt::Fault(Fault::CloseConnection)) => {
            let Some(Extension(ConnectionAbort(abort))) = abort else {
                // Called in-process: there is no connection to close.
                return fault_response(500, None);
            };
            abort.notify_one();
            // The connection is being dropped; this answer is never sent.
            return std::future::pending().await;
        }
    }

    match issue(&shared, request.method(), request.headers(), &query) {
        Ok(response) => response,
        Err(rejection) => rejection.into_response(),
    }
}

/// Why a token request is refused: a 400 `invalid_request`, or a 405 for a method other than GET.
struct Rejection {
    status: StatusCode,
    description: String,
}

impl Rejection {
    fn bad(description: impl Into<String>) -> Self {
        Rejection { status: StatusCode::BAD_REQUEST, description: description.into() }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let mut response = error(self.status, "invalid_request", &self.description);
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        response
    }
}

/// Validates a token request the way IMDS does and issues the token.
fn issue(
    shared: &Shared,
    method: &Method,
    headers: &HeaderMap,
    query: &[(String, String)],
) -> Result<Response, Rejection> {
    if method != Method::GET {
        let description = "The token endpoint only answers GET".to_owned();
        return Err(Rejection { status: StatusCode::METHOD_NOT_ALLOWED, description });
    }
    if headers.contains_key("x-forwarded-for") {
        return Err(Rejection::bad(
            "Request contains an X-Forwarded-For header: IMDS must not be called through a proxy",
        ));
    }
    let metadata = headers.get("metadata").and_then(|v| v.to_str().ok());
    if !metadata.is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Err(Rejection::bad("Required metadata header not specified"));
    }
    let single = |name: &str| -> Result<Option<&str>, Rejection> {
        let mut values = query.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str());
        match (values.next(), values.next()) {
            (first, None) => Ok(first),
            _ => Err(Rejection::bad(format!("Query parameter '{name}' is given more than once"))),
        }
    };
    match single("api-version")? {
        None | Some("") => return Err(Rejection::bad("Required query variable 'api-version' is missing")),
        Some(v) if !SUPPORTED_API_VERSIONS.contains(&v) => {
            return Err(Rejection::bad(format!(
                "Unsupported api-version '{v}'; supported versions: {}",
                SUPPORTED_API_VERSIONS.join(", ")
            )))
        }
        Some(_) => {}
    }
    let resource = match single("resource")? {
        None | Some("") => return Err(Rejection::bad("Required query variable 'resource' is missing")),
        Some(r) => r,
    };
    let mut selectors = query.iter().filter(|(k, _)| IDENTITY_SELECTORS.contains(&k.as_str()));
    let selector = selectors.next().map(|(k, v)| (k.as_str(), v.as_str()));
    if selectors.next().is_some() {
        return Err(Rejection::bad(
            "Only one of client_id, object_id, msi_res_id and mi_res_id may be specified",
        ));
    }
    let identity = shared.identity(selector).ok_or_else(|| Rejection::bad("Identity not found"))?;

    let lifetime = shared.state().lifetime;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let lifetime_secs = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2);
    let claims = Claims {
        aud: resource.to_owned(),
        iss: format!("https://sts.windows.net/{}/", shared.config.tenant_id),
        iat: now,
        nbf: now - NOT_BEFORE_SKEW_SECS,
        exp: now.saturating_add(lifetime_secs),
        appid: identity.client_id.clone(),
        oid: identity.object_id.clone(),
        sub: identity.object_id.clone(),
        tid: shared.config.tenant_id.clone(),
        xms_mirid: identity.msi_res_id.clone(),
    };
    let body = TokenResponse {
        access_token: jwt::issue(&claims, &shared.config.signing_key),
        refresh_token: "",
        expires_in: (claims.exp - now).to_string(),
        expires_on: claims.exp.to_string(),
        not_before: claims.nbf.to_string(),
        resource,
        token_type: "Bearer",
        client_id: &identity.client_id,
    };
    Ok(Json(body).into_response())
}

/// The 200 body, fields in IMDS's order; every number is a string, as IMDS sends them.
#[derive(Serialize)]
struct TokenResponse<'a> {
    access_token: String,
    refresh_token: &'static str,
    expires_in: String,
    expires_on: String,
    not_before: String,
    resource: &'a str,
    token_type: &'static str,
    client_id: &'a str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    (status, Json(ErrorBody { error: code, error_description: description })).into_response()
}

fn outage() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "IMDS is unavailable (stand-in outage)")
}

/// The answer to an injected status fault: an IMDS-style body whose `error` is derived from the
/// status (`invalid_request` for 400, else the reason phrase in snake case).
fn fault_response(status: u16, retry_after_secs: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_request".to_owned(),
        other => other
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
            .replace(['-', ' '], "_")
            .replace('\'', ""),
    };
    let description = format!("Injected fault: HTTP {status}");
    let mut response = error(status, &code, &description);
    if let Some(secs) = retry_after_secs {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

async fn not_found(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    if !shared.state().available {
        return outage();
    }
    let description = format!("No such endpoint: {}", request.uri().path());
    error(StatusCode::NOT_FOUND, "not_found", &description)
}

fn admin_rejection(rejection: JsonRejection) -> Response {
    error(rejection.status(), "invalid_request", &rejection.body_text())
}

async fn admin_faults(
    State(shared): State<Arc<Shared>>,
    faults: Result<Json<Vec<FaultSpec>>, JsonRejection>,
) -> Response {
    match faults {
        Ok(Json(faults)) => {
            shared.state().faults.extend(faults.into_iter().map(Fault::from));
            Json(shared.stats()).into_response()
        }
        Err(rejection) => admin_rejection(rejection),
    }
}

async fn admin_reset(State(shared): State<Arc<Shared>>) -> Json<ImdsStats> {
    shared.reset();
    Json(shared.stats())
}

async fn admin_stats(State(shared): State<Arc<Shared>>) -> Json<ImdsStats> {
    Json(shared.stats())
}

async fn admin_config(
    State(shared): State<Arc<Shared>>,
    update: Result<Json<ConfigUpdate>, JsonRejection>,
) -> Response {
    match update {
        Ok(Json(update)) => {
            shared.apply(update);
            Json(shared.stats()).into_response()
        }
        Err(rejection) => admin_rejection(rejection),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(config: ImdsConfig) -> Shared {
        Shared::new(config)
    }

    #[test]
    fn fault_spec_json_round_trip() {
        let json = r#"[{"kind":"status","status":500},{"kind":"status","status":429,"retry_after_seconds":3},
                       {"kind":"delay","ms":1500},{"kind":"close_connection"}]"#;
        let specs: Vec<FaultSpec> = serde_json::from_str(json).unwrap();
        let faults: Vec<Fault> = specs.iter().cloned().map(Fault::from).collect();
        assert_eq!(
            faults,
            [
                Fault::Status(500),
                Fault::StatusWithRetryAfter(429, 3),
                Fault::Delay(Duration::from_millis(1500)),
                Fault::CloseConnection
            ]
        );
        let back: Vec<FaultSpec> = faults.iter().map(FaultSpec::from).collect();
        assert_eq!(back, specs);
    }

    #[test]
    fn fault_spec_rejects_unknown_fields_and_kinds() {
        assert!(serde_json::from_str::<FaultSpec>(r#"{"kind":"status","status":500,"x":1}"#).is_err());
        assert!(serde_json::from_str::<FaultSpec>(r#"{"kind":"explode"}"#).is_err());
        assert!(serde_json::from_str::<ConfigUpdate>(r#"{"lifetime":5}"#).is_err());
    }

    #[test]
    fn fault_error_codes() {
        let code = |status| {
            let response = fault_response(status, None);
            (response.status().as_u16(), response)
        };
        assert_eq!(code(429).0, 429);
        assert_eq!(code(5).0, 500, "invalid codes become 500");
        let response = fault_response(429, Some(3));
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn identity_selection() {
        let s = shared(ImdsConfig::default());
        assert_eq!(s.identity(None).unwrap().client_id, DEFAULT_SYSTEM_CLIENT_ID);
        let user = Some(DEFAULT_USER_CLIENT_ID);
        assert_eq!(
            s.identity(Some(("client_id", DEFAULT_USER_CLIENT_ID))).map(|i| i.client_id.as_str()),
            user
        );
        let upper = DEFAULT_USER_OBJECT_ID.to_ascii_uppercase();
        assert_eq!(s.identity(Some(("object_id", &upper))).map(|i| i.client_id.as_str()), user);
        let lower = DEFAULT_USER_MSI_RES_ID.to_ascii_lowercase();
        assert_eq!(s.identity(Some(("mi_res_id", &lower))).map(|i| i.client_id.as_str()), user);
        // The system-assigned identity is not selectable by id, as on a VM.
        assert!(s.identity(Some(("client_id", DEFAULT_SYSTEM_CLIENT_ID))).is_none());

        // No system-assigned identity: the only user-assigned one is the default...
        let s = shared(ImdsConfig { system_assigned: None, ..ImdsConfig::default() });
        assert_eq!(s.identity(None).map(|i| i.client_id.as_str()), user);
        // ...but with none, or several, there is no default.
        let s = shared(ImdsConfig { system_assigned: None, user_assigned: vec![], ..ImdsConfig::default() });
        assert!(s.identity(None).is_none());
        let mut two = ImdsConfig { system_assigned: None, ..ImdsConfig::default() };
        two.user_assigned.push(IdentityDef {
            client_id: "c".into(),
            object_id: "o".into(),
            msi_res_id: None,
        });
        assert!(shared(two).identity(None).is_none());
    }

    #[test]
    fn config_debug_redacts_key() {
        let text = format!("{:?}", ImdsConfig { signing_key: b"sekrit".to_vec(), ..ImdsConfig::default() });
        assert!(!text.contains("sekrit") && text.contains("<redacted>"), "{text}");
    }
}
