//! Running programs with a time bound, and the walvault binary in particular.

use super::TempRoot;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long one walvault command may run before the test calls it hung.
pub const WALVAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished command did.
pub struct RunOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl RunOutput {
    /// The exit code; `None` when a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "expected success:\n{self}");
        self
    }

    /// Asserts a clean failure: a non-zero exit code (not a crash by signal).
    pub fn assert_failure(&self) -> &Self {
        assert!(
            matches!(self.code(), Some(code) if code != 0),
            "expected a non-zero exit code:\n{self}"
        );
        self
    }

    pub fn assert_code(&self, expected: i32) -> &Self {
        assert_eq!(self.code(), Some(expected), "unexpected exit code:\n{self}");
        self
    }

    /// Asserts the exit code PostgreSQL takes as "recovery must stop": above 125.
    pub fn assert_fatal_for_recovery(&self) -> &Self {
        assert!(
            matches!(self.code(), Some(code) if code > 125),
            "expected an exit code above 125:\n{self}"
        );
        self
    }

    /// Asserts that stderr contains `needle` (a file or object name the message must mention).
    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "expected stderr to mention {needle:?}:\n{self}"
        );
        self
    }

    /// Asserts that this is a failed `verify` whose report has a `problem:` line naming `what`.
    pub fn assert_problem_names(&self, what: &str) -> &Self {
        self.assert_failure();
        assert!(
            self.stdout
                .lines()
                .any(|l| l.starts_with("problem: ") && l.contains(what)),
            "expected a problem naming {what:?}:\n{self}"
        );
        self
    }
}

impl fmt::Display for RunOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.command)?;
        writeln!(f, "status:  {} after {:?}", self.status, self.elapsed)?;
        writeln!(f, "stdout:\n{}", self.stdout.trim_end())?;
        write!(f, "stderr:\n{}", self.stderr.trim_end())
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Collects a pipe in a thread; `finished` tells whether the writer closed it.
struct Capture {
    data: Arc<Mutex<Vec<u8>>>,
    done: Receiver<()>,
}

impl Capture {
    fn start(mut pipe: impl Read + Send + 'static) -> Capture {
        let data = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let sink = data.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            let _ = tx.send(());
        });
        Capture { data, done }
    }

    /// The captured text once the pipe closes, or what came within `grace` when a leftover
    /// background process keeps it open.
    fn finish(self, grace: Duration) -> String {
        let closed = self.done.recv_timeout(grace).is_ok();
        let mut text = String::from_utf8_lossy(&self.data.lock().unwrap()).into_owned();
        if !closed {
            text.push_str("\n[pipe still open after exit: a background process inherited it]");
        }
        text
    }
}

/// Runs `cmd` (stdin closed, output captured); kills it and panics if it outlives `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> RunOutput {
    let command = describe(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command}: {e}"));
    let stdout = Capture::start(child.stdout.take().unwrap());
    let stderr = Capture::start(child.stderr.take().unwrap());
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let status = child.wait().expect("wait for killed child");
            let output = RunOutput {
                command,
                status,
                stdout: stdout.finish(Duration::from_secs(2)),
                stderr: stderr.finish(Duration::from_secs(2)),
                elapsed: start.elapsed(),
            };
            panic!("command still running after {timeout:?}, killed:\n{output}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let grace = Duration::from_secs(5);
    RunOutput {
        command,
        status,
        stdout: stdout.finish(grace),
        stderr: stderr.finish(grace),
        elapsed: start.elapsed(),
    }
}

/// The walvault binary, bound to one config file, run as the PostgreSQL user.
#[derive(Clone)]
pub struct Walvault {
    root: Arc<TempRoot>,
    bin: PathBuf,
    config: PathBuf,
}

impl Walvault {
    pub(crate) fn new(root: Arc<TempRoot>, bin: PathBuf, config: PathBuf) -> Walvault {
        Walvault { root, bin, config }
    }

    /// The same binary with another config file (which need not exist).
    pub fn with_config(&self, config: &Path) -> Walvault {
        Walvault::new(self.root.clone(), self.bin.clone(), config.to_path_buf())
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    /// `walvault --config <file> <args...>` as the PostgreSQL user, `envs` added.
    pub fn command(&self, args: &[&str], envs: &[(&str, &str)]) -> Command {
        let mut cmd = self.root.command(&self.bin);
        cmd.arg("--config").arg(&self.config).args(args);
        // Every delta the suite takes from block maps checks them against the page scan.
        cmd.env("WALVAULT_VERIFY_MAP", "1");
        cmd.envs(envs.iter().copied());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> RunOutput {
        self.run_with_env(args, &[])
    }

    pub fn run_with_env(&self, args: &[&str], envs: &[(&str, &str)]) -> RunOutput {
        run_bounded(&mut self.command(args, envs), WALVAULT_TIMEOUT)
    }

    /// `wal-push <path>`.
    pub fn wal_push(&self, path: &Path) -> RunOutput {
        self.run(&["wal-push", path_str(path)])
    }

    /// `wal-fetch <name> <dest>`.
    pub fn wal_fetch(&self, name: &str, dest: &Path) -> RunOutput {
        self.run(&["wal-fetch", name, path_str(dest)])
    }

    /// Starts walvault in the background, stderr readable line by line.
    pub fn spawn(&self, args: &[&str], envs: &[(&str, &str)]) -> Running {
        let mut cmd = self.command(args, envs);
        let command = describe(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            command,
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// For `archive_command`.
    pub fn archive_command(&self) -> String {
        format!("{} wal-push %p", self.shell_prefix())
    }

    /// For `restore_command`.
    pub fn restore_command(&self) -> String {
        format!("{} wal-fetch %f %p", self.shell_prefix())
    }

    /// `<binary> --config <file>`, for shell commands.
    pub fn shell_prefix(&self) -> String {
        let bin = path_str(&self.bin);
        let config = path_str(&self.config);
        assert!(
            !format!("{bin}{config}")
                .contains(|c: char| c.is_whitespace() || "'\"\\$`".contains(c)),
            "paths unfit for a shell command: {bin} {config}"
        );
        format!("{bin} --config {config}")
    }
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A walvault process running in the background (see [`Walvault::spawn`]); killed when dropped.
pub struct Running {
    command: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// The process id, to signal it (SIGSTOP/SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit by itself within `timeout`; returns its status and every
    /// stderr line.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "`{}` still running after {timeout:?}; stderr:\n{}",
                    self.command,
                    self.seen.join("\n")
                ),
            }
        }
        let status = self.child.wait().expect("wait for the process");
        (status, std::mem::take(&mut self.seen))
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{needle:?} not on stderr of `{}` within {timeout:?}; stderr so far:\n{}",
                    self.command,
                    self.seen.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait");
                    panic!(
                        "`{}` exited ({status}) without printing {needle:?}; stderr:\n{}",
                        self.command,
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// SIGTERM, as `systemctl stop` sends it; then waits for the exit and returns it with every
    /// line written to stderr.
    pub fn terminate(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                // stderr closes when the process exits.
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "`{}` still running {timeout:?} after SIGTERM; stderr:\n{}",
                    self.command,
                    self.seen.join("\n")
                ),
            }
        }
        let status = self.child.wait().expect("wait for the terminated process");
        (status, std::mem::take(&mut self.seen))
    }

    /// SIGKILL, then reap.
    pub fn kill(mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait for killed process")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
