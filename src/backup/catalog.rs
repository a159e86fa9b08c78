//! The catalog of base backups in a repository: which backups exist, in which order, and what a
//! restore of one of them needs.
//!
//! A backup exists when its manifest does (`backups/<name>/manifest`); packs without one are the
//! leftovers of an interrupted push and are ignored. Backups are ordered by the start time and
//! start LSN recorded in their manifests, never by storage modification times. A delta resolves
//! to its chain (full first) by following recorded parents, each checked against the delta's
//! record of it; a chain that loops is refused. A manifest that cannot be read is skipped with a
//! warning by listings (`verify` reports it), and a whole manifest is validated when it is read.
//! Used by backup-push (choosing a parent), backup-fetch, backup-list and verify.

use std::collections::HashSet;
use std::time::SystemTime;

use crate::backup::manifest::{BackupKind, BackupName, Manifest, Summary};
use crate::backup::BackupError;
use crate::repo::layout::Listing;
use crate::repo::{LengthRule, RepoError, Repository};

/// The largest manifest read. Manifests are read whole, at roughly 200 bytes per file piece, so
/// this admits clusters of about a million files while a forged object declaring more is
/// refused before a byte of it is held.
const MANIFEST_RULE: LengthRule = LengthRule::AtMost(256 << 20);

/// The complete backups, oldest first. A manifest that cannot be read is reported (a warning
/// naming its object) and skipped, so one damaged backup does not hide the others.
pub(crate) async fn list(repo: &Repository) -> Result<Vec<Summary>, BackupError> {
    let (summaries, unreadable) = scan(repo).await?;
    for problem in unreadable {
        tracing::warn!("skipping a backup: {problem}");
    }
    Ok(summaries)
}

/// The complete backups, oldest first, and a message for each manifest that could not be read
/// (which `verify` reports as a problem). Only a failure to reach the store fails the scan.
pub(crate) async fn scan(repo: &Repository) -> Result<(Vec<Summary>, Vec<String>), BackupError> {
    let mut summaries = Vec::new();
    let mut unreadable = Vec::new();
    // Only the backups' names are listed, not their packs: a full backup has hundreds.
    for dir in repo.children(Listing::Backups).await? {
        let Ok(name) = BackupName::parse(&dir) else {
            continue;
        };
        let key = name.manifest_key();
        let bytes = match repo.get_bytes_checked(&key, MANIFEST_RULE).await {
            Ok(Some(bytes)) => bytes,
            // An interrupted push (packs, no manifest), or a backup deleted while listing.
            Ok(None) => continue,
            Err(e @ (RepoError::Codec(_) | RepoError::Length { .. })) => {
                unreadable.push(e.to_string());
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match read_summary(&key, &name, &bytes) {
            Ok(summary) => summaries.push(summary),
            Err(e) => unreadable.push(e.to_string()),
        }
    }
    summaries.sort_by_key(order_key);
    Ok((summaries, unreadable))
}

fn read_summary(key: &str, name: &BackupName, bytes: &[u8]) -> Result<Summary, BackupError> {
    let summary = Summary::from_json(key, bytes)?;
    if &summary.name != name {
        return Err(BackupError::invalid(
            format!("manifest {key}"),
            format!("records the name {}", summary.name),
        ));
    }
    Ok(summary)
}

fn order_key(s: &Summary) -> (SystemTime, walvault_wal::Lsn) {
    let time = humantime::parse_rfc3339(&s.start_time).unwrap_or(SystemTime::UNIX_EPOCH);
    (time, s.start_lsn)
}

/// One backup's whole manifest, validated ([`Manifest::validate`]).
pub(crate) async fn manifest(
    repo: &Repository,
    name: &BackupName,
) -> Result<Manifest, BackupError> {
    let key = name.manifest_key();
    let bytes = repo
        .get_bytes_checked(&key, MANIFEST_RULE)
        .await?
        .ok_or_else(|| BackupError::NotFound(name.to_string()))?;
    let manifest = Manifest::from_json(&key, &bytes)?;
    if &manifest.summary.name != name {
        return Err(BackupError::invalid(
            format!("manifest {key}"),
            format!("records the name {}", manifest.summary.name),
        ));
    }
    manifest.validate()?;
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
/// backup the child recorded (same start LSN), the chain must end at a full backup, and no
/// backup may appear in it twice.
pub(crate) async fn chain(
    repo: &Repository,
    name: &BackupName,
) -> Result<Vec<Manifest>, BackupError> {
    let mut chain = vec![manifest(repo, name).await?];
    let mut seen = HashSet::from([name.clone()]);
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
                if !seen.insert(parent.clone()) {
                    return Err(BackupError::invalid(
                        format!("backup {name}"),
                        format!("delta chain of {name} loops back to {parent}"),
                    ));
                }
                let what = format!("backup {} (delta of {parent})", child.name);
                let expected = child.delta_base_lsn;
                let parent = manifest(repo, parent).await.map_err(|e| match e {
                    BackupError::NotFound(p) => {
                        BackupError::invalid(what.clone(), format!("its parent {p} is missing"))
                    }
                    other => other,
                })?;
                if Some(parent.summary.start_lsn) != expected {
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
    use crate::repo::layout::PackId;
    use crate::repo::PutMode;

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

    async fn put(repo: &Repository, m: &Manifest) {
        let json = m.to_json().unwrap();
        repo.put_bytes(&m.summary.name.manifest_key(), &json, PutMode::IfAbsent)
            .await
            .unwrap();
    }

    fn delta_of(name: &str, parent: &Manifest) -> Manifest {
        let mut m = sample(name, "2026-01-02T00:00:00Z");
        m.summary.kind = BackupKind::Delta;
        m.summary.parent = Some(parent.summary.name.clone());
        m.summary.delta_base_lsn = Some(parent.summary.start_lsn);
        m
    }

    /// Two deltas naming each other: the cycle is named at once, not after 1000 reads.
    #[tokio::test]
    async fn a_delta_cycle_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::repo::local_for_tests(dir.path()).await;
        let mut a = sample("base_a", "2026-01-01T00:00:00Z");
        let b = delta_of("base_b", &a);
        a = delta_of("base_a", &b);
        put(&repo, &a).await;
        put(&repo, &b).await;
        let err = chain(&repo, &a.summary.name).await.unwrap_err().to_string();
        assert!(
            err.contains("delta chain of base_a loops back to base_a"),
            "{err}"
        );
    }

    /// The catalog lists backups by their directories and keeps those with a manifest: not an
    /// interrupted push's packs, a stray file, or a directory no backup could be named.
    #[tokio::test]
    async fn only_backups_with_a_manifest_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::repo::local_for_tests(dir.path()).await;
        put(&repo, &sample("base_a", "2026-01-01T00:00:00Z")).await;
        put(&repo, &sample("base_b", "2026-01-02T00:00:00Z")).await;
        // An interrupted push: packs, no manifest.
        let torn = BackupName::parse("base_c").unwrap();
        repo.put_bytes(&torn.pack_key(PackId(0)), b"pack", PutMode::IfAbsent)
            .await
            .unwrap();
        // What is not a backup's directory: a stray file, a name no backup can have.
        std::fs::write(dir.path().join("backups/stray"), b"x").unwrap();
        std::fs::create_dir_all(dir.path().join("backups/not a backup")).unwrap();

        let names: Vec<String> = list(&repo)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.name.to_string())
            .collect();
        assert_eq!(names, ["base_a", "base_b"]);
    }

    /// A damaged manifest (bad framing, bad JSON) is skipped by the listing and LATEST, and
    /// reported by the scan verify uses.
    #[tokio::test]
    async fn unreadable_manifests_are_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::repo::local_for_tests(dir.path()).await;
        let good = sample("base_a", "2026-01-01T00:00:00Z");
        put(&repo, &good).await;
        let later = BackupName::parse("base_later").unwrap();
        repo.put_bytes(&later.manifest_key(), b"{not json", PutMode::IfAbsent)
            .await
            .unwrap();
        let framing = BackupName::parse("base_z").unwrap();
        let key = framing.manifest_key();
        repo.put_bytes(&key, b"{}", PutMode::IfAbsent)
            .await
            .unwrap();
        let path = dir.path().join(&key);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();

        let listed = list(&repo).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            resolve_name(&repo, "LATEST").await.unwrap().as_str(),
            "base_a"
        );
        let (_, unreadable) = scan(&repo).await.unwrap();
        assert_eq!(unreadable.len(), 2, "{unreadable:?}");
        assert!(unreadable.iter().any(|p| p.contains(&later.manifest_key())));
        assert!(unreadable.iter().any(|p| p.contains(&key)));
    }
}
