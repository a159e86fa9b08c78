//! The derived status object `status/wal`: the newest archived segment, when it was stored, and
//! the last transaction end known at that point, so `status`, `check` and `metrics` learn the
//! archive's head and the RPO without listing or reading WAL objects.
//!
//! Writers ([`advance`], called after a segment is stored whole by wal-push, the pusher and
//! wal-receive) read, compare and write: the object only ever names a segment that is already
//! stored, and never moves to an older position. Two racing writers or a writer killed between
//! the segment and this object leave it stale (older), never wrong; readers treat it as a hint
//! and compare it with the listing.

use serde::{Deserialize, Serialize};
use walvault_wal::SegmentName;

use super::summary::{Mark, SegmentSummary};
use crate::repo::layout;
use crate::repo::{LengthRule, PutMode, RepoError, Repository};
use crate::time::UnixMicros;

/// The largest status object read: a real one is about 200 bytes.
const MAX_BYTES: u64 = 64 << 10;

/// What `status/wal` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NewestWal {
    /// The newest segment stored whole (by position, then timeline).
    pub(crate) segment: String,
    /// When it was stored (µs since the Unix epoch, the writer's clock).
    pub(crate) archived_at_us: i64,
    /// The latest-timed transaction end of that segment, or the one known before it when the
    /// segment holds none (a quiet cluster's segments often do not).
    pub(crate) last_xact_end: Option<Mark>,
}

impl NewestWal {
    /// The segment it names, if the object (repository content) names a valid one.
    pub(crate) fn segment_name(&self) -> Option<SegmentName> {
        self.segment.parse().ok()
    }
}

/// Where a segment is in the WAL: position first, then timeline (a later timeline's copy of
/// a segment holds the same position's newer bytes).
pub(crate) fn position(seg: &SegmentName) -> (u32, u32, u32) {
    (seg.log, seg.seg, seg.tli.0)
}

/// The status object, or `None` when absent, unreadable or implausible (a hint only).
pub(crate) async fn load(repo: &Repository) -> Option<NewestWal> {
    read(repo)
        .await
        .inspect_err(|e| tracing::debug!("cannot read {}: {e}", layout::status_wal()))
        .ok()
        .flatten()
}

/// The status object; `Ok(None)` when absent or damaged (a torn or forged copy is there to be
/// replaced), `Err` only when the store could not be asked (then nothing may be concluded).
async fn read(repo: &Repository) -> Result<Option<NewestWal>, RepoError> {
    let key = layout::status_wal();
    let bytes = match repo
        .get_bytes_checked(&key, LengthRule::AtMost(MAX_BYTES))
        .await
    {
        Ok(bytes) => bytes,
        Err(e @ RepoError::Store(_)) => return Err(e),
        Err(e) => {
            tracing::debug!("ignoring {key}: {e}");
            None
        }
    };
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<NewestWal>(&bytes)
        .inspect_err(|e| tracing::debug!("ignoring {key}: {e}"))
        .ok()
        .filter(|n| n.segment_name().is_some()))
}

/// Records that `seg` (with `summary`, if one was made) is now stored, unless the object already
/// names a later position. Advisory: failures are logged, never returned, since the segment
/// itself is archived and readers cope with a stale or missing object.
pub(crate) async fn advance(
    repo: &Repository,
    seg: &SegmentName,
    summary: Option<&SegmentSummary>,
) {
    if let Err(e) = try_advance(repo, seg, summary).await {
        tracing::warn!(
            "could not update {} after storing {seg} (status will lag): {e}",
            layout::status_wal()
        );
    }
}

async fn try_advance(
    repo: &Repository,
    seg: &SegmentName,
    summary: Option<&SegmentSummary>,
) -> Result<(), RepoError> {
    // A store that cannot be asked says nothing about the current position: writing now
    // could move the object back, so it is left for the next segment.
    let before = read(repo).await?;
    let known = before.as_ref().and_then(|b| b.segment_name());
    if known.is_some_and(|k| position(&k) >= position(seg)) {
        return Ok(());
    }
    let last_xact_end = summary
        .and_then(SegmentSummary::latest)
        .or(before.and_then(|b| b.last_xact_end));
    let newest = NewestWal {
        segment: seg.to_string(),
        archived_at_us: UnixMicros::now().0,
        last_xact_end,
    };
    // Serialising a struct of strings and integers cannot fail.
    let json = serde_json::to_vec(&newest).unwrap_or_default();
    repo.put_bytes(&layout::status_wal(), &json, PutMode::OverwriteDerived)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_wal::Lsn;

    fn mark(time_us: i64) -> Mark {
        Mark {
            lsn: Lsn(0x300_0028),
            time_us,
        }
    }

    /// The object never moves back, and a segment without commits keeps the last one known.
    #[tokio::test]
    async fn the_status_object_only_moves_forward() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::repo::local_for_tests(dir.path()).await;
        assert_eq!(load(&repo).await, None);
        let seg = |s: &str| s.parse::<SegmentName>().unwrap();
        let with = |t| SegmentSummary {
            latest_xact_end: Some(mark(t)),
            ..Default::default()
        };
        advance(&repo, &seg("000000010000000000000005"), Some(&with(5))).await;
        advance(&repo, &seg("000000010000000000000004"), Some(&with(4))).await;
        let now = load(&repo).await.unwrap();
        assert_eq!(now.segment, "000000010000000000000005");
        assert_eq!(now.last_xact_end, Some(mark(5)));
        advance(&repo, &seg("000000010000000100000000"), None).await;
        let now = load(&repo).await.unwrap();
        assert_eq!(now.segment, "000000010000000100000000");
        assert_eq!(now.last_xact_end, Some(mark(5)), "carried over");
        // A later timeline at the same position is newer.
        advance(&repo, &seg("000000020000000100000000"), Some(&with(7))).await;
        assert_eq!(load(&repo).await.unwrap().last_xact_end, Some(mark(7)));
        // A forged object naming no segment is ignored, and overwritten by the next writer.
        repo.put_bytes(
            &layout::status_wal(),
            br#"{"segment":"../x","archived_at_us":1,"last_xact_end":null}"#,
            PutMode::OverwriteDerived,
        )
        .await
        .unwrap();
        assert_eq!(load(&repo).await, None);
        advance(&repo, &seg("000000010000000000000001"), None).await;
        assert_eq!(
            load(&repo).await.unwrap().segment,
            "000000010000000000000001"
        );
    }
}
