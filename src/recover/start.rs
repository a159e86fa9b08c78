//! `recover --start`: starts PostgreSQL on the restored directory, follows recovery to its end
//! and reports the point it reached.
//!
//! Understands `pg_ctl start`, the recovery functions (`pg_is_in_recovery()` and friends) and the
//! log lines that say how recovery ended, in particular the FATAL "recovery ended before configured
//! recovery target was reached", which becomes a failure instead of a healthy-looking server. The
//! server logs to `<pgdata>/walvault-recover.log`. Used by `cmd/recover.rs`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::settings::TargetAction;
use super::RecoverError;
use crate::pg::ConnTarget;

/// How to run the server.
#[derive(Clone, Debug)]
pub(crate) struct StartOptions {
    /// Directory holding `pg_ctl`; default: `PATH`, then the Debian/Ubuntu location of the
    /// backup's major version.
    pub(crate) pg_bin: Option<PathBuf>,
    pub(crate) port: u16,
    /// Where the server puts its socket, and where walvault connects to follow recovery.
    pub(crate) socket_dir: PathBuf,
    /// Extra server options (`pg_ctl -o`), e.g. `-c shared_buffers=1GB`.
    pub(crate) pg_options: Vec<String>,
    pub(crate) major: u32,
    /// Bound on one query while following recovery (`pg_timeout`).
    pub(crate) pg_timeout: Duration,
}

/// Where recovery ended.
#[derive(Clone, Debug)]
pub(crate) struct Reached {
    pub(crate) replay_lsn: Option<String>,
    pub(crate) last_commit: Option<String>,
    /// The timeline the server is on afterwards (a new one after promotion).
    pub(crate) timeline: Option<u32>,
    pub(crate) state: &'static str,
    pub(crate) elapsed: Duration,
}

const LOG_FILE: &str = "walvault-recover.log";
const ENDED_EARLY: &str = "recovery ended before configured recovery target was reached";
const POLL: Duration = Duration::from_millis(250);

/// Starts the server and waits until recovery reaches its end as `action` says it should.
pub(crate) async fn start(
    pgdata: &Path,
    opts: &StartOptions,
    action: TargetAction,
) -> Result<Reached, RecoverError> {
    let started = Instant::now();
    let log = pgdata.join(LOG_FILE);
    pg_ctl_start(pgdata, opts, &log).await?;
    follow(pgdata, opts, &log, action, started).await
}

/// Stops the server on `pgdata` if it runs (`pg_ctl stop -m fast`, then `immediate` if that
/// does not end it within a minute); a drill's scratch cluster is thrown away after it.
pub(crate) async fn stop(pgdata: &Path, opts: &StartOptions) -> Result<(), RecoverError> {
    if !pgdata.join("postmaster.pid").exists() {
        return Ok(());
    }
    let pg_ctl = find_pg_ctl(opts)?;
    let mut last = String::new();
    for mode in ["fast", "immediate"] {
        let mut command = std::process::Command::new(&pg_ctl);
        command
            .args(["stop", "-m", mode, "-w", "-t", "60", "-D"])
            .arg(pgdata)
            .stdin(Stdio::null());
        let output = run_pg_ctl(&pg_ctl, command).await?;
        if output.status.success() || !pgdata.join("postmaster.pid").exists() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    }
    Err(RecoverError::Start(format!(
        "{} stop -D {} failed: {last}",
        pg_ctl.display(),
        pgdata.display()
    )))
}

/// The port a recovered server starts on when none was given: the restored configuration's
/// (PostgreSQL's default 5432 when it names none) if no server uses it, on 127.0.0.1 or as a
/// socket in `socket_dir`; else one the kernel says is free. A recovery often runs beside the
/// source cluster, which still holds the port its configuration names.
pub(crate) fn choose_port(pgdata: &Path, socket_dir: &Path) -> Result<u16, RecoverError> {
    let configured = configured_port(pgdata).unwrap_or(5432);
    if port_free(configured, socket_dir) {
        return Ok(configured);
    }
    for _ in 0..10 {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map_err(|source| RecoverError::Io {
                what: "find a free port on",
                path: "127.0.0.1".into(),
                source,
            })?
            .port();
        if port_free(port, socket_dir) {
            return Ok(port);
        }
    }
    Err(RecoverError::Io {
        what: "find a free port (pass --port) on",
        path: "127.0.0.1".into(),
        source: std::io::Error::other("every port tried is in use"),
    })
}

/// Whether nothing listens on `port`: neither on 127.0.0.1 nor as a socket in `socket_dir`.
fn port_free(port: u16, socket_dir: &Path) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        && !socket_dir.join(format!(".s.PGSQL.{port}")).exists()
}

/// The port the restored configuration sets: the last `port` line of `postgresql.conf` and then
/// of `postgresql.auto.conf`, which the server reads last (included files are not followed).
fn configured_port(pgdata: &Path) -> Option<u16> {
    ["postgresql.conf", "postgresql.auto.conf"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(pgdata.join(file)).ok())
        .flat_map(|text| text.lines().filter_map(port_setting).collect::<Vec<_>>())
        .last()
}

/// The value of a `port = N` line (`=` optional, the value possibly quoted, a comment after it).
fn port_setting(line: &str) -> Option<u16> {
    let line = line.split('#').next()?.trim();
    let rest = line.strip_prefix("port")?;
    if !rest.starts_with([' ', '\t', '=']) {
        return None;
    }
    let value = rest.trim_start().strip_prefix('=').unwrap_or(rest).trim();
    value.trim_matches('\'').parse().ok()
}

/// Runs `pg_ctl start`, which returns as soon as the postmaster is forked.
async fn pg_ctl_start(pgdata: &Path, opts: &StartOptions, log: &Path) -> Result<(), RecoverError> {
    let pg_ctl = find_pg_ctl(opts)?;
    let mut server_options = vec![
        "-p".to_string(),
        opts.port.to_string(),
        "-k".to_string(),
        sh_word(&opts.socket_dir.display().to_string()),
        "-c logging_collector=off".to_string(),
    ];
    server_options.extend(opts.pg_options.iter().cloned());
    // Without -w: pg_ctl would give up (and report failure) on a long recovery before the
    // server accepts connections; walvault follows the log and the server itself instead.
    let mut command = std::process::Command::new(&pg_ctl);
    command
        .arg("start")
        .arg("-D")
        .arg(pgdata)
        .arg("-l")
        .arg(log)
        .arg("-o")
        .arg(server_options.join(" "))
        .arg("-W")
        .stdin(Stdio::null());
    // pg_ctl's output goes to the log file.
    let output = run_pg_ctl(&pg_ctl, command).await?;
    if !output.status.success() {
        return Err(RecoverError::Start(format!(
            "{} start failed ({}): {}; server log {}:\n{}",
            pg_ctl.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            log.display(),
            log_tail(log)
        )));
    }
    Ok(())
}

/// Follows the started server, through its log and its recovery functions, until recovery
/// ends as `action` says it should, or fails.
async fn follow(
    pgdata: &Path,
    opts: &StartOptions,
    log: &Path,
    action: TargetAction,
    started: Instant,
) -> Result<Reached, RecoverError> {
    let conninfo = format!(
        "host={} port={} dbname=postgres",
        opts.socket_dir.display(),
        opts.port
    );
    // The user comes from PGUSER, else the OS user, as libpq would pick it.
    let target = ConnTarget::resolve(Some(&conninfo))?;
    let pid_file = pgdata.join("postmaster.pid");
    let mut seen_running = false;
    loop {
        tokio::time::sleep(POLL).await;
        let running = pid_file.exists();
        seen_running |= running;
        let log_text = std::fs::read_to_string(log).unwrap_or_default();
        if log_text.contains(ENDED_EARLY) {
            return Err(RecoverError::EndedEarly {
                log: log.to_path_buf(),
                tail: log_tail(log),
            });
        }
        if !running && (seen_running || started.elapsed() > Duration::from_secs(30)) {
            return stopped(&log_text, log, action, started);
        }
        if let Some(reached) = recovery_state(&target, action, started, opts.pg_timeout).await {
            return Ok(reached);
        }
    }
}

/// What a server that stopped means: the target reached with `shutdown`, else a failure.
fn stopped(
    log_text: &str,
    log: &Path,
    action: TargetAction,
    started: Instant,
) -> Result<Reached, RecoverError> {
    if action == TargetAction::Shutdown && log_text.contains("shutdown at recovery target") {
        return Ok(Reached {
            replay_lsn: last_match(log_text, "redo done at "),
            last_commit: last_match(log_text, "last completed transaction was at log time "),
            timeline: None,
            state: "shut down at the target",
            elapsed: started.elapsed(),
        });
    }
    // Usually PostgreSQL's FATAL after restore_command failed (exit above 125) for a reason
    // other than "not found": name that reason first.
    let cause = last_match(log_text, "walvault wal-fetch ERROR: ")
        .or_else(|| last_match(log_text, "FATAL:  "))
        .map(|c| format!(": {c}"))
        .unwrap_or_default();
    Err(RecoverError::Start(format!(
        "the server stopped during recovery{cause}; it did not reach the target and did not \
         promote; server log {}:\n{}",
        log.display(),
        log_tail(log)
    )))
}

/// Where recovery is, asked of the server: `Some` once it has ended as `action` says it should,
/// `None` while it goes on or the server does not answer yet (before consistency).
async fn recovery_state(
    target: &ConnTarget,
    action: TargetAction,
    started: Instant,
    timeout: Duration,
) -> Option<Reached> {
    // Not accepting connections yet (before consistency), or a server that stops answering:
    // either way the poll moves on instead of hanging recover.
    let client = target.connect().await.ok()?;
    let query = client.query_one(
            "SELECT pg_is_in_recovery(), \
             pg_last_wal_replay_lsn()::text, \
             to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', \
                     'YYYY-MM-DD HH24:MI:SS.US') || '+00', \
             CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, \
             CASE WHEN pg_is_in_recovery() THEN NULL \
                  ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END",
        &[],
    );
    let row = tokio::time::timeout(timeout, query).await.ok()?.ok()?;
    let in_recovery: bool = row.get(0);
    let paused: bool = row.get(3);
    let done = match action {
        TargetAction::Promote => !in_recovery,
        TargetAction::Pause => paused || !in_recovery,
        TargetAction::Shutdown => false,
    };
    done.then(|| Reached {
        replay_lsn: row.get(1),
        last_commit: row.get(2),
        timeline: row
            .get::<_, Option<i32>>(4)
            .and_then(|t| u32::try_from(t).ok()),
        state: if in_recovery {
            "paused at the target (resume with SELECT pg_wal_replay_resume())"
        } else {
            "promoted"
        },
        elapsed: started.elapsed(),
    })
}

/// `pg_ctl` from `--pg-bin`, `PATH`, or the packaged location of the backup's major version.
fn find_pg_ctl(opts: &StartOptions) -> Result<PathBuf, RecoverError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = &opts.pg_bin {
        candidates.push(dir.join("pg_ctl"));
    } else {
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("pg_ctl")));
        }
        candidates.push(PathBuf::from(format!(
            "/usr/lib/postgresql/{}/bin/pg_ctl",
            opts.major
        )));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        RecoverError::Start(format!(
            "cannot find pg_ctl for PostgreSQL {} (give its directory with --pg-bin)",
            opts.major
        ))
    })
}

/// The text after the last occurrence of `prefix` in the log, to the end of its line.
fn last_match(log: &str, prefix: &str) -> Option<String> {
    log.lines()
        .filter(|l| !is_own_noise(l))
        .filter_map(|l| {
            l.split_once(prefix)
                .map(|(_, rest)| rest.trim().to_string())
        })
        .next_back()
}

/// Whether a log line is the refusal of one of walvault's own connection attempts, made while
/// the server was not yet consistent.
fn is_own_noise(line: &str) -> bool {
    const OWN_NOISE: [&str; 3] = [
        "the database system is not yet accepting connections",
        "Consistent recovery state has not been yet reached",
        "the database system is starting up",
    ];
    OWN_NOISE.iter().any(|n| line.contains(n))
}

/// The end of the server log, without walvault's own connection noise.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !is_own_noise(l)).collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Quotes a word for the server's option parsing, which splits `-o` on unescaped spaces.
fn sh_word(word: &str) -> String {
    if word.contains([' ', '\'', '"', '\\']) {
        format!("'{}'", word.replace('\'', "'\\''"))
    } else {
        word.to_string()
    }
}

/// Runs a `pg_ctl` command line (waiting for it off the runtime's threads).
async fn run_pg_ctl(
    pg_ctl: &std::path::Path,
    mut command: std::process::Command,
) -> Result<std::process::Output, RecoverError> {
    tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| RecoverError::Start(format!("pg_ctl task failed: {e}")))?
        .map_err(|source| RecoverError::Io {
            what: "run",
            path: pg_ctl.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_port_is_read_as_postgresql_writes_it() {
        assert_eq!(port_setting("port = 5433"), Some(5433));
        assert_eq!(port_setting("port='6000' # moved"), Some(6000));
        assert_eq!(port_setting("port 7000"), Some(7000));
        assert_eq!(port_setting("#port = 5433"), None);
        assert_eq!(port_setting("ports = 1"), None);
        assert_eq!(port_setting("port = x"), None);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("postgresql.conf"),
            "port = 5433\nport = '5434'\n",
        )
        .unwrap();
        assert_eq!(configured_port(dir.path()), Some(5434));
        std::fs::write(dir.path().join("postgresql.auto.conf"), "port = '5435'\n").unwrap();
        assert_eq!(configured_port(dir.path()), Some(5435));
    }

    #[test]
    fn a_port_in_use_is_not_chosen() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        std::fs::write(
            dir.path().join("postgresql.conf"),
            format!("port = {port}\n"),
        )
        .unwrap();
        assert_ne!(choose_port(dir.path(), dir.path()).unwrap(), port);
        drop(taken);
        assert_eq!(choose_port(dir.path(), dir.path()).unwrap(), port);
        // A socket file of another server takes the port too.
        std::fs::write(dir.path().join(format!(".s.PGSQL.{port}")), "").unwrap();
        assert_ne!(choose_port(dir.path(), dir.path()).unwrap(), port);
    }
}
