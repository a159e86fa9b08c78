//! `walvault status`: what the repository holds and promises, gathered cheaply for operators,
//! `check` and `metrics`: identity, backups, the recoverable window (along the latest timeline,
//! and along each timeline archived), archive lag, the last drill, sizes and object counts.
//!
//! One listing of the repository gives sizes and counts; manifests give the backups; the window
//! reads at most a bounded tail of segment summaries; `status/wal` (see `wal::newest`) gives
//! when the newest segment was stored. No WAL object is read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use walvault_wal::{SegmentName, TimelineId, WalFileName};

use crate::backup::manifest::{BackupKind, Summary};
use crate::backup::window::{self, Recoverable, TimelineChoice, WindowError};
use crate::backup::BackupError;
use crate::repo::identity;
use crate::repo::layout::{DrillTime, Listing, ObjectKey};
use crate::repo::{LengthRule, RepoError, Repository};
use crate::retention::Policy;
use crate::time::UnixMicros;
use crate::wal::newest::{self, position};

/// How many timelines `status` gives a window for, the highest ones: each costs a history file
/// and a bounded tail of summaries.
pub(crate) const TIMELINES_SHOWN: usize = 8;

/// The largest drill report read back (check-sql output is bounded well below this).
pub(crate) const MAX_DRILL_REPORT: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StatusError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("{0}")]
    Identity(String),
}

/// Everything `status` reports.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Status {
    pub(crate) generated_at: String,
    pub(crate) repository: Repo,
    pub(crate) backups: Backups,
    /// Along the latest timeline; `None` without backups.
    pub(crate) window: Option<RecoveryWindow>,
    /// Along each of the [`TIMELINES_SHOWN`] highest timelines the archive holds, oldest first
    /// (the latest among them); empty without backups.
    pub(crate) timelines: Vec<RecoveryWindow>,
    pub(crate) wal: Wal,
    /// The configured retention policy's verdict; omitted without a policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) retention: Option<RetentionVerdict>,
    pub(crate) last_drill: Option<LastDrill>,
    pub(crate) objects: Objects,
    #[serde(skip)]
    now: UnixMicros,
}

/// What `delete` would do now under the configured policy (the backups it keeps and those it
/// would expire); `delete --dry-run` gives the whole plan, WAL included.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RetentionVerdict {
    pub(crate) policy: String,
    pub(crate) kept: usize,
    pub(crate) pinned: usize,
    pub(crate) expires: Vec<String>,
}

impl std::fmt::Display for RetentionVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: keeps {} backups ({} pinned), ",
            self.policy, self.kept, self.pinned
        )?;
        if self.expires.is_empty() {
            f.write_str("nothing expires")
        } else {
            write!(f, "delete would expire {}", self.expires.join(", "))
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Repo {
    pub(crate) url: String,
    pub(crate) system_identifier: Option<String>,
    pub(crate) pg_major: Option<u32>,
    pub(crate) wal_segment_size: Option<u32>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Backups {
    pub(crate) full: usize,
    pub(crate) delta: usize,
    pub(crate) newest_full: Option<Backup>,
    pub(crate) newest_delta: Option<Backup>,
    pub(crate) newest: Option<Backup>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Backup {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) stop_time: String,
    #[serde(skip)]
    pub(crate) stop: Option<UnixMicros>,
    pub(crate) age_seconds: Option<f64>,
    pub(crate) duration_seconds: Option<f64>,
    pub(crate) original_size: u64,
    pub(crate) stored_size: u64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct RecoveryWindow {
    pub(crate) timeline: u32,
    pub(crate) start_time: Option<String>,
    #[serde(skip)]
    pub(crate) start: Option<UnixMicros>,
    pub(crate) start_lsn: String,
    pub(crate) start_backup: String,
    /// The last archived transaction end: `now - end` is the RPO right now.
    pub(crate) end_time: Option<String>,
    #[serde(skip)]
    pub(crate) end: Option<UnixMicros>,
    pub(crate) end_lsn: Option<String>,
    pub(crate) text: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Wal {
    /// The newest segment in the listing (any timeline).
    pub(crate) newest_segment: Option<String>,
    /// When the newest segment `status/wal` knows was stored.
    pub(crate) last_archived_at: Option<String>,
    #[serde(skip)]
    pub(crate) last_archived: Option<UnixMicros>,
    /// Age of that segment: an upper bound when the status object is stale.
    pub(crate) archive_lag_seconds: Option<f64>,
    /// `status/wal` names an older segment than the listing holds (a writer was killed or raced).
    pub(crate) status_object_stale: bool,
    /// How far wal-receive has streamed into a segment not yet stored whole.
    pub(crate) streamed_to: Option<String>,
}

/// The last drill, as its stored report says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LastDrill {
    pub(crate) started_at: String,
    pub(crate) success: bool,
    pub(crate) rto_seconds: f64,
    #[serde(default)]
    pub(crate) failures: Vec<String>,
    #[serde(skip_deserializing)]
    pub(crate) key: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Objects {
    pub(crate) total_bytes: u64,
    pub(crate) total: u64,
    /// Count and bytes per kind of object.
    pub(crate) by_kind: BTreeMap<&'static str, KindCount>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct KindCount {
    pub(crate) count: u64,
    pub(crate) bytes: u64,
}

fn kind_of(key: Option<&ObjectKey>) -> &'static str {
    match key {
        Some(ObjectKey::Identity) => "identity",
        Some(ObjectKey::Wal(WalFileName::Segment(_))) => "wal",
        Some(ObjectKey::Wal(_)) => "wal_other",
        Some(ObjectKey::Summary(_)) => "walsummary",
        Some(ObjectKey::Fragment { .. }) => "fragment",
        Some(ObjectKey::Manifest(_)) => "manifest",
        Some(ObjectKey::Pack(..)) => "pack",
        Some(ObjectKey::PageSums(..)) => "pagesums",
        Some(ObjectKey::StatusWal) => "status",
        Some(ObjectKey::Drill(_)) => "drill",
        Some(ObjectKey::Pin(_)) => "pin",
        Some(ObjectKey::RetentionLock) => "lock",
        None => "other",
    }
}

impl Status {
    /// Gathers the status; `policy` (the configured retention, possibly empty) gives the
    /// retention verdict.
    pub(crate) async fn gather(repo: &Repository, policy: &Policy) -> Result<Status, StatusError> {
        let now = UnixMicros::now();
        let identity = identity::load(repo)
            .await
            .map_err(|e| StatusError::Identity(e.to_string()))?;
        let (objects, newest_segment, streamed, drill_key) = scan(repo).await?;
        let backups = crate::backup::catalog::list(repo).await?;
        let recoverable = match Recoverable::load(repo, TimelineChoice::Latest).await {
            Ok(r) => Some(r),
            Err(WindowError::NoBackups) => None,
            Err(e) => {
                tracing::warn!("recoverable window unknown: {e}");
                None
            }
        };
        let retention = match &recoverable {
            Some(r) if !policy.is_empty() => retention_verdict(repo, policy, r, now).await,
            _ => None,
        };
        let mut timelines = Vec::new();
        if let Some(r) = &recoverable {
            for (tli, window) in r.windows_by_timeline(repo, TIMELINES_SHOWN).await {
                timelines.push(match window {
                    Ok(w) => recovery_window(tli, &w),
                    Err(e) => unknown_window(tli, &e),
                });
            }
        }
        let window = recoverable.map(|r| recovery_window(r.history.timeline, &r.window));
        let hint = newest::load(repo).await;
        let hint_seg = hint.as_ref().and_then(|h| h.segment_name());
        let stale = match (&newest_segment, &hint_seg) {
            (Some(listed), Some(known)) => position(listed) > position(known),
            (Some(_), None) => true,
            _ => false,
        };
        let last_archived = hint.as_ref().map(|h| UnixMicros(h.archived_at_us));
        let wal = Wal {
            newest_segment: newest_segment.map(|s| s.to_string()),
            last_archived_at: last_archived.map(UnixMicros::rfc3339),
            last_archived,
            archive_lag_seconds: last_archived.map(|t| age(now, t)),
            status_object_stale: stale,
            streamed_to: streamed
                .filter(|(seg, _)| newest_segment.is_none_or(|n| position(seg) > position(&n)))
                .map(|(seg, end)| format!("{seg} up to byte {end}")),
        };
        let last_drill = match drill_key {
            Some(time) => last_drill(repo, &time).await,
            None => None,
        };
        Ok(Status {
            generated_at: now.rfc3339(),
            repository: Repo {
                url: repo.url().to_owned(),
                system_identifier: identity.as_ref().map(|i| i.system_identifier.to_string()),
                pg_major: identity.as_ref().map(|i| i.pg_major),
                wal_segment_size: identity.as_ref().map(|i| i.wal_segment_size),
            },
            backups: summarise_backups(&backups, now),
            window,
            timelines,
            wal,
            retention,
            last_drill,
            objects,
            now,
        })
    }

    /// When this status was gathered.
    pub(crate) fn now(&self) -> UnixMicros {
        self.now
    }
}

async fn retention_verdict(
    repo: &Repository,
    policy: &Policy,
    recoverable: &Recoverable,
    now: UnixMicros,
) -> Option<RetentionVerdict> {
    let pins = crate::retention::pins::pinned(repo)
        .await
        .inspect_err(|e| tracing::warn!("retention verdict unknown: {e}"))
        .ok()?;
    let verdicts = crate::retention::verdicts_by_name(policy, recoverable, &pins, now);
    Some(RetentionVerdict {
        policy: policy.to_string(),
        kept: verdicts.values().filter(|rules| !rules.is_empty()).count(),
        pinned: pins.len(),
        expires: verdicts
            .iter()
            .filter(|(_, rules)| rules.is_empty())
            .map(|(name, _)| name.to_string())
            .collect(),
    })
}

pub(crate) fn age(now: UnixMicros, then: UnixMicros) -> f64 {
    (now.0.saturating_sub(then.0)).max(0) as f64 / 1e6
}

type Scanned = (
    Objects,
    Option<SegmentName>,
    Option<(SegmentName, u64)>,
    Option<DrillTime>,
);

/// One listing of the whole repository: counts and sizes by kind, the newest segment, the
/// furthest streamed fragment, the newest drill report.
async fn scan(repo: &Repository) -> Result<Scanned, RepoError> {
    let mut objects = Objects::default();
    let mut newest: Option<SegmentName> = None;
    let mut streamed: Option<(SegmentName, u64)> = None;
    let mut drill: Option<DrillTime> = None;
    for object in repo.list(Listing::Everything).await? {
        let key = ObjectKey::parse(&object.key);
        let count = objects.by_kind.entry(kind_of(key.as_ref())).or_default();
        count.count += 1;
        count.bytes += object.size;
        objects.total += 1;
        objects.total_bytes += object.size;
        match key {
            Some(ObjectKey::Wal(WalFileName::Segment(seg)))
                if newest.is_none_or(|n| position(&seg) > position(&n)) =>
            {
                newest = Some(seg);
            }
            Some(ObjectKey::Fragment { seg, end, .. })
                if streamed.is_none_or(|(s, e)| (position(&seg), end) > (position(&s), e)) =>
            {
                streamed = Some((seg, end));
            }
            Some(ObjectKey::Drill(time)) if drill.as_ref().is_none_or(|d| &time > d) => {
                drill = Some(time);
            }
            _ => {}
        }
    }
    Ok((objects, newest, streamed, drill))
}

async fn last_drill(repo: &Repository, time: &DrillTime) -> Option<LastDrill> {
    let key = time.key();
    let bytes = repo
        .get_bytes_checked(&key, LengthRule::AtMost(MAX_DRILL_REPORT))
        .await
        .inspect_err(|e| tracing::warn!("cannot read the last drill report: {e}"))
        .ok()??;
    let mut drill: LastDrill = serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::warn!("ignoring drill report {key}: {e}"))
        .ok()?;
    drill.key = key;
    Some(drill)
}

fn backup(s: &Summary, now: UnixMicros) -> Backup {
    let start = UnixMicros::parse_rfc3339(&s.start_time);
    let stop = UnixMicros::parse_rfc3339(&s.stop_time);
    Backup {
        name: s.name.to_string(),
        kind: s.kind.as_str(),
        stop_time: s.stop_time.clone(),
        stop,
        age_seconds: stop.map(|t| age(now, t)),
        duration_seconds: start.zip(stop).map(|(a, b)| age(b, a)),
        original_size: s.original_size,
        stored_size: s.stored_size,
    }
}

fn summarise_backups(backups: &[Summary], now: UnixMicros) -> Backups {
    let newest_of = |kind| {
        backups
            .iter()
            .rev()
            .find(|b| b.kind == kind)
            .map(|b| backup(b, now))
    };
    Backups {
        full: backups
            .iter()
            .filter(|b| b.kind == BackupKind::Full)
            .count(),
        delta: backups
            .iter()
            .filter(|b| b.kind == BackupKind::Delta)
            .count(),
        newest_full: newest_of(BackupKind::Full),
        newest_delta: newest_of(BackupKind::Delta),
        newest: backups.last().map(|b| backup(b, now)),
    }
}

fn recovery_window(timeline: TimelineId, w: &window::Window) -> RecoveryWindow {
    let (start_backup, start_time, start_lsn) = match &w.oldest_backup_end {
        Some((name, time, lsn)) => (name.to_string(), Some(time.clone()), lsn.to_string()),
        None => (String::new(), None, String::new()),
    };
    // A last transaction end before the oldest backup's end is no end of a window.
    let start_lsn_value = w.oldest_backup_end.as_ref().map(|(_, _, lsn)| *lsn);
    let end = w
        .last_xact_end
        .filter(|m| start_lsn_value.is_none_or(|s| m.lsn >= s));
    RecoveryWindow {
        timeline: timeline.0,
        start: start_time.as_deref().and_then(UnixMicros::parse_rfc3339),
        start_time,
        start_lsn,
        start_backup,
        end_time: end.map(|m| UnixMicros(m.time_us).rfc3339()),
        end: end.map(|m| UnixMicros(m.time_us)),
        end_lsn: end.map(|m| m.lsn.to_string()),
        text: w.to_string(),
    }
}

/// A timeline whose window could not be worked out (its history file unreadable): listed with
/// the reason rather than left out.
fn unknown_window(timeline: TimelineId, problem: &WindowError) -> RecoveryWindow {
    RecoveryWindow {
        timeline: timeline.0,
        start_time: None,
        start: None,
        start_lsn: String::new(),
        start_backup: String::new(),
        end_time: None,
        end: None,
        end_lsn: None,
        text: format!("unknown: {problem}"),
    }
}
