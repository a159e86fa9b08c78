//! A client for PostgreSQL's physical streaming replication protocol, on tokio.
//!
//! It understands the startup handshake with `replication=true` (over TLS as `sslmode` asks, see
//! `crate::pg::tls`), authentication (trust, cleartext, md5 and SCRAM-SHA-256 with channel
//! binding, through postgres-protocol), the replication commands walvault needs
//! (`IDENTIFY_SYSTEM`, `SHOW`, `READ_REPLICATION_SLOT`, `CREATE_REPLICATION_SLOT ... PHYSICAL`,
//! `TIMELINE_HISTORY`, `START_REPLICATION SLOT ... PHYSICAL`) and, once streaming, XLogData and
//! keepalive messages, standby status updates and the end of a timeline. Every network wait is
//! bounded by a timeout. It knows nothing about repositories or archiving: `wal-receive`
//! (`crate::receive`) drives it.

mod wire;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use walvault_wal::{Lsn, TimelineId};

use crate::pg::conninfo::ConnInfo;
use wire::{Backend, Wire};

/// Bound on one command's round trip (a replication command answers at once).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// SQLSTATEs the caller may want to tell apart.
pub mod sqlstate {
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const DUPLICATE_OBJECT: &str = "42710";
    /// Class 28, invalid authorization specification (wrong password, no pg_hba.conf entry).
    pub const AUTHORIZATION_CLASS: &str = "28";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// "requested WAL segment ... has already been removed": a gap only an operator can handle.
    pub const UNDEFINED_FILE: &str = "58P01";
}

#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("{0}")]
    Config(String),
    #[error("PostgreSQL at {endpoint}: TLS: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("cannot connect to PostgreSQL at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to PostgreSQL lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL did not answer within {after:?} ({what})")]
    Timeout { what: &'static str, after: Duration },
    #[error("PostgreSQL: {severity} {code}: {message}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
    },
    #[error("authentication: {0}")]
    Auth(String),
    #[error("unexpected reply from the server (is it PostgreSQL?): {0}")]
    Protocol(String),
}

impl ReplError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// What `IDENTIFY_SYSTEM` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_identifier: u64,
    pub timeline: TimelineId,
    /// The server's current WAL flush (or, on a standby, replay) position.
    pub xlogpos: Lsn,
}

/// A physical replication slot as `READ_REPLICATION_SLOT` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub restart_lsn: Option<Lsn>,
    pub restart_tli: Option<TimelineId>,
}

/// A slot name that is safe to put in a command: what PostgreSQL itself allows (lower-case
/// letters, digits and underscores, at most 63 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotName(String);

impl std::str::FromStr for SlotName {
    type Err = String;

    fn from_str(s: &str) -> Result<SlotName, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(SlotName(s.to_owned()))
        } else {
            Err(format!(
                "invalid slot name {s:?}: use 1 to 63 lower-case letters, digits and underscores"
            ))
        }
    }
}

impl std::fmt::Display for SlotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connection in replication mode, before streaming.
pub struct ReplicationConnection {
    wire: Wire,
    major: Option<u32>,
}

type Row = Vec<Option<String>>;

impl ReplicationConnection {
    /// Connects and authenticates.
    pub async fn connect(params: &ConnInfo) -> Result<ReplicationConnection, ReplError> {
        let (wire, major) = Wire::connect(params).await?;
        Ok(ReplicationConnection { wire, major })
    }

    /// The server this connection reaches (`host:port` or a socket path).
    pub fn endpoint(&self) -> &str {
        &self.wire.endpoint
    }

    /// The server's major version, from its startup parameters.
    pub fn server_major(&self) -> Option<u32> {
        self.major
    }

    /// Runs one command; returns its rows (text columns, `None` for NULL).
    async fn command(&mut self, sql: &str) -> Result<Vec<Row>, ReplError> {
        tracing::debug!("replication command: {sql}");
        self.wire.send_query(sql).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self
                .wire
                .recv(COMMAND_TIMEOUT, "a replication command")
                .await?
            {
                Backend::DataRow(row) => rows.push(row),
                Backend::Error(e) => error = Some(e),
                Backend::ReadyForQuery => break,
                Backend::RowDescription
                | Backend::CommandComplete
                | Backend::Notice
                | Backend::EmptyQuery => {}
                other => {
                    return Err(ReplError::Protocol(format!(
                        "{other:?} in reply to {sql:?}"
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplError> {
        let rows = self.command("IDENTIFY_SYSTEM").await?;
        let row = one_row(&rows, "IDENTIFY_SYSTEM")?;
        if let Some(Some(db)) = row.get(3) {
            return Err(ReplError::Protocol(format!(
                "IDENTIFY_SYSTEM reports database {db:?}: this is a logical replication connection"
            )));
        }
        Ok(SystemInfo {
            system_identifier: column(row, 0, "systemid")?,
            timeline: TimelineId(column(row, 1, "timeline")?),
            xlogpos: column(row, 2, "xlogpos")?,
        })
    }

    /// `SHOW name` (allowed on replication connections since PostgreSQL 10).
    pub async fn show(&mut self, name: &str) -> Result<String, ReplError> {
        let rows = self.command(&format!("SHOW {name}")).await?;
        column(one_row(&rows, "SHOW")?, 0, name)
    }

    /// `wal_segment_size` in bytes.
    pub async fn wal_segment_size(&mut self) -> Result<u64, ReplError> {
        let text = self.show("wal_segment_size").await?;
        parse_size(&text)
            .ok_or_else(|| ReplError::Protocol(format!("wal_segment_size {text:?} is not a size")))
    }

    /// `READ_REPLICATION_SLOT` (PostgreSQL 15+): `None` when the slot does not exist.
    pub async fn read_slot(&mut self, slot: &SlotName) -> Result<Option<SlotInfo>, ReplError> {
        let rows = self
            .command(&format!("READ_REPLICATION_SLOT {slot}"))
            .await?;
        let row = one_row(&rows, "READ_REPLICATION_SLOT")?;
        match row.first() {
            Some(Some(kind)) if kind == "physical" => {}
            Some(Some(kind)) => {
                return Err(ReplError::Config(format!(
                    "replication slot {slot} is a {kind} slot; wal-receive needs a physical one"
                )))
            }
            _ => return Ok(None),
        }
        Ok(Some(SlotInfo {
            restart_lsn: optional_column(row, 1, "restart_lsn")?,
            restart_tli: optional_column::<u32>(row, 2, "restart_tli")?.map(TimelineId),
        }))
    }

    /// Creates a physical slot that reserves WAL from now on; returns where it starts holding
    /// WAL (`consistent_point`).
    pub async fn create_physical_slot(
        &mut self,
        slot: &SlotName,
    ) -> Result<Option<Lsn>, ReplError> {
        // PostgreSQL 15 introduced the parenthesised option list; older servers take a keyword.
        let sql = match self.server_major() {
            Some(major) if major < 15 => {
                format!("CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL")
            }
            _ => format!("CREATE_REPLICATION_SLOT {slot} PHYSICAL (RESERVE_WAL)"),
        };
        let rows = self.command(&sql).await?;
        optional_column(
            one_row(&rows, "CREATE_REPLICATION_SLOT")?,
            1,
            "consistent_point",
        )
    }

    /// `TIMELINE_HISTORY tli`: the history file's name and content.
    pub async fn timeline_history(
        &mut self,
        tli: TimelineId,
    ) -> Result<(String, Vec<u8>), ReplError> {
        let rows = self.command(&format!("TIMELINE_HISTORY {}", tli.0)).await?;
        let row = one_row(&rows, "TIMELINE_HISTORY")?;
        let name: String = column(row, 0, "filename")?;
        let content: String = column(row, 1, "content")?;
        Ok((name, content.into_bytes()))
    }

    /// `START_REPLICATION SLOT slot PHYSICAL start TIMELINE tli`: the connection becomes a stream.
    pub async fn start_replication(
        mut self,
        slot: &SlotName,
        start: Lsn,
        tli: TimelineId,
    ) -> Result<WalStream, ReplError> {
        let sql = format!(
            "START_REPLICATION SLOT {slot} PHYSICAL {start} TIMELINE {}",
            tli.0
        );
        tracing::debug!("replication command: {sql}");
        self.wire.send_query(&sql).await?;
        loop {
            match self.wire.recv(COMMAND_TIMEOUT, "START_REPLICATION").await? {
                Backend::CopyBoth => break,
                Backend::Notice => {}
                Backend::Error(e) => {
                    // Drain to ReadyForQuery so the message is complete, then report.
                    let _ = self.wire.recv(COMMAND_TIMEOUT, "START_REPLICATION").await;
                    return Err(e);
                }
                other => {
                    return Err(ReplError::Protocol(format!(
                        "{other:?} in reply to START_REPLICATION"
                    )))
                }
            }
        }
        Ok(WalStream {
            conn: self,
            last_heard: tokio::time::Instant::now(),
        })
    }
}

/// What the server sends while streaming.
#[derive(Debug)]
pub enum StreamEvent {
    /// WAL bytes starting at `start`; `server_end` is the server's current end of WAL.
    XLogData {
        start: Lsn,
        server_end: Lsn,
        data: Bytes,
    },
    Keepalive {
        server_end: Lsn,
        reply_requested: bool,
    },
    /// The server ended the timeline: call [`WalStream::finish`] to learn where the next one
    /// starts.
    End,
    /// The server is shutting down: it sent everything and saw it flushed, then ended the
    /// command without leaving COPY mode (walsender's `WalSndDone`).
    Shutdown,
}

/// A connection in COPY BOTH mode after `START_REPLICATION`.
pub struct WalStream {
    conn: ReplicationConnection,
    last_heard: tokio::time::Instant,
}

impl WalStream {
    /// When the server last sent anything.
    pub fn last_heard(&self) -> tokio::time::Instant {
        self.last_heard
    }

    /// The next event. Cancel-safe (a partly received message stays buffered), so it can race
    /// timers in `select!`; liveness is the caller's to check with [`WalStream::last_heard`].
    pub async fn recv(&mut self) -> Result<StreamEvent, ReplError> {
        loop {
            let message = self.conn.wire.recv_any().await?;
            self.last_heard = tokio::time::Instant::now();
            match message {
                Backend::CopyData(mut body) => return parse_copy_data(&mut body),
                Backend::CopyDone => return Ok(StreamEvent::End),
                Backend::CommandComplete => return Ok(StreamEvent::Shutdown),
                Backend::Notice => {}
                Backend::Error(e) => return Err(e),
                other => {
                    return Err(ReplError::Protocol(format!(
                        "{other:?} while streaming WAL"
                    )))
                }
            }
        }
    }

    /// After [`StreamEvent::End`]: answers the server's CopyDone and reads where streaming goes
    /// on: `Some((next timeline, its start))`, or `None` when the server is shutting down. The
    /// connection is back in command mode.
    pub async fn finish(
        mut self,
    ) -> Result<(Option<(TimelineId, Lsn)>, ReplicationConnection), ReplError> {
        let next = self.conn.finish_copy().await?;
        Ok((next, self.conn))
    }

    /// Sends a standby status update: `write` received, `flush` durable (what the slot may
    /// release and a synchronous commit may wait for). Apply is reported as invalid, as
    /// pg_receivewal does, since nothing replays here.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplError> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(write.0);
        body.put_u64(flush.0);
        body.put_u64(0);
        body.put_i64(pg_now());
        body.put_u8(u8::from(reply_requested));
        tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.conn.wire.send_copy_data(body.freeze()),
        )
        .await
        .map_err(|_| ReplError::Timeout {
            what: "sending a status update",
            after: COMMAND_TIMEOUT,
        })?
    }
}

impl ReplicationConnection {
    /// After the server's CopyDone: answers with CopyDone and reads the next timeline, if any.
    async fn finish_copy(&mut self) -> Result<Option<(TimelineId, Lsn)>, ReplError> {
        self.wire.send_copy_done().await?;
        let mut next = None;
        loop {
            match self
                .wire
                .recv(COMMAND_TIMEOUT, "the end of a timeline")
                .await?
            {
                Backend::DataRow(row) => {
                    next = Some((
                        TimelineId(column(&row, 0, "next_tli")?),
                        column(&row, 1, "next_tli_startpos")?,
                    ))
                }
                Backend::ReadyForQuery => return Ok(next),
                Backend::Error(e) => return Err(e),
                // Data still in flight from before our CopyDone is no longer wanted.
                Backend::CopyData(_)
                | Backend::RowDescription
                | Backend::CommandComplete
                | Backend::Notice => {}
                other => {
                    return Err(ReplError::Protocol(format!(
                        "{other:?} at the end of a timeline"
                    )))
                }
            }
        }
    }
}

fn parse_copy_data(body: &mut Bytes) -> Result<StreamEvent, ReplError> {
    let short = || ReplError::Protocol("truncated message in the WAL stream".into());
    if body.is_empty() {
        return Err(short());
    }
    match body.get_u8() {
        b'w' => {
            if body.len() < 24 {
                return Err(short());
            }
            let start = Lsn(body.get_u64());
            let server_end = Lsn(body.get_u64());
            let _send_time = body.get_i64();
            Ok(StreamEvent::XLogData {
                start,
                server_end,
                data: std::mem::take(body),
            })
        }
        b'k' => {
            if body.len() < 17 {
                return Err(short());
            }
            let server_end = Lsn(body.get_u64());
            let _send_time = body.get_i64();
            Ok(StreamEvent::Keepalive {
                server_end,
                reply_requested: body.get_u8() != 0,
            })
        }
        other => Err(ReplError::Protocol(format!(
            "unknown message {:?} in the WAL stream",
            char::from(other)
        ))),
    }
}

/// Microseconds since 2000-01-01, PostgreSQL's timestamp epoch.
fn pg_now() -> i64 {
    const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    now - PG_EPOCH_OFFSET_US
}

fn one_row<'a>(rows: &'a [Row], command: &str) -> Result<&'a Row, ReplError> {
    match rows {
        [row] => Ok(row),
        _ => Err(ReplError::Protocol(format!(
            "{command} returned {} rows, expected 1",
            rows.len()
        ))),
    }
}

fn optional_column<T: std::str::FromStr>(
    row: &Row,
    index: usize,
    name: &str,
) -> Result<Option<T>, ReplError> {
    match row.get(index) {
        Some(Some(text)) => text
            .parse()
            .map(Some)
            .map_err(|_| ReplError::Protocol(format!("column {name}: unexpected value {text:?}"))),
        Some(None) => Ok(None),
        None => Err(ReplError::Protocol(format!("column {name} missing"))),
    }
}

fn column<T: std::str::FromStr>(row: &Row, index: usize, name: &str) -> Result<T, ReplError> {
    optional_column(row, index, name)?
        .ok_or_else(|| ReplError::Protocol(format!("column {name} is NULL")))
}

/// `16MB`, `1GB`, `512kB` (as SHOW prints sizes) in bytes.
fn parse_size(text: &str) -> Option<u64> {
    let digits = text
        .trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text.trim()[digits.len()..];
    let n: u64 = digits.parse().ok()?;
    let factor = match unit {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_show_prints_them() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("512kB"), Some(512 << 10));
        assert_eq!(parse_size("16 apples"), None);
    }

    #[test]
    fn slot_names_are_checked() {
        assert!("walvault_1".parse::<SlotName>().is_ok());
        for bad in ["", "Upper", "a b", "x;DROP", &"a".repeat(64)] {
            assert!(bad.parse::<SlotName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn copy_data_messages_parse() {
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(0x1000);
        w.put_u64(0x2000);
        w.put_i64(0);
        w.put_slice(b"wal");
        match parse_copy_data(&mut w.freeze()).unwrap() {
            StreamEvent::XLogData {
                start,
                server_end,
                data,
            } => {
                assert_eq!((start, server_end), (Lsn(0x1000), Lsn(0x2000)));
                assert_eq!(&data[..], b"wal");
            }
            other => panic!("{other:?}"),
        }
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x3000);
        k.put_i64(0);
        k.put_u8(1);
        assert!(matches!(
            parse_copy_data(&mut k.freeze()).unwrap(),
            StreamEvent::Keepalive {
                server_end: Lsn(0x3000),
                reply_requested: true
            }
        ));
        let mut bad = Bytes::from_static(b"w\0\0");
        assert!(parse_copy_data(&mut bad).is_err());
    }
}
