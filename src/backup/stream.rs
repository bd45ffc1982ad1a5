//! The stream method: one BASE_BACKUP connection (any PostgreSQL 15 or later), its tar
//! stream extracted by [`crate::sink::StreamSink`], the server's own manifest kept.

use tokio::sync::mpsc;

use super::{finalize, prepare_tablespaces, Cleanup, Ctx, Summary, WalSlot};
use crate::basebackup::{self, StreamMessage};
use crate::conn::{Connection, Event, ResultSet, Row};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::progress::Progress;
use crate::replication::quote_literal;
use crate::sink::StreamSink;

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
                    "unexpected {other:?} from BASE_BACKUP"
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

fn command(ctx: &Ctx<'_>) -> String {
    let a = ctx.args;
    let mut opts = vec![
        format!("LABEL {}", quote_literal(&a.label)),
        "PROGRESS".to_string(),
        format!("CHECKPOINT '{}'", a.checkpoint.name()),
        "WAIT false".to_string(),
        "MANIFEST 'yes'".to_string(),
        format!("MANIFEST_CHECKSUMS '{}'", a.manifest_checksums.name()),
    ];
    if a.no_verify_checksums {
        opts.push("VERIFY_CHECKSUMS false".into());
    }
    if let Some(r) = ctx.max_rate {
        opts.push(format!("MAX_RATE {}", r / 1024));
    }
    format!("BASE_BACKUP ({})", opts.join(", "))
}

/// Runs the stream method.
pub(crate) async fn run(
    ctx: &Ctx<'_>,
    mut main: Connection,
    wal: WalSlot,
    cleanup: &mut Cleanup,
) -> Result<Summary> {
    if ctx.args.progress.is_some() {
        eprintln!(
            "pgpar: starting backup (checkpoint {}) on {}",
            ctx.args.checkpoint.name(),
            main.target()
        );
    }
    main.start_query(&command(ctx))
        .await
        .map_err(|e| e.context("BASE_BACKUP failed"))?;
    let sets = read_sets(&mut main, true)
        .await
        .map_err(|e| e.context("could not start the backup"))?;
    let start_row = first_row(sets.first(), "start position")?;
    let start: Lsn = start_row
        .get(0)
        .ok_or_else(|| Error::Protocol("BASE_BACKUP sent no start LSN".into()))?
        .parse()?;
    let timeline: u32 = start_row
        .get(1)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| Error::Protocol("BASE_BACKUP sent no timeline".into()))?;
    let ts_rows = sets.get(1).map(|s| s.rows.as_slice()).unwrap_or_default();
    let total_kb: u64 = ts_rows
        .iter()
        .filter_map(|r| r.get(2)?.parse::<u64>().ok())
        .sum();
    let ts_dirs = prepare_tablespaces(ctx, ts_rows.iter().filter_map(|r| r.get(1)), cleanup)?;

    let mut wal = wal.start(ctx, timeline, start)?;
    let (tx, rx) = mpsc::channel::<StreamMessage>(64);
    let sink = StreamSink::new(ctx.dir.clone(), ctx.map.clone()).spawn(rx);
    let progress = Progress::new(ctx.args.progress, total_kb * 1024);
    let ticker = progress.spawn_ticker();
    progress.worker_active(true);
    let copy = async {
        loop {
            match main.next_event().await? {
                Some(Event::CopyData(d)) => {
                    let m = basebackup::parse(d)?;
                    match &m {
                        StreamMessage::Progress(n) => progress.set(*n),
                        StreamMessage::Data(d) => progress.add(d.len() as u64),
                        _ => {}
                    }
                    if tx.send(m).await.is_err() {
                        return Ok(()); // the sink failed; its error is reported below
                    }
                }
                Some(Event::CopyDone) => return Ok(()),
                Some(other) => {
                    return Err(Error::Protocol(format!(
                        "unexpected {other:?} in the backup stream"
                    )))
                }
                None => {
                    return Err(Error::Protocol(
                        "backup stream ended without CopyDone".into(),
                    ))
                }
            }
        }
    };
    let copy_res: Result<()> = tokio::select! {
        r = copy => r,
        e = wal.failed() => Err(e),
    };
    drop(tx);
    if let Some(t) = ticker {
        t.abort();
    }
    let sink_res = tokio::task::spawn_blocking(move || sink.join())
        .await
        .map_err(|e| Error::Failed(format!("sink thread failed: {e}")))?
        .map_err(|_| Error::Failed("sink thread panicked".into()))?;
    copy_res.map_err(|e| e.context("backup stream failed"))?;
    let stats = sink_res?;
    let end_sets = read_sets(&mut main, false)
        .await
        .map_err(|e| e.context("the backup did not end cleanly"))?;
    let end_row = first_row(
        end_sets.iter().find(|s| !s.columns.is_empty()),
        "end position",
    )?;
    let stop: Lsn = end_row
        .get(0)
        .ok_or_else(|| Error::Protocol("BASE_BACKUP sent no end LSN".into()))?
        .parse()?;
    progress.finish();
    main.close().await;
    if !stats.manifest {
        return Err(Error::Failed("the server sent no backup manifest".into()));
    }
    let walres = wal.finish(stop, ctx.args.progress.is_some()).await?;
    finalize(ctx, ts_dirs, None).await?;
    Ok(Summary {
        method: "stream",
        backup_dir: ctx.dir.display().to_string(),
        bytes: stats.bytes,
        files: stats.files,
        seconds: 0.0,
        mb_per_s: 0.0,
        start_lsn: start.to_string(),
        stop_lsn: stop.to_string(),
        timeline,
        wal_segments: walres.segments.len(),
        jobs: 1,
        peak_rss_mb: None,
    })
}
