//! The detached pusher (`wal-push-ahead`): a wal-push call that finds other segments marked `.ready` starts a detached pusher
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

use walvault_wal::WalFileName;

use super::push::{Archiver, Pushed};
use super::spool::{self, Spool};

/// Longest a call waits for the pusher to finish storing the segment it asked for; beyond that
/// the call stores it itself (safely: the store never overwrites, and a race is compared).
const CLAIM_WAIT: Duration = Duration::from_secs(60);

impl Archiver {
    /// The pusher's work: stores the segments PostgreSQL has marked ready, oldest first, up to
    /// `concurrency` at a time but no more than two per core (compressing is what a store
    /// spends its time on; a second store per core compresses while the first waits for its
    /// fsyncs, and more would only add memory), until a pass finds nothing more to store.
    /// Returns how many it stored; exits at once if another pusher holds the spool.
    pub(crate) async fn push_ahead(
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
        crate::failpoint::pause_if_enabled("pusher-claim-taken").await;
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
                    crate::failpoint::pause_if_enabled("pusher-marker-written").await;
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

/// A repository's pusher state in the spool's `pushed/<repository>/` directory: a marker `<name>`
/// for each segment stored ahead (the stamp of the file stored, and the repository's URL), a
/// claim lock `<name>.claim` per segment being stored, and the pusher's own lock.
#[derive(Clone)]
pub(super) struct Markers {
    dir: PathBuf,
    repo: String,
}

impl Markers {
    pub(super) fn new(spool: &Spool, repo: &str) -> Markers {
        Markers {
            dir: spool.pushed_dir(repo),
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
    pub(super) async fn pusher_needed(&self, wal_dir: &Path, current: &WalFileName) -> bool {
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
    pub(super) async fn claim(&self, name: &WalFileName) -> Option<std::fs::File> {
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
    pub(super) async fn take_if_matches(&self, name: &WalFileName, path: &Path) -> Option<Pushed> {
        let marker = self.dir.join(name.to_string());
        let line = tokio::fs::read_to_string(&marker).await.ok()?;
        let _ = tokio::fs::remove_file(&marker).await;
        let _ = tokio::fs::remove_file(self.claim_path(name)).await;
        let stored = FileStamp::from_line(&line, &self.repo)?;
        let now = FileStamp::of(path).await.ok()?;
        (now == stored).then_some(Pushed::Ahead)
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
