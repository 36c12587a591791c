//! The `[server]` section: the listeners, the upload and download admission bounds, and the
//! timeouts that keep one connection or call from holding the coordinator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedtune_shared::chunk::{DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
use fedtune_shared::limits::MAX_NUM_EXAMPLES;
use fedtune_shared::settings::{duration, optional_duration, SettingsError};
use serde::{Deserialize, Serialize};

use super::duration_up_to;

/// Network side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address `serve` binds.
    pub listen: SocketAddr,
    /// A second, plaintext listener serving only the standard gRPC health service
    /// (`grpc.health.v1.Health`: SERVING or NOT_SERVING, nothing else), for probes that cannot
    /// speak TLS, such as Kubernetes' `grpc:` probes. Absent: health is answered on `listen`
    /// only, behind its TLS.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// The operator's plaintext HTTP port: Prometheus metrics at `/metrics` (open, or behind
    /// `metrics_token_file`) and the status page at `/status` (operator token). Meant for a
    /// private operator network, never the clients' side. Absent (the default): not served, so
    /// nothing listens that the deployment did not ask for.
    #[serde(default)]
    pub operator_listen: Option<SocketAddr>,
    /// A file holding the bearer token `/metrics` requires (base64url of 32 bytes, mode 0600;
    /// written there with a fresh token at start if it does not exist). Give Prometheus a copy
    /// as its scrape config's `authorization: { credentials_file: … }`. Absent (the default):
    /// `/metrics` answers anyone who reaches `operator_listen`. Needs `operator_listen`.
    #[serde(default)]
    pub metrics_token_file: Option<PathBuf>,
    /// Longest a `WaitForTask` long-poll blocks.
    #[serde(with = "duration")]
    pub long_poll: Duration,
    /// Uploads received at the same time: the upload slots `ReserveUpload` grants, one per
    /// upload stream. Further uploaders wait in `ReserveUpload` before opening a stream, so no
    /// payload waits in memory. Each upload holds one spool file (model-sized, on disk) and a
    /// stream window and a chunk or two in memory, so this bounds disk use, receive CPU and
    /// memory whatever the number of clients. Receiving is CPU-bound (hash, checks), so more
    /// than about twice the cores buys nothing.
    pub max_concurrent_uploads: usize,
    /// `ReserveUpload` calls that may wait for one of the `max_concurrent_uploads` slots; one
    /// more is answered "retry after" at once (so is a wait that reaches `long_poll`). A waiting
    /// reservation is a pending unary call holding no payload (a few KiB), so the bound can be
    /// the number of clients expected to upload at once: refused reservations come back
    /// polling. 0 answers "retry after" whenever every slot is busy. (Before `ReserveUpload`,
    /// this bounded upload streams waiting for a slot, each holding a 1 MiB stream window.)
    pub upload_queue: usize,
    /// Longest an upload stream may stay silent between two messages before it is closed with
    /// DEADLINE_EXCEEDED, so a client that sends a header and then nothing cannot hold one of the
    /// `max_concurrent_uploads` slots until the round's deadline; also how long a
    /// `ReserveUpload` grant holds its slot waiting for the stream to open.
    #[serde(with = "duration")]
    pub upload_idle_timeout: Duration,
    /// Largest weight (`num_examples`) one update may claim. Each round also shares the
    /// fixed-point bound on the total weight evenly among its participants, so one update can
    /// never leave the others no room; an update above either cap is refused at its header.
    pub max_update_weight: u64,
    /// Chunk size of downloads unless a client asks otherwise (1–4 MiB).
    pub download_chunk_bytes: usize,
    /// Longest a download waits for the client to take its next chunk; a client that stops
    /// reading loses the stream then (it ends with DEADLINE_EXCEEDED, nothing more is produced).
    /// The chunks already produced stay buffered until the client resets the stream or closes
    /// its connection, and so does its download slot, so never reading costs a client its own
    /// two downloads, not the coordinator's memory.
    #[serde(with = "duration")]
    pub download_send_timeout: Duration,
    /// Longest a new connection may take from accept to its first request (TLS handshake,
    /// HTTP/2 preface, first call); one that has not got there by then is closed, so sockets
    /// that connect and send nothing, or trickle a handshake, do not pile up.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Longest a connection may go without a byte from its peer before it is closed. The
    /// server pings every third of it (at most every 30 s), and a live peer's answer counts, so
    /// only dead or hostile peers reach it.
    #[serde(with = "duration")]
    pub connection_idle_timeout: Duration,
    /// Longest any call but `UploadUpdate` may take to be answered (DEADLINE_EXCEEDED after
    /// it). Must exceed `long_poll`. Uploads are bounded by the round's deadline and
    /// `upload_idle_timeout` instead; download bodies by `download_send_timeout` per chunk.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Capacity of the bounded request queue in front of the round actor.
    pub request_queue: usize,
    /// How long shutdown waits for in-flight calls before it stops anyway.
    #[serde(with = "duration")]
    pub drain_grace: Duration,
    /// Stop serving this long after the federation finished (all rounds done), so that agents
    /// still polling learn it is over. `None` keeps serving until a signal.
    #[serde(default, with = "optional_duration")]
    pub exit_after_finished: Option<Duration>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            health_listen: None,
            operator_listen: None,
            metrics_token_file: None,
            long_poll: Duration::from_secs(20),
            max_concurrent_uploads: 4,
            upload_queue: 1024,
            upload_idle_timeout: Duration::from_secs(30),
            max_update_weight: 10_000_000,
            download_chunk_bytes: DEFAULT_CHUNK_BYTES,
            download_send_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            connection_idle_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(60),
            request_queue: 256,
            drain_grace: Duration::from_secs(30),
            exit_after_finished: None,
        }
    }
}

impl ServerSettings {
    /// Checks every `server.*` value and the listeners against each other; the error names the
    /// key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        duration_up_to("server.long_poll", self.long_poll, Duration::from_secs(300))?;
        if self.max_concurrent_uploads == 0 {
            return Err(SettingsError::invalid("server.max_concurrent_uploads", "must be at least 1"));
        }
        duration_up_to("server.upload_idle_timeout", self.upload_idle_timeout, Duration::from_secs(600))?;
        if !(1..=MAX_NUM_EXAMPLES).contains(&self.max_update_weight) {
            return Err(SettingsError::invalid(
                "server.max_update_weight",
                format!("must be between 1 and {MAX_NUM_EXAMPLES}"),
            ));
        }
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&self.download_chunk_bytes) {
            return Err(SettingsError::invalid(
                "server.download_chunk_bytes",
                format!("must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES}"),
            ));
        }
        duration_up_to("server.download_send_timeout", self.download_send_timeout, Duration::from_secs(600))?;
        duration_up_to("server.handshake_timeout", self.handshake_timeout, Duration::from_secs(300))?;
        duration_up_to(
            "server.connection_idle_timeout",
            self.connection_idle_timeout,
            Duration::from_secs(3600),
        )?;
        if self.request_timeout <= self.long_poll || self.request_timeout > Duration::from_secs(3600) {
            return Err(SettingsError::invalid(
                "server.request_timeout",
                format!("must exceed server.long_poll ({:?}) and be at most 1h", self.long_poll),
            ));
        }
        if self.request_queue == 0 {
            return Err(SettingsError::invalid("server.request_queue", "must be at least 1"));
        }
        // Two listeners on one port would fail to bind at start-up, or (one on 0.0.0.0) take
        // each other's connections: refused here, naming the key.
        let clash = |a: SocketAddr, b: SocketAddr| {
            let overlaps = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
            a.port() != 0 && a.port() == b.port() && overlaps
        };
        if let Some(h) = self.health_listen {
            if clash(h, self.listen) {
                return Err(SettingsError::invalid(
                    "server.health_listen",
                    format!("must not be server.listen's port ({})", self.listen),
                ));
            }
        }
        if let Some(o) = self.operator_listen {
            for (other, key) in
                [(Some(self.listen), "server.listen"), (self.health_listen, "server.health_listen")]
            {
                if let Some(other) = other.filter(|&other| clash(o, other)) {
                    return Err(SettingsError::invalid(
                        "server.operator_listen",
                        format!("must not be {key}'s port ({other})"),
                    ));
                }
            }
        }
        if let Some(file) = &self.metrics_token_file {
            if self.operator_listen.is_none() {
                return Err(SettingsError::invalid(
                    "server.metrics_token_file",
                    "protects /metrics on the operator port: set server.operator_listen too",
                ));
            }
            if file.as_os_str().is_empty() {
                return Err(SettingsError::invalid("server.metrics_token_file", "must not be empty"));
            }
        }
        Ok(())
    }
}
