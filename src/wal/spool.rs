//! The local spool: walvault's scratch directory on the database host.
//!
//! It holds two kinds of small state, both safe to delete at any time:
//! - `pushed/<repository>/<name>`: a marker that a segment was already stored into that
//!   repository by push-ahead, with the checksum and length of what was stored, so the archiver's
//!   later call for it returns at once;
//! - `prefetch/<repository>/<name>`: segments the prefetcher downloaded and verified ahead of
//!   recovery asking for them, named with their checksum and the boot they were written in (see
//!   [prefetch](super::prefetch)).
//!
//! `<repository>` is a hash of the repository's URL: a cluster archiving into two repositories
//! (or clusters sharing a spool) keep apart what each repository holds.
//!
//! It lives outside `pg_wal` (by default `<PGDATA>/walvault_spool`, next to `pg_wal`), so nothing
//! in `pg_wal` is ever a file PostgreSQL or pg_rewind did not expect. The background helpers that
//! work in it (the pusher and the prefetcher) are started detached from here, and take file locks
//! in it so that one runs per spool and a helper and a caller never store the same file at once.
//! Used by the WAL commands (push, pusher, fetch, prefetch).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::repo::Checksum;

#[derive(Clone, Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// The configured spool, or the default next to `wal_dir` (the directory of the WAL file
    /// PostgreSQL named: `pg_wal` for both `%p` of archive_command and restore_command).
    pub(crate) fn locate(configured: Option<&Path>, wal_dir: &Path) -> Spool {
        let dir = match configured {
            Some(dir) => dir.to_path_buf(),
            None => data_dir_of(wal_dir).join("walvault_spool"),
        };
        Spool { dir }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The push-ahead markers and lock of one repository.
    pub(crate) fn pushed_dir(&self, repo_url: &str) -> PathBuf {
        self.dir.join("pushed").join(repo_tag(repo_url))
    }

    /// The prefetched segments of every repository, one directory each.
    pub(crate) fn prefetch_dir(&self) -> PathBuf {
        self.dir.join("prefetch")
    }

    /// The prefetched segments of one repository.
    pub(crate) fn prefetch_repo_dir(&self, repo_url: &str) -> PathBuf {
        self.prefetch_dir().join(repo_tag(repo_url))
    }

    /// Deletes prefetched segments nobody has asked for in `max_age`: what a finished recovery
    /// left behind. Called by wal-push, which runs once recovery is over (on a standby with
    /// `archive_mode = always` it runs during recovery too, hence the age limit).
    pub(crate) async fn drop_stale_prefetch(&self, max_age: std::time::Duration) {
        // Segments sit one directory down, in their repository's directory.
        let mut dirs = vec![self.prefetch_dir()];
        while let Some(dir) = dirs.pop() {
            let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
                continue;
            };
            while let Ok(Some(entry)) = entries.next_entry().await {
                let Ok(meta) = entry.metadata().await else {
                    continue;
                };
                if meta.is_dir() {
                    if dir == self.prefetch_dir() {
                        dirs.push(entry.path());
                    }
                    continue;
                }
                let stale = meta
                    .modified()
                    .is_ok_and(|m| m.elapsed().is_ok_and(|age| age > max_age));
                if stale {
                    let _ = tokio::fs::remove_file(entry.path()).await;
                }
            }
        }
    }
}

/// A repository's directory name in the spool: its URL's crc32, in hex.
fn repo_tag(repo_url: &str) -> String {
    format!("{:08x}", Checksum::of(repo_url.as_bytes()).0)
}

/// Takes an exclusive lock on `path` (created if missing) without waiting: `Ok(None)` when another
/// process holds it. The lock lasts as long as the returned file is open.
pub(crate) fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    let file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Takes an exclusive lock on `path`, waiting up to `limit` for its holder: `Ok(None)` when the
/// wait ran out.
pub(crate) async fn lock_within(path: &Path, limit: Duration) -> std::io::Result<Option<File>> {
    if let Some(file) = try_lock(path)? {
        return Ok(Some(file));
    }
    let file = open_lock_file(path)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A plain thread rather than the runtime's blocking pool: if the wait runs out, the thread
    // stays blocked until the lock is free or the process exits, and must not hold up the
    // runtime's shutdown. The lock taken late is released as the unwanted file is dropped.
    std::thread::spawn(move || {
        let _ = tx.send(file.lock().map(|()| file));
    });
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(locked)) => locked.map(Some),
        Ok(Err(_)) | Err(_) => Ok(None),
    }
}

fn open_lock_file(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Starts `walvault <args>` detached from this process, so the caller can return to PostgreSQL
/// at once while the helper works on.
pub(crate) fn spawn_helper(args: &[std::ffi::OsString]) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a signal meant for the archive or restore command's shell must
        // not stop it half-way (it would only leave a temporary file, but also waste the work).
        .process_group(0)
        .spawn()
        .map(|_| ())
}

/// The data directory of `wal_dir` (`pg_wal`): its parent, `.` for a bare `pg_wal` (PostgreSQL
/// runs archive and restore commands in the data directory).
pub(crate) fn data_dir_of(wal_dir: &Path) -> &Path {
    match wal_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The directory a WAL path lives in, `.` for a bare name.
pub(crate) fn wal_dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn stale_prefetched_segments_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::locate(Some(dir.path()), dir.path());
        std::fs::create_dir_all(spool.prefetch_dir()).unwrap();
        std::fs::create_dir_all(spool.prefetch_dir().join("0badf00d")).unwrap();
        let segment = spool
            .prefetch_dir()
            .join("0badf00d/000000010000000000000001");
        std::fs::write(&segment, b"wal").unwrap();
        spool.drop_stale_prefetch(Duration::from_secs(3600)).await;
        assert!(segment.exists(), "a fresh file must stay");
        spool.drop_stale_prefetch(Duration::ZERO).await;
        assert!(!segment.exists(), "an old file must go");
    }

    #[test]
    fn default_spool_sits_next_to_pg_wal() {
        let s = Spool::locate(
            None,
            wal_dir_of(Path::new("pg_wal/000000010000000000000001")),
        );
        assert_eq!(s.dir(), Path::new("./walvault_spool"));
        let s = Spool::locate(None, Path::new("/data/pg/pg_wal"));
        assert_eq!(
            s.prefetch_dir(),
            Path::new("/data/pg/walvault_spool/prefetch")
        );
        let s = Spool::locate(
            Some(Path::new("/var/spool/wv")),
            Path::new("/data/pg/pg_wal"),
        );
        assert_eq!(
            s.pushed_dir("file:///repo"),
            Path::new("/var/spool/wv/pushed").join(repo_tag("file:///repo"))
        );
        assert_ne!(
            s.pushed_dir("file:///repo"),
            s.pushed_dir("s3://bucket/repo")
        );
    }
}
