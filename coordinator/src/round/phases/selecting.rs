//! Selecting: draw the round's clients, record the draw, ask the strategy for the fit
//! configuration, assign the tasks.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedtune_shared::crypto::PublicKey;
use fedtune_shared::privacy::{NoisePlacement, NoisePlan};
use fedtune_shared::secagg::{Encoding, EncodingLimits, RoundContext, RoundSetup, SecureTask};

use fedtune_shared::ids::{ClientId, RoundId};
use fedtune_shared::round::{FitInstructions, FitTask, PhaseName, Task};
use tokio::time::Instant;
use tracing::{info, warn};

use super::failure::Failure;
use super::finished::Finished;
use super::secure::SecureRound;
use super::shutdown::Shutdown;
use super::training::Training;
use crate::outcome::AttemptFailure;
use crate::round::phase::{Assigned, Phase, Shared};
use crate::round::Round;
use crate::sampling;
use crate::storage::{self, SampleRecord};
use crate::strategy::{Draw, SecureDraw, StrategyError};

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
        shared.attempt_started = Some(now);
        crate::telemetry::clients_selected(selected.len());
        let base = FitInstructions {
            epochs: s.fit.epochs,
            batch_size: s.fit.batch_size,
            learning_rate: s.fit.learning_rate,
            proximal_mu: 0.0,
            max_steps: s.fit.max_steps,
            seed: 0,
            lr_schedule: s.fit.lr_schedule,
            warmup_steps: s.fit.warmup_steps,
            update_encoding: s.fit.update_encoding,
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
        // A secure round's threshold is fixed before the strategy configures it: distributed
        // noise is sized for it, and the grid is chosen for the drawn count.
        let secure_draw = s.secure_aggregation.enabled.then(|| {
            let sa = &s.secure_aggregation;
            let n = selected.len();
            SecureDraw {
                threshold: sa.threshold_for(n, sa.degree_for(n)),
                limits: EncodingLimits {
                    max_wrap_probability: sa.max_wrap_probability,
                    ..EncodingLimits::default()
                },
            }
        });
        let plan = {
            let mut strategy = shared.strategy.lock().unwrap_or_else(|p| p.into_inner());
            let draw = Draw {
                round: id,
                candidates: candidates.len(),
                selected: selected.len(),
                exposures,
                secure: secure_draw,
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
            Err(StrategyError::Refused(reason)) if secure_draw.is_some() => {
                // E.g. no encoding fits this draw: this attempt cannot run, a later draw may.
                warn!(%reason, "strategy refuses the secure round");
                return Round::Failure(Failure::new(id, AttemptFailure::SecureSetup(reason), Vec::new(), 0));
            }
            Err(e) => return shared.fatal("strategy failed to configure the round", &e),
        };
        // A secure round is set up before the draw is recorded, so that the record carries its
        // n, t and k (a draw too small to run sets nothing up).
        let secure = (s.secure_aggregation.enabled && selected.len() >= sampling::min_sampled(&s))
            .then(|| build_secure_round(shared, id, &selected, &plan));
        let record = SampleRecord {
            id,
            kind: "fit",
            scheme: sampling::describe(&s.sampling),
            seed: hex::encode(seed),
            candidates: candidates.len(),
            selected: selected.clone(),
            local_noise_multiplier: plan.context.privacy.as_ref().and_then(|p| p.local_noise_multiplier()),
            secure: secure.as_ref().and_then(|r| r.as_ref().ok()).map(SecureRound::figures),
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
        let secure = match secure {
            None => None,
            Some(Ok(secure)) => Some(secure),
            Some(Err(reason)) => {
                warn!(%reason, "secure round cannot be set up");
                return Round::Failure(Failure::new(id, reason, Vec::new(), 0));
            }
        };
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
                secure_aggregation: secure.as_ref().map(|r| r.task().clone()),
            });
            shared.tasks.insert(client.clone(), Assigned { task, deadline });
            slots.insert(client.clone(), ());
        }
        shared.events.tasks_changed();
        let selected: Vec<ClientId> = slots.into_keys().collect();
        if let Some(r) = &secure {
            shared.events.set_secure(Some(r.context().clone()));
        }
        Round::Training(Training::new(plan.context, selected, deadline, secure))
    }
}

/// The secure part of a round: roster (the drawn clients and their identity keys), threshold
/// and degree for this draw, a fresh graph seed, and the grid.
///
/// The grid: under DP, [`Encoding::choose`] picks the finest grid on which the clients' noise
/// summed over the drawn clients stays within `max_wrap_probability`, and the round's plan
/// moves onto it (the clients noise on it: σ per party under distributed noise, none under
/// central noise, which the coordinator adds to the decoded sum). Without DP the same choice is
/// made for a central plan (which puts no noise in the ring) with `secure_aggregation.clip_norm`,
/// only to pick the grid.
fn build_secure_round(
    shared: &Shared,
    id: RoundId,
    selected: &[ClientId],
    plan: &crate::strategy::FitPlan,
) -> Result<SecureRound, AttemptFailure> {
    let s = &shared.settings;
    let sa = &s.secure_aggregation;
    let setup_failed = |e: &dyn std::fmt::Display| AttemptFailure::SecureSetup(e.to_string());
    let mut members = Vec::with_capacity(selected.len());
    for c in selected {
        let key = shared
            .identities
            .identity(c)
            .or_else(|| shared.registry.get(c).and_then(|e| e.public_key).map(PublicKey::from_bytes))
            .ok_or_else(|| {
                AttemptFailure::SecureSetup(format!("client `{c}` has no registered identity key"))
            })?;
        members.push((c.clone(), key));
    }
    let n = members.len();
    let degree = sa.degree_for(n);
    let threshold = sa.threshold_for(n, degree);
    let mut graph_seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut graph_seed)
        .map_err(|_| AttemptFailure::SecureSetup("the system random generator failed".into()))?;
    let dim = shared.model.layout.trainable.numel();
    let (grid_log2, clip_norm, noise_sigma_grid) = match plan.context.privacy.as_ref() {
        // The DP strategy chose the grid for this draw (`Draw::secure`) and accounts on it.
        Some(dp) => (dp.grid_log2(), dp.clip_norm(), dp.client_sigma_grid()),
        None => {
            // Without DP the grid only has to carry n clipped inputs: a central plan (no noise
            // in the ring) picks it.
            let limits =
                EncodingLimits { max_wrap_probability: sa.max_wrap_probability, ..EncodingLimits::default() };
            let grid_plan = NoisePlan::new(NoisePlacement::Central, 1.0, sa.clip_norm, dim, n as f64)
                .map_err(|e| setup_failed(&e))?;
            let (_, encoding) = Encoding::choose(&grid_plan, n, &limits).map_err(|e| setup_failed(&e))?;
            (encoding.grid_log2(), sa.clip_norm, 0.0)
        }
    };
    let setup = RoundSetup {
        federation_id: shared.federation_id.clone(),
        round: id.round,
        attempt: id.attempt,
        members,
        threshold,
        degree,
        graph_seed,
        vector_len: dim,
    };
    let task = SecureTask {
        setup: setup.clone(),
        grid_log2,
        clip_norm,
        noise_sigma_grid,
        max_wrap_probability: sa.max_wrap_probability,
    };
    // Both sides derive the encoding from the task: check that this one is the chosen one.
    let encoding = task.encoding().map_err(|e| setup_failed(&e))?;
    let ctx = RoundContext::new(setup).map_err(|e| setup_failed(&e))?;
    info!(
        clients = n,
        threshold,
        degree = ctx.graph().degree(),
        grid_log2 = encoding.grid_log2(),
        "secure round set up"
    );
    Ok(SecureRound::new(Arc::new(task), Arc::new(ctx), encoding, sa.step_timeout))
}
