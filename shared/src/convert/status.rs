//! The operator status view.

use super::*;

impl From<&StatusReport> for pb::GetStatusResponse {
    fn from(s: &StatusReport) -> Self {
        pb::GetStatusResponse {
            protocol_version: s.protocol_version,
            phase: phase_to_pb(s.phase) as i32,
            round: s.round.round,
            attempt: s.round.attempt,
            model_version: s.model_version.0,
            total_rounds: s.total_rounds,
            strategy: s.strategy.clone(),
            deadline_in_ms: s.deadline_in.map(ms).unwrap_or(0),
            clients: s
                .clients
                .iter()
                .map(|c| pb::ClientStatus {
                    client_id: c.client_id.to_string(),
                    alive: c.alive,
                    last_seen_ms_ago: ms(c.last_seen_ago),
                    activity: activity_to_pb(c.activity) as i32,
                    rounds_contributed: c.rounds_contributed,
                })
                .collect(),
            recent_rounds: s
                .recent_rounds
                .iter()
                .map(|r| pb::RoundSummary {
                    round: r.id.round,
                    attempt: r.id.attempt,
                    status: r.status.clone(),
                    selected: r.selected,
                    accepted: r.accepted,
                    failed: r.failed,
                    total_examples: r.total_examples,
                    train_loss: r.train_loss,
                    eval_loss: r.eval_loss,
                    eval_accuracy: r.eval_accuracy,
                    eval_examples: r.eval_examples,
                    duration_ms: ms(r.duration),
                    reason: r.reason.clone(),
                    bytes_sent: r.bytes_sent,
                    bytes_received: r.bytes_received,
                    epsilon: r.epsilon,
                    local_epsilon: r.local_epsilon,
                    secagg_clients: r.secure.map(|f| f.clients),
                    secagg_threshold: r.secure.map(|f| f.threshold),
                    secagg_degree: r.secure.map(|f| f.degree),
                })
                .collect(),
            accepted_updates: s.accepted_updates,
            privacy: Some(pb::PrivacyStatus {
                mode: s.privacy.mode.clone(),
                guarantee: s.privacy.guarantee.clone(),
                epsilon: s.privacy.epsilon,
                delta: s.privacy.delta,
                target_epsilon: s.privacy.target_epsilon.unwrap_or(0.0),
                noise_multiplier: s.privacy.noise_multiplier,
                clip_norm: s.privacy.clip_norm,
                sampling: s.privacy.sampling.clone(),
                rounds_charged: s.privacy.rounds_charged,
                local_epsilon: s.privacy.local_epsilon,
                max_participations: s.privacy.max_participations,
                evaluation_outside_guarantee: s.privacy.evaluation_outside_guarantee,
            }),
            finished_reason: s.finished_reason.clone().unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::GetStatusResponse> for StatusReport {
    type Error = ConvertError;
    fn try_from(s: pb::GetStatusResponse) -> Result<Self, ConvertError> {
        Ok(StatusReport {
            protocol_version: s.protocol_version,
            phase: phase_from(s.phase)?,
            round: RoundId::new(s.round, s.attempt),
            model_version: ModelVersion(s.model_version),
            total_rounds: s.total_rounds,
            strategy: s.strategy,
            deadline_in: (s.deadline_in_ms != 0).then(|| Duration::from_millis(s.deadline_in_ms)),
            clients: s
                .clients
                .into_iter()
                .map(|c| {
                    Ok(ClientStatus {
                        client_id: ClientId::parse(&c.client_id)?,
                        alive: c.alive,
                        last_seen_ago: Duration::from_millis(c.last_seen_ms_ago),
                        activity: activity_from(c.activity)?,
                        rounds_contributed: c.rounds_contributed,
                    })
                })
                .collect::<Result<_, ConvertError>>()?,
            recent_rounds: s
                .recent_rounds
                .into_iter()
                .map(|r| RoundSummary {
                    id: RoundId::new(r.round, r.attempt),
                    status: r.status,
                    selected: r.selected,
                    accepted: r.accepted,
                    failed: r.failed,
                    total_examples: r.total_examples,
                    train_loss: r.train_loss,
                    eval_loss: r.eval_loss,
                    eval_accuracy: r.eval_accuracy,
                    eval_examples: r.eval_examples,
                    duration: Duration::from_millis(r.duration_ms),
                    reason: r.reason,
                    bytes_sent: r.bytes_sent,
                    bytes_received: r.bytes_received,
                    epsilon: r.epsilon,
                    local_epsilon: r.local_epsilon.filter(|e| e.is_finite() && *e >= 0.0),
                    // A partial triple is no secure round anyone can read.
                    secure: match (r.secagg_clients, r.secagg_threshold, r.secagg_degree) {
                        (Some(clients), Some(threshold), Some(degree)) => {
                            Some(SecureRoundFigures { clients, threshold, degree })
                        }
                        _ => None,
                    },
                })
                .collect(),
            accepted_updates: s.accepted_updates,
            // A coordinator that does not send the field runs without DP.
            privacy: s
                .privacy
                .map(|p| PrivacyStatus {
                    mode: p.mode,
                    guarantee: p.guarantee,
                    epsilon: p.epsilon,
                    delta: p.delta,
                    target_epsilon: (p.target_epsilon > 0.0).then_some(p.target_epsilon),
                    noise_multiplier: p.noise_multiplier,
                    clip_norm: p.clip_norm,
                    sampling: p.sampling,
                    rounds_charged: p.rounds_charged,
                    local_epsilon: p.local_epsilon.filter(|e| e.is_finite() && *e >= 0.0),
                    max_participations: p.max_participations,
                    evaluation_outside_guarantee: p.evaluation_outside_guarantee,
                })
                .unwrap_or_else(PrivacyStatus::none),
            finished_reason: (!s.finished_reason.is_empty()).then_some(s.finished_reason),
        })
    }
}
