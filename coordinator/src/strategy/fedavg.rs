//! FedAvg (McMahan et al., 2017) and FedProx (Li et al., 2020).
//!
//! Clients upload deltas `Δᵢ = wᵢ − x`; the actor folds them into the exact weighted sum
//! `Σ nᵢΔᵢ`, FedAvg divides it by `Σ nᵢ` into the example-weighted mean `Δ̄` and steps
//! `x ← x + η·Δ̄`. With η = 1 that is exactly the weighted
//! mean of the client models. FedProx aggregates the same way; its difference is on the clients,
//! which add `μ/2·‖w − x‖²` to their loss: μ travels in `FitInstructions::proximal_mu`.

use fedtune_shared::params::ParameterVector;
use fedtune_shared::round::{FitInstructions, PrivacyInstructions};

use super::{Aggregated, Draw, FitFailure, FitPlan, FitResults, RoundContext, Strategy, StrategyError};

/// Weighted FedAvg with a server learning rate; FedProx when `mu > 0`.
#[derive(Debug, Clone)]
pub struct FedAvg {
    server_learning_rate: f64,
    mu: f64,
}

impl FedAvg {
    /// `server_learning_rate` η > 0; `mu` ≥ 0 (0 = plain FedAvg).
    pub fn new(server_learning_rate: f64, mu: f64) -> Self {
        Self { server_learning_rate, mu }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &str {
        if self.mu > 0.0 {
            "fedprox"
        } else {
            "fedavg"
        }
    }

    fn configure_fit(&mut self, draw: &Draw, base: &FitInstructions) -> Result<FitPlan, StrategyError> {
        Ok(FitPlan {
            config: FitInstructions { proximal_mu: self.mu, ..base.clone() },
            privacy: PrivacyInstructions::NONE,
            context: RoundContext::new(draw),
        })
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
        let eta = self.server_learning_rate as f32;
        let mut next = global.clone();
        if eta == 1.0 {
            // Kept separate so that η = 1 is exactly `x + Δ̄` (no multiply rounding).
            for (x, d) in next.values_mut().iter_mut().zip(mean_delta.values()) {
                *x += d;
            }
        } else {
            for (x, d) in next.values_mut().iter_mut().zip(mean_delta.values()) {
                *x += eta * d;
            }
        }
        Ok(Some(Aggregated::uncharged(next)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::FixedPointSum;
    use fedtune_shared::ids::RoundId;
    use fedtune_shared::params::{Manifest, TensorSpec};

    fn manifest(n: usize) -> Manifest {
        Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![n] }]).unwrap()
    }

    fn pv(v: Vec<f32>) -> ParameterVector {
        ParameterVector::new(manifest(v.len()), v).unwrap()
    }

    /// The results of one round in which each `(delta, weight)` was folded.
    fn results(updates: &[(Vec<f32>, u64)]) -> FitResults {
        let n = updates[0].0.len();
        let mut sum = FixedPointSum::new(n);
        for (delta, weight) in updates {
            sum.fold_values(delta, *weight, 1.0);
        }
        FitResults::new(sum, manifest(n), vec![])
    }

    fn context() -> RoundContext {
        RoundContext::new(&Draw {
            round: RoundId::new(1, 0),
            candidates: 1,
            selected: 1,
            exposures: Default::default(),
            secure: None,
        })
    }

    fn step(s: &mut FedAvg, global: Vec<f32>, r: FitResults) -> Result<Vec<f32>, StrategyError> {
        Ok(s.aggregate_fit(&context(), &pv(global), r, &[])?.unwrap().params.values().to_vec())
    }

    #[test]
    fn fedavg_adds_the_mean_delta() {
        let mut s = FedAvg::new(1.0, 0.0);
        assert_eq!(step(&mut s, vec![1.0, 2.0], results(&[(vec![0.5, -1.0], 1)])).unwrap(), [1.5, 1.0]);
    }

    #[test]
    fn fedavg_divides_the_weighted_sum_by_the_total_weight() {
        let mut s = FedAvg::new(1.0, 0.0);
        let r = results(&[(vec![1.0], 3), (vec![-1.0], 1)]);
        assert_eq!(r.total_weight(), 4);
        assert_eq!(step(&mut s, vec![0.0], r).unwrap(), [0.5]);
    }

    #[test]
    fn the_server_learning_rate_scales_the_step() {
        let mut s = FedAvg::new(0.5, 0.0);
        assert_eq!(step(&mut s, vec![1.0], results(&[(vec![1.0], 1)])).unwrap(), [1.5]);
    }

    #[test]
    fn fedprox_sends_mu_to_clients() {
        let mut s = FedAvg::new(1.0, 0.01);
        let base = FitInstructions {
            epochs: 1,
            batch_size: 8,
            learning_rate: 1e-4,
            proximal_mu: 0.0,
            max_steps: None,
            seed: 0,
            lr_schedule: fedtune_shared::schedule::LrSchedule::Constant,
            warmup_steps: 0,
            update_encoding: Default::default(),
        };
        let draw = Draw {
            round: RoundId::new(1, 0),
            candidates: 2,
            selected: 2,
            exposures: Default::default(),
            secure: None,
        };
        assert_eq!(s.configure_fit(&draw, &base).unwrap().config.proximal_mu, 0.01);
        assert_eq!(s.name(), "fedprox");
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let mut s = FedAvg::new(1.0, 0.0);
        assert!(step(&mut s, vec![1.0], results(&[(vec![1.0, 2.0], 1)])).is_err());
    }
}
