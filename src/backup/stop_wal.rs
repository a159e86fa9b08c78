//! The end of a backup: waiting, bounded, until the repository holds the WAL up to its stop LSN,
//! the whole stop segment or `wal-receive` fragments reaching it. walvault waits itself rather
//! than in `pg_backup_stop`: PostgreSQL looks once a second, and a standby's archiver does not
//! ship the primary's WAL at all. On a primary the wait watches `pg_stat_archiver`; on a standby
//! it may force WAL switches on the primary (`--primary-conninfo`). Used by backup/push.

use std::path::Path;
use std::time::Duration;

use walvault_wal::{Lsn, SegmentName, TimelineId, WalFileName, WalSegmentSize};

use super::{progress, BackupError};
use crate::pg::{self, BackupSession, ConnTarget, PgError};
use crate::repo::layout;
use crate::repo::Repository;
use crate::wal::fragments;

/// How a standby backup gets its WAL.
#[derive(Clone, Debug)]
pub(crate) struct StandbyOptions {
    /// The longest to wait after the stop for the stop segment to reach the repository.
    pub(crate) wal_wait: Duration,
    /// A connection to the primary for `pg_switch_wal()`, if given.
    pub(crate) primary_conninfo: Option<String>,
}

/// Who ships the stop segment to the repository.
pub(crate) enum Shipper<'a> {
    /// The backed-up primary's own archiver, watched through `pg_stat_archiver` and its
    /// data directory's `archive_status`.
    Archiver {
        session: &'a BackupSession,
        pgdata: &'a Path,
    },
    /// Whatever archives the WAL of the backed-up standby's primary.
    Primary(&'a StandbyOptions),
}

/// What the wait is for: the WAL of one backup up to its stop LSN.
pub(crate) struct StopWal<'a> {
    pub(crate) repo: &'a Repository,
    pub(crate) system_identifier: u64,
    pub(crate) timeline: u32,
    pub(crate) start_lsn: Lsn,
    pub(crate) stop_lsn: Lsn,
    pub(crate) segment_size: u32,
    /// Bound on each call to the primary.
    pub(crate) reply: Duration,
    pub(crate) progress: bool,
}

/// The segment holding the last byte of WAL a backup that stopped at `stop` needs, and how far
/// into it the WAL must reach.
fn stop_segment(
    timeline: u32,
    stop: Lsn,
    segment_size: u32,
) -> Result<(SegmentName, u64), BackupError> {
    let bad = |e: walvault_wal::WalError| {
        BackupError::invalid(format!("the backup's stop LSN {stop}"), e.to_string())
    };
    let size = WalSegmentSize::new(u64::from(segment_size)).map_err(bad)?;
    let segno = stop.end_segment_number(size);
    let name = SegmentName::new(TimelineId(timeline), segno, size).map_err(bad)?;
    // A stop on a segment boundary needs the whole previous segment.
    let needed = match stop.segment_offset(size) {
        0 => u64::from(segment_size),
        offset => offset,
    };
    Ok((name, needed))
}

/// The backup history file a primary's `pg_backup_stop` writes and archives
/// (`<start segment>.<start offset>.backup`).
fn history_file(timeline: u32, start: Lsn, segment_size: u32) -> Result<WalFileName, BackupError> {
    let bad = |e: walvault_wal::WalError| {
        BackupError::invalid(format!("the backup's start LSN {start}"), e.to_string())
    };
    let size = WalSegmentSize::new(u64::from(segment_size)).map_err(bad)?;
    let segment =
        SegmentName::new(TimelineId(timeline), start.segment_number(size), size).map_err(bad)?;
    // The offset is below the segment size, itself at most 1 GiB.
    let offset = u32::try_from(start.segment_offset(size)).unwrap_or(u32::MAX);
    Ok(WalFileName::Backup { segment, offset })
}

/// Waits until the repository holds the backup's WAL up to its stop LSN, within
/// `backup_stop_timeout` (primary) or `--wal-wait-timeout` (standby); fails naming the segment
/// and the LSN when it does not arrive.
pub(crate) async fn wait_for_stop_wal(
    wal: &StopWal<'_>,
    shipper: &Shipper<'_>,
) -> Result<(), BackupError> {
    let (segment, needed) = stop_segment(wal.timeline, wal.stop_lsn, wal.segment_size)?;
    // On a primary the archiver also ships the backup history file: waited for as well, as
    // pg_backup_stop's own wait does, so nothing is still arriving once the backup is listed.
    let history = match shipper {
        Shipper::Archiver { .. } => {
            Some(history_file(wal.timeline, wal.start_lsn, wal.segment_size)?)
        }
        Shipper::Primary(_) => None,
    };
    let (bound, primary) = match shipper {
        Shipper::Archiver { session, .. } => (session.backup_stop_timeout(), None),
        Shipper::Primary(opts) => (
            opts.wal_wait,
            opts.primary_conninfo
                .as_deref()
                .map(|c| ConnTarget::resolve(Some(c)))
                .transpose()?,
        ),
    };
    let spinner = progress::spinner(wal.progress, format!("waiting for WAL segment {segment}"));
    let started = tokio::time::Instant::now();
    let deadline = started + bound;
    // Switching again later helps when the first switch came before the primary had written
    // past the stop LSN; a switch with nothing new written is a no-op on the primary.
    let switch_every = Duration::from_secs(15);
    let mut next_switch = started;
    let report_every = (bound / 6).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut next_report = started + report_every;
    // The archiver usually delivers within tens of milliseconds of the stop's WAL switch, and a
    // small delta takes about a hundred: the first looks come close together.
    let mut pause = Duration::from_millis(5);
    let mut last_problem = None;
    loop {
        if arrived(wal.repo, &segment, needed, history.as_ref()).await? {
            spinner.finish_and_clear();
            tracing::info!(
                "WAL segment {segment} (the backup's stop at {}) is in the repository",
                wal.stop_lsn
            );
            return Ok(());
        }
        if let Shipper::Archiver { pgdata, .. } = shipper {
            let done = archived_elsewhere(pgdata, &segment.to_string())
                && history
                    .as_ref()
                    .is_none_or(|h| archived_elsewhere(pgdata, &h.to_string()));
            if done && !arrived(wal.repo, &segment, needed, history.as_ref()).await? {
                spinner.finish_and_clear();
                tracing::warn!(
                    "WAL segment {segment} (the backup's stop at {}) was archived by \
                     archive_command, but not into {}: restoring this backup needs the WAL from \
                     its start to its stop there",
                    wal.stop_lsn,
                    wal.repo.url()
                );
                return Ok(());
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            spinner.finish_and_clear();
            return Err(match shipper {
                Shipper::Archiver { session, .. } => PgError::BackupStopTimeout {
                    target: session.target().to_owned(),
                    segment: segment.to_string(),
                    after: humantime::format_duration(bound).to_string(),
                    archiving: session.archiving().await,
                }
                .into(),
                Shipper::Primary(opts) => not_arrived(wal, opts, &segment, last_problem),
            });
        }
        if let Some(primary) = primary.as_ref().filter(|_| now >= next_switch) {
            next_switch = now + switch_every;
            last_problem = switch(primary, wal).await.err();
        }
        if let (Shipper::Archiver { session, .. }, true) = (shipper, now >= next_report) {
            next_report = now + report_every;
            tracing::info!(
                "still waiting for WAL archiving of {segment} after {} s: {}",
                started.elapsed().as_secs(),
                session.archiving().await
            );
        }
        spinner.set_message(format!(
            "waiting for WAL segment {segment} (stop {}) to reach the repository: {} s",
            wal.stop_lsn,
            started.elapsed().as_secs()
        ));
        let wake = (now + pause).min(deadline);
        tokio::time::sleep_until(wake).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Whether the repository holds `history` (when there is one), and `segment` whole or streamed
/// fragments of it from its start up to `needed` bytes.
async fn arrived(
    repo: &Repository,
    segment: &SegmentName,
    needed: u64,
    history: Option<&WalFileName>,
) -> Result<bool, BackupError> {
    if let Some(history) = history {
        if repo.head(&layout::wal(history)).await?.is_none() {
            return Ok(false);
        }
    }
    if repo.head(&layout::segment(segment)).await?.is_some() {
        return Ok(true);
    }
    let streamed = fragments::list(repo, segment).await?;
    Ok(fragments::covered(&streamed) >= needed)
}

/// Whether the server's archiver is done with WAL file `file` (the test `pg_backup_stop` itself
/// makes: `archive_status/<file>.done`, or the file already removed), when its `archive_command`
/// ships somewhere else than this repository. A `.ready` file means it is still to be archived.
fn archived_elsewhere(pgdata: &Path, file: &str) -> bool {
    let wal = pgdata.join("pg_wal");
    let status = wal.join("archive_status");
    let exists = |p: std::path::PathBuf| p.symlink_metadata().is_ok();
    if exists(status.join(format!("{file}.done"))) {
        return true;
    }
    if exists(status.join(format!("{file}.ready"))) {
        return false;
    }
    // Gone from pg_wal means recycled after archiving; the .done check is repeated first
    // because the archiver may have finished between the looks.
    exists(status.join(format!("{file}.done"))) || !exists(wal.join(file))
}

/// One WAL switch on the primary, which must be the standby's cluster.
async fn switch(primary: &ConnTarget, wal: &StopWal<'_>) -> Result<(), String> {
    match pg::switch_wal(primary, wal.reply).await {
        Ok(sysid) if sysid == wal.system_identifier => {
            tracing::info!("forced a WAL switch on the primary");
            Ok(())
        }
        Ok(sysid) => {
            let problem = format!(
                "--primary-conninfo reaches cluster {sysid}, not this standby's {}",
                wal.system_identifier
            );
            tracing::warn!("{problem}");
            Err(problem)
        }
        Err(e) => {
            tracing::warn!("cannot force a WAL switch on the primary: {e}");
            Err(e.to_string())
        }
    }
}

fn not_arrived(
    wal: &StopWal<'_>,
    opts: &StandbyOptions,
    segment: &SegmentName,
    primary_problem: Option<String>,
) -> BackupError {
    let hint = match (&opts.primary_conninfo, primary_problem) {
        (None, _) => "; pass --primary-conninfo so walvault forces a WAL switch on the primary",
        (Some(_), Some(_)) => "; the WAL switch on the primary failed (see above)",
        (Some(_), None) => "",
    };
    BackupError::invalid(
        format!("backup from a standby stopped at {}", wal.stop_lsn),
        format!(
            "the repository did not receive WAL segment {segment}, which holds the backup's \
             stop LSN {}, within {} (--wal-wait-timeout): a standby does not archive the \
             primary's WAL, so the primary must (archive_command = 'walvault wal-push %p', or \
             wal-receive); check pg_stat_archiver on the primary{hint}; this backup is abandoned",
            wal.stop_lsn,
            humantime::format_duration(opts.wal_wait)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `.done` or a segment gone from pg_wal mean archived; `.ready`, or a segment still there
    /// with no status yet, do not.
    #[test]
    fn the_archivers_status_files_say_when_it_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("pg_wal/archive_status");
        std::fs::create_dir_all(&status).unwrap();
        let seg = "000000010000000000000003";
        assert!(archived_elsewhere(dir.path(), seg), "gone from pg_wal");
        std::fs::write(dir.path().join("pg_wal").join(seg), b"").unwrap();
        assert!(!archived_elsewhere(dir.path(), seg), "no status yet");
        std::fs::write(status.join(format!("{seg}.ready")), b"").unwrap();
        assert!(!archived_elsewhere(dir.path(), seg), "ready");
        std::fs::rename(
            status.join(format!("{seg}.ready")),
            status.join(format!("{seg}.done")),
        )
        .unwrap();
        assert!(archived_elsewhere(dir.path(), seg), "done");
    }

    #[test]
    fn the_history_file_is_named_after_the_start() {
        let name = history_file(1, "0/3000028".parse().unwrap(), 16 << 20).unwrap();
        assert_eq!(name.to_string(), "000000010000000000000003.00000028.backup");
    }

    #[test]
    fn the_stop_segment_is_the_one_holding_the_last_byte() {
        let seg = 16 << 20;
        let (name, needed) = stop_segment(1, "0/3000028".parse().unwrap(), seg).unwrap();
        assert_eq!(name.to_string(), "000000010000000000000003");
        assert_eq!(needed, 0x28);
        // A stop exactly on a boundary needs all of the segment before it.
        let (name, needed) = stop_segment(2, "1/4000000".parse().unwrap(), seg).unwrap();
        assert_eq!(name.to_string(), "000000020000000100000003");
        assert_eq!(needed, u64::from(seg));
    }
}
