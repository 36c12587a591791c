//! The domain errors a request can end with. `rpc::status` is the one place that maps them to
//! gRPC status codes; messages here name the problem for the client, internal detail goes to the
//! log only.

use std::time::Duration;

use fedtune_shared::chunk::ChunkError;
use fedtune_shared::convert::ConvertError;
use fedtune_shared::ids::{ClientId, ModelVersion, RoundId, Sha256};
use fedtune_shared::round::PhaseName;
use fedtune_shared::secagg::SecAggError;

use crate::aggregate::ValueError;
use crate::registry::RegistryError;
use crate::storage::StorageError;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// A secure-aggregation message was refused by the protocol core.
    #[error(transparent)]
    SecAgg(#[from] SecAggError),
    /// No secure-aggregation round is in progress.
    #[error("no secure-aggregation round is in progress{0}")]
    NoSecureRound(String),
    /// The secure attempt the message or wait belongs to has ended (or the client is not part of
    /// it any more): stop the task.
    #[error("{round} has ended for `{client}`: {reason}")]
    AttemptEnded {
        /// The attempt named.
        round: RoundId,
        /// The caller.
        client: ClientId,
        /// Why.
        reason: String,
    },
    /// An upload's encoding does not fit the round (plain in a secure round, masked in a plain
    /// one, or a masked upload for another round context).
    #[error("header.encoding: {0}")]
    WrongEncoding(String),
    /// A secure step is not open for this message yet (or any more).
    #[error("{round}: {reason}")]
    SecureStep {
        /// The round.
        round: RoundId,
        /// What is not possible now and why.
        reason: String,
    },
    /// A wire message is malformed.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// A message arrived out of protocol order (e.g. an upload without a header).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The round named is older than the current one.
    #[error("{got} is stale: the coordinator is at {current}")]
    StaleRound {
        /// Named round.
        got: RoundId,
        /// Current round.
        current: RoundId,
    },
    /// The round named has not started.
    #[error("{got} has not started: the coordinator is at {current}")]
    FutureRound {
        /// Named round.
        got: RoundId,
        /// Current round.
        current: RoundId,
    },
    /// The round is no longer accepting updates.
    #[error("{round} no longer accepts updates: {reason}")]
    RoundClosed {
        /// Round.
        round: RoundId,
        /// Why (deadline passed, aggregating, …).
        reason: String,
    },
    /// The round's deadline passed before the upload completed.
    #[error("{round}: the upload completed after the round's deadline ({deadline:?} after it started)")]
    Late {
        /// Round.
        round: RoundId,
        /// Configured deadline.
        deadline: Duration,
    },
    /// No round is training now.
    #[error("no round is accepting updates now (phase: {phase})")]
    NotTraining {
        /// Current phase.
        phase: PhaseName,
    },
    /// The client was not sampled for this round.
    #[error("client `{client}` was not selected for {round}")]
    NotSelected {
        /// Client.
        client: ClientId,
        /// Round.
        round: RoundId,
    },
    /// The client's task for this round is already over (it reported failure or was dropped).
    #[error("client `{client}` no longer has a task in {round}: {reason}")]
    TaskOver {
        /// Client.
        client: ClientId,
        /// Round.
        round: RoundId,
        /// Why.
        reason: String,
    },
    /// The update was trained from another model version.
    #[error("update was trained from model {got}, but {round} trains from {expected}")]
    WrongBaseVersion {
        /// Round.
        round: RoundId,
        /// Claimed base version.
        got: ModelVersion,
        /// Current version.
        expected: ModelVersion,
    },
    /// The update follows another tensor layout.
    #[error("update manifest {got} differs from the trainable manifest {expected}")]
    ManifestMismatch {
        /// Expected digest.
        expected: Sha256,
        /// Received digest.
        got: Sha256,
    },
    /// The announced payload size is smaller than the trainable model.
    #[error("update announces {announced} bytes but the trainable model has {expected}")]
    SizeMismatch {
        /// Announced.
        announced: u64,
        /// Expected.
        expected: u64,
    },
    /// The payload is (or would be) larger than allowed.
    #[error("update payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size seen or announced.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// A chunk stream violates the protocol (order, size, digest, truncation).
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// A chunk is not a whole number of f32 values.
    #[error("chunk at offset {offset} has {len} bytes, not a multiple of 4")]
    Misaligned {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
    },
    /// A value is NaN, infinite or out of range.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// An `INT8_BLOCK` payload breaks the format (a bad scale, code or padding, a wrong length).
    #[error("int8_block payload: {0}")]
    Int8(#[from] fedtune_shared::compression::CompressionError),
    /// The signature is missing, malformed or wrong.
    #[error("update signature rejected: {0}")]
    BadSignature(String),
    /// An upload from this client for this round was already accepted.
    #[error("an update from `{client}` for {round} was already accepted")]
    Duplicate {
        /// Client.
        client: ClientId,
        /// Round.
        round: RoundId,
    },
    /// An upload from this client for this round is in progress.
    #[error("an upload from `{client}` for {round} is already in progress")]
    UploadInProgress {
        /// Client.
        client: ClientId,
        /// Round.
        round: RoundId,
    },
    /// The round's total example count would exceed the fixed-point bound.
    #[error("accepting {weight} more examples would exceed the round's limit of {limit}")]
    TooManyExamples {
        /// Weight of the update.
        weight: u64,
        /// Limit.
        limit: u64,
    },
    /// The update claims more weight than one update may carry in this round.
    #[error(
        "header.num_examples = {weight} exceeds the per-update cap of {cap} in this round \
         (server.max_update_weight, and the round's weight bound shared among its participants)"
    )]
    WeightOverCap {
        /// Claimed weight.
        weight: u64,
        /// The cap that applied.
        cap: u64,
    },
    /// A chunk that is not the payload's last is smaller than the protocol's minimum.
    #[error(
        "chunk at offset {offset} has {len} bytes: chunks other than the last must have at least {min} bytes"
    )]
    ChunkTooSmall {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// The minimum (`MIN_CHUNK_BYTES`).
        min: usize,
    },
    /// An upload stream sent nothing for too long.
    #[error("the upload sent no message for {idle:?} (server.upload_idle_timeout): stream closed")]
    UploadIdle {
        /// The configured idle timeout.
        idle: Duration,
    },
    /// A download's client took no chunk for too long.
    #[error(
        "the client took no chunk for {timeout:?} (server.download_send_timeout): download dropped; \
         reset this stream to free its download slot"
    )]
    DownloadStalled {
        /// The configured send timeout.
        timeout: Duration,
    },
    /// An upload stream opened without a live `ReserveUpload` grant for its round attempt.
    #[error(
        "client `{client}` holds no upload grant for {round}: call ReserveUpload for this round \
         attempt first and open the upload within the grant's {ttl:?} (server.upload_idle_timeout)"
    )]
    NoUploadGrant {
        /// The uploader.
        client: ClientId,
        /// The round attempt its header names.
        round: RoundId,
        /// How long a grant lasts.
        ttl: Duration,
    },
    /// The strategy refused the update.
    #[error("{0}")]
    Refused(String),
    /// The client is unknown (or has no session since the coordinator restarted).
    #[error("client `{0}` is not registered: join first")]
    UnknownClient(ClientId),
    /// No valid session token.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is authenticated (or identified) but not allowed: not allowlisted, revoked,
    /// or an enrollment token that does not apply.
    #[error("{0}")]
    Forbidden(String),
    /// A rate, concurrency or size limit refused the call.
    #[error("{0}")]
    Limited(String),
    /// The client's pinned key differs.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The requested model version is not served.
    #[error("model {requested} is not served; the current model is {current}")]
    VersionNotServed {
        /// Requested.
        requested: ModelVersion,
        /// Current.
        current: ModelVersion,
    },
    /// The client speaks another protocol revision.
    #[error("protocol version {client} is not supported (coordinator speaks {server})")]
    ProtocolVersion {
        /// Client's.
        client: u32,
        /// Ours.
        server: u32,
    },
    /// An evaluation report that no task asked for.
    #[error("client `{client}` has no evaluation task for round {round}")]
    NoEvaluationTask {
        /// Client.
        client: ClientId,
        /// Round named.
        round: u64,
    },
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// The state directory failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Anything else internal (never sent to clients verbatim).
    #[error("internal error: {0}")]
    Internal(String),
}
