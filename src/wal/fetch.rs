//! `wal-fetch`: what PostgreSQL's `restore_command` runs for every file recovery needs.
//!
//! The outcome must be unambiguous, because PostgreSQL treats any exit from 1 to 125 as "the
//! archive ends here" and promotes: [`Fetched::NotFound`] is returned only when the repository was
//! reached and said the object does not exist. Every other failure (network, credentials, a
//! checksum that does not match) is retried within a bound and then returned as an error, which the
//! CLI turns into an exit code above 125 so that recovery stops instead of ending early.
//!
//! A segment that exists only as fragments streamed by `wal-receive` is served assembled and
//! padded with zeros, like a pg_receivewal `.partial`, so that recovery reaches the newest
//! streamed commit. Segments the [prefetcher](super::prefetch) spooled are served from the spool.

use std::path::Path;
use std::time::Duration;

use walvault_wal::WalFileName;

use super::fragments::{self, Partial};
use super::prefetch::Prefetched;
use crate::repo::layout;
use crate::repo::{RepoError, Repository};

/// Attempts at a fetch that failed for a reason other than "not found", on top of the store's
/// own per-request retries (this also covers a body cut off mid-stream or read back corrupt).
const FETCH_ATTEMPTS: u32 = 3;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// Written to the destination; `true` when it came from the prefetch spool.
    Found {
        from_spool: bool,
    },
    NotFound,
}

/// Fetches `name` into `dest`, from the prefetch spool when it is there.
pub(crate) async fn fetch(
    repo: &Repository,
    prefetched: &mut Prefetched,
    name: &WalFileName,
    dest: &Path,
) -> Result<Fetched, RepoError> {
    if let WalFileName::Segment(seg) = name {
        if prefetched.serve(seg, dest).await {
            return Ok(Fetched::Found { from_spool: true });
        }
    }
    let key = layout::wal(name);
    let mut attempt = 1;
    loop {
        let fetched = match repo.get_to_file(&key, dest).await {
            Ok(Some(_)) => Ok(Some(Fetched::Found { from_spool: false })),
            Ok(None) => fetch_streamed(repo, name, dest).await,
            Err(e) => Err(e),
        };
        match fetched {
            Ok(Some(fetched)) => return Ok(fetched),
            // Completed while we looked: fetch the whole segment on the next round.
            Ok(None) if attempt < FETCH_ATTEMPTS => attempt += 1,
            Ok(None) => {
                return Err(RepoError::Changing {
                    what: key,
                    problem: "its streamed fragments changed while being read and the whole \
                              segment is not stored",
                })
            }
            Err(e) if attempt < FETCH_ATTEMPTS => {
                tracing::warn!(
                    "fetching {name} failed (attempt {attempt} of {FETCH_ATTEMPTS}): {e}"
                );
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A segment that is not archived whole may exist as fragments streamed by wal-receive: serve
/// them (padded like a `.partial`), so recovery reaches the last streamed commit. `None` when the
/// fragments vanished while being read, which means the segment was just completed.
async fn fetch_streamed(
    repo: &Repository,
    name: &WalFileName,
    dest: &Path,
) -> Result<Option<Fetched>, RepoError> {
    let WalFileName::Segment(seg) = name else {
        return Ok(Some(Fetched::NotFound));
    };
    match fragments::fetch_partial(repo, seg, dest).await? {
        Partial::Written(bytes) => {
            tracing::info!("{name}: serving the {bytes} bytes streamed so far (partial segment)");
            Ok(Some(Fetched::Found { from_spool: false }))
        }
        // The segment is stored whole before its fragments are deleted, so no fragments after a
        // miss means a true miss unless the segment appeared in between: look once more.
        Partial::None => match repo.head(&layout::wal(name)).await? {
            Some(_) => Ok(None),
            None => Ok(Some(Fetched::NotFound)),
        },
        Partial::Vanished => Ok(None),
    }
}
