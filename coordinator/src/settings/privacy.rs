//! The `[privacy]` section: who adds noise, how much, the clip bound and the budget, and how a
//! sampling configuration is accounted. What the guarantee means is in [`crate::privacy`].
//!
//! ```toml
//! [privacy]
//! mode = "central"            # none | central | local | distributed
//! noise_multiplier = 1.1      # or target_epsilon alone: calibrated for rounds.total
//! clip_norm = 1.0
//! delta = 1e-5
//! target_epsilon = 8.0
//! ```

use fedtune_shared::privacy::{calibrate_for, AdaptiveClip, Adjacency, NoisePlacement, SamplingScheme};
use fedtune_shared::settings::SettingsError;
use serde::{Deserialize, Serialize};

use super::{CoordinatorSettings, SamplingSettings};

/// Who adds the noise, or no differential privacy at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// No clipping, no noise: no privacy guarantee.
    #[default]
    None,
    /// Clients clip; the coordinator adds noise to the sum (trusts the coordinator).
    Central,
    /// Every client clips and adds the full noise (each upload private on its own).
    Local,
    /// Every client adds its share of the noise (needs secure aggregation; see [`crate::privacy`]).
    Distributed,
}

impl DpMode {
    /// The library's placement (`None` without DP).
    pub fn placement(self) -> Option<NoisePlacement> {
        match self {
            DpMode::None => None,
            DpMode::Central => Some(NoisePlacement::Central),
            DpMode::Local => Some(NoisePlacement::Local),
            DpMode::Distributed => Some(NoisePlacement::Distributed),
        }
    }

    /// Lower-case name (`none`, `central`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            DpMode::None => "none",
            DpMode::Central => "central",
            DpMode::Local => "local",
            DpMode::Distributed => "distributed",
        }
    }
}

/// Adaptive clipping to a quantile of update norms (Andrew et al., 2021).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipSettings {
    /// Fraction of updates that should end up unclipped, in (0, 1).
    #[serde(default = "default_quantile")]
    pub target_quantile: f64,
    /// Geometric learning rate η of `C ← C·exp(−η(b̃ − γ))`.
    #[serde(default = "default_clip_lr")]
    pub learning_rate: f64,
    /// Std σ_b of the noise on the sum of clipping indicators. Its multiplier `2σ_b` must exceed
    /// `privacy.noise_multiplier`: the round's budget is split between count and update.
    pub count_noise_std: f64,
}

fn default_quantile() -> f64 {
    0.5
}
fn default_clip_lr() -> f64 {
    0.2
}

/// The `[privacy]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySettings {
    /// `none`, `central`, `local` or `distributed`.
    pub mode: DpMode,
    /// Noise multiplier `z` accounted per round (noise std over the sensitivity). Absent with a
    /// `target_epsilon`: calibrated at start so that `rounds.total` rounds fit the budget
    /// (Poisson or full participation only).
    pub noise_multiplier: Option<f64>,
    /// Clip bound `C` on each client's update (the initial one with adaptive clipping).
    pub clip_norm: f64,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Budget: rounds that would bring ε above it are refused and the federation ends.
    pub target_epsilon: Option<f64>,
    /// Clip tensor by tensor (equal shares) instead of the whole update.
    pub per_layer_clipping: bool,
    /// The fixed averaging denominator `n̄`. Absent: `q·N` (Poisson, `N` live clients at the
    /// round's draw, treated as public) or the cohort size (fixed-size and full participation).
    pub expected_clients: Option<f64>,
    /// Run `distributed` without secure aggregation (the coordinator then sees each update with
    /// only its share of the noise; see [`crate::privacy`]). Irrelevant with
    /// `secure_aggregation.enabled`.
    pub allow_distributed_without_secure_aggregation: bool,
    /// Adaptive clipping; absent: fixed `clip_norm`.
    pub adaptive_clipping: Option<AdaptiveClipSettings>,
}

impl Default for PrivacySettings {
    fn default() -> Self {
        Self {
            mode: DpMode::None,
            noise_multiplier: None,
            clip_norm: 1.0,
            delta: 1e-5,
            target_epsilon: None,
            per_layer_clipping: false,
            expected_clients: None,
            allow_distributed_without_secure_aggregation: false,
            adaptive_clipping: None,
        }
    }
}

/// How a sampling configuration is accounted.
pub fn accounting_for(sampling: &SamplingSettings) -> (SamplingScheme, Adjacency) {
    match *sampling {
        SamplingSettings::Poisson { .. } => (SamplingScheme::Poisson, Adjacency::AddRemove),
        SamplingSettings::Fraction { fraction } if fraction >= 1.0 => {
            (SamplingScheme::Full, Adjacency::AddRemove)
        }
        SamplingSettings::Fraction { .. } | SamplingSettings::Fixed { .. } => {
            (SamplingScheme::FixedSize, Adjacency::ReplaceOne)
        }
    }
}

impl PrivacySettings {
    /// Whether differential privacy is on.
    pub fn enabled(&self) -> bool {
        self.mode != DpMode::None
    }

    /// Checks the section against the rest of the settings; the error names the key.
    pub fn validate(&self, all: &CoordinatorSettings) -> Result<(), SettingsError> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !self.enabled() {
            if self.target_epsilon.is_some() || self.noise_multiplier.is_some() {
                return Err(SettingsError::invalid(
                    "privacy.mode",
                    "is `none`, but a privacy budget or noise multiplier is set; choose central, local or \
                     distributed",
                ));
            }
            return Ok(());
        }
        if !positive(self.clip_norm) {
            return Err(SettingsError::invalid("privacy.clip_norm", "must be finite and positive"));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(SettingsError::invalid("privacy.delta", "must be in (0, 1)"));
        }
        if self.target_epsilon.is_some_and(|e| !positive(e)) {
            return Err(SettingsError::invalid("privacy.target_epsilon", "must be finite and positive"));
        }
        if self.noise_multiplier.is_some_and(|z| !positive(z)) {
            return Err(SettingsError::invalid("privacy.noise_multiplier", "must be finite and positive"));
        }
        if self.expected_clients.is_some_and(|n| !(n.is_finite() && n >= 1.0)) {
            return Err(SettingsError::invalid("privacy.expected_clients", "must be at least 1"));
        }
        if self.mode == DpMode::Distributed
            && !all.secure_aggregation.enabled
            && !self.allow_distributed_without_secure_aggregation
        {
            return Err(SettingsError::invalid(
                "privacy.mode",
                "`distributed` splits the noise among clients so that only the SUM is private, which needs \
                 secure aggregation; without it the coordinator would see every update with only a \
                 fraction of the noise. Set secure_aggregation.enabled = true, use `central` or `local`, \
                 or set privacy.allow_distributed_without_secure_aggregation = true to run it anyway",
            ));
        }
        let z = self
            .resolved_noise_multiplier(all)
            .map_err(|e| SettingsError::invalid("privacy.noise_multiplier", e))?;
        if let Some(a) = &self.adaptive_clipping {
            let clip =
                AdaptiveClip::new(self.clip_norm, a.target_quantile, a.learning_rate, a.count_noise_std)
                    .map_err(|e| SettingsError::invalid("privacy.adaptive_clipping", e.to_string()))?;
            clip.update_noise_multiplier(z).map_err(|e| {
                SettingsError::invalid("privacy.adaptive_clipping.count_noise_std", e.to_string())
            })?;
        }
        Ok(())
    }

    /// The configured noise multiplier, or the one calibrated from `target_epsilon` for
    /// `rounds.total` rounds (Poisson or full participation).
    pub fn resolved_noise_multiplier(&self, all: &CoordinatorSettings) -> Result<f64, String> {
        if let Some(z) = self.noise_multiplier {
            return Ok(z);
        }
        let Some(target) = self.target_epsilon else {
            return Err(
                "is required with privacy.mode != none (or set privacy.target_epsilon to calibrate it)"
                    .into(),
            );
        };
        let (sampling, adjacency) = accounting_for(&all.sampling);
        let q =
            match all.sampling {
                SamplingSettings::Poisson { rate } => rate,
                SamplingSettings::Fraction { fraction } if fraction >= 1.0 => 1.0,
                _ => return Err(
                    "cannot be calibrated for a fixed-size cohort before the population is known; set it \
                     (`fedtune-coordinator calibrate` helps)"
                        .into(),
                ),
            };
        calibrate_for(target, self.delta, all.rounds.total, q, sampling, adjacency).map_err(|e| e.to_string())
    }
}
