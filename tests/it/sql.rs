//! The sql method (issue 10): parallel backups of stock PostgreSQL 15+ through SQL
//! (`pg_backup_start`, `pg_ls_dir`/`pg_stat_file`, `pg_read_binary_file` over N sessions).
//!
//! On stock 15 and on the patched 17: a `-j 4` backup under pgbench load verifies with the
//! server's own pg_verifybackup, restores, passes pg_amcheck and keeps pgbench's invariant;
//! tablespaces are mapped; a large table is split over workers and arrives byte-identical;
//! 20,000 small files; its file list is BASE_BACKUP's; roles without the privileges are told
//! the GRANTs and automatic selection falls back to the stream method; the least-privilege
//! role README describes backs up; a killed leader fails cleanly, a killed worker is survived;
//! damaged pages are found on the client.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::backup_stream::{
    assert_backup_restores, backup_under_load_is_consistent,
    damaged_page_refused_unless_told_not_to_verify, damaged_table, load_extras, snapshot,
};
use crate::cluster::{give_to_server_user, scratch_dir, Cluster, Pg};
use crate::util::{pgpar, run, Out};

/// `pgpar backup --json -c fast --method sql -D target -d <role over TCP> extra...`
fn sbackup_as(c: &Cluster, role: &str, target: &Path, extra: &[&str]) -> Out {
    run(pgpar()
        .args(["backup", "--json", "-c", "fast", "--method", "sql", "-D"])
        .arg(target)
        .args(["-d", &c.conninfo(role)])
        .args(extra))
}

/// The same as the bootstrap superuser.
fn sbackup(c: &Cluster, target: &Path, extra: &[&str]) -> Out {
    sbackup_as(c, "postgres", target, extra)
}

#[track_caller]
fn assert_sql_method(out: &Out, jobs: u64) {
    out.assert_success();
    let j = out.json();
    assert_eq!(j["method"].as_str(), Some("sql"), "{out}");
    assert_eq!(j["jobs"].as_u64(), Some(jobs), "{out}");
}

/// The statements README's least-privilege section gives, for role `name`.
fn readme_role_sql(name: &str) -> String {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```sql\n-- pgpar least-privilege role")
        .expect("README has the least-privilege role block");
    let block = &readme[start + "```sql\n".len()..];
    let block = &block[..block.find("```").unwrap()];
    assert!(block.contains("pgpar_backup"), "{block}");
    block.replace("pgpar_backup", name)
}

#[test]
fn sql_backup_of_pg15_under_pgbench_load_is_consistent() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(5);
    backup_under_load_is_consistent(&c, 4, |target| {
        let out = sbackup(&c, target, &["-j", "4", "--chunk-size", "1MB"]);
        assert_sql_method(&out, 4);
        let manifest = fs::read_to_string(target.join("backup_manifest")).unwrap();
        assert!(
            manifest.starts_with("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n"),
            "PostgreSQL 15's manifest is version 1:\n{}",
            &manifest[..80.min(manifest.len())]
        );
        out
    });
}

#[test]
fn sql_backup_of_patched_pg17_under_pgbench_load_is_consistent() {
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(5);
    load_extras(&c);
    backup_under_load_is_consistent(&c, 4, |target| {
        let out = sbackup(&c, target, &["-j", "4", "--chunk-size", "1MB"]);
        assert_sql_method(&out, 4);
        let manifest = fs::read_to_string(target.join("backup_manifest")).unwrap();
        assert!(
            manifest.starts_with(
                "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": "
            ),
            "PostgreSQL 17's manifest is version 2 with a system identifier"
        );
        out
    });
}

#[test]
fn sql_backup_restores_the_same_data() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(2);
    load_extras(&c);
    let before = snapshot(&c);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = sbackup(&c, &target, &["-j", "3"]);
    assert_sql_method(&out, 3);
    let label = fs::read_to_string(target.join("backup_label")).unwrap();
    assert!(
        label.contains("BACKUP METHOD: streamed") && label.contains("START TIMELINE: 1"),
        "{label}"
    );
    let copy = assert_backup_restores(&c, &target, &out);
    assert_eq!(snapshot(&copy), before);
}

#[test]
fn sql_backup_maps_a_tablespace() {
    let c = Cluster::new(Pg::V15);
    let dir = scratch_dir();
    let ts = dir.path().join("ts1");
    fs::create_dir(&ts).unwrap();
    give_to_server_user(&ts);
    c.psql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}';
         CREATE TABLE in1 TABLESPACE ts1 AS SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g;
         CREATE INDEX in1_h ON in1 (h);
         CREATE DATABASE db2 TABLESPACE ts1;",
        ts.display()
    ));
    c.psql_db(
        "db2",
        "CREATE TABLE in2 AS SELECT g FROM generate_series(1, 30000) g;",
    );
    let q1 = "SELECT count(*), sum(g), md5(string_agg(h, ',' ORDER BY g)) FROM in1;";
    let q2 = "SELECT count(*), sum(g) FROM in2;";
    let before = c.psql(q1) + &c.psql_db("db2", q2);

    let new = dir.path().join("new1");
    let target = dir.path().join("backup");
    let map = format!("{}={}", ts.display(), new.display());
    let out = sbackup(&c, &target, &["-j", "4", "-T", &map]);
    assert_sql_method(&out, 4);
    let links: Vec<String> = fs::read_dir(target.join("pg_tblspc"))
        .unwrap()
        .map(|e| {
            fs::read_link(e.unwrap().path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(links, vec![new.display().to_string()]);
    assert!(
        fs::read_dir(&new).unwrap().next().is_some(),
        "the mapped tablespace directory is empty"
    );
    let map = fs::read_to_string(target.join("tablespace_map")).unwrap();
    assert!(
        map.contains(&new.display().to_string()) && !map.contains(&ts.display().to_string()),
        "tablespace_map must name the mapped location:\n{map}"
    );
    let copy = assert_backup_restores(&c, &target, &out);
    assert_eq!(copy.psql(q1) + &copy.psql_db("db2", q2), before);
}

#[test]
fn sql_backup_splits_a_large_table_over_workers_byte_identical() {
    let out = crate::parallel::a_large_table_is_split_over_workers(Pg::V15, "sql", "postgres");
    assert_sql_method(&out, 4);
}

#[test]
fn sql_backup_of_twenty_thousand_small_relation_files() {
    let out = crate::parallel::many_small_relation_files_back_up(Pg::V15, "sql", "postgres");
    assert_sql_method(&out, 4);
}

/// The paths of a backup's manifest.
fn manifest_paths(backup: &Path) -> BTreeSet<String> {
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(backup.join("backup_manifest")).unwrap()).unwrap();
    m["Files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["Path"].as_str().unwrap().to_string())
        .collect()
}

/// Every directory under `root`, relative, links not followed.
fn dirs(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.insert(e.path().strip_prefix(root).unwrap().display().to_string());
                stack.push(e.path());
            }
        }
    }
    out
}

fn sql_file_list_is_base_backups(pg: Pg) {
    let c = Cluster::new(pg);
    // A superuser may use every method the server offers, best first.
    let check = run(pgpar().args(["check", "--json", "-d", &c.conninfo("postgres")]));
    check.assert_success();
    let want = match pg {
        Pg::V15 => serde_json::json!(["sql", "stream"]),
        Pg::V17 => serde_json::json!(["parallel", "sql", "stream"]),
    };
    assert_eq!(check.json()["methods"], want, "{check}");
    let dir = scratch_dir();
    let ts = dir.path().join("ts");
    fs::create_dir(&ts).unwrap();
    give_to_server_user(&ts);
    c.psql(&format!(
        "SELECT pg_create_physical_replication_slot('kept', true);
         CREATE UNLOGGED TABLE unlogged_t AS SELECT generate_series(1, 1000) g;
         CREATE TABLESPACE ts LOCATION '{}';
         CREATE TABLE in_ts TABLESPACE ts AS SELECT generate_series(1, 1000) g;
         CREATE UNLOGGED TABLE unlogged_ts TABLESPACE ts AS SELECT generate_series(1, 1000) g;
         CHECKPOINT;",
        ts.display()
    ));
    let _temp = c.hold_temp_table();
    for p in [
        "pg_stat_tmp/pgpar.stat",
        "pg_snapshots/00000003-0000001A-1",
        "base/pgsql_tmp/pgsql_tmp12345.0",
        "pgsql_tmp_in_root",
        "global/pg_internal.init.123",
        "postgresql.auto.conf.tmp",
    ] {
        c.put_file(p, b"runtime state");
    }
    let ts_map = |name: &str| format!("{}={}", ts.display(), dir.path().join(name).display());
    let stream = dir.path().join("stream");
    run(pgpar()
        .args(["backup", "-c", "fast", "--method", "stream", "-D"])
        .arg(&stream)
        .args(["-T", &ts_map("ts_stream"), "-d", &c.conninfo("postgres")]))
    .assert_success();
    let sql = dir.path().join("sql");
    let out = sbackup(&c, &sql, &["-j", "2", "-T", &ts_map("ts_sql")]);
    assert_sql_method(&out, 2);
    c.pg_verifybackup(&sql);
    let (want, mut got) = (manifest_paths(&stream), manifest_paths(&sql));
    // Not a file of the cluster: the session writes it beside the labels (as for the
    // parallel method), where BASE_BACKUP in plain format makes the links alone.
    assert!(got.remove("tablespace_map"), "no tablespace_map");
    assert_eq!(
        got.symmetric_difference(&want).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "the sql method's files differ from BASE_BACKUP's"
    );
    assert!(
        want.iter().any(|p| p.starts_with("pg_tblspc/")),
        "the tablespace is not in the list"
    );
    assert_eq!(dirs(&sql), dirs(&stream), "directories differ");
    assert_eq!(
        dirs(&dir.path().join("ts_sql")),
        dirs(&dir.path().join("ts_stream")),
        "tablespace directories differ"
    );
}

#[test]
fn sql_file_list_is_base_backups_on_pg15() {
    sql_file_list_is_base_backups(Pg::V15);
}

#[test]
fn sql_file_list_is_base_backups_on_pg17() {
    sql_file_list_is_base_backups(Pg::V17);
}

#[test]
fn role_without_privileges_is_told_the_grants_and_auto_falls_back_to_stream() {
    let c = Cluster::new(Pg::V15);
    let functions = [
        "pg_catalog.pg_backup_start(text, boolean)",
        "pg_catalog.pg_backup_stop(boolean)",
        "pg_catalog.pg_ls_dir(text, boolean, boolean)",
        "pg_catalog.pg_stat_file(text, boolean)",
        "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
    ];
    // trust_user: REPLICATION, no function privileges.
    let check = run(pgpar().args(["check", "-d", &c.conninfo("trust_user")]));
    check.assert_success();
    for f in functions {
        let grant = format!("GRANT EXECUTE ON FUNCTION {f} TO trust_user;");
        assert!(
            check.stdout.contains(&grant),
            "check lacks {grant}:\n{check}"
        );
    }
    assert!(
        check.stdout.contains("methods usable:     stream"),
        "{check}"
    );
    assert!(!check.stdout.contains("pg_read_server_files"), "{check}");
    let j = run(pgpar().args(["check", "--json", "-d", &c.conninfo("trust_user")])).json();
    assert_eq!(j["methods"], serde_json::json!(["stream"]));
    assert_eq!(j["sql_method_grants"].as_array().unwrap().len(), 5);

    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = sbackup_as(&c, "trust_user", &target, &["-j", "2"]);
    out.assert_error(1);
    let msg = out.error_message();
    for f in functions {
        assert!(msg.contains(f), "the error does not name {f}:\n{out}");
    }
    assert!(msg.contains("GRANT EXECUTE ON FUNCTION"), "{out}");
    assert!(!target.exists(), "{} was left behind", target.display());

    let out = run(pgpar()
        .args(["backup", "--json", "-c", "fast", "-D"])
        .arg(&target)
        .args(["-d", &c.conninfo("trust_user")]));
    out.assert_success();
    assert_eq!(out.json()["method"].as_str(), Some("stream"), "{out}");
    let notice: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("pgpar: notice:"))
        .collect();
    assert_eq!(notice.len(), 1, "{out}");
    assert!(
        notice[0].contains("using the stream method") && notice[0].contains("sql method"),
        "{out}"
    );
    assert!(
        out.json()["method_choice"]
            .as_str()
            .is_some_and(|s| s.contains("using the stream method")),
        "{out}"
    );

    // A role without REPLICATION is told that too.
    let check = run(pgpar()
        .args(["check", "-d", &c.conninfo("norepl_user")])
        .env("PGPASSWORD", crate::cluster::password("norepl_user")));
    check.assert_error(3);
    assert!(
        check.stderr.contains("ALTER ROLE norepl_user REPLICATION;"),
        "{check}"
    );
    crate::util::fault_covered(
        "a role without the sql method's privileges",
        "pgpar check and backup --method sql name the missing GRANTs; automatic selection falls back to the stream method and says so",
    );
}

#[test]
fn least_privilege_role_from_readme_backs_up_with_the_sql_method() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(1);
    c.psql(&readme_role_sql("backup_role"));
    trust_role(&c, "backup_role");
    let check = run(pgpar().args(["check", "-d", &c.socket_conninfo("backup_role")]));
    check.assert_success();
    assert!(
        check.stdout.contains("methods usable:     sql, stream"),
        "{check}"
    );
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = run(pgpar()
        .args(["backup", "--json", "-c", "fast", "-j", "4", "-D"])
        .arg(&target)
        .args(["-d", &c.socket_conninfo("backup_role")]));
    out.assert_success();
    assert_eq!(out.json()["method"].as_str(), Some("sql"), "{out}");
    assert!(
        out.stderr.contains("using the sql method"),
        "the choice is not announced:\n{out}"
    );
    let copy = assert_backup_restores(&c, &target, &out);
    let q = "SELECT count(*), sum(abalance) FROM pgbench_accounts;";
    assert_eq!(copy.psql(q), c.psql(q));
}

/// Starts a rate-limited `pgpar backup --method sql` in the background as `role`.
fn spawn_backup(c: &Cluster, role: &str, target: &Path, extra: &[&str]) -> std::process::Child {
    pgpar()
        .args(["backup", "-c", "fast", "--method", "sql", "-D"])
        .arg(target)
        .args(["-d", &c.conninfo(role)])
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

/// Waits until a session of `role` calling itself `app` (pgpar names its sql leader and
/// workers) has run a query matching `like`; returns its pid.
fn wait_for_session(c: &Cluster, role: &str, app: &str, like: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pid = c.psql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE usename = '{role}' \
             AND application_name = '{app}' AND query LIKE '{like}' \
             ORDER BY backend_start LIMIT 1;"
        ));
        if !pid.trim().is_empty() {
            return pid.trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no session {app} of {role} ran {like} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lets `role` in without a password, over the socket and TCP, to any database and for
/// replication (the fixture's pg_hba.conf names each of its roles).
fn trust_role(c: &Cluster, role: &str) {
    let hba = c.data.join("pg_hba.conf");
    let mut conf = fs::read_to_string(&hba).unwrap();
    for db in ["all", "replication"] {
        conf += &format!("local {db} {role} trust\nhost {db} {role} 127.0.0.1/32 trust\n");
    }
    fs::write(&hba, conf).unwrap();
    c.psql("SELECT pg_reload_conf();");
}

/// A superuser of its own, so that its sessions are told apart from the test's psql.
fn backup_superuser(c: &Cluster) {
    c.psql("CREATE ROLE sql_backup LOGIN SUPERUSER REPLICATION;");
    trust_role(c, "sql_backup");
}

#[test]
fn killed_leader_session_fails_cleanly_and_ends_the_server_side_backup() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(5);
    backup_superuser(&c);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let child = spawn_backup(
        &c,
        "sql_backup",
        &target,
        &["-j", "2", "--chunk-size", "1MB", "-r", "4M"],
    );
    // Workers are reading; the leader sits idle, holding the backup open.
    wait_for_session(
        &c,
        "sql_backup",
        "pgpar sql worker",
        "%pg_read_binary_file%",
    );
    let leader = wait_for_session(&c, "sql_backup", "pgpar sql leader", "%");
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
    assert!(
        errors[0].contains("leader session") && errors[0].contains("terminating connection"),
        "the error does not say the leader was ended:\n{stderr}"
    );
    assert!(!target.exists(), "{} was left behind", target.display());
    // The backup ended on the server with its session; nothing of pgpar's is left.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = c.psql(
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE usename = 'sql_backup')
                  + (SELECT count(*) FROM pg_replication_slots);",
        );
        if left.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pgpar's sessions or slot were left on the server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    crate::util::fault_covered(
        "the leader's SQL session killed mid-backup (sql method)",
        "exit non-zero with one error line naming the leader session; the server-side backup, sessions and slot gone; nothing left",
    );
}

#[test]
fn killed_worker_session_is_retried_and_the_backup_completes() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(5);
    backup_superuser(&c);
    let q = "SELECT count(*), sum(abalance), sum(aid) FROM pgbench_accounts;";
    let before = c.psql(q);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let child = spawn_backup(
        &c,
        "sql_backup",
        &target,
        &["-j", "3", "--chunk-size", "1MB", "-r", "8M"],
    );
    let pid = wait_for_session(
        &c,
        "sql_backup",
        "pgpar sql worker",
        "%pg_read_binary_file%",
    );
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
    assert_eq!(copy.psql(q), before);
    crate::util::fault_covered(
        "a worker's SQL session killed mid-backup (sql method)",
        "its ranges fetched again on a new session; the backup verifies and restores",
    );
}

#[test]
fn damaged_page_is_found_on_the_client_unless_told_not_to_verify() {
    let c = Cluster::new(Pg::V15);
    let rel = damaged_table(&c, 2);
    let named = format!("\"{rel}\": 1 page(s), blocks 2");
    let out = damaged_page_refused_unless_told_not_to_verify(&c, &rel, &named, |target, extra| {
        sbackup(&c, target, &[&["-j", "2"][..], extra].concat())
    });
    assert_sql_method(&out, 2);
    crate::util::fault_covered(
        "a damaged data page (checksum failure), sql method",
        "exit 1 naming the file and block (the client's own page check); files kept without a manifest; --no-verify-checksums backs it up and it verifies",
    );
}

#[test]
fn sql_backup_of_a_standby_restores() {
    // A standby's stop LSN is its minimum recovery point, which is only right because
    // global/pg_control is read after every other file.
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(2);
    let dir = scratch_dir();
    let standby_dir = dir.path().join("standby");
    sbackup(&c, &standby_dir, &["-j", "2", "-R"]).assert_success();
    let standby = c.start_backup_copy(&standby_dir);
    assert_eq!(standby.psql("SELECT pg_is_in_recovery();").trim(), "t");
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
    let out = sbackup(&standby, &target, &["-j", "3", "--chunk-size", "1MB"]);
    assert_sql_method(&out, 3);
    let label = fs::read_to_string(target.join("backup_label")).unwrap();
    assert!(label.contains("BACKUP FROM: standby"), "{label}");
    standby.pg_verifybackup(&target);
    fs::remove_file(target.join("standby.signal")).unwrap();
    let copy = standby.start_backup_copy(&target);
    let q =
        "SELECT count(*), sum(abalance) FROM pgbench_accounts; SELECT count(*) FROM after_standby;";
    assert_eq!(copy.psql(q), c.psql(q));
}

#[test]
fn role_timeouts_do_not_end_the_backup() {
    // The leader sits idle while the workers copy, and a listing or a read may take longer
    // than a role's statement_timeout: the sessions turn both off for themselves.
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(2);
    backup_superuser(&c);
    c.psql(
        "ALTER ROLE sql_backup SET statement_timeout = '20ms';
         ALTER ROLE sql_backup SET idle_session_timeout = '100ms';",
    );
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    // Rate-limited to about 3 s: the leader is idle far longer than 100 ms.
    let out = sbackup_as(&c, "sql_backup", &target, &["-j", "2", "-r", "10M"]);
    assert_sql_method(&out, 2);
    assert!(out.json()["seconds"].as_f64().unwrap() > 1.0, "{out}");
    c.pg_verifybackup(&target);
}

#[test]
fn sql_backup_peak_memory_stays_bounded_at_8_jobs() {
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(15);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = sbackup(&c, &target, &["-j", "8", "--no-sync"]);
    assert_sql_method(&out, 8);
    let j = out.json();
    let data_mb = j["bytes"].as_u64().unwrap_or(0) >> 20;
    let peak_mb = j["peak_rss_mb"].as_f64().unwrap_or(f64::MAX);
    assert!(data_mb > 200, "only {data_mb} MB backed up:\n{out}");
    // The parallel method's bound: reads in flight and queued writes are bounded per session.
    assert!(
        peak_mb < 64.0,
        "peak RSS {peak_mb} MB for a {data_mb} MB backup at -j 8:\n{out}"
    );
}

#[test]
fn an_interrupted_copy_holds_a_backup_label_no_server_starts_from() {
    // The server hands the real backup_label over only at pg_backup_stop, after the data
    // (global/pg_control included) is copied: until then the backup holds a placeholder.
    let c = Cluster::new(Pg::V15);
    c.pgbench_init(5);
    backup_superuser(&c);
    let dir = scratch_dir();
    let target = dir.path().join("interrupted");
    let child = spawn_backup(
        &c,
        "sql_backup",
        &target,
        &["-n", "-j", "2", "--chunk-size", "1MB", "-r", "4M"],
    );
    wait_for_session(
        &c,
        "sql_backup",
        "pgpar sql worker",
        "%pg_read_binary_file%",
    );
    let leader = wait_for_session(&c, "sql_backup", "pgpar sql leader", "%");
    c.psql(&format!("SELECT pg_terminate_backend({leader});"));
    let (code, stderr) = finish(child);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(!target.join("backup_manifest").exists(), "{stderr}");
    let placeholder = fs::read_to_string(target.join("backup_label")).unwrap();
    assert!(
        placeholder.starts_with("INCOMPLETE BACKUP"),
        "{placeholder}"
    );

    // Put that label into a complete backup (pg_control and all): it still must not start.
    let whole = dir.path().join("whole");
    let out = sbackup(&c, &whole, &["-j", "2"]);
    assert_sql_method(&out, 2);
    assert!(!fs::read_to_string(whole.join("backup_label"))
        .unwrap()
        .starts_with("INCOMPLETE"));
    fs::write(whole.join("backup_label"), &placeholder).unwrap();
    match c.try_start_backup_copy(&whole) {
        Ok(_) => panic!("a server started from the placeholder backup_label"),
        Err(log) => assert!(log.contains("backup_label"), "{log}"),
    }
}

/// The sql method's sessions are ordinary connections: a role that may replicate but not
/// connect to the database is told the GRANT it lacks, not a replication hint.
#[test]
fn a_role_without_connect_is_told_the_grant_for_its_sql_sessions() {
    let c = Cluster::new(Pg::V15);
    c.psql(
        "CREATE ROLE noconnect LOGIN REPLICATION; REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;",
    );
    trust_role(&c, "noconnect");
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = run(pgpar()
        .args(["backup", "-c", "fast", "--method", "sql", "-D"])
        .arg(&target)
        .args([
            "-d",
            &format!("{} dbname=postgres", c.conninfo("noconnect")),
        ]));
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr
            .contains("GRANT CONNECT ON DATABASE \"postgres\" TO \"noconnect\""),
        "no CONNECT grant named:\n{out}"
    );
    assert!(
        !out.stderr.contains("REPLICATION attribute"),
        "a replication hint for an SQL session:\n{out}"
    );
    assert!(!target.exists(), "{} was left", target.display());
    crate::util::fault_covered(
        "a role that may replicate but not CONNECT to the database, sql method",
        "refused before any work with the GRANT CONNECT it needs; nothing left",
    );
}
