//! `reencrypt` at the CLI edge: rewrites, a few at a time, every object that is not encrypted to
//! the current recipients; one line per failure, then what was rewritten per former key; exit 1
//! when any object failed (it is left as it was).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::bail;

use crate::repo::layout::Listing;
use crate::repo::{Repository, Rewrite};

/// `reencrypt [--dry-run]`.
pub(super) async fn reencrypt(
    repo: Arc<Repository>,
    concurrency: usize,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    if repo.is_encrypted().await? != Some(true) {
        bail!(
            "{} is not an encrypted repository: reencrypt only moves objects between keys (an \
             encrypted repository starts empty: see the README, Encryption at rest)",
            repo.url()
        );
    }
    let objects = repo.list(Listing::Everything).await?;
    let (mut current, mut failed) = (0usize, 0usize);
    let mut moved: BTreeMap<String, usize> = BTreeMap::new();
    for batch in objects.chunks(concurrency.max(1)) {
        let mut tasks = tokio::task::JoinSet::new();
        for object in batch {
            let (repo, key) = (Arc::clone(&repo), object.key.clone());
            tasks.spawn(async move {
                let result = repo.reencrypt(&key, dry_run).await;
                (key, result)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(Some(Rewrite::Current)) | Ok(None))) => current += 1,
                Ok((_, Ok(Some(Rewrite::Rewritten(before))))) => {
                    let from = if before.is_empty() {
                        "unencrypted".to_owned()
                    } else {
                        let keys: Vec<String> = before.iter().map(|fp| fp.to_string()).collect();
                        format!("key {}", keys.join(", "))
                    };
                    *moved.entry(from).or_default() += 1;
                }
                Ok((key, Err(e))) => {
                    failed += 1;
                    println!("problem: {key}: {e}");
                }
                Err(e) => {
                    failed += 1;
                    println!("problem: reencrypt task failed: {e}");
                }
            }
        }
    }
    let verb = if dry_run { "would rewrite" } else { "rewrote" };
    for (from, n) in &moved {
        println!("reencrypt: {verb} {n} objects from {from}");
    }
    println!(
        "reencrypt: {verb} {} objects, {current} already current, {failed} failed",
        moved.values().sum::<usize>()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
