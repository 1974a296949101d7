//! An in-memory sink: keeps what it is given, and can be told to fail. For tests and for
//! embedding twinroute as a library; not configurable as an endpoint type.

use super::{DeliveryOutcome, Sink, SinkBuildError, SinkFactory};
use crate::config::EndpointConfig;
use crate::delivery::Envelope;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Records every delivered event; `fail_with` makes each delivery return an outcome instead.
pub struct MemorySink {
    delivered: Mutex<Vec<Arc<Envelope>>>,
    /// Count of delivered events, so waiters wake when it grows (no polling).
    count: watch::Sender<usize>,
    failure: Mutex<Option<DeliveryOutcome>>,
    /// Failures to answer before delivering again (consumed one per attempt, before `failure`).
    scripted: Mutex<std::collections::VecDeque<DeliveryOutcome>>,
    attempts: std::sync::atomic::AtomicU64,
}

impl Default for MemorySink {
    fn default() -> Self {
        Self {
            delivered: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            failure: Mutex::new(None),
            scripted: Mutex::new(Default::default()),
            attempts: Default::default(),
        }
    }
}

impl MemorySink {
    /// Events delivered so far, in delivery order.
    pub fn delivered(&self) -> Vec<Arc<Envelope>> {
        self.delivered.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Hands over (and forgets) what was delivered so far.
    pub fn take_delivered(&self) -> Vec<Arc<Envelope>> {
        std::mem::take(&mut *self.delivered.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Makes every following delivery return `outcome` (`None`: deliver again).
    pub fn fail_with(&self, outcome: Option<DeliveryOutcome>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = outcome;
    }

    /// Answers the next attempts with `outcomes`, one each, then delivers again.
    pub fn fail_next(&self, outcomes: impl IntoIterator<Item = DeliveryOutcome>) {
        self.scripted.lock().unwrap_or_else(|e| e.into_inner()).extend(outcomes);
    }

    /// Delivery attempts so far, failed ones included.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until at least `n` events were delivered.
    pub async fn wait_for(&self, n: usize) {
        let mut rx = self.count.subscribe();
        let _ = rx.wait_for(|&c| c >= n).await;
    }
}

#[async_trait]
impl Sink for MemorySink {
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        self.attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(outcome) = self.scripted.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
            if let DeliveryOutcome::Partial { delivered: positions, .. } = &outcome {
                let mut delivered = self.delivered.lock().unwrap_or_else(|e| e.into_inner());
                delivered.extend(positions.iter().filter_map(|&i| batch.get(i).cloned()));
                self.count.send_replace(delivered.len());
            }
            return outcome;
        }
        if let Some(outcome) = self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return outcome;
        }
        let mut delivered = self.delivered.lock().unwrap_or_else(|e| e.into_inner());
        delivered.extend(batch.iter().cloned());
        self.count.send_replace(delivered.len());
        DeliveryOutcome::Delivered
    }
}

/// One dead letter as the memory store keeps it.
#[derive(Debug, Clone)]
pub struct MemoryDeadLetter {
    pub blob_name: String,
    pub body: Vec<u8>,
    pub metadata: Vec<(String, String)>,
}

impl MemoryDeadLetter {
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A dead-letter store in memory, for tests: it can be told to fail.
#[derive(Default)]
pub struct MemoryDeadLetters {
    letters: Mutex<Vec<MemoryDeadLetter>>,
    count: std::sync::OnceLock<watch::Sender<usize>>,
    failure: Mutex<Option<DeliveryOutcome>>,
}

impl MemoryDeadLetters {
    fn count(&self) -> &watch::Sender<usize> {
        self.count.get_or_init(|| watch::Sender::new(0))
    }

    pub fn letters(&self) -> Vec<MemoryDeadLetter> {
        self.letters.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes every following write return `outcome` (`None`: store again).
    pub fn fail_with(&self, outcome: Option<DeliveryOutcome>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = outcome;
    }

    pub async fn wait_for(&self, n: usize) {
        let mut rx = self.count().subscribe();
        let _ = rx.wait_for(|&c| c >= n).await;
    }
}

#[async_trait]
impl crate::delivery::deadletter::DeadLetterStore for MemoryDeadLetters {
    async fn put(&self, record: &crate::delivery::deadletter::DeadLetterRecord<'_>) -> DeliveryOutcome {
        if let Some(outcome) = self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return outcome;
        }
        let letter = MemoryDeadLetter {
            blob_name: record.blob_name(time::OffsetDateTime::now_utc()),
            body: record.envelope.event.to_structured_json(),
            metadata: record.metadata().into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        };
        let mut letters = self.letters.lock().unwrap_or_else(|e| e.into_inner());
        letters.push(letter);
        self.count().send_replace(letters.len());
        DeliveryOutcome::Delivered
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Gives every endpoint, of any type, a [`MemorySink`] (one per endpoint name, kept across
/// reconfigurations so a test sees everything an endpoint name received).
#[derive(Default)]
pub struct MemorySinkFactory {
    sinks: Mutex<HashMap<String, Arc<MemorySink>>>,
    dead_letters: Mutex<HashMap<String, Arc<MemoryDeadLetters>>>,
}

impl MemorySinkFactory {
    /// The dead-letter store of endpoint `name` (endpoints configured with one get it).
    pub fn dead_letters(&self, name: &str) -> Arc<MemoryDeadLetters> {
        self.dead_letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// The sink of endpoint `name` (created on first use).
    pub fn sink(&self, name: &str) -> Arc<MemorySink> {
        self.sinks.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_owned()).or_default().clone()
    }
}

#[async_trait]
impl SinkFactory for MemorySinkFactory {
    fn supports(&self, _: &EndpointConfig) -> bool {
        true
    }

    async fn build(&self, endpoint: &EndpointConfig) -> Result<Arc<dyn Sink>, SinkBuildError> {
        Ok(self.sink(&endpoint.name))
    }

    async fn dead_letters(
        &self,
        endpoint: &EndpointConfig,
    ) -> Result<Option<Arc<dyn crate::delivery::deadletter::DeadLetterStore>>, SinkBuildError> {
        Ok(endpoint.dead_letter.as_ref().map(|_| {
            self.dead_letters(&endpoint.name) as Arc<dyn crate::delivery::deadletter::DeadLetterStore>
        }))
    }
}
