//! Base backups: `backup-push` (full and page-level delta), `backup-fetch` and the pieces they
//! share.
//!
//! A backup is a set of pack objects under `backups/<name>/packs/` plus the manifest, written
//! last (`manifest.rs`). `walk.rs` decides what is copied, `page.rs` which pages of a relation
//! file a delta must keep, `push.rs` reads and stores, `fetch.rs` restores a chain. Used by the
//! CLI, the catalog and verify.

pub mod catalog;
pub mod consistency;
pub mod fetch;
pub mod manifest;
pub mod page;
pub mod progress;
pub mod push;
mod tree;
pub mod walk;

use std::path::PathBuf;

use crate::pg::PgError;
use crate::repo::identity::IdentityError;
use crate::repo::store::StoreError;
use crate::repo::RepoError;

/// Content bytes at which a pack object is closed (it holds up to this plus one [`CHUNK`]):
/// large enough that a cluster of tiny files does not become one request per file, small
/// enough that each worker holds only one pack in memory.
pub const PACK_TARGET: usize = 8 << 20;
/// Files are read in chunks of this size, so one huge relation is spread over many workers.
pub const CHUNK: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
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
