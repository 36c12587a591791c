//! The network edge: the gRPC service, caller authentication, and the mapping of domain errors
//! to gRPC statuses.
//!
//! # Layout
//! - [`service`]: `impl Coordinator` — convert, forward to the round actor, stream payloads.
//! - [`auth`]: session tokens (`authorization: Bearer …`) and the upload-signature seam.
//! - [`status`]: the single `impl From<RoundError> for tonic::Status`.

pub mod auth;
pub mod service;
pub mod status;
