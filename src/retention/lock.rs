//! The retention lock: one `delete` at a time per repository.
//!
//! The lock is the object `locks/retention`, created only if absent (S3: `If-None-Match: *`;
//! local: a hard link, which the kernel refuses over an existing name), holding the holder's
//! host, process id, start time and a random token. A lock that is there already is read
//! first and refused unless stale, so a server that ignores `If-None-Match` (Garage) does not
//! let a second `delete` overwrite a held lock; after creating it the holder reads it back and
//! proceeds only if the token is its own, so of two racing creators only the last goes on. A
//! lock is stale, and taken over with a warning, when its process
//! is gone on this same host, or when it is older than [`STALE_AFTER`] (a holder on another host
//! that died). Deleting it releases it. Used by `delete` and auto retention after `backup-push`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::repo::layout::ObjectKey;
use crate::repo::{LengthRule, PutMode, Repository};
use crate::time::UnixMicros;

use super::RetentionError;

/// How old a lock held from another host must be before it is taken over.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(6 * 3600);

/// The lock's content.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    since_us: i64,
    token: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "held by process {} on {} since {}",
            self.pid,
            self.host,
            UnixMicros(self.since_us)
        )
    }
}

/// A held lock; [`Held::release`] gives it back.
pub(crate) struct Held {
    token: String,
}

fn key() -> String {
    ObjectKey::RetentionLock.key()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}

/// A token no other holder has: time, process and a counter.
fn token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        UnixMicros::now().0,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Takes the lock, or says who holds it.
pub(crate) async fn acquire(repo: &Repository) -> Result<Held, RetentionError> {
    let me = Holder {
        host: hostname(),
        pid: std::process::id(),
        since_us: UnixMicros::now().0,
        token: token(),
    };
    let json = serde_json::to_vec(&me).unwrap_or_default();
    // A second round only after a stale lock was removed.
    for _ in 0..2 {
        if let Some(holder) = read(repo).await? {
            if !stale(&holder, &me) {
                return Err(locked(&holder));
            }
            tracing::warn!("taking over the stale retention lock ({holder})");
            repo.delete(&key()).await?;
        }
        // Whether this call created the object or not, what is stored now decides.
        repo.put_bytes(&key(), &json, PutMode::IfAbsent).await?;
        let Some(holder) = read(repo).await? else {
            continue; // released between our attempt and the read: try again
        };
        if holder.token == me.token {
            return Ok(Held { token: me.token });
        }
        if !stale(&holder, &me) {
            return Err(locked(&holder));
        }
        tracing::warn!("taking over the stale retention lock ({holder})");
        repo.delete(&key()).await?;
    }
    Err(RetentionError::Locked {
        holder: "taken again by another delete while a stale lock was replaced".into(),
        stale_after: humantime::format_duration(STALE_AFTER).to_string(),
    })
}

fn locked(holder: &Holder) -> RetentionError {
    RetentionError::Locked {
        holder: holder.to_string(),
        stale_after: humantime::format_duration(STALE_AFTER).to_string(),
    }
}

async fn read(repo: &Repository) -> Result<Option<Holder>, RetentionError> {
    let Some(bytes) = repo
        .get_bytes_checked(&key(), LengthRule::AtMost(4096))
        .await?
    else {
        return Ok(None);
    };
    // A lock that does not parse was not written by walvault: treat it as held by someone.
    Ok(Some(serde_json::from_slice(&bytes).unwrap_or(Holder {
        host: "an unknown host (unreadable lock object locks/retention)".into(),
        pid: 0,
        since_us: 0,
        token: String::new(),
    })))
}

fn stale(holder: &Holder, me: &Holder) -> bool {
    let gone_here = holder.host == me.host
        && holder.pid != 0
        && !std::path::Path::new(&format!("/proc/{}", holder.pid)).exists();
    let age = u64::try_from(me.since_us.saturating_sub(holder.since_us)).unwrap_or(0);
    gone_here || (holder.since_us > 0 && Duration::from_micros(age) > STALE_AFTER)
}

impl Held {
    /// Removes the lock if it is still ours.
    pub(crate) async fn release(self, repo: &Repository) {
        match read(repo).await {
            Ok(Some(h)) if h.token == self.token => {
                if let Err(e) = repo.delete(&key()).await {
                    tracing::warn!("could not release the retention lock: {e}");
                }
            }
            Ok(_) => tracing::warn!("the retention lock was taken over while this delete ran"),
            Err(e) => tracing::warn!("could not read the retention lock to release it: {e}"),
        }
    }
}
