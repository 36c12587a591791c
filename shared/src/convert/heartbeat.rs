//! Heartbeats: client activity and liveness.

use super::*;

pub(super) fn activity_from(v: i32) -> Result<ClientActivity, ConvertError> {
    use pb::ClientActivity as A;
    Ok(match A::try_from(v) {
        Ok(A::Idle) => ClientActivity::Idle,
        Ok(A::Downloading) => ClientActivity::Downloading,
        Ok(A::Training) => ClientActivity::Training,
        Ok(A::Uploading) => ClientActivity::Uploading,
        Ok(A::Evaluating) => ClientActivity::Evaluating,
        _ => return Err(invalid("activity", format!("unknown activity {v}"))),
    })
}

/// Wire value of an activity.
pub fn activity_to_pb(a: ClientActivity) -> pb::ClientActivity {
    match a {
        ClientActivity::Idle => pb::ClientActivity::Idle,
        ClientActivity::Downloading => pb::ClientActivity::Downloading,
        ClientActivity::Training => pb::ClientActivity::Training,
        ClientActivity::Uploading => pb::ClientActivity::Uploading,
        ClientActivity::Evaluating => pb::ClientActivity::Evaluating,
    }
}

impl TryFrom<pb::HeartbeatRequest> for Heartbeat {
    type Error = ConvertError;
    fn try_from(h: pb::HeartbeatRequest) -> Result<Self, ConvertError> {
        Ok(Heartbeat { activity: activity_from(h.activity)?, round: (h.round != 0).then_some(h.round) })
    }
}

impl From<Heartbeat> for pb::HeartbeatRequest {
    fn from(h: Heartbeat) -> Self {
        pb::HeartbeatRequest { activity: activity_to_pb(h.activity) as i32, round: h.round.unwrap_or(0) }
    }
}

impl TryFrom<pb::HeartbeatResponse> for HeartbeatReply {
    type Error = ConvertError;
    fn try_from(h: pb::HeartbeatResponse) -> Result<Self, ConvertError> {
        Ok(HeartbeatReply {
            phase: phase_from(h.phase)?,
            round: RoundId::new(h.round, h.attempt),
            model_version: ModelVersion(h.model_version),
            task_still_wanted: h.task_still_wanted,
        })
    }
}

impl From<HeartbeatReply> for pb::HeartbeatResponse {
    fn from(h: HeartbeatReply) -> Self {
        pb::HeartbeatResponse {
            phase: phase_to_pb(h.phase) as i32,
            round: h.round.round,
            attempt: h.round.attempt,
            model_version: h.model_version.0,
            task_still_wanted: h.task_still_wanted,
        }
    }
}
