//! The retention policy and the verdict it gives each backup.
//!
//! Rules combine as a union: `full = N` (the newest N full backups and their deltas, WAL from
//! the oldest of them on), `window` (what recovery to any instant of the last DUR needs),
//! `daily`/`weekly`/`monthly`/`yearly = N` (the newest backup of each of the last N calendar
//! periods, UTC, that have one, as restic's `forget --keep-*`), and pins. A kept backup keeps
//! its whole chain. Pure: no repository access, so the arithmetic is tested on its own.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use crate::backup::manifest::{BackupKind, BackupName, Summary};
use crate::time::UnixMicros;

/// What the configuration (or `delete`'s flags) asks to keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) full: Option<u32>,
    pub(crate) window: Option<Duration>,
    pub(crate) daily: Option<u32>,
    pub(crate) weekly: Option<u32>,
    pub(crate) monthly: Option<u32>,
    pub(crate) yearly: Option<u32>,
}

impl Policy {
    /// No rule at all: `delete` refuses rather than guess.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.full {
            parts.push(format!("full = {n}"));
        }
        if let Some(d) = self.window {
            parts.push(format!("window = {}", humantime::format_duration(d)));
        }
        for (name, n) in [
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ] {
            if let Some(n) = n {
                parts.push(format!("{name} = {n}"));
            }
        }
        if parts.is_empty() {
            f.write_str("no policy")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Why a backup is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Rule {
    Pinned,
    Full,
    Window,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Rule::Pinned => "pinned",
            Rule::Full => "full",
            Rule::Window => "window",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdicts for a catalog (oldest first), index for index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Verdicts {
    /// The rules that keep each backup; empty means it goes.
    pub(crate) kept_by: Vec<BTreeSet<Rule>>,
    /// The oldest backup `full` or `window` keeps for itself: WAL is kept from its start on.
    pub(crate) anchor: Option<usize>,
}

/// Applies `policy` to `backups` (oldest first). `usable` tells the backups on the history of
/// the current timeline: only those count for `full` and `window`, which promise recovery along
/// it.
pub(crate) fn verdicts(
    policy: &Policy,
    backups: &[Summary],
    pins: &BTreeSet<BackupName>,
    usable: impl Fn(&Summary) -> bool,
    now: UnixMicros,
) -> Verdicts {
    let n = backups.len();
    let mut kept_by = vec![BTreeSet::new(); n];
    let mut anchor: Option<usize> = None;
    let usable: Vec<usize> = (0..n).filter(|&i| usable(&backups[i])).collect();
    for (i, b) in backups.iter().enumerate() {
        if pins.contains(&b.name) {
            kept_by[i].insert(Rule::Pinned);
        }
    }
    if let Some(count) = policy.full.filter(|&c| c > 0) {
        let fulls: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|&i| backups[i].kind == BackupKind::Full)
            .collect();
        let kept = &fulls[fulls.len().saturating_sub(count as usize)..];
        if let Some(&oldest) = kept.first() {
            anchor = Some(anchor.map_or(oldest, |a| a.min(oldest)));
            // The kept fulls, and every usable backup after the oldest of them whose chain
            // starts at one of them (its deltas).
            for &i in usable.iter().filter(|&&i| i >= oldest) {
                if kept.contains(&root_of(backups, i)) {
                    kept_by[i].insert(Rule::Full);
                }
            }
        }
    }
    if let Some(window) = policy.window {
        let start = now
            .0
            .saturating_sub(i64::try_from(window.as_micros()).unwrap_or(i64::MAX));
        // The newest backup that ends before the window starts (recovery to the window's first
        // instant starts there), else the oldest there is.
        let first = usable
            .iter()
            .copied()
            .rev()
            .find(|&i| stop_of(&backups[i]).is_some_and(|t| t.0 <= start))
            .or_else(|| usable.first().copied());
        if let Some(first) = first {
            anchor = Some(anchor.map_or(first, |a| a.min(first)));
            for &i in usable.iter().filter(|&&i| i >= first) {
                kept_by[i].insert(Rule::Window);
            }
        }
    }
    for (rule, count, period) in [
        (Rule::Daily, policy.daily, Period::Day),
        (Rule::Weekly, policy.weekly, Period::Week),
        (Rule::Monthly, policy.monthly, Period::Month),
        (Rule::Yearly, policy.yearly, Period::Year),
    ] {
        let Some(count) = count else { continue };
        let mut seen = BTreeSet::new();
        for i in (0..n).rev() {
            if seen.len() >= count as usize {
                break;
            }
            let Some(stop) = stop_of(&backups[i]) else {
                continue;
            };
            if seen.insert(period.of(stop)) {
                kept_by[i].insert(rule);
            }
        }
    }
    // A kept delta keeps its chain: parents are older, so one pass from the newest suffices.
    for i in (0..n).rev() {
        if kept_by[i].is_empty() {
            continue;
        }
        if let Some(p) = parent_index(backups, i) {
            let rules = kept_by[i].clone();
            kept_by[p].extend(rules);
        }
    }
    Verdicts { kept_by, anchor }
}

fn stop_of(b: &Summary) -> Option<UnixMicros> {
    UnixMicros::parse_rfc3339(&b.stop_time)
}

fn parent_index(backups: &[Summary], i: usize) -> Option<usize> {
    let parent = backups[i].parent.as_ref()?;
    backups[..i].iter().rposition(|b| &b.name == parent)
}

/// The full backup a chain starts at (the backup itself when its parent is missing).
fn root_of(backups: &[Summary], mut i: usize) -> usize {
    while let Some(p) = parent_index(backups, i) {
        i = p;
    }
    i
}

/// A calendar period in UTC.
#[derive(Clone, Copy, Debug)]
enum Period {
    Day,
    /// ISO weeks, Monday to Sunday.
    Week,
    Month,
    Year,
}

impl Period {
    /// A number that differs between two times exactly when they lie in different periods.
    fn of(self, t: UnixMicros) -> i64 {
        let day = t.0.div_euclid(86_400_000_000);
        match self {
            Period::Day => day,
            // 1970-01-01 was a Thursday: shifting by three puts Mondays at multiples of seven.
            Period::Week => (day + 3).div_euclid(7),
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                y * 12 + i64::from(m)
            }
            Period::Year => civil_from_days(day).0,
        }
    }
}

/// Year, month (1-12) and day (1-31) of a day counted from 1970-01-01 (proleptic Gregorian;
/// Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::tests::sample;

    fn backup(name: &str, stop: &str, parent: Option<&Summary>) -> Summary {
        let mut s = sample(name, stop).summary;
        s.stop_time = stop.to_owned();
        if let Some(p) = parent {
            s.kind = BackupKind::Delta;
            s.parent = Some(p.name.clone());
        }
        s
    }

    fn now(text: &str) -> UnixMicros {
        UnixMicros::parse_rfc3339(text).unwrap()
    }

    fn kept(v: &Verdicts, backups: &[Summary]) -> Vec<String> {
        backups
            .iter()
            .zip(&v.kept_by)
            .map(|(b, rules)| {
                let rules: Vec<&str> = rules.iter().map(|r| r.as_str()).collect();
                format!("{}:{}", b.name, rules.join("+"))
            })
            .collect()
    }

    fn apply(policy: &Policy, backups: &[Summary], pins: &[&str], at: &str) -> Verdicts {
        let pins = pins.iter().map(|p| BackupName::parse(p).unwrap()).collect();
        verdicts(policy, backups, &pins, |_| true, now(at))
    }

    #[test]
    fn no_rule_is_no_policy() {
        assert!(Policy::default().is_empty());
        let policy = Policy {
            full: Some(1),
            daily: Some(7),
            ..Default::default()
        };
        assert_eq!(policy.to_string(), "full = 1, daily = 7");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 2024-02-29, a leap day, and 2026-11-30.
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_787), (2026, 11, 30));
    }

    #[test]
    fn calendar_periods_are_utc() {
        let t = |s: &str| now(s);
        // Sunday 23:59:59 and Monday 00:00:00 are different weeks; Monday and the Sunday after,
        // the same.
        let sunday = t("2026-11-29T23:59:59Z");
        let monday = t("2026-11-30T00:00:00Z");
        let next_sunday = t("2026-12-06T23:59:59Z");
        assert_ne!(Period::Week.of(sunday), Period::Week.of(monday));
        assert_eq!(Period::Week.of(monday), Period::Week.of(next_sunday));
        assert_ne!(Period::Day.of(sunday), Period::Day.of(monday));
        assert_ne!(Period::Month.of(monday), Period::Month.of(next_sunday));
        assert_eq!(Period::Year.of(monday), Period::Year.of(next_sunday));
        assert_ne!(
            Period::Year.of(t("2026-12-31T23:59:59Z")),
            Period::Year.of(t("2027-01-01T00:00:00Z"))
        );
    }

    /// Daily 2: the newest backup of each of the two newest days that have one; a day without
    /// backups does not count (restic's rule).
    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        let b = [
            backup("base_a", "2026-11-25T10:00:00Z", None),
            backup("base_b", "2026-11-27T08:00:00Z", None),
            backup("base_c", "2026-11-27T20:00:00Z", None),
            backup("base_d", "2026-11-30T01:00:00Z", None),
        ];
        let policy = Policy {
            daily: Some(2),
            ..Default::default()
        };
        let v = apply(&policy, &b, &[], "2026-11-30T12:00:00Z");
        assert_eq!(
            kept(&v, &b),
            ["base_a:", "base_b:", "base_c:daily", "base_d:daily"]
        );
        assert_eq!(v.anchor, None);
    }

    /// Full 1 keeps the newest full and its deltas; a delta kept by another rule keeps its full;
    /// rules unite.
    #[test]
    fn full_keeps_deltas_and_chains_keep_parents() {
        let f1 = backup("base_f1", "2026-11-01T00:00:00Z", None);
        let d1 = backup("base_d1", "2026-11-02T00:00:00Z", Some(&f1));
        let d2 = backup("base_d2", "2026-11-03T00:00:00Z", Some(&d1));
        let f2 = backup("base_f2", "2026-11-10T00:00:00Z", None);
        let d3 = backup("base_d3", "2026-11-11T00:00:00Z", Some(&f2));
        let b = [f1, d1, d2, f2, d3];
        let policy = Policy {
            full: Some(1),
            ..Default::default()
        };
        let v = apply(&policy, &b, &[], "2026-11-30T00:00:00Z");
        assert_eq!(
            kept(&v, &b),
            [
                "base_f1:",
                "base_d1:",
                "base_d2:",
                "base_f2:full",
                "base_d3:full"
            ]
        );
        assert_eq!(v.anchor, Some(3));
        // Pinning a delta pins its chain; monthly keeps the newest of November (d3).
        let policy = Policy {
            full: Some(1),
            monthly: Some(1),
            ..Default::default()
        };
        let v = apply(&policy, &b, &["base_d2"], "2026-11-30T00:00:00Z");
        assert_eq!(
            kept(&v, &b),
            [
                "base_f1:pinned",
                "base_d1:pinned",
                "base_d2:pinned",
                "base_f2:full+monthly",
                "base_d3:full+monthly"
            ]
        );
    }

    /// Window 7d on the 30th: the newest backup ending before the 23rd is the first kept.
    #[test]
    fn window_starts_at_the_newest_backup_before_it() {
        let b = [
            backup("base_a", "2026-11-10T00:00:00Z", None),
            backup("base_b", "2026-11-20T00:00:00Z", None),
            backup("base_c", "2026-11-25T00:00:00Z", None),
        ];
        let policy = Policy {
            window: Some(Duration::from_secs(7 * 86_400)),
            ..Default::default()
        };
        let v = apply(&policy, &b, &[], "2026-11-30T00:00:00Z");
        assert_eq!(kept(&v, &b), ["base_a:", "base_b:window", "base_c:window"]);
        assert_eq!(v.anchor, Some(1));
        // A window longer than the history keeps everything.
        let policy = Policy {
            window: Some(Duration::from_secs(365 * 86_400)),
            ..Default::default()
        };
        let v = apply(&policy, &b, &[], "2026-11-30T00:00:00Z");
        assert_eq!(v.anchor, Some(0));
        assert!(v.kept_by.iter().all(|r| r.contains(&Rule::Window)));
    }

    /// Backups off the current timeline's history never count for full or window.
    #[test]
    fn only_usable_backups_count_for_full() {
        let mut other = backup("base_b", "2026-11-20T00:00:00Z", None);
        other.timeline = 2;
        let b = [backup("base_a", "2026-11-10T00:00:00Z", None), other];
        let policy = Policy {
            full: Some(1),
            ..Default::default()
        };
        let v = verdicts(
            &policy,
            &b,
            &BTreeSet::new(),
            |s| s.timeline == 1,
            now("2026-11-30T00:00:00Z"),
        );
        assert_eq!(kept(&v, &b), ["base_a:full", "base_b:"]);
    }
}
