//! Recovery targets as the user writes them and as PostgreSQL's `recovery_target_*` settings
//! take them.
//!
//! Understands the time formats `--target-time` accepts: RFC 3339, `YYYY-MM-DD HH:MM:SS[.ffffff]`
//! with an optional zone (the local zone when none is given, as `psql` users expect) and a
//! duration before now (`-15m`). Used by the planner, the settings writer and `cmd/recover.rs`.

use std::fmt;

use walvault_wal::Lsn;

use crate::time::{UnixMicros, YEAR_10000};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum TargetError {
    #[error(
        "invalid target time {0:?}: expected RFC 3339 (2026-11-21T12:00:00Z), \
         YYYY-MM-DD HH:MM:SS[.ffffff][±HH:MM] (local time without a zone) or a duration before \
         now such as -15m"
    )]
    BadTime(String),
    #[error("target time {0:?} is before 1970 or too far in the future")]
    OutOfRange(String),
    #[error("recovery target name {0:?} must be 1 to 63 bytes")]
    BadName(String),
}

/// Where recovery should stop.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) enum Target {
    /// The first transaction end after this time (`recovery_target_time`, inclusive).
    Time(UnixMicros),
    /// `recovery_target_lsn`.
    Lsn(Lsn),
    /// The end of this transaction (`recovery_target_xid`).
    Xid(u32),
    /// A restore point (`recovery_target_name`).
    Name(String),
    /// The end of the backup (`recovery_target = 'immediate'`).
    Immediate,
    /// No target: replay all archived WAL.
    EndOfArchive,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {t}"),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Xid(x) => write!(f, "transaction {x}"),
            Target::Name(n) => write!(f, "restore point {n:?}"),
            Target::Immediate => f.write_str("the end of the backup (immediate)"),
            Target::EndOfArchive => f.write_str("the end of the archived WAL"),
        }
    }
}

/// Checks a restore point name: PostgreSQL keeps at most `MAXFNAMELEN - 1` bytes.
pub(crate) fn parse_name(text: &str) -> Result<String, TargetError> {
    if text.is_empty() || text.len() > 63 {
        return Err(TargetError::BadName(text.to_string()));
    }
    Ok(text.to_string())
}

/// Parses a `--target-time` value; `now` anchors relative times.
pub(crate) fn parse_time(text: &str, now: UnixMicros) -> Result<UnixMicros, TargetError> {
    let bad = || TargetError::BadTime(text.to_string());
    let trimmed = text.trim();
    if let Some(ago) = trimmed.strip_prefix('-') {
        let ago = humantime::parse_duration(ago.trim()).map_err(|_| bad())?;
        let ago = i64::try_from(ago.as_micros()).map_err(|_| bad())?;
        return Ok(UnixMicros(now.0.saturating_sub(ago)));
    }
    let (civil, zone) = split_zone(trimmed).ok_or_else(bad)?;
    let fields = Civil::parse(civil).ok_or_else(bad)?;
    let micros = match zone {
        Some(offset_secs) => fields.as_utc_micros() - i64::from(offset_secs) * 1_000_000,
        None => local_to_utc_micros(&fields).ok_or_else(|| TargetError::OutOfRange(text.into()))?,
    };
    if !(0..YEAR_10000).contains(&micros) {
        return Err(TargetError::OutOfRange(text.to_string()));
    }
    Ok(UnixMicros(micros))
}

/// Splits off a trailing zone: `Z`, `±HH`, `±HHMM` or `±HH:MM` (as seconds east of UTC).
fn split_zone(text: &str) -> Option<(&str, Option<i32>)> {
    if let Some(rest) = text.strip_suffix('Z').or_else(|| text.strip_suffix('z')) {
        return Some((rest.trim_end(), Some(0)));
    }
    // The zone sign comes after the time part, so look after the date's own dashes.
    let time_start = text.find([' ', 'T', 't'])?;
    let Some(sign_at) = text[time_start..].rfind(['+', '-']).map(|i| i + time_start) else {
        return Some((text, None));
    };
    let sign = if text.as_bytes()[sign_at] == b'-' {
        -1
    } else {
        1
    };
    let zone = text[sign_at + 1..].replace(':', "");
    // Checked before slicing by bytes below: user input may hold multi-byte characters.
    if !zone.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (hours, minutes) = match zone.len() {
        2 => (zone.parse::<i32>().ok()?, 0),
        4 => (
            zone[..2].parse::<i32>().ok()?,
            zone[2..].parse::<i32>().ok()?,
        ),
        _ => return None,
    };
    if hours > 15 || minutes > 59 {
        return None;
    }
    Some((
        text[..sign_at].trim_end(),
        Some(sign * (hours * 3600 + minutes * 60)),
    ))
}

/// A calendar date and wall-clock time without a zone.
#[derive(Debug, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    micros: u32,
}

impl Civil {
    /// `YYYY-MM-DD[T ]HH:MM:SS[.f{1,6}]`.
    fn parse(text: &str) -> Option<Civil> {
        let (date, time) = text.split_once([' ', 'T', 't'])?;
        let mut d = date.split('-');
        let (year, month, day) = (d.next()?, d.next()?, d.next()?);
        if d.next().is_some() || year.len() != 4 || month.len() != 2 || day.len() != 2 {
            return None;
        }
        let (hms, frac) = time.trim().split_once('.').unwrap_or((time.trim(), ""));
        let mut t = hms.split(':');
        let (hour, minute, second) = (t.next()?, t.next()?, t.next()?);
        if t.next().is_some() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let micros = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<6}").parse().ok()?
        };
        let civil = Civil {
            year: year.parse().ok()?,
            month: month.parse().ok()?,
            day: day.parse().ok()?,
            hour: hour.parse().ok()?,
            minute: minute.parse().ok()?,
            second: second.parse().ok()?,
            micros,
        };
        let valid = (1..=12).contains(&civil.month)
            && civil.day >= 1
            && civil.day <= days_in_month(civil.year, civil.month)
            && civil.hour < 24
            && civil.minute < 60
            && civil.second < 60;
        valid.then_some(civil)
    }

    /// The fields read as UTC.
    fn as_utc_micros(&self) -> i64 {
        let days = days_from_civil(self.year, self.month, self.day);
        let secs = days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second);
        secs * 1_000_000 + i64::from(self.micros)
    }
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Interprets wall-clock fields in the local time zone (`TZ`, else /etc/localtime) with the C
/// library's `mktime`, which knows the zone's daylight-saving rules.
fn local_to_utc_micros(civil: &Civil) -> Option<i64> {
    let mut tm = libc::tm {
        tm_sec: i32::try_from(civil.second).ok()?,
        tm_min: i32::try_from(civil.minute).ok()?,
        tm_hour: i32::try_from(civil.hour).ok()?,
        tm_mday: i32::try_from(civil.day).ok()?,
        tm_mon: i32::try_from(civil.month).ok()? - 1,
        tm_year: i32::try_from(civil.year - 1900).ok()?,
        tm_wday: 0,
        tm_yday: 0,
        // Let mktime decide whether daylight saving time applies.
        tm_isdst: -1,
        tm_gmtoff: 0,
        tm_zone: std::ptr::null(),
    };
    // SAFETY: `tm` is a fully initialised struct owned by this frame; mktime only reads and
    // normalises it and reads the process's time zone data.
    let secs = unsafe { libc::mktime(&mut tm) };
    (secs != -1).then(|| secs * 1_000_000 + i64::from(civil.micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMicros = UnixMicros(1_763_726_400_000_000); // 2025-11-21 12:00:00 UTC

    #[test]
    fn zoned_times() {
        let t = |s| parse_time(s, NOW).unwrap();
        assert_eq!(t("2025-11-21T12:00:00Z"), NOW);
        assert_eq!(t("2025-11-21 12:00:00+00"), NOW);
        assert_eq!(t("2025-11-21 14:00:00+02:00"), NOW);
        assert_eq!(t("2025-11-21 06:30:00-0530"), NOW);
        assert_eq!(t("2025-11-21 12:00:00.25Z"), UnixMicros(NOW.0 + 250_000));
        assert_eq!(t("2024-02-29T00:00:00Z"), UnixMicros(1_709_164_800_000_000));
    }

    #[test]
    fn relative_times() {
        assert_eq!(
            parse_time("-15m", NOW).unwrap(),
            UnixMicros(NOW.0 - 900_000_000)
        );
        assert_eq!(
            parse_time("-1h 30m", NOW).unwrap(),
            UnixMicros(NOW.0 - 5_400_000_000)
        );
    }

    #[test]
    fn local_times_are_offset_from_utc() {
        // Whatever the machine's zone, a local reading differs from UTC by a zone offset: a
        // whole number of quarter hours, at most 14 hours. (Setting TZ here would race with
        // other tests reading the environment.)
        let local = parse_time("2025-11-21 12:00:00", NOW).unwrap();
        let offset = (local.0 - NOW.0).abs();
        assert_eq!(offset % 900_000_000, 0, "{local:?}");
        assert!(offset <= 14 * 3_600_000_000, "{local:?}");
    }

    #[test]
    fn bad_times() {
        for bad in [
            "",
            "yesterday",
            "2025-13-01 00:00:00",
            "2025-02-30 00:00:00Z",
            "2025-11-21",
            "-",
            "2025-11-21 12:00:00+25",
            "2025-11-21 12:00:00+aé1",
            "2025-11-21 12:00:00+0é",
            "2025-11-21 12:00:00+é",
            "2025-11-21 12:00:00-€",
            "2025-11-21T€2:00:00Z",
            "2025-11-21 12:00:00.5é",
            "é025-11-21 12:00:00",
            "-1é",
            "-99999999999999999999999y",
        ] {
            assert!(parse_time(bad, NOW).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn times_past_year_9999_are_refused_and_shown_without_panic() {
        assert_eq!(
            parse_time("9999-12-31 23:59:59-15:00", NOW),
            Err(TargetError::OutOfRange("9999-12-31 23:59:59-15:00".into()))
        );
        assert_eq!(
            parse_time("9999-12-31 23:59:59Z", NOW).unwrap().to_string(),
            "9999-12-31 23:59:59.000000+00"
        );
        // Summaries are untrusted: whatever time they hold must display.
        for micros in [i64::MAX, YEAR_10000, -1, i64::MIN] {
            assert!(UnixMicros(micros).to_string().contains("out of range"));
        }
    }
}
