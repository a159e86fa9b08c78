//! Backup packs in the repository: the content of many file pieces framed as one object.
//!
//! backup-push fills a pack buffer, checksumming each piece as it reads it; storing the pack
//! frames it with that checksum (so no byte is hashed twice) on a blocking thread and commits it
//! only if absent. Readers get the content back verified, block by block.

use crc32fast::Hasher;

use super::codec::{CodecError, Decoder, Encoder, MAX_BLOCK};
use super::store::{Committed, ObjectReader, PutMode};
use super::{RepoError, Repository};

/// The content of one pack and the crc32 of that content, accumulated by its writer.
pub(crate) struct PackContent {
    pub(crate) bytes: Vec<u8>,
    pub(crate) crc: Hasher,
}

/// What storing a pack did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PackStored {
    pub(crate) committed: Committed,
    pub(crate) stored_len: u64,
}

impl Repository {
    /// Frames and stores `content` under `key` unless an object is there already. Hands the
    /// content buffer back emptied, so the caller can fill it again without a new allocation.
    pub(crate) async fn put_pack(
        &self,
        key: &str,
        content: PackContent,
    ) -> Result<(PackContent, PackStored), RepoError> {
        let compression = self.compression;
        let (content, encoded) = tokio::task::spawn_blocking(move || {
            let mut content = content;
            let crc = std::mem::replace(&mut content.crc, Hasher::new());
            let mut encoder =
                Encoder::with_content_crc(compression, content.bytes.len() as u64, crc);
            let mut out = encoder.header().to_vec();
            for block in content.bytes.chunks(MAX_BLOCK) {
                encoder.block(block, &mut out);
            }
            // The encoder was told the length of exactly these bytes, so it cannot mismatch.
            let finished = encoder.finish(&mut out).map(|_| out);
            content.bytes.clear();
            (content, finished)
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))?;
        let encoded = encoded.map_err(|e| RepoError::Encode {
            key: key.to_owned(),
            source: e,
        })?;
        let stored_len = encoded.len() as u64;
        let mut writer = self.store.writer(key)?;
        writer.write(encoded.into()).await?;
        let committed = writer.commit(PutMode::IfAbsent).await?;
        Ok((
            content,
            PackStored {
                committed,
                stored_len,
            },
        ))
    }
}

/// A stored pack being read: its content block by block, the content checksum verified when
/// the last block has been returned.
pub(crate) struct PackReader {
    decoder: Decoder<ObjectReader>,
}

impl PackReader {
    /// The next block of content; `None` once the whole content was read and verified.
    pub(crate) async fn next_block(&mut self) -> Result<Option<&[u8]>, CodecError> {
        self.decoder.next_block().await
    }
}

impl Repository {
    /// Opens the pack at `key` for reading; `None` when it is absent.
    pub(crate) async fn open_pack(&self, key: &str) -> Result<Option<PackReader>, RepoError> {
        let Some(reader) = self.store.get(key).await? else {
            return Ok(None);
        };
        Ok(Some(PackReader {
            decoder: Decoder::new(reader, key).await?,
        }))
    }
}
