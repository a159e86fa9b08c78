//! `backup-fetch --delta`: restores a backup over an existing, stopped data directory of the same
//! cluster, reading the local files and writing only what differs, as pgBackRest's
//! `restore --delta` does. Each file's final content is worked out from the chain as the plain
//! restore builds it (newest layer wins, each layer's size clips older pieces); each part is
//! compared page by page with its pack's page sums (`pagesums.rs`), and only the pages that
//! differ are fetched and written (a backup without sums compares whole pieces by crc32 and
//! fetches cut ones). Files and directories the backup does not have are removed, walking by
//! descriptor without following links, only below the data directory and the backup's version
//! directory in each of its tablespaces; `global/pg_control` is written last, as in a plain
//! restore.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fetch::{base_layers, dest, Dest, FetchOptions, Fetched, CONTROL};
use super::manifest::{FileEntry, Manifest, PackId, Piece};
use super::pagesums::{self, PageSums};
use super::tree::{Root, DIR_MODE_MAX};
use super::{merged_ranges, BackupError, CHUNK};
use crate::repo::packs::WantedPiece;
use crate::repo::{LengthRule, Repository};

/// One part of a file's final content: bytes `range` of `piece` of backup `layer`, or zeros.
#[derive(Clone, Debug)]
struct Part {
    file: usize,
    /// Where it goes in the file.
    offset: u64,
    len: u64,
    source: Source,
    /// It was compared page by page and differs (or holds a page only in part, which cannot be
    /// checked): it is written without reading it again.
    differs: bool,
}

#[derive(Clone, Copy, Debug)]
enum Source {
    /// `piece` of backup `layer` from byte `skip` on; `whole` when all of it survives.
    Piece {
        layer: usize,
        piece: Piece,
        skip: u64,
        whole: bool,
    },
    Zeros,
}

/// A file of the final backup and where it goes.
struct Target {
    path: String,
    dest: Dest,
    size: u64,
    mode: u32,
}

pub(super) async fn fetch(
    repo: Arc<Repository>,
    wanted: &str,
    target: &Path,
    opts: &FetchOptions,
) -> Result<Fetched, BackupError> {
    let name = crate::backup::catalog::resolve_name(&repo, wanted).await?;
    let chain = Arc::new(crate::backup::catalog::chain(&repo, &name).await?);
    let last = &chain[chain.len() - 1];
    let target = std::path::absolute(target).map_err(BackupError::io("resolve", target))?;
    check_target(&target, last)?;
    let bases = base_layers(&chain)?;

    let mut roots = vec![Root::open_existing(&target, "data directory")?];
    let mut tablespaces = BTreeMap::new();
    for ts in &last.tablespaces {
        let dir = opts
            .relocate
            .iter()
            .find(|(oid, _)| *oid == ts.oid)
            .map_or_else(|| PathBuf::from(&ts.location), |(_, d)| d.clone());
        tablespaces.insert(ts.oid, roots.len());
        roots.push(Root::open_existing(
            &dir,
            &format!("tablespace {}", ts.oid),
        )?);
    }
    let targets: Vec<Target> = last
        .files
        .iter()
        .filter_map(|f| {
            dest(&tablespaces, &f.path).map(|dest| Target {
                path: f.path.clone(),
                dest,
                size: f.size,
                mode: f.mode,
            })
        })
        .collect();
    let roots = Arc::new(roots);

    // What the backup does not have goes first (a stale backup_label, WAL, dropped relations).
    let removed = remove_unlisted(&roots, last, &tablespaces, &targets).await?;
    let data = &roots[0];
    for dir in sorted_dirs(last) {
        if let Some(d) = dest(&tablespaces, &dir.0) {
            roots[d.root].make_dir(&d.rel, dir.1)?;
        }
    }
    for (oid, root) in &tablespaces {
        let link = format!("pg_tblspc/{oid}");
        if data.read_link(&link).as_deref() != Some(roots[*root].path()) {
            data.symlink(&link, roots[*root].path())?;
        }
    }

    let by_path: Vec<HashMap<&str, &FileEntry>> = chain
        .iter()
        .map(|m| m.files.iter().map(|f| (f.path.as_str(), f)).collect())
        .collect();
    let parts: Vec<Part> = targets
        .iter()
        .enumerate()
        .flat_map(|(i, t)| parts_of(&by_path, &bases, i, &t.path))
        .collect();
    let targets = Arc::new(targets);
    let needed = compare(&repo, &chain, &roots, &targets, parts, opts.concurrency).await?;
    let written: u64 = needed.iter().map(|p| p.len).sum();
    tracing::info!(
        "--delta: {removed} entries removed; {} parts ({written} bytes) differ and are written",
        needed.len()
    );
    write(&repo, &roots, &targets, &chain, needed, opts.concurrency).await?;
    finish(
        &roots,
        &targets,
        last,
        !opts.relocate.is_empty(),
        opts.concurrency,
    )
    .await?;
    Ok(Fetched {
        name,
        chain: chain.iter().map(|m| m.summary.name.clone()).collect(),
        files: last.files.len(),
        bytes_written: written,
    })
}

/// The target must be a stopped copy of the same cluster.
fn check_target(target: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let what = format!("data directory {}", target.display());
    let meta = std::fs::symlink_metadata(target).map_err(BackupError::io("stat", target))?;
    if !meta.is_dir() {
        return Err(BackupError::invalid(
            what,
            "is not a directory (--delta restores over an existing data directory)",
        ));
    }
    if target.join("postmaster.pid").exists() {
        return Err(BackupError::invalid(
            what,
            "has a postmaster.pid: stop PostgreSQL first (or remove the file of a server that \
             is surely gone)",
        ));
    }
    let mut sysid = [0u8; 8];
    std::fs::File::open(target.join(CONTROL))
        .and_then(|mut f| f.read_exact(&mut sysid))
        .map_err(|e| {
            BackupError::invalid(
                &what,
                format!(
                    "cannot read its global/pg_control ({e}): not a data directory to restore over"
                ),
            )
        })?;
    let found = u64::from_le_bytes(sysid);
    if found != manifest.summary.system_identifier {
        return Err(BackupError::invalid(
            what,
            format!(
                "belongs to cluster {found}, but backup {} is of cluster {}: --delta restores \
                 only over a copy of the same cluster",
                manifest.summary.name, manifest.summary.system_identifier
            ),
        ));
    }
    Ok(())
}

fn sorted_dirs(manifest: &Manifest) -> Vec<(String, u32)> {
    let mut dirs: Vec<(String, u32)> = manifest
        .dirs
        .iter()
        .map(|d| (d.path.clone(), d.mode.min(DIR_MODE_MAX)))
        .collect();
    dirs.sort_by_key(|d| d.0.matches('/').count());
    dirs
}

/// Removes below each root what the backup does not list.
async fn remove_unlisted(
    roots: &Arc<Vec<Root>>,
    manifest: &Manifest,
    tablespaces: &BTreeMap<u32, usize>,
    targets: &[Target],
) -> Result<u64, BackupError> {
    let mut keep: Vec<(HashSet<String>, HashSet<String>)> = vec![Default::default(); roots.len()];
    for t in targets {
        keep[t.dest.root].0.insert(t.dest.rel.clone());
    }
    for dir in &manifest.dirs {
        if let Some(d) = dest(tablespaces, &dir.path) {
            keep[d.root].1.insert(d.rel);
        }
    }
    // A tablespace link is kept only where it already points at its directory.
    for (oid, root) in tablespaces {
        let link = format!("pg_tblspc/{oid}");
        if roots[0].read_link(&link).as_deref() == Some(roots[*root].path()) {
            keep[0].0.insert(link);
        }
    }
    let roots = Arc::clone(roots);
    tokio::task::spawn_blocking(move || {
        let mut removed = 0;
        for (i, (root, (files, dirs))) in roots.iter().zip(&keep).enumerate() {
            removed += root.remove_unlisted(&|rel, is_dir| {
                // A tablespace directory may hold other clusters' version directories: only
                // the backup's own (`PG_<major>_<catalog>`) is made to match.
                let top = rel.split('/').next().unwrap_or(rel);
                if i > 0 && !dirs.contains(top) {
                    return true;
                }
                if is_dir {
                    dirs.contains(rel)
                } else {
                    files.contains(rel)
                }
            })?;
        }
        Ok(removed)
    })
    .await?
}

/// The parts of file `file` (backup path `path`) in its final form: newest layer first, each
/// piece less what newer layers cover or cut off, and zeros where nothing lands.
fn parts_of(
    chain: &[HashMap<&str, &FileEntry>],
    bases: &HashMap<String, usize>,
    file: usize,
    path: &str,
) -> Vec<Part> {
    let Some(&base) = bases.get(path) else {
        return Vec::new();
    };
    let last = chain.len() - 1;
    // What newer layers cover, sorted and merged: a file of a long chain has thousands of
    // pieces, so each lookup must not scan (or sort) them all.
    let mut covered: Vec<(u64, u64)> = Vec::new();
    let mut parts = Vec::new();
    let mut clip = u64::MAX;
    let mut final_size = 0;
    for layer in (base..=last).rev() {
        let Some(entry) = chain[layer].get(path) else {
            continue;
        };
        clip = clip.min(entry.size);
        if layer == last {
            final_size = entry.size;
        }
        // A layer's own pieces do not overlap one another: they cover older layers only.
        let mut this_layer = Vec::with_capacity(entry.pieces.len());
        for piece in &entry.pieces {
            let start = piece.file_offset;
            let end = (start + piece.len).min(clip);
            let free = uncovered(&covered, start, end);
            let whole = free == [(start, start + piece.len)];
            for (a, b) in free {
                parts.push(Part {
                    file,
                    offset: a,
                    len: b - a,
                    source: Source::Piece {
                        layer,
                        piece: *piece,
                        skip: a - start,
                        whole,
                    },
                    differs: false,
                });
            }
            if start < end {
                this_layer.push((start, end));
            }
        }
        covered.append(&mut this_layer);
        covered = merged_ranges(covered);
    }
    for (a, b) in uncovered(&covered, 0, final_size) {
        parts.push(Part {
            file,
            offset: a,
            len: b - a,
            source: Source::Zeros,
            differs: false,
        });
    }
    parts
}

/// The sub-ranges of `start..end` no range of `covered` (sorted, disjoint) overlaps.
fn uncovered(covered: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut free = Vec::new();
    let mut at = start;
    let first = covered.partition_point(|&(_, b)| b <= start);
    for &(a, b) in &covered[first..] {
        if a >= end {
            break;
        }
        if a > at {
            free.push((at, a));
        }
        at = at.max(b);
    }
    if at < end {
        free.push((at, end));
    }
    free
}

/// The parts whose local bytes differ, a file at a time (each read once, in order): a piece is
/// compared page by page with its pack's page sums, so only the pages that differ are fetched;
/// without sums (older backups) a piece that survives whole is compared by its crc32 and a cut
/// one is fetched.
async fn compare(
    repo: &Arc<Repository>,
    chain: &Arc<Vec<Manifest>>,
    roots: &Arc<Vec<Root>>,
    targets: &Arc<Vec<Target>>,
    parts: Vec<Part>,
    concurrency: usize,
) -> Result<Vec<Part>, BackupError> {
    // A file a stretch at a time, so that the few large files that hold most of a cluster are
    // read by several tasks at once (each reads its stretch in order).
    let mut by_file: BTreeMap<(usize, u64), Vec<Part>> = BTreeMap::new();
    for p in parts {
        by_file
            .entry((p.file, p.offset / COMPARE_STRETCH))
            .or_default()
            .push(p);
    }
    let cache = Arc::new(SumsCache::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut files = by_file.into_values();
    let mut needed = Vec::new();
    loop {
        while tasks.len() < concurrency.max(1) {
            let Some(mut parts) = files.next() else {
                break;
            };
            parts.sort_by_key(|p| p.offset);
            let (repo, chain, cache) = (Arc::clone(repo), Arc::clone(chain), Arc::clone(&cache));
            let (roots, targets) = (Arc::clone(roots), Arc::clone(targets));
            tasks.spawn(async move {
                let sums = sums_for(&repo, &chain, &cache, &parts).await;
                tokio::task::spawn_blocking(move || differing(&roots, &targets, parts, &sums))
                    .await?
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        needed.extend(joined??);
    }
    Ok(needed)
}

/// A pack of one layer of the chain.
type LayerPack = (usize, PackId);
/// Its page sums, `None` where they are missing or unreadable.
type SumsOf = Arc<Option<PageSums>>;
/// The page sums of the packs one comparison needs.
type PackSumsOf = HashMap<LayerPack, SumsOf>;

/// Page sums read lately: consecutive files share packs (a pack holds a few consecutive chunks,
/// or a delta's pages of many files). Bounded, so memory does not grow with the cluster.
#[derive(Default)]
struct SumsCache(std::sync::Mutex<VecDeque<(LayerPack, SumsOf)>>);

const SUMS_CACHED: usize = 256;

impl SumsCache {
    fn get(&self, key: LayerPack) -> Option<SumsOf> {
        let cached = self.0.lock().ok()?;
        cached
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| Arc::clone(v))
    }

    fn put(&self, key: LayerPack, sums: SumsOf) {
        if let Ok(mut cached) = self.0.lock() {
            if cached.len() >= SUMS_CACHED {
                cached.pop_front();
            }
            cached.push_back((key, sums));
        }
    }
}

/// The page sums of every pack holding a piece of more than a page that `parts` use.
async fn sums_for(
    repo: &Repository,
    chain: &[Manifest],
    cache: &SumsCache,
    parts: &[Part],
) -> PackSumsOf {
    let mut sums = PackSumsOf::new();
    for p in parts {
        let Source::Piece { layer, piece, .. } = p.source else {
            continue;
        };
        let key = (layer, piece.pack);
        if piece.len <= PAGE as u64 || sums.contains_key(&key) {
            continue;
        }
        let found = match cache.get(key) {
            Some(found) => found,
            None => {
                let found = Arc::new(page_sums(repo, &chain[layer], piece.pack).await);
                cache.put(key, Arc::clone(&found));
                found
            }
        };
        sums.insert(key, found);
    }
    sums
}

/// Reads the page sums of `pack` of `manifest`, when it has them; they are advisory, so a
/// problem costs a warning and a comparison of whole pieces.
async fn page_sums(repo: &Repository, manifest: &Manifest, pack: PackId) -> Option<PageSums> {
    if !manifest.summary.page_sums {
        return None;
    }
    let key = manifest.summary.name.page_sums_key(pack);
    let problem = match repo
        .get_bytes_checked(&key, LengthRule::AtMost(pagesums::MAX_OBJECT))
        .await
    {
        Ok(Some(bytes)) => match PageSums::parse(&bytes) {
            Ok(sums) => return Some(sums),
            Err(problem) => problem,
        },
        Ok(None) => "missing".to_owned(),
        Err(e) => e.to_string(),
    };
    tracing::warn!("page sums {key}: {problem}; its pieces are compared whole");
    None
}

fn differing(
    roots: &[Root],
    targets: &[Target],
    parts: Vec<Part>,
    sums: &PackSumsOf,
) -> Result<Vec<Part>, BackupError> {
    // One window per thread for its whole life: a fresh one per file would cost the page
    // faults of touching it every time.
    thread_local! {
        static WINDOW_BUF: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
    }
    let mut window = WINDOW_BUF.with(|w| w.borrow_mut().take());
    let needed = compare_file(roots, targets, parts, sums, &mut window);
    WINDOW_BUF.with(|w| *w.borrow_mut() = window);
    needed
}

fn compare_file(
    roots: &[Root],
    targets: &[Target],
    parts: Vec<Part>,
    sums: &PackSumsOf,
    window: &mut Option<Vec<u8>>,
) -> Result<Vec<Part>, BackupError> {
    let none = PageSums::default();
    // For the comparisons by crc32 only (older backups, zeros): allocated when first needed.
    let mut buf = Vec::new();
    let mut needed = Vec::new();
    let mut open: Option<(usize, Option<LocalFile>)> = None;
    for p in parts {
        if open.as_ref().is_none_or(|(file, _)| *file != p.file) {
            let t = &targets[p.file];
            let root = &roots[t.dest.root];
            // The window moves from file to file.
            if let Some((_, Some(local))) = open.take() {
                *window = Some(local.window);
            }
            let local = root.open_read(&t.dest.rel)?.map(|file| LocalFile {
                file,
                window: window.take().unwrap_or_else(|| vec![0; WINDOW]),
                start: 0,
                got: None,
            });
            open = Some((p.file, local));
        }
        let Some(local) = open.as_mut().and_then(|(_, f)| f.as_mut()) else {
            needed.push(p);
            continue;
        };
        match p.source {
            Source::Piece {
                layer,
                piece,
                whole,
                ..
            } => match sums
                .get(&(layer, piece.pack))
                .and_then(|s| s.as_ref().as_ref())
                .unwrap_or(&none)
                .of(&piece)
            {
                Some(expected) => differing_pages(local, &p, &expected, &mut needed),
                None => {
                    buf.resize(COMPARE_READ, 0);
                    let mut crc = crc32fast::Hasher::new();
                    let same = whole
                        && local_chunks(&local.file, p.offset, p.len, &mut buf, |b| crc.update(b))
                        && crc.finalize() == piece.crc32;
                    if !same {
                        needed.push(p);
                    }
                }
            },
            Source::Zeros => {
                buf.resize(COMPARE_READ, 0);
                let mut zero = true;
                let read = local_chunks(&local.file, p.offset, p.len, &mut buf, |b| {
                    zero &= b.iter().all(|x| *x == 0)
                });
                if !(read && zero) {
                    needed.push(p);
                }
            }
        }
    }
    if let Some((_, Some(local))) = open.take() {
        *window = Some(local.window);
    }
    Ok(needed)
}

/// Adds to `needed` the runs of part `p` (of a piece whose page checksums are `expected`) whose
/// local pages differ. A page the part holds only in part (cut by a newer layer's unaligned
/// piece) cannot be checked and counts as differing.
fn differing_pages(local: &mut LocalFile, p: &Part, expected: &[u32], needed: &mut Vec<Part>) {
    let Source::Piece {
        layer, piece, skip, ..
    } = p.source
    else {
        return;
    };
    let page = PAGE as u64;
    let end = skip + p.len;
    // Whole pages of the piece inside the part: from the first boundary on, to the last
    // boundary (or the piece's end, whose last page may be short).
    let first = skip.next_multiple_of(page).min(end);
    let last = if end == piece.len {
        end
    } else {
        end / page * page
    }
    .max(first);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut differs = |a: u64, b: u64| match runs.last_mut() {
        Some((_, e)) if *e == a => *e = b,
        _ if a < b => runs.push((a, b)),
        _ => {}
    };
    differs(skip, first);
    let mut at = first;
    while at < last {
        let to = (at + page).min(last);
        let k = usize::try_from(at / page).unwrap_or(usize::MAX);
        let same = local
            .bytes(p.offset + (at - skip), (to - at) as usize)
            .is_some_and(|b| expected.get(k) == Some(&crc32fast::hash(b)));
        if !same {
            differs(at, to);
        }
        at = to;
    }
    differs(last, end);
    needed.extend(runs.into_iter().map(|(a, b)| Part {
        file: p.file,
        offset: p.offset + (a - skip),
        len: b - a,
        source: Source::Piece {
            layer,
            piece,
            skip: a,
            whole: false,
        },
        differs: true,
    }));
}

/// Hands the `len` bytes of `file` at `offset` to `each`, a buffer at a time; whether the file
/// had them all.
fn local_chunks(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]),
) -> bool {
    let mut done = 0;
    while done < len {
        let n = buf
            .len()
            .min(usize::try_from(len - done).unwrap_or(usize::MAX));
        if file.read_exact_at(&mut buf[..n], offset + done).is_err() {
            return false;
        }
        each(&buf[..n]);
        done += n as u64;
    }
    true
}

/// Sets every file's size, then writes the parts that differ, pack by pack.
async fn write(
    repo: &Arc<Repository>,
    roots: &Arc<Vec<Root>>,
    targets: &Arc<Vec<Target>>,
    chain: &Arc<Vec<Manifest>>,
    needed: Vec<Part>,
    concurrency: usize,
) -> Result<(), BackupError> {
    {
        let (roots, targets) = (Arc::clone(roots), Arc::clone(targets));
        tokio::task::spawn_blocking(move || {
            for t in targets.iter() {
                let root = &roots[t.dest.root];
                let file = root.open_or_create(&t.dest.rel, t.mode)?;
                let shown = || root.display(&t.dest.rel);
                // Only where it differs: truncating to the same length still costs a journal
                // transaction per file, and most files keep theirs.
                let len = file
                    .metadata()
                    .map_err(BackupError::io("stat", &shown()))?
                    .len();
                if len != t.size {
                    file.set_len(t.size)
                        .map_err(BackupError::io("set length of", &shown()))?;
                }
            }
            Ok::<_, BackupError>(())
        })
        .await??;
    }
    let mut by_pack: BTreeMap<(usize, PackId), Vec<Part>> = BTreeMap::new();
    let mut zeros = Vec::new();
    for p in needed {
        match p.source {
            Source::Piece { layer, piece, .. } => {
                by_pack.entry((layer, piece.pack)).or_default().push(p)
            }
            Source::Zeros => zeros.push(p),
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut packs = by_pack.into_iter();
    let mut first_error = None;
    loop {
        while tasks.len() < concurrency.max(1) && first_error.is_none() {
            let Some(((layer, pack), parts)) = packs.next() else {
                break;
            };
            let key = chain[layer].summary.name.pack_key(pack);
            let (repo, roots, targets) = (Arc::clone(repo), Arc::clone(roots), Arc::clone(targets));
            tasks.spawn(async move { write_pack(&repo, &roots, &targets, key, parts).await });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        if let Err(e) = joined.map_err(BackupError::from).and_then(|r| r) {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let (roots, targets) = (Arc::clone(roots), Arc::clone(targets));
    tokio::task::spawn_blocking(move || {
        for p in zeros {
            let len = usize::try_from(p.len).unwrap_or(usize::MAX);
            write_at(&roots, &targets[p.file], p.offset, &vec![0; len])?;
        }
        Ok::<_, BackupError>(())
    })
    .await?
}

/// Streams the pieces `parts` need from pack `key` and writes each where it survives.
async fn write_pack(
    repo: &Repository,
    roots: &Arc<Vec<Root>>,
    targets: &Arc<Vec<Target>>,
    key: String,
    parts: Vec<Part>,
) -> Result<(), BackupError> {
    // A piece cut by a newer layer lands in several parts: each is fetched once.
    let mut by_piece: BTreeMap<u64, (Piece, Vec<Part>)> = BTreeMap::new();
    for p in parts {
        if let Source::Piece { piece, .. } = p.source {
            by_piece
                .entry(piece.at)
                .or_insert((piece, Vec::new()))
                .1
                .push(p);
        }
    }
    let by_piece: Vec<(Piece, Vec<Part>)> = by_piece.into_values().collect();
    let Some(first_file) = by_piece.first().map(|(_, parts)| parts[0].file) else {
        return Ok(());
    };
    let restore_error = |source| BackupError::Restore {
        file: targets[first_file].path.clone(),
        source,
    };
    let wanted = by_piece
        .iter()
        .map(|(p, _)| WantedPiece {
            at: p.at,
            len: p.len,
            crc32: p.crc32,
        })
        .collect();
    let mut reader = repo
        .open_pack(&key, wanted)
        .await
        .map_err(restore_error)?
        .ok_or_else(|| BackupError::Corrupt {
            object: key.clone(),
            problem: "missing".into(),
        })?;
    // Pieces are written a batch at a time on a blocking thread, with one read buffer: a delta's
    // pack holds thousands of small pieces, which one by one would cost a thread hop and a
    // buffer each.
    let mut batch: Vec<(Vec<Part>, Vec<u8>)> = Vec::new();
    let mut batched = 0;
    let mut local = vec![0u8; COMPARE_READ];
    loop {
        let next = reader.next().await.map_err(restore_error)?;
        let done = next.is_none();
        if let Some((i, data)) = next {
            let Some((_, parts)) = by_piece.get(i) else {
                continue;
            };
            batched += data.len();
            batch.push((parts.clone(), data));
            if batched < CHUNK as usize {
                continue;
            }
        }
        let (roots, targets) = (Arc::clone(roots), Arc::clone(targets));
        let pieces = std::mem::take(&mut batch);
        batched = 0;
        local = tokio::task::spawn_blocking(move || {
            write_pieces(&roots, &targets, pieces, &mut local).map(|()| local)
        })
        .await??;
        if done {
            return Ok(());
        }
    }
}

/// Writes each fetched piece's parts where they land, except the pages the local files hold.
fn write_pieces(
    roots: &[Root],
    targets: &[Target],
    pieces: Vec<(Vec<Part>, Vec<u8>)>,
    local: &mut [u8],
) -> Result<(), BackupError> {
    // File by file, so each is opened once per batch (a delta's pack mixes many files).
    let mut order: Vec<(&Part, &[u8])> = pieces
        .iter()
        .flat_map(|(parts, data)| parts.iter().map(move |p| (p, data.as_slice())))
        .collect();
    order.sort_by_key(|(p, _)| (p.file, p.offset));
    let mut open: Option<(usize, std::fs::File)> = None;
    for (p, data) in order {
        let Source::Piece { skip, .. } = p.source else {
            continue;
        };
        let t = &targets[p.file];
        let from = usize::try_from(skip).unwrap_or(usize::MAX);
        let bytes = usize::try_from(p.len)
            .ok()
            .and_then(|len| data.get(from..from.checked_add(len)?))
            .ok_or_else(|| BackupError::Corrupt {
                object: t.path.clone(),
                problem: "a piece shorter than its place".into(),
            })?;
        let file = match open.take() {
            Some((i, file)) if i == p.file => file,
            _ => roots[t.dest.root].open_file_rw(&t.dest.rel)?,
        };
        let shown = || roots[t.dest.root].display(&t.dest.rel);
        if p.differs {
            file.write_all_at(bytes, p.offset)
                .map_err(|e| BackupError::io("write", &shown())(e))?;
        } else {
            write_changed(&file, shown, p.offset, bytes, local)?;
        }
        open = Some((p.file, file));
    }
    Ok(())
}

/// What a restore compares before it writes: PostgreSQL's page.
const PAGE: usize = 8192;
/// How much of the local file is read at once for a comparison by crc32 or before a write.
const COMPARE_READ: usize = 32 * PAGE;
/// How much of a local file is read at once for the page comparison.
const WINDOW: usize = 512 * PAGE;
/// How much of a file one comparison task reads.
const COMPARE_STRETCH: u64 = 64 << 20;
/// A local file being compared, read in windows in file order through the page cache, whose
/// readahead keeps the disk busy while the window already read is compared. Direct reads, one
/// window at a time per task, left the disk idle meanwhile and took half as long again
/// (bench/RESULTS.md).
struct LocalFile {
    file: std::fs::File,
    /// [`WINDOW`] bytes.
    window: Vec<u8>,
    /// The file offset of the window.
    start: u64,
    /// How many bytes the window holds, once loaded.
    got: Option<usize>,
}

impl LocalFile {
    /// The `len` bytes (at most a page) at `offset`, or `None` when the file does not have them
    /// all (or cannot be read there: those pages then differ).
    fn bytes(&mut self, offset: u64, len: usize) -> Option<&[u8]> {
        let inside = self.got.is_some()
            && offset >= self.start
            && offset + len as u64 <= self.start + WINDOW as u64;
        if !inside {
            self.start = offset;
            self.got = Some(read_up_to(&self.file, &mut self.window, offset));
        }
        let from = usize::try_from(offset - self.start).ok()?;
        (from + len <= self.got?).then(|| &self.window[from..from + len])
    }
}

/// Writes `data` at `offset` except the pages the local file already holds: a piece cut by a
/// newer layer cannot be checked by its crc32, so it is fetched, and then costs a read rather
/// than a rewrite where the local copy did not change.
fn write_changed(
    file: &std::fs::File,
    shown: impl Fn() -> PathBuf,
    offset: u64,
    data: &[u8],
    local: &mut [u8],
) -> Result<(), BackupError> {
    let mut at = 0;
    while at < data.len() {
        let pos = offset + at as u64;
        let n = local.len().min(data.len() - at);
        let want = &data[at..at + n];
        let have = read_up_to(file, &mut local[..n], pos);
        // Page by page, aligned to the file's pages, so a changed page is one write.
        let mut i = 0;
        while i < n {
            let end = (i + PAGE - ((pos + i as u64) % PAGE as u64) as usize).min(n);
            if end > have || local[i..end] != want[i..end] {
                file.write_all_at(&want[i..end], pos + i as u64)
                    .map_err(|e| BackupError::io("write", &shown())(e))?;
            }
            i = end;
        }
        at += n;
    }
    Ok(())
}

/// Reads into `buf` from `offset` as far as the file goes; how many bytes were read (a read
/// error counts as the end: those bytes are then written).
fn read_up_to(file: &std::fs::File, buf: &mut [u8], offset: u64) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    filled
}

fn write_at(roots: &[Root], t: &Target, offset: u64, data: &[u8]) -> Result<(), BackupError> {
    let root = &roots[t.dest.root];
    root.open_file(&t.dest.rel)?
        .write_all_at(data, offset)
        .map_err(BackupError::io("write", &root.display(&t.dest.rel)))
}

/// fsyncs everything, writes backup_label and tablespace_map, then puts pg_control in place.
async fn finish(
    roots: &Arc<Vec<Root>>,
    targets: &Arc<Vec<Target>>,
    manifest: &Manifest,
    relocated: bool,
    concurrency: usize,
) -> Result<(), BackupError> {
    // Each file durable first, a few at a time.
    let per_task = targets.len().div_ceil(concurrency.max(1)).max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for start in (0..targets.len()).step_by(per_task) {
        let (roots, targets) = (Arc::clone(roots), Arc::clone(targets));
        tasks.spawn_blocking(move || {
            targets[start..(start + per_task).min(targets.len())]
                .iter()
                .try_for_each(|t| roots[t.dest.root].sync(&t.dest.rel))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let roots = Arc::clone(roots);
    let label = manifest.backup_label.clone();
    let map = manifest.tablespace_map.clone();
    let dirs: Vec<String> = sorted_dirs(manifest).into_iter().map(|d| d.0).collect();
    tokio::task::spawn_blocking(move || {
        let data = &roots[0];
        data.write_new("backup_label", label.as_bytes())?;
        // With relocated tablespaces the links already point to the new places.
        if let (Some(map), false) = (map, relocated) {
            data.write_new("tablespace_map", map.as_bytes())?;
        }
        for dir in dirs.iter().filter(|d| !d.starts_with("pg_tblspc/")) {
            data.sync(dir)?;
        }
        for root in roots.iter() {
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

    #[test]
    fn uncovered_ranges() {
        assert_eq!(uncovered(&[], 0, 10), vec![(0, 10)]);
        assert_eq!(uncovered(&[(2, 4), (6, 20)], 0, 10), vec![(0, 2), (4, 6)]);
        assert_eq!(uncovered(&[(0, 10)], 3, 5), vec![]);
    }

    /// Pages come back whole, across windows and up to a short end; a page the file does not
    /// have (whole) is `None`.
    #[test]
    fn local_pages_read_in_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..WINDOW * 2 + 3 * PAGE + 100)
            .map(|i| (i % 253) as u8)
            .collect();
        std::fs::write(&path, &content).unwrap();
        let mut local = LocalFile {
            file: std::fs::File::open(&path).unwrap(),
            window: vec![0; WINDOW],
            start: 0,
            got: None,
        };
        let mut at = 0;
        while at < content.len() {
            let len = PAGE.min(content.len() - at);
            let got = local.bytes(at as u64, len).map(<[u8]>::to_vec);
            assert_eq!(got.as_deref(), Some(&content[at..at + len]), "{at}");
            at += len;
        }
        let end = content.len() as u64;
        assert!(local.bytes(end - 100, PAGE).is_none());
        assert!(local.bytes(end + PAGE as u64, PAGE).is_none());
        // Backwards, too (parts of a file come in order, but a window must not assume it).
        assert_eq!(
            local.bytes(PAGE as u64, 10),
            Some(&content[PAGE..PAGE + 10])
        );
    }
}
