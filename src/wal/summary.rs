//! Segment summaries: for each archived segment, the first, last and latest-timed transaction end
//! (commit or abort, with its time and LSN) and the restore points it holds, stored as a small JSON object
//! `walsummary/<segment>` next to `wal/<segment>`.
//!
//! A recovery target time is only reached at a transaction end, and a target name only at its
//! restore point, so these summaries let the recovery planner check a target against the archive
//! without downloading WAL. wal-push and wal-receive write one after each segment they store,
//! from the bytes they were streaming anyway ([`store_segment`]), then advance `status/wal`.
//! Summaries are advisory: writing one never fails a push, and readers treat a missing or
//! unreadable summary as "unknown". Each also carries the segment's block map
//! ([`super::blockrefs`]), from which a delta backup learns what changed; summaries from before
//! block maps have none, which a backup treats as unusable.

use std::path::Path;

use serde::{Deserialize, Serialize};
use walvault_wal::page::SIZE_OF_XLOG_LONG_PHD;
use walvault_wal::{
    LongPageHeader, Lsn, PgTimestamp, RecordScanner, SegmentName, TargetEvent, WalFileName,
    WalRecord,
};

use super::blockrefs::{BlockSummary, Collector};
use crate::repo::layout;
use crate::repo::PutMode;
use crate::repo::{LengthRule, RepoError, Repository, WalContent, WalStored};

/// A point in the WAL with the time the record there carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Mark {
    /// Where the record starts.
    #[serde(with = "crate::backup::manifest::lsn_text")]
    pub(crate) lsn: Lsn,
    /// The record's timestamp, in microseconds since the Unix epoch.
    pub(crate) time_us: i64,
}

/// A restore point created with `pg_create_restore_point()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RestorePoint {
    pub(crate) name: String,
    #[serde(flatten)]
    pub(crate) at: Mark,
}

/// What one segment offers as recovery targets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SegmentSummary {
    /// The first commit or abort record starting in the segment.
    pub(crate) first_xact_end: Option<Mark>,
    /// The last one.
    pub(crate) last_xact_end: Option<Mark>,
    /// The one with the latest time. Sessions take their commit time before inserting the
    /// commit record, so times are not in LSN order: a segment whose last commit is before a
    /// target may still hold one after it. Absent from summaries of older walvault versions.
    #[serde(default)]
    pub(crate) latest_xact_end: Option<Mark>,
    pub(crate) restore_points: Vec<RestorePoint>,
    /// The blocks the segment's records change. Absent from summaries of older walvault versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) blocks: Option<BlockSummary>,
}

impl SegmentSummary {
    /// The transaction end with the latest time, as far as this summary knows.
    pub(crate) fn latest(&self) -> Option<Mark> {
        self.latest_xact_end.or(self.last_xact_end)
    }

    /// Counts one record in.
    fn add(&mut self, record: &WalRecord<'_>) {
        let mark = |time: PgTimestamp| Mark {
            lsn: record.lsn,
            time_us: time.unix_micros(),
        };
        match record.target_event() {
            Some(TargetEvent::XactEnd { time, .. }) => {
                let here = mark(time);
                self.first_xact_end.get_or_insert(here);
                self.last_xact_end = Some(here);
                if self
                    .latest_xact_end
                    .is_none_or(|m| m.time_us < here.time_us)
                {
                    self.latest_xact_end = Some(here);
                }
            }
            Some(TargetEvent::RestorePoint { time, name }) => {
                self.restore_points.push(RestorePoint {
                    name,
                    at: mark(time),
                });
            }
            None => {}
        }
    }
}

/// Summarises a segment from its content handed over in pieces, as it streams into the store.
/// A record that cannot be decoded ends the scan with what was found before it: a summary of a
/// prefix is still true, just less complete.
pub(crate) struct Summariser {
    name: SegmentName,
    state: SummariserState,
    summary: SegmentSummary,
    blocks: Collector,
}

enum SummariserState {
    /// Nothing seen yet: the long page header comes first.
    Start,
    /// Scanning, or done (the scanner knows): kept to the end for the record split with the next
    /// segment.
    Scanning(Box<RecordScanner>),
    /// The scan never started; the summary is complete as it stands, its block map unusable.
    Finished,
    /// The content does not begin with a long page header: there is nothing to summarise.
    NotWal,
}

impl Summariser {
    pub(crate) fn new(name: SegmentName) -> Summariser {
        Summariser {
            name,
            state: SummariserState::Start,
            summary: SegmentSummary::default(),
            blocks: Collector::default(),
        }
    }

    /// Takes the next piece of the segment's content. The first piece must hold the long page
    /// header (the repository hands over blocks of up to a MiB, and a valid segment is larger).
    pub(crate) fn feed(&mut self, piece: &[u8]) {
        if let SummariserState::Start = self.state {
            self.state = self.start(piece);
        }
        let SummariserState::Scanning(scanner) = &mut self.state else {
            return;
        };
        let (name, summary, blocks) = (&self.name, &mut self.summary, &mut self.blocks);
        scanner.feed(piece, &mut |record| match record {
            Ok(record) => {
                summary.add(&record);
                blocks.add(&record);
            }
            Err(e) => {
                tracing::warn!("summary of {name} stops early: {e}");
                blocks.give_up(format!("the scan of {name} stopped early: {e}"));
            }
        });
    }

    fn start(&self, first: &[u8]) -> SummariserState {
        let Some(header) = first
            .get(..SIZE_OF_XLOG_LONG_PHD)
            .and_then(|first| LongPageHeader::parse(first).ok())
        else {
            return SummariserState::NotWal;
        };
        match self.name.start_lsn(header.seg_size) {
            Ok(start) => SummariserState::Scanning(Box::new(RecordScanner::new(&header, start))),
            Err(e) => {
                tracing::debug!("not summarising {}: {e}", self.name);
                SummariserState::Finished
            }
        }
    }

    /// The summary, once the whole segment has been fed; `None` when it was not WAL.
    pub(crate) fn finish(self) -> Option<SegmentSummary> {
        let mut summary = self.summary;
        let mut blocks = self.blocks;
        summary.blocks = Some(match &self.state {
            SummariserState::NotWal => return None,
            SummariserState::Scanning(scanner) => {
                blocks.finish(scanner.pending(), scanner.continuation())
            }
            SummariserState::Start | SummariserState::Finished => {
                blocks.give_up(format!("{} was not scanned", self.name));
                blocks.finish(None, None)
            }
        });
        Some(summary)
    }
}

/// Stores the segment `name` from the file at `path` as every WAL file is stored (never
/// overwriting) and, if this call created it, its summary. The summary is computed from the
/// blocks streamed into the store, so the file is read once and memory stays at a block, and it
/// is written after the segment, so it never describes WAL the archive does not have.
pub(crate) async fn store_segment(
    repo: &Repository,
    name: &SegmentName,
    path: &Path,
) -> Result<WalStored, RepoError> {
    let mut summariser = Summariser::new(*name);
    let mut fed = 0u64;
    let stored = repo
        .store_wal(
            &WalFileName::Segment(*name),
            WalContent::File(path),
            |block| {
                fed += block.len() as u64;
                summariser.feed(block);
            },
        )
        .await?;
    crate::failpoint::pause_if_enabled("wal-stored").await;
    // A store that had to start over fed some blocks twice: no summary rather than a wrong one.
    if let WalStored::Created(stored) = stored {
        let summary = summariser.finish().filter(|_| fed == stored.content_len);
        if let Some(summary) = &summary {
            // The segment itself is archived, and the planner copes with a missing summary.
            if let Err(e) = put(repo, name, summary).await {
                tracing::warn!(
                    "could not store the summary of {name} (recovery planning will know less): {e}"
                );
            }
            crate::failpoint::pause_if_enabled("summary-written").await;
        }
        super::newest::advance(repo, name, summary.as_ref()).await;
    }
    Ok(stored)
}

async fn put(
    repo: &Repository,
    name: &SegmentName,
    summary: &SegmentSummary,
) -> Result<(), RepoError> {
    let json = serde_json::to_vec(summary).unwrap_or_default();
    // A summary is derived from the archived segment, so a newer one is as true, and the
    // planner copes without one: it is not worth two fsyncs on every push.
    repo.put_bytes(&layout::summary(name), &json, PutMode::OverwriteDerived)
        .await
        .map(|_| ())
}

/// The largest summary read. A real one is a few hundred bytes (thousands of restore points in
/// one segment would still fit); anything larger is forged or broken, and the planner copes
/// without it.
const MAX_SUMMARY_BYTES: u64 = 1 << 20;

/// PostgreSQL keeps a restore point name in `MAXFNAMELEN` (64) bytes with its terminator.
const MAX_RESTORE_POINT_NAME: usize = 63;

/// The stored summary of `name`; `None` when it is absent, unreadable or implausible. Summaries
/// are repository content, so untrusted: size and restore point names are checked.
pub(crate) async fn load(repo: &Repository, name: &SegmentName) -> Option<SegmentSummary> {
    let bytes = match repo
        .get_bytes_checked(
            &layout::summary(name),
            LengthRule::AtMost(MAX_SUMMARY_BYTES),
        )
        .await
    {
        Ok(bytes) => bytes?,
        Err(e) => {
            tracing::debug!("cannot read the summary of {name}: {e}");
            return None;
        }
    };
    let summary: SegmentSummary = serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::debug!("ignoring unreadable summary of {name}: {e}"))
        .ok()?;
    let bad_name = summary
        .restore_points
        .iter()
        .find(|rp| rp.name.is_empty() || rp.name.len() > MAX_RESTORE_POINT_NAME);
    if let Some(rp) = bad_name {
        tracing::warn!(
            "ignoring the summary of {name}: it names a restore point of {} bytes, which \
             PostgreSQL cannot write (1 to {MAX_RESTORE_POINT_NAME})",
            rp.name.len()
        );
        return None;
    }
    Some(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FlagValues, Settings};

    async fn repo(dir: &Path) -> Repository {
        let settings = Settings::load(&FlagValues {
            repo: Some(format!("file://{}", dir.display())),
            ..Default::default()
        })
        .unwrap();
        Repository::open(&settings).await.unwrap()
    }

    #[tokio::test]
    async fn implausible_summaries_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path()).await;
        let name: SegmentName = "000000010000000000000003".parse().unwrap();
        let at = Mark {
            lsn: Lsn(0x0300_0028),
            time_us: 1,
        };
        let with_name = |rp_name: String| SegmentSummary {
            restore_points: vec![RestorePoint { name: rp_name, at }],
            ..Default::default()
        };

        let fine = with_name("x".repeat(MAX_RESTORE_POINT_NAME));
        put(&repo, &name, &fine).await.unwrap();
        assert_eq!(load(&repo, &name).await, Some(fine));

        for forged in [String::new(), "x".repeat(MAX_RESTORE_POINT_NAME + 1)] {
            put(&repo, &name, &with_name(forged)).await.unwrap();
            assert_eq!(load(&repo, &name).await, None);
        }

        // A huge object is refused on its announced length, before it is read.
        let mut huge = br#"{"restore_points":[],"pad":""#.to_vec();
        huge.resize(MAX_SUMMARY_BYTES as usize + 10, b' ');
        huge.extend_from_slice(br#""}"#);
        repo.put_bytes(&layout::summary(&name), &huge, PutMode::OverwriteDerived)
            .await
            .unwrap();
        assert_eq!(load(&repo, &name).await, None);
        let err = repo
            .get_bytes_checked(
                &layout::summary(&name),
                LengthRule::AtMost(MAX_SUMMARY_BYTES),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::Length { .. }), "{err}");
    }
}
