//! PostgreSQL WAL knowledge for walvault, free of I/O and of any runtime.
//!
//! Understands LSNs, timeline IDs, WAL file names, XLOG page headers and
//! timeline/backup history files as PostgreSQL 13 to 18 write them, and
//! enough of WAL records to find commit times, restore points and the blocks
//! records change. The
//! walvault binary uses it to decide what an archived file is, whether its
//! contents match its name, and which timeline owns which part of the WAL.
//! Modelled on Neon's `postgres_ffi`, but without bindgen: every layout is
//! written out by hand from `xlog_internal.h` and checked by tests.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod blockref;
pub mod error;
#[cfg(test)]
mod fuzz;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod history;
pub mod lsn;
pub mod name;
pub mod page;
pub mod record;
pub mod timeline;

pub use blockref::{RelChange, RelFileLocator, SplitRecord};
pub use error::WalError;
pub use history::{BackupHistory, HistoryEntry, TimelineHistory, TimelineSpan};
pub use lsn::Lsn;
pub use name::{SegmentName, SegmentNo, WalFileName, WalSegmentSize};
pub use page::{
    short_page_header, validate_partial, validate_segment, ClusterWal, LongPageHeader, PgMajor,
    ShortPageHeader, StreamedPages,
};
pub use record::{
    Continuation, Pending, PgTimestamp, RecordReader, RecordScanner, TargetEvent, WalRecord,
    XactEnd,
};
pub use timeline::TimelineId;
