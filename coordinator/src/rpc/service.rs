//! The gRPC service: authenticate, convert at the edge, forward to the round actor, stream.
//!
//! Handlers never touch round state. They convert wire messages with `TryFrom` (validation),
//! ask the actor through [`RoundHandle`] and map its errors with `rpc::status`. Two paths carry
//! bulk data and are handled here, off the actor:
//!
//! - **Downloads** read the published model from a `watch` channel and stream it from a spawned
//!   producer through a small bounded channel, so a slow client holds at most a few chunks, and
//!   the client's download slot lives as long as the stream itself (`HeldDownload`).
//! - **Uploads** are admitted before their stream opens: `ReserveUpload` waits for one of the
//!   upload slots and grants it to the client for one round attempt (`rpc::admission`), so
//!   payload bytes never wait in memory for a slot. The stream takes the grant at its header
//!   (refused without one), the actor checks the header (and reserves the client's slot in the
//!   round), then the stream is spooled on blocking threads (each chunk checked: order, size,
//!   finite, range, digest) and handed to the actor for folding only once the trailer verified.
//!   Receiving ends at the round's deadline or when the round closes earlier, a stream silent
//!   for `server.upload_idle_timeout` is closed, and the session is re-checked at every chunk
//!   (revocation). If the stream breaks off or anything is refused, the ticket guard tells the
//!   actor and the spool file is deleted: the aggregate never sees a byte of it.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use fedtune_shared::auth::{ChallengeRequest, EnrollRequest, JoinProof, AUTHORIZATION};
use fedtune_shared::chunk::{chunk_ranges, ChunkError, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, MIN_CHUNK_BYTES};
use fedtune_shared::convert::awaited_step_from_pb;
use fedtune_shared::ids::ClientId;
use fedtune_shared::pb::{self, coordinator_server::Coordinator};
use fedtune_shared::round::{
    AdapterSpec, Chunk, DownloadItem, DownloadRequest, EvalReport, FailureReport, Heartbeat, JoinRequest,
    JoinResponse, Limits, MaskedUpdateHeader, ModelEncoding, ModelHeader, ModelScope, PhaseName, Task,
    UpdateHeader, UploadAdmission as Admission, UploadItem, UploadReservation,
};
use fedtune_shared::secagg::{
    KeyAdvertisement, RoundContext, RoundRef, RoundUnmaskAnswer, ShareUpload, StepInput,
};
use futures::Stream;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info, info_span, Instrument};

use super::admission::UploadAdmission;
use super::auth::{bearer, presented_certificate};
use super::body_limit::BodyLimit;
use super::connections::{Connections, MarkServed};
use super::latency::RpcLatency;
use super::request_timeout::RequestTimeout;
use crate::auth::limits::{CallSlot, DownloadSlot, Limits as CallLimits};
use crate::auth::operator::anonymous_view;
use crate::auth::peer::{check_peer, presents_operator_certificate, refuse_operator_certificate};
use crate::auth::{Authenticator, UpdateVerifier};
use crate::error::RoundError;
use crate::round::events::Traffic;
use crate::round::requests::{RoundHandle, UploadTicket};
use crate::settings::CoordinatorSettings;
use crate::spool::SpoolWriter;

/// The `fedtune.v1.Coordinator` implementation.
pub struct CoordinatorService {
    handle: RoundHandle,
    auth: Arc<dyn Authenticator>,
    verifier: Arc<dyn UpdateVerifier>,
    /// Per-client and per-address call limits, download cap.
    limits: Arc<CallLimits>,
    settings: Arc<CoordinatorSettings>,
    labels: Arc<Vec<String>>,
    adapter: Option<AdapterSpec>,
    /// The federation's recorded `model.init_seed` (sent at join).
    init_seed: u64,
    /// Upload slots (each upload holds a spool file and a chunk), granted before the stream.
    admission: Arc<UploadAdmission>,
    spool_dir: PathBuf,
    cancel: CancellationToken,
    traffic: Arc<Traffic>,
}

impl std::fmt::Debug for CoordinatorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorService").finish_non_exhaustive()
    }
}

impl CoordinatorService {
    /// Wires the service.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        handle: RoundHandle,
        auth: Arc<dyn Authenticator>,
        verifier: Arc<dyn UpdateVerifier>,
        limits: Arc<CallLimits>,
        settings: Arc<CoordinatorSettings>,
        labels: Vec<String>,
        adapter: Option<AdapterSpec>,
        init_seed: u64,
        spool_dir: PathBuf,
        cancel: CancellationToken,
        traffic: Arc<Traffic>,
    ) -> Self {
        let admission = Arc::new(UploadAdmission::new(
            settings.server.max_concurrent_uploads,
            settings.server.upload_queue,
            settings.server.upload_idle_timeout,
            cancel.clone(),
        ));
        Self {
            handle,
            auth,
            verifier,
            limits,
            settings,
            labels: Arc::new(labels),
            adapter,
            init_seed,
            admission,
            spool_dir,
            cancel,
            traffic,
        }
    }

    /// The tonic server wrapper: explicit message limits (one upload message, a chunk and
    /// header room, for the service; a few KiB for every other call's body), every call but an
    /// upload answered within `server.request_timeout`, and each call marking its connection's
    /// handshake complete in `connections`, each call's latency and status recorded (timeouts
    /// included).
    pub fn into_server(
        self,
        connections: Connections,
    ) -> MarkServed<RpcLatency<RequestTimeout<BodyLimit<pb::coordinator_server::CoordinatorServer<Self>>>>>
    {
        let request_timeout = self.settings.server.request_timeout;
        let server = pb::coordinator_server::CoordinatorServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        MarkServed::new(
            RpcLatency::new(RequestTimeout::new(BodyLimit::new(server), request_timeout)),
            connections,
        )
    }

    /// Authenticates the caller (its token, over the client certificate the session was opened
    /// over) and charges the call to it; the slot is held for the call. A refused token is
    /// charged to the caller's address instead, so guessing tokens is throttled like any other
    /// unauthenticated call.
    fn client<T>(&self, req: &Request<T>) -> Result<(ClientId, CallSlot), Status> {
        let certificate = presented_certificate(req);
        let client = bearer(req.metadata())
            .and_then(|token| self.auth.authenticate(token, certificate))
            .map_err(|e| match self.limits.anonymous_call(req.remote_addr().map(|a| a.ip())) {
                Ok(()) => Status::from(e),
                Err(limited) => Status::from(limited),
            })?;
        let slot = self.limits.client_call(&client)?;
        Ok((client, slot))
    }

    /// Charges an unauthenticated call to the caller's address.
    fn anonymous<T>(&self, req: &Request<T>) -> Result<(), Status> {
        Ok(self.limits.anonymous_call(req.remote_addr().map(|a| a.ip()))?)
    }

    /// Under mutual TLS, the presented certificate must be issued to `client`.
    fn check_certificate(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        client: Option<&ClientId>,
    ) -> Result<(), Status> {
        Ok(check_peer(certs, self.settings.security.bind_client_certificates, client)?)
    }
}

/// The span an authenticated call runs in. Downloads and uploads open their own (with the
/// version or the round); every other client call opens this one, so a log search for a client
/// finds what the coordinator did for it between its polls, not only the round actor's events.
fn client_call_span(method: &'static str, client: &ClientId) -> tracing::Span {
    info_span!("call", method, client = %client)
}

/// Runs a client call in its span and logs a refusal there, with its status, so "why did this
/// client fail in round r" has an answer in the coordinator's log. The answers a healthy
/// federation gives every round (an attempt over, shutting down, a poll's deadline) stay at
/// debug.
async fn in_call_span<T>(
    span: tracing::Span,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let result = call.instrument(span.clone()).await;
    if let Err(status) = &result {
        let _in = span.enter();
        match status.code() {
            Code::Aborted | Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
                debug!(code = ?status.code(), reason = status.message(), "call refused")
            }
            _ => info!(code = ?status.code(), reason = status.message(), "call refused"),
        }
    }
    result
}

/// Why a reservation's attempt stopped taking uploads while it waited for a slot: the round
/// closes at its deadline (the usual case) or earlier.
fn waited_too_long(deadline: tokio::time::Instant) -> &'static str {
    if tokio::time::Instant::now() >= deadline {
        "its deadline passed before an upload slot came free"
    } else {
        "it closed while the upload waited for a slot"
    }
}

/// Tells the actor when an upload ends without a commit.
struct TicketGuard {
    handle: RoundHandle,
    ticket: Option<UploadTicket>,
}

impl TicketGuard {
    fn take(&mut self) -> UploadTicket {
        self.ticket.take().expect("taken once")
    }
}

impl Drop for TicketGuard {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.handle.abort_upload(t);
        }
    }
}

async fn next_upload_item(
    stream: &mut Streaming<pb::UploadUpdateRequest>,
) -> Result<Option<UploadItem>, Status> {
    let msg = stream.message().await.map_err(|s| {
        // tonic reports an over-limit message as OUT_OF_RANGE; to the protocol it is a limit.
        if s.code() == tonic::Code::OutOfRange {
            Status::resource_exhausted(s.message().to_string())
        } else {
            s
        }
    })?;
    match msg {
        None => Ok(None),
        Some(m) => Ok(Some(UploadItem::try_from(m).map_err(RoundError::from)?)),
    }
}

/// The next upload message, or [`RoundError::UploadIdle`] if none arrives within `idle`: a
/// silent stream must not hold its upload slot until the round's deadline.
async fn next_upload_item_within(
    stream: &mut Streaming<pb::UploadUpdateRequest>,
    idle: Duration,
) -> Result<Option<UploadItem>, Status> {
    tokio::time::timeout(idle, next_upload_item(stream))
        .await
        .map_err(|_| Status::from(RoundError::UploadIdle { idle }))?
}

type DownloadStream = Pin<Box<dyn Stream<Item = Result<pb::DownloadModelResponse, Status>> + Send>>;

/// A download's response stream, holding the client's download and call slots for as long as
/// the stream exists. hyper drops it only once the client is done with it too (read to the end,
/// reset, or its connection closed), not when the producer gives up on a client that stopped
/// reading: the chunks already produced (in the channel and in HTTP/2's send buffer) stay in
/// memory until then, so the slots must stay taken, or a client that never reads could open
/// download after download and pile up a few chunks each without bound.
struct HeldDownload {
    chunks: ReceiverStream<Result<pb::DownloadModelResponse, Status>>,
    /// Set by the producer when it gave up on the client: the stream then ends with
    /// DEADLINE_EXCEEDED rather than looking complete.
    stalled: Arc<AtomicBool>,
    send_timeout: Duration,
    _slots: (DownloadSlot, CallSlot),
}

impl Stream for HeldDownload {
    type Item = Result<pb::DownloadModelResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let me = self.get_mut();
        match ready!(Pin::new(&mut me.chunks).poll_next(cx)) {
            None if me.stalled.swap(false, Ordering::AcqRel) => {
                Poll::Ready(Some(Err(RoundError::DownloadStalled { timeout: me.send_timeout }.into())))
            }
            item => Poll::Ready(item),
        }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        self.anonymous(&req)?;
        let certs = req.peer_certs();
        let certificate = presented_certificate(&req);
        let wire = req.into_inner();
        let proof = JoinProof::from_request(&wire).map_err(RoundError::from)?;
        let mut join = JoinRequest::try_from(wire).map_err(RoundError::from)?;
        self.check_certificate(certs.as_deref().map(Vec::as_slice), join.name.as_ref())?;
        self.auth.admit(&join, proof.as_ref())?;
        let federation_id = self.auth.federation_id();
        if federation_id.is_some() {
            // Keys live in the allowlist (which may change them); the registry must not pin one.
            join.public_key = None;
        }
        let joined = self.handle.join(join).await?;
        // Bound to the certificate this join came over: the token is no use on any other.
        let token = self.auth.open_session(&joined.client_id, certificate)?;
        let model = self.handle.events.model.borrow().clone();
        let c = &self.settings.clients;
        let resp = JoinResponse {
            client_id: joined.client_id,
            session_token: token,
            protocol_version: pb::PROTOCOL_VERSION,
            heartbeat_interval: c.heartbeat_interval,
            liveness_timeout: c.liveness_timeout,
            model: model.model_ref,
            trainable_manifest: model.layout.trainable.clone(),
            limits: Limits::of_protocol(self.settings.server.download_chunk_bytes as u64),
            labels: self.labels.as_ref().clone(),
            adapter: self.adapter.clone(),
            init_seed: Some(self.init_seed),
        };
        let mut resp = pb::JoinResponse::from(resp);
        resp.federation_id = federation_id.unwrap_or_default();
        Ok(Response::new(resp))
    }

    async fn join_challenge(
        &self,
        req: Request<pb::JoinChallengeRequest>,
    ) -> Result<Response<pb::JoinChallengeResponse>, Status> {
        self.anonymous(&req)?;
        refuse_operator_certificate(req.peer_certs().as_deref().map(Vec::as_slice))?;
        let request = ChallengeRequest::try_from(req.into_inner()).map_err(RoundError::from)?;
        let grant = self.auth.challenge(&request)?;
        Ok(Response::new((&grant).into()))
    }

    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        self.anonymous(&req)?;
        let certs = req.peer_certs();
        let request = EnrollRequest::try_from(req.into_inner()).map_err(RoundError::from)?;
        self.check_certificate(certs.as_deref().map(Vec::as_slice), Some(&request.name))?;
        // Enrollment reads and writes SQLite (and may wait for its write lock): off the runtime.
        let auth = self.auth.clone();
        let client = tokio::task::spawn_blocking(move || auth.enroll(&request))
            .await
            .map_err(|e| RoundError::Internal(e.to_string()))??;
        Ok(Response::new(pb::EnrollResponse { client_id: client.into() }))
    }

    // Secure aggregation: each message is converted against the secure attempt's context
    // published by the actor (slots and sizes are checked at the edge), then the actor checks
    // the round it names and hands it to the protocol core.
    async fn advertise_keys(
        &self,
        req: Request<pb::AdvertiseKeysRequest>,
    ) -> Result<Response<pb::AdvertiseKeysResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("advertise_keys", &client);
        in_call_span(span, async {
            let ctx = self.secure_context()?;
            let msg = KeyAdvertisement::from_pb(req.into_inner(), &ctx).map_err(RoundError::from)?;
            self.handle.advertise_keys(client, msg).await?;
            Ok(Response::new(pb::AdvertiseKeysResponse {}))
        })
        .await
    }

    async fn send_shares(
        &self,
        req: Request<pb::SendSharesRequest>,
    ) -> Result<Response<pb::SendSharesResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("send_shares", &client);
        in_call_span(span, async {
            let ctx = self.secure_context()?;
            let msg = ShareUpload::from_pb(req.into_inner(), &ctx).map_err(RoundError::from)?;
            self.handle.send_shares(client, msg).await?;
            Ok(Response::new(pb::SendSharesResponse {}))
        })
        .await
    }

    async fn await_sec_agg_step(
        &self,
        req: Request<pb::AwaitSecAggStepRequest>,
    ) -> Result<Response<pb::AwaitSecAggStepResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("await_sec_agg_step", &client);
        in_call_span(span, async {
            let req = req.into_inner();
            let round = RoundRef::from_pb(req.round).map_err(RoundError::from)?;
            let step = awaited_step_from_pb(req.step).map_err(RoundError::from)?;
            let wait = Duration::from_millis(req.max_wait_ms).min(self.settings.server.long_poll);
            let until = tokio::time::Instant::now() + wait;
            let mut epoch = self.handle.events.tasks.clone();
            loop {
                // Seen before asking, so a step closing between the answer and the wait wakes us.
                epoch.borrow_and_update();
                let input = self.handle.await_secagg_step(client.clone(), round, step).await?;
                if !matches!(input, StepInput::Pending) || tokio::time::Instant::now() >= until {
                    return Ok(Response::new((&input).into()));
                }
                tokio::select! {
                    changed = epoch.changed() => if changed.is_err() { return Err(RoundError::ShuttingDown.into()) },
                    _ = tokio::time::sleep_until(until) => {}
                    _ = self.cancel.cancelled() => return Err(RoundError::ShuttingDown.into()),
                }
            }
        })
        .await
    }

    async fn answer_unmask(
        &self,
        req: Request<pb::UnmaskAnswer>,
    ) -> Result<Response<pb::AnswerUnmaskResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("answer_unmask", &client);
        in_call_span(span, async {
            let ctx = self.secure_context()?;
            let msg = RoundUnmaskAnswer::from_pb(req.into_inner(), &ctx).map_err(RoundError::from)?;
            self.handle.answer_unmask(client, msg).await?;
            Ok(Response::new(pb::AnswerUnmaskResponse {}))
        })
        .await
    }

    async fn wait_for_task(
        &self,
        req: Request<pb::WaitForTaskRequest>,
    ) -> Result<Response<pb::WaitForTaskResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("wait_for_task", &client);
        in_call_span(span, async {
            let wait = Duration::from_millis(req.get_ref().max_wait_ms).min(self.settings.server.long_poll);
            let until = tokio::time::Instant::now() + wait;
            let mut epoch = self.handle.events.tasks.clone();
            loop {
                // Mark the epoch seen *before* asking, so an assignment between the answer and the
                // wait below still wakes us.
                epoch.borrow_and_update();
                let task = self.handle.poll(client.clone()).await?;
                if !matches!(task, Task::None { .. }) || tokio::time::Instant::now() >= until {
                    return Ok(Response::new(task.into()));
                }
                tokio::select! {
                    changed = epoch.changed() => if changed.is_err() { return Err(RoundError::ShuttingDown.into()) },
                    _ = tokio::time::sleep_until(until) => {}
                    _ = self.cancel.cancelled() => return Err(RoundError::ShuttingDown.into()),
                }
            }
        })
        .await
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("heartbeat", &client);
        in_call_span(span, async {
            let hb = Heartbeat::try_from(req.into_inner()).map_err(RoundError::from)?;
            Ok(Response::new(self.handle.heartbeat(client, hb).await?.into()))
        })
        .await
    }

    type DownloadModelStream = DownloadStream;

    async fn download_model(
        &self,
        req: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let (client, _slot) = self.client(&req)?;
        let dl = DownloadRequest::try_from(req.into_inner()).map_err(RoundError::from)?;
        let model = self.handle.events.model.borrow().clone();
        if dl.version != model.version {
            return Err(RoundError::VersionNotServed { requested: dl.version, current: model.version }.into());
        }
        // A client holding the previous version gets the 8-bit step that defines this one, if
        // there is one. One that asked for a step there is none of gets the f32 weights whole:
        // its offset counted bytes of a step, not of the weights.
        let step = model
            .step
            .as_ref()
            .filter(|s| dl.scope == ModelScope::Trainable && dl.base_version == Some(s.base));
        let (encoding, total, payload_digest, offset) = match step {
            Some(s) => (ModelEncoding::Int8Delta { base: s.base }, s.bytes.len() as u64, s.digest, dl.offset),
            None => {
                let offset = if dl.base_version.is_some() { 0 } else { dl.offset };
                (
                    ModelEncoding::F32,
                    model.manifest(dl.scope).byte_len() as u64,
                    model.digest(dl.scope),
                    offset,
                )
            }
        };
        let sends_step = step.is_some();
        if offset > total {
            return Err(RoundError::Protocol(format!(
                "resume offset {} is beyond the payload's {total} bytes",
                dl.offset
            ))
            .into());
        }
        let chunk = dl
            .max_chunk_bytes
            .map(|c| c as usize)
            .unwrap_or(self.settings.server.download_chunk_bytes)
            .clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
            / 4
            * 4;
        let header = ModelHeader {
            version: model.version,
            scope: dl.scope,
            manifest: model.manifest(dl.scope).clone(),
            total_bytes: total,
            payload_digest,
            start_offset: offset,
            encoding,
        };
        // A download beyond the cap waits for a slot (as long as a long poll) instead of being
        // refused into a retry storm; the memory it holds while waiting is this call alone.
        let until = tokio::time::Instant::now() + self.settings.server.long_poll;
        let download_slot = tokio::select! {
            slot = self.limits.download(&client, until) => slot?,
            _ = self.cancel.cancelled() => return Err(RoundError::ShuttingDown.into()),
        };
        let send_timeout = self.settings.server.download_send_timeout;
        // Two messages in flight per download: enough to keep the socket busy, small enough
        // that many slow downloads cost little memory.
        let (tx, rx) = mpsc::channel(2);
        let stalled = Arc::new(AtomicBool::new(false));
        let held = HeldDownload {
            chunks: ReceiverStream::new(rx),
            stalled: stalled.clone(),
            send_timeout,
            _slots: (download_slot, _slot),
        };
        let cancel = self.cancel.clone();
        let traffic = self.traffic.clone();
        let span = info_span!("download", client = %client, version = %model.version, scope = ?dl.scope);
        tokio::spawn(
            async move {
                if tx.send(Ok(DownloadItem::Header(header).into())).await.is_err() {
                    return;
                }
                let view = model.payload(dl.scope);
                let step_bytes = model.step.as_ref().filter(|_| sends_step).map(|s| s.bytes.as_slice());
                for r in chunk_ranges(offset, total, chunk) {
                    if cancel.is_cancelled() {
                        let _ = tx.send(Err(RoundError::ShuttingDown.into())).await;
                        return;
                    }
                    let mut buf = Vec::with_capacity((r.end - r.start) as usize);
                    match step_bytes {
                        Some(bytes) => buf.extend_from_slice(&bytes[r.start as usize..r.end as usize]),
                        None => view.read_into(r.start, (r.end - r.start) as usize, &mut buf),
                    }
                    traffic.add_sent(buf.len() as u64);
                    let item = DownloadItem::Chunk(Chunk { offset: r.start, data: buf.into() });
                    // A client that stops reading must not hold its slots and chunks forever.
                    match tokio::time::timeout(send_timeout, tx.send(Ok(item.into()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => {
                            debug!("client went away mid-download");
                            return;
                        }
                        Err(_) => {
                            debug!(?send_timeout, "client stopped reading; download dropped");
                            stalled.store(true, Ordering::Release);
                            return;
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(held)))
    }

    async fn upload_update(
        &self,
        req: Request<Streaming<pb::UploadUpdateRequest>>,
    ) -> Result<Response<pb::UploadUpdateResponse>, Status> {
        let result = self.receive_upload(req).await;
        crate::telemetry::upload_ended(result.as_ref().err().map(Status::code));
        result
    }

    async fn reserve_upload(
        &self,
        req: Request<pb::ReserveUploadRequest>,
    ) -> Result<Response<pb::ReserveUploadResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("reserve_upload", &client);
        in_call_span(span, async {
            let ask = UploadReservation::from(req.into_inner());
            let long_poll = self.settings.server.long_poll;
            let wait = if ask.max_wait.is_zero() { long_poll } else { ask.max_wait.min(long_poll) };
            // The actor says whether this client may upload in this attempt, and until when: a
            // slot is never held for an upload that would be refused at its header anyway.
            let deadline = self.handle.check_upload(client.clone(), ask.id).await?;
            let until = deadline.min(tokio::time::Instant::now() + wait);
            let mut state = self.handle.events.state.clone();
            let round = ask.id;
            let closed = async move {
                // An error means the actor is gone: that closes the round too.
                let _ = state.wait_for(|s| s.round != round || s.phase != PhaseName::Training).await;
                RoundError::RoundClosed { round, reason: waited_too_long(deadline).into() }
            };
            let admission = self.admission.reserve(&client, ask.id, until, closed).await?;
            if matches!(admission, Admission::RetryAfter(_)) && tokio::time::Instant::now() >= deadline {
                return Err(
                    RoundError::RoundClosed { round, reason: waited_too_long(deadline).into() }.into()
                );
            }
            Ok(Response::new(admission.into()))
        })
        .await
    }

    async fn report_evaluation(
        &self,
        req: Request<pb::ReportEvaluationRequest>,
    ) -> Result<Response<pb::ReportEvaluationResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("report_evaluation", &client);
        in_call_span(span, async {
            let report = EvalReport::try_from(req.into_inner()).map_err(RoundError::from)?;
            self.handle.report_evaluation(client, report).await?;
            Ok(Response::new(pb::ReportEvaluationResponse {}))
        })
        .await
    }

    async fn report_failure(
        &self,
        req: Request<pb::ReportFailureRequest>,
    ) -> Result<Response<pb::ReportFailureResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("report_failure", &client);
        in_call_span(span, async {
            let report = FailureReport::try_from(req.into_inner()).map_err(RoundError::from)?;
            self.handle.report_failure(client, report).await?;
            Ok(Response::new(pb::ReportFailureResponse {}))
        })
        .await
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        let span = client_call_span("leave", &client);
        in_call_span(span, async {
            self.handle.leave(client.clone()).await?;
            self.auth.close_session(&client);
            Ok(Response::new(pb::LeaveResponse {}))
        })
        .await
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        // No credentials: the anonymous view, unless the call came over the operator certificate
        // (mutual TLS). A credential that is not the operator token is refused rather than
        // downgraded, so an operator with a stale token notices.
        let certs = req.peer_certs();
        let operator = match req.metadata().get(AUTHORIZATION) {
            None => presents_operator_certificate(certs.as_deref().map(Vec::as_slice)),
            Some(_) => {
                let checked = bearer(req.metadata()).and_then(|token| self.auth.operator(token));
                if let Err(e) = checked {
                    self.anonymous(&req)?;
                    return Err(e.into());
                }
                true
            }
        };
        if !operator {
            self.anonymous(&req)?;
        }
        let recent = match req.get_ref().recent_rounds {
            0 => 10,
            n => n as usize,
        };
        let report = self.handle.status(if operator { recent } else { 0 }).await?;
        let report = if operator { report } else { anonymous_view(report) };
        Ok(Response::new((&report).into()))
    }
}

impl CoordinatorService {
    /// `UploadUpdate`: header checked by the actor, stream spooled and checked, signature
    /// verified, then folded by the actor.
    async fn receive_upload(
        &self,
        req: Request<Streaming<pb::UploadUpdateRequest>>,
    ) -> Result<Response<pb::UploadUpdateResponse>, Status> {
        let (client, _slot) = self.client(&req)?;
        // Kept to re-check the session (and so revocation) while the upload streams.
        let token = bearer(req.metadata())?.to_string();
        let certificate = presented_certificate(&req);
        let idle = self.settings.server.upload_idle_timeout;
        let mut stream = req.into_inner();
        let (header, masked) = match first_upload_item(&mut stream, idle).await? {
            FirstItem::Plain(h) => (h, None),
            FirstItem::Masked(m) => (m.header.clone(), Some(m)),
        };
        let span =
            info_span!("upload", client = %client, round = header.id.round, attempt = header.id.attempt);
        // The slot this upload holds until it ends, granted before the stream opened.
        let _permit = self.admission.take(&client, header.id)?;
        let context = masked.as_ref().map(|m| m.secagg_context);
        let ticket =
            self.handle.begin_upload(client.clone(), header, context).instrument(span.clone()).await?;
        // If this call is dropped (the client reset the stream), the guard frees the slot from
        // `Drop`; on every other exit the slot is freed below, before the status is returned,
        // so a retry from the same client cannot overtake the release.
        let mut guard = TicketGuard { handle: self.handle.clone(), ticket: Some(ticket.clone()) };
        let result = async {
            // Receiving ends when the round closes to uploads: an update after that could not be
            // folded anyway.
            let deadline = ticket.deadline;
            let late = || RoundError::RoundClosed {
                round: ticket.round,
                reason: "its deadline passed before the upload completed".into(),
            };
            // The round can also close before its deadline: once every other participant has
            // ended and this one's slot was ended while it streamed (it reported a failure, or
            // it missed its heartbeats). The stream must not outlive it, holding an upload slot
            // into the next round.
            let mut state = self.handle.events.state.clone();
            let round = ticket.round;
            let closed = async move {
                // An error means the actor is gone: that closes the round too.
                let _ = state.wait_for(|s| s.round != round || s.phase != PhaseName::Training).await;
            };
            tokio::pin!(closed);
            let closed_early = || RoundError::RoundClosed {
                round: ticket.round,
                reason: "it closed before the upload completed".into(),
            };
            let manifest = Arc::new(self.handle.events.model.borrow().layout.trainable.clone());
            let total = ticket.header.total_bytes;
            let dir = self.spool_dir.clone();
            let name =
                format!("{}-{}-{}-{}", ticket.round.round, ticket.round.attempt, client, ticket.upload_id);
            let is_masked = masked.is_some();
            let encoding = ticket.header.encoding;
            let mut writer = tokio::task::spawn_blocking(move || {
                if is_masked {
                    SpoolWriter::create_masked(&dir, &name, total)
                } else {
                    SpoolWriter::create_encoded(&dir, &name, total, manifest, encoding)
                }
            })
            .await
            .map_err(|e| RoundError::Internal(e.to_string()))??;
            let trailer = loop {
                let item = tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => return Err(RoundError::ShuttingDown.into()),
                    _ = tokio::time::sleep_until(deadline) => return Err(late().into()),
                    _ = &mut closed => return Err(closed_early().into()),
                    item = next_upload_item_within(&mut stream, idle) => item?,
                };
                match item {
                    Some(UploadItem::Chunk(c)) => {
                        // A client revoked (or whose session was replaced) mid-upload stops
                        // here, not only at its next call.
                        self.auth.authenticate(&token, certificate)?;
                        self.traffic.add_received(c.data.len() as u64);
                        let (w, r) = tokio::task::spawn_blocking(move || {
                            let r = writer.write_chunk(c.offset, &c.data);
                            (writer, r)
                        })
                        .await
                        .map_err(|e| RoundError::Internal(e.to_string()))?;
                        writer = w;
                        r?;
                    }
                    Some(UploadItem::Trailer(t)) => break t,
                    Some(UploadItem::Header(_)) => {
                        return Err(RoundError::Protocol("a second header inside one upload".into()).into())
                    }
                    None => {
                        return Err(RoundError::Chunk(ChunkError::Truncated {
                            expected: total,
                            received: writer.received(),
                        })
                        .into())
                    }
                }
            };
            if next_upload_item_within(&mut stream, idle).await?.is_some() {
                return Err(RoundError::Protocol("messages after the trailer".into()).into());
            }
            match &masked {
                Some(m) => self.verifier.verify_masked(&client, m, &trailer)?,
                None => self.verifier.verify(&client, &ticket.header, &trailer)?,
            }
            let digest = trailer.payload_digest;
            let staged = tokio::task::spawn_blocking(move || writer.finish(&digest))
                .await
                .map_err(|e| RoundError::Internal(e.to_string()))??;
            let receipt = self.handle.commit_upload(guard.take(), staged).await?;
            Ok(Response::new(receipt.into()))
        }
        .instrument(span)
        .await;
        if let Some(t) = guard.ticket.take() {
            self.handle.release_upload(t).await;
        }
        result
    }

    /// The context of the secure attempt in progress, to convert its messages against.
    fn secure_context(&self) -> Result<Arc<RoundContext>, RoundError> {
        self.handle.events.secure.borrow().clone().ok_or_else(|| {
            RoundError::NoSecureRound(if self.settings.secure_aggregation.enabled {
                String::new()
            } else {
                ": this federation does not run secure aggregation".into()
            })
        })
    }
}

/// The first message of an upload: a plain header, or a masked one (secure aggregation).
enum FirstItem {
    Plain(UpdateHeader),
    Masked(MaskedUpdateHeader),
}

/// Reads an upload's first message, which must be its header; a `masked_u32` header is read as
/// a [`MaskedUpdateHeader`], any other through the plain conversion.
async fn first_upload_item(
    stream: &mut Streaming<pb::UploadUpdateRequest>,
    idle: Duration,
) -> Result<FirstItem, Status> {
    use pb::upload_update_request::Item;
    let msg = tokio::time::timeout(idle, stream.message())
        .await
        .map_err(|_| Status::from(RoundError::UploadIdle { idle }))?
        .map_err(|s| {
            if s.code() == tonic::Code::OutOfRange {
                Status::resource_exhausted(s.message().to_string())
            } else {
                s
            }
        })?;
    let Some(msg) = msg else {
        return Err(RoundError::Protocol("empty upload stream".into()).into());
    };
    match msg.item {
        Some(Item::Header(h)) if h.encoding == pb::UpdateEncoding::MaskedU32 as i32 => {
            Ok(FirstItem::Masked(MaskedUpdateHeader::try_from(h).map_err(RoundError::from)?))
        }
        Some(Item::Header(h)) => Ok(FirstItem::Plain(UpdateHeader::try_from(h).map_err(RoundError::from)?)),
        Some(_) => Err(RoundError::Protocol("an upload must start with its header".into()).into()),
        None => Err(RoundError::from(fedtune_shared::convert::ConvertError::Missing("item")).into()),
    }
}
