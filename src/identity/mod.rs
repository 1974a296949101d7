//! Identity: where endpoints get their credentials.
//!
//! - Managed identity tokens from IMDS ([`imds`]), the heart of it: system- or user-assigned,
//!   retried as Microsoft's IMDS guidance says, and cached ([`cache`]) per (identity, audience)
//!   with refresh ahead of expiry, single-flight and stale-but-valid serving.
//! - The other hosts' sources ([`sources`]): AKS workload identity, App Service / Container
//!   Apps, Azure Arc, and a client secret for development; behind the same cache.
//! - Keys ([`sas`]): Event Hubs / Service Bus SAS tokens signed locally from a connection string.
//!
//! Every token source implements [`TokenSource`]; [`CachedCredential`] puts one behind the cache
//! and implements `azure_core`'s `TokenCredential`, so every Azure SDK client can use it.

pub mod cache;
pub mod imds;
pub mod provider;
pub mod sas;
pub mod sources;

pub use cache::{CachedCredential, TokenCache, TokenStatus};
pub use imds::{ImdsCredential, ImdsOptions, ImdsRetryPolicy, ImdsSource, ImdsTransport, ReqwestTransport};
pub use provider::IdentityProvider;

use crate::config::Secret;
use async_trait::async_trait;
use std::fmt;
use time::OffsetDateTime;

/// The documented IMDS token endpoint of Azure VMs; the default of `identity.imds_endpoint`.
/// Tests and the local stand-ins never use it: they set the endpoint to a loopback address.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// Audience of Event Hubs tokens.
pub const AUDIENCE_EVENT_HUBS: &str = "https://eventhubs.azure.net/";
/// Audience of Service Bus tokens.
pub const AUDIENCE_SERVICE_BUS: &str = "https://servicebus.azure.net";
/// Audience of Azure Storage (Blob) tokens.
pub const AUDIENCE_STORAGE: &str = "https://storage.azure.com/";

/// Which user-assigned identity: exactly one of the three ways IMDS accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UserAssignedId {
    ClientId(String),
    ObjectId(String),
    /// The ARM resource id (IMDS query parameter `msi_res_id`).
    ResourceId(String),
}

/// A managed identity of this host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ManagedIdentityId {
    SystemAssigned,
    UserAssigned(UserAssignedId),
}

impl ManagedIdentityId {
    /// The IMDS query parameter selecting this identity, if any.
    pub fn query_pair(&self) -> Option<(&'static str, &str)> {
        match self {
            ManagedIdentityId::SystemAssigned => None,
            ManagedIdentityId::UserAssigned(UserAssignedId::ClientId(id)) => Some(("client_id", id)),
            ManagedIdentityId::UserAssigned(UserAssignedId::ObjectId(id)) => Some(("object_id", id)),
            ManagedIdentityId::UserAssigned(UserAssignedId::ResourceId(id)) => Some(("msi_res_id", id)),
        }
    }
}

impl fmt::Display for ManagedIdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.query_pair() {
            None => f.write_str("the system-assigned identity"),
            Some((key, value)) => write!(f, "the user-assigned identity with {key} {value}"),
        }
    }
}

impl From<&crate::config::Identity> for ManagedIdentityId {
    /// An endpoint's `identity`: ADT names a user-assigned identity by its ARM id (`msi_res_id`).
    fn from(identity: &crate::config::Identity) -> Self {
        match identity {
            crate::config::Identity::SystemAssigned => ManagedIdentityId::SystemAssigned,
            crate::config::Identity::UserAssigned { resource_id } => {
                ManagedIdentityId::UserAssigned(UserAssignedId::ResourceId(resource_id.clone()))
            }
        }
    }
}

/// A bearer token and when it expires.
#[derive(Clone)]
pub struct Token {
    pub secret: Secret,
    pub expires_on: OffsetDateTime,
    /// Which fetch of its cache entry produced it (0 outside a cache): lets a forced refresh
    /// tell "the token I was refused with" from "a newer one", even when a source hands out the
    /// same token text twice (IMDS caches tokens itself).
    pub generation: u64,
}

impl Token {
    pub fn new(secret: Secret, expires_on: OffsetDateTime) -> Self {
        Self { secret, expires_on, generation: 0 }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token").field("secret", &self.secret).field("expires_on", &self.expires_on).finish()
    }
}

/// What kind of failure getting a token was; decides retrying and what to tell the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityErrorKind {
    /// The identity does not exist on this host (or is not attached): an operator must act.
    NotFound,
    /// The source refused the request (other 4xx): retrying the same request cannot help.
    Refused,
    /// The source could not be reached or answered 5xx / 404 / 429 / 410 through every retry.
    Unavailable,
    /// The source answered something that is not a token.
    Malformed,
    /// The configuration or environment does not describe a usable source.
    Misconfigured,
}

/// Why a token could not be had. The message says what happened and what to do; it never
/// contains a token or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct IdentityError {
    pub kind: IdentityErrorKind,
    pub message: String,
}

impl IdentityError {
    pub fn new(kind: IdentityErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl From<IdentityError> for azure_core::Error {
    fn from(e: IdentityError) -> Self {
        azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, e.message)
    }
}

/// Something that issues tokens for a resource (audience). Sources apply their own retry
/// policy; caching is [`TokenCache`]'s job.
#[async_trait]
pub trait TokenSource: Send + Sync + fmt::Debug + 'static {
    /// A token for `resource` (an audience such as `https://eventhubs.azure.net/`).
    async fn fetch(&self, resource: &str) -> Result<Token, IdentityError>;
    /// The source's name for metrics and messages (`imds`, `workload_identity`, ...).
    fn name(&self) -> &'static str;
}

/// `https://x/.default` (an Entra v2 scope) to `https://x/` (the resource IMDS wants), and a
/// resource unchanged.
pub fn scope_to_resource(scope: &str) -> &str {
    scope.strip_suffix(".default").unwrap_or(scope)
}
