//! WAL file names: segments, `.partial` segments, `.history` and `.backup` files.
//!
//! Understands PostgreSQL's naming macros (`XLogFileName`, `TLHistoryFileName`,
//! `BackupHistoryFileName` in `xlog_internal.h`) and the segment-size rule
//! (`IsValidWalSegSize`). Used by `archive_command` and `restore_command`
//! handling, which receive these names in `%f`, and by archive listing and
//! retention, which turn them back into positions in the WAL.

use std::fmt;
use std::str::FromStr;

use crate::error::WalError;
use crate::lsn::Lsn;
use crate::timeline::TimelineId;

/// `wal_segment_size`: fixed by `initdb --wal-segsize`, a power of two from
/// 1 MiB to 1 GiB.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct WalSegmentSize(u32);

impl WalSegmentSize {
    /// PostgreSQL's default, 16 MiB.
    pub const DEFAULT: WalSegmentSize = WalSegmentSize(16 * 1024 * 1024);

    const MIN: u64 = 1024 * 1024;
    const MAX: u64 = 1024 * 1024 * 1024;

    /// Accepts exactly the sizes `initdb` accepts.
    pub fn new(bytes: u64) -> Result<WalSegmentSize, WalError> {
        if !bytes.is_power_of_two() || !(Self::MIN..=Self::MAX).contains(&bytes) {
            return Err(WalError::BadSegmentSize(bytes));
        }
        u32::try_from(bytes)
            .map(WalSegmentSize)
            .map_err(|_| WalError::BadSegmentSize(bytes))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// How many segments make up one 4 GiB "xlog id", i.e. the modulus of the
    /// last 8 digits of a segment name (`XLogSegmentsPerXLogId`).
    pub fn segments_per_xlog_id(self) -> u64 {
        0x1_0000_0000 / u64::from(self.0)
    }
}

impl Default for WalSegmentSize {
    fn default() -> Self {
        WalSegmentSize::DEFAULT
    }
}

/// In MiB, which every valid size is a whole number of.
impl fmt::Display for WalSegmentSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0 >> 20)
    }
}

/// A segment's position in the WAL counted in segments (`XLogSegNo`): the
/// start LSN divided by the segment size. Meaningful only together with the
/// segment size it was computed with.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SegmentNo(pub u64);

impl SegmentNo {
    /// The following segment. Saturates rather than wrapping: a segment
    /// number near `u64::MAX` is already outside the WAL address space for
    /// every segment size, and saturating keeps it there, so conversions
    /// such as [`SegmentNo::start_lsn`] still report it.
    pub fn next(self) -> SegmentNo {
        SegmentNo(self.0.saturating_add(1))
    }

    /// The LSN of the segment's first byte, or an error if the segment lies
    /// past the end of the 64-bit address space.
    pub fn start_lsn(self, seg_size: WalSegmentSize) -> Result<Lsn, WalError> {
        self.0
            .checked_mul(u64::from(seg_size.bytes()))
            .map(Lsn)
            .ok_or(WalError::SegmentNoOutOfRange {
                segno: self,
                seg_size,
            })
    }
}

impl fmt::Display for SegmentNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A segment file name, `TTTTTTTTLLLLLLLLSSSSSSSS`: timeline, then the
/// segment number split into the 4 GiB "xlog id" (`log`) and the segment
/// within it (`seg`). The split depends on the segment size, so the name
/// alone does not give a segment number; pass the size to convert.
///
/// Ordering is by (timeline, log, seg), the same as the names' text order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SegmentName {
    /// The timeline the segment was written on.
    pub tli: TimelineId,
    /// `segno / segments_per_xlog_id`.
    pub log: u32,
    /// `segno % segments_per_xlog_id`.
    pub seg: u32,
}

impl SegmentName {
    /// The name of segment `segno` on timeline `tli` (`XLogFileName`).
    pub fn new(
        tli: TimelineId,
        segno: SegmentNo,
        seg_size: WalSegmentSize,
    ) -> Result<SegmentName, WalError> {
        let per = seg_size.segments_per_xlog_id();
        let out_of_range = || WalError::SegmentNoOutOfRange { segno, seg_size };
        let log = u32::try_from(segno.0 / per).map_err(|_| out_of_range())?;
        // The remainder is below `per`, at most 4096 (1 MiB segments), so it
        // always fits; `try_from` merely avoids a silent cast.
        let seg = u32::try_from(segno.0 % per).map_err(|_| out_of_range())?;
        Ok(SegmentName { tli, log, seg })
    }

    /// The segment number this name stands for with segments of `seg_size`.
    /// Fails for names whose `seg` field is too large for that size, which
    /// PostgreSQL can never have written.
    pub fn segno(&self, seg_size: WalSegmentSize) -> Result<SegmentNo, WalError> {
        let per = seg_size.segments_per_xlog_id();
        let seg = u64::from(self.seg);
        if seg >= per {
            return Err(WalError::SegmentOutOfRange {
                name: *self,
                seg_size,
            });
        }
        // log < 2^32 and per <= 2^12, so this stays below 2^44.
        Ok(SegmentNo(u64::from(self.log) * per + seg))
    }

    /// The next segment on the same timeline, crossing into the next xlog id
    /// after the last segment of one.
    pub fn next(&self, seg_size: WalSegmentSize) -> Result<SegmentName, WalError> {
        SegmentName::new(self.tli, self.segno(seg_size)?.next(), seg_size)
    }

    /// The LSN of the segment's first byte.
    pub fn start_lsn(&self, seg_size: WalSegmentSize) -> Result<Lsn, WalError> {
        self.segno(seg_size)?.start_lsn(seg_size)
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:08X}{:08X}", self.tli, self.log, self.seg)
    }
}

/// A bare 24-digit segment name; anything else, including `.partial`, is an
/// error. Use [`WalFileName`] to accept every kind of archived file.
impl FromStr for SegmentName {
    type Err = WalError;

    fn from_str(s: &str) -> Result<SegmentName, WalError> {
        match s.parse::<WalFileName>()? {
            WalFileName::Segment(name) => Ok(name),
            _ => Err(WalError::BadFileName(s.to_string())),
        }
    }
}

/// Any file name `archive_command` may be given or `restore_command` asked for.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum WalFileName {
    /// `000000010000000000000003`: a complete segment.
    Segment(SegmentName),
    /// `000000010000000000000003.partial`: the last, unfinished segment of a
    /// timeline, left by a promotion or by `pg_receivewal`.
    Partial(SegmentName),
    /// `00000002.history`: the ancestry of a timeline.
    History(TimelineId),
    /// `000000010000000000000003.00000028.backup`: the backup history file
    /// written by `pg_backup_stop`, named after the backup's start segment and
    /// the start LSN's offset within it.
    Backup {
        /// The segment holding the backup's start LSN.
        segment: SegmentName,
        /// The start LSN's offset within that segment.
        offset: u32,
    },
}

const SEGMENT_NAME_LEN: usize = 24;
const TLI_LEN: usize = 8;
const PARTIAL_SUFFIX: &str = ".partial";
const HISTORY_SUFFIX: &str = ".history";
const BACKUP_SUFFIX: &str = ".backup";

/// Exactly 8 upper-case hex digits: PostgreSQL always writes `%08X`, so
/// anything else was not written by it and must not be mistaken for WAL.
fn upper_hex8(s: &str) -> Option<u32> {
    if s.len() != 8
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Timeline 0 does not exist (`initdb` starts at 1), so a name carrying it
/// is not WAL.
fn timeline(s: &str) -> Option<TimelineId> {
    upper_hex8(s).filter(|&t| t != 0).map(TimelineId)
}

fn segment_name(s: &str) -> Option<SegmentName> {
    if s.len() != SEGMENT_NAME_LEN {
        return None;
    }
    Some(SegmentName {
        tli: timeline(s.get(0..8)?)?,
        log: upper_hex8(s.get(8..16)?)?,
        seg: upper_hex8(s.get(16..24)?)?,
    })
}

fn parse_file_name(s: &str) -> Option<WalFileName> {
    if s.len() == SEGMENT_NAME_LEN {
        return segment_name(s).map(WalFileName::Segment);
    }
    if let Some(seg) = s.strip_suffix(PARTIAL_SUFFIX) {
        return segment_name(seg).map(WalFileName::Partial);
    }
    if let Some(tli) = s.strip_suffix(HISTORY_SUFFIX) {
        return if tli.len() == TLI_LEN {
            timeline(tli).map(WalFileName::History)
        } else {
            None
        };
    }
    let rest = s.strip_suffix(BACKUP_SUFFIX)?;
    let (segment, offset) = rest.split_once('.')?;
    Some(WalFileName::Backup {
        segment: segment_name(segment)?,
        offset: upper_hex8(offset)?,
    })
}

impl WalFileName {
    /// The timeline in the name.
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalFileName::Segment(s)
            | WalFileName::Partial(s)
            | WalFileName::Backup { segment: s, .. } => s.tli,
            WalFileName::History(tli) => *tli,
        }
    }

    /// The segment the name refers to; `None` for history files.
    pub fn segment(&self) -> Option<SegmentName> {
        match self {
            WalFileName::Segment(s)
            | WalFileName::Partial(s)
            | WalFileName::Backup { segment: s, .. } => Some(*s),
            WalFileName::History(_) => None,
        }
    }

    /// `"segment"`, `"partial"`, `"history"` or `"backup"`, for logs and metrics.
    pub fn kind_str(&self) -> &'static str {
        match self {
            WalFileName::Segment(_) => "segment",
            WalFileName::Partial(_) => "partial",
            WalFileName::History(_) => "history",
            WalFileName::Backup { .. } => "backup",
        }
    }
}

impl FromStr for WalFileName {
    type Err = WalError;

    /// Strict on purpose: these names come from PostgreSQL (`%f`) or from
    /// archive listings, and also end up in storage keys and paths, so only
    /// the exact forms PostgreSQL writes are accepted. In particular no `/`
    /// or `..` can get through, because every character must be an upper-case
    /// hex digit or part of a fixed suffix.
    fn from_str(s: &str) -> Result<WalFileName, WalError> {
        parse_file_name(s).ok_or_else(|| WalError::BadFileName(s.to_string()))
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}{PARTIAL_SUFFIX}"),
            WalFileName::History(tli) => write!(f, "{tli}{HISTORY_SUFFIX}"),
            WalFileName::Backup { segment, offset } => {
                write!(f, "{segment}.{offset:08X}{BACKUP_SUFFIX}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn size(bytes: u64) -> WalSegmentSize {
        WalSegmentSize::new(bytes).unwrap()
    }

    fn name(s: &str) -> SegmentName {
        s.parse().unwrap()
    }

    #[test]
    fn segment_size_rule() {
        for mib in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] {
            assert_eq!(size(mib * MIB).bytes() as u64, mib * MIB);
        }
        for bad in [
            0,
            1,
            512 * 1024,
            MIB - 1,
            MIB + 1,
            3 * MIB,
            24 * MIB,
            2048 * MIB,
            u64::MAX,
            1 << 40,
        ] {
            assert_eq!(WalSegmentSize::new(bad), Err(WalError::BadSegmentSize(bad)));
        }
        let msg = WalSegmentSize::new(3 * MIB).unwrap_err().to_string();
        assert!(msg.contains("3145728"), "{msg}");
        assert_eq!(WalSegmentSize::DEFAULT.bytes(), 16 * 1024 * 1024);
        assert_eq!(WalSegmentSize::default(), WalSegmentSize::DEFAULT);
        assert_eq!(WalSegmentSize::DEFAULT.to_string(), "16 MiB");
    }

    #[test]
    fn segments_per_xlog_id() {
        assert_eq!(size(MIB).segments_per_xlog_id(), 4096);
        assert_eq!(size(16 * MIB).segments_per_xlog_id(), 256);
        assert_eq!(size(1024 * MIB).segments_per_xlog_id(), 4);
    }

    #[test]
    fn names_for_16mib() {
        let seg = WalSegmentSize::DEFAULT;
        let tli = TimelineId(1);
        let cases = [
            (0x0, "000000010000000000000000"),
            (0x3, "000000010000000000000003"),
            (0xFF, "0000000100000000000000FF"),
            (0x100, "000000010000000100000000"),
            (0x1FF, "0000000100000001000000FF"),
            (0x12C, "00000001000000010000002C"),
        ];
        for (segno, text) in cases {
            let n = SegmentName::new(tli, SegmentNo(segno), seg).unwrap();
            assert_eq!(n.to_string(), text);
            assert_eq!(name(text), n);
            assert_eq!(n.segno(seg).unwrap(), SegmentNo(segno));
            assert_eq!(n.start_lsn(seg).unwrap(), Lsn(segno * 16 * MIB));
        }
    }

    #[test]
    fn names_for_1gib() {
        let seg = size(1024 * MIB);
        let tli = TimelineId(2);
        let n = SegmentName::new(tli, SegmentNo(7), seg).unwrap();
        assert_eq!(n.to_string(), "000000020000000100000003");
        assert_eq!(n.segno(seg).unwrap(), SegmentNo(7));
        assert_eq!(n.start_lsn(seg).unwrap().to_string(), "1/C0000000");
        // Seg field 4 exists with 16 MiB segments but not with 1 GiB ones.
        let four = name("000000020000000000000004");
        assert!(four.segno(WalSegmentSize::DEFAULT).is_ok());
        assert_eq!(
            four.segno(seg),
            Err(WalError::SegmentOutOfRange {
                name: four,
                seg_size: seg
            })
        );
        let msg = four.segno(seg).unwrap_err().to_string();
        assert!(
            msg.contains("000000020000000000000004") && msg.contains("1024 MiB"),
            "{msg}"
        );
    }

    #[test]
    fn names_for_1mib() {
        let seg = size(MIB);
        let n = SegmentName::new(TimelineId(1), SegmentNo(0x1FFF), seg).unwrap();
        assert_eq!(n.to_string(), "000000010000000100000FFF");
        assert_eq!(n.segno(seg).unwrap(), SegmentNo(0x1FFF));
        assert_eq!(n.start_lsn(seg).unwrap().to_string(), "1/FFF00000");
        assert!(name("000000010000000000001000").segno(seg).is_err());
        assert!(name("000000010000000000000100")
            .segno(WalSegmentSize::DEFAULT)
            .is_err());
        assert!(name("000000010000000000000100").segno(seg).is_ok());
    }

    #[test]
    fn lsn_to_name_agrees_with_postgres_example() {
        // xlog_internal.h example: LSN 1/2C3D5B58 lives in 00000001000000010000002C.
        let seg = WalSegmentSize::DEFAULT;
        let segno = "1/2C3D5B58".parse::<Lsn>().unwrap().segment_number(seg);
        assert_eq!(
            SegmentName::new(TimelineId(1), segno, seg)
                .unwrap()
                .to_string(),
            "00000001000000010000002C"
        );
    }

    #[test]
    fn next_crosses_xlog_id_boundary() {
        let seg = WalSegmentSize::DEFAULT;
        assert_eq!(
            name("0000000100000000000000FE").next(seg).unwrap(),
            name("0000000100000000000000FF")
        );
        assert_eq!(
            name("0000000100000000000000FF").next(seg).unwrap(),
            name("000000010000000100000000")
        );
        let big = size(1024 * MIB);
        assert_eq!(
            name("000000030000000500000003").next(big).unwrap(),
            name("000000030000000600000000")
        );
        let small = size(MIB);
        assert_eq!(
            name("000000010000000000000FFF").next(small).unwrap(),
            name("000000010000000100000000")
        );
        assert_eq!(
            name("0000000100000000000000FF").next(small).unwrap(),
            name("000000010000000000000100")
        );
        // The name of an impossible segment has no successor.
        assert!(name("000000010000000000000100").next(seg).is_err());
    }

    #[test]
    fn end_of_address_space() {
        let seg = WalSegmentSize::DEFAULT;
        let last = name("00000001FFFFFFFF000000FF");
        assert_eq!(
            last.start_lsn(seg).unwrap().to_string(),
            "FFFFFFFF/FF000000"
        );
        assert!(matches!(
            last.next(seg),
            Err(WalError::SegmentNoOutOfRange { .. })
        ));
        assert!(SegmentName::new(TimelineId(1), SegmentNo(u64::MAX), seg).is_err());
        assert!(SegmentNo(u64::MAX).start_lsn(seg).is_err());
        assert_eq!(SegmentNo(u64::MAX).next(), SegmentNo(u64::MAX));
        assert_eq!(SegmentNo(41).next(), SegmentNo(42));
        assert_eq!(SegmentNo(3).start_lsn(seg).unwrap(), Lsn(0x300_0000));
        assert_eq!(SegmentNo(300).to_string(), "300");
    }

    #[test]
    fn segment_name_order() {
        let mut names = [
            name("000000020000000000000001"),
            name("000000010000000100000000"),
            name("0000000100000000000000FF"),
            name("000000010000000000000003"),
        ];
        names.sort();
        let texts: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            texts,
            [
                "000000010000000000000003",
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000020000000000000001"
            ]
        );
    }

    #[test]
    fn parse_all_kinds_and_round_trip() {
        let seg3 = SegmentName {
            tli: TimelineId(1),
            log: 0,
            seg: 3,
        };
        let cases = [
            (
                "000000010000000000000003",
                WalFileName::Segment(seg3),
                "segment",
            ),
            (
                "000000010000000000000003.partial",
                WalFileName::Partial(seg3),
                "partial",
            ),
            (
                "00000002.history",
                WalFileName::History(TimelineId(2)),
                "history",
            ),
            (
                "0000000A.history",
                WalFileName::History(TimelineId(10)),
                "history",
            ),
            (
                "000000010000000000000003.00000028.backup",
                WalFileName::Backup {
                    segment: seg3,
                    offset: 0x28,
                },
                "backup",
            ),
            (
                "0000000A00000001000000FF.00FFFFF8.backup",
                WalFileName::Backup {
                    segment: SegmentName {
                        tli: TimelineId(10),
                        log: 1,
                        seg: 0xFF,
                    },
                    offset: 0xFFFFF8,
                },
                "backup",
            ),
        ];
        for (text, parsed, kind) in cases {
            let got: WalFileName = text.parse().unwrap();
            assert_eq!(got, parsed, "{text}");
            assert_eq!(got.to_string(), text);
            assert_eq!(got.kind_str(), kind);
        }
    }

    #[test]
    fn accessors() {
        let seg = name("000000030000000000000007");
        let f = |s: &str| s.parse::<WalFileName>().unwrap();
        assert_eq!(f("000000030000000000000007").segment(), Some(seg));
        assert_eq!(f("000000030000000000000007.partial").segment(), Some(seg));
        assert_eq!(
            f("000000030000000000000007.00000028.backup").segment(),
            Some(seg)
        );
        assert_eq!(f("00000003.history").segment(), None);
        for text in [
            "000000030000000000000007",
            "000000030000000000000007.partial",
            "000000030000000000000007.00000028.backup",
            "00000003.history",
        ] {
            assert_eq!(f(text).timeline(), TimelineId(3), "{text}");
        }
    }

    #[test]
    fn rejects_bad_names_and_names_them() {
        for bad in [
            "",
            "00000001000000000000000",
            "0000000100000000000000003",
            "000000010000000000000003 ",
            " 000000010000000000000003",
            "00000001000000000000000a",
            "0000000100000000000000ff",
            "000000010000000000000003.PARTIAL",
            "000000010000000000000003.partial.partial",
            "000000010000000000000003.parti",
            "00000001.partial",
            "00000002.history.partial",
            "0000000000000000000000003",
            "000000000000000000000003",
            "00000000.history",
            "0000002.history",
            "000000002.history",
            "0000000a.history",
            "00000002.HISTORY",
            "00000002.backup",
            "000000010000000000000003.backup",
            "000000010000000000000003.0000028.backup",
            "000000010000000000000003.00000028.partial",
            "000000010000000000000003.0000002g.backup",
            "000000010000000000000003.00000028",
            "000000010000000000000003.history",
            "pg_wal/000000010000000000000003",
            "../000000010000000000000003",
            "00000001/0000000000000003",
            "0000000100000000/0000003",
            "000000010000000000000003/",
            "00000002.history/",
            "./00000002.history",
            "00000001000000000000000\\",
            "RECOVERYXLOG",
            "000000010000000000000003.ready",
            "00000001000000000000000３",
        ] {
            match bad.parse::<WalFileName>() {
                Err(WalError::BadFileName(input)) => assert_eq!(input, bad),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        let msg = "0000000100000000000000ff"
            .parse::<WalFileName>()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("\"0000000100000000000000ff\""), "{msg}");
    }

    #[test]
    fn segment_name_from_str_only_takes_bare_segments() {
        assert!("000000010000000000000003".parse::<SegmentName>().is_ok());
        for other in [
            "000000010000000000000003.partial",
            "00000002.history",
            "000000010000000000000003.00000028.backup",
        ] {
            assert_eq!(
                other.parse::<SegmentName>(),
                Err(WalError::BadFileName(other.to_string()))
            );
        }
    }
}
