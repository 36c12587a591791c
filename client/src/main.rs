//! `fedtune-client` binary: parse the command line, set up logging, dispatch to
//! [`fedtune_client::cli`].

use std::process::ExitCode;

use clap::Parser;
use fedtune_client::cli::{self, Cli, Command};
use fedtune_shared::telemetry::{init_tracing, LogFormat};

fn main() -> ExitCode {
    let args = Cli::parse();
    init_tracing(LogFormat::Pretty, "info");
    let mut stdout = std::io::stdout().lock();
    let result: anyhow::Result<()> = match &args.command {
        Command::Train(a) => cli::train(a, &mut stdout).map_err(Into::into),
        Command::Eval(a) => cli::eval(a, &mut stdout).map_err(Into::into),
        Command::Predict(a) => cli::predict(a, &mut stdout).map_err(Into::into),
        Command::Run(a) => fedtune_client::run_cmd::run_blocking(a).map_err(Into::into),
        Command::Keygen(a) => fedtune_client::identity::keygen(a, &mut stdout).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
