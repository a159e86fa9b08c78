//! Garage, a real distributed object store, on loopback: one node shared by the test process for
//! the S3 scenarios of the normal suite ([`server`]), and clusters of several nodes with
//! replication for the node-loss test ([`GarageCluster`]). The binary comes from
//! `$WALVAULT_TEST_GARAGE`, else the cache `integration/run.sh` builds it into
//! (`${XDG_CACHE_HOME:-$HOME/.cache}/walvault/garage/bin/garage`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::Duration;

use super::s3::{spawn_tied, S3Server, REGION};

/// The process-wide one-node Garage, started on first use; a failure to start is remembered.
pub fn server() -> &'static S3Server {
    static SERVER: OnceLock<Result<(S3Server, Child), String>> = OnceLock::new();
    let (server, _cleanup) = SERVER
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("walvault-garage-")
                .tempdir_in("/tmp")
                .map_err(|e| format!("garage dir: {e}"))?;
            // Lives as long as the process (the server's files are under it); a shell tied to
            // the process removes it then.
            let dir = dir.keep();
            let cleanup = Command::new("sh")
                .arg("-c")
                .arg(r#"cat >/dev/null; sleep 2; rm -rf "$0""#)
                .arg(&dir)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("start the cleanup of {}: {e}", dir.display()))?;
            let mut cluster = GarageCluster::start(&dir, 1)?;
            let node = cluster.nodes.remove(0);
            Ok((cluster.s3(node), cleanup))
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    server
}

pub fn program() -> Result<PathBuf, String> {
    let found = match env::var_os("WALVAULT_TEST_GARAGE") {
        Some(path) => PathBuf::from(path),
        None => {
            let cache = env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_default();
            cache.join("walvault/garage/bin/garage")
        }
    };
    if found.is_file() {
        Ok(found)
    } else {
        Err(format!(
            "garage not found at {} ($WALVAULT_TEST_GARAGE, else the cache): run the tests with \
             integration/run.sh, which builds it",
            found.display()
        ))
    }
}

/// One Garage node: its config file, S3 address and running process.
pub struct GarageNode {
    config: PathBuf,
    pub s3_port: u16,
    process: Option<Child>,
}

/// Garage nodes forming one cluster, with a key allowed to create buckets.
pub struct GarageCluster {
    program: PathBuf,
    pub nodes: Vec<GarageNode>,
    key_id: String,
    secret: String,
}

impl GarageCluster {
    /// Starts `count` nodes under `dir` (replication factor `count`), joins them, applies a
    /// layout and creates a key.
    pub fn start(dir: &Path, count: usize) -> Result<GarageCluster, String> {
        let program = program()?;
        let secret: String = super::pseudo_random_bytes(32, std::process::id() as u64 + 7)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..count {
            let node_dir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).map_err(|e| format!("mkdir: {e}"))?;
            let (rpc, s3, admin) = (super::free_port(), super::free_port(), super::free_port());
            let config = node_dir.join("garage.toml");
            let text = format!(
                "metadata_dir = \"{dir}/meta\"\ndata_dir = \"{dir}/data\"\n\
                 db_engine = \"sqlite\"\nreplication_factor = {count}\n\
                 metadata_fsync = false\ndata_fsync = false\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"{REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                dir = node_dir.display()
            );
            std::fs::write(&config, text).map_err(|e| format!("write garage.toml: {e}"))?;
            let log = node_dir.join("garage.log");
            let process = spawn_tied(
                &program,
                &["-c".into(), config.display().to_string(), "server".into()],
                Some(&log),
            )?;
            nodes.push(GarageNode {
                config,
                s3_port: s3,
                process: Some(process),
            });
            let addr = format!("127.0.0.1:{rpc}");
            if !super::poll_until(Duration::from_secs(30), || {
                std::net::TcpStream::connect(&addr).is_ok()
            }) {
                return Err(format!(
                    "garage node {i} did not listen on {addr}; log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
        }
        let mut cluster = GarageCluster {
            program,
            nodes,
            key_id: String::new(),
            secret: String::new(),
        };
        let ids: Vec<String> = (0..count)
            .map(|i| cluster.cli(i, &["node", "id", "-q"]))
            .collect::<Result<_, _>>()?;
        for id in &ids[1..] {
            cluster.cli(0, &["node", "connect", id.trim()])?;
        }
        for id in &ids {
            let short = id.trim().split('@').next().unwrap_or("");
            // Joining takes a moment: retry until node 0 knows every node.
            let mut last = Ok(String::new());
            let assigned = super::poll_until(Duration::from_secs(30), || {
                last = cluster.cli(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short]);
                last.is_ok()
            });
            if !assigned {
                return Err(format!("garage layout assign {short}: {last:?}"));
            }
        }
        cluster.cli(0, &["layout", "apply", "--version", "1"])?;
        let created = cluster.cli(0, &["key", "create", "walvault-tests"])?;
        let field = |name: &str| {
            created
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("no {name} in `garage key create` output: {created}"))
        };
        cluster.key_id = field("Key ID:")?;
        cluster.secret = field("Secret key:")?;
        cluster.cli(0, &["key", "allow", "--create-bucket", &cluster.key_id])?;
        // The S3 API answers once the layout has reached every node.
        for node in &cluster.nodes {
            let addr = format!("127.0.0.1:{}", node.s3_port);
            if !super::poll_until(Duration::from_secs(30), || {
                std::net::TcpStream::connect(&addr).is_ok()
            }) {
                return Err(format!("garage S3 API not listening on {addr}"));
            }
        }
        Ok(cluster)
    }

    /// Runs `garage -c <node's config> args...`; its stdout on success.
    pub fn cli(&self, node: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.program)
            .arg("-c")
            .arg(&self.nodes[node].config)
            .args(args)
            .output()
            .map_err(|e| format!("run garage: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "garage {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// An S3 client of `node` with the cluster's key; the node's process goes with it.
    fn s3(&self, mut node: GarageNode) -> S3Server {
        S3Server::new(
            format!("http://127.0.0.1:{}", node.s3_port),
            node.process.take(),
            &self.key_id,
            &self.secret,
        )
    }

    /// An S3 client reaching the cluster through node `i` (which keeps running).
    pub fn client(&self, i: usize) -> S3Server {
        S3Server::new(
            format!("http://127.0.0.1:{}", self.nodes[i].s3_port),
            None,
            &self.key_id,
            &self.secret,
        )
    }

    /// Stops node `i` (its wrapper sends it SIGTERM) and waits for the wrapper.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut shell) = self.nodes[i].process.take() {
            // Closing the wrapper's stdin makes it kill the server (see spawn_tied).
            drop(shell.stdin.take());
            let _ = shell.wait();
        }
        let addr = format!("127.0.0.1:{}", self.nodes[i].s3_port);
        super::wait_until(
            &format!("garage node {i} to stop"),
            Duration::from_secs(30),
            || std::net::TcpStream::connect(&addr).is_err(),
        );
    }
}
