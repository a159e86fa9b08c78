//! Property tests of every parser of this crate that reads bytes from outside: history and
//! `.backup` files, WAL file names, page headers (whole and streamed), and WAL records.
//!
//! Each target starts from a valid input, damages it (see [`crate::fuzzing`]) or replaces it
//! with random bytes, and asks that the parser returns (no panic, no endless loop) with output
//! bounded as each test states. `PROPTEST_CASES` raises the case count for long runs.

use proptest::prelude::*;

use crate::fuzzing::{config, damaged, damaged_text};
use crate::page::{StreamedPages, SIZE_OF_XLOG_LONG_PHD};
use crate::record::tests::{block_with_image, commit, SegWriter, START};
use crate::record::{RM_XACT_ID, RM_XLOG_ID, XLOG_RESTORE_POINT};
use crate::{
    BackupHistory, ClusterWal, LongPageHeader, Lsn, PgMajor, RecordReader, RecordScanner,
    SegmentName, SegmentNo, TimelineHistory, TimelineId, WalFileName, WalSegmentSize,
};

const HISTORY: &str = "1\t0/3000158\tno recovery target specified\n\n\
                       2\t0/5000000\tbefore 2024-05-01 12:00:00+00\n";
const BACKUP: &str = "START WAL LOCATION: 1/A2000028 (file 0000000200000001000000A2)\n\
                      STOP WAL LOCATION: 1/A2000100 (file 0000000200000001000000A2)\n\
                      CHECKPOINT LOCATION: 1/A2000060\nBACKUP METHOD: streamed\n\
                      LABEL: nightly\nSTART TIMELINE: 2\n";

/// Three pages of WAL as PostgreSQL 15 lays them out: commits, a restore point, a record with
/// block references and images spanning pages.
fn segment() -> Vec<u8> {
    let none = (Vec::new(), Vec::new());
    let mut w = SegWriter::new(0);
    w.record(RM_XACT_ID, 0x00, 700, &none, &commit(1_000));
    w.record(10, 0x00, 701, &block_with_image(9_000, 6_000), &[1; 300]);
    w.record(RM_XACT_ID, 0x20, 701, &none, &commit(2_000));
    let mut rp = 3_000i64.to_le_bytes().to_vec();
    rp.extend_from_slice(&[b'p'; 64]);
    w.record(RM_XLOG_ID, XLOG_RESTORE_POINT, 0, &none, &rp);
    w.record(RM_XACT_ID, 0x30 | 0x80, 702, &none, &commit(4_000));
    w.buf.truncate(3 * 8192);
    w.buf
}

proptest! {
    #![proptest_config(config(512))]

    /// Bound: the parsed history has at most one entry per line of its text.
    #[test]
    fn timeline_histories(text in prop_oneof![damaged_text(HISTORY), ".{0,200}"], tli in 0u32..8) {
        if let Ok(h) = TimelineHistory::parse(TimelineId(tli), &text) {
            prop_assert!(h.entries.len() <= text.lines().count());
            let _ = h.spans();
            let _ = h.timelines_for_segment(SegmentNo(5), WalSegmentSize::DEFAULT);
        }
    }

    /// Bound: the label is a substring of the text.
    #[test]
    fn backup_history_files(text in prop_oneof![damaged_text(BACKUP), ".{0,200}"]) {
        if let Ok(b) = BackupHistory::parse(&text) {
            prop_assert!(b.label.is_none_or(|l| l.len() <= text.len()));
        }
    }

    /// A name that parses prints as itself (so a key built from it is the one listed).
    #[test]
    fn wal_file_names(
        name in prop_oneof![
            damaged_text("0000000200000001000000A2.00000028.backup"),
            damaged_text("0000000200000001000000A2.partial"),
            damaged_text("00000003.history"),
            "[0-9A-Fa-f./a-z]{0,48}",
        ]
    ) {
        if let Ok(parsed) = name.parse::<WalFileName>() {
            prop_assert_eq!(parsed.to_string().parse::<WalFileName>().ok(), Some(parsed));
        }
        let _ = name.parse::<SegmentName>();
        let _ = name.parse::<Lsn>();
    }

    /// Fixed-size headers: nothing is allocated.
    #[test]
    fn page_headers(bytes in damaged(segment()[..SIZE_OF_XLOG_LONG_PHD].to_vec()), len in any::<u64>()) {
        let _ = LongPageHeader::parse(&bytes);
        let _ = crate::short_page_header(&bytes);
        let name: SegmentName = "000000010000000000000003".parse().unwrap();
        let _ = crate::validate_segment(&name, &bytes, len);
        let _ = crate::validate_partial(&name, &bytes, len);
    }

    /// Streamed pages keep at most one partial page header (24 bytes) between calls; a range
    /// that is accepted moves the position by exactly its length.
    #[test]
    fn streamed_pages(bytes in damaged(segment()), cuts in proptest::collection::vec(1usize..9000, 1..8)) {
        let cluster = ClusterWal {
            major: PgMajor::V15,
            system_identifier: 0,
            seg_size: WalSegmentSize::new(1024 * 1024).unwrap(),
            block_size: 8192,
        };
        let mut pages = StreamedPages::new(cluster, TimelineId(1), Lsn(START)).unwrap();
        let mut rest = &bytes[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at((*cut).min(rest.len()));
            let at = pages.next();
            match pages.feed(at, piece) {
                Ok(end) => prop_assert_eq!(end.0, at.0 + piece.len() as u64),
                Err(_) => break,
            }
            rest = tail;
        }
    }

    /// Bounds: at most one record per 24 bytes of input (a record is at least its fixed header),
    /// and no record's kept main data is longer than the input.
    #[test]
    fn wal_records(bytes in damaged(segment()), piece in 1usize..10_000) {
        if let Ok(reader) = RecordReader::new(&bytes, Lsn(START)) {
            let mut n = 0;
            for record in reader {
                n += 1;
                prop_assert!(n <= bytes.len() / 24 + 1, "more records than the input can hold");
                if let Ok(r) = record {
                    prop_assert!(r.main_data.len() <= bytes.len());
                    let _ = r.target_event();
                }
            }
        }
        // The same bytes fed in pieces of any size.
        if let Ok(header) = LongPageHeader::parse(&bytes) {
            let mut scanner = RecordScanner::new(&header, Lsn(START));
            let mut n = 0usize;
            for chunk in bytes.chunks(piece) {
                scanner.feed(chunk, &mut |_| n += 1);
            }
            prop_assert!(n <= bytes.len() / 24 + 1);
        }
    }
}
