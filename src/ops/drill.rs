//! `walvault drill`: the restore test. Recovers exactly as `recover --start` does (the same
//! planner, restore, recovery settings and server start) into a scratch directory on a spare
//! port, then checks the result: every database connectable, `amcheck` over btree indexes where
//! the extension is available (created in the scratch copy only), a full read of every table,
//! and the operator's `--check-sql` queries. The report (RTO split into restore and replay) is
//! stored in the repository as `drills/<time>`; the server is stopped and the scratch removed
//! (unless kept) whether the drill passed or not. A drill never connects to the source cluster
//! and the restored copy does not archive (`archive_mode = off`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::backup::catalog;
use crate::backup::fetch::{self, FetchOptions};
use crate::backup::window::{Recoverable, TimelineChoice};
use crate::pg::{self, ConnTarget};
use crate::recover::plan::{self, Request};
use crate::recover::settings::{RecoverySettings, TargetAction};
use crate::recover::start::{self, StartOptions};
use crate::recover::target::Target;
use crate::repo::layout::DrillTime;
use crate::repo::{Committed, PutMode, Repository};
use crate::time::UnixMicros;

/// Rows of one `--check-sql` result kept in the report.
const MAX_ROWS: usize = 100;
/// Bytes of one `--check-sql` result kept in the report.
const MAX_OUTPUT: usize = 16 << 10;

/// Where to recover to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum DrillTarget {
    /// The end of the archive.
    Latest,
    Time(UnixMicros),
    /// A random instant of the recoverable window.
    Random,
}

/// What the CLI edge settles before a drill.
pub(crate) struct DrillOptions {
    pub(crate) target: DrillTarget,
    /// Empty or absent; the cluster goes to `<scratch>/pgdata`, tablespaces beside it.
    pub(crate) scratch: PathBuf,
    /// Whether the drill created `scratch` (then it removes it, else only its content).
    pub(crate) created_scratch: bool,
    pub(crate) keep: bool,
    pub(crate) port: Option<u16>,
    pub(crate) socket_dir: PathBuf,
    pub(crate) pg_bin: Option<PathBuf>,
    pub(crate) check_sql: Vec<String>,
    pub(crate) fetch: FetchOptions,
    /// The recovery settings for the scratch cluster, but for the target.
    pub(crate) recovery: RecoverySettings,
    pub(crate) pg_timeout: Duration,
    /// Bound on each check query (one index, one table, one --check-sql).
    pub(crate) check_timeout: Duration,
}

/// What a drill did, as printed, stored and handed to hooks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct DrillReport {
    pub(crate) started_at: String,
    pub(crate) success: bool,
    /// Restore plus replay.
    pub(crate) rto_seconds: f64,
    pub(crate) restore_seconds: f64,
    pub(crate) replay_seconds: f64,
    pub(crate) failures: Vec<String>,
    pub(crate) backup: Option<String>,
    pub(crate) target: String,
    /// The target time (RFC 3339), for `--target-time` and `--random-time`.
    pub(crate) target_time: Option<String>,
    pub(crate) reached: Option<Point>,
    pub(crate) scratch: String,
    pub(crate) kept: bool,
    pub(crate) port: Option<u16>,
    pub(crate) databases: Vec<DatabaseCheck>,
    pub(crate) check_sql: Vec<SqlCheck>,
    /// Where the report is stored in the repository.
    pub(crate) key: Option<String>,
}

/// Where recovery ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Point {
    pub(crate) state: String,
    pub(crate) replay_lsn: Option<String>,
    pub(crate) last_transaction_end: Option<String>,
    pub(crate) timeline: Option<u32>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct DatabaseCheck {
    pub(crate) name: String,
    pub(crate) connected: bool,
    /// `None` when amcheck is not available in this installation.
    pub(crate) btree_indexes_checked: Option<u64>,
    pub(crate) tables_read: u64,
    /// Bytes of the tables' text form, as `COPY` (and `pg_dump`) would write it.
    pub(crate) bytes_read: u64,
    pub(crate) error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct SqlCheck {
    pub(crate) sql: String,
    pub(crate) passed: bool,
    pub(crate) rows: Vec<String>,
    pub(crate) truncated: bool,
    pub(crate) error: Option<String>,
}

/// Runs a drill, cleans up and stores its report; a failure to store it is a failure of the
/// drill too (the report returned says so).
pub(crate) async fn drill(repo: Arc<Repository>, opts: &DrillOptions) -> DrillReport {
    let now = UnixMicros::now();
    let mut report = DrillReport {
        started_at: now.rfc3339(),
        scratch: opts.scratch.display().to_string(),
        kept: opts.keep,
        ..Default::default()
    };
    let pgdata = opts.scratch.join("pgdata");
    let mut start_opts = None;
    if let Err(e) = restore_and_check(&repo, opts, &pgdata, &mut report, &mut start_opts).await {
        report.failures.push(e);
    }
    if let Some(start_opts) = &start_opts {
        if let Err(e) = start::stop(&pgdata, start_opts).await {
            report
                .failures
                .push(format!("stopping the scratch server: {e}"));
        }
    }
    if !opts.keep {
        if let Err(e) = remove_scratch(&opts.scratch, opts.created_scratch) {
            report.failures.push(format!(
                "removing the scratch directory {}: {e}",
                opts.scratch.display()
            ));
        }
    }
    report.rto_seconds = report.restore_seconds + report.replay_seconds;
    report.success = report.failures.is_empty();
    let time = DrillTime::new(now);
    let key = time.key();
    report.key = Some(key.clone());
    // Serialising a struct of strings, numbers and vectors of them cannot fail.
    let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
    match repo.put_bytes(&key, &json, PutMode::IfAbsent).await {
        Ok(stored) if stored.committed == Committed::Created => {}
        Ok(_) => {
            report.key = None;
            report
                .failures
                .push(format!("{key} exists already (two drills in one second?)"));
        }
        Err(e) => {
            report.key = None;
            report.failures.push(format!("storing the report: {e}"));
        }
    }
    report.success = report.failures.is_empty();
    report
}

async fn restore_and_check(
    repo: &Arc<Repository>,
    opts: &DrillOptions,
    pgdata: &Path,
    report: &mut DrillReport,
    started: &mut Option<StartOptions>,
) -> Result<(), String> {
    let target = match opts.target {
        DrillTarget::Latest => Target::EndOfArchive,
        DrillTarget::Time(t) => Target::Time(t),
        DrillTarget::Random => Target::Time(random_time(repo).await?),
    };
    report.target = target.to_string();
    if let Target::Time(t) = target {
        report.target_time = Some(t.rfc3339());
    }
    let request = Request {
        target,
        inclusive: true,
        timeline: TimelineChoice::Latest,
        backup: None,
    };
    let plan = plan::plan(repo, &request)
        .await
        .map_err(|e| format!("planning: {e}"))?;
    report.backup = Some(plan.backup.name.to_string());
    // Tablespaces go beside the cluster in the scratch directory, never to their recorded
    // locations (the source's).
    let manifest = catalog::manifest(repo, &plan.backup.name)
        .await
        .map_err(|e| format!("reading the manifest of {}: {e}", plan.backup.name))?;
    let mut fetch_opts = opts.fetch.clone();
    fetch_opts.relocate = manifest
        .tablespaces
        .iter()
        .map(|ts| {
            (
                ts.oid,
                opts.scratch.join("tablespaces").join(ts.oid.to_string()),
            )
        })
        .collect();
    let restore_started = Instant::now();
    fetch::fetch(
        Arc::clone(repo),
        plan.backup.name.as_str(),
        pgdata,
        &fetch_opts,
    )
    .await
    .map_err(|e| format!("restoring {}: {e}", plan.backup.name))?;
    let mut recovery = opts.recovery.clone();
    recovery.target = plan.target.clone();
    recovery.inclusive = plan.inclusive;
    recovery.action = TargetAction::Promote;
    recovery.keep_archive_command = false;
    recovery
        .write(pgdata)
        .map_err(|e| format!("writing the recovery settings: {e}"))?;
    report.restore_seconds = restore_started.elapsed().as_secs_f64();

    let port = match opts.port {
        Some(port) => port,
        None => start::choose_port(pgdata, &opts.socket_dir).map_err(|e| e.to_string())?,
    };
    report.port = Some(port);
    let start_opts = StartOptions {
        pg_bin: opts.pg_bin.clone(),
        port,
        socket_dir: opts.socket_dir.clone(),
        // The scratch copy must not take connections meant for anything else.
        pg_options: vec!["-c listen_addresses=''".into()],
        major: plan.backup.pg_version_num / 10_000,
        pg_timeout: opts.pg_timeout,
    };
    *started = Some(start_opts.clone());
    let reached = start::start(pgdata, &start_opts, TargetAction::Promote)
        .await
        .map_err(|e| format!("recovery: {e}"))?;
    report.replay_seconds = reached.elapsed.as_secs_f64();
    report.reached = Some(Point {
        state: reached.state.to_owned(),
        replay_lsn: reached.replay_lsn,
        last_transaction_end: reached.last_commit,
        timeline: reached.timeline,
    });
    check_databases(opts, port, report).await;
    Ok(())
}

/// A uniformly random instant from a second past the oldest usable backup's end (backup stop
/// times are whole seconds) to the last archived transaction end.
async fn random_time(repo: &Repository) -> Result<UnixMicros, String> {
    let window = Recoverable::load(repo, TimelineChoice::Latest)
        .await
        .map_err(|e| format!("reading the recoverable window: {e}"))?
        .window;
    let start = window
        .oldest_backup_end
        .as_ref()
        .and_then(|(_, time, _)| UnixMicros::parse_rfc3339(time))
        .map(|t| t.0 + 1_000_000)
        .ok_or("no usable backup: nothing to recover")?;
    let end = window
        .last_xact_end
        .map(|m| m.time_us)
        .filter(|end| *end >= start)
        .ok_or_else(|| {
            format!(
                "no transaction archived after the oldest backup's end ({window}): no time to pick"
            )
        })?;
    let span = u64::try_from(end - start).unwrap_or(0);
    let offset = random_u64() % (span + 1);
    Ok(UnixMicros(start + i64::try_from(offset).unwrap_or(0)))
}

/// A random number from the standard library's per-process random hasher keys.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// A conninfo value quoted as libpq reads it.
fn conn_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

async fn connect(opts: &DrillOptions, port: u16, dbname: &str) -> Result<Client, String> {
    let conninfo = format!(
        "host={} port={port} dbname={}",
        conn_value(&opts.socket_dir.display().to_string()),
        conn_value(dbname)
    );
    ConnTarget::resolve(Some(&conninfo))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())
}

async fn check_databases(opts: &DrillOptions, port: u16, report: &mut DrillReport) {
    let names = match list_databases(opts, port).await {
        Ok(names) => names,
        Err(e) => {
            report.failures.push(format!("listing databases: {e}"));
            return;
        }
    };
    for name in names {
        let mut check = DatabaseCheck {
            name: name.clone(),
            ..Default::default()
        };
        if let Err(e) = check_database(opts, port, &mut check).await {
            report.failures.push(format!("database {name:?}: {e}"));
            check.error = Some(e);
        }
        report.databases.push(check);
    }
    for sql in &opts.check_sql {
        let check = check_sql(opts, port, sql).await;
        if !check.passed {
            report.failures.push(format!(
                "--check-sql {sql:?}: {}",
                check.error.as_deref().unwrap_or("no rows")
            ));
        }
        report.check_sql.push(check);
    }
}

async fn list_databases(opts: &DrillOptions, port: u16) -> Result<Vec<String>, String> {
    let client = connect(opts, port, "postgres").await?;
    let rows = pg::bounded(
        "the scratch server",
        "listing databases",
        opts.pg_timeout,
        client.query(
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
            &[],
        ),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn check_database(
    opts: &DrillOptions,
    port: u16,
    check: &mut DatabaseCheck,
) -> Result<(), String> {
    let client = connect(opts, port, &check.name).await?;
    check.connected = true;
    let bound = |what| {
        (
            format!("database {:?}", check.name),
            what,
            opts.check_timeout,
        )
    };
    let (target, what, after) = bound("looking for amcheck");
    let available: bool = pg::bounded(
        &target,
        what,
        after,
        client.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck')",
            &[],
        ),
    )
    .await
    .map_err(|e| e.to_string())?
    .get(0);
    if available {
        // In the scratch copy only: it is thrown away after the drill.
        let (target, what, after) = bound("creating extension amcheck");
        pg::bounded(
            &target,
            what,
            after,
            client.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck"),
        )
        .await
        .map_err(|e| e.to_string())?;
        let (target, what, after) = bound("listing btree indexes");
        let indexes = pg::bounded(
            &target,
            what,
            after,
            client.query(
                "SELECT c.oid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 JOIN pg_am a ON a.oid = c.relam \
                 WHERE a.amname = 'btree' AND c.relpersistence <> 't' \
                 AND i.indisvalid AND i.indisready ORDER BY c.oid",
                &[],
            ),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut checked = 0;
        for row in indexes {
            let oid: u32 = row.get(0);
            let (target, what, after) = bound("checking a btree index (bt_index_check)");
            pg::bounded(
                &target,
                what,
                after,
                client.query_one("SELECT bt_index_check($1::oid::regclass)", &[&oid]),
            )
            .await
            .map_err(|e| format!("index {oid}: {}", e))?;
            checked += 1;
        }
        check.btree_indexes_checked = Some(checked);
    }
    let (target, what, after) = bound("listing tables");
    let tables = pg::bounded(
        &target,
        what,
        after,
        client.query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't' \
             AND (c.relkind = 'r' OR c.relispopulated) ORDER BY 1",
            &[],
        ),
    )
    .await
    .map_err(|e| e.to_string())?;
    for row in tables {
        let table: String = row.get(0);
        // Every row turned into text, as COPY writes it: every column read and detoasted.
        let (target, what, after) = bound("reading a table in full");
        let bytes: i64 = pg::bounded(
            &target,
            what,
            after,
            client.query_one(
                &format!("SELECT coalesce(sum(octet_length(t::text)), 0)::int8 FROM {table} t"),
                &[],
            ),
        )
        .await
        .map_err(|e| format!("table {table}: {}", e))?
        .get(0);
        check.tables_read += 1;
        check.bytes_read += u64::try_from(bytes).unwrap_or(0);
    }
    Ok(())
}

async fn check_sql(opts: &DrillOptions, port: u16, sql: &str) -> SqlCheck {
    let mut check = SqlCheck {
        sql: sql.to_owned(),
        ..Default::default()
    };
    let client = match connect(opts, port, "postgres").await {
        Ok(client) => client,
        Err(e) => {
            check.error = Some(e);
            return check;
        }
    };
    let answer = pg::bounded(
        "the scratch server",
        "running --check-sql",
        opts.check_timeout,
        client.simple_query(sql),
    )
    .await;
    let messages = match answer {
        Ok(messages) => messages,
        Err(e) => {
            check.error = Some(e.to_string());
            return check;
        }
    };
    let mut size = 0;
    let mut rows = 0;
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        rows += 1;
        let line: Vec<&str> = (0..row.len())
            .map(|i| row.get(i).unwrap_or("NULL"))
            .collect();
        let line = line.join("|");
        size += line.len();
        if check.rows.len() < MAX_ROWS && size <= MAX_OUTPUT {
            check.rows.push(line);
        } else {
            check.truncated = true;
        }
    }
    check.passed = rows > 0;
    check
}

/// Removes the scratch directory (`created`) or only what the drill put in it.
fn remove_scratch(scratch: &Path, created: bool) -> std::io::Result<()> {
    if created {
        return match std::fs::remove_dir_all(scratch) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
    }
    for entry in std::fs::read_dir(scratch)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}
