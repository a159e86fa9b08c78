//! The byte level of a replication connection: the socket, TLS negotiation (SSLRequest, then
//! rustls with the SQL connection's configuration), message framing, the startup and
//! authentication exchange. postgres-protocol encodes and decodes the messages; the one it does
//! not know, CopyBothResponse (`W`), is recognised here. Used by the parent module only.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::backend::{AuthenticationSaslBody, ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ReplError;
use crate::pg::conninfo::{self, ConnInfo, Failed, Host, HostSpec};
use crate::pg::tls::{self, Encryption};

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

const COPY_BOTH_RESPONSE: u8 = b'W';

/// The longest backend message accepted, length word included. The largest message of a
/// replication connection is XLogData: walsender sends at most `MAX_SEND_SIZE` = 16 WAL pages
/// per message (128 KiB with the default 8 KiB `XLOG_BLCKSZ`, 1 MiB with the largest, 64 KiB,
/// that PostgreSQL can be built with), plus 25 bytes of headers. Everything else (rows of
/// replication commands, a timeline history, errors) is far smaller. Without a bound the
/// buffer grows to whatever length a server declares, up to 4 GiB.
const MAX_MESSAGE_LEN: usize = (1 << 20) + 1024;

/// A backend message, reduced to what the replication client acts on.
#[derive(Debug)]
pub(super) enum Backend {
    /// Column values as the server sent them; the caller decides how to read them.
    DataRow(Vec<Option<Bytes>>),
    RowDescription,
    CommandComplete,
    EmptyQuery,
    ReadyForQuery,
    Notice,
    Error(ReplError),
    CopyBoth,
    CopyData(Bytes),
    CopyDone,
    Other,
}

pub(super) struct Wire {
    socket: Box<dyn Socket>,
    buf: BytesMut,
    /// `tls-server-end-point` data when the connection is encrypted.
    channel_binding: Option<Vec<u8>>,
    /// The server this wire reaches, for messages.
    pub(super) endpoint: String,
}

/// Answer to an SSLRequest: TLS accepted.
const TLS_ACCEPTED: u8 = b'S';
/// Answer to an SSLRequest: no TLS here.
const TLS_REFUSED: u8 = b'N';

impl Wire {
    /// Opens the socket and runs the startup exchange, trying hosts and TLS as libpq does, each
    /// attempt within the connect timeout. Returns the wire and the server's major version.
    pub(super) async fn connect(info: &ConnInfo) -> Result<(Wire, Option<u32>), ReplError> {
        info.try_hosts(async |host, encryption| {
            let timeout = info.connect_timeout;
            let failed = |error: ReplError| Failed {
                tls_failed: matches!(error, ReplError::Tls { .. }),
                refused: matches!(error, ReplError::Server { .. }),
                error,
            };
            match tokio::time::timeout(timeout, Self::connect_unbounded(info, host, encryption))
                .await
            {
                Ok(result) => result.map_err(failed),
                Err(_) => Err(failed(ReplError::Timeout {
                    what: "connecting and authenticating",
                    after: timeout,
                })),
            }
        })
        .await
        .map_err(|last| {
            // ConnInfo always holds at least one host; this only keeps the function total.
            last.unwrap_or_else(|| ReplError::Config("no host to connect to".into()))
        })
    }

    async fn connect_unbounded(
        info: &ConnInfo,
        host: &HostSpec,
        encryption: Encryption,
    ) -> Result<(Wire, Option<u32>), ReplError> {
        let endpoint = host.to_string();
        let connect_err = |source| ReplError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let mut channel_binding = None;
        let socket: Box<dyn Socket> = match &host.host {
            Host::Tcp(name) => {
                let stream = match host.hostaddr {
                    Some(addr) => tokio::net::TcpStream::connect((addr, host.port)).await,
                    None => tokio::net::TcpStream::connect((name.as_str(), host.port)).await,
                }
                .map_err(connect_err)?;
                // Status updates are small and latency matters for synchronous commits.
                stream.set_nodelay(true).map_err(connect_err)?;
                if encryption == Encryption::Plain {
                    Box::new(stream)
                } else {
                    match negotiate_tls(stream, info, name, encryption, &endpoint).await? {
                        Ok(tls) => {
                            channel_binding = tls::server_end_point(tls.get_ref().1);
                            Box::new(tls)
                        }
                        Err(plain) => Box::new(plain),
                    }
                }
            }
            Host::Unix(dir) => Box::new(
                tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{}", host.port)))
                    .await
                    .map_err(connect_err)?,
            ),
        };
        let mut wire = Wire {
            socket,
            buf: BytesMut::with_capacity(64 * 1024),
            channel_binding,
            endpoint: endpoint.clone(),
        };
        let mut startup = vec![
            ("user", info.user.as_str()),
            ("replication", "true"),
            ("application_name", info.application_name.as_str()),
        ];
        if let Some(options) = &info.options {
            startup.push(("options", options.as_str()));
        }
        let mut out = BytesMut::new();
        frontend::startup_message(startup, &mut out)?;
        wire.send(out).await?;
        // A PostgreSQL server answers a startup message with an authentication request, an error
        // or a protocol negotiation. Anything else is another kind of server, and waiting for a
        // message length it never meant would only end in a timeout.
        wire.fill().await?;
        if !matches!(wire.buf.first(), Some(b'R' | b'E' | b'v' | b'N')) {
            let head = String::from_utf8_lossy(&wire.buf[..wire.buf.len().min(16)]).into_owned();
            return Err(ReplError::Protocol(format!(
                "{endpoint} answered the startup message with {head:?}"
            )));
        }
        // Physical replication connections match `replication` in the password file, as
        // libpq's do.
        let password = info.password(host, "replication");
        wire.authenticate(info, password.as_deref()).await?;
        let mut major = None;
        loop {
            match wire.next_message().await? {
                Message::ReadyForQuery(_) => return Ok((wire, major)),
                Message::ParameterStatus(p) if p.name()? == "server_version" => {
                    major = p
                        .value()?
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|m| m.parse().ok());
                }
                Message::ErrorResponse(e) => return Err(server_error(&e)),
                _ => {}
            }
        }
    }

    /// Answers the server's authentication requests until it accepts or refuses.
    async fn authenticate(
        &mut self,
        info: &ConnInfo,
        password: Option<&str>,
    ) -> Result<(), ReplError> {
        let creds = Credentials { info, password };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let mut out = BytesMut::new();
            match self.next_message().await? {
                Message::AuthenticationOk if creds.require_binding() && scram.is_none() => {
                    return Err(unbound())
                }
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword
                | Message::AuthenticationMd5Password(_)
                    if creds.require_binding() =>
                {
                    return Err(unbound())
                }
                Message::AuthenticationCleartextPassword => creds.cleartext(&mut out)?,
                Message::AuthenticationMd5Password(body) => creds.md5(body.salt(), &mut out)?,
                Message::AuthenticationSasl(body) => {
                    let tls_binding = self.channel_binding.clone();
                    scram = Some(creds.scram_start(&body, tls_binding, &mut out)?);
                }
                Message::AuthenticationSaslContinue(body) => {
                    scram_continue(scram.as_mut(), body.data(), &mut out)?
                }
                Message::AuthenticationSaslFinal(body) => {
                    scram_finish(scram.as_mut(), body.data())?;
                    continue;
                }
                Message::ErrorResponse(e) => return Err(server_error(&e)),
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(ReplError::Auth(
                        "the server asks for an authentication method walvault does not support \
                         (use trust, md5 or scram-sha-256 for replication in pg_hba.conf)"
                            .into(),
                    ))
                }
                _ => {
                    return Err(ReplError::Protocol(
                        "unexpected message during authentication".into(),
                    ))
                }
            }
            self.send(out).await?;
        }
    }

    pub(super) async fn send_query(&mut self, sql: &str) -> Result<(), ReplError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.send(out).await
    }

    pub(super) async fn send_copy_data(&mut self, body: Bytes) -> Result<(), ReplError> {
        let mut out = BytesMut::with_capacity(body.len() + 5);
        frontend::CopyData::new(body)?.write(&mut out);
        self.send(out).await
    }

    pub(super) async fn send_copy_done(&mut self) -> Result<(), ReplError> {
        let mut out = BytesMut::with_capacity(5);
        frontend::copy_done(&mut out);
        self.send(out).await
    }

    async fn send(&mut self, out: BytesMut) -> Result<(), ReplError> {
        self.socket.write_all(&out).await?;
        self.socket.flush().await?;
        Ok(())
    }

    /// The next message within `timeout`.
    pub(super) async fn recv(
        &mut self,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Backend, ReplError> {
        tokio::time::timeout(timeout, self.recv_any())
            .await
            .map_err(|_| ReplError::Timeout {
                what,
                after: timeout,
            })?
    }

    /// The next message, however long it takes. Cancel-safe: bytes read so far stay in `buf`.
    pub(super) async fn recv_any(&mut self) -> Result<Backend, ReplError> {
        // postgres-protocol does not know CopyBothResponse; take it off the buffer here.
        loop {
            check_length(&self.buf)?;
            if self.buf.len() >= 5 && self.buf[0] == COPY_BOTH_RESPONSE {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let total = len as usize + 1;
                if self.buf.len() >= total {
                    let _ = self.buf.split_to(total);
                    return Ok(Backend::CopyBoth);
                }
            } else if let Some(message) =
                Message::parse(&mut self.buf).map_err(|e| ReplError::Protocol(e.to_string()))?
            {
                return backend(message);
            }
            self.fill().await?;
        }
    }

    /// A message during startup, where postgres-protocol's own types are what we need.
    async fn next_message(&mut self) -> Result<Message, ReplError> {
        loop {
            check_length(&self.buf)?;
            if let Some(message) =
                Message::parse(&mut self.buf).map_err(|e| ReplError::Protocol(e.to_string()))?
            {
                return Ok(message);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), ReplError> {
        self.buf.reserve(64 * 1024);
        if self.socket.read_buf(&mut self.buf).await? == 0 {
            return Err(ReplError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )));
        }
        Ok(())
    }
}

/// What the authentication exchange answers with: the user, the password if there is one, the
/// channel binding rule.
struct Credentials<'a> {
    info: &'a ConnInfo,
    password: Option<&'a str>,
}

impl Credentials<'_> {
    fn require_binding(&self) -> bool {
        self.info.channel_binding == conninfo::ChannelBinding::Require
    }

    fn password(&self) -> Result<&[u8], ReplError> {
        self.password.map(str::as_bytes).ok_or_else(|| {
            ReplError::Auth(format!(
                "the server asks user {} for a password; put it in a password file \
                 (~/.pgpass, PGPASSFILE or passfile=) or set PGPASSWORD",
                self.info.user
            ))
        })
    }

    fn cleartext(&self, out: &mut BytesMut) -> Result<(), ReplError> {
        frontend::password_message(self.password()?, out)?;
        Ok(())
    }

    fn md5(&self, salt: [u8; 4], out: &mut BytesMut) -> Result<(), ReplError> {
        let hash = md5_hash(self.info.user.as_bytes(), self.password()?, salt);
        frontend::password_message(hash.as_bytes(), out)?;
        Ok(())
    }

    /// Chooses SCRAM-SHA-256-PLUS when the connection is encrypted (`tls_binding`), the server
    /// offers it and channel binding is not disabled, else SCRAM-SHA-256; writes the first
    /// message.
    fn scram_start(
        &self,
        body: &AuthenticationSaslBody,
        tls_binding: Option<Vec<u8>>,
        out: &mut BytesMut,
    ) -> Result<ScramSha256, ReplError> {
        let mut offered = Vec::new();
        let mut mechanisms = body.mechanisms();
        while let Some(m) = mechanisms.next()? {
            offered.push(m.to_owned());
        }
        let binding =
            tls_binding.filter(|_| self.info.channel_binding != conninfo::ChannelBinding::Disable);
        let plus = offered.iter().any(|m| m == SCRAM_SHA_256_PLUS);
        let plain = offered.iter().any(|m| m == SCRAM_SHA_256);
        let (binding, mechanism) = match binding {
            Some(data) if plus => (
                ChannelBinding::tls_server_end_point(data),
                SCRAM_SHA_256_PLUS,
            ),
            // We could bind, the server does not offer it.
            Some(_) if plain => (ChannelBinding::unrequested(), SCRAM_SHA_256),
            None if plain => (ChannelBinding::unsupported(), SCRAM_SHA_256),
            _ => {
                return Err(ReplError::Auth(format!(
                    "the server offers SASL mechanisms {offered:?}, none of them \
                     one walvault can use here"
                )))
            }
        };
        if self.require_binding() && mechanism != SCRAM_SHA_256_PLUS {
            return Err(unbound());
        }
        let scram = ScramSha256::new(self.password()?, binding);
        frontend::sasl_initial_response(mechanism, scram.message(), out)?;
        Ok(scram)
    }
}

fn unbound() -> ReplError {
    ReplError::Auth(
        "channel_binding=require, but the server did not authenticate with SCRAM \
         channel binding"
            .into(),
    )
}

fn scram_continue(
    scram: Option<&mut ScramSha256>,
    data: &[u8],
    out: &mut BytesMut,
) -> Result<(), ReplError> {
    let scram =
        scram.ok_or_else(|| ReplError::Protocol("SASL continue before SASL start".into()))?;
    scram
        .update(data)
        .map_err(|e| ReplError::Auth(format!("SCRAM: {e}")))?;
    frontend::sasl_response(scram.message(), out)?;
    Ok(())
}

fn scram_finish(scram: Option<&mut ScramSha256>, data: &[u8]) -> Result<(), ReplError> {
    let scram = scram.ok_or_else(|| ReplError::Protocol("SASL final before SASL start".into()))?;
    scram
        .finish(data)
        .map_err(|e| ReplError::Auth(format!("the server's SCRAM signature is wrong: {e}")))
}

/// Refuses a message whose declared length is impossible, as soon as its header is in the
/// buffer and before its body is read.
fn check_length(buf: &[u8]) -> Result<(), ReplError> {
    let Some(&[kind, a, b, c, d]) = buf.first_chunk::<5>() else {
        return Ok(());
    };
    let len = u32::from_be_bytes([a, b, c, d]);
    if len < 4 || len as usize > MAX_MESSAGE_LEN {
        return Err(ReplError::Protocol(format!(
            "message {:?} declares {len} bytes; a PostgreSQL message has 4 to {MAX_MESSAGE_LEN}",
            char::from(kind)
        )));
    }
    Ok(())
}

type TlsSocket = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Sends an SSLRequest and, if the server agrees, runs the TLS handshake. `Ok(Err(stream))` is
/// the plain stream when the server has no TLS and `encryption` allows going on without it;
/// with [`Encryption::Tls`] that is an error, raised before the password could be sent.
async fn negotiate_tls(
    mut stream: tokio::net::TcpStream,
    info: &ConnInfo,
    host: &str,
    encryption: Encryption,
    endpoint: &str,
) -> Result<Result<TlsSocket, tokio::net::TcpStream>, ReplError> {
    let tls_error = |reason: String| ReplError::Tls {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let config = info
        .tls
        .client_config()
        .map_err(|e| tls_error(e.to_string()))?;
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    stream.write_all(&out).await?;
    let mut answer = [0u8];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        TLS_ACCEPTED => match tls::handshake(config, host, stream).await {
            Ok(tls) => Ok(Ok(tls)),
            Err(e) if tls::is_tls_failure(&e) => Err(tls_error(format!(
                "{e} (sslmode={})",
                info.tls.mode.as_str()
            ))),
            // A connection broken mid-handshake is worth another try, unlike a bad certificate.
            Err(e) => Err(ReplError::Io(e)),
        },
        TLS_REFUSED if encryption == Encryption::TryTls => Ok(Err(stream)),
        TLS_REFUSED => Err(tls_error(format!(
            "the server does not accept TLS connections, and sslmode={} forbids connecting \
             without",
            info.tls.mode.as_str()
        ))),
        other => Err(ReplError::Protocol(format!(
            "{endpoint} answered the TLS request with {:?}",
            char::from(other)
        ))),
    }
}

fn backend(message: Message) -> Result<Backend, ReplError> {
    Ok(match message {
        Message::DataRow(row) => {
            let buf = row.buffer();
            let mut values = Vec::new();
            let mut ranges = row.ranges();
            while let Some(range) = ranges.next()? {
                values.push(range.map(|r| Bytes::copy_from_slice(&buf[r])));
            }
            Backend::DataRow(values)
        }
        Message::RowDescription(_) => Backend::RowDescription,
        Message::CommandComplete(_) => Backend::CommandComplete,
        Message::EmptyQueryResponse => Backend::EmptyQuery,
        Message::ReadyForQuery(_) => Backend::ReadyForQuery,
        Message::NoticeResponse(_) | Message::ParameterStatus(_) => Backend::Notice,
        Message::ErrorResponse(e) => Backend::Error(server_error(&e)),
        Message::CopyData(body) => Backend::CopyData(body.into_bytes()),
        Message::CopyDone => Backend::CopyDone,
        _ => Backend::Other,
    })
}

fn server_error(body: &ErrorResponseBody) -> ReplError {
    let (mut severity, mut code, mut message, mut detail) =
        (String::new(), String::new(), String::new(), None);
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            _ => {}
        }
    }
    ReplError::Server {
        severity,
        code,
        message,
        detail,
    }
}

#[cfg(test)]
impl Wire {
    /// A wire over any byte stream: tests play the server on the other end.
    pub(super) fn over(socket: impl AsyncRead + AsyncWrite + Unpin + Send + 'static) -> Wire {
        Wire {
            socket: Box::new(socket),
            buf: BytesMut::new(),
            channel_binding: None,
            endpoint: "test server".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A declared length beyond the bound is refused at once, naming the message and the
    /// length, instead of buffering what the server sends until the length is reached.
    #[tokio::test]
    async fn oversized_messages_are_refused_before_their_body() {
        for (kind, len) in [
            (b'd', 0x7FFF_FFFFu32),
            (b'D', (MAX_MESSAGE_LEN + 1) as u32),
            (b'W', 3),
        ] {
            let (client, mut server) = tokio::io::duplex(1 << 16);
            let mut wire = Wire::over(client);
            let mut message = vec![kind];
            message.extend_from_slice(&len.to_be_bytes());
            message.extend_from_slice(&[0; 1000]);
            server.write_all(&message).await.unwrap();
            // The server keeps the connection open, as one that streams more would.
            let err = wire
                .recv(Duration::from_secs(5), "a test message")
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!(
                    "message {:?} declares {len} bytes",
                    char::from(kind)
                )),
                "{err}"
            );
            drop(server);
        }
    }

    #[tokio::test]
    async fn the_largest_xlogdata_passes() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut wire = Wire::over(client);
        let body = vec![7u8; MAX_MESSAGE_LEN - 4];
        let mut out = BytesMut::new();
        frontend::CopyData::new(&body[..]).unwrap().write(&mut out);
        tokio::spawn(async move { server.write_all(&out).await });
        match wire
            .recv(Duration::from_secs(5), "a test message")
            .await
            .unwrap()
        {
            Backend::CopyData(data) => assert_eq!(data.len(), body.len()),
            other => panic!("{other:?}"),
        }
    }
}
