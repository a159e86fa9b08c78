//! Checking stored backups against their manifests, for `verify`.
//!
//! Understands what makes a backup restorable beyond every object's own checksum (which
//! `verify` checks by reading each object): every piece a manifest names lies inside a pack that
//! exists and read back whole (and so do the pack's page sums, where the backup has them), files
//! stored whole are covered by their pieces without gaps, the delta chain resolves to a full
//! backup, and the WAL from each backup's start to its stop segment is in the archive. Used by
//! [`crate::verify`].

use std::collections::{HashMap, HashSet};

use walvault_wal::{SegmentName, TimelineId, WalSegmentSize};

use super::manifest::{Manifest, Storage};
use super::page::BLCKSZ;
use crate::repo::layout;
use crate::repo::Repository;

/// Problems found in the backups of `repo`. `contents` maps every object that read back whole
/// to its content length.
pub(crate) async fn check(repo: &Repository, contents: &HashMap<String, u64>) -> Vec<String> {
    let mut problems = Vec::new();
    let backups = match crate::backup::catalog::scan(repo).await {
        Ok((backups, unreadable)) => {
            problems.extend(unreadable);
            backups
        }
        Err(e) => return vec![format!("listing backups: {e}")],
    };
    for summary in backups {
        let name = &summary.name;
        match crate::backup::catalog::manifest(repo, name).await {
            Ok(manifest) => problems.extend(check_manifest(&manifest, contents)),
            Err(e) => {
                problems.push(format!("backup {name}: {e}"));
                continue;
            }
        }
        if let Err(e) = crate::backup::catalog::chain(repo, name).await {
            problems.push(format!("backup {name}: cannot be restored: {e}"));
        }
    }
    problems
}

fn check_manifest(manifest: &Manifest, contents: &HashMap<String, u64>) -> Vec<String> {
    let s = &manifest.summary;
    let mut problems = Vec::new();
    let mut reported = HashSet::new();
    for file in &manifest.files {
        let mut covered = 0u64;
        for piece in &file.pieces {
            let key = s.name.pack_key(piece.pack);
            match contents.get(&key) {
                None => {
                    problems.push(format!(
                        "backup {}: {} is in {key}, which is missing or damaged",
                        s.name, file.path
                    ));
                    break;
                }
                Some(len) if piece.at.saturating_add(piece.len) > *len => {
                    problems.push(format!(
                        "backup {}: {} lies past the end of {key}",
                        s.name, file.path
                    ));
                    break;
                }
                Some(_) => covered += piece.len,
            }
        }
        for piece in file
            .pieces
            .iter()
            .filter(|p| s.page_sums && p.len > BLCKSZ as u64)
        {
            let key = s.name.page_sums_key(piece.pack);
            if !contents.contains_key(&key) && reported.insert(key.clone()) {
                problems.push(format!(
                    "backup {}: {key} is missing or damaged (a --delta restore compares the pieces \
                     of that pack whole)",
                    s.name
                ));
            }
        }
        if file.storage == Storage::Whole && covered != file.size {
            problems.push(format!(
                "backup {}: {} has {} bytes but its pieces hold {covered}",
                s.name, file.path, file.size
            ));
        }
    }
    let Ok(seg_size) = WalSegmentSize::new(u64::from(s.wal_segment_size)) else {
        problems.push(format!(
            "backup {}: bad WAL segment size {}",
            s.name, s.wal_segment_size
        ));
        return problems;
    };
    let first = s.start_lsn.segment_number(seg_size).0;
    let last = s.stop_lsn.end_segment_number(seg_size).0;
    for segno in first..=last.max(first) {
        let Ok(segment) = SegmentName::new(
            TimelineId(s.timeline),
            walvault_wal::SegmentNo(segno),
            seg_size,
        ) else {
            continue;
        };
        if !contents.contains_key(&layout::segment(&segment)) {
            problems.push(format!(
                "backup {}: WAL segment {segment}, needed to make it consistent, is not in the archive",
                s.name
            ));
        }
    }
    problems
}
