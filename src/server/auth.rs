//! Bearer tokens: every request to an API with a token must carry `Authorization: Bearer
//! <token>`, except the probes (`/healthz`, `/readyz`, and `/metrics` when the operator says so).
//!
//! Tokens are kept only as SHA-256 digests, and a presented token is compared with each of them in
//! constant time ([`subtle`]) over the digests, which all have the same length: neither the
//! token's content nor its length shows in the time an answer takes. A token file may hold several
//! tokens, one per line, so a rotation can overlap (add the new one, move the clients, remove the
//! old one); it is read again whenever it changes ([`TOKEN_FILE_POLL_INTERVAL`]).

use crate::config::TokenSource;
use arc_swap::ArcSwap;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// How often a token file is read for changes. Kubernetes takes up to a minute or so to update a
/// mounted Secret, so a few seconds more do not matter, and reading a small file costs nothing.
pub const TOKEN_FILE_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The `realm` of `WWW-Authenticate`.
const REALM: &str = "twinroute";

/// Set on every request that reached a handler: whether it carried a valid token (always true
/// when the API has none). Open paths use it to decide how much to say (`/readyz`'s details).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authorized(pub bool);

/// Who sent a request, for logs: the TCP peer, or `unix` for a Unix socket.
#[derive(Debug, Clone)]
pub struct Peer(pub Arc<str>);

/// The accepted tokens, as digests.
#[derive(Default)]
struct TokenSet {
    digests: Vec<[u8; 32]>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The tokens in a token file: one per non-empty line, surrounding whitespace ignored. An error
/// never contains the file's content.
fn parse_token_file(path: &Path, bytes: &[u8], key: &str) -> Result<TokenSet, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| format!("{key} {}: is not UTF-8 text", path.display()))?;
    let mut digests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let token = line.trim();
        if token.is_empty() {
            continue;
        }
        if let Some(problem) = crate::config::token_problem(token) {
            return Err(format!("{key} {}: the token on line {} {problem}", path.display(), n + 1));
        }
        digests.push(digest(token.as_bytes()));
    }
    if digests.is_empty() {
        return Err(format!(
            "{key} {}: holds no token (write the token on a line of its own)",
            path.display()
        ));
    }
    Ok(TokenSet { digests })
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token that is not one of the accepted ones (or a malformed header).
    Invalid,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
        }
    }
}

/// One API's token check: its tokens (reloadable) and the paths open without one.
pub struct Guard {
    /// `ingest` or `admin`.
    api: &'static str,
    /// `None`: the API has no token and every request passes.
    tokens: Option<ArcSwap<TokenSet>>,
    /// The token file, when the tokens come from one, and the digest of the content last seen
    /// (a change is noticed by content, which also covers Kubernetes' symlink swaps).
    file: Option<(PathBuf, Mutex<[u8; 32]>)>,
    /// Paths answered without a token (probes).
    open_paths: Vec<&'static str>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("api", &self.api)
            .field("token", &self.tokens.as_ref().map(|_| "[redacted]"))
            .field("file", &self.file.as_ref().map(|(p, _)| p))
            .field("open_paths", &self.open_paths)
            .finish()
    }
}

impl Guard {
    /// The guard for `api`, reading the token file once; the error (for the configuration
    /// report) names the key and the file, never the content.
    pub fn new(
        api: &'static str,
        source: Option<&TokenSource>,
        open_paths: Vec<&'static str>,
    ) -> Result<Guard, String> {
        let key = format!("{api}.token_file");
        let (tokens, file) = match source {
            None => (None, None),
            Some(TokenSource::Inline(secret)) => {
                (Some(TokenSet { digests: vec![digest(secret.expose().as_bytes())] }), None)
            }
            Some(TokenSource::File(path)) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    format!("{key} {}: cannot read it ({e}); it must hold the bearer token", path.display())
                })?;
                let set = parse_token_file(path, &bytes, &key)?;
                (Some(set), Some((path.clone(), Mutex::new(digest(&bytes)))))
            }
        };
        Ok(Guard { api, tokens: tokens.map(ArcSwap::from_pointee), file, open_paths })
    }

    /// Whether the API requires a token at all.
    pub fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// The token file, if the tokens come from one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_ref().map(|(p, _)| p.as_path())
    }

    /// Checks an `Authorization` header.
    pub fn check(&self, authorization: Option<&HeaderValue>) -> Result<(), Refusal> {
        let Some(tokens) = &self.tokens else { return Ok(()) };
        let Some(value) = authorization else { return Err(Refusal::Missing) };
        let presented = bearer(value.as_bytes()).ok_or(Refusal::Invalid)?;
        let presented = digest(presented);
        // Every digest is compared, whatever the outcome of the others.
        let mut matched = subtle::Choice::from(0);
        for accepted in &tokens.load().digests {
            matched |= accepted.ct_eq(&presented);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Refusal::Invalid)
        }
    }

    /// Takes a token file's new content into use if it changed and is valid; a file that became
    /// unreadable, empty or invalid leaves the tokens in force as they were (and is logged once
    /// per content). Returns whether the tokens changed.
    pub fn reload(&self, content: std::io::Result<Vec<u8>>) -> bool {
        let (Some((path, seen)), Some(tokens)) = (&self.file, &self.tokens) else { return false };
        let key = format!("{}.token_file", self.api);
        let bytes = match content {
            Ok(b) => b,
            Err(e) => {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                // Remember the failure as a pseudo-content, so it is logged once.
                let failure = digest(format!("unreadable: {e}").as_bytes());
                if *seen != failure {
                    *seen = failure;
                    tracing::error!(api = self.api, file = %path.display(), error = %e, "{key} cannot be read; the tokens in force stay in force");
                    metrics::counter!("twinroute_api_credentials_reloads_total", "api" => self.api, "kind" => "token", "result" => "error").increment(1);
                }
                return false;
            }
        };
        let now = digest(&bytes);
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return false;
        }
        *seen = now;
        match parse_token_file(path, &bytes, &key) {
            Ok(set) => {
                let count = set.digests.len();
                tokens.store(Arc::new(set));
                tracing::info!(api = self.api, file = %path.display(), tokens = count, "bearer tokens reloaded from {key}");
                metrics::counter!("twinroute_api_credentials_reloads_total", "api" => self.api, "kind" => "token", "result" => "success").increment(1);
                true
            }
            Err(problem) => {
                tracing::error!(api = self.api, problem = %problem, "{key} changed but is not valid; the tokens in force stay in force");
                metrics::counter!("twinroute_api_credentials_reloads_total", "api" => self.api, "kind" => "token", "result" => "error").increment(1);
                false
            }
        }
    }

    /// Reads the token file every [`TOKEN_FILE_POLL_INTERVAL`] and takes changes into use; runs
    /// until aborted. Nothing to do without a token file.
    pub async fn watch(self: Arc<Self>) {
        let Some(path) = self.file().map(Path::to_path_buf) else { return };
        let mut ticker = tokio::time::interval(TOKEN_FILE_POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            self.reload(tokio::fs::read(&path).await);
        }
    }

    fn is_open(&self, path: &str) -> bool {
        self.open_paths.contains(&path)
    }

    fn refuse(&self, refusal: Refusal, request: &Request) -> Response {
        let peer = request.extensions().get::<Peer>().map_or("-", |p| &p.0);
        // The path and the peer, never the header: a wrong token is often someone's real one.
        tracing::debug!(api = self.api, reason = refusal.label(), method = %request.method(), path = request.uri().path(), peer, "request refused: bearer token {}", refusal.label());
        metrics::counter!("twinroute_auth_failures_total", "api" => self.api, "reason" => refusal.label())
            .increment(1);
        let (code, message, challenge) = match refusal {
            Refusal::Missing => (
                "Unauthorized",
                format!("this API requires a bearer token: send Authorization: Bearer <token> (the token is set with {}.token or {}.token_file)", self.api, self.api),
                format!("Bearer realm=\"{REALM}\""),
            ),
            Refusal::Invalid => (
                "InvalidAuthenticationToken",
                "the bearer token is not valid for this API".to_owned(),
                format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""),
            ),
        };
        let mut response = crate::admin::error_response(401, code, message);
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        response
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 9110), if the header has
/// that form.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = b"bearer ";
    if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return None;
    }
    let token = value[scheme.len()..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The middleware: refuses requests without a valid token (401 with `WWW-Authenticate: Bearer`
/// and an ADT-shaped error), lets the open paths through, and tells handlers which it was.
pub async fn require_token(State(guard): State<Arc<Guard>>, mut request: Request, next: Next) -> Response {
    let verdict = guard.check(request.headers().get(header::AUTHORIZATION));
    if verdict.is_ok() || guard.is_open(request.uri().path()) {
        request.extensions_mut().insert(Authorized(verdict.is_ok()));
        return next.run(request).await;
    }
    match verdict {
        Err(refusal) => guard.refuse(refusal, &request),
        Ok(()) => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const TOKEN: &str = "0123456789abcdef-token";

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let guard =
            Guard::new("ingest", Some(&TokenSource::Inline(Secret::new(TOKEN))), vec!["/healthz"]).unwrap();
        assert!(guard.enabled());
        assert_eq!(guard.check(Some(&header(&format!("Bearer {TOKEN}")))), Ok(()));
        assert_eq!(guard.check(Some(&header(&format!("bearer  {TOKEN} ")))), Ok(()), "scheme case, spaces");
        assert_eq!(guard.check(None), Err(Refusal::Missing));
        for wrong in [
            format!("Bearer {TOKEN}x"),
            format!("Bearer {}", &TOKEN[1..]),
            format!("Basic {TOKEN}"),
            TOKEN.to_owned(),
            "Bearer ".to_owned(),
        ] {
            assert_eq!(guard.check(Some(&header(&wrong))), Err(Refusal::Invalid), "{wrong}");
        }
        assert!(!format!("{guard:?}").contains(TOKEN));
        let open = Guard::new("admin", None, vec![]).unwrap();
        assert!(!open.enabled());
        assert_eq!(open.check(None), Ok(()));
    }

    #[test]
    fn a_token_file_holds_one_token_a_line_and_is_reloaded_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let (old, new) = ("old-token-0123456789", "new-token-0123456789");
        std::fs::write(&path, format!("{old}\n")).unwrap();
        let guard = Guard::new("admin", Some(&TokenSource::File(path.clone())), vec![]).unwrap();
        let ok = |t: &str| guard.check(Some(&header(&format!("Bearer {t}")))).is_ok();
        assert!(ok(old) && !ok(new));
        assert!(!guard.reload(std::fs::read(&path)), "unchanged");
        // A rotation: both for a while, then only the new one.
        std::fs::write(&path, format!("  {new}\n\n{old}\n")).unwrap();
        assert!(guard.reload(std::fs::read(&path)));
        assert!(ok(old) && ok(new));
        std::fs::write(&path, new).unwrap();
        assert!(guard.reload(std::fs::read(&path)));
        assert!(!ok(old) && ok(new));
        // Broken files keep what is in force.
        std::fs::write(&path, "\n").unwrap();
        assert!(!guard.reload(std::fs::read(&path)));
        std::fs::remove_file(&path).unwrap();
        assert!(!guard.reload(std::fs::read(&path)));
        assert!(ok(new));

        // At start, the same problems are configuration errors that never show the content.
        std::fs::write(&path, "short\n").unwrap();
        let err = Guard::new("admin", Some(&TokenSource::File(path.clone())), vec![]).unwrap_err();
        assert!(
            err.contains("admin.token_file") && err.contains("line 1") && !err.contains("short\n"),
            "{err}"
        );
        let missing = dir.path().join("missing");
        let err = Guard::new("ingest", Some(&TokenSource::File(missing)), vec![]).unwrap_err();
        assert!(err.contains("ingest.token_file") && err.contains("cannot read"), "{err}");
    }
}
