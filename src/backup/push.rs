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

use super::manifest::{
    BackupKind, BackupName, DirEntry, FileEntry, Manifest, PackId, PageFailures, Piece, Storage,
    Summary, Tablespace, FORMAT,
};
use super::page::{self, BlockNo, BLCKSZ};
use super::walk::{self, Found};
use super::{progress, BackupError, CHUNK, PACK_TARGET};
use crate::codec::{Compression, Encoder, LengthMismatch, MAX_BLOCK};
use crate::identity::{self, Identity};
use crate::pg::{BackupSession, ConnTarget, ServerInfo, Timeouts};
use crate::repo::Repository;
use crate::store::{Committed, PutMode};

/// Full or delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Delta when a usable parent exists and its chain is short enough, else full.
    Auto,
    Full,
    /// Delta even past `delta_max_steps`; full (with a warning) when no parent can serve.
    Delta,
}

#[derive(Clone, Debug)]
pub struct PushOptions {
    pub pgdata: Option<PathBuf>,
    pub dbname: Option<String>,
    pub mode: Mode,
    pub delta_max_steps: u32,
    pub concurrency: usize,
    pub fast_checkpoint: bool,
    pub progress: bool,
    pub compression: Compression,
    /// A spool directory to leave out when it lies inside PGDATA.
    pub spool_dir: Option<PathBuf>,
    /// Bounds on the SQL session's calls.
    pub pg_timeouts: Timeouts,
}

/// What a push stored.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub summary: Summary,
    pub files: usize,
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
}

struct Job {
    file: usize,
    offset: u64,
    len: u64,
}

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
    compression: Compression,
    files: Vec<FileCtx>,
    /// The parent's start LSN for a delta.
    delta_base: Option<Lsn>,
    /// The backup's start LSN when the cluster has data checksums.
    verify_from: Option<Lsn>,
    next_pack: AtomicU32,
    stored: AtomicU64,
    bar: ProgressBar,
}

/// Runs a backup.
pub async fn push(repo: Arc<Repository>, opts: &PushOptions) -> Result<Pushed, BackupError> {
    let target = ConnTarget::resolve(opts.dbname.as_deref())?;
    let session = BackupSession::connect(&target, opts.pg_timeouts).await?;
    let info = session.info().clone();
    if info.in_recovery {
        return Err(BackupError::invalid(
            format!("PostgreSQL at {}", session.target()),
            "the server is in recovery; backups from a standby are not supported yet",
        ));
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
    check_pgdata(&pgdata, &info, session.target())?;
    if info.archive_mode == "off" {
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
        &repo,
        &found,
        &format!("the cluster at {}", pgdata.display()),
    )
    .await?;
    let catalog = crate::catalog::list(&repo).await?;

    let started = SystemTime::now();
    let start_time = rfc3339(started);
    let (start_lsn, timeline) = session
        .start(&format!("walvault {start_time}"), opts.fast_checkpoint)
        .await?;
    let name = BackupName::new(&compact_time(&start_time), timeline, start_lsn);
    tracing::info!("backup {name} started at {start_lsn} on timeline {timeline}");

    let parent = match choose_parent(&catalog, opts, timeline, start_lsn) {
        Some(p) => Some(crate::catalog::manifest(&repo, &p.name).await?),
        None => None,
    };
    let (kind, delta_depth) = match &parent {
        Some(p) => (BackupKind::Delta, p.summary.delta_depth + 1),
        None => (BackupKind::Full, 0),
    };
    if let Some(p) = &parent {
        tracing::info!(
            "delta against {} (taken at {})",
            p.summary.name,
            p.summary.start_lsn
        );
    }

    let excluded: Vec<PathBuf> = opts.spool_dir.iter().cloned().collect();
    let walk_root = pgdata.clone();
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
            parent_size: if paged {
                parent_sizes.get(path.as_str()).copied()
            } else {
                None
            },
            check_pages: paged && info.data_checksums,
            segno: walk::segment_number(&path),
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
    let control_index = files.len();
    files.push(control);
    let total: u64 = files.iter().map(|f| f.size).sum();
    let shared = Arc::new(Shared {
        repo: Arc::clone(&repo),
        name: name.clone(),
        compression: opts.compression,
        files,
        delta_base: parent.as_ref().map(|p| p.summary.start_lsn),
        verify_from: info.data_checksums.then_some(start_lsn),
        next_pack: AtomicU32::new(0),
        stored: AtomicU64::new(0),
        bar: progress::bytes_bar(total, opts.progress, "backup"),
    });
    let mut done = run_workers(&shared, 0..control_index, opts.concurrency).await?;
    done.extend(run_workers(&shared, control_index..control_index + 1, 1).await?);
    shared.bar.finish_and_clear();

    tracing::info!("all files read; stopping the backup (PostgreSQL waits until its last WAL segment is archived)");
    let stop = session.stop().await?;
    let stop_time = rfc3339(SystemTime::now());
    tracing::info!("backup {name} stopped at {}", stop.lsn);
    let (file_entries, failures) = assemble(&shared, done);
    for f in &failures {
        tracing::warn!(
            "data checksum failures in {} (blocks {:?}); the backup goes on and records them",
            f.path,
            f.blocks
        );
    }
    let summary = Summary {
        format: FORMAT,
        name: name.clone(),
        kind,
        parent: parent.as_ref().map(|p| p.summary.name.clone()),
        delta_base_lsn: parent.as_ref().map(|p| p.summary.start_lsn),
        delta_depth,
        start_time,
        stop_time,
        start_lsn,
        stop_lsn: stop.lsn,
        timeline,
        pg_version_num: info.version_num,
        system_identifier: info.system_identifier,
        wal_segment_size: info.wal_segment_size,
        data_checksums: info.data_checksums,
        original_size: file_entries.iter().map(|f| f.size).sum(),
        stored_size: shared.stored.load(Ordering::Relaxed),
        packs: shared.next_pack.load(Ordering::Relaxed),
        page_checksum_failures: failures,
    };
    let manifest = Manifest {
        summary: summary.clone(),
        backup_label: stop.backup_label,
        tablespace_map: stop.tablespace_map,
        tablespaces: walked
            .tablespaces
            .iter()
            .map(|t| Tablespace {
                oid: t.oid,
                location: t.location.display().to_string(),
            })
            .collect(),
        dirs,
        files: file_entries,
    };
    let key = name.manifest_key();
    match repo
        .put_bytes(&key, &manifest.to_json()?, PutMode::IfAbsent)
        .await?
    {
        Committed::Created => {}
        Committed::AlreadyExists => {
            return Err(BackupError::invalid(
                format!("backup {name}"),
                "a manifest with this name already exists; nothing was replaced",
            ))
        }
    }
    Ok(Pushed {
        files: manifest.files.len(),
        summary,
    })
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

/// Reads files `range` of `shared.files` with `concurrency` workers.
async fn run_workers(
    shared: &Arc<Shared>,
    range: std::ops::Range<usize>,
    concurrency: usize,
) -> Result<Vec<ChunkDone>, BackupError> {
    let concurrency = concurrency.max(1);
    let (tx, rx) = mpsc::channel::<Job>(concurrency * 2);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (shared, rx) = (Arc::clone(shared), Arc::clone(&rx));
        workers.spawn(worker(shared, rx));
    }
    let mut done = Vec::new();
    for file in range {
        let size = shared.files[file].size;
        if size == 0 {
            // Nothing to read; the file is recorded empty.
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
        let mut offset = 0;
        while offset < size {
            let len = CHUNK.min(size - offset);
            if tx.send(Job { file, offset, len }).await.is_err() {
                break; // every worker stopped: their error is reported below
            }
            offset += len;
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
}

async fn worker(
    shared: Arc<Shared>,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
) -> Result<Vec<ChunkDone>, BackupError> {
    let mut done = Vec::new();
    let mut pack = PackBuf {
        id: None,
        content: Vec::with_capacity(PACK_TARGET + CHUNK as usize),
        crc: crc32fast::Hasher::new(),
    };
    loop {
        let job = jobs.lock().await.recv().await;
        let Some(job) = job else { break };
        // A pack is closed once it reaches the target, so it never holds more than the target
        // plus one chunk and the buffer never grows past its initial capacity.
        if pack.content.len() >= PACK_TARGET {
            pack = store_pack(&shared, pack).await?;
        }
        let id = *pack
            .id
            .get_or_insert_with(|| PackId(shared.next_pack.fetch_add(1, Ordering::Relaxed)));
        let job_shared = Arc::clone(&shared);
        let (filled, chunk) = tokio::task::spawn_blocking(move || {
            read_chunk(&job_shared, &job, &mut pack, id).map(|chunk| (pack, chunk))
        })
        .await??;
        pack = filled;
        shared.bar.inc(chunk.read);
        done.push(chunk);
    }
    if pack.id.is_some() {
        store_pack(&shared, pack).await?;
    }
    Ok(done)
}

/// Compresses and uploads one pack, then hands its buffer back emptied for the next one.
/// Compression runs on a blocking thread, so it proceeds on one core while other workers read
/// or compress on the other.
async fn store_pack(shared: &Shared, mut pack: PackBuf) -> Result<PackBuf, BackupError> {
    let Some(id) = pack.id.take() else {
        return Ok(pack);
    };
    let key = shared.name.pack_key(id);
    let compression = shared.compression;
    let (pack, encoded) = tokio::task::spawn_blocking(move || {
        let encoded = encode_pack(compression, &mut pack);
        (pack, encoded)
    })
    .await?;
    let encoded = encoded.map_err(|_| BackupError::Corrupt {
        object: key.clone(),
        problem: "encoded length differs from the content length".into(),
    })?;
    let stored = encoded.len() as u64;
    let mut writer = shared.repo.store().writer(&key)?;
    writer.write(encoded.into()).await?;
    // Names carry the start LSN, which every pg_backup_start moves on, so a pack of the same
    // name can only come from a concurrent push that shared our checkpoint: never replace it.
    if writer.commit(PutMode::IfAbsent).await? == Committed::AlreadyExists {
        return Err(BackupError::invalid(
            format!("backup {}", shared.name),
            format!("{key} already exists: is another backup-push running?"),
        ));
    }
    shared.stored.fetch_add(stored, Ordering::Relaxed);
    tracing::debug!("stored {key} ({stored} bytes)");
    Ok(pack)
}

/// The stored bytes of a pack's content (which it empties), framed by the codec with the
/// content checksum the pack accumulated.
fn encode_pack(compression: Compression, pack: &mut PackBuf) -> Result<Vec<u8>, LengthMismatch> {
    let crc = std::mem::replace(&mut pack.crc, crc32fast::Hasher::new());
    let mut encoder = Encoder::with_content_crc(compression, pack.content.len() as u64, crc);
    let mut out = encoder.header().to_vec();
    for block in pack.content.chunks(MAX_BLOCK) {
        encoder.block(block, &mut out);
    }
    encoder.finish(&mut out)?;
    pack.content.clear();
    Ok(out)
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
    result.crc.update(raw);
    let paged = ctx.check_pages || (shared.delta_base.is_some() && ctx.parent_size.is_some());
    let runs = if !paged {
        let whole = (!raw.is_empty()).then_some((job.offset, 0..raw.len()));
        whole.into_iter().collect()
    } else {
        let select = PageSelect {
            delta_base: shared.delta_base.filter(|_| ctx.parent_size.is_some()),
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
        let crc = if range == (0..raw_len) {
            result.crc.clone() // the whole chunk: its checksum is already known
        } else {
            let mut h = crc32fast::Hasher::new();
            h.update(&pack.content[start + range.start..start + range.end]);
            h
        };
        if start + range.start != end {
            pack.content
                .copy_within(start + range.start..start + range.end, end);
        }
        pack.crc.combine(&crc);
        result.pieces.push(Piece {
            pack: id,
            at: end as u64,
            len: range.len() as u64,
            file_offset,
            crc32: crc.finalize(),
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
            if chunk.read > 0 {
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
