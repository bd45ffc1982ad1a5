//! The stream method as a [`Source`]: one BASE_BACKUP connection (any PostgreSQL 15 or
//! later). The connection task parses the CopyData stream ([`crate::protocol::basebackup`])
//! and hands messages through a bounded channel to a thread that splits the archives with
//! the tar reader ([`crate::protocol::tar`]) and lays their members down as sink entries,
//! one file after another from offset 0; the server's own manifest is kept for the session.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::conn::{Connection, Event};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::options::Method;
use crate::protocol::basebackup::{self, StreamMessage};
use crate::protocol::tar::{EntryKind, TarEvent, TarParser};
use crate::replication::{base_backup_end, BaseBackup};
use crate::session::{Copied, ManifestPart, Session, Source, Started, Tablespace};
use crate::sink::dir::PlainDir;
use crate::sink::seam::{Entry, FileWriter, Kind, Root, Sink};

/// Messages buffered between the connection and the extracting thread.
const QUEUE: usize = 64;

/// The stream method; holds what the start told us until the stop.
#[derive(Default)]
pub(crate) struct StreamSource {
    timeline: u32,
    total: u64,
    tablespaces: Vec<Tablespace>,
}

impl Source for StreamSource {
    const METHOD: Method = Method::Stream;

    async fn start(&mut self, s: &Session<'_>, leader: &mut Connection) -> Result<Started> {
        s.step(&format!(
            "starting backup (checkpoint {}) on {}",
            s.opts.checkpoint.name(),
            leader.target()
        ));
        let begun = BaseBackup {
            label: &s.opts.label,
            checkpoint: s.opts.checkpoint.name(),
            manifest_checksums: s.opts.manifest_checksums.name(),
            verify_checksums: s.opts.verify_checksums,
            max_rate_kb: s.opts.max_rate.map(|r| r / 1024),
        }
        .start(leader)
        .await?;
        self.timeline = begun.timeline;
        self.total = begun.tablespaces.iter().map(|t| t.size_kb).sum::<u64>() * 1024;
        self.tablespaces = begun
            .tablespaces
            .iter()
            .filter_map(|t| {
                Some(Tablespace {
                    oid: t.oid?,
                    location: t.location.clone()?,
                })
            })
            .collect();
        let start_lsn = begun.start_lsn;
        Ok(Started {
            start_lsn,
            timeline: self.timeline,
            tablespaces: self.tablespaces.clone(),
            backup_label: None,
        })
    }

    async fn copy(
        &mut self,
        s: &Session<'_>,
        leader: &mut Connection,
        sink: &Arc<PlainDir>,
    ) -> Result<Copied> {
        // For the message if the copy fails: which server (the connection is borrowed below).
        let server = leader.target().to_string();
        let (tx, rx) = mpsc::channel::<StreamMessage>(QUEUE);
        let by_location = self
            .tablespaces
            .iter()
            .map(|t| (t.location.clone(), t.oid))
            .collect();
        let extract = Extract::new(sink.clone(), by_location).spawn(rx);
        let progress = s.progress(self.total);
        let ticker = progress.spawn_ticker();
        progress.worker_active(true);
        let limit = s.opts.stall_timeout;
        let target = leader.target().to_string();
        let copy = async {
            loop {
                // The server sends the archive continuously (a rate limit sleeps between
                // 32 kB pieces, far below any stall timeout): silence means a stall.
                let ev = tokio::time::timeout(limit, leader.next_event())
                    .await
                    .map_err(|_| {
                        Error::Failed(format!(
                            "the server {target} sent nothing for {} s: its walsender or the network is stalled (--stall-timeout {})",
                            limit.as_secs(),
                            limit.as_secs()
                        ))
                    })?;
                match ev? {
                    Some(Event::CopyData(d)) => {
                        let m = basebackup::parse(d)?;
                        match &m {
                            StreamMessage::Progress(n) => progress.set(*n),
                            StreamMessage::Data(d) => progress.add(d.len() as u64),
                            _ => {}
                        }
                        if tx.send(m).await.is_err() {
                            return Ok(()); // the extractor failed; its error is reported below
                        }
                    }
                    Some(Event::CopyDone) => return Ok(()),
                    Some(other) => {
                        return Err(Error::Protocol(format!(
                            "unexpected {other} in the backup stream"
                        )))
                    }
                    None => {
                        return Err(Error::Protocol(
                            "backup stream ended without CopyDone".into(),
                        ))
                    }
                }
            }
        };
        let copy_res: Result<()> = copy.await;
        drop(tx);
        if let Some(t) = ticker {
            t.abort();
        }
        let extracted = tokio::task::spawn_blocking(move || extract.join())
            .await
            .map_err(|e| Error::Failed(format!("extract thread failed: {e}")))?
            .map_err(|_| Error::Failed("extract thread panicked".into()))?;
        copy_res.map_err(|e| e.context(format!("backup stream from {server} failed")))?;
        let manifest = extracted?;
        progress.finish();
        let stats = sink.stats();
        Ok(Copied {
            manifest: ManifestPart::FromServer(manifest),
            damage: None,
            files: stats.files,
            bytes: stats.bytes,
        })
    }

    async fn stop(&mut self, s: &Session<'_>, leader: &mut Connection) -> Result<(Lsn, u32)> {
        // BASE_BACKUP runs with WAIT false: the end comes right after the archive.
        let limit = s.opts.stall_timeout;
        let target = leader.target().to_string();
        let stop = tokio::time::timeout(limit, base_backup_end(leader))
            .await
            .map_err(|_| {
                crate::source::parallel::stalled_leader(&target, limit, "the end of BASE_BACKUP")
            })??;
        Ok((stop, self.timeline))
    }
}

/// Lays the archives' members down in the sink, on its own thread; keeps the manifest.
struct Extract {
    sink: Arc<PlainDir>,
    writer: Box<dyn FileWriter>,
    by_location: HashMap<String, u32>,
    tar: Option<TarParser>,
    archive: String,
    root: Root,
    manifest: Option<Vec<u8>>,
}

impl Extract {
    fn new(sink: Arc<PlainDir>, by_location: HashMap<String, u32>) -> Extract {
        Extract {
            writer: sink.writer(),
            sink,
            by_location,
            tar: None,
            archive: String::new(),
            root: Root::Data,
            manifest: None,
        }
    }

    fn finish_archive(&mut self) -> Result<()> {
        if let Some(t) = self.tar.take() {
            if !t.finished() {
                return Err(Error::Protocol(format!(
                    "archive \"{}\" ended without the tar end-of-archive marker",
                    self.archive
                )));
            }
        }
        Ok(())
    }

    fn event(
        sink: &PlainDir,
        writer: &mut dyn FileWriter,
        root: Root,
        ev: TarEvent<'_>,
    ) -> Result<()> {
        match ev {
            TarEvent::Entry(e) => {
                // BASE_BACKUP sends backup_label first and pg_control last: the label must
                // be on disk before pg_control can be (see PlainDir::make_durable).
                if root == Root::Data && e.path == "global/pg_control" {
                    sink.make_durable("backup_label")?;
                }
                let kind = match e.kind {
                    EntryKind::Dir => Kind::Dir,
                    EntryKind::File => Kind::File,
                    EntryKind::Symlink => Kind::Symlink,
                };
                let id = sink.entry(&Entry {
                    root,
                    path: &e.path,
                    kind,
                    mode: e.mode,
                    link: &e.link,
                })?;
                if let Some(id) = id {
                    writer.begin(id, 0)?;
                }
            }
            TarEvent::Data(d) => writer.write(d)?,
            TarEvent::EntryEnd => writer.end()?,
            TarEvent::End => {}
        }
        Ok(())
    }

    /// Handles one stream message.
    fn handle(&mut self, m: StreamMessage) -> Result<()> {
        match m {
            StreamMessage::NewArchive {
                name,
                tablespace_path,
            } => {
                self.finish_archive()?;
                self.root = if tablespace_path.is_empty() {
                    Root::Data
                } else {
                    let oid = self.by_location.get(&tablespace_path).ok_or_else(|| {
                        Error::Protocol(format!(
                            "archive \"{name}\" is for tablespace \"{tablespace_path}\", which BASE_BACKUP did not list"
                        ))
                    })?;
                    Root::Tablespace(*oid)
                };
                self.archive = name;
                self.tar = Some(TarParser::default());
            }
            StreamMessage::ManifestStart => {
                self.finish_archive()?;
                self.manifest = Some(Vec::new());
            }
            StreamMessage::Data(d) => match self.manifest.as_mut() {
                Some(m) => m.extend_from_slice(&d),
                None => {
                    let tar = self.tar.as_mut().ok_or_else(|| {
                        Error::Protocol("archive data before any archive started".into())
                    })?;
                    let (sink, writer, root) = (&self.sink, &mut self.writer, self.root);
                    tar.feed(&d, &mut |ev| Self::event(sink, writer.as_mut(), root, ev))?;
                }
            },
            StreamMessage::Progress(_) => {}
        }
        Ok(())
    }

    /// Runs on a dedicated thread fed by a bounded channel; returns the manifest.
    fn spawn(
        mut self,
        mut rx: mpsc::Receiver<StreamMessage>,
    ) -> std::thread::JoinHandle<Result<Vec<u8>>> {
        std::thread::Builder::new()
            .name("pgpar-extract".into())
            .spawn(move || {
                while let Some(m) = rx.blocking_recv() {
                    self.handle(m)?;
                }
                self.finish_archive()?;
                self.manifest
                    .take()
                    .ok_or_else(|| Error::Failed("the server sent no backup manifest".into()))
            })
            .expect("spawn extract thread")
    }
}
