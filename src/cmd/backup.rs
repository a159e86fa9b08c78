//! The CLI edge of the backup commands: options from flags and settings, and what
//! `backup-push`, `backup-fetch` and `backup-list` print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::backup::fetch::{self, FetchOptions};
use crate::backup::manifest::{DeltaSource, Summary};
use crate::backup::push::{self, Mode, PushOptions};
use crate::backup::window::{self, TimelineChoice, WindowError};
use crate::cli::BackupPushArgs;
use crate::config::Settings;
use crate::pg::Timeouts;
use crate::repo::Repository;
use anyhow::Context;

use super::human_bytes;

fn mode(full: bool, delta: bool) -> Mode {
    match (full, delta) {
        (true, _) => Mode::Full,
        (_, true) => Mode::Delta,
        _ => Mode::Auto,
    }
}

fn push_options(settings: &Settings, quiet: bool, args: BackupPushArgs) -> PushOptions {
    PushOptions {
        pgdata: args.pgdata,
        dbname: args.dbname,
        mode: mode(args.full, args.delta),
        delta_max_steps: settings.delta_max_steps,
        concurrency: settings.backup_concurrency,
        fast_checkpoint: !args.spread_checkpoint,
        progress: !quiet,
        spool_dir: settings.spool_dir.clone(),
        pg_timeouts: Timeouts {
            reply: settings.pg_timeout,
            backup_stop: settings.backup_stop_timeout,
        },
        verify_map: args.verify_map
            || std::env::var("WALVAULT_VERIFY_MAP").is_ok_and(|v| v == "1" || v == "true"),
    }
}

/// `backup-push`: takes a base backup and logs what it stored.
pub(super) async fn push(
    settings: &Settings,
    quiet: bool,
    repo: Arc<Repository>,
    args: BackupPushArgs,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let opts = &push_options(settings, quiet, args);
    let url = repo.url().to_owned();
    let pushed = push::push(repo, opts)
        .await
        .with_context(|| format!("backup-push to {url}"))?;
    let s = &pushed.summary;
    tracing::info!(
        "backup {} ({}{}) complete: {} files, {} read, {} stored, {} to {}, in {:.1} s",
        s.name,
        s.kind.as_str(),
        s.parent
            .as_ref()
            .map(|p| format!(" of {p}"))
            .unwrap_or_default(),
        pushed.files,
        human_bytes(s.original_size),
        human_bytes(s.stored_size),
        s.start_lsn,
        s.stop_lsn,
        started.elapsed().as_secs_f64()
    );
    if !s.page_checksum_failures.is_empty() {
        tracing::warn!(
            "{} files had pages failing their data checksum; see backup-list",
            s.page_checksum_failures.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `backup-fetch` flags.
pub(super) struct FetchArgs<'a> {
    pub(crate) name: &'a str,
    pub(crate) dir: &'a Path,
    pub(crate) tablespaces: &'a [String],
    pub(crate) dry_run: bool,
    pub(crate) delta: bool,
}

pub(super) async fn fetch(
    settings: &Settings,
    quiet: bool,
    repo: Arc<Repository>,
    args: FetchArgs<'_>,
) -> anyhow::Result<ExitCode> {
    let FetchArgs {
        name,
        dir,
        tablespaces,
        dry_run,
        delta,
    } = args;
    let started = Instant::now();
    let opts = FetchOptions {
        delta,
        ..fetch_options(settings, quiet, tablespaces)?
    };
    if dry_run {
        let locations = fetch::locations(&repo, name, dir, &opts)
            .await
            .with_context(|| format!("backup-fetch {name} into {} (dry run)", dir.display()))?;
        print_locations(&locations);
        return Ok(ExitCode::SUCCESS);
    }
    let fetched = fetch::fetch(repo, name, dir, &opts)
        .await
        .with_context(|| format!("backup-fetch {name} into {}", dir.display()))?;
    report_fetched(&fetched, dir, started);
    Ok(ExitCode::SUCCESS)
}

/// Fetch options from the settings and `--tablespace OID=DIR` flags.
pub(super) fn fetch_options(
    settings: &Settings,
    quiet: bool,
    tablespaces: &[String],
) -> anyhow::Result<FetchOptions> {
    let relocate = tablespaces
        .iter()
        .map(|t| {
            let (oid, dir) = t
                .split_once('=')
                .context(format!("--tablespace {t}: expected OID=DIR"))?;
            let oid: u32 = oid
                .parse()
                .context(format!("--tablespace {t}: {oid} is not an OID"))?;
            Ok((oid, PathBuf::from(dir)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(FetchOptions {
        concurrency: settings.backup_concurrency,
        progress: !quiet,
        relocate,
        delta: false,
    })
}

/// What `--dry-run` says about where a restore writes: nowhere else than these directories.
pub(super) fn print_locations(locations: &[fetch::Location]) {
    for l in locations {
        println!(
            "writes below {} ({}, {})",
            l.path.display(),
            l.what,
            if l.exists {
                "exists and is empty"
            } else {
                "to be created, mode 0700"
            }
        );
    }
}

pub(super) fn report_fetched(fetched: &fetch::Fetched, dir: &Path, started: Instant) {
    tracing::info!(
        "restored {} ({} backups in the chain, {} files, {} written) into {} in {:.1} s",
        fetched.name,
        fetched.chain.len(),
        fetched.files,
        human_bytes(fetched.bytes_written),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
}

/// One backup as `backup-list --json` prints it: the fields the command contract
/// promises (never renamed), then more.
#[derive(serde::Serialize)]
struct Listed<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    parent: Option<&'a str>,
    start_time: &'a str,
    stop_time: &'a str,
    start_lsn: String,
    stop_lsn: String,
    timeline: u32,
    original_size: u64,
    stored_size: u64,
    page_checksum_failures: usize,
    /// `"wal"` or `"scan"` for a delta (how it found what changed), null otherwise.
    delta_source: Option<DeltaSource>,
    pg_version_num: u32,
    system_identifier: String,
}

impl<'a> From<&'a Summary> for Listed<'a> {
    fn from(s: &'a Summary) -> Self {
        Listed {
            name: s.name.as_str(),
            kind: s.kind.as_str(),
            parent: s.parent.as_ref().map(|p| p.as_str()),
            start_time: &s.start_time,
            stop_time: &s.stop_time,
            start_lsn: s.start_lsn.to_string(),
            stop_lsn: s.stop_lsn.to_string(),
            timeline: s.timeline,
            original_size: s.original_size,
            stored_size: s.stored_size,
            page_checksum_failures: s
                .page_checksum_failures
                .iter()
                .map(|f| f.blocks.len())
                .sum(),
            delta_source: s.delta_source,
            pg_version_num: s.pg_version_num,
            system_identifier: s.system_identifier.to_string(),
        }
    }
}

pub(super) async fn list(repo: &Repository, json: bool) -> anyhow::Result<ExitCode> {
    let backups = crate::backup::catalog::list(repo)
        .await
        .with_context(|| format!("listing backups in {}", repo.url()))?;
    let listed: Vec<Listed> = backups.iter().map(Listed::from).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<48} {:<6} {:<20} {:<20} {:>12} {:>12} {:>3} {:>10} {:>10} {:>6}",
        "name", "type", "start", "stop", "start_lsn", "stop_lsn", "tli", "size", "stored", "bad"
    );
    for b in &listed {
        println!(
            "{:<48} {:<6} {:<20} {:<20} {:>12} {:>12} {:>3} {:>10} {:>10} {:>6}",
            b.name,
            b.kind,
            b.start_time,
            b.stop_time,
            b.start_lsn,
            b.stop_lsn,
            b.timeline,
            human_bytes(b.original_size),
            human_bytes(b.stored_size),
            b.page_checksum_failures
        );
        if let Some(parent) = b.parent {
            println!("    delta of {parent}");
        }
    }
    match window::window(repo, TimelineChoice::Latest).await {
        Ok(window) => println!("recoverable window (latest timeline): {window}"),
        Err(WindowError::NoBackups) => {
            println!("no backups: nothing is recoverable yet")
        }
        Err(e) => println!("recoverable window: unknown ({e})"),
    }
    Ok(ExitCode::SUCCESS)
}
