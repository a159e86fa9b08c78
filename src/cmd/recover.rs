//! The `recover` command at the CLI edge: turns flags into a recovery request, prints the plan,
//! restores, writes the recovery configuration and, with `--start`, reports where recovery
//! ended. The order is the promise: nothing touches the target directory until the plan holds.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::backup::fetch;
use crate::backup::window::TimelineChoice;
use crate::config::{FlagValues, Settings};
use crate::recover::check_target_dir;
use crate::recover::plan::{self, Request};
use crate::recover::settings::{RecoverySettings, CARRIED_CONFIG_FILE};
use crate::recover::start::{self, StartOptions};
use crate::recover::target::{self, Target};
use crate::repo::Repository;
use crate::time::UnixMicros;
use anyhow::Context;

use super::backup;
use crate::cli::RecoverArgs;

impl RecoverArgs {
    fn target(&self) -> anyhow::Result<Target> {
        Ok(if let Some(time) = &self.target_time {
            Target::Time(target::parse_time(time, UnixMicros::now())?)
        } else if let Some(lsn) = &self.target_lsn {
            Target::Lsn(lsn.parse().map_err(anyhow::Error::msg)?)
        } else if let Some(xid) = self.target_xid {
            Target::Xid(xid)
        } else if let Some(name) = &self.target_name {
            Target::Name(target::parse_name(name)?)
        } else if self.target_immediate {
            Target::Immediate
        } else {
            Target::EndOfArchive
        })
    }
}

pub(super) async fn recover(
    settings: &Settings,
    flags: &FlagValues,
    quiet: bool,
    repo: Arc<Repository>,
    args: RecoverArgs,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let request = Request {
        target: args.target()?,
        inclusive: !args.exclusive,
        timeline: TimelineChoice::parse(&args.target_timeline).map_err(anyhow::Error::msg)?,
        backup: args.backup.clone(),
    };
    let dir = std::path::absolute(&args.pgdata).unwrap_or_else(|_| args.pgdata.clone());
    if !args.delta {
        check_target_dir(&dir)?;
    }
    let mut fetch_opts = backup::fetch_options(settings, quiet, &args.tablespaces)?;
    fetch_opts.config_dir = args.config_dir.clone();
    fetch_opts.delta = args.delta;
    let plan = plan::plan(&repo, &request).await?;
    println!("{plan}");
    let recovery = RecoverySettings {
        fetch_command: fetch_command(settings, &dir)?,
        target: plan.target.clone(),
        inclusive: plan.inclusive,
        action: args.target_action,
        timeline: request.timeline,
        keep_archive_command: args.keep_archive_command,
        carried: Settings::carried(flags)?,
    };
    let rendered = recovery.render()?;
    println!("{}", recovery.describe_carried(&dir));
    if args.dry_run {
        let locations = fetch::locations(&repo, plan.backup.name.as_str(), &dir, &fetch_opts)
            .await
            .with_context(|| format!("checking where {} would be restored", plan.backup.name))?;
        backup::print_locations(&locations);
        println!(
            "settings: recovery.signal, and appended to {}:{}",
            dir.join("postgresql.auto.conf").display(),
            rendered.trim_end()
        );
        return Ok(ExitCode::SUCCESS);
    }

    let fetch_started = Instant::now();
    let fetched = fetch::fetch(
        Arc::clone(&repo),
        plan.backup.name.as_str(),
        &dir,
        &fetch_opts,
    )
    .await
    .with_context(|| format!("restoring {} into {}", plan.backup.name, dir.display()))?;
    backup::report_fetched(&fetched, &dir, fetch_started);
    crate::failpoint::pause_if_enabled("recover-restored").await;
    recovery.write(&dir)?;
    crate::failpoint::pause_if_enabled("recover-settings-written").await;
    println!(
        "restored {} into {}; recovery.signal and postgresql.auto.conf are in place",
        plan.backup.name,
        dir.display()
    );
    if !args.start {
        println!(
            "start PostgreSQL on {} to recover to {}",
            dir.display(),
            plan.target
        );
        return Ok(ExitCode::SUCCESS);
    }
    let socket_dir = args
        .socket_dir
        .unwrap_or_else(crate::pg::conninfo::default_socket_dir);
    let port = match args.port {
        Some(port) => port,
        None => start::choose_port(&dir, &socket_dir)?,
    };
    println!(
        "starting PostgreSQL on port {port} (socket directory {})",
        socket_dir.display()
    );
    let start_opts = StartOptions {
        pg_bin: args.pg_bin,
        port,
        socket_dir,
        pg_options: args.pg_options,
        major: plan.backup.pg_version_num / 10_000,
        pg_timeout: settings.pg_timeout,
    };
    let reached = start::start(&dir, &start_opts, args.target_action).await?;
    println!(
        "recovery {}: last replayed LSN {}, last replayed transaction end {}{}; {:.1} s in \
         total ({:.1} s of recovery)",
        reached.state,
        reached.replay_lsn.as_deref().unwrap_or("unknown"),
        reached.last_commit.as_deref().unwrap_or("unknown"),
        reached
            .timeline
            .map(|t| format!(", now on timeline {t}"))
            .unwrap_or_default(),
        started.elapsed().as_secs_f64(),
        reached.elapsed.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// This walvault binary with the configuration this call used, carried in the data directory
/// `dir` (secrets aside), so the restored cluster fetches WAL from the same repository however
/// walvault was configured here (flags, environment or a config file).
pub(super) fn fetch_command(settings: &Settings, dir: &Path) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("locating the walvault binary")?;
    let mut command = vec![exe.display().to_string()];
    let config = dir.join(CARRIED_CONFIG_FILE);
    command.extend(["--config".to_string(), config.display().to_string()]);
    // The repository URL is always spelled out: PostgreSQL's environment may lack WALVAULT_REPO.
    command.extend(["--repo".to_string(), settings.repo.to_string()]);
    command.push("wal-fetch".to_string());
    Ok(command)
}
