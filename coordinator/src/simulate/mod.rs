//! `fedtune-coordinator simulate`: a whole federation on one machine.
//!
//! ```text
//! data.csv ─► sample ─► partition (iid | dirichlet:α | by:COLUMN) ─► out/shards/client-k.csv
//!                                                                        │
//! coordinator (in this process, 127.0.0.1:port) ◄── gRPC ──► fedtune-client run × N (child processes)
//!        │ GetStatus every half second (the `status` subcommand's call)
//!        ▼
//! per-round table on stdout ─► out/metrics.csv, out/metrics.json, out/metrics.svg
//! ```
//!
//! The coordinator is the real server ([`crate::server::run`]) on a loopback port; the clients are
//! the real `fedtune-client` binary, so a simulation exercises exactly what a deployment runs,
//! security included: a development PKI in `out/pki` (TLS; `--insecure` for plaintext), one
//! Ed25519 key per client in `out/keys`, enrolled with a one-time token on first join, and
//! signed updates.
//! Metrics come from the coordinator's status RPC, the way an operator sees them.
//!
//! - [`partition`]: reading, sampling and sharding the data.
//! - [`clients`]: starting, watching and stopping the client processes.
//! - [`status`]: round summaries from `GetStatus` → report rows.
//! - [`report`]: the table, `metrics.csv`/`.json` and the SVG chart.

pub mod clients;
pub mod partition;
pub mod report;
pub mod status;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use fedtune_shared::compression::{DownloadEncoding, UpdateEncoding};
use fedtune_shared::round::PhaseName;
use fedtune_shared::schedule::LrSchedule;
use fedtune_shared::settings::{format_duration, parse_duration};
use tokio_util::sync::CancellationToken;

use crate::settings::{AdapterKind, CoordinatorSettings, LoraSettings, SamplingSettings};
use clients::{ClientIdentity, ClientLaunch, ClientsError, Fleet};
use partition::{PartitionError, PartitionSpec, Scheme, Table};
use report::{ReportError, ReportFiles, RoundRow};

/// Why a simulation failed.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The arguments do not make sense (missing files, impossible split).
    #[error("{0}")]
    Usage(String),
    /// Reading or sharding the data failed.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// Starting the clients failed.
    #[error(transparent)]
    Clients(#[from] ClientsError),
    /// The coordinator failed.
    #[error("coordinator: {0}")]
    Coordinator(#[from] crate::server::RunError),
    /// Writing the report failed.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// The federation did not complete.
    #[error("{0}")]
    Failed(String),
}

/// `fedtune-coordinator simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Number of client processes.
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    /// Federated rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Labelled CSV (default: $FEDTUNE_HOME/assets/rt-snippets.csv).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Base model folder (default: $FEDTUNE_HOME/assets/all-MiniLM-L6-v2).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// How rows are split among clients: iid, dirichlet:ALPHA (label skew) or by:COLUMN.
    #[arg(long, default_value = "iid")]
    pub partition: Scheme,
    /// Output folder: shards, client logs, coordinator state, metrics and chart.
    #[arg(long, default_value = "out/simulate")]
    pub out: PathBuf,
    /// Use a random sample of at most this many rows (0 = all), so a CPU run stays short.
    #[arg(long, default_value_t = 3000)]
    pub sample: usize,
    /// Seed of the sample, the partition, client sampling and training.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Column holding the text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Column holding the class.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Column assigning rows to train/test.
    #[arg(long, default_value = "split")]
    pub split_column: String,
    /// Longest token sequence.
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
    /// Train only the top K encoder layers (plus pooler and classifier); 0 trains all layers.
    #[arg(long, default_value_t = 2)]
    pub train_top_layers: usize,
    /// `lora`: train LoRA adapters and the head only (`model.adapter`); `--train-top-layers`
    /// is then ignored.
    #[arg(long, default_value = "none", value_parser = ["none", "lora"])]
    pub adapter: String,
    /// LoRA adapter shape (with `--adapter lora`).
    #[command(flatten)]
    pub lora: fedtune_shared::bert::lora::LoraArgs,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    /// Local mini-batch size.
    #[arg(long, default_value_t = 32)]
    pub batch_size: u32,
    /// Clients' peak learning rate (5e-4 suits MiniLM's top two layers: 1e-4 learnt visibly
    /// slower in five rounds of one epoch, measured when rounds decayed the rate linearly).
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Shape of the clients' rate within a round after warm-up: constant, linear or cosine.
    #[arg(long, default_value_t = LrSchedule::Constant)]
    pub lr_schedule: LrSchedule,
    /// Steps at the start of each round warming the clients' rate up from 0.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Cap on local optimizer steps per round.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// How clients upload their updates: f32, or int8 (blocks of 256 one-byte codes under an
    /// f32 scale, unbiased stochastic rounding; about a quarter of the bytes). Not with
    /// `--secure-aggregation`.
    #[arg(long, default_value_t = UpdateEncoding::F32)]
    pub update_encoding: UpdateEncoding,
    /// How clients holding the previous version download the next: f32, or int8_delta (each
    /// version is published as the previous one plus its 8-bit quantized step, and only the step
    /// is sent; about a quarter of the bytes).
    #[arg(long, default_value_t = DownloadEncoding::F32)]
    pub download_encoding: DownloadEncoding,
    /// Accepted updates a round needs (default: every client).
    #[arg(long)]
    pub min_fit: Option<usize>,
    /// Time a round's clients get to train and upload.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub round_deadline: Duration,
    /// Clients' device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// libtorch threads per client (default: the machine's cores shared among the clients).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Clients' bound on one call to the coordinator, passed as their --request-timeout
    /// (default: theirs, 30s; at least 1s).
    #[arg(long, value_parser = parse_duration)]
    pub client_request_timeout: Option<Duration>,
    /// The fedtune-client binary (default: $FEDTUNE_CLIENT_BIN, else next to this one).
    #[arg(long)]
    pub client_bin: Option<PathBuf>,
    /// Stop with an error if the federation has not finished after this long.
    #[arg(long, default_value = "2h", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Plaintext gRPC on loopback instead of TLS (clients still enroll keys and sign updates).
    #[arg(long)]
    pub insecure: bool,
    /// Differential privacy: none, central (the coordinator adds the noise), local (every client
    /// adds it) or distributed (needs --secure-aggregation, or --allow-distributed).
    #[arg(long, value_enum, default_value_t = SimulateDp::None)]
    pub dp: SimulateDp,
    /// Noise multiplier z (default with --dp: calibrated from --target-epsilon, else 1.0).
    #[arg(long)]
    pub noise_multiplier: Option<f64>,
    /// Clip bound C on each client's update.
    #[arg(long, default_value_t = 1.0)]
    pub clip_norm: f64,
    /// Privacy budget ε: rounds beyond it are refused and the federation ends early.
    #[arg(long)]
    pub target_epsilon: Option<f64>,
    /// δ of the privacy guarantee.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Poisson client sampling with this rate (default: every client every round).
    #[arg(long)]
    pub sample_rate: Option<f64>,
    /// Run --dp distributed without secure aggregation (the coordinator then sees every update
    /// with only its share of the noise).
    #[arg(long)]
    pub allow_distributed: bool,
    /// Run every round under secure aggregation (SecAgg+): the coordinator sees only the sum.
    #[arg(long)]
    pub secure_aggregation: bool,
    /// Secure aggregation's threshold t (default: two thirds of a secret's holders).
    #[arg(long, requires = "secure_aggregation")]
    pub secagg_threshold: Option<usize>,
    /// Secure aggregation's graph degree k (default: grows with the number of clients).
    #[arg(long, requires = "secure_aggregation")]
    pub secagg_degree: Option<usize>,
    /// Evaluate after every round under --dp too (`evaluation.enabled_under_dp`): the figures
    /// are un-noised, outside the privacy guarantee, and every output labels them so.
    #[arg(long)]
    pub evaluate_under_dp: bool,
    /// Test harness: clients use the deterministic fake trainer (their binary must have it too:
    /// both come from a build with the `test-support` feature, e.g. `cargo build --workspace`).
    #[cfg(feature = "test-support")]
    #[arg(long, hide = true)]
    pub fake_trainer: bool,
    /// Test harness: wall time of one fake fit, in milliseconds.
    #[cfg(feature = "test-support")]
    #[arg(long, hide = true, default_value_t = 0)]
    pub fake_fit_ms: u64,
}

/// `--dp` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SimulateDp {
    /// No differential privacy.
    None,
    /// Clients clip; the coordinator adds the noise.
    Central,
    /// Every client clips and adds the full noise.
    Local,
    /// Every client adds its share of the noise.
    Distributed,
}

/// What a finished simulation produced.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// One row per completed round.
    pub rows: Vec<RoundRow>,
    /// Held-out accuracy of always predicting the most frequent training label.
    pub majority_baseline: Option<f64>,
    /// The report files.
    pub files: ReportFiles,
}

/// `$FEDTUNE_HOME` (default `~/.cache/fedtune`), where `scripts/fetch-assets.sh` puts the assets.
fn fedtune_home() -> PathBuf {
    std::env::var_os("FEDTUNE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".cache").join("fedtune")
    })
}

/// Class names as the client numbers them ([`fedtune_shared::labels::class_order`]).
fn label_names(table: &Table, column: usize) -> Vec<String> {
    fedtune_shared::labels::class_order(table.rows.iter().filter_map(|r| r.get(column)))
}

/// The label set to configure: the model's own (`id2label`) when the data's labels are its
/// class names or its class ids, as clients read them ([`fedtune_shared::labels::class_ids`]; a
/// checkpoint with a trained head keeps its class ids), else the data's.
fn model_labels(model: &Path, data_labels: Vec<String>) -> Result<Vec<String>, SimulateError> {
    let config = crate::model::HfConfig::read(model).map_err(|e| SimulateError::Usage(e.to_string()))?;
    Ok(match config.labels() {
        Some(own)
            if fedtune_shared::labels::class_ids(&own, data_labels.iter().map(String::as_str)).is_ok() =>
        {
            own
        }
        _ => data_labels,
    })
}

/// Accuracy on held-out rows of predicting the most frequent training label.
fn majority_baseline(table: &Table, label: usize, split: Option<usize>) -> Option<f64> {
    let held_out = |r: &csv::StringRecord| {
        split.and_then(|c| r.get(c)).is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "test" | "eval" | "evaluation" | "validation" | "valid" | "dev"
            )
        })
    };
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for r in table.rows.iter().filter(|r| !held_out(r)) {
        *counts.entry(r.get(label).unwrap_or("")).or_default() += 1;
    }
    let majority = counts.into_iter().max_by_key(|(_, n)| *n)?.0;
    let test: Vec<&csv::StringRecord> = table.rows.iter().filter(|r| held_out(r)).collect();
    (!test.is_empty())
        .then(|| test.iter().filter(|r| r.get(label) == Some(majority)).count() as f64 / test.len() as f64)
}

impl SimulateArgs {
    fn coordinator_settings(&self, model: &Path, state: &Path, labels: Vec<String>) -> CoordinatorSettings {
        let mut s = CoordinatorSettings::with_paths(state, model);
        s.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        // Clients learn quickly that a round started or the federation ended.
        s.server.long_poll = Duration::from_secs(5);
        s.server.exit_after_finished = Some(Duration::from_secs(60));
        s.model.labels = labels;
        s.model.train_top_layers = (self.train_top_layers > 0).then_some(self.train_top_layers);
        s.model.freeze_embeddings = self.train_top_layers > 0;
        if self.adapter == "lora" {
            s.model.adapter = AdapterKind::Lora;
            s.model.train_top_layers = None;
            s.model.freeze_embeddings = false;
            s.model.lora = LoraSettings {
                rank: self.lora.rank,
                alpha: self.lora.alpha,
                dropout: self.lora.dropout,
                target_modules: self.lora.target_modules.clone(),
            };
        }
        s.model.init_seed = self.seed;
        s.rounds.total = self.rounds;
        s.rounds.min_available = self.clients;
        s.rounds.min_fit = self.min_fit.unwrap_or(self.clients).clamp(1, self.clients);
        s.rounds.deadline = self.round_deadline;
        s.rounds.seed = self.seed;
        s.sampling = SamplingSettings::Fraction { fraction: 1.0 };
        s.fit.epochs = self.epochs;
        s.fit.batch_size = self.batch_size;
        s.fit.learning_rate = self.lr;
        s.fit.max_steps = self.max_steps;
        s.fit.lr_schedule = self.lr_schedule;
        s.fit.warmup_steps = self.warmup_steps;
        s.fit.update_encoding = self.update_encoding;
        s.model.download_encoding = self.download_encoding;
        s.evaluation.every = 1;
        s.evaluation.fraction = 1.0;
        s.evaluation.min_clients = 1;
        s.evaluation.deadline = self.round_deadline;
        s.evaluation.enabled_under_dp = self.evaluate_under_dp;
        if let Some(rate) = self.sample_rate {
            s.sampling = SamplingSettings::Poisson { rate };
            // A Poisson draw may be small: a round needs only one update.
            s.rounds.min_fit = self.min_fit.unwrap_or(1).clamp(1, self.clients);
        }
        s.privacy = crate::settings::PrivacySettings {
            mode: match self.dp {
                SimulateDp::None => crate::settings::DpMode::None,
                SimulateDp::Central => crate::settings::DpMode::Central,
                SimulateDp::Local => crate::settings::DpMode::Local,
                SimulateDp::Distributed => crate::settings::DpMode::Distributed,
            },
            noise_multiplier: match (self.dp, self.noise_multiplier, self.target_epsilon) {
                (SimulateDp::None, ..) => None,
                (_, Some(z), _) => Some(z),
                (_, None, Some(_)) => None,
                (_, None, None) => Some(1.0),
            },
            clip_norm: self.clip_norm,
            delta: self.delta,
            target_epsilon: self.target_epsilon.filter(|_| self.dp != SimulateDp::None),
            allow_distributed_without_secure_aggregation: self.allow_distributed,
            ..crate::settings::PrivacySettings::default()
        };
        s.secure_aggregation.enabled = self.secure_aggregation;
        s.secure_aggregation.threshold = self.secagg_threshold;
        s.secure_aggregation.degree = self.secagg_degree;
        s
    }

    fn client_args(&self, model: &Path) -> Vec<String> {
        let threads = self.threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.clients.max(1)).max(1)
        });
        let mut args: Vec<String> = vec![
            "--text-column".into(),
            self.text_column.clone(),
            "--label-column".into(),
            self.label_column.clone(),
            "--split-column".into(),
            self.split_column.clone(),
            "--max-len".into(),
            self.max_len.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--device".into(),
            self.device.clone(),
            "--threads".into(),
            threads.to_string(),
            "--poll-wait".into(),
            "5s".into(),
            "--max-backoff".into(),
            "2s".into(),
            // Orphaned clients (the simulation was killed) end by themselves.
            "--give-up-after".into(),
            "2m".into(),
            "--quiet".into(),
        ];
        // Validated by each client (`agent.request_timeout`), which names the key and flag.
        if let Some(timeout) = self.client_request_timeout {
            args.extend(["--request-timeout".into(), format_duration(timeout)]);
        }
        // Fake trainers get the model folder too: every client rebuilds version 0 from it.
        args.extend(["--model".into(), model.display().to_string()]);
        #[cfg(feature = "test-support")]
        if self.fake_trainer {
            args.extend(["--fake-trainer".into(), "--fake-fit-ms".into(), self.fake_fit_ms.to_string()]);
        }
        args
    }
}

/// Runs the simulation described by `args` until the federation finishes (or `shutdown`).
pub async fn run(args: &SimulateArgs, shutdown: CancellationToken) -> Result<Simulation, SimulateError> {
    if args.clients == 0 || args.rounds == 0 {
        return Err(SimulateError::Usage("--clients and --rounds must be at least 1".into()));
    }
    let home = fedtune_home();
    let data = args.data.clone().unwrap_or_else(|| home.join("assets").join("rt-snippets.csv"));
    let model = args.model.clone().unwrap_or_else(|| home.join("assets").join("all-MiniLM-L6-v2"));
    for (what, path) in [("--data", &data), ("--model", &model)] {
        if !path.exists() {
            return Err(SimulateError::Usage(format!(
                "{what} {} does not exist (run scripts/fetch-assets.sh for the default model and data)",
                path.display()
            )));
        }
    }
    let out = &args.out;
    let state = out.join("state");
    // A simulation always starts from the initial model: an old state folder would resume a
    // federation that may already be finished.
    if state.exists() {
        std::fs::remove_dir_all(&state)
            .map_err(|e| SimulateError::Usage(format!("cannot clear {}: {e}", state.display())))?;
    }

    // Data: sample, label set, baseline, shards.
    let mut table = Table::read(&data)?;
    let total_rows = table.rows.len();
    if args.sample > 0 {
        table.sample(args.sample, args.seed);
    }
    let label_col = table.column(&args.label_column)?;
    table.column(&args.text_column)?;
    let split_col = table.column(&args.split_column).ok();
    let labels = model_labels(&model, label_names(&table, label_col))?;
    let baseline = majority_baseline(&table, label_col, split_col);
    let spec = PartitionSpec {
        scheme: args.partition.clone(),
        clients: args.clients,
        label_column: args.label_column.clone(),
        split_column: args.split_column.clone(),
        seed: args.seed,
    };
    let shards = partition::partition(&table, &spec)?;
    let shard_files = partition::write_shards(&table, &shards, &out.join("shards"))?;
    eprintln!(
        "simulate: {} of {} rows, {} clients ({}), shard sizes {:?}, labels {:?}",
        table.rows.len(),
        total_rows,
        args.clients,
        args.partition,
        shards.iter().map(Vec::len).collect::<Vec<_>>(),
        labels
    );

    // Security: TLS material, one key and one enrollment token per client.
    let mut settings = args.coordinator_settings(&model, &state, labels);
    let (identities, tls_args) = secure(args, &mut settings, out)?;

    // Coordinator, in this process.
    let listener = tokio::net::TcpListener::bind(settings.server.listen)
        .await
        .map_err(|e| SimulateError::Usage(format!("cannot bind a loopback port: {e}")))?;
    let addr = listener.local_addr().map_err(|e| SimulateError::Usage(e.to_string()))?;
    let url = if args.insecure { format!("http://{addr}") } else { format!("https://{addr}") };
    let coordinator_token = CancellationToken::new();
    let mut coordinator = tokio::spawn(crate::server::run(settings, listener, coordinator_token.clone()));

    // Clients, as processes.
    let binary = match &args.client_bin {
        Some(b) => b.clone(),
        None => clients::locate_client_binary()?,
    };
    let mut client_args = args.client_args(&model);
    client_args.extend(tls_args.iter().cloned());
    let launch = ClientLaunch {
        binary,
        coordinator_url: url.clone(),
        args: client_args,
        identities,
        log_dir: out.join("logs"),
    };
    let mut fleet = Fleet::spawn(&launch, &shard_files)?;
    eprintln!("simulate: coordinator on {url}; client logs in {}", launch.log_dir.display());

    let watched = watch(args, &url, &mut fleet, &mut coordinator, &shutdown).await;

    // Wind down: clients leave once told the federation is finished; then the coordinator.
    fleet.stop(Duration::from_secs(30)).await;
    coordinator_token.cancel();
    let coordinator_result = match tokio::time::timeout(Duration::from_secs(60), &mut coordinator).await {
        Ok(Ok(result)) => result.map_err(SimulateError::from),
        Ok(Err(e)) => Err(SimulateError::Failed(format!("coordinator task died: {e}"))),
        Err(_) => Err(SimulateError::Failed("coordinator did not stop within 60 s".into())),
    };
    let (rows, finished_reason) = match (watched, coordinator_result) {
        (Ok(rows), Ok(())) => rows,
        (Ok(rows), Err(e)) => {
            // Every round finished; a failed shutdown does not make them less worth reporting.
            tracing::warn!(error = %e, "coordinator ended with an error");
            rows
        }
        // The coordinator's own error says more than "it stopped early".
        (Err(_), Err(e)) => return Err(e),
        (Err(e), Ok(())) => return Err(e),
    };

    let files = report::write_report(&rows, out)?;
    if let Some(last) = rows.last() {
        let export = crate::operator::ExportArgs {
            state_dir: state.clone(),
            round: last.round,
            out: out.join("model"),
            init_dir: Some(model.clone()),
        };
        match crate::operator::export(&export) {
            Ok(_) => println!("final global model (round {}) in {}", last.round, export.out.display()),
            Err(e) => tracing::warn!(error = %e, "could not export the final model"),
        }
    }
    if let Some(b) = baseline {
        println!("majority-class baseline on the held-out rows: {:.1}%", b * 100.0);
    }
    if let Some(best) = rows.iter().filter_map(|r| r.eval_accuracy).reduce(f64::max) {
        println!("best federated held-out accuracy: {:.1}%", best * 100.0);
    }
    println!("wrote {}, {} and {}", files.csv.display(), files.json.display(), files.svg.display());
    // A spent privacy budget ends a federation early by design.
    let budget_spent = finished_reason.as_deref().is_some_and(|r| r.contains("privacy budget exhausted"));
    if (rows.len() as u64) < args.rounds && !budget_spent {
        return Err(SimulateError::Failed(format!(
            "only {} of {} rounds completed (see {})",
            rows.len(),
            args.rounds,
            launch.log_dir.display()
        )));
    }
    Ok(Simulation { rows, majority_baseline: baseline, files })
}

/// Makes the simulation's credentials in `out`: a fresh development PKI (`pki/`, server names
/// 127.0.0.1 and localhost) configured into `settings` unless `--insecure`, and per client a
/// fresh key (`keys/client-K.key`) with a one-time enrollment token in the state directory.
/// Returns the identities and the TLS arguments every client gets.
fn secure(
    args: &SimulateArgs,
    settings: &mut CoordinatorSettings,
    out: &Path,
) -> Result<(Vec<ClientIdentity>, Vec<String>), SimulateError> {
    let usage = |what: &str, e: &dyn std::fmt::Display| SimulateError::Usage(format!("{what}: {e}"));
    let mut tls_args = Vec::new();
    if args.insecure {
        settings.security.insecure = true;
        tls_args.push("--insecure".to_string());
    } else {
        let pki = out.join("pki");
        let paths =
            crate::certs::init_dev_pki(&pki, &[], &[], true).map_err(|e| usage("development PKI", &e))?;
        settings.security.tls_cert = Some(paths.server_cert);
        settings.security.tls_key = Some(paths.server_key);
        tls_args.extend(["--ca".to_string(), paths.ca_cert.display().to_string()]);
    }
    // Many clients join at once from one address: the per-address limit must not slow them.
    settings.security.limits.anonymous_burst =
        settings.security.limits.anonymous_burst.max(4 * args.clients as u32);
    // Every client connects from the loopback address: one connection each, two while one
    // reconnects, and room for the operator's status calls.
    let l = &mut settings.security.limits;
    l.max_connections_per_address = l.max_connections_per_address.max(2 * args.clients + 16);
    l.max_connections = l.max_connections.max(l.max_connections_per_address);
    let keys = out.join("keys");
    if keys.exists() {
        std::fs::remove_dir_all(&keys).map_err(|e| usage(&format!("clearing {}", keys.display()), &e))?;
    }
    std::fs::create_dir_all(&keys).map_err(|e| usage(&format!("creating {}", keys.display()), &e))?;
    let allowlist = crate::auth::Allowlist::open(&settings.storage.state_dir)
        .map_err(|e| usage("state directory", &e))?;
    let mut identities = Vec::with_capacity(args.clients);
    for k in 0..args.clients {
        let name = format!("client-{k}");
        let key = keys.join(format!("{name}.key"));
        fedtune_shared::crypto::generate_keypair_file(&key).map_err(|e| usage("client key", &e))?;
        let id = fedtune_shared::ids::ClientId::parse(&name).map_err(|e| usage("client name", &e))?;
        let token = allowlist
            .issue_enrollment_token(&id, Duration::from_secs(3600))
            .map_err(|e| usage("enrollment token", &e))?;
        identities.push(ClientIdentity { key, enroll_token: Some(token.expose_secret()) });
    }
    Ok((identities, tls_args))
}

/// Polls the coordinator's status, prints each round's row once its figures are final, and
/// returns every completed round once the federation is finished.
async fn watch(
    args: &SimulateArgs,
    url: &str,
    fleet: &mut Fleet,
    coordinator: &mut tokio::task::JoinHandle<Result<(), crate::server::RunError>>,
    shutdown: &CancellationToken,
) -> Result<(Vec<RoundRow>, Option<String>), SimulateError> {
    let query = crate::operator::StatusArgs {
        addr: url.to_string(),
        recent: u32::try_from(args.rounds + 16).unwrap_or(u32::MAX),
        json: false,
        ca: (!args.insecure).then(|| args.out.join("pki").join("ca.pem")),
        tls_domain: None,
        tls_cert: None,
        tls_key: None,
        // The simulation is the operator: it reads the full view, like `status --state-dir`.
        operator_token_file: None,
        state_dir: Some(args.out.join("state")),
    };
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut printed = BTreeSet::new();
    let mut last_phase = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut banner = None;
    let mut columns = report::TableColumns::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Err(SimulateError::Failed("interrupted".into())),
            _ = ticker.tick() => {}
        }
        if coordinator.is_finished() {
            return Err(SimulateError::Failed(
                "the coordinator stopped before the federation finished".into(),
            ));
        }
        for (name, exit, log) in fleet.reap() {
            if !exit.success() {
                eprintln!(
                    "simulate: {name} exited with {exit}; last lines of {}:\n{}",
                    log.display(),
                    clients::tail(&log, 15)
                );
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(SimulateError::Failed(format!(
                "the federation did not finish within {:?}",
                args.timeout
            )));
        }
        // Clients exit once told the federation is finished, so a status fetched after they
        // all exited tells a finished federation from a failed one.
        let report = match crate::operator::fetch_status(&query).await {
            Ok(report) => report,
            Err(e) if fleet.running() == 0 => {
                return Err(SimulateError::Failed(format!(
                    "every client exited and the coordinator is unreachable: {e}"
                )))
            }
            Err(_) => continue,
        };
        if last_phase != Some((report.phase, report.round)) {
            tracing::info!(phase = %report.phase, round = %report.round, "federation");
            last_phase = Some((report.phase, report.round));
        }
        let finished = report.phase == PhaseName::Finished;
        if banner.is_none() {
            // The first status fixes the table's columns (local ε, evaluation outside the
            // guarantee), so the header comes after the privacy line.
            let label = status::privacy_label(&report);
            println!("{}", report::privacy_line(&label));
            columns = report::TableColumns::of(&report.privacy, args.secure_aggregation);
            println!("{}", report::table_header(columns));
            banner = Some(label);
        }
        let rows = status::completed_rounds(&report);
        for row in &rows {
            // A round's evaluation lands after the round completes: its row is final once it
            // carries eval figures, a later round has started, or the federation is over.
            let settled = row.eval_accuracy.is_some() || report.round.round > row.round || finished;
            if settled && printed.insert(row.round) {
                println!("{}", report::table_line(row, columns));
            }
        }
        if finished {
            println!("{}", report::privacy_line(&report.privacy.guarantee));
            if args.secure_aggregation {
                println!("{}", report::secure_line(&rows, &report.privacy.mode));
            }
            if let Some(reason) = &report.finished_reason {
                println!("finished: {reason}");
            }
            return Ok((rows, report.finished_reason));
        }
        if fleet.running() == 0 {
            return Err(SimulateError::Failed("every client exited before the federation finished".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_naming(id2label: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(r#"{{"hidden_size": 4, "num_hidden_layers": 1, "id2label": {id2label}}}"#);
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    fn strings(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn data_of_class_ids_or_names_keeps_the_model_s_names_and_other_data_its_own() {
        let model = model_naming(r#"{"0": "no", "1": "yes"}"#);
        let keep = |data: &[&str]| model_labels(model.path(), strings(data)).unwrap();
        assert_eq!(keep(&["0", "1"]), ["no", "yes"], "class ids");
        assert_eq!(keep(&["yes"]), ["no", "yes"], "names");
        assert_eq!(keep(&["0", "1", "2"]), ["0", "1", "2"], "an id out of range: the data's own");
        assert_eq!(keep(&["maybe", "no"]), ["maybe", "no"], "unknown names: the data's own");
    }

    #[test]
    fn client_request_timeout_reaches_every_client_as_its_request_timeout_flag() {
        let parse = |extra: &[&str]| {
            let argv = ["fedtune-coordinator", "simulate"].iter().chain(extra).copied();
            match <crate::cli::Cli as clap::Parser>::try_parse_from(argv).unwrap().command {
                crate::cli::Command::Simulate(a) => a,
                _ => unreachable!("parsed simulate"),
            }
        };
        let flag =
            |args: &[String]| args.iter().position(|a| a == "--request-timeout").map(|i| args[i + 1].clone());
        assert_eq!(flag(&parse(&[]).client_args(Path::new("m"))), None, "the client's own default");
        let args = parse(&["--client-request-timeout", "3s"]).client_args(Path::new("m"));
        assert_eq!(flag(&args).as_deref(), Some("3s"));
    }
}
