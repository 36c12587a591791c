//! `fedtune-client run`: take part in a federation until it finishes or a signal arrives.
//!
//! The client brings its data and a local copy of the base model (config, tokenizer, frozen
//! weights); the coordinator decides everything that must agree across clients: which tensors
//! train (the trainer is built to train exactly the coordinator's trainable manifest), the label
//! set, and each round's training parameters (epochs, batch size, learning rate, seed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use fedtune_shared::crypto::EnrollmentToken;
use fedtune_shared::endpoint::TlsOptions;
use fedtune_shared::ids::ClientId;
use fedtune_shared::settings::parse_duration;
use tokio_util::sync::CancellationToken;

use crate::agent::{name_seed, Agent, AgentConfig, AgentError, AgentOutcome, TrainerFactory, TrainerSpec};
use crate::backoff::BackoffPolicy;
use crate::cli::{ColumnArgs, RuntimeArgs};
use crate::data::{DataError, DataOptions, Dataset};
use crate::fake_trainer::{FakeTrainer, FakeTrainerConfig};
use crate::local_trainer::{LocalTrainer, TrainerError};
use crate::model::config::BertConfig;
use crate::trainer::{AdamWConfig, BertTrainer, TrainScope, TrainerOptions};
use crate::transport::{ConnectOptions, GrpcCoordinator};

/// Errors of `run` before or after the agent's own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The data file could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The arguments do not make sense together.
    #[error("{0}")]
    Usage(String),
    /// The agent stopped with an error.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// `fedtune-client run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Coordinator URL, e.g. https://coordinator.example:50051 (with --ca); http:// only with
    /// --insecure.
    #[arg(long, env = "FEDTUNE_COORDINATOR")]
    pub coordinator: String,
    /// Labelled data file (.csv, .tsv, .jsonl); rows of its split column's test values are held out.
    #[arg(long)]
    pub data: PathBuf,
    /// Base model folder: config.json, model.safetensors, tokenizer.json or vocab.txt (the same
    /// base model the coordinator was started from).
    #[arg(long, required_unless_present = "fake_trainer")]
    pub model: Option<PathBuf>,
    /// Name to join under ([A-Za-z0-9._-], up to 64); default: the coordinator assigns one.
    #[arg(long)]
    pub name: Option<String>,
    /// Which columns of the data file to read.
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// Longest token sequence.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Fraction of rows held out for evaluation when the data has no split column.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// Seed of the held-out split (when the data has no split column).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Fraction of each round's steps spent warming the learning rate up.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    /// Gradient L2-norm limit (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Longest single wait for work, e.g. 20s.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub poll_wait: Duration,
    /// Stop after this long without reaching the coordinator (default: retry forever).
    #[arg(long, value_parser = parse_duration)]
    pub give_up_after: Option<Duration>,
    /// Longest pause between retries while the coordinator is unreachable.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub max_backoff: Duration,
    /// Upload pacing in bytes per second (default: unpaced).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub upload_rate_limit: Option<u64>,
    /// CA certificate (PEM) to trust for an https coordinator.
    #[arg(long, visible_alias = "ca", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Connect over plaintext http:// (no TLS): tests and a single trusted machine only.
    #[arg(long)]
    pub insecure: bool,
    /// This client's Ed25519 identity key (from `fedtune-client keygen`, mode 0600). Joins are
    /// answered and updates signed with it; its public key must be allowlisted for --name (or
    /// be enrolled with --enroll-token).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// One-time enrollment token (from `fedtune-coordinator clients enroll-token`): allowlists
    /// this client's key on first join.
    #[arg(
        long,
        env = "FEDTUNE_ENROLL_TOKEN",
        hide_env_values = true,
        allow_hyphen_values = true,
        value_parser = parse_enroll_token
    )]
    pub enroll_token: Option<EnrollmentToken>,
    /// Name the coordinator's certificate must carry (default: the URL's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Device, precision, threads, progress.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Test harness: train with the deterministic fake trainer instead of BERT.
    #[arg(long, hide = true)]
    pub fake_trainer: bool,
    /// Test harness: wall time of one fake fit, in milliseconds.
    #[arg(long, hide = true, default_value_t = 0)]
    pub fake_fit_ms: u64,
}

impl RunArgs {
    fn data_options(&self) -> DataOptions {
        DataOptions {
            text_column: self.columns.text_column.clone(),
            label_column: Some(self.columns.label_column.clone()),
            split_column: self.columns.split_column.clone(),
        }
    }

    fn connect_options(&self) -> Result<ConnectOptions, RunError> {
        let mut options = ConnectOptions::new(self.coordinator.clone());
        let https = self.coordinator.starts_with("https://");
        match (https, self.tls_ca.is_some(), self.insecure) {
            (true, false, _) => {
                return Err(RunError::Usage(
                    "an https:// coordinator needs --ca FILE (the CA certificate to trust)".into(),
                ))
            }
            (true, true, true) => {
                return Err(RunError::Usage("--insecure contradicts an https:// URL with --ca".into()))
            }
            (false, _, false) => {
                return Err(RunError::Usage(format!(
                    "`{}` is not an https:// URL: plaintext needs --insecure (tests or one trusted machine \
                     only)",
                    self.coordinator
                )))
            }
            (false, _, true) => tracing::warn!(
                url = %self.coordinator,
                "connecting over PLAINTEXT (--insecure): the network can read updates and session tokens"
            ),
            (true, true, false) => {}
        }
        if let Some(ca) = self.tls_ca.as_ref().filter(|_| https) {
            let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
            let tls = TlsOptions { ca, domain: self.tls_domain.as_deref(), identity };
            options.tls = Some(
                fedtune_shared::endpoint::client_tls(&self.coordinator, &tls)
                    .map_err(|e| RunError::Usage(e.to_string()))?,
            );
        }
        Ok(options)
    }
}

/// Parses `--enroll-token` into a type whose `Debug` redacts it (so `RunArgs` can be logged).
fn parse_enroll_token(text: &str) -> Result<EnrollmentToken, String> {
    text.parse().map_err(|e: fedtune_shared::crypto::CryptoError| e.to_string())
}

fn bert_factory(args: &RunArgs, model: &Path, dataset: Dataset) -> TrainerFactory {
    let model = model.to_path_buf();
    let options = TrainerOptions {
        max_len: args.max_len,
        eval_fraction: args.eval_fraction,
        seed: args.seed,
        adamw: AdamWConfig { weight_decay: args.weight_decay, ..AdamWConfig::default() },
        warmup_ratio: args.warmup_ratio,
        max_grad_norm: args.max_grad_norm,
        device: args.runtime.device,
        precision: args.runtime.precision,
        threads: args.runtime.threads,
        progress: !args.runtime.quiet,
        ..TrainerOptions::default()
    };
    Box::new(move |spec: &TrainerSpec| {
        let config = BertConfig::from_file(&model.join("config.json"))
            .map_err(|e| TrainerError::Failed(format!("{}: {e}", model.join("config.json").display())))?;
        let options = TrainerOptions {
            scope: TrainScope::of_trainable(
                spec.trainable.tensors.iter().map(|t| t.name.as_str()),
                config.num_hidden_layers,
            ),
            labels: (!spec.labels.is_empty()).then(|| spec.labels.clone()),
            ..options
        };
        let trainer = BertTrainer::new(&model, dataset, options)?;
        let s = trainer.summary();
        tracing::info!(
            train = s.num_train,
            held_out = s.num_eval,
            device = %s.device,
            trainable = s.trainable_parameters,
            total = s.total_parameters,
            majority_baseline = s.majority_baseline_accuracy,
            "BERT trainer ready"
        );
        Ok(Box::new(trainer) as Box<dyn LocalTrainer>)
    })
}

/// Joins the federation at `args.coordinator` and works until it finishes, `shutdown` is
/// cancelled, or an unrecoverable error.
pub async fn run(args: &RunArgs, shutdown: CancellationToken) -> Result<AgentOutcome, RunError> {
    let name =
        args.name.as_deref().map(ClientId::parse).transpose().map_err(|e| RunError::Usage(e.to_string()))?;
    let dataset = Dataset::load(&args.data, &args.data_options())?;
    let (train, eval) = dataset.split_indices(args.eval_fraction, args.seed);
    tracing::info!(data = %args.data.display(), train = train.len(), held_out = eval.len(), "data loaded");
    let factory: TrainerFactory = if args.fake_trainer {
        let config = FakeTrainerConfig {
            seed: name_seed(args.name.as_deref().unwrap_or("anonymous")),
            num_train_examples: train.len() as u64,
            num_eval_examples: eval.len() as u64,
            fit_delay: Duration::from_millis(args.fake_fit_ms),
            ..FakeTrainerConfig::default()
        };
        Box::new(move |spec: &TrainerSpec| {
            Ok(Box::new(FakeTrainer::new(spec.trainable.clone(), config)) as Box<dyn LocalTrainer>)
        })
    } else {
        let model = args.model.as_deref().ok_or_else(|| RunError::Usage("--model is required".into()))?;
        bert_factory(args, model, dataset)
    };
    let key = crate::identity::load(&args.key).map_err(|e| RunError::Usage(format!("--key: {e}")))?;
    let enroll_token = args.enroll_token.clone();
    let api = GrpcCoordinator::connect_lazy(&args.connect_options()?)
        .map_err(|e| RunError::Usage(e.to_string()))?
        .with_identity(key, enroll_token);
    let config = AgentConfig {
        name,
        train_examples: train.len() as u64,
        eval_examples: eval.len() as u64,
        poll_wait: args.poll_wait,
        backoff: BackoffPolicy { max: args.max_backoff, ..BackoffPolicy::default() },
        give_up_after: args.give_up_after,
        upload_rate_limit: args.upload_rate_limit,
        ..AgentConfig::default()
    };
    Ok(Agent::new(api, config, factory, shutdown).run().await?)
}

/// `run` for the binary: its own multi-threaded runtime, SIGINT/SIGTERM as the shutdown
/// signal, and a summary line at the end.
pub fn run_blocking(args: &RunArgs) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fedtune-agent")
        .build()
        .map_err(|e| RunError::Usage(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(async {
        let shutdown = fedtune_shared::shutdown::shutdown_token();
        run(args, shutdown).await
    });
    // The trainer thread may still be busy with a step the agent abandoned: do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let outcome = result?;
    let s = &outcome.stats;
    eprintln!(
        "fedtune-client: {:?}; {} rounds trained, {} updates accepted, {} evaluations, {} joins, {} B down, {} B up",
        outcome.reason, s.fits, s.updates_accepted, s.evaluations, s.joins, s.bytes_downloaded, s.bytes_uploaded
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> RunArgs {
        use clap::Parser;
        let mut argv = vec!["fedtune-client", "run", "--data", "d.csv", "--fake-trainer", "--key", "k"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Run(a) => a,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn plaintext_needs_insecure_and_https_needs_a_ca() {
        let err = run_args(&["--coordinator", "http://127.0.0.1:1"]).connect_options().unwrap_err();
        assert!(err.to_string().contains("--insecure"), "{err}");
        run_args(&["--coordinator", "http://127.0.0.1:1", "--insecure"]).connect_options().unwrap();
        let err = run_args(&["--coordinator", "https://localhost:1"]).connect_options().unwrap_err();
        assert!(err.to_string().contains("--ca"), "{err}");
        let err = run_args(&["--coordinator", "https://localhost:1", "--ca", "/nonexistent/ca.pem"])
            .connect_options()
            .unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn an_enrollment_token_starting_with_a_dash_is_a_value_not_a_flag() {
        let token = std::iter::repeat_with(|| EnrollmentToken::generate().unwrap())
            .find(|t| t.expose_secret().starts_with('-'))
            .unwrap();
        let args =
            run_args(&["--coordinator", "http://127.0.0.1:1", "--enroll-token", &token.expose_secret()]);
        assert_eq!(args.enroll_token.map(|t| t.expose_secret()), Some(token.expose_secret()));
    }
}
