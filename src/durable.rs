//! Durability, in one place.
//!
//! A backup is finished when, and only when, `backup_manifest` exists: everything else is
//! written and fsynced first (files in parallel, then directories, deepest first), and the
//! manifest is written to a temporary name, fsynced, renamed, and its directory fsynced (the
//! pattern of neon's `crashsafe.rs` and pg_basebackup's `backup_manifest.tmp`).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Gives a file pgpar just created exactly `mode`. Creating with a mode is not enough: the
/// process umask may take bits away (a umask of 077 would turn the 0640 of a group-readable
/// cluster into 0600), and the backup's modes must follow the server's, as pg_basebackup's
/// do, whatever the umask of whoever runs pgpar.
pub fn set_mode(f: &File, path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| {
            Error::io(
                format!("could not set the mode of \"{}\"", path.display()),
                e,
            )
        })
}

/// Opens and fsyncs a file or directory.
pub fn fsync_path(p: &Path) -> Result<()> {
    let f = File::open(p)
        .map_err(|e| Error::io(format!("could not open \"{}\" to fsync it", p.display()), e))?;
    f.sync_all()
        .map_err(|e| Error::io(format!("could not fsync \"{}\"", p.display()), e))
}

/// Collects every regular file and directory under `roots` (not following symlinks).
fn walk(roots: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(d) = stack.pop() {
        let rd = fs::read_dir(&d)
            .map_err(|e| Error::io(format!("could not read directory \"{}\"", d.display()), e))?;
        for ent in rd {
            let ent = ent.map_err(|e| {
                Error::io(format!("could not read directory \"{}\"", d.display()), e)
            })?;
            let ft = ent.file_type().map_err(|e| {
                Error::io(format!("could not stat \"{}\"", ent.path().display()), e)
            })?;
            if ft.is_dir() {
                stack.push(ent.path());
            } else if ft.is_file() {
                files.push(ent.path());
            }
        }
        dirs.push(d);
    }
    Ok((files, dirs))
}

/// Fsyncs every file under the roots with `threads` threads, then every directory.
pub fn sync_trees(roots: &[PathBuf], threads: usize) -> Result<()> {
    let (files, mut dirs) = walk(roots)?;
    let queue = Mutex::new(files);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let next = queue.lock().expect("queue lock").pop();
                let Some(p) = next else { break };
                if let Err(e) = fsync_path(&p) {
                    first_err.lock().expect("error lock").get_or_insert(e);
                    break;
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().expect("error lock") {
        return Err(e);
    }
    // Deepest first, so a directory is synced after the entries created in it.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in &dirs {
        fsync_path(d)?;
    }
    Ok(())
}

/// Creates (or truncates) a file private to its owner, as the server's own files are.
pub fn create_private(p: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .map_err(|e| Error::io(format!("could not create \"{}\"", p.display()), e))
}

/// Writes `content` to `dir/name` through `name.tmp`, fsync, rename, fsync of `dir`.
pub fn write_atomically(dir: &Path, name: &str, content: &[u8], sync: bool) -> Result<()> {
    write_atomically_with_mode(dir, name, content, 0o600, sync)
}

/// [`write_atomically`] with the file's mode (the cluster's: 0600, or 0640 with group access).
pub fn write_atomically_with_mode(
    dir: &Path,
    name: &str,
    content: &[u8],
    mode: u32,
    sync: bool,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::io(format!("could not create \"{}\"", tmp.display()), e))?;
    set_mode(&f, &tmp, mode)?;
    f.write_all(content)
        .map_err(|e| Error::io(format!("could not write \"{}\"", tmp.display()), e))?;
    if sync {
        f.sync_all()
            .map_err(|e| Error::io(format!("could not fsync \"{}\"", tmp.display()), e))?;
    }
    drop(f);
    rename_durably(&tmp, &dst, sync)
}

/// Renames and, when `sync`, fsyncs the file and the directory holding it.
pub fn rename_durably(from: &Path, to: &Path, sync: bool) -> Result<()> {
    if sync {
        fsync_path(from)?;
    }
    fs::rename(from, to).map_err(|e| {
        Error::io(
            format!(
                "could not rename \"{}\" to \"{}\"",
                from.display(),
                to.display()
            ),
            e,
        )
    })?;
    if sync {
        if let Some(parent) = to.parent() {
            fsync_path(parent)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temp_file_and_sync_walks_everything() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        fs::write(d.path().join("a/b/f"), b"x").unwrap();
        write_atomically(d.path(), "backup_manifest", b"{}\n", true).unwrap();
        assert_eq!(fs::read(d.path().join("backup_manifest")).unwrap(), b"{}\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(d.path().join("backup_manifest"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!d.path().join("backup_manifest.tmp").exists());
        sync_trees(&[d.path().to_path_buf()], 3).unwrap();
        let (files, dirs) = walk(&[d.path().to_path_buf()]).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(dirs.len(), 3);
    }
}
