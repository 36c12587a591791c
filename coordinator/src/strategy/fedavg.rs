//! FedAvg (McMahan et al., 2017) and FedProx (Li et al., 2020).
//!
//! Clients upload deltas `Δᵢ = wᵢ − x`; the actor folds them into the example-weighted mean
//! `Δ̄ = Σ nᵢΔᵢ / Σ nᵢ`, and FedAvg steps `x ← x + η·Δ̄`. With η = 1 that is exactly the weighted
//! mean of the client models. FedProx aggregates the same way; its difference is on the clients,
//! which add `μ/2·‖w − x‖²` to their loss: μ travels in `FitInstructions::proximal_mu`.

use fedtune_shared::ids::RoundId;
use fedtune_shared::params::ParameterVector;
use fedtune_shared::round::{FitInstructions, PrivacyInstructions};

use super::{FitFailure, FitPlan, FitResults, Strategy, StrategyError};

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

    fn configure_fit(&mut self, _round: RoundId, base: &FitInstructions) -> Result<FitPlan, StrategyError> {
        Ok(FitPlan {
            config: FitInstructions { proximal_mu: self.mu, ..base.clone() },
            privacy: PrivacyInstructions::NONE,
        })
    }

    fn aggregate_fit(
        &mut self,
        _round: RoundId,
        global: &ParameterVector,
        results: &FitResults,
        _failures: &[FitFailure],
    ) -> Result<Option<ParameterVector>, StrategyError> {
        global.manifest().ensure_same(results.mean_delta.manifest())?;
        let eta = self.server_learning_rate as f32;
        let mut next = global.clone();
        if eta == 1.0 {
            // Kept separate so that η = 1 is exactly `x + Δ̄` (no multiply rounding).
            for (x, d) in next.values_mut().iter_mut().zip(results.mean_delta.values()) {
                *x += d;
            }
        } else {
            for (x, d) in next.values_mut().iter_mut().zip(results.mean_delta.values()) {
                *x += eta * d;
            }
        }
        Ok(Some(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_shared::params::{Manifest, TensorSpec};

    fn pv(v: Vec<f32>) -> ParameterVector {
        let m = Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![v.len()] }]).unwrap();
        ParameterVector::new(m, v).unwrap()
    }

    fn results(delta: Vec<f32>) -> FitResults {
        FitResults { mean_delta: pv(delta), total_weight: 1, clients: vec![] }
    }

    #[test]
    fn fedavg_adds_the_mean_delta() {
        let mut s = FedAvg::new(1.0, 0.0);
        let next =
            s.aggregate_fit(RoundId::new(1, 0), &pv(vec![1.0, 2.0]), &results(vec![0.5, -1.0]), &[]).unwrap();
        assert_eq!(next.unwrap().values(), &[1.5, 1.0]);
    }

    #[test]
    fn the_server_learning_rate_scales_the_step() {
        let mut s = FedAvg::new(0.5, 0.0);
        let next = s.aggregate_fit(RoundId::new(1, 0), &pv(vec![1.0]), &results(vec![1.0]), &[]).unwrap();
        assert_eq!(next.unwrap().values(), &[1.5]);
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
        };
        assert_eq!(s.configure_fit(RoundId::new(1, 0), &base).unwrap().config.proximal_mu, 0.01);
        assert_eq!(s.name(), "fedprox");
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let mut s = FedAvg::new(1.0, 0.0);
        assert!(s.aggregate_fit(RoundId::new(1, 0), &pv(vec![1.0]), &results(vec![1.0, 2.0]), &[]).is_err());
    }
}
