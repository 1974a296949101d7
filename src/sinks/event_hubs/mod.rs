//! The `EventHub` endpoint: events in ADT's AMQP wire form, sent in batches (message format
//! `0x80013700`) filled up to the hub's maximum message size. The partition key is the twin id
//! by default, so one twin's events stay in order in one partition; or none; or a fixed partition.

use super::amqp::message::MessageOptions;
use super::amqp::{AmqpAuth, AmqpClient, AmqpTargetConfig, Service};
use super::{DeliveryOutcome, Sink};
use crate::config::{EndpointConfig, EndpointTarget, Partitioning};
use crate::delivery::Envelope;
use async_trait::async_trait;
use std::sync::Arc;

/// Delivers to one event hub.
#[derive(Debug)]
pub struct EventHubsSink {
    client: AmqpClient,
    partitioning: Partitioning,
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
            ca_file: endpoint.ca_file.clone(),
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
        let by_twin = self.partitioning == Partitioning::TwinId;
        self.client
            .deliver_grouped(&target, batch, by_twin, |key| MessageOptions {
                partition_key: key,
                session_id: None,
            })
            .await
    }

    async fn refresh_credentials(&self) {
        self.client.refresh_credentials().await;
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.client.close().await;
        Ok(())
    }
}
