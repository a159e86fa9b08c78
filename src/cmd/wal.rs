//! The WAL commands at the CLI edge: `wal-push` and `wal-fetch` as PostgreSQL calls them, and the
//! two detached helpers they start (`wal-push-ahead`, `wal-prefetch`), whose command lines are
//! built here and nowhere else. Each call logs one line with what it did and how long it took.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use walvault_wal::{SegmentName, WalFileName};

use super::human_bytes;
use crate::config::{FlagValues, Settings};
use crate::repo::Repository;
use crate::wal::fetch::{self, Fetched};
use crate::wal::prefetch::{self, Prefetched};
use crate::wal::push::{Archiver, Pushed};
use crate::wal::spool::{self, Spool};

/// Prefetched segments untouched this long are left over from a finished recovery.
const STALE_PREFETCH: std::time::Duration = std::time::Duration::from_secs(3600);

/// `wal-push <path>`: archives one WAL file, starting the detached pusher when other segments
/// are ready.
pub(super) async fn push(
    settings: &Settings,
    flags: &FlagValues,
    repo: Arc<Repository>,
    path: &Path,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let wal_dir = spool::wal_dir_of(path);
    let spool = Spool::locate(settings.spool_dir.as_deref(), wal_dir);
    spool.drop_stale_prefetch(STALE_PREFETCH).await;
    let start_pusher = || {
        if let Err(e) = spool::spawn_helper(&pusher_args(flags, &spool, wal_dir)) {
            // Push-ahead only saves time; every segment is still pushed on its own turn.
            tracing::warn!("could not start the push-ahead process: {e}");
        }
    };
    let (name, pushed) = Archiver::new(repo)
        .push_requested(path, &spool, start_pusher)
        .await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match pushed {
        Pushed::Stored { content, stored } => tracing::info!(
            "{name}: stored {} as {} in {ms:.1} ms",
            human_bytes(content),
            human_bytes(stored)
        ),
        Pushed::AlreadyArchived => {
            tracing::info!("{name}: already archived with identical content")
        }
        Pushed::Ahead => tracing::info!("{name}: already stored by push-ahead"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `wal-fetch <name> <dest>`: restores one WAL file, then starts the detached prefetcher when
/// the spool runs low.
pub(super) async fn fetch(
    settings: &Settings,
    flags: &FlagValues,
    repo: Arc<Repository>,
    name: &str,
    dest: &Path,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let name: WalFileName = name
        .parse()
        .with_context(|| format!("{name} is not a WAL file name recovery asks for"))?;
    let spool = Spool::locate(settings.spool_dir.as_deref(), spool::wal_dir_of(dest));
    let mut prefetched = Prefetched::read(&spool, repo.url());
    let fetched = fetch::fetch(&repo, &mut prefetched, &name, dest)
        .await
        .with_context(|| format!("fetching {name} from {}", repo.url()))?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match fetched {
        Fetched::NotFound => {
            tracing::info!("{name}: not in the archive");
            return Ok(ExitCode::from(1));
        }
        Fetched::Found { from_spool } => {
            tracing::info!(
                "{name}: restored{} in {ms:.1} ms",
                if from_spool { " from prefetch" } else { "" }
            )
        }
    }
    let window = prefetch::prefetch_window(&name, dest, settings.prefetch).await;
    if !window.is_empty() && prefetched.refill_needed(&window) {
        if let Err(e) = spool::spawn_helper(&prefetcher_args(flags, &spool, &window)) {
            // Prefetch only saves time; recovery goes on fetching one segment at a time.
            tracing::warn!("could not start the prefetcher: {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `wal-push-ahead`: the detached pusher's run.
pub(super) async fn push_ahead(
    settings: &Settings,
    repo: Arc<Repository>,
    spool: &Path,
    wal_dir: &Path,
) -> anyhow::Result<ExitCode> {
    let stored = Archiver::new(repo)
        .push_ahead(
            wal_dir,
            &Spool::locate(Some(spool), wal_dir),
            settings.push_concurrency,
        )
        .await;
    tracing::debug!("pushed {stored} segments ahead");
    Ok(ExitCode::SUCCESS)
}

/// `wal-prefetch`: the detached prefetcher's run over the window wal-fetch named.
pub(super) async fn prefetch(
    repo: Arc<Repository>,
    spool: &Path,
    segments: &[String],
) -> anyhow::Result<ExitCode> {
    let window = segments
        .iter()
        .map(|s| s.parse::<SegmentName>())
        .collect::<Result<Vec<_>, _>>()?;
    let stored = prefetch::prefetch(repo, &Spool::locate(Some(spool), spool), window, 4).await?;
    tracing::debug!("prefetched {stored} segments");
    Ok(ExitCode::SUCCESS)
}

/// The pusher's command line: this call's configuration flags (it inherits the environment),
/// the spool, the concurrency asked for, and the `pg_wal` directory.
fn pusher_args(flags: &FlagValues, spool: &Spool, wal_dir: &Path) -> Vec<OsString> {
    let mut args = global_args(flags);
    args.extend([
        "wal-push-ahead".into(),
        "--spool".into(),
        spool.dir().into(),
    ]);
    if let Some(concurrency) = &flags.push_concurrency {
        args.extend(["--concurrency".into(), concurrency.into()]);
    }
    args.push(
        std::path::absolute(wal_dir)
            .unwrap_or_else(|_| wal_dir.to_path_buf())
            .into(),
    );
    args
}

/// The prefetcher's command line: this call's configuration flags, the spool and the window.
fn prefetcher_args(flags: &FlagValues, spool: &Spool, window: &[SegmentName]) -> Vec<OsString> {
    let mut args = global_args(flags);
    args.extend(["wal-prefetch".into(), "--spool".into(), spool.dir().into()]);
    args.extend(window.iter().map(|s| s.to_string().into()));
    args
}

/// The configuration flags of this call, for a helper process that must see the same settings
/// (it inherits the environment).
fn global_args(flags: &FlagValues) -> Vec<OsString> {
    let mut args = Vec::new();
    if let Some(config) = &flags.config {
        let config = std::path::absolute(config).unwrap_or_else(|_| PathBuf::from(config));
        args.extend(["--config".into(), config.into()]);
    }
    if let Some(repo) = &flags.repo {
        args.extend(["--repo".into(), repo.into()]);
    }
    args
}
