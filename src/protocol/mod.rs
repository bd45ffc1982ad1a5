//! The wire protocol without I/O: what the bytes and codes PostgreSQL sends mean.
//!
//! Nothing here opens a socket or a file; the drivers ([`crate::conn`], the sources, the WAL
//! receiver) call in with bytes they read and write what comes back.

pub mod backend;
pub mod basebackup;
pub mod extended;
pub mod files_content;
pub mod sqlstate;
pub mod tar;
pub mod walstream;
