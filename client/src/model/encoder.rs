//! `bert.encoder`: the stack of transformer layers.
//!
//! One struct per Hugging Face module, with the same field names, so that variable paths equal
//! checkpoint keys (`bert.encoder.layer.3.attention.self.query.weight`). Ports `BertSelfAttention`,
//! `BertSelfOutput`, `BertAttention`, `BertIntermediate`, `BertOutput`, `BertLayer` and
//! `BertEncoder` of transformers 5.23 (`models/bert/modeling_bert.py`); attention uses
//! `scaled_dot_product_attention`, the kernel transformers' default `sdpa` implementation calls.

use tch::{nn, Tensor};

use super::config::{Activation, BertConfig};
use super::layers::{dropout, LayerNorm, Linear, Precision};

/// Which key positions each query may attend to.
#[derive(Debug)]
pub struct AttentionMask {
    /// `[batch, 1, 1, seq]` bool, true = attend; `None` when nothing is padded, which lets
    /// the kernel take its unmasked fast path (transformers drops all-ones masks the same way).
    pub(crate) mask: Option<Tensor>,
}

impl AttentionMask {
    /// From a `[batch, seq]` 0/1 mask (1 = real token).
    pub fn from_padding_mask(attention_mask: &Tensor) -> Self {
        let keep = attention_mask.ne(0);
        let all_real = bool::try_from(keep.all()).unwrap_or(false);
        if all_real {
            Self { mask: None }
        } else {
            Self { mask: Some(keep.unsqueeze(1).unsqueeze(1)) }
        }
    }
}

/// `attention.self`: query/key/value projections and multi-head scaled dot-product attention.
#[derive(Debug)]
pub struct BertSelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    heads: i64,
    head_dim: i64,
    dropout: f64,
}

impl BertSelfAttention {
    fn new(p: &nn::Path<'_>, c: &BertConfig) -> Self {
        let h = c.hidden_size;
        Self {
            query: Linear::adapted(&(p / "query"), h, h, c.lora.as_ref()),
            key: Linear::adapted(&(p / "key"), h, h, c.lora.as_ref()),
            value: Linear::adapted(&(p / "value"), h, h, c.lora.as_ref()),
            heads: c.num_attention_heads as i64,
            head_dim: c.head_dim() as i64,
            dropout: c.attention_probs_dropout_prob,
        }
    }

    /// `[batch, seq, hidden]` → `[batch, seq, hidden]` (heads concatenated).
    fn forward(&self, x: &Tensor, mask: &AttentionMask, train: bool, precision: Precision) -> Tensor {
        let (b, s, h) = x.size3().expect("hidden states are [batch, seq, hidden]");
        let split = |t: Tensor| t.view([b, s, self.heads, self.head_dim]).transpose(1, 2);
        let q = split(self.query.forward_t(x, train, precision));
        let k = split(self.key.forward_t(x, train, precision));
        let v = split(self.value.forward_t(x, train, precision));
        let p = if train { self.dropout } else { 0.0 };
        let ctx = Tensor::scaled_dot_product_attention(&q, &k, &v, mask.mask.as_ref(), p, false, None, false);
        ctx.transpose(1, 2).reshape([b, s, h])
    }
}

/// `attention.output` and `output`: dense, dropout, residual, LayerNorm.
#[derive(Debug)]
pub struct BertResidualOutput {
    dense: Linear,
    layer_norm: LayerNorm,
    dropout: f64,
}

impl BertResidualOutput {
    fn new(p: &nn::Path<'_>, c: &BertConfig, in_features: usize) -> Self {
        Self {
            dense: Linear::adapted(&(p / "dense"), in_features, c.hidden_size, c.lora.as_ref()),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), c.hidden_size, c.layer_norm_eps),
            dropout: c.hidden_dropout_prob,
        }
    }

    fn forward(&self, x: &Tensor, residual: &Tensor, train: bool, precision: Precision) -> Tensor {
        let y = dropout(self.dense.forward_t(x, train, precision), self.dropout, train);
        self.layer_norm.forward(&(y + residual))
    }
}

/// `attention`: self-attention followed by its output block.
#[derive(Debug)]
pub struct BertAttention {
    self_attention: BertSelfAttention,
    output: BertResidualOutput,
}

/// One transformer layer (`encoder.layer.N`).
#[derive(Debug)]
pub struct BertLayer {
    attention: BertAttention,
    intermediate: Linear,
    activation: Activation,
    output: BertResidualOutput,
}

impl BertLayer {
    fn new(p: &nn::Path<'_>, c: &BertConfig) -> Self {
        let a = p / "attention";
        Self {
            attention: BertAttention {
                self_attention: BertSelfAttention::new(&(&a / "self"), c),
                output: BertResidualOutput::new(&(&a / "output"), c, c.hidden_size),
            },
            intermediate: Linear::adapted(
                &(p / "intermediate" / "dense"),
                c.hidden_size,
                c.intermediate_size,
                c.lora.as_ref(),
            ),
            activation: c.hidden_act,
            output: BertResidualOutput::new(&(p / "output"), c, c.intermediate_size),
        }
    }

    /// `[batch, seq, hidden]` → `[batch, seq, hidden]` (f32).
    pub fn forward(&self, x: &Tensor, mask: &AttentionMask, train: bool, precision: Precision) -> Tensor {
        let ctx = self.attention.self_attention.forward(x, mask, train, precision);
        let x = self.attention.output.forward(&ctx, x, train, precision);
        let inner = self.intermediate.forward_t(&x, train, precision);
        let inner = match self.activation {
            Activation::Gelu => inner.gelu("none"),
            Activation::GeluTanh => inner.gelu("tanh"),
            Activation::Relu => inner.relu(),
        };
        self.output.forward(&inner, &x, train, precision)
    }
}

/// `encoder`: `num_hidden_layers` layers applied in order.
#[derive(Debug)]
pub struct BertEncoder {
    /// The layers, bottom first.
    pub layers: Vec<BertLayer>,
}

impl BertEncoder {
    /// Registers `p.layer.0` … `p.layer.{n-1}`.
    pub fn new(p: &nn::Path<'_>, c: &BertConfig) -> Self {
        let l = p / "layer";
        Self { layers: (0..c.num_hidden_layers).map(|i| BertLayer::new(&(&l / i), c)).collect() }
    }

    /// `[batch, seq, hidden]` → last layer's `[batch, seq, hidden]`.
    pub fn forward(&self, x: &Tensor, mask: &AttentionMask, train: bool, precision: Precision) -> Tensor {
        let mut x = x.shallow_clone();
        for layer in &self.layers {
            x = layer.forward(&x, mask, train, precision);
        }
        x
    }
}
