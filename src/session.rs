//! One backup, whatever its method: the frame every source runs inside.
//!
//! The session owns what every method shares: the target directory's life cycle (created,
//! checked, removed on failure unless kept), the leader connection and the checks made on it,
//! the method chosen (and why), the WAL slot and stream, the tablespace directories, the
//! plain-directory sink, the one damaged-pages policy, the files written besides the data
//! (`backup_label` before any data file, `tablespace_map`, the recovery settings) and the
//! manifest, finishing durably, and the summary. A [`Source`] supplies only what differs:
//! how the backup starts on the server, how the data is copied into the sink, and how it
//! stops. It prints nothing: messages go to the [`Reporter`] it is given, logs to `tracing`.
//!
//! A backup counts as finished only once `backup_manifest` has been renamed into place after
//! everything else is durable (see [`crate::durable`]).
//!
//! Order on the server: the leader's checks and the pre-flight (`src/preflight.rs`: every
//! problem at once, nothing started yet); then the WAL stream with its slot, streaming and
//! confirmed *before* the backup starts (see [`crate::wal`] for why); then the source's start
//! (the checkpoint), copy and stop. The backup's own sessions set the server's session
//! timeouts to 0. On failure, every writer is stopped and waited for (the
//! [`crate::sink::gate`]) before anything is removed.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::conn::{Connection, Replication};
use crate::conninfo::ConnConfig;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::manifest::{wal_ranges, ManifestBuilder};
use crate::options::{BackupOptions, Method, MethodChoice};
use crate::protocol::sqlstate;
use crate::replication::{self, timeline_history, SystemInfo};
use crate::sink::dir::PlainDir;
use crate::sink::gate::Gate;
use crate::sink::plain::{make_dir, prepare_empty_dir};
use crate::sink::seam::Sink;
use crate::source::parallel::ParallelSource;
use crate::source::sql::SqlSource;
use crate::source::stream::StreamSource;
use crate::wal::{self, Bounds, WalOptions, WalResult};

/// Where the library's messages for the user go (the binary prints them).
pub trait Reporter: Send + Sync {
    /// Something the user should know that is not a problem ("using the stream method").
    fn notice(&self, msg: &str);
    /// A step of the backup, shown with `--progress`.
    fn step(&self, msg: &str);
    /// Something that went wrong but did not stop the backup by itself.
    fn warning(&self, msg: &str);
    /// The transfer's counters, now and then while it runs and once at its end (`done`),
    /// when progress is shown; the binary draws them as a bar or a JSON line.
    fn progress(&self, snapshot: &crate::progress::Snapshot);
}

/// The summary of a finished backup (`--json`).
#[derive(Debug, Serialize)]
pub struct Summary {
    /// "stream", "parallel" or "sql".
    pub method: &'static str,
    /// Why this method: the line announcing an automatic choice, or that it was asked for.
    pub method_choice: String,
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

/// A failed backup: the error, and whether the server had been asked to do anything (an
/// input problem found after that is not a usage error any more).
#[derive(Debug)]
pub struct Failure {
    /// What went wrong.
    pub error: Error,
    /// Whether server work had begun.
    pub server_work_began: bool,
}

impl Failure {
    /// The documented exit code: 2 for bad input before any server work, 3 when the server
    /// could not be reached, 1 for anything else.
    pub fn exit_code(&self) -> i32 {
        match self.error.exit_code() {
            2 if self.server_work_began => 1,
            c => c,
        }
    }
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

/// What every part of one backup may read.
pub(crate) struct Session<'a> {
    pub cfg: &'a ConnConfig,
    pub opts: &'a BackupOptions,
    pub reporter: Arc<dyn Reporter>,
    pub sys: SystemInfo,
    pub version: u32,
    pub seg_size: u64,
    /// The data directory's mode on the server (0700, or 0750 with group access).
    pub cluster_mode: u32,
    /// Worker connections (`-j`, or as many as the free walsenders allow; 1 for stream).
    pub jobs: usize,
}

impl Session<'_> {
    /// A progress display for `total` bytes, shown through the reporter.
    pub fn progress(&self, total: u64) -> crate::progress::Progress {
        crate::progress::Progress::new(self.opts.progress, total, self.reporter.clone())
    }

    /// Reports a step when `--progress` is on.
    pub fn step(&self, msg: &str) {
        if self.opts.progress.is_some() {
            self.reporter.step(msg);
        }
    }

    /// The mode of files the cluster has (0600, or 0640 with group access).
    pub fn file_mode(&self) -> u32 {
        self.cluster_mode & 0o640 | 0o600
    }
}

/// A tablespace as the server reported it at the backup's start.
#[derive(Debug, Clone)]
pub(crate) struct Tablespace {
    pub oid: u32,
    /// Absolute, or relative to the data directory for an in-place tablespace.
    pub location: String,
}

/// What a source reports once the backup has started on the server.
pub(crate) struct Started {
    pub start_lsn: Lsn,
    pub timeline: u32,
    pub tablespaces: Vec<Tablespace>,
    /// `backup_label`, when the method hands it to the client (written before any data).
    pub backup_label: Option<String>,
}

/// One file of a manifest the client builds.
pub(crate) struct ManifestFile {
    pub path: crate::relpath::RelPath,
    pub size: u64,
    pub mtime: i64,
    pub checksum: Vec<u8>,
}

/// Where the manifest comes from.
pub(crate) enum ManifestPart {
    /// The server sent it whole (BASE_BACKUP).
    FromServer(Vec<u8>),
    /// The client builds it from these files (plus the labels the session writes).
    Files(Vec<ManifestFile>),
}

/// Damaged pages the server found, described for the user.
pub(crate) enum Damage {
    /// The files and blocks, one line each.
    Files { lines: Vec<String>, pages: u64 },
    /// The server only said so (its warnings, logged as they came, name files and blocks).
    Reported(String),
}

/// What a source copied.
pub(crate) struct Copied {
    pub manifest: ManifestPart,
    pub damage: Option<Damage>,
    pub files: u64,
    pub bytes: u64,
}

/// One backup method: the part of a backup that differs between methods.
pub(crate) trait Source {
    /// Which method this is.
    const METHOD: Method;

    /// Starts the backup on the server (after the WAL slot exists, before WAL streams).
    fn start(
        &mut self,
        s: &Session<'_>,
        leader: &mut Connection,
    ) -> impl Future<Output = Result<Started>> + Send;

    /// Copies the data into `sink` (directories, links and files; not the labels).
    fn copy(
        &mut self,
        s: &Session<'_>,
        leader: &mut Connection,
        sink: &Arc<PlainDir>,
    ) -> impl Future<Output = Result<Copied>> + Send;

    /// Ends the backup on the server: the stop LSN and its timeline.
    fn stop(
        &mut self,
        s: &Session<'_>,
        leader: &mut Connection,
    ) -> impl Future<Output = Result<(Lsn, u32)>> + Send;

    /// The `backup_label` when the server hands it over only as the backup stops (the sql
    /// method's `pg_backup_stop`); it then replaces the one [`Started`] gave, which must be a
    /// placeholder a server refuses to start from, so that a copy interrupted after
    /// `global/pg_control` still cannot start as a consistent cluster.
    fn label_at_stop(&mut self) -> Option<String> {
        None
    }
}

/// Everything we created, removed on failure.
#[derive(Default)]
struct Cleanup {
    /// (directory, whether we created it): created ones are removed, others emptied.
    dirs: Vec<(PathBuf, bool)>,
    /// A permanent slot created with -C, dropped on failure.
    slot: Option<String>,
    /// Every writer's pass: closed (and waited for) before anything is removed.
    gate: Gate,
}

impl Cleanup {
    fn add_dir(&mut self, p: PathBuf, created: bool) {
        self.dirs.push((p, created));
    }

    /// Stops every writer still running (the pool's writer threads, the extractor, the WAL
    /// stream: a failed future leaves them to notice at their next step) and waits for them,
    /// so that nothing is created in a directory while it is being removed.
    async fn stop_writers(&self, reporter: &dyn Reporter) {
        let gate = self.gate.clone();
        let limit = std::time::Duration::from_secs(30);
        let all_gone = tokio::task::spawn_blocking(move || gate.close_and_wait(limit))
            .await
            .unwrap_or(false);
        if !all_gone {
            reporter.warning(
                "a writer of the backup did not stop within 30 s (a write hanging in the kernel?); removing what was written anyway",
            );
        }
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

/// Runs one backup. `stop` resolves (with a reason, e.g. "interrupted by SIGINT") when the
/// backup must end at once; everything created is then removed as on any failure.
pub async fn run(
    cfg: &ConnConfig,
    opts: &BackupOptions,
    reporter: Arc<dyn Reporter>,
    stop: impl Future<Output = String>,
) -> std::result::Result<Summary, Failure> {
    let before = |error| Failure {
        error,
        server_work_began: false,
    };
    let created = prepare_empty_dir(&opts.dir, "directory").map_err(before)?;
    let mut cleanup = Cleanup::default();
    cleanup.add_dir(opts.dir.clone(), created);
    if let Err(e) = check_writable(&opts.dir) {
        cleanup.remove_files();
        return Err(before(e));
    }
    let started = Instant::now();
    let cfg = &own_sessions(cfg);
    let res = tokio::select! {
        r = backup(cfg, opts, &reporter, &mut cleanup) => r,
        why = stop => Err(Error::Failed(why)),
    };
    match res {
        Ok(mut summary) => {
            summary.seconds = started.elapsed().as_secs_f64();
            summary.mb_per_s = summary.bytes as f64 / 1_048_576.0 / summary.seconds.max(1e-6);
            summary.peak_rss_mb = peak_rss_mb();
            Ok(summary)
        }
        Err(e) => {
            cleanup.stop_writers(reporter.as_ref()).await;
            let corrupt = matches!(e.root(), Error::DataChecksums(_));
            if opts.no_clean || corrupt {
                // Never leave something that looks finished.
                let _ = std::fs::remove_file(opts.dir.join("backup_manifest"));
                let _ = std::fs::remove_file(opts.dir.join("backup_manifest.tmp"));
                reporter.notice(&format!(
                    "keeping the files in \"{}\" for inspection{} (no backup_manifest: not a usable backup)",
                    opts.dir.display(),
                    if corrupt { "" } else { " (--no-clean)" }
                ));
            } else {
                cleanup.remove_files();
            }
            if let Some(slot) = cleanup.slot.take() {
                if let Ok(mut c) = Connection::connect(cfg, Replication::Physical).await {
                    let _ = replication::drop_slot(&mut c, &slot).await;
                    c.close().await;
                }
            }
            Err(Failure {
                error: e,
                server_work_began: true,
            })
        }
    }
}

/// The connection settings of the backup's own sessions: the leader sits idle between its
/// commands while the workers copy, and a server-wide `idle_session_timeout`,
/// `idle_in_transaction_session_timeout` or `statement_timeout` must not end it (or a worker,
/// or the WAL stream) half-way. All three exist from PostgreSQL 14 on; backups need 15.
fn own_sessions(cfg: &ConnConfig) -> ConnConfig {
    let mut own = cfg.clone();
    for name in [
        "idle_session_timeout",
        "idle_in_transaction_session_timeout",
        "statement_timeout",
    ] {
        own.session_settings.push((name.into(), "0".into()));
    }
    own
}

/// Connects the leader, checks the server, chooses the method and runs it in the frame.
async fn backup(
    cfg: &ConnConfig,
    opts: &BackupOptions,
    reporter: &Arc<dyn Reporter>,
    cleanup: &mut Cleanup,
) -> Result<Summary> {
    let older = |e: Error| {
        // Servers before 14 refuse the settings of own_sessions at startup.
        if e.to_string()
            .contains("unrecognized configuration parameter \"idle_session_timeout\"")
        {
            Error::Failed(format!(
                "{e}: the server runs a PostgreSQL older than 14, pgpar needs 15 or later"
            ))
        } else {
            e
        }
    };
    // A refused replication connection (no REPLICATION, no walsender free) still gets the
    // whole pre-flight, over an ordinary session, so that one report names every problem.
    let (mut leader, refused) = match Connection::connect(cfg, Replication::Physical).await {
        Ok(c) => (c, None),
        Err(e) if crate::preflight::worth_a_probe(&e) => match crate::preflight::probe(cfg).await {
            Some(c) => (c, Some(e)),
            None => return Err(e),
        },
        Err(e) => return Err(older(e)),
    };
    let version = leader.server_version_num().unwrap_or(0);
    if version < 150000 {
        return Err(Error::Failed(format!(
            "server {} runs PostgreSQL {}, pgpar needs 15 or later",
            leader.target(),
            leader.parameter("server_version").unwrap_or("?")
        )));
    }
    let mut problems = Vec::new();
    let (method, method_choice) = choose_method(
        cfg,
        opts,
        &mut leader,
        refused.is_none(),
        &mut problems,
        reporter.as_ref(),
    )
    .await?;
    let seg_size = replication::wal_segment_size(&mut leader).await?;
    // Everything that can be found wrong before any work, in one report; settles the method
    // and the workers.
    let asked = crate::preflight::Asked {
        conn: &mut leader,
        refused,
    };
    let flight = crate::preflight::run(
        cfg,
        opts,
        asked,
        method,
        seg_size,
        problems,
        reporter.as_ref(),
    )
    .await?;
    let sys = replication::identify_system(&mut leader).await?;
    tracing::info!(
        "system identifier {}, timeline {}",
        sys.system_identifier,
        sys.timeline
    );
    let method = flight.method;
    let cluster_mode = replication::show(&mut leader, "data_directory_mode")
        .await?
        .and_then(|m| u32::from_str_radix(m.trim(), 8).ok())
        .unwrap_or(0o700);
    let s = Session {
        cfg,
        opts,
        reporter: reporter.clone(),
        sys,
        version,
        seg_size,
        cluster_mode,
        jobs: flight.jobs,
    };
    let wal = WalSlot::prepare(&s, cleanup).await?.start(&s, cleanup)?;
    let mut summary = match method {
        Method::Parallel => frame(&s, leader, wal, cleanup, ParallelSource::default()).await,
        Method::Stream => frame(&s, leader, wal, cleanup, StreamSource::default()).await,
        Method::Sql => frame(&s, leader, wal, cleanup, SqlSource::default()).await,
    }?;
    summary.method_choice = method_choice;
    Ok(summary)
}

/// Resolves `--method`: the parallel commands when the server offers them, else the sql
/// method when the role has its privileges, else the stream method. Returns the method and
/// one line saying why; an automatic choice is announced with it (when `announce`: not for a
/// leader refused its replication connection, whose pre-flight fails). The sql method's
/// missing GRANTs, when it was asked for, go to `problems` for the pre-flight's report.
async fn choose_method(
    cfg: &ConnConfig,
    opts: &BackupOptions,
    leader: &mut Connection,
    announce: bool,
    problems: &mut Vec<String>,
    reporter: &dyn Reporter,
) -> Result<(Method, String)> {
    let target = leader.target().to_string();
    let asked = |m: Method| {
        (
            m,
            format!("{} method, as asked (--method {})", m.name(), m.name()),
        )
    };
    if opts.method == MethodChoice::Stream {
        return Ok(asked(Method::Stream));
    }
    if opts.method == MethodChoice::Sql {
        return match sql_method_privileges(cfg).await {
            Ok(p) => {
                // REPLICATION, when missing, is a problem of every method: the pre-flight
                // names it on its own.
                let grants: Vec<String> = p
                    .grants()
                    .into_iter()
                    .filter(|g| !g.starts_with("ALTER ROLE"))
                    .collect();
                if !p.superuser && !grants.is_empty() {
                    problems.push(format!(
                        "--method sql: role {} on server {target} may not execute the functions \
                         the sql method calls; as a superuser, run: {}",
                        p.role,
                        grants.join(" ")
                    ));
                }
                Ok(asked(Method::Sql))
            }
            // Its sessions cannot connect at all: that too goes in the one report.
            Err(e) => {
                let mut p =
                    format!("--method sql: the sql method's SQL sessions cannot connect: {e}");
                if let Some(h) = e.hint() {
                    p.push_str(&format!(" ({h})"));
                }
                problems.push(p);
                Ok(asked(Method::Sql))
            }
        };
    }
    let offered = crate::check::parallel_protocol(leader).await?;
    let choice = match (opts.method, offered) {
        (MethodChoice::Parallel, Some(1)) => asked(Method::Parallel),
        (MethodChoice::Auto, Some(1)) => (
            Method::Parallel,
            // Without -j the pre-flight settles the number of workers (and says so when
            // fewer than the default fit).
            if opts.jobs_given {
                format!(
                    "server {target} offers parallel backup; using the parallel method ({} worker connection{})",
                    opts.jobs,
                    if opts.jobs == 1 { "" } else { "s" }
                )
            } else {
                format!("server {target} offers parallel backup; using the parallel method")
            },
        ),
        (MethodChoice::Parallel, Some(v)) => {
            return Err(Error::Failed(format!(
                "server {target} speaks parallel backup protocol {v}, this pgpar speaks 1; use --method sql or --method stream"
            )))
        }
        (MethodChoice::Parallel, None) => {
            return Err(Error::Failed(format!(
                "--method parallel: server {target} does not offer the parallel backup commands (it lacks the pgpar server patch); use --method sql or --method stream"
            )))
        }
        (_, _) => match sql_method_privileges(cfg).await {
            Ok(p) if p.sql_method() => (
                Method::Sql,
                format!(
                    "server {target} does not offer parallel backup; using the sql method ({} sessions)",
                    opts.jobs
                ),
            ),
            Ok(p) => (
                Method::Stream,
                format!(
                    "server {target} does not offer parallel backup and role {} lacks the sql method's privileges \
                     (see pgpar check); using the stream method (one connection)",
                    p.role
                ),
            ),
            Err(e) => (
                Method::Stream,
                format!(
                    "server {target} does not offer parallel backup and the sql method's privileges could not be \
                     checked ({e}); using the stream method (one connection)"
                ),
            ),
        },
    };
    if opts.method == MethodChoice::Auto && announce {
        reporter.notice(&choice.1);
    }
    Ok(choice)
}

/// The role's privileges for the sql method, over a short SQL session.
async fn sql_method_privileges(cfg: &ConnConfig) -> Result<crate::privileges::Privileges> {
    let mut sess = crate::conn::sql::SqlSession::connect(cfg).await?;
    let p = crate::privileges::Privileges::of(&mut sess).await;
    sess.close().await;
    p
}

/// The frame: start, copy beside the WAL stream, stop, the damaged-pages policy, the labels,
/// the manifest, finish.
async fn frame<S: Source>(
    s: &Session<'_>,
    mut leader: Connection,
    mut wal: WalHandle,
    cleanup: &mut Cleanup,
    mut source: S,
) -> Result<Summary> {
    // The WAL stream runs already (see crate::wal): if it fails during the start (its
    // slot invalidated, say), the backup stops there.
    wal.holding().await?;
    let started = tokio::select! {
        r = source.start(s, &mut leader) => r?,
        e = wal.failed() => return Err(e),
    };
    wal.backup_started(started.start_lsn, started.timeline)?;
    let ts_dirs = prepare_tablespaces(s, &started.tablespaces, cleanup)?;
    let sink = Arc::new(
        PlainDir::new(s.opts.dir.clone(), ts_dirs, s.opts.map.clone())
            .with_file_mode(s.file_mode())
            .with_gate(cleanup.gate.clone()),
    );
    // backup_label first: a copy interrupted part-way must not start as a server that
    // believes it is consistent (it would, from pg_control alone, without the label).
    if let Some(label) = &started.backup_label {
        sink.put("backup_label", label.as_bytes())?;
        sink.make_durable("backup_label")?;
    }
    let copied = tokio::select! {
        r = source.copy(s, &mut leader, &sink) => r,
        e = wal.failed() => Err(e),
    };
    let copied = match copied {
        Ok(c) => c,
        Err(e) if e.sqlstate() == Some(sqlstate::DATA_CORRUPTED) => {
            return Err(damaged(s, &sink, Damage::Reported(e.to_string())).await);
        }
        Err(e) => return Err(e),
    };
    if let Some(d) = copied.damage {
        return Err(damaged(s, &sink, d).await);
    }
    let (stop, stop_tli) = match source.stop(s, &mut leader).await {
        Err(e) if e.sqlstate() == Some(sqlstate::DATA_CORRUPTED) => {
            return Err(damaged(s, &sink, Damage::Reported(e.to_string())).await);
        }
        r => r?,
    };
    let mut started = started;
    if let Some(label) = source.label_at_stop() {
        // Over the placeholder written before the data (see Source::label_at_stop).
        sink.replace("backup_label", label.as_bytes())?;
        started.backup_label = Some(label);
    }
    s.step(&format!("waiting for WAL up to {stop}"));
    let walres = wal.finish(stop).await?;

    let mut extra: Vec<(&str, Vec<u8>)> = Vec::new();
    if let Some(label) = &started.backup_label {
        extra.push(("backup_label", label.clone().into_bytes()));
    }
    if started.backup_label.is_some() {
        // Plain format makes the links itself; the server re-creates links from this file
        // when it starts, so it names the mapped locations. In-place tablespaces are
        // directories inside the backup, not links.
        let map: String = started
            .tablespaces
            .iter()
            .filter(|t| Path::new(&t.location).is_absolute())
            .map(|t| {
                format!(
                    "{} {}\n",
                    t.oid,
                    map_escape(&s.opts.map.map(Path::new(&t.location)).display().to_string())
                )
            })
            .collect();
        if !map.is_empty() {
            sink.put("tablespace_map", map.as_bytes())?;
            extra.push(("tablespace_map", map.into_bytes()));
        }
    }
    if s.opts.write_recovery_conf {
        let settings = crate::recovery::settings(s.cfg, s.opts.slot.as_deref(), s.version);
        sink.append("postgresql.auto.conf", settings.as_bytes())?;
        sink.put("standby.signal", b"")?;
    }
    let manifest = match copied.manifest {
        ManifestPart::FromServer(bytes) => bytes,
        ManifestPart::Files(files) => {
            let history = if stop_tli != started.timeline {
                let (_, h) = timeline_history(&mut leader, stop_tli).await?;
                String::from_utf8_lossy(&h).into_owned()
            } else {
                String::new()
            };
            build_manifest(s, &extra, files, &started, stop, stop_tli, &history)
        }
    };
    leader.close().await;
    let sync = s.opts.sync;
    let fin = sink.clone();
    tokio::task::spawn_blocking(move || fin.finish(Some(&manifest), sync))
        .await
        .map_err(|e| Error::Failed(format!("sync task failed: {e}")))??;
    Ok(Summary {
        method: S::METHOD.name(),
        method_choice: String::new(),
        backup_dir: s.opts.dir.display().to_string(),
        bytes: copied.bytes,
        files: copied.files,
        seconds: 0.0,
        mb_per_s: 0.0,
        start_lsn: started.start_lsn.to_string(),
        stop_lsn: stop.to_string(),
        timeline: stop_tli,
        wal_segments: walres.segments.len(),
        jobs: if matches!(S::METHOD, Method::Parallel | Method::Sql) {
            s.jobs
        } else {
            1
        },
        peak_rss_mb: None,
    })
}

fn build_manifest(
    s: &Session<'_>,
    extra: &[(&str, Vec<u8>)],
    files: Vec<ManifestFile>,
    started: &Started,
    stop: Lsn,
    stop_tli: u32,
    history: &str,
) -> Vec<u8> {
    let kind = s.opts.manifest_checksums;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut mb = ManifestBuilder::new(
        (s.version >= 170000).then_some(s.sys.system_identifier),
        kind,
    );
    for (name, content) in extra {
        mb.add_file(
            name.as_bytes(),
            content.len() as u64,
            now,
            &kind.digest(content),
        );
    }
    for f in files {
        mb.add_file(f.path.as_bytes(), f.size, f.mtime, &f.checksum);
    }
    let ranges = wal_ranges(started.start_lsn, started.timeline, stop, stop_tli, history);
    mb.finish(&ranges)
}

/// The one damaged-pages policy, for every method: the copy is kept, durable, without a
/// manifest (as pg_basebackup does), the damaged files are named where the method knows
/// them, and the backup fails with [`Error::DataChecksums`].
async fn damaged(s: &Session<'_>, sink: &Arc<PlainDir>, d: Damage) -> Error {
    let (what, server_said) = match d {
        Damage::Files { lines, pages } => {
            for l in &lines {
                s.reporter
                    .warning(&format!("data checksum verification failed in {l}"));
            }
            let what = format!(
                "{pages} data page(s) in {} file(s) (listed above)",
                lines.len()
            );
            (what, String::new())
        }
        Damage::Reported(msg) => (
            "data pages named in the server's warnings above".to_string(),
            format!("; the server ended with: {msg}"),
        ),
    };
    let sync = s.opts.sync;
    let fin = sink.clone();
    let synced = tokio::task::spawn_blocking(move || fin.finish(None, sync)).await;
    match synced {
        Ok(Ok(())) => Error::DataChecksums(format!(
            "{what} failed checksum verification: the source cluster is damaged \
             (use --no-verify-checksums to take the backup anyway){server_said}"
        )),
        Ok(Err(e)) => e,
        Err(e) => Error::Failed(format!("sync task failed: {e}")),
    }
}

/// Escapes a path for tablespace_map as the server does (`\n`, `\r`, `\` get a backslash).
fn map_escape(p: &str) -> String {
    let mut s = String::new();
    for c in p.chars() {
        if matches!(c, '\n' | '\r' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// Creates (or checks) the local directory of each tablespace: the `-T` mapping of its
/// location, or, for an in-place tablespace (a location relative to the data directory),
/// that path inside the backup — never a path resolved against pgpar's own working
/// directory.
fn prepare_tablespaces(
    s: &Session<'_>,
    tablespaces: &[Tablespace],
    cleanup: &mut Cleanup,
) -> Result<HashMap<u32, PathBuf>> {
    let mut out = HashMap::new();
    for t in tablespaces {
        let loc = Path::new(&t.location);
        if !loc.is_absolute() {
            let rel = crate::relpath::RelPath::from(t.location.as_str());
            let d = s.opts.dir.join(crate::sink::plain::safe_relative(&rel)?);
            std::fs::DirBuilder::new()
                .recursive(true)
                .create(&d)
                .map_err(|e| Error::io(format!("could not create \"{}\"", d.display()), e))?;
            make_dir(&d, s.cluster_mode & 0o750 | 0o700)?;
            out.insert(t.oid, d);
            continue;
        }
        let d = s.opts.map.map(loc);
        // Still a usage error; the exit code says server work had begun (see Failure).
        let created = prepare_empty_dir(&d, "tablespace directory").map_err(|e| match e {
            Error::Usage(m) => Error::Usage(format!(
                "{m}: map the tablespace elsewhere with -T {}=NEWDIR",
                t.location
            )),
            other => other,
        })?;
        cleanup.add_dir(d.clone(), created);
        out.insert(t.oid, d);
    }
    Ok(out)
}

/// The WAL connection and its slot, set up before the backup starts (see [`crate::wal`] for
/// why then, and why WAL from the backup's start is safe).
struct WalSlot {
    conn: Connection,
    slot: String,
}

impl WalSlot {
    async fn prepare(s: &Session<'_>, cleanup: &mut Cleanup) -> Result<WalSlot> {
        let mut conn = Connection::connect(s.cfg, Replication::Physical)
            .await
            .map_err(|e| e.context("WAL stream"))?;
        let slot = match &s.opts.slot {
            Some(name) => {
                if s.opts.create_slot {
                    replication::create_physical_slot(&mut conn, name, false, false).await?;
                    cleanup.slot = Some(name.clone());
                }
                name.clone()
            }
            None => {
                let name = format!("pgpar_{}", conn.backend_pid());
                replication::create_physical_slot(&mut conn, &name, true, false).await?;
                name
            }
        };
        Ok(WalSlot { conn, slot })
    }

    /// Starts streaming into `<dir>/pg_wal`, from the segment of the server's flush position
    /// now, before the backup starts.
    fn start(self, s: &Session<'_>, cleanup: &Cleanup) -> Result<WalHandle> {
        let wal_dir = s.opts.dir.join("pg_wal");
        let dir_mode = s.cluster_mode & 0o750 | 0o700;
        make_dir(&wal_dir, dir_mode)?;
        make_dir(&wal_dir.join("archive_status"), dir_mode)?;
        let (bounds, bounds_rx) = watch::channel(Bounds::default());
        let run = WalRun {
            cfg: s.cfg.clone(),
            temporary: s.opts.slot.is_none(),
            slot: self.slot.clone(),
            gate: cleanup.gate.clone(),
            timeline: s.sys.timeline,
            opts: WalOptions {
                dir: wal_dir,
                timeline: s.sys.timeline,
                start: Lsn(0),
                segment_size: s.seg_size,
                file_mode: s.file_mode(),
                stall_timeout: s.opts.stall_timeout,
            },
        };
        let (holding_tx, holding) = watch::channel(false);
        let task = tokio::spawn(run.stream(self, bounds_rx, holding_tx));
        Ok(WalHandle {
            task,
            bounds,
            holding,
            timeline: s.sys.timeline,
        })
    }
}

/// What the WAL stream's task needs to (re)start.
struct WalRun {
    cfg: ConnConfig,
    /// Whether the slot is our temporary one (made again on a new connection).
    temporary: bool,
    /// The slot's name (the user's, for a slot that is not temporary).
    slot: String,
    gate: Gate,
    timeline: u32,
    opts: WalOptions,
}

/// Streams one WAL stream may take, the first included (see [`WalRun::stream`]).
const WAL_TRIES: u32 = 5;

impl WalRun {
    /// Streams from the server's flush position now, over as many streams as it takes.
    ///
    /// A stream that fails on the server's side (its walsender ended: the slot invalidated
    /// by `max_slot_wal_keep_size` when the stream fell behind, a segment removed before it
    /// was read, the connection cut) is replaced by a new one on a fresh connection and
    /// temporary slot: before the backup has started nothing depends on what was streamed,
    /// so it starts afresh from the server's position then, with what was written removed;
    /// after, it resumes exactly where the last one stopped, which works as long as the
    /// server still has that WAL (if not, the server says so and the backup fails). A slot
    /// of the user's (`-S`) is never replaced.
    async fn stream(
        self,
        first: WalSlot,
        bounds: watch::Receiver<Bounds>,
        holding: watch::Sender<bool>,
    ) -> Result<WalResult> {
        let mut slot = Some(first);
        let mut files: Option<wal::SegmentWriter> = None;
        // Where to start over, when the backup turned out to start before the stream did.
        let mut start_at: Option<Lsn> = None;
        let mut tries = 0;
        let mut resumed = false;
        loop {
            tries += 1;
            let mut ws = match slot.take() {
                Some(ws) => ws,
                None => {
                    let mut conn = Connection::connect(&self.cfg, Replication::Physical).await?;
                    let name = if self.temporary {
                        let name = format!("pgpar_{}", conn.backend_pid());
                        replication::create_physical_slot(&mut conn, &name, true, false).await?;
                        name
                    } else {
                        self.slot.clone()
                    };
                    WalSlot { conn, slot: name }
                }
            };
            let from = match &files {
                Some(w) => w.written(),
                None => {
                    // Where the server is now: the backup's start comes at or after it.
                    let now = replication::identify_system(&mut ws.conn).await?;
                    if now.timeline != self.timeline {
                        return Err(Error::Failed(format!(
                            "the server's timeline changed from {} to {} as the backup began (a promotion?): run the backup again",
                            self.timeline, now.timeline
                        )));
                    }
                    let first = start_at.take().unwrap_or(now.xlogpos);
                    let w = wal::SegmentWriter::new(
                        WalOptions {
                            start: first,
                            ..self.opts.clone()
                        },
                        Some(self.gate.pass()),
                    );
                    let from = first.segment_start(self.opts.segment_size);
                    files = Some(w);
                    from
                }
            };
            let w = files.as_mut().expect("segment writer");
            let res = wal::stream(ws.conn, w, from, &ws.slot, bounds.clone(), &holding).await;
            let early = bounds.borrow().start.is_none();
            match res {
                Ok(wal::Ended::Done) => return Ok(files.take().expect("segment writer").result()),
                Ok(wal::Ended::StartAt(lsn)) if start_at.is_none() && tries < WAL_TRIES => {
                    // A standby: its backup starts at its last restartpoint, which it keeps.
                    tracing::info!("WAL stream: the backup starts at {lsn}, before the stream did; streaming from there");
                    files = None;
                    clear_dir(&self.opts.dir)?;
                    start_at = Some(lsn);
                }
                Ok(wal::Ended::StartAt(lsn)) => {
                    return Err(Error::Failed(format!(
                        "the backup started at {lsn}, before the WAL stream could start: run the backup again"
                    )))
                }
                Err(e)
                    if self.temporary
                        && tries < WAL_TRIES
                        && matches!(
                            e.root(),
                            Error::Server { .. } | Error::ConnectionLost { .. }
                        ) =>
                {
                    if early {
                        tracing::info!(
                            "WAL stream: {e}; starting it again (the backup has not started yet)"
                        );
                        files = None;
                        clear_dir(&self.opts.dir)?;
                    } else {
                        tracing::warn!(
                            "WAL stream: {e}; resuming at {} on a new connection (try {} of {WAL_TRIES})",
                            w.written(),
                            tries + 1
                        );
                        resumed = true;
                    }
                }
                Err(e) if resumed => {
                    let removed = e.to_string().contains("has already been removed");
                    return Err(e.context(format!(
                        "gave up after {tries} streams, the last resuming at {}{}",
                        w.written(),
                        if removed {
                            " (the server no longer had that WAL: the stream fell further behind than max_slot_wal_keep_size allows)"
                        } else {
                            ""
                        }
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Removes the WAL files of a stream that is started again (not `archive_status` itself).
fn clear_dir(dir: &Path) -> Result<()> {
    for d in [dir.to_path_buf(), dir.join("archive_status")] {
        let rd = std::fs::read_dir(&d)
            .map_err(|e| Error::io(format!("could not read \"{}\"", d.display()), e))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.is_file() {
                std::fs::remove_file(&p)
                    .map_err(|e| Error::io(format!("could not remove \"{}\"", p.display()), e))?;
            }
        }
    }
    Ok(())
}

/// A running WAL stream.
struct WalHandle {
    task: JoinHandle<Result<WalResult>>,
    bounds: watch::Sender<Bounds>,
    /// Set once the slot holds WAL from the stream's start.
    holding: watch::Receiver<bool>,
    /// The timeline it streams.
    timeline: u32,
}

/// A backup that fails drops its WAL stream: stop the task there and then (a dropped
/// JoinHandle alone leaves it running); its pass of the gate keeps the session from removing
/// the directory until it is gone.
impl Drop for WalHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WalHandle {
    /// Fails as soon as the WAL stream fails (to race against the start and the copy).
    async fn failed(&mut self) -> Error {
        match (&mut self.task).await {
            Ok(Err(e)) => e.context("WAL stream"),
            Ok(Ok(_)) => Error::Failed("WAL stream: stopped before the backup ended".into()),
            Err(e) => Error::Failed(format!("WAL stream: task failed: {e}")),
        }
    }

    /// Waits until the slot holds WAL from the stream's start: only then may the backup's
    /// checkpoint run (see [`crate::wal`]).
    async fn holding(&mut self) -> Result<()> {
        let mut holding = self.holding.clone();
        tokio::select! {
            r = holding.wait_for(|h| *h) => r
                .map(|_| ())
                .map_err(|_| Error::Failed("WAL stream: stopped before it started".into())),
            e = self.failed() => Err(e),
        }
    }

    /// The backup has started at `start` on `timeline`: the stream keeps WAL from there on.
    fn backup_started(&mut self, start: Lsn, timeline: u32) -> Result<()> {
        if timeline != self.timeline {
            return Err(Error::Failed(format!(
                "the backup started on timeline {timeline}, but WAL streams from timeline {} (the server was promoted as the backup began?): run the backup again",
                self.timeline
            )));
        }
        self.bounds.send_modify(|b| b.start = Some(start));
        Ok(())
    }

    /// Tells the stream where to stop and waits for it.
    async fn finish(mut self, stop: Lsn) -> Result<WalResult> {
        self.bounds.send_modify(|b| b.end = Some(stop));
        (&mut self.task)
            .await
            .map_err(|e| Error::Failed(format!("WAL stream: task failed: {e}")))?
            .map_err(|e| e.context("WAL stream"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_whether_server_work_began() {
        let usage = |began| Failure {
            error: Error::Usage("tablespace directory \"/x\" exists but is not empty".into()),
            server_work_began: began,
        };
        assert_eq!(usage(false).exit_code(), 2);
        assert_eq!(usage(true).exit_code(), 1);
        let connect = Failure {
            error: Error::Connect {
                target: "db1:5432".into(),
                reason: "refused".into(),
                sqlstate: None,
                hint: None,
            },
            server_work_began: true,
        };
        assert_eq!(connect.exit_code(), 3);
        assert_eq!(
            map_escape("/srv/a\\b\nc"),
            "/srv/a\\\\b\\\nc",
            "tablespace_map escapes as the server does"
        );
    }
}
