//! Differential privacy for fedtune: user-level DP-FedAvg (McMahan et al., 2018).
//!
//! # The mechanism
//!
//! In round `t` the coordinator samples clients (Poisson with rate `q`, a fixed-size cohort, or
//! everyone), each sampled client `i` trains and returns an update `Δᵢ`, and the coordinator
//! publishes `w ← w + (Σᵢ clip(Δᵢ) + ξ) / n̄` where
//!
//! * `clip(Δ) = Δ·min(1, C/‖Δ‖₂)` ([`clip_l2`]; [`clip_per_layer`] splits the budget across
//!   tensors with `Σ_l C_l² = C²`, so the whole update still has norm `≤ C`);
//! * each clipped update is rounded to the grid `2^k·ℤ` ([`quantize`]) and `ξ` is *discrete*
//!   Gaussian noise on the same grid ([`FastDiscreteGaussian`]), so no floating-point artefact
//!   can leak the low bits of the sum (Mironov 2012) and the sum can later travel through
//!   integer secure aggregation;
//! * `n̄` is the **expected** number of participants (`qN` or the cohort size), a constant: a
//!   data-dependent denominator would change with one client's presence and break the
//!   sensitivity bound below. Dividing by a public constant is post-processing.
//!
//! # Sensitivity
//!
//! Neighbouring datasets differ in **all the data of one client** (user-level DP). Under
//! add/remove adjacency the sum `Σᵢ q(clip(Δᵢ))` changes by exactly one client's rounded clipped
//! update `v`, and `‖v‖₂ ≤ ‖clip(Δ)‖₂ + ‖q(clip(Δ)) − clip(Δ)‖₂ ≤ C + 2^(k−1)·√d`. Rounding an
//! aggregate instead of each contribution can move both neighbours by `2^(k−1)√d`, which is the
//! bound OpenDP's `make_gaussian` uses for floats, `C + 2^k·√d`; we use that larger value
//! everywhere ([`widened_sensitivity`]) so the argument holds whichever party rounds.
//! Noise `N_ℤ(0, σ²)` on `ℤ^d` (grid units) with L2 sensitivity `Δ` satisfies `Δ²/(2σ²)`-zCDP
//! (Canonne, Kamath & Steinke 2020, Thm. 14), i.e. the RDP curve `α·Δ²/(2σ²)` of the continuous
//! Gaussian with noise multiplier `z = σ/Δ`. Its integer-order moments
//! `E[(μ₁/μ₀)ᵏ] = e^(k(k−1)‖v‖²/2σ²)` (shift by the lattice vector `kv`) are those of the
//! continuous Gaussian, and, like `dp_accounting`'s `DiscreteGaussianDpEvent` inside
//! `PoissonSampledDpEvent`, we account Poisson subsampling with the Gaussian formulas.
//! Replace-one adjacency (fixed-size cohorts) doubles the sensitivity to `2C'`.
//!
//! # Where the noise is added ([`NoisePlacement`])
//!
//! * **Central** — clients send clipped updates; the coordinator adds `N(0, z²C'²)` once to the
//!   sum. Trusts the coordinator.
//! * **Local** — every client adds `N(0, z²C'²)` to its own clipped update; each message is
//!   private on its own, the sum carries `n` times the needed variance.
//! * **Distributed** — each of the `n` expected clients adds `N(0, z²C'²/n)`; only the sum has
//!   the full noise, so it is meaningful only behind secure aggregation, and clients that drop
//!   out take their share with them ([`NoisePlan::effective_noise_multiplier`] accounts it; the
//!   sum of discrete Gaussians is not a discrete Gaussian, corrected per Kairouz, Liu &
//!   Steinke 2021). For Local and Distributed the guarantee is for zero-out adjacency (a
//!   client's data replaced by a zero update while it still adds its noise), the relation
//!   `dp_accounting` also accepts for Poisson sampling, with the same RDP.
//!
//! # Accounting
//!
//! [`Accountant`] composes per-round RDP of the Poisson-subsampled Gaussian (Mironov, Talwar &
//! Zhang 2019), or of sampling without replacement (Wang, Balle & Kasiviswanathan 2019) under
//! replace-one adjacency, over `dp_accounting`'s default orders, and converts with Canonne,
//! Kamath & Steinke (2020) Prop. 12. When every round has `q = 1` it also uses the exact
//! Gaussian curve (Balle & Wang 2018) and reports the smallest sound value. It is rebuilt from
//! [`PrivacyLedgerEntry`] records after a restart and answers "what would ε be after one more
//! round" so the coordinator can refuse rounds beyond the budget. [`AdaptiveClip`] (Andrew et
//! al. 2021) adapts `C` to a norm quantile with its own noised count, composed into the
//! round's noise multiplier.
//!
//! # Layout
//! - `clip`: [`clip_l2`], [`clip_per_layer`].
//! - `grid`: [`quantize`], [`dequantize`], [`widened_sensitivity`], [`default_grid_log2`].
//! - `sampler`: [`NoiseSource`] (OS-seeded ChaCha20), [`NoiseSampler`], [`FastDiscreteGaussian`],
//!   [`CksDiscreteGaussian`].
//! - `noise`: [`NoisePlacement`], [`NoisePlan`], [`add_noise`], [`add_noise_to_grid`].
//! - `adaptive`: [`AdaptiveClip`].
//! - `rdp`: RDP curves, conversions, [`DEFAULT_ORDERS`](rdp::default_orders).
//! - `accountant`: [`Accountant`], [`PrivacyLedgerEntry`], [`calibrate`].

mod accountant;
mod adaptive;
mod clip;
mod exact;
mod grid;
mod noise;
pub mod rdp;
mod sampler;

pub use accountant::{
    calibrate, calibrate_for, epsilon_for_rounds, epsilon_unamplified, epsilon_unamplified_composed,
    Accountant, Adjacency, PrivacyLedgerEntry, SamplingScheme,
};
pub use adaptive::{mechanism_metrics, AdaptiveClip, CLIP_INDICATOR_METRIC};
pub use clip::{clip_l2, clip_per_layer, l2_norm_upper_bound, ClipReport, LayerBudget, PerLayerClipReport};
pub use grid::{
    default_grid_log2, dequantize, dequantize_into, quantize, quantize_into, widened_sensitivity,
};
pub use noise::{add_noise, add_noise_to_grid, ddg_noise_multiplier, NoisePlacement, NoisePlan, NoiseReport};
pub use sampler::{
    fill_noise, for_each_chunk, CksDiscreteGaussian, FastDiscreteGaussian, NoiseDraw, NoiseRng, NoiseSampler,
    NoiseSource, CHUNK_LEN, MAX_SIGMA_GRID,
};

/// Errors of the privacy library.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    /// A parameter is outside its valid range.
    #[error("invalid privacy parameter: {0}")]
    InvalidParameter(String),
    /// The operating system's random generator failed.
    #[error("the operating system's random number generator failed")]
    Entropy,
    /// A value does not fit the fixed-point grid.
    #[error("value {value} at index {index} does not fit the 2^{grid_log2} grid in 62 bits")]
    GridOverflow {
        /// Offending value.
        value: f64,
        /// Its index.
        index: usize,
        /// The grid exponent.
        grid_log2: i32,
    },
    /// A buffer does not match the manifest that describes it.
    #[error("buffer has {actual} values but the manifest describes {expected}")]
    LengthMismatch {
        /// Values the manifest describes.
        expected: usize,
        /// Values present.
        actual: usize,
    },
    /// A ledger entry is inconsistent with the accountant or with what replay computes.
    #[error("privacy ledger round {round}: {reason}")]
    Ledger {
        /// Round of the offending entry.
        round: u64,
        /// What is wrong.
        reason: String,
    },
}
