//! Idle: long-poll the coordinator for work.

use fedtune_shared::round::{FailureCode, Task};
use tokio::time::Instant;

use super::{Agent, AgentError, ExitReason, Pending, State, Work};
use crate::transport::CoordinatorApi;

impl<C: CoordinatorApi + 'static> Agent<C> {
    /// One long-poll; turns the answer into the next state.
    pub(super) async fn poll(&mut self) -> Result<State, AgentError> {
        let answer = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(State::Shutdown(ExitReason::Shutdown)),
            answer = self.api.wait_for_task(self.config.poll_wait) => answer,
        };
        let task = match answer {
            Ok(task) => task,
            Err(e) => return self.on_error(e, State::Idle, None).await,
        };
        self.contact();
        Ok(match task {
            Task::None { retry_after, phase, round } => {
                tracing::debug!(%phase, round, "no task yet");
                if !retry_after.is_zero() {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Ok(State::Shutdown(ExitReason::Shutdown)),
                        _ = tokio::time::sleep(retry_after) => {}
                    }
                }
                State::Idle
            }
            Task::Finished { final_version, reason } => {
                tracing::info!(%final_version, %reason, "the federation is finished");
                State::Shutdown(ExitReason::Finished { final_version, reason })
            }
            Task::Fit(task) => {
                let deadline = Instant::now() + task.deadline_in;
                tracing::info!(round = %task.id, model = %task.model.version, deadline_in = ?task.deadline_in, "fit task");
                // Before anything is downloaded or trained: a task below the site's floor is
                // refused, and the coordinator is told so (never a silent downgrade).
                if let Err(below) = self.config.privacy_floor.check(&task.privacy) {
                    tracing::error!(round = %task.id, reason = %below, "refusing a fit task below this site's privacy floor");
                    let work = Work::Fit { task, deadline };
                    self.report_failure(&work, FailureCode::RefusedPrivacyFloor, &below.to_string()).await;
                    return Ok(State::Idle);
                }
                // The same task handed out again (after a lost reply or a coordinator restart):
                // the update we already prepared is still the right answer.
                if task.secure_aggregation.is_some() {
                    // Keys and shares before anything is fetched; a masked update is never
                    // re-sent from `pending` (its masks belong to one run of the protocol).
                    return Ok(State::Securing(Work::Fit { task, deadline }));
                }
                match self.pending.take() {
                    Some(p)
                        if p.task.id.round == task.id.round
                            && p.task.model == task.model
                            && p.task.config == task.config
                            && p.task.privacy == task.privacy =>
                    {
                        tracing::info!(round = %task.id, "re-sending the update prepared earlier");
                        State::Uploading(Pending { task, deadline, result: p.result })
                    }
                    _ => State::Downloading(Work::Fit { task, deadline }),
                }
            }
            Task::Evaluate(task) => {
                let deadline = Instant::now() + task.deadline_in;
                tracing::info!(round = task.round, model = %task.model.version, "evaluate task");
                State::Downloading(Work::Evaluate { task, deadline })
            }
        })
    }
}
