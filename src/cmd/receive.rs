//! `wal-receive` at the CLI edge: the replication connection from libpq's conventions, the slot,
//! the spool under `spool_dir`, and the streaming loop, which returns only on a permanent error.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::cli::ReceiveArgs;
use crate::config::Settings;
use crate::pg::conninfo::ConnInfo;
use crate::receive;
use crate::repo::Repository;

/// `wal-receive`: streams WAL into the repository until a permanent error.
pub(super) async fn receive(
    settings: &Settings,
    repo: Arc<Repository>,
    args: ReceiveArgs,
) -> anyhow::Result<ExitCode> {
    let spool = match (&args.spool_dir, &settings.spool_dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir.join("receive"),
        (None, None) => default_state_dir(|k| std::env::var_os(k))
            .with_context(|| {
                "wal-receive needs a local spool directory: pass --spool-dir, set spool_dir \
                 (WALVAULT_SPOOL_DIR), or run it with HOME or STATE_DIRECTORY set"
            })?
            .join(format!("receive-{}", args.slot)),
    };
    let options = receive::ReceiveOptions {
        conn: ConnInfo::resolve(args.dbname.as_deref(), &args.application_name)?,
        slot: args.slot.parse().map_err(anyhow::Error::msg)?,
        create_slot: args.create_slot,
        flush_interval: args.flush_interval,
        synchronous: args.synchronous,
        metrics_addr: args.metrics_addr,
        spool,
        spool_max: args.spool_max_mib.saturating_mul(1 << 20),
    };
    receive::run(repo, options).await?;
    Ok(ExitCode::SUCCESS)
}

/// Where a service keeps its state when nothing says otherwise: systemd's `StateDirectory`
/// (`$STATE_DIRECTORY`, the first of a list), else the XDG state directory of the user.
fn default_state_dir(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(dirs) = set("STATE_DIRECTORY") {
        return std::env::split_paths(&dirs).next();
    }
    if let Some(state) = set("XDG_STATE_HOME") {
        return Some(PathBuf::from(state).join("walvault"));
    }
    set("HOME").map(|home| PathBuf::from(home).join(".local/state/walvault"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spool_follows_systemd_then_xdg() {
        let env = |vars: &'static [(&str, &str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = env(&[
            ("STATE_DIRECTORY", "/var/lib/walvault:/var/lib/other"),
            ("XDG_STATE_HOME", "/x"),
            ("HOME", "/home/pg"),
        ]);
        assert_eq!(default_state_dir(all), Some("/var/lib/walvault".into()));
        let xdg = env(&[("XDG_STATE_HOME", "/x"), ("HOME", "/home/pg")]);
        assert_eq!(default_state_dir(xdg), Some("/x/walvault".into()));
        let home = env(&[("HOME", "/home/pg"), ("STATE_DIRECTORY", "")]);
        assert_eq!(
            default_state_dir(home),
            Some("/home/pg/.local/state/walvault".into())
        );
        assert_eq!(default_state_dir(env(&[])), None);
    }
}
