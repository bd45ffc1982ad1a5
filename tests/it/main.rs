//! Integration tests of the `pgpar` binary against real PostgreSQL servers.
//!
//! One test binary (as ripgrep does): `cluster` is the server fixture, `util` runs the binary
//! and inspects what it left; each other module is one area of behaviour a user would notice.
//! Every test starts its own throwaway server(s), so tests run in parallel threads.
//!
//! Server builds come from `PGPAR_PG15_BINDIR` (default `/usr/lib/postgresql/15/bin`) and
//! `PGPAR_PG17_BINDIR` (the patched build; `make test` sets both). A missing build fails the
//! test that needs it with a message saying what to set: nothing is skipped silently.

mod cluster;
mod util;

mod auth;
mod backup_stream;
mod cli;
mod client_side;
mod faults;
mod fixture;
mod libpq;
mod messages;
mod names;
mod parallel;
mod partial;
mod patch;
mod pipeline;
mod rate;
mod setup;
mod sql;
