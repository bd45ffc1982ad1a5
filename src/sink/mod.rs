//! Sinks: where backup bytes end up.
//!
//! Like PostgreSQL's astreamer chain, each stage is small: the BASE_BACKUP stream is split
//! into archives and the manifest ([`StreamSink`]), archives go through the tar parser, and
//! members land in a plain directory ([`plain::PlainExtractor`]). Sinks run on their own
//! thread behind a bounded channel, so receiving never waits on the disk in lockstep and
//! memory stays bounded whatever the cluster's size.

pub mod digest;
pub mod dir;
pub mod plain;
pub mod seam;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use tokio::sync::mpsc;

use crate::basebackup::StreamMessage;
use crate::error::{Error, Result};
use crate::tar::TarParser;
use plain::{PlainExtractor, TablespaceMap};

/// What a sink wrote.
#[derive(Debug, Default, Clone)]
pub struct SinkStats {
    /// Regular files written.
    pub files: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Whether a manifest arrived (written to `backup_manifest.tmp`).
    pub manifest: bool,
}

/// Consumes the BASE_BACKUP stream and extracts it into a plain-format directory.
pub struct StreamSink {
    extractor: PlainExtractor,
    tar: Option<TarParser>,
    archive: String,
    manifest: Option<File>,
    in_manifest: bool,
}

impl StreamSink {
    /// A sink writing into `root`, mapping tablespaces through `map`.
    pub fn new(root: PathBuf, map: TablespaceMap) -> StreamSink {
        StreamSink {
            extractor: PlainExtractor::new(root, map),
            tar: None,
            archive: String::new(),
            manifest: None,
            in_manifest: false,
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
            self.extractor.end_archive()?;
        }
        Ok(())
    }

    /// Handles one stream message.
    pub fn handle(&mut self, m: StreamMessage) -> Result<()> {
        match m {
            StreamMessage::NewArchive {
                name,
                tablespace_path,
            } => {
                self.finish_archive()?;
                self.extractor.begin_archive(&tablespace_path)?;
                self.archive = name;
                self.tar = Some(TarParser::default());
            }
            StreamMessage::ManifestStart => {
                self.finish_archive()?;
                let p = self.extractor.root().join("backup_manifest.tmp");
                self.manifest = Some(crate::durable::create_private(&p)?);
                self.in_manifest = true;
            }
            StreamMessage::Data(d) => {
                if self.in_manifest {
                    let f = self.manifest.as_mut().expect("manifest file open");
                    f.write_all(&d)
                        .map_err(|e| Error::io("could not write backup_manifest.tmp", e))?;
                } else {
                    let tar = self.tar.as_mut().ok_or_else(|| {
                        Error::Protocol("archive data before any archive started".into())
                    })?;
                    let ex = &mut self.extractor;
                    tar.feed(&d, &mut |ev| ex.event(ev))?;
                }
            }
            StreamMessage::Progress(_) => {}
        }
        Ok(())
    }

    /// Ends the stream: closes the last archive and the manifest.
    pub fn finish(mut self) -> Result<SinkStats> {
        self.finish_archive()?;
        let mut stats = self.extractor.stats();
        if let Some(f) = self.manifest.take() {
            drop(f);
            stats.manifest = true;
        }
        Ok(stats)
    }

    /// Runs the sink on a dedicated thread fed by a bounded channel.
    pub fn spawn(
        mut self,
        mut rx: mpsc::Receiver<StreamMessage>,
    ) -> std::thread::JoinHandle<Result<SinkStats>> {
        std::thread::Builder::new()
            .name("pgpar-sink".into())
            .spawn(move || {
                while let Some(m) = rx.blocking_recv() {
                    self.handle(m)?;
                }
                self.finish()
            })
            .expect("spawn sink thread")
    }
}
