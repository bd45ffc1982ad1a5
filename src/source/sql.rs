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

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::fetch::{Connector, Damaged, Delivery, RangeFetcher, Request};
use super::ranged::Ranged;
use crate::conn::sql::{Format, Reply, SqlSession};
use crate::conn::Connection;
use crate::conninfo::ConnConfig;
use crate::error::{Error, Result};
use crate::exclusions::{EntryKind, Exclusions, Root, Verdict, EXCLUDED_DIR_CONTENTS};
use crate::lsn::Lsn;
use crate::options::{Checkpoint, Method};
use crate::pagecheck::{verify_range, BLCKSZ};
use crate::plan::{FileEntry, FileKind};
use crate::relpath::RelPath;
use crate::session::{Copied, Session, Source, Started, Tablespace};
use crate::sink::dir::PlainDir;

/// Bytes one `pg_read_binary_file` call reads at most. A multiple of the page size, so pieces
/// split on page bounds. Small on purpose: the server builds each result in memory three
/// times over (the bytea read, `byteasend`'s copy, the row's buffer); pieces of 1 MiB put
/// those above the C library's mmap threshold, so every call mapped, faulted in and zeroed
/// fresh memory (page faults were the backends' top cost in `perf`). Measured on the
/// patched 17 (-j 4, cold cache, same runs): 32 KiB beat 64 KiB, 64 KiB beat 1 MiB, and
/// 16 KiB was slower again (the cost of each call starts to show).
const PIECE: u64 = 32 << 10;
/// Calls in flight on one session (8 MiB of responses at most): enough to keep the server
/// busy while the client verifies and writes.
const WINDOW: usize = 256;
/// The window is refilled this many calls at a time, in one write. Refilling call by call
/// wrote one small message per response read; each takes a socket buffer's worth of
/// overhead, and with a large window the client's write blocked while the server's did too
/// (each waiting for the other to read): a deadlock. In batches, what the client has sent
/// and the server not yet read stays a few writes of a few kB.
const REFILL: usize = WINDOW / 2;
/// Bytes handed to the writer at a time (slices of a piece, without copying): the size of
/// the parallel method's CopyData messages, so the pool's bounded write queue holds as much
/// (a piece stays in memory while any slice of it waits there).
const SLICE: usize = 32 << 10;

/// The `backup_label` written before any data, replaced by the server's at the end. A server
/// refuses to start from it ("invalid data in file \"backup_label\""), as it must from a copy
/// that was interrupted, even after `global/pg_control` was copied.
pub(crate) const INCOMPLETE_LABEL: &str =
    "INCOMPLETE BACKUP: pgpar was still copying this directory \
     (the sql method writes the real backup_label last); it is not a usable backup\n";

/// The statement every worker prepares.
const READ_SQL: &str = "SELECT pg_catalog.pg_read_binary_file($1, $2, $3, true)";
const READ_STATEMENT: &str = "pgpar_read";
/// text, int8, int8.
const READ_TYPES: &[u32] = &[25, 20, 20];

/// The read of a file whose name the server would refuse as a text parameter (one that is not
/// valid in the database's encoding, such as `caf\xe9` in a UTF8 database: the server checks
/// every text value a client sends, but not the names `pg_ls_dir` returns). From the
/// directory `$4` (text, the part of the path the server accepts), each further component
/// is found by its bytes (`$1`, one bytea per component) in its parent's listing, and the
/// path thus built on the server is read; NULL when a component is not there (the file
/// vanished). `textsend` gives a name's bytes as they are: the session's client_encoding is
/// SQL_ASCII, so the server converts nothing.
const READ_BY_NAME_SQL: &str = "\
SELECT (WITH RECURSIVE p(path, n) AS (
    SELECT $4::text, 0
  UNION ALL
    SELECT p.path || '/' || f, p.n + 1
      FROM p, LATERAL pg_catalog.pg_ls_dir(p.path, true, false) AS f
     WHERE p.n < pg_catalog.cardinality($1::bytea[])
       AND pg_catalog.textsend(f) = ($1::bytea[])[p.n + 1]
) SELECT pg_catalog.pg_read_binary_file(p.path, $2, $3, true)
    FROM p WHERE p.n = pg_catalog.cardinality($1::bytea[]) LIMIT 1)";
const READ_BY_NAME_STATEMENT: &str = "pgpar_read_by_name";
/// bytea[], int8, int8, text.
const READ_BY_NAME_TYPES: &[u32] = &[1001, 20, 20, 25];

/// Whether the server takes `name` as a text value in a database of encoding `encoding`
/// (its `server_encoding`): ASCII always, other UTF-8 in a UTF8 database. Anything else goes
/// by its bytes ([`READ_BY_NAME_SQL`]), which is right in every encoding.
fn text_accepted(name: &[u8], encoding: &str) -> bool {
    name.is_ascii() || (encoding == "UTF8" && std::str::from_utf8(name).is_ok())
}

/// Queues the read of `len` bytes of `path` at `off` on `sess`, by the plain statement where
/// the server takes the path as text, else by [`READ_BY_NAME_SQL`].
fn queue_read(sess: &mut SqlSession, path: &RelPath, off: u64, len: u64) -> Result<u64> {
    let (off, len) = (off.to_string(), len.to_string());
    // The names PostgreSQL itself writes are ASCII: no need to look at the encoding.
    let encoding = if path.as_bytes().is_ascii() {
        String::new()
    } else {
        sess.server_encoding()
    };
    if text_accepted(path.as_bytes(), &encoding) {
        return sess.queue_execute(
            READ_STATEMENT,
            &[
                Some(path.as_bytes()),
                Some(off.as_bytes()),
                Some(len.as_bytes()),
            ],
            Format::Binary,
        );
    }
    let (dir, names) = by_name(path.as_bytes(), &encoding);
    sess.queue_execute(
        READ_BY_NAME_STATEMENT,
        &[
            Some(&names),
            Some(off.as_bytes()),
            Some(len.as_bytes()),
            Some(&dir),
        ],
        Format::Binary,
    )
}

/// [`READ_BY_NAME_SQL`]'s directory (`$4`: the leading components the server takes as
/// text, `.` for none) and components (`$1`: the rest, as a bytea[] in text form).
fn by_name(path: &[u8], encoding: &str) -> (Vec<u8>, Vec<u8>) {
    let parts: Vec<&[u8]> = path.split(|&c| c == b'/').collect();
    let keep = parts
        .iter()
        .take(parts.len() - 1)
        .take_while(|p| text_accepted(p, encoding))
        .count();
    let dir = if keep == 0 {
        b".".to_vec()
    } else {
        parts[..keep].join(&b'/')
    };
    let mut names = b"{".to_vec();
    for (i, p) in parts[keep..].iter().enumerate() {
        if i > 0 {
            names.push(b',');
        }
        // An array element in double quotes, its backslash doubled: "\\xcafe".
        names.extend_from_slice(b"\"\\\\x");
        for c in *p {
            names.extend_from_slice(format!("{c:02x}").as_bytes());
        }
        names.push(b'"');
    }
    names.push(b'}');
    (dir, names)
}

/// Lists the data directory (and, through the `pg_tblspc` links, the tablespaces) in one
/// query: path, whether a directory, size, mtime. It does not descend into the directories
/// whose contents a backup skips (`$1`, by name at any depth, and the top-level `pg_wal`);
/// everything else is classified by the client. Entries that vanish while it runs have no
/// size and are dropped. A name is compared as it is (`=`, a `LIKE` prefix: bytes), never
/// through a regular expression, which would read a name that is not valid in the
/// database's encoding as other characters.
const LIST_SQL: &str = "\
WITH RECURSIVE walk(path, name, isdir, size, mtime) AS (
    SELECT d.name, d.name, s.isdir, s.size, s.modification
      FROM pg_catalog.pg_ls_dir('.', true, false) AS d(name),
           LATERAL pg_catalog.pg_stat_file(d.name, true) AS s
  UNION ALL
    SELECT w.path || '/' || d.name, d.name, s.isdir, s.size, s.modification
      FROM walk AS w,
           LATERAL pg_catalog.pg_ls_dir(w.path, true, false) AS d(name),
           LATERAL pg_catalog.pg_stat_file(w.path || '/' || d.name, true) AS s
     WHERE w.isdir AND w.path <> 'pg_wal'
       AND NOT w.name = ANY ($1::text[])
       AND w.name NOT LIKE 'pgsql\\_tmp%'
)
SELECT path, isdir, size, extract(epoch FROM mtime)::int8 FROM walk WHERE size IS NOT NULL";

/// Opens a session for the backup: no timeouts (a role's `idle_session_timeout` would end the
/// leader while it holds the backup open, a `statement_timeout` a long read), its part in the
/// backup added to `application_name` (so a DBA can tell the leader, which must not be
/// ended, from the workers in `pg_stat_activity`: "pgpar sql leader", "pgpar sql worker"),
/// and the read statement prepared.
async fn open_session(cfg: &ConnConfig, part: &str) -> Result<SqlSession> {
    let mut sess = SqlSession::connect(cfg).await?;
    sess.query(
        "SELECT pg_catalog.set_config(name, '0', false) FROM unnest($1::text[]) AS name \
         UNION ALL SELECT pg_catalog.set_config('application_name', \
             pg_catalog.left(pg_catalog.current_setting('application_name') || $2, 63), false)",
        &[
            "{statement_timeout,idle_session_timeout,idle_in_transaction_session_timeout}",
            part,
        ],
    )
    .await?;
    sess.prepare(READ_STATEMENT, READ_SQL, READ_TYPES).await?;
    sess.prepare(READ_BY_NAME_STATEMENT, READ_BY_NAME_SQL, READ_BY_NAME_TYPES)
        .await?;
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
    /// The path's bytes (the session's client_encoding is SQL_ASCII: no conversion).
    path: RelPath,
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
    let mut children: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        children.entry(r.path.split_last().0).or_default().push(i);
    }
    let mut out = Vec::with_capacity(rows.len());
    let version_prefix = format!("PG_{major}_");
    // (directory as listed, its root, its path relative to that root, tablespace OID)
    let mut stack: Vec<(RelPath, Root, RelPath, Option<u32>)> =
        vec![(RelPath::default(), Root::DataDir, RelPath::default(), None)];
    while let Some((dir, root, rel, spcoid)) = stack.pop() {
        let Some(kids) = children.get(dir.as_bytes()) else {
            continue;
        };
        // The exclusion rules match ASCII names: they read the names as (lossy) text.
        let names: Vec<(Cow<'_, str>, EntryKind)> = kids
            .iter()
            .map(|&i| {
                let r = &rows[i];
                let name = String::from_utf8_lossy(r.path.split_last().1);
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
        let as_text: Vec<(&str, EntryKind)> = names.iter().map(|(n, k)| (n.as_ref(), *k)).collect();
        let verdicts = ex.classify_listing(root, &rel.to_text_lossy(), &as_text);
        let mut subdirs = Vec::new();
        for ((&i, &(ref name, kind)), verdict) in kids.iter().zip(&names).zip(verdicts) {
            let r = &rows[i];
            let child_rel = rel.join(r.path.split_last().1);
            let entry = |kind| FileEntry {
                path: r.path.clone(),
                kind,
                size: if kind == FileKind::File { r.size } else { 0 },
                mtime: r.mtime,
                link_target: None,
                spcoid,
                // pg_stat_file() gives no permission bits: entries get the cluster's modes.
                mode: None,
            };
            match verdict {
                Verdict::Skip(why) => {
                    tracing::debug!("leaving out \"{}\" ({why:?})", r.path);
                }
                Verdict::EmptyDir { subdirs: empty } => {
                    out.push(entry(FileKind::Dir));
                    for sd in empty {
                        out.push(FileEntry {
                            path: r.path.join(sd.as_bytes()),
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
                        for &v in children.get(r.path.as_bytes()).into_iter().flatten() {
                            let vr = &rows[v];
                            let vname = vr.path.split_last().1;
                            if vr.isdir && vname.starts_with(version_prefix.as_bytes()) {
                                out.push(FileEntry {
                                    path: vr.path.clone(),
                                    kind: FileKind::Dir,
                                    size: 0,
                                    mtime: vr.mtime,
                                    link_target: None,
                                    spcoid: Some(oid),
                                    mode: None,
                                });
                                subdirs.push((
                                    vr.path.clone(),
                                    Root::Tablespace,
                                    RelPath::default(),
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
        // Rows come as the query walks the directories: silence is a stall.
        leader.set_read_limit(Some(s.opts.stall_timeout));
        let rows = leader
            .query(LIST_SQL, &[&prune])
            .await
            .map_err(|e| e.context("leader: listing the data directory"))?;
        leader.set_read_limit(None);
        let mut listed = Vec::with_capacity(rows.len());
        for r in rows {
            listed.push(Listed {
                path: RelPath::from(
                    r.get_bytes(0)
                        .ok_or_else(|| {
                            Error::Protocol("the listing has a row without a path".into())
                        })?
                        .as_ref(),
                ),
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
        let mut leader = open_session(s.cfg, " sql leader")
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
            let location = r.tablespace_location(1)?.unwrap_or_default().to_string();
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
            // pg_backup_start keeps the label until pg_backup_stop hands it over: until then
            // the backup holds one that no server starts from.
            backup_label: Some(INCOMPLETE_LABEL.to_string()),
        })
    }

    async fn copy(
        &mut self,
        s: &Session<'_>,
        _repl: &mut Connection,
        sink: &Arc<PlainDir>,
    ) -> Result<Copied> {
        let files = self.list(s).await?;
        let target = self.leader()?.target().to_string();
        let verify = self.verify_job(s, &files).await?;
        let server = s
            .cfg
            .targets
            .first()
            .map(|t| t.to_string())
            .unwrap_or_default();
        let copy = Ranged::prepare(s, &files, sink, server, || {
            Error::Failed(format!(
                "the listing of the data directory on {target} has no global/pg_control"
            ))
        })?;
        let connector = Arc::new(SqlConnector {
            cfg: s.cfg.clone(),
            verify: verify.clone(),
        });
        let leader = self.leader()?;
        // The leader sits idle meanwhile; watching it turns its end (pg_terminate_backend, a
        // server restart: the backup is over on the server) into the error at once.
        let mut res = tokio::select! {
            r = copy.run(connector) => r,
            e = leader.watch() => Err(e.context("leader session (it holds the backup open)")),
        };
        if res.is_ok() {
            let mut f = SqlFetcher {
                sess: Held::Borrowed(leader),
                verify: None,
                side: None,
            };
            res = copy.fetch_control(&mut f).await;
        }
        copy.finish(res, sink)
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
            // The rules match ASCII names (see crate::relpath).
            let text = f.path.to_text_lossy();
            let rel = match f.spcoid {
                // pg_tblspc/<oid>/PG_…/<rest>
                Some(_) => match text.splitn(4, '/').nth(3) {
                    Some(rest) => (Root::Tablespace, rest),
                    None => continue,
                },
                None => (Root::DataDir, text.as_ref()),
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
    segments: HashMap<RelPath, u32>,
}

/// Opens worker sessions.
struct SqlConnector {
    cfg: ConnConfig,
    verify: Option<Arc<Verify>>,
}

impl Connector for SqlConnector {
    type Fetcher = SqlFetcher<'static>;

    async fn connect(&self) -> Result<SqlFetcher<'static>> {
        let sess = open_session(&self.cfg, " sql worker").await?;
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

/// How many calls to send now, with `sent` of `total` sent and `received` of them answered:
/// none while fewer than [`REFILL`] more would fit in the window, else as many as fit.
fn calls_to_send(sent: usize, received: usize, total: usize) -> usize {
    let in_flight = sent - received;
    if in_flight > WINDOW - REFILL {
        return 0;
    }
    (WINDOW - in_flight).min(total - sent)
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
            // Keep the window filled, in batches; the Sync follows the last call.
            let sess = self.sess.get();
            let before = sent;
            for _ in 0..calls_to_send(sent, received, pieces.len()) {
                let p = &pieces[sent];
                queue_read(sess, ranges[p.range].path, p.offset, p.length)?;
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
                        Some(d) if p.last && r.whole => d.len() as u64,
                        _ => r.length,
                    };
                    out.begin(p.range, len).await?;
                }
            }
            if vanished {
                continue;
            }
            let mut bytes = data.unwrap_or_default();
            let whole_in_one = p.first && p.last && r.whole;
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
        path: &RelPath,
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
            self.side = Some(open_session(cfg, " sql worker").await?);
        }
        let side = self.side.as_mut().expect("opened above");
        let mut bad = Vec::new();
        for b in check.bad {
            let at = u64::from(b.block_in_file) * BLCKSZ as u64;
            queue_read(side, path, at, BLCKSZ as u64)?;
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
    use crate::plan::{self, PlanConfig};

    fn row(path: impl Into<RelPath>, isdir: bool, size: u64) -> Listed {
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
            // Names that are not UTF-8: a stray file at the top and in a tablespace, a
            // directory at the top with its contents, and a temporary directory, which is
            // left out as BASE_BACKUP leaves it out (its name starts with pgsql_tmp).
            row(&b"\xff\xfe"[..], false, 5),
            row(&b"pg_tblspc/16400/PG_15_202209061/5/caf\xe9"[..], false, 7),
            row(&b"dir\xe9"[..], true, 0),
            row(&b"dir\xe9/x"[..], false, 1),
            row(&b"base/5/pgsql_tmp\xe9"[..], true, 0),
        ]
    }

    #[test]
    fn the_listing_takes_send_file_lists_shape_with_base_backups_exclusions() {
        let ts: HashMap<u32, String> = [(16400, "/srv/ts".to_string())].into();
        let got = entries(listing(), &ts, Exclusions::new(15), 15);
        let paths: Vec<(String, FileKind, Option<u32>)> = got
            .iter()
            .map(|f| (f.path.to_string(), f.kind, f.spcoid))
            .collect();
        let paths: Vec<(&str, FileKind, Option<u32>)> =
            paths.iter().map(|(p, k, o)| (p.as_str(), *k, *o)).collect();
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
                ("\\xff\\xfe", f, None),
                ("dir\\xe9", d, None),
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
                ("pg_tblspc/16400/PG_15_202209061/5/caf\\xe9", f, Some(16400)),
                ("dir\\xe9/x", f, None),
            ]
        );
        // The bytes themselves, not their escaped form.
        assert!(got.iter().any(|e| e.path.as_bytes() == b"\xff\xfe"));
        let link = got.iter().find(|f| f.kind == FileKind::Link).unwrap();
        assert_eq!(link.link_target.as_deref(), Some("/srv/ts"));
        // Every entry's parent comes before it.
        for (i, e) in got.iter().enumerate() {
            let (parent, _) = e.path.split_last();
            if !parent.is_empty() {
                assert!(
                    got[..i].iter().any(|p| p.path.as_bytes() == parent),
                    "{} before its parent",
                    e.path
                );
            }
        }
        let plan = plan::plan(&got, PlanConfig::default());
        assert_eq!(got[plan.control.unwrap()].path, "global/pg_control");
    }

    #[test]
    fn a_name_the_server_refuses_as_text_is_read_by_its_bytes() {
        assert!(text_accepted(b"base/5/16384", "UTF8"));
        assert!(text_accepted("café".as_bytes(), "UTF8"));
        assert!(!text_accepted(b"caf\xe9", "UTF8"));
        // Other encodings: ASCII only (anything else is right by its bytes).
        assert!(!text_accepted("café".as_bytes(), "LATIN1"));
        assert!(text_accepted(b"PG_VERSION", "SQL_ASCII"));
        assert_eq!(
            by_name(b"\xff\xfe", "UTF8"),
            (b".".to_vec(), br#"{"\\xfffe"}"#.to_vec())
        );
        assert_eq!(
            by_name(b"pg_tblspc/16400/PG_15_1/5/caf\xe9", "UTF8"),
            (
                b"pg_tblspc/16400/PG_15_1/5".to_vec(),
                br#"{"\\x636166e9"}"#.to_vec()
            )
        );
        // From the first component the server would refuse on.
        assert_eq!(
            by_name(b"d\xe9/x/y", "UTF8"),
            (b".".to_vec(), br#"{"\\x64e9","\\x78","\\x79"}"#.to_vec())
        );
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
            .map(|f| (f.path.to_str().unwrap(), f.kind, f.spcoid))
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

#[cfg(test)]
mod fake_server_tests {
    //! The sql method's fetcher and the pool against a fake server below the socket: a Unix
    //! socket that accepts any role (trust), answers the extended protocol for the read
    //! statement from files in memory, and misbehaves on request.

    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::{Buf, BufMut, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};

    use super::*;
    use crate::manifest::ChecksumKind;
    use crate::pagecheck::checksum_page;
    use crate::plan::plan;
    use crate::plan::PlanConfig;
    use crate::progress::Progress;
    use crate::sink::digest::Digests;
    use crate::sink::plain::TablespaceMap;
    use crate::sink::seam::Sink;
    use crate::sink::seam::{Entry, Kind, Root as SinkRoot};
    use crate::source::pool::{Pool, PoolConfig};

    struct Files {
        files: HashMap<String, Vec<u8>>,
        /// Served once, instead of the file's bytes, for a read of (path, offset).
        first_reads: Mutex<HashMap<(String, u64), Vec<u8>>>,
        /// Reads served so far, over every connection.
        reads: AtomicUsize,
        /// End the session (FATAL, as pg_terminate_backend does) at these read counts.
        kill_at: Mutex<VecDeque<usize>>,
        connects: AtomicUsize,
        /// The most reads received on one session before a Sync: more than one means the
        /// client pipelined them.
        max_pipelined: AtomicUsize,
    }

    fn msg(out: &mut BytesMut, tag: u8, body: &[u8]) {
        out.put_u8(tag);
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(body);
    }

    fn cstr(b: &mut &[u8]) -> String {
        let n = b.iter().position(|&c| c == 0).unwrap();
        let s = String::from_utf8(b[..n].to_vec()).unwrap();
        b.advance(n + 1);
        s
    }

    async fn session(mut sock: UnixStream, files: Arc<Files>) {
        files.connects.fetch_add(1, Ordering::Relaxed);
        let len = sock.read_i32().await.unwrap();
        let mut startup = vec![0; len as usize - 4];
        sock.read_exact(&mut startup).await.unwrap();
        let mut out = BytesMut::new();
        msg(&mut out, b'R', &0i32.to_be_bytes());
        msg(&mut out, b'S', b"server_version\x0015.18\0");
        msg(&mut out, b'K', &[0, 0, 0, 7, 0, 0, 0, 9]);
        msg(&mut out, b'Z', b"I");
        sock.write_all(&out).await.unwrap();
        let mut statements: HashMap<String, String> = HashMap::new();
        let mut bound: (String, Vec<Option<Vec<u8>>>) = Default::default();
        let mut since_sync = 0;
        loop {
            let Ok(tag) = sock.read_u8().await else {
                return;
            };
            let len = sock.read_i32().await.unwrap();
            let mut body = vec![0; len as usize - 4];
            sock.read_exact(&mut body).await.unwrap();
            let mut b = &body[..];
            let mut out = BytesMut::new();
            match tag {
                b'P' => {
                    let name = cstr(&mut b);
                    statements.insert(name, cstr(&mut b));
                    msg(&mut out, b'1', b"");
                }
                b'B' => {
                    let _portal = cstr(&mut b);
                    let stmt = cstr(&mut b);
                    let nfmt = b.get_i16();
                    b.advance(2 * nfmt as usize);
                    let n = b.get_i16();
                    let mut params = Vec::new();
                    for _ in 0..n {
                        let l = b.get_i32();
                        if l < 0 {
                            params.push(None);
                        } else {
                            params.push(Some(b[..l as usize].to_vec()));
                            b.advance(l as usize);
                        }
                    }
                    let nres = b.get_i16();
                    let formats: Vec<i16> = (0..nres).map(|_| b.get_i16()).collect();
                    if statements[&stmt].contains("pg_read_binary_file") {
                        // Binary results: the bytea's bytes, never hex text.
                        assert_eq!(formats, [1], "the read must ask for binary results");
                    }
                    bound = (stmt, params);
                    msg(&mut out, b'2', b"");
                }
                b'E' if statements[&bound.0].contains("pg_read_binary_file") => {
                    let p = |i: usize| String::from_utf8(bound.1[i].clone().unwrap()).unwrap();
                    let (path, off, len) = (p(0), p(1).parse::<u64>().unwrap(), p(2));
                    let len: u64 = len.parse().unwrap();
                    let n = files.reads.fetch_add(1, Ordering::Relaxed) + 1;
                    since_sync += 1;
                    files.max_pipelined.fetch_max(since_sync, Ordering::Relaxed);
                    if files.kill_at.lock().unwrap().front() == Some(&n) {
                        files.kill_at.lock().unwrap().pop_front();
                        msg(
                            &mut out,
                            b'E',
                            b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
                        );
                        let _ = sock.write_all(&out).await;
                        return;
                    }
                    let once = files
                        .first_reads
                        .lock()
                        .unwrap()
                        .remove(&(path.clone(), off));
                    let data = once.or_else(|| {
                        files.files.get(&path).map(|f| {
                            let start = (off as usize).min(f.len());
                            let end = ((off + len) as usize).min(f.len());
                            f[start..end].to_vec()
                        })
                    });
                    let mut row = BytesMut::new();
                    row.put_i16(1);
                    match data {
                        None => row.put_i32(-1),
                        Some(d) => {
                            row.put_i32(d.len() as i32);
                            row.put_slice(&d);
                        }
                    }
                    msg(&mut out, b'D', &row);
                    msg(&mut out, b'C', b"SELECT 1\0");
                }
                b'E' => msg(&mut out, b'C', b"SELECT 3\0"),
                b'S' => {
                    since_sync = 0;
                    msg(&mut out, b'Z', b"I")
                }
                b'X' => return,
                other => panic!("the fake server got message '{}'", other as char),
            }
            if sock.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    /// A page with an LSN before any backup's start and a right checksum for `blkno`.
    fn page(blkno: u32, fill: u8) -> Vec<u8> {
        let mut p = [0u8; BLCKSZ];
        p[12..14].copy_from_slice(&40u16.to_le_bytes());
        p[14..16].copy_from_slice(&8000u16.to_le_bytes());
        p[16..18].copy_from_slice(&8192u16.to_le_bytes());
        p[18..20].copy_from_slice(&0x2004u16.to_le_bytes());
        for (i, b) in p[8000..].iter_mut().enumerate() {
            *b = fill.wrapping_add(i as u8);
        }
        let c = checksum_page(&p, blkno);
        p[8..10].copy_from_slice(&c.to_le_bytes());
        p.to_vec()
    }

    fn relation(pages: u32, seed: u8) -> Vec<u8> {
        (0..pages)
            .flat_map(|b| page(b, seed.wrapping_add(b as u8)))
            .collect()
    }

    fn damage(bytes: &mut [u8], block: usize) {
        bytes[block * BLCKSZ + 8100] ^= 0xff;
    }

    struct Quiet;
    impl crate::session::Reporter for Quiet {
        fn notice(&self, _: &str) {}
        fn step(&self, _: &str) {}
        fn warning(&self, _: &str) {}
        fn progress(&self, _: &crate::progress::Snapshot) {}
    }

    struct Run {
        dir: tempfile::TempDir,
        pool: Arc<Pool>,
        result: Result<()>,
    }

    /// Backs up `listed` (path, listed size) from `files` over `jobs` workers with 4-page
    /// chunks, verifying pages.
    fn run(files: Arc<Files>, listed: &[(&str, u64)], jobs: usize) -> Run {
        run_chunked(files, listed, jobs, 4 * BLCKSZ as u64)
    }

    fn run_chunked(files: Arc<Files>, listed: &[(&str, u64)], jobs: usize, chunk: u64) -> Run {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sockdir = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let list: Vec<FileEntry> = listed
            .iter()
            .map(|&(p, size)| FileEntry {
                path: p.into(),
                kind: FileKind::File,
                size,
                mtime: 0,
                link_target: None,
                spcoid: None,
                mode: None,
            })
            .collect();
        let sink = Arc::new(PlainDir::new(
            dir.path().to_path_buf(),
            HashMap::new(),
            TablespaceMap::default(),
        ));
        std::fs::create_dir_all(dir.path().join("base/5")).unwrap();
        let listed: Vec<crate::source::pool::Listed> = list
            .iter()
            .map(|f| crate::source::pool::Listed {
                path: f.path.clone(),
                size: f.size,
                id: sink
                    .entry(&Entry {
                        root: SinkRoot::Data,
                        path: &f.path,
                        kind: Kind::File,
                        mode: 0o600,
                        link: "",
                    })
                    .unwrap(),
            })
            .collect();
        let p = plan(
            &list,
            PlanConfig {
                chunk_size: chunk,
                small_file: 2 * BLCKSZ as u64,
                batch_bytes: 1 << 20,
                batch_files: 10,
            },
        );
        let digests = Digests::new(ChecksumKind::Crc32c);
        let (s, d) = (sink.clone(), digests.clone());
        let pool = Pool::new(
            listed,
            p.units,
            Box::new(move || d.tee(s.writer())),
            PoolConfig {
                jobs,
                retries: 3,
                retry_delay: Duration::ZERO,
                progress: Progress::new(None, 0, Arc::new(Quiet)),
                throttle: None,
                stall_timeout: Duration::from_secs(300),
                server: "fake:5432".into(),
            },
        );
        let segments = list.iter().map(|f| (f.path.clone(), 0)).collect();
        let sock = sockdir.path().to_path_buf();
        let result = rt.block_on(async {
            let listener = UnixListener::bind(sock.join(".s.PGSQL.5999")).unwrap();
            let server = tokio::spawn(async move {
                loop {
                    let (s, _) = listener.accept().await.unwrap();
                    tokio::spawn(session(s, files.clone()));
                }
            });
            let cfg = ConnConfig::parse(&format!(
                "host={} port=5999 user=fake dbname=fake sslmode=disable",
                sock.display()
            ))
            .unwrap();
            let r = pool
                .run(Arc::new(SqlConnector {
                    cfg,
                    verify: Some(Arc::new(Verify {
                        start_lsn: Lsn(1 << 40),
                        segments,
                    })),
                }))
                .await;
            server.abort();
            r
        });
        Run { dir, pool, result }
    }

    #[test]
    fn a_block_failing_once_is_read_again_and_counts_only_if_it_fails_twice() {
        let torn_once = relation(10, 1);
        let mut damaged = relation(3, 2);
        damage(&mut damaged, 2);
        let mut first = torn_once[..4 * BLCKSZ].to_vec();
        damage(&mut first, 1);
        let files = Arc::new(Files {
            files: [
                ("base/5/16384".to_string(), torn_once.clone()),
                ("base/5/16385".to_string(), damaged.clone()),
            ]
            .into(),
            first_reads: Mutex::new([(("base/5/16384".to_string(), 0), first)].into()),
            reads: AtomicUsize::new(0),
            kill_at: Mutex::new(VecDeque::new()),
            connects: AtomicUsize::new(0),
            max_pipelined: AtomicUsize::new(0),
        });
        let r = run(
            files.clone(),
            &[
                ("base/5/16384", torn_once.len() as u64),
                ("base/5/16385", damaged.len() as u64),
            ],
            2,
        );
        r.result.unwrap();
        let o = r.pool.outcomes();
        assert_eq!(o[0].damaged, Damaged::default(), "the re-read block passed");
        assert_eq!(
            o[1].damaged,
            Damaged {
                pages: 1,
                blocks: vec![2]
            }
        );
        // The copy holds what was read (WAL replay rewrites a torn page).
        assert_eq!(
            std::fs::read(r.dir.path().join("base/5/16385")).unwrap(),
            damaged
        );
    }

    #[test]
    fn vanished_and_shrunk_files_and_a_killed_session_are_handled() {
        let big = relation(12, 3);
        let small = relation(1, 4);
        let files = Arc::new(Files {
            files: [
                ("base/5/big".to_string(), big.clone()),
                // Listed with 2 pages, now 1: a whole file read in one call.
                ("base/5/small".to_string(), small.clone()),
            ]
            .into(),
            first_reads: Mutex::new(HashMap::new()),
            reads: AtomicUsize::new(0),
            // The second read ends its session: its ranges are read again elsewhere.
            kill_at: Mutex::new([2].into()),
            connects: AtomicUsize::new(0),
            max_pipelined: AtomicUsize::new(0),
        });
        let r = run(
            files.clone(),
            &[
                ("base/5/big", big.len() as u64),
                ("base/5/small", 2 * BLCKSZ as u64),
                ("base/5/gone", 2 * BLCKSZ as u64),
            ],
            1,
        );
        r.result.unwrap();
        assert_eq!(std::fs::read(r.dir.path().join("base/5/big")).unwrap(), big);
        let o = r.pool.outcomes();
        assert_eq!(o[1].real_length, Some(BLCKSZ as u64));
        assert!(o[2].vanished);
        assert_eq!(
            files.connects.load(Ordering::Relaxed),
            2,
            "one reconnection after the killed session"
        );
        assert!(
            files.max_pipelined.load(Ordering::Relaxed) >= 2,
            "the two small files' reads were not sent together"
        );
    }

    #[test]
    fn a_range_read_in_several_calls_that_comes_back_short_is_padded_with_zeros() {
        // Listed at 2.5 MiB and read as one range in 80 pipelined calls; it has shrunk to
        // 1.5 MiB since: the rest is zeros, as BASE_BACKUP sends (WAL replay makes it right).
        let now = relation(192, 5);
        let listed = 320 * BLCKSZ as u64;
        let files = Arc::new(Files {
            files: [("base/5/shrunk".to_string(), now.clone())].into(),
            first_reads: Mutex::new(HashMap::new()),
            reads: AtomicUsize::new(0),
            kill_at: Mutex::new(VecDeque::new()),
            connects: AtomicUsize::new(0),
            max_pipelined: AtomicUsize::new(0),
        });
        let r = run_chunked(files.clone(), &[("base/5/shrunk", listed)], 1, 4 << 20);
        r.result.unwrap();
        let calls = listed.div_ceil(PIECE) as usize;
        assert_eq!(calls, 80);
        assert_eq!(files.reads.load(Ordering::Relaxed), calls);
        assert_eq!(files.max_pipelined.load(Ordering::Relaxed), calls);
        let got = std::fs::read(r.dir.path().join("base/5/shrunk")).unwrap();
        assert_eq!(got.len() as u64, listed);
        assert_eq!(&got[..now.len()], &now[..]);
        assert!(got[now.len()..].iter().all(|&b| b == 0));
        assert_eq!(r.pool.outcomes()[0].real_length, None);
    }

    #[test]
    fn a_part_of_a_file_read_in_one_call_that_comes_back_short_is_padded() {
        // Split into ranges of one call each; the file has shrunk to three quarters of its
        // listed length: the ranges past its end keep their length (zeros), only a whole
        // file may change length.
        let now = relation(192, 6);
        let listed = 256 * BLCKSZ as u64;
        let files = Arc::new(Files {
            files: [("base/5/split".to_string(), now.clone())].into(),
            first_reads: Mutex::new(HashMap::new()),
            reads: AtomicUsize::new(0),
            kill_at: Mutex::new(VecDeque::new()),
            connects: AtomicUsize::new(0),
            max_pipelined: AtomicUsize::new(0),
        });
        let r = run_chunked(files, &[("base/5/split", listed)], 2, PIECE);
        r.result.unwrap();
        let got = std::fs::read(r.dir.path().join("base/5/split")).unwrap();
        assert_eq!(got.len() as u64, listed);
        assert_eq!(&got[..now.len()], &now[..]);
        assert!(got[now.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_window_is_refilled_in_batches_and_never_overfilled() {
        // The first batch fills the window.
        assert_eq!(calls_to_send(0, 0, 1000), WINDOW);
        assert_eq!(calls_to_send(0, 0, 3), 3);
        // Nothing while fewer than REFILL would fit ...
        assert_eq!(calls_to_send(WINDOW, 1, 1000), 0);
        assert_eq!(calls_to_send(WINDOW, REFILL - 1, 1000), 0);
        // ... then as many as fit, in one batch.
        assert_eq!(calls_to_send(WINDOW, REFILL, 1000), REFILL);
        assert_eq!(calls_to_send(WINDOW, WINDOW, 1000), WINDOW);
        // Never past the last call.
        assert_eq!(calls_to_send(WINDOW, REFILL, WINDOW + 5), 5);
        assert_eq!(calls_to_send(7, 7, 7), 0);
        for received in 0..=WINDOW {
            let n = calls_to_send(WINDOW, received, usize::MAX);
            assert!(WINDOW - received + n <= WINDOW);
            assert!(n == 0 || n >= REFILL);
        }
    }

    #[test]
    fn a_range_of_more_calls_than_the_window_is_read_whole_in_order() {
        // 2.5 windows of calls in one range, on one session: the window refilled as it
        // empties, every byte in its place.
        let calls = 2 * WINDOW + WINDOW / 2;
        let pages = calls * (PIECE as usize / BLCKSZ);
        let rel = relation(pages as u32, 7);
        let files = Arc::new(Files {
            files: [("base/5/long".to_string(), rel.clone())].into(),
            first_reads: Mutex::new(HashMap::new()),
            reads: AtomicUsize::new(0),
            kill_at: Mutex::new(VecDeque::new()),
            connects: AtomicUsize::new(0),
            max_pipelined: AtomicUsize::new(0),
        });
        let r = run_chunked(
            files.clone(),
            &[("base/5/long", rel.len() as u64)],
            1,
            rel.len() as u64,
        );
        r.result.unwrap();
        assert_eq!(files.reads.load(Ordering::Relaxed), calls);
        // One Sync after the last call: all of them one pipeline.
        assert_eq!(files.max_pipelined.load(Ordering::Relaxed), calls);
        assert_eq!(
            std::fs::read(r.dir.path().join("base/5/long")).unwrap(),
            rel
        );
        assert_eq!(r.pool.outcomes()[0].damaged, Damaged::default());
    }
}
