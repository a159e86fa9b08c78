//! Operating walvault: `status` (what the repository holds and promises), `check` (an end-to-end
//! test of the live setup), `metrics` (the same state as Prometheus series), `drill` (a restore
//! test that measures the RTO) and `hooks` (commands run after backup-push, delete, drill and
//! check). Everything is computed from the repository itself, cheaply: no WAL object is read.

pub(crate) mod check;
pub(crate) mod drill;
pub(crate) mod hooks;
pub(crate) mod metrics;
pub(crate) mod status;
