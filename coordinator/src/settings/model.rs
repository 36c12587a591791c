//! The `[model]` and `[model.lora]` sections: the initial model, its labels and which tensors
//! clients train.
//!
//! ```toml
//! [model]
//! init_dir = "/models/bert-base-uncased"
//! labels = ["negative", "positive"]
//! adapter = "lora"
//! [model.lora]
//! rank = 8
//! ```

use std::path::PathBuf;

use fedtune_shared::bert::lora::{LoraConfig, LoraError};
use fedtune_shared::compression::DownloadEncoding;
use fedtune_shared::settings::SettingsError;
use serde::{Deserialize, Serialize};

/// The initial model and the trainable subset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Hugging Face checkpoint directory (`model.safetensors`, `config.json`, tokenizer files).
    pub init_dir: PathBuf,
    /// Class names (index = class id). Empty: taken from `config.json` `id2label`, or
    /// `LABEL_i` for `num_labels` classes.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Number of classes when `labels` is empty and the checkpoint has no classifier.
    #[serde(default)]
    pub num_labels: Option<usize>,
    /// Seed of the classifier (and pooler, if missing) initialisation; recorded in the state dir.
    #[serde(default = "default_init_seed")]
    pub init_seed: u64,
    /// Train only the top k encoder layers (plus pooler and classifier; embeddings frozen).
    /// Absent: all layers.
    #[serde(default)]
    pub train_top_layers: Option<usize>,
    /// Keep the embeddings frozen (implied by `train_top_layers`).
    #[serde(default)]
    pub freeze_embeddings: bool,
    /// `"none"` (default): train the scope above. `"lora"`: train LoRA adapters (`[model.lora]`)
    /// and the head only, every base weight frozen.
    #[serde(default)]
    pub adapter: AdapterKind,
    /// The LoRA adapter, used when `adapter = "lora"`.
    #[serde(default)]
    pub lora: LoraSettings,
    /// How versions after the first reach clients that hold the previous one: `"f32"`
    /// (default) sends the weights; `"int8_delta"` publishes each version as the previous one
    /// plus its 8-bit quantized step and sends only that step (about a quarter of the bytes;
    /// `fedtune_shared::compression::apply_delta`). Post-processing of the aggregate, so it
    /// changes no privacy guarantee.
    #[serde(default)]
    pub download_encoding: DownloadEncoding,
}

impl ModelSettings {
    /// Checks the section on its own (files present, label counts, the adapter's shape); the
    /// error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let m = self;
        for f in ["config.json", "model.safetensors"] {
            if !m.init_dir.join(f).is_file() {
                return Err(SettingsError::invalid(
                    "model.init_dir",
                    format!("{} has no {f}", m.init_dir.display()),
                ));
            }
        }
        if m.num_labels == Some(0) || m.num_labels == Some(1) {
            return Err(SettingsError::invalid("model.num_labels", "a classifier needs at least 2 labels"));
        }
        if !m.labels.is_empty() {
            if m.labels.len() < 2 {
                return Err(SettingsError::invalid("model.labels", "a classifier needs at least 2 labels"));
            }
            if m.num_labels.is_some_and(|n| n != m.labels.len()) {
                return Err(SettingsError::invalid(
                    "model.num_labels",
                    "disagrees with the number of model.labels",
                ));
            }
        }
        if m.train_top_layers == Some(0) {
            return Err(SettingsError::invalid(
                "model.train_top_layers",
                "must be at least 1 (omit it to train all layers)",
            ));
        }
        if let Some(lora) = m.lora_config(m.init_seed) {
            if m.train_top_layers.is_some() || m.freeze_embeddings {
                return Err(SettingsError::invalid(
                    "model.adapter",
                    "a LoRA adapter freezes every base tensor; leave model.train_top_layers and \
                 model.freeze_embeddings unset",
                ));
            }
            match lora.validate() {
                Err(LoraError::Invalid { field, reason }) => {
                    return Err(SettingsError::invalid(format!("model.lora.{field}"), reason));
                }
                Err(e) => return Err(SettingsError::invalid("model.lora", e.to_string())),
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// The adapter description when `adapter = "lora"`, with A seeded by `seed` (the
    /// federation's recorded `init_seed`).
    pub fn lora_config(&self, seed: u64) -> Option<LoraConfig> {
        (self.adapter == AdapterKind::Lora).then(|| LoraConfig {
            rank: self.lora.rank,
            alpha: self.lora.alpha,
            dropout: self.lora.dropout,
            target_modules: self.lora.target_modules.clone(),
            seed,
        })
    }
}

/// Which adapter, if any, a federation trains (`model.adapter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Fine-tune the base tensors of the train scope.
    #[default]
    None,
    /// LoRA (FFA-LoRA: A frozen and shared, B and the head trained; `fedtune_shared::bert::lora`).
    Lora,
}

/// `[model.lora]`: the adapter's shape (peft's `LoraConfig` fields of the same meaning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSettings {
    /// Rank r.
    pub rank: usize,
    /// Scale numerator: the adapter adds `(alpha / rank)·B·A`.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Module-name suffixes that get an adapter.
    pub target_modules: Vec<String>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        use fedtune_shared::bert::lora;
        Self {
            rank: lora::DEFAULT_RANK,
            alpha: lora::DEFAULT_ALPHA,
            dropout: lora::DEFAULT_DROPOUT,
            target_modules: lora::DEFAULT_TARGETS.map(String::from).to_vec(),
        }
    }
}

pub(super) fn default_init_seed() -> u64 {
    42
}
