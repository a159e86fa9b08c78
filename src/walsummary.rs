//! Segment summaries: for each archived segment, the first, last and latest-timed transaction end
//! (commit or abort, with its time and LSN) and the restore points it holds, stored as a small JSON object
//! `walsummary/<segment>` next to `wal/<segment>`.
//!
//! A recovery target time is only reached at a transaction end, and a target name only at its
//! restore point, so these summaries let the recovery planner check a target against the archive
//! without downloading WAL. wal-push and wal-receive write one after each segment they store,
//! from the bytes they were streaming anyway ([`put_segment`]). Summaries are advisory: writing one
//! never fails a push, and readers treat a missing or unreadable summary as "unknown".

use std::path::Path;

use serde::{Deserialize, Serialize};
use walvault_wal::page::SIZE_OF_XLOG_LONG_PHD;
use walvault_wal::{
    LongPageHeader, Lsn, PgTimestamp, RecordReader, SegmentName, TargetEvent, WalSegmentSize,
};

use crate::repo::{RepoError, Repository, Stored};
use crate::store::{Committed, PutMode};

/// Largest segment [`put_segment`] buffers to summarise: the 16 MiB default and up to 64 MiB.
const MAX_SUMMARISED_SEGMENT: u64 = 64 << 20;

/// Where the summary of `name` is stored.
pub fn summary_key(name: &SegmentName) -> String {
    format!("walsummary/{name}")
}

/// A point in the WAL with the time the record there carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Where the record starts.
    #[serde(with = "crate::backup::manifest::lsn_text")]
    pub lsn: Lsn,
    /// The record's timestamp, in microseconds since the Unix epoch.
    pub time_us: i64,
}

/// A restore point created with `pg_create_restore_point()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    pub name: String,
    #[serde(flatten)]
    pub at: Mark,
}

/// What one segment offers as recovery targets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    /// The first commit or abort record starting in the segment.
    pub first_xact_end: Option<Mark>,
    /// The last one.
    pub last_xact_end: Option<Mark>,
    /// The one with the latest time. Sessions take their commit time before inserting the
    /// commit record, so times are not in LSN order: a segment whose last commit is before a
    /// target may still hold one after it. Absent from summaries of older walvault versions.
    #[serde(default)]
    pub latest_xact_end: Option<Mark>,
    pub restore_points: Vec<RestorePoint>,
}

impl SegmentSummary {
    /// The transaction end with the latest time, as far as this summary knows.
    pub fn latest(&self) -> Option<Mark> {
        self.latest_xact_end.or(self.last_xact_end)
    }

    /// Summarises the records starting in `segment`, the content of the segment `name`. A record
    /// that cannot be decoded ends the scan with what was found before it: a summary of a prefix
    /// is still true, just less complete.
    pub fn scan(name: &SegmentName, seg_size: WalSegmentSize, segment: &[u8]) -> SegmentSummary {
        let mut summary = SegmentSummary::default();
        let reader = name
            .start_lsn(seg_size)
            .map_err(|e| e.to_string())
            .and_then(|start| RecordReader::new(segment, start).map_err(|e| e.to_string()));
        let reader = match reader {
            Ok(reader) => reader,
            Err(e) => {
                tracing::debug!("not summarising {name}: {e}");
                return summary;
            }
        };
        for record in reader {
            let record = match record {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!("summary of {name} stops early: {e}");
                    break;
                }
            };
            let mark = |time: PgTimestamp| Mark {
                lsn: record.lsn,
                time_us: time.unix_micros(),
            };
            match record.target_event() {
                Some(TargetEvent::XactEnd { time, .. }) => {
                    let here = mark(time);
                    summary.first_xact_end.get_or_insert(here);
                    summary.last_xact_end = Some(here);
                    if summary
                        .latest_xact_end
                        .is_none_or(|m| m.time_us < here.time_us)
                    {
                        summary.latest_xact_end = Some(here);
                    }
                }
                Some(TargetEvent::RestorePoint { time, name }) => {
                    summary.restore_points.push(RestorePoint {
                        name,
                        at: mark(time),
                    });
                }
                None => {}
            }
        }
        summary
    }
}

/// Stores the segment `name` from the file at `path` under `key` (`IfAbsent`, as every WAL
/// object is stored) and, if this call created it, its summary. The summary is computed from the
/// blocks streamed into the store, so the file is read once, and written after the segment, so
/// it never describes WAL the archive does not have. Holds one segment in memory while it runs.
pub async fn put_segment(
    repo: &Repository,
    key: &str,
    name: &SegmentName,
    path: &Path,
) -> Result<Stored, RepoError> {
    let len = tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    // The scan needs the whole segment in memory; beyond this size (segments of up to 1 GiB
    // exist) memory would no longer be bounded, so such segments go without a summary, which
    // the planner treats as "unknown", until the record reader can scan block by block.
    let summarise = len <= MAX_SUMMARISED_SEGMENT;
    let mut bytes = Vec::with_capacity(if summarise {
        usize::try_from(len).unwrap_or(0)
    } else {
        0
    });
    let stored = repo
        .put_file_tapped(key, path, PutMode::IfAbsent, |block| {
            if summarise {
                bytes.extend_from_slice(block)
            }
        })
        .await?;
    if summarise && stored.committed == Committed::Created {
        store_summary(repo, name, &bytes).await;
    }
    Ok(stored)
}

/// Summarises a segment's content and stores the summary. Failures are logged, never returned:
/// the segment itself is archived, and the planner copes with a missing summary.
async fn store_summary(repo: &Repository, name: &SegmentName, segment: &[u8]) {
    let Some(seg_size) = segment
        .get(..SIZE_OF_XLOG_LONG_PHD)
        .and_then(|first| LongPageHeader::parse(first).ok())
        .map(|header| header.seg_size)
    else {
        return;
    };
    let summary = SegmentSummary::scan(name, seg_size, segment);
    if let Err(e) = put(repo, name, &summary).await {
        tracing::warn!(
            "could not store the summary of {name} (recovery planning will know less): {e}"
        );
    }
}

async fn put(
    repo: &Repository,
    name: &SegmentName,
    summary: &SegmentSummary,
) -> Result<(), RepoError> {
    let json = serde_json::to_vec(summary).unwrap_or_default();
    // Overwrite: a summary is derived from the archived segment, so a newer one is as true.
    repo.put_bytes(&summary_key(name), &json, PutMode::Overwrite)
        .await
        .map(|_| ())
}

/// The stored summary of `name`; `None` when it is absent or unreadable.
pub async fn load(repo: &Repository, name: &SegmentName) -> Option<SegmentSummary> {
    let bytes = match repo.get_bytes(&summary_key(name)).await {
        Ok(bytes) => bytes?,
        Err(e) => {
            tracing::debug!("cannot read the summary of {name}: {e}");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::debug!("ignoring unreadable summary of {name}: {e}"))
        .ok()
}
