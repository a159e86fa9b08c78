//! walvault: PostgreSQL WAL archiving and point-in-time recovery.
//!
//! The module map is in ARCHITECTURE.md.

pub mod archive;
pub mod backup;
pub mod catalog;
pub mod codec;
pub mod config;
pub mod failpoint;
pub mod identity;
pub mod pg;
pub mod receive;
pub mod recover;
pub mod replication;
pub mod repo;
pub mod restore;
pub mod spool;
pub mod store;
pub mod verify;
pub mod walsummary;
