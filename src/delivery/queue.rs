//! Where accepted events wait for an endpoint's worker, behind one interface: ingest queues a
//! whole routed submission at once (all or nothing) and, with a durable backend, waits until it
//! is stored; the worker reads in batches and reports each
//! event done (delivered, dead-lettered or dropped). The in-memory queue here is the default; a
//! durable one takes its place without the dispatcher or the workers changing.

use super::Envelope;
use crate::routing::EndpointSet;
use async_trait::async_trait;
use std::any::Any;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Why a submission could not be queued. Nothing of it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveError {
    /// The queue of `targets[target]` holds as much as it may: push back.
    Full { target: usize },
    /// The durable spool holds as many bytes as it may (`spool.max_bytes`): push back.
    SpoolFull { used: u64, limit: u64 },
    /// The spool could not write (a disk error); the message says why.
    Storage(String),
    /// The queue no longer takes events (shutdown).
    Closed,
}

/// The ingest side of an endpoint's queue.
pub trait QueueWriter: Send + Sync + 'static {
    /// Events waiting.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The concrete writer, for the backend that made it.
    fn as_any(&self) -> &dyn Any;
}

/// The worker side of an endpoint's queue.
#[async_trait]
pub trait QueueReader: Send + 'static {
    /// Appends up to `max` events to `buffer`, waiting for at least one; 0 when the queue is
    /// closed (every writer gone) and empty. Cancel-safe: events are handed over only when the
    /// call returns.
    async fn recv_many(&mut self, buffer: &mut Vec<Arc<Envelope>>, max: usize) -> usize;
    /// Events waiting.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The endpoint is done with `envelope` (delivered, dead-lettered or dropped): a durable
    /// queue may forget it now. The memory queue forgets on read.
    fn done(&mut self, _envelope: &Envelope) {}
}

/// One submission, routed: every event with the endpoints it goes to.
pub struct Routed<'a> {
    /// The queues of the endpoints routed to, in route-table order.
    pub targets: &'a [&'a dyn QueueWriter],
    /// Each event and the indexes (into `targets`) of its endpoints; never empty.
    pub events: Vec<(Arc<Envelope>, EndpointSet)>,
    /// How many of the events go to each target.
    pub per_target: &'a [usize],
}

/// A submission that was not queued, and why.
pub type Refused = (ReserveError, Vec<(Arc<Envelope>, EndpointSet)>);

/// When an accepted submission is safe.
pub enum Durability {
    /// At once (the memory queue: safe from nothing but a crash).
    Now,
    /// Once the spool's commit that holds it completes; an error means it was not stored.
    Pending(oneshot::Receiver<Result<(), String>>),
}

/// Makes the queue of each endpoint and queues submissions on them.
pub trait QueueBackend: Send + Sync + 'static {
    fn open(&self, endpoint: &str, capacity: usize) -> (Box<dyn QueueWriter>, Box<dyn QueueReader>);
    /// Queues every event of `routed` on each of its endpoints: all of them, or none (and then
    /// the events come back with the reason).
    fn append(&self, routed: Routed<'_>) -> Result<Durability, Refused>;
    /// Whether events beyond `delivery.max_queued_bytes` may still be accepted (the backend
    /// keeps them on disk, not in memory).
    fn spills(&self) -> bool {
        false
    }
    /// Why the backend refuses events (a failed disk), if it does.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Bounded in-memory queues (tokio channels).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryQueues;

impl QueueBackend for MemoryQueues {
    fn open(&self, _endpoint: &str, capacity: usize) -> (Box<dyn QueueWriter>, Box<dyn QueueReader>) {
        let (sender, receiver) = mpsc::channel(capacity);
        (Box::new(MemoryWriter(sender)), Box::new(MemoryReader(receiver)))
    }

    fn append(&self, routed: Routed<'_>) -> Result<Durability, Refused> {
        // Reserve room in every queue first, so a submission is queued whole or not at all.
        let mut permits = Vec::with_capacity(routed.targets.len());
        for (i, (target, &n)) in routed.targets.iter().zip(routed.per_target).enumerate() {
            if n == 0 {
                permits.push(None);
                continue;
            }
            let writer = target.as_any().downcast_ref::<MemoryWriter>().expect("a memory queue's writer");
            match writer.0.try_reserve_many(n) {
                Ok(p) => permits.push(Some(p)),
                Err(mpsc::error::TrySendError::Full(())) => {
                    return Err((ReserveError::Full { target: i }, routed.events))
                }
                Err(mpsc::error::TrySendError::Closed(())) => {
                    return Err((ReserveError::Closed, routed.events))
                }
            }
        }
        for (envelope, set) in routed.events {
            for i in set.iter() {
                // Room was reserved for every routed event.
                if let Some(permit) = permits[i].as_mut().and_then(Iterator::next) {
                    permit.send(envelope.clone());
                }
            }
        }
        Ok(Durability::Now)
    }
}

struct MemoryWriter(mpsc::Sender<Arc<Envelope>>);
struct MemoryReader(mpsc::Receiver<Arc<Envelope>>);

impl QueueWriter for MemoryWriter {
    fn len(&self) -> usize {
        self.0.max_capacity() - self.0.capacity()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[async_trait]
impl QueueReader for MemoryReader {
    async fn recv_many(&mut self, buffer: &mut Vec<Arc<Envelope>>, max: usize) -> usize {
        self.0.recv_many(buffer, max).await
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_structured;

    fn envelope(id: &str) -> Arc<Envelope> {
        let text = format!(r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"t"}}"#);
        Arc::new(Envelope::new(parse_structured(text.as_bytes()).unwrap()))
    }

    #[tokio::test]
    async fn submissions_are_all_or_nothing_and_reads_come_in_order() {
        let (w1, mut r1) = MemoryQueues.open("a", 3);
        let (w2, _r2) = MemoryQueues.open("b", 1);
        let targets: [&dyn QueueWriter; 2] = [&*w1, &*w2];
        let both = EndpointSet::from_iter([0, 1]);
        let first = EndpointSet::from_iter([0]);
        let append = |events: Vec<(Arc<Envelope>, EndpointSet)>, per_target: &[usize]| {
            MemoryQueues.append(Routed { targets: &targets, events, per_target })
        };
        assert!(matches!(
            append(vec![(envelope("a"), both.clone()), (envelope("b"), first.clone())], &[2, 1]),
            Ok(Durability::Now)
        ));
        // b is full: nothing of the next submission is queued, not even on a.
        assert_eq!(
            append(vec![(envelope("c"), both.clone())], &[1, 1]).err().map(|(why, back)| (why, back.len())),
            Some((ReserveError::Full { target: 1 }, 1))
        );
        assert_eq!(w1.len(), 2);
        let mut buffer = Vec::new();
        assert_eq!(r1.recv_many(&mut buffer, 10).await, 2);
        let ids: Vec<&str> = buffer.iter().map(|e| e.event.id()).collect();
        assert_eq!(ids, ["a", "b"]);
        drop(w1);
        assert_eq!(r1.recv_many(&mut buffer, 10).await, 0, "closed once every writer is gone");
    }
}
