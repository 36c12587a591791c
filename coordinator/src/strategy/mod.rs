//! Aggregation policy as a trait (after Flower's `Strategy`), and its implementations.
//!
//! The round actor owns the mechanics (sampling, deadlines, streaming fixed-point folding); a
//! [`Strategy`] decides the policy at these points of a round:
//!
//! 1. [`Strategy::configure_fit`]: from the round's [`Draw`], what clients are told (training
//!    config, privacy instructions) and the round's [`RoundContext`]. An error here (e.g. a
//!    privacy budget that would be exceeded) halts the federation.
//! 2. [`Strategy::update_weighting`]: per accepted update, before it is folded: its integer FedAvg
//!    weight and a scale in (0, 1] applied to its values (server-side clipping).
//! 3. [`Strategy::aggregate_fit`]: from the exact weighted integer sum of all folded updates and
//!    its total weight ([`FitResults`]; never the individual updates: memory stays O(model)) and
//!    the explicit failures, the new trainable weights, or `None` to keep the old model (the
//!    attempt then fails). The strategy chooses the denominator of the mean.
//! 4. [`Strategy::charge`]: the privacy charge `aggregate_fit` returned, once the new model is
//!    accepted (the actor commits the same record with the round).
//! 5. [`Strategy::configure_evaluate`] / [`Strategy::aggregate_evaluate`]: federated evaluation.
//!
//! Everything a strategy needs about a round is passed in: the actor keeps the
//! [`RoundContext`] that `configure_fit` returned and hands it to `update_weighting` and
//! `aggregate_fit` of that round, so no call depends on which call came before it.
//!
//! # Server-side differential privacy (decorator seam)
//! DP wraps any strategy: [`dp::DpStrategy`] returns
//! `UpdateWeighting { weight: 1, scale: min(1, C/‖Δ‖) }` from `update_weighting` (user-level
//! clipping, unweighted), adds discrete Gaussian noise to the integer sum of the folded updates
//! and sets the fixed expected cohort size as its denominator before delegating `aggregate_fit`,
//! refuses `configure_fit` once the accountant's ε would exceed the budget, and returns the
//! round's [`LedgerRecord`] with the new weights — which the coordinator writes in the same
//! transaction as the round's checkpoint. Everything else delegates.
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
use fedtune_shared::params::{Manifest, ParameterVector, ParamsError};
use fedtune_shared::round::{EvalReport, FitInstructions, PrivacyInstructions};

use crate::aggregate::FixedPointSum;
use crate::outcome::ParticipantOutcome;
use crate::settings::StrategySettings;
use crate::storage::ledger::Exposures;
use crate::storage::LedgerRecord;

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
    /// Restoring saved state failed, or a call does not fit the strategy's state.
    #[error("strategy state: {0}")]
    State(String),
    /// Nothing was folded, so there is nothing to average.
    #[error("no update was folded")]
    NoUpdates,
}

/// How the clients of a round were drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    /// Round and attempt.
    pub round: RoundId,
    /// Live clients the draw chose from.
    pub candidates: usize,
    /// Clients drawn (a privacy accountant needs `selected / candidates` for fixed-size cohorts).
    pub selected: usize,
    /// What the coordinator has seen of the drawn clients and of everyone else before this draw
    /// (fit attempts, failed ones included, and their noise multipliers; empty when not
    /// counted). Under local noise the coordinator knows who was sampled, so each client's local
    /// ε composes over its attempts without amplification.
    pub exposures: Exposures,
    /// Set when the round runs under secure aggregation.
    pub secure: Option<SecureDraw>,
}

/// What a secure round fixes before it is configured: the threshold and the encoding limits.
/// Distributed noise is sized for the threshold, and the grid is chosen for the drawn count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecureDraw {
    /// t: the fewest clients whose masked inputs the coordinator may unmask.
    pub threshold: usize,
    /// What the round's encoding may accept (wrap-around probability, grid widening).
    pub limits: fedtune_shared::secagg::EncodingLimits,
}

/// What a round was configured with. The actor keeps it from [`Strategy::configure_fit`] and
/// hands it to every later call of the same round, so a strategy keeps no memory of which round
/// it configured last.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundContext {
    /// The draw the round was configured for.
    pub draw: Draw,
    /// The round's differential-privacy plan, when the DP decorator configured it.
    pub privacy: Option<dp::DpRound>,
}

impl RoundContext {
    /// The context of a round without differential privacy. It keeps the draw's counts; the
    /// exposures were for `configure_fit` alone, so a round does not carry every client's
    /// history with it.
    pub fn new(draw: &Draw) -> Self {
        let draw = Draw {
            round: draw.round,
            candidates: draw.candidates,
            selected: draw.selected,
            exposures: Exposures::default(),
            secure: draw.secure,
        };
        Self { draw, privacy: None }
    }

    /// Round and attempt.
    pub fn round(&self) -> RoundId {
        self.draw.round
    }
}

/// What clients of a round are told to do, and what the round was configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct FitPlan {
    /// Training parameters (the actor derives a per-client seed).
    pub config: FitInstructions,
    /// Privacy instructions.
    pub privacy: PrivacyInstructions,
    /// Handed back to `update_weighting` and `aggregate_fit` of this round.
    pub context: RoundContext,
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
    /// How its task ended (never [`ParticipantOutcome::Accepted`]).
    pub outcome: ParticipantOutcome,
}

/// What the weighted sum of a round is divided by to make the mean delta.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Denominator {
    /// The sum of the weights (example-weighted FedAvg).
    TotalWeight,
    /// A fixed value chosen before the round (DP: the expected number of participants, so one
    /// client's presence does not change the divisor).
    Fixed(f64),
}

/// Everything a round's updates amount to: their exact weighted sum, not yet divided.
#[derive(Debug, Clone)]
pub struct FitResults {
    /// `Σ wᵢ·qᵢ` of the folded deltas on the fixed-point grid, exact, with its total weight
    /// `Σ wᵢ`.
    pub sum: FixedPointSum,
    /// Layout of the sum (the trainable manifest).
    pub manifest: Manifest,
    /// The accepted updates.
    pub clients: Vec<FitSummary>,
    /// What [`FitResults::into_mean_delta`] divides by; a decorator may change it before
    /// delegating.
    pub denominator: Denominator,
}

impl FitResults {
    /// The results of a round, averaged over the total weight unless a decorator says otherwise.
    pub fn new(sum: FixedPointSum, manifest: Manifest, clients: Vec<FitSummary>) -> Self {
        Self { sum, manifest, clients, denominator: Denominator::TotalWeight }
    }

    /// Sum of the weights folded.
    pub fn total_weight(&self) -> u64 {
        self.sum.total_weight()
    }

    /// The mean delta: the sum over [`FitResults::denominator`], rounded once to f32. Consumes
    /// the results so that the sum is freed before the caller builds the next model.
    pub fn into_mean_delta(self) -> Result<ParameterVector, StrategyError> {
        let values = match self.denominator {
            Denominator::TotalWeight => self.sum.mean().ok_or(StrategyError::NoUpdates)?,
            Denominator::Fixed(d) if d.is_finite() && d > 0.0 => self.sum.scaled(d),
            Denominator::Fixed(d) => {
                return Err(StrategyError::State(format!("averaging denominator {d} is not positive")))
            }
        };
        drop(self.sum);
        Ok(ParameterVector::new(self.manifest, values)?)
    }
}

/// What [`Strategy::aggregate_fit`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregated {
    /// The new trainable weights.
    pub params: ParameterVector,
    /// The round's privacy charge, if the strategy charges privacy. The actor commits it with the
    /// round and hands it to [`Strategy::charge`] once the weights are accepted.
    pub charge: Option<LedgerRecord>,
}

impl Aggregated {
    /// New weights that charge no privacy.
    pub fn uncharged(params: ParameterVector) -> Self {
        Self { params, charge: None }
    }
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

    /// Instructions for the fit tasks of the round drawn as `draw`, and the round's context.
    fn configure_fit(&mut self, draw: &Draw, base: &FitInstructions) -> Result<FitPlan, StrategyError> {
        Ok(FitPlan {
            config: base.clone(),
            privacy: PrivacyInstructions::NONE,
            context: RoundContext::new(draw),
        })
    }

    /// Weighting of one update of the round `round` (default: its example count, unscaled).
    fn update_weighting(
        &self,
        round: &RoundContext,
        upload: &UploadStats,
    ) -> Result<UpdateWeighting, StrategyError> {
        let _ = round;
        Ok(UpdateWeighting { weight: upload.num_examples, scale: 1.0 })
    }

    /// New trainable weights from the current ones and the round's results; `None` keeps the
    /// current model.
    fn aggregate_fit(
        &mut self,
        round: &RoundContext,
        global: &ParameterVector,
        results: FitResults,
        failures: &[FitFailure],
    ) -> Result<Option<Aggregated>, StrategyError>;

    /// A secure round is about to ask its survivors for the shares that unmask the sum of their
    /// `survivors` inputs: from then on the coordinator can learn that sum. A strategy whose
    /// guarantee covers the coordinator (distributed noise) charges the round here, whether or
    /// not it is published later, and may refuse (the round then fails before anything is
    /// unmasked). The record it returns is written to storage before the request goes out, and
    /// the round's context remembers it so `aggregate_fit` charges nothing twice. Default:
    /// nothing to charge.
    fn release(
        &mut self,
        round: &mut RoundContext,
        survivors: u64,
    ) -> Result<Option<LedgerRecord>, StrategyError> {
        let _ = (round, survivors);
        Ok(None)
    }

    /// Books the privacy charge of a round whose weights were accepted (the record
    /// `aggregate_fit` returned, written in the round's commit transaction). Default: nothing to
    /// book.
    fn charge(&mut self, record: &LedgerRecord) -> Result<(), StrategyError> {
        let _ = record;
        Ok(())
    }

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
