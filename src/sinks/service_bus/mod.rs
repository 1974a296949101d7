//! The `ServiceBus` endpoint (topic, as ADT, or queue): events in ADT's AMQP wire form, in
//! batches up to the entity's maximum message size; message id = event id (duplicate detection),
//! optional session id = twin id (a batch holds one session's events).

use super::amqp::message::MessageOptions;
use super::amqp::{AmqpAuth, AmqpClient, AmqpTargetConfig, Service};
use super::{DeliveryOutcome, Sink};
use crate::config::{EndpointConfig, EndpointTarget, SessionIdFrom};
use crate::delivery::Envelope;
use async_trait::async_trait;
use std::sync::Arc;

/// Delivers to one queue or topic.
#[derive(Debug)]
pub struct ServiceBusSink {
    client: AmqpClient,
    session_id: SessionIdFrom,
}

impl ServiceBusSink {
    pub fn new(endpoint: &EndpointConfig, auth: AmqpAuth) -> Result<Self, String> {
        let EndpointTarget::ServiceBus { namespace, entity, session_id, .. } = &endpoint.target else {
            return Err(format!("endpoint {} is not a ServiceBus endpoint", endpoint.name));
        };
        let config = AmqpTargetConfig {
            endpoint: endpoint.name.clone(),
            service: Service::ServiceBus,
            namespace: namespace.clone(),
            entity: entity.clone(),
            custom_endpoint: endpoint.custom_endpoint.clone(),
            ca_file: endpoint.ca_file.clone(),
            auth,
        };
        Ok(Self { client: AmqpClient::new(config), session_id: *session_id })
    }
}

#[async_trait]
impl Sink for ServiceBusSink {
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        let target = self.client.config().entity.clone();
        let by_twin = self.session_id == SessionIdFrom::TwinId;
        self.client
            .deliver_grouped(&target, batch, by_twin, |session| MessageOptions {
                partition_key: None,
                session_id: session,
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
