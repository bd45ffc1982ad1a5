//! Backups of stock servers (the BASE_BACKUP "stream" method): the acceptance checks of
//! PostgreSQL's own pg_basebackup TAP tests, ported — the backup verifies, starts, and holds
//! the same data; runtime files are left out; permissions are private; tablespaces are mapped;
//! and a failed backup never leaves anything that looks finished.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{give_to_server_user, password, run_ok, scratch_dir, Cluster, Pg};
use crate::util::{list, mode, pgpar, run, walk, Out};

/// `pgpar backup --json -c fast -D target -d <trust_user over TCP> extra...`
fn backup(c: &Cluster, target: &Path, extra: &[&str]) -> Out {
    run(pgpar()
        .args(["backup", "--json", "-c", "fast", "-D"])
        .arg(target)
        .args(["-d", &c.conninfo("trust_user")])
        .args(extra))
}

/// Tables beyond pgbench's: a TOAST-ed column, an index, a second database.
pub(crate) fn load_extras(c: &Cluster) {
    c.psql(
        "CREATE TABLE toasty (id int PRIMARY KEY, big text);
         ALTER TABLE toasty ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO toasty SELECT i, repeat(md5(i::text), 200) FROM generate_series(1, 2000) i;
         CREATE TABLE indexed (id bigint, k text);
         INSERT INTO indexed SELECT g, 'k-' || g FROM generate_series(1, 200000) g;
         CREATE INDEX indexed_k ON indexed (k);
         CREATE DATABASE otherdb;",
    );
    c.psql_db(
        "otherdb",
        "CREATE TABLE other AS SELECT g AS v FROM generate_series(1, 10000) g;",
    );
    // The TOAST relation really holds the values (else the test would not test TOAST).
    let toast = c.psql(
        "SELECT pg_relation_size(reltoastrelid) > 1000000 FROM pg_class WHERE relname = 'toasty';",
    );
    assert_eq!(toast.trim(), "t", "toasty's values are not out of line");
}

/// Row counts, sums and digests a restored copy must reproduce exactly.
pub(crate) fn snapshot(c: &Cluster) -> String {
    let mut s = c.psql(
        "SELECT 'accounts', count(*), sum(abalance), sum(aid), sum(bid) FROM pgbench_accounts;
         SELECT 'tellers', count(*), sum(tbalance) FROM pgbench_tellers;
         SELECT 'branches', count(*), sum(bbalance) FROM pgbench_branches;
         SELECT 'history', count(*), coalesce(sum(delta), 0) FROM pgbench_history;
         SELECT 'toasty', count(*), sum(length(big)), md5(string_agg(big, ',' ORDER BY id))
           FROM toasty;
         SET enable_seqscan = off;
         SET enable_bitmapscan = off;
         SELECT 'indexed', count(*), sum(id) FROM indexed WHERE k BETWEEN 'k-1000' AND 'k-2000';",
    );
    s += &c.psql_db("otherdb", "SELECT 'other', count(*), sum(v) FROM other;");
    s
}

/// `pg_amcheck` over every database of `c` finds nothing.
pub(crate) fn amcheck(c: &Cluster) {
    run_ok(
        Command::new(c.bindir.join("pg_amcheck"))
            .arg("-h")
            .arg(&c.sockdir)
            .args(["-p", &c.port.to_string(), "-U", "postgres"])
            .args(["--install-missing", "--all"]),
    );
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {s:?}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The WAL segment file named by backup_label's START WAL LOCATION line.
fn start_wal_file(backup: &Path) -> String {
    let label = fs::read_to_string(backup.join("backup_label")).expect("backup_label");
    let line = label
        .lines()
        .find(|l| l.starts_with("START WAL LOCATION:"))
        .unwrap_or_else(|| panic!("no START WAL LOCATION in backup_label:\n{label}"));
    let file = line
        .split("(file ")
        .nth(1)
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    file.to_string()
}

/// (number of files, total bytes) listed in backup_manifest.
fn manifest_totals(backup: &Path) -> (u64, u64) {
    let text = fs::read_to_string(backup.join("backup_manifest")).expect("backup_manifest");
    let m: serde_json::Value = serde_json::from_str(&text).expect("backup_manifest is JSON");
    let files = m["Files"].as_array().expect("manifest Files");
    let bytes = files.iter().map(|f| f["Size"].as_u64().unwrap()).sum();
    (files.len() as u64, bytes)
}

/// Assert a completed backup is a whole, verified backup of `c` and return the copy started
/// from it.
#[track_caller]
pub(crate) fn assert_backup_restores(c: &Cluster, target: &Path, out: &Out) -> Cluster {
    out.assert_success();
    assert!(
        target.join("backup_manifest").is_file(),
        "no manifest:\n{out}"
    );
    c.pg_verifybackup(target);
    c.start_backup_copy(target)
}

fn stream_backup_verifies_and_restores(pg: Pg, scale: u32, extra: &[&str]) {
    let c = Cluster::new(pg);
    c.pgbench_init(scale);
    load_extras(&c);
    let before = snapshot(&c);
    let dir = scratch_dir();
    let target = dir.path().join("backup");

    let out = backup(&c, &target, extra);
    out.assert_success();
    let j = out.json();
    assert_eq!(j["method"].as_str(), Some("stream"), "{out}");
    assert_eq!(j["backup_dir"].as_str(), target.to_str(), "{out}");
    assert_eq!(j["timeline"].as_u64(), Some(1), "{out}");
    let start = parse_lsn(j["start_lsn"].as_str().unwrap_or_default());
    let stop = parse_lsn(j["stop_lsn"].as_str().unwrap_or_default());
    assert!(
        start > 0 && stop >= start,
        "LSNs {start:X} {stop:X}:\n{out}"
    );
    let (files, bytes) = manifest_totals(&target);
    let got_files = j["files"].as_u64().unwrap_or(0);
    let got_bytes = j["bytes"].as_u64().unwrap_or(0);
    assert!(
        got_files + 2 >= files && got_bytes >= bytes / 10 * 9,
        "--json says {got_files} files, {got_bytes} bytes; the manifest lists {files}, {bytes}:\n{out}"
    );
    assert!(
        j["seconds"].as_f64().is_some() && j["mb_per_s"].as_f64().is_some(),
        "{out}"
    );

    let copy = assert_backup_restores(&c, &target, &out);
    assert_eq!(
        snapshot(&copy),
        before,
        "restored data differs from the source"
    );
    amcheck(&copy);
}

#[test]
fn stream_backup_of_pg15_verifies_and_restores_same_data() {
    // No --method: on a stock server, auto must fall back to the stream method.
    stream_backup_verifies_and_restores(Pg::V15, 10, &[]);
}

#[test]
fn stream_backup_of_patched_pg17_verifies_and_restores_same_data() {
    // The patched server still speaks BASE_BACKUP; its manifest and WAL formats are 17's.
    stream_backup_verifies_and_restores(Pg::V17, 2, &["--method", "stream"]);
}

/// A pgbench run in the background until dropped.
struct Load(Child);

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Takes a backup with `take` while `clients` pgbench clients write to `c`, then checks the
/// restored copy: pgbench's tpcb transaction keeps the sums of abalance, tbalance, bbalance
/// and history.delta equal at every consistent point, and pg_amcheck finds nothing.
pub(crate) fn backup_under_load_is_consistent(
    c: &Cluster,
    clients: u32,
    take: impl FnOnce(&Path) -> Out,
) {
    let load = Load(
        Command::new(c.bindir.join("pgbench"))
            .args(["-n", "-c", &clients.to_string(), "-T", "600"])
            .arg("-h")
            .arg(&c.sockdir)
            .args(["-p", &c.port.to_string(), "-U", "postgres", "postgres"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run pgbench"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.psql("SELECT count(*) FROM pgbench_history;").trim() == "0" {
        assert!(Instant::now() < deadline, "pgbench wrote nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = take(&target);
    drop(load);

    let copy = assert_backup_restores(c, &target, &out);
    let sums = copy.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts),
                (SELECT sum(tbalance) FROM pgbench_tellers),
                (SELECT sum(bbalance) FROM pgbench_branches),
                (SELECT sum(delta) FROM pgbench_history),
                (SELECT count(*) FROM pgbench_history);",
    );
    let v: Vec<&str> = sums.trim().split('|').collect();
    assert!(
        v[0] == v[1] && v[1] == v[2] && v[2] == v[3],
        "pgbench invariant broken in the restored copy: {sums}"
    );
    assert_ne!(
        v[4], "0",
        "the copy holds none of the transactions run before the backup"
    );
    amcheck(&copy);
}

#[test]
fn stream_backup_under_write_load_is_consistent() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(5);
    backup_under_load_is_consistent(&c, 2, |target| backup(&c, target, &[]));
}

#[test]
fn stream_backup_leaves_out_runtime_files() {
    let c = Cluster::new(Pg::V15);
    c.psql(
        "SELECT pg_create_physical_replication_slot('pgpar_kept_slot', true);
         CREATE UNLOGGED TABLE unlogged_t AS SELECT generate_series(1, 1000) g;
         CREATE TABLE logged_t AS SELECT generate_series(1, 1000) g;
         CHECKPOINT;",
    );
    let unlogged = c
        .psql("SELECT pg_relation_filepath('unlogged_t');")
        .trim()
        .to_string();
    let logged = c
        .psql("SELECT pg_relation_filepath('logged_t');")
        .trim()
        .to_string();
    let _temp = c.hold_temp_table();
    let planted = [
        "pg_stat_tmp/pgpar.stat",
        "pg_dynshmem/mmap.12345",
        "pg_snapshots/00000003-0000001A-1",
        "pg_serial/0001",
        "base/pgsql_tmp/pgsql_tmp12345.0",
        "pgsql_tmp_in_root",
    ];
    for p in planted {
        c.put_file(p, b"runtime state");
    }

    // Make sure every excluded kind of thing really is in the source.
    let source = walk(&c.data);
    let is_temp_rel = |p: &PathBuf| {
        let name = p.file_name().unwrap().to_string_lossy();
        p.starts_with("base")
            && name.starts_with('t')
            && name[1..].split_once('_').is_some_and(|(a, b)| {
                !a.is_empty()
                    && a.bytes().all(|b| b.is_ascii_digit())
                    && b.bytes().next().is_some_and(|b| b.is_ascii_digit())
            })
    };
    for must in [
        "postmaster.pid",
        "postmaster.opts",
        "pg_replslot/pgpar_kept_slot/state",
    ] {
        assert!(c.data.join(must).exists(), "source lacks {must}");
    }
    assert!(
        source.iter().any(is_temp_rel),
        "source has no temp relation file"
    );
    assert!(
        source.iter().any(|p| p.ends_with("pg_internal.init")),
        "source has no relcache init file"
    );

    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = backup(&c, &target, &["-l", "pgpar-it-label"]);
    out.assert_success();
    c.pg_verifybackup(&target);
    let got = walk(&target);

    for gone in ["postmaster.pid", "postmaster.opts"] {
        assert!(!target.join(gone).exists(), "{gone} was copied");
    }
    for d in [
        "pg_replslot",
        "pg_stat_tmp",
        "pg_dynshmem",
        "pg_snapshots",
        "pg_serial",
        "pg_notify",
        "pg_subtrans",
    ] {
        assert!(target.join(d).is_dir(), "{d}/ is missing");
        assert_eq!(
            list(&target.join(d)),
            Vec::<String>::new(),
            "{d}/ was copied with its contents"
        );
    }
    let bad: Vec<&PathBuf> = got
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("pgsql_tmp") || name == "pg_internal.init" || is_temp_rel(p)
        })
        .collect();
    assert!(bad.is_empty(), "runtime files were copied: {bad:?}");
    // Unlogged relations: the init fork only.
    assert!(
        !target.join(&unlogged).exists(),
        "unlogged main fork copied"
    );
    assert!(
        target.join(format!("{unlogged}_init")).is_file(),
        "init fork missing"
    );
    assert!(
        target.join(&logged).is_file(),
        "a logged table's file is missing"
    );

    let label = fs::read_to_string(target.join("backup_label")).unwrap();
    assert!(
        label.contains("LABEL: pgpar-it-label"),
        "label not used:\n{label}"
    );
    let seg = target.join("pg_wal").join(start_wal_file(&target));
    let seg_len = fs::metadata(&seg)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; pg_wal holds {:?}",
                seg.display(),
                list(&target.join("pg_wal"))
            )
        })
        .len();
    assert_eq!(
        seg_len,
        16 * 1024 * 1024,
        "{} is not a whole segment",
        seg.display()
    );

    let copy = c.start_backup_copy(&target);
    assert_eq!(copy.psql("SELECT count(*) FROM logged_t;").trim(), "1000");
    assert_eq!(copy.psql("SELECT count(*) FROM unlogged_t;").trim(), "0");
    assert_eq!(
        copy.psql("SELECT count(*) FROM pg_replication_slots;")
            .trim(),
        "0"
    );
}

#[test]
fn stream_backup_is_private() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(1);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    // Over the Unix socket this time, named with -h/-p/-U.
    run(pgpar()
        .args(["backup", "-c", "fast", "-D"])
        .arg(&target)
        .arg("-h")
        .arg(&c.sockdir)
        .args(["-p", &c.port.to_string(), "-U", "trust_user"]))
    .assert_success();
    assert_eq!(mode(&target), 0o700, "backup directory");
    let mut checked = 0;
    for rel in walk(&target) {
        let p = target.join(&rel);
        let ft = fs::symlink_metadata(&p).unwrap().file_type();
        let want = if ft.is_dir() {
            0o700
        } else if ft.is_file() {
            0o600
        } else {
            continue;
        };
        assert_eq!(mode(&p), want, "{} has mode {:o}", rel.display(), mode(&p));
        checked += 1;
    }
    assert!(checked > 100, "only {checked} entries in the backup");
}

#[test]
fn stream_backup_maps_tablespaces() {
    let c = Cluster::new(Pg::V15);
    let old_parent = scratch_dir();
    let old = old_parent.path().join("ts-old");
    fs::create_dir(&old).unwrap();
    fs::set_permissions(&old, fs::Permissions::from_mode(0o700)).unwrap();
    give_to_server_user(&old);
    c.psql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}';
         CREATE TABLE in_ts TABLESPACE ts1 AS
           SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g;
         CREATE INDEX in_ts_h ON in_ts (h) TABLESPACE ts1;",
        old.display()
    ));
    let oid = c
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1';")
        .trim()
        .to_string();
    let query = "SELECT count(*), sum(g), md5(string_agg(h, ',' ORDER BY g)) FROM in_ts;";
    let before = c.psql(query);
    let old_contents = walk(&old);

    let dir = scratch_dir();
    // Spaces in both paths: they reach the server, the tar stream and the symlink intact.
    let target = dir.path().join("backup dir");
    let new = dir.path().join("ts new");
    let mapping = format!("{}={}", old.display(), new.display());
    let out = backup(&c, &target, &["-T", &mapping]);
    out.assert_success();

    let link = target.join("pg_tblspc").join(&oid);
    assert_eq!(
        fs::read_link(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display())),
        new,
        "tablespace link does not point to the mapped directory"
    );
    assert!(
        list(&new).iter().any(|n| n.starts_with("PG_15_")),
        "{} lacks the version directory: {:?}",
        new.display(),
        list(&new)
    );
    assert_eq!(walk(&old), old_contents, "the source tablespace changed");

    let copy = assert_backup_restores(&c, &target, &out);
    assert_eq!(copy.psql(query), before);
    assert_eq!(
        copy.psql(&format!("SELECT pg_tablespace_location({oid});"))
            .trim(),
        new.to_str().unwrap()
    );
}

/// No backup session, slot or walsender of a failed backup outlives it on the server.
#[track_caller]
fn assert_server_clean(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = c.psql(
            "SELECT (SELECT count(*) FROM pg_stat_replication)
                  + (SELECT count(*) FROM pg_replication_slots);",
        );
        if left.trim() == "0" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "walsenders or slots left behind after a failed backup"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn failed_connection_leaves_no_backup_directory() {
    let c = Cluster::new(Pg::V15);
    let dir = scratch_dir();
    let conninfo = format!("{} password=WrongPw9Kd2", c.conninfo("scram_user"));
    let fresh = dir.path().join("fresh");
    let out = run(pgpar()
        .args(["backup", "-c", "fast", "-D"])
        .arg(&fresh)
        .args(["-d", &conninfo]));
    out.assert_error(3);
    out.assert_hides(&["WrongPw9Kd2", &password("scram_user")]);
    assert!(!fresh.exists(), "-D was left behind:\n{out}");

    // A directory that existed (empty) before stays, and stays empty.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let out = run(pgpar()
        .args(["backup", "-c", "fast", "-D"])
        .arg(&empty)
        .args(["-d", &conninfo]));
    out.assert_error(3);
    assert_eq!(
        list(&empty),
        Vec::<String>::new(),
        "files left in -D:\n{out}"
    );
}

/// A cluster whose backup fails part-way: the server cannot read one of its own files.
fn cluster_with_unreadable_file() -> Cluster {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(1);
    let f = c.put_file("pgpar_unreadable", &[7u8; 100_000]);
    fs::set_permissions(&f, fs::Permissions::from_mode(0o000)).unwrap();
    c
}

#[test]
fn failure_during_backup_removes_what_was_written() {
    let c = cluster_with_unreadable_file();
    let dir = scratch_dir();
    let fresh = dir.path().join("fresh");
    let out = backup(&c, &fresh, &[]);
    out.assert_error(1);
    assert!(
        out.error_message().contains("pgpar_unreadable"),
        "the error does not name the file the server could not read:\n{out}"
    );
    assert!(
        !fresh.exists(),
        "a failed backup was left in {}:\n{out}",
        fresh.display()
    );
    assert_server_clean(&c);

    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let out = backup(&c, &empty, &[]);
    out.assert_error(1);
    assert!(
        empty.is_dir(),
        "a directory pgpar did not create was removed:\n{out}"
    );
    assert_eq!(
        list(&empty),
        Vec::<String>::new(),
        "files left in -D:\n{out}"
    );
    assert_server_clean(&c);

    // And the server is fit for the next backup once the cause is gone.
    fs::remove_file(c.data.join("pgpar_unreadable")).unwrap();
    let out = backup(&c, &fresh, &[]);
    assert_backup_restores(&c, &fresh, &out);
    crate::util::fault_covered(
        "a file the server cannot read, mid stream backup",
        "exit 1 naming the file; what pgpar wrote removed; server left clean; next backup works",
    );
}

#[test]
fn failure_with_no_clean_keeps_files_but_never_a_manifest() {
    let c = cluster_with_unreadable_file();
    let dir = scratch_dir();
    let target = dir.path().join("kept");
    let out = backup(&c, &target, &["--no-clean"]);
    out.assert_error(1);
    assert!(
        target.is_dir(),
        "--no-clean removed the partial backup:\n{out}"
    );
    assert!(
        !target.join("backup_manifest").exists(),
        "a failed backup has a backup_manifest, so it looks finished:\n{out}"
    );
    assert!(
        out.stdout.trim().is_empty(),
        "a failed backup printed a result:\n{out}"
    );
    assert_server_clean(&c);
    crate::util::fault_covered(
        "a failed backup with --no-clean",
        "files kept, never a backup_manifest; exit 1",
    );
}

#[test]
fn parallel_method_on_stock_server_fails_cleanly() {
    let c = Cluster::new(Pg::V15);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = backup(&c, &target, &["--method", "parallel"]);
    out.assert_error(1);
    assert!(
        out.error_message().contains("parallel"),
        "the error does not say the server lacks the parallel commands:\n{out}"
    );
    assert!(!target.exists(), "-D was left behind:\n{out}");
    assert_server_clean(&c);
    crate::util::fault_covered(
        "--method parallel against a stock server",
        "exit 1, says the server lacks the parallel commands; nothing left",
    );
}

#[test]
fn manifest_checksum_choice_reaches_the_manifest() {
    let c = Cluster::new(Pg::V15);
    c.psql("CREATE TABLE t AS SELECT generate_series(1, 10000) g;");
    let dir = scratch_dir();
    for (args, algorithm) in [
        (&[][..], Some("CRC32C")),
        (
            &["--manifest-checksums", "SHA256", "--no-sync"][..],
            Some("SHA256"),
        ),
        (&["--manifest-checksums", "NONE"][..], None),
    ] {
        let target = dir
            .path()
            .join(format!("backup-{}", algorithm.unwrap_or("none")));
        let out = backup(&c, &target, args);
        out.assert_success();
        c.pg_verifybackup(&target);
        let text = fs::read_to_string(target.join("backup_manifest")).unwrap();
        let m: serde_json::Value = serde_json::from_str(&text).unwrap();
        for f in m["Files"].as_array().unwrap() {
            assert_eq!(
                f["Checksum-Algorithm"].as_str(),
                algorithm,
                "{args:?}: manifest entry {f}"
            );
        }
    }
}

/// Creates table `victim` in `c` and scribbles over the middle of page `block` behind the
/// server's back, so its checksum no longer matches; the table is not written again, so the
/// server never rewrites the page. Returns the table's file path relative to the data directory.
pub(crate) fn damaged_table(c: &Cluster, block: usize) -> String {
    c.psql(
        "CREATE TABLE victim AS SELECT g, repeat('v', 100) AS pad FROM generate_series(1, 5000) g;
         CHECKPOINT;",
    );
    let rel = c
        .psql("SELECT pg_relation_filepath('victim');")
        .trim()
        .to_string();
    let path = c.data.join(&rel);
    let mut bytes = fs::read(&path).unwrap();
    assert!(bytes.len() > (block + 1) * 8192, "victim is too small");
    bytes[block * 8192 + 4000..block * 8192 + 4100].fill(0xA5);
    fs::write(&path, bytes).unwrap();
    rel
}

/// Checks a backup of a cluster with [`damaged_table`]: the run fails, its stderr names the
/// damaged file and block as `named` (pgpar's own page check and the server's warning word it
/// differently), nothing looks finished and the files stay for inspection; a second backup
/// with `--no-verify-checksums` succeeds and passes `pg_verifybackup`. Returns that second
/// run for the method's own checks.
pub(crate) fn damaged_page_refused_unless_told_not_to_verify(
    c: &Cluster,
    rel: &str,
    named: &str,
    backup: impl Fn(&Path, &[&str]) -> Out,
) -> Out {
    let dir = scratch_dir();
    let target = dir.path().join("verified");
    let out = backup(&target, &[]);
    out.assert_error(1);
    assert!(
        out.error_message().contains("checksum"),
        "the error does not mention the checksum failure:\n{out}"
    );
    assert!(
        out.stderr.contains(named),
        "the damaged block is not named ({named}):\n{out}"
    );
    assert!(
        !target.join("backup_manifest").exists(),
        "a backup with a checksum failure looks finished:\n{out}"
    );
    assert!(
        target.join(rel).is_file(),
        "the files were not kept for inspection:\n{out}"
    );

    let target = dir.path().join("unverified");
    let out = backup(&target, &["--no-verify-checksums"]);
    out.assert_success();
    c.pg_verifybackup(&target);
    out
}

#[test]
fn page_checksum_failure_fails_the_backup_unless_told_not_to_verify() {
    let c = Cluster::new(Pg::V15);
    let rel = damaged_table(&c, 1);
    let named = format!("checksum verification failed in file \"./{rel}\", block 1:");
    damaged_page_refused_unless_told_not_to_verify(&c, &rel, &named, |target, extra| {
        backup(&c, target, extra)
    });
    crate::util::fault_covered(
        "a damaged data page (checksum failure), stream method",
        "exit 1; the server's warning names the file and block; files kept without a manifest; --no-verify-checksums backs it up and it verifies",
    );
}

#[test]
fn write_recovery_conf_makes_a_streaming_standby() {
    let c = Cluster::new(Pg::V15);
    c.psql("CREATE TABLE t AS SELECT generate_series(1, 100) g;");
    let dir = scratch_dir();
    let target = dir.path().join("standby");
    let out = backup(
        &c,
        &target,
        &["--method", "stream", "-R", "-S", "pgpar_standby", "-C"],
    );
    out.assert_success();
    assert!(target.join("standby.signal").is_file(), "no standby.signal");
    let auto = fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("primary_conninfo") && auto.contains("primary_slot_name = 'pgpar_standby'"),
        "recovery settings missing from postgresql.auto.conf:\n{auto}"
    );
    let slot = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgpar_standby' \
                AND slot_type = 'physical';";
    assert_eq!(c.psql(slot).trim(), "1", "-C did not create the slot");
    c.pg_verifybackup(&target);

    let standby = c.start_backup_copy(&target);
    assert_eq!(standby.psql("SELECT pg_is_in_recovery();").trim(), "t");
    // It follows the source: a row written there arrives.
    c.psql("INSERT INTO t VALUES (101);");
    let deadline = Instant::now() + Duration::from_secs(60);
    while standby.psql("SELECT count(*) FROM t;").trim() != "101" {
        assert!(
            Instant::now() < deadline,
            "the standby does not replay the source's new rows"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let active =
        c.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'pgpar_standby';");
    assert_eq!(
        active.trim(),
        "t",
        "the standby does not stream through the slot"
    );
}

#[test]
fn progress_json_ends_with_everything_done() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(1);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = backup(&c, &target, &["--method", "stream", "--progress=json"]);
    out.assert_success();
    let reports: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter(|l| !l.starts_with("pgpar: "))
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("progress line {l:?} is not JSON ({e}):\n{out}"))
        })
        .collect();
    let last = reports
        .last()
        .unwrap_or_else(|| panic!("no progress lines:\n{out}"));
    assert_eq!(last["done"].as_bool(), Some(true), "{out}");
    let total = last["bytes_total"].as_u64().unwrap_or(0);
    assert!(total > 10_000_000, "bytes_total {total}:\n{out}");
    assert_eq!(last["bytes_done"].as_u64(), Some(total), "{out}");
    assert_eq!(last["percent"].as_f64(), Some(100.0), "{out}");
    assert_eq!(
        reports
            .iter()
            .filter(|r| r["done"].as_bool() == Some(true))
            .count(),
        1,
        "more than one final progress report:\n{out}"
    );
}

#[test]
fn stream_backup_of_a_standby_restores() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(1);
    let dir = scratch_dir();
    let standby_dir = dir.path().join("standby");
    backup(&c, &standby_dir, &["--method", "stream", "-R"]).assert_success();
    let standby = c.start_backup_copy(&standby_dir);
    c.psql("CREATE TABLE after_standby AS SELECT generate_series(1, 500) g;");
    let deadline = Instant::now() + Duration::from_secs(60);
    while standby
        .psql("SELECT count(*) FROM pg_class WHERE relname = 'after_standby';")
        .trim()
        != "1"
    {
        assert!(Instant::now() < deadline, "the standby does not replay");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Back up the standby itself, as one does to spare a busy primary.
    let target = dir.path().join("from-standby");
    let out = backup(&standby, &target, &["--method", "stream"]);
    let copy = assert_backup_restores(&standby, &target, &out);
    let query = "SELECT count(*), sum(g) FROM after_standby;";
    assert_eq!(copy.psql(query), c.psql(query));
    let accounts = "SELECT count(*), sum(abalance) FROM pgbench_accounts;";
    assert_eq!(copy.psql(accounts), c.psql(accounts));
}

/// Start a throttled backup of `c` into `target`, wait until it has written files, then send
/// it `signal`; returns what it did.
fn interrupt_backup(c: &Cluster, target: &Path, signal: libc::c_int) -> Out {
    let mut cmd = pgpar();
    cmd.args([
        "backup", "-c", "fast", "--method", "stream", "-r", "1M", "-D",
    ])
    .arg(target)
    .args(["-d", &c.conninfo("trust_user")])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let cmdline = format!("{cmd:?} (then signal {signal})");
    let started = Instant::now();
    let child = cmd.spawn().expect("start pgpar");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !target.join("base").is_dir() || walk(&target.join("base")).len() < 10 {
        assert!(
            Instant::now() < deadline,
            "the backup wrote nothing in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill failed");
    crate::util::wait_for(child, cmdline, started)
}

#[test]
fn interrupted_backup_never_looks_finished() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(3);
    let dir = scratch_dir();

    // Ctrl-C: pgpar stops, says so, and removes what it wrote.
    let target = dir.path().join("sigint");
    let out = interrupt_backup(&c, &target, libc::SIGINT);
    out.assert_error(1);
    assert!(
        out.error_message().contains("interrupted"),
        "the error does not say the backup was interrupted:\n{out}"
    );
    assert!(
        !target.exists(),
        "an interrupted backup was left behind:\n{out}"
    );
    assert_server_clean(&c);

    // SIGTERM (a scheduler's timeout) is handled the same way: one message, nothing left.
    let target = dir.path().join("sigterm");
    let out = interrupt_backup(&c, &target, libc::SIGTERM);
    out.assert_error(1);
    assert!(
        out.error_message().contains("interrupted by SIGTERM"),
        "the error does not say the backup was terminated:\n{out}"
    );
    assert!(
        !target.exists(),
        "a terminated backup was left behind:\n{out}"
    );
    assert_server_clean(&c);
    crate::util::fault_covered(
        "SIGINT or SIGTERM mid-backup",
        "exit 1 saying it was interrupted; nothing left; server clean",
    );
}
