//! The worker pool shared by every method that fetches ranges over N connections.
//!
//! Each worker owns one connection (a [`RangeFetcher`]) and one writer thread: the fetcher
//! reports ranges through a [`Delivery`], which checks them against what was asked (order,
//! lengths), throttles, counts progress, and hands `Bytes` to the writer through a bounded
//! channel (so back-pressure reaches TCP and memory stays flat); the writer thread writes
//! through the sink (wrapped in the manifest tee). Work units are pulled from a shared queue
//! when a worker is free. A worker whose connection breaks re-queues the ranges it had not
//! finished and carries on over a fresh connection, at most [`PoolConfig::retries`] times; a
//! range is always fetched whole again, never patched up. A connection that delivers nothing
//! for [`PoolConfig::stall_timeout`] while the pool waits on it (not while pgpar itself waits
//! on its disk or its rate limit) counts as broken, so a stalled server or link costs that
//! long and a refetch, never a hang. What happened to each file
//! (vanished, resized, damaged pages) is recorded for the caller, who decides what it means.
//! Errors name the worker and the range it was fetching.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::fetch::{Connector, Damaged, RangeFetcher, Request};
pub use super::throttle::Throttle;
use crate::error::{Error, Result};
use crate::plan::{Range, WorkUnit};
use crate::progress::Progress;
use crate::protocol::sqlstate;
use crate::relpath::RelPath;
use crate::sink::seam::{FileId, FileWriter};

/// Messages buffered between a connection and its writer (32 KiB each from the server).
const WRITE_QUEUE: usize = 64;

/// What happened to one listed file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileOutcome {
    /// The server no longer had it (dropped since the listing): not part of the backup.
    pub vanished: bool,
    /// Its real length, where the server sent the whole file with another length than
    /// listed (non-relation files may change while the backup runs).
    pub real_length: Option<u64>,
    /// Pages that failed verification, over all its ranges.
    pub damaged: Damaged,
}

/// One file of the listing as the pool needs it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Path as the server names it (bytes).
    pub path: RelPath,
    /// Listed size.
    pub size: u64,
    /// Where its bytes go in the sink (`None` for entries that are not files).
    pub id: Option<FileId>,
}

/// Knobs of a pool.
pub struct PoolConfig {
    /// Worker connections.
    pub jobs: usize,
    /// Reconnections one worker makes before it gives up.
    pub retries: u32,
    /// Wait before the first reconnection; doubled for each further one (up to 32x).
    pub retry_delay: Duration,
    /// Progress counters.
    pub progress: Progress,
    /// A rate limit over all connections.
    pub throttle: Option<Throttle>,
    /// A connection that delivers nothing for this long is taken for broken (its ranges are
    /// fetched again on a fresh one).
    pub stall_timeout: Duration,
    /// The server, as errors name it (`host:port`).
    pub server: String,
}

/// When a fetch last heard from its server, and whether pgpar is busy on its own side (a full
/// writer queue, the rate limit): the stall detector does not count that time.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    local: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            local: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Something arrived; pgpar works on it until the guard is dropped.
    fn busy(&self) -> Busy<'_> {
        self.touch();
        self.local.fetch_add(1, Ordering::Relaxed);
        Busy(self)
    }

    /// Resolves once the server has sent nothing for `limit` while pgpar waited on it.
    async fn stalled(&self, limit: Duration) {
        loop {
            let now = self.epoch.elapsed();
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let idle = now.saturating_sub(last);
            if self.local.load(Ordering::Relaxed) == 0 && idle >= limit {
                return;
            }
            tokio::time::sleep(limit.saturating_sub(idle).max(Duration::from_millis(50))).await;
        }
    }
}

struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.local.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Makes one writer per worker (the sink's, wrapped in the manifest tee).
pub type WriterFactory = Box<dyn Fn() -> Box<dyn FileWriter> + Send + Sync>;

/// The state every worker shares.
pub struct Pool {
    files: Vec<Listed>,
    queue: Mutex<VecDeque<WorkUnit>>,
    outcomes: Mutex<Vec<FileOutcome>>,
    writers: WriterFactory,
    cfg: PoolConfig,
    stop: AtomicBool,
    /// Workers still taking units (a worker that cannot get a walsender leaves).
    working: AtomicUsize,
}

impl Pool {
    /// A pool over `files` (the listing, by index as the units name them).
    pub fn new(
        files: Vec<Listed>,
        units: VecDeque<WorkUnit>,
        writers: WriterFactory,
        cfg: PoolConfig,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            outcomes: Mutex::new(vec![FileOutcome::default(); files.len()]),
            files,
            queue: Mutex::new(units),
            writers,
            working: AtomicUsize::new(0),
            cfg,
            stop: AtomicBool::new(false),
        })
    }

    /// Runs `cfg.jobs` workers until the queue is empty or one fails for good.
    pub async fn run<C: Connector>(self: &Arc<Self>, connector: Arc<C>) -> Result<()> {
        let mut jobs = self.cfg.jobs;
        let mut next_id = 1;
        // A worker that left (no walsender free) may have put a unit back after the others
        // had found the queue empty: one more worker takes what is left (a few rounds).
        for _round in 0..3 {
            self.working.store(jobs, Ordering::SeqCst);
            let mut set = JoinSet::new();
            for id in next_id..next_id + jobs {
                let (pool, conn) = (self.clone(), connector.clone());
                set.spawn(async move {
                    let r = pool.worker(id, conn.as_ref()).await;
                    pool.working.fetch_sub(1, Ordering::SeqCst);
                    r
                });
            }
            next_id += jobs;
            while let Some(r) = set.join_next().await {
                let r = r.map_err(|e| Error::Failed(format!("worker task failed: {e}")))?;
                if let Err(e) = r {
                    set.abort_all();
                    return Err(e);
                }
            }
            if self.queue.lock().expect("queue lock").is_empty() {
                break;
            }
            jobs = 1;
        }
        let left = self.queue.lock().expect("queue lock").len();
        if left > 0 {
            return Err(Error::Failed(format!(
                "{left} work units were left unfetched"
            )));
        }
        Ok(())
    }

    /// Fetches one unit over a fetcher the caller owns (the leader's `global/pg_control`),
    /// with its own writer; no retries.
    pub async fn fetch_one<F: RangeFetcher>(&self, fetcher: &mut F, unit: &WorkUnit) -> Result<()> {
        let writer = Writer::spawn((self.writers)());
        let res = self.fetch_unit(fetcher, unit, &writer).await;
        let wres = writer.close().await;
        match (res, wres) {
            (_, Err(w)) => Err(w),
            (Err((e, done)), Ok(())) => Err(e.context(self.describe(unit, done))),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    /// Whether this worker may stop taking units: not when it is the last one at work (its
    /// count is taken off when it returns).
    fn leave(&self) -> bool {
        self.working.load(Ordering::SeqCst) > 1
    }

    /// What happened to each file, by listing index.
    pub fn outcomes(&self) -> Vec<FileOutcome> {
        self.outcomes.lock().expect("outcomes lock").clone()
    }

    /// The listing.
    pub fn files(&self) -> &[Listed] {
        &self.files
    }

    fn describe(&self, unit: &WorkUnit, done: usize) -> String {
        match unit.ranges.get(done) {
            Some(r) => format!(
                "fetching \"{}\" bytes {}..{}",
                self.files[r.file].path,
                r.offset,
                r.offset + r.length
            ),
            None => format!("after fetching {} file(s)", unit.ranges.len()),
        }
    }

    async fn worker<C: Connector>(&self, id: usize, connector: &C) -> Result<()> {
        let writer = Writer::spawn((self.writers)());
        let res = self.work(id, connector, &writer).await;
        let wres = writer.close().await;
        // A writer error explains a failed send better than the send itself.
        match (res, wres) {
            (_, Err(w)) => Err(w.context(format!("worker {id}"))),
            (r, Ok(())) => r,
        }
    }

    async fn work<C: Connector>(&self, id: usize, connector: &C, writer: &Writer) -> Result<()> {
        let mut conn: Option<C::Fetcher> = None;
        let mut retries = 0;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let next = self.queue.lock().expect("queue lock").pop_front();
            let Some(unit) = next else { break };
            let fetcher = match conn.as_mut() {
                Some(c) => c,
                None => match connector.connect().await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        self.queue.lock().expect("queue lock").push_front(unit);
                        // Every walsender taken (by another client, or by a stalled
                        // connection of ours the server has not noticed yet): while another
                        // worker goes on, this one leaves and the others share its work.
                        let full = e.sqlstate() == Some(sqlstate::TOO_MANY_CONNECTIONS);
                        if full && self.leave() {
                            tracing::warn!(
                                "worker {id}: {e}; the other workers take over its work"
                            );
                            return Ok(());
                        }
                        self.stop.store(true, Ordering::Relaxed);
                        return Err(e.context(format!("worker {id}")));
                    }
                },
            };
            self.cfg.progress.worker_active(true);
            let res = self.fetch_unit(fetcher, &unit, writer).await;
            self.cfg.progress.worker_active(false);
            match res {
                Ok(()) => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let what: Vec<String> = unit
                            .ranges
                            .iter()
                            .map(|r| {
                                format!("{}@{}+{}", self.files[r.file].path, r.offset, r.length)
                            })
                            .collect();
                        tracing::debug!("worker {id} fetched {}", what.join(" "));
                    }
                }
                Err((e, done)) if retryable(&e) && retries < self.cfg.retries => {
                    retries += 1;
                    let rest = WorkUnit {
                        bytes: unit.ranges[done..].iter().map(|r| r.length).sum(),
                        ranges: unit.ranges[done..].to_vec(),
                    };
                    tracing::warn!(
                        "worker {id}: {e} ({}); fetching its {} unfinished file(s) again on a new connection (retry {retries} of {})",
                        self.describe(&unit, done),
                        rest.ranges.len(),
                        self.cfg.retries
                    );
                    self.queue.lock().expect("queue lock").push_front(rest);
                    if let Some(c) = conn.take() {
                        drop(c);
                    }
                    let wait = self.cfg.retry_delay * (1 << retries.min(5));
                    tokio::time::sleep(wait).await;
                }
                Err((e, done)) => {
                    self.stop.store(true, Ordering::Relaxed);
                    return Err(e.context(format!("worker {id}: {}", self.describe(&unit, done))));
                }
            }
        }
        if let Some(c) = conn {
            c.close().await;
        }
        Ok(())
    }

    /// Fetches one unit. On failure, also says how many ranges arrived completely.
    async fn fetch_unit<F: RangeFetcher>(
        &self,
        fetcher: &mut F,
        unit: &WorkUnit,
        writer: &Writer,
    ) -> std::result::Result<(), (Error, usize)> {
        let reqs: Vec<Request<'_>> = unit
            .ranges
            .iter()
            .map(|r| Request {
                path: &self.files[r.file].path,
                offset: r.offset,
                length: r.length,
                whole: r.offset == 0 && r.length == self.files[r.file].size,
            })
            .collect();
        let activity = Activity::new();
        let mut out = Delivery {
            pool: self,
            ranges: &unit.ranges,
            writer,
            done: 0,
            cur: None,
            activity: &activity,
        };
        let limit = self.cfg.stall_timeout;
        let res = tokio::select! {
            r = fetcher.fetch(&reqs, &mut out) => r,
            () = activity.stalled(limit) => Err(Error::ConnectionLost {
                target: self.cfg.server.clone(),
                reason: format!(
                    "nothing arrived for {} s: taken for stalled (--stall-timeout {})",
                    limit.as_secs(),
                    limit.as_secs()
                ),
            }),
        };
        let done = out.done;
        let res = res.and_then(|()| {
            if done != unit.ranges.len() {
                Err(Error::Protocol(format!(
                    "the server sent {done} of {} requested files",
                    unit.ranges.len()
                )))
            } else {
                Ok(())
            }
        });
        res.map_err(|e| (e, done))
    }
}

/// True for failures a fresh connection can get past (the connection broke, or the server
/// ended that session), as opposed to the backup itself failing.
fn retryable(e: &Error) -> bool {
    match e.root() {
        Error::ConnectionLost { .. } => true,
        Error::Server { db, .. } => {
            db.severity == "FATAL" && db.code.starts_with(sqlstate::CLASS_OPERATOR_INTERVENTION)
        }
        _ => false,
    }
}

/// The range being delivered.
struct InRange {
    index: usize,
    length: u64,
    got: u64,
}

/// Where a fetcher reports what arrives, range by range in request order; it checks every
/// report against the request (see [`super::fetch`]).
pub struct Delivery<'a> {
    pool: &'a Pool,
    ranges: &'a [Range],
    writer: &'a Writer,
    done: usize,
    cur: Option<InRange>,
    activity: &'a Activity,
}

impl Delivery<'_> {
    fn name(&self, r: &Range) -> String {
        format!(
            "\"{}\" bytes {}..{}",
            self.pool.files[r.file].path,
            r.offset,
            r.offset + r.length
        )
    }

    fn expect_next(&self, index: usize) -> Result<&Range> {
        if self.cur.is_some() {
            return Err(Error::Protocol(
                "a range started before the previous one ended".into(),
            ));
        }
        if index != self.done {
            return Err(Error::Protocol(format!(
                "the server sent range {index} where range {} was due",
                self.done
            )));
        }
        self.ranges.get(index).ok_or_else(|| {
            Error::Protocol(format!(
                "the server sent more ranges than the {} requested",
                self.ranges.len()
            ))
        })
    }

    /// Range `index` starts; `length` bytes follow. Only a whole-file range may differ from
    /// what was asked (the file's real length); a part of a file must be exactly as asked.
    pub async fn begin(&mut self, index: usize, length: u64) -> Result<()> {
        let activity = self.activity;
        let _busy = activity.busy();
        let r = *self.expect_next(index)?;
        let listed = self.pool.files[r.file].size;
        if length != r.length {
            let whole = r.offset == 0 && r.length == listed;
            if !whole {
                return Err(Error::Protocol(format!(
                    "the server announced {length} bytes for {}",
                    self.name(&r)
                )));
            }
            self.pool.outcomes.lock().expect("outcomes lock")[r.file].real_length = Some(length);
        }
        let id = self.pool.files[r.file].id.ok_or_else(|| {
            Error::Protocol(format!(
                "\"{}\" is not a regular file in the listing",
                self.pool.files[r.file].path
            ))
        })?;
        self.writer
            .send(WriteMsg::Begin {
                file: id,
                offset: r.offset,
            })
            .await?;
        self.cur = Some(InRange {
            index,
            length,
            got: 0,
        });
        Ok(())
    }

    /// Range `index`'s file no longer exists on the server.
    pub async fn vanished(&mut self, index: usize) -> Result<()> {
        let activity = self.activity;
        let _busy = activity.busy();
        let r = *self.expect_next(index)?;
        self.pool.outcomes.lock().expect("outcomes lock")[r.file].vanished = true;
        self.done += 1;
        Ok(())
    }

    /// The next bytes of the current range.
    pub async fn data(&mut self, d: Bytes) -> Result<()> {
        let activity = self.activity;
        let _busy = activity.busy();
        let n = d.len() as u64;
        let c = self
            .cur
            .as_mut()
            .ok_or_else(|| Error::Protocol("file data outside a range".into()))?;
        c.got += n;
        if c.got > c.length {
            let (index, length) = (c.index, c.length);
            return Err(Error::Protocol(format!(
                "the server sent more than the {length} bytes announced for {}",
                self.name(&self.ranges[index])
            )));
        }
        if let Some(t) = &self.pool.cfg.throttle {
            t.consume(n).await;
        }
        self.writer.send(WriteMsg::Data(d)).await?;
        self.pool.cfg.progress.add(n);
        Ok(())
    }

    /// The current range ended; `damaged` lists the pages that failed verification.
    pub async fn end(&mut self, damaged: Damaged) -> Result<()> {
        let activity = self.activity;
        let _busy = activity.busy();
        let c = self
            .cur
            .take()
            .ok_or_else(|| Error::Protocol("a range ended that never started".into()))?;
        let r = self.ranges[c.index];
        if c.got != c.length {
            return Err(Error::Protocol(format!(
                "the server sent {} of the {} bytes announced for {}",
                c.got,
                c.length,
                self.name(&r)
            )));
        }
        self.writer.send(WriteMsg::End).await?;
        if damaged.pages > 0 {
            let mut o = self.pool.outcomes.lock().expect("outcomes lock");
            let d = &mut o[r.file].damaged;
            d.pages += damaged.pages;
            d.blocks.extend(damaged.blocks);
        }
        self.done += 1;
        Ok(())
    }
}

enum WriteMsg {
    Begin { file: FileId, offset: u64 },
    Data(Bytes),
    End,
}

/// A writer thread and the channel feeding it.
struct Writer {
    tx: mpsc::Sender<WriteMsg>,
    handle: std::thread::JoinHandle<Result<()>>,
}

impl Writer {
    fn spawn(mut w: Box<dyn FileWriter>) -> Writer {
        let (tx, mut rx) = mpsc::channel(WRITE_QUEUE);
        let handle = std::thread::Builder::new()
            .name("pgpar-writer".into())
            .spawn(move || {
                while let Some(m) = rx.blocking_recv() {
                    match m {
                        WriteMsg::Begin { file, offset } => w.begin(file, offset)?,
                        WriteMsg::Data(d) => w.write(&d)?,
                        WriteMsg::End => w.end()?,
                    }
                }
                Ok(())
            })
            .expect("spawn writer thread");
        Writer { tx, handle }
    }

    /// Waits for everything queued to be written.
    async fn close(self) -> Result<()> {
        drop(self.tx);
        let h = self.handle;
        tokio::task::spawn_blocking(move || h.join())
            .await
            .map_err(|e| Error::Failed(format!("writer thread failed: {e}")))?
            .map_err(|_| Error::Failed("writer thread panicked".into()))?
    }

    async fn send(&self, m: WriteMsg) -> Result<()> {
        // A closed channel means the writer stopped on an error, reported by close().
        self.tx
            .send(m)
            .await
            .map_err(|_| Error::Failed("the writer stopped".into()))
    }
}

#[cfg(test)]
mod tests {
    //! The pool against a fake range fetcher and a temporary directory: no server.

    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::manifest::{crc32c_bytes, ChecksumKind};
    use crate::plan::{plan, FileEntry, FileKind, PlanConfig};
    use crate::sink::digest::Digests;
    use crate::sink::dir::PlainDir;
    use crate::sink::plain::TablespaceMap;
    use crate::sink::seam::{Entry, Kind, Root, Sink};

    /// What the fake server does to the next request for a path.
    #[derive(Debug, Clone, Copy)]
    enum Fault {
        /// The connection breaks after this many bytes of the range.
        ResetAfter(u64),
        /// One byte fewer than announced.
        Short,
        /// One byte more than announced.
        Long,
        /// The file is gone.
        Vanish,
        /// The whole file is sent with this real length.
        Resize(u64),
        /// A part of the file announced one byte short.
        Announce(u64),
        /// The server falls silent after this many bytes of the range.
        StallAfter(u64),
    }

    struct FakeServer {
        files: HashMap<RelPath, Vec<u8>>,
        /// Faults by path, used up one per request, in order.
        faults: Mutex<HashMap<RelPath, VecDeque<Fault>>>,
        connects: AtomicUsize,
        refuse_connect: bool,
        /// Connections refused with 53300 (every walsender taken), by their number (1-based).
        full_at: Vec<usize>,
    }

    impl FakeServer {
        fn fault(&self, path: &RelPath) -> Option<Fault> {
            self.faults.lock().unwrap().get_mut(path)?.pop_front()
        }
    }

    struct Quiet;
    impl crate::session::Reporter for Quiet {
        fn notice(&self, _: &str) {}
        fn step(&self, _: &str) {}
        fn warning(&self, _: &str) {}
        fn progress(&self, _: &crate::progress::Snapshot) {}
    }

    struct FakeConnector(Arc<FakeServer>);
    struct FakeFetcher(Arc<FakeServer>);

    impl Connector for FakeConnector {
        type Fetcher = FakeFetcher;
        async fn connect(&self) -> Result<FakeFetcher> {
            let n = self.0.connects.fetch_add(1, Ordering::Relaxed) + 1;
            if self.0.full_at.contains(&n) {
                return Err(Error::Connect {
                    target: "fake:5432".into(),
                    reason: "number of requested standby connections exceeds max_wal_senders (currently 4)".into(),
                    sqlstate: Some(sqlstate::TOO_MANY_CONNECTIONS.into()),
                    hint: None,
                });
            }
            if self.0.refuse_connect {
                return Err(Error::Connect {
                    target: "fake:5432".into(),
                    reason: "connection refused".into(),
                    sqlstate: None,
                    hint: None,
                });
            }
            Ok(FakeFetcher(self.0.clone()))
        }
    }

    fn reset() -> Error {
        Error::ConnectionLost {
            target: "fake:5432".into(),
            reason: "connection reset by peer".into(),
        }
    }

    impl RangeFetcher for FakeFetcher {
        async fn fetch(&mut self, ranges: &[Request<'_>], out: &mut Delivery<'_>) -> Result<()> {
            for (i, r) in ranges.iter().enumerate() {
                let all = &self.0.files[r.path];
                let longer;
                let mut bytes = &all[r.offset as usize..(r.offset + r.length) as usize];
                let mut announce = r.length;
                let mut cut = None;
                let mut stall = None;
                match self.0.fault(r.path) {
                    None => {}
                    Some(Fault::Vanish) => {
                        out.vanished(i).await?;
                        continue;
                    }
                    Some(Fault::ResetAfter(n)) => cut = Some(n as usize),
                    Some(Fault::Short) => bytes = &bytes[..bytes.len() - 1],
                    Some(Fault::Long) => {
                        longer = [bytes, b"x"].concat();
                        bytes = &longer;
                    }
                    Some(Fault::Resize(n)) => {
                        bytes = &all[..n as usize];
                        announce = n;
                    }
                    Some(Fault::Announce(n)) => announce = n,
                    Some(Fault::StallAfter(n)) => stall = Some(n as usize),
                }
                out.begin(i, announce).await?;
                let mut sent = 0;
                for c in bytes.chunks(1000) {
                    if cut.is_some_and(|n| sent + c.len() > n) {
                        return Err(reset());
                    }
                    if stall.is_some_and(|n| sent + c.len() > n) {
                        std::future::pending::<()>().await;
                    }
                    out.data(Bytes::copy_from_slice(c)).await?;
                    sent += c.len();
                }
                out.end(Damaged::default()).await?;
            }
            Ok(())
        }

        async fn close(self) {}
    }

    struct Setup {
        dir: tempfile::TempDir,
        sink: Arc<PlainDir>,
        digests: Arc<Digests>,
        server: Arc<FakeServer>,
        list: Vec<FileEntry>,
        pool: Arc<Pool>,
    }

    /// Three files: one split into three ranges, two batched together.
    fn setup(jobs: usize, faults: &[(&str, Fault)], refuse_connect: bool) -> Setup {
        let content = |n: usize, seed: u8| -> Vec<u8> {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        // One name is not UTF-8: it is written under its bytes like any other.
        let files: HashMap<RelPath, Vec<u8>> = [
            ("base/1/big".into(), content(10_000, 1)),
            ("base/1/a".into(), content(3000, 2)),
            ("base/1/b".into(), content(1500, 3)),
            (RelPath::new(b"base/1/caf\xe9".to_vec()), content(700, 4)),
        ]
        .into();
        let mut list = vec![
            FileEntry {
                path: "base".into(),
                kind: FileKind::Dir,
                size: 0,
                mtime: 0,
                link_target: None,
                spcoid: None,
                mode: None,
            },
            FileEntry {
                path: "base/1".into(),
                kind: FileKind::Dir,
                size: 0,
                mtime: 0,
                link_target: None,
                spcoid: None,
                mode: None,
            },
        ];
        for p in [
            &b"base/1/big"[..],
            b"base/1/a",
            b"base/1/b",
            b"base/1/caf\xe9",
        ] {
            let p = RelPath::from(p);
            list.push(FileEntry {
                size: files[&p].len() as u64,
                path: p,
                kind: FileKind::File,
                mtime: 0,
                link_target: None,
                spcoid: None,
                mode: None,
            });
        }
        let mut fq: HashMap<RelPath, VecDeque<Fault>> = HashMap::new();
        for (p, f) in faults {
            fq.entry(RelPath::from(*p)).or_default().push_back(*f);
        }
        let server = Arc::new(FakeServer {
            files,
            faults: Mutex::new(fq),
            connects: AtomicUsize::new(0),
            refuse_connect,
            full_at: Vec::new(),
        });
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(PlainDir::new(
            dir.path().to_path_buf(),
            HashMap::new(),
            TablespaceMap::default(),
        ));
        let mut listed = Vec::new();
        for f in &list {
            let kind = if f.kind == FileKind::Dir {
                Kind::Dir
            } else {
                Kind::File
            };
            let id = sink
                .entry(&Entry {
                    root: Root::Data,
                    path: &f.path,
                    kind,
                    mode: 0,
                    link: "",
                })
                .unwrap();
            listed.push(Listed {
                path: f.path.clone(),
                size: f.size,
                id,
            });
        }
        let p = plan(
            &list,
            PlanConfig {
                chunk_size: 4096,
                small_file: 4000,
                batch_bytes: 1 << 20,
                batch_files: 10,
            },
        );
        assert_eq!(
            p.units.len(),
            4,
            "three ranges of big, one batch: {:?}",
            p.units
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
                stall_timeout: Duration::from_millis(300),
                server: "fake:5432".into(),
            },
        );
        Setup {
            dir,
            sink,
            digests,
            server,
            list,
            pool,
        }
    }

    fn run(s: &Setup) -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(s.pool.run(Arc::new(FakeConnector(s.server.clone()))))
    }

    /// Every file arrived whole, byte for byte, and its CRC-32C matches its content.
    fn assert_complete(s: &Setup) {
        for (i, f) in s
            .list
            .iter()
            .enumerate()
            .filter(|(_, f)| f.kind == FileKind::File)
        {
            let want = &s.server.files[&f.path];
            assert_eq!(
                &std::fs::read(s.dir.path().join(&f.path)).unwrap(),
                want,
                "{}",
                f.path
            );
            let id = s.pool.files()[i].id.unwrap();
            assert_eq!(
                s.digests.file_digest(id, f.size, &f.path).unwrap(),
                crc32c_bytes(crc32c::crc32c(want)),
                "{}",
                f.path
            );
        }
        assert_eq!(s.sink.stats().bytes, 15_200);
    }

    #[test]
    fn every_range_arrives_over_several_workers() {
        let s = setup(3, &[], false);
        run(&s).unwrap();
        assert_complete(&s);
        assert!(s
            .pool
            .outcomes()
            .iter()
            .all(|o| *o == FileOutcome::default()));
    }

    #[test]
    fn a_broken_connection_requeues_the_unfinished_ranges() {
        // The connection breaks inside the batch's second file: the first stays done, the
        // second is fetched again whole on a new connection.
        let s = setup(1, &[("base/1/b", Fault::ResetAfter(700))], false);
        run(&s).unwrap();
        assert_complete(&s);
        assert_eq!(s.server.connects.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_stalled_connection_is_abandoned_and_its_ranges_fetched_again() {
        let s = setup(1, &[("base/1/b", Fault::StallAfter(700))], false);
        let began = Instant::now();
        run(&s).unwrap();
        assert_complete(&s);
        assert_eq!(s.server.connects.load(Ordering::Relaxed), 2);
        assert!(
            began.elapsed() >= Duration::from_millis(300),
            "abandoned only after the stall timeout"
        );
    }

    #[test]
    fn a_worker_that_stalls_every_time_gives_up_naming_the_setting() {
        let s = setup(1, &[("base/1/big", Fault::StallAfter(0)); 4], false);
        let e = run(&s).unwrap_err().to_string();
        assert!(
            e.starts_with("worker 1: fetching \"base/1/big\" bytes 0..4096: connection to fake:5432 lost: nothing arrived for 0 s")
                && e.contains("--stall-timeout"),
            "{e}"
        );
    }

    #[test]
    fn a_worker_gives_up_after_its_retries_naming_itself_and_the_range() {
        let faults = [("base/1/big", Fault::ResetAfter(100)); 4];
        let s = setup(1, &faults, false);
        let e = run(&s).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "worker 1: fetching \"base/1/big\" bytes 0..4096: connection to fake:5432 lost"
            ),
            "{msg}"
        );
        assert!(matches!(e.root(), Error::ConnectionLost { .. }));
        assert_eq!(
            s.server.connects.load(Ordering::Relaxed),
            4,
            "one try and three retries"
        );
    }

    #[test]
    fn a_worker_without_a_walsender_leaves_its_work_to_the_others() {
        // Three workers; the first connection attempt finds every walsender taken.
        let mut s = setup(3, &[], false);
        Arc::get_mut(&mut s.server).unwrap().full_at = vec![1];
        run(&s).unwrap();
        assert_complete(&s);
        // The last worker never leaves: with every walsender taken it is an error.
        let mut s = setup(1, &[], false);
        Arc::get_mut(&mut s.server).unwrap().full_at = vec![1];
        let e = run(&s).unwrap_err();
        assert!(
            e.to_string().starts_with("worker 1: could not connect"),
            "{e}"
        );
    }

    #[test]
    fn a_worker_that_cannot_connect_says_which() {
        let s = setup(2, &[], true);
        let e = run(&s).unwrap_err();
        assert!(e.to_string().starts_with("worker "), "{e}");
        assert_eq!(e.exit_code(), 3);
    }

    #[test]
    fn ranges_must_be_as_long_as_announced() {
        for (fault, want) in [
            (
                Fault::Short,
                "the server sent 1499 of the 1500 bytes announced for \"base/1/b\" bytes 0..1500",
            ),
            (
                Fault::Long,
                "more than the 1500 bytes announced for \"base/1/b\" bytes 0..1500",
            ),
        ] {
            let s = setup(1, &[("base/1/b", fault)], false);
            let e = run(&s).unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("worker 1: "), "{e}");
        }
        // A part of a split file announced with another length than asked is refused…
        let s = setup(1, &[("base/1/big", Fault::Announce(4095))], false);
        let e = run(&s).unwrap_err().to_string();
        assert!(
            e.contains("announced 4095 bytes for \"base/1/big\" bytes 0..4096"),
            "{e}"
        );
    }

    #[test]
    fn vanished_and_resized_files_are_recorded_for_the_caller() {
        let s = setup(
            2,
            &[
                ("base/1/a", Fault::Vanish),
                ("base/1/b", Fault::Resize(1200)),
            ],
            false,
        );
        run(&s).unwrap();
        let o = s.pool.outcomes();
        assert!(o[3].vanished && o[3].real_length.is_none());
        assert_eq!(o[4].real_length, Some(1200));
        assert!(!o[4].vanished);
        let id = s.pool.files()[4].id.unwrap();
        assert_eq!(
            s.digests.file_digest(id, 1200, "base/1/b").unwrap(),
            crc32c_bytes(crc32c::crc32c(&s.server.files[&"base/1/b".into()][..1200]))
        );
    }
}
