//! The global model as the coordinator holds it: every tensor of a BERT sequence classifier as
//! named f32 values (no libtorch), the split into trainable and frozen tensors, the initial model
//! built from a Hugging Face checkpoint, and export back to a Hugging Face directory.
//!
//! # Initial model
//! Version 0 is built by [`fedtune_shared::bert::initial`], the construction clients run too
//! (they rebuild it from their own model folder instead of downloading it).
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

use fedtune_shared::bert::initial::{self, InitialError, InitialSpec};
use fedtune_shared::bert::lora::{LoraConfig, LoraError};
use fedtune_shared::bert::{export, TrainScope};
use fedtune_shared::chunk::{PayloadView, Sha256Stream};
use fedtune_shared::compression::{apply_delta, Int8Encoder, MODEL_STEP_BOUND};
use fedtune_shared::ids::{ModelVersion, Sha256};
use fedtune_shared::params::{Manifest, ParameterVector, ParamsError};
use fedtune_shared::round::{ModelRef, ModelScope};

pub use fedtune_shared::bert::initial::{HfConfig, InitialModel};

use crate::settings::{AdapterKind, ModelSettings};

/// Errors building, loading or exporting models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Building the initial model or reading the checkpoint's config.
    #[error(transparent)]
    Initial(#[from] InitialError),
    /// Parameter vectors or safetensors.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// Writing a Hugging Face export.
    #[error("export: {0}")]
    Export(#[from] export::ExportError),
    /// The LoRA adapter does not fit the checkpoint.
    #[error("model.lora: {0}")]
    Adapter(#[from] LoraError),
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
    /// The 8-bit step from the previous version that defines this one
    /// (`model.download_encoding = "int8_delta"`); `None` for f32 publishing, version 0, and
    /// after a restart (the step is not checkpointed: clients then download f32 weights).
    pub step: Option<PublishedStep>,
}

/// An `INT8_BLOCK` step from `base`: this version's trainable weights are
/// `apply_delta(base's, bytes)`, bit for bit.
#[derive(Debug)]
pub struct PublishedStep {
    /// The version the step starts from.
    pub base: ModelVersion,
    /// The encoded step.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes` (the header's payload digest).
    pub digest: Sha256,
}

impl PublishedStep {
    /// Wraps an encoded step from `base`, digesting it.
    pub fn new(base: ModelVersion, bytes: Vec<u8>) -> Self {
        let mut hasher = Sha256Stream::default();
        hasher.update(&bytes);
        Self { base, bytes, digest: hasher.finish() }
    }
}

/// Quantizes the step from `base` (trainable values of the published version v − 1) to `next`
/// with unbiased stochastic rounding and returns the values that define version v,
/// `base + decode(encode(next − base))`, with the encoded step. `None` when the step cannot be
/// encoded (a non-finite value): the caller publishes `next` in f32.
pub fn quantize_step(base: &[f32], next: &[f32], encoder: &mut Int8Encoder) -> Option<(Vec<f32>, Vec<u8>)> {
    let step: Vec<f32> = next.iter().zip(base).map(|(&n, &b)| n - b).collect();
    let bytes = encoder.encode(&step, MODEL_STEP_BOUND).ok()?;
    let values = apply_delta(base, &bytes).ok()?;
    Some((values, bytes))
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
        Self { version, params, layout, model_ref, step: None }
    }

    /// This version with the step that defined it ([`quantize_step`]).
    pub fn with_step(mut self, step: PublishedStep) -> Self {
        self.step = Some(step);
        self
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

/// Builds the initial global model from `settings.init_dir` with the one construction both
/// binaries share ([`fedtune_shared::bert::initial`]).
pub fn load_initial(settings: &ModelSettings) -> Result<InitialModel, ModelError> {
    let lora = settings.lora_config(settings.init_seed);
    let spec = InitialSpec {
        labels: &settings.labels,
        num_labels: settings.num_labels,
        init_seed: settings.init_seed,
        lora: lora.as_ref(),
    };
    Ok(initial::load_initial(&settings.init_dir, &spec)?)
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
    use fedtune_shared::params::TensorSpec;

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
            download_encoding: Default::default(),
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
    fn a_quantized_step_defines_the_published_values_as_base_plus_its_decoding_within_a_grid_step() {
        let base: Vec<f32> = (0..600).map(|i| (i as f32 * 0.37).sin()).collect();
        let next: Vec<f32> =
            base.iter().enumerate().map(|(i, b)| b + ((i % 11) as f32 - 5.0) * 1e-3).collect();
        let mut encoder = Int8Encoder::seeded_for_tests(5);
        let (values, bytes) = quantize_step(&base, &next, &mut encoder).unwrap();
        let decoded = fedtune_shared::compression::decode(&bytes, base.len(), MODEL_STEP_BOUND).unwrap();
        let expected: Vec<u32> = base.iter().zip(&decoded).map(|(b, d)| (b + d).to_bits()).collect();
        assert_eq!(values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected);
        // The step's largest value is 5e-3, so a block's grid is at most 5e-3 / 127 (plus the
        // f32 rounding of the additions).
        let worst = values.iter().zip(&next).map(|(v, n)| (v - n).abs()).fold(0.0f32, f32::max);
        assert!(worst > 0.0 && worst <= 5e-3 / 127.0 + 1e-6, "{worst}");
        let step = PublishedStep::new(ModelVersion(3), bytes.clone());
        assert_eq!((step.base, step.digest), (ModelVersion(3), Sha256::of(&bytes)));
        assert!(quantize_step(&base, &vec![f32::NAN; 600], &mut encoder).is_none(), "not encodable: f32");
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
