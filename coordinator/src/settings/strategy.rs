//! The `[strategy]` section: how the server aggregates updates (Reddi et al. 2021 for the
//! adaptive optimizers).

use fedtune_shared::settings::SettingsError;
use serde::{Deserialize, Serialize};

use super::finite_positive;

/// Aggregation strategy (Reddi et al. 2021 for the adaptive ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum StrategySettings {
    /// Weighted FedAvg: `x ← x + η·Δ̄`.
    Fedavg {
        /// Server learning rate η (1 = plain FedAvg).
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
    /// FedAvg aggregation with clients minimising `loss + μ/2‖w − x‖²`.
    Fedprox {
        /// Proximal coefficient μ ≥ 0 sent to clients.
        mu: f64,
        /// Server learning rate η.
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
    /// FedAdam.
    Fedadam(AdaptiveSettings),
    /// FedYogi.
    Fedyogi(AdaptiveSettings),
    /// FedAdagrad.
    Fedadagrad(AdaptiveSettings),
}

fn one() -> f64 {
    1.0
}

impl Default for StrategySettings {
    fn default() -> Self {
        StrategySettings::Fedavg { server_learning_rate: 1.0 }
    }
}

/// Server optimizer parameters of FedAdam/FedYogi/FedAdagrad.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSettings {
    /// Server learning rate η.
    #[serde(default = "default_eta")]
    pub server_learning_rate: f64,
    /// First-moment decay β₁ in [0, 1).
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Second-moment decay β₂ in [0, 1) (unused by FedAdagrad).
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adaptivity τ > 0 (also the initial √v).
    #[serde(default = "default_tau")]
    pub tau: f64,
}

fn default_eta() -> f64 {
    1e-2
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_tau() -> f64 {
    1e-3
}

impl StrategySettings {
    /// Checks the chosen strategy's parameters; the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let eta = "strategy.server_learning_rate";
        match self {
            StrategySettings::Fedavg { server_learning_rate } => finite_positive(eta, *server_learning_rate)?,
            StrategySettings::Fedprox { mu, server_learning_rate } => {
                if !(mu.is_finite() && *mu >= 0.0) {
                    return Err(SettingsError::invalid("strategy.mu", "must be finite and non-negative"));
                }
                finite_positive(eta, *server_learning_rate)?;
            }
            StrategySettings::Fedadam(a) | StrategySettings::Fedyogi(a) | StrategySettings::Fedadagrad(a) => {
                finite_positive(eta, a.server_learning_rate)?;
                if !(0.0..1.0).contains(&a.beta1) {
                    return Err(SettingsError::invalid("strategy.beta1", "must be in [0, 1)"));
                }
                if !(0.0..1.0).contains(&a.beta2) {
                    return Err(SettingsError::invalid("strategy.beta2", "must be in [0, 1)"));
                }
                finite_positive("strategy.tau", a.tau)?;
            }
        }
        Ok(())
    }
}
