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
    attempts: std::sync::atomic::AtomicU64,
}

impl Default for MemorySink {
    fn default() -> Self {
        Self {
            delivered: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            failure: Mutex::new(None),
            attempts: Default::default(),
        }
    }
}

impl MemorySink {
    /// Events delivered so far, in delivery order.
    pub fn delivered(&self) -> Vec<Arc<Envelope>> {
        self.delivered.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes every following delivery return `outcome` (`None`: deliver again).
    pub fn fail_with(&self, outcome: Option<DeliveryOutcome>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = outcome;
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
        if let Some(outcome) = self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return outcome;
        }
        let mut delivered = self.delivered.lock().unwrap_or_else(|e| e.into_inner());
        delivered.extend(batch.iter().cloned());
        self.count.send_replace(delivered.len());
        DeliveryOutcome::Delivered
    }
}

/// Gives every endpoint, of any type, a [`MemorySink`] (one per endpoint name, kept across
/// reconfigurations so a test sees everything an endpoint name received).
#[derive(Default)]
pub struct MemorySinkFactory {
    sinks: Mutex<HashMap<String, Arc<MemorySink>>>,
}

impl MemorySinkFactory {
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
}
