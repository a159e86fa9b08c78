//! The CLI edge of the backup commands: options from flags and settings, and what
//! `backup-push`, `backup-fetch` and `backup-list` print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::backup::fetch::{self, FetchOptions};
use crate::backup::manifest::{DeltaSource, Summary};
use crate::backup::push::{self, Mode, PushOptions};
use crate::backup::stop_wal::StandbyOptions;
use crate::backup::window::{Recoverable, TimelineChoice, WindowError};
use crate::cli::BackupPushArgs;
use crate::config::Settings;
use crate::ops::hooks::Status as HookStatus;
use crate::pg::Timeouts;
use crate::repo::Repository;
use crate::time::UnixMicros;
use anyhow::Context;
use std::collections::BTreeMap;

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
        standby: StandbyOptions {
            wal_wait: args.wal_wait_timeout,
            primary_conninfo: args.primary_conninfo,
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
    let keep = args.keep;
    let opts = &push_options(settings, quiet, args);
    let url = repo.url().to_owned();
    let pushed = match push::push(Arc::clone(&repo), opts)
        .await
        .with_context(|| format!("backup-push to {url}"))
    {
        Ok(pushed) => pushed,
        Err(e) => {
            let report = serde_json::json!({ "repository": url, "error": super::one_line(&e) });
            super::ops::hook(settings, "backup-push", HookStatus::Failure, &report).await;
            return Err(e);
        }
    };
    let s = &pushed.summary;
    tracing::info!(
        "backup {} ({}{}) complete: {} files of {}, {} read, {} stored, {} to {}, in {:.1} s",
        s.name,
        s.kind.as_str(),
        s.parent
            .as_ref()
            .map(|p| format!(" of {p}"))
            .unwrap_or_default(),
        pushed.files,
        human_bytes(s.original_size),
        human_bytes(pushed.read),
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
    if keep {
        crate::retention::pins::mark(&repo, &s.name, true)
            .await
            .with_context(|| format!("pinning backup {} (the backup is complete)", s.name))?;
        tracing::info!("backup {} pinned: retention keeps it and its chain", s.name);
    }
    super::retention::after_backup(settings, &repo).await;
    let report = serde_json::json!({
        "repository": url,
        "backup": Listed::from(s),
        "files": pushed.files,
        "duration_seconds": started.elapsed().as_secs_f64(),
    });
    super::ops::hook(settings, "backup-push", HookStatus::Success, &report).await;
    Ok(ExitCode::SUCCESS)
}

/// The `backup-fetch` flags.
pub(super) struct FetchArgs<'a> {
    pub(crate) name: &'a str,
    pub(crate) dir: &'a Path,
    pub(crate) tablespaces: &'a [String],
    pub(crate) dry_run: bool,
    pub(crate) config_dir: Option<PathBuf>,
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
        config_dir,
        delta,
    } = args;
    let started = Instant::now();
    let mut opts = fetch_options(settings, quiet, tablespaces)?;
    opts.config_dir = config_dir;
    opts.delta = delta;
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
        config_dir: None,
        delta: false,
    })
}

/// What `--dry-run` says about where a restore writes: nowhere else than these directories.
pub(super) fn print_locations(locations: &[fetch::Location]) {
    for l in locations {
        if l.file {
            println!("writes {} ({})", l.path.display(), l.what);
            continue;
        }
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
    /// Pinned (`backup-mark --keep`).
    keep: bool,
    /// The rules of the configured retention policy that keep it (`null` without a policy).
    kept_by: Option<Vec<&'static str>>,
    /// Whether the next `delete` under the configured policy removes it.
    expires: bool,
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
            keep: false,
            kept_by: None,
            expires: false,
        }
    }
}

pub(super) async fn list(
    settings: &Settings,
    repo: &Repository,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let backups = crate::backup::catalog::list(repo)
        .await
        .with_context(|| format!("listing backups in {}", repo.url()))?;
    let pins = crate::retention::pins::pinned(repo)
        .await
        .with_context(|| format!("listing pinned backups in {}", repo.url()))?;
    let recoverable = Recoverable::load(repo, TimelineChoice::Latest).await;
    let verdicts = match &recoverable {
        Ok(r) if !settings.retention.is_empty() => {
            crate::retention::verdicts_by_name(&settings.retention, r, &pins, UnixMicros::now())
        }
        _ => BTreeMap::new(),
    };
    let listed: Vec<Listed> = backups
        .iter()
        .map(|b| {
            let mut listed = Listed::from(b);
            listed.keep = pins.contains(&b.name);
            if let Some(rules) = verdicts.get(&b.name) {
                listed.kept_by = Some(rules.iter().map(|r| r.as_str()).collect());
                listed.expires = rules.is_empty();
            }
            listed
        })
        .collect();
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
        match (&b.kept_by, b.keep) {
            (Some(rules), _) if !rules.is_empty() => println!("    kept by {}", rules.join(", ")),
            (Some(_), _) => println!("    expires: the next delete removes it"),
            (None, true) => println!("    pinned"),
            (None, false) => {}
        }
    }
    match recoverable {
        Ok(r) => println!("recoverable window (latest timeline): {}", r.window),
        Err(WindowError::NoBackups) => {
            println!("no backups: nothing is recoverable yet")
        }
        Err(e) => println!("recoverable window: unknown ({e})"),
    }
    Ok(ExitCode::SUCCESS)
}
