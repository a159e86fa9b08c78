//! Recovery planning: which backup, which WAL, and whether the target can be reached at all,
//! decided from the repository alone before anything is written to the target directory.
//!
//! Understands the catalog (backups with their start/stop LSNs and times and timelines), the
//! archived WAL names, timeline history files and the per-segment [summaries](crate::wal::summary)
//! of transaction ends and restore points. A plan picks the newest backup that ends before the
//! target, checks that every segment from the backup's start to the segment where recovery will
//! stop is archived on the timeline the target timeline's history says owns it, and refuses a
//! target that no archived transaction end (or restore point) can satisfy, which is the case
//! where PostgreSQL would otherwise replay everything and stop with "recovery ended before
//! configured recovery target was reached". Used by `walvault recover`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use walvault_wal::{
    Lsn, SegmentName, SegmentNo, TimelineHistory, TimelineId, WalFileName, WalSegmentSize,
};

use super::target::{Target, UnixMicros};
use super::RecoverError;
use crate::backup::manifest::Summary;
use crate::repo::layout::{self, Listing, ObjectKey};
use crate::repo::Repository;
use crate::wal::summary::{self, SegmentSummary};

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

/// What the user asked for.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub(crate) target: Target,
    /// Stop just after the target transaction end (PostgreSQL's default) or, when false, just
    /// before it (`recovery_target_inclusive = off`).
    pub(crate) inclusive: bool,
    pub(crate) timeline: TimelineChoice,
    /// A backup name (or LATEST) to restore instead of the planner's choice.
    pub(crate) backup: Option<String>,
}

/// What can be recovered: from the end of the oldest backup to the last transaction end in the
/// archive. Printed with every refusal.
#[derive(Clone, Debug, Default)]
pub(crate) struct Window {
    pub(crate) oldest_backup_end: Option<(String, Lsn)>,
    pub(crate) last_xact_end: Option<summary::Mark>,
    pub(crate) newest_segment: Option<SegmentName>,
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.oldest_backup_end {
            None => return f.write_str("nothing is recoverable: the repository has no backups"),
            Some((time, lsn)) => write!(f, "from {time} (LSN {lsn}, end of the oldest backup)")?,
        }
        match (&self.last_xact_end, &self.newest_segment) {
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

/// How recovery will go.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) backup: Summary,
    /// The backups restored, the full one first and `backup` last.
    pub(crate) chain: Vec<Summary>,
    /// Stored bytes of `segments`.
    pub(crate) wal_stored: u64,
    pub(crate) target: Target,
    pub(crate) inclusive: bool,
    pub(crate) timeline: TimelineId,
    /// The segments replay needs, in order.
    pub(crate) segments: Vec<SegmentName>,
    /// The record recovery is expected to stop at, when the summaries tell.
    pub(crate) stop: Option<summary::Mark>,
    /// Why the stopping point is not known exactly, if it is not.
    pub(crate) caveat: Option<String>,
    pub(crate) window: Window,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.backup;
        let exclusive = if self.inclusive {
            ""
        } else {
            " (exclusive: stops just before it)"
        };
        writeln!(f, "target:   {}{exclusive}", self.target)?;
        writeln!(
            f,
            "backup:   {} ({}, timeline {}, LSN {} to {}, ended {})",
            b.name,
            b.kind.as_str(),
            b.timeline,
            b.start_lsn,
            b.stop_lsn,
            b.stop_time
        )?;
        if self.chain.len() > 1 {
            let names: Vec<String> = self
                .chain
                .iter()
                .map(|b| format!("{} ({})", b.name, b.kind.as_str()))
                .collect();
            writeln!(f, "chain:    {}", names.join(" <- "))?;
        }
        writeln!(f, "timeline: {}", self.timeline.0)?;
        match (self.segments.first(), self.segments.last()) {
            (Some(first), Some(last)) => writeln!(
                f,
                "WAL:      {} segments, {first} to {last}, all archived",
                self.segments.len()
            )?,
            _ => writeln!(f, "WAL:      none needed")?,
        }
        let backup_stored: u64 = self.chain.iter().map(|b| b.stored_size).sum();
        let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
        writeln!(
            f,
            "download: {:.1} MiB stored ({:.1} MiB of backups, {:.1} MiB of WAL); {:.1} MiB \
             restored before replay",
            mib(backup_stored + self.wal_stored),
            mib(backup_stored),
            mib(self.wal_stored),
            mib(self.backup.original_size)
        )?;
        if let Some(stop) = &self.stop {
            writeln!(
                f,
                "stops at: the transaction end or restore point at LSN {} ({})",
                stop.lsn,
                UnixMicros(stop.time_us)
            )?;
        }
        if let Some(caveat) = &self.caveat {
            writeln!(f, "note:     {caveat}")?;
        }
        write!(f, "window:   {}", self.window)
    }
}

/// The archived WAL, by kind.
struct Archive {
    /// Archived segments and their stored sizes.
    segments: BTreeMap<SegmentName, u64>,
    histories: BTreeSet<TimelineId>,
    seg_size: WalSegmentSize,
}

impl Archive {
    async fn load(repo: &Repository, seg_size: WalSegmentSize) -> Result<Archive, RecoverError> {
        let mut archive = Archive {
            segments: BTreeMap::new(),
            histories: BTreeSet::new(),
            seg_size,
        };
        for object in repo.list(Listing::Wal).await? {
            let Some(ObjectKey::Wal(name)) = ObjectKey::parse(&object.key) else {
                continue;
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
        }
        Ok(archive)
    }

    fn segno(&self, seg: &SegmentName) -> Option<SegmentNo> {
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

/// What the repository holds along one timeline's history.
struct Loaded {
    backups: Vec<Summary>,
    archive: Archive,
    history: TimelineHistory,
    window: Window,
}

impl Loaded {
    async fn load(repo: &Repository, timeline: TimelineChoice) -> Result<Loaded, RecoverError> {
        let backups = crate::backup::catalog::list(repo).await?;
        let Some(newest) = backups.last() else {
            return Err(RecoverError::NoBackups);
        };
        let seg_size = WalSegmentSize::new(u64::from(newest.wal_segment_size))
            .map_err(|e| RecoverError::Invalid(format!("backup {}: {e}", newest.name)))?;
        let archive = Archive::load(repo, seg_size).await?;
        let history = target_history(repo, &archive, timeline, newest).await?;
        let newest_segment = archive.newest_on(&history);
        let window = Window {
            oldest_backup_end: backups
                .iter()
                .find(|b| usable_on(b, &history))
                .map(|b| (b.stop_time.clone(), b.stop_lsn)),
            last_xact_end: last_xact_end(repo, &archive, &history, newest_segment).await,
            newest_segment,
        };
        Ok(Loaded {
            backups,
            archive,
            history,
            window,
        })
    }
}

/// Whether recovery along `history` can start from `backup`: taken on a timeline of it, before
/// that timeline ended.
fn usable_on(backup: &Summary, history: &TimelineHistory) -> bool {
    history.timeline_at(backup.start_lsn) == TimelineId(backup.timeline)
}

/// What can be recovered along `timeline`: the window every refusal prints, for `backup-list`.
pub(crate) async fn window(
    repo: &Repository,
    timeline: TimelineChoice,
) -> Result<Window, RecoverError> {
    Ok(Loaded::load(repo, timeline).await?.window)
}

/// Plans a recovery, or says why it cannot work.
pub(crate) async fn plan(repo: &Arc<Repository>, request: &Request) -> Result<Plan, RecoverError> {
    let Loaded {
        backups,
        archive,
        history,
        window,
    } = Loaded::load(repo, request.timeline).await?;
    let seg_size = archive.seg_size;
    let usable: Vec<&Summary> = backups.iter().filter(|b| usable_on(b, &history)).collect();
    let newest_segment = window.newest_segment;

    let refuse = |reason: String, window: &Window| RecoverError::Refused {
        reason,
        window: window.to_string(),
    };
    let candidates: Vec<&Summary> = match &request.backup {
        Some(wanted) => {
            let name = crate::backup::catalog::resolve_name(repo, wanted).await?;
            let found = backups.iter().find(|b| b.name == name).ok_or_else(|| {
                RecoverError::Backup(crate::backup::BackupError::NotFound(name.to_string()))
            })?;
            if !usable.iter().any(|b| b.name == found.name) {
                return Err(refuse(
                    format!(
                        "backup {} is on timeline {}, which is not on the history of timeline {}",
                        found.name, found.timeline, history.timeline.0
                    ),
                    &window,
                ));
            }
            vec![found]
        }
        None => usable.clone(),
    };
    // Newest first: the least WAL to replay.
    let backup = candidates
        .iter()
        .rev()
        .find(|b| ends_before(b, &request.target, request.inclusive))
        .copied()
        .ok_or_else(|| {
            refuse(
                format!(
                    "{} is before the end of {}",
                    request.target,
                    match &request.backup {
                        Some(_) => "the chosen backup",
                        None => "the oldest backup",
                    }
                ),
                &window,
            )
        })?;

    let first = backup.start_lsn.segment_number(seg_size);
    let walk = Walk {
        repo,
        archive: &archive,
        history: &history,
        window: &window,
    };
    let (last, stop, caveat) = match &request.target {
        Target::Time(t) => walk.find_time(first, *t, request.inclusive).await?,
        Target::Name(name) => {
            walk.find_restore_point(first, name, backup.stop_lsn)
                .await?
        }
        Target::Lsn(lsn) => {
            if !ends_before(backup, &request.target, request.inclusive) {
                return Err(refuse(
                    format!(
                        "{} is before the end of backup {}",
                        request.target, backup.name
                    ),
                    &window,
                ));
            }
            (lsn.segment_number(seg_size), None, None)
        }
        Target::Immediate => (backup.stop_lsn.end_segment_number(seg_size), None, None),
        Target::Xid(_) | Target::EndOfArchive => {
            let last = newest_segment
                .and_then(|s| archive.segno(&s))
                .unwrap_or_else(|| backup.stop_lsn.end_segment_number(seg_size));
            let caveat = matches!(request.target, Target::Xid(_)).then(|| {
                "whether the transaction ended in the archived WAL is only known when recovery \
                 reaches it"
                    .to_string()
            });
            (last, None, caveat)
        }
    };
    let segments = walk.require(first, last.max(first), &request.target)?;
    let wal_stored = segments
        .iter()
        .filter_map(|s| archive.segments.get(s))
        .sum();
    Ok(Plan {
        chain: chain_of(&backups, backup),
        wal_stored,
        backup: backup.clone(),
        target: request.target.clone(),
        inclusive: request.inclusive,
        timeline: history.timeline,
        segments,
        stop,
        caveat,
        window,
    })
}

/// `backup` and the backups it is a delta of, the full one first.
fn chain_of(backups: &[Summary], backup: &Summary) -> Vec<Summary> {
    let mut chain = vec![backup.clone()];
    while let Some(parent) = chain.last().and_then(|b| b.parent.as_ref()) {
        // The catalog lists complete chains only; a missing parent ends the list early, and
        // backup-fetch reports it.
        match backups.iter().find(|b| &b.name == parent) {
            Some(found) if chain.len() <= backups.len() => chain.push(found.clone()),
            _ => break,
        }
    }
    chain.reverse();
    chain
}

/// Whether recovery from `backup` can stop at `target` only after the backup is consistent.
fn ends_before(backup: &Summary, target: &Target, inclusive: bool) -> bool {
    match target {
        // Manifests record whole seconds, truncated: the backup may have ended up to a second
        // after its recorded stop, and a target before the real end cannot be recovered to.
        Target::Time(t) => UnixMicros::parse_rfc3339(&backup.stop_time)
            .is_some_and(|stop| stop.0.saturating_add(1_000_000) <= t.0),
        // Exclusive stops before the record at the LSN, which must then lie past the end.
        Target::Lsn(lsn) if inclusive => backup.stop_lsn <= *lsn,
        Target::Lsn(lsn) => backup.stop_lsn < *lsn,
        // Restore points are matched to backups once found; xids cannot be placed in advance.
        Target::Name(_) | Target::Xid(_) | Target::Immediate | Target::EndOfArchive => true,
    }
}

async fn target_history(
    repo: &Repository,
    archive: &Archive,
    choice: TimelineChoice,
    newest_backup: &Summary,
) -> Result<TimelineHistory, RecoverError> {
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
    let Some(bytes) = repo.get_bytes(&key).await? else {
        if archive.segments.keys().any(|s| s.tli == tli) {
            // A timeline without a history file has no ancestors (initdb's timeline, or a
            // cluster whose history was never archived): follow it alone.
            return Ok(TimelineHistory {
                timeline: tli,
                entries: Vec::new(),
            });
        }
        return Err(RecoverError::Invalid(format!(
            "timeline {} has neither a history file nor WAL in the archive",
            tli.0
        )));
    };
    let text = String::from_utf8_lossy(&bytes);
    TimelineHistory::parse(tli, &text).map_err(|e| RecoverError::Invalid(e.to_string()))
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

/// Walks the archived segments of one history from a backup's start.
struct Walk<'a> {
    repo: &'a Arc<Repository>,
    archive: &'a Archive,
    history: &'a TimelineHistory,
    window: &'a Window,
}

type Found = (SegmentNo, Option<summary::Mark>, Option<String>);

/// A segment recovery would need that is not archived.
enum Missing {
    /// Later segments exist: replay would stop early. The refusal to report.
    Gap(RecoverError),
    /// The archive simply ends here; why, for messages.
    End(String),
}

impl Walk<'_> {
    fn refuse(&self, reason: String) -> RecoverError {
        RecoverError::Refused {
            reason,
            window: self.window.to_string(),
        }
    }

    /// The archived name of `segno`, or why recovery cannot get past it.
    fn segment(&self, segno: SegmentNo, target: &Target) -> Result<SegmentName, Missing> {
        let name = self.archive.name_on(self.history, segno).ok_or_else(|| {
            Missing::Gap(RecoverError::Invalid(format!(
                "segment number {segno} is out of range"
            )))
        })?;
        if self.archive.segments.contains_key(&name) {
            return Ok(name);
        }
        let later = self
            .archive
            .newest_on(self.history)
            .and_then(|s| self.archive.segno(&s))
            .is_some_and(|newest| newest > segno);
        if later {
            Err(Missing::Gap(self.refuse(format!(
                "WAL segment {name} is missing from the archive (later segments exist): recovery \
                 to {target} would stop there"
            ))))
        } else {
            Err(Missing::End(format!("segment {name} is not archived")))
        }
    }

    /// Every segment from `first` to `last`, each archived.
    fn require(
        &self,
        first: SegmentNo,
        last: SegmentNo,
        target: &Target,
    ) -> Result<Vec<SegmentName>, RecoverError> {
        (first.0..=last.0)
            .map(|n| {
                self.segment(SegmentNo(n), target)
                    .map_err(|missing| match missing {
                        Missing::Gap(e) => e,
                        Missing::End(end) => self.refuse(format!(
                            "{target} is after the end of the archived WAL ({end})"
                        )),
                    })
            })
            .collect()
    }

    fn summaries(&self, first: SegmentNo) -> SummaryStream<'_> {
        SummaryStream {
            walk: self,
            next: first,
            loads: VecDeque::new(),
            spawned_to: first,
        }
    }

    /// The segment holding the transaction end PostgreSQL stops before: the first one after
    /// `time`, or for an exclusive target the first one at or after it.
    async fn find_time(
        &self,
        first: SegmentNo,
        time: UnixMicros,
        inclusive: bool,
    ) -> Result<Found, RecoverError> {
        let stops = |m: &summary::Mark| m.time_us > time.0 || (!inclusive && m.time_us == time.0);
        let target = Target::Time(time);
        let mut stream = self.summaries(first);
        let mut unknown = Vec::new();
        loop {
            let (segno, summary) = match stream.next(&target).await {
                Ok(next) => next,
                Err(Missing::Gap(gap)) => return Err(gap),
                Err(Missing::End(end)) if unknown.is_empty() => {
                    return Err(self.refuse(format!(
                        "{target} is after the last archived transaction end, so recovery could \
                         never stop there ({end})"
                    )))
                }
                Err(_) => {
                    // Without every summary the planner cannot rule the target out; recovery
                    // will tell. Plan to the end of the archive.
                    let last = SegmentNo(stream.next.0.saturating_sub(1));
                    let caveat = format!(
                        "no summary for {} segment(s) (archived before walvault recorded \
                         summaries?): whether a transaction ends after the target is only known \
                         when recovery reaches it",
                        unknown.len()
                    );
                    return Ok((last, None, Some(caveat)));
                }
            };
            match summary {
                None => unknown.push(segno),
                Some(s) => {
                    if s.latest().is_some_and(|m| stops(&m)) {
                        // The stopping record is the segment's first end past the target; only
                        // when that is its first end overall does the summary name it.
                        let first_after = s.first_xact_end.filter(stops);
                        return Ok((segno, first_after, None));
                    }
                }
            }
        }
    }

    /// The segment holding restore point `name`, which must come after the backup's end.
    async fn find_restore_point(
        &self,
        first: SegmentNo,
        name: &str,
        backup_stop: Lsn,
    ) -> Result<Found, RecoverError> {
        let target = Target::Name(name.to_string());
        let mut stream = self.summaries(first);
        let mut unknown = 0usize;
        loop {
            let (segno, summary) = match stream.next(&target).await {
                Ok(next) => next,
                Err(Missing::Gap(gap)) => return Err(gap),
                Err(Missing::End(end)) if unknown == 0 => {
                    return Err(self.refuse(format!(
                        "no restore point named {name:?} after the end of the chosen backup in \
                         the archived WAL ({end}); if it is older, name an older backup with \
                         --backup"
                    )))
                }
                Err(_) => {
                    let last = SegmentNo(stream.next.0.saturating_sub(1));
                    let caveat = format!(
                        "no summary for {unknown} segment(s): the restore point is only found \
                         when recovery reaches it"
                    );
                    return Ok((last, None, Some(caveat)));
                }
            };
            let Some(summary) = summary else {
                unknown += 1;
                continue;
            };
            if let Some(rp) = summary
                .restore_points
                .iter()
                .find(|rp| rp.name == name && rp.at.lsn >= backup_stop)
            {
                return Ok((segno, Some(rp.at), None));
            }
        }
    }
}

/// Summaries of consecutive archived segments; ends (with the reason) at the first segment that
/// is not archived. Reads up to [`READ_AHEAD`] summaries concurrently, since a long archive on
/// S3 would otherwise cost one round trip per segment in a row.
struct SummaryStream<'a> {
    walk: &'a Walk<'a>,
    next: SegmentNo,
    /// Summaries being read, in segment order, starting at `next`.
    loads: VecDeque<(SegmentNo, tokio::task::JoinHandle<Option<SegmentSummary>>)>,
    /// The first segment not yet being read.
    spawned_to: SegmentNo,
}

const READ_AHEAD: u64 = 16;

impl SummaryStream<'_> {
    async fn next(
        &mut self,
        target: &Target,
    ) -> Result<(SegmentNo, Option<SegmentSummary>), Missing> {
        let segno = self.next;
        let name = self.walk.segment(segno, target)?;
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
}

impl Drop for SummaryStream<'_> {
    /// Reads past the segment the planner stopped at are not needed.
    fn drop(&mut self) {
        for (_, load) in &self.loads {
            load.abort();
        }
    }
}
