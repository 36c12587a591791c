//! Turning the coordinator's round summaries (its `GetStatus` answer, fetched with
//! [`crate::operator::fetch_status`] exactly as an operator would) into report rows.

use fedtune_shared::round::{PrivacyStatus, RoundSummary, StatusReport};

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

/// The run's privacy model in one phrase (`no privacy guarantee` without DP). The table's
/// `epsilon` column is the central ε of the published models; under local noise the phrase adds
/// the second number, the most-sampled client's local ε against the coordinator (no
/// amplification: the coordinator knows who was drawn), as of this report.
pub fn privacy_label(report: &StatusReport) -> String {
    privacy_label_of(&report.privacy)
}

fn privacy_label_of(p: &PrivacyStatus) -> String {
    match (p.mode.as_str(), p.local_epsilon) {
        ("none", _) => p.guarantee.clone(),
        (_, Some(local)) => format!(
            "{} DP, δ = {:e}; ε column: published models; local ε = {local:.3} for the most-sampled client \
             ({} participation(s))",
            p.mode, p.delta, p.max_participations
        ),
        _ => format!("{} DP, δ = {:e}", p.mode, p.delta),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_local_noise_the_label_carries_the_most_sampled_clients_local_epsilon() {
        let privacy = PrivacyStatus {
            mode: "local".into(),
            delta: 1e-5,
            local_epsilon: Some(17.8566),
            max_participations: 10,
            ..PrivacyStatus::none()
        };
        let label = label_of(privacy);
        assert!(label.contains("local ε = 17.857") && label.contains("10 participation"), "{label}");
        let central = PrivacyStatus { mode: "central".into(), delta: 1e-5, ..PrivacyStatus::none() };
        assert_eq!(label_of(central), "central DP, δ = 1e-5");
    }

    fn label_of(privacy: PrivacyStatus) -> String {
        privacy_label_of(&privacy)
    }
}
