//! Adaptive clipping to a norm quantile (Andrew, Thakkar, McMahan & Ramaswamy, 2021).
//!
//! Each participating client reports, besides its update, the centred indicator
//! `bᵢ − ½ ∈ {−½, +½}` where `bᵢ = [‖Δᵢ‖ ≤ C]`. The coordinator adds `N(0, σ_b²)` to their sum
//! and estimates the fraction of unclipped clients with the *fixed* denominator `n̄`:
//! `b̃ = (Σ(bᵢ − ½) + N(0, σ_b²))/n̄ + ½`, then updates `C ← C·exp(−η(b̃ − γ))` (geometric
//! update), moving `C` towards the `γ`-quantile of update norms.
//!
//! One client changes the centred sum by at most ½, so the count is a Gaussian mechanism with
//! noise multiplier `2σ_b`. Updates and count are released together; two Gaussian mechanisms
//! on the same data compose like one with `z = (z_Δ⁻² + (2σ_b)⁻²)^(−½)` (RDP of a Gaussian is
//! `α/2z²`, and RDPs add). To keep a target `z` for the round, the update noise must use
//! `z_Δ = (z⁻² − (2σ_b)⁻²)^(−½)` ([`AdaptiveClip::update_noise_multiplier`]); the paper's
//! Section 3 makes the same argument. The centred ±½ values sit exactly on the grid 2⁻¹, so the
//! count is noised there without rounding and without widening.

use super::noise::NoisePlacement;

/// Name of the upload metric that carries a client's (noised) centred clipping indicator: the
/// client's update pipeline writes it, the coordinator's adaptive clipping sums it.
pub const CLIP_INDICATOR_METRIC: &str = "dp_clip_indicator";

/// The per-client upload metrics that are part of the DP mechanism: the (noised) clipping
/// indicator, and nothing else. Under DP the coordinator keeps only these, so a client that
/// sends a loss or a pre-clip norm anyway does not get it stored, summed or shown.
pub fn mechanism_metrics(
    metrics: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    metrics
        .iter()
        .filter(|(k, _)| k.as_str() == CLIP_INDICATOR_METRIC)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

use super::sampler::{FastDiscreteGaussian, NoiseSampler, NoiseSource};
use super::PrivacyError;

/// State of the adaptive clip bound.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveClip {
    clip_norm: f64,
    target_quantile: f64,
    learning_rate: f64,
    count_noise_std: f64,
}

impl AdaptiveClip {
    /// Starts at `initial_clip`, aiming at quantile `target_quantile ∈ (0, 1)` with geometric
    /// learning rate `learning_rate > 0` and count noise std `count_noise_std > 0`.
    pub fn new(
        initial_clip: f64,
        target_quantile: f64,
        learning_rate: f64,
        count_noise_std: f64,
    ) -> Result<Self, PrivacyError> {
        let bad =
            |what: &str, v: f64| Err(PrivacyError::InvalidParameter(format!("adaptive clip {what} {v}")));
        if !(initial_clip.is_finite() && initial_clip > 0.0) {
            return bad("initial clip", initial_clip);
        }
        if !(target_quantile > 0.0 && target_quantile < 1.0) {
            return bad("target quantile", target_quantile);
        }
        if !(learning_rate.is_finite() && learning_rate > 0.0) {
            return bad("learning rate", learning_rate);
        }
        if !(count_noise_std.is_finite() && count_noise_std > 0.0) {
            return bad("count noise std", count_noise_std);
        }
        Ok(Self { clip_norm: initial_clip, target_quantile, learning_rate, count_noise_std })
    }

    /// The current clip bound `C`.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// Std `σ_b` of the noise on the indicator sum.
    pub fn count_noise_std(&self) -> f64 {
        self.count_noise_std
    }

    /// Noise multiplier of the count mechanism alone: `2σ_b` (sensitivity ½).
    pub fn count_noise_multiplier(&self) -> f64 {
        2.0 * self.count_noise_std
    }

    /// The centred indicator a client reports for an update of norm `norm_before` (+½ when
    /// unclipped, −½ when clipped).
    pub fn indicator(&self, norm_before: f64) -> f64 {
        if norm_before <= self.clip_norm {
            0.5
        } else {
            -0.5
        }
    }

    /// Noise std each party adds to the indicator sum under `placement` with `expected_clients`.
    pub fn count_party_sigma(&self, placement: NoisePlacement, expected_clients: f64) -> f64 {
        match placement {
            NoisePlacement::Central | NoisePlacement::Local => self.count_noise_std,
            NoisePlacement::Distributed => self.count_noise_std / expected_clients.max(1.0).sqrt(),
        }
    }

    /// Adds `N(0, σ²)` (exact discrete Gaussian on the grid ½ℤ) to a sum of centred indicators
    /// (a multiple of ½), as the coordinator does under central noise.
    pub fn noise_indicator_sum(
        &self,
        centred_sum: f64,
        sigma: f64,
        source: &NoiseSource,
    ) -> Result<f64, PrivacyError> {
        let twice = centred_sum * 2.0;
        if twice.fract() != 0.0 || !twice.is_finite() || twice.abs() > 2f64.powi(52) {
            return Err(PrivacyError::InvalidParameter(format!(
                "indicator sum {centred_sum} is not a multiple of 1/2"
            )));
        }
        let sampler = FastDiscreteGaussian::new(sigma * 2.0)?;
        let noise = sampler.sample(&mut source.next_draw().stream(0));
        Ok((twice + noise as f64) / 2.0)
    }

    /// Applies one round's noised centred indicator sum; returns the new clip bound.
    pub fn update(&mut self, noised_centred_sum: f64, expected_clients: f64) -> Result<f64, PrivacyError> {
        if !(expected_clients.is_finite() && expected_clients >= 1.0 && noised_centred_sum.is_finite()) {
            return Err(PrivacyError::InvalidParameter(format!(
                "adaptive clip update with sum {noised_centred_sum} over {expected_clients} clients"
            )));
        }
        let unclipped_fraction = noised_centred_sum / expected_clients + 0.5;
        self.clip_norm *= (-self.learning_rate * (unclipped_fraction - self.target_quantile)).exp();
        Ok(self.clip_norm)
    }

    /// Update-noise multiplier `z_Δ = (z⁻² − (2σ_b)⁻²)^(−½)` that keeps the round at `z_total`;
    /// an error when the count alone already spends the budget (`2σ_b ≤ z_total`).
    pub fn update_noise_multiplier(&self, z_total: f64) -> Result<f64, PrivacyError> {
        let zb = self.count_noise_multiplier();
        let rest = z_total.powi(-2) - zb.powi(-2);
        if z_total.is_nan() || z_total <= 0.0 || rest <= 0.0 {
            return Err(PrivacyError::InvalidParameter(format!(
                "count noise multiplier {zb} leaves nothing of the round's z = {z_total}"
            )));
        }
        Ok(rest.powf(-0.5))
    }

    /// The round's combined multiplier `(z_Δ⁻² + (2σ_b)⁻²)^(−½)`, the value to account.
    pub fn combined_noise_multiplier(&self, z_update: f64) -> f64 {
        (z_update.powi(-2) + self.count_noise_multiplier().powi(-2)).powf(-0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_clipping_indicator_is_a_mechanism_metric() {
        let sent = std::collections::BTreeMap::from([
            (CLIP_INDICATOR_METRIC.to_string(), 0.5),
            ("train_loss".to_string(), 0.1),
            ("l2_norm".to_string(), 3.0),
        ]);
        assert_eq!(
            mechanism_metrics(&sent).into_iter().collect::<Vec<_>>(),
            vec![(CLIP_INDICATOR_METRIC.to_string(), 0.5)]
        );
    }

    #[test]
    fn splitting_and_combining_the_multiplier_round_trips() {
        let a = AdaptiveClip::new(1.0, 0.5, 0.2, 10.0).unwrap();
        let z_update = a.update_noise_multiplier(1.1).unwrap();
        assert!(z_update > 1.1);
        assert!((a.combined_noise_multiplier(z_update) - 1.1).abs() < 1e-12);
    }

    #[test]
    fn a_count_noise_too_small_for_the_budget_is_refused() {
        let a = AdaptiveClip::new(1.0, 0.5, 0.2, 0.5).unwrap();
        assert!(a.update_noise_multiplier(1.0).is_err());
    }

    #[test]
    fn the_clip_bound_moves_towards_the_target_quantile() {
        // 100 clients, norms 0.01..1.00: the median is about 0.5.
        let norms: Vec<f64> = (1..=100).map(|i| f64::from(i) / 100.0).collect();
        let source = NoiseSource::seeded_for_tests(3);
        let mut a = AdaptiveClip::new(5.0, 0.5, 0.2, 1.0).unwrap();
        for _ in 0..300 {
            let sum: f64 = norms.iter().map(|n| a.indicator(*n)).sum();
            let noised = a.noise_indicator_sum(sum, a.count_noise_std(), &source).unwrap();
            a.update(noised, 100.0).unwrap();
        }
        assert!((a.clip_norm() - 0.5).abs() < 0.1, "clip ended at {}", a.clip_norm());
    }
}
