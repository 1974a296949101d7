//! A local stand-in for Azure Event Hubs and Service Bus over AMQP 1.0, faithful enough that
//! the official Rust clients (`azure_messaging_eventhubs` 0.15, `azure_core_amqp` 1.1) work
//! against it unchanged through their custom-endpoint option.
//!
//! # Wire facts
//!
//! - Plain TCP (`amqp://127.0.0.1:<port>`), SASL ANONYMOUS (PLAIN with any credentials is also
//!   accepted). The AMQP `open` hostname names the namespace (`contoso.servicebus.windows.net`);
//!   one stand-in hosts several, and an unknown or absent hostname means the first configured.
//! - Authorization is claims-based security only: put-token on `$cbs` (application properties
//!   `operation` = `put-token`, `type`, `name` = the audience; body = the token) answered on the
//!   reply link with `status-code` 202 (the Rust SDK treats 200 as an error) or 401/400/404 and
//!   a `status-description` saying what is wrong, `correlation-id` = the request's message-id.
//!   Token types: `jwt` (HS256 under [`AmqpConfig::jwt_signing_key`], audience
//!   [`EVENT_HUBS_AUDIENCES`] or [`SERVICE_BUS_AUDIENCES`]) and
//!   `servicebus.windows.net:sastoken` (signed with a configured key; see [`sign_sas`]). A token
//!   authorizes its audience's path and everything below it, on that connection, until it
//!   expires. Replies are routed by the request's `reply-to` to the reply link whose target
//!   address (or, if empty, name) matches.
//! - Link addresses are full URLs (`amqps://<ns>/<entity>...`) or bare paths:
//!   senders target `<hub>`, `<hub>/Partitions/<n>`, `<queue>` or `<topic>`; receivers read
//!   `<hub>/ConsumerGroups/<any group>/Partitions/<n>`, `<queue>`, `<topic>/Subscriptions/<sub>`,
//!   or `.../$DeadLetterQueue`. Unknown entities are refused with `amqp:not-found`, links without
//!   a covering token with `amqp:unauthorized-access` (attach answered with a null terminus, then
//!   a detach carrying the error, as the service does).
//! - `$management` (or `<entity>/$management`) answers READ of `com.microsoft:eventhub` and
//!   `com.microsoft:partition`; the request's `security_token` authorizes it (else a put-token on
//!   the connection does).
//! - Transfers with message-format `0x80013700` are batches: each Data section is one encoded
//!   message, stored separately. Messages larger than [`AmqpConfig::max_message_size`] (also
//!   advertised on every attach) are rejected with `amqp:link:message-size-exceeded`.
//! - Stored messages keep every section as sent and gain the service's annotations:
//!   Event Hubs `x-opt-sequence-number` (long, per partition from 0), `x-opt-offset` (string,
//!   a byte position), `x-opt-enqueued-time`; Service Bus `x-opt-sequence-number` (from 1),
//!   `x-opt-enqueued-time`, and `x-opt-locked-until` on peek-locked deliveries.
//! - Event Hubs partitions: the `.../Partitions/<n>` link, else `x-opt-partition-key` hashed
//!   (stable, FNV-1a; not the service's own function), else round-robin. Readers start where
//!   their `apache.org:selector-filter:string` says (see `selector`) and then wait for new events;
//!   `com.microsoft:epoch` arbitrates readers of a partition and consumer group
//!   (`amqp:link:stolen`). Service Bus readers compete; a link whose sender settle mode is
//!   `settled` is receive-and-delete, otherwise peek-lock (Accepted removes, Released/Modified
//!   returns the message in order, Rejected dead-letters).
//!
//! # Fault injection
//!
//! [`AmqpStandIn::push_faults`] queues [`AmqpFault`]s per entity path (`twins`,
//! `twins/Partitions/1`, `twin-queue`); each transfer on a matching sender link takes the next
//! one (the exact path first, then the entity name). Out of process: `POST /_standin/faults`
//! on the admin surface ([`AmqpStandIn::serve_admin`]).

mod address;
mod admin;
mod auth;
mod broker;
mod selector;
mod store;
mod transport;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{Body, Message};
use fe2o3_amqp_types::primitives::{SimpleValue, Symbol, Value};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use admin::FaultsRequest;
pub use auth::{sign_sas, EVENT_HUBS_AUDIENCES, SERVICE_BUS_AUDIENCES, TOKEN_TYPE_JWT, TOKEN_TYPE_SAS};

use broker::Broker;
use store::lock;

/// Namespace of the default configuration.
pub const DEFAULT_NAMESPACE: &str = "twinroute-local.servicebus.windows.net";
/// Event hub of the default configuration.
pub const DEFAULT_HUB: &str = "twins";
/// Partitions of [`DEFAULT_HUB`].
pub const DEFAULT_PARTITION_COUNT: u32 = 4;
/// Queue of the default configuration.
pub const DEFAULT_QUEUE: &str = "twin-queue";
/// Topic of the default configuration.
pub const DEFAULT_TOPIC: &str = "twin-topic";
/// The subscription of [`DEFAULT_TOPIC`].
pub const DEFAULT_SUBSCRIPTION: &str = "all";
/// Name of the default namespace's shared access key (the name Azure gives a namespace's first key).
pub const DEV_SAS_KEY_NAME: &str = "RootManageSharedAccessKey";
/// The default namespace's shared access key. **Development only**: it is published here.
pub const DEV_SAS_KEY: &str = "dHdpbnJvdXRlLXN0YW5kaW4tZGV2ZWxvcG1lbnQta2V5LWRvLW5vdC10cnVzdA==";
/// Largest message accepted, and advertised on links: 1 MiB, as Event Hubs Standard.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 1_048_576;
/// The message format of Event Hubs / Service Bus batches: one encoded message per Data section.
pub const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;

/// The namespaces and entities served, the key JWTs are checked with, the size limit.
#[derive(Clone)]
pub struct AmqpConfig {
    /// Namespaces by host; the first is used when a client's `open` hostname matches none.
    pub namespaces: Vec<NamespaceDef>,
    /// HMAC key of `jwt` tokens ([`crate::jwt::verify`]); the IMDS stand-in signs with the same
    /// default, [`crate::DEV_SIGNING_KEY`].
    pub jwt_signing_key: Vec<u8>,
    /// Largest message (a batch counts whole) accepted, advertised as the links' max-message-size.
    pub max_message_size: u64,
    /// Told of every message as it is accepted (load tests measure end-to-end latency with it).
    pub receipt_hook: Option<ReceiptHook>,
}

/// Called for every accepted transfer, right before it is settled, with the entity's path
/// (`<namespace>/<entity>`) and, for each message in it, the value of the application property
/// `property` when it is a string.
#[derive(Clone)]
pub struct ReceiptHook {
    /// The application property to read from each message.
    pub property: String,
    /// The function told: (entity path, the property's value per message).
    #[allow(clippy::type_complexity)]
    pub callback: Arc<dyn Fn(&str, &[Option<&str>]) + Send + Sync>,
}

impl Default for AmqpConfig {
    /// [`NamespaceDef::default`], [`crate::DEV_SIGNING_KEY`], [`DEFAULT_MAX_MESSAGE_SIZE`].
    fn default() -> Self {
        AmqpConfig {
            namespaces: vec![NamespaceDef::default()],
            jwt_signing_key: crate::DEV_SIGNING_KEY.to_vec(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            receipt_hook: None,
        }
    }
}

impl fmt::Debug for AmqpConfig {
    // The key stays out of logs even though the default one is public.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("namespaces", &self.namespaces)
            .field("jwt_signing_key", &"<redacted>")
            .field("max_message_size", &self.max_message_size)
            .field("receipt_hook", &self.receipt_hook.as_ref().map(|h| &h.property))
            .finish()
    }
}

/// One namespace: its host and entities, its shared access keys, identities denied sending.
#[derive(Clone)]
pub struct NamespaceDef {
    /// Fully qualified host, e.g. `contoso.servicebus.windows.net` (compared case-insensitively).
    pub host: String,
    /// Event hubs.
    pub hubs: Vec<HubDef>,
    /// Service Bus queues.
    pub queues: Vec<String>,
    /// Service Bus topics and their subscriptions.
    pub topics: Vec<TopicDef>,
    /// Shared access keys, `(key name, key)`; a key signs with its UTF-8 bytes, as in Azure.
    /// Every key has every right (Send, Listen, Manage).
    pub sas_keys: Vec<(String, String)>,
    /// Object ids (`oid`) of identities without a data role here: their JWTs are refused (401,
    /// "'Send' claim(s) are required").
    pub denied_object_ids: Vec<String>,
}

impl NamespaceDef {
    /// A namespace with no entities and no keys.
    pub fn new(host: impl Into<String>) -> Self {
        NamespaceDef {
            host: host.into(),
            hubs: Vec::new(),
            queues: Vec::new(),
            topics: Vec::new(),
            sas_keys: Vec::new(),
            denied_object_ids: Vec::new(),
        }
    }
}

impl Default for NamespaceDef {
    /// [`DEFAULT_NAMESPACE`] with hub [`DEFAULT_HUB`] ([`DEFAULT_PARTITION_COUNT`] partitions),
    /// queue [`DEFAULT_QUEUE`], topic [`DEFAULT_TOPIC`] with subscription
    /// [`DEFAULT_SUBSCRIPTION`], key [`DEV_SAS_KEY_NAME`] = [`DEV_SAS_KEY`].
    fn default() -> Self {
        NamespaceDef {
            hubs: vec![HubDef { name: DEFAULT_HUB.to_owned(), partition_count: DEFAULT_PARTITION_COUNT }],
            queues: vec![DEFAULT_QUEUE.to_owned()],
            topics: vec![TopicDef {
                name: DEFAULT_TOPIC.to_owned(),
                subscriptions: vec![DEFAULT_SUBSCRIPTION.to_owned()],
            }],
            sas_keys: vec![(DEV_SAS_KEY_NAME.to_owned(), DEV_SAS_KEY.to_owned())],
            ..NamespaceDef::new(DEFAULT_NAMESPACE)
        }
    }
}

impl fmt::Debug for NamespaceDef {
    // Key names are shown, keys are not.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key_names: Vec<&str> = self.sas_keys.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("NamespaceDef")
            .field("host", &self.host)
            .field("hubs", &self.hubs)
            .field("queues", &self.queues)
            .field("topics", &self.topics)
            .field("sas_key_names", &key_names)
            .field("denied_object_ids", &self.denied_object_ids)
            .finish()
    }
}

/// An event hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDef {
    /// Its name (the entity path).
    pub name: String,
    /// Partitions, with ids `0`..`partition_count - 1`.
    pub partition_count: u32,
}

/// A Service Bus topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDef {
    /// Its name.
    pub name: String,
    /// Its subscriptions; every message sent to the topic goes to each.
    pub subscriptions: Vec<String>,
}

/// A scripted misbehaviour, consumed by one transfer on a sender link to the entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmqpFault {
    /// Settle the transfer as Rejected with this error condition (e.g.
    /// `com.microsoft:server-busy`, `amqp:resource-limit-exceeded`, `amqp:not-found`,
    /// `amqp:unauthorized-access`) and description; nothing is stored.
    Reject {
        /// The AMQP error condition symbol.
        condition: String,
        /// The error description.
        description: String,
    },
    /// Reject the transfer with `amqp:link:detach-forced`, then detach the link with that error.
    /// (Settling first keeps fe2o3-based clients from waiting forever for the outcome of a
    /// delivery whose link is gone.)
    DetachLink,
    /// Close the client's socket at once, the transfer unsettled and not stored, no `close` frame.
    DropConnection,
    /// Wait this long, then store and settle normally.
    Delay(Duration),
}

/// The JSON form of an [`AmqpFault`] on the admin surface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AmqpFaultSpec {
    /// `{"kind":"reject","condition":"com.microsoft:server-busy","description":"..."}`
    /// (`description` optional).
    Reject {
        /// The AMQP error condition symbol.
        condition: String,
        /// The error description.
        #[serde(default)]
        description: Option<String>,
    },
    /// `{"kind":"detach_link"}`.
    DetachLink,
    /// `{"kind":"drop_connection"}`.
    DropConnection,
    /// `{"kind":"delay","ms":1500}`.
    Delay {
        /// Milliseconds to wait before settling.
        ms: u64,
    },
}

impl From<AmqpFaultSpec> for AmqpFault {
    fn from(spec: AmqpFaultSpec) -> Self {
        match spec {
            AmqpFaultSpec::Reject { condition, description } => {
                let description = description.unwrap_or_else(|| format!("Injected fault: {condition}"));
                AmqpFault::Reject { condition, description }
            }
            AmqpFaultSpec::DetachLink => AmqpFault::DetachLink,
            AmqpFaultSpec::DropConnection => AmqpFault::DropConnection,
            AmqpFaultSpec::Delay { ms } => AmqpFault::Delay(Duration::from_millis(ms)),
        }
    }
}

impl From<&AmqpFault> for AmqpFaultSpec {
    fn from(fault: &AmqpFault) -> Self {
        match fault {
            AmqpFault::Reject { condition, description } => {
                AmqpFaultSpec::Reject { condition: condition.clone(), description: Some(description.clone()) }
            }
            AmqpFault::DetachLink => AmqpFaultSpec::DetachLink,
            AmqpFault::DropConnection => AmqpFaultSpec::DropConnection,
            AmqpFault::Delay(d) => {
                AmqpFaultSpec::Delay { ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX) }
            }
        }
    }
}

/// Counters (what `GET /_standin/stats` returns).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmqpStats {
    /// Connections that completed the AMQP open.
    pub connections_accepted: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// put-token requests answered 202.
    pub put_tokens_accepted: u64,
    /// put-token requests refused (401, 400, 404).
    pub put_tokens_refused: u64,
    /// `$management` requests, answered or not.
    pub management_requests: u64,
    /// Link attaches refused (unknown entity, not authorized, bad filter, epoch).
    pub attaches_refused: u64,
    /// Per entity, keyed `<namespace>/<entity path>`: hubs, queues, topics, subscriptions,
    /// dead-letter queues.
    pub entities: BTreeMap<String, EntityStats>,
    /// Faults not consumed yet, per entity path as pushed.
    pub pending_faults: BTreeMap<String, Vec<AmqpFaultSpec>>,
}

/// Counters of one entity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityStats {
    /// Transfers settled as Accepted (a batch counts once).
    pub transfers_accepted: u64,
    /// Transfers settled as Rejected (faults, size limit, bad batch, expired token).
    pub transfers_rejected: u64,
    /// Messages held now: events in all partitions (Event Hubs keeps them), messages a topic
    /// accepted, messages in a queue or subscription including locked ones.
    pub messages_stored: u64,
    /// Messages consumers took: events sent on reader links, queue messages settled away.
    pub messages_delivered: u64,
}

/// A message as the stand-in holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// `x-opt-sequence-number`: per partition from 0 (Event Hubs), per entity from 1 (Service Bus).
    pub sequence_number: i64,
    /// `x-opt-offset` (Event Hubs only).
    pub offset: Option<String>,
    /// The partition (Event Hubs only).
    pub partition_id: Option<String>,
    /// `x-opt-enqueued-time`.
    pub enqueued_time: SystemTime,
    /// The message as sent, plus the service's annotations.
    pub message: Message<Body<Value>>,
}

impl StoredMessage {
    /// The Data sections' bytes, concatenated (empty for other bodies).
    pub fn body_bytes(&self) -> Vec<u8> {
        match &self.message.body {
            Body::Data(sections) => sections.iter().flat_map(|d| d.0.iter().copied()).collect(),
            _ => Vec::new(),
        }
    }

    /// An application property.
    pub fn application_property(&self, name: &str) -> Option<&SimpleValue> {
        self.message.application_properties.as_ref()?.0.get(name)
    }

    /// An application property that is a string.
    pub fn application_property_str(&self, name: &str) -> Option<&str> {
        match self.application_property(name)? {
            SimpleValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// A message annotation by symbol name.
    pub fn annotation(&self, name: &str) -> Option<&Value> {
        self.message.message_annotations.as_ref()?.0.get(&OwnedKey::Symbol(Symbol::from(name)))
    }

    /// The message-id, if it is a string.
    pub fn message_id(&self) -> Option<String> {
        match self.message.properties.as_ref()?.message_id.as_ref()? {
            fe2o3_amqp_types::messaging::MessageId::String(id) => Some(id.clone()),
            _ => None,
        }
    }
}

/// A running stand-in. Cheap to clone; it stops when [`AmqpStandIn::shutdown`] is called or
/// the last clone is dropped.
#[derive(Clone)]
pub struct AmqpStandIn {
    inner: Arc<Inner>,
}

struct Inner {
    /// Entities, counters, faults, live connections; shared with every task.
    broker: Arc<Broker>,
    addr: SocketAddr,
    /// The accept loop and admin servers, aborted when the stand-in stops.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Sockets first: aborting a connection task drops its handle, which would otherwise
        // close the connection gracefully.
        self.broker.drop_connections();
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

impl fmt::Debug for AmqpStandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpStandIn").field("addr", &self.inner.addr).finish_non_exhaustive()
    }
}

impl AmqpStandIn {
    /// Starts on an ephemeral loopback port (`127.0.0.1:0`).
    pub async fn start(config: AmqpConfig) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// Starts on `addr`, which must be a loopback address. The configuration is checked first;
    /// every problem in it is reported at once.
    pub async fn start_on(addr: SocketAddr, config: AmqpConfig) -> std::io::Result<Self> {
        require_loopback(addr, "AMQP")?;
        let broker = Arc::new(Broker::new(config).map_err(|problems| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid AMQP stand-in configuration: {}", problems.join("; ")),
            )
        })?);
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(broker::accept_loop(listener, broker.clone()));
        tracing::debug!(%addr, "AMQP stand-in listening");
        Ok(AmqpStandIn { inner: Arc::new(Inner { broker, addr, tasks: Mutex::new(vec![task]) }) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The custom endpoint to give clients: `amqp://127.0.0.1:<port>` (plain TCP).
    pub fn endpoint(&self) -> String {
        format!("amqp://{}", self.inner.addr)
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.broker.config
    }

    /// Queues faults for transfers to `entity` (`twins`, `twins/Partitions/1`, `twin-queue`,
    /// case-insensitive, any namespace); each transfer takes the next one.
    pub fn push_faults(&self, entity: &str, faults: impl IntoIterator<Item = AmqpFault>) {
        self.inner.broker.push_faults(entity, faults);
    }

    /// Closes every client connection abruptly (no `close` frame), as a network failure would.
    pub fn drop_connections(&self) {
        self.inner.broker.drop_connections();
    }

    /// Counters and pending faults.
    pub fn stats(&self) -> AmqpStats {
        self.inner.broker.stats()
    }

    /// What `entity` of `namespace` holds now: all events of a hub (by partition, then sequence
    /// number) or of `<hub>/Partitions/<n>`; the messages a topic accepted; the messages waiting
    /// in a queue, subscription or dead-letter queue (not the locked ones). Empty if unknown.
    /// For the stand-in's own tests and debugging: clients read through receiver links.
    pub fn stored(&self, namespace: &str, entity: &str) -> Vec<StoredMessage> {
        self.inner.broker.stored(namespace, entity)
    }

    /// Appends `encoded` (each one AMQP message, as a sender would transfer it) to `hub` of
    /// `namespace` as the service stores sent events: to the partition `partition_key` maps to
    /// (round-robin without one), with sequence number, offset and enqueued time. For filling a
    /// hub in-process (a load test's backlog) without a sender's round trips. Returns how many
    /// were stored; nothing is stored when one of them does not decode.
    pub fn publish(
        &self,
        namespace: &str,
        hub: &str,
        partition_key: Option<&str>,
        encoded: &[Vec<u8>],
    ) -> Result<usize, String> {
        self.inner.broker.publish(namespace, hub, partition_key, encoded)
    }

    /// Serves the admin surface on `addr` (loopback only; port 0 picks one) until the stand-in
    /// stops, and returns the address: `POST /_standin/faults` with
    /// `{"entity":"twins","faults":[{"kind":"reject","condition":"com.microsoft:server-busy"}]}`,
    /// `GET /_standin/stats`, `POST /_standin/drop-connections`; each answers with the stats.
    pub async fn serve_admin(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        require_loopback(addr, "admin")?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let router = self.admin_router();
        let task = tokio::spawn(async move {
            // Errors are clients going away; the task ends when the stand-in aborts it.
            let _ = axum::serve(listener, router).await;
        });
        lock(&self.inner.tasks).push(task);
        Ok(addr)
    }

    /// The admin surface as a `Router`, to call in-process.
    pub fn admin_router(&self) -> axum::Router {
        admin::router(self.inner.broker.clone())
    }

    /// Stops now, even if other clones exist: drops every connection abruptly (as a crash
    /// would) and stops listening.
    pub async fn shutdown(self) {
        self.inner.broker.drop_connections();
        let tasks: Vec<JoinHandle<()>> = lock(&self.inner.tasks).drain(..).collect();
        for task in tasks {
            task.abort();
            // The only possible error is the cancellation just requested.
            let _ = task.await;
        }
    }
}

fn require_loopback(addr: SocketAddr, what: &str) -> std::io::Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the {what} stand-in binds loopback addresses only, not {addr}"),
        ))
    }
}
