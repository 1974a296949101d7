//! Logs (`tracing`, human or JSON lines on stderr) and metrics (the `metrics` facade with a
//! Prometheus recorder, rendered at the admin API's `/metrics`).

use crate::config::{LogConfig, LogFormat};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

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
        "Events an endpoint refused permanently and that were dropped."
    );
    describe_counter!(
        "twinroute_events_rejected_total",
        "Events refused after validation, by reason (backpressure, shutting_down)."
    );
    describe_counter!("twinroute_requests_rejected_total", "Ingest requests refused, by reason (invalid, request_too_large, event_too_large, too_many_events, unsupported_media_type, unavailable).");
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
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into files or journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.format {
        LogFormat::Human => builder.try_init().is_ok(),
        LogFormat::Json => builder.json().flatten_event(true).try_init().is_ok(),
    }
}
