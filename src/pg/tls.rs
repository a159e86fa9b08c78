//! TLS for both PostgreSQL connections, with libpq's `sslmode` semantics, on rustls.
//!
//! `require` encrypts without checking the certificate unless a root certificate file exists
//! (then it checks the chain, as libpq does); `verify-ca` checks the chain, `verify-full` the
//! chain and the host name. One [`ClientConfig`] serves tokio-postgres (through [`MakeRustls`])
//! and the replication client (through [`handshake`]). Unix sockets never use TLS, as in libpq.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conninfo::{Host, HostSpec};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::str::FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(
                    "expected disable, allow, prefer, require, verify-ca or verify-full".into(),
                )
            }
        })
    }
}

/// Where trusted root certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the system's trust store.
    System,
}

/// The TLS part of a connection's settings; paths are `None` only without a home directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub(crate) mode: SslMode,
    pub(crate) rootcert: Option<RootCert>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) crl: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct TlsError(pub(crate) String);

/// How one connection attempt treats TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encryption {
    Plain,
    /// Ask for TLS; go on in clear if the server has none.
    TryTls,
    /// Ask for TLS; fail before anything else is sent if the server has none.
    Tls,
}

/// When a second attempt follows a failed first one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// `prefer`: the TLS handshake itself failed.
    AfterTlsFailure,
    /// `allow`: the server refused the connection in clear.
    AfterServerRefusal,
}

/// How strictly the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

impl TlsSettings {
    /// The attempts libpq makes for this mode against `host`, in order.
    pub(crate) fn attempts(&self, host: &HostSpec) -> (Encryption, Option<(Retry, Encryption)>) {
        if matches!(host.host, Host::Unix(_)) {
            return (Encryption::Plain, None);
        }
        match self.mode {
            SslMode::Disable => (Encryption::Plain, None),
            SslMode::Allow => (
                Encryption::Plain,
                Some((Retry::AfterServerRefusal, Encryption::Tls)),
            ),
            SslMode::Prefer => (
                Encryption::TryTls,
                Some((Retry::AfterTlsFailure, Encryption::Plain)),
            ),
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => (Encryption::Tls, None),
        }
    }

    fn check(&self) -> Check {
        match self.mode {
            SslMode::VerifyFull => Check::ChainAndName,
            SslMode::VerifyCa => Check::Chain,
            // libpq checks the chain in the weaker modes too when a root certificate file exists.
            _ => match &self.rootcert {
                Some(RootCert::File(path)) if path.exists() => Check::Chain,
                _ => Check::Nothing,
            },
        }
    }

    /// The rustls configuration for this mode: roots, revocation lists and client certificate
    /// are read from their files now, so a changed file is seen at the next connection.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let check = self.check();
        let verifier = Verifier {
            chain: match check {
                Check::Nothing => None,
                Check::Chain | Check::ChainAndName => Some(self.chain_verifier(&provider)?),
            },
            check_name: check == Check::ChainAndName,
            algorithms: provider.signature_verification_algorithms,
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match self.client_certificate()? {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsError(format!(
                    "client certificate {}: {e}",
                    shown(self.cert.as_deref())
                ))
            })?,
            None => builder.with_no_client_auth(),
        };
        // What libpq 17 sends; older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Arc::new(config))
    }

    fn chain_verifier(
        &self,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.rootcert {
            Some(RootCert::System) => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(TlsError(
                        "sslrootcert=system: no trusted certificates found in the system's store"
                            .into(),
                    ));
                }
            }
            Some(RootCert::File(path)) if path.exists() => {
                for cert in pem_certs(path, "root certificate file")? {
                    roots.add(cert).map_err(|e| {
                        TlsError(format!("root certificate file {}: {e}", path.display()))
                    })?;
                }
            }
            other => {
                let path = match other {
                    Some(RootCert::File(path)) => format!("{:?}", path.display().to_string()),
                    _ => "(no home directory for ~/.postgresql/root.crt)".into(),
                };
                return Err(TlsError(format!(
                    "root certificate file {path} does not exist: sslmode={} needs it to check \
                     the server's certificate; provide it (sslrootcert or PGSSLROOTCERT), use \
                     sslrootcert=system, or use sslmode=require to encrypt without checking",
                    self.mode.as_str()
                )));
            }
        }
        let mut builder =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
        if let Some(crl) = self.crl.as_ref().filter(|p| p.exists()) {
            let crls = CertificateRevocationListDer::pem_file_iter(crl)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    TlsError(format!(
                        "certificate revocation list {}: {e}",
                        crl.display()
                    ))
                })?;
            builder = builder.with_crls(crls);
        }
        builder
            .build()
            .map_err(|e| TlsError(format!("TLS certificate checks: {e}")))
    }

    /// The client certificate and key, when the certificate file exists (libpq goes on without
    /// one otherwise).
    #[allow(clippy::type_complexity)]
    fn client_certificate(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
        let Some(cert) = self.cert.as_ref().filter(|p| p.exists()) else {
            return Ok(None);
        };
        let chain = pem_certs(cert, "client certificate")?;
        let key = self.key.as_deref().ok_or_else(|| {
            TlsError(format!(
                "client certificate {} has no private key (set sslkey)",
                cert.display()
            ))
        })?;
        check_key_permissions(key)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| TlsError(format!("private key file {}: {e}", key.display())))?;
        Ok(Some((chain, key)))
    }
}

fn shown(path: Option<&Path>) -> String {
    path.map_or_else(|| "(none)".into(), |p| p.display().to_string())
}

fn pem_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// libpq refuses a private key others can read: at most 0600, or 0640 when root owns it.
fn check_key_permissions(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| TlsError(format!("private key file {}: {e}", path.display())))?;
    let mode = meta.mode();
    let private = mode & 0o077 == 0 || (meta.uid() == 0 && mode & 0o037 == 0);
    if !private {
        return Err(TlsError(format!(
            "private key file {} has group or world access; permissions should be u=rw (0600) \
             or less if owned by the current user, or u=rw,g=r (0640) or less if owned by root",
            path.display()
        )));
    }
    Ok(())
}

/// The certificate check for the chosen mode: none, the chain only, or the chain and the name.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // webpki checks the name last, after the chain and revocation: this error means
            // everything else held.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Runs the TLS handshake over `stream` (after the server accepted an SSLRequest).
pub(crate) async fn handshake<S>(
    config: Arc<ClientConfig>,
    host: &str,
    stream: S,
) -> io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} cannot be checked against a certificate: {e}"),
        )
    })?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
}

/// Whether an I/O error from [`handshake`] is a TLS failure (certificate, protocol) rather than
/// a broken connection.
pub(crate) fn is_tls_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
        || e.kind() == io::ErrorKind::InvalidInput
}

/// `tls-server-end-point` channel binding data (RFC 5929): the server certificate hashed with
/// its signature's hash, SHA-256 for MD5, SHA-1 and anything unrecognised.
pub(crate) fn server_end_point(session: &rustls::ClientConnection) -> Option<Vec<u8>> {
    let cert = session.peer_certificates()?.first()?;
    const SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    const SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    const SHA384_ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    const SHA512_ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
    Some(match signature_oid(cert)? {
        SHA384_RSA | SHA384_ECDSA => sha2::Sha384::digest(cert).to_vec(),
        SHA512_RSA | SHA512_ECDSA => sha2::Sha512::digest(cert).to_vec(),
        _ => sha2::Sha256::digest(cert).to_vec(),
    })
}

/// The signatureAlgorithm OID of a DER certificate.
fn signature_oid(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, certificate, _) = der(cert)? else {
        return None;
    };
    let (_, _tbs, rest) = der(certificate)?;
    let (0x30, algorithm, _) = der(rest)? else {
        return None;
    };
    match der(algorithm)? {
        (0x06, oid, _) => Some(oid),
        _ => None,
    }
}

/// One DER element: tag, content, what follows.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        (
            bytes.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b)),
            rest,
        )
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

/// tokio-postgres's TLS hook, over the same configuration. Remembers whether a handshake
/// failed, so `prefer` knows to try again in clear.
#[derive(Clone)]
pub(crate) struct MakeRustls {
    config: Arc<ClientConfig>,
    failed: Arc<AtomicBool>,
}

impl MakeRustls {
    pub(crate) fn new(config: Arc<ClientConfig>) -> MakeRustls {
        MakeRustls {
            config,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn handshake_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: Arc::clone(&self.config),
            domain: domain.to_owned(),
            failed: Arc::clone(&self.failed),
        })
    }
}

pub(crate) struct RustlsConnect {
    config: Arc<ClientConfig>,
    domain: String,
    failed: Arc<AtomicBool>,
}

type HandshakeFuture<S> =
    Pin<Box<dyn std::future::Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = HandshakeFuture<S>;

    fn connect(self, stream: S) -> HandshakeFuture<S> {
        Box::pin(async move {
            let result = handshake(self.config, &self.domain, stream).await;
            if result.is_err() {
                self.failed.store(true, Ordering::Relaxed);
            }
            result.map(RustlsStream)
        })
    }
}

pub(crate) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match server_end_point(self.0.get_ref().1) {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: SslMode, rootcert: Option<RootCert>) -> TlsSettings {
        TlsSettings {
            mode,
            rootcert,
            cert: None,
            key: None,
            crl: None,
        }
    }

    #[test]
    fn modes_map_to_libpq_attempts() {
        let tcp = HostSpec {
            host: Host::Tcp("db".into()),
            hostaddr: None,
            port: 5432,
        };
        let unix = HostSpec {
            host: Host::Unix("/tmp".into()),
            hostaddr: None,
            port: 5432,
        };
        let a = |mode| settings(mode, None).attempts(&tcp);
        assert_eq!(a(SslMode::Disable), (Encryption::Plain, None));
        assert_eq!(
            a(SslMode::Allow),
            (
                Encryption::Plain,
                Some((Retry::AfterServerRefusal, Encryption::Tls))
            )
        );
        assert_eq!(
            a(SslMode::Prefer),
            (
                Encryption::TryTls,
                Some((Retry::AfterTlsFailure, Encryption::Plain))
            )
        );
        for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
            assert_eq!(a(mode), (Encryption::Tls, None));
            assert_eq!(
                settings(mode, None).attempts(&unix),
                (Encryption::Plain, None)
            );
        }
    }

    #[test]
    fn require_checks_the_chain_when_a_root_file_exists() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("root.crt");
        std::fs::write(&present, "").unwrap();
        let absent = RootCert::File(dir.path().join("absent.crt"));
        assert_eq!(
            settings(SslMode::Require, Some(absent.clone())).check(),
            Check::Nothing
        );
        assert_eq!(
            settings(SslMode::Require, Some(RootCert::File(present))).check(),
            Check::Chain
        );
        assert_eq!(settings(SslMode::VerifyCa, None).check(), Check::Chain);
        let err = settings(SslMode::VerifyFull, Some(absent))
            .client_config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("absent.crt") && err.contains("does not exist"),
            "{err}"
        );
        assert!(settings(SslMode::Require, None).client_config().is_ok());
    }

    #[test]
    fn a_readable_private_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_key_permissions(&key).unwrap_err().to_string();
        assert!(err.contains("group or world access"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_key_permissions(&key).is_ok());
    }

    #[test]
    fn der_walks_to_the_signature_algorithm() {
        // SEQUENCE { SEQUENCE {} (tbs), SEQUENCE { OID 1.2.840.10045.4.3.3 }, BIT STRING }
        let cert = [
            0x30, 0x10, 0x30, 0x00, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
            0x03, 0x03, 0x03, 0x00,
        ];
        assert_eq!(
            signature_oid(&cert),
            Some(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03][..])
        );
        assert_eq!(signature_oid(&cert[..5]), None);
    }
}
