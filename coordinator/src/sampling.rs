//! Client sampling per round: fraction, fixed count, or Poisson with rate q.
//!
//! Where the seed comes from depends on whether the draw must be secret ([`fit_seed`]):
//! * **Without DP** a draw is reproducible: its seed is derived from the configured base seed,
//!   the round, the attempt and the kind of task (`SHA-256("fedtune/v1/sample" ‖ …)`).
//! * **Under DP** the seed is 32 bytes from the operating system's CSPRNG (ring's
//!   `SystemRandom`). Amplification by subsampling holds only while the sample is secret, and a
//!   seed derived from public values (the default base seed is 0, the client list is public)
//!   lets anyone recompute who was sampled.
//!
//! Either way the seed is recorded with the drawn set in the state database, so the operator
//! (who may see the sample) can recompute any draw from the record.
//! Candidates are always taken in id order, so the same seed and candidates give the same sample.
//! The generator is ChaCha20 (`rand_chacha`), whose output is stable across platforms.

use fedtune_shared::ids::{ClientId, RoundId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::settings::{CoordinatorSettings, SamplingSettings};

/// The seed of one draw.
pub fn draw_seed(base: u64, id: RoundId, kind: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"fedtune/v1/sample");
    ctx.update(&base.to_le_bytes());
    ctx.update(&id.round.to_le_bytes());
    ctx.update(&id.attempt.to_le_bytes());
    ctx.update(kind.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Why a draw could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// The operating system's CSPRNG failed.
    #[error("the operating system's random generator failed; no secret client sample can be drawn")]
    Entropy,
}

/// The seed of a fit draw: secret (OS CSPRNG) under DP, [`draw_seed`] from the configured
/// `rounds.seed` otherwise (see the module docs).
pub fn fit_seed(settings: &CoordinatorSettings, id: RoundId) -> Result<[u8; 32], SamplingError> {
    if settings.privacy.enabled() {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| SamplingError::Entropy)?;
        Ok(seed)
    } else {
        Ok(draw_seed(settings.rounds.seed, id, "fit"))
    }
}

/// Whether a Poisson draw under DP is used as drawn, whatever its size. Redrawing a sample below
/// `rounds.min_fit` would release a *conditioned* sample (N = 20, q = 0.1, min_fit = 2 gives
/// each client an inclusion probability of about 0.14, not the 0.10 the accountant uses). With
/// the fixed denominator `n̄` a small sample needs no protection, so every such round runs and
/// is charged; with no client sampled it publishes the noised empty sum (central noise) or the
/// unchanged model (local noise, where the noise is the clients'), charged like any other round.
pub fn unconditioned(settings: &CoordinatorSettings) -> bool {
    settings.privacy.enabled() && matches!(settings.sampling, SamplingSettings::Poisson { .. })
}

/// The fewest sampled clients a fit attempt needs ([`unconditioned`] draws need none).
pub fn min_sampled(settings: &CoordinatorSettings) -> usize {
    if unconditioned(settings) {
        0
    } else {
        settings.rounds.min_fit
    }
}

/// The fewest folded updates a fit attempt needs before it aggregates. [`unconditioned`] draws
/// need none either: failing the attempt and drawing again would condition the released
/// sample on how many of the first one reported.
pub fn min_accepted(settings: &CoordinatorSettings) -> usize {
    min_sampled(settings)
}

/// A per-client training seed derived from the draw seed (so clients shuffle differently but
/// reproducibly).
pub fn client_seed(draw: &[u8; 32], client: &ClientId) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(draw);
    ctx.update(client.as_str().as_bytes());
    let d = ctx.finish();
    u64::from_le_bytes(d.as_ref()[..8].try_into().expect("8 bytes"))
}

/// Human-readable scheme, as recorded.
pub fn describe(s: &SamplingSettings) -> String {
    match s {
        SamplingSettings::Fraction { fraction } => format!("fraction({fraction})"),
        SamplingSettings::Fixed { count } => format!("fixed({count})"),
        SamplingSettings::Poisson { rate } => format!("poisson(q={rate})"),
    }
}

/// Draws the clients of a fit round from `candidates` (sorted by id). The result is sorted.
/// Fraction and fixed draws never return fewer than `min(min_fit, candidates)`; a Poisson draw
/// may return anything from none to all (callers fail the attempt if it is below
/// [`min_sampled`]).
pub fn sample(
    s: &SamplingSettings,
    min_fit: usize,
    candidates: &[ClientId],
    seed: [u8; 32],
) -> Vec<ClientId> {
    let mut rng = ChaCha20Rng::from_seed(seed);
    let n = candidates.len();
    match *s {
        SamplingSettings::Fraction { .. } | SamplingSettings::Fixed { .. } => {
            let k = cohort_size(s, min_fit, n).unwrap_or(n);
            uniform(candidates, k, &mut rng)
        }
        SamplingSettings::Poisson { rate } => {
            candidates.iter().filter(|_| rng.random_bool(rate)).cloned().collect()
        }
    }
}

/// The size of a fixed-size cohort drawn from `candidates` live clients: `⌈fraction·N⌉` but at
/// least `min_fit`, or `count`, never more than `N`. A function of public figures only (the
/// settings and the live count), so it is also the public bound `n̄` the DP decorator averages
/// with. `None` for Poisson sampling, whose size is random.
pub fn cohort_size(s: &SamplingSettings, min_fit: usize, candidates: usize) -> Option<usize> {
    match *s {
        SamplingSettings::Fraction { fraction } => {
            Some(((fraction * candidates as f64).ceil() as usize).max(min_fit).min(candidates))
        }
        SamplingSettings::Fixed { count } => Some(count.min(candidates)),
        SamplingSettings::Poisson { .. } => None,
    }
}

/// `k` of `candidates` uniformly without replacement (partial Fisher–Yates), sorted.
pub fn uniform(candidates: &[ClientId], k: usize, rng: &mut ChaCha20Rng) -> Vec<ClientId> {
    let mut pool: Vec<&ClientId> = candidates.iter().collect();
    let k = k.min(pool.len());
    for i in 0..k {
        let j = rng.random_range(i..pool.len());
        pool.swap(i, j);
    }
    let mut out: Vec<ClientId> = pool[..k].iter().map(|c| (*c).clone()).collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients(n: usize) -> Vec<ClientId> {
        (0..n).map(|i| ClientId::parse(&format!("c{i:03}")).unwrap()).collect()
    }

    #[test]
    fn a_draw_is_reproducible_from_its_seed() {
        let c = clients(50);
        let s = SamplingSettings::Fraction { fraction: 0.2 };
        let seed = draw_seed(7, RoundId::new(3, 0), "fit");
        assert_eq!(sample(&s, 2, &c, seed), sample(&s, 2, &c, seed));
        let other = draw_seed(7, RoundId::new(3, 1), "fit");
        assert_ne!(sample(&s, 2, &c, seed), sample(&s, 2, &c, other));
    }

    #[test]
    fn fraction_and_fixed_draw_the_right_number_of_distinct_clients() {
        let c = clients(10);
        let seed = draw_seed(0, RoundId::new(1, 0), "fit");
        let s = sample(&SamplingSettings::Fraction { fraction: 0.25 }, 2, &c, seed);
        assert_eq!(s.len(), 3); // ceil(2.5)
        let s = sample(&SamplingSettings::Fraction { fraction: 0.05 }, 2, &c, seed);
        assert_eq!(s.len(), 2); // min_fit floor
        let s = sample(&SamplingSettings::Fixed { count: 4 }, 2, &c, seed);
        assert_eq!(s.len(), 4);
        let mut d = s.clone();
        d.dedup();
        assert_eq!(d, s);
        assert_eq!(sample(&SamplingSettings::Fixed { count: 40 }, 2, &c, seed).len(), 10);
    }

    fn dp_settings(sampling: SamplingSettings) -> CoordinatorSettings {
        let mut s = CoordinatorSettings::with_paths("/unused", "/unused");
        s.privacy.mode = crate::settings::DpMode::Central;
        s.sampling = sampling;
        s.rounds.min_fit = 2;
        s
    }

    #[test]
    fn under_dp_the_fit_draw_is_secret_and_differs_from_the_seeded_one() {
        let s = dp_settings(SamplingSettings::Poisson { rate: 0.1 });
        let id = RoundId::new(1, 0);
        let (a, b) = (fit_seed(&s, id).unwrap(), fit_seed(&s, id).unwrap());
        assert_ne!(a, b, "two secret draws of the same attempt must not repeat");
        assert_ne!(a, draw_seed(s.rounds.seed, id, "fit"));
    }

    #[test]
    fn without_dp_the_fit_draw_is_reproducible_from_the_configured_seed() {
        let mut s = dp_settings(SamplingSettings::Poisson { rate: 0.1 });
        s.privacy.mode = crate::settings::DpMode::None;
        let id = RoundId::new(4, 1);
        assert_eq!(fit_seed(&s, id).unwrap(), draw_seed(s.rounds.seed, id, "fit"));
    }

    #[test]
    fn a_poisson_draw_under_dp_needs_no_minimum_but_others_keep_min_fit() {
        let s = dp_settings(SamplingSettings::Poisson { rate: 0.1 });
        assert_eq!((min_sampled(&s), min_accepted(&s)), (0, 0));
        let s = dp_settings(SamplingSettings::Fixed { count: 3 });
        assert_eq!((min_sampled(&s), min_accepted(&s)), (2, 2));
        let mut s = dp_settings(SamplingSettings::Poisson { rate: 0.1 });
        s.privacy.mode = crate::settings::DpMode::None;
        assert_eq!(min_sampled(&s), 2);
    }

    #[test]
    fn poisson_inclusion_frequency_matches_the_rate() {
        let c = clients(100);
        let mut total = 0;
        for r in 0..200 {
            total += sample(
                &SamplingSettings::Poisson { rate: 0.3 },
                1,
                &c,
                draw_seed(1, RoundId::new(r, 0), "fit"),
            )
            .len();
        }
        let freq = total as f64 / (100.0 * 200.0);
        // 20000 Bernoulli(0.3) trials: standard error ≈ 0.0032.
        assert!((freq - 0.3).abs() < 0.015, "frequency {freq}");
    }

    #[test]
    fn every_client_is_equally_likely_under_fixed_sampling() {
        let c = clients(5);
        let mut hits = [0usize; 5];
        for r in 0..5000 {
            for s in
                sample(&SamplingSettings::Fixed { count: 2 }, 1, &c, draw_seed(2, RoundId::new(r, 0), "fit"))
            {
                hits[c.iter().position(|x| *x == s).unwrap()] += 1;
            }
        }
        // Expected 2000 each; binomial std ≈ 35.
        assert!(hits.iter().all(|&h| (h as i64 - 2000).abs() < 200), "{hits:?}");
    }
}
