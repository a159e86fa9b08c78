//! Settings: where the repository is and how to talk to it, gathered from three layers.
//!
//! Precedence is flags > environment (`WALVAULT_*`) > config file (TOML, `--config` or
//! `WALVAULT_CONFIG`). Every value remembers the layer it came from, so an error names both the key
//! and its source ("invalid value "x" for s3.timeout (from environment variable WALVAULT_S3_TIMEOUT)").
//! All layers are read as text and parsed once, here, into [`Settings`]; the rest of walvault
//! only sees typed values; `layers` reads and merges the layers. Used by the CLI edge (`cmd/`)
//! and the repository layer.

mod layers;

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::repo::Compression;

/// Every setting: its key in the config file (dotted for tables) and its environment variable.
const KEYS: &[(&str, &str)] = &[
    ("repo", "WALVAULT_REPO"),
    ("spool_dir", "WALVAULT_SPOOL_DIR"),
    ("push_concurrency", "WALVAULT_PUSH_CONCURRENCY"),
    ("prefetch", "WALVAULT_PREFETCH"),
    ("compression", "WALVAULT_COMPRESSION"),
    ("backup_concurrency", "WALVAULT_BACKUP_CONCURRENCY"),
    ("delta_max_steps", "WALVAULT_DELTA_MAX_STEPS"),
    ("pg_timeout", "WALVAULT_PG_TIMEOUT"),
    ("backup_stop_timeout", "WALVAULT_BACKUP_STOP_TIMEOUT"),
    ("s3.endpoint", "WALVAULT_S3_ENDPOINT"),
    ("s3.region", "WALVAULT_S3_REGION"),
    ("s3.force_path_style", "WALVAULT_S3_FORCE_PATH_STYLE"),
    ("s3.access_key_id", "WALVAULT_S3_ACCESS_KEY_ID"),
    ("s3.secret_access_key", "WALVAULT_S3_SECRET_ACCESS_KEY"),
    ("s3.timeout", "WALVAULT_S3_TIMEOUT"),
    ("s3.max_attempts", "WALVAULT_S3_MAX_ATTEMPTS"),
    ("s3.part_size", "WALVAULT_S3_PART_SIZE"),
    ("retention.full", "WALVAULT_RETENTION_FULL"),
    ("retention.window", "WALVAULT_RETENTION_WINDOW"),
    ("retention.daily", "WALVAULT_RETENTION_DAILY"),
    ("retention.weekly", "WALVAULT_RETENTION_WEEKLY"),
    ("retention.monthly", "WALVAULT_RETENTION_MONTHLY"),
    ("retention.yearly", "WALVAULT_RETENTION_YEARLY"),
    ("retention.auto", "WALVAULT_RETENTION_AUTO"),
    ("retention.grace", "WALVAULT_RETENTION_GRACE"),
    ("hooks.on_success", "WALVAULT_HOOKS_ON_SUCCESS"),
    ("hooks.on_failure", "WALVAULT_HOOKS_ON_FAILURE"),
    ("hooks.timeout", "WALVAULT_HOOKS_TIMEOUT"),
    ("s3.sse", "WALVAULT_S3_SSE"),
    ("s3.sse_kms_key_id", "WALVAULT_S3_SSE_KMS_KEY_ID"),
    ("s3.storage_class", "WALVAULT_S3_STORAGE_CLASS"),
    ("s3.storage_class_wal", "WALVAULT_S3_STORAGE_CLASS_WAL"),
    (
        "s3.storage_class_backup",
        "WALVAULT_S3_STORAGE_CLASS_BACKUP",
    ),
    ("encryption.recipients", "WALVAULT_ENCRYPTION_RECIPIENTS"),
    (
        "encryption.recipients_file",
        "WALVAULT_ENCRYPTION_RECIPIENTS_FILE",
    ),
    (
        "encryption.identity_file",
        "WALVAULT_ENCRYPTION_IDENTITY_FILE",
    ),
];

/// Settings that hold a list: a TOML array of strings (or one string) in the file, comma-separated
/// in the environment. Kept as newline-separated text until parsed.
const LIST_KEYS: &[&str] = &["encryption.recipients", "encryption.identity_file"];

/// The tables a config file may have, and the prefix of their keys.
const TABLES: &[&str] = &["s3", "encryption", "retention", "hooks"];

/// Settings that are never carried into a restored cluster's config file: hook command lines
/// may embed a webhook token, and a restored cluster runs no hooks.
fn is_not_carried(key: &str) -> bool {
    key.starts_with("hooks.")
}

/// Settings whose values are credentials: never printed, logged or carried into a file.
const SECRET_KEYS: &[&str] = &["s3.access_key_id", "s3.secret_access_key"];

/// Bounds of `s3.timeout`: the whole-call bound is the attempts times this, and both must stay
/// far from the limits of the clocks the timers run on.
const S3_TIMEOUT_MIN: Duration = Duration::from_millis(100);
const S3_TIMEOUT_MAX: Duration = Duration::from_secs(3600);

fn is_secret(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    File(PathBuf),
    Env(&'static str),
    Flag(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "config file {}", p.display()),
            Source::Env(v) => write!(f, "environment variable {v}"),
            Source::Flag(n) => write!(f, "flag {n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid value {value:?} for {key} (from {origin}): {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Source,
        reason: String,
    },
    #[error(
        "no repository configured: pass --repo, set WALVAULT_REPO, or set `repo` in a config file"
    )]
    NoRepo,
}

/// A repository location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RepoUrl {
    /// `file:///abs/path`
    Local(PathBuf),
    /// `s3://bucket/prefix`; the prefix has no leading or trailing slash and may be empty.
    S3 { bucket: String, prefix: String },
}

impl FromStr for RepoUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("file://") {
            let path = Path::new(path);
            if !path.is_absolute() {
                return Err("a file:// repository needs an absolute path (file:///path)".into());
            }
            // The repository owns its directory (it creates and deletes below it), so a root
            // such as `/` or one reached through `..` would put the whole file system in reach.
            if path.components().any(|c| c == Component::ParentDir) {
                return Err("a file:// repository path must not contain `..`".into());
            }
            if !path.components().any(|c| matches!(c, Component::Normal(_))) {
                return Err(
                    "a file:// repository cannot be the root directory: name a directory of its \
                     own (file:///var/lib/walvault)"
                        .into(),
                );
            }
            Ok(RepoUrl::Local(path.to_path_buf()))
        } else if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err("an s3:// repository needs a bucket (s3://bucket/prefix)".into());
            }
            Ok(RepoUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            })
        } else {
            Err("expected file:///abs/path or s3://bucket/prefix".into())
        }
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoUrl::Local(p) => write!(f, "file://{}", p.display()),
            RepoUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RepoUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// How to reach an S3-compatible service. `Debug` leaves the credentials out.
#[derive(Clone)]
pub(crate) struct S3Settings {
    pub(crate) endpoint: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) force_path_style: bool,
    pub(crate) access_key_id: Option<String>,
    pub(crate) secret_access_key: Option<String>,
    /// Bound on one request attempt (and on each read of a response body).
    pub(crate) timeout: Duration,
    pub(crate) max_attempts: u32,
    /// Objects larger than this are uploaded in parts of this size.
    pub(crate) part_size: usize,
    /// Server-side encryption asked for on every upload.
    pub(crate) sse: Option<ServerSideEncryption>,
    /// Storage class of WAL objects (WAL, summaries, fragments) and of everything else.
    pub(crate) storage_class_wal: Option<String>,
    pub(crate) storage_class_backup: Option<String>,
}

/// `s3.sse`: what the S3 service encrypts stored objects with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ServerSideEncryption {
    Aes256,
    /// `aws:kms`, with the key `s3.sse_kms_key_id` names (the service's default key if none).
    Kms {
        key_id: Option<String>,
    },
}

/// `[encryption]`: age recipients that writers encrypt to, identity files readers decrypt with.
/// Holds public keys and paths only; the identities are read by `repo::crypt` when a repository
/// is opened and never kept here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EncryptionSettings {
    pub(crate) recipients: Vec<String>,
    pub(crate) recipients_file: Option<PathBuf>,
    pub(crate) identity_files: Vec<PathBuf>,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |v: &Option<String>| v.as_ref().map(|_| "(set)");
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .field("access_key_id", &set(&self.access_key_id))
            .field("secret_access_key", &set(&self.secret_access_key))
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("part_size", &self.part_size)
            .field("sse", &self.sse)
            .field("storage_class_wal", &self.storage_class_wal)
            .field("storage_class_backup", &self.storage_class_backup)
            .finish()
    }
}

/// Everything a command needs to know, typed.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) repo: RepoUrl,
    pub(crate) s3: S3Settings,
    /// Spool for push-ahead markers and prefetched WAL; `None` means next to `pg_wal`.
    pub(crate) spool_dir: Option<PathBuf>,
    pub(crate) push_concurrency: usize,
    pub(crate) prefetch: usize,
    pub(crate) compression: Compression,
    /// Files read, packs compressed and uploaded in parallel by backup-push and backup-fetch.
    pub(crate) backup_concurrency: usize,
    /// Deltas allowed after a full backup before backup-push takes a full one again.
    pub(crate) delta_max_steps: u32,
    /// Bound on one reply on the SQL connection (backup-push, recover --start).
    pub(crate) pg_timeout: Duration,
    /// Bound on the wait for the backup's last WAL segment to reach the repository.
    pub(crate) backup_stop_timeout: Duration,
    /// `[retention]`: the policy `delete` applies (its flags layered over it).
    pub(crate) retention: crate::retention::Policy,
    /// Whether backup-push applies the policy after a successful backup (default: when one is
    /// configured).
    pub(crate) retention_auto: bool,
    /// How old leftovers of interrupted writes must be before retention removes them.
    pub(crate) retention_grace: Duration,
    pub(crate) hooks: HookSettings,
    pub(crate) encryption: EncryptionSettings,
}

/// `[hooks]`: shell command lines run after backup-push, delete, drill and check.
#[derive(Clone, Debug)]
pub(crate) struct HookSettings {
    pub(crate) on_success: Option<String>,
    pub(crate) on_failure: Option<String>,
    /// Bound on one hook run; the hook is killed after it.
    pub(crate) timeout: Duration,
}

/// Values set on the command line; `None` where the flag was not given.
#[derive(Clone, Debug, Default)]
pub(crate) struct FlagValues {
    pub(crate) config: Option<PathBuf>,
    pub(crate) repo: Option<String>,
    pub(crate) push_concurrency: Option<String>,
    pub(crate) prefetch: Option<String>,
    pub(crate) backup_concurrency: Option<String>,
    pub(crate) delta_max_steps: Option<String>,
    /// `delete --retain-full`, `--retain-window`, `--keep-daily` ... `--keep-yearly`.
    pub(crate) retention: [Option<String>; 6],
}

use layers::Layers;

impl Settings {
    /// Reads the config file (if any), the environment and the flags, and parses them.
    pub(crate) fn load(flags: &FlagValues) -> Result<Settings, ConfigError> {
        Self::from_sources(flags, |name| std::env::var(name).ok())
    }

    fn from_sources(
        flags: &FlagValues,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        Layers::gather(flags, env)?.0.settings()
    }

    /// The configuration `recover` hands on to the restored cluster's `restore_command`, which
    /// runs in the PostgreSQL server's environment, not in this one (see [`CarriedConfig`]).
    pub(crate) fn carried(flags: &FlagValues) -> Result<CarriedConfig, ConfigError> {
        Self::carried_from_sources(flags, |name| std::env::var(name).ok())
    }

    fn carried_from_sources(
        flags: &FlagValues,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<CarriedConfig, ConfigError> {
        let (layers, file) = Layers::gather(flags, &env)?;
        let mut toml = String::from(
            "# Written by walvault recover for this cluster's restore_command: the settings of \
             the\n# recover call that did not come from its config file. Credentials are never \
             written here.\n",
        );
        if let Some(file) = file {
            let file = std::path::absolute(&file).unwrap_or(file);
            let _ = writeln!(
                toml,
                "include = {}",
                toml_string(&file.display().to_string())
            );
        }
        let mut carried: Vec<(&str, String)> = layers
            .0
            .iter()
            .filter(|(key, v)| {
                !is_secret(key) && !is_not_carried(key) && !matches!(v.source, Source::File(_))
            })
            .map(|(key, v)| (*key, v.text.clone()))
            .collect();
        // The S3 client falls back to these for the region; the server may not have them.
        if !layers.0.contains_key("s3.region") {
            if let Some(region) = ["AWS_REGION", "AWS_DEFAULT_REGION"]
                .iter()
                .find_map(|v| env(v).filter(|r| !r.is_empty()))
            {
                carried.push(("s3.region", region));
            }
        }
        carried.sort_by_key(|(key, _)| key.starts_with("s3."));
        let mut in_s3 = false;
        for (key, text) in carried {
            let name = match key.strip_prefix("s3.") {
                Some(name) => {
                    if !in_s3 {
                        toml.push_str("[s3]\n");
                        in_s3 = true;
                    }
                    name
                }
                None => key,
            };
            let _ = writeln!(toml, "{name} = {}", toml_string(&text));
        }
        let env_credentials = SECRET_KEYS
            .iter()
            .filter_map(|key| match layers.0.get(key).map(|v| &v.source) {
                Some(Source::Env(var)) => Some(*var),
                _ => None,
            })
            .chain(
                [
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN",
                    "AWS_PROFILE",
                ]
                .into_iter()
                .filter(|var| env(var).is_some()),
            )
            .collect();
        Ok(CarriedConfig {
            toml,
            env_credentials,
        })
    }
}

/// What `recover` carries into the restored data directory for `restore_command`: a config file
/// that includes the one this call read (its secrets stay there) and sets every other non-secret
/// value that came from the environment or a flag, so recovery sees what planning saw.
#[derive(Clone, Debug)]
pub(crate) struct CarriedConfig {
    /// The file's TOML text.
    pub(crate) toml: String,
    /// Environment variables with credentials this call could use: never written to a file,
    /// so the server's environment must set them too.
    pub(crate) env_credentials: Vec<&'static str>,
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_map(env: &[(&str, &str)]) -> HashMap<String, String> {
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(flags: FlagValues, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env = env_map(env);
        Settings::from_sources(&flags, |k| env.get(k).cloned())
    }

    /// Loads with `--config path` as the only flag.
    fn load_file(path: PathBuf, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let flags = FlagValues {
            config: Some(path),
            ..Default::default()
        };
        load(flags, env)
    }

    fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walvault.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let (_d, path) = config_file(
            "repo = \"file:///from/file\"\nprefetch = 3\npush_concurrency = 2\n[s3]\ntimeout = \"7s\"\n",
        );
        let flags = FlagValues {
            config: Some(path),
            repo: Some("s3://flag-bucket/a/b/".into()),
            ..Default::default()
        };
        let s = load(
            flags,
            &[
                ("WALVAULT_REPO", "file:///from/env"),
                ("WALVAULT_PREFETCH", "5"),
            ],
        )
        .unwrap();
        assert_eq!(
            s.repo,
            RepoUrl::S3 {
                bucket: "flag-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(s.prefetch, 5);
        assert_eq!(s.push_concurrency, 2);
        assert_eq!(s.s3.timeout, Duration::from_secs(7));
    }

    /// `[retention]` from the file, `WALVAULT_RETENTION_*` over it, `delete`'s flags over both;
    /// errors name the flag.
    #[test]
    fn retention_rules_layer_like_every_setting() {
        let (_d, path) = config_file(
            "repo = \"file:///r\"\n[retention]\nfull = 2\nwindow = \"14d\"\nauto = false\n",
        );
        let mut flags = FlagValues {
            config: Some(path.clone()),
            ..Default::default()
        };
        flags.retention[0] = Some("1".into());
        let s = load(flags.clone(), &[("WALVAULT_RETENTION_DAILY", "7")]).unwrap();
        assert_eq!(s.retention.full, Some(1));
        assert_eq!(s.retention.window, Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(s.retention.daily, Some(7));
        assert!(!s.retention_auto);
        assert_eq!(s.retention_grace, Duration::from_secs(86_400));
        flags.retention[0] = Some("0".into());
        let err = load(flags, &[]).unwrap_err().to_string();
        assert!(err.contains("flag --retain-full"), "{err}");
        let (_d, path) = config_file("repo = \"file:///r\"\n");
        assert!(load_file(path, &[]).unwrap().retention.is_empty());
    }

    /// `[hooks]` reads from the file and the environment; hook command lines (which may hold a
    /// webhook token) are never carried into a restored cluster's config file.
    #[test]
    fn hooks_are_read_and_never_carried() {
        let (_d, path) = config_file(
            "repo = \"file:///r\"\n[hooks]\non_success = \"echo ok\"\ntimeout = \"5s\"\n",
        );
        let env = [("WALVAULT_HOOKS_ON_FAILURE", "curl https://t/secret")];
        let s = load_file(path.clone(), &env).unwrap();
        assert_eq!(s.hooks.on_success.as_deref(), Some("echo ok"));
        assert_eq!(s.hooks.on_failure.as_deref(), Some("curl https://t/secret"));
        assert_eq!(s.hooks.timeout, Duration::from_secs(5));
        let flags = FlagValues {
            config: Some(path),
            ..Default::default()
        };
        let carried = Settings::carried_from_sources(&flags, |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        assert!(!carried.toml.contains("secret"), "{}", carried.toml);
        let (_d, bad) = config_file("repo = \"file:///r\"\n[hooks]\ntimeout = \"0s\"\n");
        assert!(load_file(bad, &[]).is_err());
    }

    #[test]
    fn config_file_comes_from_the_environment_too() {
        let (_d, path) = config_file("repo = \"file:///r\"\n");
        let s = load(
            FlagValues::default(),
            &[("WALVAULT_CONFIG", path.to_str().unwrap())],
        )
        .unwrap();
        assert_eq!(s.repo, RepoUrl::Local("/r".into()));
    }

    #[test]
    fn errors_name_the_key_and_its_source() {
        let err = load(
            FlagValues::default(),
            &[
                ("WALVAULT_REPO", "file:///r"),
                ("WALVAULT_S3_TIMEOUT", "soon"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("s3.timeout") && err.contains("WALVAULT_S3_TIMEOUT"),
            "{err}"
        );

        let (_d, path) = config_file("repo = \"relative/path\"\n");
        let err = load_file(path.clone(), &[]).unwrap_err().to_string();
        assert!(
            err.contains("repo") && err.contains(path.to_str().unwrap()),
            "{err}"
        );
    }

    #[test]
    fn malformed_and_unknown_file_content_is_refused() {
        let (_d, path) = config_file("repo = \n");
        let err = load_file(path, &[]).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{err}");

        let (_d, path) = config_file("repo = \"file:///r\"\n[s3]\nendpiont = \"x\"\n");
        let err = load_file(path, &[]).unwrap_err().to_string();
        assert!(err.contains("unknown key s3.endpiont"), "{err}");
    }

    #[test]
    fn missing_file_and_missing_repo_are_clear() {
        let err = load_file("/nonexistent/walvault.toml".into(), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/walvault.toml"), "{err}");
        assert!(matches!(
            load(FlagValues::default(), &[]),
            Err(ConfigError::NoRepo)
        ));
    }

    #[test]
    fn postgres_timeouts_have_defaults_and_bounds() {
        let s = load(FlagValues::default(), &[("WALVAULT_REPO", "file:///r")]).unwrap();
        assert_eq!(s.pg_timeout, Duration::from_secs(60));
        assert_eq!(s.backup_stop_timeout, Duration::from_secs(600));
        let (_d, path) = config_file("repo = \"file:///r\"\npg_timeout = \"5s\"\n");
        let s = load_file(path, &[("WALVAULT_BACKUP_STOP_TIMEOUT", "2m")]).unwrap();
        assert_eq!(s.pg_timeout, Duration::from_secs(5));
        assert_eq!(s.backup_stop_timeout, Duration::from_secs(120));
        let err = load(
            FlagValues::default(),
            &[
                ("WALVAULT_REPO", "file:///r"),
                ("WALVAULT_PG_TIMEOUT", "100000000000d"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("WALVAULT_PG_TIMEOUT"), "{err}");
    }

    #[test]
    fn repo_urls_parse_and_display() {
        for (text, shown) in [
            ("file:///var/lib/walvault", "file:///var/lib/walvault"),
            ("s3://bucket", "s3://bucket"),
            ("s3://bucket/", "s3://bucket"),
            ("s3://bucket/x/y", "s3://bucket/x/y"),
        ] {
            assert_eq!(text.parse::<RepoUrl>().unwrap().to_string(), shown);
        }
        for bad in [
            "file://rel",
            "s3://",
            "/abs/path",
            "http://x",
            "file:///",
            "file:////",
            "file:///.",
            "file:///..",
            "file:///var/..",
            "file:///var/../etc",
        ] {
            assert!(bad.parse::<RepoUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn s3_timeout_is_bounded() {
        for bad in ["0s", "50ms", "2h", "100000000000000s", "584542046090years"] {
            let err = load(
                FlagValues::default(),
                &[("WALVAULT_REPO", "s3://b"), ("WALVAULT_S3_TIMEOUT", bad)],
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("s3.timeout"), "{bad}: {err}");
        }
        let s = load(
            FlagValues::default(),
            &[("WALVAULT_REPO", "s3://b"), ("WALVAULT_S3_TIMEOUT", "1h")],
        )
        .unwrap();
        assert_eq!(s.s3.timeout, Duration::from_secs(3600));
    }

    #[test]
    fn secrets_stay_out_of_errors_and_debug_output() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let key_id = "AKIAIOSFODNN7EXAMPLE";
        for text in [
            format!("repo = \"s3://b\"\n[s3]\nsecret_access_key = \"{secret}\n"),
            format!("repo = \"s3://b\"\n[s3]\nsecret_access_key = \"{secret}\" x\n"),
            format!("repo = \"s3://b\"\n[s3]\naccess_key_id = {key_id}\n"),
            format!("[s3]\nsecret_access_key = \"{secret}\\q\"\n"),
        ] {
            let (_d, path) = config_file(&text);
            let err = load_file(path, &[]).unwrap_err().to_string();
            assert!(err.contains("line 3") || err.contains("line 2"), "{err}");
            assert!(!err.contains(secret) && !err.contains(key_id), "{err}");
            assert!(!err.contains("EXAMPLE"), "{err}");
        }

        let s = load(
            FlagValues::default(),
            &[
                ("WALVAULT_REPO", "s3://b"),
                ("WALVAULT_S3_ACCESS_KEY_ID", key_id),
                ("WALVAULT_S3_SECRET_ACCESS_KEY", secret),
            ],
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains(key_id) && !shown.contains(secret),
            "{shown}"
        );
        assert!(shown.contains("access_key_id: Some(\"(set)\")"), "{shown}");
    }
    #[test]
    fn carried_config_reproduces_the_settings_without_secrets() {
        let secret = "file-secret-value";
        let (_d, path) = config_file(&format!(
            "repo = \"s3://from-file\"\nprefetch = 3\n[s3]\naccess_key_id = \"file-id\"\n\
             secret_access_key = \"{secret}\"\ntimeout = \"9s\"\n"
        ));
        let env = [
            ("WALVAULT_CONFIG", path.to_str().unwrap()),
            ("WALVAULT_S3_ENDPOINT", "http://127.0.0.1:9/a \"b\"\\c"),
            ("WALVAULT_S3_FORCE_PATH_STYLE", "true"),
            ("AWS_REGION", "eu-west-3"),
            ("WALVAULT_S3_SECRET_ACCESS_KEY", "env-secret-value"),
        ];
        let flags = FlagValues {
            repo: Some("s3://bucket/prefix".into()),
            ..Default::default()
        };
        let map = env_map(&env);
        let carried = Settings::carried_from_sources(&flags, |k| map.get(k).cloned()).unwrap();
        assert!(!carried.toml.contains("secret-value"), "{}", carried.toml);
        assert!(!carried.toml.contains("file-id"), "{}", carried.toml);
        assert_eq!(
            carried.env_credentials,
            ["WALVAULT_S3_SECRET_ACCESS_KEY"],
            "{}",
            carried.toml
        );

        // In the server's environment (none of the above), the carried file gives the same
        // settings, with the secrets the config file holds.
        let (_d2, carried_path) = config_file(&carried.toml);
        let s = load_file(carried_path, &[]).unwrap();
        assert_eq!(
            s.repo,
            RepoUrl::S3 {
                bucket: "bucket".into(),
                prefix: "prefix".into()
            }
        );
        assert_eq!(
            s.s3.endpoint.as_deref(),
            Some("http://127.0.0.1:9/a \"b\"\\c")
        );
        assert!(s.s3.force_path_style);
        assert_eq!(s.s3.region.as_deref(), Some("eu-west-3"));
        assert_eq!(s.s3.timeout, Duration::from_secs(9));
        assert_eq!(s.prefetch, 3);
        assert_eq!(s.s3.access_key_id.as_deref(), Some("file-id"));
        assert_eq!(s.s3.secret_access_key.as_deref(), Some(secret));
    }

    const R1: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
    const R2: &str = "age1lggyhqrw2nlhcxprm67z43rta597azn8gknawjehu9d9dl0jq3yqqvfafg";

    #[test]
    fn encryption_keys_come_from_arrays_strings_and_comma_lists() {
        let (_d, path) = config_file(&format!(
            "repo = \"file:///r\"\n[encryption]\nrecipients = [\"{R1}\", \"{R2}\"]\n\
             identity_file = \"/etc/walvault/id.txt\"\n"
        ));
        let s = load_file(path.clone(), &[]).unwrap();
        assert_eq!(s.encryption.recipients, [R1, R2]);
        assert_eq!(
            s.encryption.identity_files,
            [PathBuf::from("/etc/walvault/id.txt")]
        );

        let s = load_file(
            path,
            &[
                ("WALVAULT_ENCRYPTION_RECIPIENTS", &format!(" {R2} ,")),
                ("WALVAULT_ENCRYPTION_IDENTITY_FILE", "/a/new.txt,/a/old.txt"),
            ],
        )
        .unwrap();
        assert_eq!(s.encryption.recipients, [R2]);
        assert_eq!(
            s.encryption.identity_files,
            [PathBuf::from("/a/new.txt"), PathBuf::from("/a/old.txt")]
        );

        let err = load(
            FlagValues::default(),
            &[
                ("WALVAULT_REPO", "file:///r"),
                ("WALVAULT_ENCRYPTION_RECIPIENTS", "age1typo"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("encryption.recipients") && err.contains("WALVAULT_ENCRYPTION_RECIPIENTS"),
            "{err}"
        );
    }

    /// recover's restore_command must decrypt as planning did: the keys' settings are carried.
    #[test]
    fn carried_config_keeps_the_encryption_settings() {
        let env = [
            ("WALVAULT_REPO", "file:///r"),
            ("WALVAULT_ENCRYPTION_RECIPIENTS", &*format!("{R1},{R2}")),
            ("WALVAULT_ENCRYPTION_IDENTITY_FILE", "/k/a.txt,/k/b.txt"),
            ("WALVAULT_S3_SSE", "aws:kms"),
        ];
        let map = env_map(&env);
        let carried =
            Settings::carried_from_sources(&FlagValues::default(), |k| map.get(k).cloned())
                .unwrap();
        let (_d, path) = config_file(&carried.toml);
        let s = load_file(path, &[]).unwrap();
        assert_eq!(s.encryption.recipients, [R1, R2], "{}", carried.toml);
        assert_eq!(s.encryption.identity_files.len(), 2, "{}", carried.toml);
        assert_eq!(s.s3.sse, Some(ServerSideEncryption::Kms { key_id: None }));
    }

    #[test]
    fn server_side_encryption_and_storage_classes_are_checked() {
        let base = [("WALVAULT_REPO", "s3://b")];
        let with = |extra: &[(&str, &str)]| {
            let mut env = base.to_vec();
            env.extend_from_slice(extra);
            load(FlagValues::default(), &env)
        };
        let s = with(&[
            ("WALVAULT_S3_SSE", "aws:kms"),
            ("WALVAULT_S3_SSE_KMS_KEY_ID", "alias/walvault"),
            ("WALVAULT_S3_STORAGE_CLASS", "STANDARD_IA"),
            ("WALVAULT_S3_STORAGE_CLASS_BACKUP", "GLACIER_IR"),
        ])
        .unwrap();
        assert_eq!(
            s.s3.sse,
            Some(ServerSideEncryption::Kms {
                key_id: Some("alias/walvault".into())
            })
        );
        assert_eq!(s.s3.storage_class_wal.as_deref(), Some("STANDARD_IA"));
        assert_eq!(s.s3.storage_class_backup.as_deref(), Some("GLACIER_IR"));
        assert_eq!(
            with(&[("WALVAULT_S3_SSE", "AES256")]).unwrap().s3.sse,
            Some(ServerSideEncryption::Aes256)
        );
        for bad in [
            &[("WALVAULT_S3_SSE", "aes256")][..],
            &[("WALVAULT_S3_SSE_KMS_KEY_ID", "k")],
            &[
                ("WALVAULT_S3_SSE", "AES256"),
                ("WALVAULT_S3_SSE_KMS_KEY_ID", "k"),
            ],
            &[("WALVAULT_S3_STORAGE_CLASS_WAL", "standard ia")],
        ] {
            assert!(with(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn includes_are_absolute_and_shallow() {
        let (_d, path) = config_file("include = \"relative.toml\"\n");
        let err = load_file(path.clone(), &[]).unwrap_err().to_string();
        assert!(err.contains("absolute"), "{err}");
        // A file including itself stops at the depth bound.
        std::fs::write(&path, format!("include = {:?}\n", path.to_str().unwrap())).unwrap();
        let err = load_file(path, &[]).unwrap_err().to_string();
        assert!(err.contains("nest deeper"), "{err}");
    }
}
