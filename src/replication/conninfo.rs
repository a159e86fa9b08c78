//! Where and as whom to connect: libpq's conventions, reduced to what a physical replication
//! connection needs.
//!
//! A connection string (`host=... port=... user=...` or a `postgresql://` URI, parsed by
//! tokio-postgres's `Config`) wins; whatever it leaves out comes from `PGHOST`, `PGPORT`, `PGUSER`,
//! `PGPASSWORD`, `PGAPPNAME` and `PGCONNECT_TIMEOUT`, then from libpq's defaults. A host starting
//! with `/` is a Unix socket directory. Used by [`super::ReplicationConnection::connect`].

use std::path::PathBuf;
use std::time::Duration;

use super::ReplError;

/// The Unix socket directory Debian's libpq uses when no host is given.
const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
const DEFAULT_PORT: u16 = 5432;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Tcp {
        host: String,
        port: u16,
    },
    /// The socket file itself (`<dir>/.s.PGSQL.<port>`).
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Everything needed to open a replication connection.
#[derive(Clone)]
pub(crate) struct ConnParams {
    pub(crate) endpoint: Endpoint,
    pub(crate) user: String,
    pub(crate) password: Option<Vec<u8>>,
    pub(crate) application_name: String,
    pub(crate) connect_timeout: Duration,
}

impl std::fmt::Debug for ConnParams {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnParams")
            .field("endpoint", &self.endpoint)
            .field("user", &self.user)
            .field("application_name", &self.application_name)
            .finish_non_exhaustive()
    }
}

impl ConnParams {
    /// Parameters from an optional connection string, then the process environment.
    pub(crate) fn resolve(
        conninfo: Option<&str>,
        application_name: &str,
    ) -> Result<ConnParams, ReplError> {
        Self::from_sources(conninfo, application_name, |k| std::env::var(k).ok())
    }

    fn from_sources(
        conninfo: Option<&str>,
        application_name: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ConnParams, ReplError> {
        let parsed = match conninfo {
            Some(text) => text
                .parse::<tokio_postgres::Config>()
                .map_err(|e| ReplError::Config(format!("connection string: {e}")))?,
            None => tokio_postgres::Config::new(),
        };
        let port = match parsed.get_ports().first() {
            Some(p) => *p,
            None => match env("PGPORT") {
                Some(p) => p
                    .parse()
                    .map_err(|_| ReplError::Config(format!("PGPORT={p:?} is not a port")))?,
                None => DEFAULT_PORT,
            },
        };
        let host = match parsed.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(dir)) => dir.display().to_string(),
            None => env("PGHOST").unwrap_or_else(|| DEFAULT_SOCKET_DIR.to_owned()),
        };
        let endpoint = if host.starts_with('/') {
            Endpoint::Unix(PathBuf::from(host).join(format!(".s.PGSQL.{port}")))
        } else {
            Endpoint::Tcp { host, port }
        };
        let user = parsed
            .get_user()
            .map(str::to_owned)
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .ok_or_else(|| ReplError::Config("no user: set user= or PGUSER".into()))?;
        let password = parsed
            .get_password()
            .map(<[u8]>::to_vec)
            .or_else(|| env("PGPASSWORD").map(String::into_bytes));
        let application_name = parsed
            .get_application_name()
            .map(str::to_owned)
            .unwrap_or_else(|| application_name.to_owned());
        let connect_timeout = match parsed.get_connect_timeout() {
            Some(t) => *t,
            None => env("PGCONNECT_TIMEOUT")
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|s| *s > 0)
                .map_or(DEFAULT_CONNECT_TIMEOUT, Duration::from_secs),
        };
        Ok(ConnParams {
            endpoint,
            user,
            password,
            application_name,
            connect_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(conninfo: Option<&str>, env: &[(&str, &str)]) -> ConnParams {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConnParams::from_sources(conninfo, "walvault", |k| env.get(k).cloned()).unwrap()
    }

    #[test]
    fn connection_string_beats_environment() {
        let p = resolve(
            Some("host=db.example port=6543 user=rep password=s3cret application_name=x"),
            &[
                ("PGHOST", "/tmp"),
                ("PGUSER", "other"),
                ("PGPASSWORD", "no"),
            ],
        );
        assert_eq!(
            p.endpoint,
            Endpoint::Tcp {
                host: "db.example".into(),
                port: 6543
            }
        );
        assert_eq!(p.user, "rep");
        assert_eq!(p.password.as_deref(), Some(&b"s3cret"[..]));
        assert_eq!(p.application_name, "x");
        assert!(!format!("{p:?}").contains("s3cret"));
    }

    #[test]
    fn environment_fills_the_gaps() {
        let p = resolve(
            None,
            &[("PGHOST", "/run/pg"), ("PGPORT", "5433"), ("USER", "me")],
        );
        assert_eq!(
            p.endpoint,
            Endpoint::Unix(PathBuf::from("/run/pg/.s.PGSQL.5433"))
        );
        assert_eq!(p.user, "me");
        assert_eq!(p.application_name, "walvault");
        assert_eq!(p.password, None);
    }
}
