//! Failure: an attempt did not produce a model. Record it; retry after a backoff with the next
//! attempt number, or halt the federation after too many failures in a row.
//!
//! An attempt the strategy refused to publish because it would exceed the privacy budget
//! (`AttemptFailure::BudgetExhausted`, decided in `aggregate_fit` with the noise multiplier the
//! round would record) is recorded as failed like any other, and the federation ends cleanly
//! (`Finished::ended`, as when `configure_fit` refuses a round): a retry would be charged as
//! much or more. Nothing computed from its updates was published, so the ledger, which accounts
//! the published models, is not charged; the draw record keeps the attempt, so each client's
//! local ε (local noise) still counts it. Under distributed noise the coordinator did see the
//! individual updates, each with its share of the noise only: that exposure is the documented
//! cost of running distributed noise without secure aggregation, not something the ledger can
//! account.

use fedtune_shared::ids::RoundId;
use fedtune_shared::round::{PhaseName, TaskKind};
use tracing::warn;

use super::finished::Finished;
use super::idle::Idle;
use super::shutdown::Shutdown;
use crate::outcome::{AttemptFailure, AttemptStatus};
use crate::round::phase::{Closed, Phase, Shared};
use crate::round::Round;
use crate::storage::{self, ClientOutcome};

/// A failed attempt.
#[derive(Debug)]
pub(crate) struct Failure {
    id: RoundId,
    reason: AttemptFailure,
    outcomes: Vec<ClientOutcome>,
    accepted: u32,
}

impl Failure {
    /// Attempt `id` failed for `reason`.
    pub(crate) fn new(
        id: RoundId,
        reason: AttemptFailure,
        outcomes: Vec<ClientOutcome>,
        accepted: u32,
    ) -> Self {
        Self { id, reason, outcomes, accepted }
    }
}

impl Phase for Failure {
    const NAME: PhaseName = PhaseName::Failure;

    async fn run(self, shared: &mut Shared) -> Round {
        let Failure { id, reason, outcomes, accepted } = self;
        warn!(%reason, "round attempt failed");
        shared.withdraw_tasks(TaskKind::Fit);
        shared.closed = Some(Closed { id, reason: format!("it failed: {reason}") });
        let why = reason.clone();
        let traffic = shared.take_traffic();
        match shared.db(move |c| storage::fail_round(c, id, &why, &outcomes, accepted, traffic)).await {
            None => return Round::Shutdown(Shutdown::requested()),
            Some(Err(e)) => return shared.fatal("cannot record the failed round", &e),
            Some(Ok(())) => {}
        }
        let elapsed = shared.attempt_started.take().map(|t| t.elapsed());
        crate::telemetry::attempt_ended(AttemptStatus::Failed, elapsed);
        if reason.ends_federation() {
            return Round::Finished(Finished::ended(format!(
                "strategy refuses round {}: {reason}",
                id.round
            )));
        }
        shared.consecutive_failures += 1;
        shared.next = RoundId::new(id.round, id.attempt + 1);
        let max = shared.settings.rounds.max_consecutive_failures;
        if shared.consecutive_failures >= max {
            let why = format!(
                "halted after {max} consecutive failed attempts of round {}; last: {reason}",
                id.round
            );
            return Round::Finished(Finished::halted(shared, why));
        }
        let backoff = shared.settings.rounds.retry_backoff;
        if !shared.serve_for(backoff).await {
            return Round::Shutdown(Shutdown::requested());
        }
        Round::Idle(Idle)
    }
}
