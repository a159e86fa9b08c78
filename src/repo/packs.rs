//! Packs: objects whose content is many runs of bytes ("pieces") of backed-up files.
//!
//! backup-push fills a pack buffer, checksumming each piece as it reads it; storing the pack
//! frames it with that checksum (so no byte is hashed twice) on a blocking thread, only if absent.
//! A reader asks for the pieces it wants and gets them back in pack order, each checked against
//! its crc32, while the pack streams past a block at a time (the codec checks the framing and the
//! content checksum as it goes); memory is one block plus the pieces being assembled, so callers
//! bound it by bounding piece sizes. Used by backup-push and backup-fetch.

use std::collections::VecDeque;

use crc32fast::Hasher;

use super::codec::{CodecError, Decoder, Encoder, MAX_BLOCK};
use super::crypt::ClearContent;
use super::spare::Spare;
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
        let content_len = content.bytes.len() as u64;
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
            let finished = encoder.finish(&mut out).map(|checksum| (out, checksum));
            content.bytes.clear();
            (content, finished)
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))?;
        let (encoded, checksum) = encoded.map_err(|e| RepoError::Encode {
            key: key.to_owned(),
            source: e,
        })?;
        let mut writer = self.writer(key, false).await?;
        writer.write(encoded.into()).await?;
        let clear = ClearContent {
            len: content_len,
            checksum,
        };
        let (committed, stored_len) = writer.commit(PutMode::IfAbsent, clear).await?;
        // A retried PUT may meet the object its first attempt stored.
        let committed = self.settle(key, committed, content_len, checksum).await?;
        Ok((
            content,
            PackStored {
                committed,
                stored_len,
            },
        ))
    }
}

/// A run of a pack's content a caller wants: bytes `at..at + len`, whose crc32 is `crc32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WantedPiece {
    pub(crate) at: u64,
    pub(crate) len: u64,
    pub(crate) crc32: u32,
}

/// The wanted pieces of one pack, read in one pass.
pub(crate) struct PackPieces {
    key: String,
    decoder: Decoder<ObjectReader>,
    /// Indices into `wanted`, in pack order.
    order: Vec<usize>,
    wanted: Vec<WantedPiece>,
    /// Position in `order` of the piece being assembled.
    next: usize,
    /// Content offset of the next block.
    pos: u64,
    partial: Vec<u8>,
    ready: VecDeque<(usize, Vec<u8>)>,
    done: bool,
}

/// Buffers of pieces already written, for the next pieces to be assembled in: at most 2, of
/// at most a piece (8 MiB) each.
static SPARE: Spare = Spare::new(2);

/// Hands back the buffer of a piece [`PackPieces::next`] returned, once its bytes are written.
pub(crate) fn recycle_piece(mut buf: Vec<u8>) {
    buf.clear();
    SPARE.keep(&mut buf);
}

impl Repository {
    /// Opens pack `key` to read `wanted` (any order; the runs must not overlap and must lie in
    /// the content the pack's header announces, which is checked before any block is read).
    /// `None` when the pack is absent.
    pub(crate) async fn open_pack(
        &self,
        key: &str,
        wanted: Vec<WantedPiece>,
    ) -> Result<Option<PackPieces>, RepoError> {
        let Some((decoder, _)) = self.decoder(key).await? else {
            return Ok(None);
        };
        let content = decoder.header().content_length;
        let mut order: Vec<usize> = (0..wanted.len()).collect();
        order.sort_by_key(|&i| wanted[i].at);
        let mut end = 0;
        for &i in &order {
            let w = wanted[i];
            let Some(piece_end) = w.at.checked_add(w.len).filter(|e| *e <= content) else {
                return Err(corrupt(
                    key,
                    format!(
                        "holds {content} bytes, yet bytes {}..+{} are wanted from it",
                        w.at, w.len
                    ),
                ));
            };
            if w.at < end {
                return Err(corrupt(
                    key,
                    format!("wanted pieces overlap at byte {}", w.at),
                ));
            }
            end = piece_end;
        }
        Ok(Some(PackPieces {
            key: key.to_owned(),
            decoder,
            order,
            wanted,
            next: 0,
            pos: 0,
            partial: Vec::new(),
            ready: VecDeque::new(),
            done: false,
        }))
    }
}

fn corrupt(key: &str, problem: String) -> RepoError {
    RepoError::Codec(CodecError::Corrupt {
        object: key.to_owned(),
        problem,
    })
}

impl PackPieces {
    /// The next wanted piece in pack order, verified: its index in the wanted list and its bytes.
    /// `None` once every piece was handed over and the whole pack read and verified.
    pub(crate) async fn next(&mut self) -> Result<Option<(usize, Vec<u8>)>, RepoError> {
        loop {
            if let Some(piece) = self.ready.pop_front() {
                return Ok(Some(piece));
            }
            if self.done {
                return Ok(None);
            }
            self.read_block().await?;
        }
    }

    /// The index of the piece being assembled (or about to be), to name it in errors.
    pub(crate) fn pending(&self) -> Option<usize> {
        self.ready
            .front()
            .map(|(i, _)| *i)
            .or_else(|| self.order.get(self.next).copied())
    }

    /// Reads one block and moves every piece it completes to `ready`.
    async fn read_block(&mut self) -> Result<(), RepoError> {
        let Some(block) = self.decoder.next_block().await? else {
            self.done = true;
            if let Some(&i) = self.order.get(self.next) {
                // Ruled out by `open_pack` unless the content is shorter than its header says,
                // which the decoder reports first; kept so a bug cannot drop a piece silently.
                return Err(corrupt(
                    &self.key,
                    format!("ends before the bytes at {}", self.wanted[i].at),
                ));
            }
            return Ok(());
        };
        let (start, end) = (self.pos, self.pos + block.len() as u64);
        while let Some(&i) = self.order.get(self.next) {
            let w = self.wanted[i];
            let piece_end = w.at + w.len;
            if w.at >= end && w.len > 0 {
                break;
            }
            let (from, to) = (w.at.max(start), piece_end.min(end));
            if from < to {
                if self.partial.capacity() == 0 {
                    self.partial = SPARE.take();
                }
                // Both offsets lie inside this block, whose length is a usize.
                self.partial
                    .extend_from_slice(&block[(from - start) as usize..(to - start) as usize]);
            }
            if piece_end > end {
                break;
            }
            let bytes = std::mem::take(&mut self.partial);
            if crc32fast::hash(&bytes) != w.crc32 {
                return Err(corrupt(
                    &self.key,
                    format!("bytes {}..+{} do not match their checksum", w.at, w.len),
                ));
            }
            self.ready.push_back((i, bytes));
            self.next += 1;
        }
        self.pos = end;
        Ok(())
    }
}

impl Drop for PackPieces {
    fn drop(&mut self) {
        recycle_piece(std::mem::take(&mut self.partial));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::local_for_tests as repo;
    use crate::repo::store::PutMode;

    fn piece(content: &[u8], at: usize, len: usize) -> WantedPiece {
        WantedPiece {
            at: at as u64,
            len: len as u64,
            crc32: crc32fast::hash(&content[at..at + len]),
        }
    }

    /// Pieces spanning block boundaries come back whole, in pack order, with their index.
    #[tokio::test]
    async fn pieces_come_back_verified_in_pack_order() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path()).await;
        let content: Vec<u8> = (0..3 * super::super::codec::MAX_BLOCK + 10)
            .map(|i| (i % 251) as u8)
            .collect();
        repo.put_bytes("p", &content, PutMode::IfAbsent)
            .await
            .unwrap();
        let wanted = vec![
            piece(&content, 2_000_000, 1_100_000),
            piece(&content, 5, 1_048_600),
            piece(&content, content.len() - 3, 3),
        ];
        let mut pack = repo.open_pack("p", wanted.clone()).await.unwrap().unwrap();
        let mut got = Vec::new();
        while let Some((i, bytes)) = pack.next().await.unwrap() {
            let w = wanted[i];
            assert_eq!(bytes, content[w.at as usize..(w.at + w.len) as usize]);
            got.push(i);
        }
        assert_eq!(got, [1, 0, 2]);

        let mut bad = wanted.clone();
        bad[0].crc32 ^= 1;
        let mut pack = repo.open_pack("p", bad).await.unwrap().unwrap();
        let err = loop {
            match pack.next().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("a bad piece was handed over"),
                Err(e) => break e.to_string(),
            }
        };
        assert!(err.contains("do not match their checksum"), "{err}");
        assert_eq!(pack.pending(), Some(0));
    }

    #[tokio::test]
    async fn pieces_outside_the_content_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path()).await;
        repo.put_bytes("p", &[7u8; 100], PutMode::IfAbsent)
            .await
            .unwrap();
        for wanted in [
            vec![WantedPiece {
                at: 90,
                len: 11,
                crc32: 0,
            }],
            vec![WantedPiece {
                at: u64::MAX,
                len: 2,
                crc32: 0,
            }],
            vec![
                WantedPiece {
                    at: 0,
                    len: 10,
                    crc32: 0,
                },
                WantedPiece {
                    at: 9,
                    len: 10,
                    crc32: 0,
                },
            ],
        ] {
            assert!(repo.open_pack("p", wanted).await.is_err());
        }
        assert!(repo.open_pack("absent", vec![]).await.unwrap().is_none());
    }
}

#[cfg(test)]
mod retried_writes {
    use super::*;
    use crate::repo::local_for_tests as repo;

    fn pack(bytes: &[u8]) -> PackContent {
        let mut crc = Hasher::new();
        crc.update(bytes);
        PackContent {
            bytes: bytes.to_vec(),
            crc,
        }
    }

    /// A no-overwrite write that meets its own content (a retried PUT whose first attempt was
    /// stored but whose answer was lost) succeeds; one that meets other content does not.
    #[tokio::test]
    async fn a_write_that_meets_its_own_object_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path()).await;
        let first = repo.put_pack("packs/1", pack(b"pieces")).await.unwrap().1;
        assert_eq!(first.committed, Committed::Created);
        let again = repo.put_pack("packs/1", pack(b"pieces")).await.unwrap().1;
        assert_eq!(again.committed, Committed::Created);
        let other = repo.put_pack("packs/1", pack(b"others")).await.unwrap().1;
        assert_eq!(other.committed, Committed::AlreadyExists);

        for content in [&b"manifest"[..], b""] {
            let key = format!("m{}", content.len());
            let put = || repo.put_bytes(&key, content, PutMode::IfAbsent);
            assert_eq!(put().await.unwrap().committed, Committed::Created);
            assert_eq!(put().await.unwrap().committed, Committed::Created);
        }
        let differs = repo.put_bytes("m8", b"manifesT", PutMode::IfAbsent);
        assert_eq!(differs.await.unwrap().committed, Committed::AlreadyExists);
        // Something that is not an object at all is not "identical" either.
        std::fs::write(dir.path().join("junk"), b"not an object").unwrap();
        let junk = repo
            .put_bytes("junk", b"x", PutMode::IfAbsent)
            .await
            .unwrap();
        assert_eq!(junk.committed, Committed::AlreadyExists);
    }
}
