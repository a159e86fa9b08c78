//! The `walvault` command: argument parsing, logging, and the exit codes callers rely on.
//!
//! This is the edge where typed library errors become messages: each failure is printed as one
//! line naming the file, object or setting at fault. Exit codes follow the command contract:
//! 0 success, 1 for `wal-fetch` when the file is definitely not in the archive, 2 for usage
//! errors, and for `wal-fetch` every other failure (usage errors included) exits 128 so that
//! PostgreSQL stops recovery instead of taking the failure for the end of the archive.

mod backup_cmd;
mod cli;
mod logging;
mod recover_cmd;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use walvault::archive::{Archiver, Pushed};
use walvault::config::{FlagValues, Settings};
use walvault::pg::conninfo::ConnInfo;
use walvault::receive;
use walvault::repo::Repository;
use walvault::restore::{self, Fetched};
use walvault::spool::{self, Spool};
use walvault::verify;
use walvault_wal::{SegmentName, WalFileName};

use cli::{Cli, Command};

/// Exit code for a `wal-fetch` failure that is not "not found": above 125, so PostgreSQL aborts
/// recovery rather than ending it early.
const EXIT_FETCH_FAILED: u8 = 128;

/// Prefetched segments untouched this long are left over from a finished recovery.
const STALE_PREFETCH: std::time::Duration = std::time::Duration::from_secs(3600);

fn main() -> ExitCode {
    return_large_buffers_to_the_system();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let is_fetch = std::env::args().any(|a| a == "wal-fetch");
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ if is_fetch => ExitCode::from(EXIT_FETCH_FAILED),
                _ => ExitCode::from(2),
            };
        }
    };
    logging::init(cli.command.name(), cli.verbose, cli.quiet);
    let failure_code = match cli.command {
        Command::WalFetch { .. } => EXIT_FETCH_FAILED,
        _ => 1,
    };
    // PostgreSQL waits on every wal-push and wal-fetch, which each handle one file, one step
    // after the other: a runtime on this thread with one thread for file operations saves them
    // starting threads they would not use. The rest work on many objects at once.
    let mut builder = match cli.command {
        Command::WalPush { .. } | Command::WalFetch { .. } => {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.max_blocking_threads(1);
            builder
        }
        _ => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            builder
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(failure_code);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{}", one_line(&e));
            ExitCode::from(failure_code)
        }
    }
}

/// The error and its causes on one line. Library errors already quote their cause in their own
/// message, so a cause is appended only when the text so far does not contain it.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut flags = FlagValues {
        config: cli.config.clone(),
        repo: cli.repo.clone(),
        ..Default::default()
    };
    match &cli.command {
        Command::WalPush { concurrency, .. } | Command::WalPushAhead { concurrency, .. } => {
            flags.push_concurrency = concurrency.clone()
        }
        Command::WalFetch { prefetch, .. } => flags.prefetch = prefetch.clone(),
        Command::BackupPush {
            concurrency,
            delta_max_steps,
            ..
        } => {
            flags.backup_concurrency = concurrency.clone();
            flags.delta_max_steps = delta_max_steps.clone();
        }
        Command::BackupFetch { concurrency, .. }
        | Command::Recover(cli::RecoverArgs { concurrency, .. }) => {
            flags.backup_concurrency = concurrency.clone()
        }
        _ => {}
    }
    let settings = Settings::load(&flags)?;
    let repo = Arc::new(
        Repository::open(&settings)
            .await
            .with_context(|| format!("opening repository {}", settings.repo))?,
    );
    let cli_quiet = cli.quiet;
    match cli.command {
        Command::WalPush { path, .. } => wal_push(&settings, &flags, repo, &path).await,
        Command::WalPushAhead { spool, wal_dir, .. } => {
            let stored = Archiver::new(repo)
                .push_ahead(
                    &wal_dir,
                    &Spool::locate(Some(&spool), &wal_dir),
                    settings.push_concurrency,
                )
                .await;
            tracing::debug!("pushed {stored} segments ahead");
            Ok(ExitCode::SUCCESS)
        }
        Command::WalFetch { name, dest, .. } => {
            wal_fetch(&settings, &flags, repo, &name, &dest).await
        }
        Command::WalPrefetch { spool, segments } => {
            let window = segments
                .iter()
                .map(|s| s.parse::<SegmentName>())
                .collect::<Result<Vec<_>, _>>()?;
            let stored =
                restore::prefetch(repo, &Spool::locate(Some(&spool), &spool), window, 4).await?;
            tracing::debug!("prefetched {stored} segments");
            Ok(ExitCode::SUCCESS)
        }
        Command::WalReceive {
            slot,
            create_slot,
            flush_interval,
            synchronous,
            application_name,
            metrics_addr,
            dbname,
            spool_max_mib,
        } => {
            let spool = settings.spool_dir.as_ref().with_context(|| {
                "wal-receive needs a local spool directory: set spool_dir in the config file or \
                 WALVAULT_SPOOL_DIR"
            })?;
            let options = receive::ReceiveOptions {
                conn: ConnInfo::resolve(dbname.as_deref(), &application_name)?,
                slot: slot.parse().map_err(anyhow::Error::msg)?,
                create_slot,
                flush_interval,
                synchronous,
                metrics_addr,
                spool: spool.join("receive"),
                spool_max: spool_max_mib.saturating_mul(1 << 20),
            };
            receive::run(repo, options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BackupPush {
            pgdata,
            dbname,
            full,
            delta,
            spread_checkpoint,
            ..
        } => {
            let mode = backup_cmd::mode(full, delta);
            let opts = backup_cmd::push_options(
                &settings,
                cli_quiet,
                pgdata,
                dbname,
                mode,
                !spread_checkpoint,
            );
            backup_cmd::push(repo, &opts).await
        }
        Command::BackupFetch {
            name,
            dir,
            tablespaces,
            ..
        } => backup_cmd::fetch(&settings, cli_quiet, repo, &name, &dir, &tablespaces).await,
        Command::BackupList { json } => backup_cmd::list(&repo, json).await,
        Command::Recover(args) => {
            recover_cmd::recover(&settings, &flags, cli_quiet, repo, args).await
        }
        Command::Verify { concurrency } => {
            let report = verify::verify_all(repo, concurrency).await?;
            for problem in &report.problems {
                println!("problem: {problem}");
            }
            println!(
                "verify: {} objects checked ({} WAL files, {} of content), {} problems",
                report.checked,
                report.wal_files,
                human_bytes(report.content_bytes),
                report.problems.len()
            );
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

async fn wal_push(
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
        if let Err(e) = spool::spawn_helper(&args) {
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
        Pushed::PushedAhead => tracing::info!("{name}: already stored by push-ahead"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn wal_fetch(
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
    let mut prefetched = restore::Prefetched::read(&spool);
    let fetched = restore::fetch(&repo, &mut prefetched, &name, dest)
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
    let window = restore::prefetch_window(&name, dest, settings.prefetch).await;
    if !window.is_empty() && prefetched.refill_needed(&window) {
        if let Err(e) = restore::spawn_prefetcher(&global_args(flags), &spool, &window) {
            // Prefetch only saves time; recovery goes on fetching one segment at a time.
            tracing::warn!("could not start the prefetcher: {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes every allocation of a MiB or more a mapping of its own, unmapped when freed. glibc
/// otherwise raises that threshold as large buffers are freed and then serves them from its
/// per-thread heaps, which keep what they once held: the backup pipeline's packs and compressed
/// copies (of varying sizes, on whichever blocking thread compressed them) then left
/// backup-push at 110 MiB of RSS at pgbench scale 100 against 80 MiB with this, whatever the
/// database size.
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const THRESHOLD: libc::c_int = 1 << 20;
        // SAFETY: mallopt only sets an allocator parameter; it is called before any thread
        // exists, and a failure (return value 0) leaves glibc's default behaviour in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        }
    }
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

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
