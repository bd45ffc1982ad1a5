//! The set-up checks that keep a fresh machine from failing every test at once (issue 7): the
//! servers' OS user must reach the binaries and scratch directories it is given.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::cluster::{is_root, scratch_dir, Pg};

fn server_access(path: &Path) -> (bool, String) {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/server-access.sh"))
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run server-access.sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A program behind a directory of mode 0700 (as a build cached under Debian's /root was) is
/// refused in one line naming that directory, when the servers run as another user; the same
/// program behind 0755 is accepted. A directory nobody may search (0000) is refused whoever we
/// are.
#[test]
fn server_access_names_the_directory_the_server_user_cannot_enter() {
    let top = scratch_dir();
    let home = top.path().join("home");
    let bin = home.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let initdb = bin.join("initdb");
    fs::copy("/bin/true", &initdb).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let refused_naming_home = |mode: &str| {
        let (ok, err) = server_access(&initdb);
        assert!(!ok, "a program behind a {mode} directory was accepted");
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert!(
            err.contains(&format!("{} is not searchable", home.display()))
                && err.contains(&format!("mode {mode}")),
            "the blocking directory is not named with its mode: {err}"
        );
    };

    fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, err) = server_access(&initdb);
    assert!(ok, "a reachable program was refused: {err}");

    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    if is_root() {
        // The servers run as `postgres`, which cannot enter a root-owned 0700 directory.
        refused_naming_home("700");
    } else {
        // The servers run as ourselves, who own the directory.
        let (ok, err) = server_access(&initdb);
        assert!(ok, "our own 0700 directory was refused: {err}");
    }

    fs::set_permissions(&home, fs::Permissions::from_mode(0o000)).unwrap();
    refused_naming_home("0");
    // Searchable again, so that the temp dir can be removed when we are not root.
    fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The check itself, on what this run hands the servers: both builds' initdb (the PostgreSQL 17
/// one from `make postgres`, whose cache must not sit in a private home when root runs the
/// tests) and the directory scratch directories are made in. `make test` runs the same check
/// before the suite; this is where a bare `cargo test` meets it.
#[test]
fn server_user_reaches_the_builds_and_scratch_space_of_this_run() {
    let mut paths = vec![std::env::temp_dir()];
    for pg in [Pg::V15, Pg::V17] {
        // bindir() panics with the check's line already; the explicit call says it here too.
        paths.push(pg.bindir().join("initdb"));
    }
    for path in paths {
        let (ok, err) = server_access(&path);
        assert!(ok, "{}", err.trim());
    }
}

/// A path that does not exist is refused, naming it.
#[test]
fn server_access_refuses_a_missing_path() {
    let top = scratch_dir();
    let missing = top.path().join("no-such-bindir/initdb");
    let (ok, err) = server_access(&missing);
    assert!(!ok);
    assert!(
        err.contains(&format!("{} does not exist", missing.display())),
        "{err}"
    );
}
