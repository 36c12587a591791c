//! Generated wire types and gRPC stubs for `fedtune.v1` (see `proto/fedtune/v1/`).
//!
//! This is the only module that names generated types. Everything else speaks the domain types
//! in [`crate::round`], [`crate::ids`] and [`crate::params`]; [`crate::convert`] is the border,
//! where `TryFrom<pb::…>` validates what arrives.
#![allow(missing_docs, unreachable_pub, clippy::all)]

tonic::include_proto!("fedtune.v1");

/// Protocol revision this build speaks (`JoinRequest.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;
