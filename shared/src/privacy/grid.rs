//! The fixed-point grid `2^k·ℤ` on which noise is added (and on which integer secure
//! aggregation can later sum).
//!
//! `quantize` maps `x` to the nearest integer of `x·2^(−k)`. Both steps are exact in `f64`:
//! an `f32` widens to `f64` exactly, scaling by a power of two is exact (no over/underflow for
//! `|k| ≤ 200`), and rounding to an integer is exact. So the only error is the rounding itself,
//! at most `2^(k−1)` per coordinate — the quantity [`widened_sensitivity`] accounts for.

use super::exact::next_up;
use super::PrivacyError;

/// Integers on the grid must stay below this so that adding noise (below 2⁴⁴) cannot overflow.
const GRID_LIMIT: f64 = 4.611_686_018_427_388e18; // 2^62

fn check_k(grid_log2: i32) -> Result<(), PrivacyError> {
    if (-200..=200).contains(&grid_log2) {
        Ok(())
    } else {
        Err(PrivacyError::InvalidParameter(format!("grid exponent {grid_log2} outside [-200, 200]")))
    }
}

/// Rounds each value to the nearest multiple of `2^grid_log2` and returns the multiples.
pub fn quantize(values: &[f32], grid_log2: i32) -> Result<Vec<i64>, PrivacyError> {
    let mut out = vec![0i64; values.len()];
    quantize_into(values, grid_log2, &mut out)?;
    Ok(out)
}

/// [`quantize`] into a caller's buffer of the same length.
pub fn quantize_into(values: &[f32], grid_log2: i32, out: &mut [i64]) -> Result<(), PrivacyError> {
    check_k(grid_log2)?;
    if values.len() != out.len() {
        return Err(PrivacyError::LengthMismatch { expected: values.len(), actual: out.len() });
    }
    let scale = 2f64.powi(-grid_log2);
    for (index, (v, o)) in values.iter().zip(out.iter_mut()).enumerate() {
        *o = quantize_one(*v, scale).ok_or(PrivacyError::GridOverflow {
            value: f64::from(*v),
            index,
            grid_log2,
        })?;
    }
    Ok(())
}

/// `round(v·scale)` if finite and inside the grid limit.
#[inline]
pub(crate) fn quantize_one(v: f32, scale: f64) -> Option<i64> {
    let x = (f64::from(v) * scale).round();
    if x.is_finite() && x.abs() < GRID_LIMIT {
        Some(x as i64)
    } else {
        None
    }
}

/// Maps grid integers back to values: `q·2^grid_log2`, rounded to `f32` (post-processing).
pub fn dequantize(ints: &[i64], grid_log2: i32) -> Result<Vec<f32>, PrivacyError> {
    let mut out = vec![0f32; ints.len()];
    dequantize_into(ints, grid_log2, &mut out)?;
    Ok(out)
}

/// [`dequantize`] into a caller's buffer of the same length.
pub fn dequantize_into(ints: &[i64], grid_log2: i32, out: &mut [f32]) -> Result<(), PrivacyError> {
    check_k(grid_log2)?;
    if ints.len() != out.len() {
        return Err(PrivacyError::LengthMismatch { expected: ints.len(), actual: out.len() });
    }
    let scale = 2f64.powi(grid_log2);
    for (q, o) in ints.iter().zip(out.iter_mut()) {
        *o = (*q as f64 * scale) as f32;
    }
    Ok(())
}

/// L2 sensitivity of the rounded sum when clipped contributions have norm `≤ clip` in `dim`
/// coordinates: `clip + 2^k·√dim` (OpenDP's `make_gaussian` bound; see the module docs of
/// [`crate::privacy`]), rounded upward.
pub fn widened_sensitivity(clip: f64, grid_log2: i32, dim: usize) -> Result<f64, PrivacyError> {
    check_k(grid_log2)?;
    if !(clip.is_finite() && clip > 0.0) {
        return Err(PrivacyError::InvalidParameter(format!("clip norm {clip} must be finite and positive")));
    }
    let root = next_up((dim as f64).sqrt());
    Ok(next_up(clip + next_up(2f64.powi(grid_log2) * root)))
}

/// A grid fine enough that rounding widens the sensitivity by at most `clip/1024`:
/// the largest `k` with `2^k·√dim ≤ clip/1024`.
pub fn default_grid_log2(clip: f64, dim: usize) -> Result<i32, PrivacyError> {
    if !(clip.is_finite() && clip > 0.0) {
        return Err(PrivacyError::InvalidParameter(format!("clip norm {clip} must be finite and positive")));
    }
    let target = clip / 1024.0 / (dim.max(1) as f64).sqrt();
    let mut k = target.log2().floor() as i32;
    while 2f64.powi(k) > target {
        k -= 1;
    }
    Ok(k.clamp(-200, 200))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_moves_each_value_by_at_most_half_a_step() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.7311).sin() * 3.0).collect();
        for k in [-20, -7, 0, 3] {
            let q = quantize(&values, k).unwrap();
            let back = dequantize(&q, k).unwrap();
            for (v, b) in values.iter().zip(&back) {
                assert!((f64::from(*v) - f64::from(*b)).abs() <= 2f64.powi(k - 1) * (1.0 + 1e-6) + 1e-6);
            }
        }
    }

    #[test]
    fn values_beyond_the_grid_are_refused_not_wrapped() {
        assert!(matches!(quantize(&[1.0, 3.0e38], 0), Err(PrivacyError::GridOverflow { index: 1, .. })));
        assert!(matches!(quantize(&[f32::NAN], 0), Err(PrivacyError::GridOverflow { .. })));
    }

    #[test]
    fn the_default_grid_keeps_the_widening_below_a_thousandth_of_the_clip() {
        for (clip, dim) in [(1.0, 22_700_000usize), (0.1, 10), (5.0, 1)] {
            let k = default_grid_log2(clip, dim).unwrap();
            let widened = widened_sensitivity(clip, k, dim).unwrap();
            assert!(widened > clip && widened <= clip * (1.0 + 1.0 / 1024.0) * (1.0 + 1e-12));
            assert!(widened_sensitivity(clip, k + 1, dim).unwrap() - clip > clip / 1024.0 * 0.99);
        }
    }
}
