//! Randomness and exact discrete Gaussian samplers.
//!
//! # Randomness
//!
//! Every random bit comes from ChaCha20 ([`NoiseRng`]). Its 256-bit master key is drawn once
//! from the operating system by `ring::rand::SystemRandom` ([`NoiseSource::from_os_entropy`]).
//! Each call that needs noise takes a fresh *draw* ([`NoiseSource::next_draw`]): its key is
//! HMAC-SHA256(master, draw counter), and chunk `i` of that call reads ChaCha20 stream `i` under
//! that key. Streams never repeat within a process, and the output does not depend on how many
//! threads run. [`NoiseSource::seeded_for_tests`] replaces the OS key by a fixed one; it exists
//! for tests and benchmarks and says so in its name and in [`NoiseSource::is_seeded_for_tests`].
//!
//! # The fast exact sampler
//!
//! [`FastDiscreteGaussian`] samples `N_ℤ(0, σ²)`, `P[X = x] ∝ e^(−x²/2σ²)`, by rejection from a
//! piecewise-uniform proposal, with every decision made exactly:
//!
//! 1. **Support.** Magnitudes are cut at `M`, the first block boundary where the rigorous tail
//!    bound `P[|X| ≥ M] ≤ 2e^(−M²/2σ²) / ((1 − e^(−M/σ²))·max(1, √(2π)σ − 1))` is below `2⁻¹⁰⁰`
//!    (`Σ_{x≥M} e^(−x²/2σ²) ≤ e^(−M²/2σ²)/(1 − e^(−M/σ²))` because `(M+k)² ≥ M² + 2Mk`, and the
//!    normaliser is at least 1 and at least `∫e^(−x²/2σ²)dx − 1` for a unimodal summand). The
//!    output is `N_ℤ(0, σ²)` conditioned on `|X| < M`, whose total-variation distance from
//!    `N_ℤ(0, σ²)` equals that tail mass: **at most 2⁻¹⁰⁰**. Nothing else is approximate.
//! 2. **Proposal.** Magnitudes are split into `J` blocks of `b = 2^β` integers (`b ≈ σ/48`, or 1
//!    when `σ < 64`). Block `j` gets an integer weight `W_j ≥ F·e^(−(jb)²/2σ²)` (upper bound of
//!    the block's largest summand, computed with outward-rounded interval arithmetic), plus one
//!    "reject" pseudo-block that pads the total to `2^(64−a)`. A Walker–Vose alias table with
//!    `2^a` columns and integer thresholds picks a block from one 64-bit word *exactly*
//!    (probability `W_j/2^(64−a)`), the offset inside the block and a sign bit come from a second
//!    word, so the proposal puts mass `W_j/(b·2^(64−a))` on each signed magnitude.
//! 3. **Acceptance.** Magnitude `m` in block `j` is accepted with probability
//!    `A(m) = (F/W_j)·e^(−m²/2σ²) ≤ 1`. Rejection sampling then yields mass proportional to
//!    `e^(−m²/2σ²)` on each signed magnitude; rejecting "−0" halves the double-counted zero.
//!    `A(m)` is decided as `U < A(m)` on a lazily drawn uniform `U` (see `exact.rs`): first
//!    against a precomputed per-block lower bound (most draws stop here, no arithmetic), then
//!    against rigorous `f64` interval bounds (width ~10⁻¹²), and in the ~10⁻¹² remaining cases
//!    against arbitrary-precision bounds with more bits of `U`, so each decision is exact.
//!
//! Hence the output law is exactly `N_ℤ(0, σ²)` restricted to `|x| < M`, i.e. within
//! statistical distance 2⁻¹⁰⁰ of the discrete Gaussian, assuming ChaCha20 output is uniform.
//! The tests compare it with the exact pmf, with [`CksDiscreteGaussian`] and with OpenDP.
//!
//! [`CksDiscreteGaussian`] is Canonne, Kamath & Steinke (2020), Algorithm 1 (discrete Laplace
//! proposal, Bernoulli(exp(−γ)) acceptance), also exact, slower, and kept as a reference.

use std::sync::atomic::{AtomicU64, Ordering};

use dashu::integer::UBig;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use super::exact::{
    bernoulli_scaled_exp_neg, compare_prefix, decide_exact, div_bounds, exp_neg_bounds, mul_bounds,
    next_down, next_up, u128_bounds, Ratio, Verdict,
};
use super::PrivacyError;

/// Largest σ (in grid units) the samplers accept: keeps every magnitude below 2⁵³, where `f64`
/// holds integers exactly, and every noised value inside `i64`.
pub const MAX_SIGMA_GRID: f64 = 1.099_511_627_776e12; // 2^40

/// Elements per independently seeded chunk in the parallel helpers.
pub const CHUNK_LEN: usize = 1 << 15;

/// A ChaCha20 stream; only a [`NoiseDraw`] makes one, so every stream is keyed from the
/// [`NoiseSource`] it came from.
#[derive(Debug)]
pub struct NoiseRng(ChaCha20Rng);

impl NoiseRng {
    /// The next 64 uniformly random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

/// The process's source of noise randomness (see the module docs).
pub struct NoiseSource {
    master: [u8; 32],
    draws: AtomicU64,
    threads: usize,
    seeded_for_tests: bool,
}

impl std::fmt::Debug for NoiseSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs: anyone holding it can subtract the noise.
        f.debug_struct("NoiseSource")
            .field("threads", &self.threads)
            .field("draws", &self.draws.load(Ordering::Relaxed))
            .field("seeded_for_tests", &self.seeded_for_tests)
            .finish_non_exhaustive()
    }
}

impl NoiseSource {
    /// A source keyed by 256 bits from the operating system's CSPRNG; uses every available core.
    pub fn from_os_entropy() -> Result<Self, PrivacyError> {
        let mut master = [0u8; 32];
        SystemRandom::new().fill(&mut master).map_err(|_| PrivacyError::Entropy)?;
        Ok(Self { master, draws: AtomicU64::new(0), threads: default_threads(), seeded_for_tests: false })
    }

    /// A reproducible source for tests and benchmarks only: its noise is predictable by anyone
    /// who knows `seed`, so it protects nothing.
    pub fn seeded_for_tests(seed: u64) -> Self {
        let mut master = [0u8; 32];
        master[..8].copy_from_slice(&seed.to_le_bytes());
        master[8..16].copy_from_slice(b"testonly");
        Self { master, draws: AtomicU64::new(0), threads: default_threads(), seeded_for_tests: true }
    }

    /// The same source using `threads` worker threads (at least one).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Worker threads the parallel helpers use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Whether this source came from [`NoiseSource::seeded_for_tests`].
    pub fn is_seeded_for_tests(&self) -> bool {
        self.seeded_for_tests
    }

    /// A fresh family of streams, never handed out before by this source.
    pub fn next_draw(&self) -> NoiseDraw {
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.master);
        let mut msg = Vec::with_capacity(32);
        msg.extend_from_slice(b"fedtune/privacy/noise-draw/v1");
        msg.extend_from_slice(&n.to_le_bytes());
        let tag = hmac::sign(&key, &msg);
        let mut derived = [0u8; 32];
        derived.copy_from_slice(&tag.as_ref()[..32]);
        NoiseDraw { key: derived }
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The streams of one draw: stream `i` feeds chunk `i`.
pub struct NoiseDraw {
    key: [u8; 32],
}

impl std::fmt::Debug for NoiseDraw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseDraw").finish_non_exhaustive()
    }
}

impl NoiseDraw {
    /// ChaCha20 stream `index` of this draw.
    pub fn stream(&self, index: u64) -> NoiseRng {
        let mut rng = ChaCha20Rng::from_seed(self.key);
        rng.set_stream(index);
        NoiseRng(rng)
    }
}

/// A sampler of one fixed integer-valued noise distribution.
pub trait NoiseSampler: Send + Sync + std::fmt::Debug {
    /// Standard deviation parameter σ, in grid units.
    fn sigma(&self) -> f64;

    /// One draw, using only `rng` for randomness.
    fn sample(&self, rng: &mut NoiseRng) -> i64;

    /// Overwrites `out` with independent draws.
    fn fill(&self, rng: &mut NoiseRng, out: &mut [i64]) {
        for o in out {
            *o = self.sample(rng);
        }
    }
}

/// Runs `work` over `data` in chunks of [`CHUNK_LEN`], chunk `i` with stream `i` of a fresh
/// draw, spread over the source's threads. The result does not depend on the thread count.
pub fn for_each_chunk<T, F>(source: &NoiseSource, data: &mut [T], work: F)
where
    T: Send,
    F: Fn(&mut NoiseRng, &mut [T]) + Sync,
{
    let draw = source.next_draw();
    let mut chunks: Vec<(u64, &mut [T])> =
        data.chunks_mut(CHUNK_LEN).enumerate().map(|(i, c)| (i as u64, c)).collect();
    let threads = source.threads().min(chunks.len()).max(1);
    if threads == 1 {
        for (i, chunk) in chunks {
            work(&mut draw.stream(i), chunk);
        }
        return;
    }
    let per_thread = chunks.len().div_ceil(threads);
    let (draw, work) = (&draw, &work);
    std::thread::scope(|scope| {
        while !chunks.is_empty() {
            let rest = chunks.split_off(per_thread.min(chunks.len()));
            let group = std::mem::replace(&mut chunks, rest);
            scope.spawn(move || {
                for (i, chunk) in group {
                    work(&mut draw.stream(i), chunk);
                }
            });
        }
    });
}

/// Overwrites `out` with independent draws of `sampler`, in parallel.
pub fn fill_noise<S: NoiseSampler + ?Sized>(sampler: &S, source: &NoiseSource, out: &mut [i64]) {
    for_each_chunk(source, out, |rng, chunk| sampler.fill(rng, chunk));
}

/// `σ = mant·2^exp` exactly.
fn dyadic(x: f64) -> (u64, i32) {
    let bits = x.to_bits();
    let exp_field = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    if exp_field == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp_field - 1075)
    }
}

/// `m²/(2σ²)` as an exact rational.
fn half_square_over_sigma2(m: &UBig, sigma: f64) -> Ratio {
    let (mant, e) = dyadic(sigma);
    let mant2 = UBig::from(mant) * UBig::from(mant);
    let shift = 2 * e + 1;
    let m2 = m * m;
    if shift >= 0 {
        Ratio::new(m2, mant2 << shift as usize)
    } else {
        Ratio::new(m2 << (-shift) as usize, mant2)
    }
}

/// `ln` of the tail bound in the module docs for `P[|X| ≥ m]`.
fn log_tail_bound(m: f64, sigma: f64) -> f64 {
    let a = m / (sigma * sigma);
    let one_minus = (a / 2.0).min(0.63);
    let z_lb = ((2.0 * std::f64::consts::PI).sqrt() * sigma - 1.0).max(1.0);
    std::f64::consts::LN_2 - m * m / (2.0 * sigma * sigma) - one_minus.ln() - z_lb.ln()
}

/// Required `ln P[|X| ≥ M]`: 2⁻¹⁰⁰ with one nat of slack for the float evaluation of the bound.
const LOG_TAIL_TARGET: f64 = -100.0 * std::f64::consts::LN_2 - 1.0;

#[derive(Debug, Clone)]
struct Block {
    /// Accept outright when the uniform prefix is below this (units of 2^-K).
    accept_floor: u64,
    /// Bounds on F/W_j.
    c: (f64, f64),
    /// W_j.
    weight: u64,
}

/// The fast exact discrete Gaussian sampler (see the module docs for the algorithm and proof).
#[derive(Debug, Clone)]
pub struct FastDiscreteGaussian {
    sigma: f64,
    beta: u32,
    col_bits: u32,
    thresholds: Vec<u64>,
    aliases: Vec<u32>,
    blocks: Vec<Block>,
    scale_f: u64,
    two_sigma2: (f64, f64),
    support: u64,
    force_exact: bool,
}

impl FastDiscreteGaussian {
    /// Prepares the tables for `N_ℤ(0, σ²)`, σ in grid units, `0 ≤ σ ≤ 2⁴⁰`.
    pub fn new(sigma: f64) -> Result<Self, PrivacyError> {
        if !(sigma.is_finite() && (0.0..=MAX_SIGMA_GRID).contains(&sigma)) {
            return Err(PrivacyError::InvalidParameter(format!(
                "discrete Gaussian sigma {sigma} must be finite and within [0, 2^40] grid units"
            )));
        }
        if sigma == 0.0 {
            return Ok(Self {
                sigma,
                beta: 0,
                col_bits: 0,
                thresholds: Vec::new(),
                aliases: Vec::new(),
                blocks: Vec::new(),
                scale_f: 0,
                two_sigma2: (0.0, 0.0),
                support: 1,
                force_exact: false,
            });
        }
        let mut beta = 0u32;
        while sigma >= 64.0 && 2f64.powi(beta as i32 + 1) <= sigma / 32.0 {
            beta += 1;
        }
        let b = 1u64 << beta;
        let sq = |x: f64| (next_down(x * x).max(0.0), next_up(x * x));
        let (s_lo, s_hi) = sq(sigma);
        let two_sigma2 = (2.0 * s_lo, 2.0 * s_hi);

        let mut blocks_n = ((12.0 * sigma) / b as f64).ceil().max(1.0) as u64;
        while log_tail_bound((blocks_n * b) as f64, sigma) > LOG_TAIL_TARGET {
            blocks_n += (blocks_n / 64).max(1);
        }
        let support = blocks_n * b;
        let j_count = blocks_n as usize;

        let y_bounds = |m: u64| {
            let mf = m as f64;
            div_bounds(sq(mf), two_sigma2)
        };
        // Upper bounds of each block's largest summand e^{-(jb)^2/2σ^2}.
        let tops: Vec<f64> = (0..blocks_n)
            .map(|j| {
                let y = y_bounds(j * b);
                exp_neg_bounds(y.0, y.1).1
            })
            .collect();
        let columns = (j_count + 1).next_power_of_two();
        let col_bits = columns.trailing_zeros();
        let capacity: u128 = 1u128 << (64 - col_bits);
        let top_sum: f64 = tops.iter().sum();
        let mut f = (capacity as f64 * (1.0 - 2f64.powi(-20)) / top_sum).floor().max(1.0);
        let weights = loop {
            let w: Vec<u64> = tops.iter().map(|&t| (next_up(f * t).ceil() as u64).max(1)).collect();
            if w.iter().map(|&x| x as u128).sum::<u128>() <= capacity {
                break w;
            }
            f = (f / 2.0).floor().max(1.0);
        };
        let scale_f = f as u64;
        let k_bits = 63 - beta;
        let blocks: Vec<Block> = weights
            .iter()
            .enumerate()
            .map(|(j, &w)| {
                let c = div_bounds(u128_bounds(scale_f as u128), u128_bounds(w as u128));
                let y_far = y_bounds((j as u64 + 1) * b - 1);
                let least = mul_bounds(exp_neg_bounds(y_far.0, y_far.1), c).0;
                let accept_floor = (least.min(1.0) * 2f64.powi(k_bits as i32)).floor() as u64;
                Block { accept_floor, c, weight: w }
            })
            .collect();

        let mut all_weights: Vec<u128> = weights.iter().map(|&w| w as u128).collect();
        let used: u128 = all_weights.iter().sum();
        all_weights.push(capacity - used);
        all_weights.resize(columns, 0);
        let (thresholds, aliases) = build_alias(&all_weights, capacity);

        Ok(Self {
            sigma,
            beta,
            col_bits,
            thresholds,
            aliases,
            blocks,
            scale_f,
            two_sigma2,
            support,
            force_exact: false,
        })
    }

    /// Every magnitude this sampler can return is below this bound.
    pub fn support_bound(&self) -> u64 {
        self.support
    }

    /// The same sampler deciding every acceptance with the arbitrary-precision path only, so
    /// that tests exercise the code that the fast paths almost never reach.
    #[doc(hidden)]
    pub fn with_exact_path_only(mut self) -> Self {
        self.force_exact = true;
        self
    }

    #[inline]
    fn accept(&self, rng: &mut NoiseRng, j: usize, m: u64, u: u64) -> bool {
        let k_bits = 63 - self.beta;
        let block = &self.blocks[j];
        if !self.force_exact {
            if u < block.accept_floor {
                return true;
            }
            let mf = m as f64;
            let m2 = (next_down(mf * mf).max(0.0), next_up(mf * mf));
            let y = div_bounds(m2, self.two_sigma2);
            let p = mul_bounds(exp_neg_bounds(y.0, y.1), block.c);
            match compare_prefix(u, k_bits, p) {
                Verdict::Below => return true,
                Verdict::Above => return false,
                Verdict::Undecided => {}
            }
        }
        let y = half_square_over_sigma2(&UBig::from(m), self.sigma);
        let c = Ratio::new(UBig::from(self.scale_f), UBig::from(block.weight));
        decide_exact(rng, u, k_bits, &y, &c)
    }
}

/// Walker–Vose alias table over integer weights summing to `capacity` (a power of two):
/// column `i` keeps itself when a uniform in `[0, capacity)` is below `thresholds[i]`.
fn build_alias(weights: &[u128], capacity: u128) -> (Vec<u64>, Vec<u32>) {
    let n = weights.len();
    let mut scaled: Vec<u128> = weights.iter().map(|&w| w * n as u128).collect();
    let mut thresholds = vec![capacity as u64; n];
    let mut aliases: Vec<u32> = (0..n as u32).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < capacity);
    while let (Some(&l), Some(&g)) = (small.last(), large.last()) {
        small.pop();
        thresholds[l] = scaled[l] as u64;
        aliases[l] = g as u32;
        scaled[g] -= capacity - scaled[l];
        if scaled[g] < capacity {
            large.pop();
            small.push(g);
        }
    }
    // With exact integer arithmetic whatever is left holds exactly one full column.
    for i in small.into_iter().chain(large) {
        thresholds[i] = capacity as u64;
    }
    (thresholds, aliases)
}

impl NoiseSampler for FastDiscreteGaussian {
    fn sigma(&self) -> f64 {
        self.sigma
    }

    #[inline]
    fn sample(&self, rng: &mut NoiseRng) -> i64 {
        if self.blocks.is_empty() {
            return 0;
        }
        let mask = (1u64 << (64 - self.col_bits)) - 1;
        let offset_mask = (1u64 << self.beta) - 1;
        loop {
            let r = rng.next_u64();
            let col = (r >> (64 - self.col_bits)) as usize;
            let j = if (r & mask) < self.thresholds[col] { col } else { self.aliases[col] as usize };
            if j >= self.blocks.len() {
                continue; // the padding pseudo-block: reject
            }
            let r2 = rng.next_u64();
            let m = ((j as u64) << self.beta) | (r2 & offset_mask);
            let negative = (r2 >> self.beta) & 1 == 1;
            if m == 0 && negative {
                continue;
            }
            if self.accept(rng, j, m, r2 >> (self.beta + 1)) {
                return if negative { -(m as i64) } else { m as i64 };
            }
        }
    }
}

/// Canonne–Kamath–Steinke Algorithm 1 with exact Bernoulli(exp(−γ)) decisions: the
/// reference implementation the fast sampler is checked against.
#[derive(Debug, Clone)]
pub struct CksDiscreteGaussian {
    sigma: f64,
    t: u64,
    /// σ² = sigma2.num / sigma2.den exactly.
    sigma2: Ratio,
}

impl CksDiscreteGaussian {
    /// The reference sampler for `N_ℤ(0, σ²)`, σ in grid units, `0 ≤ σ ≤ 2⁴⁰`.
    pub fn new(sigma: f64) -> Result<Self, PrivacyError> {
        if !(sigma.is_finite() && (0.0..=MAX_SIGMA_GRID).contains(&sigma)) {
            return Err(PrivacyError::InvalidParameter(format!(
                "discrete Gaussian sigma {sigma} must be finite and within [0, 2^40] grid units"
            )));
        }
        let (mant, e) = dyadic(sigma);
        let mant2 = UBig::from(mant) * UBig::from(mant);
        let sigma2 = if e >= 0 {
            Ratio::new(mant2 << (2 * e) as usize, UBig::ONE)
        } else {
            Ratio::new(mant2, UBig::ONE << (-2 * e) as usize)
        };
        Ok(Self { sigma, t: sigma.floor() as u64 + 1, sigma2 })
    }

    fn uniform_below(rng: &mut NoiseRng, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let r = rng.next_u64();
            if r < zone {
                return r % n;
            }
        }
    }

    fn bernoulli_exp(rng: &mut NoiseRng, y: Ratio) -> bool {
        bernoulli_scaled_exp_neg(rng, &y, &Ratio::new(UBig::ONE, UBig::ONE), false)
    }

    /// Discrete Laplace with scale `t` (CKS Algorithm 2).
    fn discrete_laplace(&self, rng: &mut NoiseRng) -> i64 {
        let t = self.t;
        loop {
            let u = Self::uniform_below(rng, t);
            if !Self::bernoulli_exp(rng, Ratio::new(UBig::from(u), UBig::from(t))) {
                continue;
            }
            let mut v = 0u64;
            while Self::bernoulli_exp(rng, Ratio::new(UBig::ONE, UBig::ONE)) {
                v += 1;
            }
            let x = u + t * v;
            let negative = rng.next_u64() & 1 == 1;
            if negative && x == 0 {
                continue;
            }
            return if negative { -(x as i64) } else { x as i64 };
        }
    }
}

impl NoiseSampler for CksDiscreteGaussian {
    fn sigma(&self) -> f64 {
        self.sigma
    }

    fn sample(&self, rng: &mut NoiseRng) -> i64 {
        if self.sigma == 0.0 {
            return 0;
        }
        let t = UBig::from(self.t);
        loop {
            let y = self.discrete_laplace(rng);
            // γ = (|y| − σ²/t)² / (2σ²) = (|y|·t·den − num)² / (2·t²·den·num).
            let (num, den) = (&self.sigma2.num, &self.sigma2.den);
            let a = UBig::from(y.unsigned_abs()) * &t * den;
            let diff = if a >= *num { &a - num } else { num - &a };
            let gamma = Ratio::new(&diff * &diff, UBig::from(2u8) * &t * &t * den * num);
            if Self::bernoulli_exp(rng, gamma) {
                return y;
            }
        }
    }
}
