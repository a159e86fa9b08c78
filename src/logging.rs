//! Log lines: one line per event on stderr, `walvault <command>[ LEVEL]: message`, easy to grep in
//! PostgreSQL's log where archive_command and restore_command output ends up. No timestamps:
//! PostgreSQL's log prefix and journald add their own.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

struct Line {
    command: &'static str,
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "walvault {}", self.command)?;
        match *event.metadata().level() {
            Level::ERROR => write!(writer, " ERROR")?,
            Level::WARN => write!(writer, " WARNING")?,
            Level::DEBUG | Level::TRACE => write!(writer, " DEBUG")?,
            Level::INFO => {}
        }
        write!(writer, ": ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// `WALVAULT_LOG` (an EnvFilter directive) overrides the level that -v / -q select.
pub fn init(command: &'static str, verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("WALVAULT_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,walvault={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(Line { command })
        .finish()
        .with(filter_fn(|meta| {
            *meta.level() <= Level::INFO
                || !CREDENTIAL_TARGETS
                    .iter()
                    .any(|t| meta.target().starts_with(t))
        }))
        .init();
}

/// The AWS SDK's modules whose debug and trace events print the S3 access key id (resolved
/// identities, signing and endpoint parameters): held to info whatever `WALVAULT_LOG` asks.
const CREDENTIAL_TARGETS: &[&str] = &[
    "aws_smithy_runtime::client::orchestrator",
    "aws_sigv4",
    "aws_sdk_s3",
];
