//! The state the trainer thread owns: model, tokenized data, and the training/evaluation loops.
//!
//! Nothing here is `Sync` (tch tensors are not): an [`Engine`] is used by one thread at a time,
//! the thread that owns the [`super::BertTrainer`] wrapping it.

use std::path::{Path, PathBuf};

use fedtune_shared::bert::lora::LoraConfig;
use fedtune_shared::params::ParameterVector;
use fedtune_shared::schedule::StepSchedule;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};
use tokio::time::Instant;

use super::metrics::{accuracy, macro_f1, majority_baseline};
use super::optim::AdamW;
use super::params::{load_parameter_vector, manifest_of, to_parameter_vector};
use super::progress::Progress;
use super::{Prediction, TrainerOptions, TrainerSummary};
use crate::data::{Dataset, LabelSet};
use crate::local_trainer::{EvalOutcome, FitConfig, FitOutcome, TrainerError};
use crate::model::{BertClassifier, BertConfig, ModelInput};
use crate::tokenize::{Encoded, EncodedBatch, TextTokenizer};

/// Read the loss back from the device every this many steps: often enough for the progress
/// bar and for catching divergence, rarely enough not to stall a GPU pipeline.
const SYNC_EVERY: u64 = 10;

/// One tokenized, labelled example.
#[derive(Debug)]
struct Item {
    enc: Encoded,
    label: usize,
}

/// Model, data and loops, owned by the trainer's thread.
#[derive(Debug)]
pub(crate) struct Engine {
    model: BertClassifier,
    tokenizer: TextTokenizer,
    labels: LabelSet,
    train: Vec<Item>,
    eval: Vec<Item>,
    /// The tensors the optimizer updates, in natural name order (the trainable manifest).
    trainable: Vec<(String, Tensor)>,
    options: TrainerOptions,
    source_dir: PathBuf,
    pub(crate) summary: TrainerSummary,
}

impl Engine {
    /// Loads model, tokenizer and data; splits, tokenizes and marks the trainable tensors.
    pub(crate) fn new(
        model_dir: &Path,
        dataset: Option<&Dataset>,
        options: TrainerOptions,
    ) -> Result<Self, TrainerError> {
        if let Some(n) = options.threads {
            tch::set_num_threads(n.max(1) as i32);
        }
        let device = options.device.resolve().map_err(|e| TrainerError::Failed(e.to_string()))?;
        let mut config = BertConfig::from_file(&model_dir.join("config.json"))
            .map_err(|e| TrainerError::Failed(e.to_string()))?;
        if let Some(lora) = &options.adapter {
            lora.validate().map_err(|e| TrainerError::Failed(format!("LoRA adapter: {e}")))?;
        }
        config.lora = options.adapter.clone();
        let labels = choose_labels(&options, &config, dataset);
        if labels.is_empty() {
            return Err(TrainerError::Failed("no class labels: the data has no labelled rows".into()));
        }
        let (mut model, report) =
            BertClassifier::load_with_config(model_dir, config, labels.len(), device, options.seed)
                .map_err(|e| TrainerError::Failed(e.to_string()))?;
        model.config.set_labels(labels.names());
        model.precision = options.precision.resolve(device);
        let max_len = options.max_len.min(model.config.max_position_embeddings);
        let tokenizer = TextTokenizer::from_model_dir(model_dir, max_len)
            .map_err(|e| TrainerError::Failed(e.to_string()))?;

        let (mut train, mut eval) = (Vec::new(), Vec::new());
        let mut train_labels = Vec::new();
        let mut eval_labels = Vec::new();
        if let Some(data) = dataset {
            let ids = data.label_ids(&labels).map_err(|e| TrainerError::Failed(e.to_string()))?;
            let (train_idx, eval_idx) = data.split_indices(options.eval_fraction, options.seed);
            let encode = |idx: &[usize]| -> Result<Vec<Item>, TrainerError> {
                let texts: Vec<&str> = idx.iter().map(|&i| data.examples[i].text.as_str()).collect();
                let encoded =
                    tokenizer.encode_all(&texts).map_err(|e| TrainerError::Failed(e.to_string()))?;
                Ok(encoded.into_iter().zip(idx).map(|(enc, &i)| Item { enc, label: ids[i] }).collect())
            };
            train = encode(&train_idx)?;
            eval = encode(&eval_idx)?;
            train_labels = train.iter().map(|i| i.label).collect();
            eval_labels = eval.iter().map(|i| i.label).collect();
        }

        let num_layers = model.config.num_hidden_layers;
        let mut trainable = Vec::new();
        let mut total_params = 0;
        for (name, var) in model.named_variables() {
            total_params += var.numel();
            let trains = match &options.adapter {
                Some(_) => LoraConfig::trains(&name),
                None => options.scope.trains(&name, num_layers),
            };
            let var = var.set_requires_grad(trains);
            if trains {
                trainable.push((name, var));
            }
        }
        // Without training rows (evaluation only), the best constant guess of the data itself.
        let reference = if train_labels.is_empty() { &eval_labels } else { &train_labels };
        let (majority_class, majority_accuracy) = majority_baseline(reference, &eval_labels, labels.len());
        let summary = TrainerSummary {
            labels: labels.names().to_vec(),
            num_train: train.len(),
            num_eval: eval.len(),
            device: format!("{device:?}"),
            precision: model.precision,
            trainable_parameters: trainable.iter().map(|(_, t)| t.numel()).sum(),
            total_parameters: total_params,
            trainable_manifest: manifest_of(&trainable),
            initialized: report.missing,
            unused_checkpoint_tensors: report.unused,
            majority_class,
            majority_baseline_accuracy: majority_accuracy,
        };
        Ok(Self {
            model,
            tokenizer,
            labels,
            train,
            eval,
            trainable,
            options,
            source_dir: model_dir.to_path_buf(),
            summary,
        })
    }

    fn input(&self, batch: &EncodedBatch) -> ModelInput {
        let device = self.model.device();
        let shape = [batch.batch_size as i64, batch.seq_len as i64];
        let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
        ModelInput {
            input_ids: t(&batch.input_ids),
            attention_mask: t(&batch.attention_mask),
            token_type_ids: t(&batch.token_type_ids),
        }
    }

    fn labelled_batch(&self, items: &[&Item]) -> (ModelInput, Tensor) {
        let encs: Vec<&Encoded> = items.iter().map(|i| &i.enc).collect();
        let batch = EncodedBatch::collate(&encs, self.tokenizer.pad_id());
        let labels: Vec<i64> = items.iter().map(|i| i.label as i64).collect();
        (self.input(&batch), Tensor::from_slice(&labels).to_device(self.model.device()))
    }

    /// Trains from the current weights (after loading `global`, when given).
    pub(crate) fn fit(
        &mut self,
        global: Option<&ParameterVector>,
        cfg: &FitConfig,
    ) -> Result<FitOutcome, TrainerError> {
        if let Some(global) = global {
            load_parameter_vector(&self.trainable, global)?;
        }
        if self.train.is_empty() {
            return Err(TrainerError::Failed("no training examples".into()));
        }
        if cfg.batch_size == 0 {
            return Err(TrainerError::Failed("batch size must be positive".into()));
        }
        if self.trainable.is_empty() {
            return Err(TrainerError::Failed("nothing to train: every tensor is frozen".into()));
        }
        let n = self.train.len();
        let per_epoch = n.div_ceil(cfg.batch_size) as u64;
        let mut total = per_epoch * u64::from(cfg.epochs);
        if let Some(max) = cfg.max_steps {
            total = total.min(max);
        }
        let schedule = StepSchedule::new(cfg.lr_schedule, cfg.warmup, total);
        let mut opt = AdamW::new(&self.trainable, self.options.adamw)
            .map_err(|e| TrainerError::Failed(e.to_string()))?;
        // FedProx anchors the local weights to the ones training started from.
        let anchor: Option<Vec<Tensor>> =
            (cfg.proximal_mu > 0.0).then(|| self.trainable.iter().map(|(_, t)| t.detach().copy()).collect());

        tch::manual_seed(cfg.seed as i64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let title = if cfg.round > 0 { format!("round {}", cfg.round) } else { "training".to_string() };
        let progress = Progress::new(total, &title, self.options.progress);
        let device = self.model.device();
        let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
        let (mut step, mut seen) = (0u64, 0u64);
        let mut last_loss = f64::NAN;
        let start = Instant::now();
        'epochs: for _ in 0..cfg.epochs {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng);
            for chunk in order.chunks(cfg.batch_size) {
                if step >= total {
                    break 'epochs;
                }
                let items: Vec<&Item> = chunk.iter().map(|&i| &self.train[i]).collect();
                let (input, labels) = self.labelled_batch(&items);
                let proximal = anchor.as_deref().map(|a| Proximal {
                    trainable: &self.trainable,
                    anchor: a,
                    mu: cfg.proximal_mu,
                });
                let ce = train_step(
                    &self.model,
                    &mut opt,
                    &input,
                    &labels,
                    cfg.learning_rate * schedule.factor(step),
                    self.options.max_grad_norm,
                    proximal,
                )?;
                loss_sum += ce.to_kind(Kind::Double) * chunk.len() as f64;
                step += 1;
                seen += chunk.len() as u64;
                if step % SYNC_EVERY == 0 || step == total {
                    last_loss = f64::try_from(&loss_sum).unwrap_or(f64::NAN) / seen as f64;
                    if !last_loss.is_finite() {
                        progress.finish();
                        return Err(TrainerError::Diverged(format!(
                            "mean loss is {last_loss} after {step} steps"
                        )));
                    }
                    progress.update(step, last_loss, seen as f64 / start.elapsed().as_secs_f64().max(1e-9));
                }
            }
        }
        if seen > 0 && step % SYNC_EVERY != 0 {
            last_loss = f64::try_from(&loss_sum).unwrap_or(f64::NAN) / seen as f64;
        }
        let elapsed = start.elapsed().as_secs_f64().max(1e-9);
        progress.finish();
        if seen > 0 && !last_loss.is_finite() {
            return Err(TrainerError::Diverged(format!("mean loss is {last_loss}")));
        }
        let weights = to_parameter_vector(&self.trainable)?;
        weights.ensure_finite().map_err(|e| TrainerError::Diverged(e.to_string()))?;
        Ok(FitOutcome {
            weights,
            num_examples: seen,
            train_loss: if seen > 0 { last_loss } else { 0.0 },
            samples_per_second: seen as f64 / elapsed,
        })
    }

    /// Evaluates the current weights (after loading `global`, when given) on the held-out split.
    pub(crate) fn evaluate(&mut self, global: Option<&ParameterVector>) -> Result<EvalOutcome, TrainerError> {
        if let Some(global) = global {
            load_parameter_vector(&self.trainable, global)?;
        }
        let items: Vec<&Item> = self.eval.iter().collect();
        let (loss_sum, preds) = self.score(&items);
        let truth: Vec<usize> = items.iter().map(|i| i.label).collect();
        let n = items.len();
        Ok(EvalOutcome {
            num_examples: n as u64,
            loss: if n > 0 { loss_sum / n as f64 } else { 0.0 },
            accuracy: accuracy(&truth, &preds),
            macro_f1: macro_f1(&truth, &preds, self.labels.len()),
        })
    }

    /// Summed loss and arg-max predictions for `items`, in their order. Batches group similar
    /// lengths (less padding); results are put back in input order.
    fn score(&self, items: &[&Item]) -> (f64, Vec<usize>) {
        let order = by_length(items.iter().map(|i| i.enc.ids.len()));
        let mut preds = vec![0usize; items.len()];
        let mut loss = Tensor::zeros([], (Kind::Double, self.model.device()));
        tch::no_grad(|| {
            for chunk in order.chunks(self.options.eval_batch_size.max(1)) {
                let batch: Vec<&Item> = chunk.iter().map(|&i| items[i]).collect();
                let (input, labels) = self.labelled_batch(&batch);
                let logits = self.model.forward(&input, false).logits;
                loss += logits.cross_entropy_for_logits(&labels).to_kind(Kind::Double) * batch.len() as f64;
                let argmax: Vec<i64> =
                    Vec::try_from(&logits.argmax(-1, false).to_device(Device::Cpu)).unwrap_or_default();
                for (&i, p) in chunk.iter().zip(argmax) {
                    preds[i] = p as usize;
                }
            }
        });
        (f64::try_from(&loss).unwrap_or(f64::NAN), preds)
    }

    /// Class probabilities for `texts`, in input order.
    pub(crate) fn predict(&self, texts: &[String]) -> Result<Vec<Prediction>, TrainerError> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encoded = self.tokenizer.encode_all(&refs).map_err(|e| TrainerError::Failed(e.to_string()))?;
        let order = by_length(encoded.iter().map(|e| e.ids.len()));
        let mut out: Vec<Option<Prediction>> = (0..texts.len()).map(|_| None).collect();
        tch::no_grad(|| {
            for chunk in order.chunks(self.options.eval_batch_size.max(1)) {
                let encs: Vec<&Encoded> = chunk.iter().map(|&i| &encoded[i]).collect();
                let batch = EncodedBatch::collate(&encs, self.tokenizer.pad_id());
                let probs = self.model.forward(&self.input(&batch), false).logits.softmax(-1, Kind::Float);
                let flat: Vec<f32> =
                    Vec::try_from(&probs.to_device(Device::Cpu).view([-1])).unwrap_or_default();
                let k = self.labels.len();
                for (row, &i) in chunk.iter().enumerate() {
                    let probs = flat[row * k..(row + 1) * k].to_vec();
                    let label_id = argmax(&probs);
                    let label = self.labels.name(label_id).unwrap_or_default().to_string();
                    out[i] = Some(Prediction { label, label_id, probs });
                }
            }
        });
        out.into_iter()
            .map(|p| p.ok_or_else(|| TrainerError::Failed("a prediction is missing".into())))
            .collect()
    }

    /// Current values of the trainable tensors.
    pub(crate) fn trainable_weights(&self) -> Result<ParameterVector, TrainerError> {
        to_parameter_vector(&self.trainable)
    }

    /// Current values of every tensor (transformers' names).
    pub(crate) fn all_weights(&self) -> Result<ParameterVector, TrainerError> {
        to_parameter_vector(&self.model.named_variables())
    }

    /// Writes the model in transformers' layout ([`fedtune_shared::bert::export`]), a LoRA
    /// adapter merged into its base weights.
    pub(crate) fn export(&self, dir: &Path) -> Result<(), TrainerError> {
        use fedtune_shared::bert::export;
        let weights = self.all_weights()?;
        let config =
            serde_json::to_value(&self.model.config).map_err(|e| TrainerError::Failed(e.to_string()))?;
        let labels = self.labels.names();
        match &self.options.adapter {
            None => export::export_hf(dir, &config, labels, &weights, &self.source_dir),
            Some(lora) => export::export_hf_merged(dir, &config, labels, &weights, lora, &self.source_dir),
        }
        .map(drop)
        .map_err(|e| TrainerError::Failed(e.to_string()))
    }

    /// Writes the LoRA adapter and head as a `peft` adapter folder whose base model is the
    /// folder this trainer loaded.
    pub(crate) fn export_adapter(&self, dir: &Path) -> Result<(), TrainerError> {
        let lora = self
            .options
            .adapter
            .as_ref()
            .ok_or_else(|| TrainerError::Failed("the model has no LoRA adapter to export".into()))?;
        let weights = self.all_weights()?;
        let base = self.source_dir.display().to_string();
        fedtune_shared::bert::export::export_peft_adapter(dir, lora, self.labels.names(), &weights, &base)
            .map(drop)
            .map_err(|e| TrainerError::Failed(e.to_string()))
    }
}

/// The FedProx term's inputs: the trainable tensors, their values at the start of the fit, μ.
#[derive(Debug, Clone, Copy)]
pub struct Proximal<'a> {
    /// Trainable tensors (current values).
    pub trainable: &'a [(String, Tensor)],
    /// Their values when the fit started (the global model).
    pub anchor: &'a [Tensor],
    /// Coefficient μ of μ/2·‖w − w₀‖².
    pub mu: f64,
}

/// One optimizer step on a batch: forward with dropout, cross-entropy (+ FedProx), backward,
/// gradient clipping, learning rate, AdamW update. Returns the batch's mean cross-entropy
/// (detached, still on the device, so the caller decides when to sync). The training loop and
/// the throughput benchmark both run exactly this.
pub fn train_step(
    model: &BertClassifier,
    opt: &mut AdamW,
    input: &ModelInput,
    labels: &Tensor,
    lr: f64,
    max_grad_norm: f64,
    proximal: Option<Proximal<'_>>,
) -> Result<Tensor, TrainerError> {
    let logits = model.forward(input, true).logits;
    let ce = logits.cross_entropy_for_logits(labels);
    let loss = match proximal {
        Some(p) => &ce + proximal_term(p.trainable, p.anchor) * (p.mu / 2.0),
        None => ce.shallow_clone(),
    };
    let _grad_norm = opt
        .backward_step(&loss, lr, max_grad_norm)
        .map_err(|e| TrainerError::Failed(format!("optimizer step: {e}")))?;
    Ok(ce.detach())
}

/// Σ‖w − w₀‖² over the trainable tensors (FedProx).
fn proximal_term(trainable: &[(String, Tensor)], anchor: &[Tensor]) -> Tensor {
    trainable
        .iter()
        .zip(anchor)
        .map(|((_, w), w0)| (w - w0).square().sum(Kind::Float))
        .reduce(|a, b| a + b)
        .unwrap_or_else(|| Tensor::zeros([], (Kind::Float, Device::Cpu)))
}

/// Indices sorted by length (stable), so batches hold similar lengths.
fn by_length(lengths: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut order: Vec<(usize, usize)> = lengths.enumerate().collect();
    order.sort_by_key(|&(_, len)| len);
    order.into_iter().map(|(i, _)| i).collect()
}

fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best })
}

/// Labels, in order of preference: given explicitly, named by the model's config, found in the
/// data; otherwise transformers' placeholders for the config's class count.
fn choose_labels(options: &TrainerOptions, config: &BertConfig, dataset: Option<&Dataset>) -> LabelSet {
    if let Some(names) = &options.labels {
        return LabelSet::new(names.clone());
    }
    if let Some(names) = config.label_names() {
        return LabelSet::new(names);
    }
    if let Some(data) = dataset {
        let found = LabelSet::from_examples(&data.examples);
        if !found.is_empty() {
            return found;
        }
    }
    let n = config.num_labels.or(config.id2label.as_ref().map(|m| m.len())).unwrap_or(2);
    LabelSet::new((0..n).map(|i| format!("LABEL_{i}")).collect())
}
