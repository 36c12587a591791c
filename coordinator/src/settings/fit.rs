//! The `[fit]` and `[evaluation]` sections: what clients are asked to run locally, the
//! training parameters of every fit task and the federated evaluation after rounds.

use std::time::Duration;

use fedtune_shared::compression::UpdateEncoding;
use fedtune_shared::schedule::LrSchedule;
use fedtune_shared::settings::{duration, SettingsError};
use serde::{Deserialize, Serialize};

use super::finite_positive;

/// Local training parameters sent with every fit task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FitSettings {
    /// Local epochs.
    pub epochs: u32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Peak learning rate of the clients' optimizer.
    pub learning_rate: f64,
    /// Optimizer step cap per round.
    pub max_steps: Option<u64>,
    /// Shape of the clients' local rate within each round after warm-up: `constant` (Flower's
    /// and most papers' clients), `linear` or `cosine` (decay to 0 at the round's last step).
    pub lr_schedule: LrSchedule,
    /// Steps at the start of each round over which the local rate rises from 0 to the peak.
    pub warmup_steps: u64,
    /// The encoding clients upload their updates in: `f32` (4 bytes per value) or `int8`
    /// (blocks of 256 one-byte codes under an f32 scale, unbiased stochastic rounding:
    /// about a quarter of the bytes; `fedtune_shared::compression`). Not with secure aggregation,
    /// whose uploads are its own ring encoding.
    pub update_encoding: UpdateEncoding,
}

impl Default for FitSettings {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 16,
            learning_rate: 5e-5,
            max_steps: None,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            update_encoding: UpdateEncoding::F32,
        }
    }
}

/// Federated evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationSettings {
    /// Evaluate after every k-th completed round (0 = never).
    pub every: u64,
    /// Also evaluate the initial model before round 1.
    pub initial: bool,
    /// Fraction of live clients with a held-out split that evaluate.
    pub fraction: f64,
    /// Reports needed for the evaluation figures to be recorded.
    pub min_clients: usize,
    /// Time clients get to report.
    #[serde(with = "duration")]
    pub deadline: Duration,
    /// Evaluation batch size.
    pub batch_size: u32,
    /// Evaluate under differential privacy too. Off by default: evaluation reports are
    /// per-client figures on local data that no noise protects, outside the (ε, δ) guarantee.
    pub enabled_under_dp: bool,
}

impl Default for EvaluationSettings {
    fn default() -> Self {
        Self {
            every: 1,
            initial: false,
            fraction: 1.0,
            min_clients: 1,
            deadline: Duration::from_secs(300),
            batch_size: 32,
            enabled_under_dp: false,
        }
    }
}

impl FitSettings {
    /// Checks every `fit.*` value on its own (whether the encoding suits secure aggregation is a
    /// cross-section check of [`super::CoordinatorSettings::validate`]); the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.epochs == 0 {
            return Err(SettingsError::invalid("fit.epochs", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(SettingsError::invalid("fit.batch_size", "must be at least 1"));
        }
        finite_positive("fit.learning_rate", self.learning_rate)?;
        if self.max_steps == Some(0) {
            return Err(SettingsError::invalid("fit.max_steps", "must be at least 1 (omit it for no cap)"));
        }
        if let Some(max) = self.max_steps.filter(|&max| self.warmup_steps >= max) {
            return Err(SettingsError::invalid(
                "fit.warmup_steps",
                format!(
                    "({}) must be below fit.max_steps ({max}): the rate would never reach its peak",
                    self.warmup_steps
                ),
            ));
        }
        Ok(())
    }
}

impl EvaluationSettings {
    /// Checks every `evaluation.*` value; the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(SettingsError::invalid("evaluation.fraction", "must be in (0, 1]"));
        }
        if self.deadline.is_zero() {
            return Err(SettingsError::invalid("evaluation.deadline", "must be positive"));
        }
        if self.batch_size == 0 {
            return Err(SettingsError::invalid("evaluation.batch_size", "must be at least 1"));
        }
        Ok(())
    }
}
