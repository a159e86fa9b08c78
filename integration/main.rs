//! End-to-end tests of the walvault binary against real PostgreSQL clusters and repositories (a
//! local directory and an S3 server). Run them with `integration/run.sh`, which first installs what
//! they need (PostgreSQL 15, moto).

mod harness;

mod backup;

mod blockmap;
mod crash;
mod debian;
mod encryption;
mod faults;
mod matrix;
mod ops;

mod pg_conn;

mod recover;

mod retention;
mod standby;

mod store;

mod stream;

mod wal_archive;
