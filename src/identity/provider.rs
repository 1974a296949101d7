//! The identity source of this host (`[identity]` in the configuration) and a cached credential
//! per managed identity that endpoints name. Also what readiness needs: which identity-based
//! endpoints hold their tokens.

use super::imds::{ImdsOptions, ImdsRetryPolicy, ImdsSource, ImdsTransport, ReqwestTransport};
use super::sources::{AzureArcSource, AzureSdkSource};
use super::{
    CachedCredential, IdentityError, IdentityErrorKind, ManagedIdentityId, TokenSource, UserAssignedId,
    AUDIENCE_EVENT_HUBS, AUDIENCE_SERVICE_BUS, AUDIENCE_STORAGE,
};
use crate::config::{DeadLetter, EndpointConfig, EndpointType, IdentityConfig, IdentitySourceKind};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// First wait of the start-up token warmer after a failure; doubles up to the cap.
const WARM_RETRY_FIRST: Duration = Duration::from_secs(2);
const WARM_RETRY_CAP: Duration = Duration::from_secs(60);

/// The audiences an endpoint needs tokens for: its service's, and Storage's when it dead-letters
/// with its identity.
pub fn audiences(endpoint: &EndpointConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    if endpoint.identity.is_none() {
        return out;
    }
    match endpoint.endpoint_type {
        EndpointType::EventHub => out.push(AUDIENCE_EVENT_HUBS),
        EndpointType::ServiceBus => out.push(AUDIENCE_SERVICE_BUS),
        EndpointType::Blob => out.push(AUDIENCE_STORAGE),
        _ => {}
    }
    if matches!(endpoint.dead_letter, Some(DeadLetter::Identity(_))) && !out.contains(&AUDIENCE_STORAGE) {
        out.push(AUDIENCE_STORAGE);
    }
    out
}

/// The Azure role an identity needs for an audience, for error messages.
pub fn required_role(audience: &str) -> &'static str {
    match audience {
        AUDIENCE_EVENT_HUBS => "Azure Event Hubs Data Sender",
        AUDIENCE_SERVICE_BUS => "Azure Service Bus Data Sender",
        _ => "Storage Blob Data Contributor",
    }
}

/// Cached credentials for the managed identities endpoints use, from one source.
pub struct IdentityProvider {
    config: IdentityConfig,
    transport: Arc<dyn ImdsTransport>,
    credentials: Mutex<HashMap<ManagedIdentityId, CachedCredential>>,
    /// (identity, audience) pairs a warmer is working on, so each gets one.
    warming: Arc<Mutex<HashSet<(ManagedIdentityId, &'static str)>>>,
}

impl std::fmt::Debug for IdentityProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityProvider").field("source", &self.config.source).finish_non_exhaustive()
    }
}

impl IdentityProvider {
    /// A provider for `config`; `transport` replaces HTTP for the IMDS and Arc sources (tests).
    pub fn new(config: &IdentityConfig, transport: Option<Arc<dyn ImdsTransport>>) -> Self {
        let timeout = Duration::from_secs(config.request_timeout_seconds.max(1));
        Self {
            config: config.clone(),
            transport: transport.unwrap_or_else(|| Arc::new(ReqwestTransport::new(timeout))),
            credentials: Mutex::new(HashMap::new()),
            warming: Arc::default(),
        }
    }

    /// Whether this host's source can act as `id`; the reason when it cannot.
    pub fn check(&self, id: &ManagedIdentityId) -> Result<(), String> {
        let user = matches!(id, ManagedIdentityId::UserAssigned(_));
        match self.config.source {
            IdentitySourceKind::Imds => Ok(()),
            IdentitySourceKind::AppService
                if matches!(id, ManagedIdentityId::UserAssigned(UserAssignedId::ResourceId(_))) =>
            {
                Err("App Service managed identity cannot select a user-assigned identity by ARM resource id \
                     (azure_identity 1.0 limitation): use identity.source = \"imds\" or a system-assigned identity"
                    .into())
            }
            IdentitySourceKind::AppService => Ok(()),
            IdentitySourceKind::AzureArc if user => {
                Err("Azure Arc-enabled servers have only a system-assigned identity".into())
            }
            IdentitySourceKind::AzureArc => Ok(()),
            IdentitySourceKind::WorkloadIdentity | IdentitySourceKind::ClientSecret if user => Err(format!(
                "identity.source = {:?} authenticates as one application (identity.client_id); it cannot \
                 select a user-assigned identity per endpoint: remove the endpoint's user_assigned_identity",
                self.config.source.as_str()
            )),
            _ => Ok(()),
        }
    }

    fn build(&self, id: &ManagedIdentityId) -> Result<Arc<dyn TokenSource>, IdentityError> {
        let misconfigured = |m: String| IdentityError::new(IdentityErrorKind::Misconfigured, m);
        self.check(id).map_err(misconfigured)?;
        let c = &self.config;
        Ok(match c.source {
            IdentitySourceKind::Imds => {
                let endpoint = url::Url::parse(&c.imds_endpoint)
                    .map_err(|e| misconfigured(format!("identity.imds_endpoint: {e}")))?;
                let options = ImdsOptions {
                    endpoint,
                    identity: id.clone(),
                    retry: ImdsRetryPolicy::default(),
                    timeout: Duration::from_secs(c.request_timeout_seconds.max(1)),
                };
                Arc::new(ImdsSource::new(options, self.transport.clone()))
            }
            IdentitySourceKind::AzureArc => {
                let endpoint = std::env::var("IDENTITY_ENDPOINT").map_err(|_| {
                    misconfigured("identity.source = \"azure_arc\" but IDENTITY_ENDPOINT is not set: is the Azure Connected Machine agent installed?".into())
                })?;
                let endpoint = url::Url::parse(&endpoint)
                    .map_err(|e| misconfigured(format!("IDENTITY_ENDPOINT: {e}")))?;
                Arc::new(AzureArcSource::new(
                    endpoint,
                    c.arc_key_directory.clone().into(),
                    self.transport.clone(),
                ))
            }
            IdentitySourceKind::AppService => {
                for var in ["IDENTITY_ENDPOINT", "IDENTITY_HEADER"] {
                    if std::env::var(var).is_err() {
                        return Err(misconfigured(format!(
                            "identity.source = \"app_service\" but {var} is not set: is managed identity enabled on the app?"
                        )));
                    }
                }
                let user_assigned_id = match id {
                    ManagedIdentityId::SystemAssigned => None,
                    ManagedIdentityId::UserAssigned(UserAssignedId::ClientId(v)) => {
                        Some(azure_identity::UserAssignedId::ClientId(v.clone()))
                    }
                    ManagedIdentityId::UserAssigned(UserAssignedId::ObjectId(v)) => {
                        Some(azure_identity::UserAssignedId::ObjectId(v.clone()))
                    }
                    ManagedIdentityId::UserAssigned(UserAssignedId::ResourceId(v)) => {
                        Some(azure_identity::UserAssignedId::ResourceId(v.clone()))
                    }
                };
                let options = azure_identity::ManagedIdentityCredentialOptions {
                    user_assigned_id,
                    ..Default::default()
                };
                let credential = azure_identity::ManagedIdentityCredential::new(Some(options))
                    .map_err(|e| misconfigured(format!("App Service managed identity: {e}")))?;
                Arc::new(AzureSdkSource::new("app_service", credential))
            }
            IdentitySourceKind::WorkloadIdentity => {
                let options = azure_identity::WorkloadIdentityCredentialOptions {
                    client_id: c.client_id.clone(),
                    tenant_id: c.tenant_id.clone(),
                    token_file_path: c.federated_token_file.clone().map(Into::into),
                    ..Default::default()
                };
                let credential = azure_identity::WorkloadIdentityCredential::new(Some(options)).map_err(|e| {
                    misconfigured(format!(
                        "workload identity: {e} (AKS sets AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE \
                         for pods labelled azure.workload.identity/use: \"true\")"
                    ))
                })?;
                Arc::new(AzureSdkSource::new("workload_identity", credential))
            }
            IdentitySourceKind::ClientSecret => {
                let (Some(tenant), Some(client), Some(secret)) =
                    (&c.tenant_id, &c.client_id, &c.client_secret)
                else {
                    return Err(misconfigured(
                        "identity.source = \"client_secret\" needs identity.tenant_id, identity.client_id and identity.client_secret".into(),
                    ));
                };
                let credential = azure_identity::ClientSecretCredential::new(
                    tenant,
                    client.clone(),
                    azure_core::credentials::Secret::new(secret.expose().to_owned()),
                    None,
                )
                .map_err(|e| misconfigured(format!("client secret credential: {e}")))?;
                Arc::new(AzureSdkSource::new("client_secret", credential))
            }
        })
    }

    /// The cached credential of `id` (one per identity for the life of the provider).
    pub fn credential(&self, id: &ManagedIdentityId) -> Result<CachedCredential, IdentityError> {
        let mut credentials = self.credentials.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = credentials.get(id) {
            return Ok(c.clone());
        }
        let credential = CachedCredential::new(self.build(id)?);
        credentials.insert(id.clone(), credential.clone());
        Ok(credential)
    }

    /// Starts getting the tokens every identity-based endpoint needs, retrying in the background
    /// until each is held, so readiness turns true as soon as possible.
    pub fn warm(&self, endpoints: &[EndpointConfig]) {
        for endpoint in endpoints {
            let Some(identity) = &endpoint.identity else { continue };
            let id = ManagedIdentityId::from(identity);
            for audience in audiences(endpoint) {
                if !self.warming.lock().unwrap_or_else(|e| e.into_inner()).insert((id.clone(), audience)) {
                    continue;
                }
                let credential = self.credential(&id);
                let warming = self.warming.clone();
                let name = endpoint.name.clone();
                let key = (id.clone(), audience);
                tokio::spawn(async move {
                    let mut wait = WARM_RETRY_FIRST;
                    match credential {
                        Ok(credential) => loop {
                            match credential.token(audience).await {
                                Ok(_) => break,
                                Err(e) => {
                                    tracing::warn!(endpoint = %name, audience, error = %e, retry_in_s = wait.as_secs(), "no token yet for an identity-based endpoint");
                                    tokio::time::sleep(wait).await;
                                    wait = (wait * 2).min(WARM_RETRY_CAP);
                                }
                            }
                        },
                        Err(e) => {
                            tracing::error!(endpoint = %name, error = %e, "identity-based endpoint cannot get tokens")
                        }
                    }
                    warming.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                });
            }
        }
    }

    /// For each identity-based endpoint that does not hold every token it needs: its name and why.
    pub fn missing_tokens(&self, endpoints: &[EndpointConfig]) -> Vec<(String, String)> {
        let mut missing = Vec::new();
        for endpoint in endpoints {
            let Some(identity) = &endpoint.identity else { continue };
            let id = ManagedIdentityId::from(identity);
            let credential = match self.credential(&id) {
                Ok(c) => c,
                Err(e) => {
                    missing.push((endpoint.name.clone(), e.message));
                    continue;
                }
            };
            let status = credential.cache().status();
            for audience in audiences(endpoint) {
                let entry = status.iter().find(|s| s.resource == audience);
                if entry.and_then(|s| s.valid_for).is_none() {
                    let why = entry
                        .and_then(|s| s.last_error.clone())
                        .unwrap_or_else(|| "no token yet (still being requested)".to_owned());
                    missing.push((endpoint.name.clone(), format!("{id} has no token for {audience}: {why}")));
                }
            }
        }
        missing
    }
}
