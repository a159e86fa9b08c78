//! The directories a restore writes into, held open and walked by descriptor.
//!
//! A restore writes only below its roots (the target directory and each tablespace directory),
//! each created by the restore or found empty, and opened once with `O_NOFOLLOW`. Every path
//! below a root is walked one component at a time with `openat(O_NOFOLLOW)`; directories are
//! made with `mkdirat`, files with `O_CREAT|O_EXCL`. So a symlink planted by a manifest or by a
//! local user racing the restore is never followed, nothing that existed is overwritten, and only
//! directories the restore created have their mode set. Used by fetch.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use super::BackupError;

/// The most a restored directory or file may allow: PostgreSQL refuses anything looser for the
/// data directory, and what it creates itself is 0700/0600.
pub(crate) const DIR_MODE_MAX: u32 = 0o700;
pub(crate) const FILE_MODE_MAX: u32 = 0o600;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// What is at a root's path before a restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// Nothing: the restore creates it.
    Absent,
    /// An empty directory: the restore writes into it and leaves its mode alone.
    Empty,
}

/// Where a root may be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Parent {
    /// Its parent must exist (a tablespace directory, which a manifest may name).
    MustExist,
    /// Missing parents are created (the target directory, which the user names).
    Create,
}

/// Checks, without changing anything, that `path` can be a root: absent (with an existing
/// parent unless `parent` allows creating it), or an empty directory that is not a symbolic link.
pub(crate) fn inspect(path: &Path, what: &str, parent: Parent) -> Result<Found, BackupError> {
    let refuse =
        |problem: &str| BackupError::invalid(format!("{what} {}", path.display()), problem);
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(refuse(
            "is a symbolic link: restores never follow one (name the directory it points to)",
        )),
        Ok(meta) if !meta.is_dir() => Err(refuse("exists and is not a directory")),
        Ok(_) => {
            let mut entries =
                std::fs::read_dir(path).map_err(BackupError::io("read directory", path))?;
            if entries.next().is_some() {
                return Err(refuse(
                    "is not empty: restores write only into an empty or absent directory",
                ));
            }
            Ok(Found::Empty)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let exists = path.parent().is_some_and(|p| p.is_dir());
            if !exists && parent == Parent::MustExist {
                return Err(refuse(
                    "does not exist and neither does its parent: create the parent first",
                ));
            }
            Ok(Found::Absent)
        }
        Err(e) => Err(BackupError::io("stat", path)(e)),
    }
}

/// Whether an entry (relative path, is a directory) stays when a restore over an existing
/// directory removes what the backup does not have.
pub(crate) type Keep<'a> = dyn Fn(&str, bool) -> bool + 'a;

/// A directory a restore writes below.
pub(crate) struct Root {
    path: PathBuf,
    fd: OwnedFd,
}

impl Root {
    /// Creates the directory at `path` (mode 0700) or opens it if it exists and is empty; never
    /// through a symbolic link, and an existing directory keeps its mode.
    pub(crate) fn open(path: &Path, what: &str, parent: Parent) -> Result<Root, BackupError> {
        if inspect(path, what, parent)? == Found::Absent && parent == Parent::Create {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(BackupError::io("create directory", dir))?;
            }
        }
        let created = match rustix::fs::mkdir(path, Mode::from_raw_mode(DIR_MODE_MAX)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(BackupError::io("create directory", path)(e.into())),
        };
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty())
            .map_err(|e| BackupError::io("open directory", path)(e.into()))?;
        if created {
            // The umask may have taken bits off; this directory is ours to set.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE_MAX))
                .map_err(|e| BackupError::io("chmod", path)(e.into()))?;
        } else {
            // Checked again through the descriptor: it may have changed since `inspect`.
            let mut dir = rustix::fs::Dir::read_from(&fd)
                .map_err(|e| BackupError::io("read directory", path)(e.into()))?;
            let busy = dir.any(|entry| {
                entry.map_or(true, |e| {
                    let name = e.file_name().to_bytes();
                    name != b"." && name != b".."
                })
            });
            if busy {
                return Err(BackupError::invalid(
                    format!("{what} {}", path.display()),
                    "is not empty: restores write only into an empty or absent directory",
                ));
            }
        }
        Ok(Root {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// Opens the existing directory at `path` (never through a symbolic link), or creates it
    /// (mode 0700, its parent existing), for a restore over what is there (`--delta`).
    pub(crate) fn open_existing(path: &Path, what: &str) -> Result<Root, BackupError> {
        match rustix::fs::mkdir(path, Mode::from_raw_mode(DIR_MODE_MAX)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(BackupError::io("create directory", path)(e.into())),
        }
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty()).map_err(|e| {
            BackupError::invalid(
                format!("{what} {}", path.display()),
                format!("cannot be opened as a directory without following a link: {e}"),
            )
        })?;
        Ok(Root {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// Opens file `rel` for reading; `None` when it does not exist.
    pub(crate) fn open_read(&self, rel: &str) -> Result<Option<File>, BackupError> {
        let (dir, last) = match self.parent(rel, false) {
            Ok(found) => found,
            Err(BackupError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(
            dir.as_ref().unwrap_or(&self.fd),
            last.as_str(),
            flags,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io("open", rel)(e)),
        }
    }

    /// Opens file `rel` for writing, creating it (at most mode 0600) when absent.
    pub(crate) fn open_or_create(&self, rel: &str, mode: u32) -> Result<File, BackupError> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW;
        self.open_file_with(rel, flags, mode & FILE_MODE_MAX)
    }

    /// Removes everything below the root that `keep(rel, is_dir)` rejects, walking by
    /// descriptor and never following a link (a link is removed as itself, or kept and not
    /// entered); returns how many entries it removed.
    pub(crate) fn remove_unlisted(&self, keep: &Keep<'_>) -> Result<u64, BackupError> {
        self.remove_in(&self.fd, "", Some(keep))
    }

    /// Removes the entries of directory `dir` (at `prefix`) that `keep` rejects, or all of them
    /// when `keep` is `None`.
    fn remove_in(
        &self,
        dir: &OwnedFd,
        prefix: &str,
        keep: Option<&Keep<'_>>,
    ) -> Result<u64, BackupError> {
        let mut names = Vec::new();
        let entries = rustix::fs::Dir::read_from(dir).map_err(self.io("read directory", prefix))?;
        for entry in entries {
            let entry = entry.map_err(self.io("read directory", prefix))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        let mut removed = 0;
        for name in names {
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let stat =
                rustix::fs::statat(dir, name.as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(self.io("stat", &rel))?;
            let is_dir = rustix::fs::FileType::from_raw_mode(stat.st_mode)
                == rustix::fs::FileType::Directory;
            let wanted = keep.is_some_and(|k| k(&rel, is_dir));
            if is_dir {
                let sub = rustix::fs::openat(dir, name.as_str(), DIR_FLAGS, Mode::empty())
                    .map_err(self.io("open directory", &rel))?;
                removed += self.remove_in(&sub, &rel, keep.filter(|_| wanted))?;
                if !wanted {
                    rustix::fs::unlinkat(dir, name.as_str(), rustix::fs::AtFlags::REMOVEDIR)
                        .map_err(self.io("remove directory", &rel))?;
                    removed += 1;
                }
            } else if !wanted {
                rustix::fs::unlinkat(dir, name.as_str(), rustix::fs::AtFlags::empty())
                    .map_err(self.io("remove", &rel))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The target of symbolic link `rel`, if it is one.
    pub(crate) fn read_link(&self, rel: &str) -> Option<PathBuf> {
        let (dir, last) = self.parent(rel, false).ok()?;
        rustix::fs::readlinkat(dir.as_ref().unwrap_or(&self.fd), last.as_str(), Vec::new())
            .ok()
            .map(|t| PathBuf::from(t.to_string_lossy().into_owned()))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The local path of `rel`, for messages.
    pub(crate) fn display(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    fn io(&self, op: &'static str, rel: &str) -> impl FnOnce(rustix::io::Errno) -> BackupError {
        let path = self.display(rel);
        move |e| BackupError::Io {
            op,
            path,
            source: e.into(),
        }
    }

    /// The directory holding `rel` (walked from the root without following links) and the last
    /// component of `rel`. `create` makes missing directories on the way (mode 0700).
    fn parent(&self, rel: &str, create: bool) -> Result<(Option<OwnedFd>, String), BackupError> {
        let mut parts: Vec<&str> = rel.split('/').collect();
        let last = parts.pop().unwrap_or_default().to_owned();
        let mut dir: Option<OwnedFd> = None;
        for (i, part) in parts.iter().enumerate() {
            let at = parts[..=i].join("/");
            let next = self.open_dir_in(dir.as_ref(), part, create, DIR_MODE_MAX, &at)?;
            dir = Some(next.0);
        }
        Ok((dir, last))
    }

    /// Opens directory `name` in `dir` (the root when `None`), creating it with `mode` when
    /// `create` and it is absent; says whether it was created.
    fn open_dir_in(
        &self,
        dir: Option<&OwnedFd>,
        name: &str,
        create: bool,
        mode: u32,
        rel: &str,
    ) -> Result<(OwnedFd, bool), BackupError> {
        let base = dir.unwrap_or(&self.fd);
        match rustix::fs::openat(base, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok((fd, false)),
            Err(rustix::io::Errno::NOENT) if create => {
                rustix::fs::mkdirat(base, name, Mode::from_raw_mode(mode & DIR_MODE_MAX))
                    .map_err(self.io("create directory", rel))?;
                let fd = rustix::fs::openat(base, name, DIR_FLAGS, Mode::empty())
                    .map_err(self.io("open directory", rel))?;
                Ok((fd, true))
            }
            Err(e) => Err(self.io("open directory", rel)(e)),
        }
    }

    /// Makes directory `rel` (and any missing parent) with at most mode 0700; a directory that
    /// already exists keeps its mode.
    pub(crate) fn make_dir(&self, rel: &str, mode: u32) -> Result<(), BackupError> {
        let (dir, last) = self.parent(rel, true)?;
        let (fd, created) = self.open_dir_in(dir.as_ref(), &last, true, mode, rel)?;
        if created {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & DIR_MODE_MAX))
                .map_err(self.io("chmod", rel))?;
        }
        Ok(())
    }

    /// Creates file `rel`, which must not exist, with at most mode 0600.
    pub(crate) fn create_file(&self, rel: &str, mode: u32) -> Result<File, BackupError> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        self.open_file_with(rel, flags, mode & FILE_MODE_MAX)
    }

    /// Opens file `rel`, created earlier by this restore, for writing.
    pub(crate) fn open_file(&self, rel: &str) -> Result<File, BackupError> {
        self.open_file_with(rel, OFlags::WRONLY | OFlags::NOFOLLOW, 0)
    }

    /// Opens file `rel` for reading and writing (a `--delta` restore compares before it writes).
    pub(crate) fn open_file_rw(&self, rel: &str) -> Result<File, BackupError> {
        self.open_file_with(rel, OFlags::RDWR | OFlags::NOFOLLOW, 0)
    }

    fn open_file_with(&self, rel: &str, flags: OFlags, mode: u32) -> Result<File, BackupError> {
        let (dir, last) = self.parent(rel, false)?;
        let fd = rustix::fs::openat(
            dir.as_ref().unwrap_or(&self.fd),
            last.as_str(),
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(self.io("open", rel))?;
        Ok(File::from(fd))
    }

    /// Reads file `rel`, written by this restore, refusing one of more than `max` bytes.
    pub(crate) fn read_small(&self, rel: &str, max: u64) -> Result<Vec<u8>, BackupError> {
        use std::io::Read;
        let file = self.open_file_with(rel, OFlags::RDONLY | OFlags::NOFOLLOW, 0)?;
        let mut content = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut content)
            .map_err(BackupError::io("read", &self.display(rel)))?;
        if content.len() as u64 > max {
            return Err(BackupError::invalid(
                self.display(rel).display().to_string(),
                format!("larger than {max} bytes"),
            ));
        }
        Ok(content)
    }

    /// Writes a whole new file `rel` (mode at most 0600) and makes it durable.
    pub(crate) fn write_new(&self, rel: &str, content: &[u8]) -> Result<(), BackupError> {
        use std::io::Write;
        let mut file = self.create_file(rel, FILE_MODE_MAX)?;
        let path = self.display(rel);
        file.write_all(content)
            .and_then(|()| file.sync_all())
            .map_err(BackupError::io("write", &path))
    }

    /// fsyncs file or directory `rel` (the root itself for `""`).
    pub(crate) fn sync(&self, rel: &str) -> Result<(), BackupError> {
        let fd = if rel.is_empty() {
            None
        } else {
            let (dir, last) = self.parent(rel, false)?;
            let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            Some(
                rustix::fs::openat(
                    dir.as_ref().unwrap_or(&self.fd),
                    last.as_str(),
                    flags,
                    Mode::empty(),
                )
                .map_err(self.io("open", rel))?,
            )
        };
        rustix::fs::fsync(fd.as_ref().unwrap_or(&self.fd)).map_err(self.io("fsync", rel))
    }

    /// Creates symbolic link `rel` pointing at `to`.
    pub(crate) fn symlink(&self, rel: &str, to: &Path) -> Result<(), BackupError> {
        let (dir, last) = self.parent(rel, false)?;
        rustix::fs::symlinkat(to, dir.as_ref().unwrap_or(&self.fd), last.as_str())
            .map_err(self.io("create link", rel))
    }

    /// Renames `from` to `to`, both in directory `dir` of the root.
    pub(crate) fn rename_in(&self, dir: &str, from: &str, to: &str) -> Result<(), BackupError> {
        let (fd, _) = self.open_dir_in(None, dir, false, 0, dir)?;
        rustix::fs::renameat(&fd, from, &fd, to)
            .map_err(self.io("rename", &format!("{dir}/{from}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn planted_links_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let root = Root::open(
            &dir.path().join("data"),
            "target directory",
            Parent::MustExist,
        )
        .unwrap();
        root.make_dir("base", 0o7777).unwrap();
        assert_eq!(mode(&dir.path().join("data/base")), 0o700);
        std::os::unix::fs::symlink(&outside, dir.path().join("data/base/1")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), dir.path().join("data/base/f")).unwrap();
        assert!(root.create_file("base/1/x", 0o600).is_err());
        assert!(root.make_dir("base/1/y", 0o700).is_err());
        assert!(root.create_file("base/f", 0o600).is_err());
        assert!(root.open_file("base/f").is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        let file = root.create_file("base/2", 0o7777).unwrap();
        drop(file);
        assert_eq!(mode(&dir.path().join("data/base/2")), 0o600);
        assert!(
            root.create_file("base/2", 0o600).is_err(),
            "overwrote a file"
        );
    }

    /// `--delta` removes what the backup lacks: a link is removed as itself (what it points to
    /// survives) or kept unentered, unlisted directories go whole, listed ones are entered.
    #[test]
    fn removing_unlisted_entries_never_follows_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("sub/precious"), "x").unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("base/1")).unwrap();
        std::fs::create_dir_all(data.join("junk/deep")).unwrap();
        std::fs::write(data.join("junk/deep/f"), "x").unwrap();
        std::fs::write(data.join("base/1/keep"), "x").unwrap();
        std::fs::write(data.join("base/1/stale"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, data.join("base/1/link")).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("kept_link")).unwrap();
        let root = Root::open_existing(&data, "data directory").unwrap();
        let keep = |rel: &str, is_dir: bool| match rel {
            "base" | "base/1" => is_dir,
            "base/1/keep" | "kept_link" => !is_dir,
            _ => false,
        };
        assert_eq!(root.remove_unlisted(&keep).unwrap(), 5);
        assert!(data.join("base/1/keep").exists() && !data.join("base/1/stale").exists());
        assert!(!data.join("junk").exists() && !data.join("base/1/link").exists());
        assert_eq!(root.read_link("kept_link"), Some(outside.clone()));
        assert!(outside.join("sub/precious").exists());
        // A root that is a link is refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        assert!(Root::open_existing(&link, "data directory").is_err());
    }

    #[test]
    fn roots_must_be_absent_or_empty_and_keep_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).unwrap();
        Root::open(&empty, "tablespace directory", Parent::MustExist).unwrap();
        assert_eq!(mode(&empty), 0o755);
        std::fs::write(empty.join("x"), "x").unwrap();
        assert!(Root::open(&empty, "tablespace directory", Parent::MustExist).is_err());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        assert!(Root::open(&link, "tablespace directory", Parent::MustExist).is_err());
        assert!(!dir.path().join("nowhere").exists());
        let deep = dir.path().join("a/b");
        assert!(Root::open(&deep, "tablespace directory", Parent::MustExist).is_err());
        assert!(!dir.path().join("a").exists());
        Root::open(&deep, "target directory", Parent::Create).unwrap();
        assert_eq!(mode(&deep), 0o700);
    }
}
