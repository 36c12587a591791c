//! Local fine-tuning: [`BertTrainer`], a BERT classifier on tch that owns its model on a
//! dedicated thread and implements [`LocalTrainer`].
//!
//! tch tensors are `Send` but not `Sync`, and libtorch work blocks for seconds: so one OS thread
//! owns the variable store, optimizer, tokenizer and tokenized data ([`engine`]), and the
//! handle sends it commands over a channel, each with its own reply channel. Handles are cheap
//! to move into `spawn_blocking`; dropping the handle stops the thread.
//!
//! Training is AdamW (no decay on biases and LayerNorm weights) with linear warm-up and decay,
//! gradient-norm clipping, optional FedProx, optional partial fine-tuning ([`TrainScope`]), and
//! bf16 matrix products on CUDA. On the CPU a fit is deterministic for a given seed.
//!
//! - [`engine`]: the thread-owned state and loops; [`engine::train_step`] is one optimizer step.
//! - [`optim`]: AdamW, schedule, clipping.
//! - [`params`]: variables ⇄ [`ParameterVector`].
//! - [`metrics`]: accuracy, macro-F1, majority baseline.
//! - [`progress`]: the progress bar.

pub mod engine;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod progress;

use std::path::{Path, PathBuf};
use std::sync::mpsc;

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
    /// Which tensors train.
    pub scope: TrainScope,
    /// Optimizer hyper-parameters.
    pub adamw: AdamWConfig,
    /// Fraction of a fit's steps spent warming the learning rate up.
    pub warmup_ratio: f64,
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
            adamw: AdamWConfig::default(),
            warmup_ratio: 0.1,
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

type Reply<T> = mpsc::SyncSender<Result<T, TrainerError>>;

enum Command {
    Fit { global: Option<ParameterVector>, config: FitConfig, reply: Reply<FitOutcome> },
    Evaluate { global: Option<ParameterVector>, reply: Reply<EvalOutcome> },
    TrainableWeights { reply: Reply<ParameterVector> },
    AllWeights { reply: Reply<ParameterVector> },
    Export { dir: PathBuf, reply: Reply<()> },
    Predict { texts: Vec<String>, reply: Reply<Vec<Prediction>> },
}

/// A BERT sequence classifier trained on one site's data, on its own thread.
#[derive(Debug)]
pub struct BertTrainer {
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<std::thread::JoinHandle<()>>,
    summary: TrainerSummary,
}

impl BertTrainer {
    /// Loads the model folder (`config.json`, `model.safetensors`, tokenizer) and `dataset`,
    /// splits and tokenizes the data, and starts the trainer thread. Returns once everything is
    /// loaded, with the first error otherwise.
    pub fn new(model_dir: &Path, dataset: Dataset, options: TrainerOptions) -> Result<Self, TrainerError> {
        Self::start(model_dir.to_path_buf(), Some(dataset), options)
    }

    /// A trainer without data, for prediction only (labels from the model's config).
    pub fn for_inference(model_dir: &Path, options: TrainerOptions) -> Result<Self, TrainerError> {
        Self::start(model_dir.to_path_buf(), None, options)
    }

    fn start(
        model_dir: PathBuf,
        dataset: Option<Dataset>,
        options: TrainerOptions,
    ) -> Result<Self, TrainerError> {
        let (commands, inbox) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<TrainerSummary, TrainerError>>(1);
        let thread = std::thread::Builder::new()
            .name("fedtune-trainer".into())
            .spawn(move || {
                let engine = guarded(|| Engine::new(&model_dir, dataset.as_ref(), options));
                let mut engine = match engine {
                    Ok(engine) => {
                        let _ = ready_tx.send(Ok(engine.summary.clone()));
                        engine
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                drop(dataset);
                for command in inbox {
                    serve(&mut engine, command);
                }
            })
            .map_err(|e| TrainerError::Failed(format!("cannot start the trainer thread: {e}")))?;
        let summary = ready_rx.recv().map_err(|_| stopped())??;
        Ok(Self { commands: Some(commands), thread: Some(thread), summary })
    }

    /// What was loaded: labels, split sizes, parameter counts, majority baseline.
    pub fn summary(&self) -> &TrainerSummary {
        &self.summary
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, TrainerError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.commands.as_ref().ok_or_else(stopped)?.send(make(reply)).map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }

    /// Trains from the current weights (no global model): the centralized baseline.
    pub fn train(&mut self, config: &FitConfig) -> Result<FitOutcome, TrainerError> {
        let config = config.clone();
        self.call(|reply| Command::Fit { global: None, config, reply })
    }

    /// Evaluates the current weights on the held-out split.
    pub fn evaluate_current(&mut self) -> Result<EvalOutcome, TrainerError> {
        self.call(|reply| Command::Evaluate { global: None, reply })
    }

    /// Current values of the trainable tensors (the manifest of [`LocalTrainer::trainable_manifest`]):
    /// e.g. the initial global model of a federation.
    pub fn trainable_weights(&self) -> Result<ParameterVector, TrainerError> {
        self.call(|reply| Command::TrainableWeights { reply })
    }

    /// Current values of every tensor, with transformers' names.
    pub fn all_weights(&self) -> Result<ParameterVector, TrainerError> {
        self.call(|reply| Command::AllWeights { reply })
    }

    /// Writes the current model to `dir` in Hugging Face layout (see
    /// [`fedtune_shared::bert::export`]).
    pub fn export(&self, dir: &Path) -> Result<(), TrainerError> {
        let dir = dir.to_path_buf();
        self.call(|reply| Command::Export { dir, reply })
    }

    /// Class probabilities for each text, in order.
    pub fn predict(&self, texts: Vec<String>) -> Result<Vec<Prediction>, TrainerError> {
        self.call(|reply| Command::Predict { texts, reply })
    }
}

impl LocalTrainer for BertTrainer {
    fn trainable_manifest(&self) -> Manifest {
        self.summary.trainable_manifest.clone()
    }

    fn fit(&mut self, global: &ParameterVector, config: &FitConfig) -> Result<FitOutcome, TrainerError> {
        let (global, config) = (global.clone(), config.clone());
        self.call(|reply| Command::Fit { global: Some(global), config, reply })
    }

    fn evaluate(&mut self, global: &ParameterVector) -> Result<EvalOutcome, TrainerError> {
        let global = global.clone();
        self.call(|reply| Command::Evaluate { global: Some(global), reply })
    }
}

impl Drop for BertTrainer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop after the command in flight.
        self.commands.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> TrainerError {
    TrainerError::Failed("the trainer thread has stopped".into())
}

/// Runs `f`, turning a panic (tch panics on libtorch errors such as CUDA running out of memory)
/// into an error, so that the agent gets an answer rather than a dead channel.
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

fn serve(engine: &mut Engine, command: Command) {
    match command {
        Command::Fit { global, config, reply } => {
            let _ = reply.send(guarded(|| engine.fit(global.as_ref(), &config)));
        }
        Command::Evaluate { global, reply } => {
            let _ = reply.send(guarded(|| engine.evaluate(global.as_ref())));
        }
        Command::TrainableWeights { reply } => {
            let _ = reply.send(guarded(|| engine.trainable_weights()));
        }
        Command::AllWeights { reply } => {
            let _ = reply.send(guarded(|| engine.all_weights()));
        }
        Command::Export { dir, reply } => {
            let _ = reply.send(guarded(|| engine.export(&dir)));
        }
        Command::Predict { texts, reply } => {
            let _ = reply.send(guarded(|| engine.predict(&texts)));
        }
    }
}
