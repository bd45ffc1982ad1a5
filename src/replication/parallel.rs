//! The parallel backup commands (protocol-notes/parallel-backup.md): START_BACKUP,
//! SEND_FILE_LIST, SEND_FILES_CONTENT, STOP_BACKUP. Command builders, typed results, and the
//! SEND_FILES_CONTENT CopyData framing (parsed without I/O).

use bytes::{Buf, Bytes};

use super::quote_literal;
use crate::conn::{Connection, Event, Row};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::plan::{FileEntry, FileKind};

/// A tablespace row of START_BACKUP.
#[derive(Debug, Clone)]
pub struct Tablespace {
    /// OID, `None` for the main data directory.
    pub oid: Option<u32>,
    /// Location on the server.
    pub location: Option<String>,
    /// Bytes of regular files (an estimate for progress).
    pub size: u64,
}

/// START_BACKUP's answer.
#[derive(Debug, Clone)]
pub struct StartInfo {
    /// Start (redo) LSN.
    pub start_lsn: Lsn,
    /// Its timeline.
    pub timeline: u32,
    /// The backup id workers name.
    pub backup_id: String,
    /// Contents of `backup_label`.
    pub backup_label: String,
    /// Contents of `tablespace_map` (empty without tablespaces).
    pub tablespace_map: String,
    /// Tablespaces, the main data directory last.
    pub tablespaces: Vec<Tablespace>,
}

fn text(r: &Row, i: usize, what: &str) -> Result<String> {
    r.get(i)
        .map(str::to_string)
        .ok_or_else(|| Error::Protocol(format!("missing {what}")))
}

fn num<T: std::str::FromStr>(r: &Row, i: usize, what: &str) -> Result<T> {
    r.get(i)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("missing or invalid {what}")))
}

/// Runs START_BACKUP on the leader.
pub async fn start_backup(c: &mut Connection, label: &str, fast: bool) -> Result<StartInfo> {
    let cmd = format!(
        "START_BACKUP (LABEL {}, CHECKPOINT '{}')",
        quote_literal(label),
        if fast { "fast" } else { "spread" }
    );
    let sets = c
        .simple_query(&cmd)
        .await
        .map_err(|e| e.context("START_BACKUP failed"))?;
    let first = sets
        .first()
        .and_then(|s| s.rows.first())
        .ok_or_else(|| Error::Protocol("START_BACKUP returned no row".into()))?;
    let tablespaces = sets
        .get(1)
        .map(|s| {
            s.rows
                .iter()
                .map(|r| Tablespace {
                    oid: r.get(0).and_then(|v| v.parse().ok()),
                    location: r.get(1).map(str::to_string),
                    size: r.get(2).and_then(|v| v.parse().ok()).unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(StartInfo {
        start_lsn: text(first, 0, "start_lsn")?.parse()?,
        timeline: num(first, 1, "timeline")?,
        backup_id: text(first, 2, "backup_id")?,
        backup_label: text(first, 3, "backup_label")?,
        tablespace_map: r_opt(first, 4),
        tablespaces,
    })
}

fn r_opt(r: &Row, i: usize) -> String {
    r.get(i).unwrap_or_default().to_string()
}

/// Runs SEND_FILE_LIST, converting rows as they arrive (no raw rows are kept).
pub async fn send_file_list(c: &mut Connection, backup_id: &str) -> Result<Vec<FileEntry>> {
    c.start_query(&format!(
        "SEND_FILE_LIST (BACKUP_ID {})",
        quote_literal(backup_id)
    ))
    .await?;
    let mut out = Vec::new();
    while let Some(ev) = c
        .next_event()
        .await
        .map_err(|e| e.context("SEND_FILE_LIST failed"))?
    {
        match ev {
            Event::DataRow(r) => {
                let kind = match r.get(1) {
                    Some("d") => FileKind::Dir,
                    Some("f") => FileKind::File,
                    Some("l") => FileKind::Link,
                    other => {
                        return Err(Error::Protocol(format!(
                            "SEND_FILE_LIST: unknown type {other:?}"
                        )))
                    }
                };
                out.push(FileEntry {
                    path: text(&r, 0, "path")?,
                    kind,
                    size: num(&r, 2, "size")?,
                    mtime: num(&r, 3, "mtime")?,
                    link_target: r.get(4).map(str::to_string),
                    spcoid: r.get(5).and_then(|v| v.parse().ok()),
                });
            }
            Event::RowDescription(_) | Event::CommandComplete(_) => {}
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} from SEND_FILE_LIST"
                )))
            }
        }
    }
    Ok(out)
}

/// The SEND_FILES_CONTENT command for `(path, offset, length)` ranges.
pub fn files_content_command(backup_id: &str, ranges: &[(&str, u64, u64)], verify: bool) -> String {
    let files: Vec<String> = ranges
        .iter()
        .map(|(p, o, l)| format!("{} {o} {l}", quote_literal(p)))
        .collect();
    format!(
        "SEND_FILES_CONTENT (BACKUP_ID {}, VERIFY_CHECKSUMS {}, FILES ({}))",
        quote_literal(backup_id),
        verify,
        files.join(", ")
    )
}

/// A CopyData message of SEND_FILES_CONTENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentMessage {
    /// A file or range starts; `length` is `None` when the file is missing.
    Header {
        /// First byte.
        offset: u64,
        /// Bytes that follow, `None` for a missing file.
        length: Option<u64>,
        /// The path as requested.
        path: Bytes,
    },
    /// File bytes.
    Data(Bytes),
    /// The file or range ended.
    Trailer {
        /// Bytes sent.
        bytes_sent: u64,
        /// Pages that failed checksum verification.
        failures: u32,
        /// The first failing block numbers, relative to the file.
        blocks: Vec<u32>,
    },
}

/// Parses one CopyData payload of SEND_FILES_CONTENT.
pub fn parse_content(mut b: Bytes) -> Result<ContentMessage> {
    let short = || Error::Protocol("short message in SEND_FILES_CONTENT stream".into());
    if b.is_empty() {
        return Err(short());
    }
    match b.get_u8() {
        b'H' => {
            if b.len() < 17 {
                return Err(short());
            }
            let offset = b.get_u64();
            let length = b.get_i64();
            let end = b.iter().position(|&c| c == 0).ok_or_else(short)?;
            let path = b.split_to(end);
            Ok(ContentMessage::Header {
                offset,
                length: (length >= 0).then_some(length as u64),
                path,
            })
        }
        b'd' => Ok(ContentMessage::Data(b)),
        b'T' => {
            if b.len() < 16 {
                return Err(short());
            }
            let bytes_sent = b.get_u64();
            let failures = b.get_u32();
            let n = b.get_u32() as usize;
            if b.len() < n * 4 {
                return Err(short());
            }
            let blocks = (0..n).map(|_| b.get_u32()).collect();
            Ok(ContentMessage::Trailer {
                bytes_sent,
                failures,
                blocks,
            })
        }
        t => Err(Error::Protocol(format!(
            "unknown message '{}' in SEND_FILES_CONTENT stream",
            t as char
        ))),
    }
}

/// Runs STOP_BACKUP on the leader; returns the stop LSN and its timeline.
pub async fn stop_backup(c: &mut Connection, backup_label: &str) -> Result<(Lsn, u32)> {
    let cmd = format!(
        "STOP_BACKUP (BACKUP_LABEL {}, WAIT_FOR_ARCHIVE false)",
        quote_literal(backup_label)
    );
    let (_, row) = c
        .query_one(&cmd)
        .await
        .map_err(|e| e.context("STOP_BACKUP failed"))?;
    Ok((
        text(&row, 0, "stop_lsn")?.parse()?,
        num(&row, 1, "timeline")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::codec::tests::{copy_payloads, decode_in_chunks, msg};
    use bytes::{BufMut, BytesMut};
    use proptest::prelude::*;

    fn header(off: u64, len: i64, path: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'H');
        b.put_u64(off);
        b.put_i64(len);
        b.put_slice(path.as_bytes());
        b.put_u8(0);
        b.to_vec()
    }

    fn trailer(sent: u64, fails: u32, blocks: &[u32]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'T');
        b.put_u64(sent);
        b.put_u32(fails);
        b.put_u32(blocks.len() as u32);
        for x in blocks {
            b.put_u32(*x);
        }
        b.to_vec()
    }

    #[test]
    fn command_quotes_paths_and_ranges() {
        let c = files_content_command("ab", &[("base/1/2", 0, 8192), ("o'dd", 8192, 10)], true);
        assert_eq!(
            c,
            "SEND_FILES_CONTENT (BACKUP_ID 'ab', VERIFY_CHECKSUMS true, FILES ('base/1/2' 0 8192, 'o''dd' 8192 10))"
        );
    }

    proptest! {
        #[test]
        fn content_stream_survives_any_read_boundaries(cuts in proptest::collection::vec(1usize..80, 1..40)) {
            let mut wire = Vec::new();
            wire.extend(msg(b'H', &[0, 0, 0]));
            let payloads = vec![
                header(0, 5, "base/1/2"),
                [b"d".to_vec(), b"hello".to_vec()].concat(),
                trailer(5, 1, &[0]),
                header(8192, -1, "gone"),
                trailer(0, 0, &[]),
            ];
            for p in &payloads {
                wire.extend(msg(b'd', p));
            }
            wire.extend(msg(b'c', b""));
            let want = vec![
                ContentMessage::Header { offset: 0, length: Some(5), path: Bytes::from_static(b"base/1/2") },
                ContentMessage::Data(Bytes::from_static(b"hello")),
                ContentMessage::Trailer { bytes_sent: 5, failures: 1, blocks: vec![0] },
                ContentMessage::Header { offset: 8192, length: None, path: Bytes::from_static(b"gone") },
                ContentMessage::Trailer { bytes_sent: 0, failures: 0, blocks: vec![] },
            ];
            let got: Vec<ContentMessage> = copy_payloads(decode_in_chunks(&wire, &cuts))
                .into_iter()
                .map(|d| parse_content(d).unwrap())
                .collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn rejects_malformed_content_messages() {
        assert!(parse_content(Bytes::from_static(b"H\0\0")).is_err());
        assert!(parse_content(Bytes::from(trailer(1, 2, &[1, 2])[..20].to_vec())).is_err());
        assert!(parse_content(Bytes::from_static(b"Z")).is_err());
        let mut h = header(0, 1, "x");
        h.pop();
        assert!(parse_content(Bytes::from(h)).is_err());
    }
}
