//! AdamW with transformers' parameter grouping, and gradient clipping. The learning-rate schedule
//! the caller passes each step is `fedtune_shared::schedule`'s (one home for both binaries' rule).
//!
//! The update is `torch.optim.AdamW`'s (decoupled weight decay; weights decay, biases and
//! LayerNorm weights do not, transformers' `Trainer` default), but applied to all trainable
//! tensors at once: at construction their storage is moved into one flat buffer (each variable
//! becomes a view into it, decaying tensors first), gradients are taken with `autograd.grad` and
//! concatenated, and clipping plus the Adam update are about ten whole-buffer kernels per step
//! instead of ten per tensor. On the CPU each kernel is a parallel region, so a per-tensor loop
//! over a BERT's ~100 tensors spends much of a step in thread barriers; on a GPU it is launches.
//! Building it from an explicit list rather than from the whole `VarStore` is also what lets
//! partial fine-tuning leave frozen tensors out entirely.

use tch::{Kind, TchError, Tensor};

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

/// AdamW over named trainable f32 tensors, which it re-homes into one flat buffer.
#[derive(Debug)]
pub struct AdamW {
    /// The variables, in buffer order (decaying first); each is now a view into `flat`.
    params: Vec<Tensor>,
    /// All parameter values, `[n]`.
    flat: Tensor,
    /// Elements at the start of `flat` that decay.
    n_decay: i64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    config: AdamWConfig,
    step: u64,
}

impl AdamW {
    /// An optimizer for `params` (f32, requiring gradients, on one device). Their values are
    /// copied into the optimizer's buffer and the variables are pointed at it, so every holder
    /// of the variables (model, `VarStore`) sees the updates.
    pub fn new(params: &[(String, Tensor)], config: AdamWConfig) -> Result<Self, TchError> {
        let decays = |(name, _): &&(String, Tensor)| !exempt_from_decay(name);
        let decay: Vec<&Tensor> = params.iter().filter(decays).map(|(_, t)| t).collect();
        let ordered: Vec<&Tensor> =
            decay.iter().copied().chain(params.iter().filter(|p| !decays(p)).map(|(_, t)| t)).collect();
        let device = ordered.first().map_or(tch::Device::Cpu, |t| t.device());
        if let Some((name, t)) = params.iter().find(|(_, t)| t.kind() != Kind::Float || t.device() != device)
        {
            return Err(TchError::Kind(format!(
                "AdamW needs f32 tensors on one device; `{name}` is {:?} on {:?}",
                t.kind(),
                t.device()
            )));
        }
        let numel = |t: &Tensor| t.numel() as i64;
        let n: i64 = ordered.iter().map(|t| numel(t)).sum();
        let n_decay: i64 = decay.iter().map(|t| numel(t)).sum();
        let flat = Tensor::f_zeros([n], (Kind::Float, device))?;
        tch::no_grad(|| -> Result<(), TchError> {
            let mut offset = 0;
            for t in &ordered {
                let view = flat.f_narrow(0, offset, numel(t))?.f_view(t.size().as_slice())?;
                view.shallow_clone().f_copy_(t)?;
                t.shallow_clone().f_set_data(&view)?;
                offset += numel(t);
            }
            Ok(())
        })?;
        Ok(Self {
            params: ordered.into_iter().map(Tensor::shallow_clone).collect(),
            exp_avg: flat.f_zeros_like()?,
            exp_avg_sq: flat.f_zeros_like()?,
            flat,
            n_decay,
            config,
            step: 0,
        })
    }

    /// Back-propagates `loss` to the parameters, scales the gradients so that their joint L2
    /// norm is at most `max_grad_norm` (as `torch.nn.utils.clip_grad_norm_`; 0 disables), and
    /// applies one AdamW update at learning rate `lr`. Returns the norm before clipping (a 0-d
    /// tensor on the device: reading it is the caller's choice, it waits for the device).
    pub fn backward_step(&mut self, loss: &Tensor, lr: f64, max_grad_norm: f64) -> Result<Tensor, TchError> {
        // `autograd.grad` rather than `backward`: nothing accumulates in `.grad`, so there is
        // nothing to zero, tensor by tensor, before the next step.
        let grads = Tensor::f_run_backward(&[loss], &self.params, false, false)?;
        tch::no_grad(|| {
            let pieces = grads
                .iter()
                .zip(&self.params)
                .map(|(g, p)| if g.defined() { g.f_reshape([-1]) } else { p.f_zeros_like()?.f_reshape([-1]) })
                .collect::<Result<Vec<_>, _>>()?;
            drop(grads);
            let mut g = Tensor::f_cat(&pieces, 0)?;
            drop(pieces);
            let norm = g.f_norm()?;
            if max_grad_norm > 0.0 {
                let coef = (max_grad_norm / (&norm + 1e-6)).f_clamp_max(1.0)?;
                let _ = g.f_mul_(&coef)?;
            }
            self.apply(g, lr)?;
            Ok(norm)
        })
    }

    /// The AdamW update from the flat gradient `g` (consumed as scratch space).
    fn apply(&mut self, mut g: Tensor, lr: f64) -> Result<(), TchError> {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        self.step += 1;
        if weight_decay != 0.0 && lr != 0.0 && self.n_decay > 0 {
            let _ = self.flat.f_narrow(0, 0, self.n_decay)?.f_mul_scalar_(1.0 - lr * weight_decay)?;
        }
        let _ = self.exp_avg.f_lerp_(&g, 1.0 - beta1)?;
        // v ← β₂v + (1−β₂)g², as a lerp towards g² (computed in place: g is not needed again).
        let _ = g.f_mul_(&g.shallow_clone())?;
        let _ = self.exp_avg_sq.f_lerp_(&g, 1.0 - beta2)?;
        if lr == 0.0 {
            return Ok(());
        }
        let bias_correction1 = 1.0 - beta1.powf(self.step as f64);
        let bias_correction2 = 1.0 - beta2.powf(self.step as f64);
        let step_size = lr / bias_correction1;
        // p ← p − step·m/(√v/√bc₂ + ε), with the scale folded into the denominator so that the
        // whole update is one addcdiv: p + m/d with d = −(√v/√bc₂ + ε)/step.
        let mut d = self.exp_avg_sq.f_sqrt()?;
        let _ = d.f_mul_scalar_(-1.0 / (step_size * bias_correction2.sqrt()))?;
        let _ = d.f_add_scalar_(-eps / step_size)?;
        let _ = self.flat.f_addcdiv_(&self.exp_avg, &d)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn biases_and_layer_norms_are_exempt_from_decay() {
        assert!(exempt_from_decay("bert.encoder.layer.0.output.dense.bias"));
        assert!(exempt_from_decay("bert.embeddings.LayerNorm.weight"));
        assert!(!exempt_from_decay("classifier.weight"));
    }

    fn params(values: &[&[f32]]) -> Vec<(String, Tensor)> {
        let names = ["l.weight", "l.bias", "LayerNorm.weight"];
        values
            .iter()
            .zip(names)
            .map(|(v, n)| (n.to_string(), Tensor::from_slice(v).set_requires_grad(true)))
            .collect()
    }

    fn read(t: &Tensor) -> Vec<f32> {
        Vec::try_from(&t.detach().to_device(Device::Cpu)).unwrap()
    }

    #[test]
    fn one_adamw_step_matches_the_closed_form() {
        // After one step, Adam moves each coordinate by lr·g/(|g|+eps) ≈ lr·sign(g), and
        // decoupled decay shrinks the weight by lr·wd; the bias is not decayed.
        let p = params(&[&[1.0, -2.0], &[0.5]]);
        let mut opt = AdamW::new(&p, AdamWConfig { weight_decay: 0.1, ..Default::default() }).unwrap();
        let loss =
            (&p[0].1 * Tensor::from_slice(&[3.0f32, -4.0])).sum(Kind::Float) + p[1].1.sum(Kind::Float) * 2.0;
        let _ = opt.backward_step(&loss, 0.01, 0.0).unwrap();
        let (w, b) = (read(&p[0].1), read(&p[1].1));
        assert!((w[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6, "{w:?}");
        assert!((w[1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6, "{w:?}");
        assert!((b[0] - (0.5 - 0.01)).abs() < 1e-6, "{b:?}");
    }

    #[test]
    fn several_steps_match_libtorchs_own_adamw() {
        let init: [&[f32]; 3] = [&[0.3, -1.2, 2.0, 0.7], &[0.1, -0.4], &[1.0, 0.9]];
        let ours = params(&init);
        let reference = params(&init);
        let mut opt = AdamW::new(&ours, AdamWConfig::default()).unwrap();
        let mut libtorch = tch::COptimizer::adamw(1.0, 0.9, 0.999, 0.01, 1e-8, false).unwrap();
        for (name, t) in &reference {
            libtorch.add_parameters(t, usize::from(exempt_from_decay(name))).unwrap();
        }
        libtorch.set_weight_decay_group(1, 0.0).unwrap();
        let x = Tensor::from_slice(&[0.5f32, -1.5]);
        let loss = |p: &[(String, Tensor)]| {
            let w = p[0].1.view([2, 2]);
            let y = (w.matmul(&x) + &p[1].1) * &p[2].1;
            (y.square().sum(Kind::Float) + p[0].1.sum(Kind::Float)) * 0.5
        };
        for (step, lr) in [0.0, 0.05, 0.1, 0.07, 0.02].into_iter().enumerate() {
            let _ = opt.backward_step(&loss(&ours), lr, 0.0).unwrap();
            libtorch.zero_grad().unwrap();
            loss(&reference).backward();
            libtorch.set_learning_rate(lr).unwrap();
            libtorch.step().unwrap();
            for ((name, a), (_, b)) in ours.iter().zip(&reference) {
                let (a, b) = (read(a), read(b));
                let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                assert!(diff < 1e-5, "step {step}, {name}: {a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn clipping_scales_the_joint_norm_down_to_the_limit() {
        let p = params(&[&[0.0, 0.0]]);
        let mut opt = AdamW::new(&p, AdamWConfig::default()).unwrap();
        let loss = (&p[0].1 * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float);
        let norm = f64::try_from(opt.backward_step(&loss, 0.0, 1.0).unwrap()).unwrap();
        assert!((norm - 5.0).abs() < 1e-5);
        // The first moment after one step is (1−β₁)·g with the clipped g = (0.6, 0.8).
        let m = read(&opt.exp_avg);
        assert!((m[0] - 0.06).abs() < 1e-6 && (m[1] - 0.08).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn the_variables_become_views_of_the_optimizers_buffer() {
        let p = params(&[&[1.0, 2.0], &[3.0]]);
        let opt = AdamW::new(&p, AdamWConfig::default()).unwrap();
        assert_eq!(read(&opt.flat), vec![1.0, 2.0, 3.0], "weights first, then exempt tensors");
        let _ = opt.flat.shallow_clone().fill_(7.0);
        assert_eq!(read(&p[1].1), vec![7.0]);
        assert!(p[0].1.requires_grad());
    }
}
