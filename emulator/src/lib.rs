//! Local stand-ins for the Azure services twinroute talks to, for tests, the demo and load tests.
//!
//! Nothing here reaches Azure: every stand-in binds a loopback address, and twinroute is pointed
//! at it through configuration (the IMDS endpoint is never hard-wired to `169.254.169.254`).
//!
//! # Layout
//!
//! - [`jwt`]: HS256 JSON Web Tokens shaped like Entra ID v1 access tokens: [`jwt::issue`],
//!   [`jwt::verify`] (signature and time window), [`jwt::decode_unverified`].
//! - [`imds`]: the Instance Metadata Service managed-identity token endpoint
//!   ([`imds::ImdsStandIn`]), with fault injection (status codes, `Retry-After`, delays, dropped
//!   connections, a 410 "updating" window, outages), request counts, and an HTTP admin surface
//!   under `/_standin/` for out-of-process use.
//! - [`amqp`]: Event Hubs and Service Bus over AMQP 1.0 ([`amqp::AmqpStandIn`]): CBS put-token
//!   checked against the tokens the IMDS stand-in issues ([`jwt::verify`], [`DEV_SIGNING_KEY`])
//!   and shared access signatures, `$management` READ, senders, batches, partition and queue
//!   readers, fault injection, and an HTTP admin surface under `/_standin/`. The official Rust
//!   clients (`azure_messaging_eventhubs`, `azure_core_amqp`) work against it unchanged.
//! - `src/main.rs`: the `twinroute-standins` binary, which runs stand-ins until Ctrl-C
//!   (`twinroute-standins imds --listen 127.0.0.1:40342`, `twinroute-standins amqp`,
//!   `twinroute-standins all`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod amqp;
pub mod eventgrid;
pub mod imds;
pub mod jwt;

/// The key the stand-ins sign and verify tokens with unless configured otherwise.
///
/// **Development only.** It is published in this source file, so a token signed with it proves
/// nothing: never configure a real service to trust it. It exists so that independently started
/// stand-ins (IMDS issuing, AMQP verifying) agree on a key without any setup.
pub const DEV_SIGNING_KEY: &[u8] = b"twinroute-standins-development-only-signing-key-do-not-trust";
