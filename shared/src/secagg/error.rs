//! The error type of the protocol steps of [`crate::secagg`]. The encoding has its own,
//! [`super::encoding::EncodingError`], because it reports real-valued parameters (this one is `Eq`).
//!
//! Errors name slots, stages and counts, never secret values: they end up in logs and, mapped
//! to a status, on the wire.

use super::shamir::ShamirError;
use super::Slot;

/// Everything that makes a secure-aggregation step refuse its input or fail the round.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggError {
    /// The round set-up is unusable (too few clients, impossible threshold, bad length, ...).
    #[error("invalid secure-aggregation parameters: {0}")]
    InvalidParameters(String),
    /// A message names a client that is not in the round, or not one the receiver may hear
    /// from at this step (not a neighbour, not among the clients still in the round).
    #[error("{what}: {slot} is not a client this step accepts")]
    UnknownClient {
        /// What the client was named as (sender, recipient, share owner, ...).
        what: &'static str,
        /// The slot named.
        slot: Slot,
    },
    /// A client's agreement key does not carry a valid signature of its identity over this
    /// round, this owner and this peer: forged, substituted or replayed from another round.
    #[error("the agreement key of {owner} for {peer} has no valid signature for this round")]
    BadKeySignature {
        /// Who the key claims to belong to.
        owner: Slot,
        /// Who it claims to be meant for.
        peer: Slot,
    },
    /// Something that may arrive once per client arrived twice (a key, a share bundle, a masked
    /// input, an unmasking answer).
    #[error("second {what} from {slot} refused")]
    Duplicate {
        /// The kind of message.
        what: &'static str,
        /// Its sender.
        slot: Slot,
    },
    /// A masked vector (or an input to mask) does not have the round's length.
    #[error("vector of {got} coordinates, the round aggregates {expected}")]
    WrongLength {
        /// The round's vector length.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// Too few clients remain for the step to go on without revealing an individual input or
    /// without being able to remove the masks: the round fails here.
    #[error("{stage}: {have} clients remain, the threshold is {need}")]
    BelowThreshold {
        /// The step that found it.
        stage: &'static str,
        /// Clients remaining (in the whole round or in the neighbourhood checked).
        have: usize,
        /// The threshold t.
        need: usize,
    },
    /// Not enough unmasking answers carried shares of a secret that must be removed from the sum.
    #[error("{have} shares of the {secret} of {owner} arrived, {need} are needed")]
    NotEnoughShares {
        /// Whose secret.
        owner: Slot,
        /// Which secret ("self-mask seed" or "pairwise seed with #v").
        secret: String,
        /// Shares received.
        have: usize,
        /// The threshold t.
        need: usize,
    },
    /// A share bundle did not decrypt under the pair's key, or its plaintext is malformed.
    #[error("share bundle from {sender} rejected: {reason}")]
    BadShareBundle {
        /// The bundle's sender.
        sender: Slot,
        /// Why (never the plaintext).
        reason: String,
    },
    /// The key agreement with a peer's public key failed (an invalid or low-order point).
    #[error("key agreement with {peer} failed")]
    KeyAgreement {
        /// The peer.
        peer: Slot,
    },
    /// An unmasking request or answer is inconsistent with what this party saw earlier (a
    /// client both surviving and dropped, a share of the wrong kind, ...).
    #[error("inconsistent unmasking: {0}")]
    Inconsistent(String),
    /// A message names another round, attempt or round context than the one in progress: late,
    /// replayed, or from a party that computed another set-up.
    #[error("the message is for round {round} attempt {attempt} with another round context")]
    WrongRound {
        /// The round the message names.
        round: u64,
        /// The attempt it names.
        attempt: u32,
    },
    /// The step was called out of order on the coordinator's side.
    #[error("{0} is not possible at this step")]
    WrongStep(&'static str),
    /// Secret sharing refused its input.
    #[error(transparent)]
    Shamir(#[from] ShamirError),
    /// The operating system's random generator failed.
    #[error("the operating system's random generator failed")]
    Rng,
}
