//! The parallel method's range fetcher: SEND_FILES_CONTENT over one replication connection
//! (protocol-notes/parallel-backup.md), its CopyData framing decoded by
//! [`crate::protocol::files_content`] and reported through a [`Delivery`]. It checks only
//! what is particular to this command (the header names the requested file and offset); the
//! range checks, retries and writing are the pool's.

use super::fetch::{Connector, Damaged, Delivery, RangeFetcher, Request};
use crate::conn::{Connection, Event, Replication};
use crate::conninfo::ConnConfig;
use crate::error::{Error, Result};
use crate::protocol::files_content::{parse_content, Announced, ContentMessage};
use crate::relpath::RelPath;
use crate::replication::parallel::files_content_command;

/// Opens worker connections for one running parallel backup.
pub struct ContentConnector {
    /// Where to connect.
    pub cfg: ConnConfig,
    /// The backup every request names.
    pub backup_id: String,
    /// Whether the server verifies page checksums.
    pub verify: bool,
}

/// SEND_FILES_CONTENT over one connection.
pub struct ContentFetcher {
    conn: Connection,
    job: Job,
}

/// What every request of one backup shares.
struct Job {
    backup_id: String,
    verify: bool,
}

impl ContentFetcher {
    /// A fetcher over a connection the caller opened.
    pub fn over(conn: Connection, backup_id: &str, verify: bool) -> ContentFetcher {
        ContentFetcher {
            conn,
            job: Job {
                backup_id: backup_id.to_string(),
                verify,
            },
        }
    }
}

impl Connector for ContentConnector {
    type Fetcher = ContentFetcher;

    async fn connect(&self) -> Result<ContentFetcher> {
        let conn = Connection::connect(&self.cfg, Replication::Physical).await?;
        Ok(ContentFetcher::over(conn, &self.backup_id, self.verify))
    }
}

impl RangeFetcher for ContentFetcher {
    async fn fetch(&mut self, ranges: &[Request<'_>], out: &mut Delivery<'_>) -> Result<()> {
        fetch_content(&mut self.conn, &self.job, ranges, out).await
    }

    async fn close(self) {
        self.conn.close().await;
    }
}

/// SEND_FILES_CONTENT on the leader's connection, borrowed (for `global/pg_control`, fetched
/// after every other file).
pub struct LeaderFetcher<'a> {
    conn: &'a mut Connection,
    job: Job,
}

impl<'a> LeaderFetcher<'a> {
    /// A fetcher over the leader for the backup `backup_id`.
    pub fn new(conn: &'a mut Connection, backup_id: &str, verify: bool) -> Self {
        LeaderFetcher {
            conn,
            job: Job {
                backup_id: backup_id.to_string(),
                verify,
            },
        }
    }
}

impl RangeFetcher for LeaderFetcher<'_> {
    async fn fetch(&mut self, ranges: &[Request<'_>], out: &mut Delivery<'_>) -> Result<()> {
        fetch_content(self.conn, &self.job, ranges, out).await
    }

    async fn close(self) {}
}

/// Runs SEND_FILES_CONTENT for `ranges` on `conn`, reporting through `out`.
async fn fetch_content(
    conn: &mut Connection,
    job: &Job,
    ranges: &[Request<'_>],
    out: &mut Delivery<'_>,
) -> Result<()> {
    // A whole file goes without a range: the server then sends it as it is when it opens it,
    // with its real length (a configuration file rewritten since the listing must not come
    // back cut or padded to the listed size).
    let reqs: Vec<(&RelPath, Option<(u64, u64)>)> = ranges
        .iter()
        .map(|r| (r.path, (!r.whole).then_some((r.offset, r.length))))
        .collect();
    let cmd = files_content_command(&job.backup_id, &reqs, job.verify);
    conn.start_query_bytes(&cmd).await?;
    // Index of the next header expected, and whether the range it opened is missing.
    let mut next = 0usize;
    let mut missing = false;
    while let Some(ev) = conn.next_event().await? {
        match ev {
            Event::CopyData(d) => match parse_content(d)? {
                ContentMessage::Header {
                    offset,
                    length,
                    path,
                } => {
                    let r = ranges.get(next).ok_or_else(|| {
                        Error::Protocol("SEND_FILES_CONTENT sent more files than requested".into())
                    })?;
                    if path.as_ref() != r.path.as_bytes() || offset != r.offset {
                        return Err(Error::Protocol(format!(
                            "SEND_FILES_CONTENT sent \"{}\" at {offset}, expected \"{}\" at {}",
                            RelPath::from(path.as_ref()),
                            r.path,
                            r.offset
                        )));
                    }
                    match length {
                        Announced::Bytes(len) => out.begin(next, len).await?,
                        // Either way the file is not part of the backup; WAL replay accounts
                        // for it (a dropped relation, or an unlogged one's main fork).
                        Announced::Missing | Announced::Excluded => {
                            if length == Announced::Excluded {
                                tracing::info!(
                                    "\"{}\" is no longer a file that backups include (it changed on the server since the listing); it is left out",
                                    r.path
                                );
                            }
                            out.vanished(next).await?;
                            missing = true;
                        }
                    }
                    next += 1;
                }
                ContentMessage::Data(d) => out.data(d).await?,
                ContentMessage::Trailer {
                    failures, blocks, ..
                } => {
                    // A missing file's trailer closes nothing the delivery opened.
                    if !std::mem::take(&mut missing) {
                        out.end(Damaged {
                            pages: failures,
                            blocks,
                        })
                        .await?;
                    }
                }
            },
            Event::CopyOutStart | Event::CopyDone | Event::CommandComplete(_) => {}
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other} from SEND_FILES_CONTENT"
                )))
            }
        }
    }
    Ok(())
}
