//! The network edge: the gRPC service, caller authentication, and the mapping of domain errors
//! to gRPC statuses.
//!
//! # Layout
//! - [`service`]: `impl Coordinator` — convert, forward to the round actor, stream payloads.
//! - [`auth`]: the session token of a call (`authorization: Bearer …`); what checks it is the
//!   [`Authenticator`](crate::auth::Authenticator) seam below, in `auth`.
//! - [`body_limit`]: request bodies limited per method before they are buffered.
//! - [`status`]: the single `impl From<RoundError> for tonic::Status`.

pub mod auth;
pub mod body_limit;
pub mod service;
pub mod status;
