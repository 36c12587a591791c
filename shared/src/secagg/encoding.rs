//! How a clipped update becomes one `u32` per coordinate for secure aggregation, how the unmasked
//! sum comes back, and which grid makes the sum fit: the one home of the encoding rule.
//!
//! # Encode (one client)
//! Input: an update `x ∈ ℝ^d` already clipped to `‖x‖₂ ≤ C` ([`crate::privacy::clip_l2`]), a
//! grid `2^k·ℤ`, and this client's noise share `σ` (grid units; 0 when clients add no noise).
//! 1. **Scale**: `y = x·2^(−k)`, exact in `f64` (an `f32` widens exactly, a power of two scales
//!    exactly).
//! 2. **Randomized rounding** (Kairouz, Liu & Steinke 2021, "KLS21"): each
//!    coordinate goes to `⌊y_j⌋ + Bernoulli(y_j − ⌊y_j⌋)`, so `E[ỹ] = y` and `|ỹ_j − y_j| < 1`.
//! 3. **Norm-bound check** (KLS21's conditional rounding): accept `ỹ` only if
//!    `‖ỹ‖₂² ≤ D²`, checked exactly in integers, else round again (at most
//!    [`ROUNDING_ATTEMPTS`] times, then refuse). `D = C'/2^k` where
//!    `C' = C + 2^k·√d` is [`widened_sensitivity`], the very sensitivity the accountant
//!    calibrates and charges the noise with ([`NoisePlan::sensitivity`]). Since rounding moves each
//!    coordinate by less than one step, `‖ỹ‖₂ < ‖y‖₂ + √d ≤ D` for a clipped input, so the check
//!    never rejects an honest input; it exists so that the bound the accountant relies on holds
//!    *by construction*, exactly, even when a floating-point clip overshot `C` by a rounding
//!    error. KLS21 instead condition on a tighter bound `√(c² + d/4 + √(2 ln 1/β)(c + √d/2))` and
//!    account that; with the grids chosen here `2^k√d ≤ C/1024`, so the tighter bound would save
//!    at most 0.1 % of the noise, not worth a second sensitivity story.
//! 4. **Noise**: add `N_ℤ(0, σ²)` per coordinate ([`add_noise_to_grid`], the exact sampler).
//! 5. **Ring**: map each integer `v` to `v mod 2^32` (two's complement: `v as u32`). Masking
//!    ([`super::masking`]) and folding then work in `Z_{2^32}`; 4 bytes per coordinate
//!    ([`BYTES_PER_COORDINATE`]), the size of today's `f32` upload.
//!
//! # Decode (the unmasked sum)
//! The sum `S = Σ_i (ỹ_i + ξ_i)` arrives as `S mod 2^32`; read each word as a signed 32-bit
//! integer (centred representative in `[−2^31, 2^31)`) and multiply by `2^k`. This is `S`
//! exactly, bit for bit in the integers, whenever every `|S_j| < 2^31`, however the partial sums
//! wrapped on the way.
//!
//! # The wrap-around bound
//! For `n` contributions (`n` = the most clients whose inputs can be in the sum), each
//! coordinate `S_j = Σ_i ỹ_ij + Σ_i ξ_ij` where
//! - `|Σ_i ỹ_ij| ≤ n·D` *deterministically*: `|ỹ_ij| ≤ ‖ỹ_i‖₂ ≤ D` (checked in step 3);
//! - `Σ_i ξ_ij` is `nσ²`-sub-Gaussian: `N_ℤ(0, σ²)` is `σ²`-sub-Gaussian (Canonne, Kamath &
//!   Steinke 2020; the sampler's truncation to `|x| < M` only lightens the tail of a
//!   symmetric law), and independent sub-Gaussians add their variance proxies;
//!
//! so `P[|S_j| ≥ 2^31] ≤ P[|Σ_i ξ_ij| ≥ 2^31 − nD] ≤ 2·exp(−(2^31 − nD)² / (2nσ²))`, and over
//! all `d` coordinates (union bound)
//!
//! > **β = 2d · exp(−(2^31 − nD)² / (2nσ²))**, and β = 1 if `nD ≥ 2^31`
//! > (β = 0 when `σ = 0` and `nD < 2^31`).
//!
//! Fewer survivors only shrink both terms, so β holds for any number of survivors up to `n`.
//! [`Encoding::new`] refuses parameters whose β exceeds the configured maximum
//! ([`DEFAULT_MAX_WRAP_PROBABILITY`] = 10⁻⁹); [`Encoding::choose`] picks the finest grid `k`
//! (β falls as `k` grows, since `D` and `σ` both shrink with `2^−k`) whose β meets it, and refuses
//! when no grid does or when the grid it needs widens the sensitivity `C'/C − 1` beyond
//! [`EncodingLimits::max_widening`].
//!
//! # No random rotation
//! KLS21 rotate the update (randomized Hadamard) before rounding so that its mass spreads over
//! all coordinates and the per-coordinate term is `≈ C/√d` instead of the worst case `C`. We do
//! not: (1) the worst case already fits with room to spare — at d = 22.7M, C = 1, z = 1 the
//! finest admissible grid widens the sensitivity by 7·10⁻⁵ (n = 10) to 2.8·10⁻⁴ (n = 100), and
//! stays below 1 % up to about 4 000 clients (figures in `docs/secure-aggregation.md`); (2) a
//! Hadamard transform needs a power-of-two length, so 22.7M coordinates would travel as 2^25,
//! 48 % more bytes than the `f32` upload the issue caps us at; (3) it costs both sides an
//! `O(d log d)` transform and the coordinator its inverse, and a seed everyone must agree on. The
//! price is that a round with thousands of clients needs a coarser grid than the default.
//!
//! # What decoding detects
//! An honest sum has `|S_j| ≤ sD + √(2sσ² ln(2d/β))` for all `j` except with probability `β`
//! (`s` survivors, the same bound as above), and that band lies inside `±2^31` by the choice of
//! parameters. [`Encoding::decode`] refuses a sum with a coordinate outside the band. That
//! catches every wrap that overshoots `±2^31` by less than `2^32 − 2·band` (it lands near the far
//! end of the ring) and any out-of-range contribution big enough to push the sum outside the
//! band. It cannot see a sum that wrapped by (almost) a whole turn, nor a malicious client that
//! adds an arbitrary value inside the band: masked inputs are uniform, and SecAgg+ has no range
//! proofs (see the threat model in `docs/secure-aggregation.md`).

use crate::limits::MAX_SECAGG_VECTOR_LEN;
use crate::privacy::{
    add_noise_to_grid, for_each_chunk, widened_sensitivity, NoisePlan, NoiseSource, PrivacyError,
};

/// Bytes per coordinate of a masked vector on the wire: one little-endian `u32`.
pub const BYTES_PER_COORDINATE: usize = 4;

/// The default bound on the probability that any coordinate of the sum wraps around.
pub const DEFAULT_MAX_WRAP_PROBABILITY: f64 = 1e-9;

/// The default bound on how much a grid coarse enough for 32 bits may widen the sensitivity
/// (`C'/C − 1`), i.e. raise the noise needed for the same ε.
pub const DEFAULT_MAX_WIDENING: f64 = 0.01;

/// Roundings tried before an input over the norm bound is refused.
pub const ROUNDING_ATTEMPTS: usize = 8;

/// 2^31: the centred decoding covers `[−2^31, 2^31)`.
const HALF_RING: f64 = 2_147_483_648.0;

/// What makes an encoding refuse its parameters or its input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodingError {
    /// The sum of `clients` contributions would wrap around with a probability above the maximum.
    #[error(
        "P(wrap-around) ≤ {probability:.3e} for {clients} clients, d = {dim}, clip {clip_norm}, grid 2^{grid_log2} \
         (per-client bound {norm_bound:.4e} and noise σ = {sigma_grid:.4e} grid steps, n·bound = {sum_bound:.4e} of \
         2^31 = 2147483648) exceeds the maximum {max_probability:e}"
    )]
    WrapRisk {
        /// Most contributions in the sum.
        clients: usize,
        /// Coordinates.
        dim: usize,
        /// The clip bound `C`.
        clip_norm: f64,
        /// The grid exponent (the best one tried, when choosing).
        grid_log2: i32,
        /// `D`, the bound on one client's rounded norm, in grid steps.
        norm_bound: f64,
        /// One client's noise std in grid steps.
        sigma_grid: f64,
        /// `n·D`.
        sum_bound: f64,
        /// The stated bound β.
        probability: f64,
        /// The configured maximum.
        max_probability: f64,
    },
    /// The finest grid that keeps the sum in 32 bits widens the sensitivity too much.
    #[error(
        "for {clients} clients the finest grid that keeps P(wrap-around) ≤ {max_probability:e} is 2^{grid_log2}, \
         which widens the sensitivity by {widening:.3e} (C' = {sensitivity:.6e} for clip {clip_norm}), above the \
         maximum {max_widening:e}; use fewer clients per round or a larger ring"
    )]
    TooCoarse {
        /// Most contributions in the sum.
        clients: usize,
        /// The grid exponent needed.
        grid_log2: i32,
        /// `C'/C − 1` on that grid.
        widening: f64,
        /// `C'`.
        sensitivity: f64,
        /// The clip bound `C`.
        clip_norm: f64,
        /// The configured maximum widening.
        max_widening: f64,
        /// The configured maximum wrap-around probability.
        max_probability: f64,
    },
    /// An input's rounded L2 norm stays above the bound the accountant charges for.
    #[error(
        "update norm {norm:.6e} (grid steps) exceeds the bound {bound:.6e} after {attempts} rounding(s); \
         the update must be clipped to {clip_norm} first"
    )]
    NormBound {
        /// The input's norm in grid steps (`f64` estimate).
        norm: f64,
        /// `D`.
        bound: f64,
        /// Roundings tried.
        attempts: usize,
        /// The clip bound `C`.
        clip_norm: f64,
    },
    /// A value is NaN or infinite.
    #[error("value at index {index} is not finite")]
    NotFinite {
        /// Its index.
        index: usize,
    },
    /// A vector does not have the encoding's length.
    #[error("vector of {got} coordinates, the encoding is for {expected}")]
    WrongLength {
        /// The encoding's dimension.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// A decoded coordinate lies outside the band every honest sum stays in (except with
    /// probability β): the sum wrapped around, or a contribution was out of range.
    #[error(
        "decoded coordinate {index} = {value} is outside ±{bound:.6e} for {survivors} survivors: the sum wrapped \
         around or a contribution was out of range"
    )]
    Implausible {
        /// The coordinate.
        index: usize,
        /// Its decoded value (grid steps).
        value: i64,
        /// The band.
        bound: f64,
        /// Survivors the band was computed for.
        survivors: usize,
    },
    /// A parameter is outside its valid range.
    #[error("invalid encoding parameter: {0}")]
    InvalidParameter(String),
    /// The privacy library refused (grid exponent, noise range, randomness).
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
}

/// What [`Encoding::choose`] may accept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodingLimits {
    /// Most probability that any coordinate of the sum wraps around (β).
    pub max_wrap_probability: f64,
    /// Most sensitivity widening `C'/C − 1` the grid may cost.
    pub max_widening: f64,
}

impl Default for EncodingLimits {
    fn default() -> Self {
        Self { max_wrap_probability: DEFAULT_MAX_WRAP_PROBABILITY, max_widening: DEFAULT_MAX_WIDENING }
    }
}

/// The encoding of one round: grid, dimension, the bound `D` on each rounded contribution, each
/// client's noise share and the stated wrap-around probability for up to `max_clients` inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoding {
    clip_norm: f64,
    grid_log2: i32,
    dim: usize,
    max_clients: usize,
    norm_bound: f64,
    norm_bound_sq: u128,
    sigma_grid: f64,
    wrap_probability: f64,
    max_wrap_probability: f64,
}

/// The stated bound β on `P[some |S_j| ≥ 2^31]` for the sum of `clients` contributions in `dim`
/// coordinates, each of L2 norm at most `norm_bound` with `N_ℤ(0, sigma_grid²)` noise per
/// coordinate (all in grid steps); see the module docs.
pub fn wrap_probability(clients: usize, dim: usize, norm_bound: f64, sigma_grid: f64) -> f64 {
    let n = clients as f64;
    let slack = HALF_RING - n * norm_bound;
    if slack.is_nan() || slack <= 0.0 {
        return 1.0;
    }
    if sigma_grid == 0.0 || clients == 0 {
        return 0.0;
    }
    let ln_beta = (2.0 * dim as f64).ln() - slack * slack / (2.0 * n * sigma_grid * sigma_grid);
    ln_beta.exp().min(1.0)
}

fn check_probability(what: &str, p: f64) -> Result<(), EncodingError> {
    if p.is_finite() && p > 0.0 && p <= 1.0 {
        Ok(())
    } else {
        Err(EncodingError::InvalidParameter(format!("{what} {p} must be in (0, 1]")))
    }
}

impl Encoding {
    /// An encoding on the grid `2^grid_log2` for updates of `dim` values clipped to `clip_norm`,
    /// summed over at most `max_clients` clients that each add `N_ℤ(0, sigma_grid²)` (grid
    /// steps; 0 for none). Refuses when the stated wrap-around probability exceeds
    /// `max_wrap_probability`.
    pub fn new(
        clip_norm: f64,
        grid_log2: i32,
        dim: usize,
        max_clients: usize,
        sigma_grid: f64,
        max_wrap_probability: f64,
    ) -> Result<Self, EncodingError> {
        check_probability("maximum wrap-around probability", max_wrap_probability)?;
        if dim == 0 || dim > MAX_SECAGG_VECTOR_LEN {
            return Err(EncodingError::InvalidParameter(format!(
                "dimension {dim} is outside 1..={MAX_SECAGG_VECTOR_LEN}"
            )));
        }
        if max_clients == 0 {
            return Err(EncodingError::InvalidParameter("at least one client must contribute".into()));
        }
        if !(sigma_grid.is_finite() && sigma_grid >= 0.0) {
            return Err(EncodingError::InvalidParameter(format!(
                "noise σ = {sigma_grid} grid steps must be finite and >= 0"
            )));
        }
        let norm_bound = widened_sensitivity(clip_norm, grid_log2, dim)? * 2f64.powi(-grid_log2);
        let wrap = wrap_probability(max_clients, dim, norm_bound, sigma_grid);
        if wrap > max_wrap_probability {
            return Err(EncodingError::WrapRisk {
                clients: max_clients,
                dim,
                clip_norm,
                grid_log2,
                norm_bound,
                sigma_grid,
                sum_bound: max_clients as f64 * norm_bound,
                probability: wrap,
                max_probability: max_wrap_probability,
            });
        }
        // D² < 2^62 here (n·D < 2^31); the f64 square is within 2^-52 relative, so shaving
        // 2^-40 makes the integer bound never exceed the true D²: the check may be stricter
        // than the accountant's C', never looser.
        let norm_bound_sq = (norm_bound * norm_bound * (1.0 - 2f64.powi(-40))).floor() as u128;
        Ok(Self {
            clip_norm,
            grid_log2,
            dim,
            max_clients,
            norm_bound,
            norm_bound_sq,
            sigma_grid,
            wrap_probability: wrap,
            max_wrap_probability,
        })
    }

    /// The finest grid on which `plan`'s noise, summed over at most `max_clients` clients, stays
    /// within `limits`; returns the plan moved onto that grid (its sensitivity and noise follow
    /// the grid) and the encoding. Only the clients' own noise enters the ring: none under
    /// central noise, which the coordinator adds after decoding.
    pub fn choose(
        plan: &NoisePlan,
        max_clients: usize,
        limits: &EncodingLimits,
    ) -> Result<(NoisePlan, Encoding), EncodingError> {
        check_probability("maximum wrap-around probability", limits.max_wrap_probability)?;
        if !(limits.max_widening.is_finite() && limits.max_widening > 0.0) {
            return Err(EncodingError::InvalidParameter(format!(
                "maximum widening {} must be finite and positive",
                limits.max_widening
            )));
        }
        if max_clients == 0 {
            return Err(EncodingError::InvalidParameter("at least one client must contribute".into()));
        }
        // Finer than this, n·C alone is at least 2^31 grid steps: nothing finer can fit.
        let finest = (((max_clients as f64 * plan.clip_norm).log2() - 31.0).floor() as i32).max(-200);
        // Coarser than the clip bound itself, rounding would carry no more than the update's sign.
        let coarsest = (plan.clip_norm.log2().floor() as i32).min(200);
        let mut closest: Option<EncodingError> = None;
        for k in finest..=coarsest {
            // Grids so fine that the noise is beyond the sampler's range are skipped.
            let Ok(on_grid) = plan.clone().with_grid_log2(k) else { continue };
            let sigma_grid =
                if on_grid.client_adds_noise() { on_grid.party_sigma() * 2f64.powi(-k) } else { 0.0 };
            match Encoding::new(
                plan.clip_norm,
                k,
                plan.dim,
                max_clients,
                sigma_grid,
                limits.max_wrap_probability,
            ) {
                Ok(encoding) => {
                    let widening = on_grid.sensitivity() / plan.clip_norm - 1.0;
                    if widening > limits.max_widening {
                        return Err(EncodingError::TooCoarse {
                            clients: max_clients,
                            grid_log2: k,
                            widening,
                            sensitivity: on_grid.sensitivity(),
                            clip_norm: plan.clip_norm,
                            max_widening: limits.max_widening,
                            max_probability: limits.max_wrap_probability,
                        });
                    }
                    return Ok((on_grid, encoding));
                }
                Err(e @ EncodingError::WrapRisk { probability, .. }) => {
                    // Report the grid that came closest; on a tie (β = 1 on every grid) the
                    // coarsest, whose n·D shows how far out of reach 2^31 is.
                    let better = match &closest {
                        Some(EncodingError::WrapRisk { probability: best, .. }) => probability <= *best,
                        _ => true,
                    };
                    if better {
                        closest = Some(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(closest.unwrap_or_else(|| {
            EncodingError::InvalidParameter(format!(
                "no grid between 2^{finest} and 2^{coarsest} can carry this noise plan"
            ))
        }))
    }

    /// The clip bound `C`.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// The grid exponent `k`.
    pub fn grid_log2(&self) -> i32 {
        self.grid_log2
    }

    /// Coordinates of every vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The most contributions the stated bound covers.
    pub fn max_clients(&self) -> usize {
        self.max_clients
    }

    /// `D = C'/2^k`: the bound on one rounded contribution's L2 norm, in grid steps.
    pub fn norm_bound(&self) -> f64 {
        self.norm_bound
    }

    /// One client's noise std, in grid steps.
    pub fn sigma_grid(&self) -> f64 {
        self.sigma_grid
    }

    /// β: the stated bound on the probability that any coordinate of the sum wraps around.
    pub fn wrap_probability(&self) -> f64 {
        self.wrap_probability
    }

    /// The band `sD + √(2sσ² ln(2d/β_max))` an honest sum of `survivors` contributions stays in
    /// on every coordinate except with probability β_max (grid steps).
    pub fn plausible_bound(&self, survivors: usize) -> f64 {
        let s = survivors as f64;
        let variance = s * self.sigma_grid * self.sigma_grid;
        let spread = (2.0 * variance * (2.0 * self.dim as f64 / self.max_wrap_probability).ln()).sqrt();
        s * self.norm_bound + spread
    }

    fn check_len(&self, got: usize) -> Result<(), EncodingError> {
        if got == self.dim {
            Ok(())
        } else {
            Err(EncodingError::WrongLength { expected: self.dim, got })
        }
    }

    /// Steps 1–3: randomized rounding of a clipped update to grid integers with
    /// `‖·‖₂ ≤ D` checked exactly.
    pub fn round(&self, update: &[f32], source: &NoiseSource) -> Result<Vec<i64>, EncodingError> {
        self.check_len(update.len())?;
        if let Some(index) = update.iter().position(|v| !v.is_finite()) {
            return Err(EncodingError::NotFinite { index });
        }
        let scale = 2f64.powi(-self.grid_log2);
        let norm = update.iter().map(|v| (f64::from(*v) * scale).powi(2)).sum::<f64>().sqrt();
        let refuse = |attempts| EncodingError::NormBound {
            norm,
            bound: self.norm_bound,
            attempts,
            clip_norm: self.clip_norm,
        };
        // Far over the bound no rounding can pass; also keeps every |y_j| ≤ D < 2^31 below.
        if norm > self.norm_bound * (1.0 + 1e-9) {
            return Err(refuse(0));
        }
        let mut out = vec![0i64; update.len()];
        for _ in 0..ROUNDING_ATTEMPTS {
            // `for_each_chunk` hands out chunks without their offset, so each slot carries its
            // own scaled input (as f64 bits) into the closure and leaves with the rounded value.
            for (o, v) in out.iter_mut().zip(update) {
                *o = (f64::from(*v) * scale).to_bits() as i64;
            }
            for_each_chunk(source, &mut out, |rng, chunk| {
                for slot in chunk {
                    let y = f64::from_bits(*slot as u64);
                    let floor = y.floor();
                    // Exact: |y| < 2^53, so y − ⌊y⌋ is representable.
                    let frac = y - floor;
                    let u = (rng.next_u64() >> 11) as f64 * 2f64.powi(-53);
                    *slot = floor as i64 + i64::from(u < frac);
                }
            });
            let norm_sq: u128 = out.iter().map(|v| u128::from(v.unsigned_abs()).pow(2)).sum();
            if norm_sq <= self.norm_bound_sq {
                return Ok(out);
            }
        }
        Err(refuse(ROUNDING_ATTEMPTS))
    }

    /// Steps 1–4: rounded and noised grid integers, the fixed-point contribution whose sum the
    /// ring carries.
    pub fn encode_integers(&self, update: &[f32], source: &NoiseSource) -> Result<Vec<i64>, EncodingError> {
        let mut ints = self.round(update, source)?;
        if self.sigma_grid > 0.0 {
            add_noise_to_grid(&mut ints, self.sigma_grid, source)?;
        }
        Ok(ints)
    }

    /// Steps 1–5: the vector a client masks and uploads, one `u32` per coordinate.
    pub fn encode(&self, update: &[f32], source: &NoiseSource) -> Result<Vec<u32>, EncodingError> {
        Ok(to_ring(&self.encode_integers(update, source)?))
    }

    /// The unmasked sum of `survivors` contributions as grid integers, refused when a
    /// coordinate lies outside [`Encoding::plausible_bound`].
    pub fn decode_integers(&self, sum: &[u32], survivors: usize) -> Result<Vec<i64>, EncodingError> {
        self.check_len(sum.len())?;
        if survivors == 0 || survivors > self.max_clients {
            return Err(EncodingError::InvalidParameter(format!(
                "{survivors} survivors: the bound covers 1..={} contributions",
                self.max_clients
            )));
        }
        let bound = self.plausible_bound(survivors);
        let ints = from_ring(sum);
        if let Some(index) = ints.iter().position(|v| (*v as f64).abs() > bound) {
            return Err(EncodingError::Implausible { index, value: ints[index], bound, survivors });
        }
        Ok(ints)
    }

    /// The unmasked sum of `survivors` contributions in update units (`S_j·2^k`, rounded to
    /// `f32`), refused like [`Encoding::decode_integers`].
    pub fn decode(&self, sum: &[u32], survivors: usize) -> Result<Vec<f32>, EncodingError> {
        let step = 2f64.powi(self.grid_log2);
        Ok(self.decode_integers(sum, survivors)?.into_iter().map(|v| (v as f64 * step) as f32).collect())
    }
}

/// Grid integers to `Z_{2^32}`: `v mod 2^32`, two's complement.
pub fn to_ring(values: &[i64]) -> Vec<u32> {
    values.iter().map(|v| *v as u32).collect()
}

/// `Z_{2^32}` to the centred representatives in `[−2^31, 2^31)`.
pub fn from_ring(words: &[u32]) -> Vec<i64> {
    words.iter().map(|w| i64::from(*w as i32)).collect()
}

/// A ring vector as it travels: [`BYTES_PER_COORDINATE`] little-endian bytes per coordinate.
pub fn to_le_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The inverse of [`to_le_bytes`]; refuses a length that is not a whole number of words.
pub fn from_le_bytes(bytes: &[u8]) -> Result<Vec<u32>, EncodingError> {
    if bytes.len() % BYTES_PER_COORDINATE != 0 {
        return Err(EncodingError::InvalidParameter(format!(
            "{} bytes is not a whole number of {BYTES_PER_COORDINATE}-byte coordinates",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(BYTES_PER_COORDINATE)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    use super::*;
    use crate::privacy::{clip_l2, fill_noise, FastDiscreteGaussian, NoisePlacement};
    use crate::secagg::masking::{apply_mask, fold_into, MaskSeed, MaskSign};

    /// Distributed noise with multiplier `z` over `clients` expected clients, chosen for them.
    fn distributed(z: f64, clip: f64, dim: usize, clients: usize) -> (NoisePlan, Encoding) {
        let plan = NoisePlan::new(NoisePlacement::Distributed, z, clip, dim, clients as f64).unwrap();
        Encoding::choose(&plan, clients, &EncodingLimits::default()).unwrap()
    }

    /// A clipped update with mixed signs and, for some clients, most of its norm on one
    /// coordinate (the worst case for the per-coordinate bound).
    fn clipped_update(rng: &mut ChaCha20Rng, dim: usize, clip: f64, spike: bool) -> Vec<f32> {
        let mut v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        if spike {
            v[dim / 2] = -1e6;
        }
        clip_l2(&mut v, clip);
        v
    }

    #[test]
    fn encode_sum_decode_equals_the_plain_fixed_point_sum_bit_for_bit() {
        let (dim, clip) = (1000, 1.0);
        for n in [3usize, 10, 50] {
            let (_, enc) = distributed(1.0, clip, dim, n);
            let mut rng = ChaCha20Rng::seed_from_u64(n as u64);
            let mut plain = vec![0i64; dim];
            let mut acc = vec![0u32; dim];
            for i in 0..n {
                let update = clipped_update(&mut rng, dim, clip, i % 3 == 0);
                let source = NoiseSource::seeded_for_tests(1000 + i as u64);
                let ints = enc.encode_integers(&update, &source).unwrap();
                plain.iter_mut().zip(&ints).for_each(|(p, v)| *p += v);
                let mut masked = to_ring(&ints);
                // A pairwise mask between neighbours in a ring of clients: cancels in the sum.
                apply_mask(&mut masked, &MaskSeed::from_bytes([i as u8; 32]), MaskSign::Add);
                let previous = ((i + n - 1) % n) as u8;
                apply_mask(&mut masked, &MaskSeed::from_bytes([previous; 32]), MaskSign::Subtract);
                fold_into(&mut acc, &masked);
            }
            assert!(plain.iter().any(|v| *v < 0) && plain.iter().any(|v| *v > 0));
            assert_eq!(enc.decode_integers(&acc, n).unwrap(), plain, "n = {n}");
            let step = 2f64.powi(enc.grid_log2());
            let floats: Vec<f32> = plain.iter().map(|v| (*v as f64 * step) as f32).collect();
            assert_eq!(enc.decode(&acc, n).unwrap(), floats, "n = {n}");
        }
    }

    #[test]
    fn the_same_seed_encodes_the_same_vector() {
        let (_, enc) = distributed(1.0, 1.0, 300, 4);
        let update = clipped_update(&mut ChaCha20Rng::seed_from_u64(7), 300, 1.0, false);
        let a = enc.encode(&update, &NoiseSource::seeded_for_tests(5)).unwrap();
        let b = enc.encode(&update, &NoiseSource::seeded_for_tests(5)).unwrap();
        let c = enc.encode(&update, &NoiseSource::seeded_for_tests(6)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn negative_values_and_the_ring_boundary_round_trip() {
        let edge = [-1i64, -(1 << 31), (1 << 31) - 1, 0, 1];
        let words = to_ring(&edge);
        assert_eq!(words, [u32::MAX, 0x8000_0000, 0x7fff_ffff, 0, 1]);
        assert_eq!(from_ring(&words), edge);
        // Partial sums leave [−2^31, 2^31) on the way; the final sum decodes exactly.
        let max = (1i64 << 31) - 1;
        let mut acc = vec![0u32];
        for v in [max, max, -max, -max + 5] {
            fold_into(&mut acc, &to_ring(&[v]));
        }
        assert_eq!(from_ring(&acc), [5]);
        // One past the top wraps to the bottom: the case the chosen parameters make unlikely.
        let mut acc = to_ring(&[max]);
        fold_into(&mut acc, &to_ring(&[1]));
        assert_eq!(from_ring(&acc), [-(1i64 << 31)]);
    }

    #[test]
    fn randomized_rounding_is_unbiased_and_moves_each_value_by_less_than_a_step() {
        let enc = Encoding::new(1.0, -16, 10_000, 1, 0.0, 1e-9).unwrap();
        // 2^-18 = a quarter step, so each coordinate rounds to 0 or 1 with mean 1/4.
        let update = vec![2f32.powi(-18); 10_000];
        let ints = enc.round(&update, &NoiseSource::seeded_for_tests(3)).unwrap();
        assert!(ints.iter().all(|v| *v == 0 || *v == 1));
        let mean = ints.iter().sum::<i64>() as f64 / 10_000.0;
        // Standard error √(3/16/10⁴) ≈ 0.0043; 5 of them.
        assert!((mean - 0.25).abs() < 0.022, "mean {mean}");
    }

    #[test]
    fn inputs_over_the_norm_bound_or_not_finite_or_of_the_wrong_length_are_refused() {
        let (_, enc) = distributed(1.0, 1.0, 100, 5);
        let source = NoiseSource::seeded_for_tests(1);
        let mut over = vec![0.0f32; 100];
        over[3] = 2.0;
        assert!(matches!(enc.encode(&over, &source), Err(EncodingError::NormBound { .. })));
        let mut nan = vec![0.0f32; 100];
        nan[9] = f32::NAN;
        assert!(matches!(enc.encode(&nan, &source), Err(EncodingError::NotFinite { index: 9 })));
        assert!(matches!(
            enc.encode(&[0.0; 99], &source),
            Err(EncodingError::WrongLength { expected: 100, got: 99 })
        ));
        // At the bound exactly: the check is exact and accepts it.
        let mut at = vec![0.0f32; 100];
        at[0] = 1.0;
        assert!(enc.encode(&at, &source).is_ok());
    }

    #[test]
    fn the_chooser_refuses_impossible_settings_naming_the_numbers() {
        // A million clients with 22.7M coordinates: n·√d alone is past 2^31 on any grid.
        let plan = NoisePlan::new(NoisePlacement::Distributed, 1.0, 1.0, 22_700_000, 1e6).unwrap();
        let err = Encoding::choose(&plan, 1_000_000, &EncodingLimits::default()).unwrap_err();
        assert!(matches!(err, EncodingError::WrapRisk { clients: 1_000_000, .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("1000000 clients") && text.contains("2147483648"), "{text}");
        println!("{text}");

        // 20 000 clients fit, but only on a grid that widens the sensitivity by more than 1 %.
        let plan = NoisePlan::new(NoisePlacement::Distributed, 1.0, 1.0, 22_700_000, 2e4).unwrap();
        let err = Encoding::choose(&plan, 20_000, &EncodingLimits::default()).unwrap_err();
        assert!(matches!(err, EncodingError::TooCoarse { clients: 20_000, .. }), "{err}");
        println!("{err}");

        // An explicit grid too fine for the sum.
        let err = Encoding::new(1.0, -40, 1000, 10, 1.0, 1e-9).unwrap_err();
        assert!(
            matches!(err, EncodingError::WrapRisk { grid_log2: -40, probability, .. } if probability == 1.0)
        );

        for bad in [0.0, 1.5, f64::NAN] {
            let limits = EncodingLimits { max_wrap_probability: bad, ..EncodingLimits::default() };
            assert!(matches!(Encoding::choose(&plan, 10, &limits), Err(EncodingError::InvalidParameter(_))));
        }
    }

    #[test]
    fn the_chosen_grid_is_the_finest_that_meets_the_bound() {
        for n in [3usize, 50, 400] {
            let (plan, enc) = distributed(1.0, 1.0, 100_000, n);
            assert_eq!(plan.grid_log2, enc.grid_log2());
            assert!(enc.wrap_probability() <= DEFAULT_MAX_WRAP_PROBABILITY);
            // The encoding's noise is the plan's, and its norm bound the accountant's C'.
            assert_eq!(enc.sigma_grid(), plan.party_sigma() * 2f64.powi(-plan.grid_log2));
            assert_eq!(enc.norm_bound(), plan.sensitivity() * 2f64.powi(-plan.grid_log2));
            let finer = plan.clone().with_grid_log2(plan.grid_log2 - 1).unwrap();
            let err = Encoding::new(
                1.0,
                finer.grid_log2,
                100_000,
                n,
                finer.party_sigma() * 2f64.powi(-finer.grid_log2),
                DEFAULT_MAX_WRAP_PROBABILITY,
            )
            .unwrap_err();
            assert!(matches!(err, EncodingError::WrapRisk { .. }), "n = {n}: {err}");
        }
    }

    #[test]
    fn central_noise_leaves_the_ring_noise_free() {
        let plan = NoisePlan::new(NoisePlacement::Central, 1.0, 1.0, 1000, 10.0).unwrap();
        let (_, enc) = Encoding::choose(&plan, 10, &EncodingLimits::default()).unwrap();
        assert_eq!(enc.sigma_grid(), 0.0);
        assert_eq!(enc.wrap_probability(), 0.0);
    }

    #[test]
    fn the_stated_wrap_probability_is_not_exceeded_empirically() {
        // d = 4, n = 5, every client puts its whole norm on coordinate 0 with the same sign (the
        // worst case of the deterministic term), and the noise is set so that β ≈ 0.2.
        let (dim, n, trials) = (4usize, 5usize, 4000usize);
        let grid_log2 = -20;
        let norm_bound = widened_sensitivity(1.0, grid_log2, dim).unwrap() * 2f64.powi(-grid_log2);
        let slack = HALF_RING - n as f64 * norm_bound;
        let sigma = slack / (2.0 * n as f64 * (2.0 * dim as f64 / 0.2).ln()).sqrt();
        let enc = Encoding::new(1.0, grid_log2, dim, n, sigma, 0.5).unwrap();
        let beta = enc.wrap_probability();
        assert!((0.15..0.25).contains(&beta), "β = {beta}");
        let update = [1.0 - 2f32.powi(-21), 0.0, 0.0, 0.0];
        let source = NoiseSource::seeded_for_tests(11);
        let sampler = FastDiscreteGaussian::new(sigma).unwrap();
        let mut noise = vec![0i64; trials * n * dim];
        fill_noise(&sampler, &source, &mut noise);
        let mut noise = noise.chunks_exact(dim);
        let mut wrapped = 0usize;
        for _ in 0..trials {
            let mut plain = vec![0i64; dim];
            let mut acc = vec![0u32; dim];
            for _ in 0..n {
                let mut ints = enc.round(&update, &source).unwrap();
                ints.iter_mut().zip(noise.next().unwrap()).for_each(|(v, e)| *v += e);
                plain.iter_mut().zip(&ints).for_each(|(p, v)| *p += v);
                fold_into(&mut acc, &to_ring(&ints));
            }
            if from_ring(&acc) != plain {
                wrapped += 1;
            }
        }
        let rate = wrapped as f64 / trials as f64;
        println!("{wrapped} of {trials} sums wrapped: rate {rate:.4}, stated β = {beta:.4}");
        // The union and sub-Gaussian bounds are loose (the Gaussian tail here is ≈ 0.03): the
        // rate must stay below β, and wraps must occur at all, or the test would prove nothing.
        assert!(rate <= beta, "empirical wrap rate {rate} above the stated β = {beta}");
        assert!(wrapped > 0, "no wrap in {trials} trials: the set-up does not reach the boundary");
    }

    #[test]
    fn a_wrapped_sum_is_detected_on_decode_where_it_can_be() {
        let (dim, n) = (200, 10);
        let (_, enc) = distributed(1.0, 1.0, dim, n);
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut acc = vec![0u32; dim];
        for i in 0..n {
            let update = clipped_update(&mut rng, dim, 1.0, false);
            fold_into(&mut acc, &enc.encode(&update, &NoiseSource::seeded_for_tests(i as u64)).unwrap());
        }
        let honest = enc.decode_integers(&acc, n).unwrap();
        assert!(enc.plausible_bound(n) < HALF_RING);

        // A coordinate that went past 2^31 lands near −2^31: far outside the band.
        let mut wrapped = acc.clone();
        wrapped[17] = wrapped[17].wrapping_add(1 << 31);
        match enc.decode_integers(&wrapped, n) {
            Err(EncodingError::Implausible { index: 17, survivors: 10, .. }) => {}
            other => panic!("wrap not detected: {other:?}"),
        }
        // Fewer survivors narrow the band.
        assert!(enc.plausible_bound(3) < enc.plausible_bound(n));
        assert!(matches!(enc.decode_integers(&acc, n + 1), Err(EncodingError::InvalidParameter(_))));

        // Not detectable: a shift that stays inside the band (what a malicious client could add).
        let mut shifted = acc.clone();
        shifted[3] = shifted[3].wrapping_add(1000);
        let decoded = enc.decode_integers(&shifted, n).unwrap();
        assert_eq!(decoded[3], honest[3] + 1000);
    }

    #[test]
    fn a_masked_vector_is_four_bytes_per_coordinate() {
        let (_, enc) = distributed(1.0, 1.0, 1000, 10);
        let update = clipped_update(&mut ChaCha20Rng::seed_from_u64(1), 1000, 1.0, false);
        let words = enc.encode(&update, &NoiseSource::seeded_for_tests(1)).unwrap();
        let bytes = to_le_bytes(&words);
        assert_eq!(bytes.len(), 1000 * BYTES_PER_COORDINATE);
        assert_eq!(bytes.len(), 1000 * std::mem::size_of::<f32>(), "no more than today's f32 upload");
        assert_eq!(from_le_bytes(&bytes).unwrap(), words);
        assert_eq!(&bytes[..4], &words[0].to_le_bytes());
        assert!(matches!(from_le_bytes(&bytes[..7]), Err(EncodingError::InvalidParameter(_))));
    }

    /// The figures in `docs/secure-aggregation.md` (run with `--nocapture` to print them).
    #[test]
    fn the_bert_workload_fits_32_bits_with_the_stated_bound() {
        let (dim, clip, z) = (22_700_000usize, 1.0, 1.0);
        println!("d = {dim}, C = {clip}, z = {z}, distributed noise over n̄ = n, β_max = 1e-9");
        println!(
            "| n | grid k | default k | C'/C − 1 | D (steps) | n·D | σ per client | plausible band | β |"
        );
        for n in [10usize, 50, 100, 1000] {
            let (plan, enc) = distributed(z, clip, dim, n);
            let default_k =
                NoisePlan::new(NoisePlacement::Distributed, z, clip, dim, n as f64).unwrap().grid_log2;
            let widening = plan.sensitivity() / clip - 1.0;
            println!(
                "| {n} | {} | {default_k} | {widening:.2e} | {:.4e} | {:.4e} | {:.4e} | {:.4e} | {:.1e} |",
                enc.grid_log2(),
                enc.norm_bound(),
                n as f64 * enc.norm_bound(),
                enc.sigma_grid(),
                enc.plausible_bound(n),
                enc.wrap_probability()
            );
            assert!(enc.wrap_probability() <= 1e-9);
            assert!(widening <= DEFAULT_MAX_WIDENING);
            assert!(enc.plausible_bound(n) < HALF_RING);
        }
    }
}
