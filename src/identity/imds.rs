//! The Azure Instance Metadata Service (IMDS) managed-identity token endpoint:
//! `GET <endpoint>?api-version=2018-02-01&resource=<aud>[&client_id|object_id|msi_res_id=..]`
//! with `Metadata: true`, never through a proxy, retried as Microsoft's guidance says:
//! 404, 429, 5xx, timeouts and connection errors with exponential backoff (retries at about 0, 2,
//! 6, 14 and 30 s, `Retry-After` honoured, 60 s at most per wait), 410 ("IMDS is updating") for up
//! to 70 s, and no retry on other 4xx.

use super::cache::CachedCredential;
use super::{IdentityError, IdentityErrorKind, ManagedIdentityId, Token, TokenSource, UserAssignedId};
use crate::config::Secret;
use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// The IMDS API version of the managed-identity token endpoint.
pub const API_VERSION: &str = "2018-02-01";
/// How long one request may take before it counts as a timeout (and is retried).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP answer, reduced to what token sources read.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    /// `WWW-Authenticate` (Azure Arc's challenge).
    pub www_authenticate: Option<String>,
    pub body: Bytes,
}

/// Why no HTTP answer came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    Timeout,
    Connect(String),
}

/// The HTTP GET token sources need. The daemon uses [`ReqwestTransport`]; tests can answer
/// in-process (without sockets, so a paused clock drives every wait).
#[async_trait]
pub trait ImdsTransport: Send + Sync + fmt::Debug + 'static {
    async fn get(&self, url: &url::Url, headers: &[(&str, &str)]) -> Result<HttpAnswer, TransportError>;
}

/// `reqwest` without any proxy (IMDS must never be reached through one), with a per-request timeout.
#[derive(Debug, Clone)]
pub struct ReqwestTransport {
    client: reqwest::Client,
}

impl ReqwestTransport {
    pub fn new(timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain HTTP client builds");
        Self { client }
    }
}

fn parse_retry_after(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[async_trait]
impl ImdsTransport for ReqwestTransport {
    async fn get(&self, url: &url::Url, headers: &[(&str, &str)]) -> Result<HttpAnswer, TransportError> {
        let mut request = self.client.get(url.clone());
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                TransportError::Timeout
            } else {
                TransportError::Connect(without_url(&e))
            }
        })?;
        let status = response.status().as_u16();
        let header =
            |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let retry_after = parse_retry_after(header("retry-after").as_deref());
        let www_authenticate = header("www-authenticate");
        let body = response.bytes().await.map_err(|e| {
            if e.is_timeout() {
                TransportError::Timeout
            } else {
                TransportError::Connect(without_url(&e))
            }
        })?;
        Ok(HttpAnswer { status, retry_after, www_authenticate, body })
    }
}

/// A reqwest error's description and causes, without the URL (the caller names the endpoint).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// When to retry: the waits before each retry, and the 410 window.
#[derive(Debug, Clone, PartialEq)]
pub struct ImdsRetryPolicy {
    /// Wait before retry *n* (the number of retries is the length). The default, 0, 2, 4, 8 and
    /// 16 s, puts the retries at about 0, 2, 6, 14 and 30 s after the first failure.
    pub delays: Vec<Duration>,
    /// Longest wait, whatever `Retry-After` says.
    pub max_delay: Duration,
    /// How long 410 ("IMDS is updating") keeps being retried.
    pub gone_window: Duration,
}

impl Default for ImdsRetryPolicy {
    fn default() -> Self {
        Self {
            delays: [0, 2, 4, 8, 16].map(Duration::from_secs).to_vec(),
            max_delay: Duration::from_secs(60),
            gone_window: Duration::from_secs(70),
        }
    }
}

/// How to reach IMDS.
#[derive(Debug, Clone)]
pub struct ImdsOptions {
    /// The token endpoint (default [`super::DEFAULT_IMDS_ENDPOINT`]).
    pub endpoint: url::Url,
    pub identity: ManagedIdentityId,
    pub retry: ImdsRetryPolicy,
    pub timeout: Duration,
}

/// Tokens from IMDS for one identity, with the retry policy applied; no caching.
#[derive(Debug)]
pub struct ImdsSource {
    options: ImdsOptions,
    transport: Arc<dyn ImdsTransport>,
}

/// The 200 answer; IMDS writes its numbers as strings.
#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(deserialize_with = "number_or_string")]
    expires_on: i64,
    #[serde(default)]
    token_type: Option<String>,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(i64),
    }
    match <N as serde::Deserialize>::deserialize(d)? {
        N::I(i) => Ok(i),
        N::S(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

#[derive(serde::Deserialize, Default)]
struct ErrorAnswer {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// One attempt's outcome, classified.
enum Attempt {
    Token(Token),
    Retry { error: IdentityError, after: Option<Duration>, gone: bool },
    Fail(IdentityError),
}

impl ImdsSource {
    pub fn new(options: ImdsOptions, transport: Arc<dyn ImdsTransport>) -> Self {
        Self { options, transport }
    }

    /// The request URL for `resource` (exposed for `identity get-token` and tests).
    pub fn request_url(&self, resource: &str) -> url::Url {
        let mut url = self.options.endpoint.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("api-version", API_VERSION);
            q.append_pair("resource", resource);
            if let Some((k, v)) = self.options.identity.query_pair() {
                q.append_pair(k, v);
            }
        }
        url
    }

    fn endpoint_text(&self) -> String {
        let mut u = self.options.endpoint.clone();
        u.set_query(None);
        u.to_string()
    }

    async fn attempt(&self, url: &url::Url, resource: &str) -> Attempt {
        let answer = match tokio::time::timeout(
            self.options.timeout,
            self.transport.get(url, &[("Metadata", "true")]),
        )
        .await
        {
            Ok(Ok(a)) => a,
            Ok(Err(TransportError::Connect(detail))) => {
                return Attempt::Retry { error: self.unreachable(&detail), after: None, gone: false }
            }
            Ok(Err(TransportError::Timeout)) | Err(_) => {
                return Attempt::Retry {
                    error: IdentityError::new(
                        IdentityErrorKind::Unavailable,
                        format!(
                            "IMDS at {} did not answer within {:?}: is this an Azure VM? set \
                             identity.imds_endpoint or choose another identity source",
                            self.endpoint_text(),
                            self.options.timeout
                        ),
                    ),
                    after: None,
                    gone: false,
                }
            }
        };
        let status = answer.status;
        if status == 200 {
            return match serde_json::from_slice::<TokenAnswer>(&answer.body) {
                Ok(t) if t.token_type.as_deref().is_none_or(|ty| ty.eq_ignore_ascii_case("Bearer")) => {
                    match OffsetDateTime::from_unix_timestamp(t.expires_on) {
                        Ok(expires_on) => Attempt::Token(Token::new(Secret::new(t.access_token), expires_on)),
                        Err(_) => Attempt::Fail(self.malformed("expires_on is out of range")),
                    }
                }
                Ok(_) => Attempt::Fail(self.malformed("token_type is not Bearer")),
                // Never echo the body: it may hold a token.
                Err(e) => {
                    Attempt::Fail(self.malformed(&format!("unreadable token answer ({})", e.classify_name())))
                }
            };
        }
        let err: ErrorAnswer = serde_json::from_slice(&answer.body).unwrap_or_default();
        let described = if err.error.is_empty() && err.error_description.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status} {}: {}", err.error, err.error_description)
        };
        match status {
            410 => Attempt::Retry {
                error: IdentityError::new(
                    IdentityErrorKind::Unavailable,
                    format!(
                        "IMDS at {} is updating (410) and did not come back in time",
                        self.endpoint_text()
                    ),
                ),
                after: answer.retry_after,
                gone: true,
            },
            404 | 429 | 500..=599 => Attempt::Retry {
                error: IdentityError::new(
                    IdentityErrorKind::Unavailable,
                    format!("IMDS at {} answered {described} for resource {resource}", self.endpoint_text()),
                ),
                after: answer.retry_after,
                gone: false,
            },
            400 if err.error_description.to_ascii_lowercase().contains("identity not found") => {
                Attempt::Fail(self.not_found())
            }
            _ => Attempt::Fail(IdentityError::new(
                IdentityErrorKind::Refused,
                format!(
                    "IMDS at {} refused the token request for {} and resource {resource}: {described}",
                    self.endpoint_text(),
                    self.options.identity
                ),
            )),
        }
    }

    fn not_found(&self) -> IdentityError {
        let message = match &self.options.identity {
            ManagedIdentityId::SystemAssigned => {
                "this host has no system-assigned managed identity: enable it \
                 (e.g. az vm identity assign) or configure the endpoint with a user-assigned one"
                    .to_owned()
            }
            ManagedIdentityId::UserAssigned(id) => {
                let (key, value) = match id {
                    UserAssignedId::ClientId(v) => ("client_id", v),
                    UserAssignedId::ObjectId(v) => ("object_id", v),
                    UserAssignedId::ResourceId(v) => ("msi_res_id", v),
                };
                format!(
                    "no user-assigned identity with {key} {value} is attached to this host: attach it \
                     (e.g. az vm identity assign --identities <id>) or fix the endpoint's identity"
                )
            }
        };
        IdentityError::new(IdentityErrorKind::NotFound, message)
    }

    fn unreachable(&self, detail: &str) -> IdentityError {
        IdentityError::new(
            IdentityErrorKind::Unavailable,
            format!(
                "IMDS unreachable at {} ({detail}): is this an Azure VM? set identity.imds_endpoint or \
                 choose another identity source",
                self.endpoint_text()
            ),
        )
    }

    fn malformed(&self, what: &str) -> IdentityError {
        IdentityError::new(IdentityErrorKind::Malformed, format!("IMDS at {}: {what}", self.endpoint_text()))
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "missing or mistyped fields",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

#[async_trait]
impl TokenSource for ImdsSource {
    async fn fetch(&self, resource: &str) -> Result<Token, IdentityError> {
        let url = self.request_url(resource);
        let policy = &self.options.retry;
        let started = tokio::time::Instant::now();
        let mut retries = 0usize;
        loop {
            let result = self.attempt(&url, resource).await;
            metrics::counter!("twinroute_token_requests_total", "source" => "imds", "result" => match &result {
                Attempt::Token(_) => "success",
                Attempt::Retry { .. } => "retryable_error",
                Attempt::Fail(_) => "error",
            })
            .increment(1);
            let (error, after, gone) = match result {
                Attempt::Token(t) => return Ok(t),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry { error, after, gone } => (error, after, gone),
            };
            let scheduled = policy.delays.get(retries).copied();
            let wait = if gone {
                // 410: keep trying (at the schedule's pace, 10 s at most) until the window closes.
                let wait = scheduled.unwrap_or(Duration::from_secs(10)).min(Duration::from_secs(10));
                let wait = after.map_or(wait, |a| a.max(wait)).min(policy.max_delay);
                if started.elapsed() + wait > policy.gone_window {
                    return Err(error);
                }
                wait
            } else {
                match scheduled {
                    Some(d) => after.map_or(d, |a| a.max(d)).min(policy.max_delay),
                    None => {
                        return Err(IdentityError::new(
                            error.kind,
                            format!("{} (after {} attempts)", error.message, retries + 1),
                        ))
                    }
                }
            };
            tracing::debug!(retry = retries + 1, wait_ms = wait.as_millis() as u64, error = %error, "IMDS token request failed; retrying");
            tokio::time::sleep(wait).await;
            retries += 1;
        }
    }

    fn name(&self) -> &'static str {
        "imds"
    }
}

/// IMDS behind the token cache: the credential identity-based endpoints use on Azure VMs and
/// VM scale sets. Implements `azure_core`'s `TokenCredential`.
pub type ImdsCredential = CachedCredential;

impl ImdsOptions {
    /// Options for `identity` at `endpoint`, with the default retry policy and timeout.
    pub fn new(endpoint: url::Url, identity: ManagedIdentityId) -> Self {
        Self { endpoint, identity, retry: ImdsRetryPolicy::default(), timeout: DEFAULT_REQUEST_TIMEOUT }
    }

    /// The credential: IMDS over HTTP (no proxy), cached.
    pub fn credential(self) -> ImdsCredential {
        let transport = Arc::new(ReqwestTransport::new(self.timeout));
        CachedCredential::new(Arc::new(ImdsSource::new(self, transport)))
    }
}
