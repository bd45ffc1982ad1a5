//! What the client does that `BASE_BACKUP` does on the server, held to the server itself:
//!
//! - the exclusion table (`pgpar::exclusions`): a walk of a live cluster's data directory and
//!   tablespace that follows it leaves out exactly what `pg_basebackup` leaves out — the same
//!   files (its manifest) and the same directories (its tar), on PostgreSQL 15 and 17;
//! - the page checksum (`pgpar::pagecheck`): every page of every checksummed file of a stopped
//!   cluster verifies; a flipped byte fails, naming the block, with the very checksums
//!   `pg_checksums` computes.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use pgpar::exclusions::{looks_like_temp_relation, EntryKind, Exclusions, Root, Verdict};
use pgpar::lsn::Lsn;
use pgpar::pagecheck::{
    relation_block, segment_of_file_name, verify_page, verify_range, PageCheck, BLCKSZ,
};

use crate::cluster::{as_server_user, give_to_server_user, run_ok, scratch_dir, Cluster, Pg};
use crate::util::walk;

/// What a backup holds, as paths relative to the data directory (tablespace files as
/// `pg_tblspc/<oid>/<version dir>/…`, as in a manifest).
#[derive(Default, Debug)]
struct Copy {
    files: BTreeSet<String>,
    dirs: BTreeSet<String>,
}

fn kind_of(path: &Path) -> EntryKind {
    let t = fs::symlink_metadata(path).unwrap().file_type();
    if t.is_symlink() {
        EntryKind::Symlink
    } else if t.is_dir() {
        EntryKind::Dir
    } else {
        EntryKind::File
    }
}

/// Walk directory `rel` (under `base`, `rel` relative to `root`) as a client following the
/// exclusion table would, recording under `prefix`.
fn walk_like_base_backup(
    ex: Exclusions,
    root: Root,
    base: &Path,
    rel: &str,
    prefix: &str,
    out: &mut Copy,
) {
    let dir = base.join(rel);
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let entries: Vec<(&str, EntryKind)> = names
        .iter()
        .map(|n| (n.as_str(), kind_of(&dir.join(n))))
        .collect();
    let verdicts = ex.classify_listing(root, rel, &entries);
    for (&(name, kind), verdict) in entries.iter().zip(verdicts) {
        let path = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let shown = format!("{prefix}{path}");
        match (verdict, kind) {
            (Verdict::Include | Verdict::IncludeLast, EntryKind::File) => {
                out.files.insert(shown);
            }
            (Verdict::Include, EntryKind::Dir) => {
                out.dirs.insert(shown);
                walk_like_base_backup(ex, root, base, &path, prefix, out);
            }
            // Tablespace links: walked as tablespaces by the caller.
            (Verdict::Include, EntryKind::Symlink) => {}
            (Verdict::EmptyDir { subdirs }, _) => {
                for sub in subdirs {
                    out.dirs.insert(format!("{shown}/{sub}"));
                }
                out.dirs.insert(shown);
            }
            (Verdict::Skip(_), _) => {}
            (v, k) => panic!("{shown}: unexpected verdict {v:?} for a {k:?}"),
        }
    }
}

/// The paths of a manifest's files, less the two the backup writes itself.
fn manifest_files(manifest: &Path) -> BTreeSet<String> {
    let m: serde_json::Value = serde_json::from_slice(&fs::read(manifest).unwrap()).unwrap();
    m["Files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["Path"].as_str().unwrap().to_string())
        .filter(|p| p != "backup_label" && p != "tablespace_map")
        .collect()
}

/// The directories in a tar archive (trailing slash dropped).
fn tar_dirs(tar_path: &Path) -> BTreeSet<String> {
    let mut archive = tar::Archive::new(fs::File::open(tar_path).unwrap());
    let mut dirs = BTreeSet::new();
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        if e.header().entry_type().is_dir() {
            let p = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            // basebackup.c names pg_wal's subdirectories "./pg_wal/…".
            let p = p.trim_end_matches('/');
            dirs.insert(p.strip_prefix("./").unwrap_or(p).to_string());
        }
    }
    dirs
}

fn exclusions_match_base_backup(pg: Pg) {
    let c = Cluster::new(pg);
    let ex = Exclusions::new(pg.major());
    let location = scratch_dir();
    give_to_server_user(location.path());
    c.psql(&format!(
        "CREATE TABLESPACE ts LOCATION '{}';
         CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g;
         CREATE UNLOGGED TABLE u AS SELECT g AS id FROM generate_series(1, 1000) g;
         CREATE INDEX u_id ON u (id);
         CREATE TABLE ts_t TABLESPACE ts AS SELECT g AS id FROM generate_series(1, 1000) g;
         CREATE UNLOGGED TABLE ts_u TABLESPACE ts AS SELECT g AS id FROM generate_series(1, 1000) g;
         VACUUM;
         CHECKPOINT;",
        location.path().display()
    ));
    let _temp = c.hold_temp_table();
    // What a running server may hold that a backup leaves out, in every place it applies.
    for junk in [
        "pg_stat_tmp/junk.stat",
        "pg_replslot/gone/state",
        "pg_notify/0000",
        "pg_serial/0000",
        "pg_snapshots/00000003-00000002-1",
        "pg_dynshmem/mmap.1234",
        "base/pgsql_tmp/pgsql_tmp1234.0",
        "postgresql.auto.conf.tmp",
        "current_logfiles.tmp",
        "backup_manifest",
        "base/1/pg_internal.init.4321",
        "base/.DS_Store",
        "stray.txt",
    ] {
        c.put_file(junk, b"junk");
    }
    let oid = c
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")
        .trim()
        .to_string();
    let version_dir = fs::read_dir(location.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("PG_"))
        .expect("a version directory in the tablespace");
    let ts_root = location.path().join(&version_dir);
    fs::create_dir_all(ts_root.join("pgsql_tmp")).unwrap();
    fs::write(ts_root.join("pgsql_tmp/pgsql_tmp99.1"), b"junk").unwrap();

    let out = scratch_dir();
    run_ok(
        Command::new(c.bindir.join("pg_basebackup"))
            .arg("-h")
            .arg(&c.sockdir)
            .args(["-p", &c.port.to_string(), "-U", "postgres"])
            .args(["-F", "t", "-X", "none", "-c", "fast", "--no-sync", "-D"])
            .arg(out.path()),
    );

    let mut ours = Copy::default();
    walk_like_base_backup(ex, Root::DataDir, &c.data, "", "", &mut ours);
    let prefix = format!("pg_tblspc/{oid}/{version_dir}/");
    walk_like_base_backup(ex, Root::Tablespace, &ts_root, "", &prefix, &mut ours);

    let theirs = manifest_files(&out.path().join("backup_manifest"));
    // The cluster held what the rules leave out (else this test could not fail): a temporary
    // relation, and unlogged tables' main forks beside their init forks, here and in the
    // tablespace.
    let on_disk: Vec<String> = walk(&c.data)
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert!(
        on_disk
            .iter()
            .any(|p| looks_like_temp_relation(p.rsplit('/').next().unwrap())),
        "no temporary relation file in {on_disk:?}"
    );
    for table in ["u", "ts_u"] {
        let main = c
            .psql(&format!("SELECT pg_relation_filepath('{table}')"))
            .trim()
            .to_string();
        assert!(c.data.join(format!("{main}_init")).exists(), "{main}_init");
        assert!(c.data.join(&main).exists(), "{main}");
        assert!(
            !theirs.contains(&main) && theirs.contains(&format!("{main}_init")),
            "{main}"
        );
    }
    let only_ours: Vec<_> = ours.files.difference(&theirs).collect();
    let only_theirs: Vec<_> = theirs.difference(&ours.files).collect();
    assert!(
        only_ours.is_empty() && only_theirs.is_empty(),
        "PostgreSQL {}: files only in the walk: {only_ours:?}; only in BASE_BACKUP's manifest: {only_theirs:?}",
        pg.major()
    );

    // Directories: compare the data directory's (the tablespace's tar holds its own).
    let their_dirs = tar_dirs(&out.path().join("base.tar"));
    let our_dirs: BTreeSet<String> = ours
        .dirs
        .iter()
        .filter(|d| !d.starts_with("pg_tblspc/"))
        .cloned()
        .collect();
    let their_dirs: BTreeSet<String> = their_dirs
        .into_iter()
        .filter(|d| !d.starts_with("pg_tblspc/"))
        .collect();
    assert_eq!(
        our_dirs,
        their_dirs,
        "PostgreSQL {}: directories differ",
        pg.major()
    );
}

#[test]
fn exclusions_match_base_backup_on_postgres_15() {
    exclusions_match_base_backup(Pg::V15);
}

#[test]
fn exclusions_match_base_backup_on_postgres_17() {
    exclusions_match_base_backup(Pg::V17);
}

/// `pg_checksums --check` on a stopped cluster, as the server's OS user.
fn pg_checksums_check(c: &Cluster) -> Output {
    as_server_user(&c.bindir.join("pg_checksums"))
        .args(["--check", "-D"])
        .arg(&c.data)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .expect("run pg_checksums")
}

fn stop(c: &Cluster) {
    let out = as_server_user(&c.bindir.join("pg_ctl"))
        .arg("-D")
        .arg(&c.data)
        .args(["-m", "fast", "-w", "stop"])
        .stdin(Stdio::null())
        .output()
        .expect("run pg_ctl stop");
    assert!(
        out.status.success(),
        "pg_ctl stop failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every checksummed file under `data` (relative paths), by the exclusions module's rule.
fn checksummed_files(data: &Path, ex: Exclusions) -> Vec<String> {
    walk(data)
        .into_iter()
        .filter_map(|rel| rel.to_str().map(str::to_string))
        .filter(|rel| data.join(rel).is_file() && ex.is_checksummed_file(Root::DataDir, rel))
        .collect()
}

fn pages_verify_and_a_flipped_byte_is_found(pg: Pg) {
    let c = Cluster::new(pg);
    c.psql(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g;
         CREATE INDEX t_v ON t (v);
         VACUUM (ANALYZE) t;
         CHECKPOINT;",
    );
    let rel = c
        .psql("SELECT pg_relation_filepath('t')")
        .trim()
        .to_string();
    stop(&c);

    // Before any damage, PostgreSQL agrees the cluster is clean.
    let out = pg_checksums_check(&c);
    assert!(
        out.status.success(),
        "pg_checksums --check on the fresh cluster failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every page of every checksummed file verifies (the server is stopped: any start LSN
    // after everything it wrote checks every initialised page).
    let ex = Exclusions::new(pg.major());
    let files = checksummed_files(&c.data, ex);
    assert!(
        files.contains(&rel) && files.iter().any(|f| f.starts_with("global/")),
        "the walk found no relation files: {files:?}"
    );
    let start = Lsn(u64::MAX);
    let mut checked = 0u32;
    for f in &files {
        let bytes = fs::read(c.data.join(f)).unwrap();
        let name = f.rsplit('/').next().unwrap();
        let segment = segment_of_file_name(name).unwrap();
        let r = verify_range(segment, 0, &bytes, start);
        assert!(r.bad.is_empty(), "{f}: pages fail: {:?}", r.bad);
        assert_eq!(r.partial_bytes, 0, "{f}: not whole pages");
        checked += r.valid;
    }
    let table_pages = (fs::metadata(c.data.join(&rel)).unwrap().len() / BLCKSZ as u64) as u32;
    assert!(table_pages > 100, "table t has only {table_pages} pages");
    assert!(checked > table_pages, "only {checked} pages checked");

    // Flip one byte in the middle of block 7 of t.
    let block = 7u32;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.data.join(&rel))
        .unwrap();
    let at = block as u64 * BLCKSZ as u64 + 4000;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(at)).unwrap();
    file.read_exact(&mut byte).unwrap();
    byte[0] ^= 0x01;
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&byte).unwrap();
    drop(file);

    let bytes = fs::read(c.data.join(&rel)).unwrap();
    let r = verify_range(0, 0, &bytes, start);
    assert_eq!(r.bad.len(), 1, "{:?}", r.bad);
    let bad = r.bad[0];
    assert_eq!(bad.block_in_file, block);
    assert_eq!(bad.relation_block, block);
    let page: &[u8; BLCKSZ] = bytes[block as usize * BLCKSZ..][..BLCKSZ]
        .try_into()
        .unwrap();
    assert_eq!(
        verify_page(page, relation_block(0, block), start),
        PageCheck::Bad {
            expected: bad.expected,
            found: bad.found
        }
    );
    // The page's LSN is before any start after the server stopped, but the check is skipped
    // for a backup that started before the page was last written.
    assert!(matches!(
        verify_page(page, block, Lsn(0)),
        PageCheck::ChangedSinceStart(_)
    ));

    // pg_checksums finds the same block and computes the same checksum.
    let out = pg_checksums_check(&c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pg_checksums missed the damage");
    let want = format!(
        "checksum verification failed in file \"{}\", block {block}: calculated checksum {:X} but block contains {:X}",
        c.data.join(&rel).display(),
        bad.expected,
        bad.found
    );
    assert!(
        stderr.contains(&want),
        "pg_checksums said:\n{stderr}\nexpected a line with:\n{want}"
    );
}

#[test]
fn pages_written_by_postgres_15_verify_and_a_flipped_byte_is_found() {
    pages_verify_and_a_flipped_byte_is_found(Pg::V15);
}

#[test]
fn pages_written_by_postgres_17_verify_and_a_flipped_byte_is_found() {
    pages_verify_and_a_flipped_byte_is_found(Pg::V17);
}
