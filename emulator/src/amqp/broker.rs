//! Connections, sessions and links: the AMQP side of the stand-in on fe2o3's acceptor.
//!
//! One task per connection accepts sessions; one task per session accepts links (it looks at
//! each attach first, to refuse what the service would refuse); one task per link serves it:
//!
//! | client link | served by |
//! |---|---|
//! | sender to `$cbs` / `$management` | [`serve_requests`]: put-token, READ |
//! | receiver from `$cbs` / `$management` | [`serve_replies`]: carries the answers |
//! | sender to a hub, partition, queue or topic | [`serve_inbound`]: faults, size limit, store |
//! | receiver from a hub partition | [`serve_partition_reader`]: from the filter's position on |
//! | receiver from a queue or subscription | [`serve_queue_reader`]: competing, peek-lock or not |

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::link::delivery::{DeliveryInfo, Sendable};
use fe2o3_amqp::link::{DetachError, LinkStateError, RecvError};
use fe2o3_amqp::{Receiver, Sender};
use fe2o3_amqp_types::definitions::{self, ErrorCondition, Role, SenderSettleMode};
use fe2o3_amqp_types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Body, Outcome, Properties, Source, Target, TargetArchetype,
};
use fe2o3_amqp_types::performatives::Attach;
use fe2o3_amqp_types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use serde_amqp::descriptor::Descriptor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, trace};

use super::address::Address;
use super::auth::{self, Grant, Grants, JwtAudience, TokenCheck};
use super::selector::{self, StartAt};
use super::store::{
    self, lock, AmqpMessage, Entity, Hub, Namespace, Partition, Queue, ReaderGuard, Settlement, Topic,
};
use super::transport::{AnonymousOrPlain, ClientStream, KillSwitch};
use super::{
    AmqpConfig, AmqpFault, AmqpFaultSpec, AmqpStats, EntityStats, StoredMessage, BATCH_MESSAGE_FORMAT,
};

/// The container id the stand-in opens connections with.
const CONTAINER_ID: &str = "twinroute-amqp-standin";
/// Frame size offered; the Azure SDKs ask for 65536.
const MAX_FRAME_SIZE: u32 = 65_536;
/// How long a request waits for its reply link to be attached (clients attach both links of a
/// CBS or management client before the first request, so this is a backstop).
const REPLY_LINK_WAIT: Duration = Duration::from_secs(5);
/// How long closing handshakes may take before the stand-in stops waiting.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

const NOT_FOUND: &str = "amqp:not-found";
const NOT_ALLOWED: &str = "amqp:not-allowed";
const UNAUTHORIZED: &str = "amqp:unauthorized-access";
const INVALID_FIELD: &str = "amqp:invalid-field";
const DECODE_ERROR: &str = "amqp:decode-error";
const LINK_STOLEN: &str = "amqp:link:stolen";
const DETACH_FORCED: &str = "amqp:link:detach-forced";
const MESSAGE_SIZE_EXCEEDED: &str = "amqp:link:message-size-exceeded";

const EPOCH_PROPERTY: &str = "com.microsoft:epoch";
const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
const SELECTOR_FILTER_CODE: u64 = 0x0000_468c_0000_0004;

/// Everything shared by the stand-in's tasks: entities, faults, counters, live connections.
pub(crate) struct Broker {
    pub config: AmqpConfig,
    pub namespaces: Vec<Arc<Namespace>>,
    state: Mutex<BrokerState>,
}

#[derive(Default)]
struct BrokerState {
    /// Faults per lower-cased entity path.
    faults: HashMap<String, VecDeque<AmqpFault>>,
    connections: HashMap<u64, Arc<KillSwitch>>,
    next_connection: u64,
    connections_accepted: u64,
    put_tokens_accepted: u64,
    put_tokens_refused: u64,
    management_requests: u64,
    attaches_refused: u64,
    /// Transfer and delivery counters per `<namespace>/<entity path>`.
    entities: HashMap<String, EntityStats>,
}

impl Broker {
    /// Checks the configuration (every problem at once) and sets up the entities.
    pub fn new(mut config: AmqpConfig) -> Result<Broker, Vec<String>> {
        let problems = validate(&config);
        if !problems.is_empty() {
            return Err(problems);
        }
        for namespace in &mut config.namespaces {
            namespace.host = namespace.host.to_ascii_lowercase();
        }
        let namespaces = config.namespaces.iter().cloned().map(|def| Arc::new(Namespace::new(def))).collect();
        Ok(Broker { config, namespaces, state: Mutex::default() })
    }

    /// The namespace named by `host`, if one is configured.
    fn namespace_named(&self, host: &str) -> Option<&Arc<Namespace>> {
        self.namespaces.iter().find(|n| n.host().eq_ignore_ascii_case(host))
    }

    pub fn push_faults(&self, entity: &str, faults: impl IntoIterator<Item = AmqpFault>) {
        let key = entity.trim_matches('/').to_ascii_lowercase();
        lock(&self.state).faults.entry(key).or_default().extend(faults);
    }

    /// The next fault for the first of `keys` that has one.
    fn take_fault(&self, keys: &[String]) -> Option<AmqpFault> {
        let mut state = lock(&self.state);
        keys.iter().find_map(|key| state.faults.get_mut(key).and_then(VecDeque::pop_front))
    }

    pub fn drop_connections(&self) {
        let switches: Vec<Arc<KillSwitch>> = lock(&self.state).connections.values().cloned().collect();
        debug!(connections = switches.len(), "dropping every AMQP connection");
        for switch in switches {
            switch.kill();
        }
    }

    fn register_connection(&self, kill: Arc<KillSwitch>) -> u64 {
        let mut state = lock(&self.state);
        state.next_connection += 1;
        state.connections_accepted += 1;
        let id = state.next_connection;
        state.connections.insert(id, kill);
        id
    }

    fn count<F: FnOnce(&mut BrokerState)>(&self, update: F) {
        update(&mut lock(&self.state));
    }

    fn count_entity(&self, key: &str, update: impl FnOnce(&mut EntityStats)) {
        update(lock(&self.state).entities.entry(key.to_owned()).or_default());
    }

    pub fn stats(&self) -> AmqpStats {
        let mut entities = std::collections::BTreeMap::new();
        for namespace in &self.namespaces {
            let host = namespace.host();
            let mut add = |path: String, stored: u64, delivered: u64| {
                let stats: &mut EntityStats = entities.entry(format!("{host}/{path}")).or_default();
                stats.messages_stored = stored;
                stats.messages_delivered = delivered;
            };
            for hub in &namespace.hubs {
                add(hub.name.clone(), hub.stored(), 0);
            }
            let queues =
                namespace.queues.iter().chain(namespace.topics.iter().flat_map(|t| &t.subscriptions));
            for queue in queues {
                add(queue.path.clone(), queue.stored(), queue.delivered.load(Ordering::Relaxed));
                let dead = queue.dead_letter();
                add(dead.path.clone(), dead.stored(), dead.delivered.load(Ordering::Relaxed));
            }
            for topic in &namespace.topics {
                add(topic.name.clone(), topic.stored(), 0);
            }
        }
        let state = lock(&self.state);
        for (key, counters) in &state.entities {
            let stats = entities.entry(key.clone()).or_default();
            stats.transfers_accepted = counters.transfers_accepted;
            stats.transfers_rejected = counters.transfers_rejected;
            // Hub deliveries are counted per link; queue deliveries by the queue.
            stats.messages_delivered += counters.messages_delivered;
        }
        AmqpStats {
            connections_accepted: state.connections_accepted,
            connections_open: state.connections.len() as u64,
            put_tokens_accepted: state.put_tokens_accepted,
            put_tokens_refused: state.put_tokens_refused,
            management_requests: state.management_requests,
            attaches_refused: state.attaches_refused,
            entities,
            pending_faults: state
                .faults
                .iter()
                .filter(|(_, faults)| !faults.is_empty())
                .map(|(key, faults)| (key.clone(), faults.iter().map(AmqpFaultSpec::from).collect()))
                .collect(),
        }
    }

    pub fn publish(
        &self,
        namespace: &str,
        hub: &str,
        partition_key: Option<&str>,
        encoded: &[Vec<u8>],
    ) -> Result<usize, String> {
        let ns = self.namespace_named(namespace).ok_or_else(|| format!("no namespace {namespace:?}"))?;
        let hub = ns.hub(hub).ok_or_else(|| format!("no event hub {hub:?} in {namespace}"))?;
        let messages = encoded
            .iter()
            .map(|bytes| {
                Body::<Value>::decode_message_from_reader(serde_amqp::read::SliceReader::new(bytes))
                    .map_err(|e| format!("not an encoded AMQP message: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(hub.assign(partition_key).append(messages))
    }

    pub fn stored(&self, namespace: &str, entity: &str) -> Vec<StoredMessage> {
        let Some(namespace) = self.namespace_named(namespace) else { return Vec::new() };
        let address = Address::parse(entity);
        match namespace.resolve(&address.segments) {
            Ok(Entity::Hub { hub, partition: None }) => {
                hub.partitions.iter().flat_map(|p| p.snapshot()).collect()
            }
            Ok(Entity::Hub { partition: Some(partition), .. })
            | Ok(Entity::HubPartitionReader { partition, .. }) => partition.snapshot(),
            Ok(Entity::Queue { queue, .. }) => queue.snapshot(),
            Ok(Entity::Topic(topic)) => topic.snapshot(),
            Err(_) => Vec::new(),
        }
    }
}

/// Every problem in a configuration.
fn validate(config: &AmqpConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if config.namespaces.is_empty() {
        problems.push("no namespaces configured".to_owned());
    }
    if config.max_message_size == 0 {
        problems.push("max_message_size must be above 0".to_owned());
    }
    let mut hosts = Vec::new();
    for ns in &config.namespaces {
        let host = ns.host.to_ascii_lowercase();
        if host.is_empty() || host.contains(['/', ':', ' ']) {
            problems.push(format!("namespace host {:?} is not a host name", ns.host));
        }
        if hosts.contains(&host) {
            problems.push(format!("namespace {host} is configured twice"));
        }
        hosts.push(host.clone());
        let mut names: Vec<String> = Vec::new();
        let mut name = |kind: &str, entity: &str| {
            let lower = entity.to_ascii_lowercase();
            if entity.is_empty() || entity.contains(['/', ' ']) || lower.starts_with('$') {
                problems.push(format!("{kind} name {entity:?} in {host} is not a valid entity name"));
            } else if names.contains(&lower) {
                problems.push(format!("entity name {entity:?} is used twice in {host}"));
            }
            names.push(lower);
        };
        for hub in &ns.hubs {
            name("hub", &hub.name);
        }
        for queue in &ns.queues {
            name("queue", queue);
        }
        for topic in &ns.topics {
            name("topic", &topic.name);
        }
        for hub in &ns.hubs {
            if !(1..=1024).contains(&hub.partition_count) {
                problems.push(format!(
                    "hub {} in {host} needs 1 to 1024 partitions, not {}",
                    hub.name, hub.partition_count
                ));
            }
        }
        for topic in &ns.topics {
            let mut subs: Vec<String> = Vec::new();
            for sub in &topic.subscriptions {
                let lower = sub.to_ascii_lowercase();
                if sub.is_empty() || sub.contains(['/', ' ']) || subs.contains(&lower) {
                    problems.push(format!(
                        "subscription {sub:?} of topic {} in {host} is empty, invalid or repeated",
                        topic.name
                    ));
                }
                subs.push(lower);
            }
        }
    }
    problems
}

/// Accepts connections until aborted; dropping the `JoinSet` aborts the connection tasks (the
/// sockets themselves are stopped through their kill switches).
pub(crate) async fn accept_loop(listener: TcpListener, broker: Arc<Broker>) {
    let acceptor = Arc::new(
        ConnectionAcceptor::builder()
            .container_id(CONTAINER_ID)
            .max_frame_size(MAX_FRAME_SIZE)
            .sasl_acceptor(AnonymousOrPlain)
            .build(),
    );
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, broker.clone(), acceptor.clone()));
                }
                // Out of file descriptors and the like: let the pressure drop rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One client connection: what it is allowed, which namespace it talks to.
struct Conn {
    id: u64,
    broker: Arc<Broker>,
    /// From the `open` hostname, or the first namespace.
    namespace: Arc<Namespace>,
    grants: Mutex<Grants>,
    kill: Arc<KillSwitch>,
    /// Reply links of the whole connection, for requests whose session has none that matches.
    replies: ReplyRoutes,
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    acceptor: Arc<ConnectionAcceptor<(), AnonymousOrPlain>>,
) {
    // Small request/response exchanges (CBS, management): don't let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let kill = Arc::new(KillSwitch::default());
    let hostname = Arc::new(Mutex::new(None));
    let mut connection =
        match acceptor.accept(ClientStream::new(stream, kill.clone(), hostname.clone())).await {
            Ok(connection) => connection,
            Err(error) => {
                debug!(%peer, %error, "AMQP connection failed before open");
                return;
            }
        };
    let hostname = lock(&hostname).clone();
    let namespace =
        hostname.as_deref().and_then(|h| broker.namespace_named(h)).unwrap_or(&broker.namespaces[0]).clone();
    let id = broker.register_connection(kill.clone());
    debug!(connection = id, %peer, ?hostname, namespace = namespace.host(), "AMQP connection opened");
    let conn = Arc::new(Conn {
        id,
        broker: broker.clone(),
        namespace,
        grants: Mutex::default(),
        kill: kill.clone(),
        replies: ReplyRoutes::default(),
    });
    let sessions = SessionAcceptor::new();
    while let Ok(session) = sessions.accept(&mut connection).await {
        tokio::spawn(serve_session(session, conn.clone()));
    }
    if !kill.is_killed() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close()).await;
    }
    lock(&broker.state).connections.remove(&id);
    debug!(connection = id, dropped = kill.is_killed(), "AMQP connection closed");
}

type Links = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

async fn serve_session(mut session: ListenerSessionHandle, conn: Arc<Conn>) {
    let routes = Arc::new(ReplyRoutes::default());
    // Every link advertises the size limit: the Event Hubs SDK sizes batches from it and fails
    // to create one without it.
    let links: Links = LinkAcceptor::builder().max_message_size(conn.broker.config.max_message_size).build();
    while let Some(attach) = session.next_incoming_attach().await {
        on_attach(attach, &mut session, &links, &conn, &routes).await;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.end()).await;
}

/// What a client sender link is for.
enum Inbound {
    Requests(RequestNode),
    Entity(InboundTarget),
}

#[derive(Debug, Clone, Copy)]
enum RequestNode {
    Cbs,
    Management,
}

/// Where a client sender's messages go.
struct InboundTarget {
    namespace: Arc<Namespace>,
    /// Lower-cased path segments, for the token check.
    path: Vec<String>,
    /// `sb://<ns>/<path>`, for errors and logs.
    label: String,
    /// Fault keys, most specific first: the path, then the entity name.
    fault_keys: Vec<String>,
    /// `<ns>/<entity>` for the counters.
    stats_key: String,
    destination: Destination,
}

enum Destination {
    Hub { hub: Arc<Hub>, partition: Option<Arc<Partition>> },
    Queue(Arc<Queue>),
    Topic(Arc<Topic>),
}

/// What a client receiver link is for.
enum Outbound {
    Replies,
    Partition(PartitionReader),
    Queue { queue: Arc<Queue>, namespace: Arc<Namespace>, path: Vec<String>, label: String },
}

struct PartitionReader {
    partition: Arc<Partition>,
    next: usize,
    guard: ReaderGuard,
    namespace: Arc<Namespace>,
    path: Vec<String>,
    label: String,
    stats_key: String,
}

fn error(condition: &str, description: impl Into<String>) -> definitions::Error {
    definitions::Error::new(ErrorCondition::Custom(Symbol::from(condition)), Some(description.into()), None)
}

fn address_of_target(attach: &Attach) -> String {
    match attach.target.as_deref() {
        Some(TargetArchetype::Target(target)) => target.address.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

fn address_of_source(attach: &Attach) -> String {
    attach.source.as_ref().and_then(|s| s.address.clone()).unwrap_or_default()
}

/// The selector text of an Event Hubs start-position filter, if the source carries one.
fn selector_of(attach: &Attach) -> Option<String> {
    let filters = attach.source.as_ref()?.filter.as_ref()?;
    filters.iter().find_map(|(key, value)| {
        let described = match value {
            Value::Described(described) => described,
            _ => return None,
        };
        let is_selector = key.as_str() == SELECTOR_FILTER
            || match &described.descriptor {
                Descriptor::Code(code) => *code == SELECTOR_FILTER_CODE,
                Descriptor::Name(name) => name.as_str() == SELECTOR_FILTER,
            };
        match &described.value {
            Value::String(text) if is_selector => Some(text.clone()),
            _ => None,
        }
    })
}

fn epoch_of(attach: &Attach) -> Option<i64> {
    match attach.properties.as_ref()?.get(&Symbol::from(EPOCH_PROPERTY))? {
        Value::Long(epoch) => Some(*epoch),
        Value::Int(epoch) => Some(i64::from(*epoch)),
        _ => None,
    }
}

async fn on_attach(
    mut attach: Attach,
    session: &mut ListenerSessionHandle,
    links: &Links,
    conn: &Arc<Conn>,
    routes: &Arc<ReplyRoutes>,
) {
    // fe2o3's acceptor refuses a peer that leaves out a terminus; clients do (an
    // azure_core_amqp receiver has no target), and AMQP allows it: give it an empty one.
    if attach.source.is_none() {
        attach.source = Some(Box::default());
    }
    if attach.target.is_none() {
        attach.target = Some(Box::new(TargetArchetype::Target(Target::default())));
    }
    let name = attach.name.clone();
    if attach.role == Role::Sender {
        let address = address_of_target(&attach);
        match conn.plan_inbound(&Address::parse(&address)) {
            Err(refusal) => {
                conn.refused(&name, "sender", &address, &refusal);
                // A null target says "no such terminus"; the detach then says why.
                attach.target = None;
                if let Some(link) = accept_receiver(links, attach, session).await {
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close_with_error(refusal)).await;
                    });
                }
            }
            Ok(plan) => {
                debug!(connection = conn.id, link = %name, %address, "attach: client sender accepted");
                let Some(link) = accept_receiver(links, attach, session).await else { return };
                match plan {
                    Inbound::Requests(node) => {
                        tokio::spawn(serve_requests(link, node, conn.clone(), routes.clone()));
                    }
                    Inbound::Entity(target) => {
                        tokio::spawn(serve_inbound(link, target, conn.clone()));
                    }
                }
            }
        }
        return;
    }

    let address = address_of_source(&attach);
    let reply_key =
        Some(address_of_target(&attach)).filter(|a| !a.is_empty()).unwrap_or_else(|| name.clone());
    let peek_lock = attach.snd_settle_mode != SenderSettleMode::Settled;
    let plan = conn.plan_outbound(&Address::parse(&address), &name, selector_of(&attach), epoch_of(&attach));
    match plan {
        Err(refusal) => {
            conn.refused(&name, "receiver", &address, &refusal);
            attach.source = None;
            if let Some(link) = accept_sender(links, attach, session).await {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close_with_error(refusal)).await;
                });
            }
        }
        Ok(plan) => {
            debug!(connection = conn.id, link = %name, %address, peek_lock, "attach: client receiver accepted");
            let Some(link) = accept_sender(links, attach, session).await else { return };
            match plan {
                Outbound::Replies => {
                    let (tx, rx) = mpsc::channel(16);
                    routes.insert(&reply_key, tx.clone());
                    conn.replies.insert(&reply_key, tx.clone());
                    tokio::spawn(serve_replies(link, rx, tx, reply_key, routes.clone(), conn.clone()));
                }
                Outbound::Partition(reader) => {
                    tokio::spawn(serve_partition_reader(link, reader, conn.clone()));
                }
                Outbound::Queue { queue, namespace, path, label } => {
                    let reader = QueueReader { queue, peek_lock, namespace, path, label };
                    tokio::spawn(serve_queue_reader(link, reader, conn.clone()));
                }
            }
        }
    }
}

async fn accept_receiver(
    links: &Links,
    attach: Attach,
    session: &mut ListenerSessionHandle,
) -> Option<Receiver> {
    match links.accept_incoming_attach(attach, session).await {
        Ok(LinkEndpoint::Receiver(link)) => Some(link),
        Ok(LinkEndpoint::Sender(_)) => None,
        Err(error) => {
            debug!(?error, "attach of a client sender failed");
            None
        }
    }
}

async fn accept_sender(links: &Links, attach: Attach, session: &mut ListenerSessionHandle) -> Option<Sender> {
    match links.accept_incoming_attach(attach, session).await {
        Ok(LinkEndpoint::Sender(link)) => Some(link),
        Ok(LinkEndpoint::Receiver(_)) => None,
        Err(error) => {
            debug!(?error, "attach of a client receiver failed");
            None
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Conn {
    /// The namespace an address names: its host if that is a configured namespace, else the
    /// connection's (bare addresses, `sb://127.0.0.1:5672/...` emulator addresses).
    fn namespace_of(&self, address: &Address) -> Arc<Namespace> {
        address
            .host
            .as_deref()
            .and_then(|h| self.broker.namespace_named(h))
            .unwrap_or(&self.namespace)
            .clone()
    }

    fn refused(&self, name: &str, role: &str, address: &str, refusal: &definitions::Error) {
        self.broker.count(|s| s.attaches_refused += 1);
        debug!(
            connection = self.id,
            link = %name,
            role,
            %address,
            condition = ?refusal.condition,
            description = refusal.description.as_deref().unwrap_or(""),
            "attach refused"
        );
    }

    /// Whether a link on `path` is covered by an unexpired put-token.
    fn authorize(
        &self,
        namespace: &Namespace,
        path: &[String],
        label: &str,
    ) -> Result<(), definitions::Error> {
        lock(&self.grants).check(namespace.host(), path, now_secs()).map_err(|reason| {
            error(
                UNAUTHORIZED,
                format!("Unauthorized access to '{label}': {reason}. Put a token for it on $cbs first."),
            )
        })
    }

    fn plan_inbound(&self, address: &Address) -> Result<Inbound, definitions::Error> {
        let lowered = address.lowered();
        match lowered.last().map(String::as_str) {
            Some("$cbs") if lowered.len() == 1 => return Ok(Inbound::Requests(RequestNode::Cbs)),
            Some("$management") => return Ok(Inbound::Requests(RequestNode::Management)),
            _ => {}
        }
        let namespace = self.namespace_of(address);
        let label = address.label(namespace.host());
        let entity = namespace.resolve(&address.segments).map_err(|d| error(NOT_FOUND, d))?;
        let (entity_name, destination) = match entity {
            Entity::Hub { hub, partition } => (hub.name.clone(), Destination::Hub { hub, partition }),
            Entity::Queue { queue, sendable: true } => (queue.path.clone(), Destination::Queue(queue)),
            Entity::Topic(topic) => (topic.name.clone(), Destination::Topic(topic)),
            Entity::Queue { .. } | Entity::HubPartitionReader { .. } => {
                return Err(error(
                    NOT_ALLOWED,
                    format!("Cannot send to '{label}': it can only be received from."),
                ))
            }
        };
        self.authorize(&namespace, &lowered, &label)?;
        let fault_keys = vec![lowered.join("/"), entity_name.to_ascii_lowercase()];
        let stats_key = format!("{}/{entity_name}", namespace.host());
        Ok(Inbound::Entity(InboundTarget {
            namespace,
            path: lowered,
            label,
            fault_keys,
            stats_key,
            destination,
        }))
    }

    fn plan_outbound(
        &self,
        address: &Address,
        link_name: &str,
        selector: Option<String>,
        epoch: Option<i64>,
    ) -> Result<Outbound, definitions::Error> {
        let lowered = address.lowered();
        if matches!(lowered.last().map(String::as_str), Some("$cbs" | "$management")) {
            return Ok(Outbound::Replies);
        }
        let namespace = self.namespace_of(address);
        let label = address.label(namespace.host());
        match namespace.resolve(&address.segments).map_err(|d| error(NOT_FOUND, d))? {
            Entity::HubPartitionReader { hub, group, partition } => {
                self.authorize(&namespace, &lowered, &label)?;
                let start = match &selector {
                    Some(text) => selector::parse(text).map_err(|d| error(INVALID_FIELD, d))?,
                    // No filter: the start of the stream.
                    None => StartAt::Offset { offset: -1, inclusive: false },
                };
                let guard =
                    partition.register_reader(&group, epoch, link_name).map_err(|d| error(LINK_STOLEN, d))?;
                let next = partition.start_index(&start);
                debug!(connection = self.id, %label, ?selector, ?start, next, ?epoch, "partition reader");
                let stats_key = format!("{}/{}", namespace.host(), hub.name);
                Ok(Outbound::Partition(PartitionReader {
                    partition,
                    next,
                    guard,
                    namespace,
                    path: lowered,
                    label,
                    stats_key,
                }))
            }
            Entity::Queue { queue, .. } => {
                self.authorize(&namespace, &lowered, &label)?;
                Ok(Outbound::Queue { queue, namespace, path: lowered, label })
            }
            Entity::Hub { .. } => Err(error(
                NOT_ALLOWED,
                format!("Cannot receive from '{label}': read <hub>/ConsumerGroups/<group>/Partitions/<id>."),
            )),
            Entity::Topic(_) => Err(error(
                NOT_ALLOWED,
                format!("Cannot receive from topic '{label}': read <topic>/Subscriptions/<subscription>."),
            )),
        }
    }

    /// Answers a `$cbs` request.
    fn put_token(&self, request: &AmqpMessage) -> AmqpMessage {
        let property = |name: &str| string_property(request, name);
        if property("operation") != Some("put-token") {
            let operation = property("operation").unwrap_or("");
            return response(
                400,
                &format!("Unsupported $cbs operation '{operation}'; only put-token is."),
                None,
            );
        }
        let token_type = property("type").unwrap_or("");
        let Some(audience) = property("name") else {
            return self.token_refused(
                400,
                "put-token needs the audience in the 'name' property.",
                "",
                token_type,
            );
        };
        let token = match &request.body {
            Body::Value(AmqpValue(Value::String(token))) => token.as_str(),
            _ => {
                return self.token_refused(
                    400,
                    "put-token needs the token as a string body.",
                    audience,
                    token_type,
                )
            }
        };
        let address = Address::parse(audience);
        let namespace = self.namespace_of(&address);
        let resource = address.label(namespace.host());
        let jwt_audience = match address.segments.first() {
            None => JwtAudience::Either,
            Some(first) => match namespace.is_hub(first) {
                Some(true) => JwtAudience::EventHubs,
                Some(false) => JwtAudience::ServiceBus,
                None => {
                    let description = format!("The messaging entity '{resource}' could not be found.");
                    return self.token_refused(404, &description, audience, token_type);
                }
            },
        };
        let check = TokenCheck { token_type, token, audience, jwt_audience, resource: &resource };
        match auth::verify(&check, &namespace.def, &self.broker.config.jwt_signing_key, now_secs()) {
            Ok(verified) => {
                let mut path = address.lowered();
                if path.last().is_some_and(|s| s == "$management") {
                    path.pop();
                }
                debug!(
                    connection = self.id,
                    audience,
                    token_type,
                    token = %auth::redact(token),
                    principal = %verified.principal,
                    expires_at = verified.expires_at,
                    "put-token accepted"
                );
                lock(&self.grants).insert(Grant {
                    namespace: namespace.host().to_owned(),
                    path,
                    expires_at: verified.expires_at,
                    principal: verified.principal,
                });
                self.broker.count(|s| s.put_tokens_accepted += 1);
                response(202, "Accepted", None)
            }
            Err(refusal) => {
                debug!(connection = self.id, token = %auth::redact(token), "refused token");
                self.token_refused(refusal.status, &refusal.description, audience, token_type)
            }
        }
    }

    fn token_refused(&self, status: i32, description: &str, audience: &str, token_type: &str) -> AmqpMessage {
        self.broker.count(|s| s.put_tokens_refused += 1);
        debug!(connection = self.id, audience, token_type, status, description, "put-token refused");
        response(status, description, None)
    }

    /// Answers a `$management` request: READ of an event hub or a partition.
    fn management(&self, request: &AmqpMessage) -> AmqpMessage {
        self.broker.count(|s| s.management_requests += 1);
        let property = |name: &str| string_property(request, name);
        let (operation, kind, name) = (
            property("operation").unwrap_or(""),
            property("type").unwrap_or(""),
            property("name").unwrap_or(""),
        );
        let token = property("security_token");
        debug!(
            connection = self.id,
            operation,
            r#type = kind,
            name,
            partition = property("partition"),
            token = token.map(auth::redact),
            "management request"
        );
        if operation != "READ" {
            let description = format!(
                "The stand-in implements only READ of com.microsoft:eventhub and com.microsoft:partition, not '{operation}'."
            );
            return response(501, &description, None);
        }
        let namespace = &self.namespace;
        let resource = format!("sb://{}/{name}", namespace.host());
        let Some(hub) = namespace.hub(name) else {
            return response(404, &format!("The messaging entity '{resource}' could not be found."), None);
        };
        let now = now_secs();
        let authorized = match token {
            Some(token) => {
                let audience = format!("amqps://{}/{}", namespace.host(), hub.name);
                let check = TokenCheck {
                    token_type: "",
                    token,
                    audience: &audience,
                    jwt_audience: JwtAudience::EventHubs,
                    resource: &resource,
                };
                auth::verify(&check, &namespace.def, &self.broker.config.jwt_signing_key, now)
                    .map(|_| ())
                    .map_err(|refusal| refusal.description)
            }
            None => lock(&self.grants)
                .check_entity(namespace.host(), &hub.name.to_ascii_lowercase(), now)
                .map_err(|reason| format!("Unauthorized access to '{resource}': {reason}.")),
        };
        if let Err(description) = authorized {
            return response(401, &description, None);
        }
        let mut body = OrderedMap::new();
        let mut put = |key: &str, value: Value| {
            body.insert(Value::String(key.to_owned()), value);
        };
        match kind {
            "com.microsoft:eventhub" => {
                put("name", Value::String(hub.name.clone()));
                put("type", Value::String(kind.to_owned()));
                put("created_at", Value::Timestamp(Timestamp::from_milliseconds(hub.created_at)));
                put("partition_count", Value::Int(hub.partitions.len() as i32));
                let ids: Vec<Value> = hub.partitions.iter().map(|p| Value::String(p.id.clone())).collect();
                put("partition_ids", Value::Array(Array::from(ids)));
            }
            "com.microsoft:partition" => {
                let id = property("partition").unwrap_or("");
                let Some(partition) = hub.partition(id) else {
                    let description = format!("Partition '{id}' of '{resource}' could not be found.");
                    return response(404, &description, None);
                };
                let info = partition.info();
                put("name", Value::String(hub.name.clone()));
                put("type", Value::String(kind.to_owned()));
                put("partition", Value::String(partition.id.clone()));
                put("begin_sequence_number", Value::Long(info.begin_sequence_number));
                put("last_enqueued_sequence_number", Value::Long(info.last_sequence_number));
                put("last_enqueued_sequence_number_epoch", Value::Long(0));
                put("last_enqueued_offset", Value::String(info.last_offset));
                put(
                    "last_enqueued_time_utc",
                    Value::Timestamp(Timestamp::from_milliseconds(info.last_enqueued_ms)),
                );
                put("is_partition_empty", Value::Bool(info.is_empty));
            }
            other => {
                let description = format!(
                    "Unknown entity type '{other}'; READ supports com.microsoft:eventhub and com.microsoft:partition."
                );
                return response(400, &description, None);
            }
        }
        response(200, "OK", Some(body))
    }
}

fn string_property<'m>(message: &'m AmqpMessage, name: &str) -> Option<&'m str> {
    match message.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::String(value) => Some(value),
        SimpleValue::Symbol(value) => Some(value.as_str()),
        _ => None,
    }
}

/// A management/CBS response: `status-code`, `status-description` and an AMQP-value body.
fn response(status: i32, description: &str, body: Option<OrderedMap<Value, Value>>) -> AmqpMessage {
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: None,
        application_properties: Some(
            ApplicationProperties::builder()
                .insert("status-code", SimpleValue::Int(status))
                .insert("status-description", description)
                .build(),
        ),
        body: Body::Value(AmqpValue(body.map_or(Value::Null, Value::Map))),
        footer: None,
    }
}

/// Reply links by the address requests name in `reply-to`.
#[derive(Default)]
struct ReplyRoutes {
    links: Mutex<HashMap<String, mpsc::Sender<AmqpMessage>>>,
    /// Bumped on every insert, for requests waiting for their reply link.
    inserted: watch::Sender<u64>,
}

impl ReplyRoutes {
    fn insert(&self, key: &str, tx: mpsc::Sender<AmqpMessage>) {
        lock(&self.links).insert(key.to_owned(), tx);
        self.inserted.send_modify(|v| *v += 1);
    }

    fn remove(&self, key: &str, tx: &mpsc::Sender<AmqpMessage>) {
        let mut links = lock(&self.links);
        if links.get(key).is_some_and(|current| current.same_channel(tx)) {
            links.remove(key);
        }
    }

    fn get(&self, key: &str) -> Option<mpsc::Sender<AmqpMessage>> {
        lock(&self.links).get(key).cloned()
    }

    /// The reply link for `key`, waiting up to `wait` for it to attach.
    async fn wait_for(&self, key: &str, wait: Duration) -> Option<mpsc::Sender<AmqpMessage>> {
        let mut inserted = self.inserted.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(tx) = self.get(key) {
                return Some(tx);
            }
            if tokio::time::timeout_at(deadline, inserted.changed()).await.is_err() {
                return None;
            }
        }
    }
}

/// Echoes a peer's detach on a receiver link (close for close), or else the peer's `close()`
/// never returns.
async fn end_receiver(link: Receiver, error: RecvError) {
    match error {
        RecvError::LinkStateError(
            LinkStateError::RemoteClosed | LinkStateError::RemoteClosedWithError(_),
        ) => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close()).await;
        }
        RecvError::LinkStateError(
            LinkStateError::RemoteDetached | LinkStateError::RemoteDetachedWithError(_),
        ) => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.detach()).await;
        }
        // The session or connection is gone: nothing to answer.
        _ => {}
    }
}

/// The same for a sender link, after `on_detach`.
async fn end_sender(link: Sender, error: DetachError) {
    match error {
        DetachError::ClosedByRemote | DetachError::RemoteClosedWithError(_) => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close()).await;
        }
        DetachError::DetachedByRemote | DetachError::RemoteDetachedWithError(_) => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.detach()).await;
        }
        _ => {}
    }
}

/// Requests on `$cbs` or `$management`: each is accepted, answered, and the answer sent to the
/// reply link its `reply-to` names, with `correlation-id` = its message-id.
async fn serve_requests(mut link: Receiver, node: RequestNode, conn: Arc<Conn>, routes: Arc<ReplyRoutes>) {
    loop {
        let delivery = match link.recv::<Body<Value>>().await {
            Ok(delivery) => delivery,
            Err(error) => return end_receiver(link, error).await,
        };
        let _ = link.accept(&delivery).await;
        let request = delivery.into_message();
        let mut answer = match node {
            RequestNode::Cbs => conn.put_token(&request),
            RequestNode::Management => conn.management(&request),
        };
        let properties = request.properties.unwrap_or_default();
        answer.properties =
            Some(Properties { correlation_id: properties.message_id, ..Properties::default() });
        let reply_to = properties.reply_to.unwrap_or_default();
        let route = match routes.wait_for(&reply_to, REPLY_LINK_WAIT).await {
            Some(tx) => Some(tx),
            None => conn.replies.get(&reply_to),
        };
        match route {
            Some(tx) => {
                let _ = tx.send(answer).await;
            }
            None => {
                debug!(connection = conn.id, ?node, %reply_to, "no reply link matches reply-to; answer dropped")
            }
        }
    }
}

/// Carries answers to a client's reply link until either side detaches.
async fn serve_replies(
    mut link: Sender,
    mut answers: mpsc::Receiver<AmqpMessage>,
    tx: mpsc::Sender<AmqpMessage>,
    key: String,
    routes: Arc<ReplyRoutes>,
    conn: Arc<Conn>,
) {
    loop {
        tokio::select! {
            answer = answers.recv() => {
                let Some(answer) = answer else { break };
                let sendable = Sendable::builder().message(answer).settled(true).build();
                if link.send_batchable(sendable).await.is_err() {
                    break;
                }
            }
            error = link.on_detach() => {
                end_sender(link, error).await;
                break;
            }
        }
    }
    routes.remove(&key, &tx);
    conn.replies.remove(&key, &tx);
}

/// The partition key a transfer carries (on a batch, the envelope's, else its first event's).
fn partition_key(message: &AmqpMessage) -> Option<String> {
    match store::annotation(message, store::PARTITION_KEY)? {
        Value::String(key) => Some(key.clone()),
        Value::Symbol(key) => Some(key.as_str().to_owned()),
        _ => None,
    }
}

/// The messages a transfer carries: itself, or each Data section of a batch decoded.
fn unpack(format: Option<u32>, message: AmqpMessage) -> Result<Vec<AmqpMessage>, String> {
    if format != Some(BATCH_MESSAGE_FORMAT) {
        return Ok(vec![message]);
    }
    let Body::Data(sections) = message.body else {
        return Err(
            "A batch (message-format 0x80013700) must carry Data sections, one encoded message each.".into(),
        );
    };
    sections
        .into_iter()
        .enumerate()
        .map(|(i, section)| {
            Body::<Value>::decode_message_from_reader(serde_amqp::read::SliceReader::new(&section.0))
                .map_err(|e| format!("Batch section {i} is not an encoded AMQP message: {e}."))
        })
        .collect()
}

/// A client sender to a hub, partition, queue or topic.
async fn serve_inbound(mut link: Receiver, target: InboundTarget, conn: Arc<Conn>) {
    let broker = conn.broker.clone();
    let max = broker.config.max_message_size;
    loop {
        let delivery = match link.recv::<Body<Value>>().await {
            Ok(delivery) => delivery,
            Err(error) => {
                trace!(connection = conn.id, target = %target.label, ?error, "sender link ended");
                return end_receiver(link, error).await;
            }
        };
        let format = *delivery.message_format();
        let (info, message) = delivery.into_parts();
        let delivery_id = info.delivery_id();
        // Tokens expire; the service stops taking messages when the link's token has.
        if let Err(refusal) = conn.authorize(&target.namespace, &target.path, &target.label) {
            let description = refusal.description.clone().unwrap_or_default();
            reject(&link, info, &target, UNAUTHORIZED, description, &conn).await;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close_with_error(refusal)).await;
            return;
        }
        match broker.take_fault(&target.fault_keys) {
            None => {}
            Some(AmqpFault::Delay(delay)) => {
                debug!(connection = conn.id, target = %target.label, ?delay, "fault: delaying settlement");
                tokio::time::sleep(delay).await;
            }
            Some(AmqpFault::Reject { condition, description }) => {
                reject(&link, info, &target, &condition, description, &conn).await;
                continue;
            }
            Some(AmqpFault::DetachLink) => {
                let description = "Injected fault: the stand-in detached the link.".to_owned();
                reject(&link, info, &target, DETACH_FORCED, description.clone(), &conn).await;
                let _ = tokio::time::timeout(
                    CLOSE_TIMEOUT,
                    link.close_with_error(error(DETACH_FORCED, description)),
                )
                .await;
                return;
            }
            Some(AmqpFault::DropConnection) => {
                debug!(connection = conn.id, target = %target.label, delivery_id, "fault: dropping the connection");
                conn.kill.kill();
                return;
            }
        }
        let size = store::encoded_size(&message) as u64;
        if size > max {
            let description = format!(
                "The received message (delivery-id:{delivery_id}, size:{size} bytes) exceeds the limit ({max} bytes) \
                 currently allowed on the link."
            );
            reject(&link, info, &target, MESSAGE_SIZE_EXCEEDED, description, &conn).await;
            continue;
        }
        let key = partition_key(&message);
        let messages = match unpack(format, message) {
            Ok(messages) => messages,
            Err(description) => {
                reject(&link, info, &target, DECODE_ERROR, description, &conn).await;
                continue;
            }
        };
        let count = messages.len();
        if let Some(hook) = &broker.config.receipt_hook {
            let values: Vec<Option<&str>> =
                messages.iter().map(|m| string_property(m, &hook.property)).collect();
            (hook.callback)(&target.stats_key, &values);
        }
        let placed = match &target.destination {
            Destination::Hub { hub, partition } => {
                let key = key.or_else(|| messages.first().and_then(partition_key));
                let partition = partition.as_ref().unwrap_or_else(|| hub.assign(key.as_deref()));
                partition.append(messages);
                format!("partition {}", partition.id)
            }
            Destination::Queue(queue) => {
                let now = store::now_millis();
                for message in messages {
                    queue.enqueue(message, None, now);
                }
                queue.path.clone()
            }
            Destination::Topic(topic) => {
                for message in messages {
                    topic.publish(message);
                }
                format!("{} subscription(s)", topic.subscriptions.len())
            }
        };
        let _ = link.accept(info).await;
        broker.count_entity(&target.stats_key, |s| s.transfers_accepted += 1);
        trace!(connection = conn.id, target = %target.label, delivery_id, size, count, %placed, "transfer accepted");
    }
}

/// Settles a transfer as Rejected and counts it.
async fn reject(
    link: &Receiver,
    info: DeliveryInfo,
    target: &InboundTarget,
    condition: &str,
    description: String,
    conn: &Conn,
) {
    conn.broker.count_entity(&target.stats_key, |s| s.transfers_rejected += 1);
    let delivery_id = info.delivery_id();
    debug!(connection = conn.id, target = %target.label, delivery_id, condition, %description, "transfer rejected");
    let _ = link.reject(info, error(condition, description)).await;
}

/// A client receiver on a hub partition: stored events from the start position, then new ones.
async fn serve_partition_reader(mut link: Sender, reader: PartitionReader, conn: Arc<Conn>) {
    let PartitionReader { partition, mut next, guard, namespace, path, label, stats_key } = reader;
    let mut appended = partition.watch();
    loop {
        appended.borrow_and_update();
        while let Some(event) = partition.get(next) {
            if let Err(refusal) = conn.authorize(&namespace, &path, &label) {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close_with_error(refusal)).await;
                return;
            }
            // Event Hubs deliveries need no settlement: sent pre-settled where the link allows.
            let sendable = Sendable::builder().message(event.message).settled(true).build();
            if link.send_batchable(sendable).await.is_err() {
                return;
            }
            trace!(connection = conn.id, source = %label, sequence_number = event.sequence_number, "event delivered");
            next += 1;
            conn.broker.count_entity(&stats_key, |s| s.messages_delivered += 1);
        }
        tokio::select! {
            changed = appended.changed() => if changed.is_err() { return },
            error = link.on_detach() => return end_sender(link, error).await,
            () = guard.slot.kick.notified() => {
                let description = lock(&guard.slot.stolen_by).clone().unwrap_or_default();
                debug!(connection = conn.id, source = %label, %description, "reader displaced");
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close_with_error(error(LINK_STOLEN, description))).await;
                return;
            }
        }
    }
}

struct QueueReader {
    queue: Arc<Queue>,
    peek_lock: bool,
    namespace: Arc<Namespace>,
    path: Vec<String>,
    label: String,
}

/// A client receiver on a queue or subscription: competing consumers, in order.
async fn serve_queue_reader(mut link: Sender, reader: QueueReader, conn: Arc<Conn>) {
    let QueueReader { queue, peek_lock, namespace, path, label } = reader;
    let mut changed = queue.watch();
    loop {
        changed.borrow_and_update();
        while let Some(item) = queue.take(peek_lock) {
            if let Err(refusal) = conn.authorize(&namespace, &path, &label) {
                if peek_lock {
                    queue.settle(item, Settlement::Abandon);
                }
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.close_with_error(refusal)).await;
                return;
            }
            let sequence_number = item.sequence_number;
            let message =
                if peek_lock { store::with_lock_annotation(&item.message) } else { item.message.clone() };
            let sendable = Sendable::builder().message(message).settled(!peek_lock).build();
            match link.send_batchable(sendable).await {
                Ok(outcome) if peek_lock => {
                    let queue = queue.clone();
                    // The consumer settles whenever it likes; the link keeps sending meanwhile.
                    tokio::spawn(async move {
                        let how = match outcome.await {
                            Ok(Outcome::Accepted(_)) => Settlement::Complete,
                            Ok(Outcome::Rejected(_)) => Settlement::DeadLetter,
                            Ok(Outcome::Modified(modified)) if modified.delivery_failed == Some(true) => {
                                Settlement::AbandonFailed
                            }
                            // Released, Modified, or the link went away unsettled (lock lost).
                            _ => Settlement::Abandon,
                        };
                        trace!(sequence_number, ?how, "peek-locked message settled");
                        queue.settle(item, how);
                    });
                }
                Ok(_) => {}
                Err(error) => {
                    debug!(connection = conn.id, source = %label, ?error, "delivery failed; message kept");
                    if peek_lock {
                        queue.settle(item, Settlement::Abandon);
                    } else {
                        // Taken for receive-and-delete but never sent: put it back.
                        queue.settle_unsent(item);
                    }
                    return;
                }
            }
            trace!(connection = conn.id, source = %label, sequence_number, peek_lock, "message delivered");
        }
        tokio::select! {
            result = changed.changed() => if result.is_err() { return },
            error = link.on_detach() => return end_sender(link, error).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::{HubDef, NamespaceDef};
    use fe2o3_amqp_types::messaging::{Data, Source};
    use serde_amqp::described::Described;
    use serde_amqp::primitives::Binary;

    fn message(body: &[u8]) -> AmqpMessage {
        AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: None,
            application_properties: None,
            body: Body::Data(vec![Data(Binary::from(body.to_vec()))].into()),
            footer: None,
        }
    }

    #[test]
    fn configuration_problems_are_all_reported() {
        assert!(validate(&AmqpConfig::default()).is_empty());
        let mut ns = NamespaceDef::default();
        ns.hubs.push(HubDef { name: "TWIN-QUEUE".into(), partition_count: 0 });
        ns.queues.push("a/b".into());
        let config = AmqpConfig {
            namespaces: vec![ns.clone(), ns, NamespaceDef::new("")],
            max_message_size: 0,
            ..AmqpConfig::default()
        };
        let problems = validate(&config).join("\n");
        for expected in
            ["max_message_size", "configured twice", "used twice", "1 to 1024", "\"a/b\"", "\"\" is not"]
        {
            assert!(problems.contains(expected), "{expected:?} missing from:\n{problems}");
        }
        assert!(validate(&AmqpConfig { namespaces: vec![], ..AmqpConfig::default() })[0]
            .contains("no namespaces"));
    }

    #[test]
    fn batches_unpack_into_their_messages() {
        use fe2o3_amqp_types::messaging::message::__private::Serializable;
        let inner: Vec<Data> = (0..3u8)
            .map(|i| Data(Binary::from(serde_amqp::to_vec(&Serializable(message(&[i]))).unwrap())))
            .collect();
        let envelope = AmqpMessage { body: Body::Data(inner.into()), ..message(b"") };
        let unpacked = unpack(Some(BATCH_MESSAGE_FORMAT), envelope.clone()).unwrap();
        assert_eq!(unpacked, vec![message(&[0]), message(&[1]), message(&[2])]);
        // Without the batch format, the same transfer is one message.
        assert_eq!(unpack(None, envelope.clone()).unwrap(), vec![envelope]);
        let garbage = AmqpMessage {
            body: Body::Data(vec![Data(Binary::from(vec![0xff, 0x00]))].into()),
            ..message(b"")
        };
        assert!(unpack(Some(BATCH_MESSAGE_FORMAT), garbage).unwrap_err().contains("section 0"));
        let value = AmqpMessage { body: Body::Value(AmqpValue(Value::Null)), ..message(b"") };
        assert!(unpack(Some(BATCH_MESSAGE_FORMAT), value).unwrap_err().contains("Data sections"));
    }

    #[test]
    fn attach_details() {
        let filter = |key: &str, descriptor: Descriptor| {
            let mut filters = fe2o3_amqp_types::messaging::FilterSet::new();
            let value =
                Described { descriptor, value: Value::String("amqp.annotation.x-opt-offset > '-1'".into()) };
            filters.insert(Symbol::from(key), Value::Described(Box::new(value)));
            Source { filter: Some(filters), ..Source::default() }
        };
        let attach = |source: Source| Attach {
            name: "l".into(),
            handle: 0.into(),
            role: Role::Receiver,
            snd_settle_mode: SenderSettleMode::Mixed,
            rcv_settle_mode: Default::default(),
            source: Some(Box::new(source)),
            target: None,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let by_code = attach(filter("x", Descriptor::Code(SELECTOR_FILTER_CODE)));
        assert_eq!(selector_of(&by_code).as_deref(), Some("amqp.annotation.x-opt-offset > '-1'"));
        let by_key = attach(filter(SELECTOR_FILTER, Descriptor::Code(1)));
        assert!(selector_of(&by_key).is_some());
        let other = attach(filter("x", Descriptor::Code(1)));
        assert_eq!(selector_of(&other), None);
        assert_eq!(address_of_target(&other), "");

        let mut with_epoch = attach(Source::default());
        let mut properties = definitions::Fields::default();
        properties.insert(Symbol::from(EPOCH_PROPERTY), Value::Long(7));
        with_epoch.properties = Some(properties);
        assert_eq!(epoch_of(&with_epoch), Some(7));
        assert_eq!(epoch_of(&attach(Source::default())), None);
    }

    #[test]
    fn responses_carry_status_and_description() {
        let answer = response(202, "Accepted", None);
        let properties = &answer.application_properties.as_ref().unwrap().0;
        assert_eq!(properties.get("status-code"), Some(&SimpleValue::Int(202)));
        assert_eq!(properties.get("status-description"), Some(&SimpleValue::String("Accepted".into())));
        assert_eq!(answer.body, Body::Value(AmqpValue(Value::Null)));
        let mut body = OrderedMap::new();
        body.insert(Value::String("name".into()), Value::String("twins".into()));
        assert!(matches!(response(200, "OK", Some(body)).body, Body::Value(AmqpValue(Value::Map(_)))));
    }
}
