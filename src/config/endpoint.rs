//! Endpoints: where routed events go. The spec (what a user writes, in the config file or through
//! the admin API) is checked into an [`EndpointConfig`], reporting every problem at once.

use super::{ConnectionString, Secret};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// An endpoint as written in `[endpoints.<name>]` (and stored by the admin API): every field any
/// endpoint type uses, checked against the type by [`EndpointSpec::validate`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct EndpointSpec {
    /// `EventHub`, `ServiceBus`, `EventGrid`, `Blob`, `File` or `Stdout`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub endpoint_type: Option<String>,
    /// `KeyBased` (the default, as in ADT) or `IdentityBased`. Fixed once the endpoint exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication_type: Option<String>,
    /// Event Hubs / Service Bus namespace, `sb://<namespace>.servicebus.windows.net/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_uri: Option<String>,
    /// The hub, topic or queue name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_path: Option<String>,
    /// Service Bus: `topic` (the default, as in ADT) or `queue` (a twinroute extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_kind: Option<String>,
    /// Key-based Event Hubs / Service Bus: the primary connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_string: Option<Secret>,
    /// Key-based Event Hubs / Service Bus: the secondary connection string (used if the primary is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_string_secondary: Option<Secret>,
    /// Event Grid: the topic endpoint URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_endpoint: Option<String>,
    /// Event Grid: access keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key1: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key2: Option<Secret>,
    /// Event Grid: the topic's input schema, `CloudEvents` (default) or `EventGrid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Blob, identity-based: the container URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_url: Option<String>,
    /// Blob, key-based: a container SAS URL with write permission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_sas_url: Option<Secret>,
    /// File: where to append NDJSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Identity-based endpoints: which managed identity (system-assigned when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySpec>,
    /// Identity-based endpoints: dead-letter container URL, written with the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_uri: Option<String>,
    /// Key-based endpoints: dead-letter container SAS URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_secret: Option<Secret>,
    /// Event Hubs: `twin_id` (the default: one twin's events stay in order) or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// Event Hubs: send every event to this partition (instead of a partition key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_id: Option<String>,
    /// Service Bus: `none` (the default) or `twin_id` (for session-enabled queues and subscriptions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Blob: `json` (the default: one blob per event) or `ndjson` (one blob per delivered batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Retry and batching overrides for this endpoint (`[delivery]` keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<super::DeliveryOverrides>,
    /// Event Hubs / Service Bus: connect to this AMQP URL instead of the namespace's
    /// (`amqp://host:port` is plain TCP): a local stand-in or emulator, or a proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_endpoint: Option<String>,
    /// A PEM file of extra CA certificates to trust (a private CA, a TLS-inspecting proxy, a
    /// local emulator) for the endpoint's TLS connections: HTTPS (Blob, Event Grid, dead-letter
    /// stores) and AMQP over TLS (Event Hubs, Service Bus).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// Event Hubs partitioning of a checked endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partitioning {
    /// Partition key = the event's twin id (events without one get no key).
    TwinId,
    /// No key: the service spreads events.
    None,
    /// A fixed partition id.
    Partition(String),
}

/// Service Bus session id of a checked endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionIdFrom {
    None,
    TwinId,
}

/// Blob layout of a checked endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobFormat {
    /// `<endpoint>/<yyyy>/<mm>/<dd>/<hh>/<event-id>.json`, one structured event per blob.
    Json,
    /// `<endpoint>/<yyyy>/<mm>/<dd>/<hh>/<first-event-id>.ndjson`, one blob per delivered batch.
    Ndjson,
}

/// `identity = { type = "UserAssigned", user_assigned_identity = "<ARM id>" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    #[serde(rename = "type")]
    pub identity_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_assigned_identity: Option<String>,
}

impl IdentitySpec {
    /// The identity this names; the problem (keys under `identity.`) when it names none.
    pub fn resolve(&self) -> Result<Identity, String> {
        let t = self.identity_type.as_str();
        if t.eq_ignore_ascii_case("SystemAssigned") {
            return match self.user_assigned_identity {
                None => Ok(Identity::SystemAssigned),
                Some(_) => Err("identity.user_assigned_identity: only for type UserAssigned".into()),
            };
        }
        if !t.eq_ignore_ascii_case("UserAssigned") {
            return Err(format!("identity.type: {t:?} is neither SystemAssigned nor UserAssigned"));
        }
        match &self.user_assigned_identity {
            Some(id) if is_user_assigned_identity_id(id) => Ok(Identity::UserAssigned { resource_id: id.clone() }),
            Some(id) => Err(format!(
                "identity.user_assigned_identity: {id:?} is not the ARM id of a user-assigned identity \
                 (/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>)"
            )),
            None => Err(
                "identity.user_assigned_identity: required for type UserAssigned (the identity's ARM resource id)".into(),
            ),
        }
    }
}

/// The kinds of endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointType {
    EventHub,
    ServiceBus,
    EventGrid,
    Blob,
    File,
    Stdout,
}

impl EndpointType {
    pub const ALL: [EndpointType; 6] = [
        EndpointType::EventHub,
        EndpointType::ServiceBus,
        EndpointType::EventGrid,
        EndpointType::Blob,
        EndpointType::File,
        EndpointType::Stdout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndpointType::EventHub => "EventHub",
            EndpointType::ServiceBus => "ServiceBus",
            EndpointType::EventGrid => "EventGrid",
            EndpointType::Blob => "Blob",
            EndpointType::File => "File",
            EndpointType::Stdout => "Stdout",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for EndpointType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an endpoint authenticates. Fixed when the endpoint is created, as in ADT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthenticationType {
    KeyBased,
    IdentityBased,
}

impl AuthenticationType {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthenticationType::KeyBased => "KeyBased",
            AuthenticationType::IdentityBased => "IdentityBased",
        }
    }
}

impl fmt::Display for AuthenticationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A managed identity, as ADT's endpoint `identity` property names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    SystemAssigned,
    /// A user-assigned identity by its ARM resource id (sent to IMDS as `msi_res_id`).
    UserAssigned {
        resource_id: String,
    },
}

/// Service Bus entity kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceBusEntity {
    Topic,
    Queue,
}

/// Event Grid input schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventGridSchema {
    CloudEvents,
    EventGrid,
}

/// What an endpoint delivers to, checked and typed.
#[derive(Debug, Clone, PartialEq)]
pub enum EndpointTarget {
    EventHub {
        namespace: String,
        hub: String,
        connection: Option<ConnectionString>,
        partitioning: Partitioning,
    },
    ServiceBus {
        namespace: String,
        entity: String,
        kind: ServiceBusEntity,
        connection: Option<ConnectionString>,
        session_id: SessionIdFrom,
    },
    EventGrid {
        topic_endpoint: url::Url,
        schema: EventGridSchema,
    },
    /// `container_url` never holds a SAS: key-based Blob endpoints keep theirs in the spec.
    Blob {
        container_url: url::Url,
        format: BlobFormat,
    },
    File {
        path: PathBuf,
    },
    Stdout,
}

/// Where undeliverable events of an endpoint go.
#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetter {
    /// A container URL written with the endpoint's identity (`dead_letter_uri`).
    Identity(url::Url),
    /// A container SAS URL (`dead_letter_secret`).
    Sas(Secret),
}

/// A checked endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    pub name: String,
    pub endpoint_type: EndpointType,
    pub authentication_type: AuthenticationType,
    /// Set for identity-based endpoints.
    pub identity: Option<Identity>,
    pub target: EndpointTarget,
    pub dead_letter: Option<DeadLetter>,
    /// Extra CA certificates (PEM) to trust for this endpoint's TLS connections (HTTPS, AMQP).
    pub ca_file: Option<PathBuf>,
    /// Event Hubs / Service Bus: where the AMQP connection really goes (see the spec field).
    pub custom_endpoint: Option<url::Url>,
    /// The spec it was built from, kept so it can be stored and shown again exactly.
    pub spec: EndpointSpec,
}

/// Checks an endpoint name against ADT's rule: 3 to 50 letters, digits and hyphens, not starting
/// or ending with a hyphen, not only digits.
pub fn validate_endpoint_name(name: &str) -> Result<(), String> {
    let ok = (3..=50).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid endpoint name {name:?}: use 3 to 50 letters, digits and hyphens, not starting or \
             ending with a hyphen and not only digits"
        ))
    }
}

fn https_url(field: &str, value: &str, problems: &mut Vec<String>) -> Option<url::Url> {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "https" | "http") && u.host_str().is_some() => Some(u),
        Ok(_) => {
            problems.push(format!("{field}: must be an https:// URL"));
            None
        }
        Err(e) => {
            problems.push(format!("{field}: not a URL ({e})"));
            None
        }
    }
}

/// Checks a SAS URL without ever echoing it (it carries the signature).
fn sas_url(field: &str, value: &Secret, problems: &mut Vec<String>) -> Option<url::Url> {
    match url::Url::parse(value.expose()) {
        Ok(u) if matches!(u.scheme(), "https" | "http") && u.host_str().is_some() => {
            if u.query_pairs().any(|(k, _)| k == "sig") {
                Some(u)
            } else {
                problems.push(format!("{field}: not a SAS URL (it has no sig= parameter)"));
                None
            }
        }
        _ => {
            problems.push(format!("{field}: must be an https:// container SAS URL"));
            None
        }
    }
}

impl EndpointSpec {
    /// The fields that are set, by name, to report ones the endpoint's type does not use.
    fn set_fields(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        let mut mark = |name: &'static str, present: bool| {
            if present {
                set.push(name)
            }
        };
        mark("endpoint_uri", self.endpoint_uri.is_some());
        mark("entity_path", self.entity_path.is_some());
        mark("entity_kind", self.entity_kind.is_some());
        mark("connection_string", self.connection_string.is_some());
        mark("connection_string_secondary", self.connection_string_secondary.is_some());
        mark("topic_endpoint", self.topic_endpoint.is_some());
        mark("access_key1", self.access_key1.is_some());
        mark("access_key2", self.access_key2.is_some());
        mark("schema", self.schema.is_some());
        mark("container_url", self.container_url.is_some());
        mark("container_sas_url", self.container_sas_url.is_some());
        mark("path", self.path.is_some());
        mark("identity", self.identity.is_some());
        mark("dead_letter_uri", self.dead_letter_uri.is_some());
        mark("dead_letter_secret", self.dead_letter_secret.is_some());
        mark("partition_key", self.partition_key.is_some());
        mark("partition_id", self.partition_id.is_some());
        mark("session_id", self.session_id.is_some());
        mark("format", self.format.is_some());
        mark("ca_file", self.ca_file.is_some());
        mark("custom_endpoint", self.custom_endpoint.is_some());
        set
    }

    /// Checks this spec as the endpoint `name`; every problem is reported, each naming its field.
    pub fn validate(&self, name: &str) -> Result<EndpointConfig, Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = validate_endpoint_name(name) {
            problems.push(e);
        }
        let Some(type_text) = self.endpoint_type.as_deref() else {
            problems.push(format!(
                "type: missing; one of {}",
                EndpointType::ALL.map(EndpointType::as_str).join(", ")
            ));
            return Err(problems);
        };
        let Some(endpoint_type) = EndpointType::parse(type_text) else {
            problems.push(format!(
                "type: unknown endpoint type {type_text:?}; one of {}",
                EndpointType::ALL.map(EndpointType::as_str).join(", ")
            ));
            return Err(problems);
        };
        let authentication_type = match self.authentication_type.as_deref() {
            None => AuthenticationType::KeyBased,
            Some(a) if a.eq_ignore_ascii_case("KeyBased") => AuthenticationType::KeyBased,
            Some(a) if a.eq_ignore_ascii_case("IdentityBased") => AuthenticationType::IdentityBased,
            Some(a) => {
                problems.push(format!("authentication_type: {a:?} is neither KeyBased nor IdentityBased"));
                AuthenticationType::KeyBased
            }
        };
        let identity_based = authentication_type == AuthenticationType::IdentityBased;

        // Which fields this type and auth mode use; anything else set is a mistake worth reporting.
        let allowed: &[&str] = match (endpoint_type, identity_based) {
            (EndpointType::EventHub, false) => &[
                "endpoint_uri",
                "entity_path",
                "connection_string",
                "connection_string_secondary",
                "dead_letter_secret",
                "partition_key",
                "partition_id",
                "custom_endpoint",
                "ca_file",
            ],
            (EndpointType::EventHub, true) => &[
                "endpoint_uri",
                "entity_path",
                "identity",
                "dead_letter_uri",
                "partition_key",
                "partition_id",
                "custom_endpoint",
                "ca_file",
            ],
            (EndpointType::ServiceBus, false) => &[
                "endpoint_uri",
                "entity_path",
                "entity_kind",
                "connection_string",
                "connection_string_secondary",
                "dead_letter_secret",
                "session_id",
                "custom_endpoint",
                "ca_file",
            ],
            (EndpointType::ServiceBus, true) => &[
                "endpoint_uri",
                "entity_path",
                "entity_kind",
                "identity",
                "dead_letter_uri",
                "session_id",
                "custom_endpoint",
                "ca_file",
            ],
            (EndpointType::EventGrid, _) => {
                &["topic_endpoint", "access_key1", "access_key2", "schema", "dead_letter_secret", "ca_file"]
            }
            (EndpointType::Blob, false) => &["container_sas_url", "dead_letter_secret", "format", "ca_file"],
            (EndpointType::Blob, true) => {
                &["container_url", "identity", "dead_letter_uri", "format", "ca_file"]
            }
            (EndpointType::File, _) => &["path"],
            (EndpointType::Stdout, _) => &[],
        };
        for field in self.set_fields() {
            if !allowed.contains(&field) {
                let why = match field {
                    "dead_letter_uri" => " (key-based endpoints dead-letter through dead_letter_secret, a container SAS URL)",
                    "dead_letter_secret" => " (identity-based endpoints dead-letter through dead_letter_uri, written with the identity)",
                    "identity" => " (set authentication_type = \"IdentityBased\" to use a managed identity)",
                    "connection_string" | "connection_string_secondary" | "container_sas_url" => {
                        " (identity-based endpoints use no keys)"
                    }
                    _ => "",
                };
                problems.push(format!(
                    "{field}: not used by {} {endpoint_type} endpoints{why}",
                    authentication_type.as_str()
                ));
            }
        }
        let identity_based_supported =
            matches!(endpoint_type, EndpointType::EventHub | EndpointType::ServiceBus | EndpointType::Blob);
        if identity_based && !identity_based_supported {
            problems.push(match endpoint_type {
                EndpointType::EventGrid => "authentication_type: Event Grid endpoints support only KeyBased \
                     authentication (as in Azure Digital Twins: identity-based authentication is available \
                     for Event Hubs and Service Bus endpoints only)"
                    .to_owned(),
                _ => format!("authentication_type: {endpoint_type} endpoints do not authenticate; remove it"),
            });
        }

        let identity = if identity_based {
            match self.identity.as_ref().map_or(Ok(Identity::SystemAssigned), IdentitySpec::resolve) {
                Ok(identity) => Some(identity),
                Err(problem) => {
                    problems.push(problem);
                    None
                }
            }
        } else {
            None
        };

        if let Some(o) = &self.delivery {
            problems.extend(super::DeliveryConfig::default().with(Some(o)).problems("delivery"));
        }
        let target = self.target(endpoint_type, identity_based, &mut problems);
        // A connection string for a development emulator names where to connect.
        let emulator = self.connection_string.as_ref().and_then(|cs| {
            let text = cs.expose().to_ascii_lowercase();
            text.contains("usedevelopmentemulator=true")
                .then(|| ConnectionString::parse(cs.expose()).ok())
                .flatten()
        });
        let custom_endpoint = match (&self.custom_endpoint, emulator) {
            (Some(u), _) => match url::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "amqp" | "amqps") && url.host_str().is_some() => Some(url),
                _ => {
                    problems.push(format!("custom_endpoint: {u:?} is not an amqp:// or amqps:// URL"));
                    None
                }
            },
            (None, Some(cs)) => {
                let port = cs.endpoint.port().unwrap_or(5672);
                url::Url::parse(&format!("amqp://{}:{port}", cs.namespace)).ok()
            }
            (None, None) => None,
        };

        let dead_letter = match (&self.dead_letter_uri, &self.dead_letter_secret) {
            (Some(uri), _) if identity_based => {
                https_url("dead_letter_uri", uri, &mut problems).map(DeadLetter::Identity)
            }
            (_, Some(sas)) if !identity_based => {
                sas_url("dead_letter_secret", sas, &mut problems).map(|_| DeadLetter::Sas(sas.clone()))
            }
            _ => None,
        };

        match target {
            Some(target) if problems.is_empty() => Ok(EndpointConfig {
                name: name.to_owned(),
                endpoint_type,
                authentication_type,
                identity,
                target,
                dead_letter,
                ca_file: self.ca_file.as_ref().map(PathBuf::from),
                custom_endpoint,
                spec: self.clone(),
            }),
            _ => Err(problems),
        }
    }

    fn target(
        &self,
        endpoint_type: EndpointType,
        identity_based: bool,
        problems: &mut Vec<String>,
    ) -> Option<EndpointTarget> {
        let required = |field: &str, value: &Option<String>, problems: &mut Vec<String>| -> Option<String> {
            match value.as_deref().map(str::trim) {
                Some(v) if !v.is_empty() => Some(v.to_owned()),
                _ => {
                    problems.push(format!("{field}: required for {endpoint_type} endpoints"));
                    None
                }
            }
        };
        match endpoint_type {
            EndpointType::EventHub | EndpointType::ServiceBus => {
                let (namespace, entity, connection) = if identity_based {
                    let uri = required("endpoint_uri", &self.endpoint_uri, problems);
                    let namespace = uri.and_then(|u| namespace_of(&u, problems));
                    let entity = required("entity_path", &self.entity_path, problems);
                    (namespace, entity, None)
                } else {
                    let Some(cs) = &self.connection_string else {
                        problems.push(format!(
                            "connection_string: required for KeyBased {endpoint_type} endpoints \
                             (Endpoint=sb://<namespace>/;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...)"
                        ));
                        return None;
                    };
                    let cs = match ConnectionString::parse(cs.expose()) {
                        Ok(cs) => cs,
                        Err(e) => {
                            problems.push(format!("connection_string: {e}"));
                            return None;
                        }
                    };
                    if let Some(secondary) = &self.connection_string_secondary {
                        if let Err(e) = ConnectionString::parse(secondary.expose()) {
                            problems.push(format!("connection_string_secondary: {e}"));
                        }
                    }
                    if let Some(uri) = &self.endpoint_uri {
                        if let Some(ns) = namespace_of(uri, problems) {
                            if !ns.eq_ignore_ascii_case(&cs.namespace) {
                                problems.push(format!(
                                    "endpoint_uri: names namespace {ns} but the connection string is for {}",
                                    cs.namespace
                                ));
                            }
                        }
                    }
                    let entity = match (&cs.entity_path, &self.entity_path) {
                        (Some(a), Some(b)) if a != b => {
                            problems.push(format!(
                                "entity_path: {b:?} differs from the connection string's EntityPath {a:?}"
                            ));
                            None
                        }
                        (Some(a), _) => Some(a.clone()),
                        (None, Some(b)) => Some(b.clone()),
                        (None, None) => {
                            problems.push(
                                "entity_path: required (or EntityPath in the connection string)".into(),
                            );
                            None
                        }
                    };
                    (Some(cs.namespace.clone()), entity, Some(cs))
                };
                let (namespace, entity) = (namespace?, entity?);
                if endpoint_type == EndpointType::EventHub {
                    let partitioning = match (self.partition_id.as_deref(), self.partition_key.as_deref()) {
                        (Some(id), None) if !id.trim().is_empty() => {
                            Partitioning::Partition(id.trim().to_owned())
                        }
                        (Some(_), Some(_)) => {
                            problems.push(
                                "partition_id and partition_key: choose one (a fixed partition has no key)"
                                    .into(),
                            );
                            return None;
                        }
                        (Some(_), None) => {
                            problems.push("partition_id: must not be empty".into());
                            return None;
                        }
                        (None, None) => Partitioning::TwinId,
                        (None, Some(k)) if k.eq_ignore_ascii_case("twin_id") => Partitioning::TwinId,
                        (None, Some(k)) if k.eq_ignore_ascii_case("none") => Partitioning::None,
                        (None, Some(k)) => {
                            problems.push(format!("partition_key: {k:?} is neither twin_id nor none"));
                            return None;
                        }
                    };
                    return Some(EndpointTarget::EventHub {
                        namespace,
                        hub: entity,
                        connection,
                        partitioning,
                    });
                }
                let kind = match self.entity_kind.as_deref() {
                    None => ServiceBusEntity::Topic,
                    Some(k) if k.eq_ignore_ascii_case("topic") => ServiceBusEntity::Topic,
                    Some(k) if k.eq_ignore_ascii_case("queue") => ServiceBusEntity::Queue,
                    Some(k) => {
                        problems.push(format!("entity_kind: {k:?} is neither topic nor queue"));
                        return None;
                    }
                };
                let session_id = match self.session_id.as_deref() {
                    None => SessionIdFrom::None,
                    Some(v) if v.eq_ignore_ascii_case("none") => SessionIdFrom::None,
                    Some(v) if v.eq_ignore_ascii_case("twin_id") => SessionIdFrom::TwinId,
                    Some(v) => {
                        problems.push(format!("session_id: {v:?} is neither none nor twin_id"));
                        return None;
                    }
                };
                Some(EndpointTarget::ServiceBus { namespace, entity, kind, connection, session_id })
            }
            EndpointType::EventGrid => {
                let url = required("topic_endpoint", &self.topic_endpoint, problems)
                    .and_then(|u| https_url("topic_endpoint", &u, problems));
                if self.access_key1.as_ref().is_none_or(|k| k.expose().is_empty()) {
                    problems.push("access_key1: required for EventGrid endpoints".into());
                }
                let schema = match self.schema.as_deref() {
                    None => EventGridSchema::CloudEvents,
                    Some(s)
                        if s.eq_ignore_ascii_case("CloudEvents")
                            || s.eq_ignore_ascii_case("CloudEventSchemaV1_0") =>
                    {
                        EventGridSchema::CloudEvents
                    }
                    Some(s)
                        if s.eq_ignore_ascii_case("EventGrid")
                            || s.eq_ignore_ascii_case("EventGridSchema") =>
                    {
                        EventGridSchema::EventGrid
                    }
                    Some(s) => {
                        problems.push(format!("schema: {s:?} is neither CloudEvents nor EventGrid"));
                        return None;
                    }
                };
                Some(EndpointTarget::EventGrid { topic_endpoint: url?, schema })
            }
            EndpointType::Blob => {
                let url = if identity_based {
                    required("container_url", &self.container_url, problems)
                        .and_then(|u| https_url("container_url", &u, problems))
                } else {
                    match &self.container_sas_url {
                        Some(sas) => sas_url("container_sas_url", sas, problems).map(|mut u| {
                            u.set_query(None);
                            u
                        }),
                        None => {
                            problems.push("container_sas_url: required for KeyBased Blob endpoints".into());
                            None
                        }
                    }
                };
                let format = match self.format.as_deref() {
                    None => BlobFormat::Json,
                    Some(f) if f.eq_ignore_ascii_case("json") => BlobFormat::Json,
                    Some(f) if f.eq_ignore_ascii_case("ndjson") => BlobFormat::Ndjson,
                    Some(f) => {
                        problems.push(format!("format: {f:?} is neither json nor ndjson"));
                        return None;
                    }
                };
                Some(EndpointTarget::Blob { container_url: url?, format })
            }
            EndpointType::File => required("path", &self.path, problems)
                .map(|p| EndpointTarget::File { path: PathBuf::from(p) }),
            EndpointType::Stdout => Some(EndpointTarget::Stdout),
        }
    }
}

/// The namespace host of an `sb://<ns>.servicebus.windows.net/` URI.
fn namespace_of(uri: &str, problems: &mut Vec<String>) -> Option<String> {
    match url::Url::parse(uri) {
        Ok(u)
            if matches!(u.scheme(), "sb" | "amqps" | "amqp" | "https")
                && u.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            u.host_str().map(str::to_owned)
        }
        _ => {
            problems.push(format!(
                "endpoint_uri: {uri:?} is not a namespace URI (expected sb://<namespace>.servicebus.windows.net/)"
            ));
            None
        }
    }
}

/// `/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>`.
fn is_user_assigned_identity_id(id: &str) -> bool {
    let parts: Vec<&str> = id.trim_start_matches('/').split('/').collect();
    parts.len() == 8
        && parts[0].eq_ignore_ascii_case("subscriptions")
        && parts[2].eq_ignore_ascii_case("resourceGroups")
        && parts[4].eq_ignore_ascii_case("providers")
        && parts[5].eq_ignore_ascii_case("Microsoft.ManagedIdentity")
        && parts[6].eq_ignore_ascii_case("userAssignedIdentities")
        && [1, 3, 7].iter().all(|&i| !parts[i].is_empty())
        && id.starts_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    const UAMI: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/twins";

    fn spec(ty: &str) -> EndpointSpec {
        EndpointSpec { endpoint_type: Some(ty.into()), ..Default::default() }
    }

    #[test]
    fn endpoint_names_follow_adt() {
        for ok in ["abc", "my-hub", "Hub1", "a1-b2-c3", &"x".repeat(50)] {
            assert!(validate_endpoint_name(ok).is_ok(), "{ok}");
        }
        for bad in ["ab", "-abc", "abc-", "123", "a_b", "a.b", &"x".repeat(51), ""] {
            assert!(validate_endpoint_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn identity_based_event_hub() {
        let mut s = spec("EventHub");
        s.authentication_type = Some("IdentityBased".into());
        s.endpoint_uri = Some("sb://contoso.servicebus.windows.net/".into());
        s.entity_path = Some("twins".into());
        s.identity = Some(IdentitySpec {
            identity_type: "UserAssigned".into(),
            user_assigned_identity: Some(UAMI.into()),
        });
        s.dead_letter_uri = Some("https://acct.blob.core.windows.net/deadletters".into());
        let e = s.validate("twin-hub").unwrap();
        assert_eq!(
            e.target,
            EndpointTarget::EventHub {
                namespace: "contoso.servicebus.windows.net".into(),
                hub: "twins".into(),
                connection: None,
                partitioning: Partitioning::TwinId,
            }
        );
        assert_eq!(e.identity, Some(Identity::UserAssigned { resource_id: UAMI.into() }));
        assert!(matches!(e.dead_letter, Some(DeadLetter::Identity(_))));
    }

    #[test]
    fn key_based_event_hub_from_connection_string() {
        let mut s = spec("EventHub");
        s.connection_string = Some(Secret::new(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=k;EntityPath=h",
        ));
        let e = s.validate("hub-a").unwrap();
        assert!(matches!(e.target, EndpointTarget::EventHub { ref hub, .. } if hub == "h"));
        assert_eq!(e.authentication_type, AuthenticationType::KeyBased);
        assert_eq!(e.identity, None);
    }

    #[test]
    fn every_problem_is_reported() {
        let mut s = spec("EventHub");
        s.authentication_type = Some("IdentityBased".into());
        s.connection_string =
            Some(Secret::new("Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=SECRETKEY"));
        s.dead_letter_secret = Some(Secret::new("https://a/b?sig=SECRETSIG"));
        s.path = Some("/tmp/x".into());
        let problems = s.validate("-bad").unwrap_err();
        let text = problems.join("\n");
        for needle in [
            "invalid endpoint name",
            "connection_string: not used",
            "dead_letter_secret: not used",
            "path: not used",
            "endpoint_uri: required",
            "entity_path: required",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert!(!text.contains("SECRET"), "a secret leaked into an error:\n{text}");
    }

    #[test]
    fn event_grid_is_key_based_only() {
        let mut s = spec("EventGrid");
        s.authentication_type = Some("IdentityBased".into());
        s.topic_endpoint = Some("https://t.westus2-1.eventgrid.azure.net/api/events".into());
        s.access_key1 = Some(Secret::new("k"));
        let problems = s.validate("grid").unwrap_err();
        assert!(problems.iter().any(|p| p.contains("support only KeyBased")), "{problems:?}");
    }

    #[test]
    fn user_assigned_needs_an_arm_id() {
        let mut s = spec("ServiceBus");
        s.authentication_type = Some("IdentityBased".into());
        s.endpoint_uri = Some("sb://ns.servicebus.windows.net/".into());
        s.entity_path = Some("t".into());
        s.identity = Some(IdentitySpec {
            identity_type: "UserAssigned".into(),
            user_assigned_identity: Some("twins".into()),
        });
        assert!(s.validate("sb-a").unwrap_err()[0].contains("ARM id"));
        s.identity =
            Some(IdentitySpec { identity_type: "UserAssigned".into(), user_assigned_identity: None });
        assert!(s.validate("sb-a").unwrap_err()[0].contains("required for type UserAssigned"));
    }

    #[test]
    fn file_and_unknown_types() {
        assert!(spec("File").validate("out").unwrap_err()[0].contains("path: required"));
        assert!(spec("Kafka").validate("out").unwrap_err()[0].contains("unknown endpoint type"));
        assert!(spec("stdout").validate("out").is_ok());
        let mut s = spec("Blob");
        s.container_sas_url = Some(Secret::new("https://acct.blob.core.windows.net/c?sv=1"));
        assert!(s.validate("blob").unwrap_err()[0].contains("no sig="));
    }
}
