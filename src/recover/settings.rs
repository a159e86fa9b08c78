//! The recovery configuration `walvault recover` leaves in a restored data directory:
//! `recovery.signal`, a block of settings appended to `postgresql.auto.conf`, and the walvault
//! configuration the `restore_command` reads ([`CARRIED_CONFIG_FILE`], no secrets).
//!
//! Understands PostgreSQL 12+ recovery configuration (`restore_command`, `recovery_target*`,
//! `recovery_target_action`, `recovery_target_timeline`), its quoting rules for configuration
//! values, and `/bin/sh` quoting for the `restore_command` it runs. Appending to
//! `postgresql.auto.conf` makes these settings override whatever the backed-up
//! `postgresql.conf` says, because the server reads the auto file last. Used by `recover`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::target::Target;
use super::RecoverError;
use crate::backup::window::TimelineChoice;
use crate::config::CarriedConfig;

/// The walvault configuration file `recover` writes into the data directory for the
/// `restore_command`, which runs in the server's environment rather than in this one.
pub(crate) const CARRIED_CONFIG_FILE: &str = "walvault-recovery.toml";

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
    /// What `fetch_command` needs from this call's configuration, written to
    /// [`CARRIED_CONFIG_FILE`].
    pub(crate) carried: CarriedConfig,
}

impl RecoverySettings {
    /// The lines appended to `postgresql.auto.conf`; refuses a value PostgreSQL's configuration
    /// file parser could not read back as written (a control character).
    pub(crate) fn render(&self) -> Result<String, RecoverError> {
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
            let _ = writeln!(text, "{key} = {}", conf_quote(key, &value)?);
        }
        Ok(text)
    }

    /// What the plan output says about the configuration the `restore_command` will see.
    pub(crate) fn describe_carried(&self, pgdata: &Path) -> String {
        let mut text = format!(
            "walvault configuration for restore_command, written to {} (mode 0600, no \
             credentials):\n{}",
            pgdata.join(CARRIED_CONFIG_FILE).display(),
            self.carried.toml.trim_end()
        );
        if !self.carried.env_credentials.is_empty() {
            let _ = write!(
                text,
                "\nnote: credentials came from the environment ({}) and are never written to a \
                 file: the PostgreSQL server's environment must set them for restore_command",
                self.carried.env_credentials.join(", ")
            );
        }
        text
    }

    /// Writes `recovery.signal` and appends the settings to `postgresql.auto.conf` in `pgdata`,
    /// after dropping the recovery targets an earlier recover left there (a backup of a cluster
    /// that was itself recovered carries them, and two kinds of target make PostgreSQL refuse to
    /// start). Each file is replaced whole and durably, so a crash leaves either the restored
    /// file or the new one, never a truncated `postgresql.auto.conf`, and a symlink the backup
    /// held is replaced, not followed.
    pub(crate) fn write(&self, pgdata: &Path) -> Result<(), RecoverError> {
        let settings = self.render()?;
        replace_file(pgdata, CARRIED_CONFIG_FILE, self.carried.toml.as_bytes())?;
        let auto_conf = pgdata.join("postgresql.auto.conf");
        // Not followed if it is a link: its text would be copied into the new file.
        let read = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&auto_conf)
            .and_then(std::io::read_to_string);
        let earlier = match read {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("read", &auto_conf)(e)),
        };
        let mut text: String = earlier
            .lines()
            .filter(|l| !l.trim_start().starts_with("recovery_target"))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&settings);
        replace_file(pgdata, "postgresql.auto.conf", text.as_bytes())?;
        // A standby.signal from the backup would make the server a standby that never ends
        // recovery, ignoring the target.
        let standby = pgdata.join("standby.signal");
        if standby.exists() {
            std::fs::remove_file(&standby).map_err(io("remove", &standby))?;
        }
        replace_file(pgdata, "recovery.signal", b"")?;
        std::fs::File::open(pgdata)
            .and_then(|dir| dir.sync_all())
            .map_err(io("sync", pgdata))
    }
}

/// Replaces `dir/name` with `content`, readable by its owner only: a temporary file written and
/// fsynced, then renamed over it (the caller syncs the directory).
fn replace_file(dir: &Path, name: &str, content: &[u8]) -> Result<(), RecoverError> {
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.walvault-tmp"));
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io("create", &temp))?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .map_err(io("write", &temp))?;
    std::fs::rename(&temp, &path).map_err(io("rename", &path))
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RecoverError {
    let path = path.to_path_buf();
    move |source| RecoverError::Io { what, path, source }
}

/// A configuration-file string as PostgreSQL's `guc-file.l` reads one: in single quotes, with
/// quotes doubled and backslashes escaped (the parser treats `\` as an escape). A control
/// character cannot be written at all (a newline ends the string; others are refused too, as
/// nothing legitimate holds them), so it is an error naming the setting.
fn conf_quote(key: &str, value: &str) -> Result<String, RecoverError> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(RecoverError::Invalid(format!(
            "cannot write {key} to postgresql.auto.conf: its value {value:?} holds the control \
             character {c:?}"
        )));
    }
    Ok(format!(
        "'{}'",
        value.replace('\\', "\\\\").replace('\'', "''")
    ))
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
            carried: CarriedConfig {
                toml: "repo = \"file:///r\"\n".into(),
                env_credentials: Vec::new(),
            },
        }
    }

    /// Reads `key = 'value'` lines as PostgreSQL's `guc-file.l` does: a string token is
    /// `'([^'\\\n]|\\.|'')*'`, then `\b \f \n \r \t`, octal `\ooo` and `\x` (any other x) are
    /// unescaped and `''` becomes `'`. Comment and blank lines are skipped; anything else fails.
    fn parse_guc_lines(text: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, rest) = line.split_once(" = ").expect(line);
            let mut chars = rest.strip_prefix('\'').expect(line).chars().peekable();
            let mut value = String::new();
            loop {
                match chars.next().expect("unterminated string") {
                    '\'' if chars.peek() == Some(&'\'') => {
                        chars.next();
                        value.push('\'');
                    }
                    '\'' => break,
                    '\\' => match chars.next().expect("dangling backslash") {
                        'b' => value.push('\u{8}'),
                        'f' => value.push('\u{c}'),
                        'n' => value.push('\n'),
                        'r' => value.push('\r'),
                        't' => value.push('\t'),
                        d @ '0'..='7' => {
                            let mut code = d.to_digit(8).unwrap();
                            for _ in 0..2 {
                                let Some(n) = chars.peek().and_then(|c| c.to_digit(8)) else {
                                    break;
                                };
                                code = code * 8 + n;
                                chars.next();
                            }
                            value.push(char::from_u32(code).unwrap());
                        }
                        other => value.push(other),
                    },
                    '\n' => panic!("newline inside a string"),
                    c => value.push(c),
                }
            }
            assert_eq!(chars.collect::<String>().trim(), "", "{line}");
            out.push((key.to_string(), value));
        }
        out
    }

    #[test]
    fn values_round_trip_through_postgresql_quoting() {
        for name in [
            "plain",
            "it's",
            r"back\slash",
            r"x\' restore_command = 'touch /tmp/pwned' #",
            r"ends in \",
            r"\101\n",
            "''",
        ] {
            let text = settings(Target::Name(name.into())).render().unwrap();
            let parsed = parse_guc_lines(&text);
            let names: Vec<_> = parsed
                .iter()
                .filter(|(k, _)| k == "recovery_target_name")
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(names, [name], "{text}");
            let commands: Vec<_> = parsed
                .iter()
                .filter(|(k, _)| k == "restore_command")
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(
                commands,
                [r"/usr/bin/walvault --config '/etc/wal vault'\''s.toml' wal-fetch %f %p"],
                "{text}"
            );
        }
    }

    #[test]
    fn control_characters_are_refused_naming_the_setting() {
        for name in [
            "a\nrestore_command = 'x'",
            "a\rb",
            "a\0b",
            "a\u{1b}[31m",
            "tab\there",
        ] {
            let err = settings(Target::Name(name.into()))
                .render()
                .unwrap_err()
                .to_string();
            assert!(err.contains("recovery_target_name"), "{err}");
        }
        let mut s = settings(Target::Immediate);
        s.fetch_command[2] = "/data/new\nline/walvault-recovery.toml".into();
        let err = s.render().unwrap_err().to_string();
        assert!(err.contains("restore_command"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        assert!(s.write(dir.path()).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Every file `write` leaves is private and replaces a link the backup held (to a file
    /// outside the data directory) instead of writing through it.
    #[test]
    fn written_files_are_private_and_replace_planted_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pgdata = dir.path().join("pgdata");
        std::fs::create_dir(&pgdata).unwrap();
        let names = [CARRIED_CONFIG_FILE, "recovery.signal"];
        for name in names {
            let outside = dir.path().join(format!("outside-{name}"));
            std::fs::write(&outside, "keep\n").unwrap();
            std::os::unix::fs::symlink(&outside, pgdata.join(name)).unwrap();
        }
        let s = settings(Target::Immediate);
        s.write(&pgdata).unwrap();
        for name in names {
            let meta = std::fs::symlink_metadata(pgdata.join(name)).unwrap();
            assert!(meta.is_file(), "{name} is still a link");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
            let outside = dir.path().join(format!("outside-{name}"));
            assert_eq!(
                std::fs::read_to_string(&outside).unwrap(),
                "keep\n",
                "{name}"
            );
        }
        let carried = std::fs::read_to_string(pgdata.join(CARRIED_CONFIG_FILE)).unwrap();
        assert_eq!(carried, s.carried.toml);
        let auto = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
        assert!(auto.contains("recovery_target = 'immediate'"), "{auto}");
        assert!(std::fs::read(pgdata.join("recovery.signal"))
            .unwrap()
            .is_empty());
        assert!(!pgdata.read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with("walvault-tmp")));

        // postgresql.auto.conf is read before it is replaced: a link there is refused, neither
        // read nor written through.
        let outside = dir.path().join("secret");
        std::fs::write(&outside, "secret\n").unwrap();
        let auto_conf = pgdata.join("postgresql.auto.conf");
        std::fs::remove_file(&auto_conf).unwrap();
        std::os::unix::fs::symlink(&outside, &auto_conf).unwrap();
        let err = s.write(&pgdata).unwrap_err().to_string();
        assert!(err.contains("postgresql.auto.conf"), "{err}");
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret\n");
    }

    #[test]
    fn renders_quoted_settings() {
        let text = settings(Target::Time(UnixMicros(1_763_726_400_000_001)))
            .render()
            .unwrap();
        assert!(
            text.contains(
                r"restore_command = '/usr/bin/walvault --config ''/etc/wal vault''\\''''s.toml'' wal-fetch %f %p'"
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
        let text = exclusive.render().unwrap();
        assert!(text.contains("recovery_target_xid = '1234'"), "{text}");
        assert!(text.contains("recovery_target_inclusive = 'off'"), "{text}");
    }

    #[test]
    fn immediate_and_end_of_archive() {
        let text = settings(Target::Immediate).render().unwrap();
        assert!(text.contains("recovery_target = 'immediate'"));
        let text = settings(Target::EndOfArchive).render().unwrap();
        assert!(!text.contains("recovery_target ="), "{text}");
        assert!(!text.contains("recovery_target_action"), "{text}");
    }

    #[test]
    fn the_plan_says_which_credentials_the_server_must_carry() {
        let mut s = settings(Target::Immediate);
        let text = s.describe_carried(Path::new("/data"));
        assert!(text.contains("/data/walvault-recovery.toml"), "{text}");
        assert!(text.contains("repo = \"file:///r\""), "{text}");
        assert!(!text.contains("environment"), "{text}");
        s.carried.env_credentials = vec!["WALVAULT_S3_SECRET_ACCESS_KEY"];
        let text = s.describe_carried(Path::new("/data"));
        assert!(
            text.contains("WALVAULT_S3_SECRET_ACCESS_KEY")
                && text.contains("server's environment must set them"),
            "{text}"
        );
    }
}
