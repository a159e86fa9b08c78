//! `backup-push`: a full or page-level delta base backup of a running cluster on this host.
//!
//! Understands the order an online backup must follow: start the backup (non-exclusive, fast
//! checkpoint by default), decide full or delta against the newest backup of the same timeline,
//! walk and read PGDATA, read `global/pg_control` last, stop the backup (which waits for the
//! backup's WAL to be archived), then write the manifest, last and only if absent. Which files
//! and ranges to read is decided here (the walk, the parent, the block maps); reading and
//! storing them is `copy.rs`. Used by the CLI.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use walvault_wal::Lsn;

use super::blockmap::{self, MapRequest};
use super::copy::{assemble, copy_files, ChunkDone, FileCtx, Shared};
use super::external_config;
use super::manifest::{
    BackupKind, BackupName, DeltaSource, DirEntry, Manifest, Summary, Tablespace, FORMAT,
};
use super::page::BLCKSZ;
use super::stop_wal::{self, Shipper, StandbyOptions, StopWal};
use super::walk::{self, Found};
use super::{progress, BackupError};
use crate::pg::{BackupSession, BackupStop, ConnTarget, ServerInfo, Timeouts};
use crate::repo::identity::{self, Identity};
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

    #[test]
    fn names_sort_by_time() {
        assert_eq!(compact_time("2026-11-21T11:30:00Z"), "20261121T113000Z");
    }
}
