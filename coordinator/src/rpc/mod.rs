//! The network edge: the gRPC service, caller authentication, and the mapping of domain errors
//! to gRPC statuses.
//!
//! # Layout
//! - [`service`]: `impl Coordinator` — convert, forward to the round actor, stream payloads.
//! - [`admission`]: upload slots reserved (`ReserveUpload`) before an upload stream opens.
//! - [`auth`]: the session token of a call (`authorization: Bearer …`); what checks it is the
//!   [`Authenticator`](crate::auth::Authenticator) seam below, in `auth`.
//! - [`body_limit`]: request bodies limited per method before they are buffered.
//! - [`connections`]: sockets admitted per address and in all, bounded in time before their
//!   handshake completes and while their peer is silent.
//! - [`latency`]: every call's latency by method and gRPC status (`fedtune_rpc_duration_seconds`).
//! - [`request_timeout`]: every call but an upload answered within `server.request_timeout`.
//! - [`status`]: the single `impl From<RoundError> for tonic::Status`.

pub mod admission;
pub mod auth;
pub mod body_limit;
pub mod connections;
pub mod latency;
pub mod request_timeout;
pub mod service;
pub mod status;
