//! `[hooks]`: a shell command line run after backup-push, delete, drill and check, with the
//! command's JSON report on stdin and `WALVAULT_EVENT`/`WALVAULT_STATUS` in its environment.
//!
//! `on_success` runs when the command succeeded, `on_failure` when it failed or (check) only
//! warned. A hook is bounded by `hooks.timeout`, after which its whole process group is killed;
//! its output goes to walvault's stderr. A hook never changes the command's exit code: a failing
//! one is logged. The command line itself is never logged (it may hold a webhook token).

use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::config::HookSettings;

/// How often a running hook is checked for its end.
const POLL: Duration = Duration::from_millis(50);

/// How the command ended, as `WALVAULT_STATUS` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Success,
    Warning,
    Failure,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Warning => "warning",
            Status::Failure => "failure",
        }
    }
}

/// Runs the hook for `status`, if one is configured, and waits for it (bounded).
pub(crate) async fn run(
    hooks: &HookSettings,
    event: &str,
    status: Status,
    report: &serde_json::Value,
) {
    let (which, command) = match status {
        Status::Success => ("on_success", &hooks.on_success),
        Status::Warning | Status::Failure => ("on_failure", &hooks.on_failure),
    };
    let Some(command) = command.as_deref().filter(|c| !c.trim().is_empty()) else {
        return;
    };
    match run_one(command, event, status, report, hooks.timeout).await {
        Ok(exit) if exit.success() => tracing::debug!("{which} hook for {event} succeeded"),
        Ok(exit) => tracing::warn!("{which} hook for {event} failed ({exit}); ignored"),
        Err(e) => tracing::warn!("{which} hook for {event} could not run: {e}; ignored"),
    }
}

async fn run_one(
    command: &str,
    event: &str,
    status: Status,
    report: &serde_json::Value,
    timeout: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    // The hook's stdout goes to walvault's stderr: stdout may carry the command's own report.
    let stdout = std::io::stderr().as_fd().try_clone_to_owned()?;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("WALVAULT_EVENT", event)
        .env("WALVAULT_STATUS", status.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::from(stdout))
        .process_group(0)
        .spawn()?;
    let json = serde_json::to_vec_pretty(report).unwrap_or_default();
    if let Some(mut stdin) = child.stdin.take() {
        // On a thread of its own: a hook that does not read would block the write, and one
        // that exits early closes the pipe (not an error). The kill below ends either.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&json);
        });
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(exit) = child.try_wait()? {
            return Ok(exit);
        }
        if Instant::now() >= deadline {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill only sends a signal, to the hook's own process group
                // (process_group(0) made the hook its leader), so its children end too.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "timed out after {} and was killed",
                humantime::format_duration(timeout)
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(on_success: &str, timeout: Duration) -> HookSettings {
        HookSettings {
            on_success: Some(on_success.to_owned()),
            on_failure: None,
            timeout,
        }
    }

    #[tokio::test]
    async fn a_hook_gets_the_report_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let command = format!(
            "{{ echo \"$WALVAULT_EVENT $WALVAULT_STATUS\"; cat; }} > {}",
            out.display()
        );
        let report = serde_json::json!({"ok": true});
        run(
            &hooks(&command, Duration::from_secs(30)),
            "drill",
            Status::Success,
            &report,
        )
        .await;
        let text = std::fs::read_to_string(&out).unwrap();
        let (first, rest) = text.split_once('\n').unwrap();
        assert_eq!(first, "drill success");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(rest).unwrap(),
            report
        );
        // No on_failure hook: nothing runs, nothing fails.
        run(
            &hooks(&command, Duration::from_secs(30)),
            "drill",
            Status::Failure,
            &report,
        )
        .await;
    }

    /// A hook that hangs (and its children) is killed at the timeout.
    #[tokio::test]
    async fn a_hanging_hook_is_killed() {
        let started = Instant::now();
        let exit = run_one(
            "sleep 30 & sleep 30",
            "check",
            Status::Success,
            &serde_json::json!({}),
            Duration::from_millis(300),
        )
        .await;
        assert!(exit.is_err());
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
