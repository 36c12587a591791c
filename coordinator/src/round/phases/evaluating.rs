//! Evaluating: drawn clients evaluate a published model on their held-out split; the
//! example-weighted loss and accuracy are recorded for that version.
//!
//! Evaluation never changes the model, so it cannot fail a round: too few reports only means no
//! figures are recorded for this version (logged).

use std::collections::BTreeMap;

use fedtune_shared::ids::{ClientId, ModelVersion, RoundId};
use fedtune_shared::round::{ClientActivity, EvaluateTask, PhaseName, Task, TaskKind};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tokio::time::Instant;
use tracing::{info, warn};

use super::finished::Finished;
use super::idle::Idle;
use super::shutdown::Shutdown;
use crate::error::RoundError;
use crate::outcome::{Lateness, ParticipantOutcome};
use crate::round::phase::{Assigned, Phase, Shared, Wake};
use crate::round::requests::Request;
use crate::round::Round;
use crate::sampling;
use crate::storage::{self, EvaluationRecord, SampleRecord};
use crate::strategy::{EvalResult, FitFailure};

/// Federated evaluation of one version.
#[derive(Debug)]
pub(crate) struct Evaluating {
    version: ModelVersion,
}

impl Evaluating {
    /// Evaluation of `version`.
    pub(crate) fn new(version: ModelVersion) -> Self {
        Self { version }
    }

    fn next(shared: &mut Shared) -> Round {
        if shared.all_rounds_done() {
            Round::Finished(Finished::completed(shared))
        } else {
            Round::Idle(Idle)
        }
    }
}

impl Phase for Evaluating {
    const NAME: PhaseName = PhaseName::Evaluating;

    async fn run(self, shared: &mut Shared) -> Round {
        let version = self.version;
        let s = shared.settings.clone();
        let candidates = shared.registry.alive_evaluators(Instant::now());
        if candidates.len() < s.evaluation.min_clients {
            warn!(
                candidates = candidates.len(),
                min = s.evaluation.min_clients,
                %version,
                "too few clients can evaluate; no figures recorded for this version"
            );
            return Self::next(shared);
        }
        let sample_id = RoundId::new(version.0, 0);
        let seed = sampling::draw_seed(s.rounds.seed, sample_id, "evaluate");
        let k = ((s.evaluation.fraction * candidates.len() as f64).ceil() as usize)
            .max(s.evaluation.min_clients)
            .min(candidates.len());
        let selected = sampling::uniform(&candidates, k, &mut ChaCha20Rng::from_seed(seed));
        let record = SampleRecord {
            id: sample_id,
            kind: "evaluate",
            scheme: format!("fraction({})", s.evaluation.fraction),
            seed: hex::encode(seed),
            candidates: candidates.len(),
            selected: selected.clone(),
            local_noise_multiplier: None,
            secure: None,
        };
        match shared.db(move |c| storage::insert_sample(c, &record)).await {
            None => return Round::Shutdown(Shutdown::requested()),
            Some(Err(e)) => return shared.fatal("cannot record the evaluation sample", &e),
            Some(Ok(())) => {}
        }
        let batch_size = {
            let mut strategy = shared.strategy.lock().unwrap_or_else(|p| p.into_inner());
            strategy.configure_evaluate(version, s.evaluation.batch_size)
        };
        let deadline = Instant::now() + s.evaluation.deadline;
        shared.enter(PhaseName::Evaluating, Some(deadline));
        for c in &selected {
            let task = Task::Evaluate(EvaluateTask {
                round: version.0,
                model: shared.model.model_ref,
                batch_size,
                deadline_in: s.evaluation.deadline,
                deadline_unix_ms: 0,
            });
            shared.tasks.insert(c.clone(), Assigned { task, deadline });
        }
        shared.events.tasks_changed();
        info!(evaluators = selected.len(), %version, "evaluation tasks assigned");

        let mut pending: BTreeMap<ClientId, ()> = selected.iter().map(|c| (c.clone(), ())).collect();
        let mut results: Vec<EvalResult> = Vec::new();
        let mut failures: Vec<FitFailure> = Vec::new();
        let mut tick = shared.tick_interval();
        while !pending.is_empty() {
            match shared.wake(Some(deadline), &mut tick).await {
                Wake::Cancelled => return Round::Shutdown(Shutdown::requested()),
                Wake::Deadline => {
                    for c in std::mem::take(&mut pending).into_keys() {
                        let outcome = ParticipantOutcome::Late(Lateness::NoReport);
                        failures.push(FitFailure { client: c, outcome });
                    }
                }
                Wake::Tick => {
                    let now = Instant::now();
                    let gone: Vec<ClientId> =
                        pending.keys().filter(|c| !shared.registry.is_alive(c, now)).cloned().collect();
                    for c in gone {
                        pending.remove(&c);
                        shared.tasks.remove(&c);
                        failures.push(FitFailure { client: c, outcome: ParticipantOutcome::Dropped });
                    }
                }
                Wake::Request((Request::ReportEvaluation(client, report, reply), span)) => {
                    let _g = span.enter();
                    shared.registry.touch(&client, Some(ClientActivity::Idle), Instant::now());
                    let out = if !pending.contains_key(&client) || report.round != version.0 {
                        Err(RoundError::NoEvaluationTask { client: client.clone(), round: report.round })
                    } else if report.model_version != version {
                        Err(RoundError::VersionNotServed {
                            requested: report.model_version,
                            current: version,
                        })
                    } else {
                        pending.remove(&client);
                        shared.tasks.remove(&client);
                        results.push(EvalResult { client, report });
                        Ok(())
                    };
                    let _ = reply.send(out);
                }
                Wake::Request((Request::ReportFailure(client, report, reply), span))
                    if report.kind == TaskKind::Evaluate && pending.contains_key(&client) =>
                {
                    let _g = span.enter();
                    pending.remove(&client);
                    shared.tasks.remove(&client);
                    failures.push(FitFailure { client, outcome: ParticipantOutcome::Failed(report.reason) });
                    let _ = reply.send(Ok(()));
                }
                Wake::Request(env) => shared.handle_common(env).await,
            }
        }
        shared.withdraw_tasks(TaskKind::Evaluate);
        if results.len() < s.evaluation.min_clients {
            warn!(reports = results.len(), min = s.evaluation.min_clients, %version, "too few evaluation reports");
            return Self::next(shared);
        }
        let summary = {
            let mut strategy = shared.strategy.lock().unwrap_or_else(|p| p.into_inner());
            strategy.aggregate_evaluate(version, &results, &failures)
        };
        match summary {
            Ok(Some(sum)) => {
                info!(%version, loss = sum.loss, accuracy = sum.accuracy, clients = sum.clients, "evaluated");
                let record = EvaluationRecord {
                    version,
                    clients: sum.clients,
                    num_examples: sum.num_examples,
                    loss: sum.loss,
                    accuracy: sum.accuracy,
                    metrics: serde_json::json!(sum.metrics),
                    per_client: results
                        .iter()
                        .map(|r| {
                            (
                                r.client.clone(),
                                r.report.num_examples,
                                r.report.loss,
                                r.report.accuracy,
                                serde_json::json!(r.report.metrics),
                            )
                        })
                        .collect(),
                };
                match shared.db(move |c| storage::record_evaluation(c, &record)).await {
                    None => return Round::Shutdown(Shutdown::requested()),
                    Some(Err(e)) => return shared.fatal("cannot record the evaluation", &e),
                    Some(Ok(())) => {}
                }
            }
            Ok(None) => warn!(%version, "the strategy produced no evaluation summary"),
            Err(e) => warn!(%version, cause = %e, "evaluation aggregation failed"),
        }
        Self::next(shared)
    }
}
