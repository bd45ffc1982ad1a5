//! What a backup leaves when it does not finish, and where tablespaces land (issue 11, item 1):
//! a partial backup — pgpar killed mid-copy or while it waits for the end of WAL, or failing
//! with `--no-clean` — never starts as a server, in any method; and `-T` naming an
//! in-place tablespace (`allow_in_place_tablespaces`, `LOCATION ''`) leaves it inside the
//! backup, as pg_basebackup does. (That in-place tablespaces land inside the backup at all is
//! tested in `pipeline.rs`.)

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backup_stream::assert_backup_restores;
use crate::cluster::{run_ok, scratch_dir, Cluster, Pg};
use crate::util::{list, pgpar, run, walk};

/// A pgpar backup running in the background, its stderr collected as it comes.
struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// `pgpar backup -c fast -P -D target -d <trust_user> method... extra...`, throttled by
    /// the caller's `extra` so that the test has time to act mid-way. The sql method runs as
    /// the superuser (trust_user may not execute its functions).
    fn start(c: &Cluster, target: &Path, method: &[&str], extra: &[&str]) -> Running {
        let role = if method.contains(&"sql") {
            "postgres"
        } else {
            "trust_user"
        };
        let mut child = pgpar()
            .args(["backup", "-c", "fast", "-P", "-D"])
            .arg(target)
            .args(["-d", &c.conninfo(role)])
            .args(method)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgpar");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&String::from_utf8_lossy(&line));
                s.push('\n');
            }
        });
        Running {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until `cond` holds, failing (with pgpar's stderr) after 120 s or if pgpar exits.
    #[track_caller]
    fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&Running) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !cond(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("pgpar exited ({status}) before {what}:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "not {what} within 120 s; pgpar said:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` and waits for pgpar to exit; returns its exit code and stderr.
    fn signal_and_wait(mut self, sig: libc::c_int) -> (Option<i32>, String) {
        signal(self.child.id() as i32, sig);
        let status = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (status.code(), self.stderr())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we own or a server process of a test cluster; no memory.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// A server process held with SIGSTOP; continued when dropped (also when the test fails, so
/// that the cluster can shut down).
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as in `signal`.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Whether a WAL segment has been completely written into `target/pg_wal` (its `.done`).
fn wal_segment_is_complete(target: &Path, segment: &str) -> bool {
    target
        .join("pg_wal/archive_status")
        .join(format!("{segment}.done"))
        .exists()
}

/// Starts a throttled backup and brings it to the point where it waits for the end of WAL
/// with every data file and `global/pg_control` written: once the WAL that holds the
/// backup's start checkpoint is in `pg_wal/` (a WAL switch completes its segment), the WAL
/// stream's walsender is held with SIGSTOP, so the backup's end never arrives.
///
/// The start checkpoint's WAL being there matters: without it, no server could start the
/// directory anyway, and the test would pass whatever pgpar wrote.
fn backup_waiting_for_wal(
    c: &Cluster,
    target: &Path,
    method: &[&str],
    extra: &[&str],
) -> (Running, Stopped) {
    let mut args = vec!["-r", "8M"];
    args.extend_from_slice(extra);
    let mut b = Running::start(c, target, method, &args);
    // backup_label is the first file of every method, written once the server started the
    // backup, i.e. after its checkpoint. (Not pg_wal/: the WAL stream makes it before the
    // backup starts, and a WAL switch then completes a segment before the backup's WAL, which
    // the stream never writes; seen as a test that waited until pgpar had finished.)
    b.wait_for("the backup started", |_| {
        target.join("backup_label").exists()
    });
    let walsender: i32 = c
        .wait_for_walsender("START_REPLICATION", Duration::from_secs(60))
        .parse()
        .expect("a pid");
    // The segment this switch completes comes after the start checkpoint's record; the
    // stream writes segments in order (an earlier segment complete is not enough: the WAL
    // stream starts before the backup, and the checkpoint may lie in the next one).
    let switched = c.psql("SELECT pg_walfile_name(pg_switch_wal());");
    let switched = switched.trim();
    b.wait_for("the start checkpoint's WAL segment was written", |_| {
        wal_segment_is_complete(target, switched)
    });
    signal(walsender, libc::SIGSTOP);
    let held = Stopped(walsender);
    b.wait_for("pgpar waits for the end of WAL", |b| {
        b.stderr().contains("waiting for WAL up to")
    });
    assert!(
        target.join("global/pg_control").is_file(),
        "pgpar waits for WAL but global/pg_control is not there: the test would prove nothing"
    );
    assert!(!target.join("backup_manifest").exists());
    (b, held)
}

/// `pg_ctl start` on what a failed backup left must fail, for a reason that has to do with
/// the backup not being complete (not, say, a broken fixture). Returns the server log.
#[track_caller]
fn assert_never_starts(c: &Cluster, partial: &Path, moment: &str) -> String {
    assert!(
        !partial.join("backup_manifest").exists(),
        "{moment}: a partial backup has a manifest"
    );
    // Read before the server starts: it renames backup_label to backup_label.old once read.
    let contents = list(partial);
    let label = fs::read_to_string(partial.join("backup_label"));
    let log = match c.try_start_backup_copy(partial) {
        Ok(copy) => {
            let sums = copy.psql(
                "SELECT sum(abalance), count(*) FROM pgbench_accounts; \
                 SELECT sum(bbalance) FROM pgbench_branches;",
            );
            panic!(
                "{moment}: the partial backup in {} started as a server (data: {sums})",
                partial.display()
            )
        }
        Err(log) => {
            // The backup's WAL is incomplete, or a file copied later (pg_control, last of all;
            // PG_VERSION or postgresql.conf, among the small files the parallel method copies
            // after the large ones) is not there yet.
            assert!(
                log.contains("WAL ends before end of online backup")
                    || log.contains("backup_label")
                    || log.contains("global/pg_control")
                    || log.contains("could not access the server configuration file")
                    || log.contains("is not a database cluster directory"),
                "{moment}: the server refused to start, but not because the backup is \
                 incomplete:\n{log}"
            );
            log
        }
    };
    // The rule that makes it so, from the first data file on: backup_label is there (the
    // server's, or, with the sql method until pg_backup_stop hands the server's over, a
    // placeholder no server starts from).
    let label = label.unwrap_or_else(|e| {
        panic!("{moment}: no backup_label in the partial backup ({e}); it holds:\n{contents:?}")
    });
    assert!(
        label.starts_with("START WAL LOCATION:") || label.starts_with("INCOMPLETE BACKUP: "),
        "{moment}: backup_label is neither the server's nor the sql method's placeholder:\n{label}"
    );
    log
}

/// Every way a backup can stop half-way leaves a directory that refuses to start.
fn partial_backups_never_start(pg: Pg, method: &[&str]) {
    let c = Cluster::new(pg);
    c.pgbench_init(3);
    let dir = scratch_dir();

    // Killed while the data files are being copied (global/pg_control is copied last).
    let target = dir.path().join("mid-copy");
    let mut b = Running::start(&c, &target, method, &["-r", "4M"]);
    b.wait_for("the backup wrote data files", |_| {
        target.join("base").is_dir() && walk(&target.join("base")).len() >= 10
    });
    let (code, stderr) = b.signal_and_wait(libc::SIGKILL);
    assert_eq!(code, None, "pgpar was not killed:\n{stderr}");
    assert!(
        !target.join("global/pg_control").exists(),
        "the copy had ended before the kill: pick a slower rate"
    );
    assert_never_starts(&c, &target, "killed mid-copy");

    // Killed (SIGKILL: OOM, power) while waiting for the end of WAL: every data file and
    // pg_control are there, the WAL up to the backup's end is not.
    let target = dir.path().join("wal-wait");
    let (b, held) = backup_waiting_for_wal(&c, &target, method, &[]);
    let (code, stderr) = b.signal_and_wait(libc::SIGKILL);
    drop(held);
    assert_eq!(code, None, "pgpar was not killed:\n{stderr}");
    let log = assert_never_starts(&c, &target, "killed while waiting for WAL");
    assert!(
        log.contains("WAL ends before end of online backup"),
        "the server should refuse for the missing end of the backup's WAL:\n{log}"
    );

    // Failing there with --no-clean keeps exactly that state, on purpose: still no server.
    let target = dir.path().join("no-clean");
    let (b, held) = backup_waiting_for_wal(&c, &target, method, &["--no-clean"]);
    let (code, stderr) = b.signal_and_wait(libc::SIGTERM);
    drop(held);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("keeping the files"),
        "--no-clean did not keep the files:\n{stderr}"
    );
    let log = assert_never_starts(
        &c,
        &target,
        "--no-clean after SIGTERM while waiting for WAL",
    );
    assert!(
        log.contains("WAL ends before end of online backup"),
        "the server should refuse for the missing end of the backup's WAL:\n{log}"
    );
}

#[test]
fn partial_parallel_backup_never_starts() {
    partial_backups_never_start(Pg::V17, &["--method", "parallel", "-j", "2"]);
    crate::util::fault_covered(
        "pgpar killed (SIGKILL) mid-copy or while waiting for the end of WAL, parallel method",
        "what is left refuses to start as a server",
    );
}

#[test]
fn partial_stream_backup_of_pg15_never_starts() {
    partial_backups_never_start(Pg::V15, &["--method", "stream"]);
    crate::util::fault_covered(
        "pgpar killed (SIGKILL) mid-copy or while waiting for the end of WAL, stream method (15)",
        "what is left refuses to start as a server",
    );
}

#[test]
fn partial_stream_backup_of_pg17_never_starts() {
    partial_backups_never_start(Pg::V17, &["--method", "stream"]);
    crate::util::fault_covered(
        "pgpar killed (SIGKILL) mid-copy or while waiting for the end of WAL, stream method (17)",
        "what is left refuses to start as a server",
    );
}

#[test]
fn partial_sql_backup_never_starts() {
    partial_backups_never_start(Pg::V15, &["--method", "sql", "-j", "2"]);
    crate::util::fault_covered(
        "pgpar killed (SIGKILL) mid-copy or while waiting for the end of WAL, sql method (15)",
        "what is left refuses to start as a server",
    );
}

/// A cluster with an in-place tablespace holding a table; returns (oid, the table's digest).
fn cluster_with_in_place_tablespace(c: &Cluster) -> (String, String) {
    // In the server's configuration, as a site using them has it: the backup carries
    // postgresql.auto.conf, and a restored server refuses directories in pg_tblspc without it.
    c.psql("ALTER SYSTEM SET allow_in_place_tablespaces = on; SELECT pg_reload_conf();");
    c.psql(
        "SET allow_in_place_tablespaces = on;
         CREATE TABLESPACE inplace LOCATION '';
         CREATE TABLE tin TABLESPACE inplace AS
           SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g;
         CREATE INDEX tin_h ON tin (h) TABLESPACE inplace;",
    );
    let oid = c
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'inplace';")
        .trim()
        .to_string();
    let ts = c.data.join("pg_tblspc").join(&oid);
    let meta = fs::symlink_metadata(&ts).unwrap();
    assert!(
        meta.is_dir(),
        "{} is not an in-place tablespace (a directory, not a link)",
        ts.display()
    );
    let digest = c.psql(TIN_DIGEST);
    (oid, digest)
}

const TIN_DIGEST: &str = "SET enable_seqscan = off; SET enable_bitmapscan = off; \
    SELECT count(*), sum(g), md5(string_agg(h, ',' ORDER BY h)) FROM tin WHERE h > '';";

/// A fresh, empty directory to run pgpar from, apart from the backup's.
fn fresh_cwd() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pgpar-cwd-")
        .tempdir()
        .unwrap()
}

/// `-T <an in-place tablespace's absolute server path>=NEWDIR` with the parallel method, pgpar
/// running in a fresh directory of its own: pg_basebackup does not apply the mapping to an
/// in-place tablespace (its location is relative), checked against pg_basebackup itself, and
/// neither does pgpar.
#[test]
fn in_place_tablespace_parallel_ignores_a_mapping_as_pg_basebackup_does() {
    let pg = Pg::V17;
    let c = Cluster::new(pg);
    let (oid, before) = cluster_with_in_place_tablespace(&c);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let mapped = dir.path().join("mapped");
    let mapping = format!(
        "{}={}",
        c.data.join("pg_tblspc").join(&oid).display(),
        mapped.display()
    );
    let cwd = fresh_cwd();
    let out = run(pgpar()
        .current_dir(cwd.path())
        .args(["backup", "--json", "-c", "fast", "-D"])
        .arg(&target)
        .args(["-d", &c.conninfo("trust_user")])
        .args(["--method", "parallel", "-T", &mapping]));
    out.assert_success();
    assert_eq!(
        walk(cwd.path()),
        Vec::<PathBuf>::new(),
        "pgpar wrote into its working directory:\n{out}"
    );
    assert_eq!(
        list(dir.path()),
        vec!["backup".to_string()],
        "pgpar wrote beside the backup directory:\n{out}"
    );
    let ts = target.join("pg_tblspc").join(&oid);
    let meta = fs::symlink_metadata(&ts).unwrap_or_else(|e| panic!("{}: {e}\n{out}", ts.display()));
    assert!(
        meta.is_dir(),
        "the in-place tablespace is not a directory inside the backup:\n{out}"
    );
    let version_dir = format!("PG_{}_", pg.major());
    assert!(
        list(&ts).iter().any(|n| n.starts_with(&version_dir)),
        "{} holds {:?}",
        ts.display(),
        list(&ts)
    );
    if let Ok(map) = fs::read_to_string(target.join("tablespace_map")) {
        assert!(
            !map.lines().any(|l| l.starts_with(&format!("{oid} "))),
            "tablespace_map names the in-place tablespace (the server would try to replace \
             its directory with a link):\n{map}"
        );
    }
    assert!(
        !mapped.exists(),
        "pgpar applied -T to the in-place tablespace:\n{out}"
    );
    // pg_basebackup, given the same mapping, also leaves the tablespace in the backup.
    let pgb = dir.path().join("pg_basebackup");
    run_ok(
        Command::new(c.bindir.join("pg_basebackup"))
            .current_dir(cwd.path())
            .args(["-c", "fast", "-D"])
            .arg(&pgb)
            .args(["-d", &c.conninfo("trust_user"), "-T", &mapping]),
    );
    assert!(
        !mapped.exists()
            && fs::symlink_metadata(pgb.join("pg_tblspc").join(&oid))
                .map(|m| m.is_dir())
                .unwrap_or(false),
        "pg_basebackup applies -T to an in-place tablespace after all: follow it"
    );
    fs::remove_dir_all(&pgb).unwrap();
    let copy = assert_backup_restores(&c, &target, &out);
    assert_eq!(
        copy.psql(TIN_DIGEST),
        before,
        "the tablespace's table differs"
    );
}
