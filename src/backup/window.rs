//! The recoverable window: what the repository can be recovered to along one timeline's history,
//! from the end of the oldest usable backup to the last archived transaction end.
//!
//! Understands the catalog's backups, the archived WAL segments and timeline history files, which
//! timeline owns each segment along a history, and reads segment summaries ahead concurrently.
//! Used by backup-list (the window it prints), the recovery planner (the walk it checks) and
//! retention (the window before and after, and its proof).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use walvault_wal::{
    Lsn, SegmentName, SegmentNo, TimelineHistory, TimelineId, WalError, WalFileName, WalSegmentSize,
};

use crate::backup::manifest::{BackupName, Summary};
use crate::backup::BackupError;
use crate::repo::layout::{self, Listing, ObjectKey};
use crate::repo::{LengthRule, RepoError, Repository};
use crate::time::UnixMicros;
use crate::wal::summary::{self, SegmentSummary};

#[derive(Debug, thiserror::Error)]
pub(crate) enum WindowError {
    #[error("the repository has no backups: nothing to recover from (take one with backup-push)")]
    NoBackups,
    #[error("backup {backup}: {problem}")]
    SegmentSize {
        backup: BackupName,
        problem: WalError,
    },
    #[error("timeline {0} has neither a history file nor WAL in the archive")]
    NoTimeline(u32),
    #[error("{0}")]
    History(WalError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Which timeline to recover along (`recovery_target_timeline`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimelineChoice {
    /// The newest timeline with a history file in the archive.
    Latest,
    Id(TimelineId),
}

impl TimelineChoice {
    pub(crate) fn parse(text: &str) -> Result<TimelineChoice, String> {
        if text == "latest" {
            return Ok(TimelineChoice::Latest);
        }
        match text.parse::<u32>() {
            Ok(n) if n > 0 => Ok(TimelineChoice::Id(TimelineId(n))),
            _ => Err(format!(
                "{text:?} is not a timeline: expected latest or a number from 1"
            )),
        }
    }
}

/// What can be recovered: from the end of the oldest backup to the last transaction end in the
/// archive. Printed by backup-list and with every refusal to recover.
#[derive(Clone, Debug, Default)]
pub(crate) struct Window {
    /// The oldest usable backup: its name, stop time and stop LSN.
    pub(crate) oldest_backup_end: Option<(BackupName, String, Lsn)>,
    pub(crate) last_xact_end: Option<summary::Mark>,
    pub(crate) newest_segment: Option<SegmentName>,
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, end) = match &self.oldest_backup_end {
            None => return f.write_str("nothing is recoverable: the repository has no backups"),
            Some((name, time, lsn)) => {
                write!(f, "from {time} (LSN {lsn}, end of the oldest backup)")?;
                (name, *lsn)
            }
        };
        match (&self.last_xact_end, &self.newest_segment) {
            (Some(mark), _) if mark.lsn < end => write!(
                f,
                ": recoverable only to the end of backup {name} (no later transaction archived)"
            ),
            (Some(mark), _) => write!(
                f,
                " to {} (LSN {}, the last archived transaction end)",
                UnixMicros(mark.time_us),
                mark.lsn
            ),
            (None, Some(seg)) => write!(f, " to the end of segment {seg} (no commit times known)"),
            (None, None) => f.write_str(" to the backup's end (no WAL is archived)"),
        }
    }
}

/// What the repository holds along one timeline's history.
pub(crate) struct Recoverable {
    /// The catalog, oldest first.
    pub(crate) backups: Vec<Summary>,
    pub(crate) archive: Archive,
    pub(crate) history: TimelineHistory,
    pub(crate) window: Window,
}

impl Recoverable {
    pub(crate) async fn load(
        repo: &Repository,
        timeline: TimelineChoice,
    ) -> Result<Recoverable, WindowError> {
        let backups = crate::backup::catalog::list(repo).await?;
        let Some(newest) = backups.last() else {
            return Err(WindowError::NoBackups);
        };
        let seg_size = WalSegmentSize::new(u64::from(newest.wal_segment_size)).map_err(|e| {
            WindowError::SegmentSize {
                backup: newest.name.clone(),
                problem: e,
            }
        })?;
        let archive = Archive::load(repo, seg_size).await?;
        let history = target_history(repo, &archive, timeline, newest).await?;
        let window = window_along(repo, &backups, &archive, &history).await;
        Ok(Recoverable {
            backups,
            archive,
            history,
            window,
        })
    }

    /// Whether recovery along the history can start from `backup`: taken on a timeline of it,
    /// before that timeline ended.
    pub(crate) fn usable(&self, backup: &Summary) -> bool {
        usable_on(backup, &self.history)
    }

    /// The window along each of the `newest` highest timelines the archive holds (a segment or
    /// a history file), in timeline order: an older timeline stays recoverable up to where it
    /// was left (with `recovery_target_timeline` naming it). Each costs a history file and a
    /// bounded tail of summaries, hence the limit. A timeline whose history cannot be read is
    /// reported with its error.
    pub(crate) async fn windows_by_timeline(
        &self,
        repo: &Repository,
        newest: usize,
    ) -> Vec<(TimelineId, Result<Window, WindowError>)> {
        let mut timelines: BTreeSet<TimelineId> = self.archive.histories.clone();
        timelines.extend(self.archive.segments.keys().map(|s| s.tli));
        let skipped = timelines.len().saturating_sub(newest);
        let Some(newest_backup) = self.backups.last() else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(timelines.len() - skipped);
        for tli in timelines.into_iter().skip(skipped) {
            let window = if tli == self.history.timeline {
                Ok(self.window.clone())
            } else {
                match target_history(repo, &self.archive, TimelineChoice::Id(tli), newest_backup)
                    .await
                {
                    Ok(history) => {
                        Ok(window_along(repo, &self.backups, &self.archive, &history).await)
                    }
                    Err(e) => Err(e),
                }
            };
            out.push((tli, window));
        }
        out
    }

    /// A walk over the archived segments of the history.
    pub(crate) fn walk<'a>(&'a self, repo: &'a Arc<Repository>) -> Walk<'a> {
        Walk {
            repo,
            archive: &self.archive,
            history: &self.history,
        }
    }
}

/// The window along `history`: from the end of its first backup to its last archived
/// transaction end.
async fn window_along(
    repo: &Repository,
    backups: &[Summary],
    archive: &Archive,
    history: &TimelineHistory,
) -> Window {
    let newest_segment = archive.newest_on(history);
    Window {
        oldest_backup_end: first_backup(backups, archive, history, newest_segment)
            .map(|b| (b.name.clone(), b.stop_time.clone(), b.stop_lsn)),
        last_xact_end: last_xact_end(repo, archive, history, newest_segment).await,
        newest_segment,
    }
}

/// The backup the window starts at: the oldest usable one from whose start every segment to the
/// newest is archived along the history (retention may keep older backups restorable only to
/// their own end), else the oldest usable one.
fn first_backup<'a>(
    backups: &'a [Summary],
    archive: &Archive,
    history: &TimelineHistory,
    newest: Option<SegmentName>,
) -> Option<&'a Summary> {
    let mut usable = backups.iter().filter(|b| usable_on(b, history));
    let Some(newest) = newest.and_then(|s| archive.segno(&s)) else {
        return usable.next();
    };
    let archived = |no: u64| {
        archive
            .name_on(history, SegmentNo(no))
            .is_some_and(|n| archive.segments.contains_key(&n))
    };
    let mut from = newest.0;
    while from > 0 && archived(from - 1) {
        from -= 1;
    }
    let oldest = usable.clone().next();
    usable
        .find(|b| b.start_lsn.segment_number(archive.seg_size).0 >= from)
        .or(oldest)
}

fn usable_on(backup: &Summary, history: &TimelineHistory) -> bool {
    history.timeline_at(backup.start_lsn) == TimelineId(backup.timeline)
}

/// The archived WAL, by kind.
pub(crate) struct Archive {
    /// Archived segments and their stored sizes.
    segments: BTreeMap<SegmentName, u64>,
    histories: BTreeSet<TimelineId>,
    seg_size: WalSegmentSize,
}

impl Archive {
    async fn load(repo: &Repository, seg_size: WalSegmentSize) -> Result<Archive, RepoError> {
        let mut archive = Archive {
            segments: BTreeMap::new(),
            histories: BTreeSet::new(),
            seg_size,
        };
        // Streamed: only the parsed names are kept, not a key string per archived file.
        repo.list_each(Listing::Wal, &mut |object| {
            let Some(ObjectKey::Wal(name)) = ObjectKey::parse(&object.key) else {
                return;
            };
            match name {
                WalFileName::Segment(seg) => {
                    archive.segments.insert(seg, object.size);
                }
                WalFileName::History(tli) => {
                    archive.histories.insert(tli);
                }
                _ => {}
            }
        })
        .await?;
        Ok(archive)
    }

    pub(crate) fn seg_size(&self) -> WalSegmentSize {
        self.seg_size
    }

    /// The stored size of an archived segment.
    pub(crate) fn stored_size(&self, seg: &SegmentName) -> Option<u64> {
        self.segments.get(seg).copied()
    }

    pub(crate) fn segno(&self, seg: &SegmentName) -> Option<SegmentNo> {
        seg.segno(self.seg_size).ok()
    }

    /// The name segment `segno` has on the path of `history`: the timeline that owns the
    /// segment's last byte, since that timeline's copy also holds the part before a switch.
    fn name_on(&self, history: &TimelineHistory, segno: SegmentNo) -> Option<SegmentName> {
        let end = SegmentNo(segno.0 + 1).start_lsn(self.seg_size).ok()?;
        let tli = history.timeline_at(Lsn(end.0.saturating_sub(1)));
        SegmentName::new(tli, segno, self.seg_size).ok()
    }

    /// The highest segment number archived on any timeline of `history`.
    fn newest_on(&self, history: &TimelineHistory) -> Option<SegmentName> {
        self.segments
            .keys()
            .filter(|s| history.contains(s.tli))
            .filter_map(|s| self.segno(s).and_then(|n| self.name_on(history, n)))
            .filter(|s| self.segments.contains_key(s))
            .max_by_key(|s| self.segno(s))
    }
}

/// The history of the timeline to recover along: the chosen one, or for `latest` the newest
/// timeline with a history file (or of the newest backup, if later).
async fn target_history(
    repo: &Repository,
    archive: &Archive,
    choice: TimelineChoice,
    newest_backup: &Summary,
) -> Result<TimelineHistory, WindowError> {
    let tli = match choice {
        TimelineChoice::Id(tli) => tli,
        TimelineChoice::Latest => archive
            .histories
            .iter()
            .copied()
            .max()
            .unwrap_or(TimelineId(1))
            .max(TimelineId(newest_backup.timeline)),
    };
    if tli == TimelineId(1) {
        return Ok(TimelineHistory {
            timeline: tli,
            entries: Vec::new(),
        });
    }
    let key = layout::wal(&WalFileName::History(tli));
    // Repository content: a forged object declaring gigabytes is refused before it is read.
    let rule = LengthRule::AtMost(crate::wal::history::MAX_LEN);
    let Some(bytes) = repo.get_bytes_checked(&key, rule).await? else {
        if archive.segments.keys().any(|s| s.tli == tli) {
            // A timeline without a history file has no ancestors (initdb's timeline, or a
            // cluster whose history was never archived): follow it alone.
            return Ok(TimelineHistory {
                timeline: tli,
                entries: Vec::new(),
            });
        }
        return Err(WindowError::NoTimeline(tli.0));
    };
    let text = String::from_utf8_lossy(&bytes);
    TimelineHistory::parse(tli, &text).map_err(WindowError::History)
}

/// The latest-timed transaction end in the archive, looking back from the newest segment through at
/// most a bounded number of summaries (a quiet cluster writes segments without commits).
async fn last_xact_end(
    repo: &Repository,
    archive: &Archive,
    history: &TimelineHistory,
    newest: Option<SegmentName>,
) -> Option<summary::Mark> {
    const LOOK_BACK: u64 = 64;
    let newest = archive.segno(&newest?)?;
    for back in 0..LOOK_BACK.min(newest.0 + 1) {
        let name = archive.name_on(history, SegmentNo(newest.0 - back))?;
        if let Some(mark) = summary::load(repo, &name).await.and_then(|s| s.latest()) {
            return Some(mark);
        }
    }
    None
}

/// A segment recovery would need that is not archived.
pub(crate) enum Missing {
    /// The segment number has no name on the history (past the end of the WAL address space).
    OutOfRange(SegmentNo),
    /// Later segments are archived: replay would stop early at this one.
    Gap(SegmentName),
    /// The archive simply ends here.
    End(SegmentName),
}

/// Walks the archived segments of one history.
pub(crate) struct Walk<'a> {
    repo: &'a Arc<Repository>,
    archive: &'a Archive,
    history: &'a TimelineHistory,
}

impl Walk<'_> {
    /// The archived name of `segno`, or why recovery cannot get past it.
    pub(crate) fn segment(&self, segno: SegmentNo) -> Result<SegmentName, Missing> {
        let name = self
            .archive
            .name_on(self.history, segno)
            .ok_or(Missing::OutOfRange(segno))?;
        if self.archive.segments.contains_key(&name) {
            return Ok(name);
        }
        let later = self
            .archive
            .newest_on(self.history)
            .and_then(|s| self.archive.segno(&s))
            .is_some_and(|newest| newest > segno);
        Err(if later {
            Missing::Gap(name)
        } else {
            Missing::End(name)
        })
    }

    /// The summaries of consecutive archived segments from `first`.
    pub(crate) fn summaries(&self, first: SegmentNo) -> SummaryStream<'_> {
        SummaryStream {
            walk: self,
            next: first,
            loads: VecDeque::new(),
            spawned_to: first,
        }
    }
}

/// Summaries of consecutive archived segments; ends (with the reason) at the first segment that
/// is not archived. Reads up to [`READ_AHEAD`] summaries concurrently, since a long archive on
/// S3 would otherwise cost one round trip per segment in a row.
pub(crate) struct SummaryStream<'a> {
    walk: &'a Walk<'a>,
    next: SegmentNo,
    /// Summaries being read, in segment order, starting at `next`.
    loads: VecDeque<(SegmentNo, tokio::task::JoinHandle<Option<SegmentSummary>>)>,
    /// The first segment not yet being read.
    spawned_to: SegmentNo,
}

const READ_AHEAD: u64 = 16;

impl SummaryStream<'_> {
    /// The next segment and its summary (`None` when it has none or it cannot be read).
    pub(crate) async fn next(&mut self) -> Result<(SegmentNo, Option<SegmentSummary>), Missing> {
        let segno = self.next;
        let name = self.walk.segment(segno)?;
        self.next = SegmentNo(segno.0 + 1);
        while self.spawned_to.0 < segno.0 + READ_AHEAD {
            let ahead = self.spawned_to;
            let Some(ahead_name) = self
                .walk
                .archive
                .name_on(self.walk.history, ahead)
                .filter(|n| self.walk.archive.segments.contains_key(n))
            else {
                break;
            };
            let repo = Arc::clone(self.walk.repo);
            let load = tokio::spawn(async move { summary::load(&repo, &ahead_name).await });
            self.loads.push_back((ahead, load));
            self.spawned_to = SegmentNo(ahead.0 + 1);
        }
        // `segno` is archived, so the loop above queued it (or an earlier call did) at the front.
        let summary = match self.loads.pop_front() {
            Some((queued, load)) if queued == segno => load.await.ok().flatten(),
            _ => summary::load(self.walk.repo, &name).await,
        };
        Ok((segno, summary))
    }

    /// The segment before the next one to read: the last one returned, once one was.
    pub(crate) fn last_read(&self) -> SegmentNo {
        SegmentNo(self.next.0.saturating_sub(1))
    }
}

impl Drop for SummaryStream<'_> {
    /// Reads past the segment the reader stopped at are not needed.
    fn drop(&mut self) {
        for (_, load) in &self.loads {
            load.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window whose last transaction end precedes the oldest backup's end says so, instead of
    /// ending before it starts.
    #[test]
    fn a_window_without_a_later_transaction_ends_at_the_backup() {
        let name = BackupName::parse("base_20261130T080000Z_00000001_0000000003000028").unwrap();
        let mark = |lsn: u64| summary::Mark {
            lsn: Lsn(lsn),
            time_us: 1_764_489_600_000_000,
        };
        let window = |last: u64| Window {
            oldest_backup_end: Some((name.clone(), "2026-11-30T08:00:01Z".into(), Lsn(0x3000100))),
            last_xact_end: Some(mark(last)),
            newest_segment: None,
        };
        let text = window(0x2FFFF00).to_string();
        assert!(
            text.ends_with(&format!(
                ": recoverable only to the end of backup {name} (no later transaction archived)"
            )),
            "{text}"
        );
        let text = window(0x3000200).to_string();
        assert!(text.contains("the last archived transaction end"), "{text}");
    }

    /// A history file is read whole: a forged one declaring (and holding, compressed) 2 MiB is
    /// refused from its header, and never held.
    #[test]
    fn a_forged_history_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let rt = crate::fuzz::runtime();
        let repo = rt.block_on(crate::repo::local_for_tests(dir.path()));
        let key = layout::wal(&WalFileName::History(TimelineId(2)));
        let forged = vec![b'\n'; 2 << 20];
        rt.block_on(repo.put_bytes(&key, &forged, crate::repo::PutMode::IfAbsent))
            .unwrap();
        let archive = Archive {
            segments: BTreeMap::new(),
            histories: BTreeSet::from([TimelineId(2)]),
            seg_size: WalSegmentSize::new(16 << 20).unwrap(),
        };
        let newest = crate::backup::manifest::tests::sample(
            "base_20261130T080000Z_00000001_0000000003000028",
            "2026-11-30T08:00:00Z",
        )
        .summary;
        let (history, peak) = crate::fuzz::peak_during(|| {
            rt.block_on(target_history(
                &repo,
                &archive,
                TimelineChoice::Latest,
                &newest,
            ))
        });
        let e = history.unwrap_err().to_string();
        assert!(e.contains(&key), "{e}");
        assert!(peak < 1 << 20, "reading the history file held {peak} bytes");
    }
}
