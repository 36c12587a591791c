//! Aggregating: the strategy turns the round's exact weighted sum into the next trainable
//! weights (choosing its own denominator); the result becomes the next full model (not yet
//! published). A privacy charge that comes with it is booked here and committed by Publishing.

use std::sync::Arc;

use fedtune_shared::compression::{DownloadEncoding, Int8Encoder};
use fedtune_shared::ids::RoundId;
use fedtune_shared::round::PhaseName;
use tracing::{info, warn};

use super::failure::Failure;
use super::publishing::Publishing;
use super::shutdown::Shutdown;
use crate::aggregate::FixedPointSum;
use crate::model::{quantize_step, GlobalModel, PublishedStep};
use crate::outcome::AttemptFailure;
use crate::round::phase::{Phase, Shared};
use crate::round::Round;
use crate::storage::{ClientOutcome, LedgerRecord};
use crate::strategy::{Aggregated, FitFailure, FitResults, FitSummary, RoundContext, StrategyError};

/// Applying the strategy to one round's folded updates.
#[derive(Debug)]
pub(crate) struct Aggregating {
    context: RoundContext,
    sum: FixedPointSum,
    accepted: Vec<FitSummary>,
    failures: Vec<FitFailure>,
    outcomes: Vec<ClientOutcome>,
}

impl Aggregating {
    /// Aggregation of the round configured as `context`.
    pub(crate) fn new(
        context: RoundContext,
        sum: FixedPointSum,
        accepted: Vec<FitSummary>,
        failures: Vec<FitFailure>,
        outcomes: Vec<ClientOutcome>,
    ) -> Self {
        Self { context, sum, accepted, failures, outcomes }
    }
}

/// What aggregation produced.
enum Outcome {
    Next(Box<GlobalModel>, Option<LedgerRecord>),
    Kept(AttemptFailure),
}

impl Phase for Aggregating {
    const NAME: PhaseName = PhaseName::Aggregating;

    async fn run(self, shared: &mut Shared) -> Round {
        let Aggregating { context, sum, accepted, failures, outcomes } = self;
        let id: RoundId = context.round();
        let model = shared.model.clone();
        let strategy = shared.strategy.clone();
        let results = FitResults::new(sum, model.layout.trainable.clone(), accepted.clone());
        let download_encoding = shared.settings.model.download_encoding;
        // Everything heavy (the strategy's division and step, digests) runs on a blocking thread.
        let work = tokio::task::spawn_blocking(move || -> Result<Outcome, AttemptFailure> {
            let failed = |e: &dyn std::fmt::Display| AttemptFailure::AggregationFailed(e.to_string());
            let layout = model.layout.clone();
            let global = layout.extract(&model.params);
            let mut strategy = strategy.lock().unwrap_or_else(|p| p.into_inner());
            let next = match strategy.aggregate_fit(&context, &global, results, &failures) {
                Ok(next) => next,
                // Nothing computed from the round leaves the coordinator; see `Failure`.
                Err(StrategyError::Exhausted(reason)) => {
                    return Ok(Outcome::Kept(AttemptFailure::BudgetExhausted(reason)))
                }
                Err(e) => return Err(failed(&e)),
            };
            let Some(Aggregated { params: next, charge }) = next else {
                return Ok(Outcome::Kept(AttemptFailure::StrategyKept));
            };
            if let Err(e) = next.ensure_finite() {
                return Ok(Outcome::Kept(AttemptFailure::NonFiniteModel(e.to_string())));
            }
            next.manifest().ensure_same(&layout.trainable).map_err(|e| failed(&e))?;
            if let Some(record) = &charge {
                strategy.charge(record).map_err(|e| failed(&e))?;
            }
            drop(strategy);
            let mut params = model.params.clone();
            let step = match download_encoding {
                DownloadEncoding::F32 => None,
                // The published version is the quantized one, so what clients rebuild from the
                // step is exactly what the coordinator checkpoints and aggregates from next.
                DownloadEncoding::Int8Delta => {
                    let mut encoder = Int8Encoder::from_os_entropy().map_err(|e| failed(&e))?;
                    match quantize_step(global.values(), next.values(), &mut encoder) {
                        Some((values, bytes)) if values.iter().all(|v| v.is_finite()) => {
                            layout.write_back(&mut params, &values);
                            Some(PublishedStep::new(model.version, bytes))
                        }
                        _ => {
                            warn!("the model step cannot be encoded in 8 bits; this version is sent in f32");
                            None
                        }
                    }
                }
            };
            if step.is_none() {
                layout.write_back(&mut params, next.values());
            }
            drop(global);
            drop(next);
            let mut next = GlobalModel::new(id.produces(), params, Arc::clone(&layout));
            if let Some(step) = step {
                next = next.with_step(step);
            }
            Ok(Outcome::Next(Box::new(next), charge))
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
            Ok(Outcome::Kept(reason)) | Err(reason) => {
                Round::Failure(Failure::new(id, reason, outcomes, accepted.len() as u32))
            }
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
