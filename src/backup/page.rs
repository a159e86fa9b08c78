//! PostgreSQL data pages: what a backup needs to know about the 8 KiB blocks of a relation file.
//!
//! Understands the page header (`PageHeaderData`: `pd_lsn`, `pd_checksum`, `pd_flags`, `pd_lower`,
//! `pd_upper`, `pd_special`, `pd_pagesize_version`), the header sanity rules PostgreSQL applies
//! (`PageIsVerifiedExtended`), the data checksum (`pg_checksum_page`, which mixes in the block
//! number counted from the start of the relation, across 1 GiB segment files) and the rule a
//! delta backup uses to decide that a page may be taken from its parent. Pure functions, no I/O;
//! used by the backup reader (`push.rs`).

use walvault_wal::Lsn;

/// PostgreSQL's block size; walvault refuses clusters built with another one.
pub(crate) const BLCKSZ: usize = 8192;
/// Blocks per relation segment file (`RELSEG_SIZE`): 1 GiB files of 8 KiB pages.
pub(crate) const RELSEG_BLOCKS: u32 = 131_072;
const PAGE_HEADER_SIZE: usize = 24;
/// `PD_VALID_FLAG_BITS`.
const VALID_FLAG_BITS: u16 = 0x0007;
/// `PG_PAGE_LAYOUT_VERSION` since PostgreSQL 8.3.
const LAYOUT_VERSION: u16 = 4;
const MAXALIGN: u16 = 8;

/// A block number counted from the start of the relation fork (`BlockNumber`), as opposed to
/// the index of a page inside one segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BlockNo(pub(crate) u32);

impl BlockNo {
    /// The absolute block number of page `index` of segment file `segno` (`<relfilenode>.<segno>`).
    pub(crate) fn of(segno: u32, index: u32) -> BlockNo {
        BlockNo(segno.wrapping_mul(RELSEG_BLOCKS).wrapping_add(index))
    }
}

/// What a page's header says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageState {
    /// Every byte zero: a page PostgreSQL extended the file with and has not written yet.
    AllZero,
    /// `pd_upper == 0` but not all zero: PostgreSQL treats it as new, so would a restore.
    New,
    /// A header that passes the sanity rules, with its `pd_lsn`.
    Valid { lsn: Lsn, checksum: u16 },
    /// A header PostgreSQL would reject (torn read, corruption, or not a data page at all).
    Insane,
}

fn u16_at(page: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([page[at], page[at + 1]])
}

fn u32_at(page: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]])
}

/// Classifies one page of exactly [`BLCKSZ`] bytes (shorter input is [`PageState::Insane`]).
pub(crate) fn inspect(page: &[u8]) -> PageState {
    if page.len() != BLCKSZ {
        return PageState::Insane;
    }
    let lower = u16_at(page, 12);
    let upper = u16_at(page, 14);
    if upper == 0 {
        return if page.iter().all(|&b| b == 0) {
            PageState::AllZero
        } else {
            PageState::New
        };
    }
    let flags = u16_at(page, 10);
    let special = u16_at(page, 16);
    let size_version = u16_at(page, 18);
    // The same checks as PageIsVerifiedExtended's header test.
    let sane = flags & !VALID_FLAG_BITS == 0
        && usize::from(lower) >= PAGE_HEADER_SIZE
        && lower <= upper
        && upper <= special
        && usize::from(special) <= BLCKSZ
        && special.is_multiple_of(MAXALIGN)
        && usize::from(size_version & 0xFF00) == BLCKSZ
        && size_version & 0x00FF == LAYOUT_VERSION;
    if !sane {
        return PageState::Insane;
    }
    // pd_lsn is {xlogid, xrecoff}, two native-endian (little-endian here) u32s.
    let lsn = (u64::from(u32_at(page, 0)) << 32) | u64::from(u32_at(page, 4));
    PageState::Valid {
        lsn: Lsn(lsn),
        checksum: u16_at(page, 8),
    }
}

/// Whether a delta backup must store this page, given the parent's start LSN and whether the
/// parent holds this page at all. A page may be taken from the parent only when its header is
/// sane, its LSN is valid and older than the parent's start: it has then not been written through
/// WAL since the parent's checkpoint, which flushed every earlier change to disk before the parent
/// read it. Everything else (new, zeroed, insane, zero-LSN pages, pages past the parent's copy)
/// is stored, so a delta restores the bytes read, never a guess.
pub(crate) fn delta_needs(state: PageState, parent_start: Lsn, parent_has_page: bool) -> bool {
    match state {
        PageState::Valid { lsn, .. } => !parent_has_page || !lsn.is_valid() || lsn >= parent_start,
        PageState::AllZero | PageState::New | PageState::Insane => true,
    }
}

/// Whether a page read during a backup passes its data checksum. New pages carry none; pages
/// written at or after the backup's start may be torn by a concurrent write, and WAL replay from
/// the start rewrites them, so (like PostgreSQL's own base backup) they are not judged.
pub(crate) fn checksum_ok(
    page: &[u8],
    state: PageState,
    block: BlockNo,
    backup_start: Lsn,
) -> bool {
    match state {
        PageState::AllZero | PageState::New => true,
        PageState::Valid { lsn, .. } if lsn >= backup_start => true,
        PageState::Valid { checksum, .. } => page_checksum(page, block) == checksum,
        PageState::Insane => false,
    }
}

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
/// `checksumBaseOffsets` from PostgreSQL's `checksum_impl.h`.
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

/// `pg_checksum_page`: the page viewed as `[BLCKSZ/128][32]` u32 words with `pd_checksum` taken
/// as zero, 32 FNV-1a-like lanes, two extra rounds of zeros, folded, mixed with the absolute block
/// number and reduced to 1..=65535. Every page of a full backup goes through it, so it uses AVX2
/// when the CPU has it (the 32 lanes are independent, as PostgreSQL's own vectorised build
/// relies on): several times faster than the portable build, which must assume plain SSE2.
pub(crate) fn page_checksum(page: &[u8], block: BlockNo) -> u16 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { page_checksum_avx2(page, block) };
    }
    page_checksum_body(page, block)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn page_checksum_avx2(page: &[u8], block: BlockNo) -> u16 {
    page_checksum_body(page, block)
}

#[inline(always)]
fn page_checksum_body(page: &[u8], block: BlockNo) -> u16 {
    #[inline(always)]
    fn comp(sum: &mut u32, value: u32) {
        let tmp = *sum ^ value;
        *sum = tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17);
    }
    let mut sums = BASE_OFFSETS;
    for (row_index, row) in page.chunks_exact(4 * N_SUMS).enumerate() {
        let mut words = [0u32; N_SUMS];
        for (word, bytes) in words.iter_mut().zip(row.chunks_exact(4)) {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        // pd_checksum is bytes 8..10, the low half of the third word of the first row.
        if row_index == 0 {
            words[2] &= 0xFFFF_0000;
        }
        for (sum, word) in sums.iter_mut().zip(words) {
            comp(sum, word);
        }
    }
    for _ in 0..2 {
        for sum in sums.iter_mut() {
            comp(sum, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ block.0;
    // The remainder is below 65535, so it and the +1 fit in a u16.
    (folded % 65_535 + 1) as u16
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A sane heap-like page with the given LSN, checksummed for `block`.
    pub(crate) fn page(lsn: u64, fill: u8, block: BlockNo) -> Vec<u8> {
        let mut p = vec![fill; BLCKSZ];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
        p[10..12].copy_from_slice(&0u16.to_le_bytes());
        p[12..14].copy_from_slice(&40u16.to_le_bytes());
        p[14..16].copy_from_slice(&4000u16.to_le_bytes());
        p[16..18].copy_from_slice(&8192u16.to_le_bytes());
        p[18..20].copy_from_slice(&(8192u16 | 4).to_le_bytes());
        let sum = page_checksum(&p, block);
        p[8..10].copy_from_slice(&sum.to_le_bytes());
        p
    }

    #[test]
    fn classifies_pages() {
        assert_eq!(inspect(&vec![0u8; BLCKSZ]), PageState::AllZero);
        let mut new = vec![0u8; BLCKSZ];
        new[100] = 1;
        assert_eq!(inspect(&new), PageState::New);
        let p = page(0x1_0000_0028, 7, BlockNo(0));
        assert!(matches!(
            inspect(&p),
            PageState::Valid {
                lsn: Lsn(0x1_0000_0028),
                ..
            }
        ));
        let mut bad = p.clone();
        bad[10] = 0x80; // an unknown flag bit
        assert_eq!(inspect(&bad), PageState::Insane);
        let mut bad = p.clone();
        bad[16..18].copy_from_slice(&4001u16.to_le_bytes()); // special not MAXALIGNed
        assert_eq!(inspect(&bad), PageState::Insane);
        assert_eq!(inspect(&p[..100]), PageState::Insane);
    }

    #[test]
    fn delta_keeps_everything_it_cannot_prove_unchanged() {
        let start = Lsn(0x5000);
        let old = inspect(&page(0x4000, 1, BlockNo(0)));
        let changed = inspect(&page(0x5000, 1, BlockNo(0)));
        let zero_lsn = inspect(&page(0, 1, BlockNo(0)));
        assert!(!delta_needs(old, start, true));
        assert!(delta_needs(old, start, false), "past the parent's copy");
        assert!(
            delta_needs(changed, start, true),
            "LSN at the parent's start"
        );
        assert!(delta_needs(zero_lsn, start, true));
        for state in [PageState::AllZero, PageState::New, PageState::Insane] {
            assert!(delta_needs(state, start, true));
        }
    }

    #[test]
    fn checksums_mix_in_the_absolute_block_number() {
        // Page 5 of segment file `.1` is block 131077 of the relation: a checksum computed for
        // the in-file index would not match.
        let block = BlockNo::of(1, 5);
        assert_eq!(block, BlockNo(131_077));
        let p = page(0x4000, 3, block);
        let state = inspect(&p);
        assert!(checksum_ok(&p, state, block, Lsn(0x9000)));
        assert!(!checksum_ok(&p, state, BlockNo(5), Lsn(0x9000)));
        let mut torn = p.clone();
        torn[5000] ^= 1;
        assert!(!checksum_ok(&torn, state, block, Lsn(0x9000)));
        // At or after the backup start a page is not judged: replay rewrites it.
        assert!(checksum_ok(&torn, state, block, Lsn(0x4000)));
        let sum = page_checksum(&p, block);
        assert_ne!(sum, 0);
        assert_eq!(
            page_checksum_body(&p, block),
            sum,
            "portable and vector builds agree"
        );
    }
}
