//! Training: local training from the global weights, then the upload pipeline, on the
//! trainer thread.

use std::sync::Arc;

use fedtune_shared::params::ParameterVector;
use fedtune_shared::round::{ClientActivity, FailureCode, FitTask};
use fedtune_shared::schedule::Warmup;
use tokio::time::Instant;

use super::heartbeat::supervise;
use super::worker::JobError;
use super::{Agent, AgentError, Pending, State, Work};
use crate::local_trainer::FitConfig;
use crate::transport::CoordinatorApi;
use crate::update::TaskContext;

/// The trainer's view of a fit task's configuration.
pub(super) fn fit_config(task: &FitTask) -> FitConfig {
    FitConfig {
        round: task.id.round,
        epochs: task.config.epochs,
        batch_size: task.config.batch_size as usize,
        learning_rate: task.config.learning_rate,
        proximal_mu: task.config.proximal_mu,
        max_steps: task.config.max_steps,
        seed: task.config.seed,
        lr_schedule: task.config.lr_schedule,
        warmup: Warmup::Steps(task.config.warmup_steps),
    }
}

impl<C: CoordinatorApi + 'static> Agent<C> {
    /// Training: fit, then prepare the update; then upload it.
    pub(super) async fn fit(
        &mut self,
        task: FitTask,
        deadline: Instant,
        global: Arc<ParameterVector>,
    ) -> Result<State, AgentError> {
        if task.secure_aggregation.is_some() {
            return self.secure_fit(task, deadline, global).await;
        }
        let Some((client_id, limits)) = self.session.as_ref().map(|s| (s.client_id.clone(), s.limits)) else {
            return Ok(State::Connecting);
        };
        let work = Work::Fit { task: task.clone(), deadline };
        // The range check uses the bound this coordinator advertised, not a copy of our own.
        let context = TaskContext {
            client_id,
            round: task.id,
            privacy: task.privacy,
            max_abs_update_value: limits.max_abs_update_value,
            secure: None,
        };
        let encoding = task.config.update_encoding;
        let built = self
            .pipelines
            .build(&context)
            .and_then(|p| p.with_update_encoding(encoding, limits.max_abs_update_value));
        let pipeline = match built {
            Ok(p) => p,
            Err(e) => {
                self.report_failure(&work, e.failure_code(), &e.to_string()).await;
                return Ok(State::Idle);
            }
        };
        tracing::info!(round = %task.id, stages = ?pipeline.stage_names(), "training");
        let supervision = self.supervision(ClientActivity::Training, &work, None);
        let worker = self.worker.as_ref().ok_or(AgentError::WorkerGone)?;
        let outcome =
            supervise(supervision, worker.fit(Arc::clone(&global), fit_config(&task), pipeline)).await;
        let result = match outcome {
            Ok(done) => done?,
            Err(stop) => return Ok(self.stopped(stop, State::Training { task, deadline, global }).await),
        };
        match result {
            Ok(result) => {
                self.stats.fits += 1;
                tracing::info!(
                    round = %task.id,
                    train_loss = result.train_loss,
                    examples = result.update.num_examples,
                    seconds = format_args!("{:.1}", result.seconds),
                    l2_norm = ?result.update.metrics.get("l2_norm"),
                    "local training done"
                );
                let pending = Pending { task, deadline, result: Arc::new(result) };
                self.pending = Some(pending.clone());
                Ok(State::Uploading(pending))
            }
            Err(JobError::Trainer(e)) => {
                self.report_failure(&work, FailureCode::TrainingFailed, &e.to_string()).await;
                Ok(State::Idle)
            }
            Err(JobError::Update(e)) => {
                self.report_failure(&work, e.failure_code(), &e.to_string()).await;
                Ok(State::Idle)
            }
        }
    }
}
