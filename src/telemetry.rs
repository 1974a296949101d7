//! Logs (`tracing`, human or JSON lines on stderr) and metrics (the `metrics` facade with a
//! Prometheus recorder, rendered at the admin API's `/metrics`).

use crate::config::{LogConfig, LogFormat};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Replaces the log filter of the subscriber [`init_logging`] installed: set only when the filter
/// came from the configuration (not from `RUST_LOG`), so a reload can change `log.level`.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static LOG_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Histogram buckets for latencies in seconds: 10 µs to 10 s.
const LATENCY_BUCKETS: [f64; 14] =
    [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0, 5.0, 10.0];

/// The process-wide Prometheus recorder, installed on first use. Metrics are process-global,
/// like the registry a scrape reads.
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder can only be installed by embedding code; metrics then go there.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        handle
    })
}

/// Help texts for every metric twinroute exports (the metrics reference in the README).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "twinroute_events_received_total",
        "Events accepted, by source (http, ndjson, sample)."
    );
    describe_counter!(
        "twinroute_events_unmatched_total",
        "Accepted events that matched no route (dropped, as ADT does)."
    );
    describe_counter!(
        "twinroute_events_routed_total",
        "Events queued for an endpoint (one per endpoint an event matched)."
    );
    describe_counter!("twinroute_events_delivered_total", "Events delivered to an endpoint.");
    describe_counter!(
        "twinroute_events_dropped_total",
        "Events given up on with no dead-letter store, by reason (permanent, max_attempts, ttl_expired)."
    );
    describe_counter!(
        "twinroute_events_rejected_total",
        "Events refused after validation, by reason (backpressure, shutting_down, storage)."
    );
    describe_counter!("twinroute_requests_rejected_total", "Ingest requests refused, by reason (invalid, request_too_large, event_too_large, too_many_events, unsupported_media_type, unavailable, body_timeout).");
    describe_counter!(
        "twinroute_delivery_failures_total",
        "Failed delivery attempts, by endpoint and reason (transient, auth, permanent)."
    );
    describe_counter!(
        "twinroute_control_plane_changes_total",
        "Route and endpoint changes through the admin API, by result."
    );
    describe_gauge!("twinroute_endpoint_queue_depth", "Events waiting in an endpoint's queue.");
    describe_counter!(
        "twinroute_config_reloads_total",
        "Configuration reloads (SIGHUP or a change of the watched file), by result (ok, refused)."
    );
    describe_gauge!(
        "twinroute_config_last_reload_successful",
        "1 when the last configuration reload was applied (or none was tried since the start), 0 when it was refused."
    );
    describe_gauge!(
        "twinroute_config_last_reload_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time the configuration in force was loaded (the start, or the last applied reload)."
    );
    describe_counter!(
        "twinroute_token_requests_total",
        "Token requests to identity sources, by source and result."
    );
    describe_counter!("twinroute_token_cache_hits_total", "Tokens served from the cache, by audience.");
    describe_counter!(
        "twinroute_token_refreshes_total",
        "Token refreshes, by audience and reason (ahead, forced, failed)."
    );
    describe_gauge!(
        "twinroute_token_expires_at_seconds",
        "Unix time at which the held token of an audience expires."
    );
    describe_histogram!(
        "twinroute_routing_duration_seconds",
        Unit::Seconds,
        "Time to match one event against the route table."
    );
    describe_histogram!(
        "twinroute_delivery_duration_seconds",
        Unit::Seconds,
        "Time from acceptance to delivery, per endpoint."
    );
}

/// Installs the log subscriber. `RUST_LOG`, when set, overrides the configured level.
/// Returns false when a subscriber was already installed (tests, embedding).
pub fn init_logging(config: &LogConfig) -> bool {
    let from_env = EnvFilter::try_from_default_env().ok();
    // Only a filter that came from the configuration is the configuration's to change.
    let reloadable = from_env.is_none();
    let filter =
        from_env.or_else(|| EnvFilter::try_new(&config.level).ok()).unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into files or journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let (installed, set): (bool, SetFilter) = match config.format {
        LogFormat::Human => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            (builder.try_init().is_ok(), Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())))
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            (builder.try_init().is_ok(), Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())))
        }
    };
    if installed && reloadable {
        let _ = LOG_FILTER.set(set);
    }
    installed
}

/// Makes `level` (a `tracing` filter, as `log.level`) the log filter from now on. Returns false,
/// changing nothing, when the filter is not the configuration's to set: `RUST_LOG` chose it, or
/// the subscriber was not installed by [`init_logging`] (tests, embedding).
pub fn set_log_level(level: &str) -> Result<bool, String> {
    let Some(set) = LOG_FILTER.get() else { return Ok(false) };
    let filter = EnvFilter::try_new(level).map_err(|e| format!("{level:?} is not a log filter ({e})"))?;
    set(filter).map(|()| true)
}
