//! The coordinator's configuration: one typed tree, layered from a TOML file, `FEDTUNE__…`
//! environment variables and a few CLI flags (see [`fedtune_shared::settings`]), and validated
//! once by [`CoordinatorSettings::validate`] before anything binds a port.
//!
//! This is the lowest layer of the crate: it names no other module of it, so every module may
//! read settings. The `[model]` section is in [`model`], `[privacy]` in [`privacy`], `[security]`
//! in [`security`].
//!
//! Example (`deploy/config/coordinator.example.toml` has the full list):
//!
//! ```toml
//! [storage]
//! state_dir = "/var/lib/fedtune"
//! [model]
//! init_dir = "/models/bert-base-uncased"
//! labels = ["negative", "positive"]
//! train_top_layers = 4
//! [rounds]
//! total = 20
//! min_fit = 3
//! deadline = "10m"
//! [sampling]
//! scheme = "poisson"
//! rate = 0.5
//! [strategy]
//! name = "fedadam"
//! server_learning_rate = 0.01
//! ```

pub mod model;
pub mod privacy;
pub mod secure_aggregation;
pub mod security;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedtune_shared::chunk::{DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
use fedtune_shared::compression::UpdateEncoding;
use fedtune_shared::limits::MAX_NUM_EXAMPLES;
use fedtune_shared::schedule::LrSchedule;
use fedtune_shared::settings::{duration, optional_duration, SettingsError};
use serde::{Deserialize, Serialize};

pub use model::{AdapterKind, LoraSettings, ModelSettings};
pub use privacy::{accounting_for, AdaptiveClipSettings, DpMode, PrivacySettings};
pub use secure_aggregation::SecureAggregationSettings;
pub use security::{LimitSettings, SecuritySettings};

/// Everything the coordinator is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// Network side: listen address, limits, drain.
    #[serde(default)]
    pub server: ServerSettings,
    /// Where state lives.
    pub storage: StorageSettings,
    /// The initial model and which tensors clients train.
    pub model: ModelSettings,
    /// Round lifecycle: count, deadlines, minimums, retries.
    #[serde(default)]
    pub rounds: RoundSettings,
    /// How the clients of a round are sampled.
    #[serde(default)]
    pub sampling: SamplingSettings,
    /// Local training parameters sent to clients.
    #[serde(default)]
    pub fit: FitSettings,
    /// Federated evaluation.
    #[serde(default)]
    pub evaluation: EvaluationSettings,
    /// Aggregation strategy.
    #[serde(default)]
    pub strategy: StrategySettings,
    /// Client liveness.
    #[serde(default)]
    pub clients: ClientSettings,
    /// Differential privacy (mode, noise, clipping, budget); off by default.
    #[serde(default)]
    pub privacy: PrivacySettings,
    /// Secure aggregation (SecAgg+) of fit rounds; off by default.
    #[serde(default)]
    pub secure_aggregation: SecureAggregationSettings,
    /// TLS, client authentication lifetimes, call limits (`serve` refuses plaintext unless
    /// `security.insecure`).
    #[serde(default)]
    pub security: SecuritySettings,
}

/// Network side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address `serve` binds.
    pub listen: SocketAddr,
    /// A second, plaintext listener serving only the standard gRPC health service
    /// (`grpc.health.v1.Health`: SERVING or NOT_SERVING, nothing else), for probes that cannot
    /// speak TLS, such as Kubernetes' `grpc:` probes. Absent: health is answered on `listen`
    /// only, behind its TLS.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// The operator's plaintext HTTP port: Prometheus metrics at `/metrics` (open, or behind
    /// `metrics_token_file`) and the status page at `/status` (operator token). Meant for a
    /// private operator network, never the clients' side. Absent (the default): not served, so
    /// nothing listens that the deployment did not ask for.
    #[serde(default)]
    pub operator_listen: Option<SocketAddr>,
    /// A file holding the bearer token `/metrics` requires (base64url of 32 bytes, mode 0600;
    /// written there with a fresh token at start if it does not exist). Give Prometheus a copy
    /// as its scrape config's `authorization: { credentials_file: … }`. Absent (the default):
    /// `/metrics` answers anyone who reaches `operator_listen`. Needs `operator_listen`.
    #[serde(default)]
    pub metrics_token_file: Option<PathBuf>,
    /// Longest a `WaitForTask` long-poll blocks.
    #[serde(with = "duration")]
    pub long_poll: Duration,
    /// Uploads received at the same time: the upload slots `ReserveUpload` grants, one per
    /// upload stream. Further uploaders wait in `ReserveUpload` before opening a stream, so no
    /// payload waits in memory. Each upload holds one spool file (model-sized, on disk) and a
    /// stream window and a chunk or two in memory, so this bounds disk use, receive CPU and
    /// memory whatever the number of clients. Receiving is CPU-bound (hash, checks), so more
    /// than about twice the cores buys nothing.
    pub max_concurrent_uploads: usize,
    /// `ReserveUpload` calls that may wait for one of the `max_concurrent_uploads` slots; one
    /// more is answered "retry after" at once (so is a wait that reaches `long_poll`). A waiting
    /// reservation is a pending unary call holding no payload (a few KiB), so the bound can be
    /// the number of clients expected to upload at once: refused reservations come back
    /// polling. 0 answers "retry after" whenever every slot is busy. (Before `ReserveUpload`,
    /// this bounded upload streams waiting for a slot, each holding a 1 MiB stream window.)
    pub upload_queue: usize,
    /// Longest an upload stream may stay silent between two messages before it is closed with
    /// DEADLINE_EXCEEDED, so a client that sends a header and then nothing cannot hold one of the
    /// `max_concurrent_uploads` slots until the round's deadline; also how long a
    /// `ReserveUpload` grant holds its slot waiting for the stream to open.
    #[serde(with = "duration")]
    pub upload_idle_timeout: Duration,
    /// Largest weight (`num_examples`) one update may claim. Each round also shares the
    /// fixed-point bound on the total weight evenly among its participants, so one update can
    /// never leave the others no room; an update above either cap is refused at its header.
    pub max_update_weight: u64,
    /// Chunk size of downloads unless a client asks otherwise (1–4 MiB).
    pub download_chunk_bytes: usize,
    /// Longest a download waits for the client to take its next chunk; a client that stops
    /// reading loses the stream then (it ends with DEADLINE_EXCEEDED, nothing more is produced).
    /// The chunks already produced stay buffered until the client resets the stream or closes
    /// its connection, and so does its download slot, so never reading costs a client its own
    /// two downloads, not the coordinator's memory.
    #[serde(with = "duration")]
    pub download_send_timeout: Duration,
    /// Longest a new connection may take from accept to its first request (TLS handshake,
    /// HTTP/2 preface, first call); one that has not got there by then is closed, so sockets
    /// that connect and send nothing, or trickle a handshake, do not pile up.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Longest a connection may go without a byte from its peer before it is closed. The
    /// server pings every third of it (at most every 30 s), and a live peer's answer counts, so
    /// only dead or hostile peers reach it.
    #[serde(with = "duration")]
    pub connection_idle_timeout: Duration,
    /// Longest any call but `UploadUpdate` may take to be answered (DEADLINE_EXCEEDED after
    /// it). Must exceed `long_poll`. Uploads are bounded by the round's deadline and
    /// `upload_idle_timeout` instead; download bodies by `download_send_timeout` per chunk.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Capacity of the bounded request queue in front of the round actor.
    pub request_queue: usize,
    /// How long shutdown waits for in-flight calls before it stops anyway.
    #[serde(with = "duration")]
    pub drain_grace: Duration,
    /// Stop serving this long after the federation finished (all rounds done), so that agents
    /// still polling learn it is over. `None` keeps serving until a signal.
    #[serde(default, with = "optional_duration")]
    pub exit_after_finished: Option<Duration>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            health_listen: None,
            operator_listen: None,
            metrics_token_file: None,
            long_poll: Duration::from_secs(20),
            max_concurrent_uploads: 4,
            upload_queue: 1024,
            upload_idle_timeout: Duration::from_secs(30),
            max_update_weight: 10_000_000,
            download_chunk_bytes: DEFAULT_CHUNK_BYTES,
            download_send_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            connection_idle_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(60),
            request_queue: 256,
            drain_grace: Duration::from_secs(30),
            exit_after_finished: None,
        }
    }
}

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// State directory: `state.sqlite`, `checkpoints/`, `spool/`. `serve` on an existing one
    /// resumes after the last completed round.
    pub state_dir: PathBuf,
    /// Checkpoints to keep (newest first; the initial model is always kept). 0 keeps all.
    #[serde(default)]
    pub keep_checkpoints: usize,
}

/// Round lifecycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundSettings {
    /// Rounds to run; afterwards the federation is finished.
    pub total: u64,
    /// Time from sampling to the end of uploads.
    #[serde(with = "duration")]
    pub deadline: Duration,
    /// Live clients needed before a round starts.
    pub min_available: usize,
    /// Accepted updates needed by the deadline for a round to complete (and clients a draw
    /// needs). Not applied to Poisson draws under DP, which run and are charged whatever their
    /// size: redrawing would condition the sample (`sampling::unconditioned`).
    pub min_fit: usize,
    /// Failed attempts in a row after which the federation halts.
    pub max_consecutive_failures: u32,
    /// Pause before retrying a failed round.
    #[serde(with = "duration")]
    pub retry_backoff: Duration,
    /// Base seed of client sampling and per-client training seeds (recorded per round). Used
    /// only without DP: under DP every draw is seeded from the OS CSPRNG, so that the sample
    /// stays secret (`sampling::fit_seed`).
    pub seed: u64,
}

impl Default for RoundSettings {
    fn default() -> Self {
        Self {
            total: 10,
            deadline: Duration::from_secs(600),
            min_available: 2,
            min_fit: 2,
            max_consecutive_failures: 3,
            retry_backoff: Duration::from_secs(5),
            seed: 0,
        }
    }
}

/// How a round's clients are drawn from the live ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case", deny_unknown_fields)]
pub enum SamplingSettings {
    /// `max(min_fit, ceil(fraction × live))` clients uniformly without replacement.
    Fraction {
        /// In (0, 1].
        fraction: f64,
    },
    /// `min(count, live)` clients uniformly without replacement.
    Fixed {
        /// At least `rounds.min_fit`.
        count: usize,
    },
    /// Each live client independently with probability `rate` (what DP accounting with
    /// Poisson subsampling assumes). A sample smaller than `min_fit` fails the attempt; it is not
    /// redrawn conditionally.
    Poisson {
        /// In (0, 1].
        rate: f64,
    },
}

impl Default for SamplingSettings {
    fn default() -> Self {
        SamplingSettings::Fraction { fraction: 1.0 }
    }
}

/// Local training parameters sent with every fit task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FitSettings {
    /// Local epochs.
    pub epochs: u32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Peak learning rate of the clients' optimizer.
    pub learning_rate: f64,
    /// Optimizer step cap per round.
    pub max_steps: Option<u64>,
    /// Shape of the clients' local rate within each round after warm-up: `constant` (Flower's
    /// and most papers' clients), `linear` or `cosine` (decay to 0 at the round's last step).
    pub lr_schedule: LrSchedule,
    /// Steps at the start of each round over which the local rate rises from 0 to the peak.
    pub warmup_steps: u64,
    /// The encoding clients upload their updates in: `f32` (4 bytes per value) or `int8`
    /// (blocks of 256 one-byte codes under an f32 scale, unbiased stochastic rounding:
    /// about a quarter of the bytes; `fedtune_shared::compression`). Not with secure aggregation,
    /// whose uploads are its own ring encoding.
    pub update_encoding: UpdateEncoding,
}

impl Default for FitSettings {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 16,
            learning_rate: 5e-5,
            max_steps: None,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            update_encoding: UpdateEncoding::F32,
        }
    }
}

/// Federated evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationSettings {
    /// Evaluate after every k-th completed round (0 = never).
    pub every: u64,
    /// Also evaluate the initial model before round 1.
    pub initial: bool,
    /// Fraction of live clients with a held-out split that evaluate.
    pub fraction: f64,
    /// Reports needed for the evaluation figures to be recorded.
    pub min_clients: usize,
    /// Time clients get to report.
    #[serde(with = "duration")]
    pub deadline: Duration,
    /// Evaluation batch size.
    pub batch_size: u32,
    /// Evaluate under differential privacy too. Off by default: evaluation reports are
    /// per-client figures on local data that no noise protects, outside the (ε, δ) guarantee.
    pub enabled_under_dp: bool,
}

impl Default for EvaluationSettings {
    fn default() -> Self {
        Self {
            every: 1,
            initial: false,
            fraction: 1.0,
            min_clients: 1,
            deadline: Duration::from_secs(300),
            batch_size: 32,
            enabled_under_dp: false,
        }
    }
}

/// Aggregation strategy (Reddi et al. 2021 for the adaptive ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum StrategySettings {
    /// Weighted FedAvg: `x ← x + η·Δ̄`.
    Fedavg {
        /// Server learning rate η (1 = plain FedAvg).
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
    /// FedAvg aggregation with clients minimising `loss + μ/2‖w − x‖²`.
    Fedprox {
        /// Proximal coefficient μ ≥ 0 sent to clients.
        mu: f64,
        /// Server learning rate η.
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
    /// FedAdam.
    Fedadam(AdaptiveSettings),
    /// FedYogi.
    Fedyogi(AdaptiveSettings),
    /// FedAdagrad.
    Fedadagrad(AdaptiveSettings),
}

fn one() -> f64 {
    1.0
}

impl Default for StrategySettings {
    fn default() -> Self {
        StrategySettings::Fedavg { server_learning_rate: 1.0 }
    }
}

/// Server optimizer parameters of FedAdam/FedYogi/FedAdagrad.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSettings {
    /// Server learning rate η.
    #[serde(default = "default_eta")]
    pub server_learning_rate: f64,
    /// First-moment decay β₁ in [0, 1).
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Second-moment decay β₂ in [0, 1) (unused by FedAdagrad).
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adaptivity τ > 0 (also the initial √v).
    #[serde(default = "default_tau")]
    pub tau: f64,
}

fn default_eta() -> f64 {
    1e-2
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_tau() -> f64 {
    1e-3
}

/// Client liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSettings {
    /// Heartbeat period asked of busy clients.
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// Silence after which a client counts as gone.
    #[serde(with = "duration")]
    pub liveness_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self { heartbeat_interval: Duration::from_secs(5), liveness_timeout: Duration::from_secs(30) }
    }
}

impl CoordinatorSettings {
    /// Evaluate after every k-th round (0 = never): `evaluation.every`, or 0 under DP unless
    /// `evaluation.enabled_under_dp` asks for it.
    pub fn evaluation_every(&self) -> u64 {
        if self.privacy.enabled() && !self.evaluation.enabled_under_dp {
            0
        } else {
            self.evaluation.every
        }
    }

    /// Evaluation runs under differential privacy (`evaluation.enabled_under_dp` with evaluation
    /// on): its figures are un-noised functions of the clients' data, outside the (ε, δ)
    /// guarantee, and every output that shows them must say so.
    pub fn evaluation_outside_guarantee(&self) -> bool {
        self.privacy.enabled()
            && self.evaluation.enabled_under_dp
            && (self.evaluation.every > 0 || self.evaluation.initial)
    }

    /// Loads from an optional TOML file, `FEDTUNE__SECTION__KEY` variables of `env`, and CLI
    /// overrides (`("server.listen", value)`), then validates.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(&str, toml::Value)],
    ) -> Result<Self, SettingsError> {
        let s: Self = fedtune_shared::settings::load_layered(path, "FEDTUNE", env, overrides)?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every value and cross-field rule; the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let s = &self.server;
        if s.long_poll.is_zero() || s.long_poll > Duration::from_secs(300) {
            return Err(SettingsError::invalid("server.long_poll", "must be between 1ms and 5m"));
        }
        if s.max_concurrent_uploads == 0 {
            return Err(SettingsError::invalid("server.max_concurrent_uploads", "must be at least 1"));
        }
        if s.upload_idle_timeout.is_zero() || s.upload_idle_timeout > Duration::from_secs(600) {
            return Err(SettingsError::invalid("server.upload_idle_timeout", "must be between 1ms and 10m"));
        }
        if !(1..=MAX_NUM_EXAMPLES).contains(&s.max_update_weight) {
            return Err(SettingsError::invalid(
                "server.max_update_weight",
                format!("must be between 1 and {MAX_NUM_EXAMPLES}"),
            ));
        }
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&s.download_chunk_bytes) {
            return Err(SettingsError::invalid(
                "server.download_chunk_bytes",
                format!("must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES}"),
            ));
        }
        if s.download_send_timeout.is_zero() || s.download_send_timeout > Duration::from_secs(600) {
            return Err(SettingsError::invalid(
                "server.download_send_timeout",
                "must be between 1ms and 10m",
            ));
        }
        if s.handshake_timeout.is_zero() || s.handshake_timeout > Duration::from_secs(300) {
            return Err(SettingsError::invalid("server.handshake_timeout", "must be between 1ms and 5m"));
        }
        if s.connection_idle_timeout.is_zero() || s.connection_idle_timeout > Duration::from_secs(3600) {
            return Err(SettingsError::invalid(
                "server.connection_idle_timeout",
                "must be between 1ms and 1h",
            ));
        }
        if s.request_timeout <= s.long_poll || s.request_timeout > Duration::from_secs(3600) {
            return Err(SettingsError::invalid(
                "server.request_timeout",
                format!("must exceed server.long_poll ({:?}) and be at most 1h", s.long_poll),
            ));
        }
        if s.request_queue == 0 {
            return Err(SettingsError::invalid("server.request_queue", "must be at least 1"));
        }
        // Two listeners on one port would fail to bind at start-up, or (one on 0.0.0.0) take
        // each other's connections: refused here, naming the key.
        let clash = |a: SocketAddr, b: SocketAddr| {
            let overlaps = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
            a.port() != 0 && a.port() == b.port() && overlaps
        };
        if let Some(h) = s.health_listen {
            if clash(h, s.listen) {
                return Err(SettingsError::invalid(
                    "server.health_listen",
                    format!("must not be server.listen's port ({})", s.listen),
                ));
            }
        }
        if let Some(o) = s.operator_listen {
            for (other, key) in [(Some(s.listen), "server.listen"), (s.health_listen, "server.health_listen")]
            {
                if let Some(other) = other.filter(|&other| clash(o, other)) {
                    return Err(SettingsError::invalid(
                        "server.operator_listen",
                        format!("must not be {key}'s port ({other})"),
                    ));
                }
            }
        }
        if let Some(file) = &s.metrics_token_file {
            if s.operator_listen.is_none() {
                return Err(SettingsError::invalid(
                    "server.metrics_token_file",
                    "protects /metrics on the operator port: set server.operator_listen too",
                ));
            }
            if file.as_os_str().is_empty() {
                return Err(SettingsError::invalid("server.metrics_token_file", "must not be empty"));
            }
        }
        if self.storage.state_dir.as_os_str().is_empty() {
            return Err(SettingsError::invalid("storage.state_dir", "must not be empty"));
        }
        self.model.validate()?;
        let r = &self.rounds;
        if r.total == 0 {
            return Err(SettingsError::invalid("rounds.total", "must be at least 1"));
        }
        if r.deadline.is_zero() {
            return Err(SettingsError::invalid("rounds.deadline", "must be positive"));
        }
        if r.min_fit == 0 {
            return Err(SettingsError::invalid("rounds.min_fit", "must be at least 1"));
        }
        if r.min_available < r.min_fit {
            return Err(SettingsError::invalid(
                "rounds.min_available",
                format!("({}) must be at least rounds.min_fit ({})", r.min_available, r.min_fit),
            ));
        }
        if r.max_consecutive_failures == 0 {
            return Err(SettingsError::invalid("rounds.max_consecutive_failures", "must be at least 1"));
        }
        match self.sampling {
            SamplingSettings::Fraction { fraction } if !(fraction > 0.0 && fraction <= 1.0) => {
                return Err(SettingsError::invalid("sampling.fraction", "must be in (0, 1]"));
            }
            SamplingSettings::Fixed { count } if count < r.min_fit => {
                return Err(SettingsError::invalid(
                    "sampling.count",
                    format!("({count}) must be at least rounds.min_fit ({})", r.min_fit),
                ));
            }
            SamplingSettings::Poisson { rate } if !(rate > 0.0 && rate <= 1.0) => {
                return Err(SettingsError::invalid("sampling.rate", "must be in (0, 1]"));
            }
            _ => {}
        }
        let f = &self.fit;
        if f.epochs == 0 {
            return Err(SettingsError::invalid("fit.epochs", "must be at least 1"));
        }
        if f.batch_size == 0 {
            return Err(SettingsError::invalid("fit.batch_size", "must be at least 1"));
        }
        if !(f.learning_rate.is_finite() && f.learning_rate > 0.0) {
            return Err(SettingsError::invalid("fit.learning_rate", "must be finite and positive"));
        }
        if f.max_steps == Some(0) {
            return Err(SettingsError::invalid("fit.max_steps", "must be at least 1 (omit it for no cap)"));
        }
        if let Some(max) = f.max_steps.filter(|&max| f.warmup_steps >= max) {
            return Err(SettingsError::invalid(
                "fit.warmup_steps",
                format!(
                    "({}) must be below fit.max_steps ({max}): the rate would never reach its peak",
                    f.warmup_steps
                ),
            ));
        }
        if f.update_encoding != UpdateEncoding::F32 && self.secure_aggregation.enabled {
            return Err(SettingsError::invalid(
                "fit.update_encoding",
                format!(
                    "`{}` cannot be used with secure_aggregation.enabled = true: a secure round's uploads are \
                     its own ring encoding (4 bytes per value, masked); use `f32` or disable secure aggregation",
                    f.update_encoding
                ),
            ));
        }
        let e = &self.evaluation;
        if !(e.fraction > 0.0 && e.fraction <= 1.0) {
            return Err(SettingsError::invalid("evaluation.fraction", "must be in (0, 1]"));
        }
        if e.deadline.is_zero() {
            return Err(SettingsError::invalid("evaluation.deadline", "must be positive"));
        }
        if e.batch_size == 0 {
            return Err(SettingsError::invalid("evaluation.batch_size", "must be at least 1"));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        match &self.strategy {
            StrategySettings::Fedavg { server_learning_rate } if !positive(*server_learning_rate) => {
                return Err(SettingsError::invalid(
                    "strategy.server_learning_rate",
                    "must be finite and positive",
                ));
            }
            StrategySettings::Fedprox { mu, server_learning_rate } => {
                if !(mu.is_finite() && *mu >= 0.0) {
                    return Err(SettingsError::invalid("strategy.mu", "must be finite and non-negative"));
                }
                if !positive(*server_learning_rate) {
                    return Err(SettingsError::invalid(
                        "strategy.server_learning_rate",
                        "must be finite and positive",
                    ));
                }
            }
            StrategySettings::Fedadam(a) | StrategySettings::Fedyogi(a) | StrategySettings::Fedadagrad(a) => {
                if !positive(a.server_learning_rate) {
                    return Err(SettingsError::invalid(
                        "strategy.server_learning_rate",
                        "must be finite and positive",
                    ));
                }
                if !(0.0..1.0).contains(&a.beta1) {
                    return Err(SettingsError::invalid("strategy.beta1", "must be in [0, 1)"));
                }
                if !(0.0..1.0).contains(&a.beta2) {
                    return Err(SettingsError::invalid("strategy.beta2", "must be in [0, 1)"));
                }
                if !positive(a.tau) {
                    return Err(SettingsError::invalid("strategy.tau", "must be finite and positive"));
                }
            }
            _ => {}
        }
        let c = &self.clients;
        if c.heartbeat_interval.is_zero() {
            return Err(SettingsError::invalid("clients.heartbeat_interval", "must be positive"));
        }
        if c.liveness_timeout <= c.heartbeat_interval {
            return Err(SettingsError::invalid(
                "clients.liveness_timeout",
                "must exceed clients.heartbeat_interval",
            ));
        }
        self.privacy.validate(self)?;
        self.secure_aggregation.validate(self)?;
        self.security.validate()?;
        Ok(())
    }

    /// A settings value for tests and examples: everything default except the two paths.
    pub fn with_paths(state_dir: impl Into<PathBuf>, init_dir: impl Into<PathBuf>) -> Self {
        Self {
            server: ServerSettings::default(),
            storage: StorageSettings { state_dir: state_dir.into(), keep_checkpoints: 0 },
            model: ModelSettings {
                init_dir: init_dir.into(),
                labels: Vec::new(),
                num_labels: None,
                init_seed: model::default_init_seed(),
                train_top_layers: None,
                freeze_embeddings: false,
                adapter: AdapterKind::None,
                lora: LoraSettings::default(),
                download_encoding: Default::default(),
            },
            rounds: RoundSettings::default(),
            sampling: SamplingSettings::default(),
            fit: FitSettings::default(),
            evaluation: EvaluationSettings::default(),
            strategy: StrategySettings::default(),
            clients: ClientSettings::default(),
            privacy: PrivacySettings::default(),
            secure_aggregation: SecureAggregationSettings::default(),
            security: SecuritySettings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_shared::compression::DownloadEncoding;

    fn model_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        std::fs::write(d.path().join("model.safetensors"), "").unwrap();
        d
    }

    fn load(toml_text: &str, env: Vec<(&str, &str)>) -> Result<CoordinatorSettings, SettingsError> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), toml_text).unwrap();
        let env = env.into_iter().map(|(k, v)| (k.to_string(), v.to_string()));
        CoordinatorSettings::load(Some(f.path()), env, &[])
    }

    fn base(dir: &tempfile::TempDir) -> String {
        format!("[storage]\nstate_dir = \"/tmp/x\"\n[model]\ninit_dir = \"{}\"\n", dir.path().display())
    }

    #[test]
    fn a_minimal_config_loads_with_defaults() {
        let d = model_dir();
        let s = load(&base(&d), vec![]).unwrap();
        assert_eq!(s.rounds.min_fit, 2);
        assert_eq!(s.sampling, SamplingSettings::Fraction { fraction: 1.0 });
        assert_eq!(s.strategy, StrategySettings::Fedavg { server_learning_rate: 1.0 });
    }

    #[test]
    fn tagged_sections_and_env_overrides_apply() {
        let d = model_dir();
        let text = format!(
            "{}[sampling]\nscheme = \"poisson\"\nrate = 0.25\n[strategy]\nname = \"fedyogi\"\ntau = 0.01\n",
            base(&d)
        );
        let s = load(&text, vec![("FEDTUNE__ROUNDS__DEADLINE", "90s")]).unwrap();
        assert_eq!(s.sampling, SamplingSettings::Poisson { rate: 0.25 });
        assert!(matches!(s.strategy, StrategySettings::Fedyogi(AdaptiveSettings { tau, .. }) if tau == 0.01));
        assert_eq!(s.rounds.deadline, Duration::from_secs(90));
    }

    #[test]
    fn a_lora_adapter_takes_peft_like_defaults_and_refuses_bad_values_naming_the_key() {
        let d = model_dir();
        let s = load(&base(&d), vec![("FEDTUNE__MODEL__ADAPTER", "lora")]).unwrap();
        let lora = s.model.lora_config(7).unwrap();
        assert_eq!((lora.rank, lora.alpha, lora.dropout, lora.seed), (8, 16.0, 0.0, 7));
        assert_eq!(lora.target_modules, ["query", "value"]);
        assert_eq!(load(&base(&d), vec![]).unwrap().model.lora_config(7), None);
        for (var, value, key) in [
            ("FEDTUNE__MODEL__ADAPTER", "prefix", "prefix"),
            ("FEDTUNE__MODEL__LORA__RANK", "0", "model.lora.rank"),
            ("FEDTUNE__MODEL__LORA__ALPHA", "0", "model.lora.alpha"),
            ("FEDTUNE__MODEL__LORA__DROPOUT", "1.5", "model.lora.dropout"),
            ("FEDTUNE__MODEL__LORA__TARGET_MODULES", "[\"dense\"]", "model.lora.target_modules"),
            ("FEDTUNE__MODEL__TRAIN_TOP_LAYERS", "2", "model.adapter"),
        ] {
            let err = load(&base(&d), vec![("FEDTUNE__MODEL__ADAPTER", "lora"), (var, value)]).unwrap_err();
            assert!(err.to_string().contains(key), "`{err}` should name `{key}`");
        }
    }

    #[test]
    fn invalid_values_are_refused_naming_the_key() {
        let d = model_dir();
        let cases = [
            ("[rounds]\nmin_fit = 3\nmin_available = 2\n", "rounds.min_available"),
            ("[sampling]\nscheme = \"fraction\"\nfraction = 1.5\n", "sampling.fraction"),
            ("[strategy]\nname = \"fedadam\"\nbeta1 = 1.0\n", "strategy.beta1"),
            (
                "[clients]\nheartbeat_interval = \"10s\"\nliveness_timeout = \"5s\"\n",
                "clients.liveness_timeout",
            ),
            ("[rounds]\nmin_fitt = 3\n", "min_fitt"),
            ("[fit]\nlr_schedule = \"step\"\n", "lr_schedule"),
            ("[fit]\nmax_steps = 10\nwarmup_steps = 10\n", "fit.warmup_steps"),
            ("[fit]\nwarmup_steps = -1\n", "warmup_steps"),
            ("[fit]\nupdate_encoding = \"int4\"\n", "update_encoding"),
            ("[strategy]\nname = \"fedsgd\"\n", "fedsgd"),
        ];
        for (extra, key) in cases {
            let err = load(&format!("{}{extra}", base(&d)), vec![]).unwrap_err().to_string();
            assert!(err.contains(key), "`{err}` should name `{key}`");
        }
        let err = load(&base(&d), vec![("FEDTUNE__SERVER__MAX_CONCURRENT_UPLOADS", "0")]).unwrap_err();
        assert!(err.to_string().contains("server.max_concurrent_uploads"), "{err}");
        for (var, value, key) in [
            ("FEDTUNE__SERVER__UPLOAD_IDLE_TIMEOUT", "0s", "server.upload_idle_timeout"),
            ("FEDTUNE__SERVER__MAX_UPDATE_WEIGHT", "0", "server.max_update_weight"),
            ("FEDTUNE__SERVER__DOWNLOAD_SEND_TIMEOUT", "0s", "server.download_send_timeout"),
            ("FEDTUNE__SERVER__HANDSHAKE_TIMEOUT", "0s", "server.handshake_timeout"),
            ("FEDTUNE__SERVER__CONNECTION_IDLE_TIMEOUT", "2h", "server.connection_idle_timeout"),
            // No longer than the long poll it must outlast (20 s by default).
            ("FEDTUNE__SERVER__REQUEST_TIMEOUT", "20s", "server.request_timeout"),
            // The default listen address is 0.0.0.0:50051.
            ("FEDTUNE__SERVER__HEALTH_LISTEN", "127.0.0.1:50051", "server.health_listen"),
            ("FEDTUNE__SERVER__OPERATOR_LISTEN", "0.0.0.0:50051", "server.operator_listen"),
            // A token for a port that is not served protects nothing.
            (
                "FEDTUNE__SERVER__METRICS_TOKEN_FILE",
                "/etc/fedtune/metrics.token",
                "server.metrics_token_file",
            ),
            ("FEDTUNE__SECURITY__LIMITS__MAX_CONNECTIONS_PER_ADDRESS", "0", "max_connections_per_address"),
            ("FEDTUNE__SECURITY__LIMITS__MAX_CONNECTIONS", "0", "security.limits.max_connections"),
        ] {
            let err = load(&base(&d), vec![(var, value)]).unwrap_err();
            assert!(err.to_string().contains(key), "`{err}` should name `{key}`");
        }
        // The operator port may share neither the clients' port nor the health port.
        let both = vec![
            ("FEDTUNE__SERVER__HEALTH_LISTEN", "127.0.0.1:9464"),
            ("FEDTUNE__SERVER__OPERATOR_LISTEN", "0.0.0.0:9464"),
        ];
        let err = load(&base(&d), both).unwrap_err().to_string();
        assert!(err.contains("server.operator_listen") && err.contains("server.health_listen"), "{err}");
        for (var, value, key) in [
            ("FEDTUNE__SECURE_AGGREGATION__THRESHOLD", "1", "secure_aggregation.threshold"),
            ("FEDTUNE__SECURE_AGGREGATION__STEP_TIMEOUT", "0s", "secure_aggregation.step_timeout"),
            ("FEDTUNE__SECURE_AGGREGATION__UNMASK_TIMEOUT", "0s", "secure_aggregation.unmask_timeout"),
            ("FEDTUNE__SECURE_AGGREGATION__CLIP_NORM", "0", "secure_aggregation.clip_norm"),
            (
                "FEDTUNE__SECURE_AGGREGATION__MAX_WRAP_PROBABILITY",
                "1",
                "secure_aggregation.max_wrap_probability",
            ),
        ] {
            let vars = vec![("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"), (var, value)];
            let err = load(&base(&d), vars).unwrap_err();
            assert!(err.to_string().contains(key), "`{err}` should name `{key}`");
        }
        let local = [("FEDTUNE__PRIVACY__MODE", "local"), ("FEDTUNE__PRIVACY__NOISE_MULTIPLIER", "1.0")];
        let one = [("FEDTUNE__ROUNDS__MIN_FIT", "1"), ("FEDTUNE__ROUNDS__MIN_AVAILABLE", "1")];
        for (vars, key) in [(&local[..], "secure_aggregation.enabled"), (&one[..], "rounds.min_fit")] {
            let mut vars = vars.to_vec();
            vars.push(("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"));
            let err = load(&base(&d), vars).unwrap_err();
            assert!(err.to_string().contains(key), "`{err}` should name `{key}`");
        }
        // Adaptive clipping's indicator is a per-client metric in the clear.
        let adaptive = vec![
            ("FEDTUNE__PRIVACY__MODE", "central"),
            ("FEDTUNE__PRIVACY__NOISE_MULTIPLIER", "1.0"),
            ("FEDTUNE__PRIVACY__ADAPTIVE_CLIPPING__COUNT_NOISE_STD", "5.0"),
        ];
        load(&base(&d), adaptive.clone()).expect("adaptive clipping alone is fine");
        let mut vars = adaptive;
        vars.push(("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"));
        let err = load(&base(&d), vars).unwrap_err();
        assert!(err.to_string().contains("privacy.adaptive_clipping"), "{err}");
    }

    #[test]
    fn distributed_noise_is_accepted_with_secure_aggregation_and_refused_without() {
        let d = model_dir();
        let dp =
            vec![("FEDTUNE__PRIVACY__MODE", "distributed"), ("FEDTUNE__PRIVACY__NOISE_MULTIPLIER", "1.0")];
        let err = load(&base(&d), dp.clone()).unwrap_err();
        assert!(err.to_string().contains("privacy.mode"), "{err}");
        let mut with = dp;
        with.push(("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"));
        let s = load(&base(&d), with).unwrap();
        assert!(s.secure_aggregation.enabled);
    }

    #[test]
    fn the_default_threshold_is_two_thirds_of_a_secrets_holders_within_bounds() {
        use super::secure_aggregation::default_threshold;
        // k = n - 1 (complete graph): holders = n.
        assert_eq!(default_threshold(2, 1), 2);
        assert_eq!(default_threshold(3, 2), 2);
        assert_eq!(default_threshold(4, 3), 3);
        assert_eq!(default_threshold(10, 9), 7);
        // A sparse graph: holders = k + 1 whatever n.
        assert_eq!(default_threshold(100, 8), 6);
        let s = SecureAggregationSettings { threshold: Some(50), ..Default::default() };
        assert_eq!(s.threshold_for(4, 3), 4, "capped at the holders");
    }

    #[test]
    fn rounds_train_at_a_constant_local_rate_unless_a_schedule_is_set() {
        let d = model_dir();
        let s = load(&base(&d), vec![]).unwrap();
        assert_eq!((s.fit.lr_schedule, s.fit.warmup_steps), (LrSchedule::Constant, 0));
        let text = format!("{}[fit]\nlr_schedule = \"cosine\"\nwarmup_steps = 4\n", base(&d));
        let s = load(&text, vec![("FEDTUNE__FIT__LR_SCHEDULE", "linear")]).unwrap();
        assert_eq!((s.fit.lr_schedule, s.fit.warmup_steps), (LrSchedule::Linear, 4));
    }

    #[test]
    fn updates_travel_as_f32_unless_int8_is_set_and_int8_is_refused_with_secure_aggregation() {
        let d = model_dir();
        assert_eq!(load(&base(&d), vec![]).unwrap().fit.update_encoding, UpdateEncoding::F32);
        let int8 = ("FEDTUNE__FIT__UPDATE_ENCODING", "int8");
        assert_eq!(load(&base(&d), vec![int8]).unwrap().fit.update_encoding, UpdateEncoding::Int8);
        let err = load(&base(&d), vec![int8, ("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true")]).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("fit.update_encoding") && err.contains("secure_aggregation"), "{err}");
    }

    #[test]
    fn downloads_are_f32_unless_int8_delta_is_set_and_an_unknown_encoding_is_refused_naming_the_key() {
        let d = model_dir();
        assert_eq!(load(&base(&d), vec![]).unwrap().model.download_encoding, DownloadEncoding::F32);
        let int8 = ("FEDTUNE__MODEL__DOWNLOAD_ENCODING", "int8_delta");
        // Post-processing of the aggregate: fine with secure aggregation and every DP mode.
        let with = vec![
            int8,
            ("FEDTUNE__PRIVACY__MODE", "distributed"),
            ("FEDTUNE__PRIVACY__NOISE_MULTIPLIER", "1.0"),
            ("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"),
        ];
        assert_eq!(load(&base(&d), with).unwrap().model.download_encoding, DownloadEncoding::Int8Delta);
        let err =
            load(&format!("{}download_encoding = \"int8\"\n", base(&d)), vec![]).unwrap_err().to_string();
        assert!(err.contains("download_encoding"), "`{err}` should name `download_encoding`");
    }

    #[test]
    fn the_example_config_in_deploy_is_valid() {
        let d = model_dir();
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/config/coordinator.example.toml");
        let init = toml::Value::String(d.path().display().to_string());
        let s = CoordinatorSettings::load(Some(&example), Vec::new(), &[("model.init_dir", init)]).unwrap();
        assert_eq!(s.model.labels, ["negative", "positive"]);
        assert_eq!(s.server, ServerSettings::default());
        assert_eq!(s.rounds, RoundSettings::default());
        assert_eq!(s.fit, FitSettings::default(), "the example shows the defaults");
        assert_eq!(s.model.download_encoding, DownloadEncoding::F32, "the example shows the default");
    }

    #[test]
    fn a_model_dir_without_weights_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let err = load(
            &format!("[storage]\nstate_dir = \"/x\"\n[model]\ninit_dir = \"{}\"\n", d.path().display()),
            vec![],
        )
        .unwrap_err();
        assert!(err.to_string().contains("model.init_dir"), "{err}");
    }
}
