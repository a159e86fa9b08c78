//! `backup-fetch`: rebuilds a data directory from a backup and its delta chain.
//!
//! Understands how a chain composes: each file of the target backup is rebuilt from the newest
//! backup that stored it whole, then patched, oldest to newest, with the pages each later delta
//! stored, after setting the size that delta recorded (so truncations and extensions replay in
//! order). Files the target backup does not list are never created. Every piece is checked
//! against its crc32 before it is written, and every pack's framing and content checksum is
//! checked by the codec; an error names the pack and the file. Everything in the manifests is
//! validated before anything is written: relative paths without `.` or `..` parts, tablespace
//! links only under `pg_tblspc/<oid>` pointing at absolute, empty (or new) directories.
//! Writeback of each piece starts as soon as it is written, so the disk works while later packs
//! are decompressed; `global/pg_control` is written last, after every other file is fsynced, then
//! `backup_label` and `tablespace_map` byte for byte. Used by the CLI.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use indicatif::ProgressBar;

use super::manifest::{BackupName, FileEntry, Manifest, PackId, Piece, Storage};
use super::{progress, BackupError};
use crate::repo::Repository;

#[derive(Clone, Debug, Default)]
pub(crate) struct FetchOptions {
    pub(crate) concurrency: usize,
    pub(crate) progress: bool,
    /// Tablespaces restored somewhere else than recorded: OID → directory.
    pub(crate) relocate: Vec<(u32, PathBuf)>,
}

/// What a fetch restored.
#[derive(Clone, Debug)]
pub(crate) struct Fetched {
    pub(crate) name: BackupName,
    pub(crate) chain: Vec<BackupName>,
    pub(crate) files: usize,
    pub(crate) bytes_written: u64,
}

const CONTROL: &str = "global/pg_control";
const CONTROL_TEMP: &str = "global/pg_control.walvault-restore";

/// Restores backup `wanted` (`LATEST` or a name) into `target`.
pub(crate) async fn fetch(
    repo: Arc<Repository>,
    wanted: &str,
    target: &Path,
    opts: &FetchOptions,
) -> Result<Fetched, BackupError> {
    let name = crate::backup::catalog::resolve_name(&repo, wanted).await?;
    let chain = crate::backup::catalog::chain(&repo, &name).await?;
    for manifest in &chain {
        validate(manifest)?;
    }
    let last = chain.len() - 1;
    let final_manifest = &chain[last];
    let layout = Layout::new(target, final_manifest, &opts.relocate)?;
    let bases = base_layers(&chain)?;
    if !final_manifest.files.iter().any(|f| f.path == CONTROL) {
        return Err(BackupError::invalid(
            format!("backup {name}"),
            "its manifest lists no global/pg_control",
        ));
    }
    layout.create(final_manifest)?;

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
        tokio::task::spawn_blocking(move || prepare_layer(&sizes)).await??;
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
    finish(&layout, final_manifest, opts.concurrency).await?;
    Ok(Fetched {
        name,
        chain: chain.iter().map(|m| m.summary.name.clone()).collect(),
        files: final_manifest.files.len(),
        bytes_written: total,
    })
}

/// Refuses anything in a manifest that could write outside the target.
fn validate(manifest: &Manifest) -> Result<(), BackupError> {
    let what = format!("manifest of {}", manifest.summary.name);
    let paths = manifest
        .dirs
        .iter()
        .map(|d| d.path.as_str())
        .chain(manifest.files.iter().map(|f| f.path.as_str()));
    for path in paths {
        if !safe_relative(path) {
            return Err(BackupError::invalid(
                &what,
                format!("refusing path {path:?}: absolute or with empty, . or .. parts"),
            ));
        }
    }
    for ts in &manifest.tablespaces {
        let location = Path::new(&ts.location);
        let clean = location.is_absolute()
            && location
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !clean {
            return Err(BackupError::invalid(
                &what,
                format!(
                    "refusing tablespace {} at {:?}: not an absolute path without . or ..",
                    ts.oid, ts.location
                ),
            ));
        }
    }
    for file in &manifest.files {
        for piece in &file.pieces {
            let fits = piece.pack.0 < manifest.summary.packs
                && piece
                    .file_offset
                    .checked_add(piece.len)
                    .is_some_and(|end| end <= file.size);
            if !fits {
                return Err(BackupError::invalid(
                    &what,
                    format!(
                        "{}: a piece lies outside the file or the backup's packs",
                        file.path
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Where each path of the backup goes.
struct Layout {
    target: PathBuf,
    /// Tablespace OID → the directory its link points to.
    tablespaces: BTreeMap<u32, PathBuf>,
    relocated: bool,
}

impl Layout {
    fn new(
        target: &Path,
        manifest: &Manifest,
        relocate: &[(u32, PathBuf)],
    ) -> Result<Layout, BackupError> {
        let mut tablespaces = BTreeMap::new();
        for ts in &manifest.tablespaces {
            let dir = relocate
                .iter()
                .find(|(oid, _)| *oid == ts.oid)
                .map(|(_, dir)| dir.clone())
                .unwrap_or_else(|| PathBuf::from(&ts.location));
            tablespaces.insert(ts.oid, dir);
        }
        for (oid, _) in relocate {
            if !tablespaces.contains_key(oid) {
                return Err(BackupError::invalid(
                    format!("--tablespace {oid}=..."),
                    format!("backup {} has no tablespace {oid}", manifest.summary.name),
                ));
            }
        }
        let layout = Layout {
            target: target.to_path_buf(),
            tablespaces,
            relocated: !relocate.is_empty(),
        };
        layout.check_empty(target, "target directory")?;
        for dir in layout.tablespaces.values() {
            if !dir.is_absolute() {
                return Err(BackupError::invalid(
                    format!("tablespace directory {}", dir.display()),
                    "must be an absolute path",
                ));
            }
            layout.check_empty(dir, "tablespace directory")?;
        }
        Ok(layout)
    }

    fn check_empty(&self, dir: &Path, what: &str) -> Result<(), BackupError> {
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(BackupError::invalid(
                        format!("{what} {}", dir.display()),
                        "is not empty: backup-fetch restores only into an empty or absent directory",
                    ));
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackupError::io("read directory", dir)(e)),
        }
    }

    /// The local path of backup path `path`; `None` for a tablespace link itself.
    fn dest(&self, path: &str) -> Option<PathBuf> {
        if path == CONTROL {
            return Some(self.target.join(CONTROL_TEMP));
        }
        if let Some(rest) = path.strip_prefix("pg_tblspc/") {
            let (oid, inner) = rest.split_once('/').unwrap_or((rest, ""));
            if let Some(dir) = oid
                .parse()
                .ok()
                .and_then(|oid: u32| self.tablespaces.get(&oid))
            {
                return (!inner.is_empty()).then(|| dir.join(inner));
            }
        }
        Some(self.target.join(path))
    }

    /// The data directory (mode 0700), tablespace directories and links, and every directory.
    fn create(&self, manifest: &Manifest) -> Result<(), BackupError> {
        make_dir(&self.target, 0o700)?;
        make_dir(&self.target.join("pg_tblspc"), 0o700)?;
        for (oid, dir) in &self.tablespaces {
            make_dir(dir, 0o700)?;
            let link = self.target.join("pg_tblspc").join(oid.to_string());
            std::os::unix::fs::symlink(dir, &link)
                .map_err(BackupError::io("create link", &link))?;
        }
        for dir in &manifest.dirs {
            if let Some(path) = self.dest(&dir.path) {
                make_dir(&path, dir.mode & 0o7777)?;
            }
        }
        Ok(())
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<(), BackupError> {
    fs::create_dir_all(path).map_err(BackupError::io("create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(BackupError::io("chmod", path))
}

/// For each file of the last backup, the index of the newest backup of the chain that stored it
/// whole (where its reconstruction starts).
fn base_layers(chain: &[Manifest]) -> Result<HashMap<String, usize>, BackupError> {
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
    path: PathBuf,
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
            layout.dest(&file.path).map(|path| Resize {
                path,
                size: file.size,
                mode: file.mode & 0o777,
                create: bases.get(&file.path) == Some(&layer),
            })
        })
        .collect()
}

/// Creates the files a layer starts and sets every file's size to the layer's record of it, so
/// truncations and extensions replay in order.
fn prepare_layer(resizes: &[Resize]) -> Result<(), BackupError> {
    for r in resizes {
        let handle = OpenOptions::new()
            .write(true)
            .create(r.create)
            .truncate(r.create)
            .mode(r.mode)
            .open(&r.path)
            .map_err(BackupError::io("open", &r.path))?;
        handle
            .set_len(r.size)
            .map_err(BackupError::io("set length of", &r.path))?;
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
            tasks.spawn(async move { apply_pack(&repo, &key, targets, &bar).await });
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

/// A piece and the file it goes to (backup path, local path).
struct Target {
    piece: Piece,
    file: Arc<(String, PathBuf)>,
}

/// Streams one pack and writes the pieces wanted from it, each checked before it is written.
async fn apply_pack(
    repo: &Repository,
    key: &str,
    mut targets: Vec<Target>,
    bar: &ProgressBar,
) -> Result<(), BackupError> {
    targets.sort_by_key(|t| t.piece.at);
    let first_file = targets
        .first()
        .map(|t| t.file.0.clone())
        .unwrap_or_default();
    let corrupt = |problem: String| BackupError::Corrupt {
        object: key.to_owned(),
        problem,
    };
    let mut decoder = match repo.open_pack(key).await {
        Ok(Some(pack)) => pack,
        Ok(None) => return Err(corrupt(format!("missing, yet it holds {first_file}"))),
        Err(e) => return Err(corrupt(format!("{e} (it holds {first_file})"))),
    };
    let mut index = 0;
    let mut pos = 0u64;
    let mut buf = Vec::new();
    loop {
        let block = match decoder.next_block().await {
            Ok(Some(block)) => block,
            Ok(None) => break,
            Err(e) => {
                let file = targets.get(index).map(|t| t.file.0.as_str()).unwrap_or("");
                return Err(corrupt(format!("{e} (while restoring {file})")));
            }
        };
        let (block_start, block_end) = (pos, pos + block.len() as u64);
        while let Some(target) = targets.get(index) {
            let piece = target.piece;
            let piece_end = piece.at + piece.len;
            if piece.at >= block_end && piece.len > 0 {
                break;
            }
            let from = piece.at.max(block_start);
            let to = piece_end.min(block_end);
            if from < to {
                buf.extend_from_slice(
                    &block[(from - block_start) as usize..(to - block_start) as usize],
                );
            }
            if piece_end > block_end {
                break;
            }
            if crc32fast::hash(&buf) != piece.crc32 {
                return Err(corrupt(format!(
                    "the bytes of {} at offset {} do not match their checksum",
                    target.file.0, piece.file_offset
                )));
            }
            let data = std::mem::take(&mut buf);
            let file = Arc::clone(&target.file);
            let offset = piece.file_offset;
            tokio::task::spawn_blocking(move || write_at(&file.1, offset, &data)).await??;
            bar.inc(piece.len);
            index += 1;
        }
        pos = block_end;
    }
    if let Some(target) = targets.get(index) {
        return Err(corrupt(format!(
            "ends before the bytes of {} at offset {}",
            target.file.0, target.piece.file_offset
        )));
    }
    Ok(())
}

fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<(), BackupError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(BackupError::io("open", path))?;
    file.write_all_at(data, offset)
        .map_err(BackupError::io("write", path))?;
    start_writeback(&file, offset, data.len());
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk now, without waiting, as
/// PostgreSQL's `initdb -S` does before its fsyncs: the disk then works while later packs are
/// decompressed, instead of the whole restore sitting dirty in memory until the fsyncs at the
/// end. Only a hint: durability still comes from those fsyncs, so a failure here is ignored.
fn start_writeback(file: &fs::File, offset: u64, len: usize) {
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
    let paths: Vec<PathBuf> = manifest
        .files
        .iter()
        .filter_map(|f| layout.dest(&f.path))
        .collect();
    let per_task = paths.len().div_ceil(concurrency.max(1)).max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for group in paths.chunks(per_task) {
        let group = group.to_vec();
        tasks.spawn_blocking(move || group.iter().try_for_each(|p| sync_path(p)));
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let layout = Arc::clone(layout);
    let label = manifest.backup_label.clone();
    let map = manifest.tablespace_map.clone();
    let dirs: Vec<PathBuf> = manifest
        .dirs
        .iter()
        .filter_map(|d| layout.dest(&d.path))
        .collect();
    tokio::task::spawn_blocking(move || {
        let target = &layout.target;
        let label_path = target.join("backup_label");
        fs::write(&label_path, label.as_bytes()).map_err(BackupError::io("write", &label_path))?;
        sync_path(&label_path)?;
        // With relocated tablespaces the links already point to the new places; a
        // tablespace_map would make PostgreSQL put them back where they were.
        if let (Some(map), false) = (map, layout.relocated) {
            let map_path = target.join("tablespace_map");
            fs::write(&map_path, map.as_bytes()).map_err(BackupError::io("write", &map_path))?;
            sync_path(&map_path)?;
        }
        for dir in dirs
            .iter()
            .chain([target.clone(), target.join("pg_tblspc")].iter())
        {
            sync_path(dir)?;
        }
        let temp = target.join(CONTROL_TEMP);
        let control = target.join(CONTROL);
        fs::rename(&temp, &control).map_err(BackupError::io("rename", &temp))?;
        sync_path(&target.join("global"))
    })
    .await?
}

fn sync_path(path: &Path) -> Result<(), BackupError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(BackupError::io("fsync", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::tests::sample;
    use crate::backup::manifest::Tablespace;
    use crate::config::FlagValues;
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
            assert!(validate(&m).is_err(), "{bad:?} accepted");
        }
        assert!(validate(&manifest(vec![file("base/1/2")], vec![])).is_ok());
        let ts = |location: &str| Tablespace {
            oid: 1,
            location: location.into(),
        };
        assert!(validate(&manifest(vec![], vec![ts("relative/dir")])).is_err());
        assert!(validate(&manifest(vec![], vec![ts("/srv/../etc")])).is_err());
        assert!(validate(&manifest(vec![], vec![ts("/srv/ts")])).is_ok());
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
        let layout = Layout::new(&target, &m, &[(16390, dir.path().join("ts"))]).unwrap();
        assert_eq!(
            layout.dest("pg_tblspc/16390/PG_15/5/1").unwrap(),
            dir.path().join("ts/PG_15/5/1")
        );
        assert_eq!(layout.dest("pg_tblspc/16390"), None);
        assert_eq!(layout.dest("base/5/1").unwrap(), target.join("base/5/1"));
        fs::create_dir_all(target.join("x")).unwrap();
        assert!(Layout::new(&target, &m, &[(16390, dir.path().join("ts"))]).is_err());
    }

    /// The whole fetch path, catalog included, with a manifest naming a path outside the target:
    /// refused before anything is created.
    #[tokio::test]
    async fn a_manifest_escaping_the_target_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("repo");
        fs::create_dir(&repo_dir).unwrap();
        let settings = crate::config::Settings::load(&FlagValues {
            repo: Some(format!("file://{}", repo_dir.display())),
            ..Default::default()
        })
        .unwrap();
        let repo = Arc::new(Repository::open(&settings).await.unwrap());
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
