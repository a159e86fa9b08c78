//! PostgreSQL connections: libpq's conventions ([`conninfo`], [`passfile`], [`tls`]) shared by
//! both kinds of connection, and the SQL session a backup needs (tokio-postgres).
//!
//! [`BackupSession`] reads what a backup needs to know about the server and runs the
//! non-exclusive backup calls (`pg_backup_start`/`pg_backup_stop` on 15+, `pg_start_backup`/
//! `pg_stop_backup` on 13 and 14), every call bounded by a timeout. Used by `backup-push`,
//! `recover --start` and, for its settings, the replication client.

pub(crate) mod conninfo;
mod passfile;
pub(crate) mod tls;

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use walvault_wal::{Lsn, PgMajor, WalError};

use conninfo::{ConnInfo, ConnInfoError, Failed, Host, HostSpec};
use tls::{Encryption, MakeRustls, TlsError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    #[error(transparent)]
    Conninfo(#[from] ConnInfoError),
    #[error("PostgreSQL at {target}: {source}")]
    Tls {
        target: String,
        #[source]
        source: TlsError,
    },
    #[error("cannot connect to PostgreSQL at {target}: {source}{hint}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
        hint: &'static str,
    },
    #[error("PostgreSQL at {target}: {what}: {source}")]
    Query {
        target: String,
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL at {target} did not answer within {after:?} ({what}){hint}")]
    Timeout {
        target: String,
        what: &'static str,
        after: Duration,
        hint: &'static str,
    },
    #[error("PostgreSQL at {target}: the backup's last WAL segment {segment} did not reach the repository within {after} (backup_stop_timeout): {archiving}; fix archive_command (see PostgreSQL's log) or raise backup_stop_timeout (WALVAULT_BACKUP_STOP_TIMEOUT); this backup is abandoned")]
    BackupStopTimeout {
        target: String,
        segment: String,
        after: String,
        archiving: String,
    },
    #[error("PostgreSQL at {target}: {problem}")]
    Unsupported { target: String, problem: String },
}

/// Where to connect, resolved from `--dbname` and the libpq environment.
#[derive(Clone, Debug)]
pub(crate) struct ConnTarget {
    info: ConnInfo,
    shown: String,
}

impl ConnTarget {
    /// `dbname` is a database name, a `key=value` conninfo string or a `postgres://` URI; what
    /// it leaves unset comes from the `PG*` environment, then libpq's defaults.
    pub(crate) fn resolve(dbname: Option<&str>) -> Result<ConnTarget, PgError> {
        let info = ConnInfo::resolve(dbname, "walvault")?;
        let shown = info.shown();
        Ok(ConnTarget { info, shown })
    }

    /// Opens a session, trying each host in turn as libpq does; each attempt (socket, TLS,
    /// authentication) is bounded by the connect timeout. The connection is driven by a
    /// background task until the client drops.
    pub(crate) async fn connect(&self) -> Result<Client, PgError> {
        self.info
            .try_hosts(async |host, encryption| self.connect_host(host, encryption).await)
            .await
            .map_err(|last| {
                // ConnInfo always holds at least one host; this only keeps the function total.
                last.unwrap_or_else(|| PgError::Unsupported {
                    target: self.shown.clone(),
                    problem: "no host to connect to".into(),
                })
            })
    }

    async fn connect_host(
        &self,
        host: &HostSpec,
        encryption: Encryption,
    ) -> Result<Client, Failed<PgError>> {
        let info = &self.info;
        let mut config = tokio_postgres::Config::new();
        match &host.host {
            Host::Tcp(name) => config.host(name),
            Host::Unix(dir) => config.host_path(dir),
        };
        if let Some(addr) = host.hostaddr {
            config.hostaddr(addr);
        }
        config
            .port(host.port)
            .user(&info.user)
            .dbname(&info.dbname)
            .application_name(&info.application_name)
            .connect_timeout(info.connect_timeout)
            .channel_binding(match info.channel_binding {
                conninfo::ChannelBinding::Disable => {
                    tokio_postgres::config::ChannelBinding::Disable
                }
                conninfo::ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
                conninfo::ChannelBinding::Require => {
                    tokio_postgres::config::ChannelBinding::Require
                }
            });
        if let Some(options) = &info.options {
            config.options(options);
        }
        if let Some(password) = info.password(host, &info.dbname) {
            config.password(password);
        }
        let target = format!("{host} as {} to {}", info.user, info.dbname);
        let timeout = || Failed {
            error: PgError::Timeout {
                target: target.clone(),
                what: "connecting and authenticating",
                after: info.connect_timeout,
                hint: " (is it a PostgreSQL server? set connect_timeout or PGCONNECT_TIMEOUT)",
            },
            tls_failed: false,
            refused: false,
        };
        let connect_error = |source: tokio_postgres::Error, handshake_failed: bool| {
            let refused = source.as_db_error().is_some();
            // tokio-postgres reports a server without TLS only in words ("server does not
            // support TLS"); it has no error kind to test.
            let tls_failed = handshake_failed || source.to_string().contains("TLS");
            let hint = if tls_failed {
                " (check sslmode, sslrootcert/PGSSLROOTCERT and the server's certificate)"
            } else if refused {
                ""
            } else {
                " (is the server running? check PGHOST/PGPORT or --dbname)"
            };
            Failed {
                error: PgError::Connect {
                    target: target.clone(),
                    source,
                    hint,
                },
                tls_failed,
                refused,
            }
        };
        let opened = if encryption == Encryption::Plain {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            open(&config, NoTls, info.connect_timeout).await
        } else {
            config.ssl_mode(if encryption == Encryption::Tls {
                tokio_postgres::config::SslMode::Require
            } else {
                tokio_postgres::config::SslMode::Prefer
            });
            let tls = info.tls.client_config().map_err(|source| Failed {
                error: PgError::Tls {
                    target: target.clone(),
                    source,
                },
                tls_failed: false,
                refused: false,
            })?;
            let tls = MakeRustls::new(tls);
            match open(&config, tls.clone(), info.connect_timeout).await {
                Ok(Err(e)) if tls.handshake_failed() => return Err(connect_error(e, true)),
                other => other,
            }
        };
        opened
            .map_err(|_| timeout())?
            .map_err(|e| connect_error(e, false))
    }
}

/// Connects within `limit`; a task drives the connection until the client drops.
async fn open<T>(
    config: &tokio_postgres::Config,
    tls: T,
    limit: Duration,
) -> Result<Result<Client, tokio_postgres::Error>, tokio::time::error::Elapsed>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let connected = tokio::time::timeout(limit, config.connect(tls)).await?;
    Ok(connected.map(|(client, connection)| {
        tokio::spawn(drive(connection));
        client
    }))
}

async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::warn!("PostgreSQL connection ended: {e}");
    }
}

/// What a backup needs to know about the server.
#[derive(Clone, Debug)]
pub(crate) struct ServerInfo {
    pub(crate) version_num: u32,
    pub(crate) system_identifier: u64,
    pub(crate) data_directory: Option<PathBuf>,
    pub(crate) data_checksums: bool,
    pub(crate) block_size: u32,
    pub(crate) wal_segment_size: u32,
    pub(crate) in_recovery: bool,
    /// `off`, `on` or `always`.
    pub(crate) archive_mode: String,
}

impl ServerInfo {
    pub(crate) fn major(&self) -> u32 {
        self.version_num / 10_000
    }

    /// The major, if walvault supports it: the backup calls below differ by major, and one it
    /// does not know is refused rather than treated as the newest it knows.
    pub(crate) fn supported_major(&self) -> Result<PgMajor, WalError> {
        PgMajor::supported(self.major())
    }
}

/// An open session, able to run one non-exclusive backup.
pub(crate) struct BackupSession {
    client: Client,
    conn: ConnTarget,
    target: String,
    info: ServerInfo,
    timeouts: Timeouts,
    /// `checkpoint_timeout`: the longest a spread checkpoint in `pg_backup_start` should take.
    checkpoint_timeout: Duration,
}

/// Bounds on the session's calls.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    /// One query's reply (`pg_timeout`).
    pub(crate) reply: Duration,
    /// Archiving the backup's stop segment into the repository (`backup_stop_timeout`).
    pub(crate) backup_stop: Duration,
}

/// What `pg_backup_stop` returns.
#[derive(Clone, Debug)]
pub(crate) struct BackupStop {
    pub(crate) lsn: Lsn,
    pub(crate) backup_label: String,
    pub(crate) tablespace_map: Option<String>,
}

impl BackupSession {
    pub(crate) async fn connect(
        target: &ConnTarget,
        timeouts: Timeouts,
    ) -> Result<BackupSession, PgError> {
        let shown = target.shown.clone();
        let client = target.connect().await?;
        let row = bounded(
            &shown,
            "reading server settings",
            timeouts.reply,
            client.query_one(
                "SELECT current_setting('server_version_num')::int4, \
                 (SELECT system_identifier FROM pg_control_system())::text, \
                 current_setting('data_directory', true), \
                 current_setting('data_checksums') = 'on', \
                 current_setting('block_size')::int4, \
                 (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')::int8, \
                 pg_is_in_recovery(), \
                 current_setting('archive_mode'), \
                 (SELECT setting FROM pg_settings WHERE name = 'checkpoint_timeout')::int8",
                &[],
            ),
        )
        .await?;
        let version: i32 = row.get(0);
        let sysid: String = row.get(1);
        let data_directory: Option<String> = row.get(2);
        let segment: i64 = row.get(5);
        let block_size: i32 = row.get(4);
        let checkpoint_secs: i64 = row.get(8);
        let info = ServerInfo {
            version_num: u32::try_from(version).unwrap_or(0),
            system_identifier: sysid.parse().map_err(|_| PgError::Unsupported {
                target: shown.clone(),
                problem: format!("system identifier {sysid:?} is not a number"),
            })?,
            data_directory: data_directory.filter(|d| !d.is_empty()).map(PathBuf::from),
            data_checksums: row.get(3),
            block_size: u32::try_from(block_size).unwrap_or(0),
            wal_segment_size: u32::try_from(segment).unwrap_or(0),
            in_recovery: row.get(6),
            archive_mode: row.get(7),
        };
        info.supported_major().map_err(|e| PgError::Unsupported {
            target: shown.clone(),
            problem: format!("{e} (server_version_num {})", info.version_num),
        })?;
        Ok(BackupSession {
            client,
            conn: target.clone(),
            target: shown,
            info,
            timeouts,
            checkpoint_timeout: Duration::from_secs(
                checkpoint_secs.clamp(0, 86_400).unsigned_abs(),
            ),
        })
    }

    /// The session, for callers that only read (check).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn info(&self) -> &ServerInfo {
        &self.info
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Starts a non-exclusive backup; returns its start LSN and the timeline of its checkpoint.
    pub(crate) async fn start(&self, label: &str, fast: bool) -> Result<(Lsn, u32), PgError> {
        let sql = if self.info.major() >= 15 {
            "SELECT pg_backup_start($1, $2)::text"
        } else {
            "SELECT pg_start_backup($1, $2, false)::text"
        };
        // The call waits for a checkpoint, which a spread one stretches over up to
        // checkpoint_timeout (a busy server's fast one can take a while too).
        let row = bounded(
            &self.target,
            "starting the backup (waiting for a checkpoint)",
            self.timeouts.reply.saturating_add(self.checkpoint_timeout),
            self.client.query_one(sql, &[&label, &fast]),
        )
        .await?;
        let lsn = self.lsn(row.get(0))?;
        let row = bounded(
            &self.target,
            "reading the checkpoint timeline",
            self.timeouts.reply,
            self.client
                .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[]),
        )
        .await?;
        let timeline: i32 = row.get(0);
        Ok((lsn, u32::try_from(timeline).unwrap_or(0)))
    }

    /// Stops the backup without waiting for archiving: PostgreSQL's own wait sleeps a whole
    /// second between looks, so the caller waits for the stop segment in the repository instead
    /// (a standby's `pg_backup_stop` would not wait for it anyway).
    pub(crate) async fn stop(&self) -> Result<BackupStop, PgError> {
        let sql = if self.info.major() >= 15 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let row = bounded(
            &self.target,
            "stopping the backup",
            self.timeouts.reply,
            self.client.query_one(sql, &[]),
        )
        .await?;
        let lsn = self.lsn(row.get(0))?;
        let label: Option<String> = row.get(1);
        let map: Option<String> = row.get(2);
        Ok(BackupStop {
            lsn,
            backup_label: label.unwrap_or_default(),
            tablespace_map: map.filter(|m| !m.is_empty()),
        })
    }

    /// How long archiving may take to bring the stop segment to the repository.
    pub(crate) fn backup_stop_timeout(&self) -> Duration {
        self.timeouts.backup_stop
    }

    /// What this server's archiver is doing, from `pg_stat_archiver` on a second session.
    pub(crate) async fn archiving(&self) -> String {
        describe_archiver(&self.conn, self.timeouts.reply).await
    }

    /// The server's `config_file`, `hba_file` and `ident_file` (names and values), those this
    /// user may see.
    pub(crate) async fn config_files(&self) -> Result<Vec<(String, String)>, PgError> {
        let rows = bounded(
            &self.target,
            "reading the configuration file locations",
            self.timeouts.reply,
            self.client.query(
                "SELECT name, setting FROM pg_settings \
                 WHERE name IN ('config_file', 'hba_file', 'ident_file') \
                 ORDER BY name <> 'config_file', name",
                &[],
            ),
        )
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn lsn(&self, text: String) -> Result<Lsn, PgError> {
        text.parse().map_err(|_| PgError::Unsupported {
            target: self.target.clone(),
            problem: format!("{text:?} is not an LSN"),
        })
    }
}

/// Forces a WAL switch on the server at `target` (a standby's primary), so that the segment a
/// standby backup stopped in is completed and archived soon; returns the server's system
/// identifier, for the caller to check it is the standby's cluster.
pub(crate) async fn switch_wal(target: &ConnTarget, reply: Duration) -> Result<u64, PgError> {
    let client = target.connect().await?;
    let row = bounded(
        &target.shown,
        "switching WAL (pg_switch_wal)",
        reply,
        client.query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text, \
             pg_switch_wal()::text",
            &[],
        ),
    )
    .await?;
    let sysid: String = row.get(0);
    sysid.parse().map_err(|_| PgError::Unsupported {
        target: target.shown.clone(),
        problem: format!("system identifier {sysid:?} is not a number"),
    })
}

/// One SQL call, bounded.
pub(crate) async fn bounded<T>(
    target: &str,
    what: &'static str,
    after: Duration,
    call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    tokio::time::timeout(after, call)
        .await
        .map_err(|_| PgError::Timeout {
            target: target.to_owned(),
            what,
            after,
            hint: " (raise pg_timeout or WALVAULT_PG_TIMEOUT if the server is just slow)",
        })?
        .map_err(|source| PgError::Query {
            target: target.to_owned(),
            what,
            source,
        })
}

/// What archiving is doing according to `pg_stat_archiver` (read on a session of its own), in
/// words naming the segments (the last failure, if it is more recent than the last success);
/// never fails: a failure to look is itself the description.
pub(crate) async fn describe_archiver(conn: &ConnTarget, reply: Duration) -> String {
    match look_at_archiver(conn, reply).await {
        Ok(words) => words,
        Err(e) => format!("archiver status unknown ({e})"),
    }
}

async fn look_at_archiver(conn: &ConnTarget, reply: Duration) -> Result<String, PgError> {
    let client = conn.connect().await?;
    let row = bounded(
        &conn.shown,
        "reading pg_stat_archiver",
        reply,
        client.query_one(
            "SELECT last_archived_wal, last_failed_wal, failed_count, \
                 last_failed_time::text, \
                 last_failed_time IS NOT NULL \
                   AND (last_archived_time IS NULL OR last_failed_time > last_archived_time) \
                 FROM pg_stat_archiver",
            &[],
        ),
    )
    .await?;
    let archived: Option<String> = row.get(0);
    let failed: Option<String> = row.get(1);
    let failures: i64 = row.get(2);
    let failed_at: Option<String> = row.get(3);
    let failing: bool = row.get(4);
    let archived = archived.unwrap_or_else(|| "none yet".into());
    Ok(match failed {
        Some(segment) if failing => format!(
            "archive_command is failing on WAL segment {segment} ({failures} failures, the \
                 last at {}); last archived: {archived}",
            failed_at.unwrap_or_default()
        ),
        _ => format!("no archiving failure since the last success; last archived: {archived}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(version_num: u32) -> ServerInfo {
        ServerInfo {
            version_num,
            system_identifier: 1,
            data_directory: None,
            data_checksums: false,
            block_size: 8192,
            wal_segment_size: 16 << 20,
            in_recovery: false,
            archive_mode: "on".into(),
        }
    }

    /// A future major (19) is refused, naming it and the supported range, instead of getting
    /// the newest backup calls walvault knows; so is one older than 13.
    #[test]
    fn an_unknown_major_is_refused_naming_the_supported_range() {
        for (version_num, major) in [(130023, PgMajor::V13), (180004, PgMajor::V18)] {
            assert_eq!(server(version_num).supported_major(), Ok(major));
        }
        let future = server(190000).supported_major().unwrap_err().to_string();
        assert!(
            future.contains("PostgreSQL 19 is not supported"),
            "{future}"
        );
        assert!(future.contains("13 to 18"), "{future}");
        let old = server(120017).supported_major().unwrap_err().to_string();
        assert!(old.contains("PostgreSQL 12 is not supported"), "{old}");
    }
}
