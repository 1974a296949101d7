//! Token checks for CBS put-token and management requests, and what a connection is allowed to do.
//!
//! Two token types, as the service takes them:
//!
//! - `jwt`: an Entra ID access token. Here: HS256 under the stand-in's key ([`crate::jwt`]), the
//!   audience `https://eventhubs.azure.net/` for Event Hubs and `https://servicebus.azure.net`
//!   for Service Bus (with or without the trailing slash), the object id not in the namespace's
//!   `denied_object_ids` (identities without the Data Sender role).
//! - `servicebus.windows.net:sastoken`: `SharedAccessSignature sr=<url-encoded uri>&sig=<url-encoded
//!   base64 HMAC-SHA256>&se=<unix seconds>&skn=<key name>`, signed over `<sr as sent>\n<se>` with
//!   the UTF-8 bytes of the named key; `sr` must cover the audience.
//!
//! A refusal says exactly what is wrong, never the token itself.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::address::{percent_decode, resource_covers};
use super::NamespaceDef;
use crate::jwt;

/// CBS token type of Entra ID tokens.
pub const TOKEN_TYPE_JWT: &str = "jwt";
/// CBS token type of shared access signatures.
pub const TOKEN_TYPE_SAS: &str = "servicebus.windows.net:sastoken";
/// Audiences (`aud`) Event Hubs accepts in a JWT.
pub const EVENT_HUBS_AUDIENCES: &[&str] = &["https://eventhubs.azure.net/", "https://eventhubs.azure.net"];
/// Audiences (`aud`) Service Bus accepts in a JWT.
pub const SERVICE_BUS_AUDIENCES: &[&str] = &["https://servicebus.azure.net/", "https://servicebus.azure.net"];

const SAS_PREFIX: &str = "SharedAccessSignature ";

/// Which JWT audiences the service behind a CBS audience accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwtAudience {
    EventHubs,
    ServiceBus,
    /// A namespace-wide audience: either service's JWT audience is accepted.
    Either,
}

impl JwtAudience {
    fn audiences(self) -> Vec<&'static str> {
        match self {
            JwtAudience::EventHubs => EVENT_HUBS_AUDIENCES.to_vec(),
            JwtAudience::ServiceBus => SERVICE_BUS_AUDIENCES.to_vec(),
            JwtAudience::Either => [EVENT_HUBS_AUDIENCES, SERVICE_BUS_AUDIENCES].concat(),
        }
    }
}

/// A token that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    /// Unix seconds after which it no longer authorizes anything.
    pub expires_at: i64,
    /// Who it speaks for, for logs: `oid <object id>` or `key <key name>`.
    pub principal: String,
}

/// Why a token was refused: a management status code and a description for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: i32,
    pub description: String,
}

impl Refusal {
    fn unauthorized(description: impl Into<String>) -> Refusal {
        Refusal { status: 401, description: description.into() }
    }
}

/// What to check a token against.
pub(crate) struct TokenCheck<'a> {
    /// The CBS `type`; empty to infer it from the token (management `security_token`s).
    pub token_type: &'a str,
    pub token: &'a str,
    /// The audience exactly as the client named it (`amqps://<ns>/<entity>`).
    pub audience: &'a str,
    pub jwt_audience: JwtAudience,
    /// The entity for messages, e.g. `sb://contoso.servicebus.windows.net/twins`.
    pub resource: &'a str,
}

/// Checks a token; `now` is Unix seconds on the wall clock (tokens carry wall-clock times).
pub(crate) fn verify(
    check: &TokenCheck<'_>,
    namespace: &NamespaceDef,
    jwt_key: &[u8],
    now: i64,
) -> Result<Verified, Refusal> {
    let token_type = match check.token_type {
        "" if check.token.starts_with(SAS_PREFIX) => TOKEN_TYPE_SAS,
        "" => TOKEN_TYPE_JWT,
        other => other,
    };
    match token_type {
        TOKEN_TYPE_JWT => verify_jwt(check, namespace, jwt_key, now),
        TOKEN_TYPE_SAS => verify_sas(check, namespace, now),
        other => Err(Refusal {
            status: 400,
            description: format!(
                "Unsupported token type '{other}'; use '{TOKEN_TYPE_JWT}' or '{TOKEN_TYPE_SAS}'."
            ),
        }),
    }
}

fn verify_jwt(
    check: &TokenCheck<'_>,
    namespace: &NamespaceDef,
    key: &[u8],
    now: i64,
) -> Result<Verified, Refusal> {
    let claims = jwt::verify(check.token, key, now)
        .map_err(|e| Refusal::unauthorized(format!("InvalidToken: the token was rejected: {e}.")))?;
    let accepted = check.jwt_audience.audiences();
    if !accepted.contains(&claims.aud.as_str()) {
        return Err(Refusal::unauthorized(format!(
            "InvalidAudience: the token's audience '{}' is not valid for '{}'; expected '{}'.",
            claims.aud, check.resource, accepted[0]
        )));
    }
    if namespace.denied_object_ids.iter().any(|id| id.eq_ignore_ascii_case(&claims.oid)) {
        return Err(Refusal::unauthorized(format!(
            "Unauthorized access. 'Send' claim(s) are required to perform this operation. Resource: '{}'. \
             (The identity {} has no data role on this namespace.)",
            check.resource, claims.oid
        )));
    }
    Ok(Verified { expires_at: claims.exp, principal: format!("oid {}", claims.oid) })
}

fn verify_sas(check: &TokenCheck<'_>, namespace: &NamespaceDef, now: i64) -> Result<Verified, Refusal> {
    let fields = check.token.strip_prefix(SAS_PREFIX).ok_or_else(|| {
        Refusal::unauthorized(
            "Malformed SAS token: expected \
             'SharedAccessSignature sr=<uri>&sig=<signature>&se=<expiry>&skn=<key name>'.",
        )
    })?;
    let field = |name: &str| {
        fields.split('&').find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
    };
    let missing =
        |name: &str| Refusal::unauthorized(format!("Malformed SAS token: the '{name}' field is missing."));
    let (sr, sig, se, skn) = (
        field("sr").ok_or_else(|| missing("sr"))?,
        field("sig").ok_or_else(|| missing("sig"))?,
        field("se").ok_or_else(|| missing("se"))?,
        field("skn").ok_or_else(|| missing("skn"))?,
    );
    let key_name =
        percent_decode(skn).map_err(|e| Refusal::unauthorized(format!("Malformed SAS key name: {e}.")))?;
    let Some((_, key)) = namespace.sas_keys.iter().find(|(name, _)| *name == key_name) else {
        return Err(Refusal::unauthorized(format!(
            "Unknown SAS key name '{key_name}' for namespace '{}'.",
            namespace.host
        )));
    };
    let expiry: i64 = se.parse().map_err(|_| {
        Refusal::unauthorized(format!("Malformed SAS token: se {se:?} is not a number of seconds."))
    })?;
    if expiry <= now {
        return Err(Refusal::unauthorized(format!("The SAS token expired at {expiry} (now {now}).")));
    }
    let signature = percent_decode(sig)
        .ok()
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or_else(|| Refusal::unauthorized("Malformed SAS token: sig is not URL-encoded base64."))?;
    // `verify_slice` compares in constant time.
    sas_mac(key, sr, se).verify_slice(&signature).map_err(|_| {
        Refusal::unauthorized(format!(
            "Bad SAS signature for key '{key_name}': expected HMAC-SHA256 with the key over \
             '<sr as sent>\\n<se>' = {:?}.",
            format!("{sr}\n{se}")
        ))
    })?;
    let resource =
        percent_decode(sr).map_err(|e| Refusal::unauthorized(format!("Malformed SAS token: sr: {e}.")))?;
    if !resource_covers(&resource, check.audience) {
        return Err(Refusal::unauthorized(format!(
            "The SAS token is for '{resource}', which does not cover '{}'.",
            check.audience
        )));
    }
    Ok(Verified { expires_at: expiry, principal: format!("key {key_name}") })
}

fn sas_mac(key: &str, sr: &str, se: &str) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC accepts any key length");
    mac.update(sr.as_bytes());
    mac.update(b"\n");
    mac.update(se.as_bytes());
    mac
}

/// Signs a shared access signature the way the Azure SDKs do: `resource` is URL-encoded, the
/// string to sign is `<encoded resource>\n<expiry>`, the signature is base64 and URL-encoded.
/// For tests and tools that talk to the stand-in with a configured key.
pub fn sign_sas(resource: &str, key_name: &str, key: &str, expiry_unix_seconds: i64) -> String {
    let sr = url_encode(resource);
    let se = expiry_unix_seconds.to_string();
    let signature = STANDARD.encode(sas_mac(key, &sr, &se).finalize().into_bytes());
    format!("{SAS_PREFIX}sr={sr}&sig={}&se={se}&skn={}", url_encode(&signature), url_encode(key_name))
}

/// Percent-encodes everything except unreserved characters (RFC 3986), as `encodeURIComponent`.
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3 / 2);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A token for logs: its kind and non-secret parts, never the signature.
pub(crate) fn redact(token: &str) -> String {
    if let Some(fields) = token.strip_prefix(SAS_PREFIX) {
        let shown: Vec<&str> = fields.split('&').filter(|pair| !pair.starts_with("sig=")).collect();
        return format!("SharedAccessSignature {}&sig=<redacted>", shown.join("&"));
    }
    match jwt::decode_unverified(token) {
        Ok(claims) => format!("<jwt aud={} oid={} exp={}, redacted>", claims.aud, claims.oid, claims.exp),
        Err(_) => format!("<{} characters, redacted>", token.len()),
    }
}

/// What one accepted put-token allows on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The namespace host the audience named (or the connection's).
    pub namespace: String,
    /// Lower-cased path segments of the audience, a trailing `$management` removed; empty for
    /// a namespace-wide token.
    pub path: Vec<String>,
    pub expires_at: i64,
    pub principal: String,
}

/// The grants of one connection, newest per audience.
#[derive(Debug, Default)]
pub(crate) struct Grants(Vec<Grant>);

impl Grants {
    pub fn insert(&mut self, grant: Grant) {
        self.0.retain(|g| !(g.namespace == grant.namespace && g.path == grant.path));
        self.0.push(grant);
    }

    /// Whether a link on `path` (lower-cased segments) in `namespace` is authorized at `now`:
    /// some unexpired grant's path is a prefix of it. The error says why not.
    pub fn check(&self, namespace: &str, path: &[String], now: i64) -> Result<(), String> {
        let covering = self.0.iter().filter(|g| g.namespace == namespace && path.starts_with(&g.path));
        Self::pick(covering, now)
    }

    /// Whether anything on `entity` (a management request about it) is authorized: any grant on
    /// the entity or a sub-path of it (a consumer's grant is for `<hub>/ConsumerGroups/..`).
    pub fn check_entity(&self, namespace: &str, entity: &str, now: i64) -> Result<(), String> {
        let covering = self
            .0
            .iter()
            .filter(|g| g.namespace == namespace && g.path.first().is_none_or(|first| first == entity));
        Self::pick(covering, now)
    }

    fn pick<'a>(grants: impl Iterator<Item = &'a Grant>, now: i64) -> Result<(), String> {
        let mut latest_expired = None;
        for grant in grants {
            if grant.expires_at > now {
                return Ok(());
            }
            latest_expired = latest_expired.max(Some(grant.expires_at));
        }
        Err(match latest_expired {
            Some(at) => format!("the token put for it expired at {at} (now {now})"),
            None => "no put-token on this connection covers it".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::Claims;

    const KEY: &[u8] = b"jwt-key";
    const NOW: i64 = 1_700_000_000;

    fn namespace() -> NamespaceDef {
        NamespaceDef {
            host: "ns.servicebus.windows.net".into(),
            hubs: vec![],
            queues: vec![],
            topics: vec![],
            sas_keys: vec![("send".into(), "c2VjcmV0LWtleQ==".into())],
            denied_object_ids: vec!["DENIED".into()],
        }
    }

    fn claims(aud: &str, oid: &str) -> Claims {
        Claims {
            aud: aud.into(),
            iss: "https://sts.windows.net/t/".into(),
            iat: NOW,
            nbf: NOW - 60,
            exp: NOW + 3600,
            appid: "app".into(),
            oid: oid.into(),
            sub: oid.into(),
            tid: "t".into(),
            xms_mirid: None,
        }
    }

    fn check<'a>(token_type: &'a str, token: &'a str, audience: &'a str, jwt: JwtAudience) -> TokenCheck<'a> {
        TokenCheck { token_type, token, audience, jwt_audience: jwt, resource: audience }
    }

    #[test]
    fn jwt_audiences_per_service() {
        let ns = namespace();
        let eh = jwt::issue(&claims("https://eventhubs.azure.net/", "me"), KEY);
        let sb = jwt::issue(&claims("https://servicebus.azure.net", "me"), KEY);
        let aud = "amqps://ns.servicebus.windows.net/hub";
        let ok = verify(&check("jwt", &eh, aud, JwtAudience::EventHubs), &ns, KEY, NOW).unwrap();
        assert_eq!(ok, Verified { expires_at: NOW + 3600, principal: "oid me".into() });
        let err = verify(&check("jwt", &sb, aud, JwtAudience::EventHubs), &ns, KEY, NOW).unwrap_err();
        assert_eq!(err.status, 401);
        assert!(err.description.contains("InvalidAudience") && err.description.contains("servicebus"));
        assert!(verify(&check("jwt", &sb, aud, JwtAudience::ServiceBus), &ns, KEY, NOW).is_ok());
        assert!(verify(&check("", &eh, aud, JwtAudience::Either), &ns, KEY, NOW).is_ok());
        assert!(verify(&check("", &sb, aud, JwtAudience::Either), &ns, KEY, NOW).is_ok());
    }

    #[test]
    fn jwt_failures_are_described_without_the_token() {
        let ns = namespace();
        let aud = "amqps://ns.servicebus.windows.net/hub";
        let token = jwt::issue(&claims("https://eventhubs.azure.net/", "me"), KEY);
        let expired =
            verify(&check("jwt", &token, aud, JwtAudience::EventHubs), &ns, KEY, NOW + 7200).unwrap_err();
        assert!(expired.description.contains("expired"), "{expired:?}");
        let bad = verify(&check("jwt", &token, aud, JwtAudience::EventHubs), &ns, b"other", NOW).unwrap_err();
        assert!(bad.description.contains("signature"), "{bad:?}");
        for refusal in [expired, bad] {
            assert!(!refusal.description.contains(&token[..20]));
        }
        let denied = jwt::issue(&claims("https://eventhubs.azure.net/", "denied"), KEY);
        let err = verify(&check("jwt", &denied, aud, JwtAudience::EventHubs), &ns, KEY, NOW).unwrap_err();
        assert!(err.description.starts_with("Unauthorized access. 'Send' claim(s) are required"), "{err:?}");
        assert!(err.description.contains(aud));
        let err = verify(&check("bearer", &token, aud, JwtAudience::EventHubs), &ns, KEY, NOW).unwrap_err();
        assert_eq!(err.status, 400);
    }

    #[test]
    fn sas_round_trip_and_refusals() {
        let ns = namespace();
        let key = "c2VjcmV0LWtleQ==";
        let aud = "amqps://ns.servicebus.windows.net/queue";
        let token = sign_sas("sb://ns.servicebus.windows.net/", "send", key, NOW + 60);
        assert!(token.starts_with("SharedAccessSignature sr=sb%3A%2F%2Fns.servicebus.windows.net%2F&sig="));
        let ok = verify(&check(TOKEN_TYPE_SAS, &token, aud, JwtAudience::ServiceBus), &ns, KEY, NOW).unwrap();
        assert_eq!(ok, Verified { expires_at: NOW + 60, principal: "key send".into() });
        // Inferred type, as for a management request's security_token.
        assert!(verify(&check("", &token, aud, JwtAudience::ServiceBus), &ns, KEY, NOW).is_ok());

        let refuse = |token: &str, audience: &str| {
            verify(&check(TOKEN_TYPE_SAS, token, audience, JwtAudience::ServiceBus), &ns, KEY, NOW)
                .unwrap_err()
                .description
        };
        assert!(refuse(&token, "amqps://other.servicebus.windows.net/queue").contains("does not cover"));
        let expired = sign_sas("sb://ns.servicebus.windows.net/", "send", key, NOW);
        assert!(refuse(&expired, aud).contains("expired at"));
        let wrong_key = sign_sas("sb://ns.servicebus.windows.net/", "send", "other", NOW + 60);
        assert!(refuse(&wrong_key, aud).contains("Bad SAS signature"));
        let unknown = sign_sas("sb://ns.servicebus.windows.net/", "nobody", key, NOW + 60);
        assert!(refuse(&unknown, aud).contains("Unknown SAS key name 'nobody'"));
        assert!(refuse("SharedAccessSignature sr=x&se=1", aud).contains("'sig' field is missing"));
        assert!(refuse("Bearer abc", aud).contains("Malformed SAS token"));
        // Tampering with the expiry breaks the signature.
        let tampered = token.replace(&format!("se={}", NOW + 60), &format!("se={}", NOW + 6000));
        assert!(refuse(&tampered, aud).contains("Bad SAS signature"));
        // No refusal repeats the signature.
        let sig = token.split("sig=").nth(1).unwrap().split('&').next().unwrap();
        assert!(!refuse(&wrong_key, aud).contains(sig));
    }

    #[test]
    fn redaction() {
        let token = sign_sas("sb://ns/q", "send", "key", NOW);
        let shown = redact(&token);
        let sig = token.split("sig=").nth(1).unwrap().split('&').next().unwrap();
        assert!(!shown.contains(sig) && shown.contains("skn=send") && shown.contains("sig=<redacted>"));
        let jwt = jwt::issue(&claims("https://eventhubs.azure.net/", "me"), KEY);
        let shown = redact(&jwt);
        assert!(!shown.contains(&jwt) && shown.contains("aud=https://eventhubs.azure.net/"), "{shown}");
        assert_eq!(redact("opaque"), "<6 characters, redacted>");
    }

    #[test]
    fn grants_cover_sub_paths_until_expiry() {
        let mut grants = Grants::default();
        let path = |p: &str| p.split('/').map(str::to_owned).collect::<Vec<_>>();
        assert!(grants.check("ns", &path("hub"), NOW).unwrap_err().contains("no put-token"));
        grants.insert(Grant {
            namespace: "ns".into(),
            path: path("hub"),
            expires_at: NOW + 10,
            principal: "p".into(),
        });
        assert!(grants.check("ns", &path("hub"), NOW).is_ok());
        assert!(grants.check("ns", &path("hub/partitions/1"), NOW).is_ok());
        assert!(grants.check("ns", &path("hub2"), NOW).is_err());
        assert!(grants.check("other", &path("hub"), NOW).is_err());
        assert!(grants.check("ns", &path("hub"), NOW + 10).unwrap_err().contains("expired at"));
        // A newer token for the same audience replaces the old one.
        grants.insert(Grant {
            namespace: "ns".into(),
            path: path("hub"),
            expires_at: NOW + 99,
            principal: "p".into(),
        });
        assert!(grants.check("ns", &path("hub"), NOW + 10).is_ok());

        grants.insert(Grant {
            namespace: "ns".into(),
            path: path("eh/consumergroups/$default/partitions/0"),
            expires_at: NOW + 10,
            principal: "p".into(),
        });
        assert!(grants.check("ns", &path("eh"), NOW).is_err());
        assert!(grants.check_entity("ns", "eh", NOW).is_ok());
        grants.insert(Grant {
            namespace: "ns".into(),
            path: vec![],
            expires_at: NOW + 10,
            principal: "p".into(),
        });
        assert!(grants.check("ns", &path("anything/at/all"), NOW).is_ok());
    }
}
