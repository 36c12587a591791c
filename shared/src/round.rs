//! Domain messages of the federated round protocol, free of wire types.
//!
//! Each type here mirrors one message of `proto/fedtune/v1`; [`crate::convert`] converts in both
//! directions and validates on the way in, so a value of these types is always well-formed
//! (finite metrics, digests of the right length, known enum values).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, ModelVersion, RoundId, Sha256};
use crate::params::Manifest;
use crate::schedule::LrSchedule;

/// Phase of the coordinator's round state machine. Its `Display` name is what logs, spans and
/// the status RPC show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseName {
    /// Waiting for enough clients.
    Idle,
    /// Sampling the round's clients.
    Selecting,
    /// Clients train and upload.
    Training,
    /// Applying the strategy.
    Aggregating,
    /// Committing and publishing.
    Publishing,
    /// A secure round's survivors reveal the shares that remove the masks from the sum.
    Unmasking,
    /// Federated evaluation of the new model.
    Evaluating,
    /// A round failed; retry or halt.
    Failure,
    /// All rounds done.
    Finished,
    /// Shutting down.
    Shutdown,
}

impl fmt::Display for PhaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PhaseName::Idle => "idle",
            PhaseName::Selecting => "selecting",
            PhaseName::Training => "training",
            PhaseName::Aggregating => "aggregating",
            PhaseName::Publishing => "publishing",
            PhaseName::Evaluating => "evaluating",
            PhaseName::Failure => "failure",
            PhaseName::Finished => "finished",
            PhaseName::Shutdown => "shutdown",
            PhaseName::Unmasking => "unmasking",
        })
    }
}

/// Names a published global model and how to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelRef {
    /// Version (completed rounds).
    pub version: ModelVersion,
    /// Digest of the full manifest.
    pub full_manifest: Sha256,
    /// Digest of the full payload.
    pub full_payload: Sha256,
    /// Digest of the trainable manifest.
    pub trainable_manifest: Sha256,
    /// Digest of the trainable payload.
    pub trainable_payload: Sha256,
}

/// Which tensors a download covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelScope {
    /// All tensors.
    Full,
    /// Only the trainable tensors.
    Trainable,
}

/// Limits of a connection (see `Limits` in the proto), as the coordinator advertised them.
/// Their values on the coordinator's side come from [`crate::limits`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Largest encoded gRPC message, bytes.
    pub max_message_bytes: u64,
    /// Largest chunk payload, bytes.
    pub max_chunk_bytes: u64,
    /// Download chunk size used unless asked otherwise, bytes.
    pub default_chunk_bytes: u64,
    /// Largest `|value|` of an uploaded delta the coordinator accepts (finite, positive); a
    /// client checks its update against it before streaming.
    pub max_abs_update_value: f32,
}

impl Limits {
    /// The limits this build of the protocol enforces, with downloads cut into
    /// `default_chunk_bytes`.
    pub fn of_protocol(default_chunk_bytes: u64) -> Self {
        Self {
            max_message_bytes: crate::limits::MAX_MESSAGE_BYTES as u64,
            max_chunk_bytes: crate::limits::MAX_CHUNK_BYTES as u64,
            default_chunk_bytes,
            max_abs_update_value: crate::limits::MAX_ABS_UPDATE_VALUE,
        }
    }

    /// The chunk size a client uses for its uploads and asks for in downloads: the advertised
    /// default within the advertised maximum, a whole number of `f32` values (at least one).
    pub fn chunk_bytes(&self) -> u64 {
        (self.default_chunk_bytes.min(self.max_chunk_bytes) / 4 * 4).max(4)
    }
}

/// A client's request to join.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinRequest {
    /// Protocol revision the client speaks.
    pub protocol_version: u32,
    /// Requested id; `None` asks the coordinator to assign one.
    pub name: Option<ClientId>,
    /// Ed25519 public key to pin, if any.
    pub public_key: Option<[u8; 32]>,
    /// Training examples (informational).
    pub train_examples: u64,
    /// Held-out examples (0 = cannot evaluate).
    pub eval_examples: u64,
    /// Agent build identifier.
    pub agent_version: String,
}

/// The session a successful join opens.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinResponse {
    /// Id the coordinator knows the client by.
    pub client_id: ClientId,
    /// Bearer token for later calls.
    pub session_token: String,
    /// Protocol revision of the coordinator.
    pub protocol_version: u32,
    /// Heartbeat period while busy.
    pub heartbeat_interval: Duration,
    /// Silence after which the client is gone.
    pub liveness_timeout: Duration,
    /// Published model.
    pub model: ModelRef,
    /// Tensors clients train and upload.
    pub trainable_manifest: Manifest,
    /// Limits to respect.
    pub limits: Limits,
    /// Label names of the classification head.
    pub labels: Vec<String>,
    /// The federation's LoRA adapter, if it trains one.
    pub adapter: Option<AdapterSpec>,
    /// `model.init_seed`, which with the labels and the adapter fixes version 0
    /// ([`crate::bert::initial`]); `None` from a coordinator that does not send it.
    pub init_seed: Option<u64>,
}

/// A federation's LoRA adapter as a client receives it (wire `LoraAdapter`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSpec {
    /// Rank, scale, dropout, targets and the seed of A (validated).
    pub lora: crate::bert::lora::LoraConfig,
    /// [`crate::bert::lora::LoraConfig::a_digest`] of the coordinator's model.
    pub a_digest: [u8; 32],
}

/// Local training parameters for one round (wire `FitConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitInstructions {
    /// Local epochs.
    pub epochs: u32,
    /// Mini-batch size (≥ 1).
    pub batch_size: u32,
    /// Peak learning rate (finite, > 0).
    pub learning_rate: f64,
    /// FedProx μ (finite, ≥ 0; 0 disables).
    pub proximal_mu: f64,
    /// Optimizer step cap, if any.
    pub max_steps: Option<u64>,
    /// Seed for shuffling and dropout.
    pub seed: u64,
    /// Shape of the local rate after warm-up.
    pub lr_schedule: LrSchedule,
    /// Steps over which the local rate rises from 0 to `learning_rate`.
    pub warmup_steps: u64,
    /// The payload encoding the update must be uploaded in (the federation's
    /// `fit.update_encoding`; a secure round's masked upload ignores it).
    pub update_encoding: crate::compression::UpdateEncoding,
}

/// How a client privatizes its update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// Raw delta.
    None,
    /// Clip and add the full noise locally.
    Local,
    /// Clip only; the coordinator adds noise.
    Central,
    /// Clip and add this client's share of the noise.
    Distributed,
}

/// Privacy instructions for one fit task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyInstructions {
    /// What to do.
    pub mode: PrivacyMode,
    /// L2 bound (> 0 unless mode is `None`).
    pub clip_norm: f64,
    /// Per-coordinate Gaussian noise standard deviation (≥ 0).
    pub noise_stddev: f64,
    /// Exponent of the grid `2^k` the noise is added on; `None`: the client's default for
    /// `clip_norm` and the update size ([`crate::privacy::default_grid_log2`]).
    pub grid_log2: Option<i32>,
    /// Adaptive clipping: report the centred clipping indicator with the update.
    pub report_clip_indicator: bool,
    /// Std of the noise the client adds to its indicator (local/distributed noise; 0 otherwise).
    pub indicator_noise_stddev: f64,
    /// Clip tensor by tensor (equal shares of `clip_norm²`) instead of the whole update.
    pub per_layer_clipping: bool,
    /// The noise multiplier `z` the coordinator accounts the round with (0 without noise): what
    /// a site's floor (`--min-noise-multiplier`) is compared with when the site cannot check the
    /// noise itself (central and distributed noise).
    pub noise_multiplier: f64,
}

impl PrivacyInstructions {
    /// No clipping, no noise.
    pub const NONE: Self = Self {
        mode: PrivacyMode::None,
        clip_norm: 0.0,
        noise_stddev: 0.0,
        grid_log2: None,
        report_clip_indicator: false,
        indicator_noise_stddev: 0.0,
        per_layer_clipping: false,
        noise_multiplier: 0.0,
    };
}

/// Train from a published model and upload the delta.
#[derive(Debug, Clone, PartialEq)]
pub struct FitTask {
    /// Round and attempt.
    pub id: RoundId,
    /// Starting model.
    pub model: ModelRef,
    /// Local training parameters.
    pub config: FitInstructions,
    /// Time left until the upload must be complete, as of sending.
    pub deadline_in: Duration,
    /// The deadline as Unix milliseconds (informational).
    pub deadline_unix_ms: u64,
    /// Privacy instructions.
    pub privacy: PrivacyInstructions,
    /// Set when the round runs under secure aggregation (the SecAgg+ steps and a masked upload).
    pub secure_aggregation: Option<std::sync::Arc<crate::secagg::SecureTask>>,
}

/// Evaluate a published model and report.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateTask {
    /// Round whose result is evaluated (= model version).
    pub round: u64,
    /// Model to evaluate.
    pub model: ModelRef,
    /// Batch size.
    pub batch_size: u32,
    /// Time left to report, as of sending.
    pub deadline_in: Duration,
    /// The deadline as Unix milliseconds (informational).
    pub deadline_unix_ms: u64,
}

/// Answer to a long-poll.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Train.
    Fit(FitTask),
    /// Evaluate.
    Evaluate(EvaluateTask),
    /// Nothing yet.
    None {
        /// Suggested pause before polling again.
        retry_after: Duration,
        /// Current phase.
        phase: PhaseName,
        /// Current round.
        round: u64,
    },
    /// The federation is over.
    Finished {
        /// Final model version.
        final_version: ModelVersion,
        /// Why.
        reason: String,
    },
}

/// What a client reports doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientActivity {
    /// Waiting for work.
    Idle,
    /// Downloading.
    Downloading,
    /// Training.
    Training,
    /// Uploading.
    Uploading,
    /// Evaluating.
    Evaluating,
}

impl fmt::Display for ClientActivity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientActivity::Idle => "idle",
            ClientActivity::Downloading => "downloading",
            ClientActivity::Training => "training",
            ClientActivity::Uploading => "uploading",
            ClientActivity::Evaluating => "evaluating",
        })
    }
}

/// Liveness signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Current activity.
    pub activity: ClientActivity,
    /// Round being worked on, if any.
    pub round: Option<u64>,
}

/// A request for an upload slot (`ReserveUpload`), made before opening the upload stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadReservation {
    /// The round attempt whose fit task the upload answers.
    pub id: RoundId,
    /// Longest the call may wait for a slot (the coordinator caps it at its long-poll bound).
    pub max_wait: Duration,
}

/// The coordinator's answer to an [`UploadReservation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadAdmission {
    /// A slot is held for this client and attempt: open the upload stream within `ttl`.
    Granted {
        /// How long the grant waits for its stream before the slot goes to someone else.
        ttl: Duration,
    },
    /// No slot within the wait: ask again after this pause.
    RetryAfter(Duration),
}

/// The coordinator's answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// Current phase.
    pub phase: PhaseName,
    /// Current round and attempt.
    pub round: RoundId,
    /// Published model version.
    pub model_version: ModelVersion,
    /// False when the named round's task is over.
    pub task_still_wanted: bool,
}

/// First message of a model download.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelHeader {
    /// Version sent.
    pub version: ModelVersion,
    /// Scope sent.
    pub scope: ModelScope,
    /// Payload layout.
    pub manifest: Manifest,
    /// Total payload bytes.
    pub total_bytes: u64,
    /// Digest of the whole payload.
    pub payload_digest: Sha256,
    /// Offset the chunks start at.
    pub start_offset: u64,
    /// How the payload encodes the weights.
    pub encoding: ModelEncoding,
}

/// How a download's payload encodes the weights (wire `ModelEncoding` and the header's
/// `base_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelEncoding {
    /// Little-endian f32 weights.
    F32,
    /// The 8-bit step from version `base` ([`crate::compression::apply_delta`]); trainable
    /// scope only.
    Int8Delta {
        /// The version the step starts from.
        base: ModelVersion,
    },
}

impl ModelEncoding {
    /// Payload bytes of `values` values in this encoding.
    pub fn payload_bytes(self, values: usize) -> u64 {
        match self {
            ModelEncoding::F32 => crate::compression::UpdateEncoding::F32.payload_bytes(values),
            ModelEncoding::Int8Delta { .. } => crate::compression::UpdateEncoding::Int8.payload_bytes(values),
        }
    }
}

/// A download request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadRequest {
    /// Version wanted.
    pub version: ModelVersion,
    /// Which tensors.
    pub scope: ModelScope,
    /// Resume offset in bytes (multiple of 4).
    pub offset: u64,
    /// Preferred chunk size, if any (clamped by the server).
    pub max_chunk_bytes: Option<u32>,
    /// The version whose trainable weights the client holds: the coordinator may answer with
    /// the 8-bit step from it ([`ModelEncoding::Int8Delta`]).
    pub base_version: Option<ModelVersion>,
}

/// A slice of a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Byte offset in the payload.
    pub offset: u64,
    /// Bytes (1 ..= 4 MiB).
    pub data: Bytes,
}

/// One item of a download stream.
#[derive(Debug, Clone, PartialEq)]
pub enum DownloadItem {
    /// First item.
    Header(ModelHeader),
    /// Later items.
    Chunk(Chunk),
}

/// First message of an upload.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateHeader {
    /// Round and attempt of the fit task.
    pub id: RoundId,
    /// Version trained from.
    pub base_version: ModelVersion,
    /// FedAvg weight (1 ≤ n < 2³¹).
    pub num_examples: u64,
    /// Finite training metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Digest of the manifest the payload follows.
    pub manifest_digest: Sha256,
    /// Payload bytes that follow.
    pub total_bytes: u64,
    /// How the payload encodes the update (a masked upload's is always f32-sized words and is
    /// told apart by its header type, [`MaskedUpdateHeader`]).
    pub encoding: crate::compression::UpdateEncoding,
}

/// First message of a masked upload (`UPDATE_ENCODING_MASKED_U32`): the header of a plain
/// upload, whose `total_bytes` is then 4 × the secure round's vector length, and the round
/// context the masked vector belongs to. The upload's signature covers the context too
/// ([`crate::auth::masked_update_statement`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedUpdateHeader {
    /// Round, version, weight, metrics, manifest and payload length, as in a plain upload.
    pub header: UpdateHeader,
    /// The round-context digest of the secure round ([`crate::secagg::RoundContext::digest`]).
    pub secagg_context: [u8; 32],
}

/// A detached signature over an update digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSignature {
    /// Scheme name, e.g. `ed25519`.
    pub scheme: String,
    /// Signature bytes.
    pub bytes: Bytes,
}

/// Last message of an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateTrailer {
    /// Digest of the whole payload.
    pub payload_digest: Sha256,
    /// Signature, if the client signs.
    pub signature: Option<UpdateSignature>,
}

/// One item of an upload stream.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadItem {
    /// First item.
    Header(UpdateHeader),
    /// Payload slice.
    Chunk(Chunk),
    /// Last item.
    Trailer(UpdateTrailer),
}

/// Acknowledgement of an accepted update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadReceipt {
    /// Round and attempt it counted for.
    pub id: RoundId,
    /// Payload bytes received.
    pub received_bytes: u64,
}

/// Result of an evaluation task.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Round evaluated.
    pub round: u64,
    /// Model version evaluated.
    pub model_version: ModelVersion,
    /// Held-out examples (≥ 1).
    pub num_examples: u64,
    /// Mean loss (finite, ≥ 0).
    pub loss: f64,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
    /// Further finite metrics.
    pub metrics: BTreeMap<String, f64>,
}

/// Which kind of task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Fit.
    Fit,
    /// Evaluate.
    Evaluate,
}

/// Why a client gave up a task, as a stable code: the first word of
/// [`FailureReport::reason`], and the whole of it under differential privacy, where anything
/// computed from local data (a loss, an offending value and its index) must stay on the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCode {
    /// Local training (or building the trainer for it) failed.
    TrainingFailed,
    /// The prepared update holds a non-finite value or one beyond the advertised bound.
    UpdateOutOfRange,
    /// Another stage of the upload pipeline refused the update, or the task's privacy
    /// instructions could not be honoured.
    UpdateRefused,
    /// The task is weaker than the site's privacy floor (`--require-privacy`,
    /// `--min-noise-multiplier`): a refusal, not a fault.
    RefusedPrivacyFloor,
    /// Fetching the model, or talking to the coordinator, failed.
    TransportFailed,
    /// Evaluating the published model failed.
    EvaluationFailed,
    /// The task's deadline passed before it was done.
    DeadlinePassed,
    /// The client is shutting down.
    ClientShutdown,
}

impl FailureCode {
    /// The stable text (`training_failed`, …) sent and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::TrainingFailed => "training_failed",
            FailureCode::UpdateOutOfRange => "update_out_of_range",
            FailureCode::UpdateRefused => "update_refused",
            FailureCode::RefusedPrivacyFloor => "refused_privacy_floor",
            FailureCode::TransportFailed => "transport_failed",
            FailureCode::EvaluationFailed => "evaluation_failed",
            FailureCode::DeadlinePassed => "deadline_passed",
            FailureCode::ClientShutdown => "client_shutdown",
        }
    }

    /// The reason to send: the code alone when `private` (the task is under differential
    /// privacy), else `code: detail`. Detail stays in the client's own log either way.
    pub fn reason(self, private: bool, detail: &str) -> String {
        if private || detail.is_empty() {
            self.as_str().to_string()
        } else {
            format!("{}: {detail}", self.as_str())
        }
    }

    /// The code a reason starts with, if it starts with one.
    pub fn of(reason: &str) -> Option<Self> {
        let word = reason.split(':').next().unwrap_or_default().trim();
        [
            FailureCode::TrainingFailed,
            FailureCode::UpdateOutOfRange,
            FailureCode::UpdateRefused,
            FailureCode::RefusedPrivacyFloor,
            FailureCode::TransportFailed,
            FailureCode::EvaluationFailed,
            FailureCode::DeadlinePassed,
            FailureCode::ClientShutdown,
        ]
        .into_iter()
        .find(|c| c.as_str() == word)
    }
}

impl fmt::Display for FailureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client gives up on a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureReport {
    /// Round and attempt of the task (attempt 0 for evaluation).
    pub id: RoundId,
    /// Which task.
    pub kind: TaskKind,
    /// Why (at most 1024 bytes).
    pub reason: String,
}

/// One client in the operator view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientStatus {
    /// Id.
    pub client_id: ClientId,
    /// Alive and in session.
    pub alive: bool,
    /// Time since last heard from.
    pub last_seen_ago: Duration,
    /// Last reported activity.
    pub activity: ClientActivity,
    /// Rounds it contributed an accepted update to.
    pub rounds_contributed: u64,
}

/// One round attempt as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSummary {
    /// Round and attempt.
    pub id: RoundId,
    /// `running`, `completed`, `failed` or `aborted`.
    pub status: String,
    /// Clients sampled.
    pub selected: u32,
    /// Updates accepted.
    pub accepted: u32,
    /// Sampled clients that failed, dropped or were late.
    pub failed: u32,
    /// Examples behind accepted updates.
    pub total_examples: u64,
    /// Weighted mean training loss (NaN if none).
    pub train_loss: f64,
    /// Weighted federated evaluation loss (NaN if none).
    pub eval_loss: f64,
    /// Weighted federated evaluation accuracy (NaN if none).
    pub eval_accuracy: f64,
    /// Held-out examples behind the evaluation figures.
    pub eval_examples: u64,
    /// Wall time.
    pub duration: Duration,
    /// Failure reason, if any.
    pub reason: String,
    /// Model bytes streamed to clients between the previous round's close and this one's.
    pub bytes_sent: u64,
    /// Update payload bytes received over the same span (accepted or not).
    pub bytes_received: u64,
    /// Cumulative ε after this round, if it charged privacy.
    pub epsilon: Option<f64>,
    /// Under local noise: the worst-off client's local ε against the coordinator after this
    /// round (see [`PrivacyStatus::local_epsilon`]); `None` otherwise.
    pub local_epsilon: Option<f64>,
    /// Under secure aggregation: the attempt's roster size, threshold and graph degree; `None`
    /// for a plain round. Its survivors (the masked inputs in the unmasked sum) are `accepted`.
    pub secure: Option<SecureRoundFigures>,
}

/// The figures of one secure-aggregation (SecAgg+) attempt, fixed when it was set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecureRoundFigures {
    /// n: the clients in the roster (the drawn clients).
    pub clients: u32,
    /// t: how many of a secret's holders must answer to rebuild it; fewer survivors than t at
    /// any step fail the attempt.
    pub threshold: u32,
    /// k: each client's number of neighbours in the masking graph (n − 1: complete).
    pub degree: u32,
}

/// The federation's differential-privacy state, as status reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyStatus {
    /// `none`, `central`, `local` or `distributed`.
    pub mode: String,
    /// One line for operators (`no privacy guarantee` without DP).
    pub guarantee: String,
    /// ε spent so far.
    pub epsilon: f64,
    /// δ of every ε (0 without DP).
    pub delta: f64,
    /// Budget (`None`: no budget).
    pub target_epsilon: Option<f64>,
    /// Noise multiplier accounted per round.
    pub noise_multiplier: f64,
    /// Current clip bound.
    pub clip_norm: f64,
    /// Sampling scheme accounted (`poisson`, `fixed_size`, `full`).
    pub sampling: String,
    /// Rounds charged so far.
    pub rounds_charged: u64,
    /// Under local noise: the local ε of the worst-off client against the coordinator (which
    /// knows who was sampled), i.e. its participations composed without amplification, each
    /// with its recorded noise multiplier. `None`
    /// in other modes, where the published models' [`PrivacyStatus::epsilon`] is the figure.
    pub local_epsilon: Option<f64>,
    /// The fit attempts (failed ones included) of the client whose local ε is shown; without
    /// local noise, 0.
    pub max_participations: u64,
    /// Evaluation runs under DP (`evaluation.enabled_under_dp`): its figures are un-noised
    /// functions of the clients' data, outside the privacy guarantee, and every output that shows
    /// them says so ([`PrivacyStatus::EVALUATION_OUTSIDE`]).
    pub evaluation_outside_guarantee: bool,
}

impl PrivacyStatus {
    /// The label of a federation without differential privacy.
    pub const NO_GUARANTEE: &'static str = "no privacy guarantee";

    /// The label every output puts on evaluation figures computed under DP.
    pub const EVALUATION_OUTSIDE: &'static str = "outside the privacy guarantee";

    /// The status of a federation without differential privacy.
    pub fn none() -> Self {
        Self {
            mode: "none".into(),
            guarantee: Self::NO_GUARANTEE.into(),
            epsilon: 0.0,
            delta: 0.0,
            target_epsilon: None,
            noise_multiplier: 0.0,
            clip_norm: 0.0,
            sampling: String::new(),
            rounds_charged: 0,
            local_epsilon: None,
            max_participations: 0,
            evaluation_outside_guarantee: false,
        }
    }
}

/// The operator view of a coordinator.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// Protocol revision.
    pub protocol_version: u32,
    /// Current phase.
    pub phase: PhaseName,
    /// Current (or last) round and attempt.
    pub round: RoundId,
    /// Published model version.
    pub model_version: ModelVersion,
    /// Rounds configured.
    pub total_rounds: u64,
    /// Strategy name.
    pub strategy: String,
    /// Time to the current phase's deadline, if any.
    pub deadline_in: Option<Duration>,
    /// Known clients.
    pub clients: Vec<ClientStatus>,
    /// Recent rounds, newest first.
    pub recent_rounds: Vec<RoundSummary>,
    /// Updates accepted so far in the current round.
    pub accepted_updates: u32,
    /// Differential privacy state ([`PrivacyStatus::none`] without DP).
    pub privacy: PrivacyStatus,
    /// Why the federation ended, once it has.
    pub finished_reason: Option<String>,
}
