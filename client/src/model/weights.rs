//! Moving weights between Hugging Face checkpoints and a [`tch::nn::VarStore`].
//!
//! Variable paths equal transformers' `BertForSequenceClassification` keys (`bert.…`,
//! `classifier.…`). Checkpoints saved from a bare `BertModel` (sentence-transformers models such
//! as all-MiniLM-L6-v2) lack the `bert.` prefix and the classifier; both layouts load. What the
//! checkpoint lacks is initialized as transformers' `_init_weights` does (normal(0,
//! `initializer_range`) for linear and embedding weights, zero biases, LayerNorm 1/0, zero
//! padding row), from a fixed seed and in name order, so a run is reproducible.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use fedtune_shared::bert::lora::{lora_part, LoraConfig, LoraPart};
use fedtune_shared::bert::{checkpoint_name, is_buffer};
use tch::{nn::VarStore, Tensor};

use super::config::BertConfig;

/// Errors while loading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The safetensors file could not be read.
    #[error("{path}: {reason}")]
    Read {
        /// File involved.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A tensor's shape differs from the model's.
    #[error("{path}: tensor `{name}` has shape {found:?} but the model expects {expected:?}")]
    Shape {
        /// File involved.
        path: String,
        /// Checkpoint key.
        name: String,
        /// Shape in the file.
        found: Vec<i64>,
        /// Shape of the model variable.
        expected: Vec<i64>,
    },
    /// The file shares no tensor with the model: almost certainly not a BERT checkpoint.
    #[error("{path}: no tensor in the file matches a BERT variable (is it a BERT checkpoint?)")]
    NothingMatched {
        /// File involved.
        path: String,
    },
}

/// What a load did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables filled from the checkpoint.
    pub loaded: Vec<String>,
    /// Variables the checkpoint lacks (they keep or get their initial values).
    pub missing: Vec<String>,
    /// Checkpoint tensors the model has no place for (e.g. a pre-training head).
    pub unused: Vec<String>,
}

/// The order of manifests and exports, shared with the coordinator.
pub use fedtune_shared::params::natural_cmp;

/// All variables of `vs` in natural name order.
pub fn named_variables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    vars
}

/// Fills the variables of `vs` from a safetensors checkpoint, accepting any key that
/// [`checkpoint_name`] maps to a variable (with or without the `bert.` prefix, old
/// `LayerNorm.gamma/beta`), converting any float dtype to the variable's. Variables it lacks are
/// left alone (see [`init_missing`]).
pub fn load_checkpoint(vs: &VarStore, path: &Path) -> Result<LoadReport, WeightsError> {
    let shown = path.display().to_string();
    let tensors = Tensor::read_safetensors(path)
        .map_err(|e| WeightsError::Read { path: shown.clone(), reason: e.to_string() })?;
    let by_name: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let by_model_name: BTreeMap<String, &String> =
        by_name.keys().filter_map(|k| Some((checkpoint_name(k)?, k))).collect();
    let mut used = HashSet::new();
    let mut report = LoadReport::default();
    tch::no_grad(|| -> Result<(), WeightsError> {
        for (name, mut var) in named_variables(vs) {
            // The exact name first: a file holding both `bert.x` and `x` means `bert.x`.
            let key = if by_name.contains_key(&name) {
                Some(name.clone())
            } else {
                by_model_name.get(&name).map(|k| (*k).clone())
            };
            let Some(key) = key else {
                report.missing.push(name);
                continue;
            };
            let src = &by_name[&key];
            if src.size() != var.size() {
                return Err(WeightsError::Shape {
                    path: shown.clone(),
                    name: key,
                    found: src.size(),
                    expected: var.size(),
                });
            }
            var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
            used.insert(key);
            report.loaded.push(name);
        }
        Ok(())
    })?;
    if report.loaded.is_empty() {
        return Err(WeightsError::NothingMatched { path: shown });
    }
    report.unused = by_name.keys().filter(|k| !used.contains(*k) && !is_buffer(k)).cloned().collect();
    Ok(report)
}

/// Initializes the named variables as transformers' `_init_weights` would, drawing from
/// `seed` in natural name order (so the values depend only on the seed, the names and shapes).
///
/// The draws come from a generator private to this call, not libtorch's process-wide one: any
/// other thread drawing random numbers (dropout in a concurrent trainer, another test) between
/// seeding and drawing would otherwise change the values, and every client must start from the
/// same head.
pub fn init_missing(vs: &VarStore, names: &[String], config: &BertConfig, seed: u64) {
    use rand::{Rng, SeedableRng};
    let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sd = config.initializer_range;
    // Box–Muller: two uniforms in (0, 1] give one normal deviate.
    let mut normal = move || {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * sd) as f32
    };
    tch::no_grad(|| {
        for (name, mut var) in named_variables(vs) {
            if !wanted.contains(name.as_str()) {
                continue;
            }
            if name.ends_with("LayerNorm.weight") {
                let _ = var.fill_(1.0);
            } else if name.ends_with(".bias") {
                let _ = var.zero_();
            } else {
                // Draw on the CPU in f32 so that the values do not depend on the device.
                let numel: i64 = var.size().iter().product();
                let values: Vec<f32> = (0..numel).map(|_| normal()).collect();
                let drawn = Tensor::from_slice(&values).view(var.size().as_slice());
                var.copy_(&drawn.to_kind(var.kind()).to_device(var.device()));
                if name.ends_with("word_embeddings.weight")
                    && config.pad_token_id >= 0
                    && config.pad_token_id < var.size()[0]
                {
                    let _ = var.get(config.pad_token_id).zero_();
                }
            }
        }
    });
}

/// Whether a variable belongs to a LoRA adapter (filled by [`init_adapters`], never by
/// [`init_missing`] or from a base checkpoint).
pub fn is_adapter(name: &str) -> bool {
    lora_part(name).is_some()
}

/// Sets the adapter tensors named in `names` as the federation starts them: each `lora_A`
/// from [`LoraConfig::init_a`] (the values the coordinator holds, bit for bit), each `lora_B`
/// zero.
pub fn init_adapters(vs: &VarStore, names: &[String], lora: &LoraConfig) {
    let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
    tch::no_grad(|| {
        for (name, mut var) in named_variables(vs) {
            if !wanted.contains(name.as_str()) {
                continue;
            }
            match lora_part(&name) {
                Some((_, LoraPart::A)) => {
                    let shape: Vec<usize> = var.size().iter().map(|&d| d as usize).collect();
                    let values = lora.init_a(&name, &shape);
                    let drawn = Tensor::from_slice(&values).view(var.size().as_slice());
                    var.copy_(&drawn.to_kind(var.kind()).to_device(var.device()));
                }
                Some((_, LoraPart::B)) => {
                    let _ = var.zero_();
                }
                None => {}
            }
        }
    });
}
