//! How a round attempt and each of its participants ended: the typed vocabulary the round actor
//! decides with and [`crate::storage`] records.
//!
//! `Display` gives the stable lower-case strings stored in `state.sqlite` (`rounds.status`,
//! `rounds.reason`, `round_clients.outcome`) and written to logs; `FromStr` reads the stored ones
//! back. They are the strings the coordinator has always written, so existing state directories
//! load unchanged: change one and old rows stop parsing.
//!
//! This module sits below `round` and `storage` and depends on neither.

use std::fmt;
use std::str::FromStr;

/// A stored outcome or status string that names nothing this coordinator writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{text}` in the state database")]
pub struct UnknownOutcome {
    /// Which column it came from.
    pub what: &'static str,
    /// The text.
    pub text: String,
}

/// How a sampled client's part in a task ended (`round_clients.outcome` for fit tasks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParticipantOutcome {
    /// Its update was folded into the round's sum.
    Accepted,
    /// The deadline passed before it delivered.
    Late(Lateness),
    /// It went silent (no heartbeat within the liveness timeout) while its task was open.
    Dropped,
    /// Its verified update was not folded.
    Refused(Refusal),
    /// The client reported that its task failed, in its own words.
    Failed(String),
    /// Folding its update failed inside the coordinator.
    FoldFailed,
}

/// What was missing when the deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lateness {
    /// No upload had started (fit).
    NoUpdate,
    /// An upload was still streaming (fit).
    UploadIncomplete,
    /// No evaluation report arrived (evaluate).
    NoReport,
}

/// Why a verified update was not folded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The strategy returned a weight below 1 or a scale outside (0, 1].
    InvalidWeighting,
    /// Its weight would take the round past the fixed-point bound on the total weight.
    TooManyExamples,
    /// The strategy refused it (its message).
    Strategy(String),
}

const ACCEPTED: &str = "accepted";
const LATE_NO_UPDATE: &str = "late: no update by the deadline";
const LATE_UPLOAD_INCOMPLETE: &str = "late: upload incomplete at the deadline";
const LATE_NO_REPORT: &str = "late: no report by the deadline";
const DROPPED: &str = "dropped: no heartbeat within the liveness timeout";
const REFUSED_INVALID_WEIGHTING: &str = "refused: invalid weighting";
const REFUSED_TOO_MANY_EXAMPLES: &str = "refused: too many examples";
const REFUSED_PREFIX: &str = "refused: ";
const FAILED_PREFIX: &str = "failed: ";
const FOLD_FAILED: &str = "internal error while folding";

impl ParticipantOutcome {
    /// True for [`ParticipantOutcome::Accepted`].
    pub fn is_accepted(&self) -> bool {
        matches!(self, ParticipantOutcome::Accepted)
    }

    /// True when the deadline ended it.
    pub fn is_late(&self) -> bool {
        matches!(self, ParticipantOutcome::Late(_))
    }
}

impl fmt::Display for ParticipantOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParticipantOutcome::Accepted => f.write_str(ACCEPTED),
            ParticipantOutcome::Late(Lateness::NoUpdate) => f.write_str(LATE_NO_UPDATE),
            ParticipantOutcome::Late(Lateness::UploadIncomplete) => f.write_str(LATE_UPLOAD_INCOMPLETE),
            ParticipantOutcome::Late(Lateness::NoReport) => f.write_str(LATE_NO_REPORT),
            ParticipantOutcome::Dropped => f.write_str(DROPPED),
            ParticipantOutcome::Refused(Refusal::InvalidWeighting) => f.write_str(REFUSED_INVALID_WEIGHTING),
            ParticipantOutcome::Refused(Refusal::TooManyExamples) => f.write_str(REFUSED_TOO_MANY_EXAMPLES),
            ParticipantOutcome::Refused(Refusal::Strategy(why)) => write!(f, "{REFUSED_PREFIX}{why}"),
            ParticipantOutcome::Failed(why) => write!(f, "{FAILED_PREFIX}{why}"),
            ParticipantOutcome::FoldFailed => f.write_str(FOLD_FAILED),
        }
    }
}

impl FromStr for ParticipantOutcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            ACCEPTED => ParticipantOutcome::Accepted,
            LATE_NO_UPDATE => ParticipantOutcome::Late(Lateness::NoUpdate),
            LATE_UPLOAD_INCOMPLETE => ParticipantOutcome::Late(Lateness::UploadIncomplete),
            LATE_NO_REPORT => ParticipantOutcome::Late(Lateness::NoReport),
            DROPPED => ParticipantOutcome::Dropped,
            REFUSED_INVALID_WEIGHTING => ParticipantOutcome::Refused(Refusal::InvalidWeighting),
            REFUSED_TOO_MANY_EXAMPLES => ParticipantOutcome::Refused(Refusal::TooManyExamples),
            FOLD_FAILED => ParticipantOutcome::FoldFailed,
            other => {
                if let Some(why) = other.strip_prefix(REFUSED_PREFIX) {
                    ParticipantOutcome::Refused(Refusal::Strategy(why.to_string()))
                } else if let Some(why) = other.strip_prefix(FAILED_PREFIX) {
                    ParticipantOutcome::Failed(why.to_string())
                } else {
                    return Err(UnknownOutcome { what: "participant outcome", text: other.to_string() });
                }
            }
        })
    }
}

/// Where an attempt stands (`rounds.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptStatus {
    /// Sampled; training or aggregating now.
    Running,
    /// Committed with its checkpoint; its model is published.
    Completed,
    /// Ended without a model (see [`AttemptFailure`]); the round is retried.
    Failed,
    /// The coordinator stopped while it was running.
    Aborted,
}

impl AttemptStatus {
    /// The stored string.
    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Running => "running",
            AttemptStatus::Completed => "completed",
            AttemptStatus::Failed => "failed",
            AttemptStatus::Aborted => "aborted",
        }
    }
}

impl fmt::Display for AttemptStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttemptStatus {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [AttemptStatus::Running, AttemptStatus::Completed, AttemptStatus::Failed, AttemptStatus::Aborted]
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownOutcome { what: "attempt status", text: s.to_string() })
    }
}

/// Why an attempt ended without a model (`rounds.reason` of a failed attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The draw was smaller than `rounds.min_fit`.
    TooFewSampled {
        /// Clients drawn.
        sampled: usize,
        /// Live clients at the draw.
        live: usize,
        /// `rounds.min_fit`.
        min_fit: usize,
    },
    /// Fewer than `rounds.min_fit` updates were folded by the end of training.
    TooFewAccepted {
        /// Updates folded.
        accepted: usize,
        /// `rounds.min_fit`.
        min_fit: usize,
    },
    /// Reading a staged update into the sum failed: the sum can no longer be trusted.
    FoldFailed(String),
    /// The task folding an update died, taking the sum with it.
    FoldTaskDied(String),
    /// The strategy chose to keep the previous model.
    StrategyKept,
    /// The strategy produced NaN or infinite weights.
    NonFiniteModel(String),
    /// The strategy failed.
    AggregationFailed(String),
    /// The strategy refused to release the round: publishing it would exceed the privacy budget
    /// (known only once the updates are in, e.g. dropouts lowered the distributed noise). Ends
    /// the federation cleanly.
    BudgetExhausted(String),
    /// The secure round could not be set up (a client without an identity key, parameters or
    /// an encoding refused); the next attempt draws again.
    SecureSetup(String),
    /// The secure round failed mid-way (fewer than the threshold remained at a step, too few
    /// shares to unmask, an implausible sum); the next attempt starts over with fresh keys.
    SecureAggregation(String),
}

impl AttemptFailure {
    /// Whether this failure ends the federation (a spent budget) rather than being retried.
    pub fn ends_federation(&self) -> bool {
        matches!(self, AttemptFailure::BudgetExhausted(_))
    }
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptFailure::TooFewSampled { sampled, live, min_fit } => {
                write!(f, "sampled {sampled} of {live} live clients, fewer than rounds.min_fit = {min_fit}")
            }
            AttemptFailure::TooFewAccepted { accepted, min_fit } => {
                write!(f, "{accepted} updates accepted, fewer than rounds.min_fit = {min_fit}")
            }
            AttemptFailure::FoldFailed(cause) => write!(f, "folding an update failed: {cause}"),
            AttemptFailure::FoldTaskDied(cause) => write!(f, "fold task died: {cause}"),
            AttemptFailure::StrategyKept => f.write_str("the strategy kept the previous model"),
            AttemptFailure::NonFiniteModel(cause) => {
                write!(f, "aggregation produced a non-finite model: {cause}")
            }
            AttemptFailure::AggregationFailed(cause) => write!(f, "aggregation failed: {cause}"),
            AttemptFailure::BudgetExhausted(reason) => f.write_str(reason),
            AttemptFailure::SecureSetup(cause) => write!(f, "secure aggregation set-up failed: {cause}"),
            AttemptFailure::SecureAggregation(cause) => write!(f, "secure aggregation failed: {cause}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_outcome() -> Vec<ParticipantOutcome> {
        vec![
            ParticipantOutcome::Accepted,
            ParticipantOutcome::Late(Lateness::NoUpdate),
            ParticipantOutcome::Late(Lateness::UploadIncomplete),
            ParticipantOutcome::Late(Lateness::NoReport),
            ParticipantOutcome::Dropped,
            ParticipantOutcome::Refused(Refusal::InvalidWeighting),
            ParticipantOutcome::Refused(Refusal::TooManyExamples),
            ParticipantOutcome::Refused(Refusal::Strategy("update refused by the strategy: norm".into())),
            ParticipantOutcome::Failed("out of memory".into()),
            ParticipantOutcome::FoldFailed,
        ]
    }

    #[test]
    fn every_participant_outcome_reads_back_from_its_stored_string() {
        for o in every_outcome() {
            assert_eq!(o.to_string().parse::<ParticipantOutcome>(), Ok(o.clone()), "{o}");
        }
        assert!("uploading(3)".parse::<ParticipantOutcome>().is_err());
    }

    #[test]
    fn the_stored_strings_are_the_ones_existing_state_directories_hold() {
        let stored: Vec<String> = every_outcome().iter().map(ToString::to_string).collect();
        assert_eq!(
            stored,
            [
                "accepted",
                "late: no update by the deadline",
                "late: upload incomplete at the deadline",
                "late: no report by the deadline",
                "dropped: no heartbeat within the liveness timeout",
                "refused: invalid weighting",
                "refused: too many examples",
                "refused: update refused by the strategy: norm",
                "failed: out of memory",
                "internal error while folding",
            ]
        );
        let statuses: Vec<&str> =
            [AttemptStatus::Running, AttemptStatus::Completed, AttemptStatus::Failed, AttemptStatus::Aborted]
                .map(AttemptStatus::as_str)
                .to_vec();
        assert_eq!(statuses, ["running", "completed", "failed", "aborted"]);
        for s in statuses {
            assert_eq!(s.parse::<AttemptStatus>().unwrap().as_str(), s);
        }
        assert!("done".parse::<AttemptStatus>().is_err());
    }

    #[test]
    fn a_failed_attempt_names_its_cause_as_before() {
        let f = AttemptFailure::TooFewAccepted { accepted: 1, min_fit: 2 };
        assert_eq!(f.to_string(), "1 updates accepted, fewer than rounds.min_fit = 2");
        let f = AttemptFailure::TooFewSampled { sampled: 1, live: 3, min_fit: 2 };
        assert_eq!(f.to_string(), "sampled 1 of 3 live clients, fewer than rounds.min_fit = 2");
    }
}
