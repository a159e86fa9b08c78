//! Walking PGDATA: which files a base backup copies, following PostgreSQL's documented rules.
//!
//! Understands the layout of a data directory: the directories whose *contents* an online backup
//! leaves out (`pg_wal`, `pg_replslot`, `pg_stat_tmp`, `pg_dynshmem`, `pg_notify`, `pg_serial`,
//! `pg_snapshots`, `pg_subtrans`), the files it leaves out (`postmaster.pid`, `postmaster.opts`,
//! `backup_label`, `tablespace_map`, `pg_internal.init*`, `pgsql_tmp*`, ...), unlogged relations
//! (every fork but `_init`) and temporary relations (`t<backend>_<relfilenode>`), and tablespaces
//! (`pg_tblspc/<oid>` links, walked through and recorded with their location). Files that vanish
//! while the walk runs are skipped: PostgreSQL drops files during an online backup and WAL
//! replay recreates what matters. Used by `push.rs`.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::BackupError;

/// Directories whose contents are never copied (the directory itself is).
const CONTENTS_EXCLUDED: &[&str] = &[
    "pg_wal",
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files at the top of PGDATA that are never copied. `backup_label` and `tablespace_map` come
/// from `pg_backup_stop` instead.
const TOP_FILES_EXCLUDED: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "backup_manifest",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
];

/// The default spool directory of wal-push and wal-fetch (see `crate::wal::spool`).
const SPOOL_DIR: &str = "walvault_spool";

/// One thing to back up, with its path relative to the backup root (`/`-separated; tablespace
/// contents under `pg_tblspc/<oid>/`).
#[derive(Clone, Debug)]
pub(crate) struct Found {
    pub(crate) path: String,
    pub(crate) source: PathBuf,
    pub(crate) mode: u32,
    /// `None` for a directory.
    pub(crate) size: Option<u64>,
}

/// A tablespace link found in `pg_tblspc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TablespaceLink {
    pub(crate) oid: u32,
    pub(crate) location: PathBuf,
}

/// The result of a walk.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    pub(crate) entries: Vec<Found>,
    pub(crate) tablespaces: Vec<TablespaceLink>,
}

/// How a file name reads as a relation segment file: `<relfilenode>[_<fork>][.<segno>]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RelFile<'a> {
    pub(crate) node: &'a str,
    pub(crate) fork: Fork,
    pub(crate) segno: u32,
    pub(crate) temp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fork {
    Main,
    Fsm,
    Vm,
    Init,
}

impl<'a> RelFile<'a> {
    /// Parses a file name; `None` for anything that is not a relation file.
    pub(crate) fn parse(name: &'a str) -> Option<RelFile<'a>> {
        let (temp, rest) = match name.strip_prefix('t') {
            Some(rest) => {
                let (backend, rest) = rest.split_once('_')?;
                if !all_digits(backend) {
                    return None;
                }
                (true, rest)
            }
            None => (false, name),
        };
        let (base, segno) = match rest.split_once('.') {
            Some((base, seg)) if all_digits(seg) => (base, seg.parse().ok()?),
            Some(_) => return None,
            None => (rest, 0),
        };
        let (node, fork) = match base.split_once('_') {
            Some((node, "fsm")) => (node, Fork::Fsm),
            Some((node, "vm")) => (node, Fork::Vm),
            Some((node, "init")) => (node, Fork::Init),
            Some(_) => return None,
            None => (base, Fork::Main),
        };
        if !all_digits(node) {
            return None;
        }
        Some(RelFile {
            node,
            fork,
            segno,
            temp,
        })
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether the file at backup path `path` holds WAL-logged data pages, so that a delta backup
/// may store only its changed pages. Free space maps are not WAL-logged page by page and are
/// always stored whole (they are small).
pub(crate) fn is_paged_relation(path: &str) -> bool {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    let in_db_dir = dir == "global" || is_database_dir(dir);
    in_db_dir && matches!(RelFile::parse(name), Some(r) if !r.temp && r.fork != Fork::Fsm)
}

/// Whether `path` is a visibility map fork: PostgreSQL clears its bits in place (heap deletes
/// and updates WAL-log only the heap page) without a new page LSN, so no page scan can tell
/// a changed map page, and a delta stores the map whole (one page covers 32768 heap pages).
pub(crate) fn is_visibility_map(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    matches!(RelFile::parse(name), Some(r) if r.fork == Fork::Vm)
}

/// The segment number of a relation file (`.N` suffix), for absolute block numbers.
pub(crate) fn segment_number(path: &str) -> u32 {
    let name = path.rsplit('/').next().unwrap_or(path);
    RelFile::parse(name).map(|r| r.segno).unwrap_or(0)
}

/// `base/<oid>` or `pg_tblspc/<oid>/<version dir>/<oid>`.
fn is_database_dir(dir: &str) -> bool {
    let parts: Vec<&str> = dir.split('/').collect();
    match parts.as_slice() {
        ["base", db] => all_digits(db),
        ["pg_tblspc", spc, _, db] => all_digits(spc) && all_digits(db),
        _ => false,
    }
}

/// Walks `pgdata`. `extra_excluded` holds absolute paths to leave out (a spool directory
/// configured inside PGDATA).
pub(crate) fn walk(pgdata: &Path, extra_excluded: &[PathBuf]) -> Result<Walk, BackupError> {
    let mut walk = Walk::default();
    let mut seen_dirs = HashSet::new();
    walk_dir(pgdata, "", extra_excluded, &mut walk, &mut seen_dirs)?;
    walk.entries.sort_by(|a, b| a.path.cmp(&b.path));
    walk.tablespaces.sort_by_key(|t| t.oid);
    Ok(walk)
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_owned()
    } else {
        format!("{rel}/{name}")
    }
}

fn walk_dir(
    dir: &Path,
    rel: &str,
    extra_excluded: &[PathBuf],
    walk: &mut Walk,
    seen_dirs: &mut HashSet<PathBuf>,
) -> Result<(), BackupError> {
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        // A database or relation directory dropped during the backup.
        Err(e) if e.kind() == ErrorKind::NotFound && !rel.is_empty() => return Ok(()),
        Err(e) => return Err(BackupError::io("read directory", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in listing {
        match entry {
            Ok(entry) => names.push(entry.file_name().to_string_lossy().into_owned()),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(BackupError::io("read directory", dir)(e)),
        }
    }
    names.sort();
    // Unlogged relations are the ones with an init fork; only that fork is copied.
    let unlogged: HashSet<&str> = if is_database_dir(rel) {
        names
            .iter()
            .filter_map(|n| RelFile::parse(n))
            .filter(|r| r.fork == Fork::Init)
            .map(|r| r.node)
            .collect()
    } else {
        HashSet::new()
    };
    for name in &names {
        let path = dir.join(name);
        let child_rel = join(rel, name);
        if excluded(rel, name, &unlogged) || extra_excluded.contains(&path) {
            tracing::debug!("not backed up: {child_rel}");
            continue;
        }
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(BackupError::io("stat", &path)(e)),
        };
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            if rel == "pg_tblspc" && all_digits(name) {
                tablespace(&path, name, &child_rel, extra_excluded, walk, seen_dirs)?;
            } else if rel.is_empty() && name == "pg_wal" {
                // pg_wal may live elsewhere (initdb -X); its contents are never copied.
                walk.entries.push(dir_entry(&child_rel, &path, 0o700));
                walk.entries
                    .push(dir_entry("pg_wal/archive_status", &path, 0o700));
            } else {
                tracing::warn!(
                    "skipping symbolic link {child_rel}: only tablespace links are backed up"
                );
            }
        } else if meta.is_dir() {
            walk.entries.push(dir_entry(&child_rel, &path, mode));
            if rel.is_empty() && CONTENTS_EXCLUDED.contains(&name.as_str()) {
                if name == "pg_wal" {
                    walk.entries
                        .push(dir_entry("pg_wal/archive_status", &path, mode));
                }
                continue;
            }
            walk_dir(&path, &child_rel, extra_excluded, walk, seen_dirs)?;
        } else if meta.is_file() {
            walk.entries.push(Found {
                path: child_rel,
                source: path,
                mode,
                size: Some(meta.len()),
            });
        }
    }
    Ok(())
}

fn dir_entry(rel: &str, source: &Path, mode: u32) -> Found {
    Found {
        path: rel.to_owned(),
        source: source.to_path_buf(),
        mode,
        size: None,
    }
}

/// Follows `pg_tblspc/<oid>` into its location and walks it under the link's path.
fn tablespace(
    link: &Path,
    oid: &str,
    rel: &str,
    extra_excluded: &[PathBuf],
    walk: &mut Walk,
    seen_dirs: &mut HashSet<PathBuf>,
) -> Result<(), BackupError> {
    let location = fs::read_link(link).map_err(BackupError::io("read link", link))?;
    let oid: u32 = oid.parse().map_err(|_| BackupError::Invalid {
        what: format!("tablespace link {}", link.display()),
        problem: "name is not an OID".into(),
    })?;
    let target = fs::canonicalize(link).map_err(BackupError::io("resolve", link))?;
    if !seen_dirs.insert(target.clone()) {
        return Ok(());
    }
    walk.tablespaces.push(TablespaceLink { oid, location });
    walk.entries.push(dir_entry(rel, &target, 0o700));
    walk_dir(&target, rel, extra_excluded, walk, seen_dirs)
}

/// PostgreSQL's exclusion rules for entry `name` of directory `rel`.
fn excluded(rel: &str, name: &str, unlogged: &HashSet<&str>) -> bool {
    if name.starts_with("pgsql_tmp") || name.starts_with("pg_internal.init") {
        return true;
    }
    if rel.is_empty() && (TOP_FILES_EXCLUDED.contains(&name) || name == SPOOL_DIR) {
        return true;
    }
    if is_database_dir(rel) {
        if let Some(r) = RelFile::parse(name) {
            return r.temp || (r.fork != Fork::Init && unlogged.contains(r.node));
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_file_names() {
        let r = RelFile::parse("16384.12").unwrap();
        assert_eq!(
            (r.node, r.fork, r.segno, r.temp),
            ("16384", Fork::Main, 12, false)
        );
        assert_eq!(RelFile::parse("16384_vm").unwrap().fork, Fork::Vm);
        assert_eq!(RelFile::parse("16384_init").unwrap().fork, Fork::Init);
        assert!(RelFile::parse("t3_16384").unwrap().temp);
        for not in [
            "PG_VERSION",
            "pg_filenode.map",
            "16384_x",
            "16384.",
            "t_1",
            "abc",
        ] {
            assert!(RelFile::parse(not).is_none(), "{not}");
        }
        assert!(is_paged_relation("base/5/16384.1"));
        assert!(is_paged_relation("global/1262"));
        assert!(is_paged_relation("pg_tblspc/16390/PG_15_202209061/5/16391"));
        assert!(!is_paged_relation("base/5/16384_fsm"));
        assert!(!is_paged_relation("base/5/pg_filenode.map"));
        assert!(!is_paged_relation("pg_xact/0000"));
        assert_eq!(segment_number("base/5/16384.3"), 3);
    }

    #[test]
    fn walk_applies_the_exclusions() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let files = [
            "PG_VERSION",
            "postmaster.pid",
            "backup_label",
            "pg_wal/000000010000000000000001",
            "pg_wal/archive_status/000000010000000000000001.done",
            "pg_stat_tmp/global.stat",
            "pg_subtrans/0000",
            "walvault_spool/x",
            "base/5/16384",
            "base/5/16384.1",
            "base/5/16385",
            "base/5/16385_init",
            "base/5/16385_fsm",
            "base/5/t3_16386",
            "base/5/pg_internal.init",
            "base/pgsql_tmp/pgsql_tmp1.0",
            "global/pg_control",
        ];
        for f in files {
            let p = root.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        }
        let got: Vec<String> = walk(root, &[])
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.path)
            .collect();
        let want = [
            "PG_VERSION",
            "base",
            "base/5",
            "base/5/16384",
            "base/5/16384.1",
            "base/5/16385_init",
            "global",
            "global/pg_control",
            "pg_stat_tmp",
            "pg_subtrans",
            "pg_wal",
            "pg_wal/archive_status",
        ];
        assert_eq!(got, want);
    }
}
