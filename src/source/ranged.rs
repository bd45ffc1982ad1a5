//! What the methods that fetch files range by range over N connections share around the
//! worker pool ([`pool`]): the listed files planned over the workers ([`crate::plan`]),
//! directories and links laid down in the sink first and every file registered with it, the
//! pool run with the method's [`Connector`], `global/pg_control` fetched last on the leader,
//! and the pool's outcomes turned into the manifest part and the damaged pages
//! ([`Ranged::finish`]). The parallel and sql methods differ only in how they list files,
//! their connectors, and the leader's fetcher; this module must not know either protocol.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use super::fetch::{Connector, RangeFetcher};
use super::pool::{self, Listed, Pool, PoolConfig, Throttle};
use crate::error::{Error, Result};
use crate::manifest::ChecksumKind;
use crate::plan::{self, FileEntry, FileKind, PlanConfig, WorkUnit};
use crate::progress::Progress;
use crate::relpath::RelPath;
use crate::session::{Copied, Damage, ManifestFile, ManifestPart, Session};
use crate::sink::digest::Digests;
use crate::sink::dir::PlainDir;
use crate::sink::seam::{Entry, Kind, Root, Sink};

/// How often one worker reconnects before it gives up.
const RETRIES: u32 = 3;
/// Wait before a worker's first reconnection (doubled for each further one).
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// One ranged copy under way: the plan laid out in the sink, the pool that runs it, and the
/// progress and checksums that follow its bytes.
pub(super) struct Ranged<'f> {
    files: &'f [FileEntry],
    control: usize,
    pool: Arc<Pool>,
    progress: Progress,
    ticker: Option<tokio::task::JoinHandle<()>>,
    digests: Arc<Digests>,
}

impl<'f> Ranged<'f> {
    /// Plans `files` over `s.jobs` workers, lays them out in `sink` and makes the pool;
    /// `server` names the server in the pool's messages. A listing without
    /// `global/pg_control` is `no_control`'s error.
    pub(super) fn prepare(
        s: &Session<'_>,
        files: &'f [FileEntry],
        sink: &Arc<PlainDir>,
        server: String,
        no_control: impl FnOnce() -> Error,
    ) -> Result<Ranged<'f>> {
        let kind = s.opts.manifest_checksums;
        // A SHA-2 checksum is computed as the bytes pass, in order: such files come whole.
        let whole_files =
            !matches!(kind, ChecksumKind::None | ChecksumKind::Crc32c) || !sink.random_access();
        let p = plan::plan(
            files,
            PlanConfig {
                chunk_size: if whole_files {
                    u64::MAX
                } else {
                    s.opts.chunk_size
                },
                ..Default::default()
            },
        );
        let control = p.control.ok_or_else(no_control)?;
        let listed = lay_out(s, files, &p, sink)?;
        let progress = s.progress(p.total_bytes);
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
                server,
            },
        );
        let ticker = progress.spawn_ticker();
        Ok(Ranged {
            files,
            control,
            pool,
            progress,
            ticker,
            digests,
        })
    }

    /// Copies every file but `global/pg_control` over the workers `connector` opens.
    pub(super) async fn run<C: Connector>(&self, connector: Arc<C>) -> Result<()> {
        self.pool.run(connector).await
    }

    /// Fetches `global/pg_control` on the leader, after every other file: the copy of the
    /// control file is then at least as new as anything else in the backup.
    pub(super) async fn fetch_control<F: RangeFetcher>(&self, leader: &mut F) -> Result<()> {
        let size = self.files[self.control].size;
        let unit = WorkUnit {
            ranges: vec![plan::Range {
                file: self.control,
                offset: 0,
                length: size,
            }],
            bytes: size,
        };
        self.pool
            .fetch_one(leader, &unit)
            .await
            .map_err(|e| e.context("leader"))
    }

    /// Ends the copy with `res`, what the workers and the leader's fetch came to: the
    /// files for the manifest, their checksums, the damaged pages.
    pub(super) fn finish(self, res: Result<()>, sink: &PlainDir) -> Result<Copied> {
        if let Some(t) = self.ticker {
            t.abort();
        }
        res?;
        self.progress.finish();
        collect(
            self.files,
            &self.pool,
            sink,
            &self.digests,
            self.progress.done(),
        )
    }
}

/// Where a listed entry goes: tablespace entries (`pg_tblspc/<oid>/…`) under their
/// tablespace's root, everything else under the data directory.
fn place(f: &FileEntry) -> Result<(Root, Cow<'_, RelPath>)> {
    match (f.spcoid, f.kind) {
        (Some(oid), FileKind::Dir | FileKind::File) => {
            let prefix = format!("pg_tblspc/{oid}/");
            let rest = f.path.strip_prefix(prefix.as_bytes()).ok_or_else(|| {
                Error::Protocol(format!(
                    "\"{}\" is listed in tablespace {oid} but not under {prefix}",
                    f.path
                ))
            })?;
            Ok((Root::Tablespace(oid), Cow::Owned(rest)))
        }
        _ => Ok((Root::Data, Cow::Borrowed(&f.path))),
    }
}

/// Lays down directories and links, registers every file with the sink (creating the
/// empty ones), and returns the listing as the pool needs it. Entries get the server's
/// permission bits where SEND_FILE_LIST gives them (the sink keeps them within the
/// owner's and group's), else the cluster's.
fn lay_out(
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
            path: &path,
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
                    path: &path,
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

/// What the pool's outcomes mean for the manifest: vanished files leave the backup, the
/// others get their real size and the checksum taken as they passed; damaged pages are
/// described for the session's policy.
fn collect(
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
