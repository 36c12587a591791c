//! The one place where domain errors become gRPC statuses.
//!
//! Codes are chosen so an agent can act on them (docs/protocol.md has the table): a task that is
//! over → `FAILED_PRECONDITION` (drop it, poll again); malformed input → `INVALID_ARGUMENT` (a
//! bug, do not resend the same bytes); corrupted or truncated payload → `DATA_LOSS` (resend);
//! limits → `RESOURCE_EXHAUSTED`; duplicates → `ALREADY_EXISTS`. Messages name the problem;
//! internal failures are logged here and reach the client only as "internal error".

use fedtune_shared::chunk::ChunkError;
use fedtune_shared::secagg::SecAggError;
use tonic::Status;
use tracing::error;

use crate::error::RoundError;

impl From<RoundError> for Status {
    fn from(err: RoundError) -> Self {
        use RoundError as E;
        let msg = err.to_string();
        match err {
            E::SecAgg(e) => secagg_status(&e, msg),
            E::AttemptEnded { .. } => Status::aborted(msg),
            E::NoSecureRound(_) | E::SecureStep { .. } => Status::failed_precondition(msg),
            E::WrongEncoding(_) => Status::invalid_argument(msg),
            E::Convert(_)
            | E::Protocol(_)
            | E::Misaligned { .. }
            | E::Value(_)
            | E::Int8(_)
            | E::ManifestMismatch { .. }
            | E::SizeMismatch { .. }
            | E::WeightOverCap { .. }
            | E::ChunkTooSmall { .. }
            | E::Chunk(ChunkError::OutOfOrder { .. }) => Status::invalid_argument(msg),
            E::Chunk(ChunkError::Truncated { .. }) | E::Chunk(ChunkError::DigestMismatch { .. }) => {
                Status::data_loss(msg)
            }
            E::Chunk(ChunkError::Oversize { .. })
            | E::TooLarge { .. }
            | E::TooManyExamples { .. }
            | E::Limited(_) => Status::resource_exhausted(msg),
            E::UploadIdle { .. } | E::DownloadStalled { .. } => Status::deadline_exceeded(msg),
            E::StaleRound { .. }
            | E::FutureRound { .. }
            | E::RoundClosed { .. }
            | E::Late { .. }
            | E::NotTraining { .. }
            | E::NotSelected { .. }
            | E::TaskOver { .. }
            | E::WrongBaseVersion { .. }
            | E::VersionNotServed { .. }
            | E::ProtocolVersion { .. }
            | E::NoEvaluationTask { .. }
            | E::NoUploadGrant { .. }
            | E::Refused(_) => Status::failed_precondition(msg),
            E::Duplicate { .. } | E::UploadInProgress { .. } => Status::already_exists(msg),
            E::UnknownClient(_) => Status::not_found(msg),
            E::Unauthenticated(_) | E::BadSignature(_) => Status::unauthenticated(msg),
            E::Registry(_) | E::Forbidden(_) => Status::permission_denied(msg),
            E::ShuttingDown => Status::unavailable(msg),
            E::Storage(_) | E::Internal(_) => {
                error!(cause = %msg, "internal error while serving a request");
                Status::internal("internal error")
            }
        }
    }
}

/// A refusal of the secure-aggregation core: a repeat is ALREADY_EXISTS, a message at the wrong
/// step or for another attempt FAILED_PRECONDITION, a malformed or forged one INVALID_ARGUMENT.
fn secagg_status(err: &SecAggError, msg: String) -> Status {
    use SecAggError as S;
    match err {
        S::Duplicate { .. } => Status::already_exists(msg),
        S::WrongStep(_) | S::WrongRound { .. } | S::BelowThreshold { .. } | S::NotEnoughShares { .. } => {
            Status::failed_precondition(msg)
        }
        S::Rng => {
            error!(cause = %msg, "internal error while serving a request");
            Status::internal("internal error")
        }
        _ => Status::invalid_argument(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_shared::ids::{ClientId, RoundId, Sha256};
    use tonic::Code;

    #[test]
    fn each_class_of_error_gets_its_code() {
        let c = ClientId::parse("a").unwrap();
        let r = RoundId::new(2, 0);
        let cases: Vec<(RoundError, Code)> = vec![
            (RoundError::StaleRound { got: RoundId::new(1, 0), current: r }, Code::FailedPrecondition),
            (RoundError::NotSelected { client: c.clone(), round: r }, Code::FailedPrecondition),
            (
                RoundError::Late { round: r, deadline: std::time::Duration::from_secs(1) },
                Code::FailedPrecondition,
            ),
            (
                RoundError::ManifestMismatch { expected: Sha256([0; 32]), got: Sha256([1; 32]) },
                Code::InvalidArgument,
            ),
            (
                RoundError::Chunk(ChunkError::DigestMismatch {
                    expected: Sha256([0; 32]),
                    actual: Sha256([1; 32]),
                }),
                Code::DataLoss,
            ),
            (RoundError::Chunk(ChunkError::Truncated { expected: 8, received: 4 }), Code::DataLoss),
            (RoundError::TooLarge { size: 9, limit: 8 }, Code::ResourceExhausted),
            (RoundError::Duplicate { client: c.clone(), round: r }, Code::AlreadyExists),
            (RoundError::UnknownClient(c), Code::NotFound),
            (RoundError::Unauthenticated("x".into()), Code::Unauthenticated),
            (RoundError::ShuttingDown, Code::Unavailable),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }

    #[test]
    fn internal_detail_is_not_sent() {
        let s = Status::from(RoundError::Internal("disk /var/secret full".into()));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
    }
}
