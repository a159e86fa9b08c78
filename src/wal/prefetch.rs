//! The prefetcher: after wal-fetch served segment N, a detached `wal-prefetch` process downloads
//! N+1..N+k into the spool (outside `pg_wal`), verified, so later calls only rename a local file.
//!
//! Each repository has its own spool directory (named by a hash of its URL), so a spool shared by
//! several clusters never serves one's WAL to another; the prefetcher refuses any object whose
//! length is not the repository's segment size. The spool is a cache and is not fsynced: each
//! file is named `<segment>.<crc32>.<boot id>` (the segment name carries the timeline). Before a
//! file is served, its first page must name that segment, its length must be the page's segment
//! size and, when `PGDATA/global/pg_control` is readable, its system must be PGDATA's: a few
//! microseconds. The content checksum is checked only for a file from an earlier boot, which a
//! kernel crash may have torn; one written since boot was renamed into place after its content
//! was verified, and checking it again would cost milliseconds per segment and guard against
//! nothing a writer of the spool could not also forge. Whatever fails a check is deleted and
//! fetched again from the repository. A call for a segment the prefetcher is downloading at that
//! moment waits for it rather than downloading it a second time. The spool never holds more than
//! k segments: each run first deletes what recovery has passed.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use walvault_wal::page::{validate_segment, LongPageHeader, SIZE_OF_XLOG_LONG_PHD};
use walvault_wal::{SegmentName, WalFileName};

use super::fetch::{local_system_identifier, segment_size, FetchError};
use super::spool::{self, Spool};
use crate::repo::layout;
use crate::repo::Checksum;
use crate::repo::{identity, LengthRule, RepoError, Repository};

/// The longest a wal-fetch call waits for the prefetcher to finish downloading the segment it
/// wants. The prefetcher's own requests are bounded by the store's timeouts; past this, the call
/// downloads the segment itself.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(10);
/// How often a waiting call looks at the download in flight.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(2);

/// What the prefetch spool holds, read once per wal-fetch call.
pub(crate) struct Prefetched {
    dir: PathBuf,
    boot: Option<String>,
    ready: HashMap<SegmentName, SpoolFile>,
    /// The temporary files of downloads in progress, by segment.
    in_flight: HashMap<SegmentName, PathBuf>,
}

/// A prefetched segment.
struct SpoolFile {
    path: PathBuf,
    crc: Checksum,
    /// Written since the machine last booted, so whole.
    this_boot: bool,
}

impl Prefetched {
    /// What the prefetcher of repository `repo_url` spooled.
    pub(crate) fn read(spool: &Spool, repo_url: &str) -> Prefetched {
        Prefetched::scan(spool.prefetch_repo_dir(repo_url), boot_id())
    }

    fn scan(dir: PathBuf, boot: Option<String>) -> Prefetched {
        let mut ready = HashMap::new();
        let mut in_flight = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.filter_map(Result::ok) {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                match SpoolEntry::parse(&name) {
                    Some(SpoolEntry::Ready { seg, crc, boot: b }) => {
                        let this_boot = b.is_some() && b == boot.as_deref();
                        let file = SpoolFile {
                            path: entry.path(),
                            crc,
                            this_boot,
                        };
                        ready.insert(seg, file);
                    }
                    Some(SpoolEntry::InFlight(seg)) => {
                        in_flight.insert(seg, entry.path());
                    }
                    None => {}
                }
            }
        }
        Prefetched {
            dir,
            boot,
            ready,
            in_flight,
        }
    }

    /// Moves the spooled copy of `seg` to `dest`; `false` when there is none or it is unusable
    /// (then it is deleted, and the caller fetches from the repository).
    pub(crate) async fn serve(&mut self, seg: &SegmentName, dest: &Path) -> bool {
        let Some(file) = self.take(seg).await else {
            return false;
        };
        match file.serve(seg, dest) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "prefetched {} is unusable ({e}); fetching {seg} from the repository",
                    file.path.display()
                );
                let _ = std::fs::remove_file(&file.path);
                false
            }
        }
    }

    /// The spooled copy of `seg`, waiting for it if the prefetcher is downloading it now.
    async fn take(&mut self, seg: &SegmentName) -> Option<SpoolFile> {
        if let Some(file) = self.ready.remove(seg) {
            return Some(file);
        }
        let temp = self.in_flight.remove(seg)?;
        let started = std::time::Instant::now();
        // The prefetcher renames the temporary file to its final name once it is verified; its
        // lock is free once it is gone, whatever became of the download.
        while temp.exists() && started.elapsed() < IN_FLIGHT_WAIT {
            if !matches!(lock(&self.dir), Ok(None)) {
                break;
            }
            tokio::time::sleep(IN_FLIGHT_POLL).await;
        }
        tracing::debug!(
            "waited {:?} for the prefetcher to download {seg}",
            started.elapsed()
        );
        *self = Prefetched::scan(self.dir.clone(), self.boot.take());
        self.ready.remove(seg)
    }

    /// Whether to start a prefetcher for `window`: when at most half of it is spooled and no
    /// prefetcher is running. Refilling in batches rather than for every segment recovery takes
    /// saves a process start on most calls, while the spooled half keeps recovery supplied.
    pub(crate) fn refill_needed(&self, window: &[SegmentName]) -> bool {
        let spooled = window.iter().filter(|s| self.ready.contains_key(s)).count();
        if spooled * 2 > window.len() {
            return false;
        }
        match lock(&self.dir) {
            // A prefetcher holds the lock; it will take care of the window or the next call will.
            Ok(None) => false,
            Ok(Some(_released_on_drop)) => true,
            Err(_) => true,
        }
    }
}

impl SpoolFile {
    /// Moves the file to `dest` once its first page says it is `seg` of this cluster and its
    /// length is that page's segment size; one from an earlier boot is also checked against its
    /// checksum.
    fn serve(&self, seg: &SegmentName, dest: &Path) -> std::io::Result<()> {
        let mut file = std::fs::File::open(&self.path)?;
        let len = file.metadata()?.len();
        let mut first = vec![0u8; SIZE_OF_XLOG_LONG_PHD];
        file.read_exact(&mut first)?;
        let header = validate_segment(seg, &first, len).map_err(std::io::Error::other)?;
        if let Some((pg_control, sysid)) = local_system_identifier(dest) {
            if header.system_identifier != sysid {
                return Err(std::io::Error::other(format!(
                    "it is WAL of system {}, but {} names system {sysid}",
                    header.system_identifier,
                    pg_control.display()
                )));
            }
        }
        if !self.this_boot {
            let found = file_crc(&self.path)?;
            if found != self.crc.0 {
                return Err(std::io::Error::other(format!(
                    "content checksum {found:08x}, expected {:08x}",
                    self.crc.0
                )));
            }
        }
        std::fs::rename(&self.path, dest)
    }
}

fn file_crc(path: &Path) -> std::io::Result<u32> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// This boot of the machine, as the kernel names it (hex digits only); `None` where the kernel
/// does not say, and then every spooled file is checked.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = id.trim().chars().filter(|c| *c != '-').collect();
    (hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

/// The spool file name of a prefetched segment with content checksum `crc`, written during boot
/// `boot`.
fn spool_name(seg: &SegmentName, crc: Checksum, boot: Option<&str>) -> String {
    match boot {
        Some(boot) => format!("{seg}.{:08x}.{boot}", crc.0),
        None => format!("{seg}.{:08x}", crc.0),
    }
}

/// What a file in the prefetch directory is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SpoolEntry<'a> {
    /// A spooled segment, named by [`spool_name`].
    Ready {
        seg: SegmentName,
        crc: Checksum,
        boot: Option<&'a str>,
    },
    /// A download in progress: the temporary file [`Repository::get_to_file_named`] writes
    /// beside `<segment>`.
    InFlight(SegmentName),
}

impl<'a> SpoolEntry<'a> {
    /// `None` for anything else (the lock).
    pub(crate) fn parse(name: &'a str) -> Option<SpoolEntry<'a>> {
        if let Some(temp) = name.strip_prefix('.') {
            let (seg, _) = temp.split_once('.')?;
            return seg.parse().ok().map(SpoolEntry::InFlight);
        }
        let mut parts = name.split('.');
        let seg = parts.next()?.parse().ok()?;
        let crc = parts.next().filter(|crc| crc.len() == 8)?;
        let crc = Checksum(u32::from_str_radix(crc, 16).ok()?);
        let boot = parts.next();
        if parts.next().is_some() {
            return None;
        }
        Some(SpoolEntry::Ready { seg, crc, boot })
    }
}

/// The segments a prefetcher should fetch after `current`, which was just restored to `restored`.
/// Reads the segment size from the restored file's own header, so no repository round trip is
/// needed to plan.
pub(crate) async fn prefetch_window(
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

/// Runs one prefetch pass for `window` (the detached `wal-prefetch` process). Returns how many
/// segments it stored. Exits quietly if another prefetcher holds the spool.
pub(crate) async fn prefetch(
    repo: Arc<Repository>,
    spool: &Spool,
    window: Vec<SegmentName>,
    concurrency: usize,
) -> Result<usize, FetchError> {
    let dir = spool.prefetch_repo_dir(repo.url());
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
    let present = forget_outside(&dir, &window);
    let Some(recorded) = identity::load(&repo).await? else {
        return Ok(0);
    };
    let size = LengthRule::Exactly(u64::from(segment_size(&repo, &recorded)?.bytes()));
    let boot = boot_id();
    let mut wanted = window.into_iter().filter(|s| !present.contains(s));
    let mut tasks: tokio::task::JoinSet<Result<Option<Checksum>, RepoError>> =
        tokio::task::JoinSet::new();
    let mut stored = 0;
    let mut end = false;
    // In order, `concurrency` at a time, starting the next as each finishes; the first miss is
    // the end of the archive for now.
    loop {
        while !end && tasks.len() < concurrency.max(1) {
            let Some(seg) = wanted.next() else {
                end = true;
                break;
            };
            let (repo, dir, boot) = (Arc::clone(&repo), dir.clone(), boot.clone());
            tasks.spawn(async move {
                let key = layout::wal(&WalFileName::Segment(seg));
                // Named with its checksum only once whole, so wal-fetch never serves it earlier.
                repo.get_to_file_named(&key, &dir.join(seg.to_string()), size, |crc| {
                    dir.join(spool_name(&seg, crc, boot.as_deref()))
                })
                .await
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        match joined {
            Ok(Ok(Some(_))) => {
                stored += 1;
                crate::failpoint::pause_if_enabled("prefetch-spool-written").await;
            }
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
    Ok(stored)
}

/// Deletes spooled segments (and leftover temporary files) that are not in the window: recovery
/// has passed them or moved to another timeline, so they would only take space. Returns the
/// segments of the window that are spooled.
fn forget_outside(dir: &Path, window: &[SegmentName]) -> Vec<SegmentName> {
    let mut kept = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return kept;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        match SpoolEntry::parse(&name) {
            Some(SpoolEntry::Ready { seg, .. }) if window.contains(&seg) => kept.push(seg),
            _ if name == LOCK_FILE => {}
            _ => {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    kept
}

const LOCK_FILE: &str = "lock";

/// Takes the prefetcher's lock on `dir` without waiting: `Ok(None)` when another process holds it.
fn lock(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    spool::try_lock(&dir.join(LOCK_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::fetch::tests::{setup as fetch_setup, Setup};
    use crate::wal::fetch::{fetch, Fetched};
    use crate::wal::push::tests::segment;

    /// A repository holding cluster 7 and a `pg_wal` to recover into, with its spool.
    async fn setup() -> (Setup, Spool) {
        let s = fetch_setup().await;
        let spool = Spool::locate(None, &s.pg_wal);
        std::fs::create_dir_all(spool.prefetch_repo_dir(s.repo.url())).unwrap();
        (s, spool)
    }

    fn seg(n: u32) -> SegmentName {
        format!("0000000100000000000000{n:02X}").parse().unwrap()
    }

    /// Writes `content` into `dir` as the spooled copy of `seg(n)` from boot `boot`.
    fn spool_file(dir: &Path, n: u32, boot: &str, content: &[u8]) {
        let name = spool_name(&seg(n), Checksum::of(content), Some(boot));
        std::fs::write(dir.join(name), content).unwrap();
    }

    #[tokio::test]
    async fn spooled_segments_of_an_earlier_boot_are_checked_before_they_are_served() {
        let (s, spool) = setup().await;
        let (repo, wal_dir) = (&s.repo, &s.pg_wal);
        let prefetch = spool.prefetch_repo_dir(repo.url());
        let content = |n| segment(&seg(n).to_string());
        let this_boot = boot_id().expect("Linux names its boots");
        let earlier_boot = "0".repeat(32);
        // Written in this boot: served as it is (a process crash cannot tear a renamed file).
        spool_file(&prefetch, 1, &this_boot, &content(1));
        // Written before a reboot: checked, whole...
        spool_file(&prefetch, 2, &earlier_boot, &content(2));
        // ...and torn by the crash.
        let mut torn = content(3);
        torn[5000] ^= 1;
        let torn_name = spool_name(&seg(3), Checksum::of(&content(3)), Some(&earlier_boot));
        std::fs::write(prefetch.join(torn_name), &torn).unwrap();
        // A download in progress is not a spooled segment.
        std::fs::write(
            prefetch.join(".000000010000000000000004.walvault-7.tmp"),
            b"x",
        )
        .unwrap();
        std::fs::write(prefetch.join("lock"), b"").unwrap();
        let mut prefetched = Prefetched::read(&spool, repo.url());
        assert_eq!(prefetched.ready.len(), 3);
        assert_eq!(prefetched.in_flight.len(), 1);
        assert!(prefetched.ready[&seg(1)].this_boot && !prefetched.ready[&seg(2)].this_boot);

        let dest = wal_dir.join("RECOVERYXLOG");
        for n in [1, 2] {
            let fetched = fetch(repo, &mut prefetched, &WalFileName::Segment(seg(n)), &dest).await;
            assert_eq!(fetched.unwrap(), Fetched::Found { from_spool: true });
            assert_eq!(std::fs::read(&dest).unwrap(), content(n));
        }
        // The torn copy is dropped and the repository asked instead (where it is absent).
        let fetched = fetch(repo, &mut prefetched, &WalFileName::Segment(seg(3)), &dest).await;
        assert_eq!(fetched.unwrap(), Fetched::NotFound);
        // No prefetcher holds the lock, so nobody is finishing the download in flight: no wait.
        let started = std::time::Instant::now();
        let fetched = fetch(repo, &mut prefetched, &WalFileName::Segment(seg(4)), &dest).await;
        assert_eq!(fetched.unwrap(), Fetched::NotFound);
        assert!(started.elapsed() < IN_FLIGHT_WAIT);
        let left = Prefetched::read(&spool, repo.url());
        assert!(
            left.ready.is_empty(),
            "{:?}",
            left.ready.keys().collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn only_segments_of_this_repository_and_cluster_are_served() {
        let (s, spool) = setup().await;
        let wal_dir = &s.pg_wal;
        let ours = spool.prefetch_repo_dir(s.repo.url());
        let theirs = spool.prefetch_repo_dir("s3://another/cluster");
        std::fs::create_dir_all(&theirs).unwrap();
        let boot = boot_id().expect("Linux names its boots");
        let content = |n: u32| segment(&seg(n).to_string());
        // Outside this repository's directory: the spool's top, another repository's.
        spool_file(&spool.prefetch_dir(), 5, &boot, &content(5));
        spool_file(&theirs, 6, &boot, &content(6));
        // Named for one segment, holding another.
        spool_file(&ours, 7, &boot, &content(8));
        // Cut short.
        spool_file(&ours, 9, &boot, &content(9)[..4096]);
        let dest = wal_dir.join("RECOVERYXLOG");
        let mut prefetched = Prefetched::read(&spool, s.repo.url());
        for n in [5, 6, 7, 9] {
            assert!(!prefetched.serve(&seg(n), &dest).await, "{} served", seg(n));
            assert!(!dest.exists());
        }
        // Another system's WAL once PGDATA says which system recovers.
        spool_file(&ours, 10, &boot, &content(10));
        s.write_pg_control(8);
        let mut prefetched = Prefetched::read(&spool, s.repo.url());
        assert!(!prefetched.serve(&seg(10), &dest).await);
        assert!(!dest.exists());
        s.write_pg_control(7);
        spool_file(&ours, 11, &boot, &content(11));
        let mut prefetched = Prefetched::read(&spool, s.repo.url());
        assert!(prefetched.serve(&seg(11), &dest).await);
        assert_eq!(std::fs::read(&dest).unwrap(), content(11));
    }

    #[tokio::test]
    async fn a_call_waits_for_the_download_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::locate(None, &dir.path().join("pg_wal"));
        let prefetch = spool.prefetch_repo_dir("file:///repo");
        std::fs::create_dir_all(&prefetch).unwrap();
        let seg: SegmentName = "000000010000000000000007".parse().unwrap();
        let temp = prefetch.join(format!(".{seg}.walvault-9.tmp"));
        std::fs::write(&temp, b"segment").unwrap();
        // The prefetcher: holds the lock, then renames its download into place.
        let held = lock(&prefetch).unwrap().unwrap();
        let mut prefetched = Prefetched::read(&spool, "file:///repo");
        let finished = prefetch.join(spool_name(
            &seg,
            Checksum::of(b"segment"),
            boot_id().as_deref(),
        ));
        let (temp2, finished2) = (temp.clone(), finished.clone());
        let prefetcher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::rename(temp2, finished2).unwrap();
            drop(held);
        });
        let file = prefetched.take(&seg).await.expect("the finished download");
        assert_eq!(file.path, finished);
        prefetcher.join().unwrap();
    }

    #[test]
    fn spool_entries_are_told_apart() {
        let seg: SegmentName = "000000010000000000000007".parse().unwrap();
        let crc = Checksum(0xdeadbeef);
        let boot = "a".repeat(32);
        let name = spool_name(&seg, crc, Some(&boot));
        assert_eq!(
            SpoolEntry::parse(&name),
            Some(SpoolEntry::Ready {
                seg,
                crc,
                boot: Some(&boot)
            })
        );
        assert_eq!(
            SpoolEntry::parse(&spool_name(&seg, crc, None)),
            Some(SpoolEntry::Ready {
                seg,
                crc,
                boot: None
            })
        );
        assert_eq!(
            SpoolEntry::parse(".000000010000000000000007.walvault-12.tmp"),
            Some(SpoolEntry::InFlight(seg))
        );
        for other in [
            "lock",
            "000000010000000000000007",
            "000000010000000000000007.xyz",
            "x.deadbeef",
        ] {
            assert_eq!(SpoolEntry::parse(other), None, "{other}");
        }
    }
}
