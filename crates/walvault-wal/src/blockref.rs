//! What a WAL record does to relation files: the blocks it references (its block headers),
//! and the changes that touch relations without a block reference, classified as PostgreSQL
//! 17's WAL summarizer does (`walsummarizer.c`): a created or truncated fork sets a limit
//! block, a dropped relation (in a commit or abort record) sets a limit of 0 on its forks, a
//! created or dropped database marks every relation of a tablespace/database pair, and full-page
//! images for hints are block references like any other. Record layouts are those of PostgreSQL
//! 13 to 18 (`RelFileNode` and `RelFileLocator` are the same three OIDs; database records were
//! renumbered in 15). A record whose effect cannot be decided yields [`RelChange::Unknown`].

use crate::page::PgMajor;
use crate::record::{WalRecord, RM_XACT_ID, RM_XLOG_ID, SIZE_OF_XLOG_RECORD};

/// `RM_SMGR_ID`.
pub const RM_SMGR_ID: u8 = 2;
/// `RM_DBASE_ID`.
pub const RM_DBASE_ID: u8 = 4;
/// `RM_LOGICALMSG_ID`: the highest built-in resource manager of 13 to 18.
const RM_MAX_BUILTIN_ID: u8 = 21;

const XLR_INFO_MASK: u8 = 0x0F;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_HAS_INFO: u8 = 0x80;
const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILELOCATORS: u32 = 1 << 2;

const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
const SMGR_TRUNCATE_VM: u32 = 0x0002;

const XLOG_PARAMETER_CHANGE: u8 = 0x60;

pub(crate) const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
pub(crate) const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
pub(crate) const XLR_BLOCK_ID_ORIGIN: u8 = 253;
pub(crate) const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const XLR_MAX_BLOCK_ID: u8 = 32;
const BKPBLOCK_FORK_MASK: u8 = 0x0F;
pub(crate) const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
pub(crate) const BKPBLOCK_SAME_REL: u8 = 0x80;
pub(crate) const BKPIMAGE_HAS_HOLE: u8 = 0x01;

/// `MAX_FORKNUM`: main, free space map, visibility map, init.
pub const MAX_FORK: u8 = 3;
/// `VISIBILITYMAP_FORKNUM`.
const VM_FORK: u8 = 2;
/// `FSM_FORKNUM`: not WAL-logged block by block, so never limited (backed up whole anyway).
pub const FSM_FORK: u8 = 1;

/// A relation's storage: tablespace, database and relfilenode OIDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelFileLocator {
    /// `spcOid`.
    pub spc: u32,
    /// `dbOid`.
    pub db: u32,
    /// `relNumber`.
    pub rel: u32,
}

/// One thing a record does to relation storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelChange {
    /// Block `block` of fork `fork` of `rel` is written (or its image logged).
    Block {
        /// The relation.
        rel: RelFileLocator,
        /// The fork number (0 to 3).
        fork: u8,
        /// The block number.
        block: u32,
    },
    /// Fork `fork` of `rel` is created or truncated: blocks from `limit` on are new.
    Limit {
        /// The relation.
        rel: RelFileLocator,
        /// The fork number.
        fork: u8,
        /// The first block that does not survive.
        limit: u32,
    },
    /// Every relation of database `db` in tablespace `spc` is created or dropped as a whole
    /// (a database copied from a template, moved or dropped).
    Database {
        /// The tablespace OID.
        spc: u32,
        /// The database OID.
        db: u32,
    },
    /// The record's effect on relations cannot be decided: a map of its segment is unusable.
    Unknown(String),
}

impl WalRecord<'_> {
    /// Hands `out` every change this record makes to relation storage.
    pub fn relation_changes(&self, out: &mut impl FnMut(RelChange)) {
        let rmgr = self.rmid;
        if rmgr > RM_MAX_BUILTIN_ID {
            return out(RelChange::Unknown(format!(
                "record at {} of resource manager {rmgr}, which walvault does not know",
                self.lsn
            )));
        }
        let main_len = match walk_block_headers(&self.head, self.tot_len, self.major, &mut *out) {
            Ok(main_len) => main_len,
            Err(problem) => {
                return out(RelChange::Unknown(format!(
                    "record at {}: {problem}",
                    self.lsn
                )))
            }
        };
        let info = self.info & !XLR_INFO_MASK;
        let needs_main = match rmgr {
            RM_XACT_ID => self.info & XLOG_XACT_HAS_INFO != 0 && ends_xact(self.info),
            RM_SMGR_ID | RM_DBASE_ID => true,
            RM_XLOG_ID => info == XLOG_PARAMETER_CHANGE,
            _ => false,
        };
        if !needs_main {
            return;
        }
        if (self.main_data.len() as u64) < main_len.min(MAIN_NEEDED_MAX) {
            return out(RelChange::Unknown(format!(
                "record at {}: its main data ({main_len} bytes) was not kept whole",
                self.lsn
            )));
        }
        let mut main = Reader {
            bytes: &self.main_data,
            at: 0,
        };
        let verdict = match rmgr {
            RM_XACT_ID => dropped_relations(&mut main, out),
            RM_SMGR_ID => smgr(&mut main, info, out),
            RM_DBASE_ID => dbase(&mut main, info, self.major, out),
            _ => wal_level(&mut main),
        };
        if let Err(problem) = verdict {
            out(RelChange::Unknown(format!(
                "record at {} (resource manager {rmgr}, info {:#04x}): {problem}",
                self.lsn, self.info
            )));
        }
    }
}

/// A record split between two segments, as the two summaries saw it: the start the first segment
/// held ([`crate::Pending`]) and the rest the next one held ([`crate::Continuation`]).
#[derive(Clone, Copy, Debug)]
pub struct SplitRecord<'a> {
    /// Where the record starts.
    pub lsn: crate::Lsn,
    /// Its bytes in the first segment.
    pub got: u64,
    /// Their first bytes (all of them when `got` is at most [`HEAD_KEPT`]).
    pub head: &'a [u8],
    /// The bytes left for the next segment (its first page's `xlp_rem_len`).
    pub rem_len: u64,
    /// The first bytes of those.
    pub first: &'a [u8],
    /// The last bytes of those, following `first` (some may be missing between them).
    pub last: &'a [u8],
    /// The server version that wrote it.
    pub major: PgMajor,
}

impl SplitRecord<'_> {
    /// Hands `out` every change the record makes to relation storage, as far as the two parts
    /// tell; [`RelChange::Unknown`] when they do not tell enough.
    pub fn relation_changes(&self, out: &mut impl FnMut(RelChange)) {
        let tot_len = self.got + self.rem_len;
        let mut parts: Vec<(u64, Vec<u8>)> = vec![(0, self.head.to_vec())];
        let first_at = self.got;
        let last_at = tot_len.saturating_sub(self.last.len() as u64);
        for (at, bytes) in [(first_at, self.first), (last_at, self.last)] {
            match parts.last_mut() {
                Some((start, kept)) if *start + kept.len() as u64 == at => {
                    kept.extend_from_slice(bytes)
                }
                _ => parts.push((at, bytes.to_vec())),
            }
        }
        let read = |from: u64, len: u64| -> Option<&[u8]> {
            parts.iter().find_map(|(start, bytes)| {
                let off = usize::try_from(from.checked_sub(*start)?).ok()?;
                bytes.get(off..off.checked_add(usize::try_from(len).ok()?)?)
            })
        };
        // As much of the record's start as both parts hold; decoding says if it is not enough.
        let head_len = tot_len.min(HEAD_KEPT) as usize;
        let head = &parts[0].1[..parts[0].1.len().min(head_len)];
        let Some(fixed) = head.first_chunk::<SIZE_OF_XLOG_RECORD>() else {
            return out(RelChange::Unknown(format!(
                "record at {} is too short",
                self.lsn
            )));
        };
        let main_len = walk_block_headers(head, tot_len, self.major, |_| {}).unwrap_or(0);
        let main = read(
            tot_len.saturating_sub(main_len),
            main_len.min(MAIN_NEEDED_MAX),
        )
        .unwrap_or(&[]);
        let record = WalRecord {
            lsn: self.lsn,
            rmid: fixed[17],
            info: fixed[16],
            xid: u32::from_le_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
            main_data: std::borrow::Cow::Borrowed(main),
            head: std::borrow::Cow::Borrowed(head),
            tot_len,
            major: self.major,
        };
        record.relation_changes(out);
    }
}

/// The most main data [`WalRecord::relation_changes`] ever needs: a commit dropping a few hundred
/// relations. A longer main data is kept only this far; a record needing more is unknown.
pub const MAIN_NEEDED_MAX: u64 = 16 * 1024;

fn ends_xact(info: u8) -> bool {
    // Commit, abort, commit prepared, abort prepared.
    matches!(info & XLOG_XACT_OPMASK, 0x00 | 0x20 | 0x30 | 0x40)
}

/// `ParseCommitRecord` / `ParseAbortRecord` up to the dropped relations (they share the order:
/// xinfo, dbinfo, subtransactions, relations): each dropped relation's forks get limit 0.
fn dropped_relations(main: &mut Reader, out: &mut impl FnMut(RelChange)) -> Result<(), String> {
    main.skip(8)?; // xact_time
    let xinfo = main.u32()?;
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        main.skip(8)?;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        let n = main.count()?;
        main.skip(n * 4)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        let n = main.count()?;
        for _ in 0..n {
            let rel = main.locator()?;
            for fork in (0..=MAX_FORK).filter(|f| *f != FSM_FORK) {
                out(RelChange::Limit {
                    rel,
                    fork,
                    limit: 0,
                });
            }
        }
    }
    Ok(())
}

/// `xl_smgr_create` { locator, fork } and `xl_smgr_truncate` { blkno, locator, flags }.
fn smgr(main: &mut Reader, info: u8, out: &mut impl FnMut(RelChange)) -> Result<(), String> {
    match info {
        XLOG_SMGR_CREATE => {
            let rel = main.locator()?;
            let fork = main.u32()?;
            let fork = u8::try_from(fork)
                .ok()
                .filter(|f| *f <= MAX_FORK)
                .ok_or_else(|| format!("fork number {fork}"))?;
            out(RelChange::Limit {
                rel,
                fork,
                limit: 0,
            });
        }
        XLOG_SMGR_TRUNCATE => {
            let limit = main.u32()?;
            let rel = main.locator()?;
            let flags = main.u32()?;
            if flags & SMGR_TRUNCATE_HEAP != 0 {
                out(RelChange::Limit {
                    rel,
                    fork: 0,
                    limit,
                });
            }
            // The summarizer computes the map page holding `limit`; every map page is as safe.
            if flags & SMGR_TRUNCATE_VM != 0 {
                out(RelChange::Limit {
                    rel,
                    fork: VM_FORK,
                    limit: 0,
                });
            }
        }
        other => return Err(format!("unknown storage manager record {other:#04x}")),
    }
    Ok(())
}

/// Database creation (either strategy; 13–14 have one, from a copied directory) and drop.
fn dbase(
    main: &mut Reader,
    info: u8,
    major: PgMajor,
    out: &mut impl FnMut(RelChange),
) -> Result<(), String> {
    let (create, drop): (&[u8], u8) = if major.number() >= 15 {
        (&[0x00, 0x10], 0x20)
    } else {
        (&[0x00], 0x10)
    };
    if create.contains(&info) {
        let db = main.u32()?;
        let spc = main.u32()?;
        out(RelChange::Database { spc, db });
    } else if info == drop {
        let db = main.u32()?;
        let n = main.count()?;
        for _ in 0..n {
            let spc = main.u32()?;
            out(RelChange::Database { spc, db });
        }
    } else {
        return Err(format!("unknown database record {info:#04x}"));
    }
    Ok(())
}

/// `xl_parameter_change`: with `wal_level = minimal` relations may change without WAL.
fn wal_level(main: &mut Reader) -> Result<(), String> {
    main.skip(20)?; // five ints before wal_level
    match main.u32()? {
        0 => Err("wal_level became minimal: later changes may bypass WAL".into()),
        _ => Ok(()),
    }
}

/// Walks the block headers after a record's fixed header, as `DecodeXLogRecord` does, handing
/// every block reference to `out`; returns the length of the main data (the record's tail).
/// `head` is the start of a record of `tot_len` bytes and holds all its block headers unless the
/// record is invalid.
pub(crate) fn walk_block_headers(
    head: &[u8],
    tot_len: u64,
    major: PgMajor,
    mut out: impl FnMut(RelChange),
) -> Result<u64, String> {
    let mut cursor = Reader {
        bytes: head,
        at: SIZE_OF_XLOG_RECORD,
    };
    let mut block_data = 0u64;
    let mut main = 0u64;
    let mut rel: Option<RelFileLocator> = None;
    while tot_len.saturating_sub(cursor.at as u64) > block_data {
        let block_id = cursor.u8()?;
        match block_id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main = u64::from(cursor.u8()?);
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main = u64::from(cursor.u32()?);
                break;
            }
            XLR_BLOCK_ID_ORIGIN => cursor.skip(2)?,
            XLR_BLOCK_ID_TOPLEVEL_XID => cursor.skip(4)?,
            id if id <= XLR_MAX_BLOCK_ID => {
                let fork_flags = cursor.u8()?;
                block_data += u64::from(cursor.u16()?);
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let image_len = cursor.u16()?;
                    let _hole_offset = cursor.u16()?;
                    let image_info = cursor.u8()?;
                    block_data += u64::from(image_len);
                    if image_info & BKPIMAGE_HAS_HOLE != 0 && image_is_compressed(image_info, major)
                    {
                        let _hole_length = cursor.u16()?;
                    }
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    rel = Some(cursor.locator()?);
                }
                let block = cursor.u32()?;
                let fork = fork_flags & BKPBLOCK_FORK_MASK;
                let rel = rel.ok_or("a block reference to the same relation comes first")?;
                if fork > MAX_FORK {
                    return Err(format!("fork number {fork} in a block reference"));
                }
                out(RelChange::Block { rel, fork, block });
            }
            other => return Err(format!("invalid block ID {other}")),
        }
    }
    let headers_end = cursor.at as u64;
    if headers_end + block_data + main != tot_len {
        return Err(format!(
            "block headers end at {headers_end}, block data is {block_data} bytes and main data \
             {main} bytes, but the record is {tot_len} bytes"
        ));
    }
    Ok(main)
}

/// `BKPIMAGE_IS_COMPRESSED`: one bit before PostgreSQL 15, one bit per
/// algorithm (pglz, lz4, zstd) since.
fn image_is_compressed(image_info: u8, major: PgMajor) -> bool {
    if major.number() < 15 {
        image_info & 0x02 != 0
    } else {
        image_info & (0x04 | 0x08 | 0x10) != 0
    }
}

/// The most a record's block headers take: 33 block references of at most 27 bytes, plus the
/// origin, top-level xid and main data headers (928 bytes), rounded up.
pub(crate) const HEAD_KEPT: u64 = 1024;

/// Reads little-endian fields from a record's kept bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn overrun(&self) -> String {
        format!(
            "block headers or main data run past the record's end or the {HEAD_KEPT} bytes \
             they may take, at offset {}",
            self.at
        )
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let chunk = self
            .bytes
            .get(self.at..)
            .and_then(|rest| rest.first_chunk::<N>())
            .ok_or_else(|| self.overrun())?;
        self.at += N;
        Ok(*chunk)
    }

    fn u8(&mut self) -> Result<u8, String> {
        self.take::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Result<u16, String> {
        self.take::<2>().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    /// A count of array members that follow, checked against what is left.
    fn count(&mut self) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n > self.bytes.len() {
            return Err(format!("a count of {n} past the data's end"));
        }
        Ok(n)
    }

    fn locator(&mut self) -> Result<RelFileLocator, String> {
        Ok(RelFileLocator {
            spc: self.u32()?,
            db: self.u32()?,
            rel: self.u32()?,
        })
    }

    fn skip(&mut self, n: usize) -> Result<(), String> {
        if self.bytes.len().saturating_sub(self.at) < n {
            return Err(self.overrun());
        }
        self.at += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lsn;
    use std::borrow::Cow;

    const LOC: [u8; 12] = [0x7f, 6, 0, 0, 5, 0, 0, 0, 0, 0x40, 0, 0]; // 1663/5/16384

    /// A commit that drops two relations and references one block with 300 bytes of data, as
    /// `XLogRecordAssemble` lays it out (the block reference is unusual on a commit, which makes
    /// the record exercise both decoders).
    fn commit_record() -> Vec<u8> {
        let mut main = 1_000i64.to_le_bytes().to_vec();
        let xinfo =
            XACT_XINFO_HAS_DBINFO | XACT_XINFO_HAS_SUBXACTS | XACT_XINFO_HAS_RELFILELOCATORS;
        main.extend_from_slice(&xinfo.to_le_bytes());
        main.extend_from_slice(&[5, 0, 0, 0, 0x7f, 6, 0, 0]); // dbinfo
        main.extend_from_slice(&2u32.to_le_bytes());
        main.extend_from_slice(&[1; 8]); // two subxacts
        main.extend_from_slice(&2u32.to_le_bytes());
        main.extend_from_slice(&LOC);
        main.extend_from_slice(&[0x7f, 6, 0, 0, 5, 0, 0, 0, 1, 0x40, 0, 0]);
        let mut rec = vec![0u8; SIZE_OF_XLOG_RECORD];
        rec.extend_from_slice(&[0, 0x20]); // block 0, main fork, has data
        rec.extend_from_slice(&300u16.to_le_bytes());
        rec.extend_from_slice(&LOC);
        rec.extend_from_slice(&7u32.to_le_bytes());
        rec.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, main.len() as u8]);
        rec.extend_from_slice(&[0xAB; 300]);
        rec.extend_from_slice(&main);
        let len = rec.len() as u32;
        rec[0..4].copy_from_slice(&len.to_le_bytes());
        rec[16] = XLOG_XACT_HAS_INFO; // commit
        rec[17] = RM_XACT_ID;
        rec
    }

    fn changes_of(record: &WalRecord<'_>) -> Vec<RelChange> {
        let mut out = Vec::new();
        record.relation_changes(&mut |c| out.push(c));
        out
    }

    #[test]
    fn a_record_split_anywhere_gives_the_changes_of_the_whole() {
        let rec = commit_record();
        let main_len = rec.len() - SIZE_OF_XLOG_RECORD - 2 - 2 - 12 - 4 - 2 - 300;
        let whole = WalRecord {
            lsn: Lsn(0x100),
            rmid: RM_XACT_ID,
            info: XLOG_XACT_HAS_INFO,
            xid: 0,
            main_data: Cow::Borrowed(&rec[rec.len() - main_len..]),
            head: Cow::Borrowed(&rec[..]),
            tot_len: rec.len() as u64,
            major: PgMajor::V15,
        };
        let expected = changes_of(&whole);
        let rel = RelFileLocator {
            spc: 1663,
            db: 5,
            rel: 16384,
        };
        assert_eq!(
            expected[0],
            RelChange::Block {
                rel,
                fork: 0,
                block: 7
            }
        );
        // Both dropped relations, every fork but the free space map.
        assert_eq!(expected.len(), 1 + 2 * 3, "{expected:?}");
        assert!(expected.contains(&RelChange::Limit {
            rel: RelFileLocator { rel: 16385, ..rel },
            fork: 2,
            limit: 0
        }));
        for got in [1, 4, 23, 24, 30, 60, 200, rec.len() - 1] {
            let rest = &rec[got..];
            let split = SplitRecord {
                lsn: Lsn(0x100),
                got: got as u64,
                head: &rec[..got.min(HEAD_KEPT as usize)],
                rem_len: rest.len() as u64,
                first: &rest[..rest.len().min(30)],
                last: &rest[rest.len().saturating_sub(100)..],
                major: PgMajor::V15,
            };
            let mut found = Vec::new();
            split.relation_changes(&mut |c| found.push(c));
            let headers_end = SIZE_OF_XLOG_RECORD + 2 + 2 + 12 + 4 + 2;
            if got + 30 < headers_end && rest.len() > 30 + 100 {
                // The block header fell in the bytes neither part kept.
                assert!(
                    matches!(found[..], [RelChange::Unknown(_)]),
                    "split at {got}: {found:?}"
                );
            } else {
                assert_eq!(found, expected, "split at {got}");
            }
        }
    }

    #[test]
    fn storage_and_database_records_by_major() {
        let record = |rmid: u8, info: u8, main: &[u8], major: PgMajor| {
            let mut rec = vec![0u8; SIZE_OF_XLOG_RECORD];
            rec.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, main.len() as u8]);
            rec.extend_from_slice(main);
            let tot_len = rec.len() as u64;
            changes_of(&WalRecord {
                lsn: Lsn(0x100),
                rmid,
                info,
                xid: 0,
                main_data: Cow::Owned(main.to_vec()),
                head: Cow::Owned(rec),
                tot_len,
                major,
            })
        };
        let rel = RelFileLocator {
            spc: 1663,
            db: 5,
            rel: 16384,
        };
        let mut truncate = 10u32.to_le_bytes().to_vec();
        truncate.extend_from_slice(&LOC);
        truncate.extend_from_slice(&(SMGR_TRUNCATE_HEAP | SMGR_TRUNCATE_VM).to_le_bytes());
        assert_eq!(
            record(RM_SMGR_ID, XLOG_SMGR_TRUNCATE, &truncate, PgMajor::V13),
            [
                RelChange::Limit {
                    rel,
                    fork: 0,
                    limit: 10
                },
                RelChange::Limit {
                    rel,
                    fork: 2,
                    limit: 0
                }
            ]
        );
        // 0x10 creates a database (WAL_LOG strategy) from 15 on, and drops one before.
        let create = [9, 0, 0, 0, 0x7f, 6, 0, 0];
        let drop = [9, 0, 0, 0, 1, 0, 0, 0, 0x7f, 6, 0, 0];
        let db = RelChange::Database { spc: 1663, db: 9 };
        assert_eq!(
            record(RM_DBASE_ID, 0x10, &create, PgMajor::V15),
            std::slice::from_ref(&db)
        );
        assert_eq!(
            record(RM_DBASE_ID, 0x10, &drop, PgMajor::V14),
            std::slice::from_ref(&db)
        );
        assert_eq!(record(RM_DBASE_ID, 0x20, &drop, PgMajor::V17), [db]);
        assert!(matches!(
            record(RM_DBASE_ID, 0x20, &drop, PgMajor::V13)[..],
            [RelChange::Unknown(_)]
        ));
        assert!(matches!(
            record(130, 0, &[], PgMajor::V16)[..],
            [RelChange::Unknown(_)]
        ));
    }
}
