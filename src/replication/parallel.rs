//! The parallel backup commands (protocol-notes/parallel-backup.md): START_BACKUP,
//! SEND_FILE_LIST, SEND_FILES_CONTENT, STOP_BACKUP — each built here, with its row types
//! ([`FileEntry`] is SEND_FILE_LIST's row). The SEND_FILES_CONTENT CopyData framing is a
//! codec: [`crate::protocol::files_content`].

use super::quote_literal;
use crate::conn::{Connection, Event};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::relpath::RelPath;

/// Kind of a file-list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link (tablespace).
    Link,
}

/// One row of SEND_FILE_LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the data directory, as the server names it: its bytes (the
    /// connection's client_encoding is SQL_ASCII, so the server converts nothing).
    pub path: RelPath,
    /// Kind.
    pub kind: FileKind,
    /// Size at listing time. A relation file may be fetched in ranges of it; any other file
    /// is fetched whole, as it is when the server reads it, with its real length.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Link target (links only).
    pub link_target: Option<String>,
    /// Tablespace OID, `None` for the main data directory.
    pub spcoid: Option<u32>,
    /// Permission bits on the server (`None` for links, and from a server of the first
    /// version of the patch, which does not send them).
    pub mode: Option<u32>,
}

/// A tablespace row of START_BACKUP.
#[derive(Debug, Clone)]
pub struct Tablespace {
    /// OID, `None` for the main data directory.
    pub oid: Option<u32>,
    /// Location on the server.
    pub location: Option<String>,
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
    /// Tablespaces, the main data directory last.
    pub tablespaces: Vec<Tablespace>,
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
                .map(|r| {
                    Ok(Tablespace {
                        oid: r.get(0).and_then(|v| v.parse().ok()),
                        location: r.tablespace_location(1)?.map(str::to_string),
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(StartInfo {
        start_lsn: first.parse(0, "start_lsn")?,
        timeline: first.parse(1, "timeline")?,
        backup_id: first.text(2, "backup_id")?.to_string(),
        backup_label: first.text(3, "backup_label")?.to_string(),
        tablespaces,
    })
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
                            "SEND_FILE_LIST: unknown type \"{}\"",
                            other.unwrap_or("NULL")
                        )))
                    }
                };
                out.push(FileEntry {
                    path: RelPath::from(
                        r.get_bytes(0)
                            .ok_or_else(|| {
                                Error::Protocol("SEND_FILE_LIST sent a row without a path".into())
                            })?
                            .as_ref(),
                    ),
                    kind,
                    size: r.parse(2, "size")?,
                    mtime: r.parse(3, "mtime")?,
                    link_target: r.get(4).map(str::to_string),
                    spcoid: r.get(5).and_then(|v| v.parse().ok()),
                    mode: match r.get(6) {
                        None => None,
                        Some(m) => Some(u32::from_str_radix(m, 8).map_err(|_| {
                            Error::Protocol(format!("SEND_FILE_LIST: mode \"{m}\" is not octal"))
                        })?),
                    },
                });
            }
            Event::RowDescription(_) | Event::CommandComplete(_) => {}
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other} from SEND_FILE_LIST"
                )))
            }
        }
    }
    Ok(out)
}

/// The SEND_FILES_CONTENT command for `(path, range)` requests: `None` asks for the whole
/// file as it is when the server opens it, `Some((offset, length))` for a range. The offset
/// and length go as quoted decimal strings: the server's replication scanner reads a bare
/// number as 32 bits, and a range past 4 GiB must not wrap. Bytes, not text: a path goes as
/// the server named it, UTF-8 or not.
pub fn files_content_command(
    backup_id: &str,
    files: &[(&RelPath, Option<(u64, u64)>)],
    verify: bool,
) -> Vec<u8> {
    let mut cmd = format!(
        "SEND_FILES_CONTENT (BACKUP_ID {}, VERIFY_CHECKSUMS {verify}, FILES (",
        quote_literal(backup_id)
    )
    .into_bytes();
    for (i, (p, r)) in files.iter().enumerate() {
        if i > 0 {
            cmd.extend_from_slice(b", ");
        }
        quote_literal_bytes(p.as_bytes(), &mut cmd);
        if let Some((o, l)) = r {
            cmd.extend_from_slice(format!(" '{o}' '{l}'").as_bytes());
        }
    }
    cmd.extend_from_slice(b"))");
    cmd
}

/// Appends `b` quoted as the replication scanner reads a string: in single quotes, a quote
/// doubled, every other byte as it is.
fn quote_literal_bytes(b: &[u8], out: &mut Vec<u8>) {
    out.push(b'\'');
    for &c in b {
        if c == b'\'' {
            out.push(b'\'');
        }
        out.push(c);
    }
    out.push(b'\'');
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
    Ok((row.parse(0, "stop_lsn")?, row.parse(1, "timeline")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_quotes_paths_and_ranges() {
        let (a, b, c, d) = (
            RelPath::from("base/1/2"),
            RelPath::from("o'dd"),
            RelPath::from("PG_VERSION"),
            RelPath::new(b"caf\xe9'".to_vec()),
        );
        let c = files_content_command(
            "ab",
            &[
                (&a, Some((0, 8192))),
                (&b, Some((8192, 10))),
                (&c, None),
                (&d, None),
            ],
            true,
        );
        assert_eq!(
            c,
            b"SEND_FILES_CONTENT (BACKUP_ID 'ab', VERIFY_CHECKSUMS true, FILES ('base/1/2' '0' '8192', 'o''dd' '8192' '10', 'PG_VERSION', 'caf\xe9'''))"
        );
    }
}
