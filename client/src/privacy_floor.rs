//! The site's privacy floor: the weakest fit task this client will train for
//! (`fedtune-client run --require-privacy none|central|local --min-noise-multiplier Z`).
//!
//! The coordinator decides each round's privacy instructions, so a compromised or misconfigured
//! coordinator could otherwise ask a site for a raw update. With a floor, a task weaker than
//! asked is refused before its model is downloaded, and the refusal is reported
//! (`refused_privacy_floor`), so the downgrade is never silent.
//!
//! # What each mode protects against
//!
//! | task mode     | counts as | why                                                                  |
//! |---------------|-----------|----------------------------------------------------------------------|
//! | `none`        | `none`    | the raw update leaves the site                                      |
//! | `central`     | `central` | clipped here; the coordinator adds the noise, so it sees the update |
//! | `distributed` | `central` | each site adds only a share of the noise (`σ/√n̄`) and there is no secure aggregation yet: against the coordinator an update is protected only by its share; the published models get the full noise |
//! | `local`       | `local`   | the site adds the full noise itself: private against the coordinator too |
//!
//! # Which noise multiplier is compared with the floor
//!
//! Under `local` the site adds the noise itself, so it checks what it will add:
//! `z = σ / C`, combined with the clipping indicator's noise under adaptive clipping
//! (`(z_Δ⁻² + (2σ_b)⁻²)^(−½)`, as the coordinator accounts it). Under `central` and
//! `distributed` the site cannot see the noise that protects it and compares the multiplier
//! the coordinator declares it accounts (`PrivacyInstructions::noise_multiplier`): a floor there
//! catches a downgrade by configuration, not a coordinator that lies about noise it adds itself
//! (only `local` protects against that).

use std::fmt;
use std::str::FromStr;

use fedtune_shared::round::{PrivacyInstructions, PrivacyMode};
use serde::{Deserialize, Serialize};

/// The weakest privacy mode a site accepts, ordered `None < Central < Local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequiredPrivacy {
    /// Any task, private or not.
    #[default]
    None,
    /// Clipped updates with noise on what is published (central or distributed noise).
    Central,
    /// Updates noised on the site before they leave it.
    Local,
}

impl RequiredPrivacy {
    /// What a task's mode protects against (see the module table).
    pub fn of(mode: PrivacyMode) -> Self {
        match mode {
            PrivacyMode::None => RequiredPrivacy::None,
            PrivacyMode::Central | PrivacyMode::Distributed => RequiredPrivacy::Central,
            PrivacyMode::Local => RequiredPrivacy::Local,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            RequiredPrivacy::None => "none",
            RequiredPrivacy::Central => "central",
            RequiredPrivacy::Local => "local",
        }
    }
}

impl fmt::Display for RequiredPrivacy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RequiredPrivacy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(RequiredPrivacy::None),
            "central" => Ok(RequiredPrivacy::Central),
            "local" => Ok(RequiredPrivacy::Local),
            other => Err(format!("`{other}` is not one of none, central, local")),
        }
    }
}

/// The site's floor: a mode and a least noise multiplier. The default accepts every task.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PrivacyFloor {
    /// Weakest mode accepted.
    pub require: RequiredPrivacy,
    /// Least noise multiplier accepted (0: no minimum). Above 0 it refuses tasks without noise.
    pub min_noise_multiplier: f64,
}

/// Why a task is below the floor (logged on the site; the coordinator only hears
/// `refused_privacy_floor`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BelowFloor {
    /// The task's mode protects less than required.
    #[error("the task asks for privacy mode {task:?}, which counts as `{counts_as}`; this site requires `{required}` (--require-privacy)")]
    Mode {
        /// The task's mode.
        task: PrivacyMode,
        /// What it counts as.
        counts_as: RequiredPrivacy,
        /// The floor.
        required: RequiredPrivacy,
    },
    /// The task's noise multiplier is below the minimum.
    #[error("the task's noise multiplier {actual:.4} ({source_of}) is below this site's minimum {minimum} (--min-noise-multiplier)")]
    NoiseMultiplier {
        /// The multiplier compared.
        actual: f64,
        /// Where it came from (computed here, or declared by the coordinator).
        source_of: &'static str,
        /// The floor.
        minimum: f64,
    },
}

impl PrivacyFloor {
    /// Whether the floor asks for anything at all (then the site behaves as a DP participant
    /// from its first join: no example counts are sent).
    pub fn expects_privacy(&self) -> bool {
        self.require > RequiredPrivacy::None || self.min_noise_multiplier > 0.0
    }

    /// Accepts `task` or says why it is below the floor.
    pub fn check(&self, task: &PrivacyInstructions) -> Result<(), BelowFloor> {
        let counts_as = RequiredPrivacy::of(task.mode);
        if counts_as < self.require {
            return Err(BelowFloor::Mode { task: task.mode, counts_as, required: self.require });
        }
        if self.min_noise_multiplier > 0.0 {
            let (actual, source_of) = noise_multiplier(task);
            // A NaN never passes: it is neither equal to nor greater than the minimum.
            if actual.is_nan() || actual < self.min_noise_multiplier {
                return Err(BelowFloor::NoiseMultiplier {
                    actual,
                    source_of,
                    minimum: self.min_noise_multiplier,
                });
            }
        }
        Ok(())
    }
}

/// The multiplier a task is judged by (see the module docs) and where it came from.
fn noise_multiplier(task: &PrivacyInstructions) -> (f64, &'static str) {
    match task.mode {
        PrivacyMode::None => (0.0, "no noise"),
        PrivacyMode::Local => {
            let update = task.noise_stddev / task.clip_norm;
            let z = if task.report_clip_indicator && task.indicator_noise_stddev > 0.0 {
                (update.powi(-2) + (2.0 * task.indicator_noise_stddev).powi(-2)).powf(-0.5)
            } else if task.report_clip_indicator {
                // An exact indicator leaks whether this update was clipped.
                0.0
            } else {
                update
            };
            (z, "the noise this site adds")
        }
        PrivacyMode::Central | PrivacyMode::Distributed => {
            (task.noise_multiplier, "declared by the coordinator")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(mode: PrivacyMode, sigma: f64, declared: f64) -> PrivacyInstructions {
        PrivacyInstructions {
            mode,
            clip_norm: 2.0,
            noise_stddev: sigma,
            noise_multiplier: declared,
            ..PrivacyInstructions::NONE
        }
    }

    #[test]
    fn modes_are_ordered_by_what_they_protect_against_and_distributed_counts_as_central() {
        let floor = |require| PrivacyFloor { require, min_noise_multiplier: 0.0 };
        let central = floor(RequiredPrivacy::Central);
        assert!(central.check(&task(PrivacyMode::None, 0.0, 0.0)).is_err());
        assert!(central.check(&task(PrivacyMode::Central, 0.0, 1.0)).is_ok());
        assert!(central.check(&task(PrivacyMode::Distributed, 0.1, 1.0)).is_ok());
        assert!(central.check(&task(PrivacyMode::Local, 2.0, 1.0)).is_ok());
        let local = floor(RequiredPrivacy::Local);
        assert!(matches!(
            local.check(&task(PrivacyMode::Distributed, 0.1, 1.0)),
            Err(BelowFloor::Mode { counts_as: RequiredPrivacy::Central, .. })
        ));
        assert!(local.check(&task(PrivacyMode::Central, 0.0, 1.0)).is_err());
        assert!(local.check(&task(PrivacyMode::Local, 2.0, 1.0)).is_ok());
        assert!(PrivacyFloor::default().check(&task(PrivacyMode::None, 0.0, 0.0)).is_ok());
    }

    #[test]
    fn a_local_task_is_judged_by_the_noise_the_site_adds_not_by_what_the_coordinator_declares() {
        let floor = PrivacyFloor { require: RequiredPrivacy::Local, min_noise_multiplier: 1.0 };
        // σ / C = 1.0 / 2.0 = 0.5, although the coordinator claims 5.
        let err = floor.check(&task(PrivacyMode::Local, 1.0, 5.0)).unwrap_err();
        assert!(err.to_string().contains("0.5000"), "{err}");
        assert!(floor.check(&task(PrivacyMode::Local, 2.0, 0.0)).is_ok());
        // The indicator's noise counts too: σ_b = 0.5 gives 2σ_b = 1, combined below 1.
        let adaptive = PrivacyInstructions {
            report_clip_indicator: true,
            indicator_noise_stddev: 0.5,
            ..task(PrivacyMode::Local, 2.0, 1.0)
        };
        assert!(floor.check(&adaptive).is_err());
    }

    #[test]
    fn central_and_distributed_tasks_are_judged_by_the_declared_multiplier_and_no_noise_is_zero() {
        let floor = PrivacyFloor { require: RequiredPrivacy::None, min_noise_multiplier: 0.8 };
        assert!(floor.check(&task(PrivacyMode::Central, 0.0, 0.8)).is_ok());
        assert!(floor.check(&task(PrivacyMode::Central, 0.0, 0.7)).is_err());
        assert!(floor.check(&task(PrivacyMode::Distributed, 0.3, 0.5)).is_err());
        assert!(floor.check(&task(PrivacyMode::None, 0.0, 0.0)).is_err());
        assert!(floor.check(&task(PrivacyMode::Central, 0.0, f64::NAN)).is_err());
        assert!(floor.expects_privacy());
        assert!(!PrivacyFloor::default().expects_privacy());
    }

    #[test]
    fn required_privacy_reads_and_writes_its_three_names() {
        for r in [RequiredPrivacy::None, RequiredPrivacy::Central, RequiredPrivacy::Local] {
            assert_eq!(r.to_string().parse::<RequiredPrivacy>(), Ok(r));
        }
        assert!("distributed".parse::<RequiredPrivacy>().is_err());
    }
}
