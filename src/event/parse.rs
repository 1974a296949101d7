//! Parsers for the three HTTP forms of a CloudEvent (structured, batch, binary). Each collects
//! every problem it finds rather than stopping at the first: a producer fixing a batch wants the
//! whole list.

use super::validate;
use super::{
    Attribute, CloudEvent, DataEncoding, EventData, EventKind, EventProblem, ExtensionValue, SPEC_VERSION,
};
use base64::Engine as _;
use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

/// A JSON object's members in order, values left unparsed (borrowed from the input).
struct RawObject<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object (one CloudEvent)")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                object_members(map)
            }
        }
        d.deserialize_map(V)
    }
}

fn object_members<'de, A: MapAccess<'de>>(mut map: A) -> Result<RawObject<'de>, A::Error> {
    let mut members = Vec::with_capacity(10);
    while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
        let value: &'de RawValue = map.next_value()?;
        members.push((key, value));
    }
    Ok(RawObject(members))
}

/// A member name, borrowed from the input unless it has escapes. (`Cow<str>`'s own
/// `Deserialize` always allocates.)
struct Key<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A JSON string's value: the text between the quotes when it has no escapes (the input was
/// already checked as JSON, which has no raw control characters in strings), else unescaped.
fn json_string(raw: &RawValue) -> Result<Cow<'_, str>, serde_json::Error> {
    let text = raw.get();
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Ok(Cow::Borrowed(inner)),
        _ => serde_json::from_str::<String>(text).map(Cow::Owned),
    }
}

/// One element of a batch: an object's members (values left unparsed), or what else it is.
enum Element<'a> {
    Object(RawObject<'a>),
    /// Not an object: what it is, for the error message.
    Other(&'static str),
}

impl<'de> serde::Deserialize<'de> for Element<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Element<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                object_members(map).map(Element::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Element::Other("an array"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Element::Other("a string"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Element::Other("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Element::Other("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Element::Other("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Element::Other("a number"))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Element::Other("null"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A batch's elements, each read once: the whole batch is scanned in one pass.
struct Elements<'a>(Vec<Element<'a>>);

impl<'de> serde::Deserialize<'de> for Elements<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Elements<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON array of CloudEvents")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(item) = seq.next_element::<Element<'de>>()? {
                    items.push(item);
                }
                Ok(Elements(items))
            }
        }
        d.deserialize_seq(V)
    }
}

/// What a JSON value is, for error messages.
fn json_kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// Collects attributes from any encoding, then validates them all at once.
#[derive(Default)]
struct EventBuilder {
    id: Option<String>,
    source: Option<String>,
    ty: Option<String>,
    specversion: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    traceparent: Option<String>,
    extensions: Vec<(Box<str>, ExtensionValue)>,
    data: Option<EventData>,
    problems: Vec<EventProblem>,
    /// The members given so far: a bit per known member ([`known_member`]), the names of the
    /// others.
    seen_known: u16,
    seen_other: Vec<Box<str>>,
}

/// The bit of a member whose repeats are noted with one: the context attributes (by their
/// place in [`Attribute::ALL`]), then `data` and `data_base64`.
fn known_member(name: &str) -> Option<usize> {
    match name {
        "data" => Some(Attribute::ALL.len()),
        "data_base64" => Some(Attribute::ALL.len() + 1),
        _ => Attribute::ALL.iter().position(|a| a.name() == name),
    }
}

impl EventBuilder {
    /// Records that `name` was given, reporting a repeat (a JSON object with the same member twice,
    /// or the same `ce-` header twice: which one wins would be a guess).
    fn first_time(&mut self, name: &str) -> bool {
        let repeated = match known_member(name) {
            Some(i) => {
                let seen = self.seen_known & 1 << i != 0;
                self.seen_known |= 1 << i;
                seen
            }
            None if self.seen_other.iter().any(|s| &**s == name) => true,
            None => {
                self.seen_other.push(name.into());
                false
            }
        };
        if repeated {
            self.problems.push(EventProblem::attr(name, "given more than once"));
        }
        !repeated
    }

    fn slot(&mut self, name: &str) -> Option<&mut Option<String>> {
        Some(match name {
            "id" => &mut self.id,
            "source" => &mut self.source,
            "type" => &mut self.ty,
            "specversion" => &mut self.specversion,
            "subject" => &mut self.subject,
            "time" => &mut self.time,
            "datacontenttype" => &mut self.datacontenttype,
            "dataschema" => &mut self.dataschema,
            "traceparent" => &mut self.traceparent,
            _ => return None,
        })
    }

    /// A context attribute given as a string (binary mode headers, or JSON strings).
    fn set_string(&mut self, name: &str, value: String) {
        if !self.first_time(name) {
            return;
        }
        match self.slot(name) {
            Some(slot) => *slot = Some(value),
            None => self.extension(name, ExtensionValue::String(value)),
        }
    }

    fn extension(&mut self, name: &str, value: ExtensionValue) {
        match validate::extension_name(name) {
            Ok(()) => self.extensions.push((name.into(), value)),
            Err(message) => self.problems.push(EventProblem::attr(name, message)),
        }
    }

    /// A context attribute given as another JSON type.
    fn not_a_string(&mut self, name: &str, raw: &RawValue) {
        if self.first_time(name) {
            let message = format!("must be a string, found {}", json_kind(raw));
            self.problems.push(EventProblem::attr(name, message));
        }
    }

    /// A member of a structured-mode JSON object.
    fn set_json(&mut self, name: &str, raw: &RawValue) {
        match name {
            "data" => {
                if self.first_time(name) && !is_null(raw) {
                    // Decided in `finish`, once `datacontenttype` is known.
                    self.data = Some(EventData {
                        bytes: Bytes::copy_from_slice(raw.get().as_bytes()),
                        encoding: DataEncoding::Json,
                    });
                }
            }
            "data_base64" => {
                if !self.first_time(name) || is_null(raw) {
                    return;
                }
                match json_string(raw) {
                    Ok(text) => match base64::engine::general_purpose::STANDARD.decode(text.as_bytes()) {
                        Ok(bytes) => {
                            if self.data.is_some() {
                                self.problems.push(EventProblem::attr(
                                    "data_base64",
                                    "data and data_base64 are mutually exclusive",
                                ));
                            } else {
                                self.data =
                                    Some(EventData { bytes: bytes.into(), encoding: DataEncoding::Binary });
                            }
                        }
                        Err(e) => self
                            .problems
                            .push(EventProblem::attr("data_base64", format!("not valid base64: {e}"))),
                    },
                    Err(_) => self.problems.push(EventProblem::attr(
                        "data_base64",
                        format!("must be a string, found {}", json_kind(raw)),
                    )),
                }
            }
            _ => {
                // CloudEvents' JSON format: a null attribute is an absent one.
                if is_null(raw) {
                    return;
                }
                let is_context = self.slot(name).is_some();
                match raw.get().as_bytes().first() {
                    Some(b'"') => match json_string(raw) {
                        Ok(s) => self.set_string(name, s.into_owned()),
                        Err(e) => self.problems.push(EventProblem::attr(name, format!("unreadable string: {e}"))),
                    },
                    _ if is_context => self.not_a_string(name, raw),
                    Some(b't' | b'f') if self.first_time(name) => {
                        self.extension(name, ExtensionValue::Boolean(raw.get() == "true"))
                    }
                    Some(b'-' | b'0'..=b'9') if self.first_time(name) => match raw.get().parse::<i64>() {
                        Ok(i) => self.extension(name, ExtensionValue::Integer(i)),
                        Err(_) => self.problems.push(EventProblem::attr(
                            name,
                            "extension attributes may be strings, integers or booleans; found a non-integer number",
                        )),
                    },
                    Some(b'{' | b'[') if self.first_time(name) => self.problems.push(EventProblem::attr(
                        name,
                        format!(
                            "extension attributes may be strings, integers or booleans; found {}",
                            json_kind(raw)
                        ),
                    )),
                    _ => {}
                }
            }
        }
    }

    fn finish(mut self) -> Result<CloudEvent, Vec<EventProblem>> {
        let mut problems = std::mem::take(&mut self.problems);
        match self.specversion.as_deref() {
            None => problems.push(EventProblem::attr("specversion", "required attribute is missing")),
            Some(SPEC_VERSION) => {}
            Some(other) => problems.push(EventProblem::attr(
                "specversion",
                format!("unsupported spec version {other:?}: twinroute accepts CloudEvents \"1.0\""),
            )),
        }
        for (name, value) in [("id", &self.id), ("source", &self.source), ("type", &self.ty)] {
            match value {
                None => problems.push(EventProblem::attr(name, "required attribute is missing")),
                Some(v) => {
                    if let Err(m) = validate::plain_string(v) {
                        problems.push(EventProblem::attr(name, m));
                    }
                }
            }
        }
        for (name, value) in [("subject", &self.subject), ("dataschema", &self.dataschema)] {
            if let Some(v) = value {
                if let Err(m) = validate::plain_string(v) {
                    problems.push(EventProblem::attr(name, m));
                }
            }
        }
        type Check = fn(&str) -> Result<(), String>;
        let checks: [(&str, &Option<String>, Check); 3] = [
            ("time", &self.time, validate::time),
            ("traceparent", &self.traceparent, validate::traceparent),
            ("datacontenttype", &self.datacontenttype, validate::media_type),
        ];
        for (name, value, check) in checks {
            if let Some(v) = value {
                if let Err(m) = check(v) {
                    problems.push(EventProblem::attr(name, m));
                }
            }
        }
        // Structured `data` under a non-JSON content type: a JSON string means text, as the
        // CloudEvents JSON format says; anything else stays JSON.
        if let (Some(data), Some(ct)) = (&mut self.data, &self.datacontenttype) {
            if data.encoding == DataEncoding::Json
                && !validate::is_json_media_type(ct)
                && data.bytes.first() == Some(&b'"')
            {
                match serde_json::from_slice::<String>(&data.bytes) {
                    Ok(text) => *data = EventData { bytes: text.into(), encoding: DataEncoding::Text },
                    Err(e) => problems.push(EventProblem::attr("data", format!("unreadable string: {e}"))),
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let ty: Box<str> = self.ty.unwrap_or_default().into();
        Ok(CloudEvent {
            id: self.id.unwrap_or_default().into(),
            source: self.source.unwrap_or_default().into(),
            kind: EventKind::from_type(&ty),
            ty,
            subject: self.subject.map(Into::into),
            time: self.time.map(Into::into),
            datacontenttype: self.datacontenttype.map(Into::into),
            dataschema: self.dataschema.map(Into::into),
            traceparent: self.traceparent.map(Into::into),
            extensions: self.extensions,
            data: self.data,
            body: OnceLock::new(),
        })
    }
}

fn syntax_problem(e: &serde_json::Error) -> EventProblem {
    EventProblem::whole(format!("not valid JSON: {e}"))
}

fn from_object(object: RawObject<'_>) -> Result<CloudEvent, Vec<EventProblem>> {
    let mut builder = EventBuilder::default();
    for (name, raw) in &object.0 {
        builder.set_json(name, raw);
    }
    builder.finish()
}

/// Parses one structured-mode event (`application/cloudevents+json`).
pub fn parse_structured(bytes: &[u8]) -> Result<CloudEvent, Vec<EventProblem>> {
    match serde_json::from_slice::<RawObject>(bytes) {
        Ok(object) => from_object(object),
        Err(e) => Err(vec![syntax_problem(&e)]),
    }
}

/// Parses a batch (`application/cloudevents-batch+json`): all events, or every problem of every
/// event, each with its index. A batch is accepted or refused as a whole.
pub fn parse_batch(bytes: &[u8]) -> Result<Vec<CloudEvent>, Vec<EventProblem>> {
    let items = match serde_json::from_slice::<Elements>(bytes) {
        Ok(items) => items.0,
        Err(e) => return Err(vec![syntax_problem(&e)]),
    };
    let mut events = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let result = match item {
            Element::Object(object) => from_object(object),
            Element::Other(kind) => Err(vec![EventProblem::whole(format!(
                "expected a JSON object (one CloudEvent), found {kind}"
            ))]),
        };
        match result {
            Ok(event) if problems.is_empty() => events.push(event),
            Ok(_) => {}
            Err(p) => problems.extend(p.into_iter().map(|p| p.at(index))),
        }
    }
    if problems.is_empty() {
        Ok(events)
    } else {
        Err(problems)
    }
}

/// The `ce-` headers of a binary-mode request: (attribute name without the prefix, lower case;
/// raw header value bytes).
pub type BinaryHeaders<'a> = &'a [(&'a str, &'a [u8])];

/// Builds an event from binary mode: attributes from `ce-*` headers (values percent-decoded as
/// the CloudEvents HTTP binding says), `datacontenttype` from `Content-Type`, `data` = the body.
pub fn from_binary(
    headers: BinaryHeaders<'_>,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<CloudEvent, Vec<EventProblem>> {
    let mut builder = EventBuilder::default();
    for (name, value) in headers {
        let header = format!("ce-{name}");
        let decoded = percent_encoding::percent_decode(value).decode_utf8();
        match decoded {
            Ok(text) => builder.set_string(name, text.into_owned()),
            Err(_) => builder.problems.push(EventProblem::attr(
                name,
                format!("header {header} is not valid UTF-8 once percent-decoded"),
            )),
        }
    }
    if let Some(ct) = content_type {
        if builder.first_time("datacontenttype") {
            builder.datacontenttype = Some(ct.to_owned());
        }
    }
    if !body.is_empty() {
        let json = content_type.is_none_or(validate::is_json_media_type);
        if json {
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                builder.problems.push(EventProblem::attr(
                    "data",
                    format!(
                        "body is not valid JSON ({e}) but the content type is {}",
                        content_type.unwrap_or("absent (JSON assumed)")
                    ),
                ));
            }
        }
        builder.data = Some(EventData {
            bytes: body,
            encoding: if json { DataEncoding::Json } else { DataEncoding::Binary },
        });
    }
    builder.finish()
}

impl CloudEvent {
    /// Builds an event from attribute values already known to be strings, for generators and
    /// tests. Validates exactly as the parsers do.
    pub fn from_parts(
        attributes: &[(Attribute, &str)],
        data: Option<EventData>,
    ) -> Result<CloudEvent, Vec<EventProblem>> {
        let mut builder = EventBuilder::default();
        for (attribute, value) in attributes {
            builder.set_string(attribute.name(), (*value).to_owned());
        }
        if let Some(d) = data {
            if d.encoding == DataEncoding::Json {
                if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&d.bytes) {
                    builder.problems.push(EventProblem::attr("data", format!("not valid JSON: {e}")));
                }
            }
            builder.data = Some(d);
        }
        builder.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT_EXAMPLE: &str = r#"{"specversion":"1.0","id":"6ccdb1cd-0dc3-450f-8730-ceccda8439be","type":"Microsoft.DigitalTwins.Twin.Create",
 "source":"my-example-digital-twin.api.sea.digitaltwins.azure.net","subject":"example-twin1",
 "time":"2021-12-09T20:28:52.6745538Z","datacontenttype":"application/json",
 "traceparent":"00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01",
 "data":{"$dtId":"example-twin1","$etag":"W/\"ecf81d6c-8c1a-4a95-afd8-13bd4cea436f\"","room":"room name",
   "$metadata":{"$model":"dtmi:examplecom:interfaceName;1","room":{"lastUpdateTime":"2021-12-09T20:28:52.6651216Z"}}}}"#;

    fn problems(input: &str) -> Vec<(Option<String>, String)> {
        parse_structured(input.as_bytes())
            .expect_err("should be refused")
            .into_iter()
            .map(|p| (p.attribute, p.message))
            .collect()
    }

    #[test]
    fn parses_the_spec_example() {
        let e = parse_structured(ADT_EXAMPLE.as_bytes()).unwrap();
        assert_eq!(e.id(), "6ccdb1cd-0dc3-450f-8730-ceccda8439be");
        assert_eq!(e.kind(), EventKind::TwinCreate);
        assert_eq!(e.subject(), Some("example-twin1"));
        assert_eq!(e.twin_id(), Some("example-twin1"));
        assert_eq!(e.attribute(Attribute::SpecVersion), Some("1.0"));
        let data = e.data().unwrap();
        assert_eq!(data.encoding, DataEncoding::Json);
        assert!(std::str::from_utf8(&data.bytes).unwrap().starts_with(r#"{"$dtId":"example-twin1""#));
        assert_eq!(e.body().unwrap()["$metadata"]["$model"], "dtmi:examplecom:interfaceName;1");
    }

    #[test]
    fn data_bytes_are_kept_exactly() {
        let e = parse_structured(
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data": { "a" : 1.50 } }"#,
        )
        .unwrap();
        assert_eq!(&e.data().unwrap().bytes[..], br#"{ "a" : 1.50 }"#);
    }

    #[test]
    fn every_missing_required_attribute_is_named() {
        let p = problems(r#"{"subject":"x"}"#);
        let names: Vec<_> = p.iter().map(|(a, _)| a.clone().unwrap()).collect();
        assert_eq!(names, ["specversion", "id", "source", "type"]);
        assert!(p.iter().all(|(_, m)| m == "required attribute is missing"));
    }

    #[test]
    fn wrong_types_and_forms_are_named() {
        let p = problems(
            r#"{"specversion":"0.3","id":5,"source":"","type":"t","time":"noon","traceparent":"x","datacontenttype":"json","subject":""}"#,
        );
        let names: Vec<_> = p.iter().map(|(a, _)| a.as_deref().unwrap()).collect();
        for expected in ["specversion", "id", "source", "time", "traceparent", "datacontenttype", "subject"] {
            assert!(names.contains(&expected), "{expected} not reported in {p:?}");
        }
        assert!(p
            .iter()
            .any(|(a, m)| a.as_deref() == Some("id") && m.contains("must be a string, found a number")));
    }

    #[test]
    fn duplicate_members_are_refused() {
        let p = problems(r#"{"specversion":"1.0","id":"1","id":"2","source":"s","type":"t"}"#);
        assert_eq!(p, [(Some("id".into()), "given more than once".into())]);
    }

    #[test]
    fn malformed_json_and_non_objects() {
        let p = problems(r#"{"specversion":"1.0","#);
        assert_eq!(p.len(), 1);
        assert!(p[0].0.is_none() && p[0].1.starts_with("not valid JSON"));
        assert!(problems("[1]")[0].1.starts_with("not valid JSON"));
        assert!(problems("").len() == 1);
    }

    #[test]
    fn extensions_are_kept_and_checked() {
        let e = parse_structured(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","tracestate":"a=b","n":3,"flag":true,"gone":null}"#).unwrap();
        let ext: Vec<_> = e.extensions().map(|(k, v)| (k.to_owned(), v.clone())).collect();
        assert_eq!(
            ext,
            [
                ("tracestate".into(), ExtensionValue::String("a=b".into())),
                ("n".into(), ExtensionValue::Integer(3)),
                ("flag".into(), ExtensionValue::Boolean(true)),
            ]
        );
        let p = problems(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","Bad-Name":"x","obj":{},"f":1.5}"#,
        );
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn text_and_base64_data() {
        let e = parse_structured(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"text/plain","data":"hi \"you\""}"#).unwrap();
        assert_eq!(
            e.data().unwrap(),
            &EventData { bytes: Bytes::from_static(b"hi \"you\""), encoding: DataEncoding::Text }
        );
        let e = parse_structured(
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"AAEC"}"#,
        )
        .unwrap();
        assert_eq!(
            e.data().unwrap(),
            &EventData { bytes: Bytes::from_static(&[0, 1, 2]), encoding: DataEncoding::Binary }
        );
        assert!(e.body().is_none());
        let p = problems(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":1,"data_base64":"AAEC"}"#,
        );
        assert_eq!(p[0].0.as_deref(), Some("data_base64"));
    }

    #[test]
    fn batch_is_all_or_nothing_with_indexes() {
        let ok = r#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#;
        let events = parse_batch(format!("[{ok},{ok}]").as_bytes()).unwrap();
        assert_eq!(events.len(), 2);
        let err = parse_batch(format!(r#"[{ok},{{"specversion":"1.0"}},7]"#).as_bytes()).unwrap_err();
        let idx: Vec<_> = err.iter().map(|p| p.index).collect();
        assert_eq!(idx, [Some(1), Some(1), Some(1), Some(2)]);
        assert!(parse_batch(ok.as_bytes()).is_err());
        assert!(parse_batch(b"[]").unwrap().is_empty());
    }

    #[test]
    fn batch_elements_that_are_not_objects_say_what_they_are() {
        let ok = r#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#;
        let err =
            parse_batch(format!(r#"[{ok},"x",[1,{{"a":2}}],true,null,-1.5,{ok}]"#).as_bytes()).unwrap_err();
        let found: Vec<_> = err.iter().map(|p| (p.index, p.message.clone())).collect();
        let expected: Vec<_> =
            [(1, "a string"), (2, "an array"), (3, "a boolean"), (4, "null"), (5, "a number")]
                .into_iter()
                .map(|(i, kind)| (Some(i), format!("expected a JSON object (one CloudEvent), found {kind}")))
                .collect();
        assert_eq!(found, expected);
        // A syntax error anywhere refuses the whole batch as JSON.
        let p = parse_batch(format!(r#"[{ok},{{"id":]"#).as_bytes()).unwrap_err();
        assert!(p.len() == 1 && p[0].index.is_none() && p[0].message.starts_with("not valid JSON"), "{p:?}");
        assert!(parse_batch(br#"{"not":"an array"}"#).unwrap_err()[0].message.starts_with("not valid JSON"));
    }

    #[test]
    fn every_repeated_member_is_refused_once_per_repeat() {
        let p = problems(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":{},"data":{},"ext":"a","ext":"b","traceparent":"00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01","traceparent":"x","ext":"c"}"#,
        );
        assert_eq!(
            p,
            [
                (Some("data".into()), "given more than once".into()),
                (Some("ext".into()), "given more than once".into()),
                (Some("traceparent".into()), "given more than once".into()),
                (Some("ext".into()), "given more than once".into()),
            ]
        );
    }

    #[test]
    fn control_characters_are_refused_in_ascii_and_beyond() {
        for id in [r"a\u0007b", r"a\u007fb", r"caf\u00e9\u0085"] {
            let p = problems(&format!(r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"t"}}"#));
            assert_eq!(p, [(Some("id".into()), "must not contain control characters".into())], "{id}");
        }
        assert!(parse_structured(
            r#"{"specversion":"1.0","id":"café ✓","source":"s","type":"t"}"#.as_bytes()
        )
        .is_ok());
    }

    #[test]
    fn binary_mode() {
        let headers: &[(&str, &[u8])] = &[
            ("specversion", b"1.0"),
            ("id", b"abc"),
            ("source", b"host%2Fdigitaltwins%2Ft1"),
            ("type", b"microsoft.iot.telemetry"),
            ("dataschema", b"dtmi:x;1"),
        ];
        let e = from_binary(headers, Some("application/json"), Bytes::from_static(b"{\"t\":1}")).unwrap();
        assert_eq!(e.source(), "host/digitaltwins/t1");
        assert_eq!(e.twin_id(), Some("t1"));
        assert_eq!(e.datacontenttype(), Some("application/json"));
        assert_eq!(e.body().unwrap()["t"], 1);
        let err = from_binary(headers, Some("application/json"), Bytes::from_static(b"{nope")).unwrap_err();
        assert_eq!(err[0].attribute.as_deref(), Some("data"));
        let e =
            from_binary(headers, Some("application/octet-stream"), Bytes::from_static(b"\x00\x01")).unwrap();
        assert_eq!(e.data().unwrap().encoding, DataEncoding::Binary);
        let err = from_binary(&headers[1..], None, Bytes::new()).unwrap_err();
        assert_eq!(err[0].attribute.as_deref(), Some("specversion"));
    }

    #[test]
    fn twin_ids_per_type() {
        let ev = |ty: &str, subject: Option<&str>, source: &str| {
            let mut attrs = vec![
                (Attribute::Id, "1"),
                (Attribute::Source, source),
                (Attribute::Type, ty),
                (Attribute::SpecVersion, "1.0"),
            ];
            if let Some(s) = subject {
                attrs.push((Attribute::Subject, s));
            }
            CloudEvent::from_parts(&attrs, None).unwrap()
        };
        assert_eq!(
            ev("Microsoft.DigitalTwins.Relationship.Create", Some("t1/relationships/r1"), "h").twin_id(),
            Some("t1")
        );
        assert_eq!(ev("microsoft.iot.telemetry", Some("comp1"), "h/digitaltwins/t9").twin_id(), Some("t9"));
        assert_eq!(ev("microsoft.iot.telemetry", None, "h").twin_id(), None);
        assert_eq!(ev("custom", Some("x"), "h").twin_id(), None);
    }
}
