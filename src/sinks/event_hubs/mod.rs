//! The `EventHub` endpoint: events in ADT's AMQP wire form, sent in batches (message format
//! `0x80013700`) filled up to the hub's maximum message size. The partition key is the twin id
//! by default, so one twin's events stay in order in one partition; or none; or a fixed partition.

use super::amqp::message::{batch_envelope, batched_size, encode, event_message, MessageOptions};
use super::amqp::{AmqpAuth, AmqpClient, AmqpTargetConfig, Service};
use super::{DeliveryOutcome, Sink};
use crate::config::{EndpointConfig, EndpointTarget, Partitioning};
use crate::delivery::Envelope;
use async_trait::async_trait;
use std::sync::Arc;

/// Room kept free in a batch for the envelope's own encoding.
const ENVELOPE_OVERHEAD: u64 = 1024;

/// Delivers to one event hub.
#[derive(Debug)]
pub struct EventHubsSink {
    client: AmqpClient,
    partitioning: Partitioning,
}

/// Groups envelopes by key, keeping each key's events in their order (first-seen key order).
pub fn group_by_key(
    batch: &[Arc<Envelope>],
    key: impl Fn(&Envelope) -> Option<String>,
) -> Vec<(Option<String>, Vec<&Arc<Envelope>>)> {
    let mut groups: Vec<(Option<String>, Vec<&Arc<Envelope>>)> = Vec::new();
    for envelope in batch {
        let k = key(envelope);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(envelope),
            None => groups.push((k, vec![envelope])),
        }
    }
    groups
}

/// Sends `group` (all with the same partition key or session) as batches no larger than `max`.
pub(crate) async fn send_group(
    client: &AmqpClient,
    target: &str,
    group: &[&Arc<Envelope>],
    options: &MessageOptions,
    max: u64,
) -> DeliveryOutcome {
    let budget = max.saturating_sub(ENVELOPE_OVERHEAD) as usize;
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut first = None;
    let mut size = 0usize;
    for envelope in group {
        let message = event_message(&envelope.event, options);
        let encoded = match encode(&message) {
            Ok(e) => e,
            Err(reason) => return DeliveryOutcome::Permanent { reason },
        };
        let add = batched_size(encoded.len());
        if add > budget {
            return DeliveryOutcome::Permanent {
                reason: format!(
                    "event {} is {} bytes encoded, over the entity's maximum message size of {max} bytes",
                    envelope.event.id(),
                    encoded.len()
                ),
            };
        }
        if size + add > budget && !pending.is_empty() {
            let envelope_message = batch_envelope(
                first.as_ref().expect("set with the first message"),
                std::mem::take(&mut pending),
            );
            let outcome = client.send(target, envelope_message, true).await;
            if outcome != DeliveryOutcome::Delivered {
                return outcome;
            }
            size = 0;
            first = None;
        }
        if first.is_none() {
            first = Some(message);
        }
        size += add;
        pending.push(encoded);
    }
    match first {
        Some(first) => client.send(target, batch_envelope(&first, pending), true).await,
        None => DeliveryOutcome::Delivered,
    }
}

impl EventHubsSink {
    /// A sink for a checked `EventHub` endpoint; `auth` is its identity or its connection string.
    pub fn new(endpoint: &EndpointConfig, auth: AmqpAuth) -> Result<Self, String> {
        let EndpointTarget::EventHub { namespace, hub, partitioning, .. } = &endpoint.target else {
            return Err(format!("endpoint {} is not an EventHub endpoint", endpoint.name));
        };
        let config = AmqpTargetConfig {
            endpoint: endpoint.name.clone(),
            service: Service::EventHubs,
            namespace: namespace.clone(),
            entity: hub.clone(),
            custom_endpoint: endpoint.custom_endpoint.clone(),
            auth,
        };
        Ok(Self { client: AmqpClient::new(config), partitioning: partitioning.clone() })
    }
}

#[async_trait]
impl Sink for EventHubsSink {
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        let hub = &self.client.config().entity;
        let target = match &self.partitioning {
            Partitioning::Partition(id) => format!("{hub}/Partitions/{id}"),
            _ => hub.clone(),
        };
        let max = match self.client.max_message_size(&target).await {
            Ok(m) => m,
            Err(outcome) => return outcome,
        };
        let groups = match self.partitioning {
            Partitioning::TwinId => group_by_key(batch, |e| e.event.twin_id().map(str::to_owned)),
            _ => group_by_key(batch, |_| None),
        };
        for (key, group) in groups {
            let options = MessageOptions { partition_key: key, session_id: None };
            let outcome = send_group(&self.client, &target, &group, &options, max).await;
            if outcome != DeliveryOutcome::Delivered {
                return outcome;
            }
        }
        DeliveryOutcome::Delivered
    }

    async fn refresh_credentials(&self) {
        self.client.refresh_credentials().await;
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.client.close().await;
        Ok(())
    }
}
