//! `backup_manifest` written by the client, in exactly the format PostgreSQL's own server
//! writes and `pg_verifybackup` reads (src/backend/backup/backup_manifest.c): version 2 with
//! System-Identifier for PostgreSQL 17 (version 1 before), one line per file, WAL-Ranges,
//! and a SHA-256 Manifest-Checksum over every byte before its own line.

use sha2::{Digest, Sha256};

use crate::lsn::Lsn;

/// Per-file checksum algorithms, as the manifest (and `--manifest-checksums`) names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumKind {
    /// No checksum.
    None,
    /// CRC-32C (the default).
    Crc32c,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl ChecksumKind {
    /// The name written in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            ChecksumKind::None => "NONE",
            ChecksumKind::Crc32c => "CRC32C",
            ChecksumKind::Sha224 => "SHA224",
            ChecksumKind::Sha256 => "SHA256",
            ChecksumKind::Sha384 => "SHA384",
            ChecksumKind::Sha512 => "SHA512",
        }
    }

    /// Computes the digest of `data` in the manifest's byte order.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            ChecksumKind::None => Vec::new(),
            ChecksumKind::Crc32c => crc32c::crc32c(data).to_le_bytes().to_vec(),
            ChecksumKind::Sha224 => sha2::Sha224::digest(data).to_vec(),
            ChecksumKind::Sha256 => sha2::Sha256::digest(data).to_vec(),
            ChecksumKind::Sha384 => sha2::Sha384::digest(data).to_vec(),
            ChecksumKind::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }
}

/// A CRC-32C as the manifest stores it: the host-order (little-endian) bytes of the value.
pub fn crc32c_bytes(crc: u32) -> Vec<u8> {
    crc.to_le_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// JSON string escaping as PostgreSQL's `escape_json`.
fn escape_json(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `YYYY-MM-DD HH:MM:SS GMT` for seconds since the epoch.
pub fn gmt(ts: i64) -> String {
    let days = ts.div_euclid(86_400);
    let secs = ts.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} GMT",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// One WAL range of the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRange {
    /// Timeline.
    pub timeline: u32,
    /// First LSN needed on it.
    pub start: Lsn,
    /// Last LSN needed on it.
    pub end: Lsn,
}

/// Builds a manifest file by file.
pub struct ManifestBuilder {
    text: String,
    first: bool,
    kind: ChecksumKind,
}

impl ManifestBuilder {
    /// Starts a manifest; `system_identifier` makes it version 2 (PostgreSQL 17 and later).
    pub fn new(system_identifier: Option<u64>, kind: ChecksumKind) -> ManifestBuilder {
        let text = match system_identifier {
            Some(id) => format!(
                "{{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": {id},\n\"Files\": ["
            ),
            None => "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [".to_string(),
        };
        ManifestBuilder {
            text,
            first: true,
            kind,
        }
    }

    /// The checksum algorithm of this manifest.
    pub fn kind(&self) -> ChecksumKind {
        self.kind
    }

    /// Adds a file. `path` is relative to the data directory (tablespace files as
    /// `pg_tblspc/<oid>/…`), as raw bytes: a path that is not UTF-8 is hex-encoded.
    pub fn add_file(&mut self, path: &[u8], size: u64, mtime: i64, checksum: &[u8]) {
        self.text.push_str(if self.first { "\n" } else { ",\n" });
        self.first = false;
        self.text.push_str("{ ");
        match std::str::from_utf8(path) {
            Ok(p) => {
                self.text.push_str("\"Path\": ");
                escape_json(p, &mut self.text);
            }
            Err(_) => {
                self.text.push_str("\"Encoded-Path\": \"");
                self.text.push_str(&hex(path));
                self.text.push('"');
            }
        }
        self.text.push_str(&format!(
            ", \"Size\": {size}, \"Last-Modified\": \"{}\"",
            gmt(mtime)
        ));
        if self.kind != ChecksumKind::None {
            self.text.push_str(&format!(
                ", \"Checksum-Algorithm\": \"{}\", \"Checksum\": \"{}\"",
                self.kind.name(),
                hex(checksum)
            ));
        }
        self.text.push_str(" }");
    }

    /// Adds the WAL ranges (newest timeline first) and the checksum; returns the file's bytes.
    pub fn finish(mut self, ranges: &[WalRange]) -> Vec<u8> {
        self.text.push_str("\n],\n\"WAL-Ranges\": [\n");
        for (i, r) in ranges.iter().enumerate() {
            if i > 0 {
                self.text.push_str(",\n");
            }
            self.text.push_str(&format!(
                "{{ \"Timeline\": {}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}",
                r.timeline, r.start, r.end
            ));
        }
        self.text.push_str("\n],\n");
        let sum = Sha256::digest(self.text.as_bytes());
        self.text
            .push_str(&format!("\"Manifest-Checksum\": \"{}\"}}\n", hex(&sum)));
        self.text.into_bytes()
    }
}

/// The WAL ranges between `start` on `start_tli` and `end` on `end_tli`, given the end
/// timeline's history file (`parent_tli<TAB>switchpoint<TAB>reason` lines), newest first,
/// as the server's AddWALInfoToBackupManifest computes them.
pub fn wal_ranges(
    start: Lsn,
    start_tli: u32,
    end: Lsn,
    end_tli: u32,
    history: &str,
) -> Vec<WalRange> {
    if start_tli == end_tli {
        return vec![WalRange {
            timeline: end_tli,
            start,
            end,
        }];
    }
    // (tli, begin, end) for each timeline in the history, plus the end timeline.
    let mut tls: Vec<(u32, Lsn)> = Vec::new(); // (tli, switchpoint where it ended)
    for line in history.lines() {
        let mut f = line.split_whitespace();
        let (Some(t), Some(sp)) = (f.next(), f.next()) else {
            continue;
        };
        if let (Ok(t), Ok(sp)) = (t.parse::<u32>(), sp.parse::<Lsn>()) {
            tls.push((t, sp));
        }
    }
    let mut out = Vec::new();
    let mut cur_end = end;
    let mut cur_tli = end_tli;
    // Walk back from the newest timeline.
    for (t, sp) in tls.iter().rev() {
        // cur_tli began at the switch point `sp` of its parent `t`.
        out.push(WalRange {
            timeline: cur_tli,
            start: if cur_tli == start_tli { start } else { *sp },
            end: cur_end,
        });
        if cur_tli == start_tli {
            return out;
        }
        cur_end = *sp;
        cur_tli = *t;
    }
    out.push(WalRange {
        timeline: cur_tli,
        start,
        end: cur_end,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_as_the_server_writes_them() {
        assert_eq!(gmt(0), "1970-01-01 00:00:00 GMT");
        assert_eq!(gmt(1_700_000_000), "2023-11-14 22:13:20 GMT");
        assert_eq!(gmt(951_782_400), "2000-02-29 00:00:00 GMT");
    }

    #[test]
    fn format_and_checksum_match_the_server() {
        let mut m = ManifestBuilder::new(Some(7), ChecksumKind::Crc32c);
        m.add_file(b"PG_VERSION", 3, 0, &crc32c_bytes(crc32c::crc32c(b"17\n")));
        m.add_file(b"a\"b", 0, 0, &crc32c_bytes(0));
        m.add_file(&[0xff, 0x41], 1, 0, &crc32c_bytes(0));
        // What PostgreSQL's pg_verify_mbstr(PG_UTF8) refuses is hex too: a Latin-1 name, a
        // surrogate, an overlong form, a code point past U+10FFFF; valid UTF-8 stays text.
        m.add_file(b"caf\xe9", 1, 0, &crc32c_bytes(0));
        m.add_file(b"\xed\xa0\x80", 1, 0, &crc32c_bytes(0));
        m.add_file(b"\xc0\xaf", 1, 0, &crc32c_bytes(0));
        m.add_file(b"\xf4\x90\x80\x80", 1, 0, &crc32c_bytes(0));
        m.add_file("café/\u{10ffff}".as_bytes(), 1, 0, &crc32c_bytes(0));
        let text = String::from_utf8(m.finish(&[WalRange {
            timeline: 1,
            start: Lsn(0x28),
            end: Lsn(0x100),
        }]))
        .unwrap();
        assert!(text.starts_with(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 7,\n\"Files\": [\n{ \"Path\": \"PG_VERSION\", \"Size\": 3, \"Last-Modified\": \"1970-01-01 00:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \""
        ));
        assert!(text.contains("\"Path\": \"a\\\"b\""));
        assert!(text.contains("\"Encoded-Path\": \"ff41\""));
        for hex in ["636166e9", "eda080", "c0af", "f4908080"] {
            assert!(
                text.contains(&format!("{{ \"Encoded-Path\": \"{hex}\", \"Size\": 1, ")),
                "{hex}"
            );
        }
        assert!(text.contains("{ \"Path\": \"café/\u{10ffff}\", \"Size\": 1, "));
        assert!(text.contains("\n],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/28\", \"End-LSN\": \"0/100\" }\n],\n\"Manifest-Checksum\": \""));
        let cut = text.rfind("\"Manifest-Checksum\"").unwrap();
        let want = hex(&Sha256::digest(&text.as_bytes()[..cut]));
        assert!(text.ends_with(&format!("\"Manifest-Checksum\": \"{want}\"}}\n")));
        // The server's CRC32C bytes for "17\n" in host order.
        assert_eq!(crc32c_bytes(0x1234_5678), vec![0x78, 0x56, 0x34, 0x12]);
    }

    #[test]
    fn ranges_across_a_timeline_switch() {
        let r = wal_ranges(
            Lsn(0x100),
            1,
            Lsn(0x900),
            2,
            "1\t0/500\tno recovery target specified\n",
        );
        assert_eq!(
            r,
            vec![
                WalRange {
                    timeline: 2,
                    start: Lsn(0x500),
                    end: Lsn(0x900)
                },
                WalRange {
                    timeline: 1,
                    start: Lsn(0x100),
                    end: Lsn(0x500)
                },
            ]
        );
        assert_eq!(
            wal_ranges(Lsn(1), 3, Lsn(2), 3, ""),
            vec![WalRange {
                timeline: 3,
                start: Lsn(1),
                end: Lsn(2)
            }]
        );
    }
}
