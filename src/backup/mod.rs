//! `pgpar backup`: options, the target directory's life cycle, method selection, and what
//! both methods share (the WAL stream, tablespace directories, finishing durably).
//!
//! Input is checked before any server work (exit 2). The target directory is ours from the
//! moment we create it: a failure removes what we created (`--no-clean` keeps it, without a
//! manifest). A backup counts as finished only once `backup_manifest` has been renamed into
//! place after everything else is durable (see [`crate::durable`]).

mod parallel;
mod stream;
mod worker;

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::conn::{Connection, Replication};
use crate::conninfo::ConnConfig;
use crate::durable;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::manifest::ChecksumKind;
use crate::progress::ProgressMode;
use crate::replication::{self, SystemInfo};
use crate::sink::plain::{prepare_empty_dir, TablespaceMap};
use crate::wal::{self, WalOptions, WalResult};

/// `-c`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
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

/// `--method`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Method {
    /// Parallel when the server offers it, else stream.
    Auto,
    /// BASE_BACKUP over one connection (any PostgreSQL 15 or later).
    Stream,
    /// START_BACKUP / SEND_FILES_CONTENT over --jobs connections (patched servers).
    Parallel,
}

/// Options of `pgpar backup`, named as pg_basebackup names them.
#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    /// Directory to write the backup to (created if missing; must be empty).
    #[arg(short = 'D', long = "pgdata", value_name = "DIR")]
    pub pgdata: PathBuf,
    /// Connection string (keyword=value or postgresql:// URI).
    #[arg(short = 'd', long = "dbname")]
    pub dbname: Option<String>,
    /// Database server host or socket directory.
    #[arg(short = 'h', long)]
    pub host: Option<String>,
    /// Database server port.
    #[arg(short = 'p', long)]
    pub port: Option<String>,
    /// Connect as this role.
    #[arg(short = 'U', long)]
    pub username: Option<String>,
    /// Never prompt for a password (accepted for compatibility; pgpar never prompts).
    #[arg(short = 'w', long = "no-password")]
    pub no_password: bool,
    /// Backup label.
    #[arg(short = 'l', long, default_value = "pgpar base backup")]
    pub label: String,
    /// Checkpoint mode.
    #[arg(short = 'c', long, value_enum, default_value = "spread")]
    pub checkpoint: Checkpoint,
    /// Do not wait for the backup to be written safely to disk.
    #[arg(short = 'N', long)]
    pub no_sync: bool,
    /// Do not verify data checksums.
    #[arg(long)]
    pub no_verify_checksums: bool,
    /// Show progress on stderr: a bar (-P), or JSON lines (--progress=json).
    #[arg(short = 'P', long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "bar")]
    pub progress: Option<ProgressMode>,
    /// Checksum algorithm for files in the manifest.
    #[arg(long, value_enum, default_value = "CRC32C")]
    pub manifest_checksums: ChecksumKind,
    /// Relocate the tablespace in OLDDIR to NEWDIR (repeatable).
    #[arg(short = 'T', long = "tablespace-mapping", value_name = "OLDDIR=NEWDIR")]
    pub tablespace_mapping: Vec<String>,
    /// Keep what was written when the backup fails (never with a manifest).
    #[arg(short = 'n', long)]
    pub no_clean: bool,
    /// Print a JSON summary on stdout when done.
    #[arg(long)]
    pub json: bool,
    /// Backup method.
    #[arg(long, value_enum, default_value = "auto")]
    pub method: Method,
    /// Worker connections for the parallel method.
    #[arg(short = 'j', long, default_value_t = 4)]
    pub jobs: usize,
    /// Files larger than this are split into ranges spread over the workers (parallel method).
    #[arg(long, default_value = "64MB", value_name = "SIZE")]
    pub chunk_size: String,
    /// Write standby.signal and primary_conninfo so the backup starts as a standby.
    #[arg(short = 'R', long)]
    pub write_recovery_conf: bool,
    /// Replication slot for the WAL stream (and primary_slot_name with -R).
    #[arg(short = 'S', long)]
    pub slot: Option<String>,
    /// Create the slot named by -S first.
    #[arg(short = 'C', long)]
    pub create_slot: bool,
    /// Maximum total transfer rate, kB/s (suffix k or M), across all connections.
    #[arg(short = 'r', long, value_name = "RATE")]
    pub max_rate: Option<String>,
    /// Print help (-h is the host, as in pg_basebackup).
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

/// The summary printed with `--json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// "stream" or "parallel".
    pub method: &'static str,
    /// The backup directory.
    pub backup_dir: String,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Regular files written (WAL not counted).
    pub files: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Throughput.
    pub mb_per_s: f64,
    /// Backup start LSN.
    pub start_lsn: String,
    /// Backup end LSN.
    pub stop_lsn: String,
    /// Timeline.
    pub timeline: u32,
    /// WAL segments streamed into pg_wal/.
    pub wal_segments: usize,
    /// Worker connections used (1 for the stream method).
    pub jobs: usize,
    /// Peak resident memory of pgpar in MiB (Linux; `null` where it cannot be read).
    pub peak_rss_mb: Option<f64>,
}

/// This process's peak resident set size in MiB, from `VmHWM` in /proc/self/status. It is
/// the high-water mark of the address space made at exec, so unlike `ru_maxrss` it does not
/// include the parent's memory.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

/// Checked options and what everything shares during one backup.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a ConnConfig,
    pub args: &'a BackupArgs,
    pub dir: PathBuf,
    pub map: TablespaceMap,
    pub max_rate: Option<u64>,
    pub chunk_size: u64,
    pub sys: SystemInfo,
    pub version: u32,
    pub seg_size: u64,
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

struct Checked {
    dir: PathBuf,
    map: TablespaceMap,
    max_rate: Option<u64>,
    chunk_size: u64,
}

fn validate(args: &BackupArgs) -> Result<Checked> {
    let mut map = Vec::new();
    for m in &args.tablespace_mapping {
        map.push(TablespaceMap::parse_arg(m)?);
    }
    if args.jobs == 0 || args.jobs > 256 {
        return Err(Error::Usage(format!(
            "invalid --jobs {}: must be between 1 and 256",
            args.jobs
        )));
    }
    if args.label.contains('\n') {
        return Err(Error::Usage(
            "the backup label must not contain a newline".into(),
        ));
    }
    if args.create_slot && args.slot.is_none() {
        return Err(Error::Usage(
            "--create-slot needs a slot name: add -S NAME".into(),
        ));
    }
    if let Some(s) = &args.slot {
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
    }
    let max_rate = args.max_rate.as_deref().map(parse_rate).transpose()?;
    let chunk_size = parse_chunk(&args.chunk_size)?;
    let dir = if args.pgdata.is_absolute() {
        args.pgdata.clone()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::Usage(format!("could not get the current directory: {e}")))?
            .join(&args.pgdata)
    };
    for (_, new) in &map {
        if new.starts_with(&dir) {
            return Err(Error::Usage(format!(
                "tablespace directory \"{}\" must not be inside the backup directory",
                new.display()
            )));
        }
    }
    Ok(Checked {
        dir,
        map: TablespaceMap(map),
        max_rate,
        chunk_size,
    })
}

/// Everything we created, removed on failure.
#[derive(Default)]
pub(crate) struct Cleanup {
    /// (directory, whether we created it): created ones are removed, others emptied.
    dirs: Vec<(PathBuf, bool)>,
    /// A permanent slot created with -C, dropped on failure.
    slot: Option<String>,
}

impl Cleanup {
    pub(crate) fn add_dir(&mut self, p: PathBuf, created: bool) {
        self.dirs.push((p, created));
    }

    fn remove_files(&self) {
        for (dir, created) in self.dirs.iter().rev() {
            if *created {
                let _ = std::fs::remove_dir_all(dir);
            } else if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() && !p.is_symlink() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
        }
    }
}

/// Checks that a directory can be written to by creating and removing a probe file.
fn check_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(".pgpar-probe");
    std::fs::write(&probe, b"").map_err(|e| {
        Error::Usage(format!(
            "directory \"{}\" is not writable: {e}",
            dir.display()
        ))
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Resolves when SIGINT or SIGTERM arrives (a scheduler's stop is as final as Ctrl-C), naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        // Without signal handling, the default action (exit) applies; never resolve.
        _ => std::future::pending().await,
    }
}

/// Runs `pgpar backup`.
pub async fn run(cfg: &ConnConfig, args: &BackupArgs) -> Result<()> {
    let checked = validate(args)?;
    let created = prepare_empty_dir(&checked.dir, "directory")?;
    let mut cleanup = Cleanup::default();
    cleanup.add_dir(checked.dir.clone(), created);
    if let Err(e) = check_writable(&checked.dir) {
        cleanup.remove_files();
        return Err(e);
    }
    let started = Instant::now();
    let res = tokio::select! {
        r = backup(cfg, args, &checked, &mut cleanup) => r,
        sig = interrupted() => Err(Error::Failed(format!("interrupted by {sig}"))),
    };
    match res {
        Ok(mut summary) => {
            summary.seconds = started.elapsed().as_secs_f64();
            summary.mb_per_s = summary.bytes as f64 / 1_048_576.0 / summary.seconds.max(1e-6);
            summary.peak_rss_mb = peak_rss_mb();
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("summary serialises")
                );
            } else if args.progress.is_some() {
                eprintln!(
                    "pgpar: backup complete: {} files, {:.1} MB in {:.1} s ({:.1} MB/s), {} method, WAL {}..{}",
                    summary.files,
                    summary.bytes as f64 / 1_048_576.0,
                    summary.seconds,
                    summary.mb_per_s,
                    summary.method,
                    summary.start_lsn,
                    summary.stop_lsn
                );
            }
            Ok(())
        }
        Err(e) => {
            let corrupt = matches!(e, Error::DataChecksums(_));
            if args.no_clean || corrupt {
                // Never leave something that looks finished.
                let _ = std::fs::remove_file(checked.dir.join("backup_manifest"));
                let _ = std::fs::remove_file(checked.dir.join("backup_manifest.tmp"));
                eprintln!(
                    "pgpar: keeping the files in \"{}\" for inspection{} (no backup_manifest: not a usable backup)",
                    checked.dir.display(),
                    if corrupt { "" } else { " (--no-clean)" }
                );
            } else {
                cleanup.remove_files();
            }
            if let Some(slot) = cleanup.slot.take() {
                if let Ok(mut c) = Connection::connect(cfg, Replication::Physical).await {
                    let _ = replication::drop_slot(&mut c, &slot).await;
                    c.close().await;
                }
            }
            Err(e)
        }
    }
}

async fn backup(
    cfg: &ConnConfig,
    args: &BackupArgs,
    checked: &Checked,
    cleanup: &mut Cleanup,
) -> Result<Summary> {
    let mut main = Connection::connect(cfg, Replication::Physical).await?;
    let version = main.server_version_num().unwrap_or(0);
    if version < 150000 {
        return Err(Error::Failed(format!(
            "server {} runs PostgreSQL {}, pgpar needs 15 or later",
            main.target(),
            main.parameter("server_version").unwrap_or("?")
        )));
    }
    let sys = replication::identify_system(&mut main).await?;
    tracing::info!(
        "system identifier {}, timeline {}",
        sys.system_identifier,
        sys.timeline
    );
    let offered = crate::check::parallel_protocol(&mut main).await?;
    let method = match (args.method, offered) {
        (Method::Stream, _) => Method::Stream,
        (Method::Auto | Method::Parallel, Some(1)) => Method::Parallel,
        (Method::Parallel, Some(v)) => {
            return Err(Error::Failed(format!(
                "server {} speaks parallel backup protocol {v}, this pgpar speaks 1; use --method stream",
                main.target()
            )))
        }
        (Method::Parallel, None) => {
            return Err(Error::Failed(format!(
                "--method parallel: server {} does not offer the parallel backup commands (it lacks the pgpar server patch); use --method stream",
                main.target()
            )))
        }
        (Method::Auto, _) => {
            eprintln!(
                "pgpar: notice: server {} does not offer parallel backup; using the stream method (one connection)",
                main.target()
            );
            Method::Stream
        }
    };
    let seg_size = replication::wal_segment_size(&mut main).await?;
    let wal_level = replication::show(&mut main, "wal_level")
        .await?
        .unwrap_or_default();
    if wal_level == "minimal" {
        return Err(Error::Failed(
            "wal_level is \"minimal\" on the server: set wal_level = replica (or logical) and restart it".into(),
        ));
    }
    if method == Method::Parallel {
        let max: usize = replication::show(&mut main, "max_wal_senders")
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let need = args.jobs + 2;
        if max < need {
            return Err(Error::Failed(format!(
                "max_wal_senders is {max} on server {}, but --jobs {} needs {need} (the workers, the leader and the WAL stream): \
                 raise max_wal_senders to at least {need} (needs a restart), or use --jobs {}",
                main.target(),
                args.jobs,
                max.saturating_sub(2).max(1)
            )));
        }
    }
    let ctx = Ctx {
        cfg,
        args,
        dir: checked.dir.clone(),
        map: checked.map.clone(),
        max_rate: checked.max_rate,
        chunk_size: checked.chunk_size,
        sys,
        version,
        seg_size,
    };
    let wal = WalSlot::prepare(&ctx, cleanup).await?;
    match method {
        Method::Parallel => parallel::run(&ctx, main, wal, cleanup).await,
        _ => stream::run(&ctx, main, wal, cleanup).await.map_err(|e| {
            if e.sqlstate() == Some("XX001") {
                Error::DataChecksums(format!(
                    "{e}; the server's log lists the pages (use --no-verify-checksums to take the backup anyway)"
                ))
            } else {
                e
            }
        }),
    }
}

/// The WAL connection and its slot, set up before the backup starts so that WAL from the
/// backup's start is retained.
pub(crate) struct WalSlot {
    conn: Connection,
    slot: String,
}

impl WalSlot {
    async fn prepare(ctx: &Ctx<'_>, cleanup: &mut Cleanup) -> Result<WalSlot> {
        let mut conn = Connection::connect(ctx.cfg, Replication::Physical).await?;
        let slot = match &ctx.args.slot {
            Some(s) => {
                if ctx.args.create_slot {
                    replication::create_physical_slot(&mut conn, s, false).await?;
                    cleanup.slot = Some(s.clone());
                }
                s.clone()
            }
            None => {
                let s = format!("pgpar_{}", conn.backend_pid());
                replication::create_physical_slot(&mut conn, &s, true).await?;
                s
            }
        };
        Ok(WalSlot { conn, slot })
    }

    /// Starts streaming from the segment holding `start` into `<dir>/pg_wal`.
    fn start(self, ctx: &Ctx<'_>, timeline: u32, start: Lsn) -> Result<WalHandle> {
        let wal_dir = ctx.dir.join("pg_wal");
        crate::sink::plain::make_dir(&wal_dir, 0o700)?;
        crate::sink::plain::make_dir(&wal_dir.join("archive_status"), 0o700)?;
        let (end, end_rx) = watch::channel(None);
        let task = tokio::spawn(wal::stream(
            self.conn,
            WalOptions {
                dir: wal_dir,
                slot: self.slot,
                timeline,
                start,
                segment_size: ctx.seg_size,
            },
            end_rx,
        ));
        Ok(WalHandle { task, end })
    }
}

/// A running WAL stream.
pub(crate) struct WalHandle {
    task: JoinHandle<Result<WalResult>>,
    end: watch::Sender<Option<Lsn>>,
}

/// A backup that fails drops its WAL stream: stop the task there and then, so it cannot write
/// into a directory that cleanup is removing (a dropped JoinHandle alone leaves it running).
impl Drop for WalHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WalHandle {
    /// Fails as soon as the WAL stream fails (to race against the copy).
    async fn failed(&mut self) -> Error {
        match (&mut self.task).await {
            Ok(Err(e)) => e.context("WAL streaming failed"),
            Ok(Ok(_)) => Error::Failed("WAL streaming stopped before the backup ended".into()),
            Err(e) => Error::Failed(format!("WAL streaming task failed: {e}")),
        }
    }

    /// Tells the stream where to stop and waits for it.
    async fn finish(mut self, stop: Lsn, progress: bool) -> Result<WalResult> {
        if progress {
            eprintln!("pgpar: waiting for WAL up to {stop}");
        }
        let _ = self.end.send(Some(stop));
        (&mut self.task)
            .await
            .map_err(|e| Error::Failed(format!("WAL streaming task failed: {e}")))?
            .map_err(|e| e.context("WAL streaming failed"))
    }
}

/// Creates (or checks) the local directory of each tablespace at `locations` on the server.
pub(crate) fn prepare_tablespaces<'l>(
    ctx: &Ctx<'_>,
    locations: impl Iterator<Item = &'l str>,
    cleanup: &mut Cleanup,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for loc in locations {
        let d = ctx.map.map(Path::new(loc));
        let created = prepare_empty_dir(&d, "tablespace directory").map_err(|e| match e {
            Error::Usage(m) => Error::Failed(format!(
                "{m}: map the tablespace elsewhere with -T {loc}=NEWDIR"
            )),
            other => other,
        })?;
        cleanup.add_dir(d.clone(), created);
        out.push(d);
    }
    Ok(out)
}

/// Writes -R settings, makes everything durable, then puts the manifest in place: the last
/// step, after which the directory is a finished backup.
pub(crate) async fn finalize(
    ctx: &Ctx<'_>,
    roots: Vec<PathBuf>,
    manifest: Option<Vec<u8>>,
) -> Result<()> {
    if ctx.args.write_recovery_conf {
        crate::recovery::write(&ctx.dir, ctx.cfg, ctx.args.slot.as_deref())?;
    }
    let dir = ctx.dir.clone();
    let sync = !ctx.args.no_sync;
    let mut all = vec![dir.clone()];
    all.extend(roots);
    tokio::task::spawn_blocking(move || -> Result<()> {
        if sync {
            durable::sync_trees(&all, 8)?;
        }
        match manifest {
            Some(bytes) => durable::write_atomically(&dir, "backup_manifest", &bytes, sync),
            None => durable::rename_durably(
                &dir.join("backup_manifest.tmp"),
                &dir.join("backup_manifest"),
                sync,
            ),
        }
    })
    .await
    .map_err(|e| Error::Failed(format!("sync task failed: {e}")))?
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
