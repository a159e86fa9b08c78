//! WAL commands: what PostgreSQL's `archive_command` and `restore_command` run, and what they
//! share. `push` is wal-push and `pusher` its detached push-ahead process; `fetch` is wal-fetch
//! and `prefetch` its detached prefetcher; `summary` scans segments as they are stored (with
//! `blockrefs`, the blocks they change); `spool`
//! is the local scratch directory both sides keep outside `pg_wal`; `fragments` are the streamed
//! parts of a segment that wal-receive writes and wal-fetch assembles.

pub(crate) mod blockrefs;
pub(crate) mod fetch;
pub(crate) mod fragments;
pub(crate) mod history;
pub(crate) mod newest;
pub(crate) mod prefetch;
pub(crate) mod push;
pub(crate) mod pusher;
pub(crate) mod spool;
pub(crate) mod summary;
