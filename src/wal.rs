//! Streams WAL into `pg_wal/` beside a running backup, as `pg_basebackup -X stream` does.
//!
//! Owns its own replication connection: START_REPLICATION on a (temporary) physical slot from
//! the segment holding the backup's start, standby status updates every 10 s and when asked,
//! segment files pre-sized to `wal_segment_size` and written at their offsets, `.done`
//! markers for finished segments. It stops once it has written past the end LSN it is told.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::conn::{describe, Connection, Event};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::protocol::walstream::{parse_repl, status_update, ReplMessage};
use crate::replication::start_replication_command;

/// Where and what to stream.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// The `pg_wal` directory of the backup.
    pub dir: PathBuf,
    /// Slot to stream from.
    pub slot: String,
    /// Timeline of the backup's start.
    pub timeline: u32,
    /// The backup's start LSN; streaming begins at its segment's start.
    pub start: Lsn,
    /// `wal_segment_size`.
    pub segment_size: u64,
    /// Mode of the files written (the cluster's: 0600, or 0640 with group access).
    pub file_mode: u32,
}

/// What was streamed.
#[derive(Debug, Clone, Default)]
pub struct WalResult {
    /// Position written up to.
    pub written: Lsn,
    /// Segment files written.
    pub segments: Vec<String>,
}

struct SegmentWriter {
    opts: WalOptions,
    current: Option<(u64, File, String)>,
    written: Lsn,
    segments: Vec<String>,
}

impl SegmentWriter {
    fn write(&mut self, mut start: Lsn, mut data: &[u8]) -> Result<()> {
        let seg_size = self.opts.segment_size;
        while !data.is_empty() {
            let segno = start.0 / seg_size;
            let offset = start.0 % seg_size;
            let n = ((seg_size - offset) as usize).min(data.len());
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
                self.segments.push(name.clone());
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

    fn close_current(&mut self, complete: bool) -> Result<()> {
        if let Some((_, _f, name)) = self.current.take() {
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

/// Streams until `end` carries an LSN and everything before it is written.
pub async fn stream(
    mut conn: Connection,
    opts: WalOptions,
    mut end: watch::Receiver<Option<Lsn>>,
) -> Result<WalResult> {
    let start = opts.start.segment_start(opts.segment_size);
    let cmd = start_replication_command(&opts.slot, start, opts.timeline);
    conn.start_query(&cmd).await?;
    match conn
        .next_event()
        .await
        .map_err(|e| e.context(format!("could not start WAL streaming at {start}")))?
    {
        Some(Event::CopyBothStart) => {}
        other => {
            return Err(Error::Protocol(format!(
                "START_REPLICATION answered with {}",
                describe(other.as_ref())
            )))
        }
    }
    let mut w = SegmentWriter {
        opts,
        current: None,
        written: start,
        segments: Vec::new(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    let mut end_lsn: Option<Lsn> = *end.borrow();
    let mut end_open = true;
    loop {
        if let Some(e) = end_lsn {
            if w.written >= e {
                break;
            }
        }
        tokio::select! {
            ev = conn.next_event() => {
                match ev? {
                    Some(Event::CopyData(d)) => match parse_repl(d)? {
                        ReplMessage::XLogData { start, data } => w.write(start, &data)?,
                        ReplMessage::Keepalive { reply, .. } => {
                            if reply {
                                conn.queue_copy_data(&status_update(w.written, false))?;
                                conn.flush().await?;
                            }
                        }
                    },
                    other => {
                        return Err(Error::Failed(format!(
                            "the server ended WAL streaming at {} before the backup's end{} (it sent {}): the server is shutting down or its walsender was stopped; run the backup again once the server is up",
                            w.written,
                            end_lsn.map(|e| format!(" at {e}")).unwrap_or_default(),
                            describe(other.as_ref())
                        )))
                    }
                }
            }
            changed = end.changed(), if end_open => {
                if changed.is_err() {
                    end_open = false;
                    if end_lsn.is_none() {
                        return Err(Error::Failed("backup ended before WAL streaming was told where to stop".into()));
                    }
                } else {
                    end_lsn = *end.borrow();
                }
            }
            _ = tick.tick() => {
                conn.queue_copy_data(&status_update(w.written, false))?;
                conn.flush().await?;
            }
        }
    }
    w.close_current(false)?;
    // Tell the server we are done and drain what it still sends.
    conn.queue_copy_data(&status_update(w.written, false))?;
    conn.send_copy_done().await?;
    while let Some(ev) = conn.next_event().await? {
        if let Event::CopyDone = ev {
            // The server's side of the copy is over; what follows is its command result.
        }
    }
    conn.close().await;
    Ok(WalResult {
        written: w.written,
        segments: w.segments,
    })
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
                slot: "s".into(),
                timeline: 1,
                start: Lsn(0),
                segment_size: 1024,
                file_mode: 0o600,
            },
            current: None,
            written: Lsn(0),
            segments: vec![],
        };
        w.write(Lsn(0), &[1u8; 1000]).unwrap();
        w.write(Lsn(1000), &[2u8; 100]).unwrap();
        assert_eq!(w.written, Lsn(1100));
        assert_eq!(
            w.segments,
            vec!["000000010000000000000000", "000000010000000000000001"]
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
        let mut w2 = SegmentWriter {
            current: None,
            segments: vec![],
            ..w
        };
        assert!(w2.write(Lsn(5000), b"x").is_err());
    }
}
