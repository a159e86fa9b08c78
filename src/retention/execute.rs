//! Carrying out a retention plan, in an order a crash at any point leaves harmless.
//!
//! Expired backups go newest first (a delta before its parent), each manifest before its packs,
//! so a backup disappears from every reader's view at once and a crash leaves only packs no
//! manifest names (garbage for the next run). WAL goes oldest segment first, in batches, so a
//! crash never leaves a hole in the middle of what remains. Then garbage and leftovers. Named
//! failpoints between the steps let tests kill a delete at each of them.

use indicatif::ProgressBar;

use super::plan::{Doomed, Plan};
use super::RetentionError;
use crate::failpoint::pause_if_enabled;
use crate::repo::layout::ObjectKey;
use crate::repo::{Repository, DELETE_BATCH};

/// What a delete removed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Deleted {
    pub(crate) backups: usize,
    pub(crate) objects: u64,
    pub(crate) bytes: u64,
}

/// Deletes what `plan` names; the caller holds the retention lock.
pub(crate) async fn execute(
    repo: &Repository,
    plan: &Plan,
    bar: &ProgressBar,
) -> Result<Deleted, RetentionError> {
    let mut done = Deleted::default();
    pause_if_enabled("delete-before-backups").await;
    for backup in &plan.doomed_backups {
        repo.delete(&backup.name.manifest_key()).await?;
        tracing::debug!("deleted the manifest of backup {}", backup.name);
        pause_if_enabled("delete-after-manifest").await;
        let mut keys: Vec<String> = backup.contents.iter().map(ObjectKey::key).collect();
        if backup.pinned {
            keys.push(backup.name.pin_key());
        }
        for chunk in keys.chunks(DELETE_BATCH) {
            repo.delete_batch(chunk).await?;
        }
        done.backups += 1;
        done.objects += 1 + keys.len() as u64;
        done.bytes += backup.bytes;
        bar.inc(1 + keys.len() as u64);
    }
    pause_if_enabled("delete-before-wal").await;
    delete_in_batches(repo, &plan.doomed_wal, bar, &mut done).await?;
    pause_if_enabled("delete-before-garbage").await;
    delete_in_batches(repo, &plan.garbage, bar, &mut done).await?;
    for leftover in &plan.leftovers {
        repo.remove_leftover(leftover).await?;
        tracing::info!("removed {leftover}, left by an interrupted write");
        done.objects += 1;
        bar.inc(1);
    }
    Ok(done)
}

/// Deletes `doomed` in order, a batch at a time.
async fn delete_in_batches(
    repo: &Repository,
    doomed: &[Doomed],
    bar: &ProgressBar,
    done: &mut Deleted,
) -> Result<(), RetentionError> {
    for batch in doomed.chunks(DELETE_BATCH) {
        let keys: Vec<String> = batch.iter().map(|d| ObjectKey::key(&d.key)).collect();
        repo.delete_batch(&keys).await?;
        done.objects += keys.len() as u64;
        done.bytes += batch.iter().map(|d| d.size).sum::<u64>();
        bar.inc(keys.len() as u64);
        pause_if_enabled("delete-wal-batch").await;
    }
    Ok(())
}
