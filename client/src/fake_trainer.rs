//! A deterministic stand-in for the BERT trainer, for tests and for process-level scenarios.
//!
//! Federated plumbing (joining, streaming, retries, aggregation, crash recovery) should be
//! testable in milliseconds and without libtorch. [`FakeTrainer`] implements [`LocalTrainer`]
//! with a tiny, fully predictable learning problem: every client pulls the weights towards its
//! own target vector, the client targets scatter around one population target, and evaluation
//! measures the distance of the global weights to that population target. So FedAvg of fake
//! clients really converges, a test can assert "loss falls, accuracy rises", and the update any
//! client sends is a closed-form function of the global weights, its seed and its rate.
//!
//! `fedtune-client run --fake-trainer` uses it, so that multi-process tests exercise the real
//! binary end to end.

use std::time::Duration;

use fedtune_shared::params::{Manifest, ParameterVector};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::local_trainer::{EvalOutcome, FitConfig, FitOutcome, LocalTrainer, TrainerError};

/// Seed of the population target, shared by every fake client so that they agree on it.
const POPULATION_SEED: u64 = 0x0fed_7a11;

/// How a [`FakeTrainer`] behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeTrainerConfig {
    /// Distinguishes clients: their targets and thus their updates differ by seed.
    pub seed: u64,
    /// Training examples reported by `fit` (the FedAvg weight).
    pub num_train_examples: u64,
    /// Held-out examples reported by `evaluate`.
    pub num_eval_examples: u64,
    /// Fraction of the way towards its target that one local round moves the weights, in (0, 1].
    pub rate: f32,
    /// Spread of client targets around the population target (0 = IID clients).
    pub heterogeneity: f32,
    /// Wall time one `fit` takes (slept on the trainer's thread), so that tests can kill or stop
    /// a client while it trains.
    pub fit_delay: Duration,
}

impl Default for FakeTrainerConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            num_train_examples: 100,
            num_eval_examples: 20,
            rate: 0.5,
            heterogeneity: 0.1,
            fit_delay: Duration::ZERO,
        }
    }
}

/// A [`LocalTrainer`] whose "training" is a closed-form pull towards a per-client target.
#[derive(Debug, Clone)]
pub struct FakeTrainer {
    manifest: Manifest,
    config: FakeTrainerConfig,
    /// The point every client's target scatters around; evaluation measures distance to it.
    population: Vec<f32>,
    /// This client's optimum.
    target: Vec<f32>,
}

impl FakeTrainer {
    /// A fake trainer that "trains" every tensor of `manifest`.
    pub fn new(manifest: Manifest, config: FakeTrainerConfig) -> Self {
        let n = manifest.numel();
        let mut population_rng = StdRng::seed_from_u64(POPULATION_SEED);
        let population: Vec<f32> = (0..n).map(|_| population_rng.random_range(-1.0..1.0)).collect();
        let mut client_rng = StdRng::seed_from_u64(config.seed ^ 0x5eed_c11e);
        let target = population
            .iter()
            .map(|p| p + config.heterogeneity * client_rng.random_range(-1.0f32..1.0))
            .collect();
        Self { manifest, config, population, target }
    }

    /// The population optimum (what a perfect federation converges to, up to client spread).
    pub fn population_target(&self) -> &[f32] {
        &self.population
    }

    /// This client's own optimum.
    pub fn client_target(&self) -> &[f32] {
        &self.target
    }

    fn check(&self, global: &ParameterVector) -> Result<(), TrainerError> {
        self.manifest.ensure_same(global.manifest()).map_err(|e| TrainerError::Incompatible(e.to_string()))
    }

    fn mean_squared_distance(a: &[f32], b: &[f32]) -> f64 {
        if a.is_empty() {
            return 0.0;
        }
        a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>() / a.len() as f64
    }
}

impl LocalTrainer for FakeTrainer {
    fn trainable_manifest(&self) -> Manifest {
        self.manifest.clone()
    }

    fn fit(&mut self, global: &ParameterVector, config: &FitConfig) -> Result<FitOutcome, TrainerError> {
        self.check(global)?;
        if !self.config.fit_delay.is_zero() {
            // This runs on the agent's blocking thread, never on the reactor.
            std::thread::sleep(self.config.fit_delay);
        }
        let train_loss = Self::mean_squared_distance(global.values(), &self.target);
        let rate = self.config.rate;
        let local: Vec<f32> =
            global.values().iter().zip(&self.target).map(|(g, t)| g + rate * (t - g)).collect();
        let weights = ParameterVector::new(self.manifest.clone(), local)
            .map_err(|e| TrainerError::Failed(e.to_string()))?;
        let seconds = self.config.fit_delay.as_secs_f64().max(1e-3);
        tracing::debug!(round = config.round, train_loss, "fake fit");
        Ok(FitOutcome {
            weights,
            num_examples: self.config.num_train_examples,
            train_loss,
            samples_per_second: self.config.num_train_examples as f64 / seconds,
        })
    }

    fn evaluate(&mut self, global: &ParameterVector) -> Result<EvalOutcome, TrainerError> {
        self.check(global)?;
        let loss = Self::mean_squared_distance(global.values(), &self.population);
        // A smooth, monotone stand-in for accuracy: 1 at the optimum, falling with the loss.
        let accuracy = (-loss).exp();
        Ok(EvalOutcome { num_examples: self.config.num_eval_examples, loss, accuracy, macro_f1: accuracy })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_shared::params::TensorSpec;

    fn manifest() -> Manifest {
        Manifest::new(vec![
            TensorSpec { name: "classifier.weight".into(), shape: vec![2, 4] },
            TensorSpec { name: "classifier.bias".into(), shape: vec![2] },
        ])
        .unwrap()
    }

    #[test]
    fn fit_moves_the_weights_the_configured_fraction_towards_the_client_target() {
        let mut t =
            FakeTrainer::new(manifest(), FakeTrainerConfig { seed: 3, rate: 0.25, ..Default::default() });
        let global = ParameterVector::zeros(manifest());
        let out = t.fit(&global, &FitConfig::default()).unwrap();
        for (w, target) in out.weights.values().iter().zip(t.client_target()) {
            assert!((w - 0.25 * target).abs() < 1e-6);
        }
        assert_eq!(out.num_examples, 100);
    }

    #[test]
    fn the_same_seed_trains_identically_and_different_seeds_differ() {
        let global = ParameterVector::zeros(manifest());
        let fit = |seed| {
            let mut t = FakeTrainer::new(manifest(), FakeTrainerConfig { seed, ..Default::default() });
            t.fit(&global, &FitConfig::default()).unwrap().weights
        };
        assert_eq!(fit(1), fit(1));
        assert_ne!(fit(1), fit(2));
    }

    #[test]
    fn averaging_fake_clients_lowers_the_eval_loss_round_after_round() {
        let mut clients: Vec<FakeTrainer> = (0..3)
            .map(|seed| FakeTrainer::new(manifest(), FakeTrainerConfig { seed, ..Default::default() }))
            .collect();
        let mut global = ParameterVector::zeros(manifest());
        let mut last = clients[0].evaluate(&global).unwrap();
        for _ in 0..4 {
            let locals: Vec<ParameterVector> =
                clients.iter_mut().map(|c| c.fit(&global, &FitConfig::default()).unwrap().weights).collect();
            let mean: Vec<f32> = (0..global.values().len())
                .map(|i| locals.iter().map(|l| l.values()[i]).sum::<f32>() / locals.len() as f32)
                .collect();
            global = ParameterVector::new(manifest(), mean).unwrap();
            let now = clients[0].evaluate(&global).unwrap();
            assert!(now.loss < last.loss && now.accuracy > last.accuracy, "{now:?} after {last:?}");
            last = now;
        }
    }

    #[test]
    fn weights_for_another_model_are_refused() {
        let mut t = FakeTrainer::new(manifest(), FakeTrainerConfig::default());
        let other = Manifest::new(vec![TensorSpec { name: "x".into(), shape: vec![3] }]).unwrap();
        let err = t.evaluate(&ParameterVector::zeros(other)).unwrap_err();
        assert!(matches!(err, TrainerError::Incompatible(_)));
    }
}
