//! Typed replication commands over a [`Connection`].
//!
//! Builds the command strings (quoting as the walsender's scanner expects: `'…'` with `''`
//! doubling for strings, `"…"` with `""` for identifiers; no `E''`) and turns their result
//! rows into structs. It does not own sockets or files.

pub mod parallel;

use crate::conn::{Connection, Event, ResultSet, Row};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::protocol::sqlstate;

/// Quotes a string literal for a replication command.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes an identifier (slot names).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// IDENTIFY_SYSTEM's answer.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    /// The cluster's system identifier (as text: it is a u64).
    pub system_identifier: u64,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush location.
    pub xlogpos: Lsn,
}

/// Runs IDENTIFY_SYSTEM.
pub async fn identify_system(c: &mut Connection) -> Result<SystemInfo> {
    let sets = c
        .simple_query("IDENTIFY_SYSTEM")
        .await
        .map_err(|e| e.context("IDENTIFY_SYSTEM failed"))?;
    // The columns come in the order the protocol documents: systemid, timeline, xlogpos,
    // dbname; read by position, like every other command's row here.
    let row = sets
        .iter()
        .find(|s| !s.columns.is_empty())
        .and_then(|s| s.rows.first())
        .ok_or_else(|| Error::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
    Ok(SystemInfo {
        system_identifier: row.parse(0, "system identifier")?,
        timeline: row.parse(1, "timeline")?,
        xlogpos: row.parse(2, "WAL position")?,
    })
}

/// Runs `SHOW name` (allowed on walsender connections). `Ok(None)` when the server does not
/// know the parameter.
pub async fn show(c: &mut Connection, name: &str) -> Result<Option<String>> {
    match c.simple_query(&format!("SHOW {name}")).await {
        Ok(sets) => Ok(sets
            .into_iter()
            .find(|s| !s.columns.is_empty())
            .and_then(|s| s.rows.into_iter().next())
            .and_then(|r| r.get(0).map(str::to_string))),
        Err(e) if e.sqlstate() == Some(sqlstate::UNDEFINED_OBJECT) => Ok(None),
        Err(e) => Err(e.context(format!("SHOW {name} failed"))),
    }
}

/// The WAL segment size, from `SHOW wal_segment_size` (e.g. "16MB").
pub async fn wal_segment_size(c: &mut Connection) -> Result<u64> {
    let v = show(c, "wal_segment_size")
        .await?
        .ok_or_else(|| Error::Protocol("server did not report wal_segment_size".into()))?;
    parse_size(&v).ok_or_else(|| Error::Protocol(format!("invalid wal_segment_size \"{v}\"")))
}

/// Parses a PostgreSQL size like "16MB", "1GB", "8192".
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: u64 = v[..split].parse().ok()?;
    let mult = match v[split..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    Some(n * mult)
}

/// Creates a physical slot; temporary slots vanish with the session. With `reserve_wal` it
/// holds WAL from the server's last redo pointer at once; without, from the first position a
/// stream on it reports (which cannot be invalidated by `max_slot_wal_keep_size` before then).
pub async fn create_physical_slot(
    c: &mut Connection,
    name: &str,
    temporary: bool,
    reserve_wal: bool,
) -> Result<Option<Lsn>> {
    let cmd = format!(
        "CREATE_REPLICATION_SLOT {}{} PHYSICAL{}",
        quote_ident(name),
        if temporary { " TEMPORARY" } else { "" },
        if reserve_wal { " (RESERVE_WAL)" } else { "" }
    );
    let sets = c.simple_query(&cmd).await.map_err(|e| {
        let hint = if e.sqlstate() == Some(sqlstate::CONFIGURATION_LIMIT_EXCEEDED) {
            " (all replication slots are in use: raise max_replication_slots)"
        } else {
            ""
        };
        e.context(format!(
            "could not create replication slot \"{name}\"{hint}"
        ))
    })?;
    let lsn = sets
        .iter()
        .find(|s| !s.columns.is_empty())
        .and_then(|s| {
            s.column("consistent_point")
                .and_then(|i| s.rows.first()?.get(i))
        })
        .and_then(|v| v.parse().ok());
    Ok(lsn)
}

/// The options of BASE_BACKUP pgpar uses.
#[derive(Debug, Clone)]
pub struct BaseBackup<'a> {
    /// Backup label.
    pub label: &'a str,
    /// `fast` or `spread`.
    pub checkpoint: &'a str,
    /// Manifest checksum algorithm name (`CRC32C`, `SHA256` …).
    pub manifest_checksums: &'a str,
    /// Whether the server verifies page checksums.
    pub verify_checksums: bool,
    /// Rate limit in kB/s.
    pub max_rate_kb: Option<u64>,
}

impl BaseBackup<'_> {
    /// The command: a manifest, progress messages, no waiting for WAL archiving (the WAL
    /// comes over our own stream).
    pub fn command(&self) -> String {
        let mut opts = vec![
            format!("LABEL {}", quote_literal(self.label)),
            "PROGRESS".to_string(),
            format!("CHECKPOINT '{}'", self.checkpoint),
            "WAIT false".to_string(),
            "MANIFEST 'yes'".to_string(),
            format!("MANIFEST_CHECKSUMS '{}'", self.manifest_checksums),
        ];
        if !self.verify_checksums {
            opts.push("VERIFY_CHECKSUMS false".into());
        }
        if let Some(r) = self.max_rate_kb {
            opts.push(format!("MAX_RATE {r}"));
        }
        format!("BASE_BACKUP ({})", opts.join(", "))
    }
}

/// A tablespace row of BASE_BACKUP's first answer.
#[derive(Debug, Clone)]
pub struct BaseBackupTablespace {
    /// OID, `None` for the main data directory.
    pub oid: Option<u32>,
    /// Location on the server (absolute, or relative for an in-place tablespace).
    pub location: Option<String>,
    /// Estimated size in kB (with PROGRESS).
    pub size_kb: u64,
}

/// BASE_BACKUP's first answer, before the archives.
#[derive(Debug, Clone)]
pub struct BaseBackupStart {
    /// Start LSN.
    pub start_lsn: Lsn,
    /// Its timeline.
    pub timeline: u32,
    /// The tablespaces, the main data directory among them.
    pub tablespaces: Vec<BaseBackupTablespace>,
}

impl BaseBackup<'_> {
    /// Sends the command and reads its first answer; the archives follow as CopyData.
    pub async fn start(&self, c: &mut Connection) -> Result<BaseBackupStart> {
        c.start_query(&self.command())
            .await
            .map_err(|e| e.context("BASE_BACKUP failed"))?;
        let sets = read_sets(c, true)
            .await
            .map_err(|e| e.context("could not start the backup"))?;
        let start = first_row(sets.first(), "start position")?;
        let tablespaces = sets
            .get(1)
            .map(|s| s.rows.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|r| {
                Ok(BaseBackupTablespace {
                    oid: r.get(0).and_then(|v| v.parse().ok()),
                    location: r.tablespace_location(1)?.map(str::to_string),
                    size_kb: r.get(2).and_then(|v| v.parse().ok()).unwrap_or(0),
                })
            })
            .collect::<Result<_>>()?;
        Ok(BaseBackupStart {
            start_lsn: start.parse(0, "start LSN")?,
            timeline: start.parse(1, "timeline")?,
            tablespaces,
        })
    }
}

/// Reads BASE_BACKUP's last answer, after the archives and the manifest: the end LSN.
pub async fn base_backup_end(c: &mut Connection) -> Result<Lsn> {
    let sets = read_sets(c, false)
        .await
        .map_err(|e| e.context("the backup did not end cleanly"))?;
    first_row(sets.iter().find(|s| !s.columns.is_empty()), "end position")?.parse(0, "end LSN")
}

fn first_row<'a>(set: Option<&'a ResultSet>, what: &str) -> Result<&'a Row> {
    set.and_then(|s| s.rows.first())
        .ok_or_else(|| Error::Protocol(format!("BASE_BACKUP sent no {what}")))
}

/// Reads result sets until the next copy starts (or the command ends).
async fn read_sets(c: &mut Connection, until_copy: bool) -> Result<Vec<ResultSet>> {
    let mut sets: Vec<ResultSet> = Vec::new();
    loop {
        match c.next_event().await? {
            Some(Event::RowDescription(columns)) => sets.push(ResultSet {
                columns,
                ..Default::default()
            }),
            Some(Event::DataRow(r)) => sets
                .last_mut()
                .ok_or_else(|| Error::Protocol("DataRow without RowDescription".into()))?
                .rows
                .push(r),
            Some(Event::CommandComplete(t)) => {
                if let Some(s) = sets.last_mut() {
                    s.tag = t;
                }
            }
            Some(Event::CopyOutStart) if until_copy => return Ok(sets),
            Some(other) => {
                return Err(Error::Protocol(format!(
                    "unexpected {other} from BASE_BACKUP"
                )))
            }
            None if until_copy => {
                return Err(Error::Protocol(
                    "BASE_BACKUP ended without sending data".into(),
                ))
            }
            None => return Ok(sets),
        }
    }
}

/// The START_REPLICATION command streaming physical WAL from `slot` at `start`.
pub fn start_replication_command(slot: &str, start: Lsn, timeline: u32) -> String {
    format!(
        "START_REPLICATION SLOT {} PHYSICAL {start} TIMELINE {timeline}",
        quote_ident(slot)
    )
}

/// Drops a slot, waiting for it to become inactive.
pub async fn drop_slot(c: &mut Connection, name: &str) -> Result<()> {
    c.simple_query(&format!("DROP_REPLICATION_SLOT {} WAIT", quote_ident(name)))
        .await
        .map_err(|e| e.context(format!("could not drop replication slot \"{name}\"")))?;
    Ok(())
}

/// Fetches a timeline history file's name and content.
pub async fn timeline_history(c: &mut Connection, tli: u32) -> Result<(String, Vec<u8>)> {
    let sets = c
        .simple_query(&format!("TIMELINE_HISTORY {tli}"))
        .await
        .map_err(|e| e.context(format!("TIMELINE_HISTORY {tli} failed")))?;
    let set = sets
        .into_iter()
        .find(|s| !s.columns.is_empty())
        .ok_or_else(|| Error::Protocol("TIMELINE_HISTORY returned nothing".into()))?;
    let row = set
        .rows
        .first()
        .ok_or_else(|| Error::Protocol("TIMELINE_HISTORY returned no row".into()))?;
    let name = row.get(0).unwrap_or_default().to_string();
    let content = row.get_bytes(1).map(|b| b.to_vec()).unwrap_or_default();
    Ok((name, content))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_follows_the_walsender_scanner() {
        assert_eq!(quote_literal("it's \\ x"), "'it''s \\ x'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("64kB"), Some(64 << 10));
        assert_eq!(parse_size("x"), None);
        let bb = BaseBackup {
            label: "it's",
            checkpoint: "fast",
            manifest_checksums: "SHA256",
            verify_checksums: false,
            max_rate_kb: Some(1024),
        };
        assert_eq!(
            bb.command(),
            "BASE_BACKUP (LABEL 'it''s', PROGRESS, CHECKPOINT 'fast', WAIT false, MANIFEST 'yes', \
             MANIFEST_CHECKSUMS 'SHA256', VERIFY_CHECKSUMS false, MAX_RATE 1024)"
        );
        assert_eq!(
            start_replication_command("pgpar_1", Lsn(0x0100_0000), 1),
            "START_REPLICATION SLOT \"pgpar_1\" PHYSICAL 0/1000000 TIMELINE 1"
        );
    }
}
