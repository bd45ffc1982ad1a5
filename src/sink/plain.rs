//! The plain format's rules, for every sink and method: `-T` tablespace mappings, paths the
//! server sends checked to stay inside their root, directories prepared empty, and modes
//! that follow the server's (0700/0600, or 0750/0640 with group access). No writing of data.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::relpath::RelPath;

/// `-T OLD=NEW` mappings.
#[derive(Debug, Clone, Default)]
pub struct TablespaceMap(pub Vec<(PathBuf, PathBuf)>);

impl TablespaceMap {
    /// Parses one `OLD=NEW` argument (`\=` escapes an equals sign), as pg_basebackup does.
    pub fn parse_arg(arg: &str) -> Result<(PathBuf, PathBuf)> {
        let bad = |why: &str| Error::Usage(format!("invalid tablespace mapping \"{arg}\": {why}"));
        let mut old = String::new();
        let mut new = String::new();
        let mut seen_eq = false;
        let mut chars = arg.chars().peekable();
        while let Some(c) = chars.next() {
            let cur = if seen_eq { &mut new } else { &mut old };
            match c {
                '\\' if chars.peek() == Some(&'=') => {
                    cur.push('=');
                    chars.next();
                }
                '=' if !seen_eq => seen_eq = true,
                '=' => return Err(bad("multiple \"=\" signs")),
                c => cur.push(c),
            }
        }
        if !seen_eq || old.is_empty() || new.is_empty() {
            return Err(bad("must be in OLDDIR=NEWDIR format"));
        }
        let (old, new) = (PathBuf::from(old), PathBuf::from(new));
        if !old.is_absolute() {
            return Err(bad("old directory is not an absolute path"));
        }
        if !new.is_absolute() {
            return Err(bad("new directory is not an absolute path"));
        }
        Ok((clean(&old), clean(&new)))
    }

    /// Where a tablespace at server path `old` goes in this backup.
    pub fn map(&self, old: &Path) -> PathBuf {
        let old = clean(old);
        self.0
            .iter()
            .find(|(o, _)| *o == old)
            .map(|(_, n)| n.clone())
            .unwrap_or(old)
    }
}

/// Removes `.` components and trailing slashes (no symlink resolution).
fn clean(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// Checks that an archive path is relative and stays inside its root; the path under
/// exactly its bytes.
pub fn safe_relative(p: &RelPath) -> Result<&Path> {
    let path = p.as_path();
    if p.is_empty()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(Error::Protocol(format!(
            "server sent an unsafe path \"{p}\" (absolute or with \"..\")"
        )));
    }
    Ok(path)
}

/// Prepares a target directory: creates it (and parents) when missing, or checks that it is
/// empty. Returns whether we created it (so cleanup removes it rather than its contents).
pub fn prepare_empty_dir(dir: &Path, what: &str) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(Error::Usage(format!(
                    "{what} \"{}\" exists but is not empty",
                    dir.display()
                )));
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    Error::Usage(format!(
                        "could not create {what} \"{}\": {e}",
                        dir.display()
                    ))
                })?;
            Ok(true)
        }
        Err(e) => Err(Error::Usage(format!(
            "could not access {what} \"{}\": {e}",
            dir.display()
        ))),
    }
}

/// Creates a directory with a mode (ignoring one that already exists).
pub fn make_dir(p: &Path, mode: u32) -> Result<()> {
    match fs::DirBuilder::new().mode(mode).create(p) {
        // Exactly `mode`, whatever the umask (see durable::set_mode).
        Ok(()) => fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(format!("could not set the mode of \"{}\"", p.display()), e))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {}
        Err(e) => {
            return Err(Error::io(
                format!("could not create directory \"{}\"", p.display()),
                e,
            ))
        }
    }
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(|e| {
        Error::io(
            format!("could not set permissions on \"{}\"", p.display()),
            e,
        )
    })
}

/// Server mode bits reduced to what PostgreSQL uses (owner, optionally group read).
pub fn dir_mode(m: u32) -> u32 {
    if m == 0 {
        0o700
    } else {
        (m & 0o750) | 0o700
    }
}

/// See [`dir_mode`].
pub fn file_mode(m: u32) -> u32 {
    if m == 0 {
        0o600
    } else {
        (m & 0o640) | 0o600
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tablespace_mapping_arguments() {
        let (o, n) = TablespaceMap::parse_arg("/srv/a\\=b=/backup/ts/").unwrap();
        assert_eq!(o, PathBuf::from("/srv/a=b"));
        assert_eq!(n, PathBuf::from("/backup/ts"));
        for bad in ["/a", "a=/b", "/a=b", "=/b", "/a=", "/a=/b=/c"] {
            let e = TablespaceMap::parse_arg(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
        let m = TablespaceMap(vec![(o, n)]);
        assert_eq!(m.map(Path::new("/srv/a=b/")), PathBuf::from("/backup/ts"));
        assert_eq!(m.map(Path::new("/other")), PathBuf::from("/other"));
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let safe = |p: &[u8]| safe_relative(&RelPath::from(p)).map(|p| p.to_path_buf());
        assert!(safe(b"../etc/passwd").is_err());
        assert!(safe(b"/etc/passwd").is_err());
        assert!(safe(b"base/../../x").is_err());
        assert!(safe(b"\xff/../../x").is_err());
        assert!(safe(b"").is_err());
        assert!(safe(b"base/1/1259").is_ok());
        // A name that is not UTF-8 is kept, byte for byte.
        use std::os::unix::ffi::OsStrExt;
        let p = safe(b"base/caf\xe9").unwrap();
        assert_eq!(p.as_os_str().as_bytes(), b"base/caf\xe9");
    }

    #[test]
    fn modes_keep_group_read_only() {
        assert_eq!(dir_mode(0o755), 0o750);
        assert_eq!(file_mode(0o644), 0o640);
        assert_eq!(file_mode(0o600), 0o600);
        assert_eq!(dir_mode(0), 0o700);
    }
}
