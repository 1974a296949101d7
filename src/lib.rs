//! twinroute: an event-forwarding data plane for digital twins. It takes twin-change events
//! (CloudEvents), matches them against routes written in Azure Digital Twins' filter language and
//! delivers them to endpoints, with ADT's control-plane API and wire formats.
//!
//! # Layout
//!
//! - [`event`]: the CloudEvents 1.0 envelope and the ADT event types; parsing and encodings.
//! - [`filter`]: the route filter language: lexer, parser, compiled evaluator (pure).
//! - [`routing`]: the route table: event to set of endpoints (pure).
//! - [`config`]: typed, strictly checked configuration; every problem reported at once.
//! - [`control`]: routes and endpoints in force, changed with ADT's rules, stored, applied atomically.
//! - [`identity`]: managed-identity tokens (IMDS and the other Azure hosts), the token cache, SAS keys.
//! - [`delivery`]: per-endpoint queues and workers, fed by the dispatcher.
//! - [`sinks`]: one folder per destination; each builds its wire form and classifies outcomes.
//! - [`ingest`]: HTTP `POST /events`, NDJSON files and stdin, the sample generator, and an Event
//!   Hubs hub whose partitions several replicas share (`ingest::eventhubs`).
//! - [`admin`]: ADT-style `/eventroutes` and `/endpoints`, `/healthz`, `/readyz`, `/metrics`.
//! - [`server`]: the APIs' HTTP servers: TCP, TLS and Unix sockets, bearer tokens, time limits.
//! - [`app`]: the daemon assembled, started and stopped in order.
//! - [`reload`]: hot reload of the configuration file (SIGHUP, a watched file), all or nothing.
//! - [`cli`]: the `twinroute` command line.
//! - [`systemd`]: the service manager's notifications (`READY=1`, watchdog, `STOPPING=1`).
//! - [`deadletter_cli`]: `twinroute deadletter list|replay`: dead letters read back and replayed.
//! - [`telemetry`]: logs and metrics.
pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod control;
pub mod deadletter_cli;
pub mod delivery;
pub mod event;
pub mod filter;
pub mod identity;
pub mod ingest;
pub mod loadtest;
pub mod reload;
pub mod routing;
pub mod server;
pub mod sinks;
pub mod systemd;
pub mod telemetry;
