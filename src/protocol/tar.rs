//! A streaming ustar parser, without I/O.
//!
//! PostgreSQL's BASE_BACKUP sends ustar archives: 512-byte headers, data padded to 512, two
//! zero blocks at the end; sizes in octal, or base-256 for files of 8 GiB and more. The
//! parser accepts input cut anywhere and reports entries, data slices and entry ends to a
//! callback, so the sink never sees tar framing.

use crate::error::{Error, Result};
use crate::relpath::RelPath;

/// Kind of a tar member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
}

/// A member's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a trailing slash: the name's bytes as the server
    /// has them (not necessarily UTF-8).
    pub path: RelPath,
    /// Kind.
    pub kind: EntryKind,
    /// Data size (0 for directories and links).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Link target for symlinks (a tablespace's location, as text).
    pub link: String,
}

/// What the parser found.
#[derive(Debug, PartialEq, Eq)]
pub enum TarEvent<'a> {
    /// A member starts.
    Entry(Entry),
    /// Some of its data.
    Data(&'a [u8]),
    /// The member's data is complete.
    EntryEnd,
    /// The end-of-archive marker was seen.
    End,
}

enum State {
    Header,
    Data { remaining: u64, pad: usize },
    Pad(usize),
    Done,
}

/// The parser. Feed it bytes in any chunks.
pub struct TarParser {
    state: State,
    hdr: [u8; 512],
    filled: usize,
}

impl Default for TarParser {
    fn default() -> Self {
        TarParser {
            state: State::Header,
            hdr: [0; 512],
            filled: 0,
        }
    }
}

fn cstr_field(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn number(b: &[u8], what: &str) -> Result<u64> {
    if b[0] & 0x80 != 0 {
        // base-256: the remaining bits, big-endian.
        let mut v: u64 = (b[0] & 0x7f) as u64;
        for &c in &b[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(c as u64))
                .ok_or_else(|| Error::Protocol(format!("tar {what} field overflows")))?;
        }
        return Ok(v);
    }
    let s = std::str::from_utf8(cstr_field(b))
        .map_err(|_| Error::Protocol(format!("tar {what} field is not text")))?
        .trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8)
        .map_err(|_| Error::Protocol(format!("tar {what} field \"{s}\" is not octal")))
}

fn parse_header(h: &[u8; 512]) -> Result<Entry> {
    let stored: u64 = number(&h[148..156], "checksum")?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if (148..156).contains(&i) {
                b' ' as u64
            } else {
                c as u64
            }
        })
        .sum();
    if sum != stored {
        return Err(Error::Protocol(format!(
            "tar header checksum mismatch (stored {stored}, computed {sum})"
        )));
    }
    let name = cstr_field(&h[0..100]);
    let prefix = if &h[257..262] == b"ustar" {
        cstr_field(&h[345..500])
    } else {
        &[]
    };
    let mut path = RelPath::new(prefix).join(name).as_bytes().to_vec();
    while path.last() == Some(&b'/') {
        path.pop();
    }
    let path = RelPath::new(path);
    let kind = match h[156] {
        b'0' | 0 | b'7' => EntryKind::File,
        b'5' => EntryKind::Dir,
        b'2' => EntryKind::Symlink,
        other => {
            return Err(Error::Protocol(format!(
                "unsupported tar member type '{}' for \"{path}\"",
                other as char
            )))
        }
    };
    let size = number(&h[124..136], "size")?;
    Ok(Entry {
        path,
        kind,
        size: if kind == EntryKind::File { size } else { 0 },
        mode: number(&h[100..108], "mode")? as u32 & 0o7777,
        mtime: number(&h[136..148], "mtime")? as i64,
        link: String::from_utf8_lossy(cstr_field(&h[157..257])).into_owned(),
    })
}

impl TarParser {
    /// Consumes `data`, reporting events. Bytes after the end marker are ignored.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        out: &mut dyn FnMut(TarEvent<'_>) -> Result<()>,
    ) -> Result<()> {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Header => {
                    let n = (512 - self.filled).min(data.len());
                    self.hdr[self.filled..self.filled + n].copy_from_slice(&data[..n]);
                    self.filled += n;
                    data = &data[n..];
                    if self.filled < 512 {
                        continue;
                    }
                    self.filled = 0;
                    if self.hdr.iter().all(|&c| c == 0) {
                        self.state = State::Done;
                        out(TarEvent::End)?;
                        continue;
                    }
                    let e = parse_header(&self.hdr)?;
                    let size = e.size;
                    out(TarEvent::Entry(e))?;
                    if size == 0 {
                        out(TarEvent::EntryEnd)?;
                        self.state = State::Header;
                    } else {
                        let pad = ((512 - size % 512) % 512) as usize;
                        self.state = State::Data {
                            remaining: size,
                            pad,
                        };
                    }
                }
                State::Data { remaining, pad } => {
                    let n = (*remaining).min(data.len() as u64) as usize;
                    out(TarEvent::Data(&data[..n]))?;
                    data = &data[n..];
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        let pad = *pad;
                        out(TarEvent::EntryEnd)?;
                        self.state = if pad > 0 {
                            State::Pad(pad)
                        } else {
                            State::Header
                        };
                    }
                }
                State::Pad(p) => {
                    let n = (*p).min(data.len());
                    data = &data[n..];
                    *p -= n;
                    if *p == 0 {
                        self.state = State::Header;
                    }
                }
            }
        }
        Ok(())
    }

    /// True once the end-of-archive marker was seen.
    pub fn finished(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStrExt;

    /// An archive built by the `tar` crate as an independent oracle.
    fn sample() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_path("base/1/").unwrap();
        h.set_mode(0o700);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        for (name, len) in [
            ("base/1/1259", 8192usize * 3),
            ("PG_VERSION", 3),
            ("empty", 0),
            ("odd", 513),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut h = tar::Header::new_ustar();
            h.set_path(name).unwrap();
            h.set_mode(0o600);
            h.set_size(len as u64);
            h.set_mtime(1_700_000_001);
            h.set_cksum();
            b.append(&h, &data[..]).unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_path("pg_tblspc/16384").unwrap();
        h.set_link_name("/srv/ts1").unwrap();
        h.set_mode(0o777);
        h.set_size(0);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        // Names that are not UTF-8, one in the name field, one long enough for ustar's
        // prefix field to hold part of it.
        let long = [&b"base/"[..], &[b'd'; 120], b"/\xff\xfe"].concat();
        for name in [&b"caf\xe9"[..], &long] {
            let mut h = tar::Header::new_ustar();
            h.set_path(std::ffi::OsStr::from_bytes(name)).unwrap();
            h.set_mode(0o600);
            h.set_size(2);
            h.set_cksum();
            b.append(&h, &b"ok"[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn collect(chunks: &[&[u8]]) -> Vec<(Entry, Vec<u8>)> {
        let mut p = TarParser::default();
        let mut out: Vec<(Entry, Vec<u8>)> = Vec::new();
        for c in chunks {
            p.feed(c, &mut |ev| {
                match ev {
                    TarEvent::Entry(e) => out.push((e, Vec::new())),
                    TarEvent::Data(d) => out.last_mut().unwrap().1.extend_from_slice(d),
                    TarEvent::EntryEnd | TarEvent::End => {}
                }
                Ok(())
            })
            .unwrap();
        }
        assert!(p.finished());
        out
    }

    #[test]
    fn parses_members_of_every_kind() {
        let a = sample();
        let got = collect(&[&a]);
        let names: Vec<_> = got
            .iter()
            .map(|(e, _)| (e.path.to_string(), e.kind, e.size))
            .collect();
        assert_eq!(
            names,
            vec![
                ("base/1".to_string(), EntryKind::Dir, 0),
                ("base/1/1259".to_string(), EntryKind::File, 24576),
                ("PG_VERSION".to_string(), EntryKind::File, 3),
                ("empty".to_string(), EntryKind::File, 0),
                ("odd".to_string(), EntryKind::File, 513),
                ("pg_tblspc/16384".to_string(), EntryKind::Symlink, 0),
                ("caf\\xe9".to_string(), EntryKind::File, 2),
                (
                    format!("base/{}/\\xff\\xfe", "d".repeat(120)),
                    EntryKind::File,
                    2
                ),
            ]
        );
        assert_eq!(got[6].0.path.as_bytes(), b"caf\xe9");
        assert_eq!(got[7].0.path.split_last().1, b"\xff\xfe");
        assert_eq!(got[5].0.link, "/srv/ts1");
        assert_eq!(got[1].0.mode, 0o600);
        assert_eq!(got[4].1.len(), 513);
        assert_eq!(got[4].1[512], (512 * 7 % 251) as u8);
    }

    #[test]
    fn base256_size_and_bad_checksum() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 0x02;
        f[10] = 0x01;
        assert_eq!(number(&f, "size").unwrap(), 0x0102);
        let mut a = sample();
        a[0] ^= 1;
        let mut p = TarParser::default();
        assert!(p.feed(&a, &mut |_| Ok(())).is_err());
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_members(cuts in proptest::collection::vec(1usize..1500, 1..30)) {
            let a = sample();
            let whole = collect(&[&a]);
            let mut chunks = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < a.len() {
                let n = cuts[i % cuts.len()].min(a.len() - pos);
                chunks.push(&a[pos..pos + n]);
                pos += n;
                i += 1;
            }
            prop_assert_eq!(collect(&chunks), whole);
        }
    }
}
