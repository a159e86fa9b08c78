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
pub mod logging;
pub(crate) mod pg;
pub(crate) mod receive;
pub(crate) mod recover;
pub(crate) mod replication;
pub(crate) mod repo;
pub(crate) mod time;
pub(crate) mod verify;
pub(crate) mod wal;
