//! The entities of a namespace and the messages they hold.
//!
//! - An event hub is a set of partitions; each partition is an append-only log (Event Hubs never
//!   deletes on read) with sequence numbers from 0 and byte offsets, read by any number of
//!   consumers from any position.
//! - A queue, a topic subscription and their dead-letter sub-queues are FIFO queues with
//!   competing consumers; a message leaves when a consumer settles it (receive-and-delete) or
//!   accepts it (peek-lock).
//! - A topic copies each message to every subscription and keeps a log of what it accepted.
//!
//! Consumers wait for new messages on a `watch` channel bumped on every change, so no wake-up is
//! lost between looking and waiting.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{Body, Header, Message, MessageAnnotations};
use fe2o3_amqp_types::primitives::{Symbol, Timestamp, Value};
use tokio::sync::{watch, Notify};

use super::selector::StartAt;
use super::{HubDef, NamespaceDef, StoredMessage, TopicDef};

/// Annotation names the services set or read.
pub(crate) const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
pub(crate) const OFFSET: &str = "x-opt-offset";
pub(crate) const ENQUEUED_TIME: &str = "x-opt-enqueued-time";
pub(crate) const PARTITION_KEY: &str = "x-opt-partition-key";
pub(crate) const LOCKED_UNTIL: &str = "x-opt-locked-until";

/// How long a peek-locked message is said to be locked (`x-opt-locked-until`); the stand-in
/// holds the lock until the consumer settles or its link goes away.
pub(crate) const LOCK_DURATION: Duration = Duration::from_secs(60);

/// The Event Hubs "not set" timestamp (0001-01-01), read as `None` by the Azure SDK.
pub(crate) const TIMESTAMP_NOT_SET_MS: i64 = -62_135_596_800_000;

pub(crate) type AmqpMessage = Message<Body<Value>>;

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A task panicking while holding a lock must not take the stand-in down with it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn millis_to_system_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

pub(crate) fn annotation<'m>(message: &'m AmqpMessage, name: &str) -> Option<&'m Value> {
    message.message_annotations.as_ref()?.0.get(&OwnedKey::Symbol(Symbol::from(name)))
}

fn set_annotation(message: &mut AmqpMessage, name: &str, value: Value) {
    let annotations =
        message.message_annotations.get_or_insert_with(|| MessageAnnotations(Default::default()));
    annotations.0.insert(OwnedKey::Symbol(Symbol::from(name)), value);
}

/// One namespace: its definition and live entities. Names compare case-insensitively.
pub(crate) struct Namespace {
    pub def: NamespaceDef,
    pub hubs: Vec<Arc<Hub>>,
    pub queues: Vec<Arc<Queue>>,
    pub topics: Vec<Arc<Topic>>,
}

/// What a link address names inside a namespace.
pub(crate) enum Entity {
    /// `<hub>` or `<hub>/Partitions/<n>`: where producers send.
    Hub {
        hub: Arc<Hub>,
        partition: Option<Arc<Partition>>,
    },
    /// `<hub>/ConsumerGroups/<group>/Partitions/<n>`: where consumers read (any group exists).
    HubPartitionReader {
        hub: Arc<Hub>,
        group: String,
        partition: Arc<Partition>,
    },
    /// A queue, `<topic>/Subscriptions/<sub>`, or either's `/$DeadLetterQueue`.
    Queue {
        queue: Arc<Queue>,
        sendable: bool,
    },
    Topic(Arc<Topic>),
}

impl Namespace {
    pub fn new(def: NamespaceDef) -> Namespace {
        let created_at = now_millis();
        let hubs = def.hubs.iter().map(|h| Arc::new(Hub::new(h, created_at))).collect();
        let queues = def.queues.iter().map(|q| Arc::new(Queue::with_dead_letter(q.clone()))).collect();
        let topics = def.topics.iter().map(|t| Arc::new(Topic::new(t))).collect();
        Namespace { def, hubs, queues, topics }
    }

    pub fn host(&self) -> &str {
        &self.def.host
    }

    pub fn hub(&self, name: &str) -> Option<&Arc<Hub>> {
        self.hubs.iter().find(|h| h.name.eq_ignore_ascii_case(name))
    }

    pub fn queue(&self, name: &str) -> Option<&Arc<Queue>> {
        self.queues.iter().find(|q| q.path.eq_ignore_ascii_case(name))
    }

    pub fn topic(&self, name: &str) -> Option<&Arc<Topic>> {
        self.topics.iter().find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// Whether `name` is an event hub (`Some(true)`), a queue or topic (`Some(false)`), or nothing.
    pub fn is_hub(&self, name: &str) -> Option<bool> {
        if self.hub(name).is_some() {
            Some(true)
        } else if self.queue(name).is_some() || self.topic(name).is_some() {
            Some(false)
        } else {
            None
        }
    }

    /// Resolves the path segments of a link address; the error is the service's not-found text.
    pub fn resolve(&self, segments: &[String]) -> Result<Entity, String> {
        let lowered: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
        let parts: Vec<&str> = lowered.iter().map(String::as_str).collect();
        let not_found = || {
            format!(
                "The messaging entity 'sb://{}/{}' could not be found.",
                self.def.host,
                segments.join("/")
            )
        };
        let Some(first) = segments.first() else { return Err(not_found()) };
        if let Some(hub) = self.hub(first) {
            let partition = |id: &str| hub.partition(id).cloned().ok_or_else(not_found);
            return match parts[1..] {
                [] => Ok(Entity::Hub { hub: hub.clone(), partition: None }),
                ["partitions", id] => Ok(Entity::Hub { hub: hub.clone(), partition: Some(partition(id)?) }),
                ["consumergroups", _, "partitions", id] => Ok(Entity::HubPartitionReader {
                    hub: hub.clone(),
                    group: parts[2].to_owned(),
                    partition: partition(id)?,
                }),
                _ => Err(not_found()),
            };
        }
        if let Some(queue) = self.queue(first) {
            return match parts[1..] {
                [] => Ok(Entity::Queue { queue: queue.clone(), sendable: true }),
                ["$deadletterqueue"] => {
                    Ok(Entity::Queue { queue: queue.dead_letter().clone(), sendable: false })
                }
                _ => Err(not_found()),
            };
        }
        if let Some(topic) = self.topic(first) {
            let subscription = |name: &str| topic.subscription(name).cloned().ok_or_else(not_found);
            return match parts[1..] {
                [] => Ok(Entity::Topic(topic.clone())),
                ["subscriptions", sub] => Ok(Entity::Queue { queue: subscription(sub)?, sendable: false }),
                ["subscriptions", sub, "$deadletterqueue"] => {
                    Ok(Entity::Queue { queue: subscription(sub)?.dead_letter().clone(), sendable: false })
                }
                _ => Err(not_found()),
            };
        }
        Err(not_found())
    }
}

/// An event hub.
pub(crate) struct Hub {
    pub name: String,
    /// When the namespace was set up, in ms since the epoch (`created_at`).
    pub created_at: i64,
    pub partitions: Vec<Arc<Partition>>,
    /// Next partition for events with neither a partition nor a key.
    round_robin: AtomicUsize,
}

impl Hub {
    fn new(def: &HubDef, created_at: i64) -> Hub {
        let partitions =
            (0..def.partition_count).map(|i| Arc::new(Partition::new(&def.name, i.to_string()))).collect();
        Hub { name: def.name.clone(), created_at, partitions, round_robin: AtomicUsize::new(0) }
    }

    pub fn partition(&self, id: &str) -> Option<&Arc<Partition>> {
        self.partitions.iter().find(|p| p.id == id)
    }

    /// The partition for events sent to the hub itself: by partition key (stable), else round-robin.
    pub fn assign(&self, partition_key: Option<&str>) -> &Arc<Partition> {
        let index = match partition_key {
            Some(key) => (partition_key_hash(key) % self.partitions.len() as u64) as usize,
            None => self.round_robin.fetch_add(1, Ordering::Relaxed) % self.partitions.len(),
        };
        &self.partitions[index]
    }

    pub fn stored(&self) -> u64 {
        self.partitions.iter().map(|p| p.len() as u64).sum()
    }
}

/// FNV-1a over the key's UTF-8 bytes: the same key maps to the same partition in every run and
/// process. (It is not the service's own mapping, which is unpublished.)
pub(crate) fn partition_key_hash(key: &str) -> u64 {
    key.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// One partition's log and its readers.
pub(crate) struct Partition {
    /// `<hub>/Partitions/<id>`, for logs.
    pub path: String,
    pub id: String,
    log: Mutex<PartitionLog>,
    /// Bumped with the log length on every append.
    appended: watch::Sender<usize>,
    readers: Mutex<Readers>,
}

#[derive(Default)]
struct PartitionLog {
    events: Vec<StoredMessage>,
    /// Offset of the next event: the sum of the encoded sizes before it.
    next_offset: i64,
}

/// What `com.microsoft:partition` READ reports.
pub(crate) struct PartitionInfo {
    pub begin_sequence_number: i64,
    pub last_sequence_number: i64,
    pub last_offset: String,
    pub last_enqueued_ms: i64,
    pub is_empty: bool,
}

impl Partition {
    fn new(hub: &str, id: String) -> Partition {
        Partition {
            path: format!("{hub}/Partitions/{id}"),
            id,
            log: Mutex::default(),
            appended: watch::channel(0).0,
            readers: Mutex::default(),
        }
    }

    /// Appends events as the service stores them: sequence number, offset and enqueued time
    /// annotations added, everything else kept. Returns how many were stored.
    pub fn append(&self, events: Vec<AmqpMessage>) -> usize {
        let count = events.len();
        let now = now_millis();
        let len = {
            let mut log = lock(&self.log);
            for mut message in events {
                let sequence_number = log.events.len() as i64;
                let offset = log.next_offset;
                log.next_offset += encoded_size(&message).max(1) as i64;
                set_annotation(&mut message, SEQUENCE_NUMBER, Value::Long(sequence_number));
                set_annotation(&mut message, OFFSET, Value::String(offset.to_string()));
                set_annotation(
                    &mut message,
                    ENQUEUED_TIME,
                    Value::Timestamp(Timestamp::from_milliseconds(now)),
                );
                log.events.push(StoredMessage {
                    sequence_number,
                    offset: Some(offset.to_string()),
                    partition_id: Some(self.id.clone()),
                    enqueued_time: millis_to_system_time(now),
                    message,
                });
            }
            log.events.len()
        };
        self.appended.send_replace(len);
        count
    }

    pub fn get(&self, index: usize) -> Option<StoredMessage> {
        lock(&self.log).events.get(index).cloned()
    }

    pub fn len(&self) -> usize {
        lock(&self.log).events.len()
    }

    pub fn snapshot(&self) -> Vec<StoredMessage> {
        lock(&self.log).events.clone()
    }

    pub fn watch(&self) -> watch::Receiver<usize> {
        self.appended.subscribe()
    }

    /// Index of the first event a reader starting at `start` gets.
    pub fn start_index(&self, start: &StartAt) -> usize {
        let log = lock(&self.log);
        let first = |keep: &dyn Fn(&StoredMessage) -> bool| {
            log.events.iter().position(keep).unwrap_or(log.events.len())
        };
        let offset = |e: &StoredMessage| e.offset.as_deref().and_then(|o| o.parse::<i64>().ok()).unwrap_or(0);
        match *start {
            StartAt::Latest => log.events.len(),
            StartAt::Offset { offset: at, inclusive } => {
                first(&|e| if inclusive { offset(e) >= at } else { offset(e) > at })
            }
            StartAt::SequenceNumber { sequence_number: at, inclusive } => {
                first(&|e| if inclusive { e.sequence_number >= at } else { e.sequence_number > at })
            }
            StartAt::EnqueuedTime { millis, inclusive } => first(&|e| {
                let enqueued = e.enqueued_time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
                if inclusive {
                    enqueued >= millis
                } else {
                    enqueued > millis
                }
            }),
        }
    }

    pub fn info(&self) -> PartitionInfo {
        let log = lock(&self.log);
        match log.events.last() {
            None => PartitionInfo {
                begin_sequence_number: 0,
                last_sequence_number: -1,
                last_offset: "-1".to_owned(),
                last_enqueued_ms: TIMESTAMP_NOT_SET_MS,
                is_empty: true,
            },
            Some(last) => PartitionInfo {
                begin_sequence_number: 0,
                last_sequence_number: last.sequence_number,
                last_offset: last.offset.clone().unwrap_or_default(),
                last_enqueued_ms: last
                    .enqueued_time
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64),
                is_empty: false,
            },
        }
    }

    /// Registers a reader of consumer group `group` with an optional owner level (epoch), the
    /// way Event Hubs arbitrates: a reader with an epoch disconnects every reader of the group
    /// with a lower or no epoch; a reader with a lower epoch, or without one while an epoch
    /// reader exists, is refused. The error is the description to refuse the link with.
    pub fn register_reader(
        self: &Arc<Self>,
        group: &str,
        epoch: Option<i64>,
        name: &str,
    ) -> Result<ReaderGuard, String> {
        let mut readers = lock(&self.readers);
        let same_group = || readers.list.iter().filter(|r| r.group == group);
        let highest = same_group().filter_map(|r| r.epoch).max();
        match (epoch, highest) {
            (Some(new), Some(old)) if new < old => {
                return Err(format!(
                    "Receiver '{name}' with epoch {new} cannot be created on {} (consumer group '{group}'): \
                     a receiver with the higher epoch {old} already exists.",
                    self.path
                ))
            }
            (None, Some(old)) => {
                return Err(format!(
                    "Receiver '{name}' without an epoch cannot be created on {} (consumer group '{group}'): \
                     a receiver with epoch {old} already exists.",
                    self.path
                ))
            }
            (Some(new), _) => {
                for reader in same_group() {
                    *lock(&reader.stolen_by) = Some(format!(
                        "New receiver '{name}' with higher epoch of '{new}' is created hence current receiver \
                         '{}' with epoch '{}' is getting disconnected.",
                        reader.name,
                        reader.epoch.map_or("none".to_owned(), |e| e.to_string())
                    ));
                    reader.kick.notify_one();
                }
            }
            (None, None) => {}
        }
        readers.next_id += 1;
        let id = readers.next_id;
        let slot = Arc::new(ReaderSlot {
            id,
            group: group.to_owned(),
            epoch,
            name: name.to_owned(),
            kick: Notify::new(),
            stolen_by: Mutex::new(None),
        });
        readers.list.push(slot.clone());
        Ok(ReaderGuard { partition: self.clone(), slot })
    }
}

#[derive(Default)]
struct Readers {
    next_id: u64,
    list: Vec<Arc<ReaderSlot>>,
}

pub(crate) struct ReaderSlot {
    id: u64,
    group: String,
    epoch: Option<i64>,
    name: String,
    /// Notified when a newer-epoch reader takes over.
    pub kick: Notify,
    /// Why it was disconnected (the `amqp:link:stolen` description).
    pub stolen_by: Mutex<Option<String>>,
}

/// A registered reader; dropping it unregisters.
pub(crate) struct ReaderGuard {
    partition: Arc<Partition>,
    pub slot: Arc<ReaderSlot>,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        lock(&self.partition.readers).list.retain(|r| r.id != self.slot.id);
    }
}

/// A Service Bus queue, subscription or dead-letter sub-queue.
pub(crate) struct Queue {
    /// `<queue>`, `<topic>/Subscriptions/<sub>`, `.../$DeadLetterQueue`.
    pub path: String,
    state: Mutex<QueueState>,
    /// Bumped on every enqueue and requeue.
    changed: watch::Sender<u64>,
    dead_letter: Option<Arc<Queue>>,
    /// Messages consumers have settled away.
    pub delivered: AtomicU64,
}

#[derive(Default)]
struct QueueState {
    available: VecDeque<StoredMessage>,
    /// Handed to peek-lock consumers and not settled yet.
    locked: usize,
    next_sequence_number: i64,
}

/// How a consumer settled a peek-locked message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Accepted (completed): the message is gone.
    Complete,
    /// Released, or Modified without `delivery-failed`: back at its place, same delivery count.
    Abandon,
    /// Modified with `delivery-failed`: back at its place, delivery count + 1.
    AbandonFailed,
    /// Rejected: moved to the dead-letter sub-queue.
    DeadLetter,
}

impl Queue {
    fn with_dead_letter(path: String) -> Queue {
        let dead_letter = Arc::new(Queue::plain(format!("{path}/$DeadLetterQueue")));
        Queue { dead_letter: Some(dead_letter), ..Queue::plain(path) }
    }

    fn plain(path: String) -> Queue {
        let state = QueueState { next_sequence_number: 1, ..QueueState::default() };
        Queue {
            path,
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            dead_letter: None,
            delivered: AtomicU64::new(0),
        }
    }

    /// The dead-letter sub-queue (a dead-letter queue is its own).
    pub fn dead_letter(self: &Arc<Self>) -> &Arc<Queue> {
        self.dead_letter.as_ref().unwrap_or(self)
    }

    /// Stores a message as Service Bus does: sequence number (`sequence_number`, from a topic,
    /// or the queue's own) and enqueued time annotations added, the rest kept.
    pub fn enqueue(&self, mut message: AmqpMessage, sequence_number: Option<i64>, now: i64) -> i64 {
        let sequence_number = {
            let mut state = lock(&self.state);
            let sequence_number = sequence_number.unwrap_or(state.next_sequence_number);
            state.next_sequence_number = state.next_sequence_number.max(sequence_number + 1);
            set_annotation(&mut message, SEQUENCE_NUMBER, Value::Long(sequence_number));
            set_annotation(&mut message, ENQUEUED_TIME, Value::Timestamp(Timestamp::from_milliseconds(now)));
            state.available.push_back(StoredMessage {
                sequence_number,
                offset: None,
                partition_id: None,
                enqueued_time: millis_to_system_time(now),
                message,
            });
            sequence_number
        };
        self.changed.send_modify(|v| *v += 1);
        sequence_number
    }

    /// The next message, locked (peek-lock) or removed (receive-and-delete).
    pub fn take(&self, lock_it: bool) -> Option<StoredMessage> {
        let mut state = lock(&self.state);
        let message = state.available.pop_front()?;
        if lock_it {
            state.locked += 1;
        } else {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Some(message)
    }

    /// Settles a message handed out by `take(true)`.
    pub fn settle(&self, mut message: StoredMessage, how: Settlement) {
        let mut state = lock(&self.state);
        state.locked = state.locked.saturating_sub(1);
        match (how, &self.dead_letter) {
            (Settlement::Complete, _) | (Settlement::DeadLetter, None) => {
                // Rejecting from a dead-letter queue removes the message, as in Service Bus.
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            (Settlement::DeadLetter, Some(dead_letter)) => {
                drop(state);
                dead_letter.enqueue(message.message, Some(message.sequence_number), now_millis());
            }
            (Settlement::Abandon | Settlement::AbandonFailed, _) => {
                if how == Settlement::AbandonFailed {
                    let header = message.message.header.get_or_insert_with(Header::default);
                    header.delivery_count = header.delivery_count.saturating_add(1);
                }
                // Back in sequence order, ahead of everything that came later.
                let at = state.available.partition_point(|m| m.sequence_number < message.sequence_number);
                state.available.insert(at, message);
                drop(state);
                self.changed.send_modify(|v| *v += 1);
            }
        }
    }

    /// Puts back a message taken for receive-and-delete whose delivery failed before it left.
    pub fn settle_unsent(&self, message: StoredMessage) {
        let mut state = lock(&self.state);
        self.delivered.fetch_sub(1, Ordering::Relaxed);
        let at = state.available.partition_point(|m| m.sequence_number < message.sequence_number);
        state.available.insert(at, message);
        drop(state);
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Messages held: available plus locked.
    pub fn stored(&self) -> u64 {
        let state = lock(&self.state);
        (state.available.len() + state.locked) as u64
    }

    pub fn snapshot(&self) -> Vec<StoredMessage> {
        lock(&self.state).available.iter().cloned().collect()
    }
}

/// A Service Bus topic.
pub(crate) struct Topic {
    pub name: String,
    pub subscriptions: Vec<Arc<Queue>>,
    /// What the topic accepted, in order (for `stored()`).
    log: Mutex<Vec<StoredMessage>>,
}

impl Topic {
    fn new(def: &TopicDef) -> Topic {
        let subscriptions = def
            .subscriptions
            .iter()
            .map(|s| Arc::new(Queue::with_dead_letter(format!("{}/Subscriptions/{s}", def.name))))
            .collect();
        Topic { name: def.name.clone(), subscriptions, log: Mutex::default() }
    }

    pub fn subscription(&self, name: &str) -> Option<&Arc<Queue>> {
        let prefix_len = self.name.len() + "/Subscriptions/".len();
        self.subscriptions.iter().find(|s| s.path[prefix_len..].eq_ignore_ascii_case(name))
    }

    /// Accepts a message: one sequence number for it, a copy to every subscription.
    pub fn publish(&self, message: AmqpMessage) {
        let now = now_millis();
        let mut log = lock(&self.log);
        let sequence_number = log.len() as i64 + 1;
        for subscription in &self.subscriptions {
            subscription.enqueue(message.clone(), Some(sequence_number), now);
        }
        let mut stored = message;
        set_annotation(&mut stored, SEQUENCE_NUMBER, Value::Long(sequence_number));
        set_annotation(&mut stored, ENQUEUED_TIME, Value::Timestamp(Timestamp::from_milliseconds(now)));
        log.push(StoredMessage {
            sequence_number,
            offset: None,
            partition_id: None,
            enqueued_time: millis_to_system_time(now),
            message: stored,
        });
    }

    pub fn stored(&self) -> u64 {
        lock(&self.log).len() as u64
    }

    pub fn snapshot(&self) -> Vec<StoredMessage> {
        lock(&self.log).clone()
    }
}

/// The encoded size of a message, as it travelled in the transfer.
pub(crate) fn encoded_size(message: &AmqpMessage) -> usize {
    use fe2o3_amqp_types::messaging::message::__private::Serializable;
    serde_amqp::to_vec(&Serializable(message)).map_or(0, |bytes| bytes.len())
}

/// A peek-locked copy for delivery: `x-opt-locked-until` set as Service Bus does.
pub(crate) fn with_lock_annotation(message: &AmqpMessage) -> AmqpMessage {
    let mut message = message.clone();
    let until = now_millis() + LOCK_DURATION.as_millis() as i64;
    set_annotation(&mut message, LOCKED_UNTIL, Value::Timestamp(Timestamp::from_milliseconds(until)));
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{Data, Properties};
    use serde_amqp::primitives::Binary;

    fn message(body: &str) -> AmqpMessage {
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                message_id: Some(body.to_owned().into()),
                ..Properties::default()
            }),
            application_properties: None,
            body: Body::Data(vec![Data(Binary::from(body.as_bytes().to_vec()))].into()),
            footer: None,
        }
    }

    fn namespace() -> Namespace {
        Namespace::new(NamespaceDef {
            host: "ns".into(),
            hubs: vec![HubDef { name: "Hub".into(), partition_count: 3 }],
            queues: vec!["q".into()],
            topics: vec![TopicDef { name: "t".into(), subscriptions: vec!["a".into(), "b".into()] }],
            sas_keys: vec![],
            denied_object_ids: vec![],
        })
    }

    fn path(p: &str) -> Vec<String> {
        p.split('/').map(str::to_owned).collect()
    }

    #[test]
    fn resolves_addresses() {
        let ns = namespace();
        assert!(matches!(ns.resolve(&path("hub")), Ok(Entity::Hub { partition: None, .. })));
        let partition = ns.resolve(&path("HUB/partitions/2"));
        assert!(matches!(partition, Ok(Entity::Hub { partition: Some(p), .. }) if p.id == "2"));
        let reader = ns.resolve(&path("hub/ConsumerGroups/$Default/Partitions/0"));
        assert!(matches!(reader, Ok(Entity::HubPartitionReader { group, .. }) if group == "$default"));
        assert!(matches!(ns.resolve(&path("q")), Ok(Entity::Queue { sendable: true, .. })));
        let dead_letter = ns.resolve(&path("q/$DeadLetterQueue"));
        assert!(
            matches!(dead_letter, Ok(Entity::Queue { sendable: false, queue }) if queue.path == "q/$DeadLetterQueue")
        );
        assert!(matches!(ns.resolve(&path("t")), Ok(Entity::Topic(_))));
        let subscription = ns.resolve(&path("t/Subscriptions/A"));
        assert!(
            matches!(subscription, Ok(Entity::Queue { sendable: false, queue }) if queue.path == "t/Subscriptions/a")
        );
        for missing in ["nope", "hub/Partitions/3", "hub/x", "t/Subscriptions/c", "q/x", ""] {
            let err = ns.resolve(&path(missing)).err().unwrap_or_else(|| panic!("{missing} resolved"));
            assert!(err.starts_with("The messaging entity 'sb://ns/"), "{err}");
        }
    }

    #[test]
    fn partitions_number_and_annotate_events() {
        let ns = namespace();
        let p = &ns.hubs[0].partitions[1];
        assert!(p.info().is_empty);
        assert_eq!(p.info().last_enqueued_ms, TIMESTAMP_NOT_SET_MS);
        p.append(vec![message("a"), message("bb")]);
        p.append(vec![message("c")]);
        let events = p.snapshot();
        assert_eq!(events.iter().map(|e| e.sequence_number).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(events[0].offset.as_deref(), Some("0"));
        let second: i64 = events[1].offset.as_deref().unwrap().parse().unwrap();
        let third: i64 = events[2].offset.as_deref().unwrap().parse().unwrap();
        assert!(0 < second && second < third, "offsets grow by size: {second} {third}");
        assert_eq!(annotation(&events[2].message, SEQUENCE_NUMBER), Some(&Value::Long(2)));
        assert_eq!(annotation(&events[2].message, OFFSET), Some(&Value::String(third.to_string())));
        assert!(matches!(annotation(&events[0].message, ENQUEUED_TIME), Some(Value::Timestamp(_))));
        let info = p.info();
        assert_eq!(
            (info.last_sequence_number, info.last_offset.clone(), info.is_empty),
            (2, third.to_string(), false)
        );

        let at = |s| p.start_index(&s);
        assert_eq!(at(StartAt::Offset { offset: -1, inclusive: false }), 0);
        assert_eq!(at(StartAt::Latest), 3);
        assert_eq!(at(StartAt::Offset { offset: second, inclusive: false }), 2);
        assert_eq!(at(StartAt::Offset { offset: second, inclusive: true }), 1);
        assert_eq!(at(StartAt::SequenceNumber { sequence_number: 0, inclusive: false }), 1);
        assert_eq!(at(StartAt::SequenceNumber { sequence_number: 0, inclusive: true }), 0);
        assert_eq!(at(StartAt::EnqueuedTime { millis: 0, inclusive: false }), 0);
        assert_eq!(at(StartAt::EnqueuedTime { millis: i64::MAX, inclusive: false }), 3);
    }

    #[test]
    fn partition_keys_are_stable() {
        let ns = namespace();
        let hub = &ns.hubs[0];
        let first = hub.assign(Some("twin-1")).id.clone();
        for _ in 0..10 {
            assert_eq!(hub.assign(Some("twin-1")).id, first);
        }
        // Known value pins the hash across releases (FNV-1a 64 of "a").
        assert_eq!(partition_key_hash("a"), 0xaf63_dc4c_8601_ec8c);
        let spread: std::collections::BTreeSet<String> =
            (0..30).map(|i| hub.assign(Some(&format!("key-{i}"))).id.clone()).collect();
        assert_eq!(spread.len(), 3, "keys spread over partitions");
        let round_robin: Vec<String> = (0..3).map(|_| hub.assign(None).id.clone()).collect();
        assert_eq!(round_robin, ["0", "1", "2"]);
    }

    #[test]
    fn queues_lock_settle_and_dead_letter() {
        let ns = namespace();
        let q = ns.queue("Q").unwrap().clone();
        q.enqueue(message("1"), None, 5);
        q.enqueue(message("2"), None, 5);
        let first = q.take(true).unwrap();
        assert_eq!(first.sequence_number, 1);
        assert_eq!(q.stored(), 2, "locked messages still count");
        q.settle(first, Settlement::AbandonFailed);
        let again = q.take(true).unwrap();
        assert_eq!(again.sequence_number, 1, "abandoned message keeps its place");
        assert_eq!(again.message.header.as_ref().unwrap().delivery_count, 1);
        q.settle(again, Settlement::DeadLetter);
        let dlq = q.dead_letter();
        assert_eq!(dlq.snapshot().iter().map(|m| m.sequence_number).collect::<Vec<_>>(), [1]);
        let second = q.take(false).unwrap();
        assert_eq!(second.sequence_number, 2);
        assert_eq!(q.stored(), 0);
        assert!(q.take(true).is_none());
        assert_eq!(q.delivered.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn topics_fan_out() {
        let ns = namespace();
        let t = ns.topic("t").unwrap();
        t.publish(message("x"));
        t.publish(message("y"));
        for sub in &t.subscriptions {
            let seqs: Vec<i64> = sub.snapshot().iter().map(|m| m.sequence_number).collect();
            assert_eq!(seqs, [1, 2], "{}", sub.path);
        }
        assert_eq!(t.stored(), 2);
    }

    #[test]
    fn epochs_arbitrate_readers() {
        let ns = namespace();
        let p = ns.hubs[0].partitions[0].clone();
        let plain = p.register_reader("$default", None, "a").unwrap();
        let _other_group = p.register_reader("other", None, "b").unwrap();
        let high = p.register_reader("$default", Some(5), "c").unwrap();
        assert!(lock(&plain.slot.stolen_by).as_deref().unwrap().contains("higher epoch of '5'"));
        assert!(p.register_reader("$default", Some(4), "d").err().unwrap().contains("higher epoch 5"));
        assert!(p.register_reader("$default", None, "e").err().unwrap().contains("epoch 5"));
        drop(plain);
        let higher = p.register_reader("$default", Some(5), "f").unwrap();
        assert!(lock(&high.slot.stolen_by).is_some(), "equal epoch takes over too");
        drop((high, higher));
        assert!(p.register_reader("$default", None, "g").is_ok(), "guards unregister");
    }
}
