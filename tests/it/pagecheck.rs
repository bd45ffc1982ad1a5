//! The client-side page checksum (`pgpar::pagecheck`) against pages a real server wrote, and
//! against PostgreSQL's own `pg_checksums`: every page of every checksummed file of a stopped
//! cluster verifies; a flipped byte fails, naming the block, with the very checksums
//! `pg_checksums` computes.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Output, Stdio};

use pgpar::exclusions::{Exclusions, Root};
use pgpar::lsn::Lsn;
use pgpar::pagecheck::{
    relation_block, segment_of_file_name, verify_page, verify_range, PageCheck, BLCKSZ,
};

use crate::cluster::{as_server_user, Cluster, Pg};
use crate::util::walk;

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

#[test]
fn pages_written_by_postgres_15_verify_and_a_flipped_byte_is_found() {
    let c = Cluster::new(Pg::V15);
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
    let ex = Exclusions::new(15);
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
