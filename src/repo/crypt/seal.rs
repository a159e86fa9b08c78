//! Writing encrypted objects: the clear envelope, then age's stream sealed a slice at a time on
//! a blocking thread while the caller prepares the next, then (for WAL) the trailer.

use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::envelope::{Trailer, FLAG_TRAILER};
use super::{ClearContent, CryptError, Keys};
use crate::repo::codec::{self, ENCRYPTION_AGE};
use crate::repo::store::{Committed, ObjectWriter, PutMode, StoreError};
use crate::repo::RepoError;

/// How much plaintext is sealed before the sealed bytes are passed on to the store.
const SEAL_SLICE: usize = 1 << 20;

/// Collects what age writes, for [`SealedWriter`] to pass on to the store.
#[derive(Clone, Default)]
struct Drain(Arc<Mutex<Vec<u8>>>);

impl Drain {
    /// Room for what sealing `plain` bytes writes (each 64 KiB chunk of age's STREAM gains a
    /// 16-byte tag), so the output is not copied as it grows.
    fn reserve_for(&self, plain: usize) {
        let sealed = plain + plain.div_ceil(64 << 10) * 16;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reserve(sealed);
    }

    fn take(&self) -> Vec<u8> {
        // A panic while the lock was held cannot leave the Vec inconsistent.
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Write for Drain {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type AgeStream = age::stream::StreamWriter<Drain>;

/// Where the age stream is: here, or out on a blocking thread sealing one slice.
enum Sealer {
    Idle(AgeStream),
    Busy(tokio::task::JoinHandle<std::io::Result<(AgeStream, Vec<u8>)>>),
}

/// The encrypting part of a [`SealedWriter`]; `sealer` is `None` only after a failure, and
/// then nothing more is written (never plaintext in its place).
struct Sealing {
    sealer: Option<Sealer>,
    drain: Drain,
}

/// A store writer that encrypts what it is given when the repository is encrypted. Counts the
/// bytes it stores.
pub(in crate::repo) struct SealedWriter {
    inner: ObjectWriter,
    object: String,
    age: Option<Sealing>,
    /// Whether the sealed object ends with a trailer.
    trailer: bool,
    stored: u64,
}

impl SealedWriter {
    /// A writer that stores what it is given as it is.
    pub(in crate::repo) fn plain(inner: ObjectWriter, object: &str) -> SealedWriter {
        SealedWriter {
            inner,
            object: object.to_owned(),
            age: None,
            trailer: false,
            stored: 0,
        }
    }

    /// A writer that encrypts to `keys`' recipients, or stores plainly when there are none;
    /// with `trailer` (WAL) an encrypted object ends with its content's length and crc32.
    pub(in crate::repo) async fn new(
        inner: ObjectWriter,
        object: &str,
        keys: &Keys,
        trailer: bool,
    ) -> Result<SealedWriter, RepoError> {
        let mut writer = SealedWriter::plain(inner, object);
        if !keys.encrypts() {
            return Ok(writer);
        }
        writer.trailer = trailer;
        let fps = keys.recipient_fingerprints();
        let flags = if trailer { FLAG_TRAILER } else { 0 };
        let mut envelope = codec::raw_header(0, ENCRYPTION_AGE, flags, fps.len() as u64).to_vec();
        let start = envelope.len();
        fps.iter()
            .for_each(|fp| envelope.extend_from_slice(fp.bytes()));
        let crc = crc32fast::hash(&envelope[start..]);
        envelope.extend_from_slice(&crc.to_le_bytes());
        let encrypt_err = |problem: String| CryptError::Encrypt {
            object: object.to_owned(),
            problem,
        };
        let encryptor = age::Encryptor::with_recipients(
            keys.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(|e| encrypt_err(e.to_string()))?;
        let drain = Drain::default();
        let stream = encryptor
            .wrap_output(drain.clone())
            .map_err(|e| encrypt_err(e.to_string()))?;
        envelope.extend_from_slice(&drain.take());
        writer.age = Some(Sealing {
            sealer: Some(Sealer::Idle(stream)),
            drain,
        });
        writer.pass_on(envelope).await?;
        Ok(writer)
    }

    async fn pass_on(&mut self, bytes: Vec<u8>) -> Result<(), StoreError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.stored += bytes.len() as u64;
        self.inner.write(bytes.into()).await
    }

    fn encrypt_error(&self, problem: String) -> RepoError {
        CryptError::Encrypt {
            object: self.object.clone(),
            problem,
        }
        .into()
    }

    /// The age stream back from the slice being sealed, if one is, that slice passed on.
    async fn idle_stream(&mut self) -> Result<AgeStream, RepoError> {
        let sealer = self.age.as_mut().and_then(|a| a.sealer.take());
        match sealer {
            Some(Sealer::Idle(stream)) => Ok(stream),
            Some(Sealer::Busy(job)) => {
                let (stream, sealed) = job
                    .await
                    .map_err(|e| RepoError::Task(e.to_string()))?
                    .map_err(|e| self.encrypt_error(e.to_string()))?;
                self.pass_on(sealed).await?;
                Ok(stream)
            }
            None => Err(self.encrypt_error("an earlier failure ended its encryption".into())),
        }
    }

    pub(in crate::repo) async fn write(&mut self, chunk: Bytes) -> Result<(), RepoError> {
        if self.age.is_none() {
            self.stored += chunk.len() as u64;
            return Ok(self.inner.write(chunk).await?);
        }
        // Each slice is sealed on a blocking thread while the caller prepares the next (reads
        // and compresses it), so encryption costs little wall time on a second core; one slice
        // at a time, so a pack is never held twice (plain and sealed).
        let mut at = 0;
        while at < chunk.len() {
            let slice = chunk.slice(at..chunk.len().min(at + SEAL_SLICE));
            at += slice.len();
            let mut stream = self.idle_stream().await?;
            let Some(age) = self.age.as_mut() else {
                return Err(self.encrypt_error("its encryption was lost".into()));
            };
            let drain = age.drain.clone();
            age.sealer = Some(Sealer::Busy(tokio::task::spawn_blocking(move || {
                drain.reserve_for(slice.len());
                stream.write_all(&slice)?;
                Ok((stream, drain.take()))
            })));
        }
        Ok(())
    }

    /// Ends the age stream (its last chunk is marked final, so a truncated object never
    /// decrypts), adds the trailer recording `content` if this writer has one, and commits;
    /// returns how the commit ended and the bytes stored.
    pub(in crate::repo) async fn commit(
        mut self,
        mode: PutMode,
        content: ClearContent,
    ) -> Result<(Committed, u64), RepoError> {
        if self.age.is_some() {
            let stream = self.idle_stream().await?;
            let drain = stream
                .finish()
                .map_err(|e| self.encrypt_error(e.to_string()))?;
            let mut sealed = drain.take();
            if self.trailer {
                sealed.extend_from_slice(&Trailer::encode(content));
            }
            self.pass_on(sealed).await?;
        }
        let committed = self.inner.commit(mode).await?;
        Ok((committed, self.stored))
    }
}
