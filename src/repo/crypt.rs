//! Encryption at rest: age (X25519) around the object format, and the keys that open it.
//!
//! An encrypted object is a header in the codec's layout (encryption code 1, the number of key
//! fingerprints where a plain object has its length), the fingerprints of the recipients it was
//! encrypted to and their crc32, then an age file whose plaintext is a whole plain object; WAL
//! ends with a trailer of the content's length and crc32 (so that a writer holding only
//! recipients can tell an identical re-push from a conflict), written after the payload so the
//! segment is read once. The clear fields name keys and compare re-pushes; age authenticates the
//! content, and `verify` checks the trailer against it. Used by `repo` alone.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use age::x25519;
use bytes::Bytes;
use sha2::Digest;
use tokio::io::AsyncReadExt;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::codec::{
    self, Checksum, CodecError, RawHeader, ENCRYPTION_AGE, ENCRYPTION_NONE, HEADER_LEN,
};
use super::store::{Committed, ObjectReader, ObjectWriter, PutMode, StoreError};
use crate::config::EncryptionSettings;

/// Most recipients one object may be encrypted to; bounds what a reader allocates for the list.
const MAX_RECIPIENTS: usize = 64;
/// Largest recipients or identity file read.
const MAX_KEY_FILE: u64 = 1 << 20;
/// How much plaintext is sealed before the sealed bytes are passed on to the store.
const SEAL_SLICE: usize = 1 << 20;
/// Header flag of an envelope that records its content's length and crc32 before the payload
/// (objects of earlier builds; read, no longer written).
const FLAG_CONTENT: u8 = 1;
/// Header flag of an object that ends with a [`TRAILER_LEN`]-byte trailer after the payload:
/// the content's length (8 bytes) and crc32 (4), and a crc32 of these (4), little-endian.
const FLAG_TRAILER: u8 = 2;
const TRAILER_LEN: usize = 16;

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
    fn encode(content: ClearContent) -> Vec<u8> {
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
pub(super) async fn read_clear(
    mut reader: ObjectReader,
    object: &str,
) -> Result<Option<Envelope>, super::RepoError> {
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

/// A content length and crc32 recorded in clear beside an encrypted WAL object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClearContent {
    pub(crate) len: u64,
    pub(crate) checksum: Checksum,
}

/// The short name of a recipient: the first 8 bytes of the SHA-256 of its `age1...` text, in hex.
/// Recorded in clear beside encrypted objects, so errors and `verify` can name keys; it reveals
/// nothing of the key itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Fingerprint([u8; 8]);

impl Fingerprint {
    fn of(recipient: &x25519::Recipient) -> Fingerprint {
        let digest = sha2::Sha256::digest(recipient.to_string().as_bytes());
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&digest[..8]);
        Fingerprint(fp)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Fingerprints as a comma-separated list, for messages.
pub(crate) struct Listed<'a>(pub(crate) &'a [Fingerprint]);

impl fmt::Display for Listed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, fp) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{fp}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CryptError {
    #[error(
        "object {object} is encrypted to key {} and no identity is configured to decrypt it (set \
         encryption.identity_file or WALVAULT_ENCRYPTION_IDENTITY_FILE)", Listed(.keys)
    )]
    NoIdentity {
        object: String,
        keys: Vec<Fingerprint>,
    },
    #[error(
        "object {object} is encrypted to key {} and none of the identities configured (keys {}) \
         decrypts it", Listed(.keys), Listed(.have)
    )]
    NoMatchingKey {
        object: String,
        keys: Vec<Fingerprint>,
        have: Vec<Fingerprint>,
    },
    #[error("object {object} (encrypted to key {}): {problem}", Listed(.keys))]
    Undecryptable {
        object: String,
        keys: Vec<Fingerprint>,
        problem: String,
    },
    #[error("encrypting {object}: {problem}")]
    Encrypt { object: String, problem: String },
    #[error("encryption.recipients: {0}")]
    Recipients(String),
    #[error("{what} {path}: {problem}")]
    KeyFile {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
}

/// A recipient string as a writer would use it; `Err` says why it is not one.
pub(crate) fn check_recipient(text: &str) -> Result<(), String> {
    parse_recipient(text).map(|_| ())
}

fn parse_recipient(text: &str) -> Result<x25519::Recipient, String> {
    text.parse::<x25519::Recipient>()
        .map_err(|_| format!("{text:?} is not an age X25519 recipient (age1...)"))
}

/// The keys of one process: recipients to encrypt new objects to, identities to open old ones.
/// Identities are secrets: nothing here prints them, and they live only in memory.
pub(crate) struct Keys {
    recipients: Vec<x25519::Recipient>,
    recipient_fps: Vec<Fingerprint>,
    identities: Vec<x25519::Identity>,
    identity_fps: Vec<Fingerprint>,
}

impl Keys {
    /// Reads the recipients file and the identity files the settings name.
    pub(crate) fn load(settings: &EncryptionSettings) -> Result<Keys, CryptError> {
        let mut recipients = settings
            .recipients
            .iter()
            .map(|text| parse_recipient(text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(CryptError::Recipients)?;
        if let Some(path) = &settings.recipients_file {
            let text = read_key_file(path, "recipients file", false)?;
            for (n, line) in key_lines(&text) {
                recipients.push(
                    parse_recipient(line).map_err(|problem| CryptError::KeyFile {
                        what: "recipients file",
                        path: path.clone(),
                        problem: format!("line {n}: {problem}"),
                    })?,
                );
            }
        }
        let mut recipient_fps: Vec<Fingerprint> = recipients.iter().map(Fingerprint::of).collect();
        recipient_fps.sort();
        recipient_fps.dedup();
        if recipient_fps.len() > MAX_RECIPIENTS {
            return Err(CryptError::Recipients(format!(
                "more than {MAX_RECIPIENTS} recipients"
            )));
        }
        let mut identities = Vec::new();
        for path in &settings.identity_files {
            let text = read_key_file(path, "identity file", true)?;
            for (n, line) in key_lines(&text) {
                // The line is a secret: the message gives its number, never its text.
                let identity =
                    line.parse::<x25519::Identity>()
                        .map_err(|_| CryptError::KeyFile {
                            what: "identity file",
                            path: path.clone(),
                            problem: format!(
                                "line {n} is not an age X25519 identity (AGE-SECRET-KEY-1...)"
                            ),
                        })?;
                identities.push(identity);
            }
        }
        let identity_fps = identities
            .iter()
            .map(|i| Fingerprint::of(&i.to_public()))
            .collect();
        Ok(Keys {
            recipients,
            recipient_fps,
            identities,
            identity_fps,
        })
    }

    /// Whether new objects are encrypted.
    pub(crate) fn encrypts(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// Whether an identity is configured to decrypt with.
    pub(crate) fn decrypts(&self) -> bool {
        !self.identities.is_empty()
    }

    /// The fingerprints new objects are encrypted to, sorted.
    pub(crate) fn recipient_fingerprints(&self) -> &[Fingerprint] {
        &self.recipient_fps
    }
}

/// The non-comment lines of a key file, numbered from 1 (age's own format: `#` comments).
fn key_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
}

/// Reads a small key file; a secret one must be accessible to its owner only, as ssh demands of
/// private keys.
fn read_key_file(path: &Path, what: &'static str, secret: bool) -> Result<String, CryptError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let err = |problem: String| CryptError::KeyFile {
        what,
        path: path.to_path_buf(),
        problem,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mode = file
        .metadata()
        .map_err(|e| err(e.to_string()))?
        .permissions()
        .mode();
    if secret && mode & 0o077 != 0 {
        return Err(err(format!(
            "permissions {:04o} are too open: an identity file must not be accessible by others \
             (chmod 600 {})",
            mode & 0o7777,
            path.display()
        )));
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(|e| err(e.to_string()))?;
    Ok(text)
}

/// Opens a stored object: a plain one is handed back as it is, an encrypted one is decrypted as
/// it streams (age checks each 64 KiB chunk before releasing it). Also returns the fingerprints
/// an encrypted object names.
pub(super) async fn open(
    mut reader: ObjectReader,
    object: &str,
    keys: &Keys,
) -> Result<(ObjectReader, Option<Envelope>), super::RepoError> {
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
pub(super) async fn read_envelope(
    reader: &mut ObjectReader,
    object: &str,
) -> Result<([u8; HEADER_LEN], Option<Envelope>), super::RepoError> {
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
            Fingerprint(fp)
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

/// The one scheme walvault encrypts with, as the identity object records it.
const SCHEME: &str = "age-x25519";

/// What the identity object records about encryption (its other fields are `repo::identity`'s).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct RecordedEncryption {
    #[serde(default)]
    pub(crate) encryption: Option<EncryptionRecord>,
}

impl RecordedEncryption {
    pub(crate) fn parse(identity_json: &[u8]) -> Result<RecordedEncryption, String> {
        serde_json::from_slice(identity_json).map_err(|e| format!("not valid identity JSON: {e}"))
    }
}

/// An encrypted repository's mark in its identity object: the scheme and the fingerprints of
/// the recipients it was created for (history, not a rule: rotation changes the recipients).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct EncryptionRecord {
    pub(crate) scheme: String,
    pub(crate) recipients: Vec<String>,
}

impl EncryptionRecord {
    /// The mark a repository created by a writer with these keys gets; `None` for a plain one.
    pub(crate) fn for_keys(keys: &Keys) -> Option<EncryptionRecord> {
        keys.encrypts().then(|| EncryptionRecord {
            scheme: SCHEME.to_owned(),
            recipients: keys.recipient_fps.iter().map(|fp| fp.to_string()).collect(),
        })
    }
}

/// Fail closed: a writer with recipients stores only into a repository marked encrypted, one
/// without only into a plain one. The identity object is plain, so a writer holding only public
/// keys can tell; whoever edits it to say "plain" still cannot make a writer with recipients
/// store plain objects.
pub(super) fn admits(recorded: &RecordedEncryption, keys: &Keys, repo: &str) -> Result<(), String> {
    match (&recorded.encryption, keys.encrypts()) {
        (Some(record), _) if record.scheme != SCHEME => Err(format!(
            "repository {repo} is encrypted with {:?}, which this walvault does not know; \
             nothing was written",
            record.scheme
        )),
        (Some(_), true) | (None, false) => Ok(()),
        (Some(record), false) => Err(format!(
            "repository {repo} is encrypted (created for key {}) and this writer has no \
             encryption recipients: refusing to store an unencrypted object; nothing was written \
             (set encryption.recipients or WALVAULT_ENCRYPTION_RECIPIENTS)",
            record.recipients.join(", ")
        )),
        (None, true) => Err(format!(
            "repository {repo} is not encrypted and this writer has encryption recipients: \
             refusing to store encrypted objects into it; nothing was written (an encrypted \
             repository starts empty: use a new directory or prefix and take a full backup)"
        )),
    }
}

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
pub(super) struct SealedWriter {
    inner: ObjectWriter,
    object: String,
    age: Option<Sealing>,
    /// Whether the sealed object ends with a trailer.
    trailer: bool,
    stored: u64,
}

impl SealedWriter {
    /// A writer that stores what it is given as it is.
    pub(super) fn plain(inner: ObjectWriter, object: &str) -> SealedWriter {
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
    pub(super) async fn new(
        inner: ObjectWriter,
        object: &str,
        keys: &Keys,
        trailer: bool,
    ) -> Result<SealedWriter, super::RepoError> {
        let mut writer = SealedWriter::plain(inner, object);
        if !keys.encrypts() {
            return Ok(writer);
        }
        writer.trailer = trailer;
        let fps = keys.recipient_fingerprints();
        let flags = if trailer { FLAG_TRAILER } else { 0 };
        let mut envelope = codec::raw_header(0, ENCRYPTION_AGE, flags, fps.len() as u64).to_vec();
        let start = envelope.len();
        fps.iter().for_each(|fp| envelope.extend_from_slice(&fp.0));
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

    fn encrypt_error(&self, problem: String) -> super::RepoError {
        CryptError::Encrypt {
            object: self.object.clone(),
            problem,
        }
        .into()
    }

    /// The age stream back from the slice being sealed, if one is, that slice passed on.
    async fn idle_stream(&mut self) -> Result<AgeStream, super::RepoError> {
        let sealer = self.age.as_mut().and_then(|a| a.sealer.take());
        match sealer {
            Some(Sealer::Idle(stream)) => Ok(stream),
            Some(Sealer::Busy(job)) => {
                let (stream, sealed) = job
                    .await
                    .map_err(|e| super::RepoError::Task(e.to_string()))?
                    .map_err(|e| self.encrypt_error(e.to_string()))?;
                self.pass_on(sealed).await?;
                Ok(stream)
            }
            None => Err(self.encrypt_error("an earlier failure ended its encryption".into())),
        }
    }

    pub(super) async fn write(&mut self, chunk: Bytes) -> Result<(), super::RepoError> {
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
    pub(super) async fn commit(
        mut self,
        mode: PutMode,
        content: ClearContent,
    ) -> Result<(Committed, u64), super::RepoError> {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::repo::codec;

    /// A fresh identity written to a 0600 file, and its recipient.
    pub(crate) fn identity_file(dir: &Path, name: &str) -> (PathBuf, String) {
        use std::os::unix::fs::PermissionsExt;
        let identity = x25519::Identity::generate();
        let path = dir.join(name);
        let secret = age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_owned();
        std::fs::write(&path, format!("# test identity\n{secret}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (path, identity.to_public().to_string())
    }

    use crate::repo::identity::{self, Identity};
    use crate::repo::packs::{PackContent, WantedPiece};
    use crate::repo::{local_with_keys_for_tests, LengthRule, RepoError, Repository};

    const MARKER: &[u8] = b"walvault-secret-marker-7f3e";

    /// Compressible content with the marker in every block.
    fn content(len: usize) -> Vec<u8> {
        MARKER.iter().copied().cycle().take(len).collect()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        keys_dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
                keys_dir: tempfile::tempdir().unwrap(),
            }
        }

        fn key(&self, name: &str) -> (PathBuf, String) {
            identity_file(self.keys_dir.path(), name)
        }

        async fn repo(&self, recipients: &[&str], identities: &[&Path]) -> Repository {
            self.try_repo(recipients, identities).await.unwrap()
        }

        async fn try_repo(
            &self,
            recipients: &[&str],
            identities: &[&Path],
        ) -> Result<Repository, RepoError> {
            let settings = EncryptionSettings {
                recipients: recipients.iter().map(|r| r.to_string()).collect(),
                recipients_file: None,
                identity_files: identities.iter().map(|p| p.to_path_buf()).collect(),
            };
            local_with_keys_for_tests(self.dir.path(), settings).await
        }

        fn stored(&self, key: &str) -> Vec<u8> {
            std::fs::read(self.dir.path().join(key)).unwrap()
        }

        fn object_count(&self) -> usize {
            walk(self.dir.path()).len()
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn cluster() -> Identity {
        Identity {
            system_identifier: 7,
            pg_major: 15,
            wal_segment_size: 16 << 20,
            created_at: "2026-11-30T00:00:00Z".into(),
        }
    }

    /// Every kind of write round-trips through age, and no stored byte run holds the content:
    /// the same objects in a plain repository do hold it, so the check can fail.
    #[tokio::test]
    async fn every_write_is_encrypted_and_reads_back() {
        for encrypted in [true, false] {
            let f = Fixture::new();
            let (id, recipient) = f.key("id");
            let repo = if encrypted {
                f.repo(&[&recipient], &[&id]).await
            } else {
                f.repo(&[], &[]).await
            };
            identity::ensure(&repo, &cluster(), "test").await.unwrap();
            let small = content(1000);
            let big = content(3 * codec::MAX_BLOCK + 17);
            repo.put_bytes("small", &small, PutMode::IfAbsent)
                .await
                .unwrap();
            let src = f.keys_dir.path().join("src");
            std::fs::write(&src, &big).unwrap();
            let stored = repo
                .put_file_tapped("big", &src, PutMode::IfAbsent, |_| {}, false)
                .await
                .unwrap();
            assert_eq!(stored.stored_len, f.stored("big").len() as u64);
            let mut crc = crc32fast::Hasher::new();
            crc.update(&big);
            repo.put_pack(
                "pack",
                PackContent {
                    bytes: big.clone(),
                    crc,
                },
            )
            .await
            .unwrap();

            for key in ["small", "big", "pack"] {
                assert_eq!(contains(&f.stored(key), MARKER), !encrypted, "{key}");
                let v = repo.verify(key).await.unwrap().unwrap();
                assert_eq!(v.keys.is_some(), encrypted, "{key}");
            }
            // The identity object stays readable without a key, and says so.
            let json = repo.get_bytes("repository").await.unwrap().unwrap();
            assert_eq!(contains(&json, b"age-x25519"), encrypted);
            assert_eq!(repo.is_encrypted().await.unwrap(), Some(encrypted));

            assert_eq!(repo.get_bytes("small").await.unwrap().unwrap(), small);
            let dest = f.keys_dir.path().join("dest");
            repo.get_to_file("big", &dest, LengthRule::Exactly(big.len() as u64))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), big);
            let wanted = vec![WantedPiece {
                at: 5,
                len: 2_000_000,
                crc32: crc32fast::hash(&big[5..2_000_005]),
            }];
            let mut pieces = repo.open_pack("pack", wanted).await.unwrap().unwrap();
            assert_eq!(pieces.next().await.unwrap().unwrap().1, big[5..2_000_005]);
            assert!(pieces.next().await.unwrap().is_none());
            let cmp = repo.compare_with_file("big", &src).await.unwrap().unwrap();
            assert!(cmp.identical);
        }
    }

    #[tokio::test]
    async fn every_flipped_byte_of_an_encrypted_object_is_refused() {
        let f = Fixture::new();
        let (id, recipient) = f.key("id");
        let repo = f.repo(&[&recipient], &[&id]).await;
        repo.put_bytes("o", &content(3000), PutMode::IfAbsent)
            .await
            .unwrap();
        let good = f.stored("o");
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            std::fs::write(f.dir.path().join("o"), &bad).unwrap();
            let err = repo.get_bytes("o").await.expect_err("a flipped byte");
            assert!(err.to_string().contains("object o"), "byte {i}: {err}");
        }
    }

    /// An encrypted WAL object ends with a trailer, which `verify` checks too: every flipped
    /// byte fails, and so does a trailer forged to record other content with a matching crc32.
    #[tokio::test]
    async fn every_flipped_byte_of_an_encrypted_wal_object_fails_verify() {
        let f = Fixture::new();
        let (id, recipient) = f.key("id");
        let repo = f.repo(&[&recipient], &[&id]).await;
        let name: walvault_wal::WalFileName = "000000010000000000000001".parse().unwrap();
        let wal = content(3000);
        repo.store_wal(&name, crate::repo::WalContent::Bytes(&wal), |_| {})
            .await
            .unwrap();
        let key = "wal/000000010000000000000001";
        let good = f.stored(key);
        let v = repo.verify(key).await.unwrap().unwrap();
        assert_eq!(v.content_len, 3000);
        let write = |bytes: &[u8]| std::fs::write(f.dir.path().join(key), bytes).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            write(&bad);
            let err = repo.verify(key).await.expect_err("a flipped byte");
            assert!(err.to_string().contains(key), "byte {i}: {err}");
        }
        let mut forged = good.clone();
        let at = forged.len() - TRAILER_LEN;
        forged[at] ^= 0x01;
        let crc = crc32fast::hash(&forged[at..at + 12]);
        forged[at + 12..].copy_from_slice(&crc.to_le_bytes());
        write(&forged);
        let err = repo.verify(key).await.unwrap_err().to_string();
        assert!(err.contains("its envelope records 3001 bytes"), "{err}");
        write(&good[..good.len() - 1]);
        assert!(repo.verify(key).await.is_err());
    }

    #[tokio::test]
    async fn readers_without_the_key_are_told_which_keys_open_the_object() {
        let f = Fixture::new();
        let (id, recipient) = f.key("id");
        let (other, _) = f.key("other");
        let writer = f.repo(&[&recipient], &[]).await;
        writer
            .put_bytes("wal/000000010000000000000001", b"x", PutMode::IfAbsent)
            .await
            .unwrap();
        let fp = Fingerprint::of(&parse_recipient(&recipient).unwrap()).to_string();

        let err = writer.get_bytes("wal/000000010000000000000001").await;
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains("no identity is configured") && err.contains(&fp),
            "{err}"
        );
        assert!(err.contains("wal/000000010000000000000001"), "{err}");

        let wrong = f.repo(&[], &[&other]).await;
        let err = wrong.get_bytes("wal/000000010000000000000001").await;
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains("none of the identities") && err.contains(&fp),
            "{err}"
        );
        for secret_file in [&id, &other] {
            let secret = std::fs::read_to_string(secret_file).unwrap();
            let line = secret.lines().nth(1).unwrap();
            assert!(!err.contains(line));
        }

        let right = f.repo(&[], &[&other, &id]).await;
        let got = right.get_bytes("wal/000000010000000000000001").await;
        assert_eq!(got.unwrap().unwrap(), b"x");
    }

    /// Fail closed both ways, before anything is stored.
    #[tokio::test]
    async fn writers_disagreeing_with_the_repository_store_nothing() {
        let f = Fixture::new();
        let (_, recipient) = f.key("id");
        let encrypted = f.repo(&[&recipient], &[]).await;
        identity::ensure(&encrypted, &cluster(), "test")
            .await
            .unwrap();
        let before = f.object_count();
        let plain = f.repo(&[], &[]).await;
        let err = plain
            .put_bytes("wal/000000010000000000000001", b"x", PutMode::IfAbsent)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is encrypted") && err.contains("nothing was written"),
            "{err}"
        );
        let err = identity::ensure(&plain, &cluster(), "test").await;
        assert!(err.is_ok(), "reading the identity needs no key");
        let err = plain
            .put_bytes(
                "walsummary/000000010000000000000001",
                b"x",
                PutMode::OverwriteDerived,
            )
            .await;
        assert!(err.is_err());
        assert_eq!(f.object_count(), before);

        let g = Fixture::new();
        let plain = g.repo(&[], &[]).await;
        identity::ensure(&plain, &cluster(), "test").await.unwrap();
        let before = g.object_count();
        let writer = g.repo(&[&recipient], &[]).await;
        let err = writer
            .put_bytes("wal/000000010000000000000001", b"x", PutMode::IfAbsent)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not encrypted"), "{err}");
        assert_eq!(g.object_count(), before);
    }

    /// A writer holding only recipients tells an identical re-push of WAL (success) from a
    /// different one (conflict, nothing overwritten) by what the envelope records in clear.
    #[tokio::test]
    async fn writers_without_identity_compare_wal_by_the_envelope() {
        use crate::repo::{WalContent, WalStored};
        let f = Fixture::new();
        let (_, recipient) = f.key("id");
        let writer = f.repo(&[&recipient], &[]).await;
        let name: walvault_wal::WalFileName = "000000010000000000000001".parse().unwrap();
        let segment = content(3 * codec::MAX_BLOCK);
        let path = f.keys_dir.path().join("seg");
        std::fs::write(&path, &segment).unwrap();
        let stored = writer
            .store_wal(&name, WalContent::File(&path), |_| {})
            .await
            .unwrap();
        assert!(matches!(stored, WalStored::Created(_)));
        let before = f.stored("wal/000000010000000000000001");
        let again = writer.store_wal(&name, WalContent::File(&path), |_| {});
        assert!(matches!(again.await.unwrap(), WalStored::Identical));
        let again = writer.store_wal(&name, WalContent::Bytes(&segment), |_| {});
        assert!(matches!(again.await.unwrap(), WalStored::Identical));
        let mut other = segment.clone();
        other[5] ^= 1;
        let err = writer
            .store_wal(&name, WalContent::Bytes(&other), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::Conflict { .. }), "{err}");
        assert_eq!(f.stored("wal/000000010000000000000001"), before);
    }

    /// Rotation: objects under the old key stay readable with the old identity beside the new
    /// one, new objects go to the new key only.
    #[tokio::test]
    async fn rotated_keys_read_old_and_new_objects() {
        let f = Fixture::new();
        let (old_id, old) = f.key("old");
        let (new_id, new) = f.key("new");
        let before = f.repo(&[&old], &[]).await;
        before
            .put_bytes("a", b"old", PutMode::IfAbsent)
            .await
            .unwrap();
        let after = f.repo(&[&new], &[&new_id, &old_id]).await;
        after
            .put_bytes("b", b"new", PutMode::IfAbsent)
            .await
            .unwrap();
        let fp = |r: &str| Fingerprint::of(&parse_recipient(r).unwrap());
        assert_eq!(
            after.verify("a").await.unwrap().unwrap().keys,
            Some(vec![fp(&old)])
        );
        assert_eq!(
            after.verify("b").await.unwrap().unwrap().keys,
            Some(vec![fp(&new)])
        );
        let only_new = f.repo(&[], &[&new_id]).await;
        assert!(only_new.get_bytes("a").await.is_err());
        assert_eq!(only_new.get_bytes("b").await.unwrap().unwrap(), b"new");
    }

    #[test]
    fn fingerprints_are_stable_short_hashes_of_the_recipient() {
        let r: x25519::Recipient = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
            .parse()
            .unwrap();
        let fp = Fingerprint::of(&r);
        assert_eq!(fp.to_string().len(), 16);
        assert_eq!(fp, Fingerprint::of(&r.to_string().parse().unwrap()));
        assert!(check_recipient("age1nope").is_err());
        assert!(check_recipient(&r.to_string()).is_ok());
    }

    #[test]
    fn identity_files_open_to_others_are_refused_without_quoting_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = identity_file(dir.path(), "id");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let settings = EncryptionSettings {
            identity_files: vec![path.clone()],
            ..Default::default()
        };
        let err = Keys::load(&settings).err().unwrap().to_string();
        assert!(err.contains("0640") && err.contains("too open"), "{err}");

        std::fs::write(&path, "AGE-SECRET-KEY-1NOTAKEY\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Keys::load(&settings).err().unwrap().to_string();
        assert!(err.contains("line 1") && !err.contains("NOTAKEY"), "{err}");
    }
}
