//! Encryption at rest: age (X25519) around the object format, and the keys that open it.
//!
//! An encrypted object is a header in the codec's layout (encryption code 1, the number of key
//! fingerprints where a plain object has its length), the fingerprints of the recipients it was
//! encrypted to and their crc32, then an age file whose plaintext is a whole plain object; WAL
//! ends with a trailer of the content's length and crc32 (so that a writer holding only
//! recipients can tell an identical re-push from a conflict), written after the payload so the
//! segment is read once. The clear fields name keys and compare re-pushes; age authenticates the
//! content, and `verify` checks the trailer against it. `keys` loads keys and holds the
//! repository's record of them, `envelope` reads objects, `seal` writes them. Used by `repo` alone.

mod envelope;
mod keys;
mod seal;

use std::fmt;
use std::path::PathBuf;

use super::codec::Checksum;

pub(crate) use envelope::Envelope;
pub(super) use envelope::{open, read_clear, read_envelope};
pub(super) use keys::admits;
pub(crate) use keys::{check_recipient, EncryptionRecord, Fingerprint, Keys, RecordedEncryption};
pub(super) use seal::SealedWriter;

/// Most recipients one object may be encrypted to; bounds what a reader allocates for the list.
const MAX_RECIPIENTS: usize = 64;

/// A content length and crc32 recorded in clear beside an encrypted WAL object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClearContent {
    pub(crate) len: u64,
    pub(crate) checksum: Checksum,
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

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use age::x25519;

    use super::envelope::TRAILER_LEN;
    use super::keys::parse_recipient;
    use super::*;
    use crate::config::EncryptionSettings;
    use crate::repo::codec;
    use crate::repo::store::PutMode;

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
