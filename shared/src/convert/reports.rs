//! Evaluation results and failure reports.

use super::*;

impl TryFrom<pb::ReportEvaluationRequest> for EvalReport {
    type Error = ConvertError;
    fn try_from(r: pb::ReportEvaluationRequest) -> Result<Self, ConvertError> {
        if r.num_examples == 0 || r.num_examples > MAX_NUM_EXAMPLES {
            return Err(invalid(
                "num_examples",
                format!("{} is outside 1..={MAX_NUM_EXAMPLES}", r.num_examples),
            ));
        }
        if !(r.loss.is_finite() && r.loss >= 0.0) {
            return Err(invalid("loss", "must be finite and non-negative"));
        }
        if !(0.0..=1.0).contains(&r.accuracy) {
            return Err(invalid("accuracy", "must be in [0, 1]"));
        }
        Ok(EvalReport {
            round: r.round,
            model_version: ModelVersion(r.model_version),
            num_examples: r.num_examples,
            loss: r.loss,
            accuracy: r.accuracy,
            metrics: finite_metrics("metrics", r.metrics)?,
        })
    }
}

impl From<&EvalReport> for pb::ReportEvaluationRequest {
    fn from(r: &EvalReport) -> Self {
        pb::ReportEvaluationRequest {
            round: r.round,
            model_version: r.model_version.0,
            num_examples: r.num_examples,
            loss: r.loss,
            accuracy: r.accuracy,
            metrics: r.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

impl TryFrom<pb::ReportFailureRequest> for FailureReport {
    type Error = ConvertError;
    fn try_from(r: pb::ReportFailureRequest) -> Result<Self, ConvertError> {
        let kind = match pb::TaskKind::try_from(r.kind) {
            Ok(pb::TaskKind::Fit) => TaskKind::Fit,
            Ok(pb::TaskKind::Evaluate) => TaskKind::Evaluate,
            _ => return Err(invalid("kind", format!("unknown task kind {}", r.kind))),
        };
        let mut reason = r.reason;
        if reason.len() > 1024 {
            let mut cut = 1024;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Ok(FailureReport { id: RoundId::new(r.round, r.attempt), kind, reason })
    }
}

impl From<&FailureReport> for pb::ReportFailureRequest {
    fn from(r: &FailureReport) -> Self {
        let kind = match r.kind {
            TaskKind::Fit => pb::TaskKind::Fit,
            TaskKind::Evaluate => pb::TaskKind::Evaluate,
        };
        pb::ReportFailureRequest {
            round: r.id.round,
            attempt: r.id.attempt,
            kind: kind as i32,
            reason: r.reason.clone(),
        }
    }
}
