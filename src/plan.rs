//! Turns the server's file list into work for N workers.
//!
//! Directories and links are made locally before any data moves. Files become work units:
//! a file larger than the chunk size is split into ranges (so one huge table spreads over
//! every worker), small files are batched into one request (so 100,000 small files do not
//! cost 100,000 round trips), empty files need no request at all, and `global/pg_control` is
//! held back to be fetched after everything else. Units are ordered largest first; workers
//! pull the next one when free, so the split is dynamic rather than static.

use std::collections::VecDeque;

pub use crate::replication::parallel::{FileEntry, FileKind};

/// Bytes `[offset, offset + length)` of file `file` (an index into the list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Index into the file list.
    pub file: usize,
    /// First byte.
    pub offset: u64,
    /// Length; for a whole file, its listed size.
    pub length: u64,
}

/// One request's worth of work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkUnit {
    /// The ranges, in request order.
    pub ranges: Vec<Range>,
    /// Their total length.
    pub bytes: u64,
}

/// Scheduling knobs.
#[derive(Debug, Clone, Copy)]
pub struct PlanConfig {
    /// Files larger than this are split into ranges of this size.
    pub chunk_size: u64,
    /// Files at most this big are batched together.
    pub small_file: u64,
    /// A batch closes at this many bytes…
    pub batch_bytes: u64,
    /// …or this many files.
    pub batch_files: usize,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            chunk_size: 64 << 20,
            small_file: 1 << 20,
            batch_bytes: 16 << 20,
            batch_files: 1000,
        }
    }
}

/// The plan.
#[derive(Debug, Default)]
pub struct Plan {
    /// Directories, parents before children.
    pub dirs: Vec<usize>,
    /// Links.
    pub links: Vec<usize>,
    /// Empty files, created without a request.
    pub empty: Vec<usize>,
    /// Work units, largest first.
    pub units: VecDeque<WorkUnit>,
    /// `global/pg_control`, fetched last.
    pub control: Option<usize>,
    /// Bytes of all units plus pg_control.
    pub total_bytes: u64,
}

/// The path of the control file, which must be fetched after every other file.
pub const CONTROL_FILE: &str = "global/pg_control";

/// Builds the plan.
pub fn plan(files: &[FileEntry], cfg: PlanConfig) -> Plan {
    let mut p = Plan::default();
    let mut small: Vec<usize> = Vec::new();
    let mut units = Vec::new();
    for (i, f) in files.iter().enumerate() {
        match f.kind {
            FileKind::Dir => p.dirs.push(i),
            FileKind::Link => p.links.push(i),
            FileKind::File if f.path == CONTROL_FILE => {
                p.control = Some(i);
                p.total_bytes += f.size;
            }
            FileKind::File if f.size == 0 => p.empty.push(i),
            FileKind::File if f.size <= cfg.small_file => small.push(i),
            FileKind::File if f.size > cfg.chunk_size => {
                let mut off = 0;
                while off < f.size {
                    let len = cfg.chunk_size.min(f.size - off);
                    units.push(WorkUnit {
                        ranges: vec![Range {
                            file: i,
                            offset: off,
                            length: len,
                        }],
                        bytes: len,
                    });
                    off += len;
                }
            }
            FileKind::File => units.push(WorkUnit {
                ranges: vec![Range {
                    file: i,
                    offset: 0,
                    length: f.size,
                }],
                bytes: f.size,
            }),
        }
    }
    // Batch small files in path order (neighbours on disk tend to be neighbours here).
    let mut cur = WorkUnit {
        ranges: Vec::new(),
        bytes: 0,
    };
    for i in small {
        let size = files[i].size;
        if !cur.ranges.is_empty()
            && (cur.bytes + size > cfg.batch_bytes || cur.ranges.len() >= cfg.batch_files)
        {
            units.push(std::mem::replace(
                &mut cur,
                WorkUnit {
                    ranges: Vec::new(),
                    bytes: 0,
                },
            ));
        }
        cur.ranges.push(Range {
            file: i,
            offset: 0,
            length: size,
        });
        cur.bytes += size;
    }
    if !cur.ranges.is_empty() {
        units.push(cur);
    }
    // Largest first; stable, so equal units keep list order.
    units.sort_by_key(|u| std::cmp::Reverse(u.bytes));
    p.total_bytes += units.iter().map(|u| u.bytes).sum::<u64>();
    // Parents before children whatever order the server listed them in.
    p.dirs.sort_by_key(|&i| {
        files[i]
            .path
            .as_bytes()
            .iter()
            .filter(|&&c| c == b'/')
            .count()
    });
    p.units = units.into();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, kind: FileKind, size: u64) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind,
            size,
            mtime: 0,
            link_target: None,
            spcoid: None,
            mode: None,
        }
    }

    #[test]
    fn splits_batches_and_holds_back_pg_control() {
        let cfg = PlanConfig {
            chunk_size: 100,
            small_file: 10,
            batch_bytes: 25,
            batch_files: 2,
        };
        let files = vec![
            f("base/1/2", FileKind::Dir, 0),
            f("base", FileKind::Dir, 0),
            f("global/pg_control", FileKind::File, 8),
            f("big", FileKind::File, 250),
            f("mid", FileKind::File, 50),
            f("s1", FileKind::File, 10),
            f("s2", FileKind::File, 10),
            f("s3", FileKind::File, 10),
            f("empty", FileKind::File, 0),
            f("pg_tblspc/1", FileKind::Link, 0),
        ];
        let p = plan(&files, cfg);
        assert_eq!(p.dirs, vec![1, 0]);
        assert_eq!(p.links, vec![9]);
        assert_eq!(p.empty, vec![8]);
        assert_eq!(p.control, Some(2));
        let shape: Vec<Vec<(usize, u64, u64)>> = p
            .units
            .iter()
            .map(|u| {
                u.ranges
                    .iter()
                    .map(|r| (r.file, r.offset, r.length))
                    .collect()
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                vec![(3, 0, 100)],
                vec![(3, 100, 100)],
                vec![(3, 200, 50)],
                vec![(4, 0, 50)],
                vec![(5, 0, 10), (6, 0, 10)],
                vec![(7, 0, 10)],
            ]
        );
        assert_eq!(p.total_bytes, 8 + 250 + 50 + 30);
        // Every byte of every non-empty file is covered exactly once.
        for (i, file) in files.iter().enumerate() {
            if file.kind != FileKind::File || file.size == 0 || file.path == CONTROL_FILE {
                continue;
            }
            let mut covered: Vec<(u64, u64)> = p
                .units
                .iter()
                .flat_map(|u| u.ranges.iter())
                .filter(|r| r.file == i)
                .map(|r| (r.offset, r.length))
                .collect();
            covered.sort();
            let mut next = 0;
            for (o, l) in covered {
                assert_eq!(o, next);
                next += l;
            }
            assert_eq!(next, file.size, "{}", file.path);
        }
    }
}
