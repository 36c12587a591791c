//! Publishing: make round r durable, then publish version r.
//!
//! Order matters for crash consistency: checkpoint and strategy-state files are written
//! atomically (temp, fsync, rename) first; then one SQLite transaction records the round, the
//! per-client outcomes, the checkpoint row and the privacy-ledger entry; only after that commit
//! does the new version reach the `watch` channel that downloads read.

use std::sync::Arc;

use fedtune_shared::ids::RoundId;
use fedtune_shared::round::PhaseName;
use tracing::{info, warn};

use super::evaluating::Evaluating;
use super::finished::Finished;
use super::idle::Idle;
use super::shutdown::Shutdown;
use crate::model::GlobalModel;
use crate::outcome::AttemptStatus;
use crate::round::phase::{Closed, Phase, Shared};
use crate::round::Round;
use crate::storage::{self, ClientOutcome, LedgerRecord, RoundCommit};
use crate::strategy::FitSummary;

/// Committing and publishing one round's model.
#[derive(Debug)]
pub(crate) struct Publishing {
    id: RoundId,
    model: GlobalModel,
    ledger: Option<LedgerRecord>,
    outcomes: Vec<ClientOutcome>,
    accepted: Vec<FitSummary>,
    train_loss: Option<f64>,
}

impl Publishing {
    /// Publishing `model`, produced by round `id`.
    pub(crate) fn new(
        id: RoundId,
        model: GlobalModel,
        ledger: Option<LedgerRecord>,
        outcomes: Vec<ClientOutcome>,
        accepted: Vec<FitSummary>,
        train_loss: Option<f64>,
    ) -> Self {
        Self { id, model, ledger, outcomes, accepted, train_loss }
    }
}

impl Phase for Publishing {
    const NAME: PhaseName = PhaseName::Publishing;

    async fn run(self, shared: &mut Shared) -> Round {
        let Publishing { id, model, ledger, outcomes, accepted, train_loss } = self;
        let version = model.version;
        let model = Arc::new(model);
        let ckpt = shared.storage.checkpoint_path(version);
        let strat_path = shared.storage.strategy_path(version);
        let strategy = shared.strategy.clone();
        let m = model.clone();
        let files = tokio::task::spawn_blocking(move || -> Result<Option<std::path::PathBuf>, String> {
            m.params.save_safetensors(&ckpt).map_err(|e| e.to_string())?;
            let state = strategy.lock().unwrap_or_else(|p| p.into_inner()).state();
            match state {
                Some(s) => {
                    s.save_safetensors(&strat_path).map_err(|e| e.to_string())?;
                    Ok(Some(strat_path))
                }
                None => Ok(None),
            }
        });
        let strategy_state = match shared.serve_while(files).await {
            None => return Round::Shutdown(Shutdown::requested()),
            Some(Ok(Ok(p))) => p,
            Some(Ok(Err(e))) => return shared.fatal("cannot write the checkpoint", &e),
            Some(Err(e)) => return shared.fatal("checkpoint task died", &e),
        };
        let (bytes_sent, bytes_received) = shared.take_traffic();
        let commit = RoundCommit {
            id,
            bytes_sent,
            bytes_received,
            checkpoint: shared.storage.checkpoint_path(version),
            strategy_state,
            full_sha256: model.model_ref.full_payload,
            failed: outcomes.iter().filter(|o| !o.outcome.is_accepted()).count() as u32,
            outcomes,
            accepted: accepted.len() as u32,
            total_examples: accepted.iter().map(|a| a.num_examples).sum(),
            train_loss,
        };
        match shared.db(move |c| storage::commit_round(c, &commit, ledger.as_ref())).await {
            None => return Round::Shutdown(Shutdown::requested()),
            Some(Err(e)) => return shared.fatal("cannot commit the round", &e),
            Some(Ok(())) => {}
        }
        let elapsed = shared.attempt_started.take().map(|t| t.elapsed());
        crate::telemetry::attempt_ended(AttemptStatus::Completed, elapsed);
        // Durable: now, and only now, the new version becomes visible.
        shared.model = model.clone();
        shared.events.publish_model(model);
        shared.registry.credit(accepted.iter().map(|a| a.client.clone()));
        shared.consecutive_failures = 0;
        // Keep why it closed (e.g. its deadline) for the refusal of stragglers, and add the outcome.
        let why = match shared.closed.take() {
            Some(c) if c.id == id => format!("{}; it completed and published {version}", c.reason),
            _ => format!("it completed and published {version}"),
        };
        shared.closed = Some(Closed { id, reason: why });
        shared.next = RoundId::new(id.round + 1, 0);
        shared.publish_state();
        info!(%version, "published");
        prune(shared).await;
        let every = shared.settings.evaluation_every();
        if every > 0 && version.0 % every == 0 {
            Round::Evaluating(Evaluating::new(version))
        } else if shared.all_rounds_done() {
            Round::Finished(Finished::completed(shared))
        } else {
            Round::Idle(Idle)
        }
    }
}

/// Deletes checkpoints beyond `storage.keep_checkpoints` (never the initial model).
async fn prune(shared: &mut Shared) {
    let keep = shared.settings.storage.keep_checkpoints;
    if keep == 0 {
        return;
    }
    let out = shared
        .db(move |c| {
            let old = storage::prunable_checkpoints(c, keep)?;
            for row in &old {
                storage::delete_checkpoint_row(c, row.version)?;
            }
            Ok(old)
        })
        .await;
    if let Some(Ok(rows)) = out {
        for row in rows {
            for p in std::iter::once(row.path).chain(row.strategy_path) {
                if let Err(e) = std::fs::remove_file(&p) {
                    warn!(path = %p.display(), cause = %e, "cannot remove an old checkpoint");
                }
            }
        }
    }
}
