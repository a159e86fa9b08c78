//! Base backups: `backup-push` (full and page-level delta), `backup-fetch`, the catalog and the
//! recoverable window.
//!
//! A backup is a set of pack objects plus the manifest, written last (`manifest.rs`). `walk.rs`
//! decides what is copied, `page.rs` which pages a delta keeps (or `blockmap.rs`, from the WAL,
//! which blocks it reads), `push.rs` reads and stores,
//! `fetch.rs` restores a chain, `catalog.rs` lists backups and `window.rs` says what they and the
//! archived WAL can recover to. Used by `cmd/`, recover and verify.

mod blockmap;
pub(crate) mod catalog;
mod conf_syntax;
pub(crate) mod consistency;
mod copy;
mod delta_fetch;
pub(crate) mod external_config;
pub(crate) mod fetch;
pub(crate) mod manifest;
pub(crate) mod page;
mod pagesums;
pub(crate) mod progress;
pub(crate) mod push;
pub(crate) mod stop_wal;
mod tree;
pub(crate) mod walk;
pub(crate) mod window;

use std::path::PathBuf;

use crate::pg::PgError;
use crate::repo::identity::IdentityError;
use crate::repo::layout::InvalidBackupName;
use crate::repo::RepoError;

/// Content bytes at which a pack object is closed (it holds up to this plus one [`CHUNK`]):
/// large enough that a cluster of tiny files does not become one request per file, small
/// enough that each worker holds only one pack in memory.
pub(crate) const PACK_TARGET: usize = 8 << 20;
/// Files are read in chunks of this size, so one huge relation is spread over many workers.
pub(crate) const CHUNK: u64 = 8 << 20;

/// Half-open `ranges` sorted, with overlapping and touching ones joined.
pub(crate) fn merged_ranges<T: Ord + Copy>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some((_, end)) if a <= *end => *end = (*end).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BackupError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Name(#[from] InvalidBackupName),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {problem}")]
    Invalid { what: String, problem: String },
    #[error("backup {0} not found in the repository (see backup-list)")]
    NotFound(String),
    #[error("object {object}: {problem}")]
    Corrupt { object: String, problem: String },
    #[error("restoring {file}: {source}")]
    Restore {
        file: String,
        #[source]
        source: RepoError,
    },
    #[error("a background task failed: {0}")]
    Task(String),
}

impl BackupError {
    pub(crate) fn io<'a>(
        op: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> BackupError + 'a {
        move |source| BackupError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, problem: impl Into<String>) -> BackupError {
        BackupError::Invalid {
            what: what.into(),
            problem: problem.into(),
        }
    }
}

impl From<tokio::task::JoinError> for BackupError {
    fn from(e: tokio::task::JoinError) -> Self {
        BackupError::Task(e.to_string())
    }
}
