//! Integration tests of the daemon over real HTTP on port 0: one binary, shared helpers.

mod admin;
mod cli;
mod helpers;
mod identity;
mod ingest;
