//! pgpar: PostgreSQL base backups over many replication connections at once.
//!
//! Data flows one way: [`conninfo`] → [`conn`] (socket, TLS, auth, framing) → typed
//! [`replication`] commands → a source (the [`basebackup`] stream, or parallel workers) →
//! a [`sink`] (plain directory) → the manifest; [`wal`] streams beside it into `pg_wal/`.
#![warn(missing_docs)]

pub mod backup;
pub mod check;
pub mod conn;
pub mod conninfo;
pub mod durable;
pub mod error;
pub mod lsn;
pub mod manifest;
pub mod plan;
pub mod progress;
pub mod protocol;
pub mod recovery;
pub mod replication;
pub mod sink;
pub mod source;
pub mod wal;

pub use error::{DbError, Error, Result};
// Transitional: the sink and the methods still name the codecs at their old paths.
pub use protocol::{basebackup, tar};
