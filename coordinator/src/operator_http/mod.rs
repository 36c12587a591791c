//! The operator's HTTP port (`server.operator_listen`): Prometheus metrics at `/metrics` and
//! the status page at `/status`, in plain HTTP for a private operator network, never on the
//! clients' port.
//!
//! - `/metrics`: the text exposition of [`crate::telemetry`], its state gauges sampled from the
//!   operator status first. Open to anyone who reaches the port unless
//!   `server.metrics_token_file` is set; then only to a request presenting that token as
//!   `Authorization: Bearer` (what Prometheus sends for `authorization: { credentials_file }`),
//!   or the operator's own credentials, compared in constant time like the operator token;
//!   anything else gets 401.
//! - `/status`: the page of [`page`], for the operator only ([`session`]: the operator token
//!   as a bearer token, or a session cookie from the login form); anyone else gets 401 and the
//!   login form, with no federation data.
//! - `/login` (POST, form field `token`): checks the token like `GetStatus` does and sets the
//!   session cookie.
//!
//! The page and the gauges read the same [`StatusReport`](fedtune_shared::round::StatusReport)
//! the operator's `GetStatus` returns, from the round actor ([`RoundHandle::status`]): one
//! source, no second query path.
//!
//! # Layout
//! - [`session`]: who is the operator (bearer token or session cookie).
//! - [`page`]: the HTML.

pub mod page;
pub mod session;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use fedtune_shared::crypto::{CryptoError, OperatorCheck, OperatorToken};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::round::requests::RoundHandle;
use crate::telemetry;

use self::session::Sessions;

/// Rounds the status page shows.
const PAGE_ROUNDS: usize = 30;

/// Longest a page or a scrape waits for the round actor's status before answering 503: a
/// scrape must not hang while the actor is busy.
const STATUS_WAIT: Duration = Duration::from_secs(5);

/// How often histograms are drained when nobody scrapes, so their samples do not pile up.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What the handlers share.
struct Operator {
    handle: RoundHandle,
    auth: Arc<dyn Authenticator>,
    sessions: Sessions,
    metrics: PrometheusHandle,
    /// `server.metrics_token_file`'s token; `None` leaves `/metrics` open.
    metrics_token: Option<OperatorCheck>,
}

/// Why the operator port could not start.
#[derive(Debug, thiserror::Error)]
pub enum OperatorHttpError {
    /// Binding failed.
    #[error("cannot listen for operators on {addr}: {source}")]
    Listen {
        /// `server.operator_listen`.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// No session key could be drawn.
    #[error(transparent)]
    Random(#[from] session::RandomFailed),
    /// `server.metrics_token_file` cannot be read or written, or holds no token.
    #[error("server.metrics_token_file: {0}")]
    MetricsToken(#[source] CryptoError),
}

/// Loads the metrics token from `path` (`server.metrics_token_file`), or writes a fresh one
/// there (mode 0600) when the file does not exist, as the operator token is made.
fn metrics_token(path: &Path) -> Result<OperatorCheck, OperatorHttpError> {
    let token = OperatorToken::load_or_generate(path).map_err(OperatorHttpError::MetricsToken)?;
    token.check().map_err(OperatorHttpError::MetricsToken)
}

/// Binds `addr` and serves the operator port until `cancel`; returns once it listens (the
/// server and its upkeep run on spawned tasks that end with `cancel`). With
/// `metrics_token_file`, `/metrics` requires that token.
pub async fn serve(
    addr: SocketAddr,
    metrics_token_file: Option<&Path>,
    handle: RoundHandle,
    auth: Arc<dyn Authenticator>,
    metrics: PrometheusHandle,
    cancel: &CancellationToken,
) -> Result<(), OperatorHttpError> {
    let metrics_token = metrics_token_file.map(metrics_token).transpose()?;
    let listener =
        TcpListener::bind(addr).await.map_err(|source| OperatorHttpError::Listen { addr, source })?;
    info!(
        addr = ?listener.local_addr().ok(),
        metrics_token = metrics_token.is_some(),
        "operator port listening (plaintext HTTP: /metrics, /status)"
    );
    let state = Arc::new(Operator {
        handle,
        auth,
        sessions: Sessions::new()?,
        metrics: metrics.clone(),
        metrics_token,
    });
    let app = router(state);
    let shutdown = cancel.clone().cancelled_owned();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            warn!(error = %e, "the operator port failed");
        }
    });
    let cancel = cancel.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => metrics.run_upkeep(),
            }
        }
    });
    Ok(())
}

fn router(state: Arc<Operator>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/status") }))
        .route("/metrics", get(metrics))
        .route("/status", get(status_page))
        .route("/login", post(login))
        .with_state(state)
}

/// `/metrics`: samples the state gauges, then renders every metric; with a metrics token, only
/// for its bearer (or the operator), 401 for anyone else before anything is sampled.
async fn metrics(State(op): State<Arc<Operator>>, headers: HeaderMap) -> Response {
    if let Some(token) = &op.metrics_token {
        // The metrics token first: a scrape must not be logged as a wrong operator token.
        if !session::is_scraper(&headers, token)
            && !session::is_operator(&headers, op.auth.as_ref(), &op.sessions, SystemTime::now())
        {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"fedtune metrics\"")],
                "/metrics needs the metrics token (server.metrics_token_file) as `Authorization: Bearer \
                 <token>`\n",
            )
                .into_response();
        }
    }
    match tokio::time::timeout(STATUS_WAIT, op.handle.status(0)).await {
        Ok(Ok(report)) => telemetry::sample_status(&report),
        // Still render: counters and histograms do not need the actor.
        Ok(Err(e)) => warn!(error = %e, "status for /metrics"),
        Err(_) => warn!(wait = ?STATUS_WAIT, "the round actor did not answer /metrics' status in time"),
    }
    telemetry::sample_process();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], op.metrics.render())
        .into_response()
}

fn html(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], body)
        .into_response()
}

/// `/status`: the page for the operator, the login form (401) for anyone else.
async fn status_page(State(op): State<Arc<Operator>>, headers: HeaderMap) -> Response {
    if !session::is_operator(&headers, op.auth.as_ref(), &op.sessions, SystemTime::now()) {
        return html(StatusCode::UNAUTHORIZED, page::login(None));
    }
    match tokio::time::timeout(STATUS_WAIT, op.handle.status(PAGE_ROUNDS)).await {
        Ok(Ok(report)) => html(StatusCode::OK, page::status(&report)),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("status: {e}")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the round actor did not answer in time").into_response(),
    }
}

/// The login form's fields.
#[derive(Debug, serde::Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /login`: the operator token for a session cookie.
async fn login(State(op): State<Arc<Operator>>, Form(form): Form<LoginForm>) -> Response {
    if op.auth.operator(form.token.trim()).is_err() {
        return html(StatusCode::UNAUTHORIZED, page::login(Some("That is not the operator token.")));
    }
    match op.sessions.set_cookie(SystemTime::now()) {
        Ok(cookie) => ([(header::SET_COOKIE, cookie)], Redirect::to("/status")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
