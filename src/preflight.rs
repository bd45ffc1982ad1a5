//! Pre-flight: what can be found wrong before the backup asks the server for any work (no
//! slot, no checkpoint, nothing written but the empty target directory), all of it in one
//! report: the role's rights (the REPLICATION attribute every method needs; with `--method
//! sql`, EXECUTE on the functions [`crate::privileges`] names, and sessions that may connect;
//! the session's method choice finds those), `wal_level`, the walsenders
//! the method needs (and, without `-j`, how many workers fit), the replication slots, the
//! `-S` slot, and the size of the cluster against the free space of every target file
//! system. It also settles the method and the number of workers.
//!
//! It only reads: `SHOW` and `READ_REPLICATION_SLOT` on the leader, and, where the role may
//! open an ordinary session, the walsenders and slots in use and the tablespaces' sizes. When
//! the leader's replication connection is refused (a role without REPLICATION, or every
//! walsender taken), the same questions go over an ordinary session instead ([`probe`]), so
//! that the report still names every problem, not only the first. What it cannot read (no
//! SQL access, no privilege) it says it did not check, never guesses as a problem. It must
//! not start anything on the server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::conn::{Connection, Replication};
use crate::conninfo::ConnConfig;
use crate::error::{Error, Result};
use crate::options::{BackupOptions, Method, MethodChoice};
use crate::protocol::sqlstate;
use crate::replication::{quote_ident, show};
use crate::session::Reporter;

/// What the pre-flight settled.
pub(crate) struct Flight {
    /// The method to run (parallel may become stream when no worker fits).
    pub method: Method,
    /// Worker connections (1 for the stream method).
    pub jobs: usize,
}

/// Tablespaces' (location as the server reports it, bytes), and the names of those whose
/// size this role may not read; or why no size is known.
type Sizes = std::result::Result<(Vec<(String, u64)>, Vec<String>), String>;

/// What an ordinary session told us; `None` for what it could not read.
struct Usage {
    walsenders_used: Option<usize>,
    slots_used: Option<usize>,
    tablespaces: Sizes,
}

async fn usage(cfg: &ConnConfig) -> Usage {
    let mut cfg = cfg.clone();
    if cfg.dbname.is_none() {
        cfg.dbname = Some("postgres".into());
    }
    let mut c = match Connection::connect(&cfg, Replication::None).await {
        Ok(c) => c,
        Err(e) => {
            return Usage {
                walsenders_used: None,
                slots_used: None,
                tablespaces: Err(format!("no ordinary session for this role ({e})")),
            }
        }
    };
    let count = |sets: Vec<crate::conn::ResultSet>| -> Option<usize> {
        sets.into_iter()
            .find(|s| !s.columns.is_empty())?
            .rows
            .first()?
            .get(0)?
            .parse()
            .ok()
    };
    let mut u = Usage {
        walsenders_used: c
            .simple_query("SELECT count(*) FROM pg_stat_get_wal_senders()")
            .await
            .ok()
            .and_then(count),
        slots_used: c
            .simple_query("SELECT count(*) FROM pg_replication_slots")
            .await
            .ok()
            .and_then(count),
        tablespaces: Err(String::new()),
    };
    u.tablespaces = tablespace_sizes(&mut c).await;
    c.close().await;
    u
}

/// Each tablespace's location and size. `pg_global` (the shared catalogs, a few MB at most)
/// is left out: reading its size needs a privilege a replication role rarely has; the margin
/// covers it. A tablespace whose size this role may not read is left out with a warning
/// (counting less than the truth never refuses a backup that fits).
async fn tablespace_sizes(c: &mut Connection) -> Sizes {
    let sets = c
        .simple_query(
            "SELECT oid, spcname, coalesce(pg_tablespace_location(oid), '') FROM pg_tablespace \
             WHERE spcname <> 'pg_global'",
        )
        .await
        .map_err(|e| format!("the tablespaces could not be listed ({e})"))?;
    let rows: Vec<(String, String, String)> = sets
        .into_iter()
        .find(|s| !s.columns.is_empty())
        .map(|s| {
            s.rows
                .iter()
                .filter_map(|r| {
                    Some((
                        r.get(0)?.to_string(),
                        r.get(1)?.to_string(),
                        r.get(2)?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut sizes = Vec::new();
    let mut unread = Vec::new();
    for (oid, name, loc) in rows {
        let size = c
            .simple_query(&format!("SELECT pg_tablespace_size({oid}::oid)"))
            .await
            .ok()
            .and_then(|sets| {
                sets.into_iter()
                    .find(|s| !s.columns.is_empty())?
                    .rows
                    .first()?
                    .get(0)?
                    .parse::<u64>()
                    .ok()
            });
        match size {
            Some(n) => sizes.push((loc, n)),
            None => unread.push(name),
        }
    }
    Ok((sizes, unread))
}

/// The file system holding `dir` (or its nearest existing parent): its id and free bytes.
fn free_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = dir.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; c is a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_fsid as u64, st.f_bavail as u64 * st.f_frsize as u64))
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_048_576.0)
}

/// Whether a refused replication connection is worth a pre-flight over an ordinary session:
/// the role lacks REPLICATION, or every walsender is taken.
pub(crate) fn worth_a_probe(e: &Error) -> bool {
    matches!(e.root(), Error::Connect { .. })
        && matches!(
            e.sqlstate(),
            Some(sqlstate::INSUFFICIENT_PRIVILEGE | sqlstate::TOO_MANY_CONNECTIONS)
        )
}

/// An ordinary session standing in for a leader whose replication connection was refused:
/// the pre-flight asks its questions there. `None` when the role may not open one either.
pub(crate) async fn probe(cfg: &ConnConfig) -> Option<Connection> {
    let mut cfg = cfg.clone();
    if cfg.dbname.is_none() {
        cfg.dbname = Some("postgres".into());
    }
    Connection::connect(&cfg, Replication::None).await.ok()
}

/// The leader the pre-flight asks: a replication connection, or an ordinary session when the
/// replication connection was refused (`refused`; see [`probe`]).
pub(crate) struct Asked<'a> {
    pub conn: &'a mut Connection,
    pub refused: Option<Error>,
}

/// The problem of a role that may not open replication connections, with the statement that
/// fixes it; `None` when it may (or the question cannot be asked). The server checks this
/// only after it has found a walsender free, so a refusal for want of walsenders says
/// nothing of it: the role is asked here.
async fn no_replication(c: &mut Connection) -> Option<String> {
    let (_, row) = c
        .query_one(
            "SELECT quote_ident(current_user), rolsuper OR rolreplication \
             FROM pg_catalog.pg_roles WHERE rolname = current_user",
        )
        .await
        .ok()?;
    if row.get(1) != Some("f") {
        return None;
    }
    let role = row.get(0)?;
    Some(format!(
        "role {role} may not open replication connections (it lacks the REPLICATION attribute), \
         which every method needs (the WAL stream, and the copy itself except with the sql \
         method): as a superuser, run ALTER ROLE {role} REPLICATION;"
    ))
}

/// Runs the pre-flight on the leader (see the module doc). `offered` is the method chosen so
/// far; `seg_size` the server's WAL segment size; `problems` those found already (choosing
/// the method: the sql method's missing GRANTs). With a refused leader it always fails: with
/// the report, or, when it finds nothing (a walsender freed meanwhile), with the refusal.
pub(crate) async fn run(
    cfg: &ConnConfig,
    opts: &BackupOptions,
    asked: Asked<'_>,
    offered: Method,
    seg_size: u64,
    mut problems: Vec<String>,
    reporter: &dyn Reporter,
) -> Result<Flight> {
    let Asked {
        conn: leader,
        refused,
    } = asked;
    // Whether the leader holds a walsender already.
    let walsender = refused.is_none();
    if !walsender {
        if let Some(p) = no_replication(leader).await {
            problems.insert(0, p);
        }
    }
    let wal_level = show(leader, "wal_level").await?.unwrap_or_default();
    if wal_level == "minimal" {
        problems.push(
            "wal_level is \"minimal\": set wal_level = replica (or logical) and restart the server"
                .into(),
        );
    }
    let setting = |v: Option<String>| v.and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
    let max_senders = setting(show(leader, "max_wal_senders").await?);
    let max_slots = setting(show(leader, "max_replication_slots").await?);
    let u = usage(cfg).await;

    // Walsenders: the leader holds one already (or, refused, still needs one); the WAL
    // stream needs one, each worker one. `free` counts the leader's as free.
    let held = usize::from(walsender);
    let used = u.walsenders_used.unwrap_or(held).max(held);
    let free = (max_senders + held).saturating_sub(used);
    let in_use = match u.walsenders_used {
        Some(n) if walsender => format!("{n} in use, this connection included"),
        Some(n) => format!("{n} in use"),
        None => "how many are in use is unknown without an ordinary session".into(),
    };
    let mut method = offered;
    // The sql method's workers are ordinary sessions, not walsenders.
    let mut jobs = if method == Method::Sql { opts.jobs } else { 1 };
    if method == Method::Parallel {
        // The leader and the WAL stream take one each.
        let fit = free.saturating_sub(2);
        if opts.jobs_given {
            if fit < opts.jobs {
                problems.push(format!(
                    "--jobs {} needs {} walsenders (the workers, the leader, the WAL stream), \
                     but max_wal_senders is {max_senders} ({in_use}): use --jobs {} or fewer, \
                     or raise max_wal_senders to at least {} (needs a restart)",
                    opts.jobs,
                    opts.jobs + 2,
                    fit.max(1),
                    used - held + opts.jobs + 2
                ));
            }
            jobs = opts.jobs;
        } else if fit >= 1 {
            jobs = fit.min(opts.jobs);
            let say = |m: &str| {
                if jobs < opts.jobs {
                    reporter.notice(m)
                } else {
                    tracing::info!("{m}")
                }
            };
            say(&format!(
                "using {jobs} worker connection(s): {} of max_wal_senders = {max_senders} free \
                 ({in_use}); the leader and the WAL stream take one each",
                free - held
            ));
        } else if opts.method == MethodChoice::Auto {
            method = Method::Stream;
            reporter.notice(&format!(
                "no walsender free for a parallel worker (max_wal_senders = {max_senders}, {in_use}): \
                 using the stream method (one connection)"
            ));
        } else {
            problems.push(format!(
                "--method parallel needs at least 3 walsenders (a worker, the leader, the WAL stream), \
                 but max_wal_senders is {max_senders} ({in_use}): raise max_wal_senders, or use --method stream"
            ));
        }
    }
    if method != Method::Parallel && free < 2 {
        problems.push(format!(
            "the {} method needs 2 walsenders (the {}, the WAL stream), but max_wal_senders is \
             {max_senders} ({in_use}): raise max_wal_senders to at least {} (needs a restart)",
            method.name(),
            if method == Method::Sql {
                "leader's replication connection"
            } else {
                "backup stream"
            },
            used - held + 2
        ));
    }

    // Slots: ours is temporary (or made with -C) unless -S names an existing one.
    match (&opts.slot, opts.create_slot) {
        (Some(name), false) => {
            let exists = if walsender {
                let sets = leader
                    .simple_query(&format!("READ_REPLICATION_SLOT {}", quote_ident(name)))
                    .await
                    .map_err(|e| e.context(format!("READ_REPLICATION_SLOT {name} failed")))?;
                sets.iter()
                    .find(|s| !s.columns.is_empty())
                    .and_then(|s| s.rows.first())
                    .and_then(|r| r.get(0))
                    .is_some()
            } else {
                let (_, row) = leader
                    .query_one(&format!(
                        "SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE slot_name = '{}'",
                        name.replace('\'', "''")
                    ))
                    .await
                    .map_err(|e| e.context(format!("looking up replication slot {name}")))?;
                row.get(0) != Some("0")
            };
            if !exists {
                problems.push(format!(
                    "replication slot \"{name}\" does not exist: create it first, or add -C"
                ));
            }
        }
        _ => {
            let slots_used = u.slots_used.unwrap_or(0);
            if max_slots <= slots_used {
                problems.push(format!(
                    "the WAL stream needs a replication slot, but max_replication_slots is {max_slots} \
                     and {slots_used} are in use: raise max_replication_slots (needs a restart) or drop an unused slot"
                ));
            }
        }
    }

    // Space: every tablespace lands in -D (the default ones, in-place ones) or its -T target.
    if opts.space_check {
        match &u.tablespaces {
            Ok((ts, unread)) => {
                if !unread.is_empty() {
                    reporter.warning(&format!(
                        "the size of tablespace(s) {} could not be read (no privilege): free space is checked without them",
                        unread.join(", ")
                    ));
                }
                let mut need: BTreeMap<u64, (PathBuf, u64, u64)> = BTreeMap::new();
                let mut unknown = Vec::new();
                // The WAL streamed beside the copy and the shared catalogs are not in these
                // sizes: count a few segments and a few MB.
                let mut entries = vec![(opts.dir.clone(), 2 * seg_size + (4 << 20))];
                for (loc, size) in ts {
                    let p = Path::new(loc);
                    let dir = if loc.is_empty() || !p.is_absolute() {
                        opts.dir.clone()
                    } else {
                        opts.map.map(p)
                    };
                    entries.push((dir, *size));
                }
                for (dir, size) in entries {
                    match free_space(&dir) {
                        Some((fs, avail)) => {
                            let e = need.entry(fs).or_insert((dir, 0, avail));
                            e.1 += size;
                        }
                        None => unknown.push(dir.display().to_string()),
                    }
                }
                for (dir, size, avail) in need.values() {
                    if size > avail {
                        problems.push(format!(
                            "the backup needs about {} on the file system of \"{}\", which has {} free: \
                             free space or choose another target (--no-space-check skips this check)",
                            mb(*size),
                            dir.display(),
                            mb(*avail)
                        ));
                    }
                }
                if !unknown.is_empty() {
                    reporter.warning(&format!(
                        "free space not checked for {}: statvfs failed",
                        unknown.join(", ")
                    ));
                }
            }
            Err(why) => reporter.warning(&format!(
                "free space not checked: {why} (sizes need an ordinary session and the right to read them)"
            )),
        }
    }

    if problems.is_empty() {
        return match refused {
            Some(e) => Err(e),
            None => Ok(Flight { method, jobs }),
        };
    }
    let n = problems.len();
    let list: Vec<String> = problems
        .iter()
        .enumerate()
        // A problem ending in a statement's ';' is followed by the list's own.
        .map(|(i, p)| format!("({}) {}", i + 1, p.trim_end_matches(';')))
        .collect();
    let report = format!(
        "{n} problem(s) found before any work, nothing was started: {}",
        list.join("; ")
    );
    Err(match refused {
        // The replication connection was refused: still a connection failure (exit 3),
        // now with everything else that stands in the way.
        Some(Error::Connect {
            target, sqlstate, ..
        }) => Error::Connect {
            target,
            reason: report,
            sqlstate,
            hint: None,
        },
        _ => Error::Failed(format!("server {}: {report}", leader.target())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_of_a_path_that_does_not_exist_yet_is_its_parents() {
        let d = tempfile::tempdir().unwrap();
        let (fs, free) = free_space(&d.path().join("a/b/c")).unwrap();
        assert_eq!(free_space(d.path()).unwrap().0, fs);
        assert!(free > 0);
    }
}
