//! `backup-push`: a full or page-level delta base backup of a running cluster on this host.
//!
//! Understands the order an online backup must follow: start the backup (non-exclusive, fast
//! checkpoint by default), decide full or delta against the newest backup of the same timeline,
//! walk and read PGDATA, read `global/pg_control` last, stop the backup (which waits for the
//! backup's WAL to be archived), then write the manifest, last and only if absent.
//!
//! Reading and storing runs as a bounded pipeline: a producer cuts files into [`CHUNK`]s and
//! queues them (bounded channel); `concurrency` workers each read a chunk straight into their
//! own pack buffer (keeping, for a delta, only the pages [`page::delta_needs`]) and, once the
//! buffer reaches [`PACK_TARGET`], compress it on a blocking thread and upload it as one object.
//! With more workers than cores, reads, compression and fsyncs of different workers overlap.
//! Each byte read is checksummed once: a piece covering a whole chunk reuses the chunk's crc32,
//! and a pack's content checksum is combined from its pieces'. Memory is about
//! `concurrency × (PACK_TARGET + CHUNK)` plus each pack's compressed copy while it is stored,
//! whatever the size of the cluster; small files share packs, large files spread over workers.
//! Used by the CLI.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use indicatif::ProgressBar;
use tokio::sync::{mpsc, Mutex};
use walvault_wal::Lsn;

use super::blockmap::{self, MapRequest};
use super::external_config;
use super::manifest::{
    BackupKind, BackupName, DeltaSource, DirEntry, FileEntry, Manifest, PackId, PageFailures,
    Piece, Storage, Summary, Tablespace, FORMAT,
};
use super::page::{self, BlockNo, BLCKSZ};
use super::pagesums::{self, PackSums};
use super::stop_wal::{self, Shipper, StandbyOptions, StopWal};
use super::walk::{self, Found};
use super::{progress, BackupError, CHUNK, PACK_TARGET};
use crate::pg::{BackupSession, BackupStop, ConnTarget, ServerInfo, Timeouts};
use crate::repo::identity::{self, Identity};
use crate::repo::packs::PackContent;
use crate::repo::Repository;
use crate::repo::{Committed, PutMode};

/// Full or delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Delta when a usable parent exists and its chain is short enough, else full.
    Auto,
    Full,
    /// Delta even past `delta_max_steps`; full (with a warning) when no parent can serve.
    Delta,
}

#[derive(Clone, Debug)]
pub(crate) struct PushOptions {
    pub(crate) pgdata: Option<PathBuf>,
    pub(crate) dbname: Option<String>,
    pub(crate) mode: Mode,
    pub(crate) delta_max_steps: u32,
    pub(crate) concurrency: usize,
    pub(crate) fast_checkpoint: bool,
    pub(crate) progress: bool,
    /// A spool directory to leave out when it lies inside PGDATA.
    pub(crate) spool_dir: Option<PathBuf>,
    /// Bounds on the SQL session's calls.
    pub(crate) pg_timeouts: Timeouts,
    /// How a backup from a standby waits for its WAL.
    pub(crate) standby: StandbyOptions,
    /// For a delta read from block maps, also run the page scan and fail if the map missed a page.
    pub(crate) verify_map: bool,
}

/// What a push stored.
#[derive(Clone, Debug)]
pub(crate) struct Pushed {
    pub(crate) summary: Summary,
    pub(crate) files: usize,
    /// Bytes read from the data directory (a delta from block maps reads only listed blocks).
    pub(crate) read: u64,
}

/// One file being backed up.
struct FileCtx {
    path: String,
    source: PathBuf,
    mode: u32,
    /// The size the walk saw: the file is read up to here, in chunks.
    size: u64,
    /// For a delta of a relation file the parent holds: the parent's size of it.
    parent_size: Option<u64>,
    /// Whether to check data checksums of its pages.
    check_pages: bool,
    segno: u32,
    /// For a delta from block maps: the byte ranges to read (offset, length), all kept.
    reads: Option<Arc<[(u64, u64)]>>,
}

struct Job {
    file: usize,
    offset: u64,
    len: u64,
}

/// Jobs of one file handed to a worker together, at most [`CHUNK`] bytes in all: a delta from
/// block maps reads thousands of scattered pages, which one at a time would cost a thread hop
/// each.
type Batch = Vec<Job>;

/// What reading one chunk produced.
struct ChunkDone {
    file: usize,
    offset: u64,
    read: u64,
    /// crc32 of all the bytes read, kept or not: part of the file's checksum.
    crc: crc32fast::Hasher,
    pieces: Vec<Piece>,
    failures: Vec<u32>,
    vanished: bool,
}

struct Shared {
    repo: Arc<Repository>,
    name: BackupName,
    files: Vec<FileCtx>,
    /// The parent's start LSN for a delta.
    delta_base: Option<Lsn>,
    /// The backup's start LSN when the cluster has data checksums.
    verify_from: Option<Lsn>,
    next_pack: AtomicU32,
    stored: AtomicU64,
    /// Bytes read from the data directory (the bar's position is its total once finished).
    read: AtomicU64,
    bar: ProgressBar,
}

/// Runs a backup.
pub(crate) async fn push(repo: Arc<Repository>, opts: &PushOptions) -> Result<Pushed, BackupError> {
    let (session, pgdata) = preflight(&repo, opts).await?;
    let info = session.info().clone();
    // The catalog is read while PostgreSQL checkpoints: for a small delta, each is a good part
    // of the whole. A failure of either ends the session, which aborts the started backup.
    let (catalog, started) = tokio::try_join!(readable_catalog(&repo), start(&session, opts))?;
    let parent = choose_parent_manifest(&repo, &catalog, opts, &started).await?;
    let mut planned = plan_files(&pgdata, opts, parent.as_ref(), &info).await?;
    let external = external_config(&session, &pgdata).await?;
    add_external(&mut planned, &external)?;
    let delta_source = match &parent {
        Some(p) => {
            Some(blockmap_reads(&repo, &pgdata, &info, p, &started, &mut planned.files).await)
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        repo: Arc::clone(&repo),
        name: started.name.clone(),
        bar: progress::bytes_bar(planned.total(), opts.progress, "backup"),
        files: std::mem::take(&mut planned.files),
        delta_base: parent.as_ref().map(|p| p.summary.start_lsn),
        verify_from: info.data_checksums.then_some(started.lsn),
        next_pack: AtomicU32::new(0),
        stored: AtomicU64::new(0),
        read: AtomicU64::new(0),
    });
    let done = copy_files(&shared, opts.concurrency).await?;
    if let (Some(DeltaSource::Wal), Some(p), true) = (delta_source, &parent, opts.verify_map) {
        verify_map(&shared, p.summary.start_lsn, started.lsn).await?;
    }

    tracing::info!("all files read; stopping the backup");
    let stop = session.stop().await?;
    let shipper = if info.in_recovery {
        Some(Shipper::Primary(&opts.standby))
    } else if info.archive_mode == "off" {
        // Nothing archives here; the warning at the start said what a restore will need.
        None
    } else {
        Some(Shipper::Archiver {
            session: &session,
            pgdata: &pgdata,
        })
    };
    if let Some(shipper) = shipper {
        let wal = StopWal {
            repo: &repo,
            system_identifier: info.system_identifier,
            timeline: started.timeline,
            start_lsn: started.lsn,
            stop_lsn: stop.lsn,
            segment_size: info.wal_segment_size,
            reply: opts.pg_timeouts.reply,
            progress: opts.progress,
        };
        stop_wal::wait_for_stop_wal(&wal, &shipper).await?;
    }
    tracing::info!("backup {} stopped at {}", started.name, stop.lsn);
    crate::failpoint::pause_if_enabled("backup-push-stopped").await;
    let mut manifest = manifest(
        &shared,
        done,
        &info,
        started,
        parent.as_ref(),
        stop,
        planned,
    );
    manifest.external_config = external.entries;
    manifest.summary.delta_source = delta_source;
    store_manifest(&repo, &manifest).await?;
    crate::failpoint::pause_if_enabled("backup-push-manifest-written").await;
    Ok(Pushed {
        files: manifest.files.len(),
        read: shared.read.load(Ordering::Relaxed),
        summary: manifest.summary,
    })
}

/// Connects, checks that the server and its data directory can be backed up here and that the
/// repository holds this cluster (recording it in a new repository).
async fn preflight(
    repo: &Repository,
    opts: &PushOptions,
) -> Result<(BackupSession, PathBuf), BackupError> {
    let target = ConnTarget::resolve(opts.dbname.as_deref())?;
    let session = BackupSession::connect(&target, opts.pg_timeouts).await?;
    let info = session.info();
    if info.in_recovery {
        tracing::info!(
            "PostgreSQL at {} is a standby: files are read from it, WAL comes from the primary's archiving",
            session.target()
        );
    }
    if info.block_size as usize != BLCKSZ {
        return Err(BackupError::invalid(
            format!("PostgreSQL at {}", session.target()),
            format!(
                "block size {} is not supported (only {BLCKSZ})",
                info.block_size
            ),
        ));
    }
    let pgdata = opts
        .pgdata
        .clone()
        .or_else(|| info.data_directory.clone())
        .ok_or_else(|| {
            BackupError::invalid(
                "the data directory",
                "unknown: pass --pgdata or set PGDATA (the server does not show data_directory to this user)",
            )
        })?;
    check_pgdata(&pgdata, info, session.target())?;
    if info.archive_mode == "off" && !info.in_recovery {
        // wal-receive may be streaming instead; without either, the backup cannot be restored.
        tracing::warn!(
            "archive_mode is off: restoring this backup needs the WAL from its start to its stop \
             in the repository (archive_command = 'walvault wal-push %p' or wal-receive)"
        );
    }
    let found = Identity {
        system_identifier: info.system_identifier,
        pg_major: info.major(),
        wal_segment_size: info.wal_segment_size,
        created_at: rfc3339(SystemTime::now()),
    };
    identity::ensure(
        repo,
        &found,
        &format!("the cluster at {}", pgdata.display()),
    )
    .await?;
    Ok((session, pgdata))
}

/// Where and when the backup started, and the name that follows from it.
struct Started {
    name: BackupName,
    time: String,
    lsn: Lsn,
    timeline: u32,
}

/// The backups a delta may take as its parent: none when this writer cannot read manifests.
async fn readable_catalog(repo: &Repository) -> Result<Vec<Summary>, BackupError> {
    // A writer holding only recipients cannot read an encrypted repository's manifests (that is
    // what public-key writes are for), so it has no parent to take a delta against.
    if repo.can_decrypt().await? {
        crate::backup::catalog::list(repo).await
    } else {
        tracing::info!(
            "no encryption identity to read the backups of {}: taking a full backup",
            repo.url()
        );
        Ok(Vec::new())
    }
}

async fn start(session: &BackupSession, opts: &PushOptions) -> Result<Started, BackupError> {
    let time = rfc3339(SystemTime::now());
    let (lsn, timeline) = session
        .start(&format!("walvault {time}"), opts.fast_checkpoint)
        .await?;
    let name = BackupName::new(&compact_time(&time), timeline, lsn);
    crate::failpoint::pause_if_enabled("backup-push-started").await;
    tracing::info!("backup {name} started at {lsn} on timeline {timeline}");
    Ok(Started {
        name,
        time,
        lsn,
        timeline,
    })
}

/// The manifest of the backup this one is a delta of, if it is one.
async fn choose_parent_manifest(
    repo: &Repository,
    catalog: &[Summary],
    opts: &PushOptions,
    started: &Started,
) -> Result<Option<Manifest>, BackupError> {
    let Some(parent) = choose_parent(catalog, opts, started.timeline, started.lsn) else {
        return Ok(None);
    };
    let parent = crate::backup::catalog::manifest(repo, &parent.name).await?;
    tracing::info!(
        "delta against {} (taken at {})",
        parent.summary.name,
        parent.summary.start_lsn
    );
    Ok(Some(parent))
}

/// What the walk of PGDATA found to back up.
struct Planned {
    dirs: Vec<DirEntry>,
    /// Every file to copy, `global/pg_control` last (handed over to the workers).
    files: Vec<FileCtx>,
    tablespaces: Vec<Tablespace>,
}

impl Planned {
    fn total(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Walks PGDATA and decides, file by file, how each is read: relation files whose parent has a
/// copy are read page by page for a delta, and pages are verified where checksums are on.
async fn plan_files(
    pgdata: &Path,
    opts: &PushOptions,
    parent: Option<&Manifest>,
    info: &ServerInfo,
) -> Result<Planned, BackupError> {
    let excluded: Vec<PathBuf> = opts.spool_dir.iter().cloned().collect();
    let walk_root = pgdata.to_path_buf();
    let walked = tokio::task::spawn_blocking(move || walk::walk(&walk_root, &excluded)).await??;
    let parent_sizes: HashMap<&str, u64> = parent
        .iter()
        .flat_map(|p| p.files.iter())
        .map(|f| (f.path.as_str(), f.size))
        .collect();
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut control = None;
    for Found {
        path,
        source,
        mode,
        size,
    } in walked.entries
    {
        let Some(size) = size else {
            dirs.push(DirEntry { path, mode });
            continue;
        };
        let paged = walk::is_paged_relation(&path);
        let ctx = FileCtx {
            parent_size: if paged && !walk::is_visibility_map(&path) {
                parent_sizes.get(path.as_str()).copied()
            } else {
                None
            },
            check_pages: paged && info.data_checksums,
            segno: walk::segment_number(&path),
            reads: None,
            path,
            source,
            mode,
            size,
        };
        if ctx.path == "global/pg_control" {
            control = Some(ctx);
        } else {
            files.push(ctx);
        }
    }
    let control = control.ok_or_else(|| {
        BackupError::invalid(pgdata.display().to_string(), "no global/pg_control")
    })?;
    // pg_control goes last, as PostgreSQL's own base backup sends it.
    files.push(control);
    let tablespaces = walked
        .tablespaces
        .iter()
        .map(|t| Tablespace {
            oid: t.oid,
            location: t.location.display().to_string(),
        })
        .collect();
    Ok(Planned {
        dirs,
        files,
        tablespaces,
    })
}

/// The configuration files the server reads from outside `pgdata` (Debian's /etc/postgresql).
async fn external_config(
    session: &BackupSession,
    pgdata: &Path,
) -> Result<external_config::Discovered, BackupError> {
    let settings = session.config_files().await?;
    let pgdata = pgdata.to_path_buf();
    let found = tokio::task::spawn_blocking(move || external_config::discover(&pgdata, &settings))
        .await??;
    for f in &found.files {
        tracing::info!(
            "configuration outside the data directory: {} (stored as {})",
            f.source.display(),
            f.path
        );
    }
    Ok(found)
}

/// Adds the external configuration files to the plan, before `global/pg_control` (last).
fn add_external(
    planned: &mut Planned,
    external: &external_config::Discovered,
) -> Result<(), BackupError> {
    if let Some(clash) = external.dirs.iter().find(|d| {
        planned.dirs.iter().any(|p| &p.path == *d) || planned.files.iter().any(|f| &f.path == *d)
    }) {
        return Err(BackupError::invalid(
            format!("data directory entry {clash}"),
            "the data directory already holds walvault's directory for external configuration",
        ));
    }
    planned.dirs.extend(external.dirs.iter().map(|d| DirEntry {
        path: d.clone(),
        mode: 0o700,
    }));
    let control = planned.files.len().saturating_sub(1);
    let files = external.files.iter().map(|f| FileCtx {
        path: f.path.clone(),
        source: f.source.clone(),
        mode: f.mode,
        size: f.size,
        parent_size: None,
        check_pages: false,
        segno: 0,
        reads: None,
    });
    planned.files.splice(control..control, files);
    Ok(())
}

/// Decides how a delta learns what changed: from the block maps of the WAL since the parent's
/// start (setting each relation file's reads), or, when they cannot tell, by the page scan.
async fn blockmap_reads(
    repo: &Arc<Repository>,
    pgdata: &Path,
    info: &ServerInfo,
    parent: &Manifest,
    started: &Started,
    files: &mut [FileCtx],
) -> DeltaSource {
    let seg_size = walvault_wal::WalSegmentSize::new(u64::from(info.wal_segment_size));
    let major = walvault_wal::PgMajor::from_number(info.major());
    let (Ok(seg_size), Some(major)) = (seg_size, major) else {
        tracing::info!("delta by page scan: the server's WAL is not one walvault maps");
        return DeltaSource::Scan;
    };
    let request = MapRequest {
        repo,
        pgdata,
        timeline: started.timeline,
        seg_size,
        major,
        from: parent.summary.start_lsn,
        to: started.lsn,
    };
    let map = match blockmap::compose(&request).await {
        Ok(map) => map,
        Err(why) => {
            tracing::info!("delta by page scan (reads every page): {why}");
            return DeltaSource::Scan;
        }
    };
    let (mut mapped, mut bytes) = (0, 0);
    for f in files.iter_mut() {
        let Some(parent_size) = f.parent_size else {
            continue;
        };
        if let Some(reads) = map.reads(&f.path, f.size, parent_size) {
            mapped += 1;
            bytes += reads.iter().map(|(_, len)| len).sum::<u64>();
            f.reads = Some(reads.into());
        }
    }
    tracing::info!(
        "delta from the WAL's block maps since {}: {mapped} relation files, {bytes} bytes to read",
        parent.summary.start_lsn
    );
    DeltaSource::Wal
}

/// `--verify-map`: the page scan over every file read from the map must find nothing it missed.
async fn verify_map(shared: &Shared, from: Lsn, to: Lsn) -> Result<(), BackupError> {
    let checked: Vec<blockmap::Checked> = shared
        .files
        .iter()
        .filter_map(|f| {
            Some(blockmap::Checked {
                path: f.path.clone(),
                source: f.source.clone(),
                size: f.size,
                reads: Arc::clone(f.reads.as_ref()?),
            })
        })
        .collect();
    let pages = tokio::task::spawn_blocking(move || blockmap::verify(&checked, from, to))
        .await?
        .map_err(|problem| BackupError::invalid("--verify-map", problem))?;
    tracing::info!("--verify-map: the page scan of {pages} pages found nothing the map missed");
    Ok(())
}

/// Reads, packs and stores every file: all but the last (`global/pg_control`) by `concurrency`
/// workers, then that one alone.
async fn copy_files(
    shared: &Arc<Shared>,
    concurrency: usize,
) -> Result<Vec<ChunkDone>, BackupError> {
    let control = shared.files.len() - 1;
    let mut done = run_workers(shared, 0..control, concurrency).await?;
    done.extend(run_workers(shared, control..control + 1, 1).await?);
    shared.bar.finish_and_clear();
    Ok(done)
}

/// The manifest of a backup whose files are all stored and whose stop call returned.
fn manifest(
    shared: &Shared,
    done: Vec<ChunkDone>,
    info: &ServerInfo,
    started: Started,
    parent: Option<&Manifest>,
    stop: BackupStop,
    planned: Planned,
) -> Manifest {
    let (file_entries, failures) = assemble(shared, done);
    for f in &failures {
        tracing::warn!(
            "data checksum failures in {} (blocks {:?}); the backup goes on and records them",
            f.path,
            f.blocks
        );
    }
    let summary = Summary {
        format: FORMAT,
        name: started.name,
        kind: if parent.is_some() {
            BackupKind::Delta
        } else {
            BackupKind::Full
        },
        parent: parent.map(|p| p.summary.name.clone()),
        delta_base_lsn: parent.map(|p| p.summary.start_lsn),
        delta_depth: parent.map_or(0, |p| p.summary.delta_depth + 1),
        start_time: started.time,
        stop_time: rfc3339(SystemTime::now()),
        start_lsn: started.lsn,
        stop_lsn: stop.lsn,
        timeline: started.timeline,
        delta_source: None,
        page_sums: true,
        pg_version_num: info.version_num,
        system_identifier: info.system_identifier,
        wal_segment_size: info.wal_segment_size,
        data_checksums: info.data_checksums,
        original_size: file_entries.iter().map(|f| f.size).sum(),
        stored_size: shared.stored.load(Ordering::Relaxed),
        packs: shared.next_pack.load(Ordering::Relaxed),
        page_checksum_failures: failures,
    };
    Manifest {
        summary,
        backup_label: stop.backup_label,
        tablespace_map: stop.tablespace_map,
        tablespaces: planned.tablespaces,
        dirs: planned.dirs,
        files: file_entries,
        external_config: Vec::new(),
    }
}

/// Stores the manifest, last and only if absent: from now on the backup exists.
async fn store_manifest(repo: &Repository, manifest: &Manifest) -> Result<(), BackupError> {
    let name = &manifest.summary.name;
    match repo
        .put_bytes(
            &name.manifest_key(),
            &manifest.to_json()?,
            PutMode::IfAbsent,
        )
        .await?
        .committed
    {
        Committed::Created => Ok(()),
        Committed::AlreadyExists => Err(BackupError::invalid(
            format!("backup {name}"),
            "a manifest with this name already exists; nothing was replaced",
        )),
    }
}

/// The newest backup a delta may build on, if the options allow a delta at all.
fn choose_parent<'a>(
    catalog: &'a [Summary],
    opts: &PushOptions,
    timeline: u32,
    start_lsn: Lsn,
) -> Option<&'a Summary> {
    if opts.mode == Mode::Full {
        return None;
    }
    let Some(latest) = catalog.last() else {
        if opts.mode == Mode::Delta {
            tracing::warn!("no backup to take a delta against: taking a full backup");
        }
        return None;
    };
    // Page LSNs say "unchanged since the parent" only along one history: after a promotion a
    // page of the new timeline can carry an LSN older than the parent's start.
    let usable = latest.timeline == timeline && latest.stop_lsn <= start_lsn;
    if !usable {
        tracing::info!(
            "newest backup {} is on timeline {} (now {timeline}): taking a full backup",
            latest.name,
            latest.timeline
        );
        return None;
    }
    if opts.mode == Mode::Auto && latest.delta_depth + 1 > opts.delta_max_steps {
        tracing::info!(
            "{} deltas since the last full backup (delta_max_steps {}): taking a full backup",
            latest.delta_depth,
            opts.delta_max_steps
        );
        return None;
    }
    Some(latest)
}

/// Refuses a data directory that is not the one of the server we talk to.
fn check_pgdata(pgdata: &Path, info: &ServerInfo, target: &str) -> Result<(), BackupError> {
    let what = format!("data directory {}", pgdata.display());
    let version = std::fs::read_to_string(pgdata.join("PG_VERSION")).map_err(|e| {
        BackupError::invalid(
            &what,
            format!("cannot read PG_VERSION ({e}): not a PostgreSQL data directory"),
        )
    })?;
    let mut control = [0u8; 8];
    File::open(pgdata.join("global/pg_control"))
        .and_then(|mut f| f.read_exact(&mut control))
        .map_err(|e| BackupError::invalid(&what, format!("cannot read global/pg_control: {e}")))?;
    let sysid = u64::from_le_bytes(control);
    if version.trim() != info.major().to_string() || sysid != info.system_identifier {
        return Err(BackupError::invalid(
            what,
            format!(
                "it belongs to PostgreSQL {} cluster {sysid}, but the server at {target} is \
                 PostgreSQL {} cluster {}; pass the server's --pgdata",
                version.trim(),
                info.major(),
                info.system_identifier
            ),
        ));
    }
    Ok(())
}

/// How far ahead of the workers a delta from block maps asks the kernel to read the blocks it
/// will want: scattered reads then have many requests in flight instead of one per worker.
const PREFETCH_RANGES: usize = 1024;
const PREFETCH_BYTES: u64 = 64 << 20;

/// Read-ahead advice (`posix_fadvise(WILLNEED)`) for the ranges of one file of a delta from
/// block maps. Advice only: a failure to open or advise costs speed, never correctness.
struct Prefetch {
    file: File,
    /// The first range not yet advised.
    next: usize,
    /// Bytes advised and not yet handed to a worker.
    ahead: u64,
}

impl Prefetch {
    fn open(ctx: &FileCtx) -> Option<Prefetch> {
        ctx.reads.as_ref()?;
        Some(Prefetch {
            file: File::open(&ctx.source).ok()?,
            next: 0,
            ahead: 0,
        })
    }

    /// Called as range `at` is handed out: advises the ranges after it, within the bounds.
    fn advise_past(&mut self, reads: &[(u64, u64)], at: usize) {
        if self.next > at {
            self.ahead = self.ahead.saturating_sub(reads[at].1);
        } else {
            self.next = at + 1;
            self.ahead = 0;
        }
        while self.next < reads.len()
            && self.next - at < PREFETCH_RANGES
            && self.ahead < PREFETCH_BYTES
        {
            let (start, len) = reads[self.next];
            let _ = rustix::fs::fadvise(
                &self.file,
                start,
                std::num::NonZeroU64::new(len),
                rustix::fs::Advice::WillNeed,
            );
            self.ahead += len;
            self.next += 1;
        }
    }
}

/// Reads files `range` of `shared.files` with `concurrency` workers.
async fn run_workers(
    shared: &Arc<Shared>,
    range: std::ops::Range<usize>,
    concurrency: usize,
) -> Result<Vec<ChunkDone>, BackupError> {
    let concurrency = concurrency.max(1);
    let (tx, rx) = mpsc::channel::<Batch>(concurrency * 2);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (shared, rx) = (Arc::clone(shared), Arc::clone(&rx));
        workers.spawn(worker(shared, rx));
    }
    let mut done = Vec::new();
    for file in range {
        let size = shared.files[file].size;
        let whole = [(0, size)];
        let reads = shared.files[file].reads.as_deref().unwrap_or(&whole);
        if size == 0 || reads.is_empty() {
            // Nothing to read: the file is recorded empty, or (nothing changed) with its size
            // and its pages from the parent.
            done.push(ChunkDone {
                file,
                offset: 0,
                read: 0,
                crc: crc32fast::Hasher::new(),
                pieces: Vec::new(),
                failures: Vec::new(),
                vanished: !shared.files[file].source.exists(),
            });
            continue;
        }
        let mut prefetch = Prefetch::open(&shared.files[file]);
        let mut batch = Batch::new();
        let mut batched = 0;
        for (i, &(start, len)) in reads.iter().enumerate() {
            if let Some(p) = prefetch.as_mut() {
                p.advise_past(reads, i);
            }
            let mut offset = start;
            while offset < start + len {
                let len = CHUNK.min(start + len - offset);
                if batched + len > CHUNK && !batch.is_empty() {
                    batched = 0;
                    if tx.send(std::mem::take(&mut batch)).await.is_err() {
                        break; // every worker stopped: their error is reported below
                    }
                }
                batch.push(Job { file, offset, len });
                batched += len;
                offset += len;
            }
        }
        if !batch.is_empty() && tx.send(batch).await.is_err() {
            break;
        }
    }
    drop(tx);
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        match joined? {
            Ok(mut chunks) => done.append(&mut chunks),
            Err(e) => {
                first_error.get_or_insert(e);
                // Stop the others too: their queue is gone once we return.
                rx.lock().await.close();
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// One pack being filled by one worker. Chunks are read straight into the tail of its buffer
/// (for a delta, the pages to keep are then moved down in place), and the buffer is reused from
/// pack to pack: steady-state backups copy no content between buffers and allocate no large
/// ones, so memory stays flat instead of growing with allocator fragmentation.
struct PackBuf {
    id: Option<PackId>,
    content: Vec<u8>,
    /// crc32 of `content`, combined from the pieces' checksums as they are appended, so the
    /// encoder need not hash the content again.
    crc: crc32fast::Hasher,
    /// The page checksums of its pieces, stored beside it.
    sums: PackSums,
}

async fn worker(
    shared: Arc<Shared>,
    jobs: Arc<Mutex<mpsc::Receiver<Batch>>>,
) -> Result<Vec<ChunkDone>, BackupError> {
    let mut done = Vec::new();
    let mut pack = PackBuf {
        id: None,
        content: Vec::with_capacity(PACK_TARGET + CHUNK as usize),
        crc: crc32fast::Hasher::new(),
        sums: PackSums::new(),
    };
    loop {
        let batch = jobs.lock().await.recv().await;
        let Some(batch) = batch else { break };
        // A pack is closed once it reaches the target, so it never holds more than the target
        // plus one chunk and the buffer never grows past its initial capacity.
        if pack.content.len() >= PACK_TARGET {
            pack = store_pack(&shared, pack).await?;
        }
        let id = *pack
            .id
            .get_or_insert_with(|| PackId(shared.next_pack.fetch_add(1, Ordering::Relaxed)));
        let job_shared = Arc::clone(&shared);
        let (filled, chunks) = tokio::task::spawn_blocking(move || {
            let chunks: Result<Vec<ChunkDone>, BackupError> = batch
                .iter()
                .map(|job| read_chunk(&job_shared, job, &mut pack, id))
                .collect();
            chunks.map(|chunks| (pack, chunks))
        })
        .await??;
        pack = filled;
        for chunk in chunks {
            shared.bar.inc(chunk.read);
            shared.read.fetch_add(chunk.read, Ordering::Relaxed);
            done.push(chunk);
        }
    }
    if pack.id.is_some() {
        store_pack(&shared, pack).await?;
    }
    Ok(done)
}

/// Uploads one pack (the repository compresses it on a blocking thread, so it proceeds on one
/// core while other workers read or compress on the other), then hands its buffer back emptied
/// for the next one.
async fn store_pack(shared: &Shared, mut pack: PackBuf) -> Result<PackBuf, BackupError> {
    let Some(id) = pack.id.take() else {
        return Ok(pack);
    };
    let key = shared.name.pack_key(id);
    let content = PackContent {
        bytes: std::mem::take(&mut pack.content),
        crc: std::mem::replace(&mut pack.crc, crc32fast::Hasher::new()),
    };
    let sums_key = shared.name.page_sums_key(id);
    let sums = pack.sums.take();
    let ((content, stored), sums_stored) = tokio::try_join!(
        shared.repo.put_pack(&key, content),
        shared.repo.put_bytes(&sums_key, &sums, PutMode::IfAbsent)
    )?;
    pack.content = content.bytes;
    // Names carry the start LSN, which every pg_backup_start moves on, so a pack of the same
    // name with other content can only come from a concurrent push that shared our checkpoint:
    // never replace it. (One with exactly this content, a retried PUT's own, counts as stored.)
    for (key, committed) in [(&key, stored.committed), (&sums_key, sums_stored.committed)] {
        if committed == Committed::AlreadyExists {
            return Err(BackupError::invalid(
                format!("backup {}", shared.name),
                format!("{key} already exists: is another backup-push running?"),
            ));
        }
    }
    shared.stored.fetch_add(
        stored.stored_len + sums_stored.stored_len,
        Ordering::Relaxed,
    );
    tracing::debug!("stored {key} ({} bytes)", stored.stored_len);
    crate::failpoint::pause_if_enabled("backup-push-pack-stored").await;
    Ok(pack)
}

/// Reads one chunk of a file onto the end of `pack`'s content, keeps there what this backup
/// must store of it (as pieces of pack `id`) and says what it read.
fn read_chunk(
    shared: &Shared,
    job: &Job,
    pack: &mut PackBuf,
    id: PackId,
) -> Result<ChunkDone, BackupError> {
    let ctx = &shared.files[job.file];
    let mut result = ChunkDone {
        file: job.file,
        offset: job.offset,
        read: 0,
        crc: crc32fast::Hasher::new(),
        pieces: Vec::new(),
        failures: Vec::new(),
        vanished: false,
    };
    let mut file = match File::open(&ctx.source) {
        Ok(f) => f,
        // Dropped during the backup: WAL replay removes it anyway.
        Err(e) if e.kind() == ErrorKind::NotFound => {
            result.vanished = true;
            return Ok(result);
        }
        Err(e) => return Err(BackupError::io("open", &ctx.source)(e)),
    };
    file.seek(SeekFrom::Start(job.offset))
        .map_err(BackupError::io("seek", &ctx.source))?;
    let start = pack.content.len();
    // A file may shrink (truncation) or grow while it is read; take what is there up to the
    // size seen at the walk. Replay of the backup's WAL brings either case to the right state.
    (&mut file)
        .take(job.len)
        .read_to_end(&mut pack.content)
        .map_err(BackupError::io("read", &ctx.source))?;
    let raw = &pack.content[start..];
    result.read = raw.len() as u64;
    // Jobs start on a page boundary, so these are the file's pages.
    let page_crcs = pagesums::page_crcs(raw);
    // Folding cannot fail here: the page checksums were made from these very bytes.
    let chunk_crc = pagesums::fold(&page_crcs, result.read);
    result.crc = pagesums::hasher(chunk_crc.unwrap_or_default(), result.read);
    let paged = ctx.check_pages || (shared.delta_base.is_some() && ctx.parent_size.is_some());
    let runs = if !paged {
        let whole = (!raw.is_empty()).then_some((job.offset, 0..raw.len()));
        whole.into_iter().collect()
    } else {
        let select = PageSelect {
            // Ranges a block map chose are kept whole; only a scan judges pages by their LSN.
            delta_base: shared
                .delta_base
                .filter(|_| ctx.parent_size.is_some() && ctx.reads.is_none()),
            parent_size: ctx.parent_size.unwrap_or(0),
            verify_from: shared.verify_from.filter(|_| ctx.check_pages),
            segno: ctx.segno,
        };
        let reread = |offset: u64, page: &mut [u8]| file.read_exact_at(page, offset).is_ok();
        let kept = select.apply(job.offset, raw, reread);
        result.failures = kept.failures;
        kept.runs
    };
    let raw_len = raw.len();
    // Move the kept runs down in place so the pack holds only what is stored.
    let mut end = start;
    for (file_offset, range) in runs {
        // Runs start on a page of the chunk (kept pages, or all of it).
        let pages = &page_crcs[range.start / BLCKSZ..range.end.div_ceil(BLCKSZ)];
        let len = range.len() as u64;
        let crc = if range == (0..raw_len) {
            chunk_crc // the whole chunk: its checksum is already known
        } else {
            pagesums::fold(pages, len)
        };
        // Only a run not starting on a page could fail to fold, and none does.
        let Some(crc) = crc else {
            return Err(BackupError::invalid(
                &ctx.path,
                format!("a run at byte {} does not start on a page", range.start),
            ));
        };
        if start + range.start != end {
            pack.content
                .copy_within(start + range.start..start + range.end, end);
        }
        pack.crc.combine(&pagesums::hasher(crc, len));
        pack.sums.add(end as u64, len, pages);
        result.pieces.push(Piece {
            pack: id,
            at: end as u64,
            len,
            file_offset,
            crc32: crc,
        });
        end += range.len();
    }
    pack.content.truncate(end);
    Ok(result)
}

/// The page-level decisions for one chunk of a relation file.
struct PageSelect {
    /// `Some(parent start)` when pages the parent holds unchanged may be left out.
    delta_base: Option<Lsn>,
    parent_size: u64,
    /// `Some(backup start)` when data checksums are to be checked.
    verify_from: Option<Lsn>,
    segno: u32,
}

/// The runs of a chunk to store (file offset, range in the chunk) and the blocks that failed
/// their checksum.
struct Kept {
    runs: Vec<(u64, std::ops::Range<usize>)>,
    failures: Vec<u32>,
}

impl PageSelect {
    /// Applies the rules to `raw`, read at `offset`. `reread` reads one page again from disk
    /// (a checksum failure is confirmed only if the page still fails: a torn read of a page
    /// being written would fail once and pass the second time).
    fn apply(
        &self,
        offset: u64,
        raw: &[u8],
        mut reread: impl FnMut(u64, &mut [u8]) -> bool,
    ) -> Kept {
        let mut kept = Kept {
            runs: Vec::new(),
            failures: Vec::new(),
        };
        let mut again = vec![0u8; BLCKSZ];
        for (i, page_bytes) in raw.chunks(BLCKSZ).enumerate() {
            let at = offset + (i * BLCKSZ) as u64;
            let state = page::inspect(page_bytes);
            let index = u32::try_from(at / BLCKSZ as u64).unwrap_or(u32::MAX);
            let block = BlockNo::of(self.segno, index);
            if let Some(start) = self.verify_from {
                if page_bytes.len() == BLCKSZ && !page::checksum_ok(page_bytes, state, block, start)
                {
                    let still_bad = !reread(at, &mut again)
                        || !page::checksum_ok(&again, page::inspect(&again), block, start);
                    if still_bad {
                        kept.failures.push(block.0);
                    }
                }
            }
            let needed = match self.delta_base {
                Some(base) => {
                    let parent_has = at + BLCKSZ as u64 <= self.parent_size;
                    page::delta_needs(state, base, parent_has)
                }
                None => true,
            };
            if !needed {
                continue;
            }
            let start = i * BLCKSZ;
            let range = start..start + page_bytes.len();
            match kept.runs.last_mut() {
                Some((_, last)) if last.end == range.start => last.end = range.end,
                _ => kept.runs.push((at, range)),
            }
        }
        kept
    }
}

/// Turns the chunk results into manifest entries, in path order.
fn assemble(shared: &Shared, mut done: Vec<ChunkDone>) -> (Vec<FileEntry>, Vec<PageFailures>) {
    done.sort_by_key(|c| (c.file, c.offset));
    let mut entries: Vec<FileEntry> = Vec::new();
    let mut failures: Vec<PageFailures> = Vec::new();
    let mut current: Option<(usize, FileEntry, crc32fast::Hasher)> = None;
    let finish = |entry: Option<(usize, FileEntry, crc32fast::Hasher)>,
                  entries: &mut Vec<FileEntry>| {
        if let Some((_, mut e, crc)) = entry {
            e.crc32 = crc.finalize();
            entries.push(e);
        }
    };
    for chunk in done {
        let ctx = &shared.files[chunk.file];
        if chunk.offset == 0 && chunk.vanished {
            tracing::debug!("{} vanished during the backup", ctx.path);
            continue;
        }
        if !chunk.failures.is_empty() {
            failures.push(PageFailures {
                path: ctx.path.clone(),
                blocks: chunk.failures.clone(),
            });
        }
        let same = matches!(&current, Some((f, _, _)) if *f == chunk.file);
        if !same {
            finish(current.take(), &mut entries);
            let storage = if shared.delta_base.is_some() && ctx.parent_size.is_some() {
                Storage::Pages
            } else {
                Storage::Whole
            };
            current = Some((
                chunk.file,
                FileEntry {
                    path: ctx.path.clone(),
                    size: 0,
                    mode: ctx.mode,
                    storage,
                    crc32: 0,
                    pieces: Vec::new(),
                },
                crc32fast::Hasher::new(),
            ));
        }
        if let Some((_, entry, crc)) = current.as_mut() {
            if ctx.reads.is_some() {
                // Read in places only: the size is the one the walk saw.
                entry.size = ctx.size;
            } else if chunk.read > 0 {
                entry.size = entry.size.max(chunk.offset + chunk.read);
            }
            crc.combine(&chunk.crc);
            entry.pieces.extend(chunk.pieces);
        }
    }
    finish(current.take(), &mut entries);
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    failures.sort_by(|a, b| a.path.cmp(&b.path));
    (entries, failures)
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// `2026-11-21T11:30:00Z` → `20261121T113000Z`, for names.
fn compact_time(rfc3339: &str) -> String {
    rfc3339.chars().filter(|c| *c != '-' && *c != ':').collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::page::tests::page;

    /// A relation file past 1 GiB is split by PostgreSQL into `<node>`, `<node>.1`, ...: pages of
    /// `.1` must be judged with their absolute block numbers (checksums) and their in-file offsets
    /// (delta runs), over a chunk that does not start at the file's beginning.
    #[test]
    fn multi_segment_relation_chunk() {
        let base = Lsn(0x5000);
        let segno = 1;
        let first_index = 1000u32; // the chunk starts 1000 pages into `16384.1`
        let offset = u64::from(first_index) * BLCKSZ as u64;
        let mut raw = Vec::new();
        let lsns = [0x4000, 0x6000, 0x6000, 0x1000, 0, 0x4000];
        for (i, lsn) in lsns.iter().enumerate() {
            let block = BlockNo::of(segno, first_index + i as u32);
            raw.extend(page(*lsn, i as u8 + 1, block));
        }
        raw.extend(vec![0u8; BLCKSZ]); // a page the file was extended with
        raw.extend(page(0x1000, 9, BlockNo(first_index + 7))); // checksum for the wrong block
        let select = PageSelect {
            delta_base: Some(base),
            parent_size: offset + 5 * BLCKSZ as u64, // the parent had pages up to index 1004
            verify_from: Some(Lsn(0x7000)),
            segno,
        };
        let kept = select.apply(offset, &raw, |at, buf| {
            let i = ((at - offset) / BLCKSZ as u64) as usize;
            buf.copy_from_slice(&raw[i * BLCKSZ..(i + 1) * BLCKSZ]);
            true
        });
        let p = BLCKSZ;
        // Kept: 1 and 2 (new LSN), 4 (zero LSN), 5 (past the parent's copy), 6 (all zero),
        // 7 (past the parent too). Left out: 0 and 3 (older than the parent's start).
        assert_eq!(
            kept.runs,
            vec![
                (offset + p as u64, p..3 * p),
                (offset + 4 * p as u64, 4 * p..8 * p)
            ]
        );
        assert_eq!(kept.failures, vec![BlockNo::of(segno, first_index + 7).0]);

        // A full backup keeps everything, whatever the LSNs.
        let full = PageSelect {
            delta_base: None,
            ..select
        };
        let kept = full.apply(offset, &raw, |_, _| false);
        assert_eq!(kept.runs, vec![(offset, 0..raw.len())]);
    }

    #[test]
    fn a_torn_read_that_heals_is_not_a_failure() {
        let block = BlockNo(3);
        let good = page(0x1000, 5, block);
        let mut torn = good.clone();
        torn[6000] ^= 0xFF;
        let select = PageSelect {
            delta_base: None,
            parent_size: 0,
            verify_from: Some(Lsn(0x9000)),
            segno: 0,
        };
        let kept = select.apply(3 * BLCKSZ as u64, &torn, |_, buf| {
            buf.copy_from_slice(&good);
            true
        });
        assert!(kept.failures.is_empty());
        let kept = select.apply(3 * BLCKSZ as u64, &torn, |_, buf| {
            buf.copy_from_slice(&torn);
            true
        });
        assert_eq!(kept.failures, vec![3]);
    }

    #[test]
    fn names_sort_by_time() {
        assert_eq!(compact_time("2026-11-21T11:30:00Z"), "20261121T113000Z");
    }
}
