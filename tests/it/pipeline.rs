//! One pipeline for every method (issue 9): both methods write through the same sink, so
//! they lay files down alike — with the modes pg_basebackup gives them on a cluster with group
//! access; manifest checksums are taken as the bytes pass, so no data file is read back and
//! memory stays flat with SHA-256 on a table over 1 GB; a broken WAL stream says so.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{as_server_user, run_ok, scratch_dir, Cluster, Pg};
use crate::util::{mode, pgpar, run, walk};

/// (atime, mtime) with nanoseconds.
fn times(p: &Path) -> ((i64, i64), (i64, i64)) {
    let m = fs::metadata(p).unwrap();
    ((m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec()))
}

#[test]
fn sha256_manifest_reads_no_file_back_and_memory_stays_flat() {
    let c = Cluster::new(Pg::V17);
    // Rows of ~1.8 kB stay below the TOAST threshold: 4 per page, about 1.2 GB of heap.
    c.psql(
        "CREATE TABLE big (g int, pad text);
         ALTER TABLE big ALTER pad SET STORAGE PLAIN;
         INSERT INTO big SELECT g, repeat(md5(g::text), 56) FROM generate_series(1, 600000) g;
         CHECKPOINT;",
    );
    let rel = c
        .psql("SELECT pg_relation_filepath('big');")
        .trim()
        .to_string();
    let table_mb: u64 = c
        .psql("SELECT pg_relation_size('big') >> 20;")
        .trim()
        .parse()
        .unwrap();
    assert!(table_mb > 1100, "the table is only {table_mb} MB");
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = run(pgpar()
        .args([
            "backup", "--json", "-c", "fast", "--method", "parallel", "-j", "4",
        ])
        .args(["--manifest-checksums", "SHA256", "-D"])
        .arg(&target)
        .args(["-d", &c.conninfo("trust_user")]));
    out.assert_success();
    let peak_mb = out.json()["peak_rss_mb"].as_f64().unwrap_or(f64::MAX);
    assert!(
        peak_mb < 64.0,
        "peak RSS {peak_mb} MB with SHA-256 checksums for a {table_mb} MB table:\n{out}"
    );

    // On this relatime file system, reading a file whose atime is not newer than its mtime
    // moves its atime past its mtime. A file pgpar never read keeps the atime it was
    // created with, which its writes leave behind.
    let mut checked = 0;
    for p in walk(&target) {
        let p = target.join(p);
        let m = fs::symlink_metadata(&p).unwrap();
        if !m.is_file() || m.len() == 0 {
            continue;
        }
        let (atime, mtime) = times(&p);
        assert!(
            atime <= mtime,
            "{} was read after it was written (atime {atime:?} > mtime {mtime:?})",
            p.display()
        );
        checked += 1;
    }
    assert!(checked > 500, "only {checked} files checked");
    // The check can fail: a read now does move the atime (the mount records reads).
    let first = target.join(&rel);
    std::thread::sleep(Duration::from_millis(20));
    let mut b = [0u8; 1];
    std::io::Read::read(&mut fs::File::open(&first).unwrap(), &mut b).unwrap();
    let (atime, mtime) = times(&first);
    assert!(
        atime > mtime,
        "reads do not update atime here: the check above proves nothing"
    );

    // The manifest's SHA-256 checksums are right.
    c.pg_verifybackup(&target);
}

/// Every entry's mode under `root`, relative path → mode (symlinks left out: their mode
/// means nothing).
fn modes(root: &Path) -> Vec<(String, u32)> {
    walk(root)
        .into_iter()
        .filter(|p| !fs::symlink_metadata(root.join(p)).unwrap().is_symlink())
        .map(|p| (p.display().to_string(), mode(&root.join(&p))))
        .collect()
}

#[test]
fn group_access_modes_match_pg_basebackup_in_both_methods() {
    let c = Cluster::new(Pg::V17);
    c.psql("CREATE TABLE t AS SELECT generate_series(1, 1000) g;");
    // Give the cluster group access, as initdb -g does (0750 directories, 0640 files), and
    // restart it so the server takes its data_directory_mode from the directory.
    for p in walk(&c.data).into_iter().map(|p| c.data.join(p)) {
        let m = fs::symlink_metadata(&p).unwrap();
        let want = if m.is_dir() {
            0o750
        } else if p.ends_with("server.key") {
            continue; // a key the server owns must stay private
        } else {
            0o640
        };
        run_ok(Command::new("chmod").arg(format!("{want:o}")).arg(&p));
    }
    run_ok(Command::new("chmod").arg("750").arg(&c.data));
    let status = as_server_user(&c.bindir.join("pg_ctl"))
        .arg("-D")
        .arg(&c.data)
        .arg("-l")
        .arg(&c.log)
        .args(["-w", "-t", "120", "-m", "fast", "restart"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "restart failed:\n{}", c.server_log());
    assert_eq!(c.psql("SHOW data_directory_mode;").trim(), "0750");

    let dir = scratch_dir();
    let reference = dir.path().join("pg_basebackup");
    run_ok(
        Command::new(c.bindir.join("pg_basebackup"))
            .arg("-D")
            .arg(&reference)
            .args(["-c", "fast", "-X", "stream", "-d"])
            .arg(c.socket_conninfo("postgres")),
    );
    let want: std::collections::BTreeMap<String, u32> = modes(&reference).into_iter().collect();
    assert!(want.values().any(|m| *m == 0o640), "{want:?}");
    for method in ["stream", "parallel"] {
        let target = dir.path().join(method);
        run(pgpar()
            .args(["backup", "-c", "fast", "--method", method, "-D"])
            .arg(&target)
            .args(["-d", &c.conninfo("trust_user")]))
        .assert_success();
        let mut compared = 0;
        for (path, m) in modes(&target) {
            // WAL segments and their .done markers differ in name with the timing.
            let Some(w) = want.get(&path).copied().or_else(|| {
                path.starts_with("pg_wal/").then(|| {
                    if fs::metadata(target.join(&path)).unwrap().is_dir() {
                        0o750
                    } else {
                        0o640
                    }
                })
            }) else {
                continue;
            };
            // The TLS key, which the server keeps stricter than the cluster's mode, too:
            // SEND_FILE_LIST gives each entry's mode.
            assert_eq!(
                m, w,
                "{method}: mode of {path} is {m:o}, pg_basebackup gives {w:o}"
            );
            compared += 1;
        }
        assert!(compared > 900, "{method}: only {compared} entries compared");
        c.pg_verifybackup(&target);
    }
}

#[test]
fn a_broken_wal_stream_says_it_was_the_wal_stream() {
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(5);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    // Rate-limited so the copy takes several seconds: time to end the WAL stream mid-way.
    let child = pgpar()
        .args([
            "backup", "-c", "fast", "--method", "parallel", "-j", "2", "-r", "4M", "-D",
        ])
        .arg(&target)
        .args(["-d", &c.conninfo("trust_user")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A stream the server ends is resumed on a new connection (a few times): end every one
    // until pgpar gives up.
    // Only once the workers copy: their writer threads are what a failed backup must stop
    // before it removes the directory.
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(120);
    c.wait_for_walsender("SEND_FILES_CONTENT", Duration::from_secs(120));
    let mut ended = 0;
    while child.try_wait().unwrap().is_none() {
        let pids = c.psql(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender' \
             AND query LIKE 'START_REPLICATION%';",
        );
        for pid in pids.split_whitespace() {
            c.psql(&format!("SELECT pg_terminate_backend({pid});"));
            ended += 1;
        }
        assert!(
            Instant::now() < deadline,
            "pgpar still runs after its WAL stream was ended {ended} times"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ended > 0, "no WAL stream was seen");
    let out = crate::util::wait_for(
        child,
        "pgpar backup (in the background)".into(),
        Instant::now(),
    );
    let stderr = &out.stderr;
    assert_eq!(out.code, Some(1), "{stderr}");
    let error = stderr
        .lines()
        .find_map(|l| l.strip_prefix("pgpar: error: "))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(error.starts_with("WAL stream: "), "{stderr}");
    assert!(
        !error.contains("Some(") && !error.contains("None"),
        "{stderr}"
    );
    assert!(!target.exists(), "{} was left behind", target.display());
    crate::util::fault_covered(
        "the WAL stream's walsender terminated mid-backup",
        "exit 1, the error names the WAL stream",
    );
}

#[test]
fn in_place_tablespaces_are_copied_inside_the_backup_by_every_method() {
    let c = Cluster::new(Pg::V17);
    // pgpar runs from a directory of its own: nothing may be resolved against it.
    let cwd = scratch_dir();
    // In postgresql.auto.conf, so that the restored copy accepts the directory too.
    c.psql("ALTER SYSTEM SET allow_in_place_tablespaces = on;");
    c.psql("SELECT pg_reload_conf();");
    c.psql(
        "SET allow_in_place_tablespaces = on;
         CREATE TABLESPACE inplace LOCATION '';
         CREATE TABLE t TABLESPACE inplace AS SELECT generate_series(1, 5000) g;
         CHECKPOINT;",
    );
    let oid = c
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'inplace';")
        .trim()
        .to_string();
    let dir = scratch_dir();
    for method in ["stream", "parallel", "sql"] {
        let target = dir.path().join(method);
        // The sql method's functions: the superuser may execute them.
        let role = if method == "sql" {
            "postgres"
        } else {
            "trust_user"
        };
        let out = run(pgpar()
            .current_dir(cwd.path())
            .args(["backup", "-c", "fast", "--method", method, "-D"])
            .arg(&target)
            .args(["-d", &c.conninfo(role)]));
        out.assert_success();
        let ts = target.join("pg_tblspc").join(&oid);
        let m = fs::symlink_metadata(&ts).unwrap();
        assert!(
            m.is_dir(),
            "{method}: pg_tblspc/{oid} is not a directory in the backup"
        );
        assert!(walk(&ts).len() > 2, "{method}: pg_tblspc/{oid} is empty");
        assert!(
            fs::read_dir(cwd.path()).unwrap().next().is_none(),
            "{method}: something was written into the working directory"
        );
        c.pg_verifybackup(&target);
        let copy = c.start_backup_copy(&target);
        assert_eq!(
            copy.psql("SELECT sum(g) FROM t;").trim(),
            "12502500",
            "{method}"
        );
    }
    crate::util::fault_covered(
        "an in-place tablespace (relative location under pg_tblspc)",
        "copied inside -D by every method (stream, parallel, sql), nothing written outside; restores with its rows",
    );
}

#[test]
fn backup_label_is_written_before_the_first_data_file() {
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(5);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    // Rate-limited, interrupted once data flows, files kept: the label must be there.
    let child = pgpar()
        .args([
            "backup", "-c", "fast", "--method", "parallel", "-j", "2", "-r", "4M", "-n", "-D",
        ])
        .arg(&target)
        .args(["-d", &c.conninfo("trust_user")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.wait_for_walsender("SEND_FILES_CONTENT", Duration::from_secs(60));
    run_ok(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let out = crate::util::wait_for(
        child,
        "pgpar backup (in the background)".into(),
        Instant::now(),
    );
    let stderr = &out.stderr;
    assert_eq!(out.code, Some(1), "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    assert!(!target.join("backup_manifest").exists(), "{stderr}");
    let label = fs::read_to_string(target.join("backup_label"))
        .unwrap_or_else(|e| panic!("no backup_label in the interrupted copy ({e}):\n{stderr}"));
    assert!(label.starts_with("START WAL LOCATION:"), "{label}");
}
