//! S3 backend (AWS and S3-compatible servers such as MinIO, Garage, Ceph) over aws-sdk-s3.
//!
//! Every request is bounded: each attempt by `s3.timeout`, the whole call by the attempts times
//! that, with the SDK's standard retry (exponential backoff with jitter) for throttling, 5xx and
//! connection failures. Reads of a response body are bounded per read, and a stalled or broken
//! download asks again for the rest ([`super::resume`]) within the same attempts. Uploads
//! buffer at most one part (`s3.part_size`): a smaller object
//! is one `PutObject`, a larger one a multipart upload that becomes visible only when completed,
//! and is aborted if the writer fails or is dropped uncommitted. `IfAbsent` sends
//! `If-None-Match: *`. Over https the CA certificates come from one bundle file read once per
//! process ([`ca_bundle`]), not from every file of the system's certificate directory.
//! Every `PutObject` and `CreateMultipartUpload` carries the configured server-side encryption
//! and storage class ([`PutOptions`]).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
    ServerSideEncryption as Sse, StorageClass,
};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use bytes::{Bytes, BytesMut};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::resume::{ResumingBody, Source};
use super::{Committed, Leftover, Listed, ObjectReader, PutMode, StoreError};
use crate::config::{S3Settings, ServerSideEncryption};
use crate::repo::layout::ObjectKey;

pub(crate) struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or ending in `/`.
    prefix: String,
    read_timeout: Duration,
    max_attempts: u32,
    part_size: usize,
    options: PutOptions,
}

/// What every upload asks of the service besides its bytes: `s3.sse`, `s3.sse_kms_key_id`, and
/// the storage class of WAL objects or of the rest.
#[derive(Clone, Debug, Default)]
struct PutOptions {
    sse: Option<Sse>,
    kms_key_id: Option<String>,
    class_wal: Option<StorageClass>,
    class_backup: Option<StorageClass>,
}

impl PutOptions {
    fn new(s: &S3Settings) -> PutOptions {
        let (sse, kms_key_id) = match &s.sse {
            None => (None, None),
            Some(ServerSideEncryption::Aes256) => (Some(Sse::Aes256), None),
            Some(ServerSideEncryption::Kms { key_id }) => (Some(Sse::AwsKms), key_id.clone()),
        };
        PutOptions {
            sse,
            kms_key_id,
            class_wal: s.storage_class_wal.as_deref().map(StorageClass::from),
            class_backup: s.storage_class_backup.as_deref().map(StorageClass::from),
        }
    }

    /// The storage class of `key`: WAL, summaries and streamed fragments are WAL's.
    fn class(&self, key: &str) -> Option<StorageClass> {
        match ObjectKey::parse(key) {
            Some(ObjectKey::Wal(_) | ObjectKey::Summary(_) | ObjectKey::Fragment { .. }) => {
                self.class_wal.clone()
            }
            _ => self.class_backup.clone(),
        }
    }
}

/// Whether `endpoint` is reached without TLS.
fn is_plain_http(endpoint: &str) -> bool {
    endpoint
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
}

impl S3Store {
    pub(crate) async fn new(s: &S3Settings, bucket: String, prefix: String) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(s.timeout)
                    .operation_attempt_timeout(s.timeout)
                    .operation_timeout(s.timeout.saturating_mul(s.max_attempts.saturating_add(1)))
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(s.max_attempts)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(5)),
            );
        // A region known up front avoids the default chain's instance-metadata probe, which would
        // cost every short-lived wal-push/wal-fetch call time on machines outside a cloud.
        let region = s.region.clone().or_else(|| {
            ["AWS_REGION", "AWS_DEFAULT_REGION"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|r| !r.is_empty()))
                .or_else(|| s.endpoint.as_ref().map(|_| "us-east-1".to_owned()))
        });
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        if s.endpoint.as_deref().is_some_and(is_plain_http) {
            // The default client loads the system's CA certificates when it is built, which costs
            // every wal-push and wal-fetch 20-50 ms (a file per CA); plain HTTP needs none.
            loader = loader.http_client(aws_smithy_http_client::Builder::new().build_http());
        } else if let Some(bundle) = ca_bundle() {
            let trust = TrustStore::empty().with_pem_certificate(bundle.to_vec());
            // Building a TlsContext only stores its parts; it cannot fail today.
            if let Ok(context) = TlsContext::builder().with_trust_store(trust).build() {
                loader = loader.http_client(
                    aws_smithy_http_client::Builder::new()
                        .tls_provider(tls::Provider::Rustls(
                            tls::rustls_provider::CryptoMode::AwsLc,
                        ))
                        .tls_context(context)
                        .build_https(),
                );
            }
        }
        if let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "walvault-config",
            ));
        }
        let shared = loader.load().await;
        let mut config =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(s.force_path_style);
        if let Some(endpoint) = &s.endpoint {
            config = config.endpoint_url(endpoint);
        }
        S3Store {
            client: Client::from_conf(config.build()),
            bucket,
            prefix: if prefix.is_empty() {
                prefix
            } else {
                format!("{prefix}/")
            },
            read_timeout: s.timeout,
            max_attempts: s.max_attempts,
            part_size: s.part_size,
            options: PutOptions::new(s),
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn error<E>(&self, op: &'static str, key: &str, err: &SdkError<E>) -> StoreError
    where
        E: std::error::Error + 'static,
    {
        StoreError::S3 {
            op,
            bucket: self.bucket.clone(),
            key: self.full_key(key),
            message: DisplayErrorContext(err).to_string(),
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<ObjectReader>, StoreError> {
        let result = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await;
        match result {
            Ok(out) => {
                let source = Source {
                    client: self.client.clone(),
                    bucket: self.bucket.clone(),
                    full_key: self.full_key(key),
                    etag: out.e_tag().map(str::to_owned),
                    length: out.content_length().and_then(|n| u64::try_from(n).ok()),
                    read_timeout: self.read_timeout,
                    max_attempts: self.max_attempts,
                };
                let body = Box::pin(out.body.into_async_read());
                Ok(Some(Box::pin(ResumingBody::new(source, body))))
            }
            // Only the explicit NoSuchKey code means "absent": a bare 404 may come from a wrong
            // endpoint or a missing bucket, and must not look like the end of the archive.
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => Ok(None),
            Err(e) => Err(self.error("GetObject", key, &e)),
        }
    }

    pub(crate) async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let result = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await;
        match result {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(None),
            Err(e) => Err(self.error("HeadObject", key, &e)),
        }
    }

    pub(crate) async fn list_each(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Listed) + Send),
    ) -> Result<(), StoreError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full_key(prefix))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("ListObjectsV2", prefix, &e))?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                each(Listed {
                    key: key.to_owned(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    modified: object
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                });
            }
        }
        Ok(())
    }

    pub(crate) async fn children(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let full = self.full_key(prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .delimiter("/")
            .into_paginator()
            .send();
        let mut names = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("ListObjectsV2", prefix, &e))?;
            for common in page.common_prefixes() {
                let name = common
                    .prefix()
                    .and_then(|p| p.strip_prefix(&full))
                    .and_then(|p| p.strip_suffix('/'));
                if let Some(name) = name.filter(|n| !n.is_empty()) {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("DeleteObject", key, &e))?;
        Ok(())
    }

    /// One `DeleteObjects` request (at most 1000 keys); every per-key error fails the call.
    pub(crate) async fn delete_batch(&self, keys: &[String]) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
            return Ok(());
        };
        let what = format!("{first} .. {last} ({} keys)", keys.len());
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(self.full_key(k)).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.build_error("DeleteObjects", &what, e))?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| self.build_error("DeleteObjects", &what, e))?;
        let out = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| self.error("DeleteObjects", &what, &e))?;
        // A key that was already gone is success; anything else S3 reports per key is not.
        let refused: Vec<String> = out
            .errors()
            .iter()
            .filter(|e| e.code() != Some("NoSuchKey"))
            .map(|e| {
                format!(
                    "{}: {} {}",
                    e.key().unwrap_or("?"),
                    e.code().unwrap_or("?"),
                    e.message().unwrap_or("")
                )
            })
            .collect();
        if let Some(one) = refused.first() {
            return Err(StoreError::S3 {
                op: "DeleteObjects",
                bucket: self.bucket.clone(),
                key: what,
                message: format!("{} keys not deleted, e.g. {one}", refused.len()),
            });
        }
        Ok(())
    }

    fn build_error(&self, op: &'static str, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::S3 {
            op,
            bucket: self.bucket.clone(),
            key: what.to_owned(),
            message: e.to_string(),
        }
    }

    /// Multipart uploads under the prefix started before `before`, a page at a time.
    pub(crate) async fn leftovers(
        &self,
        before: std::time::SystemTime,
    ) -> Result<Vec<Leftover>, StoreError> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| self.error("ListMultipartUploads", "", &e))?;
            for upload in page.uploads() {
                let started = upload
                    .initiated()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok());
                let (Some(key), Some(id)) = (
                    upload.key().and_then(|k| k.strip_prefix(&self.prefix)),
                    upload.upload_id(),
                ) else {
                    continue;
                };
                if started.is_some_and(|t| t < before) {
                    out.push(Leftover::Upload {
                        key: key.to_owned(),
                        id: id.to_owned(),
                    });
                }
            }
            let next = (
                page.next_key_marker().map(str::to_owned),
                page.next_upload_id_marker().map(str::to_owned),
            );
            // A server that says "truncated" without a new marker would loop forever.
            if page.is_truncated() != Some(true) || next == (key_marker.clone(), id_marker.clone())
            {
                return Ok(out);
            }
            (key_marker, id_marker) = next;
        }
    }

    pub(crate) async fn abort_upload(&self, key: &str, id: &str) -> Result<(), StoreError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .upload_id(id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e)) if e.err().code() == Some("NoSuchUpload") => Ok(()),
            Err(e) => Err(self.error("AbortMultipartUpload", key, &e)),
        }
    }

    pub(crate) fn writer(&self, key: &str) -> S3Writer {
        S3Writer {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            full_key: self.full_key(key),
            part_size: self.part_size,
            buffer: BytesMut::new(),
            upload: None,
            class: self.options.class(key),
            options: self.options.clone(),
        }
    }
}

struct Multipart {
    id: String,
    parts: Vec<CompletedPart>,
}

pub(crate) struct S3Writer {
    client: Client,
    bucket: String,
    key: String,
    full_key: String,
    part_size: usize,
    buffer: BytesMut,
    upload: Option<Multipart>,
    options: PutOptions,
    class: Option<StorageClass>,
}

impl S3Writer {
    fn error<E>(&self, op: &'static str, err: &SdkError<E>) -> StoreError
    where
        E: std::error::Error + 'static,
    {
        StoreError::S3 {
            op,
            bucket: self.bucket.clone(),
            key: self.full_key.clone(),
            message: DisplayErrorContext(err).to_string(),
        }
    }

    pub(crate) async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.buffer.extend_from_slice(&chunk);
        while self.buffer.len() >= self.part_size {
            let part = self.buffer.split_to(self.part_size).freeze();
            if let Err(e) = self.upload_part(part).await {
                self.abort().await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn upload_part(&mut self, body: Bytes) -> Result<(), StoreError> {
        if self.upload.is_none() {
            // The parts carry CRC32 checksums (the SDK adds them), which CompleteMultipartUpload
            // repeats: a server such as Garage accepts them there only when the upload declared
            // the algorithm up front.
            let created = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.full_key)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .set_server_side_encryption(self.options.sse.clone())
                .set_ssekms_key_id(self.options.kms_key_id.clone())
                .set_storage_class(self.class.clone())
                .send()
                .await
                .map_err(|e| self.error("CreateMultipartUpload", &e))?;
            let Some(id) = created.upload_id().filter(|id| !id.is_empty()) else {
                return Err(StoreError::S3 {
                    op: "CreateMultipartUpload",
                    bucket: self.bucket.clone(),
                    key: self.full_key.clone(),
                    message: "the answer holds no upload id".into(),
                });
            };
            let id = id.to_owned();
            self.upload = Some(Multipart {
                id,
                parts: Vec::new(),
            });
        }
        let Some(upload) = &self.upload else {
            return Ok(());
        };
        // Part numbers start at 1 and S3 allows 10,000, far more than any object here needs.
        let number = upload.parts.len() as i32 + 1;
        let done = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.full_key)
            .upload_id(&upload.id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.error("UploadPart", &e))?;
        if let Some(upload) = &mut self.upload {
            upload.parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(done.e_tag().map(str::to_owned))
                    .set_checksum_crc32(done.checksum_crc32().map(str::to_owned))
                    .build(),
            );
        }
        Ok(())
    }

    pub(crate) async fn commit(mut self, mode: PutMode) -> Result<Committed, StoreError> {
        let if_none_match = (mode == PutMode::IfAbsent).then(|| "*".to_owned());
        let result = if self.upload.is_none() {
            let body = std::mem::take(&mut self.buffer).freeze();
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&self.full_key)
                .set_if_none_match(if_none_match)
                .set_server_side_encryption(self.options.sse.clone())
                .set_ssekms_key_id(self.options.kms_key_id.clone())
                .set_storage_class(self.class.clone())
                .body(ByteStream::from(body))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| precondition_or(e, |e| self.error("PutObject", e)))
        } else {
            let rest = std::mem::take(&mut self.buffer).freeze();
            if !rest.is_empty() {
                if let Err(e) = self.upload_part(rest).await {
                    self.abort().await;
                    return Err(e);
                }
            }
            let Some(upload) = self.upload.take() else {
                return Ok(Committed::Created);
            };
            let completed = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.full_key)
                .upload_id(&upload.id)
                .set_if_none_match(if_none_match)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(upload.parts.clone()))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| precondition_or(e, |e| self.error("CompleteMultipartUpload", e)));
            if completed.is_err() {
                self.upload = Some(upload);
                self.abort().await;
            }
            completed
        };
        match result {
            Ok(()) => Ok(Committed::Created),
            Err(Outcome::Exists) => Ok(Committed::AlreadyExists),
            Err(Outcome::Failed(e)) => Err(e),
        }
    }

    async fn abort(&mut self) {
        if let Some(abort) = self.take_abort() {
            abort.await;
        }
    }

    /// The request that aborts the open multipart upload, if any, bounded by [`ABORT_BOUND`];
    /// the upload is forgotten, so it is aborted once.
    fn take_abort(&mut self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let upload = self.upload.take()?;
        let request = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.full_key)
            .upload_id(&upload.id);
        let key = self.key.clone();
        Some(async move {
            let problem = match tokio::time::timeout(ABORT_BOUND, request.send()).await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => DisplayErrorContext(&e).to_string(),
                Err(_) => format!("no answer within {ABORT_BOUND:?}"),
            };
            tracing::warn!(
                key = %key,
                "could not abort multipart upload {} (its parts stay stored until a lifecycle \
                 rule removes them): {problem}",
                upload.id
            );
        })
    }
}

/// How long aborting an abandoned multipart upload may take.
const ABORT_BOUND: Duration = Duration::from_secs(30);

/// A writer dropped with a multipart upload open (its caller failed locally: a file could not be
/// read, a check failed) aborts the upload in the background, so its parts are not left stored
/// and billed. A process that exits at once may end before the abort is sent; S3 lifecycle
/// rules (`AbortIncompleteMultipartUpload`) remain the backstop.
impl Drop for S3Writer {
    fn drop(&mut self) {
        let Some(abort) = self.take_abort() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(abort);
            }
            Err(_) => tracing::warn!(
                key = %self.key,
                "multipart upload left open: no runtime to abort it from"
            ),
        }
    }
}

/// Where a CA bundle usually is: Debian and Ubuntu, RHEL and Fedora, SUSE, Alpine.
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The CA certificates for https endpoints, as PEM: `SSL_CERT_FILE`, else the system's bundle
/// file, read and checked once per process; every certificate the TLS stack could not take is
/// left out (it would panic on one). `None` leaves the choice to the default client (which then
/// reads `SSL_CERT_DIR` and every file of the system's certificate directory, 20-50 ms): when
/// `SSL_CERT_DIR` is set without `SSL_CERT_FILE`, or no bundle file holds a usable certificate.
fn ca_bundle() -> Option<&'static [u8]> {
    static BUNDLE: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    BUNDLE
        .get_or_init(|| {
            let path = match std::env::var_os("SSL_CERT_FILE") {
                Some(path) => PathBuf::from(path),
                None if std::env::var_os("SSL_CERT_DIR").is_some() => return None,
                None => PathBuf::from(CA_BUNDLES.iter().find(|p| Path::new(p).is_file())?),
            };
            let text = std::fs::read(&path)
                .inspect_err(|e| tracing::warn!("cannot read CA bundle {}: {e}", path.display()))
                .ok()?;
            let usable = usable_certificates(&text);
            if usable.is_empty() {
                tracing::warn!("CA bundle {} holds no usable certificate", path.display());
                return None;
            }
            Some(usable)
        })
        .as_deref()
}

/// The PEM certificates of `text` that parse and make trust anchors, one after another.
fn usable_certificates(text: &[u8]) -> Vec<u8> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = find(rest, BEGIN) {
        let Some(len) = find(&rest[start..], END) else {
            break;
        };
        let pem = &rest[start..start + len + END.len()];
        rest = &rest[start + len + END.len()..];
        let ders: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
        let usable = ders.is_ok_and(|ders| {
            ders.len() == 1
                && ders
                    .into_iter()
                    .all(|der| rustls::RootCertStore::empty().add(der).is_ok())
        });
        if usable {
            out.extend_from_slice(pem);
            out.push(b'\n');
        }
    }
    out
}

enum Outcome {
    Exists,
    Failed(StoreError),
}

/// `412 Precondition Failed` answers `If-None-Match: *` when the key exists.
fn precondition_or<E>(err: SdkError<E>, other: impl FnOnce(&SdkError<E>) -> StoreError) -> Outcome
where
    E: ProvideErrorMetadata,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    if status == Some(412) || err.code() == Some("PreconditionFailed") {
        Outcome::Exists
    } else {
        Outcome::Failed(other(&err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_endpoints_go_without_tls() {
        assert!(is_plain_http("http://127.0.0.1:9000"));
        assert!(is_plain_http("HTTP://minio.local"));
        assert!(!is_plain_http("https://s3.eu-west-1.amazonaws.com"));
        assert!(!is_plain_http("http"));
    }

    #[tokio::test]
    async fn extreme_timeouts_do_not_overflow() {
        let settings = S3Settings {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: None,
            force_path_style: true,
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            timeout: Duration::MAX,
            max_attempts: u32::MAX,
            part_size: 5 << 20,
            sse: None,
            storage_class_wal: None,
            storage_class_backup: None,
        };
        S3Store::new(&settings, "b".into(), String::new()).await;
    }

    #[test]
    fn wal_objects_and_the_rest_get_their_own_storage_class() {
        let options = PutOptions {
            class_wal: Some(StorageClass::StandardIa),
            class_backup: Some(StorageClass::GlacierIr),
            ..Default::default()
        };
        for wal in [
            "wal/000000010000000000000003",
            "walsummary/000000010000000000000003",
            "stream/000000010000000000000004/00002000-00003F10",
        ] {
            assert_eq!(options.class(wal), Some(StorageClass::StandardIa), "{wal}");
        }
        for other in [
            "repository",
            "backups/base_20261121T113128Z_00000001_0000000006000028/manifest",
        ] {
            assert_eq!(
                options.class(other),
                Some(StorageClass::GlacierIr),
                "{other}"
            );
        }
    }

    #[test]
    fn only_usable_certificates_are_kept_from_a_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=walvault test CA", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(made.status.success(), "{made:?}");
        let good = std::fs::read_to_string(&cert).unwrap();
        let good = good.trim();
        let not_base64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----";
        let not_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
        let bundle = format!(
            "# comment\n{not_base64}\n{good}\nnoise\n{not_der}\n{good}\n-----BEGIN CERTIFICATE-----\nAAAA"
        );
        let usable = String::from_utf8(usable_certificates(bundle.as_bytes())).unwrap();
        assert_eq!(usable, format!("{good}\n{good}\n"));
        assert!(usable_certificates(b"").is_empty());
        assert!(usable_certificates(not_der.as_bytes()).is_empty());
    }
}
