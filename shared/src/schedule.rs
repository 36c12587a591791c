//! The local learning-rate schedule: the factor the peak rate is multiplied by at each optimizer
//! step of one fit, with transformers' semantics (`get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup` with half a cycle).
//!
//! A federation chooses the shape and the warm-up (`[fit] lr_schedule`, `warmup_steps`) and sends
//! them in every fit task, so every client of a round follows the same rule; `fedtune-client
//! train` chooses its own. Flower's clients and most federated-learning papers train each round
//! at a constant local rate, hence the federation's default [`LrSchedule::Constant`]: a linear
//! decay to zero inside every round halves the mean rate the operator configured.
//!
//! Steps are 0-based and the factor of step `s` is the one its update uses, as with PyTorch's
//! `LambdaLR` (the first update uses `factor(0)`, which is 0 under any warm-up).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The shape of the rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The peak rate at every step (transformers' `constant_with_warmup`).
    #[default]
    Constant,
    /// Falls linearly from the peak to 0 at the last step (transformers' `linear`).
    Linear,
    /// Half a cosine from the peak to 0 at the last step (transformers' `cosine`).
    Cosine,
}

impl LrSchedule {
    /// Every shape, in the order settings and flags list them.
    pub const ALL: [LrSchedule; 3] = [LrSchedule::Constant, LrSchedule::Linear, LrSchedule::Cosine];

    /// The name settings, flags and logs use.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Linear => "linear",
            LrSchedule::Cosine => "cosine",
        }
    }

    /// Learning-rate factor for optimizer step `step` (0-based) of a fit of `total` steps whose
    /// first `warmup` steps raise the rate linearly from 0.
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let after_warmup = total.saturating_sub(warmup).max(1) as f64;
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear => (total.saturating_sub(step) as f64 / after_warmup).max(0.0),
            LrSchedule::Cosine => {
                // transformers: 0.5·(1 + cos(π·2·num_cycles·progress)) with num_cycles = 0.5;
                // progress may pass 1 after `total`, where the factor is held at 0.
                let progress = ((step - warmup) as f64 / after_warmup).min(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LrSchedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            format!("unknown learning-rate schedule `{s}` (use {})", names.join(", "))
        })
    }
}

/// How long the warm-up of one fit lasts: a step count, or a fraction of the fit's steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    /// This many optimizer steps (what a federation sends).
    Steps(u64),
    /// This fraction of the fit's steps, in [0, 1] (what `fedtune-client train` defaults to).
    Ratio(f64),
}

impl Warmup {
    /// Warm-up steps of a fit of `total` steps. A ratio is rounded up, as transformers'
    /// `TrainingArguments.get_warmup_steps` does.
    pub fn steps(self, total: u64) -> u64 {
        match self {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (total as f64 * r.clamp(0.0, 1.0)).ceil() as u64,
        }
    }
}

impl Default for Warmup {
    fn default() -> Self {
        Warmup::Steps(0)
    }
}

/// The factor of every step of one fit: a shape, its warm-up and the fit's length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSchedule {
    /// Shape after warm-up.
    pub shape: LrSchedule,
    /// Warm-up steps.
    pub warmup: u64,
    /// Optimizer steps of the fit.
    pub total: u64,
}

impl StepSchedule {
    /// The schedule of a fit of `total` steps.
    pub fn new(shape: LrSchedule, warmup: Warmup, total: u64) -> Self {
        Self { shape, warmup: warmup.steps(total), total }
    }

    /// Learning-rate factor for optimizer step `step` (0-based).
    pub fn factor(&self, step: u64) -> f64 {
        self.shape.factor(step, self.warmup, self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factors(shape: LrSchedule, warmup: u64, total: u64) -> Vec<f64> {
        (0..=total).map(|s| shape.factor(s, warmup, total)).collect()
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-12, "step {i}: {g} vs {w} ({got:?})");
        }
    }

    #[test]
    fn a_constant_schedule_keeps_the_peak_rate_at_every_step() {
        assert!(factors(LrSchedule::Constant, 0, 16).iter().all(|&f| f == 1.0));
        assert_eq!(LrSchedule::Constant.factor(1_000, 0, 16), 1.0, "even past the fit's length");
    }

    #[test]
    fn a_constant_schedule_with_warmup_rises_then_holds() {
        assert_close(&factors(LrSchedule::Constant, 4, 8), &[0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn a_linear_schedule_falls_from_the_peak_to_zero_at_the_last_step() {
        assert_close(&factors(LrSchedule::Linear, 0, 4), &[1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(LrSchedule::Linear.factor(9, 0, 4), 0.0, "never negative past the end");
    }

    #[test]
    fn a_linear_schedule_with_warmup_matches_transformers() {
        // transformers: step < w ? step/w : max(0, (total − step)/(total − w)); w = 2, total = 10.
        let want: Vec<f64> =
            (0..=10u64).map(|s| if s < 2 { s as f64 / 2.0 } else { (10 - s) as f64 / 8.0 }).collect();
        assert_close(&factors(LrSchedule::Linear, 2, 10), &want);
        assert_close(&factors(LrSchedule::Linear, 2, 10)[..3], &[0.0, 0.5, 1.0]);
        assert!((LrSchedule::Linear.factor(6, 2, 10) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn a_cosine_schedule_follows_half_a_cosine_to_zero() {
        // Hand-computed: 0.5·(1 + cos(π·p)) at p = 0, ¼, ½, ¾, 1.
        let c = 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
        assert_close(&factors(LrSchedule::Cosine, 0, 4), &[1.0, c, 0.5, 1.0 - c, 0.0]);
        assert_eq!(LrSchedule::Cosine.factor(7, 0, 4), 0.0, "held at zero past the end");
    }

    #[test]
    fn a_cosine_schedule_with_warmup_matches_transformers() {
        // transformers' get_cosine_schedule_with_warmup(num_cycles = 0.5), w = 3, total = 11.
        let (w, total) = (3u64, 11u64);
        let want: Vec<f64> = (0..=total)
            .map(|s| {
                if s < w {
                    s as f64 / w as f64
                } else {
                    let p = (s - w) as f64 / (total - w) as f64;
                    (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * p).cos())).max(0.0)
                }
            })
            .collect();
        assert_close(&factors(LrSchedule::Cosine, w, total), &want);
    }

    #[test]
    fn a_warmup_ratio_rounds_up_like_transformers() {
        assert_eq!(Warmup::Ratio(0.1).steps(16), 2, "⌈1.6⌉");
        assert_eq!(Warmup::Ratio(0.2).steps(10), 2);
        assert_eq!(Warmup::Ratio(0.0).steps(10), 0);
        assert_eq!(Warmup::Steps(3).steps(10), 3);
        let s = StepSchedule::new(LrSchedule::Linear, Warmup::Ratio(0.2), 10);
        assert_eq!((s.warmup, s.factor(0), s.factor(2), s.factor(10)), (2, 0.0, 1.0, 0.0));
    }

    #[test]
    fn a_fit_of_no_steps_or_all_warmup_never_divides_by_zero() {
        for shape in LrSchedule::ALL {
            assert!(shape.factor(0, 0, 0).is_finite());
            assert_eq!(shape.factor(0, 0, 1), 1.0, "{shape}: the only step runs at the peak");
            assert!(shape.factor(5, 5, 5).is_finite());
        }
    }

    #[test]
    fn schedule_names_round_trip_and_unknown_ones_are_refused() {
        for shape in LrSchedule::ALL {
            assert_eq!(shape.name().parse::<LrSchedule>().unwrap(), shape);
        }
        let err = "step".parse::<LrSchedule>().unwrap_err();
        assert!(err.contains("step") && err.contains("constant, linear, cosine"), "{err}");
    }
}
