//! How far one coordinator goes: N lightweight agents in this one process, each with its own
//! connection and session, against a release `fedtune-coordinator serve` in another process.
//!
//! ```text
//! cargo build --release -p fedtune-coordinator
//! cargo bench -p fedtune-coordinator --bench load -- --clients 1000 --sampling poisson --rate 0.1
//! ```
//!
//! Every agent speaks the real protocol through `fedtune_shared` (no libtorch, no training):
//! its Ed25519 key is allowlisted before the coordinator starts, it answers the join challenge,
//! long-polls `WaitForTask` with its session token, sends `Heartbeat` on the interval the
//! coordinator advertised (all the time, not only while working as the real agent does, so the
//! heartbeat load is an upper bound), downloads the trainable tensors of each fit task's model
//! (digest-checked), reserves an upload slot (`ReserveUpload`, a long poll repeated when told to
//! retry) and uploads a signed update of small `f32` deltas within the advertised bound. The model is BERT-shaped with about 1M parameters, all trainable, so each update is
//! about 4 MB. Evaluation is off.
//!
//! Printed: rounds completed, updates lost (accepted by the coordinator but not counted in the
//! round's summary), the coordinator's peak resident set (`VmHWM`) and CPU seconds (user +
//! system, from the first round's start to the last round's end, per round), the largest
//! resident set sampled (every 250 ms) in each phase, client-side
//! p50/p99 latencies per call, and how long a fit task took to reach every selected agent.
//! The figures are printed; nothing is asserted on them but `updates lost: 0`.
//!
//! Options: `--clients N` (32), `--sampling fraction|poisson` (fraction, with fraction 1.0),
//! `--rate q` (0.1, Poisson), `--rounds R` (3), `--heartbeat-interval SECONDS` (5),
//! `--timeout SECONDS` (1800: the whole run's bound). The coordinator binary is the release
//! build in the target folder, or `FEDTUNE_BIN`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{connect, enroll, free_port, spawn_serve, write_bert_like, BertShape};
use fedtune_shared::auth::{bearer_metadata, sign_upload, ChallengeGrant, JoinProof, AUTHORIZATION};
use fedtune_shared::chunk::{Sha256Stream, MAX_MESSAGE_BYTES};
use fedtune_shared::compression::UpdateEncoding;
use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::{ClientId, RoundId, Sha256};
use fedtune_shared::pb::{self, coordinator_client::CoordinatorClient};
use fedtune_shared::round::{
    Chunk, ClientActivity, DownloadItem, DownloadRequest, FitTask, Heartbeat, HeartbeatReply, JoinRequest,
    JoinResponse, ModelScope, StatusReport, Task, UpdateHeader, UpdateTrailer, UploadAdmission, UploadItem,
    UploadReceipt, UploadReservation,
};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// About 1.0M parameters: 4 layers, 128 wide, vocabulary 1400.
const SHAPE: BertShape = BertShape { hidden: 128, intermediate: 512, layers: 4, vocab: 1400, positions: 128 };

/// Longest one WaitForTask long-poll asks to block (the coordinator's `server.long_poll`).
const LONG_POLL: Duration = Duration::from_secs(20);

/// Bound on every call but the long poll and the streams.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sampling {
    Fraction,
    Poisson(f64),
}

#[derive(Debug)]
struct Args {
    clients: usize,
    sampling: Sampling,
    rounds: u64,
    heartbeat_interval: u64,
    timeout: Duration,
}

fn parse_args() -> Args {
    let mut args = Args {
        clients: 32,
        sampling: Sampling::Fraction,
        rounds: 3,
        heartbeat_interval: 5,
        timeout: Duration::from_secs(1800),
    };
    let mut rate = 0.1;
    let mut poisson = false;
    // `cargo bench` passes `--bench`.
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--clients" => args.clients = value().parse().expect("--clients: a number"),
            "--sampling" => match value().as_str() {
                "fraction" => poisson = false,
                "poisson" => poisson = true,
                other => panic!("--sampling: fraction or poisson, not {other}"),
            },
            "--rate" => rate = value().parse().expect("--rate: a probability"),
            "--rounds" => args.rounds = value().parse().expect("--rounds: a number"),
            "--heartbeat-interval" => {
                args.heartbeat_interval = value().parse().expect("--heartbeat-interval: seconds")
            }
            "--timeout" => args.timeout = Duration::from_secs(value().parse().expect("--timeout: seconds")),
            other => panic!("unknown option {other} (see the header of coordinator/benches/load.rs)"),
        }
    }
    if poisson {
        args.sampling = Sampling::Poisson(rate);
    }
    assert!(args.clients >= 1 && args.rounds >= 1, "--clients and --rounds must be at least 1");
    args
}

fn coordinator_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FEDTUNE_BIN") {
        return PathBuf::from(p);
    }
    // target/release/deps/load-… → target/release/fedtune-coordinator
    let exe = std::env::current_exe().expect("bench path");
    exe.ancestors().nth(2).expect("target folder").join("fedtune-coordinator")
}

/// Raises this process's soft file-descriptor limit to its hard limit: each agent holds a
/// socket, and the coordinator (a child) inherits the limit.
fn raise_nofile_limit() -> (u64, u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
    setrlimit(Resource::Nofile, raised).expect("raise RLIMIT_NOFILE");
    let now = getrlimit(Resource::Nofile);
    (now.current.unwrap_or(u64::MAX), now.maximum.unwrap_or(u64::MAX))
}

/// A field of `/proc/<pid>/status`, in kB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// User + system CPU seconds of `pid` (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_seconds(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &text[text.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// `Max open files` (soft) of `pid`.
fn open_files_limit(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("proc limits");
    text.lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or("?")
        .to_string()
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Latencies of one method, in milliseconds.
#[derive(Debug, Default)]
struct Latencies(Mutex<Vec<f64>>);

impl Latencies {
    fn record(&self, since: Instant) {
        let ms = since.elapsed().as_secs_f64() * 1e3;
        self.0.lock().expect("latencies").push(ms);
    }

    fn summary(&self) -> String {
        let mut v = self.0.lock().expect("latencies").clone();
        if v.is_empty() {
            return "no calls".into();
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        format!(
            "p50 {:>9.1} ms  p99 {:>9.1} ms  max {:>9.1} ms  ({} calls)",
            q(0.5),
            q(0.99),
            q(1.0),
            v.len()
        )
    }
}

/// What the agents saw, shared by all of them.
#[derive(Debug, Default)]
struct Record {
    joined: AtomicUsize,
    /// Agents that could not join.
    gave_up: AtomicUsize,
    join: Latencies,
    wait_for_task: Latencies,
    heartbeat: Latencies,
    download: Latencies,
    upload: Latencies,
    /// `ReserveUpload` asks (each a long poll of up to `LONG_POLL`).
    reserve: Latencies,
    /// `ReserveUpload` answers "retry after".
    retry_after: AtomicU64,
    /// Uploads the coordinator acknowledged, by round attempt.
    accepted: Mutex<BTreeMap<RoundId, u32>>,
    /// When the first and the last agent received each attempt's fit task.
    dispatched: Mutex<BTreeMap<RoundId, (Instant, Instant)>>,
    /// Calls that failed, by method and status code.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Heartbeats answered "task no longer wanted".
    unwanted: AtomicU64,
}

impl Record {
    fn error(&self, method: &str, status: &Status) {
        *self.errors.lock().expect("errors").entry(format!("{method}: {:?}", status.code())).or_default() +=
            1;
    }
}

/// What every agent uploads: one shared payload (sliced without copying) and its digest.
#[derive(Debug, Clone)]
struct Update {
    payload: Bytes,
    digest: Sha256,
    chunk: usize,
}

/// One agent's session: its connection, key and token.
#[derive(Debug, Clone)]
struct Session {
    rpc: CoordinatorClient<Channel>,
    name: ClientId,
    key: Arc<KeyPair>,
    token: Arc<Mutex<String>>,
    joined: Arc<Mutex<Option<(String, JoinResponse)>>>,
}

impl Session {
    fn request<T>(&self, message: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(t) = timeout {
            r.set_timeout(t);
        }
        let token = self.token.lock().expect("token").clone();
        r.metadata_mut().insert(AUTHORIZATION, bearer_metadata(&token).expect("ascii token"));
        r
    }

    /// JoinChallenge, answer it with the key, Join.
    async fn join(&self) -> Result<JoinResponse, Status> {
        let mut rpc = self.rpc.clone();
        let mut ask = tonic::Request::new(pb::JoinChallengeRequest { client_name: self.name.to_string() });
        ask.set_timeout(CALL_TIMEOUT);
        let grant = ChallengeGrant::try_from(rpc.join_challenge(ask).await?.into_inner())
            .map_err(|e| Status::internal(format!("malformed challenge: {e}")))?;
        let mut wire = pb::JoinRequest::from(JoinRequest {
            protocol_version: pb::PROTOCOL_VERSION,
            name: Some(self.name.clone()),
            public_key: None,
            train_examples: 100,
            eval_examples: 0,
            agent_version: "load-bench".into(),
        });
        wire.public_key = self.key.public_key().as_bytes().to_vec().into();
        JoinProof::answer(&self.key, &grant, &self.name).attach(&mut wire);
        let mut join = tonic::Request::new(wire);
        join.set_timeout(CALL_TIMEOUT);
        let reply = rpc.join(join).await?.into_inner();
        let federation = reply.federation_id.clone();
        let joined = JoinResponse::try_from(reply).map_err(|e| Status::internal(e.to_string()))?;
        *self.token.lock().expect("token") = joined.session_token.clone();
        *self.joined.lock().expect("joined") = Some((federation, joined.clone()));
        Ok(joined)
    }

    async fn heartbeat(&self, beat: Heartbeat) -> Result<HeartbeatReply, Status> {
        let mut rpc = self.rpc.clone();
        let reply = rpc.heartbeat(self.request(pb::HeartbeatRequest::from(beat), Some(CALL_TIMEOUT))).await?;
        HeartbeatReply::try_from(reply.into_inner()).map_err(|e| Status::internal(e.to_string()))
    }

    async fn wait_for_task(&self) -> Result<Task, Status> {
        let mut rpc = self.rpc.clone();
        let max_wait_ms = LONG_POLL.as_millis() as u64;
        let req = self.request(pb::WaitForTaskRequest { max_wait_ms }, Some(LONG_POLL + CALL_TIMEOUT));
        let reply = rpc.wait_for_task(req).await?.into_inner();
        Task::try_from(reply).map_err(|e| Status::internal(e.to_string()))
    }

    /// The trainable tensors of the task's model, checked against the digest the task names.
    async fn download(&self, task: &FitTask, chunk: usize) -> Result<usize, Status> {
        let mut rpc = self.rpc.clone();
        let req = DownloadRequest {
            version: task.model.version,
            scope: ModelScope::Trainable,
            offset: 0,
            max_chunk_bytes: Some(chunk as u32),
            base_version: None,
        };
        let mut stream =
            rpc.download_model(self.request(pb::DownloadModelRequest::from(req), None)).await?.into_inner();
        let mut hash = Sha256Stream::default();
        let mut bytes = 0;
        while let Some(item) = stream.next().await {
            match DownloadItem::try_from(item?).map_err(|e| Status::internal(e.to_string()))? {
                DownloadItem::Header(_) => {}
                DownloadItem::Chunk(c) => {
                    hash.update(&c.data);
                    bytes += c.data.len();
                }
            }
        }
        if hash.finish() != task.model.trainable_payload {
            return Err(Status::data_loss("downloaded payload does not match the task's digest"));
        }
        Ok(bytes)
    }

    /// Asks `ReserveUpload` for a slot for `task` until one is granted, pausing (jittered) as the
    /// coordinator says in between, as the real agent's transport does.
    async fn reserve(&self, task: &FitTask, record: &Record, stop: &CancellationToken) -> Result<(), Status> {
        loop {
            let mut rpc = self.rpc.clone();
            let ask = UploadReservation { id: task.id, max_wait: LONG_POLL };
            let started = Instant::now();
            let reply = rpc
                .reserve_upload(
                    self.request(pb::ReserveUploadRequest::from(ask), Some(LONG_POLL + CALL_TIMEOUT)),
                )
                .await?;
            record.reserve.record(started);
            match UploadAdmission::try_from(reply.into_inner())
                .map_err(|e| Status::internal(e.to_string()))?
            {
                UploadAdmission::Granted { .. } => return Ok(()),
                UploadAdmission::RetryAfter(pause) => {
                    record.retry_after.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(pause.mul_f64(rand::random_range(0.5..1.5))) => {}
                        _ = stop.cancelled() => return Err(Status::cancelled("stopping")),
                    }
                }
            }
        }
    }

    /// Streams `update` for `task`, the trailer signed with this agent's key.
    async fn upload(&self, task: &FitTask, update: &Update) -> Result<UploadReceipt, Status> {
        let (federation, joined) =
            self.joined.lock().expect("joined").clone().expect("joined before uploading");
        let header = UpdateHeader {
            id: task.id,
            base_version: task.model.version,
            num_examples: 100,
            metrics: Default::default(),
            manifest_digest: Sha256(joined.trainable_manifest.digest()),
            total_bytes: update.payload.len() as u64,
            encoding: UpdateEncoding::F32,
        };
        let signature = sign_upload(&self.key, &federation, &joined.client_id, &header, &update.digest);
        let mut items: Vec<pb::UploadUpdateRequest> = vec![UploadItem::Header(header).into()];
        let mut at = 0;
        while at < update.payload.len() {
            let end = (at + update.chunk).min(update.payload.len());
            items.push(
                UploadItem::Chunk(Chunk { offset: at as u64, data: update.payload.slice(at..end) }).into(),
            );
            at = end;
        }
        items.push(
            UploadItem::Trailer(UpdateTrailer { payload_digest: update.digest, signature: Some(signature) })
                .into(),
        );
        let mut rpc = self.rpc.clone();
        let reply = rpc.upload_update(self.request(tokio_stream::iter(items), None)).await?;
        Ok(UploadReceipt::from(reply.into_inner()))
    }
}

/// What an agent is doing, for its heartbeats.
#[derive(Debug, Clone, Copy)]
struct Doing(ClientActivity, Option<u64>);

/// Jittered exponential backoff for transient refusals (busy, unavailable).
async fn backoff(attempt: u32, stop: &CancellationToken) {
    let base = Duration::from_millis(200).saturating_mul(1 << attempt.min(5)).min(Duration::from_secs(5));
    let jitter = rand::random_range(0.5..1.5);
    tokio::select! {
        _ = tokio::time::sleep(base.mul_f64(jitter)) => {}
        _ = stop.cancelled() => {}
    }
}

fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::ResourceExhausted | Code::Unavailable | Code::Unknown | Code::DeadlineExceeded
    )
}

/// One agent: join, then poll/heartbeat/download/upload until the federation finishes or
/// `stop` fires.
async fn agent(session: Session, update: Update, record: Arc<Record>, stop: CancellationToken) {
    let mut attempt = 0;
    let joined = loop {
        let started = Instant::now();
        match session.join().await {
            Ok(j) => {
                record.join.record(started);
                break j;
            }
            Err(s) => {
                record.error("Join", &s);
                // Only a refused key is final; a challenge that expired while the coordinator
                // was busy (UNAUTHENTICATED) is answered afresh, like any transient refusal.
                if stop.is_cancelled() || s.code() == Code::PermissionDenied || attempt >= 30 {
                    record.gave_up.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                backoff(attempt, &stop).await;
                attempt += 1;
            }
        }
    };
    record.joined.fetch_add(1, Ordering::Relaxed);
    let doing = Arc::new(Mutex::new(Doing(ClientActivity::Idle, None)));
    let beats = tokio::spawn({
        let (session, record, doing, stop) = (session.clone(), record.clone(), doing.clone(), stop.clone());
        let interval = joined.heartbeat_interval;
        async move {
            let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let Doing(activity, round) = *doing.lock().expect("doing");
                let started = Instant::now();
                match session.heartbeat(Heartbeat { activity, round }).await {
                    Ok(reply) => {
                        record.heartbeat.record(started);
                        if round.is_some() && !reply.task_still_wanted {
                            record.unwanted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(s) => record.error("Heartbeat", &s),
                }
            }
        }
    });
    let mut failures = 0;
    while !stop.is_cancelled() {
        let started = Instant::now();
        let task = tokio::select! {
            t = session.wait_for_task() => t,
            _ = stop.cancelled() => break,
        };
        let task = match task {
            Ok(t) => {
                record.wait_for_task.record(started);
                failures = 0;
                t
            }
            Err(s) => {
                record.error("WaitForTask", &s);
                if s.code() == Code::Unauthenticated {
                    // Session expired: join again, as the real agent does.
                    if let Err(s) = session.join().await {
                        record.error("Join", &s);
                    }
                }
                backoff(failures, &stop).await;
                failures += 1;
                continue;
            }
        };
        match task {
            Task::None { retry_after, .. } => {
                if !retry_after.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(retry_after) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            }
            Task::Finished { .. } => break,
            Task::Evaluate(_) => {}
            Task::Fit(task) => {
                let now = Instant::now();
                record.dispatched.lock().expect("dispatched").entry(task.id).or_insert((now, now)).1 = now;
                fit(&session, &task, &update, &record, &doing, &stop).await;
                *doing.lock().expect("doing") = Doing(ClientActivity::Idle, None);
            }
        }
    }
    beats.abort();
}

/// Downloads the task's model and uploads the update, retrying transient refusals until the
/// task's deadline.
async fn fit(
    session: &Session,
    task: &FitTask,
    update: &Update,
    record: &Record,
    doing: &Mutex<Doing>,
    stop: &CancellationToken,
) {
    let deadline = Instant::now() + task.deadline_in;
    let round = Some(task.id.round);
    *doing.lock().expect("doing") = Doing(ClientActivity::Downloading, round);
    let mut attempt = 0;
    loop {
        let started = Instant::now();
        match session.download(task, update.chunk).await {
            Ok(_) => {
                record.download.record(started);
                break;
            }
            Err(s) => {
                record.error("DownloadModel", &s);
                if !transient(&s) || Instant::now() >= deadline || stop.is_cancelled() {
                    return;
                }
            }
        }
        backoff(attempt, stop).await;
        attempt += 1;
    }
    *doing.lock().expect("doing") = Doing(ClientActivity::Uploading, round);
    let mut attempt = 0;
    loop {
        if let Err(s) = session.reserve(task, record, stop).await {
            record.error("ReserveUpload", &s);
            if !transient(&s) || Instant::now() >= deadline || stop.is_cancelled() {
                return;
            }
            backoff(attempt, stop).await;
            attempt += 1;
            continue;
        }
        let started = Instant::now();
        match session.upload(task, update).await {
            Ok(receipt) => {
                record.upload.record(started);
                *record.accepted.lock().expect("accepted").entry(receipt.id).or_default() += 1;
                return;
            }
            Err(s) => {
                record.error("UploadUpdate", &s);
                if !transient(&s) || Instant::now() >= deadline || stop.is_cancelled() {
                    return;
                }
            }
        }
        backoff(attempt, stop).await;
        attempt += 1;
    }
}

fn write_config(dir: &Path, port: u16, model: &Path, args: &Args) -> PathBuf {
    let n = args.clients;
    let sampling = match args.sampling {
        Sampling::Fraction => "scheme = \"fraction\"\nfraction = 1.0".to_string(),
        Sampling::Poisson(q) => format!("scheme = \"poisson\"\nrate = {q}"),
    };
    let config = dir.join("coordinator.toml");
    // Every agent shares 127.0.0.1: the per-address limits (connections, anonymous calls, which
    // a join makes two of) are raised to fit N sites behind one address.
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:{port}"
long_poll = "{poll}s"
[storage]
state_dir = "{state}"
[model]
init_dir = "{model}"
[rounds]
total = {rounds}
min_available = {n}
min_fit = 1
deadline = "10m"
retry_backoff = "1s"
max_consecutive_failures = 10
[sampling]
{sampling}
[evaluation]
every = 0
[clients]
heartbeat_interval = "{hb}s"
liveness_timeout = "{live}s"
[security]
insecure = true
[security.limits]
max_connections_per_address = {conns}
max_connections = {conns}
anonymous_calls_per_second = {anon}
anonymous_burst = {burst}
"#,
            poll = LONG_POLL.as_secs(),
            state = dir.join("state").display(),
            model = model.display(),
            rounds = args.rounds,
            hb = args.heartbeat_interval,
            live = args.heartbeat_interval * 6,
            conns = n + 64,
            anon = (n as f64).max(50.0),
            burst = 2 * n + 200,
        ),
    )
    .expect("config");
    config
}

fn main() {
    let args = parse_args();
    let (soft, hard) = raise_nofile_limit();
    let binary = coordinator_binary();
    assert!(
        binary.is_file(),
        "{} not found: `cargo build --release -p fedtune-coordinator` first (or set FEDTUNE_BIN)",
        binary.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(run(args, binary, (soft, hard)));
}

async fn run(args: Args, binary: PathBuf, (soft, hard): (u64, u64)) {
    let n = args.clients;
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_bert_like(&dir.path().join("model"), SHAPE);
    let params =
        fedtune_shared::params::ParameterVector::load_safetensors(&model.join("model.safetensors"), |_| true)
            .expect("model")
            .values()
            .len();
    // Small deltas, well within the advertised bound (MAX_ABS_UPDATE_VALUE).
    let delta: Vec<u8> =
        (0..params).flat_map(|i| (((i % 977) as f32 - 488.0) * 1e-6).to_le_bytes()).collect();
    let update = Update {
        digest: Sha256::of(&delta),
        payload: Bytes::from(delta),
        chunk: fedtune_shared::chunk::DEFAULT_CHUNK_BYTES,
    };
    let port = free_port();
    let config = write_config(dir.path(), port, &model, &args);
    let state = dir.path().join("state");
    let keys: Vec<(ClientId, KeyPair)> = (0..n)
        .map(|k| {
            let name = format!("load-{k:04}");
            let key = enroll(&state, &name);
            (ClientId::parse(&name).expect("name"), key)
        })
        .collect();
    println!(
        "load: {n} agents, {}, {} rounds, model of {params} parameters (updates of {:.1} MB), heartbeat every {} s",
        match args.sampling {
            Sampling::Fraction => "fraction 1.0".to_string(),
            Sampling::Poisson(q) => format!("Poisson q = {q}"),
        },
        args.rounds,
        update.payload.len() as f64 / 1e6,
        args.heartbeat_interval,
    );
    let log_path = dir.path().join("coordinator.log");
    let mut child = spawn_serve(&binary, &config, &log_path);
    let pid = child.id();
    println!("file descriptors: this process {soft} (hard {hard}); coordinator {}", open_files_limit(pid));
    let url = format!("http://127.0.0.1:{port}");
    let mut observer = connect(&url).await;
    let started = Instant::now();
    let record = Arc::new(Record::default());
    let stop = CancellationToken::new();
    let mut agents = Vec::with_capacity(n);
    for (name, key) in keys {
        let channel = fedtune_shared::endpoint::endpoint(&url, None, Duration::from_secs(10))
            .expect("endpoint")
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        let session = Session {
            rpc: CoordinatorClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            name,
            key: Arc::new(key),
            token: Arc::default(),
            joined: Arc::default(),
        };
        agents.push(tokio::spawn(agent(session, update.clone(), record.clone(), stop.clone())));
    }
    // Everyone joined: the rounds start (min_available = N) and CPU is counted from here.
    let deadline = started + args.timeout;
    let mut progress = Instant::now();
    while record.joined.load(Ordering::Relaxed) + record.gave_up.load(Ordering::Relaxed) < n
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if progress.elapsed() > Duration::from_secs(10) {
            progress = Instant::now();
            let errors = record.errors.lock().expect("errors").clone();
            println!("  … {} joined, failed calls so far: {errors:?}", record.joined.load(Ordering::Relaxed));
        }
    }
    let gave_up = record.gave_up.load(Ordering::Relaxed);
    assert_eq!(gave_up, 0, "{gave_up} agents could not join: {:?}", record.errors.lock().expect("errors"));
    let joined_in = started.elapsed();
    let cpu_joined = cpu_seconds(pid);
    let rss_joined = proc_status_kib(pid, "VmRSS:");
    let fds_joined = open_files(pid);
    println!(
        "joined: {} of {n} in {:.1} s; coordinator then: {:.1} MB resident, {fds_joined} open files, {cpu_joined:.1} CPU s",
        record.joined.load(Ordering::Relaxed),
        joined_in.as_secs_f64(),
        rss_joined as f64 / 1024.0
    );
    let mut last: Option<StatusReport> = None;
    // Largest VmRSS sampled while the coordinator was in each phase (MB), to tell what the peak
    // is made of: downloads and uploads overlap in Training, aggregation has its own phase.
    let mut rss_by_phase: BTreeMap<String, f64> = BTreeMap::new();
    while Instant::now() < deadline {
        match observer.get_status(pb::GetStatusRequest { recent_rounds: 1 }).await {
            Ok(s) => {
                let s = StatusReport::try_from(s.into_inner()).expect("status");
                let rss = proc_status_kib(pid, "VmRSS:") as f64 / 1024.0;
                let peak = rss_by_phase.entry(format!("{:?}", s.phase)).or_default();
                *peak = peak.max(rss);
                let done = s.finished_reason.is_some() || s.model_version.0 >= args.rounds;
                last = Some(s);
                if done {
                    break;
                }
            }
            Err(e) => println!("status: {e}"),
        }
        if let Ok(Some(exit)) = child.try_wait() {
            println!(
                "the coordinator exited: {exit}; its log: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let wall = started.elapsed() - joined_in;
    let cpu = cpu_seconds(pid) - cpu_joined;
    let hwm = proc_status_kib(pid, "VmHWM:");
    let fds = open_files(pid);
    // Let the agents see Finished, then stop the rest.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(30), a).await;
    }
    // The operator view (the anonymous one carries no round summaries).
    let operator = fedtune_shared::crypto::operator::OperatorToken::load(
        &state.join(fedtune_shared::crypto::operator::OPERATOR_TOKEN_FILE),
    )
    .expect("operator token");
    let mut ask = tonic::Request::new(pb::GetStatusRequest { recent_rounds: 1000 });
    ask.metadata_mut().insert(AUTHORIZATION, bearer_metadata(operator.expose_secret()).expect("ascii token"));
    let report = observer.get_status(ask).await.expect("final status").into_inner();
    let report = StatusReport::try_from(report).expect("status");
    let _ = child.kill();
    let _ = child.wait();
    let completed = last.as_ref().map_or(0, |s| s.model_version.0);

    println!(
        "\nrounds completed: {completed} of {} in {:.1} s after the joins",
        args.rounds,
        wall.as_secs_f64()
    );
    let accepted = record.accepted.lock().expect("accepted").clone();
    let dispatched = record.dispatched.lock().expect("dispatched").clone();
    let mut lost: i64 = 0;
    println!("attempt   | status    | selected | accepted (coordinator) | acknowledged (agents) | fit task reached all in | wall s");
    let mut rounds = report.recent_rounds.clone();
    rounds.sort_by_key(|r| r.id);
    for r in &rounds {
        let acked = accepted.get(&r.id).copied().unwrap_or(0);
        if r.status == "completed" {
            lost += i64::from(acked) - i64::from(r.accepted);
        }
        let spread = dispatched
            .get(&r.id)
            .map_or("-".into(), |(a, b)| format!("{:.0} ms", (*b - *a).as_secs_f64() * 1e3));
        println!(
            "{:<9} | {:<9} | {:>8} | {:>22} | {:>21} | {:>23} | {:>6.1}",
            r.id.to_string(),
            r.status,
            r.selected,
            r.accepted,
            acked,
            spread,
            r.duration.as_secs_f64()
        );
    }
    println!("updates lost: {lost}");
    println!(
        "coordinator: peak RSS (VmHWM) {:.1} MB; {:.2} CPU s per round ({cpu:.1} s over {completed} rounds); {fds} open files at the end",
        hwm as f64 / 1024.0,
        cpu / completed.max(1) as f64
    );
    println!(
        "coordinator: largest RSS sampled per phase: {}",
        rss_by_phase.iter().map(|(p, mb)| format!("{p} {mb:.0} MB")).collect::<Vec<_>>().join(", ")
    );
    println!("client-side latency:");
    println!("  Join          {}", record.join.summary());
    println!(
        "  WaitForTask   {}  (long polls: a call returns at a task or after {} s)",
        record.wait_for_task.summary(),
        LONG_POLL.as_secs()
    );
    println!("  Heartbeat     {}", record.heartbeat.summary());
    println!("  DownloadModel {}", record.download.summary());
    println!("  ReserveUpload {}", record.reserve.summary());
    println!("  UploadUpdate  {}", record.upload.summary());
    println!("ReserveUpload answered 'retry after': {}", record.retry_after.load(Ordering::Relaxed));
    let errors = record.errors.lock().expect("errors").clone();
    if errors.is_empty() {
        println!("failed calls: none");
    } else {
        println!("failed calls (retried when transient): {errors:?}");
    }
    println!("heartbeats answered 'task no longer wanted': {}", record.unwanted.load(Ordering::Relaxed));
    println!(
        "summary | N {n} | {} | rounds {completed}/{} | lost {lost} | VmHWM {:.1} MB | CPU/round {:.2} s",
        match args.sampling {
            Sampling::Fraction => "fraction 1.0".to_string(),
            Sampling::Poisson(q) => format!("poisson {q}"),
        },
        args.rounds,
        hwm as f64 / 1024.0,
        cpu / completed.max(1) as f64
    );
    let coordinator_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let warnings: Vec<&str> =
        coordinator_log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    if !warnings.is_empty() {
        println!("coordinator warnings ({}), first 10:", warnings.len());
        for w in warnings.iter().take(10) {
            println!("  {w}");
        }
    }
    assert_eq!(lost, 0, "updates acknowledged to agents but not counted in their round");
}
