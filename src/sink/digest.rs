//! The manifest tee: checksums computed as file bytes pass on their way to a sink, so no file
//! is read back from disk for its manifest checksum.
//!
//! [`Tee`] wraps any [`FileWriter`] and records, for every run of bytes it sees complete, the
//! run's CRC-32C and — when the run starts at offset 0 — its SHA-2 digest. A file's CRC-32C
//! is combined from its ranges in offset order (CRC-32C can be combined; SHA-2 cannot), so
//! ranges may come from any worker in any order. A SHA-2 checksum needs the file's bytes in
//! order: a source that wants one fetches each file whole, as one run from offset 0 (the
//! parallel method then does not split files). [`Digests::file_digest`] checks that the runs
//! cover the file exactly, once. It knows nothing of paths, the server or the manifest text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::digest::DynDigest;

use super::seam::{FileId, FileWriter};
use crate::error::{Error, Result};
use crate::manifest::{crc32c_bytes, ChecksumKind};

/// One complete run of a file's bytes.
#[derive(Debug, Clone)]
struct RunDigest {
    offset: u64,
    length: u64,
    crc: u32,
    /// SHA-2 of the run, for runs that start at offset 0 (when the kind is SHA-2).
    sha: Option<Vec<u8>>,
}

/// The runs recorded so far, by file; shared by every tee of one backup.
pub struct Digests {
    kind: ChecksumKind,
    runs: Mutex<HashMap<FileId, Vec<RunDigest>>>,
}

impl Digests {
    /// An empty record for checksums of `kind`.
    pub fn new(kind: ChecksumKind) -> Arc<Digests> {
        Arc::new(Digests {
            kind,
            runs: Mutex::default(),
        })
    }

    /// The checksum algorithm.
    pub fn kind(&self) -> ChecksumKind {
        self.kind
    }

    /// Wraps `inner` so that the bytes it writes are checksummed.
    pub fn tee(self: &Arc<Self>, inner: Box<dyn FileWriter>) -> Box<dyn FileWriter> {
        Box::new(Tee {
            inner,
            digests: self.clone(),
            cur: None,
        })
    }

    /// The manifest checksum of file `f`, `size` bytes long, in the manifest's byte order.
    /// Fails, naming `path`, when the runs recorded do not cover the file exactly.
    pub fn file_digest(
        &self,
        f: FileId,
        size: u64,
        path: impl std::fmt::Display,
    ) -> Result<Vec<u8>> {
        let mut runs = self
            .runs
            .lock()
            .expect("digest lock")
            .get(&f)
            .cloned()
            .unwrap_or_default();
        runs.sort_by_key(|r| r.offset);
        let mut next = 0u64;
        let mut crc = 0u32;
        for r in &runs {
            if r.offset != next {
                return Err(Error::Failed(format!(
                    "\"{path}\": bytes {next}..{} never arrived (internal error)",
                    r.offset
                )));
            }
            crc = crc32c::crc32c_combine(crc, r.crc, r.length as usize);
            next += r.length;
        }
        if next != size {
            return Err(Error::Failed(format!(
                "\"{path}\": {next} of {size} bytes arrived (internal error)"
            )));
        }
        match self.kind {
            ChecksumKind::None => Ok(Vec::new()),
            ChecksumKind::Crc32c => Ok(crc32c_bytes(crc)),
            _ => match runs.as_slice() {
                [] => Ok(self.kind.digest(&[])),
                [RunDigest { sha: Some(d), .. }] => Ok(d.clone()),
                _ => Err(Error::Failed(format!(
                    "\"{path}\" arrived in {} ranges: a {} checksum needs it whole (internal error)",
                    runs.len(),
                    self.kind.name()
                ))),
            },
        }
    }
}

fn sha(kind: ChecksumKind) -> Option<Box<dyn DynDigest + Send>> {
    match kind {
        ChecksumKind::None | ChecksumKind::Crc32c => None,
        ChecksumKind::Sha224 => Some(Box::new(sha2::Sha224::default())),
        ChecksumKind::Sha256 => Some(Box::new(sha2::Sha256::default())),
        ChecksumKind::Sha384 => Some(Box::new(sha2::Sha384::default())),
        ChecksumKind::Sha512 => Some(Box::new(sha2::Sha512::default())),
    }
}

struct Run {
    file: FileId,
    offset: u64,
    length: u64,
    crc: u32,
    sha: Option<Box<dyn DynDigest + Send>>,
}

/// A writer that checksums what passes through it (see the module doc).
struct Tee {
    inner: Box<dyn FileWriter>,
    digests: Arc<Digests>,
    cur: Option<Run>,
}

impl FileWriter for Tee {
    fn begin(&mut self, f: FileId, offset: u64) -> Result<()> {
        self.cur = Some(Run {
            file: f,
            offset,
            length: 0,
            crc: 0,
            sha: if offset == 0 {
                sha(self.digests.kind)
            } else {
                None
            },
        });
        self.inner.begin(f, offset)
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        if let Some(r) = self.cur.as_mut() {
            r.crc = crc32c::crc32c_append(r.crc, data);
            r.length += data.len() as u64;
            if let Some(h) = r.sha.as_mut() {
                h.update(data);
            }
        }
        self.inner.write(data)
    }

    fn end(&mut self) -> Result<()> {
        self.inner.end()?;
        if let Some(r) = self.cur.take() {
            let d = RunDigest {
                offset: r.offset,
                length: r.length,
                crc: r.crc,
                sha: r.sha.map(|h| h.finalize().to_vec()),
            };
            self.digests
                .runs
                .lock()
                .expect("digest lock")
                .entry(r.file)
                .or_default()
                .push(d);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that keeps nothing: the tee alone is under test.
    struct Null;
    impl FileWriter for Null {
        fn begin(&mut self, _: FileId, _: u64) -> Result<()> {
            Ok(())
        }
        fn write(&mut self, _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn end(&mut self) -> Result<()> {
            Ok(())
        }
    }

    fn run(w: &mut Box<dyn FileWriter>, f: FileId, off: usize, data: &[u8]) {
        w.begin(f, off as u64).unwrap();
        for c in data.chunks(7) {
            w.write(c).unwrap();
        }
        w.end().unwrap();
    }

    #[test]
    fn crc_combines_ranges_from_any_writer_in_any_order() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let d = Digests::new(ChecksumKind::Crc32c);
        let (mut a, mut b) = (d.tee(Box::new(Null)), d.tee(Box::new(Null)));
        let f = FileId(3);
        run(&mut b, f, 600, &data[600..]);
        // An abandoned run leaves nothing behind.
        a.begin(f, 0).unwrap();
        a.write(b"partial").unwrap();
        run(&mut a, f, 0, &data[..600]);
        assert_eq!(
            d.file_digest(f, 1000, "f").unwrap(),
            crc32c_bytes(crc32c::crc32c(&data))
        );
        let e = d.file_digest(f, 1001, "base/1/2").unwrap_err().to_string();
        assert!(e.contains("base/1/2") && e.contains("1000 of 1001"), "{e}");
        assert!(d.file_digest(FileId(9), 5, "g").is_err());
        assert_eq!(
            d.file_digest(FileId(9), 0, "empty").unwrap(),
            crc32c_bytes(0)
        );
    }

    #[test]
    fn sha_is_computed_inline_for_a_whole_file() {
        let data = b"the quick brown fox".repeat(100);
        for kind in [
            ChecksumKind::Sha224,
            ChecksumKind::Sha256,
            ChecksumKind::Sha384,
            ChecksumKind::Sha512,
        ] {
            let d = Digests::new(kind);
            let mut w = d.tee(Box::new(Null));
            run(&mut w, FileId(0), 0, &data);
            assert_eq!(
                d.file_digest(FileId(0), data.len() as u64, "f").unwrap(),
                kind.digest(&data)
            );
            assert_eq!(d.file_digest(FileId(1), 0, "e").unwrap(), kind.digest(b""));
            // Split files cannot get a SHA-2 checksum inline: refused, not guessed.
            run(&mut w, FileId(2), 0, &data[..10]);
            run(&mut w, FileId(2), 10, &data[10..]);
            let e = d
                .file_digest(FileId(2), data.len() as u64, "split")
                .unwrap_err();
            assert!(e.to_string().contains("2 ranges"), "{e}");
        }
    }
}
