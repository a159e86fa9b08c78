//! The backup manifest: the one object that makes a set of stored packs a backup.
//!
//! Understands what a restore needs to rebuild a data directory without looking at anything
//! else: every directory and file (path, size, mode, and which byte ranges of which pack hold
//! its content), the tablespaces, `backup_label` and `tablespace_map` byte for byte, the start
//! and stop LSN, time and timeline, the cluster's version and system identifier, the type and
//! parent. It is JSON stored through the object codec under `backups/<name>/manifest` and
//! written last, only if absent: a backup without it does not exist. Used by push, fetch,
//! the catalog and verify.

use std::collections::{BTreeSet, HashSet};
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};
use walvault_wal::Lsn;

use super::external_config::{self, ExternalConfig};
use super::{BackupError, CHUNK, PACK_TARGET};

pub(crate) const FORMAT: u32 = 1;

pub(crate) use crate::repo::layout::{BackupName, PackId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BackupKind {
    Full,
    Delta,
}

impl BackupKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Delta => "delta",
        }
    }
}

/// LSNs are kept in PostgreSQL's `X/Y` text form in the JSON (also in segment summaries).
pub(crate) mod lsn_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use walvault_wal::Lsn;

    pub(crate) fn serialize<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(lsn)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The part of a manifest that describes the backup as a whole; the catalog reads only this.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) format: u32,
    pub(crate) name: BackupName,
    #[serde(rename = "type")]
    pub(crate) kind: BackupKind,
    pub(crate) parent: Option<BackupName>,
    /// The parent's start LSN: pages older than it were taken from the parent chain.
    #[serde(with = "lsn_text_opt", default)]
    pub(crate) delta_base_lsn: Option<Lsn>,
    /// Deltas since the full backup this one builds on (0 for a full backup).
    pub(crate) delta_depth: u32,
    pub(crate) start_time: String,
    pub(crate) stop_time: String,
    #[serde(with = "lsn_text")]
    pub(crate) start_lsn: Lsn,
    #[serde(with = "lsn_text")]
    pub(crate) stop_lsn: Lsn,
    pub(crate) timeline: u32,
    pub(crate) pg_version_num: u32,
    pub(crate) system_identifier: u64,
    pub(crate) wal_segment_size: u32,
    pub(crate) data_checksums: bool,
    /// Bytes of the files as they are in PGDATA.
    pub(crate) original_size: u64,
    /// Bytes stored for this backup (packs, before the manifest).
    pub(crate) stored_size: u64,
    pub(crate) packs: u32,
    pub(crate) page_checksum_failures: Vec<PageFailures>,
    /// How a delta learned what changed; absent for full backups and older manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) delta_source: Option<DeltaSource>,
    /// Whether every pack has a page sums object (`pagesums.rs`); absent in older manifests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) page_sums: bool,
}

/// How a delta backup found the pages to store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DeltaSource {
    /// From the block maps in the WAL's segment summaries: only changed blocks were read.
    Wal,
    /// By reading every page and comparing its LSN with the parent's start.
    Scan,
}

mod lsn_text_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use walvault_wal::Lsn;

    pub(crate) fn serialize<S: Serializer>(lsn: &Option<Lsn>, s: S) -> Result<S::Ok, S::Error> {
        match lsn {
            Some(lsn) => s.collect_str(lsn),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Lsn>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Pages of one file whose data checksum failed when read (the backup went on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PageFailures {
    pub(crate) path: String,
    pub(crate) blocks: Vec<u32>,
}

/// A whole manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Manifest {
    #[serde(flatten)]
    pub(crate) summary: Summary,
    /// `backup_label` as `pg_backup_stop` returned it.
    pub(crate) backup_label: String,
    /// `tablespace_map` as `pg_backup_stop` returned it (absent when empty).
    pub(crate) tablespace_map: Option<String>,
    pub(crate) tablespaces: Vec<Tablespace>,
    pub(crate) dirs: Vec<DirEntry>,
    pub(crate) files: Vec<FileEntry>,
    /// Configuration the source kept outside its data directory (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) external_config: Vec<ExternalConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Tablespace {
    pub(crate) oid: u32,
    pub(crate) location: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DirEntry {
    pub(crate) path: String,
    pub(crate) mode: u32,
}

/// How a file's content is stored in this backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Storage {
    /// Every byte is in this backup's pieces.
    Whole,
    /// Only changed pages are; the rest comes from the parent chain.
    Pages,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileEntry {
    pub(crate) path: String,
    pub(crate) size: u64,
    pub(crate) mode: u32,
    pub(crate) storage: Storage,
    /// crc32 of the file's content as read (all of it, pages taken from the parent included).
    pub(crate) crc32: u32,
    pub(crate) pieces: Vec<Piece>,
}

/// A run of a file's bytes stored in a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Piece {
    pub(crate) pack: PackId,
    /// Offset in the pack's content.
    pub(crate) at: u64,
    pub(crate) len: u64,
    /// Where the bytes go in the file.
    pub(crate) file_offset: u64,
    /// crc32 of these bytes, checked before they are written.
    pub(crate) crc32: u32,
}

impl Manifest {
    pub(crate) fn to_json(&self) -> Result<Vec<u8>, BackupError> {
        serde_json::to_vec(self).map_err(|e| BackupError::Invalid {
            what: format!("manifest of {}", self.summary.name),
            problem: e.to_string(),
        })
    }

    pub(crate) fn from_json(key: &str, bytes: &[u8]) -> Result<Manifest, BackupError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| BackupError::Invalid {
                what: format!("manifest {key}"),
                problem: e.to_string(),
            })?;
        manifest.summary.check_format(key)?;
        Ok(manifest)
    }
}

/// The longest path a manifest may name, in bytes (PostgreSQL's own limit, `MAXPGPATH`).
const MAX_PATH: usize = 1024;
/// The largest piece walvault writes (a file is read in chunks of [`CHUNK`]), so a restore
/// holds at most this much of one piece in memory.
pub(crate) const MAX_PIECE: u64 = CHUNK;
/// The most content a pack holds: it is closed once it reaches [`PACK_TARGET`], after at most
/// one more chunk.
pub(crate) const MAX_PACK_CONTENT: u64 = PACK_TARGET as u64 + CHUNK;

impl Manifest {
    /// Refuses anything in a manifest (repository content, so untrusted) that could make a
    /// restore write outside its target, hold unbounded memory or misplace bytes: paths that are
    /// not short, clean and relative, or named twice; tablespace locations that are not clean
    /// absolute paths; tablespace content outside its `PG_*` version directory; modes beyond
    /// permission bits; pieces larger than walvault writes, outside their file, their pack or
    /// the backup's packs, or overlapping in a pack.
    pub(crate) fn validate(&self) -> Result<(), BackupError> {
        let what = format!("manifest of {}", self.summary.name);
        let refuse = |problem: String| BackupError::invalid(&what, problem);
        let mut oids = HashSet::new();
        for ts in &self.tablespaces {
            let location = Path::new(&ts.location);
            let clean = location.is_absolute()
                && ts.location.len() <= MAX_PATH
                && !ts.location.contains('\0')
                && location
                    .components()
                    .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
            if !clean || location.parent().is_none() {
                return Err(refuse(format!(
                    "refusing tablespace {} at {:?}: not an absolute path below / without . or ..",
                    ts.oid, ts.location
                )));
            }
            if !oids.insert(ts.oid) {
                return Err(refuse(format!("tablespace {} is listed twice", ts.oid)));
            }
        }
        let mut seen = HashSet::new();
        let entries = self
            .dirs
            .iter()
            .map(|d| (d.path.as_str(), d.mode))
            .chain(self.files.iter().map(|f| (f.path.as_str(), f.mode)));
        for (path, mode) in entries {
            if !safe_relative(path) {
                return Err(refuse(format!(
                    "refusing path {:.100?}: absolute, over {MAX_PATH} bytes, or with NUL, empty, . or .. parts",
                    path
                )));
            }
            if let Some((_, inner)) = tablespace_content(path, |oid| oids.contains(&oid)) {
                if !inner.is_empty() && !inner.starts_with("PG_") {
                    return Err(refuse(format!(
                        "refusing path {path:?}: a tablespace holds only its PG_* version directory"
                    )));
                }
            }
            if mode & !0o7777 != 0 {
                return Err(refuse(format!(
                    "{path}: mode {mode:o} is not a permission mode"
                )));
            }
            if !seen.insert(path) {
                return Err(refuse(format!("{path} is listed twice")));
            }
        }
        let mut in_packs = BTreeSet::new();
        for file in &self.files {
            for piece in &file.pieces {
                let fits = piece.pack.0 < self.summary.packs
                    && piece.len <= MAX_PIECE
                    && piece
                        .at
                        .checked_add(piece.len)
                        .is_some_and(|end| end <= MAX_PACK_CONTENT)
                    && piece
                        .file_offset
                        .checked_add(piece.len)
                        .is_some_and(|end| end <= file.size);
                if !fits {
                    return Err(refuse(format!(
                        "{}: the piece of {} bytes at {} of pack {} (for offset {}) lies outside \
                         the file or the backup's packs, or is larger than walvault writes \
                         ({MAX_PIECE} bytes in packs of at most {MAX_PACK_CONTENT})",
                        file.path, piece.len, piece.at, piece.pack.0, piece.file_offset
                    )));
                }
                if piece.len > 0 {
                    in_packs.insert((piece.pack, piece.at, piece.len, file.path.as_str()));
                }
            }
        }
        let mut last: Option<(PackId, u64, &str)> = None;
        for (pack, at, len, path) in in_packs {
            if let Some((p, end, other)) = last {
                if p == pack && at < end {
                    return Err(refuse(format!(
                        "pieces of {other} and {path} overlap in pack {}",
                        pack.0
                    )));
                }
            }
            last = Some((pack, at + len, path));
        }
        external_config::validate(&self.external_config, &self.files).map_err(refuse)
    }
}

/// `path` is relative, not too long, and made of plain names only.
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// For a path inside `pg_tblspc/<oid>` where `<oid>` is a tablespace (`is_tablespace`), the OID
/// and its path inside the tablespace's directory (`""` for the link itself).
pub(crate) fn tablespace_content(
    path: &str,
    is_tablespace: impl Fn(u32) -> bool,
) -> Option<(u32, &str)> {
    let rest = path.strip_prefix("pg_tblspc/")?;
    let (oid, inner) = rest.split_once('/').unwrap_or((rest, ""));
    let oid = oid.parse().ok().filter(|oid| is_tablespace(*oid))?;
    Some((oid, inner))
}

impl Summary {
    pub(crate) fn from_json(key: &str, bytes: &[u8]) -> Result<Summary, BackupError> {
        let summary: Summary = serde_json::from_slice(bytes).map_err(|e| BackupError::Invalid {
            what: format!("manifest {key}"),
            problem: e.to_string(),
        })?;
        summary.check_format(key)?;
        Ok(summary)
    }

    fn check_format(&self, key: &str) -> Result<(), BackupError> {
        if self.format != FORMAT {
            return Err(BackupError::Invalid {
                what: format!("manifest {key}"),
                problem: format!(
                    "format {} is not one this walvault reads ({FORMAT})",
                    self.format
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A full backup's manifest named `name`, started at `start_time`, with no files.
    pub(crate) fn sample(name: &str, start_time: &str) -> Manifest {
        Manifest {
            summary: Summary {
                format: FORMAT,
                name: BackupName::parse(name).unwrap(),
                kind: BackupKind::Full,
                parent: None,
                delta_base_lsn: None,
                delta_depth: 0,
                start_time: start_time.into(),
                stop_time: start_time.into(),
                start_lsn: Lsn(0x100),
                stop_lsn: Lsn(0x200),
                timeline: 1,
                pg_version_num: 150000,
                system_identifier: 1,
                wal_segment_size: 16 << 20,
                data_checksums: false,
                original_size: 0,
                stored_size: 0,
                packs: 1,
                page_checksum_failures: vec![],
                delta_source: None,
                page_sums: false,
            },
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            dirs: vec![DirEntry {
                path: "base".into(),
                mode: 0o700,
            }],
            files: vec![],
            external_config: vec![],
        }
    }

    #[test]
    fn manifests_round_trip_with_text_lsns() {
        let mut m = sample(
            "base_20260101T000000Z_000000010000000000000001",
            "2026-01-01T00:00:00Z",
        );
        m.summary.kind = BackupKind::Delta;
        m.summary.delta_base_lsn = Some(Lsn(0x1_0000_0028));
        let json = m.to_json().unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(r#""type":"delta""#), "{text}");
        assert!(text.contains(r#""delta_base_lsn":"1/28""#), "{text}");
        let back = Manifest::from_json("k", &json).unwrap();
        assert_eq!(back.summary.delta_base_lsn, Some(Lsn(0x1_0000_0028)));
        assert!(Summary::from_json("k", &json).is_ok());
        for bad in ["base_../x", "other", "base_a/b"] {
            assert!(BackupName::parse(bad).is_err(), "{bad}");
        }
    }

    pub(crate) fn with_two_pieces() -> Manifest {
        let mut m = sample("base_x", "2026-01-01T00:00:00Z");
        let piece = |at, file_offset| Piece {
            pack: PackId(0),
            at,
            len: CHUNK,
            file_offset,
            crc32: 0,
        };
        m.files = vec![FileEntry {
            path: "base/1".into(),
            size: 2 * CHUNK,
            mode: 0o600,
            storage: Storage::Whole,
            crc32: 0,
            pieces: vec![piece(0, 0), piece(CHUNK, CHUNK)],
        }];
        m.tablespaces = vec![Tablespace {
            oid: 16390,
            location: "/srv/ts".into(),
        }];
        m.dirs.push(DirEntry {
            path: "pg_tblspc/16390".into(),
            mode: 0o700,
        });
        m.dirs.push(DirEntry {
            path: "pg_tblspc/16390/PG_15_202209061".into(),
            mode: 0o700,
        });
        m
    }

    /// Each forgery a manifest could carry, refused; the unforged manifest passes.
    #[test]
    fn forged_manifests_are_refused() {
        assert!(with_two_pieces().validate().is_ok());
        type Forge = fn(&mut Manifest);
        let forgeries: [(&str, Forge); 14] = [
            ("long path", |m| {
                m.files[0].path = format!("{}x", "a/".repeat(600))
            }),
            ("NUL", |m| m.files[0].path = "base/\0x".into()),
            ("path twice", |m| {
                m.dirs.push(DirEntry {
                    path: "base/1".into(),
                    mode: 0o700,
                })
            }),
            ("file type in mode", |m| m.files[0].mode = 0o100600),
            ("piece over the cap", |m| {
                m.files[0].size = 3 * CHUNK;
                m.files[0].pieces[1].len = CHUNK + 1;
            }),
            ("piece past the largest pack", |m| {
                m.files[0].pieces[1].at = MAX_PACK_CONTENT - 1
            }),
            ("piece offset overflows", |m| {
                m.files[0].pieces[1].at = u64::MAX
            }),
            ("file offset overflows", |m| {
                m.files[0].pieces[1].file_offset = u64::MAX
            }),
            ("piece past the file", |m| m.files[0].size = CHUNK),
            ("pieces overlap", |m| m.files[0].pieces[1].at = CHUNK - 1),
            ("pack beyond the backup's", |m| {
                m.files[0].pieces[1].pack = PackId(1)
            }),
            ("file in a tablespace beside PG_*", |m| {
                m.files[0].path = "pg_tblspc/16390/authorized_keys".into()
            }),
            ("tablespace at /", |m| {
                m.tablespaces[0].location = "/".into()
            }),
            ("tablespace twice", |m| {
                m.tablespaces.push(m.tablespaces[0].clone())
            }),
        ];
        for (what, forge) in forgeries {
            let mut m = with_two_pieces();
            forge(&mut m);
            assert!(m.validate().is_err(), "{what}: accepted");
        }
    }
}
