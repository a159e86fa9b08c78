//! Named failpoints for crash tests.
//!
//! `WALVAULT_FAILPOINTS=name[=action][,...]` makes the process stop at the named point: by
//! default it announces on stderr that it reached the point and then waits forever, so a test can
//! kill it at an exact moment (for example just before an upload is committed) instead of racing
//! a timer; with `=panic` it panics there, so a test can see how a command ends on a bug. Unset, a
//! failpoint costs one environment lookup.

/// Acts on the failpoint `name` if it is enabled: blocks forever, or panics.
pub(crate) async fn pause_if_enabled(name: &str) {
    let Ok(list) = std::env::var("WALVAULT_FAILPOINTS") else {
        return;
    };
    for entry in list.split(',') {
        let (point, action) = entry.split_once('=').unwrap_or((entry, "pause"));
        if point.trim() != name {
            continue;
        }
        if action.trim() == "panic" {
            panic!("failpoint {name} reached");
        }
        eprintln!("walvault: failpoint {name} reached, pausing");
        std::future::pending::<()>().await;
    }
}
