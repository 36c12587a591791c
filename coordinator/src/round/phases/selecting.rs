//! Selecting: draw the round's clients, record the draw, ask the strategy for the fit
//! configuration, assign the tasks.

use std::collections::BTreeMap;

use fedtune_shared::ids::{ClientId, RoundId};
use fedtune_shared::round::{FitInstructions, FitTask, PhaseName, Task};
use tokio::time::Instant;
use tracing::{info, warn};

use super::failure::Failure;
use super::finished::Finished;
use super::shutdown::Shutdown;
use super::training::Training;
use crate::outcome::AttemptFailure;
use crate::round::phase::{Assigned, Phase, Shared};
use crate::round::Round;
use crate::sampling;
use crate::storage::{self, SampleRecord};
use crate::strategy::{Draw, StrategyError};

/// Drawing the clients of `id`.
#[derive(Debug)]
pub(crate) struct Selecting {
    id: RoundId,
}

impl Selecting {
    /// Selection for round `id`.
    pub(crate) fn new(id: RoundId) -> Self {
        Self { id }
    }
}

impl Phase for Selecting {
    const NAME: PhaseName = PhaseName::Selecting;

    async fn run(self, shared: &mut Shared) -> Round {
        let id = self.id;
        shared.round = id;
        shared.closed = None;
        shared.accepted_updates = 0;
        shared.publish_state();
        let s = shared.settings.clone();
        let now = Instant::now();
        let candidates = shared.registry.alive(now);
        let seed = match sampling::fit_seed(&s, id) {
            Ok(seed) => seed,
            Err(e) => return shared.fatal("cannot draw the round's clients", &e),
        };
        let selected = sampling::sample(&s.sampling, s.rounds.min_fit, &candidates, seed);
        let base = FitInstructions {
            epochs: s.fit.epochs,
            batch_size: s.fit.batch_size,
            learning_rate: s.fit.learning_rate,
            proximal_mu: 0.0,
            max_steps: s.fit.max_steps,
            seed: 0,
        };
        let exposures = if s.privacy.enabled() && selected.len() >= sampling::min_sampled(&s) {
            let drawn = selected.clone();
            match shared.db(move |c| storage::ledger::exposures(c, &drawn)).await {
                None => return Round::Shutdown(Shutdown::requested()),
                Some(Err(e)) => return shared.fatal("cannot count the clients' participations", &e),
                Some(Ok(e)) => e,
            }
        } else {
            Default::default()
        };
        let plan = {
            let mut strategy = shared.strategy.lock().unwrap_or_else(|p| p.into_inner());
            let draw = Draw {
                round: id,
                candidates: candidates.len(),
                selected: selected.len(),
                exposures,
                secure: None,
            };
            strategy.configure_fit(&draw, &base)
        };
        let plan = match plan {
            Ok(p) => p,
            Err(StrategyError::Exhausted(reason)) => {
                warn!(%reason, "strategy refuses further rounds");
                // A spent budget is a normal end (the last model is the result), not a failure.
                return Round::Finished(Finished::ended(format!(
                    "strategy refuses round {}: {reason}",
                    id.round
                )));
            }
            Err(e) => return shared.fatal("strategy failed to configure the round", &e),
        };
        let record = SampleRecord {
            id,
            kind: "fit",
            scheme: sampling::describe(&s.sampling),
            seed: hex::encode(seed),
            candidates: candidates.len(),
            selected: selected.clone(),
            local_noise_multiplier: plan.context.privacy.as_ref().and_then(|p| p.local_noise_multiplier()),
        };
        let base_version = shared.model.version;
        let stored = shared.db(move |c| storage::begin_round(c, id, base_version, &record)).await;
        match stored {
            None => return Round::Shutdown(Shutdown::requested()),
            Some(Err(e)) => return shared.fatal("cannot record the round", &e),
            Some(Ok(())) => {}
        }
        info!(
            candidates = candidates.len(),
            selected = selected.len(),
            seed = %hex::encode(&seed[..8]),
            "clients sampled"
        );
        // A Poisson draw under DP is never redrawn (it would condition the sample): it runs and
        // is charged whatever its size (`sampling::unconditioned`).
        if selected.len() < sampling::min_sampled(&s) {
            let reason = AttemptFailure::TooFewSampled {
                sampled: selected.len(),
                live: candidates.len(),
                min_fit: s.rounds.min_fit,
            };
            return Round::Failure(Failure::new(id, reason, Vec::new(), 0));
        }
        let deadline = Instant::now() + s.rounds.deadline;
        let mut slots = BTreeMap::new();
        for client in &selected {
            let config =
                FitInstructions { seed: sampling::client_seed(&seed, client), ..plan.config.clone() };
            let task = Task::Fit(FitTask {
                id,
                model: shared.model.model_ref,
                config,
                deadline_in: s.rounds.deadline,
                deadline_unix_ms: 0,
                privacy: plan.privacy,
                secure_aggregation: None,
            });
            shared.tasks.insert(client.clone(), Assigned { task, deadline });
            slots.insert(client.clone(), ());
        }
        shared.events.tasks_changed();
        let selected: Vec<ClientId> = slots.into_keys().collect();
        Round::Training(Training::new(plan.context, selected, deadline))
    }
}
