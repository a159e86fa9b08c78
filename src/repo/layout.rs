//! The repository's key layout: the only place that knows where each kind of object lives.
//!
//! Every key is built by a typed constructor here and every listed key is told apart by
//! [`ObjectKey::parse`], so retention, verify and status see every kind of object without
//! matching strings of their own. Names taken from keys are checked here, before anything uses
//! them: a listed key is repository content, and repository content is untrusted input.

use std::fmt;

use serde::{Deserialize, Serialize};
use walvault_wal::{Lsn, SegmentName, WalFileName};

/// The identity object: which cluster the repository holds.
const IDENTITY: &str = "repository";
/// One object per archived WAL file: `wal/<WAL file name>`.
const WAL: &str = "wal/";
/// Segment summaries: `walsummary/<segment>`.
const SUMMARY: &str = "walsummary/";
/// Fragments of segments being streamed: `stream/<segment>/<start>-<end>`.
const STREAM: &str = "stream/";
/// Base backups: `backups/<name>/manifest` and `backups/<name>/packs/<NNNNNN>`.
const BACKUPS: &str = "backups/";
const MANIFEST: &str = "manifest";
const PACKS: &str = "packs/";
const PAGE_SUMS: &str = "pagesums/";
/// A backup's pin: `backups/<name>/keep`, present while retention must keep the backup.
const PIN: &str = "keep";
/// The lock that makes `delete` runs take turns.
const RETENTION_LOCK: &str = "locks/retention";
/// The derived status object: the newest archived segment and its last transaction end.
const STATUS_WAL: &str = "status/wal";
/// Restore drill reports: `drills/<time>`.
const DRILLS: &str = "drills/";

/// A prefix to list: the kinds of object that are listed by group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listing<'a> {
    /// Every object of the repository.
    Everything,
    /// Every archived WAL file.
    Wal,
    /// Every fragment of every streamed segment.
    Fragments,
    /// The fragments of one segment.
    FragmentsOf(&'a SegmentName),
    /// Every object of every backup.
    Backups,
    /// Every segment summary.
    Summaries,
}

impl Listing<'_> {
    /// The key prefix that lists this group.
    pub(crate) fn prefix(&self) -> String {
        match self {
            Listing::Everything => String::new(),
            Listing::Wal => WAL.to_owned(),
            Listing::Fragments => STREAM.to_owned(),
            Listing::FragmentsOf(seg) => format!("{STREAM}{seg}/"),
            Listing::Backups => BACKUPS.to_owned(),
            Listing::Summaries => SUMMARY.to_owned(),
        }
    }
}

/// What a key names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ObjectKey {
    Identity,
    Wal(WalFileName),
    Summary(SegmentName),
    /// Bytes `start..end` of a segment being streamed.
    Fragment {
        seg: SegmentName,
        start: u64,
        end: u64,
    },
    Manifest(BackupName),
    Pack(BackupName, PackId),
    /// The page checksums of a pack's pieces (`backup::pagesums`).
    PageSums(BackupName, PackId),
    /// The backup is pinned: retention keeps it (and its chain) whatever the policy.
    Pin(BackupName),
    /// Held by the `delete` that is running (retention).
    RetentionLock,
    /// The derived status object (`status/wal`).
    StatusWal,
    /// A restore drill's report.
    Drill(DrillTime),
}

impl ObjectKey {
    /// The key this object is stored under.
    pub(crate) fn key(&self) -> String {
        match self {
            ObjectKey::Identity => IDENTITY.to_owned(),
            ObjectKey::Wal(name) => format!("{WAL}{name}"),
            ObjectKey::Summary(seg) => format!("{SUMMARY}{seg}"),
            ObjectKey::Fragment { seg, start, end } => {
                format!("{STREAM}{seg}/{start:08X}-{end:08X}")
            }
            ObjectKey::Manifest(name) => format!("{BACKUPS}{name}/{MANIFEST}"),
            ObjectKey::Pack(name, id) => format!("{BACKUPS}{name}/{PACKS}{:06}", id.0),
            ObjectKey::PageSums(name, id) => format!("{BACKUPS}{name}/{PAGE_SUMS}{:06}", id.0),
            ObjectKey::Pin(name) => format!("{BACKUPS}{name}/{PIN}"),
            ObjectKey::RetentionLock => RETENTION_LOCK.to_owned(),
            ObjectKey::StatusWal => STATUS_WAL.to_owned(),
            ObjectKey::Drill(time) => format!("{DRILLS}{}", time.0),
        }
    }

    /// What `key` names; `None` for a key walvault never writes.
    pub(crate) fn parse(key: &str) -> Option<ObjectKey> {
        if key == IDENTITY {
            return Some(ObjectKey::Identity);
        }
        if key == RETENTION_LOCK {
            return Some(ObjectKey::RetentionLock);
        }
        if key == STATUS_WAL {
            return Some(ObjectKey::StatusWal);
        }
        if let Some(time) = key.strip_prefix(DRILLS) {
            return DrillTime::parse(time).map(ObjectKey::Drill);
        }
        if let Some(name) = key.strip_prefix(WAL) {
            return name.parse().ok().map(ObjectKey::Wal);
        }
        if let Some(seg) = key.strip_prefix(SUMMARY) {
            return seg.parse().ok().map(ObjectKey::Summary);
        }
        if let Some(rest) = key.strip_prefix(STREAM) {
            let (seg, range) = rest.split_once('/')?;
            let (start, end) = range.split_once('-')?;
            let hex = |s: &str| {
                (s.len() == 8)
                    .then(|| u64::from_str_radix(s, 16).ok())
                    .flatten()
            };
            let (start, end) = (hex(start)?, hex(end)?);
            return (start < end).then_some(ObjectKey::Fragment {
                seg: seg.parse().ok()?,
                start,
                end,
            });
        }
        let rest = key.strip_prefix(BACKUPS)?;
        let (name, what) = rest.split_once('/')?;
        let name = BackupName::parse(name).ok()?;
        if what == MANIFEST {
            return Some(ObjectKey::Manifest(name));
        }
        if what == PIN {
            return Some(ObjectKey::Pin(name));
        }
        let pack_id = |id: &str| {
            (id.len() >= 6 && id.bytes().all(|b| b.is_ascii_digit()))
                .then(|| id.parse().ok().map(PackId))
                .flatten()
        };
        if let Some(id) = what.strip_prefix(PAGE_SUMS) {
            return Some(ObjectKey::PageSums(name, pack_id(id)?));
        }
        Some(ObjectKey::Pack(name, pack_id(what.strip_prefix(PACKS)?)?))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// Where the identity object is stored.
pub(crate) fn identity() -> String {
    ObjectKey::Identity.key()
}

/// Where a WAL file is stored.
pub(crate) fn wal(name: &WalFileName) -> String {
    ObjectKey::Wal(*name).key()
}

/// Where a segment is stored whole.
pub(crate) fn segment(seg: &SegmentName) -> String {
    ObjectKey::Wal(WalFileName::Segment(*seg)).key()
}

/// Where the summary of a segment is stored.
pub(crate) fn summary(seg: &SegmentName) -> String {
    ObjectKey::Summary(*seg).key()
}

/// Where bytes `start..end` of a streamed segment are stored.
pub(crate) fn fragment(seg: &SegmentName, start: u64, end: u64) -> String {
    ObjectKey::Fragment {
        seg: *seg,
        start,
        end,
    }
    .key()
}

/// A backup's name: `base_<start time UTC>_<timeline>_<start LSN>` (hex), so names sort by start
/// time and two backups never share one (each `pg_backup_start` takes a new checkpoint). Parsed
/// names (typed, listed or read from a manifest) cannot leave their directory of the repository.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub(crate) struct BackupName(String);

/// A backup name that walvault would not have written.
#[derive(Debug, thiserror::Error)]
#[error("backup name {0:?}: expected base_<time>_<timeline>_<LSN>")]
pub(crate) struct InvalidBackupName(pub(crate) String);

/// The longest backup name accepted (walvault's own are 48 bytes).
const MAX_BACKUP_NAME: usize = 128;

impl BackupName {
    pub(crate) fn new(start_time_compact: &str, timeline: u32, start_lsn: Lsn) -> BackupName {
        BackupName(format!(
            "base_{start_time_compact}_{timeline:08X}_{:016X}",
            start_lsn.0
        ))
    }

    /// Accepts a name typed by a user or found in a key or a manifest.
    pub(crate) fn parse(text: &str) -> Result<BackupName, InvalidBackupName> {
        let ok = text.starts_with("base_")
            && text.len() <= MAX_BACKUP_NAME
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(BackupName(text.to_owned()))
        } else {
            Err(InvalidBackupName(text.to_owned()))
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn manifest_key(&self) -> String {
        ObjectKey::Manifest(self.clone()).key()
    }

    pub(crate) fn pack_key(&self, pack: PackId) -> String {
        ObjectKey::Pack(self.clone(), pack).key()
    }

    pub(crate) fn page_sums_key(&self, pack: PackId) -> String {
        ObjectKey::PageSums(self.clone(), pack).key()
    }

    pub(crate) fn pin_key(&self) -> String {
        ObjectKey::Pin(self.clone()).key()
    }
}

impl TryFrom<String> for BackupName {
    type Error = InvalidBackupName;

    fn try_from(text: String) -> Result<BackupName, InvalidBackupName> {
        BackupName::parse(&text)
    }
}

impl From<BackupName> for String {
    fn from(name: BackupName) -> String {
        name.0
    }
}

impl fmt::Display for BackupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the derived status object is stored.
pub(crate) fn status_wal() -> String {
    ObjectKey::StatusWal.key()
}

/// When a drill started, as its key names it: `YYYYMMDDTHHMMSSZ` (UTC), so keys sort by time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct DrillTime(String);

impl DrillTime {
    pub(crate) fn new(time: crate::time::UnixMicros) -> DrillTime {
        DrillTime(time.compact())
    }

    /// Accepts only the form [`DrillTime::new`] writes.
    pub(crate) fn parse(text: &str) -> Option<DrillTime> {
        let b = text.as_bytes();
        let ok = b.len() == 16
            && b[8] == b'T'
            && b[15] == b'Z'
            && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
        ok.then(|| DrillTime(text.to_owned()))
    }

    pub(crate) fn key(&self) -> String {
        ObjectKey::Drill(self.clone()).key()
    }
}

impl fmt::Display for DrillTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The number of a pack object inside one backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct PackId(pub(crate) u32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_key_round_trips() {
        let seg: SegmentName = "00000002000000000000001A".parse().unwrap();
        let backup = BackupName::parse("base_20261121T113128Z_00000001_0000000006000028").unwrap();
        let keys = [
            ObjectKey::Identity,
            ObjectKey::Wal(WalFileName::Segment(seg)),
            ObjectKey::Wal("00000002.history".parse().unwrap()),
            ObjectKey::Summary(seg),
            ObjectKey::Fragment {
                seg,
                start: 0x2000,
                end: 0x3F10,
            },
            ObjectKey::Manifest(backup.clone()),
            ObjectKey::Pin(backup.clone()),
            ObjectKey::RetentionLock,
            ObjectKey::Pack(backup.clone(), PackId(7)),
            ObjectKey::PageSums(backup, PackId(7)),
            ObjectKey::StatusWal,
            ObjectKey::Drill(DrillTime::parse("20261130T091500Z").unwrap()),
        ];
        for key in keys {
            assert_eq!(ObjectKey::parse(&key.key()), Some(key.clone()), "{key}");
        }
        assert_eq!(
            fragment(&seg, 0x2000, 0x3F10),
            "stream/00000002000000000000001A/00002000-00003F10"
        );
        assert_eq!(
            ObjectKey::Pack(BackupName::parse("base_x").unwrap(), PackId(3)).key(),
            "backups/base_x/packs/000003"
        );
    }

    #[test]
    fn keys_walvault_never_writes_are_not_taken_for_objects() {
        for key in [
            "wal/notawal",
            "walsummary/x",
            "stream/x/zz-1",
            "stream/00000002000000000000001A/00000010-00000010",
            "stream/00000002000000000000001A/10-20",
            "backups/../manifest",
            "backups/base_a/packs/12",
            "backups/base_a/other",
            "repository2",
            "drills/x",
            "drills/20261130T091500",
            "drills/2026113aT091500Z",
            "status/wal2",
        ] {
            assert_eq!(ObjectKey::parse(key), None, "{key}");
        }
    }

    #[test]
    fn backup_names_cannot_leave_their_directory() {
        for bad in [
            "base_../x",
            "../base_x",
            "base_a/b",
            "other",
            &"base_".repeat(40),
        ] {
            assert!(BackupName::parse(bad).is_err(), "{bad}");
        }
        let json = serde_json::to_string("base_../../etc").unwrap();
        assert!(serde_json::from_str::<BackupName>(&json).is_err());
    }

    /// ARCHITECTURE.md's layout table shows one example key per line; each must be a key this
    /// module writes, and every kind must be shown.
    #[test]
    fn the_documented_layout_is_this_layout() {
        let doc = include_str!("../../ARCHITECTURE.md");
        let block = doc
            .split_once("<!-- layout -->")
            .and_then(|(_, rest)| rest.split_once("<!-- /layout -->"))
            .expect("ARCHITECTURE.md marks its layout table")
            .0;
        let mut shown = Vec::new();
        for line in block
            .lines()
            .filter(|l| !l.starts_with(' ') && !l.starts_with("```"))
        {
            let Some(key) = line.split_whitespace().next() else {
                continue;
            };
            let parsed = ObjectKey::parse(key);
            assert!(
                parsed.is_some(),
                "documented key {key} is not one walvault writes"
            );
            shown.push(std::mem::discriminant(&parsed.unwrap()));
        }
        let seg: SegmentName = "000000010000000000000001".parse().unwrap();
        let name = BackupName::parse("base_x").unwrap();
        for kind in [
            ObjectKey::Identity,
            ObjectKey::Wal(WalFileName::Segment(seg)),
            ObjectKey::Summary(seg),
            ObjectKey::Fragment {
                seg,
                start: 0,
                end: 1,
            },
            ObjectKey::Manifest(name.clone()),
            ObjectKey::Pin(name.clone()),
            ObjectKey::RetentionLock,
            ObjectKey::Pack(name.clone(), PackId(0)),
            ObjectKey::PageSums(name, PackId(0)),
            ObjectKey::StatusWal,
            ObjectKey::Drill(DrillTime::parse("20261130T091500Z").unwrap()),
        ] {
            assert!(
                shown.contains(&std::mem::discriminant(&kind)),
                "ARCHITECTURE.md does not show a key like {kind}"
            );
        }
    }
}
