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
//! identity), authentication refused, a server that does not speak the replication protocol.
//! Used by the CLI; [`fragments`] is also used by wal-fetch to serve streamed partial segments.

pub mod fragments;
mod ladder;
pub mod metrics;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use walvault_wal::{Lsn, TimelineId, WalFileName, WalSegmentSize};

use crate::archive::wal_key;
use crate::identity::{self, Identity, IdentityError};
use crate::pg::conninfo::ConnInfo;
use crate::replication::{
    sqlstate, ReplError, ReplicationConnection, SlotInfo, SlotName, StreamEvent, WalStream,
};
use crate::repo::{RepoError, Repository};
use crate::store::{Committed, PutMode};
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

/// How wal-receive runs.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub conn: ConnInfo,
    pub slot: SlotName,
    pub create_slot: bool,
    pub flush_interval: Duration,
    pub synchronous: bool,
    pub metrics_addr: Option<SocketAddr>,
    /// The local spool directory (emptied at start).
    pub spool: PathBuf,
    /// Bytes in the local spool beyond which reading from the server pauses.
    pub spool_max: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Repl(#[from] ReplError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("replication slot {slot} does not exist on the server; create it with --create-slot (or SELECT pg_create_physical_replication_slot('{slot}', true))")]
    NoSlot { slot: SlotName },
    #[error("wal-receive needs PostgreSQL 13 or later; the server is {0}")]
    ServerTooOld(String),
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
            | ReceiveError::ServerTooOld(_)
            | ReceiveError::HistoryConflict { .. }
            | ReceiveError::SpoolBusy(_)
            | ReceiveError::Metrics { .. } => true,
            _ => false,
        }
    }
}

/// Runs until a permanent error.
pub async fn run(repo: Arc<Repository>, options: ReceiveOptions) -> Result<(), ReceiveError> {
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
    };
    let mut delay = FIRST_RETRY;
    let mut first = true;
    loop {
        if !first {
            receiver.metrics.reconnect();
        }
        first = false;
        match receiver.session().await {
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
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

struct Receiver {
    repo: Arc<Repository>,
    options: ReceiveOptions,
    metrics: Arc<Metrics>,
    /// Created on the first connection (it needs the segment size), kept across reconnections
    /// so that spooled WAL survives them.
    ladder: Option<Arc<Ladder>>,
}

impl Receiver {
    /// One connection: checks, then streams timeline after timeline until the server stops.
    /// Returns whether any WAL position was streamed (to reset the backoff).
    async fn session(&mut self) -> Result<bool, ReceiveError> {
        let mut conn = ReplicationConnection::connect(&self.options.conn).await?;
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
        if major.is_none_or(|m| m < 13) {
            return Err(ReceiveError::ServerTooOld(
                major.map_or("of unknown version".into(), |m| format!("PostgreSQL {m}")),
            ));
        }
        let what = format!("the server at {}", conn.endpoint());
        identity::ensure(&self.repo, &found, &what).await?;
        let slot = self.slot(&mut conn, major.unwrap_or(0)).await?;
        let ladder = match &self.ladder {
            Some(l) => Arc::clone(l),
            None => {
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
                    Arc::clone(&l)
                        .run_uploader(self.options.flush_interval, self.options.synchronous),
                );
                self.ladder = Some(Arc::clone(&l));
                l
            }
        };
        // Continue spooled WAL where it stopped; else from the slot (a slot that never held WAL:
        // from the server's position, as pg_receivewal does), at a segment start so that the
        // segment is spooled whole.
        let restart_tli = slot.restart_tli.unwrap_or(system.timeline);
        let slot_lsn = match slot.restart_lsn.filter(|l| l.is_valid()) {
            Some(lsn) => lsn,
            None if ladder.received_end().is_some() => system.xlogpos,
            None => self
                .repository_end(seg_size)
                .await?
                .unwrap_or(system.xlogpos),
        };
        let (mut tli, mut start) = ladder
            .received_end()
            .unwrap_or((restart_tli, segment_start(slot_lsn, seg_size)));
        // Never report less than the slot already holds: that would only move it back.
        ladder.start_at(slot_lsn);
        let mut streamed = false;
        loop {
            if tli.0 > 1 {
                self.store_history(&mut conn, tli).await?;
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
            let Some((next, back)) = self.stream(stream, &ladder, tli, &mut streamed).await? else {
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
            tli = next_tli;
            start = segment_start(next_start, seg_size);
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
        let mut consider = |name: &str, complete: bool| {
            let Ok(seg) = name.parse::<walvault_wal::SegmentName>() else {
                return;
            };
            let Ok(segno) = seg.segno(seg_size) else {
                return;
            };
            let segno = if complete { segno.next() } else { segno };
            if let Ok(lsn) = segno.start_lsn(seg_size) {
                end = end.max(Some(lsn));
            }
        };
        for object in self
            .repo
            .store()
            .list("stream/")
            .await
            .map_err(RepoError::from)?
        {
            if let Some((name, _)) = object.key.trim_start_matches("stream/").split_once('/') {
                consider(name, false);
            }
        }
        for object in self
            .repo
            .store()
            .list("wal/")
            .await
            .map_err(RepoError::from)?
        {
            consider(object.key.trim_start_matches("wal/"), true);
        }
        Ok(end)
    }

    /// Stores `<tli>.history` as wal-push would (PostgreSQL's archiver may have stored it).
    async fn store_history(
        &self,
        conn: &mut ReplicationConnection,
        tli: TimelineId,
    ) -> Result<(), ReceiveError> {
        let (_, content) = conn.timeline_history(tli).await?;
        let name = WalFileName::History(tli);
        let key = wal_key(&name);
        if let Committed::AlreadyExists = self
            .repo
            .put_bytes(&key, &content, PutMode::IfAbsent)
            .await?
        {
            if self.repo.get_bytes(&key).await?.as_deref() != Some(&content[..]) {
                return Err(ReceiveError::HistoryConflict {
                    name: name.to_string(),
                    repo: self.repo.url().to_owned(),
                });
            }
        } else {
            tracing::info!("{name}: stored (streamed)");
        }
        Ok(())
    }

    /// Streams one timeline until the server ends it. Returns where the next timeline starts
    /// and the connection, back in command mode; `None` when the server shuts down.
    async fn stream(
        &self,
        mut stream: WalStream,
        ladder: &Ladder,
        tli: TimelineId,
        streamed: &mut bool,
    ) -> Result<Option<NextTimeline>, ReceiveError> {
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
                        ladder.write(tli, start, &data)?;
                        received = received.max(start + data.len() as u64);
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
