//! The durable spool: accepted events kept on disk (in a `fjall` database) until every endpoint
//! they were routed to is done with them, so a crash or `kill -9` loses nothing that was
//! acknowledged.
//!
//! - **Stored once.** Each event is one record (key: its sequence number) naming the endpoints
//!   (consumers) it goes to. Each consumer keeps its own position; a record is deleted once every
//!   consumer has passed it.
//! - **Group commit.** Submissions are encoded by the caller and handed to one writer thread,
//!   which writes everything waiting to the journal as one batch; a second thread syncs, one
//!   sync covering every batch written meanwhile, while the writer goes on writing. Ingest
//!   answers 202 only after the sync. Under load many requests share a sync.
//! - **Memory first, disk when behind.** Once stored, an event goes straight to each endpoint's
//!   in-memory queue if it has room; an endpoint that falls behind (or every endpoint, after a
//!   restart) reads its events back from disk in order until it has caught up.
//! - **Bounded.** Bytes of events held are limited (`spool.max_bytes`); beyond it ingest answers
//!   503. Records carry a checksum; damage found at start is reported and cut off, keeping
//!   everything before it.

pub mod record;

use super::queue::{Durability, QueueBackend, QueueReader, QueueWriter, Refused, ReserveError, Routed};
use super::Envelope;
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

/// How often positions are saved and finished records deleted.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);
/// Most records a consumer scans in one read from disk (so one read stays short even when few
/// of the records are for it).
const SCAN_LIMIT: usize = 4096;
/// Records are counted against the byte bound in buckets of this many sequence numbers (bytes
/// come back a bucket at a time).
const BUCKET: u64 = 64;
/// Most bytes committed in one batch (more waiting goes in the next).
const MAX_COMMIT_BYTES: usize = 16 * 1024 * 1024;
/// Most records deleted in one round of housekeeping.
const MAX_DELETES: u64 = 65_536;

const META_NEXT_SEQ: &[u8] = b"next_seq";
const META_CONSUMER: &str = "consumer/";
const META_POSITION: &str = "position/";

/// How to open the spool.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// The spool's directory (created if missing).
    pub path: PathBuf,
    /// Most bytes of event records held; beyond it submissions are refused.
    pub max_bytes: u64,
    /// How long the writer may wait for more submissions before a commit (0: commit whatever
    /// is waiting as soon as the previous commit is done).
    pub commit_interval: Duration,
    /// Bytes of recent events the storage engine keeps in memory (its memtable).
    pub memory_bytes: u64,
}

/// Why the spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source} (set spool.path or state_dir to a writable directory)")]
    Directory { path: PathBuf, source: std::io::Error },
    #[error("spool directory {path} is in use by another twinroute process")]
    Locked { path: PathBuf },
    #[error("spool at {path} cannot be opened: {message}")]
    Open { path: PathBuf, message: String },
}

/// What opening the spool found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Events found waiting for delivery.
    pub events: u64,
    /// Bytes of an incomplete write cut from the end of the journal (never acknowledged).
    pub torn_tail_bytes: u64,
    /// Records found damaged, with everything after them: removed, as (first, last) sequence
    /// numbers, with the reason.
    pub damaged: Option<Damage>,
}

/// A damaged stretch at the end of the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub reason: String,
}

/// The durable queue backend. Cheap to clone; the last clone dropped closes it.
#[derive(Clone)]
pub struct DiskSpool {
    handle: Arc<Handle>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DiskSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSpool").field("path", &self.shared.path).finish_non_exhaustive()
    }
}

/// The writer thread and the way to it.
struct Handle {
    /// To the writer thread; `None` once closed.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Handle {
    fn close(&self) {
        lock(&self.commands).take();
        if let Some(thread) = lock(&self.writer).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.close();
    }
}

struct Shared {
    path: PathBuf,
    db: fjall::Database,
    events: fjall::Keyspace,
    meta: fjall::Keyspace,
    /// Every consumer, open or recovered and not yet claimed.
    consumers: Mutex<Vec<Arc<Consumer>>>,
    next_consumer_id: AtomicU32,
    /// Bytes of records stored, and bytes of submissions on their way to being stored.
    stored_bytes: AtomicU64,
    reserved_bytes: AtomicU64,
    max_bytes: u64,
    /// Set after a failed sync: nothing more is accepted (the disk can no longer be trusted).
    failed: AtomicBool,
    recovery: Recovery,
}

/// One endpoint's position in the spool.
struct Consumer {
    /// The id new records name.
    id: u32,
    /// Every id whose records this consumer reads: its own, and those of earlier runs of the
    /// same endpoint (found at start).
    ids: Vec<u32>,
    name: String,
    /// Most events held in memory for it.
    capacity: usize,
    state: Mutex<ConsumerState>,
    /// Wakes the reader when events arrive or the writer goes.
    notify: Notify,
}

#[derive(Default)]
struct ConsumerState {
    /// Stored events ready in memory, in order.
    memory: VecDeque<Arc<Envelope>>,
    /// When set, events from this sequence number on are to be read from disk: new ones are not
    /// put in memory until the reader has caught up.
    disk_from: Option<u64>,
    /// The newest record routed to it.
    last_routed: u64,
    /// Events routed to it and not yet handed to its worker.
    waiting: u64,
    /// Handed to the worker and not yet done.
    in_flight: BTreeSet<u64>,
    /// Whether the dispatcher still routes to it, and whether its worker still reads.
    writer_open: bool,
    reader_open: bool,
    /// Whether an endpoint claimed it (recovered consumers are unclaimed until then).
    claimed: bool,
    /// The position last saved.
    saved_position: u64,
}

impl ConsumerState {
    /// The oldest record it is not done with, or `None` when it is done with everything
    /// routed to it so far.
    fn position(&self) -> Option<u64> {
        [self.in_flight.first().copied(), self.memory.front().map(|e| seq_of(e)), self.disk_from]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether it can be forgotten: nobody routes to it or reads it, and nothing is pending.
    fn finished(&self) -> bool {
        !self.writer_open && !self.reader_open && self.waiting == 0 && self.in_flight.is_empty()
    }
}

fn seq_of(envelope: &Envelope) -> u64 {
    envelope.spool_seq.load(Ordering::Acquire)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Command {
    Append(Append),
    /// Run housekeeping now and report.
    Sync(oneshot::Sender<()>),
}

struct Append {
    /// Encoded records, one per event.
    records: Vec<Vec<u8>>,
    /// Each event and the consumers it goes to.
    events: Vec<(Arc<Envelope>, Vec<Arc<Consumer>>)>,
    bytes: u64,
    done: oneshot::Sender<Result<(), String>>,
}

impl DiskSpool {
    /// Opens (or creates) the spool at `options.path`, checking every record and cutting off a
    /// damaged tail.
    pub fn open(options: &SpoolOptions) -> Result<Self, SpoolError> {
        let path = options.path.clone();
        std::fs::create_dir_all(&path)
            .map_err(|source| SpoolError::Directory { path: path.clone(), source })?;
        // Fail early and clearly when the directory is not writable (fjall's own error is vaguer).
        let probe = path.join(".write-test");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|source| SpoolError::Directory { path: path.clone(), source })?;
        let journal_before = journal_bytes(&path);
        // fjall needs at least 64 MiB of journal; more than 512 MiB only delays flushes.
        let journaling = (options.max_bytes / 4).clamp(64 << 20, 512 << 20);
        // Memory: events live in a memtable (`spool.memory_bytes`) until it is flushed, and most
        // are delivered (and deleted) long before; fjall's defaults (64 MiB of memtable, 32 MiB
        // of block cache) made the daemon's resident set grow by ~1.2 MB/s at 1,000 events/s up
        // to ~85 MB. The block cache only serves endpoints reading back a backlog.
        let db = fjall::Database::builder(&path)
            .max_journaling_size(journaling)
            .cache_size(SPOOL_CACHE_BYTES)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => SpoolError::Locked { path: path.clone() },
                e => SpoolError::Open { path: path.clone(), message: describe(&e) },
            })?;
        let torn_tail_bytes = journal_before.saturating_sub(journal_bytes(&path));
        let open_error = |e: fjall::Error| SpoolError::Open { path: path.clone(), message: describe(&e) };
        let memtable = options.memory_bytes.max(1 << 20);
        let events = db
            .keyspace("events", || fjall::KeyspaceCreateOptions::default().max_memtable_size(memtable))
            .map_err(open_error)?;
        let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default).map_err(open_error)?;
        let mut spool = Shared {
            path: path.clone(),
            db,
            events,
            meta,
            consumers: Mutex::new(Vec::new()),
            next_consumer_id: AtomicU32::new(1),
            stored_bytes: AtomicU64::new(0),
            reserved_bytes: AtomicU64::new(0),
            max_bytes: options.max_bytes,
            failed: AtomicBool::new(false),
            recovery: Recovery { torn_tail_bytes, ..Recovery::default() },
        };
        let state = spool.recover().map_err(open_error)?;
        let shared = Arc::new(spool);
        let (sender, receiver) = mpsc::channel();
        let pipeline = Arc::new(Pipeline {
            written: Mutex::new(Written::default()),
            ready: std::sync::Condvar::new(),
            routed_below: AtomicU64::new(state.next_seq),
        });
        let writer = Writer {
            shared: shared.clone(),
            pipeline,
            next_seq: state.next_seq,
            deleted_below: state.first_seq,
            buckets: state.buckets,
            commit_interval: options.commit_interval,
            last_housekeeping: Instant::now(),
            saved_next_seq: 0,
        };
        let watched = shared.clone();
        let handle = std::thread::Builder::new()
            .name("twinroute-spool".into())
            .spawn(move || {
                // A bug here must not leave requests waiting for a writer that is gone: the
                // spool then refuses everything, and says so.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(receiver))).is_err() {
                    fail(&watched, "the spool's writer thread failed (a bug; see the log above)");
                }
            })
            .map_err(|source| SpoolError::Directory { path: path.clone(), source })?;
        let handle = Handle { commands: Mutex::new(Some(sender)), writer: Mutex::new(Some(handle)) };
        Ok(Self { handle: Arc::new(handle), shared })
    }

    /// What opening found (for the start-up log).
    pub fn recovery(&self) -> &Recovery {
        &self.shared.recovery
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Bytes of event records held now.
    pub fn stored_bytes(&self) -> u64 {
        self.shared.stored_bytes.load(Ordering::Acquire)
    }

    /// Events held for consumers that no endpoint claimed (endpoints removed while twinroute was
    /// stopped) are given up: returns (endpoint, events) for each. Call once the configuration
    /// is applied.
    pub fn release_unclaimed(&self) -> Vec<(String, u64)> {
        let mut released = Vec::new();
        let mut consumers = lock(&self.shared.consumers);
        consumers.retain(|c| {
            let mut st = lock(&c.state);
            if st.claimed {
                return true;
            }
            released.push((c.name.clone(), st.waiting));
            st.waiting = 0;
            st.disk_from = None;
            false
        });
        drop(consumers);
        let mut batch = self.shared.db.batch();
        for (name, _) in &released {
            tracing::debug!(endpoint = %name, "releasing the spool position of a removed endpoint");
        }
        for id in self.unknown_ids() {
            batch.remove(&self.shared.meta, format!("{META_CONSUMER}{id}"));
            batch.remove(&self.shared.meta, format!("{META_POSITION}{id}"));
        }
        if let Err(e) = batch.commit() {
            tracing::warn!(error = %describe(&e), "could not forget removed endpoints in the spool");
        }
        released
    }

    /// Consumer ids saved in the spool that no consumer serves.
    fn unknown_ids(&self) -> Vec<u32> {
        let known: BTreeSet<u32> =
            lock(&self.shared.consumers).iter().flat_map(|c| c.ids.iter().copied()).collect();
        self.shared
            .meta
            .prefix(META_CONSUMER)
            .filter_map(|g| g.key().ok())
            .filter_map(|k| std::str::from_utf8(&k[META_CONSUMER.len()..]).ok()?.parse::<u32>().ok())
            .filter(|id| !known.contains(id))
            .collect()
    }

    /// Saves positions and deletes finished records now (tests; shutdown does it too).
    pub async fn housekeeping(&self) {
        let (tx, rx) = oneshot::channel();
        let sent = lock(&self.handle.commands).as_ref().is_some_and(|s| s.send(Command::Sync(tx)).is_ok());
        if sent {
            let _ = rx.await;
        }
    }

    /// Finishes pending commits, saves positions and stops the writer. Later submissions are
    /// refused.
    pub fn close(&self) {
        self.handle.close();
    }

    /// Whether the storage engine has no background work under way (memtable flushes,
    /// compactions): benchmarks wait for it so a mode's cost is not paid by the next one.
    pub fn is_quiet(&self) -> bool {
        self.shared.db.outstanding_flushes() == 0 && self.shared.db.active_compactions() == 0
    }

    /// Records stored now (a full count; for tests and the CLI).
    pub fn record_count(&self) -> usize {
        self.shared.events.iter().count()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The writer thread holds an Arc of this, so it has stopped by now.
        let _ = self.db.persist(fjall::PersistMode::SyncAll);
    }
}

/// fjall's block cache (reads of a backlog from disk). It fills at 1,000 events/s too: 8 MiB
/// held ~1.5 MB more resident memory than 2 MiB, for no measured gain.
const SPOOL_CACHE_BYTES: u64 = 2 << 20;

/// fjall's errors print as their Debug form; say what they mean.
fn describe(e: &fjall::Error) -> String {
    match e {
        fjall::Error::Io(io) => io.to_string(),
        fjall::Error::Poisoned => "an earlier write failed, so the disk cannot be trusted".into(),
        fjall::Error::JournalRecovery(r) => format!("the journal is damaged ({r:?})"),
        other => format!("{other:?}"),
    }
}

fn journal_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "jnl"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// What recovery hands the writer.
struct Recovered {
    next_seq: u64,
    first_seq: u64,
    buckets: BTreeMap<u64, u64>,
}

impl Shared {
    /// Reads the saved consumers and positions and checks every record.
    fn recover(&mut self) -> fjall::Result<Recovered> {
        let mut names = BTreeMap::new();
        let mut positions = BTreeMap::new();
        let mut next_seq = 1u64;
        for guard in self.meta.iter() {
            let (key, value) = guard.into_inner()?;
            let key = String::from_utf8_lossy(&key).into_owned();
            if key.as_bytes() == META_NEXT_SEQ {
                next_seq = next_seq.max(read_u64(&value));
            } else if let Some(id) = key.strip_prefix(META_CONSUMER).and_then(|i| i.parse::<u32>().ok()) {
                names.insert(id, String::from_utf8_lossy(&value).into_owned());
            } else if let Some(id) = key.strip_prefix(META_POSITION).and_then(|i| i.parse::<u32>().ok()) {
                positions.insert(id, read_u64(&value));
            }
        }
        // Per consumer id: events waiting, the first and the last.
        let mut found: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
        let mut buckets = BTreeMap::new();
        let mut first_seq = None;
        let mut damaged: Option<(u64, String)> = None;
        let mut last_good = 0;
        let mut total_events = 0;
        for guard in self.events.iter() {
            let (key, value) = match guard.into_inner() {
                Ok(kv) => kv,
                Err(e) => {
                    damaged = Some((last_good + 1, describe(&e)));
                    break;
                }
            };
            let seq = read_u64(&key);
            let header = match record::header(&value) {
                Ok(h) => h,
                Err(e) => {
                    damaged = Some((seq, e.to_string()));
                    break;
                }
            };
            last_good = seq;
            first_seq.get_or_insert(seq);
            *buckets.entry(seq / BUCKET).or_insert(0) += value.len() as u64;
            let mut waiting = false;
            for id in header.consumers {
                if names.contains_key(&id) && seq >= positions.get(&id).copied().unwrap_or(0) {
                    let entry = found.entry(id).or_insert((0, seq, seq));
                    entry.0 += 1;
                    entry.2 = seq;
                    waiting = true;
                }
            }
            total_events += u64::from(waiting);
        }
        if let Some((from, reason)) = damaged {
            // Keep the intact prefix; remove the damaged record and everything after it.
            let mut batch = self.db.batch();
            let mut records = 0;
            let mut last = from;
            for key in self.events.range(from.to_be_bytes()..).filter_map(|g| g.key().ok()) {
                last = read_u64(&key);
                batch.remove(&self.events, key);
                records += 1;
            }
            batch.commit()?;
            self.db.persist(fjall::PersistMode::SyncAll)?;
            self.recovery.damaged =
                Some(Damage { first_seq: from, last_seq: last, records: records.max(1), reason });
        }
        next_seq = next_seq.max(last_good + 1);
        let stored: u64 = buckets.values().sum();
        self.stored_bytes.store(stored, Ordering::Release);
        self.recovery.events = total_events;
        // One unclaimed consumer per saved id; an endpoint claims those of its name when opened.
        let mut consumers = Vec::new();
        for (id, name) in names {
            let (waiting, first, last) = found.get(&id).copied().unwrap_or((0, 0, 0));
            let state = ConsumerState {
                disk_from: (waiting > 0).then_some(first),
                last_routed: last,
                waiting,
                saved_position: positions.get(&id).copied().unwrap_or(0),
                ..ConsumerState::default()
            };
            consumers.push(Arc::new(Consumer {
                id,
                ids: vec![id],
                name,
                capacity: 0,
                state: Mutex::new(state),
                notify: Notify::new(),
            }));
            self.next_consumer_id.fetch_max(id + 1, Ordering::AcqRel);
        }
        *lock(&self.consumers) = consumers;
        Ok(Recovered { next_seq, first_seq: first_seq.unwrap_or(next_seq), buckets })
    }
}

fn read_u64(bytes: &[u8]) -> u64 {
    bytes.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

impl QueueBackend for DiskSpool {
    fn open(&self, endpoint: &str, capacity: usize) -> (Box<dyn QueueWriter>, Box<dyn QueueReader>) {
        let shared = &self.shared;
        let mut consumers = lock(&shared.consumers);
        // Claim what earlier runs left for this endpoint.
        let mut ids = Vec::new();
        let mut state =
            ConsumerState { writer_open: true, reader_open: true, claimed: true, ..Default::default() };
        consumers.retain(|c| {
            let st = lock(&c.state);
            if st.claimed || c.name != endpoint {
                return true;
            }
            ids.extend(c.ids.iter().copied());
            state.waiting += st.waiting;
            state.last_routed = state.last_routed.max(st.last_routed);
            state.disk_from = match (state.disk_from, st.disk_from) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            false
        });
        let id = match ids.iter().min() {
            Some(&id) => id,
            None => {
                let id = shared.next_consumer_id.fetch_add(1, Ordering::AcqRel);
                ids.push(id);
                // Saved before any record names it, so a restart knows whose records they are.
                if let Err(e) = shared.meta.insert(format!("{META_CONSUMER}{id}"), endpoint.as_bytes()) {
                    tracing::error!(endpoint, error = %describe(&e), "could not save the endpoint's spool position");
                }
                id
            }
        };
        ids.sort_unstable();
        let consumer = Arc::new(Consumer {
            id,
            ids,
            name: endpoint.to_owned(),
            capacity,
            state: Mutex::new(state),
            notify: Notify::new(),
        });
        consumers.push(consumer.clone());
        drop(consumers);
        (
            Box::new(DiskWriter { consumer: consumer.clone() }),
            Box::new(DiskReader { consumer, shared: shared.clone() }),
        )
    }

    fn append(&self, routed: Routed<'_>) -> Result<Durability, Refused> {
        let shared = &self.shared;
        if shared.failed.load(Ordering::Acquire) {
            return Err((
                ReserveError::Storage("an earlier write to the spool failed".into()),
                routed.events,
            ));
        }
        let consumers: Vec<Arc<Consumer>> = routed
            .targets
            .iter()
            .map(|t| t.as_any().downcast_ref::<DiskWriter>().expect("a spool writer").consumer.clone())
            .collect();
        let mut records = Vec::with_capacity(routed.events.len());
        let mut bytes = 0u64;
        for (envelope, set) in &routed.events {
            let ids: smallvec::SmallVec<[u32; 8]> = set.iter().map(|i| consumers[i].id).collect();
            let mut out = Vec::with_capacity(envelope.event.size_hint() + 64);
            record::encode(&mut out, &envelope.event, envelope.accepted_at, &ids);
            bytes += out.len() as u64;
            records.push(out);
        }
        let reserved = shared.reserved_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let used = shared.stored_bytes.load(Ordering::Acquire) + reserved;
        if used > shared.max_bytes {
            shared.reserved_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err((
                ReserveError::SpoolFull { used: used - bytes, limit: shared.max_bytes },
                routed.events,
            ));
        }
        let (done, stored) = oneshot::channel();
        let events = routed
            .events
            .into_iter()
            .map(|(envelope, set)| {
                let to = set.iter().map(|i| consumers[i].clone()).collect();
                (envelope, to)
            })
            .collect::<Vec<_>>();
        let command = Command::Append(Append { records, events, bytes, done });
        let sender = lock(&self.handle.commands).clone();
        let unsent = match sender {
            Some(sender) => match sender.send(command) {
                Ok(()) => return Ok(Durability::Pending(stored)),
                Err(mpsc::SendError(command)) => Some(command),
            },
            None => Some(command),
        };
        // Closed: give the events back.
        shared.reserved_bytes.fetch_sub(bytes, Ordering::AcqRel);
        let events = match unsent {
            Some(Command::Append(a)) => a
                .events
                .into_iter()
                .map(|(envelope, _)| (envelope, crate::routing::EndpointSet::new()))
                .collect(),
            _ => Vec::new(),
        };
        Err((ReserveError::Closed, events))
    }

    fn spills(&self) -> bool {
        true
    }

    fn failure(&self) -> Option<String> {
        self.shared.failed.load(Ordering::Acquire).then(|| {
            format!(
                "a write to the spool at {} failed; restart twinroute once the disk is sound",
                self.shared.path.display()
            )
        })
    }
}

/// The dispatcher's handle on a consumer.
struct DiskWriter {
    consumer: Arc<Consumer>,
}

impl QueueWriter for DiskWriter {
    fn len(&self) -> usize {
        lock(&self.consumer.state).waiting as usize
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        lock(&self.consumer.state).writer_open = false;
        self.consumer.notify.notify_one();
    }
}

/// A worker's handle on a consumer.
struct DiskReader {
    consumer: Arc<Consumer>,
    shared: Arc<Shared>,
}

impl Drop for DiskReader {
    fn drop(&mut self) {
        lock(&self.consumer.state).reader_open = false;
    }
}

#[async_trait]
impl QueueReader for DiskReader {
    async fn recv_many(&mut self, buffer: &mut Vec<Arc<Envelope>>, max: usize) -> usize {
        let max = max.max(1);
        loop {
            let notified = self.consumer.notify.notified();
            let from = {
                let mut guard = lock(&self.consumer.state);
                let st = &mut *guard;
                if !st.memory.is_empty() {
                    let n = st.memory.len().min(max);
                    for envelope in st.memory.drain(..n) {
                        st.in_flight.insert(seq_of(&envelope));
                        buffer.push(envelope);
                    }
                    st.waiting = st.waiting.saturating_sub(n as u64);
                    return n;
                }
                match st.disk_from {
                    Some(from) => Some((from, st.last_routed)),
                    None if !st.writer_open => return 0,
                    None => None,
                }
            };
            if let Some((from, upto)) = from {
                let (n, failed) = self.read_from_disk(buffer, from, upto, max);
                if n > 0 {
                    return n;
                }
                if failed {
                    // Wait before trying again without holding up the thread (on the default
                    // single-threaded runtime, everything else runs on it too).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                // A stretch of other endpoints' records: let other tasks run between scans.
                tokio::task::yield_now().await;
                continue;
            }
            notified.await;
        }
    }

    fn len(&self) -> usize {
        lock(&self.consumer.state).waiting as usize
    }

    fn done(&mut self, envelope: &Envelope) {
        lock(&self.consumer.state).in_flight.remove(&seq_of(envelope));
    }
}

impl DiskReader {
    /// Reads up to `max` of this consumer's events in `from..=upto` from disk into `buffer`
    /// and moves the consumer's disk position past what it scanned; also says whether a read
    /// failed (the position then stays at the record that could not be read).
    fn read_from_disk(
        &self,
        buffer: &mut Vec<Arc<Envelope>>,
        from: u64,
        upto: u64,
        max: usize,
    ) -> (usize, bool) {
        let ids = &self.consumer.ids;
        let mut next = from;
        let mut taken = Vec::new();
        let mut exhausted = true;
        let mut failed = false;
        for (scanned, guard) in self.shared.events.range(from.to_be_bytes()..=upto.to_be_bytes()).enumerate()
        {
            if taken.len() >= max || scanned >= SCAN_LIMIT {
                exhausted = false;
                break;
            }
            let (key, value) = match guard.into_inner() {
                Ok(kv) => kv,
                Err(e) => {
                    // Leave the position where it is; the next read tries again.
                    tracing::error!(endpoint = %self.consumer.name, error = %describe(&e), "reading the spool failed");
                    failed = true;
                    exhausted = false;
                    break;
                }
            };
            let seq = read_u64(&key);
            next = seq + 1;
            match record::decode(&value) {
                Ok((header, event)) => {
                    if header.consumers.iter().any(|id| ids.contains(id)) {
                        taken.push(Arc::new(Envelope::restored(event, header.accepted_at, seq)));
                    }
                }
                Err(e) => {
                    metrics::counter!("twinroute_spool_damaged_records_total").increment(1);
                    tracing::error!(
                        endpoint = %self.consumer.name, seq, error = %e,
                        "a spooled event is damaged and cannot be delivered; skipping it"
                    );
                }
            }
        }
        if exhausted {
            next = next.max(upto + 1);
        }
        let mut st = lock(&self.consumer.state);
        let n = taken.len();
        for envelope in taken {
            st.in_flight.insert(seq_of(&envelope));
            buffer.push(envelope);
        }
        st.waiting = st.waiting.saturating_sub(n as u64);
        // Caught up when everything routed so far was scanned: new events go to memory again.
        st.disk_from = (next <= st.last_routed).then_some(next);
        if st.disk_from.is_none() {
            st.waiting = st.memory.len() as u64;
        }
        (n, failed)
    }
}

/// Groups written to the journal (in the operating system's hands, not yet synced), waiting for
/// the syncer.
#[derive(Default)]
struct Written {
    groups: VecDeque<WrittenGroup>,
    /// The writer has stopped: the syncer finishes what is queued and stops too.
    closed: bool,
}

struct WrittenGroup {
    first_seq: u64,
    appends: Vec<Append>,
}

/// Between the writer and the syncer.
struct Pipeline {
    written: Mutex<Written>,
    ready: std::sync::Condvar,
    /// Records below this were handed to their consumers (so a consumer with nothing pending is
    /// at this position, never past a record it has not seen).
    routed_below: AtomicU64,
}

/// The writer thread: writes each group of submissions to the journal as one batch and keeps
/// house. A second thread (the syncer) makes the written groups durable, one sync covering
/// every group written meanwhile, so writing the next group overlaps syncing the last.
struct Writer {
    shared: Arc<Shared>,
    pipeline: Arc<Pipeline>,
    next_seq: u64,
    /// Records below this are deleted.
    deleted_below: u64,
    /// Stored bytes per bucket of sequence numbers.
    buckets: BTreeMap<u64, u64>,
    commit_interval: Duration,
    last_housekeeping: Instant,
    saved_next_seq: u64,
}

impl Writer {
    fn run(mut self, commands: mpsc::Receiver<Command>) {
        let syncer = {
            let shared = self.shared.clone();
            let pipeline = self.pipeline.clone();
            std::thread::Builder::new().name("twinroute-spool-sync".into()).spawn(move || {
                // As for the writer: a bug here must fail the spool loudly.
                let synced = std::panic::AssertUnwindSafe(|| sync_loop(&shared, &pipeline));
                if std::panic::catch_unwind(synced).is_err() {
                    fail(&shared, "the spool's sync thread failed (a bug; see the log above)");
                }
            })
        };
        let syncer = match syncer {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the spool's sync thread; refusing events");
                self.shared.failed.store(true, Ordering::Release);
                None
            }
        };
        // Submissions in the last group written: more than one means requests are queueing.
        let mut last_group = 0;
        loop {
            let first = match commands.recv_timeout(HOUSEKEEPING_INTERVAL) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.housekeeping();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let busy = last_group > 1;
            let mut group = Vec::new();
            let mut syncs = Vec::new();
            let mut bytes = 0;
            let started = Instant::now();
            let mut next = Some(first);
            loop {
                match next.take() {
                    Some(Command::Append(a)) => {
                        bytes += a.bytes as usize;
                        group.push(a);
                    }
                    Some(Command::Sync(s)) => syncs.push(s),
                    None => {}
                }
                if bytes >= MAX_COMMIT_BYTES {
                    break;
                }
                next = match commands.try_recv() {
                    Ok(c) => Some(c),
                    // Under load (the last group had company), wait a little for more: fewer,
                    // larger writes and syncs. A lone request is written at once.
                    Err(_) if busy && started.elapsed() < self.commit_interval => {
                        // Computed once: the clock moves on between two readings.
                        let left = self.commit_interval.saturating_sub(started.elapsed());
                        match commands.recv_timeout(left) {
                            Ok(c) => Some(c),
                            Err(_) => break,
                        }
                    }
                    Err(_) => break,
                };
            }
            last_group = group.len();
            if !group.is_empty() {
                self.write(group);
            }
            if !syncs.is_empty() {
                // Everything written so far is routed before housekeeping looks at positions.
                self.wait_until_routed();
            }
            if !syncs.is_empty() || self.last_housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
                self.housekeeping();
            }
            for s in syncs {
                let _ = s.send(());
            }
        }
        {
            let mut written = lock(&self.pipeline.written);
            written.closed = true;
        }
        self.pipeline.ready.notify_all();
        if let Some(syncer) = syncer {
            let _ = syncer.join();
        }
        self.housekeeping();
        let _ = self.shared.db.persist(fjall::PersistMode::SyncAll);
    }

    fn wait_until_routed(&self) {
        while self.pipeline.routed_below.load(Ordering::Acquire) < self.next_seq
            && !self.shared.failed.load(Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Writes a group to the journal (not synced) and queues it for the syncer.
    fn write(&mut self, group: Vec<Append>) {
        let shared = &self.shared;
        let first_seq = self.next_seq;
        let mut batch = shared.db.batch();
        let mut seq = first_seq;
        let mut bytes = 0;
        for append in &group {
            for record in &append.records {
                batch.insert(&shared.events, seq.to_be_bytes(), record.as_slice());
                seq += 1;
            }
            bytes += append.bytes;
        }
        let result = if shared.failed.load(Ordering::Acquire) {
            Err("an earlier write to the spool failed".to_owned())
        } else {
            batch
                .commit()
                .and_then(|()| shared.db.persist(fjall::PersistMode::Buffer))
                .map_err(|e| describe(&e))
        };
        if let Err(e) = result {
            shared.reserved_bytes.fetch_sub(bytes, Ordering::AcqRel);
            fail(shared, &e);
            for append in group {
                let _ = append.done.send(Err(e.clone()));
            }
            return;
        }
        self.next_seq = seq;
        let mut seq = first_seq;
        let mut bucket = (first_seq / BUCKET, 0u64);
        for append in &group {
            for record in &append.records {
                if seq / BUCKET != bucket.0 {
                    *self.buckets.entry(bucket.0).or_insert(0) += bucket.1;
                    bucket = (seq / BUCKET, 0);
                }
                bucket.1 += record.len() as u64;
                seq += 1;
            }
        }
        *self.buckets.entry(bucket.0).or_insert(0) += bucket.1;
        // Counted as stored from now on (the reservation ends here).
        shared.stored_bytes.fetch_add(bytes, Ordering::AcqRel);
        shared.reserved_bytes.fetch_sub(bytes, Ordering::AcqRel);
        lock(&self.pipeline.written).groups.push_back(WrittenGroup { first_seq, appends: group });
        self.pipeline.ready.notify_one();
    }

    /// Saves each consumer's position, forgets finished consumers and deletes the records every
    /// consumer is done with.
    fn housekeeping(&mut self) {
        self.last_housekeeping = Instant::now();
        let shared = &self.shared;
        let mut batch = shared.db.batch();
        // Records not yet handed to consumers are waited for by whoever they go to.
        let routed_below = self.pipeline.routed_below.load(Ordering::Acquire);
        let mut low = routed_below;
        let mut consumers = lock(&shared.consumers);
        consumers.retain(|c| {
            let mut st = lock(&c.state);
            let position = st.position().unwrap_or(routed_below);
            if st.claimed && st.finished() {
                for id in &c.ids {
                    batch.remove(&shared.meta, format!("{META_CONSUMER}{id}"));
                    batch.remove(&shared.meta, format!("{META_POSITION}{id}"));
                }
                return false;
            }
            low = low.min(position);
            if position != st.saved_position {
                st.saved_position = position;
                for id in &c.ids {
                    batch.insert(&shared.meta, format!("{META_POSITION}{id}"), position.to_be_bytes());
                }
            }
            true
        });
        drop(consumers);
        if self.next_seq != self.saved_next_seq {
            self.saved_next_seq = self.next_seq;
            batch.insert(&shared.meta, META_NEXT_SEQ, self.next_seq.to_be_bytes());
        }
        let delete_below = low.min(self.deleted_below + MAX_DELETES);
        for seq in self.deleted_below..delete_below {
            batch.remove_weak(&shared.events, seq.to_be_bytes());
        }
        if batch.is_empty() {
            return;
        }
        if let Err(e) = batch.commit() {
            tracing::warn!(error = %describe(&e), "spool housekeeping failed; retrying");
            return;
        }
        self.deleted_below = self.deleted_below.max(delete_below);
        // Whole buckets below the deletion point no longer count against the bound (all of
        // them when every record is deleted).
        while let Some((&bucket, &bytes)) = self.buckets.first_key_value() {
            if (bucket + 1) * BUCKET > self.deleted_below && self.deleted_below < self.next_seq {
                break;
            }
            self.buckets.remove(&bucket);
            shared.stored_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
        metrics::gauge!("twinroute_spool_bytes").set(shared.stored_bytes.load(Ordering::Acquire) as f64);
        metrics::gauge!("twinroute_spool_events")
            .set(self.next_seq.saturating_sub(self.deleted_below) as f64);
    }
}

/// Marks the spool failed (once): after a failed write or sync the journal's state is unknown,
/// so nothing more is accepted; what was acknowledged before is on disk.
fn fail(shared: &Shared, error: &str) {
    if !shared.failed.swap(true, Ordering::AcqRel) {
        tracing::error!(error, path = %shared.path.display(), "writing the spool failed; refusing events from now on");
    }
}

/// The syncer thread: makes written groups durable (one sync for all waiting), then
/// acknowledges them and hands their events to the consumers.
fn sync_loop(shared: &Shared, pipeline: &Pipeline) {
    let sync_seconds = metrics::histogram!("twinroute_spool_sync_duration_seconds");
    let sync_events = metrics::histogram!("twinroute_spool_sync_events");
    let mut journal: Option<(u64, std::fs::File)> = None;
    loop {
        let groups: Vec<WrittenGroup> = {
            let mut written = lock(&pipeline.written);
            while written.groups.is_empty() && !written.closed {
                written = pipeline.ready.wait(written).unwrap_or_else(|e| e.into_inner());
            }
            if written.groups.is_empty() {
                return;
            }
            written.groups.drain(..).collect()
        };
        let began = Instant::now();
        let result = if shared.failed.load(Ordering::Acquire) {
            Err("an earlier write to the spool failed".to_owned())
        } else {
            sync_journal(&shared.path, &mut journal)
        };
        sync_seconds.record(began.elapsed().as_secs_f64());
        sync_events
            .record(groups.iter().flat_map(|g| &g.appends).map(|a| a.records.len()).sum::<usize>() as f64);
        if let Err(e) = result {
            fail(shared, &e);
            for append in groups.into_iter().flat_map(|g| g.appends) {
                let _ = append.done.send(Err(e.clone()));
            }
            continue;
        }
        let mut end = 0;
        for group in groups {
            end = route(group);
        }
        pipeline.routed_below.store(end, Ordering::Release);
    }
}

/// Syncs what was written to the journal. fjall writes its journal to `<id>.jnl` files in the
/// spool directory, the newest being the active one, and syncs a journal in full before it
/// starts the next; so syncing the newest file after a write covers that write, whichever
/// file it went to. Syncing through our own descriptor (rather than `Database::persist`, which
/// holds the journal's lock while it syncs) lets the writer go on writing meanwhile.
fn sync_journal(dir: &Path, journal: &mut Option<(u64, std::fs::File)>) -> Result<(), String> {
    let newest = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            name.to_str()?.strip_suffix(".jnl")?.parse::<u64>().ok()
        })
        .max()
        .ok_or_else(|| format!("no journal file in {}", dir.display()))?;
    if journal.as_ref().is_none_or(|(id, _)| *id != newest) {
        let file = std::fs::File::open(dir.join(format!("{newest}.jnl"))).map_err(|e| e.to_string())?;
        *journal = Some((newest, file));
    }
    let (_, file) = journal.as_ref().expect("opened above");
    file.sync_data().map_err(|e| e.to_string())
}

/// Hands a durable group's events to their consumers (each consumer locked and woken once),
/// then acknowledges it. Returns the sequence number after the group's last.
fn route(group: WrittenGroup) -> u64 {
    /// A consumer and the (sequence number, event) pairs for it.
    type ForConsumer = (Arc<Consumer>, Vec<(u64, Arc<Envelope>)>);
    let mut routed: Vec<ForConsumer> = Vec::new();
    let mut seq = group.first_seq;
    let mut acks = Vec::with_capacity(group.appends.len());
    for append in group.appends {
        acks.push(append.done);
        for (envelope, consumers) in append.events {
            envelope.spool_seq.store(seq, Ordering::Release);
            for consumer in consumers {
                match routed.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &consumer)) {
                    Some((_, events)) => events.push((seq, envelope.clone())),
                    None => routed.push((consumer, vec![(seq, envelope.clone())])),
                }
            }
            seq += 1;
        }
    }
    for (consumer, events) in routed {
        let mut st = lock(&consumer.state);
        for (seq, envelope) in events {
            st.last_routed = seq;
            st.waiting += 1;
            if st.disk_from.is_none() {
                if envelope.in_memory() && st.memory.len() < consumer.capacity {
                    st.memory.push_back(envelope);
                } else {
                    st.disk_from = Some(seq);
                }
            }
        }
        drop(st);
        consumer.notify.notify_one();
    }
    // Acknowledged once queued, so a 202 means the events are in their endpoints' queues too.
    for ack in acks {
        let _ = ack.send(Ok(()));
    }
    seq
}

#[cfg(test)]
mod tests;
