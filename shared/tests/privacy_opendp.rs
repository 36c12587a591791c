//! OpenDP 0.16 as an independent oracle: its exact CKS sampler and its zCDP → (ε, δ) conversion.

mod privacy_support;

use dashu::rational::RBig;
use fedtune_shared::privacy::rdp::{gaussian_epsilon, zcdp_epsilon};
use fedtune_shared::privacy::{fill_noise, FastDiscreteGaussian, NoiseSource};
use opendp::combinators::make_zCDP_to_approxDP;
use opendp::domains::AtomDomain;
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::AbsoluteDistance;
use opendp::traits::samplers::sample_discrete_gaussian;
use privacy_support::{chi2_critical, chi2_two_sample};

fn opendp_samples(sigma: f64, n: usize) -> Vec<i64> {
    let scale = RBig::try_from(sigma).unwrap();
    (0..n).map(|_| i64::try_from(sample_discrete_gaussian(scale.clone()).unwrap()).unwrap()).collect()
}

/// OpenDP draws from the OS generator, so its half of each comparison is not seeded; the
/// threshold (p = 10⁻⁶) makes a false alarm a one-in-a-million event per σ.
#[test]
fn the_fast_sampler_is_indistinguishable_from_opendps_sampler() {
    for (i, sigma) in [0.5, 2.0, 10.0, 1000.0, 2.5e6].into_iter().enumerate() {
        let n = 60_000;
        let theirs = opendp_samples(sigma, n);
        let mut ours = vec![0i64; n];
        fill_noise(
            &FastDiscreteGaussian::new(sigma).unwrap(),
            &NoiseSource::seeded_for_tests(500 + i as u64),
            &mut ours,
        );
        let (stat, df) = chi2_two_sample(&ours, &theirs, sigma);
        assert!(stat < chi2_critical(df), "sigma={sigma}: two-sample chi2 {stat:.1} (df {df})");
    }
}

#[test]
fn the_two_sample_test_tells_a_wrong_sigma_from_opendps() {
    let n = 60_000;
    let theirs = opendp_samples(10.0, n);
    let mut ours = vec![0i64; n];
    fill_noise(&FastDiscreteGaussian::new(10.6).unwrap(), &NoiseSource::seeded_for_tests(77), &mut ours);
    let (stat, df) = chi2_two_sample(&ours, &theirs, 10.0);
    assert!(stat > chi2_critical(df), "a 6% sigma error went unnoticed: {stat}");
}

/// Full participation composes to a Gaussian, i.e. ρ-zCDP with ρ = T/(2z²): our conversion
/// agrees with OpenDP's `make_zCDP_to_approxDP`, and the exact Gaussian curve is no worse.
#[test]
fn zcdp_conversion_agrees_with_opendp() {
    for &(z, rounds, delta) in &[(1.0, 1.0, 1e-5), (1.1, 100.0, 1e-5), (4.0, 1000.0, 1e-6), (0.7, 3.0, 1e-3)]
    {
        let scale = z / f64::sqrt(rounds);
        let meas = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            AtomDomain::<i64>::default(),
            AbsoluteDistance::<i64>::default(),
            scale,
            None,
        )
        .unwrap();
        let profile = make_zCDP_to_approxDP(meas).unwrap().map(&1).unwrap();
        let theirs = profile.epsilon(delta).unwrap();
        let ours = zcdp_epsilon(rounds / (2.0 * z * z), delta);
        assert!((ours / theirs - 1.0).abs() < 1e-6, "z={z} T={rounds}: ours {ours} vs OpenDP {theirs}");
        assert!(gaussian_epsilon(scale, delta) <= ours);
    }
}
