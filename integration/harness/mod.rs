//! Fixtures for walvault's end-to-end tests: PostgreSQL clusters, an S3 server, repositories and a
//! runner for the walvault binary.
//!
//! Every test builds a [`TestEnv`]: a private directory under /tmp (owned by the `postgres` user when
//! the tests run as root, because PostgreSQL refuses root) holding the test's clusters, local
//! repository, config files and a link to the walvault binary. The directory is removed when the
//! test passes and kept, with its path printed, when it fails.

// The harness serves every feature module; not each of them uses every helper.
#![allow(dead_code)]

pub mod cmd;
pub mod garage;
pub mod pg;
pub mod proxy;
pub mod repo;
pub mod s3;
pub mod tmpfs;

mod selftest;

// The feature modules' vocabulary, used by some of them only.
#[allow(unused_imports)]
pub use cmd::{RunOutput, Walvault};
#[allow(unused_imports)]
pub use pg::{Cluster, ClusterConfig, PgInstall};
#[allow(unused_imports)]
pub use repo::{object_content, ConfigFile, Repo, RepoKind, Snapshot};

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Writes one `#[test]` per repository kind for each named fn taking a [`RepoKind`]:
/// `repo_kind_tests!(foo)` gives the tests `foo::local`, `foo::s3` (moto) and `foo::garage`.
macro_rules! repo_kind_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn local() {
                super::$name($crate::harness::RepoKind::Local)
            }
            #[test]
            fn s3() {
                super::$name($crate::harness::RepoKind::S3)
            }
            #[test]
            fn garage() {
                super::$name($crate::harness::RepoKind::Garage)
            }
        }
    )*};
}
pub(crate) use repo_kind_tests;

/// Like [`repo_kind_tests`], for scenarios about S3 only: `foo::s3` (moto) and `foo::garage`.
macro_rules! s3_kind_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn s3() {
                super::$name($crate::harness::RepoKind::S3)
            }
            #[test]
            fn garage() {
                super::$name($crate::harness::RepoKind::Garage)
            }
        }
    )*};
}
pub(crate) use s3_kind_tests;

/// The user that runs PostgreSQL and walvault: `postgres` when the tests run as root, else the
/// current user (`None`).
fn postgres_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        if !running_as_root() {
            return None;
        }
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let entry = passwd
            .lines()
            .find(|line| line.starts_with("postgres:"))
            .expect(
                "the tests run as root but there is no `postgres` user: run integration/run.sh",
            );
        let fields: Vec<&str> = entry.split(':').collect();
        Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
    })
}

fn running_as_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let uids = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .expect("Uid line in /proc/self/status");
    // Fields: real, effective, saved, filesystem.
    uids.split_whitespace().nth(1) == Some("0")
}

/// Hands `path` to the user that runs PostgreSQL and walvault (no-op when not root).
pub fn give_to_postgres(path: &Path) {
    if let Some((uid, gid)) = postgres_user() {
        chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// A free TCP port on 127.0.0.1, never handed out twice by this process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `condition` every 50 ms until it holds (true) or `timeout` passes (false).
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `condition` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, condition),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// The private directory of one test. Shared (`Arc`) by everything that lives in it, so it outlives
/// the clusters that run there.
pub(crate) struct TempRoot {
    dir: tempfile::TempDir,
}

impl TempRoot {
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A command that runs as the `postgres` user (when root), with a neutral environment: HOME in
    /// the test directory and no `WALVAULT_*`/`PG*` variables from the caller's shell.
    pub(crate) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            let key_str = key.to_string_lossy();
            if key_str.starts_with("WALVAULT_") || key_str.starts_with("PG") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("HOME", self.path());
        if let Some((uid, gid)) = postgres_user() {
            // Set ids in the child itself (not via runuser, which would stay between us and the
            // program and swallow a SIGKILL meant for it).
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("test failed: files kept in {}", self.path().display());
        }
    }
}

/// One test's world: its directory, the walvault binary and factories for clusters and repositories.
pub struct TestEnv {
    root: Arc<TempRoot>,
    walvault_bin: PathBuf,
    counter: AtomicUsize,
}

impl TestEnv {
    /// A new environment; `name` shows in the directory name to help find kept files.
    pub fn new(name: &str) -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix(&format!("walvault-{name}-"))
            .tempdir_in("/tmp")
            .expect("create test directory");
        let root = Arc::new(TempRoot { dir });
        give_to_postgres(root.path());
        let walvault_bin = root.path().join("walvault");
        install_binary(Path::new(env!("CARGO_BIN_EXE_walvault")), &walvault_bin);
        TestEnv {
            root,
            walvault_bin,
            counter: AtomicUsize::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// Creates `<test dir>/<name>` (and parents) owned by the PostgreSQL user, mode 0700. `name`
    /// may also be an absolute path inside the test dir.
    pub fn mkdir(&self, name: impl AsRef<Path>) -> PathBuf {
        let path = self.path().join(name);
        assert!(
            path.starts_with(self.path()),
            "{} is outside the test dir",
            path.display()
        );
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let mut dir = path.as_path();
        while dir != self.path() {
            give_to_postgres(dir);
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
            dir = dir.parent().unwrap();
        }
        path
    }

    /// Like [`TestEnv::mkdir`] with a numbered, never reused name starting with `prefix`.
    pub fn unique_dir(&self, prefix: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.mkdir(format!("{prefix}-{n}"))
    }

    /// Writes a file (mode 0644, owned by the PostgreSQL user), creating its directory.
    pub fn write_file(&self, name: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path().join(name);
        if let Some(parent) = path.parent() {
            if !parent.exists() {
                self.mkdir(
                    parent
                        .strip_prefix(self.path())
                        .expect("file inside the test dir"),
                );
            }
        }
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        give_to_postgres(&path);
        path
    }

    /// A command run as the PostgreSQL user with a neutral environment ([`TempRoot::command`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.root.command(program)
    }

    /// Writes a walvault config file named `name` in the test dir.
    pub fn write_config(&self, name: &str, config: &ConfigFile) -> PathBuf {
        self.write_file(name, config.render())
    }

    /// A fresh repository of `kind` with its config file.
    pub fn repo(&self, kind: RepoKind) -> Repo {
        Repo::create(self, kind)
    }

    /// The walvault binary, run with `--config config`.
    pub fn walvault(&self, config: &Path) -> Walvault {
        Walvault::new(
            self.root.clone(),
            self.walvault_bin.clone(),
            config.to_path_buf(),
        )
    }

    /// A new cluster (initdb in `<test dir>/<name>`), configured and started.
    pub fn cluster(&self, config: ClusterConfig) -> Cluster {
        let mut cluster = Cluster::init(self.root.clone(), config);
        cluster.start();
        cluster
    }

    /// A cluster around an existing data directory (a base backup), configured, not started.
    pub fn cluster_from_copy(&self, config: ClusterConfig, datadir: &Path) -> Cluster {
        Cluster::adopt(self.root.clone(), config, datadir.to_path_buf())
    }
}

/// Puts the walvault binary where the PostgreSQL user can run it: a hard link when possible (the
/// debug binary is large), else a copy; mode 0755 either way.
fn install_binary(source: &Path, dest: &Path) {
    let world_executable = fs::metadata(source)
        .map(|m| m.permissions().mode() & 0o755 == 0o755)
        .unwrap_or(false);
    if !(world_executable && fs::hard_link(source, dest).is_ok()) {
        fs::copy(source, dest).unwrap_or_else(|e| {
            panic!(
                "copy {} to {}: {e} (is the walvault binary built?)",
                source.display(),
                dest.display()
            )
        });
        fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Deterministic pseudo-random bytes (xorshift), for garbage files.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
