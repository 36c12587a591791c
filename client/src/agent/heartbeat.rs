//! Supervision of a task step: heartbeats while it runs, and the three reasons to stop early
//! (the coordinator no longer wants the task, its deadline passed, shutdown).
//!
//! Heartbeats run on their own task so a slow heartbeat never stalls a download stream or an
//! upload; they only ever *signal* abandonment, through a cancellation token.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fedtune_shared::round::{ClientActivity, FailureCode, Heartbeat};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Agent, State, Work};
use crate::transport::CoordinatorApi;

/// Why a supervised step stopped before it completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// A heartbeat reply said the task is over (round closed, failed or retried).
    Abandoned,
    /// The task's deadline passed first.
    DeadlinePassed,
    /// Shutdown was requested (and any grace period ran out).
    Shutdown,
}

/// What a supervised step needs besides its future.
#[derive(Debug, Clone)]
pub(super) struct Supervision<C> {
    pub(super) api: Arc<C>,
    pub(super) shutdown: CancellationToken,
    pub(super) interval: Duration,
    pub(super) activity: ClientActivity,
    pub(super) round: u64,
    pub(super) deadline: Instant,
    /// On shutdown, let the step run this much longer before giving up on it.
    pub(super) grace: Option<Duration>,
}

/// Aborts the heartbeat task when the step ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `step` while heartbeating every `interval`, until it finishes or must stop.
pub(super) async fn supervise<C, F>(s: Supervision<C>, step: F) -> Result<F::Output, Stop>
where
    C: CoordinatorApi + 'static,
    F: Future,
{
    let unwanted = CancellationToken::new();
    let _beats = AbortOnDrop(tokio::spawn(beat(
        Arc::clone(&s.api),
        s.interval,
        Heartbeat { activity: s.activity, round: Some(s.round) },
        unwanted.clone(),
    )));
    tokio::pin!(step);
    tokio::select! {
        out = &mut step => return Ok(out),
        _ = unwanted.cancelled() => return Err(Stop::Abandoned),
        _ = tokio::time::sleep_until(s.deadline) => return Err(Stop::DeadlinePassed),
        _ = s.shutdown.cancelled() => {}
    }
    // Shutdown: finish within the grace period if the step deserves it.
    let Some(grace) = s.grace else { return Err(Stop::Shutdown) };
    tracing::info!(?grace, activity = %s.activity, "shutdown requested; letting the current step finish");
    match tokio::time::timeout(grace, step).await {
        Ok(out) => Ok(out),
        Err(_) => Err(Stop::Shutdown),
    }
}

async fn beat<C: CoordinatorApi>(
    api: Arc<C>,
    interval: Duration,
    beat: Heartbeat,
    unwanted: CancellationToken,
) {
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match api.heartbeat(beat).await {
            Ok(reply) if !reply.task_still_wanted => {
                tracing::info!(round = ?beat.round, phase = %reply.phase, "the coordinator no longer wants this task");
                unwanted.cancel();
                return;
            }
            Ok(_) => {}
            // A missed heartbeat is not a reason to stop working: the step's own calls will
            // tell whether the coordinator is really gone.
            Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
        }
    }
}

impl<C: CoordinatorApi + 'static> Agent<C> {
    /// The supervision settings for a step of `work`.
    pub(super) fn supervision(
        &self,
        activity: ClientActivity,
        work: &Work,
        grace: Option<Duration>,
    ) -> Supervision<C> {
        Supervision {
            api: Arc::clone(&self.api),
            shutdown: self.shutdown.clone(),
            interval: self.session.as_ref().map_or(Duration::from_secs(5), |s| s.heartbeat_interval),
            activity,
            round: work.round(),
            deadline: work.deadline(),
            grace,
        }
    }

    /// The next state after a step stopped early in `state`.
    pub(super) async fn stopped(&mut self, stop: Stop, state: State) -> State {
        match stop {
            Stop::Abandoned => {
                self.stats.tasks_dropped += 1;
                State::Idle
            }
            Stop::DeadlinePassed => {
                if let Some(work) = state.work() {
                    self.report_failure(
                        &work,
                        FailureCode::DeadlinePassed,
                        "deadline passed before the task was done",
                    )
                    .await;
                }
                State::Idle
            }
            Stop::Shutdown => self.abandon(state, "client shutting down").await,
        }
    }
}
