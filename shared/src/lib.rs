//! `fedtune-shared`: the vocabulary the coordinator and the client agents share.
//!
//! Nothing in this crate links libtorch: the coordinator depends on it and must stay a small
//! binary that any server can run. Model weights cross crate boundaries as a
//! [`params::ParameterVector`] (a flat `f32` buffer plus a [`params::Manifest`] naming each
//! tensor and its shape), never as framework tensors.
//!
//! # Layout
//! - [`params`]: parameter vectors, manifests, digests, safetensors in and out.
//! - [`telemetry`]: tracing set-up shared by both binaries.
//! - [`shutdown`]: one shutdown path (SIGINT/SIGTERM → cancellation token).

pub mod params;
pub mod shutdown;
pub mod telemetry;
