//! BERT for sequence classification on tch, laid out like Hugging Face transformers.
//!
//! Module paths equal checkpoint keys (`bert.encoder.layer.0.attention.self.query.weight`), so
//! loading a transformers checkpoint and exporting one are rename-free. [`BertClassifier`]
//! bundles a model with its variable store, configuration and precision; it is what the trainer
//! and the `eval`/`predict` commands use.
//!
//! - [`config`]: `BertConfig` from `config.json`.
//! - [`layers`]: linear/LayerNorm/embedding/dropout and the mixed-precision policy.
//! - [`embeddings`], [`encoder`], [`bert`]: the blocks, one struct per transformers module.
//! - [`weights`]: checkpoint loading, transformers-style initialization, name order.

pub mod bert;
pub mod config;
pub mod embeddings;
pub mod encoder;
pub mod layers;
pub mod weights;

use std::path::{Path, PathBuf};

use tch::{nn::VarStore, Device, Tensor};

pub use bert::{BertForSequenceClassification, ClassifierOutput, ModelInput};
pub use config::{BertConfig, ConfigError};
pub use layers::Precision;
pub use weights::{LoadReport, WeightsError};

/// Errors from opening a model folder.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `model.safetensors` is missing, unreadable or does not fit the config.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// A required file is absent.
    #[error("{0} not found (a model folder holds config.json and model.safetensors)")]
    MissingFile(String),
}

/// A classifier with its variables: the unit the trainer, `eval` and `predict` work with.
#[derive(Debug)]
pub struct BertClassifier {
    /// Owns every variable (names as in transformers).
    pub vs: VarStore,
    /// The network.
    pub model: BertForSequenceClassification,
    /// The configuration it was built from (labels included once known).
    pub config: BertConfig,
    /// How matrix products are computed.
    pub precision: Precision,
}

impl BertClassifier {
    /// A model with every variable initialized from `seed` (no checkpoint): for benchmarks
    /// and tests.
    pub fn random(config: &BertConfig, num_labels: usize, device: Device, seed: u64) -> Self {
        let vs = VarStore::new(device);
        let model = BertForSequenceClassification::new(&vs.root(), config, num_labels);
        let (adapters, names): (Vec<String>, Vec<String>) =
            weights::named_variables(&vs).into_iter().map(|(n, _)| n).partition(|n| weights::is_adapter(n));
        weights::init_missing(&vs, &names, config, seed);
        if let Some(lora) = &config.lora {
            weights::init_adapters(&vs, &adapters, lora);
        }
        Self { vs, model, config: config.clone(), precision: Precision::F32 }
    }

    /// Loads `dir/config.json` and `dir/model.safetensors`, with `num_labels` classes. Tensors
    /// the checkpoint lacks (pooler, classifier) are initialized from `init_seed`; adapters
    /// (`config.lora`) as the federation starts them (`weights::init_adapters`).
    pub fn load(
        dir: &Path,
        num_labels: usize,
        device: Device,
        init_seed: u64,
    ) -> Result<(Self, LoadReport), ModelError> {
        let config = BertConfig::from_file(&required(dir, "config.json")?)?;
        Self::load_with_config(dir, config, num_labels, device, init_seed)
    }

    /// Like [`BertClassifier::load`] with an already-read config.
    pub fn load_with_config(
        dir: &Path,
        config: BertConfig,
        num_labels: usize,
        device: Device,
        init_seed: u64,
    ) -> Result<(Self, LoadReport), ModelError> {
        let weights_path = required(dir, "model.safetensors")?;
        let vs = VarStore::new(device);
        let model = BertForSequenceClassification::new(&vs.root(), &config, num_labels);
        let mut report = weights::load_checkpoint(&vs, &weights_path)?;
        // Adapters a base checkpoint lacks start as the adapter description says, never from
        // the head's seed.
        let (adapters, missing) = report.missing.into_iter().partition(|n| weights::is_adapter(n));
        report.missing = missing;
        weights::init_missing(&vs, &report.missing, &config, init_seed);
        if let Some(lora) = &config.lora {
            weights::init_adapters(&vs, &adapters, lora);
        }
        Ok((Self { vs, model, config, precision: Precision::F32 }, report))
    }

    /// Runs the model on a batch.
    pub fn forward(&self, input: &ModelInput, train: bool) -> ClassifierOutput {
        self.model.forward(input, train, self.precision)
    }

    /// Every variable in natural name order.
    pub fn named_variables(&self) -> Vec<(String, Tensor)> {
        weights::named_variables(&self.vs)
    }

    /// The device the variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

fn required(dir: &Path, file: &str) -> Result<PathBuf, ModelError> {
    let path = dir.join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelError::MissingFile(path.display().to_string()))
    }
}
