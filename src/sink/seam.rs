//! The sink seam: what every backup method writes through.
//!
//! A source (the BASE_BACKUP stream, the parallel workers, later the sql method) hands a sink
//! *entries* (directories, links, files, each under a [`Root`]: the data directory or one
//! tablespace) and then the bytes of each file through a [`FileWriter`] — one writer per
//! writing thread, each saying which file and at which offset its bytes go. Whole small
//! files written besides the data (`backup_label`, `tablespace_map`, the recovery settings)
//! go through [`Sink::put`], and [`Sink::finish`] makes everything durable and writes
//! `backup_manifest` last.
//!
//! Random access and sequential sinks: the plain directory ([`super::dir::PlainDir`]) is the
//! one sink with [`Sink::random_access`]: ranges of one file may arrive from many workers,
//! in any order. A sequential sink (tar, a compressor, an object store) says `false`; then
//! the parallel source does not split files into ranges, so each file arrives whole, from
//! offset 0, on one worker's writer, and a sequential sink puts one small stage in front of
//! itself that takes whole files from the workers' writers one at a time (the others wait on
//! their bounded channels, so memory stays bounded) — whole files in order, never
//! interleaved. Adding such a sink is one new file implementing these two traits.
//!
//! A sink must not talk to the server, decide policy (what a damaged page means, which files
//! vanished) or compute manifest checksums: the manifest tee ([`super::digest`]) wraps any
//! writer for that.

use crate::error::Result;
use crate::relpath::RelPath;

/// Where an entry's path is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Root {
    /// The data directory.
    Data,
    /// The tablespace with this OID (`pg_tblspc/<oid>` on the server).
    Tablespace(u32),
}

/// Kind of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file; its bytes come through a [`FileWriter`].
    File,
    /// A symbolic link (a tablespace link in `pg_tblspc/`), to `link`.
    Symlink,
}

/// One directory, file or link handed to a sink.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// What `path` is relative to.
    pub root: Root,
    /// Relative path, as the server names it: bytes, not necessarily UTF-8 (checked by the
    /// sink: no `..`, not absolute).
    pub path: &'a RelPath,
    /// Kind.
    pub kind: Kind,
    /// Permission bits as the server has them (0 when unknown: the owner-only default).
    pub mode: u32,
    /// Link target on the server (links only).
    pub link: &'a str,
}

/// A file registered with [`Sink::entry`]; what a [`FileWriter`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub usize);

/// What a sink wrote.
#[derive(Debug, Default, Clone)]
pub struct SinkStats {
    /// Regular files registered.
    pub files: u64,
    /// Bytes of file data written.
    pub bytes: u64,
}

/// Where backup bytes end up (see the module doc).
pub trait Sink: Send + Sync {
    /// True when file bytes may arrive as ranges, from many threads, in any order.
    fn random_access(&self) -> bool;
    /// Lays down a directory or link, or registers a file (`Some` id for a file).
    fn entry(&self, e: &Entry<'_>) -> Result<Option<FileId>>;
    /// A writer for one thread's share of file bytes.
    fn writer(&self) -> Box<dyn FileWriter>;
    /// Forgets a file the server no longer has (it vanished after the listing).
    fn remove(&self, f: FileId) -> Result<()>;
    /// Writes a whole small file at the top of the data directory (`backup_label` …).
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()>;
    /// Appends to a file at the top of the data directory, creating it if missing (the
    /// recovery settings go at the end of `postgresql.auto.conf`).
    fn append(&self, name: &str, bytes: &[u8]) -> Result<()>;
    /// What was written so far.
    fn stats(&self) -> SinkStats;
    /// Makes everything durable (when `sync`), then writes `manifest`, if any, last: the
    /// step after which the backup is finished. Without a manifest the backup is kept but
    /// never looks finished.
    fn finish(&self, manifest: Option<&[u8]>, sync: bool) -> Result<()>;
}

/// One thread's writer of file bytes: a run of bytes of one file starts with [`begin`],
/// continues with [`write`] and ends with [`end`]. A `begin` before the previous run's `end`
/// abandons that run (a connection broke; the range is fetched again whole).
///
/// [`begin`]: FileWriter::begin
/// [`write`]: FileWriter::write
/// [`end`]: FileWriter::end
pub trait FileWriter: Send {
    /// Bytes of file `f` starting at `offset` follow.
    fn begin(&mut self, f: FileId, offset: u64) -> Result<()>;
    /// The next bytes.
    fn write(&mut self, data: &[u8]) -> Result<()>;
    /// The run is complete.
    fn end(&mut self) -> Result<()>;
}
