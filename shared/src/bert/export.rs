//! Writing a model directory in Hugging Face layout, loadable by
//! `BertForSequenceClassification.from_pretrained(dir)` and by fedtune itself.
//!
//! The directory gets `config.json` (the base model's config with `architectures`,
//! `model_type`, `num_labels`, `id2label`, `label2id` and `problem_type` set),
//! `model.safetensors` (f32, transformers' names, `format: pt` metadata as transformers writes
//! it) and the tokenizer files of the base model's directory that exist. The directory is built
//! next to its destination and renamed into place ([`crate::files::write_dir_atomically`]), so
//! a crash never leaves a half-written model that would load, and a re-export never mixes files
//! of two models.
//!
//! A model with LoRA adapters exports two ways: merged ([`export_hf_merged`]: each adapted
//! weight becomes `W + (α/r)·B·A`, a plain classifier directory), or as the adapter alone
//! ([`export_peft_adapter`]: `adapter_config.json` and `adapter_model.safetensors` in `peft`'s
//! layout, loaded with `PeftModel.from_pretrained` onto the base model).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::lora::{lora_part, LoraConfig, LoraError, HEAD_MODULES, PEFT_PREFIX};
use super::TensorRole;
use crate::files::{self, FileError};
use crate::params::{Manifest, ParameterVector};

/// Tokenizer and vocabulary files copied from the base model's directory when present.
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
];

/// Why an export failed. Nothing is left at the destination when it does.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the base model's files or writing the export.
    #[error(transparent)]
    File(#[from] FileError),
    /// The base config is not a JSON object.
    #[error("the base model's config.json is not a JSON object")]
    Config,
    /// The label names do not match the classifier.
    #[error("{labels} label names for a classifier with {classes} outputs")]
    Labels {
        /// Names given.
        labels: usize,
        /// Rows of `classifier.weight`.
        classes: usize,
    },
    /// The weights could not be serialized.
    #[error("cannot serialize weights: {0}")]
    Serialize(String),
    /// The adapter cannot be merged or exported.
    #[error("adapter: {0}")]
    Adapter(#[from] LoraError),
}

/// [`export_hf`] of `weights` (a model with `lora`'s adapters) merged into its base weights: a
/// plain `BertForSequenceClassification` directory that computes what the adapted model does.
pub fn export_hf_merged(
    out: &Path,
    config: &Value,
    labels: &[String],
    weights: &ParameterVector,
    lora: &LoraConfig,
    tokenizer_dir: &Path,
) -> Result<Vec<PathBuf>, ExportError> {
    export_hf(out, config, labels, &lora.merge(weights)?, tokenizer_dir)
}

/// Writes `weights`' adapter as a `peft` adapter directory `out`: `adapter_config.json` (LoRA,
/// `SEQ_CLS`, `lora`'s rank, alpha, dropout and targets, the head in `modules_to_save`,
/// `base_model_name_or_path` = `base_model`) and `adapter_model.safetensors` (every `lora_A`,
/// `lora_B` and head tensor under `peft`'s names). The base model must be loaded with
/// `num_labels = labels.len()` (checked against the classifier here; `peft`'s config has no
/// place for label names). Replaces an existing `out`. Returns the files written.
pub fn export_peft_adapter(
    out: &Path,
    lora: &LoraConfig,
    labels: &[String],
    weights: &ParameterVector,
    base_model: &str,
) -> Result<Vec<PathBuf>, ExportError> {
    lora.validate()?;
    if let Some(spec) = weights.manifest().tensors.iter().find(|t| t.name == "classifier.weight") {
        if spec.shape.first() != Some(&labels.len()) {
            return Err(ExportError::Labels { labels: labels.len(), classes: spec.shape[0] });
        }
    }
    let keep = |name: &str| {
        lora_part(name).is_some()
            || matches!(TensorRole::of(name), TensorRole::Classifier | TensorRole::Pooler)
    };
    let adapter = weights.select(&weights.manifest().subset(keep)).map_err(LoraError::from)?;
    let (manifest, values) = adapter.into_parts();
    let renamed = Manifest::new(
        manifest
            .tensors
            .into_iter()
            .map(|mut t| {
                t.name = format!("{PEFT_PREFIX}{}", t.name);
                t
            })
            .collect(),
    )
    .map_err(LoraError::from)?;
    let adapter = ParameterVector::new(renamed, values).map_err(LoraError::from)?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let model = adapter.to_safetensors(Some(metadata)).map_err(ExportError::Serialize)?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.target_modules,
        "modules_to_save": HEAD_MODULES,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
    });
    let config = serde_json::to_vec_pretty(&config).map_err(|e| ExportError::Serialize(e.to_string()))?;
    let names = ["adapter_config.json", "adapter_model.safetensors"];
    files::write_dir_atomically(out, |tmp| -> Result<(), ExportError> {
        files::atomic_write(&tmp.join(names[0]), &config)?;
        files::atomic_write(&tmp.join(names[1]), &model)?;
        Ok(())
    })?;
    Ok(names.into_iter().map(|n| out.join(n)).collect())
}

/// Writes `weights` (every tensor, transformers' names) as a Hugging Face
/// `BertForSequenceClassification` directory `out` for the class `labels` (id order), on top of
/// the base model's `config` (the parsed `config.json`), copying the tokenizer files found in
/// `tokenizer_dir`. Replaces an existing `out`. Returns the files written.
pub fn export_hf(
    out: &Path,
    config: &Value,
    labels: &[String],
    weights: &ParameterVector,
    tokenizer_dir: &Path,
) -> Result<Vec<PathBuf>, ExportError> {
    if let Some(spec) = weights.manifest().tensors.iter().find(|t| t.name == "classifier.weight") {
        if spec.shape.first() != Some(&labels.len()) {
            return Err(ExportError::Labels { labels: labels.len(), classes: spec.shape[0] });
        }
    }
    let config = classifier_config(config, labels)?;
    let config = serde_json::to_vec_pretty(&config).map_err(|e| ExportError::Serialize(e.to_string()))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let model = weights.to_safetensors(Some(metadata)).map_err(ExportError::Serialize)?;
    // Read before the swap: `tokenizer_dir` may be `out` itself (re-exporting in place).
    let mut tokenizer = Vec::new();
    for name in TOKENIZER_FILES {
        let src = tokenizer_dir.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|source| FileError { path: src, source })?;
            tokenizer.push((name, bytes));
        }
    }

    let mut names = vec!["config.json", "model.safetensors"];
    names.extend(tokenizer.iter().map(|(n, _)| *n));
    files::write_dir_atomically(out, |tmp| -> Result<(), ExportError> {
        files::atomic_write(&tmp.join("config.json"), &config)?;
        files::atomic_write(&tmp.join("model.safetensors"), &model)?;
        for (name, bytes) in &tokenizer {
            files::atomic_write(&tmp.join(name), bytes)?;
        }
        Ok(())
    })?;
    Ok(names.into_iter().map(|n| out.join(n)).collect())
}

/// The base config turned into a sequence classifier's config for `labels`.
fn classifier_config(base: &Value, labels: &[String]) -> Result<Value, ExportError> {
    let mut config = base.as_object().ok_or(ExportError::Config)?.clone();
    config.insert("architectures".into(), json!(["BertForSequenceClassification"]));
    config.entry("model_type").or_insert_with(|| json!("bert"));
    config.insert("num_labels".into(), json!(labels.len()));
    config.insert(
        "id2label".into(),
        Value::Object(
            labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect::<Map<_, _>>(),
        ),
    );
    config.insert(
        "label2id".into(),
        Value::Object(labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect::<Map<_, _>>()),
    );
    config.insert("problem_type".into(), json!("single_label_classification"));
    Ok(Value::Object(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{Manifest, TensorSpec};

    fn weights(classes: usize) -> ParameterVector {
        let m = Manifest::new(vec![
            TensorSpec { name: "bert.pooler.dense.weight".into(), shape: vec![2, 2] },
            TensorSpec { name: "classifier.weight".into(), shape: vec![classes, 2] },
        ])
        .unwrap();
        let n = m.numel();
        ParameterVector::new(m, (0..n).map(|i| i as f32 / 8.0).collect()).unwrap()
    }

    fn labels() -> Vec<String> {
        vec!["neg".into(), "pos".into()]
    }

    fn base_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vocab.txt"), "[PAD]\n[CLS]\n").unwrap();
        std::fs::write(d.path().join("tokenizer.json"), "{}").unwrap();
        d
    }

    fn read_json(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn an_export_is_a_classifier_directory_with_labels_weights_and_tokenizer() {
        let base = base_dir();
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("model");
        let config = json!({"hidden_size": 2, "num_hidden_layers": 1, "vocab_size": 10});
        let written = export_hf(&out, &config, &labels(), &weights(2), base.path()).unwrap();
        assert_eq!(
            written,
            ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"].map(|n| out.join(n))
        );

        let cfg = read_json(&out.join("config.json"));
        assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
        assert_eq!(cfg["model_type"], "bert");
        assert_eq!(cfg["num_labels"], 2);
        assert_eq!(cfg["id2label"]["1"], "pos");
        assert_eq!(cfg["label2id"]["neg"], 0);
        assert_eq!(cfg["vocab_size"], 10, "the base config's other keys are kept");

        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
        let back = ParameterVector::load_safetensors(&out.join("model.safetensors"), |_| true).unwrap();
        assert_eq!(back, weights(2));
        assert_eq!(std::fs::read(out.join("vocab.txt")).unwrap(), b"[PAD]\n[CLS]\n");
    }

    #[test]
    fn labels_that_do_not_match_the_classifier_are_refused_and_nothing_is_written() {
        let base = base_dir();
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("model");
        let err = export_hf(&out, &json!({}), &labels(), &weights(3), base.path()).unwrap_err();
        assert!(matches!(err, ExportError::Labels { labels: 2, classes: 3 }), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn a_re_export_in_place_replaces_the_model_and_keeps_the_tokenizer() {
        let base = base_dir();
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("model");
        export_hf(&out, &json!({}), &labels(), &weights(2), base.path()).unwrap();
        std::fs::write(out.join("stale.bin"), "from another model").unwrap();
        let mut shifted = weights(2);
        shifted.values_mut().iter_mut().for_each(|v| *v += 1.0);
        export_hf(&out, &json!({}), &labels(), &shifted, &out).unwrap();
        let back = ParameterVector::load_safetensors(&out.join("model.safetensors"), |_| true).unwrap();
        assert_eq!(back, shifted);
        assert!(out.join("vocab.txt").is_file());
        assert!(!out.join("stale.bin").exists());
    }
}
