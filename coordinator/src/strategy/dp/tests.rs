//! The DP decorator's specification: denominators, noise, accounting and refusals.

use super::*;
use crate::aggregate::FixedPointSum;
use crate::outcome::ParticipantOutcome;
use crate::settings::PrivacySettings;
use crate::storage::ledger::Exposure;
use crate::strategy::{FedAvg, FitSummary};
use fedtune_shared::ids::{ClientId, RoundId};
use fedtune_shared::params::{Manifest, TensorSpec};
use fedtune_shared::privacy::{epsilon_for_rounds, Adjacency};
use std::collections::BTreeMap;

const DIM: usize = 100_000;

fn settings(mode: DpMode, sampling: SamplingSettings, target: Option<f64>) -> CoordinatorSettings {
    let mut s = CoordinatorSettings::with_paths("/unused", "/unused");
    s.sampling = sampling;
    s.privacy = PrivacySettings {
        mode,
        noise_multiplier: Some(1.0),
        clip_norm: 1.0,
        target_epsilon: target,
        ..PrivacySettings::default()
    };
    s
}

fn dp(s: &CoordinatorSettings) -> DpStrategy {
    DpStrategy::with_noise_source(
        Box::new(FedAvg::new(1.0, 0.0)),
        s,
        DIM,
        &[],
        NoiseSource::seeded_for_tests(5),
    )
    .unwrap()
}

fn manifest() -> Manifest {
    Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![DIM] }]).unwrap()
}

#[test]
fn the_denominator_is_the_public_cohort_size_not_the_realised_sample_size() {
    // A fixed-size cohort's size is a function of the settings and the (public) live count:
    // five asked for, ten live: 5; three live: all three.
    let fixed = dp(&settings(DpMode::Central, SamplingSettings::Fixed { count: 5 }, None));
    assert_eq!(fixed.rate_and_denominator(3, 3).1, 3.0);
    assert_eq!(fixed.rate_and_denominator(10, 5).1, 5.0);
    let poisson = dp(&settings(DpMode::Central, SamplingSettings::Poisson { rate: 0.5 }, None));
    assert_eq!(poisson.rate_and_denominator(10, 7).1, 5.0);
}

fn base() -> FitInstructions {
    FitInstructions {
        epochs: 1,
        batch_size: 8,
        learning_rate: 1e-3,
        proximal_mu: 0.0,
        max_steps: None,
        seed: 0,
        lr_schedule: fedtune_shared::schedule::LrSchedule::Constant,
        warmup_steps: 0,
        update_encoding: Default::default(),
    }
}

/// `reported` clients each sent the update `value` in every coordinate, folded with weight 1.
fn results(value: f32, reported: usize) -> FitResults {
    let mut sum = FixedPointSum::new(DIM);
    let update = vec![value; DIM];
    for _ in 0..reported {
        sum.fold_values(&update, 1, 1.0);
    }
    let clients = (0..reported)
        .map(|i| FitSummary {
            client: ClientId::parse(&format!("c{i}")).unwrap(),
            num_examples: 1,
            weight: 1,
            metrics: BTreeMap::new(),
        })
        .collect();
    FitResults::new(sum, manifest(), clients)
}

fn draw(round: u64, candidates: usize, selected: usize) -> Draw {
    Draw {
        round: RoundId::new(round, 0),
        candidates,
        selected,
        exposures: Exposures::default(),
        secure: None,
    }
}

/// What the records show of a client drawn into `participations` attempts at multiplier `z`.
fn seen(participations: u64, z: f64) -> Exposure {
    Exposure { participations, inverse_variance: participations as f64 * z.powi(-2), unrecorded: 0 }
}

/// Aggregates and books the round, as the actor does once the weights are accepted.
fn aggregate_and_charge(
    dp: &mut DpStrategy,
    plan: &FitPlan,
    results: FitResults,
    failures: &[FitFailure],
) -> (ParameterVector, LedgerRecord) {
    let out = dp
        .aggregate_fit(&plan.context, &ParameterVector::zeros(manifest()), results, failures)
        .unwrap()
        .unwrap();
    let record = out.charge.expect("a DP round charges privacy");
    dp.charge(&record).unwrap();
    (out.params, record)
}

fn moments(v: &[f32], centre: f64) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|x| f64::from(*x) - centre).sum::<f64>() / n;
    let var = v.iter().map(|x| (f64::from(*x) - centre - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn a_fraction_cohorts_denominator_counts_the_min_fit_floor_the_draw_applies() {
    // fraction = 0.1 of 10 live clients is one, but the draw takes min_fit = 3: n̄ is the size of
    // the cohort actually drawn, max(min_fit, ⌈fraction·N⌉), never more than N.
    let mut s = settings(DpMode::Central, SamplingSettings::Fraction { fraction: 0.1 }, None);
    s.rounds.min_fit = 3;
    let strategy = dp(&s);
    let candidates: Vec<ClientId> = (0..10).map(|i| ClientId::parse(&format!("c{i}")).unwrap()).collect();
    let drawn = crate::sampling::sample(&s.sampling, s.rounds.min_fit, &candidates, [7; 32]).len();
    assert_eq!(drawn, 3);
    assert_eq!(strategy.rate_and_denominator(10, drawn), (0.3, 3.0));
    // Above the floor, ⌈fraction·N⌉; and never more than the live clients.
    assert_eq!(strategy.rate_and_denominator(45, 5).1, 5.0);
    assert_eq!(strategy.rate_and_denominator(2, 2).1, 2.0);
    // The round's plan carries it to the aggregation.
    let mut strategy = strategy;
    let plan = strategy.configure_fit(&draw(1, 10, 3), &base()).unwrap();
    assert_eq!(plan.context.privacy.as_ref().unwrap().expected_clients(), 3.0);
}

#[test]
fn central_noise_lands_on_the_sum_and_the_average_uses_the_fixed_denominator() {
    let s = settings(DpMode::Central, SamplingSettings::Poisson { rate: 0.5 }, None);
    let mut dp = dp(&s);
    let plan = dp.configure_fit(&draw(1, 20, 9), &base()).unwrap();
    assert_eq!(plan.privacy.mode, PrivacyMode::Central);
    assert_eq!(plan.privacy.noise_stddev, 0.0, "clients add no noise under central DP");
    // 8 of the 9 sampled reported; n̄ = q·N = 10 regardless.
    let (next, row) = aggregate_and_charge(&mut dp, &plan, results(1e-3, 8), &[]);
    let (mean, std) = moments(next.values(), 8.0 * 1e-3 / 10.0);
    // σ = z·C'/n̄ with C' a hair above C = 1.
    assert!((std / 0.1 - 1.0).abs() < 0.01, "std {std}");
    assert!(mean.abs() < 5.0 * 0.1 / (DIM as f64).sqrt(), "mean offset {mean}");
    let lib = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Poisson, 0.5, 1.0, 1, 1e-5).unwrap();
    assert_eq!(row.entry.epsilon_after, lib);
    assert_eq!(row.entry.sampling_rate, 0.5);
    assert_eq!(dp.privacy_monitor().unwrap().snapshot().epsilon, lib);
}

#[test]
fn local_noise_is_announced_to_clients_and_not_added_again() {
    let s = settings(DpMode::Local, SamplingSettings::Fraction { fraction: 1.0 }, None);
    let mut dp = dp(&s);
    let plan = dp.configure_fit(&draw(1, 4, 4), &base()).unwrap();
    assert_eq!(plan.privacy.mode, PrivacyMode::Local);
    assert!(plan.privacy.noise_stddev > 1.0 && plan.privacy.noise_stddev < 1.001);
    assert!(plan.privacy.grid_log2.is_some());
    let (next, _) = aggregate_and_charge(&mut dp, &plan, results(0.25, 4), &[]);
    // Sum 4·0.25 over n̄ = 4: exactly the mean, no coordinator noise.
    assert!(next.values().iter().all(|v| *v == 0.25));
}

#[test]
fn an_update_beyond_the_bound_is_scaled_onto_it_under_central_noise() {
    let s = settings(DpMode::Central, SamplingSettings::Fraction { fraction: 1.0 }, None);
    let mut dp = dp(&s);
    let plan = dp.configure_fit(&draw(1, 3, 3), &base()).unwrap();
    let stats = |n: f64| UploadStats { client: ClientId::parse("a").unwrap(), num_examples: 500, l2_norm: n };
    let weighting = |n: f64| dp.update_weighting(&plan.context, &stats(n)).unwrap();
    assert_eq!(weighting(0.5), UpdateWeighting { weight: 1, scale: 1.0 });
    let w = weighting(4.0);
    assert_eq!(w.weight, 1, "user-level DP weighs every client the same");
    assert!(f64::from(w.scale) * 4.0 <= 1.0 && f64::from(w.scale) * 4.0 > 0.999);
}

#[test]
fn a_round_beyond_the_budget_is_refused() {
    let one = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Full, 1.0, 1.0, 1, 1e-5).unwrap();
    let two = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Full, 1.0, 1.0, 2, 1e-5).unwrap();
    let s = settings(DpMode::Central, SamplingSettings::Fraction { fraction: 1.0 }, Some((one + two) / 2.0));
    let mut dp = dp(&s);
    let plan = dp.configure_fit(&draw(1, 2, 2), &base()).unwrap();
    aggregate_and_charge(&mut dp, &plan, results(0.0, 2), &[]);
    match dp.configure_fit(&draw(2, 2, 2), &base()) {
        Err(StrategyError::Exhausted(reason)) => assert!(reason.contains("budget"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn fixed_size_cohorts_are_accounted_without_replacement_never_as_poisson() {
    let s = settings(DpMode::Central, SamplingSettings::Fixed { count: 5 }, None);
    let mut dp = dp(&s);
    let plan = dp.configure_fit(&draw(1, 50, 5), &base()).unwrap();
    // Two of the five dropped out: ε is the same as if all had reported.
    let failures: Vec<FitFailure> = (0..2)
        .map(|i| FitFailure {
            client: ClientId::parse(&format!("d{i}")).unwrap(),
            outcome: ParticipantOutcome::Dropped,
        })
        .collect();
    let (_, row) = aggregate_and_charge(&mut dp, &plan, results(0.0, 3), &failures);
    assert_eq!(row.entry.sampling, SamplingScheme::FixedSize);
    assert_eq!((row.entry.sampled, row.entry.reported), (5, 3));
    assert_eq!(row.expected_clients, 5.0);
    let lib =
        epsilon_for_rounds(Adjacency::ReplaceOne, SamplingScheme::FixedSize, 0.1, 1.0, 1, 1e-5).unwrap();
    assert_eq!(row.entry.epsilon_after, lib);
}

#[test]
fn under_local_noise_a_draw_that_would_take_the_worst_off_client_beyond_the_budget_is_refused() {
    // q = 0.01, z = 1: the central ε of one round is tiny, but a client already drawn into
    // 9 attempts would reach the local ε of 10 unamplified rounds (17.86).
    let mut s = settings(DpMode::Local, SamplingSettings::Poisson { rate: 0.01 }, Some(10.0));
    s.privacy.noise_multiplier = Some(1.0);
    let mut strategy = dp(&s);
    let mut draw = draw(1, 100, 1);
    draw.exposures = Exposures { drawn: vec![seen(2, 1.0)], others: vec![seen(1, 1.0)] };
    let plan = strategy.configure_fit(&draw, &base()).unwrap();
    let status = strategy.privacy_monitor().unwrap().snapshot();
    assert_eq!(status.max_participations, 3);
    assert_eq!(status.local_epsilon, Some(local_epsilon(3.0, s.privacy.delta).unwrap()));
    assert_eq!(plan.context.privacy.as_ref().unwrap().local_noise_multiplier(), Some(1.0));
    draw.exposures.drawn = vec![seen(9, 1.0)];
    let err = strategy.configure_fit(&draw, &base()).unwrap_err();
    assert!(matches!(&err, StrategyError::Exhausted(r) if r.contains("local ε")), "{err}");
    // The same draw under central noise is judged by the published models' ε only.
    let mut s = settings(DpMode::Central, SamplingSettings::Poisson { rate: 0.01 }, Some(10.0));
    s.privacy.noise_multiplier = Some(1.0);
    let mut strategy = dp(&s);
    let plan = strategy.configure_fit(&draw, &base()).unwrap();
    assert_eq!(strategy.privacy_monitor().unwrap().snapshot().local_epsilon, None);
    assert_eq!(plan.context.privacy.as_ref().unwrap().local_noise_multiplier(), None);
}

#[test]
fn the_local_epsilon_composes_each_attempt_with_its_recorded_multiplier_not_the_configured_one() {
    // Client a: 4 attempts at z = 1. Client b: 3 attempts at z = 0.7 (e.g. before a restart
    // lowered the configured multiplier... or raised it): b is worse off with fewer attempts.
    let s = settings(DpMode::Local, SamplingSettings::Fraction { fraction: 1.0 }, None);
    let mut strategy = dp(&s);
    let b = seen(3, 0.7);
    let mut draw = draw(1, 2, 1);
    draw.exposures = Exposures { drawn: vec![seen(4, 1.0)], others: vec![b] };
    strategy.configure_fit(&draw, &base()).unwrap();
    let status = strategy.privacy_monitor().unwrap().snapshot();
    let b_epsilon = local_epsilon(b.inverse_variance, s.privacy.delta).unwrap();
    assert!(b_epsilon > local_epsilon(5.0, s.privacy.delta).unwrap());
    assert_eq!(status.local_epsilon, Some(b_epsilon));
    assert_eq!(status.max_participations, 3);
    assert!(status.guarantee.contains("worst-off client (3 participation(s))"), "{}", status.guarantee);
    // Attempts drawn before multipliers were recorded count at the configured one.
    let mut strategy = dp(&s);
    draw.exposures = Exposures {
        drawn: vec![Exposure { participations: 4, inverse_variance: 2.0, unrecorded: 2 }],
        others: vec![],
    };
    let plan = strategy.configure_fit(&draw, &base()).unwrap();
    let expected = local_epsilon(2.0 + 2.0 + 1.0, s.privacy.delta).unwrap();
    assert_eq!(strategy.privacy_monitor().unwrap().snapshot().local_epsilon, Some(expected));
    // The round's ledger record carries the worst-off client's local ε after it.
    let (_, row) = aggregate_and_charge(&mut strategy, &plan, results(0.0, 1), &[]);
    assert_eq!(row.local_epsilon, Some(expected));
}

#[test]
fn under_local_noise_with_adaptive_clipping_the_draw_records_update_and_indicator_noise_together() {
    let mut s = settings(DpMode::Local, SamplingSettings::Fraction { fraction: 1.0 }, None);
    s.privacy.adaptive_clipping =
        Some(AdaptiveClipSettings { target_quantile: 0.5, learning_rate: 0.5, count_noise_std: 2.0 });
    let mut strategy = dp(&s);
    let plan = strategy.configure_fit(&draw(1, 4, 4), &base()).unwrap();
    let dp_round = plan.context.privacy.as_ref().unwrap();
    // Part of z goes to the indicator: the update alone has a larger multiplier, and what the
    // client releases is accounted as the two composed.
    assert!(dp_round.update_multiplier > 1.0);
    let recorded = dp_round.local_noise_multiplier().unwrap();
    let composed = (dp_round.update_multiplier.powi(-2) + 4f64.powi(-2)).powf(-0.5);
    assert!((recorded - composed).abs() < 1e-12, "{recorded} vs {composed}");
    assert!((recorded - 1.0).abs() < 1e-9);
}

#[test]
fn adaptive_clipping_moves_the_bound_and_its_count_is_accounted() {
    let mut s = settings(DpMode::Central, SamplingSettings::Fraction { fraction: 1.0 }, None);
    s.privacy.adaptive_clipping =
        Some(AdaptiveClipSettings { target_quantile: 0.5, learning_rate: 0.5, count_noise_std: 0.6 });
    let mut dp = dp(&s);
    let plan = dp.configure_fit(&draw(1, 10, 10), &base()).unwrap();
    assert!(plan.privacy.report_clip_indicator);
    let mut res = results(0.0, 10);
    for c in &mut res.clients {
        // Every update was clipped: C must grow.
        c.metrics.insert(CLIP_INDICATOR_METRIC.into(), -0.5);
    }
    let out = dp.aggregate_fit(&plan.context, &ParameterVector::zeros(manifest()), res, &[]).unwrap();
    let row = out.unwrap().charge.unwrap();
    assert_eq!(dp.clip_norm(), 1.0, "C moves only when the round is charged");
    dp.charge(&row).unwrap();
    assert!(dp.clip_norm() > 1.0, "C = {}", dp.clip_norm());
    assert_eq!(dp.clip_norm(), row.next_clip_norm);
    // The round is accounted at the configured total z = 1 (update and count together).
    let z = row.entry.noise_multiplier;
    assert!((z - 1.0).abs() < 1e-9, "z = {z}");
}

#[test]
fn a_resumed_strategy_continues_from_its_ledger() {
    let s = settings(DpMode::Central, SamplingSettings::Poisson { rate: 0.2 }, None);
    let mut first = dp(&s);
    let mut history = Vec::new();
    for round in 1..=3 {
        let plan = first.configure_fit(&draw(round, 50, 10), &base()).unwrap();
        let (_, row) = aggregate_and_charge(&mut first, &plan, results(0.0, 10), &[]);
        history.push(row);
    }
    let resumed = DpStrategy::with_noise_source(
        Box::new(FedAvg::new(1.0, 0.0)),
        &s,
        DIM,
        &history,
        NoiseSource::seeded_for_tests(1),
    )
    .unwrap();
    assert_eq!(resumed.epsilon(), first.epsilon());
    assert_eq!(resumed.privacy_monitor().unwrap().snapshot().rounds_charged, 3);
}

#[test]
fn under_distributed_noise_dropouts_that_lower_the_recorded_z_past_the_budget_refuse_the_round_before_release(
) {
    let mut s = settings(DpMode::Distributed, SamplingSettings::Fraction { fraction: 1.0 }, None);
    s.privacy.allow_distributed_without_secure_aggregation = true;
    // The budget admits one round at (about) the nominal z = 1, not one at z·√(4/10).
    let nominal = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Full, 1.0, 1.0, 1, 1e-5).unwrap();
    let lowered = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Full, 1.0, 0.9, 1, 1e-5).unwrap();
    s.privacy.target_epsilon = Some((nominal + lowered) / 2.0);
    let mut strategy = dp(&s);
    let plan = strategy.configure_fit(&draw(1, 10, 10), &base()).unwrap();
    // Six of the ten dropped out: their noise shares are missing from the sum.
    let failures: Vec<FitFailure> = (0..6)
        .map(|i| FitFailure {
            client: ClientId::parse(&format!("d{i}")).unwrap(),
            outcome: ParticipantOutcome::Dropped,
        })
        .collect();
    let out = strategy.aggregate_fit(
        &plan.context,
        &ParameterVector::zeros(manifest()),
        results(0.0, 4),
        &failures,
    );
    match out {
        Err(StrategyError::Exhausted(reason)) => {
            assert!(
                reason.contains("privacy budget exhausted") && reason.contains("nothing of it is published"),
                "{reason}"
            );
            assert!(reason.contains("of the 4 updates that arrived"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Nothing was charged: the published models' ε is unchanged.
    let status = strategy.privacy_monitor().unwrap().snapshot();
    assert_eq!((status.epsilon, status.rounds_charged), (0.0, 0));
    // With everyone reporting the same round is within the budget.
    let (_, row) = aggregate_and_charge(&mut strategy, &plan, results(0.0, 10), &[]);
    assert!(row.entry.epsilon_after <= s.privacy.target_epsilon.unwrap());
}

#[test]
fn distributed_noise_is_refused_without_the_override() {
    let mut s = settings(DpMode::Distributed, SamplingSettings::Poisson { rate: 0.5 }, None);
    assert!(DpStrategy::new(Box::new(FedAvg::new(1.0, 0.0)), &s, DIM, &[]).is_err());
    s.privacy.allow_distributed_without_secure_aggregation = true;
    let mut dp = dp(&s);
    let plan = dp.configure_fit(&draw(1, 40, 20), &base()).unwrap();
    // n̄ = 20 shares: each carries 1/√20 of the noise.
    assert!((plan.privacy.noise_stddev * 20f64.sqrt() - 1.0).abs() < 1e-3, "{}", plan.privacy.noise_stddev);
}

#[test]
fn each_round_is_aggregated_from_its_own_context_whatever_was_configured_since() {
    let s = settings(DpMode::Central, SamplingSettings::Poisson { rate: 0.5 }, None);
    let mut dp = dp(&s);
    let first = dp.configure_fit(&draw(1, 20, 9), &base()).unwrap();
    // A later attempt configured in between (e.g. a retry) does not disturb round 1.
    let other = dp.configure_fit(&draw(2, 40, 30), &base()).unwrap();
    assert_ne!(first.context, other.context);
    let (_, row) = aggregate_and_charge(&mut dp, &first, results(0.0, 9), &[]);
    assert_eq!((row.entry.round, row.entry.sampled), (1, 9));
    assert_eq!(row.expected_clients, 10.0, "n̄ = q·N of round 1's own draw");
    // A round configured by no one cannot be aggregated with privacy.
    let bare = RoundContext::new(&draw(3, 1, 1));
    assert!(dp.aggregate_fit(&bare, &ParameterVector::zeros(manifest()), results(0.0, 1), &[]).is_err());
}

#[test]
fn central_noise_on_the_integer_sum_has_the_calibrated_spread_over_the_fixed_denominator() {
    let s = settings(DpMode::Central, SamplingSettings::Fraction { fraction: 1.0 }, None);
    let mut dp = dp(&s);
    let plan = dp.configure_fit(&draw(1, 4, 4), &base()).unwrap();
    let (next, _) = aggregate_and_charge(&mut dp, &plan, results(0.0, 4), &[]);
    let (mean, std) = moments(next.values(), 0.0);
    assert!((std / 0.25 - 1.0).abs() < 0.01, "σ = z·C'/n̄ = 0.25: std {std}");
    assert!(mean.abs() < 5.0 * 0.25 / (DIM as f64).sqrt(), "mean offset {mean}");
}

#[test]
fn with_evaluation_under_dp_the_status_flags_it_and_the_guarantee_line_says_it_is_outside() {
    let mut s = settings(DpMode::Central, SamplingSettings::Fraction { fraction: 1.0 }, None);
    let plain = dp(&s).privacy_monitor().unwrap().snapshot();
    assert!(!plain.evaluation_outside_guarantee);
    assert!(!plain.guarantee.contains("outside"), "{}", plain.guarantee);
    s.evaluation.enabled_under_dp = true;
    let mut strategy = dp(&s);
    let status = strategy.privacy_monitor().unwrap().snapshot();
    assert!(status.evaluation_outside_guarantee);
    assert!(
        status.guarantee.ends_with("; evaluation results are outside the privacy guarantee"),
        "{}",
        status.guarantee
    );
    // The line restated after a charged round keeps the label.
    let plan = strategy.configure_fit(&draw(1, 2, 2), &base()).unwrap();
    aggregate_and_charge(&mut strategy, &plan, results(0.0, 2), &[]);
    let status = strategy.privacy_monitor().unwrap().snapshot();
    assert_eq!(status.rounds_charged, 1);
    assert!(status.guarantee.contains("outside the privacy guarantee"), "{}", status.guarantee);
    // Evaluation switched off altogether: nothing to label.
    s.evaluation.every = 0;
    assert!(!dp(&s).privacy_monitor().unwrap().snapshot().evaluation_outside_guarantee);
}

fn secure_draw(round: u64, candidates: usize, selected: usize, threshold: usize) -> Draw {
    Draw {
        secure: Some(crate::strategy::SecureDraw {
            threshold,
            limits: fedtune_shared::secagg::EncodingLimits::default(),
        }),
        ..draw(round, candidates, selected)
    }
}

fn distributed_secure(target: Option<f64>) -> CoordinatorSettings {
    let mut s = settings(DpMode::Distributed, SamplingSettings::Poisson { rate: 0.5 }, target);
    s.privacy.allow_distributed_without_secure_aggregation = true;
    s
}

#[test]
fn under_secure_aggregation_distributed_noise_is_sized_for_the_threshold_and_accounted_without_amplification()
{
    let mut strategy = dp(&distributed_secure(None));
    let plan = strategy.configure_fit(&secure_draw(1, 40, 20, 8), &base()).unwrap();
    let round = plan.context.privacy.as_ref().unwrap();
    // t = 8 shares, not n̄ = 20: any unmasked sum of at least t inputs carries the full noise.
    let sensitivity = widened_sensitivity(1.0, round.grid_log2(), DIM).unwrap();
    let expected = sensitivity / 8f64.sqrt();
    assert!((plan.privacy.noise_stddev / expected - 1.0).abs() < 1e-12, "{}", plan.privacy.noise_stddev);
    assert_eq!(plan.privacy.grid_log2, Some(round.grid_log2()));
    let sigma_grid = round.client_sigma_grid();
    assert!((sigma_grid - expected * 2f64.powi(-round.grid_log2())).abs() < 1e-6 * sigma_grid);
    // The coordinator knows the draw: the round is accounted at q = 1, not the Poisson rate.
    let mut context = plan.context.clone();
    let record =
        strategy.release(&mut context, 12).unwrap().expect("distributed noise is charged on release");
    assert_eq!(record.entry.sampling_rate, 1.0);
    assert_eq!((record.entry.sampled, record.entry.reported), (20, 12));
    // 12 survivors of shares sized for 8 carry more than z = 1; the record claims no more than z.
    assert_eq!(record.entry.noise_multiplier, 1.0);
    let unamplified =
        epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Poisson, 1.0, 1.0, 1, 1e-5).unwrap();
    assert!((record.entry.epsilon_after - unamplified).abs() < 1e-9 * unamplified);
}

#[test]
fn a_secure_distributed_round_is_charged_once_when_released_for_unmasking_published_or_not() {
    let mut strategy = dp(&distributed_secure(None));
    let plan = strategy.configure_fit(&secure_draw(1, 10, 10, 6), &base()).unwrap();
    let mut context = plan.context.clone();
    let released = strategy.release(&mut context, 9).unwrap().unwrap();
    assert!(released.charged_at_release);
    let status = strategy.privacy_monitor().unwrap().snapshot();
    assert_eq!(status.rounds_charged, 1, "charged as soon as the sum can be unmasked");
    assert_eq!(status.epsilon, released.entry.epsilon_after);
    // Asking again (a retried request in the same attempt) charges nothing more.
    assert_eq!(strategy.release(&mut context, 9).unwrap().unwrap(), released);
    // Publication reuses the release's record and books nothing twice.
    let out = strategy
        .aggregate_fit(&context, &ParameterVector::zeros(manifest()), results(0.0, 9), &[])
        .unwrap()
        .unwrap();
    let charge = out.charge.unwrap();
    assert_eq!(charge, released);
    strategy.charge(&charge).unwrap();
    let status = strategy.privacy_monitor().unwrap().snapshot();
    assert_eq!((status.rounds_charged, status.epsilon), (1, released.entry.epsilon_after));
    // A second attempt of the same round that is released is a second charge.
    let retry = strategy.configure_fit(&secure_draw(1, 10, 10, 6), &base()).unwrap();
    let mut retry = retry.context;
    retry.draw.round = RoundId::new(1, 1);
    let again = strategy.release(&mut retry, 10).unwrap().unwrap();
    assert!(again.entry.epsilon_after > released.entry.epsilon_after);
    assert_eq!(strategy.privacy_monitor().unwrap().snapshot().rounds_charged, 2);
}

#[test]
fn a_release_beyond_the_budget_is_refused_before_anything_is_unmasked() {
    let one = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Poisson, 1.0, 1.0, 1, 1e-5).unwrap();
    let mut strategy = dp(&distributed_secure(Some(one * 1.5)));
    let first = strategy.configure_fit(&secure_draw(1, 10, 10, 6), &base()).unwrap();
    let mut first = first.context;
    strategy.release(&mut first, 10).unwrap().unwrap();
    // The second round is refused when it is configured: its worst case (t survivors) is z.
    assert!(matches!(
        strategy.configure_fit(&secure_draw(2, 10, 10, 6), &base()),
        Err(StrategyError::Exhausted(_))
    ));
    assert_eq!(strategy.privacy_monitor().unwrap().snapshot().rounds_charged, 1);
}

#[test]
fn central_noise_under_secure_aggregation_is_not_charged_on_release_and_covers_the_encodings_rounding() {
    let s = settings(DpMode::Central, SamplingSettings::Fraction { fraction: 1.0 }, None);
    let mut strategy = dp(&s);
    let plan = strategy.configure_fit(&secure_draw(1, 10, 10, 6), &base()).unwrap();
    let mut context = plan.context.clone();
    // Central DP trusts the coordinator with the sum: it is charged when published.
    assert_eq!(strategy.release(&mut context, 10).unwrap(), None);
    assert_eq!(strategy.privacy_monitor().unwrap().snapshot().rounds_charged, 0);
    assert_eq!(plan.privacy.noise_stddev, 0.0, "clients add no noise under central DP");
    let round = context.privacy.as_ref().unwrap();
    // The encoding's grid is the finest admissible for 10 inputs, at most the default grid.
    assert!(round.grid_log2() <= fedtune_shared::privacy::default_grid_log2(1.0, DIM).unwrap());
}

#[test]
fn adaptive_clipping_is_refused_under_secure_aggregation() {
    let mut s = settings(DpMode::Central, SamplingSettings::Fraction { fraction: 1.0 }, None);
    s.privacy.adaptive_clipping =
        Some(AdaptiveClipSettings { target_quantile: 0.5, learning_rate: 0.2, count_noise_std: 1.0 });
    let mut strategy = dp(&s);
    match strategy.configure_fit(&secure_draw(1, 10, 10, 6), &base()) {
        Err(StrategyError::Refused(reason)) => assert!(reason.contains("adaptive clipping"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}
