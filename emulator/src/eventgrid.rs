//! An Event Grid topic: the publish API (`POST /api/events`) of a custom topic, for tests and
//! demos.
//!
//! What it checks, as Event Grid does:
//! - the `aeg-sas-key` header against the topic's access keys (401 with Event Grid's error body
//!   otherwise; the key is never echoed);
//! - the request size: at most 1 MB (1,048,576 bytes), else 413;
//! - the content type of the topic's input schema: `application/cloudevents-batch+json` (an array
//!   of CloudEvents) or `application/cloudevents+json` (one) for the CloudEvents schema,
//!   `application/json` (an array of EventGridEvents) for the EventGrid schema; else 400;
//! - every event: CloudEvents need `specversion` `1.0`, `id`, `source`, `type` (strings, not
//!   empty) and an RFC 3339 `time` if present; EventGridEvents need `id`, `subject`, `eventType`,
//!   `dataVersion` (strings) and an RFC 3339 `eventTime`. A bad event fails the whole request
//!   with 400 and an error body naming it, and none of the request's events is stored.
//!
//! Accepted events are kept in arrival order ([`EventGridStandIn::received`]); every request is
//! recorded ([`EventGridStandIn::requests`]); scripted faults answer the next requests with a
//! status and an optional `Retry-After` ([`EventGridStandIn::push_faults`]).

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The path topics publish on.
pub const EVENTS_PATH: &str = "/api/events";
/// The publish API version Event Grid documents for topics.
pub const API_VERSION: &str = "2018-01-01";
/// Event Grid's limit on one publish request.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// The header carrying an access key.
pub const KEY_HEADER: &str = "aeg-sas-key";

/// Bodies up to this size are read (and then refused with 413 when over [`MAX_REQUEST_BYTES`]);
/// larger ones are cut off by the server.
const READ_LIMIT: usize = 4 * MAX_REQUEST_BYTES;

/// A topic's input schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputSchema {
    /// CloudEvents 1.0 (structured JSON, batches as arrays).
    CloudEvents,
    /// The EventGridEvent schema.
    EventGrid,
}

/// The topic: its access keys and input schema.
#[derive(Clone)]
pub struct EventGridConfig {
    /// Accepted `aeg-sas-key` values (a topic has two).
    pub keys: Vec<String>,
    /// The input schema events must be in.
    pub schema: InputSchema,
}

impl fmt::Debug for EventGridConfig {
    // Keys stay out of logs, even test keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventGridConfig")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("schema", &self.schema)
            .finish()
    }
}

/// A scripted answer, consumed by one publish request (in the order pushed), before any check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The status to answer with (with an Event Grid error body).
    pub status: u16,
    /// Seconds for a `Retry-After` header, if any.
    pub retry_after: Option<u64>,
}

impl Fault {
    /// Answer `status`.
    pub fn status(status: u16) -> Self {
        Fault { status, retry_after: None }
    }

    /// Answer `status` with `Retry-After: <seconds>`.
    pub fn with_retry_after(status: u16, seconds: u64) -> Self {
        Fault { status, retry_after: Some(seconds) }
    }
}

/// One publish request as received and answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest {
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The `aeg-sas-key` header as sent (tests check which key a client used).
    pub sas_key: Option<String>,
    /// The `api-version` query parameter.
    pub api_version: Option<String>,
    /// Body size in bytes.
    pub body_len: usize,
    /// The status answered.
    pub status: u16,
    /// Events stored from this request (0 unless it succeeded).
    pub events: usize,
}

/// A running topic stand-in. Cheap to clone; the server stops when the last clone is dropped
/// (or at [`EventGridStandIn::shutdown`]).
#[derive(Clone)]
pub struct EventGridStandIn {
    /// Configuration and state shared with the handler.
    shared: Arc<Shared>,
    /// Owns the server task; dropping the last clone aborts it.
    server: Arc<ServerTask>,
    /// Where it listens.
    addr: SocketAddr,
}

impl fmt::Debug for EventGridStandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventGridStandIn").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl EventGridStandIn {
    /// Starts on an ephemeral loopback port (`127.0.0.1:0`).
    pub async fn start(config: EventGridConfig) -> std::io::Result<EventGridStandIn> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// Starts on `addr`, which must be a loopback address.
    pub async fn start_on(addr: SocketAddr, config: EventGridConfig) -> std::io::Result<EventGridStandIn> {
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the Event Grid stand-in binds loopback addresses only, not {addr}"),
            ));
        }
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { config, state: Mutex::new(MutableState::default()), addr });
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            // Serving ends only with an accept error on a loopback listener; nothing to report to.
            let _ = axum::serve(listener, app).await;
        });
        Ok(EventGridStandIn { shared, server: Arc::new(ServerTask(Mutex::new(Some(task)))), addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The topic endpoint to configure: `http://127.0.0.1:<port>/api/events`.
    pub fn topic_endpoint(&self) -> String {
        format!("http://{}{EVENTS_PATH}", self.addr)
    }

    /// Queues faults; each answers one request, in order, before normal answers resume.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().faults.extend(faults);
    }

    /// Every publish request so far, in arrival order.
    pub fn requests(&self) -> Vec<PublishRequest> {
        self.shared.state().requests.clone()
    }

    /// Every event accepted so far, in arrival order, as JSON.
    pub fn received(&self) -> Vec<Value> {
        self.shared.state().events.clone()
    }

    /// Forgets requests, events and queued faults.
    pub fn reset(&self) {
        *self.shared.state() = MutableState::default();
    }

    /// Stops the server (this and every clone).
    pub async fn shutdown(self) {
        let task = self.server.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Aborts the server task when the last handle goes.
struct ServerTask(Mutex<Option<JoinHandle<()>>>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        if let Some(task) = self.0.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

/// What the handler shares with the handle.
struct Shared {
    config: EventGridConfig,
    state: Mutex<MutableState>,
    /// For the topic name in error messages, as Event Grid puts its host name there.
    addr: SocketAddr,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, MutableState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Everything tests change or observe at run time.
#[derive(Default)]
struct MutableState {
    faults: VecDeque<Fault>,
    requests: Vec<PublishRequest>,
    events: Vec<Value>,
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(EVENTS_PATH, post(publish))
        .layer(DefaultBodyLimit::max(READ_LIMIT))
        .with_state(shared)
}

/// Why a request is refused: answered with Event Grid's error body.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, [(header::CONTENT_TYPE, "application/json; charset=utf-8")], body.to_string())
            .into_response()
    }
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { status, code, message: message.into() }
}

async fn publish(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut record = PublishRequest {
        content_type: header_text(header::CONTENT_TYPE.as_str()),
        sas_key: header_text(KEY_HEADER),
        api_version: query.get("api-version").cloned(),
        body_len: body.len(),
        status: 200,
        events: 0,
    };
    let fault = shared.state().faults.pop_front();
    let (response, events) = match fault {
        Some(fault) => (answer_fault(&fault), Vec::new()),
        None => match check(&shared, &record, &body) {
            Ok(events) => (StatusCode::OK.into_response(), events),
            Err(refusal) => (refusal.into_response(), Vec::new()),
        },
    };
    record.status = response.status().as_u16();
    record.events = events.len();
    let mut state = shared.state();
    state.requests.push(record);
    state.events.extend(events);
    response
}

fn answer_fault(fault: &Fault) -> Response {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = match status.as_u16() {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        413 => "RequestEntityTooLarge",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalServerError",
    };
    let mut response = error(status, code, format!("Injected fault: {}.", status.as_u16())).into_response();
    if let Some(seconds) = fault.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Every check of a publish request, in Event Grid's order; the events to store.
fn check(shared: &Shared, record: &PublishRequest, body: &[u8]) -> Result<Vec<Value>, Refusal> {
    let topic = format!("{}", shared.addr).to_uppercase();
    let key_ok = record.sas_key.as_deref().is_some_and(|k| shared.config.keys.iter().any(|c| c == k));
    if !key_ok {
        let reason = if record.sas_key.is_none() {
            "The request did not include an aeg-sas-key header or an aeg-sas-token."
        } else {
            "The specified authorization key is not valid or wrong."
        };
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            format!("The request authorization key is not authorized for {topic}. This is due to the reason: {reason}"),
        ));
    }
    if body.len() > MAX_REQUEST_BYTES {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!(
                "The maximum size for the request is {MAX_REQUEST_BYTES} bytes; this request has {} bytes.",
                body.len()
            ),
        ));
    }
    let media_type = record
        .content_type
        .as_deref()
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let single = match (shared.config.schema, media_type.as_str()) {
        (InputSchema::CloudEvents, "application/cloudevents-batch+json") => false,
        (InputSchema::CloudEvents, "application/cloudevents+json") => true,
        (InputSchema::EventGrid, "application/json") => false,
        (schema, _) => {
            let expected = match schema {
                InputSchema::CloudEvents => {
                    "application/cloudevents-batch+json or application/cloudevents+json"
                }
                InputSchema::EventGrid => "application/json",
            };
            return Err(bad_request(format!(
                "Unsupported content type {:?} for this topic's input schema ({schema:?}); expected {expected}.",
                record.content_type.as_deref().unwrap_or("")
            )));
        }
    };
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("The request body is not valid JSON: {e}.")))?;
    let events = match (single, value) {
        (true, event @ Value::Object(_)) => vec![event],
        (false, Value::Array(events)) => events,
        (true, _) => return Err(bad_request("A single CloudEvent must be a JSON object.")),
        (false, _) => return Err(bad_request("The request body must be a JSON array of events.")),
    };
    if events.is_empty() {
        return Err(bad_request("The request contains no events."));
    }
    for (index, event) in events.iter().enumerate() {
        let problem = match shared.config.schema {
            InputSchema::CloudEvents => check_cloud_event(event),
            InputSchema::EventGrid => check_event_grid_event(event),
        };
        if let Err(problem) = problem {
            return Err(bad_request(format!("Event at index {index}: {problem}")));
        }
    }
    Ok(events)
}

fn bad_request(message: impl Into<String>) -> Refusal {
    error(StatusCode::BAD_REQUEST, "BadRequest", message)
}

/// A required, non-empty string property.
fn required_string<'a>(event: &'a Value, name: &str) -> Result<&'a str, String> {
    match event.get(name) {
        None | Some(Value::Null) => Err(format!("Required property '{name}' was not set.")),
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(format!("Property '{name}' must not be empty.")),
        Some(_) => Err(format!("Property '{name}' must be a string.")),
    }
}

fn check_cloud_event(event: &Value) -> Result<(), String> {
    if !event.is_object() {
        return Err("A CloudEvent must be a JSON object.".into());
    }
    let specversion = required_string(event, "specversion")?;
    if specversion != "1.0" {
        return Err(format!("Unsupported specversion '{specversion}'; expected '1.0'."));
    }
    for name in ["id", "source", "type"] {
        required_string(event, name)?;
    }
    for name in ["subject", "datacontenttype", "dataschema", "time"] {
        if event.get(name).is_some_and(|v| !v.is_string()) {
            return Err(format!("Property '{name}' must be a string."));
        }
    }
    if let Some(time) = event.get("time").and_then(Value::as_str) {
        if !is_rfc3339(time) {
            return Err(format!("Property 'time' is not an RFC 3339 timestamp: '{time}'."));
        }
    }
    if event.get("data").is_some() && event.get("data_base64").is_some() {
        return Err("Properties 'data' and 'data_base64' must not both be set.".into());
    }
    Ok(())
}

fn check_event_grid_event(event: &Value) -> Result<(), String> {
    if !event.is_object() {
        return Err("An EventGridEvent must be a JSON object.".into());
    }
    for name in ["id", "subject", "eventType", "dataVersion"] {
        // Event Grid accepts an empty dataVersion (it is the publisher's schema version).
        if name == "dataVersion" && event.get(name).and_then(Value::as_str) == Some("") {
            continue;
        }
        required_string(event, name)?;
    }
    let time = required_string(event, "eventTime")?;
    if !is_rfc3339(time) {
        return Err(format!("Property 'eventTime' is not an RFC 3339 timestamp: '{time}'."));
    }
    if let Some(version) = event.get("metadataVersion") {
        if version != "1" {
            return Err(format!("Property 'metadataVersion' must be '1', not {version}."));
        }
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, field ranges checked loosely (days up to 31).
fn is_rfc3339(text: &str) -> bool {
    let b = text.as_bytes();
    let digits =
        |range: std::ops::Range<usize>| b.get(range).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let number = |range: std::ops::Range<usize>| -> u32 {
        b[range].iter().fold(0, |n, d| n * 10 + u32::from(d - b'0'))
    };
    if !(digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && matches!(b.get(10), Some(b'T' | b't'))
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19))
    {
        return false;
    }
    if !((1..=12).contains(&number(5..7))
        && (1..=31).contains(&number(8..10))
        && number(11..13) < 24
        && number(14..16) < 60
        && number(17..19) < 61)
    {
        return false;
    }
    let mut rest = &b[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|d| d.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = &fraction[n..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn standin(schema: InputSchema) -> EventGridStandIn {
        EventGridStandIn::start(EventGridConfig { keys: vec!["k1".into(), "k2".into()], schema })
            .await
            .unwrap()
    }

    async fn post(s: &EventGridStandIn, content_type: &str, key: Option<&str>, body: &str) -> (u16, Value) {
        let client = reqwest::Client::new();
        let mut request = client
            .post(format!("{}?api-version={API_VERSION}", s.topic_endpoint()))
            .header("content-type", content_type)
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header(KEY_HEADER, key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    const CE: &str = r#"[{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2021-12-09T20:28:52.6745538Z","data":{"a":1}}]"#;
    const EG: &str = r#"[{"id":"1","subject":"twin","eventType":"t","dataVersion":"1.0","metadataVersion":"1","eventTime":"2021-12-09T20:28:52Z","data":{}}]"#;

    #[tokio::test]
    async fn accepts_valid_batches_with_a_valid_key() {
        let s = standin(InputSchema::CloudEvents).await;
        let (status, _) = post(&s, "application/cloudevents-batch+json; charset=utf-8", Some("k2"), CE).await;
        assert_eq!(status, 200);
        assert_eq!(s.received(), serde_json::from_str::<Vec<Value>>(CE).unwrap());
        let requests = s.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].sas_key.as_deref(), Some("k2"));
        assert_eq!(requests[0].api_version.as_deref(), Some(API_VERSION));
        assert_eq!(requests[0].events, 1);

        let s = standin(InputSchema::EventGrid).await;
        assert_eq!(post(&s, "application/json", Some("k1"), EG).await.0, 200);
        assert_eq!(s.received().len(), 1);
    }

    #[tokio::test]
    async fn refuses_bad_keys_without_echoing_them() {
        let s = standin(InputSchema::CloudEvents).await;
        let (status, body) = post(&s, "application/cloudevents-batch+json", Some("wrong-key"), CE).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], "Unauthorized");
        assert!(!body.to_string().contains("wrong-key"));
        assert_eq!(post(&s, "application/cloudevents-batch+json", None, CE).await.0, 401);
        assert!(s.received().is_empty());
    }

    #[tokio::test]
    async fn validates_schema_content_type_and_size() {
        let s = standin(InputSchema::EventGrid).await;
        let (status, body) = post(&s, "application/cloudevents-batch+json", Some("k1"), CE).await;
        assert_eq!(status, 400, "{body}");
        let missing_subject = EG.replace(r#""subject":"twin","#, "");
        let (status, body) = post(&s, "application/json", Some("k1"), &missing_subject).await;
        assert_eq!(status, 400);
        assert!(body["error"]["message"].as_str().unwrap().contains("'subject'"), "{body}");
        let bad_time = EG.replace("2021-12-09T20:28:52Z", "yesterday");
        assert_eq!(post(&s, "application/json", Some("k1"), &bad_time).await.0, 400);
        let big = format!(r#"[{{"x":"{}"}}]"#, "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(post(&s, "application/json", Some("k1"), &big).await.0, 413);
        assert!(s.received().is_empty());

        let s = standin(InputSchema::CloudEvents).await;
        let no_source = CE.replace(r#""source":"s","#, "");
        let (status, body) = post(&s, "application/cloudevents-batch+json", Some("k1"), &no_source).await;
        assert_eq!(status, 400);
        assert!(body["error"]["message"].as_str().unwrap().contains("'source'"), "{body}");
        let single = r#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#;
        assert_eq!(post(&s, "application/cloudevents+json", Some("k1"), single).await.0, 200);
    }

    #[tokio::test]
    async fn faults_answer_first_then_normal_service_resumes() {
        let s = standin(InputSchema::CloudEvents).await;
        s.push_faults([Fault::with_retry_after(503, 7), Fault::status(429)]);
        let client = reqwest::Client::new();
        let send = || {
            client
                .post(s.topic_endpoint())
                .header("content-type", "application/cloudevents-batch+json")
                .header(KEY_HEADER, "k1")
                .body(CE)
                .send()
        };
        let first = send().await.unwrap();
        assert_eq!(first.status().as_u16(), 503);
        assert_eq!(first.headers()["retry-after"], "7");
        assert_eq!(send().await.unwrap().status().as_u16(), 429);
        assert_eq!(send().await.unwrap().status().as_u16(), 200);
        let statuses: Vec<u16> = s.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 429, 200]);
        assert_eq!(s.received().len(), 1);
    }

    #[test]
    fn rfc3339_timestamps() {
        for ok in ["2021-12-09T20:28:52.6745538Z", "2021-12-09T20:28:52Z", "2021-12-09T20:28:52+05:30"] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in ["2021-12-09", "2021-13-09T20:28:52Z", "2021-12-09T20:28:52", "2021-12-09T20:28:52.Z", ""]
        {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }
}
