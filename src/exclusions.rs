//! What a base backup leaves out: the one table of the exclusions `BASE_BACKUP` applies
//! (`sendDir` in PostgreSQL's `src/backend/backup/basebackup.c`), for any code that walks a
//! data directory itself instead of letting the server do it (the sql method), and the rule
//! saying which files carry page checksums.
//!
//! Pure functions over names: it reads no directory and touches no connection. The caller
//! lists a directory (with the kind of each entry as `lstat` sees it), asks
//! [`Exclusions::classify_listing`] what to do with each entry, and recurses into the
//! directories it was told to include. What this module cannot know, the caller must do:
//! a tablespace created inside the data directory is copied once (as a tablespace, not again
//! under its parent), and a backup that writes a `tablespace_map` leaves out the
//! `pg_tblspc/<oid>` links. Only the tablespace's own version directory
//! (`PG_<major>_<catversion>`) is copied from a tablespace location.
//!
//! A caller that sees through links (`pg_stat_file` follows them) sees `pg_tblspc/<oid>` and a
//! linked `pg_wal` as directories: the verdicts are the same, and walking a tablespace through
//! its link as [`Root::DataDir`] works (database directories under
//! `pg_tblspc/<oid>/PG_…/` are recognised), but such a caller cannot leave out the stray links
//! the server skips ([`SkipReason::SpecialFile`]).
//!
//! Checked against the sources of PostgreSQL 15 and 17, and against `BASE_BACKUP` itself (by
//! the `client_side` integration tests). The differences: 17 also creates `pg_wal/summaries`
//! and looks for unlogged relations in `global/` too. 16 is treated as 15 (not checked against
//! its source).

use std::collections::HashSet;

/// Files whose name starts with this are temporary files or directories of a running server
/// (`PG_TEMP_FILE_PREFIX`); their contents die with the server.
pub const TEMP_FILE_PREFIX: &str = "pgsql_tmp";

/// The control file, relative to the data directory. A backup copies it after every other
/// file, so that it is at least as new as anything else it holds.
pub const CONTROL_FILE: &str = "global/pg_control";

/// Directories whose contents are removed, recreated or zeroed at server start
/// (`excludeDirContents`). The directory itself is kept, empty, for its permissions. The
/// match is on the entry's name at any depth, as `basebackup.c` does.
pub const EXCLUDED_DIR_CONTENTS: &[&str] = &[
    // Temporary statistics files (also where extensions such as pg_stat_statements write).
    "pg_stat_tmp",
    // Replication slots: not useful in a copy, even of a primary (see backup.sgml).
    "pg_replslot",
    // Removed at start by dsm_cleanup_for_mmap().
    "pg_dynshmem",
    // Removed at start by AsyncShmemInit().
    "pg_notify",
    // Only kept for debugging; not needed to run (SerialInit()).
    "pg_serial",
    // Removed at start by DeleteAllExportedSnapshotFiles().
    "pg_snapshots",
    // Zeroed at start by StartupSUBTRANS().
    "pg_subtrans",
];

/// A name `excludeFiles` matches: exactly, or (for `prefix`) any name starting with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExcludedFile {
    /// The name.
    pub name: &'static str,
    /// Whether any name starting with `name` matches too.
    pub prefix: bool,
}

/// Files never copied, in any directory (`excludeFiles`).
pub const EXCLUDED_FILES: &[ExcludedFile] = &[
    // The temporary file ALTER SYSTEM writes before renaming it over postgresql.auto.conf.
    ExcludedFile {
        name: "postgresql.auto.conf.tmp",
        prefix: false,
    },
    // The temporary file the logging collector writes before renaming it to current_logfiles.
    ExcludedFile {
        name: "current_logfiles.tmp",
        prefix: false,
    },
    // The relation cache, rebuilt at start; the prefix also matches its temporary files.
    ExcludedFile {
        name: "pg_internal.init",
        prefix: true,
    },
    // Cannot exist in a server able to take an online backup; left out just in case (the
    // backup writes its own).
    ExcludedFile {
        name: "backup_label",
        prefix: false,
    },
    ExcludedFile {
        name: "tablespace_map",
        prefix: false,
    },
    // Belongs to the backup this server was restored from, not to this one.
    ExcludedFile {
        name: "backup_manifest",
        prefix: false,
    },
    ExcludedFile {
        name: "postmaster.pid",
        prefix: false,
    },
    ExcludedFile {
        name: "postmaster.opts",
        prefix: false,
    },
];

/// What the path given to [`Exclusions::classify`] is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// The data directory: `base/1/1259`, `pg_wal`, `pg_tblspc/16385`.
    DataDir,
    /// A tablespace's version directory (`<location>/PG_<major>_<catversion>`): `16384/16390`.
    Tablespace,
}

/// The kind of a directory entry, as `lstat` (not `stat`) sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (or a junction).
    Symlink,
}

/// Why an entry is left out; for debug logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A `pgsql_tmp*` file or directory.
    TempFile,
    /// `.DS_Store`: in 17, and in 15's later minor releases (15.18 skips it; older ones copy
    /// it). Skipped for every version: it is only ever Finder's litter.
    MacOsMetadata,
    /// One of [`EXCLUDED_FILES`].
    ExcludedFile,
    /// A temporary relation's file (`t<backend>_<relfilenode>…`) in a database directory.
    TempRelation,
    /// A fork other than `_init` of an unlogged relation (its `_init` fork is in the same
    /// directory): reset from the init fork at the end of recovery, so never needed.
    UnloggedFork,
    /// A symbolic link outside `pg_tblspc`, or a file `lstat` reports as neither file, directory
    /// nor link: the server skips it with the warning "skipping special file".
    SpecialFile,
}

/// What a backup does with one directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Copy it: a file's bytes, a directory (then classify what it holds), a tablespace link as
    /// a link.
    Include,
    /// Copy it after every other file: [`CONTROL_FILE`].
    IncludeLast,
    /// Make it an empty directory (a link to a directory becomes a real directory) holding only
    /// the empty directories `subdirs`; copy nothing from it.
    EmptyDir {
        /// Empty subdirectories to create inside it (for `pg_wal`: `archive_status`, …).
        subdirs: &'static [&'static str],
    },
    /// Leave it out.
    Skip(SkipReason),
}

/// The fork a relation file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    /// The main fork: `<relfilenode>[.<segment>]`.
    Main,
    /// The free space map: `_fsm`.
    Fsm,
    /// The visibility map: `_vm`.
    VisibilityMap,
    /// An unlogged relation's init fork: `_init`.
    Init,
}

/// A relation file's name, parsed: `<relfilenode>[_<fork>][.<segment>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelationFile {
    /// The relfilenode (never 0).
    pub relfilenode: u32,
    /// The fork.
    pub fork: Fork,
    /// The segment number: 0 for the file without a suffix, N for `.N`.
    pub segment: u32,
}

/// Parses a non-temporary relation file name as PostgreSQL 17 does
/// (`parse_filename_for_nontemp_relation`): no leading zeroes, numbers within `u32`, fork
/// `fsm`, `vm` or `init` (never `_main`), nothing after the segment number. `None` for any
/// other name (`PG_VERSION`, `pg_filenode.map`, `t3_16390`, …).
///
/// PostgreSQL 15's parser also took leading zeroes and ten-digit numbers past `u32`; the
/// server never creates such names.
pub fn parse_relation_file_name(name: &str) -> Option<RelationFile> {
    let (relfilenode, rest) = leading_number(name)?;
    let (fork, rest) = match rest.strip_prefix('_') {
        None => (Fork::Main, rest),
        Some(after) => fork_prefix(after)?,
    };
    let (segment, rest) = match rest.strip_prefix('.') {
        None => (0, rest),
        Some(after) => leading_number(after)?,
    };
    rest.is_empty().then_some(RelationFile {
        relfilenode,
        fork,
        segment,
    })
}

/// A number with no leading zero (so not 0) that fits in `u32`, and what follows it.
fn leading_number(s: &str) -> Option<(u32, &str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || s.starts_with('0') {
        return None;
    }
    let n = s[..digits].parse::<u32>().ok()?;
    Some((n, &s[digits..]))
}

/// The fork whose name starts `s` (`forkname_chars`: `main` is never written out), and what
/// follows it.
fn fork_prefix(s: &str) -> Option<(Fork, &str)> {
    [
        ("fsm", Fork::Fsm),
        ("vm", Fork::VisibilityMap),
        ("init", Fork::Init),
    ]
    .into_iter()
    .find_map(|(name, fork)| s.strip_prefix(name).map(|rest| (fork, rest)))
}

/// Whether `name` is a temporary relation's file (`looks_like_temp_rel_name`):
/// `t<digits>_<digits>[_<fork>][.<digits>]`.
pub fn looks_like_temp_relation(name: &str) -> bool {
    fn digits(s: &str) -> Option<&str> {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        (n > 0).then(|| &s[n..])
    }
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let Some(rest) = digits(rest).and_then(|r| r.strip_prefix('_')) else {
        return false;
    };
    let Some(mut rest) = digits(rest) else {
        return false;
    };
    if let Some(after) = rest.strip_prefix('_') {
        match fork_prefix(after) {
            Some((_, r)) => rest = r,
            None => return false,
        }
    }
    if let Some(after) = rest.strip_prefix('.') {
        match digits(after) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

/// The exclusion rules of one server major version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exclusions {
    major: u32,
}

impl Exclusions {
    /// The rules of server major version `major` (15, 16, 17, …).
    pub fn new(major: u32) -> Exclusions {
        Exclusions { major }
    }

    /// The rules for a server reporting `server_version_num` (150004 → 15).
    pub fn for_server_version_num(server_version_num: u32) -> Exclusions {
        Exclusions::new(server_version_num / 10000)
    }

    /// The empty subdirectories a backup puts in `pg_wal` (whose contents it never copies;
    /// the WAL comes from the WAL stream).
    pub fn pg_wal_subdirs(self) -> &'static [&'static str] {
        if self.major >= 17 {
            &["archive_status", "summaries"]
        } else {
            &["archive_status"]
        }
    }

    /// What to do with the entry at `path` (relative to `root`, `/`-separated, no leading
    /// `./`), of kind `kind`. Everything except unlogged relations' forks, which take the
    /// directory's listing: use [`Exclusions::classify_listing`] for whole directories.
    pub fn classify(self, root: Root, path: &str, kind: EntryKind) -> Verdict {
        let (parent, name) = split_parent(path);
        self.classify_entry(root, parent, name, kind, None)
    }

    /// What to do with each entry of directory `dir` (relative to `root`, `""` for the root
    /// itself), given its whole listing as `(name, kind)`; the verdicts come in the listing's
    /// order. This is [`Exclusions::classify`] plus the unlogged-relation rule: in a
    /// relation directory, every fork but `_init` of a relfilenode that has an `_init` fork
    /// is skipped.
    pub fn classify_listing(
        self,
        root: Root,
        dir: &str,
        entries: &[(&str, EntryKind)],
    ) -> Vec<Verdict> {
        let unlogged = self.unlogged_relfilenodes(root, dir, entries.iter().map(|e| e.0));
        entries
            .iter()
            .map(|&(name, kind)| self.classify_entry(root, dir, name, kind, Some(&unlogged)))
            .collect()
    }

    /// The names in `names` (one directory's listing, `dir` relative to `root`) that are forks
    /// other than `_init` of unlogged relations, in listing order. Empty outside relation
    /// directories.
    pub fn unlogged_forks<'a>(self, root: Root, dir: &str, names: &[&'a str]) -> Vec<&'a str> {
        let unlogged = self.unlogged_relfilenodes(root, dir, names.iter().copied());
        names
            .iter()
            .copied()
            .filter(|name| is_unlogged_fork(name, &unlogged))
            .collect()
    }

    /// Whether the pages of the file at `path` (relative to `root`) carry checksums that a
    /// backup verifies: a relation file (its name parses as one) in `global/`, `base/<oid>/`,
    /// or a tablespace's database directory. Not `pg_control`, `pg_filenode.map`,
    /// `pg_internal.init`, `PG_VERSION`, or anything else.
    ///
    /// This is PostgreSQL 17's rule, used for every version: 15's (`is_checksummed_file`)
    /// checked every file in those directories but the four named above, so a foreign file
    /// there failed verification; on the files PostgreSQL writes both agree.
    pub fn is_checksummed_file(self, root: Root, path: &str) -> bool {
        self.checksummed_relation_file(root, path).is_some()
    }

    /// The parsed relation file at `path` when [`Exclusions::is_checksummed_file`] holds: its
    /// segment number places its pages in the relation.
    pub fn checksummed_relation_file(self, root: Root, path: &str) -> Option<RelationFile> {
        let (parent, name) = split_parent(path);
        if is_database_dir(root, parent) || is_global_dir(root, parent) {
            parse_relation_file_name(name)
        } else {
            None
        }
    }

    fn classify_entry(
        self,
        root: Root,
        parent: &str,
        name: &str,
        kind: EntryKind,
        unlogged: Option<&HashSet<u32>>,
    ) -> Verdict {
        if name.starts_with(TEMP_FILE_PREFIX) {
            return Verdict::Skip(SkipReason::TempFile);
        }
        if name == ".DS_Store" {
            return Verdict::Skip(SkipReason::MacOsMetadata);
        }
        if EXCLUDED_FILES.iter().any(|f| {
            if f.prefix {
                name.starts_with(f.name)
            } else {
                name == f.name
            }
        }) {
            return Verdict::Skip(SkipReason::ExcludedFile);
        }
        if let Some(unlogged) = unlogged {
            if is_unlogged_fork(name, unlogged) {
                return Verdict::Skip(SkipReason::UnloggedFork);
            }
        }
        if is_database_dir(root, parent) && looks_like_temp_relation(name) {
            return Verdict::Skip(SkipReason::TempRelation);
        }
        let top_level = root == Root::DataDir && parent.is_empty();
        if root == Root::DataDir && parent == "global" && name == "pg_control" {
            return Verdict::IncludeLast;
        }
        let dir_like = matches!(kind, EntryKind::Dir | EntryKind::Symlink);
        // basebackup.c would write a bare header for a regular file by one of these names
        // (a broken archive); a regular file is copied as one instead.
        if dir_like && EXCLUDED_DIR_CONTENTS.contains(&name) {
            return Verdict::EmptyDir { subdirs: &[] };
        }
        if dir_like && top_level && name == "pg_wal" {
            return Verdict::EmptyDir {
                subdirs: self.pg_wal_subdirs(),
            };
        }
        match kind {
            EntryKind::File | EntryKind::Dir => Verdict::Include,
            EntryKind::Symlink if root == Root::DataDir && parent == "pg_tblspc" => {
                Verdict::Include
            }
            EntryKind::Symlink => Verdict::Skip(SkipReason::SpecialFile),
        }
    }

    /// The relfilenodes with an `_init` fork among `names`, when `dir` is a relation directory.
    fn unlogged_relfilenodes<'a>(
        self,
        root: Root,
        dir: &str,
        names: impl Iterator<Item = &'a str>,
    ) -> HashSet<u32> {
        // 15 looked for unlogged relations in database directories only; 17 in global/ too
        // (where none can exist: shared catalogs are always logged).
        let relation_dir =
            is_database_dir(root, dir) || (self.major >= 17 && is_global_dir(root, dir));
        if !relation_dir {
            return HashSet::new();
        }
        names
            .filter_map(parse_relation_file_name)
            .filter(|f| f.fork == Fork::Init)
            .map(|f| f.relfilenode)
            .collect()
    }
}

fn is_unlogged_fork(name: &str, unlogged: &HashSet<u32>) -> bool {
    parse_relation_file_name(name)
        .is_some_and(|f| f.fork != Fork::Init && unlogged.contains(&f.relfilenode))
}

/// `("base/1", "1259")` from `"base/1/1259"`; `("", "pg_wal")` from `"pg_wal"`.
fn split_parent(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `dir` is a database directory: `base/<oid>` in the data directory, `<oid>` directly
/// in a tablespace's version directory, or `pg_tblspc/<oid>/PG_…/<oid>` for a tablespace
/// directory made in place (`allow_in_place_tablespaces`), which the data directory's walk
/// reaches.
fn is_database_dir(root: Root, dir: &str) -> bool {
    let (parent, name) = split_parent(dir);
    if !all_digits(name) {
        return false;
    }
    match root {
        Root::Tablespace => parent.is_empty(),
        Root::DataDir => {
            parent == "base"
                || (parent.starts_with("pg_tblspc/") && is_version_dir_name(split_parent(parent).1))
        }
    }
}

/// `PG_<major>_<catversion>`.
fn is_version_dir_name(name: &str) -> bool {
    name.strip_prefix("PG_")
        .and_then(|r| r.split_once('_'))
        .is_some_and(|(major, cat)| all_digits(major) && all_digits(cat))
}

fn is_global_dir(root: Root, dir: &str) -> bool {
    root == Root::DataDir && dir == "global"
}

#[cfg(test)]
mod tests {
    use super::*;
    use EntryKind::{Dir, File, Symlink};

    const V15: Exclusions = Exclusions { major: 15 };
    const V17: Exclusions = Exclusions { major: 17 };

    fn both() -> [Exclusions; 2] {
        [V15, V17]
    }

    fn skip(r: SkipReason) -> Verdict {
        Verdict::Skip(r)
    }

    #[test]
    fn version_from_server_version_num() {
        assert_eq!(Exclusions::for_server_version_num(150004), V15);
        assert_eq!(Exclusions::for_server_version_num(170011), V17);
    }

    #[test]
    fn ordinary_entries_are_included() {
        for ex in both() {
            for (path, kind) in [
                ("base", Dir),
                ("base/1", Dir),
                ("base/1/1259", File),
                ("base/1/1259_fsm", File),
                ("base/1/1259_vm", File),
                ("base/1/16384.1", File),
                ("base/1/PG_VERSION", File),
                ("base/1/pg_filenode.map", File),
                ("global", Dir),
                ("global/1262", File),
                ("global/pg_filenode.map", File),
                ("PG_VERSION", File),
                ("postgresql.conf", File),
                ("postgresql.auto.conf", File),
                ("pg_hba.conf", File),
                ("current_logfiles", File),
                ("pg_xact", Dir),
                ("pg_xact/0000", File),
                ("pg_multixact/offsets/0000", File),
                ("pg_logical/snapshots", Dir),
                ("pg_commit_ts", Dir),
                ("pg_stat", Dir),
                ("pg_stat/pgstat.stat", File),
                ("pg_tblspc", Dir),
                ("log/postgresql-Mon.log", File),
                ("postmaster.pid.bak", File),
                ("backup_label.old", File),
            ] {
                assert_eq!(
                    ex.classify(Root::DataDir, path, kind),
                    Verdict::Include,
                    "{path} on {ex:?}"
                );
            }
        }
    }

    #[test]
    fn excluded_files_in_any_directory() {
        for ex in both() {
            for path in [
                "postmaster.pid",
                "postmaster.opts",
                "postgresql.auto.conf.tmp",
                "current_logfiles.tmp",
                "backup_label",
                "tablespace_map",
                "backup_manifest",
                "global/pg_internal.init",
                "base/1/pg_internal.init",
                "base/1/pg_internal.init.12345",
                "some/dir/postmaster.pid",
            ] {
                assert_eq!(
                    ex.classify(Root::DataDir, path, File),
                    skip(SkipReason::ExcludedFile),
                    "{path}"
                );
            }
            assert_eq!(
                ex.classify(Root::Tablespace, "16384/pg_internal.init", File),
                skip(SkipReason::ExcludedFile)
            );
            // Exact names only, except pg_internal.init.
            assert_eq!(
                ex.classify(Root::DataDir, "postmaster.pidx", File),
                Verdict::Include
            );
            assert_eq!(
                ex.classify(Root::DataDir, "xpg_internal.init", File),
                Verdict::Include
            );
        }
    }

    #[test]
    fn temp_files_and_dirs_anywhere() {
        for ex in both() {
            for (root, path, kind) in [
                (Root::DataDir, "base/pgsql_tmp", Dir),
                (Root::DataDir, "base/pgsql_tmp/pgsql_tmp1234.0", File),
                (Root::DataDir, "base/1/pgsql_tmp77.3", File),
                (Root::DataDir, "pgsql_tmp", Dir),
                (Root::Tablespace, "pgsql_tmp", Dir),
                (Root::Tablespace, "16384/pgsql_tmp1.1", File),
            ] {
                assert_eq!(
                    ex.classify(root, path, kind),
                    skip(SkipReason::TempFile),
                    "{path}"
                );
            }
            assert_eq!(
                ex.classify(Root::DataDir, "base/xpgsql_tmp", Dir),
                Verdict::Include
            );
        }
    }

    #[test]
    fn directories_kept_empty() {
        for ex in both() {
            for name in EXCLUDED_DIR_CONTENTS {
                for kind in [Dir, Symlink] {
                    assert_eq!(
                        ex.classify(Root::DataDir, name, kind),
                        Verdict::EmptyDir { subdirs: &[] },
                        "{name}"
                    );
                }
                // A regular file by that name is an ordinary file.
                assert_eq!(ex.classify(Root::DataDir, name, File), Verdict::Include);
            }
            // By name, at any depth (as basebackup.c matches d_name), also in tablespaces.
            assert_eq!(
                ex.classify(Root::DataDir, "base/pg_notify", Dir),
                Verdict::EmptyDir { subdirs: &[] }
            );
            assert_eq!(
                ex.classify(Root::Tablespace, "pg_stat_tmp", Dir),
                Verdict::EmptyDir { subdirs: &[] }
            );
            assert_eq!(ex.classify(Root::DataDir, "pg_stat", Dir), Verdict::Include);
        }
    }

    #[test]
    fn pg_wal_is_kept_empty_with_its_subdirectories() {
        for kind in [Dir, Symlink] {
            assert_eq!(
                V15.classify(Root::DataDir, "pg_wal", kind),
                Verdict::EmptyDir {
                    subdirs: &["archive_status"]
                }
            );
            assert_eq!(
                V17.classify(Root::DataDir, "pg_wal", kind),
                Verdict::EmptyDir {
                    subdirs: &["archive_status", "summaries"]
                }
            );
        }
        // Only the top-level pg_wal.
        for ex in both() {
            assert_eq!(
                ex.classify(Root::DataDir, "base/pg_wal", Dir),
                Verdict::Include
            );
            assert_eq!(
                ex.classify(Root::Tablespace, "pg_wal", Dir),
                Verdict::Include
            );
        }
    }

    #[test]
    fn control_file_goes_last() {
        for ex in both() {
            assert_eq!(
                ex.classify(Root::DataDir, CONTROL_FILE, File),
                Verdict::IncludeLast
            );
            assert_eq!(
                ex.classify(Root::DataDir, "pg_control", File),
                Verdict::Include
            );
            assert_eq!(
                ex.classify(Root::DataDir, "base/1/pg_control", File),
                Verdict::Include
            );
        }
    }

    #[test]
    fn symlinks_only_in_pg_tblspc() {
        for ex in both() {
            assert_eq!(
                ex.classify(Root::DataDir, "pg_tblspc/16385", Symlink),
                Verdict::Include
            );
            // An in-place tablespace is a directory there.
            assert_eq!(
                ex.classify(Root::DataDir, "pg_tblspc/16385", Dir),
                Verdict::Include
            );
            for (root, path) in [
                (Root::DataDir, "postgresql.conf"),
                (Root::DataDir, "pg_xact"),
                (Root::DataDir, "base/1/16384"),
                (Root::DataDir, "pg_tblspc/16385/PG_17_202406281/x"),
                (Root::Tablespace, "16384"),
            ] {
                assert_eq!(
                    ex.classify(root, path, Symlink),
                    skip(SkipReason::SpecialFile),
                    "{path}"
                );
            }
        }
    }

    #[test]
    fn mac_os_metadata_skipped() {
        for ex in both() {
            for (root, path) in [
                (Root::DataDir, ".DS_Store"),
                (Root::DataDir, "base/.DS_Store"),
                (Root::Tablespace, "16384/.DS_Store"),
            ] {
                assert_eq!(
                    ex.classify(root, path, File),
                    skip(SkipReason::MacOsMetadata),
                    "{path}"
                );
            }
            assert_eq!(
                ex.classify(Root::DataDir, "base/.DS_Store.old", File),
                Verdict::Include
            );
        }
    }

    #[test]
    fn temp_relations_only_in_database_directories() {
        for ex in both() {
            for (root, path) in [
                (Root::DataDir, "base/5/t3_16390"),
                (Root::DataDir, "base/5/t3_16390_fsm"),
                (Root::DataDir, "base/5/t3_16390_vm"),
                (Root::DataDir, "base/5/t3_16390_init"),
                (Root::DataDir, "base/5/t3_16390.1"),
                (Root::DataDir, "base/5/t12_16390_fsm.12"),
                (Root::DataDir, "pg_tblspc/16385/PG_17_202406281/5/t3_16390"),
                (Root::Tablespace, "16384/t3_16390"),
                (Root::Tablespace, "16384/t3_16390_vm.2"),
            ] {
                assert_eq!(
                    ex.classify(root, path, File),
                    skip(SkipReason::TempRelation),
                    "{path}"
                );
            }
            for (root, path) in [
                // Not database directories.
                (Root::DataDir, "global/t3_16390"),
                (Root::DataDir, "t3_16390"),
                (Root::DataDir, "base/t3_16390"),
                (Root::DataDir, "pg_xact/t3_16390"),
                (Root::Tablespace, "t3_16390"),
                // Not temporary relation names.
                (Root::DataDir, "base/5/t3_"),
                (Root::DataDir, "base/5/t_16390"),
                (Root::DataDir, "base/5/t3_16390_main"),
                (Root::DataDir, "base/5/t3_16390."),
                (Root::DataDir, "base/5/t3_16390.1x"),
                (Root::DataDir, "base/5/t3x16390"),
                (Root::DataDir, "base/5/tab"),
            ] {
                assert_eq!(ex.classify(root, path, File), Verdict::Include, "{path}");
            }
        }
    }

    #[test]
    fn relation_file_names() {
        let rf = |relfilenode, fork, segment| {
            Some(RelationFile {
                relfilenode,
                fork,
                segment,
            })
        };
        assert_eq!(parse_relation_file_name("1259"), rf(1259, Fork::Main, 0));
        assert_eq!(
            parse_relation_file_name("16384.1"),
            rf(16384, Fork::Main, 1)
        );
        assert_eq!(
            parse_relation_file_name("16384_fsm"),
            rf(16384, Fork::Fsm, 0)
        );
        assert_eq!(
            parse_relation_file_name("16384_vm.3"),
            rf(16384, Fork::VisibilityMap, 3)
        );
        assert_eq!(
            parse_relation_file_name("16384_init"),
            rf(16384, Fork::Init, 0)
        );
        assert_eq!(
            parse_relation_file_name("4294967295.4294967295"),
            rf(u32::MAX, Fork::Main, u32::MAX)
        );
        for bad in [
            "",
            "0",
            "0123",
            "16384.0",
            "16384.01",
            "16384.",
            "16384_",
            "16384_main",
            "16384_fsmx",
            "16384_vm_init",
            "16384.1.2",
            "4294967296",
            "16384.4294967296",
            "t3_16384",
            "PG_VERSION",
            "pg_filenode.map",
            "pg_internal.init",
            "pg_control",
            "16384 ",
            "+16384",
        ] {
            assert_eq!(parse_relation_file_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unlogged_relations_keep_only_their_init_fork() {
        let listing = [
            ("16390", File),
            ("16390.1", File),
            ("16390_fsm", File),
            ("16390_vm", File),
            ("16390_init", File),
            ("16391", File),
            ("16391_fsm", File),
            ("16392_init", File),
            ("PG_VERSION", File),
            ("pg_filenode.map", File),
            ("pg_internal.init", File),
        ];
        let names: Vec<&str> = listing.iter().map(|e| e.0).collect();
        for ex in both() {
            assert_eq!(
                ex.unlogged_forks(Root::DataDir, "base/5", &names),
                ["16390", "16390.1", "16390_fsm", "16390_vm"]
            );
            assert_eq!(
                ex.unlogged_forks(Root::Tablespace, "16384", &names),
                ["16390", "16390.1", "16390_fsm", "16390_vm"]
            );
            let verdicts = ex.classify_listing(Root::DataDir, "base/5", &listing);
            let u = skip(SkipReason::UnloggedFork);
            assert_eq!(
                verdicts,
                [
                    u,
                    u,
                    u,
                    u,
                    Verdict::Include,
                    Verdict::Include,
                    Verdict::Include,
                    Verdict::Include,
                    Verdict::Include,
                    Verdict::Include,
                    skip(SkipReason::ExcludedFile),
                ]
            );
            // Not a relation directory: nothing is an unlogged fork.
            assert!(ex
                .unlogged_forks(Root::DataDir, "pg_xact", &names)
                .is_empty());
            assert!(ex.unlogged_forks(Root::DataDir, "base", &names).is_empty());
            assert!(ex.unlogged_forks(Root::Tablespace, "", &names).is_empty());
        }
        // global/ counts as a relation directory from 17 on.
        assert_eq!(
            V17.unlogged_forks(Root::DataDir, "global", &names),
            ["16390", "16390.1", "16390_fsm", "16390_vm"]
        );
        assert!(V15
            .unlogged_forks(Root::DataDir, "global", &names)
            .is_empty());
    }

    #[test]
    fn listing_applies_every_rule() {
        let listing = [
            ("base", Dir),
            ("global", Dir),
            ("pg_wal", Symlink),
            ("pg_stat_tmp", Dir),
            ("pg_tblspc", Dir),
            ("postmaster.pid", File),
            ("postgresql.auto.conf", File),
            ("pgsql_tmp", Dir),
            ("stray_link", Symlink),
        ];
        assert_eq!(
            V15.classify_listing(Root::DataDir, "", &listing),
            [
                Verdict::Include,
                Verdict::Include,
                Verdict::EmptyDir {
                    subdirs: &["archive_status"]
                },
                Verdict::EmptyDir { subdirs: &[] },
                Verdict::Include,
                skip(SkipReason::ExcludedFile),
                Verdict::Include,
                skip(SkipReason::TempFile),
                skip(SkipReason::SpecialFile),
            ]
        );
    }

    #[test]
    fn checksummed_files() {
        for ex in both() {
            for (root, path) in [
                (Root::DataDir, "base/1/1259"),
                (Root::DataDir, "base/1/1259_fsm"),
                (Root::DataDir, "base/1/1259_vm"),
                (Root::DataDir, "base/1/16390_init"),
                (Root::DataDir, "base/16384/16390.7"),
                (Root::DataDir, "global/1262"),
                (Root::DataDir, "pg_tblspc/16385/PG_15_202209061/16384/16390"),
                (Root::Tablespace, "16384/16390"),
                (Root::Tablespace, "16384/16390_vm.1"),
            ] {
                assert!(ex.is_checksummed_file(root, path), "{path}");
            }
            for (root, path) in [
                (Root::DataDir, "global/pg_control"),
                (Root::DataDir, "global/pg_filenode.map"),
                (Root::DataDir, "global/pg_internal.init"),
                (Root::DataDir, "base/1/pg_filenode.map"),
                (Root::DataDir, "base/1/pg_internal.init"),
                (Root::DataDir, "base/1/PG_VERSION"),
                (Root::DataDir, "base/1/t3_16390"),
                (Root::DataDir, "base/1/foo"),
                (Root::DataDir, "PG_VERSION"),
                (Root::DataDir, "1259"),
                (Root::DataDir, "base/1259"),
                (Root::DataDir, "pg_xact/0000"),
                (Root::DataDir, "pg_multixact/offsets/0000"),
                (Root::DataDir, "pg_wal/000000010000000000000001"),
                (Root::DataDir, "pg_logical/mappings/1"),
                (Root::Tablespace, "16390"),
                (Root::Tablespace, "16384/PG_VERSION"),
            ] {
                assert!(!ex.is_checksummed_file(root, path), "{path}");
            }
        }
        assert_eq!(
            V17.checksummed_relation_file(Root::DataDir, "base/1/16390_fsm.2"),
            Some(RelationFile {
                relfilenode: 16390,
                fork: Fork::Fsm,
                segment: 2
            })
        );
    }
}
