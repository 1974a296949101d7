//! The CloudEvents 1.0 envelope twinroute carries, and the ADT event types it knows.
//!
//! An event keeps its `data` as the raw bytes it arrived with: the wire forms of every sink put
//! those bytes on the wire untouched (ADT forwards telemetry payloads byte for byte), and a route
//! filter that reads `$body` parses them once, on first use, through [`CloudEvent::body`].

pub(crate) mod encode;
mod parse;
mod validate;

pub use parse::{from_binary, parse_batch, parse_structured, BinaryHeaders};

use bytes::Bytes;
use std::fmt;
use std::sync::OnceLock;

/// The CloudEvents spec version twinroute accepts and emits.
pub const SPEC_VERSION: &str = "1.0";

/// The seven event types ADT emits (spec §1), and everything else.
///
/// Producers may send other types; they are routed like any other event, and filters see the
/// `type` string either way. The kind exists so sinks can find the twin an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    TwinCreate,
    TwinUpdate,
    TwinDelete,
    RelationshipCreate,
    RelationshipUpdate,
    RelationshipDelete,
    /// `microsoft.iot.telemetry` (lower case, as ADT sends it).
    Telemetry,
    /// Any other `type`.
    Other,
}

impl EventKind {
    /// Classifies a `type` attribute. ADT's type names are matched exactly (they are case-sensitive).
    pub fn from_type(ty: &str) -> Self {
        match ty {
            "Microsoft.DigitalTwins.Twin.Create" => Self::TwinCreate,
            "Microsoft.DigitalTwins.Twin.Update" => Self::TwinUpdate,
            "Microsoft.DigitalTwins.Twin.Delete" => Self::TwinDelete,
            "Microsoft.DigitalTwins.Relationship.Create" => Self::RelationshipCreate,
            "Microsoft.DigitalTwins.Relationship.Update" => Self::RelationshipUpdate,
            "Microsoft.DigitalTwins.Relationship.Delete" => Self::RelationshipDelete,
            "microsoft.iot.telemetry" => Self::Telemetry,
            _ => Self::Other,
        }
    }

    /// The ADT `type` string of this kind (`None` for [`EventKind::Other`]).
    pub fn type_name(self) -> Option<&'static str> {
        Some(match self {
            Self::TwinCreate => "Microsoft.DigitalTwins.Twin.Create",
            Self::TwinUpdate => "Microsoft.DigitalTwins.Twin.Update",
            Self::TwinDelete => "Microsoft.DigitalTwins.Twin.Delete",
            Self::RelationshipCreate => "Microsoft.DigitalTwins.Relationship.Create",
            Self::RelationshipUpdate => "Microsoft.DigitalTwins.Relationship.Update",
            Self::RelationshipDelete => "Microsoft.DigitalTwins.Relationship.Delete",
            Self::Telemetry => "microsoft.iot.telemetry",
            Self::Other => return None,
        })
    }
}

/// A context attribute a route filter (or a sink) can read by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attribute {
    Id,
    Source,
    Type,
    Subject,
    Time,
    DataContentType,
    DataSchema,
    SpecVersion,
    TraceParent,
}

impl Attribute {
    /// Every attribute, in the order the structured encoding writes them.
    pub const ALL: [Attribute; 9] = [
        Attribute::SpecVersion,
        Attribute::Id,
        Attribute::Source,
        Attribute::Type,
        Attribute::Subject,
        Attribute::Time,
        Attribute::DataContentType,
        Attribute::DataSchema,
        Attribute::TraceParent,
    ];

    /// The attribute's CloudEvents name (lower case, as on the wire).
    pub const fn name(self) -> &'static str {
        match self {
            Attribute::Id => "id",
            Attribute::Source => "source",
            Attribute::Type => "type",
            Attribute::Subject => "subject",
            Attribute::Time => "time",
            Attribute::DataContentType => "datacontenttype",
            Attribute::DataSchema => "dataschema",
            Attribute::SpecVersion => "specversion",
            Attribute::TraceParent => "traceparent",
        }
    }

    /// Looks an attribute up by its exact CloudEvents name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an event's `data` is held, which decides how it is written back out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataEncoding {
    /// JSON text, exactly as received (the ADT case). Structured form: `"data": <the text>`.
    Json,
    /// A JSON string's contents under a non-JSON content type. Structured form: `"data": "<text>"`.
    Text,
    /// Opaque bytes (binary mode with a non-JSON content type, or `data_base64`).
    /// Structured form: `"data_base64"`.
    Binary,
}

/// An event's payload: the bytes that go on the wire as the message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventData {
    /// The payload bytes (for [`DataEncoding::Json`], valid JSON text).
    pub bytes: Bytes,
    /// How the bytes are to be read and re-encoded.
    pub encoding: DataEncoding,
}

/// The value of a CloudEvents extension attribute (CloudEvents allows these scalar types in JSON).
#[derive(Debug, Clone, PartialEq)]
pub enum ExtensionValue {
    String(String),
    Integer(i64),
    Boolean(bool),
}

impl fmt::Display for ExtensionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtensionValue::String(s) => f.write_str(s),
            ExtensionValue::Integer(i) => write!(f, "{i}"),
            ExtensionValue::Boolean(b) => write!(f, "{b}"),
        }
    }
}

/// One validated CloudEvent.
///
/// Built only by the parsers in this module, so every value of this type passed validation:
/// required attributes are present and well-formed, optional ones have the form CloudEvents and
/// ADT give them, and JSON `data` is valid JSON.
pub struct CloudEvent {
    pub(crate) id: Box<str>,
    pub(crate) source: Box<str>,
    pub(crate) ty: Box<str>,
    pub(crate) subject: Option<Box<str>>,
    pub(crate) time: Option<Box<str>>,
    pub(crate) datacontenttype: Option<Box<str>>,
    pub(crate) dataschema: Option<Box<str>>,
    pub(crate) traceparent: Option<Box<str>>,
    /// Extension attributes in arrival order (e.g. `tracestate`); sinks forward them too.
    pub(crate) extensions: Vec<(Box<str>, ExtensionValue)>,
    pub(crate) data: Option<EventData>,
    /// Classified once at parse time: sinks ask for the twin id on every delivery.
    pub(crate) kind: EventKind,
    /// `data` parsed as JSON, filled on first use by a `$body` filter and then shared by every
    /// route that reads the body (parsing is the expensive part of body filters).
    pub(crate) body: OnceLock<Option<serde_json::Value>>,
}

impl CloudEvent {
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn source(&self) -> &str {
        &self.source
    }
    pub fn ty(&self) -> &str {
        &self.ty
    }
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }
    pub fn time(&self) -> Option<&str> {
        self.time.as_deref()
    }
    pub fn datacontenttype(&self) -> Option<&str> {
        self.datacontenttype.as_deref()
    }
    pub fn dataschema(&self) -> Option<&str> {
        self.dataschema.as_deref()
    }
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }
    pub fn kind(&self) -> EventKind {
        self.kind
    }
    pub fn data(&self) -> Option<&EventData> {
        self.data.as_ref()
    }
    pub fn extensions(&self) -> impl Iterator<Item = (&str, &ExtensionValue)> {
        self.extensions.iter().map(|(k, v)| (&**k, v))
    }

    /// Reads a context attribute by name; `None` when the event does not carry it.
    #[inline]
    pub fn attribute(&self, attribute: Attribute) -> Option<&str> {
        match attribute {
            Attribute::Id => Some(&self.id),
            Attribute::Source => Some(&self.source),
            Attribute::Type => Some(&self.ty),
            Attribute::Subject => self.subject.as_deref(),
            Attribute::Time => self.time.as_deref(),
            Attribute::DataContentType => self.datacontenttype.as_deref(),
            Attribute::DataSchema => self.dataschema.as_deref(),
            Attribute::SpecVersion => Some(SPEC_VERSION),
            Attribute::TraceParent => self.traceparent.as_deref(),
        }
    }

    /// The event's `data` as parsed JSON, or `None` when there is no JSON data.
    ///
    /// Parsed at most once per event, however many routes read it.
    pub fn body(&self) -> Option<&serde_json::Value> {
        self.body
            .get_or_init(|| match &self.data {
                // Validated as JSON when the event was built, so this parse cannot fail;
                // a failure would only make `$body` filters see no body.
                Some(EventData { bytes, encoding: DataEncoding::Json }) => serde_json::from_slice(bytes).ok(),
                _ => None,
            })
            .as_ref()
    }

    /// The parsed body if [`CloudEvent::body`] has already run on this event (`Some(None)` when it
    /// found no JSON body), or `None` if it has not: never parses. Route filters read `$body`
    /// fields straight from the bytes, but use the parsed value when someone already paid for it.
    pub fn parsed_body(&self) -> Option<Option<&serde_json::Value>> {
        self.body.get().map(Option::as_ref)
    }

    /// The id of the twin this event is about, where the event type says where to find it:
    /// the subject of twin events, the part of a relationship subject before `/relationships/`,
    /// and the `<host>/digitaltwins/<twinId>` source of telemetry.
    pub fn twin_id(&self) -> Option<&str> {
        match self.kind {
            EventKind::TwinCreate | EventKind::TwinUpdate | EventKind::TwinDelete => self.subject(),
            EventKind::RelationshipCreate | EventKind::RelationshipUpdate | EventKind::RelationshipDelete => {
                self.subject().map(|s| s.split_once("/relationships/").map_or(s, |(twin, _)| twin))
            }
            EventKind::Telemetry => self
                .source
                .split_once("/digitaltwins/")
                .map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
                .filter(|t| !t.is_empty()),
            EventKind::Other => None,
        }
    }

    /// Bytes this event occupies in memory, approximately: what queue bounds count.
    pub fn size_hint(&self) -> usize {
        let opt = |s: &Option<Box<str>>| s.as_ref().map_or(0, |s| s.len());
        std::mem::size_of::<Self>()
            + self.id.len()
            + self.source.len()
            + self.ty.len()
            + opt(&self.subject)
            + opt(&self.time)
            + opt(&self.datacontenttype)
            + opt(&self.dataschema)
            + opt(&self.traceparent)
            + self.extensions.iter().map(|(k, _)| k.len() + 32).sum::<usize>()
            + self.data.as_ref().map_or(0, |d| d.bytes.len())
    }

    /// The structured-mode JSON form (`application/cloudevents+json`) of this event.
    pub fn to_structured_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size_hint());
        self.write_structured_json(&mut out);
        out
    }
}

impl Clone for CloudEvent {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            source: self.source.clone(),
            ty: self.ty.clone(),
            subject: self.subject.clone(),
            time: self.time.clone(),
            datacontenttype: self.datacontenttype.clone(),
            dataschema: self.dataschema.clone(),
            traceparent: self.traceparent.clone(),
            extensions: self.extensions.clone(),
            data: self.data.clone(),
            kind: self.kind,
            body: OnceLock::new(),
        }
    }
}

impl PartialEq for CloudEvent {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.source == other.source
            && self.ty == other.ty
            && self.subject == other.subject
            && self.time == other.time
            && self.datacontenttype == other.datacontenttype
            && self.dataschema == other.dataschema
            && self.traceparent == other.traceparent
            && self.extensions == other.extensions
            && self.data == other.data
    }
}

impl fmt::Debug for CloudEvent {
    /// Attributes only: payloads can be large and are the producer's business.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudEvent")
            .field("id", &self.id)
            .field("source", &self.source)
            .field("type", &self.ty)
            .field("subject", &self.subject)
            .field("time", &self.time)
            .field("data_bytes", &self.data.as_ref().map(|d| d.bytes.len()))
            .finish_non_exhaustive()
    }
}

/// One thing wrong with an incoming event: which event (in a batch), which attribute, and what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventProblem {
    /// Position in the batch (or NDJSON line number, counted from 1, for file sources);
    /// `None` for a single event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The attribute at fault (`id`, `time`, `data`, ...); `None` when the event as a whole is
    /// unreadable (not JSON, not an object).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    /// What is wrong, for a person.
    pub message: String,
}

impl EventProblem {
    pub(crate) fn attr(attribute: &str, message: impl Into<String>) -> Self {
        Self { index: None, attribute: Some(attribute.to_owned()), message: message.into() }
    }
    pub(crate) fn whole(message: impl Into<String>) -> Self {
        Self { index: None, attribute: None, message: message.into() }
    }
    pub(crate) fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }
}

impl fmt::Display for EventProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(i) = self.index {
            write!(f, "event {i}: ")?;
        }
        if let Some(a) = &self.attribute {
            write!(f, "{a}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Joins problems into one line per problem, for logs and CLI output.
pub fn describe_problems(problems: &[EventProblem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}
