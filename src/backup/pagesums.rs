//! Page sums: the crc32 of every 8 KiB page of a pack's pieces, stored beside the pack.
//!
//! backup-push hashes what it reads a page at a time and folds the page checksums into the piece
//! and file checksums (a fixed-length crc32 shift, so no byte is hashed twice); the page checksums
//! of pieces longer than a page go into the pack's sums object. `backup-fetch --delta` compares
//! local pages with them and fetches only the pages that differ. Sums are advisory and untrusted:
//! a record counts only where it names a piece of the manifest and folds to that piece's crc32.
//! Used by backup-push and `backup-fetch --delta`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

use super::manifest::Piece;
use super::page::BLCKSZ;

const MAGIC: &[u8; 8] = b"WVPSUMS1";
/// One record's head: the piece's offset in the pack and its length.
const RECORD_HEAD: usize = 16;

/// The page checksums of `bytes`, a page at a time (the last may be short).
pub(crate) fn page_crcs(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks(BLCKSZ).map(crc32fast::hash).collect()
}

/// How many pages a run of `len` bytes spans.
pub(crate) fn pages_in(len: u64) -> usize {
    usize::try_from(len.div_ceil(BLCKSZ as u64)).unwrap_or(usize::MAX)
}

/// crc32 of a run of `len` bytes from its page checksums, or `None` when their count does not
/// fit `len`.
pub(crate) fn fold(crcs: &[u32], len: u64) -> Option<u32> {
    if crcs.len() != pages_in(len) {
        return None;
    }
    let table = shift_table();
    let mut acc = 0u32;
    let mut left = len;
    for &crc in crcs {
        if left >= BLCKSZ as u64 {
            acc = shift_one_page(table, acc) ^ crc;
            left -= BLCKSZ as u64;
        } else {
            let mut h = crc32fast::Hasher::new_with_initial_len(acc, 0);
            h.combine(&crc32fast::Hasher::new_with_initial_len(crc, left));
            acc = h.finalize();
        }
    }
    Some(acc)
}

/// A hasher holding the crc32 of a `len`-byte run, to combine with others.
pub(crate) fn hasher(crc: u32, len: u64) -> crc32fast::Hasher {
    crc32fast::Hasher::new_with_initial_len(crc, len)
}

type ShiftTable = [[u32; 256]; 4];

/// crc32(a ‖ b) = shift(crc32(a)) ^ crc32(b) for a page-long b, and the shift is linear over
/// GF(2): a byte-wise table makes each page's combine four lookups, where the general combine
/// costs a few thousand operations (it would dominate a restore's comparison).
fn shift_table() -> &'static ShiftTable {
    static TABLE: OnceLock<ShiftTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let zero_page = crc32fast::Hasher::new_with_initial_len(0, BLCKSZ as u64);
        let basis: Vec<u32> = (0..32)
            .map(|bit| {
                let mut h = crc32fast::Hasher::new_with_initial_len(1u32 << bit, 0);
                h.combine(&zero_page);
                h.finalize()
            })
            .collect();
        let mut table = [[0u32; 256]; 4];
        for (k, row) in table.iter_mut().enumerate() {
            for (byte, slot) in row.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|bit| byte & (1 << bit) != 0)
                    .fold(0, |acc, bit| acc ^ basis[8 * k + bit]);
            }
        }
        table
    })
}

fn shift_one_page(table: &ShiftTable, crc: u32) -> u32 {
    let [a, b, c, d] = crc.to_le_bytes();
    table[0][usize::from(a)]
        ^ table[1][usize::from(b)]
        ^ table[2][usize::from(c)]
        ^ table[3][usize::from(d)]
}

/// The sums object of one pack being filled: a record per piece longer than a page (a shorter
/// piece's crc32 in the manifest is its page's).
pub(crate) struct PackSums {
    bytes: Vec<u8>,
}

impl PackSums {
    pub(crate) fn new() -> PackSums {
        PackSums {
            bytes: MAGIC.to_vec(),
        }
    }

    /// Records the piece at `at` in the pack, `len` bytes, with its page checksums.
    pub(crate) fn add(&mut self, at: u64, len: u64, crcs: &[u32]) {
        if len <= BLCKSZ as u64 {
            return;
        }
        self.bytes.extend_from_slice(&at.to_le_bytes());
        self.bytes.extend_from_slice(&len.to_le_bytes());
        for crc in crcs {
            self.bytes.extend_from_slice(&crc.to_le_bytes());
        }
    }

    /// The object's content; the builder is left empty for the next pack.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.bytes, MAGIC.to_vec())
    }
}

/// The largest sums object a pack can have: a record per page of the largest pack, at most.
pub(crate) const MAX_OBJECT: u64 = (MAGIC.len()
    + (super::PACK_TARGET + super::CHUNK as usize) / BLCKSZ * (RECORD_HEAD + 8))
    as u64;

/// The page checksums read back for one pack. A record is used only for a piece of the
/// manifest with its length, and only if it folds to that piece's crc32.
#[derive(Debug, Default)]
pub(crate) struct PageSums {
    /// Piece offset in the pack → its length, page checksums and what they fold to (folded once
    /// here: a restore asks for a piece once for every part a newer backup cuts it into).
    by_at: HashMap<u64, Record>,
}

#[derive(Debug)]
struct Record {
    len: u64,
    crcs: Vec<u32>,
    folded: Option<u32>,
}

impl PageSums {
    /// Reads a sums object (at most [`MAX_OBJECT`] bytes); an error for one that is not a sums
    /// object at all.
    pub(crate) fn parse(bytes: &[u8]) -> Result<PageSums, String> {
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or("does not start like a page sums object")?;
        let mut by_at = HashMap::new();
        let mut rest = body;
        while !rest.is_empty() {
            let (head, tail) = rest
                .split_at_checked(RECORD_HEAD)
                .ok_or("ends inside a record")?;
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&head[i..i + 8]);
                u64::from_le_bytes(b)
            };
            let (at, len) = (word(0), word(8));
            let (crcs, tail) = pages_in(len)
                .checked_mul(4)
                .and_then(|n| tail.split_at_checked(n))
                .ok_or_else(|| format!("record of the piece at {at} runs past the end"))?;
            rest = tail;
            let crcs: Vec<u32> = crcs
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let folded = fold(&crcs, len);
            by_at.insert(at, Record { len, crcs, folded });
        }
        Ok(PageSums { by_at })
    }

    /// The page checksums of `piece`: its own crc32 when it is one page, else its record if
    /// that matches the piece.
    pub(crate) fn of(&self, piece: &Piece) -> Option<Cow<'_, [u32]>> {
        if piece.len <= BLCKSZ as u64 {
            return Some(Cow::Owned(vec![piece.crc32]));
        }
        let record = self.by_at.get(&piece.at)?;
        (record.len == piece.len && record.folded == Some(piece.crc32))
            .then_some(Cow::Borrowed(record.crcs.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::PackId;

    fn content(len: usize, seed: u32) -> Vec<u8> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as u8)
            .collect()
    }

    /// Folding page checksums gives the checksum of the whole run, for any length.
    #[test]
    fn folded_page_checksums_are_the_runs_checksum() {
        for len in [0, 1, 8191, 8192, 8193, 3 * 8192, 5 * 8192 + 17, 1 << 20] {
            let bytes = content(len, len as u32);
            let crcs = page_crcs(&bytes);
            assert_eq!(
                fold(&crcs, len as u64),
                Some(crc32fast::hash(&bytes)),
                "{len}"
            );
        }
        assert_eq!(fold(&[1, 2], 8192), None);
    }

    fn piece(at: u64, bytes: &[u8]) -> Piece {
        Piece {
            pack: PackId(0),
            at,
            len: bytes.len() as u64,
            file_offset: 0,
            crc32: crc32fast::hash(bytes),
        }
    }

    /// Records come back for the manifest's pieces only, and only when they fold to the
    /// piece's checksum: a forged or damaged record is ignored, a foreign object refused.
    #[test]
    fn only_records_that_match_the_manifest_count() {
        let (a, b, c) = (
            content(3 * 8192, 1),
            content(100, 2),
            content(2 * 8192 + 5, 3),
        );
        let (pa, pb, pc) = (piece(0, &a), piece(a.len() as u64, &b), piece(99_999, &c));
        let mut sums = PackSums::new();
        sums.add(pa.at, pa.len, &page_crcs(&a));
        sums.add(pb.at, pb.len, &page_crcs(&b));
        let mut forged = page_crcs(&c);
        forged[1] ^= 1;
        sums.add(pc.at, pc.len, &forged);
        let bytes = sums.take();
        assert_eq!(sums.take(), MAGIC.to_vec());
        assert!((bytes.len() as u64) < MAX_OBJECT);

        let read = PageSums::parse(&bytes).unwrap();
        assert_eq!(read.of(&pa).unwrap().as_ref(), page_crcs(&a).as_slice());
        assert_eq!(read.of(&pb).unwrap().as_ref(), &[pb.crc32]);
        assert!(
            read.of(&pc).is_none(),
            "a record that does not fold was used"
        );
        let shorter = Piece {
            len: pa.len - 1,
            ..pa
        };
        assert!(read.of(&shorter).is_none());
        let elsewhere = Piece { at: 5, ..pa };
        assert!(read.of(&elsewhere).is_none());

        assert!(PageSums::parse(b"not sums").is_err());
        assert!(PageSums::parse(&bytes[..bytes.len() - 2]).is_err());
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(PageSums::parse(&huge).is_err());
    }
}
