//! Integration tests of the daemon over real HTTP on port 0: one binary, shared helpers.

mod admin;
mod amqp;
mod blob;
mod cli;
mod crash;
mod deadletter;
mod delivery;
mod event_grid;
mod helpers;
mod identity;
mod ingest;
mod reload;
mod scaleout;
mod security;
mod systemd;
