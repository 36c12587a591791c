//! The building blocks every BERT block uses: linear, LayerNorm and embedding layers whose
//! variables are named like PyTorch's (`weight`, `bias`), plus the mixed-precision policy.
//!
//! Variables are created zero-filled: real values come from the checkpoint or from
//! [`crate::model::weights::init_missing`], which draws them in a fixed order from a seed. That
//! keeps building a model cheap and makes the initial values of missing tensors (pooler,
//! classifier) independent of the size of everything else.

use fedtune_shared::bert::lora::LoraConfig;
use tch::{nn, Kind, Tensor};

/// How matrix products are computed. Master weights, LayerNorm, softmax statistics and the loss
/// always stay in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32 (CPU default; what the parity tests check).
    F32,
    /// Matrix products and attention in bfloat16, as `torch.autocast(dtype=torch.bfloat16)`
    /// does: inputs and weights are cast at each linear layer, LayerNorm runs in f32. tch only
    /// exposes the CUDA autocast switch with its default (f16) dtype, so the policy is applied
    /// here explicitly; gradients still flow to the f32 master weights through the casts.
    Bf16,
}

impl Precision {
    /// The dtype matrix products use.
    pub fn kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// `x` in the dtype matrix products use (no copy when it already is).
    pub fn cast(self, x: &Tensor) -> Tensor {
        if x.kind() == self.kind() {
            x.shallow_clone()
        } else {
            x.to_kind(self.kind())
        }
    }
}

/// `y = x·Wᵀ + b`, with `weight` of shape `[out, in]` like `torch.nn.Linear`; with a LoRA
/// adapter `y = x·Wᵀ + b + (α/r)·dropout(x)·Aᵀ·Bᵀ`, as `peft`'s `lora.Linear`.
#[derive(Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`.
    pub bias: Tensor,
    /// The adapter, when the layer is one of the adapter's targets.
    pub lora: Option<LoraBranch>,
}

/// A LoRA adapter on a linear layer (`peft` names: `p.lora_A.weight`, `p.lora_B.weight`).
#[derive(Debug)]
pub struct LoraBranch {
    /// `[r, in_features]` (frozen in a federation).
    pub a: Tensor,
    /// `[out_features, r]` (starts at zero).
    pub b: Tensor,
    scaling: f64,
    dropout: f64,
}

impl Linear {
    /// Registers `p.weight` and `p.bias`.
    pub fn new(p: &nn::Path<'_>, in_features: usize, out_features: usize) -> Self {
        let (i, o) = (in_features as i64, out_features as i64);
        Self { weight: p.zeros("weight", &[o, i]), bias: p.zeros("bias", &[o]), lora: None }
    }

    /// [`Linear::new`], plus `p.lora_A.weight` and `p.lora_B.weight` when `lora` targets the
    /// module `p` ([`LoraConfig::targets`]).
    pub fn adapted(
        p: &nn::Path<'_>,
        in_features: usize,
        out_features: usize,
        lora: Option<&LoraConfig>,
    ) -> Self {
        let mut linear = Self::new(p, in_features, out_features);
        let module = p.components().collect::<Vec<_>>().join(".");
        if let Some(l) = lora.filter(|l| l.targets(&module)) {
            let (i, o, r) = (in_features as i64, out_features as i64, l.rank as i64);
            linear.lora = Some(LoraBranch {
                a: (p / "lora_A").zeros("weight", &[r, i]),
                b: (p / "lora_B").zeros("weight", &[o, r]),
                scaling: l.scaling(),
                dropout: l.dropout,
            });
        }
        linear
    }

    /// `x: [.., in]` → `[.., out]`, in the precision's dtype.
    pub fn forward(&self, x: &Tensor, precision: Precision) -> Tensor {
        self.forward_t(x, false, precision)
    }

    /// [`Linear::forward`] with the adapter's dropout active when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool, precision: Precision) -> Tensor {
        let xc = precision.cast(x);
        let y = xc.linear(&precision.cast(&self.weight), Some(precision.cast(&self.bias)));
        match &self.lora {
            None => y,
            Some(l) => {
                let h = dropout(xc, l.dropout, train).linear::<Tensor>(&precision.cast(&l.a), None);
                y + h.linear::<Tensor>(&precision.cast(&l.b), None) * l.scaling
            }
        }
    }
}

/// Layer normalization over the last dimension, always computed in f32.
#[derive(Debug)]
pub struct LayerNorm {
    /// Scale, `[hidden]`.
    pub weight: Tensor,
    /// Shift, `[hidden]`.
    pub bias: Tensor,
    eps: f64,
    size: i64,
}

impl LayerNorm {
    /// Registers `p.weight` and `p.bias` (named `LayerNorm` by the caller, as in HF).
    pub fn new(p: &nn::Path<'_>, size: usize, eps: f64) -> Self {
        let n = size as i64;
        Self { weight: p.zeros("weight", &[n]), bias: p.zeros("bias", &[n]), eps, size: n }
    }

    /// `x: [.., hidden]` (any float dtype) → f32 `[.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = if x.kind() == Kind::Float { x.shallow_clone() } else { x.to_kind(Kind::Float) };
        x.layer_norm([self.size], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// A lookup table, `weight: [rows, dim]`.
#[derive(Debug)]
pub struct Embedding {
    /// `[num_embeddings, dim]`.
    pub weight: Tensor,
    /// Row that receives no gradient (`padding_idx` in PyTorch), if any.
    padding_idx: i64,
}

impl Embedding {
    /// Registers `p.weight`.
    pub fn new(p: &nn::Path<'_>, rows: usize, dim: usize, padding_idx: Option<i64>) -> Self {
        Self { weight: p.zeros("weight", &[rows as i64, dim as i64]), padding_idx: padding_idx.unwrap_or(-1) }
    }

    /// `ids: [..]` (int64) → `[.., dim]` f32.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, self.padding_idx, false, false)
    }
}

/// Dropout that is the identity outside training, like `nn.Dropout` in `eval()` mode.
pub fn dropout(x: Tensor, p: f64, train: bool) -> Tensor {
    if train && p > 0.0 {
        x.dropout(p, true)
    } else {
        x
    }
}
