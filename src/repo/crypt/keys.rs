//! Keys: recipients and identities read from configuration and key files (identity files only
//! their owner may read), their fingerprints, and what the repository's identity object records
//! about encryption, against which every writer is checked (fail closed).

use std::fmt;
use std::path::Path;

use age::x25519;
use sha2::Digest;

use super::{CryptError, MAX_RECIPIENTS};
use crate::config::EncryptionSettings;

/// Largest recipients or identity file read.
const MAX_KEY_FILE: u64 = 1 << 20;

/// The short name of a recipient: the first 8 bytes of the SHA-256 of its `age1...` text, in hex.
/// Recorded in clear beside encrypted objects, so errors and `verify` can name keys; it reveals
/// nothing of the key itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Fingerprint([u8; 8]);

impl Fingerprint {
    pub(super) fn from_bytes(bytes: [u8; 8]) -> Fingerprint {
        Fingerprint(bytes)
    }

    pub(super) fn bytes(&self) -> &[u8; 8] {
        &self.0
    }

    pub(super) fn of(recipient: &x25519::Recipient) -> Fingerprint {
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

/// A recipient string as a writer would use it; `Err` says why it is not one.
pub(crate) fn check_recipient(text: &str) -> Result<(), String> {
    parse_recipient(text).map(|_| ())
}

pub(super) fn parse_recipient(text: &str) -> Result<x25519::Recipient, String> {
    text.parse::<x25519::Recipient>()
        .map_err(|_| format!("{text:?} is not an age X25519 recipient (age1...)"))
}

/// The keys of one process: recipients to encrypt new objects to, identities to open old ones.
/// Identities are secrets: nothing here prints them, and they live only in memory.
pub(crate) struct Keys {
    pub(super) recipients: Vec<x25519::Recipient>,
    recipient_fps: Vec<Fingerprint>,
    pub(super) identities: Vec<x25519::Identity>,
    pub(super) identity_fps: Vec<Fingerprint>,
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
pub(in crate::repo) fn admits(
    recorded: &RecordedEncryption,
    keys: &Keys,
    repo: &str,
) -> Result<(), String> {
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
