//! Parallel workers. Each owns one replication connection and one writer thread: the
//! connection task parses SEND_FILES_CONTENT and hands `Bytes` to the writer through a
//! bounded channel (so back-pressure reaches TCP and memory stays flat), the writer does
//! positional writes and computes each range's CRC-32C. Work units are pulled from a shared
//! queue when a worker is free. A worker whose connection breaks re-queues the ranges it had
//! not finished and carries on over a fresh connection; a range is always fetched whole again,
//! never patched up.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::conn::{Connection, Event, Replication};
use crate::conninfo::ConnConfig;
use crate::error::{Error, Result};
use crate::plan::{FileEntry, WorkUnit};
use crate::progress::Progress;
use crate::replication::parallel::{files_content_command, parse_content, ContentMessage};

/// How often one worker reconnects before it gives up.
const MAX_RETRIES: u32 = 3;
/// Messages buffered between a connection and its writer (32 KiB each from the server).
const WRITE_QUEUE: usize = 64;

/// Waits before retry `attempt` (0.4 s, 0.8 s, 1.6 s …, at most 6.4 s).
async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(200 * (1 << attempt.min(5)))).await;
}

/// What the transfer of one file produced.
#[derive(Debug, Default, Clone)]
pub(crate) struct FileResult {
    /// Received ranges: (offset, length, CRC-32C).
    pub ranges: Vec<(u64, u64, u32)>,
    /// The server reported the file missing (dropped since the listing).
    pub missing: bool,
    /// Pages that failed checksum verification.
    pub failures: u32,
    /// The first failing blocks.
    pub blocks: Vec<u32>,
}

/// A total rate limit shared by every connection.
pub(crate) struct Throttle {
    rate: f64,
    start: Instant,
    sent: Mutex<u64>,
}

impl Throttle {
    pub(crate) fn new(bytes_per_sec: u64) -> Throttle {
        Throttle {
            rate: bytes_per_sec as f64,
            start: Instant::now(),
            sent: Mutex::new(0),
        }
    }

    async fn consume(&self, n: u64) {
        let due = {
            let mut s = self.sent.lock().expect("throttle lock");
            *s += n;
            self.start + Duration::from_secs_f64(*s as f64 / self.rate)
        };
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

/// State shared by the leader and all workers.
pub(crate) struct Shared {
    pub files: Vec<FileEntry>,
    pub local: Vec<PathBuf>,
    pub queue: Mutex<VecDeque<WorkUnit>>,
    pub results: Mutex<Vec<FileResult>>,
    pub backup_id: String,
    pub verify: bool,
    pub progress: Progress,
    pub throttle: Option<Throttle>,
    pub stop: AtomicBool,
}

enum WriteMsg {
    Begin {
        file: usize,
        offset: u64,
        length: Option<u64>,
    },
    Data(Bytes),
    End {
        failures: u32,
        blocks: Vec<u32>,
    },
}

struct Current {
    file: usize,
    f: File,
    offset: u64,
    pos: u64,
    length: u64,
    crc: u32,
}

fn writer_loop(shared: &Shared, mut rx: mpsc::Receiver<WriteMsg>) -> Result<()> {
    let mut cur: Option<Current> = None;
    while let Some(m) = rx.blocking_recv() {
        match m {
            WriteMsg::Begin {
                file,
                offset,
                length,
            } => {
                cur = None;
                match length {
                    Some(length) => {
                        let p = &shared.local[file];
                        let f = OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .mode(0o600)
                            .open(p)
                            .map_err(|e| {
                                Error::io(format!("could not create file \"{}\"", p.display()), e)
                            })?;
                        cur = Some(Current {
                            file,
                            f,
                            offset,
                            pos: offset,
                            length,
                            crc: 0,
                        });
                    }
                    None => shared.results.lock().expect("results lock")[file].missing = true,
                }
            }
            WriteMsg::Data(d) => {
                let c = cur.as_mut().ok_or_else(|| {
                    Error::Protocol("file data outside a file in SEND_FILES_CONTENT".into())
                })?;
                c.f.write_all_at(&d, c.pos).map_err(|e| {
                    Error::io(
                        format!("could not write \"{}\"", shared.local[c.file].display()),
                        e,
                    )
                })?;
                c.crc = crc32c::crc32c_append(c.crc, &d);
                c.pos += d.len() as u64;
            }
            WriteMsg::End { failures, blocks } => {
                if let Some(c) = cur.take() {
                    if c.pos - c.offset != c.length {
                        return Err(Error::Protocol(format!(
                            "\"{}\": server sent {} bytes for a {}-byte range at {}",
                            shared.files[c.file].path,
                            c.pos - c.offset,
                            c.length,
                            c.offset
                        )));
                    }
                    let mut r = shared.results.lock().expect("results lock");
                    let fr = &mut r[c.file];
                    fr.ranges.push((c.offset, c.length, c.crc));
                    fr.failures += failures;
                    fr.blocks.extend(blocks);
                }
            }
        }
    }
    Ok(())
}

/// A writer thread and the channel feeding it.
pub(crate) struct Writer {
    tx: mpsc::Sender<WriteMsg>,
    handle: std::thread::JoinHandle<Result<()>>,
}

impl Writer {
    pub(crate) fn spawn(shared: Arc<Shared>) -> Writer {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let handle = std::thread::Builder::new()
            .name("pgpar-writer".into())
            .spawn(move || writer_loop(&shared, rx))
            .expect("spawn writer thread");
        Writer { tx, handle }
    }

    /// Waits for everything queued to be written.
    pub(crate) async fn close(self) -> Result<()> {
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

/// Fetches one unit over `conn`. On failure, also says how many ranges arrived completely.
pub(crate) async fn fetch_unit(
    conn: &mut Connection,
    shared: &Shared,
    unit: &WorkUnit,
    writer: &Writer,
) -> std::result::Result<(), (Error, usize)> {
    let reqs: Vec<(&str, u64, u64)> = unit
        .ranges
        .iter()
        .map(|r| (shared.files[r.file].path.as_str(), r.offset, r.length))
        .collect();
    let cmd = files_content_command(&shared.backup_id, &reqs, shared.verify);
    let mut done = 0usize;
    let res: Result<()> = async {
        conn.start_query(&cmd).await?;
        let mut cur: Option<usize> = None;
        while let Some(ev) = conn.next_event().await? {
            match ev {
                Event::CopyData(d) => match parse_content(d)? {
                    ContentMessage::Header { offset, length, path } => {
                        let r = unit.ranges.get(done).ok_or_else(|| {
                            Error::Protocol("SEND_FILES_CONTENT sent more files than requested".into())
                        })?;
                        if path.as_ref() != shared.files[r.file].path.as_bytes() || offset != r.offset {
                            return Err(Error::Protocol(format!(
                                "SEND_FILES_CONTENT sent \"{}\" at {offset}, expected \"{}\" at {}",
                                String::from_utf8_lossy(&path),
                                shared.files[r.file].path,
                                r.offset
                            )));
                        }
                        if length.is_some_and(|l| l != r.length) {
                            return Err(Error::Protocol(format!(
                                "SEND_FILES_CONTENT promised {length:?} bytes of \"{}\", {} were requested",
                                shared.files[r.file].path, r.length
                            )));
                        }
                        cur = Some(done);
                        writer.send(WriteMsg::Begin { file: r.file, offset, length }).await?;
                    }
                    ContentMessage::Data(d) => {
                        if cur.is_none() {
                            return Err(Error::Protocol("file data before any header".into()));
                        }
                        let n = d.len() as u64;
                        if let Some(t) = &shared.throttle {
                            t.consume(n).await;
                        }
                        writer.send(WriteMsg::Data(d)).await?;
                        shared.progress.add(n);
                    }
                    ContentMessage::Trailer { failures, blocks, .. } => {
                        if cur.take().is_none() {
                            return Err(Error::Protocol("trailer before any header".into()));
                        }
                        writer.send(WriteMsg::End { failures, blocks }).await?;
                        done += 1;
                    }
                },
                Event::CopyOutStart | Event::CopyDone | Event::CommandComplete(_) => {}
                other => return Err(Error::Protocol(format!("unexpected {other:?} from SEND_FILES_CONTENT"))),
            }
        }
        if done != unit.ranges.len() {
            return Err(Error::Protocol(format!(
                "SEND_FILES_CONTENT sent {done} of {} files",
                unit.ranges.len()
            )));
        }
        Ok(())
    }
    .await;
    res.map_err(|e| (e, done))
}

/// True for failures a fresh connection can get past (the connection broke, or the server
/// ended that session), as opposed to the backup itself failing.
fn retryable(e: &Error) -> bool {
    match e {
        Error::ConnectionLost { .. } => true,
        Error::Server { db, .. } => db.severity == "FATAL" && db.code.starts_with("57"),
        _ => false,
    }
}

/// One worker: pulls units until the queue is empty.
pub(crate) async fn run_worker(id: usize, cfg: ConnConfig, shared: Arc<Shared>) -> Result<()> {
    let writer = Writer::spawn(shared.clone());
    let res = work(id, &cfg, &shared, &writer).await;
    let wres = writer.close().await;
    // A writer error explains a failed send better than the send itself.
    match (res, wres) {
        (_, Err(w)) => Err(w),
        (r, Ok(())) => r,
    }
}

async fn work(id: usize, cfg: &ConnConfig, shared: &Shared, writer: &Writer) -> Result<()> {
    let mut conn: Option<Connection> = None;
    let mut retries = 0;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let next = shared.queue.lock().expect("queue lock").pop_front();
        let Some(unit) = next else { break };
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Connection::connect(cfg, Replication::Physical).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    shared.queue.lock().expect("queue lock").push_front(unit);
                    return Err(e);
                }
            },
        };
        shared.progress.worker_active(true);
        let res = fetch_unit(c, shared, &unit, writer).await;
        shared.progress.worker_active(false);
        match res {
            Ok(()) => {
                if tracing::enabled!(tracing::Level::DEBUG) {
                    let what: Vec<String> = unit
                        .ranges
                        .iter()
                        .map(|r| format!("{}@{}+{}", shared.files[r.file].path, r.offset, r.length))
                        .collect();
                    tracing::debug!("worker {id} fetched {}", what.join(" "));
                }
            }
            Err((e, done)) if retryable(&e) && retries < MAX_RETRIES => {
                retries += 1;
                let rest = WorkUnit {
                    bytes: unit.ranges[done..].iter().map(|r| r.length).sum(),
                    ranges: unit.ranges[done..].to_vec(),
                };
                tracing::warn!(
                    "worker {id}: {e}; fetching its {} unfinished file(s) again on a new connection (retry {retries} of {MAX_RETRIES})",
                    rest.ranges.len()
                );
                shared.queue.lock().expect("queue lock").push_front(rest);
                conn = None;
                backoff(retries).await;
            }
            Err((e, _)) => {
                shared.stop.store(true, Ordering::Relaxed);
                return Err(e.context(format!("worker {id}: SEND_FILES_CONTENT failed")));
            }
        }
    }
    if let Some(c) = conn {
        c.close().await;
    }
    Ok(())
}
