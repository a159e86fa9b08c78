//! `wal-receive` at the CLI edge: the replication connection from libpq's conventions, the slot,
//! the spool under `spool_dir`, and the streaming loop, which returns only on a permanent error.

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
    let spool = settings.spool_dir.as_ref().with_context(|| {
        "wal-receive needs a local spool directory: set spool_dir in the config file or \
         WALVAULT_SPOOL_DIR"
    })?;
    let options = receive::ReceiveOptions {
        conn: ConnInfo::resolve(args.dbname.as_deref(), &args.application_name)?,
        slot: args.slot.parse().map_err(anyhow::Error::msg)?,
        create_slot: args.create_slot,
        flush_interval: args.flush_interval,
        synchronous: args.synchronous,
        metrics_addr: args.metrics_addr,
        spool: spool.join("receive"),
        spool_max: args.spool_max_mib.saturating_mul(1 << 20),
    };
    receive::run(repo, options).await?;
    Ok(ExitCode::SUCCESS)
}
