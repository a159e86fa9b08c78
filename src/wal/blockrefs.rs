//! The block map of one segment: which blocks of which relation forks its records change, the
//! forks created or truncated (limit blocks), the databases created or dropped whole, and the
//! two halves of the records split with its neighbours, collected while the segment streams
//! into the repository and stored in its summary. A map that walvault could not make complete
//! says why (`unusable`), and a backup then falls back to the page scan. Block lists are stored
//! compactly per fork: varint-coded ranges or a bitmap, whichever is smaller, in hex.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};
use walvault_wal::{Continuation, Pending, RelChange, RelFileLocator, WalRecord};

/// A relation fork: its storage and fork number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ForkKey {
    pub(crate) rel: RelFileLocator,
    pub(crate) fork: u8,
}

/// The most block references one segment's map collects before it gives up (16 MiB of them).
const MAX_COLLECTED: usize = 4 << 20;
/// The most hex the block lists of one summary may take: summaries are read whole.
const MAX_ENCODED: usize = 512 << 10;

/// One fork's entry in a stored map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ForkBlocks {
    pub(crate) spc: u32,
    pub(crate) db: u32,
    pub(crate) rel: u32,
    pub(crate) fork: u8,
    /// The lowest limit block set in the segment: blocks from here on were recreated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) limit: Option<u32>,
    /// The blocks referenced, encoded (see [`encode`]).
    pub(crate) blocks: String,
}

/// The first part of a record the next segment continues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingPart {
    #[serde(with = "crate::backup::manifest::lsn_text")]
    pub(crate) lsn: walvault_wal::Lsn,
    pub(crate) got: u64,
    pub(crate) head: String,
}

/// The rest of a record the previous segment began.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ContinuedPart {
    pub(crate) rem_len: u64,
    pub(crate) whole: bool,
    pub(crate) first: String,
    pub(crate) last: String,
}

/// What a segment's records do to relation storage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BlockSummary {
    /// Why the map is incomplete; a backup must not rely on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) unusable: Option<String>,
    #[serde(default)]
    pub(crate) forks: Vec<ForkBlocks>,
    /// Tablespace/database pairs created or dropped whole.
    #[serde(default)]
    pub(crate) databases: Vec<(u32, u32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pending: Option<PendingPart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) continued: Option<ContinuedPart>,
}

/// FxHash (rustc's hasher): a rotate, xor and multiply per integer of the key, where SipHash
/// cost about a tenth of wal-push's CPU on these 13-byte keys. The keys are the cluster's own
/// relation forks, not input chosen to collide, and a map holds at most [`MAX_COLLECTED`] blocks.
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|b| self.add(u64::from(*b)));
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn finish(&self) -> u64 {
        // The multiply leaves the low bits weakest; hashbrown takes buckets from them.
        self.0.rotate_left(26)
    }
}

type ForkMap = HashMap<ForkKey, ForkState, BuildHasherDefault<FxHasher>>;

/// Collects the block map of one segment from its records.
#[derive(Default)]
pub(crate) struct Collector {
    forks: ForkMap,
    databases: Vec<(u32, u32)>,
    collected: usize,
    unusable: Option<String>,
    /// The fork of the last block reference: records mostly touch the same one in a row.
    last: Option<ForkKey>,
}

#[derive(Default)]
struct ForkState {
    limit: Option<u32>,
    blocks: Vec<u32>,
    /// Length of `blocks` after the last sort and dedup.
    tidy: usize,
}

impl ForkState {
    fn tidy_up(&mut self) {
        self.blocks.sort_unstable();
        self.blocks.dedup();
        self.tidy = self.blocks.len();
    }
}

impl Collector {
    /// Counts one record in.
    pub(crate) fn add(&mut self, record: &WalRecord<'_>) {
        if self.unusable.is_some() {
            return;
        }
        record.relation_changes(&mut |change| self.change(change));
    }

    /// The map cannot be complete: `why`.
    pub(crate) fn give_up(&mut self, why: String) {
        if self.unusable.is_none() {
            tracing::debug!("block map unusable: {why}");
            self.unusable = Some(why);
            self.forks = ForkMap::default();
        }
    }

    pub(crate) fn change(&mut self, change: RelChange) {
        if self.unusable.is_some() {
            return;
        }
        match change {
            RelChange::Block { rel, fork, block } => {
                let key = ForkKey { rel, fork };
                let state = self.forks.entry(key).or_default();
                if self.last == Some(key) && state.blocks.last() == Some(&block) {
                    return;
                }
                self.last = Some(key);
                state.blocks.push(block);
                self.collected += 1;
                if state.blocks.len() >= 2 * state.tidy.max(1024) {
                    let before = state.blocks.len();
                    state.tidy_up();
                    self.collected -= before - state.blocks.len();
                }
                if self.collected > MAX_COLLECTED {
                    self.give_up(format!("more than {MAX_COLLECTED} blocks changed"));
                }
            }
            RelChange::Limit { rel, fork, limit } => {
                let state = self.forks.entry(ForkKey { rel, fork }).or_default();
                state.limit = Some(state.limit.map_or(limit, |l| l.min(limit)));
            }
            RelChange::Database { spc, db } => {
                if !self.databases.contains(&(spc, db)) {
                    self.databases.push((spc, db));
                }
            }
            RelChange::Unknown(why) => self.give_up(why),
        }
    }

    /// The stored form, with the split records at either end.
    pub(crate) fn finish(
        mut self,
        pending: Option<Pending<'_>>,
        continued: Option<&Continuation>,
    ) -> BlockSummary {
        let mut summary = BlockSummary {
            pending: pending.map(|p| PendingPart {
                lsn: p.lsn,
                got: p.got,
                head: hex(p.head),
            }),
            continued: continued.map(|c| ContinuedPart {
                rem_len: c.rem_len,
                whole: c.whole(),
                first: hex(&c.first),
                last: hex(c.last()),
            }),
            ..BlockSummary::default()
        };
        if let Some(why) = self.unusable.take() {
            summary.unusable = Some(why);
            return summary;
        }
        let mut forks: Vec<_> = self.forks.into_iter().collect();
        forks.sort_by_key(|(k, _)| *k);
        let mut size = 0;
        for (key, mut state) in forks {
            state.tidy_up();
            let blocks = encode(&state.blocks);
            size += blocks.len();
            summary.forks.push(ForkBlocks {
                spc: key.rel.spc,
                db: key.rel.db,
                rel: key.rel.rel,
                fork: key.fork,
                limit: state.limit,
                blocks,
            });
        }
        if size > MAX_ENCODED {
            summary.forks.clear();
            summary.unusable = Some(format!(
                "the block lists take {size} bytes, more than a summary holds ({MAX_ENCODED})"
            ));
        }
        summary.databases = self.databases;
        summary
    }
}

/// Encodes a sorted, deduplicated block list: `r` and varint pairs (gap from the previous
/// range's end, length - 1), or `b`, a varint first block and a bitmap from it, whichever is
/// shorter, in hex.
pub(crate) fn encode(blocks: &[u32]) -> String {
    let mut ranges = Vec::new();
    let mut end = 0u32;
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i];
        let mut j = i;
        while j + 1 < blocks.len() && blocks[j + 1] == blocks[j] + 1 {
            j += 1;
        }
        varint(&mut ranges, start - end);
        varint(&mut ranges, blocks[j] - start);
        end = blocks[j].saturating_add(1);
        i = j + 1;
    }
    let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
        return "r".into();
    };
    let bitmap_len = ((last - first) / 8 + 1) as usize;
    if bitmap_len + 5 < ranges.len() {
        let mut bitmap = Vec::with_capacity(bitmap_len + 5);
        varint(&mut bitmap, *first);
        let base = bitmap.len();
        bitmap.resize(base + bitmap_len, 0);
        for b in blocks {
            let bit = (b - first) as usize;
            bitmap[base + bit / 8] |= 1 << (bit % 8);
        }
        return format!("b{}", hex(&bitmap));
    }
    format!("r{}", hex(&ranges))
}

/// Decodes [`encode`]'s form into ranges (start, end exclusive), in order; `None` for anything
/// malformed (summaries are repository content).
pub(crate) fn decode(text: &str) -> Option<Vec<(u32, u32)>> {
    let (kind, rest) = text.split_at_checked(1)?;
    let bytes = unhex(rest)?;
    let mut at = 0;
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    match kind {
        "r" => {
            let mut end = 0u32;
            while at < bytes.len() {
                let start = end.checked_add(read_varint(&bytes, &mut at)?)?;
                let stop = start
                    .checked_add(read_varint(&bytes, &mut at)?)?
                    .checked_add(1)?;
                ranges.push((start, stop));
                end = stop;
            }
        }
        "b" => {
            let first = read_varint(&bytes, &mut at)?;
            for (i, byte) in bytes[at..].iter().enumerate() {
                for bit in 0..8u32 {
                    if byte & (1 << bit) == 0 {
                        continue;
                    }
                    let block = u32::try_from(i)
                        .ok()?
                        .checked_mul(8)?
                        .checked_add(bit)?
                        .checked_add(first)?;
                    match ranges.last_mut() {
                        Some((_, end)) if *end == block => *end = block.checked_add(1)?,
                        _ => ranges.push((block, block.checked_add(1)?)),
                    }
                }
            }
        }
        _ => return None,
    }
    Some(ranges)
}

fn varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u32> {
    let mut v = 0u32;
    for shift in (0..35).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u32::from(b & 0x7F).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xF)] as char);
    }
    s
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lists_round_trip_in_either_form() {
        let sparse = vec![0, 1, 2, 7, 1000, 1001, 4_000_000_000];
        // InvalidBlockNumber never comes from valid WAL; it must not panic either.
        assert!(encode(&[u32::MAX]).starts_with('r'));
        let dense: Vec<u32> = (5000..9000).filter(|b| b % 3 != 0).collect();
        for blocks in [sparse, dense, vec![], vec![u32::MAX - 1]] {
            let text = encode(&blocks);
            let ranges = decode(&text).unwrap();
            let back: Vec<u32> = ranges.iter().flat_map(|(a, b)| *a..*b).collect();
            assert_eq!(back, blocks, "{text}");
        }
        assert!(encode(&(5000..9000).filter(|b| b % 3 != 0).collect::<Vec<_>>()).starts_with('b'));
        for bad in ["", "x00", "r0", "rzz", "r80", "rffffffffff01", "bff"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn limits_keep_the_lowest_and_unknowns_make_the_map_unusable() {
        let rel = RelFileLocator {
            spc: 1663,
            db: 5,
            rel: 16384,
        };
        let mut c = Collector::default();
        for block in [9, 3, 3, 4] {
            c.change(RelChange::Block {
                rel,
                fork: 0,
                block,
            });
        }
        c.change(RelChange::Limit {
            rel,
            fork: 0,
            limit: 10,
        });
        c.change(RelChange::Limit {
            rel,
            fork: 0,
            limit: 2,
        });
        c.change(RelChange::Database { spc: 1663, db: 7 });
        let s = c.finish(None, None);
        assert_eq!(s.unusable, None);
        assert_eq!(s.forks.len(), 1);
        assert_eq!(s.forks[0].limit, Some(2));
        assert_eq!(decode(&s.forks[0].blocks), Some(vec![(3, 5), (9, 10)]));
        assert_eq!(s.databases, vec![(1663, 7)]);

        let mut c = Collector::default();
        c.change(RelChange::Block {
            rel,
            fork: 0,
            block: 1,
        });
        c.change(RelChange::Unknown("custom resource manager".into()));
        let s = c.finish(None, None);
        assert!(s.forks.is_empty());
        assert_eq!(s.unusable.as_deref(), Some("custom resource manager"));
    }
}
