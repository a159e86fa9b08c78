//! A small tmpfs for disk-full tests: mounted (the tests run as root) on a directory of the test,
//! owned by the PostgreSQL user, resizable to give space back, unmounted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    dir: PathBuf,
}

fn mount(args: &[&str], dir: &Path) {
    let out = Command::new("mount")
        .args(args)
        .arg(dir)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Tmpfs {
    /// Mounts a tmpfs of `kib` KiB on `dir` (which must exist) and gives it to the PostgreSQL
    /// user, mode 0700.
    pub fn mount(dir: &Path, kib: u64) -> Tmpfs {
        let options = format!("size={kib}k,mode=0700");
        mount(&["-t", "tmpfs", "-o", &options, "tmpfs"], dir);
        super::give_to_postgres(dir);
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Changes the size (space returns, or goes).
    pub fn resize(&self, kib: u64) {
        mount(&["-o", &format!("remount,size={kib}k")], &self.dir);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy, so a process still holding a file there cannot make the test fail here.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
