//! Evaluating: score a published model on the held-out split and report it.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedtune_shared::params::ParameterVector;
use fedtune_shared::round::{ClientActivity, EvalReport, EvaluateTask, FailureCode};
use tokio::time::Instant;

use super::heartbeat::supervise;
use super::{Agent, AgentError, State, Work};
use crate::transport::CoordinatorApi;

impl<C: CoordinatorApi + 'static> Agent<C> {
    /// Evaluates, then reports (retrying the report itself if the coordinator is away).
    pub(super) async fn evaluate(
        &mut self,
        task: EvaluateTask,
        deadline: Instant,
        global: Arc<ParameterVector>,
    ) -> Result<State, AgentError> {
        let work = Work::Evaluate { task: task.clone(), deadline };
        let supervision = self.supervision(ClientActivity::Evaluating, &work, None);
        let worker = self.worker.as_ref().ok_or(AgentError::WorkerGone)?;
        let outcome = match supervise(supervision, worker.evaluate(Arc::clone(&global))).await {
            Ok(done) => done?,
            Err(stop) => return Ok(self.stopped(stop, State::Evaluating { task, deadline, global }).await),
        };
        let eval = match outcome {
            Ok(eval) if eval.num_examples > 0 => eval,
            Ok(_) => {
                self.report_failure(
                    &work,
                    FailureCode::EvaluationFailed,
                    "no held-out examples to evaluate on",
                )
                .await;
                return Ok(State::Idle);
            }
            Err(e) => {
                self.report_failure(&work, FailureCode::EvaluationFailed, &e.to_string()).await;
                return Ok(State::Idle);
            }
        };
        tracing::info!(
            round = task.round,
            loss = eval.loss,
            accuracy = eval.accuracy,
            examples = eval.num_examples,
            "evaluated"
        );
        let report = EvalReport {
            round: task.round,
            model_version: task.model.version,
            num_examples: eval.num_examples,
            loss: eval.loss,
            accuracy: eval.accuracy.clamp(0.0, 1.0),
            metrics: BTreeMap::from([("macro_f1".to_string(), eval.macro_f1)])
                .into_iter()
                .filter(|(_, v)| v.is_finite())
                .collect(),
        };
        // The report is small and evaluation may have been expensive: retry it (with backoff,
        // until the task's deadline) rather than evaluating again.
        loop {
            match self.api.report_evaluation(report.clone()).await {
                Ok(()) => {
                    self.contact();
                    self.stats.evaluations += 1;
                    return Ok(State::Idle);
                }
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tracing::warn!(error = %e, "reporting the evaluation failed; retrying");
                    if self.backoff.wait(&self.shutdown).await.is_err() {
                        return Ok(State::Shutdown(super::ExitReason::Shutdown));
                    }
                }
                Err(e) => return self.on_error(e, State::Idle, Some(&work)).await,
            }
        }
    }
}
