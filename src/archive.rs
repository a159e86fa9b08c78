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
//! Push-ahead: while storing the file it was asked for, a call also stores the next segments that
//! PostgreSQL has marked `.ready`, in parallel, and leaves a marker in the spool for each one that
//! is durable. When the archiver then asks for those segments, the call checks the file against
//! the marker's checksum and returns at once. A failed push-ahead leaves no marker, so that
//! segment is simply pushed again when its turn comes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Repository-wide state shared by the pushes of one call.
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

    /// Pushes `path`, and up to `concurrency - 1` ready segments after it. Only the result for
    /// `path` is returned; push-ahead failures are logged and retried on the segment's own turn.
    pub async fn push_with_ahead(
        self: &Arc<Self>,
        path: &Path,
        spool: &Spool,
        concurrency: usize,
    ) -> Result<(WalFileName, Pushed), ArchiveError> {
        let name = parse_name(path)?;
        let wal_dir = spool::wal_dir_of(path).to_path_buf();
        let markers = Markers::new(spool);
        if let Some(pushed) = markers.take_if_matches(&name, path).await {
            return Ok((name, pushed));
        }
        let mut ahead = tokio::task::JoinSet::new();
        for next in ready_segments(&wal_dir, &name, &markers, concurrency.saturating_sub(1)).await {
            let archiver = Arc::clone(self);
            let markers = markers.clone();
            let next_path = wal_dir.join(next.to_string());
            ahead.spawn(async move {
                let result = archiver.push(&next, &next_path).await;
                if let Ok((_, checksum, len)) = &result {
                    markers.record(&next, *checksum, *len).await;
                }
                (next, result)
            });
        }
        let result = self
            .push(&name, path)
            .await
            .map(|(pushed, _, _)| (name, pushed));
        while let Some(joined) = ahead.join_next().await {
            match joined {
                Ok((next, Ok(_))) => tracing::debug!("pushed ahead {next}"),
                Ok((next, Err(e))) => tracing::warn!(
                    "push-ahead of {next} failed (it will be pushed on its turn): {e}"
                ),
                Err(e) => tracing::warn!("push-ahead task failed: {e}"),
            }
        }
        if let Ok((name, _)) = &result {
            markers.forget_before(&name.to_string()).await;
        }
        result
    }

    /// Validates and stores one file. Returns how, with the content checksum and length.
    async fn push(
        &self,
        name: &WalFileName,
        path: &Path,
    ) -> Result<(Pushed, Checksum, u64), ArchiveError> {
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
            Committed::Created => Ok((
                Pushed::Stored {
                    content: stored.content_len,
                    stored: stored.stored_len,
                },
                stored.checksum,
                stored.content_len,
            )),
            // Another pusher won the race: same rule as a retry.
            Committed::AlreadyExists => self.compare_existing(name, &key, path).await,
        }
    }

    async fn compare_existing(
        &self,
        name: &WalFileName,
        key: &str,
        path: &Path,
    ) -> Result<(Pushed, Checksum, u64), ArchiveError> {
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
        Ok((Pushed::AlreadyArchived, cmp.local, file_len(path).await?))
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

async fn file_len(path: &Path) -> Result<u64, ArchiveError> {
    tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .map_err(|source| ArchiveError::Read {
            path: path.to_path_buf(),
            source,
        })
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

/// The oldest `limit` segments PostgreSQL has marked ready, other than `current`, that push-ahead
/// has not stored yet. PostgreSQL archives oldest first, so these are its next calls.
async fn ready_segments(
    wal_dir: &Path,
    current: &WalFileName,
    markers: &Markers,
    limit: usize,
) -> Vec<WalFileName> {
    if limit == 0 {
        return Vec::new();
    }
    let Ok(mut entries) = tokio::fs::read_dir(wal_dir.join("archive_status")).await else {
        return Vec::new();
    };
    let mut ready = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(Ok(name @ WalFileName::Segment(_))) =
            file.strip_suffix(".ready").map(str::parse::<WalFileName>)
        {
            if name != *current {
                ready.push(name);
            }
        }
    }
    ready.sort_by_key(|n| n.to_string());
    let mut picked = Vec::new();
    for name in ready {
        if picked.len() == limit {
            break;
        }
        if !markers.exists(&name).await {
            picked.push(name);
        }
    }
    picked
}

/// The content checksum and length of a local file, read a block at a time.
async fn checksum_file(path: &Path) -> std::io::Result<(Checksum, u64)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; crate::codec::MAX_BLOCK];
    let mut len = 0u64;
    loop {
        match file.read(&mut buf).await? {
            0 => return Ok((Checksum(hasher.finalize()), len)),
            n => {
                hasher.update(&buf[..n]);
                len += n as u64;
            }
        }
    }
}

/// Push-ahead markers in the spool: `pushed/<name>` holding "<crc32 hex> <length>".
#[derive(Clone)]
struct Markers {
    dir: PathBuf,
}

impl Markers {
    fn new(spool: &Spool) -> Markers {
        Markers {
            dir: spool.pushed_dir(),
        }
    }

    async fn exists(&self, name: &WalFileName) -> bool {
        tokio::fs::metadata(self.dir.join(name.to_string()))
            .await
            .is_ok()
    }

    async fn record(&self, name: &WalFileName, checksum: Checksum, len: u64) {
        let write = async {
            tokio::fs::create_dir_all(&self.dir).await?;
            let path = self.dir.join(name.to_string());
            let temp = crate::repo::temp_beside(&path);
            tokio::fs::write(&temp, format!("{:08x} {len}\n", checksum.0)).await?;
            tokio::fs::rename(&temp, &path).await
        };
        // Without the marker the segment is pushed again on its turn and found identical.
        if let Err(e) = write.await {
            tracing::debug!("could not record push-ahead marker for {name}: {e}");
        }
    }

    /// If push-ahead stored `name` and the file still has that content, consumes the marker.
    async fn take_if_matches(&self, name: &WalFileName, path: &Path) -> Option<Pushed> {
        let marker = self.dir.join(name.to_string());
        let text = tokio::fs::read_to_string(&marker).await.ok()?;
        let _ = tokio::fs::remove_file(&marker).await;
        let (crc, len) = text.trim().split_once(' ')?;
        let (crc, len) = (u32::from_str_radix(crc, 16).ok()?, len.parse::<u64>().ok()?);
        let (local_crc, local_len) = checksum_file(path).await.ok()?;
        (local_len == len && local_crc == Checksum(crc)).then_some(Pushed::PushedAhead)
    }

    /// Drops markers older than `name`: PostgreSQL has moved past them.
    async fn forget_before(&self, name: &str) {
        let Ok(mut entries) = tokio::fs::read_dir(&self.dir).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            if entry.file_name().to_string_lossy().as_ref() < name {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
    }
}
