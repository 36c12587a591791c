//! The client agent: a loop over an explicit state machine.
//!
//! ```text
//!              ┌──────────────────────── Unauthenticated (coordinator restarted) ───────────┐
//!              ▼                                                                              │
//!  start ─► Connecting ──► Idle ──fit──► Downloading ──► Training ──► Uploading ──► Idle …   │
//!              ▲            │ ▲              │  (resume)       │           │ (same update)    │
//!              │            │ └─ none/stale ─┼─────────────────┴───────────┤                  │
//!              │            └─evaluate──► Downloading ──► Evaluating ──────┘                  │
//!              │                                                                              │
//!           Backoff ◄── any transient failure (unreachable, busy, broken stream) ──► the same │
//!              │        state again after an exponential, jittered pause                      │
//!              └──────────────────────────────────────────────────────────────────────────────┘
//!  Finished task, SIGTERM (shutdown token) or give-up deadline ─► Shutdown
//! ```
//!
//! Each state is handled in its own file: [`session`] (Connecting), [`poll`] (Idle),
//! [`download`] (Downloading, resumable, digest-checked), [`fit`] (Training),
//! [`evaluate`] (Evaluating), [`upload`] (Uploading). [`heartbeat`] keeps the coordinator
//! informed while a task runs and notices when the task is no longer wanted, and [`worker`]
//! owns the trainer on its own OS thread (libtorch work never runs on the async reactor).
//!
//! Work survives a coordinator restart: a partially downloaded model resumes from its offset,
//! and a prepared update is kept until the coordinator accepts it or its round is over, so a
//! client that re-joins and is handed the same task again uploads instead of retraining.

mod download;
mod evaluate;
mod fit;
mod heartbeat;
mod poll;
mod secure;
mod session;
mod upload;
mod worker;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::{ClientId, ModelVersion, RoundId};
use fedtune_shared::params::{Manifest, ParameterVector};
use fedtune_shared::round::{
    AdapterSpec, EvaluateTask, FailureCode, FailureReport, FitTask, PrivacyMode, TaskKind,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::local_trainer::{LocalTrainer, TrainerError};
use crate::privacy_floor::PrivacyFloor;
use crate::transport::{ApiError, CoordinatorApi};
use crate::update::privacy::DpPipelines;
use crate::update::PipelineFactory;

pub use download::{InitialSource, ModelCache};
pub use worker::FitResult;

/// A stable 64-bit seed from a client name (FNV-1a): the same name gives the same jitter and
/// fake-trainer behaviour on every run, different names differ.
pub fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// What the trainer factory learns from the coordinator before it builds the model.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    /// Class names of the federation's classification head, in id order. Clients must map
    /// their labels with these (not with what their own data happens to contain), or a client
    /// that lacks a class would number the others differently.
    pub labels: Vec<String>,
    /// Exactly the tensors the coordinator expects clients to train and upload.
    pub trainable: Manifest,
    /// The LoRA adapter to build onto the base model (and the digest its A must have).
    pub adapter: Option<AdapterSpec>,
}

/// Builds the trainer once the first join has told the agent what to train. It runs on the
/// trainer thread, so it may load weights and tokenizers at leisure.
pub type TrainerFactory =
    Box<dyn FnOnce(&TrainerSpec) -> Result<Box<dyn LocalTrainer>, TrainerError> + Send + 'static>;

/// How the agent behaves (everything but the coordinator and the trainer).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Name to join under; `None` lets the coordinator assign one.
    pub name: Option<ClientId>,
    /// Training examples held locally (sent at join, informational; only 0 or 1 when the
    /// floor expects privacy, see [`AgentConfig::join_counts`]).
    pub train_examples: u64,
    /// Held-out examples (0 = this client cannot evaluate).
    pub eval_examples: u64,
    /// The weakest fit task this site trains for; weaker ones are refused and reported.
    pub privacy_floor: PrivacyFloor,
    /// Longest single long-poll for work.
    pub poll_wait: Duration,
    /// Retry schedule while the coordinator is unreachable or busy.
    pub backoff: BackoffPolicy,
    /// Stop with [`AgentError::GaveUp`] after this long without any successful call; `None`
    /// retries forever (the coordinator may be down for maintenance for hours).
    pub give_up_after: Option<Duration>,
    /// On shutdown, how long an upload in flight may still take to finish (its work is done,
    /// so finishing it is worth a short wait); other steps are abandoned at once.
    pub shutdown_grace: Duration,
    /// Upload pacing in bytes per second (`None` = as fast as the link goes), for sites whose
    /// uplink must not be saturated.
    pub upload_rate_limit: Option<u64>,
    /// Identifies this build in the coordinator's logs.
    pub agent_version: String,
    /// The client's identity key (the one the transport authenticates with): a secure round's
    /// agreement keys are signed with it. `None`: this client cannot take part in one.
    pub identity: Option<Arc<KeyPair>>,
    /// The local copy of the base model: with the coordinator's `init_seed` the agent rebuilds
    /// version 0 from it instead of downloading it (if the digests agree). `None`: always
    /// download.
    pub model_dir: Option<PathBuf>,
}

impl AgentConfig {
    /// The `(train, eval)` example counts to send at join. A site that expects differential
    /// privacy sends only whether it has examples (0 or 1): a real count is a statistic of its
    /// data that no noise protects, and the coordinator needs no more than "can evaluate".
    pub fn join_counts(&self) -> (u64, u64) {
        if self.privacy_floor.expects_privacy() {
            (self.train_examples.min(1), self.eval_examples.min(1))
        } else {
            (self.train_examples, self.eval_examples)
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            name: None,
            train_examples: 0,
            eval_examples: 0,
            privacy_floor: PrivacyFloor::default(),
            poll_wait: Duration::from_secs(20),
            backoff: BackoffPolicy::default(),
            give_up_after: None,
            shutdown_grace: Duration::from_secs(10),
            upload_rate_limit: None,
            agent_version: concat!("fedtune-client/", env!("CARGO_PKG_VERSION")).to_string(),
            identity: None,
            model_dir: None,
        }
    }
}

/// Why the agent stopped without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The coordinator said the federation is over.
    Finished {
        /// Final global model version.
        final_version: ModelVersion,
        /// The coordinator's reason.
        reason: String,
    },
    /// Shutdown was requested (SIGINT/SIGTERM).
    Shutdown,
}

/// Counters of one agent run, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Successful joins (more than one means the coordinator restarted or forgot us).
    pub joins: u64,
    /// Fit tasks trained to completion.
    pub fits: u64,
    /// Updates the coordinator accepted.
    pub updates_accepted: u64,
    /// Evaluations reported.
    pub evaluations: u64,
    /// Tasks given up (reported failed, abandoned or stale).
    pub tasks_dropped: u64,
    /// Model payload bytes downloaded (resumed downloads count each byte once).
    pub bytes_downloaded: u64,
    /// Update payload bytes uploaded (retries count again).
    pub bytes_uploaded: u64,
}

/// How an agent run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOutcome {
    /// Why it stopped.
    pub reason: ExitReason,
    /// What it did.
    pub stats: AgentStats,
}

/// Failures that end the agent (everything else is retried or reported to the coordinator).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator refuses this client's identity; retrying cannot help.
    #[error("the coordinator refuses this client: {0}")]
    Denied(String),
    /// The trainer could not be built. The cause is the error's source, not part of this
    /// message, so a printed chain (`{:#}`) names it once.
    #[error("building the trainer failed")]
    Trainer(#[source] TrainerError),
    /// The local model does not train what the coordinator expects.
    #[error("local model does not match the federation: {0}")]
    Incompatible(String),
    /// The coordinator speaks another protocol revision.
    #[error("coordinator speaks protocol {theirs}, this agent {ours}")]
    Protocol {
        /// Coordinator's revision.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// No successful call for the configured give-up time.
    #[error("no contact with the coordinator for {0:?}; giving up")]
    GaveUp(Duration),
    /// A local configuration problem (URL, TLS).
    #[error("configuration: {0}")]
    Config(String),
    /// The trainer thread stopped unexpectedly.
    #[error("the trainer thread stopped")]
    WorkerGone,
}

/// A task the agent works on, with its deadline on the local clock.
#[derive(Debug, Clone)]
enum Work {
    Fit { task: FitTask, deadline: Instant },
    Evaluate { task: EvaluateTask, deadline: Instant },
}

impl Work {
    fn round(&self) -> u64 {
        match self {
            Work::Fit { task, .. } => task.id.round,
            Work::Evaluate { task, .. } => task.round,
        }
    }

    fn deadline(&self) -> Instant {
        match self {
            Work::Fit { deadline, .. } | Work::Evaluate { deadline, .. } => *deadline,
        }
    }

    /// Whether the task is under differential privacy (then a failure says its code only).
    fn private(&self) -> bool {
        match self {
            Work::Fit { task, .. } => task.privacy.mode != PrivacyMode::None,
            Work::Evaluate { .. } => false,
        }
    }

    fn failure(&self, reason: String) -> FailureReport {
        match self {
            Work::Fit { task, .. } => FailureReport { id: task.id, kind: TaskKind::Fit, reason },
            Work::Evaluate { task, .. } => {
                FailureReport { id: RoundId::new(task.round, 0), kind: TaskKind::Evaluate, reason }
            }
        }
    }
}

/// A prepared update waiting to be accepted.
#[derive(Debug, Clone)]
struct Pending {
    task: FitTask,
    deadline: Instant,
    result: Arc<FitResult>,
}

/// The states of the agent (see the module diagram).
#[derive(Debug)]
enum State {
    /// Joining (or re-joining) the federation.
    Connecting,
    /// A secure round's first steps (keys, shares), before the model is fetched.
    Securing(Work),
    /// Long-polling for work.
    Idle,
    /// Fetching the model a task needs.
    Downloading(Work),
    /// Local training from the global weights on the trainer thread.
    Training { task: FitTask, deadline: Instant, global: Arc<ParameterVector> },
    /// Evaluating a published model on the trainer thread.
    Evaluating { task: EvaluateTask, deadline: Instant, global: Arc<ParameterVector> },
    /// Streaming a prepared update.
    Uploading(Pending),
    /// Waiting before trying `then` again.
    Backoff { then: Box<State>, cause: ApiError },
    /// Done.
    Shutdown(ExitReason),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Securing(_) => "securing",
            State::Idle => "idle",
            State::Downloading(_) => "downloading",
            State::Training { .. } => "training",
            State::Evaluating { .. } => "evaluating",
            State::Uploading(_) => "uploading",
            State::Backoff { .. } => "backoff",
            State::Shutdown(_) => "shutdown",
        }
    }
}

impl State {
    /// The task this state works on, if any (looking through a backoff).
    fn work(&self) -> Option<Work> {
        match self {
            State::Downloading(work) | State::Securing(work) => Some(work.clone()),
            State::Training { task, deadline, .. } => {
                Some(Work::Fit { task: task.clone(), deadline: *deadline })
            }
            State::Uploading(p) => Some(Work::Fit { task: p.task.clone(), deadline: p.deadline }),
            State::Evaluating { task, deadline, .. } => {
                Some(Work::Evaluate { task: task.clone(), deadline: *deadline })
            }
            State::Backoff { then, .. } => then.work(),
            State::Connecting | State::Idle | State::Shutdown(_) => None,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A federated client: joins, takes tasks, trains, uploads, evaluates, until the federation
/// finishes or shutdown is requested.
pub struct Agent<C: CoordinatorApi + 'static> {
    api: Arc<C>,
    config: AgentConfig,
    shutdown: CancellationToken,
    pipelines: Arc<dyn PipelineFactory>,
    backoff: Backoff,
    /// Set by the first successful join.
    session: Option<session::Session>,
    /// Built on the first join, then kept across re-joins.
    factory: Option<TrainerFactory>,
    worker: Option<worker::Worker>,
    cache: ModelCache,
    /// An update trained but not yet accepted (kept across coordinator restarts).
    pending: Option<Pending>,
    /// The secure round whose shares are sent, waiting for the model and training.
    secure: Option<secure::SecureRound>,
    /// Last time any call to the coordinator succeeded (for `give_up_after`).
    last_contact: Instant,
    stats: AgentStats,
}

impl<C: CoordinatorApi + 'static> fmt::Debug for Agent<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("config", &self.config)
            .field("session", &self.session)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<C: CoordinatorApi + 'static> Agent<C> {
    /// An agent that will build its trainer with `factory` after the first join and stop when
    /// `shutdown` is cancelled. Updates go through [`DpPipelines`] (clip and noise as each task's
    /// privacy instructions say) unless [`Agent::with_pipelines`] says otherwise.
    pub fn new(api: C, config: AgentConfig, factory: TrainerFactory, shutdown: CancellationToken) -> Self {
        // Spread the retries of different clients: seed the jitter from the name.
        let seed = config.name.as_ref().map(|n| name_seed(n.as_str())).unwrap_or_else(rand::random);
        Self {
            api: Arc::new(api),
            backoff: Backoff::new(config.backoff, seed),
            config,
            shutdown,
            pipelines: Arc::new(DpPipelines),
            session: None,
            factory: Some(factory),
            worker: None,
            cache: ModelCache::default(),
            pending: None,
            secure: None,
            last_contact: Instant::now(),
            stats: AgentStats::default(),
        }
    }

    /// Uses `pipelines` to build each fit task's upload pipeline (privacy, signing).
    pub fn with_pipelines(mut self, pipelines: Arc<dyn PipelineFactory>) -> Self {
        self.pipelines = pipelines;
        self
    }

    /// Runs until the federation finishes, shutdown is requested, or a fatal error.
    pub async fn run(mut self) -> Result<AgentOutcome, AgentError> {
        let mut state = State::Connecting;
        loop {
            // An upload in flight gets its grace period (see `upload`); anything else stops now.
            if self.shutdown.is_cancelled() && !matches!(state, State::Uploading(_) | State::Shutdown(_)) {
                state = self.abandon(state, "client shutting down").await;
            }
            if let State::Shutdown(reason) = state {
                self.leave().await;
                tracing::info!(?reason, stats = ?self.stats, "agent stopped");
                return Ok(AgentOutcome { reason, stats: self.stats });
            }
            let span = self.step_span(&state);
            state = self.step(state).instrument(span).await?;
        }
    }

    /// The span of one step: the client, and the task it works on, so that a log search for a
    /// client and a round finds everything the client did in it.
    fn step_span(&self, state: &State) -> tracing::Span {
        let client = self.session.as_ref().map(|s| &s.client_id).or(self.config.name.as_ref());
        let client = tracing::field::display(client.map_or("-", |c| c.as_str()));
        match state.work() {
            Some(Work::Fit { task, .. }) => {
                tracing::info_span!("task", %client, kind = "fit", round = task.id.round, attempt = task.id.attempt)
            }
            Some(Work::Evaluate { task, .. }) => {
                tracing::info_span!("task", %client, kind = "evaluate", round = task.round)
            }
            None => tracing::info_span!("agent", %client),
        }
    }

    async fn step(&mut self, state: State) -> Result<State, AgentError> {
        tracing::debug!(state = %state, "agent step");
        match state {
            State::Connecting => self.connect().await,
            State::Securing(work) => self.secure_setup(work).await,
            State::Idle => self.poll().await,
            State::Downloading(work) => self.download(work).await,
            State::Training { task, deadline, global } => self.fit(task, deadline, global).await,
            State::Evaluating { task, deadline, global } => self.evaluate(task, deadline, global).await,
            State::Uploading(pending) => self.upload(pending).await,
            State::Backoff { then, cause } => self.back_off(*then, cause).await,
            // `run` ends on it before asking for a step.
            State::Shutdown(reason) => Ok(State::Shutdown(reason)),
        }
    }

    /// Records a successful call: the coordinator is there, the retry schedule starts over.
    fn contact(&mut self) {
        self.last_contact = Instant::now();
        self.backoff.reset();
    }

    /// Waits (cancellably) before retrying `then`, unless it is time to give up.
    async fn back_off(&mut self, then: State, cause: ApiError) -> Result<State, AgentError> {
        if let Some(limit) = self.config.give_up_after {
            if self.last_contact.elapsed() >= limit {
                return Err(AgentError::GaveUp(limit));
            }
        }
        let attempt = self.backoff.attempts() + 1;
        match self.backoff.wait(&self.shutdown).await {
            Ok(delay) => {
                tracing::warn!(%cause, retry_in = ?delay, attempt, next = %then, "coordinator call failed; retrying");
                Ok(then)
            }
            Err(_) => Ok(self.abandon(then, "client shutting down").await),
        }
    }

    /// Handles a failed call made in some state: retry transient failures after a pause,
    /// re-join on a lost session, give up the task otherwise.
    async fn on_error(
        &mut self,
        error: ApiError,
        retry: State,
        work: Option<&Work>,
    ) -> Result<State, AgentError> {
        match error {
            e if e.is_transient() => Ok(State::Backoff { then: Box::new(retry), cause: e }),
            // Garbage from the coordinator while no task is at stake (a version skew, a proxy
            // in the way): keep trying, slowly. During a task it fails the task below.
            e @ ApiError::Protocol(_) if work.is_none() => {
                Ok(State::Backoff { then: Box::new(retry), cause: e })
            }
            ApiError::Unauthenticated(why) => {
                tracing::info!(%why, "session lost (coordinator restarted?); joining again");
                Ok(State::Connecting)
            }
            ApiError::Denied(why) => Err(AgentError::Denied(why)),
            ApiError::Config(why) => Err(AgentError::Config(why)),
            ApiError::Stale(why) | ApiError::AlreadyAccepted(why) | ApiError::AttemptOver(why) => {
                tracing::info!(%why, "task is over; polling for the next one");
                self.stats.tasks_dropped += 1;
                Ok(State::Idle)
            }
            other => {
                if let Some(work) = work {
                    self.report_failure(work, FailureCode::TransportFailed, &other.to_string()).await;
                } else {
                    tracing::warn!(error = %other, "coordinator refused a request");
                }
                Ok(State::Idle)
            }
        }
    }

    /// Tells the coordinator we give up `work`, so the round need not wait for us. Best effort.
    /// `detail` goes to the local log; the coordinator hears it only for a task without
    /// differential privacy on a site whose floor does not expect privacy, and the bare `code`
    /// otherwise (detail may be computed from local data: a value, its index, a loss).
    async fn report_failure(&mut self, work: &Work, code: FailureCode, detail: &str) {
        self.stats.tasks_dropped += 1;
        tracing::warn!(round = work.round(), %code, %detail, "giving up the task");
        let private = work.private() || self.config.privacy_floor.expects_privacy();
        let report = work.failure(code.reason(private, detail));
        match tokio::time::timeout(Duration::from_secs(5), self.api.report_failure(report)).await {
            Ok(Ok(())) => self.contact(),
            Ok(Err(e)) => tracing::debug!(error = %e, "could not report the failure"),
            Err(_) => tracing::debug!("reporting the failure timed out"),
        }
    }

    /// Leaves `state` because of shutdown: reports the task it was working on, if any.
    async fn abandon(&mut self, state: State, reason: &str) -> State {
        if let (Some(work), Some(_)) = (state.work(), &self.session) {
            self.report_failure(&work, FailureCode::ClientShutdown, reason).await;
        }
        match state {
            State::Shutdown(reason) => State::Shutdown(reason),
            _ => State::Shutdown(ExitReason::Shutdown),
        }
    }

    /// Ends the session politely (best effort, bounded).
    async fn leave(&mut self) {
        if self.session.is_some() {
            let _ = tokio::time::timeout(Duration::from_secs(3), self.api.leave()).await;
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod secure_tests;

#[cfg(test)]
mod download_tests;
