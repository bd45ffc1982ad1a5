//! Faults a DBA meets (issue 11): tight WAL retention under load, server-wide session
//! timeouts, stalled walsenders, a target that is too small, too few walsenders. Each test
//! provokes the fault on a real server and checks what pgpar did: a backup that verifies and
//! restores, or one clear message, a non-zero exit and nothing that looks finished.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::cluster::{scratch_dir, Cluster, Pg};
use crate::util::{pgpar, run, Out};

/// pgbench writing into the cluster until dropped.
struct Load(Child);

impl Load {
    fn start(c: &Cluster, clients: u32, tps: u32) -> Load {
        let child = Command::new(c.bindir.join("pgbench"))
            .args(["-n", "-T", "600", "-c", &clients.to_string()])
            .args(["-R", &tps.to_string()])
            .arg("-h")
            .arg(&c.sockdir)
            .arg("-p")
            .arg(c.port.to_string())
            .args(["-U", "postgres", "postgres"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run pgbench");
        Load(child)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backup(c: &Cluster, target: &Path, args: &[&str]) -> Out {
    // The sql method reads files with pg_read_binary_file: the superuser has the rights.
    let role = if args.contains(&"sql") {
        "postgres"
    } else {
        "trust_user"
    };
    run(pgpar()
        .args(["backup", "-c", "fast", "-D"])
        .arg(target)
        .args(args)
        .args(["-d", &c.conninfo(role)]))
}

/// The backup verifies, starts, and pgbench's tables add up in it.
fn verifies_and_restores(c: &Cluster, target: &Path) {
    c.pg_verifybackup(target);
    let copy = c.start_backup_copy(target);
    assert_eq!(
        copy.psql(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = \
                    (SELECT coalesce(sum(delta), 0) FROM pgbench_history);"
        )
        .trim(),
        "t",
        "pgbench's balances disagree in the restored backup of {}",
        target.display()
    );
}

/// A cluster with 1 MB WAL segments and as little WAL kept as PostgreSQL allows.
fn tight_retention(pg: Pg) -> Cluster {
    let c = Cluster::with_initdb_args(pg, &["--wal-segsize=1"]);
    c.psql(
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB';
         ALTER SYSTEM SET min_wal_size = '2MB';
         ALTER SYSTEM SET max_wal_size = '2MB';
         SELECT pg_reload_conf();",
    );
    c.pgbench_init(2);
    c
}

#[test]
fn tight_wal_retention_under_load_every_method_succeeds() {
    for (pg, methods) in [
        (Pg::V17, &["parallel", "sql", "stream"][..]),
        (Pg::V15, &["sql", "stream"][..]),
    ] {
        let c = tight_retention(pg);
        // 120 transactions a second, enough for a checkpoint every segment or two:
        // `pg_basebackup -X stream` takes this cluster under this load, while a slot left at
        // the previous checkpoint's redo is invalidated at the backup's start checkpoint.
        // (Without a rate, pgbench writes WAL faster than any client on a busy 2-core machine
        // stays within one 1 MB segment of: pg_basebackup fails too.)
        let _load = Load::start(&c, 2, 120);
        // Three backups each: the old failure (a slot invalidated at the start checkpoint)
        // depends on where the last checkpoint's redo happens to be, and came in one of two
        // tries at this load.
        for method in methods {
            for round in 0..3 {
                let dir = scratch_dir();
                let target = dir.path().join("backup");
                let out = backup(&c, &target, &["--method", method]);
                out.assert_success();
                if round == 0 {
                    verifies_and_restores(&c, &target);
                } else {
                    c.pg_verifybackup(&target);
                }
            }
        }
        assert_eq!(
            c.psql("SELECT count(*) FROM pg_replication_slots;").trim(),
            "0",
            "the temporary slots are gone"
        );
    }
    crate::util::fault_covered(
        "tight WAL retention: 1 MB segments, max_slot_wal_keep_size = 1MB, min/max_wal_size = 2MB, under pgbench",
        "every method succeeds, verifies and restores; the temporary slots are gone",
    );
}

#[test]
fn server_wide_session_timeouts_do_not_end_the_backup() {
    for (pg, methods) in [
        (Pg::V17, &["parallel", "sql", "stream"][..]),
        (Pg::V15, &["sql", "stream"][..]),
    ] {
        let c = Cluster::new(pg);
        c.pgbench_init(1);
        c.psql(
            "ALTER SYSTEM SET idle_session_timeout = '1s';
             ALTER SYSTEM SET idle_in_transaction_session_timeout = '1s';
             ALTER SYSTEM SET statement_timeout = '1s';
             SELECT pg_reload_conf();",
        );
        for method in methods {
            let dir = scratch_dir();
            let target = dir.path().join("backup");
            // Rate-limited so that the copy takes several seconds: the leader (and, with the
            // stream method, BASE_BACKUP itself) outlives every timeout many times over.
            let out = backup(&c, &target, &["--method", method, "-r", "4M"]);
            out.assert_success();
            assert!(out.seconds > 2.5, "the backup took only {} s", out.seconds);
            verifies_and_restores(&c, &target);
        }
    }
    crate::util::fault_covered(
        "idle_session_timeout, idle_in_transaction_session_timeout and statement_timeout of 1 s on the server",
        "every method succeeds: pgpar's sessions set them to 0",
    );
}

/// Sends `signal` to a server process (as the servers' OS user when we are root).
fn signal(pid: &str, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Runs `pgpar backup` while, once the copy has begun and a walsender runs a command like
/// `stop_like` (and, when given, one like `once_like` runs too), that walsender is stopped with SIGSTOP; it gets
/// SIGCONT when pgpar has ended, or (with `cont_after`) once a fresh worker connection has
/// replaced it or after that long, or after 240 s whatever happens (so that the server can
/// always be stopped). Returns what pgpar did and whether a process was stopped.
fn backup_with_a_stopped_walsender(
    c: &Cluster,
    target: &Path,
    args: &[&str],
    stop_like: &str,
    once_like: Option<&str>,
    cont_after: Option<std::time::Duration>,
) -> (Out, bool) {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        let stopper = sc.spawn(|| {
            let began = std::time::Instant::now();
            let limit = std::time::Duration::from_secs(240);
            let pid = loop {
                if done.load(std::sync::atomic::Ordering::SeqCst) || began.elapsed() > limit {
                    return false;
                }
                // Mid-copy: the backup's start waits on the server's checkpoint, which no
                // stall timeout bounds (a spread checkpoint takes minutes without a byte).
                let copying = target.join("base").exists();
                let ready = copying
                    && once_like.is_none_or(|q| {
                        c.psql(&format!(
                            "SELECT count(*) FROM pg_stat_activity \
                         WHERE backend_type = 'walsender' AND query LIKE '{q}';"
                        ))
                        .trim()
                            != "0"
                    });
                // A pattern starting with "app:" names a session by its application_name
                // (the sql method's workers), else a walsender by its command.
                let which = match stop_like.strip_prefix("app:") {
                    Some(app) => format!("application_name = '{app}'"),
                    None => format!("backend_type = 'walsender' AND query LIKE '{stop_like}'"),
                };
                let pid = c.psql(&format!(
                    "SELECT pid FROM pg_stat_activity WHERE {which} LIMIT 1;"
                ));
                if ready && !pid.trim().is_empty() {
                    break pid.trim().to_string();
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            let at = c.psql("SELECT now();").trim().to_string();
            signal(&pid, "STOP");
            // With `cont_after`, SIGCONT once a fresh worker connection exists (pgpar has
            // abandoned the stopped one), or after that long.
            let stopped = std::time::Instant::now();
            let replaced = || {
                c.psql(&format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' \
                     AND backend_start > '{at}' AND query LIKE 'SEND_FILES_CONTENT%';"
                ))
                .trim()
                    != "0"
            };
            while !done.load(std::sync::atomic::Ordering::SeqCst)
                && began.elapsed() < limit
                && cont_after.is_none_or(|d| stopped.elapsed() < d && !replaced())
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            signal(&pid, "CONT");
            true
        });
        let out = backup(c, target, args);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (out, stopper.join().unwrap())
    })
}

/// A walsender stopped with SIGSTOP mid-copy, each connection in turn: a worker's ranges
/// are fetched again and the backup completes; the stream method's connection, the leader
/// and the WAL stream end the backup with one message naming the connection and the
/// setting, and nothing is left.
#[test]
fn a_stalled_walsender_never_hangs_the_backup() {
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(2);
    // Rate-limited so that the copy takes several seconds: time to stop a process mid-way.
    let slow = ["-r", "4M", "--stall-timeout", "5"];

    // A worker: abandoned after 5 s, its ranges fetched again on a fresh connection.
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let args = [&["--method", "parallel", "-j", "2"][..], &slow[..]].concat();
    // It gets SIGCONT once pgpar has abandoned it for a fresh connection (what the socket
    // buffers held is read first, at the rate limit; then 5 s of silence): a stall that ends,
    // as a dead TCP connection does in the end. The server's STOP_BACKUP waits until no
    // connection reads the backup's files, and a frozen walsender is still reading.
    let (out, stopped) = backup_with_a_stopped_walsender(
        &c,
        &target,
        &args,
        "SEND_FILES_CONTENT%",
        None,
        Some(std::time::Duration::from_secs(60)),
    );
    assert!(stopped, "no worker was seen:\n{out}");
    out.assert_success();
    assert!(
        out.stderr.contains("taken for stalled (--stall-timeout 5)")
            && out.stderr.contains("again on a new connection"),
        "no word of the stalled worker:\n{out}"
    );
    assert!(out.seconds < 120.0, "took {} s:\n{out}", out.seconds);
    verifies_and_restores(&c, &target);

    // A worker of the sql method (an ordinary session): the same.
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let args = [&["--method", "sql", "-j", "2"][..], &slow[..]].concat();
    let (out, stopped) =
        backup_with_a_stopped_walsender(&c, &target, &args, "app:pgpar sql worker", None, None);
    assert!(stopped, "no sql worker was seen:\n{out}");
    out.assert_success();
    assert!(
        out.stderr.contains("taken for stalled (--stall-timeout 5)")
            && out.stderr.contains("again on a new connection"),
        "no word of the stalled sql worker:\n{out}"
    );
    verifies_and_restores(&c, &target);

    // The stream method's one connection, the parallel leader (stopped while the workers
    // copy: it stalls when pg_control is fetched at the end) and the WAL stream.
    for (method, stop_like, once_like, says) in [
        ("stream", "BASE_BACKUP%", None, "backup stream from "),
        (
            "parallel",
            "SEND_FILE_LIST%",
            Some("SEND_FILES_CONTENT%"),
            "leader: fetching \"global/pg_control\"",
        ),
        (
            "parallel",
            "START_REPLICATION%",
            Some("SEND_FILES_CONTENT%"),
            "WAL stream: the server",
        ),
    ] {
        let dir = scratch_dir();
        let target = dir.path().join("backup");
        let args = [&["--method", method][..], &slow[..]].concat();
        let (out, stopped) =
            backup_with_a_stopped_walsender(&c, &target, &args, stop_like, once_like, None);
        assert!(stopped, "{stop_like}: nothing was stopped:\n{out}");
        out.assert_error(1);
        let error = out.error_message();
        assert!(
            error.starts_with(says) && error.contains("--stall-timeout 5"),
            "{stop_like}: {error}"
        );
        assert!(
            !target.exists(),
            "{stop_like}: {} was left",
            target.display()
        );
    }
    crate::util::fault_covered(
        "a walsender stopped (SIGSTOP) mid-backup: a worker's (parallel, sql), the stream connection, the leader, the WAL stream",
        "a worker is abandoned after --stall-timeout and its ranges fetched again, the backup verifies and restores; the others end with one message naming the connection and the setting, nothing left",
    );
}

/// The leader's backend stopped (SIGSTOP) as soon as the backup has started, so that the
/// file list (SEND_FILE_LIST; the sql method's listing query) never comes, or stops half-way:
/// the backup ends after `--stall-timeout` with one message naming the leader, the step and
/// the setting, and nothing is left.
#[test]
fn a_leader_stalled_while_the_files_are_listed_ends_the_backup_naming_it() {
    let c = Cluster::new(Pg::V17);
    // Many small files, so that the listing lasts well beyond the moment the leader is
    // stopped (the list is read as it comes).
    let many = c.data.join("pgpar_many_files");
    std::fs::create_dir(&many).unwrap();
    for i in 0..40_000 {
        std::fs::write(many.join(format!("f{i}")), b"x").unwrap();
    }
    if crate::cluster::is_root() {
        crate::cluster::run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&many),
        );
    }
    for (method, leader, says) in [
        (
            "parallel",
            // The leader connects first, before the WAL stream.
            "backend_type = 'walsender' AND application_name = 'pgpar' \
             AND EXISTS (SELECT 1 FROM pg_stat_activity WHERE query LIKE 'START_REPLICATION%') \
             ORDER BY backend_start",
            "leader: SEND_FILE_LIST failed: ",
        ),
        (
            "sql",
            "application_name = 'pgpar sql leader'",
            "leader: listing the data directory: ",
        ),
    ] {
        let dir = scratch_dir();
        let target = dir.path().join("backup");
        let done = std::sync::atomic::AtomicBool::new(false);
        let (out, stopped) = std::thread::scope(|sc| {
            let stopper = sc.spawn(|| {
                let began = std::time::Instant::now();
                let limit = std::time::Duration::from_secs(120);
                let pid = loop {
                    if done.load(std::sync::atomic::Ordering::SeqCst) || began.elapsed() > limit {
                        return false;
                    }
                    let pid = c.psql(&format!(
                        "SELECT pid FROM pg_stat_activity WHERE {leader} LIMIT 1;"
                    ));
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        break pid;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                };
                // backup_label is written (and made durable) right after the start, before
                // the list is asked for.
                while !target.join("backup_label").exists() {
                    if done.load(std::sync::atomic::Ordering::SeqCst) || began.elapsed() > limit {
                        return false;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                signal(&pid.to_string(), "STOP");
                while !done.load(std::sync::atomic::Ordering::SeqCst) && began.elapsed() < limit {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                signal(&pid.to_string(), "CONT");
                true
            });
            let out = backup(
                &c,
                &target,
                &["--method", method, "-j", "2", "--stall-timeout", "5"],
            );
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (out, stopper.join().unwrap())
        });
        assert!(stopped, "{method}: the leader was not stopped:\n{out}");
        out.assert_error(1);
        let error = out.error_message();
        assert!(
            error.starts_with(says)
                && error.contains("sent nothing for 5 s")
                && error.contains("(--stall-timeout 5)"),
            "{method}: {error}"
        );
        assert!(out.seconds < 60.0, "{method}: took {} s", out.seconds);
        assert!(!target.exists(), "{method}: {} was left", target.display());
    }
    assert_eq!(
        c.psql("SELECT count(*) FROM pg_replication_slots;").trim(),
        "0",
        "a slot was left"
    );
    crate::util::fault_covered(
        "the leader's backend stopped (SIGSTOP) while the files are listed (SEND_FILE_LIST; the sql method's listing query)",
        "exit 1 after --stall-timeout with one message naming the leader, the step and the setting; nothing left",
    );
}

/// How often the server log shows a replication command starting a backup.
fn backups_started(c: &Cluster) -> usize {
    let log = c.server_log();
    log.matches("replication command: START_BACKUP").count()
        + log.matches("replication command: BASE_BACKUP").count()
}

/// Nothing on the server: no slot, no backup started since `before`.
fn nothing_started(c: &Cluster, before: usize, what: &str) {
    assert_eq!(
        c.psql("SELECT count(*) FROM pg_replication_slots;").trim(),
        "0",
        "{what}: a slot was left"
    );
    assert_eq!(backups_started(c), before, "{what}: a backup was started");
}

#[test]
fn workers_fit_the_free_walsenders_and_a_jobs_that_cannot_be_served_is_refused_first() {
    let mut c = Cluster::new(Pg::V17);
    c.pgbench_init(1);
    c.restart_with("max_wal_senders = 4\n");
    assert_eq!(c.psql("SHOW max_wal_senders;").trim(), "4");
    let dir = scratch_dir();

    // No -j: the leader and the WAL stream take two of the four, two workers fit.
    let target = dir.path().join("auto");
    let out = backup(&c, &target, &["--method", "parallel", "--json"]);
    out.assert_success();
    assert_eq!(out.json()["jobs"], 2, "{out}");
    assert!(
        out.stderr
            .contains("pgpar: notice: using 2 worker connection(s): 3 of max_wal_senders = 4 free"),
        "{out}"
    );
    verifies_and_restores(&c, &target);

    // -j 8 cannot be served: refused before any work, with the number needed.
    let before = backups_started(&c);
    let target = dir.path().join("j8");
    let out = backup(&c, &target, &["--method", "parallel", "-j", "8"]);
    out.assert_error(1);
    let error = out.error_message();
    assert!(
        error.contains("--jobs 8 needs 10 walsenders")
            && error.contains("use --jobs 2 or fewer")
            && error.contains("nothing was started"),
        "{error}"
    );
    nothing_started(&c, before, "-j 8");
    assert!(!target.exists(), "{} was left", target.display());
    crate::util::fault_covered(
        "max_wal_senders = 4 and no -j; then -j 8",
        "without -j: the workers that fit, said in one line, backup succeeds; -j 8 refused before any work with the number needed",
    );
}

/// A tmpfs of `mb` MB at `dir`, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mb: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m,mode=0777"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs on {} failed",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_target_too_small_is_refused_before_the_checkpoint_with_the_sizes() {
    if !crate::cluster::is_root() {
        // Mounting a small file system needs root; say so where the output shows.
        eprintln!("NOT RUN: mounting a tmpfs needs root");
        return;
    }
    let c = Cluster::new(Pg::V17);
    c.pgbench_init(2);
    let dir = scratch_dir();
    let small = Tmpfs::mount(&dir.path().join("small"), 8);
    for method in ["parallel", "stream", "sql"] {
        let before = backups_started(&c);
        let target = small.0.join("backup");
        let out = backup(&c, &target, &["--method", method]);
        out.assert_error(1);
        let error = out.error_message();
        assert!(
            error.contains("the backup needs about ")
                && error.contains(&format!("\"{}\", which has ", target.display()))
                && error.contains("MB free")
                && error.contains("--no-space-check"),
            "{method}: {error}"
        );
        nothing_started(&c, before, method);
        assert_eq!(
            std::fs::read_dir(&small.0).unwrap().count(),
            0,
            "{method}: something was left on the target"
        );
    }
    // Every problem in one report: the space, the walsenders, the slot.
    let before = backups_started(&c);
    let target = small.0.join("backup");
    let out = backup(
        &c,
        &target,
        &["--method", "parallel", "-j", "30", "-S", "no_such_slot"],
    );
    out.assert_error(1);
    let error = out.error_message();
    assert!(
        error.contains("3 problem(s) found before any work")
            && error.contains("(1) --jobs 30 needs 32 walsenders")
            && error.contains("(2) replication slot \"no_such_slot\" does not exist")
            && error.contains("(3) the backup needs about "),
        "{error}"
    );
    nothing_started(&c, before, "three problems");

    // Without the check the copy starts and fails on the full disk, cleanly.
    let target = small.0.join("backup");
    let out = backup(&c, &target, &["--method", "parallel", "--no-space-check"]);
    out.assert_error(1);
    assert!(
        out.error_message().contains("No space left on device"),
        "{}",
        out.error_message()
    );
    assert_eq!(std::fs::read_dir(&small.0).unwrap().count(), 0, "left");
    assert_eq!(
        c.psql("SELECT count(*) FROM pg_replication_slots;").trim(),
        "0"
    );
    crate::util::fault_covered(
        "a target filesystem too small for the backup (8 MB tmpfs)",
        "refused before the checkpoint with the sizes (parallel, stream and sql methods), nothing created on the server or the target; --no-space-check fails cleanly on the full disk",
    );
}

/// A server and a role with everything wrong at once: one report names every problem, each
/// with what to do, before anything is started on the server or written to the target.
#[test]
fn every_problem_is_found_before_any_work_in_one_report() {
    let mut c = Cluster::new(Pg::V15);
    c.pgbench_init(2);
    // wal_level = minimal needs max_wal_senders = 0: two problems of the server.
    c.restart_with("wal_level = minimal\nmax_wal_senders = 0\n");
    let dir = scratch_dir();
    // As root, a target too small too (an 8 MB tmpfs for a cluster of some 35 MB).
    let small = crate::cluster::is_root().then(|| Tmpfs::mount(&dir.path().join("small"), 8));
    let parent = small
        .as_ref()
        .map_or(dir.path().to_path_buf(), |t| t.0.clone());
    let target = parent.join("backup");
    let before = backups_started(&c);
    // norepl_user: no REPLICATION, no EXECUTE on the sql method's functions.
    let out = run(pgpar()
        .args([
            "backup",
            "-c",
            "fast",
            "--method",
            "sql",
            "-S",
            "no_such_slot",
            "-D",
        ])
        .arg(&target)
        .args(["-d", &c.conninfo("norepl_user")])
        .env("PGPASSWORD", crate::cluster::password("norepl_user")));
    // The replication connection was refused: exit 3, as for any connection refused.
    out.assert_error(3);
    let error = out.error_message();
    let expected = [
        "(1) role norepl_user may not open replication connections (it lacks the REPLICATION attribute)",
        "ALTER ROLE norepl_user REPLICATION;",
        "(2) --method sql: role norepl_user on server ",
        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_backup_start(text, boolean) TO norepl_user;",
        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO norepl_user;",
        "(3) wal_level is \"minimal\": set wal_level = replica",
        "(4) the sql method needs 2 walsenders (the leader's replication connection, the WAL stream), but max_wal_senders is 0",
        "raise max_wal_senders to at least 2",
        "(5) replication slot \"no_such_slot\" does not exist: create it first, or add -C",
    ];
    for e in expected {
        assert!(error.contains(e), "the report lacks {e:?}:\n{out}");
    }
    let count = if small.is_some() {
        assert!(
            error.contains("(6) the backup needs about ")
                && error.contains(&format!("\"{}\", which has ", target.display()))
                && error.contains("--no-space-check"),
            "the report lacks the free space:\n{out}"
        );
        6
    } else {
        5
    };
    assert!(
        error.contains(&format!(
            "{count} problem(s) found before any work, nothing was started"
        )),
        "{out}"
    );
    assert!(!error.contains(&format!("({})", count + 1)), "{out}");
    assert!(
        !out.stderr.contains("pgpar: notice:"),
        "a notice before a refusal:\n{out}"
    );
    nothing_started(&c, before, "every problem at once");
    assert_eq!(
        c.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'norepl_user';")
            .trim(),
        "0",
        "a session of the role was left"
    );
    assert!(!target.exists(), "{} was left", target.display());
    if let Some(t) = &small {
        assert_eq!(
            std::fs::read_dir(&t.0).unwrap().count(),
            0,
            "left on the target"
        );
    }

    // A walsender free, so the server itself refuses the role (42501), but too few for the
    // backup: both in one report.
    drop(small);
    c.restart_with("max_wal_senders = 1\n");
    let before = backups_started(&c);
    let target = dir.path().join("backup");
    let out = run(pgpar()
        .args(["backup", "-c", "fast", "--method", "stream", "-D"])
        .arg(&target)
        .args(["-d", &c.conninfo("norepl_user")])
        .env("PGPASSWORD", crate::cluster::password("norepl_user")));
    out.assert_error(3);
    let error = out.error_message();
    assert!(
        error.contains("2 problem(s) found before any work, nothing was started: (1) role norepl_user may not open replication connections")
            && error.contains("ALTER ROLE norepl_user REPLICATION; (2) the stream method needs 2 walsenders (the backup stream, the WAL stream), but max_wal_senders is 1 (0 in use): raise max_wal_senders to at least 2"),
        "{out}"
    );
    nothing_started(&c, before, "no REPLICATION, one walsender");
    assert!(!target.exists(), "{} was left", target.display());
    crate::util::fault_covered(
        "everything wrong at once: a role without REPLICATION or the sql method's GRANTs, wal_level = minimal, max_wal_senders = 0, a -S slot that does not exist, a target too small; then a role without REPLICATION and max_wal_senders = 1",
        "one report before any work naming each problem with what to do (ALTER ROLE, the GRANTs, the settings, the slot, the sizes); exit 3 (the replication connection was refused); nothing created on the server or the target",
    );
}

/// A worker whose connection breaks mid-copy while another client takes the walsender it
/// had: its reconnection is refused (every walsender taken), it leaves with a warning, and
/// the other worker finishes its work.
#[test]
fn a_worker_that_finds_no_walsender_leaves_its_work_to_the_others() {
    let mut c = Cluster::new(Pg::V17);
    c.pgbench_init(2);
    // The leader, two workers and the WAL stream take all four.
    c.restart_with("max_wal_senders = 4\n");
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let done = std::sync::atomic::AtomicBool::new(false);
    let (out, held) = std::thread::scope(|sc| {
        let breaker = sc.spawn(|| {
            let began = std::time::Instant::now();
            let pid = loop {
                if done.load(std::sync::atomic::Ordering::SeqCst)
                    || began.elapsed() > std::time::Duration::from_secs(120)
                {
                    return None;
                }
                let pid = c.psql(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender' \
                     AND query LIKE 'SEND_FILES_CONTENT%' LIMIT 1;",
                );
                if target.join("base").exists() && !pid.trim().is_empty() {
                    break pid.trim().to_string();
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            c.psql(&format!("SELECT pg_terminate_backend({pid});"));
            // Another client takes the walsender before the worker reconnects (it waits
            // 400 ms first).
            Some(c.hold_session(
                &format!("{} replication=true", c.socket_conninfo("postgres")),
                "IDENTIFY_SYSTEM;\n",
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' \
                 AND application_name = 'psql';",
            ))
        });
        let out = backup(
            &c,
            &target,
            &["--method", "parallel", "-j", "2", "-r", "4M", "--json"],
        );
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (out, breaker.join().unwrap())
    });
    assert!(held.is_some(), "no worker was seen:\n{out}");
    out.assert_success();
    assert!(
        out.stderr.contains("the other workers take over its work"),
        "no word of the worker that left:\n{out}"
    );
    drop(held);
    verifies_and_restores(&c, &target);
    crate::util::fault_covered(
        "walsenders used up by another client mid-backup (a worker cannot connect: 53300)",
        "the worker leaves with a warning, the others take its work; the backup verifies and restores",
    );
}
