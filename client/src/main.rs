//! `fedtune-client` binary: parse the command line, set up logging, dispatch to
//! [`fedtune_client::cli`] (and, for `run`, load the layered settings first).
//! Bad usage or configuration exits with status 64 (EX_USAGE) before any work starts.

use std::process::ExitCode;

use clap::Parser;
use fedtune_client::cli::{self, Cli, CliError, Command};
use fedtune_client::run_cmd::RunError;
use fedtune_shared::settings::SettingsError;
use fedtune_shared::telemetry::init_tracing;

/// EX_USAGE from sysexits.h: the command was used incorrectly (bad flag or configuration).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args = match Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // `--help` and `--version` are "errors" too, printed to stdout with status 0.
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EX_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    init_tracing(args.log_format, "info");
    let mut stdout = std::io::stdout().lock();
    let result: anyhow::Result<()> = match &args.command {
        Command::Train(a) => cli::train(a, &mut stdout).map_err(Into::into),
        Command::Eval(a) => cli::eval(a, &mut stdout).map_err(Into::into),
        Command::Predict(a) => cli::predict(a, &mut stdout).map_err(Into::into),
        Command::Run(a) => run(a, &mut stdout),
        Command::Keygen(a) => fedtune_client::identity::keygen(a, &mut stdout).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if is_usage(&e) {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(args: &cli::RunArgs, stdout: &mut impl std::io::Write) -> anyhow::Result<()> {
    let settings = args.settings(std::env::vars())?;
    if args.print_config {
        write!(stdout, "{}", toml::to_string(&settings)?)?;
        return Ok(());
    }
    fedtune_client::run_cmd::run_blocking(&settings, args.enroll_token.clone())?;
    Ok(())
}

/// Whether `e` is the user's to fix in the command line or configuration (status 64).
fn is_usage(e: &anyhow::Error) -> bool {
    e.downcast_ref::<SettingsError>().is_some()
        || matches!(e.downcast_ref::<RunError>(), Some(RunError::Usage(_)))
        || matches!(e.downcast_ref::<CliError>(), Some(CliError::Usage(_)))
}
