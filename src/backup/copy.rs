//! backup-push's reading pipeline: a producer cuts files into [`CHUNK`]s (a delta from block
//! maps: the listed ranges, advised ahead) and queues them in batches (bounded channel);
//! `concurrency` workers read each chunk straight into their own pack buffer (for a delta, only
//! the pages [`page::delta_needs`]) and, at [`PACK_TARGET`], compress and upload it with its page
//! sums. Each byte is checksummed once; memory is about `concurrency × (PACK_TARGET + CHUNK)`
//! whatever the cluster's size. Used by backup/push.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use indicatif::ProgressBar;
use tokio::sync::{mpsc, Mutex};
use walvault_wal::Lsn;

use super::manifest::{BackupName, FileEntry, PackId, PageFailures, Piece, Storage};
use super::page::{self, BlockNo, BLCKSZ};
use super::pagesums::{self, PackSums};
use super::{BackupError, CHUNK, PACK_TARGET};
use crate::repo::packs::PackContent;
use crate::repo::Repository;
use crate::repo::{Committed, PutMode};

/// One file being backed up.
pub(super) struct FileCtx {
    pub(super) path: String,
    pub(super) source: PathBuf,
    pub(super) mode: u32,
    /// The size the walk saw: the file is read up to here, in chunks.
    pub(super) size: u64,
    /// For a delta of a relation file the parent holds: the parent's size of it.
    pub(super) parent_size: Option<u64>,
    /// Whether to check data checksums of its pages.
    pub(super) check_pages: bool,
    pub(super) segno: u32,
    /// For a delta from block maps: the byte ranges to read (offset, length), all kept.
    pub(super) reads: Option<Arc<[(u64, u64)]>>,
}

struct Job {
    file: usize,
    offset: u64,
    len: u64,
}

/// Jobs of one file handed to a worker together, at most [`CHUNK`] bytes in all (a delta from
/// block maps reads thousands of scattered pages, which one at a time would cost a thread hop
/// each), with the read-ahead advice that became due as they were handed out.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    advice: Advice,
}

/// Ranges of one file to advise (`posix_fadvise(WILLNEED)`) before a batch is read. Advice
/// submits the reads and can wait for room in the device's queue, so the worker gives it on its
/// blocking thread, not the task that hands out the batches on the runtime's.
#[derive(Default)]
struct Advice {
    file: Option<Arc<File>>,
    ranges: Vec<(u64, u64)>,
}

impl Advice {
    /// Advice only: a failure costs speed, never correctness.
    fn give(&self) {
        let Some(file) = &self.file else { return };
        for &(start, len) in &self.ranges {
            let _ = rustix::fs::fadvise(
                &**file,
                start,
                std::num::NonZeroU64::new(len),
                rustix::fs::Advice::WillNeed,
            );
        }
    }
}

/// What reading one chunk produced.
pub(super) struct ChunkDone {
    file: usize,
    offset: u64,
    read: u64,
    /// crc32 of all the bytes read, kept or not: part of the file's checksum.
    crc: crc32fast::Hasher,
    pieces: Vec<Piece>,
    failures: Vec<u32>,
    vanished: bool,
}

/// What every worker of one backup shares: the files, what a delta keeps, and the counters the
/// manifest and the progress bar read.
pub(super) struct Shared {
    pub(super) repo: Arc<Repository>,
    pub(super) name: BackupName,
    pub(super) files: Vec<FileCtx>,
    /// The parent's start LSN for a delta.
    pub(super) delta_base: Option<Lsn>,
    /// The backup's start LSN when the cluster has data checksums.
    pub(super) verify_from: Option<Lsn>,
    pub(super) next_pack: AtomicU32,
    pub(super) stored: AtomicU64,
    /// Bytes read from the data directory (the bar's position is its total once finished).
    pub(super) read: AtomicU64,
    pub(super) bar: ProgressBar,
}

/// Reads, packs and stores every file: all but the last (`global/pg_control`) by `concurrency`
/// workers, then that one alone.
pub(super) async fn copy_files(
    shared: &Arc<Shared>,
    concurrency: usize,
) -> Result<Vec<ChunkDone>, BackupError> {
    let control = shared.files.len() - 1;
    let mut done = run_workers(shared, 0..control, concurrency).await?;
    done.extend(run_workers(shared, control..control + 1, 1).await?);
    shared.bar.finish_and_clear();
    Ok(done)
}

/// How far ahead of the workers a delta from block maps asks the kernel to read the blocks it
/// will want: scattered reads then have many requests in flight instead of one per worker.
const PREFETCH_RANGES: usize = 1024;
const PREFETCH_BYTES: u64 = 64 << 20;

/// Which ranges of one file of a delta from block maps to advise ahead of the workers. A file
/// that cannot be opened here is read without advice.
struct Prefetch {
    file: Arc<File>,
    /// The first range not yet advised.
    next: usize,
    /// Bytes advised and not yet handed to a worker.
    ahead: u64,
    /// Advice due and not yet attached to a batch.
    due: Vec<(u64, u64)>,
}

impl Prefetch {
    fn open(ctx: &FileCtx) -> Option<Prefetch> {
        ctx.reads.as_ref()?;
        Some(Prefetch {
            file: Arc::new(File::open(&ctx.source).ok()?),
            next: 0,
            ahead: 0,
            due: Vec::new(),
        })
    }

    /// The advice due so far, for the batch about to be handed out.
    fn take(&mut self) -> Advice {
        Advice {
            file: Some(Arc::clone(&self.file)),
            ranges: std::mem::take(&mut self.due),
        }
    }

    /// Called as range `at` is handed out: the ranges after it become due, within the bounds.
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
            self.due.push((start, len));
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
        let mut batch = Batch::default();
        let mut batched = 0;
        for (i, &(start, len)) in reads.iter().enumerate() {
            if let Some(p) = prefetch.as_mut() {
                p.advise_past(reads, i);
            }
            let mut offset = start;
            while offset < start + len {
                let len = CHUNK.min(start + len - offset);
                if batched + len > CHUNK && !batch.jobs.is_empty() {
                    batched = 0;
                    batch.advice = prefetch.as_mut().map(Prefetch::take).unwrap_or_default();
                    if tx.send(std::mem::take(&mut batch)).await.is_err() {
                        break; // every worker stopped: their error is reported below
                    }
                }
                batch.jobs.push(Job { file, offset, len });
                batched += len;
                offset += len;
            }
        }
        batch.advice = prefetch.as_mut().map(Prefetch::take).unwrap_or_default();
        if !batch.jobs.is_empty() && tx.send(batch).await.is_err() {
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
            batch.advice.give();
            let chunks: Result<Vec<ChunkDone>, BackupError> = batch
                .jobs
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
pub(super) fn assemble(
    shared: &Shared,
    mut done: Vec<ChunkDone>,
) -> (Vec<FileEntry>, Vec<PageFailures>) {
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
}
