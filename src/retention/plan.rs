//! The retention plan: every backup's verdict, the WAL kept per timeline, the window before and
//! after, and every object to delete, proven before anything is touched.
//!
//! The proof uses the recoverable window's own view of the archive (`backup/window.rs`, the
//! planner `recover` uses): every kept backup's chain is in the catalog and its WAL from start to
//! stop is archived, and from the oldest backup `full`/`window` keep to the newest segment the
//! current timeline's history has no gap. Listings are streamed and only what is deleted is held,
//! in compact form (typed names, not key strings).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use walvault_wal::{SegmentName, SegmentNo, TimelineId, WalFileName, WalSegmentSize};

use super::policy::{self, Policy, Verdicts};
use super::RetentionError;
use crate::backup::manifest::{BackupName, Summary};
use crate::backup::window::{Missing, Recoverable, TimelineChoice, Window, WindowError};
use crate::repo::layout::{Listing, ObjectKey};
use crate::repo::{Leftover, Repository};
use crate::time::UnixMicros;

/// How old leftovers of interrupted writers (packs without a manifest, temp files, multipart
/// uploads) must be before they are garbage: longer than any running `backup-push` takes.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// One backup and what the policy says of it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct BackupVerdict {
    pub(crate) name: BackupName,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) stop_time: String,
    pub(crate) timeline: u32,
    pub(crate) keep: bool,
    pub(crate) kept_by: Vec<&'static str>,
    pub(crate) stored_size: u64,
}

impl BackupVerdict {
    pub(crate) fn expires(&self) -> bool {
        self.kept_by.is_empty()
    }
}

/// The WAL kept on one timeline.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct KeptWal {
    pub(crate) timeline: u32,
    pub(crate) first: String,
    pub(crate) last: String,
    pub(crate) segments: u64,
}

/// An object to delete: compact, its key built when it is deleted.
#[derive(Clone, Debug)]
pub(crate) struct Doomed {
    pub(crate) key: ObjectKey,
    pub(crate) size: u64,
}

/// A backup to delete: its manifest goes first, then the rest.
#[derive(Clone, Debug)]
pub(crate) struct DoomedBackup {
    pub(crate) name: BackupName,
    /// Its packs and their page sums.
    pub(crate) contents: Vec<ObjectKey>,
    pub(crate) pinned: bool,
    pub(crate) bytes: u64,
}

/// What `delete` will do.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) policy: Policy,
    pub(crate) backups: Vec<BackupVerdict>,
    pub(crate) wal_kept: Vec<KeptWal>,
    pub(crate) window_before: Window,
    pub(crate) window_after: Window,
    /// Expired backups, newest first (a delta goes before its parent).
    pub(crate) doomed_backups: Vec<DoomedBackup>,
    /// WAL files, summaries and fragments, oldest segment first.
    pub(crate) doomed_wal: Vec<Doomed>,
    /// Objects of backups that never completed, and fragments of segments stored whole.
    pub(crate) garbage: Vec<Doomed>,
    pub(crate) leftovers: Vec<Leftover>,
}

impl Plan {
    pub(crate) fn objects(&self) -> u64 {
        let backups: u64 = self
            .doomed_backups
            .iter()
            .map(|b| 1 + b.contents.len() as u64 + u64::from(b.pinned))
            .sum();
        backups
            + self.doomed_wal.len() as u64
            + self.garbage.len() as u64
            + self.leftovers.len() as u64
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.doomed_backups.iter().map(|b| b.bytes).sum::<u64>()
            + self.doomed_wal.iter().map(|d| d.size).sum::<u64>()
            + self.garbage.iter().map(|d| d.size).sum::<u64>()
    }

    /// The plan as one JSON object (`delete --json`).
    pub(crate) fn to_json(&self, dry_run: bool) -> serde_json::Value {
        let backups: Vec<serde_json::Value> = self
            .backups
            .iter()
            .map(|b| {
                let mut v = serde_json::to_value(b).unwrap_or_default();
                v["expires"] = b.expires().into();
                v
            })
            .collect();
        serde_json::json!({
            "dry_run": dry_run,
            "policy": self.policy.to_string(),
            "backups": backups,
            "wal_kept": self.wal_kept,
            "window_before": self.window_before.to_string(),
            "window_after": self.window_after.to_string(),
            "delete": {
                "backups": self.doomed_backups.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
                "wal_objects": self.doomed_wal.len(),
                "garbage_objects": self.garbage.len(),
                "leftovers": self.leftovers.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
                "objects": self.objects(),
                "bytes": self.bytes(),
            },
        })
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "policy: {}", self.policy)?;
        for b in &self.backups {
            let verdict = if b.expires() {
                "delete".to_owned()
            } else {
                format!("keep ({})", b.kept_by.join(", "))
            };
            writeln!(
                f,
                "  {} {:<5} tli {} ended {}: {verdict}",
                b.name, b.kind, b.timeline, b.stop_time
            )?;
        }
        for w in &self.wal_kept {
            writeln!(
                f,
                "WAL kept on timeline {}: {} to {} ({} segments)",
                w.timeline, w.first, w.last, w.segments
            )?;
        }
        writeln!(f, "window before: {}", self.window_before)?;
        writeln!(f, "window after:  {}", self.window_after)?;
        write!(
            f,
            "to delete: {} backups, {} WAL objects, {} garbage objects, {} leftovers: {} objects, {}",
            self.doomed_backups.len(),
            self.doomed_wal.len(),
            self.garbage.len(),
            self.leftovers.len(),
            self.objects(),
            crate::cmd::human_bytes(self.bytes())
        )
    }
}

/// Which WAL stays: every segment from `from` on (any timeline), and each kept backup's own
/// segments from its start to its stop on its timeline.
struct KeepWal {
    seg_size: WalSegmentSize,
    from: SegmentNo,
    ranges: Vec<(TimelineId, SegmentNo, SegmentNo)>,
}

impl KeepWal {
    fn keeps(&self, seg: &SegmentName) -> bool {
        // A name whose number cannot be computed is kept: nothing unexplained is deleted.
        let Ok(no) = seg.segno(self.seg_size) else {
            return true;
        };
        no >= self.from
            || self
                .ranges
                .iter()
                .any(|&(tli, a, b)| tli == seg.tli && a <= no && no <= b)
    }
}

fn segments_of(b: &Summary, seg_size: WalSegmentSize) -> (SegmentNo, SegmentNo) {
    let first = b.start_lsn.segment_number(seg_size);
    let last = b.stop_lsn.end_segment_number(seg_size);
    (first, SegmentNo(last.0.max(first.0)))
}

/// The objects stored under one backup's name.
#[derive(Default)]
struct Stored {
    manifest: bool,
    pinned: bool,
    /// Packs and their page sums, with their sizes.
    contents: Vec<(ObjectKey, u64)>,
    newest: Option<SystemTime>,
}

/// Plans retention under `policy` at `now`, or refuses, naming why.
pub(crate) async fn plan(
    repo: &Arc<Repository>,
    policy: &Policy,
    now: UnixMicros,
    grace: Duration,
) -> Result<Plan, RetentionError> {
    let snapshot = SystemTime::now();
    let (backups, unreadable) = crate::backup::catalog::scan(repo).await?;
    if let Some(problem) = unreadable.first() {
        return Err(RetentionError::Refused(format!(
            "a backup manifest cannot be read, so what depends on it cannot be proven: {problem}"
        )));
    }
    let recoverable = match Recoverable::load(repo, TimelineChoice::Latest).await {
        Ok(r) => r,
        Err(WindowError::NoBackups) => {
            return Err(RetentionError::Refused(
                "the repository has no backups: nothing would remain restorable".into(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let seg_size = recoverable.archive.seg_size();
    let stored = stored_backups(repo).await?;
    let pins: BTreeSet<BackupName> = stored
        .iter()
        .filter(|(_, o)| o.pinned)
        .map(|(name, _)| name.clone())
        .collect();
    let verdicts = policy::verdicts(policy, &backups, &pins, |b| recoverable.usable(b), now);
    prove_chains(&backups, &verdicts)?;
    let keep = keep_wal(&backups, &verdicts, seg_size)?;
    prove_wal(repo, &recoverable, &backups, &verdicts, &keep)?;

    let mut doomed_backups = Vec::new();
    let mut garbage = Vec::new();
    let cutoff = snapshot
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let in_catalog: BTreeSet<&BackupName> = backups.iter().map(|b| &b.name).collect();
    for (i, b) in backups.iter().enumerate().rev() {
        if !verdicts.kept_by[i].is_empty() {
            continue;
        }
        let objects = stored.get(&b.name);
        doomed_backups.push(DoomedBackup {
            name: b.name.clone(),
            contents: objects
                .map(|o| o.contents.iter().map(|p| p.0.clone()).collect())
                .unwrap_or_default(),
            pinned: objects.is_some_and(|o| o.pinned),
            bytes: objects.map_or(0, |o| o.contents.iter().map(|p| p.1).sum()),
        });
    }
    for (name, objects) in &stored {
        // Packs without a manifest: an interrupted push once the grace period is over, or a
        // running one before it, whose packs must survive.
        let abandoned = !objects.manifest
            && !in_catalog.contains(name)
            && objects.newest.is_some_and(|t| t < cutoff);
        if !abandoned {
            continue;
        }
        for (key, size) in &objects.contents {
            garbage.push(Doomed {
                key: key.clone(),
                size: *size,
            });
        }
        if objects.pinned {
            garbage.push(Doomed {
                key: ObjectKey::Pin(name.clone()),
                size: 0,
            });
        }
    }

    let (doomed_wal, wal_kept, whole_garbage) =
        doomed_wal(repo, &recoverable, &keep, snapshot).await?;
    garbage.extend(whole_garbage);
    let leftovers = repo.leftovers(cutoff).await?;

    let window_before = recoverable.window.clone();
    let window_after = Window {
        oldest_backup_end: backups
            .iter()
            .zip(&verdicts.kept_by)
            .find(|(b, rules)| {
                !rules.is_empty()
                    && recoverable.usable(b)
                    && segments_of(b, seg_size).0 >= keep.from
            })
            .map(|(b, _)| (b.name.clone(), b.stop_time.clone(), b.stop_lsn)),
        ..window_before.clone()
    };
    let verdict_list = backups
        .iter()
        .zip(&verdicts.kept_by)
        .map(|(b, rules)| BackupVerdict {
            name: b.name.clone(),
            kind: b.kind.as_str(),
            stop_time: b.stop_time.clone(),
            timeline: b.timeline,
            keep: pins.contains(&b.name),
            kept_by: rules.iter().map(|r| r.as_str()).collect(),
            stored_size: b.stored_size,
        })
        .collect();
    Ok(Plan {
        policy: policy.clone(),
        backups: verdict_list,
        wal_kept,
        window_before,
        window_after,
        doomed_backups,
        doomed_wal,
        garbage,
        leftovers,
    })
}

/// Every kept backup's chain is whole in the catalog, and at least one backup stays.
fn prove_chains(backups: &[Summary], verdicts: &Verdicts) -> Result<(), RetentionError> {
    if verdicts.kept_by.iter().all(BTreeSet::is_empty) {
        return Err(RetentionError::Refused(
            "the policy keeps no backup: nothing would remain restorable".into(),
        ));
    }
    for (b, rules) in backups.iter().zip(&verdicts.kept_by) {
        if rules.is_empty() {
            continue;
        }
        if let Some(parent) = &b.parent {
            if !backups.iter().any(|p| &p.name == parent) {
                return Err(RetentionError::Refused(format!(
                    "backup {} is kept but its parent {parent} is not in the catalog, so it \
                     cannot be restored",
                    b.name
                )));
            }
        }
    }
    Ok(())
}

fn keep_wal(
    backups: &[Summary],
    verdicts: &Verdicts,
    seg_size: WalSegmentSize,
) -> Result<KeepWal, RetentionError> {
    let kept: Vec<&Summary> = backups
        .iter()
        .zip(&verdicts.kept_by)
        .filter(|(_, r)| !r.is_empty())
        .map(|(b, _)| b)
        .collect();
    // The newest kept backup always keeps WAL from its start on: the WAL being archived now is
    // what makes it (and the next backup's parent) recoverable past its end.
    let newest = kept
        .iter()
        .map(|b| segments_of(b, seg_size).0)
        .max()
        .unwrap_or(SegmentNo(0));
    let from = verdicts
        .anchor
        .map(|a| segments_of(&backups[a], seg_size).0)
        .map_or(newest, |a| SegmentNo(a.0.min(newest.0)));
    let ranges = kept
        .iter()
        .map(|b| {
            let (first, last) = segments_of(b, seg_size);
            (TimelineId(b.timeline), first, last)
        })
        .collect();
    Ok(KeepWal {
        seg_size,
        from,
        ranges,
    })
}

/// Every kept backup's WAL to its stop is archived, and the WAL from the anchor on has no gap
/// along the current timeline's history.
fn prove_wal(
    repo: &Arc<Repository>,
    recoverable: &Recoverable,
    backups: &[Summary],
    verdicts: &Verdicts,
    keep: &KeepWal,
) -> Result<(), RetentionError> {
    let archive = &recoverable.archive;
    for (b, rules) in backups.iter().zip(&verdicts.kept_by) {
        if rules.is_empty() {
            continue;
        }
        let (first, last) = segments_of(b, keep.seg_size);
        for no in first.0..=last.0 {
            let Ok(name) = SegmentName::new(TimelineId(b.timeline), SegmentNo(no), keep.seg_size)
            else {
                continue;
            };
            if archive.stored_size(&name).is_none() {
                return Err(RetentionError::Refused(format!(
                    "WAL segment {name}, which kept backup {} needs to become consistent, is not \
                     in the archive (a gap inside what must be kept)",
                    b.name
                )));
            }
        }
    }
    if let Some(anchor) = verdicts.anchor {
        let walk = recoverable.walk(repo);
        let start = segments_of(&backups[anchor], keep.seg_size).0;
        let mut no = start;
        loop {
            match walk.segment(no) {
                Ok(_) => no = no.next(),
                Err(Missing::Gap(name)) => {
                    return Err(RetentionError::Refused(format!(
                        "WAL segment {name} is missing on timeline {}'s history while later \
                         segments are archived: a gap inside the window kept from backup {}",
                        recoverable.history.timeline.0, backups[anchor].name
                    )))
                }
                Err(Missing::End(_) | Missing::OutOfRange(_)) => break,
            }
        }
    }
    Ok(())
}

/// Every stored backup name and its objects, from one streamed listing.
async fn stored_backups(repo: &Repository) -> Result<BTreeMap<BackupName, Stored>, RetentionError> {
    let mut stored: BTreeMap<BackupName, Stored> = BTreeMap::new();
    repo.list_each(Listing::Backups, &mut |o| {
        let Some(key) = ObjectKey::parse(&o.key) else {
            return;
        };
        let name = match &key {
            ObjectKey::Manifest(name)
            | ObjectKey::Pin(name)
            | ObjectKey::Pack(name, _)
            | ObjectKey::PageSums(name, _) => name.clone(),
            _ => return,
        };
        let entry = stored.entry(name).or_default();
        entry.newest = entry.newest.max(o.modified);
        match key {
            ObjectKey::Manifest(_) => entry.manifest = true,
            ObjectKey::Pin(_) => entry.pinned = true,
            _ => entry.contents.push((key, o.size)),
        }
    })
    .await?;
    for objects in stored.values_mut() {
        objects.contents.sort_by_key(|(key, _)| key.key());
    }
    Ok(stored)
}

/// The WAL, summaries and fragments to delete (oldest segment first), what stays per timeline,
/// and fragments of segments stored whole (garbage).
async fn doomed_wal(
    repo: &Repository,
    recoverable: &Recoverable,
    keep: &KeepWal,
    snapshot: SystemTime,
) -> Result<(Vec<Doomed>, Vec<KeptWal>, Vec<Doomed>), RetentionError> {
    let mut doomed = Vec::new();
    let mut kept: BTreeMap<TimelineId, (SegmentName, SegmentName, u64)> = BTreeMap::new();
    let mut garbage = Vec::new();
    let before_snapshot = |modified: Option<SystemTime>| modified.is_none_or(|m| m < snapshot);
    repo.list_each(Listing::Wal, &mut |o| {
        let Some(ObjectKey::Wal(name)) = ObjectKey::parse(&o.key) else {
            return;
        };
        let seg = match name {
            WalFileName::Segment(s) | WalFileName::Partial(s) => s,
            WalFileName::Backup { segment, .. } => segment,
            // Every timeline history stays: recovery along any kept timeline reads them.
            WalFileName::History(_) => return,
        };
        if keep.keeps(&seg) || !before_snapshot(o.modified) {
            if matches!(name, WalFileName::Segment(_)) {
                let e = kept.entry(seg.tli).or_insert((seg, seg, 0));
                e.0 = e.0.min(seg);
                e.1 = e.1.max(seg);
                e.2 += 1;
            }
            return;
        }
        doomed.push(Doomed {
            key: ObjectKey::Wal(name),
            size: o.size,
        });
    })
    .await?;
    repo.list_each(Listing::Summaries, &mut |o| {
        if let Some(ObjectKey::Summary(seg)) = ObjectKey::parse(&o.key) {
            if !keep.keeps(&seg) && before_snapshot(o.modified) {
                doomed.push(Doomed {
                    key: ObjectKey::Summary(seg),
                    size: o.size,
                });
            }
        }
    })
    .await?;
    repo.list_each(Listing::Fragments, &mut |o| {
        let Some(key @ ObjectKey::Fragment { seg, .. }) = ObjectKey::parse(&o.key) else {
            return;
        };
        if !before_snapshot(o.modified) {
            return;
        }
        let d = Doomed { key, size: o.size };
        if !keep.keeps(&seg) {
            doomed.push(d);
        } else if recoverable.archive.stored_size(&seg).is_some() {
            garbage.push(d);
        }
    })
    .await?;
    let order = |d: &Doomed| -> (u64, u32, u8) {
        let (seg, rank) = match &d.key {
            ObjectKey::Wal(name) => (name.segment(), 0),
            ObjectKey::Fragment { seg, .. } => (Some(*seg), 1),
            ObjectKey::Summary(seg) => (Some(*seg), 2),
            _ => (None, 3),
        };
        let no = seg
            .and_then(|s| s.segno(keep.seg_size).ok())
            .map_or(u64::MAX, |n| n.0);
        (no, seg.map_or(0, |s| s.tli.0), rank)
    };
    doomed.sort_by_key(order);
    let wal_kept = kept
        .into_iter()
        .map(|(tli, (first, last, segments))| KeptWal {
            timeline: tli.0,
            first: first.to_string(),
            last: last.to_string(),
            segments,
        })
        .collect();
    Ok((doomed, wal_kept, garbage))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::tests::sample;
    use crate::repo::PutMode;

    const SEG: u64 = 16 << 20;

    /// A full backup taken at segment `segno` of timeline 1 and ended in it.
    async fn backup(repo: &Repository, name: &str, segno: u64, stop: &str) {
        let mut m = sample(name, stop);
        m.summary.start_lsn = walvault_wal::Lsn(segno * SEG + 0x28);
        m.summary.stop_lsn = walvault_wal::Lsn(segno * SEG + 0x1000);
        let json = m.to_json().unwrap();
        repo.put_bytes(&m.summary.name.manifest_key(), &json, PutMode::IfAbsent)
            .await
            .unwrap();
    }

    async fn segments(repo: &Repository, range: std::ops::RangeInclusive<u64>) {
        for no in range {
            let seg = SegmentName::new(
                TimelineId(1),
                SegmentNo(no),
                WalSegmentSize::new(SEG).unwrap(),
            )
            .unwrap();
            repo.put_bytes(&crate::repo::layout::segment(&seg), b"", PutMode::IfAbsent)
                .await
                .unwrap();
        }
    }

    fn full(n: u32) -> Policy {
        Policy {
            full: Some(n),
            ..Default::default()
        }
    }

    async fn refusal(repo: &Arc<Repository>, policy: &Policy) -> String {
        match plan(repo, policy, UnixMicros::now(), DEFAULT_GRACE).await {
            Ok(p) => panic!("planned instead of refusing:\n{p}"),
            Err(e) => e.to_string(),
        }
    }

    /// Old WAL goes oldest first and a kept backup's own WAL stays; a gap in what must be kept,
    /// an unreadable manifest, or a policy keeping nothing is refused.
    #[tokio::test]
    async fn plans_are_proven_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Arc::new(crate::repo::local_for_tests(dir.path()).await);
        backup(&repo, "base_a", 2, "2026-11-01T00:00:00Z").await;
        backup(&repo, "base_b", 5, "2026-11-02T00:00:00Z").await;
        backup(&repo, "base_c", 8, "2026-11-03T00:00:00Z").await;
        segments(&repo, 1..=10).await;
        let planned = plan(&repo, &full(1), UnixMicros::now(), DEFAULT_GRACE)
            .await
            .unwrap();
        let doomed: Vec<String> = planned.doomed_wal.iter().map(|d| d.key.key()).collect();
        let expected: Vec<String> = (1..=7)
            .map(|n| format!("wal/0000000100000000000000{n:02X}"))
            .collect();
        assert_eq!(doomed, expected);
        assert_eq!(planned.doomed_backups.len(), 2);
        assert_eq!(planned.doomed_backups[0].name.as_str(), "base_b");

        // With b pinned, its segment stays and so does it.
        crate::retention::pins::mark(&repo, &BackupName::parse("base_b").unwrap(), true)
            .await
            .unwrap();
        let planned = plan(&repo, &full(1), UnixMicros::now(), DEFAULT_GRACE)
            .await
            .unwrap();
        assert!(!planned
            .doomed_wal
            .iter()
            .any(|d| d.key.key().ends_with("05")));
        assert_eq!(planned.doomed_backups.len(), 1);

        // A gap after the newest full backup's start.
        std::fs::remove_file(dir.path().join("wal/000000010000000000000009")).unwrap();
        let err = refusal(&repo, &full(1)).await;
        assert!(err.contains("000000010000000000000009 is missing"), "{err}");
        segments(&repo, 9..=9).await;

        crate::retention::pins::mark(&repo, &BackupName::parse("base_b").unwrap(), false)
            .await
            .unwrap();
        let none = Policy {
            daily: Some(0),
            ..Default::default()
        };
        assert!(refusal(&repo, &none).await.contains("keeps no backup"));

        repo.put_bytes("backups/base_d/manifest", b"{", PutMode::IfAbsent)
            .await
            .unwrap();
        let err = refusal(&repo, &full(1)).await;
        assert!(err.contains("base_d/manifest"), "{err}");
    }
}
