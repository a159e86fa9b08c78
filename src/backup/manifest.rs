//! The backup manifest: the one object that makes a set of stored packs a backup.
//!
//! Understands what a restore needs to rebuild a data directory without looking at anything
//! else: every directory and file (path, size, mode, and which byte ranges of which pack hold
//! its content), the tablespaces, `backup_label` and `tablespace_map` byte for byte, the start
//! and stop LSN, time and timeline, the cluster's version and system identifier, the type and
//! parent. It is JSON stored through the object codec under `backups/<name>/manifest` and
//! written last, only if absent: a backup without it does not exist. Used by push, fetch,
//! the catalog and verify.

use serde::{Deserialize, Serialize};
use walvault_wal::Lsn;

use super::BackupError;

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
            },
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            dirs: vec![DirEntry {
                path: "base".into(),
                mode: 0o700,
            }],
            files: vec![],
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
}
