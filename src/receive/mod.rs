//! `wal-receive`: a long-running streaming archiver with sub-second RPO.
//!
//! It streams WAL through a physical replication slot ([`crate::replication`]) and makes it
//! durable in the repository through the [`ladder`]: local spool, fragments of the current segment
//! at least every flush interval, complete segments stored exactly as wal-push stores them. The
//! flush position reported to the server is what the repository holds, so the slot never lets
//! PostgreSQL recycle WAL that is not safe, and with `--synchronous` (upload at once) the
//! receiver can be named in `synchronous_standby_names` so that an acknowledged commit is in the
//! repository.
//!
//! It never exits on a transient error: lost connections and server restarts are retried with
//! backoff, a repository outage only delays the uploader. It exits with a clear message on
//! permanent ones: a missing slot without `--create-slot`, another cluster (the repository's
//! identity), authentication refused, a server that does not speak the replication protocol,
//! WAL that is not what that server writes at that position (every page header is checked
//! before it is spooled). SIGTERM or SIGINT stops it cleanly: what it received is stored first.
//! Used by `cmd/receive.rs`; the fragments it writes are `crate::wal::fragments`.

mod ladder;
pub(crate) mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use walvault_wal::{
    ClusterWal, Lsn, PgMajor, SegmentName, StreamedPages, TimelineId, WalError, WalFileName,
    WalSegmentSize,
};

use crate::pg::conninfo::ConnInfo;
use crate::replication::{
    sqlstate, ReplError, ReplicationConnection, SlotInfo, SlotName, StreamEvent, SystemInfo,
    WalStream,
};
use crate::repo::identity::{self, Identity, IdentityError};
use crate::repo::layout::{Listing, ObjectKey};
use crate::repo::{RepoError, Repository, WalContent, WalStored};
use crate::wal::fragments;
use ladder::Ladder;
use metrics::Metrics;

/// A status update goes out at least this often, well under the default wal_sender_timeout (60 s).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Silence from the server after which the connection is taken for dead (a reply is requested
/// after [`STATUS_INTERVAL`] of silence first).
const SILENCE_LIMIT: Duration = Duration::from_secs(40);
/// Reconnect delays grow from the first to the last.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How long a stop waits for received WAL to be stored: well within systemd's default
/// TimeoutStopSec (90 s), after which it would be killed.
const STOP_BOUND: Duration = Duration::from_secs(60);

/// How wal-receive runs.
#[derive(Clone, Debug)]
pub(crate) struct ReceiveOptions {
    pub(crate) conn: ConnInfo,
    pub(crate) slot: SlotName,
    pub(crate) create_slot: bool,
    pub(crate) flush_interval: Duration,
    pub(crate) synchronous: bool,
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// The local spool directory (emptied at start).
    pub(crate) spool: PathBuf,
    /// Bytes in the local spool beyond which reading from the server pauses.
    pub(crate) spool_max: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReceiveError {
    #[error(transparent)]
    Repl(#[from] ReplError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("replication slot {slot} does not exist on the server; create it with --create-slot (or SELECT pg_create_physical_replication_slot('{slot}', true))")]
    NoSlot { slot: SlotName },
    #[error(
        "wal-receive cannot tell the server's PostgreSQL version (no server_version parameter)"
    )]
    UnknownVersion,
    #[error("local spool {path}: {source}")]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another wal-receive is using the spool {0}; give each receiver its own spool_dir")]
    SpoolBusy(PathBuf),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} is already in {repo} with different content; nothing was overwritten")]
    HistoryConflict { name: String, repo: String },
    #[error("WAL stream: {0}")]
    Stream(String),
    #[error("the server sent WAL it cannot have written: {0}")]
    InvalidWal(String),
    #[error("wal-receive: {0}")]
    UnsupportedServer(WalError),
    #[error("cannot handle SIGTERM and SIGINT: {0}")]
    Signal(#[source] std::io::Error),
    #[error("stopped at {durable}, but the WAL received up to {received} could not be stored within {within:?}; the slot keeps it on the server")]
    StoppedUnstored {
        durable: Lsn,
        received: Lsn,
        within: Duration,
    },
}

impl ReceiveError {
    /// Whether retrying cannot help: the operator must change something.
    fn is_permanent(&self) -> bool {
        match self {
            ReceiveError::Repl(e) => match e {
                ReplError::Config(_)
                | ReplError::Auth(_)
                | ReplError::Protocol(_)
                | ReplError::Tls { .. } => true,
                ReplError::Server { code, .. } => {
                    code.starts_with(sqlstate::AUTHORIZATION_CLASS)
                        || code == sqlstate::INSUFFICIENT_PRIVILEGE
                        || code == sqlstate::UNDEFINED_OBJECT
                        || code == sqlstate::UNDEFINED_FILE
                }
                ReplError::Connect { .. } | ReplError::Io(_) | ReplError::Timeout { .. } => false,
            },
            ReceiveError::Identity(IdentityError::Mismatch { .. })
            | ReceiveError::NoSlot { .. }
            | ReceiveError::UnknownVersion
            | ReceiveError::UnsupportedServer(_)
            | ReceiveError::InvalidWal(_)
            | ReceiveError::HistoryConflict { .. }
            | ReceiveError::SpoolBusy(_)
            | ReceiveError::Metrics { .. } => true,
            _ => false,
        }
    }
}

/// Runs until a permanent error, or until SIGTERM (what `systemctl stop` sends) or SIGINT:
/// then it stores what it received, logs where it stopped and returns `Ok`.
pub(crate) async fn run(
    repo: Arc<Repository>,
    options: ReceiveOptions,
) -> Result<(), ReceiveError> {
    let stop = stop_signal()?;
    run_until(repo, options, stop).await
}

/// Handles SIGTERM and SIGINT from now on; the future completes with the first one's name.
fn stop_signal() -> Result<impl Future<Output = &'static str>, ReceiveError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ReceiveError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ReceiveError::Signal)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// [`run`], stopping when `stop` completes (with the name of what stopped it).
async fn run_until(
    repo: Arc<Repository>,
    options: ReceiveOptions,
    stop: impl Future<Output = &'static str>,
) -> Result<(), ReceiveError> {
    tokio::pin!(stop);
    let _spool_lock = lock_spool(&options.spool)?;
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = options.metrics_addr {
        metrics::serve(addr, Arc::clone(&metrics))
            .await
            .map_err(|source| ReceiveError::Metrics { addr, source })?;
    }
    let mut receiver = Receiver {
        repo,
        options,
        metrics,
        ladder: None,
        pages: None,
    };
    let mut delay = FIRST_RETRY;
    let mut first = true;
    // A stop drops the session wherever it is: spooled WAL is the ladder's, not the session's.
    let signal = loop {
        if !first {
            receiver.metrics.reconnect();
        }
        first = false;
        let outcome = tokio::select! {
            signal = &mut stop => break signal,
            outcome = receiver.session() => outcome,
        };
        match outcome {
            Ok(streamed) => {
                if streamed {
                    delay = FIRST_RETRY;
                }
                tracing::info!("the server ended streaming; reconnecting in {delay:?}");
            }
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                receiver.metrics.error();
                tracing::warn!("{e}; reconnecting in {delay:?}");
            }
        }
        tokio::select! {
            signal = &mut stop => break signal,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RETRY);
    };
    receiver.stop(signal).await
}

struct Receiver {
    repo: Arc<Repository>,
    options: ReceiveOptions,
    metrics: Arc<Metrics>,
    /// Created on the first connection (it needs the segment size), kept across reconnections
    /// so that spooled WAL survives them.
    ladder: Option<Arc<Ladder>>,
    /// The page checks of the last stream, kept so that a header a lost connection cut in two
    /// is still checked when streaming resumes inside it.
    pages: Option<StreamedPages>,
}

impl Receiver {
    /// One connection: checks, then streams timeline after timeline until the server stops.
    /// Returns whether any WAL position was streamed (to reset the backoff).
    async fn session(&mut self) -> Result<bool, ReceiveError> {
        let mut conn = ReplicationConnection::connect(&self.options.conn).await?;
        let (system, cluster) = self.identify(&mut conn).await?;
        let slot = self.slot(&mut conn, cluster.major.number()).await?;
        let ladder = self.ladder(cluster.seg_size).await?;
        // Continue spooled WAL where it stopped; else from the slot (a slot that never held WAL:
        // from the server's position, as pg_receivewal does), at a segment start so that the
        // segment is spooled whole.
        let restart_tli = slot.restart_tli.unwrap_or(system.timeline);
        let slot_lsn = match slot.restart_lsn.filter(|l| l.is_valid()) {
            Some(lsn) => lsn,
            None if ladder.received_end().is_some() => system.xlogpos,
            None => self
                .repository_end(cluster.seg_size)
                .await?
                .unwrap_or(system.xlogpos),
        };
        let from = ladder
            .received_end()
            .unwrap_or((restart_tli, segment_start(slot_lsn, cluster.seg_size)));
        // Never report less than the slot already holds: that would only move it back.
        ladder.start_at(slot_lsn);
        self.stream_timelines(conn, &system, cluster, &ladder, from)
            .await
    }

    /// The server's identity and WAL format, checked against the repository's cluster.
    async fn identify(
        &self,
        conn: &mut ReplicationConnection,
    ) -> Result<(SystemInfo, ClusterWal), ReceiveError> {
        let system = conn.identify_system().await?;
        let major = conn.server_major();
        let seg_bytes = conn.wal_segment_size().await?;
        let seg_size = WalSegmentSize::new(seg_bytes)
            .map_err(|e| ReceiveError::Stream(format!("wal_segment_size: {e}")))?;
        let found = Identity {
            system_identifier: system.system_identifier,
            pg_major: major.unwrap_or(0),
            wal_segment_size: seg_size.bytes(),
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let number = major.ok_or(ReceiveError::UnknownVersion)?;
        let block_size = conn.show("wal_block_size").await?;
        let cluster = ClusterWal {
            major: PgMajor::supported(number).map_err(ReceiveError::UnsupportedServer)?,
            system_identifier: system.system_identifier,
            seg_size,
            block_size: block_size.parse().map_err(|_| {
                ReceiveError::Stream(format!("wal_block_size {block_size:?} is not a number"))
            })?,
        };
        let what = format!("the server at {}", conn.endpoint());
        identity::ensure(&self.repo, &found, &what).await?;
        Ok((system, cluster))
    }

    /// The ladder, made on the first session: it outlives reconnections, and its uploader runs
    /// from then on.
    async fn ladder(&mut self, seg_size: WalSegmentSize) -> Result<Arc<Ladder>, ReceiveError> {
        if let Some(l) = &self.ladder {
            return Ok(Arc::clone(l));
        }
        let l = Ladder::new(
            Arc::clone(&self.repo),
            self.options.spool.clone(),
            seg_size,
            Arc::clone(&self.metrics),
        )?;
        if let Err(e) = l.store_completed_fragments().await {
            // wal-fetch serves such a segment from its fragments meanwhile.
            tracing::warn!("could not store segments left as fragments: {e}");
        }
        tokio::spawn(
            Arc::clone(&l).run_uploader(self.options.flush_interval, self.options.synchronous),
        );
        self.ladder = Some(Arc::clone(&l));
        Ok(l)
    }

    /// Streams from `from` (timeline, position), following timeline switches, until the server
    /// ends the stream. Returns whether anything was streamed.
    async fn stream_timelines(
        &mut self,
        mut conn: ReplicationConnection,
        system: &SystemInfo,
        cluster: ClusterWal,
        ladder: &Arc<Ladder>,
        (mut tli, mut start): (TimelineId, Lsn),
    ) -> Result<bool, ReceiveError> {
        let mut streamed = false;
        // The timeline streaming came from and where it ended, after a switch.
        let mut came_from = None;
        loop {
            if tli.0 > 1 {
                self.store_history(&mut conn, tli, came_from).await?;
            }
            tracing::info!(
                "streaming from {start} on timeline {} (slot {}, server at {} on timeline {})",
                tli.0,
                self.options.slot,
                system.xlogpos,
                system.timeline.0
            );
            let stream = match conn.start_replication(&self.options.slot, start, tli).await {
                Ok(stream) => stream,
                Err(e) if e.code() == Some(sqlstate::UNDEFINED_OBJECT) => {
                    return Err(ReceiveError::NoSlot {
                        slot: self.options.slot.clone(),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            let mut pages = match self.pages.take() {
                Some(p) if p.tli() == tli && p.next() == start => p,
                _ => StreamedPages::new(cluster, tli, start)
                    .map_err(|e| ReceiveError::InvalidWal(e.to_string()))?,
            };
            let result = self.stream(stream, ladder, &mut pages, &mut streamed).await;
            self.pages = Some(pages);
            let Some((next, back)) = result? else {
                return Ok(streamed);
            };
            ladder.end_timeline(tli);
            let Some((next_tli, next_start)) = next else {
                return Ok(streamed);
            };
            if next_tli <= tli {
                return Err(ReceiveError::Stream(format!(
                    "the server switched from timeline {} to timeline {}, which is not newer",
                    tli.0, next_tli.0
                )));
            }
            tracing::info!(
                "timeline {} ended; timeline {} starts at {next_start}",
                tli.0,
                next_tli.0
            );
            conn = back;
            came_from = Some((tli, next_start));
            tli = next_tli;
            start = segment_start(next_start, cluster.seg_size);
        }
    }

    /// The slot's state, creating the slot if asked to. Before PostgreSQL 15 there is no
    /// `READ_REPLICATION_SLOT`: the state is known only for a slot created now; for an existing
    /// one `START_REPLICATION` says whether it exists.
    async fn slot(
        &self,
        conn: &mut ReplicationConnection,
        major: u32,
    ) -> Result<SlotInfo, ReceiveError> {
        let slot = &self.options.slot;
        let unknown = SlotInfo {
            restart_lsn: None,
            restart_tli: None,
        };
        if major >= 15 {
            if let Some(info) = conn.read_slot(slot).await? {
                return Ok(info);
            }
            if !self.options.create_slot {
                return Err(ReceiveError::NoSlot { slot: slot.clone() });
            }
        } else if !self.options.create_slot {
            return Ok(unknown);
        }
        let created = match conn.create_physical_slot(slot).await {
            Ok(point) => {
                tracing::info!("created physical replication slot {slot}");
                point
            }
            // It exists (or another receiver created it between our look and our creation).
            Err(e) if e.code() == Some(sqlstate::DUPLICATE_OBJECT) => None,
            Err(e) => return Err(e.into()),
        };
        if major >= 15 {
            return conn
                .read_slot(slot)
                .await?
                .ok_or_else(|| ReceiveError::NoSlot { slot: slot.clone() });
        }
        Ok(SlotInfo {
            restart_lsn: created,
            ..unknown
        })
    }

    /// Where the repository's streamed WAL ends, for a restart that cannot ask the slot
    /// (PostgreSQL 14 and older): the start of the newest segment with fragments, else the end
    /// of the newest complete segment. Streaming from there leaves no gap, because the slot
    /// never moved past what the repository holds.
    async fn repository_end(&self, seg_size: WalSegmentSize) -> Result<Option<Lsn>, ReceiveError> {
        let mut end: Option<Lsn> = None;
        let mut consider = |seg: SegmentName, complete: bool| {
            let Ok(segno) = seg.segno(seg_size) else {
                return;
            };
            let segno = if complete { segno.next() } else { segno };
            if let Ok(lsn) = segno.start_lsn(seg_size) {
                end = end.max(Some(lsn));
            }
        };
        for seg in fragments::streamed_segments(&self.repo).await? {
            consider(seg, false);
        }
        for object in self.repo.list(Listing::Wal).await? {
            if let Some(ObjectKey::Wal(WalFileName::Segment(seg))) = ObjectKey::parse(&object.key) {
                consider(seg, true);
            }
        }
        Ok(end)
    }

    /// Stores `<tli>.history` as wal-push would (PostgreSQL's archiver may have stored it).
    /// After a switch (`came_from`: the timeline that ended and where), the history must say
    /// that `tli` branched from that timeline there.
    async fn store_history(
        &self,
        conn: &mut ReplicationConnection,
        tli: TimelineId,
        came_from: Option<(TimelineId, Lsn)>,
    ) -> Result<(), ReceiveError> {
        let (history, content) = conn.timeline_history(tli).await?;
        let name = WalFileName::History(tli);
        if let Some((parent, end)) = came_from {
            if history.parent() != Some(parent) || history.switch_point(parent) != Some(end) {
                return Err(ReceiveError::InvalidWal(format!(
                    "timeline {} ended at {end} and timeline {} followed, but {name} does not \
                     branch there from timeline {}",
                    parent.0, tli.0, parent.0
                )));
            }
        }
        match self
            .repo
            .store_wal(&name, WalContent::Bytes(&content), |_| {})
            .await
        {
            Ok(WalStored::Created(_)) => tracing::info!("{name}: stored (streamed)"),
            Ok(WalStored::Identical) => {}
            Err(RepoError::Conflict { .. }) => {
                return Err(ReceiveError::HistoryConflict {
                    name: name.to_string(),
                    repo: self.repo.url().to_owned(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Streams one timeline until the server ends it. Returns where the next timeline starts
    /// and the connection, back in command mode; `None` when the server shuts down. Each
    /// message is checked by `pages` before it is spooled.
    async fn stream(
        &self,
        mut stream: WalStream,
        ladder: &Ladder,
        pages: &mut StreamedPages,
        streamed: &mut bool,
    ) -> Result<Option<NextTimeline>, ReceiveError> {
        let tli = pages.tli();
        let mut durable = ladder.durable();
        let mut received = *durable.borrow();
        let mut reported = Lsn::INVALID;
        let mut last_status = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Backpressure: while the repository is behind by more than the spool may hold,
            // stop reading; the server waits (status updates keep the connection alive).
            let paused = ladder.spooled() > self.options.spool_max;
            let mut reply = false;
            tokio::select! {
                event = stream.recv(), if !paused => match event? {
                    StreamEvent::XLogData { start, server_end, data } => {
                        let end = pages
                            .feed(start, &data)
                            .map_err(|e| ReceiveError::InvalidWal(e.to_string()))?;
                        ladder.write(tli, start, &data)?;
                        received = received.max(end);
                        self.metrics.server_end(server_end);
                        *streamed = true;
                    }
                    StreamEvent::Keepalive { server_end, reply_requested } => {
                        self.metrics.server_end(server_end);
                        reply = reply_requested;
                    }
                    StreamEvent::End => return Ok(Some(stream.finish().await?)),
                    StreamEvent::Shutdown => return Ok(None),
                },
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Err(ReceiveError::Stream("the uploader stopped".into()));
                    }
                    reply = true;
                }
                _ = tick.tick() => {
                    let silent = stream.last_heard().elapsed();
                    // While paused the server's messages wait unread, so silence means nothing.
                    if silent > SILENCE_LIMIT && !paused {
                        return Err(ReceiveError::Stream(format!(
                            "nothing from the server for {silent:?}"
                        )));
                    }
                    reply = last_status.elapsed() >= STATUS_INTERVAL;
                }
            }
            if reply {
                let flush = *durable.borrow();
                let ask = stream.last_heard().elapsed() >= STATUS_INTERVAL;
                stream.send_status(received.max(flush), flush, ask).await?;
                if flush != reported {
                    tracing::debug!("reported flush {flush}");
                    reported = flush;
                }
                self.metrics.flushed(flush);
                last_status = tokio::time::Instant::now();
            }
        }
    }
}

impl Receiver {
    /// After a stop signal: stores everything received (at once, not at the next flush
    /// deadline) and logs where it stopped.
    async fn stop(&self, signal: &str) -> Result<(), ReceiveError> {
        let Some(ladder) = &self.ladder else {
            tracing::info!("{signal}: stopped before receiving any WAL");
            return Ok(());
        };
        tracing::info!("{signal}: storing the WAL received so far, then stopping");
        match ladder.drain(STOP_BOUND).await {
            Ok(durable) => {
                let tli = ladder
                    .received_end()
                    .map_or(String::new(), |(tli, _)| format!(" on timeline {}", tli.0));
                tracing::info!(
                    "stopped at {durable}{tli}: everything received up to there is in {}",
                    self.repo.url()
                );
                Ok(())
            }
            Err((durable, received)) => Err(ReceiveError::StoppedUnstored {
                durable,
                received,
                within: STOP_BOUND,
            }),
        }
    }
}

/// Takes the spool for this process, for as long as the returned file lives: a second receiver
/// on the same spool would delete the first one's files when it starts.
fn lock_spool(dir: &Path) -> Result<std::fs::File, ReceiveError> {
    let spool_err = |source| ReceiveError::Spool {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(spool_err)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(spool_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ReceiveError::SpoolBusy(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(spool_err(e)),
    }
}

/// Where the next timeline starts (`None`: nowhere, the server stops), and the connection.
type NextTimeline = (Option<(TimelineId, Lsn)>, ReplicationConnection);

fn segment_start(lsn: Lsn, seg_size: WalSegmentSize) -> Lsn {
    Lsn(lsn.0 - lsn.segment_offset(seg_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::fake;
    use tokio::io::AsyncWriteExt;

    const SEG_SIZE: u64 = 1 << 20;
    const BLOCK: u64 = 8192;
    /// Segment 3 of timeline 1.
    const SEG: u64 = 3 * SEG_SIZE;
    const SYSID: u64 = 7_301_234_567_890_123_456;

    /// A PostgreSQL 15 WAL page of timeline 1 as the server writes it at `pageaddr`.
    fn page(pageaddr: u64, fill: u8) -> Vec<u8> {
        let long = pageaddr.is_multiple_of(SEG_SIZE);
        let mut p = Vec::new();
        p.extend_from_slice(&PgMajor::V15.magic().to_le_bytes());
        let info = if long {
            walvault_wal::page::XLP_LONG_HEADER
        } else {
            0
        };
        p.extend_from_slice(&info.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&pageaddr.to_le_bytes());
        p.extend_from_slice(&[0; 8]);
        if long {
            p.extend_from_slice(&SYSID.to_le_bytes());
            p.extend_from_slice(&(SEG_SIZE as u32).to_le_bytes());
            p.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        }
        p.resize(BLOCK as usize, fill);
        p
    }

    struct Streamed {
        result: Result<Option<NextTimeline>, ReceiveError>,
        ladder: Arc<Ladder>,
        spool: PathBuf,
        _dir: tempfile::TempDir,
    }

    /// Streams timeline 1 from segment 3 with a server that sends `messages` (XLogData), then
    /// shuts down.
    async fn stream_from_server(messages: Vec<Vec<u8>>) -> Streamed {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("repo");
        std::fs::create_dir(&repo_dir).unwrap();
        let repo = Arc::new(crate::repo::local_for_tests(&repo_dir).await);
        let spool = dir.path().join("spool");
        let metrics = Arc::new(Metrics::default());
        let seg_size = WalSegmentSize::new(SEG_SIZE).unwrap();
        let ladder = Ladder::new(
            Arc::clone(&repo),
            spool.clone(),
            seg_size,
            Arc::clone(&metrics),
        )
        .unwrap();
        let receiver = Receiver {
            repo,
            options: ReceiveOptions {
                conn: ConnInfo::resolve(Some("host=127.0.0.1 port=1 user=t"), "t").unwrap(),
                slot: "s".parse().unwrap(),
                create_slot: false,
                flush_interval: Duration::from_secs(1),
                synchronous: false,
                metrics_addr: None,
                spool: spool.clone(),
                spool_max: 1 << 30,
            },
            metrics,
            ladder: None,
            pages: None,
        };
        let (client, mut server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut all = fake::copy_both();
            for m in messages {
                all.extend_from_slice(&m);
            }
            all.extend_from_slice(&fake::message(b'C', b"START_REPLICATION\0"));
            server.write_all(&all).await.unwrap();
            // Stays open until the client goes, as a server would.
            let _ = tokio::io::copy(&mut server, &mut tokio::io::sink()).await;
        });
        let conn = ReplicationConnection::over(client, 15);
        let stream = conn
            .start_replication(&"s".parse().unwrap(), Lsn(SEG), TimelineId(1))
            .await
            .unwrap();
        let cluster = ClusterWal {
            major: PgMajor::V15,
            system_identifier: SYSID,
            seg_size,
            block_size: BLOCK as u32,
        };
        let mut pages = StreamedPages::new(cluster, TimelineId(1), Lsn(SEG)).unwrap();
        let result = receiver
            .stream(stream, &ladder, &mut pages, &mut false)
            .await;
        Streamed {
            result,
            ladder,
            spool,
            _dir: dir,
        }
    }

    fn spooled_segment(s: &Streamed, seg: &str) -> Vec<u8> {
        std::fs::read(s.spool.join(format!("{seg}.partial"))).unwrap()
    }

    fn error_of(s: &Streamed) -> String {
        match &s.result {
            Err(e) => e.to_string(),
            Ok(_) => panic!("the stream was accepted"),
        }
    }

    #[tokio::test]
    async fn streamed_pages_are_checked_before_they_are_spooled() {
        let good = [page(SEG, 1), page(SEG + BLOCK, 2)].concat();
        let s = stream_from_server(vec![fake::xlog_data(SEG, &good)]).await;
        assert!(s.result.is_ok(), "{}", error_of(&s));
        assert_eq!(spooled_segment(&s, "000000010000000000000003"), good);

        // A page that claims another position, in the second message.
        let wrong = page(SEG + 2 * BLOCK, 3);
        let s = stream_from_server(vec![
            fake::xlog_data(SEG, &page(SEG, 1)),
            fake::xlog_data(SEG + BLOCK, &wrong),
        ])
        .await;
        let err = error_of(&s);
        assert!(
            err.contains("WAL page at 0/302000: page address 0/304000"),
            "{err}"
        );
        assert_eq!(s.ladder.spooled(), BLOCK, "the bad page was spooled");

        // Another cluster's segment.
        let mut other = page(SEG, 1);
        other[24..32].copy_from_slice(&(SYSID + 1).to_le_bytes());
        let s = stream_from_server(vec![fake::xlog_data(SEG, &other)]).await;
        assert!(
            error_of(&s).contains("system identifier"),
            "{}",
            error_of(&s)
        );
        assert_eq!(s.ladder.spooled(), 0);
    }

    #[tokio::test]
    async fn xlogdata_must_continue_the_stream() {
        let first = page(SEG, 1);
        // Going backwards: never an overwrite of what is spooled.
        let s = stream_from_server(vec![
            fake::xlog_data(SEG, &first),
            fake::xlog_data(SEG + 100, &[0xEE; 500]),
        ])
        .await;
        let err = error_of(&s);
        assert!(
            err.contains(
                "WAL from 0/300064 does not continue the stream at 0/302000 (it goes backwards)"
            ),
            "{err}"
        );
        assert_eq!(spooled_segment(&s, "000000010000000000000003"), first);

        // A gap into the next segment, which would otherwise open quietly.
        let s = stream_from_server(vec![
            fake::xlog_data(SEG, &first),
            fake::xlog_data(SEG + SEG_SIZE, &page(SEG + SEG_SIZE, 2)),
        ])
        .await;
        let err = error_of(&s);
        assert!(err.contains("(it leaves a gap)"), "{err}");
        assert_eq!(s.ladder.spooled(), BLOCK);
    }
}
