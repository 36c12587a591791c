//! What the round actor publishes on `watch` channels: readers always see the latest value and
//! never block the actor (a `watch` keeps one value, so a slow reader cannot make it queue).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fedtune_shared::ids::{ModelVersion, RoundId};
use fedtune_shared::round::PhaseName;
use fedtune_shared::secagg::RoundContext;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::model::GlobalModel;

/// The actor's position, for logs, heartbeats and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundState {
    /// Current phase.
    pub phase: PhaseName,
    /// Current (or next) round and attempt.
    pub round: RoundId,
    /// Published model version.
    pub model_version: ModelVersion,
    /// Deadline of the current phase, if it has one.
    pub deadline: Option<Instant>,
}

/// Publishing side, owned by the actor.
#[derive(Debug)]
pub struct EventPublisher {
    state: watch::Sender<RoundState>,
    model: watch::Sender<Arc<GlobalModel>>,
    /// Bumped whenever tasks are assigned or withdrawn, or the federation finishes: long-polls
    /// wait on it instead of spinning.
    tasks: watch::Sender<u64>,
    /// The secure round in progress, if any.
    secure: watch::Sender<Option<Arc<RoundContext>>>,
}

/// Reading side, cloned into every RPC handler.
#[derive(Debug, Clone)]
pub struct EventSubscriber {
    /// Phase, round, version.
    pub state: watch::Receiver<RoundState>,
    /// The published model (downloads read it without asking the actor).
    pub model: watch::Receiver<Arc<GlobalModel>>,
    /// Task epoch (see [`EventPublisher`]).
    pub tasks: watch::Receiver<u64>,
    /// The context of the secure-aggregation attempt in progress (`None` when none is): RPC
    /// handlers convert SecAgg messages against it at the edge, and secure-step long-polls wait
    /// on `tasks`, which is bumped whenever a secure step closes or the attempt ends.
    pub secure: watch::Receiver<Option<Arc<RoundContext>>>,
}

impl EventPublisher {
    /// Channels starting at `state` with `model` published.
    pub fn new(state: RoundState, model: Arc<GlobalModel>) -> (Self, EventSubscriber) {
        let (s_tx, s_rx) = watch::channel(state);
        let (m_tx, m_rx) = watch::channel(model);
        let (t_tx, t_rx) = watch::channel(0);
        let (sec_tx, sec_rx) = watch::channel(None);
        (
            Self { state: s_tx, model: m_tx, tasks: t_tx, secure: sec_tx },
            EventSubscriber { state: s_rx, model: m_rx, tasks: t_rx, secure: sec_rx },
        )
    }

    /// Publishes a new state.
    pub fn set_state(&self, state: RoundState) {
        self.state.send_replace(state);
    }

    /// The last published state.
    pub fn state(&self) -> RoundState {
        *self.state.borrow()
    }

    /// Publishes a new model version.
    pub fn publish_model(&self, model: Arc<GlobalModel>) {
        self.model.send_replace(model);
    }

    /// The published model.
    pub fn model(&self) -> Arc<GlobalModel> {
        self.model.borrow().clone()
    }

    /// Wakes long-polls.
    pub fn tasks_changed(&self) {
        self.tasks.send_modify(|n| *n += 1);
    }

    /// Withdraws the secure attempt's context if one is published.
    pub fn clear_secure(&self) {
        if self.secure.borrow().is_some() {
            self.set_secure(None);
        }
    }

    /// Publishes the secure attempt in progress (or its end) and wakes long-polls.
    pub fn set_secure(&self, ctx: Option<Arc<RoundContext>>) {
        self.secure.send_replace(ctx);
        self.tasks_changed();
    }
}

/// Payload bytes moved by the RPC layer, counted with relaxed atomics (statistics only). The
/// actor records the growth since the previous round's close with each round.
#[derive(Debug, Default)]
pub struct Traffic {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Traffic {
    /// Counts model bytes streamed to a client.
    pub fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        crate::telemetry::bytes_sent(n);
    }

    /// Counts update bytes received from a client.
    pub fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
        crate::telemetry::bytes_received(n);
    }

    /// `(sent, received)` totals since start.
    pub fn totals(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }
}
