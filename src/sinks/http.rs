//! HTTPS plumbing shared by the sinks that speak HTTP (Blob, Event Grid, the dead-letter store):
//! one way to build the client (extra CA certificates, timeouts), to read `Retry-After`, and to
//! describe a failure without leaking a secret.
//!
//! Secrets travel in two places on these requests: SAS tokens in the URL query (`sig=`), keys and
//! tokens in headers. Headers never reach a message here; URLs do (errors from the HTTP stack
//! name the URL they failed on), so every URL put into a message loses its query first, and free
//! text from the HTTP stack goes through [`redact_urls`].

use std::path::Path;
use std::time::Duration;
use time::OffsetDateTime;

/// How long establishing a connection (TCP and TLS) may take. Failures must reach the delivery
/// engine quickly: it owns retries and backoff, a sink only reports what happened.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the server may stay silent on an established connection before the request fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a whole request may take (bodies are at most a few MB: one Event Grid request is
/// under 1 MB, a blob holds one event or one batch).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the HTTPS client of an endpoint: the system's trust store plus the certificates of
/// `ca_file` (PEM, one or several; a private CA, a TLS-inspecting proxy, a local emulator), no
/// redirects (Azure services do not redirect, and a redirect must not carry a key elsewhere), no
/// automatic decompression (the Blob SDK reads ranges of stored bytes), and short timeouts.
pub fn client(ca_file: Option<&Path>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .gzip(false)
        .deflate(false);
    if let Some(path) = ca_file {
        builder = builder.tls_certs_merge(load_ca_file(path)?);
    }
    builder.build().map_err(|e| format!("could not build the HTTPS client: {}", error_chain(&e)))
}

/// Reads every certificate of a PEM file; a file with none is an error (a typo in the path or a
/// key file given by mistake would otherwise silently trust nothing extra).
pub fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    ca_file_certificates(path)?
        .iter()
        .map(|der| reqwest::Certificate::from_der(der))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("ca_file {}: not a valid PEM certificate bundle ({e})", path.display()))
}

/// The certificates (DER) of a PEM file, for every TLS client twinroute builds (HTTPS here,
/// AMQP in `sinks::amqp::wire`); a file with none is an error.
pub fn ca_file_certificates(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = std::fs::read(path).map_err(|e| format!("ca_file {}: cannot be read ({e})", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|der| der.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("ca_file {}: not a valid PEM certificate bundle ({e:?})", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "ca_file {}: holds no PEM certificate (expected -----BEGIN CERTIFICATE----- blocks)",
            path.display()
        ));
    }
    Ok(certificates)
}

/// A URL fit for a message: scheme, host, port and path; no user info, query (a SAS) or fragment.
pub fn redact_url(url: &url::Url) -> String {
    let mut clean = url.clone();
    clean.set_query(None);
    clean.set_fragment(None);
    // Both fail only for URLs that cannot have credentials, which then have none to remove.
    let _ = clean.set_username("");
    let _ = clean.set_password(None);
    clean.to_string()
}

/// Removes the query (and any `sig=` parameter outside a URL) from every URL in free text, such
/// as an error message from the HTTP stack: `error sending request for url (https://a/b?sv=..&sig=..)`
/// becomes `error sending request for url (https://a/b)`.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // Copy up to and including the scheme separator, then the URL up to its query.
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail.find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ','));
        let end = end.unwrap_or(tail.len());
        let url = &tail[..end];
        out.push_str(url.split(['?', '#']).next().unwrap_or(""));
        rest = &tail[end..];
    }
    out.push_str(rest);
    redact_sig_parameters(&out)
}

/// `sig=<anything>` up to the next `&` or blank becomes `sig=[redacted]` (a SAS printed without
/// its URL, e.g. a bare query string).
fn redact_sig_parameters(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("sig=") {
        let (head, tail) = rest.split_at(at + 4);
        out.push_str(head);
        let end = tail.find(|c: char| c == '&' || c.is_whitespace()).unwrap_or(tail.len());
        if end > 0 {
            out.push_str("[redacted]");
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// An error and its causes, `outer: inner: innermost`, with URLs redacted. The HTTP stack's
/// outermost message is often generic ("failed to execute request") and the cause is the useful
/// part ("invalid peer certificate: UnknownIssuer").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        // Wrappers often repeat their cause's text; keep each piece once.
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    redact_urls(&parts.join(": "))
}

/// A hint for users when a TLS failure looks like an unknown certificate authority.
pub fn tls_hint(reason: &str) -> &'static str {
    let lower = reason.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("unknownissuer") || lower.contains("tls") {
        " (if the service presents a certificate from a private CA, set ca_file to that CA's PEM file)"
    } else {
        ""
    }
}

/// The server's wait hint, from the headers Azure services use, most precise first:
/// `retry-after-ms`, `x-ms-retry-after-ms` (milliseconds), then `Retry-After` (seconds or an
/// HTTP date). `header` looks a header up by its lower-case name.
pub fn retry_after<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<Duration> {
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(ms) = header(name).and_then(|v| v.trim().parse::<u64>().ok()) {
            return Some(Duration::from_millis(ms));
        }
    }
    header("retry-after").and_then(|v| parse_retry_after(v, OffsetDateTime::now_utc()))
}

/// `Retry-After: <seconds>` or `Retry-After: <HTTP-date>` (RFC 9110 §10.2.3), relative to `now`.
/// A date in the past means "now" (zero); anything unreadable is no hint.
pub fn parse_retry_after(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn urls_lose_their_sas() {
        let url =
            url::Url::parse("https://user:pw@acct.blob.core.windows.net/c/b?sv=2022&sig=SECRET#f").unwrap();
        assert_eq!(redact_url(&url), "https://acct.blob.core.windows.net/c/b");
        let text = "error sending request for url (https://127.0.0.1:10000/a/c?sv=1&sig=SECRET): boom; \
                    also http://x/y?sig=SECRET2, and sig=SECRET3&se=1 done";
        let clean = redact_urls(text);
        assert!(!clean.contains("SECRET"), "{clean}");
        assert!(clean.contains("(https://127.0.0.1:10000/a/c): boom"), "{clean}");
        assert!(clean.contains("http://x/y,"), "{clean}");
        assert!(clean.contains("sig=[redacted]&se=1 done"), "{clean}");
    }

    #[test]
    fn retry_after_in_every_form() {
        let now = datetime!(2024-01-02 03:04:05 UTC);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Tue, 02 Jan 2024 03:04:15 GMT", now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("Tue, 02 Jan 2024 03:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        let headers = |name: &str| match name {
            "x-ms-retry-after-ms" => Some("1500"),
            "retry-after" => Some("9"),
            _ => None,
        };
        assert_eq!(retry_after(headers), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after(|n| (n == "retry-after").then_some("3")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(|_| None), None);
    }

    #[test]
    fn ca_files_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(load_ca_file(&missing).unwrap_err().contains("cannot be read"));
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        assert!(load_ca_file(&key).unwrap_err().contains("holds no PEM certificate"));
        assert!(client(Some(&key)).is_err());
        assert!(client(None).is_ok());
    }
}
