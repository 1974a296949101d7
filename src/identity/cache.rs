//! The token cache: one entry per audience for each source (identity), refreshed in the
//! background ahead of expiry (at half the lifetime when it is over 2 h, otherwise 5 minutes
//! before expiry, less a little jitter), single-flight (a thousand concurrent callers cause one
//! request), serving a still-valid token while a refresh fails and never an expired one.
//!
//! Times are `tokio::time::Instant`s taken when a token arrives, so a paused test clock drives
//! expiry and refresh exactly.

use super::{scope_to_resource, IdentityError, IdentityErrorKind, Token, TokenSource};
use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;

/// A token stops being served this long before it expires (or a tenth of its lifetime, if
/// shorter), so it does not expire on its way to the service.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Tokens living longer than this are refreshed at half their lifetime (as the Azure SDKs do).
const LONG_LIVED: Duration = Duration::from_secs(2 * 3600);
/// Shorter-lived tokens are refreshed this long before they expire.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// At most this much is taken off a refresh time at random, so replicas do not refresh together.
const MAX_JITTER: Duration = Duration::from_secs(60);
/// After a failed background refresh, wait at most this long before trying again.
const MAX_REFRESH_RETRY: Duration = Duration::from_secs(60);

struct Cached {
    token: Token,
    /// When it stops being served (expiry less the margin).
    usable_until: Instant,
    refresh_at: Instant,
}

struct Entry {
    resource: String,
    current: Mutex<Option<Arc<Cached>>>,
    /// Generation of the last token stored (see [`Token::generation`]).
    generation: std::sync::atomic::AtomicU64,
    /// Held by whoever is fetching: the single flight.
    flight: tokio::sync::Mutex<()>,
    /// The last fetch error, for readiness reports; cleared by a success.
    last_error: Mutex<Option<IdentityError>>,
    /// The scheduled background refresh, replaced at each new token.
    refresher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Entry {
    fn usable(&self, now: Instant) -> Option<Arc<Cached>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone().filter(|c| now < c.usable_until)
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(h) = self.refresher.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }
}

/// What `/readyz` and `identity get-token` report about one cached audience.
#[derive(Debug, Clone)]
pub struct TokenStatus {
    pub resource: String,
    /// How long the held token is still served, if one is held.
    pub valid_for: Option<Duration>,
    /// When the background refresh of the held token is due.
    pub refresh_in: Option<Duration>,
    pub last_error: Option<String>,
}

/// Tokens of one source, per resource.
pub struct TokenCache {
    source: Arc<dyn TokenSource>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache").field("source", &self.source).finish_non_exhaustive()
    }
}

/// When to refresh a token that lives `lifetime`, before jitter.
pub fn refresh_after(lifetime: Duration) -> Duration {
    if lifetime > LONG_LIVED {
        lifetime / 2
    } else if lifetime > REFRESH_BEFORE_EXPIRY * 2 {
        lifetime - REFRESH_BEFORE_EXPIRY
    } else {
        lifetime / 2
    }
}

fn margin(lifetime: Duration) -> Duration {
    EXPIRY_MARGIN.min(lifetime / 10)
}

/// Bounded label values: the three audiences twinroute uses, "other" for anything else.
fn audience_label(resource: &str) -> &'static str {
    match resource.trim_end_matches('/') {
        "https://eventhubs.azure.net" => "eventhubs",
        "https://servicebus.azure.net" => "servicebus",
        "https://storage.azure.com" => "storage",
        _ => "other",
    }
}

impl TokenCache {
    pub fn new(source: Arc<dyn TokenSource>) -> Arc<Self> {
        Arc::new(Self { source, entries: Mutex::new(HashMap::new()) })
    }

    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }

    fn entry(&self, resource: &str) -> Arc<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(resource.to_owned())
            .or_insert_with(|| {
                Arc::new(Entry {
                    resource: resource.to_owned(),
                    current: Mutex::new(None),
                    generation: Default::default(),
                    flight: tokio::sync::Mutex::new(()),
                    last_error: Mutex::new(None),
                    refresher: Mutex::new(None),
                })
            })
            .clone()
    }

    /// A token for `resource`: the cached one while it is usable, else a fresh one (one request
    /// however many callers wait for it).
    pub async fn get(self: &Arc<Self>, resource: &str) -> Result<Token, IdentityError> {
        let entry = self.entry(resource);
        if let Some(c) = entry.usable(Instant::now()) {
            metrics::counter!("twinroute_token_cache_hits_total", "audience" => audience_label(resource))
                .increment(1);
            return Ok(c.token.clone());
        }
        let _flight = entry.flight.lock().await;
        // Whoever held the flight before us may have fetched it.
        if let Some(c) = entry.usable(Instant::now()) {
            return Ok(c.token.clone());
        }
        self.fetch_into(&entry).await
    }

    /// After a service refused `rejected` (e.g. a 401 from a sink): fetches a new token, once for
    /// all callers reporting the same token; a caller holding an older token just gets the current one.
    pub async fn force_refresh(
        self: &Arc<Self>,
        resource: &str,
        rejected: &Token,
    ) -> Result<Token, IdentityError> {
        let entry = self.entry(resource);
        let _flight = entry.flight.lock().await;
        let current = entry.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(c) = current.filter(|c| c.token.generation != rejected.generation) {
            if Instant::now() < c.usable_until {
                return Ok(c.token.clone());
            }
        }
        metrics::counter!("twinroute_token_refreshes_total", "audience" => audience_label(resource), "reason" => "forced")
            .increment(1);
        self.fetch_into(&entry).await
    }

    /// Fetches and stores a token; the caller holds the entry's flight.
    async fn fetch_into(self: &Arc<Self>, entry: &Arc<Entry>) -> Result<Token, IdentityError> {
        match self.source.fetch(&entry.resource).await {
            Ok(token) => Ok(self.store(entry, token)),
            Err(e) => {
                *entry.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                Err(e)
            }
        }
    }

    fn store(self: &Arc<Self>, entry: &Arc<Entry>, mut token: Token) -> Token {
        token.generation = entry.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let now = Instant::now();
        let remaining = token.expires_on - OffsetDateTime::now_utc();
        let lifetime = Duration::try_from(remaining).unwrap_or(Duration::ZERO);
        let usable_until = now + lifetime.saturating_sub(margin(lifetime));
        let base = refresh_after(lifetime);
        let jitter_cap = MAX_JITTER.min(base / 10);
        let jitter = jitter_cap.mul_f64(fastrand::f64());
        let refresh_at = now + base.saturating_sub(jitter);
        // The expiry as a timestamp: Prometheus derives the seconds left (`... - time()`) at any moment.
        metrics::gauge!("twinroute_token_expires_at_seconds", "audience" => audience_label(&entry.resource))
            .set(token.expires_on.unix_timestamp() as f64);
        tracing::debug!(
            resource = %entry.resource,
            source = self.source.name(),
            lifetime_s = lifetime.as_secs(),
            refresh_in_s = (refresh_at - now).as_secs(),
            "token acquired"
        );
        *entry.current.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new(Cached { token: token.clone(), usable_until, refresh_at }));
        *entry.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.schedule_refresh(entry, refresh_at);
        token
    }

    fn schedule_refresh(self: &Arc<Self>, entry: &Arc<Entry>, at: Instant) {
        let cache = Arc::downgrade(self);
        let weak_entry = Arc::downgrade(entry);
        let task = tokio::spawn(refresh_loop(cache, weak_entry, at));
        if let Some(old) = entry.refresher.lock().unwrap_or_else(|e| e.into_inner()).replace(task) {
            old.abort();
        }
    }

    /// The state of every resource this cache has been asked for.
    pub fn status(&self) -> Vec<TokenStatus> {
        let now = Instant::now();
        let entries: Vec<Arc<Entry>> =
            self.entries.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        entries
            .iter()
            .map(|e| TokenStatus {
                resource: e.resource.clone(),
                valid_for: e.usable(now).map(|c| c.usable_until - now),
                refresh_in: e.usable(now).map(|c| c.refresh_at.saturating_duration_since(now)),
                last_error: e
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|e| e.message.clone()),
            })
            .collect()
    }
}

/// Sleeps until `at`, then refreshes; on failure keeps the held token (while usable) and tries
/// again after a while, until it succeeds or the token is no longer usable.
async fn refresh_loop(cache: Weak<TokenCache>, entry: Weak<Entry>, at: Instant) {
    tokio::time::sleep_until(at).await;
    let mut retry_wait = Duration::from_secs(1);
    loop {
        let (Some(cache), Some(entry)) = (cache.upgrade(), entry.upgrade()) else { return };
        let result = {
            let _flight = entry.flight.lock().await;
            cache.source.fetch(&entry.resource).await
        };
        let label = audience_label(&entry.resource);
        match result {
            Ok(token) => {
                metrics::counter!("twinroute_token_refreshes_total", "audience" => label, "reason" => "ahead").increment(1);
                // `store` schedules the next refresh and replaces (aborts) this task's handle:
                // store last and return.
                cache.store(&entry, token);
                return;
            }
            Err(e) => {
                metrics::counter!("twinroute_token_refreshes_total", "audience" => label, "reason" => "failed").increment(1);
                let usable = entry.usable(Instant::now());
                *entry.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                let Some(held) = usable else {
                    tracing::error!(resource = %entry.resource, error = %e, "token refresh failed and the held token expired");
                    return;
                };
                let left = held.usable_until - Instant::now();
                tracing::warn!(resource = %entry.resource, error = %e, valid_for_s = left.as_secs(), "token refresh failed; still serving the held token");
                let wait = retry_wait.min(left / 2).max(Duration::from_millis(100));
                drop((cache, entry));
                tokio::time::sleep(wait).await;
                retry_wait = (retry_wait * 2).min(MAX_REFRESH_RETRY);
            }
        }
    }
}

/// A [`TokenSource`] behind a [`TokenCache`], as an `azure_core` `TokenCredential`.
#[derive(Clone)]
pub struct CachedCredential {
    cache: Arc<TokenCache>,
}

impl fmt::Debug for CachedCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedCredential").field("source", &self.cache.source_name()).finish()
    }
}

impl CachedCredential {
    pub fn new(source: Arc<dyn TokenSource>) -> Self {
        Self { cache: TokenCache::new(source) }
    }

    pub fn cache(&self) -> &Arc<TokenCache> {
        &self.cache
    }

    /// A token for a resource (audience).
    pub async fn token(&self, resource: &str) -> Result<Token, IdentityError> {
        self.cache.get(resource).await
    }
}

#[async_trait]
impl TokenCredential for CachedCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let [scope] = scopes else {
            return Err(IdentityError::new(
                IdentityErrorKind::Misconfigured,
                format!("a managed-identity token covers exactly one scope, {} were asked for", scopes.len()),
            )
            .into());
        };
        let token = self.cache.get(scope_to_resource(scope)).await?;
        Ok(AccessToken::new(token.secret.expose().to_owned(), token.expires_on))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_points_follow_the_sdk_rule() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(refresh_after(h(24)), h(12));
        assert_eq!(refresh_after(h(2) + Duration::from_secs(2)), h(1) + Duration::from_secs(1));
        assert_eq!(refresh_after(h(1)), Duration::from_secs(55 * 60));
        assert_eq!(refresh_after(Duration::from_secs(120)), Duration::from_secs(60));
        assert_eq!(margin(h(1)), EXPIRY_MARGIN);
        assert_eq!(margin(Duration::from_secs(100)), Duration::from_secs(10));
    }
}
