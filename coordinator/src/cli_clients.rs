//! `fedtune-coordinator clients …` (the allowlist and enrollment tokens) and
//! `fedtune-coordinator certs …` (a development PKI for TLS and mutual TLS).
//!
//! `clients` commands open the state directory's database directly, so they work whether or not
//! the coordinator is running; a running coordinator sees the change on the next call (a
//! revoked client's next call, including an upload in flight, is refused). Each command
//! writes its result to a writer (stdout in the binary, a buffer in tests).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use fedtune_shared::crypto::PublicKey;
use fedtune_shared::ids::ClientId;
use fedtune_shared::settings::parse_duration;

use crate::auth::{Allowlist, AllowlistError};
use crate::certs::{init_dev_pki, issue_client_cert, CertError};

/// `clients` options.
#[derive(Debug, clap::Args)]
pub struct ClientsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ClientsCommand,
}

/// The state directory a `clients` command works on.
#[derive(Debug, Clone, clap::Args)]
pub struct StateDirArg {
    /// The coordinator's state directory (`storage.state_dir`).
    #[arg(long, env = "FEDTUNE__STORAGE__STATE_DIR")]
    pub state_dir: PathBuf,
}

/// `clients` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ClientsCommand {
    /// Allowlist a client name with its Ed25519 public key (as printed by `fedtune-client keygen`).
    Add {
        /// Client name ([A-Za-z0-9._-], 1-64 characters); the client runs with `--name NAME`.
        #[arg(long)]
        name: String,
        /// Public key, base64url (43 characters). One in 64 keys starts with `-`, which must not
        /// be taken for a flag.
        #[arg(long, allow_hyphen_values = true)]
        public_key: String,
        /// State directory.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// List allowlisted, revoked and pending (token issued, not yet enrolled) clients.
    List {
        /// State directory.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Revoke a client: its session and any upload in flight are refused from its next call on.
    Revoke {
        /// Client name.
        name: String,
        /// State directory.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Print a one-time enrollment token for NAME; the client runs with
    /// `--enroll-token TOKEN --key FILE` once to allowlist its key. Only the token's digest is
    /// stored.
    EnrollToken {
        /// Client name the token is for.
        #[arg(long)]
        name: String,
        /// How long the token stays valid, e.g. 24h.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// State directory.
        #[command(flatten)]
        state: StateDirArg,
    },
}

/// `certs` options.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// `certs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create a development PKI: ca.pem/ca.key, server.pem/server.key and, per --client,
    /// client-NAME.pem/.key (private keys 0600). Client certificates carry NAME as a DNS subject
    /// alternative name: under mutual TLS the coordinator lets each serve only that client.
    /// operator.pem/.key is the operator's (URI SAN urn:fedtune:operator, no DNS name): `status
    /// --tls-cert/--tls-key` with it gets the operator view; it can never join. For tests and
    /// small deployments; bring your own PKI otherwise (same naming rules).
    Init {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// DNS names or IP addresses clients reach the coordinator by (repeatable; default:
        /// localhost and 127.0.0.1).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Issue a client certificate for mutual TLS for NAME (repeatable).
        #[arg(long = "client")]
        clients: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue one more client certificate from a PKI made by `certs init`.
    IssueClient {
        /// The PKI directory (holds ca.pem and ca.key).
        #[arg(long)]
        pki: PathBuf,
        /// Client name.
        #[arg(long)]
        name: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Errors of `clients` and `certs`.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    /// The arguments are invalid.
    #[error("{0}")]
    Usage(String),
    /// The allowlist.
    #[error(transparent)]
    Allowlist(#[from] AllowlistError),
    /// The PKI.
    #[error(transparent)]
    Certs(#[from] CertError),
    /// Writing the output.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

fn name(text: &str) -> Result<ClientId, ClientsError> {
    ClientId::parse(text).map_err(|e| ClientsError::Usage(format!("client name: {e}")))
}

fn unix_ms(ms: u64) -> String {
    // Seconds precision is enough to tell entries apart; no date crate needed for an audit list.
    format!("{}", ms / 1000)
}

/// Runs a `clients` subcommand.
pub fn clients(args: &ClientsArgs, out: &mut impl Write) -> Result<(), ClientsError> {
    match &args.command {
        ClientsCommand::Add { name: n, public_key, state } => {
            let id = name(n)?;
            let key: PublicKey =
                public_key.parse().map_err(|e| ClientsError::Usage(format!("--public-key: {e}")))?;
            Allowlist::open(&state.state_dir)?.add(&id, &key)?;
            writeln!(out, "allowlisted `{id}` with key {key}")?;
        }
        ClientsCommand::List { state } => {
            let list = Allowlist::open(&state.state_dir)?;
            writeln!(
                out,
                "{:<24} {:<9} {:<10} {:<12} public key",
                "name", "status", "added via", "since (unix)"
            )?;
            for e in list.list()? {
                let (status, since) = match e.revoked_ms {
                    Some(t) => ("revoked", t),
                    None => ("allowed", e.added_ms),
                };
                writeln!(
                    out,
                    "{:<24} {:<9} {:<10} {:<12} {}",
                    e.name.as_str(),
                    status,
                    e.added_via,
                    unix_ms(since),
                    e.public_key
                )?;
            }
            for (n, expires) in list.pending_tokens()? {
                writeln!(
                    out,
                    "{:<24} {:<9} {:<10} {:<12} (token expires at unix {expires})",
                    n.as_str(),
                    "pending",
                    "-",
                    "-"
                )?;
            }
        }
        ClientsCommand::Revoke { name: n, state } => {
            let id = name(n)?;
            Allowlist::open(&state.state_dir)?.revoke(&id)?;
            writeln!(out, "revoked `{id}`")?;
        }
        ClientsCommand::EnrollToken { name: n, ttl, state } => {
            let id = name(n)?;
            if ttl.as_secs() == 0 {
                return Err(ClientsError::Usage("--ttl must be at least 1s".into()));
            }
            let token = Allowlist::open(&state.state_dir)?.issue_enrollment_token(&id, *ttl)?;
            // Printed once, alone on stdout, so scripts can capture it; it is never logged.
            writeln!(out, "{}", token.expose_secret())?;
        }
    }
    Ok(())
}

/// Runs a `certs` subcommand.
pub fn certs(args: &CertsArgs, out: &mut impl Write) -> Result<(), ClientsError> {
    match &args.command {
        CertsCommand::Init { out: dir, server_names, clients, force } => {
            let paths = init_dev_pki(dir, server_names, clients, *force)?;
            writeln!(out, "CA certificate (give to every client): {}", paths.ca_cert.display())?;
            writeln!(out, "CA key (keep private):                 {}", paths.ca_key.display())?;
            writeln!(out, "server certificate: {}", paths.server_cert.display())?;
            writeln!(out, "server key:         {}", paths.server_key.display())?;
            for c in &paths.clients {
                writeln!(out, "client `{}`: {} {}", c.name, c.cert.display(), c.key.display())?;
            }
            writeln!(
                out,
                "operator (status --tls-cert/--tls-key; never a client): {} {}",
                paths.operator.cert.display(),
                paths.operator.key.display()
            )?;
        }
        CertsCommand::IssueClient { pki, name, force } => {
            let c = issue_client_cert(pki, name, *force)?;
            writeln!(out, "client `{}`: {} {}", c.name, c.cert.display(), c.key.display())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use fedtune_shared::crypto::KeyPair;

    use super::*;
    use crate::auth::Standing;
    use crate::cli::{Cli, Command};

    fn run_clients(argv: &[&str]) -> Result<String, ClientsError> {
        let mut full = vec!["fedtune-coordinator", "clients"];
        full.extend_from_slice(argv);
        let cli = Cli::try_parse_from(full).unwrap();
        let Command::Clients(args) = cli.command else { panic!("not a clients command") };
        let mut out = Vec::new();
        clients(&args, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn clients_add_list_revoke_and_enroll_token_manage_the_allowlist() {
        let dir = tempfile::tempdir().unwrap();
        let sd = dir.path().to_str().unwrap();
        let key = KeyPair::generate_ephemeral().unwrap().public_key().to_string();
        run_clients(&["add", "--name", "site-1", "--public-key", &key, "--state-dir", sd]).unwrap();
        // base64url keys may start with `-`: still a value, not a flag.
        let dash = std::iter::repeat_with(|| KeyPair::generate_ephemeral().unwrap().public_key().to_string())
            .find(|k| k.starts_with('-'))
            .unwrap();
        run_clients(&["add", "--name", "site-3", "--public-key", &dash, "--state-dir", sd]).unwrap();
        let token =
            run_clients(&["enroll-token", "--name", "site-2", "--ttl", "1h", "--state-dir", sd]).unwrap();
        assert_eq!(token.trim().len(), 43);
        let listed = run_clients(&["list", "--state-dir", sd]).unwrap();
        assert!(listed.contains("site-1") && listed.contains(&key) && listed.contains("allowed"), "{listed}");
        assert!(listed.contains("site-2") && listed.contains("pending"), "{listed}");
        assert!(!listed.contains(token.trim()), "the token must not be listed");
        run_clients(&["revoke", "site-1", "--state-dir", sd]).unwrap();
        let listed = run_clients(&["list", "--state-dir", sd]).unwrap();
        assert!(listed.contains("revoked"), "{listed}");
        let id = ClientId::parse("site-1").unwrap();
        assert_eq!(Allowlist::open(dir.path()).unwrap().standing(&id).unwrap(), Standing::Revoked);

        let err =
            run_clients(&["add", "--name", "bad name", "--public-key", &key, "--state-dir", sd]).unwrap_err();
        assert!(err.to_string().contains("client name"), "{err}");
        let err =
            run_clients(&["add", "--name", "x", "--public-key", "nope", "--state-dir", sd]).unwrap_err();
        assert!(err.to_string().contains("--public-key"), "{err}");
    }

    #[test]
    fn certs_init_writes_a_pki_with_private_keys_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let cli = Cli::try_parse_from([
            "fedtune-coordinator",
            "certs",
            "init",
            "--out",
            pki.to_str().unwrap(),
            "--client",
            "site-1",
        ])
        .unwrap();
        let Command::Certs(args) = cli.command else { panic!("not a certs command") };
        let mut out = Vec::new();
        certs(&args, &mut out).unwrap();
        for f in ["ca.key", "server.key", "client-site-1.key"] {
            let mode = std::fs::metadata(pki.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert!(pki.join("ca.pem").is_file() && pki.join("server.pem").is_file());
        // A second init refuses to overwrite.
        assert!(matches!(certs(&args, &mut Vec::new()), Err(ClientsError::Certs(CertError::Exists { .. }))));
    }
}
