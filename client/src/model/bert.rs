//! `BertModel` (embeddings, encoder, pooler) and `BertForSequenceClassification` (plus dropout
//! and a linear classifier), with the variable layout of transformers' checkpoints.
//!
//! Ports `BertPooler`, `BertModel.forward` and `BertForSequenceClassification.forward` of
//! transformers 5.23 (`models/bert/modeling_bert.py`).

use tch::{nn, Kind, Tensor};

use super::config::BertConfig;
use super::embeddings::BertEmbeddings;
use super::encoder::{AttentionMask, BertEncoder};
use super::layers::{dropout, Linear, Precision};

/// A tokenized batch on the model's device.
#[derive(Debug)]
pub struct ModelInput {
    /// `[batch, seq]` int64 token ids.
    pub input_ids: Tensor,
    /// `[batch, seq]` int64, 1 for real tokens and 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, seq]` int64 segment ids.
    pub token_type_ids: Tensor,
}

/// What the encoder computes.
#[derive(Debug)]
pub struct BertOutput {
    /// `[batch, seq, hidden]` f32: the last layer's hidden states.
    pub last_hidden_state: Tensor,
    /// `[batch, hidden]`: `tanh(dense(h[:, 0]))`.
    pub pooler_output: Tensor,
}

/// `bert`: the encoder with its pooler.
#[derive(Debug)]
pub struct BertModel {
    /// `bert.embeddings`.
    pub embeddings: BertEmbeddings,
    /// `bert.encoder`.
    pub encoder: BertEncoder,
    pooler: Linear,
}

impl BertModel {
    /// Registers all variables under `p` (normally `bert`).
    pub fn new(p: &nn::Path<'_>, config: &BertConfig) -> Self {
        Self {
            embeddings: BertEmbeddings::new(&(p / "embeddings"), config),
            encoder: BertEncoder::new(&(p / "encoder"), config),
            pooler: Linear::new(&(p / "pooler" / "dense"), config.hidden_size, config.hidden_size),
        }
    }

    /// Runs the encoder; dropout only when `train`.
    pub fn forward(&self, input: &ModelInput, train: bool, precision: Precision) -> BertOutput {
        let x = self.embeddings.forward(&input.input_ids, &input.token_type_ids, train);
        let mask = AttentionMask::from_padding_mask(&input.attention_mask);
        let last_hidden_state = self.encoder.forward(&x, &mask, train, precision);
        let first = last_hidden_state.select(1, 0);
        let pooler_output = self.pooler.forward(&first, precision).tanh();
        BertOutput { last_hidden_state, pooler_output }
    }
}

/// Output of the classifier.
#[derive(Debug)]
pub struct ClassifierOutput {
    /// `[batch, num_labels]` f32 unnormalized scores.
    pub logits: Tensor,
    /// The encoder's outputs, for inspection and parity checks.
    pub bert: BertOutput,
}

/// `BertForSequenceClassification`: variables `bert.*` and `classifier.{weight,bias}`.
#[derive(Debug)]
pub struct BertForSequenceClassification {
    /// The encoder (`bert.*`).
    pub bert: BertModel,
    classifier: Linear,
    dropout: f64,
    num_labels: usize,
}

impl BertForSequenceClassification {
    /// Registers the model's variables under the store's root with transformers' names.
    pub fn new(root: &nn::Path<'_>, config: &BertConfig, num_labels: usize) -> Self {
        Self {
            bert: BertModel::new(&(root / "bert"), config),
            classifier: Linear::new(&(root / "classifier"), config.hidden_size, num_labels),
            dropout: config.classifier_dropout_prob(),
            num_labels,
        }
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Runs the model; dropout only when `train`. Logits are f32 whatever the precision.
    pub fn forward(&self, input: &ModelInput, train: bool, precision: Precision) -> ClassifierOutput {
        let bert = self.bert.forward(input, train, precision);
        let pooled = dropout(bert.pooler_output.shallow_clone(), self.dropout, train);
        let logits = self.classifier.forward(&pooled, precision).to_kind(Kind::Float);
        ClassifierOutput { logits, bert }
    }
}
