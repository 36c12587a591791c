//! Differential privacy in the coordinator: the `[privacy]` settings, the per-round ledger, the
//! live status, and the wiring of the [`DpStrategy`](crate::strategy::dp::DpStrategy) decorator.
//!
//! # The guarantee
//!
//! User-level DP-FedAvg (McMahan et al., 2018) as [`fedtune_shared::privacy`] describes it: the
//! unit of privacy is **one client** (all its data). Every sampled client clips its whole update
//! to L2 norm `C` (optionally tensor by tensor, still `≤ C` overall); Gaussian noise is added on
//! a fixed-point grid with a cryptographically seeded generator
//! ([`NoiseSource::from_os_entropy`](fedtune_shared::privacy::NoiseSource::from_os_entropy));
//! the coordinator averages with a **fixed** denominator `n̄` (the expected number of
//! participants), so one client moves the published model by at most `C/n̄` plus noise. The
//! sensitivity argument, including the rounding to the grid, is in the
//! [`fedtune_shared::privacy`] module docs.
//!
//! The accountant composes rounds with the sampling scheme actually used:
//! Poisson sampling (`sampling.scheme = "poisson"`) is accounted as Poisson under add/remove
//! adjacency; fixed-size cohorts (`fixed`, or `fraction < 1`) are **not** Poisson and are
//! accounted with sampling without replacement under replace-one adjacency, `q = m/N` per
//! round; `fraction = 1` is full participation (`q = 1`). A round is charged with the rate it
//! used, never with how many sampled clients reported, so dropouts never lower ε.
//!
//! # When a round is charged
//!
//! The ledger entry of round `r` (mode, `q`, effective `z`, `C`, sampled, reported, ε after `r`)
//! is written in the **same SQLite transaction** as the round's record and checkpoint row, after
//! the checkpoint file is durable and **before** version `r` is published. A coordinator killed
//! before that commit published nothing computed from round `r`'s updates, so nothing was
//! released and nothing needs charging; killed after it, the ledger already holds the charge.
//! At start the [`Accountant`](fedtune_shared::privacy::Accountant) is rebuilt from the ledger
//! ([`Accountant::from_entries`](fedtune_shared::privacy::Accountant::from_entries)), which
//! refuses a ledger whose recorded ε is below what replay computes. The ledger therefore never
//! shows less than what was released.
//!
//! Caveat (local noise): an attempt that fails after clients uploaded gives the coordinator
//! their noised updates without publishing anything. Each such upload is private on its own
//! against the coordinator (that is what local noise is for), but the ledger accounts the
//! published models, i.e. what everyone except the coordinator sees.
//!
//! # Budget
//!
//! With `privacy.target_epsilon`, before each round the coordinator computes ε *if* the round
//! ran ([`Accountant::epsilon_if`](fedtune_shared::privacy::Accountant::epsilon_if)); if that
//! exceeds the budget it refuses the round, logs why, reports it in `GetStatus`
//! (`finished_reason`, phase `FINISHED`), and ends the federation cleanly: the last published
//! model stays downloadable and exportable.
//!
//! # Server-side check
//!
//! Under central noise the coordinator also bounds each update it folds: an update whose norm
//! exceeds `C` is scaled onto the ball (server-side clipping) rather than refused, so the
//! sensitivity bound holds even for a client that did not clip, and an honest client whose
//! float rounding lands a hair outside is not thrown away. Under local and distributed noise the
//! uploaded update is clipped *and* noised, so its norm is not bounded by `C` (about `σ√d`);
//! the coordinator folds it unscaled. What protects the client there is its own noise.
//!
//! # Distributed noise
//!
//! `distributed` makes each of the `n̄` expected clients add `1/√n̄` of the noise, so only the
//! sum is private: that needs secure aggregation, which fedtune does not implement yet. Without
//! it the coordinator sees every individual update with a fraction of the noise, so `serve`
//! refuses the mode unless `privacy.allow_distributed_without_secure_aggregation = true`.
//!
//! # Layout
//! - [`PrivacySettings`], [`DpMode`], [`AdaptiveClipSettings`]: the `[privacy]` section.
//! - [`ledger`]: ledger rows ⇄ [`PrivacyLedgerEntry`](fedtune_shared::privacy::PrivacyLedgerEntry).
//! - [`cli`]: `privacy` (ledger or planning) and `calibrate` commands.
//! - [`PrivacyMonitor`]: the live status `GetStatus` reports.
//! - [`wrap_strategy`]: builds the DP decorator at start-up, accountant rebuilt from the ledger.

pub mod cli;
pub mod ledger;

use std::sync::{Arc, Mutex};

use fedtune_shared::privacy::{
    calibrate_for, AdaptiveClip, Adjacency, NoisePlacement, PrivacyError, SamplingScheme,
};
use fedtune_shared::round::PrivacyStatus;
use fedtune_shared::settings::SettingsError;
use serde::{Deserialize, Serialize};

use crate::settings::{CoordinatorSettings, SamplingSettings};
use crate::storage::{self, Storage, StorageError};
use crate::strategy::dp::DpStrategy;
use crate::strategy::Strategy;

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
    /// Every client adds its share of the noise (needs secure aggregation; see the module docs).
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
    /// Run `distributed` although secure aggregation does not exist yet (see the module docs).
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

/// Lower-case name of a sampling scheme, as status and the ledger table show it.
pub fn scheme_name(s: SamplingScheme) -> &'static str {
    match s {
        SamplingScheme::Poisson => "poisson",
        SamplingScheme::FixedSize => "fixed_size",
        SamplingScheme::Full => "full",
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
        if self.mode == DpMode::Distributed && !self.allow_distributed_without_secure_aggregation {
            return Err(SettingsError::invalid(
                "privacy.mode",
                "`distributed` splits the noise among clients so that only the SUM is private, which needs \
                 secure aggregation; fedtune has none yet, so the coordinator would see every update with \
                 only a fraction of the noise. Use `central` or `local`, or set \
                 privacy.allow_distributed_without_secure_aggregation = true to run it anyway",
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

/// The strategy's differential-privacy state, shared with status (a cheap, short lock, never
/// held across anything slow).
#[derive(Debug, Clone)]
pub struct PrivacyMonitor(Arc<Mutex<PrivacyStatus>>);

impl PrivacyMonitor {
    /// A monitor starting at `status`.
    pub fn new(status: PrivacyStatus) -> Self {
        Self(Arc::new(Mutex::new(status)))
    }

    /// The current state.
    pub fn snapshot(&self) -> PrivacyStatus {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the state.
    pub fn update(&self, f: impl FnOnce(&mut PrivacyStatus)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// The one-line guarantee status shows.
pub fn guarantee_line(mode: DpMode, epsilon: f64, delta: f64, rounds: u64) -> String {
    match mode {
        DpMode::None => PrivacyStatus::NO_GUARANTEE.to_string(),
        _ => format!(
            "(ε = {epsilon:.4}, δ = {delta:e}) user-level DP after {rounds} round(s), {} noise",
            mode.as_str()
        ),
    }
}

/// Errors of the privacy wiring at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DpSetupError {
    /// The library refused a parameter, the ledger, or the entropy source failed.
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    /// The state database.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Settings and state directory disagree.
    #[error("{0}")]
    Mismatch(String),
}

/// Meta key recording the privacy mode a federation was created with.
const MODE_KEY: &str = "privacy_mode";

/// Wraps `inner` in the DP decorator when `[privacy]` enables it, with the accountant rebuilt
/// from the ledger of `store`. `dim` is the number of trainable values. Refuses to resume a
/// federation under another privacy mode than it was created with (ε would not describe it).
pub fn wrap_strategy(
    settings: &CoordinatorSettings,
    inner: Box<dyn Strategy>,
    store: &Storage,
    dim: usize,
    fresh: bool,
) -> Result<Box<dyn Strategy>, DpSetupError> {
    let p = &settings.privacy;
    let mode = p.mode.as_str();
    let recorded = store.call_sync(|c| storage::meta_get(c, MODE_KEY))?;
    // A directory with no completed round has released nothing yet, whatever it was created
    // with (e.g. a crash between its creation and this record).
    let completed: i64 = store.call_sync(|c| {
        Ok(c.query_row("SELECT COUNT(*) FROM rounds WHERE status = 'completed'", [], |r| r.get(0))?)
    })?;
    match recorded {
        None if fresh || completed == 0 => store.call_sync(|c| storage::meta_set(c, MODE_KEY, mode))?,
        // A state directory from before privacy was recorded ran without DP.
        None if mode == "none" => store.call_sync(|c| storage::meta_set(c, MODE_KEY, mode))?,
        None => {
            return Err(DpSetupError::Mismatch(format!(
                "privacy.mode = {mode}, but this federation already ran rounds without differential privacy; \
                 use a new state directory"
            )))
        }
        Some(r) if r != mode => {
            return Err(DpSetupError::Mismatch(format!(
                "privacy.mode = {mode}, but this federation was created with `{r}`; ε would not describe it. \
                 Use `{r}` or a new state directory"
            )))
        }
        Some(_) => {}
    }
    if !p.enabled() {
        return Ok(inner);
    }
    let entries = store.call_sync(ledger::load)?;
    Ok(Box::new(DpStrategy::new(inner, settings, dim, &entries)?))
}
