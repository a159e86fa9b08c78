//! `backup-fetch`: rebuilds a data directory from a backup and its delta chain.
//!
//! Understands how a chain composes: each file of the target backup is rebuilt from the newest
//! backup that stored it whole, then patched, oldest to newest, with the pages each later delta
//! stored, after setting the size that delta recorded (so truncations and extensions replay in
//! order). Files the target backup does not list are never created. Manifests are validated by
//! the catalog before anything is written; every piece is checked against its crc32 before it is
//! written (the repository's pack reader does that); an error names the pack and the file.
//! Writes go only below the target and the tablespace directories, each absent or empty, walked
//! by descriptor without following links (`tree.rs`); modes are at most 0700/0600.
//! Writeback of each piece starts as soon as it is written, so the disk works while later packs
//! are decompressed; `global/pg_control` is written last, after every other file is fsynced, then
//! `backup_label` and `tablespace_map` byte for byte. Used by the CLI.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::ProgressBar;

use super::external_config;
use super::manifest::{BackupName, FileEntry, Manifest, PackId, Piece, Storage};
use super::tree::{self, Found, Parent, Root, DIR_MODE_MAX};
use super::{progress, BackupError};
use crate::repo::packs::{recycle_piece, WantedPiece};
use crate::repo::Repository;

#[derive(Clone, Debug, Default)]
pub(crate) struct FetchOptions {
    pub(crate) concurrency: usize,
    pub(crate) progress: bool,
    /// Tablespaces restored somewhere else than recorded: OID → directory.
    pub(crate) relocate: Vec<(u32, PathBuf)>,
    /// Where configuration the source kept outside its data directory goes, instead of
    /// [`external_config::DIR`] inside the target (`--config-dir`).
    pub(crate) config_dir: Option<PathBuf>,
    /// Restore over an existing stopped copy of the cluster, writing only what differs.
    pub(crate) delta: bool,
}

/// What a fetch restored.
#[derive(Clone, Debug)]
pub(crate) struct Fetched {
    pub(crate) name: BackupName,
    pub(crate) chain: Vec<BackupName>,
    pub(crate) files: usize,
    pub(crate) bytes_written: u64,
}

/// A directory a restore writes below, as `--dry-run` lists it.
#[derive(Clone, Debug)]
pub(crate) struct Location {
    pub(crate) path: PathBuf,
    /// "data directory" or "tablespace <oid>".
    pub(crate) what: String,
    /// Whether it exists (empty) already; otherwise the restore creates it.
    pub(crate) exists: bool,
    /// A file written below one of the directories (a copy of external configuration).
    pub(crate) file: bool,
}

pub(super) const CONTROL: &str = "global/pg_control";
/// Where pg_control is written until everything else is durable (renamed in `finish`).
pub(super) const CONTROL_TEMP: &str = "global/pg_control.walvault-restore";

/// Restores backup `wanted` (`LATEST` or a name) into `target`.
pub(crate) async fn fetch(
    repo: Arc<Repository>,
    wanted: &str,
    target: &Path,
    opts: &FetchOptions,
) -> Result<Fetched, BackupError> {
    if opts.delta {
        return super::delta_fetch::fetch(repo, wanted, target, opts).await;
    }
    let name = crate::backup::catalog::resolve_name(&repo, wanted).await?;
    let chain = crate::backup::catalog::chain(&repo, &name).await?;
    let last = chain.len() - 1;
    let final_manifest = &chain[last];
    let mut planned = Planned::new(target, final_manifest, &opts.relocate)?;
    planned.add_config_dir(opts.config_dir.as_deref(), final_manifest)?;
    let bases = base_layers(&chain)?;
    if !final_manifest.files.iter().any(|f| f.path == CONTROL) {
        return Err(BackupError::invalid(
            format!("backup {name}"),
            "its manifest lists no global/pg_control",
        ));
    }
    // Keys missing for an encrypted backup fail here, before a directory is made.
    for manifest in &chain {
        let first = manifest
            .files
            .iter()
            .flat_map(|f| &f.pieces)
            .map(|p| p.pack)
            .min();
        if let Some(pack) = first {
            repo.check_readable(&manifest.summary.name.pack_key(pack))
                .await?;
        }
    }
    let layout = Layout::create(planned, final_manifest)?;

    let total: u64 = (0..=last)
        .flat_map(|layer| layer_files(&chain, &bases, layer))
        .flat_map(|f| f.pieces.iter())
        .map(|p| p.len)
        .sum();
    let bar = progress::bytes_bar(total, opts.progress, "restore");
    let layout = Arc::new(layout);
    for layer in 0..=last {
        let files = layer_files(&chain, &bases, layer);
        let sizes = layer_sizes(&layout, &files, &bases, layer);
        let for_task = Arc::clone(&layout);
        tokio::task::spawn_blocking(move || prepare_layer(&for_task, &sizes)).await??;
        apply_layer(
            &repo,
            &layout,
            &chain[layer].summary.name,
            &files,
            opts,
            &bar,
        )
        .await?;
    }
    bar.finish_and_clear();
    crate::failpoint::pause_if_enabled("backup-fetch-files-written").await;
    finish(&layout, final_manifest, opts.concurrency).await?;
    crate::failpoint::pause_if_enabled("backup-fetch-pg-control-written").await;
    Ok(Fetched {
        name,
        chain: chain.iter().map(|m| m.summary.name.clone()).collect(),
        files: final_manifest.files.len(),
        bytes_written: total,
    })
}

/// Every directory a restore of `wanted` into `target` would write below, checked as the
/// restore checks them, without writing anything.
pub(crate) async fn locations(
    repo: &Repository,
    wanted: &str,
    target: &Path,
    opts: &FetchOptions,
) -> Result<Vec<Location>, BackupError> {
    let name = crate::backup::catalog::resolve_name(repo, wanted).await?;
    let chain = crate::backup::catalog::chain(repo, &name).await?;
    let last = &chain[chain.len() - 1];
    let mut planned = Planned::new(target, last, &opts.relocate)?;
    planned.add_config_dir(opts.config_dir.as_deref(), last)?;
    let copies = match planned.config {
        Some(root) => planned.roots[root].path.clone(),
        None => planned.roots[0].path.join(external_config::DIR),
    };
    let config =
        external_config::destinations(&copies, &planned.roots[0].path, &last.external_config);
    Ok(planned
        .roots
        .iter()
        .map(|r| Location {
            path: r.path.clone(),
            what: r.what.clone(),
            exists: r.found == Found::Empty,
            file: false,
        })
        .chain(config.into_iter().map(|(path, what)| Location {
            path,
            what,
            exists: false,
            file: true,
        }))
        .collect())
}

/// A directory the restore will write below, checked but not yet touched.
struct PlannedRoot {
    path: PathBuf,
    what: String,
    found: Found,
    parent: Parent,
}

/// Where a restore will write: the target (first) and each tablespace directory, each absent
/// or empty, none inside another. A tablespace directory from the manifest (not relocated by the
/// user) must have an existing parent.
struct Planned {
    roots: Vec<PlannedRoot>,
    /// Tablespace OID → index in `roots`.
    tablespaces: BTreeMap<u32, usize>,
    relocated: bool,
    /// The root of `--config-dir`, when external configuration goes there.
    config: Option<usize>,
}

impl Planned {
    /// With `--config-dir` and a backup holding external configuration: one more root, absent
    /// or empty, overlapping no other.
    fn add_config_dir(
        &mut self,
        dir: Option<&Path>,
        manifest: &Manifest,
    ) -> Result<(), BackupError> {
        let Some(dir) = dir else {
            return Ok(());
        };
        if !external_config::outside(&manifest.external_config) {
            tracing::info!(
                "backup {} holds no configuration from outside its data directory: --config-dir {} is not used",
                manifest.summary.name,
                dir.display()
            );
            return Ok(());
        }
        let dir = std::path::absolute(dir).map_err(BackupError::io("resolve", dir))?;
        if let Some(other) = self
            .roots
            .iter()
            .find(|r| dir.starts_with(&r.path) || r.path.starts_with(&dir))
        {
            return Err(BackupError::invalid(
                format!("--config-dir {}", dir.display()),
                format!(
                    "overlaps the {} at {}: each must be a directory of its own",
                    other.what,
                    other.path.display()
                ),
            ));
        }
        let what = "configuration directory".to_owned();
        let found = tree::inspect(&dir, &what, Parent::Create)?;
        self.config = Some(self.roots.len());
        self.roots.push(PlannedRoot {
            path: dir,
            what,
            found,
            parent: Parent::Create,
        });
        Ok(())
    }

    fn new(
        target: &Path,
        manifest: &Manifest,
        relocate: &[(u32, PathBuf)],
    ) -> Result<Planned, BackupError> {
        for (oid, _) in relocate {
            if !manifest.tablespaces.iter().any(|ts| ts.oid == *oid) {
                return Err(BackupError::invalid(
                    format!("--tablespace {oid}=..."),
                    format!("backup {} has no tablespace {oid}", manifest.summary.name),
                ));
            }
        }
        let target = std::path::absolute(target).map_err(BackupError::io("resolve", target))?;
        let found = tree::inspect(&target, "target directory", Parent::Create)?;
        if found == Found::Empty {
            check_data_dir_mode(&target)?;
        }
        let mut roots = vec![PlannedRoot {
            path: target,
            what: "data directory".into(),
            found,
            parent: Parent::Create,
        }];
        let mut tablespaces = BTreeMap::new();
        for ts in &manifest.tablespaces {
            // A directory the user named may get its parents created; the manifest's may not.
            let (dir, parent) = relocate
                .iter()
                .find(|(oid, _)| *oid == ts.oid)
                .map(|(_, dir)| (dir.clone(), Parent::Create))
                .unwrap_or_else(|| (PathBuf::from(&ts.location), Parent::MustExist));
            if !dir.is_absolute() {
                return Err(BackupError::invalid(
                    format!("tablespace directory {}", dir.display()),
                    "must be an absolute path",
                ));
            }
            if let Some(other) = roots
                .iter()
                .find(|r| dir.starts_with(&r.path) || r.path.starts_with(&dir))
            {
                return Err(BackupError::invalid(
                    format!("tablespace {} at {}", ts.oid, dir.display()),
                    format!(
                        "overlaps the {} at {}: each must be a directory of its own",
                        other.what,
                        other.path.display()
                    ),
                ));
            }
            let found = tree::inspect(&dir, "tablespace directory", parent)?;
            tablespaces.insert(ts.oid, roots.len());
            roots.push(PlannedRoot {
                path: dir,
                what: format!("tablespace {}", ts.oid),
                found,
                parent,
            });
        }
        Ok(Planned {
            roots,
            tablespaces,
            relocated: !relocate.is_empty(),
            config: None,
        })
    }
}

/// PostgreSQL starts only on a data directory of mode 0700 or 0750, and a restore sets no mode on
/// a directory it did not create: an existing target must already be one of those.
fn check_data_dir_mode(dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::symlink_metadata(dir)
        .map_err(BackupError::io("stat", dir))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o7027 != 0 {
        return Err(BackupError::invalid(
            format!("target directory {}", dir.display()),
            format!(
                "has mode {mode:04o}, which PostgreSQL refuses (0700 or 0750): chmod it, or name \
                 an absent directory for the restore to create"
            ),
        ));
    }
    Ok(())
}

/// Where a backup path goes: a path below one of the layout's roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Dest {
    pub(super) root: usize,
    pub(super) rel: String,
}

/// The open roots of a restore.
struct Layout {
    roots: Vec<Root>,
    tablespaces: BTreeMap<u32, usize>,
    relocated: bool,
    config: Option<usize>,
}

impl Layout {
    /// The local place of backup path `path`; `None` for a tablespace link itself and for the
    /// directory of external configuration when `--config-dir` replaces it.
    fn dest(&self, path: &str) -> Option<Dest> {
        if let Some(root) = self.config {
            if let Some(rel) = external_config::below_dir(path) {
                return rel.map(|rel| Dest {
                    root,
                    rel: rel.to_owned(),
                });
            }
        }
        dest(&self.tablespaces, path)
    }

    fn root(&self, dest: &Dest) -> &Root {
        &self.roots[dest.root]
    }

    /// The local path of `dest`, for messages.
    fn display(&self, dest: &Dest) -> PathBuf {
        self.root(dest).display(&dest.rel)
    }

    /// Opens (or creates) the roots, then makes the tablespace links and every directory of
    /// `manifest`, parents first.
    fn create(planned: Planned, manifest: &Manifest) -> Result<Layout, BackupError> {
        let roots = planned
            .roots
            .iter()
            .map(|r| Root::open(&r.path, &r.what, r.parent))
            .collect::<Result<Vec<_>, _>>()?;
        let layout = Layout {
            roots,
            tablespaces: planned.tablespaces,
            relocated: planned.relocated,
            config: planned.config,
        };
        let data = &layout.roots[0];
        data.make_dir("pg_tblspc", DIR_MODE_MAX)?;
        for (oid, root) in &layout.tablespaces {
            data.symlink(&format!("pg_tblspc/{oid}"), layout.roots[*root].path())?;
        }
        let mut dirs: Vec<_> = manifest.dirs.iter().collect();
        dirs.sort_by_key(|d| d.path.matches('/').count());
        for dir in dirs {
            if let Some(dest) = layout.dest(&dir.path) {
                layout.root(&dest).make_dir(&dest.rel, dir.mode)?;
            }
        }
        Ok(layout)
    }
}

pub(super) fn dest(tablespaces: &BTreeMap<u32, usize>, path: &str) -> Option<Dest> {
    if path == CONTROL {
        return Some(Dest {
            root: 0,
            rel: CONTROL_TEMP.into(),
        });
    }
    let in_tablespace = |oid| tablespaces.contains_key(&oid);
    if let Some((oid, inner)) = super::manifest::tablespace_content(path, in_tablespace) {
        let root = *tablespaces.get(&oid)?;
        return (!inner.is_empty()).then(|| Dest {
            root,
            rel: inner.to_owned(),
        });
    }
    Some(Dest {
        root: 0,
        rel: path.to_owned(),
    })
}

/// For each file of the last backup, the index of the newest backup of the chain that stored it
/// whole (where its reconstruction starts).
pub(super) fn base_layers(chain: &[Manifest]) -> Result<HashMap<String, usize>, BackupError> {
    let by_path: Vec<HashMap<&str, &FileEntry>> = chain
        .iter()
        .map(|m| m.files.iter().map(|f| (f.path.as_str(), f)).collect())
        .collect();
    let last = chain.len() - 1;
    let mut bases = HashMap::new();
    for file in &chain[last].files {
        let mut layer = last;
        let mut entry = file;
        while entry.storage == Storage::Pages {
            let older = layer
                .checked_sub(1)
                .and_then(|l| by_path[l].get(file.path.as_str()).map(|e| (l, *e)));
            let Some((l, e)) = older else {
                return Err(BackupError::invalid(
                    format!("backup {}", chain[layer].summary.name),
                    format!(
                        "{} is stored as changed pages but its parent lacks it",
                        file.path
                    ),
                ));
            };
            layer = l;
            entry = e;
        }
        bases.insert(file.path.clone(), layer);
    }
    Ok(bases)
}

/// The entries of backup `layer` that take part in rebuilding the last backup's files.
fn layer_files<'a>(
    chain: &'a [Manifest],
    bases: &HashMap<String, usize>,
    layer: usize,
) -> Vec<&'a FileEntry> {
    chain[layer]
        .files
        .iter()
        .filter(|f| bases.get(&f.path).is_some_and(|base| *base <= layer))
        .collect()
}

/// What one layer does to one file before its pieces are written.
struct Resize {
    dest: Dest,
    size: u64,
    mode: u32,
    /// The file's reconstruction starts at this layer: create it empty first.
    create: bool,
}

fn layer_sizes(
    layout: &Layout,
    files: &[&FileEntry],
    bases: &HashMap<String, usize>,
    layer: usize,
) -> Vec<Resize> {
    files
        .iter()
        .filter_map(|file| {
            layout.dest(&file.path).map(|dest| Resize {
                dest,
                size: file.size,
                mode: file.mode,
                create: bases.get(&file.path) == Some(&layer),
            })
        })
        .collect()
}

/// Creates the files a layer starts (new files only, at most mode 0600) and sets every file's
/// size to the layer's record of it, so truncations and extensions replay in order.
fn prepare_layer(layout: &Layout, resizes: &[Resize]) -> Result<(), BackupError> {
    for r in resizes {
        let root = layout.root(&r.dest);
        let handle = if r.create {
            root.create_file(&r.dest.rel, r.mode)?
        } else {
            root.open_file(&r.dest.rel)?
        };
        handle
            .set_len(r.size)
            .map_err(BackupError::io("set length of", &layout.display(&r.dest)))?;
    }
    Ok(())
}

/// Writes the pieces of one backup of the chain, a few packs at a time.
async fn apply_layer(
    repo: &Arc<Repository>,
    layout: &Arc<Layout>,
    name: &BackupName,
    files: &[&FileEntry],
    opts: &FetchOptions,
    bar: &ProgressBar,
) -> Result<(), BackupError> {
    let mut by_pack: BTreeMap<PackId, Vec<Target>> = BTreeMap::new();
    for file in files {
        let Some(dest) = layout.dest(&file.path) else {
            continue;
        };
        let dest = Arc::new((file.path.clone(), dest));
        for piece in &file.pieces {
            by_pack.entry(piece.pack).or_default().push(Target {
                piece: *piece,
                file: Arc::clone(&dest),
            });
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut packs = by_pack.into_iter();
    let mut first_error = None;
    loop {
        while tasks.len() < opts.concurrency.max(1) && first_error.is_none() {
            let Some((pack, targets)) = packs.next() else {
                break;
            };
            let (repo, key, bar) = (Arc::clone(repo), name.pack_key(pack), bar.clone());
            let layout = Arc::clone(layout);
            tasks.spawn(async move { apply_pack(&repo, &layout, &key, targets, &bar).await });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        if let Err(e) = joined.map_err(BackupError::from).and_then(|r| r) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A piece and the file it goes to (backup path, local place).
struct Target {
    piece: Piece,
    file: Arc<(String, Dest)>,
}

/// Streams one pack and writes the pieces wanted from it as the repository hands them over,
/// each already checked against its crc32.
async fn apply_pack(
    repo: &Repository,
    layout: &Arc<Layout>,
    key: &str,
    targets: Vec<Target>,
    bar: &ProgressBar,
) -> Result<(), BackupError> {
    let wanted = targets
        .iter()
        .map(|t| WantedPiece {
            at: t.piece.at,
            len: t.piece.len,
            crc32: t.piece.crc32,
        })
        .collect();
    let file_of = |i: Option<usize>| {
        i.and_then(|i| targets.get(i))
            .map(|t| t.file.0.clone())
            .unwrap_or_default()
    };
    let mut pack = repo
        .open_pack(key, wanted)
        .await
        .map_err(|source| BackupError::Restore {
            file: file_of(Some(0)),
            source,
        })?
        .ok_or_else(|| BackupError::Corrupt {
            object: key.to_owned(),
            problem: format!("missing, yet it holds {}", file_of(Some(0))),
        })?;
    loop {
        let (i, data) = match pack.next().await {
            Ok(Some(piece)) => piece,
            Ok(None) => return Ok(()),
            Err(source) => {
                return Err(BackupError::Restore {
                    file: file_of(pack.pending()),
                    source,
                })
            }
        };
        let target = &targets[i];
        let (layout, file, offset) = (
            Arc::clone(layout),
            Arc::clone(&target.file),
            target.piece.file_offset,
        );
        let written = tokio::task::spawn_blocking(move || {
            write_at(&layout, &file.1, offset, &data).map(|()| data)
        })
        .await??;
        recycle_piece(written);
        bar.inc(target.piece.len);
    }
}

fn write_at(layout: &Layout, dest: &Dest, offset: u64, data: &[u8]) -> Result<(), BackupError> {
    let file = layout.root(dest).open_file(&dest.rel)?;
    file.write_all_at(data, offset)
        .map_err(BackupError::io("write", &layout.display(dest)))?;
    start_writeback(&file, offset, data.len());
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk now, without waiting, as
/// PostgreSQL's `initdb -S` does before its fsyncs: the disk then works while later packs are
/// decompressed, instead of the whole restore sitting dirty in memory until the fsyncs at the
/// end. Only a hint: durability still comes from those fsyncs, so a failure here is ignored.
fn start_writeback(file: &std::fs::File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on a descriptor `file` keeps open for the duration of the call.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

/// Makes everything durable, then puts pg_control, backup_label and tablespace_map in place.
async fn finish(
    layout: &Arc<Layout>,
    manifest: &Manifest,
    concurrency: usize,
) -> Result<(), BackupError> {
    let files: Vec<Dest> = manifest
        .files
        .iter()
        .filter_map(|f| layout.dest(&f.path))
        .collect();
    let per_task = files.len().div_ceil(concurrency.max(1)).max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for group in files.chunks(per_task) {
        let (group, layout) = (group.to_vec(), Arc::clone(layout));
        tasks.spawn_blocking(move || group.iter().try_for_each(|d| layout.root(d).sync(&d.rel)));
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    crate::failpoint::pause_if_enabled("backup-fetch-files-fsynced").await;
    let layout = Arc::clone(layout);
    let label = manifest.backup_label.clone();
    let map = manifest.tablespace_map.clone();
    let external = manifest.external_config.clone();
    let has_conf = manifest.files.iter().any(|f| f.path == "postgresql.conf");
    let version = manifest.summary.pg_version_num;
    let dirs: Vec<Dest> = manifest
        .dirs
        .iter()
        .filter_map(|d| layout.dest(&d.path))
        .collect();
    tokio::task::spawn_blocking(move || {
        let data = &layout.roots[0];
        data.write_new("backup_label", label.as_bytes())?;
        // With relocated tablespaces the links already point to the new places; a
        // tablespace_map would make PostgreSQL put them back where they were.
        if let (Some(map), false) = (map, layout.relocated) {
            data.write_new("tablespace_map", map.as_bytes())?;
        }
        let copies = layout.config.map(|root| &layout.roots[root]);
        external_config::point_restored(data, copies, &external, has_conf, version)?;
        for dir in &dirs {
            layout.root(dir).sync(&dir.rel)?;
        }
        data.sync("pg_tblspc")?;
        for root in &layout.roots {
            root.sync("")?;
        }
        data.rename_in("global", "pg_control.walvault-restore", "pg_control")?;
        data.sync("global")
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::tests::sample;
    use crate::backup::manifest::Tablespace;
    use crate::repo::PutMode;

    fn manifest(files: Vec<FileEntry>, tablespaces: Vec<Tablespace>) -> Manifest {
        let mut m = sample("base_x", "2026-01-01T00:00:00Z");
        m.files = files;
        m.tablespaces = tablespaces;
        m
    }

    fn file(path: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: 1,
            mode: 0o600,
            storage: Storage::Whole,
            crc32: 0,
            pieces: vec![],
        }
    }

    #[test]
    fn escaping_paths_are_refused() {
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "base/../../x",
            "base//x",
            "./x",
            "",
        ] {
            let m = manifest(vec![file(bad)], vec![]);
            assert!(m.validate().is_err(), "{bad:?} accepted");
        }
        assert!(manifest(vec![file("base/1/2")], vec![]).validate().is_ok());
        let ts = |location: &str| Tablespace {
            oid: 1,
            location: location.into(),
        };
        assert!(manifest(vec![], vec![ts("relative/dir")])
            .validate()
            .is_err());
        assert!(manifest(vec![], vec![ts("/srv/../etc")])
            .validate()
            .is_err());
        assert!(manifest(vec![], vec![ts("/srv/ts")]).validate().is_ok());
    }

    #[test]
    fn tablespace_paths_go_through_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(
            vec![],
            vec![Tablespace {
                oid: 16390,
                location: "/recorded/place".into(),
            }],
        );
        let target = dir.path().join("data");
        let relocate = [(16390, dir.path().join("ts"))];
        let planned = Planned::new(&target, &m, &relocate).unwrap();
        assert_eq!(planned.roots[1].path, dir.path().join("ts"));
        let dest = |path| dest(&planned.tablespaces, path);
        let at = |root, rel: &str| {
            Some(Dest {
                root,
                rel: rel.into(),
            })
        };
        assert_eq!(dest("pg_tblspc/16390/PG_15/5/1"), at(1, "PG_15/5/1"));
        assert_eq!(dest("pg_tblspc/16390"), None);
        assert_eq!(dest("base/5/1"), at(0, "base/5/1"));
        assert_eq!(dest(CONTROL), at(0, CONTROL_TEMP));
        std::fs::create_dir_all(target.join("x")).unwrap();
        assert!(Planned::new(&target, &m, &relocate).is_err());
    }

    /// The whole fetch path, catalog included, with a manifest naming a path outside the target:
    /// refused before anything is created.
    #[tokio::test]
    async fn a_manifest_escaping_the_target_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("repo");
        std::fs::create_dir(&repo_dir).unwrap();
        let repo = Arc::new(crate::repo::local_for_tests(&repo_dir).await);
        let m = manifest(vec![file("base/1"), file("base/../../escaped")], vec![]);
        let json = m.to_json().unwrap();
        repo.put_bytes(&m.summary.name.manifest_key(), &json, PutMode::IfAbsent)
            .await
            .unwrap();
        let target = dir.path().join("restore/data");
        let err = fetch(repo, "LATEST", &target, &FetchOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("base/../../escaped"), "{err}");
        assert!(!dir.path().join("escaped").exists());
        assert!(!dir.path().join("restore").exists());
    }
}
