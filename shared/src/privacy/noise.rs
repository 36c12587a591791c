//! Where the noise goes and how much each party adds; the `add_noise` entry points.

use serde::{Deserialize, Serialize};

use super::grid::{default_grid_log2, quantize_one, widened_sensitivity};
use super::sampler::{for_each_chunk, FastDiscreteGaussian, NoiseSampler, NoiseSource, MAX_SIGMA_GRID};
use super::PrivacyError;

/// Who adds the Gaussian noise (semantics in the [`crate::privacy`] module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoisePlacement {
    /// The coordinator adds `N(0, z²C'²)` once to the sum of clipped updates.
    Central,
    /// Every client adds `N(0, z²C'²)` to its own clipped update.
    Local,
    /// Each of the `n` expected clients adds `N(0, z²C'²/n)`; needs secure aggregation.
    Distributed,
}

/// The noise of one round: placement, multiplier, clip bound, grid and model size.
#[derive(Debug, Clone, PartialEq)]
pub struct NoisePlan {
    /// Who adds noise.
    pub placement: NoisePlacement,
    /// Target noise multiplier `z` (noise std over the widened sensitivity `C'`).
    pub noise_multiplier: f64,
    /// Clip bound `C` on each client's update.
    pub clip_norm: f64,
    /// Grid exponent `k` (values are rounded to `2^k·ℤ`).
    pub grid_log2: i32,
    /// Number of coordinates `d` in an update.
    pub dim: usize,
    /// Expected participants per round (`qN` or the cohort size): the fixed averaging denominator
    /// and, under `Distributed`, the number of noise shares.
    pub expected_clients: f64,
}

impl NoisePlan {
    /// A plan on the default grid ([`default_grid_log2`]).
    pub fn new(
        placement: NoisePlacement,
        noise_multiplier: f64,
        clip_norm: f64,
        dim: usize,
        expected_clients: f64,
    ) -> Result<Self, PrivacyError> {
        let grid_log2 = default_grid_log2(clip_norm, dim)?;
        Self { placement, noise_multiplier, clip_norm, grid_log2, dim, expected_clients }.validated()
    }

    /// The same plan on the grid `2^grid_log2`.
    pub fn with_grid_log2(mut self, grid_log2: i32) -> Result<Self, PrivacyError> {
        self.grid_log2 = grid_log2;
        self.validated()
    }

    fn validated(self) -> Result<Self, PrivacyError> {
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(PrivacyError::InvalidParameter(format!(
                "noise multiplier {} must be finite and positive",
                self.noise_multiplier
            )));
        }
        if !(self.expected_clients.is_finite() && self.expected_clients >= 1.0) {
            return Err(PrivacyError::InvalidParameter(format!(
                "expected clients {} must be at least 1",
                self.expected_clients
            )));
        }
        widened_sensitivity(self.clip_norm, self.grid_log2, self.dim)?;
        let grid_sigma = self.party_sigma() * 2f64.powi(-self.grid_log2);
        if grid_sigma > MAX_SIGMA_GRID {
            return Err(PrivacyError::InvalidParameter(format!(
                "noise of {grid_sigma} grid steps exceeds the sampler's range; use a coarser grid"
            )));
        }
        Ok(self)
    }

    /// `C' = C + 2^k·√d`, the sensitivity the noise is calibrated to.
    pub fn sensitivity(&self) -> f64 {
        widened_sensitivity(self.clip_norm, self.grid_log2, self.dim).unwrap_or(f64::INFINITY)
    }

    /// Noise std (in update units) that each noising party adds.
    pub fn party_sigma(&self) -> f64 {
        let full = self.noise_multiplier * self.sensitivity();
        match self.placement {
            NoisePlacement::Central | NoisePlacement::Local => full,
            NoisePlacement::Distributed => full / self.expected_clients.sqrt(),
        }
    }

    /// Whether each client adds noise before sending.
    pub fn client_adds_noise(&self) -> bool {
        matches!(self.placement, NoisePlacement::Local | NoisePlacement::Distributed)
    }

    /// Whether the coordinator adds noise to the sum.
    pub fn coordinator_adds_noise(&self) -> bool {
        self.placement == NoisePlacement::Central
    }

    /// The multiplier to account for a round in which `reported` clients contributed.
    ///
    /// Central and Local: `z` (a client's own noise already suffices). Distributed: only the
    /// `reported` shares are in the sum, so dropouts lower it to `≈ z·√(reported/n)`, with
    /// the Kairouz–Liu–Steinke correction for sums of discrete Gaussians ([`ddg_noise_multiplier`]);
    /// never more than `z`.
    pub fn effective_noise_multiplier(&self, reported: u64) -> f64 {
        match self.placement {
            NoisePlacement::Central | NoisePlacement::Local => self.noise_multiplier,
            NoisePlacement::Distributed => {
                if reported == 0 {
                    return self.noise_multiplier;
                }
                let step = 2f64.powi(self.grid_log2);
                let z = ddg_noise_multiplier(
                    self.sensitivity() / step,
                    self.party_sigma() / step,
                    reported,
                    self.dim,
                );
                z.min(self.noise_multiplier)
            }
        }
    }
}

/// Equivalent Gaussian noise multiplier of the sum of `shares` independent `N_ℤ(0, σ²)` vectors
/// in `dim` coordinates against L2 sensitivity `sensitivity` (all in grid units): Kairouz, Liu &
/// Steinke (2021), Thm. 1: the sum is `ε²/2`-concentrated DP with
/// `ε = min(√(Δ²/(nσ²) + τd/2), Δ/(√n σ) + τ√d)`, `τ = 10·Σ_{j<n} e^(−2π²σ²·j/(j+1))`,
/// here bounded by `10(n−1)e^(−π²σ²)`. Returns `1/ε` (sensitivity-normalised).
pub fn ddg_noise_multiplier(sensitivity: f64, sigma_share: f64, shares: u64, dim: usize) -> f64 {
    let n = shares.max(1) as f64;
    let tau = if shares <= 1 {
        0.0
    } else {
        (10f64.ln() + (n - 1.0).ln() - std::f64::consts::PI.powi(2) * sigma_share * sigma_share).exp()
    };
    let var = n * sigma_share * sigma_share;
    let d = dim as f64;
    let eps_a = (sensitivity * sensitivity / var + tau * d / 2.0).sqrt();
    let eps_b = sensitivity / var.sqrt() + tau * d.sqrt();
    1.0 / eps_a.min(eps_b)
}

/// What [`add_noise`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseReport {
    /// Noise std in value units.
    pub sigma: f64,
    /// Grid exponent used.
    pub grid_log2: i32,
    /// Noise std in grid steps.
    pub sigma_grid: f64,
    /// Values noised.
    pub elements: usize,
}

fn sigma_on_grid(sigma: f64, grid_log2: i32) -> Result<f64, PrivacyError> {
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(PrivacyError::InvalidParameter(format!("noise sigma {sigma} must be finite and >= 0")));
    }
    if !(-200..=200).contains(&grid_log2) {
        return Err(PrivacyError::InvalidParameter(format!("grid exponent {grid_log2} outside [-200, 200]")));
    }
    Ok(sigma * 2f64.powi(-grid_log2))
}

/// Rounds every value to the grid `2^grid_log2`, adds exact discrete Gaussian noise of std
/// `sigma` (value units), and writes the result back as `f32`. Parallel over the source's threads.
///
/// The caller accounts the rounding by calibrating `sigma` to [`widened_sensitivity`] (as
/// [`NoisePlan::party_sigma`] does). Values must be finite and fit the grid; nothing is
/// modified when one does not.
pub fn add_noise(
    values: &mut [f32],
    sigma: f64,
    grid_log2: i32,
    source: &NoiseSource,
) -> Result<NoiseReport, PrivacyError> {
    let sigma_grid = sigma_on_grid(sigma, grid_log2)?;
    let sampler = FastDiscreteGaussian::new(sigma_grid)?;
    let scale = 2f64.powi(-grid_log2);
    if let Some(index) = values.iter().position(|v| quantize_one(*v, scale).is_none()) {
        return Err(PrivacyError::GridOverflow { value: f64::from(values[index]), index, grid_log2 });
    }
    let step = 2f64.powi(grid_log2);
    for_each_chunk(source, values, |rng, chunk| {
        for v in chunk {
            // Checked above: quantize_one succeeds, and |q| < 2^62, |noise| < 2^45.
            let q = quantize_one(*v, scale).unwrap_or(0);
            *v = ((q + sampler.sample(rng)) as f64 * step) as f32;
        }
    });
    Ok(NoiseReport { sigma, grid_log2, sigma_grid, elements: values.len() })
}

/// Adds exact discrete Gaussian noise of std `sigma_grid` grid steps to values already on the
/// grid (the fixed-point representation secure aggregation sums). Values must be below 2⁶² in
/// magnitude; nothing is modified when one is not.
pub fn add_noise_to_grid(
    values: &mut [i64],
    sigma_grid: f64,
    source: &NoiseSource,
) -> Result<(), PrivacyError> {
    let sampler = FastDiscreteGaussian::new(sigma_grid)?;
    if let Some(index) = values.iter().position(|v| v.unsigned_abs() >= 1 << 62) {
        return Err(PrivacyError::GridOverflow { value: values[index] as f64, index, grid_log2: 0 });
    }
    for_each_chunk(source, values, |rng, chunk| {
        for v in chunk {
            *v += sampler.sample(rng);
        }
    });
    Ok(())
}
