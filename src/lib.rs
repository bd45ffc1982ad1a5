//! pgpar: PostgreSQL base backups over many replication connections at once.
//!
//! Data flows one way: [`conninfo`] → [`conn`] (dial, TLS, auth, query/copy) → typed
//! [`replication`] commands (bytes decoded by [`protocol`]) → a [`source`] (the BASE_BACKUP
//! stream, or the parallel or sql workers' range fetchers) → a [`sink`] (the plain directory, with
//! the manifest tee). One [`session`] frames every backup: leader, checks, method, WAL
//! stream ([`wal`]) beside the copy, damaged pages, labels, the manifest last ([`durable`]).
//! [`options`] are checked before any of it; the binary owns flags, printing and signals.
//! File names are bytes, not text, from the server to the file written ([`relpath`]).
#![warn(missing_docs)]

pub mod check;
pub mod conn;
pub mod conninfo;
pub mod durable;
pub mod error;
pub mod exclusions;
pub mod lsn;
pub mod manifest;
pub mod options;
pub mod pagecheck;
pub mod plan;
pub(crate) mod preflight;
pub mod privileges;
pub mod progress;
pub mod protocol;
pub mod recovery;
pub mod relpath;
pub mod replication;
pub mod session;
pub mod sink;
pub mod source;
pub mod wal;

pub use error::{DbError, Error, Result};
