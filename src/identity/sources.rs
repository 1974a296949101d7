//! Token sources other than IMDS: AKS workload identity, App Service / Container Apps managed
//! identity and a client secret, through `azure_identity` (which does those jobs); Azure Arc,
//! which `azure_identity` 1.0 does not support, implemented here with the same transport as IMDS.

use super::imds::{HttpAnswer, ImdsTransport, TransportError};
use super::{IdentityError, IdentityErrorKind, Token, TokenSource};
use crate::config::Secret;
use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::OffsetDateTime;

/// The `.default` scope of a resource, as Entra ID wants it.
pub fn resource_to_scope(resource: &str) -> String {
    format!("{}/.default", resource.trim_end_matches('/'))
}

/// An `azure_identity` credential as a [`TokenSource`].
pub struct AzureSdkSource {
    name: &'static str,
    credential: Arc<dyn TokenCredential>,
}

impl fmt::Debug for AzureSdkSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureSdkSource").field("name", &self.name).finish()
    }
}

impl AzureSdkSource {
    pub fn new(name: &'static str, credential: Arc<dyn TokenCredential>) -> Self {
        Self { name, credential }
    }
}

#[async_trait]
impl TokenSource for AzureSdkSource {
    async fn fetch(&self, resource: &str) -> Result<Token, IdentityError> {
        let scope = resource_to_scope(resource);
        let result = self.credential.get_token(&[scope.as_str()], None).await;
        metrics::counter!("twinroute_token_requests_total", "source" => self.name, "result" => if result.is_ok() { "success" } else { "error" })
            .increment(1);
        match result {
            Ok(t) => Ok(Token::new(Secret::new(t.token.secret().to_owned()), t.expires_on)),
            Err(e) => Err(IdentityError::new(
                IdentityErrorKind::Unavailable,
                format!("{} could not get a token for {resource}: {e}", self.name),
            )),
        }
    }

    fn name(&self) -> &'static str {
        self.name
    }
}

/// Where Azure Arc's agent keeps its challenge keys on Linux; a challenge naming a file
/// elsewhere is refused (it could make twinroute read any file).
pub const ARC_KEY_DIRECTORY: &str = "/var/opt/azcmagent/tokens";
/// API version of the Arc agent's identity endpoint.
pub const ARC_API_VERSION: &str = "2020-06-01";
/// A challenge key larger than this is refused.
const ARC_MAX_KEY_BYTES: u64 = 4096;

/// Azure Arc-enabled servers: the local agent's identity endpoint (`IDENTITY_ENDPOINT`) answers
/// a first request with `401` and `WWW-Authenticate: Basic realm=<key file>`; the key file's
/// content, readable only by privileged users, proves the caller runs on the machine.
#[derive(Debug)]
pub struct AzureArcSource {
    endpoint: url::Url,
    key_directory: PathBuf,
    transport: Arc<dyn ImdsTransport>,
}

impl AzureArcSource {
    pub fn new(endpoint: url::Url, key_directory: PathBuf, transport: Arc<dyn ImdsTransport>) -> Self {
        Self { endpoint, key_directory, transport }
    }

    fn error(&self, kind: IdentityErrorKind, what: impl fmt::Display) -> IdentityError {
        IdentityError::new(kind, format!("Azure Arc identity endpoint {}: {what}", self.endpoint))
    }

    fn read_challenge_key(&self, answer: &HttpAnswer) -> Result<String, IdentityError> {
        let realm = answer
            .www_authenticate
            .as_deref()
            .and_then(|h| h.split_once("realm="))
            .map(|(_, path)| path.trim().trim_matches('"'))
            .ok_or_else(|| self.error(IdentityErrorKind::Malformed, "401 without a Basic realm challenge"))?;
        let path = Path::new(realm);
        let in_directory = path.parent().is_some_and(|p| p == self.key_directory);
        if !in_directory || path.extension().is_none_or(|e| e != "key") {
            return Err(self.error(
                IdentityErrorKind::Refused,
                format!("the challenge names {realm}, not a .key file in {}", self.key_directory.display()),
            ));
        }
        let meta = std::fs::metadata(path)
            .map_err(|e| self.error(IdentityErrorKind::Misconfigured, format!("cannot read the challenge key {realm}: {e} (twinroute must run as root or in the himds group)")))?;
        if meta.len() > ARC_MAX_KEY_BYTES {
            return Err(self.error(
                IdentityErrorKind::Refused,
                format!("the challenge key {realm} is larger than {ARC_MAX_KEY_BYTES} bytes"),
            ));
        }
        std::fs::read_to_string(path).map(|k| k.trim().to_owned()).map_err(|e| {
            self.error(
                IdentityErrorKind::Misconfigured,
                format!("cannot read the challenge key {realm}: {e}"),
            )
        })
    }
}

#[async_trait]
impl TokenSource for AzureArcSource {
    async fn fetch(&self, resource: &str) -> Result<Token, IdentityError> {
        let mut url = self.endpoint.clone();
        url.query_pairs_mut().append_pair("api-version", ARC_API_VERSION).append_pair("resource", resource);
        let get = |headers: Vec<(&'static str, String)>| {
            let url = url.clone();
            async move {
                let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                self.transport.get(&url, &pairs).await
            }
        };
        let transport_error =
            |e: TransportError| self.error(IdentityErrorKind::Unavailable, format!("{e:?}"));
        let first = get(vec![("Metadata", "true".into())]).await.map_err(transport_error)?;
        let answer = if first.status == 401 {
            let key = self.read_challenge_key(&first)?;
            get(vec![("Metadata", "true".into()), ("Authorization", format!("Basic {key}"))])
                .await
                .map_err(transport_error)?
        } else {
            first
        };
        metrics::counter!("twinroute_token_requests_total", "source" => "azure_arc", "result" => if answer.status == 200 { "success" } else { "error" })
            .increment(1);
        if answer.status != 200 {
            return Err(
                self.error(IdentityErrorKind::Unavailable, format!("answered HTTP {}", answer.status))
            );
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            access_token: String,
            expires_on: serde_json::Value,
        }
        let parsed: Answer = serde_json::from_slice(&answer.body)
            .map_err(|_| self.error(IdentityErrorKind::Malformed, "the answer is not a token"))?;
        let expires_on = match &parsed.expires_on {
            serde_json::Value::String(s) => s.parse::<i64>().ok(),
            serde_json::Value::Number(n) => n.as_i64(),
            _ => None,
        }
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .ok_or_else(|| self.error(IdentityErrorKind::Malformed, "expires_on is not a timestamp"))?;
        Ok(Token::new(Secret::new(parsed.access_token), expires_on))
    }

    fn name(&self) -> &'static str {
        "azure_arc"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Mutex;

    /// Answers the Arc challenge flow: 401 with a realm, then a token when the key is right.
    #[derive(Debug)]
    struct FakeArc {
        realm: String,
        key: String,
        seen: Mutex<Vec<Vec<(String, String)>>>,
    }

    #[async_trait]
    impl ImdsTransport for FakeArc {
        async fn get(&self, url: &url::Url, headers: &[(&str, &str)]) -> Result<HttpAnswer, TransportError> {
            assert!(url.query().unwrap().contains("api-version=2020-06-01"));
            self.seen
                .lock()
                .unwrap()
                .push(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
            let auth = headers.iter().find(|(k, _)| *k == "Authorization").map(|(_, v)| *v);
            Ok(match auth {
                None => HttpAnswer {
                    status: 401,
                    retry_after: None,
                    www_authenticate: Some(format!("Basic realm={}", self.realm)),
                    body: Bytes::new(),
                },
                Some(v) if v == format!("Basic {}", self.key) => HttpAnswer {
                    status: 200,
                    retry_after: None,
                    www_authenticate: None,
                    body: Bytes::from(
                        r#"{"access_token":"arc-token","expires_on":"4102444800","token_type":"Bearer"}"#,
                    ),
                },
                Some(_) => {
                    HttpAnswer { status: 401, retry_after: None, www_authenticate: None, body: Bytes::new() }
                }
            })
        }
    }

    #[tokio::test]
    async fn answers_the_challenge_with_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("abc.key");
        std::fs::write(&key_path, "s3cret\n").unwrap();
        let fake = Arc::new(FakeArc {
            realm: key_path.display().to_string(),
            key: "s3cret".into(),
            seen: Mutex::default(),
        });
        let source = AzureArcSource::new(
            "http://127.0.0.1:40342/metadata/identity/oauth2/token".parse().unwrap(),
            dir.path().to_owned(),
            fake.clone(),
        );
        let token = source.fetch("https://eventhubs.azure.net/").await.unwrap();
        assert_eq!(token.secret.expose(), "arc-token");
        assert_eq!(fake.seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn refuses_a_challenge_outside_the_key_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeArc { realm: "/etc/shadow".into(), key: "x".into(), seen: Mutex::default() });
        let source =
            AzureArcSource::new("http://127.0.0.1:1/t".parse().unwrap(), dir.path().to_owned(), fake);
        let err = source.fetch("https://eventhubs.azure.net/").await.unwrap_err();
        assert_eq!(err.kind, IdentityErrorKind::Refused);
        assert!(err.message.contains("/etc/shadow"), "{err}");
    }

    #[test]
    fn scopes_from_resources() {
        assert_eq!(resource_to_scope("https://eventhubs.azure.net/"), "https://eventhubs.azure.net/.default");
        assert_eq!(
            resource_to_scope("https://servicebus.azure.net"),
            "https://servicebus.azure.net/.default"
        );
    }
}
