//! Retention: deleting what no longer serves recovery, never what still does.
//!
//! [`policy`] decides which backups the rules keep; [`plan`] turns that into objects to delete
//! and proves, with the recoverable window's own timeline logic, that every kept backup stays
//! restorable and every instant of the kept window recoverable; [`execute`] deletes in an order
//! a crash cannot make harmful, under the repository's [`lock`]. [`pins`] are the per-backup
//! keep marks. Used by `delete`, `backup-mark`, `backup-push` (auto retention) and backup-list.

pub(crate) mod execute;
pub(crate) mod lock;
pub(crate) mod pins;
pub(crate) mod plan;
pub(crate) mod policy;

use std::collections::{BTreeMap, BTreeSet};

use crate::backup::manifest::BackupName;
use crate::backup::window::{Recoverable, WindowError};
use crate::backup::BackupError;
use crate::repo::RepoError;
use crate::time::UnixMicros;

pub(crate) use plan::{plan, Plan};
pub(crate) use policy::Policy;

/// Each backup's verdict under `policy`, by name, as the listings show it (`backup-list`,
/// `status`): the rules that keep it, empty when `delete` would expire it.
pub(crate) fn verdicts_by_name(
    policy: &Policy,
    recoverable: &Recoverable,
    pins: &BTreeSet<BackupName>,
    now: UnixMicros,
) -> BTreeMap<BackupName, BTreeSet<policy::Rule>> {
    let verdicts = policy::verdicts(
        policy,
        &recoverable.backups,
        pins,
        |b| recoverable.usable(b),
        now,
    );
    recoverable
        .backups
        .iter()
        .map(|b| b.name.clone())
        .zip(verdicts.kept_by)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RetentionError {
    #[error(
        "no retention policy: set [retention] in the config file (full, window, daily, weekly, \
         monthly, yearly) or pass --retain-full, --retain-window or --keep-*; nothing was deleted"
    )]
    NoPolicy,
    #[error("refusing to delete anything: {0}")]
    Refused(String),
    #[error(
        "another delete holds the repository's retention lock ({holder}); nothing was deleted. \
         If that process is gone, the lock is taken over once it is older than {stale_after} \
         (or from the same host as soon as its process has ended)"
    )]
    Locked { holder: String, stale_after: String },
    #[error("backup {0} not found in the repository (see backup-list)")]
    NotFound(String),
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}
