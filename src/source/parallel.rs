//! The parallel method as a [`Source`]: START_BACKUP on the leader, SEND_FILE_LIST,
//! directories and links into the sink first, the files spread over `--jobs` workers (the
//! [`crate::plan`] and the [`pool`]), `global/pg_control` last on the leader, STOP_BACKUP
//! with the backup_label. It hands the session the list of files for the manifest, their
//! checksums taken as the bytes passed (the manifest tee), and the damaged pages; what they
//! mean is the session's business.

use std::sync::Arc;
use std::time::Duration;

use super::content::{ContentConnector, LeaderFetcher};
use super::pool::{self, Listed, Pool, PoolConfig, Throttle};
use crate::conn::Connection;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::manifest::ChecksumKind;
use crate::options::{Checkpoint, Method};
use crate::plan::{self, PlanConfig, WorkUnit};
use crate::replication::parallel::{
    send_file_list, start_backup, stop_backup, FileEntry, FileKind, StartInfo,
};
use crate::session::{
    Copied, Damage, ManifestFile, ManifestPart, Session, Source, Started, Tablespace,
};
use crate::sink::digest::Digests;
use crate::sink::dir::PlainDir;
use crate::sink::seam::{Entry, Kind, Root, Sink};

/// How often one worker reconnects before it gives up.
const RETRIES: u32 = 3;
/// Wait before a worker's first reconnection (doubled for each further one).
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// The parallel method; holds the running backup between its steps.
#[derive(Default)]
pub(crate) struct ParallelSource {
    start: Option<StartInfo>,
}

/// Where a listed entry goes: tablespace entries (`pg_tblspc/<oid>/…`) under their
/// tablespace's root, everything else under the data directory.
fn place(f: &FileEntry) -> Result<(Root, &str)> {
    match (f.spcoid, f.kind) {
        (Some(oid), FileKind::Dir | FileKind::File) => {
            let prefix = format!("pg_tblspc/{oid}/");
            let rest = f.path.strip_prefix(&prefix).ok_or_else(|| {
                Error::Protocol(format!(
                    "\"{}\" is listed in tablespace {oid} but not under {prefix}",
                    f.path
                ))
            })?;
            Ok((Root::Tablespace(oid), rest))
        }
        _ => Ok((Root::Data, &f.path)),
    }
}

impl ParallelSource {
    fn info(&self) -> Result<&StartInfo> {
        self.start
            .as_ref()
            .ok_or_else(|| Error::Failed("internal error: the backup has not started".into()))
    }

    /// Lays down directories and links, registers every file with the sink (creating the
    /// empty ones), and returns the listing as the pool needs it. Entries get the server's
    /// permission bits where SEND_FILE_LIST gives them (the sink keeps them within the
    /// owner's and group's), else the cluster's.
    pub(super) fn lay_out(
        s: &Session<'_>,
        files: &[FileEntry],
        p: &plan::Plan,
        sink: &PlainDir,
    ) -> Result<Vec<Listed>> {
        let dir_mode = s.cluster_mode;
        for &i in p.dirs.iter().chain(&p.links) {
            let f = &files[i];
            let (root, path) = place(f)?;
            let kind = if f.kind == FileKind::Dir {
                Kind::Dir
            } else {
                Kind::Symlink
            };
            sink.entry(&Entry {
                root,
                path,
                kind,
                mode: f.mode.unwrap_or(dir_mode),
                link: f.link_target.as_deref().unwrap_or_default(),
            })?;
        }
        let mut listed = Vec::with_capacity(files.len());
        for f in files {
            let id = match f.kind {
                FileKind::File => {
                    let (root, path) = place(f)?;
                    sink.entry(&Entry {
                        root,
                        path,
                        kind: Kind::File,
                        mode: f.mode.unwrap_or_else(|| s.file_mode()),
                        link: "",
                    })?
                }
                _ => None,
            };
            listed.push(Listed {
                path: f.path.clone(),
                size: f.size,
                id,
            });
        }
        let mut w = sink.writer();
        for &i in &p.empty {
            if let Some(id) = listed[i].id {
                w.begin(id, 0)?;
                w.end()?;
            }
        }
        Ok(listed)
    }
}

impl Source for ParallelSource {
    const METHOD: Method = Method::Parallel;

    async fn start(&mut self, s: &Session<'_>, leader: &mut Connection) -> Result<Started> {
        s.step(&format!(
            "starting parallel backup with {} workers (checkpoint {}) on {}",
            s.jobs,
            s.opts.checkpoint.name(),
            leader.target()
        ));
        let info =
            start_backup(leader, &s.opts.label, s.opts.checkpoint == Checkpoint::Fast).await?;
        let started = Started {
            start_lsn: info.start_lsn,
            timeline: info.timeline,
            tablespaces: info
                .tablespaces
                .iter()
                .filter_map(|t| {
                    Some(Tablespace {
                        oid: t.oid?,
                        location: t.location.clone()?,
                    })
                })
                .collect(),
            backup_label: Some(info.backup_label.clone()),
        };
        self.start = Some(info);
        Ok(started)
    }

    async fn copy(
        &mut self,
        s: &Session<'_>,
        leader: &mut Connection,
        sink: &Arc<PlainDir>,
    ) -> Result<Copied> {
        let backup_id = self.info()?.backup_id.clone();
        let files = send_file_list(leader, &backup_id).await?;
        let kind = s.opts.manifest_checksums;
        // A SHA-2 checksum is computed as the bytes pass, in order: such files come whole.
        let whole_files =
            !matches!(kind, ChecksumKind::None | ChecksumKind::Crc32c) || !sink.random_access();
        let p = plan::plan(
            &files,
            PlanConfig {
                chunk_size: if whole_files {
                    u64::MAX
                } else {
                    s.opts.chunk_size
                },
                ..Default::default()
            },
        );
        let control = p.control.ok_or_else(|| {
            Error::Protocol("SEND_FILE_LIST did not list global/pg_control".into())
        })?;
        let listed = Self::lay_out(s, &files, &p, sink)?;
        let progress = s.progress(p.total_bytes);
        let ticker = progress.spawn_ticker();
        let digests = Digests::new(kind);
        let (sk, dg) = (sink.clone(), digests.clone());
        let pool = Pool::new(
            listed,
            p.units,
            Box::new(move || dg.tee(sk.writer())),
            PoolConfig {
                jobs: s.jobs,
                retries: RETRIES,
                retry_delay: RETRY_DELAY,
                progress: progress.clone(),
                throttle: s.opts.max_rate.map(Throttle::new),
                stall_timeout: s.opts.stall_timeout,
                server: leader.target().to_string(),
            },
        );
        let verify = s.opts.verify_checksums;
        let res = pool
            .run(Arc::new(ContentConnector {
                cfg: s.cfg.clone(),
                backup_id: backup_id.clone(),
                verify,
            }))
            .await;
        let res = match res {
            // pg_control after every other file, on the leader.
            Ok(()) => {
                let unit = WorkUnit {
                    ranges: vec![plan::Range {
                        file: control,
                        offset: 0,
                        length: files[control].size,
                    }],
                    bytes: files[control].size,
                };
                let mut f = LeaderFetcher::new(leader, &backup_id, verify);
                pool.fetch_one(&mut f, &unit)
                    .await
                    .map_err(|e| e.context("leader"))
            }
            Err(e) => Err(e),
        };
        if let Some(t) = ticker {
            t.abort();
        }
        res?;
        progress.finish();
        collect(&files, &pool, sink, &digests, progress.done())
    }

    async fn stop(&mut self, s: &Session<'_>, leader: &mut Connection) -> Result<(Lsn, u32)> {
        let label = self.info()?.backup_label.clone();
        // STOP_BACKUP does not wait for the archive, but it waits until no connection reads
        // the backup's files: a worker pgpar abandoned as stalled keeps it waiting until its
        // walsender ends. Bounded all the same, with both causes named.
        let limit = s.opts.stall_timeout;
        let target = leader.target().to_string();
        tokio::time::timeout(limit, stop_backup(leader, &label))
            .await
            .map_err(|_| {
                Error::Failed(format!(
                    "leader: STOP_BACKUP on server {target} did not return within {} s (--stall-timeout {}): \
                     the server waits until no connection reads the backup's files (a stalled worker's walsender, \
                     see pg_stat_activity wait event ParallelBackupReaders), or the leader's connection is stalled",
                    limit.as_secs(),
                    limit.as_secs()
                ))
            })?
    }
}

/// The leader's server answered nothing to `what` for the stall timeout.
pub(crate) fn stalled_leader(target: &str, limit: Duration, what: &str) -> Error {
    Error::Failed(format!(
        "leader: the server {target} answered nothing to {what} for {} s: its walsender or the network is stalled (--stall-timeout {})",
        limit.as_secs(),
        limit.as_secs()
    ))
}

/// What the pool's outcomes mean for the manifest: vanished files leave the backup, the
/// others get their real size and the checksum taken as they passed; damaged pages are
/// described for the session's policy.
pub(super) fn collect(
    files: &[FileEntry],
    pool: &Pool,
    sink: &PlainDir,
    digests: &Digests,
    bytes: u64,
) -> Result<Copied> {
    let outcomes = pool.outcomes();
    let mut manifest = Vec::new();
    let mut lines = Vec::new();
    let mut pages = 0u64;
    for (i, f) in files.iter().enumerate() {
        let Some(id) = pool.files()[i].id else {
            continue;
        };
        let o: &pool::FileOutcome = &outcomes[i];
        if o.vanished {
            tracing::info!(
                "\"{}\" was removed on the server after the listing; it is not part of the backup (WAL replay accounts for it)",
                f.path
            );
            sink.remove(id)?;
            continue;
        }
        let size = match o.real_length {
            Some(len) => {
                sink.set_len(id, len)?;
                len
            }
            None => f.size,
        };
        manifest.push(ManifestFile {
            path: f.path.clone(),
            size,
            mtime: f.mtime,
            checksum: digests.file_digest(id, size, &f.path)?,
        });
        if o.damaged.pages > 0 {
            let mut blocks = o.damaged.blocks.clone();
            blocks.sort_unstable();
            let blocks: Vec<String> = blocks.iter().map(u32::to_string).collect();
            lines.push(format!(
                "\"{}\": {} page(s), blocks {}",
                f.path,
                o.damaged.pages,
                blocks.join(", ")
            ));
            pages += u64::from(o.damaged.pages);
        }
    }
    Ok(Copied {
        files: manifest.len() as u64,
        manifest: ManifestPart::Files(manifest),
        damage: (!lines.is_empty()).then_some(Damage::Files { lines, pages }),
        bytes,
    })
}
