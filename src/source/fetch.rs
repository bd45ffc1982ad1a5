//! The range-fetcher seam: the one part of a worker that differs between methods that fetch
//! files range by range over N connections.
//!
//! A [`Connector`] opens one worker's connection; the [`RangeFetcher`] it returns fetches a
//! list of ranges in request order and reports each through a [`Delivery`]: the range starts
//! ([`Delivery::begin`], with the length that follows — a whole file may turn out to have
//! another real length than listed), or its file has vanished ([`Delivery::vanished`]); its
//! bytes ([`Delivery::data`]); it ended, with any pages that failed verification
//! ([`Delivery::end`]). The parallel method's fetcher speaks SEND_FILES_CONTENT
//! ([`super::content`]); the sql method's will call `pg_read_binary_file` over an ordinary
//! session — the worker pool, retries, range-length checks, writing and checksums are shared
//! ([`super::pool`]) and not the fetcher's business.

use std::future::Future;

use crate::error::Result;
use crate::relpath::RelPath;

pub use super::pool::Delivery;

/// One range to fetch: `length` bytes of `path` (as the server names it) from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The file, relative to the data directory (its bytes, as the server named it).
    pub path: &'a RelPath,
    /// First byte.
    pub offset: u64,
    /// Bytes asked for; for a whole file, its listed size.
    pub length: u64,
    /// The range is the whole file as listed: only then may it arrive with another length
    /// (the file's real one; see [`Delivery::begin`]). The parallel fetcher then asks for the
    /// file as it is when the server reads it (a file that is not WAL-logged may have changed
    /// since the listing).
    pub whole: bool,
}

/// Pages of a range that failed checksum verification (on the server, or for the sql method
/// on the client).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Damaged {
    /// How many pages failed.
    pub pages: u32,
    /// The first failing block numbers, relative to the file.
    pub blocks: Vec<u32>,
}

/// Fetches ranges over one connection (see the module doc).
pub trait RangeFetcher: Send {
    /// Fetches `ranges` in order, reporting each through `out`. An error leaves the
    /// ranges `out` has not seen end to be fetched again, whole, by the caller.
    fn fetch(
        &mut self,
        ranges: &[Request<'_>],
        out: &mut Delivery<'_>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Ends the connection politely.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Opens worker connections.
pub trait Connector: Send + Sync + 'static {
    /// The fetcher over one new connection.
    type Fetcher: RangeFetcher;

    /// Opens one.
    fn connect(&self) -> impl Future<Output = Result<Self::Fetcher>> + Send;
}
