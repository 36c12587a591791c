//! The border between wire types ([`crate::pb`]) and domain types ([`crate::round`],
//! [`crate::ids`], [`crate::params`]).
//!
//! Inbound conversions are `TryFrom<pb::X>` and do all structural validation: required
//! submessages present, enums known (never `UNSPECIFIED`, except `FitConfig.lr_schedule`, where
//! a coordinator that predates the field means the default, constant), digests 32 bytes, numbers
//! finite and in range, chunk sizes within [`MAX_CHUNK_BYTES`]. Rules that need coordinator state (is this the
//! current round? the expected manifest?) are checked later by the coordinator. Outbound
//! conversions are infallible `From<domain> for pb::X`.
//!
//! One file per part of the protocol: `model` (manifests, downloads), `join`, `tasks`,
//! `heartbeat`, `upload`, `reports` (evaluation, failures), `status`, `secagg` (secure
//! aggregation; its step messages convert with the round's context, `X::from_pb(msg, &ctx)`);
//! the error type and the small validators they share live here.

mod heartbeat;
mod join;
mod model;
mod reports;
mod secagg;
mod status;
mod tasks;
#[cfg(test)]
mod tests;
mod upload;

pub use heartbeat::activity_to_pb;
pub use secagg::{awaited_step_from_pb, awaited_step_to_pb};
pub use tasks::phase_to_pb;
pub use upload::MAX_NUM_EXAMPLES;
// Enum decoders shared by several messages.
use heartbeat::activity_from;
use tasks::phase_from;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::chunk::MAX_CHUNK_BYTES;
use crate::ids::{ClientId, IdError, ModelVersion, RoundId, Sha256};
use crate::params::{Manifest, ParamsError, TensorSpec};
use crate::pb;
use crate::round::*;

/// A wire message that does not describe a valid domain value. The message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A required field or submessage is absent.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// A field holds a value outside what the protocol allows.
    #[error("field `{field}` is invalid: {reason}")]
    Invalid {
        /// Field path, e.g. `header.num_examples`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An identifier or digest is malformed.
    #[error(transparent)]
    Id(#[from] IdError),
    /// A manifest is malformed.
    #[error(transparent)]
    Manifest(#[from] ParamsError),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConvertError {
    ConvertError::Invalid { field, reason: reason.into() }
}

fn digest(field: &'static str, bytes: &[u8]) -> Result<Sha256, ConvertError> {
    Sha256::from_slice(bytes).map_err(|e| invalid(field, e.to_string()))
}

fn finite_metrics(
    field: &'static str,
    metrics: impl IntoIterator<Item = (String, f64)>,
) -> Result<BTreeMap<String, f64>, ConvertError> {
    let mut out = BTreeMap::new();
    for (k, v) in metrics {
        if k.is_empty() || k.len() > 64 {
            return Err(invalid(field, format!("metric name `{k}` must have 1–64 characters")));
        }
        if !v.is_finite() {
            return Err(invalid(field, format!("metric `{k}` is not finite")));
        }
        out.insert(k, v);
    }
    if out.len() > 64 {
        return Err(invalid(field, "more than 64 metrics"));
    }
    Ok(out)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
