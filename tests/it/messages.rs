//! Messages a person reads (issue 11, item 6): no Rust `Debug` formatting anywhere. Every
//! pgpar run through `util::run` is checked (see `util::assert_readable`); here the checker
//! itself is tested, and the fault that once printed `Some(CommandComplete("COPY 0"))`: the
//! server stopped with `-m fast` in the middle of a backup, each method.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cluster::{as_server_user, scratch_dir, Cluster, Pg};
use crate::util::{debug_text, pgpar, Out};

#[test]
fn the_debug_text_checker_finds_what_it_must_and_only_that() {
    for bad in [
        "pgpar: error: WAL streaming ended at 0/E000170 before the backup's end (None); the server said Some(CommandComplete(\"COPY 0\"))",
        "pgpar: error: failed: None",
        "pgpar: error: CommandComplete(\"COPY 0\")",
        "pgpar: error: open: Os { code: 2, kind: NotFound, message: \"x\" }",
        "pgpar: error: Err(Protocol(\"x\"))",
        "pgpar: error: Kind(NotFound)",
    ] {
        assert!(debug_text(bad).is_some(), "not caught: {bad}");
    }
    for good in [
        "pgpar: error: WAL streaming ended at 0/E000170 before the backup's end at 0/E000200: the server sent CommandComplete \"COPY 0\"",
        "pgpar: error: could not connect to 127.0.0.1 port 5432: Connection refused (os error 111)",
        "pgpar: error: --manifest-checksums NONE is not allowed with Nonesuch",
        "pgpar: error: terminating connection due to administrator command (SQLSTATE 57P01)",
        "pgpar: hint: use -c fast { or not }",
        "pgpar: error: worker 2: fetching \"base/5/16384\" (Some file)",
    ] {
        assert_eq!(debug_text(good), None, "false alarm: {good}");
    }
}

/// Starts a throttled backup, stops the server with `pg_ctl stop -m fast` once data flows on
/// every connection the method opens, and returns what pgpar did.
fn backup_with_fast_shutdown(c: &Cluster, method: &str) -> Out {
    let dir = scratch_dir();
    let target = dir.path().join("b");
    // Walsenders of a backup in full flow: the leader (or BASE_BACKUP's connection) and the
    // WAL stream, plus two workers for the parallel method. Waiting for all of them makes
    // "mid-backup" mean the copy itself: on a loaded machine the first directories exist
    // before a worker has connected, and a server stopped then refuses that connection
    // (exit 3), which is another fault than this one.
    let walsenders = if method == "parallel" { 4 } else { 2 };
    let mut cmd = pgpar();
    cmd.args([
        "backup", "-c", "fast", "--method", method, "-j", "2", "-r", "2M", "-D",
    ])
    .arg(&target)
    .args(["-d", &c.conninfo("trust_user")])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let cmdline = format!("{cmd:?} (then pg_ctl stop -m fast)");
    let started = Instant::now();
    let child = cmd.spawn().expect("start pgpar");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !target.join("base").is_dir() {
        assert!(
            Instant::now() < deadline,
            "the backup wrote nothing in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    loop {
        let n: usize = c
            .psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender';")
            .trim()
            .parse()
            .expect("a count");
        if n >= walsenders {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{method}: {n} of {walsenders} walsenders after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let stop = as_server_user(&c.bindir.join("pg_ctl"))
        .arg("-D")
        .arg(&c.data)
        .args(["stop", "-m", "fast", "-w"])
        .output()
        .expect("run pg_ctl");
    assert!(
        stop.status.success(),
        "pg_ctl stop -m fast failed: {stop:?}"
    );
    let out = crate::util::wait_for(child, cmdline, started);
    assert!(
        !target.join("backup_manifest").exists(),
        "a backup cut short has a manifest:\n{out}"
    );
    out
}

#[test]
fn server_stopped_fast_mid_backup_ends_in_one_readable_line() {
    for (pg, method) in [(Pg::V17, "parallel"), (Pg::V15, "stream")] {
        let c = Cluster::new(pg);
        c.pgbench_init(3);
        let out = backup_with_fast_shutdown(&c, method);
        out.assert_error(1);
        crate::util::assert_readable(&out.stderr, &out.cmdline);
        let msg = out.error_message();
        assert!(!msg.is_empty() && !msg.contains('\n'), "{method}:\n{out}");
        if method == "stream" {
            // Where: the server, by host and port.
            let server = format!("127.0.0.1 port {}", c.port);
            assert!(
                msg.contains(&server),
                "{method}: {server} not named:\n{out}"
            );
        }
        // Where the server's own shutdown error reached pgpar, the hint says what to do.
        if msg.contains("SQLSTATE 57P01") {
            assert!(
                out.stderr
                    .contains("pgpar: hint: the server stopped or restarted during the backup"),
                "{method}: no hint after the server's shutdown:\n{out}"
            );
        }
    }
    crate::util::fault_covered(
        "server stopped with pg_ctl stop -m fast mid-backup (parallel on 17, stream on 15)",
        "exit 1, one readable error line, no manifest",
    );
}
