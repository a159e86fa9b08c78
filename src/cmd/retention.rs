//! The CLI edge of retention: `delete` (plan, print, delete under the lock, then the hook), `backup-mark`, and
//! the policy run after a successful `backup-push`, which logs one line and never fails the
//! backup.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::backup::progress::count_bar;
use crate::cli::DeleteArgs;
use crate::config::Settings;
use crate::ops::hooks::Status as HookStatus;
use crate::repo::Repository;
use crate::retention::execute::{self, Deleted};
use crate::retention::{lock, pins, plan, Plan, RetentionError};
use crate::time::UnixMicros;

use super::human_bytes;

/// `delete`: plans, prints the plan, and (unless `--dry-run`) deletes.
pub(super) async fn delete(
    settings: &Settings,
    quiet: bool,
    repo: Arc<Repository>,
    args: DeleteArgs,
) -> anyhow::Result<ExitCode> {
    let policy = &settings.retention;
    if policy.is_empty() {
        return Err(RetentionError::NoPolicy.into());
    }
    let context = || format!("delete in {}", repo.url());
    if args.dry_run {
        let plan = plan(&repo, policy, UnixMicros::now(), settings.retention_grace)
            .await
            .with_context(context)?;
        print_plan(&plan, None, args.json, true)?;
        return Ok(ExitCode::SUCCESS);
    }
    let result = async {
        let held = lock::acquire(&repo).await?;
        let result = plan_and_delete(&repo, settings, !quiet && !args.json).await;
        held.release(&repo).await;
        result
    }
    .await
    .with_context(context);
    let (plan, deleted) = match result {
        Ok(done) => done,
        Err(e) => {
            let report =
                serde_json::json!({ "repository": repo.url(), "error": super::one_line(&e) });
            super::ops::hook(settings, "delete", HookStatus::Failure, &report).await;
            return Err(e);
        }
    };
    let mut report = report_of(&plan, deleted, false);
    report["repository"] = repo.url().into();
    super::ops::hook(settings, "delete", HookStatus::Success, &report).await;
    print_plan(&plan, Some(deleted), args.json, false)?;
    Ok(ExitCode::SUCCESS)
}

/// The plan as JSON, with what was deleted when something was.
fn report_of(plan: &Plan, deleted: Deleted, dry_run: bool) -> serde_json::Value {
    let mut value = plan.to_json(dry_run);
    value["deleted"] = serde_json::json!({
        "backups": deleted.backups,
        "objects": deleted.objects,
        "bytes": deleted.bytes,
    });
    value
}

async fn plan_and_delete(
    repo: &Arc<Repository>,
    settings: &Settings,
    progress: bool,
) -> Result<(Plan, Deleted), RetentionError> {
    let plan = plan(
        repo,
        &settings.retention,
        UnixMicros::now(),
        settings.retention_grace,
    )
    .await?;
    if progress {
        eprintln!("{plan}");
    }
    let bar = count_bar(plan.objects(), progress, "deleting");
    let deleted = execute::execute(repo, &plan, &bar).await;
    bar.finish_and_clear();
    Ok((plan, deleted?))
}

fn print_plan(
    plan: &Plan,
    deleted: Option<Deleted>,
    json: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    if json {
        let value = match deleted {
            Some(d) => report_of(plan, d, dry_run),
            None => plan.to_json(dry_run),
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("{plan}");
    match deleted {
        Some(d) => println!(
            "deleted {} backups, {} objects, {}",
            d.backups,
            d.objects,
            human_bytes(d.bytes)
        ),
        None => println!("dry run: nothing was deleted"),
    }
    Ok(())
}

/// `backup-mark NAME --keep|--release`.
pub(super) async fn mark(repo: &Repository, name: &str, keep: bool) -> anyhow::Result<ExitCode> {
    let name = crate::backup::catalog::resolve_name(repo, name)
        .await
        .with_context(|| format!("backup-mark {name}"))?;
    pins::mark(repo, &name, keep)
        .await
        .with_context(|| format!("backup-mark {name} in {}", repo.url()))?;
    tracing::info!(
        "backup {name} {}",
        if keep {
            "pinned: retention keeps it and its chain"
        } else {
            "released: retention applies to it again"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Retention after a successful backup-push (`retention.auto`, on when a policy is configured):
/// one log line either way; a failure is a warning, never the backup's failure.
pub(super) async fn after_backup(settings: &Settings, repo: &Arc<Repository>) {
    if settings.retention.is_empty() || !settings.retention_auto {
        return;
    }
    let held = match lock::acquire(repo).await {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!("retention after backup skipped: {e}");
            return;
        }
    };
    let result = plan_and_delete(repo, settings, false).await;
    held.release(repo).await;
    match result {
        Ok((plan, d)) => tracing::info!(
            "retention ({}): deleted {} backups, {} objects, {}; window now {}",
            plan.policy,
            d.backups,
            d.objects,
            human_bytes(d.bytes),
            plan.window_after
        ),
        Err(e) => tracing::warn!("retention after backup failed (the backup is complete): {e}"),
    }
}
