//! walvault: PostgreSQL WAL archiving and point-in-time recovery.
//!
//! The module map is in ARCHITECTURE.md.

pub mod backup;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod failpoint;
pub mod logging;
pub mod pg;
pub mod receive;
pub mod recover;
pub mod replication;
pub mod repo;
pub mod verify;
pub mod wal;
