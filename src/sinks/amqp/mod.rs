//! One AMQP sender for Event Hubs and Service Bus (they speak the same AMQP): a connection, a
//! session and claims-based authorization reused across sends, sender links per target, all
//! re-established after a drop (the AMQP client itself is [`wire`]); tokens from the endpoint's
//! managed identity (CBS type `jwt`) or SAS tokens signed from its connection string (type
//! `servicebus.windows.net:sastoken`), put again before they expire.

pub mod message;
pub mod wire;

use crate::config::ConnectionString;
use crate::delivery::Envelope;
use crate::identity::sas::{self, DEFAULT_SAS_VALIDITY, SAS_TOKEN_TYPE};
use crate::identity::{provider::required_role, CachedCredential, Token};
use crate::sinks::DeliveryOutcome;
use message::{batched_size, encode_event_into, EnvelopeWriter, MessageOptions};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use time::OffsetDateTime;

/// Authorization is put again when the token in force expires within this margin.
const REAUTHORIZE_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// How long one AMQP operation (open, attach, put-token) may take before it counts as failed.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a send waits for the service's disposition. A send left unanswered is in doubt: the
/// connection is dropped and the batch retried (at-least-once; Service Bus deduplicates by
/// message id where duplicate detection is on).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Event Hubs and Service Bus ask clients to back off this long when they answer "server busy".
const SERVER_BUSY_BACKOFF: Duration = Duration::from_secs(4);
/// Sender links per target. The groups of one batch (distinct partition keys or sessions, so
/// their relative order does not matter) are sent on them at once, each group's messages in
/// order on one link: a batch takes the time of its longest lane instead of the sum of its
/// groups' round trips.
const LANES: usize = 8;
/// Used when a link does not say its maximum message size.
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 1024 * 1024;
/// How long each step of closing (detach, end, close) may take.
const CLOSE_STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the AMQP thread of a dropped client keeps running, so the detach, end and close
/// its handles start when dropped can finish.
const DROP_GRACE: Duration = Duration::from_secs(5);

/// How an endpoint authenticates on AMQP.
#[derive(Clone)]
pub enum AmqpAuth {
    /// A managed identity's tokens for `audience` (`https://eventhubs.azure.net/`, ...).
    Identity { credential: CachedCredential, audience: &'static str },
    /// SAS tokens signed locally from a connection string.
    Sas { connection: ConnectionString },
}

impl fmt::Debug for AmqpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmqpAuth::Identity { audience, .. } => write!(f, "Identity({audience})"),
            AmqpAuth::Sas { connection } => write!(f, "Sas({})", connection.key_name),
        }
    }
}

/// Which service, for messages naming the role an identity needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    EventHubs,
    ServiceBus,
}

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct AmqpTargetConfig {
    /// The endpoint's name, for messages.
    pub endpoint: String,
    pub service: Service,
    /// `<namespace>.servicebus.windows.net`: the AMQP host name, whatever the socket connects to.
    pub namespace: String,
    /// The hub, queue or topic.
    pub entity: String,
    /// Connect here instead of `amqps://<namespace>:5671` (`amqp://` is plain TCP): local stand-ins,
    /// emulators, proxies.
    pub custom_endpoint: Option<url::Url>,
    /// Extra CA certificates (PEM) to trust for the TLS connection (`amqps`).
    pub ca_file: Option<std::path::PathBuf>,
    pub auth: AmqpAuth,
}

/// An open connection with what hangs off it (shared with the operations running on the
/// client's [`AmqpThread`]).
struct Connected {
    connection: Arc<wire::Connection>,
    /// Sender links by target address and lane.
    senders: HashMap<(String, usize), (wire::SenderLink, u64)>,
    /// The token in force on this connection and its expiry.
    authorized: Option<(Token, OffsetDateTime)>,
}

/// Why an AMQP operation failed, classified.
#[derive(Debug)]
enum Failure {
    Auth(String),
    Permanent(String),
    Transient(String, Option<Duration>),
}

impl From<Failure> for DeliveryOutcome {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Auth(reason) => DeliveryOutcome::AuthFailure { reason },
            Failure::Permanent(reason) => DeliveryOutcome::Permanent { reason },
            Failure::Transient(reason, after) => DeliveryOutcome::Transient { reason, after },
        }
    }
}

/// An AMQP client for one entity of one namespace.
pub struct AmqpClient {
    config: AmqpTargetConfig,
    /// One operation at a time: the delivery worker is sequential, and the lock makes
    /// (re)connecting and authorizing happen once.
    state: tokio::sync::Mutex<Option<Connected>>,
    /// The identity token last put (even if refused), so an auth failure can force a refresh
    /// of exactly that token.
    last_token: std::sync::Mutex<Option<Token>>,
    /// Where the connection lives and every AMQP operation runs; started on first connect.
    /// (Declared after `state`: dropping the client drops the connection's handles first, then
    /// stops the thread.)
    io: OnceLock<Arc<AmqpThread>>,
}

/// The thread a client's AMQP connection lives on: a single-threaded runtime that runs the
/// connection's reader and writer tasks and every operation on it (open, attach, put-token,
/// send, close).
///
/// One thread for all of them keeps a request's fan-out to several endpoints to one wake-up
/// (context switches are most of what delivery costs at moderate rates). The load test's SDK
/// baseline runs on one too, for another reason: fe2o3-amqp 0.14.1's `Sender::send` hands the
/// transfer to the session engine first and records the delivery in the link's unsettled map
/// only afterwards (`SenderLink::send_payload_with_transfer`, link/sender_link.rs); on a
/// multi-threaded runtime the session engine, on another worker, can take the service's settled
/// disposition in between, find nothing to settle and drop the outcome, and the send then waits
/// forever. With the engines and the sending future on one thread that cannot happen.
pub(crate) struct AmqpThread {
    handle: tokio::runtime::Handle,
    /// Dropped with the client: the thread then winds down (none when the runtime is the
    /// caller's own single-threaded one).
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl AmqpThread {
    /// The thread every client shares: on the daemon's default single-threaded runtime
    /// (`runtime.worker_threads = 1`) that runtime itself, so a delivery runs on the thread that
    /// accepted its events with no hand-off at all; on a multi-threaded runtime one thread that
    /// wakes for the batches of all endpoints at once (a request's events fan out to several
    /// endpoints together), instead of one per endpoint: context switches are most of what AMQP
    /// delivery costs at moderate rates. That thread stops when the last client using it is
    /// dropped, and a new one starts when needed.
    fn shared() -> std::io::Result<Arc<Self>> {
        // A single-threaded runtime already is such a thread: run on it, with no hand-offs.
        if let Ok(current) = tokio::runtime::Handle::try_current() {
            if current.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
                return Ok(Arc::new(Self { handle: current, _stop: None }));
            }
        }
        static SHARED: std::sync::Mutex<std::sync::Weak<AmqpThread>> =
            std::sync::Mutex::new(std::sync::Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = slot.upgrade() {
            return Ok(thread);
        }
        let thread = Arc::new(Self::start("amqp")?);
        *slot = Arc::downgrade(&thread);
        Ok(thread)
    }

    pub(crate) fn start(name: &str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            runtime.block_on(async move {
                let _ = stopped.await;
                // Let the detach/end/close the dropped handles asked for go out, within bounds.
                let deadline = tokio::time::Instant::now() + DROP_GRACE;
                let metrics = tokio::runtime::Handle::current().metrics();
                while metrics.num_alive_tasks() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        })?;
        Ok(Self { handle, _stop: Some(stop) })
    }

    /// Runs `f` on this thread and waits for it; dropping the returned future cancels `f`.
    pub(crate) async fn spawn<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, String> {
        let mut task = AbortOnDrop(self.handle.spawn(f));
        match (&mut task.0).await {
            Ok(value) => Ok(value),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err("the AMQP thread has stopped".to_owned()),
        }
    }

    /// Runs the AMQP operation `f` on this thread, for at most `limit`.
    async fn run<T: Send + 'static, E: fmt::Display + Send + 'static>(
        &self,
        limit: Duration,
        what: &str,
        f: impl Future<Output = Result<T, E>> + Send + 'static,
    ) -> Result<T, String> {
        match self.spawn(tokio::time::timeout(limit, f)).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(format!("{what}: {e}")),
            Ok(Err(_)) => Err(format!("{what}: no answer within {limit:?}")),
            Err(e) => Err(format!("{what}: {e}")),
        }
    }
}

/// Aborts the task when dropped (so cancelling the caller cancels the operation, as it did when
/// the operation ran in the caller's task).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl fmt::Debug for AmqpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpClient").field("config", &self.config).finish_non_exhaustive()
    }
}

impl AmqpClient {
    pub fn new(config: AmqpTargetConfig) -> Self {
        Self {
            config,
            state: tokio::sync::Mutex::new(None),
            last_token: std::sync::Mutex::new(None),
            io: OnceLock::new(),
        }
    }

    /// The client's AMQP thread, started on first use.
    fn io(&self) -> Result<&AmqpThread, Failure> {
        if let Some(io) = self.io.get() {
            return Ok(io);
        }
        let io = AmqpThread::shared().map_err(|e| {
            Failure::Transient(
                format!("endpoint {}: cannot start the AMQP thread: {e}", self.config.endpoint),
                None,
            )
        })?;
        // Callers hold the state lock, so no other thread is started meanwhile.
        let _ = self.io.set(io);
        Ok(self.io.get().expect("set above"))
    }

    pub fn config(&self) -> &AmqpTargetConfig {
        &self.config
    }

    fn where_(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.entity)
    }

    /// The role an identity needs here, for messages.
    fn role_hint(&self) -> String {
        match &self.config.auth {
            AmqpAuth::Identity { audience, .. } => format!(
                "endpoint {}: the identity lacks {} on {} (or the token was refused)",
                self.config.endpoint,
                required_role(audience),
                self.where_()
            ),
            AmqpAuth::Sas { connection } => format!(
                "endpoint {}: the SAS key {:?} was refused by {} (wrong or rotated key, or no Send right)",
                self.config.endpoint,
                connection.key_name,
                self.where_()
            ),
        }
    }

    /// The CBS audience path of the entity, and the token to put for it.
    async fn token(&self) -> Result<(String, Option<String>, Token), Failure> {
        let ns = &self.config.namespace;
        let entity = &self.config.entity;
        match &self.config.auth {
            AmqpAuth::Identity { credential, audience } => {
                let token = credential.token(audience).await.map_err(|e| {
                    Failure::Transient(format!("endpoint {}: no token: {e}", self.config.endpoint), None)
                })?;
                Ok((format!("amqps://{ns}/{entity}"), None, token))
            }
            AmqpAuth::Sas { connection } => {
                let token = sas::for_entity(connection, entity, DEFAULT_SAS_VALIDITY);
                Ok((format!("sb://{ns}/{entity}"), Some(SAS_TOKEN_TYPE.to_owned()), token))
            }
        }
    }

    async fn connect(&self) -> Result<Connected, Failure> {
        let io = self.io()?;
        let url = match &self.config.custom_endpoint {
            Some(url) => url.clone(),
            None => url::Url::parse(&format!("amqps://{}", self.config.namespace))
                .map_err(|e| Failure::Permanent(format!("namespace {}: {e}", self.config.namespace)))?,
        };
        let hostname = self.config.namespace.clone();
        let container_id = format!("twinroute-{}-{}", self.config.endpoint, uuid::Uuid::new_v4());
        let ca_file = self.config.ca_file.clone();
        let open = async move {
            let endpoint =
                wire::Endpoint { url: &url, hostname: &hostname, container_id, ca_file: ca_file.as_deref() };
            wire::Connection::open(endpoint).await
        };
        let connection = io
            .run(OPERATION_TIMEOUT, "opening the AMQP connection", open)
            .await
            .map_err(|e| Failure::Transient(format!("{}: {e}", self.where_()), None))?;
        Ok(Connected { connection: Arc::new(connection), senders: HashMap::new(), authorized: None })
    }

    /// Puts a token unless the one in force is still good for a while (or `force`).
    async fn authorize(&self, connected: &mut Connected, force: bool) -> Result<(), Failure> {
        let fresh_enough = connected.authorized.as_ref().is_some_and(|(_, expires)| {
            *expires - OffsetDateTime::now_utc()
                > time::Duration::try_from(REAUTHORIZE_BEFORE_EXPIRY).unwrap_or_default()
        });
        if fresh_enough && !force {
            return Ok(());
        }
        let (path, token_type, token) = self.token().await?;
        *self.last_token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        let secret = token.secret.expose().to_owned();
        let expires_ms = token.expires_on.unix_timestamp().saturating_mul(1000);
        let connection = connected.connection.clone();
        let put_token = async move {
            let token_type = token_type.as_deref().unwrap_or("jwt");
            connection.put_token(&path, token_type, &secret, expires_ms).await
        };
        let put = self.io()?.run(OPERATION_TIMEOUT, "put-token", put_token).await;
        match put {
            Ok(()) => {
                connected.authorized = Some((token.clone(), token.expires_on));
                Ok(())
            }
            Err(e) if looks_unauthorized(&e) => {
                Err(Failure::Auth(format!("{}: {}", self.role_hint(), redact(&e))))
            }
            Err(e) => Err(Failure::Transient(format!("{}: {}", self.where_(), redact(&e)), None)),
        }
    }

    /// After an auth failure: a fresh token (forced past the cache) on the next send.
    pub async fn refresh_credentials(&self) {
        let mut state = self.state.lock().await;
        if let Some(c) = state.as_mut() {
            c.authorized = None;
        }
        let held = self.last_token.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (AmqpAuth::Identity { credential, audience }, Some(token)) = (&self.config.auth, held) {
            if let Err(e) = credential.cache().force_refresh(audience, &token).await {
                tracing::warn!(endpoint = %self.config.endpoint, error = %e, "forced token refresh failed");
            }
        }
    }

    /// The sender for `target` on lane `lane`, attached on first use; with the link's maximum
    /// message size.
    async fn sender(
        &self,
        connected: &mut Connected,
        target: &str,
        lane: usize,
    ) -> Result<(wire::SenderLink, u64), Failure> {
        let key = (target.to_owned(), lane);
        if !connected.senders.contains_key(&key) {
            let address = format!("amqps://{}/{}", self.config.namespace, target);
            let name = format!("twinroute-sender-{}", uuid::Uuid::new_v4());
            let connection = connected.connection.clone();
            let attach = async move { connection.attach_sender(name, address).await };
            let sender = self
                .io()?
                .run(OPERATION_TIMEOUT, "attaching the sender", attach)
                .await
                .map_err(|e| classify_text(&e, &self.role_hint(), &self.where_()))?;
            let max = sender.max_message_size().unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
            connected.senders.insert(key.clone(), (sender, max));
        }
        let (sender, max) = connected.senders.get(&key).expect("inserted above");
        Ok((sender.clone(), *max))
    }

    /// `lanes` senders for `target` (connecting and authorizing if needed), the smallest maximum
    /// message size among them, and the connection they belong to.
    async fn senders(
        &self,
        target: &str,
        lanes: usize,
    ) -> Result<(Vec<wire::SenderLink>, u64, Arc<wire::Connection>), Failure> {
        let mut state = self.state.lock().await;
        let connected = self.ready(&mut state).await?;
        let mut senders = Vec::with_capacity(lanes);
        let mut max = u64::MAX;
        for lane in 0..lanes {
            match self.sender(connected, target, lane).await {
                Ok((sender, m)) => {
                    senders.push(sender);
                    max = max.min(m);
                }
                Err(f) => {
                    *state = None;
                    return Err(f);
                }
            }
        }
        let connection = connected.connection.clone();
        Ok((senders, max, connection))
    }

    /// After a send failed in a way that leaves the connection in doubt: drops it (if it is
    /// still the current one), so the next send starts clean.
    async fn drop_connection(&self, failed: &Arc<wire::Connection>) {
        let mut state = self.state.lock().await;
        if state.as_ref().is_some_and(|c| Arc::ptr_eq(&c.connection, failed)) {
            if let (Some(old), Some(io)) = (state.take(), self.io.get()) {
                io.handle.spawn(async move {
                    old.connection.close(CLOSE_STEP_TIMEOUT).await;
                });
            }
        }
    }

    async fn ready<'a>(&self, state: &'a mut Option<Connected>) -> Result<&'a mut Connected, Failure> {
        // None yet, or dropped or closed by the service since the last send: start over.
        if state.as_ref().is_none_or(|c| c.connection.failed().is_some()) {
            *state = Some(self.connect().await?);
        }
        let connected = state.as_mut().expect("connected above");
        if let Err(f) = self.authorize(connected, false).await {
            *state = None;
            return Err(f);
        }
        Ok(state.as_mut().expect("still connected"))
    }

    /// What a send's result means for the delivery, and whether the connection is in doubt.
    fn classify_send(&self, result: SendResult) -> (DeliveryOutcome, bool) {
        match result {
            Ok(Ok(wire::Outcome::Accepted)) => (DeliveryOutcome::Delivered, false),
            Ok(Ok(wire::Outcome::Rejected { condition, description })) => (
                classify_condition(&condition, &description, &self.role_hint(), &self.where_()).into(),
                false,
            ),
            Ok(Ok(wire::Outcome::Released | wire::Outcome::Modified)) => (
                DeliveryOutcome::Transient {
                    reason: format!("{}: the service released the message", self.where_()),
                    after: None,
                },
                false,
            ),
            // The link or connection is in doubt: start over next time.
            Ok(Err(e)) => {
                (classify_text(&format!("sending: {e}"), &self.role_hint(), &self.where_()).into(), true)
            }
            Err(_) => (
                classify_text(
                    &format!("sending: no answer within {SEND_TIMEOUT:?}"),
                    &self.role_hint(),
                    &self.where_(),
                )
                .into(),
                true,
            ),
        }
    }

    /// Closes the connection (at shutdown).
    pub async fn close(&self) {
        let Some(c) = self.state.lock().await.take() else { return };
        // A connection exists only once the thread does.
        let Some(io) = self.io.get() else { return };
        let _ = io.spawn(async move { c.connection.close(CLOSE_STEP_TIMEOUT).await }).await;
    }
}

/// Room kept free in a batch for the envelope's own encoding.
const ENVELOPE_OVERHEAD: u64 = 1024;

/// Groups positions of `batch` by key, keeping each key's events in their order (first-seen key
/// order).
pub fn group_by_key(
    batch: &[Arc<Envelope>],
    key: impl Fn(&Envelope) -> Option<String>,
) -> Vec<(Option<String>, Vec<usize>)> {
    let mut groups: Vec<(Option<String>, Vec<usize>)> = Vec::new();
    for (i, envelope) in batch.iter().enumerate() {
        let k = key(envelope);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(i),
            None => groups.push((k, vec![i])),
        }
    }
    groups
}

/// The outcome of one send on the AMQP thread: the service's answer, or the client's error, or
/// no answer in time.
type SendResult = Result<Result<wire::Outcome, String>, tokio::time::error::Elapsed>;

/// A message to send (encoded) and the positions (in the batch) of the events it carries.
type Planned = (Vec<usize>, Vec<u8>);

/// The messages of one group (one partition key or session, in order): each with the
/// positions of the events it carries, filled up to `max`; events that alone are too large are
/// set aside with why.
fn plan_group(
    batch: &[Arc<Envelope>],
    positions: &[usize],
    options: &MessageOptions,
    max: u64,
) -> (Vec<Planned>, Vec<(usize, String)>) {
    thread_local! {
        // One event's encoding, and the sections' contents before their headers: reused.
        static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            let (encoded, sections) = &mut *scratch;
            plan_group_with(batch, positions, options, max, encoded, sections)
        }
        Err(_) => plan_group_with(batch, positions, options, max, &mut Vec::new(), &mut Vec::new()),
    })
}

fn plan_group_with(
    batch: &[Arc<Envelope>],
    positions: &[usize],
    options: &MessageOptions,
    max: u64,
    encoded: &mut Vec<u8>,
    sections: &mut Vec<u8>,
) -> (Vec<Planned>, Vec<(usize, String)>) {
    let budget = max.saturating_sub(ENVELOPE_OVERHEAD) as usize;
    let mut messages = Vec::new();
    let mut oversized = Vec::new();
    let mut pending: Option<EnvelopeWriter> = None;
    let mut pending_at: Vec<usize> = Vec::new();
    let mut size = 0usize;
    for &i in positions {
        let event = &batch[i].event;
        encoded.clear();
        encode_event_into(event, options, encoded, sections);
        let add = batched_size(encoded.len());
        if add > budget {
            oversized.push((
                i,
                format!(
                    "event {} is {} bytes encoded, over the entity's maximum message size of {max} bytes",
                    event.id(),
                    encoded.len()
                ),
            ));
            continue;
        }
        if size + add > budget {
            if let Some(full) = pending.take() {
                messages.push((std::mem::take(&mut pending_at), full.finish()));
                size = 0;
            }
        }
        let envelope = pending.get_or_insert_with(|| {
            // Room for this group's events, up to the message size: most groups are small.
            let room = positions.len().saturating_mul(add).min(budget);
            EnvelopeWriter::start(event, options, room, sections)
        });
        envelope.push(encoded);
        size += add;
        pending_at.push(i);
    }
    if let Some(last) = pending {
        messages.push((pending_at, last.finish()));
    }
    (messages, oversized)
}

impl AmqpClient {
    /// Delivers a batch to `target`: grouped by twin id when `by_twin` (a partition key or a
    /// session holds one twin's events, in order), each group in batches up to the link's
    /// maximum message size, `options` giving each group's key. The groups are spread over
    /// [`LANES`] links and sent at once, each lane in order, all in one trip to the AMQP
    /// thread; a lane stops at its first failure, and the outcome lists what was delivered
    /// (the rest is retried). Events too large for the entity are refused (permanent) while the
    /// others go.
    pub async fn deliver_grouped(
        &self,
        target: &str,
        batch: &[Arc<Envelope>],
        by_twin: bool,
        options: impl Fn(Option<String>) -> MessageOptions,
    ) -> DeliveryOutcome {
        let groups = if by_twin {
            group_by_key(batch, |e| e.event.twin_id().map(str::to_owned))
        } else {
            group_by_key(batch, |_| None)
        };
        let lanes = groups.len().clamp(1, LANES);
        let (senders, max, connection) = match self.senders(target, lanes).await {
            Ok(s) => s,
            Err(f) => return f.into(),
        };
        let mut oversized: Vec<(usize, String)> = Vec::new();
        let mut planned: Vec<Vec<Planned>> = (0..lanes).map(|_| Vec::new()).collect();
        for (n, (key, positions)) in groups.into_iter().enumerate() {
            let (messages, mut too_large) = plan_group(batch, &positions, &options(key), max);
            planned[n % lanes].extend(messages);
            oversized.append(&mut too_large);
        }
        let io = match self.io() {
            Ok(io) => io,
            Err(f) => return f.into(),
        };
        tracing::trace!(endpoint = %self.config.endpoint, target, lanes, "sending");
        // Per lane: the positions delivered, and the failed send's result if one failed.
        let sending = async move {
            let lanes = planned.into_iter().zip(senders).map(|(messages, sender)| async move {
                let mut delivered = Vec::new();
                for (positions, message) in messages {
                    let result = tokio::time::timeout(
                        SEND_TIMEOUT,
                        sender.send(&message, message::BATCH_MESSAGE_FORMAT),
                    )
                    .await;
                    if !matches!(result, Ok(Ok(wire::Outcome::Accepted))) {
                        return (delivered, Some(result));
                    }
                    delivered.extend(positions);
                }
                (delivered, None)
            });
            futures::future::join_all(lanes).await
        };
        let results = match io.spawn(sending).await {
            Ok(r) => r,
            Err(e) => return Failure::Transient(format!("{}: {e}", self.where_()), None).into(),
        };
        let mut delivered = Vec::new();
        let mut failure = None;
        let mut in_doubt = false;
        for (mut lane_delivered, failed) in results {
            delivered.append(&mut lane_delivered);
            if let Some(result) = failed {
                let (outcome, doubt) = self.classify_send(result);
                in_doubt |= doubt;
                failure.get_or_insert(outcome);
            }
        }
        tracing::trace!(endpoint = %self.config.endpoint, target, delivered = delivered.len(), failed = failure.is_some(), "sent");
        if in_doubt {
            self.drop_connection(&connection).await;
        }
        if let Some(failure) = failure {
            // What was not delivered (the oversized included) is retried with the failure.
            return DeliveryOutcome::partial(delivered, failure);
        }
        if oversized.is_empty() {
            return DeliveryOutcome::Delivered;
        }
        let reasons: Vec<String> = oversized.into_iter().map(|(_, r)| r).collect();
        DeliveryOutcome::partial(delivered, DeliveryOutcome::Permanent { reason: reasons.join("; ") })
    }
}

/// Drops anything that looks like a token from an error text (SAS tokens, JWTs).
fn redact(text: &str) -> String {
    text.split_whitespace()
        .map(|w| {
            if w.contains("sig=") || w.starts_with("eyJ") || w.contains("SharedAccessSignature") {
                "[redacted]"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn looks_unauthorized(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("401") || t.contains("unauthorized") || t.contains("unauthorised") || t.contains("forbidden")
}

/// Classifies an AMQP error condition of a refused message.
fn classify_condition(condition: &str, description: &str, role_hint: &str, where_: &str) -> Failure {
    let detail =
        if description.is_empty() { condition.to_owned() } else { format!("{condition}: {description}") };
    match condition {
        "com.microsoft:server-busy" => {
            Failure::Transient(format!("{where_}: {detail}"), Some(SERVER_BUSY_BACKOFF))
        }
        "amqp:unauthorized-access" => Failure::Auth(format!("{role_hint}: {detail}")),
        "amqp:not-found" | "com.microsoft:entity-disabled" | "amqp:not-allowed" | "amqp:not-implemented" => {
            Failure::Permanent(format!("{where_}: {detail}"))
        }
        "amqp:link:message-size-exceeded" | "amqp:decode-error" | "amqp:invalid-field" => Failure::Permanent(
            format!("{where_}: the message was refused as malformed or too large: {detail}"),
        ),
        _ => Failure::Transient(format!("{where_}: {detail}"), None),
    }
}

/// Classifies an error from opening, attaching or sending, by the condition it names.
fn classify_text(error: &str, role_hint: &str, where_: &str) -> Failure {
    let text = redact(error);
    for condition in [
        "com.microsoft:server-busy",
        "amqp:unauthorized-access",
        "amqp:not-found",
        "com.microsoft:entity-disabled",
        "amqp:link:message-size-exceeded",
    ] {
        if text.contains(condition) || text.contains(&condition.replace("amqp:", "").replace('-', "")) {
            return classify_condition(condition, &text, role_hint, where_);
        }
    }
    if looks_unauthorized(&text) {
        return Failure::Auth(format!("{role_hint}: {text}"));
    }
    let lower = text.to_ascii_lowercase();
    if lower.contains("notfound") || lower.contains("not found") {
        return Failure::Permanent(format!("{where_}: the entity was not found: {text}"));
    }
    Failure::Transient(format!("{where_}: {text}"), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_map_to_outcome_classes() {
        let c = |cond: &str| classify_condition(cond, "", "role", "ns/hub");
        assert!(
            matches!(c("com.microsoft:server-busy"), Failure::Transient(_, Some(d)) if d == SERVER_BUSY_BACKOFF)
        );
        assert!(matches!(c("amqp:unauthorized-access"), Failure::Auth(_)));
        assert!(matches!(c("amqp:not-found"), Failure::Permanent(_)));
        assert!(matches!(c("amqp:link:message-size-exceeded"), Failure::Permanent(_)));
        assert!(matches!(c("amqp:internal-error"), Failure::Transient(_, None)));
        assert!(matches!(classify_text("put-token: status 401 Unauthorized", "role", "x"), Failure::Auth(_)));
        assert!(matches!(classify_text("connection refused", "role", "x"), Failure::Transient(..)));
    }

    #[test]
    fn tokens_are_redacted_from_error_texts() {
        let text = redact("refused SharedAccessSignature sr=a&sig=b&se=1 and eyJhbGciOi.x.y too");
        assert!(!text.contains("sig=") && !text.contains("eyJ"), "{text}");
    }
}
