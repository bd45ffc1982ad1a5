//! The parallel method against the patched PostgreSQL 17 (issue: `pgpar backup --jobs N`):
//! backups at several job counts verify and restore; a backup under write load is consistent;
//! tablespaces are mapped; a large table is split over workers and arrives byte-identical;
//! many small files; a killed worker is survived, a killed leader fails cleanly; `-R` makes a
//! streaming standby; memory stays bounded.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::backup_stream::{
    assert_backup_restores, backup_under_load_is_consistent,
    damaged_page_refused_unless_told_not_to_verify, damaged_table, load_extras, snapshot,
};
use crate::cluster::{give_to_server_user, run_ok, scratch_dir, Cluster, Pg};
use crate::util::{pgpar, run, Out};

/// `pgpar backup --json -c fast --method parallel -D target -d <trust_user over TCP> extra...`
fn pbackup(c: &Cluster, target: &Path, extra: &[&str]) -> Out {
    run(pgpar()
        .args([
            "backup", "--json", "-c", "fast", "--method", "parallel", "-D",
        ])
        .arg(target)
        .args(["-d", &c.conninfo("trust_user")])
        .args(extra))
}

/// Starts `pgpar backup` in the background (for tests that interfere with it mid-way).
fn spawn_backup(c: &Cluster, target: &Path, extra: &[&str]) -> std::process::Child {
    pgpar()
        .args(["backup", "-c", "fast", "--method", "parallel", "-D"])
        .arg(target)
        .args(["-d", &c.conninfo("trust_user")])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgpar")
}

fn finish(child: std::process::Child) -> (Option<i32>, String) {
    let out = crate::util::wait_for(
        child,
        "pgpar backup (in the background)".into(),
        Instant::now(),
    );
    (out.code, out.stderr)
}

#[test]
fn parallel_backups_at_1_2_4_and_8_jobs_verify_and_restore() {
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(3);
    load_extras(&c);
    let before = snapshot(&c);
    for jobs in ["1", "2", "4", "8"] {
        let dir = scratch_dir();
        let target = dir.path().join("backup");
        // A small chunk size so that the bigger relations really are split into ranges.
        let out = pbackup(&c, &target, &["-j", jobs, "--chunk-size", "1MB"]);
        out.assert_success();
        let j = out.json();
        assert_eq!(j["method"].as_str(), Some("parallel"), "{out}");
        assert_eq!(j["jobs"].as_u64(), Some(jobs.parse().unwrap()), "{out}");
        let manifest = fs::read_to_string(target.join("backup_manifest")).unwrap();
        assert!(
            manifest.starts_with(
                "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": "
            ),
            "-j {jobs}: manifest is not version 2 with a system identifier"
        );
        let copy = assert_backup_restores(&c, &target, &out);
        assert_eq!(snapshot(&copy), before, "-j {jobs}: restored data differs");
    }
}

#[test]
fn parallel_backup_under_write_load_is_consistent() {
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(5);
    backup_under_load_is_consistent(&c, 4, |target| {
        pbackup(&c, target, &["-j", "4", "--chunk-size", "1MB"])
    });
}

#[test]
fn parallel_backup_maps_two_tablespaces() {
    let c = Cluster::new(Pg::V17);
    let dir = scratch_dir();
    let ts1 = dir.path().join("ts1");
    let ts2 = dir.path().join("ts2");
    for t in [&ts1, &ts2] {
        fs::create_dir(t).unwrap();
        give_to_server_user(t);
    }
    c.psql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}';
         CREATE TABLESPACE ts2 LOCATION '{}';
         CREATE TABLE in1 TABLESPACE ts1 AS SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g;
         CREATE INDEX in1_h ON in1 (h) TABLESPACE ts2;
         CREATE DATABASE db2 TABLESPACE ts2;",
        ts1.display(),
        ts2.display()
    ));
    c.psql_db(
        "db2",
        "CREATE TABLE in2 AS SELECT g FROM generate_series(1, 30000) g;",
    );
    let before = c.psql("SELECT count(*), sum(g), md5(string_agg(h, ',' ORDER BY g)) FROM in1;")
        + &c.psql_db("db2", "SELECT count(*), sum(g) FROM in2;");

    let new1 = dir.path().join("new1");
    let new2 = dir.path().join("new2");
    let target = dir.path().join("backup");
    let map1 = format!("{}={}", ts1.display(), new1.display());
    let map2 = format!("{}={}", ts2.display(), new2.display());
    let out = pbackup(&c, &target, &["-j", "3", "-T", &map1, "-T", &map2]);
    out.assert_success();
    let mut links: Vec<String> = fs::read_dir(target.join("pg_tblspc"))
        .unwrap()
        .map(|e| {
            fs::read_link(e.unwrap().path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    links.sort();
    assert_eq!(
        links,
        vec![new1.display().to_string(), new2.display().to_string()]
    );
    assert!(
        fs::read_dir(&new1).unwrap().next().is_some()
            && fs::read_dir(&new2).unwrap().next().is_some(),
        "mapped tablespace directories are empty"
    );
    let map = fs::read_to_string(target.join("tablespace_map")).unwrap();
    assert!(
        map.contains(&new1.display().to_string()) && !map.contains(&ts1.display().to_string()),
        "tablespace_map must name the mapped locations:\n{map}"
    );
    let copy = assert_backup_restores(&c, &target, &out);
    let after = copy.psql("SELECT count(*), sum(g), md5(string_agg(h, ',' ORDER BY g)) FROM in1;")
        + &copy.psql_db("db2", "SELECT count(*), sum(g) FROM in2;");
    assert_eq!(after, before);
}

fn sha(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn table_larger_than_the_chunk_size_is_split_over_workers_and_identical() {
    let out = a_large_table_is_split_over_workers(Pg::V17, "parallel", "trust_user");
    out.assert_success();
}

/// Backs up a cluster with one table of more than 8 MiB (`--chunk-size 1MB`, `-j 4`) by
/// `method` as `role` and checks that the table came in ranges from at least two workers
/// (debug lines "worker N fetched path@off+len"), byte-identical, and restores; returns the
/// run for the method's own checks.
pub(crate) fn a_large_table_is_split_over_workers(pg: Pg, method: &str, role: &str) -> Out {
    let c = Cluster::new(pg);
    c.psql(
        "CREATE TABLE big AS SELECT g, repeat(md5(g::text), 4) AS pad FROM generate_series(1, 60000) g;
         VACUUM (FREEZE) big;
         CHECKPOINT;",
    );
    let rel = c
        .psql("SELECT pg_relation_filepath('big');")
        .trim()
        .to_string();
    let size = fs::metadata(c.data.join(&rel)).unwrap().len();
    assert!(size > 8 << 20, "table is only {size} bytes");
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = run(pgpar()
        .env("PGPAR_LOG", "debug")
        .args([
            "backup", "--json", "-c", "fast", "--method", method, "-j", "4",
        ])
        .args(["--chunk-size", "1MB", "-D"])
        .arg(&target)
        .args(["-d", &c.conninfo(role)]));
    out.assert_success();
    let mut workers = std::collections::BTreeSet::new();
    let mut ranges = 0;
    for line in out.stderr.lines().filter(|l| l.contains(" fetched ")) {
        let w = line
            .split("worker ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap();
        let n = line.matches(&format!("{rel}@")).count();
        if n > 0 {
            workers.insert(w.to_string());
            ranges += n;
        }
    }
    assert!(
        ranges as u64 >= size / (1 << 20),
        "{rel} came in {ranges} ranges:\n{out}"
    );
    assert!(
        workers.len() >= 2,
        "{rel} was fetched by workers {workers:?} only:\n{out}"
    );
    // Nothing wrote to the table since its checkpoint: the copy must be byte-identical.
    assert_eq!(
        sha(&target.join(&rel)),
        sha(&c.data.join(&rel)),
        "{rel} differs"
    );
    let copy = assert_backup_restores(&c, &target, &out);
    let q = "SELECT count(*), sum(g), md5(string_agg(pad, '' ORDER BY g)) FROM big;";
    assert_eq!(copy.psql(q), c.psql(q));
    out
}

#[test]
fn twenty_thousand_small_relation_files_back_up() {
    many_small_relation_files_back_up(Pg::V17, "parallel", "trust_user").assert_success();
}

/// Backs up (`-j 4`, `method`, as `role`) a cluster of 10,500 tables with a primary key:
/// over 20,000 small relation files. The backup restores with every table; returns the
/// run for the method's own checks.
pub(crate) fn many_small_relation_files_back_up(pg: Pg, method: &str, role: &str) -> Out {
    let c = Cluster::new(pg);
    // Each table has a heap page and a primary-key index: two non-empty files.
    c.psql(
        "DO $$ BEGIN
           FOR i IN 1..10500 LOOP
             EXECUTE format('CREATE TABLE s%s (id int PRIMARY KEY, v int)', i);
             EXECUTE format('INSERT INTO s%s VALUES (%s, %s)', i, i, i);
             IF i % 500 = 0 THEN COMMIT; END IF;
           END LOOP;
         END $$;
         CHECKPOINT;",
    );
    let files = c.psql(
        "SELECT count(*) FROM pg_class WHERE relname ~ '^s[0-9]+(_pkey)?$' AND pg_relation_size(oid) > 0;",
    );
    assert!(
        files.trim().parse::<u32>().unwrap() >= 20000,
        "only {files} relation files"
    );
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = run(pgpar()
        .args([
            "backup", "--json", "-c", "fast", "--method", method, "-j", "4", "-D",
        ])
        .arg(&target)
        .args(["-d", &c.conninfo(role)]));
    let copy = assert_backup_restores(&c, &target, &out);
    let q = "SELECT count(*) FROM pg_class WHERE relname ~ '^s[0-9]+$';
             SELECT (SELECT v FROM s1) + (SELECT v FROM s5000) + (SELECT v FROM s10500);";
    assert_eq!(copy.psql(q), c.psql(q));
    assert_eq!(copy.psql("SELECT v FROM s10500;").trim(), "10500");
    out
}

#[test]
fn killed_worker_connection_is_retried_and_the_backup_completes() {
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(5);
    let before = snapshot_min(&c);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    // Rate-limited so the copy takes several seconds: time to kill a worker mid-way.
    let child = spawn_backup(
        &c,
        &target,
        &["-j", "3", "--chunk-size", "1MB", "-r", "8M", "--json"],
    );
    let pid = c.wait_for_walsender("SEND_FILES_CONTENT", Duration::from_secs(60));
    assert_eq!(
        c.psql(&format!("SELECT pg_terminate_backend({pid});"))
            .trim(),
        "t"
    );
    let (code, stderr) = finish(child);
    assert_eq!(
        code,
        Some(0),
        "backup failed after a worker was killed:\n{stderr}"
    );
    assert!(
        stderr.contains("again on a new connection"),
        "no retry was reported:\n{stderr}"
    );
    c.pg_verifybackup(&target);
    let copy = c.start_backup_copy(&target);
    assert_eq!(snapshot_min(&copy), before);
    crate::util::fault_covered(
        "a worker's walsender killed mid-backup",
        "its ranges fetched again; the backup completes and restores",
    );
}

fn snapshot_min(c: &Cluster) -> String {
    c.psql("SELECT count(*), sum(abalance), sum(aid) FROM pgbench_accounts; SELECT count(*) FROM pgbench_branches;")
}

#[test]
fn killed_leader_fails_cleanly_and_leaves_nothing() {
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(5);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let child = spawn_backup(&c, &target, &["-j", "2", "--chunk-size", "1MB", "-r", "4M"]);
    c.wait_for_walsender("SEND_FILES_CONTENT", Duration::from_secs(60));
    // The leader's last command was SEND_FILE_LIST; it stays idle while the workers copy.
    let leader = c.wait_for_walsender("SEND_FILE_LIST", Duration::from_secs(60));
    assert_eq!(
        c.psql(&format!("SELECT pg_terminate_backend({leader});"))
            .trim(),
        "t"
    );
    let (code, stderr) = finish(child);
    assert_ne!(
        code,
        Some(0),
        "backup succeeded without its leader:\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("pgpar: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "want one error line:\n{stderr}");
    assert!(!target.exists(), "{} was left behind", target.display());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let slots = c.psql("SELECT count(*) FROM pg_replication_slots;");
        if slots.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a replication slot was left on the server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The server-side backup is over: a new one can start at once.
    let target2 = dir.path().join("again");
    pbackup(&c, &target2, &["-j", "2"]).assert_success();
    crate::util::fault_covered(
        "the leader's walsender killed mid-backup",
        "exit 1, nothing left",
    );
}

#[test]
fn recovery_conf_makes_a_streaming_standby_that_catches_up() {
    let c = Cluster::new(Pg::V17);
    c.psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('before');");
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = pbackup(&c, &target, &["-j", "2", "-R"]);
    out.assert_success();
    assert!(target.join("standby.signal").is_file());
    let auto = fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("primary_conninfo = '"), "{auto}");
    let standby = c.start_backup_copy(&target);
    assert_eq!(standby.psql("SELECT pg_is_in_recovery();").trim(), "t");
    c.psql("INSERT INTO t VALUES ('after');");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if standby
            .psql("SELECT count(*) FROM t WHERE v = 'after';")
            .trim()
            == "1"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never received the new row"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        c.psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming';")
            .trim(),
        "1"
    );
}

#[test]
fn too_few_wal_senders_is_reported_before_any_work() {
    let c = Cluster::new(Pg::V17);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = pbackup(&c, &target, &["-j", "19"]);
    out.assert_error(1);
    let msg = out.error_message();
    assert!(
        msg.contains("max_wal_senders") && msg.contains("21"),
        "{out}"
    );
    assert!(!target.exists(), "{} was created", target.display());
    assert_eq!(
        c.psql("SELECT count(*) FROM pg_replication_slots;").trim(),
        "0"
    );
    crate::util::fault_covered(
        "max_wal_senders too low for --jobs",
        "refused before any work with the number needed",
    );
}

#[test]
fn peak_memory_stays_bounded_at_8_jobs() {
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(15);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = pbackup(&c, &target, &["-j", "8", "--no-sync"]);
    out.assert_success();
    let j = out.json();
    let data_mb = j["bytes"].as_u64().unwrap_or(0) >> 20;
    // VmHWM of pgpar's own address space (ru_maxrss of a child would include the
    // test harness's memory, which exec carries over on Linux).
    let peak_mb = j["peak_rss_mb"].as_f64().unwrap_or(f64::MAX);
    assert!(data_mb > 200, "only {data_mb} MB backed up:\n{out}");
    assert!(
        peak_mb < 64.0,
        "peak RSS {peak_mb} MB for a {data_mb} MB backup at -j 8:\n{out}"
    );
}

#[test]
fn page_checksum_failure_keeps_files_without_a_manifest() {
    let c = Cluster::new(Pg::V17);
    let rel = damaged_table(&c, 2);
    let named = format!("\"{rel}\": 1 page(s), blocks 2");
    let out = damaged_page_refused_unless_told_not_to_verify(&c, &rel, &named, |target, extra| {
        pbackup(&c, target, &[&["-j", "2"][..], extra].concat())
    });
    assert_eq!(out.json()["method"].as_str(), Some("parallel"), "{out}");
    crate::util::fault_covered(
        "a damaged data page (checksum failure), parallel method",
        "exit 1 naming the file and block; files kept without a manifest; --no-verify-checksums backs it up and it verifies",
    );
}

#[test]
fn parallel_backup_of_a_standby_restores() {
    // A standby's stop LSN is its minimum recovery point, which is only right because
    // global/pg_control is fetched after every other file.
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(2);
    let dir = scratch_dir();
    let standby_dir = dir.path().join("standby");
    pbackup(&c, &standby_dir, &["-j", "2", "-R"]).assert_success();
    let standby = c.start_backup_copy(&standby_dir);
    c.psql("CREATE TABLE after_standby AS SELECT g FROM generate_series(1, 1000) g;");
    let deadline = Instant::now() + Duration::from_secs(60);
    while standby
        .psql("SELECT count(*) FROM pg_class WHERE relname = 'after_standby';")
        .trim()
        != "1"
    {
        assert!(Instant::now() < deadline, "the standby never caught up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let target = dir.path().join("from-standby");
    let out = pbackup(&standby, &target, &["-j", "3", "--chunk-size", "1MB"]);
    out.assert_success();
    let label = fs::read_to_string(target.join("backup_label")).unwrap();
    assert!(label.contains("BACKUP FROM: standby"), "{label}");
    standby.pg_verifybackup(&target);
    // Start it as a primary of its own (drop the standby settings it inherited).
    fs::remove_file(target.join("standby.signal")).unwrap();
    let copy = standby.start_backup_copy(&target);
    let q =
        "SELECT count(*), sum(abalance) FROM pgbench_accounts; SELECT count(*) FROM after_standby;";
    assert_eq!(copy.psql(q), c.psql(q));
}
