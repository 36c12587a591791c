//! The global model as the coordinator holds it: every tensor of a BERT sequence classifier as
//! named f32 values (no libtorch), the split into trainable and frozen tensors, the initial model
//! built from a Hugging Face checkpoint, and export back to a Hugging Face directory.
//!
//! # Names
//! Tensors carry the names `BertForSequenceClassification` uses (`bert.…`, `classifier.…`), so
//! a checkpoint written here loads in transformers unchanged; checkpoint names are mapped onto
//! them by [`fedtune_shared::bert::checkpoint_name`].
//!
//! # Trainable part
//! Clients train and upload only the trainable tensors, chosen by the one rule both sides share
//! ([`fedtune_shared::bert::TrainScope`]: pooler and classifier always; the top
//! `train_top_layers` encoder layers or all; embeddings only when all layers train and they are
//! not frozen; tensors of unknown names never). Frozen tensors never change, so a client
//! downloads the full model once and only the trainable part per version.
//!
//! # LoRA
//! With `model.adapter = "lora"` the initial model gets every adapter pair
//! ([`fedtune_shared::bert::lora::LoraConfig::with_adapters`]: A seeded from `init_seed`, B
//! zero), checkpoints keep them, and the trainable part is every `lora_B` plus the head. Export
//! writes the adapters merged (a plain classifier) and, next to it, as a `peft` adapter.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedtune_shared::bert::lora::{LoraConfig, LoraError};
use fedtune_shared::bert::{checkpoint_name, export, TrainScope};
use fedtune_shared::chunk::PayloadView;
use fedtune_shared::ids::{ModelVersion, Sha256};
use fedtune_shared::params::{natural_cmp, Manifest, ParameterVector, ParamsError, TensorSpec};
use fedtune_shared::round::{ModelRef, ModelScope};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::settings::{AdapterKind, ModelSettings};

/// Errors building, loading or exporting models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading or writing a file.
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
    /// Parameter vectors or safetensors.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// Writing a Hugging Face export.
    #[error("export: {0}")]
    Export(#[from] export::ExportError),
    /// The LoRA adapter does not fit the checkpoint.
    #[error("model.lora: {0}")]
    Adapter(#[from] LoraError),
    /// The checkpoint does not look like a BERT model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The fields of a Hugging Face `config.json` the coordinator needs; the full JSON is kept
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
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { path: path.clone(), reason: e.to_string() })?;
        let field = |k: &str| {
            json.get(k).and_then(serde_json::Value::as_u64).map(|v| v as usize).ok_or_else(|| {
                ModelError::Config { path: path.clone(), reason: format!("missing integer `{k}`") }
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

/// Where the trainable tensors lie inside the full parameter vector.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainableLayout {
    /// Every tensor, in the full vector's order.
    pub full: Manifest,
    /// The trainable tensors, in the same relative order (upload order).
    pub trainable: Manifest,
    /// Value ranges of the trainable tensors in the full vector.
    pub segments: Vec<Range<usize>>,
}

impl TrainableLayout {
    /// Splits `full` by a name predicate.
    pub fn new(full: Manifest, is_trainable: impl Fn(&str) -> bool) -> Self {
        let trainable = full.subset(&is_trainable);
        let segments = full.ranges().filter(|(t, _)| is_trainable(&t.name)).map(|(_, r)| r).collect();
        Self { full, trainable, segments }
    }

    /// The trainable values of `full` as their own vector.
    pub fn extract(&self, full: &ParameterVector) -> ParameterVector {
        let mut values = Vec::with_capacity(self.trainable.numel());
        for r in &self.segments {
            values.extend_from_slice(&full.values()[r.clone()]);
        }
        ParameterVector::new(self.trainable.clone(), values).expect("segments match the trainable manifest")
    }

    /// Writes trainable values back into a full vector.
    pub fn write_back(&self, full: &mut ParameterVector, trainable: &[f32]) {
        let mut at = 0;
        let dst = full.values_mut();
        for r in &self.segments {
            dst[r.clone()].copy_from_slice(&trainable[at..at + r.len()]);
            at += r.len();
        }
    }
}

/// The selection rule for trainable tensors: [`fedtune_shared::bert::TrainScope`] with the
/// model settings, for a checkpoint of `num_layers` encoder layers.
/// With a LoRA adapter the rule is [`LoraConfig::trains`] (every `lora_B` and the head).
pub fn trainable_rule(settings: &ModelSettings, num_layers: usize) -> impl Fn(&str) -> bool + Clone {
    let scope = TrainScope {
        train_top_layers: settings.train_top_layers,
        freeze_embeddings: settings.freeze_embeddings,
    };
    let lora = settings.adapter == AdapterKind::Lora;
    move |name: &str| if lora { LoraConfig::trains(name) } else { scope.trains(name, num_layers) }
}

/// A published version of the global model. Immutable; shared with downloads through `Arc`.
#[derive(Debug)]
pub struct GlobalModel {
    /// Version.
    pub version: ModelVersion,
    /// All tensors.
    pub params: ParameterVector,
    /// Trainable split.
    pub layout: Arc<TrainableLayout>,
    /// Digests clients check.
    pub model_ref: ModelRef,
}

impl GlobalModel {
    /// Wraps a full vector, computing its digests (a pass over the payload; call off the reactor
    /// for large models).
    pub fn new(version: ModelVersion, params: ParameterVector, layout: Arc<TrainableLayout>) -> Self {
        let full_payload = PayloadView::whole(params.values()).digest();
        let trainable_payload = PayloadView::segments(params.values(), layout.segments.clone()).digest();
        let model_ref = ModelRef {
            version,
            full_manifest: Sha256(layout.full.digest()),
            full_payload,
            trainable_manifest: Sha256(layout.trainable.digest()),
            trainable_payload,
        };
        Self { version, params, layout, model_ref }
    }

    /// The payload of a scope, read lazily from the full vector.
    pub fn payload(&self, scope: ModelScope) -> PayloadView<'_> {
        match scope {
            ModelScope::Full => PayloadView::whole(self.params.values()),
            ModelScope::Trainable => {
                PayloadView::segments(self.params.values(), self.layout.segments.clone())
            }
        }
    }

    /// Manifest of a scope.
    pub fn manifest(&self, scope: ModelScope) -> &Manifest {
        match scope {
            ModelScope::Full => &self.layout.full,
            ModelScope::Trainable => &self.layout.trainable,
        }
    }

    /// Payload digest of a scope.
    pub fn digest(&self, scope: ModelScope) -> Sha256 {
        match scope {
            ModelScope::Full => self.model_ref.full_payload,
            ModelScope::Trainable => self.model_ref.trainable_payload,
        }
    }
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

/// Builds the initial global model from `settings.init_dir` (see the module docs).
pub fn load_initial(settings: &ModelSettings) -> Result<InitialModel, ModelError> {
    let config = HfConfig::read(&settings.init_dir)?;
    let path = settings.init_dir.join("model.safetensors");
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
        return Err(ModelError::Checkpoint {
            path,
            reason: "no `encoder.layer.*` tensors: not a BERT checkpoint".into(),
        });
    }
    let h = config.hidden_size;
    // Labels: settings, then a classifier already in the checkpoint, then config.json.
    let ckpt_labels = tensors.iter().find(|(t, _)| t.name == "classifier.weight").map(|(t, _)| t.shape[0]);
    let labels = if !settings.labels.is_empty() {
        settings.labels.clone()
    } else if let Some(l) =
        config.labels().filter(|l| ckpt_labels.is_none_or(|n| n == l.len()) && l.len() >= 2)
    {
        l
    } else if let Some(n) = settings.num_labels.or(ckpt_labels) {
        (0..n).map(|i| format!("LABEL_{i}")).collect()
    } else {
        return Err(ModelError::Config {
            path: settings.init_dir.join("config.json"),
            reason: "cannot tell the number of labels: set model.labels or model.num_labels".into(),
        });
    };
    if let Some(n) = ckpt_labels {
        if n != labels.len() {
            return Err(ModelError::Checkpoint {
                path,
                reason: format!("its classifier has {n} outputs but {} labels are configured", labels.len()),
            });
        }
    }
    let mut rng = ChaCha20Rng::seed_from_u64(settings.init_seed);
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
    if let Some(lora) = settings.lora_config(settings.init_seed) {
        params = lora.with_adapters(params)?;
    }
    Ok(InitialModel { params, labels, config, initialised })
}

/// One draw from N(0, 0.02²) by Box–Muller on a seeded ChaCha20 stream.
fn normal_sample(rng: &mut ChaCha20Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.random();
    INIT_STD * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Writes a Hugging Face `BertForSequenceClassification` directory `out` from `params` with
/// the config and tokenizer files of `init_dir` ([`fedtune_shared::bert::export`]).
///
/// With a LoRA adapter (`lora`) the folder holds the merged weights, and `out` + `-adapter`
/// (`…/model-adapter` next to `…/model`) the adapter in `peft`'s layout, whose base model is
/// `init_dir`.
pub fn export_hf(
    params: &ParameterVector,
    labels: &[String],
    init_dir: &Path,
    out: &Path,
    lora: Option<&LoraConfig>,
) -> Result<Vec<PathBuf>, ModelError> {
    let config = HfConfig::read(init_dir)?;
    let Some(lora) = lora else {
        return Ok(export::export_hf(out, &config.json, labels, params, init_dir)?);
    };
    let mut written = export::export_hf_merged(out, &config.json, labels, params, lora, init_dir)?;
    let base = init_dir.display().to_string();
    written.extend(export::export_peft_adapter(&adapter_dir(out), lora, labels, params, &base)?);
    Ok(written)
}

/// The state database's meta key recording a federation's adapter ([`adapter_meta`]).
pub const ADAPTER_META_KEY: &str = "adapter";

/// The recorded form of a federation's adapter: `none`, or the [`LoraConfig`] as JSON.
pub fn adapter_meta(lora: Option<&LoraConfig>) -> String {
    lora.map_or_else(|| "none".to_string(), |l| serde_json::json!(l).to_string())
}

/// The adapter a state directory records (absent: none, as before adapters existed).
pub fn recorded_adapter(meta: Option<&str>) -> Result<Option<LoraConfig>, String> {
    match meta {
        None | Some("none") => Ok(None),
        Some(json) => serde_json::from_str(json).map(Some).map_err(|e| format!("meta `adapter`: {e}")),
    }
}

/// Where [`export_hf`] writes the adapter of a LoRA model exported to `out`.
pub fn adapter_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "model".into());
    name.push("-adapter");
    out.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BERT-like checkpoint without the `bert.` prefix, pooler or classifier.
    fn write_base_checkpoint(dir: &Path, layers: usize, h: usize) {
        let mut specs = vec![
            TensorSpec { name: "embeddings.word_embeddings.weight".into(), shape: vec![10, h] },
            TensorSpec { name: "embeddings.position_ids".into(), shape: vec![1, 8] },
            TensorSpec { name: "embeddings.LayerNorm.gamma".into(), shape: vec![h] },
        ];
        for l in 0..layers {
            specs.push(TensorSpec {
                name: format!("encoder.layer.{l}.output.dense.weight"),
                shape: vec![h, h],
            });
        }
        specs.push(TensorSpec { name: "cls.predictions.bias".into(), shape: vec![10] });
        let m = Manifest::new(specs).unwrap();
        let n = m.numel();
        ParameterVector::new(m, (0..n).map(|i| i as f32 * 1e-3).collect())
            .unwrap()
            .save_safetensors(&dir.join("model.safetensors"))
            .unwrap();
        std::fs::write(
            dir.join("config.json"),
            format!(r#"{{"hidden_size": {h}, "num_hidden_layers": {layers}, "id2label": {{"0": "neg", "1": "pos"}}}}"#),
        )
        .unwrap();
        std::fs::write(dir.join("vocab.txt"), "[PAD]\n").unwrap();
    }

    fn settings(dir: &Path) -> ModelSettings {
        ModelSettings {
            init_dir: dir.into(),
            labels: vec![],
            num_labels: None,
            init_seed: 7,
            train_top_layers: Some(1),
            freeze_embeddings: true,
            adapter: AdapterKind::None,
            lora: crate::settings::LoraSettings::default(),
        }
    }

    #[test]
    fn a_lora_model_trains_only_b_and_the_head_and_starts_equal_to_its_base() {
        let d = tempfile::tempdir().unwrap();
        write_base_checkpoint(d.path(), 2, 4);
        let lora = ModelSettings {
            train_top_layers: None,
            freeze_embeddings: false,
            adapter: AdapterKind::Lora,
            lora: crate::settings::LoraSettings {
                target_modules: vec!["output.dense".into()],
                rank: 2,
                ..Default::default()
            },
            ..settings(d.path())
        };
        let plain = load_initial(&ModelSettings { adapter: AdapterKind::None, ..lora.clone() }).unwrap();
        let m = load_initial(&lora).unwrap();
        let layout = TrainableLayout::new(m.params.manifest().clone(), trainable_rule(&lora, 2));
        let trained: Vec<&str> = layout.trainable.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            trained,
            [
                "bert.encoder.layer.0.output.dense.lora_B.weight",
                "bert.encoder.layer.1.output.dense.lora_B.weight",
                "bert.pooler.dense.bias",
                "bert.pooler.dense.weight",
                "classifier.bias",
                "classifier.weight",
            ]
        );
        let a = m.params.tensor("bert.encoder.layer.1.output.dense.lora_A.weight").unwrap();
        assert_eq!(a.len(), 8);
        let merged = lora.lora_config(lora.init_seed).unwrap().merge(&m.params).unwrap();
        assert_eq!(merged, plain.params, "B = 0: the adapted model is its base");
    }

    #[test]
    fn a_base_checkpoint_becomes_a_full_classifier_with_hf_names() {
        let d = tempfile::tempdir().unwrap();
        write_base_checkpoint(d.path(), 2, 4);
        let m = load_initial(&settings(d.path())).unwrap();
        let names: Vec<&str> = m.params.manifest().tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bert.embeddings.LayerNorm.weight",
                "bert.embeddings.word_embeddings.weight",
                "bert.encoder.layer.0.output.dense.weight",
                "bert.encoder.layer.1.output.dense.weight",
                "bert.pooler.dense.bias",
                "bert.pooler.dense.weight",
                "classifier.bias",
                "classifier.weight",
            ]
        );
        assert_eq!(m.labels, ["neg", "pos"]);
        assert_eq!(m.params.tensor("classifier.weight").unwrap().len(), 8);
        assert!(m.params.tensor("classifier.bias").unwrap().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn head_initialisation_is_reproducible_from_the_seed() {
        let d = tempfile::tempdir().unwrap();
        write_base_checkpoint(d.path(), 2, 64);
        let a = load_initial(&settings(d.path())).unwrap();
        let b = load_initial(&settings(d.path())).unwrap();
        assert_eq!(a.params, b.params);
        let mut other = settings(d.path());
        other.init_seed = 8;
        let c = load_initial(&other).unwrap();
        assert_ne!(a.params.tensor("classifier.weight"), c.params.tensor("classifier.weight"));
        // Roughly N(0, 0.02²): 64·64 pooler weights have a sample std near 0.02.
        let w = a.params.tensor("bert.pooler.dense.weight").unwrap();
        let std = (w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.002, "std {std}");
    }

    #[test]
    fn the_trainable_rule_follows_the_settings() {
        let d = tempfile::tempdir().unwrap();
        write_base_checkpoint(d.path(), 3, 4);
        let s = settings(d.path());
        let m = load_initial(&s).unwrap();
        let layout = TrainableLayout::new(m.params.manifest().clone(), trainable_rule(&s, 3));
        let names: Vec<&str> = layout.trainable.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bert.encoder.layer.2.output.dense.weight",
                "bert.pooler.dense.bias",
                "bert.pooler.dense.weight",
                "classifier.bias",
                "classifier.weight"
            ]
        );
        let t = layout.extract(&m.params);
        let mut full = m.params.clone();
        layout.write_back(&mut full, &vec![0.0; t.values().len()]);
        assert!(full.tensor("classifier.bias").unwrap().iter().all(|&v| v == 0.0));
        assert_eq!(
            full.tensor("bert.encoder.layer.0.output.dense.weight"),
            m.params.tensor("bert.encoder.layer.0.output.dense.weight")
        );
    }

    #[test]
    fn export_writes_an_hf_classifier_directory() {
        let d = tempfile::tempdir().unwrap();
        write_base_checkpoint(d.path(), 1, 4);
        let m = load_initial(&settings(d.path())).unwrap();
        let out = tempfile::tempdir().unwrap();
        export_hf(&m.params, &m.labels, d.path(), out.path(), None).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["num_labels"], 2);
        assert_eq!(cfg["id2label"]["1"], "pos");
        assert_eq!(cfg["label2id"]["neg"], 0);
        assert!(out.path().join("vocab.txt").is_file());
        let back =
            ParameterVector::load_safetensors(&out.path().join("model.safetensors"), |_| true).unwrap();
        assert_eq!(back, m.params);
    }
}
