//! Archiving: `wal-push`, what PostgreSQL's `archive_command` runs for every finished WAL file.
//!
//! A push validates the file before anything is stored (a segment's long page header must match
//! its name, and its system identifier the repository's), stores it with `IfAbsent`, and reports
//! success only once the store has made it durable. A name that is already archived is compared
//! content for content: identical is success (PostgreSQL may retry after a crash), different is a
//! loud failure that overwrites nothing.
//!
//! Each segment stored also gets a [summary](crate::walsummary) of its commit times and restore
//! points, computed from the bytes streamed into the store and written after the segment.
//!
//! Push-ahead: a call that finds other segments marked `.ready` starts a detached pusher
//! (`wal-push-ahead`), which stores them oldest first, several at a time, and leaves a marker in
//! the spool for each one that is durable. When the archiver then asks for such a segment, the
//! call checks that the file is the very one the pusher stored, unchanged since (same device,
//! inode, size, modification and change times: PostgreSQL never writes to a finished segment, and
//! any write would move the change time), and returns at once. Each segment has a claim lock in
//! the spool, so the pusher and a call never store the same file at once: a call for a segment
//! the pusher is storing waits for it. A failed push-ahead leaves no marker, so that segment is
//! simply pushed again when its turn comes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::OnceCell;
use walvault_wal::page::{validate_partial, validate_segment, SIZE_OF_XLOG_LONG_PHD};
use walvault_wal::{BackupHistory, TimelineHistory, WalError, WalFileName};

use crate::codec::Checksum;
use crate::identity::{self, Identity, IdentityError};
use crate::repo::{RepoError, Repository};
use crate::spool::{self, Spool};
use crate::store::{Committed, PutMode};
use crate::walsummary;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: not a WAL file name PostgreSQL archives ({source})")]
    BadName {
        path: PathBuf,
        #[source]
        source: WalError,
    },
    #[error("{path}: not valid WAL: {source}")]
    InvalidWal {
        path: PathBuf,
        #[source]
        source: WalError,
    },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{name} is already archived in {repo} with different content (archived {stored}, local \
         file {local}); nothing was overwritten. Is another cluster archiving into this repository?"
    )]
    Conflict {
        name: String,
        repo: String,
        stored: Checksum,
        local: Checksum,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// How one file ended up archived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored now: content and stored sizes.
    Stored { content: u64, stored: u64 },
    /// Already in the repository with identical content.
    AlreadyArchived,
    /// Stored earlier by push-ahead; the local file matches what was stored.
    PushedAhead,
}

/// Longest a call waits for the pusher to finish storing the segment it asked for; beyond that
/// the call stores it itself (safely: the store never overwrites, and a race is compared).
const CLAIM_WAIT: Duration = Duration::from_secs(60);

/// Repository-wide state shared by the pushes of one process.
pub struct Archiver {
    repo: Arc<Repository>,
    identity: OnceCell<Identity>,
}

impl Archiver {
    pub fn new(repo: Arc<Repository>) -> Arc<Archiver> {
        Arc::new(Archiver {
            repo,
            identity: OnceCell::new(),
        })
    }

    /// Archives `path` for PostgreSQL, unless the pusher already stored this very file. Calls
    /// `start_pusher` first when other ready segments wait and no pusher is running.
    pub async fn push_requested(
        &self,
        path: &Path,
        spool: &Spool,
        start_pusher: impl FnOnce(),
    ) -> Result<(WalFileName, Pushed), ArchiveError> {
        let name = parse_name(path)?;
        let wal_dir = spool::wal_dir_of(path);
        let markers = Markers::new(spool, self.repo.url());
        if markers.pusher_needed(wal_dir, &name).await {
            start_pusher();
        }
        if let Some(pushed) = markers.take_if_matches(&name, path).await {
            return Ok((name, pushed));
        }
        let claim = markers.claim(&name).await;
        // The pusher may have been storing this file while we waited for the claim.
        if let Some(pushed) = markers.take_if_matches(&name, path).await {
            return Ok((name, pushed));
        }
        let result = self.push(&name, path).await.map(|pushed| (name, pushed));
        drop(claim);
        result
    }

    /// The pusher's work: stores the segments PostgreSQL has marked ready, oldest first, up to
    /// `concurrency` at a time but no more than two per core (compressing is what a store
    /// spends its time on; a second store per core compresses while the first waits for its
    /// fsyncs, and more would only add memory), until a pass finds nothing more to store.
    /// Returns how many it stored; exits at once if another pusher holds the spool.
    pub async fn push_ahead(
        self: &Arc<Self>,
        wal_dir: &Path,
        spool: &Spool,
        concurrency: usize,
    ) -> usize {
        let markers = Markers::new(spool, self.repo.url());
        let Ok(Some(_running)) = spool::try_lock(&markers.dir.join(PUSHER_LOCK)) else {
            return 0;
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let concurrency = concurrency.clamp(1, 2 * cores);
        let mut stored = 0;
        loop {
            let ready = ready_segments(wal_dir).await;
            if let Some(oldest) = ready.first() {
                markers.forget_before(&oldest.to_string()).await;
            }
            let pushed = markers.pushed().await;
            let todo: Vec<WalFileName> = ready
                .into_iter()
                .filter(|n| !pushed.contains(&n.to_string()))
                .collect();
            let mut progress = 0;
            let mut running = tokio::task::JoinSet::new();
            for next in todo {
                if running.len() >= concurrency {
                    progress += joined(running.join_next().await);
                }
                let (archiver, markers) = (Arc::clone(self), markers.clone());
                let path = wal_dir.join(next.to_string());
                running.spawn(async move { archiver.push_one_ahead(&next, &path, &markers).await });
            }
            while let Some(done) = running.join_next().await {
                progress += joined(Some(done));
            }
            stored += progress;
            if progress == 0 {
                return stored;
            }
        }
    }

    /// Stores one ready segment for the pusher and marks it; `false` when it was left alone
    /// (claimed by a call, archived meanwhile) or failed.
    async fn push_one_ahead(&self, name: &WalFileName, path: &Path, markers: &Markers) -> bool {
        let Ok(Some(_claim)) = spool::try_lock(&markers.claim_path(name)) else {
            return false;
        };
        if markers.exists(name).await || !is_ready(path).await {
            return false;
        }
        let Ok(before) = FileStamp::of(path).await else {
            return false;
        };
        match self.push(name, path).await {
            Ok(_) => {
                // Only a file unchanged while it was read may be vouched for later.
                if FileStamp::of(path).await.is_ok_and(|after| after == before) {
                    markers.record(name, &before).await;
                }
                tracing::debug!("pushed ahead {name}");
                true
            }
            Err(e) => {
                tracing::warn!("push-ahead of {name} failed (it will be pushed on its turn): {e}");
                false
            }
        }
    }

    /// Validates and stores one file. Returns how.
    async fn push(&self, name: &WalFileName, path: &Path) -> Result<Pushed, ArchiveError> {
        self.validate(name, path).await?;
        let key = wal_key(name);
        let repo = &self.repo;
        // Checking first costs one round trip but keeps the no-overwrite promise even on S3
        // services that ignore If-None-Match.
        if repo
            .store()
            .head(&key)
            .await
            .map_err(RepoError::from)?
            .is_some()
        {
            return self.compare_existing(name, &key, path).await;
        }
        let stored = match name {
            WalFileName::Segment(seg) => walsummary::put_segment(repo, &key, seg, path).await?,
            _ => repo.put_file(&key, path, PutMode::IfAbsent).await?,
        };
        match stored.committed {
            Committed::Created => Ok(Pushed::Stored {
                content: stored.content_len,
                stored: stored.stored_len,
            }),
            // Another pusher won the race: same rule as a retry.
            Committed::AlreadyExists => self.compare_existing(name, &key, path).await,
        }
    }

    async fn compare_existing(
        &self,
        name: &WalFileName,
        key: &str,
        path: &Path,
    ) -> Result<Pushed, ArchiveError> {
        let Some(cmp) = self.repo.compare_with_file(key, path).await? else {
            // Deleted between the check and the read (retention racing a retry): store it again.
            return Box::pin(self.push(name, path)).await;
        };
        if !cmp.identical {
            return Err(ArchiveError::Conflict {
                name: name.to_string(),
                repo: self.repo.url().to_owned(),
                stored: cmp.stored,
                local: cmp.local,
            });
        }
        Ok(Pushed::AlreadyArchived)
    }

    /// Refuses what is not WAL of this repository's cluster, before anything is stored.
    async fn validate(&self, name: &WalFileName, path: &Path) -> Result<(), ArchiveError> {
        let read_err = |source| ArchiveError::Read {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |source| ArchiveError::InvalidWal {
            path: path.to_path_buf(),
            source,
        };
        match name {
            WalFileName::Segment(seg) | WalFileName::Partial(seg) => {
                let mut file = tokio::fs::File::open(path).await.map_err(read_err)?;
                let len = file.metadata().await.map_err(read_err)?.len();
                let mut first = vec![0u8; SIZE_OF_XLOG_LONG_PHD];
                let n = file.read(&mut first).await.map_err(read_err)?;
                first.truncate(n);
                let header = if matches!(name, WalFileName::Segment(_)) {
                    validate_segment(seg, &first, len)
                } else {
                    validate_partial(seg, &first, len)
                }
                .map_err(invalid)?;
                let found = Identity::from_header(&header);
                let what = format!("WAL file {}", path.display());
                let recorded = self
                    .identity
                    .get_or_try_init(|| identity::ensure(&self.repo, &found, &what))
                    .await?;
                // The cached identity came from the first file of this call; check each file.
                identity::check(recorded, &found, &what, self.repo.url())?;
            }
            WalFileName::History(tli) => {
                let text = tokio::fs::read_to_string(path).await.map_err(read_err)?;
                TimelineHistory::parse(*tli, &text).map_err(invalid)?;
            }
            WalFileName::Backup { .. } => {
                let text = tokio::fs::read_to_string(path).await.map_err(read_err)?;
                BackupHistory::parse(&text).map_err(invalid)?;
            }
        }
        Ok(())
    }
}

/// Where a WAL file is stored.
pub fn wal_key(name: &WalFileName) -> String {
    format!("wal/{name}")
}

fn parse_name(path: &Path) -> Result<WalFileName, ArchiveError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    file_name.parse().map_err(|source| ArchiveError::BadName {
        path: path.to_path_buf(),
        source,
    })
}

fn joined(done: Option<Result<bool, tokio::task::JoinError>>) -> usize {
    match done {
        Some(Ok(true)) => 1,
        Some(Ok(false)) | None => 0,
        Some(Err(e)) => {
            tracing::warn!("push-ahead task failed: {e}");
            0
        }
    }
}

/// The segments PostgreSQL has marked ready, oldest first: the order it archives them in.
async fn ready_segments(wal_dir: &Path) -> Vec<WalFileName> {
    let Ok(mut entries) = tokio::fs::read_dir(wal_dir.join("archive_status")).await else {
        return Vec::new();
    };
    let mut ready = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(Ok(name @ WalFileName::Segment(_))) =
            file.strip_suffix(".ready").map(str::parse::<WalFileName>)
        {
            ready.push(name);
        }
    }
    ready.sort_by_key(|n| n.to_string());
    ready
}

/// Whether PostgreSQL still waits to archive the WAL file at `path`.
async fn is_ready(path: &Path) -> bool {
    let (dir, name) = (
        spool::wal_dir_of(path),
        path.file_name().unwrap_or_default(),
    );
    let mut status = name.to_os_string();
    status.push(".ready");
    tokio::fs::metadata(dir.join("archive_status").join(status))
        .await
        .is_ok()
}

/// What identifies a file's content without reading it: PostgreSQL never writes to a finished
/// segment, and any write, truncation or replacement changes the change time or the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    async fn of(path: &Path) -> std::io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = tokio::fs::metadata(path).await?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }

    fn to_line(self, repo: &str) -> String {
        format!(
            "{} {} {} {} {} {repo}\n",
            self.dev, self.ino, self.len, self.mtime_ns, self.ctime_ns
        )
    }

    /// The stamp in a marker line, if the marker was written for `repo`.
    fn from_line(line: &str, repo: &str) -> Option<FileStamp> {
        let mut fields = line.trim_end_matches('\n').splitn(6, ' ');
        let mut next = || fields.next();
        let stamp = FileStamp {
            dev: next()?.parse().ok()?,
            ino: next()?.parse().ok()?,
            len: next()?.parse().ok()?,
            mtime_ns: next()?.parse().ok()?,
            ctime_ns: next()?.parse().ok()?,
        };
        (next()? == repo).then_some(stamp)
    }
}

const PUSHER_LOCK: &str = "lock";
const CLAIM_SUFFIX: &str = ".claim";

/// The pusher's state in the spool's `pushed/` directory: a marker `<name>` for each segment
/// stored ahead (the stamp of the file stored, and the repository it went to), a claim lock
/// `<name>.claim` per segment being stored, and the pusher's own lock.
#[derive(Clone)]
struct Markers {
    dir: PathBuf,
    repo: String,
}

impl Markers {
    fn new(spool: &Spool, repo: &str) -> Markers {
        Markers {
            dir: spool.pushed_dir(),
            repo: repo.to_owned(),
        }
    }

    fn claim_path(&self, name: &WalFileName) -> PathBuf {
        self.dir.join(format!("{name}{CLAIM_SUFFIX}"))
    }

    async fn exists(&self, name: &WalFileName) -> bool {
        tokio::fs::metadata(self.dir.join(name.to_string()))
            .await
            .is_ok()
    }

    /// The names of the segments with a marker.
    async fn pushed(&self) -> HashSet<String> {
        let mut names = HashSet::new();
        if let Ok(mut entries) = tokio::fs::read_dir(&self.dir).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                names.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names
    }

    /// Whether a pusher should be started: none is running, and a ready segment other than
    /// `current` has no marker yet.
    async fn pusher_needed(&self, wal_dir: &Path, current: &WalFileName) -> bool {
        match spool::try_lock(&self.dir.join(PUSHER_LOCK)) {
            Ok(Some(_free)) => {}
            Ok(None) => return false,
            Err(e) => {
                tracing::debug!("no push-ahead: cannot use {}: {e}", self.dir.display());
                return false;
            }
        }
        let ready = ready_segments(wal_dir).await;
        if !ready.iter().any(|n| n != current) {
            return false;
        }
        let pushed = self.pushed().await;
        ready
            .iter()
            .any(|n| n != current && !pushed.contains(&n.to_string()))
    }

    /// Claims `name` for this call, waiting while the pusher stores it. `None` when the claim
    /// could not be had; the call then stores the file regardless, which is safe, only slower.
    async fn claim(&self, name: &WalFileName) -> Option<std::fs::File> {
        match spool::lock_within(&self.claim_path(name), CLAIM_WAIT).await {
            Ok(Some(claim)) => Some(claim),
            Ok(None) => {
                tracing::warn!(
                    "{name}: the push-ahead process held it for over {} s; storing it here",
                    CLAIM_WAIT.as_secs()
                );
                None
            }
            Err(e) => {
                tracing::debug!("{name}: no claim in {}: {e}", self.dir.display());
                None
            }
        }
    }

    async fn record(&self, name: &WalFileName, stamp: &FileStamp) {
        let path = self.dir.join(name.to_string());
        let temp = crate::repo::temp_beside(&path);
        let write = async {
            tokio::fs::write(&temp, stamp.to_line(&self.repo)).await?;
            tokio::fs::rename(&temp, &path).await
        };
        // Without the marker the segment is pushed again on its turn and found identical.
        if let Err(e) = write.await {
            tracing::debug!("could not record push-ahead marker for {name}: {e}");
        }
    }

    /// If the pusher stored `name` into this repository from this very file, unchanged since,
    /// consumes the marker and the segment's claim file.
    async fn take_if_matches(&self, name: &WalFileName, path: &Path) -> Option<Pushed> {
        let marker = self.dir.join(name.to_string());
        let line = tokio::fs::read_to_string(&marker).await.ok()?;
        let _ = tokio::fs::remove_file(&marker).await;
        let _ = tokio::fs::remove_file(self.claim_path(name)).await;
        let stored = FileStamp::from_line(&line, &self.repo)?;
        let now = FileStamp::of(path).await.ok()?;
        (now == stored).then_some(Pushed::PushedAhead)
    }

    /// Drops markers and claims older than `name`: PostgreSQL has moved past them.
    async fn forget_before(&self, name: &str) {
        let Ok(mut entries) = tokio::fs::read_dir(&self.dir).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file != PUSHER_LOCK && file.as_str() < name {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{FlagValues, Settings};
    use walvault_wal::page::{PgMajor, XLP_LONG_HEADER};
    use walvault_wal::WalSegmentSize;

    const SEG: u64 = 1 << 20;

    /// A segment nothing was written to yet beyond its long header: valid for wal-push.
    pub(crate) fn segment(name: &str) -> Vec<u8> {
        let size = WalSegmentSize::new(SEG).unwrap();
        let Ok(WalFileName::Segment(seg)) = name.parse() else {
            panic!("{name}")
        };
        let mut buf = vec![0u8; SEG as usize];
        buf[0..2].copy_from_slice(&PgMajor::V15.magic().to_le_bytes());
        buf[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        buf[4..8].copy_from_slice(&1u32.to_le_bytes());
        buf[8..16].copy_from_slice(&seg.start_lsn(size).unwrap().0.to_le_bytes());
        buf[24..32].copy_from_slice(&7u64.to_le_bytes());
        buf[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
        buf[36..40].copy_from_slice(&8192u32.to_le_bytes());
        buf
    }

    #[tokio::test]
    async fn calls_find_what_the_pusher_stored_unless_the_file_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (repo_dir, wal_dir) = (dir.path().join("repo"), dir.path().join("pg_wal"));
        std::fs::create_dir_all(wal_dir.join("archive_status")).unwrap();
        std::fs::create_dir(&repo_dir).unwrap();
        let names = [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000003",
        ];
        for name in names {
            std::fs::write(wal_dir.join(name), segment(name)).unwrap();
            std::fs::write(wal_dir.join(format!("archive_status/{name}.ready")), "").unwrap();
        }
        let settings = Settings::load(&FlagValues {
            repo: Some(format!("file://{}", repo_dir.display())),
            ..Default::default()
        })
        .unwrap();
        let archiver = Archiver::new(Arc::new(Repository::open(&settings).await.unwrap()));
        let spool = Spool::locate(None, &wal_dir);

        // The first call stores its own file and asks for a pusher: others are ready.
        let mut started = false;
        let first = archiver
            .push_requested(&wal_dir.join(names[0]), &spool, || started = true)
            .await
            .unwrap();
        assert!(started);
        assert!(matches!(first.1, Pushed::Stored { .. }), "{first:?}");
        std::fs::rename(
            wal_dir.join(format!("archive_status/{}.ready", names[0])),
            wal_dir.join(format!("archive_status/{}.done", names[0])),
        )
        .unwrap();

        assert_eq!(archiver.push_ahead(&wal_dir, &spool, 4).await, 2);
        assert!(repo_dir.join("walsummary").join(names[2]).exists());

        // Everything ready is marked: no pusher needed, and the call returns the marker's word.
        let mut started = false;
        let second = archiver
            .push_requested(&wal_dir.join(names[1]), &spool, || started = true)
            .await
            .unwrap();
        assert!(!started);
        assert_eq!(second.1, Pushed::PushedAhead);

        // A file written to since the pusher stored it is not vouched for: it is compared.
        let path = wal_dir.join(names[2]);
        let bytes = std::fs::read(&path).unwrap();
        // File times tick with the kernel's clock (a few ms); PostgreSQL finished the file
        // long before, here it was written a moment ago.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, &bytes).unwrap();
        let third = archiver.push_requested(&path, &spool, || {}).await.unwrap();
        assert_eq!(third.1, Pushed::AlreadyArchived);
    }
}
