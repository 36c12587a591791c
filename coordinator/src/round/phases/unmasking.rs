//! Unmasking: a secure round's survivors reveal the shares that remove the masks from the sum.
//!
//! Entered from training with the unmasking request (survivors: masked input folded; dropped:
//! shared but sent none). Each survivor answers once; the phase ends once every survivor
//! answered or `secure_aggregation.unmask_timeout` passed. The masks are then removed and the
//! sum decoded on a blocking thread ([`Aggregator::finish`] consumes the aggregator, so a round
//! is unmasked at most once), and the round goes on to aggregating exactly like a plain round,
//! every survivor weighing 1. Too few answers, too few shares or an implausible sum fail the
//! attempt with a typed reason.
//!
//! Before the request goes out, the strategy may charge the round ([`Strategy::release`]: under
//! distributed noise the coordinator can learn the sum from then on), and the charge is written
//! to storage first; a round the budget cannot afford with its actual survivors is refused here,
//! before anything is unmasked.
//!
//! [`Strategy::release`]: crate::strategy::Strategy::release

use std::collections::BTreeSet;

use fedtune_shared::ids::{ClientId, RoundId};
use fedtune_shared::round::{ClientActivity, PhaseName};
use fedtune_shared::secagg::{
    AwaitedStep, RoundRef, RoundUnmaskAnswer, RoundUnmaskRequest, SecAggError, Slot, StepInput, UnmaskRequest,
};
use tokio::time::Instant;
use tracing::{info, warn};

use super::aggregating::Aggregating;
use super::failure::Failure;
use super::secure::SecureParts;
use super::shutdown::Shutdown;
use crate::aggregate::FixedPointSum;
use crate::error::RoundError;
use crate::outcome::AttemptFailure;
use crate::round::phase::{Phase, Shared, Wake};
use crate::round::requests::{Envelope, Request};
use crate::round::Round;
use crate::storage;
use crate::storage::ClientOutcome;
use crate::strategy::{FitFailure, FitSummary, RoundContext, StrategyError};

/// Collecting the survivors' unmasking answers.
#[derive(Debug)]
pub(crate) struct Unmasking {
    id: RoundId,
    context: RoundContext,
    parts: SecureParts,
    request: RoundUnmaskRequest,
    survivors: BTreeSet<Slot>,
    answered: BTreeSet<Slot>,
    deadline: Instant,
    accepted: Vec<FitSummary>,
    failures: Vec<FitFailure>,
    outcomes: Vec<ClientOutcome>,
}

impl Unmasking {
    /// Unmasking of the sum training folded; releases `request` to the survivors (their
    /// long-polls for the unmasking step wake on it).
    pub(crate) fn new(
        shared: &mut Shared,
        context: RoundContext,
        parts: SecureParts,
        request: UnmaskRequest,
        accepted: Vec<FitSummary>,
        failures: Vec<FitFailure>,
        outcomes: Vec<ClientOutcome>,
    ) -> Self {
        let id = RoundId::new(parts.ctx.round(), parts.ctx.attempt());
        let survivors = request.survivors.iter().copied().collect();
        info!(
            survivors = request.survivors.len(),
            dropped = request.dropped.len(),
            "unmasking request released"
        );
        let request = RoundUnmaskRequest { round: RoundRef::of(&parts.ctx), request };
        let deadline = Instant::now() + shared.settings.secure_aggregation.unmask_timeout;
        Self {
            id,
            context,
            parts,
            request,
            survivors,
            answered: BTreeSet::new(),
            deadline,
            accepted,
            failures,
            outcomes,
        }
    }

    fn ended(&self, client: ClientId, reason: &str) -> RoundError {
        RoundError::AttemptEnded { round: self.id, client, reason: reason.into() }
    }

    fn check(&self, client: &ClientId, round: RoundRef) -> Result<Slot, RoundError> {
        if round != self.request.round {
            let named = RoundId::new(round.round, round.attempt);
            if named < self.id {
                return Err(RoundError::AttemptEnded {
                    round: named,
                    client: client.clone(),
                    reason: format!("the coordinator runs {} now", self.id),
                });
            }
            return Err(SecAggError::WrongRound { round: round.round, attempt: round.attempt }.into());
        }
        let me =
            self.parts.ctx.slot_of(client).ok_or_else(|| self.ended(client.clone(), "not in the roster"))?;
        if !self.survivors.contains(&me) {
            return Err(self.ended(client.clone(), "its masked input is not in the sum"));
        }
        Ok(me)
    }

    fn answer(
        &mut self,
        shared: &mut Shared,
        client: &ClientId,
        msg: RoundUnmaskAnswer,
    ) -> Result<(), RoundError> {
        let me = self.check(client, msg.round)?;
        if msg.answer.sender != me {
            return Err(SecAggError::UnknownClient {
                what: "unmasking answer sender (not the caller)",
                slot: msg.answer.sender,
            }
            .into());
        }
        self.parts.aggregator.accept_unmask_answer(msg.answer)?;
        self.answered.insert(me);
        // Its part is done: its agent may drop the task.
        if shared.tasks.remove(client).is_some() {
            shared.events.tasks_changed();
        }
        shared.registry.touch(client, Some(ClientActivity::Idle), Instant::now());
        Ok(())
    }

    async fn on_request(&mut self, shared: &mut Shared, (req, span): Envelope) {
        match req {
            Request::AwaitSecAggStep(client, round, step, reply) => {
                let _g = span.enter();
                shared.registry.touch(&client, None, Instant::now());
                let out = self.check(&client, round).and_then(|_| match step {
                    AwaitedStep::Unmask => Ok(StepInput::Unmask(self.request.clone())),
                    other => Err(self.ended(client.clone(), &format!("the {other} step is over"))),
                });
                let _ = reply.send(out);
            }
            Request::AnswerUnmask(client, msg, reply) => {
                let _g = span.enter();
                let out = self.answer(shared, &client, msg);
                let _ = reply.send(out);
            }
            Request::AdvertiseKeys(client, msg, reply) => {
                let _ = reply.send(
                    self.check(&client, msg.round)
                        .and_then(|_| Err(self.ended(client, "advertising is over"))),
                );
            }
            Request::SendShares(client, msg, reply) => {
                let _ = reply.send(
                    self.check(&client, msg.round).and_then(|_| Err(self.ended(client, "sharing is over"))),
                );
            }
            other => shared.handle_common((other, span)).await,
        }
    }
}

impl Unmasking {
    /// Asks the strategy whether releasing the sum of these survivors charges privacy and
    /// writes the charge before the request goes out. `Some` ends the attempt instead.
    ///
    /// The write does not serve requests meanwhile (a survivor's wait for the request must not
    /// be answered by a phase that does not hold it); it is one short transaction.
    async fn charge_release(&mut self, shared: &mut Shared) -> Option<Round> {
        let survivors = self.survivors.len() as u64;
        let released = {
            let mut strategy = shared.strategy.lock().unwrap_or_else(|p| p.into_inner());
            strategy.release(&mut self.context, survivors)
        };
        let record = match released {
            Ok(None) => return None,
            Ok(Some(record)) => record,
            Err(StrategyError::Exhausted(reason)) => {
                warn!(%reason, "the budget cannot afford releasing this sum; nothing is unmasked");
                let accepted = self.accepted.len() as u32;
                let reason = AttemptFailure::BudgetExhausted(reason);
                return Some(Round::Failure(Failure::new(self.id, reason, self.outcomes.clone(), accepted)));
            }
            Err(e) => {
                let accepted = self.accepted.len() as u32;
                let reason =
                    AttemptFailure::SecureAggregation(format!("the strategy refused the release: {e}"));
                return Some(Round::Failure(Failure::new(self.id, reason, self.outcomes.clone(), accepted)));
            }
        };
        let id = self.id;
        let storage = shared.storage.clone();
        let written = tokio::select! {
            r = storage.call(move |c| storage::ledger::record_release(c, id, &record)) => r,
            _ = shared.cancel.cancelled() => return Some(Round::Shutdown(Shutdown::requested())),
        };
        match written {
            Ok(()) => {
                info!(survivors, "privacy charged for the release of the sum");
                None
            }
            // The accountant composed it already; without a durable record nothing may go out.
            Err(e) => Some(shared.fatal("cannot record the privacy charge of the release", &e)),
        }
    }
}

impl Phase for Unmasking {
    const NAME: PhaseName = PhaseName::Unmasking;

    async fn run(mut self, shared: &mut Shared) -> Round {
        shared.enter(PhaseName::Unmasking, Some(self.deadline));
        if let Some(next) = self.charge_release(shared).await {
            shared.events.set_secure(None);
            shared.withdraw_tasks(fedtune_shared::round::TaskKind::Fit);
            return next;
        }
        // Waiters for the unmasking step wake now.
        shared.events.tasks_changed();
        let mut tick = shared.tick_interval();
        while self.answered.len() < self.survivors.len() {
            match shared.wake(Some(self.deadline), &mut tick).await {
                Wake::Cancelled => return Round::Shutdown(Shutdown::requested()),
                Wake::Deadline => break,
                Wake::Request(env) => self.on_request(shared, env).await,
                Wake::Tick => {}
            }
        }
        info!(answered = self.answered.len(), survivors = self.survivors.len(), "unmasking closed");
        shared.events.set_secure(None);
        let survivors = self.survivors.len();
        let encoding = self.parts.encoding.clone();
        let aggregator = self.parts.aggregator;
        // Removing the masks costs one ChaCha20 stream per secret to remove: off the reactor.
        let work = tokio::task::spawn_blocking(move || {
            let sum = aggregator.finish().map_err(|e| e.to_string())?;
            let ints = encoding.decode_integers(&sum, survivors).map_err(|e| e.to_string())?;
            FixedPointSum::from_grid_integers(&ints, encoding.grid_log2(), survivors as u32)
                .map_err(|e| e.to_string())
        });
        let Some(joined) = shared.serve_while(work).await else {
            return Round::Shutdown(Shutdown::requested());
        };
        let fail = |reason: String| {
            let accepted = self.accepted.len() as u32;
            warn!(%reason, "secure round failed at unmasking");
            Round::Failure(Failure::new(
                self.id,
                AttemptFailure::SecureAggregation(reason),
                self.outcomes.clone(),
                accepted,
            ))
        };
        let sum = match joined {
            Ok(Ok(sum)) => sum,
            Ok(Err(reason)) => {
                shared.withdraw_tasks(fedtune_shared::round::TaskKind::Fit);
                return fail(reason);
            }
            Err(e) => {
                shared.withdraw_tasks(fedtune_shared::round::TaskKind::Fit);
                return fail(format!("unmasking task died: {e}"));
            }
        };
        shared.withdraw_tasks(fedtune_shared::round::TaskKind::Fit);
        Round::Aggregating(Aggregating::new(self.context, sum, self.accepted, self.failures, self.outcomes))
    }
}
