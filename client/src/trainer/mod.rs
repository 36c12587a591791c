//! Local fine-tuning: [`BertTrainer`], a BERT classifier on tch that implements [`LocalTrainer`].
//!
//! tch tensors are `Send` but not `Sync`, and libtorch work blocks for seconds: so a trainer
//! (variable store, optimizer, tokenizer and tokenized data, [`engine`]) belongs to one thread
//! at a time and runs synchronously on it. In the federated agent that is the agent's one
//! trainer thread (`agent::worker`), which talks to the async side over channels; there is no
//! second thread behind the trainer, so a fit neither hops threads again nor copies the global
//! weights to reach the model.
//!
//! Training is AdamW (no decay on biases and LayerNorm weights) at the rate schedule the
//! [`FitConfig`] names (`fedtune_shared::schedule`: warm-up, then constant, linear or cosine),
//! gradient-norm clipping, optional FedProx, optional partial fine-tuning ([`TrainScope`]), and
//! bf16 matrix products on CUDA. On the CPU a fit is deterministic for a given seed.
//!
//! - [`engine`]: the thread-owned state and loops; [`engine::train_step`] is one optimizer step.
//! - [`optim`]: AdamW and clipping.
//! - [`params`]: variables ⇄ [`ParameterVector`].
//! - [`metrics`]: accuracy, macro-F1, majority baseline.
//! - [`progress`]: the progress bar.

pub mod engine;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod progress;

use std::path::Path;

use fedtune_shared::params::{Manifest, ParameterVector};
use serde::Serialize;

use crate::data::Dataset;
use crate::device::{DeviceChoice, PrecisionChoice};
use crate::local_trainer::{EvalOutcome, FitConfig, FitOutcome, LocalTrainer, TrainerError};
use crate::model::Precision;
use engine::Engine;
pub use optim::AdamWConfig;

/// Which tensors are trained: the rule the coordinator uses too (one home, in shared).
pub use fedtune_shared::bert::TrainScope;

/// Settings fixed for a trainer's life (per-run settings come in [`FitConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerOptions {
    /// Longest token sequence, `[CLS]` and `[SEP]` included (capped by the model's positions).
    pub max_len: usize,
    /// Fraction of rows held out for evaluation when the data has no split column.
    pub eval_fraction: f64,
    /// Seed of the held-out split and of the initial values of tensors the checkpoint lacks.
    /// Every client of a federation must use the same one for the classifier to start equal.
    pub seed: u64,
    /// Which tensors train (without an adapter).
    pub scope: TrainScope,
    /// A LoRA adapter: when set, only its `lora_B` tensors and the head train
    /// ([`fedtune_shared::bert::lora::LoraConfig::trains`]) and `scope` is not used.
    pub adapter: Option<fedtune_shared::bert::lora::LoraConfig>,
    /// Optimizer hyper-parameters.
    pub adamw: AdamWConfig,
    /// Gradient L2-norm limit (0 disables clipping).
    pub max_grad_norm: f64,
    /// Batch size for evaluation and prediction.
    pub eval_batch_size: usize,
    /// Where to run.
    pub device: DeviceChoice,
    /// Compute precision.
    pub precision: PrecisionChoice,
    /// libtorch intra-op threads (`None`: libtorch's default, one per core).
    pub threads: Option<usize>,
    /// Show a progress bar (only ever drawn on a terminal).
    pub progress: bool,
    /// Class names in id order; `None` takes them from the model config, else from the data.
    pub labels: Option<Vec<String>>,
}

impl Default for TrainerOptions {
    fn default() -> Self {
        Self {
            max_len: 128,
            eval_fraction: 0.1,
            seed: 42,
            scope: TrainScope::default(),
            adapter: None,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            eval_batch_size: 64,
            device: DeviceChoice::Auto,
            precision: PrecisionChoice::Auto,
            threads: None,
            progress: true,
            labels: None,
        }
    }
}

/// What the trainer loaded and decided, for logs and the CLI.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSummary {
    /// Class names in id order.
    pub labels: Vec<String>,
    /// Training rows.
    pub num_train: usize,
    /// Held-out rows.
    pub num_eval: usize,
    /// Device in words (`Cpu`, `Cuda(0)`).
    pub device: String,
    /// Compute precision.
    pub precision: Precision,
    /// Elements of the trainable tensors.
    pub trainable_parameters: usize,
    /// Elements of all tensors.
    pub total_parameters: usize,
    /// Names and shapes of the trainable tensors.
    pub trainable_manifest: Manifest,
    /// Tensors the checkpoint lacked, initialized from the seed (e.g. the classifier).
    pub initialized: Vec<String>,
    /// Checkpoint tensors the model does not use (e.g. a pre-training head).
    pub unused_checkpoint_tensors: Vec<String>,
    /// Most frequent training class.
    pub majority_class: usize,
    /// Held-out accuracy of always predicting the majority class.
    pub majority_baseline_accuracy: f64,
}

/// One text's prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Name of the most probable class.
    pub label: String,
    /// Its id.
    pub label_id: usize,
    /// Softmax probabilities in label-id order.
    pub probs: Vec<f32>,
}

/// A BERT sequence classifier trained on one site's data.
///
/// It runs on the thread that calls it and is `Send` but not `Sync` (tch tensors are not):
/// whoever owns it owns the model's thread. The agent builds it on its trainer thread
/// (`agent::worker`) and keeps it there, so a fit is one hop from the async agent to that thread,
/// and the global weights are read in place rather than copied to another thread. The CLI
/// subcommands, which have nothing else to do meanwhile, call it on the main thread.
#[derive(Debug)]
pub struct BertTrainer {
    engine: Engine,
}

impl BertTrainer {
    /// Loads the model folder (`config.json`, `model.safetensors`, tokenizer) and `dataset`,
    /// and splits and tokenizes the data. Returns once everything is loaded, with the first
    /// error otherwise.
    pub fn new(model_dir: &Path, dataset: Dataset, options: TrainerOptions) -> Result<Self, TrainerError> {
        let engine = guarded(|| Engine::new(model_dir, Some(&dataset), options))?;
        Ok(Self { engine })
    }

    /// A trainer without data, for prediction only (labels from the model's config).
    pub fn for_inference(model_dir: &Path, options: TrainerOptions) -> Result<Self, TrainerError> {
        let engine = guarded(|| Engine::new(model_dir, None, options))?;
        Ok(Self { engine })
    }

    /// What was loaded: labels, split sizes, parameter counts, majority baseline.
    pub fn summary(&self) -> &TrainerSummary {
        &self.engine.summary
    }

    /// Trains from the current weights (no global model): the centralized baseline.
    pub fn train(&mut self, config: &FitConfig) -> Result<FitOutcome, TrainerError> {
        guarded(|| self.engine.fit(None, config))
    }

    /// Evaluates the current weights on the held-out split.
    pub fn evaluate_current(&mut self) -> Result<EvalOutcome, TrainerError> {
        guarded(|| self.engine.evaluate(None))
    }

    /// Current values of the trainable tensors (the manifest of [`LocalTrainer::trainable_manifest`]):
    /// e.g. the initial global model of a federation.
    pub fn trainable_weights(&self) -> Result<ParameterVector, TrainerError> {
        guarded(|| self.engine.trainable_weights())
    }

    /// Current values of every tensor, with transformers' names.
    pub fn all_weights(&self) -> Result<ParameterVector, TrainerError> {
        guarded(|| self.engine.all_weights())
    }

    /// Writes the current model to `dir` in Hugging Face layout (see
    /// [`fedtune_shared::bert::export`]).
    pub fn export(&self, dir: &Path) -> Result<(), TrainerError> {
        guarded(|| self.engine.export(dir))
    }

    /// Writes the LoRA adapter (and head) as a `peft` adapter folder (see
    /// [`fedtune_shared::bert::export::export_peft_adapter`]); an error without an adapter.
    pub fn export_adapter(&self, dir: &Path) -> Result<(), TrainerError> {
        guarded(|| self.engine.export_adapter(dir))
    }

    /// SHA-256 of the model's `lora_A` tensors
    /// ([`fedtune_shared::bert::lora::LoraConfig::a_digest`]), to compare with the coordinator's.
    pub fn adapter_digest(&self) -> Result<[u8; 32], TrainerError> {
        Ok(fedtune_shared::bert::lora::LoraConfig::a_digest(&self.all_weights()?))
    }

    /// Class probabilities for each text, in order.
    pub fn predict(&self, texts: Vec<String>) -> Result<Vec<Prediction>, TrainerError> {
        guarded(|| self.engine.predict(&texts))
    }
}

impl LocalTrainer for BertTrainer {
    fn trainable_manifest(&self) -> Manifest {
        self.engine.summary.trainable_manifest.clone()
    }

    fn fit(&mut self, global: &ParameterVector, config: &FitConfig) -> Result<FitOutcome, TrainerError> {
        guarded(|| self.engine.fit(Some(global), config))
    }

    fn evaluate(&mut self, global: &ParameterVector) -> Result<EvalOutcome, TrainerError> {
        guarded(|| self.engine.evaluate(Some(global)))
    }
}

/// Runs `f`, turning a panic (tch panics on libtorch errors such as CUDA running out of memory)
/// into an error, so that the agent's trainer thread survives and reports the failed task.
fn guarded<T>(f: impl FnOnce() -> Result<T, TrainerError>) -> Result<T, TrainerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(TrainerError::Failed(format!("libtorch error: {what}")))
    })
}
