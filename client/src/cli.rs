//! The `fedtune-client` command line: subcommands and what each does.
//!
//! `main.rs` only parses [`Cli`], sets up logging and dispatches; each subcommand is a function
//! here that writes its results to a writer (stdout in the binary, a buffer in tests). Progress
//! bars and logs go to stderr, so stdout stays machine-readable for `predict`.
//!
//! This is the top layer: `run`'s flags ([`RunArgs`]) only turn into
//! [`ClientSettings`](crate::settings::ClientSettings), which `crate::run_cmd` executes without
//! knowing about the command line.

mod run;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use fedtune_shared::schedule::{LrSchedule, Warmup};

use crate::data::{DataError, DataOptions, Dataset};
use crate::device::{DeviceChoice, PrecisionChoice};
use crate::local_trainer::{FitConfig, TrainerError};
use crate::trainer::{AdamWConfig, BertTrainer, TrainScope, TrainerOptions, TrainerSummary};
use fedtune_shared::bert::lora::LoraArgs;

pub use run::RunArgs;

/// Errors a subcommand reports (printed by `main`; exit status 64 for [`CliError::Usage`], else 1).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Reading the data failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The trainer failed (model loading, training, export).
    #[error(transparent)]
    Trainer(#[from] TrainerError),
    /// The arguments do not make sense together.
    #[error("{0}")]
    Usage(String),
    /// Reading input or writing output failed (the cause is the source, printed by the chain).
    #[error("cannot use {context}")]
    Io {
        /// What was being read or written.
        context: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// fedtune's client: fine-tunes BERT classifiers locally and takes part in federated training.
#[derive(Debug, Parser)]
#[command(name = "fedtune-client", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: text (coloured only on a terminal) or json (one object per line).
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    pub log_format: fedtune_shared::telemetry::LogFormat,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a model on a labelled file (centralized baseline), report held-out metrics
    /// against the majority baseline, and optionally export the model.
    Train(Box<TrainArgs>),
    /// Evaluate a fine-tuned model on a labelled file (its test rows when it has a split column).
    Eval(EvalArgs),
    /// Print one JSON object per input text: `label`, `label_id` and `probs` (label-id order).
    Predict(PredictArgs),
    /// Join a federation: train on local data for the coordinator round after round, until the
    /// federation finishes or SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Write a new Ed25519 identity key (PKCS#8 PEM, mode 0600) and print its public key, for
    /// `fedtune-coordinator clients add --public-key`.
    Keygen(crate::identity::KeygenArgs),
}

/// Where the model runs.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// auto (bf16 on CUDA, f32 on CPU), f32 or bf16.
    #[arg(long, default_value = "auto")]
    pub precision: PrecisionChoice,
    /// libtorch CPU threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Which columns of the data file to read.
#[derive(Debug, Clone, Args)]
pub struct ColumnArgs {
    /// Column holding the text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Column holding the class.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Column assigning rows to train/test, honoured when present.
    #[arg(long, default_value = "split")]
    pub split_column: String,
}

impl ColumnArgs {
    fn options(&self) -> DataOptions {
        DataOptions {
            text_column: self.text_column.clone(),
            label_column: Some(self.label_column.clone()),
            split_column: self.split_column.clone(),
        }
    }
}

/// `fedtune-client train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Model folder: config.json, model.safetensors, tokenizer.json or vocab.txt.
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled data, .csv/.tsv or .jsonl.
    #[arg(long)]
    pub data: PathBuf,
    /// Data columns.
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// Longest token sequence, special tokens included.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Passes over the training rows.
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    /// Decoupled weight decay (not applied to biases and LayerNorm weights).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Shape of the learning rate after warm-up: linear (decays to 0 at the last step, as
    /// transformers' `Trainer`), constant or cosine.
    #[arg(long, default_value_t = LrSchedule::Linear)]
    pub lr_schedule: LrSchedule,
    /// Fraction of steps warming the learning rate up (rounded up to whole steps).
    #[arg(long, default_value_t = 0.1, value_parser = parse_warmup_ratio)]
    pub warmup_ratio: f64,
    /// Warm up over this many steps instead of a fraction of them.
    #[arg(long, conflicts_with = "warmup_ratio")]
    pub warmup_steps: Option<u64>,
    /// Gradient-norm clipping limit (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Fraction held out for evaluation when the data has no split column.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// Seed for the split, the new head's initial values, shuffling and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Train only the top K encoder layers plus the head (embeddings frozen).
    #[arg(long, value_name = "K")]
    pub train_top_layers: Option<usize>,
    /// Keep the embeddings frozen.
    #[arg(long)]
    pub freeze_embeddings: bool,
    /// `lora`: train LoRA adapters (B only, A frozen and seeded from --seed) and the head; every
    /// base weight stays frozen.
    #[arg(long, default_value = "none", value_parser = ["none", "lora"], conflicts_with_all = ["train_top_layers", "freeze_embeddings"])]
    pub adapter: String,
    /// LoRA adapter shape (with `--adapter lora`).
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Export the fine-tuned model here, in Hugging Face layout (a LoRA adapter merged in).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// With `--adapter lora`: also export the adapter and head here, as a `peft` adapter folder.
    #[arg(long)]
    pub out_adapter: Option<PathBuf>,
    /// Device, precision, threads, progress.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `fedtune-client eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Fine-tuned model folder (with a trained classifier).
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled data, .csv/.tsv or .jsonl.
    #[arg(long)]
    pub data: PathBuf,
    /// Data columns.
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// Longest token sequence, special tokens included.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Device, precision, threads, progress.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `fedtune-client predict`.
#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    /// Fine-tuned model folder (with a trained classifier).
    #[arg(long)]
    pub model: PathBuf,
    /// A text to classify (repeatable).
    #[arg(long = "text", value_name = "TEXT")]
    pub texts: Vec<String>,
    /// File of texts: .csv/.tsv/.jsonl (column --text-column), otherwise one text per line;
    /// `-` reads lines from stdin.
    #[arg(long, conflicts_with = "texts")]
    pub input: Option<PathBuf>,
    /// Text column of a .csv/.tsv/.jsonl input.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Longest token sequence, special tokens included.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Device, precision, threads, progress.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

fn parse_warmup_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{text}` is not a fraction in [0, 1]")),
    }
}

fn base_options(runtime: &RuntimeArgs, max_len: usize) -> TrainerOptions {
    TrainerOptions {
        max_len,
        device: runtime.device,
        precision: runtime.precision,
        threads: runtime.threads,
        progress: !runtime.quiet,
        ..TrainerOptions::default()
    }
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io { context: context.into(), source }
}

fn describe(out: &mut dyn Write, s: &TrainerSummary) -> Result<(), CliError> {
    writeln!(
        out,
        "data: {} train / {} held-out examples; labels {:?}; device {} ({:?}); training {} of {} parameters",
        s.num_train, s.num_eval, s.labels, s.device, s.precision, s.trainable_parameters, s.total_parameters
    )
    .map_err(io("stdout"))
}

/// The model must carry a trained classifier for `eval` and `predict` to mean anything.
fn require_trained_head(model: &Path, s: &TrainerSummary) -> Result<(), CliError> {
    if s.initialized.iter().any(|n| n.starts_with("classifier.")) {
        return Err(CliError::Usage(format!(
            "{} has no trained classifier (classifier.weight is missing): fine-tune it first with `fedtune-client train --out`",
            model.display()
        )));
    }
    Ok(())
}

/// `train`: fine-tune, evaluate against the majority baseline, export.
pub fn train(args: &TrainArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let dataset = Dataset::load(&args.data, &args.columns.options())?;
    let options = TrainerOptions {
        eval_fraction: args.eval_fraction,
        seed: args.seed,
        scope: TrainScope {
            train_top_layers: args.train_top_layers,
            freeze_embeddings: args.freeze_embeddings,
        },
        adapter: (args.adapter == "lora").then(|| args.lora.config(args.seed)),
        adamw: AdamWConfig { weight_decay: args.weight_decay, ..AdamWConfig::default() },
        max_grad_norm: args.max_grad_norm,
        ..base_options(&args.runtime, args.max_len)
    };
    let mut trainer = BertTrainer::new(&args.model, dataset, options)?;
    let summary = trainer.summary().clone();
    describe(out, &summary)?;
    let fit = FitConfig {
        round: 0,
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        proximal_mu: 0.0,
        max_steps: args.max_steps,
        seed: args.seed,
        lr_schedule: args.lr_schedule,
        warmup: args.warmup_steps.map_or(Warmup::Ratio(args.warmup_ratio), Warmup::Steps),
    };
    let outcome = trainer.train(&fit)?;
    writeln!(
        out,
        "train: {} examples seen, mean loss {:.4}, {:.1} samples/s",
        outcome.num_examples, outcome.train_loss, outcome.samples_per_second
    )
    .map_err(io("stdout"))?;
    if summary.num_eval > 0 {
        let eval = trainer.evaluate_current()?;
        writeln!(
            out,
            "eval: {} examples, loss {:.4}, accuracy {:.4}, macro-F1 {:.4} (majority baseline accuracy {:.4}, class {:?})",
            eval.num_examples,
            eval.loss,
            eval.accuracy,
            eval.macro_f1,
            summary.majority_baseline_accuracy,
            summary.labels.get(summary.majority_class).map(String::as_str).unwrap_or("?")
        )
        .map_err(io("stdout"))?;
    } else {
        writeln!(out, "eval: no held-out examples").map_err(io("stdout"))?;
    }
    if let Some(dir) = &args.out {
        trainer.export(dir)?;
        writeln!(out, "exported to {}", dir.display()).map_err(io("stdout"))?;
    }
    if let Some(dir) = &args.out_adapter {
        if args.adapter != "lora" {
            return Err(CliError::Usage("--out-adapter needs --adapter lora".into()));
        }
        trainer.export_adapter(dir)?;
        writeln!(out, "adapter exported to {}", dir.display()).map_err(io("stdout"))?;
    }
    Ok(())
}

/// `eval`: metrics of a fine-tuned model on a labelled file.
pub fn eval(args: &EvalArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let dataset = Dataset::load(&args.data, &args.columns.options())?;
    // Every row is held out, unless the file marks its own test rows.
    let options = TrainerOptions {
        eval_fraction: 1.0,
        eval_batch_size: args.batch_size,
        ..base_options(&args.runtime, args.max_len)
    };
    let mut trainer = BertTrainer::new(&args.model, dataset, options)?;
    let summary = trainer.summary().clone();
    require_trained_head(&args.model, &summary)?;
    let eval = trainer.evaluate_current()?;
    writeln!(
        out,
        "eval: {} examples, loss {:.4}, accuracy {:.4}, macro-F1 {:.4} (majority baseline accuracy {:.4})",
        eval.num_examples, eval.loss, eval.accuracy, eval.macro_f1, summary.majority_baseline_accuracy
    )
    .map_err(io("stdout"))
}

/// `predict`: one JSON line per text.
pub fn predict(args: &PredictArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let texts = match &args.input {
        Some(path) => read_texts(path, &args.text_column)?,
        None => args.texts.clone(),
    };
    if texts.is_empty() {
        return Err(CliError::Usage("nothing to predict: give --text TEXT or --input FILE".into()));
    }
    let options =
        TrainerOptions { eval_batch_size: args.batch_size, ..base_options(&args.runtime, args.max_len) };
    let trainer = BertTrainer::for_inference(&args.model, options)?;
    require_trained_head(&args.model, trainer.summary())?;
    let predictions = trainer.predict(texts.clone())?;
    for (text, p) in texts.iter().zip(predictions) {
        let line =
            serde_json::json!({ "text": text, "label": p.label, "label_id": p.label_id, "probs": p.probs });
        writeln!(out, "{line}").map_err(io("stdout"))?;
    }
    Ok(())
}

/// Texts from a table (its text column) or a plain file (one per non-empty line, `-` = stdin).
fn read_texts(path: &Path, text_column: &str) -> Result<Vec<String>, CliError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if matches!(ext.as_str(), "csv" | "tsv" | "jsonl" | "ndjson") {
        let options =
            DataOptions { text_column: text_column.into(), label_column: None, split_column: "split".into() };
        return Ok(Dataset::load(path, &options)?.examples.into_iter().map(|e| e.text).collect());
    }
    let context = path.display().to_string();
    let lines: Vec<String> = if path == Path::new("-") {
        std::io::stdin().lock().lines().collect::<Result<_, _>>().map_err(io("stdin"))?
    } else {
        let file = std::fs::File::open(path).map_err(io(&context))?;
        std::io::BufReader::new(file).lines().collect::<Result<_, _>>().map_err(io(&context))?
    };
    Ok(lines.into_iter().filter(|l| !l.trim().is_empty()).collect())
}
