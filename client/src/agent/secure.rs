//! A fit task under secure aggregation (SecAgg+): the update leaves the client masked, and the
//! coordinator learns only the sum over the round's survivors.
//!
//! ```text
//!  Securing: advertise keys ─► await peer keys ─► share ─► send shares      (before any download)
//!  Downloading ─► Training (clip, encode for the ring on the trainer thread)
//!  then: await delivered shares ─► mask in place ─► masked upload ─► await unmask request ─► answer
//! ```
//!
//! The cryptography is `fedtune_shared::secagg`'s: [`KeysAdvertised`] → [`SharesSent`] →
//! [`InputMasked`], each step consuming the previous state. Keys and shares come first so a
//! client whose roster entry is wrong, or that cannot honour the task, fails before it spends a
//! download and a training run. Every call and wait is supervised like the other steps
//! (heartbeats, the task's deadline, shutdown, "no longer wanted"); a wait answered `Pending` is
//! asked again, a transient failure retried after backoff, both within the deadline.
//!
//! `ABORTED` from the coordinator ([`ApiError::AttemptOver`]) means the round attempt ended: the
//! task is over and nothing is reported. A local refusal (the roster does not list this client
//! or lists another identity, the encoding or the protocol refuses) is reported as a failure
//! whose detail names it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fedtune_shared::ids::{RoundId, Sha256};
use fedtune_shared::params::ParameterVector;
use fedtune_shared::round::{ClientActivity, FailureCode, FitTask, UpdateHeader};
use fedtune_shared::secagg::{
    AwaitedStep, InputMasked, KeyAdvertisement, KeysAdvertised, RoundContext, RoundRef, RoundUnmaskAnswer,
    ShareUpload, SharesSent, StepInput,
};
use tokio::time::Instant;

use super::fit::fit_config;
use super::heartbeat::{supervise, Stop};
use super::upload::{framed, header_metrics, MaskedPayload};
use super::worker::{JobError, RingFitResult};
use super::{Agent, AgentError, State, Work};
use crate::transport::{ApiError, CoordinatorApi};
use crate::update::{TaskContext, UpdatePipeline};

/// Shortest long-poll for a step: near the deadline the wait shrinks, but never to a busy loop.
const MIN_STEP_WAIT: Duration = Duration::from_millis(100);

/// A secure round between sharing and training: what the later steps need.
#[derive(Debug)]
pub(super) struct SecureRound {
    id: RoundId,
    ctx: Arc<RoundContext>,
    state: SharesSent,
    /// Clip, then the ring encoding; built before the keys went out, so a task this client
    /// cannot honour never enters the round.
    pipeline: UpdatePipeline,
}

/// Why the secure steps of a task stopped before the end.
#[derive(Debug)]
enum Halt {
    /// This client refuses to go on: reported with `code`, the detail naming the cause.
    Refused(FailureCode, String),
    /// A call failed (including [`ApiError::AttemptOver`]).
    Api(ApiError),
    /// Supervision stopped the step (deadline, shutdown, no longer wanted).
    Stopped(Stop),
    /// The agent itself cannot go on.
    Fatal(AgentError),
}

fn refused(what: &str) -> impl FnOnce(fedtune_shared::secagg::SecAggError) -> Halt + '_ {
    move |e| Halt::Refused(FailureCode::UpdateRefused, format!("{what}: {e}"))
}

impl<C: CoordinatorApi + 'static> Agent<C> {
    /// Securing: set the round up, advertise keys, share; then download the model.
    pub(super) async fn secure_setup(&mut self, work: Work) -> Result<State, AgentError> {
        let Work::Fit { task, .. } = &work else { return Ok(State::Downloading(work)) };
        match self.share_secrets(task, &work).await {
            Ok(round) => {
                tracing::info!(round = %task.id, clients = round.ctx.len(), "secure round: shares sent");
                self.secure = Some(round);
                Ok(State::Downloading(work))
            }
            Err(halt) => self.halt(halt, work).await,
        }
    }

    /// Training under secure aggregation: train and encode, mask, upload, help unmask.
    pub(super) async fn secure_fit(
        &mut self,
        task: FitTask,
        deadline: Instant,
        global: Arc<ParameterVector>,
    ) -> Result<State, AgentError> {
        let work = Work::Fit { task: task.clone(), deadline };
        let round = match self.secure.take() {
            Some(round) if round.id == task.id => round,
            _ => {
                // Training without the shares sent (e.g. after a re-join handed the task out
                // again): the masks could never be removed, so the update must not be sent.
                let why = "the secure round's keys and shares were not set up for this attempt";
                return self.halt(Halt::Refused(FailureCode::UpdateRefused, why.into()), work).await;
            }
        };
        match self.mask_and_unmask(&task, &work, round, global).await {
            Ok(()) => Ok(if self.shutdown.is_cancelled() {
                State::Shutdown(super::ExitReason::Shutdown)
            } else {
                State::Idle
            }),
            Err(halt) => self.halt(halt, work).await,
        }
    }

    /// Steps 1 and 2.
    async fn share_secrets(&mut self, task: &FitTask, work: &Work) -> Result<SecureRound, Halt> {
        let refuse = |why: String| Halt::Refused(FailureCode::UpdateRefused, why);
        let Some(secure) = task.secure_aggregation.clone() else {
            return Err(refuse("not a secure round".into()));
        };
        let Some((client_id, limits)) = self.session.as_ref().map(|s| (s.client_id.clone(), s.limits)) else {
            return Err(Halt::Api(ApiError::Unauthenticated("no session".into())));
        };
        let ctx =
            Arc::new(RoundContext::new(secure.setup.clone()).map_err(refused("the secure round's set-up"))?);
        if (ctx.round(), ctx.attempt()) != (task.id.round, task.id.attempt) {
            return Err(refuse(format!(
                "the secure round's set-up is for round {} attempt {}, the task for {}",
                ctx.round(),
                ctx.attempt(),
                task.id
            )));
        }
        let slot = ctx.slot_of(&client_id).ok_or_else(|| {
            refuse(format!("the secure round's roster does not list this client `{client_id}`"))
        })?;
        let Some(identity) = self.config.identity.clone() else {
            return Err(refuse("this client has no identity key to sign its agreement keys with".into()));
        };
        let context = TaskContext {
            client_id: client_id.clone(),
            round: task.id,
            privacy: task.privacy,
            max_abs_update_value: limits.max_abs_update_value,
            secure: Some(Arc::clone(&secure)),
        };
        let pipeline =
            self.pipelines.build(&context).map_err(|e| Halt::Refused(e.failure_code(), e.to_string()))?;
        if pipeline.ring_encoder().is_none() {
            return Err(refuse("the update pipeline does not encode for the secure round".into()));
        }
        let (advertised, keys) = KeysAdvertised::start(Arc::clone(&ctx), slot, &identity)
            .map_err(refused(&format!("starting the secure round as `{client_id}` in slot {slot}")))?;
        let advertisement = KeyAdvertisement { round: RoundRef::of(&ctx), keys };
        let api = Arc::clone(&self.api);
        self.persist(ClientActivity::Training, work, || api.advertise_keys(advertisement.clone())).await?;

        let StepInput::PeerKeys(peer) = self.await_step(&ctx, AwaitedStep::PeerKeys, work).await? else {
            unreachable!("await_step returns the step asked for")
        };
        peer.round.check(&ctx).map_err(refused("the peer keys"))?;
        let (state, bundles) = advertised.share(&peer.keys).map_err(refused("sharing with the peers"))?;
        let upload = ShareUpload { round: RoundRef::of(&ctx), bundles };
        let api = Arc::clone(&self.api);
        self.persist(ClientActivity::Training, work, || api.send_shares(upload.clone())).await?;
        Ok(SecureRound { id: task.id, ctx, state, pipeline })
    }

    /// Steps 3 and 4, around training.
    async fn mask_and_unmask(
        &mut self,
        task: &FitTask,
        work: &Work,
        round: SecureRound,
        global: Arc<ParameterVector>,
    ) -> Result<(), Halt> {
        let SecureRound { ctx, state, pipeline, .. } = round;
        tracing::info!(round = %task.id, stages = ?pipeline.stage_names(), "training (secure round)");
        let trained = self.ring_fit(task, work, global, pipeline).await?;
        if trained.update.num_examples == 0 {
            let why = "no training examples behind the update";
            return Err(Halt::Refused(FailureCode::TrainingFailed, why.into()));
        }
        self.stats.fits += 1;
        tracing::info!(round = %task.id, seconds = format_args!("{:.1}", trained.seconds), "local training done; encoded for the ring");

        let StepInput::Shares(delivery) = self.await_step(&ctx, AwaitedStep::Shares, work).await? else {
            unreachable!("await_step returns the step asked for")
        };
        delivery.round.check(&ctx).map_err(refused("the delivered shares"))?;
        let RingFitResult { update, train_loss, samples_per_second, seconds } = trained;
        let header = UpdateHeader {
            id: task.id,
            base_version: task.model.version,
            num_examples: update.num_examples,
            metrics: header_metrics(task, &update.metrics, train_loss, samples_per_second, seconds),
            manifest_digest: Sha256(update.manifest.digest()),
            total_bytes: (update.words.len() * fedtune_shared::secagg::encoding::BYTES_PER_COORDINATE) as u64,
            // Told apart by the masked header it travels in; the field is the plain header's.
            encoding: fedtune_shared::compression::UpdateEncoding::F32,
        };
        // Masking expands one ChaCha stream per neighbour over the whole vector: CPU work, kept
        // off the reactor; the encoded words are masked where they lie.
        let supervision = self.supervision(ClientActivity::Uploading, work, None);
        let words = update.words;
        let masking = tokio::task::spawn_blocking(move || {
            state.mask_in_place(&delivery.bundles, &delivery.sharers, words)
        });
        let (unmasking, masked) = match supervise(supervision, masking).await {
            Ok(Ok(result)) => result.map_err(refused("masking the update"))?,
            Ok(Err(_)) => return Err(Halt::Fatal(AgentError::WorkerGone)),
            Err(stop) => return Err(Halt::Stopped(stop)),
        };
        self.upload_masked(task, work, &ctx, header, MaskedPayload(masked.values)).await?;
        self.answer_unmasking(work, &ctx, unmasking).await
    }

    /// Trains and encodes on the trainer thread.
    async fn ring_fit(
        &mut self,
        task: &FitTask,
        work: &Work,
        global: Arc<ParameterVector>,
        pipeline: UpdatePipeline,
    ) -> Result<RingFitResult, Halt> {
        let supervision = self.supervision(ClientActivity::Training, work, None);
        let worker = self.worker.as_ref().ok_or(Halt::Fatal(AgentError::WorkerGone))?;
        match supervise(supervision, worker.ring_fit(global, fit_config(task), pipeline)).await {
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(JobError::Trainer(e)))) => {
                Err(Halt::Refused(FailureCode::TrainingFailed, e.to_string()))
            }
            Ok(Ok(Err(JobError::Update(e)))) => Err(Halt::Refused(e.failure_code(), e.to_string())),
            Ok(Err(fatal)) => Err(Halt::Fatal(fatal)),
            Err(stop) => Err(Halt::Stopped(stop)),
        }
    }

    /// Streams the masked vector through the ordinary upload path, signed under the masked label.
    async fn upload_masked(
        &mut self,
        task: &FitTask,
        work: &Work,
        ctx: &RoundContext,
        header: UpdateHeader,
        payload: MaskedPayload,
    ) -> Result<(), Halt> {
        let Some(chunk) = self.session.as_ref().map(|s| s.limits.chunk_bytes() as usize) else {
            return Err(Halt::Api(ApiError::Unauthenticated("no session".into())));
        };
        let total = header.total_bytes;
        let digest = payload.digest();
        let payload = Arc::new(payload);
        let rate = self.config.upload_rate_limit;
        let context = *ctx.digest();
        let api = Arc::clone(&self.api);
        let send =
            || api.upload_masked(context, framed(header.clone(), digest, Arc::clone(&payload), chunk, rate));
        // An upload's work is done: on shutdown it gets the grace period a plain upload gets.
        let grace = Some(self.config.shutdown_grace);
        match self.persist_with_grace(ClientActivity::Uploading, work, grace, send).await {
            Ok(receipt) => {
                self.stats.updates_accepted += 1;
                self.stats.bytes_uploaded += total;
                tracing::info!(round = %receipt.id, bytes = receipt.received_bytes, "masked update accepted");
                Ok(())
            }
            Err(Halt::Api(ApiError::AlreadyAccepted(_))) => {
                tracing::info!(round = %task.id, "the coordinator already holds this masked update");
                Ok(())
            }
            Err(halt) => Err(halt),
        }
    }

    /// Step 4: waits for the unmasking request and answers it once.
    async fn answer_unmasking(
        &mut self,
        work: &Work,
        ctx: &Arc<RoundContext>,
        state: InputMasked,
    ) -> Result<(), Halt> {
        let StepInput::Unmask(request) = self.await_step(ctx, AwaitedStep::Unmask, work).await? else {
            unreachable!("await_step returns the step asked for")
        };
        request.round.check(ctx).map_err(refused("the unmasking request"))?;
        let answer = state.unmask(&request.request).map_err(refused("answering the unmasking request"))?;
        let answer = RoundUnmaskAnswer { round: RoundRef::of(ctx), answer };
        let api = Arc::clone(&self.api);
        self.persist(ClientActivity::Uploading, work, || api.answer_unmask(answer.clone())).await?;
        tracing::info!(round = ctx.round(), "secure round: unmasking answered");
        Ok(())
    }

    /// Long-polls for `step` until it is ready (asking again on `Pending`).
    async fn await_step(
        &mut self,
        ctx: &Arc<RoundContext>,
        step: AwaitedStep,
        work: &Work,
    ) -> Result<StepInput, Halt> {
        let api = Arc::clone(&self.api);
        let poll_wait = self.config.poll_wait;
        let deadline = work.deadline();
        let wait = || {
            let api = Arc::clone(&api);
            let ctx = Arc::clone(ctx);
            async move {
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match api.await_secagg_step(&ctx, step, poll_wait.min(left).max(MIN_STEP_WAIT)).await? {
                        StepInput::Pending => continue,
                        input if input.step() == Some(step) => return Ok(input),
                        other => {
                            return Err(ApiError::Protocol(format!(
                                "waited for the {step}, the coordinator answered with the {}",
                                other.step().map_or_else(|| "nothing".to_string(), |s| s.to_string())
                            )))
                        }
                    }
                }
            }
        };
        let activity =
            if step == AwaitedStep::PeerKeys { ClientActivity::Training } else { ClientActivity::Uploading };
        self.persist(activity, work, wait).await
    }

    /// Runs `call` under supervision, again after backoff while it fails transiently.
    async fn persist<T, F, Fut>(&mut self, activity: ClientActivity, work: &Work, call: F) -> Result<T, Halt>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        self.persist_with_grace(activity, work, None, call).await
    }

    /// [`Agent::persist`] with a shutdown grace period.
    async fn persist_with_grace<T, F, Fut>(
        &mut self,
        activity: ClientActivity,
        work: &Work,
        grace: Option<Duration>,
        mut call: F,
    ) -> Result<T, Halt>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let supervision = self.supervision(activity, work, grace);
        let shutdown = self.shutdown.clone();
        let backoff = &mut self.backoff;
        let outcome = supervise(supervision, async {
            loop {
                match call().await {
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, %activity, "secure round call failed; retrying");
                        if backoff.wait(&shutdown).await.is_err() {
                            return Err(e);
                        }
                    }
                    other => return other,
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(value)) => {
                self.contact();
                Ok(value)
            }
            Ok(Err(e)) => Err(Halt::Api(e)),
            Err(stop) => Err(Halt::Stopped(stop)),
        }
    }

    /// The next state after the secure steps of `work` halted.
    async fn halt(&mut self, halt: Halt, work: Work) -> Result<State, AgentError> {
        self.secure = None;
        match halt {
            Halt::Refused(code, detail) => {
                self.report_failure(&work, code, &detail).await;
                Ok(State::Idle)
            }
            Halt::Api(e) => self.on_error(e, State::Idle, Some(&work)).await,
            Halt::Stopped(stop) => Ok(self.stopped(stop, State::Securing(work)).await),
            Halt::Fatal(e) => Err(e),
        }
    }
}
