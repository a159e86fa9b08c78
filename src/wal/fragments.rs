//! Fragments: the streamed part of a segment that is not complete yet, stored as small ordered
//! objects `stream/<segment>/<start>-<end>` (byte offsets in the segment, 8 hex digits each), so
//! that each flush uploads only what arrived since the last one. A prefix per segment keeps the
//! listing of one segment's fragments from touching the others, which are being written and
//! deleted at the same time.
//!
//! wal-receive writes them and deletes them once the whole segment is stored at `wal/<segment>`;
//! wal-fetch assembles them when recovery asks for a segment that exists only this way, so PITR
//! reaches the last streamed commit. Fragments may overlap (a restarted receiver re-sends from
//! the start of the segment, and WAL once flushed never changes), so assembly follows the chain
//! that covers the segment from offset 0 and stops at the first hole.

use std::collections::BTreeSet;
use std::path::Path;

use tokio::io::AsyncWriteExt;
use walvault_wal::page::LongPageHeader;
use walvault_wal::SegmentName;

use crate::repo::layout::{self, Listing, ObjectKey};
use crate::repo::{publish, temp_beside, LengthRule, RepoError, Repository};

/// One stored fragment: bytes `start..end` of its segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fragment {
    pub(crate) key: String,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// The segments that have fragments stored, in order.
pub(crate) async fn streamed_segments(
    repo: &Repository,
) -> Result<BTreeSet<SegmentName>, RepoError> {
    Ok(repo
        .list(Listing::Fragments)
        .await?
        .iter()
        .filter_map(|o| match ObjectKey::parse(&o.key) {
            Some(ObjectKey::Fragment { seg, .. }) => Some(seg),
            _ => None,
        })
        .collect())
}

/// The stored fragments of `seg`, by start offset.
pub(crate) async fn list(repo: &Repository, seg: &SegmentName) -> Result<Vec<Fragment>, RepoError> {
    let mut fragments: Vec<Fragment> = repo
        .list(Listing::FragmentsOf(seg))
        .await?
        .into_iter()
        .filter_map(|o| match ObjectKey::parse(&o.key) {
            Some(ObjectKey::Fragment {
                seg: of,
                start,
                end,
            }) if of == *seg => Some(Fragment {
                key: o.key,
                start,
                end,
            }),
            _ => None,
        })
        .collect();
    fragments.sort_by_key(|f| (f.start, f.end));
    Ok(fragments)
}

/// The fragments that cover the segment from offset 0 without a hole, in order, each reaching
/// further than the one before.
pub(crate) fn chain(fragments: &[Fragment]) -> Vec<&Fragment> {
    let mut chain = Vec::new();
    let mut covered = 0;
    loop {
        let next = fragments
            .iter()
            .filter(|f| f.start <= covered && f.end > covered)
            .max_by_key(|f| f.end);
        match next {
            Some(f) => {
                covered = f.end;
                chain.push(f);
            }
            None => return chain,
        }
    }
}

/// How far the fragments cover the segment from its start.
pub(crate) fn covered(fragments: &[Fragment]) -> u64 {
    chain(fragments).last().map_or(0, |f| f.end)
}

/// What [`fetch_partial`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Partial {
    /// Written to the destination: this many streamed bytes, then zeros to the segment size.
    Written(u64),
    /// No fragment of the segment exists.
    None,
    /// Fragments were listed but disappeared while being read: the segment was completed in the
    /// meantime, so the caller should look for the whole segment again.
    Vanished,
}

/// Assembles the streamed part of `seg` (of `seg_size` bytes) into `dest`, padded with zeros to
/// the segment size like a pg_receivewal `.partial` (recovery reads the zeros as the end of WAL).
/// Written beside `dest`, fsynced and renamed, like every restore.
///
/// Fragment names and contents come from the repository, so they are checked before use: each
/// fragment must lie within the segment and hold exactly the bytes its name says, overlapping
/// fragments must agree where they overlap, and a fragment past a hole in the chain is an error
/// (serving the part before the hole would end recovery early), unless the whole segment was
/// stored meanwhile.
pub(crate) async fn fetch_partial(
    repo: &Repository,
    seg: &SegmentName,
    seg_size: u64,
    dest: &Path,
) -> Result<Partial, RepoError> {
    let fragments = list(repo, seg).await?;
    if fragments.is_empty() {
        return Ok(Partial::None);
    }
    let chain = match covering_chain(repo, seg, seg_size, &fragments).await? {
        Ok(chain) => chain,
        Err(partial) => return Ok(partial),
    };
    let temp = temp_beside(dest);
    match assemble(repo, &chain, seg_size, &temp).await {
        written @ Ok(Partial::Written(_)) => publish(&temp, dest, written).await,
        other => {
            let _ = tokio::fs::remove_file(&temp).await;
            other
        }
    }
}

/// A fragment that does not hold what its name and its neighbours say.
fn invalid(key: &str, problem: String) -> RepoError {
    RepoError::File {
        op: "assemble fragment",
        path: key.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, problem),
    }
}

/// The chain of fragments that covers the segment from offset 0 with no fragment past a hole;
/// `Err(Partial::Vanished)` when the whole segment was stored meanwhile (its fragments are being
/// cleaned up).
async fn covering_chain<'a>(
    repo: &Repository,
    seg: &SegmentName,
    seg_size: u64,
    fragments: &'a [Fragment],
) -> Result<Result<Vec<&'a Fragment>, Partial>, RepoError> {
    if let Some(f) = fragments.iter().find(|f| f.end > seg_size) {
        return Err(invalid(
            &f.key,
            format!("it ends past the segment size {seg_size}"),
        ));
    }
    let chain = chain(fragments);
    let covered = chain.last().map_or(0, |f| f.end);
    if !chain.is_empty() && fragments.iter().all(|f| f.start <= covered) {
        return Ok(Ok(chain));
    }
    // Fragments but none at offset 0, or beyond a hole: the completed segment's cleanup is
    // under way if the whole segment is stored; otherwise fragments were lost.
    if repo.head(&layout::segment(seg)).await?.is_some() {
        return Ok(Err(Partial::Vanished));
    }
    let after_hole = fragments
        .iter()
        .find(|f| f.start > covered)
        .unwrap_or(&fragments[0]);
    Err(invalid(
        &after_hole.key,
        format!(
            "no stored fragment covers bytes {covered}..{} of the segment",
            after_hole.start
        ),
    ))
}

/// Writes the chain's bytes into `temp`, each fragment checked before it is used, and pads the
/// file with zeros to the segment size.
async fn assemble(
    repo: &Repository,
    chain: &[&Fragment],
    seg_size: u64,
    temp: &Path,
) -> Result<Partial, RepoError> {
    let file_err = |op: &'static str| {
        let path = temp.to_path_buf();
        move |source| RepoError::File { op, path, source }
    };
    let mut out = tokio::fs::File::create(temp)
        .await
        .map_err(file_err("create"))?;
    let mut written = 0u64;
    let mut previous: Option<(&Fragment, Vec<u8>)> = None;
    for &f in chain {
        let Some(bytes) = repo
            .get_bytes_checked(&f.key, LengthRule::Exactly(f.end - f.start))
            .await?
        else {
            return Ok(Partial::Vanished);
        };
        check_fragment(f, &bytes, seg_size, previous.as_ref(), written)?;
        let fresh = bytes
            .get(written.saturating_sub(f.start) as usize..)
            .unwrap_or_default();
        out.write_all(fresh).await.map_err(file_err("write"))?;
        written = f.end;
        previous = Some((f, bytes));
    }
    out.set_len(seg_size).await.map_err(file_err("extend"))?;
    out.sync_all().await.map_err(file_err("fsync"))?;
    Ok(Partial::Written(written))
}

/// Checks fragment `f` (its content `bytes`) against the segment and against the fragment before
/// it in the chain, which holds the segment up to `written`.
fn check_fragment(
    f: &Fragment,
    bytes: &[u8],
    seg_size: u64,
    previous: Option<&(&Fragment, Vec<u8>)>,
    written: u64,
) -> Result<(), RepoError> {
    if f.start == 0 {
        let header = LongPageHeader::parse(bytes)
            .map_err(|e| invalid(&f.key, format!("first page: {e}")))?;
        if u64::from(header.seg_size.bytes()) != seg_size {
            return Err(invalid(
                &f.key,
                format!(
                    "its first page gives segment size {}, the repository {seg_size}",
                    header.seg_size.bytes()
                ),
            ));
        }
    }
    // A link of the chain starts past the end of the link two before it (or it would have been
    // chosen in the place of the one between), so it can only overlap the link just before it.
    // Offsets are within the segment (at most 1 GiB), so they fit usize.
    if let Some((p, before)) = previous {
        let from = f.start.saturating_sub(p.start) as usize;
        let to = written.saturating_sub(p.start) as usize;
        if before.get(from..to) != bytes.get(..to.saturating_sub(from)) {
            return Err(invalid(
                &f.key,
                format!(
                    "bytes {}..{written} differ from fragment {}",
                    f.start, p.key
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(start: u64, end: u64) -> Fragment {
        Fragment {
            key: String::new(),
            start,
            end,
        }
    }

    #[test]
    fn chain_follows_overlaps_and_stops_at_holes() {
        let fs = [
            frag(0, 100),
            frag(0, 250),
            frag(100, 300),
            frag(300, 310),
            frag(400, 500),
        ];
        let c: Vec<(u64, u64)> = chain(&fs).iter().map(|f| (f.start, f.end)).collect();
        assert_eq!(c, [(0, 250), (100, 300), (300, 310)]);
        assert_eq!(covered(&fs), 310);
        assert_eq!(covered(&[frag(10, 20)]), 0);
        assert_eq!(covered(&[]), 0);
    }
}
