//! A power-loss model of the local store, for its tests.
//!
//! In test builds the local store journals every filesystem step it takes (create, write, fsync
//! of a file or a directory, link, rename, mkdir, unlink) on the test's thread. [`crashes`]
//! replays a journal and, after every step, computes what the worst crash POSIX allows would
//! leave: only file contents that were fsynced, only directory entries whose directory was
//! fsynced since they changed (and whose ancestors survive). Names whose directory was not
//! fsynced may also survive: a crash may keep any of them, so a torn file behind such a name
//! counts as visible. Cheaper than a snapshotting filesystem and stricter than ext4 (which keeps
//! more), it checks the order of the store's steps, which is what decides durability.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One filesystem step of the local store.
#[derive(Clone, Debug)]
pub(super) enum Op {
    Create(PathBuf),
    Write(PathBuf, u64),
    FsyncFile(PathBuf),
    Link(PathBuf, PathBuf),
    Rename(PathBuf, PathBuf),
    Unlink(PathBuf),
    Mkdir(PathBuf),
    Rmdir(PathBuf),
    FsyncDir(PathBuf),
    /// Not a filesystem step: the test saw a commit of this path succeed.
    Acknowledged(PathBuf),
}

thread_local! {
    static JOURNAL: RefCell<Option<Vec<Op>>> = const { RefCell::new(None) };
}

/// Appends `op` to this thread's journal, if one was started.
pub(super) fn record(op: Op) {
    JOURNAL.with(|j| {
        if let Some(ops) = j.borrow_mut().as_mut() {
            ops.push(op);
        }
    });
}

/// Starts journaling this thread's store steps.
pub(super) fn start() {
    JOURNAL.with(|j| *j.borrow_mut() = Some(Vec::new()));
}

/// Stops journaling and returns the steps.
pub(super) fn take() -> Vec<Op> {
    JOURNAL.with(|j| j.borrow_mut().take().unwrap_or_default())
}

/// A file's content: how many bytes were written, how many are durable.
#[derive(Clone, Copy, Default)]
struct Inode {
    written: u64,
    durable: u64,
}

/// What survived a crash: for each surviving name, whether its content is whole.
pub(super) struct Survivors {
    /// Names certainly there after the crash, with whether their content is whole.
    pub(super) durable: BTreeMap<PathBuf, bool>,
    /// Names a crash may keep (certain or not), with whether their content is whole.
    pub(super) possible: BTreeMap<PathBuf, bool>,
    /// Paths whose commit was acknowledged before the crash.
    pub(super) acknowledged: BTreeSet<PathBuf>,
}

/// The state after each prefix of `ops` (a crash after 0, 1, ... all steps). `root` exists and
/// is durable.
pub(super) fn crashes(root: &Path, ops: &[Op]) -> Vec<Survivors> {
    let mut inodes: Vec<Inode> = Vec::new();
    // Names as the running system sees them, and as the disk holds them. Directories are
    // names with no inode (`None`).
    let mut live: BTreeMap<PathBuf, Option<usize>> = BTreeMap::new();
    let mut disk: BTreeMap<PathBuf, Option<usize>> = BTreeMap::new();
    let mut acknowledged = BTreeSet::new();
    let mut out = vec![survivors(root, &live, &disk, &inodes, &acknowledged)];
    for op in ops {
        match op {
            Op::Create(p) => {
                inodes.push(Inode::default());
                live.insert(p.clone(), Some(inodes.len() - 1));
            }
            Op::Write(p, n) => {
                if let Some(Some(i)) = live.get(p) {
                    inodes[*i].written += n;
                }
            }
            Op::FsyncFile(p) => {
                if let Some(Some(i)) = live.get(p) {
                    inodes[*i].durable = inodes[*i].written;
                }
            }
            Op::Link(from, to) => {
                if let Some(&inode) = live.get(from) {
                    live.insert(to.clone(), inode);
                }
            }
            Op::Rename(from, to) => {
                if let Some(inode) = live.remove(from) {
                    live.insert(to.clone(), inode);
                }
            }
            Op::Unlink(p) | Op::Rmdir(p) => {
                live.remove(p);
            }
            Op::Mkdir(p) => {
                live.insert(p.clone(), None);
            }
            Op::FsyncDir(dir) => {
                disk.retain(|p, _| p.parent() != Some(dir.as_path()));
                for (p, inode) in &live {
                    if p.parent() == Some(dir.as_path()) {
                        disk.insert(p.clone(), *inode);
                    }
                }
            }
            Op::Acknowledged(p) => {
                acknowledged.insert(p.clone());
            }
        }
        out.push(survivors(root, &live, &disk, &inodes, &acknowledged));
    }
    out
}

fn survivors(
    root: &Path,
    live: &BTreeMap<PathBuf, Option<usize>>,
    disk: &BTreeMap<PathBuf, Option<usize>>,
    inodes: &[Inode],
    acknowledged: &BTreeSet<PathBuf>,
) -> Survivors {
    let whole =
        |inode: Option<usize>| inode.is_some_and(|i| inodes[i].durable == inodes[i].written);
    // A name is reachable when every directory above it, up to the root, is there too.
    let reachable = |names: &BTreeMap<PathBuf, Option<usize>>, p: &Path| {
        p.ancestors()
            .skip(1)
            .take_while(|a| *a != root)
            .all(|a| names.get(a).is_some_and(Option::is_none))
    };
    let files = |names: &BTreeMap<PathBuf, Option<usize>>,
                 other: &BTreeMap<PathBuf, Option<usize>>| {
        names
            .iter()
            .filter(|(p, inode)| inode.is_some() && (reachable(names, p) || reachable(other, p)))
            .map(|(p, inode)| (p.clone(), whole(*inode)))
            .collect::<BTreeMap<_, _>>()
    };
    let durable = disk
        .iter()
        .filter(|(p, inode)| inode.is_some() && reachable(disk, p))
        .map(|(p, inode)| (p.clone(), whole(*inode)))
        .collect();
    let mut possible = files(disk, live);
    possible.extend(files(live, disk));
    Survivors {
        durable,
        possible,
        acknowledged: acknowledged.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::store::local::LocalStore;
    use crate::repo::store::{Committed, PutMode};

    /// The journal of a run of the store: WAL, a pack, a fragment deleted again, a summary
    /// overwritten, a refused overwrite, each in a directory the store creates.
    async fn journal_of_a_run(root: &Path) -> Vec<Op> {
        let store = LocalStore::new(root.to_path_buf());
        let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let writes: [(&str, PutMode, &[u8]); 7] = [
            ("wal/000000010000000000000001", PutMode::IfAbsent, &big),
            ("wal/000000010000000000000002", PutMode::IfAbsent, b""),
            (
                "walsummary/000000010000000000000001",
                PutMode::OverwriteDerived,
                b"{}",
            ),
            (
                "walsummary/000000010000000000000001",
                PutMode::OverwriteDerived,
                b"{ }",
            ),
            (
                "stream/000000010000000000000003/00000000-00002000",
                PutMode::IfAbsent,
                b"f",
            ),
            ("backups/base_x/packs/000000", PutMode::IfAbsent, &big),
            ("wal/000000010000000000000001", PutMode::IfAbsent, b"other"),
        ];
        start();
        for (key, mode, content) in writes {
            let mut w = store.writer(key);
            let (a, b) = content.split_at(content.len() / 2);
            w.write(a).await.unwrap();
            w.write(b).await.unwrap();
            let committed = w.commit(mode).await.unwrap();
            if mode == PutMode::IfAbsent
                && committed == Committed::Created
                && !key.starts_with("stream/")
            {
                record(Op::Acknowledged(root.join(key)));
            }
        }
        store
            .delete("stream/000000010000000000000003/00000000-00002000")
            .await
            .unwrap();
        take()
    }

    /// After a power loss at any step, every object whose commit returned is there whole, and
    /// no object (a summary aside: optional, not fsynced, checked by the codec) is visible torn.
    #[tokio::test]
    async fn acknowledged_objects_survive_a_power_loss_at_any_step() {
        let dir = tempfile::tempdir().unwrap();
        let ops = journal_of_a_run(dir.path()).await;
        assert!(
            ops.iter().any(|op| matches!(op, Op::FsyncDir(_))),
            "{ops:?}"
        );
        let states = crashes(dir.path(), &ops);
        for (step, state) in states.iter().enumerate() {
            let after = step.checked_sub(1).map(|i| &ops[i]);
            for acked in &state.acknowledged {
                assert_eq!(
                    state.durable.get(acked),
                    Some(&true),
                    "a power loss after step {step} ({after:?}) loses acknowledged {}",
                    acked.display()
                );
            }
            for (path, whole) in &state.possible {
                let name = path.file_name().unwrap().to_string_lossy();
                let derived = path.starts_with(dir.path().join("walsummary"));
                assert!(
                    *whole || name.starts_with('.') || derived,
                    "a power loss after step {step} ({after:?}) may show {} torn",
                    path.display()
                );
            }
        }
    }

    /// The model catches the two mistakes that lose data: naming a file before its content is
    /// durable, and acknowledging before the directory entry is.
    #[test]
    fn the_model_catches_missing_fsyncs() {
        let root = Path::new("/r");
        let (temp, key) = (PathBuf::from("/r/.k.tmp"), PathBuf::from("/r/k"));
        let linked_before_fsync = [
            Op::Create(temp.clone()),
            Op::Write(temp.clone(), 10),
            Op::Link(temp.clone(), key.clone()),
            Op::FsyncDir(root.to_path_buf()),
            Op::Acknowledged(key.clone()),
        ];
        let last = crashes(root, &linked_before_fsync).pop().unwrap();
        assert_eq!(last.durable.get(&key), Some(&false));
        let no_dir_fsync = [
            Op::Create(temp.clone()),
            Op::Write(temp.clone(), 10),
            Op::FsyncFile(temp.clone()),
            Op::Link(temp, key.clone()),
            Op::Acknowledged(key.clone()),
        ];
        let last = crashes(root, &no_dir_fsync).pop().unwrap();
        assert_eq!(last.durable.get(&key), None);
        assert_eq!(last.possible.get(&key), Some(&true));
    }
}
