//! `run`: wires storage, the round actor and the gRPC service on an already bound listener, and
//! brings them down through one cancellation path with a bounded drain.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedtune_shared::round::PhaseName;
use fedtune_shared::settings::SettingsError;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::auth::{Authenticator, UpdateVerifier};
use crate::bootstrap::{bootstrap, BootError};
use crate::registry::Registry;
use crate::round::events::{EventPublisher, RoundState, Traffic};
use crate::round::phase::Shared;
use crate::round::phases::idle::Idle;
use crate::round::requests::RoundHandle;
use crate::round::{self, ActorExit, Round};
use crate::rpc::connections::{keepalive_interval, ConnectionLimits, Connections};
use crate::rpc::service::CoordinatorService;
use crate::settings::CoordinatorSettings;
use crate::storage::{Storage, StorageError};

/// Why `run` returned an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Invalid configuration (the binary exits 64).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The state directory cannot be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Start-up failed (model files, inconsistent state directory).
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The federation halted (too many failed rounds, or the strategy refused to continue).
    #[error("federation halted: {0}")]
    Halted(String),
    /// An internal failure stopped the coordinator.
    #[error("coordinator failed: {0}")]
    Fatal(String),
    /// The allowlist or the session secret in the state directory cannot be used.
    #[error("client authentication: {0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    /// The TLS certificate, key or client CA cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] crate::certs::CertError),
    /// The operator port (`server.operator_listen`) cannot start.
    #[error(transparent)]
    OperatorHttp(#[from] crate::operator_http::OperatorHttpError),
    /// `security.limits.max_connections` and its margin do not fit under `RLIMIT_NOFILE`.
    #[error(transparent)]
    FileDescriptors(#[from] crate::fd_limit::FdLimitError),
    /// `server.health_listen` cannot be bound.
    #[error("cannot listen for health checks on {addr}: {source}")]
    HealthListen {
        /// `server.health_listen`.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
}

/// Replaceable parts: where authentication, signature checks and TLS plug in. (Server-side DP
/// is not a seam here: `[privacy]` decides it, and start-up wraps the strategy.)
pub struct Seams {
    /// Join admission and session tokens.
    pub authenticator: Arc<dyn Authenticator>,
    /// Upload signatures.
    pub verifier: Arc<dyn UpdateVerifier>,
    /// TLS (or mutual TLS) for the listener; `None` serves plaintext.
    pub tls: Option<ServerTlsConfig>,
}

impl Seams {
    /// What `serve` runs with: the allowlist, join challenge, HMAC sessions and update
    /// signatures of the state directory ([`crate::auth::ClientAuth`]), and TLS as configured.
    /// Refuses plaintext unless `security.insecure` is set, naming the missing keys.
    pub fn secure(settings: &CoordinatorSettings) -> Result<Self, RunError> {
        settings.security.validate()?;
        settings.security.require_transport()?;
        let auth = Arc::new(crate::auth::ClientAuth::open(&settings.storage.state_dir, &settings.security)?);
        Ok(Self {
            authenticator: auth.clone(),
            verifier: auth,
            tls: crate::auth::tls_config(&settings.security)?,
        })
    }
}

impl std::fmt::Debug for Seams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seams").field("tls", &self.tls.is_some()).finish_non_exhaustive()
    }
}

/// HTTP/2 flow-control windows, set explicitly: large enough for fast transfers, small enough
/// that an upload waiting for its turn buffers at most this much in the server.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 2 << 20;

/// TCP keepalive on accepted sockets: probes after a minute without traffic, every 10 s, three
/// times, so a peer whose host vanished (no FIN, no RST) is noticed by the kernel even below
/// HTTP/2 (during a TLS handshake, or a write blocked on a full window).
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// The standard gRPC health service (`grpc.health.v1.Health`), which Kubernetes' `grpc:`
/// probes and load balancers ask: SERVING, for the whole server ("") and for
/// `fedtune.v1.Coordinator`, while the round actor runs; NOT_SERVING from the moment shutdown
/// begins (the actor ended, or a signal), so nothing routes new work into the drain grace.
async fn serve_health(
    cancel: &CancellationToken,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    const NAMES: [&str; 2] = ["", fedtune_shared::pb::coordinator_server::SERVICE_NAME];
    let (reporter, service) = tonic_health::server::health_reporter();
    for name in NAMES {
        reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
    }
    let cancel = cancel.clone();
    // Ends with the cancellation it waits for, which every exit path of `run_with` triggers.
    tokio::spawn(async move {
        cancel.cancelled().await;
        for name in NAMES {
            reporter.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
        }
    });
    service
}

/// Serves only `health` on `addr`, in plaintext (`server.health_listen`), until `cancel`: what
/// a Kubernetes `grpc:` probe can reach, as it speaks no TLS. Each call is short and a probe
/// needs one stream, so calls and streams are capped instead of admitted like clients.
async fn serve_plaintext_health(
    addr: std::net::SocketAddr,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    cancel: &CancellationToken,
) -> Result<(), RunError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| RunError::HealthListen { addr, source })?;
    info!(addr = ?listener.local_addr().ok(), "health service listening (plaintext)");
    let server = Server::builder()
        .timeout(Duration::from_secs(10))
        .max_concurrent_streams(Some(4))
        .add_service(health)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), cancel.clone().cancelled_owned());
    // Ends with the cancellation every exit path of `run_with` triggers.
    tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!(error = %e, "the health listener failed");
        }
    });
    Ok(())
}

/// Runs a coordinator on `listener` until `shutdown` is cancelled (or the federation ends and
/// `server.exit_after_finished` elapses), with [`Seams::secure`]: allowlisted clients only,
/// signed updates, TLS unless `security.insecure`. First raises the soft `RLIMIT_NOFILE` to the
/// hard limit and refuses to start if the connections and their margin do not fit under it
/// ([`crate::fd_limit`]).
pub async fn run(
    settings: CoordinatorSettings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    settings.validate()?;
    // Before anything is opened: a coordinator that would run out of descriptors mid-round
    // refuses to start instead (`serve` and `simulate` both come through here).
    crate::fd_limit::raise_and_check(&settings)?;
    let seams = Seams::secure(&settings)?;
    run_with(settings, listener, shutdown, seams).await
}

/// [`run`] with replaced seams.
pub async fn run_with(
    settings: CoordinatorSettings,
    listener: TcpListener,
    shutdown: CancellationToken,
    seams: Seams,
) -> Result<(), RunError> {
    settings.validate()?;
    let settings = Arc::new(settings);
    let storage = Storage::open(&settings.storage.state_dir)?;
    let (s, st) = (settings.clone(), storage.clone());
    let booted = tokio::task::spawn_blocking(move || bootstrap(&s, &st))
        .await
        .map_err(|e| RunError::Fatal(format!("start-up task died: {e}")))??;
    // A child token: the actor ending (finished, halted) stops everything here without
    // cancelling the caller's token.
    let cancel = shutdown.child_token();
    let now = tokio::time::Instant::now();
    let mut registry = Registry::new(settings.clients.liveness_timeout);
    for c in &booted.clients {
        registry.restore(c.id.clone(), c.public_key, c.rounds_contributed, now);
    }
    let model = Arc::new(booted.model);
    let (events, subscriber) = EventPublisher::new(
        RoundState {
            phase: PhaseName::Idle,
            round: booted.next,
            model_version: model.version,
            deadline: None,
        },
        model.clone(),
    );
    let strategy = booted.strategy;
    let strategy_name = strategy.name().to_string();
    let privacy = strategy.privacy_monitor();
    let (tx, rx) = mpsc::channel(settings.server.request_queue);
    let traffic = Arc::new(Traffic::default());
    let shared = Shared {
        settings: settings.clone(),
        requests: rx,
        events,
        registry,
        storage: storage.clone(),
        strategy: Arc::new(Mutex::new(strategy)),
        strategy_name,
        model,
        round: booted.next,
        next: booted.next,
        phase: PhaseName::Idle,
        deadline: None,
        consecutive_failures: booted.consecutive_failures,
        tasks: Default::default(),
        closed: None,
        accepted_updates: 0,
        finished: None,
        initial_evaluated: booted.initial_evaluated,
        next_upload_id: 0,
        cancel: cancel.clone(),
        traffic: traffic.clone(),
        attempt_started: None,
        traffic_mark: (0, 0),
        privacy,
        federation_id: seams.authenticator.federation_id().unwrap_or_default(),
        identities: seams.authenticator.clone(),
    };
    // The recorder is installed before the actor's first phase, and only when someone can
    // scrape it: without the operator port every metric call is a no-op.
    let metrics = settings.server.operator_listen.map(|_| crate::telemetry::install());
    let mut actor = tokio::spawn(round::run(shared, Round::Idle(Idle)));
    let handle = RoundHandle::new(tx, subscriber);
    if let (Some(addr), Some(metrics)) = (settings.server.operator_listen, metrics) {
        let auth = seams.authenticator.clone();
        let token_file = settings.server.metrics_token_file.as_deref();
        if let Err(e) =
            crate::operator_http::serve(addr, token_file, handle.clone(), auth, metrics, &cancel).await
        {
            // The actor already runs: stop it with everything else.
            cancel.cancel();
            return Err(e.into());
        }
    }
    let limits = Arc::new(crate::auth::Limits::new(&settings.security.limits));
    let service = CoordinatorService::new(
        handle,
        seams.authenticator,
        seams.verifier,
        limits,
        settings.clone(),
        booted.labels,
        booted.adapter,
        booted.init_seed,
        storage.spool_dir(),
        cancel.clone(),
        traffic,
    );
    let addr = listener.local_addr().ok();
    let connections = Connections::new(ConnectionLimits::from_settings(&settings));
    // tonic ignores its own `tcp_nodelay`/`tcp_keepalive` with a custom incoming stream: they
    // are set here, on the accepted sockets, before admission.
    let incoming = connections.incoming(
        TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE_IDLE))
            .with_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
            .with_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES)),
    );
    let ping = keepalive_interval(settings.server.connection_idle_timeout);
    let mut builder = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(ping))
        .http2_keepalive_timeout(Some(ping.min(Duration::from_secs(20))))
        .max_concurrent_streams(Some(settings.security.limits.max_streams_per_connection));
    if let Some(tls) = seams.tls {
        builder = builder.tls_config(tls)?;
    } else {
        warn!(
            "serving PLAINTEXT gRPC without TLS (security.insecure): anyone on the network path can read \
             updates and steal session tokens; use only for tests or on one trusted machine"
        );
    }
    let health = serve_health(&cancel).await;
    if let Some(addr) = settings.server.health_listen {
        serve_plaintext_health(addr, health.clone(), &cancel).await?;
    }
    let server = builder
        .add_service(health)
        .add_service(service.into_server(connections))
        .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
    let mut server = tokio::spawn(server);
    info!(addr = ?addr, fresh = booted.fresh, next_round = %booted.next, "coordinator serving");

    let grace = settings.server.drain_grace;
    // A JoinHandle must not be polled again once it completed: remember whether the server
    // branch below consumed it (it can win the race with `cancelled()` at shutdown).
    let mut server_done = false;
    let exit = tokio::select! {
        exit = &mut actor => {
            cancel.cancel();
            exit.unwrap_or_else(|e| ActorExit::Fatal(format!("round actor died: {e}")))
        }
        res = &mut server => {
            // The server only ends on its own if it failed (or shutdown was requested).
            server_done = true;
            cancel.cancel();
            let exit = tokio::time::timeout(grace, &mut actor).await;
            match res {
                Ok(Err(e)) => return Err(RunError::Transport(e)),
                Ok(Ok(())) => exit.ok().and_then(Result::ok).unwrap_or(ActorExit::Stopped),
                Err(e) => ActorExit::Fatal(format!("server task died: {e}")),
            }
        }
        _ = cancel.cancelled() => {
            match tokio::time::timeout(grace, &mut actor).await {
                Ok(exit) => exit.unwrap_or_else(|e| ActorExit::Fatal(format!("round actor died: {e}"))),
                Err(_) => {
                    warn!(?grace, "round actor did not stop within the drain grace");
                    actor.abort();
                    ActorExit::Stopped
                }
            }
        }
    };
    match if server_done { Ok(()) } else { tokio::time::timeout(grace, &mut server).await.map(|_| ()) } {
        Ok(()) => info!("coordinator stopped"),
        Err(_) => {
            warn!(?grace, "in-flight calls did not finish within the drain grace; stopping anyway");
            server.abort();
        }
    }
    match exit {
        ActorExit::Stopped => Ok(()),
        ActorExit::Halted(reason) => Err(RunError::Halted(reason)),
        ActorExit::Fatal(reason) => Err(RunError::Fatal(reason)),
    }
}
