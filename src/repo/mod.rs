//! A walvault repository: the store seen through the object codec, the one layer that touches
//! either ([`layout`] names every key).
//!
//! Everything above this layer deals in content (files, byte buffers, checksums of content); this
//! layer frames it on the way in and verifies it on the way out, streaming one block at a time so
//! memory does not grow with object size. No content reaches a caller's destination file before
//! its checksum has been verified: files are written under a temporary name and renamed only
//! afterwards. Used by every command; the store and the codec are private to it.

mod codec;
#[cfg(test)]
mod codec_fuzz;
mod crypt;
pub(crate) mod identity;
pub(crate) mod layout;
pub(crate) mod packs;
mod reencrypt;
mod spare;
mod store;

pub(crate) use codec::{Checksum, Compression};
pub(crate) use crypt::{check_recipient, Fingerprint};
pub(crate) use reencrypt::Rewrite;
pub(crate) use store::{Committed, Leftover, Listed, PutMode, DELETE_BATCH};

use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::fs::{self, File};
use tokio::io::AsyncWriteExt;
use walvault_wal::WalFileName;

use crate::config::Settings;
use codec::{CodecError, Decoder, Encoder, MAX_BLOCK};
use crypt::{ClearContent, CryptError, Envelope, Keys, SealedWriter};
use layout::Listing;
use store::{ObjectInfo, ObjectReader, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Crypt(#[from] CryptError),
    #[error("{0}")]
    Refused(String),
    #[error("{op} {path}: {source}")]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {source}")]
    Encode {
        key: String,
        #[source]
        source: codec::LengthMismatch,
    },
    #[error("{what}: {problem}")]
    Changing { what: String, problem: &'static str },
    #[error(
        "{0} exists but could not be read back to compare it with what was to be stored \
         ({STORE_WAL_ATTEMPTS} attempts); nothing was stored"
    )]
    Vanishing(String),
    #[error("a repository task failed: {0}")]
    Task(String),
    #[error(
        "{name} is already archived in {repo} with different content (archived {stored}, local \
         file {local}); nothing was overwritten. Is another cluster archiving into this repository?"
    )]
    Conflict {
        name: String,
        repo: String,
        stored: Checksum,
        local: Checksum,
    },
    #[error(
        "{key} declares {declared} bytes of content where {rule} are expected; it was not read"
    )]
    Length {
        key: String,
        declared: u64,
        rule: LengthRule,
    },
    #[error("{path} changed size while it was being stored ({announced} bytes at the start, {read} read)")]
    FileChanged {
        path: PathBuf,
        announced: u64,
        read: u64,
    },
}

impl RepoError {
    /// The object is encrypted and no configured identity opens it.
    pub(crate) fn is_missing_key(&self) -> bool {
        matches!(
            self,
            RepoError::Crypt(CryptError::NoIdentity { .. } | CryptError::NoMatchingKey { .. })
        )
    }

    fn file<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RepoError + 'a {
        move |source| RepoError::File {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The content length a reader accepts from an object's header, checked before a byte of it is
/// written or kept: the header is repository content, so it is not trusted to size anything. The
/// decoder then refuses content beyond the declared length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LengthRule {
    Exactly(u64),
    AtMost(u64),
}

impl LengthRule {
    fn admits(self, len: u64) -> bool {
        match self {
            LengthRule::Exactly(n) => len == n,
            LengthRule::AtMost(n) => len <= n,
        }
    }
}

impl std::fmt::Display for LengthRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LengthRule::Exactly(n) => write!(f, "exactly {n} bytes"),
            LengthRule::AtMost(n) => write!(f, "at most {n} bytes"),
        }
    }
}

/// What storing a file did.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stored {
    pub(crate) committed: Committed,
    pub(crate) content_len: u64,
    pub(crate) stored_len: u64,
}

/// What a WAL file to store is read from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WalContent<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// How a WAL file ended up in the repository.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WalStored {
    /// Stored by this call.
    Created(Stored),
    /// Already archived with identical content.
    Identical,
}

/// Rounds of "absent, then present, then gone" [`Repository::store_wal`] goes through before
/// giving up: each means a delete raced the store, which retention only does to old WAL.
const STORE_WAL_ATTEMPTS: u32 = 3;

/// A stored object compared with a local file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Comparison {
    pub(crate) identical: bool,
    pub(crate) stored: Checksum,
    pub(crate) local: Checksum,
}

/// What reading an object to its end found.
#[derive(Clone, Debug)]
pub(crate) struct Verified {
    pub(crate) content_len: u64,
    pub(crate) checksum: Checksum,
    /// The keys an encrypted object names; `None` for a plain object.
    pub(crate) keys: Option<Vec<Fingerprint>>,
}

pub(crate) struct Repository {
    store: Store,
    url: String,
    compression: Compression,
    keys: Keys,
    /// What the identity object says about encryption, once read: every write is checked
    /// against it (`crypt::admits`), so no command can store a plain object in an encrypted
    /// repository or the other way round.
    recorded: tokio::sync::OnceCell<crypt::RecordedEncryption>,
}

impl Repository {
    pub(crate) async fn open(settings: &Settings) -> Result<Repository, RepoError> {
        Ok(Repository {
            keys: Keys::load(&settings.encryption)?,
            store: Store::open(settings).await?,
            url: settings.repo.to_string(),
            compression: settings.compression,
            recorded: tokio::sync::OnceCell::new(),
        })
    }

    /// A writer for `key`, encrypting when the settings name recipients; refused before
    /// anything is written when that disagrees with what the repository recorded.
    async fn writer(&self, key: &str, trailer: bool) -> Result<SealedWriter, RepoError> {
        let recorded = match self.recorded.get() {
            Some(r) => Some(r.clone()),
            None => self.read_recorded().await?,
        };
        if let Some(recorded) = recorded {
            // Checked for every object: a refusal must come before a byte is stored.
            crypt::admits(&recorded, &self.keys, &self.url).map_err(RepoError::Refused)?;
        }
        SealedWriter::new(self.store.writer(key)?, key, &self.keys, trailer).await
    }

    /// Reads what the identity object records about encryption and remembers it; `None` while
    /// the repository has no identity (its first writer records one).
    async fn read_recorded(&self) -> Result<Option<crypt::RecordedEncryption>, RepoError> {
        let key = layout::identity();
        let Some(bytes) = self.get_bytes(&key).await? else {
            return Ok(None);
        };
        let recorded = crypt::RecordedEncryption::parse(&bytes).map_err(|problem| {
            RepoError::Codec(CodecError::Corrupt {
                object: key,
                problem,
            })
        })?;
        Ok(Some(
            self.recorded
                .get_or_init(|| async { recorded })
                .await
                .clone(),
        ))
    }

    /// Remembers what identity JSON just read or written records about encryption, sparing the
    /// first write a read of its own. Unparseable JSON is left for that read to report.
    pub(super) fn note_identity(&self, json: &[u8]) {
        if let Ok(recorded) = crypt::RecordedEncryption::parse(json) {
            let _ = self.recorded.set(recorded);
        }
    }

    /// Whether the identity object marks the repository encrypted; `None` without an identity.
    pub(crate) async fn is_encrypted(&self) -> Result<Option<bool>, RepoError> {
        let recorded = match self.recorded.get() {
            Some(r) => Some(r.clone()),
            None => self.read_recorded().await?,
        };
        Ok(recorded.map(|r| r.encryption.is_some()))
    }

    /// Whether this process can read what the repository holds: it is not encrypted, or an
    /// identity is configured.
    pub(crate) async fn can_decrypt(&self) -> Result<bool, RepoError> {
        Ok(self.keys.decrypts() || self.is_encrypted().await? != Some(true))
    }

    /// What the identity object records about encryption for this repository's writers.
    pub(crate) fn encryption_record(&self) -> Option<crypt::EncryptionRecord> {
        crypt::EncryptionRecord::for_keys(&self.keys)
    }

    /// What an object says in clear, and with `trailer` an encrypted WAL object's trailer too
    /// (which takes reading it to its end): `Some(None)` for a plain object, `None` when absent.
    async fn envelope(
        &self,
        key: &str,
        trailer: bool,
    ) -> Result<Option<Option<Envelope>>, RepoError> {
        let Some(mut reader) = self.store.get(key).await? else {
            return Ok(None);
        };
        Ok(Some(if trailer {
            crypt::read_clear(reader, key).await?
        } else {
            crypt::read_envelope(&mut reader, key).await?.1
        }))
    }

    /// A stored object opened for reading (decrypted if it is encrypted), and an encrypted
    /// one's envelope. `None` when absent.
    async fn decoder(
        &self,
        key: &str,
    ) -> Result<Option<(Decoder<ObjectReader>, Option<Envelope>)>, RepoError> {
        let Some(reader) = self.store.get(key).await? else {
            return Ok(None);
        };
        let (reader, keys) = crypt::open(reader, key, &self.keys).await?;
        Ok(Some((Decoder::new(reader, key).await?, keys)))
    }

    /// The repository URL, for messages.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The objects of one group, with their stored sizes.
    pub(crate) async fn list(&self, what: Listing<'_>) -> Result<Vec<ObjectInfo>, RepoError> {
        Ok(self.store.list(&what.prefix()).await?)
    }

    /// The names one level below a group's prefix (under `backups/`, the backups' names),
    /// without listing the objects below them.
    pub(crate) async fn children(&self, what: Listing<'_>) -> Result<Vec<String>, RepoError> {
        Ok(self.store.children(&what.prefix()).await?)
    }

    /// The stored size of an object, or `None` when it is absent.
    pub(crate) async fn head(&self, key: &str) -> Result<Option<u64>, RepoError> {
        Ok(self.store.head(key).await?)
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), RepoError> {
        Ok(self.store.delete(key).await?)
    }

    /// The objects of one group handed to `each` as they are listed, unsorted, with their times:
    /// for listings too large to hold (retention over a million WAL objects).
    pub(crate) async fn list_each(
        &self,
        what: Listing<'_>,
        each: &mut (dyn FnMut(Listed) + Send),
    ) -> Result<(), RepoError> {
        Ok(self.store.list_each(&what.prefix(), each).await?)
    }

    /// Deletes many objects, [`DELETE_BATCH`] per request where the store has batches.
    pub(crate) async fn delete_batch(&self, keys: &[String]) -> Result<(), RepoError> {
        Ok(self.store.delete_batch(keys).await?)
    }

    /// What interrupted writers left behind before `before` (temp files, multipart uploads).
    pub(crate) async fn leftovers(
        &self,
        before: std::time::SystemTime,
    ) -> Result<Vec<Leftover>, RepoError> {
        Ok(self.store.leftovers(before).await?)
    }

    pub(crate) async fn remove_leftover(&self, leftover: &Leftover) -> Result<(), RepoError> {
        Ok(self.store.remove_leftover(leftover).await?)
    }

    /// Stores a WAL file under the rule every writer of WAL follows (wal-push, the pusher,
    /// wal-receive, history files): never overwrite. A name already archived is compared content
    /// for content: identical is success (PostgreSQL retries after a crash, and two writers may
    /// race), different is [`RepoError::Conflict`] and nothing is written. `tap` sees each block
    /// of a file's content as it streams into the store.
    pub(crate) async fn store_wal(
        &self,
        name: &WalFileName,
        content: WalContent<'_>,
        mut tap: impl FnMut(&[u8]) + Send,
    ) -> Result<WalStored, RepoError> {
        let key = layout::wal(name);
        for _ in 0..STORE_WAL_ATTEMPTS {
            // Checking first costs one round trip but keeps the promise even on S3 services
            // that ignore If-None-Match.
            if self.store.head(&key).await?.is_none() {
                let stored = match content {
                    WalContent::File(path) => {
                        self.put_file_tapped(&key, path, PutMode::IfAbsent, &mut tap, true)
                            .await?
                    }
                    WalContent::Bytes(bytes) => {
                        self.put_bytes_with(&key, bytes, PutMode::IfAbsent, true)
                            .await?
                    }
                };
                if stored.committed == Committed::Created {
                    return Ok(WalStored::Created(stored));
                }
            }
            let comparison = if self.keys.encrypts() && !self.keys.decrypts() {
                self.compare_envelope(&key, content).await
            } else {
                self.compare_content(&key, content).await
            };
            let comparison = match comparison {
                Err(RepoError::Codec(CodecError::Corrupt { problem, .. })) => {
                    self.replace_damaged(&key, &problem).await?;
                    continue;
                }
                other => other?,
            };
            match comparison {
                Some(cmp) if cmp.identical => return Ok(WalStored::Identical),
                Some(cmp) => {
                    return Err(RepoError::Conflict {
                        name: name.to_string(),
                        repo: self.url.clone(),
                        stored: cmp.stored,
                        local: cmp.local,
                    })
                }
                // Deleted between the check and the read (retention racing a retry): again.
                None => continue,
            }
        }
        Err(RepoError::Vanishing(key))
    }

    /// Removes a damaged WAL object (one that does not decode: an upload cut short that a
    /// server kept anyway, a torn copy) so that the content PostgreSQL still holds can be
    /// stored in its place: left there, it would fail every archive_command call for ever and
    /// hold no WAL anyone could restore. It is read a second time first, so a read that broke
    /// on the way is not mistaken for damage.
    async fn replace_damaged(&self, key: &str, problem: &str) -> Result<(), RepoError> {
        match self.verify(key).await {
            Err(RepoError::Codec(CodecError::Corrupt { .. })) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(e),
        }
        tracing::warn!("{key} is damaged ({problem}); replacing it with the content being stored");
        self.store.delete(key).await?;
        Ok(())
    }

    /// A stored WAL object compared with local content; `None` when it vanished.
    async fn compare_content(
        &self,
        key: &str,
        content: WalContent<'_>,
    ) -> Result<Option<Comparison>, RepoError> {
        Ok(match content {
            WalContent::File(path) => self.compare_with_file(key, path).await?,
            WalContent::Bytes(bytes) => self.get_bytes(key).await?.map(|stored| Comparison {
                identical: stored == bytes,
                stored: Checksum::of(&stored),
                local: Checksum::of(bytes),
            }),
        })
    }

    /// For a writer without an identity: compares what an encrypted WAL object records in clear
    /// with the local content (a plain object is compared as usual).
    async fn compare_envelope(
        &self,
        key: &str,
        content: WalContent<'_>,
    ) -> Result<Option<Comparison>, RepoError> {
        let Some(envelope) = self.envelope(key, true).await? else {
            return Ok(None);
        };
        let Some(envelope) = envelope else {
            return self.compare_content(key, content).await;
        };
        let Some(stored) = envelope.clear_content(key)? else {
            return Err(CryptError::NoIdentity {
                object: key.to_owned(),
                keys: envelope.keys,
            }
            .into());
        };
        let local = match content {
            WalContent::Bytes(bytes) => ClearContent {
                len: bytes.len() as u64,
                checksum: Checksum::of(bytes),
            },
            WalContent::File(path) => file_content(path).await?,
        };
        Ok(Some(Comparison {
            identical: stored == local,
            stored: stored.checksum,
            local: local.checksum,
        }))
    }

    /// Stores the content of the file at `path` under `key`, handing each block of content to
    /// `tap` as it streams past, so a caller can examine the file without reading it twice.
    /// With `trailer` an encrypted object records the content's length and crc32 after it.
    async fn put_file_tapped(
        &self,
        key: &str,
        path: &Path,
        mode: PutMode,
        mut tap: impl FnMut(&[u8]) + Send,
        trailer: bool,
    ) -> Result<Stored, RepoError> {
        let (mut file, len) = BlockFile::open(path)
            .await
            .map_err(RepoError::file("open", path))?;
        let mut encoder = Encoder::new(self.compression, len);
        let mut writer = self.writer(key, trailer).await?;
        let header = Bytes::copy_from_slice(&encoder.header());
        writer.write(header).await?;
        let mut raw = vec![0u8; MAX_BLOCK];
        let mut read = 0u64;
        loop {
            let n;
            (raw, n) = file
                .read(raw, MAX_BLOCK)
                .await
                .map_err(RepoError::file("read", path))?;
            if n == 0 {
                break;
            }
            read += n as u64;
            if read > len {
                break;
            }
            tap(&raw[..n]);
            let mut out = Vec::with_capacity(n / 2 + 16);
            encoder.block(&raw[..n], &mut out);
            writer.write(out.into()).await?;
        }
        let mut trailer = Vec::with_capacity(8);
        let checksum = encoder
            .finish(&mut trailer)
            .map_err(|_| RepoError::FileChanged {
                path: path.to_path_buf(),
                announced: len,
                read,
            })?;
        writer.write(trailer.into()).await?;
        let (committed, stored_len) = writer.commit(mode, ClearContent { len, checksum }).await?;
        Ok(Stored {
            committed: self.settle(key, committed, len, checksum).await?,
            content_len: len,
            stored_len,
        })
    }

    /// Stores a small in-memory object.
    pub(crate) async fn put_bytes(
        &self,
        key: &str,
        content: &[u8],
        mode: PutMode,
    ) -> Result<Stored, RepoError> {
        self.put_bytes_with(key, content, mode, false).await
    }

    async fn put_bytes_with(
        &self,
        key: &str,
        content: &[u8],
        mode: PutMode,
        trailer: bool,
    ) -> Result<Stored, RepoError> {
        let mut writer = self.writer(key, trailer).await?;
        writer
            .write(codec::encode_all(self.compression, content).into())
            .await?;
        let len = content.len() as u64;
        let checksum = Checksum::of(content);
        let (committed, stored_len) = writer.commit(mode, ClearContent { len, checksum }).await?;
        Ok(Stored {
            committed: self.settle(key, committed, len, checksum).await?,
            content_len: len,
            stored_len,
        })
    }

    /// Makes a no-overwrite write idempotent: when the key was taken, the stored object is read
    /// back, and if it holds exactly the content being written (same length and content
    /// checksum) the write counts as [`Committed::Created`]. That is the case of a retried PUT
    /// whose first attempt reached the store but lost its answer, and of a writer re-run after a
    /// crash. An object that differs, or that cannot be decoded, stays
    /// [`Committed::AlreadyExists`] for the caller to judge; only store errors are errors.
    async fn settle(
        &self,
        key: &str,
        committed: Committed,
        content_len: u64,
        checksum: Checksum,
    ) -> Result<Committed, RepoError> {
        if committed != Committed::AlreadyExists {
            return Ok(committed);
        }
        // Why the key stays taken is said here: the caller's refusal names only the key.
        match self.verify(key).await {
            Ok(Some(found)) if (found.content_len, found.checksum) == (content_len, checksum) => {
                tracing::info!("{key} already holds exactly this content (a retried write)");
                Ok(Committed::Created)
            }
            Ok(Some(found)) => {
                tracing::warn!(
                    "{key} is taken by other content: {} bytes with {}, not {content_len} bytes \
                     with {checksum}",
                    found.content_len,
                    found.checksum
                );
                Ok(Committed::AlreadyExists)
            }
            Ok(None) => {
                tracing::warn!("{key} was taken, then gone when read back");
                Ok(Committed::AlreadyExists)
            }
            // A writer holding only recipients cannot read the object back: the caller judges.
            Err(e @ (RepoError::Codec(CodecError::Corrupt { .. }) | RepoError::Crypt(_))) => {
                tracing::warn!("{key} is taken by an object that does not read back: {e}");
                Ok(Committed::AlreadyExists)
            }
            Err(e) => Err(e),
        }
    }

    /// Stores the identity object, which stays plain in an encrypted repository too: writers
    /// that hold only recipients must read it (the cluster it holds, whether it is encrypted).
    pub(super) async fn put_identity(&self, content: &[u8]) -> Result<Committed, RepoError> {
        let key = layout::identity();
        let mut writer = SealedWriter::plain(self.store.writer(&key)?, &key);
        writer
            .write(codec::encode_all(self.compression, content).into())
            .await?;
        let clear = ClearContent {
            len: content.len() as u64,
            checksum: Checksum::of(content),
        };
        Ok(writer.commit(PutMode::IfAbsent, clear).await?.0)
    }

    /// A small object's verified content, or `None` when absent.
    pub(crate) async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, RepoError> {
        let Some((mut decoder, _)) = self.decoder(key).await? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        while let Some(block) = decoder.next_block().await? {
            out.extend_from_slice(block);
        }
        Ok(Some(out))
    }

    /// Like [`Repository::get_bytes`], refusing an object whose declared length `rule` does not
    /// admit before reading its content.
    pub(crate) async fn get_bytes_checked(
        &self,
        key: &str,
        rule: LengthRule,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        let Some((mut decoder, _)) = self.decoder(key).await? else {
            return Ok(None);
        };
        check_length(&decoder, key, rule)?;
        let mut out = Vec::new();
        while let Some(block) = decoder.next_block().await? {
            out.extend_from_slice(block);
        }
        Ok(Some(out))
    }

    /// Restores an object into `dest`: decoded into a temporary file beside it, verified, then
    /// renamed, so `dest` appears only with whole, verified content. `None` when absent. Not
    /// fsynced: restored WAL is read at once and PostgreSQL copies (and syncs) what it keeps, and
    /// the prefetch spool checks the files it kept across a reboot before serving them. An object
    /// whose declared length `rule` does not admit is refused before anything is written.
    pub(crate) async fn get_to_file(
        &self,
        key: &str,
        dest: &Path,
        rule: LengthRule,
    ) -> Result<Option<Checksum>, RepoError> {
        self.get_to_file_named(key, dest, rule, |_| dest.to_path_buf())
            .await
    }

    /// Like [`Repository::get_to_file`], for a destination whose name depends on the content's
    /// checksum: `name` makes the final path from it, and the temporary file sits beside `near`.
    pub(crate) async fn get_to_file_named(
        &self,
        key: &str,
        near: &Path,
        rule: LengthRule,
        name: impl FnOnce(Checksum) -> PathBuf,
    ) -> Result<Option<Checksum>, RepoError> {
        let Some((mut decoder, _)) = self.decoder(key).await? else {
            return Ok(None);
        };
        let temp = temp_beside(near);
        let written = async {
            check_length(&decoder, key, rule)?;
            let mut out = File::create(&temp)
                .await
                .map_err(RepoError::file("create", &temp))?;
            while let Some(block) = decoder.next_block().await? {
                out.write_all(block)
                    .await
                    .map_err(RepoError::file("write", &temp))?;
            }
            out.flush().await.map_err(RepoError::file("write", &temp))?;
            crate::failpoint::pause_if_enabled("restored-temp-written").await;
            // The decoder returned None only after checking the content checksum.
            Ok(decoder.checksum().unwrap_or(Checksum(0)))
        }
        .await;
        let dest = match &written {
            Ok(checksum) => name(*checksum),
            Err(_) => near.to_path_buf(),
        };
        publish(&temp, &dest, written).await.map(Some)
    }

    /// Opens an object and reads its first block, so that an encrypted one the configured
    /// identities cannot decrypt fails before a caller writes anything. An absent object passes:
    /// reading it later reports it.
    pub(crate) async fn check_readable(&self, key: &str) -> Result<(), RepoError> {
        if let Some((mut decoder, _)) = self.decoder(key).await? {
            decoder.next_block().await?;
        }
        Ok(())
    }

    /// Reads an object to its end, verifying it (decrypting it first if it is encrypted, and
    /// checking what its envelope says in clear against the content).
    pub(crate) async fn verify(&self, key: &str) -> Result<Option<Verified>, RepoError> {
        let Some((mut decoder, envelope)) = self.decoder(key).await? else {
            return Ok(None);
        };
        while decoder.next_block().await?.is_some() {}
        let content_len = decoder.header().content_length;
        let actual = ClearContent {
            len: content_len,
            checksum: decoder.checksum().unwrap_or(Checksum(0)),
        };
        let recorded = match &envelope {
            Some(e) => e.clear_content(key)?,
            None => None,
        };
        if let Some(clear) = recorded {
            if clear != actual {
                return Err(RepoError::Codec(CodecError::Corrupt {
                    object: key.to_owned(),
                    problem: format!(
                        "its envelope records {} bytes with {}, the content is {} bytes with {}",
                        clear.len, clear.checksum, actual.len, actual.checksum
                    ),
                }));
            }
        }
        Ok(Some(Verified {
            content_len,
            checksum: actual.checksum,
            keys: envelope.map(|e| e.keys),
        }))
    }

    /// Compares a stored object with a local file, reading both to the end so that both
    /// checksums can be reported. `None` when the object is absent.
    pub(crate) async fn compare_with_file(
        &self,
        key: &str,
        path: &Path,
    ) -> Result<Option<Comparison>, RepoError> {
        let Some((mut decoder, _)) = self.decoder(key).await? else {
            return Ok(None);
        };
        let (mut file, _) = BlockFile::open(path)
            .await
            .map_err(RepoError::file("open", path))?;
        let mut local_crc = crc32fast::Hasher::new();
        let mut identical = true;
        let mut local = vec![0u8; MAX_BLOCK];
        while let Some(block) = decoder.next_block().await? {
            let n;
            (local, n) = file
                .read(local, block.len())
                .await
                .map_err(RepoError::file("read", path))?;
            local_crc.update(&local[..n]);
            identical &= n == block.len() && local[..n] == *block;
        }
        // Whatever the file holds past the stored content also counts towards its checksum.
        loop {
            let n;
            (local, n) = file
                .read(local, MAX_BLOCK)
                .await
                .map_err(RepoError::file("read", path))?;
            if n == 0 {
                break;
            }
            identical = false;
            local_crc.update(&local[..n]);
        }
        Ok(Some(Comparison {
            identical,
            stored: decoder.checksum().unwrap_or(Checksum(0)),
            local: Checksum(local_crc.finalize()),
        }))
    }
}

fn check_length<R: tokio::io::AsyncRead + Unpin>(
    decoder: &Decoder<R>,
    key: &str,
    rule: LengthRule,
) -> Result<(), RepoError> {
    let declared = decoder.header().content_length;
    if rule.admits(declared) {
        return Ok(());
    }
    Err(RepoError::Length {
        key: key.to_owned(),
        declared,
        rule,
    })
}

/// The length and crc32 of a local file, read once before it is encrypted.
async fn file_content(path: &Path) -> Result<ClearContent, RepoError> {
    let (mut file, len) = BlockFile::open(path)
        .await
        .map_err(RepoError::file("open", path))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; MAX_BLOCK];
    loop {
        let n;
        (buf, n) = file
            .read(buf, MAX_BLOCK)
            .await
            .map_err(RepoError::file("read", path))?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
    }
    Ok(ClearContent {
        len,
        checksum: Checksum(crc.finalize()),
    })
}

/// Renames `temp`, once `written` says it is complete, to `dest`; on any failure `temp` is
/// removed, so nothing half-made is left beside `dest`.
pub(crate) async fn publish<T>(
    temp: &Path,
    dest: &Path,
    written: Result<T, RepoError>,
) -> Result<T, RepoError> {
    let result = match written {
        Ok(value) => fs::rename(temp, dest)
            .await
            .map(|()| value)
            .map_err(RepoError::file("rename", dest)),
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = fs::remove_file(temp).await;
    }
    result
}

/// A temporary name in the same directory as `dest`, so the final rename stays atomic.
pub(crate) fn temp_beside(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.walvault-{}.tmp", std::process::id()))
}

/// A local file read on the blocking pool straight into the caller's buffer, a block at a time
/// (tokio's `File` reads into a buffer of its own and copies from it: 16 MiB more per segment).
struct BlockFile {
    /// Away on the blocking pool during a read; gone if that read panicked.
    file: Option<std::fs::File>,
}

impl BlockFile {
    /// Opens `path`; returns it with its length.
    async fn open(path: &Path) -> std::io::Result<(BlockFile, u64)> {
        let path = path.to_path_buf();
        let (file, len) = blocking(move || {
            let file = std::fs::File::open(path)?;
            let len = file.metadata()?.len();
            Ok((file, len))
        })
        .await?;
        Ok((BlockFile { file: Some(file) }, len))
    }

    /// Fills `buf[..want]` unless the file ends first; hands the buffer back with how much was
    /// read.
    async fn read(&mut self, mut buf: Vec<u8>, want: usize) -> std::io::Result<(Vec<u8>, usize)> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("an earlier read of this file failed"))?;
        let (file, buf, n) = blocking(move || {
            let n = read_full(&mut file, &mut buf[..want]);
            Ok((file, buf, n))
        })
        .await?;
        self.file = Some(file);
        Ok((buf, n?))
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)?
}

/// Fills `buf` unless the file ends first; returns how much was read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// What the integration tests reach past the binary, for what the command line gives no handle
/// on (a store writer dropped in the middle of a multipart upload). Not for other uses.
#[doc(hidden)]
pub mod testing {
    use std::path::Path;

    use super::store::Store;
    use crate::config::{FlagValues, Settings};

    async fn store(config: &Path) -> Result<Store, String> {
        let settings = Settings::load(&FlagValues {
            config: Some(config.to_path_buf()),
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
        Store::open(&settings).await.map_err(|e| e.to_string())
    }

    /// Writes `len` bytes to `key` of the repository `config` names through one store writer,
    /// then drops the writer uncommitted, as a caller that failed locally would; `before_drop`
    /// runs between the two.
    pub async fn write_and_drop(
        config: &Path,
        key: &str,
        len: usize,
        before_drop: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let store = store(config).await?;
        let mut writer = store.writer(key).map_err(|e| e.to_string())?;
        writer
            .write(vec![7u8; len].into())
            .await
            .map_err(|e| e.to_string())?;
        before_drop.await;
        drop(writer);
        Ok(())
    }

    /// Whether `key` exists in the repository `config` names.
    pub async fn exists(config: &Path, key: &str) -> Result<bool, String> {
        let store = store(config).await?;
        Ok(store.head(key).await.map_err(|e| e.to_string())?.is_some())
    }
}

/// A repository in a local directory, for unit tests.
#[cfg(test)]
pub(crate) async fn local_for_tests(dir: &Path) -> Repository {
    local_with_keys_for_tests(dir, crate::config::EncryptionSettings::default())
        .await
        .unwrap()
}

/// Like [`local_for_tests`], with encryption keys.
#[cfg(test)]
pub(crate) async fn local_with_keys_for_tests(
    dir: &Path,
    encryption: crate::config::EncryptionSettings,
) -> Result<Repository, RepoError> {
    let mut settings = Settings::load(&crate::config::FlagValues {
        repo: Some(format!("file://{}", dir.display())),
        ..Default::default()
    })
    .unwrap();
    settings.encryption = encryption;
    Repository::open(&settings).await
}

#[cfg(test)]
mod damaged_wal {
    use super::*;

    /// A WAL object that does not decode (an upload cut short that the server kept) is replaced
    /// by the content being archived instead of failing every later archive_command call;
    /// a whole object with other content is still a conflict.
    #[tokio::test]
    async fn a_damaged_wal_object_is_replaced_not_a_dead_end() {
        let dir = tempfile::tempdir().unwrap();
        let repo = local_for_tests(dir.path()).await;
        let name: WalFileName = "000000010000000000000001".parse().unwrap();
        let key = layout::wal(&name);
        std::fs::create_dir_all(dir.path().join("wal")).unwrap();
        std::fs::write(dir.path().join(&key), b"WVLT\x01").unwrap();
        let stored = repo
            .store_wal(&name, WalContent::Bytes(b"segment"), |_| {})
            .await
            .unwrap();
        assert!(matches!(stored, WalStored::Created(_)), "{stored:?}");
        assert_eq!(repo.get_bytes(&key).await.unwrap().unwrap(), b"segment");

        let other = repo
            .store_wal(&name, WalContent::Bytes(b"another"), |_| {})
            .await;
        assert!(
            matches!(other, Err(RepoError::Conflict { .. })),
            "{other:?}"
        );
    }
}
