//! WAL records inside one segment: where each starts, its resource manager,
//! its info bits and its main data; and the two kinds of record recovery
//! targets are expressed in, commit/abort times and named restore points.
//!
//! Understands `XLogRecord` and the block-header encoding of `xlogrecord.h`
//! (`DecodeXLogRecord` in `xlogreader.c`) on a little-endian 64-bit server,
//! page headers with `XLP_FIRST_IS_CONTRECORD`, records spanning pages,
//! MAXALIGN(8) record starts, and the two ends of a segment's useful WAL: a
//! zero `xl_tot_len` (the rest of the segment was never written) and
//! `XLOG_SWITCH` (the rest is padding). Used by wal-push to summarise each
//! segment's commit times and restore points, which the recovery planner
//! reads to decide whether a target is reachable.
//!
//! Records are not CRC-checked: the summary is advisory, and the archived
//! segment itself is what PostgreSQL replays and verifies. A record whose
//! `xl_prev` does not point at the previous record, or a page whose address
//! is not where it sits, ends the walk, because that is how stale bytes of a
//! recycled segment look.

use std::borrow::Cow;

use crate::error::WalError;
use crate::lsn::Lsn;
use crate::page::{short_page_header, LongPageHeader, PgMajor};

/// `SizeOfXLogRecord`: the fixed record header.
pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// `RM_XLOG_ID`.
pub const RM_XLOG_ID: u8 = 0;
/// `RM_XACT_ID`.
pub const RM_XACT_ID: u8 = 1;
/// `XLOG_SWITCH`: the rest of the segment is unused.
pub const XLOG_SWITCH: u8 = 0x40;
/// `XLOG_RESTORE_POINT`, written by `pg_create_restore_point()`.
pub const XLOG_RESTORE_POINT: u8 = 0x70;
/// `XLR_INFO_MASK`: the low bits of `xl_info` belong to the WAL machinery,
/// the high bits to the resource manager.
const XLR_INFO_MASK: u8 = 0x0F;
/// `XLOG_XACT_OPMASK`: which transaction-manager operation a record is.
const XLOG_XACT_OPMASK: u8 = 0x70;

const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const XLR_MAX_BLOCK_ID: u8 = 32;

const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;

/// `sizeof(RelFileLocator)`: three OIDs.
const SIZE_OF_REL_FILE_LOCATOR: usize = 12;
/// `MAXFNAMELEN`: the fixed size of a restore point's name field.
const RESTORE_POINT_NAME_LEN: usize = 64;

/// Microseconds between the Unix epoch and PostgreSQL's, 2000-01-01 UTC.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800 * 1_000_000;

const MAXALIGN: u64 = 8;

fn max_align(n: u64) -> u64 {
    n.div_ceil(MAXALIGN) * MAXALIGN
}

/// A `TimestampTz` as WAL stores it: microseconds since 2000-01-01 UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds since the Unix epoch, saturating at the ends of `i64`.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_MICROS)
    }

    /// The timestamp for a count of microseconds since the Unix epoch.
    pub fn from_unix_micros(micros: i64) -> PgTimestamp {
        PgTimestamp(micros.saturating_sub(PG_EPOCH_UNIX_MICROS))
    }
}

/// One decoded WAL record: enough to classify it, not to redo it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WalRecord<'a> {
    /// Where the record starts.
    pub lsn: Lsn,
    /// `xl_rmid`: the resource manager.
    pub rmid: u8,
    /// `xl_info`, all eight bits.
    pub info: u8,
    /// `xl_xid`.
    pub xid: u32,
    /// The record's main data; borrowed unless the record spans pages.
    pub main_data: Cow<'a, [u8]>,
}

/// What a transaction-manager record ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum XactEnd {
    /// `XLOG_XACT_COMMIT`.
    Commit,
    /// `XLOG_XACT_ABORT`.
    Abort,
    /// `XLOG_XACT_COMMIT_PREPARED`.
    CommitPrepared,
    /// `XLOG_XACT_ABORT_PREPARED`.
    AbortPrepared,
}

/// A record a recovery target can stop at.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum TargetEvent {
    /// A transaction ended; a time target is checked against `time`.
    XactEnd {
        /// Which kind of end.
        kind: XactEnd,
        /// `xact_time`.
        time: PgTimestamp,
        /// The record's `xl_xid`.
        xid: u32,
    },
    /// `pg_create_restore_point(name)`.
    RestorePoint {
        /// `rp_time`.
        time: PgTimestamp,
        /// `rp_name`, up to its NUL.
        name: String,
    },
}

impl WalRecord<'_> {
    /// Classifies the record as a commit, abort or restore point, if it is one.
    pub fn target_event(&self) -> Option<TargetEvent> {
        let time = self
            .main_data
            .first_chunk::<8>()
            .map(|b| PgTimestamp(i64::from_le_bytes(*b)))?;
        match self.rmid {
            RM_XACT_ID => {
                let kind = match self.info & XLOG_XACT_OPMASK {
                    0x00 => XactEnd::Commit,
                    0x20 => XactEnd::Abort,
                    0x30 => XactEnd::CommitPrepared,
                    0x40 => XactEnd::AbortPrepared,
                    _ => return None,
                };
                Some(TargetEvent::XactEnd {
                    kind,
                    time,
                    xid: self.xid,
                })
            }
            RM_XLOG_ID if self.info & !XLR_INFO_MASK == XLOG_RESTORE_POINT => {
                let field = self.main_data.get(8..)?;
                let field = &field[..field.len().min(RESTORE_POINT_NAME_LEN)];
                let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
                Some(TargetEvent::RestorePoint {
                    time,
                    name: String::from_utf8_lossy(&field[..end]).into_owned(),
                })
            }
            _ => None,
        }
    }

    fn is_switch(&self) -> bool {
        self.rmid == RM_XLOG_ID && self.info & !XLR_INFO_MASK == XLOG_SWITCH
    }
}

/// Walks the records that start in one segment (or a `.partial` prefix of
/// one). Records continued from the previous segment are skipped, and so is
/// a last record that continues into the next: the summary loses at most
/// one commit per segment boundary, which only makes the recorded window
/// slightly more conservative.
pub struct RecordReader<'a> {
    seg: &'a [u8],
    start: Lsn,
    block_size: u64,
    major: PgMajor,
    /// Offset in `seg` of the next record, or `None` once the walk is over.
    pos: Option<u64>,
    prev: Option<Lsn>,
}

impl<'a> RecordReader<'a> {
    /// Prepares to walk `seg`, the segment starting at `start`, which must
    /// begin with its long header. A segment whose header was written for
    /// another address (a recycled file nothing was written to yet) yields
    /// no records.
    pub fn new(seg: &'a [u8], start: Lsn) -> Result<RecordReader<'a>, WalError> {
        let header = LongPageHeader::parse(seg)?;
        let mut reader = RecordReader {
            seg,
            start,
            block_size: u64::from(header.block_size),
            major: header.major,
            pos: None,
            prev: None,
        };
        reader.pos = reader.first_record(header.rem_len);
        Ok(reader)
    }

    /// Where the first record starting in this segment is, past any
    /// continuation of a record from the previous segment, which may cover
    /// whole pages.
    fn first_record(&self, first_rem_len: u32) -> Option<u64> {
        let mut page = 0u64;
        let mut rem = u64::from(first_rem_len);
        loop {
            let header_size = self.page_header_size(page)?;
            let data_start = page + header_size;
            if rem == 0 {
                return Some(data_start);
            }
            let room = self.block_size - header_size;
            if rem <= room {
                return Some(page + max_align(header_size + rem));
            }
            page += self.block_size;
            // The next page's own header repeats the remaining length.
            rem = u64::from(self.page_header(page)?.rem_len);
        }
    }

    fn page_header(&self, page: u64) -> Option<crate::page::ShortPageHeader> {
        let bytes = self.seg.get(usize::try_from(page).ok()?..)?;
        let header = short_page_header(bytes).ok()?;
        // A page written for another position is stale recycled data.
        (header.pageaddr.0 == self.start.0.checked_add(page)?).then_some(header)
    }

    fn page_header_size(&self, page: u64) -> Option<u64> {
        self.page_header(page).map(|h| h.header_size() as u64)
    }

    /// Copies `len` bytes of record starting at `pos`, skipping the page
    /// headers in between. Returns the bytes and the offset just past them,
    /// or `None` if they run past the end of the buffer or into stale pages.
    fn gather(&self, pos: u64, len: u64) -> Option<(Cow<'a, [u8]>, u64)> {
        let page_end = (pos / self.block_size + 1) * self.block_size;
        let seg_len = self.seg.len() as u64;
        if pos + len <= page_end {
            let end = pos + len;
            if end > seg_len {
                return None;
            }
            let bytes = self
                .seg
                .get(usize::try_from(pos).ok()?..usize::try_from(end).ok()?)?;
            return Some((Cow::Borrowed(bytes), end));
        }
        let mut out = Vec::with_capacity(usize::try_from(len).ok()?);
        let mut at = pos;
        let mut page_end = page_end;
        while (out.len() as u64) < len {
            if at == page_end {
                let header = self.page_header(at)?;
                at += header.header_size() as u64;
                page_end += self.block_size;
            }
            let want = (len - out.len() as u64).min(page_end - at);
            let bytes = self
                .seg
                .get(usize::try_from(at).ok()?..usize::try_from(at + want).ok()?)?;
            out.extend_from_slice(bytes);
            at += want;
        }
        Some((Cow::Owned(out), at))
    }

    fn read_record(&mut self, pos: u64) -> Result<Option<(WalRecord<'a>, u64)>, WalError> {
        // A record never starts in a page's header: move past it if `pos`
        // is exactly at a page boundary.
        let pos = if pos.is_multiple_of(self.block_size) {
            match self.page_header_size(pos) {
                Some(size) => pos + size,
                None => return Ok(None),
            }
        } else {
            pos
        };
        let lsn = Lsn(self.start.0 + pos);
        // xl_tot_len is always on the record's first page (MAXALIGN keeps
        // at least 8 bytes before the page end).
        let Some((len_bytes, _)) = self.gather(pos, 4) else {
            return Ok(None);
        };
        let tot_len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if tot_len == 0 {
            return Ok(None);
        }
        if (tot_len as usize) < SIZE_OF_XLOG_RECORD {
            return Err(bad(
                lsn,
                format!("xl_tot_len {tot_len} is shorter than a record header"),
            ));
        }
        let Some((record, end)) = self.gather(pos, u64::from(tot_len)) else {
            // Runs past the buffer: continues in the next segment, or the
            // partial file stops here.
            return Ok(None);
        };
        let xid = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
        let prev = Lsn(u64::from_le_bytes([
            record[8], record[9], record[10], record[11], record[12], record[13], record[14],
            record[15],
        ]));
        if self.prev.is_some_and(|p| p != prev) {
            return Ok(None);
        }
        let info = record[16];
        let rmid = record[17];
        let main_len = main_data_len(&record, self.major).map_err(|problem| bad(lsn, problem))?;
        let main_data = match record {
            Cow::Borrowed(b) => Cow::Borrowed(&b[b.len() - main_len..]),
            Cow::Owned(v) => Cow::Owned(v[v.len() - main_len..].to_vec()),
        };
        self.prev = Some(lsn);
        Ok(Some((
            WalRecord {
                lsn,
                rmid,
                info,
                xid,
                main_data,
            },
            max_align(end),
        )))
    }
}

fn bad(lsn: Lsn, problem: String) -> WalError {
    WalError::BadRecord { lsn, problem }
}

impl<'a> Iterator for RecordReader<'a> {
    type Item = Result<WalRecord<'a>, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        let pos = self.pos.take()?;
        match self.read_record(pos) {
            Ok(Some((record, next))) => {
                if !record.is_switch() {
                    self.pos = Some(next);
                }
                Some(Ok(record))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// Walks the block headers after the fixed header (as `DecodeXLogRecord`
/// does) to find the length of the main data, which is the record's tail.
fn main_data_len(record: &[u8], major: PgMajor) -> Result<usize, String> {
    let mut cursor = Cursor {
        bytes: record,
        at: SIZE_OF_XLOG_RECORD,
    };
    let mut block_data = 0usize;
    let mut main = 0usize;
    while record.len() - cursor.at > block_data {
        let block_id = cursor.u8()?;
        match block_id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main = usize::from(cursor.u8()?);
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main = usize::try_from(cursor.u32()?).map_err(|e| e.to_string())?;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => cursor.skip(2)?,
            XLR_BLOCK_ID_TOPLEVEL_XID => cursor.skip(4)?,
            id if id <= XLR_MAX_BLOCK_ID => {
                let fork_flags = cursor.u8()?;
                block_data += usize::from(cursor.u16()?);
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let image_len = cursor.u16()?;
                    let _hole_offset = cursor.u16()?;
                    let image_info = cursor.u8()?;
                    block_data += usize::from(image_len);
                    if image_info & BKPIMAGE_HAS_HOLE != 0 && image_is_compressed(image_info, major)
                    {
                        let _hole_length = cursor.u16()?;
                    }
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    cursor.skip(SIZE_OF_REL_FILE_LOCATOR)?;
                }
                // BlockNumber.
                cursor.skip(4)?;
            }
            other => return Err(format!("invalid block ID {other}")),
        }
    }
    let headers_end = cursor.at;
    if headers_end + block_data + main != record.len() {
        return Err(format!(
            "block headers end at {headers_end}, block data is {block_data} bytes and main data \
             {main} bytes, but the record is {} bytes",
            record.len()
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

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let chunk = self
            .bytes
            .get(self.at..)
            .and_then(|rest| rest.first_chunk::<N>())
            .ok_or_else(|| {
                format!(
                    "block headers run past the record's end at offset {}",
                    self.at
                )
            })?;
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

    fn skip(&mut self, n: usize) -> Result<(), String> {
        if self.bytes.len() - self.at < n {
            return Err(format!(
                "block headers run past the record's end at offset {}",
                self.at
            ));
        }
        self.at += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{
        SIZE_OF_XLOG_LONG_PHD, SIZE_OF_XLOG_SHORT_PHD, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER,
    };

    const BLCKSZ: usize = 8192;
    const SEG: usize = 1024 * 1024;
    const START: u64 = 0x300_0000;

    /// Lays records out in a segment the way `XLogInsert` does: MAXALIGNed
    /// starts, page headers in between, contrecord flags and lengths.
    struct SegWriter {
        buf: Vec<u8>,
        at: usize,
        prev: u64,
    }

    impl SegWriter {
        fn new(first_rem_len: u32) -> SegWriter {
            let mut w = SegWriter {
                buf: vec![0; SEG],
                at: 0,
                prev: 0,
            };
            w.page_header(0, first_rem_len);
            w.at = SIZE_OF_XLOG_LONG_PHD;
            w
        }

        fn page_header(&mut self, page: usize, rem_len: u32) {
            let mut info = if rem_len > 0 {
                XLP_FIRST_IS_CONTRECORD
            } else {
                0
            };
            if page == 0 {
                info |= XLP_LONG_HEADER;
            }
            let h = &mut self.buf[page..];
            h[0..2].copy_from_slice(&PgMajor::V15.magic().to_le_bytes());
            h[2..4].copy_from_slice(&info.to_le_bytes());
            h[4..8].copy_from_slice(&1u32.to_le_bytes());
            h[8..16].copy_from_slice(&(START + page as u64).to_le_bytes());
            h[16..20].copy_from_slice(&rem_len.to_le_bytes());
            if page == 0 {
                h[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
                h[36..40].copy_from_slice(&(BLCKSZ as u32).to_le_bytes());
            }
        }

        /// Writes raw bytes from the current position, continuing on new pages.
        fn write_spanning(&mut self, bytes: &[u8]) {
            let mut left = bytes;
            while !left.is_empty() {
                if self.at.is_multiple_of(BLCKSZ) {
                    self.page_header(self.at, left.len() as u32);
                    self.at += SIZE_OF_XLOG_SHORT_PHD;
                }
                let room = BLCKSZ - self.at % BLCKSZ;
                let n = room.min(left.len());
                self.buf[self.at..self.at + n].copy_from_slice(&left[..n]);
                self.at += n;
                left = &left[n..];
            }
            self.at = self.at.div_ceil(8) * 8;
        }

        /// Appends a record: block headers, the main data header, block
        /// data, main data, in the order `XLogRecordAssemble` emits them.
        fn record(
            &mut self,
            rmid: u8,
            info: u8,
            xid: u32,
            blocks: &(Vec<u8>, Vec<u8>),
            main: &[u8],
        ) -> u64 {
            if self.at.is_multiple_of(BLCKSZ) {
                self.page_header(self.at, 0);
                self.at += SIZE_OF_XLOG_SHORT_PHD;
            }
            let lsn = START + self.at as u64;
            let mut rec = vec![0u8; SIZE_OF_XLOG_RECORD];
            rec.extend_from_slice(&blocks.0);
            if main.len() < 256 {
                rec.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, main.len() as u8]);
            } else {
                rec.push(XLR_BLOCK_ID_DATA_LONG);
                rec.extend_from_slice(&(main.len() as u32).to_le_bytes());
            }
            rec.extend_from_slice(&blocks.1);
            rec.extend_from_slice(main);
            let len = rec.len() as u32;
            rec[0..4].copy_from_slice(&len.to_le_bytes());
            rec[4..8].copy_from_slice(&xid.to_le_bytes());
            rec[8..16].copy_from_slice(&self.prev.to_le_bytes());
            rec[16] = info;
            rec[17] = rmid;
            self.prev = lsn;
            self.write_spanning(&rec);
            lsn
        }
    }

    fn commit(time: i64) -> Vec<u8> {
        let mut main = time.to_le_bytes().to_vec();
        main.extend_from_slice(&[0; 4]);
        main
    }

    /// A block reference with data, a full-page image with a hole, and a
    /// relation locator, followed by its data: exercises every length the
    /// decoder adds up.
    fn block_with_image(data_len: u16, image_len: u16) -> (Vec<u8>, Vec<u8>) {
        let mut b = vec![0u8, 0x20 | BKPBLOCK_HAS_IMAGE];
        b.extend_from_slice(&data_len.to_le_bytes());
        b.extend_from_slice(&image_len.to_le_bytes());
        b.extend_from_slice(&100u16.to_le_bytes());
        b.push(BKPIMAGE_HAS_HOLE | 0x04); // pglz-compressed in 15: hole length follows
        b.extend_from_slice(&50u16.to_le_bytes());
        b.extend_from_slice(&[7; SIZE_OF_REL_FILE_LOCATOR]);
        b.extend_from_slice(&9u32.to_le_bytes());
        // Second block on the same relation: no locator.
        b.extend_from_slice(&[1u8, 0x20 | BKPBLOCK_SAME_REL]);
        b.extend_from_slice(&3u16.to_le_bytes());
        b.extend_from_slice(&10u32.to_le_bytes());
        b.extend_from_slice(&[
            XLR_BLOCK_ID_ORIGIN,
            1,
            0,
            XLR_BLOCK_ID_TOPLEVEL_XID,
            5,
            0,
            0,
            0,
        ]);
        let data = vec![0xAB; usize::from(image_len) + usize::from(data_len) + 3];
        (b, data)
    }

    const NO_BLOCKS: &(Vec<u8>, Vec<u8>) = &(Vec::new(), Vec::new());

    fn events(seg: &[u8]) -> Vec<(Lsn, TargetEvent)> {
        RecordReader::new(seg, Lsn(START))
            .unwrap()
            .map(|r| r.unwrap())
            .filter_map(|r| r.target_event().map(|e| (r.lsn, e)))
            .collect()
    }

    #[test]
    fn finds_commits_and_restore_points_across_pages() {
        let mut w = SegWriter::new(0);
        let c1 = w.record(RM_XACT_ID, 0x00, 700, NO_BLOCKS, &commit(1_000));
        let big = w.record(10, 0x00, 701, &block_with_image(9_000, 6_000), &[1; 300]);
        let a1 = w.record(RM_XACT_ID, 0x20, 701, NO_BLOCKS, &commit(2_000));
        let mut rp = 3_000i64.to_le_bytes().to_vec();
        let mut name = [0u8; 64];
        name[..6].copy_from_slice(b"before");
        rp.extend_from_slice(&name);
        let r1 = w.record(RM_XLOG_ID, XLOG_RESTORE_POINT, 0, NO_BLOCKS, &rp);
        // Fill up to just before a page end so the next header is split.
        while BLCKSZ - w.at % BLCKSZ > 16 {
            w.record(10, 0, 0, NO_BLOCKS, &[0; 8]);
        }
        let c2 = w.record(RM_XACT_ID, 0x30 | 0x80, 702, NO_BLOCKS, &commit(4_000));
        assert!(
            big < a1 && (a1 - START) as usize > BLCKSZ,
            "big record spans pages"
        );

        let found = events(&w.buf);
        assert_eq!(
            found,
            vec![
                (
                    Lsn(c1),
                    TargetEvent::XactEnd {
                        kind: XactEnd::Commit,
                        time: PgTimestamp(1_000),
                        xid: 700
                    }
                ),
                (
                    Lsn(a1),
                    TargetEvent::XactEnd {
                        kind: XactEnd::Abort,
                        time: PgTimestamp(2_000),
                        xid: 701
                    }
                ),
                (
                    Lsn(r1),
                    TargetEvent::RestorePoint {
                        time: PgTimestamp(3_000),
                        name: "before".into()
                    }
                ),
                (
                    Lsn(c2),
                    TargetEvent::XactEnd {
                        kind: XactEnd::CommitPrepared,
                        time: PgTimestamp(4_000),
                        xid: 702
                    }
                ),
            ]
        );
    }

    #[test]
    fn skips_continuation_from_previous_segment_and_stops_at_switch() {
        // The first 20000 bytes belong to a record from the previous segment.
        let mut w = SegWriter::new(20_000);
        w.write_spanning(&[0xCD; 20_000]);
        let c1 = w.record(RM_XACT_ID, 0, 5, NO_BLOCKS, &commit(42));
        w.record(RM_XLOG_ID, XLOG_SWITCH, 0, NO_BLOCKS, &[]);
        w.record(RM_XACT_ID, 0, 6, NO_BLOCKS, &commit(43));
        let found = events(&w.buf);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, Lsn(c1));
    }

    #[test]
    fn stops_at_stale_bytes_and_truncated_records() {
        let mut w = SegWriter::new(0);
        w.record(RM_XACT_ID, 0, 5, NO_BLOCKS, &commit(42));
        let stale = w.at;
        w.record(RM_XACT_ID, 0, 6, NO_BLOCKS, &commit(43));
        // A record whose xl_prev is wrong is left over from before recycling.
        w.buf[stale + 8..stale + 16].copy_from_slice(&1u64.to_le_bytes());
        assert_eq!(events(&w.buf).len(), 1);
        // A prefix that cuts a record short ends the walk without an error.
        assert_eq!(events(&w.buf[..stale + 10]).len(), 1);
        // A recycled segment still carries its old address.
        let recycled = RecordReader::new(&w.buf, Lsn(START + SEG as u64)).unwrap();
        assert_eq!(recycled.count(), 0);
    }

    #[test]
    fn timestamps_convert_between_epochs() {
        assert_eq!(PgTimestamp(0).unix_micros(), 946_684_800_000_000);
        assert_eq!(
            PgTimestamp::from_unix_micros(946_684_800_000_001),
            PgTimestamp(1)
        );
    }
}
