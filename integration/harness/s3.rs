//! The S3 server of the test process: one moto server on a free port, started by the first test
//! that needs it, with a client to look into buckets behind walvault's back. Garage
//! ([`super::garage`]) is served through the same type.

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::Client;
use std::env;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::runtime::Runtime;

pub const ACCESS_KEY: &str = "test";
pub const SECRET_KEY: &str = "test";
pub const REGION: &str = "us-east-1";

pub struct S3Server {
    endpoint: String,
    access_key: String,
    secret_key: String,
    /// The wrapper shell around the server; it kills the server when our end of its stdin
    /// closes, that is when the test process exits (see [`spawn_tied`]).
    _process: Option<Child>,
    runtime: Runtime,
    client: Client,
}

/// The process-wide S3 server, started on first use. A failure to start is remembered, so every
/// S3 test fails at once with the same message.
pub fn server() -> &'static S3Server {
    static SERVER: OnceLock<Result<S3Server, String>> = OnceLock::new();
    SERVER
        .get_or_init(S3Server::start)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn moto_program() -> Result<PathBuf, String> {
    let found = match env::var_os("WALVAULT_TEST_MOTO") {
        Some(path) => Some(PathBuf::from(path)).filter(|p| p.is_file()),
        None => env::var_os("PATH").and_then(|paths| {
            env::split_paths(&paths)
                .map(|dir| dir.join("moto_server"))
                .find(|p| p.is_file())
        }),
    };
    found.ok_or_else(|| {
        "moto_server not found ($WALVAULT_TEST_MOTO, else PATH): run the tests with \
         integration/run.sh, which installs it"
            .to_string()
    })
}

impl S3Server {
    fn start() -> Result<S3Server, String> {
        let program = moto_program()?;
        let port = super::free_port();
        let process = spawn_tied(
            &program,
            &[
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
            None,
        )?;
        let addr = format!("127.0.0.1:{port}");
        let timeout = Duration::from_secs(60);
        if !super::poll_until(timeout, || TcpStream::connect(&addr).is_ok()) {
            return Err(format!(
                "{} did not listen on {addr} within {timeout:?}",
                program.display()
            ));
        }
        Ok(S3Server::new(
            format!("http://{addr}"),
            Some(process),
            ACCESS_KEY,
            SECRET_KEY,
        ))
    }

    /// A server already listening at `endpoint`, reached with these keys; `process` (if the
    /// server is this client's alone) ends with it.
    pub(crate) fn new(
        endpoint: String,
        process: Option<Child>,
        access_key: &str,
        secret_key: &str,
    ) -> Self {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&endpoint)
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new(
                access_key, secret_key, None, None, "tests",
            ))
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .build();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        S3Server {
            endpoint,
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            _process: process,
            runtime,
            client: Client::from_conf(config),
        }
    }

    /// The access key id and secret walvault uses with this server.
    pub fn keys(&self) -> (&str, &str) {
        (&self.access_key, &self.secret_key)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Creates a bucket with a name no other test of this process uses.
    pub fn new_bucket(&self) -> String {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "walvault-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        self.runtime
            .block_on(self.client.create_bucket().bucket(&name).send())
            .unwrap_or_else(|e| panic!("create bucket {name}: {e:?}"));
        name
    }

    /// Every key in `bucket` starting with `prefix`, sorted.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.runtime.block_on(async {
            let mut keys = Vec::new();
            let mut token = None;
            loop {
                let page = self
                    .client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(prefix)
                    .set_continuation_token(token)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("list s3://{bucket}/{prefix}: {e:?}"));
                keys.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(String::from)),
                );
                token = page.next_continuation_token().map(String::from);
                if token.is_none() {
                    break;
                }
            }
            keys.sort();
            keys
        })
    }

    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.runtime.block_on(async {
            let object = self
                .client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("get s3://{bucket}/{key}: {e:?}"));
            let body = object.body.collect().await.expect("read object body");
            body.into_bytes().to_vec()
        })
    }

    pub fn put(&self, bucket: &str, key: &str, data: Vec<u8>) {
        self.runtime
            .block_on(
                self.client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(data.into())
                    .send(),
            )
            .unwrap_or_else(|e| panic!("put s3://{bucket}/{key}: {e:?}"));
    }

    /// The storage class and server-side encryption the server recorded for an object.
    pub fn head(&self, bucket: &str, key: &str) -> (Option<String>, Option<String>) {
        let head = self
            .runtime
            .block_on(self.client.head_object().bucket(bucket).key(key).send())
            .unwrap_or_else(|e| panic!("head s3://{bucket}/{key}: {e:?}"));
        (
            head.storage_class().map(|c| c.as_str().to_owned()),
            head.server_side_encryption().map(|e| e.as_str().to_owned()),
        )
    }

    pub fn delete(&self, bucket: &str, key: &str) {
        self.runtime
            .block_on(self.client.delete_object().bucket(bucket).key(key).send())
            .unwrap_or_else(|e| panic!("delete s3://{bucket}/{key}: {e:?}"));
    }
}

/// Starts `program args...` under a shell that kills it when its stdin closes, that is when the
/// test process exits however it ends; its output goes to `log` (or nowhere).
pub(crate) fn spawn_tied(
    program: &std::path::Path,
    args: &[String],
    log: Option<&std::path::Path>,
) -> Result<Child, String> {
    let log = log.map_or("/dev/null".into(), |p| p.display().to_string());
    Command::new("sh")
        .arg("-c")
        .arg(r#"log=$1; shift; "$0" "$@" >"$log" 2>&1 & server=$!; cat >/dev/null; kill $server"#)
        .arg(program)
        .arg(log)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start {}: {e}", program.display()))
}
