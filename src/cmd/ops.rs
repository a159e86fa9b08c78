//! The CLI edge of the operations commands: `status`, `check` (exit codes 0 OK, 1 a check
//! failed, 3 warnings only), `metrics` (printed once or served with `--listen`) and `drill`
//! (scratch directory, recovery settings and options from flags); the hooks each runs after it.

use crate::retention::Policy;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::backup::window::TimelineChoice;
use crate::cli::{CheckArgs, DrillArgs};
use crate::config::{FlagValues, Settings};
use crate::ops::check::{self, CheckOptions, Verdict};
use crate::ops::drill::{self, DrillOptions, DrillReport, DrillTarget};
use crate::ops::hooks::{self, Status as HookStatus};
use crate::ops::metrics;
use crate::ops::status::{age, Status};
use crate::recover::settings::{RecoverySettings, TargetAction};
use crate::recover::target::{self, Target};
use crate::repo::Repository;
use crate::time::UnixMicros;

use super::human_bytes;

/// Exit code of `check` when only warnings were found (Nagios WARNING is 1, but 1 is every
/// walvault command's failure code; see the README for the mapping).
const EXIT_WARNINGS: u8 = 3;

/// How long `metrics --listen` reuses a page: scrapes closer together than this would only
/// list the repository again for the same answer.
const METRICS_CACHE: Duration = Duration::from_secs(10);

/// Runs the configured hook for `event` (never changes the command's result).
pub(super) async fn hook(
    settings: &Settings,
    event: &str,
    status: HookStatus,
    report: &serde_json::Value,
) {
    hooks::run(&settings.hooks, event, status, report).await;
}

pub(super) async fn status(
    settings: &Settings,
    repo: &Repository,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let status = Status::gather(repo, &settings.retention)
        .await
        .with_context(|| format!("reading the status of {}", repo.url()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("{status}");
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn check(
    settings: &Settings,
    repo: Arc<Repository>,
    args: CheckArgs,
) -> anyhow::Result<ExitCode> {
    let opts = CheckOptions {
        dbname: args.dbname,
        timeout: args.timeout,
        max_backup_age: args.max_backup_age,
        max_archive_lag: args.max_archive_lag,
        pg_timeout: settings.pg_timeout,
    };
    let report = check::check(&repo, settings, &opts).await;
    let worst = report.worst();
    let json = serde_json::json!({
        "status": worst,
        "repository": repo.url(),
        "checks": report.checks,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for line in &report.checks {
            let verdict = serde_json::to_value(line.verdict)?;
            println!(
                "{:<4} {:<14} {}",
                verdict.as_str().unwrap_or_default(),
                line.check,
                line.message
            );
        }
    }
    let (code, status) = match worst {
        Verdict::Fail => (ExitCode::FAILURE, HookStatus::Failure),
        Verdict::Warn => (ExitCode::from(EXIT_WARNINGS), HookStatus::Warning),
        Verdict::Ok | Verdict::Skip => (ExitCode::SUCCESS, HookStatus::Success),
    };
    hook(settings, "check", status, &json).await;
    Ok(code)
}

pub(super) async fn metrics(
    repo: Arc<Repository>,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let Some(addr) = listen else {
        // The metrics carry no retention series, so no verdict is computed.
        let status = Status::gather(&repo, &Policy::default())
            .await
            .with_context(|| format!("reading the status of {}", repo.url()))?;
        print!("{}", metrics::render(&status));
        return Ok(ExitCode::SUCCESS);
    };
    let cache: Arc<tokio::sync::Mutex<Option<(Instant, String)>>> = Arc::default();
    let bound = crate::prometheus::serve(addr, move || {
        let (repo, cache) = (Arc::clone(&repo), Arc::clone(&cache));
        async move {
            // One scrape gathers at a time; the others wait and take its page.
            let mut cached = cache.lock().await;
            if let Some((at, page)) = cached.as_ref() {
                if at.elapsed() < METRICS_CACHE {
                    return page.clone();
                }
            }
            match Status::gather(&repo, &Policy::default()).await {
                Ok(status) => {
                    let page = metrics::render(&status);
                    *cached = Some((Instant::now(), page.clone()));
                    page
                }
                Err(e) => {
                    // No series rather than stale ones: alerts on absent() fire.
                    tracing::warn!("metrics: reading the status of {}: {e}", repo.url());
                    format!(
                        "# walvault: status unavailable: {}\n",
                        e.to_string().replace('\n', " ")
                    )
                }
            }
        }
    })
    .await
    .with_context(|| format!("listening on {addr}"))?;
    println!("serving metrics on http://{bound}/metrics");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for a signal to stop")?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn drill(
    settings: &Settings,
    flags: &FlagValues,
    quiet: bool,
    repo: Arc<Repository>,
    args: DrillArgs,
) -> anyhow::Result<ExitCode> {
    let target = if args.random_time {
        DrillTarget::Random
    } else if let Some(time) = &args.target_time {
        DrillTarget::Time(target::parse_time(time, UnixMicros::now())?)
    } else {
        DrillTarget::Latest
    };
    let (scratch, created_scratch) = match args.scratch {
        Some(dir) => {
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            crate::recover::check_target_dir(&dir)?;
            let exists = dir.exists();
            if !exists {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            (dir, !exists)
        }
        None => {
            let base = settings
                .spool_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir);
            let dir = base.join(format!(
                "walvault-drill-{}-{}",
                UnixMicros::now().compact(),
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            (dir, true)
        }
    };
    let pgdata: PathBuf = scratch.join("pgdata");
    let opts = DrillOptions {
        target,
        created_scratch,
        keep: args.keep,
        port: args.port,
        socket_dir: args
            .socket_dir
            .unwrap_or_else(crate::pg::conninfo::default_socket_dir),
        pg_bin: args.pg_bin,
        check_sql: args.check_sql,
        fetch: super::backup::fetch_options(settings, quiet, &[])?,
        recovery: RecoverySettings {
            fetch_command: super::recover::fetch_command(settings, &pgdata)?,
            target: Target::EndOfArchive,
            inclusive: true,
            action: TargetAction::Promote,
            timeline: TimelineChoice::Latest,
            keep_archive_command: false,
            carried: Settings::carried(flags)?,
        },
        pg_timeout: settings.pg_timeout,
        check_timeout: args.check_timeout,
        scratch,
    };
    let report = drill::drill(repo, &opts).await;
    let json = serde_json::to_value(&report)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_drill(&report);
    }
    let status = if report.success {
        HookStatus::Success
    } else {
        HookStatus::Failure
    };
    hook(settings, "drill", status, &json).await;
    if report.success {
        Ok(ExitCode::SUCCESS)
    } else {
        tracing::error!("drill failed: {}", report.failures.join("; "));
        Ok(ExitCode::FAILURE)
    }
}

fn print_drill(r: &DrillReport) {
    println!(
        "drill {}: backup {}, target {}",
        if r.success { "passed" } else { "FAILED" },
        r.backup.as_deref().unwrap_or("none"),
        r.target
    );
    if let Some(p) = &r.reached {
        println!(
            "reached: {}, last replayed LSN {}, last transaction end {}",
            p.state,
            p.replay_lsn.as_deref().unwrap_or("unknown"),
            p.last_transaction_end.as_deref().unwrap_or("unknown")
        );
    }
    println!(
        "RTO {:.1} s: restore {:.1} s + replay {:.1} s",
        r.rto_seconds, r.restore_seconds, r.replay_seconds
    );
    for d in &r.databases {
        println!(
            "database {}: {}, {} tables read ({}), {}",
            d.name,
            if d.connected {
                "connected"
            } else {
                "NOT connectable"
            },
            d.tables_read,
            human_bytes(d.bytes_read),
            match d.btree_indexes_checked {
                Some(n) => format!("{n} btree indexes checked with amcheck"),
                None => "amcheck not available".into(),
            }
        );
    }
    for c in &r.check_sql {
        println!(
            "check-sql {:?}: {} ({} rows shown{})",
            c.sql,
            if c.passed { "passed" } else { "FAILED" },
            c.rows.len(),
            if c.truncated { ", truncated" } else { "" }
        );
        for row in &c.rows {
            println!("  {row}");
        }
    }
    for f in &r.failures {
        println!("FAILED: {f}");
    }
    println!(
        "scratch {} {}; report {}",
        r.scratch,
        if r.kept { "kept" } else { "removed" },
        r.key.as_deref().unwrap_or("not stored")
    );
}

/// `3h 12m 5s`: an age for people.
fn ago(seconds: f64) -> String {
    let secs = seconds.max(0.0).round() as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.repository;
        writeln!(f, "repository: {}", r.url)?;
        match (&r.system_identifier, r.pg_major, r.wal_segment_size) {
            (Some(id), Some(major), Some(seg)) => writeln!(
                f,
                "cluster: system identifier {id}, PostgreSQL {major}, {} segments",
                human_bytes(u64::from(seg))
            )?,
            _ => writeln!(f, "cluster: none yet (nothing archived)")?,
        }
        let b = &self.backups;
        writeln!(f, "backups: {} full, {} delta", b.full, b.delta)?;
        for (what, backup) in [("newest full", &b.newest_full), ("newest", &b.newest)] {
            if let Some(x) = backup {
                writeln!(
                    f,
                    "  {what}: {} ({}) ended {}{}, {} stored of {}",
                    x.name,
                    x.kind,
                    x.stop_time,
                    x.age_seconds
                        .map(|a| format!(" ({} ago)", ago(a)))
                        .unwrap_or_default(),
                    human_bytes(x.stored_size),
                    human_bytes(x.original_size),
                )?;
            }
        }
        match &self.window {
            Some(w) => writeln!(
                f,
                "recoverable window (latest timeline, {}): {}",
                w.timeline, w.text
            )?,
            None => writeln!(f, "recoverable window: none (no backups)")?,
        }
        if self.timelines.len() > 1 {
            for w in &self.timelines {
                writeln!(f, "  along timeline {}: {}", w.timeline, w.text)?;
            }
        }
        if let Some(end) = self.window.as_ref().and_then(|w| w.end) {
            writeln!(
                f,
                "  RPO now: {} since the last archived transaction end",
                ago(age(self.now(), end))
            )?;
        }
        let w = &self.wal;
        writeln!(
            f,
            "WAL: newest segment {}, stored {}{}",
            w.newest_segment.as_deref().unwrap_or("none"),
            match (&w.last_archived_at, w.archive_lag_seconds) {
                (Some(at), Some(lag)) => format!("{at} ({} ago)", ago(lag)),
                _ => "at an unknown time".into(),
            },
            if w.status_object_stale {
                " (status/wal is behind the listing: the lag is an upper bound)"
            } else {
                ""
            }
        )?;
        if let Some(streamed) = &w.streamed_to {
            writeln!(f, "  streamed: {streamed}")?;
        }
        if let Some(retention) = &self.retention {
            writeln!(f, "retention: {retention}")?;
        }
        match &self.last_drill {
            Some(d) => writeln!(
                f,
                "last drill: {} {} (RTO {:.1} s){}",
                d.started_at,
                if d.success { "passed" } else { "FAILED" },
                d.rto_seconds,
                if d.failures.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.failures.join("; "))
                }
            )?,
            None => writeln!(f, "last drill: none")?,
        }
        let o = &self.objects;
        write!(
            f,
            "size: {} in {} objects (",
            human_bytes(o.total_bytes),
            o.total
        )?;
        let parts: Vec<String> = o
            .by_kind
            .iter()
            .map(|(k, c)| format!("{k} {}", c.count))
            .collect();
        write!(f, "{})", parts.join(", "))
    }
}
