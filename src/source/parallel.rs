//! The parallel method as a [`Source`]: START_BACKUP on the leader, SEND_FILE_LIST,
//! directories and links into the sink first, the files spread over `--jobs` workers (the
//! [`crate::plan`] and the [`pool`]), `global/pg_control` last on the leader, STOP_BACKUP
//! with the backup_label. It hands the session the list of files for the manifest, their
//! checksums taken as the bytes passed (the manifest tee), and the damaged pages; what they
//! mean is the session's business.

use std::sync::Arc;
use std::time::Duration;

use super::content::{ContentConnector, LeaderFetcher};
use super::ranged::Ranged;
use crate::conn::Connection;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::options::{Checkpoint, Method};
use crate::replication::parallel::{send_file_list, start_backup, stop_backup, StartInfo};
use crate::session::{Copied, Session, Source, Started, Tablespace};
use crate::sink::dir::PlainDir;

/// The parallel method; holds the running backup between its steps.
#[derive(Default)]
pub(crate) struct ParallelSource {
    start: Option<StartInfo>,
}

impl ParallelSource {
    fn info(&self) -> Result<&StartInfo> {
        self.start
            .as_ref()
            .ok_or_else(|| Error::Failed("internal error: the backup has not started".into()))
    }
}

impl Source for ParallelSource {
    const METHOD: Method = Method::Parallel;

    async fn start(&mut self, s: &Session<'_>, leader: &mut Connection) -> Result<Started> {
        s.step(&format!(
            "starting parallel backup with {} workers (checkpoint {}) on {}",
            s.jobs,
            s.opts.checkpoint.name(),
            leader.target()
        ));
        let info =
            start_backup(leader, &s.opts.label, s.opts.checkpoint == Checkpoint::Fast).await?;
        let started = Started {
            start_lsn: info.start_lsn,
            timeline: info.timeline,
            tablespaces: info
                .tablespaces
                .iter()
                .filter_map(|t| {
                    Some(Tablespace {
                        oid: t.oid?,
                        location: t.location.clone()?,
                    })
                })
                .collect(),
            backup_label: Some(info.backup_label.clone()),
        };
        self.start = Some(info);
        Ok(started)
    }

    async fn copy(
        &mut self,
        s: &Session<'_>,
        leader: &mut Connection,
        sink: &Arc<PlainDir>,
    ) -> Result<Copied> {
        let backup_id = self.info()?.backup_id.clone();
        // The list flows as the server walks the directories: silence is a stall.
        leader.set_read_limit(Some(s.opts.stall_timeout));
        let files = send_file_list(leader, &backup_id)
            .await
            .map_err(|e| e.context("leader"))?;
        leader.set_read_limit(None);
        let copy = Ranged::prepare(s, &files, sink, leader.target().to_string(), || {
            Error::Protocol("SEND_FILE_LIST did not list global/pg_control".into())
        })?;
        let verify = s.opts.verify_checksums;
        let mut res = copy
            .run(Arc::new(ContentConnector {
                cfg: s.cfg.clone(),
                backup_id: backup_id.clone(),
                verify,
            }))
            .await;
        if res.is_ok() {
            res = copy
                .fetch_control(&mut LeaderFetcher::new(leader, &backup_id, verify))
                .await;
        }
        copy.finish(res, sink)
    }

    async fn stop(&mut self, s: &Session<'_>, leader: &mut Connection) -> Result<(Lsn, u32)> {
        let label = self.info()?.backup_label.clone();
        // STOP_BACKUP does not wait for the archive, but it returns only when no connection
        // reads the backup's files: it ends a reader still there after a second (a worker
        // pgpar abandoned as stalled) and waits for it to exit. A walsender that cannot act
        // on that (a frozen process) keeps it waiting: bounded all the same, causes named.
        let limit = s.opts.stall_timeout;
        let target = leader.target().to_string();
        tokio::time::timeout(limit, stop_backup(leader, &label))
            .await
            .map_err(|_| {
                Error::Failed(format!(
                    "leader: STOP_BACKUP on server {target} did not return within {} s (--stall-timeout {}): \
                     the server waits until no connection reads the backup's files (a worker's walsender that did not \
                     exit when STOP_BACKUP ended it, see pg_stat_activity wait event ParallelBackupReaders), \
                     or the leader's connection is stalled",
                    limit.as_secs(),
                    limit.as_secs()
                ))
            })?
    }
}

/// The leader's server answered nothing to `what` for the stall timeout.
pub(crate) fn stalled_leader(target: &str, limit: Duration, what: &str) -> Error {
    Error::Failed(format!(
        "leader: the server {target} answered nothing to {what} for {} s: its walsender or the network is stalled (--stall-timeout {})",
        limit.as_secs(),
        limit.as_secs()
    ))
}
