//! Idle: wait until enough clients are alive to start the next round.

use fedtune_shared::ids::ModelVersion;
use fedtune_shared::round::PhaseName;
use tokio::time::Instant;

use super::evaluating::Evaluating;
use super::finished::Finished;
use super::selecting::Selecting;
use super::shutdown::Shutdown;
use crate::round::phase::{Phase, Shared, Wake};
use crate::round::Round;

/// Waiting for `rounds.min_available` live clients.
#[derive(Debug, Default)]
pub(crate) struct Idle;

impl Phase for Idle {
    const NAME: PhaseName = PhaseName::Idle;

    async fn run(self, shared: &mut Shared) -> Round {
        if shared.all_rounds_done() {
            return Round::Finished(Finished::completed(shared));
        }
        let mut tick = shared.tick_interval();
        loop {
            let alive = shared.registry.alive(Instant::now()).len();
            if alive >= shared.settings.rounds.min_available {
                let eval = &shared.settings.evaluation;
                if eval.initial
                    && shared.settings.evaluation_every() > 0
                    && !shared.initial_evaluated
                    && shared.model.version == ModelVersion(0)
                {
                    shared.initial_evaluated = true;
                    return Round::Evaluating(Evaluating::new(ModelVersion(0)));
                }
                return Round::Selecting(Selecting::new(shared.next));
            }
            match shared.wake(None, &mut tick).await {
                Wake::Request(env) => shared.handle_common(env).await,
                Wake::Deadline | Wake::Tick => {}
                Wake::Cancelled => return Round::Shutdown(Shutdown::requested()),
            }
        }
    }
}
