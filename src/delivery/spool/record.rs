//! One spooled event as stored: which consumers (endpoints) it was routed to, when it was
//! accepted, and the event itself, with a CRC-32 over all of it so damage is detected on read.
//!
//! Layout (integers little-endian; strings and byte strings are a `u32` length then the bytes):
//!
//! ```text
//! u8  version (1)
//! u32 crc32 of everything after this field
//! i64 accepted_at, Unix nanoseconds
//! u8  consumer count, then that many u32 consumer ids
//! str id, str source, str type
//! 5 × optional str (u8 0 | 1 then str): subject, time, datacontenttype, dataschema, traceparent
//! u16 extension count, then per extension: str name, u8 tag (0 string | 1 integer | 2 boolean), value
//! u8  data tag (0 none | 1 JSON | 2 text | 3 binary), then (unless 0) a byte string
//! ```
//!
//! Events were validated when accepted, and the checksum proves the bytes are the ones written,
//! so decoding does not validate again.

use crate::event::{CloudEvent, DataEncoding, EventData, EventKind, ExtensionValue};
use bytes::Bytes;
use std::sync::OnceLock;
use time::OffsetDateTime;

const VERSION: u8 = 1;
/// Version, checksum and timestamp.
const FIXED: usize = 1 + 4 + 8;

/// Why a stored record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("checksum mismatch (the stored bytes are damaged)")]
    Checksum,
    #[error("record ends early or is malformed")]
    Truncated,
}

/// What a record holds besides the event: enough to route it after a restart without decoding
/// the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub accepted_at: OffsetDateTime,
    pub consumers: Vec<u32>,
}

/// Appends the record of `event` to `out`.
pub fn encode(out: &mut Vec<u8>, event: &CloudEvent, accepted_at: OffsetDateTime, consumers: &[u32]) {
    let start = out.len();
    out.push(VERSION);
    out.extend_from_slice(&[0; 4]);
    let nanos = accepted_at.unix_timestamp_nanos().clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    out.extend_from_slice(&nanos.to_le_bytes());
    // At most one consumer per endpoint, and endpoints are capped far below 255.
    let count = consumers.len().min(u8::MAX as usize);
    out.push(count as u8);
    for id in &consumers[..count] {
        out.extend_from_slice(&id.to_le_bytes());
    }
    put_str(out, &event.id);
    put_str(out, &event.source);
    put_str(out, &event.ty);
    for field in [&event.subject, &event.time, &event.datacontenttype, &event.dataschema, &event.traceparent]
    {
        match field {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                put_str(out, s);
            }
        }
    }
    out.extend_from_slice(&(event.extensions.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for (name, value) in event.extensions.iter().take(u16::MAX as usize) {
        put_str(out, name);
        match value {
            ExtensionValue::String(s) => {
                out.push(0);
                put_str(out, s);
            }
            ExtensionValue::Integer(i) => {
                out.push(1);
                out.extend_from_slice(&i.to_le_bytes());
            }
            ExtensionValue::Boolean(b) => {
                out.push(2);
                out.push(u8::from(*b));
            }
        }
    }
    match &event.data {
        None => out.push(0),
        Some(data) => {
            out.push(match data.encoding {
                DataEncoding::Json => 1,
                DataEncoding::Text => 2,
                DataEncoding::Binary => 3,
            });
            put_bytes(out, &data.bytes);
        }
    }
    let crc = crc32fast::hash(&out[start + 5..]);
    out[start + 1..start + 5].copy_from_slice(&crc.to_le_bytes());
}

/// Checks the record's version and checksum and reads its header.
pub fn header(record: &[u8]) -> Result<Header, RecordError> {
    let mut r = checked(record)?;
    read_header(&mut r)
}

/// Reads a whole record back.
pub fn decode(record: &[u8]) -> Result<(Header, CloudEvent), RecordError> {
    let mut r = checked(record)?;
    let header = read_header(&mut r)?;
    let id = r.string()?;
    let source = r.string()?;
    let ty = r.string()?;
    let mut optional = [None, None, None, None, None];
    for slot in &mut optional {
        *slot = match r.u8()? {
            0 => None,
            1 => Some(r.string()?),
            _ => return Err(RecordError::Truncated),
        };
    }
    let [subject, time, datacontenttype, dataschema, traceparent] = optional;
    let count = u16::from_le_bytes(r.array()?);
    let mut extensions = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name = r.string()?;
        let value = match r.u8()? {
            0 => ExtensionValue::String(r.string()?.into()),
            1 => ExtensionValue::Integer(i64::from_le_bytes(r.array()?)),
            2 => ExtensionValue::Boolean(r.u8()? != 0),
            _ => return Err(RecordError::Truncated),
        };
        extensions.push((name, value));
    }
    let data = match r.u8()? {
        0 => None,
        tag => {
            let encoding = match tag {
                1 => DataEncoding::Json,
                2 => DataEncoding::Text,
                3 => DataEncoding::Binary,
                _ => return Err(RecordError::Truncated),
            };
            Some(EventData { bytes: Bytes::copy_from_slice(r.bytes()?), encoding })
        }
    };
    if !r.0.is_empty() {
        return Err(RecordError::Truncated);
    }
    let kind = EventKind::from_type(&ty);
    let event = CloudEvent {
        id,
        source,
        ty,
        subject,
        time,
        datacontenttype,
        dataschema,
        traceparent,
        extensions,
        data,
        kind,
        body: OnceLock::new(),
    };
    Ok((header, event))
}

fn checked(record: &[u8]) -> Result<Reader<'_>, RecordError> {
    if record.len() < FIXED {
        return Err(RecordError::Truncated);
    }
    if record[0] != VERSION {
        return Err(RecordError::Version(record[0]));
    }
    let stored = u32::from_le_bytes(record[1..5].try_into().expect("four bytes"));
    if crc32fast::hash(&record[5..]) != stored {
        return Err(RecordError::Checksum);
    }
    Ok(Reader(&record[5..]))
}

fn read_header(r: &mut Reader<'_>) -> Result<Header, RecordError> {
    let nanos = i64::from_le_bytes(r.array()?);
    let accepted_at =
        OffsetDateTime::from_unix_timestamp_nanos(nanos as i128).map_err(|_| RecordError::Truncated)?;
    let count = r.u8()?;
    let mut consumers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        consumers.push(u32::from_le_bytes(r.array()?));
    }
    Ok(Header { accepted_at, consumers })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Events are bounded by ingest.max_event_bytes, far below 4 GiB.
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn bytes(&mut self) -> Result<&'a [u8], RecordError> {
        let n = u32::from_le_bytes(self.array()?) as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<Box<str>, RecordError> {
        std::str::from_utf8(self.bytes()?).map(Into::into).map_err(|_| RecordError::Truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{from_binary, parse_structured};

    fn roundtrip(event: &CloudEvent) -> CloudEvent {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        let mut out = Vec::new();
        encode(&mut out, event, at, &[3, 7]);
        let (header, back) = decode(&out).unwrap();
        assert_eq!(header, Header { accepted_at: at, consumers: vec![3, 7] });
        assert_eq!(super::header(&out).unwrap(), header);
        back
    }

    #[test]
    fn every_attribute_extension_and_data_form_survives() {
        let text = br#"{"specversion":"1.0","id":"1","source":"https://x.api.wus2.digitaltwins.azure.net","type":"Microsoft.DigitalTwins.Twin.Update","subject":"room-1","time":"2026-01-01T00:00:00Z","datacontenttype":"application/json","dataschema":"dtmi:x;1","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","tracestate":"a=b","count":42,"flag":true,"data":{"patch":[{"op":"replace","path":"/t","value":21.5}]}}"#;
        let event = parse_structured(text).unwrap();
        let back = roundtrip(&event);
        assert_eq!(back, event);
        assert_eq!(back.kind(), event.kind());
        assert_eq!(back.twin_id(), Some("room-1"));
        assert_eq!(back.to_structured_json(), event.to_structured_json());

        let text = br#"{"specversion":"1.0","id":"2","source":"s","type":"t","datacontenttype":"text/plain","data":"hello"}"#;
        let event = parse_structured(text).unwrap();
        assert_eq!(roundtrip(&event), event);

        let headers: &[(&str, &[u8])] =
            &[("specversion", b"1.0"), ("id", b"3"), ("source", b"s"), ("type", b"t")];
        let event =
            from_binary(headers, Some("application/octet-stream"), Bytes::from_static(&[0, 159, 146, 150]))
                .unwrap();
        assert_eq!(roundtrip(&event), event);

        let event = parse_structured(br#"{"specversion":"1.0","id":"4","source":"s","type":"t"}"#).unwrap();
        assert_eq!(roundtrip(&event), event);
    }

    #[test]
    fn damage_is_detected_not_decoded() {
        let event =
            parse_structured(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"a":1}}"#)
                .unwrap();
        let mut out = Vec::new();
        encode(&mut out, &event, OffsetDateTime::UNIX_EPOCH, &[1]);
        for i in 1..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "a flipped bit at byte {i} went unnoticed");
        }
        for cut in 0..out.len() {
            assert!(decode(&out[..cut]).is_err(), "a record cut at {cut} bytes was accepted");
        }
        let mut bad = out.clone();
        bad[0] = 9;
        assert_eq!(decode(&bad).err(), Some(RecordError::Version(9)));
    }
}
