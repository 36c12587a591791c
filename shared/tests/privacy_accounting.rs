//! The accountant: soundness properties, ledger replay, budget look-ahead and calibration.

use fedtune_shared::privacy::rdp::gaussian_delta;
use fedtune_shared::privacy::{
    calibrate, calibrate_for, epsilon_for_rounds, epsilon_unamplified, epsilon_unamplified_composed,
    Accountant, Adjacency, NoisePlacement, NoisePlan, PrivacyError, PrivacyLedgerEntry, SamplingScheme,
};
use proptest::prelude::*;

fn entry(round: u64, sampling: SamplingScheme, q: f64, z: f64) -> PrivacyLedgerEntry {
    PrivacyLedgerEntry {
        round,
        sampling,
        placement: NoisePlacement::Central,
        sampling_rate: q,
        noise_multiplier: z,
        clip_norm: 1.0,
        sampled: 10,
        reported: 10,
        delta: 0.0,
        epsilon_after: 0.0,
    }
}

fn poisson_eps(q: f64, z: f64, rounds: u64) -> f64 {
    epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Poisson, q, z, rounds, 1e-5).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn epsilon_never_decreases_with_more_rounds(q in 1e-3f64..0.5, z in 0.5f64..5.0, t in 1u64..500) {
        prop_assert!(poisson_eps(q, z, t) <= poisson_eps(q, z, t + 1 + t / 3) * (1.0 + 1e-12));
    }

    #[test]
    fn epsilon_never_decreases_with_a_higher_sampling_rate(q in 1e-3f64..0.5, z in 0.5f64..5.0, t in 1u64..300) {
        prop_assert!(poisson_eps(q, z, t) <= poisson_eps((q * 1.3).min(1.0), z, t) * (1.0 + 1e-12));
    }

    #[test]
    fn epsilon_never_increases_with_more_noise(q in 1e-3f64..1.0, z in 0.5f64..5.0, t in 1u64..300) {
        prop_assert!(poisson_eps(q, z * 1.2, t) <= poisson_eps(q, z, t) * (1.0 + 1e-12));
    }

    #[test]
    fn recorded_rounds_match_the_closed_form_composition(q in 1e-3f64..0.2, z in 0.6f64..3.0, t in 1u64..40) {
        let mut acc = Accountant::new(1e-5, Adjacency::AddRemove).unwrap();
        let mut last = 0.0;
        for r in 0..t {
            let e = acc.record(entry(r, SamplingScheme::Poisson, q, z)).unwrap();
            prop_assert!(e.epsilon_after >= last);
            last = e.epsilon_after;
        }
        prop_assert!((acc.epsilon() / poisson_eps(q, z, t) - 1.0).abs() < 1e-9);
    }
}

#[test]
fn unamplified_rounds_with_mixed_multipliers_compose_as_the_accountant_records_them() {
    let zs = [1.0, 0.8, 1.3, 1.0, 0.95, 2.0];
    let mut acc = Accountant::new(1e-5, Adjacency::AddRemove).unwrap();
    for (r, z) in zs.iter().enumerate() {
        acc.record(entry(r as u64, SamplingScheme::Full, 1.0, *z)).unwrap();
    }
    let inverse_variance: f64 = zs.iter().map(|z| z.powi(-2)).sum();
    let composed = epsilon_unamplified_composed(inverse_variance, 1e-5).unwrap();
    assert!((composed / acc.epsilon() - 1.0).abs() < 1e-9, "{composed} vs {}", acc.epsilon());
}

#[test]
fn unamplified_composition_of_equal_multipliers_reproduces_the_reference_17_86() {
    // The reference: z = 1, δ = 1e-5, a client drawn into 10 rounds.
    let composed = epsilon_unamplified_composed(10.0, 1e-5).unwrap();
    assert_eq!(format!("{composed:.2}"), "17.86");
    assert!((composed / epsilon_unamplified(1.0, 10, 1e-5).unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(epsilon_unamplified_composed(0.0, 1e-5).unwrap(), 0.0);
    // A lower multiplier in one round (more of the noise spent elsewhere) raises ε.
    assert!(epsilon_unamplified_composed(9.0 + 0.9f64.powi(-2), 1e-5).unwrap() > composed);
}

#[test]
fn the_look_ahead_equals_what_recording_the_round_gives() {
    let mut acc = Accountant::new(1e-5, Adjacency::AddRemove).unwrap();
    for r in 0..20 {
        let predicted = acc.epsilon_if(SamplingScheme::Poisson, 0.01, 1.1).unwrap();
        let recorded = acc.record(entry(r, SamplingScheme::Poisson, 0.01, 1.1)).unwrap();
        assert_eq!(predicted, recorded.epsilon_after);
    }
    assert_eq!(acc.rounds(), 20);
}

#[test]
fn a_ledger_survives_serialisation_and_replay() {
    let mut acc = Accountant::new(1e-6, Adjacency::AddRemove).unwrap();
    let mut ledger = vec![];
    for r in 0..30 {
        let z = if r % 3 == 0 { 0.9 } else { 1.4 };
        ledger.push(acc.record(entry(r, SamplingScheme::Poisson, 0.02, z)).unwrap());
    }
    let json = serde_json::to_string(&ledger).unwrap();
    let back: Vec<PrivacyLedgerEntry> = serde_json::from_str(&json).unwrap();
    let rebuilt = Accountant::from_entries(1e-6, Adjacency::AddRemove, &back).unwrap();
    assert_eq!(rebuilt.epsilon(), acc.epsilon());
    assert_eq!(rebuilt.rounds(), 30);
    assert!(json.contains("\"sampling\":\"poisson\"") && json.contains("\"placement\":\"central\""));
}

#[test]
fn a_ledger_that_under_reports_epsilon_is_refused() {
    let mut acc = Accountant::new(1e-5, Adjacency::AddRemove).unwrap();
    let mut ledger: Vec<_> =
        (0..5).map(|r| acc.record(entry(r, SamplingScheme::Poisson, 0.1, 1.0)).unwrap()).collect();
    ledger[3].epsilon_after *= 0.5;
    assert!(matches!(
        Accountant::from_entries(1e-5, Adjacency::AddRemove, &ledger),
        Err(PrivacyError::Ledger { round: 3, .. })
    ));
    let mut reordered = ledger.clone();
    reordered.swap(1, 2);
    assert!(Accountant::from_entries(1e-5, Adjacency::AddRemove, &reordered).is_err());
    assert!(Accountant::from_entries(1e-6, Adjacency::AddRemove, &ledger[..1]).is_err(), "delta must match");
}

#[test]
fn fixed_size_cohorts_are_never_accounted_as_poisson_samples() {
    let acc = Accountant::new(1e-5, Adjacency::AddRemove).unwrap();
    assert!(acc.epsilon_if(SamplingScheme::FixedSize, 0.01, 1.0).is_err());
    let replace = Accountant::new(1e-5, Adjacency::ReplaceOne).unwrap();
    assert!(replace.epsilon_if(SamplingScheme::Poisson, 0.01, 1.0).is_err());
    // Replace-one doubles the sensitivity: the same q and z cost more than Poisson add/remove.
    let fixed =
        epsilon_for_rounds(Adjacency::ReplaceOne, SamplingScheme::FixedSize, 0.01, 1.0, 100, 1e-5).unwrap();
    let poisson = poisson_eps(0.01, 1.0, 100);
    assert!(fixed > poisson, "fixed {fixed} vs poisson {poisson}");
    // And amplification still helps: it is below the unamplified (q = 1) replace-one cost.
    let full = epsilon_for_rounds(Adjacency::ReplaceOne, SamplingScheme::Full, 1.0, 1.0, 100, 1e-5).unwrap();
    assert!(fixed < full);
}

#[test]
fn full_participation_reports_the_exact_gaussian_curve() {
    let (z, t, delta) = (2.0, 50u64, 1e-5);
    let eps = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Full, 1.0, z, t, delta).unwrap();
    let z_total = z / (t as f64).sqrt();
    // The composition of t Gaussians is one Gaussian: ε is where its exact δ(ε) meets δ.
    assert!((gaussian_delta(z_total, eps) - delta).abs() < 1e-3 * delta);
    let rho = t as f64 / (2.0 * z * z);
    assert!(eps < rho + 2.0 * (rho * (1.0f64 / delta).ln()).sqrt());
}

#[test]
fn dropped_clients_never_lower_the_reported_epsilon() {
    let mut a = Accountant::new(1e-5, Adjacency::AddRemove).unwrap();
    let mut b = Accountant::new(1e-5, Adjacency::AddRemove).unwrap();
    for r in 0..10 {
        a.record(entry(r, SamplingScheme::Poisson, 0.05, 1.0)).unwrap();
        let mut dropped = entry(r, SamplingScheme::Poisson, 0.05, 1.0);
        dropped.reported = 2;
        b.record(dropped).unwrap();
    }
    assert_eq!(a.epsilon(), b.epsilon(), "realised counts are not used");
    // Under distributed noise dropouts take noise shares with them: the round costs more.
    let plan = NoisePlan::new(NoisePlacement::Distributed, 1.0, 1.0, 10_000, 100.0).unwrap();
    let z_all = plan.effective_noise_multiplier(100);
    let z_half = plan.effective_noise_multiplier(50);
    assert!((z_all - 1.0).abs() < 1e-9 && (z_half - 0.5f64.sqrt()).abs() < 1e-9, "{z_all} {z_half}");
    assert!(poisson_eps(0.05, z_half, 10) > poisson_eps(0.05, z_all, 10));
}

#[test]
fn calibration_finds_the_smallest_sufficient_multiplier() {
    let (q, t, delta) = (256.0 / 60000.0, 60 * 234, 1e-5);
    let target = poisson_eps(q, 1.1, t);
    let z = calibrate(target, delta, t, q).unwrap();
    assert!((z / 1.1 - 1.0).abs() < 1e-6, "{z}");
    assert!(poisson_eps(q, z, t) <= target);
    assert!(poisson_eps(q, z * (1.0 - 1e-6), t) > target);
    let z_full = calibrate(1.0, 1e-6, 10, 1.0).unwrap();
    let e = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Full, 1.0, z_full, 10, 1e-6).unwrap();
    assert!(e <= 1.0 && e > 0.999);
    let z_fixed =
        calibrate_for(2.0, 1e-5, 100, 0.01, SamplingScheme::FixedSize, Adjacency::ReplaceOne).unwrap();
    assert!(z_fixed > calibrate(2.0, 1e-5, 100, 0.01).unwrap());
    assert!(calibrate(-1.0, 1e-5, 10, 0.1).is_err());
}

/// tensorflow_privacy's sanity check: treating subsampling as scaling the noise by 1/q
/// gives a *lower* bound on δ (Dong, Roth & Su's CLT), which must not exceed the target δ.
#[test]
fn reported_epsilons_respect_the_clt_lower_bound() {
    for &(n, batch, z, epochs, delta) in &[
        (60000.0, 150.0, 1.3, 15.0, 1e-5),
        (100000.0, 100.0, 1.0, 30.0, 1e-7),
        (60000.0, 256.0, 1.1, 60.0, 1e-5),
    ] {
        let q: f64 = batch / n;
        let steps = (epochs * n / batch).ceil();
        let eps = poisson_eps(q, z, steps as u64);
        let sigma = z * f64::sqrt(steps) / q;
        let low_delta = gaussian_delta(sigma, eps);
        assert!(low_delta <= delta, "eps {eps} is below the CLT lower bound");
    }
}
