//! AdamW with transformers' parameter grouping, linear warm-up/decay and gradient clipping.
//!
//! The optimizer is libtorch's own `torch::optim::AdamW` (decoupled weight decay, as
//! `torch.optim.AdamW`), fed an explicit list of tensors in two groups: weights decay, biases
//! and LayerNorm weights do not (transformers' `Trainer` default). Building it from an explicit
//! list rather than from the whole `VarStore` is what lets partial fine-tuning leave frozen
//! tensors out entirely.

use tch::{COptimizer, TchError, Tensor};

/// AdamW hyper-parameters (transformers' `TrainingArguments` defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay for weight matrices and embeddings.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// True for tensors that get no weight decay: biases and LayerNorm weights.
pub fn exempt_from_decay(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("LayerNorm.")
}

/// AdamW over named trainable tensors.
#[derive(Debug)]
pub struct AdamW {
    opt: COptimizer,
    params: Vec<Tensor>,
}

impl AdamW {
    const DECAY: usize = 0;
    const NO_DECAY: usize = 1;

    /// An optimizer for `params` (which must require gradients), at learning rate `lr`.
    pub fn new(params: &[(String, Tensor)], config: AdamWConfig, lr: f64) -> Result<Self, TchError> {
        let mut opt = COptimizer::adamw(lr, config.beta1, config.beta2, config.weight_decay, config.eps, false)?;
        for (name, t) in params {
            let group = if exempt_from_decay(name) { Self::NO_DECAY } else { Self::DECAY };
            opt.add_parameters(t, group)?;
        }
        if params.iter().any(|(n, _)| exempt_from_decay(n)) {
            opt.set_weight_decay_group(Self::NO_DECAY, 0.0)?;
        }
        Ok(Self { opt, params: params.iter().map(|(_, t)| t.shallow_clone()).collect() })
    }

    /// Sets the learning rate of every group.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), TchError> {
        self.opt.set_learning_rate(lr)
    }

    /// Drops the gradients.
    pub fn zero_grad(&mut self) -> Result<(), TchError> {
        self.opt.zero_grad()
    }

    /// Applies one update from the current gradients.
    pub fn step(&mut self) -> Result<(), TchError> {
        self.opt.step()
    }

    /// Scales the gradients so that their joint L2 norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` does (without a host sync: the factor stays a tensor).
    /// Returns the norm before clipping as a 0-d tensor.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Option<Tensor> {
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return None;
        }
        tch::no_grad(|| {
            let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
            let total = Tensor::stack(&norms, 0).norm();
            if max_norm > 0.0 {
                let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
                for mut g in grads {
                    let _ = g.g_mul_(&coef);
                }
            }
            Some(total)
        })
    }
}

/// transformers' `get_linear_schedule_with_warmup`: the factor rises linearly from 0 to 1 over
/// `warmup` steps, then falls linearly to 0 at `total`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    /// Warm-up steps.
    pub warmup: u64,
    /// Total optimizer steps.
    pub total: u64,
}

impl LinearSchedule {
    /// Warm-up over `ratio` of `total` steps (rounded up, as transformers does).
    pub fn with_warmup_ratio(total: u64, ratio: f64) -> Self {
        Self { warmup: (total as f64 * ratio.clamp(0.0, 1.0)).ceil() as u64, total }
    }

    /// Learning-rate factor for optimizer step `step` (0-based).
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup {
            return step as f64 / self.warmup.max(1) as f64;
        }
        let remaining = self.total.saturating_sub(step) as f64;
        (remaining / self.total.saturating_sub(self.warmup).max(1) as f64).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn the_schedule_warms_up_then_decays_to_zero() {
        let s = LinearSchedule::with_warmup_ratio(10, 0.2);
        assert_eq!(s.warmup, 2);
        let f: Vec<f64> = (0..=10).map(|i| s.factor(i)).collect();
        assert_eq!(&f[..3], &[0.0, 0.5, 1.0]);
        assert!((f[6] - 0.5).abs() < 1e-12);
        assert_eq!(f[10], 0.0);
        assert_eq!(LinearSchedule::with_warmup_ratio(10, 0.0).factor(0), 1.0);
    }

    #[test]
    fn biases_and_layer_norms_are_exempt_from_decay() {
        assert!(exempt_from_decay("bert.encoder.layer.0.output.dense.bias"));
        assert!(exempt_from_decay("bert.embeddings.LayerNorm.weight"));
        assert!(!exempt_from_decay("classifier.weight"));
    }

    #[test]
    fn one_adamw_step_matches_the_closed_form() {
        // After one step, Adam moves each coordinate by lr·g/(|g|+eps') ≈ lr·sign(g), and
        // decoupled decay shrinks the weight by lr·wd; the bias is not decayed.
        let w = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
        let params = vec![("l.weight".to_string(), w.shallow_clone()), ("l.bias".to_string(), b.shallow_clone())];
        let mut opt = AdamW::new(&params, AdamWConfig { weight_decay: 0.1, ..Default::default() }, 0.01).unwrap();
        let loss = (&w * Tensor::from_slice(&[3.0f32, -4.0])).sum(Kind::Float) + b.sum(Kind::Float) * 2.0;
        loss.backward();
        opt.step().unwrap();
        let w: Vec<f32> = Vec::try_from(&w.to_device(Device::Cpu)).unwrap();
        let b: Vec<f32> = Vec::try_from(&b).unwrap();
        assert!((w[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6, "{w:?}");
        assert!((w[1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6, "{w:?}");
        assert!((b[0] - (0.5 - 0.01)).abs() < 1e-6, "{b:?}");
    }

    #[test]
    fn clipping_scales_the_joint_norm_down_to_the_limit() {
        let w = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        let params = vec![("w".to_string(), w.shallow_clone())];
        let opt = AdamW::new(&params, AdamWConfig::default(), 0.1).unwrap();
        (&w * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let before = f64::try_from(opt.clip_grad_norm(1.0).unwrap()).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        let g: Vec<f32> = Vec::try_from(&w.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5, "{g:?}");
    }
}
