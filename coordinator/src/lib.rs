//! `fedtune-coordinator`: one per federation. Samples clients, folds their updates into a
//! fixed-point running sum as they stream in (memory O(model), never O(clients × model)), applies
//! the aggregation strategy, checkpoints, and publishes each new global model version. It never
//! links libtorch: weights are named f32 tensors, safetensors in and out.
//!
//! The binary is thin: [`run`] takes validated [`CoordinatorSettings`], a bound listener and a
//! cancellation token, so tests run the real server on `127.0.0.1:0`.
//!
//! # Layout
//! - [`server`]: `run` / `run_with` (+ [`Seams`]: authenticator, signature verifier, TLS):
//!   storage, actor and gRPC service wired, one shutdown path with a drain.
//! - [`settings`]: `CoordinatorSettings` (TOML + `FEDTUNE__…` env + flags), `validate()`; the
//!   lowest layer (it names no other module), with `[privacy]` and `[security]` as submodules.
//! - [`cli`]: the clap parse tree and `serve`'s flags.
//! - [`operator`]: what an operator runs against a federation from outside the server
//!   (`status` over gRPC, `export` from a state directory); `cli` and `simulate` both call it.
//! - [`outcome`]: how an attempt and each participant ended (typed; stable stored strings).
//! - [`round`]: the round state machine (actor), one file per phase under `round/phases/`,
//!   bounded request channel, `watch` events.
//! - [`rpc`]: gRPC service, session tokens, the single error → status mapping.
//! - [`registry`]: known clients, sessions, heartbeats and liveness.
//! - [`sampling`]: fraction / fixed / Poisson draws, seeded and recorded.
//! - [`aggregate`]: value checks and the order-independent fixed-point running sum.
//! - [`spool`]: on-disk staging of in-flight uploads (validate, then fold).
//! - [`strategy`]: `Strategy` trait; FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad.
//! - [`model`]: the global model (HF names), trainable split, initial model, HF export.
//! - [`privacy`]: differential privacy: the guarantee, status monitor, the `privacy` /
//!   `calibrate` commands; the decorator itself is [`strategy::dp`], the ledger record
//!   [`storage::ledger`].
//! - [`storage`]: SQLite records and checkpoint files; crash-consistent round commits; every SQL
//!   statement of the crate (allowlist and ledger included).
//! - [`bootstrap`]: fresh state directory vs resume after the last committed round.
//! - [`error`]: `RoundError`, every way a request can fail.
//! - [`fd_limit`]: the file-descriptor bound of a configuration (`max_connections` plus a
//!   margin), checked against `RLIMIT_NOFILE` (raised to the hard limit) before `run` serves.
//! - [`auth`]: the `Authenticator` / `UpdateVerifier` seams, the client allowlist and
//!   enrollment tokens, join challenge + HMAC sessions + update signature checks
//!   (`ClientAuth`), call limits.
//! - [`cli_clients`]: the `clients` (allowlist, enrollment tokens) and `certs` subcommands.
//! - [`certs`]: development PKI (CA, server and client certificates via rcgen) and the server's
//!   tonic TLS / mutual-TLS configuration.
//! - [`telemetry`]: every Prometheus metric's name, kind and help, and the functions that
//!   record them where their events happen (phases, RPC layer, upload handler, fold).
//! - [`operator_http`]: the operator's HTTP port (`server.operator_listen`): `/metrics` and the
//!   token-protected status page, both from the operator `StatusReport`.
//! - [`simulate`]: `simulate`: a local federation (coordinator + client processes), sharded data, per-round report.

// Every public item says what it is for (ARCHITECTURE principle 14); CI denies warnings.
#![warn(missing_docs)]

pub mod aggregate;
pub mod auth;
pub mod bootstrap;
pub mod certs;
pub mod cli;
pub mod cli_clients;
pub mod error;
pub mod fd_limit;
pub mod model;
pub mod operator;
pub mod operator_http;
pub mod outcome;
pub mod privacy;
pub mod registry;
pub mod round;
pub mod rpc;
pub mod sampling;
pub mod server;
pub mod settings;
pub mod simulate;
pub mod spool;
pub mod storage;
pub mod strategy;
pub mod telemetry;

pub use server::{run, run_with, RunError, Seams};
pub use settings::CoordinatorSettings;
