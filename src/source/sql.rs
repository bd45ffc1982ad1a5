//! The sql method as a [`Source`]: a parallel backup of a stock PostgreSQL 15+ through SQL.
//!
//! A leader SQL session calls `pg_backup_start` and stays open (the server ends the backup if
//! it goes away); one recursive `pg_ls_dir`/`pg_stat_file` query lists the data directory
//! and the tablespaces behind `pg_tblspc`, and the client leaves out what `BASE_BACKUP`
//! would ([`crate::exclusions`]); the files are spread over `--jobs` worker sessions by the
//! same planner and [`pool`] as the parallel method, each worker reading its ranges with
//! `pg_read_binary_file(path, offset, length, missing_ok => true)`, prepared once and
//! pipelined, in binary; `global/pg_control` is read last, on the leader;
//! `pg_backup_stop` hands back the stop LSN and the `backup_label`, which the session writes.
//! Since no server code checks the pages on this path, the workers verify data checksums
//! ([`crate::pagecheck`]), re-reading a failing block once before it counts.
//!
//! Directory layout, manifest entries and damaged-page lines are the parallel method's
//! ([`super::parallel`]): the listing is built in the shape of its SEND_FILE_LIST.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::fetch::{Connector, Damaged, Delivery, RangeFetcher, Request};
use super::parallel::{collect, ParallelSource};
use super::pool::{Pool, PoolConfig, Throttle};
use crate::conn::sql::{Format, Reply, SqlSession};
use crate::conn::Connection;
use crate::conninfo::ConnConfig;
use crate::error::{Error, Result};
use crate::exclusions::{EntryKind, Exclusions, Root, Verdict, EXCLUDED_DIR_CONTENTS};
use crate::lsn::Lsn;
use crate::manifest::ChecksumKind;
use crate::options::{Checkpoint, Method};
use crate::pagecheck::{verify_range, BLCKSZ};
use crate::plan::{self, FileEntry, FileKind, PlanConfig, WorkUnit};
use crate::session::{Copied, Session, Source, Started, Tablespace};
use crate::sink::digest::Digests;
use crate::sink::dir::PlainDir;
use crate::sink::seam::Sink;

/// How often one worker reconnects before it gives up.
const RETRIES: u32 = 3;
/// Wait before a worker's first reconnection (doubled for each further one).
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// Bytes one `pg_read_binary_file` call reads at most: the server holds them in memory and
/// sends them as one message. A multiple of the page size, so pieces split on page bounds.
const PIECE: u64 = 1 << 20;
/// Calls in flight on one session: enough to keep the server busy while the client writes,
/// few enough that the responses waiting in memory stay small.
const WINDOW: usize = 8;
/// Bytes handed to the writer at a time (slices of a piece, without copying).
const SLICE: usize = 128 << 10;

/// The statement every worker prepares.
const READ_SQL: &str = "SELECT pg_catalog.pg_read_binary_file($1, $2, $3, true)";
const READ_STATEMENT: &str = "pgpar_read";
/// text, int8, int8.
const READ_TYPES: &[u32] = &[25, 20, 20];

/// Lists the data directory (and, through the `pg_tblspc` links, the tablespaces) in one
/// query: path, whether a directory, size, mtime. It does not descend into the directories
/// whose contents a backup skips (`$1`, by name at any depth, and the top-level `pg_wal`);
/// everything else is classified by the client. Entries that vanish while it runs have no
/// size and are dropped.
const LIST_SQL: &str = "\
WITH RECURSIVE walk(path, isdir, size, mtime) AS (
    SELECT d.name, s.isdir, s.size, s.modification
      FROM pg_catalog.pg_ls_dir('.', true, false) AS d(name),
           LATERAL pg_catalog.pg_stat_file(d.name, true) AS s
  UNION ALL
    SELECT w.path || '/' || d.name, s.isdir, s.size, s.modification
      FROM walk AS w,
           LATERAL pg_catalog.pg_ls_dir(w.path, true, false) AS d(name),
           LATERAL pg_catalog.pg_stat_file(w.path || '/' || d.name, true) AS s
     WHERE w.isdir AND w.path <> 'pg_wal'
       AND NOT regexp_replace(w.path, '^.*/', '') = ANY ($1::text[])
       AND regexp_replace(w.path, '^.*/', '') NOT LIKE 'pgsql\\_tmp%'
)
SELECT path, isdir, size, extract(epoch FROM mtime)::int8 FROM walk WHERE size IS NOT NULL";

/// Opens a session for the backup: no timeouts (a role's `idle_session_timeout` would end the
/// leader while it holds the backup open, a `statement_timeout` a long read), and the read
/// statement prepared.
async fn open_session(cfg: &ConnConfig) -> Result<SqlSession> {
    let mut sess = SqlSession::connect(cfg).await?;
    sess.query(
        "SELECT pg_catalog.set_config(name, '0', false) FROM unnest($1::text[]) AS name",
        &["{statement_timeout,idle_session_timeout,idle_in_transaction_session_timeout}"],
    )
    .await?;
    sess.prepare(READ_STATEMENT, READ_SQL, READ_TYPES).await?;
    Ok(sess)
}

/// The sql method; holds the running backup between its steps.
#[derive(Default)]
pub(crate) struct SqlSource {
    leader: Option<SqlSession>,
    start_lsn: Lsn,
    timeline: u32,
    /// Absolute tablespace locations by OID (in-place ones are walked as the data directory).
    tablespaces: HashMap<u32, String>,
    label: Option<String>,
}

impl SqlSource {
    fn leader(&mut self) -> Result<&mut SqlSession> {
        self.leader
            .as_mut()
            .ok_or_else(|| Error::Failed("internal error: the backup has not started".into()))
    }
}

/// One row of the listing query.
struct Listed {
    path: String,
    isdir: bool,
    size: u64,
    mtime: i64,
}

/// Turns the listing into SEND_FILE_LIST's shape (see the parallel protocol notes): the data
/// directory's entries with the exclusions applied, parents before children, a tablespace
/// link as a link, a tablespace's version directory and contents with its OID.
fn entries(
    rows: Vec<Listed>,
    tablespaces: &HashMap<u32, String>,
    ex: Exclusions,
    major: u32,
) -> Vec<FileEntry> {
    let mut children: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        let parent = r.path.rsplit_once('/').map_or("", |(p, _)| p);
        children.entry(parent).or_default().push(i);
    }
    let mut out = Vec::with_capacity(rows.len());
    let version_prefix = format!("PG_{major}_");
    // (directory as listed, its root, its path relative to that root, tablespace OID)
    let mut stack: Vec<(String, Root, String, Option<u32>)> =
        vec![(String::new(), Root::DataDir, String::new(), None)];
    while let Some((dir, root, rel, spcoid)) = stack.pop() {
        let Some(kids) = children.get(dir.as_str()) else {
            continue;
        };
        let names: Vec<(&str, EntryKind)> = kids
            .iter()
            .map(|&i| {
                let r = &rows[i];
                let name = r.path.rsplit_once('/').map_or(r.path.as_str(), |(_, n)| n);
                let link = root == Root::DataDir
                    && dir == "pg_tblspc"
                    && name.parse().is_ok_and(|oid| tablespaces.contains_key(&oid));
                let kind = if link {
                    EntryKind::Symlink
                } else if r.isdir {
                    EntryKind::Dir
                } else {
                    EntryKind::File
                };
                (name, kind)
            })
            .collect();
        let verdicts = ex.classify_listing(root, &rel, &names);
        let mut subdirs = Vec::new();
        for ((&i, &(name, kind)), verdict) in kids.iter().zip(&names).zip(verdicts) {
            let r = &rows[i];
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let entry = |kind| FileEntry {
                path: r.path.clone(),
                kind,
                size: if kind == FileKind::File { r.size } else { 0 },
                mtime: r.mtime,
                link_target: None,
                spcoid,
            };
            match verdict {
                Verdict::Skip(why) => {
                    tracing::debug!("leaving out \"{}\" ({why:?})", r.path);
                }
                Verdict::EmptyDir { subdirs: empty } => {
                    out.push(entry(FileKind::Dir));
                    for sd in empty {
                        out.push(FileEntry {
                            path: format!("{}/{sd}", r.path),
                            ..entry(FileKind::Dir)
                        });
                    }
                }
                Verdict::Include | Verdict::IncludeLast => match kind {
                    EntryKind::File => out.push(entry(FileKind::File)),
                    EntryKind::Dir => {
                        out.push(entry(FileKind::Dir));
                        subdirs.push((r.path.clone(), root, child_rel, spcoid));
                    }
                    EntryKind::Symlink => {
                        let oid: u32 = name.parse().expect("checked above");
                        out.push(FileEntry {
                            link_target: tablespaces.get(&oid).cloned(),
                            spcoid: None,
                            ..entry(FileKind::Link)
                        });
                        // Only this server version's directory of the tablespace.
                        for &v in children.get(r.path.as_str()).into_iter().flatten() {
                            let vr = &rows[v];
                            let vname = vr.path.rsplit_once('/').map_or("", |(_, n)| n);
                            if vr.isdir && vname.starts_with(&version_prefix) {
                                out.push(FileEntry {
                                    path: vr.path.clone(),
                                    kind: FileKind::Dir,
                                    size: 0,
                                    mtime: vr.mtime,
                                    link_target: None,
                                    spcoid: Some(oid),
                                });
                                subdirs.push((
                                    vr.path.clone(),
                                    Root::Tablespace,
                                    String::new(),
                                    Some(oid),
                                ));
                            }
                        }
                    }
                },
            }
        }
        // Depth first, in listing order.
        stack.extend(subdirs.into_iter().rev());
    }
    out
}

impl SqlSource {
    async fn list(&mut self, s: &Session<'_>) -> Result<Vec<FileEntry>> {
        let prune = format!("{{{}}}", EXCLUDED_DIR_CONTENTS.join(","));
        let leader = self.leader()?;
        let rows = leader
            .query(LIST_SQL, &[&prune])
            .await
            .map_err(|e| e.context("leader: listing the data directory"))?;
        let mut listed = Vec::with_capacity(rows.len());
        for r in rows {
            listed.push(Listed {
                path: r.text(0, "path")?.to_string(),
                isdir: r.get(1) == Some("t"),
                size: r.parse(2, "file size")?,
                mtime: r.parse(3, "modification time")?,
            });
        }
        let ex = Exclusions::for_server_version_num(s.version);
        Ok(entries(listed, &self.tablespaces, ex, s.version / 10000))
    }
}

impl Source for SqlSource {
    const METHOD: Method = Method::Sql;

    async fn start(&mut self, s: &Session<'_>, _repl: &mut Connection) -> Result<Started> {
        // The read statement is for global/pg_control, read on the leader last.
        let mut leader = open_session(s.cfg)
            .await
            .map_err(|e| e.context("leader session"))?;
        s.step(&format!(
            "starting sql backup with {} worker sessions (checkpoint {}) on {}",
            s.opts.jobs,
            s.opts.checkpoint.name(),
            leader.target()
        ));
        let fast = if s.opts.checkpoint == Checkpoint::Fast {
            "true"
        } else {
            "false"
        };
        let rows = leader
            .query(
                "SELECT pg_catalog.pg_backup_start($1, $2::boolean)",
                &[&s.opts.label, fast],
            )
            .await
            .map_err(|e| e.context("leader: pg_backup_start"))?;
        let start_lsn: Lsn = rows
            .first()
            .ok_or_else(|| Error::Protocol("pg_backup_start returned no row".into()))?
            .parse(0, "start LSN")?;
        let rows = leader
            .query(
                "SELECT oid, pg_catalog.pg_tablespace_location(oid) FROM pg_catalog.pg_tablespace \
                 WHERE spcname NOT IN ('pg_default', 'pg_global')",
                &[],
            )
            .await
            .map_err(|e| e.context("leader: listing tablespaces"))?;
        let mut tablespaces = Vec::new();
        for r in rows {
            let oid: u32 = r.parse(0, "tablespace OID")?;
            let location = r.get(1).unwrap_or_default().to_string();
            if location.starts_with('/') {
                self.tablespaces.insert(oid, location.clone());
                tablespaces.push(Tablespace { oid, location });
            }
        }
        self.leader = Some(leader);
        self.start_lsn = start_lsn;
        // The leader's replication connection named the timeline just before; a primary
        // does not change it under a running backup (a standby promoted now fails at stop).
        self.timeline = s.sys.timeline;
        Ok(Started {
            start_lsn,
            timeline: s.sys.timeline,
            tablespaces,
            // pg_backup_start keeps the label until pg_backup_stop hands it over.
            backup_label: None,
        })
    }

    async fn copy(
        &mut self,
        s: &Session<'_>,
        _repl: &mut Connection,
        sink: &Arc<PlainDir>,
    ) -> Result<Copied> {
        let files = self.list(s).await?;
        let kind = s.opts.manifest_checksums;
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
        let target = self.leader()?.target().to_string();
        let control = p.control.ok_or_else(|| {
            Error::Failed(format!(
                "the listing of the data directory on {target} has no global/pg_control"
            ))
        })?;
        let listed = ParallelSource::lay_out(s, &files, &p, sink)?;
        let verify = self.verify_job(s, &files).await?;
        let progress = s.progress(p.total_bytes);
        let ticker = progress.spawn_ticker();
        let digests = Digests::new(kind);
        let (sk, dg) = (sink.clone(), digests.clone());
        let pool = Pool::new(
            listed,
            p.units,
            Box::new(move || dg.tee(sk.writer())),
            PoolConfig {
                jobs: s.opts.jobs,
                retries: RETRIES,
                retry_delay: RETRY_DELAY,
                progress: progress.clone(),
                throttle: s.opts.max_rate.map(Throttle::new),
            },
        );
        let connector = Arc::new(SqlConnector {
            cfg: s.cfg.clone(),
            verify: verify.clone(),
        });
        let leader = self.leader()?;
        // The leader sits idle meanwhile; watching it turns its end (pg_terminate_backend, a
        // server restart: the backup is over on the server) into the error at once.
        let res = tokio::select! {
            r = pool.run(connector) => r,
            e = leader.watch() => Err(e.context("leader session (it holds the backup open)")),
        };
        let res = match res {
            Ok(()) => {
                let unit = WorkUnit {
                    ranges: vec![plan::Range {
                        file: control,
                        offset: 0,
                        length: files[control].size,
                    }],
                    bytes: files[control].size,
                };
                let mut f = SqlFetcher {
                    sess: Held::Borrowed(leader),
                    verify: None,
                    side: None,
                };
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

    async fn stop(&mut self, s: &Session<'_>, _repl: &mut Connection) -> Result<(Lsn, u32)> {
        s.step("stopping the backup (pg_backup_stop)");
        let leader = self.leader()?;
        // WAL comes from the session's own stream, so waiting for the archiver would only
        // add a wait (or hang where archiving fails).
        let rows = leader
            .query(
                "SELECT lsn, labelfile FROM pg_catalog.pg_backup_stop(false)",
                &[],
            )
            .await
            .map_err(|e| e.context("leader: pg_backup_stop"))?;
        let row = rows
            .first()
            .ok_or_else(|| Error::Protocol("pg_backup_stop returned no row".into()))?;
        let stop: Lsn = row.parse(0, "stop LSN")?;
        let label = row.text(1, "backup_label")?.to_string();
        let tli = label
            .lines()
            .find_map(|l| l.strip_prefix("START TIMELINE: "))
            .and_then(|t| t.trim().parse::<u32>().ok());
        if tli.is_some_and(|t| t != self.timeline) {
            return Err(Error::Failed(format!(
                "the server's timeline changed during the backup (started on {}, label says {}): \
                 take the backup again",
                self.timeline,
                tli.unwrap_or_default()
            )));
        }
        self.label = Some(label);
        if let Some(l) = self.leader.take() {
            l.close().await;
        }
        Ok((stop, self.timeline))
    }

    fn label_at_stop(&mut self) -> Option<String> {
        self.label.take()
    }
}

impl SqlSource {
    /// What the workers need to verify page checksums, or `None` when they do not: with
    /// `--no-verify-checksums`, or on a cluster without data checksums (as BASE_BACKUP).
    async fn verify_job(
        &mut self,
        s: &Session<'_>,
        files: &[FileEntry],
    ) -> Result<Option<Arc<Verify>>> {
        if !s.opts.verify_checksums {
            return Ok(None);
        }
        let start_lsn = self.start_lsn;
        let rows = self
            .leader()?
            .query("SELECT current_setting('data_checksums')", &[])
            .await
            .map_err(|e| e.context("leader"))?;
        if rows.first().and_then(|r| r.get(0)) != Some("on") {
            return Ok(None);
        }
        let ex = Exclusions::for_server_version_num(s.version);
        let mut segments = HashMap::new();
        for f in files.iter().filter(|f| f.kind == FileKind::File) {
            let rel = match f.spcoid {
                // pg_tblspc/<oid>/PG_…/<rest>
                Some(_) => match f.path.splitn(4, '/').nth(3) {
                    Some(rest) => (Root::Tablespace, rest),
                    None => continue,
                },
                None => (Root::DataDir, f.path.as_str()),
            };
            if let Some(rf) = ex.checksummed_relation_file(rel.0, rel.1) {
                segments.insert(f.path.clone(), rf.segment);
            }
        }
        Ok(Some(Arc::new(Verify {
            start_lsn,
            segments,
        })))
    }
}

/// Page checksum verification on the workers.
struct Verify {
    start_lsn: Lsn,
    /// Relation files whose pages carry checksums, with their segment number.
    segments: HashMap<String, u32>,
}

/// Opens worker sessions.
struct SqlConnector {
    cfg: ConnConfig,
    verify: Option<Arc<Verify>>,
}

impl Connector for SqlConnector {
    type Fetcher = SqlFetcher<'static>;

    async fn connect(&self) -> Result<SqlFetcher<'static>> {
        let sess = open_session(&self.cfg).await?;
        Ok(SqlFetcher {
            sess: Held::Owned(Box::new(sess)),
            verify: self.verify.clone().map(|v| (v, self.cfg.clone())),
            side: None,
        })
    }
}

/// A session owned by a worker, or the leader's, borrowed for `global/pg_control`.
enum Held<'a> {
    Owned(Box<SqlSession>),
    Borrowed(&'a mut SqlSession),
}

impl Held<'_> {
    fn get(&mut self) -> &mut SqlSession {
        match self {
            Held::Owned(s) => s,
            Held::Borrowed(s) => s,
        }
    }
}

/// `pg_read_binary_file` over one session.
struct SqlFetcher<'a> {
    sess: Held<'a>,
    verify: Option<(Arc<Verify>, ConnConfig)>,
    /// A second session for re-reading a block that failed verification, opened when first
    /// needed: the main one has other reads in flight.
    side: Option<SqlSession>,
}

/// One call: bytes `[offset, offset + length)` of range `range`.
struct Piece {
    range: usize,
    offset: u64,
    length: u64,
    first: bool,
    last: bool,
}

impl RangeFetcher for SqlFetcher<'_> {
    async fn fetch(&mut self, ranges: &[Request<'_>], out: &mut Delivery<'_>) -> Result<()> {
        // Nothing to send means no Sync, and so no ReadyForQuery to wait for.
        if ranges.is_empty() {
            return Ok(());
        }
        let mut pieces = Vec::new();
        for (i, r) in ranges.iter().enumerate() {
            let mut off = r.offset;
            let end = r.offset + r.length;
            loop {
                let len = PIECE.min(end - off);
                pieces.push(Piece {
                    range: i,
                    offset: off,
                    length: len,
                    first: off == r.offset,
                    last: off + len == end,
                });
                off += len;
                if off >= end {
                    break;
                }
            }
        }
        let mut sent = 0usize;
        // Per range: whether it vanished, and pages that failed twice.
        let mut vanished = false;
        let mut damaged = Damaged::default();
        let mut received = 0usize;
        while received < pieces.len() {
            // Keep the window full; the Sync follows the last call.
            let sess = self.sess.get();
            let before = sent;
            while sent < pieces.len() && sent - received < WINDOW {
                let p = &pieces[sent];
                let r = &ranges[p.range];
                let (off, len) = (p.offset.to_string(), p.length.to_string());
                sess.queue_execute(
                    READ_STATEMENT,
                    &[
                        Some(r.path.as_bytes()),
                        Some(off.as_bytes()),
                        Some(len.as_bytes()),
                    ],
                    Format::Binary,
                )?;
                sent += 1;
                if sent == pieces.len() {
                    sess.queue_sync();
                }
            }
            if sent != before {
                sess.flush().await?;
            }
            // One piece's row, then its end.
            let p = &pieces[received];
            let row = match sess.next_result().await? {
                Reply::Row(_, row) => row,
                _ => {
                    return Err(Error::Protocol(
                        "pg_read_binary_file returned no row".into(),
                    ))
                }
            };
            match sess.next_result().await? {
                Reply::Done(_) => {}
                _ => {
                    return Err(Error::Protocol(
                        "pg_read_binary_file returned more than one row".into(),
                    ))
                }
            }
            received += 1;
            let r = &ranges[p.range];
            let data = row.get_bytes(0).cloned();
            if p.first {
                vanished = data.is_none();
                damaged = Damaged::default();
                if vanished {
                    out.vanished(p.range).await?;
                } else {
                    // A whole file read in one piece is as long as it now is; anything
                    // else must be as long as asked.
                    let len = match &data {
                        Some(d) if p.last => d.len() as u64,
                        _ => r.length,
                    };
                    out.begin(p.range, len).await?;
                }
            }
            if vanished {
                continue;
            }
            let mut bytes = data.unwrap_or_default();
            let whole_in_one = p.first && p.last;
            if (bytes.len() as u64) < p.length && !whole_in_one {
                // Truncated since the listing: zeros in its place, as BASE_BACKUP sends
                // (WAL replay makes the file right).
                tracing::debug!(
                    "\"{}\" was shorter than listed at {}; padding with zeros",
                    r.path,
                    p.offset
                );
                let mut v = bytes.to_vec();
                v.resize(p.length as usize, 0);
                bytes = Bytes::from(v);
            }
            if (bytes.len() as u64) > p.length {
                return Err(Error::Protocol(format!(
                    "pg_read_binary_file returned {} bytes for \"{}\" at {} where {} were asked",
                    bytes.len(),
                    r.path,
                    p.offset,
                    p.length
                )));
            }
            if let Some(bad) = self.check_pages(r.path, p.offset, &bytes).await? {
                damaged.pages += bad.len() as u32;
                damaged.blocks.extend(bad);
            }
            let mut at = 0;
            while at < bytes.len() {
                let n = SLICE.min(bytes.len() - at);
                out.data(bytes.slice(at..at + n)).await?;
                at += n;
            }
            if p.last {
                out.end(std::mem::take(&mut damaged)).await?;
            }
        }
        // The Sync's ReadyForQuery.
        match self.sess.get().next_result().await? {
            Reply::Ready => Ok(()),
            _ => Err(Error::Protocol(
                "pg_read_binary_file returned more rows than asked".into(),
            )),
        }
    }

    async fn close(self) {
        if let Held::Owned(s) = self.sess {
            s.close().await;
        }
        if let Some(s) = self.side {
            s.close().await;
        }
    }
}

impl SqlFetcher<'_> {
    /// Verifies the pages of `bytes` (at `offset` of `path`) when `path` is a relation file
    /// and verification is on; a failing block is read again once (it may have been read
    /// while being written), and the blocks that fail twice are returned.
    async fn check_pages(
        &mut self,
        path: &str,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Option<Vec<u32>>> {
        let Some((verify, cfg)) = &self.verify else {
            return Ok(None);
        };
        let Some(&segment) = verify.segments.get(path) else {
            return Ok(None);
        };
        let check = verify_range(segment, offset, bytes, verify.start_lsn);
        if check.bad.is_empty() {
            return Ok(None);
        }
        let start_lsn = verify.start_lsn;
        if self.side.is_none() {
            self.side = Some(open_session(cfg).await?);
        }
        let side = self.side.as_mut().expect("opened above");
        let mut bad = Vec::new();
        for b in check.bad {
            let at = u64::from(b.block_in_file) * BLCKSZ as u64;
            let (off, len) = (at.to_string(), BLCKSZ.to_string());
            side.queue_execute(
                READ_STATEMENT,
                &[
                    Some(path.as_bytes()),
                    Some(off.as_bytes()),
                    Some(len.as_bytes()),
                ],
                Format::Binary,
            )?;
            side.queue_sync();
            side.flush().await?;
            let mut again = None;
            loop {
                match side.next_result().await? {
                    Reply::Row(_, row) => again = row.get_bytes(0).cloned(),
                    Reply::Done(_) => {}
                    Reply::Ready => break,
                }
            }
            let still_bad = match again {
                // Gone or shortened since: WAL replay accounts for it.
                None => false,
                Some(page) if page.len() < BLCKSZ => false,
                Some(page) => !verify_range(segment, at, &page, start_lsn).bad.is_empty(),
            };
            if still_bad {
                bad.push(b.block_in_file);
            }
        }
        Ok(Some(bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: &str, isdir: bool, size: u64) -> Listed {
        Listed {
            path: path.into(),
            isdir,
            size,
            mtime: 1,
        }
    }

    /// The listing as the recursive query returns it (breadth first, not sorted).
    fn listing() -> Vec<Listed> {
        vec![
            row("base", true, 0),
            row("global", true, 0),
            row("pg_wal", true, 0),
            row("pg_tblspc", true, 0),
            row("pg_stat_tmp", true, 0),
            row("postmaster.pid", false, 80),
            row("PG_VERSION", false, 3),
            row("base/5", true, 0),
            row("global/pg_control", false, 8192),
            row("global/1262", false, 8192),
            row("pg_tblspc/16400", true, 0),
            row("base/5/16384", false, 8192),
            row("base/5/16384_init", false, 0),
            row("base/5/16390", false, 16384),
            row("base/5/t3_16391", false, 8192),
            row("base/5/pg_internal.init", false, 100),
            row("pg_tblspc/16400/PG_15_202209061", true, 0),
            row("pg_tblspc/16400/PG_14_202107181", true, 0),
            row("pg_tblspc/16400/PG_15_202209061/5", true, 0),
            row("pg_tblspc/16400/PG_14_202107181/5", true, 0),
            row("pg_tblspc/16400/PG_15_202209061/5/16500", false, 8192),
            row("pg_tblspc/16400/PG_15_202209061/5/16500_vm", false, 8192),
            row("pg_tblspc/16400/PG_14_202107181/5/1", false, 8192),
        ]
    }

    #[test]
    fn the_listing_takes_send_file_lists_shape_with_base_backups_exclusions() {
        let ts: HashMap<u32, String> = [(16400, "/srv/ts".to_string())].into();
        let got = entries(listing(), &ts, Exclusions::new(15), 15);
        let paths: Vec<(&str, FileKind, Option<u32>)> = got
            .iter()
            .map(|f| (f.path.as_str(), f.kind, f.spcoid))
            .collect();
        let d = FileKind::Dir;
        let f = FileKind::File;
        assert_eq!(
            paths,
            [
                ("base", d, None),
                ("global", d, None),
                ("pg_wal", d, None),
                ("pg_wal/archive_status", d, None),
                ("pg_tblspc", d, None),
                ("pg_stat_tmp", d, None),
                ("PG_VERSION", f, None),
                ("base/5", d, None),
                ("base/5/16384_init", f, None),
                ("base/5/16390", f, None),
                ("global/pg_control", f, None),
                ("global/1262", f, None),
                ("pg_tblspc/16400", FileKind::Link, None),
                ("pg_tblspc/16400/PG_15_202209061", d, Some(16400)),
                ("pg_tblspc/16400/PG_15_202209061/5", d, Some(16400)),
                ("pg_tblspc/16400/PG_15_202209061/5/16500", f, Some(16400)),
                ("pg_tblspc/16400/PG_15_202209061/5/16500_vm", f, Some(16400)),
            ]
        );
        let link = got.iter().find(|f| f.kind == FileKind::Link).unwrap();
        assert_eq!(link.link_target.as_deref(), Some("/srv/ts"));
        // Every entry's parent comes before it.
        for (i, e) in got.iter().enumerate() {
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                assert!(
                    got[..i].iter().any(|p| p.path == parent),
                    "{} before its parent",
                    e.path
                );
            }
        }
        let plan = plan::plan(&got, PlanConfig::default());
        assert_eq!(got[plan.control.unwrap()].path, "global/pg_control");
    }

    #[test]
    fn an_in_place_tablespace_is_walked_as_part_of_the_data_directory() {
        let rows = vec![
            row("pg_tblspc", true, 0),
            row("pg_tblspc/16400", true, 0),
            row("pg_tblspc/16400/PG_15_202209061", true, 0),
            row("pg_tblspc/16400/PG_15_202209061/5", true, 0),
            row("pg_tblspc/16400/PG_15_202209061/5/16500", false, 8192),
            row("pg_tblspc/16400/PG_15_202209061/5/t4_16501", false, 8192),
        ];
        let got = entries(rows, &HashMap::new(), Exclusions::new(15), 15);
        let paths: Vec<(&str, FileKind, Option<u32>)> = got
            .iter()
            .map(|f| (f.path.as_str(), f.kind, f.spcoid))
            .collect();
        assert_eq!(
            paths,
            [
                ("pg_tblspc", FileKind::Dir, None),
                ("pg_tblspc/16400", FileKind::Dir, None),
                ("pg_tblspc/16400/PG_15_202209061", FileKind::Dir, None),
                ("pg_tblspc/16400/PG_15_202209061/5", FileKind::Dir, None),
                (
                    "pg_tblspc/16400/PG_15_202209061/5/16500",
                    FileKind::File,
                    None
                ),
            ]
        );
    }
}
