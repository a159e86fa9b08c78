//! Talking to PostgreSQL over libpq's wire protocol (tokio-postgres) for the backup API.
//!
//! Understands libpq's connection conventions (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`,
//! `PGPASSWORD`, `PGCONNECT_TIMEOUT`, or a conninfo string / URI given as `--dbname`), what a
//! backup needs to know about the server (version, system identifier, data directory, data
//! checksums, block and WAL segment size) and the non-exclusive backup calls, which changed name
//! in PostgreSQL 15: `pg_backup_start`/`pg_backup_stop` there, `pg_start_backup(label, fast,
//! false)`/`pg_stop_backup(false, true)` on 13 and 14. The session that starts a backup must stay
//! open until it is stopped, so [`BackupSession`] owns its connection. Used by `backup-push`.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};
use walvault_wal::Lsn;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    #[error("invalid connection string: {0}")]
    Conninfo(String),
    #[error("cannot connect to PostgreSQL at {target}: {source} (is the server running? check PGHOST/PGPORT or --dbname)")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL at {target}: {what}: {source}")]
    Query {
        target: String,
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL at {target}: {problem}")]
    Unsupported { target: String, problem: String },
}

/// Where to connect, resolved from `--dbname` and the libpq environment.
#[derive(Clone, Debug)]
pub(crate) struct ConnTarget {
    config: Config,
    shown: String,
}

impl ConnTarget {
    /// `dbname` is a database name, a `key=value` conninfo string or a `postgres://` URI; what
    /// it leaves unset comes from the `PG*` environment, then libpq's defaults.
    pub(crate) fn resolve(dbname: Option<&str>) -> Result<ConnTarget, PgError> {
        Self::resolve_with(dbname, |k| std::env::var(k).ok())
    }

    fn resolve_with(
        dbname: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ConnTarget, PgError> {
        let mut config = match dbname {
            Some(text)
                if text.contains('=') || text.starts_with("postgres") && text.contains("://") =>
            {
                Config::from_str(text).map_err(|e| PgError::Conninfo(e.to_string()))?
            }
            Some(name) => {
                let mut c = Config::new();
                c.dbname(name);
                c
            }
            None => Config::new(),
        };
        if config.get_hosts().is_empty() {
            let host = env("PGHOST").unwrap_or_else(|| {
                if std::path::Path::new("/var/run/postgresql").is_dir() {
                    "/var/run/postgresql".into()
                } else {
                    "/tmp".into()
                }
            });
            for h in host.split(',') {
                config.host(h);
            }
        }
        if config.get_ports().is_empty() {
            let port = env("PGPORT").and_then(|p| p.parse().ok()).unwrap_or(5432);
            config.port(port);
        }
        if config.get_user().is_none() {
            let user = env("PGUSER")
                .or_else(|| env("USER"))
                .or_else(|| env("LOGNAME"))
                .unwrap_or_else(|| "postgres".into());
            config.user(&user);
        }
        if config.get_dbname().is_none() {
            let db = env("PGDATABASE")
                .unwrap_or_else(|| config.get_user().unwrap_or("postgres").to_owned());
            config.dbname(&db);
        }
        if config.get_password().is_none() {
            if let Some(pw) = env("PGPASSWORD") {
                config.password(pw);
            }
        }
        if config.get_connect_timeout().is_none() {
            let secs = env("PGCONNECT_TIMEOUT")
                .and_then(|s| s.parse().ok())
                .unwrap_or(10);
            config.connect_timeout(Duration::from_secs(secs));
        }
        config.application_name("walvault");
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let shown = format!(
            "host={} port={} user={} dbname={}",
            hosts.join(","),
            config.get_ports().first().copied().unwrap_or(5432),
            config.get_user().unwrap_or(""),
            config.get_dbname().unwrap_or("")
        );
        Ok(ConnTarget { config, shown })
    }

    /// Opens a session; its connection is driven by a background task until the client drops.
    pub(crate) async fn connect(&self) -> Result<Client, PgError> {
        let (client, connection) =
            self.config
                .connect(NoTls)
                .await
                .map_err(|source| PgError::Connect {
                    target: self.shown.clone(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("PostgreSQL connection ended: {e}");
            }
        });
        Ok(client)
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
}

/// An open session, able to run one non-exclusive backup.
pub(crate) struct BackupSession {
    client: Client,
    target: String,
    info: ServerInfo,
}

/// What `pg_backup_stop` returns.
#[derive(Clone, Debug)]
pub(crate) struct BackupStop {
    pub(crate) lsn: Lsn,
    pub(crate) backup_label: String,
    pub(crate) tablespace_map: Option<String>,
}

impl BackupSession {
    pub(crate) async fn connect(target: &ConnTarget) -> Result<BackupSession, PgError> {
        let shown = target.shown.clone();
        let client = target.connect().await?;
        let query = |what| {
            let target = shown.clone();
            move |source| PgError::Query {
                target,
                what,
                source,
            }
        };
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int4, \
                 (SELECT system_identifier FROM pg_control_system())::text, \
                 current_setting('data_directory', true), \
                 current_setting('data_checksums') = 'on', \
                 current_setting('block_size')::int4, \
                 (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')::int8, \
                 pg_is_in_recovery(), \
                 current_setting('archive_mode')",
                &[],
            )
            .await
            .map_err(query("reading server settings"))?;
        let version: i32 = row.get(0);
        let sysid: String = row.get(1);
        let data_directory: Option<String> = row.get(2);
        let segment: i64 = row.get(5);
        let block_size: i32 = row.get(4);
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
        if info.major() < 13 {
            return Err(PgError::Unsupported {
                target: shown,
                problem: format!("server version {} is older than 13", info.version_num),
            });
        }
        Ok(BackupSession {
            client,
            target: shown,
            info,
        })
    }

    pub(crate) fn info(&self) -> &ServerInfo {
        &self.info
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    fn query_error(
        &self,
        what: &'static str,
    ) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
        move |source| PgError::Query {
            target: self.target.clone(),
            what,
            source,
        }
    }

    /// Starts a non-exclusive backup; returns its start LSN and the timeline of its checkpoint.
    pub(crate) async fn start(&self, label: &str, fast: bool) -> Result<(Lsn, u32), PgError> {
        let sql = if self.info.major() >= 15 {
            "SELECT pg_backup_start($1, $2)::text"
        } else {
            "SELECT pg_start_backup($1, $2, false)::text"
        };
        let row = self
            .client
            .query_one(sql, &[&label, &fast])
            .await
            .map_err(self.query_error("starting the backup"))?;
        let lsn = self.lsn(row.get(0))?;
        let row = self
            .client
            .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
            .await
            .map_err(self.query_error("reading the checkpoint timeline"))?;
        let timeline: i32 = row.get(0);
        Ok((lsn, u32::try_from(timeline).unwrap_or(0)))
    }

    /// Stops the backup, waiting until its last WAL segment is archived.
    pub(crate) async fn stop(&self) -> Result<BackupStop, PgError> {
        let sql = if self.info.major() >= 15 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, true)"
        };
        let row = self
            .client
            .query_one(sql, &[])
            .await
            .map_err(self.query_error("stopping the backup"))?;
        let lsn = self.lsn(row.get(0))?;
        let label: Option<String> = row.get(1);
        let map: Option<String> = row.get(2);
        Ok(BackupStop {
            lsn,
            backup_label: label.unwrap_or_default(),
            tablespace_map: map.filter(|m| !m.is_empty()),
        })
    }

    fn lsn(&self, text: String) -> Result<Lsn, PgError> {
        text.parse().map_err(|_| PgError::Unsupported {
            target: self.target.clone(),
            problem: format!("{text:?} is not an LSN"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(dbname: Option<&str>, env: &[(&str, &str)]) -> ConnTarget {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConnTarget::resolve_with(dbname, |k| env.get(k).cloned()).unwrap()
    }

    #[test]
    fn libpq_environment_fills_what_dbname_leaves_open() {
        let t = resolve(
            None,
            &[
                ("PGHOST", "/tmp/sock"),
                ("PGPORT", "5433"),
                ("PGUSER", "bob"),
            ],
        );
        assert_eq!(t.shown, "host=/tmp/sock port=5433 user=bob dbname=bob");
        let t = resolve(
            Some("host=db1 port=6000 dbname=app"),
            &[
                ("PGHOST", "/tmp/sock"),
                ("PGUSER", "bob"),
                ("PGDATABASE", "x"),
            ],
        );
        assert_eq!(t.shown, "host=db1 port=6000 user=bob dbname=app");
        let t = resolve(Some("mydb"), &[("PGHOST", "h"), ("PGUSER", "u")]);
        assert_eq!(t.shown, "host=h port=5432 user=u dbname=mydb");
        assert!(ConnTarget::resolve_with(Some("host='unterminated"), |_| None).is_err());
    }
}
