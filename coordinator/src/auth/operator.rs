//! Who may see what of `GetStatus`: the operator sees everything, anyone else only the
//! federation's progress and its privacy guarantee.
//!
//! Per-client detail (names, liveness, activity, last-seen times, rounds contributed) and
//! per-round detail (how many clients were sampled, which updates were accepted, the metrics
//! they reported) tell an observer who trains when. Under sampling-based DP that is exactly the
//! secret amplification by subsampling relies on, and even without DP it is the members' business.
//! So it leaves the coordinator only to a caller presenting the operator token
//! (`<state_dir>/operator.token`, see [`fedtune_shared::crypto::OperatorToken`]) or, under
//! mutual TLS, the operator certificate ([`crate::auth::peer::is_operator_certificate`]).

use fedtune_shared::round::StatusReport;

/// What an anonymous `GetStatus` caller gets: phase, round, published version, rounds
/// configured, strategy, deadline, why the federation ended and the privacy status; nothing per
/// client and nothing per round (no client list, no round summaries, no accepted-update count).
pub fn anonymous_view(report: StatusReport) -> StatusReport {
    StatusReport { clients: Vec::new(), recent_rounds: Vec::new(), accepted_updates: 0, ..report }
}
