//! Data page checksums: PostgreSQL's page checksum (`src/include/storage/checksum_impl.h`)
//! and the check a base backup makes of each page it copies (`verify_page_checksum` in
//! `basebackup.c`), for methods where no server code checks the pages (the sql method).
//!
//! Pure functions over bytes already read: no I/O, no policy. Which files to check is
//! [`crate::exclusions::Exclusions::is_checksummed_file`]'s answer; re-reading a failed block
//! once, and reporting, is the caller's.
//!
//! It runs over every byte of a backup, so the inner loop works on fixed-size arrays the
//! compiler can see the bounds of (no per-word bounds checks; it vectorises).
//!
//! Pages are read little-endian, as every platform this client is built for writes them; a
//! big-endian server's pages would all fail, so a caller must not check those.

use crate::exclusions::parse_relation_file_name;
use crate::lsn::Lsn;

/// PostgreSQL's page size (`BLCKSZ`); clusters built with another size are not supported.
pub const BLCKSZ: usize = 8192;

/// Pages per relation segment file (`RELSEG_SIZE`, 1 GiB of 8 kB pages): a file's segment
/// number times this is the relation block number of its first page.
pub const RELSEG_SIZE: u32 = 131072;

/// Number of FNV-1a-like sums computed side by side (`N_SUMS`).
const N_SUMS: usize = 32;
/// Bytes of one row: one 32-bit word for each sum.
const ROW: usize = N_SUMS * 4;
const FNV_PRIME: u32 = 16777619;

/// Where `pd_checksum` sits in the page header (after the 8-byte `pd_lsn`).
const CHECKSUM_OFFSET: usize = 8;
/// Where `pd_upper` sits (after `pd_checksum`, `pd_flags`, `pd_lower`).
const UPPER_OFFSET: usize = 14;

/// The initial value of each sum (`checksumBaseOffsets`).
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

/// One round of one sum (`CHECKSUM_COMP`).
#[inline(always)]
fn comp(sum: u32, value: u32) -> u32 {
    let t = sum ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

/// Feeds one row (one word to each sum) into the sums.
#[inline(always)]
fn mix_row(sums: &mut [u32; N_SUMS], row: &[u8; ROW]) {
    for (j, sum) in sums.iter_mut().enumerate() {
        let word = u32::from_le_bytes([row[4 * j], row[4 * j + 1], row[4 * j + 2], row[4 * j + 3]]);
        *sum = comp(*sum, word);
    }
}

/// The checksum PostgreSQL stores in `pd_checksum` for `page` at block `blkno` of its relation
/// (`pg_checksum_page`): the page with `pd_checksum` taken as zero, hashed, the block number
/// mixed in (so a page written to the wrong place fails), reduced to 1..=65535.
pub fn checksum_page(page: &[u8; BLCKSZ], blkno: u32) -> u16 {
    let mut sums = BASE_OFFSETS;
    let (first, rest) = page.split_at(ROW);
    // The stored checksum is not part of what it sums.
    let mut first: [u8; ROW] = first.try_into().expect("a page holds a whole first row");
    first[CHECKSUM_OFFSET] = 0;
    first[CHECKSUM_OFFSET + 1] = 0;
    mix_row(&mut sums, &first);
    for row in rest.chunks_exact(ROW) {
        mix_row(
            &mut sums,
            row.try_into().expect("chunks_exact yields whole rows"),
        );
    }
    // Two rounds of zeroes for more mixing, then fold.
    for _ in 0..2 {
        mix_row(&mut sums, &[0; ROW]);
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s);
    ((folded ^ blkno) % 65535 + 1) as u16
}

/// The checksum stored in the page (`pd_checksum`).
pub fn stored_checksum(page: &[u8; BLCKSZ]) -> u16 {
    u16::from_le_bytes([page[CHECKSUM_OFFSET], page[CHECKSUM_OFFSET + 1]])
}

/// The LSN of the last WAL record that changed the page (`pd_lsn`).
pub fn page_lsn(page: &[u8; BLCKSZ]) -> Lsn {
    let xlogid = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
    let xrecoff = u32::from_le_bytes([page[4], page[5], page[6], page[7]]);
    Lsn(((xlogid as u64) << 32) | xrecoff as u64)
}

/// Whether the page was never initialised (`PageIsNew`: `pd_upper` is 0), as an all-zero page
/// is. Such pages carry no checksum.
pub fn page_is_new(page: &[u8; BLCKSZ]) -> bool {
    page[UPPER_OFFSET] == 0 && page[UPPER_OFFSET + 1] == 0
}

/// What the check of one page found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCheck {
    /// The stored checksum is right.
    Valid,
    /// A new (all-zero or never initialised) page: nothing to check.
    New,
    /// Changed at or after the backup's start LSN: it may have been read half-written, and WAL
    /// replay rewrites it, so it is not checked.
    ChangedSinceStart(Lsn),
    /// The stored checksum is wrong.
    Bad {
        /// What the checksum should be.
        expected: u16,
        /// What the page holds.
        found: u16,
    },
}

/// Checks `page`, block `blkno` of its relation (see [`relation_block`]), in a backup that
/// started at `start_lsn`, as `BASE_BACKUP` does.
pub fn verify_page(page: &[u8; BLCKSZ], blkno: u32, start_lsn: Lsn) -> PageCheck {
    if page_is_new(page) {
        return PageCheck::New;
    }
    let lsn = page_lsn(page);
    if lsn >= start_lsn {
        return PageCheck::ChangedSinceStart(lsn);
    }
    let expected = checksum_page(page, blkno);
    let found = stored_checksum(page);
    if expected == found {
        PageCheck::Valid
    } else {
        PageCheck::Bad { expected, found }
    }
}

/// The relation block number of block `block_in_segment` of segment file `segment`
/// (`blkno + segno * RELSEG_SIZE`, in `BlockNumber` arithmetic as the server does it).
pub fn relation_block(segment: u32, block_in_segment: u32) -> u32 {
    segment
        .wrapping_mul(RELSEG_SIZE)
        .wrapping_add(block_in_segment)
}

/// The segment number of a relation file from its name (`16384.2` → 2, `16384_vm` → 0);
/// `None` when the name is not a relation file's.
pub fn segment_of_file_name(name: &str) -> Option<u32> {
    parse_relation_file_name(name).map(|f| f.segment)
}

/// One page that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPage {
    /// Its block number within the file, as failures are reported (and as PostgreSQL's own
    /// warning names it).
    pub block_in_file: u32,
    /// Its block number within the relation, which the checksum mixes in.
    pub relation_block: u32,
    /// What the checksum should be.
    pub expected: u16,
    /// What the page holds.
    pub found: u16,
}

/// What the check of a run of bytes of one file found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeCheck {
    /// The pages that failed, in file order.
    pub bad: Vec<BadPage>,
    /// Pages whose checksum was right.
    pub valid: u32,
    /// Pages not checked: new, or changed since the backup started.
    pub skipped: u32,
    /// Bytes not in a whole page of the range (a file whose length is not a multiple of the
    /// page size, or a range not on page boundaries): not checked.
    pub partial_bytes: usize,
}

/// Checks every whole page in `bytes`, which start at byte `offset` of segment file `segment`
/// of a relation, in a backup that started at `start_lsn`.
pub fn verify_range(segment: u32, offset: u64, bytes: &[u8], start_lsn: Lsn) -> RangeCheck {
    let mut out = RangeCheck::default();
    let lead = ((BLCKSZ as u64 - offset % BLCKSZ as u64) % BLCKSZ as u64) as usize;
    let lead = lead.min(bytes.len());
    let first_block = offset.div_ceil(BLCKSZ as u64);
    let pages = bytes[lead..].chunks_exact(BLCKSZ);
    out.partial_bytes = lead + pages.remainder().len();
    for (i, page) in pages.enumerate() {
        let page: &[u8; BLCKSZ] = page.try_into().expect("chunks_exact yields whole pages");
        // A segment file holds at most RELSEG_SIZE blocks, so this fits.
        let block_in_file = (first_block + i as u64) as u32;
        let blkno = relation_block(segment, block_in_file);
        match verify_page(page, blkno, start_lsn) {
            PageCheck::Valid => out.valid += 1,
            PageCheck::New | PageCheck::ChangedSinceStart(_) => out.skipped += 1,
            PageCheck::Bad { expected, found } => out.bad.push(BadPage {
                block_in_file,
                relation_block: blkno,
                expected,
                found,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page as the server lays one out: header with LSN, lower/upper, some tuples' bytes.
    fn page(lsn: u64, fill: u8) -> Box<[u8; BLCKSZ]> {
        let mut p = Box::new([0u8; BLCKSZ]);
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
        p[12..14].copy_from_slice(&40u16.to_le_bytes());
        p[14..16].copy_from_slice(&8000u16.to_le_bytes());
        p[16..18].copy_from_slice(&8192u16.to_le_bytes());
        p[18..20].copy_from_slice(&0x2004u16.to_le_bytes());
        for (i, b) in p[8000..].iter_mut().enumerate() {
            *b = fill.wrapping_add(i as u8);
        }
        p
    }

    fn stamp(p: &mut [u8; BLCKSZ], blkno: u32) {
        let c = checksum_page(p, blkno);
        p[8..10].copy_from_slice(&c.to_le_bytes());
    }

    /// A straightforward transcription of checksum_impl.h (word array, explicit zeroing), to
    /// hold the fast version to.
    fn reference_checksum(page: &[u8; BLCKSZ], blkno: u32) -> u16 {
        let mut words: Vec<u32> = page
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        words[2] &= 0xFFFF_0000;
        let mut sums = BASE_OFFSETS;
        for i in 0..BLCKSZ / ROW {
            for j in 0..N_SUMS {
                sums[j] = comp(sums[j], words[i * N_SUMS + j]);
            }
        }
        for _ in 0..2 {
            for s in sums.iter_mut() {
                *s = comp(*s, 0);
            }
        }
        let mut result = 0u32;
        for s in sums {
            result ^= s;
        }
        ((result ^ blkno) % 65535 + 1) as u16
    }

    #[test]
    fn matches_the_reference_transcription() {
        let mut seed = 0x1234_5678u32;
        for blkno in [0, 1, 7, 131071, 131072, 4_000_000_000] {
            let mut p = Box::new([0u8; BLCKSZ]);
            for b in p.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *b = seed as u8;
            }
            assert_eq!(
                checksum_page(&p, blkno),
                reference_checksum(&p, blkno),
                "{blkno}"
            );
        }
    }

    #[test]
    fn stored_checksum_does_not_change_the_result() {
        let mut p = page(0x1_0000_0100, 3);
        let c = checksum_page(&p, 5);
        p[8..10].copy_from_slice(&0xBEEFu16.to_le_bytes());
        assert_eq!(checksum_page(&p, 5), c);
        // But pd_flags, right beside it, does.
        p[10] ^= 1;
        assert_ne!(checksum_page(&p, 5), c);
    }

    #[test]
    fn block_number_is_mixed_in() {
        let p = page(0x100, 9);
        assert_ne!(checksum_page(&p, 0), checksum_page(&p, 1));
        assert_ne!(checksum_page(&p, 1), checksum_page(&p, 1 + RELSEG_SIZE));
    }

    #[test]
    fn checksum_is_never_zero() {
        // Every value of the folded hash maps into 1..=65535; try many pages.
        for fill in 0..=255u8 {
            assert_ne!(checksum_page(&page(1, fill), fill as u32), 0);
        }
    }

    #[test]
    fn verify_outcomes() {
        let start = Lsn(0x2_0000_0000);
        let mut p = page(0x1_0000_0000, 1);
        stamp(&mut p, 42);
        assert_eq!(verify_page(&p, 42, start), PageCheck::Valid);
        let found = stored_checksum(&p);
        let expected = checksum_page(&p, 41);
        assert_eq!(
            verify_page(&p, 41, start),
            PageCheck::Bad { expected, found }
        );
        // At or after the start LSN: not checked, however wrong.
        p[8] ^= 0xFF;
        assert_eq!(
            verify_page(&p, 42, Lsn(0x1_0000_0000)),
            PageCheck::ChangedSinceStart(Lsn(0x1_0000_0000))
        );
        assert!(matches!(verify_page(&p, 42, start), PageCheck::Bad { .. }));
        // New pages: all zero, or pd_upper zero.
        assert_eq!(verify_page(&[0u8; BLCKSZ], 0, start), PageCheck::New);
        p[14] = 0;
        p[15] = 0;
        assert_eq!(verify_page(&p, 42, start), PageCheck::New);
    }

    #[test]
    fn page_header_fields() {
        let p = page(0x0000_0003_0000_1A28, 0);
        assert_eq!(page_lsn(&p), Lsn(0x3_0000_1A28));
        assert_eq!(page_lsn(&p).to_string(), "3/1A28");
        assert!(!page_is_new(&p));
    }

    #[test]
    fn relation_block_numbers() {
        assert_eq!(relation_block(0, 5), 5);
        assert_eq!(relation_block(2, 5), 2 * 131072 + 5);
        assert_eq!(segment_of_file_name("16384"), Some(0));
        assert_eq!(segment_of_file_name("16384.3"), Some(3));
        assert_eq!(segment_of_file_name("16384_fsm.1"), Some(1));
        assert_eq!(segment_of_file_name("pg_filenode.map"), None);
    }

    #[test]
    fn range_names_file_and_relation_blocks() {
        let start = Lsn(u64::MAX);
        let segment = 1;
        let mut bytes = Vec::new();
        for block_in_file in 10..14u32 {
            let mut p = page(100, block_in_file as u8);
            stamp(&mut p, relation_block(segment, block_in_file));
            bytes.extend_from_slice(&p[..]);
        }
        // Damage block 12 (third page), and append a zero page and a partial one.
        bytes[2 * BLCKSZ + 5000] ^= 0x40;
        bytes.extend_from_slice(&[0u8; BLCKSZ]);
        bytes.extend_from_slice(&[7u8; 100]);
        let r = verify_range(segment, 10 * BLCKSZ as u64, &bytes, start);
        assert_eq!(r.valid, 3);
        assert_eq!(r.skipped, 1);
        assert_eq!(r.partial_bytes, 100);
        assert_eq!(r.bad.len(), 1);
        let bad = r.bad[0];
        assert_eq!(bad.block_in_file, 12);
        assert_eq!(bad.relation_block, RELSEG_SIZE + 12);
        assert_eq!(
            bad.found,
            stored_checksum(&bytes[2 * BLCKSZ..3 * BLCKSZ].try_into().unwrap())
        );
        assert_ne!(bad.expected, bad.found);

        // A range that starts mid-page checks only the whole pages in it.
        let r = verify_range(segment, 10 * BLCKSZ as u64 + 100, &bytes[100..], start);
        assert_eq!(r.valid, 2);
        assert_eq!(r.bad.len(), 1);
        assert_eq!(r.bad[0].block_in_file, 12);
        assert_eq!(r.partial_bytes, BLCKSZ - 100 + 100);
    }

    /// Throughput over 1 GiB of pages, printed, never asserted (speed is shown by measuring,
    /// not by a timed test): `cargo test --release --lib pagecheck::tests::throughput --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn throughput() {
        const PAGES: usize = 8192; // 64 MiB, verified 16 times
        let mut bytes = vec![0u8; PAGES * BLCKSZ];
        let mut seed = 0x9E37_79B9u32;
        for (i, p) in bytes.chunks_exact_mut(BLCKSZ).enumerate() {
            for b in p.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *b = seed as u8;
            }
            p[0..8].copy_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0]);
            p[14..16].copy_from_slice(&8000u16.to_le_bytes());
            let page: &mut [u8; BLCKSZ] = p.try_into().unwrap();
            stamp(page, i as u32);
        }
        let t = std::time::Instant::now();
        let mut valid = 0u64;
        for _ in 0..16 {
            let r = verify_range(0, 0, &bytes, Lsn(u64::MAX));
            assert!(r.bad.is_empty());
            valid += u64::from(r.valid);
        }
        let secs = t.elapsed().as_secs_f64();
        let gib = (valid as f64 * BLCKSZ as f64) / (1u64 << 30) as f64;
        println!(
            "verified {valid} pages ({gib:.2} GiB) in {secs:.3} s: {:.2} GiB/s",
            gib / secs
        );
    }
}
