//! The blocks a delta must read, from the block maps of the segments between the parent's start
//! and the new backup's start: archived segments through their summaries, the segment the new
//! backup starts in (not archived yet) scanned from the local `pg_wal` up to the start LSN, and
//! records split between segments joined from both halves. Any segment without a usable map
//! makes the whole map unusable (the caller falls back to the page scan and says why). Also the
//! self-check (`--verify-map`): a page the scan would keep because of its LSN must be in the map.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use walvault_wal::{
    Lsn, PgMajor, RelChange, RelFileLocator, SegmentName, SegmentNo, SplitRecord, TimelineId,
    WalFileName, WalSegmentSize,
};

use super::merged_ranges;
use super::page::{self, PageState, BLCKSZ, RELSEG_BLOCKS};
use super::walk::{Fork, RelFile};
use crate::repo::{layout, Repository};
use crate::wal::blockrefs::{decode, unhex, BlockSummary, ForkKey};
use crate::wal::summary::{self, Summariser};

/// `GLOBALTABLESPACE_OID` and `DEFAULTTABLESPACE_OID`.
const GLOBAL_SPC: u32 = 1664;
/// `VISIBILITYMAP_FORKNUM`.
const VM_FORK: u8 = 2;
const DEFAULT_SPC: u32 = 1663;
/// Summaries read at once.
const READ_AHEAD: usize = 16;
/// Bytes of a local segment read at a time.
const PIECE: usize = 1 << 20;

/// What changed between two LSNs, fork by fork.
#[derive(Debug, Default)]
pub(crate) struct BlockMap {
    forks: HashMap<ForkKey, ForkMap>,
    databases: HashSet<(u32, u32)>,
}

#[derive(Debug, Default)]
struct ForkMap {
    limit: Option<u32>,
    /// Block ranges (start, end exclusive), sorted and merged once composed.
    ranges: Vec<(u32, u32)>,
    /// Length of `ranges` after the last merge: merging as they grow keeps a long range of
    /// segments from holding every segment's list at once.
    merged: usize,
}

impl ForkMap {
    fn tidy(&mut self) {
        self.ranges = merged_ranges(std::mem::take(&mut self.ranges));
        self.merged = self.ranges.len();
    }
}

/// Where the changes are to be read from.
pub(crate) struct MapRequest<'a> {
    pub(crate) repo: &'a Arc<Repository>,
    pub(crate) pgdata: &'a Path,
    pub(crate) timeline: u32,
    pub(crate) seg_size: WalSegmentSize,
    pub(crate) major: PgMajor,
    /// The parent's start LSN.
    pub(crate) from: Lsn,
    /// The new backup's start LSN.
    pub(crate) to: Lsn,
}

/// Composes the map of every change from `from` to `to`; `Err` says why there is none.
pub(crate) async fn compose(req: &MapRequest<'_>) -> Result<BlockMap, String> {
    let first = req.from.segment_number(req.seg_size);
    let last = req.to.segment_number(req.seg_size);
    if last.0 < first.0 {
        return Err(format!(
            "start {} is before the parent's {}",
            req.to, req.from
        ));
    }
    let name = |segno: SegmentNo| {
        SegmentName::new(TimelineId(req.timeline), segno, req.seg_size)
            .map_err(|e| format!("segment {} has no name: {e}", segno.0))
    };
    let mut summaries: Vec<(SegmentName, BlockSummary)> = Vec::new();
    let archived: Vec<SegmentNo> = (first.0..last.0).map(SegmentNo).collect();
    for batch in archived.chunks(READ_AHEAD) {
        let mut loads = tokio::task::JoinSet::new();
        for (i, segno) in batch.iter().enumerate() {
            let (repo, seg) = (Arc::clone(req.repo), name(*segno)?);
            loads.spawn(async move { (i, seg, summary::load(&repo, &seg).await) });
        }
        let mut loaded = Vec::new();
        while let Some(joined) = loads.join_next().await {
            loaded.push(joined.map_err(|e| format!("reading summaries: {e}"))?);
        }
        loaded.sort_by_key(|(i, _, _)| *i);
        for (_, seg, found) in loaded {
            let blocks = match found.and_then(|s| s.blocks) {
                Some(blocks) => blocks,
                None => not_archived_yet(req, &seg).await?,
            };
            summaries.push((seg, blocks));
        }
    }
    let last_name = name(last)?;
    let upto = req.to.segment_offset(req.seg_size);
    summaries.push((last_name, scan_local(req, &last_name, upto).await?));

    let mut map = BlockMap::default();
    for (i, (seg, blocks)) in summaries.iter().enumerate() {
        if let Some(why) = &blocks.unusable {
            return Err(format!("the block map of {seg} is unusable: {why}"));
        }
        map.add(seg, blocks)?;
        // The record split with the next segment; the last one's runs past the start LSN.
        let Some((next_seg, next)) = summaries.get(i + 1) else {
            break;
        };
        match (&blocks.pending, &next.continued) {
            (None, None) => {}
            (Some(p), Some(c)) if c.whole => {
                let (head, first, last) = (unhex(&p.head), unhex(&c.first), unhex(&c.last));
                let (Some(head), Some(first), Some(last)) = (head, first, last) else {
                    return Err(format!(
                        "the summaries of {seg} and {next_seg} are malformed"
                    ));
                };
                let split = SplitRecord {
                    lsn: p.lsn,
                    got: p.got,
                    head: &head,
                    rem_len: c.rem_len,
                    first: &first,
                    last: &last,
                    major: req.major,
                };
                let mut verdict = Ok(());
                split.relation_changes(&mut |change| {
                    if verdict.is_ok() {
                        verdict = map.change(change);
                    }
                });
                verdict?;
            }
            _ => {
                return Err(format!(
                    "the record between {seg} and {next_seg} was not seen whole"
                ))
            }
        }
    }
    map.forks.values_mut().for_each(ForkMap::tidy);
    Ok(map)
}

/// The block map of an archived-range segment without a summary: scanned from `pg_wal` when the
/// archive does not hold it yet (the archiver lags behind the backup's start) or is storing it
/// now (wal-push stores the segment, then its summary, then PostgreSQL marks it `.done`),
/// unusable otherwise (its summary was lost or predates block maps).
async fn not_archived_yet(req: &MapRequest<'_>, seg: &SegmentName) -> Result<BlockSummary, String> {
    let archived = req
        .repo
        .head(&layout::wal(&WalFileName::Segment(*seg)))
        .await
        .map_err(|e| format!("checking whether {seg} is archived: {e}"))?;
    let ready = req
        .pgdata
        .join("pg_wal/archive_status")
        .join(format!("{seg}.ready"));
    if archived.is_some() && !ready.exists() {
        return Err(format!(
            "segment {seg} has no block map (its summary is missing or from an older walvault)"
        ));
    }
    scan_local(req, seg, u64::from(req.seg_size.bytes())).await
}

/// Scans `pg_wal/<seg>` up to offset `upto`.
async fn scan_local(
    req: &MapRequest<'_>,
    seg: &SegmentName,
    upto: u64,
) -> Result<BlockSummary, String> {
    let path: PathBuf = req.pgdata.join("pg_wal").join(seg.to_string());
    let seg = *seg;
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)
            .map_err(|e| format!("cannot read {} for its block map: {e}", path.display()))?;
        let mut summariser = Summariser::new(seg);
        let mut reader = file.take(upto);
        let mut buf = vec![0u8; PIECE];
        loop {
            let n = read_full(&mut reader, &mut buf)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            summariser.feed(&buf[..n]);
        }
        summariser
            .finish()
            .and_then(|s| s.blocks)
            .ok_or_else(|| format!("{} is not WAL", path.display()))
    })
    .await
    .map_err(|e| format!("scanning {seg}: {e}"))?
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

impl BlockMap {
    fn add(&mut self, seg: &SegmentName, blocks: &BlockSummary) -> Result<(), String> {
        for f in &blocks.forks {
            let ranges =
                decode(&f.blocks).ok_or_else(|| format!("the block map of {seg} is malformed"))?;
            let key = ForkKey {
                rel: RelFileLocator {
                    spc: f.spc,
                    db: f.db,
                    rel: f.rel,
                },
                fork: f.fork,
            };
            let entry = self.forks.entry(key).or_default();
            entry.ranges.extend(ranges);
            if entry.ranges.len() > 2 * entry.merged + 4096 {
                entry.tidy();
            }
            if let Some(limit) = f.limit {
                entry.limit = Some(entry.limit.map_or(limit, |l| l.min(limit)));
            }
        }
        self.databases.extend(blocks.databases.iter().copied());
        Ok(())
    }

    fn change(&mut self, change: RelChange) -> Result<(), String> {
        match change {
            RelChange::Block { rel, fork, block } => self
                .forks
                .entry(ForkKey { rel, fork })
                .or_default()
                .ranges
                .push((block, block.saturating_add(1))),
            RelChange::Limit { rel, fork, limit } => {
                let entry = self.forks.entry(ForkKey { rel, fork }).or_default();
                entry.limit = Some(entry.limit.map_or(limit, |l| l.min(limit)));
            }
            RelChange::Database { spc, db } => {
                self.databases.insert((spc, db));
            }
            RelChange::Unknown(why) => return Err(why),
        }
        Ok(())
    }

    /// The byte ranges (offset, length) of relation file `path` (now `size` bytes; the parent
    /// had `parent_size`) a delta must read: the blocks changed, those past a limit (the fork
    /// was created or truncated), all of it when its database was created or dropped whole, and
    /// everything past the parent's copy. `None` when `path` is not a relation file the map
    /// describes: the file is then scanned.
    pub(crate) fn reads(&self, path: &str, size: u64, parent_size: u64) -> Option<Vec<(u64, u64)>> {
        let (key, segno) = fork_of(path)?;
        let nblocks = u32::try_from(size.div_ceil(BLCKSZ as u64)).ok()?;
        let base = segno.checked_mul(RELSEG_BLOCKS)?;
        let mut wanted: Vec<(u32, u32)> = Vec::new();
        // Visibility map bits are cleared (by heap updates, deletes, inserts) without a block
        // reference or a new page LSN: replay redoes it only from the backup's own start, so the
        // map, one page per 32768 heap pages, is read whole.
        let vm = key.fork == VM_FORK;
        if vm || self.databases.contains(&(key.rel.spc, key.rel.db)) {
            wanted.push((0, nblocks));
        } else {
            if let Some(fork) = self.forks.get(&key) {
                let in_file = |b: u32| b.saturating_sub(base).min(nblocks);
                let start = fork.ranges.partition_point(|(_, end)| *end <= base);
                for (a, b) in &fork.ranges[start..] {
                    if *a >= base.saturating_add(nblocks) {
                        break;
                    }
                    wanted.push((in_file(*a), in_file(*b)));
                }
                if let Some(limit) = fork.limit {
                    wanted.push((in_file(limit), nblocks));
                }
            }
            let parent_blocks = u32::try_from(parent_size / BLCKSZ as u64).unwrap_or(u32::MAX);
            wanted.push((parent_blocks.min(nblocks), nblocks));
        }
        Some(
            merged_ranges(wanted)
                .into_iter()
                .filter(|(a, b)| a < b)
                .map(|(a, b)| {
                    let offset = u64::from(a) * BLCKSZ as u64;
                    (offset, (u64::from(b) * BLCKSZ as u64).min(size) - offset)
                })
                .collect(),
        )
    }
}

/// The fork and segment number of relation file `path`.
fn fork_of(path: &str) -> Option<(ForkKey, u32)> {
    let (dir, name) = path.rsplit_once('/')?;
    let file = RelFile::parse(name).filter(|f| !f.temp)?;
    let parts: Vec<&str> = dir.split('/').collect();
    let (spc, db) = match parts.as_slice() {
        ["global"] => (GLOBAL_SPC, 0),
        ["base", db] => (DEFAULT_SPC, db.parse().ok()?),
        ["pg_tblspc", spc, _, db] => (spc.parse().ok()?, db.parse().ok()?),
        _ => return None,
    };
    let fork = match file.fork {
        Fork::Main => 0,
        Fork::Fsm => 1,
        Fork::Vm => 2,
        Fork::Init => 3,
    };
    let rel = RelFileLocator {
        spc,
        db,
        rel: file.node.parse().ok()?,
    };
    Some((ForkKey { rel, fork }, file.segno))
}

/// One file the self-check looks at: where it is, what the map read of it.
pub(crate) struct Checked {
    pub(crate) path: String,
    pub(crate) source: PathBuf,
    pub(crate) size: u64,
    pub(crate) reads: Arc<[(u64, u64)]>,
}

/// `--verify-map`: reads every page of `files` and fails on the first one the page scan would
/// keep for its LSN (after the parent's start `from`, at or before the backup's start `to`:
/// later changes are replayed from the backup's own WAL) that the map did not read.
pub(crate) fn verify(files: &[Checked], from: Lsn, to: Lsn) -> Result<usize, String> {
    let mut pages = 0;
    let mut buf = vec![0u8; BLCKSZ];
    for f in files {
        let mut file = match std::fs::File::open(&f.source) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", f.source.display())),
        };
        let mut at = 0u64;
        while at + BLCKSZ as u64 <= f.size {
            match read_full(&mut file, &mut buf) {
                Ok(n) if n == BLCKSZ => {}
                Ok(_) => break,
                Err(e) => return Err(format!("reading {}: {e}", f.source.display())),
            }
            pages += 1;
            if let PageState::Valid { lsn, .. } = page::inspect(&buf) {
                let covered = f.reads.iter().any(|(o, l)| at >= *o && at < o + l);
                if lsn > from && lsn <= to && !covered {
                    return Err(format!(
                        "the block map missed block {} of {} (page LSN {lsn}, changed after the \
                         parent's start {from})",
                        at / BLCKSZ as u64,
                        f.path
                    ));
                }
            }
            at += BLCKSZ as u64;
        }
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cover_changes_limits_databases_and_growth() {
        let mut map = BlockMap::default();
        let rel = |rel| RelFileLocator {
            spc: DEFAULT_SPC,
            db: 5,
            rel,
        };
        for block in [3, 4, 9, RELSEG_BLOCKS + 2] {
            map.change(RelChange::Block {
                rel: rel(100),
                fork: 0,
                block,
            })
            .unwrap();
        }
        map.change(RelChange::Limit {
            rel: rel(200),
            fork: 0,
            limit: 6,
        })
        .unwrap();
        map.change(RelChange::Database { spc: 1700, db: 6 })
            .unwrap();
        map.forks.values_mut().for_each(ForkMap::tidy);
        let p = BLCKSZ as u64;
        // Changed blocks, plus the two pages past the parent's 10.
        assert_eq!(
            map.reads("base/5/100", 12 * p, 10 * p),
            Some(vec![(3 * p, 2 * p), (9 * p, 3 * p)])
        );
        // The second 1 GiB segment: block RELSEG_BLOCKS + 2 is its third page.
        assert_eq!(
            map.reads("base/5/100.1", 5 * p, 5 * p),
            Some(vec![(2 * p, p)])
        );
        assert_eq!(
            map.reads("base/5/100_vm", 2 * p, 2 * p),
            Some(vec![(0, 2 * p)])
        );
        assert_eq!(
            map.reads("base/5/200", 8 * p, 20 * p),
            Some(vec![(6 * p, 2 * p)])
        );
        assert_eq!(
            map.reads("pg_tblspc/1700/PG_15_202209061/6/300", 3 * p, 3 * p),
            Some(vec![(0, 3 * p)])
        );
        assert_eq!(map.reads("base/5/pg_filenode.map", p, p), None);
        assert_eq!(map.reads("base/5/t3_100", p, p), None);
        // An unclassifiable change is refused.
        assert!(map.change(RelChange::Unknown("x".into())).is_err());
    }
}
