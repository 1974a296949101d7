//! The structured-mode JSON form of an event: what file endpoints write, what Event Grid's
//! CloudEvents schema receives and what a dead-letter blob holds.

use super::{Attribute, CloudEvent, DataEncoding, ExtensionValue};
use base64::Engine as _;

/// Appends `s` as a JSON string.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("serializing a string into memory");
}

/// Writes the members of a JSON object by hand (so raw data bytes can go in untouched): the
/// caller writes the braces, this the commas and keys.
#[derive(Default)]
pub(crate) struct Members {
    first_written: bool,
}

impl Members {
    /// Appends `,"name":` (no comma before the first member).
    pub(crate) fn key(&mut self, out: &mut Vec<u8>, name: &str) {
        if self.first_written {
            out.push(b',');
        }
        self.first_written = true;
        write_str(out, name);
        out.push(b':');
    }

    /// The event data as CloudEvents' JSON format writes it: `"data"` with the JSON bytes as
    /// they are or the text as a string, or `"data_base64"`.
    pub(crate) fn data(&mut self, out: &mut Vec<u8>, data: &super::EventData) {
        match data.encoding {
            DataEncoding::Json => {
                self.key(out, "data");
                out.extend_from_slice(&data.bytes);
            }
            DataEncoding::Text => {
                self.key(out, "data");
                // Text data was a JSON string, so it is valid UTF-8.
                write_str(out, &String::from_utf8_lossy(&data.bytes));
            }
            DataEncoding::Binary => {
                self.key(out, "data_base64");
                write_str(out, &base64::engine::general_purpose::STANDARD.encode(&data.bytes));
            }
        }
    }
}

impl CloudEvent {
    /// Appends the structured JSON form (one object, no trailing newline) to `out`.
    pub fn write_structured_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        let mut members = Members::default();
        for attribute in Attribute::ALL {
            if let Some(value) = self.attribute(attribute) {
                members.key(out, attribute.name());
                write_str(out, value);
            }
        }
        for (name, value) in &self.extensions {
            members.key(out, name);
            match value {
                ExtensionValue::String(s) => write_str(out, s),
                ExtensionValue::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
                ExtensionValue::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            }
        }
        if let Some(data) = &self.data {
            members.data(out, data);
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use crate::event::parse_structured;

    #[test]
    fn structured_round_trip_is_exact() {
        for input in [
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"a\"b","time":"2021-12-09T20:28:52.6745538Z","tracestate":"x","n":-4,"b":false,"data":{"k": [1, 2]}}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"text/plain","data":"line\nbreak"}"#,
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"AAECAw=="}"#,
        ] {
            let event = parse_structured(input.as_bytes()).unwrap();
            let encoded = event.to_structured_json();
            let again = parse_structured(&encoded).unwrap();
            assert_eq!(event, again, "{}", String::from_utf8_lossy(&encoded));
        }
    }

    #[test]
    fn attribute_order_is_stable() {
        let event =
            parse_structured(br#"{"type":"t","data":{},"id":"1","source":"s","specversion":"1.0"}"#).unwrap();
        assert_eq!(
            String::from_utf8(event.to_structured_json()).unwrap(),
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":{}}"#
        );
    }
}
