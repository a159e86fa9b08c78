//! walvault: PostgreSQL WAL archiving and point-in-time recovery.
//!
//! The crate's public face is what the `walvault` binary calls: the command line (`cli`), the
//! commands (`cmd`) and the log format (`logging`). Everything else is crate-private: the
//! integration tests drive the binary, not the library. The module map is in ARCHITECTURE.md.

pub(crate) mod backup;
pub mod cli;
pub mod cmd;
pub(crate) mod config;
pub(crate) mod failpoint;
#[cfg(test)]
mod fuzz;
pub mod logging;
pub(crate) mod ops;
pub(crate) mod pg;
pub(crate) mod prometheus;
pub(crate) mod receive;
pub(crate) mod recover;
pub(crate) mod replication;
pub(crate) mod repo;
pub(crate) mod retention;
pub(crate) mod time;
pub(crate) mod verify;
pub(crate) mod wal;

#[doc(hidden)]
pub use repo::testing;

#[cfg(test)]
mod tests {
    /// ARCHITECTURE.md's module map names every source file of the workspace, and only those.
    #[test]
    fn the_module_map_matches_the_tree() {
        fn sources(dir: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    sources(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path.to_string_lossy().into_owned());
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
        let mut files = Vec::new();
        for dir in ["src", "crates/walvault-wal/src"] {
            sources(&root.join(dir), &mut files);
        }
        let mut missing = Vec::new();
        for file in &files {
            let rel = file.strip_prefix(&format!("{}/", root.display())).unwrap();
            if !doc.contains(&format!("| `{rel}` |")) {
                missing.push(rel.to_owned());
            }
        }
        assert!(
            missing.is_empty(),
            "not in ARCHITECTURE.md's module map: {missing:?}"
        );
        let documented = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once("` |"))
            .map(|(path, _)| path)
            .filter(|p| p.ends_with(".rs"));
        for path in documented {
            assert!(
                root.join(path).exists(),
                "ARCHITECTURE.md maps {path}, which is gone"
            );
        }
    }
}
