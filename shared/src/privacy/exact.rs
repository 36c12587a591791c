//! Exact Bernoulli(c·e^(−y)) decisions: rigorous `f64` interval bounds for the fast path and
//! arbitrary-precision fixed-point bounds for the rare undecided case.
//!
//! # Why this is exact
//!
//! A Bernoulli(p) outcome is `U < p` for a uniform real `U ∈ [0, 1)`. We never hold all of `U`: we
//! hold its first `k` bits `u`, so `U ∈ [u/2ᵏ, (u+1)/2ᵏ)`, and an interval `[lo, hi] ∋ p`. If
//! `(u+1)/2ᵏ ≤ lo` the answer is "yes" whatever the remaining bits are; if `u/2ᵏ ≥ hi` it is "no".
//! Otherwise we draw more bits of `U` and tighten `[lo, hi]`; both refine without bound, so the
//! loop ends with probability one and the answer is exactly `[U < p]`, a Bernoulli(p) draw.
//! No floating-point value is ever *trusted*: every `f64` operation below is followed by a
//! one-ulp step outward (`next_up`/`next_down`), and IEEE 754 guarantees that a correctly rounded
//! `+ − × ÷` lands within one ulp of the real result, so each bound stays on its side.

use dashu::base::BitTest;
use dashu::integer::UBig;

use super::sampler::NoiseRng;

/// Taylor terms used for `e^z`, `z ∈ [0, ½]`: the tail after 20 terms is `< 2·½²¹/21! < 10⁻²⁵`.
const TAYLOR_TERMS: u32 = 20;
/// Bound on the Taylor tail above (with a wide margin).
const TAYLOR_TAIL: f64 = 1e-25;

/// The least double above `x` (`f64::next_up`, which is newer than the workspace MSRV).
pub(crate) fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let bits = x.to_bits();
    f64::from_bits(if x > 0.0 { bits + 1 } else { bits - 1 })
}

/// The greatest double below `x`.
pub(crate) fn next_down(x: f64) -> f64 {
    -next_up(-x)
}

fn mul_dn(a: f64, b: f64) -> f64 {
    next_down(a * b).max(0.0)
}
fn mul_up(a: f64, b: f64) -> f64 {
    next_up(a * b)
}
fn div_dn(a: f64, b: f64) -> f64 {
    next_down(a / b).max(0.0)
}
fn div_up(a: f64, b: f64) -> f64 {
    next_up(a / b)
}
fn add_dn(a: f64, b: f64) -> f64 {
    next_down(a + b)
}
fn add_up(a: f64, b: f64) -> f64 {
    next_up(a + b)
}

/// `(lo, hi)` with `lo ≤ x ≤ hi` for an integer that may not be representable as `f64`.
pub(crate) fn u128_bounds(x: u128) -> (f64, f64) {
    let f = x as f64;
    // `f` is the nearest double, so its neighbour on the far side of `x` brackets it.
    if f >= 2f64.powi(128) || (f as u128) > x {
        (next_down(f), f)
    } else if (f as u128) < x {
        (f, next_up(f))
    } else {
        (f, f)
    }
}

/// Halvings `s` that bring `y` into `[0, ½]`, and `y/2ˢ` (exact: scaling by two never rounds here).
fn reduce(y: f64) -> (u32, f64) {
    let mut s = 0;
    let mut z = y;
    while z > 0.5 {
        z *= 0.5;
        s += 1;
    }
    (s, z)
}

/// A lower bound on `e^y`, `y ≥ 0`.
fn exp_lower(y: f64) -> f64 {
    let (s, z) = reduce(y);
    let mut t = 1.0;
    for k in (1..=TAYLOR_TERMS).rev() {
        // Horner on positive terms, every step rounded down: the truncated series is below e^z.
        t = add_dn(1.0, div_dn(mul_dn(z, t), f64::from(k)));
    }
    for _ in 0..s {
        t = mul_dn(t, t);
    }
    t
}

/// An upper bound on `e^y`, `y ≥ 0`.
fn exp_upper(y: f64) -> f64 {
    let (s, z) = reduce(y);
    let mut t = 1.0;
    for k in (1..=TAYLOR_TERMS).rev() {
        t = add_up(1.0, div_up(mul_up(z, t), f64::from(k)));
    }
    t = add_up(t, TAYLOR_TAIL);
    for _ in 0..s {
        t = mul_up(t, t);
    }
    t
}

/// `(lo, hi)` with `lo ≤ e^(−y) ≤ hi` for every `y ∈ [y_lo, y_hi]`, `0 ≤ y_lo ≤ y_hi`.
pub(crate) fn exp_neg_bounds(y_lo: f64, y_hi: f64) -> (f64, f64) {
    debug_assert!(0.0 <= y_lo && y_lo <= y_hi);
    let lo = div_dn(1.0, exp_upper(y_hi));
    let hi = div_up(1.0, exp_lower(y_lo)).min(1.0);
    (lo, hi)
}

/// Interval product of non-negative intervals.
pub(crate) fn mul_bounds(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (mul_dn(a.0, b.0), mul_up(a.1, b.1))
}

/// Interval quotient of non-negative intervals (`b.0 > 0`).
pub(crate) fn div_bounds(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (div_dn(a.0, b.1), div_up(a.1, b.0))
}

/// An exact non-negative rational `num/den`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ratio {
    pub(crate) num: UBig,
    pub(crate) den: UBig,
}

impl Ratio {
    pub(crate) fn new(num: UBig, den: UBig) -> Self {
        debug_assert!(!den.is_zero());
        Self { num, den }
    }
}

fn ceil_div(a: &UBig, b: &UBig) -> UBig {
    let q = a / b;
    if &q * b == *a {
        q
    } else {
        q + UBig::ONE
    }
}

/// Fixed-point bounds `(lo, hi, w)` with `lo/2ʷ ≤ c·e^(−y) ≤ hi/2ʷ` and `w ≥ bits`.
///
/// `e^z` for `z = y/2ˢ ≤ ½` is summed term by term with every term rounded down (lower bound)
/// or up plus a tail bound (upper bound: after term `K` the tail is at most `term_K·Σ(¼)ʲ <
/// term_K`), then squared `s` times with the same outward rounding. The width shrinks like
/// `2^(s+16−w)`, so doubling `bits` keeps tightening it.
pub(crate) fn scaled_exp_neg_fixed(y: &Ratio, c: &Ratio, bits: usize) -> (UBig, UBig, usize) {
    let nb = y.num.bit_len();
    let db = y.den.bit_len();
    let s = if y.num.is_zero() { 0 } else { (nb + 2).saturating_sub(db) };
    let w = bits + 2 * s + 64;
    let one = UBig::ONE << w;
    // z ∈ [z_lo, z_lo + 1] in units of 2^-w.
    let z_lo = (&y.num << w) / (&y.den << s);
    let z_hi = &z_lo + UBig::ONE;

    let mut lo_sum = one.clone();
    let mut term = one.clone();
    let mut k = 1u32;
    while !term.is_zero() {
        term = (&term * &z_lo) / (UBig::from(k) << w);
        lo_sum += &term;
        k += 1;
    }
    let mut hi_sum = one.clone();
    let mut term = one.clone();
    let mut k = 1u32;
    loop {
        term = ceil_div(&(&term * &z_hi), &(UBig::from(k) << w));
        hi_sum += &term;
        k += 1;
        if term <= UBig::ONE {
            hi_sum += &term + UBig::ONE;
            break;
        }
    }
    for _ in 0..s {
        lo_sum = (&lo_sum * &lo_sum) >> w;
        hi_sum = ceil_div(&(&hi_sum * &hi_sum), &one);
    }
    // e^{-y} = 1/e^{y}: the lower bound divides by the upper one and vice versa.
    let two_w = UBig::ONE << (2 * w);
    let neg_lo = &two_w / &hi_sum;
    let neg_hi = ceil_div(&two_w, &lo_sum);
    let lo = (&neg_lo * &c.num) / &c.den;
    let hi = ceil_div(&(&neg_hi * &c.num), &c.den);
    (lo, hi, w)
}

/// Outcome of comparing a partly drawn uniform against bounds on `p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `U < p` whatever the undrawn bits are.
    Below,
    /// `U ≥ p` whatever the undrawn bits are.
    Above,
    /// Not decided at this precision.
    Undecided,
}

/// Compares the uniform whose first `k` bits are `u` against `p ∈ [lo, hi]`.
pub(crate) fn compare_prefix(u: u64, k: u32, bounds: (f64, f64)) -> Verdict {
    debug_assert!(k <= 64);
    let scale = 2f64.powi(k as i32);
    // floor(lo·2^k) and ceil(hi·2^k) are exact: scaling by 2^k is exact and so is floor/ceil.
    let lo_units = (bounds.0 * scale).floor();
    let hi_units = (bounds.1 * scale).ceil();
    let u_f = u as u128;
    // Both unit counts are integers no larger than 2^65, so the casts below are exact.
    if u_f < lo_units as u128 {
        Verdict::Below
    } else if u_f >= hi_units as u128 {
        Verdict::Above
    } else {
        Verdict::Undecided
    }
}

/// Finishes an undecided Bernoulli(c·e^(−y)) draw: extends the uniform prefix `u` (`k` bits)
/// with fresh bits from `rng` and compares against ever tighter exact bounds.
pub(crate) fn decide_exact(rng: &mut NoiseRng, u: u64, k: u32, y: &Ratio, c: &Ratio) -> bool {
    let mut prefix = UBig::from(u);
    let mut have = k as usize;
    let mut bits = 128;
    loop {
        let (lo, hi, w) = scaled_exp_neg_fixed(y, c, bits);
        while have < w {
            let take = (w - have).min(64);
            let fresh = rng.next_u64() >> (64 - take);
            prefix = (prefix << take) | UBig::from(fresh);
            have += take;
        }
        if &prefix + UBig::ONE <= lo {
            return true;
        }
        if prefix >= hi {
            return false;
        }
        bits *= 2;
    }
}

/// An exact Bernoulli(c·e^(−y)) draw (`c·e^(−y) ≤ 1` is the caller's promise; a larger value
/// would simply always answer `true`).
pub(crate) fn bernoulli_scaled_exp_neg(rng: &mut NoiseRng, y: &Ratio, c: &Ratio, force_exact: bool) -> bool {
    let u = rng.next_u64();
    if !force_exact {
        let y_b = ratio_bounds(y);
        let c_b = ratio_bounds(c);
        let p = mul_bounds(exp_neg_bounds(y_b.0, y_b.1), c_b);
        match compare_prefix(u, 64, p) {
            Verdict::Below => return true,
            Verdict::Above => return false,
            Verdict::Undecided => {}
        }
    }
    decide_exact(rng, u, 64, y, c)
}

/// `f64` bounds on a rational.
pub(crate) fn ratio_bounds(r: &Ratio) -> (f64, f64) {
    let (n_lo, n_hi) = ubig_bounds(&r.num);
    let (d_lo, d_hi) = ubig_bounds(&r.den);
    if n_hi == 0.0 {
        return (0.0, 0.0);
    }
    div_bounds((n_lo, n_hi), (d_lo, d_hi))
}

fn ubig_bounds(x: &UBig) -> (f64, f64) {
    let len = x.bit_len();
    if len <= 128 {
        return u128_bounds(u128::try_from(x).unwrap_or(u128::MAX));
    }
    let shift = len - 64;
    if shift > 900 {
        return (0.0, f64::INFINITY);
    }
    // x ∈ [top·2^shift, (top+1)·2^shift); scaling by a power of two is exact.
    let top = u128::try_from(&(x >> shift)).unwrap_or(u128::MAX);
    let scale = 2f64.powi(shift as i32);
    (u128_bounds(top).0 * scale, u128_bounds(top + 1).1 * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(num: u64, den: u64) -> Ratio {
        Ratio::new(UBig::from(num), UBig::from(den))
    }

    #[test]
    fn float_bounds_bracket_the_exponential_at_every_scale() {
        for i in 0..4000 {
            let y = f64::from(i) * 0.0371 + f64::from(i % 7) * 1e-9;
            let (lo, hi) = exp_neg_bounds(y, y);
            let e = (-y).exp();
            assert!(lo <= e && e <= hi, "y={y}: {lo} <= {e} <= {hi}");
            assert!(hi - lo <= 1e-10 * e + 1e-300, "bounds too loose at y={y}: {lo}..{hi}");
        }
    }

    #[test]
    fn exact_fixed_point_bounds_agree_with_the_float_bounds() {
        for (num, den) in [(0u64, 1u64), (1, 3), (7, 2), (1000, 7), (123_456_789, 1_000_000), (1, 1 << 40)] {
            let y = ratio(num, den);
            let c = ratio(3, 4);
            let (lo, hi, w) = scaled_exp_neg_fixed(&y, &c, 128);
            assert!(lo <= hi);
            assert!(&hi - &lo < UBig::ONE << (w - 100), "exact bounds are not tight for {num}/{den}");
            let yf = num as f64 / den as f64;
            let f = 0.75 * (-yf).exp();
            let lo_f = lo.to_f64().value() / 2f64.powi(w as i32);
            let hi_f = hi.to_f64().value() / 2f64.powi(w as i32);
            // The bounds are absolute (2^-w units); the platform exp is off by ≈ y·2⁻⁵³ relative.
            let tol = 1e-13 * f + 2f64.powi(-120);
            assert!((lo_f - f).abs() <= tol && (hi_f - f).abs() <= tol, "{num}/{den}");
        }
    }

    #[test]
    fn prefix_comparison_only_decides_when_every_completion_agrees() {
        assert_eq!(compare_prefix(0, 1, (0.5, 0.5)), Verdict::Below);
        assert_eq!(compare_prefix(1, 1, (0.5, 0.5)), Verdict::Above);
        assert_eq!(compare_prefix(1, 2, (0.4, 0.6)), Verdict::Undecided);
        assert_eq!(compare_prefix(u64::MAX, 64, (1.0, 1.0)), Verdict::Below);
        assert_eq!(compare_prefix(0, 64, (0.0, 0.0)), Verdict::Above);
    }
}
