//! Streams WAL into `pg_wal/` beside a running backup, as `pg_basebackup -X stream` does.
//!
//! Owns its own replication connection: START_REPLICATION on a physical slot, segment files
//! pre-sized to `wal_segment_size` and written at their offsets, `.done` markers for finished
//! segments, standby status updates that keep the slot right behind what was written, and a
//! stall detector. It stops once it has written past the end LSN it is told.
//!
//! **When the slot is made, and why WAL from the backup's start is safe.** The session creates
//! the slot (temporary, without `RESERVE_WAL`) and starts this stream *before* it asks the
//! server to start the backup, from the segment of the server's flush position then. The first
//! status update, sent as soon as the stream runs, gives the slot that position; it asks for a
//! reply, and the session waits for the reply (the walsender handles our messages in order, so
//! the slot holds by then) before it starts the backup. The backup's start LSN is the redo
//! pointer of the checkpoint that the start command runs, at or after that position, so every
//! byte of WAL the backup needs passes through this stream, and the slot never lets the server
//! remove a segment this stream has not written: its `restart_lsn` only moves when this stream
//! reports what it wrote. Once the session knows the start LSN ([`Bounds::start`]), the
//! segments before it are removed again (a spread checkpoint can take minutes of WAL).
//!
//! pg_basebackup creates its slot after BASE_BACKUP's checkpoint instead, with `RESERVE_WAL`
//! (from the latest redo pointer), and reports every 10 s. Creating the slot before the
//! checkpoint with `RESERVE_WAL` and leaving it there (what pgpar did first) fails under
//! `max_slot_wal_keep_size`: `RESERVE_WAL` puts `restart_lsn` at the *previous* checkpoint's
//! redo, and the start checkpoint invalidates a slot further behind its own record than
//! `max_slot_wal_keep_size` (with 1 MB segments and a 1 MB limit, a segment or two of WAL
//! since the last checkpoint is enough). Here the slot follows the stream: a status update goes
//! out after every XLogData message (at most 128 kB of WAL), so it trails the server by what is
//! in flight, the least any client can.
//!
//! A stream the server ends anyway (the slot invalidated because the stream fell behind under
//! load, a segment removed before it was read, the connection cut) is replaced by the session
//! (`WalRun` in [`crate::session`]): before the backup starts, afresh; after, resumed exactly
//! at [`SegmentWriter::written`] on a new connection and slot, which works whenever the server
//! still has that WAL.
//!
//! A server that stops sending is noticed: every 10 s the status update asks for a reply, and
//! nothing at all from the server for the stall timeout ends the stream with an error that
//! names it and the setting.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::conn::{describe, Connection, Event};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::protocol::walstream::{parse_repl, status_update, ReplMessage};
use crate::replication::start_replication_command;
use crate::sink::gate::Pass;

/// Where and what to stream.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// The `pg_wal` directory of the backup.
    pub dir: PathBuf,
    /// Timeline of the backup's start.
    pub timeline: u32,
    /// Where streaming begins (the server's flush position before the backup started);
    /// rounded down to its segment's start.
    pub start: Lsn,
    /// `wal_segment_size`.
    pub segment_size: u64,
    /// Mode of the files written (the cluster's: 0600, or 0640 with group access).
    pub file_mode: u32,
    /// Nothing from the server for this long ends the stream (`--stall-timeout`).
    pub stall_timeout: Duration,
}

/// What the session tells a running stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bounds {
    /// The backup's start LSN, once known: segments before its segment are not part of the
    /// backup and are removed.
    pub start: Option<Lsn>,
    /// Where to stop: the stream ends once everything before it is written.
    pub end: Option<Lsn>,
}

/// What was streamed.
#[derive(Debug, Clone, Default)]
pub struct WalResult {
    /// Position written up to.
    pub written: Lsn,
    /// Segment files written.
    pub segments: Vec<String>,
}

/// The segment files of one backup's WAL, written by one stream after another (a stream
/// that breaks is resumed where it stopped: see [`stream`]).
pub struct SegmentWriter {
    opts: WalOptions,
    current: Option<(u64, File, String)>,
    written: Lsn,
    /// Segments written and kept, by number.
    segments: Vec<(u64, String)>,
    /// The first segment the backup needs, once known: earlier ones are removed.
    keep_from: Option<u64>,
    /// Checked before every write (see [`crate::sink::gate`]).
    pass: Option<Pass>,
}

impl SegmentWriter {
    /// Files for WAL from the segment of `opts.start` on; `pass` is checked before every
    /// write.
    pub fn new(opts: WalOptions, pass: Option<Pass>) -> SegmentWriter {
        let start = opts.start.segment_start(opts.segment_size);
        SegmentWriter {
            opts,
            current: None,
            written: start,
            segments: Vec::new(),
            keep_from: None,
            pass,
        }
    }

    /// Everything before this position is written.
    pub fn written(&self) -> Lsn {
        self.written
    }

    /// What was streamed, once the stream has ended.
    pub fn result(self) -> WalResult {
        WalResult {
            written: self.written,
            segments: self.segments.into_iter().map(|(_, n)| n).collect(),
        }
    }

    fn write(&mut self, mut start: Lsn, mut data: &[u8]) -> Result<()> {
        let seg_size = self.opts.segment_size;
        while !data.is_empty() {
            let segno = start.0 / seg_size;
            let offset = start.0 % seg_size;
            let n = ((seg_size - offset) as usize).min(data.len());
            if let Some(p) = &self.pass {
                p.check()?;
            }
            if self.current.as_ref().map(|c| c.0) != Some(segno) {
                self.close_current(false)?;
                let name = start.wal_file_name(self.opts.timeline, seg_size);
                let path = self.opts.dir.join(&name);
                if offset != 0 && !path.exists() {
                    return Err(Error::Protocol(format!(
                        "WAL for segment {name} started at offset {offset}, not at its beginning"
                    )));
                }
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(self.opts.file_mode)
                    .open(&path)
                    .map_err(|e| {
                        Error::io(format!("could not open WAL file \"{}\"", path.display()), e)
                    })?;
                crate::durable::set_mode(&f, &path, self.opts.file_mode)?;
                // Full-size like the server's own segments; the tail stays zero.
                f.set_len(seg_size).map_err(|e| {
                    Error::io(format!("could not size WAL file \"{}\"", path.display()), e)
                })?;
                self.segments.push((segno, name.clone()));
                self.current = Some((segno, f, name));
            }
            let (_, f, name) = self.current.as_ref().expect("segment open");
            f.write_all_at(&data[..n], offset).map_err(|e| {
                Error::io(
                    format!(
                        "could not write WAL file \"{}\"",
                        self.opts.dir.join(name).display()
                    ),
                    e,
                )
            })?;
            start = Lsn(start.0 + n as u64);
            data = &data[n..];
            self.written = self.written.max(start);
            if offset + n as u64 == seg_size {
                self.close_current(true)?;
            }
        }
        Ok(())
    }

    /// From now on, segments before `segno` are not kept; those already written go now
    /// (the current one when it is closed).
    fn keep_from(&mut self, segno: u64) -> Result<()> {
        self.keep_from = Some(segno);
        let current = self.current.as_ref().map(|c| c.0);
        let (drop, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.segments)
            .into_iter()
            .partition(|(n, _)| *n < segno && Some(*n) != current);
        self.segments = keep;
        for (_, name) in drop {
            self.remove_segment(&name)?;
        }
        Ok(())
    }

    fn remove_segment(&mut self, name: &str) -> Result<()> {
        for p in [
            self.opts.dir.join(name),
            self.opts
                .dir
                .join("archive_status")
                .join(format!("{name}.done")),
        ] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(
                        format!("could not remove \"{}\"", p.display()),
                        e,
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn close_current(&mut self, complete: bool) -> Result<()> {
        if let Some((segno, _f, name)) = self.current.take() {
            if self.keep_from.is_some_and(|k| segno < k) {
                self.segments.retain(|(n, _)| *n != segno);
                return self.remove_segment(&name);
            }
            if complete {
                // A finished segment must not be archived again by the restored server.
                // Never create parents: pg_wal must still be the one the backup made.
                let status = self.opts.dir.join("archive_status");
                match std::fs::create_dir(&status) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(Error::io(
                            format!("could not create \"{}\"", status.display()),
                            e,
                        ))
                    }
                    _ => {}
                }
                let done = status.join(format!("{name}.done"));
                let marker = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(self.opts.file_mode)
                    .open(&done)
                    .map_err(|e| {
                        Error::io(format!("could not create \"{}\"", done.display()), e)
                    })?;
                crate::durable::set_mode(&marker, &done, self.opts.file_mode)?;
            }
        }
        Ok(())
    }
}

/// A status update asking for a reply goes out this often, so a live server always sends
/// something well within any stall timeout.
const PING: Duration = Duration::from_secs(10);

/// Streams into `w` from `from` (the segment start of `w`'s first position for a new
/// stream, [`SegmentWriter::written`] to resume one) until `bounds` carries an end LSN and
/// everything before it is written; then closes the current segment.
///
/// `holding` is set once the server has confirmed the slot's position (it answered the first
/// status update): from then on the slot keeps every segment from there.
pub async fn stream(
    mut conn: Connection,
    w: &mut SegmentWriter,
    from: Lsn,
    slot: &str,
    mut bounds: watch::Receiver<Bounds>,
    holding: &watch::Sender<bool>,
) -> Result<Ended> {
    let start = w.opts.start.segment_start(w.opts.segment_size);
    let cmd = start_replication_command(slot, from, w.opts.timeline);
    conn.start_query(&cmd).await?;
    match conn
        .next_event()
        .await
        .map_err(|e| e.context(format!("could not start WAL streaming at {from}")))?
    {
        Some(Event::CopyBothStart) => {}
        other => {
            return Err(Error::Protocol(format!(
                "START_REPLICATION answered with {}",
                describe(other.as_ref())
            )))
        }
    }
    let stall = w.opts.stall_timeout;
    let target = conn.target().to_string();
    // At once, asking for a reply: the slot gets its position, and the reply says the server
    // has taken it (it handles our messages in order), so that the backup's checkpoint,
    // started after that, sees it (see the module doc).
    conn.queue_copy_data(&status_update(w.written, true))?;
    conn.flush().await?;
    let mut confirmed = false;
    let mut reported = w.written;
    let mut last_heard = Instant::now();
    // Well within the stall timeout, so that a live but idle server is never taken for a
    // stalled one.
    let mut ping = tokio::time::interval((stall / 4).clamp(Duration::from_millis(100), PING));
    ping.tick().await;
    let mut b = *bounds.borrow();
    let mut bounds_open = true;
    loop {
        if let Some(s) = b.start {
            if s < start {
                // A standby's backup starts at its last restartpoint's redo, before where the
                // stream began (or the stream had to start again during the checkpoint): the
                // caller starts over from there.
                return Ok(Ended::StartAt(s));
            }
            if w.keep_from.is_none() {
                w.keep_from(s.0 / w.opts.segment_size)?;
            }
        }
        if let Some(e) = b.end {
            if w.written >= e {
                break;
            }
        }
        let silent = last_heard + stall;
        tokio::select! {
            ev = conn.next_event() => {
                last_heard = Instant::now();
                match ev? {
                    Some(Event::CopyData(d)) => match parse_repl(d)? {
                        ReplMessage::XLogData { start, data } => {
                            w.write(start, &data)?;
                            // After every message (at most 128 kB of WAL): the slot trails
                            // what is written by no more than that and a round trip.
                            if w.written > reported {
                                conn.queue_copy_data(&status_update(w.written, false))?;
                                conn.flush().await?;
                                reported = w.written;
                            }
                        }
                        ReplMessage::Keepalive { reply, .. } => {
                            if !confirmed {
                                confirmed = true;
                                holding.send_replace(true);
                            }
                            if reply {
                                conn.queue_copy_data(&status_update(w.written, false))?;
                                conn.flush().await?;
                                reported = w.written;
                            }
                        }
                    },
                    other => {
                        return Err(Error::Failed(format!(
                            "the server {target} ended WAL streaming at {} before the backup's end{} (it sent {}): the server is shutting down or its walsender was stopped; run the backup again once the server is up",
                            w.written,
                            b.end.map(|e| format!(" at {e}")).unwrap_or_default(),
                            describe(other.as_ref())
                        )))
                    }
                }
            }
            changed = bounds.changed(), if bounds_open => {
                if changed.is_err() {
                    bounds_open = false;
                    if b.end.is_none() {
                        return Err(Error::Failed("backup ended before WAL streaming was told where to stop".into()));
                    }
                } else {
                    b = *bounds.borrow();
                }
            }
            _ = ping.tick() => {
                conn.queue_copy_data(&status_update(w.written, true))?;
                conn.flush().await?;
                reported = w.written;
            }
            () = tokio::time::sleep_until(silent.into()) => {
                return Err(Error::Failed(format!(
                    "the server {target} sent nothing for {} s (its walsender is stalled, or the network is): \
                     gave up after --stall-timeout {}s",
                    stall.as_secs(),
                    stall.as_secs()
                )));
            }
        }
    }
    w.close_current(false)?;
    // Tell the server we are done and drain what it still sends.
    conn.queue_copy_data(&status_update(w.written, false))?;
    conn.send_copy_done().await?;
    let drained = tokio::time::timeout(stall, async {
        while let Some(ev) = conn.next_event().await? {
            if let Event::CopyDone = ev {
                // The server's side of the copy is over; what follows is its command result.
            }
        }
        Ok::<(), Error>(())
    })
    .await;
    match drained {
        Ok(r) => r?,
        Err(_) => tracing::warn!(
            "WAL stream: the server {target} did not end the replication stream within {} s; the WAL is complete, going on",
            stall.as_secs()
        ),
    }
    conn.close().await;
    Ok(Ended::Done)
}

/// How a stream ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Everything up to the end LSN is written.
    Done,
    /// The backup started at this LSN, before the stream's first position: streaming must
    /// start over from its segment.
    StartAt(Lsn),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_across_segment_boundaries_and_marks_done() {
        let d = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter {
            opts: WalOptions {
                dir: d.path().to_path_buf(),
                timeline: 1,
                start: Lsn(0),
                segment_size: 1024,
                file_mode: 0o600,
                stall_timeout: Duration::from_secs(1),
            },
            current: None,
            written: Lsn(0),
            segments: vec![],
            keep_from: None,
            pass: None,
        };
        w.write(Lsn(0), &[1u8; 1000]).unwrap();
        w.write(Lsn(1000), &[2u8; 100]).unwrap();
        assert_eq!(w.written, Lsn(1100));
        assert_eq!(
            w.segments,
            vec![
                (0, "000000010000000000000000".to_string()),
                (1, "000000010000000000000001".to_string())
            ]
        );
        let f0 = std::fs::read(d.path().join("000000010000000000000000")).unwrap();
        assert_eq!(f0.len(), 1024);
        assert_eq!(f0[1023], 2);
        assert!(d
            .path()
            .join("archive_status/000000010000000000000000.done")
            .exists());
        assert!(!d
            .path()
            .join("archive_status/000000010000000000000001.done")
            .exists());
        // Once the backup's start is known to be in segment 2, the earlier ones go, the
        // current one when it is closed.
        w.write(Lsn(1100), &[3u8; 500]).unwrap();
        w.keep_from(2).unwrap();
        assert!(!d.path().join("000000010000000000000000").exists());
        assert!(!d
            .path()
            .join("archive_status/000000010000000000000000.done")
            .exists());
        assert!(d.path().join("000000010000000000000001").exists());
        w.write(Lsn(1600), &[4u8; 600]).unwrap();
        assert!(!d.path().join("000000010000000000000001").exists());
        assert_eq!(
            w.segments,
            vec![(2, "000000010000000000000002".to_string())]
        );
        let mut w2 = SegmentWriter {
            current: None,
            segments: vec![],
            ..w
        };
        assert!(w2.write(Lsn(5000), b"x").is_err());
    }
}
