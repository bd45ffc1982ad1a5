//! File names as the server has them: bytes, not text.
//!
//! A name in a data directory is whatever bytes a program gave `open()`: PostgreSQL itself
//! only writes ASCII names, but a DBA's stray file may be called `caf\xe9` (Latin-1) or
//! `\xff\xfe`. Every method carries such a name as the server sent it ([`RelPath`]), writes
//! the file under exactly those bytes ([`RelPath::as_path`]) and puts it in the manifest as
//! PostgreSQL does (`Encoded-Path`, hex, when the name is not UTF-8: [`crate::manifest`]).
//! Only messages turn it into text, through [`Display`](std::fmt::Display), which shows each
//! byte that is not part of valid UTF-8 as `\xNN`.
//!
//! BASE_BACKUP's exclusion rules ([`crate::exclusions`]) match ASCII names only; they take the
//! lossy text form ([`RelPath::to_text_lossy`]): a name with a byte that is not UTF-8 there
//! holds U+FFFD, which is not ASCII, so no rule matches it where it would not match the
//! bytes, and every rule that matches the bytes (a prefix such as `pgsql_tmp`) matches it.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A path relative to the data directory (or a tablespace), `/`-separated, as bytes.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// The path with these bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> RelPath {
        RelPath(bytes.into())
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes as an OS string (Unix: the same bytes).
    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }

    /// The bytes as a filesystem path (Unix: the same bytes).
    pub fn as_path(&self) -> &Path {
        Path::new(self.as_os_str())
    }

    /// The path as text, when it is valid UTF-8.
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// The path as text, each byte that is not part of valid UTF-8 replaced by U+FFFD (for
    /// name rules that match ASCII only; see the module doc). Never for a file name to use.
    pub fn to_text_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }

    /// True for the empty path.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `self/name` (`name` alone when `self` is empty).
    pub fn join(&self, name: &[u8]) -> RelPath {
        if self.0.is_empty() {
            return RelPath(name.to_vec());
        }
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        v.push(b'/');
        v.extend_from_slice(name);
        RelPath(v)
    }

    /// The parent directory's path (empty at the top) and the last component.
    pub fn split_last(&self) -> (&[u8], &[u8]) {
        split_last(&self.0)
    }

    /// The rest of the path after `prefix` (bytes), if it starts with it.
    pub fn strip_prefix(&self, prefix: &[u8]) -> Option<RelPath> {
        self.0.strip_prefix(prefix).map(|r| RelPath(r.to_vec()))
    }

    /// Whether the path starts with `prefix` (bytes).
    pub fn starts_with(&self, prefix: &[u8]) -> bool {
        self.0.starts_with(prefix)
    }
}

/// The parent (empty at the top) and the last component of a `/`-separated byte path.
pub fn split_last(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|&c| c == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&[], p),
    }
}

/// Writes `bytes` as text: valid UTF-8 as it is, every other byte as `\xNN`.
pub fn fmt_bytes(bytes: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for chunk in bytes.utf8_chunks() {
        f.write_str(chunk.valid())?;
        for b in chunk.invalid() {
            write!(f, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// `bytes` as text for a message: valid UTF-8 as it is, every other byte as `\xNN` (a
/// server's message naming such a file, with client_encoding SQL_ASCII, holds its bytes).
pub fn escaped(bytes: &[u8]) -> String {
    struct E<'a>(&'a [u8]);
    impl fmt::Display for E<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt_bytes(self.0, f)
        }
    }
    E(bytes).to_string()
}

/// The path for messages: valid UTF-8 as it is, other bytes as `\xNN` (`caf\xe9`).
impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_bytes(&self.0, f)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl AsRef<Path> for RelPath {
    fn as_ref(&self) -> &Path {
        self.as_path()
    }
}

impl From<&str> for RelPath {
    fn from(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }
}

impl From<String> for RelPath {
    fn from(s: String) -> RelPath {
        RelPath(s.into_bytes())
    }
}

impl From<Vec<u8>> for RelPath {
    fn from(v: Vec<u8>) -> RelPath {
        RelPath(v)
    }
}

impl From<&[u8]> for RelPath {
    fn from(v: &[u8]) -> RelPath {
        RelPath(v.to_vec())
    }
}

impl PartialEq<str> for RelPath {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for RelPath {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_that_are_not_utf8_keep_their_bytes_and_show_them_escaped() {
        let p = RelPath::new(b"base/caf\xe9".to_vec());
        assert_eq!(p.to_string(), "base/caf\\xe9");
        assert_eq!(p.as_path().as_os_str().as_bytes(), b"base/caf\xe9");
        assert_eq!(p.to_str(), None);
        assert_eq!(p.split_last(), (&b"base"[..], &b"caf\xe9"[..]));
        let ff = RelPath::new(vec![0xff, 0xfe]);
        assert_eq!(ff.to_string(), "\\xff\\xfe");
        assert_eq!(
            escaped(b"could not open file \"caf\xe9\""),
            "could not open file \"caf\\xe9\""
        );
        assert_eq!(format!("{ff:?}"), "\"\\xff\\xfe\"");
        // Valid UTF-8 is shown as it is, a truncated sequence byte by byte.
        assert_eq!(RelPath::from("café").to_string(), "café");
        assert_eq!(RelPath::new(b"x\xc3".to_vec()).to_string(), "x\\xc3");
        assert_eq!(RelPath::from("top").split_last(), (&b""[..], &b"top"[..]));
        assert_eq!(
            RelPath::default().join(b"a").join(b"\xff"),
            RelPath::new(b"a/\xff".to_vec())
        );
        assert_eq!(
            RelPath::from("pg_tblspc/16400/PG_17/5/\u{1}").strip_prefix(b"pg_tblspc/16400/"),
            Some(RelPath::from("PG_17/5/\u{1}"))
        );
        // The UTF-8 spelling of the same name is another name.
        assert!(p != "base/café");
    }

    #[test]
    fn lossy_text_matches_ascii_rules_as_the_bytes_do() {
        let p = RelPath::new(b"pgsql_tmp\xff".to_vec());
        assert!(p.to_text_lossy().starts_with("pgsql_tmp"));
        assert_ne!(
            RelPath::new(b"PG_VERSIO\xce".to_vec()).to_text_lossy(),
            "PG_VERSION"
        );
    }

    proptest! {
        #[test]
        fn display_is_the_text_for_utf8_and_never_loses_a_byte(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let p = RelPath::new(b.clone());
            let shown = p.to_string();
            match std::str::from_utf8(&b) {
                Ok(s) => prop_assert_eq!(shown, s),
                Err(_) => {
                    let escapes = shown.matches("\\x").count();
                    prop_assert!(escapes > 0);
                    // Every invalid byte is there as two hex digits.
                    let invalid: usize = b.utf8_chunks().map(|c| c.invalid().len()).sum();
                    prop_assert!(escapes >= invalid);
                }
            }
        }
    }
}
