//! The `walvault` binary: parse the command line, build the runtime, dispatch. Each command is a
//! documented function in `walvault::cmd`; exit codes follow the command contract there.

use std::process::ExitCode;

use clap::Parser;
use walvault::cli::Cli;
use walvault::cmd;

fn main() -> ExitCode {
    cmd::return_large_buffers_to_the_system();
    cmd::exit_on_panic("walvault", cmd::failure_before_parsing());
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cmd::usage_error(e),
    };
    walvault::logging::init(cli.command.name(), cli.verbose, cli.quiet);
    let failure = cmd::failure_code(&cli.command);
    cmd::exit_on_panic(cli.command.name(), failure);
    let runtime = match cmd::runtime_for(&cli.command) {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(failure);
        }
    };
    match runtime.block_on(cmd::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{}", cmd::one_line(&e));
            ExitCode::from(failure)
        }
    }
}
