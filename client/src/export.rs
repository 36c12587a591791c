//! Writing a model folder in Hugging Face layout, loadable by
//! `BertForSequenceClassification.from_pretrained(dir)` and by fedtune itself.
//!
//! The folder gets `config.json` (the source config with `architectures`, `num_labels`,
//! `id2label` and `label2id` set), `model.safetensors` (f32, transformers' names `bert.*` and
//! `classifier.*`, `format: pt` metadata as transformers writes it) and the tokenizer files of
//! the source folder. Files are written to temporaries and renamed, so a crash never leaves a
//! half-written model that would load.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use fedtune_shared::params::ParameterVector;

use crate::model::BertConfig;

/// Tokenizer files copied from the source model folder when present.
pub const TOKENIZER_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"];

/// Errors while exporting.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A file could not be written or copied.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The weights could not be serialized.
    #[error("cannot serialize weights: {0}")]
    Serialize(String),
    /// The label names do not match the classifier.
    #[error("{labels} label names for a classifier with {classes} outputs")]
    Labels {
        /// Names given.
        labels: usize,
        /// Rows of `classifier.weight`.
        classes: usize,
    },
}

/// Writes `weights` (all tensors, transformers' names) as a model folder `out` with the class
/// `labels` (id order), copying tokenizer files from `tokenizer_dir`.
pub fn export_hf(
    out: &Path,
    config: &BertConfig,
    labels: &[String],
    weights: &ParameterVector,
    tokenizer_dir: &Path,
) -> Result<(), ExportError> {
    if let Some(spec) = weights.manifest().tensors.iter().find(|t| t.name == "classifier.weight") {
        if spec.shape.first() != Some(&labels.len()) {
            return Err(ExportError::Labels { labels: labels.len(), classes: spec.shape[0] });
        }
    }
    let io = |path: &Path| {
        let shown = path.display().to_string();
        move |source| ExportError::Io { path: shown, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;

    let mut config = config.clone();
    config.set_labels(labels);
    config.extra.insert("architectures".into(), serde_json::json!(["BertForSequenceClassification"]));
    config.extra.entry("model_type").or_insert_with(|| serde_json::json!("bert"));
    let json = serde_json::to_vec_pretty(&config).map_err(|e| ExportError::Serialize(e.to_string()))?;
    write_atomically(&out.join("config.json"), &json)?;

    write_atomically(&out.join("model.safetensors"), &serialize(weights)?)?;

    for name in TOKENIZER_FILES {
        let src = tokenizer_dir.join(name);
        let dst = out.join(name);
        if src.is_file() && src != dst {
            let bytes = std::fs::read(&src).map_err(io(&src))?;
            write_atomically(&dst, &bytes)?;
        }
    }
    Ok(())
}

/// Safetensors bytes of a parameter vector, with transformers' `format: pt` metadata.
fn serialize(weights: &ParameterVector) -> Result<Vec<u8>, ExportError> {
    let bytes = weights.to_le_bytes();
    let mut views = Vec::with_capacity(weights.manifest().tensors.len());
    for (spec, range) in weights.manifest().ranges() {
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            spec.shape.clone(),
            &bytes[range.start * 4..range.end * 4],
        )
        .map_err(|e| ExportError::Serialize(e.to_string()))?;
        views.push((spec.name.clone(), view));
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize(views, metadata).map_err(|e| ExportError::Serialize(e.to_string()))
}

/// Temp file in the same folder, fsync, rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let err = |source| ExportError::Io { path: path.display().to_string(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)
}
