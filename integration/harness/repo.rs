//! Repositories (a local directory or an S3 bucket), their walvault config files, and access to
//! the stored objects behind walvault's back.

use super::{s3, TestEnv};
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Local,
    /// The moto S3 server.
    S3,
    /// A one-node Garage store ([`super::garage`]).
    Garage,
}

/// A walvault config file's content. Values are TOML literals: use [`toml_str`] for strings.
#[derive(Clone, Debug, Default)]
pub struct ConfigFile {
    top: Vec<(String, String)>,
    s3: Vec<(String, String)>,
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn set_key(entries: &mut Vec<(String, String)>, key: &str, value: &str) {
    entries.retain(|(k, _)| k != key);
    entries.push((key.to_string(), value.to_string()));
}

impl ConfigFile {
    /// `repo = url`, lz4 compression.
    pub fn new(repo_url: &str) -> ConfigFile {
        ConfigFile::default()
            .set("repo", &toml_str(repo_url))
            .set("compression", &toml_str("lz4"))
    }

    /// A config for an S3 repository at `url` served by `endpoint` (path-style, test keys).
    pub fn s3(url: &str, endpoint: &str) -> ConfigFile {
        ConfigFile::new(url)
            .set_s3("endpoint", &toml_str(endpoint))
            .set_s3("region", &toml_str(s3::REGION))
            .set_s3("force_path_style", "true")
            .set_s3("access_key_id", &toml_str(s3::ACCESS_KEY))
            .set_s3("secret_access_key", &toml_str(s3::SECRET_KEY))
    }

    /// A config for an S3 repository at `url` on `server`, with its keys.
    pub fn s3_on(url: &str, server: &s3::S3Server) -> ConfigFile {
        let (id, secret) = server.keys();
        ConfigFile::s3(url, server.endpoint())
            .set_s3("access_key_id", &toml_str(id))
            .set_s3("secret_access_key", &toml_str(secret))
    }

    /// Sets a top-level key (replacing it).
    pub fn set(mut self, key: &str, toml_value: &str) -> Self {
        set_key(&mut self.top, key, toml_value);
        self
    }

    /// Sets a key of the `[s3]` table (replacing it).
    pub fn set_s3(mut self, key: &str, toml_value: &str) -> Self {
        set_key(&mut self.s3, key, toml_value);
        self
    }

    pub fn render(&self) -> String {
        let mut text: String = self
            .top
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        if !self.s3.is_empty() {
            text.push_str("\n[s3]\n");
            text.extend(self.s3.iter().map(|(k, v)| format!("{k} = {v}\n")));
        }
        text
    }
}

enum Location {
    Local(PathBuf),
    S3 {
        server: &'static s3::S3Server,
        bucket: String,
        prefix: String,
    },
}

/// A fresh, empty repository of one test, with its config file.
pub struct Repo {
    kind: RepoKind,
    url: String,
    location: Location,
    config: ConfigFile,
    config_path: PathBuf,
}

impl Repo {
    pub(crate) fn create(env: &TestEnv, kind: RepoKind) -> Repo {
        let (url, location, config) = match kind {
            RepoKind::Local => {
                let dir = env.mkdir("repo");
                let url = format!("file://{}", dir.display());
                (url.clone(), Location::Local(dir), ConfigFile::new(&url))
            }
            RepoKind::S3 | RepoKind::Garage => {
                let server = match kind {
                    RepoKind::Garage => super::garage::server(),
                    _ => s3::server(),
                };
                let bucket = server.new_bucket();
                let prefix = "cluster-a".to_string();
                let url = format!("s3://{bucket}/{prefix}");
                let config = ConfigFile::s3_on(&url, server);
                let location = Location::S3 {
                    server,
                    bucket,
                    prefix,
                };
                (url, location, config)
            }
        };
        let config_path = env.write_config("walvault.toml", &config);
        Repo {
            kind,
            url,
            location,
            config,
            config_path,
        }
    }

    pub fn kind(&self) -> RepoKind {
        self.kind
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The S3 endpoint (`http://host:port`) of an S3 repository.
    pub fn s3_endpoint(&self) -> Option<&str> {
        match &self.location {
            Location::S3 { server, .. } => Some(server.endpoint()),
            Location::Local(_) => None,
        }
    }

    /// The config file pointing at this repository.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The content of that config file, to derive variants from.
    pub fn config(&self) -> ConfigFile {
        self.config.clone()
    }

    /// Every stored key relative to the repository root (`repository`, `wal/...`), temporary
    /// files included, sorted.
    pub fn keys(&self) -> Vec<String> {
        match &self.location {
            Location::Local(dir) => {
                let mut keys = Vec::new();
                walk(dir, dir, &mut keys);
                keys.sort();
                keys
            }
            Location::S3 {
                server,
                bucket,
                prefix,
            } => server
                .list(bucket, &format!("{prefix}/"))
                .into_iter()
                .map(|k| k[prefix.len() + 1..].to_string())
                .collect(),
        }
    }

    /// The keys a reader sees: without temporary (dot-) files.
    pub fn objects(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| !k.split('/').any(|part| part.starts_with('.')))
            .collect()
    }

    /// Names of the WAL files stored under `wal/`.
    pub fn wal_files(&self) -> Vec<String> {
        self.objects()
            .iter()
            .filter_map(|k| k.strip_prefix("wal/").map(String::from))
            .collect()
    }

    pub fn read(&self, key: &str) -> Vec<u8> {
        match &self.location {
            Location::Local(dir) => {
                fs::read(dir.join(key)).unwrap_or_else(|e| panic!("read {key} in repository: {e}"))
            }
            Location::S3 {
                server,
                bucket,
                prefix,
            } => server.get(bucket, &format!("{prefix}/{key}")),
        }
    }

    /// Overwrites an object in place (a local file keeps its owner).
    pub fn write(&self, key: &str, data: Vec<u8>) {
        match &self.location {
            Location::Local(dir) => fs::write(dir.join(key), data)
                .unwrap_or_else(|e| panic!("write {key} in repository: {e}")),
            Location::S3 {
                server,
                bucket,
                prefix,
            } => server.put(bucket, &format!("{prefix}/{key}"), data),
        }
    }

    /// Stores `content` under `key` framed as walvault frames objects (uncompressed blocks),
    /// written here independently of walvault's codec so tests can forge repository objects.
    pub fn put_object(&self, key: &str, content: &[u8]) {
        if let Location::Local(dir) = &self.location {
            let parent = dir.join(key).parent().unwrap().to_path_buf();
            fs::create_dir_all(&parent)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        self.write(key, frame_object(content, false));
    }

    /// For an S3 repository, the storage class and server-side encryption of an object.
    pub fn s3_head(&self, key: &str) -> Option<(Option<String>, Option<String>)> {
        match &self.location {
            Location::Local(_) => None,
            Location::S3 {
                server,
                bucket,
                prefix,
            } => Some(server.head(bucket, &format!("{prefix}/{key}"))),
        }
    }

    pub fn delete(&self, key: &str) {
        match &self.location {
            Location::Local(dir) => fs::remove_file(dir.join(key))
                .unwrap_or_else(|e| panic!("delete {key} in repository: {e}")),
            Location::S3 {
                server,
                bucket,
                prefix,
            } => server.delete(bucket, &format!("{prefix}/{key}")),
        }
    }

    /// Flips every bit of the byte at `offset` of an object, or of the first byte after it whose
    /// flip changes what the object holds: lz4 has slack (a match offset into a run of zeros copies
    /// the same zeros), so some flips inside a compressed block leave the content, and its
    /// checksum, as they were, and no reader could or should fail on them.
    pub fn corrupt(&self, key: &str, offset: usize) {
        let mut data = self.read(key);
        assert!(offset < data.len(), "{key} has only {} bytes", data.len());
        let at = (offset..data.len())
            .find(|&at| !lz4_slack(&data, at))
            .unwrap_or_else(|| panic!("no byte of {key} from {offset} on changes its content"));
        data[at] ^= 0xff;
        self.write(key, data);
    }

    /// Every key with the size and a hash of its content.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(
            self.keys()
                .into_iter()
                .map(|key| {
                    let data = self.read(&key);
                    let mut hasher = DefaultHasher::new();
                    data.hash(&mut hasher);
                    (key, (data.len(), hasher.finish()))
                })
                .collect(),
        )
    }
}

/// An object in walvault's format: header (magic, version 1, compression none or lz4, no
/// encryption, content length, header crc32), blocks of at most 1 MiB (stored uncompressed, bit 31
/// of the stored length, unless `lz4`), end marker and content crc32.
pub fn frame_object(content: &[u8], lz4: bool) -> Vec<u8> {
    let mut out = b"WVLT".to_vec();
    out.extend_from_slice(&[1, u8::from(lz4), 0, 0]);
    out.extend_from_slice(&(content.len() as u64).to_le_bytes());
    let header_crc = crc32fast::hash(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    for block in content.chunks(1 << 20) {
        let (stored, flag) = if lz4 {
            (lz4_flex::block::compress(block), 0)
        } else {
            (block.to_vec(), 1 << 31)
        };
        out.extend_from_slice(&(block.len() as u32).to_le_bytes());
        out.extend_from_slice(&(stored.len() as u32 | flag).to_le_bytes());
        out.extend_from_slice(&stored);
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(content).to_le_bytes());
    out
}

/// The content of an object in walvault's format (unencrypted; blocks stored plain or lz4),
/// the reverse of [`frame_object`], for tests that inspect what walvault stored.
pub fn object_content(framed: &[u8]) -> Vec<u8> {
    assert_eq!(&framed[..4], b"WVLT", "not a walvault object");
    assert_eq!(framed[6], 0, "encrypted object");
    blocks(framed).flat_map(|block| block.content()).collect()
}

/// Whether flipping the byte at `at` of an object leaves its content as it was: true only inside
/// an lz4 block of an unencrypted object whose decoding the flip does not change (any flipped
/// byte of an encrypted object fails its authentication).
pub fn lz4_slack(framed: &[u8], at: usize) -> bool {
    if framed[6] != 0 {
        return false;
    }
    let Some(block) = blocks(framed).find(|b| b.start <= at && at < b.start + b.stored.len())
    else {
        return false;
    };
    if !block.compressed {
        return false;
    }
    let mut flipped = block.stored.to_vec();
    flipped[at - block.start] ^= 0xff;
    lz4_flex::block::decompress(&flipped, block.raw).ok() == Some(block.content())
}

/// One block of a framed object: where its stored bytes start, and how to read them.
struct Block<'a> {
    start: usize,
    raw: usize,
    compressed: bool,
    stored: &'a [u8],
}

impl Block<'_> {
    fn content(&self) -> Vec<u8> {
        if self.compressed {
            lz4_flex::block::decompress(self.stored, self.raw).expect("lz4 block")
        } else {
            self.stored.to_vec()
        }
    }
}

/// The blocks of an unencrypted framed object, up to its end marker.
fn blocks(framed: &[u8]) -> impl Iterator<Item = Block<'_>> {
    let u32_at = |at: usize| u32::from_le_bytes(framed[at..at + 4].try_into().unwrap());
    let mut at = 20;
    std::iter::from_fn(move || {
        let raw = u32_at(at) as usize;
        if raw == 0 {
            return None;
        }
        let stored = u32_at(at + 4);
        let len = (stored & !(1 << 31)) as usize;
        let block = Block {
            start: at + 8,
            raw,
            compressed: stored & 1 << 31 == 0,
            stored: &framed[at + 8..at + 8 + len],
        };
        at += 8 + len;
        Some(block)
    })
}

fn walk(root: &Path, dir: &Path, keys: &mut Vec<String>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(root, &path, keys);
        } else {
            let key = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            keys.push(key);
        }
    }
}

/// The repository's content at one moment: key -> (size, content hash).
#[derive(PartialEq, Eq)]
pub struct Snapshot(BTreeMap<String, (usize, u64)>);

impl Snapshot {
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Panics, listing the differences, unless `now` equals `self`.
    pub fn assert_unchanged(&self, now: &Snapshot, after: &str) {
        assert!(
            self == now,
            "repository changed after {after}:\n{}",
            SnapshotDiff(self, now)
        );
    }
}

struct SnapshotDiff<'a>(&'a Snapshot, &'a Snapshot);

impl fmt::Display for SnapshotDiff<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (before, after) = (&self.0 .0, &self.1 .0);
        for (key, value) in before {
            match after.get(key) {
                None => writeln!(f, "  removed: {key}")?,
                Some(v) if v != value => {
                    writeln!(f, "  changed: {key} ({} -> {} bytes)", value.0, v.0)?
                }
                Some(_) => {}
            }
        }
        for key in after.keys().filter(|k| !before.contains_key(*k)) {
            writeln!(f, "  added:   {key}")?;
        }
        Ok(())
    }
}
