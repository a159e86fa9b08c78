//! The durability ladder of `wal-receive`: received WAL goes first into a local spool file per
//! segment, then into the repository, and only what the repository holds counts as durable.
//!
//! - The stream side calls [`Ladder::write`] for every XLogData message. Writing to the spool is
//!   a page-cache write with no fsync: the spool is only a buffer, because the server keeps every
//!   byte past the durable position (the slot's restart_lsn follows what is reported durable).
//! - The uploader task ([`Ladder::run_uploader`]) stores, at least every flush interval (or at
//!   once with `--synchronous`), the bytes not stored yet as a fragment of the current segment
//!   (see [`super::fragments`]). A completed segment is stored as `wal/<segment>` exactly as
//!   wal-push stores it, compared with what is there if the name exists, and then its fragments
//!   and spool file are removed.
//! - [`Ladder::durable`] publishes the position below which every received byte is in the
//!   repository; the stream side reports it to the server as the flush position.
//! - A repository outage only stops the uploader: it keeps retrying with backoff while the
//!   stream side fills the spool up to its bound (see [`Ladder::unstored`]).

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use walvault_wal::{Lsn, SegmentName, TimelineId, WalSegmentSize};

use super::metrics::Metrics;
use super::ReceiveError;
use crate::repo::layout;
use crate::repo::{Committed, PutMode};
use crate::repo::{RepoError, Repository, WalStored};
use crate::wal::fragments;
use crate::wal::summary;

/// Longest wait between two attempts while the repository fails.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// Complete segments stored at the same time by the segment lane.
const SEGMENT_CONCURRENCY: usize = 3;
/// Segments whose new bytes the fragment lane stores at the same time.
const FRAGMENT_CONCURRENCY: usize = 4;

/// Largest fragment, so memory stays bounded (at most `FRAGMENT_CONCURRENCY` of them) whatever
/// the segment size and backlog.
const MAX_FRAGMENT: u64 = 16 << 20;

/// How one spooled segment stands.
#[derive(Debug)]
struct Seg {
    file: Arc<std::fs::File>,
    path: PathBuf,
    start: Lsn,
    /// Bytes received from the segment's start.
    received: u64,
    /// Bytes durable as fragments; `None` until the repository has been asked (a restarted
    /// receiver finds the fragments of its predecessor).
    stored: Option<u64>,
    /// No more bytes will come: the segment is full, or its timeline ended inside it.
    closed: bool,
    /// The segment lane is working on it.
    finishing: bool,
    /// Stored at `wal/<segment>` already (received whole between two passes).
    stored_whole: bool,
}

impl Seg {
    fn complete(&self, seg_size: u64) -> bool {
        self.received == seg_size
    }

    /// The position `offset` bytes into the segment, at most `received`. [`Ladder::write`]
    /// refuses bytes whose end does not fit in the address space, so this never saturates.
    fn lsn(&self, offset: u64) -> Lsn {
        Lsn(self.start.0.saturating_add(offset))
    }
}

pub(crate) struct Ladder {
    repo: Arc<Repository>,
    spool: PathBuf,
    seg_size: WalSegmentSize,
    state: Mutex<State>,
    wake: Notify,
    finish_wake: Notify,
    durable: watch::Sender<Lsn>,
    metrics: Arc<Metrics>,
    /// Set by [`Ladder::drain`]: store at once instead of at the flush deadline.
    draining: AtomicBool,
    drain_wake: Notify,
    /// Notified after each store pass and each finished segment.
    progress: Notify,
}

#[derive(Default)]
struct State {
    segs: BTreeMap<SegmentName, Seg>,
    /// When the oldest byte not yet stored arrived; `None` when everything is stored. The flush
    /// deadline counts from here, so no byte waits longer than the flush interval.
    waiting_since: Option<Instant>,
}

/// One fragment-lane job, taken from the state under the lock and done without it.
struct FragmentJob {
    name: SegmentName,
    /// Bytes to store; `None`: first learn how much of the segment earlier runs stored.
    range: Option<(u64, u64)>,
    /// Store the whole segment at `wal/<segment>` rather than a fragment.
    whole: bool,
    file: Arc<std::fs::File>,
    path: PathBuf,
    /// The backlog start this job clears, put back if it fails.
    since: Option<Instant>,
}

impl Ladder {
    /// A ladder spooling into `spool` (its segment files removed first: whatever an earlier
    /// process left there is streamed again from the slot).
    pub(crate) fn new(
        repo: Arc<Repository>,
        spool: PathBuf,
        seg_size: WalSegmentSize,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Ladder>, ReceiveError> {
        let spool_err = |source| ReceiveError::Spool {
            path: spool.clone(),
            source,
        };
        std::fs::create_dir_all(&spool).map_err(spool_err)?;
        for entry in std::fs::read_dir(&spool).map_err(spool_err)? {
            let path = entry.map_err(spool_err)?.path();
            if path.extension().is_some_and(|e| e == "partial") {
                std::fs::remove_file(&path).map_err(spool_err)?;
            }
        }
        Ok(Arc::new(Ladder {
            repo,
            spool,
            seg_size,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            finish_wake: Notify::new(),
            durable: watch::Sender::new(Lsn::INVALID),
            metrics,
            draining: AtomicBool::new(false),
            drain_wake: Notify::new(),
            progress: Notify::new(),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that matters
        // more than stopping would; keep going with what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The durable position, as it changes.
    pub(crate) fn durable(&self) -> watch::Receiver<Lsn> {
        self.durable.subscribe()
    }

    /// Sets where durability starts when nothing is spooled: the start of streaming.
    pub(crate) fn start_at(&self, lsn: Lsn) {
        self.durable.send_if_modified(|d| {
            let changed = *d == Lsn::INVALID;
            if changed {
                *d = lsn;
            }
            changed
        });
    }

    /// Where streaming stopped (timeline and end of the data received), if anything of it is
    /// still spooled: the newest timeline's last segment.
    pub(crate) fn received_end(&self) -> Option<(TimelineId, Lsn)> {
        self.state()
            .segs
            .iter()
            .next_back()
            .map(|(name, s)| (name.tli, s.lsn(s.received)))
    }

    /// Bytes in the spool: received and not yet stored whole.
    pub(crate) fn spooled(&self) -> u64 {
        self.state().segs.values().map(|s| s.received).sum()
    }

    /// Spools WAL received on `tli` starting at `start`, splitting it at segment boundaries.
    pub(crate) fn write(
        &self,
        tli: TimelineId,
        start: Lsn,
        data: &[u8],
    ) -> Result<(), ReceiveError> {
        let seg_size = u64::from(self.seg_size.bytes());
        let mut pos = start;
        let mut rest = data;
        while !rest.is_empty() {
            let offset = pos.segment_offset(self.seg_size);
            let n = rest
                .len()
                .min(usize::try_from(seg_size - offset).unwrap_or(usize::MAX));
            let name = SegmentName::new(tli, pos.segment_number(self.seg_size), self.seg_size)
                .map_err(|e| ReceiveError::Stream(format!("WAL position {pos}: {e}")))?;
            let mut state = self.state();
            if state.waiting_since.is_none() {
                state.waiting_since = Some(Instant::now());
                self.metrics
                    .backlog_since(Some(std::time::SystemTime::now()));
            }
            let seg = match state.segs.entry(name) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(self.open_seg(&name, pos, offset)?)
                }
            };
            // Spooled bytes are never written again: the stream checks that each message
            // continues the one before, and this keeps it so whatever calls here.
            if offset != seg.received {
                return Err(ReceiveError::Stream(format!(
                    "WAL from {pos} does not continue {name}, received up to {}",
                    seg.lsn(seg.received)
                )));
            }
            let end = pos.checked_add(n as u64).ok_or_else(|| {
                ReceiveError::Stream(format!(
                    "{n} bytes of WAL from {pos} pass the end of the WAL address space"
                ))
            })?;
            seg.file
                .write_all_at(&rest[..n], offset)
                .map_err(|source| ReceiveError::Spool {
                    path: seg.path.clone(),
                    source,
                })?;
            seg.received = seg.received.max(offset + n as u64);
            if seg.complete(seg_size) {
                seg.closed = true;
            }
            drop(state);
            pos = end;
            rest = &rest[n..];
        }
        self.metrics.received(pos);
        self.wake.notify_one();
        Ok(())
    }

    fn open_seg(&self, name: &SegmentName, pos: Lsn, offset: u64) -> Result<Seg, ReceiveError> {
        let path = self.spool.join(format!("{name}.partial"));
        if offset != 0 {
            // Streaming always starts at a segment start or continues a spooled segment.
            return Err(ReceiveError::Stream(format!(
                "WAL from {pos} arrived for {name}, whose start was never received"
            )));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| ReceiveError::Spool {
                path: path.clone(),
                source,
            })?;
        Ok(Seg {
            file: Arc::new(file),
            path,
            start: pos,
            received: 0,
            stored: None,
            closed: false,
            finishing: false,
            stored_whole: false,
        })
    }

    /// The timeline `tli` ended: its last, incomplete segment stays as fragments (recovery that
    /// follows that timeline can still use them) and gets no more bytes.
    pub(crate) fn end_timeline(&self, tli: TimelineId) {
        for (_, seg) in self.state().segs.iter_mut().filter(|(n, _)| n.tli == tli) {
            seg.closed = true;
        }
        self.finish_wake.notify_one();
    }

    /// Stores everything received now rather than at the flush deadline and waits, at most
    /// `bound`, until it is all in the repository (complete segments stored whole). Returns the
    /// durable position, or the durable and received positions if the bound ran out.
    pub(crate) async fn drain(&self, bound: Duration) -> Result<Lsn, (Lsn, Lsn)> {
        self.draining.store(true, Ordering::Relaxed);
        self.drain_wake.notify_one();
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            // Registered before looking, so a pass that ends in between is not missed.
            progress.as_mut().enable();
            let settled = self
                .state()
                .segs
                .values()
                .all(|s| !s.closed && s.stored.is_some_and(|stored| stored >= s.received));
            if settled {
                return Ok(*self.durable.borrow());
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                let received = self.received_end().map_or(Lsn::INVALID, |(_, end)| end);
                return Err((*self.durable.borrow(), received));
            }
        }
    }

    /// Stores spooled WAL forever, in two lanes: fragments (the durability path: every flush
    /// interval, or as soon as anything arrives when `synchronous`) and whole segments (off the
    /// critical path, a few at a time). Never returns; failures are retried with backoff.
    pub(crate) async fn run_uploader(self: Arc<Self>, flush_interval: Duration, synchronous: bool) {
        tokio::join!(
            Arc::clone(&self).fragment_lane(flush_interval, synchronous),
            self.segment_lane()
        );
    }

    async fn fragment_lane(self: Arc<Self>, flush_interval: Duration, synchronous: bool) {
        let mut failures = 0u32;
        let mut pass_time = Duration::ZERO;
        loop {
            let waiting_since = self.state().waiting_since;
            match waiting_since {
                None => {
                    self.wake.notified().await;
                    continue;
                }
                // Due when the oldest byte has waited the flush interval less the time a pass
                // takes, so that it is stored within the interval, not one interval after it.
                Some(since) if !synchronous && !self.draining.load(Ordering::Relaxed) => {
                    let lead = (pass_time * 2).min(flush_interval / 2);
                    let due = since + flush_interval.saturating_sub(lead);
                    tokio::select! {
                        () = tokio::time::sleep_until(due.into()) => {}
                        () = self.drain_wake.notified() => {}
                    }
                }
                Some(_) => {}
            }
            let started = Instant::now();
            match self.store_fragments().await {
                Ok(()) => {
                    failures = 0;
                    pass_time = started.elapsed();
                    if pass_time > flush_interval {
                        // The repository is slower than the flush interval: RPO grows with it.
                        tracing::warn!(
                            "storing streamed WAL took {pass_time:?}, longer than the flush \
                             interval ({flush_interval:?})"
                        );
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.failed(failures, &e).await;
                }
            }
        }
    }

    /// Logs a failed store and waits before the next attempt.
    async fn failed(&self, failures: u32, e: &RepoError) {
        self.metrics.error();
        tracing::warn!(
            "storing streamed WAL failed (attempt {failures}; the spool keeps it and the server \
             keeps it past the durable position): {e}"
        );
        let delay = (Duration::from_millis(500) * 2u32.saturating_pow(failures.min(6)))
            .min(MAX_RETRY_DELAY);
        tokio::time::sleep(delay).await;
    }

    /// Stores every byte received and not yet durable, oldest segments first, several segments
    /// at a time (a fast WAL rate completes several per flush interval).
    async fn store_fragments(self: &Arc<Self>) -> Result<(), RepoError> {
        let pass_start = Instant::now();
        loop {
            let jobs = self.next_fragments(pass_start);
            if jobs.is_empty() {
                return Ok(());
            }
            let since = jobs.iter().find_map(|j| j.since);
            let mut tasks = tokio::task::JoinSet::new();
            for job in jobs {
                let ladder = Arc::clone(self);
                tasks.spawn(async move { ladder.store_fragment(&job).await });
            }
            let mut failure = None;
            while let Some(joined) = tasks.join_next().await {
                let result = joined.unwrap_or_else(|e| Err(RepoError::Task(e.to_string())));
                if let Err(e) = result {
                    failure.get_or_insert(e);
                }
            }
            self.publish_durable();
            self.finish_wake.notify_one();
            if let Some(e) = failure {
                // Those bytes still wait, since as long as they did.
                let mut state = self.state();
                state.waiting_since = match (state.waiting_since, since) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                return Err(e);
            }
        }
    }

    async fn store_fragment(&self, job: &FragmentJob) -> Result<(), RepoError> {
        let name = &job.name;
        let Some((from, to)) = job.range else {
            let covered = fragments::covered(&fragments::list(&self.repo, name).await?);
            self.update(name, |s| s.stored = Some(covered));
            return Ok(());
        };
        let began = Instant::now();
        // On a conflict, fall back to a fragment: the streamed bytes must be durable somewhere.
        if job.whole && self.store_segment(name, &job.path).await? {
            self.metrics.segment_stored(began.elapsed());
            tracing::info!("{name}: stored (streamed)");
            crate::failpoint::pause_if_enabled("receive-segment-stored").await;
            self.update(name, |s| {
                s.stored = Some(s.received);
                s.stored_whole = true;
            });
            return Ok(());
        }
        let bytes = read_range(&job.file, &job.path, from, to)?;
        let key = layout::fragment(name, from, to);
        // The key names the byte range and WAL never changes once flushed, so a fragment left
        // by an earlier run should hold the same bytes; say so loudly if it does not.
        if let Committed::AlreadyExists = self
            .repo
            .put_bytes(&key, &bytes, PutMode::IfAbsent)
            .await?
            .committed
        {
            if self
                .repo
                .get_bytes(&key)
                .await?
                .is_some_and(|stored| stored != bytes)
            {
                tracing::error!(
                    "{key} is already in {} with different content; nothing was overwritten. Is \
                     another cluster streaming into this repository?",
                    self.repo.url()
                );
            }
        }
        self.metrics.fragment_stored(began.elapsed());
        crate::failpoint::pause_if_enabled("receive-fragment-stored").await;
        tracing::debug!("stored {key} ({} bytes)", to - from);
        self.update(name, |s| s.stored = Some(to));
        Ok(())
    }

    /// Work for the oldest segments whose received bytes are not all durable, one job each.
    fn next_fragments(&self, pass_start: Instant) -> Vec<FragmentJob> {
        let seg_size = u64::from(self.seg_size.bytes());
        let mut state = self.state();
        // Bytes that arrived after the pass began wait for the next one: under a steady load
        // that makes one fragment per flush interval instead of a constant trickle of requests.
        if state.waiting_since.is_some_and(|since| since > pass_start) {
            return Vec::new();
        }
        let mut jobs: Vec<FragmentJob> = Vec::new();
        let mut clears_backlog = true;
        for (name, seg) in &state.segs {
            if seg.stored.is_some_and(|stored| stored >= seg.received) {
                continue;
            }
            if jobs.len() == FRAGMENT_CONCURRENCY {
                clears_backlog = false;
                break;
            }
            let range = seg
                .stored
                .map(|stored| (stored, seg.received.min(stored + MAX_FRAGMENT)));
            clears_backlog &= range.is_some_and(|(_, to)| to == seg.received);
            jobs.push(FragmentJob {
                name: *name,
                range,
                // A segment received whole since the last pass is stored whole at once: the
                // same durability, and no fragment uploaded only to be deleted.
                whole: seg.stored == Some(0) && seg.complete(seg_size),
                file: Arc::clone(&seg.file),
                path: seg.path.clone(),
                since: None,
            });
        }
        // Checked under the same lock as writes set it, so no arrival is missed. Storing the
        // last pending bytes clears the backlog: what arrives from now on is the new oldest.
        if jobs.is_empty() || clears_backlog {
            let since = state.waiting_since.take();
            self.metrics.backlog_since(None);
            if let Some(first) = jobs.first_mut() {
                first.since = since;
            }
        }
        jobs
    }

    /// Stores completed segments whole and forgets finished spool files, a few at a time.
    async fn segment_lane(self: Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        let mut failures = 0u32;
        loop {
            while tasks.len() < SEGMENT_CONCURRENCY {
                let Some(name) = self.next_finished() else {
                    break;
                };
                let ladder = Arc::clone(&self);
                tasks.spawn(async move { (name, ladder.finish(&name).await) });
            }
            let Some(joined) = tasks.join_next().await else {
                self.finish_wake.notified().await;
                continue;
            };
            match joined {
                Ok((_, Ok(()))) => failures = 0,
                Ok((name, Err(e))) => {
                    self.update(&name, |s| s.finishing = false);
                    failures += 1;
                    self.failed(failures, &e).await;
                }
                Err(e) => tracing::error!("segment store task failed: {e}"),
            }
        }
    }

    /// A segment whose bytes are all durable and that gets no more: to be finished.
    fn next_finished(&self) -> Option<SegmentName> {
        let mut state = self.state();
        let (name, seg) = state
            .segs
            .iter_mut()
            .find(|(_, s)| s.closed && !s.finishing && s.stored == Some(s.received))?;
        seg.finishing = true;
        Some(*name)
    }

    /// Stores a complete segment at `wal/<segment>` and drops its fragments; forgets an
    /// incomplete one whose timeline ended (its fragments stay).
    async fn finish(&self, name: &SegmentName) -> Result<(), RepoError> {
        let seg_size = u64::from(self.seg_size.bytes());
        let (complete, path) = {
            let state = self.state();
            let Some(seg) = state.segs.get(name) else {
                return Ok(());
            };
            (
                seg.complete(seg_size) && !seg.stored_whole,
                seg.path.clone(),
            )
        };
        if complete {
            let began = Instant::now();
            // On a conflict the fragments are the only copy of what was streamed: keep them.
            if self.store_segment(name, &path).await? {
                self.metrics.segment_stored(began.elapsed());
                tracing::info!("{name}: stored (streamed)");
                crate::failpoint::pause_if_enabled("receive-segment-stored").await;
                self.remove_fragments(name).await?;
            }
        }
        if let Some(seg) = self.state().segs.remove(name) {
            let _ = std::fs::remove_file(&seg.path);
        }
        self.publish_durable();
        Ok(())
    }

    fn update(&self, name: &SegmentName, f: impl FnOnce(&mut Seg)) {
        if let Some(seg) = self.state().segs.get_mut(name) {
            f(seg);
        }
    }

    /// Stores a complete segment as wal-push would: `IfAbsent`, and an existing object must have
    /// identical content (archive_command may have stored it first). Returns whether the
    /// repository now holds this content at `wal/<segment>`.
    async fn store_segment(&self, name: &SegmentName, path: &Path) -> Result<bool, RepoError> {
        match summary::store_segment(&self.repo, name, path).await {
            Ok(WalStored::Created(_)) => Ok(true),
            Ok(WalStored::Identical) => {
                tracing::debug!("{name} was already archived with identical content");
                Ok(true)
            }
            // Never overwrite; the fragments stay, so nothing streamed is lost. Loudly.
            Err(e @ RepoError::Conflict { .. }) => {
                tracing::error!("{e}");
                Ok(false)
            }
            // Deleted while being compared, again and again: the next attempt stores it.
            Err(RepoError::Vanishing(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Stores whole every segment whose fragments cover it but that is not at `wal/<segment>`:
    /// what a predecessor killed between its last fragment and the whole store left behind
    /// (streaming resumes after such a segment, so the segment lane never sees it again). Run
    /// once, before streaming starts, so no lane works on the same segments.
    pub(crate) async fn store_completed_fragments(&self) -> Result<(), RepoError> {
        let seg_size = u64::from(self.seg_size.bytes());
        for name in fragments::streamed_segments(&self.repo).await? {
            if fragments::covered(&fragments::list(&self.repo, &name).await?) != seg_size {
                continue;
            }
            let whole = self.spool.join(format!("{name}.assembled"));
            let assembled = fragments::fetch_partial(&self.repo, &name, seg_size, &whole).await?;
            if assembled == fragments::Partial::Written(seg_size)
                && self.store_segment(&name, &whole).await?
            {
                tracing::info!("{name}: stored from the fragments a previous run streamed");
                self.remove_fragments(&name).await?;
            }
            let _ = std::fs::remove_file(&whole);
        }
        Ok(())
    }

    async fn remove_fragments(&self, name: &SegmentName) -> Result<(), RepoError> {
        for f in fragments::list(&self.repo, name).await? {
            self.repo.delete(&f.key).await?;
        }
        Ok(())
    }

    /// Recomputes the durable position: the first byte of the oldest segment not fully stored,
    /// or the end of everything received. Only ever moves forward.
    fn publish_durable(&self) {
        let computed = {
            let state = self.state();
            let segs = &state.segs;
            let pending = segs
                .values()
                .find(|s| s.stored.is_none_or(|stored| stored < s.received));
            match pending {
                Some(s) => Some(s.lsn(s.stored.unwrap_or(0))),
                None => segs.values().next_back().map(|s| s.lsn(s.received)),
            }
        };
        if let Some(computed) = computed {
            self.durable.send_if_modified(|d| {
                let advanced = computed > *d;
                if advanced {
                    *d = computed;
                }
                advanced
            });
            self.metrics.stored(*self.durable.borrow());
        }
        self.progress.notify_waiters();
    }
}

fn read_range(file: &std::fs::File, path: &Path, from: u64, to: u64) -> Result<Vec<u8>, RepoError> {
    let mut buf = vec![0u8; usize::try_from(to - from).unwrap_or(0)];
    file.read_exact_at(&mut buf, from)
        .map_err(|source| RepoError::File {
            op: "read",
            path: path.to_path_buf(),
            source,
        })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver killed after the last fragment of a segment but before storing it whole
    /// leaves a covered segment behind; the next run stores it and drops the fragments, and
    /// leaves a segment still being streamed alone.
    #[tokio::test]
    async fn segments_left_as_complete_fragments_are_stored_whole() {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("repo");
        std::fs::create_dir(&repo_dir).unwrap();
        let repo = Arc::new(crate::repo::local_for_tests(&repo_dir).await);
        let seg_size = WalSegmentSize::new(1 << 20).unwrap();
        let (done, open): (SegmentName, SegmentName) = (
            "000000010000000000000008".parse().unwrap(),
            "000000010000000000000009".parse().unwrap(),
        );
        let content = crate::wal::push::tests::segment(&done.to_string());
        for (start, end) in [(0u64, 0x1BD68u64), (0x1BD68, 1 << 20)] {
            let part = &content[start as usize..end as usize];
            let key = layout::fragment(&done, start, end);
            repo.put_bytes(&key, part, PutMode::IfAbsent).await.unwrap();
        }
        let open_key = layout::fragment(&open, 0, 0x1000);
        repo.put_bytes(&open_key, &content[..0x1000], PutMode::IfAbsent)
            .await
            .unwrap();

        let ladder = Ladder::new(
            Arc::clone(&repo),
            dir.path().join("spool"),
            seg_size,
            Arc::new(Metrics::default()),
        )
        .unwrap();
        ladder.store_completed_fragments().await.unwrap();
        let key = layout::segment(&done);
        assert_eq!(repo.get_bytes(&key).await.unwrap().unwrap(), content);
        assert!(fragments::list(&repo, &done).await.unwrap().is_empty());
        assert_eq!(fragments::list(&repo, &open).await.unwrap().len(), 1);
        let open_wal = layout::segment(&open);
        assert!(repo.get_bytes(&open_wal).await.unwrap().is_none());
    }
}
