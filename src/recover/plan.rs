//! Recovery planning: which backup and which WAL a recovery request needs, and whether its target
//! can be reached at all, decided from the repository alone before anything is written.
//!
//! Picks the newest backup that ends before the target, checks that every segment to the stop is
//! archived along the [recoverable window](crate::backup::window)'s history, and refuses a target
//! no archived transaction end or restore point can satisfy. Used by `cmd/recover.rs`.

use std::fmt;
use std::sync::Arc;

use walvault_wal::{Lsn, SegmentName, SegmentNo, TimelineId};

use super::target::Target;
use super::RecoverError;
use crate::backup::manifest::Summary;
use crate::backup::window::{Missing, Recoverable, TimelineChoice, Walk, Window};
use crate::repo::Repository;
use crate::time::UnixMicros;
use crate::wal::summary;

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

/// Plans a recovery, or says why it cannot work.
pub(crate) async fn plan(repo: &Arc<Repository>, request: &Request) -> Result<Plan, RecoverError> {
    let recoverable = Recoverable::load(repo, request.timeline).await?;
    let backup = choose_backup(repo, &recoverable, request).await?;
    let search = Search {
        recoverable: &recoverable,
        walk: recoverable.walk(repo),
    };
    let first = backup
        .start_lsn
        .segment_number(recoverable.archive.seg_size());
    let (last, stop, caveat) = search.stop(first, backup, request).await?;
    let segments = search.require(first, last.max(first), &request.target)?;
    let wal_stored = segments
        .iter()
        .filter_map(|s| recoverable.archive.stored_size(s))
        .sum();
    let chain = chain_of(&recoverable.backups, backup);
    let backup = backup.clone();
    Ok(Plan {
        chain,
        wal_stored,
        backup,
        target: request.target.clone(),
        inclusive: request.inclusive,
        timeline: recoverable.history.timeline,
        segments,
        stop,
        caveat,
        window: recoverable.window,
    })
}

fn refused(reason: String, window: &Window) -> RecoverError {
    RecoverError::Refused {
        reason,
        window: window.to_string(),
    }
}

/// The backup to restore: of those the request allows, the newest that ends before the target
/// (the least WAL to replay).
async fn choose_backup<'a>(
    repo: &Repository,
    recoverable: &'a Recoverable,
    request: &Request,
) -> Result<&'a Summary, RecoverError> {
    let candidates = candidates(repo, recoverable, request).await?;
    candidates
        .iter()
        .rev()
        .find(|b| ends_before(b, &request.target, request.inclusive))
        .copied()
        .ok_or_else(|| {
            refused(
                format!(
                    "{} is before the end of {}",
                    request.target,
                    match &request.backup {
                        Some(_) => "the chosen backup",
                        None => "the oldest backup",
                    }
                ),
                &recoverable.window,
            )
        })
}

/// The backup named with `--backup`, which must be usable along the history, or else every
/// usable backup, oldest first.
async fn candidates<'a>(
    repo: &Repository,
    recoverable: &'a Recoverable,
    request: &Request,
) -> Result<Vec<&'a Summary>, RecoverError> {
    let backups = &recoverable.backups;
    let Some(wanted) = &request.backup else {
        return Ok(backups.iter().filter(|b| recoverable.usable(b)).collect());
    };
    let name = crate::backup::catalog::resolve_name(repo, wanted).await?;
    let found = backups.iter().find(|b| b.name == name).ok_or_else(|| {
        RecoverError::Backup(crate::backup::BackupError::NotFound(name.to_string()))
    })?;
    if !recoverable.usable(found) {
        return Err(refused(
            format!(
                "backup {} is on timeline {}, which is not on the history of timeline {}",
                found.name, found.timeline, recoverable.history.timeline.0
            ),
            &recoverable.window,
        ));
    }
    Ok(vec![found])
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

/// Where recovery stops, searched for along the archived segments of one history.
struct Search<'a> {
    recoverable: &'a Recoverable,
    walk: Walk<'a>,
}

/// The last segment replay needs, the record recovery stops at (when the summaries tell) and why
/// that record is not known exactly (if it is not).
type Found = (SegmentNo, Option<summary::Mark>, Option<String>);

impl Search<'_> {
    fn refuse(&self, reason: String) -> RecoverError {
        refused(reason, &self.recoverable.window)
    }

    /// Where recovery to the request's target from `backup` (starting at segment `first`) stops.
    async fn stop(
        &self,
        first: SegmentNo,
        backup: &Summary,
        request: &Request,
    ) -> Result<Found, RecoverError> {
        let seg_size = self.recoverable.archive.seg_size();
        match &request.target {
            Target::Time(t) => self.find_time(first, *t, request.inclusive).await,
            Target::Name(name) => self.find_restore_point(first, name, backup.stop_lsn).await,
            Target::Lsn(lsn) => {
                if !ends_before(backup, &request.target, request.inclusive) {
                    return Err(self.refuse(format!(
                        "{} is before the end of backup {}",
                        request.target, backup.name
                    )));
                }
                Ok((lsn.segment_number(seg_size), None, None))
            }
            Target::Immediate => Ok((backup.stop_lsn.end_segment_number(seg_size), None, None)),
            Target::Xid(_) | Target::EndOfArchive => {
                let last = self
                    .recoverable
                    .window
                    .newest_segment
                    .and_then(|s| self.recoverable.archive.segno(&s))
                    .unwrap_or_else(|| backup.stop_lsn.end_segment_number(seg_size));
                let caveat = matches!(request.target, Target::Xid(_)).then(|| {
                    "whether the transaction ended in the archived WAL is only known when \
                     recovery reaches it"
                        .to_string()
                });
                Ok((last, None, caveat))
            }
        }
    }

    /// Why recovery to `target` cannot get past a segment that is not archived: the refusal when
    /// later segments exist (replay would stop early), else the reason the archive ends, for
    /// messages.
    fn archive_end(&self, missing: Missing, target: &Target) -> Result<String, RecoverError> {
        match missing {
            Missing::OutOfRange(segno) => Err(RecoverError::Invalid(format!(
                "segment number {segno} is out of range"
            ))),
            Missing::Gap(name) => Err(self.refuse(format!(
                "WAL segment {name} is missing from the archive (later segments exist): recovery \
                 to {target} would stop there"
            ))),
            Missing::End(name) => Ok(format!("segment {name} is not archived")),
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
                self.walk.segment(SegmentNo(n)).or_else(|missing| {
                    let end = self.archive_end(missing, target)?;
                    Err(self.refuse(format!(
                        "{target} is after the end of the archived WAL ({end})"
                    )))
                })
            })
            .collect()
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
        let mut stream = self.walk.summaries(first);
        let mut unknown = Vec::new();
        loop {
            let (segno, summary) = match stream.next().await {
                Ok(next) => next,
                Err(missing) => {
                    let end = self.archive_end(missing, &target)?;
                    if unknown.is_empty() {
                        return Err(self.refuse(format!(
                            "{target} is after the last archived transaction end, so recovery \
                             could never stop there ({end})"
                        )));
                    }
                    // Without every summary the planner cannot rule the target out; recovery
                    // will tell. Plan to the end of the archive.
                    let caveat = format!(
                        "no summary for {} segment(s) (archived before walvault recorded \
                         summaries?): whether a transaction ends after the target is only known \
                         when recovery reaches it",
                        unknown.len()
                    );
                    return Ok((stream.last_read(), None, Some(caveat)));
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
        let mut stream = self.walk.summaries(first);
        let mut unknown = 0usize;
        loop {
            let (segno, summary) = match stream.next().await {
                Ok(next) => next,
                Err(missing) => {
                    let end = self.archive_end(missing, &target)?;
                    if unknown == 0 {
                        return Err(self.refuse(format!(
                            "no restore point named {name:?} after the end of the chosen backup \
                             in the archived WAL ({end}); if it is older, name an older backup \
                             with --backup"
                        )));
                    }
                    let caveat = format!(
                        "no summary for {unknown} segment(s): the restore point is only found \
                         when recovery reaches it"
                    );
                    return Ok((stream.last_read(), None, Some(caveat)));
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
