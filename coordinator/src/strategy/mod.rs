//! Aggregation policy as a trait (after Flower's `Strategy`), and its implementations.
//!
//! The round actor owns the mechanics (sampling, deadlines, streaming fixed-point folding); a
//! [`Strategy`] decides the policy at four points of a round:
//!
//! 1. [`Strategy::configure_fit`]: what clients are told (training config, privacy instructions).
//!    An error here (e.g. a privacy budget that would be exceeded) halts the federation.
//! 2. [`Strategy::update_weighting`]: per accepted update, before it is folded: its integer FedAvg
//!    weight and a scale in (0, 1] applied to its values (server-side clipping).
//! 3. [`Strategy::aggregate_fit`]: from the weighted mean delta of all folded updates (never the
//!    individual updates: memory stays O(model)) and the explicit failures, the new trainable
//!    weights, or `None` to keep the old model (the attempt then fails).
//! 4. [`Strategy::configure_evaluate`] / [`Strategy::aggregate_evaluate`]: federated evaluation.
//!
//! # Server-side differential privacy (decorator seam)
//! DP wraps any strategy: [`dp::DpStrategy`] returns
//! `UpdateWeighting { weight: 1, scale: min(1, C/‖Δ‖) }` from `update_weighting` (user-level
//! clipping, unweighted), adds Gaussian noise to the sum of the folded updates and divides it by
//! the fixed expected cohort size before delegating `aggregate_fit`, refuses `configure_fit` once the accountant's ε would exceed the budget, and
//! returns the round's [`LedgerEntry`] from `ledger_entry` — which the coordinator writes in the
//! same transaction as the round's checkpoint. Everything else delegates.
//!
//! # Layout
//! - [`fedavg`]: FedAvg and FedProx (FedAvg aggregation, proximal μ sent to clients).
//! - [`adaptive`]: FedAdam, FedYogi, FedAdagrad (Reddi et al., 2021).
//! - [`dp`]: `DpStrategy<S>`, the user-level DP decorator (clip, noise, fixed denominator,
//!   accountant, budget).

pub mod adaptive;
pub mod dp;
pub mod fedavg;

use std::collections::BTreeMap;

use fedtune_shared::ids::{ClientId, ModelVersion, RoundId};
use fedtune_shared::params::{ParameterVector, ParamsError};
use fedtune_shared::round::{EvalReport, FitInstructions, PrivacyInstructions};

use crate::settings::StrategySettings;
use crate::storage::LedgerEntry;

pub use adaptive::{Adaptive, AdaptiveKind};
pub use fedavg::FedAvg;

/// A strategy refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    /// The strategy will not run another round (e.g. privacy budget exhausted).
    #[error("strategy refuses to continue: {0}")]
    Exhausted(String),
    /// An update may not be folded under this strategy.
    #[error("update refused by the strategy: {0}")]
    Refused(String),
    /// Shapes disagree.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// Restoring saved state failed.
    #[error("strategy state: {0}")]
    State(String),
}

/// What clients of a round are told to do.
#[derive(Debug, Clone, PartialEq)]
pub struct FitPlan {
    /// Training parameters (the actor derives a per-client seed).
    pub config: FitInstructions,
    /// Privacy instructions.
    pub privacy: PrivacyInstructions,
}

/// What the actor knows about an update when it asks for its weighting.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadStats {
    /// Sender.
    pub client: ClientId,
    /// Claimed example count.
    pub num_examples: u64,
    /// L2 norm of the delta as received.
    pub l2_norm: f64,
}

/// How one update enters the fixed-point sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateWeighting {
    /// Integer weight (≥ 1).
    pub weight: u64,
    /// Scale in (0, 1] applied to every value before quantization.
    pub scale: f32,
}

/// One accepted update, without its values.
#[derive(Debug, Clone, PartialEq)]
pub struct FitSummary {
    /// Sender.
    pub client: ClientId,
    /// Example count.
    pub num_examples: u64,
    /// Weight it was folded with.
    pub weight: u64,
    /// Its training metrics.
    pub metrics: BTreeMap<String, f64>,
}

/// A sampled client that contributed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitFailure {
    /// Client.
    pub client: ClientId,
    /// Why (`failed: …`, `dropped`, `late`).
    pub reason: String,
}

/// Everything a round's updates amount to.
#[derive(Debug, Clone)]
pub struct FitResults {
    /// Weighted mean of the folded deltas (trainable manifest).
    pub mean_delta: ParameterVector,
    /// Sum of the weights.
    pub total_weight: u64,
    /// The accepted updates.
    pub clients: Vec<FitSummary>,
}

/// One evaluation report with its sender.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// Sender.
    pub client: ClientId,
    /// The report.
    pub report: EvalReport,
}

/// Aggregated evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSummary {
    /// Reports aggregated.
    pub clients: u32,
    /// Held-out examples.
    pub num_examples: u64,
    /// Example-weighted mean loss.
    pub loss: f64,
    /// Example-weighted mean accuracy.
    pub accuracy: f64,
    /// Example-weighted means of the further metrics every report carried.
    pub metrics: BTreeMap<String, f64>,
}

/// Aggregation policy. See the module docs for when each method is called.
pub trait Strategy: Send + 'static {
    /// Name shown in status and records.
    fn name(&self) -> &str;

    /// How the clients of `round` were drawn: `candidates` live clients, `selected` of them
    /// sampled. Called just before [`Strategy::configure_fit`] (a privacy accountant needs the
    /// sampling rate of fixed-size cohorts, `selected / candidates`).
    fn observe_sampling(&mut self, round: RoundId, candidates: usize, selected: usize) {
        let _ = (round, candidates, selected);
    }

    /// Instructions for the fit tasks of `round`.
    fn configure_fit(&mut self, round: RoundId, base: &FitInstructions) -> Result<FitPlan, StrategyError> {
        let _ = round;
        Ok(FitPlan { config: base.clone(), privacy: PrivacyInstructions::NONE })
    }

    /// Weighting of one update (default: its example count, unscaled).
    fn update_weighting(&self, upload: &UploadStats) -> Result<UpdateWeighting, StrategyError> {
        Ok(UpdateWeighting { weight: upload.num_examples, scale: 1.0 })
    }

    /// New trainable weights from the current ones and the round's results; `None` keeps the
    /// current model.
    fn aggregate_fit(
        &mut self,
        round: RoundId,
        global: &ParameterVector,
        results: &FitResults,
        failures: &[FitFailure],
    ) -> Result<Option<ParameterVector>, StrategyError>;

    /// Evaluation batch size for the evaluation of `version` (default: unchanged).
    fn configure_evaluate(&mut self, version: ModelVersion, batch_size: u32) -> u32 {
        let _ = version;
        batch_size
    }

    /// Aggregated evaluation (default: example-weighted means).
    fn aggregate_evaluate(
        &mut self,
        version: ModelVersion,
        results: &[EvalResult],
        failures: &[FitFailure],
    ) -> Result<Option<EvalSummary>, StrategyError> {
        let _ = (version, failures);
        Ok(weighted_evaluation(results))
    }

    /// The privacy-ledger entry of a round that just aggregated, if this strategy charges
    /// privacy (written in the round's commit transaction).
    fn ledger_entry(&mut self, round: RoundId) -> Option<LedgerEntry> {
        let _ = round;
        None
    }

    /// A live view of this strategy's differential-privacy state for status, read without
    /// locking the strategy (`None`: no privacy guarantee).
    fn privacy_monitor(&self) -> Option<crate::privacy::PrivacyMonitor> {
        None
    }

    /// Server-side state to checkpoint with the model (e.g. optimizer moments).
    fn state(&self) -> Option<ParameterVector> {
        None
    }

    /// Restores state saved by [`Strategy::state`] after a restart.
    fn restore_state(&mut self, state: ParameterVector) -> Result<(), StrategyError> {
        let _ = state;
        Err(StrategyError::State(format!("strategy `{}` keeps no state", self.name())))
    }
}

/// Example-weighted mean of evaluation reports; metrics only where every report has them.
pub fn weighted_evaluation(results: &[EvalResult]) -> Option<EvalSummary> {
    let n: u64 = results.iter().map(|r| r.report.num_examples).sum();
    if n == 0 {
        return None;
    }
    let w = |r: &EvalResult| r.report.num_examples as f64 / n as f64;
    let loss = results.iter().map(|r| w(r) * r.report.loss).sum();
    let accuracy = results.iter().map(|r| w(r) * r.report.accuracy).sum();
    let mut metrics = BTreeMap::new();
    if let Some(first) = results.first() {
        for key in first.report.metrics.keys() {
            if results.iter().all(|r| r.report.metrics.contains_key(key)) {
                metrics.insert(key.clone(), results.iter().map(|r| w(r) * r.report.metrics[key]).sum());
            }
        }
    }
    Some(EvalSummary { clients: results.len() as u32, num_examples: n, loss, accuracy, metrics })
}

/// Builds the configured strategy.
pub fn from_settings(s: &StrategySettings) -> Box<dyn Strategy> {
    match s {
        StrategySettings::Fedavg { server_learning_rate } => {
            Box::new(FedAvg::new(*server_learning_rate, 0.0))
        }
        StrategySettings::Fedprox { mu, server_learning_rate } => {
            Box::new(FedAvg::new(*server_learning_rate, *mu))
        }
        StrategySettings::Fedadam(a) => Box::new(Adaptive::new(AdaptiveKind::Adam, a)),
        StrategySettings::Fedyogi(a) => Box::new(Adaptive::new(AdaptiveKind::Yogi, a)),
        StrategySettings::Fedadagrad(a) => Box::new(Adaptive::new(AdaptiveKind::Adagrad, a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(n: u64, loss: f64, acc: f64, f1: Option<f64>) -> EvalResult {
        EvalResult {
            client: ClientId::parse("c").unwrap(),
            report: EvalReport {
                round: 1,
                model_version: ModelVersion(1),
                num_examples: n,
                loss,
                accuracy: acc,
                metrics: f1.map(|f| [("macro_f1".to_string(), f)].into_iter().collect()).unwrap_or_default(),
            },
        }
    }

    #[test]
    fn evaluation_is_weighted_by_examples() {
        let s =
            weighted_evaluation(&[report(10, 1.0, 0.5, Some(0.4)), report(30, 2.0, 1.0, Some(0.8))]).unwrap();
        assert_eq!(s.num_examples, 40);
        assert!((s.loss - 1.75).abs() < 1e-12);
        assert!((s.accuracy - 0.875).abs() < 1e-12);
        assert!((s.metrics["macro_f1"] - 0.7).abs() < 1e-12);
    }

    #[test]
    fn metrics_missing_from_some_reports_are_left_out() {
        let s = weighted_evaluation(&[report(10, 1.0, 0.5, Some(0.4)), report(30, 2.0, 1.0, None)]).unwrap();
        assert!(s.metrics.is_empty());
        assert!(weighted_evaluation(&[]).is_none());
    }
}
