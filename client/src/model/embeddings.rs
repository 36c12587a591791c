//! `bert.embeddings`: word + position + token-type embeddings, LayerNorm, dropout.
//!
//! Ports `BertEmbeddings.forward` of transformers 5.23 (`models/bert/modeling_bert.py`).

use tch::{nn, Kind, Tensor};

use super::config::BertConfig;
use super::layers::{dropout, Embedding, LayerNorm};

/// The embedding block. Variables: `word_embeddings.weight`, `position_embeddings.weight`,
/// `token_type_embeddings.weight`, `LayerNorm.{weight,bias}`.
#[derive(Debug)]
pub struct BertEmbeddings {
    /// `[vocab_size, hidden]`; the padding row gets no gradient.
    pub word_embeddings: Embedding,
    /// `[max_position_embeddings, hidden]`.
    pub position_embeddings: Embedding,
    /// `[type_vocab_size, hidden]`.
    pub token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
    dropout: f64,
}

impl BertEmbeddings {
    /// Registers the block's variables under `p` (normally `bert.embeddings`).
    pub fn new(p: &nn::Path<'_>, config: &BertConfig) -> Self {
        let h = config.hidden_size;
        Self {
            word_embeddings: Embedding::new(
                &(p / "word_embeddings"),
                config.vocab_size,
                h,
                Some(config.pad_token_id),
            ),
            position_embeddings: Embedding::new(
                &(p / "position_embeddings"),
                config.max_position_embeddings,
                h,
                None,
            ),
            token_type_embeddings: Embedding::new(
                &(p / "token_type_embeddings"),
                config.type_vocab_size,
                h,
                None,
            ),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), h, config.layer_norm_eps),
            dropout: config.hidden_dropout_prob,
        }
    }

    /// `input_ids, token_type_ids: [batch, seq]` (int64) → `[batch, seq, hidden]` f32.
    /// Positions are `0..seq` for every row, as in transformers when none are given.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, train: bool) -> Tensor {
        let seq = input_ids.size()[1];
        let positions = Tensor::arange(seq, (Kind::Int64, input_ids.device())).unsqueeze(0);
        let x = self.word_embeddings.forward(input_ids)
            + self.token_type_embeddings.forward(token_type_ids)
            + self.position_embeddings.forward(&positions);
        dropout(self.layer_norm.forward(&x), self.dropout, train)
    }
}
