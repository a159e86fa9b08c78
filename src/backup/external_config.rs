//! Configuration kept outside the data directory, as Debian and Ubuntu keep it in
//! `/etc/postgresql/<major>/<name>`: found at backup time from `config_file`, `hba_file`,
//! `ident_file` and the `include`, `include_if_exists` and `include_dir` directives of the
//! configuration files (and `@file` lists of the `pg_hba.conf`-syntax ones); stored as ordinary backup files under [`DIR`] in the backup (their
//! absolute path mirrored below it, so relative includes still resolve) and recorded in the
//! manifest's `external_config` section; on restore the data directory gets settings that point
//! the cluster at the restored copies, never at the source's files. Used by push, fetch, manifest.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::conf_syntax::{auth_references, directive, quoted, Reference, Syntax};
use super::manifest::FileEntry;
use super::tree::Root;
use super::BackupError;

/// Where the copies live in a backup and in a restored data directory.
pub(crate) const DIR: &str = "walvault_external_config";
/// Bounds on what a backup takes and a manifest may name: configuration is small.
const MAX_FILES: usize = 1000;
const MAX_FILE_SIZE: u64 = 16 << 20;
/// PostgreSQL's own limit on nested includes (`CONF_FILE_MAX_DEPTH`).
const MAX_DEPTH: usize = 10;
const MAX_PATH: usize = 1024;
/// The restored data directory's own configuration file, which points at the copies.
const POINTER: &str = "postgresql.conf";
/// Where a data directory's `postgresql.conf` the source did not use is moved aside.
const UNUSED: &str = "postgresql.conf.walvault-unused";

/// What a configuration file is to the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    ConfigFile,
    HbaFile,
    IdentFile,
    /// Named by an include directive of a configuration file.
    Included,
    /// Named by an include directive (PostgreSQL 16+) or an `@file` reference of the
    /// `hba_file`, the `ident_file` or a file they name: `pg_hba.conf` syntax, not
    /// `postgresql.conf`'s.
    AuthIncluded,
}

impl Role {
    fn setting(self) -> Option<&'static str> {
        match self {
            Role::ConfigFile => Some("config_file"),
            Role::HbaFile => Some("hba_file"),
            Role::IdentFile => Some("ident_file"),
            Role::Included | Role::AuthIncluded => None,
        }
    }

    fn from_setting(name: &str) -> Option<Role> {
        [Role::ConfigFile, Role::HbaFile, Role::IdentFile]
            .into_iter()
            .find(|r| r.setting() == Some(name))
    }
}

/// One configuration file of the source, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExternalConfig {
    pub(crate) role: Role,
    /// The absolute path on the source (shown, never written to).
    pub(crate) original: String,
    /// The backup path of its copy: under [`DIR`], or inside the data directory for a
    /// `hba_file`/`ident_file` that was there.
    pub(crate) path: String,
}

/// A file to copy into the backup.
pub(crate) struct ToCopy {
    pub(crate) path: String,
    pub(crate) source: PathBuf,
    pub(crate) size: u64,
    pub(crate) mode: u32,
}

/// What [`discover`] found: files to copy, their directories, the manifest section.
#[derive(Default)]
pub(crate) struct Discovered {
    pub(crate) files: Vec<ToCopy>,
    pub(crate) dirs: Vec<String>,
    pub(crate) entries: Vec<ExternalConfig>,
}

/// Finds the configuration files outside `pgdata`, given the server's `config_file`,
/// `hba_file` and `ident_file` settings (names and values as `pg_settings` shows them). Nothing
/// when all of them lie inside the data directory.
pub(crate) fn discover(
    pgdata: &Path,
    settings: &[(String, String)],
) -> Result<Discovered, BackupError> {
    let data = pgdata
        .canonicalize()
        .map_err(BackupError::io("resolve", pgdata))?;
    let mut found = Finder {
        data,
        seen: HashSet::new(),
        out: Discovered::default(),
    };
    let mut any_outside = false;
    for (name, value) in settings {
        let Some(role) = Role::from_setting(name) else {
            continue;
        };
        let path = PathBuf::from(value);
        if !path.is_absolute() {
            continue; // PostgreSQL shows them absolute; anything else is not ours to guess
        }
        if let Some(inside) = found.inside(&path) {
            found.out.entries.push(ExternalConfig {
                role,
                original: value.clone(),
                path: inside,
            });
            continue;
        }
        any_outside = true;
        found.copy(role, &path)?;
        match role {
            Role::ConfigFile => found.follow(&path, Syntax::Conf, 0)?,
            Role::HbaFile | Role::IdentFile => found.follow(&path, Syntax::Auth, 0)?,
            Role::Included | Role::AuthIncluded => {}
        }
    }
    if !any_outside {
        return Ok(Discovered::default());
    }
    let mut dirs: Vec<String> = found
        .out
        .files
        .iter()
        .flat_map(|f| ancestors(&f.path))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    dirs.sort();
    found.out.dirs = dirs;
    Ok(found.out)
}

/// The directories above backup path `path`, `DIR` included.
fn ancestors(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = path;
    while let Some((parent, _)) = at.rsplit_once('/') {
        out.push(parent.to_owned());
        at = parent;
    }
    out
}

struct Finder {
    data: PathBuf,
    seen: HashSet<PathBuf>,
    out: Discovered,
}

impl Finder {
    /// The data-directory-relative path of `path` when it lies inside the data directory.
    fn inside(&self, path: &Path) -> Option<String> {
        let real = path.canonicalize().ok()?;
        let rel = real.strip_prefix(&self.data).ok()?;
        Some(rel.to_str()?.to_owned())
    }

    /// Records `path` (absolute, outside the data directory) for copying, once.
    fn copy(&mut self, role: Role, path: &Path) -> Result<(), BackupError> {
        let clean = lexical(path).ok_or_else(|| {
            BackupError::invalid(
                path.display().to_string(),
                "a configuration file path with .. or not valid UTF-8",
            )
        })?;
        if !self.seen.insert(PathBuf::from(&clean)) {
            return Ok(());
        }
        let meta = std::fs::metadata(path).map_err(BackupError::io("read", path))?;
        if !meta.is_file() || meta.len() > MAX_FILE_SIZE {
            return Err(BackupError::invalid(
                path.display().to_string(),
                format!("{role:?} is not a regular file of at most {MAX_FILE_SIZE} bytes"),
            ));
        }
        if self.out.files.len() >= MAX_FILES {
            return Err(BackupError::invalid(
                path.display().to_string(),
                format!("more than {MAX_FILES} configuration files"),
            ));
        }
        use std::os::unix::fs::PermissionsExt;
        let stored = format!("{DIR}{clean}");
        self.out.files.push(ToCopy {
            path: stored.clone(),
            source: path.to_path_buf(),
            size: meta.len(),
            mode: meta.permissions().mode() & 0o7777,
        });
        self.out.entries.push(ExternalConfig {
            role,
            original: clean,
            path: stored,
        });
        Ok(())
    }

    /// Follows the files configuration file `file` names, as PostgreSQL does: relative names
    /// from the file's directory, `include_dir`'s `*.conf` files by name, a missing
    /// `include_if_exists` or `@file` skipped. Each is copied in the syntax of `file`.
    fn follow(&mut self, file: &Path, syntax: Syntax, depth: usize) -> Result<(), BackupError> {
        if depth >= MAX_DEPTH {
            return Err(BackupError::invalid(
                file.display().to_string(),
                format!("includes nested deeper than {MAX_DEPTH}"),
            ));
        }
        let text = std::fs::read(file).map_err(BackupError::io("read", file))?;
        let base = file.parent().unwrap_or(Path::new("/"));
        for (kind, name) in syntax.references(&String::from_utf8_lossy(&text)) {
            let named = base.join(&name);
            let targets = match kind {
                Reference::Include => vec![named],
                Reference::IncludeDir => conf_files_in(&named)?,
                Reference::IncludeIfExists | Reference::File if named.exists() => vec![named],
                Reference::IncludeIfExists | Reference::File => continue,
            };
            for target in targets {
                if self.inside(&target).is_some() {
                    continue; // in the data directory, so in the backup already
                }
                let first = !self
                    .seen
                    .contains(&lexical(&target).map(PathBuf::from).unwrap_or_default());
                self.copy(named_role(syntax), &target)?;
                if first {
                    self.follow(&target, syntax, depth + 1)?;
                }
            }
        }
        Ok(())
    }
}

/// The role of a file named from a file of `syntax`.
fn named_role(syntax: Syntax) -> Role {
    match syntax {
        Syntax::Conf => Role::Included,
        Syntax::Auth => Role::AuthIncluded,
    }
}

/// The `*.conf` files of an `include_dir`, by name, as PostgreSQL reads them.
fn conf_files_in(dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(BackupError::io("list", dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".conf") && !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect())
}

/// `path` made absolute-clean (`.` dropped), as text; `None` with `..` or not UTF-8.
fn lexical(path: &Path) -> Option<String> {
    let mut out = String::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => {
                out.push('/');
                out.push_str(part.to_str()?);
            }
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Refuses a manifest section (untrusted) that names files the manifest does not hold, paths
/// that are not clean, control characters (they would end up in a configuration file), or more
/// entries than a backup takes.
pub(crate) fn validate(entries: &[ExternalConfig], files: &[FileEntry]) -> Result<(), String> {
    if entries.len() > MAX_FILES {
        return Err(format!(
            "more than {MAX_FILES} external configuration files"
        ));
    }
    let mut roles = HashSet::new();
    for e in entries {
        let original = Path::new(&e.original);
        let clean_original = original.is_absolute()
            && e.original.len() <= MAX_PATH
            && lexical(original).as_deref() == Some(e.original.as_str());
        let listed = files
            .iter()
            .find(|f| f.path == e.path)
            .is_some_and(|f| f.size <= MAX_FILE_SIZE);
        let control = |s: &str| s.chars().any(char::is_control);
        if !clean_original || !listed || control(&e.original) || control(&e.path) {
            return Err(format!(
                "refusing external configuration {:.100?} stored as {:.100?}: not a clean \
                 absolute path, or its copy is not a file of the backup of at most \
                 {MAX_FILE_SIZE} bytes",
                e.original, e.path
            ));
        }
        if e.role.setting().is_some() && !roles.insert(e.role) {
            return Err(format!("{:?} is recorded twice", e.role));
        }
    }
    Ok(())
}

/// Whether the section asks for anything at restore time.
pub(crate) fn outside(entries: &[ExternalConfig]) -> bool {
    entries
        .iter()
        .any(|e| e.path.starts_with(&format!("{DIR}/")))
}

/// For a backup path, `Some(Some(rel))` when it lies below [`DIR`] (`rel` inside it),
/// `Some(None)` for [`DIR`] itself, `None` otherwise.
pub(crate) fn below_dir(path: &str) -> Option<Option<&str>> {
    match path.strip_prefix(DIR)? {
        "" => Some(None),
        rest => rest.strip_prefix('/').map(Some),
    }
}

/// Where a restore into `target` puts each external configuration file (`copies` being
/// [`DIR`] in the target or `--config-dir`), for `--dry-run`.
pub(crate) fn destinations(
    copies: &Path,
    target: &Path,
    entries: &[ExternalConfig],
) -> Vec<(PathBuf, String)> {
    entries
        .iter()
        .filter_map(|e| Some((e, below_dir(&e.path)??)))
        .map(|(e, rel)| {
            (
                copies.join(rel),
                format!(
                    "{} {} of the source; {}/{POINTER} points the restored cluster at it",
                    e.role.setting().unwrap_or("included file"),
                    e.original,
                    target.display()
                ),
            )
        })
        .collect()
}

/// After a restore into `data` (the data directory root) whose manifest holds `entries`: makes
/// the restored cluster read its restored configuration and only that. When the source's
/// `config_file` was outside, the data directory's `postgresql.conf` becomes a file that
/// includes the restored copy and then overrides the settings naming the source's places
/// (`data_directory`, `hba_file`, `ident_file`, `external_pid_file`); otherwise the overrides
/// are appended to the restored `postgresql.conf`. `has_conf` says whether the backup holds a
/// `postgresql.conf` in the data directory; `pg_version_num` chooses the settings that exist.
pub(crate) fn point_restored(
    data: &Root,
    copies: Option<&Root>,
    entries: &[ExternalConfig],
    has_conf: bool,
    pg_version_num: u32,
) -> Result<(), BackupError> {
    if !outside(entries) {
        return Ok(());
    }
    let place = Place { data, copies };
    let target_text = text_of(data.path())?;
    if let Some(copies) = copies {
        text_of(copies.path())?;
    }
    let at = |e: &ExternalConfig| {
        let (root, rel) = place.of(&e.path);
        format!("{}/{rel}", root.path().display())
    };
    let config = entries
        .iter()
        .find(|e| e.role == Role::ConfigFile && e.path.starts_with(&format!("{DIR}/")));
    let mut text = String::from(
        "# Written by walvault: the source cluster kept configuration outside its data directory;\n\
         # these settings point this restored copy at the restored files, never the source's.\n",
    );
    if let Some(config) = config {
        text.push_str(&format!("include {}\n", quoted(&at(config))));
        text.push_str(&format!("data_directory = {}\n", quoted(target_text)));
        text.push_str("external_pid_file = ''\n");
        if pg_version_num < 150_000 {
            // Debian puts it in /var/run, shared with the source.
            text.push_str("stats_temp_directory = 'pg_stat_tmp'\n");
        }
    }
    for e in entries
        .iter()
        .filter(|e| matches!(e.role, Role::HbaFile | Role::IdentFile))
    {
        if let Some(setting) = e.role.setting() {
            text.push_str(&format!("{setting} = {}\n", quoted(&at(e))));
        }
    }
    for e in entries
        .iter()
        .filter(|e| e.path.starts_with(&format!("{DIR}/")))
    {
        match e.role {
            Role::ConfigFile | Role::Included => redirect_includes(&place, e, entries)?,
            Role::HbaFile | Role::IdentFile | Role::AuthIncluded => {
                redirect_auth_references(&place, e, entries)?
            }
        }
    }
    if config.is_some() {
        if has_conf {
            data.rename_in(".", POINTER, UNUSED)?;
        }
        data.write_new(POINTER, text.as_bytes())?;
    } else {
        append(data, POINTER, &text)?;
    }
    data.sync("")
}

/// Where a restore put the copies: below [`DIR`] in the data directory, or in `--config-dir`.
struct Place<'a> {
    data: &'a Root,
    copies: Option<&'a Root>,
}

impl Place<'_> {
    /// The root and the path in it of backup path `path`.
    fn of<'p>(&self, path: &'p str) -> (&Root, &'p str) {
        match (self.copies, below_dir(path)) {
            (Some(copies), Some(Some(rel))) => (copies, rel),
            _ => (self.data, path),
        }
    }

    /// The restored copy of source path `original` when the manifest holds it, or holds files
    /// below it (a directory).
    fn restored(&self, entries: &[ExternalConfig], original: &str) -> Option<String> {
        let clean = lexical(Path::new(original))?;
        let known = entries.iter().any(|x| {
            x.original == clean
                || x.original
                    .strip_prefix(&clean)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        known.then(|| self.copy_of(&clean))
    }

    /// The absolute path of the copy of source file `original`.
    fn copy_of(&self, original: &str) -> String {
        match self.copies {
            Some(copies) => format!("{}{original}", copies.path().display()),
            None => format!("{}/{DIR}{original}", self.data.path().display()),
        }
    }
}

/// `path` as text fit for a configuration file.
fn text_of(path: &Path) -> Result<&str, BackupError> {
    path.to_str()
        .filter(|t| !t.contains(char::is_control))
        .ok_or_else(|| {
            BackupError::invalid(
                path.display().to_string(),
                "cannot be named in a configuration file (not UTF-8 or with control characters)",
            )
        })
}

/// Rewrites the include directives of restored configuration file `e` that name a source file
/// (or directory) by absolute path so that they name its restored copy; relative ones already
/// resolve to the copies, which keep the source's layout.
fn redirect_includes(
    place: &Place<'_>,
    e: &ExternalConfig,
    entries: &[ExternalConfig],
) -> Result<(), BackupError> {
    rewrite_lines(place, e, |line| {
        Ok(directive(line).and_then(|d| {
            let include = matches!(
                d.name.as_str(),
                "include" | "include_if_exists" | "include_dir"
            );
            let to = (include && d.value.starts_with('/'))
                .then(|| place.restored(entries, &d.value))
                .flatten()?;
            Some(format!(
                "{} = {}  # walvault: was {}\n",
                d.name,
                quoted(&to),
                quoted(&d.value)
            ))
        }))
    })
}

/// The same for restored `pg_hba.conf`-syntax file `e`: include directives and `@file`
/// references. An `@file` cannot be quoted, so a restored copy whose path holds a blank, a
/// comma, a quote or `#` cannot be named there: that is an error naming the file, not a
/// cluster left reading the source's file.
fn redirect_auth_references(
    place: &Place<'_>,
    e: &ExternalConfig,
    entries: &[ExternalConfig],
) -> Result<(), BackupError> {
    rewrite_lines(place, e, |line| {
        let mut out = line.to_owned();
        let mut was = Vec::new();
        // From the end, so the spans before each edit stay valid.
        for (kind, token) in auth_references(line).into_iter().rev() {
            let Some(to) = token
                .text
                .starts_with('/')
                .then(|| place.restored(entries, &token.text))
                .flatten()
            else {
                continue;
            };
            let written = if kind != Reference::File {
                format!("\"{}\"", to.replace('"', "\"\""))
            } else if to.contains(|c: char| c.is_whitespace() || matches!(c, ',' | '"' | '#')) {
                return Err(BackupError::invalid(
                    e.original.clone(),
                    format!(
                        "its @{} would have to name the restored copy {to}, which pg_hba.conf \
                         syntax cannot carry after @ (a blank, comma, quote or #); restore with \
                         --config-dir set to a plain path",
                        token.text
                    ),
                ));
            } else {
                to
            };
            out.replace_range(token.span, &written);
            was.push(token.text);
        }
        if was.is_empty() {
            return Ok(None);
        }
        let end = out.trim_end_matches(['\n', '\r']).len();
        was.reverse();
        out.insert_str(end, &format!("  # walvault: was {}", was.join(", ")));
        Ok(Some(out))
    })
}

/// Rewrites restored file `e` line by line (`edit` returns a line's replacement, if any),
/// through a new file renamed over it; untouched when no line changes.
fn rewrite_lines(
    place: &Place<'_>,
    e: &ExternalConfig,
    mut edit: impl FnMut(&str) -> Result<Option<String>, BackupError>,
) -> Result<(), BackupError> {
    let (root, rel) = place.of(&e.path);
    let text = root.read_small(rel, MAX_FILE_SIZE)?;
    let text = String::from_utf8_lossy(&text);
    let mut changed = false;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        match edit(line)? {
            Some(line) => {
                changed = true;
                out.push_str(&line);
            }
            None => out.push_str(line),
        }
    }
    if !changed {
        return Ok(());
    }
    let (dir, name) = rel.rsplit_once('/').unwrap_or((".", rel));
    root.write_new(&format!("{rel}.walvault-new"), out.as_bytes())?;
    root.rename_in(dir, &format!("{name}.walvault-new"), name)
}

/// Appends `text` to file `rel` of the restore.
fn append(data: &Root, rel: &str, text: &str) -> Result<(), BackupError> {
    use std::os::unix::fs::FileExt;
    let file = data.open_file(rel)?;
    let path = data.display(rel);
    let len = file
        .metadata()
        .map_err(BackupError::io("stat", &path))?
        .len();
    file.write_all_at(format!("\n{text}").as_bytes(), len)
        .and_then(|()| file.sync_all())
        .map_err(BackupError::io("write", &path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::conf_syntax::directives;

    /// A Debian-like layout: postgresql.conf with an include_dir, a relative include and an
    /// include_if_exists of a missing file; pg_hba.conf beside it; ident_file inside PGDATA.
    #[test]
    fn discovery_follows_includes_outside_the_data_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join("etc/main");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(etc.join("conf.d")).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(
            etc.join("postgresql.conf"),
            "include_dir 'conf.d'\ninclude = 'more.conf'\ninclude_if_exists 'absent.conf'\n",
        )
        .unwrap();
        std::fs::write(etc.join("more.conf"), "work_mem = '8MB'\n").unwrap();
        std::fs::write(etc.join("conf.d/b.conf"), "").unwrap();
        std::fs::write(etc.join("conf.d/a.conf"), "include 'b.conf'\n").unwrap();
        std::fs::write(etc.join("conf.d/.hidden.conf"), "").unwrap();
        std::fs::write(etc.join("conf.d/notes.txt"), "").unwrap();
        std::fs::write(etc.join("pg_hba.conf"), "local all all trust\n").unwrap();
        std::fs::write(data.join("pg_ident.conf"), "").unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        let settings = [
            ("config_file".to_owned(), s(&etc.join("postgresql.conf"))),
            ("hba_file".to_owned(), s(&etc.join("pg_hba.conf"))),
            ("ident_file".to_owned(), s(&data.join("pg_ident.conf"))),
        ];
        let found = discover(&data, &settings).unwrap();
        let rel = |e: &ExternalConfig| {
            e.original
                .strip_prefix(etc.to_str().unwrap())
                .map(str::to_owned)
                .unwrap_or_else(|| e.path.clone())
        };
        let got: Vec<(Role, String)> = found.entries.iter().map(|e| (e.role, rel(e))).collect();
        assert_eq!(
            got,
            [
                (Role::ConfigFile, "/postgresql.conf".into()),
                (Role::Included, "/conf.d/a.conf".into()),
                (Role::Included, "/conf.d/b.conf".into()),
                (Role::Included, "/more.conf".into()),
                (Role::HbaFile, "/pg_hba.conf".into()),
                (Role::IdentFile, "pg_ident.conf".into()),
            ]
        );
        assert_eq!(found.files.len(), 5);
        for f in &found.files {
            assert!(f.path.starts_with(&format!("{DIR}/")), "{}", f.path);
            assert!(found
                .dirs
                .iter()
                .any(|d| f.path.starts_with(&format!("{d}/"))));
        }
        // Everything inside the data directory: nothing to record.
        let inside = [("config_file".to_owned(), s(&data.join("pg_ident.conf")))];
        assert!(discover(&data, &inside).unwrap().entries.is_empty());
    }

    /// A restore of a Debian-like backup: the data directory's own postgresql.conf (unused by
    /// the source) is moved aside, the new one includes the copy and overrides every setting
    /// naming the source's places, and an absolute include now names the restored copy.
    #[test]
    fn the_restored_cluster_reads_only_restored_configuration() {
        use super::super::tree::Parent;
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("restored");
        let data = Root::open(&target, "target", Parent::Create).unwrap();
        let entry = |role, original: &str| ExternalConfig {
            role,
            original: original.into(),
            path: format!("{DIR}{original}"),
        };
        let entries = [
            entry(Role::ConfigFile, "/etc/pg/main/postgresql.conf"),
            entry(Role::Included, "/etc/pg/common.conf"),
            entry(Role::Included, "/etc/pg/main/conf.d/a.conf"),
            entry(Role::HbaFile, "/etc/pg/main/pg_hba.conf"),
            ExternalConfig {
                role: Role::IdentFile,
                original: "/var/lib/pg/main/pg_ident.conf".into(),
                path: "pg_ident.conf".into(),
            },
        ];
        data.make_dir(&format!("{DIR}/etc/pg/main/conf.d"), 0o700)
            .unwrap();
        let conf = "data_directory = '/var/lib/pg/main'\n\
                    include '/etc/pg/common.conf' # shared\n\
                    include_dir '/etc/pg/main/conf.d'\n\
                    include_if_exists '/elsewhere/x.conf'\n\
                    include 'relative.conf'\n";
        data.write_new(&entries[0].path, conf.as_bytes()).unwrap();
        for e in &entries[1..4] {
            data.write_new(&e.path, b"").unwrap();
        }
        data.write_new("postgresql.conf", b"port = 1\n").unwrap();
        point_restored(&data, None, &entries, true, 140_000).unwrap();

        let t = target.display();
        let pointer = std::fs::read_to_string(target.join("postgresql.conf")).unwrap();
        for line in [
            format!("include '{t}/{DIR}/etc/pg/main/postgresql.conf'"),
            format!("data_directory = '{t}'"),
            "external_pid_file = ''".into(),
            "stats_temp_directory = 'pg_stat_tmp'".into(),
            format!("hba_file = '{t}/{DIR}/etc/pg/main/pg_hba.conf'"),
            format!("ident_file = '{t}/pg_ident.conf'"),
        ] {
            assert!(
                pointer.lines().any(|l| l == line),
                "{line:?} missing:\n{pointer}"
            );
        }
        let unused = std::fs::read_to_string(target.join(UNUSED)).unwrap();
        assert_eq!(unused, "port = 1\n");
        let copy = std::fs::read_to_string(target.join(&entries[0].path)).unwrap();
        let got: Vec<(String, String)> = directives(&copy)
            .into_iter()
            .map(|d| (d.name, d.value))
            .collect();
        let want = |n: &str, v: String| (n.to_owned(), v);
        assert_eq!(
            got,
            [
                want("data_directory", "/var/lib/pg/main".into()),
                want("include", format!("{t}/{DIR}/etc/pg/common.conf")),
                want("include_dir", format!("{t}/{DIR}/etc/pg/main/conf.d")),
                want("include_if_exists", "/elsewhere/x.conf".into()),
                want("include", "relative.conf".into()),
            ]
        );
    }

    #[test]
    fn forged_sections_are_refused() {
        let file = |path: &str| FileEntry {
            path: path.into(),
            size: 10,
            mode: 0o600,
            storage: super::super::manifest::Storage::Whole,
            crc32: 0,
            pieces: vec![],
        };
        let files = [file("walvault_external_config/etc/p.conf")];
        let entry = |original: &str, path: &str| ExternalConfig {
            role: Role::ConfigFile,
            original: original.into(),
            path: path.into(),
        };
        let good = entry("/etc/p.conf", "walvault_external_config/etc/p.conf");
        assert!(validate(std::slice::from_ref(&good), &files).is_ok());
        for bad in [
            entry("etc/p.conf", "walvault_external_config/etc/p.conf"),
            entry("/etc/../p.conf", "walvault_external_config/etc/p.conf"),
            entry(
                "/etc/p.conf\nport = 1",
                "walvault_external_config/etc/p.conf",
            ),
            entry("/etc/p.conf", "walvault_external_config/etc/other.conf"),
        ] {
            assert!(
                validate(std::slice::from_ref(&bad), &files).is_err(),
                "{bad:?}"
            );
        }
        assert!(validate(&[good.clone(), good], &files).is_err(), "twice");
    }

    /// pg_hba.conf's and pg_ident.conf's own references (PostgreSQL 16+ include directives,
    /// `@file` lists in every version) are followed, in their syntax, not postgresql.conf's.
    #[test]
    fn discovery_follows_the_auth_files_references() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join("etc/main");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(etc.join("hba.d")).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(
            etc.join("pg_hba.conf"),
            "include_dir hba.d\ninclude_if_exists absent.conf\n\
             local all @admins trust\nlocal all @missing trust\n",
        )
        .unwrap();
        std::fs::write(etc.join("admins"), "alice\n@more\n").unwrap();
        std::fs::write(etc.join("more"), "bob\n").unwrap();
        std::fs::write(etc.join("hba.d/a.conf"), "include ../shared.conf\n").unwrap();
        std::fs::write(etc.join("hba.d/b.conf"), "local all @admins trust\n").unwrap();
        std::fs::write(etc.join("pg_ident.conf"), "include_if_exists maps.conf\n").unwrap();
        std::fs::write(etc.join("maps.conf"), "m root postgres\n").unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        let settings = [
            ("hba_file".to_owned(), s(&etc.join("pg_hba.conf"))),
            ("ident_file".to_owned(), s(&etc.join("pg_ident.conf"))),
        ];
        // `..` in a name is refused, as in postgresql.conf's includes.
        let err = discover(&data, &settings).err().unwrap().to_string();
        assert!(err.contains("shared.conf") && err.contains(".."), "{err}");
        std::fs::write(etc.join("hba.d/a.conf"), "include /etc-elsewhere-absent\n").unwrap();
        let err = discover(&data, &settings).err().unwrap().to_string();
        assert!(err.contains("/etc-elsewhere-absent"), "{err}");
        std::fs::write(etc.join("hba.d/a.conf"), "# none\n").unwrap();
        let found = discover(&data, &settings).unwrap();
        let got: Vec<(Role, String)> = found
            .entries
            .iter()
            .map(|e| (e.role, e.original.replace(etc.to_str().unwrap(), "")))
            .collect();
        assert_eq!(
            got,
            [
                (Role::HbaFile, "/pg_hba.conf".into()),
                (Role::AuthIncluded, "/hba.d/a.conf".into()),
                (Role::AuthIncluded, "/hba.d/b.conf".into()),
                (Role::AuthIncluded, "/admins".into()),
                (Role::AuthIncluded, "/more".into()),
                (Role::IdentFile, "/pg_ident.conf".into()),
                (Role::AuthIncluded, "/maps.conf".into()),
            ]
        );
        let files = found
            .files
            .iter()
            .map(|f| FileEntry {
                path: f.path.clone(),
                size: f.size,
                mode: f.mode,
                storage: super::super::manifest::Storage::Whole,
                crc32: 0,
                pieces: vec![],
            })
            .collect::<Vec<_>>();
        assert!(validate(&found.entries, &files).is_ok());
    }

    /// A restore rewrites the auth files' absolute references to the restored copies, in
    /// pg_hba.conf syntax, and refuses a copy an `@file` cannot name.
    #[test]
    fn restored_auth_files_name_only_restored_copies() {
        use super::super::tree::Parent;
        let tmp = tempfile::tempdir().unwrap();
        let entry = |role, original: &str| ExternalConfig {
            role,
            original: original.into(),
            path: format!("{DIR}{original}"),
        };
        let entries = [
            entry(Role::HbaFile, "/etc/pg/pg_hba.conf"),
            entry(Role::AuthIncluded, "/etc/pg/hba.d/a.conf"),
            entry(Role::AuthIncluded, "/etc/pg/admins"),
            entry(Role::IdentFile, "/etc/pg/pg_ident.conf"),
        ];
        let hba = "include_dir \"/etc/pg/hba.d\" # mine\n\
                   include_if_exists /elsewhere/x.conf\n\
                   local all @/etc/pg/admins,@relative trust\n\
                   host all \"@/etc/pg/admins\" 127.0.0.1/32 md5\n";
        let restore = |target: &Path, copies: Option<&Path>| {
            let data = Root::open(target, "target", Parent::Create).unwrap();
            let copies = copies.map(|c| Root::open(c, "copies", Parent::Create).unwrap());
            let place = Place {
                data: &data,
                copies: copies.as_ref(),
            };
            for e in &entries {
                let (root, rel) = place.of(&e.path);
                root.make_dir(rel.rsplit_once('/').unwrap().0, 0o700)
                    .unwrap();
                let text = if e.role == Role::HbaFile { hba } else { "" };
                root.write_new(rel, text.as_bytes()).unwrap();
            }
            data.write_new("postgresql.conf", b"port = 1\n").unwrap();
            point_restored(&data, copies.as_ref(), &entries, true, 160_000)
        };

        let target = tmp.path().join("restored");
        restore(&target, None).unwrap();
        let t = format!("{}/{DIR}", target.display());
        let got = std::fs::read_to_string(target.join(&entries[0].path)).unwrap();
        assert_eq!(
            got,
            format!(
                "include_dir \"{t}/etc/pg/hba.d\" # mine  # walvault: was /etc/pg/hba.d\n\
                 include_if_exists /elsewhere/x.conf\n\
                 local all @{t}/etc/pg/admins,@relative trust  # walvault: was /etc/pg/admins\n\
                 host all \"@/etc/pg/admins\" 127.0.0.1/32 md5\n"
            )
        );
        let pointer = std::fs::read_to_string(target.join("postgresql.conf")).unwrap();
        assert!(pointer.contains(&format!("hba_file = '{t}/etc/pg/pg_hba.conf'")));

        // Copies in a directory whose name has a blank: the include can be quoted, the @file
        // cannot, and the restore says so instead of leaving the source's file named.
        let err = restore(
            &tmp.path().join("second"),
            Some(&tmp.path().join("my copies")),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("/etc/pg/pg_hba.conf") && err.contains("--config-dir"),
            "{err}"
        );
    }
}
