//! Reading encrypted objects: the clear envelope (header, key fingerprints, their crc32), the
//! trailer WAL ends with, held back from the age reader as the object streams, and decryption
//! with the configured identities (age checks each 64 KiB chunk before releasing it).

use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::keys::Keys;
use super::{ClearContent, CryptError, Fingerprint, MAX_RECIPIENTS};
use crate::repo::codec::{
    self, Checksum, CodecError, RawHeader, ENCRYPTION_AGE, ENCRYPTION_NONE, HEADER_LEN,
};
use crate::repo::store::ObjectReader;
use crate::repo::RepoError;

/// Header flag of an envelope that records its content's length and crc32 before the payload
/// (objects of earlier builds; read, no longer written).
const FLAG_CONTENT: u8 = 1;
/// Header flag of an object that ends with a [`TRAILER_LEN`]-byte trailer after the payload:
/// the content's length (8 bytes) and crc32 (4), and a crc32 of these (4), little-endian.
pub(super) const FLAG_TRAILER: u8 = 2;
pub(super) const TRAILER_LEN: usize = 16;

/// What an encrypted object says in clear.
#[derive(Clone, Debug)]
pub(crate) struct Envelope {
    /// The keys it was encrypted to.
    pub(crate) keys: Vec<Fingerprint>,
    /// Its content's length and crc32, for WAL of earlier builds.
    pub(crate) content: Option<ClearContent>,
    /// Where the trailer lands once the object was read to its end, for WAL.
    pub(crate) trailer: Option<Trailer>,
}

impl Envelope {
    /// The content length and crc32 the object records, if any: before its payload, or in its
    /// trailer (known once the object was read to its end).
    pub(crate) fn clear_content(&self, object: &str) -> Result<Option<ClearContent>, CodecError> {
        match &self.trailer {
            None => Ok(self.content),
            Some(trailer) => trailer.content(object).map(Some),
        }
    }
}

/// The last [`TRAILER_LEN`] bytes of an object, held back from the age reader by [`HoldBack`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Trailer(Arc<Mutex<Option<[u8; TRAILER_LEN]>>>);

impl Trailer {
    pub(super) fn encode(content: ClearContent) -> Vec<u8> {
        let mut out = Vec::with_capacity(TRAILER_LEN);
        out.extend_from_slice(&content.len.to_le_bytes());
        out.extend_from_slice(&content.checksum.0.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn content(&self, object: &str) -> Result<ClearContent, CodecError> {
        let corrupt = |problem: &str| CodecError::Corrupt {
            object: object.to_owned(),
            problem: problem.to_owned(),
        };
        let held = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = held.ok_or_else(|| corrupt("ends before its trailer"))?;
        let (fields, crc) = bytes.split_at(12);
        if crc32fast::hash(fields).to_le_bytes() != crc {
            return Err(corrupt("trailer checksum mismatch"));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&fields[..8]);
        let mut sum = [0u8; 4];
        sum.copy_from_slice(&fields[8..12]);
        Ok(ClearContent {
            len: u64::from_le_bytes(len),
            checksum: Checksum(u32::from_le_bytes(sum)),
        })
    }
}

/// Passes a reader's bytes on except the last [`TRAILER_LEN`], which it keeps in a [`Trailer`]
/// when the reader ends (an object shorter than that leaves the trailer empty).
struct HoldBack {
    inner: ObjectReader,
    held: Vec<u8>,
    /// What one read of `inner` lands in, kept from read to read.
    scratch: Vec<u8>,
    trailer: Trailer,
    ended: bool,
}

impl HoldBack {
    fn new(inner: ObjectReader, trailer: Trailer) -> HoldBack {
        HoldBack {
            inner,
            held: Vec::with_capacity(TRAILER_LEN),
            scratch: Vec::new(),
            trailer,
            ended: false,
        }
    }
}

impl tokio::io::AsyncRead for HoldBack {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        this.scratch.resize(buf.remaining().clamp(1, 64 << 10), 0);
        loop {
            if this.ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut read = tokio::io::ReadBuf::new(&mut this.scratch);
            match this.inner.as_mut().poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let fresh = read.filled();
            if fresh.is_empty() {
                this.ended = true;
                if let Ok(bytes) = <[u8; TRAILER_LEN]>::try_from(this.held.as_slice()) {
                    *this.trailer.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
                }
                return Poll::Ready(Ok(()));
            }
            this.held.extend_from_slice(fresh);
            let release = this.held.len().saturating_sub(TRAILER_LEN);
            if release > 0 {
                // `release` is at most what was just read, which fits: the scratch buffer is no
                // larger than what `buf` has room for.
                buf.put_slice(&this.held[..release]);
                this.held.drain(..release);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Reads a stored object without decrypting it: its envelope and, when it has one, its trailer.
pub(in crate::repo) async fn read_clear(
    mut reader: ObjectReader,
    object: &str,
) -> Result<Option<Envelope>, RepoError> {
    let (_, envelope) = read_envelope(&mut reader, object).await?;
    if let Some(trailer) = envelope.as_ref().and_then(|e| e.trailer.clone()) {
        let mut rest = HoldBack::new(reader, trailer);
        tokio::io::copy(&mut rest, &mut tokio::io::sink())
            .await
            .map_err(|source| CodecError::Io {
                object: object.to_owned(),
                source,
            })?;
    }
    Ok(envelope)
}

/// Opens a stored object: a plain one is handed back as it is, an encrypted one is decrypted as
/// it streams (age checks each 64 KiB chunk before releasing it). Also returns the fingerprints
/// an encrypted object names.
pub(in crate::repo) async fn open(
    mut reader: ObjectReader,
    object: &str,
    keys: &Keys,
) -> Result<(ObjectReader, Option<Envelope>), RepoError> {
    let (h, envelope) = read_envelope(&mut reader, object).await?;
    let Some(envelope) = envelope else {
        let again = std::io::Cursor::new(h.to_vec()).chain(reader);
        return Ok((Box::pin(again), None));
    };
    let keys_named = envelope.keys.clone();
    if keys.identities.is_empty() {
        return Err(CryptError::NoIdentity {
            object: object.to_owned(),
            keys: keys_named,
        }
        .into());
    }
    let undecryptable = |problem: String| CryptError::Undecryptable {
        object: object.to_owned(),
        keys: keys_named.clone(),
        problem,
    };
    let reader: ObjectReader = match &envelope.trailer {
        Some(trailer) => Box::pin(HoldBack::new(reader, trailer.clone())),
        None => reader,
    };
    let input = tokio::io::BufReader::new(reader).compat();
    let decryptor = age::Decryptor::new_async_buffered(input)
        .await
        .map_err(|e| undecryptable(format!("age header: {e}")))?;
    if decryptor.is_scrypt() {
        return Err(undecryptable("encrypted to a passphrase, not to a key".into()).into());
    }
    let plain = decryptor
        .decrypt_async(keys.identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => CryptError::NoMatchingKey {
                object: object.to_owned(),
                keys: keys_named.clone(),
                have: keys.identity_fps.clone(),
            },
            e => undecryptable(e.to_string()),
        })?;
    Ok((Box::pin(plain.compat()), Some(envelope)))
}

/// Reads an object's header and, for an encrypted one, its envelope; returns the header too.
pub(in crate::repo) async fn read_envelope(
    reader: &mut ObjectReader,
    object: &str,
) -> Result<([u8; HEADER_LEN], Option<Envelope>), RepoError> {
    let corrupt = |problem: String| CodecError::Corrupt {
        object: object.to_owned(),
        problem,
    };
    let mut h = [0u8; HEADER_LEN];
    codec::read_exact(reader, &mut h, object, "header").await?;
    let raw = RawHeader::parse(&h, object)?;
    match raw.encryption {
        ENCRYPTION_NONE => return Ok((h, None)),
        ENCRYPTION_AGE => {}
        code => return Err(corrupt(format!("unknown encryption code {code}")).into()),
    }
    let count = usize::try_from(raw.value)
        .ok()
        .filter(|n| (1..=MAX_RECIPIENTS).contains(n))
        .ok_or_else(|| corrupt(format!("an encrypted object naming {} keys", raw.value)))?;
    let with_content = raw.flags & FLAG_CONTENT != 0;
    let trailer = (raw.flags & FLAG_TRAILER != 0).then(Trailer::default);
    let fields = count * 8 + if with_content { 12 } else { 0 };
    let mut clear = vec![0u8; fields + 4];
    codec::read_exact(reader, &mut clear, object, "envelope").await?;
    let (fields, crc) = clear.split_at(fields);
    if crc32fast::hash(fields).to_le_bytes() != crc {
        return Err(corrupt("envelope checksum mismatch".into()).into());
    }
    let (fps, content) = fields.split_at(count * 8);
    let keys = fps
        .chunks_exact(8)
        .map(|c| {
            let mut fp = [0u8; 8];
            fp.copy_from_slice(c);
            Fingerprint::from_bytes(fp)
        })
        .collect();
    let content = with_content.then(|| {
        let mut len = [0u8; 8];
        len.copy_from_slice(&content[..8]);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&content[8..12]);
        ClearContent {
            len: u64::from_le_bytes(len),
            checksum: Checksum(u32::from_le_bytes(crc)),
        }
    });
    Ok((
        h,
        Some(Envelope {
            keys,
            content,
            trailer,
        }),
    ))
}
