//! What every phase shares: the [`Phase`] trait, the [`Shared`] state that survives phase
//! transitions, and the handling of requests that mean the same in every phase (join, poll,
//! heartbeat, leave, status, and the precise refusal of uploads and reports that the current
//! phase does not take).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedtune_shared::ids::{ClientId, ModelVersion, RoundId};
use fedtune_shared::pb::PROTOCOL_VERSION;
use fedtune_shared::round::{
    ClientActivity, HeartbeatReply, PhaseName, PrivacyStatus, StatusReport, Task, TaskKind,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::events::{EventPublisher, RoundState, Traffic};
use super::requests::{Envelope, Joined, Request};
use super::Round;
use crate::error::RoundError;
use crate::model::GlobalModel;
use crate::registry::Registry;
use crate::settings::CoordinatorSettings;
use crate::storage::{self, Storage};
use crate::strategy::Strategy;

/// One phase of the round state machine.
pub(crate) trait Phase: Sized {
    /// Name in logs, spans, status.
    const NAME: PhaseName;
    /// Runs the phase to completion, serving requests meanwhile, and returns the next state.
    fn run(self, shared: &mut Shared) -> impl Future<Output = Round> + Send;
}

/// A task assigned to a client, held until done or withdrawn.
#[derive(Debug, Clone)]
pub(crate) struct Assigned {
    /// The task (its deadline fields are filled in when it is handed out).
    pub(crate) task: Task,
    /// When it expires.
    pub(crate) deadline: Instant,
}

impl Assigned {
    /// The kind and round of the task.
    pub(crate) fn kind_and_round(&self) -> (TaskKind, u64) {
        match &self.task {
            Task::Fit(f) => (TaskKind::Fit, f.id.round),
            Task::Evaluate(e) => (TaskKind::Evaluate, e.round),
            _ => unreachable!("only fit and evaluate tasks are assigned"),
        }
    }
}

/// Why the last round stopped taking updates, for precise refusals.
#[derive(Debug, Clone)]
pub(crate) struct Closed {
    /// Round.
    pub(crate) id: RoundId,
    /// Reason.
    pub(crate) reason: String,
}

/// State that survives phase transitions. Owned by the actor task alone.
pub(crate) struct Shared {
    /// Validated configuration.
    pub(crate) settings: Arc<CoordinatorSettings>,
    /// Incoming requests (bounded; see `requests`).
    pub(crate) requests: mpsc::Receiver<Envelope>,
    /// Watch channels.
    pub(crate) events: EventPublisher,
    /// Clients and liveness.
    pub(crate) registry: Registry,
    /// State directory.
    pub(crate) storage: Storage,
    /// Aggregation policy; behind a mutex only so it can move onto blocking threads.
    pub(crate) strategy: Arc<Mutex<Box<dyn Strategy>>>,
    /// Strategy name (cached for status).
    pub(crate) strategy_name: String,
    /// The published model.
    pub(crate) model: Arc<GlobalModel>,
    /// Round and attempt in progress, or the last one.
    pub(crate) round: RoundId,
    /// The round and attempt the next Selecting uses.
    pub(crate) next: RoundId,
    /// Current phase.
    pub(crate) phase: PhaseName,
    /// Deadline of the current phase.
    pub(crate) deadline: Option<Instant>,
    /// Failed attempts in a row.
    pub(crate) consecutive_failures: u32,
    /// Outstanding tasks.
    pub(crate) tasks: BTreeMap<ClientId, Assigned>,
    /// The last round that stopped taking updates.
    pub(crate) closed: Option<Closed>,
    /// Updates accepted in the current round (status).
    pub(crate) accepted_updates: u32,
    /// Set when the federation is over (reason).
    pub(crate) finished: Option<String>,
    /// Whether the initial model was evaluated (or evaluation was attempted).
    pub(crate) initial_evaluated: bool,
    /// Next upload id.
    pub(crate) next_upload_id: u64,
    /// The one shutdown token.
    pub(crate) cancel: CancellationToken,
    /// Bytes moved by the RPC layer.
    pub(crate) traffic: Arc<Traffic>,
    /// When this process drew the attempt in progress (for its duration histogram).
    pub(crate) attempt_started: Option<Instant>,
    /// Traffic totals when the previous round closed.
    pub(crate) traffic_mark: (u64, u64),
    /// The strategy's differential-privacy state, if it has one (read by status without
    /// locking the strategy, which aggregation may hold for a while).
    pub(crate) privacy: Option<crate::privacy::PrivacyMonitor>,
    /// The federation id update signatures and secure rounds are bound to (empty under seams
    /// that have none).
    pub(crate) federation_id: String,
    /// Where a secure round's roster finds the clients' registered identity keys.
    pub(crate) identities: Arc<dyn crate::auth::Authenticator>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("round", &self.round)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// What woke a phase up.
// One value per wake-up, moved straight into a match: boxing the request would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Wake {
    /// A request the phase may handle itself.
    Request(Envelope),
    /// The phase deadline passed.
    Deadline,
    /// Periodic liveness check.
    Tick,
    /// Shutdown.
    Cancelled,
}

impl Shared {
    /// Publishes the phase (and current round/version/deadline).
    pub(crate) fn enter(&mut self, phase: PhaseName, deadline: Option<Instant>) {
        crate::telemetry::phase_entered(phase);
        self.phase = phase;
        self.deadline = deadline;
        self.publish_state();
    }

    /// Re-publishes the current state.
    pub(crate) fn publish_state(&self) {
        self.events.set_state(RoundState {
            phase: self.phase,
            round: self.round,
            model_version: self.model.version,
            deadline: self.deadline,
        });
    }

    /// Periodic timer for liveness checks.
    pub(crate) fn tick_interval(&self) -> Interval {
        let period = self.settings.clients.heartbeat_interval.min(Duration::from_secs(1));
        let mut i = tokio::time::interval(period);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    }

    /// Waits for the next request, the deadline, a tick or shutdown.
    pub(crate) async fn wake(&mut self, deadline: Option<Instant>, tick: &mut Interval) -> Wake {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Wake::Cancelled,
            _ = sleep => Wake::Deadline,
            env = self.requests.recv() => match env {
                Some(env) => Wake::Request(env),
                // Every handle is gone: nobody can talk to us any more.
                None => Wake::Cancelled,
            },
            _ = tick.tick() => Wake::Tick,
        }
    }

    /// Runs `work` (which must not borrow the actor) while serving common requests. Returns
    /// `None` on shutdown.
    pub(crate) async fn serve_while<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return Some(out),
                _ = self.cancel.cancelled() => return None,
                Some(env) = self.requests.recv() => self.handle_common(env).await,
            }
        }
    }

    /// Runs a storage call on a blocking thread while serving common requests. `None` on
    /// shutdown.
    pub(crate) async fn db<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<R, storage::StorageError> + Send + 'static,
    ) -> Option<Result<R, storage::StorageError>> {
        let st = self.storage.clone();
        self.serve_while(async move { st.call(f).await }).await
    }

    /// Waits `d` while serving common requests. Returns false on shutdown.
    pub(crate) async fn serve_for(&mut self, d: Duration) -> bool {
        self.serve_while(tokio::time::sleep(d)).await.is_some()
    }

    /// Withdraws every task of one kind and wakes long-polls.
    pub(crate) fn withdraw_tasks(&mut self, kind: TaskKind) {
        self.tasks.retain(|_, a| a.kind_and_round().0 != kind);
        self.events.tasks_changed();
    }

    /// Handles a request the way every phase does. Phases intercept what they handle
    /// differently (uploads while training, reports while evaluating) before calling this.
    pub(crate) async fn handle_common(&mut self, (req, span): Envelope) {
        let _g = span.enter();
        let now = Instant::now();
        match req {
            Request::Join(join, reply) => {
                let out = self.join(join, now).await;
                let _ = reply.send(out);
            }
            Request::Poll(client, reply) => {
                let out = if !self.registry.touch(&client, Some(ClientActivity::Idle), now) {
                    Err(RoundError::UnknownClient(client))
                } else {
                    Ok(self.task_for(&client, now))
                };
                let _ = reply.send(out);
            }
            Request::Heartbeat(client, hb, reply) => {
                let out = if !self.registry.touch(&client, Some(hb.activity), now) {
                    Err(RoundError::UnknownClient(client))
                } else {
                    let wanted = match hb.round {
                        None => true,
                        Some(r) => self.tasks.get(&client).is_some_and(|a| a.kind_and_round().1 == r),
                    };
                    Ok(HeartbeatReply {
                        phase: self.phase,
                        round: self.round,
                        model_version: self.model.version,
                        task_still_wanted: wanted,
                    })
                };
                let _ = reply.send(out);
            }
            Request::Leave(client, reply) => {
                self.registry.leave(&client);
                info!(client = %client, "client left");
                let _ = reply.send(Ok(()));
            }
            Request::Status(recent, reply) => {
                let out = self.status(recent, now).await;
                let _ = reply.send(out);
            }
            Request::BeginUpload(client, header, _, reply) => {
                self.registry.touch(&client, None, now);
                let _ = reply.send(Err(self.refuse_upload(header.id)));
            }
            Request::CheckUpload(client, id, reply) => {
                self.registry.touch(&client, None, now);
                let _ = reply.send(Err(self.refuse_upload(id)));
            }
            Request::CommitUpload(ticket, staged, reply) => {
                drop(staged);
                let _ = reply.send(Err(self.refuse_upload(ticket.round)));
            }
            Request::AbortUpload(_) => {}
            Request::ReportFailure(client, report, reply) => {
                // A failure report for a task that is already over changes nothing; acknowledge
                // it so the client moves on.
                self.registry.touch(&client, Some(ClientActivity::Idle), now);
                debug!(client = %client, round = report.id.round, "failure report for a task that is over");
                let _ = reply.send(Ok(()));
            }
            Request::ReportEvaluation(client, report, reply) => {
                self.registry.touch(&client, Some(ClientActivity::Idle), now);
                let _ = reply.send(Err(RoundError::NoEvaluationTask { client, round: report.round }));
            }
            // No secure step is open in this phase: the attempt a SecAgg message names is over
            // (or never was); the client stops its task.
            Request::AdvertiseKeys(client, msg, reply) => {
                let _ = reply.send(Err(self.secure_attempt_over(client, msg.round)));
            }
            Request::SendShares(client, msg, reply) => {
                let _ = reply.send(Err(self.secure_attempt_over(client, msg.round)));
            }
            Request::AwaitSecAggStep(client, round, _, reply) => {
                let _ = reply.send(Err(self.secure_attempt_over(client, round)));
            }
            Request::AnswerUnmask(client, msg, reply) => {
                let _ = reply.send(Err(self.secure_attempt_over(client, msg.round)));
            }
        }
    }

    async fn join(
        &mut self,
        join: fedtune_shared::round::JoinRequest,
        now: Instant,
    ) -> Result<Joined, RoundError> {
        if join.protocol_version != PROTOCOL_VERSION {
            return Err(RoundError::ProtocolVersion {
                client: join.protocol_version,
                server: PROTOCOL_VERSION,
            });
        }
        let id = match join.name {
            Some(id) => id,
            None => {
                let bytes: [u8; 8] = rand::random();
                ClientId::parse(&format!("c-{}", hex::encode(bytes))).expect("hex ids are valid")
            }
        };
        // Under DP a client's example counts are statistics of its data that no noise protects:
        // keep only whether it has examples (an older or careless client may still send them).
        let (tr, ev) = if self.settings.privacy.enabled() {
            (join.train_examples.min(1), join.eval_examples.min(1))
        } else {
            (join.train_examples, join.eval_examples)
        };
        self.registry.join(&id, join.public_key, tr, ev, now)?;
        let (c, key) = (id.clone(), join.public_key);
        self.storage.call(move |conn| storage::upsert_client(conn, &c, key, tr, ev)).await?;
        info!(client = %id, train_examples = tr, eval_examples = ev, "client joined");
        Ok(Joined { client_id: id })
    }

    /// The task a poll returns now.
    pub(crate) fn task_for(&self, client: &ClientId, now: Instant) -> Task {
        if let Some(reason) = &self.finished {
            return Task::Finished { final_version: self.model.version, reason: reason.clone() };
        }
        match self.tasks.get(client) {
            Some(a) => {
                let left = a.deadline.saturating_duration_since(now);
                let unix = storage::now_ms() + left.as_millis() as u64;
                match a.task.clone() {
                    Task::Fit(mut f) => {
                        f.deadline_in = left;
                        f.deadline_unix_ms = unix;
                        Task::Fit(f)
                    }
                    Task::Evaluate(mut e) => {
                        e.deadline_in = left;
                        e.deadline_unix_ms = unix;
                        Task::Evaluate(e)
                    }
                    other => other,
                }
            }
            None => Task::None { retry_after: Duration::ZERO, phase: self.phase, round: self.round.round },
        }
    }

    /// The refusal of a secure-aggregation message when no secure step is open.
    pub(crate) fn secure_attempt_over(
        &self,
        client: ClientId,
        round: fedtune_shared::secagg::RoundRef,
    ) -> RoundError {
        let id = RoundId::new(round.round, round.attempt);
        RoundError::AttemptEnded {
            round: id,
            client,
            reason: format!(
                "no secure step is open (the coordinator is at {}, phase {})",
                self.round, self.phase
            ),
        }
    }

    /// The precise refusal of an upload for `id` when no round takes it.
    pub(crate) fn refuse_upload(&self, id: RoundId) -> RoundError {
        let current = self.round;
        if id < current {
            RoundError::StaleRound { got: id, current }
        } else if id > current {
            RoundError::FutureRound { got: id, current }
        } else if let Some(c) = self.closed.as_ref().filter(|c| c.id == id) {
            RoundError::RoundClosed { round: id, reason: c.reason.clone() }
        } else {
            RoundError::NotTraining { phase: self.phase }
        }
    }

    async fn status(&self, recent: usize, now: Instant) -> Result<StatusReport, RoundError> {
        let recent = recent.clamp(1, 1000);
        let rounds = self.storage.call(move |c| storage::recent_rounds(c, recent)).await?;
        Ok(StatusReport {
            protocol_version: PROTOCOL_VERSION,
            phase: self.phase,
            round: self.round,
            model_version: self.model.version,
            total_rounds: self.settings.rounds.total,
            strategy: self.strategy_name.clone(),
            deadline_in: self.deadline.map(|d| d.saturating_duration_since(now)),
            clients: self.registry.status(now),
            recent_rounds: rounds,
            accepted_updates: self.accepted_updates,
            privacy: self.privacy.as_ref().map(|p| p.snapshot()).unwrap_or_else(PrivacyStatus::none),
            finished_reason: self.finished.clone(),
        })
    }

    /// `(sent, received)` bytes since the previous call (the previous round's close).
    pub(crate) fn take_traffic(&mut self) -> (u64, u64) {
        let now = self.traffic.totals();
        let delta = (now.0 - self.traffic_mark.0, now.1 - self.traffic_mark.1);
        self.traffic_mark = now;
        delta
    }

    /// True once every configured round completed.
    pub(crate) fn all_rounds_done(&self) -> bool {
        self.model.version >= ModelVersion(self.settings.rounds.total)
    }

    /// Logs and records an internal failure that ends the federation.
    pub(crate) fn fatal(&mut self, what: &str, err: &dyn std::fmt::Display) -> Round {
        warn!(cause = %err, "{what}");
        Round::Shutdown(super::phases::shutdown::Shutdown::fatal(format!("{what}: {err}")))
    }
}
