//! `DpStrategy`: user-level DP-FedAvg as a decorator around any [`Strategy`].
//!
//! Per round (the mechanism and its proof are in the [`fedtune_shared::privacy`] docs; the
//! coordinator side in [`crate::privacy`]):
//!
//! 1. [`Strategy::configure_fit`]: from the round's [`Draw`], the sampling rate `q` (Poisson
//!    rate, `m/N` for a fixed-size cohort, 1 for everyone), the fixed denominator `n̄`, and the
//!    budget check: if ε after this round would exceed `target_epsilon` the round is refused
//!    with [`StrategyError::Exhausted`] (the federation ends cleanly). Clients are told the
//!    placement, `C`, their noise std and grid, and whether to report the clipping indicator
//!    (adaptive clipping). All of it goes into the round's [`DpRound`], which the actor hands
//!    back with the [`RoundContext`]: nothing about the round is remembered here.
//! 2. [`Strategy::update_weighting`]: every update weighs 1 (user level: example counts would
//!    let a client with much data weigh more and are themselves private). Under central noise an
//!    update beyond `C` is scaled onto the ball (server-side clipping).
//! 3. [`Strategy::aggregate_fit`]: the exact integer sum of the folded updates gets the central
//!    discrete Gaussian noise (if central) on its own 2⁻²⁴ grid, its denominator becomes `n̄`
//!    (never the number that reported), and it goes to the inner strategy. With adaptive
//!    clipping the noised indicator sum moves `C`. The round's [`LedgerRecord`] comes back with
//!    the new weights.
//! 4. [`Strategy::charge`]: once the weights are accepted, the record is booked: the accountant
//!    composes the round and the next round starts from its clip bound. The coordinator writes
//!    the same record in the round's commit transaction (before the version is published).
//!
//! # Under secure aggregation
//!
//! The [`Draw`] then carries the round's threshold t ([`super::SecureDraw`]), and:
//! - **Distributed noise is sized for t**, not n̄: each client adds `N_ℤ(0, z²C'²/t)`, so any
//!   sum the coordinator may unmask (at least t inputs) carries at least the target noise; the
//!   budget check before the round is therefore the worst case the threshold allows, and the
//!   ledger records what the survivors actually carried (never more than z).
//! - **No amplification by sampling** under distributed noise: the guarantee is stated against
//!   the coordinator, which knows who was drawn, so the round is accounted with q = 1.
//! - **The grid is the encoding's** ([`Encoding::choose`]): the finest on which the drawn count
//!   of inputs cannot wrap around 2³² except with the stated probability; the sensitivity
//!   `C' = C + 2^k√d` the accountant charges is on that grid.
//! - **Charged on release** ([`Strategy::release`]): under distributed noise the coordinator may
//!   learn the sum as soon as it asks the survivors to unmask it, so the round is charged then
//!   (and written to storage before the request goes out), published or not. `aggregate_fit`
//!   and `charge` then reuse that record and compose nothing twice.
//! - Adaptive clipping is refused: its per-client indicator is a plaintext metric, which the
//!   coordinator would see with only a share of the noise.
//!
//! [`wrap_strategy`] builds the decorator at start-up, its accountant rebuilt from the ledger.

use fedtune_shared::ids::ModelVersion;
use fedtune_shared::params::ParameterVector;
use fedtune_shared::privacy::{
    add_noise_to_grid, widened_sensitivity, Accountant, AdaptiveClip, NoisePlacement, NoisePlan, NoiseSource,
    PrivacyError, PrivacyLedgerEntry, SamplingScheme, MAX_SIGMA_GRID,
};
use fedtune_shared::round::{FitInstructions, PrivacyInstructions, PrivacyMode, PrivacyStatus};
use fedtune_shared::secagg::Encoding;
use tracing::{info, warn};

use super::{
    Aggregated, Denominator, Draw, EvalResult, EvalSummary, FitFailure, FitPlan, FitResults, RoundContext,
    Strategy, StrategyError, UpdateWeighting, UploadStats,
};
use crate::aggregate::{MAX_ABS_VALUE, SCALE_BITS};
use crate::privacy::{
    guarantee_line, local_epsilon, restate_guarantee, scheme_name, worst_exposure, PrivacyMonitor,
};
use crate::sampling;
use crate::settings::{accounting_for, AdaptiveClipSettings, CoordinatorSettings, DpMode, SamplingSettings};
use crate::storage::ledger::Exposures;
use crate::storage::{self, LedgerRecord, Storage, StorageError};

pub use fedtune_shared::privacy::CLIP_INDICATOR_METRIC;

/// A client's reported indicator as summed: under central noise forced onto ±½ (an honest
/// client sends exactly that; anything else must not move the count by more than ½, its
/// sensitivity); under client-side noise the noised value as sent. A missing or non-finite
/// report counts as clipped.
fn indicator_value(reported: Option<f64>, central: bool) -> f64 {
    match reported {
        Some(b) if central && b >= 0.0 => 0.5,
        Some(_) if central => -0.5,
        // Bounded so that one wild report cannot push C to 0 or infinity in one step.
        Some(b) if b.is_finite() => b.clamp(-1e3, 1e3),
        _ => -0.5,
    }
}

/// The differential-privacy plan of one round: made by `configure_fit`, carried in the round's
/// [`RoundContext`], read by `update_weighting` and `aggregate_fit` of that round.
#[derive(Debug, Clone, PartialEq)]
pub struct DpRound {
    sampling_rate: f64,
    expected_clients: f64,
    clip_norm: f64,
    /// Multiplier of the update noise (below the round's `z` under adaptive clipping).
    update_multiplier: f64,
    /// The plan the clients follow (grid and per-party σ for client-side noise).
    client_plan: NoisePlan,
    /// Adaptive clipping as the round started (its bound moves only when the round is charged).
    adaptive: Option<AdaptiveClip>,
    /// Under local noise: the multiplier each drawn client adds (update and indicator noise
    /// together), recorded with the draw.
    local_noise_multiplier: Option<f64>,
    /// Under local noise: the worst-off client's local ε once this draw's tasks are released.
    local_epsilon: Option<f64>,
    /// Whether the round runs under secure aggregation (its grid is the encoding's).
    secure: bool,
    /// The charge taken when the round's sum was released for unmasking ([`Strategy::release`]).
    released: Option<LedgerRecord>,
}

impl DpRound {
    /// The clip bound `C` of the round.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// The fixed averaging denominator `n̄` of the round.
    pub fn expected_clients(&self) -> f64 {
        self.expected_clients
    }

    /// Under local noise, the noise multiplier each drawn client adds in this attempt (what the
    /// draw record keeps for the clients' local ε); `None` otherwise.
    pub fn local_noise_multiplier(&self) -> Option<f64> {
        self.local_noise_multiplier
    }

    /// The grid exponent the clients round to (under secure aggregation, the encoding's grid).
    pub fn grid_log2(&self) -> i32 {
        self.client_plan.grid_log2
    }

    /// Each client's noise share in grid steps (0 unless distributed noise).
    pub fn client_sigma_grid(&self) -> f64 {
        if self.client_plan.client_adds_noise() {
            self.client_plan.party_sigma() * 2f64.powi(-self.client_plan.grid_log2)
        } else {
            0.0
        }
    }
}

/// The user-level DP decorator (see the module docs).
pub struct DpStrategy {
    inner: Box<dyn Strategy>,
    mode: DpMode,
    placement: NoisePlacement,
    noise_multiplier: f64,
    target_epsilon: Option<f64>,
    per_layer: bool,
    expected_override: Option<f64>,
    sampling_settings: SamplingSettings,
    min_fit: usize,
    sampling: SamplingScheme,
    dim: usize,
    clip_norm: f64,
    adaptive_settings: Option<AdaptiveClipSettings>,
    adaptive: Option<AdaptiveClip>,
    accountant: Accountant,
    noise: NoiseSource,
    monitor: PrivacyMonitor,
}

impl std::fmt::Debug for DpStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpStrategy")
            .field("inner", &self.inner.name())
            .field("mode", &self.mode)
            .field("noise_multiplier", &self.noise_multiplier)
            .field("clip_norm", &self.clip_norm)
            .field("epsilon", &self.accountant.epsilon())
            .finish_non_exhaustive()
    }
}

fn invalid(e: impl std::fmt::Display) -> PrivacyError {
    PrivacyError::InvalidParameter(e.to_string())
}

fn adaptive_clip(s: &AdaptiveClipSettings, clip_norm: f64) -> Result<AdaptiveClip, PrivacyError> {
    AdaptiveClip::new(clip_norm, s.target_quantile, s.learning_rate, s.count_noise_std)
}

/// The bound on one folded contribution as the integer sum holds it: `C`, widened by the f32
/// rounding of the server-side scale (relative 2⁻²³) and by the rounding of every value to the
/// 2⁻²⁴ grid of the sum (half a step per value, `2⁻²⁵·√d` in all).
fn central_sensitivity(clip: f64, dim: usize) -> Result<f64, PrivacyError> {
    widened_sensitivity(clip * (1.0 + 2f64.powi(-23)), -(SCALE_BITS + 1), dim)
}

/// Noise std, in units of the sum's grid, of central noise with multiplier `z` and bound `clip`.
fn central_sigma_grid(z: f64, clip: f64, dim: usize) -> Result<f64, PrivacyError> {
    let sigma = z * central_sensitivity(clip, dim)? * 2f64.powi(SCALE_BITS);
    if sigma > MAX_SIGMA_GRID {
        return Err(invalid(format!(
            "central noise σ = {:.3e} (z = {z}, C = {clip}) is beyond the sampler's range on the 2^-{SCALE_BITS} \
             grid of the sum; lower privacy.clip_norm or privacy.noise_multiplier",
            sigma * 2f64.powi(-SCALE_BITS)
        )));
    }
    Ok(sigma)
}

impl DpStrategy {
    /// Decorates `inner` per `settings.privacy` for updates of `dim` values, resuming from the
    /// ledger `history` (oldest first). Validates every parameter; noise comes from the
    /// operating system's CSPRNG.
    pub fn new(
        inner: Box<dyn Strategy>,
        settings: &CoordinatorSettings,
        dim: usize,
        history: &[LedgerRecord],
    ) -> Result<Self, PrivacyError> {
        Self::with_noise_source(inner, settings, dim, history, NoiseSource::from_os_entropy()?)
    }

    /// [`DpStrategy::new`] with an explicit noise source (tests use a seeded one).
    pub fn with_noise_source(
        inner: Box<dyn Strategy>,
        settings: &CoordinatorSettings,
        dim: usize,
        history: &[LedgerRecord],
        noise: NoiseSource,
    ) -> Result<Self, PrivacyError> {
        let p = &settings.privacy;
        let placement = p.mode.placement().ok_or_else(|| invalid("privacy.mode is none"))?;
        if dim == 0 {
            return Err(invalid("the model has no trainable value"));
        }
        if p.mode == DpMode::Distributed
            && !settings.secure_aggregation.enabled
            && !p.allow_distributed_without_secure_aggregation
        {
            return Err(invalid("distributed noise needs secure aggregation (see privacy.mode)"));
        }
        let noise_multiplier = p.resolved_noise_multiplier(settings).map_err(invalid)?;
        if !(p.clip_norm.is_finite() && p.clip_norm > 0.0) {
            return Err(invalid(format!("clip norm {} must be finite and positive", p.clip_norm)));
        }
        if let Some(t) = p.target_epsilon.filter(|t| !(t.is_finite() && *t > 0.0)) {
            return Err(invalid(format!("target epsilon {t} must be finite and positive")));
        }
        let (sampling, adjacency) = accounting_for(&settings.sampling);
        let entries: Vec<PrivacyLedgerEntry> = history.iter().map(|r| r.entry.clone()).collect();
        let accountant = Accountant::from_entries(p.delta, adjacency, &entries)?;
        let clip_norm = history.last().map(|r| r.next_clip_norm).unwrap_or(p.clip_norm);
        let adaptive = match &p.adaptive_clipping {
            Some(a) => {
                let clip = adaptive_clip(a, clip_norm)?;
                clip.update_noise_multiplier(noise_multiplier)?;
                Some(clip)
            }
            None => None,
        };
        // A plan on a nominal cohort checks that the sampler can serve this z, C and d at all,
        // and that client-side noise fits the protocol's value range (values beyond it are
        // refused on upload, so every private update would be lost).
        let nominal = NoisePlan::new(placement, noise_multiplier, clip_norm, dim, 1.0)?;
        if nominal.client_adds_noise() && 8.0 * nominal.party_sigma() > f64::from(MAX_ABS_VALUE) {
            return Err(invalid(format!(
                "client-side noise σ = {:.3} (z = {noise_multiplier}, C = {clip_norm}) would push update values \
                 beyond the protocol's ±{MAX_ABS_VALUE}; lower privacy.clip_norm",
                nominal.party_sigma()
            )));
        }
        if nominal.coordinator_adds_noise() {
            let z_update = match &adaptive {
                Some(a) => a.update_noise_multiplier(noise_multiplier)?,
                None => noise_multiplier,
            };
            central_sigma_grid(z_update, clip_norm, dim)?;
        }
        let epsilon = accountant.epsilon();
        let monitor = PrivacyMonitor::new(PrivacyStatus {
            mode: p.mode.as_str().into(),
            guarantee: guarantee_line(
                p.mode,
                epsilon,
                p.delta,
                accountant.rounds(),
                (placement == NoisePlacement::Local).then_some((0.0, 0)),
                settings.evaluation_outside_guarantee(),
            ),
            epsilon,
            delta: p.delta,
            target_epsilon: p.target_epsilon,
            noise_multiplier,
            clip_norm,
            sampling: scheme_name(sampling).into(),
            rounds_charged: accountant.rounds(),
            local_epsilon: (placement == NoisePlacement::Local).then_some(0.0),
            max_participations: 0,
            evaluation_outside_guarantee: settings.evaluation_outside_guarantee(),
        });
        info!(
            mode = p.mode.as_str(),
            noise_multiplier,
            clip_norm,
            delta = p.delta,
            target_epsilon = ?p.target_epsilon,
            sampling = scheme_name(sampling),
            epsilon_so_far = epsilon,
            rounds_charged = accountant.rounds(),
            "differential privacy on"
        );
        Ok(Self {
            inner,
            mode: p.mode,
            placement,
            noise_multiplier,
            target_epsilon: p.target_epsilon,
            per_layer: p.per_layer_clipping,
            expected_override: p.expected_clients,
            sampling_settings: settings.sampling.clone(),
            min_fit: settings.rounds.min_fit,
            sampling,
            dim,
            clip_norm,
            adaptive_settings: p.adaptive_clipping.clone(),
            adaptive,
            accountant,
            noise,
            monitor,
        })
    }

    /// ε spent so far.
    pub fn epsilon(&self) -> f64 {
        self.accountant.epsilon()
    }

    /// The clip bound the next round uses.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// The ledger record of a round accounted at multiplier `accounted` with `reported` of
    /// `sampled` contributions, ε computed on a copy of the accountant (composing it is the
    /// caller's business); refused when ε would exceed the target.
    fn round_record(
        &self,
        round: u64,
        plan: &DpRound,
        accounted: f64,
        sampled: u64,
        reported: u64,
        next_clip_norm: f64,
    ) -> Result<LedgerRecord, StrategyError> {
        let entry = PrivacyLedgerEntry {
            round,
            sampling: self.sampling,
            placement: self.placement,
            sampling_rate: plan.sampling_rate,
            noise_multiplier: accounted,
            clip_norm: plan.clip_norm,
            sampled,
            reported,
            delta: self.accountant.delta(),
            epsilon_after: 0.0,
        };
        let entry = self.accountant.clone().record(entry).map_err(|e| StrategyError::State(e.to_string()))?;
        if let Some(target) = self.target_epsilon.filter(|t| entry.epsilon_after > *t) {
            let reason = format!(
                "privacy budget exhausted: round {round} would bring ε to {:.4} with the noise multiplier \
                 {accounted:.4} of the {reported} updates that arrived, above privacy.target_epsilon = {target}; \
                 nothing of it is published and the last model stays available",
                entry.epsilon_after
            );
            warn!(%reason, "round refused after aggregation");
            return Err(StrategyError::Exhausted(reason));
        }
        Ok(LedgerRecord {
            entry,
            expected_clients: plan.expected_clients,
            next_clip_norm,
            local_epsilon: plan.local_epsilon,
            charged_at_release: false,
        })
    }

    /// Status and logs after a round was composed into the accountant.
    fn observe_charge(&self, record: &LedgerRecord) {
        let epsilon = record.entry.epsilon_after;
        let rounds = self.accountant.rounds();
        let (mode, delta) = (self.mode, self.accountant.delta());
        self.monitor.update(|s| {
            s.epsilon = epsilon;
            s.rounds_charged = rounds;
            s.clip_norm = record.next_clip_norm;
            s.noise_multiplier = record.entry.noise_multiplier;
            restate_guarantee(s, mode, epsilon, delta, rounds);
        });
        info!(
            round = record.entry.round,
            epsilon,
            delta,
            clip_norm = record.entry.clip_norm,
            "privacy charged"
        );
    }

    /// `q` and `n̄` of a draw of `selected` out of `candidates`.
    ///
    /// `n̄` (the averaging denominator, and the number of noise shares under distributed noise)
    /// is a public bound: `privacy.expected_clients`, else what the configured scheme asks for
    /// of the (public) candidate count, never the realised size of the sample, which one
    /// client's presence changes. A fixed-size cohort's size is itself public
    /// ([`sampling::cohort_size`]: `max(min_fit, ⌈fraction·N⌉)`, at most `N`), so it is `n̄`.
    fn rate_and_denominator(&self, candidates: usize, selected: usize) -> (f64, f64) {
        let (q, n) = match (&self.sampling_settings, self.sampling) {
            (SamplingSettings::Poisson { rate }, _) => (*rate, rate * candidates as f64),
            (_, SamplingScheme::Full) => (1.0, candidates as f64),
            (configured, _) => {
                let q = if candidates == 0 { 1.0 } else { (selected as f64 / candidates as f64).min(1.0) };
                let n = sampling::cohort_size(configured, self.min_fit, candidates)
                    .map_or(selected as f64, |m| m as f64);
                (q, n)
            }
        };
        (q.max(f64::MIN_POSITIVE), self.expected_override.unwrap_or(n).max(1.0))
    }

    /// Records what the draw records say the coordinator has seen of each client (at start), so
    /// status shows the worst-off client's local ε before the next draw.
    pub fn resume_exposures(&mut self, exposures: &Exposures) -> Result<(), PrivacyError> {
        let local = self.local_epsilon_after(exposures, None)?;
        self.observe_local(local);
        Ok(())
    }

    /// Under local noise, the worst-off client's local ε and its fit attempts once the drawn
    /// clients add an attempt at `draw_z` (`None`: as the records stand). Attempts recorded
    /// before multipliers were kept count at the configured one.
    fn local_epsilon_after(
        &self,
        exposures: &Exposures,
        draw_z: Option<f64>,
    ) -> Result<Option<(f64, u64)>, PrivacyError> {
        if self.placement != NoisePlacement::Local {
            return Ok(None);
        }
        let (inverse_variance, participations) = worst_exposure(exposures, draw_z, self.noise_multiplier);
        Ok(Some((local_epsilon(inverse_variance, self.accountant.delta())?, participations)))
    }

    fn observe_local(&self, local: Option<(f64, u64)>) {
        let (mode, delta, rounds, epsilon) =
            (self.mode, self.accountant.delta(), self.accountant.rounds(), self.accountant.epsilon());
        self.monitor.update(|s| {
            if let Some((local, participations)) = local {
                // The records only grow, so the worst-off client's ε never falls; a smaller
                // figure comes from a draw that was not counted (below min_fit).
                if s.local_epsilon.is_none_or(|shown| local >= shown) {
                    s.local_epsilon = Some(local);
                    s.max_participations = participations;
                }
            }
            restate_guarantee(s, mode, epsilon, delta, rounds);
        });
    }

    /// The multiplier a client adds under local noise: its update noise and, with adaptive
    /// clipping, its indicator noise, composed (`None` in other modes).
    fn local_noise_multiplier(&self, update_multiplier: f64) -> Option<f64> {
        (self.placement == NoisePlacement::Local).then(|| match &self.adaptive {
            Some(a) => a.combined_noise_multiplier(update_multiplier),
            None => update_multiplier,
        })
    }

    /// Under local noise, refuses a draw after which the worst-off client's local ε would exceed
    /// the budget (see the budget section of [`crate::privacy`]). Returns that ε.
    fn check_local_budget(&self, draw: &Draw, draw_z: Option<f64>) -> Result<Option<f64>, StrategyError> {
        let local = self
            .local_epsilon_after(&draw.exposures, draw_z)
            .map_err(|e| StrategyError::State(e.to_string()))?;
        if let (Some((local, participations)), Some(target)) = (local, self.target_epsilon) {
            if local > target {
                let reason = format!(
                    "privacy budget exhausted: round {} would bring the local ε of the worst-off client \
                     ({participations} participations, no amplification: the coordinator knows the sample) to \
                     {local:.4}, above privacy.target_epsilon = {target} (δ = {:e}); the last model stays available",
                    draw.round.round,
                    self.accountant.delta()
                );
                warn!(%reason, "round refused");
                return Err(StrategyError::Exhausted(reason));
            }
        }
        self.observe_local(local);
        Ok(local.map(|(l, _)| l))
    }

    /// The update-noise multiplier (the round's `z` minus what adaptive clipping's count spends).
    fn update_multiplier(&self) -> Result<f64, PrivacyError> {
        match &self.adaptive {
            Some(a) => a.update_noise_multiplier(self.noise_multiplier),
            None => Ok(self.noise_multiplier),
        }
    }
}

impl Strategy for DpStrategy {
    fn name(&self) -> &str {
        // The recorded strategy name must not change when DP is added around it.
        self.inner.name()
    }

    fn configure_fit(&mut self, draw: &Draw, base: &FitInstructions) -> Result<FitPlan, StrategyError> {
        let round = draw.round;
        let (q, n_bar) = self.rate_and_denominator(draw.candidates, draw.selected);
        let state = |e: PrivacyError| StrategyError::State(e.to_string());
        let distributed = self.placement == NoisePlacement::Distributed;
        if draw.secure.is_some() && self.adaptive.is_some() {
            return Err(StrategyError::Refused(
                "adaptive clipping reports each client's clipping indicator in the clear, which secure \
                 aggregation would expose with only a share of its noise; turn one of them off"
                    .into(),
            ));
        }
        // Against the coordinator (which knows the draw) sampling does not amplify.
        let q = if distributed && draw.secure.is_some() { 1.0 } else { q };
        let next = self.accountant.epsilon_if(self.sampling, q, self.noise_multiplier).map_err(state)?;
        if let Some(target) = self.target_epsilon {
            if next > target {
                let spent = self.accountant.epsilon();
                let reason = format!(
                    "privacy budget exhausted: round {} would bring ε from {spent:.4} to {next:.4}, above \
                     privacy.target_epsilon = {target} (δ = {:e}); the last model stays available",
                    round.round,
                    self.accountant.delta()
                );
                warn!(%reason, "round refused");
                return Err(StrategyError::Exhausted(reason));
            }
        }
        let update_multiplier = self.update_multiplier().map_err(state)?;
        let local_noise_multiplier = self.local_noise_multiplier(update_multiplier);
        let local_epsilon = self.check_local_budget(draw, local_noise_multiplier)?;
        // Noise shares: n̄ expected clients, or under secure aggregation the threshold t, the
        // fewest inputs any unmasked sum holds.
        let shares = match draw.secure {
            Some(secure) if distributed => secure.threshold.max(1) as f64,
            _ => n_bar,
        };
        let mut client_plan =
            NoisePlan::new(self.placement, update_multiplier, self.clip_norm, self.dim, shares)
                .map_err(state)?;
        if let Some(secure) = draw.secure {
            client_plan = Encoding::choose(&client_plan, draw.selected.max(1), &secure.limits)
                .map_err(|e| StrategyError::Refused(format!("no encoding fits this secure round: {e}")))?
                .0;
        }
        let client_noise = client_plan.client_adds_noise();
        let privacy = PrivacyInstructions {
            mode: match self.placement {
                NoisePlacement::Central => PrivacyMode::Central,
                NoisePlacement::Local => PrivacyMode::Local,
                NoisePlacement::Distributed => PrivacyMode::Distributed,
            },
            clip_norm: self.clip_norm,
            noise_stddev: if client_noise { client_plan.party_sigma() } else { 0.0 },
            grid_log2: Some(client_plan.grid_log2),
            report_clip_indicator: self.adaptive.is_some(),
            indicator_noise_stddev: match (&self.adaptive, client_noise) {
                (Some(a), true) => a.count_party_sigma(self.placement, shares),
                _ => 0.0,
            },
            per_layer_clipping: self.per_layer,
            // What the round is accounted with, so a site can refuse a round below its floor.
            noise_multiplier: self.noise_multiplier,
        };
        let dp = DpRound {
            sampling_rate: q,
            expected_clients: n_bar,
            clip_norm: self.clip_norm,
            update_multiplier,
            client_plan,
            adaptive: self.adaptive.clone(),
            local_noise_multiplier,
            local_epsilon,
            secure: draw.secure.is_some(),
            released: None,
        };
        let inner = self.inner.configure_fit(draw, base)?;
        Ok(FitPlan {
            config: inner.config,
            privacy,
            context: RoundContext { privacy: Some(dp), ..inner.context },
        })
    }

    fn update_weighting(
        &self,
        round: &RoundContext,
        upload: &UploadStats,
    ) -> Result<UpdateWeighting, StrategyError> {
        let Some(plan) = &round.privacy else {
            return Err(StrategyError::Refused("no privacy plan for this round".into()));
        };
        if self.placement != NoisePlacement::Central {
            // Clipped and noised by the client: its norm is about σ√d, not bounded by C.
            return Ok(UpdateWeighting { weight: 1, scale: 1.0 });
        }
        let c = plan.clip_norm;
        // The received norm is an f64 sum: allow its rounding before scaling an honest update.
        let norm = upload.l2_norm * (1.0 + 1e-9);
        if !norm.is_finite() {
            return Err(StrategyError::Refused("update norm is not finite".into()));
        }
        if norm <= c {
            return Ok(UpdateWeighting { weight: 1, scale: 1.0 });
        }
        if norm > c * (1.0 + 1e-4) {
            warn!(client = %upload.client, norm = upload.l2_norm, clip_norm = c, "update exceeds the clip bound; scaled onto it");
        }
        let scale = (c / norm * (1.0 - 2f64.powi(-20))) as f32;
        Ok(UpdateWeighting { weight: 1, scale })
    }

    fn aggregate_fit(
        &mut self,
        round: &RoundContext,
        global: &ParameterVector,
        mut results: FitResults,
        failures: &[FitFailure],
    ) -> Result<Option<Aggregated>, StrategyError> {
        let state = |e: PrivacyError| StrategyError::State(e.to_string());
        let id = round.round();
        let Some(plan) = &round.privacy else {
            return Err(StrategyError::State(format!("round {id} was not configured for privacy")));
        };
        let reported = results.clients.len() as u64;
        let sampled = reported + failures.len() as u64;
        if self.placement == NoisePlacement::Central {
            // On the sum's own grid: the integer sum is exact, so the only rounding to account
            // for is each update's own quantization (in `central_sensitivity`), or under secure
            // aggregation the encoding's rounding, if that is the wider.
            let mut sigma_grid =
                central_sigma_grid(plan.update_multiplier, plan.clip_norm, self.dim).map_err(state)?;
            if plan.secure {
                let central = central_sensitivity(plan.clip_norm, self.dim).map_err(state)?;
                sigma_grid *= (plan.client_plan.sensitivity() / central).max(1.0);
            }
            add_noise_to_grid(results.sum.grid_mut(), sigma_grid, &self.noise).map_err(state)?;
        }
        // Fixed denominator: dividing by the public n̄ is post-processing; dividing by the
        // reported count would make one client's presence change every coordinate.
        results.denominator = Denominator::Fixed(plan.expected_clients);
        let record = match &plan.released {
            // Charged when the sum was released for unmasking; the same survivors are here.
            Some(released) => released.clone(),
            None => {
                // Adaptive clipping: the noised count of unclipped updates moves C for the next
                // round (on the round's copy: the bound only moves once the round is charged).
                let mut next_adaptive = plan.adaptive.clone();
                let mut accounted = plan.client_plan.effective_noise_multiplier(reported);
                if let Some(adaptive) = &mut next_adaptive {
                    let central = self.placement == NoisePlacement::Central;
                    let sum: f64 = results
                        .clients
                        .iter()
                        .map(|c| indicator_value(c.metrics.get(CLIP_INDICATOR_METRIC).copied(), central))
                        .sum();
                    let noised = if central {
                        adaptive
                            .noise_indicator_sum(sum, adaptive.count_noise_std(), &self.noise)
                            .map_err(state)?
                    } else {
                        sum
                    };
                    let mut count_multiplier = adaptive.count_noise_multiplier();
                    if self.placement == NoisePlacement::Distributed && reported > 0 {
                        // Only the reported shares of the count noise are in the sum.
                        count_multiplier *= (reported as f64 / plan.expected_clients).sqrt().min(1.0);
                    }
                    accounted = (accounted.powi(-2) + count_multiplier.powi(-2)).powf(-0.5);
                    adaptive.update(noised, plan.expected_clients).map_err(state)?;
                }
                let next_clip = next_adaptive.as_ref().map(|a| a.clip_norm()).unwrap_or(plan.clip_norm);
                // `configure_fit` checked the budget with the nominal z; dropouts under
                // distributed noise lower the z recorded here, so check again with it, before
                // anything is released.
                self.round_record(id.round, plan, accounted, sampled, reported, next_clip)?
            }
        };
        let next = self.inner.aggregate_fit(round, global, results, failures)?;
        Ok(next.map(|a| Aggregated { charge: Some(record), ..a }))
    }

    fn release(
        &mut self,
        round: &mut RoundContext,
        survivors: u64,
    ) -> Result<Option<LedgerRecord>, StrategyError> {
        let id = round.round();
        let selected = round.draw.selected as u64;
        let Some(plan) = &mut round.privacy else {
            return Err(StrategyError::State(format!("round {id} was not configured for privacy")));
        };
        // Central noise is added by the coordinator after unmasking: the release of the sum to
        // the coordinator is what central DP trusts it with, charged when published.
        if self.placement != NoisePlacement::Distributed || !plan.secure {
            return Ok(None);
        }
        if let Some(done) = &plan.released {
            return Ok(Some(done.clone()));
        }
        let accounted = plan.client_plan.effective_noise_multiplier(survivors);
        let mut record = self.round_record(id.round, plan, accounted, selected, survivors, plan.clip_norm)?;
        record.charged_at_release = true;
        let recorded =
            self.accountant.record(record.entry.clone()).map_err(|e| StrategyError::State(e.to_string()))?;
        debug_assert_eq!(recorded.epsilon_after, record.entry.epsilon_after);
        self.observe_charge(&record);
        plan.released = Some(record.clone());
        info!(
            round = id.round,
            survivors,
            epsilon = record.entry.epsilon_after,
            "privacy charged on release for unmasking"
        );
        Ok(Some(record))
    }

    fn charge(&mut self, record: &LedgerRecord) -> Result<(), StrategyError> {
        if !record.charged_at_release {
            let recorded = self
                .accountant
                .record(record.entry.clone())
                .map_err(|e| StrategyError::State(e.to_string()))?;
            debug_assert_eq!(recorded.epsilon_after, record.entry.epsilon_after);
        }
        if let Some(a) = &self.adaptive_settings {
            self.adaptive = Some(
                adaptive_clip(a, record.next_clip_norm).map_err(|e| StrategyError::State(e.to_string()))?,
            );
        }
        self.clip_norm = record.next_clip_norm;
        if !record.charged_at_release {
            // A release charge was observed (status, logs) when it was taken.
            self.observe_charge(record);
        }
        Ok(())
    }

    fn configure_evaluate(&mut self, version: ModelVersion, batch_size: u32) -> u32 {
        self.inner.configure_evaluate(version, batch_size)
    }

    fn aggregate_evaluate(
        &mut self,
        version: ModelVersion,
        results: &[EvalResult],
        failures: &[FitFailure],
    ) -> Result<Option<EvalSummary>, StrategyError> {
        self.inner.aggregate_evaluate(version, results, failures)
    }

    fn privacy_monitor(&self) -> Option<PrivacyMonitor> {
        Some(self.monitor.clone())
    }

    fn state(&self) -> Option<ParameterVector> {
        self.inner.state()
    }

    fn restore_state(&mut self, state: ParameterVector) -> Result<(), StrategyError> {
        self.inner.restore_state(state)
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
    let recorded = store.call_sync(|c| storage::ledger::recorded_mode(c))?;
    // A directory with no completed round has released nothing yet, whatever it was created
    // with (e.g. a crash between its creation and this record).
    let completed = store.call_sync(|c| storage::completed_rounds(c))?;
    match recorded {
        None if fresh || completed == 0 => store.call_sync(|c| storage::ledger::record_mode(c, mode))?,
        // A state directory from before privacy was recorded ran without DP.
        None if p.mode == DpMode::None => store.call_sync(|c| storage::ledger::record_mode(c, mode))?,
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
    let entries = store.call_sync(storage::ledger::load)?;
    let exposures = store.call_sync(|c| storage::ledger::exposures(c, &[]))?;
    let mut strategy = DpStrategy::new(inner, settings, dim, &entries)?;
    strategy.resume_exposures(&exposures)?;
    Ok(Box::new(strategy))
}

#[cfg(test)]
mod tests;
