//! The plain-directory sink: entries become directories, links and files under the backup
//! directory or a tablespace's local directory, and file bytes are written at their offsets
//! (positional writes), so ranges of one file may come from many workers at once.
//!
//! Modes follow the server's (0700/0600, or 0750/0640 with group access). Paths are checked
//! so that nothing the server sends lands outside the backup or a prepared tablespace
//! directory. It owns durability of what it wrote ([`crate::durable`]) and writes
//! `backup_manifest` last; it must not decide what goes into the manifest.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::gate::{Gate, Pass};
use super::plain::{dir_mode, file_mode, make_dir, safe_relative, TablespaceMap};
use super::seam::{Entry, FileId, FileWriter, Kind, Root, Sink, SinkStats};
use crate::durable;
use crate::error::{Error, Result};
use crate::relpath::RelPath;

/// Writes smaller than this are gathered (a tar stream hands out small slices); larger ones
/// go straight to the file.
const GATHER: usize = 16 << 10;
/// How much a writer gathers before it writes.
const GATHER_MAX: usize = 1 << 20;

/// The files registered so far, by id, and the byte count, shared with every writer.
#[derive(Default)]
struct Files {
    paths: Mutex<Vec<PathBuf>>,
    modes: Mutex<Vec<u32>>,
    bytes: AtomicU64,
}

impl Files {
    fn get(&self, f: FileId) -> Result<(PathBuf, u32)> {
        let paths = self.paths.lock().expect("file table lock");
        let modes = self.modes.lock().expect("file table lock");
        match (paths.get(f.0), modes.get(f.0)) {
            (Some(p), Some(m)) => Ok((p.clone(), *m)),
            _ => Err(Error::Failed(format!(
                "internal error: unknown file id {}",
                f.0
            ))),
        }
    }
}

/// A plain-format backup directory (see the module doc).
pub struct PlainDir {
    root: PathBuf,
    /// Mode of the files written besides the data (the cluster's file mode).
    file_mode: u32,
    tablespaces: HashMap<u32, PathBuf>,
    map: TablespaceMap,
    files: Arc<Files>,
    /// Every writer holds a pass of it, so that a failed backup can stop them all.
    gate: Gate,
}

impl PlainDir {
    /// A sink writing into `root` (prepared and empty), tablespace `oid`'s files into
    /// `tablespaces[oid]` (prepared by the caller), and link targets mapped through `map`.
    pub fn new(root: PathBuf, tablespaces: HashMap<u32, PathBuf>, map: TablespaceMap) -> Self {
        PlainDir {
            root,
            file_mode: 0o600,
            tablespaces,
            map,
            files: Arc::default(),
            gate: Gate::default(),
        }
    }

    /// Has every writer hold a pass of `gate` (the session's, which closes it on failure).
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    /// Gives the files written besides the data (labels, manifest) this mode (the
    /// cluster's: 0600, or 0640 with group access).
    pub fn with_file_mode(mut self, mode: u32) -> Self {
        self.file_mode = file_mode(mode);
        self
    }

    /// The backup directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn local(&self, root: Root, path: &RelPath) -> Result<PathBuf> {
        let rel = safe_relative(path)?;
        match root {
            Root::Data => Ok(self.root.join(rel)),
            Root::Tablespace(oid) => {
                self.tablespaces
                    .get(&oid)
                    .map(|d| d.join(rel))
                    .ok_or_else(|| {
                        Error::Protocol(format!("\"{path}\" names unknown tablespace {oid}"))
                    })
            }
        }
    }

    /// Cuts file `f` to `len` bytes: a whole file fetched again with a shorter real length
    /// must not keep the tail an earlier, broken attempt wrote (random access only; a
    /// sequential sink never gets a file twice).
    pub fn set_len(&self, f: FileId, len: u64) -> Result<()> {
        let (p, _) = self.files.get(f)?;
        OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|file| file.set_len(len))
            .map_err(|e| Error::io(format!("could not truncate \"{}\"", p.display()), e))
    }

    /// Makes a file at the top of the data directory durable now, with its directory entry,
    /// whatever `--no-sync` says: `backup_label` must be on disk before `global/pg_control`
    /// can be, or a partial backup that survived an OS crash could start as a server without
    /// it and run crash recovery to a wrong state.
    pub fn make_durable(&self, name: &str) -> Result<()> {
        durable::fsync_path(&self.local(Root::Data, &RelPath::from(name))?)?;
        durable::fsync_path(&self.root)
    }

    /// Replaces a file at the top of the data directory atomically and durably (the final
    /// `backup_label` over the placeholder of a method that gets it only at the end).
    pub fn replace(&self, name: &str, bytes: &[u8]) -> Result<()> {
        durable::write_atomically_with_mode(&self.root, name, bytes, self.file_mode, true)
    }

    /// Writes `bytes` to a file at the top of the data directory opened with `how` (a new
    /// file for `put`, appending for `append`), with exactly the backup's file mode.
    fn write_top(&self, name: &str, bytes: &[u8], how: &mut OpenOptions) -> Result<()> {
        let p = self.local(Root::Data, &RelPath::from(name))?;
        let failed = |e| Error::io(format!("could not write \"{}\"", p.display()), e);
        let mut f = how.mode(self.file_mode).open(&p).map_err(failed)?;
        durable::set_mode(&f, &p, self.file_mode)?;
        std::io::Write::write_all(&mut f, bytes).map_err(failed)
    }

    fn roots(&self) -> Vec<PathBuf> {
        let mut all = vec![self.root.clone()];
        all.extend(self.tablespaces.values().cloned());
        all
    }
}

impl Sink for PlainDir {
    fn random_access(&self) -> bool {
        true
    }

    fn entry(&self, e: &Entry<'_>) -> Result<Option<FileId>> {
        let p = self.local(e.root, e.path)?;
        match e.kind {
            Kind::Dir => make_dir(&p, dir_mode(e.mode)).map(|()| None),
            Kind::Symlink => {
                let target = self.map.map(Path::new(e.link));
                std::os::unix::fs::symlink(&target, &p).map_err(|err| {
                    Error::io(
                        format!(
                            "could not create symbolic link \"{}\" -> \"{}\"",
                            p.display(),
                            target.display()
                        ),
                        err,
                    )
                })?;
                Ok(None)
            }
            Kind::File => {
                let mut paths = self.files.paths.lock().expect("file table lock");
                let mut modes = self.files.modes.lock().expect("file table lock");
                paths.push(p);
                modes.push(file_mode(e.mode));
                Ok(Some(FileId(paths.len() - 1)))
            }
        }
    }

    fn writer(&self) -> Box<dyn FileWriter> {
        Box::new(DirWriter {
            pass: self.gate.pass(),
            files: self.files.clone(),
            cur: None,
            buf: Vec::new(),
        })
    }

    fn remove(&self, f: FileId) -> Result<()> {
        let (p, _) = self.files.get(f)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(
                format!("could not remove \"{}\"", p.display()),
                e,
            )),
        }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_top(name, bytes, OpenOptions::new().write(true).create_new(true))
    }

    fn append(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_top(name, bytes, OpenOptions::new().append(true).create(true))
    }

    fn stats(&self) -> SinkStats {
        SinkStats {
            files: self.files.paths.lock().expect("file table lock").len() as u64,
            bytes: self.files.bytes.load(Ordering::Relaxed),
        }
    }

    fn finish(&self, manifest: Option<&[u8]>, sync: bool) -> Result<()> {
        if sync {
            durable::sync_trees(&self.roots(), 8)?;
        }
        match manifest {
            Some(bytes) => durable::write_atomically_with_mode(
                &self.root,
                "backup_manifest",
                bytes,
                self.file_mode,
                sync,
            ),
            None => Ok(()),
        }
    }
}

/// A run of bytes being written.
struct Run {
    path: PathBuf,
    f: File,
    /// Where the next byte goes (gathered bytes included).
    pos: u64,
}

struct DirWriter {
    /// Checked before every file is opened and every write.
    pass: Pass,
    files: Arc<Files>,
    cur: Option<Run>,
    /// Gathered bytes, to be written at `cur.pos - buf.len()`.
    buf: Vec<u8>,
}

impl DirWriter {
    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let run = self
            .cur
            .as_ref()
            .ok_or_else(|| Error::Failed("internal error: gathered bytes outside a file".into()))?;
        let at = run.pos - self.buf.len() as u64;
        run.f
            .write_all_at(&self.buf, at)
            .map_err(|e| Error::io(format!("could not write \"{}\"", run.path.display()), e))?;
        self.buf.clear();
        Ok(())
    }
}

impl FileWriter for DirWriter {
    fn begin(&mut self, file: FileId, offset: u64) -> Result<()> {
        // An abandoned run's gathered bytes are dropped: its range is fetched again whole.
        self.buf.clear();
        self.cur = None;
        self.pass.check()?;
        let (path, mode) = self.files.get(file)?;
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode)
            .open(&path)
            .map_err(|e| Error::io(format!("could not create file \"{}\"", path.display()), e))?;
        durable::set_mode(&f, &path, mode)?;
        self.cur = Some(Run {
            path,
            f,
            pos: offset,
        });
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.pass.check()?;
        let n = data.len() as u64;
        if self.buf.is_empty() && data.len() >= GATHER {
            let run = self.cur.as_mut().ok_or_else(|| {
                Error::Failed("internal error: file bytes before any file began".into())
            })?;
            run.f
                .write_all_at(data, run.pos)
                .map_err(|e| Error::io(format!("could not write \"{}\"", run.path.display()), e))?;
            run.pos += n;
        } else {
            let run = self.cur.as_mut().ok_or_else(|| {
                Error::Failed("internal error: file bytes before any file began".into())
            })?;
            self.buf.extend_from_slice(data);
            run.pos += n;
            if self.buf.len() >= GATHER_MAX {
                self.flush()?;
            }
        }
        self.files.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        self.flush()?;
        self.cur = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file<'a>(path: &'a RelPath, mode: u32) -> Entry<'a> {
        Entry {
            root: Root::Data,
            path,
            kind: Kind::File,
            mode,
            link: "",
        }
    }

    #[test]
    fn ranges_from_many_writers_in_any_order_make_the_file() {
        let d = tempfile::tempdir().unwrap();
        let sink = PlainDir::new(
            d.path().to_path_buf(),
            HashMap::new(),
            TablespaceMap::default(),
        );
        sink.entry(&Entry {
            root: Root::Data,
            path: &"base".into(),
            kind: Kind::Dir,
            mode: 0o750,
            link: "",
        })
        .unwrap();
        let f = sink.entry(&file(&"base/1".into(), 0o640)).unwrap().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (mut a, mut b) = (sink.writer(), sink.writer());
        // The second half first, in big writes; the first half in small gathered ones.
        b.begin(f, 50_000).unwrap();
        b.write(&data[50_000..]).unwrap();
        b.end().unwrap();
        a.begin(f, 0).unwrap();
        for c in data[..50_000].chunks(1000) {
            a.write(c).unwrap();
        }
        a.end().unwrap();
        assert_eq!(std::fs::read(d.path().join("base/1")).unwrap(), data);
        let mode = |p: &str| {
            std::fs::metadata(d.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("base"), 0o750);
        assert_eq!(mode("base/1"), 0o640);
        assert_eq!(sink.stats().bytes, 100_000);
        assert_eq!(sink.stats().files, 1);
    }

    #[test]
    fn an_abandoned_run_is_written_again_whole() {
        let d = tempfile::tempdir().unwrap();
        let sink = PlainDir::new(
            d.path().to_path_buf(),
            HashMap::new(),
            TablespaceMap::default(),
        );
        let f = sink.entry(&file(&"f".into(), 0)).unwrap().unwrap();
        let mut w = sink.writer();
        w.begin(f, 0).unwrap();
        w.write(b"garb").unwrap(); // the connection broke here
        w.begin(f, 0).unwrap();
        w.write(b"hello").unwrap();
        w.end().unwrap();
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"hello");
        // A whole file sent again shorter: the earlier attempt's tail goes.
        w.begin(f, 0).unwrap();
        w.write(b"hi").unwrap();
        w.end().unwrap();
        sink.set_len(f, 2).unwrap();
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"hi");
    }

    #[test]
    fn tablespaces_links_labels_and_the_manifest_last() {
        let d = tempfile::tempdir().unwrap();
        let ts = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("pg_tblspc")).unwrap();
        let sink = PlainDir::new(
            d.path().to_path_buf(),
            HashMap::from([(16384, ts.path().to_path_buf())]),
            TablespaceMap(vec![(PathBuf::from("/srv/ts"), ts.path().to_path_buf())]),
        );
        sink.entry(&Entry {
            root: Root::Data,
            path: &"pg_tblspc/16384".into(),
            kind: Kind::Symlink,
            mode: 0,
            link: "/srv/ts",
        })
        .unwrap();
        let in_ts = |path, kind| Entry {
            root: Root::Tablespace(16384),
            path,
            kind,
            mode: 0,
            link: "",
        };
        let pg17 = RelPath::from("PG_17");
        sink.entry(&in_ts(&pg17, Kind::Dir)).unwrap();
        // A name that is not UTF-8 lands under its own bytes.
        let name = RelPath::new(b"PG_17/\xff\xfe".to_vec());
        let f = sink.entry(&in_ts(&name, Kind::File)).unwrap().unwrap();
        let mut w = sink.writer();
        w.begin(f, 0).unwrap();
        w.write(b"t").unwrap();
        w.end().unwrap();
        let at = RelPath::from("pg_tblspc/16384").join(name.as_bytes());
        assert_eq!(std::fs::read(d.path().join(&at)).unwrap(), b"t");
        sink.put("backup_label", b"LABEL").unwrap();
        assert!(
            sink.put("backup_label", b"again").is_err(),
            "put never overwrites"
        );
        assert!(sink.put("../x", b"").is_err());
        assert!(sink
            .entry(&Entry {
                root: Root::Tablespace(1),
                path: &"x".into(),
                kind: Kind::File,
                mode: 0,
                link: ""
            })
            .is_err());
        sink.finish(None, true).unwrap();
        assert!(!d.path().join("backup_manifest").exists());
        sink.finish(Some(b"{}\n"), true).unwrap();
        assert_eq!(
            std::fs::read(d.path().join("backup_manifest")).unwrap(),
            b"{}\n"
        );
    }
}
