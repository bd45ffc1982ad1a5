//! Sources: where a backup's bytes come from.
//!
//! A source turns one backup method's commands into sink entries and file bytes. The stream
//! method reads one BASE_BACKUP tar stream; the parallel method lists files and fetches
//! ranges over N workers; the sql method reads ranges with `pg_read_binary_file` over N
//! SQL sessions ([`sql`]). Methods that fetch ranges share the worker pool ([`pool`]) and
//! differ only in their range fetcher ([`fetch`]): SEND_FILES_CONTENT ([`content`]) or
//! `pg_read_binary_file` ([`sql`]); the copy around the pool is one (`ranged`).
//! A source must not decide policy (damaged pages, vanished files) or finish the backup:
//! that is the session's.

pub mod content;
pub mod fetch;
pub(crate) mod parallel;
pub mod pool;
mod ranged;
pub(crate) mod sql;
pub(crate) mod stream;
pub mod throttle;
