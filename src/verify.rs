//! `verify`: re-reads the repository and reports every object that does not check out.
//!
//! Each object is read to its end through the codec, so its framing, length and content checksum
//! are all checked, exactly as a restore would check them. Objects are read a few at a time, and
//! one object's problem never stops the others from being checked. Then every backup's manifest
//! is checked against the objects that read back whole (`backup::consistency`). Used by the CLI
//! and by cron.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::repo::layout::{Listing, ObjectKey};
use crate::repo::{Fingerprint, RepoError, Repository};

/// What a verify pass found.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) checked: usize,
    pub(crate) wal_files: usize,
    pub(crate) content_bytes: u64,
    pub(crate) problems: Vec<String>,
    /// The repository holds no object at all: nothing was archived yet, or the URL is wrong.
    pub(crate) empty: bool,
    /// How many objects each key fingerprint opens: an identity may be destroyed only once no
    /// object needs it (an object encrypted to several keys counts for each).
    pub(crate) keys: BTreeMap<Fingerprint, usize>,
    /// Objects stored unencrypted, the identity object aside.
    pub(crate) plain: usize,
}

/// Verifies every object in the repository, `concurrency` at a time.
pub(crate) async fn verify_all(
    repo: Arc<Repository>,
    concurrency: usize,
) -> Result<Report, RepoError> {
    let objects = repo.list(Listing::Everything).await?;
    let mut report = Report::default();
    let mut contents = HashMap::new();
    report.empty = objects.is_empty();
    if !report.empty
        && !objects
            .iter()
            .any(|o| ObjectKey::parse(&o.key) == Some(ObjectKey::Identity))
    {
        report.problems.push(format!(
            "{}: no repository identity object (nothing was ever archived here?)",
            repo.url()
        ));
    }
    let encrypted = repo.is_encrypted().await.unwrap_or(None) == Some(true);
    for batch in objects.chunks(concurrency.max(1)) {
        let mut tasks = tokio::task::JoinSet::new();
        for object in batch {
            let (repo, key) = (Arc::clone(&repo), object.key.clone());
            tasks.spawn(async move {
                let result = repo.verify(&key).await;
                (key, result)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (key, result) = match joined {
                Ok(done) => done,
                Err(e) => {
                    report.problems.push(format!("verify task failed: {e}"));
                    continue;
                }
            };
            report.checked += 1;
            match result {
                Ok(Some(verified)) => {
                    let len = verified.content_len;
                    report.content_bytes += len;
                    match &verified.keys {
                        Some(keys) => keys
                            .iter()
                            .for_each(|fp| *report.keys.entry(*fp).or_default() += 1),
                        None if ObjectKey::parse(&key) == Some(ObjectKey::Identity) => {}
                        None => {
                            report.plain += 1;
                            if encrypted {
                                report.problems.push(format!(
                                    "object {key}: not encrypted, in an encrypted repository"
                                ));
                            }
                        }
                    }
                    contents.insert(key.clone(), len);
                    report.wal_files +=
                        usize::from(matches!(ObjectKey::parse(&key), Some(ObjectKey::Wal(_))));
                }
                Ok(None) => report
                    .problems
                    .push(format!("object {key}: listed but vanished while verifying")),
                Err(e) => report.problems.push(e.to_string()),
            }
        }
    }
    // Backups: every manifest's pieces, chains and WAL, against what read back whole.
    report
        .problems
        .extend(crate::backup::consistency::check(&repo, &contents).await);
    report.problems.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh repository is reported as empty, not as a repository with a missing object.
    #[tokio::test]
    async fn an_empty_repository_is_called_empty() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Arc::new(crate::repo::local_for_tests(dir.path()).await);
        let report = verify_all(repo, 4).await.unwrap();
        assert!(report.empty);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
}
