//! [`BertConfig`]: the Hugging Face `config.json` of a BERT checkpoint, as a typed struct.
//!
//! Field names and defaults follow `transformers.BertConfig`, so any BERT `config.json` (including
//! sentence-transformers checkpoints such as all-MiniLM-L6-v2) deserializes unchanged. Keys we do
//! not model are kept in [`BertConfig::extra`] and written back on export, so a round trip through
//! fedtune does not lose what other tools put there.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors from reading or checking a `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON or a field has the wrong type.
    #[error("{path}: not a valid BERT config.json: {source}")]
    Json {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The config parses but describes something this model code does not implement.
    #[error("{path}: {problem}")]
    Unsupported {
        /// File involved.
        path: String,
        /// What is not supported.
        problem: String,
    },
}

/// The feed-forward activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` with the error function (what BERT and MiniLM use).
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU's tanh approximation (`gelu_new`, as in GPT-2).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    /// Rectified linear unit.
    #[serde(rename = "relu")]
    Relu,
}

/// A BERT encoder's hyper-parameters, deserialized from Hugging Face `config.json`.
///
/// Defaults are those of `transformers.BertConfig` (bert-base-uncased), used for keys a file
/// omits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Word-piece vocabulary size (rows of the word embedding).
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Width of every hidden state.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Number of transformer layers.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: Activation,
    /// Dropout after embeddings, attention output and feed-forward output (training only).
    #[serde(default = "defaults::dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (training only).
    #[serde(default = "defaults::dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier; `hidden_dropout_prob` when absent, as in transformers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_dropout: Option<f64>,
    /// Longest sequence the position embedding covers.
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "defaults::type_vocab_size")]
    pub type_vocab_size: usize,
    /// Standard deviation of the normal initializer for weights the checkpoint lacks.
    #[serde(default = "defaults::initializer_range")]
    pub initializer_range: f64,
    /// LayerNorm epsilon.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token (its embedding row receives no gradient).
    #[serde(default)]
    pub pad_token_id: i64,
    /// Only `absolute` is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_embedding_type: Option<String>,
    /// Number of classes, when the file states it (transformers derives it from `id2label`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    /// Class names by id; keys are decimal strings, as transformers writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Class ids by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, i64>>,
    /// Every other key of the file, kept so that exports preserve it.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// The LoRA adapter the model is built with (the federation's or `train --adapter lora`);
    /// never read from or written to `config.json` (an export merges it or writes it apart).
    #[serde(skip)]
    pub lora: Option<fedtune_shared::bert::lora::LoraConfig>,
}

mod defaults {
    use super::Activation;
    pub(super) fn vocab_size() -> usize {
        30522
    }
    pub(super) fn hidden_size() -> usize {
        768
    }
    pub(super) fn num_hidden_layers() -> usize {
        12
    }
    pub(super) fn num_attention_heads() -> usize {
        12
    }
    pub(super) fn intermediate_size() -> usize {
        3072
    }
    pub(super) fn hidden_act() -> Activation {
        Activation::Gelu
    }
    pub(super) fn dropout() -> f64 {
        0.1
    }
    pub(super) fn max_position_embeddings() -> usize {
        512
    }
    pub(super) fn type_vocab_size() -> usize {
        2
    }
    pub(super) fn initializer_range() -> f64 {
        0.02
    }
    pub(super) fn layer_norm_eps() -> f64 {
        1e-12
    }
}

impl Default for BertConfig {
    /// bert-base-uncased.
    fn default() -> Self {
        serde_json::from_str("{}").expect("every BertConfig field has a default")
    }
}

impl BertConfig {
    /// The shape of all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads), the benchmark default.
    pub fn minilm_l6() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            ..Self::default()
        }
    }

    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: shown.clone(), source })?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|source| ConfigError::Json { path: shown.clone(), source })?;
        config.validate().map_err(|problem| ConfigError::Unsupported { path: shown, problem })?;
        Ok(config)
    }

    /// Checks what the model code relies on; returns the problem in words.
    pub fn validate(&self) -> Result<(), String> {
        if self.hidden_size == 0 || self.num_attention_heads == 0 {
            return Err("hidden_size and num_attention_heads must be positive".into());
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if let Some(kind) = self.position_embedding_type.as_deref() {
            if kind != "absolute" {
                return Err(format!("position_embedding_type `{kind}` is not supported (only `absolute`)"));
            }
        }
        if let Some(labels) = &self.id2label {
            let mut ids = Vec::with_capacity(labels.len());
            for key in labels.keys() {
                ids.push(
                    key.parse::<usize>().map_err(|_| format!("id2label key `{key}` is not a class id"))?,
                );
            }
            ids.sort_unstable();
            if ids.iter().enumerate().any(|(i, id)| i != *id) {
                return Err("id2label ids must be 0..n without gaps".into());
            }
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Dropout before the classifier.
    pub fn classifier_dropout_prob(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }

    /// Class names in id order, when the config names them (not transformers' placeholder
    /// `LABEL_0`, `LABEL_1`, … which only says how many classes a head has).
    pub fn label_names(&self) -> Option<Vec<String>> {
        let map = self.id2label.as_ref()?;
        let mut pairs: Vec<(usize, &String)> =
            map.iter().filter_map(|(k, v)| k.parse().ok().map(|id| (id, v))).collect();
        pairs.sort_unstable_by_key(|(id, _)| *id);
        let names: Vec<String> = pairs.into_iter().map(|(_, v)| v.clone()).collect();
        let placeholder = names.iter().enumerate().all(|(i, n)| *n == format!("LABEL_{i}"));
        (!names.is_empty() && !placeholder).then_some(names)
    }

    /// Records the class names (id order) as transformers expects them: `id2label`,
    /// `label2id` and `num_labels`, consistent with each other.
    pub fn set_labels(&mut self, names: &[String]) {
        self.id2label = Some(names.iter().enumerate().map(|(i, n)| (i.to_string(), n.clone())).collect());
        self.label2id = Some(names.iter().enumerate().map(|(i, n)| (n.clone(), i as i64)).collect());
        self.num_labels = Some(names.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_config_takes_transformers_defaults() {
        let c: BertConfig = serde_json::from_str(r#"{"hidden_size": 64, "num_attention_heads": 4}"#).unwrap();
        assert_eq!(c.vocab_size, 30522);
        assert_eq!(c.hidden_act, Activation::Gelu);
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.classifier_dropout_prob(), 0.1);
    }

    #[test]
    fn unknown_keys_survive_a_round_trip() {
        let c: BertConfig =
            serde_json::from_str(r#"{"model_type": "bert", "gradient_checkpointing": false}"#).unwrap();
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["model_type"], "bert");
        assert_eq!(back["gradient_checkpointing"], false);
    }

    #[test]
    fn placeholder_label_names_do_not_count_as_names() {
        let mut c = BertConfig::default();
        c.set_labels(&["LABEL_0".into(), "LABEL_1".into()]);
        assert_eq!(c.label_names(), None);
        c.set_labels(&["neg".into(), "pos".into()]);
        assert_eq!(c.label_names(), Some(vec!["neg".to_string(), "pos".to_string()]));
        assert_eq!(c.label2id.as_ref().unwrap()["pos"], 1);
    }

    #[test]
    fn heads_must_divide_the_hidden_size() {
        let c = BertConfig { hidden_size: 30, num_attention_heads: 4, ..BertConfig::default() };
        assert!(c.validate().unwrap_err().contains("multiple"));
    }

    #[test]
    fn label_ids_must_count_from_zero_without_gaps() {
        let c: BertConfig = serde_json::from_str(r#"{"id2label": {"0": "a", "2": "b"}}"#).unwrap();
        assert!(c.validate().unwrap_err().contains("gaps"));
        let c: BertConfig = serde_json::from_str(r#"{"id2label": {"x": "a"}}"#).unwrap();
        assert!(c.validate().unwrap_err().contains("`x`"));
    }

    #[test]
    fn unknown_activations_are_refused() {
        assert!(serde_json::from_str::<BertConfig>(r#"{"hidden_act": "swish"}"#).is_err());
    }
}
