//! Re-encryption after a key rotation: an object not encrypted to exactly the current recipients
//! is rewritten to them, content unchanged.
//!
//! The object is first read to its end and verified (so its length and checksum are known), then
//! streamed again into a new object under the same key, committed as a durable replace (readers
//! see the old object or the new one, each whole), and read back and compared. WAL is immutable
//! everywhere else; this is the one documented rewrite, and it changes encryption, never content.
//! Used by `walvault reencrypt`.

use bytes::Bytes;

use super::codec::{CodecError, Encoder};
use super::crypt::ClearContent;
use super::layout::ObjectKey;
use super::store::PutMode;
use super::{Fingerprint, RepoError, Repository};

/// What [`Repository::reencrypt`] did with one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Rewrite {
    /// Already encrypted to the current recipients (or the identity object, which stays plain).
    Current,
    /// Rewritten (or, in a dry run, to be rewritten); the keys it was encrypted to before, none
    /// for a plain object.
    Rewritten(Vec<Fingerprint>),
}

impl Repository {
    /// Rewrites `key` to the current recipients unless it is encrypted to them already; `None`
    /// when the object is absent.
    pub(crate) async fn reencrypt(
        &self,
        key: &str,
        dry_run: bool,
    ) -> Result<Option<Rewrite>, RepoError> {
        // The keys are in the head: no need to read the object to its trailer.
        let Some(envelope) = self.envelope(key, false).await? else {
            return Ok(None);
        };
        let mut before = envelope.map(|e| e.keys).unwrap_or_default();
        before.sort();
        let identity = ObjectKey::parse(key) == Some(ObjectKey::Identity);
        if identity || before == self.keys.recipient_fingerprints() {
            return Ok(Some(Rewrite::Current));
        }
        if dry_run {
            return Ok(Some(Rewrite::Rewritten(before)));
        }
        let Some(old) = self.verify(key).await? else {
            return Ok(None);
        };
        let wal = matches!(ObjectKey::parse(key), Some(ObjectKey::Wal(_)));

        let Some((mut decoder, _)) = self.decoder(key).await? else {
            return Ok(None);
        };
        let mut encoder = Encoder::new(decoder.header().compression, old.content_len);
        let mut writer = self.writer(key, wal).await?;
        writer
            .write(Bytes::copy_from_slice(&encoder.header()))
            .await?;
        while let Some(block) = decoder.next_block().await? {
            let mut out = Vec::with_capacity(block.len() / 2 + 16);
            encoder.block(block, &mut out);
            writer.write(out.into()).await?;
        }
        let mut trailer = Vec::with_capacity(8);
        let changed = |problem: String| {
            RepoError::Codec(CodecError::Corrupt {
                object: key.to_owned(),
                problem,
            })
        };
        let checksum = encoder
            .finish(&mut trailer)
            .map_err(|e| changed(format!("changed while it was rewritten: {e}")))?;
        if checksum != old.checksum {
            return Err(changed(format!(
                "changed while it was rewritten ({} before, {checksum} now); nothing was replaced",
                old.checksum
            )));
        }
        writer.write(trailer.into()).await?;
        let clear = ClearContent {
            len: old.content_len,
            checksum,
        };
        writer.commit(PutMode::Replace, clear).await?;
        let new = self.verify(key).await?;
        let same = new.as_ref().is_some_and(|n| {
            n.content_len == old.content_len
                && n.checksum == old.checksum
                && n.keys.as_deref() == Some(self.keys.recipient_fingerprints())
        });
        if !same {
            return Err(changed(
                "does not read back as written after it was rewritten".into(),
            ));
        }
        Ok(Some(Rewrite::Rewritten(before)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EncryptionSettings;
    use crate::repo::crypt::tests::identity_file;
    use crate::repo::{identity, local_with_keys_for_tests, WalContent};

    #[tokio::test]
    async fn objects_under_old_keys_are_rewritten_to_the_current_ones() {
        let dir = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let (old_id, old) = identity_file(keys.path(), "old");
        let (new_id, new) = identity_file(keys.path(), "new");
        let settings = |recipients: &[&str], identities: &[&std::path::Path]| EncryptionSettings {
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            recipients_file: None,
            identity_files: identities.iter().map(|p| p.to_path_buf()).collect(),
        };
        let before = local_with_keys_for_tests(dir.path(), settings(&[&old], &[]))
            .await
            .unwrap();
        let cluster = identity::Identity {
            system_identifier: 1,
            pg_major: 15,
            wal_segment_size: 1 << 24,
            created_at: "2026-11-30T00:00:00Z".into(),
        };
        identity::ensure(&before, &cluster, "test").await.unwrap();
        let name = "000000010000000000000001".parse().unwrap();
        let segment: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        before
            .store_wal(&name, WalContent::Bytes(&segment), |_| {})
            .await
            .unwrap();
        before
            .put_bytes("backups/x/manifest", b"{}", PutMode::IfAbsent)
            .await
            .unwrap();

        let after = local_with_keys_for_tests(dir.path(), settings(&[&new], &[&new_id, &old_id]))
            .await
            .unwrap();
        let key = "wal/000000010000000000000001";
        assert!(matches!(
            after.reencrypt(key, true).await.unwrap(),
            Some(Rewrite::Rewritten(_))
        ));
        for key in [key, "backups/x/manifest"] {
            let done = after.reencrypt(key, false).await.unwrap().unwrap();
            assert!(
                matches!(done, Rewrite::Rewritten(ref k) if k.len() == 1),
                "{key}"
            );
            assert_eq!(
                after.reencrypt(key, false).await.unwrap(),
                Some(Rewrite::Current)
            );
        }
        assert_eq!(
            after.reencrypt("repository", false).await.unwrap(),
            Some(Rewrite::Current)
        );
        // Readable with the new identity alone, content unchanged; a writer with only the new
        // recipient still compares a re-push by the envelope.
        let only_new = local_with_keys_for_tests(dir.path(), settings(&[], &[&new_id]))
            .await
            .unwrap();
        assert_eq!(only_new.get_bytes(key).await.unwrap().unwrap(), segment);
        let writer = local_with_keys_for_tests(dir.path(), settings(&[&new], &[]))
            .await
            .unwrap();
        let again = writer.store_wal(&name, WalContent::Bytes(&segment), |_| {});
        assert!(matches!(
            again.await.unwrap(),
            crate::repo::WalStored::Identical
        ));
    }
}
