//! Points in time as walvault keeps and prints them: microseconds since the Unix epoch, UTC.
//!
//! Manifests record RFC 3339 times, segment summaries record microseconds; both become a
//! [`UnixMicros`], printed as `2026-11-21 12:00:00.123456+00` with an explicit zone so the reader's
//! (or the server's) time zone cannot shift it. Used by the recoverable window (backup-list),
//! recovery targets and the recovery settings writer.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: microseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) struct UnixMicros(pub(crate) i64);

impl UnixMicros {
    pub(crate) fn now() -> UnixMicros {
        UnixMicros::from_system(SystemTime::now())
    }

    pub(crate) fn from_system(time: SystemTime) -> UnixMicros {
        let micros = time
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        UnixMicros(micros)
    }

    /// `20261130T091500Z`: whole seconds, UTC, the form keys are named with (sorts by time).
    pub(crate) fn compact(self) -> String {
        self.rfc3339_seconds().replace(['-', ':'], "")
    }

    /// `2026-11-30T09:15:00.123456Z`, for JSON reports; out-of-range times are clamped.
    pub(crate) fn rfc3339(self) -> String {
        humantime::format_rfc3339_micros(self.clamped()).to_string()
    }

    fn rfc3339_seconds(self) -> String {
        humantime::format_rfc3339_seconds(self.clamped()).to_string()
    }

    fn clamped(self) -> SystemTime {
        let micros = self.0.clamp(0, YEAR_10000 - 1);
        UNIX_EPOCH + Duration::from_micros(micros.unsigned_abs())
    }

    /// Seconds since the Unix epoch, as Prometheus takes times.
    pub(crate) fn seconds(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// Parses an RFC 3339 time such as a manifest's start or stop time.
    pub(crate) fn parse_rfc3339(text: &str) -> Option<UnixMicros> {
        humantime::parse_rfc3339_weak(text)
            .ok()
            .map(UnixMicros::from_system)
    }
}

/// The first microsecond of the year 10000, which four-digit years (and humantime) cannot show.
pub(crate) const YEAR_10000: i64 = 253_402_300_800_000_000;

/// `2026-11-21 12:00:00.123456+00`: what `recovery_target_time` is given, and what people read.
/// A time outside 1970..=9999 (only a forged summary holds one) is shown as the bare number.
impl fmt::Display for UnixMicros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let in_range = u64::try_from(self.0).ok().filter(|_| self.0 < YEAR_10000);
        let Some(micros) = in_range else {
            return write!(f, "{} µs from 1970 (out of range)", self.0);
        };
        let time = UNIX_EPOCH + Duration::from_micros(micros);
        let text = humantime::format_rfc3339_micros(time).to_string();
        write!(f, "{}+00", text.replace('T', " ").trim_end_matches('Z'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_in_utc_with_zone() {
        // 2025-11-21 12:00:00 UTC, plus five microseconds.
        assert_eq!(
            UnixMicros(1_763_726_400_000_005).to_string(),
            "2025-11-21 12:00:00.000005+00"
        );
        assert_eq!(
            UnixMicros(1_763_726_400_000_005).compact(),
            "20251121T120000Z"
        );
        assert_eq!(
            UnixMicros(1_763_726_400_000_005).rfc3339(),
            "2025-11-21T12:00:00.000005Z"
        );
    }
}
