//! The trainer thread: owns the [`LocalTrainer`] and runs fits (with the upload pipeline) and
//! evaluations, one at a time, for the async agent.
//!
//! A dedicated OS thread rather than `spawn_blocking` per job: libtorch state (the `VarStore`,
//! optimizer, device context) must stay on one owner, and a job the agent abandons (task no
//! longer wanted, shutdown) simply finishes into a dropped reply channel, without blocking the
//! runtime's shutdown. The thread ends when the agent drops its [`Worker`].
//!
//! It is the only trainer thread: the factory builds the trainer on it and the BERT trainer runs
//! synchronously here, so a fit reads the global weights through the job's `Arc` in place.

use std::sync::mpsc;
use std::sync::Arc;

use fedtune_shared::ids::Sha256;
use fedtune_shared::params::{Manifest, ParameterVector};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{AgentError, TrainerFactory, TrainerSpec};
use crate::local_trainer::{EvalOutcome, FitConfig, LocalTrainer, TrainerError};
use crate::update::{PreparedUpdate, RingUpdate, UpdateError, UpdatePipeline};

/// A finished fit: the update ready to upload, and what to tell the coordinator about it.
#[derive(Debug, Clone)]
pub struct FitResult {
    /// The update after every pipeline stage.
    pub update: PreparedUpdate,
    /// SHA-256 of the update's payload bytes (the upload trailer carries it).
    pub payload_digest: Sha256,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training throughput.
    pub samples_per_second: f64,
    /// Wall time of training plus the pipeline, seconds.
    pub seconds: f64,
}

/// A finished fit of a secure round: the update encoded for the ring (not yet masked).
#[derive(Debug)]
pub(super) struct RingFitResult {
    /// The encoded update.
    pub(super) update: RingUpdate,
    /// Mean training loss.
    pub(super) train_loss: f64,
    /// Training throughput.
    pub(super) samples_per_second: f64,
    /// Wall time of training, the pipeline and the encoding, seconds.
    pub(super) seconds: f64,
}

/// Why a job failed on the trainer thread.
#[derive(Debug, thiserror::Error)]
pub(super) enum JobError {
    #[error(transparent)]
    Trainer(#[from] TrainerError),
    #[error(transparent)]
    Update(#[from] UpdateError),
}

enum Job {
    Fit {
        global: Arc<ParameterVector>,
        config: FitConfig,
        pipeline: UpdatePipeline,
        reply: oneshot::Sender<Result<FitResult, JobError>>,
    },
    /// A fit whose pipeline ends in the ring encoding of a secure round.
    RingFit {
        global: Arc<ParameterVector>,
        config: FitConfig,
        pipeline: UpdatePipeline,
        reply: oneshot::Sender<Result<RingFitResult, JobError>>,
    },
    Evaluate {
        global: Arc<ParameterVector>,
        reply: oneshot::Sender<Result<EvalOutcome, JobError>>,
    },
}

/// Handle to the trainer thread.
#[derive(Debug)]
pub(super) struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Job::Fit { .. } => "Job::Fit",
            Job::RingFit { .. } => "Job::RingFit",
            Job::Evaluate { .. } => "Job::Evaluate",
        })
    }
}

impl Worker {
    /// Starts the thread, builds the trainer on it, and returns once it is ready, with the
    /// manifest of the tensors it trains.
    pub(super) async fn start(
        factory: TrainerFactory,
        spec: TrainerSpec,
    ) -> Result<(Self, Manifest), AgentError> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("fedtune-trainer".into())
            .spawn(move || {
                let mut trainer = match factory(&spec) {
                    Ok(t) => {
                        let _ = ready_tx.send(Ok(t.trainable_manifest()));
                        t
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = inbox.recv() {
                    run(trainer.as_mut(), job);
                }
            })
            .map_err(|e| AgentError::Config(format!("cannot start the trainer thread: {e}")))?;
        let manifest = ready_rx.await.map_err(|_| AgentError::WorkerGone)?.map_err(AgentError::Trainer)?;
        Ok((Self { jobs }, manifest))
    }

    /// Trains from `global` and prepares the update; resolves when done.
    pub(super) async fn fit(
        &self,
        global: Arc<ParameterVector>,
        config: FitConfig,
        pipeline: UpdatePipeline,
    ) -> Result<Result<FitResult, JobError>, AgentError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send(Job::Fit { global, config, pipeline, reply }).map_err(|_| AgentError::WorkerGone)?;
        rx.await.map_err(|_| AgentError::WorkerGone)
    }

    /// Trains from `global`, prepares the update and encodes it for the ring of a secure round
    /// (the pipeline must end in a ring encoder); resolves when done.
    pub(super) async fn ring_fit(
        &self,
        global: Arc<ParameterVector>,
        config: FitConfig,
        pipeline: UpdatePipeline,
    ) -> Result<Result<RingFitResult, JobError>, AgentError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::RingFit { global, config, pipeline, reply })
            .map_err(|_| AgentError::WorkerGone)?;
        rx.await.map_err(|_| AgentError::WorkerGone)
    }

    /// Evaluates `global` on the held-out split; resolves when done.
    pub(super) async fn evaluate(
        &self,
        global: Arc<ParameterVector>,
    ) -> Result<Result<EvalOutcome, JobError>, AgentError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send(Job::Evaluate { global, reply }).map_err(|_| AgentError::WorkerGone)?;
        rx.await.map_err(|_| AgentError::WorkerGone)
    }
}

fn run(trainer: &mut dyn LocalTrainer, job: Job) {
    match job {
        Job::Fit { global, config, mut pipeline, reply } => {
            if reply.is_closed() {
                return; // abandoned while queued
            }
            let started = Instant::now();
            let result = trainer.fit(&global, &config).map_err(JobError::from).and_then(|outcome| {
                let update =
                    pipeline.prepare(config.round, &global, &outcome.weights, outcome.num_examples)?;
                let digest = update.payload_digest();
                Ok(FitResult {
                    update,
                    payload_digest: digest,
                    train_loss: outcome.train_loss,
                    samples_per_second: outcome.samples_per_second,
                    seconds: started.elapsed().as_secs_f64(),
                })
            });
            let _ = reply.send(result);
        }
        Job::RingFit { global, config, mut pipeline, reply } => {
            if reply.is_closed() {
                return;
            }
            let started = Instant::now();
            let result = trainer.fit(&global, &config).map_err(JobError::from).and_then(|outcome| {
                let update =
                    pipeline.prepare(config.round, &global, &outcome.weights, outcome.num_examples)?;
                // The trained weights are not needed past the delta: free them before the
                // encoding allocates its vectors.
                drop(outcome.weights);
                let update = pipeline.encode_for_ring(update)?;
                Ok(RingFitResult {
                    update,
                    train_loss: outcome.train_loss,
                    samples_per_second: outcome.samples_per_second,
                    seconds: started.elapsed().as_secs_f64(),
                })
            });
            let _ = reply.send(result);
        }
        Job::Evaluate { global, reply } => {
            if reply.is_closed() {
                return;
            }
            let _ = reply.send(trainer.evaluate(&global).map_err(JobError::from));
        }
    }
}
