//! `fedtune-shared`: the vocabulary the coordinator and the client agents share.
//!
//! Nothing in this crate links libtorch: the coordinator depends on it and must stay a small
//! binary that any server can run. Model weights cross crate boundaries as a
//! [`params::ParameterVector`] (a flat `f32` buffer plus a [`params::Manifest`] naming each
//! tensor and its shape), never as framework tensors.
//!
//! # Layout
//! - [`labels`]: the class-id order of label names, the same on every client.
//! - [`limits`]: the protocol's limits (update value bound, chunk and message sizes, name
//!   alphabet), defined once; a client learns the ones it must respect from `JoinResponse`.
//! - [`auth`]: join challenge, join proof and enrollment messages (validated), and what an update
//!   signature covers (`update_statement`, `sign_upload`, `verify_upload`).
//! - [`crypto`]: identities (Ed25519), signed updates and join challenges, session and
//!   enrollment tokens, TLS configuration; all on ring.
//! - [`ids`]: `ClientId`, `RoundId`, `ModelVersion`, `Sha256`.
//! - [`round`]: domain messages of the round protocol (tasks, uploads, reports, status).
//! - [`schedule`]: the local learning-rate schedule (constant, linear, cosine; warm-up), the
//!   factor of every optimizer step.
//! - [`convert`]: `TryFrom<pb::…>` (validation) and `From<domain>` for the wire types.
//! - [`chunk`]: chunk limits, incremental SHA-256, checked reassembly, payload views.
//! - [`compression`]: the `INT8_BLOCK` update encoding (blocks of 256 i8 codes under an f32
//!   scale, unbiased stochastic rounding): encoder, streaming check, decode rule.
//! - [`params`]: parameter vectors, manifests, digests, safetensors in and out.
//! - [`privacy`]: user-level DP-FedAvg: clipping, exact discrete Gaussian noise on a fixed-point
//!   grid (OS-seeded ChaCha20), adaptive clipping, RDP accountant and calibration.
//! - [`secagg`]: secure aggregation (SecAgg+) protocol core: signed per-neighbour X25519 keys,
//!   Shamir sharing, ChaCha20 masks in Z_2^32, the client and coordinator state machines.
//! - [`bert`]: BERT tensor names, the train scope (which tensors a federation trains), and the
//!   Hugging Face export both binaries write.
//! - [`files`]: crash-safe writes (temporary, fsync, rename) of files and directories.
//! - [`endpoint`]: URL + TLS options → tonic endpoint, for every caller of a coordinator.
//! - [`clock`]: wall-clock milliseconds and seconds for records that outlive a process.
//! - [`pb`]: generated wire types and gRPC stubs (`proto/fedtune/v1`); the only module naming them.
//! - [`settings`]: layered TOML + `FEDTUNE__…` env + CLI configuration, human durations.
//! - [`telemetry`]: tracing set-up shared by both binaries.
//! - [`shutdown`]: one shutdown path (SIGINT/SIGTERM → cancellation token).

// Every public item says what it is for (ARCHITECTURE principle 14); CI denies warnings.
#![warn(missing_docs)]

pub mod auth;
pub mod bert;
pub mod chunk;
pub mod clock;
pub mod compression;
pub mod convert;
pub mod crypto;
pub mod endpoint;
pub mod files;
pub mod ids;
pub mod labels;
pub mod limits;
pub mod params;
pub mod pb;
pub mod privacy;
pub mod round;
pub mod schedule;
pub mod secagg;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
