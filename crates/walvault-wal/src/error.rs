//! The one error type of this crate, shared by every module.
//!
//! walvault reports these to an operator who is looking at an archive or a
//! `pg_wal` directory, so every message names the offending file name or
//! value and, where there is one, what was expected instead.

use crate::lsn::Lsn;
use crate::name::{SegmentName, SegmentNo, WalSegmentSize};
use crate::page::PgMajor;
use crate::timeline::TimelineId;

/// Everything that can be wrong with a WAL value, name or file header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    /// Text that is not an LSN in PostgreSQL's `X/Y` notation.
    #[error("invalid LSN {0:?}: expected X/Y with 1 to 8 hex digits on each side of the slash")]
    BadLsn(String),

    /// Text that is not an 8-hex-digit timeline ID.
    #[error("invalid timeline ID {0:?}: expected exactly 8 hex digits")]
    BadTimeline(String),

    /// A segment size PostgreSQL would refuse (`IsValidWalSegSize`).
    #[error(
        "invalid WAL segment size {0} bytes: PostgreSQL allows powers of two from 1 MiB to 1 GiB"
    )]
    BadSegmentSize(u64),

    /// A name that is none of the four kinds of file the archive holds.
    #[error(
        "{0:?} is not a WAL file name (expected a 24-hex-digit segment name, optionally with \
         .partial, a segment name with .XXXXXXXX.backup, or XXXXXXXX.history, in upper case)"
    )]
    BadFileName(String),

    /// A segment name whose last field cannot exist with this segment size,
    /// e.g. `...00000100` with 16 MiB segments, which hold only 256 per xlog id.
    #[error(
        "{name}: segment field {seg:08X} does not exist with {seg_size} segments (only {per} per xlog id)",
        seg = .name.seg,
        per = .seg_size.segments_per_xlog_id()
    )]
    SegmentOutOfRange {
        /// The impossible name.
        name: SegmentName,
        /// The segment size it was interpreted with.
        seg_size: WalSegmentSize,
    },

    /// A segment number beyond the 64-bit WAL address space.
    #[error("segment number {segno} lies past the end of the WAL address space with {seg_size} segments")]
    SegmentNoOutOfRange {
        /// The impossible segment number.
        segno: SegmentNo,
        /// The segment size it was interpreted with.
        seg_size: WalSegmentSize,
    },

    /// Fewer bytes than the page header being parsed.
    #[error("WAL page header needs {need} bytes, got only {len}")]
    PageTooShort {
        /// Bytes available.
        len: usize,
        /// Bytes the header occupies.
        need: usize,
    },

    /// A page whose magic is not that of a supported PostgreSQL major.
    #[error("unknown WAL page magic 0x{0:04X}: {why}", why = unknown_magic(*.0))]
    UnknownMagic(u16),

    /// A PostgreSQL major walvault does not support (older than 13, or newer than it knows).
    #[error(
        "PostgreSQL {0} is not supported: walvault supports PostgreSQL {oldest} to {newest}{why}",
        oldest = PgMajor::oldest(),
        newest = PgMajor::newest(),
        why = if *.0 > PgMajor::newest().number() {
            "; a newer major may change WAL, pg_control or the backup functions, so walvault \
             refuses it rather than guess (a walvault release that knows it is needed)"
        } else {
            ""
        }
    )]
    UnsupportedMajor(u32),

    /// `xlp_info` with bits PostgreSQL never sets (`XLP_ALL_FLAGS` is 0x000F).
    #[error("invalid WAL page info bits 0x{0:04X}: only 0x000F may be set")]
    BadPageInfo(u16),

    /// The first page of a segment without `XLP_LONG_HEADER`.
    #[error("first page of the segment has no long header (xlp_info 0x{0:04X} lacks XLP_LONG_HEADER 0x0002)")]
    NotLongHeader(u16),

    /// An `xlp_xlog_blcksz` PostgreSQL cannot be built with.
    #[error(
        "invalid WAL block size {0} bytes: PostgreSQL allows powers of two from 1 KiB to 64 KiB"
    )]
    BadBlockSize(u32),

    /// A header problem found while validating a named file.
    #[error("{file}: {problem}")]
    InFile {
        /// The WAL file name (with `.partial` when validating a partial file).
        file: String,
        /// What was wrong with its first page.
        problem: Box<WalError>,
    },

    /// A complete segment whose length is not the segment size in its header.
    #[error("{file}: file is {found} bytes, but its page header says segments are {expected} ({bytes} bytes)", bytes = .expected.bytes())]
    SegmentFileSize {
        /// The WAL file name.
        file: String,
        /// The file's length.
        found: u64,
        /// The segment size from the long page header.
        expected: WalSegmentSize,
    },

    /// A `.partial` file shorter than its first page header or longer than a segment.
    #[error("{file}: file is {found} bytes, expected at least {min} and at most {max} bytes", min = crate::page::SIZE_OF_XLOG_LONG_PHD, max = .seg_size.bytes())]
    PartialFileSize {
        /// The WAL file name.
        file: String,
        /// The file's length.
        found: u64,
        /// The segment size from the long page header.
        seg_size: WalSegmentSize,
    },

    /// A segment whose first page was written for another position in the WAL.
    #[error("{file}: page address {found} does not match the segment's start {expected}")]
    PageAddressMismatch {
        /// The WAL file name.
        file: String,
        /// `xlp_pageaddr` of the first page.
        found: Lsn,
        /// Start LSN of the segment the name stands for.
        expected: Lsn,
    },

    /// A segment whose first page belongs to a timeline newer than the name's.
    #[error(
        "{file}: first page is on timeline {found}, newer than the file name's timeline {name_tli}"
    )]
    TimelineFromFuture {
        /// The WAL file name.
        file: String,
        /// `xlp_tli` of the first page.
        found: TimelineId,
        /// The timeline in the file name.
        name_tli: TimelineId,
    },

    /// A timeline history file that PostgreSQL would refuse or misread.
    #[error("{file} line {line}: {problem}")]
    BadHistory {
        /// The history file name, e.g. `00000002.history`.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with that line.
        problem: String,
    },

    /// A backup history file (`.backup`) or `backup_label` line that cannot be read.
    #[error("backup history file line {line}: {problem}")]
    BadBackupHistory {
        /// 1-based line number.
        line: usize,
        /// What is wrong with that line.
        problem: String,
    },

    /// A WAL record whose headers cannot be decoded.
    #[error("WAL record at {lsn}: {problem}")]
    BadRecord {
        /// Where the record starts.
        lsn: Lsn,
        /// What is wrong with it.
        problem: String,
    },

    /// A streamed WAL page whose header does not fit its position or its cluster.
    #[error("WAL page at {lsn}: {problem}")]
    BadPage {
        /// Where the page starts.
        lsn: Lsn,
        /// What is wrong with its header.
        problem: String,
    },

    /// Streamed WAL that does not continue where the stream stands.
    #[error(
        "WAL from {found} does not continue the stream at {expected} ({})",
        if .found < .expected { "it goes backwards" } else { "it leaves a gap" }
    )]
    StreamPosition {
        /// Where the data starts.
        found: Lsn,
        /// Where the stream stands: the end of the data before.
        expected: Lsn,
    },

    /// A position plus a length that passes the end of the 64-bit WAL address space.
    #[error("{len} bytes from {start} reach past the end of the WAL address space")]
    LsnOverflow {
        /// The position.
        start: Lsn,
        /// The length added to it.
        len: u64,
    },

    /// A backup history file without its one mandatory line.
    #[error("backup history file has no START WAL LOCATION line")]
    BackupHistoryNoStart,
}

/// Why a page magic is unknown. PostgreSQL raises `XLOG_PAGE_MAGIC` (0xD1xx) with each WAL format
/// change, so a larger one of that form is WAL of a major newer than walvault knows.
fn unknown_magic(magic: u16) -> String {
    let (oldest, newest) = (PgMajor::oldest(), PgMajor::newest());
    if magic >> 8 == 0xD1 && magic > newest.magic() {
        format!(
            "newer than PostgreSQL {newest}'s (0x{:04X}): WAL of a PostgreSQL major walvault does \
             not support (it supports {oldest} to {newest})",
            newest.magic()
        )
    } else {
        format!(
            "not PostgreSQL {oldest} to {newest} WAL from a little-endian server (or not WAL at all)"
        )
    }
}
