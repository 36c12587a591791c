//! Exponential backoff with jitter, on tokio's clock.
//!
//! The agent retries every call to the coordinator (it may be restarting after a crash, or be
//! briefly overloaded). Delays grow geometrically up to a cap so that a fleet of clients does not
//! hammer a recovering coordinator, and each delay is shortened by a random fraction (jitter) so
//! that clients which lost the coordinator at the same instant do not all come back in lockstep.
//! Time comes from `tokio::time`, so tests check the schedule with paused time in microseconds.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

/// The shape of a retry schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// Growth factor between consecutive delays (≥ 1).
    pub multiplier: f64,
    /// Fraction in `[0, 1]` by which a delay may be randomly shortened: the actual delay lies in
    /// `[base·(1 − jitter), base]`. Shortening only (never lengthening) keeps `max` a hard bound.
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    /// 200 ms doubling to 10 s with up to 50 % jitter: a restarted coordinator is found within
    /// ~10 s, and a dead one costs each client one cheap connection attempt per few seconds.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

/// The sleep was cut short because shutdown was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("backoff interrupted by shutdown")]
pub struct Interrupted;

/// A retry schedule in progress: call [`Backoff::wait`] after each failure and
/// [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    /// A fresh schedule. `seed` makes the jitter reproducible (tests); agents pass something
    /// that differs per client (e.g. derived from the client name) so their retries spread out.
    pub fn new(policy: BackoffPolicy, seed: u64) -> Self {
        let policy = BackoffPolicy {
            multiplier: policy.multiplier.max(1.0),
            jitter: policy.jitter.clamp(0.0, 1.0),
            max: policy.max.max(policy.initial),
            ..policy
        };
        Self { policy, attempt: 0, rng: StdRng::seed_from_u64(seed) }
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Forgets past failures: the next delay is `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The un-jittered delay for the current attempt.
    fn base(&self) -> Duration {
        // Saturate the exponent: after ~60 doublings every schedule sits at its cap anyway, and
        // `powi` of a large exponent would overflow to infinity.
        let factor = self.policy.multiplier.powi(self.attempt.min(64) as i32);
        let secs = (self.policy.initial.as_secs_f64() * factor).min(self.policy.max.as_secs_f64());
        Duration::from_secs_f64(secs)
    }

    /// The delay to wait after one more failure, and counts that failure.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base();
        self.attempt = self.attempt.saturating_add(1);
        let cut: f64 =
            if self.policy.jitter > 0.0 { self.rng.random_range(0.0..self.policy.jitter) } else { 0.0 };
        base.mul_f64(1.0 - cut)
    }

    /// Sleeps for [`Backoff::next_delay`], or returns early with [`Interrupted`] when `shutdown`
    /// is cancelled, so that a SIGTERM never waits out a 10-second backoff.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> Result<Duration, Interrupted> {
        let delay = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => Err(Interrupted),
            _ = tokio::time::sleep(delay) => Ok(delay),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }

    #[test]
    fn delays_stay_between_the_jitter_floor_and_the_cap() {
        let mut b = Backoff::new(policy(), 7);
        for attempt in 0..40u32 {
            let base = (100.0 * 2f64.powi(attempt as i32)).min(2000.0);
            let d = b.next_delay().as_secs_f64() * 1000.0;
            assert!(d <= base + 1e-6, "attempt {attempt}: {d} ms above base {base} ms");
            assert!(d >= base * 0.5 - 1e-6, "attempt {attempt}: {d} ms below the jitter floor of {base} ms");
            assert!(d <= 2000.0 + 1e-6, "attempt {attempt}: {d} ms above the cap");
        }
    }

    #[test]
    fn without_jitter_delays_double_until_the_cap() {
        let mut b = Backoff::new(BackoffPolicy { jitter: 0.0, ..policy() }, 0);
        let ms: Vec<u128> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn reset_starts_the_schedule_over() {
        let mut b = Backoff::new(BackoffPolicy { jitter: 0.0, ..policy() }, 0);
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn the_same_seed_gives_the_same_jitter_and_different_seeds_differ() {
        let run = |seed| {
            let mut b = Backoff::new(policy(), seed);
            (0..8).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_exactly_the_drawn_delay_on_tokio_time() {
        let token = CancellationToken::new();
        let mut b = Backoff::new(BackoffPolicy { jitter: 0.0, ..policy() }, 0);
        let start = Instant::now();
        assert_eq!(b.wait(&token).await, Ok(Duration::from_millis(100)));
        assert_eq!(b.wait(&token).await, Ok(Duration::from_millis(200)));
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_interrupts_a_long_wait_at_once() {
        let token = CancellationToken::new();
        let mut b = Backoff::new(BackoffPolicy { initial: Duration::from_secs(60), ..policy() }, 0);
        let start = Instant::now();
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            canceller.cancel();
        });
        assert_eq!(b.wait(&token).await, Err(Interrupted));
        assert_eq!(start.elapsed(), Duration::from_millis(5));
    }
}
