//! The parallel method: START_BACKUP on the leader, SEND_FILE_LIST, directories and links
//! first, the files spread over `--jobs` worker connections (see [`crate::plan`] and
//! [`super::worker`]), `global/pg_control` last on the leader, STOP_BACKUP with the
//! backup_label, then backup_label, tablespace_map and a manifest built here.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;

use super::worker::{fetch_unit, run_worker, FileResult, Shared, Throttle, Writer};
use super::{finalize, prepare_tablespaces, Checkpoint, Cleanup, Ctx, Summary, WalSlot};
use crate::conn::Connection;
use crate::error::{Error, Result};
use crate::manifest::{crc32c_bytes, wal_ranges, ChecksumKind, ManifestBuilder};
use crate::plan::{self, FileKind, PlanConfig, WorkUnit};
use crate::progress::Progress;
use crate::replication::parallel::{send_file_list, start_backup, stop_backup, StartInfo};
use crate::replication::timeline_history;
use crate::sink::plain::{make_dir, safe_relative};

/// Where each listed entry goes locally: tablespace entries (`pg_tblspc/<oid>/…`) go straight
/// into the mapped tablespace directory, everything else under the backup directory.
fn local_paths(
    ctx: &Ctx<'_>,
    files: &[plan::FileEntry],
    ts_local: &HashMap<u32, PathBuf>,
) -> Result<Vec<PathBuf>> {
    files
        .iter()
        .map(|f| {
            safe_relative(&f.path)?;
            if let (Some(oid), FileKind::Dir | FileKind::File) = (f.spcoid, f.kind) {
                let prefix = format!("pg_tblspc/{oid}/");
                let rest = f.path.strip_prefix(&prefix).ok_or_else(|| {
                    Error::Protocol(format!(
                        "\"{}\" is listed in tablespace {oid} but not under {prefix}",
                        f.path
                    ))
                })?;
                let root = ts_local.get(&oid).ok_or_else(|| {
                    Error::Protocol(format!("\"{}\" names unknown tablespace {oid}", f.path))
                })?;
                Ok(root.join(rest))
            } else {
                Ok(ctx.dir.join(&f.path))
            }
        })
        .collect()
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

struct Transferred {
    start: StartInfo,
    stop: crate::lsn::Lsn,
    stop_tli: u32,
    files: Vec<plan::FileEntry>,
    local: Vec<PathBuf>,
    results: Vec<FileResult>,
    ts_dirs: Vec<PathBuf>,
    bytes: u64,
}

/// Runs the parallel method.
pub(crate) async fn run(
    ctx: &Ctx<'_>,
    mut leader: Connection,
    wal: WalSlot,
    cleanup: &mut Cleanup,
) -> Result<Summary> {
    let args = ctx.args;
    if args.progress.is_some() {
        eprintln!(
            "pgpar: starting parallel backup with {} workers (checkpoint {}) on {}",
            args.jobs,
            args.checkpoint.name(),
            leader.target()
        );
    }
    let start = start_backup(
        &mut leader,
        &args.label,
        args.checkpoint == Checkpoint::Fast,
    )
    .await?;
    let mut wal = wal.start(ctx, start.timeline, start.start_lsn)?;
    let t = tokio::select! {
        r = transfer(ctx, &mut leader, start, cleanup) => r?,
        e = wal.failed() => return Err(e),
    };
    let walres = wal.finish(t.stop, args.progress.is_some()).await?;

    // backup_label and tablespace_map (with the mapped locations: plain format makes the
    // links itself, and the server re-creates links from this file when it starts).
    let mut extra: Vec<(&str, Vec<u8>)> =
        vec![("backup_label", t.start.backup_label.clone().into_bytes())];
    let ts_map: String = t
        .start
        .tablespaces
        .iter()
        .filter_map(|ts| {
            let loc = ts.location.as_deref()?;
            Some(format!(
                "{} {}\n",
                ts.oid?,
                map_escape(&ctx.map.map(Path::new(loc)).display().to_string())
            ))
        })
        .collect();
    if !ts_map.is_empty() {
        extra.push(("tablespace_map", ts_map.into_bytes()));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let kind = args.manifest_checksums;
    let mut mb = ManifestBuilder::new(
        (ctx.version >= 170000).then_some(ctx.sys.system_identifier),
        kind,
    );
    for (name, content) in &extra {
        let p = ctx.dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, content))
            .map_err(|e| Error::io(format!("could not write \"{}\"", p.display()), e))?;
        mb.add_file(
            name.as_bytes(),
            content.len() as u64,
            now,
            &kind.digest(content),
        );
    }
    let digests = file_digests(kind, &t).await?;
    let mut files_written = 0u64;
    let mut failures: Vec<String> = Vec::new();
    for (i, f) in t.files.iter().enumerate() {
        if f.kind != FileKind::File || t.results[i].missing {
            continue;
        }
        files_written += 1;
        mb.add_file(f.path.as_bytes(), f.size, f.mtime, &digests[i]);
        let r = &t.results[i];
        if r.failures > 0 {
            let mut blocks = r.blocks.clone();
            blocks.sort_unstable();
            failures.push(format!(
                "\"{}\": {} page(s), blocks {:?}",
                f.path, r.failures, blocks
            ));
        }
    }
    let history = if t.stop_tli != t.start.timeline {
        let (_, h) = timeline_history(&mut leader, t.stop_tli).await?;
        String::from_utf8_lossy(&h).into_owned()
    } else {
        String::new()
    };
    leader.close().await;
    let ranges = wal_ranges(
        t.start.start_lsn,
        t.start.timeline,
        t.stop,
        t.stop_tli,
        &history,
    );
    if !failures.is_empty() {
        // Complete and durable, but the source is damaged: no manifest, as pg_basebackup.
        for f in &failures {
            eprintln!("pgpar: warning: data checksum verification failed in {f}");
        }
        let pages: u64 = t.results.iter().map(|r| r.failures as u64).sum();
        if !args.no_sync {
            let mut roots = vec![ctx.dir.clone()];
            roots.extend(t.ts_dirs.iter().cloned());
            tokio::task::spawn_blocking(move || crate::durable::sync_trees(&roots, 8))
                .await
                .map_err(|e| Error::Failed(format!("sync task failed: {e}")))??;
        }
        return Err(Error::DataChecksums(format!(
            "{pages} data page(s) in {} file(s) failed checksum verification on the server (listed above); \
             the source cluster is damaged (use --no-verify-checksums to take the backup anyway)",
            failures.len()
        )));
    }
    finalize(ctx, t.ts_dirs.clone(), Some(mb.finish(&ranges))).await?;
    Ok(Summary {
        method: "parallel",
        backup_dir: ctx.dir.display().to_string(),
        bytes: t.bytes,
        files: files_written,
        seconds: 0.0,
        mb_per_s: 0.0,
        start_lsn: t.start.start_lsn.to_string(),
        stop_lsn: t.stop.to_string(),
        timeline: t.stop_tli,
        wal_segments: walres.segments.len(),
        jobs: args.jobs,
        peak_rss_mb: None,
    })
}

/// The manifest digest of every file: CRC-32C combined from the ranges, or SHA-2 by reading
/// the written files back (in parallel) since SHA-2 cannot be combined.
async fn file_digests(kind: ChecksumKind, t: &Transferred) -> Result<Vec<Vec<u8>>> {
    let n = t.files.len();
    let mut out = vec![Vec::new(); n];
    let mut reread = Vec::new();
    for (i, f) in t.files.iter().enumerate() {
        if f.kind != FileKind::File || t.results[i].missing {
            continue;
        }
        match kind {
            ChecksumKind::None => {}
            ChecksumKind::Crc32c => {
                let mut ranges = t.results[i].ranges.clone();
                ranges.sort_unstable();
                let mut crc = 0u32;
                let mut next = 0u64;
                for (off, len, c) in ranges {
                    if off != next {
                        return Err(Error::Failed(format!(
                            "\"{}\": bytes {next}..{off} never arrived",
                            f.path
                        )));
                    }
                    crc = crc32c::crc32c_combine(crc, c, len as usize);
                    next += len;
                }
                if next != f.size {
                    return Err(Error::Failed(format!(
                        "\"{}\": {next} of {} bytes arrived",
                        f.path, f.size
                    )));
                }
                out[i] = crc32c_bytes(crc);
            }
            _ => reread.push(i),
        }
    }
    if !reread.is_empty() {
        let paths: Vec<(usize, PathBuf)> = reread
            .into_iter()
            .map(|i| (i, t.local[i].clone()))
            .collect();
        let got = tokio::task::spawn_blocking(move || -> Result<Vec<(usize, Vec<u8>)>> {
            let queue = Mutex::new(paths);
            let res = Mutex::new(Vec::new());
            let err = Mutex::new(None);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| loop {
                        let Some((i, p)) = queue.lock().expect("lock").pop() else {
                            break;
                        };
                        match std::fs::read(&p) {
                            Ok(d) => res.lock().expect("lock").push((i, kind.digest(&d))),
                            Err(e) => {
                                err.lock().expect("lock").get_or_insert(Error::io(
                                    format!("could not read \"{}\"", p.display()),
                                    e,
                                ));
                                break;
                            }
                        }
                    });
                }
            });
            match err.into_inner().expect("lock") {
                Some(e) => Err(e),
                None => Ok(res.into_inner().expect("lock")),
            }
        })
        .await
        .map_err(|e| Error::Failed(format!("checksum task failed: {e}")))??;
        for (i, d) in got {
            out[i] = d;
        }
    }
    Ok(out)
}

async fn transfer(
    ctx: &Ctx<'_>,
    leader: &mut Connection,
    start: StartInfo,
    cleanup: &mut Cleanup,
) -> Result<Transferred> {
    let args = ctx.args;
    let files = send_file_list(leader, &start.backup_id).await?;
    // Tablespace directories, checked empty (or created) before anything is written.
    let ts: Vec<(u32, &str)> = start
        .tablespaces
        .iter()
        .filter_map(|t| Some((t.oid?, t.location.as_deref()?)))
        .collect();
    let ts_dirs = prepare_tablespaces(ctx, ts.iter().map(|(_, l)| *l), cleanup)?;
    let ts_local: HashMap<u32, PathBuf> = ts
        .iter()
        .map(|(o, _)| *o)
        .zip(ts_dirs.iter().cloned())
        .collect();
    let local = local_paths(ctx, &files, &ts_local)?;

    let p = plan::plan(
        &files,
        PlanConfig {
            chunk_size: ctx.chunk_size,
            ..Default::default()
        },
    );
    // Directories first, then links, then empty files.
    for &i in &p.dirs {
        make_dir(&local[i], 0o700)?;
    }
    for &i in &p.links {
        let f = &files[i];
        let target = ctx
            .map
            .map(Path::new(f.link_target.as_deref().unwrap_or_default()));
        std::os::unix::fs::symlink(&target, &local[i]).map_err(|e| {
            Error::io(
                format!(
                    "could not create symbolic link \"{}\" -> \"{}\"",
                    local[i].display(),
                    target.display()
                ),
                e,
            )
        })?;
    }
    for &i in &p.empty {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&local[i])
            .map_err(|e| {
                Error::io(
                    format!("could not create file \"{}\"", local[i].display()),
                    e,
                )
            })?;
    }
    let control = p
        .control
        .ok_or_else(|| Error::Protocol("SEND_FILE_LIST did not list global/pg_control".into()))?;
    let progress = Progress::new(args.progress, p.total_bytes);
    let ticker = progress.spawn_ticker();
    let shared = Arc::new(Shared {
        results: Mutex::new(vec![FileResult::default(); files.len()]),
        files,
        local,
        queue: Mutex::new(p.units),
        backup_id: start.backup_id.clone(),
        verify: !args.no_verify_checksums,
        progress: progress.clone(),
        throttle: ctx.max_rate.map(Throttle::new),
        stop: AtomicBool::new(false),
    });

    let mut set = JoinSet::new();
    for id in 0..args.jobs {
        set.spawn(run_worker(id + 1, ctx.cfg.clone(), shared.clone()));
    }
    while let Some(r) = set.join_next().await {
        let r = r.map_err(|e| Error::Failed(format!("worker task failed: {e}")))?;
        if let Err(e) = r {
            set.abort_all();
            if let Some(t) = ticker {
                t.abort();
            }
            return Err(e);
        }
    }
    let left = shared.queue.lock().expect("queue lock").len();
    if left > 0 {
        return Err(Error::Failed(format!(
            "{left} work units were left unfetched"
        )));
    }

    // pg_control after every other file, on the leader.
    let unit = WorkUnit {
        ranges: vec![plan::Range {
            file: control,
            offset: 0,
            length: shared.files[control].size,
        }],
        bytes: shared.files[control].size,
    };
    let writer = Writer::spawn(shared.clone());
    let res = fetch_unit(leader, &shared, &unit, &writer).await;
    writer.close().await?;
    res.map_err(|(e, _)| e.context("could not fetch global/pg_control"))?;
    if let Some(t) = ticker {
        t.abort();
    }
    progress.finish();

    let (stop, stop_tli) = stop_backup(leader, &start.backup_label).await?;
    let shared =
        Arc::try_unwrap(shared).map_err(|_| Error::Failed("workers still running".into()))?;
    let results = shared.results.into_inner().expect("results lock");
    // Files dropped since the listing are not part of the backup.
    for (i, r) in results.iter().enumerate() {
        if r.missing {
            tracing::info!(
                "\"{}\" was removed on the server after the listing; it is not part of the backup (WAL replay accounts for it)",
                shared.files[i].path
            );
            let _ = std::fs::remove_file(&shared.local[i]);
        }
    }
    let bytes = progress.done();
    Ok(Transferred {
        start,
        stop,
        stop_tli,
        files: shared.files,
        local: shared.local,
        results,
        ts_dirs,
        bytes,
    })
}
