//! The control plane: the routes and endpoints in force, changed through the admin API with ADT's
//! rules, stored so they survive a restart, and applied to the dispatcher in one atomic swap.
//!
//! What is in force is the configuration file's endpoints and routes with the API's changes laid
//! over them. The state file (`<state_dir>/control-plane.json`) holds only those changes: an
//! object per name that the API created or replaced, and `null` for one it deleted. So editing
//! the file still takes effect for everything the API has not touched.
//!
//! A configuration reload ([`ControlPlane::reload`], driven by `crate::reload`) replaces the
//! file's part. The file is the source of truth for what it declares: when a reload changes the
//! file's declaration of a name (adds, changes or removes it), an API change to that name is
//! dropped from the state file, with a warning naming it; API changes to names the reload did not
//! touch stay in force.

use crate::config::{
    validate_endpoint_name, validate_route_id, Config, ConfigError, EndpointConfig, EndpointSpec,
    RouteConfig, RouteSpec,
};
use crate::delivery::Dispatcher;
use crate::identity::{IdentityProvider, ManagedIdentityId};
use crate::routing::Route;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Mutex;

/// The state file's name inside `state_dir`.
pub const STATE_FILE: &str = "control-plane.json";
/// The state file's format version, bumped on incompatible changes.
const STATE_VERSION: u32 = 1;

/// A refused change, with ADT's HTTP status and error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ControlError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ControlError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

/// The API's changes over the configuration file, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Overlay {
    version: u32,
    /// `Some(spec)`: created or replaced through the API; `None`: deleted through the API.
    #[serde(default)]
    endpoints: BTreeMap<String, Option<EndpointSpec>>,
    #[serde(default)]
    routes: BTreeMap<String, Option<RouteSpec>>,
}

struct State {
    base_endpoints: BTreeMap<String, EndpointConfig>,
    base_routes: BTreeMap<String, RouteConfig>,
    overlay: Overlay,
    /// In force (base with the overlay applied).
    endpoints: BTreeMap<String, EndpointConfig>,
    routes: BTreeMap<String, RouteConfig>,
}

/// Whether a PUT created the object or replaced it (ARM answers 201 or 200).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Created,
    Replaced,
}

/// Routes and endpoints in force, and the only way to change them.
pub struct ControlPlane {
    state: Mutex<State>,
    dispatcher: Arc<Dispatcher>,
    /// Checks that this host can act as an endpoint's identity, and fetches its tokens early.
    identity: Arc<IdentityProvider>,
    state_file: Option<PathBuf>,
    /// `admin.max_routes` and `admin.max_endpoints`; a reload may change them.
    max_routes: AtomicUsize,
    max_endpoints: AtomicUsize,
    /// Where the configuration came from and how its last reload went, for `/readyz`
    /// (kept here, beside what is in force; written by `crate::reload`).
    config_status: std::sync::Mutex<crate::reload::ConfigStatus>,
}

/// What a reload changed in the routes and endpoints in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadChanges {
    pub endpoints: NameChanges,
    pub routes: NameChanges,
    /// One message per change made through the admin API that the file's new declaration
    /// replaced (dropped from the state file): each is logged as a warning.
    pub overridden: Vec<String>,
}

/// Names added, changed and removed, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameChanges {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl NameChanges {
    fn between<T>(
        old: &BTreeMap<String, T>,
        new: &BTreeMap<String, T>,
        same: impl Fn(&T, &T) -> bool,
    ) -> Self {
        let mut changes = NameChanges::default();
        for (name, value) in new {
            match old.get(name) {
                None => changes.added.push(name.clone()),
                Some(before) if !same(before, value) => changes.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old.keys().filter(|n| !new.contains_key(*n)).cloned().collect();
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

impl std::fmt::Display for NameChanges {
    /// `added a, b; changed c; removed d`, or `unchanged`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> =
            [("added", &self.added), ("changed", &self.changed), ("removed", &self.removed)]
                .into_iter()
                .filter(|(_, names)| !names.is_empty())
                .map(|(what, names)| format!("{what} {}", names.join(", ")))
                .collect();
        if parts.is_empty() {
            f.write_str("unchanged")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

fn same_route(a: &RouteConfig, b: &RouteConfig) -> bool {
    a.endpoint_name == b.endpoint_name && a.filter == b.filter
}

/// Drops from `overlay` every API change to a name whose declaration in the file changed between
/// `old_base` and `new_base` (added, changed or removed): the file is the source of truth for what
/// it declares. Returns a message for each dropped change that the file did not simply agree with.
fn reconcile<T, S>(
    kind: &str,
    old_base: &BTreeMap<String, T>,
    new_base: &BTreeMap<String, T>,
    overlay: &mut BTreeMap<String, Option<S>>,
    same: impl Fn(&T, &T) -> bool,
    agrees: impl Fn(&str, &S, &T) -> bool,
) -> Vec<String> {
    let mut messages = Vec::new();
    overlay.retain(|name, api| {
        let file_changed = match (old_base.get(name), new_base.get(name)) {
            (Some(a), Some(b)) => !same(a, b),
            (None, None) => false,
            _ => true,
        };
        if !file_changed {
            return true;
        }
        match (api, new_base.get(name)) {
            (Some(spec), Some(file)) if !agrees(name, spec, file) => messages.push(format!(
                "{kind} {name}: the configuration file changed it, and its version replaces the one \
                 set through the admin API"
            )),
            (Some(_), None) => messages.push(format!(
                "{kind} {name}: the configuration file removed it, so the version set through the \
                 admin API is removed too"
            )),
            (None, Some(_)) => messages.push(format!(
                "{kind} {name}: deleted through the admin API, it is back because the configuration \
                 file changed it"
            )),
            _ => {}
        }
        false
    });
    messages
}

fn routes_for_table(routes: &BTreeMap<String, RouteConfig>) -> Vec<Route> {
    routes
        .values()
        .map(|r| Route { id: r.id.clone(), endpoint: r.endpoint_name.clone(), filter: r.filter.clone() })
        .collect()
}

impl ControlPlane {
    /// Builds the control plane from the configuration and the stored API changes, checks that
    /// this build can deliver to every endpoint, and applies it all to `dispatcher`.
    pub async fn start(
        config: &Config,
        dispatcher: Arc<Dispatcher>,
        identity: Arc<IdentityProvider>,
    ) -> Result<Self, ConfigError> {
        let state_file = config.state_dir.as_ref().map(|d| d.join(STATE_FILE));
        let fail = |origin: String, problems: Vec<String>| ConfigError { origin, problems };
        let overlay = match &state_file {
            Some(path) => load_overlay(path).map_err(|p| fail(path.display().to_string(), vec![p]))?,
            None => Overlay::default(),
        };
        let mut state = State {
            base_endpoints: config.endpoints.clone(),
            base_routes: config.routes.clone(),
            overlay,
            endpoints: BTreeMap::new(),
            routes: BTreeMap::new(),
        };
        let origin = match &state_file {
            Some(p) => format!("{} with the API changes in {}", config.origin, p.display()),
            None => config.origin.clone(),
        };
        let problems = state.recompute();
        if !problems.is_empty() {
            return Err(fail(origin, problems));
        }
        let unsupported = undeliverable(&dispatcher, &identity, &state.endpoints);
        if !unsupported.is_empty() {
            return Err(fail(origin, unsupported));
        }
        dispatcher
            .apply(&state.endpoints, routes_for_table(&state.routes))
            .await
            .map_err(|e| fail(origin, vec![e.to_string()]))?;
        identity.warm(&state.endpoints.values().cloned().collect::<Vec<_>>());
        if state_file.is_none() {
            tracing::warn!("no state_dir is configured: route and endpoint changes made through the admin API will not survive a restart");
        }
        Ok(Self {
            state: Mutex::new(state),
            dispatcher,
            identity,
            state_file,
            max_routes: AtomicUsize::new(config.admin.max_routes),
            max_endpoints: AtomicUsize::new(config.admin.max_endpoints),
            config_status: Default::default(),
        })
    }

    /// Makes a reloaded configuration's endpoints, routes and `[delivery]` defaults the file's
    /// part of what is in force, keeping API changes to what the file did not change (see the
    /// module's documentation). Checked completely first; on any problem nothing changes and
    /// every problem is returned. In-flight events of a changed or removed endpoint are delivered
    /// with the configuration they were accepted under (see [`Dispatcher::apply`]).
    pub async fn reload(&self, config: &Config) -> Result<ReloadChanges, Vec<String>> {
        let mut state = self.state.lock().await;
        if !self.dispatcher.is_open() {
            return Err(vec!["twinroute is shutting down".to_owned()]);
        }
        let mut overlay = state.overlay.clone();
        let mut overridden = reconcile(
            "endpoint",
            &state.base_endpoints,
            &config.endpoints,
            &mut overlay.endpoints,
            |a, b| a == b,
            |name, spec, file| spec.validate(name).is_ok_and(|e| e == *file),
        );
        overridden.extend(reconcile(
            "route",
            &state.base_routes,
            &config.routes,
            &mut overlay.routes,
            same_route,
            |id, spec, file| spec.validate(id).is_ok_and(|r| same_route(&r, file)),
        ));
        let mut next = State {
            base_endpoints: config.endpoints.clone(),
            base_routes: config.routes.clone(),
            overlay,
            endpoints: BTreeMap::new(),
            routes: BTreeMap::new(),
        };
        let mut problems = next.recompute();
        problems.extend(undeliverable(&self.dispatcher, &self.identity, &next.endpoints));
        if next.endpoints.len() > config.admin.max_endpoints {
            problems.push(format!(
                "endpoints: {} in force (the file's with the API's changes), more than admin.max_endpoints = {}",
                next.endpoints.len(),
                config.admin.max_endpoints
            ));
        }
        if next.routes.len() > config.admin.max_routes {
            problems.push(format!(
                "routes: {} in force (the file's with the API's changes), more than admin.max_routes = {}",
                next.routes.len(),
                config.admin.max_routes
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let changes = ReloadChanges {
            endpoints: NameChanges::between(&state.endpoints, &next.endpoints, |a, b| a == b),
            routes: NameChanges::between(&state.routes, &next.routes, same_route),
            overridden,
        };
        let defaults = self.dispatcher.defaults();
        self.dispatcher
            .apply_with_defaults(&config.delivery, &next.endpoints, routes_for_table(&next.routes))
            .await
            .map_err(|e| vec![e.to_string()])?;
        if next.overlay != state.overlay {
            if let Some(path) = &self.state_file {
                if let Err(e) = store_overlay(path, &next.overlay) {
                    // Put the dispatcher back as it was: nothing changed.
                    let restored = self
                        .dispatcher
                        .apply_with_defaults(&defaults, &state.endpoints, routes_for_table(&state.routes))
                        .await;
                    if let Err(r) = restored {
                        tracing::error!(error = %r, "restoring the previous configuration after a failed save also failed");
                    }
                    return Err(vec![format!(
                        "{}: the API changes the new file replaces could not be removed: {e}",
                        path.display()
                    )]);
                }
            }
        }
        self.identity.warm(&next.endpoints.values().cloned().collect::<Vec<_>>());
        self.max_routes.store(config.admin.max_routes, Ordering::Relaxed);
        self.max_endpoints.store(config.admin.max_endpoints, Ordering::Relaxed);
        *state = next;
        Ok(changes)
    }

    /// Where the configuration came from and how its last reload went.
    pub fn config_status(&self) -> crate::reload::ConfigStatus {
        self.config_status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Updates [`ControlPlane::config_status`].
    pub(crate) fn update_config_status(&self, update: impl FnOnce(&mut crate::reload::ConfigStatus)) {
        update(&mut self.config_status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Routes in force, by id.
    pub async fn routes(&self) -> Vec<RouteConfig> {
        self.state.lock().await.routes.values().cloned().collect()
    }

    pub async fn route(&self, id: &str) -> Option<RouteConfig> {
        self.state.lock().await.routes.get(id).cloned()
    }

    /// The identity provider endpoints get their tokens from.
    pub fn identity(&self) -> &Arc<IdentityProvider> {
        &self.identity
    }

    /// Endpoints in force, by name.
    pub async fn endpoints(&self) -> Vec<EndpointConfig> {
        self.state.lock().await.endpoints.values().cloned().collect()
    }

    pub async fn endpoint(&self, name: &str) -> Option<EndpointConfig> {
        self.state.lock().await.endpoints.get(name).cloned()
    }

    /// `PUT /eventroutes/{id}`: adds or replaces a route.
    pub async fn put_route(&self, id: &str, spec: RouteSpec) -> Result<Upsert, ControlError> {
        validate_route_id(id).map_err(|m| ControlError::new(400, "EventRouteIdInvalid", m))?;
        let mut state = self.state.lock().await;
        if !state.endpoints.contains_key(&spec.endpoint_name) {
            return Err(ControlError::new(
                400,
                "EventRouteEndpointInvalid",
                format!(
                    "the endpoint {:?} does not exist; create it first (PUT /endpoints/{{name}})",
                    spec.endpoint_name
                ),
            ));
        }
        let route = spec
            .validate(id)
            .map_err(|problems| ControlError::new(400, "EventRouteFilterInvalid", problems.join("\n")))?;
        let exists = state.routes.contains_key(id);
        let max_routes = self.max_routes.load(Ordering::Relaxed);
        if !exists && state.routes.len() >= max_routes {
            return Err(ControlError::new(
                400,
                "LimitExceeded",
                format!(
                    "the maximum number of event routes ({max_routes}) has been reached (admin.max_routes)"
                ),
            ));
        }
        let mut routes = state.routes.clone();
        routes.insert(id.to_owned(), route);
        let mut overlay = state.overlay.clone();
        overlay.routes.insert(id.to_owned(), Some(spec));
        let endpoints = state.endpoints.clone();
        self.commit(&mut state, overlay, endpoints, routes).await?;
        Ok(if exists { Upsert::Replaced } else { Upsert::Created })
    }

    /// `DELETE /eventroutes/{id}`.
    pub async fn delete_route(&self, id: &str) -> Result<(), ControlError> {
        let mut state = self.state.lock().await;
        if !state.routes.contains_key(id) {
            return Err(route_not_found(id));
        }
        let mut routes = state.routes.clone();
        routes.remove(id);
        let mut overlay = state.overlay.clone();
        if state.base_routes.contains_key(id) {
            overlay.routes.insert(id.to_owned(), None);
        } else {
            overlay.routes.remove(id);
        }
        let endpoints = state.endpoints.clone();
        self.commit(&mut state, overlay, endpoints, routes).await
    }

    /// `PUT /endpoints/{name}`: creates or replaces an endpoint. Its authentication type cannot
    /// change once it exists, as in ADT.
    pub async fn put_endpoint(&self, name: &str, spec: EndpointSpec) -> Result<Upsert, ControlError> {
        validate_endpoint_name(name).map_err(|m| ControlError::new(400, "EndpointNameInvalid", m))?;
        let endpoint = spec
            .validate(name)
            .map_err(|problems| ControlError::new(400, "EndpointInvalid", problems.join("\n")))?;
        if !self.dispatcher.factory().supports(&endpoint) {
            return Err(ControlError::new(
                400,
                "EndpointTypeNotSupported",
                format!(
                    "{} endpoints are not supported by this build of twinroute yet (File and Stdout are)",
                    endpoint.endpoint_type
                ),
            ));
        }
        if let Some(id) = &endpoint.identity {
            if let Err(why) = self.identity.check(&ManagedIdentityId::from(id)) {
                return Err(ControlError::new(400, "EndpointInvalid", format!("identity: {why}")));
            }
        }
        let mut state = self.state.lock().await;
        let existing = state.endpoints.get(name);
        if let Some(old) = existing {
            if old.authentication_type != endpoint.authentication_type {
                return Err(ControlError::new(
                    400,
                    "AuthenticationTypeCannotBeChanged",
                    format!(
                        "endpoint {name} was created {}; its authentication type cannot be changed to {}. \
                         Delete the endpoint (and its routes) and create it again.",
                        old.authentication_type, endpoint.authentication_type
                    ),
                ));
            }
        } else if state.endpoints.len() >= self.max_endpoints.load(Ordering::Relaxed) {
            return Err(ControlError::new(
                400,
                "LimitExceeded",
                format!(
                    "the maximum number of endpoints ({}) has been reached (admin.max_endpoints)",
                    self.max_endpoints.load(Ordering::Relaxed)
                ),
            ));
        }
        let upsert = if existing.is_some() { Upsert::Replaced } else { Upsert::Created };
        let mut endpoints = state.endpoints.clone();
        endpoints.insert(name.to_owned(), endpoint);
        let mut overlay = state.overlay.clone();
        overlay.endpoints.insert(name.to_owned(), Some(spec));
        let routes = state.routes.clone();
        self.commit(&mut state, overlay, endpoints, routes).await?;
        Ok(upsert)
    }

    /// `DELETE /endpoints/{name}`: refused while routes still use it.
    pub async fn delete_endpoint(&self, name: &str) -> Result<(), ControlError> {
        let mut state = self.state.lock().await;
        if !state.endpoints.contains_key(name) {
            return Err(endpoint_not_found(name));
        }
        let users: Vec<&str> =
            state.routes.values().filter(|r| r.endpoint_name == name).map(|r| r.id.as_str()).collect();
        if !users.is_empty() {
            return Err(ControlError::new(
                409,
                "EndpointInUse",
                format!(
                    "endpoint {name} is used by the event routes {}; delete them first",
                    users.join(", ")
                ),
            ));
        }
        let mut endpoints = state.endpoints.clone();
        endpoints.remove(name);
        let mut overlay = state.overlay.clone();
        if state.base_endpoints.contains_key(name) {
            overlay.endpoints.insert(name.to_owned(), None);
        } else {
            overlay.endpoints.remove(name);
        }
        let routes = state.routes.clone();
        self.commit(&mut state, overlay, endpoints, routes).await
    }

    /// Applies a change: to the dispatcher first (it can fail, e.g. a file endpoint whose path
    /// cannot be opened), then to disk; if storing fails the dispatcher is put back.
    async fn commit(
        &self,
        state: &mut State,
        overlay: Overlay,
        endpoints: BTreeMap<String, EndpointConfig>,
        routes: BTreeMap<String, RouteConfig>,
    ) -> Result<(), ControlError> {
        self.dispatcher
            .apply(&endpoints, routes_for_table(&routes))
            .await
            .map_err(|e| ControlError::new(400, "EndpointUnavailable", e.to_string()))?;
        if let Some(path) = &self.state_file {
            if let Err(e) = store_overlay(path, &overlay) {
                let restored = self.dispatcher.apply(&state.endpoints, routes_for_table(&state.routes)).await;
                if let Err(r) = restored {
                    tracing::error!(error = %r, "restoring the previous configuration after a failed save also failed");
                }
                metrics::counter!("twinroute_control_plane_changes_total", "result" => "failed").increment(1);
                return Err(ControlError::new(
                    500,
                    "StateNotSaved",
                    format!("the change was not saved to {}: {e}; nothing changed", path.display()),
                ));
            }
        }
        self.identity.warm(&endpoints.values().cloned().collect::<Vec<_>>());
        state.overlay = overlay;
        state.endpoints = endpoints;
        state.routes = routes;
        metrics::counter!("twinroute_control_plane_changes_total", "result" => "applied").increment(1);
        tracing::info!(
            endpoints = state.endpoints.len(),
            routes = state.routes.len(),
            "control plane change applied"
        );
        Ok(())
    }
}

/// Every endpoint this build cannot deliver to, or whose managed identity this host cannot act as.
fn undeliverable(
    dispatcher: &Dispatcher,
    identity: &IdentityProvider,
    endpoints: &BTreeMap<String, EndpointConfig>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for e in endpoints.values() {
        if !dispatcher.factory().supports(e) {
            problems.push(format!(
                "endpoints.{}: {} endpoints are not supported by this build of twinroute yet \
                 (File and Stdout are)",
                e.name, e.endpoint_type
            ));
        }
        if let Some(id) = &e.identity {
            if let Err(why) = identity.check(&ManagedIdentityId::from(id)) {
                problems.push(format!("endpoints.{}.identity: {why}", e.name));
            }
        }
    }
    problems
}

pub fn route_not_found(id: &str) -> ControlError {
    ControlError::new(404, "EventRouteNotFound", format!("there is no event route with id {id:?}"))
}

pub fn endpoint_not_found(name: &str) -> ControlError {
    ControlError::new(404, "EndpointNotFound", format!("there is no endpoint named {name:?}"))
}

impl State {
    /// Lays the overlay over the base; returns every problem (an overlay entry that no longer
    /// fits the file, e.g. a stored route whose endpoint the file dropped).
    fn recompute(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut endpoints = self.base_endpoints.clone();
        for (name, spec) in &self.overlay.endpoints {
            match spec {
                None => {
                    endpoints.remove(name);
                }
                Some(spec) => match spec.validate(name) {
                    Ok(e) => {
                        if let Some(base) = self.base_endpoints.get(name) {
                            if base.authentication_type != e.authentication_type {
                                problems.push(format!(
                                    "endpoints.{name}: stored as {} but the configuration file makes it {}; \
                                     an endpoint's authentication type cannot change (delete it through the API first)",
                                    e.authentication_type, base.authentication_type
                                ));
                            }
                        }
                        endpoints.insert(name.clone(), e);
                    }
                    Err(ps) => {
                        problems.extend(ps.into_iter().map(|p| format!("endpoints.{name} (stored): {p}")))
                    }
                },
            }
        }
        let mut routes = self.base_routes.clone();
        for (id, spec) in &self.overlay.routes {
            match spec {
                None => {
                    routes.remove(id);
                }
                Some(spec) => match spec.validate(id) {
                    Ok(r) => {
                        routes.insert(id.clone(), r);
                    }
                    Err(ps) => problems.extend(ps.into_iter().map(|p| format!("routes.{id} (stored): {p}"))),
                },
            }
        }
        for route in routes.values() {
            if !endpoints.contains_key(&route.endpoint_name) {
                problems.push(format!(
                    "routes.{}: its endpoint {:?} does not exist (deleted from the configuration file?)",
                    route.id, route.endpoint_name
                ));
            }
        }
        self.endpoints = endpoints;
        self.routes = routes;
        problems
    }
}

fn load_overlay(path: &Path) -> Result<Overlay, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Overlay { version: STATE_VERSION, ..Default::default() })
        }
        Err(e) => return Err(format!("cannot read the stored API changes: {e}")),
    };
    let overlay: Overlay =
        serde_json::from_slice(&bytes).map_err(|e| format!("the stored API changes are unreadable: {e}"))?;
    if overlay.version != STATE_VERSION {
        return Err(format!(
            "stored with format version {}, this build reads version {STATE_VERSION}",
            overlay.version
        ));
    }
    Ok(overlay)
}

/// Writes the overlay atomically: a temporary file in the same directory, synced, renamed over
/// the old one, and the directory synced, so a crash leaves the old file or the new one.
fn store_overlay(path: &Path, overlay: &Overlay) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut overlay = overlay.clone();
    overlay.version = STATE_VERSION;
    let bytes = serde_json::to_vec_pretty(&overlay).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // It holds keys and SAS URLs: readable by the service's user only.
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, u32)]) -> BTreeMap<String, u32> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    /// Runs `reconcile` over numbers standing for declarations (the API's "spec" is the number it
    /// would validate to).
    fn run(
        old: &[(&str, u32)],
        new: &[(&str, u32)],
        overlay: &[(&str, Option<u32>)],
    ) -> (Vec<String>, Vec<String>) {
        let mut overlay: BTreeMap<String, Option<u32>> =
            overlay.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        let messages = reconcile(
            "endpoint",
            &map(old),
            &map(new),
            &mut overlay,
            |a, b| a == b,
            |_, api, file| api == file,
        );
        (overlay.into_keys().collect(), messages)
    }

    #[test]
    fn api_changes_to_what_the_file_did_not_change_stay() {
        let (kept, messages) = run(
            &[("a", 1), ("b", 1)],
            &[("a", 1), ("b", 1), ("new", 1)],
            &[("a", Some(5)), ("b", None), ("api-only", Some(7))],
        );
        assert_eq!(kept, ["a", "api-only", "b"]);
        assert!(messages.is_empty(), "{messages:?}");
    }

    #[test]
    fn the_file_wins_for_what_it_changed_and_says_so() {
        let (kept, messages) = run(
            &[("changed", 1), ("removed", 1), ("revived", 1), ("gone", 1), ("agreed", 1)],
            &[("changed", 2), ("revived", 2), ("added", 3), ("agreed", 9)],
            &[
                ("changed", Some(5)),
                ("removed", Some(5)),
                ("revived", None),
                ("gone", None),
                ("added", Some(4)),
                ("agreed", Some(9)),
            ],
        );
        assert!(kept.is_empty(), "every change the file touched is dropped: {kept:?}");
        let text = messages.join("\n");
        for needle in [
            "endpoint changed: the configuration file changed it, and its version replaces the one set through the admin API",
            "endpoint added: the configuration file changed it",
            "endpoint removed: the configuration file removed it, so the version set through the admin API is removed too",
            "endpoint revived: deleted through the admin API, it is back",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        // Deleted both ways, or the file now says what the API said: nothing to warn about.
        assert_eq!(messages.len(), 4, "{text}");
    }

    #[test]
    fn name_changes_are_listed_in_order() {
        let changes = NameChanges::between(
            &map(&[("a", 1), ("b", 1), ("c", 1)]),
            &map(&[("a", 2), ("c", 1), ("d", 1)]),
            |x, y| x == y,
        );
        assert_eq!(changes.to_string(), "added d; changed a; removed b");
        assert_eq!(NameChanges::default().to_string(), "unchanged");
    }
}
