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
use walvault_wal::{Lsn, TimelineHistory, TimelineId, WalFileName};

use crate::pg::conninfo::ConnInfo;
use wire::{Backend, Wire};

/// Bound on one command's round trip (a replication command answers at once).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// SQLSTATEs the caller may want to tell apart.
pub(crate) mod sqlstate {
    pub(crate) const UNDEFINED_OBJECT: &str = "42704";
    pub(crate) const DUPLICATE_OBJECT: &str = "42710";
    /// Class 28, invalid authorization specification (wrong password, no pg_hba.conf entry).
    pub(crate) const AUTHORIZATION_CLASS: &str = "28";
    pub(crate) const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// "requested WAL segment ... has already been removed": a gap only an operator can handle.
    pub(crate) const UNDEFINED_FILE: &str = "58P01";
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplError {
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
    pub(crate) fn code(&self) -> Option<&str> {
        match self {
            ReplError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// What `IDENTIFY_SYSTEM` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SystemInfo {
    pub(crate) system_identifier: u64,
    pub(crate) timeline: TimelineId,
    /// The server's current WAL flush (or, on a standby, replay) position.
    pub(crate) xlogpos: Lsn,
}

/// A physical replication slot as `READ_REPLICATION_SLOT` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SlotInfo {
    pub(crate) restart_lsn: Option<Lsn>,
    pub(crate) restart_tli: Option<TimelineId>,
}

/// A slot name that is safe to put in a command: what PostgreSQL itself allows (lower-case
/// letters, digits and underscores, at most 63 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SlotName(String);

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
pub(crate) struct ReplicationConnection {
    wire: Wire,
    major: Option<u32>,
}

type Row = Vec<Option<Bytes>>;

impl ReplicationConnection {
    /// Connects and authenticates.
    pub(crate) async fn connect(params: &ConnInfo) -> Result<ReplicationConnection, ReplError> {
        let (wire, major) = Wire::connect(params).await?;
        Ok(ReplicationConnection { wire, major })
    }

    /// The server this connection reaches (`host:port` or a socket path).
    pub(crate) fn endpoint(&self) -> &str {
        &self.wire.endpoint
    }

    /// The server's major version, from its startup parameters.
    pub(crate) fn server_major(&self) -> Option<u32> {
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

    pub(crate) async fn identify_system(&mut self) -> Result<SystemInfo, ReplError> {
        let rows = self.command("IDENTIFY_SYSTEM").await?;
        let row = one_row(&rows, "IDENTIFY_SYSTEM")?;
        if let Some(db) = optional_column::<String>(row, 3, "dbname")? {
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
    pub(crate) async fn show(&mut self, name: &str) -> Result<String, ReplError> {
        let rows = self.command(&format!("SHOW {name}")).await?;
        column(one_row(&rows, "SHOW")?, 0, name)
    }

    /// `wal_segment_size` in bytes.
    pub(crate) async fn wal_segment_size(&mut self) -> Result<u64, ReplError> {
        let text = self.show("wal_segment_size").await?;
        parse_size(&text)
            .ok_or_else(|| ReplError::Protocol(format!("wal_segment_size {text:?} is not a size")))
    }

    /// `READ_REPLICATION_SLOT` (PostgreSQL 15+): `None` when the slot does not exist.
    pub(crate) async fn read_slot(
        &mut self,
        slot: &SlotName,
    ) -> Result<Option<SlotInfo>, ReplError> {
        let rows = self
            .command(&format!("READ_REPLICATION_SLOT {slot}"))
            .await?;
        let row = one_row(&rows, "READ_REPLICATION_SLOT")?;
        match optional_column::<String>(row, 0, "slot_type")? {
            Some(kind) if kind == "physical" => {}
            Some(kind) => {
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
    pub(crate) async fn create_physical_slot(
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

    /// `TIMELINE_HISTORY tli`: the history of `tli` and the file's content as the server sent
    /// it, once the name is `tli`'s and the content is a history PostgreSQL would write for it
    /// (at least one ancestor; timelines and switch points increasing, all older than `tli`).
    pub(crate) async fn timeline_history(
        &mut self,
        tli: TimelineId,
    ) -> Result<(TimelineHistory, Bytes), ReplError> {
        let rows = self.command(&format!("TIMELINE_HISTORY {}", tli.0)).await?;
        let row = one_row(&rows, "TIMELINE_HISTORY")?;
        let name: String = column(row, 0, "filename")?;
        let expected = WalFileName::History(tli).to_string();
        let bad = |problem: String| {
            ReplError::Protocol(format!(
                "TIMELINE_HISTORY {} returned an invalid history: {problem}",
                tli.0
            ))
        };
        if name != expected {
            return Err(bad(format!("file name {name:?}, expected {expected}")));
        }
        let Some(Some(content)) = row.get(1) else {
            return Err(bad("no content".into()));
        };
        // The reasons are free text in the server's encoding; the fields checked are ASCII.
        let history = TimelineHistory::parse(tli, &String::from_utf8_lossy(content))
            .map_err(|e| bad(e.to_string()))?;
        if history.entries.is_empty() {
            return Err(bad(format!(
                "{expected} names no parent timeline; PostgreSQL writes one line per ancestor"
            )));
        }
        Ok((history, content.clone()))
    }

    /// `START_REPLICATION SLOT slot PHYSICAL start TIMELINE tli`: the connection becomes a stream.
    pub(crate) async fn start_replication(
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
pub(crate) enum StreamEvent {
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

/// Backend messages as a server writes them, for tests that play the server.
#[cfg(test)]
pub(crate) mod fake {
    use bytes::{BufMut, BytesMut};

    pub(crate) fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// A DataRow, a CommandComplete and a ReadyForQuery: a command's whole answer.
    pub(crate) fn one_row(columns: &[Option<&[u8]>]) -> Vec<u8> {
        let mut row = BytesMut::new();
        row.put_i16(columns.len() as i16);
        for c in columns {
            match c {
                Some(v) => {
                    row.put_i32(v.len() as i32);
                    row.put_slice(v);
                }
                None => row.put_i32(-1),
            }
        }
        [
            message(b'D', &row),
            message(b'C', b"SELECT\0"),
            message(b'Z', b"I"),
        ]
        .concat()
    }

    /// CopyBothResponse, as START_REPLICATION answers.
    pub(crate) fn copy_both() -> Vec<u8> {
        message(b'W', &[0, 0, 0])
    }

    /// An XLogData message in a CopyData.
    pub(crate) fn xlog_data(start: u64, data: &[u8]) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_u8(b'w');
        body.put_u64(start);
        body.put_u64(start + data.len() as u64);
        body.put_i64(0);
        body.put_slice(data);
        message(b'd', &body)
    }
}

#[cfg(test)]
impl ReplicationConnection {
    /// A connection over any byte stream, already started up: tests play the server.
    pub(crate) fn over(
        socket: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        major: u32,
    ) -> ReplicationConnection {
        ReplicationConnection {
            wire: Wire::over(socket),
            major: Some(major),
        }
    }
}

/// A connection in COPY BOTH mode after `START_REPLICATION`.
pub(crate) struct WalStream {
    conn: ReplicationConnection,
    last_heard: tokio::time::Instant,
}

impl WalStream {
    /// When the server last sent anything.
    pub(crate) fn last_heard(&self) -> tokio::time::Instant {
        self.last_heard
    }

    /// The next event. Cancel-safe (a partly received message stays buffered), so it can race
    /// timers in `select!`; liveness is the caller's to check with [`WalStream::last_heard`].
    pub(crate) async fn recv(&mut self) -> Result<StreamEvent, ReplError> {
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
    pub(crate) async fn finish(
        mut self,
    ) -> Result<(Option<(TimelineId, Lsn)>, ReplicationConnection), ReplError> {
        let next = self.conn.finish_copy().await?;
        Ok((next, self.conn))
    }

    /// Sends a standby status update: `write` received, `flush` durable (what the slot may
    /// release and a synchronous commit may wait for). Apply is reported as invalid, as
    /// pg_receivewal does, since nothing replays here.
    pub(crate) async fn send_status(
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
        Some(Some(bytes)) => {
            let text = std::str::from_utf8(bytes).map_err(|_| {
                ReplError::Protocol(format!("column {name}: {bytes:?} is not UTF-8"))
            })?;
            text.parse().map(Some).map_err(|_| {
                ReplError::Protocol(format!("column {name}: unexpected value {text:?}"))
            })
        }
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

    /// What `timeline_history(3)` makes of a server's answer `(filename, content)`.
    async fn history_reply(name: &str, content: &[u8]) -> Result<Bytes, ReplError> {
        use tokio::io::AsyncWriteExt;
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut conn = ReplicationConnection::over(client, 15);
        server
            .write_all(&fake::one_row(&[Some(name.as_bytes()), Some(content)]))
            .await
            .unwrap();
        let reply = conn.timeline_history(TimelineId(3)).await;
        drop(server);
        reply.map(|(_, content)| content)
    }

    #[tokio::test]
    async fn timeline_histories_are_checked_before_use() {
        // The reason is the server's free text, in its encoding: kept byte for byte.
        let good = b"1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tat restore point \"\xE9t\xE9\"\n";
        assert_eq!(
            &history_reply("00000003.history", good).await.unwrap()[..],
            &good[..]
        );
        for (name, content, problem) in [
            (
                "00000002.history",
                &good[..],
                "file name \"00000002.history\"",
            ),
            ("../../x", &good[..], "file name"),
            (
                "00000003.history",
                b"2\t0/3000000\tr\n1\t0/4000000\tr\n",
                "must increase",
            ),
            (
                "00000003.history",
                b"1\t0/5000000\tr\n2\t0/4000000\tr\n",
                "is before switch point",
            ),
            (
                "00000003.history",
                b"1\t0/3000000\tr\n3\t0/4000000\tr\n",
                "not older",
            ),
            (
                "00000003.history",
                b"1\t0/zz\tr\n",
                "expected a switch point",
            ),
            ("00000003.history", b"", "names no parent timeline"),
        ] {
            let err = history_reply(name, content).await.unwrap_err().to_string();
            assert!(
                err.contains("TIMELINE_HISTORY 3 returned an invalid history")
                    && err.contains(problem),
                "{name} {content:?}: {err}"
            );
        }
    }
}
