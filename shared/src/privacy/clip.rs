//! L2 clipping of whole updates or tensor by tensor.
//!
//! The sensitivity proof needs `‖clip(Δ)‖₂ ≤ C` for the values actually sent, not for their
//! real-number ideal. Squares of `f32` values are exact in `f64` (48 significant bits), so the
//! only error in the norm is the summation's, at most `(n−1)·u` relatively (`u = 2⁻⁵³`);
//! [`l2_norm_upper_bound`] adds that margin. Clipping scales by slightly less than `C/‖Δ‖`
//! to absorb the `f32` rounding of the products, then checks the bound and shrinks again in the
//! (never observed) case it does not hold.

use super::exact::next_up;
use super::PrivacyError;
use crate::params::Manifest;

/// What clipping did to one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipReport {
    /// The update's L2 norm before clipping (the ordinary `f64`-accumulated value).
    pub norm_before: f64,
    /// The factor every value was multiplied by (`1.0` when the update was within the bound).
    pub scale: f64,
}

impl ClipReport {
    /// Whether the update had to be scaled down.
    pub fn clipped(&self) -> bool {
        self.scale < 1.0
    }
}

/// Sum of squares accumulated in `f64`, four lanes for speed (each square is exact).
fn sum_squares(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 4];
    let mut chunks = values.chunks_exact(4);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += f64::from(*v) * f64::from(*v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
    lanes.iter().sum::<f64>() + tail
}

/// A guaranteed upper bound on the real L2 norm of `values` (infinite if any value is not finite).
pub fn l2_norm_upper_bound(values: &[f32]) -> f64 {
    let s = sum_squares(values);
    if s == 0.0 {
        return 0.0;
    }
    let relative = (values.len() as f64 + 4.0) * 1.01 * f64::EPSILON / 2.0;
    next_up(next_up(s * (1.0 + relative)).sqrt())
}

/// Scales `values` so that their L2 norm is at most `c`; a no-op when it already is.
pub fn clip_l2(values: &mut [f32], c: f64) -> ClipReport {
    debug_assert!(c.is_finite() && c > 0.0, "clip norm must be finite and positive");
    let norm_before = sum_squares(values).sqrt();
    let upper = l2_norm_upper_bound(values);
    if upper <= c {
        return ClipReport { norm_before, scale: 1.0 };
    }
    if !upper.is_finite() {
        // NaN/∞ have no meaningful direction: zeroing is the only bounded choice.
        values.fill(0.0);
        return ClipReport { norm_before, scale: 0.0 };
    }
    // 2^-22 covers the f32 rounding of each product (relative 2^-24) with room to spare.
    let mut scale = c / upper * (1.0 - 2f64.powi(-22));
    let original: Vec<f32> = if values.len() <= 1 << 20 { values.to_vec() } else { Vec::new() };
    loop {
        if original.is_empty() {
            for v in values.iter_mut() {
                *v = (f64::from(*v) * scale) as f32;
            }
        } else {
            for (v, o) in values.iter_mut().zip(&original) {
                *v = (f64::from(*o) * scale) as f32;
            }
        }
        if l2_norm_upper_bound(values) <= c {
            return ClipReport { norm_before, scale };
        }
        // Values already scaled once: shrink a little more from where they are.
        scale = if original.is_empty() { 1.0 - 2f64.powi(-20) } else { scale * (1.0 - 2f64.powi(-20)) };
    }
}

/// How the total bound `C` is split over tensors; always `Σ_l C_l² = C²`.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerBudget {
    /// `C_l = C/√L` for `L` tensors.
    Equal,
    /// `C_l = C·√(d_l/d)`: bigger tensors get a bigger share.
    ProportionalToSize,
    /// `C_l = C·√(w_l/Σw)` for non-negative weights, one per tensor.
    Weighted(Vec<f64>),
}

/// What per-layer clipping did.
#[derive(Debug, Clone, PartialEq)]
pub struct PerLayerClipReport {
    /// Norm of the whole update before clipping.
    pub norm_before: f64,
    /// Bound used for each tensor, in manifest order.
    pub layer_bounds: Vec<f64>,
    /// Each tensor's report, in manifest order.
    pub layers: Vec<ClipReport>,
}

/// Clips each tensor of `manifest` within `values` to its share of `c`, so the whole update has
/// L2 norm at most `c` (`Σ‖Δ_l‖² ≤ ΣC_l² = C²`).
pub fn clip_per_layer(
    values: &mut [f32],
    manifest: &Manifest,
    c: f64,
    budget: &LayerBudget,
) -> Result<PerLayerClipReport, PrivacyError> {
    if !(c.is_finite() && c > 0.0) {
        return Err(PrivacyError::InvalidParameter(format!("clip norm {c} must be finite and positive")));
    }
    if manifest.numel() != values.len() {
        return Err(PrivacyError::LengthMismatch { expected: manifest.numel(), actual: values.len() });
    }
    let sizes: Vec<f64> = manifest.tensors.iter().map(|t| t.numel() as f64).collect();
    let weights: Vec<f64> = match budget {
        LayerBudget::Equal => vec![1.0; sizes.len()],
        LayerBudget::ProportionalToSize => sizes.clone(),
        LayerBudget::Weighted(w) => {
            if w.len() != sizes.len() || w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                return Err(PrivacyError::InvalidParameter(format!(
                    "need {} finite non-negative layer weights, got {w:?}",
                    sizes.len()
                )));
            }
            w.clone()
        }
    };
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(PrivacyError::InvalidParameter("layer weights sum to zero".into()));
    }
    let norm_before = sum_squares(values).sqrt();
    // Round each share down a hair so that Σ C_l² ≤ C² survives the float arithmetic.
    let layer_bounds: Vec<f64> =
        weights.iter().map(|w| c * (w / total).sqrt() * (1.0 - 4.0 * f64::EPSILON)).collect();
    let mut layers = Vec::with_capacity(layer_bounds.len());
    for ((_, range), bound) in manifest.ranges().zip(&layer_bounds) {
        let slice = &mut values[range];
        if *bound > 0.0 {
            layers.push(clip_l2(slice, *bound));
        } else {
            let norm = sum_squares(slice).sqrt();
            slice.fill(0.0);
            layers.push(ClipReport { norm_before: norm, scale: 0.0 });
        }
    }
    Ok(PerLayerClipReport { norm_before, layer_bounds, layers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::TensorSpec;
    use proptest::prelude::*;

    fn manifest() -> Manifest {
        Manifest::new(vec![
            TensorSpec { name: "a".into(), shape: vec![3, 4] },
            TensorSpec { name: "b".into(), shape: vec![5] },
            TensorSpec { name: "c".into(), shape: vec![1] },
        ])
        .unwrap()
    }

    proptest! {
        #[test]
        fn clipped_updates_never_exceed_the_bound(
            values in proptest::collection::vec(-1e6f32..1e6f32, 1..400),
            c in 1e-4f64..1e3,
        ) {
            let mut v = values.clone();
            let report = clip_l2(&mut v, c);
            prop_assert!(l2_norm_upper_bound(&v) <= c);
            if report.scale == 1.0 {
                prop_assert_eq!(v, values);
            } else {
                // A clipped update keeps its direction and lands just inside the ball.
                prop_assert!(l2_norm_upper_bound(&v) >= c * (1.0 - 1e-5));
            }
        }

        #[test]
        fn per_layer_clipping_bounds_every_layer_and_the_whole(
            values in proptest::collection::vec(-1e3f32..1e3f32, 18),
            c in 1e-3f64..10.0,
            pick in 0usize..3,
        ) {
            let budget = [LayerBudget::Equal, LayerBudget::ProportionalToSize,
                LayerBudget::Weighted(vec![1.0, 0.0, 3.0])][pick].clone();
            let m = manifest();
            let mut v = values;
            let report = clip_per_layer(&mut v, &m, c, &budget).unwrap();
            prop_assert!(l2_norm_upper_bound(&v) <= c * (1.0 + 1e-12));
            for ((_, r), bound) in m.ranges().zip(&report.layer_bounds) {
                prop_assert!(l2_norm_upper_bound(&v[r]) <= *bound);
            }
            let squares: f64 = report.layer_bounds.iter().map(|b| b * b).sum();
            prop_assert!(squares <= c * c);
        }
    }

    #[test]
    fn a_small_update_is_left_untouched() {
        let mut v = vec![0.3f32, -0.4];
        let r = clip_l2(&mut v, 1.0);
        assert_eq!(r.scale, 1.0);
        assert!((r.norm_before - 0.5).abs() < 1e-7);
        assert_eq!(v, vec![0.3, -0.4]);
    }

    #[test]
    fn a_large_update_is_scaled_onto_the_ball() {
        let mut v = vec![3.0f32, 4.0];
        let r = clip_l2(&mut v, 1.0);
        assert!(r.clipped());
        assert!((r.norm_before - 5.0).abs() < 1e-12);
        assert!((f64::from(v[0]) - 0.6).abs() < 1e-5 && (f64::from(v[1]) - 0.8).abs() < 1e-5);
    }

    #[test]
    fn a_mismatched_manifest_is_refused() {
        let mut v = vec![0.0f32; 3];
        assert!(matches!(
            clip_per_layer(&mut v, &manifest(), 1.0, &LayerBudget::Equal),
            Err(PrivacyError::LengthMismatch { .. })
        ));
    }
}
