//! `/endpoints/{name}` in ADT's ARM resource shape (`Microsoft.DigitalTwins/digitalTwinsInstances/
//! endpoints`): `{"name", "type", "properties": {"endpointType", "authenticationType", ...}}`.
//! Secrets are accepted on PUT and never returned: as ARM does, they come back as `null`.

use super::{error_response, page, AdminState, Api};
use crate::config::{EndpointConfig, EndpointSpec, IdentitySpec, Secret};
use crate::control::{endpoint_not_found, Upsert};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

/// The ARM resource type of endpoints.
const RESOURCE_TYPE: &str = "Microsoft.DigitalTwins/digitalTwinsInstances/endpoints";

#[derive(Debug, Deserialize)]
struct EndpointResourceIn {
    properties: Option<serde_json::Value>,
    /// ARM clients may send these back; they are read-only.
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<String>,
    #[serde(default, rename = "type")]
    #[allow(dead_code)]
    resource_type: Option<String>,
}

/// `properties` of a PUT, with ARM's property names (and twinroute's extensions).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PropertiesIn {
    endpoint_type: Option<String>,
    authentication_type: Option<String>,
    endpoint_uri: Option<String>,
    entity_path: Option<String>,
    entity_kind: Option<String>,
    #[serde(alias = "primaryConnectionString")]
    connection_string_primary_key: Option<Secret>,
    #[serde(alias = "secondaryConnectionString")]
    connection_string_secondary_key: Option<Secret>,
    #[serde(rename = "TopicEndpoint", alias = "topicEndpoint")]
    topic_endpoint: Option<String>,
    access_key1: Option<Secret>,
    access_key2: Option<Secret>,
    schema: Option<String>,
    container_url: Option<String>,
    container_sas_url: Option<Secret>,
    path: Option<String>,
    identity: Option<IdentityIn>,
    dead_letter_uri: Option<String>,
    dead_letter_secret: Option<Secret>,
    partition_key: Option<String>,
    partition_id: Option<String>,
    session_id: Option<String>,
    format: Option<String>,
    ca_file: Option<String>,
    custom_endpoint: Option<String>,
    delivery: Option<crate::config::DeliveryOverrides>,
    /// Read-only in ARM; accepted so a GET body can be PUT back.
    #[allow(dead_code)]
    provisioning_state: Option<String>,
    #[allow(dead_code)]
    created_time: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct IdentityIn {
    #[serde(rename = "type")]
    identity_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_assigned_identity: Option<String>,
}

impl From<PropertiesIn> for EndpointSpec {
    fn from(p: PropertiesIn) -> Self {
        EndpointSpec {
            endpoint_type: p.endpoint_type,
            authentication_type: p.authentication_type,
            endpoint_uri: p.endpoint_uri,
            entity_path: p.entity_path,
            entity_kind: p.entity_kind,
            connection_string: p.connection_string_primary_key,
            connection_string_secondary: p.connection_string_secondary_key,
            topic_endpoint: p.topic_endpoint,
            access_key1: p.access_key1,
            access_key2: p.access_key2,
            schema: p.schema,
            container_url: p.container_url,
            container_sas_url: p.container_sas_url,
            path: p.path,
            identity: p.identity.map(|i| IdentitySpec {
                identity_type: i.identity_type,
                user_assigned_identity: i.user_assigned_identity,
            }),
            dead_letter_uri: p.dead_letter_uri,
            dead_letter_secret: p.dead_letter_secret,
            partition_key: p.partition_key,
            partition_id: p.partition_id,
            session_id: p.session_id,
            format: p.format,
            ca_file: p.ca_file,
            custom_endpoint: p.custom_endpoint,
            delivery: p.delivery,
        }
    }
}

/// What GET shows: no field here can hold a secret; secret properties are always `null`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PropertiesOut {
    endpoint_type: &'static str,
    authentication_type: &'static str,
    provisioning_state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entity_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entity_kind: Option<String>,
    #[serde(rename = "TopicEndpoint", skip_serializing_if = "Option::is_none")]
    topic_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<IdentityIn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    custom_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery: Option<crate::config::DeliveryOverrides>,
    /// Secret properties, present (as `null`) when set, so a client can see that they are.
    #[serde(flatten)]
    secrets: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct EndpointResourceOut {
    id: String,
    name: String,
    #[serde(rename = "type")]
    resource_type: &'static str,
    properties: PropertiesOut,
    /// twinroute's addition: the endpoint's delivery state right now.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<serde_json::Value>,
}

/// Health and counters of the endpoint `name` in force.
fn status_of(state: &AdminState, name: &str) -> Option<serde_json::Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let snapshot = state.dispatcher.snapshot();
    let handle = snapshot.endpoints.get(name)?;
    let s = &handle.stats;
    let (health, reason) = s.health();
    Some(serde_json::json!({
        "health": health,
        "reason": reason,
        "queued": handle.queue_len(),
        "retrying": s.retrying.load(Relaxed),
        "routed": s.queued.load(Relaxed),
        "delivered": s.delivered.load(Relaxed),
        "deadLettered": s.dead_lettered.load(Relaxed),
        "dropped": s.dropped.load(Relaxed),
        "failedAttempts": s.failed_attempts.load(Relaxed),
    }))
}

fn resource_with_status(state: &AdminState, e: &EndpointConfig) -> EndpointResourceOut {
    let mut r = resource(e);
    r.status = status_of(state, &e.name);
    r
}

fn resource(e: &EndpointConfig) -> EndpointResourceOut {
    let spec = &e.spec;
    let mut secrets = serde_json::Map::new();
    let secret_fields = [
        ("connectionStringPrimaryKey", spec.connection_string.is_some()),
        ("connectionStringSecondaryKey", spec.connection_string_secondary.is_some()),
        ("accessKey1", spec.access_key1.is_some()),
        ("accessKey2", spec.access_key2.is_some()),
        ("containerSasUrl", spec.container_sas_url.is_some()),
        ("deadLetterSecret", spec.dead_letter_secret.is_some()),
    ];
    for (name, set) in secret_fields {
        if set {
            secrets.insert(name.into(), serde_json::Value::Null);
        }
    }
    EndpointResourceOut {
        id: format!("/endpoints/{}", e.name),
        name: e.name.clone(),
        resource_type: RESOURCE_TYPE,
        properties: PropertiesOut {
            endpoint_type: e.endpoint_type.as_str(),
            authentication_type: e.authentication_type.as_str(),
            provisioning_state: "Succeeded",
            endpoint_uri: spec.endpoint_uri.clone(),
            entity_path: spec.entity_path.clone(),
            entity_kind: spec.entity_kind.clone(),
            topic_endpoint: spec.topic_endpoint.clone(),
            schema: spec.schema.clone(),
            container_url: spec.container_url.clone(),
            path: spec.path.clone(),
            identity: e.identity.as_ref().map(|i| match i {
                crate::config::Identity::SystemAssigned => {
                    IdentityIn { identity_type: "SystemAssigned".into(), user_assigned_identity: None }
                }
                crate::config::Identity::UserAssigned { resource_id } => IdentityIn {
                    identity_type: "UserAssigned".into(),
                    user_assigned_identity: Some(resource_id.clone()),
                },
            }),
            dead_letter_uri: spec.dead_letter_uri.clone(),
            partition_key: spec.partition_key.clone(),
            partition_id: spec.partition_id.clone(),
            session_id: spec.session_id.clone(),
            format: spec.format.clone(),
            ca_file: spec.ca_file.clone(),
            custom_endpoint: spec.custom_endpoint.clone(),
            delivery: spec.delivery.clone(),
            secrets,
        },
        status: None,
    }
}

pub(super) async fn list(State(state): State<AdminState>, Api(query): Api, headers: HeaderMap) -> Response {
    let items = state
        .control
        .endpoints()
        .await
        .iter()
        .map(|e| (e.name.clone(), resource_with_status(&state, e)))
        .collect();
    page(items, &query, &headers, "/endpoints")
}

pub(super) async fn get_one(State(state): State<AdminState>, Path(name): Path<String>, _: Api) -> Response {
    match state.control.endpoint(&name).await {
        Some(e) => Json(resource_with_status(&state, &e)).into_response(),
        None => endpoint_not_found(&name).into_response(),
    }
}

pub(super) async fn put(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    _: Api,
    body: axum::body::Bytes,
) -> Response {
    let input: EndpointResourceIn = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(
                400,
                "InvalidRequestBody",
                format!("the body is not an endpoint resource: {e}"),
            )
        }
    };
    let Some(properties) = input.properties else {
        return error_response(400, "InvalidRequestBody", "the body needs a properties object".into());
    };
    let mut unknown = Vec::new();
    let parsed: Result<PropertiesIn, _> =
        serde_ignored::deserialize(&properties, |path| unknown.push(format!("properties.{path}")));
    let properties = match parsed {
        Ok(p) => p,
        Err(e) => return error_response(400, "EndpointInvalid", format!("properties: {e}")),
    };
    if !unknown.is_empty() {
        return error_response(400, "EndpointInvalid", format!("unknown properties: {}", unknown.join(", ")));
    }
    let spec: EndpointSpec = properties.into();
    match state.control.put_endpoint(&name, spec).await {
        Ok(upsert) => {
            let status = if upsert == Upsert::Created { StatusCode::CREATED } else { StatusCode::OK };
            match state.control.endpoint(&name).await {
                Some(e) => (status, Json(resource(&e))).into_response(),
                None => status.into_response(),
            }
        }
        Err(e) => e.into_response(),
    }
}

pub(super) async fn delete(State(state): State<AdminState>, Path(name): Path<String>, _: Api) -> Response {
    match state.control.delete_endpoint(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}
