//! Tasks: phases, fit configuration, privacy instructions, the long-poll answer.

use std::sync::Arc;

use super::*;
use crate::compression::UpdateEncoding;
use crate::schedule::LrSchedule;
use crate::secagg::SecureTask;

pub(super) fn phase_from(v: i32) -> Result<PhaseName, ConvertError> {
    use pb::Phase as P;
    Ok(match P::try_from(v).map_err(|_| invalid("phase", format!("unknown phase {v}")))? {
        P::Idle => PhaseName::Idle,
        P::Selecting => PhaseName::Selecting,
        P::Training => PhaseName::Training,
        P::Aggregating => PhaseName::Aggregating,
        P::Publishing => PhaseName::Publishing,
        P::Evaluating => PhaseName::Evaluating,
        P::Failure => PhaseName::Failure,
        P::Finished => PhaseName::Finished,
        P::Shutdown => PhaseName::Shutdown,
        P::Unmasking => PhaseName::Unmasking,
        P::Unspecified => return Err(invalid("phase", "unspecified")),
    })
}

/// Wire value of a phase.
pub fn phase_to_pb(p: PhaseName) -> pb::Phase {
    match p {
        PhaseName::Idle => pb::Phase::Idle,
        PhaseName::Selecting => pb::Phase::Selecting,
        PhaseName::Training => pb::Phase::Training,
        PhaseName::Aggregating => pb::Phase::Aggregating,
        PhaseName::Publishing => pb::Phase::Publishing,
        PhaseName::Evaluating => pb::Phase::Evaluating,
        PhaseName::Failure => pb::Phase::Failure,
        PhaseName::Finished => pb::Phase::Finished,
        PhaseName::Shutdown => pb::Phase::Shutdown,
        PhaseName::Unmasking => pb::Phase::Unmasking,
    }
}

impl TryFrom<pb::FitConfig> for FitInstructions {
    type Error = ConvertError;
    fn try_from(c: pb::FitConfig) -> Result<Self, ConvertError> {
        if c.batch_size == 0 {
            return Err(invalid("config.batch_size", "must be at least 1"));
        }
        if !(c.learning_rate.is_finite() && c.learning_rate > 0.0) {
            return Err(invalid("config.learning_rate", "must be finite and positive"));
        }
        if !(c.proximal_mu.is_finite() && c.proximal_mu >= 0.0) {
            return Err(invalid("config.proximal_mu", "must be finite and non-negative"));
        }
        Ok(FitInstructions {
            epochs: c.epochs,
            batch_size: c.batch_size,
            learning_rate: c.learning_rate,
            proximal_mu: c.proximal_mu,
            max_steps: (c.max_steps != 0).then_some(c.max_steps),
            seed: c.seed,
            lr_schedule: lr_schedule_from(c.lr_schedule)?,
            warmup_steps: c.warmup_steps,
            update_encoding: update_encoding_from(c.update_encoding)?,
        })
    }
}

fn update_encoding_from(v: i32) -> Result<UpdateEncoding, ConvertError> {
    use pb::UpdateEncoding as P;
    match P::try_from(v) {
        // A coordinator that predates the field sends nothing: the f32 delta it always took.
        Ok(P::Unspecified | P::F32Delta) => Ok(UpdateEncoding::F32),
        Ok(P::Int8Block) => Ok(UpdateEncoding::Int8),
        // A secure round says so in its own field; a masked encoding here is a mistake.
        Ok(P::MaskedU32) | Err(_) => Err(invalid(
            "config.update_encoding",
            format!("{v} is not an update encoding a client can be asked for"),
        )),
    }
}

fn lr_schedule_from(v: i32) -> Result<LrSchedule, ConvertError> {
    use pb::LrSchedule as P;
    Ok(match P::try_from(v).map_err(|_| invalid("config.lr_schedule", format!("unknown schedule {v}")))? {
        // A coordinator that predates the field sends nothing: the federation default.
        P::Unspecified | P::Constant => LrSchedule::Constant,
        P::Linear => LrSchedule::Linear,
        P::Cosine => LrSchedule::Cosine,
    })
}

fn lr_schedule_to_pb(s: LrSchedule) -> pb::LrSchedule {
    match s {
        LrSchedule::Constant => pb::LrSchedule::Constant,
        LrSchedule::Linear => pb::LrSchedule::Linear,
        LrSchedule::Cosine => pb::LrSchedule::Cosine,
    }
}

impl From<&FitInstructions> for pb::FitConfig {
    fn from(c: &FitInstructions) -> Self {
        pb::FitConfig {
            epochs: c.epochs,
            batch_size: c.batch_size,
            learning_rate: c.learning_rate,
            proximal_mu: c.proximal_mu,
            max_steps: c.max_steps.unwrap_or(0),
            seed: c.seed,
            lr_schedule: lr_schedule_to_pb(c.lr_schedule) as i32,
            warmup_steps: c.warmup_steps,
            update_encoding: super::upload::encoding_to_pb(c.update_encoding) as i32,
        }
    }
}

impl TryFrom<pb::PrivacyInstructions> for PrivacyInstructions {
    type Error = ConvertError;
    fn try_from(p: pb::PrivacyInstructions) -> Result<Self, ConvertError> {
        let mode = match pb::PrivacyMode::try_from(p.mode) {
            Ok(pb::PrivacyMode::None) => PrivacyMode::None,
            Ok(pb::PrivacyMode::Local) => PrivacyMode::Local,
            Ok(pb::PrivacyMode::Central) => PrivacyMode::Central,
            Ok(pb::PrivacyMode::Distributed) => PrivacyMode::Distributed,
            _ => return Err(invalid("privacy.mode", format!("unknown privacy mode {}", p.mode))),
        };
        if mode != PrivacyMode::None && !(p.clip_norm.is_finite() && p.clip_norm > 0.0) {
            return Err(invalid("privacy.clip_norm", "must be finite and positive"));
        }
        if !(p.noise_stddev.is_finite() && p.noise_stddev >= 0.0) {
            return Err(invalid("privacy.noise_stddev", "must be finite and non-negative"));
        }
        if let Some(k) = p.grid_log2.filter(|k| !(-200..=200).contains(k)) {
            return Err(invalid("privacy.grid_log2", format!("{k} is outside [-200, 200]")));
        }
        if !(p.indicator_noise_stddev.is_finite() && p.indicator_noise_stddev >= 0.0) {
            return Err(invalid("privacy.indicator_noise_stddev", "must be finite and non-negative"));
        }
        if !(p.noise_multiplier.is_finite() && p.noise_multiplier >= 0.0) {
            return Err(invalid("privacy.noise_multiplier", "must be finite and non-negative"));
        }
        Ok(PrivacyInstructions {
            mode,
            clip_norm: p.clip_norm,
            noise_stddev: p.noise_stddev,
            grid_log2: p.grid_log2,
            report_clip_indicator: p.report_clip_indicator,
            indicator_noise_stddev: p.indicator_noise_stddev,
            per_layer_clipping: p.per_layer_clipping,
            noise_multiplier: p.noise_multiplier,
        })
    }
}

impl From<PrivacyInstructions> for pb::PrivacyInstructions {
    fn from(p: PrivacyInstructions) -> Self {
        let mode = match p.mode {
            PrivacyMode::None => pb::PrivacyMode::None,
            PrivacyMode::Local => pb::PrivacyMode::Local,
            PrivacyMode::Central => pb::PrivacyMode::Central,
            PrivacyMode::Distributed => pb::PrivacyMode::Distributed,
        };
        pb::PrivacyInstructions {
            mode: mode as i32,
            clip_norm: p.clip_norm,
            noise_stddev: p.noise_stddev,
            grid_log2: p.grid_log2,
            report_clip_indicator: p.report_clip_indicator,
            indicator_noise_stddev: p.indicator_noise_stddev,
            per_layer_clipping: p.per_layer_clipping,
            noise_multiplier: p.noise_multiplier,
        }
    }
}

impl TryFrom<pb::WaitForTaskResponse> for Task {
    type Error = ConvertError;
    fn try_from(r: pb::WaitForTaskResponse) -> Result<Self, ConvertError> {
        use pb::wait_for_task_response::Task as T;
        Ok(match r.task.ok_or(ConvertError::Missing("task"))? {
            T::Fit(f) => Task::Fit(FitTask {
                id: RoundId::new(f.round, f.attempt),
                model: f.model.ok_or(ConvertError::Missing("fit.model"))?.try_into()?,
                config: f.config.ok_or(ConvertError::Missing("fit.config"))?.try_into()?,
                deadline_in: Duration::from_millis(f.deadline_in_ms),
                deadline_unix_ms: f.deadline_unix_ms,
                privacy: f.privacy.ok_or(ConvertError::Missing("fit.privacy"))?.try_into()?,
                secure_aggregation: f.secure_aggregation.map(SecureTask::try_from).transpose()?.map(Arc::new),
            }),
            T::Evaluate(e) => {
                if e.batch_size == 0 {
                    return Err(invalid("evaluate.batch_size", "must be at least 1"));
                }
                Task::Evaluate(EvaluateTask {
                    round: e.round,
                    model: e.model.ok_or(ConvertError::Missing("evaluate.model"))?.try_into()?,
                    batch_size: e.batch_size,
                    deadline_in: Duration::from_millis(e.deadline_in_ms),
                    deadline_unix_ms: e.deadline_unix_ms,
                })
            }
            T::None(n) => Task::None {
                retry_after: Duration::from_millis(n.retry_after_ms),
                phase: phase_from(n.phase)?,
                round: n.round,
            },
            T::Finished(f) => {
                Task::Finished { final_version: ModelVersion(f.final_model_version), reason: f.reason }
            }
        })
    }
}

impl From<Task> for pb::WaitForTaskResponse {
    fn from(t: Task) -> Self {
        use pb::wait_for_task_response::Task as T;
        let task = match t {
            Task::Fit(f) => T::Fit(pb::FitTask {
                round: f.id.round,
                attempt: f.id.attempt,
                model: Some(f.model.into()),
                config: Some((&f.config).into()),
                deadline_in_ms: ms(f.deadline_in),
                deadline_unix_ms: f.deadline_unix_ms,
                privacy: Some(f.privacy.into()),
                secure_aggregation: f.secure_aggregation.as_deref().map(Into::into),
            }),
            Task::Evaluate(e) => T::Evaluate(pb::EvaluateTask {
                round: e.round,
                model: Some(e.model.into()),
                batch_size: e.batch_size,
                deadline_in_ms: ms(e.deadline_in),
                deadline_unix_ms: e.deadline_unix_ms,
            }),
            Task::None { retry_after, phase, round } => T::None(pb::NoTask {
                retry_after_ms: ms(retry_after),
                phase: phase_to_pb(phase) as i32,
                round,
            }),
            Task::Finished { final_version, reason } => {
                T::Finished(pb::Finished { final_model_version: final_version.0, reason })
            }
        };
        pb::WaitForTaskResponse { task: Some(task) }
    }
}
