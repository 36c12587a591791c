//! An in-process coordinator and a deliberately low-level gRPC test client.
//!
//! [`TestClient`] speaks the wire protocol with the generated stubs directly (no agent, no
//! retries), so scenarios can send exactly the messages they mean — including malformed ones —
//! and see the exact status the coordinator answers. It authenticates like a real client: an
//! allowlisted key per name ([`crate::identities`]), the join challenge, and a signature on
//! every upload trailer it sends (unless a scenario turns signing off to forge its own).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fedtune_coordinator::{run, CoordinatorSettings, RunError};
use fedtune_shared::auth::{bearer_metadata, sign_upload, ChallengeGrant, JoinProof, AUTHORIZATION};
use fedtune_shared::chunk::{DEFAULT_CHUNK_BYTES, MAX_MESSAGE_BYTES};
use fedtune_shared::crypto::{KeyPair, OperatorToken, OPERATOR_TOKEN_FILE};
use fedtune_shared::ids::{ClientId, ModelVersion, RoundId, Sha256};
use fedtune_shared::params::{Manifest, ParameterVector};
use fedtune_shared::pb::{self, coordinator_client::CoordinatorClient};
use fedtune_shared::round::{
    Chunk, ClientActivity, DownloadItem, DownloadRequest, EvalReport, FailureReport, FitTask, Heartbeat,
    JoinRequest, JoinResponse, ModelHeader, ModelScope, StatusReport, Task, TaskKind, UpdateHeader,
    UpdateTrailer, UploadAdmission, UploadItem, UploadReceipt, UploadReservation,
};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// A coordinator running in this process on `127.0.0.1:0`.
#[derive(Debug)]
pub struct InProcess {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Cancels it.
    pub stop: CancellationToken,
    /// Its `run` future.
    pub task: JoinHandle<Result<(), RunError>>,
}

impl InProcess {
    /// Binds `127.0.0.1:0` and spawns `run` (plaintext: the harness sets `security.insecure`
    /// unless a scenario configures TLS, then the URL is `https://localhost:PORT`).
    pub async fn start(settings: CoordinatorSettings) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = if settings.security.tls_cert.is_some() {
            format!("https://localhost:{}", listener.local_addr()?.port())
        } else {
            format!("http://{}", listener.local_addr()?)
        };
        crate::identities::register(&url, &settings.storage.state_dir);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(settings, listener, stop.clone()));
        Ok(Self { url, stop, task })
    }

    /// Cancels and waits for `run` to return.
    pub async fn shutdown(self) -> Result<(), RunError> {
        self.stop.cancel();
        self.task.await.expect("run does not panic")
    }
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Values from little-endian bytes.
pub fn f32_values(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A protocol-level client.
#[derive(Debug, Clone)]
pub struct TestClient {
    inner: CoordinatorClient<Channel>,
    token: Option<String>,
    url: String,
    /// Key used to join and sign (the name's allowlisted key unless replaced).
    pub key: Option<Arc<KeyPair>>,
    /// Federation id announced at join (what uploads are signed for).
    pub federation_id: Option<String>,
    /// Whether upload trailers get signed (scenarios forging signatures turn it off).
    pub signing: bool,
    /// Id after join.
    pub id: Option<ClientId>,
    /// The join response.
    pub joined: Option<JoinResponse>,
}

impl TestClient {
    /// Connects without joining. Its encoding limit is generous on purpose, so tests can send
    /// messages the coordinator must refuse.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, None).await
    }

    /// Connects with a TLS configuration (for `https://` coordinators).
    pub async fn connect_with(url: &str, tls: Option<tonic::transport::ClientTlsConfig>) -> Result<Self> {
        let endpoint = fedtune_shared::endpoint::endpoint(url, tls, Duration::from_secs(5))?;
        Self::connect_endpoint(endpoint, url).await
    }

    /// Connects from the local address `from` (on Linux every `127.x.y.z` is loopback, so a
    /// scenario can play peers at several addresses), without joining.
    pub async fn connect_from(url: &str, from: std::net::IpAddr) -> Result<Self> {
        let endpoint = fedtune_shared::endpoint::endpoint(url, None, Duration::from_secs(5))?;
        Self::connect_endpoint(endpoint.local_address(Some(from)), url).await
    }

    async fn connect_endpoint(endpoint: tonic::transport::Endpoint, url: &str) -> Result<Self> {
        let channel = endpoint.connect().await.with_context(|| format!("connecting to {url}"))?;
        let inner = CoordinatorClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(4 * MAX_MESSAGE_BYTES);
        Ok(Self {
            inner,
            token: None,
            url: url.to_string(),
            key: None,
            federation_id: None,
            signing: true,
            id: None,
            joined: None,
        })
    }

    /// The generated stub on this client's connection, without a session, for calls the
    /// helpers here would not make (e.g. oversized requests).
    pub fn raw(&self) -> CoordinatorClient<Channel> {
        self.inner.clone()
    }

    /// Connects and joins as `name`.
    pub async fn join(url: &str, name: &str, eval_examples: u64) -> Result<Self> {
        let mut c = Self::connect(url).await?;
        c.rejoin(name, eval_examples).await?;
        Ok(c)
    }

    /// Joins (again) as `name`: JoinChallenge, sign with the name's allowlisted key, Join.
    pub async fn rejoin(&mut self, name: &str, eval_examples: u64) -> Result<()> {
        let resp = self.try_join(name, eval_examples).await?;
        self.federation_id = Some(resp.federation_id.clone());
        let joined = JoinResponse::try_from(resp)?;
        self.token = Some(joined.session_token.clone());
        self.id = Some(joined.client_id.clone());
        self.joined = Some(joined);
        Ok(())
    }

    /// One join handshake as `name` with [`Self::key`] (or the name's allowlisted key), returning
    /// the coordinator's exact answer.
    pub async fn try_join(&mut self, name: &str, eval_examples: u64) -> Result<pb::JoinResponse, Status> {
        let id = ClientId::parse(name).map_err(|e| Status::internal(e.to_string()))?;
        let key = match &self.key {
            Some(k) => k.clone(),
            None => {
                let k = crate::identities::key_for(&self.url, name)
                    .map_err(|e| Status::internal(e.to_string()))?;
                self.key = Some(k.clone());
                k
            }
        };
        let grant = self
            .inner
            .join_challenge(pb::JoinChallengeRequest { client_name: name.to_string() })
            .await?
            .into_inner();
        let grant = ChallengeGrant::try_from(grant).map_err(|e| Status::internal(e.to_string()))?;
        let req = JoinRequest {
            protocol_version: pb::PROTOCOL_VERSION,
            name: Some(id.clone()),
            public_key: None,
            train_examples: 100,
            eval_examples,
            agent_version: "fedtune-tests".into(),
        };
        let mut wire = pb::JoinRequest::from(req);
        JoinProof::answer(&key, &grant, &id).attach(&mut wire);
        Ok(self.inner.join(wire).await?.into_inner())
    }

    /// Signs the trailer of a raw upload for the header before it (when signing is on, a key
    /// and federation are known, and the trailer carries no signature yet).
    fn sign_items(&self) -> impl FnMut(pb::UploadUpdateRequest) -> pb::UploadUpdateRequest + Send + 'static {
        let signer = match (&self.key, &self.federation_id, &self.id) {
            (Some(k), Some(f), Some(c)) if self.signing => Some((k.clone(), f.clone(), c.clone())),
            _ => None,
        };
        let mut header: Option<UpdateHeader> = None;
        move |mut item| {
            let Some((key, fed, client)) = &signer else { return item };
            match &mut item.item {
                Some(pb::upload_update_request::Item::Header(h)) => {
                    header = UploadItem::try_from(pb::UploadUpdateRequest {
                        item: Some(pb::upload_update_request::Item::Header(h.clone())),
                    })
                    .ok()
                    .and_then(|i| {
                        if let UploadItem::Header(h) = i {
                            Some(h)
                        } else {
                            None
                        }
                    });
                }
                Some(pb::upload_update_request::Item::Trailer(t)) if t.signature.is_empty() => {
                    if let (Some(h), Ok(digest)) = (&header, Sha256::from_slice(&t.payload_sha256)) {
                        let sig = sign_upload(key, fed, client, h, &digest);
                        t.signature_scheme = sig.scheme;
                        t.signature = sig.bytes;
                    }
                }
                _ => {}
            }
            item
        }
    }

    /// The current session token.
    pub fn token(&self) -> Option<String> {
        self.token.clone()
    }

    /// Uses `token` (or none) for later calls.
    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
    }

    /// The trainable manifest announced at join.
    pub fn trainable(&self) -> &Manifest {
        &self.joined.as_ref().expect("joined").trainable_manifest
    }

    /// A request carrying this client's session token, for calls made on [`Self::raw`].
    pub fn authed<T>(&self, msg: T) -> Request<T> {
        self.req(msg)
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert(AUTHORIZATION, bearer_metadata(t).expect("ascii token"));
        }
        r
    }

    /// One long-poll.
    pub async fn poll(&mut self, max_wait: Duration) -> Result<Task, Status> {
        let r = self.req(pb::WaitForTaskRequest { max_wait_ms: max_wait.as_millis() as u64 });
        let resp = self.inner.wait_for_task(r).await?.into_inner();
        Task::try_from(resp).map_err(|e| Status::internal(e.to_string()))
    }

    /// One heartbeat, as an agent sends while it trains or transfers (a download does not
    /// count as being alive, so a long one without heartbeats ends in a dropout).
    pub async fn heartbeat(&mut self, activity: ClientActivity, round: Option<u64>) -> Result<(), Status> {
        let r = self.req(pb::HeartbeatRequest::from(Heartbeat { activity, round }));
        self.inner.heartbeat(r).await?;
        Ok(())
    }

    /// Polls until a fit task arrives (or `within` passes).
    pub async fn wait_for_fit(&mut self, within: Duration) -> Result<FitTask> {
        let until = tokio::time::Instant::now() + within;
        loop {
            match self.poll(Duration::from_millis(500)).await? {
                Task::Fit(f) => return Ok(f),
                Task::Finished { reason, .. } => {
                    bail!("federation finished while waiting for a fit task: {reason}")
                }
                _ if tokio::time::Instant::now() >= until => bail!("no fit task within {within:?}"),
                _ => {}
            }
        }
    }

    /// Polls until the federation reports it is finished.
    pub async fn wait_finished(&mut self, within: Duration) -> Result<ModelVersion> {
        let until = tokio::time::Instant::now() + within;
        loop {
            match self.poll(Duration::from_millis(500)).await? {
                Task::Finished { final_version, .. } => return Ok(final_version),
                _ if tokio::time::Instant::now() >= until => bail!("not finished within {within:?}"),
                _ => {}
            }
        }
    }

    /// Downloads (part of) a model: the header and the bytes from `offset` on, optionally
    /// stopping after `max_chunks` chunks (to simulate a broken download).
    pub async fn download(
        &mut self,
        version: ModelVersion,
        scope: ModelScope,
        offset: u64,
        max_chunks: Option<usize>,
    ) -> Result<(ModelHeader, Vec<u8>), Status> {
        self.download_from(version, scope, offset, None, max_chunks).await
    }

    /// [`Self::download`] of a client holding `base_version` (which may be sent the 8-bit step
    /// from it).
    pub async fn download_from(
        &mut self,
        version: ModelVersion,
        scope: ModelScope,
        offset: u64,
        base_version: Option<ModelVersion>,
        max_chunks: Option<usize>,
    ) -> Result<(ModelHeader, Vec<u8>), Status> {
        let r = self.req(pb::DownloadModelRequest::from(DownloadRequest {
            version,
            scope,
            offset,
            max_chunk_bytes: None,
            base_version,
        }));
        let mut stream = self.inner.download_model(r).await?.into_inner();
        let mut header = None;
        let mut start = offset;
        let mut bytes = Vec::new();
        let mut chunks = 0;
        while let Some(msg) = stream.message().await? {
            match DownloadItem::try_from(msg).map_err(|e| Status::internal(e.to_string()))? {
                DownloadItem::Header(h) => {
                    // Not always `offset`: a step asked for but not served comes whole.
                    start = h.start_offset;
                    header = Some(h);
                }
                DownloadItem::Chunk(c) => {
                    if c.offset != start + bytes.len() as u64 {
                        return Err(Status::internal("chunk out of order"));
                    }
                    bytes.extend_from_slice(&c.data);
                    chunks += 1;
                    if max_chunks.is_some_and(|m| chunks >= m) {
                        break;
                    }
                }
            }
        }
        Ok((header.ok_or_else(|| Status::internal("no header"))?, bytes))
    }

    /// Opens a download and returns its stream unread, as a client that stops reading.
    pub async fn open_download(
        &mut self,
        version: ModelVersion,
        scope: ModelScope,
    ) -> Result<tonic::Streaming<pb::DownloadModelResponse>, Status> {
        let r = self.req(pb::DownloadModelRequest::from(DownloadRequest {
            version,
            scope,
            offset: 0,
            max_chunk_bytes: None,
            base_version: None,
        }));
        Ok(self.inner.download_model(r).await?.into_inner())
    }

    /// Downloads a whole scope and checks it against its header digest.
    pub async fn download_vector(
        &mut self,
        version: ModelVersion,
        scope: ModelScope,
    ) -> Result<ParameterVector> {
        let (h, bytes) = self.download(version, scope, 0, None).await?;
        if Sha256::of(&bytes) != h.payload_digest {
            bail!("downloaded payload does not match its digest");
        }
        Ok(ParameterVector::from_le_bytes(h.manifest, &bytes)?)
    }

    /// One `ReserveUpload` ask for attempt `id`: the coordinator's exact answer.
    pub async fn reserve_upload(
        &mut self,
        id: RoundId,
        max_wait: Duration,
    ) -> Result<UploadAdmission, Status> {
        let r = self.req(pb::ReserveUploadRequest::from(UploadReservation { id, max_wait }));
        let reply = self.inner.reserve_upload(r).await?.into_inner();
        UploadAdmission::try_from(reply).map_err(|e| Status::internal(e.to_string()))
    }

    /// Asks `ReserveUpload` for attempt `id` until it grants a slot, pausing as told (the
    /// uploads below do this first, as an agent does), for at most a minute.
    pub async fn reserve_slot(&mut self, id: RoundId) -> Result<(), Status> {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match self.reserve_upload(id, Duration::from_secs(5)).await? {
                UploadAdmission::Granted { .. } => return Ok(()),
                UploadAdmission::RetryAfter(_) if tokio::time::Instant::now() >= until => {
                    return Err(Status::deadline_exceeded(format!("no upload slot for {id} within a minute")))
                }
                UploadAdmission::RetryAfter(pause) => tokio::time::sleep(pause).await,
            }
        }
    }

    /// Reserves a slot for the attempt `first` (an upload's first message) names, if it is a
    /// header; the coordinator refuses whatever else it is on its own.
    async fn reserve_for(&mut self, first: Option<&pb::UploadUpdateRequest>) -> Result<(), Status> {
        match first.and_then(|m| m.item.as_ref()) {
            Some(pb::upload_update_request::Item::Header(h)) => {
                self.reserve_slot(RoundId::new(h.round, h.attempt)).await
            }
            _ => Ok(()),
        }
    }

    /// Reserves a slot for the attempt the header names, then sends raw upload messages as one
    /// stream and returns the coordinator's answer.
    pub async fn upload_raw(&mut self, items: Vec<pb::UploadUpdateRequest>) -> Result<UploadReceipt, Status> {
        self.reserve_for(items.first()).await?;
        self.upload_raw_ungranted(items).await
    }

    /// Sends raw upload messages as one stream without reserving a slot first.
    pub async fn upload_raw_ungranted(
        &mut self,
        items: Vec<pb::UploadUpdateRequest>,
    ) -> Result<UploadReceipt, Status> {
        let items: Vec<_> = items.into_iter().map(self.sign_items()).collect();
        let r = self.req(tokio_stream::iter(items));
        let resp = self.inner.upload_update(r).await?.into_inner();
        Ok(resp.into())
    }

    /// Sends upload messages as they arrive on `items` (the caller controls timing), after
    /// reserving a slot for the attempt the first one (the header) names.
    pub async fn upload_stream(
        &mut self,
        items: impl tokio_stream::Stream<Item = pb::UploadUpdateRequest> + Send + 'static,
    ) -> Result<UploadReceipt, Status> {
        use tokio_stream::StreamExt as _;
        let mut items = Box::pin(items);
        let first = items.next().await;
        self.reserve_for(first.as_ref()).await?;
        let items = tokio_stream::iter(first).chain(items);
        let r = self.req(items.map(self.sign_items()));
        Ok(self.inner.upload_update(r).await?.into_inner().into())
    }

    /// Uploads `payload` for `task` with a correct header and trailer.
    pub async fn upload(
        &mut self,
        task: &FitTask,
        num_examples: u64,
        payload: &[u8],
    ) -> Result<UploadReceipt, Status> {
        let header = self.header(task, num_examples, payload.len() as u64);
        let items = upload_items(&header, payload, DEFAULT_CHUNK_BYTES, Sha256::of(payload));
        self.upload_raw(items).await
    }

    /// Takes the next fit task, uploads update `k` (see [`update_values`]) for it with
    /// `num_examples`, and waits until the federation finishes: for one-client federations.
    pub async fn contribute_and_finish(&mut self, num_examples: u64, k: usize) -> Result<ModelVersion> {
        let within = Duration::from_secs(20);
        let task = self.wait_for_fit(within).await?;
        let n = self.trainable().numel();
        self.upload(&task, num_examples, &f32_bytes(&update_values(k, n))).await?;
        self.wait_finished(within).await
    }

    /// The header a correct upload for `task` carries (in the encoding the task asks for).
    pub fn header(&self, task: &FitTask, num_examples: u64, total_bytes: u64) -> UpdateHeader {
        UpdateHeader {
            id: task.id,
            base_version: task.model.version,
            num_examples,
            metrics: [("train_loss".to_string(), 0.5)].into_iter().collect(),
            manifest_digest: Sha256(self.trainable().digest()),
            total_bytes,
            encoding: task.config.update_encoding,
        }
    }

    /// Starts an upload, sends the header and the first `chunks` chunks of `payload`, then drops
    /// the call abruptly (the HTTP/2 stream is reset), as a client that crashes mid-upload.
    pub async fn upload_and_break_off(
        &mut self,
        task: &FitTask,
        num_examples: u64,
        payload: &[u8],
        chunks: usize,
    ) {
        let header = self.header(task, num_examples, payload.len() as u64);
        let items = upload_items(&header, payload, DEFAULT_CHUNK_BYTES, Sha256::of(payload));
        self.reserve_slot(task.id).await.expect("an upload slot");
        let (tx, rx) = mpsc::channel(1);
        let mut inner = self.inner.clone();
        let r = self.req(ReceiverStream::new(rx));
        let call = tokio::spawn(async move { inner.upload_update(r).await });
        for item in items.into_iter().take(1 + chunks) {
            if tx.send(item).await.is_err() {
                break;
            }
        }
        // Let the coordinator receive what was sent, then vanish without a trailer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        call.abort();
        let _ = call.await;
    }

    /// Reports an evaluation.
    pub async fn report_evaluation(&mut self, report: &EvalReport) -> Result<(), Status> {
        let r = self.req(pb::ReportEvaluationRequest::from(report));
        self.inner.report_evaluation(r).await?;
        Ok(())
    }

    /// Gives up on a fit task.
    pub async fn report_fit_failure(&mut self, task: &FitTask, reason: &str) -> Result<(), Status> {
        let r = self.req(pb::ReportFailureRequest::from(&FailureReport {
            id: task.id,
            kind: TaskKind::Fit,
            reason: reason.into(),
        }));
        self.inner.report_failure(r).await?;
        Ok(())
    }

    /// Operator status: the full view, with the operator token of the coordinator's state
    /// directory (made here if the coordinator has not made it yet; both agree on one file).
    pub async fn status(&mut self) -> Result<StatusReport> {
        let state = crate::identities::state_dir_of(&self.url)?;
        let token = OperatorToken::load_or_generate(&state.join(OPERATOR_TOKEN_FILE))?;
        Ok(self.status_as(Some(token.expose_secret())).await?)
    }

    /// `GetStatus` with `bearer` as the `authorization: Bearer` credential, or with none.
    pub async fn status_as(&mut self, bearer: Option<&str>) -> Result<StatusReport, Status> {
        let mut r = Request::new(pb::GetStatusRequest { recent_rounds: 20 });
        if let Some(token) = bearer {
            let value = bearer_metadata(token).ok_or_else(|| Status::internal("token is not ASCII"))?;
            r.metadata_mut().insert(AUTHORIZATION, value);
        }
        let resp = self.inner.get_status(r).await?.into_inner();
        StatusReport::try_from(resp).map_err(|e| Status::internal(e.to_string()))
    }

    /// Polls status until `pred` holds.
    pub async fn wait_status(
        &mut self,
        within: Duration,
        pred: impl Fn(&StatusReport) -> bool,
    ) -> Result<StatusReport> {
        let until = tokio::time::Instant::now() + within;
        loop {
            let s = self.status().await?;
            if pred(&s) {
                return Ok(s);
            }
            if tokio::time::Instant::now() >= until {
                bail!(
                    "status condition not reached within {within:?}; last: phase {} round {} v{}",
                    s.phase,
                    s.round,
                    s.model_version.0
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A deterministic update for client `k`: distinct per client and per coordinate, well inside
/// the fixed-point range, with values that are not on the 2⁻²⁴ grid (so rounding is exercised).
pub fn update_values(k: usize, n: usize) -> Vec<f32> {
    (0..n).map(|j| (((j * 31 + k * 17) % 101) as f32 - 50.0) * 1.3e-3 + k as f32 * 1e-7).collect()
}

/// The honest end of round 2 of the "attacked vs. quiet" scenarios: `e` uploads (and when
/// `replay` is set, sends the very same signed update again, which must be refused), then `a`
/// and `b`. Returns the bits of the published round-2 model's trainable values, so that a run
/// that saw attacks can be compared bit for bit with one that saw none.
pub async fn finish_round_two(
    coord: InProcess,
    (a, ta): (&mut TestClient, &FitTask),
    (b, tb): (&mut TestClient, &FitTask),
    (e, te): (&mut TestClient, &FitTask),
    replay: bool,
) -> Result<Vec<u32>> {
    const WAIT: Duration = Duration::from_secs(20);
    let n = a.trainable().numel();
    e.upload(te, 17, &f32_bytes(&update_values(5, n))).await?;
    if replay {
        let again = e.upload(te, 17, &f32_bytes(&update_values(5, n))).await;
        expect_status(again, Code::AlreadyExists, &["already accepted"]);
    }
    a.upload(ta, 11, &f32_bytes(&update_values(3, n))).await?;
    b.upload(tb, 13, &f32_bytes(&update_values(4, n))).await?;
    assert_eq!(a.wait_finished(WAIT).await?, ModelVersion(2));
    let v2 = a.download_vector(ModelVersion(2), ModelScope::Trainable).await?;
    coord.shutdown().await?;
    Ok(v2.values().iter().map(|v| v.to_bits()).collect())
}

/// Header, chunks of `chunk` bytes, trailer with `digest`.
pub fn upload_items(
    header: &UpdateHeader,
    payload: &[u8],
    chunk: usize,
    digest: Sha256,
) -> Vec<pb::UploadUpdateRequest> {
    let mut items = vec![UploadItem::Header(header.clone()).into()];
    for (i, c) in payload.chunks(chunk).enumerate() {
        items.push(UploadItem::Chunk(Chunk { offset: (i * chunk) as u64, data: c.to_vec().into() }).into());
    }
    items.push(UploadItem::Trailer(UpdateTrailer { payload_digest: digest, signature: None }).into());
    items
}

/// Asserts a status code and that the message mentions every `needle`.
pub fn expect_status<T: std::fmt::Debug>(res: Result<T, Status>, code: Code, needles: &[&str]) -> Status {
    match res {
        Ok(v) => panic!("expected {code:?}, got success {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {}", s.message());
            for n in needles {
                assert!(s.message().contains(n), "`{}` should mention `{n}`", s.message());
            }
            s
        }
    }
}

/// Files in a folder (e.g. the spool), for "nothing left behind" checks.
pub fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}
