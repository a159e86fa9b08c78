//! Named failpoints for crash tests.
//!
//! `WALVAULT_FAILPOINTS=name[=action][,...]` makes the process stop at the named point: by
//! default it announces on stderr that it reached the point and then waits forever, so a test can
//! kill it at an exact moment (for example just before an upload is committed) instead of racing
//! a timer; with `=panic` it panics there, so a test can see how a command ends on a bug. Unset, a
//! failpoint costs one environment lookup. Every name is in [`FAILPOINTS`], which the crash tests
//! iterate over (they include this file, so it depends on `std` only).

/// Every failpoint, with the step that has just happened (or is about to) when it is reached.
/// Names are stable: the crash tests and the RELIABILITY figures refer to them.
pub(crate) const FAILPOINTS: &[(&str, &str)] = &[
    // Any object, both repository kinds.
    ("store-before-commit", "an object is written, not committed"),
    (
        "store-committed",
        "an object is committed (durable, visible)",
    ),
    // The local store's commit, step by step.
    (
        "local-temp-written",
        "local store: temp file written, not fsynced",
    ),
    (
        "local-temp-fsynced",
        "local store: temp file fsynced, not linked",
    ),
    (
        "local-linked",
        "local store: linked under its key, directory not fsynced",
    ),
    (
        "local-dir-fsynced",
        "local store: directory fsynced, temp not removed",
    ),
    // wal-push and the detached pusher.
    (
        "wal-push-claim-taken",
        "wal-push holds the segment's claim, nothing stored",
    ),
    ("wal-stored", "a segment is stored, its summary not yet"),
    ("summary-written", "a segment's summary is stored"),
    (
        "pusher-claim-taken",
        "the pusher holds a segment's claim, nothing stored",
    ),
    (
        "pusher-marker-written",
        "the pusher stored a segment and recorded its marker",
    ),
    // wal-fetch and the prefetcher.
    ("wal-fetch", "wal-fetch started, nothing read"),
    (
        "restored-temp-written",
        "a fetched object is in its temp file, not renamed",
    ),
    (
        "prefetch-spool-written",
        "the prefetcher renamed a segment into its spool",
    ),
    // backup-push.
    (
        "backup-push-started",
        "pg_backup_start returned, no file read",
    ),
    ("backup-push-pack-stored", "a pack is stored"),
    (
        "backup-push-stopped",
        "pg_backup_stop returned, manifest not written",
    ),
    ("backup-push-manifest-written", "the manifest is stored"),
    // backup-fetch and recover.
    (
        "backup-fetch-files-written",
        "every file written, nothing fsynced",
    ),
    (
        "backup-fetch-files-fsynced",
        "files fsynced, backup_label and pg_control not in place",
    ),
    (
        "backup-fetch-pg-control-written",
        "pg_control renamed into place and fsynced",
    ),
    (
        "recover-restored",
        "the backup is restored, recovery settings not written",
    ),
    (
        "recover-settings-written",
        "recovery settings and recovery.signal written",
    ),
    // wal-receive.
    ("receive-fragment-stored", "a streamed fragment is stored"),
    (
        "receive-segment-stored",
        "a streamed segment is stored whole, fragments kept",
    ),
    (
        "receive-slot-advanced",
        "a standby status update reporting a new flush position is sent",
    ),
    // delete (retention).
    (
        "delete-before-backups",
        "the plan is proven and the lock held, nothing deleted",
    ),
    (
        "delete-after-manifest",
        "an expired backup's manifest is deleted, its packs not yet",
    ),
    (
        "delete-before-wal",
        "expired backups are deleted, WAL not yet",
    ),
    (
        "delete-wal-batch",
        "a batch of expired WAL (or garbage) is deleted",
    ),
    (
        "delete-before-garbage",
        "expired WAL is deleted, garbage not yet collected",
    ),
];

/// Acts on the failpoint `name` if it is enabled: blocks forever, or panics.
pub(crate) async fn pause_if_enabled(name: &str) {
    if enabled(name) {
        std::future::pending::<()>().await;
    }
}

/// Whether `name` is enabled; panics for `=panic`, announces a pause on stderr.
fn enabled(name: &str) -> bool {
    debug_assert!(
        FAILPOINTS.iter().any(|(n, _)| *n == name),
        "failpoint {name} is not in FAILPOINTS"
    );
    let Ok(list) = std::env::var("WALVAULT_FAILPOINTS") else {
        return false;
    };
    for entry in list.split(',') {
        let (point, action) = entry.split_once('=').unwrap_or((entry, "pause"));
        if point.trim() != name {
            continue;
        }
        if action.trim() == "panic" {
            panic!("failpoint {name} reached");
        }
        eprintln!("walvault: failpoint {name} reached, pausing");
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::FAILPOINTS;

    /// Every name used in the source is in the table, and every table entry is used: the crash
    /// tests iterate over the table, so a point missing from it would go untested.
    #[test]
    fn the_table_lists_every_failpoint_used() {
        let mut used = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for part in text.split("pause_if_enabled(\"").skip(1) {
                        used.push(part.split('"').next().unwrap().to_owned());
                    }
                }
            }
        }
        used.sort();
        used.dedup();
        let mut listed: Vec<String> = FAILPOINTS.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(used, listed);
    }
}
