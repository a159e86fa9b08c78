//! libpq's connection conventions, written once for both kinds of PostgreSQL connection.
//!
//! A `--dbname` value is a database name, a `key=value` conninfo string or a `postgres[ql]://`
//! URI; what it leaves out comes from the `PG*` variables, then from libpq's defaults (the OS
//! user, [`default_socket_dir`], port 5432, `~/.postgresql/` for TLS files, `~/.pgpass`). The SQL
//! connection ([`super::ConnTarget`]) and the replication client are both built from a [`ConnInfo`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::passfile;
use super::tls::{Encryption, Retry, RootCert, SslMode, TlsSettings};

const DEFAULT_PORT: u16 = 5432;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// libpq rounds shorter connect timeouts up to this.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnInfoError {
    #[error("invalid connection string: {0}")]
    Syntax(String),
    #[error("invalid value{} for {origin}: {reason}", value.as_ref().map(|v| format!(" {v:?}")).unwrap_or_default())]
    Invalid {
        origin: Origin,
        /// `None` for secrets.
        value: Option<String>,
        reason: String,
    },
    #[error(
        "cannot tell which user to connect as ({0}): set PGUSER or user= in the connection string"
    )]
    NoUser(String),
}

/// Where a connection setting came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Conninfo(&'static str),
    Env(&'static str),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Conninfo(key) => write!(f, "connection option {key}"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// Every connection option walvault understands, with the variable that supplies it when the
/// connection string does not.
const PARAMS: &[(&str, Option<&str>)] = &[
    ("host", Some("PGHOST")),
    ("hostaddr", Some("PGHOSTADDR")),
    ("port", Some("PGPORT")),
    ("user", Some("PGUSER")),
    ("password", Some("PGPASSWORD")),
    ("passfile", Some("PGPASSFILE")),
    ("dbname", Some("PGDATABASE")),
    ("application_name", Some("PGAPPNAME")),
    ("fallback_application_name", None),
    ("connect_timeout", Some("PGCONNECT_TIMEOUT")),
    ("options", Some("PGOPTIONS")),
    ("sslmode", Some("PGSSLMODE")),
    ("sslrootcert", Some("PGSSLROOTCERT")),
    ("sslcert", Some("PGSSLCERT")),
    ("sslkey", Some("PGSSLKEY")),
    ("sslcrl", Some("PGSSLCRL")),
    ("channel_binding", Some("PGCHANNELBINDING")),
];

/// The Unix socket directory used when no host is given: Debian's libpq default when it exists,
/// upstream's `/tmp` otherwise.
pub(crate) fn default_socket_dir() -> PathBuf {
    let debian = Path::new("/var/run/postgresql");
    if debian.is_dir() {
        debian.to_path_buf()
    } else {
        PathBuf::from("/tmp")
    }
}

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Host {
    Tcp(String),
    /// A socket directory.
    Unix(PathBuf),
}

/// One server to try: its name, the address to use instead of resolving the name, its port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostSpec {
    pub(crate) host: Host,
    pub(crate) hostaddr: Option<IpAddr>,
    pub(crate) port: u16,
}

impl HostSpec {
    /// The name `~/.pgpass` lines are matched against: `localhost` for the default socket
    /// directory, as libpq does.
    fn passfile_name(&self, default_socket: &Path) -> String {
        match &self.host {
            Host::Unix(dir) if dir == default_socket => "localhost".into(),
            Host::Unix(dir) => dir.display().to_string(),
            Host::Tcp(name) => name.clone(),
        }
    }
}

impl std::fmt::Display for HostSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Host::Tcp(name) => write!(f, "{name}:{}", self.port)?,
            Host::Unix(dir) => write!(
                f,
                "{}",
                dir.join(format!(".s.PGSQL.{}", self.port)).display()
            )?,
        }
        if let Some(addr) = self.hostaddr {
            write!(f, " ({addr})")?;
        }
        Ok(())
    }
}

/// A resolved connection: every setting has its final value.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    pub(crate) hosts: Vec<HostSpec>,
    pub(crate) user: String,
    pub(crate) dbname: String,
    password: Option<String>,
    passfile: Option<PathBuf>,
    default_socket: PathBuf,
    pub(crate) application_name: String,
    pub(crate) options: Option<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) tls: TlsSettings,
    pub(crate) channel_binding: ChannelBinding,
}

impl std::fmt::Debug for ConnInfo {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInfo")
            .field("hosts", &self.hosts)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("passfile", &self.passfile)
            .field("application_name", &self.application_name)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// A failed connection attempt, and what libpq's retry rule needs to know about it.
pub(crate) struct Failed<E> {
    pub(crate) error: E,
    /// The TLS handshake failed (certificate or protocol).
    pub(crate) tls_failed: bool,
    /// The server answered with an error (e.g. no `pg_hba.conf` entry for a connection in clear).
    pub(crate) refused: bool,
}

/// SCRAM channel binding, as libpq's `channel_binding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChannelBinding {
    Disable,
    Prefer,
    Require,
}

/// What resolution reads besides the connection string; tests supply their own.
pub(crate) struct Context<'a> {
    pub(crate) env: &'a dyn Fn(&str) -> Option<String>,
    /// The effective OS user's name and home directory (`getpwuid(geteuid())`).
    pub(crate) os_user: Option<(String, Option<PathBuf>)>,
    pub(crate) default_socket: PathBuf,
}

impl ConnInfo {
    /// `dbname` is a database name, a conninfo string or a URI; `fallback_application_name` is
    /// used when neither it nor `PGAPPNAME` names the application.
    pub(crate) fn resolve(
        dbname: Option<&str>,
        fallback_application_name: &str,
    ) -> Result<ConnInfo, ConnInfoError> {
        let env = |k: &str| std::env::var(k).ok();
        let context = Context {
            env: &env,
            os_user: os_user(),
            default_socket: default_socket_dir(),
        };
        Self::resolve_in(dbname, fallback_application_name, &context)
    }

    pub(crate) fn resolve_in(
        dbname: Option<&str>,
        fallback_application_name: &str,
        cx: &Context<'_>,
    ) -> Result<ConnInfo, ConnInfoError> {
        let src = Sources::new(dbname, cx)?;
        let hosts = resolve_hosts(src.get("host"), src.get("hostaddr"), src.get("port"), cx)?;
        let user = src.user()?;
        let dbname = src.get("dbname").map_or_else(|| user.clone(), |(d, _)| d);
        let password = src.get("password").map(|(p, _)| p);
        let passfile = src
            .get("passfile")
            .map(|(p, _)| PathBuf::from(p))
            .or_else(|| src.home.as_ref().map(|h| h.join(".pgpass")));
        let application_name = src
            .get("application_name")
            .or_else(|| src.get("fallback_application_name"))
            .map_or_else(|| fallback_application_name.to_owned(), |(a, _)| a);
        let connect_timeout = connect_timeout(src.get("connect_timeout"))?;
        let tls = src.tls()?;
        let channel_binding = channel_binding(src.get("channel_binding"))?;
        Ok(ConnInfo {
            hosts,
            user,
            dbname,
            password,
            passfile,
            default_socket: cx.default_socket.clone(),
            application_name,
            options: src.get("options").map(|(o, _)| o),
            connect_timeout,
            tls,
            channel_binding,
        })
    }

    /// The password for `host`: the one given, else the first matching passfile line.
    /// `database` is what passfile lines are matched against (`replication` for a physical
    /// replication connection, as libpq does).
    pub(crate) fn password(&self, host: &HostSpec, database: &str) -> Option<String> {
        if let Some(p) = &self.password {
            return Some(p.clone());
        }
        let file = self.passfile.as_ref()?;
        passfile::lookup(
            file,
            &passfile::Entry {
                host: &host.passfile_name(&self.default_socket),
                port: host.port,
                database,
                user: &self.user,
            },
        )
    }

    /// Tries each host in turn, and on each the attempts libpq makes for the `sslmode`
    /// (`prefer` tries again in clear after a failed TLS handshake, `allow` with TLS after the
    /// server refused a connection in clear). Returns the first success or the last failure.
    pub(crate) async fn try_hosts<T, E>(
        &self,
        mut attempt: impl AsyncFnMut(&HostSpec, Encryption) -> Result<T, Failed<E>>,
    ) -> Result<T, Option<E>> {
        let mut last = None;
        for host in &self.hosts {
            let (first, then) = self.tls.attempts(host);
            let failed = match attempt(host, first).await {
                Ok(done) => return Ok(done),
                Err(failed) => failed,
            };
            let again = match then {
                Some((Retry::AfterTlsFailure, next)) if failed.tls_failed => Some(next),
                Some((Retry::AfterServerRefusal, next)) if failed.refused => Some(next),
                _ => None,
            };
            last = Some(failed.error);
            if let Some(next) = again {
                match attempt(host, next).await {
                    Ok(done) => return Ok(done),
                    Err(failed) => last = Some(failed.error),
                }
            }
        }
        Err(last)
    }

    /// Where and as whom, for messages (no secrets).
    pub(crate) fn shown(&self) -> String {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|h| match &h.host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(dir) => dir.display().to_string(),
            })
            .collect();
        let mut ports: Vec<String> = self.hosts.iter().map(|h| h.port.to_string()).collect();
        ports.dedup();
        format!(
            "host={} port={} user={} dbname={}",
            hosts.join(","),
            ports.join(","),
            self.user,
            self.dbname
        )
    }
}

/// Where resolution reads settings: the options of the connection string first, then their `PG*`
/// variables; libpq's default files hang off `home`.
struct Sources<'a> {
    given: Vec<(&'static str, String)>,
    cx: &'a Context<'a>,
    home: Option<PathBuf>,
}

impl<'a> Sources<'a> {
    fn new(dbname: Option<&str>, cx: &'a Context<'a>) -> Result<Self, ConnInfoError> {
        let given = match dbname {
            Some(text) if is_conninfo(text) => parse(text)?,
            Some(name) => vec![("dbname", name.to_owned())],
            None => Vec::new(),
        };
        let home = (cx.env)("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .or_else(|| cx.os_user.as_ref().and_then(|(_, h)| h.clone()));
        Ok(Sources { given, cx, home })
    }

    /// The value of option `key` and where it came from; an empty variable counts as unset.
    fn get(&self, key: &'static str) -> Option<(String, Origin)> {
        if let Some((_, v)) = self.given.iter().rev().find(|(k, _)| *k == key) {
            return Some((v.clone(), Origin::Conninfo(key)));
        }
        let var = PARAMS
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| *v)?;
        (self.cx.env)(var)
            .filter(|v| !v.is_empty())
            .map(|v| (v, Origin::Env(var)))
    }

    /// The user given, else the OS user.
    fn user(&self) -> Result<String, ConnInfoError> {
        match (self.get("user"), &self.cx.os_user) {
            (Some((u, _)), _) => Ok(u),
            (None, Some((name, _))) => Ok(name.clone()),
            (None, None) => Err(ConnInfoError::NoUser("no name for this OS user".into())),
        }
    }

    /// The file option `key` names, else `default` in `~/.postgresql/`.
    fn file(&self, key: &'static str, default: &str) -> Option<PathBuf> {
        self.get(key)
            .map(|(f, _)| PathBuf::from(f))
            .or_else(|| self.dot_pg(default))
    }

    fn dot_pg(&self, file: &str) -> Option<PathBuf> {
        self.home.as_ref().map(|h| h.join(".postgresql").join(file))
    }

    fn tls(&self) -> Result<TlsSettings, ConnInfoError> {
        let rootcert_given = self.get("sslrootcert");
        let mode = ssl_mode(self.get("sslmode"), rootcert_given.as_ref())?;
        let rootcert = match rootcert_given {
            Some((r, origin)) if r == "system" => {
                if mode != SslMode::VerifyFull {
                    return Err(ConnInfoError::Invalid {
                        origin,
                        value: Some(r),
                        reason: format!(
                            "sslrootcert=system needs sslmode=verify-full, not {}",
                            mode.as_str()
                        ),
                    });
                }
                Some(RootCert::System)
            }
            Some((r, _)) => Some(RootCert::File(PathBuf::from(r))),
            None => self.dot_pg("root.crt").map(RootCert::File),
        };
        Ok(TlsSettings {
            mode,
            rootcert,
            cert: self.file("sslcert", "postgresql.crt"),
            key: self.file("sslkey", "postgresql.key"),
            crl: self.file("sslcrl", "root.crl"),
        })
    }
}

fn invalid((value, origin): (String, Origin), reason: &str) -> ConnInfoError {
    ConnInfoError::Invalid {
        origin,
        value: Some(value),
        reason: reason.to_owned(),
    }
}

fn connect_timeout(given: Option<(String, Origin)>) -> Result<Duration, ConnInfoError> {
    let Some(v) = given else {
        return Ok(DEFAULT_CONNECT_TIMEOUT);
    };
    match v.0.trim().parse::<i64>() {
        // libpq waits forever for 0; walvault bounds every wait, so 0 means the default.
        Ok(s) if s <= 0 => Ok(DEFAULT_CONNECT_TIMEOUT),
        Ok(s) => Ok(Duration::from_secs(s.unsigned_abs()).max(MIN_CONNECT_TIMEOUT)),
        Err(_) => Err(invalid(v, "expected a number of seconds")),
    }
}

fn ssl_mode(
    given: Option<(String, Origin)>,
    rootcert: Option<&(String, Origin)>,
) -> Result<SslMode, ConnInfoError> {
    match given {
        Some(v) => v.0.parse::<SslMode>().map_err(|reason| invalid(v, &reason)),
        // libpq 16: trusting the system's roots implies checking the host name.
        None if rootcert.is_some_and(|(r, _)| r == "system") => Ok(SslMode::VerifyFull),
        None => Ok(SslMode::Prefer),
    }
}

fn channel_binding(given: Option<(String, Origin)>) -> Result<ChannelBinding, ConnInfoError> {
    let Some(v) = given else {
        return Ok(ChannelBinding::Prefer);
    };
    match v.0.as_str() {
        "disable" => Ok(ChannelBinding::Disable),
        "prefer" => Ok(ChannelBinding::Prefer),
        "require" => Ok(ChannelBinding::Require),
        _ => Err(invalid(v, "expected disable, prefer or require")),
    }
}

fn resolve_hosts(
    host: Option<(String, Origin)>,
    hostaddr: Option<(String, Origin)>,
    port: Option<(String, Origin)>,
    cx: &Context<'_>,
) -> Result<Vec<HostSpec>, ConnInfoError> {
    let mut addrs: Vec<Option<IpAddr>> = Vec::new();
    if let Some((text, origin)) = &hostaddr {
        for a in text.split(',') {
            let a = a.trim();
            addrs.push(if a.is_empty() {
                None
            } else {
                Some(a.parse().map_err(|_| ConnInfoError::Invalid {
                    origin: *origin,
                    value: Some(text.clone()),
                    reason: format!("{a:?} is not a numeric IP address"),
                })?)
            });
        }
    }
    let names: Vec<String> = match &host {
        Some((text, _)) => text.split(',').map(|h| h.trim().to_owned()).collect(),
        None => vec![String::new(); addrs.len().max(1)],
    };
    if let Some((text, origin)) = hostaddr.filter(|_| addrs.len() != names.len()) {
        return Err(ConnInfoError::Invalid {
            origin,
            value: Some(text),
            reason: format!("{} addresses for {} hosts", addrs.len(), names.len()),
        });
    }
    let ports: Vec<u16> = match &port {
        None => vec![DEFAULT_PORT],
        Some((text, origin)) => text
            .split(',')
            .map(|p| match p.trim() {
                "" => Ok(DEFAULT_PORT),
                p => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    ConnInfoError::Invalid {
                        origin: *origin,
                        value: Some(text.clone()),
                        reason: format!("{p:?} is not a port number"),
                    }
                }),
            })
            .collect::<Result<_, _>>()?,
    };
    if let Some((text, origin)) = port.filter(|_| ports.len() != 1 && ports.len() != names.len()) {
        return Err(ConnInfoError::Invalid {
            origin,
            value: Some(text),
            reason: format!("{} ports for {} hosts", ports.len(), names.len()),
        });
    }
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let hostaddr = addrs.get(i).copied().flatten();
            let host = match (name.as_str(), hostaddr) {
                ("", Some(addr)) => Host::Tcp(addr.to_string()),
                ("", None) => Host::Unix(cx.default_socket.clone()),
                (n, _) if n.starts_with('/') => Host::Unix(PathBuf::from(n)),
                (n, _) => Host::Tcp(n.to_owned()),
            };
            HostSpec {
                host,
                hostaddr,
                port: ports.get(i).copied().unwrap_or(ports[0]),
            }
        })
        .collect())
}

/// libpq's test: a `dbname` holding `=` or starting with a URI scheme is a connection string.
fn is_conninfo(text: &str) -> bool {
    text.contains('=') || text.starts_with("postgresql://") || text.starts_with("postgres://")
}

fn known_key(key: &str) -> Result<&'static str, ConnInfoError> {
    PARAMS
        .iter()
        .map(|(k, _)| *k)
        .find(|k| *k == key)
        .ok_or_else(|| ConnInfoError::Syntax(format!("invalid connection option {key:?}")))
}

/// Key/value pairs of a conninfo string or URI, in order.
fn parse(text: &str) -> Result<Vec<(&'static str, String)>, ConnInfoError> {
    if let Some(rest) = text
        .strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"))
    {
        parse_uri(rest)
    } else {
        parse_keywords(text)
    }
}

fn parse_keywords(text: &str) -> Result<Vec<(&'static str, String)>, ConnInfoError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConnInfoError::Syntax(format!(
                "missing \"=\" after {key:?}"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => break,
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(ConnInfoError::Syntax(format!(
                            "unterminated quoted string in the value of {key:?}"
                        )))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((known_key(&key)?, value));
    }
}

/// `[user[:password]@][host[:port][,...]][/dbname][?key=value&...]`, percent-encoded.
fn parse_uri(rest: &str) -> Result<Vec<(&'static str, String)>, ConnInfoError> {
    let mut out = Vec::new();
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (netloc, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let hostlist = match netloc.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user", percent_decode(user)?));
            }
            if let Some(p) = password {
                out.push(("password", percent_decode(p)?));
            }
            hosts
        }
        None => netloc,
    };
    if !hostlist.is_empty() {
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for item in hostlist.split(',') {
            let (host, port) = if let Some(v6) = item.strip_prefix('[') {
                let (addr, after) = v6.split_once(']').ok_or_else(|| {
                    ConnInfoError::Syntax(format!("unterminated IPv6 address in {item:?}"))
                })?;
                (addr, after.strip_prefix(':').unwrap_or(""))
            } else {
                item.split_once(':').unwrap_or((item, ""))
            };
            hosts.push(percent_decode(host)?);
            ports.push(percent_decode(port)?);
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            out.push(("host", hosts.join(",")));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            out.push(("port", ports.join(",")));
        }
    }
    if !path.is_empty() {
        out.push(("dbname", percent_decode(path)?));
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ConnInfoError::Syntax(format!("missing \"=\" in URI parameter {pair:?}"))
        })?;
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        // libpq's JDBC-compatible spelling.
        if k == "ssl" && v == "true" {
            out.push(("sslmode", "require".into()));
        } else {
            out.push((known_key(&k)?, v));
        }
    }
    Ok(out)
}

fn percent_decode(text: &str) -> Result<String, ConnInfoError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ConnInfoError::Syntax(format!("invalid percent-encoding in URI part {text:?}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ConnInfoError::Syntax(format!("URI part {text:?} is not UTF-8")))
}

/// The effective user's name and home directory, as libpq finds them.
fn os_user() -> Option<(String, Option<PathBuf>)> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: getpwuid_r writes into `pwd` and `buf` (whose length it is given) and sets
    // `result` to `&pwd` or null; the strings it points to live in `buf`, read before it drops.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        let name = CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned();
        let home = (!pwd.pw_dir.is_null()).then(|| {
            PathBuf::from(std::ffi::OsStr::from_bytes(
                CStr::from_ptr(pwd.pw_dir).to_bytes(),
            ))
        });
        Some((name, home))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve_env(dbname: Option<&str>, env: &[(&str, &str)]) -> Result<ConnInfo, ConnInfoError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |k: &str| env.get(k).cloned();
        let cx = Context {
            env: &lookup,
            os_user: Some(("osuser".into(), Some("/home/osuser".into()))),
            default_socket: "/var/run/postgresql".into(),
        };
        ConnInfo::resolve_in(dbname, "walvault", &cx)
    }

    fn resolve(dbname: Option<&str>, env: &[(&str, &str)]) -> ConnInfo {
        resolve_env(dbname, env).unwrap()
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
        assert_eq!(t.shown(), "host=/tmp/sock port=5433 user=bob dbname=bob");
        let t = resolve(
            Some("host=db1 port=6000 dbname=app"),
            &[
                ("PGHOST", "/tmp/sock"),
                ("PGUSER", "bob"),
                ("PGDATABASE", "x"),
            ],
        );
        assert_eq!(t.shown(), "host=db1 port=6000 user=bob dbname=app");
        let t = resolve(Some("mydb"), &[("PGHOST", "h"), ("PGUSER", "u")]);
        assert_eq!(t.shown(), "host=h port=5432 user=u dbname=mydb");
        assert!(resolve_env(Some("host='unterminated"), &[]).is_err());
    }

    #[test]
    fn connection_string_beats_environment() {
        let p = resolve(
            Some("host=db.example port=6543 user=rep password=s3cret application_name=x"),
            &[
                ("PGHOST", "/tmp"),
                ("PGUSER", "other"),
                ("PGPASSWORD", "no"),
                ("PGAPPNAME", "envapp"),
            ],
        );
        assert_eq!(
            p.hosts,
            vec![HostSpec {
                host: Host::Tcp("db.example".into()),
                hostaddr: None,
                port: 6543
            }]
        );
        assert_eq!(p.user, "rep");
        assert_eq!(p.password(&p.hosts[0], "x").as_deref(), Some("s3cret"));
        assert_eq!(p.application_name, "x");
        assert!(!format!("{p:?}").contains("s3cret"));
    }

    #[test]
    fn environment_fills_the_gaps() {
        let p = resolve(
            None,
            &[("PGHOST", "/run/pg"), ("PGPORT", "5433"), ("USER", "me")],
        );
        assert_eq!(p.hosts[0].to_string(), "/run/pg/.s.PGSQL.5433");
        assert_eq!(p.application_name, "walvault");
        assert_eq!(p.password, None);
        let p = resolve(None, &[("PGAPPNAME", "envapp"), ("PGPASSWORD", "pw")]);
        assert_eq!(p.application_name, "envapp");
        assert_eq!(p.password.as_deref(), Some("pw"));
    }

    #[test]
    fn one_default_socket_and_the_os_user_when_nothing_is_set() {
        // $USER and $LOGNAME are not libpq's rule (they can lie after su); the OS user is.
        let p = resolve(None, &[("USER", "me"), ("LOGNAME", "me")]);
        assert_eq!(p.user, "osuser");
        assert_eq!(p.dbname, "osuser");
        assert_eq!(
            p.hosts,
            vec![HostSpec {
                host: Host::Unix("/var/run/postgresql".into()),
                hostaddr: None,
                port: 5432
            }]
        );
        let env = |_: &str| None;
        let cx = Context {
            env: &env,
            os_user: None,
            default_socket: "/tmp".into(),
        };
        assert!(matches!(
            ConnInfo::resolve_in(None, "w", &cx),
            Err(ConnInfoError::NoUser(_))
        ));
    }

    #[test]
    fn bad_values_name_their_variable_or_option() {
        for (dbname, env, named) in [
            (None, ("PGPORT", "54x"), "PGPORT"),
            (None, ("PGPORT", "0"), "PGPORT"),
            (Some("port=70000"), ("X", ""), "connection option port"),
            (None, ("PGSSLMODE", "verify"), "PGSSLMODE"),
            (None, ("PGCONNECT_TIMEOUT", "soon"), "PGCONNECT_TIMEOUT"),
            (None, ("PGHOSTADDR", "db.example"), "PGHOSTADDR"),
            (Some("channel_binding=maybe"), ("X", ""), "channel_binding"),
        ] {
            let err = resolve_env(dbname, &[env]).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
        let err = resolve_env(Some("host=h colour=blue"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"colour\""), "{err}");
        let err = resolve_env(Some("host=a,b,c port=1,2"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 ports for 3 hosts"), "{err}");
    }

    #[test]
    fn quoting_and_escapes_in_keyword_strings() {
        let p = resolve(
            Some(r"host = 'my host' user=a\ b dbname='it\'s' application_name=''"),
            &[],
        );
        assert_eq!(p.hosts[0].host, Host::Tcp("my host".into()));
        assert_eq!(p.user, "a b");
        assert_eq!(p.dbname, "it's");
        assert!(resolve_env(Some("user=a host"), &[]).is_err());
    }

    #[test]
    fn uris_are_understood() {
        let p = resolve(
            Some("postgresql://rep:p%40ss@db1:6000,[::1]:6001/app?sslmode=verify-full&connect_timeout=5"),
            &[],
        );
        assert_eq!(p.user, "rep");
        assert_eq!(p.password.as_deref(), Some("p@ss"));
        assert_eq!(p.dbname, "app");
        assert_eq!(
            p.hosts
                .iter()
                .map(|h| (h.host.clone(), h.port))
                .collect::<Vec<_>>(),
            vec![
                (Host::Tcp("db1".into()), 6000),
                (Host::Tcp("::1".into()), 6001)
            ]
        );
        assert_eq!(p.tls.mode, SslMode::VerifyFull);
        assert_eq!(p.connect_timeout, Duration::from_secs(5));
        let p = resolve(
            Some("postgres://%2Frun%2Fpg/db?ssl=true"),
            &[("PGUSER", "u")],
        );
        assert_eq!(p.hosts[0].host, Host::Unix("/run/pg".into()));
        assert_eq!(p.tls.mode, SslMode::Require);
        let p = resolve(Some("postgresql://"), &[("PGPORT", "7000")]);
        assert_eq!(p.hosts[0].port, 7000);
        assert!(resolve_env(Some("postgresql://h/db?bogus=1"), &[]).is_err());
        assert!(resolve_env(Some("postgresql://h/d%zz"), &[]).is_err());
    }

    #[test]
    fn hostaddr_connects_where_host_names() {
        let p = resolve(Some("host=db.example hostaddr=127.0.0.1"), &[]);
        assert_eq!(p.hosts[0].host, Host::Tcp("db.example".into()));
        assert_eq!(p.hosts[0].hostaddr, Some("127.0.0.1".parse().unwrap()));
        let p = resolve(None, &[("PGHOSTADDR", "10.0.0.1")]);
        assert_eq!(p.hosts[0].host, Host::Tcp("10.0.0.1".into()));
    }

    #[test]
    fn tls_settings_follow_libpq_defaults() {
        let p = resolve(None, &[]);
        assert_eq!(p.tls.mode, SslMode::Prefer);
        assert_eq!(
            p.tls.rootcert,
            Some(RootCert::File("/home/osuser/.postgresql/root.crt".into()))
        );
        assert_eq!(
            p.tls.key.as_deref(),
            Some(Path::new("/home/osuser/.postgresql/postgresql.key"))
        );
        let p = resolve(
            Some("sslmode=verify-ca sslcert=/c sslkey=/k"),
            &[
                ("HOME", "/h"),
                ("PGSSLROOTCERT", "/ca.pem"),
                ("PGSSLCRL", "/crl.pem"),
                ("PGSSLMODE", "disable"),
            ],
        );
        assert_eq!(p.tls.mode, SslMode::VerifyCa);
        assert_eq!(p.tls.rootcert, Some(RootCert::File("/ca.pem".into())));
        assert_eq!(p.tls.cert.as_deref(), Some(Path::new("/c")));
        assert_eq!(p.tls.crl.as_deref(), Some(Path::new("/crl.pem")));
        assert_eq!(p.passfile.as_deref(), Some(Path::new("/h/.pgpass")));
        let p = resolve(Some("sslrootcert=system"), &[]);
        assert_eq!(p.tls.mode, SslMode::VerifyFull);
        let err = resolve_env(Some("sslrootcert=system sslmode=require"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("verify-full"), "{err}");
    }

    /// Records the attempts `try_hosts` makes, failing each as `fail` says.
    async fn attempts(
        dbname: &str,
        fail: impl Fn(&HostSpec, Encryption) -> Option<(bool, bool)>,
    ) -> (Vec<(u16, Encryption)>, bool) {
        let p = resolve(Some(dbname), &[]);
        let mut seen = Vec::new();
        let result = p
            .try_hosts(async |host: &HostSpec, encryption| {
                seen.push((host.port, encryption));
                match fail(host, encryption) {
                    None => Ok(()),
                    Some((tls_failed, refused)) => Err(Failed {
                        error: (),
                        tls_failed,
                        refused,
                    }),
                }
            })
            .await;
        (seen, result.is_ok())
    }

    #[tokio::test]
    async fn hosts_and_tls_attempts_follow_libpq() {
        use Encryption::{Plain, Tls, TryTls};
        // prefer: in clear again only after a failed handshake.
        let (seen, ok) = attempts("host=h port=1 sslmode=prefer", |_, e| {
            (e == TryTls).then_some((true, false))
        })
        .await;
        assert_eq!((seen, ok), (vec![(1, TryTls), (1, Plain)], true));
        let (seen, ok) = attempts("host=h port=1", |_, _| Some((false, true))).await;
        assert_eq!((seen, ok), (vec![(1, TryTls)], false));
        // allow: with TLS after the server refused the connection in clear.
        let (seen, _) = attempts("host=h port=1 sslmode=allow", |_, e| {
            (e == Plain).then_some((false, true))
        })
        .await;
        assert_eq!(seen, vec![(1, Plain), (1, Tls)]);
        // require: one attempt per host, never in clear; the next host after a failure.
        let (seen, ok) = attempts("host=a,b port=1,2 sslmode=require", |h, _| {
            (h.port == 1).then_some((true, false))
        })
        .await;
        assert_eq!((seen, ok), (vec![(1, Tls), (2, Tls)], true));
        // A socket never uses TLS, whatever the mode.
        let (seen, _) = attempts("host=/run/pg port=3 sslmode=verify-full", |_, _| None).await;
        assert_eq!(seen, vec![(3, Plain)]);
    }

    #[test]
    fn connect_timeout_is_bounded_like_libpq() {
        let t = |v: &str| resolve(None, &[("PGCONNECT_TIMEOUT", v)]).connect_timeout;
        assert_eq!(t("1"), Duration::from_secs(2));
        assert_eq!(t("7"), Duration::from_secs(7));
        assert_eq!(t("0"), DEFAULT_CONNECT_TIMEOUT);
    }
}
