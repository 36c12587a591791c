//! Requests to the round actor and the handle RPC handlers send them through.
//!
//! Each request carries a `oneshot` for its reply and the caller's tracing span. The channel is
//! **bounded** (`server.request_queue`): when the actor falls behind, handlers wait at `send`
//! instead of queueing without limit, which pushes back on clients through their open calls.

use fedtune_shared::ids::{ClientId, RoundId};
use fedtune_shared::round::{
    EvalReport, FailureReport, Heartbeat, HeartbeatReply, JoinRequest, StatusReport, Task, UpdateHeader,
    UploadReceipt,
};
use fedtune_shared::secagg::{
    AwaitedStep, KeyAdvertisement, RoundRef, RoundUnmaskAnswer, ShareUpload, StepInput,
};
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::events::EventSubscriber;
use crate::error::RoundError;
use crate::spool::StagedUpdate;

/// Reply channel of a request.
pub type Reply<T> = oneshot::Sender<Result<T, RoundError>>;

/// What a successful join returns (the session token is added by the RPC layer).
#[derive(Debug, Clone)]
pub struct Joined {
    /// The client's id.
    pub client_id: ClientId,
}

/// Permission to stream one upload, granted after its header was checked.
#[derive(Debug, Clone)]
pub struct UploadTicket {
    /// Identifies the upload to the actor.
    pub upload_id: u64,
    /// Round and attempt.
    pub round: RoundId,
    /// The sender.
    pub client: ClientId,
    /// The checked header.
    pub header: UpdateHeader,
    /// For a masked upload, the secure round's context digest it names (`None`: a plain
    /// `f32` delta).
    pub masked: Option<[u8; 32]>,
    /// When the round closes to uploads: the stream (and any wait for an upload slot) ends then.
    pub deadline: tokio::time::Instant,
}

/// A request to the round actor.
#[derive(Debug)]
pub enum Request {
    /// Open a session.
    Join(JoinRequest, Reply<Joined>),
    /// Ask for a task (long-poll step; the handler waits on task events between polls).
    Poll(ClientId, Reply<Task>),
    /// Liveness.
    Heartbeat(ClientId, Heartbeat, Reply<HeartbeatReply>),
    /// Start an upload: check its header (and, for a masked upload, the round context it names),
    /// reserve the client's slot.
    BeginUpload(ClientId, UpdateHeader, Option<[u8; 32]>, Reply<UploadTicket>),
    /// Before an upload slot is reserved: may this client upload for this attempt now? The
    /// reply is when the attempt closes to uploads.
    CheckUpload(ClientId, RoundId, Reply<tokio::time::Instant>),
    /// A verified upload: fold it (the reply comes once it is folded).
    CommitUpload(UploadTicket, StagedUpdate, Reply<UploadReceipt>),
    /// An upload ended without a commit (error or disconnect): free the slot.
    AbortUpload(UploadTicket),
    /// A client gives up on a task.
    ReportFailure(ClientId, FailureReport, Reply<()>),
    /// A client reports an evaluation.
    ReportEvaluation(ClientId, EvalReport, Reply<()>),
    /// End a session.
    Leave(ClientId, Reply<()>),
    /// Operator view.
    Status(usize, Reply<StatusReport>),
    /// Secure aggregation, step 1: a client's signed agreement keys (converted against the
    /// round's context at the edge).
    AdvertiseKeys(ClientId, KeyAdvertisement, Reply<()>),
    /// Secure aggregation, step 2: a client's sealed share bundles.
    SendShares(ClientId, ShareUpload, Reply<()>),
    /// Secure aggregation: what a client waits for, answered at once (`Pending` when not ready;
    /// the handler waits on the task epoch between asks, like `Poll`).
    AwaitSecAggStep(ClientId, RoundRef, AwaitedStep, Reply<StepInput>),
    /// Secure aggregation, step 4: a survivor's unmasking answer.
    AnswerUnmask(ClientId, RoundUnmaskAnswer, Reply<()>),
}

/// A request with the span of the call that made it.
pub type Envelope = (Request, Span);

/// Cloneable sender side of the actor, plus its event subscriptions.
#[derive(Debug, Clone)]
pub struct RoundHandle {
    tx: mpsc::Sender<Envelope>,
    /// Watch channels the actor publishes.
    pub events: EventSubscriber,
}

impl RoundHandle {
    /// Wraps the sender half of the request channel.
    pub fn new(tx: mpsc::Sender<Envelope>, events: EventSubscriber) -> Self {
        Self { tx, events }
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, RoundError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((make(reply), Span::current())).await.map_err(|_| RoundError::ShuttingDown)?;
        rx.await.map_err(|_| RoundError::ShuttingDown)?
    }

    /// See [`Request::Join`].
    pub async fn join(&self, req: JoinRequest) -> Result<Joined, RoundError> {
        self.ask(|r| Request::Join(req, r)).await
    }

    /// See [`Request::Poll`].
    pub async fn poll(&self, client: ClientId) -> Result<Task, RoundError> {
        self.ask(|r| Request::Poll(client, r)).await
    }

    /// See [`Request::Heartbeat`].
    pub async fn heartbeat(&self, client: ClientId, hb: Heartbeat) -> Result<HeartbeatReply, RoundError> {
        self.ask(|r| Request::Heartbeat(client, hb, r)).await
    }

    /// See [`Request::BeginUpload`].
    pub async fn begin_upload(
        &self,
        client: ClientId,
        header: UpdateHeader,
        masked: Option<[u8; 32]>,
    ) -> Result<UploadTicket, RoundError> {
        self.ask(|r| Request::BeginUpload(client, header, masked, r)).await
    }

    /// See [`Request::CheckUpload`].
    pub async fn check_upload(
        &self,
        client: ClientId,
        round: RoundId,
    ) -> Result<tokio::time::Instant, RoundError> {
        self.ask(|r| Request::CheckUpload(client, round, r)).await
    }

    /// See [`Request::AdvertiseKeys`].
    pub async fn advertise_keys(&self, client: ClientId, msg: KeyAdvertisement) -> Result<(), RoundError> {
        self.ask(|r| Request::AdvertiseKeys(client, msg, r)).await
    }

    /// See [`Request::SendShares`].
    pub async fn send_shares(&self, client: ClientId, msg: ShareUpload) -> Result<(), RoundError> {
        self.ask(|r| Request::SendShares(client, msg, r)).await
    }

    /// See [`Request::AwaitSecAggStep`].
    pub async fn await_secagg_step(
        &self,
        client: ClientId,
        round: RoundRef,
        step: AwaitedStep,
    ) -> Result<StepInput, RoundError> {
        self.ask(|r| Request::AwaitSecAggStep(client, round, step, r)).await
    }

    /// See [`Request::AnswerUnmask`].
    pub async fn answer_unmask(&self, client: ClientId, msg: RoundUnmaskAnswer) -> Result<(), RoundError> {
        self.ask(|r| Request::AnswerUnmask(client, msg, r)).await
    }

    /// See [`Request::CommitUpload`].
    pub async fn commit_upload(
        &self,
        ticket: UploadTicket,
        staged: StagedUpdate,
    ) -> Result<UploadReceipt, RoundError> {
        self.ask(|r| Request::CommitUpload(ticket, staged, r)).await
    }

    /// See [`Request::AbortUpload`]. Never blocks: used from `Drop`, so it spawns the send.
    pub fn abort_upload(&self, ticket: UploadTicket) {
        let tx = self.tx.clone();
        let span = Span::current();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tx.send((Request::AbortUpload(ticket), span)).await;
            });
        }
    }

    /// See [`Request::AbortUpload`], awaited: the release is queued before this returns.
    pub async fn release_upload(&self, ticket: UploadTicket) {
        let _ = self.tx.send((Request::AbortUpload(ticket), Span::current())).await;
    }

    /// See [`Request::ReportFailure`].
    pub async fn report_failure(&self, client: ClientId, report: FailureReport) -> Result<(), RoundError> {
        self.ask(|r| Request::ReportFailure(client, report, r)).await
    }

    /// See [`Request::ReportEvaluation`].
    pub async fn report_evaluation(&self, client: ClientId, report: EvalReport) -> Result<(), RoundError> {
        self.ask(|r| Request::ReportEvaluation(client, report, r)).await
    }

    /// See [`Request::Leave`].
    pub async fn leave(&self, client: ClientId) -> Result<(), RoundError> {
        self.ask(|r| Request::Leave(client, r)).await
    }

    /// See [`Request::Status`].
    pub async fn status(&self, recent: usize) -> Result<StatusReport, RoundError> {
        self.ask(|r| Request::Status(recent, r)).await
    }
}
