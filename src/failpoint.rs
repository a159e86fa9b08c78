//! Named pause points for crash tests.
//!
//! `WALVAULT_FAILPOINTS=name[,name...]` makes the process announce on stderr that it reached the
//! point and then wait forever, so a test can kill it at an exact moment (for example just before
//! an upload is committed) instead of racing a timer. Unset, a failpoint costs one environment
//! lookup. Used by the store before every commit.

/// Blocks forever if the failpoint `name` is enabled.
pub(crate) async fn pause_if_enabled(name: &str) {
    let Ok(list) = std::env::var("WALVAULT_FAILPOINTS") else {
        return;
    };
    if list.split(',').any(|n| n.trim() == name) {
        eprintln!("walvault: failpoint {name} reached, pausing");
        std::future::pending::<()>().await;
    }
}
