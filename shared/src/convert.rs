//! The border between wire types ([`crate::pb`]) and domain types ([`crate::round`],
//! [`crate::ids`], [`crate::params`]).
//!
//! Inbound conversions are `TryFrom<pb::X>` and do all structural validation: required
//! submessages present, enums known (never `UNSPECIFIED`), digests 32 bytes, numbers finite and in
//! range, chunk sizes within [`MAX_CHUNK_BYTES`]. Rules that need coordinator state (is this the
//! current round? the expected manifest?) are checked later by the coordinator. Outbound
//! conversions are infallible `From<domain> for pb::X`.

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

// ---------------------------------------------------------------- manifests and models

impl TryFrom<pb::Manifest> for Manifest {
    type Error = ConvertError;
    fn try_from(m: pb::Manifest) -> Result<Self, ConvertError> {
        let mut tensors = Vec::with_capacity(m.tensors.len());
        for t in m.tensors {
            if t.name.is_empty() || t.name.len() > 256 {
                return Err(invalid("manifest.tensors.name", "names must have 1–256 characters"));
            }
            if t.dtype != pb::Dtype::F32 as i32 {
                return Err(invalid("manifest.tensors.dtype", format!("tensor `{}` is not F32", t.name)));
            }
            if t.shape.contains(&0) || t.shape.len() > 8 {
                return Err(invalid(
                    "manifest.tensors.shape",
                    format!("tensor `{}` has shape {:?}; dimensions must be ≥ 1, at most 8", t.name, t.shape),
                ));
            }
            let shape = t
                .shape
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| invalid("manifest.tensors.shape", "too large")))
                .collect::<Result<Vec<_>, _>>()?;
            tensors.push(TensorSpec { name: t.name, shape });
        }
        Ok(Manifest::new(tensors)?)
    }
}

impl From<&Manifest> for pb::Manifest {
    fn from(m: &Manifest) -> Self {
        pb::Manifest {
            tensors: m
                .tensors
                .iter()
                .map(|t| pb::TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                    dtype: pb::Dtype::F32 as i32,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::ModelRef> for ModelRef {
    type Error = ConvertError;
    fn try_from(m: pb::ModelRef) -> Result<Self, ConvertError> {
        Ok(ModelRef {
            version: ModelVersion(m.version),
            full_manifest: digest("model.full_manifest_sha256", &m.full_manifest_sha256)?,
            full_payload: digest("model.full_payload_sha256", &m.full_payload_sha256)?,
            trainable_manifest: digest("model.trainable_manifest_sha256", &m.trainable_manifest_sha256)?,
            trainable_payload: digest("model.trainable_payload_sha256", &m.trainable_payload_sha256)?,
        })
    }
}

impl From<ModelRef> for pb::ModelRef {
    fn from(m: ModelRef) -> Self {
        pb::ModelRef {
            version: m.version.0,
            full_manifest_sha256: m.full_manifest.0.to_vec().into(),
            full_payload_sha256: m.full_payload.0.to_vec().into(),
            trainable_manifest_sha256: m.trainable_manifest.0.to_vec().into(),
            trainable_payload_sha256: m.trainable_payload.0.to_vec().into(),
        }
    }
}

fn scope_from(v: i32) -> Result<ModelScope, ConvertError> {
    match pb::ModelScope::try_from(v) {
        Ok(pb::ModelScope::Full) => Ok(ModelScope::Full),
        Ok(pb::ModelScope::Trainable) => Ok(ModelScope::Trainable),
        _ => Err(invalid("scope", format!("unknown model scope {v}"))),
    }
}

fn scope_to(s: ModelScope) -> i32 {
    match s {
        ModelScope::Full => pb::ModelScope::Full as i32,
        ModelScope::Trainable => pb::ModelScope::Trainable as i32,
    }
}

impl TryFrom<pb::DownloadModelRequest> for DownloadRequest {
    type Error = ConvertError;
    fn try_from(r: pb::DownloadModelRequest) -> Result<Self, ConvertError> {
        if r.offset % 4 != 0 {
            return Err(invalid("offset", format!("{} is not a multiple of 4", r.offset)));
        }
        Ok(DownloadRequest {
            version: ModelVersion(r.version),
            scope: scope_from(r.scope)?,
            offset: r.offset,
            max_chunk_bytes: (r.max_chunk_bytes != 0).then_some(r.max_chunk_bytes),
        })
    }
}

impl From<DownloadRequest> for pb::DownloadModelRequest {
    fn from(r: DownloadRequest) -> Self {
        pb::DownloadModelRequest {
            version: r.version.0,
            scope: scope_to(r.scope),
            offset: r.offset,
            max_chunk_bytes: r.max_chunk_bytes.unwrap_or(0),
        }
    }
}

impl TryFrom<pb::Chunk> for Chunk {
    type Error = ConvertError;
    fn try_from(c: pb::Chunk) -> Result<Self, ConvertError> {
        if c.data.is_empty() {
            return Err(invalid("chunk.data", "empty chunk"));
        }
        if c.data.len() > MAX_CHUNK_BYTES {
            return Err(invalid(
                "chunk.data",
                format!("{} bytes exceed the {MAX_CHUNK_BYTES}-byte chunk limit", c.data.len()),
            ));
        }
        Ok(Chunk { offset: c.offset, data: c.data })
    }
}

impl From<Chunk> for pb::Chunk {
    fn from(c: Chunk) -> Self {
        pb::Chunk { offset: c.offset, data: c.data }
    }
}

impl TryFrom<pb::ModelHeader> for ModelHeader {
    type Error = ConvertError;
    fn try_from(h: pb::ModelHeader) -> Result<Self, ConvertError> {
        let manifest: Manifest = h.manifest.ok_or(ConvertError::Missing("header.manifest"))?.try_into()?;
        if h.total_bytes != manifest.byte_len() as u64 {
            return Err(invalid(
                "header.total_bytes",
                format!("{} bytes but the manifest describes {}", h.total_bytes, manifest.byte_len()),
            ));
        }
        if h.start_offset > h.total_bytes || h.start_offset % 4 != 0 {
            return Err(invalid("header.start_offset", format!("{} is not a valid offset", h.start_offset)));
        }
        Ok(ModelHeader {
            version: ModelVersion(h.version),
            scope: scope_from(h.scope)?,
            manifest,
            total_bytes: h.total_bytes,
            payload_digest: digest("header.payload_sha256", &h.payload_sha256)?,
            start_offset: h.start_offset,
        })
    }
}

impl From<&ModelHeader> for pb::ModelHeader {
    fn from(h: &ModelHeader) -> Self {
        pb::ModelHeader {
            version: h.version.0,
            scope: scope_to(h.scope),
            manifest: Some((&h.manifest).into()),
            total_bytes: h.total_bytes,
            payload_sha256: h.payload_digest.0.to_vec().into(),
            start_offset: h.start_offset,
        }
    }
}

impl TryFrom<pb::DownloadModelResponse> for DownloadItem {
    type Error = ConvertError;
    fn try_from(r: pb::DownloadModelResponse) -> Result<Self, ConvertError> {
        match r.item.ok_or(ConvertError::Missing("item"))? {
            pb::download_model_response::Item::Header(h) => Ok(DownloadItem::Header(h.try_into()?)),
            pb::download_model_response::Item::Chunk(c) => Ok(DownloadItem::Chunk(c.try_into()?)),
        }
    }
}

impl From<DownloadItem> for pb::DownloadModelResponse {
    fn from(i: DownloadItem) -> Self {
        let item = match i {
            DownloadItem::Header(h) => pb::download_model_response::Item::Header((&h).into()),
            DownloadItem::Chunk(c) => pb::download_model_response::Item::Chunk(c.into()),
        };
        pb::DownloadModelResponse { item: Some(item) }
    }
}

// ---------------------------------------------------------------- join

impl TryFrom<pb::JoinRequest> for JoinRequest {
    type Error = ConvertError;
    fn try_from(r: pb::JoinRequest) -> Result<Self, ConvertError> {
        let name = if r.client_name.is_empty() { None } else { Some(ClientId::parse(&r.client_name)?) };
        let public_key = if r.public_key.is_empty() {
            None
        } else {
            Some(<[u8; 32]>::try_from(r.public_key.as_ref()).map_err(|_| {
                invalid("public_key", format!("an Ed25519 key has 32 bytes, got {}", r.public_key.len()))
            })?)
        };
        if r.agent_version.len() > 128 {
            return Err(invalid("agent_version", "longer than 128 bytes"));
        }
        Ok(JoinRequest {
            protocol_version: r.protocol_version,
            name,
            public_key,
            train_examples: r.train_examples,
            eval_examples: r.eval_examples,
            agent_version: r.agent_version,
        })
    }
}

impl From<JoinRequest> for pb::JoinRequest {
    fn from(r: JoinRequest) -> Self {
        pb::JoinRequest {
            protocol_version: r.protocol_version,
            client_name: r.name.map(String::from).unwrap_or_default(),
            public_key: r.public_key.map(|k| k.to_vec()).unwrap_or_default().into(),
            train_examples: r.train_examples,
            eval_examples: r.eval_examples,
            agent_version: r.agent_version,
            // The join proof is attached by `crate::auth::JoinProof::attach`, not part of the
            // domain request: it is produced per attempt, after a challenge round trip.
            ..Default::default()
        }
    }
}

impl TryFrom<pb::JoinResponse> for JoinResponse {
    type Error = ConvertError;
    fn try_from(r: pb::JoinResponse) -> Result<Self, ConvertError> {
        let limits = r.limits.ok_or(ConvertError::Missing("limits"))?;
        if limits.max_chunk_bytes == 0 || limits.max_message_bytes < limits.max_chunk_bytes {
            return Err(invalid("limits", "chunk limit must be positive and fit in a message"));
        }
        if r.session_token.is_empty() {
            return Err(ConvertError::Missing("session_token"));
        }
        Ok(JoinResponse {
            client_id: ClientId::parse(&r.client_id)?,
            session_token: r.session_token,
            protocol_version: r.protocol_version,
            heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
            liveness_timeout: Duration::from_millis(r.liveness_timeout_ms),
            model: r.model.ok_or(ConvertError::Missing("model"))?.try_into()?,
            trainable_manifest: r
                .trainable_manifest
                .ok_or(ConvertError::Missing("trainable_manifest"))?
                .try_into()?,
            limits: Limits {
                max_message_bytes: limits.max_message_bytes,
                max_chunk_bytes: limits.max_chunk_bytes,
                default_chunk_bytes: limits.default_chunk_bytes,
            },
            labels: r.labels.map(|l| l.names).unwrap_or_default(),
        })
    }
}

impl From<JoinResponse> for pb::JoinResponse {
    fn from(r: JoinResponse) -> Self {
        pb::JoinResponse {
            client_id: r.client_id.into(),
            session_token: r.session_token,
            protocol_version: r.protocol_version,
            heartbeat_interval_ms: ms(r.heartbeat_interval),
            liveness_timeout_ms: ms(r.liveness_timeout),
            model: Some(r.model.into()),
            trainable_manifest: Some((&r.trainable_manifest).into()),
            limits: Some(pb::Limits {
                max_message_bytes: r.limits.max_message_bytes,
                max_chunk_bytes: r.limits.max_chunk_bytes,
                default_chunk_bytes: r.limits.default_chunk_bytes,
            }),
            labels: Some(pb::LabelSet { names: r.labels }),
            // Set by the coordinator's join handler, which knows the federation.
            federation_id: String::new(),
        }
    }
}

// ---------------------------------------------------------------- tasks

fn phase_from(v: i32) -> Result<PhaseName, ConvertError> {
    use pb::Phase as P;
    Ok(match P::try_from(v).map_err(|_| invalid("phase", format!("unknown phase {v}")))? {
        P::Idle => PhaseName::Idle,
        P::Selecting => PhaseName::Selecting,
        P::Training => PhaseName::Training,
        P::Aggregating => PhaseName::Aggregating,
        P::Publishing => PhaseName::Publishing,
        P::Evaluating => PhaseName::Evaluating,
        P::Failure => PhaseName::Failure,
        P::Finished => PhaseName::Finished,
        P::Shutdown => PhaseName::Shutdown,
        P::Unspecified => return Err(invalid("phase", "unspecified")),
    })
}

/// Wire value of a phase.
pub fn phase_to_pb(p: PhaseName) -> pb::Phase {
    match p {
        PhaseName::Idle => pb::Phase::Idle,
        PhaseName::Selecting => pb::Phase::Selecting,
        PhaseName::Training => pb::Phase::Training,
        PhaseName::Aggregating => pb::Phase::Aggregating,
        PhaseName::Publishing => pb::Phase::Publishing,
        PhaseName::Evaluating => pb::Phase::Evaluating,
        PhaseName::Failure => pb::Phase::Failure,
        PhaseName::Finished => pb::Phase::Finished,
        PhaseName::Shutdown => pb::Phase::Shutdown,
    }
}

impl TryFrom<pb::FitConfig> for FitInstructions {
    type Error = ConvertError;
    fn try_from(c: pb::FitConfig) -> Result<Self, ConvertError> {
        if c.batch_size == 0 {
            return Err(invalid("config.batch_size", "must be at least 1"));
        }
        if !(c.learning_rate.is_finite() && c.learning_rate > 0.0) {
            return Err(invalid("config.learning_rate", "must be finite and positive"));
        }
        if !(c.proximal_mu.is_finite() && c.proximal_mu >= 0.0) {
            return Err(invalid("config.proximal_mu", "must be finite and non-negative"));
        }
        Ok(FitInstructions {
            epochs: c.epochs,
            batch_size: c.batch_size,
            learning_rate: c.learning_rate,
            proximal_mu: c.proximal_mu,
            max_steps: (c.max_steps != 0).then_some(c.max_steps),
            seed: c.seed,
        })
    }
}

impl From<&FitInstructions> for pb::FitConfig {
    fn from(c: &FitInstructions) -> Self {
        pb::FitConfig {
            epochs: c.epochs,
            batch_size: c.batch_size,
            learning_rate: c.learning_rate,
            proximal_mu: c.proximal_mu,
            max_steps: c.max_steps.unwrap_or(0),
            seed: c.seed,
        }
    }
}

impl TryFrom<pb::PrivacyInstructions> for PrivacyInstructions {
    type Error = ConvertError;
    fn try_from(p: pb::PrivacyInstructions) -> Result<Self, ConvertError> {
        let mode = match pb::PrivacyMode::try_from(p.mode) {
            Ok(pb::PrivacyMode::None) => PrivacyMode::None,
            Ok(pb::PrivacyMode::Local) => PrivacyMode::Local,
            Ok(pb::PrivacyMode::Central) => PrivacyMode::Central,
            Ok(pb::PrivacyMode::Distributed) => PrivacyMode::Distributed,
            _ => return Err(invalid("privacy.mode", format!("unknown privacy mode {}", p.mode))),
        };
        if mode != PrivacyMode::None && !(p.clip_norm.is_finite() && p.clip_norm > 0.0) {
            return Err(invalid("privacy.clip_norm", "must be finite and positive"));
        }
        if !(p.noise_stddev.is_finite() && p.noise_stddev >= 0.0) {
            return Err(invalid("privacy.noise_stddev", "must be finite and non-negative"));
        }
        if let Some(k) = p.grid_log2.filter(|k| !(-200..=200).contains(k)) {
            return Err(invalid("privacy.grid_log2", format!("{k} is outside [-200, 200]")));
        }
        if !(p.indicator_noise_stddev.is_finite() && p.indicator_noise_stddev >= 0.0) {
            return Err(invalid("privacy.indicator_noise_stddev", "must be finite and non-negative"));
        }
        Ok(PrivacyInstructions {
            mode,
            clip_norm: p.clip_norm,
            noise_stddev: p.noise_stddev,
            grid_log2: p.grid_log2,
            report_clip_indicator: p.report_clip_indicator,
            indicator_noise_stddev: p.indicator_noise_stddev,
            per_layer_clipping: p.per_layer_clipping,
        })
    }
}

impl From<PrivacyInstructions> for pb::PrivacyInstructions {
    fn from(p: PrivacyInstructions) -> Self {
        let mode = match p.mode {
            PrivacyMode::None => pb::PrivacyMode::None,
            PrivacyMode::Local => pb::PrivacyMode::Local,
            PrivacyMode::Central => pb::PrivacyMode::Central,
            PrivacyMode::Distributed => pb::PrivacyMode::Distributed,
        };
        pb::PrivacyInstructions {
            mode: mode as i32,
            clip_norm: p.clip_norm,
            noise_stddev: p.noise_stddev,
            grid_log2: p.grid_log2,
            report_clip_indicator: p.report_clip_indicator,
            indicator_noise_stddev: p.indicator_noise_stddev,
            per_layer_clipping: p.per_layer_clipping,
        }
    }
}

impl TryFrom<pb::WaitForTaskResponse> for Task {
    type Error = ConvertError;
    fn try_from(r: pb::WaitForTaskResponse) -> Result<Self, ConvertError> {
        use pb::wait_for_task_response::Task as T;
        Ok(match r.task.ok_or(ConvertError::Missing("task"))? {
            T::Fit(f) => Task::Fit(FitTask {
                id: RoundId::new(f.round, f.attempt),
                model: f.model.ok_or(ConvertError::Missing("fit.model"))?.try_into()?,
                config: f.config.ok_or(ConvertError::Missing("fit.config"))?.try_into()?,
                deadline_in: Duration::from_millis(f.deadline_in_ms),
                deadline_unix_ms: f.deadline_unix_ms,
                privacy: f.privacy.ok_or(ConvertError::Missing("fit.privacy"))?.try_into()?,
            }),
            T::Evaluate(e) => {
                if e.batch_size == 0 {
                    return Err(invalid("evaluate.batch_size", "must be at least 1"));
                }
                Task::Evaluate(EvaluateTask {
                    round: e.round,
                    model: e.model.ok_or(ConvertError::Missing("evaluate.model"))?.try_into()?,
                    batch_size: e.batch_size,
                    deadline_in: Duration::from_millis(e.deadline_in_ms),
                    deadline_unix_ms: e.deadline_unix_ms,
                })
            }
            T::None(n) => Task::None {
                retry_after: Duration::from_millis(n.retry_after_ms),
                phase: phase_from(n.phase)?,
                round: n.round,
            },
            T::Finished(f) => {
                Task::Finished { final_version: ModelVersion(f.final_model_version), reason: f.reason }
            }
        })
    }
}

impl From<Task> for pb::WaitForTaskResponse {
    fn from(t: Task) -> Self {
        use pb::wait_for_task_response::Task as T;
        let task = match t {
            Task::Fit(f) => T::Fit(pb::FitTask {
                round: f.id.round,
                attempt: f.id.attempt,
                model: Some(f.model.into()),
                config: Some((&f.config).into()),
                deadline_in_ms: ms(f.deadline_in),
                deadline_unix_ms: f.deadline_unix_ms,
                privacy: Some(f.privacy.into()),
            }),
            Task::Evaluate(e) => T::Evaluate(pb::EvaluateTask {
                round: e.round,
                model: Some(e.model.into()),
                batch_size: e.batch_size,
                deadline_in_ms: ms(e.deadline_in),
                deadline_unix_ms: e.deadline_unix_ms,
            }),
            Task::None { retry_after, phase, round } => T::None(pb::NoTask {
                retry_after_ms: ms(retry_after),
                phase: phase_to_pb(phase) as i32,
                round,
            }),
            Task::Finished { final_version, reason } => {
                T::Finished(pb::Finished { final_model_version: final_version.0, reason })
            }
        };
        pb::WaitForTaskResponse { task: Some(task) }
    }
}

// ---------------------------------------------------------------- heartbeats

fn activity_from(v: i32) -> Result<ClientActivity, ConvertError> {
    use pb::ClientActivity as A;
    Ok(match A::try_from(v) {
        Ok(A::Idle) => ClientActivity::Idle,
        Ok(A::Downloading) => ClientActivity::Downloading,
        Ok(A::Training) => ClientActivity::Training,
        Ok(A::Uploading) => ClientActivity::Uploading,
        Ok(A::Evaluating) => ClientActivity::Evaluating,
        _ => return Err(invalid("activity", format!("unknown activity {v}"))),
    })
}

/// Wire value of an activity.
pub fn activity_to_pb(a: ClientActivity) -> pb::ClientActivity {
    match a {
        ClientActivity::Idle => pb::ClientActivity::Idle,
        ClientActivity::Downloading => pb::ClientActivity::Downloading,
        ClientActivity::Training => pb::ClientActivity::Training,
        ClientActivity::Uploading => pb::ClientActivity::Uploading,
        ClientActivity::Evaluating => pb::ClientActivity::Evaluating,
    }
}

impl TryFrom<pb::HeartbeatRequest> for Heartbeat {
    type Error = ConvertError;
    fn try_from(h: pb::HeartbeatRequest) -> Result<Self, ConvertError> {
        Ok(Heartbeat { activity: activity_from(h.activity)?, round: (h.round != 0).then_some(h.round) })
    }
}

impl From<Heartbeat> for pb::HeartbeatRequest {
    fn from(h: Heartbeat) -> Self {
        pb::HeartbeatRequest { activity: activity_to_pb(h.activity) as i32, round: h.round.unwrap_or(0) }
    }
}

impl TryFrom<pb::HeartbeatResponse> for HeartbeatReply {
    type Error = ConvertError;
    fn try_from(h: pb::HeartbeatResponse) -> Result<Self, ConvertError> {
        Ok(HeartbeatReply {
            phase: phase_from(h.phase)?,
            round: RoundId::new(h.round, h.attempt),
            model_version: ModelVersion(h.model_version),
            task_still_wanted: h.task_still_wanted,
        })
    }
}

impl From<HeartbeatReply> for pb::HeartbeatResponse {
    fn from(h: HeartbeatReply) -> Self {
        pb::HeartbeatResponse {
            phase: phase_to_pb(h.phase) as i32,
            round: h.round.round,
            attempt: h.round.attempt,
            model_version: h.model_version.0,
            task_still_wanted: h.task_still_wanted,
        }
    }
}

// ---------------------------------------------------------------- uploads

/// Largest FedAvg weight one update may carry. Bounding it keeps the coordinator's fixed-point
/// sum far from overflow (see `coordinator::aggregate`).
pub const MAX_NUM_EXAMPLES: u64 = (1 << 31) - 1;

impl TryFrom<pb::UpdateHeader> for UpdateHeader {
    type Error = ConvertError;
    fn try_from(h: pb::UpdateHeader) -> Result<Self, ConvertError> {
        if h.encoding != pb::UpdateEncoding::F32Delta as i32 {
            return Err(invalid("header.encoding", format!("unsupported update encoding {}", h.encoding)));
        }
        if h.num_examples == 0 || h.num_examples > MAX_NUM_EXAMPLES {
            return Err(invalid(
                "header.num_examples",
                format!("{} is outside 1..={MAX_NUM_EXAMPLES}", h.num_examples),
            ));
        }
        if h.round == 0 {
            return Err(invalid("header.round", "rounds start at 1"));
        }
        if h.total_bytes % 4 != 0 {
            return Err(invalid("header.total_bytes", "not a multiple of 4"));
        }
        Ok(UpdateHeader {
            id: RoundId::new(h.round, h.attempt),
            base_version: ModelVersion(h.base_model_version),
            num_examples: h.num_examples,
            metrics: finite_metrics("header.metrics", h.metrics)?,
            manifest_digest: digest("header.manifest_sha256", &h.manifest_sha256)?,
            total_bytes: h.total_bytes,
        })
    }
}

impl From<&UpdateHeader> for pb::UpdateHeader {
    fn from(h: &UpdateHeader) -> Self {
        pb::UpdateHeader {
            round: h.id.round,
            attempt: h.id.attempt,
            base_model_version: h.base_version.0,
            num_examples: h.num_examples,
            metrics: h.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            manifest_sha256: h.manifest_digest.0.to_vec().into(),
            total_bytes: h.total_bytes,
            encoding: pb::UpdateEncoding::F32Delta as i32,
        }
    }
}

impl TryFrom<pb::UpdateTrailer> for UpdateTrailer {
    type Error = ConvertError;
    fn try_from(t: pb::UpdateTrailer) -> Result<Self, ConvertError> {
        let signature = match (t.signature_scheme.is_empty(), t.signature.is_empty()) {
            (true, true) => None,
            (false, false) => {
                if t.signature.len() > 1024 || t.signature_scheme.len() > 32 {
                    return Err(invalid("trailer.signature", "signature or scheme too long"));
                }
                Some(UpdateSignature { scheme: t.signature_scheme, bytes: t.signature })
            }
            _ => return Err(invalid("trailer.signature", "a signature needs both a scheme and bytes")),
        };
        Ok(UpdateTrailer { payload_digest: digest("trailer.payload_sha256", &t.payload_sha256)?, signature })
    }
}

impl From<&UpdateTrailer> for pb::UpdateTrailer {
    fn from(t: &UpdateTrailer) -> Self {
        pb::UpdateTrailer {
            payload_sha256: t.payload_digest.0.to_vec().into(),
            signature_scheme: t.signature.as_ref().map(|s| s.scheme.clone()).unwrap_or_default(),
            signature: t.signature.as_ref().map(|s| s.bytes.clone()).unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::UploadUpdateRequest> for UploadItem {
    type Error = ConvertError;
    fn try_from(r: pb::UploadUpdateRequest) -> Result<Self, ConvertError> {
        use pb::upload_update_request::Item;
        Ok(match r.item.ok_or(ConvertError::Missing("item"))? {
            Item::Header(h) => UploadItem::Header(h.try_into()?),
            Item::Chunk(c) => UploadItem::Chunk(c.try_into()?),
            Item::Trailer(t) => UploadItem::Trailer(t.try_into()?),
        })
    }
}

impl From<UploadItem> for pb::UploadUpdateRequest {
    fn from(i: UploadItem) -> Self {
        use pb::upload_update_request::Item;
        let item = match i {
            UploadItem::Header(h) => Item::Header((&h).into()),
            UploadItem::Chunk(c) => Item::Chunk(c.into()),
            UploadItem::Trailer(t) => Item::Trailer((&t).into()),
        };
        pb::UploadUpdateRequest { item: Some(item) }
    }
}

impl From<UploadReceipt> for pb::UploadUpdateResponse {
    fn from(r: UploadReceipt) -> Self {
        pb::UploadUpdateResponse {
            round: r.id.round,
            attempt: r.id.attempt,
            received_bytes: r.received_bytes,
        }
    }
}

impl From<pb::UploadUpdateResponse> for UploadReceipt {
    fn from(r: pb::UploadUpdateResponse) -> Self {
        UploadReceipt { id: RoundId::new(r.round, r.attempt), received_bytes: r.received_bytes }
    }
}

// ---------------------------------------------------------------- evaluation and failures

impl TryFrom<pb::ReportEvaluationRequest> for EvalReport {
    type Error = ConvertError;
    fn try_from(r: pb::ReportEvaluationRequest) -> Result<Self, ConvertError> {
        if r.num_examples == 0 || r.num_examples > MAX_NUM_EXAMPLES {
            return Err(invalid(
                "num_examples",
                format!("{} is outside 1..={MAX_NUM_EXAMPLES}", r.num_examples),
            ));
        }
        if !(r.loss.is_finite() && r.loss >= 0.0) {
            return Err(invalid("loss", "must be finite and non-negative"));
        }
        if !(0.0..=1.0).contains(&r.accuracy) {
            return Err(invalid("accuracy", "must be in [0, 1]"));
        }
        Ok(EvalReport {
            round: r.round,
            model_version: ModelVersion(r.model_version),
            num_examples: r.num_examples,
            loss: r.loss,
            accuracy: r.accuracy,
            metrics: finite_metrics("metrics", r.metrics)?,
        })
    }
}

impl From<&EvalReport> for pb::ReportEvaluationRequest {
    fn from(r: &EvalReport) -> Self {
        pb::ReportEvaluationRequest {
            round: r.round,
            model_version: r.model_version.0,
            num_examples: r.num_examples,
            loss: r.loss,
            accuracy: r.accuracy,
            metrics: r.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

impl TryFrom<pb::ReportFailureRequest> for FailureReport {
    type Error = ConvertError;
    fn try_from(r: pb::ReportFailureRequest) -> Result<Self, ConvertError> {
        let kind = match pb::TaskKind::try_from(r.kind) {
            Ok(pb::TaskKind::Fit) => TaskKind::Fit,
            Ok(pb::TaskKind::Evaluate) => TaskKind::Evaluate,
            _ => return Err(invalid("kind", format!("unknown task kind {}", r.kind))),
        };
        let mut reason = r.reason;
        if reason.len() > 1024 {
            let mut cut = 1024;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Ok(FailureReport { id: RoundId::new(r.round, r.attempt), kind, reason })
    }
}

impl From<&FailureReport> for pb::ReportFailureRequest {
    fn from(r: &FailureReport) -> Self {
        let kind = match r.kind {
            TaskKind::Fit => pb::TaskKind::Fit,
            TaskKind::Evaluate => pb::TaskKind::Evaluate,
        };
        pb::ReportFailureRequest {
            round: r.id.round,
            attempt: r.id.attempt,
            kind: kind as i32,
            reason: r.reason.clone(),
        }
    }
}

// ---------------------------------------------------------------- status

impl From<&StatusReport> for pb::GetStatusResponse {
    fn from(s: &StatusReport) -> Self {
        pb::GetStatusResponse {
            protocol_version: s.protocol_version,
            phase: phase_to_pb(s.phase) as i32,
            round: s.round.round,
            attempt: s.round.attempt,
            model_version: s.model_version.0,
            total_rounds: s.total_rounds,
            strategy: s.strategy.clone(),
            deadline_in_ms: s.deadline_in.map(ms).unwrap_or(0),
            clients: s
                .clients
                .iter()
                .map(|c| pb::ClientStatus {
                    client_id: c.client_id.to_string(),
                    alive: c.alive,
                    last_seen_ms_ago: ms(c.last_seen_ago),
                    activity: activity_to_pb(c.activity) as i32,
                    rounds_contributed: c.rounds_contributed,
                })
                .collect(),
            recent_rounds: s
                .recent_rounds
                .iter()
                .map(|r| pb::RoundSummary {
                    round: r.id.round,
                    attempt: r.id.attempt,
                    status: r.status.clone(),
                    selected: r.selected,
                    accepted: r.accepted,
                    failed: r.failed,
                    total_examples: r.total_examples,
                    train_loss: r.train_loss,
                    eval_loss: r.eval_loss,
                    eval_accuracy: r.eval_accuracy,
                    eval_examples: r.eval_examples,
                    duration_ms: ms(r.duration),
                    reason: r.reason.clone(),
                    bytes_sent: r.bytes_sent,
                    bytes_received: r.bytes_received,
                    epsilon: r.epsilon,
                })
                .collect(),
            accepted_updates: s.accepted_updates,
            privacy: Some(pb::PrivacyStatus {
                mode: s.privacy.mode.clone(),
                guarantee: s.privacy.guarantee.clone(),
                epsilon: s.privacy.epsilon,
                delta: s.privacy.delta,
                target_epsilon: s.privacy.target_epsilon.unwrap_or(0.0),
                noise_multiplier: s.privacy.noise_multiplier,
                clip_norm: s.privacy.clip_norm,
                sampling: s.privacy.sampling.clone(),
                rounds_charged: s.privacy.rounds_charged,
            }),
            finished_reason: s.finished_reason.clone().unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::GetStatusResponse> for StatusReport {
    type Error = ConvertError;
    fn try_from(s: pb::GetStatusResponse) -> Result<Self, ConvertError> {
        Ok(StatusReport {
            protocol_version: s.protocol_version,
            phase: phase_from(s.phase)?,
            round: RoundId::new(s.round, s.attempt),
            model_version: ModelVersion(s.model_version),
            total_rounds: s.total_rounds,
            strategy: s.strategy,
            deadline_in: (s.deadline_in_ms != 0).then(|| Duration::from_millis(s.deadline_in_ms)),
            clients: s
                .clients
                .into_iter()
                .map(|c| {
                    Ok(ClientStatus {
                        client_id: ClientId::parse(&c.client_id)?,
                        alive: c.alive,
                        last_seen_ago: Duration::from_millis(c.last_seen_ms_ago),
                        activity: activity_from(c.activity)?,
                        rounds_contributed: c.rounds_contributed,
                    })
                })
                .collect::<Result<_, ConvertError>>()?,
            recent_rounds: s
                .recent_rounds
                .into_iter()
                .map(|r| RoundSummary {
                    id: RoundId::new(r.round, r.attempt),
                    status: r.status,
                    selected: r.selected,
                    accepted: r.accepted,
                    failed: r.failed,
                    total_examples: r.total_examples,
                    train_loss: r.train_loss,
                    eval_loss: r.eval_loss,
                    eval_accuracy: r.eval_accuracy,
                    eval_examples: r.eval_examples,
                    duration: Duration::from_millis(r.duration_ms),
                    reason: r.reason,
                    bytes_sent: r.bytes_sent,
                    bytes_received: r.bytes_received,
                    epsilon: r.epsilon,
                })
                .collect(),
            accepted_updates: s.accepted_updates,
            // A coordinator that does not send the field runs without DP.
            privacy: s
                .privacy
                .map(|p| PrivacyStatus {
                    mode: p.mode,
                    guarantee: p.guarantee,
                    epsilon: p.epsilon,
                    delta: p.delta,
                    target_epsilon: (p.target_epsilon > 0.0).then_some(p.target_epsilon),
                    noise_multiplier: p.noise_multiplier,
                    clip_norm: p.clip_norm,
                    sampling: p.sampling,
                    rounds_charged: p.rounds_charged,
                })
                .unwrap_or_else(PrivacyStatus::none),
            finished_reason: (!s.finished_reason.is_empty()).then_some(s.finished_reason),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> pb::UpdateHeader {
        pb::UpdateHeader {
            round: 1,
            attempt: 0,
            base_model_version: 0,
            num_examples: 10,
            metrics: [("train_loss".to_string(), 0.5)].into_iter().collect(),
            manifest_sha256: vec![1; 32].into(),
            total_bytes: 16,
            encoding: pb::UpdateEncoding::F32Delta as i32,
        }
    }

    #[test]
    fn a_valid_update_header_round_trips() {
        let domain = UpdateHeader::try_from(header()).unwrap();
        assert_eq!(pb::UpdateHeader::from(&domain), header());
    }

    #[test]
    fn update_headers_with_bad_fields_are_refused_naming_the_field() {
        type Mutation = fn(&mut pb::UpdateHeader);
        let cases: Vec<(Mutation, &str)> = vec![
            (|h| h.num_examples = 0, "num_examples"),
            (|h| h.num_examples = 1 << 31, "num_examples"),
            (|h| h.encoding = 0, "encoding"),
            (|h| h.manifest_sha256 = vec![1; 31].into(), "manifest_sha256"),
            (|h| h.round = 0, "round"),
            (|h| h.total_bytes = 15, "total_bytes"),
            (|h| _ = h.metrics.insert("x".into(), f64::NAN), "metrics"),
        ];
        for (mutate, field) in cases {
            let mut h = header();
            mutate(&mut h);
            let err = UpdateHeader::try_from(h).unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn chunks_over_the_limit_are_refused() {
        let big = pb::Chunk { offset: 0, data: vec![0; MAX_CHUNK_BYTES + 1].into() };
        assert!(Chunk::try_from(big).is_err());
        assert!(Chunk::try_from(pb::Chunk { offset: 0, data: Default::default() }).is_err());
    }

    #[test]
    fn manifests_round_trip_and_refuse_zero_dimensions() {
        let m = Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![2, 3] }]).unwrap();
        let wire = pb::Manifest::from(&m);
        assert_eq!(Manifest::try_from(wire.clone()).unwrap(), m);
        let mut bad = wire;
        bad.tensors[0].shape = vec![0, 3];
        assert!(Manifest::try_from(bad).is_err());
    }

    #[test]
    fn a_fit_task_round_trips() {
        let d = Sha256([3; 32]);
        let task = Task::Fit(FitTask {
            id: RoundId::new(4, 1),
            model: ModelRef {
                version: ModelVersion(3),
                full_manifest: d,
                full_payload: d,
                trainable_manifest: d,
                trainable_payload: d,
            },
            config: FitInstructions {
                epochs: 1,
                batch_size: 8,
                learning_rate: 1e-4,
                proximal_mu: 0.01,
                max_steps: Some(20),
                seed: 9,
            },
            deadline_in: Duration::from_secs(60),
            deadline_unix_ms: 1,
            privacy: PrivacyInstructions::NONE,
        });
        let back = Task::try_from(pb::WaitForTaskResponse::from(task.clone())).unwrap();
        assert_eq!(back, task);
    }
}
