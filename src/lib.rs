//! twinroute: an event-forwarding data plane for digital twins.
//!
//! # Layout
//!
//! - [`event`]: the CloudEvents 1.0 envelope and the ADT event types; parsing and encodings.
pub mod event;
