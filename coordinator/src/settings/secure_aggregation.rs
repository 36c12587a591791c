//! The `[secure_aggregation]` section: whether fit rounds run SecAgg+ (the coordinator sees only
//! the sum of the clients' updates), its threshold and graph degree, and how long each step may
//! stay open. The protocol and its threat model are in `docs/secure-aggregation.md`.
//!
//! ```toml
//! [secure_aggregation]
//! enabled = true
//! # threshold = 3          # t; default max(2, ⌈2(k + 1)/3⌉), at most k + 1, per round
//! # degree = 8             # k; default secagg::graph::suggested_degree(n), per round
//! step_timeout = "30s"     # advertising and sharing each stay open at most this long
//! unmask_timeout = "60s"
//! clip_norm = 10.0         # the encoding's bound when privacy.mode = "none"
//! max_wrap_probability = 1e-9
//! ```

use std::time::Duration;

use fedtune_shared::secagg::encoding::DEFAULT_MAX_WRAP_PROBABILITY;
use fedtune_shared::secagg::graph::suggested_degree;
use fedtune_shared::settings::{duration, SettingsError};
use serde::{Deserialize, Serialize};

use super::{CoordinatorSettings, DpMode};

/// The `[secure_aggregation]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecureAggregationSettings {
    /// Run every fit round under SecAgg+.
    pub enabled: bool,
    /// t: shares that reconstruct a secret and the fewest clients that may remain; `None` picks
    /// [`default_threshold`] per round.
    pub threshold: Option<usize>,
    /// k: neighbours per client; `None` picks `suggested_degree(n)` per round.
    pub degree: Option<usize>,
    /// Longest time advertising, and then sharing, stays open.
    #[serde(with = "duration")]
    pub step_timeout: Duration,
    /// Longest time the survivors have to answer the unmasking request.
    #[serde(with = "duration")]
    pub unmask_timeout: Duration,
    /// The clip bound the encoding's grid is chosen for when `privacy.mode = "none"` (under DP,
    /// `privacy.clip_norm`): clients clip to it before encoding.
    pub clip_norm: f64,
    /// The most probability β that any coordinate of the sum wraps around `2^32`.
    pub max_wrap_probability: f64,
}

impl Default for SecureAggregationSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            threshold: None,
            degree: None,
            step_timeout: Duration::from_secs(30),
            unmask_timeout: Duration::from_secs(60),
            clip_norm: 10.0,
            max_wrap_probability: DEFAULT_MAX_WRAP_PROBABILITY,
        }
    }
}

/// The default threshold for degree k among n clients: two thirds of a secret's k + 1 holders
/// (rounded up), at least 2 (t = 1 would hand each neighbour the secret), at most k + 1 and n.
/// Two thirds is the usual SecAgg+ trade-off: up to a third of the holders may drop and the round
/// still unmasks, while fewer than two thirds cannot recover a secret.
pub fn default_threshold(n: usize, degree: usize) -> usize {
    let holders = degree.min(n.saturating_sub(1)) + 1;
    (2 * holders).div_ceil(3).max(2).min(holders).min(n)
}

impl SecureAggregationSettings {
    /// The degree k for a round of `n` clients.
    pub fn degree_for(&self, n: usize) -> usize {
        self.degree.unwrap_or_else(|| suggested_degree(n))
    }

    /// The threshold t for a round of `n` clients with degree `degree`: the configured one
    /// capped at the `degree + 1` holders of each secret and at `n`, or [`default_threshold`].
    pub fn threshold_for(&self, n: usize, degree: usize) -> usize {
        let holders = degree.min(n.saturating_sub(1)) + 1;
        match self.threshold {
            Some(t) => t.min(holders).min(n),
            None => default_threshold(n, degree),
        }
    }

    /// Checks the section against the rest of the settings; the error names the key.
    pub fn validate(&self, all: &CoordinatorSettings) -> Result<(), SettingsError> {
        if !self.enabled {
            return Ok(());
        }
        if self.threshold.is_some_and(|t| t < 2) {
            return Err(SettingsError::invalid(
                "secure_aggregation.threshold",
                "must be at least 2 (with 1 each neighbour would hold a client's secret outright)",
            ));
        }
        if self.degree.is_some_and(|k| k < 1) {
            return Err(SettingsError::invalid("secure_aggregation.degree", "must be at least 1"));
        }
        super::duration_up_to(
            "secure_aggregation.step_timeout",
            self.step_timeout,
            Duration::from_secs(600),
        )?;
        super::duration_up_to(
            "secure_aggregation.unmask_timeout",
            self.unmask_timeout,
            Duration::from_secs(600),
        )?;
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(SettingsError::invalid(
                "secure_aggregation.clip_norm",
                "must be finite and positive",
            ));
        }
        let beta = self.max_wrap_probability;
        if !(beta.is_finite() && beta > 0.0 && beta < 1.0) {
            return Err(SettingsError::invalid(
                "secure_aggregation.max_wrap_probability",
                "must be in (0, 1)",
            ));
        }
        if all.privacy.mode == DpMode::Local {
            return Err(SettingsError::invalid(
                "secure_aggregation.enabled",
                "is pointless with privacy.mode = \"local\": each update is already private on its own; \
                 use \"distributed\" to split the noise among clients under secure aggregation",
            ));
        }
        if all.privacy.enabled() && all.privacy.adaptive_clipping.is_some() {
            return Err(SettingsError::invalid(
                "privacy.adaptive_clipping",
                "cannot be used with secure aggregation: each client reports its clipping indicator in the \
                 clear, which the coordinator would see with only a share of its noise",
            ));
        }
        if all.rounds.min_fit < 2 {
            return Err(SettingsError::invalid(
                "rounds.min_fit",
                "must be at least 2 with secure aggregation (a sum of one update is that update)",
            ));
        }
        Ok(())
    }
}
