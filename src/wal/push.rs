//! Archiving: `wal-push`, what PostgreSQL's `archive_command` runs for every finished WAL file.
//!
//! A push validates the file before anything is stored (a segment's long page header must match
//! its name, and its system identifier the repository's), stores it with `IfAbsent`, and reports
//! success only once the store has made it durable. A name that is already archived is compared
//! content for content: identical is success (PostgreSQL may retry after a crash), different is a
//! loud failure that overwrites nothing.
//!
//! Each segment stored also gets a [summary](crate::wal::summary) of its commit times and restore
//! points, computed from the bytes streamed into the store and written after the segment.
//!
//! Segments PostgreSQL has already marked ready are stored ahead by the [pusher](super::pusher).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::sync::OnceCell;
use walvault_wal::page::{validate_partial, validate_segment, SIZE_OF_XLOG_LONG_PHD};
use walvault_wal::{WalError, WalFileName};

use super::history::{self, BadHistoryFile};
use super::pusher::Markers;
use super::spool::{self, Spool};
use crate::repo::identity::{self, Identity, IdentityError};
use crate::repo::{RepoError, Repository, WalContent, WalStored};
use crate::wal::summary;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ArchiveError {
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
    #[error("{path}: {source}")]
    BadHistory {
        path: PathBuf,
        #[source]
        source: BadHistoryFile,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// How one file ended up archived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Stored now: content and stored sizes.
    Stored { content: u64, stored: u64 },
    /// Already in the repository with identical content.
    AlreadyArchived,
    /// Stored earlier by push-ahead; the local file matches what was stored.
    Ahead,
}

/// Repository-wide state shared by the pushes of one process.
pub(crate) struct Archiver {
    pub(super) repo: Arc<Repository>,
    identity: OnceCell<Identity>,
}

impl Archiver {
    pub(crate) fn new(repo: Arc<Repository>) -> Arc<Archiver> {
        Arc::new(Archiver {
            repo,
            identity: OnceCell::new(),
        })
    }

    /// Archives `path` for PostgreSQL, unless the pusher already stored this very file. Calls
    /// `start_pusher` first when other ready segments wait and no pusher is running.
    pub(crate) async fn push_requested(
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
        crate::failpoint::pause_if_enabled("wal-push-claim-taken").await;
        // The pusher may have been storing this file while we waited for the claim.
        if let Some(pushed) = markers.take_if_matches(&name, path).await {
            return Ok((name, pushed));
        }
        let result = self.push(&name, path).await.map(|pushed| (name, pushed));
        drop(claim);
        result
    }

    /// Validates and stores one file. Returns how.
    pub(super) async fn push(
        &self,
        name: &WalFileName,
        path: &Path,
    ) -> Result<Pushed, ArchiveError> {
        self.validate(name, path).await?;
        let stored = match name {
            WalFileName::Segment(seg) => summary::store_segment(&self.repo, seg, path).await?,
            _ => {
                self.repo
                    .store_wal(name, WalContent::File(path), |_| {})
                    .await?
            }
        };
        Ok(match stored {
            WalStored::Created(stored) => Pushed::Stored {
                content: stored.content_len,
                stored: stored.stored_len,
            },
            WalStored::Identical => Pushed::AlreadyArchived,
        })
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
            WalFileName::History(_) | WalFileName::Backup { .. } => {
                // One byte past the limit is enough to refuse an oversized file.
                let mut content = Vec::new();
                tokio::fs::File::open(path)
                    .await
                    .map_err(read_err)?
                    .take(history::MAX_LEN + 1)
                    .read_to_end(&mut content)
                    .await
                    .map_err(read_err)?;
                let seg_size = match name {
                    WalFileName::Backup { .. } => identity::load(&self.repo)
                        .await?
                        .and_then(|id| id.segment_size()),
                    _ => None,
                };
                history::check(name, &content, seg_size).map_err(|source| {
                    ArchiveError::BadHistory {
                        path: path.to_path_buf(),
                        source,
                    }
                })?;
            }
        }
        Ok(())
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
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
        let (_dir, archiver, repo_dir, wal_dir) = archiver_and_dirs().await;
        let names = [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000003",
        ];
        for name in names {
            std::fs::write(wal_dir.join(name), segment(name)).unwrap();
            std::fs::write(wal_dir.join(format!("archive_status/{name}.ready")), "").unwrap();
        }
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
        assert_eq!(second.1, Pushed::Ahead);

        // A file written to since the pusher stored it is not vouched for: it is compared.
        let path = wal_dir.join(names[2]);
        let bytes = std::fs::read(&path).unwrap();
        // File times tick with the kernel's clock (a few ms); PostgreSQL finished the file
        // long before, here it was written a moment ago.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, &bytes).unwrap();
        let third = archiver.push_requested(&path, &spool, || {}).await.unwrap();
        assert_eq!(third.1, Pushed::AlreadyArchived);
    }

    /// A cluster archiving into two repositories (`wal-push` twice in its archive_command) has
    /// push-ahead for each: one repository's markers neither stop the other's pusher nor are
    /// consumed by the other's calls.
    #[tokio::test]
    async fn two_repositories_each_keep_their_push_ahead() {
        let (dir, first, _, wal_dir) = archiver_and_dirs().await;
        let other_dir = dir.path().join("other-repo");
        std::fs::create_dir(&other_dir).unwrap();
        let second = Archiver::new(Arc::new(crate::repo::local_for_tests(&other_dir).await));
        let names = ["000000010000000000000001", "000000010000000000000002"];
        for name in names {
            std::fs::write(wal_dir.join(name), segment(name)).unwrap();
            std::fs::write(wal_dir.join(format!("archive_status/{name}.ready")), "").unwrap();
        }
        let spool = Spool::locate(None, &wal_dir);
        assert_eq!(first.push_ahead(&wal_dir, &spool, 4).await, 2);

        // PostgreSQL's archive_command for the first segment: both calls, then `.done`.
        let (_, pushed) = first
            .push_requested(&wal_dir.join(names[0]), &spool, || {})
            .await
            .unwrap();
        assert_eq!(pushed, Pushed::Ahead);
        let mut started = false;
        let (_, pushed) = second
            .push_requested(&wal_dir.join(names[0]), &spool, || started = true)
            .await
            .unwrap();
        assert!(
            started,
            "the first repository's markers stopped the second's pusher"
        );
        assert!(matches!(pushed, Pushed::Stored { .. }), "{pushed:?}");
        std::fs::rename(
            wal_dir.join(format!("archive_status/{}.ready", names[0])),
            wal_dir.join(format!("archive_status/{}.done", names[0])),
        )
        .unwrap();
        assert_eq!(second.push_ahead(&wal_dir, &spool, 4).await, 1);

        // The second segment: each call finds its own repository's marker.
        for archiver in [&first, &second] {
            let (_, pushed) = archiver
                .push_requested(&wal_dir.join(names[1]), &spool, || {})
                .await
                .unwrap();
            assert_eq!(pushed, Pushed::Ahead);
        }
    }

    async fn archiver_and_dirs() -> (tempfile::TempDir, Arc<Archiver>, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (repo_dir, wal_dir) = (dir.path().join("repo"), dir.path().join("pg_wal"));
        std::fs::create_dir_all(wal_dir.join("archive_status")).unwrap();
        std::fs::create_dir(&repo_dir).unwrap();
        let archiver = Archiver::new(Arc::new(crate::repo::local_for_tests(&repo_dir).await));
        (dir, archiver, repo_dir, wal_dir)
    }

    #[tokio::test]
    async fn history_files_postgres_never_writes_are_not_archived() {
        let (_dir, archiver, repo_dir, wal_dir) = archiver_and_dirs().await;
        let spool = Spool::locate(None, &wal_dir);
        for (name, content) in [
            ("00000002.history", ""),
            ("00000003.history", "3\t0/3000158\tits own parent\n"),
            ("000000010000000000000002.00000028.backup", ""),
        ] {
            let path = wal_dir.join(name);
            std::fs::write(&path, content).unwrap();
            let err = archiver
                .push_requested(&path, &spool, || {})
                .await
                .unwrap_err();
            assert!(
                matches!(err, ArchiveError::BadHistory { .. }),
                "{name}: {err}"
            );
            assert!(
                !repo_dir.join("wal").join(name).exists(),
                "{name} was stored"
            );
        }
        let path = wal_dir.join("00000002.history");
        std::fs::write(&path, "1\t0/3000158\tno recovery target specified\n").unwrap();
        let (_, pushed) = archiver.push_requested(&path, &spool, || {}).await.unwrap();
        assert!(matches!(pushed, Pushed::Stored { .. }), "{pushed:?}");
    }

    #[tokio::test]
    async fn an_object_that_exists_but_cannot_be_read_fails_the_push() {
        let (_dir, archiver, repo_dir, wal_dir) = archiver_and_dirs().await;
        let spool = Spool::locate(None, &wal_dir);
        let name = "000000010000000000000002";
        let path = wal_dir.join(name);
        std::fs::write(&path, segment(name)).unwrap();
        // A name that is taken (a new link to it fails) but opens as missing.
        std::fs::create_dir_all(repo_dir.join("wal")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", repo_dir.join("wal").join(name)).unwrap();
        let err = archiver
            .push_requested(&path, &spool, || {})
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArchiveError::Repo(RepoError::Vanishing(_))),
            "{err}"
        );
        let key = crate::repo::layout::wal(&name.parse().unwrap());
        assert!(err.to_string().contains(&key), "{err}");
    }
}
