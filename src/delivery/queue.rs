//! Where accepted events wait for an endpoint's worker, behind one interface: ingest reserves
//! room for a whole submission and then writes it; the worker reads in batches and reports each
//! event done (delivered, dead-lettered or dropped). The in-memory queue here is the default; a
//! durable one takes its place without the dispatcher or the workers changing.

use super::Envelope;
use async_trait::async_trait;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Why room could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveError {
    /// The queue holds as much as it may: push back.
    Full,
    /// The queue no longer takes events (shutdown).
    Closed,
}

/// Room for some events, reserved all at once; unused room is given back when dropped.
pub trait Reservation: Send {
    /// Writes one event into reserved room (at most as many as reserved).
    fn push(&mut self, envelope: Arc<Envelope>);
}

/// The ingest side of an endpoint's queue.
pub trait QueueWriter: Send + Sync + 'static {
    /// Room for `n` events, or none.
    fn reserve(&self, n: usize) -> Result<Box<dyn Reservation + '_>, ReserveError>;
    /// Events waiting.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The worker side of an endpoint's queue.
#[async_trait]
pub trait QueueReader: Send + 'static {
    /// Appends up to `max` events to `buffer`, waiting for at least one; 0 when the queue is
    /// closed (every writer gone) and empty.
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

/// Makes the queue of each endpoint.
pub trait QueueBackend: Send + Sync + 'static {
    fn open(&self, endpoint: &str, capacity: usize) -> (Box<dyn QueueWriter>, Box<dyn QueueReader>);
}

/// Bounded in-memory queues (tokio channels).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryQueues;

impl QueueBackend for MemoryQueues {
    fn open(&self, _endpoint: &str, capacity: usize) -> (Box<dyn QueueWriter>, Box<dyn QueueReader>) {
        let (sender, receiver) = mpsc::channel(capacity);
        (Box::new(MemoryWriter(sender)), Box::new(MemoryReader(receiver)))
    }
}

struct MemoryWriter(mpsc::Sender<Arc<Envelope>>);
struct MemoryReader(mpsc::Receiver<Arc<Envelope>>);
struct MemoryReservation<'a>(mpsc::PermitIterator<'a, Arc<Envelope>>);

impl Reservation for MemoryReservation<'_> {
    fn push(&mut self, envelope: Arc<Envelope>) {
        // Callers push at most what they reserved (a dispatcher invariant).
        if let Some(permit) = self.0.next() {
            permit.send(envelope);
        }
    }
}

impl QueueWriter for MemoryWriter {
    fn reserve(&self, n: usize) -> Result<Box<dyn Reservation + '_>, ReserveError> {
        match self.0.try_reserve_many(n) {
            Ok(permits) => Ok(Box::new(MemoryReservation(permits))),
            Err(mpsc::error::TrySendError::Full(())) => Err(ReserveError::Full),
            Err(mpsc::error::TrySendError::Closed(())) => Err(ReserveError::Closed),
        }
    }

    fn len(&self) -> usize {
        self.0.max_capacity() - self.0.capacity()
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
    async fn reservations_are_all_or_nothing_and_reads_come_in_order() {
        let (writer, mut reader) = MemoryQueues.open("e", 3);
        {
            let mut r = writer.reserve(2).unwrap();
            r.push(envelope("a"));
            r.push(envelope("b"));
        }
        assert_eq!(writer.reserve(2).err(), Some(ReserveError::Full));
        assert_eq!(writer.len(), 2);
        let mut buffer = Vec::new();
        assert_eq!(reader.recv_many(&mut buffer, 10).await, 2);
        let ids: Vec<&str> = buffer.iter().map(|e| e.event.id()).collect();
        assert_eq!(ids, ["a", "b"]);
        // Unused reserved room is given back.
        drop(writer.reserve(3).unwrap());
        assert!(writer.is_empty());
        drop(writer);
        assert_eq!(reader.recv_many(&mut buffer, 10).await, 0, "closed once every writer is gone");
    }
}
