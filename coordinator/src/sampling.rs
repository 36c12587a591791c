//! Client sampling per round: fraction, fixed count, or Poisson with rate q.
//!
//! Every draw is reproducible from its seed, which is derived from the configured base seed,
//! the round, the attempt and the kind of task (`SHA-256("fedtune/v1/sample" ‖ …)`), and recorded
//! with the drawn set in the state database — an auditor can recompute any draw from the record.
//! Candidates are always taken in id order, so the same seed and candidates give the same sample.
//! The generator is ChaCha20 (`rand_chacha`), whose output is stable across platforms.

use fedtune_shared::ids::{ClientId, RoundId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::settings::SamplingSettings;

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
/// may return anything from none to all (callers fail the attempt if it is below `min_fit`).
pub fn sample(
    s: &SamplingSettings,
    min_fit: usize,
    candidates: &[ClientId],
    seed: [u8; 32],
) -> Vec<ClientId> {
    let mut rng = ChaCha20Rng::from_seed(seed);
    let n = candidates.len();
    match *s {
        SamplingSettings::Fraction { fraction } => {
            let k = ((fraction * n as f64).ceil() as usize).max(min_fit).min(n);
            uniform(candidates, k, &mut rng)
        }
        SamplingSettings::Fixed { count } => uniform(candidates, count.min(n), &mut rng),
        SamplingSettings::Poisson { rate } => {
            candidates.iter().filter(|_| rng.random_bool(rate)).cloned().collect()
        }
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
