//! The layers of settings and their merge: the config file (with its `include`s, TOML tables
//! flattened to dotted keys), the environment and the flags, each value with the layer it came
//! from, highest precedence winning; then every key parsed once into [`Settings`], errors naming
//! the key and its source.

use super::*;

pub(super) struct Value {
    pub(super) text: String,
    pub(super) source: Source,
}

/// The merged text values, highest precedence winning.
pub(super) struct Layers(pub(super) BTreeMap<&'static str, Value>);

/// How deep `include` may nest: `recover`'s carried file includes a config file that may
/// include one of its own.
const MAX_INCLUDE_DEPTH: usize = 3;

impl Layers {
    /// Every layer, and the config file read (if any).
    pub(super) fn gather(
        flags: &FlagValues,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Layers, Option<PathBuf>), ConfigError> {
        let mut layers = Layers(BTreeMap::new());
        let config_file = flags
            .config
            .clone()
            .or_else(|| env("WALVAULT_CONFIG").map(PathBuf::from));
        if let Some(path) = &config_file {
            layers.read_file(path, 0)?;
        }
        for (key, var) in KEYS {
            if let Some(text) = env(var) {
                let text = if LIST_KEYS.contains(key) {
                    text.replace(',', "\n")
                } else {
                    text
                };
                layers.set(key, text, Source::Env(var));
            }
        }
        let flag_values = [
            ("repo", "--repo", &flags.repo),
            ("push_concurrency", "--concurrency", &flags.push_concurrency),
            ("prefetch", "--prefetch", &flags.prefetch),
            (
                "backup_concurrency",
                "--concurrency",
                &flags.backup_concurrency,
            ),
            (
                "delta_max_steps",
                "--delta-max-steps",
                &flags.delta_max_steps,
            ),
        ];
        let retention_flags = [
            ("retention.full", "--retain-full"),
            ("retention.window", "--retain-window"),
            ("retention.daily", "--keep-daily"),
            ("retention.weekly", "--keep-weekly"),
            ("retention.monthly", "--keep-monthly"),
            ("retention.yearly", "--keep-yearly"),
        ];
        let retention_values = retention_flags
            .iter()
            .zip(&flags.retention)
            .map(|((key, flag), value)| (*key, *flag, value));
        for (key, flag, value) in flag_values.into_iter().chain(retention_values) {
            if let Some(text) = value {
                layers.set(key, text.clone(), Source::Flag(flag));
            }
        }
        Ok((layers, config_file))
    }

    fn set(&mut self, key: &str, text: String, source: Source) {
        if let Some((k, _)) = KEYS.iter().find(|(k, _)| *k == key) {
            self.0.insert(k, Value { text, source });
        }
    }

    /// Reads a config file; its `include` (an absolute path) is read first, so the including
    /// file's own values win.
    fn read_file(&mut self, path: &Path, depth: usize) -> Result<(), ConfigError> {
        let file_err = |reason: String| ConfigError::File {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| file_err(syntax_error(&text, &e)))?;
        if let Some(include) = table.remove("include") {
            let toml::Value::String(include) = include else {
                return Err(file_err("include: expected a path".into()));
            };
            let include = Path::new(&include);
            if !include.is_absolute() {
                return Err(file_err(format!(
                    "include {}: expected an absolute path",
                    include.display()
                )));
            }
            if depth >= MAX_INCLUDE_DEPTH {
                return Err(file_err(format!(
                    "include {}: includes nest deeper than {MAX_INCLUDE_DEPTH}",
                    include.display()
                )));
            }
            self.read_file(include, depth + 1)?;
        }
        self.read_table(&table, "", path)
    }

    fn read_table(
        &mut self,
        table: &toml::Table,
        prefix: &str,
        path: &Path,
    ) -> Result<(), ConfigError> {
        for (name, value) in table {
            let key = format!("{prefix}{name}");
            let text = match value {
                toml::Value::Table(inner)
                    if prefix.is_empty() && TABLES.contains(&name.as_str()) =>
                {
                    self.read_table(inner, &format!("{name}."), path)?;
                    continue;
                }
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(items) if LIST_KEYS.contains(&key.as_str()) => {
                    let mut texts = Vec::with_capacity(items.len());
                    for item in items {
                        let toml::Value::String(text) = item else {
                            return Err(ConfigError::File {
                                path: path.to_path_buf(),
                                reason: format!("key {key}: expected an array of strings"),
                            });
                        };
                        texts.push(text.as_str());
                    }
                    texts.join("\n")
                }
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(ConfigError::File {
                        path: path.to_path_buf(),
                        reason: format!("key {key}: expected a string, number or boolean"),
                    })
                }
            };
            if !KEYS.iter().any(|(k, _)| *k == key) {
                return Err(ConfigError::File {
                    path: path.to_path_buf(),
                    reason: format!("unknown key {key}"),
                });
            }
            self.set(&key, text, Source::File(path.to_path_buf()));
        }
        Ok(())
    }

    /// Parses one value, if set, with an error naming key and source.
    fn get<T>(
        &self,
        key: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let Some(v) = self.0.get(key) else {
            return Ok(None);
        };
        parse(v.text.trim())
            .map(Some)
            .map_err(|reason| ConfigError::Invalid {
                key,
                value: if is_secret(key) {
                    "(hidden)".to_owned()
                } else {
                    v.text.clone()
                },
                origin: v.source.clone(),
                reason,
            })
    }

    pub(super) fn settings(&self) -> Result<Settings, ConfigError> {
        let repo = self
            .get("repo", RepoUrl::from_str)?
            .ok_or(ConfigError::NoRepo)?;
        let s3 = S3Settings {
            endpoint: self.get("s3.endpoint", |s| Ok(s.to_owned()))?,
            region: self.get("s3.region", |s| Ok(s.to_owned()))?,
            force_path_style: self
                .get("s3.force_path_style", parse_bool)?
                .unwrap_or(false),
            access_key_id: self.get("s3.access_key_id", |s| Ok(s.to_owned()))?,
            secret_access_key: self.get("s3.secret_access_key", |s| Ok(s.to_owned()))?,
            timeout: self
                .get("s3.timeout", |s| {
                    parse_duration_in(s, S3_TIMEOUT_MIN, S3_TIMEOUT_MAX)
                })?
                .unwrap_or(Duration::from_secs(30)),
            max_attempts: self
                .get("s3.max_attempts", |s| parse_in_range(s, 1, 20))?
                .unwrap_or(5),
            part_size: self
                .get("s3.part_size", |s| parse_in_range(s, 5 << 20, 5 << 30))?
                .unwrap_or(8 << 20),
            sse: self.server_side_encryption()?,
            storage_class_wal: self
                .get("s3.storage_class_wal", parse_storage_class)?
                .or(self.get("s3.storage_class", parse_storage_class)?),
            storage_class_backup: self
                .get("s3.storage_class_backup", parse_storage_class)?
                .or(self.get("s3.storage_class", parse_storage_class)?),
        };
        let encryption = EncryptionSettings {
            recipients: self
                .get("encryption.recipients", |s| {
                    let list = split_list(s);
                    for r in &list {
                        crate::repo::check_recipient(r)?;
                    }
                    Ok(list)
                })?
                .unwrap_or_default(),
            recipients_file: self.get("encryption.recipients_file", |s| Ok(PathBuf::from(s)))?,
            identity_files: self
                .get("encryption.identity_file", |s| {
                    Ok(split_list(s).into_iter().map(PathBuf::from).collect())
                })?
                .unwrap_or_default(),
        };
        Ok(Settings {
            repo,
            s3,
            spool_dir: self.get("spool_dir", |s| Ok(PathBuf::from(s)))?,
            push_concurrency: self
                .get("push_concurrency", |s| parse_in_range(s, 1, 64))?
                .unwrap_or(4),
            prefetch: self
                .get("prefetch", |s| parse_in_range(s, 0, 64))?
                .unwrap_or(8),
            compression: self
                .get("compression", |s| match s {
                    "lz4" => Ok(Compression::Lz4),
                    "none" => Ok(Compression::None),
                    _ => Err("expected lz4 or none".into()),
                })?
                .unwrap_or(Compression::Lz4),
            backup_concurrency: self
                .get("backup_concurrency", |s| parse_in_range(s, 1, 64))?
                .unwrap_or(4),
            delta_max_steps: self
                .get("delta_max_steps", |s| parse_in_range(s, 0, 1000))?
                .unwrap_or(6),
            pg_timeout: self
                .get("pg_timeout", parse_bounded_duration)?
                .unwrap_or(Duration::from_secs(60)),
            backup_stop_timeout: self
                .get("backup_stop_timeout", parse_bounded_duration)?
                .unwrap_or(Duration::from_secs(600)),
            hooks: HookSettings {
                on_success: self.get("hooks.on_success", |s| Ok(s.to_owned()))?,
                on_failure: self.get("hooks.on_failure", |s| Ok(s.to_owned()))?,
                timeout: self
                    .get("hooks.timeout", |s| {
                        parse_duration_in(s, Duration::from_secs(1), Duration::from_secs(3600))
                    })?
                    .unwrap_or(Duration::from_secs(30)),
            },
            retention: self.retention()?,
            retention_auto: self.get("retention.auto", parse_bool)?.unwrap_or(true),
            retention_grace: self
                .get("retention.grace", |s| {
                    parse_duration_in(s, Duration::ZERO, Duration::from_secs(365 * 86_400))
                })?
                .unwrap_or(crate::retention::plan::DEFAULT_GRACE),
            encryption,
        })
    }

    fn retention(&self) -> Result<crate::retention::Policy, ConfigError> {
        let count = |s: &str| parse_in_range(s, 0u32, 100_000);
        Ok(crate::retention::Policy {
            full: self.get("retention.full", |s| parse_in_range(s, 1u32, 100_000))?,
            window: self.get("retention.window", |s| {
                parse_duration_in(
                    s,
                    Duration::from_secs(1),
                    Duration::from_secs(100 * 365 * 86_400),
                )
            })?,
            daily: self.get("retention.daily", count)?,
            weekly: self.get("retention.weekly", count)?,
            monthly: self.get("retention.monthly", count)?,
            yearly: self.get("retention.yearly", count)?,
        })
    }

    fn server_side_encryption(&self) -> Result<Option<ServerSideEncryption>, ConfigError> {
        let key_id = self.get("s3.sse_kms_key_id", |s| Ok(s.to_owned()))?;
        let sse = self.get("s3.sse", |s| match s {
            "AES256" => Ok(ServerSideEncryption::Aes256),
            "aws:kms" => Ok(ServerSideEncryption::Kms {
                key_id: key_id.clone(),
            }),
            _ => Err("expected AES256 or aws:kms".into()),
        })?;
        if key_id.is_some() && !matches!(sse, Some(ServerSideEncryption::Kms { .. })) {
            return self
                .get("s3.sse_kms_key_id", |_| {
                    Err::<(), _>("needs s3.sse = \"aws:kms\"".to_owned())
                })
                .map(|_| None);
        }
        Ok(sse)
    }
}

/// The items of a list setting (newline-separated, see [`LIST_KEYS`]), trimmed, empty ones
/// dropped.
fn split_list(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// An S3 storage class name as the API spells them (`STANDARD_IA`, `GLACIER_IR`, ...).
fn parse_storage_class(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        Ok(s.to_owned())
    } else {
        Err("expected a storage class such as STANDARD_IA or GLACIER_IR".into())
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_duration_in(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 2m)"))?;
    if d < min || d > max {
        return Err(format!(
            "must be from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A duration of at most a week, so that adding it to a clock reading cannot overflow.
fn parse_bounded_duration(s: &str) -> Result<Duration, String> {
    parse_duration_in(s, Duration::ZERO, Duration::from_secs(7 * 86_400))
}

/// A TOML syntax error as the position, the key of the line and the parser's message, without
/// the text of the line: the parser's own rendering quotes it, and the line may hold a secret.
fn syntax_error(text: &str, err: &toml::de::Error) -> String {
    let Some(at) = err.span().map(|s| s.start) else {
        return format!("TOML syntax error: {}", err.message());
    };
    let before = text.get(..at).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches(['"', '\'']))
        .filter(|k| {
            KEYS.iter().any(|(known, _)| {
                known == k || known.split_once('.').map(|(_, name)| name) == Some(k)
            })
        })
        .map(|k| format!(" (key {k})"))
        .unwrap_or_default();
    format!(
        "TOML syntax error at line {line}, column {column}{key}: {}",
        err.message().trim_end().replace('\n', " ")
    )
}

fn parse_in_range<T>(s: &str, min: T, max: T) -> Result<T, String>
where
    T: FromStr + PartialOrd + fmt::Display + Copy,
{
    let v: T = s
        .parse()
        .map_err(|_| format!("expected a whole number from {min} to {max}"))?;
    if v < min || v > max {
        return Err(format!("must be from {min} to {max}"));
    }
    Ok(v)
}
