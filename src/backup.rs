//! `pgpar backup`: options, the target directory's life cycle, and the stream method.
//!
//! Input is checked before any server work (exit 2). The target directory is ours from the
//! moment we create it: a failure removes what we created (`--no-clean` keeps it, without a
//! manifest). A backup counts as finished only once `backup_manifest` has been renamed into
//! place after everything else is durable (see [`crate::durable`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::basebackup::{self, StreamMessage};
use crate::conn::{Connection, Event, Replication, ResultSet};
use crate::conninfo::ConnConfig;
use crate::durable;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::progress::Progress;
use crate::replication::{self, quote_literal};
use crate::sink::plain::{prepare_empty_dir, TablespaceMap};
use crate::sink::StreamSink;
use crate::wal::{self, WalOptions};

/// `-c`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Checkpoint {
    /// Checkpoint as fast as possible.
    Fast,
    /// Spread the checkpoint over checkpoint_completion_target (the server's default).
    Spread,
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

/// Manifest checksum algorithms, as the server names them.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
#[value(rename_all = "UPPER")]
#[allow(missing_docs)]
pub enum ManifestChecksums {
    None,
    Crc32c,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
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
    /// Show progress on stderr.
    #[arg(short = 'P', long)]
    pub progress: bool,
    /// Checksum algorithm for files in the manifest.
    #[arg(long, value_enum, default_value = "CRC32C")]
    pub manifest_checksums: ManifestChecksums,
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
}

/// Checked options.
struct Plan {
    dir: PathBuf,
    map: TablespaceMap,
}

fn validate(args: &BackupArgs) -> Result<Plan> {
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
    Ok(Plan {
        dir,
        map: TablespaceMap(map),
    })
}

/// Everything we created, removed on failure.
struct Cleanup {
    dir: PathBuf,
    created_dir: bool,
    extra: Vec<PathBuf>,
    armed: bool,
}

impl Cleanup {
    fn run(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        for p in &self.extra {
            let _ = std::fs::remove_dir_all(p);
        }
        if self.created_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else if let Ok(rd) = std::fs::read_dir(&self.dir) {
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

/// Runs `pgpar backup`.
pub async fn run(cfg: &ConnConfig, args: &BackupArgs) -> Result<()> {
    let plan = validate(args)?;
    let created = prepare_empty_dir(&plan.dir, "directory")?;
    let mut cleanup = Cleanup {
        dir: plan.dir.clone(),
        created_dir: created,
        extra: Vec::new(),
        armed: true,
    };
    if let Err(e) = check_writable(&plan.dir) {
        cleanup.run();
        return Err(e);
    }
    let started = Instant::now();
    let res = tokio::select! {
        r = stream_method(cfg, args, &plan, &mut cleanup.extra) => r,
        _ = tokio::signal::ctrl_c() => Err(Error::Failed("interrupted".into())),
    };
    match res {
        Ok(mut summary) => {
            cleanup.armed = false;
            summary.seconds = started.elapsed().as_secs_f64();
            summary.mb_per_s = summary.bytes as f64 / 1_048_576.0 / summary.seconds.max(1e-6);
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("summary serialises")
                );
            } else if args.progress {
                eprintln!(
                    "pgpar: backup complete: {} files, {:.1} MB in {:.1} s ({:.1} MB/s), WAL {}..{}",
                    summary.files,
                    summary.bytes as f64 / 1_048_576.0,
                    summary.seconds,
                    summary.mb_per_s,
                    summary.start_lsn,
                    summary.stop_lsn
                );
            }
            Ok(())
        }
        Err(e) => {
            if args.no_clean {
                // Never leave something that looks finished.
                let _ = std::fs::remove_file(plan.dir.join("backup_manifest"));
                let _ = std::fs::remove_file(plan.dir.join("backup_manifest.tmp"));
                eprintln!(
                    "pgpar: --no-clean: keeping the incomplete backup in \"{}\" (no backup_manifest: not a usable backup)",
                    plan.dir.display()
                );
            } else {
                cleanup.run();
            }
            Err(e)
        }
    }
}

fn first_row<'a>(set: Option<&'a ResultSet>, what: &str) -> Result<&'a crate::conn::Row> {
    set.and_then(|s| s.rows.first())
        .ok_or_else(|| Error::Protocol(format!("BASE_BACKUP sent no {what}")))
}

/// Reads result sets until the next copy starts (or the command ends).
async fn read_sets(c: &mut Connection, until_copy: bool) -> Result<Vec<ResultSet>> {
    let mut sets: Vec<ResultSet> = Vec::new();
    loop {
        match c.next_event().await? {
            Some(Event::RowDescription(columns)) => sets.push(ResultSet {
                columns,
                ..Default::default()
            }),
            Some(Event::DataRow(r)) => sets
                .last_mut()
                .ok_or_else(|| Error::Protocol("DataRow without RowDescription".into()))?
                .rows
                .push(r),
            Some(Event::CommandComplete(t)) => {
                if let Some(s) = sets.last_mut() {
                    s.tag = t;
                }
            }
            Some(Event::CopyOutStart) if until_copy => return Ok(sets),
            Some(other) => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} from BASE_BACKUP"
                )))
            }
            None => {
                if until_copy {
                    return Err(Error::Protocol(
                        "BASE_BACKUP ended without sending data".into(),
                    ));
                }
                return Ok(sets);
            }
        }
    }
}

async fn stream_method(
    cfg: &ConnConfig,
    args: &BackupArgs,
    plan: &Plan,
    extra_dirs: &mut Vec<PathBuf>,
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
    let parallel = crate::check::parallel_protocol(&mut main).await?;
    match (args.method, parallel) {
        (Method::Parallel, None) => {
            return Err(Error::Failed(format!(
                "--method parallel: server {} does not offer the parallel backup commands (it lacks the pgpar server patch); use --method stream",
                main.target()
            )))
        }
        (Method::Parallel, Some(_)) => {
            return Err(Error::Failed(
                "--method parallel is not available in this build yet; use --method stream".into(),
            ))
        }
        _ => {}
    }
    let seg_size = replication::wal_segment_size(&mut main).await?;
    let wal_level = replication::show(&mut main, "wal_level")
        .await?
        .unwrap_or_default();
    if wal_level == "minimal" {
        return Err(Error::Failed(
            "wal_level is \"minimal\" on the server: set wal_level = replica (or logical) and restart it".into(),
        ));
    }

    // The WAL connection and its slot come first, so WAL from the backup's start is kept.
    let mut walconn = Connection::connect(cfg, Replication::Physical).await?;
    let slot = format!("pgpar_{}", walconn.backend_pid());
    replication::create_physical_slot(&mut walconn, &slot, true).await?;

    let mut opts = vec![
        format!("LABEL {}", quote_literal(&args.label)),
        "PROGRESS".to_string(),
        format!(
            "CHECKPOINT {}",
            quote_literal(match args.checkpoint {
                Checkpoint::Fast => "fast",
                Checkpoint::Spread => "spread",
            })
        ),
        "WAIT false".to_string(),
        "MANIFEST 'yes'".to_string(),
        format!(
            "MANIFEST_CHECKSUMS {}",
            quote_literal(&format!("{:?}", args.manifest_checksums).to_uppercase())
        ),
    ];
    if args.no_verify_checksums {
        opts.push("VERIFY_CHECKSUMS false".into());
    }
    let cmd = format!("BASE_BACKUP ({})", opts.join(", "));
    if args.progress {
        eprintln!(
            "pgpar: starting backup (checkpoint {:?}) on {}",
            args.checkpoint,
            main.target()
        );
    }
    main.start_query(&cmd)
        .await
        .map_err(|e| e.context("BASE_BACKUP failed"))?;
    let sets = read_sets(&mut main, true)
        .await
        .map_err(|e| e.context("could not start the backup"))?;
    let start_row = first_row(sets.first(), "start position")?;
    let start: Lsn = start_row
        .get(0)
        .ok_or_else(|| Error::Protocol("BASE_BACKUP sent no start LSN".into()))?
        .parse()?;
    let timeline: u32 = start_row
        .get(1)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| Error::Protocol("BASE_BACKUP sent no timeline".into()))?;
    let total_kb: u64 = sets
        .get(1)
        .map(|s| {
            s.rows
                .iter()
                .filter_map(|r| r.get(2)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    for r in sets.get(1).map(|s| s.rows.as_slice()).unwrap_or_default() {
        if let Some(loc) = r.get(1) {
            extra_dirs.push(plan.map.map(Path::new(loc)));
        }
    }

    // pg_wal exists before streaming starts writing into it.
    let wal_dir = plan.dir.join("pg_wal");
    crate::sink::plain::make_dir(&wal_dir, 0o700)?;
    crate::sink::plain::make_dir(&wal_dir.join("archive_status"), 0o700)?;
    let (end_tx, end_rx) = watch::channel(None);
    let wal_task = tokio::spawn(wal::stream(
        walconn,
        WalOptions {
            dir: wal_dir,
            slot,
            timeline,
            start,
            segment_size: seg_size,
        },
        end_rx,
    ));

    let (tx, rx) = mpsc::channel::<StreamMessage>(64);
    let sink = StreamSink::new(plan.dir.clone(), plan.map.clone()).spawn(rx);
    let progress = Progress::new(args.progress, total_kb * 1024);
    let copy_res: Result<()> = async {
        loop {
            match main.next_event().await? {
                Some(Event::CopyData(d)) => {
                    let m = basebackup::parse(d)?;
                    match &m {
                        StreamMessage::Progress(n) => progress.set(*n),
                        StreamMessage::Data(d) => progress.add(d.len() as u64),
                        _ => {}
                    }
                    if tx.send(m).await.is_err() {
                        return Ok(()); // the sink failed; its error is reported below
                    }
                }
                Some(Event::CopyDone) => return Ok(()),
                Some(other) => {
                    return Err(Error::Protocol(format!(
                        "unexpected {other:?} in the backup stream"
                    )))
                }
                None => {
                    return Err(Error::Protocol(
                        "backup stream ended without CopyDone".into(),
                    ))
                }
            }
        }
    }
    .await;
    drop(tx);
    let sink_res = tokio::task::spawn_blocking(move || sink.join())
        .await
        .map_err(|e| Error::Failed(format!("sink thread failed: {e}")))?
        .map_err(|_| Error::Failed("sink thread panicked".into()))?;
    copy_res.map_err(|e| e.context("backup stream failed"))?;
    let stats = sink_res?;
    let end_sets = read_sets(&mut main, false)
        .await
        .map_err(|e| e.context("the backup did not end cleanly"))?;
    let end_row = first_row(
        end_sets.iter().find(|s| !s.columns.is_empty()),
        "end position",
    )?;
    let stop: Lsn = end_row
        .get(0)
        .ok_or_else(|| Error::Protocol("BASE_BACKUP sent no end LSN".into()))?
        .parse()?;
    progress.finish();
    main.close().await;
    if !stats.manifest {
        return Err(Error::Failed("the server sent no backup manifest".into()));
    }
    if args.progress {
        eprintln!("pgpar: waiting for WAL up to {stop}");
    }
    let _ = end_tx.send(Some(stop));
    let walres = wal_task
        .await
        .map_err(|e| Error::Failed(format!("WAL streaming task failed: {e}")))?
        .map_err(|e| e.context("WAL streaming failed"))?;

    let dir = plan.dir.clone();
    let no_sync = args.no_sync;
    let mut roots = vec![dir.clone()];
    roots.extend(stats.tablespace_dirs.iter().cloned());
    tokio::task::spawn_blocking(move || -> Result<()> {
        if !no_sync {
            durable::sync_trees(&roots, 8)?;
        }
        durable::rename_durably(
            &dir.join("backup_manifest.tmp"),
            &dir.join("backup_manifest"),
            !no_sync,
        )
    })
    .await
    .map_err(|e| Error::Failed(format!("sync task failed: {e}")))??;

    Ok(Summary {
        method: "stream",
        backup_dir: plan.dir.display().to_string(),
        bytes: stats.bytes,
        files: stats.files,
        seconds: 0.0,
        mb_per_s: 0.0,
        start_lsn: start.to_string(),
        stop_lsn: stop.to_string(),
        timeline,
        wal_segments: walres.segments.len(),
    })
}
