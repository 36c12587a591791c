//! Differential privacy in the coordinator: what the guarantee is, when a round is charged, and
//! the live status. The pieces live in their layers: the `[privacy]` settings in
//! [`crate::settings::privacy`], the ledger record in [`crate::storage::ledger`], the
//! [`DpStrategy`](crate::strategy::dp::DpStrategy) decorator in [`crate::strategy::dp`].
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
//! Local noise: an attempt that fails after clients uploaded gives the coordinator their noised
//! updates without publishing anything. The ledger accounts the published models (what
//! everyone except the coordinator sees); what the coordinator saw is each client's local ε,
//! which counts every attempt the client was drawn into, failed ones included (below).
//!
//! # Two numbers: central and local
//!
//! The ledger's ε is the **central** guarantee of the published models. It takes amplification
//! by subsampling, which holds only while the sample is secret: under DP every draw is seeded
//! from the OS CSPRNG ([`crate::sampling::fit_seed`]) and only the operator may see who was
//! drawn. The coordinator itself always knows the sample, so under `local` noise (whose point is
//! privacy against the coordinator) each client's guarantee is its **local** ε: its
//! participations (fit attempts it was drawn into, failed ones included,
//! [`crate::storage::ledger::exposures`]) composed without amplification, each with the noise
//! multiplier its draw recorded ([`local_epsilon`]: under adaptive clipping the client's update
//! and indicator noise together, and a multiplier changed between restarts counts as it was).
//! Gaussian rounds compose exactly through `Σ z⁻²`, so the worst-off client is the one with the
//! largest sum ([`worst_exposure`]); with one multiplier throughout, the most-sampled one.
//! Status (and each round of it), `privacy --state-dir` (a column per round) and `simulate`
//! (table, `metrics.*`, chart) show the worst-off client's.
//!
//! # Budget
//!
//! With `privacy.target_epsilon`, before each round the coordinator computes ε *if* the round
//! ran ([`Accountant::epsilon_if`](fedtune_shared::privacy::Accountant::epsilon_if)); under
//! `local` noise also the local ε of the worst-off client if this draw's tasks were released
//! (a client's own guarantee must not silently exceed the budget the operator announced, and the
//! central ε is never the larger of the two). If either exceeds the budget it refuses the round, logs why, reports it in `GetStatus`
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
//! - [`PrivacySettings`], [`DpMode`], [`AdaptiveClipSettings`]: the `[privacy]` section (defined
//!   in [`crate::settings::privacy`], the layer every module may read).
//! - [`cli`]: `privacy` (ledger or planning) and `calibrate` commands.
//! - [`PrivacyMonitor`]: the live status `GetStatus` reports.
//! - Elsewhere: the ledger record and its table in [`crate::storage::ledger`]; the decorator and
//!   its start-up wiring (accountant rebuilt from the ledger) in [`crate::strategy::dp`].

pub mod cli;

use std::sync::{Arc, Mutex};

use fedtune_shared::privacy::{epsilon_unamplified_composed, PrivacyError, SamplingScheme};
use fedtune_shared::round::PrivacyStatus;

pub use crate::settings::{AdaptiveClipSettings, DpMode, PrivacySettings};
use crate::storage::ledger::Exposures;

/// Lower-case name of a sampling scheme, as status and the ledger table show it.
pub fn scheme_name(s: SamplingScheme) -> &'static str {
    match s {
        SamplingScheme::Poisson => "poisson",
        SamplingScheme::FixedSize => "fixed_size",
        SamplingScheme::Full => "full",
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

/// Restates `status.guarantee` from the figures beside it, so the line never disagrees with
/// the numbers it summarizes.
pub fn restate_guarantee(status: &mut PrivacyStatus, mode: DpMode, epsilon: f64, delta: f64, rounds: u64) {
    status.guarantee = guarantee_line(
        mode,
        epsilon,
        delta,
        rounds,
        status.local_epsilon.map(|l| (l, status.max_participations)),
        status.evaluation_outside_guarantee,
    );
}

/// The one-line guarantee status shows: the central ε of the published models and, under local
/// noise, the local ε of the worst-off client (`local`: ε and its participations); when
/// evaluation runs under DP (`evaluation_outside`), that its figures are outside the guarantee.
pub fn guarantee_line(
    mode: DpMode,
    epsilon: f64,
    delta: f64,
    rounds: u64,
    local: Option<(f64, u64)>,
    evaluation_outside: bool,
) -> String {
    let line = match (mode, local) {
        (DpMode::None, _) => PrivacyStatus::NO_GUARANTEE.to_string(),
        (_, None) => format!(
            "(ε = {epsilon:.4}, δ = {delta:e}) user-level DP of the published models after {rounds} round(s), {} noise",
            mode.as_str()
        ),
        (_, Some((local, k))) => format!(
            "(ε = {epsilon:.4}, δ = {delta:e}) user-level DP of the published models after {rounds} round(s), {} \
             noise; against the coordinator, local ε = {local:.4} for the worst-off client ({k} participation(s))",
            mode.as_str()
        ),
    };
    if evaluation_outside && mode != DpMode::None {
        format!("{line}; evaluation results are {}", PrivacyStatus::EVALUATION_OUTSIDE)
    } else {
        line
    }
}

/// The local ε of a client whose fit attempts had local noise multipliers `z_i`, given as
/// `inverse_variance = Σ z_i⁻²`: the coordinator knows who was sampled, so no amplification
/// applies, and each attempt counts with its own `z` (under adaptive clipping, or after the
/// multiplier changed between restarts, they differ).
pub fn local_epsilon(inverse_variance: f64, delta: f64) -> Result<f64, PrivacyError> {
    epsilon_unamplified_composed(inverse_variance, delta)
}

/// The worst-off client under local noise: `Σ z⁻²` (the larger, the larger its local ε) and the
/// fit attempts behind it. `draw_z`: the drawn clients get one more attempt at this multiplier
/// (`None`: the exposures as they stand); an attempt without a recorded multiplier counts at
/// `fallback_z`.
pub fn worst_exposure(exposures: &Exposures, draw_z: Option<f64>, fallback_z: f64) -> (f64, u64) {
    let drawn = exposures.drawn.iter().map(|e| match draw_z {
        Some(z) => e.with_attempt(z),
        None => *e,
    });
    drawn
        .chain(exposures.others.iter().copied())
        .map(|e| (e.inverse_variance_with(fallback_z), e.participations))
        .fold((0.0, 0), |worst, e| if e.0 > worst.0 || (e.0 == worst.0 && e.1 > worst.1) { e } else { worst })
}
