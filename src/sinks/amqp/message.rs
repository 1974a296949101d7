//! The ADT wire form on AMQP (Event Hubs and Service Bus alike), pure: the body is the event's
//! `data` bytes untouched; every present attribute except `datacontenttype` becomes an
//! application property `cloudEvents:<name>` (the CloudEvents AMQP binding, binary mode);
//! `datacontenttype` is the AMQP `content-type`; the message id is the event id (so Service Bus
//! duplicate detection works).

use crate::event::{Attribute, CloudEvent, ExtensionValue};
use azure_core_amqp::message::{AmqpMessageBody, AmqpMessageProperties};
use azure_core_amqp::{AmqpMessage, AmqpSymbol};

/// The message format of an Event Hubs / Service Bus batch: one Data section per encoded message.
pub const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;
/// The annotation carrying an Event Hubs partition key.
pub const PARTITION_KEY_ANNOTATION: &str = "x-opt-partition-key";

/// Per-message options decided by the sink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageOptions {
    /// Event Hubs partition key (annotation `x-opt-partition-key`).
    pub partition_key: Option<String>,
    /// Service Bus session id (the AMQP `group-id`).
    pub session_id: Option<String>,
}

/// The application property name of an attribute.
pub fn property_name(attribute: &str) -> String {
    format!("cloudEvents:{attribute}")
}

/// One event as one AMQP message.
pub fn event_message(event: &CloudEvent, options: &MessageOptions) -> AmqpMessage {
    let mut builder = AmqpMessage::builder();
    for attribute in Attribute::ALL {
        if attribute == Attribute::DataContentType {
            continue;
        }
        if let Some(value) = event.attribute(attribute) {
            builder = builder.add_application_property(property_name(attribute.name()), value.to_owned());
        }
    }
    for (name, value) in event.extensions() {
        builder = match value {
            ExtensionValue::String(s) => builder.add_application_property(property_name(name), s.clone()),
            ExtensionValue::Integer(i) => builder.add_application_property(property_name(name), *i),
            ExtensionValue::Boolean(b) => builder.add_application_property(property_name(name), *b),
        };
    }
    builder = builder.with_properties(AmqpMessageProperties {
        message_id: Some(event.id().to_owned().into()),
        content_type: event.datacontenttype().map(AmqpSymbol::from),
        group_id: options.session_id.clone(),
        ..Default::default()
    });
    let body = event.data().map(|d| d.bytes.to_vec()).unwrap_or_default();
    builder = builder.with_body(AmqpMessageBody::Binary(vec![body]));
    let mut message = builder.build();
    if let Some(key) = &options.partition_key {
        message.add_message_annotation(AmqpSymbol::from(PARTITION_KEY_ANNOTATION), key.clone());
    }
    message
}

/// Bytes a message adds to a batch: its encoding plus the Data section header around it
/// (5 bytes under 256 bytes, 8 above, as the Event Hubs SDK counts).
pub fn batched_size(encoded_len: usize) -> usize {
    encoded_len + if encoded_len < 256 { 5 } else { 8 }
}

/// A batch of encoded messages: the envelope carries the first message's properties and
/// annotations (so a partition key or session id applies to the batch, as the SDKs do), and
/// one Data section per message. Send it with message format [`BATCH_MESSAGE_FORMAT`].
pub fn batch_envelope(first: &AmqpMessage, encoded: Vec<Vec<u8>>) -> AmqpMessage {
    let mut builder = AmqpMessage::builder();
    if let Some(p) = &first.properties {
        builder = builder.with_properties(p.clone());
    }
    if let Some(a) = &first.message_annotations {
        builder = builder.with_message_annotations(a.clone());
    }
    let mut envelope = builder.build();
    envelope.set_message_body(AmqpMessageBody::Binary(encoded));
    envelope
}

/// Encodes a message as it travels inside a batch.
pub fn encode(message: &AmqpMessage) -> Result<Vec<u8>, String> {
    AmqpMessage::serialize(message).map_err(|e| format!("encoding an AMQP message failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_structured;
    use azure_core_amqp::message::{AmqpAnnotationKey, AmqpMessageId};
    use azure_core_amqp::{AmqpSimpleValue, AmqpValue};

    const EVENT: &str = r#"{"specversion":"1.0","id":"e-1","type":"Microsoft.DigitalTwins.Twin.Update","source":"adt.api.wus2.digitaltwins.azure.net","subject":"room-1","time":"2021-12-09T20:28:52.9795363Z","datacontenttype":"application/json","traceparent":"00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01","tracestate":"a=b","data":{"modelId":"dtmi:x;1","patch":[{"op":"replace","path":"/t","value": 21.5}]}}"#;

    #[test]
    fn the_adt_wire_form() {
        let event = parse_structured(EVENT.as_bytes()).unwrap();
        let options =
            MessageOptions { partition_key: Some("room-1".into()), session_id: Some("room-1".into()) };
        let m = event_message(&event, &options);
        let props = &m.application_properties.as_ref().unwrap().0;
        let get = |k: &str| props.get(&k.to_owned()).cloned();
        assert_eq!(get("cloudEvents:id"), Some(AmqpSimpleValue::String("e-1".into())));
        assert_eq!(get("cloudEvents:specversion"), Some(AmqpSimpleValue::String("1.0".into())));
        assert_eq!(
            get("cloudEvents:type"),
            Some(AmqpSimpleValue::String("Microsoft.DigitalTwins.Twin.Update".into()))
        );
        assert_eq!(
            get("cloudEvents:source"),
            Some(AmqpSimpleValue::String("adt.api.wus2.digitaltwins.azure.net".into()))
        );
        assert_eq!(get("cloudEvents:subject"), Some(AmqpSimpleValue::String("room-1".into())));
        assert_eq!(
            get("cloudEvents:time"),
            Some(AmqpSimpleValue::String("2021-12-09T20:28:52.9795363Z".into()))
        );
        assert_eq!(get("cloudEvents:tracestate"), Some(AmqpSimpleValue::String("a=b".into())));
        assert!(get("cloudEvents:datacontenttype").is_none());
        assert!(get("cloudEvents:dataschema").is_none(), "absent attributes are left out");
        let p = m.properties.as_ref().unwrap();
        assert_eq!(p.message_id, Some(AmqpMessageId::String("e-1".into())));
        assert_eq!(p.content_type, Some(AmqpSymbol::from("application/json")));
        assert_eq!(p.group_id.as_deref(), Some("room-1"));
        let annotations = &m.message_annotations.as_ref().unwrap().0;
        assert_eq!(
            annotations.get(&AmqpAnnotationKey::Symbol(AmqpSymbol::from(PARTITION_KEY_ANNOTATION))),
            Some(&AmqpValue::String("room-1".into()))
        );
        let data = event.data().unwrap().bytes.to_vec();
        assert_eq!(m.body, AmqpMessageBody::Binary(vec![data]));
    }

    #[test]
    fn batches_keep_every_message_and_the_first_ones_envelope() {
        let event = parse_structured(EVENT.as_bytes()).unwrap();
        let options = MessageOptions { partition_key: Some("room-1".into()), session_id: None };
        let m = event_message(&event, &options);
        let encoded = encode(&m).unwrap();
        assert_eq!(batched_size(encoded.len()), encoded.len() + 8);
        let envelope = batch_envelope(&m, vec![encoded.clone(), encoded.clone()]);
        assert_eq!(envelope.body, AmqpMessageBody::Binary(vec![encoded.clone(), encoded]));
        assert!(envelope.message_annotations.is_some());
        assert!(envelope.application_properties.is_none());
    }
}
