//! What `pgpar backup` was asked to do, checked before any server work.
//!
//! The binary turns its flags into a [`BackupRequest`] (plain values, as typed);
//! [`BackupRequest::validate`] turns that into [`BackupOptions`] or an [`Error::Usage`]
//! (exit 2). It must not touch the server or the target directory.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::manifest::ChecksumKind;
use crate::progress::ProgressMode;
use crate::replication;
use crate::sink::plain::TablespaceMap;

/// `--stall-timeout`'s default, seconds. A slow link still delivers bytes all the time; a
/// connection only falls silent when the server does, or when the network drops everything.
/// A live server is never silent that long: the stream method's server reads sends file data
/// continuously, a worker's server answers each range as it reads it, and the WAL stream asks
/// for a reply every 10 s. A network outage that TCP recovers from can hold a connection up to
/// its longest retransmission timeout (120 s on Linux) before data flows again, and the
/// server's own `wal_sender_timeout` (60 s by default) ends a silent replication connection on
/// its side. Five minutes is beyond both, so a live link is never cut; a stalled worker costs
/// at most that before its ranges go to a fresh connection.
pub const DEFAULT_STALL_TIMEOUT: u64 = 300;

/// `-c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Checkpoint as fast as possible.
    Fast,
    /// Spread the checkpoint over checkpoint_completion_target (the server's default).
    Spread,
}

impl Checkpoint {
    /// The value replication commands take.
    pub fn name(self) -> &'static str {
        match self {
            Checkpoint::Fast => "fast",
            Checkpoint::Spread => "spread",
        }
    }
}

/// `--method`: what the user asked for (the session resolves it to a [`Method`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodChoice {
    /// Parallel when the server offers it, else sql when the role may, else stream.
    Auto,
    /// BASE_BACKUP over one connection (any PostgreSQL 15 or later).
    Stream,
    /// START_BACKUP / SEND_FILES_CONTENT over --jobs connections (patched servers).
    Parallel,
    /// pg_backup_start and pg_read_binary_file over --jobs SQL sessions (any 15 or later,
    /// with the privileges `pgpar check` lists).
    Sql,
}

/// The method a backup runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// BASE_BACKUP over one connection.
    Stream,
    /// Our commands over `jobs` worker connections.
    Parallel,
    /// SQL functions over `jobs` worker sessions.
    Sql,
}

impl Method {
    /// The name in messages and the summary.
    pub fn name(self) -> &'static str {
        match self {
            Method::Stream => "stream",
            Method::Parallel => "parallel",
            Method::Sql => "sql",
        }
    }
}

/// The options of `pgpar backup` as given (see the binary for their flags).
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// `-D`.
    pub pgdata: PathBuf,
    /// `-l`.
    pub label: String,
    /// `-c`.
    pub checkpoint: Checkpoint,
    /// `-N`.
    pub no_sync: bool,
    /// `--no-verify-checksums`.
    pub no_verify_checksums: bool,
    /// `-P`.
    pub progress: Option<ProgressMode>,
    /// `--manifest-checksums`.
    pub manifest_checksums: ChecksumKind,
    /// `-T OLD=NEW`, as typed.
    pub tablespace_mapping: Vec<String>,
    /// `-n`.
    pub no_clean: bool,
    /// `--method`.
    pub method: MethodChoice,
    /// `-j`.
    pub jobs: usize,
    /// `--chunk-size`, as typed.
    pub chunk_size: String,
    /// `-R`.
    pub write_recovery_conf: bool,
    /// `-S`.
    pub slot: Option<String>,
    /// `-C`.
    pub create_slot: bool,
    /// `-r`, as typed.
    pub max_rate: Option<String>,
    /// Whether `-j` was given (otherwise the session picks the workers that fit).
    pub jobs_given: bool,
    /// `--stall-timeout`, seconds.
    pub stall_timeout: u64,
    /// `--no-space-check`.
    pub no_space_check: bool,
}

/// Checked options of one backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The target directory, absolute.
    pub dir: PathBuf,
    /// `-T` mappings.
    pub map: TablespaceMap,
    /// Backup label (no newline).
    pub label: String,
    /// Checkpoint mode.
    pub checkpoint: Checkpoint,
    /// fsync everything before the manifest.
    pub sync: bool,
    /// Have the server verify page checksums.
    pub verify_checksums: bool,
    /// Progress display.
    pub progress: Option<ProgressMode>,
    /// Manifest checksum algorithm.
    pub manifest_checksums: ChecksumKind,
    /// Keep what was written on failure.
    pub no_clean: bool,
    /// Requested method.
    pub method: MethodChoice,
    /// Worker connections (1..=256).
    pub jobs: usize,
    /// Files larger than this are split into ranges (a multiple of 8 kB, at least 1 MB).
    pub chunk_size: u64,
    /// Write standby.signal and primary_conninfo.
    pub write_recovery_conf: bool,
    /// Slot for the WAL stream.
    pub slot: Option<String>,
    /// Create the slot first.
    pub create_slot: bool,
    /// Total transfer rate limit, bytes/s.
    pub max_rate: Option<u64>,
    /// Whether `-j` was given: then `jobs` is a requirement, else the most to use.
    pub jobs_given: bool,
    /// A connection that delivers nothing for this long is taken for stalled.
    pub stall_timeout: std::time::Duration,
    /// Skip the free-space check of the pre-flight.
    pub space_check: bool,
}

/// Parses a pg_basebackup-style rate: kB/s, or with a k/M suffix; 32 kB/s to 1 GB/s.
fn parse_rate(s: &str) -> Result<u64> {
    let bad = || {
        Error::Usage(format!(
            "invalid --max-rate \"{s}\": expected kB/s, e.g. 1024, 100M or 512k"
        ))
    };
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1024u64),
        Some('M') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1024),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if !(32 * 1024..=1024 * 1024 * 1024).contains(&bytes) {
        return Err(Error::Usage(format!(
            "--max-rate {s} is out of range: it must be between 32 kB/s and 1024 MB/s"
        )));
    }
    Ok(bytes)
}

fn parse_chunk(s: &str) -> Result<u64> {
    let t = s.trim().replace("iB", "B");
    let t = match t.chars().last() {
        Some('K' | 'k' | 'M' | 'G') => format!("{}B", t.replace('K', "k")),
        _ => t.replace('K', "k"),
    };
    let v = replication::parse_size(&t)
        .ok_or_else(|| Error::Usage(format!("invalid --chunk-size \"{s}\": expected e.g. 64MB")))?;
    if v < 1 << 20 {
        return Err(Error::Usage(format!(
            "--chunk-size {s} is too small: use at least 1MB"
        )));
    }
    Ok(v - v % 8192)
}

fn check_slot_name(s: &str) -> Result<()> {
    if s.is_empty()
        || s.len() > 63
        || !s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(Error::Usage(format!(
            "invalid slot name \"{s}\": use lower-case letters, digits and underscores (at most 63)"
        )));
    }
    Ok(())
}

impl BackupRequest {
    /// Checks everything that can be checked without the server.
    pub fn validate(&self) -> Result<BackupOptions> {
        let mut map = Vec::new();
        for m in &self.tablespace_mapping {
            map.push(TablespaceMap::parse_arg(m)?);
        }
        if self.jobs == 0 || self.jobs > 256 {
            return Err(Error::Usage(format!(
                "invalid --jobs {}: must be between 1 and 256",
                self.jobs
            )));
        }
        if self.label.contains('\n') {
            return Err(Error::Usage(
                "the backup label must not contain a newline".into(),
            ));
        }
        if self.create_slot && self.slot.is_none() {
            return Err(Error::Usage(
                "--create-slot needs a slot name: add -S NAME".into(),
            ));
        }
        if let Some(s) = &self.slot {
            check_slot_name(s)?;
        }
        let max_rate = self.max_rate.as_deref().map(parse_rate).transpose()?;
        if self.stall_timeout == 0 {
            return Err(Error::Usage(
                "invalid --stall-timeout 0: give seconds, at least 1".into(),
            ));
        }
        let chunk_size = parse_chunk(&self.chunk_size)?;
        let dir = if self.pgdata.is_absolute() {
            self.pgdata.clone()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::Usage(format!("could not get the current directory: {e}")))?
                .join(&self.pgdata)
        };
        for (_, new) in &map {
            if new.starts_with(&dir) {
                return Err(Error::Usage(format!(
                    "tablespace directory \"{}\" must not be inside the backup directory",
                    new.display()
                )));
            }
        }
        Ok(BackupOptions {
            dir,
            map: TablespaceMap(map),
            label: self.label.clone(),
            checkpoint: self.checkpoint,
            sync: !self.no_sync,
            verify_checksums: !self.no_verify_checksums,
            progress: self.progress,
            manifest_checksums: self.manifest_checksums,
            no_clean: self.no_clean,
            method: self.method,
            jobs: self.jobs,
            chunk_size,
            write_recovery_conf: self.write_recovery_conf,
            slot: self.slot.clone(),
            create_slot: self.create_slot,
            max_rate,
            jobs_given: self.jobs_given,
            stall_timeout: std::time::Duration::from_secs(self.stall_timeout),
            space_check: !self.no_space_check,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_chunk_sizes() {
        assert_eq!(parse_rate("1024").unwrap(), 1 << 20);
        assert_eq!(parse_rate("100M").unwrap(), 100 << 20);
        assert_eq!(parse_rate("512k").unwrap(), 512 << 10);
        assert!(parse_rate("1").is_err());
        assert!(parse_rate("x").is_err());
        assert_eq!(parse_chunk("64MB").unwrap(), 64 << 20);
        assert_eq!(parse_chunk("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_chunk("2M").unwrap(), 2 << 20);
        assert!(parse_chunk("1kB").is_err());
    }
}
