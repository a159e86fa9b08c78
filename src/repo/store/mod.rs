//! The repository store: named byte objects in a local directory or an S3 bucket.
//!
//! This layer knows nothing of WAL or of the object format; it moves bytes under keys such as
//! `wal/000000010000000000000003` and promises three things callers build on:
//! - a committed object appears whole or not at all (an interrupted upload is never visible);
//! - [`PutMode::IfAbsent`] never replaces an existing object;
//! - "not found" is reported only for a missing object in a reachable repository: a missing
//!   directory or bucket, a timeout or a refused credential is an error.
//!
//! Used by [`crate::repo`], which adds the object codec on top.

mod local;
#[cfg(test)]
mod powerloss;
mod resume;
mod s3;

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::SystemTime;

use bytes::Bytes;
use tokio::io::AsyncRead;

use crate::config::{RepoUrl, Settings};

/// A stream of an object's stored bytes.
pub(crate) type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ObjectInfo {
    /// The key, relative to the repository root.
    pub(crate) key: String,
    /// Stored size in bytes.
    pub(crate) size: u64,
}

/// One object met by a streamed listing ([`Store::list_each`]).
#[derive(Clone, Debug)]
pub(crate) struct Listed {
    pub(crate) key: String,
    pub(crate) size: u64,
    /// When it was stored (local: modification time; S3: `LastModified`), if known.
    pub(crate) modified: Option<SystemTime>,
}

/// What an interrupted writer left behind that no listing shows: a local temp file or an S3
/// multipart upload never completed.
#[derive(Clone, Debug)]
pub(crate) enum Leftover {
    TempFile(PathBuf),
    Upload { key: String, id: String },
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leftover::TempFile(path) => write!(f, "temp file {}", path.display()),
            Leftover::Upload { key, id } => write!(f, "multipart upload {id} of {key}"),
        }
    }
}

/// The most keys one batch delete sends (S3's `DeleteObjects` limit).
pub(crate) const DELETE_BATCH: usize = 1000;

/// What a commit may do when the key already exists, and how durable it must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PutMode {
    IfAbsent,
    /// Overwrite an object derived from others that readers can do without (a WAL segment's
    /// summary). A local store does not fsync it, so after a crash of the machine it may be
    /// missing, empty or torn: readers must treat it as optional and check it (the codec does).
    /// S3 treats it as a plain PUT, every PUT being durable there.
    OverwriteDerived,
    /// Durably replace an object with one of the same content (`walvault reencrypt`): readers
    /// see the old object or the new one, both whole.
    Replace,
}

/// How a commit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Committed {
    Created,
    /// `IfAbsent` found the key taken; nothing was written.
    AlreadyExists,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("repository directory {0} does not exist (create it, or fix the repository URL)")]
    MissingRoot(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 {op} s3://{bucket}/{key}: {message}")]
    S3 {
        op: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
    #[error("invalid object key {0:?}")]
    BadKey(String),
}

/// A repository's storage backend.
pub(crate) enum Store {
    Local(local::LocalStore),
    S3(s3::S3Store),
}

impl Store {
    pub(crate) async fn open(settings: &Settings) -> Result<Store, StoreError> {
        Ok(match &settings.repo {
            RepoUrl::Local(root) => Store::Local(local::LocalStore::new(root.clone())),
            RepoUrl::S3 { bucket, prefix } => {
                Store::S3(s3::S3Store::new(&settings.s3, bucket.clone(), prefix.clone()).await)
            }
        })
    }

    /// The object's bytes, or `None` when the repository is reachable and the key absent.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<ObjectReader>, StoreError> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.get(key).await,
            Store::S3(s) => s.get(key).await,
        }
    }

    /// The stored size, or `None` when absent.
    pub(crate) async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.head(key).await,
            Store::S3(s) => s.head(key).await,
        }
    }

    /// Every object whose key starts with `prefix`, sorted by key. Temporary files of
    /// unfinished local uploads are never listed.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut objects = Vec::new();
        self.list_each(prefix, &mut |o| {
            objects.push(ObjectInfo {
                key: o.key,
                size: o.size,
            })
        })
        .await?;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    /// Starts a new object; nothing is visible until [`ObjectWriter::commit`].
    pub(crate) fn writer(&self, key: &str) -> Result<ObjectWriter, StoreError> {
        check_key(key)?;
        Ok(ObjectWriter {
            key: key.to_owned(),
            inner: match self {
                Store::Local(s) => WriterInner::Local(s.writer(key)),
                Store::S3(s) => WriterInner::S3(s.writer(key)),
            },
        })
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.delete(key).await,
            Store::S3(s) => s.delete(key).await,
        }
    }

    /// Hands every object whose key starts with `prefix` to `each` as the listing goes (one
    /// page at a time on S3), in no particular order, so a caller holds only what it keeps.
    pub(crate) async fn list_each(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Listed) + Send),
    ) -> Result<(), StoreError> {
        match self {
            Store::Local(s) => s.list_each(prefix, each).await,
            Store::S3(s) => s.list_each(prefix, each).await,
        }
    }

    /// The names one level below `prefix` (which ends in `/`) that have objects under them,
    /// sorted: the backups under `backups/` without listing every pack of every backup. One
    /// directory read on a local store, a delimited listing on S3.
    pub(crate) async fn children(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        check_key(prefix.trim_end_matches('/'))?;
        let mut names = match self {
            Store::Local(s) => s.children(prefix).await?,
            Store::S3(s) => s.children(prefix).await?,
        };
        names.sort();
        Ok(names)
    }

    /// Deletes up to [`DELETE_BATCH`] keys at a time (one `DeleteObjects` request each on S3);
    /// absent keys are not an error, and any key the store refused fails the call, naming it.
    pub(crate) async fn delete_batch(&self, keys: &[String]) -> Result<(), StoreError> {
        for key in keys {
            check_key(key)?;
        }
        match self {
            Store::Local(s) => {
                for chunk in keys.chunks(DELETE_BATCH) {
                    s.delete_batch(chunk).await?;
                }
                Ok(())
            }
            Store::S3(s) => {
                for chunk in keys.chunks(DELETE_BATCH) {
                    s.delete_batch(chunk).await?;
                }
                Ok(())
            }
        }
    }

    /// What interrupted writers left that is older than `before`: local temp files of writers no
    /// longer running, S3 multipart uploads started before it.
    pub(crate) async fn leftovers(&self, before: SystemTime) -> Result<Vec<Leftover>, StoreError> {
        match self {
            Store::Local(s) => s.leftovers(before).await,
            Store::S3(s) => s.leftovers(before).await,
        }
    }

    pub(crate) async fn remove_leftover(&self, leftover: &Leftover) -> Result<(), StoreError> {
        match (self, leftover) {
            (Store::Local(s), Leftover::TempFile(path)) => s.remove_temp(path).await,
            (Store::S3(s), Leftover::Upload { key, id }) => s.abort_upload(key, id).await,
            _ => Ok(()),
        }
    }
}

/// An object being written.
pub(crate) struct ObjectWriter {
    key: String,
    inner: WriterInner,
}

enum WriterInner {
    Local(local::LocalWriter),
    S3(s3::S3Writer),
}

impl ObjectWriter {
    pub(crate) async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        match &mut self.inner {
            WriterInner::Local(w) => w.write(&chunk).await,
            WriterInner::S3(w) => w.write(chunk).await,
        }
    }

    /// Makes the object durable and visible under its key, all at once.
    pub(crate) async fn commit(self, mode: PutMode) -> Result<Committed, StoreError> {
        crate::failpoint::pause_if_enabled("store-before-commit").await;
        tracing::debug!(key = %self.key, ?mode, "committing object");
        let committed = match self.inner {
            WriterInner::Local(w) => w.commit(mode).await,
            WriterInner::S3(w) => w.commit(mode).await,
        };
        crate::failpoint::pause_if_enabled("store-committed").await;
        committed
    }
}

/// Keys are relative, `/`-separated, and never name a parent, a hidden file or an empty part;
/// this keeps local temp files (dot-files) out of the key space.
fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key
            .split('/')
            .all(|part| !part.is_empty() && !part.starts_with('.') && part != "..");
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::check_key;

    #[test]
    fn keys_are_checked() {
        for good in ["object", "dir/000000010000000000000001", "a/b/c.partial"] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in ["", "/abs", "a//b", "../x", "dir/.tmp", "a/", "dir/../x"] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }
}
