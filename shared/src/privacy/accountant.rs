//! The privacy accountant, its ledger records and noise calibration.
//!
//! The accountant composes each round's RDP curve over [`default_orders`] and converts with
//! [`epsilon_from_rdp`]. It never looks at how many sampled clients reported: a round is
//! accounted with the sampling rate the coordinator *used*, since realised counts are
//! themselves private, and dropouts can only weaken, never strengthen, the guarantee (under
//! distributed noise the caller lowers the round's multiplier with
//! [`NoisePlan::effective_noise_multiplier`](super::NoisePlan::effective_noise_multiplier)).
//!
//! Sampling schemes and adjacency must match: Poisson sampling is accounted under add/remove
//! (or zero-out) adjacency with Mironov–Talwar–Zhang; a fixed-size cohort is *not* Poisson and
//! is accounted under replace-one adjacency with Wang–Balle–Kasiviswanathan, where one client's
//! replacement moves the sum by up to `2C'`, so its multiplier is halved. Full participation
//! (`q = 1`) fits either.

use serde::{Deserialize, Serialize};

use super::noise::NoisePlacement;
use super::rdp::{
    default_orders, epsilon_from_rdp, gaussian_epsilon, rdp_poisson_gaussian,
    rdp_without_replacement_gaussian, zcdp_epsilon,
};
use super::PrivacyError;

/// How a round chose its participants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplingScheme {
    /// Each client independently with probability `q`.
    Poisson,
    /// A uniformly random cohort of fixed size `m` out of `N` (`q = m/N`), without replacement.
    FixedSize,
    /// Every client (`q = 1`).
    Full,
}

/// The neighbouring relation the reported ε refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Adjacency {
    /// One client's data added or removed (or, for client-side noise, zeroed out).
    AddRemove,
    /// One client's data replaced by another's.
    ReplaceOne,
}

/// One round as the coordinator records it; the accountant can be rebuilt from a sequence of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedgerEntry {
    /// Round number (strictly increasing in a ledger).
    pub round: u64,
    /// How participants were chosen.
    pub sampling: SamplingScheme,
    /// Who added the noise.
    pub placement: NoisePlacement,
    /// The sampling rate used (`q`; `m/N` for fixed-size cohorts; 1 for full participation).
    pub sampling_rate: f64,
    /// The multiplier accounted for this round: noise std over the widened sensitivity, after
    /// composing adaptive clipping's count and any dropout correction.
    pub noise_multiplier: f64,
    /// Clip bound `C` used.
    pub clip_norm: f64,
    /// Clients sampled (informational: never used for ε).
    pub sampled: u64,
    /// Clients whose update entered the aggregate (informational: never used for ε).
    pub reported: u64,
    /// The δ the ε refers to.
    pub delta: f64,
    /// Cumulative ε after this round (filled in by [`Accountant::record`]).
    pub epsilon_after: f64,
}

/// Composes rounds and reports the best sound (ε, δ) (see the module docs).
#[derive(Debug, Clone)]
pub struct Accountant {
    delta: f64,
    adjacency: Adjacency,
    orders: Vec<f64>,
    rdp: Vec<f64>,
    rounds: u64,
    last_round: Option<u64>,
    /// Σ z⁻² over rounds while every round had q = 1 (the composition is then one Gaussian).
    full_inverse_variance: Option<f64>,
}

fn check_round(adjacency: Adjacency, sampling: SamplingScheme, q: f64, z: f64) -> Result<(), PrivacyError> {
    if !(z.is_finite() && z > 0.0) {
        return Err(PrivacyError::InvalidParameter(format!(
            "noise multiplier {z} must be finite and positive"
        )));
    }
    if !(q > 0.0 && q <= 1.0) {
        return Err(PrivacyError::InvalidParameter(format!("sampling rate {q} must be in (0, 1]")));
    }
    match (sampling, adjacency) {
        (SamplingScheme::Full, _) if q != 1.0 => {
            Err(PrivacyError::InvalidParameter(format!("full participation needs q = 1, got {q}")))
        }
        (SamplingScheme::Poisson, Adjacency::ReplaceOne) => Err(PrivacyError::InvalidParameter(
            "Poisson sampling is accounted under add/remove adjacency".into(),
        )),
        (SamplingScheme::FixedSize, Adjacency::AddRemove) => Err(PrivacyError::InvalidParameter(
            "fixed-size cohorts are not Poisson samples: account them under replace-one adjacency".into(),
        )),
        _ => Ok(()),
    }
}

/// The round's multiplier against the adjacency's sensitivity (replace-one doubles it).
fn relative_multiplier(adjacency: Adjacency, z: f64) -> f64 {
    match adjacency {
        Adjacency::AddRemove => z,
        Adjacency::ReplaceOne => z / 2.0,
    }
}

fn round_rdp(adjacency: Adjacency, sampling: SamplingScheme, q: f64, z: f64, orders: &[f64]) -> Vec<f64> {
    let zr = relative_multiplier(adjacency, z);
    orders
        .iter()
        .map(|&a| match sampling {
            SamplingScheme::FixedSize => rdp_without_replacement_gaussian(q, zr, a),
            SamplingScheme::Poisson | SamplingScheme::Full => rdp_poisson_gaussian(q, zr, a),
        })
        .collect()
}

impl Accountant {
    /// An accountant with nothing spent, reporting ε at `delta ∈ (0, 1)`.
    pub fn new(delta: f64, adjacency: Adjacency) -> Result<Self, PrivacyError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(PrivacyError::InvalidParameter(format!("delta {delta} must be in (0, 1)")));
        }
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Ok(Self {
            delta,
            adjacency,
            orders,
            rdp,
            rounds: 0,
            last_round: None,
            full_inverse_variance: Some(0.0),
        })
    }

    /// Replays a persisted ledger. Fails on an entry with another δ, a non-increasing round
    /// number, parameters the adjacency does not allow, or a recorded ε below what replay computes.
    pub fn from_entries(
        delta: f64,
        adjacency: Adjacency,
        entries: &[PrivacyLedgerEntry],
    ) -> Result<Self, PrivacyError> {
        let mut acc = Self::new(delta, adjacency)?;
        for e in entries {
            if e.delta != delta {
                return Err(PrivacyError::Ledger {
                    round: e.round,
                    reason: format!("entry is for delta {} but the accountant reports at {delta}", e.delta),
                });
            }
            let recorded = e.epsilon_after;
            let replayed = acc.record(e.clone())?.epsilon_after;
            if recorded < replayed * (1.0 - 1e-9) - 1e-12 {
                return Err(PrivacyError::Ledger {
                    round: e.round,
                    reason: format!("recorded epsilon {recorded} is below the replayed {replayed}"),
                });
            }
        }
        Ok(acc)
    }

    /// The δ every ε refers to.
    pub fn delta(&self) -> f64 {
        self.delta
    }

    /// The adjacency every ε refers to.
    pub fn adjacency(&self) -> Adjacency {
        self.adjacency
    }

    /// Rounds composed so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// The RDP orders and the composed RDP at each.
    pub fn rdp_curve(&self) -> (&[f64], &[f64]) {
        (&self.orders, &self.rdp)
    }

    fn epsilon_of(&self, rdp: &[f64], full_inverse_variance: Option<f64>) -> f64 {
        let (mut eps, _) = epsilon_from_rdp(&self.orders, rdp, self.delta);
        if let Some(inv) = full_inverse_variance.filter(|v| *v > 0.0) {
            eps = eps
                .min(zcdp_epsilon(inv / 2.0, self.delta))
                .min(gaussian_epsilon(inv.powf(-0.5), self.delta));
        }
        eps
    }

    /// ε spent so far at [`Accountant::delta`].
    pub fn epsilon(&self) -> f64 {
        if self.rounds == 0 {
            return 0.0;
        }
        self.epsilon_of(&self.rdp, self.full_inverse_variance)
    }

    /// ε after one more round with these parameters, without recording it (for budget refusal).
    pub fn epsilon_if(&self, sampling: SamplingScheme, q: f64, z: f64) -> Result<f64, PrivacyError> {
        check_round(self.adjacency, sampling, q, z)?;
        let step = round_rdp(self.adjacency, sampling, q, z, &self.orders);
        let rdp: Vec<f64> = self.rdp.iter().zip(&step).map(|(a, b)| a + b).collect();
        let full = self.next_full(q, z);
        Ok(self.epsilon_of(&rdp, full))
    }

    fn next_full(&self, q: f64, z: f64) -> Option<f64> {
        let zr = relative_multiplier(self.adjacency, z);
        self.full_inverse_variance.filter(|_| q == 1.0).map(|v| v + zr.powi(-2))
    }

    /// Composes the round `entry` describes and returns it with `delta` and `epsilon_after` set.
    /// Rounds come in order; one round may be charged more than once (a secure attempt whose sum
    /// was released for unmasking and that then failed, and the attempt that published).
    pub fn record(&mut self, mut entry: PrivacyLedgerEntry) -> Result<PrivacyLedgerEntry, PrivacyError> {
        let err = |reason: String| PrivacyError::Ledger { round: entry.round, reason };
        if self.last_round.is_some_and(|last| entry.round < last) {
            return Err(err(format!("round {} comes after round {:?}", entry.round, self.last_round)));
        }
        check_round(self.adjacency, entry.sampling, entry.sampling_rate, entry.noise_multiplier)
            .map_err(|e| err(e.to_string()))?;
        let step = round_rdp(
            self.adjacency,
            entry.sampling,
            entry.sampling_rate,
            entry.noise_multiplier,
            &self.orders,
        );
        for (r, s) in self.rdp.iter_mut().zip(step) {
            *r += s;
        }
        self.full_inverse_variance = self.next_full(entry.sampling_rate, entry.noise_multiplier);
        self.rounds += 1;
        self.last_round = Some(entry.round);
        entry.delta = self.delta;
        entry.epsilon_after = self.epsilon();
        Ok(entry)
    }
}

/// ε after `rounds` identical rounds (a fresh accountant).
pub fn epsilon_for_rounds(
    adjacency: Adjacency,
    sampling: SamplingScheme,
    q: f64,
    z: f64,
    rounds: u64,
    delta: f64,
) -> Result<f64, PrivacyError> {
    let acc = Accountant::new(delta, adjacency)?;
    check_round(adjacency, sampling, q, z)?;
    if rounds == 0 {
        return Ok(0.0);
    }
    let step = round_rdp(adjacency, sampling, q, z, &acc.orders);
    let rdp: Vec<f64> = step.iter().map(|s| s * rounds as f64).collect();
    let full = (q == 1.0).then(|| rounds as f64 * relative_multiplier(adjacency, z).powi(-2));
    Ok(acc.epsilon_of(&rdp, full))
}

/// ε of one client against an observer who knows which rounds it took part in: `participations`
/// unamplified Gaussian rounds (`q = 1`) at multiplier `z`, under add/remove adjacency (the
/// client's contribution replaced by a null one).
///
/// Amplification by subsampling holds only while the sample is secret. Whoever knows the draw
/// (the coordinator under local noise; everyone when the draw is reproducible from a public seed)
/// sees each of the client's participations as a plain Gaussian mechanism, so this, not the
/// amplified figure, is the client's guarantee against them.
pub fn epsilon_unamplified(z: f64, participations: u64, delta: f64) -> Result<f64, PrivacyError> {
    epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Full, 1.0, z, participations, delta)
}

/// [`epsilon_unamplified`] over rounds with different multipliers `z_i`, given as
/// `inverse_variance = Σ z_i⁻²` (e.g. a client's local noise under adaptive clipping, or after
/// the noise multiplier changed between restarts).
///
/// Gaussian mechanisms compose exactly into one Gaussian mechanism with `z = (Σ z_i⁻²)^(−½)`:
/// the RDP curve `α/(2z²)`, the zCDP `ρ = 1/(2z²)` and the exact Gaussian privacy curve all
/// depend on the rounds only through this sum, so this is the accountant's composition of those
/// rounds, not an approximation of it. `0` (no round) is `ε = 0`.
pub fn epsilon_unamplified_composed(inverse_variance: f64, delta: f64) -> Result<f64, PrivacyError> {
    if !(inverse_variance.is_finite() && inverse_variance >= 0.0) {
        return Err(PrivacyError::InvalidParameter(format!(
            "inverse variance {inverse_variance} must be finite and non-negative"
        )));
    }
    if inverse_variance == 0.0 {
        return Accountant::new(delta, Adjacency::AddRemove).map(|a| a.epsilon());
    }
    epsilon_unamplified(inverse_variance.powf(-0.5), 1, delta)
}

/// The smallest noise multiplier (to ~10⁻⁹ relative, rounded up) for which `rounds` Poisson
/// rounds at rate `q` (full participation when `q = 1`) stay within `target_epsilon` at `delta`
/// under add/remove adjacency.
pub fn calibrate(target_epsilon: f64, delta: f64, rounds: u64, q: f64) -> Result<f64, PrivacyError> {
    let sampling = if q == 1.0 { SamplingScheme::Full } else { SamplingScheme::Poisson };
    calibrate_for(target_epsilon, delta, rounds, q, sampling, Adjacency::AddRemove)
}

/// [`calibrate`] for any sampling scheme and adjacency.
pub fn calibrate_for(
    target_epsilon: f64,
    delta: f64,
    rounds: u64,
    q: f64,
    sampling: SamplingScheme,
    adjacency: Adjacency,
) -> Result<f64, PrivacyError> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) || rounds == 0 {
        return Err(PrivacyError::InvalidParameter(format!(
            "calibration needs a positive finite target epsilon ({target_epsilon}) and rounds > 0"
        )));
    }
    let eps = |z: f64| epsilon_for_rounds(adjacency, sampling, q, z, rounds, delta);
    let mut hi = 1.0;
    while eps(hi)? > target_epsilon {
        hi *= 2.0;
        if hi > 1e7 {
            return Err(PrivacyError::InvalidParameter(format!(
                "no noise multiplier up to 1e7 reaches epsilon {target_epsilon}"
            )));
        }
    }
    let mut lo = hi / 2.0;
    while eps(lo)? <= target_epsilon {
        hi = lo;
        lo /= 2.0;
        if lo < 1e-6 {
            return Ok(hi);
        }
    }
    // Invariant: eps(lo) > target >= eps(hi).
    while hi / lo - 1.0 > 1e-10 {
        let mid = (lo * hi).sqrt();
        if eps(mid)? > target_epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}
