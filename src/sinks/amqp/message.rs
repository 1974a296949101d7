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

/// [`event_message`] encoded, written directly: the same bytes as
/// `encode(&event_message(event, options))` (a test holds them equal for every attribute,
/// extension and size form), at a small fraction of the cost. Encoding each event through the
/// SDK's message types was a third of the daemon's instructions at moderate rates (one message
/// per twin per batch). Sections: message annotations (the partition key), properties
/// (message id, content type, group id), application properties, one data section.
/// (The sinks encode in place with [`encode_event_into`]; this is for one-off messages.)
pub fn encode_event(event: &CloudEvent, options: &MessageOptions) -> Vec<u8> {
    let data = event.data().map(|d| d.bytes.len()).unwrap_or_default();
    let mut out = Vec::with_capacity(data + 512);
    encode_event_into(event, options, &mut out, &mut Vec::new());
    out
}

/// [`encode_event`] appended to `out`, with `scratch` for the sections' contents.
pub fn encode_event_into(
    event: &CloudEvent,
    options: &MessageOptions,
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) {
    let data = event.data().map(|d| &d.bytes[..]).unwrap_or_default();
    put_head(out, scratch, event, options);
    scratch.clear();
    let mut entries = 0u32;
    for attribute in Attribute::ALL {
        if attribute == Attribute::DataContentType {
            continue;
        }
        if let Some(value) = event.attribute(attribute) {
            put_property_name(scratch, attribute.name());
            put_text(scratch, STR8, STR32, value);
            entries += 1;
        }
    }
    for (name, value) in event.extensions() {
        put_property_name(scratch, name);
        match value {
            ExtensionValue::String(s) => put_text(scratch, STR8, STR32, s),
            ExtensionValue::Integer(i) => put_long(scratch, *i),
            ExtensionValue::Boolean(b) => scratch.push(if *b { 0x41 } else { 0x42 }),
        }
        entries += 1;
    }
    put_section(out, 0x74);
    put_compound(out, MAP8, MAP32, scratch, entries * 2);
    put_section(out, 0x75);
    put_text_bytes(out, VBIN8, VBIN32, data);
}

/// The sections an event's message and a batch envelope share: message annotations (the
/// partition key) and properties (message id, content type, group id).
fn put_head(out: &mut Vec<u8>, scratch: &mut Vec<u8>, event: &CloudEvent, options: &MessageOptions) {
    if let Some(key) = &options.partition_key {
        scratch.clear();
        put_text(scratch, SYM8, SYM32, PARTITION_KEY_ANNOTATION);
        put_text(scratch, STR8, STR32, key);
        put_section(out, 0x72);
        put_compound(out, MAP8, MAP32, scratch, 2);
    }
    // Properties: message-id, user-id, to, subject, reply-to, correlation-id, content-type,
    // content-encoding, absolute-expiry-time, creation-time, group-id; trailing nulls left out.
    scratch.clear();
    put_text(scratch, STR8, STR32, event.id());
    let mut count = 1;
    if event.datacontenttype().is_some() || options.session_id.is_some() {
        scratch.extend_from_slice(&[NULL; 5]);
        match event.datacontenttype() {
            Some(ct) => put_text(scratch, SYM8, SYM32, ct),
            None => scratch.push(NULL),
        }
        count = 7;
        if let Some(group) = &options.session_id {
            scratch.extend_from_slice(&[NULL; 3]);
            put_text(scratch, STR8, STR32, group);
            count = 11;
        }
    }
    put_section(out, 0x73);
    put_compound(out, LIST8, LIST32, scratch, count);
}

/// A batch being encoded: the envelope of its first event, then one Data section per
/// message. The bytes of `encode(&envelope_for(first, options, messages))`, written directly.
pub struct EnvelopeWriter {
    bytes: Vec<u8>,
    messages: usize,
}

impl EnvelopeWriter {
    /// Starts the envelope of a batch whose first event is `first`.
    pub fn start(
        first: &CloudEvent,
        options: &MessageOptions,
        capacity: usize,
        scratch: &mut Vec<u8>,
    ) -> Self {
        let mut bytes = Vec::with_capacity(capacity + 256);
        put_head(&mut bytes, scratch, first, options);
        Self { bytes, messages: 0 }
    }

    /// Adds one encoded message as a Data section.
    pub fn push(&mut self, encoded: &[u8]) {
        put_section(&mut self.bytes, 0x75);
        put_text_bytes(&mut self.bytes, VBIN8, VBIN32, encoded);
        self.messages += 1;
    }

    pub fn messages(&self) -> usize {
        self.messages
    }

    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

// AMQP 1.0 encodings (part 1 of the specification), with the size rules of serde_amqp 0.14 (the
// SDK's encoder): the 8-bit forms up to 254 bytes of content.
const NULL: u8 = 0x40;
const VBIN8: u8 = 0xa0;
const VBIN32: u8 = 0xb0;
const STR8: u8 = 0xa1;
const STR32: u8 = 0xb1;
const SYM8: u8 = 0xa3;
const SYM32: u8 = 0xb3;
const LIST8: u8 = 0xc0;
const LIST32: u8 = 0xd0;
const MAP8: u8 = 0xc1;
const MAP32: u8 = 0xd1;

/// A section's descriptor (`0x00`, smallulong code).
fn put_section(out: &mut Vec<u8>, code: u8) {
    out.extend_from_slice(&[0x00, 0x53, code]);
}

fn put_text(out: &mut Vec<u8>, short: u8, long: u8, text: &str) {
    put_text_bytes(out, short, long, text.as_bytes());
}

fn put_text_bytes(out: &mut Vec<u8>, short: u8, long: u8, bytes: &[u8]) {
    if bytes.len() < 255 {
        out.extend_from_slice(&[short, bytes.len() as u8]);
    } else {
        out.push(long);
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

/// `cloudEvents:<name>` as a str8/str32 map key.
fn put_property_name(out: &mut Vec<u8>, name: &str) {
    const PREFIX: &[u8] = b"cloudEvents:";
    let len = PREFIX.len() + name.len();
    if len < 255 {
        out.extend_from_slice(&[STR8, len as u8]);
    } else {
        out.push(STR32);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(PREFIX);
    out.extend_from_slice(name.as_bytes());
}

fn put_long(out: &mut Vec<u8>, value: i64) {
    if (-128..=127).contains(&value) {
        out.extend_from_slice(&[0x55, value as u8]);
    } else {
        out.push(0x81);
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// A list or map: its content (already encoded) and element count.
fn put_compound(out: &mut Vec<u8>, short: u8, long: u8, content: &[u8], count: u32) {
    if content.is_empty() && short == LIST8 {
        out.push(0x45);
        return;
    }
    if content.len() < 255 {
        out.extend_from_slice(&[short, content.len() as u8 + 1, count as u8]);
    } else {
        out.push(long);
        out.extend_from_slice(&(content.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
    }
    out.extend_from_slice(content);
}

/// The envelope of a batch whose first event is `first` through the SDK's message types (the
/// reference [`EnvelopeWriter`] is tested against): what [`batch_envelope`] makes of
/// `event_message(first, options)`, without building the first event's application
/// properties and body only to drop them.
#[cfg(test)]
pub fn envelope_for(first: &CloudEvent, options: &MessageOptions, encoded: Vec<Vec<u8>>) -> AmqpMessage {
    let mut builder = AmqpMessage::builder().with_properties(AmqpMessageProperties {
        message_id: Some(first.id().to_owned().into()),
        content_type: first.datacontenttype().map(AmqpSymbol::from),
        group_id: options.session_id.clone(),
        ..Default::default()
    });
    if let Some(key) = &options.partition_key {
        let mut annotations = azure_core_amqp::message::AmqpAnnotations::new();
        annotations.insert(
            azure_core_amqp::message::AmqpAnnotationKey::Symbol(AmqpSymbol::from(PARTITION_KEY_ANNOTATION)),
            azure_core_amqp::AmqpValue::String(key.clone()),
        );
        builder = builder.with_message_annotations(annotations);
    }
    let mut envelope = builder.build();
    envelope.set_message_body(AmqpMessageBody::Binary(encoded));
    envelope
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

#[cfg(test)]
mod direct_encoding {
    use super::*;
    use crate::event::parse_structured;

    fn options() -> [MessageOptions; 4] {
        [
            MessageOptions::default(),
            MessageOptions { partition_key: Some("room-1".into()), session_id: None },
            MessageOptions { partition_key: None, session_id: Some("room-1".into()) },
            MessageOptions { partition_key: Some("k".repeat(300)), session_id: Some("é".repeat(200)) },
        ]
    }

    fn same_bytes(event: &CloudEvent) {
        for o in options() {
            let expected = encode(&event_message(event, &o)).unwrap();
            assert_eq!(
                encode_event(event, &o),
                expected,
                "{} with {o:?}",
                String::from_utf8_lossy(&event.to_structured_json())
            );
            let envelope = envelope_for(event, &o, vec![expected.clone(), expected.clone()]);
            let sdk_envelope = encode(&envelope).unwrap();
            assert_eq!(
                sdk_envelope,
                encode(&batch_envelope(&event_message(event, &o), vec![expected.clone(), expected.clone()]))
                    .unwrap()
            );
            // What the sinks send: the envelope written directly, byte for byte the SDK's.
            let mut scratch = Vec::new();
            let mut direct = EnvelopeWriter::start(event, &o, 0, &mut scratch);
            let mut in_place = Vec::new();
            encode_event_into(event, &o, &mut in_place, &mut scratch);
            assert_eq!(in_place, expected);
            direct.push(&expected);
            direct.push(&in_place);
            assert_eq!(direct.messages(), 2);
            assert_eq!(direct.finish(), sdk_envelope, "envelope with {o:?}");
        }
    }

    #[test]
    fn the_same_bytes_as_the_sdk_for_the_sample_stream() {
        let mut generator = crate::ingest::sample::SampleGenerator::new(20, 3);
        for _ in 0..300 {
            same_bytes(&generator.next_event());
        }
    }

    #[test]
    fn the_same_bytes_as_the_sdk_for_every_form() {
        let long = "x".repeat(254);
        let longer = "y".repeat(255);
        let cases = [
            // Minimal: no data, no content type, no subject.
            r#"{"specversion":"1.0","id":"1","type":"t","source":"s"}"#.to_owned(),
            // Extensions of every kind and integer size, binary data, unicode.
            r#"{"specversion":"1.0","id":"ü-1","type":"t","source":"s","e1":0,"e2":127,"e3":128,"e4":-128,"e5":-129,"e6":9007199254740991,"e7":true,"e8":false,"e9":"v","data_base64":"AAEC"}"#.to_owned(),
            // Strings at the 8-bit limit and just past it; data just below and above 255 bytes.
            format!(r#"{{"specversion":"1.0","id":"{long}","type":"{longer}","source":"s","subject":"{longer}","datacontenttype":"application/json","data":"{long}"}}"#),
            format!(r#"{{"specversion":"1.0","id":"2","type":"t","source":"s","datacontenttype":"text/plain","data":"{}"}}"#, "z".repeat(100_000)),
            // Application properties past 255 bytes in total (map32), many extensions.
            format!(r#"{{"specversion":"1.0","id":"3","type":"t","source":"s",{}"data":{{"a":1}}}}"#, (0..40).map(|i| format!(r#""ext{i}":"value-{i}","#)).collect::<String>()),
        ];
        for case in &cases {
            same_bytes(&parse_structured(case.as_bytes()).unwrap_or_else(|e| panic!("{case}: {e:?}")));
        }
    }
}
