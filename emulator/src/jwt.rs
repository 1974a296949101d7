//! HS256 JSON Web Tokens shaped like the Entra ID (v1) access tokens IMDS hands out.
//!
//! The IMDS stand-in issues these; other stand-ins (the AMQP broker, tests) check them with
//! [`verify`] under the same key. Azurite's `--oauth basic` mode reads the claims but never the
//! signature, so HMAC with a shared development key is enough to make every local consumer happy
//! without any key distribution.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The only JOSE header this module writes, and the only algorithm it accepts.
const HEADER_JSON: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// The claims of a managed-identity access token (the subset Azure puts in v1 tokens that
/// consumers look at). Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Audience: the `resource` exactly as the client asked for it.
    pub aud: String,
    /// Issuer: `https://sts.windows.net/<tenant-id>/` (Azurite checks the prefix).
    pub iss: String,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
    /// Client (application) id of the managed identity.
    pub appid: String,
    /// Object (principal) id of the managed identity.
    pub oid: String,
    /// Subject; for managed identities the same as `oid`.
    pub sub: String,
    /// Tenant id.
    pub tid: String,
    /// ARM resource id of the identity; Azure sets it for user-assigned identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xms_mirid: Option<String>,
}

/// Why a token was rejected; each variant says exactly what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url segments, bad base64, bad JSON or missing claims.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header names an algorithm other than HS256 (including `none`).
    #[error("unsupported token algorithm {0:?}; only HS256 is accepted")]
    UnsupportedAlgorithm(String),
    /// The signature does not match the header and payload under the given key.
    #[error("bad token signature (wrong key or tampered token)")]
    BadSignature,
    /// `now` is before the token's `nbf`.
    #[error("token not yet valid: nbf is {nbf}, now is {now}")]
    NotYetValid {
        /// The token's `nbf` claim.
        nbf: i64,
        /// The time it was checked against.
        now: i64,
    },
    /// `now` is at or after the token's `exp`.
    #[error("token expired at {exp}, now is {now}")]
    Expired {
        /// The token's `exp` claim.
        exp: i64,
        /// The time it was checked against.
        now: i64,
    },
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// Serialises and signs `claims` with HMAC-SHA256 under `key`.
pub fn issue(claims: &Claims, key: &[u8]) -> String {
    // Serialising a struct of strings and integers cannot fail.
    let payload = serde_json::to_vec(claims).expect("claims serialise to JSON");
    let mut token = String::with_capacity(64 + payload.len() * 4 / 3 + 43);
    token.push_str(&URL_SAFE_NO_PAD.encode(HEADER_JSON));
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(payload));
    let signature = mac(key, token.as_bytes()).finalize().into_bytes();
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    token
}

/// Checks structure, algorithm, signature (in constant time), then `nbf <= now < exp`, and
/// returns the claims. `now` is seconds since the Unix epoch; no leeway is applied, so callers
/// that want clock-skew tolerance adjust `now` themselves.
pub fn verify(token: &str, key: &[u8], now: i64) -> Result<Claims, JwtError> {
    let (header_b64, payload_b64, signature_b64) = split(token)?;
    let header: Header = decode_json(header_b64, "header")?;
    if header.alg != "HS256" {
        return Err(JwtError::UnsupportedAlgorithm(header.alg));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|e| JwtError::Malformed(format!("signature is not base64url without padding: {e}")))?;
    let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
    // `verify_slice` compares in constant time.
    mac(key, signing_input.as_bytes()).verify_slice(&signature).map_err(|_| JwtError::BadSignature)?;
    let claims: Claims = decode_json(payload_b64, "payload")?;
    if now < claims.nbf {
        return Err(JwtError::NotYetValid { nbf: claims.nbf, now });
    }
    if now >= claims.exp {
        return Err(JwtError::Expired { exp: claims.exp, now });
    }
    Ok(claims)
}

/// Reads the claims without checking the signature or the times (for logs and assertions on
/// tokens whose key is unknown).
pub fn decode_unverified(token: &str) -> Result<Claims, JwtError> {
    let (_, payload, _) = split(token)?;
    decode_json(payload, "payload")
}

fn mac(key: &[u8], data: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac
}

fn split(token: &str) -> Result<(&str, &str, &str), JwtError> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() => Ok((h, p, s)),
        _ => Err(JwtError::Malformed(format!(
            "expected header.payload.signature, found {} segment(s)",
            token.split('.').count()
        ))),
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(segment: &str, what: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|e| JwtError::Malformed(format!("{what} is not base64url without padding: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(format!("{what} is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"unit-test-key";

    fn claims() -> Claims {
        Claims {
            aud: "https://eventhubs.azure.net/".into(),
            iss: "https://sts.windows.net/tenant/".into(),
            iat: 1_000,
            nbf: 940,
            exp: 2_000,
            appid: "client".into(),
            oid: "object".into(),
            sub: "object".into(),
            tid: "tenant".into(),
            xms_mirid: None,
        }
    }

    fn segment_json(token: &str, index: usize) -> serde_json::Value {
        let segment = token.split('.').nth(index).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
    }

    #[test]
    fn round_trip() {
        let token = issue(&claims(), KEY);
        assert_eq!(verify(&token, KEY, 1_500), Ok(claims()));
        assert_eq!(decode_unverified(&token), Ok(claims()));
        assert!(!token.contains('='), "no padding: {token}");
        assert_eq!(segment_json(&token, 0), serde_json::json!({"alg": "HS256", "typ": "JWT"}));
    }

    #[test]
    fn optional_claim_is_omitted_or_present() {
        let token = issue(&claims(), KEY);
        assert!(segment_json(&token, 1).get("xms_mirid").is_none());
        let with = Claims { xms_mirid: Some("/subscriptions/x".into()), ..claims() };
        let token = issue(&with, KEY);
        assert_eq!(segment_json(&token, 1)["xms_mirid"], "/subscriptions/x");
        assert_eq!(verify(&token, KEY, 1_500), Ok(with));
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256 from RFC 4231 test case 2, to pin the MAC itself.
        let tag = mac(b"Jefe", b"what do ya want for nothing?").finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn time_window_edges() {
        let token = issue(&claims(), KEY);
        assert!(verify(&token, KEY, 940).is_ok());
        assert!(verify(&token, KEY, 1_999).is_ok());
        assert_eq!(verify(&token, KEY, 939), Err(JwtError::NotYetValid { nbf: 940, now: 939 }));
        assert_eq!(verify(&token, KEY, 2_000), Err(JwtError::Expired { exp: 2_000, now: 2_000 }));
        assert_eq!(verify(&token, KEY, 2_001).unwrap_err().to_string(), "token expired at 2000, now is 2001");
    }

    #[test]
    fn wrong_key_and_tampering_are_bad_signatures() {
        let token = issue(&claims(), KEY);
        assert_eq!(verify(&token, b"other-key", 1_500), Err(JwtError::BadSignature));

        let forged = Claims { aud: "https://storage.azure.com".into(), ..claims() };
        let forged_payload = issue(&forged, b"attacker").split('.').nth(1).unwrap().to_owned();
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = &forged_payload;
        assert_eq!(verify(&parts.join("."), KEY, 1_500), Err(JwtError::BadSignature));

        // 43 signature characters minus 3 is still valid base64url, of a too-short MAC.
        let truncated = &token[..token.len() - 3];
        assert_eq!(verify(truncated, KEY, 1_500), Err(JwtError::BadSignature));
    }

    #[test]
    fn signature_is_checked_before_times() {
        // An expired token under the wrong key is reported as a bad signature, not as expired.
        let token = issue(&claims(), KEY);
        assert_eq!(verify(&token, b"other", 5_000), Err(JwtError::BadSignature));
    }

    #[test]
    fn other_algorithms_are_rejected() {
        let token = issue(&claims(), KEY);
        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let payload = token.split('.').nth(1).unwrap();
        let unsigned = format!("{none_header}.{payload}.");
        assert_eq!(verify(&unsigned, KEY, 1_500), Err(JwtError::UnsupportedAlgorithm("none".into())));
    }

    #[test]
    fn malformed_tokens() {
        for bad in ["", "abc", "a.b", "a.b.c.d", ".x.y", "!!!.e30.sig"] {
            assert!(matches!(verify(bad, KEY, 0), Err(JwtError::Malformed(_))), "{bad:?}");
        }
        // A valid header and signature over a payload that is not claims JSON.
        let header = URL_SAFE_NO_PAD.encode(HEADER_JSON);
        let payload = URL_SAFE_NO_PAD.encode(r#"{"aud":"x"}"#);
        let signing_input = format!("{header}.{payload}");
        let sig = URL_SAFE_NO_PAD.encode(mac(KEY, signing_input.as_bytes()).finalize().into_bytes());
        let token = format!("{signing_input}.{sig}");
        let err = verify(&token, KEY, 0).unwrap_err();
        assert!(matches!(&err, JwtError::Malformed(m) if m.contains("payload")), "{err}");
        assert!(matches!(decode_unverified("x.%%%.y"), Err(JwtError::Malformed(_))));
    }
}
