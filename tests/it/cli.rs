//! Invalid usage and input: exit code 2, one clear error line, and all of it found before any
//! server work — the server never sees a connection and nothing is created on disk.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::cluster::{scratch_dir, Cluster, Pg};
use crate::util::{list, pgpar, run, Out};

/// Watches a cluster's log: `assert_untouched` fails if any connection arrived since `new`.
struct NoConnections<'a> {
    cluster: &'a Cluster,
    offset: usize,
}

impl<'a> NoConnections<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        NoConnections {
            cluster,
            offset: cluster.server_log().len(),
        }
    }

    #[track_caller]
    fn assert_untouched(&self, out: &Out) {
        // A backend logs "connection received" as soon as it is forked; give it a moment.
        std::thread::sleep(Duration::from_millis(200));
        let log = self.cluster.server_log();
        let new = &log[self.offset.min(log.len())..];
        assert!(
            !new.contains("connection received") && !new.contains("replication command"),
            "the server was contacted although the input was invalid:\n{out}\n--- server log\n{new}"
        );
    }
}

/// `pgpar backup -D target -d conninfo -c fast extra...`
fn backup(c: &Cluster, target: &Path, extra: &[&str]) -> Out {
    run(pgpar()
        .arg("backup")
        .arg("-D")
        .arg(target)
        .args(["-d", &c.conninfo("trust_user"), "-c", "fast"])
        .args(extra))
}

#[test]
fn backup_refuses_non_empty_target_directory() {
    let c = Cluster::new(Pg::V15);
    let dir = scratch_dir();
    let target = dir.path().join("full");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("keep.me"), "precious").unwrap();
    let watch = NoConnections::new(&c);

    let out = backup(&c, &target, &[]);
    out.assert_error(2);
    assert!(
        out.error_message().contains(&*target.to_string_lossy()),
        "error does not name the directory:\n{out}"
    );
    assert_eq!(list(&target), ["keep.me"], "the directory was changed");
    assert_eq!(
        fs::read_to_string(target.join("keep.me")).unwrap(),
        "precious"
    );
    watch.assert_untouched(&out);
    crate::util::fault_covered(
        "backup target directory not empty",
        "exit 2 before any connection; nothing in it touched",
    );
}

#[test]
fn backup_refuses_unwritable_target_directory() {
    let c = Cluster::new(Pg::V15);
    let dir = scratch_dir();
    let file = dir.path().join("a-file");
    fs::write(&file, "not a directory").unwrap();
    let watch = NoConnections::new(&c);

    for target in [file.join("backup"), "/proc/pgpar-it/backup".into()] {
        let out = backup(&c, &target, &[]);
        out.assert_error(2);
        assert!(!target.exists(), "{} was created:\n{out}", target.display());
        watch.assert_untouched(&out);
    }
    assert_eq!(fs::read_to_string(&file).unwrap(), "not a directory");
    assert_eq!(list(dir.path()), ["a-file"]);
    crate::util::fault_covered(
        "backup target directory not writable",
        "exit 2 before any connection",
    );
}

#[test]
fn malformed_conninfo_is_a_usage_error() {
    let c = Cluster::new(Pg::V15);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let watch = NoConnections::new(&c);
    let port = c.port;
    let cases = [
        format!("host=127.0.0.1 port={port} user"),
        format!("host=127.0.0.1 port={port} user='trust_user"),
        format!("host=127.0.0.1 port={port} no_such_keyword=1"),
        format!("host=127.0.0.1 port={port} sslmode=sometimes"),
        "host=127.0.0.1 port=not-a-port".to_string(),
        format!("postgresql://trust_user@127.0.0.1:{port}/?no_such_param=1"),
        format!("postgresql://trust_user@[127.0.0.1:{port}/"),
    ];
    for conninfo in &cases {
        let out = run(pgpar().args(["check", "-d", conninfo]));
        out.assert_error(2);
        let out = run(pgpar()
            .arg("backup")
            .arg("-D")
            .arg(&target)
            .args(["-c", "fast", "-d", conninfo]));
        out.assert_error(2);
        assert!(!target.exists(), "-D was created for {conninfo:?}:\n{out}");
        watch.assert_untouched(&out);
    }
}

#[test]
fn invalid_tablespace_mapping_is_a_usage_error() {
    let c = Cluster::new(Pg::V15);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let watch = NoConnections::new(&c);
    for mapping in [
        "no-equals-sign",
        "relative/old=/abs/new",
        "/abs/old=relative/new",
        "=/abs/new",
        "/abs/old=",
    ] {
        let out = backup(&c, &target, &["-T", mapping]);
        // Option parsing may report this in its own format; it must still say what is wrong.
        assert_eq!(
            out.code,
            Some(2),
            "-T {mapping:?} is not a usage error:\n{out}"
        );
        assert!(
            out.stderr.contains(mapping) || out.stderr.contains("tablespace"),
            "the error does not point at -T {mapping:?}:\n{out}"
        );
        assert!(
            !target.exists(),
            "-D was created for -T {mapping:?}:\n{out}"
        );
        watch.assert_untouched(&out);
    }
}

#[test]
fn bad_options_are_usage_errors() {
    let c = Cluster::new(Pg::V15);
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let watch = NoConnections::new(&c);
    let t = target.to_str().unwrap();
    let conn = c.conninfo("trust_user");
    let cases: Vec<Vec<&str>> = vec![
        vec!["backup", "-d", &conn],
        vec!["backup", "-D", t, "-d", &conn, "--no-such-option"],
        vec!["backup", "-D", t, "-d", &conn, "-c", "sometimes"],
        vec![
            "backup",
            "-D",
            t,
            "-d",
            &conn,
            "--manifest-checksums",
            "MD5",
        ],
        vec!["backup", "-D", t, "-d", &conn, "--method", "telepathy"],
        vec!["backup", "-D", t, "-d", &conn, "-j", "zero"],
        vec!["check", "-d", &conn, "-p", "99999999"],
        vec!["no-such-subcommand"],
    ];
    for args in &cases {
        let out = run(pgpar().args(args));
        assert_eq!(out.code, Some(2), "{args:?} is not a usage error:\n{out}");
        assert!(!out.stderr.is_empty(), "{args:?} failed silently:\n{out}");
        assert!(!target.exists(), "-D was created for {args:?}:\n{out}");
        watch.assert_untouched(&out);
    }
    crate::util::fault_covered(
        "invalid option values (-c, --manifest-checksums, --method, -j, port)",
        "exit 2 before any connection; -D not created",
    );
}

#[test]
fn help_lists_the_subcommands() {
    let out = run(pgpar().arg("--help"));
    out.assert_success();
    for word in ["check", "backup"] {
        assert!(out.stdout.contains(word), "--help lacks {word}:\n{out}");
    }
    let out = run(pgpar().args(["backup", "--help"]));
    out.assert_success();
    for opt in ["--tablespace-mapping", "--checkpoint", "--jobs"] {
        assert!(
            out.stdout.contains(opt),
            "backup --help lacks {opt}:\n{out}"
        );
    }
}

#[test]
fn version_answers_as_pg_basebackup_does() {
    // Scripts run `pg_basebackup --version` (or -V) and read one line; the same of pgpar.
    for args in [
        &["--version"][..],
        &["-V"],
        &["backup", "--version"],
        &["backup", "-V"],
        &["check", "--version"],
    ] {
        let out = run(pgpar().args(args));
        out.assert_success();
        assert_eq!(out.stdout.lines().count(), 1, "{args:?}:\n{out}");
        assert!(
            out.stdout.contains(env!("CARGO_PKG_VERSION")),
            "{args:?} does not give the version:\n{out}"
        );
        assert!(out.stderr.is_empty(), "{args:?}:\n{out}");
    }
}

#[test]
fn option_values_compare_as_pg_basebackup_compares_them() {
    // pg_basebackup compares -c and --manifest-checksums without regard to case.
    let c = Cluster::new(Pg::V15);
    let dir = scratch_dir();
    for (i, extra) in [
        &["-c", "FAST", "--manifest-checksums", "sha256"][..],
        &["--checkpoint=Fast", "--manifest-checksums=Sha256"],
    ]
    .iter()
    .enumerate()
    {
        let target = dir.path().join(format!("b{i}"));
        let out = run(pgpar()
            .args(["backup", "--method", "stream", "-D"])
            .arg(&target)
            .args(["-d", &c.conninfo("trust_user")])
            .args(*extra));
        out.assert_success();
        let manifest = fs::read_to_string(target.join("backup_manifest")).unwrap();
        assert!(
            manifest.contains("\"Checksum-Algorithm\": \"SHA256\""),
            "{extra:?}: the manifest does not use SHA256:\n{out}"
        );
        c.pg_verifybackup(&target);
    }
}
