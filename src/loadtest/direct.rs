//! `twinroute loadtest --endpoints CONFIG`: the load goes through twinroute's delivery pipeline
//! in this process (routes, queues or spool, retries, dead-lettering) to the configuration's
//! endpoints, with no HTTP in front: a load generator for whatever consumes the real Event
//! Hubs, Service Bus or Event Grid endpoints downstream.

use super::{SendOutcome, Target};
use crate::app::{RunOptions, Running, ShutdownReport};
use crate::config::Config;
use crate::delivery::{EndpointStats, Refusal};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The configuration's pipeline, started embedded (no listeners, no sources).
pub struct Pipeline {
    running: Running,
}

/// What the endpoints did with the load, read from the pipeline after it drained.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EndpointTotals {
    pub endpoint: String,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub dropped: u64,
    /// Still queued when the drain deadline passed.
    pub undelivered: u64,
}

impl Pipeline {
    /// Starts the configuration's endpoints and routes.
    pub async fn start(config: Config) -> Result<Self, crate::app::StartError> {
        let running = Running::start(config, RunOptions { embedded: true, ..Default::default() }).await?;
        Ok(Self { running })
    }

    /// Drains the queues (up to the configuration's shutdown timeout) and reports per endpoint.
    pub async fn finish(self) -> Vec<EndpointTotals> {
        // The counters only: holding an endpoint's handle would keep its queue open.
        let stats: Vec<(String, Arc<EndpointStats>)> = self
            .running
            .dispatcher
            .snapshot()
            .endpoints
            .values()
            .map(|h| (h.name().to_owned(), h.stats.clone()))
            .collect();
        let ShutdownReport { undelivered, .. } = self.running.stop().await;
        stats
            .into_iter()
            .map(|(endpoint, s)| EndpointTotals {
                delivered: s.delivered.load(Ordering::Relaxed),
                dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
                dropped: s.dropped.load(Ordering::Relaxed),
                undelivered: undelivered.iter().find(|(name, _)| *name == endpoint).map_or(0, |(_, n)| *n),
                endpoint,
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl Target for Pipeline {
    async fn send(&self, _connection: usize, events: Vec<serde_json::Value>) -> SendOutcome {
        let events = match super::parse_values(&events) {
            Ok(e) => e,
            Err(outcome) => return outcome,
        };
        match self.running.dispatcher.submit(events, "loadtest").await {
            Ok(_) => SendOutcome::Accepted,
            Err(Refusal::Full { .. } | Refusal::Bytes { .. } | Refusal::SpoolFull { .. }) => {
                SendOutcome::Refused
            }
            Err(e) => SendOutcome::Error(e.to_string()),
        }
    }
}
