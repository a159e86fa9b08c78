//! WAL restore: `wal-fetch`, what PostgreSQL's `restore_command` runs for every file recovery
//! needs, and the prefetcher that keeps the next segments local.
//!
//! The outcome must be unambiguous, because PostgreSQL treats any exit from 1 to 125 as "the
//! archive ends here" and promotes: [`Fetched::NotFound`] is returned only when the repository was
//! reached and said the object does not exist. Every other failure (network, credentials, a
//! checksum that does not match) is retried within a bound and then returned as an error, which the
//! CLI turns into an exit code above 125 so that recovery stops instead of ending early.
//!
//! A segment that exists only as fragments streamed by `wal-receive` is served assembled and
//! padded with zeros, like a pg_receivewal `.partial`, so that recovery reaches the newest
//! streamed commit.
//!
//! Prefetch: after serving segment N, a detached `wal-prefetch` process downloads N+1..N+k into
//! the spool (outside `pg_wal`), verified, so later calls only check and rename a local file. The
//! spool is a cache and is not fsynced: each file is named `<segment>.<crc32>`, and wal-fetch
//! checks the content against that checksum before serving it, so a file torn by a crash is
//! fetched again from the repository instead of reaching PostgreSQL. The spool never holds more
//! than k segments: each run first deletes what recovery has passed.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use walvault_wal::page::LongPageHeader;
use walvault_wal::{SegmentName, WalFileName};

use crate::archive::wal_key;
use crate::codec::Checksum;
use crate::receive::fragments::{self, Partial};
use crate::repo::{RepoError, Repository};
use crate::spool::{self, Spool};

/// Attempts at a fetch that failed for a reason other than "not found", on top of the store's
/// own per-request retries (this also covers a body cut off mid-stream or read back corrupt).
const FETCH_ATTEMPTS: u32 = 3;

#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Written to the destination; `true` when it came from the prefetch spool.
    Found {
        from_spool: bool,
    },
    NotFound,
}

/// Fetches `name` into `dest`.
pub async fn fetch(
    repo: &Repository,
    spool: &Spool,
    name: &WalFileName,
    dest: &Path,
) -> Result<Fetched, RepoError> {
    if let WalFileName::Segment(seg) = name {
        if let Some((path, crc)) = spooled(&spool.prefetch_dir()).remove(&seg.to_string()) {
            match serve_spooled(&path, crc, dest) {
                Ok(()) => return Ok(Fetched::Found { from_spool: true }),
                Err(e) => {
                    tracing::warn!(
                        "prefetched {} is unusable ({e}); fetching {name} from the repository",
                        path.display()
                    );
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    let key = wal_key(name);
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
                return Err(RepoError::Store(crate::store::StoreError::Io {
                    op: "assemble streamed fragments of",
                    path: key,
                    source: std::io::Error::other(
                        "they changed while being read and the whole segment is not stored",
                    ),
                }))
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

/// Checks a spooled segment against the checksum in its name, then moves it to `dest`.
fn serve_spooled(path: &Path, crc: Checksum, dest: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let found = hasher.finalize();
    if found != crc.0 {
        return Err(std::io::Error::other(format!(
            "content checksum {found:08x}, expected {:08x}",
            crc.0
        )));
    }
    std::fs::rename(path, dest)
}

/// The spool file name of a prefetched segment with content checksum `crc`.
fn spool_name(seg: &SegmentName, crc: Checksum) -> String {
    format!("{seg}.{:08x}", crc.0)
}

/// The segments spooled in `dir` (named by [`spool_name`]), by segment name. Anything else there
/// (the lock, a download in progress) is left out.
fn spooled(dir: &Path) -> HashMap<String, (PathBuf, Checksum)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let (seg, crc) = name.split_once('.')?;
            let crc = u32::from_str_radix(crc, 16)
                .ok()
                .filter(|_| crc.len() == 8)?;
            Some((seg.to_string(), (entry.path(), Checksum(crc))))
        })
        .collect()
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
        Partial::None => match repo.store().head(&wal_key(name)).await? {
            Some(_) => Ok(None),
            None => Ok(Some(Fetched::NotFound)),
        },
        Partial::Vanished => Ok(None),
    }
}

/// The segments a prefetcher should fetch after `current`, which was just restored to `restored`.
/// Reads the segment size from the restored file's own header, so no repository round trip is
/// needed to plan.
pub async fn prefetch_window(
    current: &WalFileName,
    restored: &Path,
    count: usize,
) -> Vec<SegmentName> {
    let (WalFileName::Segment(seg), true) = (current, count > 0) else {
        return Vec::new();
    };
    let Ok(head) = read_head(restored).await else {
        return Vec::new();
    };
    let Ok(header) = LongPageHeader::parse(&head) else {
        return Vec::new();
    };
    let mut window = Vec::with_capacity(count);
    let mut next = *seg;
    for _ in 0..count {
        match next.next(header.seg_size) {
            Ok(n) => {
                window.push(n);
                next = n;
            }
            Err(_) => break,
        }
    }
    window
}

async fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; walvault_wal::page::SIZE_OF_XLOG_LONG_PHD];
    tokio::fs::File::open(path)
        .await?
        .read_exact(&mut buf)
        .await?;
    Ok(buf)
}

/// Whether to start a prefetcher: when at most half of the window is spooled and no prefetcher
/// is running. Refilling in batches rather than for every segment recovery takes saves a process
/// start on most calls, while the spooled half keeps recovery supplied.
pub fn prefetch_needed(spool: &Spool, window: &[SegmentName]) -> bool {
    let dir = spool.prefetch_dir();
    let present = spooled(&dir);
    let spooled = window
        .iter()
        .filter(|s| present.contains_key(&s.to_string()))
        .count();
    if spooled * 2 > window.len() {
        return false;
    }
    match lock(&dir) {
        // A prefetcher holds the lock; it will take care of the window or the next call will.
        Ok(None) => false,
        Ok(Some(_released_on_drop)) => true,
        Err(_) => true,
    }
}

/// Runs one prefetch pass for `window` (the detached `wal-prefetch` process). Returns how many
/// segments it stored. Exits quietly if another prefetcher holds the spool.
pub async fn prefetch(
    repo: Arc<Repository>,
    spool: &Spool,
    window: Vec<SegmentName>,
    concurrency: usize,
) -> Result<usize, RepoError> {
    let dir = spool.prefetch_dir();
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|source| RepoError::File {
            op: "create",
            path: dir.clone(),
            source,
        })?;
    let Ok(Some(_lock)) = lock(&dir) else {
        return Ok(0);
    };
    forget_outside(&dir, &window);
    let present = spooled(&dir);
    let wanted: Vec<SegmentName> = window
        .into_iter()
        .filter(|s| !present.contains_key(&s.to_string()))
        .collect();
    let mut stored = 0;
    // Fetch in order, a few at a time; the first miss is the end of the archive for now.
    for batch in wanted.chunks(concurrency.max(1)) {
        let mut tasks: tokio::task::JoinSet<Result<Option<Checksum>, RepoError>> =
            tokio::task::JoinSet::new();
        for seg in batch {
            let (repo, dir, seg) = (Arc::clone(&repo), dir.clone(), *seg);
            tasks.spawn(async move {
                // Named with its checksum only once whole, so wal-fetch never sees it earlier.
                let fetching = dir.join(seg.to_string());
                let key = wal_key(&WalFileName::Segment(seg));
                let Some(crc) = repo.get_to_file(&key, &fetching).await? else {
                    return Ok(None);
                };
                let spooled = dir.join(spool_name(&seg, crc));
                tokio::fs::rename(&fetching, &spooled)
                    .await
                    .map_err(|source| RepoError::File {
                        op: "rename",
                        path: spooled,
                        source,
                    })?;
                Ok(Some(crc))
            });
        }
        let mut end = false;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(Some(_))) => stored += 1,
                Ok(Ok(None)) => end = true,
                Ok(Err(e)) => {
                    // wal-fetch will fetch (and retry) it itself when recovery asks.
                    tracing::debug!("prefetch failed: {e}");
                    end = true;
                }
                Err(e) => {
                    tracing::debug!("prefetch task failed: {e}");
                    end = true;
                }
            }
        }
        if end {
            break;
        }
    }
    Ok(stored)
}

/// Deletes spooled segments (and leftover temporary files) that are not in the window: recovery
/// has passed them or moved to another timeline, so they would only take space.
fn forget_outside(dir: &Path, window: &[SegmentName]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let keep: Vec<String> = window.iter().map(|s| s.to_string()).collect();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let segment = name.split_once('.').map_or(name.as_str(), |(seg, _)| seg);
        let whole = name.contains('.') && !name.starts_with('.');
        if name != LOCK_FILE && !(whole && keep.iter().any(|k| k == segment)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

const LOCK_FILE: &str = "lock";

/// Takes the prefetcher's lock on `dir` without waiting: `Ok(None)` when another process holds it.
fn lock(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    spool::try_lock(&dir.join(LOCK_FILE))
}

/// Starts `walvault ... wal-prefetch` detached from this process, so wal-fetch can return to
/// PostgreSQL at once. `global_args` repeats the caller's configuration flags.
pub fn spawn_prefetcher(
    global_args: &[OsString],
    spool: &Spool,
    window: &[SegmentName],
) -> std::io::Result<()> {
    let mut args = global_args.to_vec();
    args.extend(["wal-prefetch".into(), "--spool".into(), spool.dir().into()]);
    args.extend(window.iter().map(|s| s.to_string().into()));
    spool::spawn_helper(&args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FlagValues, Settings};

    #[tokio::test]
    async fn spooled_segments_are_checked_before_they_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let (repo_dir, wal_dir) = (dir.path().join("repo"), dir.path().join("pg_wal"));
        std::fs::create_dir_all(&wal_dir).unwrap();
        std::fs::create_dir(&repo_dir).unwrap();
        let settings = Settings::load(&FlagValues {
            repo: Some(format!("file://{}", repo_dir.display())),
            ..Default::default()
        })
        .unwrap();
        let repo = Repository::open(&settings).await.unwrap();
        let spool = Spool::locate(None, &wal_dir);
        std::fs::create_dir_all(spool.prefetch_dir()).unwrap();
        let (good, torn): (SegmentName, SegmentName) = (
            "000000010000000000000001".parse().unwrap(),
            "000000010000000000000002".parse().unwrap(),
        );
        let content = b"whole segment".to_vec();
        let crc = Checksum::of(&content);
        std::fs::write(spool.prefetch_dir().join(spool_name(&good, crc)), &content).unwrap();
        std::fs::write(spool.prefetch_dir().join(spool_name(&torn, crc)), b"whole").unwrap();
        // A download in progress carries no checksum yet and is not a spooled segment.
        std::fs::write(spool.prefetch_dir().join("000000010000000000000003"), b"x").unwrap();
        assert_eq!(spooled(&spool.prefetch_dir()).len(), 2);

        let dest = wal_dir.join("RECOVERYXLOG");
        let fetched = fetch(&repo, &spool, &WalFileName::Segment(good), &dest).await;
        assert_eq!(fetched.unwrap(), Fetched::Found { from_spool: true });
        assert_eq!(std::fs::read(&dest).unwrap(), content);
        // The torn copy is dropped and the repository asked instead (where it is absent).
        let fetched = fetch(&repo, &spool, &WalFileName::Segment(torn), &dest).await;
        assert_eq!(fetched.unwrap(), Fetched::NotFound);
        assert!(spooled(&spool.prefetch_dir()).is_empty());
    }
}
