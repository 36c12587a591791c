//! The agent's view of the coordinator, and its gRPC implementation.
//!
//! [`CoordinatorApi`] speaks the domain types of `fedtune_shared::round` only; the agent is
//! written against it, so its logic can be exercised without a network. [`GrpcCoordinator`] is
//! the real implementation and the only client module that names generated `pb` types: requests
//! convert on the way out (`From<domain>`), responses are validated on the way in
//! (`TryFrom<pb::…>`), and every `tonic::Status` is classified into an [`ApiError`] that tells
//! the agent what to do (retry, re-join, drop the task, give up).
//!
//! Every upload first reserves one of the coordinator's upload slots (`ReserveUpload`, a long
//! poll repeated as the coordinator says) for the round attempt its header names, and opens its
//! stream only with the grant: the coordinator then never holds payload bytes for an upload
//! waiting its turn. The reservation lives here, next to the stream it admits, so no caller can
//! open one without the other; the agent's supervision (heartbeats, shutdown) covers the wait.
//!
//! The session token returned by `Join` is kept here and attached to every later call, so the
//! agent never handles credentials per call. With an identity ([`GrpcCoordinator::with_identity`])
//! the transport also does the whole join handshake (enroll with a one-time token if the key is
//! not allowlisted yet, `JoinChallenge`, sign, `Join`) and signs every upload's trailer.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedtune_shared::auth::{
    bearer_metadata, check_federation_id, ChallengeGrant, ChallengeRequest, EnrollRequest, JoinProof,
    AUTHORIZATION,
};
use fedtune_shared::crypto::{EnrollmentToken, KeyPair};
use fedtune_shared::ids::ClientId;

use fedtune_shared::chunk::MAX_MESSAGE_BYTES;
use fedtune_shared::convert::ConvertError;
use fedtune_shared::ids::RoundId;
use fedtune_shared::pb;
use fedtune_shared::pb::coordinator_client::CoordinatorClient;
use fedtune_shared::round::{
    DownloadItem, DownloadRequest, EvalReport, FailureReport, Heartbeat, HeartbeatReply, JoinRequest,
    JoinResponse, MaskedUpdateHeader, StatusReport, Task, UploadAdmission, UploadItem, UploadReceipt,
    UploadReservation,
};
use fedtune_shared::secagg::{
    AwaitedStep, KeyAdvertisement, RoundContext, RoundRef, RoundUnmaskAnswer, ShareUpload, StepInput,
};
use futures::stream::{BoxStream, StreamExt};
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::Code;

/// Why a call to the coordinator failed, classified by what the agent should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The coordinator is unreachable, restarting, shutting down, or the stream broke off:
    /// back off and try again.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// The session is missing or unknown (e.g. the coordinator restarted): join again.
    #[error("session not recognised: {0}")]
    Unauthenticated(String),
    /// The task is over or was never ours (stale round, past the deadline, version no longer
    /// served): drop it and poll for work.
    #[error("task no longer valid: {0}")]
    Stale(String),
    /// The coordinator already holds our update for this round: nothing left to do.
    #[error("already accepted: {0}")]
    AlreadyAccepted(String),
    /// The coordinator refused what we sent as malformed: a bug or misconfiguration; sending the
    /// same bytes again would fail again.
    #[error("rejected as invalid: {0}")]
    Invalid(String),
    /// The payload arrived corrupted or truncated: worth one more try.
    #[error("payload damaged in transit: {0}")]
    DataLoss(String),
    /// The coordinator is overloaded: retry after a pause.
    #[error("coordinator busy: {0}")]
    Busy(String),
    /// Our identity is refused (another key is pinned for this name): retrying cannot help.
    #[error("permission denied: {0}")]
    Denied(String),
    /// The coordinator sent something that is not valid protocol.
    #[error("malformed response: {0}")]
    Protocol(String),
    /// A local configuration problem (bad URL, TLS files).
    #[error("client configuration: {0}")]
    Config(String),
    /// The secure round attempt this call belongs to has ended (the coordinator answered a
    /// secure-aggregation call with `ABORTED`): the task is over, nothing is to be reported.
    #[error("the secure round attempt is over: {0}")]
    AttemptOver(String),
}

impl ApiError {
    /// True for failures that backing off and retrying the same call can cure.
    pub fn is_transient(&self) -> bool {
        matches!(self, ApiError::Unavailable(_) | ApiError::Busy(_) | ApiError::DataLoss(_))
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            Code::Unauthenticated | Code::NotFound => ApiError::Unauthenticated(msg),
            Code::FailedPrecondition | Code::OutOfRange => ApiError::Stale(msg),
            Code::AlreadyExists => ApiError::AlreadyAccepted(msg),
            Code::InvalidArgument | Code::Unimplemented => ApiError::Invalid(msg),
            Code::DataLoss => ApiError::DataLoss(msg),
            Code::ResourceExhausted => ApiError::Busy(msg),
            Code::PermissionDenied => ApiError::Denied(msg),
            // Connection refused, reset, h2 errors, timeouts and server-side surprises all look
            // like "the coordinator went away for a moment" from here: retry with backoff.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::Unknown
            | Code::Internal
            | Code::Ok => ApiError::Unavailable(format!("{:?}: {msg}", s.code())),
        }
    }
}

/// A secure-aggregation call's status: `ABORTED` there means the round attempt ended (see
/// `AwaitSecAggStep` in the protocol), not a passing hiccup as for the other calls.
fn secagg_status(s: tonic::Status) -> ApiError {
    match s.code() {
        Code::Aborted => ApiError::AttemptOver(s.message().to_string()),
        _ => ApiError::from(s),
    }
}

impl From<ConvertError> for ApiError {
    fn from(e: ConvertError) -> Self {
        ApiError::Protocol(e.to_string())
    }
}

/// A stream of download items as the coordinator sends them; an `Err` ends it.
pub type DownloadStream = BoxStream<'static, Result<DownloadItem, ApiError>>;

/// Everything the agent asks of a coordinator, in domain terms.
///
/// Futures are `Send` so the agent can run on a multi-threaded runtime and be spawned.
pub trait CoordinatorApi: Send + Sync {
    /// Opens (or re-opens) a session; later calls carry its token.
    fn join(&self, request: JoinRequest) -> impl Future<Output = Result<JoinResponse, ApiError>> + Send;
    /// Long-polls for work for at most `max_wait`.
    fn wait_for_task(&self, max_wait: Duration) -> impl Future<Output = Result<Task, ApiError>> + Send;
    /// Signals liveness while busy.
    fn heartbeat(&self, beat: Heartbeat) -> impl Future<Output = Result<HeartbeatReply, ApiError>> + Send;
    /// Starts a model download: a header, then chunks.
    fn download(
        &self,
        request: DownloadRequest,
    ) -> impl Future<Output = Result<DownloadStream, ApiError>> + Send;
    /// Uploads one update: header, chunks, trailer.
    fn upload(
        &self,
        items: BoxStream<'static, UploadItem>,
    ) -> impl Future<Output = Result<UploadReceipt, ApiError>> + Send;
    /// Uploads a secure round's masked vector: `items` as for [`CoordinatorApi::upload`], the
    /// header sent as a masked one (`MASKED_U32`) naming the round context `secagg_context`.
    fn upload_masked(
        &self,
        secagg_context: [u8; 32],
        items: BoxStream<'static, UploadItem>,
    ) -> impl Future<Output = Result<UploadReceipt, ApiError>> + Send;
    /// Secure step 1: this client's agreement keys.
    fn advertise_keys(&self, keys: KeyAdvertisement) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Secure step 2: this client's sealed share bundles.
    fn send_shares(&self, shares: ShareUpload) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Long-polls (at most `max_wait`) for what `step` of the round `ctx` needs;
    /// [`StepInput::Pending`] when it was not ready in time, [`ApiError::AttemptOver`] once the
    /// attempt ended.
    fn await_secagg_step(
        &self,
        ctx: &RoundContext,
        step: AwaitedStep,
        max_wait: Duration,
    ) -> impl Future<Output = Result<StepInput, ApiError>> + Send;
    /// Secure step 4: this client's answer to the unmasking request.
    fn answer_unmask(&self, answer: RoundUnmaskAnswer) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Reports an evaluation result.
    fn report_evaluation(&self, report: EvalReport) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Gives up on a task so the round need not wait for us.
    fn report_failure(&self, report: FailureReport) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Ends the session.
    fn leave(&self) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// The operator view (needs no session).
    fn status(&self, recent_rounds: u32) -> impl Future<Output = Result<StatusReport, ApiError>> + Send;
}

/// The bound on one call unless `agent.request_timeout` says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP/2 keep-alive of a connection whose calls are bounded by `request_timeout`: how
/// often it pings while a stream is open, and how long an unanswered ping is waited for.
///
/// Streams (uploads, downloads) have no deadline, so over a link that died silently (no FIN,
/// no reset) only an unanswered ping ends them. Pacing the pings by the call bound makes a
/// stream wait on a dead coordinator no longer than two call bounds, as long as a unary call
/// would at most; the default bound keeps the 20 s / 10 s that is cheap on a quiet WAN.
pub fn keep_alive(request_timeout: Duration) -> (Duration, Duration) {
    (request_timeout.min(Duration::from_secs(20)), request_timeout.min(Duration::from_secs(10)))
}

/// How to reach the coordinator.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// TLS settings for `https` URLs (CA to trust, client identity for mTLS).
    pub tls: Option<ClientTlsConfig>,
    /// Bound on establishing a TCP (and TLS) connection, so an unreachable coordinator fails
    /// fast into the agent's backoff instead of hanging.
    pub connect_timeout: Duration,
    /// Bound on unary calls other than the long-poll (which gets its own wait plus this), and
    /// the pace of the keep-alive that ends a stream over a dead link ([`keep_alive`]).
    pub request_timeout: Duration,
}

impl ConnectOptions {
    /// Plain-text connection to `url` with default timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// [`CoordinatorApi`] over gRPC (tonic).
///
/// The channel connects lazily and reconnects by itself, so a coordinator that restarts is
/// found again by the next call after it is back; the agent's backoff paces those calls.
pub struct GrpcCoordinator {
    client: CoordinatorClient<Channel>,
    request_timeout: Duration,
    /// Bearer token of the current session; replaced by every successful join. A std mutex is
    /// enough: it is held only to clone or swap a string, never across an await.
    token: Mutex<Option<String>>,
    /// The client's key, if it authenticates (every coordinator started by `serve` requires it).
    identity: Option<Identity>,
}

/// What the transport needs to authenticate: the key, a one-time enrollment token until it has
/// been used, and the federation and client id of the current session (what uploads are
/// signed for).
#[derive(Debug)]
struct Identity {
    key: Arc<KeyPair>,
    enroll_token: Mutex<Option<EnrollmentToken>>,
    session: Mutex<Option<(String, ClientId)>>,
}

impl std::fmt::Debug for GrpcCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The session token is a bearer credential: never in logs.
        f.debug_struct("GrpcCoordinator")
            .field("request_timeout", &self.request_timeout)
            .field("token", &lock(&self.token).as_ref().map(|_| "<redacted>"))
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GrpcCoordinator {
    /// Prepares a channel to the coordinator without connecting yet.
    pub fn connect_lazy(options: &ConnectOptions) -> Result<Self, ApiError> {
        let (ping_every, ping_timeout) = keep_alive(options.request_timeout);
        let endpoint =
            fedtune_shared::endpoint::endpoint(&options.url, options.tls.clone(), options.connect_timeout)
                .map_err(|e| ApiError::Config(e.to_string()))?
                .tcp_nodelay(true)
                .tcp_keepalive(Some(Duration::from_secs(30)))
                .http2_keep_alive_interval(ping_every)
                .keep_alive_timeout(ping_timeout);
        let client = CoordinatorClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { client, request_timeout: options.request_timeout, token: Mutex::new(None), identity: None })
    }

    /// Authenticates with `key`: joins answer the coordinator's challenge, uploads are signed.
    /// With `enroll_token`, a key the coordinator does not know yet is enrolled with it first
    /// (once; the token is then forgotten).
    pub fn with_identity(mut self, key: Arc<KeyPair>, enroll_token: Option<EnrollmentToken>) -> Self {
        self.identity =
            Some(Identity { key, enroll_token: Mutex::new(enroll_token), session: Mutex::new(None) });
        self
    }

    /// `JoinChallenge`, sign, `Join`.
    async fn challenge_join(
        &self,
        key: &KeyPair,
        name: &ClientId,
        mut wire: pb::JoinRequest,
    ) -> Result<pb::JoinResponse, tonic::Status> {
        let mut client = self.client.clone();
        let request = ChallengeRequest { name: name.clone() };
        let mut ask = tonic::Request::new(pb::JoinChallengeRequest::from(&request));
        ask.set_timeout(self.request_timeout);
        let grant = ChallengeGrant::try_from(client.join_challenge(ask).await?.into_inner())
            .map_err(|e| tonic::Status::internal(format!("malformed join challenge: {e}")))?;
        JoinProof::answer(key, &grant, name).attach(&mut wire);
        let mut join = tonic::Request::new(wire);
        join.set_timeout(self.request_timeout);
        Ok(client.join(join).await?.into_inner())
    }

    /// The authenticated join handshake; see the module docs.
    async fn join_with_identity(
        &self,
        id: &Identity,
        request: JoinRequest,
    ) -> Result<JoinResponse, ApiError> {
        let name = request.name.clone().ok_or_else(|| {
            ApiError::Config(
                "a client with a key joins under the name its key is allowlisted for: pass --name".into(),
            )
        })?;
        let mut wire = pb::JoinRequest::from(request);
        wire.public_key = id.key.public_key().as_bytes().to_vec().into();
        let mut reply = self.challenge_join(&id.key, &name, wire.clone()).await;
        let pending_token = lock(&id.enroll_token).clone();
        if let (Err(status), Some(token)) = (&reply, pending_token) {
            // Only a key the coordinator does not accept is worth enrolling; tried after a
            // join attempt so that restarting with the same (spent) token still works.
            if status.code() == Code::PermissionDenied {
                let enroll = EnrollRequest { name: name.clone(), public_key: id.key.public_key(), token };
                let mut client = self.client.clone();
                let mut call = tonic::Request::new(pb::EnrollRequest::from(&enroll));
                call.set_timeout(self.request_timeout);
                match client.enroll(call).await {
                    Ok(_) => {
                        tracing::info!(client = %name, "enrolled this client's key with the one-time token");
                        *lock(&id.enroll_token) = None;
                        reply = self.challenge_join(&id.key, &name, wire).await;
                    }
                    Err(s) if s.code() == Code::PermissionDenied => {
                        *lock(&id.enroll_token) = None;
                        return Err(ApiError::Denied(format!("enrollment refused: {}", s.message())));
                    }
                    Err(s) => return Err(s.into()),
                }
            }
        }
        let reply = reply.map_err(|s| match s.code() {
            // We answered a challenge issued a moment ago: a refusal means the key is wrong for
            // this name, which retrying cannot cure.
            Code::Unauthenticated => ApiError::Denied(format!(
                "the coordinator refused this key's answer to its join challenge: {}",
                s.message()
            )),
            _ => ApiError::from(s),
        })?;
        let federation_id = reply.federation_id.clone();
        check_federation_id(&federation_id)?;
        let session = JoinResponse::try_from(reply)?;
        *lock(&id.session) = Some((federation_id, session.client_id.clone()));
        *lock(&self.token) = Some(session.session_token.clone());
        Ok(session)
    }

    /// Streams an upload, signing its trailer when this client has an identity; with
    /// `secagg_context` the header goes out as a masked one and the signature covers that round.
    fn upload_stream(
        &self,
        items: BoxStream<'static, UploadItem>,
        secagg_context: Option<[u8; 32]>,
    ) -> impl Future<Output = Result<UploadReceipt, ApiError>> + Send {
        // The items are forwarded through a small bounded channel: tonic's client-streaming call
        // then holds a plain `ReceiverStream`, for which the compiler can prove the `Send`
        // future this trait promises (with a boxed `dyn Stream` it cannot: a known
        // higher-ranked-lifetime limitation). The bound keeps backpressure end to end.
        let items = match &self.identity {
            Some(id) => match lock(&id.session).clone() {
                Some((federation_id, client_id)) => crate::identity::sign_upload_stream(
                    items,
                    id.key.clone(),
                    federation_id,
                    client_id,
                    secagg_context,
                ),
                None => items,
            },
            None => items,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let mut items = items;
            while let Some(item) = items.next().await {
                let message = match (item, secagg_context) {
                    (UploadItem::Header(header), Some(context)) => {
                        let masked = MaskedUpdateHeader { header, secagg_context: context };
                        pb::UploadUpdateRequest {
                            item: Some(pb::upload_update_request::Item::Header((&masked).into())),
                        }
                    }
                    (item, _) => pb::UploadUpdateRequest::from(item),
                };
                if tx.send(message).await.is_err() {
                    break; // the call ended; nobody reads any more
                }
            }
        });
        let mut client = self.client.clone();
        let token = self.token();
        let ask_timeout = RESERVE_MAX_WAIT + self.request_timeout;
        // A masked upload belongs to a secure round attempt: ABORTED there means it ended.
        let status =
            move |s: tonic::Status| if secagg_context.is_some() { secagg_status(s) } else { s.into() };
        async move {
            let mut rx = rx;
            let Some(first) = rx.recv().await else {
                return Err(ApiError::Protocol("an upload without a header".into()));
            };
            let Some(pb::upload_update_request::Item::Header(h)) = &first.item else {
                return Err(ApiError::Protocol("an upload must start with its header".into()));
            };
            let attempt = RoundId::new(h.round, h.attempt);
            reserve_slot(&mut client, token.as_deref(), attempt, ask_timeout).await.map_err(|e| match e {
                Reserve::Status(s) => status(s),
                Reserve::Api(e) => e,
            })?;
            let items = futures::stream::once(std::future::ready(first))
                .chain(tokio_stream::wrappers::ReceiverStream::new(rx));
            let request = with_token(tonic::Request::new(items), token.as_deref(), None)?;
            let reply = client.upload_update(request).await.map_err(status)?;
            Ok(UploadReceipt::from(reply.into_inner()))
        }
    }

    fn token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wraps `message` with the session token and, if given, a deadline.
    fn request<T>(&self, message: T, timeout: Option<Duration>) -> Result<tonic::Request<T>, ApiError> {
        with_token(tonic::Request::new(message), self.token().as_deref(), timeout)
    }
}

/// `request` with `token` (if any) as its bearer credential and, if given, a deadline.
fn with_token<T>(
    mut request: tonic::Request<T>,
    token: Option<&str>,
    timeout: Option<Duration>,
) -> Result<tonic::Request<T>, ApiError> {
    if let Some(t) = timeout {
        request.set_timeout(t);
    }
    if let Some(token) = token {
        let value = bearer_metadata(token)
            .ok_or_else(|| ApiError::Protocol("session token is not valid header text".into()))?;
        request.metadata_mut().insert(AUTHORIZATION, value);
    }
    Ok(request)
}

/// Longest one `ReserveUpload` asks to wait for a slot (the coordinator caps it too).
const RESERVE_MAX_WAIT: Duration = Duration::from_secs(20);

/// Longest pause between two reservations, whatever the coordinator suggests.
const RESERVE_MAX_PAUSE: Duration = Duration::from_secs(10);

/// Why a reservation failed: the coordinator's status (classified by the caller, which knows
/// whether the upload is masked) or a malformed answer.
enum Reserve {
    Status(tonic::Status),
    Api(ApiError),
}

/// Asks `ReserveUpload` for `attempt` until the coordinator grants a slot, pausing (jittered, so
/// clients told to wait together do not come back together) as it says in between. Bounded by
/// the coordinator: each ask waits at most its long-poll bound, and once the attempt takes no
/// more uploads the answer is an error, which ends the wait.
async fn reserve_slot(
    client: &mut CoordinatorClient<Channel>,
    token: Option<&str>,
    attempt: RoundId,
    ask_timeout: Duration,
) -> Result<(), Reserve> {
    loop {
        let ask =
            pb::ReserveUploadRequest::from(UploadReservation { id: attempt, max_wait: RESERVE_MAX_WAIT });
        let request = with_token(tonic::Request::new(ask), token, Some(ask_timeout)).map_err(Reserve::Api)?;
        let reply = match client.reserve_upload(request).await {
            Ok(reply) => reply.into_inner(),
            // A coordinator from before upload admission admits at the stream itself.
            Err(s) if s.code() == Code::Unimplemented => return Ok(()),
            Err(s) => return Err(Reserve::Status(s)),
        };
        match UploadAdmission::try_from(reply).map_err(|e| Reserve::Api(e.into()))? {
            UploadAdmission::Granted { .. } => return Ok(()),
            UploadAdmission::RetryAfter(pause) => {
                let jitter = rand::random_range(0.5..1.5);
                tokio::time::sleep(pause.min(RESERVE_MAX_PAUSE).mul_f64(jitter)).await;
            }
        }
    }
}

impl CoordinatorApi for GrpcCoordinator {
    async fn join(&self, request: JoinRequest) -> Result<JoinResponse, ApiError> {
        if let Some(id) = &self.identity {
            return self.join_with_identity(id, request).await;
        }
        let mut client = self.client.clone();
        let req = tonic::Request::new(pb::JoinRequest::from(request));
        let reply = client.join(req).await?.into_inner();
        let session = JoinResponse::try_from(reply)?;
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(session.session_token.clone());
        Ok(session)
    }

    async fn wait_for_task(&self, max_wait: Duration) -> Result<Task, ApiError> {
        let mut client = self.client.clone();
        let max_wait_ms = u64::try_from(max_wait.as_millis()).unwrap_or(u64::MAX);
        // The server answers by `max_wait` (or its own cap); the margin covers the round trip.
        let req =
            self.request(pb::WaitForTaskRequest { max_wait_ms }, Some(max_wait + self.request_timeout))?;
        Ok(Task::try_from(client.wait_for_task(req).await?.into_inner())?)
    }

    async fn heartbeat(&self, beat: Heartbeat) -> Result<HeartbeatReply, ApiError> {
        let mut client = self.client.clone();
        let req = self.request(pb::HeartbeatRequest::from(beat), Some(self.request_timeout))?;
        Ok(HeartbeatReply::try_from(client.heartbeat(req).await?.into_inner())?)
    }

    async fn download(&self, request: DownloadRequest) -> Result<DownloadStream, ApiError> {
        let mut client = self.client.clone();
        // No deadline: a 400 MB model on a slow link may take minutes; a stalled stream is
        // caught by HTTP/2 keep-alive and resumed from the bytes already held.
        let req = self.request(pb::DownloadModelRequest::from(request), None)?;
        let stream = client.download_model(req).await?.into_inner();
        Ok(stream
            .map(|item| match item {
                Ok(m) => DownloadItem::try_from(m).map_err(ApiError::from),
                Err(status) => Err(ApiError::from(status)),
            })
            .boxed())
    }

    fn upload(
        &self,
        items: BoxStream<'static, UploadItem>,
    ) -> impl Future<Output = Result<UploadReceipt, ApiError>> + Send {
        self.upload_stream(items, None)
    }

    fn upload_masked(
        &self,
        secagg_context: [u8; 32],
        items: BoxStream<'static, UploadItem>,
    ) -> impl Future<Output = Result<UploadReceipt, ApiError>> + Send {
        self.upload_stream(items, Some(secagg_context))
    }

    async fn advertise_keys(&self, keys: KeyAdvertisement) -> Result<(), ApiError> {
        let mut client = self.client.clone();
        let req = self.request(pb::AdvertiseKeysRequest::from(&keys), Some(self.request_timeout))?;
        client.advertise_keys(req).await.map_err(secagg_status)?;
        Ok(())
    }

    async fn send_shares(&self, shares: ShareUpload) -> Result<(), ApiError> {
        let mut client = self.client.clone();
        let req = self.request(pb::SendSharesRequest::from(&shares), Some(self.request_timeout))?;
        client.send_shares(req).await.map_err(secagg_status)?;
        Ok(())
    }

    async fn await_secagg_step(
        &self,
        ctx: &RoundContext,
        step: AwaitedStep,
        max_wait: Duration,
    ) -> Result<StepInput, ApiError> {
        let mut client = self.client.clone();
        let message = pb::AwaitSecAggStepRequest {
            round: Some((&RoundRef::of(ctx)).into()),
            step: fedtune_shared::convert::awaited_step_to_pb(step) as i32,
            max_wait_ms: u64::try_from(max_wait.as_millis()).unwrap_or(u64::MAX),
        };
        // Like the task long-poll: the server answers by `max_wait`, the margin covers the trip.
        let req = self.request(message, Some(max_wait + self.request_timeout))?;
        let reply = client.await_sec_agg_step(req).await.map_err(secagg_status)?.into_inner();
        Ok(StepInput::from_pb(reply, ctx)?)
    }

    async fn answer_unmask(&self, answer: RoundUnmaskAnswer) -> Result<(), ApiError> {
        let mut client = self.client.clone();
        let req = self.request(pb::UnmaskAnswer::from(&answer), Some(self.request_timeout))?;
        client.answer_unmask(req).await.map_err(secagg_status)?;
        Ok(())
    }

    async fn report_evaluation(&self, report: EvalReport) -> Result<(), ApiError> {
        let mut client = self.client.clone();
        let req = self.request(pb::ReportEvaluationRequest::from(&report), Some(self.request_timeout))?;
        client.report_evaluation(req).await?;
        Ok(())
    }

    async fn report_failure(&self, report: FailureReport) -> Result<(), ApiError> {
        let mut client = self.client.clone();
        let req = self.request(pb::ReportFailureRequest::from(&report), Some(self.request_timeout))?;
        client.report_failure(req).await?;
        Ok(())
    }

    async fn leave(&self) -> Result<(), ApiError> {
        let mut client = self.client.clone();
        let req = self.request(pb::LeaveRequest {}, Some(self.request_timeout))?;
        client.leave(req).await?;
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    async fn status(&self, recent_rounds: u32) -> Result<StatusReport, ApiError> {
        let mut client = self.client.clone();
        let req = tonic::Request::new(pb::GetStatusRequest { recent_rounds });
        Ok(StatusReport::try_from(client.get_status(req).await?.into_inner())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_what_the_agent_must_do() {
        let cases = [
            (Code::Unavailable, "Unavailable"),
            (Code::Unauthenticated, "Unauthenticated"),
            (Code::NotFound, "Unauthenticated"),
            (Code::FailedPrecondition, "Stale"),
            (Code::AlreadyExists, "AlreadyAccepted"),
            (Code::InvalidArgument, "Invalid"),
            (Code::DataLoss, "DataLoss"),
            (Code::ResourceExhausted, "Busy"),
            (Code::PermissionDenied, "Denied"),
            (Code::Unknown, "Unavailable"),
        ];
        for (code, kind) in cases {
            let e = ApiError::from(tonic::Status::new(code, "x"));
            assert!(format!("{e:?}").starts_with(kind), "{code:?} became {e:?}, expected {kind}");
        }
    }

    #[test]
    fn aborted_ends_a_secure_round_attempt_but_is_a_passing_hiccup_elsewhere() {
        let aborted = || tonic::Status::aborted("attempt 0 of round 3 failed");
        assert!(matches!(secagg_status(aborted()), ApiError::AttemptOver(_)));
        assert!(matches!(ApiError::from(aborted()), ApiError::Unavailable(_)));
        assert!(!secagg_status(aborted()).is_transient());
        // Other statuses of a secure call keep their usual meaning.
        assert!(matches!(secagg_status(tonic::Status::unavailable("x")), ApiError::Unavailable(_)));
    }

    #[test]
    fn only_transport_trouble_is_retried_blindly() {
        assert!(ApiError::Unavailable(String::new()).is_transient());
        assert!(ApiError::Busy(String::new()).is_transient());
        assert!(!ApiError::Invalid(String::new()).is_transient());
        assert!(!ApiError::Stale(String::new()).is_transient());
        assert!(!ApiError::Denied(String::new()).is_transient());
    }

    #[tokio::test]
    async fn debug_output_never_shows_the_session_token_or_the_key() {
        let key = Arc::new(KeyPair::generate_ephemeral().unwrap());
        let api = GrpcCoordinator::connect_lazy(&ConnectOptions::new("http://127.0.0.1:1"))
            .unwrap()
            .with_identity(key, Some(EnrollmentToken::generate().unwrap()));
        *lock(&api.token) = Some("s3cr3t-session".into());
        let text = format!("{api:?}");
        assert!(!text.contains("s3cr3t-session") && text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn the_keep_alive_follows_a_short_call_bound_and_keeps_its_wan_pace_for_long_ones() {
        let s = Duration::from_secs;
        assert_eq!(keep_alive(s(3)), (s(3), s(3)), "a dead link ends a stream within two bounds");
        assert_eq!(keep_alive(s(15)), (s(15), s(10)));
        assert_eq!(keep_alive(DEFAULT_REQUEST_TIMEOUT), (s(20), s(10)));
        assert_eq!(keep_alive(s(600)), (s(20), s(10)));
    }

    #[test]
    fn a_malformed_url_is_a_configuration_error() {
        let err = GrpcCoordinator::connect_lazy(&ConnectOptions::new("not a url")).unwrap_err();
        assert!(matches!(err, ApiError::Config(_)), "{err:?}");
    }
}
