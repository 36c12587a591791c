//! Adaptive server optimizers: FedAdagrad, FedAdam, FedYogi (Reddi et al., "Adaptive Federated
//! Optimization", ICLR 2021, Algorithm 2).
//!
//! With the example-weighted mean delta Δ̄ (the round's exact sum over its total weight) as
//! pseudo-gradient, per coordinate:
//!
//! ```text
//! m ← β₁·m + (1 − β₁)·Δ̄
//! v ← v + Δ̄²                              (FedAdagrad)
//! v ← β₂·v + (1 − β₂)·Δ̄²                  (FedAdam)
//! v ← v − (1 − β₂)·Δ̄²·sign(v − Δ̄²)        (FedYogi)
//! x ← x + η·m / (√v + τ)
//! ```
//!
//! As in the paper, m starts at 0 and v at τ² (its `v₋₁ ≥ τ²`), without bias correction. The
//! moments are server state: they are checkpointed with the model (`strategy-NNNNNN.safetensors`)
//! so a restarted coordinator continues the same optimizer trajectory.

use fedtune_shared::params::{Manifest, ParameterVector, TensorSpec};

use super::{Aggregated, FitFailure, FitResults, RoundContext, Strategy, StrategyError};
use crate::settings::AdaptiveSettings;

/// Which second-moment rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdaptiveKind {
    /// FedAdagrad.
    Adagrad,
    /// FedAdam.
    Adam,
    /// FedYogi.
    Yogi,
}

/// FedAdagrad / FedAdam / FedYogi.
#[derive(Debug, Clone)]
pub struct Adaptive {
    kind: AdaptiveKind,
    eta: f64,
    beta1: f64,
    beta2: f64,
    tau: f64,
    /// First moment, allocated on the first round (its length is the trainable size).
    m: Vec<f32>,
    /// Second moment.
    v: Vec<f32>,
}

impl Adaptive {
    /// A fresh optimizer.
    pub fn new(kind: AdaptiveKind, s: &AdaptiveSettings) -> Self {
        Self {
            kind,
            eta: s.server_learning_rate,
            beta1: s.beta1,
            beta2: s.beta2,
            tau: s.tau,
            m: vec![],
            v: vec![],
        }
    }

    fn state_manifest(n: usize) -> Manifest {
        Manifest::new(vec![
            TensorSpec { name: "m".into(), shape: vec![n] },
            TensorSpec { name: "v".into(), shape: vec![n] },
        ])
        .expect("distinct names")
    }
}

impl Strategy for Adaptive {
    fn name(&self) -> &str {
        match self.kind {
            AdaptiveKind::Adagrad => "fedadagrad",
            AdaptiveKind::Adam => "fedadam",
            AdaptiveKind::Yogi => "fedyogi",
        }
    }

    fn aggregate_fit(
        &mut self,
        _round: &RoundContext,
        global: &ParameterVector,
        results: FitResults,
        _failures: &[FitFailure],
    ) -> Result<Option<Aggregated>, StrategyError> {
        global.manifest().ensure_same(&results.manifest)?;
        let mean_delta = results.into_mean_delta()?;
        let n = global.values().len();
        if self.m.is_empty() {
            self.m = vec![0.0; n];
            self.v = vec![(self.tau * self.tau) as f32; n];
        } else if self.m.len() != n {
            return Err(StrategyError::State(format!(
                "optimizer state has {} values, model {n}",
                self.m.len()
            )));
        }
        let (b1, b2, tau, eta) = (self.beta1, self.beta2, self.tau, self.eta);
        let mut next = global.clone();
        for (((x, &d), m), v) in
            next.values_mut().iter_mut().zip(mean_delta.values()).zip(&mut self.m).zip(&mut self.v)
        {
            let d = f64::from(d);
            let mm = b1 * f64::from(*m) + (1.0 - b1) * d;
            let vv = f64::from(*v);
            let d2 = d * d;
            let vv = match self.kind {
                AdaptiveKind::Adagrad => vv + d2,
                AdaptiveKind::Adam => b2 * vv + (1.0 - b2) * d2,
                AdaptiveKind::Yogi => vv - (1.0 - b2) * d2 * (vv - d2).signum(),
            };
            *m = mm as f32;
            *v = vv as f32;
            *x = (f64::from(*x) + eta * mm / (vv.max(0.0).sqrt() + tau)) as f32;
        }
        Ok(Some(Aggregated::uncharged(next)))
    }

    fn state(&self) -> Option<ParameterVector> {
        if self.m.is_empty() {
            return None;
        }
        let mut values = self.m.clone();
        values.extend_from_slice(&self.v);
        ParameterVector::new(Self::state_manifest(self.m.len()), values).ok()
    }

    fn restore_state(&mut self, state: ParameterVector) -> Result<(), StrategyError> {
        let (manifest, values) = state.into_parts();
        let n = values.len() / 2;
        if manifest != Self::state_manifest(n) {
            return Err(StrategyError::State("saved state is not an (m, v) pair of equal length".into()));
        }
        self.m = values[..n].to_vec();
        self.v = values[n..].to_vec();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::FixedPointSum;
    use crate::strategy::Draw;
    use fedtune_shared::ids::RoundId;

    fn manifest(n: usize) -> Manifest {
        Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![n] }]).unwrap()
    }

    fn pv(v: Vec<f32>) -> ParameterVector {
        ParameterVector::new(manifest(v.len()), v).unwrap()
    }

    fn settings() -> AdaptiveSettings {
        AdaptiveSettings { server_learning_rate: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 }
    }

    fn step(s: &mut Adaptive, x: f32, d: f32) -> f32 {
        let mut sum = FixedPointSum::new(1);
        sum.fold_values(&[d], 1, 1.0);
        let r = FitResults::new(sum, manifest(1), vec![]);
        let round = RoundContext::new(&Draw {
            round: RoundId::new(1, 0),
            candidates: 1,
            selected: 1,
            exposures: Default::default(),
            secure: None,
        });
        s.aggregate_fit(&round, &pv(vec![x]), r, &[]).unwrap().unwrap().params.values()[0]
    }

    #[test]
    fn fedadam_first_step_matches_the_closed_form() {
        let mut s = Adaptive::new(AdaptiveKind::Adam, &settings());
        let d = 0.5f64;
        let m = 0.1 * d;
        let v = 0.99 * 1e-6 + 0.01 * d * d;
        let expected = 1.0 + 0.1 * m / (v.sqrt() + 1e-3);
        assert!((f64::from(step(&mut s, 1.0, 0.5)) - expected).abs() < 1e-6);
    }

    #[test]
    fn fedadagrad_accumulates_squares() {
        let mut s = Adaptive::new(AdaptiveKind::Adagrad, &settings());
        step(&mut s, 0.0, 1.0);
        step(&mut s, 0.0, 1.0);
        assert!((f64::from(s.v[0]) - (1e-6 + 2.0)).abs() < 1e-6);
    }

    #[test]
    fn fedyogi_moves_v_towards_the_square_additively() {
        let mut s = Adaptive::new(AdaptiveKind::Yogi, &settings());
        step(&mut s, 0.0, 1.0);
        // v0 = τ² < Δ² = 1, so v grows by (1 − β₂)·Δ².
        assert!((f64::from(s.v[0]) - (1e-6 + 0.01)).abs() < 1e-7);
    }

    #[test]
    fn state_survives_a_save_and_restore() {
        let mut a = Adaptive::new(AdaptiveKind::Adam, &settings());
        step(&mut a, 1.0, 0.3);
        let mut b = Adaptive::new(AdaptiveKind::Adam, &settings());
        b.restore_state(a.state().unwrap()).unwrap();
        assert_eq!(step(&mut a, 1.0, -0.2), step(&mut b, 1.0, -0.2));
    }
}
