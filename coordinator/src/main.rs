//! `fedtune-coordinator` binary: parse, load settings, init tracing, bind, `run`.
//! Invalid configuration exits with status 64 (EX_USAGE) before any port is bound.

use std::process::ExitCode;

use clap::Parser;
use fedtune_coordinator::cli::{self, Cli, Command};
use fedtune_shared::telemetry::init_tracing;

/// Not glibc's malloc: after a large block is freed it raises its mmap threshold, so the
/// model-sized buffers of every round (upload chunks, the fixed-point sum, the next model, its
/// digests and checkpoint) then come from heap arenas it does not give back. With it a
/// coordinator of a 20 MiB model held 353–440 MiB after five rounds, where the same run with
/// the threshold pinned (`MALLOC_MMAP_THRESHOLD_=131072`) peaked at 125 MiB;
/// `tests/tests/soak.rs` bounds the peak by model size × 3 + 200 MB. Setting the threshold with
/// `mallopt` would need `unsafe` (forbidden in this workspace). The price, measured with
/// `--bench coordinator_rss` (22.7M parameters, one round, 2 clients): peak 483 MB against
/// 451 MB with glibc in the same session.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EX_USAGE from sysexits.h: the command was used incorrectly (bad configuration).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, "info");
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Status(args) => match cli::fetch_status(&args).await {
                Ok(s) if args.json => {
                    println!("{}", serde_json::to_string_pretty(&cli::status_json(&s)).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(s) => {
                    print!("{}", cli::render_status(&s));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Simulate(args) => {
                match fedtune_coordinator::simulate::run(&args, fedtune_shared::shutdown::shutdown_token())
                    .await
                {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Privacy(args) => print_or_fail(fedtune_coordinator::privacy::cli::privacy(&args)),
            Command::Calibrate(args) => print_or_fail(fedtune_coordinator::privacy::cli::calibrate(&args)),
            Command::Clients(args) => {
                let mut out = Vec::new();
                let done = fedtune_coordinator::cli_clients::clients(&args, &mut out);
                print_or_fail(done.map(|()| String::from_utf8_lossy(&out).into_owned()))
            }
            Command::Certs(args) => {
                let mut out = Vec::new();
                let done = fedtune_coordinator::cli_clients::certs(&args, &mut out);
                print_or_fail(done.map(|()| String::from_utf8_lossy(&out).into_owned()))
            }
            Command::Export(args) => match cli::export(&args) {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

/// Prints a command's output, or its error with status 1.
fn print_or_fail(out: Result<String, impl std::fmt::Display>) -> ExitCode {
    match out {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: cli::ServeArgs) -> ExitCode {
    let settings = match args.settings(std::env::vars()) {
        // Plaintext needs an explicit opt-in; say so before any port is bound.
        Ok(s) => match s.security.require_transport() {
            Ok(()) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EX_USAGE);
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let listener = match tokio::net::TcpListener::bind(settings.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", settings.server.listen);
            return ExitCode::FAILURE;
        }
    };
    let shutdown = fedtune_shared::shutdown::shutdown_token();
    match fedtune_coordinator::run(settings, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(fedtune_coordinator::RunError::Settings(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(EX_USAGE)
        }
        // A configuration this host cannot carry: fixed by a setting (or the host's limit).
        Err(e @ fedtune_coordinator::RunError::FileDescriptors(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(EX_USAGE)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
