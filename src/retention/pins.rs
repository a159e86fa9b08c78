//! Pins: a backup marked to be kept whatever the policy (`backup-mark --keep`,
//! `backup-push --keep`). A pin is a small object of its own, `backups/<name>/keep`, written
//! beside the manifest rather than into it, so the manifest stays write-once. Its presence is the
//! pin; its content (who pinned, when) is informational and read only through the codec.

use std::collections::BTreeSet;

use crate::backup::manifest::BackupName;
use crate::repo::layout::{Listing, ObjectKey};
use crate::repo::{PutMode, Repository};
use crate::time::UnixMicros;

use super::RetentionError;

/// The names of every pinned backup.
pub(crate) async fn pinned(repo: &Repository) -> Result<BTreeSet<BackupName>, RetentionError> {
    let mut pins = BTreeSet::new();
    repo.list_each(Listing::Backups, &mut |o| {
        if let Some(ObjectKey::Pin(name)) = ObjectKey::parse(&o.key) {
            pins.insert(name);
        }
    })
    .await?;
    Ok(pins)
}

/// Pins (`keep`) or releases a backup that exists.
pub(crate) async fn mark(
    repo: &Repository,
    name: &BackupName,
    keep: bool,
) -> Result<(), RetentionError> {
    if repo.head(&name.manifest_key()).await?.is_none() {
        return Err(RetentionError::NotFound(name.to_string()));
    }
    if keep {
        let note = serde_json::json!({ "pinned_at": UnixMicros::now().to_string() });
        repo.put_bytes(
            &name.pin_key(),
            note.to_string().as_bytes(),
            PutMode::OverwriteDerived,
        )
        .await?;
    } else {
        repo.delete(&name.pin_key()).await?;
    }
    Ok(())
}
