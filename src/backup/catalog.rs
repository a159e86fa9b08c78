//! The catalog of base backups in a repository: which backups exist, in which order, and what a
//! restore of one of them needs.
//!
//! A backup exists when its manifest does (`backups/<name>/manifest`); packs without one are the
//! leftovers of an interrupted push and are ignored. Backups are ordered by the start time and
//! start LSN recorded in their manifests, never by storage modification times. A delta resolves
//! to its chain (full first) by following recorded parents, each checked against the delta's
//! record of it. Used by backup-push (choosing a parent), backup-fetch, backup-list and verify.

use std::time::SystemTime;

use crate::backup::manifest::{BackupKind, BackupName, Manifest, Summary};
use crate::backup::BackupError;
use crate::repo::layout::{Listing, ObjectKey};
use crate::repo::Repository;

/// The complete backups, oldest first.
pub(crate) async fn list(repo: &Repository) -> Result<Vec<Summary>, BackupError> {
    let mut summaries = Vec::new();
    for object in repo.list(Listing::Backups).await? {
        let Some(ObjectKey::Manifest(name)) = ObjectKey::parse(&object.key) else {
            continue;
        };
        let Some(bytes) = repo.get_bytes(&object.key).await? else {
            continue; // deleted while listing
        };
        let summary = Summary::from_json(&object.key, &bytes)?;
        if summary.name != name {
            return Err(BackupError::invalid(
                format!("manifest {}", object.key),
                format!("records the name {}", summary.name),
            ));
        }
        summaries.push(summary);
    }
    summaries.sort_by_key(order_key);
    Ok(summaries)
}

fn order_key(s: &Summary) -> (SystemTime, walvault_wal::Lsn) {
    let time = humantime::parse_rfc3339(&s.start_time).unwrap_or(SystemTime::UNIX_EPOCH);
    (time, s.start_lsn)
}

/// One backup's whole manifest.
pub(crate) async fn manifest(
    repo: &Repository,
    name: &BackupName,
) -> Result<Manifest, BackupError> {
    let key = name.manifest_key();
    let bytes = repo
        .get_bytes(&key)
        .await?
        .ok_or_else(|| BackupError::NotFound(name.to_string()))?;
    let manifest = Manifest::from_json(&key, &bytes)?;
    if &manifest.summary.name != name {
        return Err(BackupError::invalid(
            format!("manifest {key}"),
            format!("records the name {}", manifest.summary.name),
        ));
    }
    Ok(manifest)
}

/// The name `LATEST` or a backup name, resolved against the catalog.
pub(crate) async fn resolve_name(
    repo: &Repository,
    wanted: &str,
) -> Result<BackupName, BackupError> {
    if wanted == "LATEST" {
        return list(repo)
            .await?
            .pop()
            .map(|s| s.name)
            .ok_or_else(|| BackupError::NotFound("LATEST (the repository has no backups)".into()));
    }
    Ok(BackupName::parse(wanted)?)
}

/// The chain that restores `name`: its full backup first, `name` last. Each parent must be the
/// backup the child recorded (same start LSN), and the chain must end at a full backup.
pub(crate) async fn chain(
    repo: &Repository,
    name: &BackupName,
) -> Result<Vec<Manifest>, BackupError> {
    let mut chain = vec![manifest(repo, name).await?];
    loop {
        let child = &chain[chain.len() - 1].summary;
        match (child.kind, &child.parent) {
            (BackupKind::Full, _) => break,
            (BackupKind::Delta, None) => {
                return Err(BackupError::invalid(
                    format!("backup {}", child.name),
                    "a delta without a parent",
                ))
            }
            (BackupKind::Delta, Some(parent)) => {
                let what = format!("backup {} (delta of {parent})", child.name);
                let expected = child.delta_base_lsn;
                let parent = manifest(repo, parent).await.map_err(|e| match e {
                    BackupError::NotFound(p) => {
                        BackupError::invalid(what.clone(), format!("its parent {p} is missing"))
                    }
                    other => other,
                })?;
                if Some(parent.summary.start_lsn) != expected || chain.len() > 1000 {
                    return Err(BackupError::invalid(
                        what,
                        "the parent's start LSN is not the one the delta was taken against",
                    ));
                }
                chain.push(parent);
            }
        }
    }
    chain.reverse();
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::tests::sample;

    /// Names are only labels: a backup whose name sorts first but that started later comes later.
    #[test]
    fn backups_order_by_recorded_start() {
        let mut backups = [
            sample("base_a", "2026-01-02T00:00:00Z").summary,
            sample("base_b", "2026-01-01T00:00:00Z").summary,
        ];
        backups.sort_by_key(order_key);
        let names: Vec<&str> = backups.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["base_b", "base_a"]);
    }
}
