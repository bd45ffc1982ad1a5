//! File names are bytes, not text (issue 11): a DBA's stray files whose names are not valid
//! UTF-8 — at the top of the data directory, in a directory that is itself so named, and in
//! a tablespace's version directory — are backed up under their exact bytes by every method
//! (stream on 15 and on the patched 17, sql on 15, parallel on the patched 17), appear in
//! `backup_manifest` as PostgreSQL writes such names (`Encoded-Path`, hex), pass the server's
//! own `pg_verifybackup`, and are still there, byte for byte, once the backup runs as a server.
//! A UTF-8 name beside them (a space, a newline) stays a `Path`; in a LATIN1 database too.
//! Such a file the server cannot read is named readably (`caf\xe9`) in the error; a tablespace
//! *location* that is not UTF-8 is refused, naming it.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::{give_to_server_user, is_root, run_ok, scratch_dir, Cluster, Pg};
use crate::util::{pgpar, run, Out};

/// Where a stray file lies.
enum Under {
    /// The data directory.
    Data,
    /// The tablespace's version directory (`PG_<major>_<catversion>`).
    Tablespace,
}

/// The stray files: where, their path there (bytes), their contents.
const STRAYS: &[(Under, &[u8], &[u8])] = &[
    (Under::Data, b"caf\xe9", b"a Latin-1 name at the top\n"),
    (Under::Data, b"d\xe9/f\xff", b"in a directory so named\n"),
    (Under::Tablespace, b"\xff\xfe", b"in a tablespace\n"),
    // Valid UTF-8 (with a space and a newline) stays text: "Path", JSON-escaped.
    (Under::Data, "ümläut name\nx".as_bytes(), b"UTF-8\n"),
];

fn at(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

/// Writes `contents` at `path` (creating its parents, mode 0700/0600), owned by the server's
/// OS user: a file a DBA left there.
fn put(path: &Path, contents: &[u8]) {
    let parent = path.parent().unwrap();
    fs::create_dir_all(parent).unwrap();
    fs::set_permissions(parent, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    if is_root() {
        run_ok(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(parent)
                .arg(path),
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

/// The one entry of `dir` whose name starts with `PG_`.
fn version_dir(dir: &Path) -> String {
    let names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("PG_"))
        .collect();
    assert_eq!(names.len(), 1, "{}: {names:?}", dir.display());
    names[0].clone()
}

fn non_utf8_names_are_kept(pg: Pg, method: &str, initdb: &[&str]) {
    let c = Cluster::with_initdb_args(pg, initdb);
    if let Some(i) = initdb.iter().position(|a| *a == "-E") {
        assert_eq!(c.psql("SHOW server_encoding;").trim(), initdb[i + 1]);
    }
    let old_parent = scratch_dir();
    let old = old_parent.path().join("ts");
    fs::create_dir(&old).unwrap();
    fs::set_permissions(&old, fs::Permissions::from_mode(0o700)).unwrap();
    give_to_server_user(&old);
    c.psql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}';
         CREATE TABLE in_ts TABLESPACE ts1 AS SELECT g FROM generate_series(1, 1000) g;",
        old.display()
    ));
    let oid = c
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1';")
        .trim()
        .to_string();
    let version = version_dir(&old);
    for (under, rel, contents) in STRAYS {
        let root = match under {
            Under::Data => c.data.clone(),
            Under::Tablespace => old.join(&version),
        };
        put(&at(&root, rel), contents);
    }

    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let new = dir.path().join("ts-new");
    let role = if method == "sql" {
        "postgres"
    } else {
        "trust_user"
    };
    let out = run(pgpar()
        .args(["backup", "--json", "-c", "fast", "--method", method, "-D"])
        .arg(&target)
        .args(["-d", &c.conninfo(role)])
        .args(["-T", &format!("{}={}", old.display(), new.display())]));
    out.assert_success();
    assert_eq!(out.json()["method"].as_str(), Some(method), "{out}");
    c.pg_verifybackup(&target);

    // Each file under its exact bytes, with its contents; in the manifest as the server
    // writes a name that is not UTF-8.
    let manifest = fs::read_to_string(target.join("backup_manifest")).unwrap();
    let check_files = |when: &str| {
        for (under, rel, contents) in STRAYS {
            let (root, in_manifest) = match under {
                Under::Data => (target.clone(), rel.to_vec()),
                Under::Tablespace => (
                    new.join(&version),
                    [format!("pg_tblspc/{oid}/{version}/").as_bytes(), rel].concat(),
                ),
            };
            let p = at(&root, rel);
            assert_eq!(
                fs::read(&p).unwrap_or_else(|e| panic!("{when}: {}: {e}\n{out}", p.display())),
                *contents,
                "{when}: {}",
                p.display()
            );
            let line = match std::str::from_utf8(&in_manifest) {
                Ok(text) => format!("{{ \"Path\": \"{}\", ", text.replace('\n', "\\n")),
                Err(_) => format!("{{ \"Encoded-Path\": \"{}\", ", hex(&in_manifest)),
            };
            assert!(
                manifest.contains(&line),
                "the manifest has no {line}:\n{manifest}"
            );
        }
    };
    check_files("in the backup");
    assert!(
        !manifest.contains('\u{fffd}'),
        "a name was changed on its way into the manifest:\n{manifest}"
    );

    // The restored server keeps them (and reads its tablespace).
    let copy = c.start_backup_copy(&target);
    assert_eq!(copy.psql("SELECT count(*) FROM in_ts;").trim(), "1000");
    copy.psql("CHECKPOINT;");
    check_files("in the running restored copy");
    crate::util::fault_covered(
        &format!(
            "file names that are not valid UTF-8 (data directory, tablespace), {method} method, PostgreSQL {}{}",
            pg.major(),
            if initdb.is_empty() { "" } else { ", LATIN1 database" }
        ),
        "copied under their exact bytes, Encoded-Path in the manifest, pg_verifybackup passes, kept by the restored server",
    );
}

#[test]
fn stream_keeps_names_that_are_not_utf8_on_15() {
    non_utf8_names_are_kept(Pg::V15, "stream", &[]);
}

#[test]
fn stream_keeps_names_that_are_not_utf8_on_patched_17() {
    non_utf8_names_are_kept(Pg::V17, "stream", &[]);
}

#[test]
fn sql_keeps_names_that_are_not_utf8_on_15() {
    non_utf8_names_are_kept(Pg::V15, "sql", &[]);
}

/// In a LATIN1 database the server would convert text between LATIN1 and a UTF8 client: a
/// UTF-8 name (`ümläut …`) must come through unconverted as well, and be read by its bytes.
#[test]
fn sql_keeps_names_in_a_latin1_database_on_15() {
    non_utf8_names_are_kept(Pg::V15, "sql", &["-E", "LATIN1"]);
}

#[test]
fn parallel_keeps_names_that_are_not_utf8_on_patched_17() {
    non_utf8_names_are_kept(Pg::V17, "parallel", &[]);
}

/// A backup by `method` into `target`: as `trust_user`, or as `postgres` for the sql method
/// (which needs the functions trust_user may not execute).
fn backup_by(c: &Cluster, method: &str, target: &Path) -> Out {
    let role = if method == "sql" {
        "postgres"
    } else {
        "trust_user"
    };
    run(pgpar()
        .args(["backup", "-c", "fast", "--method", method, "-D"])
        .arg(target)
        .args(["-d", &c.conninfo(role)]))
}

/// A file named `caf\xe9` the server cannot read: the backup fails with one error that names
/// the file readably (`caf\xe9`), never with a replaced or dropped byte.
fn unreadable_file_is_named(c: &Cluster, method: &str) {
    let dir = scratch_dir();
    let target = dir.path().join("backup");
    let out = backup_by(c, method, &target);
    out.assert_error(1);
    assert!(
        out.error_message().contains("caf\\xe9"),
        "the error does not name the file as caf\\xe9:\n{out}"
    );
    assert!(
        !out.stderr.contains('\u{fffd}'),
        "a byte was replaced:\n{out}"
    );
    assert!(!target.exists(), "-D was left behind:\n{out}");
}

fn cluster_with_an_unreadable_non_utf8_name(pg: Pg) -> Cluster {
    let c = Cluster::new(pg);
    let p = at(&c.data, b"caf\xe9");
    put(&p, b"unreadable");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o000)).unwrap();
    c
}

#[test]
fn an_unreadable_file_is_named_readably_by_the_stream_and_sql_methods() {
    let c = cluster_with_an_unreadable_non_utf8_name(Pg::V15);
    unreadable_file_is_named(&c, "stream");
    unreadable_file_is_named(&c, "sql");
    crate::util::fault_covered(
        "a file named with bytes that are not UTF-8 that the server cannot read, stream and sql methods",
        "exit 1, the error names the file with the byte shown as \\xNN; nothing left",
    );
}

#[test]
fn an_unreadable_file_is_named_readably_by_the_parallel_method() {
    let c = cluster_with_an_unreadable_non_utf8_name(Pg::V17);
    unreadable_file_is_named(&c, "parallel");
    crate::util::fault_covered(
        "a file named with bytes that are not UTF-8 that the server cannot read, parallel method",
        "exit 1, the error names the file with the byte shown as \\xNN; nothing left",
    );
}

/// A tablespace whose location is not UTF-8 (`…/caf\xe9`, made in a LATIN1 database): pgpar
/// takes a location as text (`-T` maps it), so it refuses the backup naming the location,
/// rather than losing the tablespace on the way.
fn location_that_is_not_utf8_is_refused(pg: Pg, methods: &[&str]) {
    let c = Cluster::with_initdb_args(pg, &["-E", "LATIN1"]);
    let parent = scratch_dir();
    let loc = at(parent.path(), b"caf\xe9");
    fs::create_dir(&loc).unwrap();
    fs::set_permissions(&loc, fs::Permissions::from_mode(0o700)).unwrap();
    give_to_server_user(parent.path());
    // psql sends UTF-8; the server turns é into LATIN1's byte 0xe9, the directory's name.
    c.psql(&format!(
        "SET client_encoding = 'UTF8';
         CREATE TABLESPACE ts1 LOCATION '{}/café';",
        parent.path().display()
    ));
    for &method in methods {
        let dir = scratch_dir();
        let target = dir.path().join("backup");
        let out = backup_by(&c, method, &target);
        out.assert_error(1);
        assert!(
            out.error_message().contains(&format!(
                "the tablespace location \"{}/caf\\xe9\" is not valid UTF-8",
                parent.path().display()
            )) && out.error_message().contains("pg_basebackup"),
            "the error does not name the location:\n{out}"
        );
        assert!(!target.exists(), "-D was left behind:\n{out}");
    }
}

#[test]
fn a_tablespace_location_that_is_not_utf8_is_refused_naming_it() {
    location_that_is_not_utf8_is_refused(Pg::V15, &["stream", "sql"]);
    location_that_is_not_utf8_is_refused(Pg::V17, &["parallel"]);
    crate::util::fault_covered(
        "a tablespace location that is not valid UTF-8 (stream and sql on 15, parallel on 17)",
        "refused (exit 1) naming the location with the byte as \\xNN and saying what to do; nothing left",
    );
}
