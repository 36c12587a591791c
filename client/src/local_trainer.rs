//! The seam between the federated agent and the model: what the agent asks of a trainer.
//!
//! The agent (gRPC, retries, update pipeline) is written against [`LocalTrainer`] only, so it
//! never sees tch types, and integration tests can drive it with a deterministic fake trainer.
//! Weights cross this seam as [`ParameterVector`]s holding the *trainable* tensors only (with
//! partial fine-tuning that is what clients send, so frozen tensors never travel).

use fedtune_shared::params::{Manifest, ParameterVector};
use fedtune_shared::schedule::{LrSchedule, Warmup};

/// What one round of local training should do. Sent by the coordinator, converted by the agent.
#[derive(Debug, Clone, PartialEq)]
pub struct FitConfig {
    /// Federated round this training belongs to (for logs and seeds).
    pub round: u64,
    /// Local epochs over the client's training split.
    pub epochs: u32,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Peak learning rate of the local optimizer.
    pub learning_rate: f64,
    /// FedProx proximal coefficient μ (0 disables the term): adds μ/2·‖w − w_global‖² to the loss.
    pub proximal_mu: f64,
    /// Stop after this many optimizer steps even if epochs remain (bounds round time).
    pub max_steps: Option<u64>,
    /// Seed for shuffling and dropout, so a round is reproducible on CPU.
    pub seed: u64,
    /// Shape of the rate over the fit's steps after warm-up (the federation's `fit.lr_schedule`).
    pub lr_schedule: LrSchedule,
    /// Warm-up at the start of the fit (the federation sends steps; `train` may give a ratio).
    pub warmup: Warmup,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            round: 0,
            epochs: 1,
            batch_size: 16,
            learning_rate: 5e-5,
            proximal_mu: 0.0,
            max_steps: None,
            seed: 0,
            lr_schedule: LrSchedule::Constant,
            warmup: Warmup::Steps(0),
        }
    }
}

/// Result of local training.
#[derive(Debug, Clone)]
pub struct FitOutcome {
    /// The locally trained values of the trainable tensors (same manifest as
    /// [`LocalTrainer::trainable_manifest`]). The agent computes `local − global` from it.
    pub weights: ParameterVector,
    /// Training examples seen (weight of this client in FedAvg).
    pub num_examples: u64,
    /// Mean training loss over the round.
    pub train_loss: f64,
    /// Training throughput, samples per second.
    pub samples_per_second: f64,
}

/// Result of evaluating a model on the client's held-out split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOutcome {
    /// Held-out examples evaluated.
    pub num_examples: u64,
    /// Mean cross-entropy loss.
    pub loss: f64,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
    /// Macro-averaged F1 in [0, 1].
    pub macro_f1: f64,
}

/// Error from a trainer, carried to the agent as text plus a kind.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// The global weights do not fit the local model (names or shapes).
    #[error("global weights do not fit the local model: {0}")]
    Incompatible(String),
    /// Training produced NaN/Inf or similar.
    #[error("training diverged: {0}")]
    Diverged(String),
    /// Anything else the trainer reports (I/O, libtorch).
    #[error("trainer failed: {0}")]
    Failed(String),
}

/// A model that can be trained and evaluated locally, starting from global weights.
pub trait LocalTrainer: Send {
    /// Names and shapes of the tensors this trainer trains (and the agent sends).
    fn trainable_manifest(&self) -> Manifest;
    /// Loads `global` (trainable tensors) into the model, trains, returns the local weights.
    fn fit(&mut self, global: &ParameterVector, config: &FitConfig) -> Result<FitOutcome, TrainerError>;
    /// Loads `global` and evaluates on the held-out split.
    fn evaluate(&mut self, global: &ParameterVector) -> Result<EvalOutcome, TrainerError>;
}
