//! Aggregating: the fixed-point sum becomes the weighted mean delta; the strategy steps the
//! trainable weights; the result becomes the next full model (not yet published).

use std::sync::Arc;

use fedtune_shared::ids::RoundId;
use fedtune_shared::params::ParameterVector;
use fedtune_shared::round::PhaseName;
use tracing::info;

use super::failure::Failure;
use super::publishing::Publishing;
use super::shutdown::Shutdown;
use crate::aggregate::FixedPointSum;
use crate::model::GlobalModel;
use crate::round::phase::{Phase, Shared};
use crate::round::Round;
use crate::storage::{ClientOutcome, LedgerEntry};
use crate::strategy::{FitFailure, FitResults, FitSummary};

/// Applying the strategy to one round's folded updates.
#[derive(Debug)]
pub(crate) struct Aggregating {
    id: RoundId,
    sum: FixedPointSum,
    accepted: Vec<FitSummary>,
    failures: Vec<FitFailure>,
    outcomes: Vec<ClientOutcome>,
}

impl Aggregating {
    /// Aggregation of `id`.
    pub(crate) fn new(
        id: RoundId,
        sum: FixedPointSum,
        accepted: Vec<FitSummary>,
        failures: Vec<FitFailure>,
        outcomes: Vec<ClientOutcome>,
    ) -> Self {
        Self { id, sum, accepted, failures, outcomes }
    }
}

/// What aggregation produced.
enum Outcome {
    Next(Box<GlobalModel>, Option<LedgerEntry>),
    Kept(String),
}

impl Phase for Aggregating {
    const NAME: PhaseName = PhaseName::Aggregating;

    async fn run(self, shared: &mut Shared) -> Round {
        let Aggregating { id, sum, accepted, failures, outcomes } = self;
        let model = shared.model.clone();
        let strategy = shared.strategy.clone();
        let accepted_for_strategy = accepted.clone();
        // Everything heavy (mean, strategy step, digests) runs on a blocking thread.
        let work = tokio::task::spawn_blocking(move || -> Result<Outcome, String> {
            let layout = model.layout.clone();
            let mean = sum.mean().ok_or("no update was folded")?;
            drop(sum);
            let mean_delta =
                ParameterVector::new(layout.trainable.clone(), mean).map_err(|e| e.to_string())?;
            let global = layout.extract(&model.params);
            let results = FitResults { mean_delta, total_weight: 0, clients: accepted_for_strategy };
            let results =
                FitResults { total_weight: results.clients.iter().map(|c| c.weight).sum(), ..results };
            let mut strategy = strategy.lock().unwrap_or_else(|p| p.into_inner());
            let next = strategy.aggregate_fit(id, &global, &results, &failures).map_err(|e| e.to_string())?;
            let Some(next) = next else {
                return Ok(Outcome::Kept("the strategy kept the previous model".into()));
            };
            if let Err(e) = next.ensure_finite() {
                return Ok(Outcome::Kept(format!("aggregation produced a non-finite model: {e}")));
            }
            next.manifest().ensure_same(&layout.trainable).map_err(|e| e.to_string())?;
            let ledger = strategy.ledger_entry(id);
            drop(strategy);
            drop(results);
            drop(global);
            let mut params = model.params.clone();
            layout.write_back(&mut params, next.values());
            drop(next);
            Ok(Outcome::Next(Box::new(GlobalModel::new(id.produces(), params, Arc::clone(&layout))), ledger))
        });
        let out = match shared.serve_while(work).await {
            None => return Round::Shutdown(Shutdown::requested()),
            Some(Ok(out)) => out,
            Some(Err(e)) => return shared.fatal("aggregation task died", &e),
        };
        match out {
            Ok(Outcome::Next(model, ledger)) => {
                let train_loss = weighted_metric(&accepted, "train_loss");
                info!(version = %model.version, ?train_loss, "aggregated");
                Round::Publishing(Publishing::new(id, *model, ledger, outcomes, accepted, train_loss))
            }
            Ok(Outcome::Kept(reason)) => {
                Round::Failure(Failure::new(id, reason, outcomes, accepted.len() as u32))
            }
            Err(reason) => Round::Failure(Failure::new(
                id,
                format!("aggregation failed: {reason}"),
                outcomes,
                accepted.len() as u32,
            )),
        }
    }
}

/// Example-weighted mean of a metric over the updates that reported it.
pub(crate) fn weighted_metric(accepted: &[FitSummary], key: &str) -> Option<f64> {
    let (mut num, mut den) = (0.0, 0.0);
    for a in accepted {
        if let Some(v) = a.metrics.get(key) {
            num += a.num_examples as f64 * v;
            den += a.num_examples as f64;
        }
    }
    (den > 0.0).then(|| num / den)
}
