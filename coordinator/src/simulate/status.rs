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
    let outside = report.privacy.evaluation_outside_guarantee;
    let mut rows: Vec<RoundRow> = report
        .recent_rounds
        .iter()
        .filter(|r| r.status == "completed")
        .map(|r| row(r, &privacy, outside))
        .collect();
    rows.sort_by_key(|r| r.round);
    rows.dedup_by_key(|r| r.round);
    rows
}

/// The run's privacy model in one phrase (`no privacy guarantee` without DP). The table's
/// `epsilon` column is the central ε of the published models; under local noise the phrase adds
/// the second number, the worst-off client's local ε against the coordinator (no
/// amplification: the coordinator knows who was drawn), as of this report, which the
/// `local_eps` column gives per round. Evaluation under DP is labelled outside the guarantee.
pub fn privacy_label(report: &StatusReport) -> String {
    privacy_label_of(&report.privacy)
}

fn privacy_label_of(p: &PrivacyStatus) -> String {
    let label = match (p.mode.as_str(), p.local_epsilon) {
        ("none", _) => return p.guarantee.clone(),
        (_, Some(local)) => format!(
            "{} DP, δ = {:e}; ε column: published models; local ε = {local:.3} for the worst-off client \
             ({} participation(s))",
            p.mode, p.delta, p.max_participations
        ),
        _ => format!("{} DP, δ = {:e}", p.mode, p.delta),
    };
    if p.evaluation_outside_guarantee {
        format!("{label}; evaluation (* columns) is {}", PrivacyStatus::EVALUATION_OUTSIDE)
    } else {
        label
    }
}

fn row(r: &RoundSummary, privacy: &str, eval_outside_privacy_guarantee: bool) -> RoundRow {
    RoundRow {
        round: r.id.round,
        participants: r.accepted,
        train_loss: metric(r.train_loss),
        eval_loss: metric(r.eval_loss),
        eval_accuracy: metric(r.eval_accuracy),
        bytes: r.bytes_sent + r.bytes_received,
        seconds: r.duration.as_secs_f64(),
        epsilon: r.epsilon,
        local_epsilon: r.local_epsilon,
        eval_outside_privacy_guarantee,
        privacy: privacy.to_string(),
        secagg_clients: r.secure.map(|f| f.clients),
        secagg_threshold: r.secure.map(|f| f.threshold),
        secagg_degree: r.secure.map(|f| f.degree),
        // The masked inputs in the unmasked sum are the accepted updates.
        secagg_survivors: r.secure.map(|_| r.accepted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_local_noise_the_label_carries_the_worst_off_clients_local_epsilon() {
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

    #[test]
    fn evaluation_under_dp_is_labelled_outside_the_guarantee_in_the_privacy_line_and_every_row() {
        let privacy = PrivacyStatus {
            mode: "central".into(),
            delta: 1e-5,
            evaluation_outside_guarantee: true,
            ..PrivacyStatus::none()
        };
        assert_eq!(
            label_of(privacy.clone()),
            "central DP, δ = 1e-5; evaluation (* columns) is outside the privacy guarantee"
        );
        let report = StatusReport {
            protocol_version: 1,
            phase: fedtune_shared::round::PhaseName::Finished,
            round: fedtune_shared::ids::RoundId::new(1, 0),
            model_version: fedtune_shared::ids::ModelVersion(1),
            total_rounds: 1,
            strategy: "fedavg".into(),
            deadline_in: None,
            clients: vec![],
            recent_rounds: vec![RoundSummary {
                id: fedtune_shared::ids::RoundId::new(1, 0),
                status: "completed".into(),
                selected: 1,
                accepted: 1,
                failed: 0,
                total_examples: 1,
                train_loss: f64::NAN,
                eval_loss: 0.4,
                eval_accuracy: 0.8,
                eval_examples: 5,
                duration: std::time::Duration::from_secs(1),
                reason: String::new(),
                bytes_sent: 0,
                bytes_received: 0,
                epsilon: Some(1.0),
                local_epsilon: Some(3.0),
                secure: None,
            }],
            accepted_updates: 0,
            privacy,
            finished_reason: None,
        };
        let rows = completed_rounds(&report);
        assert!(rows[0].eval_outside_privacy_guarantee);
        assert_eq!((rows[0].epsilon, rows[0].local_epsilon), (Some(1.0), Some(3.0)));
    }

    fn label_of(privacy: PrivacyStatus) -> String {
        privacy_label_of(&privacy)
    }
}
