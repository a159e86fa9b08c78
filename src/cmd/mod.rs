//! The CLI edge: one function per command (grouped by family in the files beside this one), the
//! settings each command's flags override, and the exit codes callers rely on: 0 success, 1 for
//! `wal-fetch` only when the file is definitely not in the archive, 2 for usage errors, and for
//! `wal-fetch` every other failure (usage errors included) exits 128, so that PostgreSQL stops
//! recovery instead of taking the failure for the end of the archive. A panic exits with the
//! command's failure code too ([`exit_on_panic`]); what the kernel ends (a signal, or the abort
//! after an allocation failure or a stack overflow) reaches PostgreSQL as 128 + the signal number,
//! also above 125.

mod backup;
mod ops;
mod receive;
mod recover;
mod reencrypt;
mod retention;
mod verify;
mod wal;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::cli::{Cli, Command, DrillArgs, RecoverArgs};
use crate::config::{FlagValues, Settings};
use crate::repo::Repository;

/// Exit code for a `wal-fetch` failure that is not "not found": above 125, so PostgreSQL aborts
/// recovery rather than ending it early.
const EXIT_FETCH_FAILED: u8 = 128;

/// The exit code of a command that fails.
pub fn failure_code(command: &Command) -> u8 {
    match command {
        Command::WalFetch { .. } => EXIT_FETCH_FAILED,
        _ => 1,
    }
}

/// Makes a panic end the process at once with `failure` after one log line naming the command,
/// the place and the message. Rust's default would exit 101 (which PostgreSQL takes for "not in
/// the archive" from wal-fetch) after a backtrace hint in PostgreSQL's log. Exiting here rather
/// than building with `panic = "abort"` (SIGABRT, 134: above 125 as well) keeps the documented
/// exit code and leaves no core file; the panic is a bug either way, so nothing is unwound.
pub fn exit_on_panic(command: &'static str, failure: u8) {
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let place = info.location().map_or_else(
            || "unknown place".to_owned(),
            |l| format!("{}:{}", l.file(), l.line()),
        );
        let line = format!(
            "walvault {command} ERROR: internal error (panic) at {place}: {}; exiting with {failure}\n",
            message.replace(['\n', '\r'], " ")
        );
        // One write, not through the log subscriber: the panic may have happened inside it.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        std::process::exit(i32::from(failure));
    }));
}

/// The exit code of a failure before the command line is parsed (a usage error, or a panic while
/// parsing): `wal-fetch`'s when its name is among the arguments.
pub fn failure_before_parsing() -> u8 {
    if std::env::args().any(|a| a == "wal-fetch") {
        EXIT_FETCH_FAILED
    } else {
        2
    }
}

/// Prints a clap error (or the help it carries) and returns the exit code for it. Typo
/// suggestions never name the internal helper commands.
pub fn usage_error(e: clap::Error) -> ExitCode {
    let e = without_hidden_suggestions(e);
    let _ = e.print();
    match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            ExitCode::SUCCESS
        }
        _ => ExitCode::from(failure_before_parsing()),
    }
}

/// `e` without the hidden subcommands (the detached helpers) among its suggestions.
fn without_hidden_suggestions(mut e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    use clap::CommandFactory;
    let Some(ContextValue::Strings(suggested)) = e.get(ContextKind::SuggestedSubcommand) else {
        return e;
    };
    let cli = Cli::command();
    let hidden = |name: &String| {
        cli.get_subcommands()
            .any(|c| c.is_hide_set() && c.get_name() == name.as_str())
    };
    let shown: Vec<String> = suggested.iter().filter(|s| !hidden(s)).cloned().collect();
    if shown.is_empty() {
        e.remove(ContextKind::SuggestedSubcommand);
    } else {
        e.insert(
            ContextKind::SuggestedSubcommand,
            ContextValue::Strings(shown),
        );
    }
    e
}

/// The runtime a command runs on. PostgreSQL waits on every wal-push and wal-fetch, which each
/// handle one file, one step after the other: a runtime on this thread with one thread for file
/// operations saves them starting threads they would not use. The rest work on many objects at
/// once.
pub fn runtime_for(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match command {
        Command::WalPush { .. } | Command::WalFetch { .. } => {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.max_blocking_threads(1);
            builder
        }
        _ => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            builder
        }
    };
    builder.enable_all().build()
}

/// Runs one command: settings from its flags, the environment and the config file, then the
/// repository, then the command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let flags = flag_values(&cli);
    let settings = Settings::load(&flags)?;
    let repo = Arc::new(
        Repository::open(&settings)
            .await
            .with_context(|| format!("opening repository {}", settings.repo))?,
    );
    let quiet = cli.quiet;
    match cli.command {
        Command::WalPush { path, .. } => wal::push(&settings, &flags, repo, &path).await,
        Command::WalPushAhead { spool, wal_dir, .. } => {
            wal::push_ahead(&settings, repo, &spool, &wal_dir).await
        }
        Command::WalFetch { name, dest, .. } => {
            wal::fetch(&settings, &flags, repo, &name, &dest).await
        }
        Command::WalPrefetch { spool, segments } => wal::prefetch(repo, &spool, &segments).await,
        Command::WalReceive(args) => receive::receive(&settings, repo, args).await,
        Command::BackupPush(args) => backup::push(&settings, quiet, repo, args).await,
        Command::BackupFetch {
            name,
            dir,
            tablespaces,
            dry_run,
            config_dir,
            delta,
            ..
        } => {
            let fetch = backup::FetchArgs {
                name: &name,
                dir: &dir,
                tablespaces: &tablespaces,
                dry_run,
                config_dir,
                delta,
            };
            backup::fetch(&settings, quiet, repo, fetch).await
        }
        Command::BackupList { json } => backup::list(&settings, &repo, json).await,
        Command::Recover(args) => recover::recover(&settings, &flags, quiet, repo, args).await,
        Command::Verify { concurrency } => verify::verify(repo, concurrency).await,
        Command::Delete(args) => retention::delete(&settings, quiet, repo, args).await,
        Command::BackupMark { name, keep, .. } => retention::mark(&repo, &name, keep).await,
        Command::Status { json } => ops::status(&settings, &repo, json).await,
        Command::Check(args) => ops::check(&settings, repo, args).await,
        Command::Metrics { listen } => ops::metrics(repo, listen).await,
        Command::Drill(args) => ops::drill(&settings, &flags, quiet, repo, args).await,
        Command::Reencrypt {
            concurrency,
            dry_run,
        } => reencrypt::reencrypt(repo, concurrency, dry_run).await,
    }
}

/// The settings this command's flags override.
fn flag_values(cli: &Cli) -> FlagValues {
    let mut flags = FlagValues {
        config: cli.config.clone(),
        repo: cli.repo.clone(),
        ..Default::default()
    };
    match &cli.command {
        Command::WalPush { concurrency, .. } | Command::WalPushAhead { concurrency, .. } => {
            flags.push_concurrency = concurrency.clone()
        }
        Command::WalFetch { prefetch, .. } => flags.prefetch = prefetch.clone(),
        Command::BackupPush(args) => {
            flags.backup_concurrency = args.concurrency.clone();
            flags.delta_max_steps = args.delta_max_steps.clone();
        }
        Command::Delete(args) => {
            flags.retention = [
                args.retain_full.clone(),
                args.retain_window.clone(),
                args.keep_daily.clone(),
                args.keep_weekly.clone(),
                args.keep_monthly.clone(),
                args.keep_yearly.clone(),
            ]
        }
        Command::BackupFetch { concurrency, .. }
        | Command::Recover(RecoverArgs { concurrency, .. })
        | Command::Drill(DrillArgs { concurrency, .. }) => {
            flags.backup_concurrency = concurrency.clone()
        }
        _ => {}
    }
    flags
}

/// The error and its causes on one line. Library errors already quote their cause in their own
/// message, so a cause is appended only when the text so far does not contain it.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// Makes every allocation of a MiB or more a mapping of its own, unmapped when freed. glibc
/// otherwise raises that threshold as large buffers are freed and then serves them from its
/// per-thread heaps, which keep what they once held: the backup pipeline's packs and compressed
/// copies (of varying sizes, on whichever blocking thread compressed them) would then keep
/// backup-push's memory above what it uses (bench/ measures it).
pub fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const THRESHOLD: libc::c_int = 1 << 20;
        // SAFETY: mallopt only sets an allocator parameter; it is called before any thread
        // exists, and a failure (return value 0) leaves glibc's default behaviour in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        }
    }
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
