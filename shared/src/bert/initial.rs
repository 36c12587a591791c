//! The initial model (version 0) of a federation: the one home of its construction.
//!
//! Version 0 is a deterministic function of a Hugging Face checkpoint folder, the label set,
//! `model.init_seed` and the LoRA adapter: the checkpoint's tensors under
//! `BertForSequenceClassification` names ([`super::checkpoint_name`]), a pooler and classifier
//! drawn from N(0, 0.02²) on a ChaCha20 stream seeded with `init_seed` where the checkpoint has
//! none, and, with LoRA, every adapter pair ([`LoraConfig::with_adapters`]: A from the seed, B
//! zero). The coordinator builds it to publish it; a client with the same folder builds it too
//! and skips the download of version 0 when the digest of its trainable tensors is the one the
//! coordinator announced. Both must run this very code: a second copy that drifted by one draw
//! would make every client download again.

use std::ops::Range;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::checkpoint_name;
use super::lora::{LoraConfig, LoraError};
use crate::params::{natural_cmp, Manifest, ParameterVector, ParamsError, TensorSpec};

/// Why the initial model cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum InitialError {
    /// Reading a file.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is unusable.
    #[error("{path}: {reason}")]
    Config {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint does not look like a BERT model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Parameter vectors or safetensors.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// The LoRA adapter does not fit the checkpoint.
    #[error("model.lora: {0}")]
    Adapter(#[from] LoraError),
}

/// The fields of a Hugging Face `config.json` the initial model needs; the full JSON is kept
/// for export.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// Width of the encoder.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// The parsed file.
    pub json: serde_json::Value,
}

impl HfConfig {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self, InitialError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| InitialError::Io { path: path.clone(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| InitialError::Config { path: path.clone(), reason: e.to_string() })?;
        let field = |k: &str| {
            json.get(k).and_then(serde_json::Value::as_u64).map(|v| v as usize).ok_or_else(|| {
                InitialError::Config { path: path.clone(), reason: format!("missing integer `{k}`") }
            })
        };
        Ok(Self { hidden_size: field("hidden_size")?, num_hidden_layers: field("num_hidden_layers")?, json })
    }

    /// Label names from `id2label`, ordered by id, if present and complete.
    pub fn labels(&self) -> Option<Vec<String>> {
        let map = self.json.get("id2label")?.as_object()?;
        let mut labels = vec![None; map.len()];
        for (k, v) in map {
            let i: usize = k.parse().ok()?;
            *labels.get_mut(i)? = Some(v.as_str()?.to_string());
        }
        labels.into_iter().collect()
    }
}

/// What besides the checkpoint folder decides version 0.
#[derive(Debug, Clone, Copy)]
pub struct InitialSpec<'a> {
    /// Class names; empty: taken from `config.json` `id2label`, or `LABEL_i` for
    /// `num_labels` (or the checkpoint's classifier's) classes. A client passes the labels the
    /// coordinator sent, so both sides size the head alike.
    pub labels: &'a [String],
    /// Number of classes when `labels` is empty and the checkpoint has no classifier.
    pub num_labels: Option<usize>,
    /// Seed of the head's initialisation (and, through `lora`, of LoRA's A).
    pub init_seed: u64,
    /// The adapter, if the federation trains one.
    pub lora: Option<&'a LoraConfig>,
}

/// The initial model and what was decided while building it.
#[derive(Debug)]
pub struct InitialModel {
    /// All tensors, HF names, in [`natural_cmp`] order.
    pub params: ParameterVector,
    /// Class names.
    pub labels: Vec<String>,
    /// The checkpoint's config.
    pub config: HfConfig,
    /// Tensors that were missing and initialised (pooler, classifier).
    pub initialised: Vec<String>,
}

/// Standard deviation of the head initialisation (BERT's `initializer_range`).
const INIT_STD: f64 = 0.02;

/// Builds version 0 from the checkpoint folder `dir` (see the module docs).
pub fn load_initial(dir: &Path, spec: &InitialSpec<'_>) -> Result<InitialModel, InitialError> {
    let config = HfConfig::read(dir)?;
    let path = dir.join("model.safetensors");
    let raw = ParameterVector::load_safetensors(&path, |n| checkpoint_name(n).is_some())?;
    let (manifest, values) = raw.into_parts();
    let mut tensors: Vec<(TensorSpec, Range<usize>)> = Vec::new();
    let mut offset = 0;
    for t in manifest.tensors {
        let n = t.numel();
        let name = checkpoint_name(&t.name).expect("filtered above");
        tensors.push((TensorSpec { name, shape: t.shape }, offset..offset + n));
        offset += n;
    }
    if !tensors.iter().any(|(t, _)| t.name.starts_with("bert.encoder.layer.")) {
        return Err(InitialError::Checkpoint {
            path,
            reason: "no `encoder.layer.*` tensors: not a BERT checkpoint".into(),
        });
    }
    let h = config.hidden_size;
    // Labels: the spec, then a classifier already in the checkpoint, then config.json.
    let ckpt_labels = tensors.iter().find(|(t, _)| t.name == "classifier.weight").map(|(t, _)| t.shape[0]);
    let labels = if !spec.labels.is_empty() {
        spec.labels.to_vec()
    } else if let Some(l) =
        config.labels().filter(|l| ckpt_labels.is_none_or(|n| n == l.len()) && l.len() >= 2)
    {
        l
    } else if let Some(n) = spec.num_labels.or(ckpt_labels) {
        (0..n).map(|i| format!("LABEL_{i}")).collect()
    } else {
        return Err(InitialError::Config {
            path: dir.join("config.json"),
            reason: "cannot tell the number of labels: set model.labels or model.num_labels".into(),
        });
    };
    if let Some(n) = ckpt_labels {
        if n != labels.len() {
            return Err(InitialError::Checkpoint {
                path,
                reason: format!("its classifier has {n} outputs but {} labels are configured", labels.len()),
            });
        }
    }
    let mut rng = ChaCha20Rng::seed_from_u64(spec.init_seed);
    let mut out_specs = Vec::new();
    let mut out_values: Vec<f32> = Vec::with_capacity(values.len());
    let mut initialised = Vec::new();
    let mut extra: Vec<(TensorSpec, Vec<f32>)> = Vec::new();
    // Fixed order, so the same seed always gives the same weights.
    for (name, shape, normal) in [
        ("bert.pooler.dense.weight", vec![h, h], true),
        ("bert.pooler.dense.bias", vec![h], false),
        ("classifier.weight", vec![labels.len(), h], true),
        ("classifier.bias", vec![labels.len()], false),
    ] {
        if tensors.iter().any(|(t, _)| t.name == name) {
            continue;
        }
        let n: usize = shape.iter().product();
        let v = if normal { (0..n).map(|_| normal_sample(&mut rng) as f32).collect() } else { vec![0.0; n] };
        initialised.push(name.to_string());
        extra.push((TensorSpec { name: name.into(), shape }, v));
    }
    // Sort by name like load_safetensors does, so the layout is stable across restarts.
    // Each tensor's values: a range of the checkpoint buffer, or freshly initialised ones.
    type Source = Result<Range<usize>, Vec<f32>>;
    let mut all: Vec<(TensorSpec, Source)> = tensors
        .into_iter()
        .map(|(t, r)| (t, Ok(r)))
        .chain(extra.into_iter().map(|(t, v)| (t, Err(v))))
        .collect();
    all.sort_by(|a, b| natural_cmp(&a.0.name, &b.0.name));
    for (spec, src) in all {
        match src {
            Ok(r) => out_values.extend_from_slice(&values[r]),
            Err(v) => out_values.extend_from_slice(&v),
        }
        out_specs.push(spec);
    }
    let mut params = ParameterVector::new(Manifest::new(out_specs)?, out_values)?;
    if let Some(lora) = spec.lora {
        params = lora.with_adapters(params)?;
    }
    Ok(InitialModel { params, labels, config, initialised })
}

/// The values of `trainable`'s tensors taken from `params`, as their own vector (the layout a
/// download of the trainable scope has).
pub fn select(params: &ParameterVector, trainable: &Manifest) -> Result<ParameterVector, ParamsError> {
    let mut values = Vec::with_capacity(trainable.numel());
    for t in &trainable.tensors {
        let v = params.tensor(&t.name).ok_or_else(|| {
            ParamsError::ManifestMismatch(format!("the local model has no tensor `{}`", t.name))
        })?;
        values.extend_from_slice(v);
    }
    ParameterVector::new(trainable.clone(), values)
}

/// One draw from N(0, 0.02²) by Box–Muller on a seeded ChaCha20 stream.
fn normal_sample(rng: &mut ChaCha20Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.random();
    INIT_STD * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
