//! Command line of `fedtune-coordinator`: `serve`, `status`, `export`, `simulate`, `privacy`,
//! `calibrate`, `clients`, `certs`.
//!
//! Only parsing lives here (the top layer: it names the modules its subcommands run); `serve`
//! hands validated settings to [`crate::run`], `status` and `export` are [`crate::operator`]'s.
//! Doc comments are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

use fedtune_shared::settings::SettingsError;
use fedtune_shared::telemetry::LogFormat;

pub use crate::operator::{
    export, fetch_status, render_status, status_json, CliError, ExportArgs, StatusArgs,
};
use crate::settings::CoordinatorSettings;

/// fedtune coordinator: federated fine-tuning of BERT classifiers.
#[derive(Debug, clap::Parser)]
#[command(name = "fedtune-coordinator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: text (coloured only on a terminal) or json (one object per line).
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    pub log_format: LogFormat,
}

/// Subcommands.
// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the coordinator (resumes if the state directory exists).
    Serve(ServeArgs),
    /// Ask a running coordinator for its phase, round, clients and recent metrics.
    Status(StatusArgs),
    /// Write the model after round N as a Hugging Face directory.
    Export(ExportArgs),
    /// Run a whole federation on this machine: shard a labelled CSV, start this coordinator and
    /// N `fedtune-client` processes on loopback, print a per-round table and write metrics.
    Simulate(crate::simulate::SimulateArgs),
    /// Print a federation's privacy ledger (--state-dir), or plan: ε after T rounds at sampling
    /// rate Q and noise multiplier Z.
    Privacy(crate::privacy::cli::PrivacyArgs),
    /// Print the smallest noise multiplier that keeps T rounds at sampling rate Q within ε.
    Calibrate(crate::privacy::cli::CalibrateArgs),
    /// Manage the client allowlist: add, list, revoke, enroll-token.
    Clients(crate::cli_clients::ClientsArgs),
    /// Development PKI for TLS and mutual TLS: init, issue-client.
    Certs(crate::cli_clients::CertsArgs),
}

/// `serve` options. Settings come from the file, then `FEDTUNE__SECTION__KEY` variables, then
/// these flags.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Overrides `server.listen`.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Overrides `storage.state_dir`.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Overrides `model.init_dir`.
    #[arg(long)]
    pub init_dir: Option<PathBuf>,
    /// Server certificate (PEM); overrides `security.tls_cert`.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM); overrides `security.tls_key`.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) client certificates must chain to (mutual TLS); overrides `security.client_ca`.
    #[arg(long, value_name = "PEM")]
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC (no TLS): tests and a single trusted machine only.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure: bool,
    /// Privacy budget: rounds that would exceed it are refused; overrides `privacy.target_epsilon`.
    #[arg(long, value_name = "EPSILON")]
    pub target_epsilon: Option<f64>,
    /// δ of the privacy guarantee; overrides `privacy.delta`.
    #[arg(long)]
    pub delta: Option<f64>,
}

impl ServeArgs {
    /// Layered settings for `serve`, validated.
    pub fn settings(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<CoordinatorSettings, SettingsError> {
        let mut overrides: Vec<(&str, toml::Value)> = Vec::new();
        if let Some(l) = self.listen {
            overrides.push(("server.listen", toml::Value::String(l.to_string())));
        }
        if let Some(d) = &self.state_dir {
            overrides.push(("storage.state_dir", toml::Value::String(d.display().to_string())));
        }
        if let Some(d) = &self.init_dir {
            overrides.push(("model.init_dir", toml::Value::String(d.display().to_string())));
        }
        for (key, path) in [
            ("security.tls_cert", &self.tls_cert),
            ("security.tls_key", &self.tls_key),
            ("security.client_ca", &self.client_ca),
        ] {
            if let Some(p) = path {
                overrides.push((key, toml::Value::String(p.display().to_string())));
            }
        }
        if self.insecure {
            overrides.push(("security.insecure", toml::Value::Boolean(true)));
        }
        if let Some(e) = self.target_epsilon {
            overrides.push(("privacy.target_epsilon", toml::Value::Float(e)));
        }
        if let Some(d) = self.delta {
            overrides.push(("privacy.delta", toml::Value::Float(d)));
        }
        CoordinatorSettings::load(self.config.as_deref(), env, &overrides)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_cli_parses_each_subcommand() {
        let cli = Cli::try_parse_from([
            "fedtune-coordinator",
            "serve",
            "--config",
            "c.toml",
            "--listen",
            "127.0.0.1:1",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Serve(ServeArgs { listen: Some(_), .. })));
        let cli = Cli::try_parse_from([
            "fedtune-coordinator",
            "export",
            "--state-dir",
            "s",
            "--round",
            "3",
            "--out",
            "o",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Export(ExportArgs { round: 3, .. })));
        let cli = Cli::try_parse_from(["fedtune-coordinator", "status", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Status(StatusArgs { json: true, .. })));
    }
}
