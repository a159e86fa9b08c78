//! `walvault metrics`: the repository's state as Prometheus series, computed from a
//! [`Status`]. The series names are part of the command contract (DESIGN.md, the operations
//! issue); a series without a value (no backup of a type yet, no drill) is left out rather than
//! given a made-up one, so alert rules use `absent()` for "never".

use crate::prometheus::{Kind, Page};

use super::status::Status;

/// The page for `status`.
pub(crate) fn render(status: &Status) -> String {
    let mut page = Page::default();
    let b = &status.backups;
    let newest_of_type: Vec<(&str, f64)> = [("full", &b.newest_full), ("delta", &b.newest_delta)]
        .into_iter()
        .filter_map(|(t, x)| Some((t, x.as_ref()?.stop?.seconds())))
        .collect();
    page.family(
        "walvault_backup_last_timestamp_seconds",
        Kind::Gauge,
        "End time of the newest complete backup of each type.",
        newest_of_type.iter().map(|(t, v)| ([("type", *t)], *v)),
    );
    if let Some(newest) = &b.newest {
        if let Some(d) = newest.duration_seconds {
            page.one(
                "walvault_backup_last_duration_seconds",
                Kind::Gauge,
                "Duration of the newest backup (start to stop).",
                d,
            );
        }
        page.family(
            "walvault_backup_last_size_bytes",
            Kind::Gauge,
            "Size of the newest backup: its files (original) and what it stored.",
            [
                ([("kind", "original")], newest.original_size),
                ([("kind", "stored")], newest.stored_size),
            ],
        );
    }
    page.family(
        "walvault_backups",
        Kind::Gauge,
        "Complete backups in the repository, by type.",
        [([("type", "full")], b.full), ([("type", "delta")], b.delta)],
    );
    if let Some(t) = status.wal.last_archived {
        page.one(
            "walvault_wal_last_archived_timestamp_seconds",
            Kind::Gauge,
            "When the newest archived WAL segment was stored.",
            t.seconds(),
        );
    }
    if let Some(w) = &status.window {
        if let Some(start) = w.start {
            page.one(
                "walvault_recovery_window_start_timestamp_seconds",
                Kind::Gauge,
                "Earliest time recoverable: the end of the oldest usable backup.",
                start.seconds(),
            );
        }
        if let Some(end) = w.end {
            page.one(
                "walvault_recovery_window_end_timestamp_seconds",
                Kind::Gauge,
                "Latest time recoverable: the last archived transaction end (time() minus this \
                 is the RPO now).",
                end.seconds(),
            );
        }
    }
    if let Some(d) = &status.last_drill {
        if let Some(t) = crate::time::UnixMicros::parse_rfc3339(&d.started_at) {
            page.one(
                "walvault_drill_last_timestamp_seconds",
                Kind::Gauge,
                "Start time of the last restore drill.",
                t.seconds(),
            );
        }
        page.one(
            "walvault_drill_last_success",
            Kind::Gauge,
            "Whether the last restore drill passed every check (1) or not (0).",
            u8::from(d.success),
        );
        page.one(
            "walvault_drill_last_rto_seconds",
            Kind::Gauge,
            "Restore plus replay time of the last drill.",
            d.rto_seconds,
        );
    }
    page.one(
        "walvault_repository_size_bytes",
        Kind::Gauge,
        "Bytes stored in the repository.",
        status.objects.total_bytes,
    );
    page.family(
        "walvault_repository_objects",
        Kind::Gauge,
        "Objects in the repository, by kind.",
        status
            .objects
            .by_kind
            .iter()
            .map(|(kind, c)| ([("kind", *kind)], c.count)),
    );
    page.finish()
}
