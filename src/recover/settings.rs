//! The recovery configuration `walvault recover` leaves in a restored data directory:
//! `recovery.signal` and a block of settings appended to `postgresql.auto.conf`.
//!
//! Understands PostgreSQL 12+ recovery configuration (`restore_command`, `recovery_target*`,
//! `recovery_target_action`, `recovery_target_timeline`), its quoting rules for configuration
//! values, and `/bin/sh` quoting for the `restore_command` it runs. Appending to
//! `postgresql.auto.conf` makes these settings override whatever the backed-up
//! `postgresql.conf` says, because the server reads the auto file last. Used by `recover`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use super::target::Target;
use super::RecoverError;
use crate::backup::window::TimelineChoice;

/// `recovery_target_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// Everything that goes into the recovery configuration.
#[derive(Clone, Debug)]
pub(crate) struct RecoverySettings {
    /// The command and arguments that run `wal-fetch` (`%f %p` are appended).
    pub(crate) fetch_command: Vec<String>,
    pub(crate) target: Target,
    /// False writes `recovery_target_inclusive = off`: stop just before the target.
    pub(crate) inclusive: bool,
    pub(crate) action: TargetAction,
    pub(crate) timeline: TimelineChoice,
    /// Keep the backed-up `archive_mode`/`archive_command` instead of turning archiving off, so
    /// the recovered cluster does not push into the repository it was restored from by accident.
    pub(crate) keep_archive_command: bool,
}

impl RecoverySettings {
    /// The lines appended to `postgresql.auto.conf`.
    pub(crate) fn render(&self) -> String {
        let restore_command = self
            .fetch_command
            .iter()
            .map(|a| shell_quote(a))
            .chain(["%f".to_string(), "%p".to_string()])
            .collect::<Vec<_>>()
            .join(" ");
        let mut lines = vec![("restore_command", restore_command)];
        match &self.target {
            Target::Time(t) => lines.push(("recovery_target_time", t.to_string())),
            Target::Lsn(lsn) => lines.push(("recovery_target_lsn", lsn.to_string())),
            Target::Xid(xid) => lines.push(("recovery_target_xid", xid.to_string())),
            Target::Name(name) => lines.push(("recovery_target_name", name.clone())),
            Target::Immediate => lines.push(("recovery_target", "immediate".to_string())),
            Target::EndOfArchive => {}
        }
        if !self.inclusive {
            lines.push(("recovery_target_inclusive", "off".to_string()));
        }
        if self.target != Target::EndOfArchive {
            lines.push(("recovery_target_action", self.action.as_str().to_string()));
        }
        lines.push((
            "recovery_target_timeline",
            match self.timeline {
                TimelineChoice::Latest => "latest".to_string(),
                TimelineChoice::Id(tli) => tli.0.to_string(),
            },
        ));
        if !self.keep_archive_command {
            lines.push(("archive_mode", "off".to_string()));
        }
        let mut text = String::from("\n# Added by walvault recover.\n");
        for (key, value) in lines {
            let _ = writeln!(text, "{key} = {}", conf_quote(&value));
        }
        text
    }

    /// Writes `recovery.signal` and appends the settings to `postgresql.auto.conf` in `pgdata`.
    pub(crate) fn write(&self, pgdata: &Path) -> Result<(), RecoverError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| RecoverError::Io { what, path, source }
        };
        let auto_conf = pgdata.join("postgresql.auto.conf");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&auto_conf)
            .map_err(io("open", &auto_conf))?;
        file.write_all(self.render().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io("write", &auto_conf))?;
        let signal = pgdata.join("recovery.signal");
        std::fs::write(&signal, b"").map_err(io("create", &signal))?;
        // A standby.signal from the backup would make the server a standby that never ends
        // recovery, ignoring the target.
        let standby = pgdata.join("standby.signal");
        if standby.exists() {
            std::fs::remove_file(&standby).map_err(io("remove", &standby))?;
        }
        Ok(())
    }
}

/// A configuration-file string: single quotes, embedded quotes doubled.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// One `/bin/sh` word, quoted unless it is plainly safe.
fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::UnixMicros;

    fn settings(target: Target) -> RecoverySettings {
        RecoverySettings {
            fetch_command: vec![
                "/usr/bin/walvault".into(),
                "--config".into(),
                "/etc/wal vault's.toml".into(),
                "wal-fetch".into(),
            ],
            target,
            inclusive: true,
            action: TargetAction::Promote,
            timeline: TimelineChoice::Latest,
            keep_archive_command: false,
        }
    }

    #[test]
    fn renders_quoted_settings() {
        let text = settings(Target::Time(UnixMicros(1_763_726_400_000_001))).render();
        assert!(
            text.contains(
                "restore_command = '/usr/bin/walvault --config ''/etc/wal vault''\\''''s.toml'' wal-fetch %f %p'"
            ),
            "{text}"
        );
        assert!(text.contains("recovery_target_time = '2025-11-21 12:00:00.000001+00'"));
        assert!(text.contains("recovery_target_action = 'promote'"));
        assert!(text.contains("recovery_target_timeline = 'latest'"));
        assert!(text.contains("archive_mode = 'off'"));
        assert!(!text.contains("recovery_target_inclusive"), "{text}");
    }

    #[test]
    fn exclusive() {
        let mut exclusive = settings(Target::Xid(1234));
        exclusive.inclusive = false;
        let text = exclusive.render();
        assert!(text.contains("recovery_target_xid = '1234'"), "{text}");
        assert!(text.contains("recovery_target_inclusive = 'off'"), "{text}");
    }

    #[test]
    fn immediate_and_end_of_archive() {
        let text = settings(Target::Immediate).render();
        assert!(text.contains("recovery_target = 'immediate'"));
        let text = settings(Target::EndOfArchive).render();
        assert!(!text.contains("recovery_target ="), "{text}");
        assert!(!text.contains("recovery_target_action"), "{text}");
    }
}
