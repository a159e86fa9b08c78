//! The object format: how every byte walvault stores in a repository is framed.
//!
//! An object is self-describing, so no reader ever guesses the codec from a key or an extension:
//!
//! ```text
//! header   magic "WVLT" | version u8 | compression u8 | encryption u8 | flags u8
//!          | content length u64 LE | crc32 of the 16 bytes before it, u32 LE       (20 bytes)
//! block*   raw length u32 LE (1..=MAX_BLOCK) | stored length u32 LE | stored bytes
//!          (bit 31 of the stored length set: the block is stored uncompressed)
//! trailer  0u32 (end marker) | crc32 of the whole content u32 LE
//! ```
//!
//! The writer knows the content length up front (WAL files and backed-up files have a size), so a
//! reader can tell a truncated object from a whole one and can size its output before it starts.
//! Blocks are at most [`MAX_BLOCK`] bytes of content, which bounds the memory of both sides no matter
//! how large the object is. Every read checks the header checksum, each block's framing, the total
//! length, the content crc32 and that nothing follows the trailer.
//!
//! An encrypted object starts with a header of the same layout whose encryption byte is set; what
//! follows it is `repo::crypt`'s envelope around a whole plain object.
//!
//! Used by [`crate::repo`] only, which pairs it with the store.

use std::fmt;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::spare::Spare;

const MAGIC: &[u8; 4] = b"WVLT";
const FORMAT_VERSION: u8 = 1;
/// Size of the fixed header at the start of every object.
pub(crate) const HEADER_LEN: usize = 20;
/// Largest block of content the writer produces and the reader accepts.
pub(crate) const MAX_BLOCK: usize = 1 << 20;
const UNCOMPRESSED_BIT: u32 = 1 << 31;
/// The header's encryption codes: a plain object, or an age envelope (`repo::crypt`).
pub(crate) const ENCRYPTION_NONE: u8 = 0;
pub(crate) const ENCRYPTION_AGE: u8 = 1;

/// A header's fields, checked for magic, checksum and version only: what `value` means depends
/// on the encryption code (the content length of a plain object, the number of key fingerprints
/// of an encrypted one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawHeader {
    pub(crate) compression: u8,
    pub(crate) encryption: u8,
    pub(crate) flags: u8,
    pub(crate) value: u64,
}

impl RawHeader {
    pub(crate) fn parse(h: &[u8; HEADER_LEN], object: &str) -> Result<RawHeader, CodecError> {
        if &h[0..4] != MAGIC {
            return Err(CodecError::corrupt(
                object,
                "not a walvault object (bad magic)",
            ));
        }
        let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        if crc32fast::hash(&h[0..16]) != crc {
            return Err(CodecError::corrupt(object, "header checksum mismatch"));
        }
        if h[4] != FORMAT_VERSION {
            return Err(CodecError::corrupt(
                object,
                format!(
                    "format version {} is not supported (this walvault reads {FORMAT_VERSION})",
                    h[4]
                ),
            ));
        }
        let mut value = [0u8; 8];
        value.copy_from_slice(&h[8..16]);
        Ok(RawHeader {
            compression: h[5],
            encryption: h[6],
            flags: h[7],
            value: u64::from_le_bytes(value),
        })
    }
}

/// A header with the given fields and its checksum.
pub(crate) fn raw_header(
    compression: u8,
    encryption: u8,
    flags: u8,
    value: u64,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4] = FORMAT_VERSION;
    h[5] = compression;
    h[6] = encryption;
    h[7] = flags;
    h[8..16].copy_from_slice(&value.to_le_bytes());
    let crc = crc32fast::hash(&h[0..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// How the blocks of an object are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Compression {
    None,
    Lz4,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Compression::None),
            1 => Some(Compression::Lz4),
            _ => None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
        })
    }
}

/// The crc32 of an object's content (not of its stored bytes), so two objects with the same content
/// compare equal whatever their compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Checksum(pub(crate) u32);

impl Checksum {
    /// The checksum of a whole buffer.
    pub(crate) fn of(content: &[u8]) -> Self {
        Checksum(crc32fast::hash(content))
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "crc32:{:08x}", self.0)
    }
}

/// What the header of an object says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) compression: Compression,
    pub(crate) content_length: u64,
}

/// Why an object could not be read; always names the object.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("object {object}: {problem}")]
    Corrupt { object: String, problem: String },
    #[error("object {object}: read failed: {source}")]
    Io {
        object: String,
        #[source]
        source: std::io::Error,
    },
}

impl CodecError {
    fn corrupt(object: &str, problem: impl Into<String>) -> Self {
        CodecError::Corrupt {
            object: object.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Produces the stored bytes of one object, block by block.
pub(crate) struct Encoder {
    compression: Compression,
    content_length: u64,
    seen: u64,
    crc: crc32fast::Hasher,
    /// False when the caller supplied the content's crc32 up front.
    hash_blocks: bool,
    /// Where blocks are compressed before the result is appended to the caller's buffer: one
    /// zeroed allocation per encoder (a kept one when there is one) instead of zeroing
    /// a worst-case tail for every block.
    scratch: Vec<u8>,
}

/// Block buffers of finished encoders and decoders, for the next ones (a backup encodes a pack
/// every few megabytes, a restore decodes one): at most 8, about 1 MiB each.
static SPARE: Spare = Spare::new(8);

impl Encoder {
    pub(crate) fn new(compression: Compression, content_length: u64) -> Self {
        Encoder {
            compression,
            content_length,
            seen: 0,
            crc: crc32fast::Hasher::new(),
            hash_blocks: true,
            scratch: Vec::new(),
        }
    }

    /// An encoder for content whose crc32 the caller already computed while it assembled the
    /// content (a backup pack is built from pieces checksummed as they were read), so the blocks
    /// are not hashed a second time. `content_crc` must cover exactly the content later passed
    /// to [`Encoder::block`]; readers verify it like any other content checksum.
    pub(crate) fn with_content_crc(
        compression: Compression,
        content_length: u64,
        content_crc: crc32fast::Hasher,
    ) -> Self {
        let mut encoder = Encoder::new(compression, content_length);
        encoder.crc = content_crc;
        encoder.hash_blocks = false;
        encoder
    }

    /// The header; goes first.
    pub(crate) fn header(&self) -> [u8; HEADER_LEN] {
        raw_header(
            self.compression.code(),
            ENCRYPTION_NONE,
            0,
            self.content_length,
        )
    }

    /// Appends one framed block holding `raw` (1..=MAX_BLOCK bytes) to `out`.
    pub(crate) fn block(&mut self, raw: &[u8], out: &mut Vec<u8>) {
        debug_assert!(!raw.is_empty() && raw.len() <= MAX_BLOCK);
        if self.hash_blocks {
            self.crc.update(raw);
        }
        self.seen += raw.len() as u64;
        // MAX_BLOCK < 2^31, so both lengths fit the u32 fields with bit 31 free.
        let raw_len = raw.len() as u32;
        let compressed = match self.compression {
            Compression::Lz4 => {
                let bound = lz4_flex::block::get_maximum_output_size(raw.len());
                if self.scratch.len() < bound {
                    if self.scratch.is_empty() {
                        self.scratch = SPARE.take();
                    }
                    if self.scratch.len() < bound {
                        self.scratch.resize(bound, 0);
                    }
                }
                match lz4_flex::block::compress_into(raw, &mut self.scratch) {
                    Ok(n) if n < raw.len() => Some(&self.scratch[..n]),
                    _ => None,
                }
            }
            Compression::None => None,
        };
        let (stored_field, body) = match compressed {
            Some(body) => (body.len() as u32, body),
            None => (raw_len | UNCOMPRESSED_BIT, raw),
        };
        out.reserve(8 + body.len());
        out.extend_from_slice(&raw_len.to_le_bytes());
        out.extend_from_slice(&stored_field.to_le_bytes());
        out.extend_from_slice(body);
    }

    /// Appends the trailer. Fails when the blocks did not add up to the announced length, which
    /// means the source changed size while it was being read.
    pub(crate) fn finish(self, out: &mut Vec<u8>) -> Result<Checksum, LengthMismatch> {
        if self.seen != self.content_length {
            return Err(LengthMismatch {
                announced: self.content_length,
                written: self.seen,
            });
        }
        let crc = self.crc.clone().finalize();
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(Checksum(crc))
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        SPARE.keep(&mut self.scratch);
    }
}

/// The content handed to an [`Encoder`] was not as long as its header said.
#[derive(Debug, thiserror::Error)]
#[error("content length changed while encoding: announced {announced} bytes, got {written}")]
pub(crate) struct LengthMismatch {
    pub(crate) announced: u64,
    pub(crate) written: u64,
}

/// Encodes a whole in-memory buffer; for small objects such as the repository identity.
pub(crate) fn encode_all(compression: Compression, content: &[u8]) -> Vec<u8> {
    let mut enc = Encoder::new(compression, content.len() as u64);
    let mut out = enc.header().to_vec();
    for chunk in content.chunks(MAX_BLOCK) {
        enc.block(chunk, &mut out);
    }
    // The blocks are exactly `content`, so the length always matches.
    let _ = enc.finish(&mut out);
    out
}

/// Reads an object from a stream, yielding verified-length blocks of content; the content checksum
/// is checked when the end marker is reached, so callers must not treat the content as good until
/// [`Decoder::next_block`] has returned `Ok(None)`.
pub(crate) struct Decoder<R> {
    reader: R,
    object: String,
    header: Header,
    seen: u64,
    crc: crc32fast::Hasher,
    stored: Vec<u8>,
    raw: Vec<u8>,
    checksum: Option<Checksum>,
}

impl<R: AsyncRead + Unpin> Decoder<R> {
    /// Reads and checks the header. `object` names the object in every error.
    pub(crate) async fn new(mut reader: R, object: &str) -> Result<Self, CodecError> {
        let mut h = [0u8; HEADER_LEN];
        read_exact(&mut reader, &mut h, object, "header").await?;
        let raw = RawHeader::parse(&h, object)?;
        let compression = Compression::from_code(raw.compression).ok_or_else(|| {
            CodecError::corrupt(
                object,
                format!("unknown compression code {}", raw.compression),
            )
        })?;
        // Encrypted objects are opened by `repo::crypt` first; what it hands on is plain.
        if raw.encryption != ENCRYPTION_NONE {
            return Err(CodecError::corrupt(
                object,
                format!(
                    "encryption code {} where a plain object was expected",
                    raw.encryption
                ),
            ));
        }
        let content_length = raw.value;
        Ok(Decoder {
            reader,
            object: object.to_owned(),
            header: Header {
                compression,
                content_length,
            },
            seen: 0,
            crc: crc32fast::Hasher::new(),
            stored: Vec::new(),
            raw: Vec::new(),
            checksum: None,
        })
    }

    pub(crate) fn header(&self) -> Header {
        self.header
    }

    /// The next block of content, or `None` once the whole object has been read and verified.
    pub(crate) async fn next_block(&mut self) -> Result<Option<&[u8]>, CodecError> {
        if self.checksum.is_some() {
            return Ok(None);
        }
        let mut frame = [0u8; 4];
        read_exact(&mut self.reader, &mut frame, &self.object, "block header").await?;
        let raw_len = u32::from_le_bytes(frame) as usize;
        if raw_len == 0 {
            return self.finish().await.map(|_| None);
        }
        if raw_len > MAX_BLOCK {
            return Err(self.corrupt(format!("block of {raw_len} bytes exceeds the maximum")));
        }
        if self.seen + raw_len as u64 > self.header.content_length {
            return Err(self.corrupt(format!(
                "content is longer than the {} bytes the header announces",
                self.header.content_length
            )));
        }
        read_exact(&mut self.reader, &mut frame, &self.object, "block header").await?;
        let stored_field = u32::from_le_bytes(frame);
        let uncompressed = stored_field & UNCOMPRESSED_BIT != 0;
        let stored_len = (stored_field & !UNCOMPRESSED_BIT) as usize;
        if (uncompressed && stored_len != raw_len)
            || stored_len > lz4_flex::block::get_maximum_output_size(raw_len)
        {
            return Err(self.corrupt(format!(
                "block framing is inconsistent (raw {raw_len}, stored {stored_len})"
            )));
        }
        if self.stored.capacity() == 0 {
            (self.stored, self.raw) = (SPARE.take(), SPARE.take());
        }
        self.stored.resize(stored_len, 0);
        read_exact(&mut self.reader, &mut self.stored, &self.object, "block").await?;
        self.raw.resize(raw_len, 0);
        if uncompressed {
            self.raw.copy_from_slice(&self.stored);
        } else {
            if self.header.compression != Compression::Lz4 {
                return Err(self.corrupt("compressed block in an uncompressed object"));
            }
            match lz4_flex::block::decompress_into(&self.stored, &mut self.raw) {
                Ok(n) if n == raw_len => {}
                _ => return Err(self.corrupt("block does not decompress")),
            }
        }
        self.crc.update(&self.raw);
        self.seen += raw_len as u64;
        Ok(Some(&self.raw))
    }

    /// The content checksum, once the object has been read to its end.
    pub(crate) fn checksum(&self) -> Option<Checksum> {
        self.checksum
    }

    async fn finish(&mut self) -> Result<(), CodecError> {
        if self.seen != self.header.content_length {
            return Err(self.corrupt(format!(
                "content is {} bytes, the header announces {}",
                self.seen, self.header.content_length
            )));
        }
        let mut crc = [0u8; 4];
        read_exact(&mut self.reader, &mut crc, &self.object, "trailer").await?;
        let stored = Checksum(u32::from_le_bytes(crc));
        let computed = Checksum(self.crc.clone().finalize());
        if stored != computed {
            return Err(self.corrupt(format!(
                "checksum mismatch: stored {stored}, content has {computed}"
            )));
        }
        let mut extra = [0u8; 1];
        match self.reader.read(&mut extra).await {
            Ok(0) => {}
            Ok(_) => return Err(self.corrupt("unexpected bytes after the trailer")),
            Err(source) => {
                return Err(CodecError::Io {
                    object: self.object.clone(),
                    source,
                })
            }
        }
        self.checksum = Some(computed);
        Ok(())
    }

    fn corrupt(&self, problem: impl Into<String>) -> CodecError {
        CodecError::corrupt(&self.object, problem)
    }
}

impl<R> Drop for Decoder<R> {
    fn drop(&mut self) {
        SPARE.keep(&mut self.stored);
        SPARE.keep(&mut self.raw);
    }
}

/// Decodes a whole object into memory.
#[cfg(test)]
pub(crate) async fn decode_all<R: AsyncRead + Unpin>(
    reader: R,
    object: &str,
) -> Result<Vec<u8>, CodecError> {
    let mut dec = Decoder::new(reader, object).await?;
    let mut out = Vec::new();
    while let Some(block) = dec.next_block().await? {
        out.extend_from_slice(block);
    }
    Ok(out)
}

pub(crate) async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    object: &str,
    what: &str,
) -> Result<(), CodecError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(CodecError::corrupt(
            object,
            format!("truncated (ends inside the {what})"),
        )),
        Err(source) => Err(CodecError::Io {
            object: object.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        // Half compressible text, half pseudo-random bytes, so both block kinds occur.
        let mut v = Vec::with_capacity(len);
        let mut x: u32 = 12345;
        for i in 0..len {
            if (i / 4096) % 2 == 0 {
                v.push(b"walvault "[i % 9]);
            } else {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                v.push((x >> 16) as u8);
            }
        }
        v
    }

    async fn decode(bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        decode_all(bytes, "test/object").await
    }

    #[tokio::test]
    async fn round_trips_for_every_compression_and_size() {
        for compression in [Compression::Lz4, Compression::None] {
            for len in [
                0,
                1,
                100,
                MAX_BLOCK - 1,
                MAX_BLOCK,
                MAX_BLOCK + 1,
                3 * MAX_BLOCK + 17,
            ] {
                let content = sample(len);
                let stored = encode_all(compression, &content);
                let mut dec = Decoder::new(&stored[..], "o").await.unwrap();
                assert_eq!(dec.header().content_length, len as u64);
                assert_eq!(dec.header().compression, compression);
                let mut out = Vec::new();
                while let Some(b) = dec.next_block().await.unwrap() {
                    out.extend_from_slice(b);
                }
                assert_eq!(out, content, "{compression} {len}");
                assert_eq!(dec.checksum(), Some(Checksum::of(&content)));
            }
        }
    }

    #[tokio::test]
    async fn lz4_shrinks_compressible_content() {
        let content = vec![7u8; 4 * MAX_BLOCK];
        assert!(encode_all(Compression::Lz4, &content).len() < content.len() / 50);
    }

    #[tokio::test]
    async fn every_flipped_byte_is_detected() {
        let content = sample(3000);
        for compression in [Compression::Lz4, Compression::None] {
            let stored = encode_all(compression, &content);
            for i in 0..stored.len() {
                let mut bad = stored.clone();
                bad[i] ^= 0x40;
                let err = decode(&bad).await.expect_err("corruption must be detected");
                assert!(err.to_string().starts_with("object test/object:"), "{err}");
            }
        }
    }

    #[tokio::test]
    async fn truncation_and_trailing_garbage_are_detected() {
        let stored = encode_all(Compression::Lz4, &sample(MAX_BLOCK + 5000));
        for cut in [
            0,
            3,
            HEADER_LEN,
            HEADER_LEN + 5,
            stored.len() / 2,
            stored.len() - 1,
        ] {
            let err = decode(&stored[..cut]).await.unwrap_err();
            assert!(err.to_string().contains("truncated"), "{cut}: {err}");
        }
        let mut longer = stored.clone();
        longer.push(0);
        let err = decode(&longer).await.unwrap_err();
        assert!(err.to_string().contains("after the trailer"), "{err}");
    }

    #[tokio::test]
    async fn foreign_files_are_refused_by_magic() {
        let err = decode(b"\x10\xd1\x02\x00 this is WAL, not an object")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
    }

    #[test]
    fn encoder_reports_a_source_that_changed_size() {
        let mut enc = Encoder::new(Compression::Lz4, 10);
        let mut out = Vec::new();
        enc.block(b"12345", &mut out);
        let err = enc.finish(&mut out).unwrap_err();
        assert_eq!((err.announced, err.written), (10, 5));
    }

    #[test]
    fn a_precomputed_content_crc_encodes_the_same_object() {
        let content = sample(3 * MAX_BLOCK + 17);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&content);
        let mut enc = Encoder::with_content_crc(Compression::Lz4, content.len() as u64, crc);
        let mut out = enc.header().to_vec();
        for chunk in content.chunks(MAX_BLOCK) {
            enc.block(chunk, &mut out);
        }
        enc.finish(&mut out).unwrap();
        assert_eq!(out, encode_all(Compression::Lz4, &content));
    }

    #[test]
    fn checksum_displays_as_hex() {
        assert_eq!(Checksum(0xab).to_string(), "crc32:000000ab");
    }
}
