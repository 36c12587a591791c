//! Noise in the three placements: present, of the planned variance, on the grid.

use fedtune_shared::privacy::{
    add_noise, add_noise_to_grid, clip_l2, dequantize, quantize, NoisePlacement, NoisePlan, NoiseSource,
    PrivacyError,
};

const DIM: usize = 100_000;
const CLIENTS: usize = 8;

fn client_update(i: usize) -> Vec<f32> {
    (0..DIM).map(|j| ((i * 7919 + j * 104_729) as f32 * 1e-3).sin()).collect()
}

/// Noise in the aggregate: noised sum minus the sum of the rounded clipped updates, per coordinate.
fn aggregate_noise(plan: &NoisePlan, source: &NoiseSource) -> Vec<f64> {
    let k = plan.grid_log2;
    let mut clean = vec![0i64; DIM];
    let mut noised = vec![0f64; DIM];
    for i in 0..CLIENTS {
        let mut u = client_update(i);
        clip_l2(&mut u, plan.clip_norm);
        let q = quantize(&u, k).unwrap();
        for (c, v) in clean.iter_mut().zip(&q) {
            *c += v;
        }
        if plan.client_adds_noise() {
            add_noise(&mut u, plan.party_sigma(), k, source).unwrap();
        } else {
            u = dequantize(&q, k).unwrap();
        }
        for (n, v) in noised.iter_mut().zip(&u) {
            *n += f64::from(*v);
        }
    }
    let mut noised32: Vec<f32> = noised.iter().map(|&x| x as f32).collect();
    if plan.coordinator_adds_noise() {
        add_noise(&mut noised32, plan.party_sigma(), k, source).unwrap();
    }
    let step = 2f64.powi(k);
    noised32.iter().zip(&clean).map(|(n, c)| f64::from(*n) - *c as f64 * step).collect()
}

fn variance(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n
}

#[test]
fn every_placement_puts_the_planned_noise_into_the_aggregate() {
    let source = NoiseSource::seeded_for_tests(11);
    for (placement, copies) in [
        (NoisePlacement::Central, 1.0),
        (NoisePlacement::Local, CLIENTS as f64),
        (NoisePlacement::Distributed, 1.0),
    ] {
        let plan = NoisePlan::new(placement, 0.01, 1.0, DIM, CLIENTS as f64).unwrap();
        let per_sum = plan.noise_multiplier * plan.sensitivity();
        let expected = copies * per_sum * per_sum;
        let measured = variance(&aggregate_noise(&plan, &source));
        // Relative standard error of a variance over 10^5 coordinates is 0.45 %.
        assert!(
            (measured / expected - 1.0).abs() < 0.03,
            "{placement:?}: variance {measured:e}, expected {expected:e}"
        );
    }
}

#[test]
fn noised_values_stay_on_the_grid_and_differ_from_the_input() {
    let source = NoiseSource::seeded_for_tests(12);
    let original = client_update(0);
    let mut v = original.clone();
    let report = add_noise(&mut v, 0.5, -10, &source).unwrap();
    assert_eq!(report.sigma_grid, 512.0);
    assert!(v.iter().all(|x| (f64::from(*x) * 1024.0).fract() == 0.0));
    let changed = v.iter().zip(&original).filter(|(a, b)| a != b).count();
    assert!(changed > DIM * 99 / 100);
}

#[test]
fn a_value_off_the_grid_is_refused_and_nothing_is_noised() {
    let source = NoiseSource::seeded_for_tests(13);
    let mut v = vec![1.0f32, f32::INFINITY, 2.0];
    assert!(matches!(add_noise(&mut v, 1.0, -8, &source), Err(PrivacyError::GridOverflow { index: 1, .. })));
    assert_eq!(v[0], 1.0);
    let mut ints = vec![0i64, 1 << 62];
    assert!(add_noise_to_grid(&mut ints, 3.0, &source).is_err());
    assert_eq!(ints[0], 0);
}

#[test]
fn integer_noise_has_the_requested_spread() {
    let source = NoiseSource::seeded_for_tests(14);
    let mut ints = vec![5i64; 400_000];
    add_noise_to_grid(&mut ints, 300.0, &source).unwrap();
    let as_f: Vec<f64> = ints.iter().map(|&x| x as f64).collect();
    assert!((variance(&as_f) / 90_000.0 - 1.0).abs() < 0.02);
    assert!((as_f.iter().sum::<f64>() / as_f.len() as f64 - 5.0).abs() < 3.0);
}

#[test]
fn a_plan_the_sampler_cannot_serve_is_refused() {
    assert!(NoisePlan::new(NoisePlacement::Central, 0.0, 1.0, 10, 5.0).is_err());
    assert!(NoisePlan::new(NoisePlacement::Central, 1.0, 1.0, 10, 0.5).is_err());
    let plan = NoisePlan::new(NoisePlacement::Central, 1e6, 1.0, 10, 5.0).unwrap();
    assert!(plan.with_grid_log2(-40).is_err());
}
