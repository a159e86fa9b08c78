//! Point-in-time recovery: `walvault recover`.
//!
//! Plans first ([`plan`]: backup, WAL continuity across timelines, reachability of the target),
//! refusing with the reason and the [recoverable window](crate::backup::window) before anything
//! is written; then, after backup-fetch, the recovery configuration ([`settings`]) and,
//! optionally, starting PostgreSQL and following recovery to the target ([`start`]). Targets and
//! their time formats are in [`target`]. Used by `cmd/recover.rs`.

pub(crate) mod plan;
pub(crate) mod settings;
pub(crate) mod start;
pub(crate) mod target;

use std::path::{Path, PathBuf};

use crate::backup::window::WindowError;
use crate::backup::BackupError;
use crate::pg::PgError;
use crate::repo::RepoError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RecoverError {
    #[error("refusing to recover: {reason}; recoverable window: {window}")]
    Refused { reason: String, window: String },
    #[error(
        "{0} is not empty: recover restores only into an empty or absent directory, and \
         nothing was written to it"
    )]
    NotEmpty(PathBuf),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
    #[error(
        "recovery ended before configured recovery target was reached: the archive does not \
         hold WAL up to the target; server log {log}:\n{tail}",
        log = .log.display()
    )]
    EndedEarly { log: PathBuf, tail: String },
}

/// Refuses a target directory that exists and holds anything, before planning starts, so a
/// mistyped path never gets a backup restored over it.
pub(crate) fn check_target_dir(dir: &Path) -> Result<(), RecoverError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(RecoverError::NotEmpty(dir.to_path_buf())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecoverError::Io {
            what: "read",
            path: dir.to_path_buf(),
            source,
        }),
    }
}
