//! WAL records inside one segment: where each starts, its resource manager,
//! its info bits and its main data; and the two kinds of record recovery
//! targets are expressed in, commit/abort times and named restore points.
//!
//! Understands `XLogRecord` and the block-header encoding of `xlogrecord.h`
//! (`DecodeXLogRecord` in `xlogreader.c`) on a little-endian 64-bit server,
//! page headers with `XLP_FIRST_IS_CONTRECORD`, records spanning pages,
//! MAXALIGN(8) record starts, and the two ends of a segment's useful WAL: a
//! zero `xl_tot_len` (the rest of the segment was never written) and
//! `XLOG_SWITCH` (the rest is padding). The scanner takes a segment in
//! pieces of any size as it streams past and keeps only a record's headers
//! and the start of its main data, so memory does not grow with segment or
//! record size. Used by wal-push and wal-receive to summarise each segment's
//! commit times and restore points while storing it, which the recovery
//! planner reads to decide whether a target is reachable.
//!
//! Records are not CRC-checked: the summary is advisory, and the archived
//! segment itself is what PostgreSQL replays and verifies. A record whose
//! `xl_prev` does not point at the previous record, or a page whose address
//! is not where it sits, ends the walk, because that is how stale bytes of a
//! recycled segment look.

use std::borrow::Cow;
use std::collections::VecDeque;

use crate::blockref::{walk_block_headers, HEAD_KEPT, MAIN_NEEDED_MAX, RM_DBASE_ID, RM_SMGR_ID};
use crate::error::WalError;
use crate::lsn::Lsn;
use crate::page::{short_page_header, LongPageHeader, PgMajor, SIZE_OF_XLOG_SHORT_PHD};

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
    /// The start of the record's main data, kept only for the resource managers whose main
    /// data [`WalRecord::target_event`] or [`WalRecord::relation_changes`] read (transactions,
    /// XLOG, storage manager, databases), and then at most [`MAIN_NEEDED_MAX`] bytes.
    pub main_data: Cow<'a, [u8]>,
    /// The record's first bytes, fixed header included: all of its block headers, up to
    /// [`HEAD_KEPT`] bytes.
    pub head: Cow<'a, [u8]>,
    /// `xl_tot_len`.
    pub tot_len: u64,
    /// The server version that wrote it (block image flags differ).
    pub major: PgMajor,
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

    /// The same record, no longer borrowing the scanner's buffer.
    pub fn into_owned(self) -> WalRecord<'static> {
        WalRecord {
            lsn: self.lsn,
            rmid: self.rmid,
            info: self.info,
            xid: self.xid,
            main_data: Cow::Owned(self.main_data.into_owned()),
            head: Cow::Owned(self.head.into_owned()),
            tot_len: self.tot_len,
            major: self.major,
        }
    }

    fn is_switch(&self) -> bool {
        self.rmid == RM_XLOG_ID && self.info & !XLR_INFO_MASK == XLOG_SWITCH
    }
}

/// The most of a record's main data the scanner keeps (for the resource managers whose main
/// data is read at all).
const MAIN_DATA_KEPT: u64 = MAIN_NEEDED_MAX;

/// Walks the records that start in one segment (or a `.partial` prefix of
/// one) as the segment's bytes arrive, in pieces of any size, so that a
/// caller streaming the segment elsewhere can scan it on the way without
/// holding it: the scanner keeps one page header and at most
/// [`HEAD_KEPT`] + [`MAIN_DATA_KEPT`] bytes of the record it is in.
///
/// Records continued from the previous segment are skipped, and so is a
/// last record that continues into the next: the summary loses at most one
/// commit per segment boundary, which only makes the recorded window
/// slightly more conservative. For the blocks such a record references, the
/// scanner keeps what it saw of either part ([`RecordScanner::pending`],
/// [`RecordScanner::continuation`]) so the two summaries can be joined.
pub struct RecordScanner {
    start: Lsn,
    block_size: u64,
    major: PgMajor,
    /// Bytes of the segment fed so far.
    offset: u64,
    page: PageHead,
    step: Step,
    prev: Option<Lsn>,
    /// The first bytes of the current record, up to [`HEAD_KEPT`].
    head: Vec<u8>,
    /// The first bytes of the current record's main data, up to [`MAIN_DATA_KEPT`].
    main: Vec<u8>,
    /// The record continued from the previous segment, as far as it was seen.
    cont: Option<Continuation>,
}

/// The part of a record begun in the previous segment that lies in this one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Continuation {
    /// `xlp_rem_len` of the segment's first page: the bytes of the record left.
    pub rem_len: u64,
    /// How many of them this segment held (page headers excluded).
    pub seen: u64,
    /// Their first bytes, up to [`CONT_FIRST_KEPT`].
    pub first: Vec<u8>,
    /// Their last bytes, up to [`CONT_LAST_KEPT`] (fewer once `seen` reaches `rem_len`:
    /// the bytes in `first` are not repeated).
    pub last: Vec<u8>,
}

/// The first bytes of a continuation kept: the rest of any record's block headers.
pub const CONT_FIRST_KEPT: usize = HEAD_KEPT as usize;
/// The last bytes of a continuation kept: the main data of a record that needs it.
pub const CONT_LAST_KEPT: usize = 2048;

impl Continuation {
    fn take(&mut self, bytes: &[u8]) {
        let n = clamp(self.rem_len - self.seen, bytes.len());
        let bytes = &bytes[..n];
        self.seen += n as u64;
        let to_first = (CONT_FIRST_KEPT - self.first.len()).min(bytes.len());
        self.first.extend_from_slice(&bytes[..to_first]);
        self.last.extend_from_slice(&bytes[to_first..]);
        if self.last.len() > 2 * CONT_LAST_KEPT {
            self.last.drain(..self.last.len() - CONT_LAST_KEPT);
        }
    }

    /// Whether the whole rest of the record was in this segment.
    pub fn whole(&self) -> bool {
        self.seen == self.rem_len
    }

    /// The kept last bytes, trimmed to [`CONT_LAST_KEPT`].
    pub fn last(&self) -> &[u8] {
        &self.last[self.last.len().saturating_sub(CONT_LAST_KEPT)..]
    }
}

/// The start of a record that runs on into the next segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending<'a> {
    /// Where it starts.
    pub lsn: Lsn,
    /// Its bytes in this segment (page headers excluded).
    pub got: u64,
    /// Its first bytes, up to [`CONT_FIRST_KEPT`] (all of `got` when fewer).
    pub head: &'a [u8],
}

/// Where the scanner is in the header of the page it is in.
enum PageHead {
    /// Collecting the short header: `len` bytes of it are in `buf`.
    Reading {
        buf: [u8; SIZE_OF_XLOG_SHORT_PHD],
        len: usize,
    },
    /// Checked; the page's data starts at `data_start`.
    Read { data_start: u64 },
}

enum Step {
    /// Skipping a record continued from the previous segment; each page
    /// header says how much of it is left.
    Continuation,
    /// Skipping padding up to the offset where the next record starts.
    SkipTo(u64),
    /// Inside a record.
    Record(RecordProgress),
    /// The walk is over.
    Done,
}

struct RecordProgress {
    lsn: Lsn,
    /// Bytes of the record seen so far, page headers excluded.
    got: u64,
    /// `xl_tot_len`, once its 4 bytes are in.
    tot_len: Option<u64>,
    /// Where the kept main data starts and ends in the record, or why the
    /// block headers cannot be decoded; known once the head is in.
    main_range: Option<Result<(u64, u64), String>>,
}

impl RecordScanner {
    /// Prepares to scan the segment starting at `start` whose long header
    /// is `header`; feed it from the segment's first byte. A segment whose
    /// header was written for another address (a recycled file nothing was
    /// written to yet) yields no records.
    pub fn new(header: &LongPageHeader, start: Lsn) -> RecordScanner {
        RecordScanner {
            start,
            block_size: u64::from(header.block_size),
            major: header.std.major,
            offset: 0,
            page: PageHead::Reading {
                buf: [0; SIZE_OF_XLOG_SHORT_PHD],
                len: 0,
            },
            step: Step::Continuation,
            prev: None,
            head: Vec::new(),
            main: Vec::new(),
            cont: None,
        }
    }

    /// The record that was still going when the bytes fed so far ended.
    pub fn pending(&self) -> Option<Pending<'_>> {
        match &self.step {
            Step::Record(r) => Some(Pending {
                lsn: r.lsn,
                got: r.got,
                head: &self.head,
            }),
            _ => None,
        }
    }

    /// The part of a record from the previous segment that the bytes fed so far held.
    pub fn continuation(&self) -> Option<&Continuation> {
        self.cont.as_ref()
    }

    /// Whether the walk is over: more bytes would find no more records.
    pub fn is_done(&self) -> bool {
        matches!(self.step, Step::Done)
    }

    /// Takes the next bytes of the segment and hands `found` each record
    /// that ends in them, in order. A transaction-manager or XLOG record
    /// (one that could be a target) whose block headers cannot be decoded is
    /// handed over as an error and ends the walk; other records are stepped
    /// over by their length.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        found: &mut impl FnMut(Result<WalRecord<'_>, WalError>),
    ) {
        while !bytes.is_empty() && !self.is_done() {
            let in_page = self.offset % self.block_size;
            if in_page == 0 && matches!(self.page, PageHead::Read { .. }) {
                self.page = PageHead::Reading {
                    buf: [0; SIZE_OF_XLOG_SHORT_PHD],
                    len: 0,
                };
            }
            let taken = match &mut self.page {
                PageHead::Reading { buf, len } => {
                    let n = (SIZE_OF_XLOG_SHORT_PHD - *len).min(bytes.len());
                    buf[*len..*len + n].copy_from_slice(&bytes[..n]);
                    *len += n;
                    if *len == SIZE_OF_XLOG_SHORT_PHD {
                        let buf = *buf;
                        self.page_header(&buf);
                    }
                    n
                }
                PageHead::Read { data_start } if self.offset < *data_start => {
                    clamp(*data_start - self.offset, bytes.len())
                }
                PageHead::Read { .. } => {
                    let n = clamp(self.block_size - in_page, bytes.len());
                    self.data(&bytes[..n], found);
                    n
                }
            };
            self.offset += taken as u64;
            bytes = &bytes[taken..];
        }
    }

    /// Checks the header of the page the scanner is in and, while skipping
    /// a continuation, learns from it where the first record starts.
    fn page_header(&mut self, buf: &[u8]) {
        let page = self.offset - self.offset % self.block_size;
        let header = match short_page_header(buf) {
            // A page written for another position is stale recycled data.
            Ok(h) if Some(h.pageaddr.0) == self.start.0.checked_add(page) => h,
            _ => {
                self.step = Step::Done;
                return;
            }
        };
        let size = header.header_size() as u64;
        self.page = PageHead::Read {
            data_start: page + size,
        };
        if let Step::Continuation = self.step {
            let rem = u64::from(header.rem_len);
            if page == 0 && rem > 0 {
                self.cont = Some(Continuation {
                    rem_len: rem,
                    seen: 0,
                    first: Vec::new(),
                    last: Vec::new(),
                });
            }
            if rem == 0 {
                self.step = Step::SkipTo(page + size);
            } else if rem <= self.block_size - size {
                self.step = Step::SkipTo(page + max_align(size + rem));
            }
            // Otherwise the continuation covers this page's data too.
        }
    }

    /// Takes page data starting at the current offset.
    fn data(&mut self, mut bytes: &[u8], found: &mut impl FnMut(Result<WalRecord<'_>, WalError>)) {
        if let Some(cont) = self.cont.as_mut().filter(|c| !c.whole()) {
            cont.take(bytes);
        }
        let mut at = self.offset;
        while !bytes.is_empty() {
            let n = match &self.step {
                Step::Continuation | Step::Done => return,
                Step::SkipTo(next) if at < *next => clamp(*next - at, bytes.len()),
                Step::SkipTo(_) => match self.whole_plain_record(bytes, at, found) {
                    Some(n) => n,
                    None => {
                        // A record never starts in a page header, so one that
                        // would start at a page boundary starts after its header.
                        self.step = Step::Record(RecordProgress {
                            lsn: Lsn(self.start.0 + at),
                            got: 0,
                            tot_len: None,
                            main_range: None,
                        });
                        self.head.clear();
                        self.main.clear();
                        0
                    }
                },
                Step::Record(_) => self.record_bytes(bytes, at + bytes.len() as u64, found),
            };
            at += n as u64;
            bytes = &bytes[n..];
        }
    }

    /// The common case, taken in one step: a record that starts at `bytes`
    /// (segment offset `at`), lies wholly in it and cannot be a target, so
    /// only its fixed header matters. Returns its length, or `None` for the
    /// general path ([`RecordScanner::record_bytes`]), which gives the same
    /// result a piece at a time.
    fn whole_plain_record(
        &mut self,
        bytes: &[u8],
        at: u64,
        found: &mut impl FnMut(Result<WalRecord<'_>, WalError>),
    ) -> Option<usize> {
        let fixed = FixedHeader::parse(bytes.first_chunk()?);
        let tot_len = fixed.tot_len as usize;
        if tot_len < SIZE_OF_XLOG_RECORD || tot_len > bytes.len() || keeps_main(fixed.rmid) {
            return None;
        }
        let lsn = Lsn(self.start.0 + at);
        if !self.follows(lsn, &fixed) {
            // Left over from before the segment was recycled: the walk is over.
            self.step = Step::Done;
            return Some(tot_len);
        }
        let head = &bytes[..tot_len.min(HEAD_KEPT as usize)];
        found(Ok(fixed.record(lsn, head, &[], self.major)));
        self.step = Step::SkipTo(max_align(at + tot_len as u64));
        Some(tot_len)
    }

    /// Whether the record at `lsn` points back at the one before it, as a
    /// record of this segment does and one left from before the segment was
    /// recycled does not; if it does, it becomes the one before the next.
    fn follows(&mut self, lsn: Lsn, fixed: &FixedHeader) -> bool {
        if self.prev.is_some_and(|p| p != fixed.prev) {
            return false;
        }
        self.prev = Some(lsn);
        true
    }

    /// Takes the next bytes of the current record from `bytes` (which end
    /// at segment offset `end`); returns how many it took.
    fn record_bytes(
        &mut self,
        bytes: &[u8],
        end: u64,
        found: &mut impl FnMut(Result<WalRecord<'_>, WalError>),
    ) -> usize {
        let Step::Record(mut r) = std::mem::replace(&mut self.step, Step::Done) else {
            return 0;
        };
        // xl_tot_len comes first and is always on the record's first page
        // (MAXALIGN keeps at least 8 bytes before the page end); then the
        // head, whose block headers say where the main data is; then the rest.
        let head_len = self.head_len(&r);
        let upto = match r.tot_len {
            Some(tot_len) if r.got >= head_len => tot_len,
            _ => head_len,
        };
        let n = clamp(upto - r.got, bytes.len());
        let piece = &bytes[..n];
        if r.got < head_len {
            self.head.extend_from_slice(piece);
        }
        if let Some(Ok((from, to))) = r.main_range {
            self.keep_main(piece, r.got, from, to);
        }
        r.got += n as u64;
        let head_len = self.head_len(&r);
        let Some(tot_len) = r.tot_len else {
            if r.got < 4 {
                self.step = Step::Record(r);
                return n;
            }
            let tot_len =
                u32::from_le_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]);
            if tot_len == 0 {
                // The rest of the segment was never written.
                return n;
            }
            if (tot_len as usize) < SIZE_OF_XLOG_RECORD {
                found(Err(bad(
                    r.lsn,
                    format!("xl_tot_len {tot_len} is shorter than a record header"),
                )));
                return n;
            }
            r.tot_len = Some(u64::from(tot_len));
            self.step = Step::Record(r);
            return n;
        };
        if r.main_range.is_none() && r.got == head_len {
            let range = if self.head_keeps_main() {
                walk_block_headers(&self.head, tot_len, self.major, |_| {}).map(|main_len| {
                    let from = tot_len - main_len;
                    (from, from + main_len.min(MAIN_DATA_KEPT))
                })
            } else {
                Ok((tot_len, tot_len))
            };
            if let Ok((from, to)) = range {
                let head = std::mem::take(&mut self.head);
                self.keep_main(&head, 0, from, to);
                self.head = head;
            }
            r.main_range = Some(range);
        }
        if r.got < tot_len {
            self.step = Step::Record(r);
            return n;
        }
        self.end_record(r, end - (bytes.len() - n) as u64, found);
        n
    }

    /// How much of the current record's start the scanner keeps: its length
    /// first, then the fixed header, and then every block header (the blocks a
    /// record references are part of a segment's summary).
    fn head_len(&self, r: &RecordProgress) -> u64 {
        const FIXED: u64 = SIZE_OF_XLOG_RECORD as u64;
        match r.tot_len {
            None => 4,
            // A valid xl_tot_len is at least the fixed header.
            Some(_) if r.got < FIXED => FIXED,
            Some(tot_len) => tot_len.min(HEAD_KEPT),
        }
    }

    /// Appends to the kept main data what of `piece`, which starts at
    /// record offset `at`, lies in the record range `from..to`.
    fn keep_main(&mut self, piece: &[u8], at: u64, from: u64, to: u64) {
        let start = from.max(at);
        let stop = to.min(at + piece.len() as u64);
        if start < stop {
            self.main
                .extend_from_slice(&piece[(start - at) as usize..(stop - at) as usize]);
        }
    }

    /// Hands over the record that just ended at segment offset `end`.
    fn end_record(
        &mut self,
        r: RecordProgress,
        end: u64,
        found: &mut impl FnMut(Result<WalRecord<'_>, WalError>),
    ) {
        // The head holds at least the fixed header once a record can end.
        let Some(fixed) = self.head.first_chunk().map(FixedHeader::parse) else {
            return;
        };
        if !self.follows(r.lsn, &fixed) {
            return;
        }
        match r.main_range {
            Some(Ok(_)) => {}
            Some(Err(problem)) => return found(Err(bad(r.lsn, problem))),
            None => return,
        }
        let record = fixed.record(r.lsn, &self.head, &self.main, self.major);
        let switch = record.is_switch();
        found(Ok(record));
        if !switch {
            self.step = Step::SkipTo(max_align(end));
        }
    }

    /// Whether the main data of the record whose fixed header is in the head is kept.
    fn head_keeps_main(&self) -> bool {
        self.head
            .first_chunk()
            .map(FixedHeader::parse)
            .is_some_and(|fixed| keeps_main(fixed.rmid))
    }
}

/// The fields of `XLogRecord`, the fixed header every record starts with,
/// that the scanner uses.
struct FixedHeader {
    tot_len: u32,
    xid: u32,
    prev: Lsn,
    info: u8,
    rmid: u8,
}

impl FixedHeader {
    fn parse(h: &[u8; SIZE_OF_XLOG_RECORD]) -> FixedHeader {
        FixedHeader {
            tot_len: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            xid: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
            prev: Lsn(u64::from_le_bytes([
                h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15],
            ])),
            info: h[16],
            rmid: h[17],
        }
    }

    fn record<'a>(
        &self,
        lsn: Lsn,
        head: &'a [u8],
        main_data: &'a [u8],
        major: PgMajor,
    ) -> WalRecord<'a> {
        WalRecord {
            lsn,
            rmid: self.rmid,
            info: self.info,
            xid: self.xid,
            main_data: Cow::Borrowed(main_data),
            head: Cow::Borrowed(head),
            tot_len: u64::from(self.tot_len),
            major,
        }
    }
}

/// Whether the main data of records of resource manager `rmid` is read:
/// transaction ends and restore points (targets), segment switches (to stop
/// the walk), and the records that change relations without block references
/// ([`WalRecord::relation_changes`]).
fn keeps_main(rmid: u8) -> bool {
    matches!(rmid, RM_XACT_ID | RM_XLOG_ID | RM_SMGR_ID | RM_DBASE_ID)
}

/// `n` as a length within a buffer of `len` bytes.
fn clamp(n: u64, len: usize) -> usize {
    usize::try_from(n).map_or(len, |n| n.min(len))
}

fn bad(lsn: Lsn, problem: String) -> WalError {
    WalError::BadRecord { lsn, problem }
}

/// Feeds to a [`RecordScanner`] at a time: a page, so that the records
/// waiting to be handed out stay few.
const READER_PIECE: usize = 8192;

/// The records that start in a segment (or a `.partial` prefix of one)
/// held whole in memory: a [`RecordScanner`] fed from a buffer.
pub struct RecordReader<'a> {
    rest: &'a [u8],
    scanner: RecordScanner,
    ready: VecDeque<Result<WalRecord<'static>, WalError>>,
}

impl<'a> RecordReader<'a> {
    /// Prepares to walk `seg`, the segment starting at `start`, which must
    /// begin with its long header.
    pub fn new(seg: &'a [u8], start: Lsn) -> Result<RecordReader<'a>, WalError> {
        let header = LongPageHeader::parse(seg)?;
        Ok(RecordReader {
            rest: seg,
            scanner: RecordScanner::new(&header, start),
            ready: VecDeque::new(),
        })
    }
}

impl Iterator for RecordReader<'_> {
    type Item = Result<WalRecord<'static>, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.ready.is_empty() && !self.rest.is_empty() && !self.scanner.is_done() {
            let (piece, rest) = self.rest.split_at(self.rest.len().min(READER_PIECE));
            self.rest = rest;
            let ready = &mut self.ready;
            self.scanner.feed(piece, &mut |r| {
                ready.push_back(r.map(WalRecord::into_owned))
            });
        }
        self.ready.pop_front()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::blockref::{
        BKPBLOCK_HAS_IMAGE, BKPBLOCK_SAME_REL, BKPIMAGE_HAS_HOLE, XLR_BLOCK_ID_DATA_LONG,
        XLR_BLOCK_ID_DATA_SHORT, XLR_BLOCK_ID_ORIGIN, XLR_BLOCK_ID_TOPLEVEL_XID,
    };
    use crate::page::{
        SIZE_OF_XLOG_LONG_PHD, SIZE_OF_XLOG_SHORT_PHD, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER,
    };

    const BLCKSZ: usize = 8192;
    const SIZE_OF_REL_FILE_LOCATOR: usize = 12;
    pub(crate) const SEG: usize = 1024 * 1024;
    pub(crate) const START: u64 = 0x300_0000;

    /// Lays records out in a segment the way `XLogInsert` does: MAXALIGNed
    /// starts, page headers in between, contrecord flags and lengths.
    pub(crate) struct SegWriter {
        pub(crate) buf: Vec<u8>,
        at: usize,
        prev: u64,
    }

    impl SegWriter {
        pub(crate) fn new(first_rem_len: u32) -> SegWriter {
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
        pub(crate) fn record(
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

    pub(crate) fn commit(time: i64) -> Vec<u8> {
        let mut main = time.to_le_bytes().to_vec();
        main.extend_from_slice(&[0; 4]);
        main
    }

    /// A block reference with data, a full-page image with a hole, and a
    /// relation locator, followed by its data: exercises every length the
    /// decoder adds up.
    pub(crate) fn block_with_image(data_len: u16, image_len: u16) -> (Vec<u8>, Vec<u8>) {
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
        // The same for a record that is stepped over undecoded.
        let mut w = SegWriter::new(0);
        w.record(RM_XACT_ID, 0, 5, NO_BLOCKS, &commit(42));
        let stale = w.at;
        w.record(10, 0, 6, NO_BLOCKS, &[0; 40]);
        w.record(RM_XACT_ID, 0, 7, NO_BLOCKS, &commit(44));
        w.buf[stale + 8..stale + 16].copy_from_slice(&1u64.to_le_bytes());
        let reader = RecordReader::new(&w.buf, Lsn(START)).unwrap();
        assert_eq!(reader.count(), 1);
    }

    /// Every record a scanner hands over when fed `seg` in pieces of `piece` bytes.
    fn scan_in_pieces(seg: &[u8], piece: usize) -> Vec<Result<WalRecord<'static>, String>> {
        let header = LongPageHeader::parse(seg).unwrap();
        let mut scanner = RecordScanner::new(&header, Lsn(START));
        let mut out = Vec::new();
        for chunk in seg.chunks(piece) {
            scanner.feed(chunk, &mut |r| {
                out.push(r.map(WalRecord::into_owned).map_err(|e| e.to_string()))
            });
        }
        out
    }

    #[test]
    fn pieces_of_any_size_give_the_same_records() {
        // A continuation over two whole pages, records spanning pages, one
        // larger than the kept head with main data longer than what is
        // kept, and a restore point split across a page boundary.
        let mut w = SegWriter::new(20_000);
        w.write_spanning(&[0xCD; 20_000]);
        w.record(RM_XACT_ID, 0x00, 700, NO_BLOCKS, &commit(1_000));
        w.record(10, 0x00, 701, &block_with_image(9_000, 6_000), &[1; 3000]);
        let mut long_commit = commit(2_000);
        long_commit.extend_from_slice(&[9; 5_000]);
        w.record(RM_XACT_ID, 0x00, 702, NO_BLOCKS, &long_commit);
        for i in 0..400u32 {
            w.record(10, 0, i, NO_BLOCKS, &[0; 40]);
        }
        while BLCKSZ - w.at % BLCKSZ > 40 {
            w.record(10, 0, 0, NO_BLOCKS, &[0; 8]);
        }
        let mut rp = 3_000i64.to_le_bytes().to_vec();
        rp.extend_from_slice(&[b'p'; 64]);
        w.record(RM_XLOG_ID, XLOG_RESTORE_POINT, 0, NO_BLOCKS, &rp);
        w.record(RM_XACT_ID, 0x20, 703, NO_BLOCKS, &commit(4_000));

        let whole = scan_in_pieces(&w.buf, w.buf.len());
        assert!(whole.len() > 405, "{} records", whole.len());
        let times: Vec<_> = whole
            .iter()
            .filter_map(|r| r.as_ref().unwrap().target_event())
            .map(|e| match e {
                TargetEvent::XactEnd { time, .. } => (time, String::new()),
                TargetEvent::RestorePoint { time, name } => (time, name),
            })
            .collect();
        assert_eq!(
            times,
            [
                (PgTimestamp(1_000), String::new()),
                (PgTimestamp(2_000), String::new()),
                (PgTimestamp(3_000), "p".repeat(64)),
                (PgTimestamp(4_000), String::new()),
            ]
        );
        assert!(whole
            .iter()
            .all(|r| r.as_ref().unwrap().main_data.len() <= MAIN_DATA_KEPT as usize));
        for piece in [1, 3, 7, 23, 24, 41, 4095, 8192, 8193, 100_000] {
            assert_eq!(scan_in_pieces(&w.buf, piece), whole, "pieces of {piece}");
        }
        let reader: Vec<_> = RecordReader::new(&w.buf, Lsn(START))
            .unwrap()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(reader, whole);
    }

    #[test]
    fn undecodable_records_end_the_walk_with_an_error() {
        let mut w = SegWriter::new(0);
        w.record(RM_XACT_ID, 0, 5, NO_BLOCKS, &commit(42));
        let broken = w.at;
        w.record(RM_XACT_ID, 0, 6, NO_BLOCKS, &commit(43));
        w.record(RM_XACT_ID, 0, 7, NO_BLOCKS, &commit(44));
        // A block ID no record may carry.
        w.buf[broken + SIZE_OF_XLOG_RECORD] = 100;
        for piece in [5, 8192] {
            let found = scan_in_pieces(&w.buf, piece);
            assert_eq!(found.len(), 2, "{found:?}");
            assert!(found[1]
                .as_ref()
                .is_err_and(|e| e.contains("invalid block ID 100")));
        }
        // So does a length shorter than a record header.
        w.buf[broken..broken + 4].copy_from_slice(&10u32.to_le_bytes());
        let found = scan_in_pieces(&w.buf, 3);
        assert!(found[1]
            .as_ref()
            .is_err_and(|e| e.contains("xl_tot_len 10")));
    }

    #[test]
    fn records_that_cannot_be_targets_are_stepped_over_undecoded() {
        const RM_HEAP_ID: u8 = 10;
        let mut w = SegWriter::new(0);
        let heap = w.record(RM_HEAP_ID, 0, 5, &block_with_image(40, 3000), &[1; 20]);
        // Block headers nobody decodes: the walk goes on by xl_tot_len.
        w.buf[heap as usize - START as usize + SIZE_OF_XLOG_RECORD] = 100;
        let commit_lsn = w.record(RM_XACT_ID, 0, 6, NO_BLOCKS, &commit(43));
        for piece in [5, 8192] {
            let found = scan_in_pieces(&w.buf, piece);
            assert_eq!(found.len(), 2, "{found:?}");
            let heap_record = found[0].as_ref().unwrap();
            assert_eq!(
                (heap_record.rmid, heap_record.target_event()),
                (RM_HEAP_ID, None)
            );
            let commit_record = found[1].as_ref().unwrap();
            assert_eq!(commit_record.lsn, Lsn(commit_lsn));
            assert!(matches!(
                commit_record.target_event(),
                Some(TargetEvent::XactEnd { xid: 6, .. })
            ));
        }
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
