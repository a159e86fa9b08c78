//! Property tests of every parser of this crate that reads bytes it did not write (the object
//! codec's are in `repo/codec_fuzz.rs`, beside the private codec): manifests, segment summaries, replication messages, object keys, fragment and spool
//! names, and the config file.
//!
//! Each target damages a valid input (walvault-wal's `fuzzing` mutations) or takes random bytes,
//! and asks that the parser returns without a panic and within the allocation bound its test
//! states, measured by a counting allocator on the test's own thread. `PROPTEST_CASES` raises
//! the case count (`bench/fuzz.sh`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use walvault_wal::fuzzing::{config, damaged, damaged_text};

use crate::backup::manifest::tests::{sample, with_two_pieces};
use crate::backup::manifest::{Manifest, Summary};
use crate::repo::layout::{BackupName, ObjectKey};
use crate::wal::fragments::{chain, Fragment};
use crate::wal::prefetch::SpoolEntry;

/// Counts the bytes this thread holds and the peak since [`peak_during`] started.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed to the system allocator unchanged; the counters only observe it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f` and returns what it returned and the most bytes it held at once on this thread.
pub(crate) fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let value = f();
    let peak = PEAK.with(Cell::get) - start;
    (value, peak.max(0) as usize)
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(config(256))]

    /// Manifests: parsing and validation refuse or accept, holding at most 64 times the input
    /// plus 64 KiB (serde's tree of a JSON document).
    #[test]
    fn manifests(bytes in prop_oneof![
        damaged(with_two_pieces().to_json().unwrap()),
        damaged(sample("base_x", "2026-01-01T00:00:00Z").to_json().unwrap()),
    ]) {
        let (_, peak) = peak_during(|| {
            if let Ok(m) = Manifest::from_json("fuzz", &bytes) {
                let _ = m.validate();
            }
            let _ = Summary::from_json("fuzz", &bytes);
        });
        prop_assert!(peak <= 64 * bytes.len() + 64 * 1024, "{peak} bytes for {}", bytes.len());
    }

    /// Segment summaries as stored (JSON) and as computed from a damaged segment's bytes: the
    /// summariser keeps at most one record's head (1 KiB) plus main data no longer than its input.
    #[test]
    fn segment_summaries(
        json in damaged(br#"{"first_xact_end":{"lsn":"0/3000028","time_us":1},"last_xact_end":{"lsn":"0/3000100","time_us":2},"restore_points":[{"name":"x","lsn":"0/3000200","time_us":3}]}"#.to_vec()),
        seg in damaged(crate::wal::push::tests::segment("000000010000000000000003")[..32 * 1024].to_vec()),
        piece in 1usize..20_000,
    ) {
        let _ = serde_json::from_slice::<crate::wal::summary::SegmentSummary>(&json);
        let name = "000000010000000000000003".parse().unwrap();
        let (_, peak) = peak_during(|| {
            let mut s = crate::wal::summary::Summariser::new(name);
            for chunk in seg.chunks(piece) {
                s.feed(chunk);
            }
            s.finish()
        });
        prop_assert!(peak <= 2 * seg.len() + 64 * 1024, "{peak} bytes for {}", seg.len());
    }

    /// Object keys: one that parses prints as itself; backup names never leave their directory.
    #[test]
    fn object_keys(key in prop_oneof![
        damaged_text("wal/000000010000000000000003"),
        damaged_text("walsummary/000000010000000000000003"),
        damaged_text("stream/000000010000000000000004/00002000-00003F10"),
        damaged_text("backups/base_20261121T113128Z_00000001_0000000006000028/packs/000000"),
        damaged_text("backups/base_20261121T113128Z_00000001_0000000006000028/manifest"),
        ".{0,80}",
    ]) {
        if let Some(parsed) = ObjectKey::parse(&key) {
            prop_assert_eq!(ObjectKey::parse(&parsed.key()), Some(parsed));
        }
        let name = key.rsplit('/').nth(1).unwrap_or(&key);
        if let Ok(b) = BackupName::parse(name) {
            prop_assert!(!b.as_str().contains('/') && b.as_str() != ".." && b.as_str() != ".");
        }
    }

    /// Fragment chains from forged ranges: at most one link per fragment, each reaching further.
    #[test]
    fn fragment_chains(ranges in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..24)) {
        let fragments: Vec<Fragment> = ranges
            .iter()
            .map(|&(start, end)| Fragment { key: String::new(), start, end })
            .collect();
        let links = chain(&fragments);
        prop_assert!(links.len() <= fragments.len());
        prop_assert!(links.windows(2).all(|w| w[0].end < w[1].end));
    }

    /// Prefetch spool names: a ready entry names a segment that prints as it was written.
    #[test]
    fn spool_names(name in prop_oneof![
        damaged_text("000000010000000000000003.0badc0de.2f6f0f4e-boot"),
        damaged_text(".000000010000000000000003.tmp.17"),
        ".{0,64}",
    ]) {
        if let Some(SpoolEntry::Ready { seg, .. }) = SpoolEntry::parse(&name) {
            prop_assert!(name.starts_with(&seg.to_string()));
        }
    }

    /// The config file: any text is read or refused with an error naming the file.
    #[test]
    fn config_files(text in prop_oneof![
        damaged_text("repo = \"s3://bucket/prefix\"\nprefetch = 3\npush_concurrency = 2\n\
                      [s3]\ntimeout = \"7s\"\nendpoint = \"http://127.0.0.1:9000\"\n\
                      force_path_style = true\n[encryption]\nrecipients = [\"age1x\"]\n"),
        ".{0,120}",
    ]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walvault.toml");
        std::fs::write(&path, &text).unwrap();
        let flags = crate::config::FlagValues { config: Some(path), ..Default::default() };
        let _ = crate::config::Settings::load(&flags);
        let _ = crate::config::Settings::carried(&flags);
    }

    /// Replication messages, as answers to each command and while streaming: refused or parsed,
    /// holding at most one message (the wire's 1 MiB + 1 KiB bound) twice over plus 64 KiB.
    #[test]
    fn replication_messages(
        answer in damaged(crate::replication::fake::one_row(&[
            Some(b"7301234567890123456"), Some(b"1"), Some(b"0/3000148"), None,
        ])),
        history in damaged(crate::replication::fake::one_row(&[
            Some(b"00000003.history"), Some(b"1\t0/3000158\tno target\n2\t0/5000000\tx\n"),
        ])),
        stream in damaged([
            crate::replication::fake::copy_both(),
            crate::replication::fake::xlog_data(0x300_0000, &[7; 64]),
            crate::replication::fake::message(b'd', &[b'k', 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            crate::replication::fake::message(b'c', &[]),
        ].concat()),
    ) {
        use crate::replication::ReplicationConnection;
        let rt = runtime();
        let conn = |bytes: &[u8]| {
            let socket = tokio::io::join(std::io::Cursor::new(bytes.to_vec()), tokio::io::sink());
            ReplicationConnection::over(socket, 15)
        };
        let slot: crate::replication::SlotName = "walvault".parse().unwrap();
        let bound = 2 * ((1 << 20) + 1024) + 64 * 1024;
        let (_, peak) = peak_during(|| rt.block_on(async {
            let _ = conn(&answer).identify_system().await;
            let _ = conn(&answer).read_slot(&slot).await;
            let _ = conn(&answer).create_physical_slot(&slot).await;
            let _ = conn(&answer).wal_segment_size().await;
            let _ = conn(&history).timeline_history(walvault_wal::TimelineId(3)).await;
        }));
        prop_assert!(peak <= bound, "{peak} bytes");
        let (_, peak) = peak_during(|| rt.block_on(async {
            let start = walvault_wal::Lsn(0x300_0000);
            let Ok(mut stream) = conn(&stream).start_replication(&slot, start, walvault_wal::TimelineId(1)).await else {
                return;
            };
            // Each event consumes at least one message header, so this ends with the input.
            while let Ok(event) = stream.recv().await {
                if let crate::replication::StreamEvent::End = event {
                    let _ = stream.finish().await;
                    break;
                }
            }
        }));
        prop_assert!(peak <= bound, "{peak} bytes");
    }
}

/// The counter sees what a test allocates, so the bounds above can fail.
#[test]
fn the_counter_sees_allocations() {
    let (v, peak) = peak_during(|| vec![1u8; 3 << 20]);
    assert!(peak >= 3 << 20, "{peak}");
    drop(v);
    let ((), peak) = peak_during(|| ());
    assert_eq!(peak, 0);
}
