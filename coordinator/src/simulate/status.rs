//! Turning the coordinator's round summaries (its `GetStatus` answer, fetched with
//! [`crate::operator::fetch_status`] exactly as an operator would) into report rows.

use fedtune_shared::round::{RoundSummary, StatusReport};

use super::report::RoundRow;

/// NaN (the protocol's "none") becomes `None`.
fn metric(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// One report row per completed round, oldest first (a round retried after a failed attempt
/// appears once, with its completed attempt).
pub fn completed_rounds(report: &StatusReport) -> Vec<RoundRow> {
    let privacy = privacy_label(report);
    let mut rows: Vec<RoundRow> =
        report.recent_rounds.iter().filter(|r| r.status == "completed").map(|r| row(r, &privacy)).collect();
    rows.sort_by_key(|r| r.round);
    rows.dedup_by_key(|r| r.round);
    rows
}

/// The run's privacy model in one phrase (`no privacy guarantee` without DP).
pub fn privacy_label(report: &StatusReport) -> String {
    let p = &report.privacy;
    if p.mode == "none" {
        p.guarantee.clone()
    } else {
        format!("{} DP, δ = {:e}", p.mode, p.delta)
    }
}

fn row(r: &RoundSummary, privacy: &str) -> RoundRow {
    RoundRow {
        round: r.id.round,
        participants: r.accepted,
        train_loss: metric(r.train_loss),
        eval_loss: metric(r.eval_loss),
        eval_accuracy: metric(r.eval_accuracy),
        bytes: r.bytes_sent + r.bytes_received,
        seconds: r.duration.as_secs_f64(),
        epsilon: r.epsilon,
        privacy: privacy.to_string(),
    }
}
