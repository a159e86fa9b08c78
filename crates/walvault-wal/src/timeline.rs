//! Timeline IDs: which branch of a cluster's history a piece of WAL belongs to.
//!
//! PostgreSQL starts at timeline 1 and takes the next ID at every promotion.
//! The ID appears in file names as 8 upper-case hex digits (the `TTTTTTTT` of
//! segment and `.history` names) and in history files and GUCs in decimal.
//! Used by file naming, history parsing and the restore path, which tries
//! each timeline of a history in turn.

use std::fmt;

use crate::error::WalError;

/// A PostgreSQL `TimeLineID`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TimelineId(pub u32);

impl TimelineId {
    /// Parses the 8-hex-digit form used in WAL file names. Either case is
    /// accepted here; file-name parsing insists on upper case itself.
    pub fn from_hex(s: &str) -> Result<TimelineId, WalError> {
        if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(WalError::BadTimeline(s.to_string()));
        }
        u32::from_str_radix(s, 16)
            .map(TimelineId)
            .map_err(|_| WalError::BadTimeline(s.to_string()))
    }

    /// The timeline a promotion from this one creates, or `None` at
    /// `u32::MAX`, where PostgreSQL itself would wrap around to 0.
    pub fn next(self) -> Option<TimelineId> {
        self.0.checked_add(1).map(TimelineId)
    }
}

/// The file-name form: 8 upper-case hex digits, e.g. `0000000A`.
impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_eight_upper_hex_digits() {
        assert_eq!(TimelineId(1).to_string(), "00000001");
        assert_eq!(TimelineId(10).to_string(), "0000000A");
        assert_eq!(TimelineId(0xABCDEF12).to_string(), "ABCDEF12");
        assert_eq!(TimelineId(u32::MAX).to_string(), "FFFFFFFF");
    }

    #[test]
    fn from_hex_round_trips() {
        for v in [0, 1, 10, 0x1F, 0xABCDEF12, u32::MAX] {
            assert_eq!(
                TimelineId::from_hex(&TimelineId(v).to_string()).unwrap(),
                TimelineId(v)
            );
        }
        assert_eq!(TimelineId::from_hex("0000000a").unwrap(), TimelineId(10));
    }

    #[test]
    fn from_hex_is_strict() {
        for bad in [
            "",
            "1",
            "0000001",
            "000000001",
            "0000000G",
            "+0000001",
            " 0000001",
            "0x000001",
        ] {
            match TimelineId::from_hex(bad) {
                Err(WalError::BadTimeline(input)) => assert_eq!(input, bad),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn next_and_order() {
        assert_eq!(TimelineId(1).next(), Some(TimelineId(2)));
        assert_eq!(TimelineId(9).next(), Some(TimelineId(10)));
        assert_eq!(TimelineId(u32::MAX).next(), None);
        assert!(TimelineId(2) > TimelineId(1));
    }
}
