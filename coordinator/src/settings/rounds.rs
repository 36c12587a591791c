//! The `[rounds]` and `[sampling]` sections: how many rounds run, when each starts and ends,
//! and which live clients a round draws.

use std::time::Duration;

use fedtune_shared::settings::{duration, SettingsError};
use serde::{Deserialize, Serialize};

/// Round lifecycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundSettings {
    /// Rounds to run; afterwards the federation is finished.
    pub total: u64,
    /// Time from sampling to the end of uploads.
    #[serde(with = "duration")]
    pub deadline: Duration,
    /// Live clients needed before a round starts.
    pub min_available: usize,
    /// Accepted updates needed by the deadline for a round to complete (and clients a draw
    /// needs). Not applied to Poisson draws under DP, which run and are charged whatever their
    /// size: redrawing would condition the sample (`sampling::unconditioned`).
    pub min_fit: usize,
    /// Failed attempts in a row after which the federation halts.
    pub max_consecutive_failures: u32,
    /// Pause before retrying a failed round.
    #[serde(with = "duration")]
    pub retry_backoff: Duration,
    /// Base seed of client sampling and per-client training seeds (recorded per round). Used
    /// only without DP: under DP every draw is seeded from the OS CSPRNG, so that the sample
    /// stays secret (`sampling::fit_seed`).
    pub seed: u64,
}

impl Default for RoundSettings {
    fn default() -> Self {
        Self {
            total: 10,
            deadline: Duration::from_secs(600),
            min_available: 2,
            min_fit: 2,
            max_consecutive_failures: 3,
            retry_backoff: Duration::from_secs(5),
            seed: 0,
        }
    }
}

/// How a round's clients are drawn from the live ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case", deny_unknown_fields)]
pub enum SamplingSettings {
    /// `max(min_fit, ceil(fraction × live))` clients uniformly without replacement.
    Fraction {
        /// In (0, 1].
        fraction: f64,
    },
    /// `min(count, live)` clients uniformly without replacement.
    Fixed {
        /// At least `rounds.min_fit`.
        count: usize,
    },
    /// Each live client independently with probability `rate` (what DP accounting with
    /// Poisson subsampling assumes). A sample smaller than `min_fit` fails the attempt; it is not
    /// redrawn conditionally.
    Poisson {
        /// In (0, 1].
        rate: f64,
    },
}

impl Default for SamplingSettings {
    fn default() -> Self {
        SamplingSettings::Fraction { fraction: 1.0 }
    }
}

impl RoundSettings {
    /// Checks every `rounds.*` value; the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.total == 0 {
            return Err(SettingsError::invalid("rounds.total", "must be at least 1"));
        }
        if self.deadline.is_zero() {
            return Err(SettingsError::invalid("rounds.deadline", "must be positive"));
        }
        if self.min_fit == 0 {
            return Err(SettingsError::invalid("rounds.min_fit", "must be at least 1"));
        }
        if self.min_available < self.min_fit {
            return Err(SettingsError::invalid(
                "rounds.min_available",
                format!("({}) must be at least rounds.min_fit ({})", self.min_available, self.min_fit),
            ));
        }
        if self.max_consecutive_failures == 0 {
            return Err(SettingsError::invalid("rounds.max_consecutive_failures", "must be at least 1"));
        }
        Ok(())
    }
}

impl SamplingSettings {
    /// Checks the scheme's parameter against its range and a round's `rounds.min_fit`; the error
    /// names the key.
    pub fn validate(&self, min_fit: usize) -> Result<(), SettingsError> {
        match *self {
            SamplingSettings::Fraction { fraction } if !(fraction > 0.0 && fraction <= 1.0) => {
                return Err(SettingsError::invalid("sampling.fraction", "must be in (0, 1]"));
            }
            SamplingSettings::Fixed { count } if count < min_fit => {
                return Err(SettingsError::invalid(
                    "sampling.count",
                    format!("({count}) must be at least rounds.min_fit ({min_fit})"),
                ));
            }
            SamplingSettings::Poisson { rate } if !(rate > 0.0 && rate <= 1.0) => {
                return Err(SettingsError::invalid("sampling.rate", "must be in (0, 1]"));
            }
            _ => {}
        }
        Ok(())
    }
}
