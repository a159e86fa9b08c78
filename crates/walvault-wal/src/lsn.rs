//! Log sequence numbers: byte positions in PostgreSQL's 64-bit WAL stream.
//!
//! Understands PostgreSQL's `X/Y` text form (as printed by `pg_lsn`,
//! `pg_controldata`, `backup_label` and history files) and how an LSN maps to
//! a segment and an offset inside it (`XLByteToSeg`, `XLogSegmentOffset`).
//! Used by everything in walvault that reasons about WAL positions: backup
//! start/stop points, recovery targets, streaming and segment naming.

use std::fmt;
use std::str::FromStr;

use crate::error::WalError;
use crate::name::{SegmentNo, WalSegmentSize};

/// A position in the WAL, in bytes from its very beginning (`XLogRecPtr`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`: PostgreSQL never writes a record at 0 (bootstrap
    /// skips the first segment), so 0 means "no position".
    pub const INVALID: Lsn = Lsn(0);

    /// Whether this is a real position rather than [`Lsn::INVALID`].
    pub fn is_valid(self) -> bool {
        self != Lsn::INVALID
    }

    /// The distance from `other` up to `self`, or `None` if `other` is later.
    pub fn checked_sub(self, other: Lsn) -> Option<u64> {
        self.0.checked_sub(other.0)
    }

    /// `self + bytes`, or `None` past the end of the 64-bit address space. There is
    /// deliberately no `+`: positions come from servers and repositories, and a sum that
    /// wrapped in a release build would point at the start of the WAL.
    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    /// The segment holding the byte at this position (`XLByteToSeg`).
    pub fn segment_number(self, seg_size: WalSegmentSize) -> SegmentNo {
        SegmentNo(self.0 / u64::from(seg_size.bytes()))
    }

    /// The segment holding the byte just before this position
    /// (`XLByteToPrevSeg`). A record *ending* exactly on a segment boundary
    /// lives in the earlier segment, so this is the last segment needed to
    /// reach an end LSN such as a backup's stop point.
    pub fn end_segment_number(self, seg_size: WalSegmentSize) -> SegmentNo {
        SegmentNo(self.0.saturating_sub(1) / u64::from(seg_size.bytes()))
    }

    /// The offset of this position inside its segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, seg_size: WalSegmentSize) -> u64 {
        // Segment sizes are powers of two, so a mask is the remainder.
        self.0 & (u64::from(seg_size.bytes()) - 1)
    }
}

/// PostgreSQL's `%X/%X`: high and low 32 bits in upper-case hex, without
/// padding. PostgreSQL 18 pads the low half to 8 digits (`%X/%08X`); both
/// forms parse back, so compare LSNs as values, never as text.
impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = WalError;

    /// Accepts what PostgreSQL prints (any version) and what people type:
    /// hex in either case, 1 to 8 digits on each side. Rejects signs, spaces
    /// and `0x` prefixes, which `u32::from_str_radix` alone would let through
    /// in part.
    fn from_str(s: &str) -> Result<Lsn, WalError> {
        let bad = || WalError::BadLsn(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let half = |part: &str| -> Result<u64, WalError> {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(part, 16)
                .map(u64::from)
                .map_err(|_| bad())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    #[test]
    fn display_matches_postgres() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x16B3748).to_string(), "0/16B3748");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(Lsn(0x1_0000_0000).to_string(), "1/0");
    }

    #[test]
    fn parse_round_trips() {
        for v in [0, 1, 0x16B3748, 0x16_B374_D848, 0x1_0000_0000, u64::MAX] {
            assert_eq!(lsn(&Lsn(v).to_string()), Lsn(v));
        }
        assert_eq!(lsn("0/0"), Lsn(0));
        assert_eq!(lsn("16/B374D848"), Lsn(0x16_B374_D848));
        assert_eq!(lsn("FFFFFFFF/FFFFFFFF"), Lsn(u64::MAX));
    }

    #[test]
    fn parse_accepts_lower_case_and_pg18_padding() {
        assert_eq!(lsn("16/b374d848"), Lsn(0x16_B374_D848));
        assert_eq!(lsn("0/016B3748"), Lsn(0x16B3748));
        assert_eq!(lsn("00000000/00000001"), Lsn(1));
    }

    #[test]
    fn parse_rejects_garbage_and_names_input() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "16B3748",
            "0/1/2",
            "G/0",
            "0/G",
            "+1/0",
            "-1/0",
            " 0/0",
            "0/0 ",
            "0 /0",
            "0x1/0",
            "123456789/0",
            "0/123456789",
            "000000001/0",
            "0/000000001",
            "0/16B3748\n",
        ] {
            match bad.parse::<Lsn>() {
                Err(WalError::BadLsn(input)) => assert_eq!(input, bad),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        let msg = "zz/1".parse::<Lsn>().unwrap_err().to_string();
        assert!(msg.contains("\"zz/1\""), "{msg}");
    }

    #[test]
    fn arithmetic() {
        assert_eq!(Lsn(0x10).checked_add(0x20), Some(Lsn(0x30)));
        assert_eq!(lsn("0/FFFFFFFF").checked_add(1), Some(lsn("1/0")));
        assert_eq!(Lsn(100).checked_sub(Lsn(40)), Some(60));
        assert_eq!(Lsn(40).checked_sub(Lsn(100)), None);
        assert_eq!(Lsn(5).checked_sub(Lsn(5)), Some(0));
        assert_eq!(Lsn(u64::MAX).checked_add(1), None);
        assert_eq!(Lsn(1).checked_add(1), Some(Lsn(2)));
        assert!(!Lsn::INVALID.is_valid());
        assert!(Lsn(1).is_valid());
        assert_eq!(Lsn::default(), Lsn::INVALID);
        assert!(lsn("1/0") > lsn("0/FFFFFFFF"));
    }

    #[test]
    fn segment_arithmetic_16mib() {
        let seg = WalSegmentSize::DEFAULT;
        let l = lsn("1/2C3D5B58");
        assert_eq!(l.segment_number(seg), SegmentNo(0x12C));
        assert_eq!(l.segment_offset(seg), 0x3D5B58);
        assert_eq!(lsn("0/3000000").segment_number(seg), SegmentNo(3));
        assert_eq!(lsn("0/3000000").segment_offset(seg), 0);
        assert_eq!(lsn("0/2FFFFFF").segment_number(seg), SegmentNo(2));
        assert_eq!(lsn("0/2FFFFFF").segment_offset(seg), 0xFFFFFF);
    }

    #[test]
    fn end_segment_is_previous_on_boundary() {
        let seg = WalSegmentSize::DEFAULT;
        assert_eq!(lsn("0/3000000").end_segment_number(seg), SegmentNo(2));
        assert_eq!(lsn("0/3000001").end_segment_number(seg), SegmentNo(3));
        assert_eq!(lsn("0/2000100").end_segment_number(seg), SegmentNo(2));
        assert_eq!(Lsn(0).end_segment_number(seg), SegmentNo(0));
    }

    #[test]
    fn segment_arithmetic_other_sizes() {
        let one_mib = WalSegmentSize::new(1 << 20).unwrap();
        let one_gib = WalSegmentSize::new(1 << 30).unwrap();
        let l = lsn("1/2C3D5B58");
        assert_eq!(l.segment_number(one_mib), SegmentNo(0x12C3));
        assert_eq!(l.segment_offset(one_mib), 0xD5B58);
        assert_eq!(l.segment_number(one_gib), SegmentNo(4));
        assert_eq!(l.segment_offset(one_gib), 0x2C3D5B58);
    }
}
