//! Timeline history files (`00000002.history`) and backup history files
//! (`<segment>.00000028.backup`, whose format `backup_label` shares).
//!
//! Understands what `timeline.c` (`readTimeLineHistory`,
//! `tliOfPointInHistory`) and `xlogrecovery.c` (`XLogFileReadAnyTLI`) make
//! of a history file, and the `KEY: value` lines `pg_backup_stop` writes.
//! Used by restore and PITR planning to know which timeline owns which part
//! of the WAL, and by backup listing to find where each backup's WAL starts.

use crate::error::WalError;
use crate::lsn::Lsn;
use crate::name::{SegmentNo, WalFileName, WalSegmentSize};
use crate::timeline::TimelineId;

/// One line of a history file: `parent` ran until `switch_lsn`, where its
/// child (the next entry's parent, or the file's own timeline) took over.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HistoryEntry {
    /// An ancestor timeline.
    pub parent: TimelineId,
    /// The first LSN that belongs to the ancestor's child rather than to it.
    pub switch_lsn: Lsn,
    /// Free text PostgreSQL records, e.g. `no recovery target specified`.
    pub reason: String,
}

/// The ancestry of `timeline`, oldest ancestor first.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TimelineHistory {
    /// The timeline whose history this is (the one in the file name).
    pub timeline: TimelineId,
    /// Its ancestors, oldest first.
    pub entries: Vec<HistoryEntry>,
}

/// The stretch of WAL one timeline of a history owns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TimelineSpan {
    /// The timeline.
    pub tli: TimelineId,
    /// Where it starts owning WAL; [`Lsn::INVALID`] for the oldest ancestor.
    pub begin: Lsn,
    /// Where the next timeline takes over; `None` for the newest one.
    pub end: Option<Lsn>,
}

impl TimelineHistory {
    /// Parses the contents of `<tli>.history`.
    ///
    /// Like PostgreSQL, skips blank lines and lines starting with `#` (after
    /// whitespace), reads a decimal parent TLI and an `X/Y` switch point
    /// separated by whitespace, and ignores the rest of the line except to
    /// keep it as the reason. Beyond what PostgreSQL enforces (increasing
    /// parent TLIs, all below `tli`), also requires nonzero TLIs and
    /// non-decreasing switch points, since anything else cannot come from a
    /// real promotion and would make [`TimelineHistory::timeline_at`]
    /// meaningless.
    pub fn parse(tli: TimelineId, text: &str) -> Result<TimelineHistory, WalError> {
        let file = WalFileName::History(tli).to_string();
        let mut entries: Vec<HistoryEntry> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let bad = |problem: String| WalError::BadHistory {
                file: file.clone(),
                line: index + 1,
                problem,
            };
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (tli_text, rest) = split_field(trimmed);
            let parent = tli_text
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| tli_text.parse::<u32>().ok())
                .flatten()
                .filter(|&t| t != 0)
                .map(TimelineId)
                .ok_or_else(|| {
                    bad(format!(
                        "expected a decimal timeline ID, found {tli_text:?}"
                    ))
                })?;
            let (lsn_text, reason) = split_field(rest.trim_start());
            let switch_lsn = lsn_text.parse::<Lsn>().map_err(|_| {
                bad(format!(
                    "expected a switch point X/Y after timeline {}, found {lsn_text:?}",
                    parent.0
                ))
            })?;
            if let Some(prev) = entries.last() {
                if parent <= prev.parent {
                    return Err(bad(format!(
                        "timeline {} does not follow timeline {}: parent timelines must increase",
                        parent.0, prev.parent.0
                    )));
                }
                if switch_lsn < prev.switch_lsn {
                    return Err(bad(format!(
                        "switch point {switch_lsn} of timeline {} is before switch point {} of timeline {}",
                        parent.0, prev.switch_lsn, prev.parent.0
                    )));
                }
            }
            if parent >= tli {
                return Err(bad(format!(
                    "parent timeline {} is not older than the file's timeline {}",
                    parent.0, tli.0
                )));
            }
            entries.push(HistoryEntry {
                parent,
                switch_lsn,
                reason: reason.trim().to_string(),
            });
        }
        Ok(TimelineHistory {
            timeline: tli,
            entries,
        })
    }

    /// The timeline that owns `lsn` in this history (`tliOfPointInHistory`):
    /// the first ancestor before its switch point, and so on, with
    /// `self.timeline` from the last switch point on.
    pub fn timeline_at(&self, lsn: Lsn) -> TimelineId {
        self.entries
            .iter()
            .find(|e| lsn < e.switch_lsn)
            .map_or(self.timeline, |e| e.parent)
    }

    /// The direct parent of this timeline, `None` for a history without entries.
    pub fn parent(&self) -> Option<TimelineId> {
        self.entries.last().map(|e| e.parent)
    }

    /// Whether `tli` is this timeline or one of its ancestors.
    pub fn contains(&self, tli: TimelineId) -> bool {
        tli == self.timeline || self.entries.iter().any(|e| e.parent == tli)
    }

    /// Where the history leaves `tli` for its child (`tliSwitchPoint`):
    /// `None` for `self.timeline` and for timelines not in this history.
    pub fn switch_point(&self, tli: TimelineId) -> Option<Lsn> {
        self.entries
            .iter()
            .find(|e| e.parent == tli)
            .map(|e| e.switch_lsn)
    }

    /// Every timeline of the history with the WAL it owns, oldest first.
    pub fn spans(&self) -> Vec<TimelineSpan> {
        let mut begin = Lsn::INVALID;
        let mut spans = Vec::with_capacity(self.entries.len() + 1);
        for e in &self.entries {
            spans.push(TimelineSpan {
                tli: e.parent,
                begin,
                end: Some(e.switch_lsn),
            });
            begin = e.switch_lsn;
        }
        spans.push(TimelineSpan {
            tli: self.timeline,
            begin,
            end: None,
        });
        spans
    }

    /// The timelines recovery tries for segment `segno`, in the order it
    /// tries them (`XLogFileReadAnyTLI`): newest first, skipping timelines
    /// that begin after the segment. Older timelines are not skipped even if
    /// they ended before the segment, because PostgreSQL does not skip them.
    pub fn timelines_for_segment(
        &self,
        segno: SegmentNo,
        seg_size: WalSegmentSize,
    ) -> Vec<TimelineId> {
        self.spans()
            .iter()
            .rev()
            .filter(|s| !s.begin.is_valid() || s.begin.segment_number(seg_size) <= segno)
            .map(|s| s.tli)
            .collect()
    }
}

/// Splits off the first whitespace-delimited field.
fn split_field(s: &str) -> (&str, &str) {
    s.split_once(char::is_whitespace).unwrap_or((s, ""))
}

/// What walvault needs from a backup history file (`.backup`), which
/// `pg_backup_stop` writes and archives, or from a `backup_label`, which has
/// the same lines without the STOP ones.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BackupHistory {
    /// `START WAL LOCATION`: where replay of the backup must begin.
    pub start_lsn: Lsn,
    /// `STOP WAL LOCATION`: the backup is consistent once replay reaches it.
    pub stop_lsn: Option<Lsn>,
    /// `LABEL`: the label given to `pg_backup_start`, verbatim.
    pub label: Option<String>,
}

const START_KEY: &str = "START WAL LOCATION";
const STOP_KEY: &str = "STOP WAL LOCATION";
const LABEL_KEY: &str = "LABEL";

impl BackupHistory {
    /// Parses the `KEY: value` lines; unknown keys (`CHECKPOINT LOCATION`,
    /// `BACKUP METHOD`, `START TIME`, ...) are skipped so new PostgreSQL
    /// versions do not break it. Only `START WAL LOCATION` is required.
    pub fn parse(text: &str) -> Result<BackupHistory, WalError> {
        let mut start_lsn = None;
        let mut stop_lsn = None;
        let mut label = None;
        for (index, line) in text.lines().enumerate() {
            let bad = |problem: String| WalError::BadBackupHistory {
                line: index + 1,
                problem,
            };
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key {
                START_KEY | STOP_KEY => {
                    // The value is `X/Y (file <segment name>)`; the LSN is
                    // what counts, the file name is derived from it.
                    let lsn_text = value.split_whitespace().next().unwrap_or("");
                    let lsn = lsn_text.parse::<Lsn>().map_err(|_| {
                        bad(format!("{key}: expected an LSN X/Y, found {lsn_text:?}"))
                    })?;
                    let slot = if key == START_KEY {
                        &mut start_lsn
                    } else {
                        &mut stop_lsn
                    };
                    if slot.replace(lsn).is_some() {
                        return Err(bad(format!("{key} appears twice")));
                    }
                }
                LABEL_KEY => {
                    // PostgreSQL writes "LABEL: %s"; keep the label byte for
                    // byte apart from that one separating space.
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    if label.replace(value.to_string()).is_some() {
                        return Err(bad(format!("{key} appears twice")));
                    }
                }
                _ => {}
            }
        }
        Ok(BackupHistory {
            start_lsn: start_lsn.ok_or(WalError::BackupHistoryNoStart)?,
            stop_lsn,
            label,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    /// What PostgreSQL writes after two promotions (timeline 3).
    const TLI3: &str = "1\t0/3000158\tno recovery target specified\n\
                        \n\
                        2\t0/5000000\tbefore 2024-05-01 12:00:00+00\n";

    fn history(tli: u32, text: &str) -> Result<TimelineHistory, WalError> {
        TimelineHistory::parse(TimelineId(tli), text)
    }

    #[test]
    fn parses_postgres_output() {
        let h = history(3, TLI3).unwrap();
        assert_eq!(h.timeline, TimelineId(3));
        assert_eq!(
            h.entries,
            vec![
                HistoryEntry {
                    parent: TimelineId(1),
                    switch_lsn: lsn("0/3000158"),
                    reason: "no recovery target specified".into()
                },
                HistoryEntry {
                    parent: TimelineId(2),
                    switch_lsn: lsn("0/5000000"),
                    reason: "before 2024-05-01 12:00:00+00".into()
                },
            ]
        );
        assert_eq!(h.parent(), Some(TimelineId(2)));
    }

    #[test]
    fn parent_tli_is_decimal() {
        // Timeline 10 is written "10" in the file, not "A" or "0000000A".
        let h = history(11, "10\t1/0\tr\n").unwrap();
        assert_eq!(h.entries[0].parent, TimelineId(10));
        let err = history(11, "A\t1/0\tr\n").unwrap_err();
        assert!(err.to_string().contains("\"A\""), "{err}");
    }

    #[test]
    fn skips_comments_blank_lines_and_accepts_any_whitespace() {
        let text = "# made by hand\n   \n\t# indented comment\n1 0/3000158 reason with  spaces \r\n  2\t\t0/0416B374\n";
        let h = history(3, text).unwrap();
        assert_eq!(h.entries.len(), 2);
        assert_eq!(h.entries[0].reason, "reason with  spaces");
        assert_eq!(h.entries[1].parent, TimelineId(2));
        assert_eq!(h.entries[1].switch_lsn, lsn("0/416B374"));
        assert_eq!(h.entries[1].reason, "");
        // No trailing newline, and a file with no entries at all.
        assert_eq!(history(2, "1\t0/3000158\tx").unwrap().entries.len(), 1);
        assert!(history(2, "").unwrap().entries.is_empty());
        assert!(history(2, "# nothing\n").unwrap().entries.is_empty());
    }

    fn bad_line(tli: u32, text: &str) -> (String, usize, String) {
        match history(tli, text) {
            Err(WalError::BadHistory {
                file,
                line,
                problem,
            }) => (file, line, problem),
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_ordering() {
        let (file, line, problem) = bad_line(4, "# c\n2\t0/3000000\tr\n1\t0/4000000\tr\n");
        assert_eq!((file.as_str(), line), ("00000004.history", 3));
        assert!(problem.contains("must increase"), "{problem}");
        let (_, line, _) = bad_line(4, "1\t0/3000000\tr\n1\t0/4000000\tr\n");
        assert_eq!(line, 2);
        let (_, line, problem) = bad_line(4, "1\t0/5000000\tr\n2\t0/4000000\tr\n");
        assert_eq!(line, 2);
        assert!(
            problem.contains("0/4000000") && problem.contains("0/5000000"),
            "{problem}"
        );
        // Equal switch points happen when a timeline is promoted again at once.
        assert!(history(4, "1\t0/5000000\tr\n2\t0/5000000\tr\n").is_ok());
    }

    #[test]
    fn rejects_parents_not_older_than_the_file() {
        let (file, line, _) = bad_line(2, "1\t0/3000000\tr\n2\t0/4000000\tr\n");
        assert_eq!((file.as_str(), line), ("00000002.history", 2));
        let (_, line, _) = bad_line(2, "5\t0/3000000\tr\n");
        assert_eq!(line, 1);
    }

    #[test]
    fn rejects_syntax_errors() {
        for (text, line) in [
            ("x\t0/3000000\n", 1),
            ("1\n", 1),
            ("1\t\n", 1),
            ("1\t3000000\treason\n", 1),
            ("1\t0/zz\treason\n", 1),
            ("\n# ok\n1/0\t0/3000000\n", 3),
            ("-1\t0/3000000\n", 1),
            ("+1\t0/3000000\n", 1),
            ("0\t0/3000000\n", 1),
            ("99999999999\t0/3000000\n", 1),
            ("1\t0/3000000\tr\n2;\t0/4000000\n", 2),
        ] {
            let (file, got, problem) = bad_line(5, text);
            assert_eq!(file, "00000005.history");
            assert_eq!(got, line, "{text:?}: {problem}");
        }
        let err = history(5, "1\t0/zz\n").unwrap_err().to_string();
        assert!(err.starts_with("00000005.history line 1: "), "{err}");
        assert!(err.contains("\"0/zz\""), "{err}");
    }

    #[test]
    fn timeline_at() {
        let h = history(3, TLI3).unwrap();
        assert_eq!(h.timeline_at(Lsn(0)), TimelineId(1));
        assert_eq!(h.timeline_at(lsn("0/3000157")), TimelineId(1));
        assert_eq!(h.timeline_at(lsn("0/3000158")), TimelineId(2));
        assert_eq!(h.timeline_at(lsn("0/4FFFFFF")), TimelineId(2));
        assert_eq!(h.timeline_at(lsn("0/5000000")), TimelineId(3));
        assert_eq!(h.timeline_at(Lsn(u64::MAX)), TimelineId(3));
        let empty = history(2, "").unwrap();
        assert_eq!(empty.timeline_at(Lsn(0)), TimelineId(2));
        // Timeline 2 owns nothing when 3 branched from it at the same point.
        let h = history(3, "1\t0/5000000\n2\t0/5000000\n").unwrap();
        assert_eq!(h.timeline_at(lsn("0/4FFFFFF")), TimelineId(1));
        assert_eq!(h.timeline_at(lsn("0/5000000")), TimelineId(3));
    }

    #[test]
    fn lookups() {
        let h = history(3, TLI3).unwrap();
        assert!(
            h.contains(TimelineId(1)) && h.contains(TimelineId(2)) && h.contains(TimelineId(3))
        );
        assert!(!h.contains(TimelineId(4)));
        assert_eq!(h.switch_point(TimelineId(1)), Some(lsn("0/3000158")));
        assert_eq!(h.switch_point(TimelineId(2)), Some(lsn("0/5000000")));
        assert_eq!(h.switch_point(TimelineId(3)), None);
        assert_eq!(h.switch_point(TimelineId(7)), None);
        assert_eq!(history(2, "").unwrap().parent(), None);
        assert_eq!(
            h.spans(),
            vec![
                TimelineSpan {
                    tli: TimelineId(1),
                    begin: Lsn::INVALID,
                    end: Some(lsn("0/3000158"))
                },
                TimelineSpan {
                    tli: TimelineId(2),
                    begin: lsn("0/3000158"),
                    end: Some(lsn("0/5000000"))
                },
                TimelineSpan {
                    tli: TimelineId(3),
                    begin: lsn("0/5000000"),
                    end: None
                },
            ]
        );
    }

    #[test]
    fn timelines_for_segment_follow_recovery_order() {
        let h = history(3, TLI3).unwrap();
        let seg = WalSegmentSize::DEFAULT;
        let tlis = |n: u64| -> Vec<u32> {
            h.timelines_for_segment(SegmentNo(n), seg)
                .iter()
                .map(|t| t.0)
                .collect()
        };
        assert_eq!(tlis(1), [1]);
        assert_eq!(tlis(2), [1]);
        // Segment 3 holds the switch to timeline 2, so both have a copy.
        assert_eq!(tlis(3), [2, 1]);
        assert_eq!(tlis(4), [2, 1]);
        assert_eq!(tlis(5), [3, 2, 1]);
        assert_eq!(tlis(100), [3, 2, 1]);
    }

    const BACKUP: &str = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                          STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n\
                          CHECKPOINT LOCATION: 0/2000060\n\
                          BACKUP METHOD: streamed\n\
                          BACKUP FROM: primary\n\
                          START TIME: 2024-05-01 12:00:00 UTC\n\
                          LABEL: nightly: full  \n\
                          START TIMELINE: 1\n\
                          STOP TIME: 2024-05-01 12:00:05 UTC\n\
                          STOP TIMELINE: 1\n";

    #[test]
    fn parses_backup_history() {
        let b = BackupHistory::parse(BACKUP).unwrap();
        assert_eq!(
            b,
            BackupHistory {
                start_lsn: lsn("0/2000028"),
                stop_lsn: Some(lsn("0/2000100")),
                label: Some("nightly: full  ".into()),
            }
        );
    }

    #[test]
    fn parses_backup_label_without_stop() {
        let text = "START WAL LOCATION: 1/A2000028 (file 0000000200000001000000A2)\n\
                    CHECKPOINT LOCATION: 1/A2000060\n\
                    BACKUP METHOD: streamed\n\
                    BACKUP FROM: primary\n\
                    START TIME: 2024-05-01 12:00:00 UTC\n\
                    LABEL: \n\
                    START TIMELINE: 2\n";
        let b = BackupHistory::parse(text).unwrap();
        assert_eq!(b.start_lsn, lsn("1/A2000028"));
        assert_eq!(b.stop_lsn, None);
        assert_eq!(b.label.as_deref(), Some(""));
        let minimal = BackupHistory::parse("START WAL LOCATION: 0/2000028\r\n").unwrap();
        assert_eq!(
            minimal,
            BackupHistory {
                start_lsn: lsn("0/2000028"),
                stop_lsn: None,
                label: None
            }
        );
    }

    #[test]
    fn backup_history_errors() {
        assert_eq!(
            BackupHistory::parse(""),
            Err(WalError::BackupHistoryNoStart)
        );
        assert_eq!(
            BackupHistory::parse("STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n"),
            Err(WalError::BackupHistoryNoStart)
        );
        let err = BackupHistory::parse(
            "LABEL: x\nSTART WAL LOCATION: 0/zz (file 000000010000000000000002)\n",
        )
        .unwrap_err();
        assert!(
            matches!(&err, WalError::BadBackupHistory { line: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"0/zz\""), "{err}");
        let err = BackupHistory::parse("START WAL LOCATION:\n").unwrap_err();
        assert!(
            matches!(err, WalError::BadBackupHistory { line: 1, .. }),
            "{err:?}"
        );
        let twice = "START WAL LOCATION: 0/1\nSTART WAL LOCATION: 0/2\n";
        assert!(matches!(
            BackupHistory::parse(twice),
            Err(WalError::BadBackupHistory { line: 2, .. })
        ));
        let twice = "START WAL LOCATION: 0/1\nLABEL: a\nLABEL: b\n";
        assert!(matches!(
            BackupHistory::parse(twice),
            Err(WalError::BadBackupHistory { line: 3, .. })
        ));
    }
}
