//! Local-directory backend: each key is a file below the repository root.
//!
//! Writes go to a dot-file beside the target, are fsynced, then published with a hard link
//! (`IfAbsent`: the kernel refuses an existing name, so nothing is ever replaced) or a rename
//! (`OverwriteDerived`, not fsynced), and the directory is fsynced so the new name survives a crash. A writer that is
//! dropped removes its dot-file; one that is killed leaves it, listings ignore it, and a later
//! commit in that directory removes it once it is [`STALE_AFTER`] old ([`sweep_if_due`]).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::fs::{self, File};
use tokio::io::AsyncWriteExt;

#[cfg(test)]
use super::powerloss::{record, Op};
use super::{Committed, Leftover, Listed, ObjectReader, PutMode, StoreError};

pub(crate) struct LocalStore {
    root: PathBuf,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

impl LocalStore {
    pub(crate) fn new(root: PathBuf) -> Self {
        LocalStore { root }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Turns "not found" into an error when it is the repository itself that is missing.
    async fn absent(&self) -> Result<(), StoreError> {
        match fs::metadata(&self.root).await {
            Ok(m) if m.is_dir() => Ok(()),
            _ => Err(StoreError::MissingRoot(self.root.display().to_string())),
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<ObjectReader>, StoreError> {
        let path = self.path(key);
        match File::open(&path).await {
            Ok(f) => Ok(Some(Box::pin(tokio::io::BufReader::with_capacity(
                256 << 10,
                f,
            )))),
            Err(e) if e.kind() == ErrorKind::NotFound => self.absent().await.map(|_| None),
            Err(e) => Err(io_err("open", &path)(e)),
        }
    }

    pub(crate) async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = self.path(key);
        match fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => self.absent().await.map(|_| None),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    pub(crate) async fn list_each(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Listed) + Send),
    ) -> Result<(), StoreError> {
        self.absent().await?;
        // Walk only the directory the prefix names, not the whole repository.
        let (dir, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let mut pending = vec![dir.to_owned()];
        while let Some(rel) = pending.pop() {
            let path = self.root.join(&rel);
            let mut entries = match fs::read_dir(&path).await {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("list", &path)(e)),
            };
            while let Some(entry) = entries.next_entry().await.map_err(io_err("list", &path))? {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                // A file deleted between the directory read and this stat (a finished upload's
                // temp file, a fragment cleaned up) is simply no longer there to list.
                let meta = match entry.metadata().await {
                    Ok(meta) => meta,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("stat", &entry.path())(e)),
                };
                if meta.is_dir() {
                    if format!("{key}/").starts_with(prefix)
                        || prefix.starts_with(&format!("{key}/"))
                    {
                        pending.push(key);
                    }
                } else if key.starts_with(prefix) {
                    each(Listed {
                        key,
                        size: meta.len(),
                        modified: meta.modified().ok(),
                    });
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn children(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.absent().await?;
        let path = self.root.join(prefix.trim_end_matches('/'));
        let mut entries = match fs::read_dir(&path).await {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &path)(e)),
        };
        let mut names = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io_err("list", &path))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Hidden entries are temp files; a directory removed since the read is skipped.
            if name.starts_with('.') {
                continue;
            }
            match entry.file_type().await {
                Ok(kind) if kind.is_dir() => names.push(name),
                _ => {}
            }
        }
        Ok(names)
    }

    /// Temp files of writers that are gone (no such process here) and were last written before
    /// `before`, anywhere below the root.
    pub(crate) async fn leftovers(&self, before: SystemTime) -> Result<Vec<Leftover>, StoreError> {
        self.absent().await?;
        let mut out = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let mut entries = match fs::read_dir(&dir).await {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("list", &dir)(e)),
            };
            while let Some(entry) = entries.next_entry().await.map_err(io_err("list", &dir))? {
                // The directory entry's type and name first: a stat only for temp files.
                let Ok(kind) = entry.file_type().await else {
                    continue;
                };
                if kind.is_dir() {
                    pending.push(entry.path());
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = temp_file_pid(&name) else {
                    continue;
                };
                let Ok(meta) = entry.metadata().await else {
                    continue;
                };
                let old = meta.modified().is_ok_and(|m| m < before);
                if old && !Path::new(&format!("/proc/{pid}")).exists() {
                    out.push(Leftover::TempFile(entry.path()));
                }
            }
        }
        Ok(out)
    }

    pub(crate) async fn remove_temp(&self, path: &Path) -> Result<(), StoreError> {
        // Only a temp file below this root, as `leftovers` found it.
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if !path.starts_with(&self.root) || name.as_deref().and_then(temp_file_pid).is_none() {
            return Err(StoreError::BadKey(path.display().to_string()));
        }
        match fs::remove_file(path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", path)(e)),
        }
    }

    pub(crate) fn writer(&self, key: &str) -> LocalWriter {
        LocalWriter {
            root: self.root.clone(),
            target: self.path(key),
            temp: None,
        }
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.delete_batch(std::slice::from_ref(&key.to_owned()))
            .await
    }

    /// Removes every key, then makes the removals durable once per directory (not once per
    /// file: a retention run deletes many thousands of WAL files from one directory).
    pub(crate) async fn delete_batch(&self, keys: &[String]) -> Result<(), StoreError> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let path = self.path(key);
            match fs::remove_file(&path).await {
                Ok(()) => {
                    #[cfg(test)]
                    record(Op::Unlink(path.clone()));
                    dirs.insert(parent(&path).to_path_buf());
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("delete", &path)(e)),
            }
        }
        for dir in &dirs {
            // A directory whose last object went (a streamed segment's fragments, an expired
            // backup's packs) goes too, so deletions do not leave a trail of empty directories;
            // a non-empty one stays. Its sweep mark would keep it, so the mark goes first (in a
            // directory that stays, that only brings the next sweep forward).
            if *dir != self.root {
                let _ = fs::remove_file(dir.join(SWEEP_MARK)).await;
                if fs::remove_dir(dir).await.is_ok() {
                    #[cfg(test)]
                    record(Op::Rmdir(dir.clone()));
                    sync_dir(parent(dir)).await?;
                    continue;
                }
            }
            sync_dir(dir).await?;
        }
        Ok(())
    }
}

pub(crate) struct LocalWriter {
    root: PathBuf,
    target: PathBuf,
    temp: Option<(PathBuf, File)>,
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl LocalWriter {
    async fn create_temp(&self) -> Result<(PathBuf, File), StoreError> {
        if !fs::metadata(&self.root).await.is_ok_and(|m| m.is_dir()) {
            return Err(StoreError::MissingRoot(self.root.display().to_string()));
        }
        let dir = parent(&self.target);
        create_dirs(&self.root, dir).await?;
        let name = self
            .target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dir.join(format!(
            ".{name}.tmp.{}.{}",
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        let open = || options.open(&temp);
        let file = match open().await {
            // A delete may have just removed the emptied directory: make it again, once.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                create_dirs(&self.root, dir).await?;
                open().await
            }
            other => other,
        }
        .map_err(io_err("create", &temp))?;
        #[cfg(test)]
        record(Op::Create(temp.clone()));
        Ok((temp, file))
    }

    async fn take_temp(&mut self) -> Result<(PathBuf, File), StoreError> {
        match self.temp.take() {
            Some(t) => Ok(t),
            None => self.create_temp().await,
        }
    }

    pub(crate) async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let temp = self.take_temp().await?;
        let (_temp, file) = self.temp.insert(temp);
        file.write_all(chunk)
            .await
            .map_err(io_err("write", &self.target))?;
        #[cfg(test)]
        record(Op::Write(_temp.clone(), chunk.len() as u64));
        Ok(())
    }

    pub(crate) async fn commit(mut self, mode: PutMode) -> Result<Committed, StoreError> {
        // An empty object still gets its file.
        let (temp, mut file) = self.take_temp().await?;
        let durable = mode != PutMode::OverwriteDerived;
        let result = async {
            file.flush().await.map_err(io_err("write", &temp))?;
            crate::failpoint::pause_if_enabled("local-temp-written").await;
            if durable {
                file.sync_all().await.map_err(io_err("fsync", &temp))?;
                #[cfg(test)]
                record(Op::FsyncFile(temp.clone()));
                crate::failpoint::pause_if_enabled("local-temp-fsynced").await;
            }
            drop(file);
            let outcome = match mode {
                PutMode::IfAbsent => match fs::hard_link(&temp, &self.target).await {
                    Ok(()) => {
                        #[cfg(test)]
                        record(Op::Link(temp.clone(), self.target.clone()));
                        Committed::Created
                    }
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => Committed::AlreadyExists,
                    Err(e) => return Err(io_err("link", &self.target)(e)),
                },
                PutMode::OverwriteDerived | PutMode::Replace => {
                    fs::rename(&temp, &self.target)
                        .await
                        .map_err(io_err("rename", &self.target))?;
                    #[cfg(test)]
                    record(Op::Rename(temp.clone(), self.target.clone()));
                    Committed::Created
                }
            };
            crate::failpoint::pause_if_enabled("local-linked").await;
            if outcome == Committed::Created && durable {
                sync_dir(parent(&self.target)).await?;
                crate::failpoint::pause_if_enabled("local-dir-fsynced").await;
            }
            Ok(outcome)
        }
        .await;
        let _ = std::fs::remove_file(&temp);
        #[cfg(test)]
        record(Op::Unlink(temp.clone()));
        if result.is_ok() {
            sweep_if_due(parent(&self.target)).await;
        }
        result
    }
}

/// How old a temp file of another writer must be before a sweep removes it. A live writer
/// touches its file with every write; an hour without one means it was killed (or is stalled,
/// and then the check that its process is gone still protects it on this host).
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// The dot-file whose modification time records a directory's last sweep.
const SWEEP_MARK: &str = ".walvault-swept";

/// Removes stale temp files of killed writers from `dir`, at most once per [`STALE_AFTER`]
/// across all processes: a commit costs one stat of the mark, and a directory read (of a WAL
/// directory that may hold many thousands of names) happens only when the mark is old. Best
/// effort: a failure leaves the files for a later sweep.
async fn sweep_if_due(dir: &Path) {
    let mark = dir.join(SWEEP_MARK);
    let now = SystemTime::now();
    let recent = |modified: SystemTime| now.duration_since(modified).is_ok_and(|d| d < STALE_AFTER);
    if let Ok(meta) = fs::metadata(&mark).await {
        if meta.modified().is_ok_and(recent) {
            return;
        }
    }
    // Claim the sweep before doing it, so concurrent committers do not all read the directory.
    if let Err(e) = File::create(&mark).await {
        tracing::debug!("cannot mark a sweep of {}: {e}", dir.display());
        return;
    }
    let Ok(mut entries) = fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_file_pid(&name) else {
            continue;
        };
        let stale = match entry.metadata().await {
            Ok(meta) => !meta.modified().is_ok_and(recent),
            Err(_) => false,
        };
        if stale && !Path::new(&format!("/proc/{pid}")).exists() {
            match fs::remove_file(entry.path()).await {
                Ok(()) => {
                    tracing::info!("removed {}, left by a killed write", entry.path().display())
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => tracing::debug!("cannot remove {}: {e}", entry.path().display()),
            }
        }
    }
}

/// The writer's process id when `name` is a temp file ([`LocalWriter`]'s `.NAME.tmp.PID.SEQ`).
fn temp_file_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix('.')?.rsplitn(3, '.');
    let (seq, pid, rest) = (parts.next()?, parts.next()?, parts.next()?);
    seq.parse::<u64>().ok()?;
    (rest.ends_with(".tmp") && rest.len() > 4).then_some(())?;
    pid.parse().ok()
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if let Some((temp, _)) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// Creates the directories between `root` and `dir`, fsyncing each new entry's parent so the
/// directory itself survives a crash.
async fn create_dirs(root: &Path, dir: &Path) -> Result<(), StoreError> {
    if dir == root || fs::metadata(dir).await.is_ok() {
        return Ok(());
    }
    Box::pin(create_dirs(root, parent(dir))).await?;
    match fs::create_dir(dir).await {
        Ok(()) => {
            #[cfg(test)]
            record(Op::Mkdir(dir.to_path_buf()));
            sync_dir(parent(dir)).await
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("mkdir", dir)(e)),
    }
}

async fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let d = File::open(dir).await.map_err(io_err("open", dir))?;
    d.sync_all().await.map_err(io_err("fsync", dir))?;
    #[cfg(test)]
    record(Op::FsyncDir(dir.to_path_buf()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn keys(store: &LocalStore, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        store
            .list_each(prefix, &mut |o| keys.push(o.key))
            .await
            .unwrap();
        keys.sort();
        keys
    }
    use tokio::io::AsyncReadExt;

    async fn read(store: &LocalStore, key: &str) -> Option<Vec<u8>> {
        let mut r = store.get(key).await.unwrap()?;
        let mut v = Vec::new();
        r.read_to_end(&mut v).await.unwrap();
        Some(v)
    }

    #[tokio::test]
    async fn put_get_list_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        assert_eq!(read(&store, "dir/a").await, None);

        let mut w = store.writer("dir/a");
        w.write(b"hello").await.unwrap();
        assert_eq!(
            w.commit(PutMode::IfAbsent).await.unwrap(),
            Committed::Created
        );

        let mut w = store.writer("dir/a");
        w.write(b"other").await.unwrap();
        assert_eq!(
            w.commit(PutMode::IfAbsent).await.unwrap(),
            Committed::AlreadyExists
        );
        assert_eq!(read(&store, "dir/a").await.unwrap(), b"hello");

        let mut w = store.writer("dir/a");
        w.write(b"replaced").await.unwrap();
        w.commit(PutMode::OverwriteDerived).await.unwrap();
        assert_eq!(read(&store, "dir/a").await.unwrap(), b"replaced");

        let mut w = store.writer("derived/a");
        w.write(b"derived").await.unwrap();
        w.commit(PutMode::OverwriteDerived).await.unwrap();
        let mut w = store.writer("derived/a");
        w.write(b"derived again").await.unwrap();
        w.commit(PutMode::OverwriteDerived).await.unwrap();
        assert_eq!(read(&store, "derived/a").await.unwrap(), b"derived again");

        // An abandoned writer leaves nothing listed.
        let mut w = store.writer("dir/b");
        w.write(b"partial").await.unwrap();
        drop(w);
        assert_eq!(keys(&store, "dir/").await, ["dir/a"]);
        assert_eq!(store.head("dir/a").await.unwrap(), Some(8));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|name| name != SWEEP_MARK)
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");

        store.delete("dir/a").await.unwrap();
        assert_eq!(store.head("dir/a").await.unwrap(), None);
        assert!(
            !dir.path().join("dir").exists(),
            "an emptied directory is removed"
        );
        assert!(dir.path().exists(), "the repository root stays");
    }

    #[tokio::test]
    async fn a_missing_root_is_an_error_not_a_miss() {
        let store = LocalStore::new(PathBuf::from("/nonexistent/walvault-repo"));
        let err = store.get("dir/x").await.err().expect("must fail");
        assert!(matches!(err, StoreError::MissingRoot(_)), "{err}");
        let mut w = store.writer("dir/x");
        assert!(w.write(b"x").await.is_err());
    }

    #[tokio::test]
    async fn stale_temp_files_of_killed_writers_are_swept_on_a_later_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let wal = dir.path().join("dir");
        std::fs::create_dir(&wal).unwrap();
        // A pid no process has (beyond pid_max); a live one is this process.
        let dead = wal.join(".000000010000000000000001.tmp.4294967295.0");
        let dead_fresh = wal.join(".000000010000000000000002.tmp.4294967295.1");
        let live = wal.join(format!(
            ".000000010000000000000003.tmp.{}.2",
            std::process::id()
        ));
        let other = wal.join(".not-a-temp-file");
        for f in [&dead, &dead_fresh, &live, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        let old = SystemTime::now() - STALE_AFTER - Duration::from_secs(60);
        for f in [&dead, &live, &other] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }

        let mut w = store.writer("dir/000000010000000000000004");
        w.write(b"segment").await.unwrap();
        w.commit(PutMode::IfAbsent).await.unwrap();
        assert!(
            !dead.exists(),
            "a stale temp file of a dead process is removed"
        );
        assert!(
            dead_fresh.exists(),
            "a recent one may belong to a live writer"
        );
        assert!(live.exists(), "a stale one of a live process stays");
        assert!(other.exists(), "only temp files are swept");

        // The next sweep of the directory waits for the grace period.
        std::fs::write(&dead, b"x").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&dead)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let mut w = store.writer("dir/000000010000000000000005");
        w.write(b"segment").await.unwrap();
        w.commit(PutMode::IfAbsent).await.unwrap();
        assert!(dead.exists(), "swept at most once per grace period");
        assert_eq!(
            keys(&store, "dir/").await.len(),
            2,
            "the mark is not listed"
        );
    }

    #[test]
    fn temp_file_names_are_recognised() {
        assert_eq!(
            temp_file_pid(".0000000100000000000000AB.tmp.123.4"),
            Some(123)
        );
        assert_eq!(temp_file_pid(".a.b.tmp.7.0"), Some(7));
        for other in [
            ".walvault-swept",
            "x.tmp.1.2",
            ".tmp.1.2",
            ".a.tmp.x.2",
            ".a.tmp.1.y",
            ".a.1.2",
        ] {
            assert_eq!(temp_file_pid(other), None, "{other}");
        }
    }
}
