//! Timeline history (`<tli>.history`) and backup history (`<segment>.<offset>.backup`) files,
//! checked as strictly as segments before they are stored and before they are served: both come
//! from outside (a local file, a repository object) and recovery plans with them. PostgreSQL
//! never writes an empty one, one for timeline 1, one over [`MAX_LEN`], or one whose timelines
//! or start location disagree with its name.

use walvault_wal::{BackupHistory, TimelineHistory, WalFileName, WalSegmentSize};

/// The largest history file accepted. A timeline history grows by one short line per promotion
/// and a backup history is a dozen lines, so a real one stays far below this.
pub(crate) const MAX_LEN: u64 = 1 << 20;

/// Why a history file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{file} is not a history file PostgreSQL writes: {problem}")]
pub(crate) struct BadHistoryFile {
    file: String,
    problem: String,
}

/// Checks the content of the history or backup history file `name`. `seg_size`, when known,
/// lets a backup history's start location be checked against the offset in its name.
pub(crate) fn check(
    name: &WalFileName,
    content: &[u8],
    seg_size: Option<WalSegmentSize>,
) -> Result<(), BadHistoryFile> {
    let bad = |problem: String| BadHistoryFile {
        file: name.to_string(),
        problem,
    };
    if content.len() as u64 > MAX_LEN {
        return Err(bad(format!(
            "{} bytes, over the {MAX_LEN} byte limit",
            content.len()
        )));
    }
    let text = std::str::from_utf8(content).map_err(|e| bad(format!("not text: {e}")))?;
    match name {
        WalFileName::History(tli) => {
            if tli.0 <= 1 {
                return Err(bad("timeline 1 has no history".into()));
            }
            let history = TimelineHistory::parse(*tli, text).map_err(|e| bad(e.to_string()))?;
            if history.entries.is_empty() {
                return Err(bad("it names no parent timeline".into()));
            }
        }
        WalFileName::Backup { segment, offset } => {
            let backup = BackupHistory::parse(text).map_err(|e| bad(e.to_string()))?;
            match backup.stop_lsn {
                Some(stop) if stop >= backup.start_lsn => {}
                Some(stop) => {
                    return Err(bad(format!(
                        "STOP WAL LOCATION {stop} is before START WAL LOCATION {}",
                        backup.start_lsn
                    )))
                }
                None => return Err(bad("STOP WAL LOCATION is missing".into())),
            }
            // pg_backup_stop names the file after the start segment and the start's offset in it.
            let start = backup.start_lsn.0;
            let in_name = match seg_size {
                Some(size) => segment
                    .start_lsn(size)
                    .ok()
                    .is_some_and(|s| s.0 + u64::from(*offset) == start),
                // Every segment size is a multiple of the smallest one (1 MiB).
                None => start % (1 << 20) == u64::from(*offset) % (1 << 20),
            };
            if !in_name {
                return Err(bad(format!(
                    "START WAL LOCATION {} is not offset {offset:X} of segment {segment}",
                    backup.start_lsn
                )));
            }
            let start_line = text.lines().find(|l| l.starts_with("START WAL LOCATION:"));
            if !start_line.is_some_and(|l| l.contains(&format!("(file {segment})"))) {
                return Err(bad(format!(
                    "START WAL LOCATION does not name segment {segment}"
                )));
            }
            let start_tli = text
                .lines()
                .find_map(|l| l.strip_prefix("START TIMELINE:"))
                .map(str::trim);
            if start_tli.is_some_and(|t| t != segment.tli.0.to_string()) {
                return Err(bad(format!(
                    "START TIMELINE is not timeline {} of its name",
                    segment.tli.0
                )));
            }
        }
        WalFileName::Segment(_) | WalFileName::Partial(_) => {
            return Err(bad("a segment is not a history file".into()))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(name: &str, content: &str) -> Result<(), BadHistoryFile> {
        let size = WalSegmentSize::new(16 << 20).ok();
        check(&name.parse().unwrap(), content.as_bytes(), size)
    }

    /// What pg_backup_stop archives for a backup started at 0/2000028 on timeline 1.
    const BACKUP: &str = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
        STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n\
        CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
        START TIME: 2024-05-01 12:00:00 UTC\nLABEL: base\nSTART TIMELINE: 1\n\
        STOP TIME: 2024-05-01 12:00:01 UTC\nSTOP TIMELINE: 1\n";

    #[test]
    fn what_postgres_writes_is_accepted() {
        checked(
            "00000002.history",
            "1\t0/3000158\tno recovery target specified\n",
        )
        .unwrap();
        checked("000000010000000000000002.00000028.backup", BACKUP).unwrap();
    }

    #[test]
    fn empty_inconsistent_and_oversized_files_are_refused() {
        for (name, content) in [
            ("00000002.history", ""),
            ("00000002.history", "\n# nothing\n"),
            ("00000001.history", "1\t0/3000158\tx\n"),
            ("00000002.history", "2\t0/3000158\tx\n"),
            ("00000002.history", "one\t0/3000158\tx\n"),
            ("000000010000000000000002.00000028.backup", ""),
            // Start offset, segment or timeline other than the name says.
            ("000000010000000000000002.00000030.backup", BACKUP),
            ("000000010000000000000003.00000028.backup", BACKUP),
            ("000000020000000000000002.00000028.backup", BACKUP),
            (
                "000000010000000000000002.00000028.backup",
                "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
            ),
        ] {
            assert!(checked(name, content).is_err(), "{name}: {content:?}");
        }
        let huge = format!("1\t0/3000158\t{}\n", "x".repeat(MAX_LEN as usize));
        assert!(checked("00000002.history", &huge).is_err());
    }
}
