//! Progress bars for long backup and restore runs: bytes done, rate and ETA on a terminal,
//! nothing at all under cron or PostgreSQL (stderr not a terminal) or with `--quiet`.
//! Used by push, fetch and retention.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `total` bytes, drawn only when `wanted` and stderr is a terminal.
pub(crate) fn bytes_bar(total: u64, wanted: bool, prefix: &str) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix.to_owned());
    bar
}

/// A bar over `total` objects, drawn only when `wanted` and stderr is a terminal.
pub(crate) fn count_bar(total: u64, wanted: bool, prefix: &str) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} objects {per_sec} ETA {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix.to_owned());
    bar
}

/// A spinner with a message for a wait of unknown length, drawn only when `wanted` and stderr
/// is a terminal.
pub(crate) fn spinner(wanted: bool, message: String) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
