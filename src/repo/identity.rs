//! Repository identity: which PostgreSQL cluster a repository belongs to.
//!
//! One repository holds one cluster. The first WAL segment pushed records the cluster's system
//! identifier, major version and WAL segment size in the `repository` object; from then on WAL
//! whose page headers say otherwise is refused, so two clusters can never interleave their WAL
//! in one archive. It also records whether the repository is encrypted (`repo::crypt`), and stays
//! plain itself so that writers holding only public keys can read it. Used by wal-push,
//! backup-push and wal-receive.

use serde::{Deserialize, Serialize};
use walvault_wal::page::LongPageHeader;
use walvault_wal::WalSegmentSize;

use crate::repo::crypt::EncryptionRecord;
use crate::repo::layout;
use crate::repo::store::Committed;
use crate::repo::{RepoError, Repository};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) system_identifier: u64,
    pub(crate) pg_major: u32,
    pub(crate) wal_segment_size: u32,
    pub(crate) created_at: String,
}

/// The identity object as stored: the identity, and the mark of an encrypted repository.
#[derive(Serialize)]
struct Record<'a> {
    #[serde(flatten)]
    identity: &'a Identity,
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption: Option<EncryptionRecord>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("the identity object in {repo} is not valid identity JSON: {reason}")]
    Malformed { repo: String, reason: String },
    #[error(
        "{what} belongs to a different cluster: it has system identifier {found_sysid} \
         (PostgreSQL {found_major}, {found_seg} byte segments), but repository {repo} holds \
         cluster {repo_sysid} (PostgreSQL {repo_major}, {repo_seg} byte segments); use a separate \
         repository per cluster"
    )]
    Mismatch {
        what: String,
        repo: String,
        found_sysid: u64,
        found_major: u32,
        found_seg: u32,
        repo_sysid: u64,
        repo_major: u32,
        repo_seg: u32,
    },
}

impl Identity {
    /// The identity a WAL segment's long page header describes.
    pub(crate) fn from_header(header: &LongPageHeader) -> Identity {
        Identity {
            system_identifier: header.system_identifier,
            pg_major: header.std.major.number(),
            wal_segment_size: header.seg_size.bytes(),
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }

    /// The segment size the identity records; `None` when the object holds an impossible one.
    pub(crate) fn segment_size(&self) -> Option<WalSegmentSize> {
        WalSegmentSize::new(u64::from(self.wal_segment_size)).ok()
    }
}

/// Refuses `found` (described as `what`) unless it is the cluster `recorded` names.
pub(crate) fn check(
    recorded: &Identity,
    found: &Identity,
    what: &str,
    repo: &str,
) -> Result<(), IdentityError> {
    let same = recorded.system_identifier == found.system_identifier
        && recorded.pg_major == found.pg_major
        && recorded.wal_segment_size == found.wal_segment_size;
    if same {
        return Ok(());
    }
    Err(IdentityError::Mismatch {
        what: what.to_owned(),
        repo: repo.to_owned(),
        found_sysid: found.system_identifier,
        found_major: found.pg_major,
        found_seg: found.wal_segment_size,
        repo_sysid: recorded.system_identifier,
        repo_major: recorded.pg_major,
        repo_seg: recorded.wal_segment_size,
    })
}

/// Largest identity object read: walvault writes about 100 bytes of JSON, and the object's
/// header is repository content, so it must not size an allocation.
const MAX_IDENTITY_BYTES: u64 = 64 * 1024;

/// The recorded identity, if any.
pub(crate) async fn load(repo: &Repository) -> Result<Option<Identity>, IdentityError> {
    let key = layout::identity();
    let rule = crate::repo::LengthRule::AtMost(MAX_IDENTITY_BYTES);
    let Some(bytes) = repo.get_bytes_checked(&key, rule).await? else {
        return Ok(None);
    };
    repo.note_identity(&bytes);
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| IdentityError::Malformed {
            repo: repo.url().to_owned(),
            reason: e.to_string(),
        })
}

/// Checks `found` (described as `what` in errors) against the repository, recording it first if
/// the repository has no identity yet. Concurrent first pushes are safe: only one record wins and
/// the others are checked against it.
pub(crate) async fn ensure(
    repo: &Repository,
    found: &Identity,
    what: &str,
) -> Result<Identity, IdentityError> {
    let recorded = match load(repo).await? {
        Some(id) => id,
        None => {
            let record = Record {
                identity: found,
                encryption: repo.encryption_record(),
            };
            let json =
                serde_json::to_vec_pretty(&record).map_err(|e| IdentityError::Malformed {
                    repo: repo.url().to_owned(),
                    reason: e.to_string(),
                })?;
            match repo.put_identity(&json).await? {
                Committed::Created => {
                    repo.note_identity(&json);
                    tracing::info!(
                        "repository {} now belongs to cluster {} (PostgreSQL {})",
                        repo.url(),
                        found.system_identifier,
                        found.pg_major
                    );
                    found.clone()
                }
                Committed::AlreadyExists => {
                    load(repo).await?.ok_or_else(|| IdentityError::Malformed {
                        repo: repo.url().to_owned(),
                        reason: "identity vanished while it was being read".into(),
                    })?
                }
            }
        }
    };
    check(&recorded, found, what, repo.url())?;
    Ok(recorded)
}
