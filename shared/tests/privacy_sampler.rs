//! The exact discrete Gaussian samplers against the exact pmf, and the randomness plumbing.

mod privacy_support;

use fedtune_shared::privacy::{
    fill_noise, CksDiscreteGaussian, FastDiscreteGaussian, NoiseSampler, NoiseSource, CHUNK_LEN,
};
use privacy_support::{chi2_critical, chi2_vs_exact};

fn draw<S: NoiseSampler>(sampler: &S, n: usize, seed: u64) -> Vec<i64> {
    let mut out = vec![0i64; n];
    fill_noise(sampler, &NoiseSource::seeded_for_tests(seed), &mut out);
    out
}

fn assert_fits(samples: &[i64], sigma: f64, what: &str) {
    let (stat, df) = chi2_vs_exact(samples, sigma);
    let crit = chi2_critical(df);
    assert!(stat < crit, "{what} at sigma={sigma}: chi2 {stat:.1} >= {crit:.1} (df {df})");
}

#[test]
fn the_fast_sampler_matches_the_exact_pmf_from_tiny_to_huge_sigma() {
    for (i, sigma) in [0.5, 2.0, 10.0, 100.0, 3000.0, 1.0e5, 3.7e8].into_iter().enumerate() {
        let sampler = FastDiscreteGaussian::new(sigma).unwrap();
        let samples = draw(&sampler, 1_000_000, 100 + i as u64);
        assert_fits(&samples, sigma, "fast sampler");
        assert!(samples.iter().all(|s| s.unsigned_abs() < sampler.support_bound()));
    }
}

#[test]
fn the_fast_sampler_has_the_discrete_gaussian_variance() {
    let sigma = 1.0e6;
    let samples = draw(&FastDiscreteGaussian::new(sigma).unwrap(), 1_000_000, 7);
    let n = samples.len() as f64;
    let mean = samples.iter().map(|&s| s as f64).sum::<f64>() / n;
    let var = samples.iter().map(|&s| (s as f64 - mean).powi(2)).sum::<f64>() / n;
    // Standard errors: mean σ/1000, variance σ²·√(2/n) ≈ 0.14 %.
    assert!(mean.abs() < 5.0 * sigma / 1000.0, "mean {mean}");
    assert!((var / (sigma * sigma) - 1.0).abs() < 0.01, "variance ratio {}", var / (sigma * sigma));
}

#[test]
fn the_arbitrary_precision_acceptance_path_alone_is_also_exact() {
    for (i, sigma) in [0.7, 2.0, 150.0].into_iter().enumerate() {
        let sampler = FastDiscreteGaussian::new(sigma).unwrap().with_exact_path_only();
        let samples = draw(&sampler, 20_000, 200 + i as u64);
        assert_fits(&samples, sigma, "exact-path-only sampler");
    }
}

#[test]
fn the_cks_reference_sampler_matches_the_exact_pmf() {
    for (i, sigma) in [0.5, 3.0, 40.0, 5000.0].into_iter().enumerate() {
        let samples = draw(&CksDiscreteGaussian::new(sigma).unwrap(), 100_000, 300 + i as u64);
        assert_fits(&samples, sigma, "CKS sampler");
    }
}

#[test]
fn the_distribution_test_detects_a_two_percent_error_in_sigma() {
    // The χ² check must be able to fail: samples at 1.02σ are rejected as N_Z(0, σ²).
    for sigma in [2.0, 10.0, 1.0e5] {
        let samples = draw(&FastDiscreteGaussian::new(sigma * 1.02).unwrap(), 1_000_000, 9);
        let (stat, df) = chi2_vs_exact(&samples, sigma);
        assert!(stat > chi2_critical(df), "a 2% sigma error went unnoticed at sigma={sigma}: {stat}");
    }
}

#[test]
fn invalid_sigmas_are_refused_and_zero_sigma_adds_nothing() {
    for bad in [-1.0, f64::NAN, f64::INFINITY, 2e12] {
        assert!(FastDiscreteGaussian::new(bad).is_err());
        assert!(CksDiscreteGaussian::new(bad).is_err());
    }
    assert!(draw(&FastDiscreteGaussian::new(0.0).unwrap(), 1000, 1).iter().all(|&s| s == 0));
}

#[test]
fn a_test_seed_reproduces_its_noise_whatever_the_thread_count() {
    let sampler = FastDiscreteGaussian::new(1234.5).unwrap();
    let n = 5 * CHUNK_LEN + 17;
    let mut one = vec![0i64; n];
    let mut four = vec![0i64; n];
    fill_noise(&sampler, &NoiseSource::seeded_for_tests(42).with_threads(1), &mut one);
    fill_noise(&sampler, &NoiseSource::seeded_for_tests(42).with_threads(4), &mut four);
    assert_eq!(one, four);
    let source = NoiseSource::seeded_for_tests(42);
    assert!(source.is_seeded_for_tests());
    let mut first = vec![0i64; n];
    let mut second = vec![0i64; n];
    fill_noise(&sampler, &source, &mut first);
    fill_noise(&sampler, &source, &mut second);
    assert_eq!(first, one, "the first draw of a seed is reproducible");
    assert_ne!(first, second, "successive draws of one source never repeat");
    // Chunks get distinct streams: no chunk repeats another.
    assert_ne!(first[..CHUNK_LEN], first[CHUNK_LEN..2 * CHUNK_LEN]);
}

#[test]
fn os_seeded_sources_are_unpredictable() {
    let sampler = FastDiscreteGaussian::new(1.0e6).unwrap();
    let a = NoiseSource::from_os_entropy().unwrap();
    let b = NoiseSource::from_os_entropy().unwrap();
    assert!(!a.is_seeded_for_tests());
    let (mut x, mut y) = (vec![0i64; 64], vec![0i64; 64]);
    fill_noise(&sampler, &a, &mut x);
    fill_noise(&sampler, &b, &mut y);
    assert_ne!(x, y);
    assert!(!format!("{a:?}").contains("master"), "the key must stay out of Debug output");
}
