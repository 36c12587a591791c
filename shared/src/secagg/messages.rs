//! The messages of a secure round that are neither keys nor sealed bundles (those are in
//! [`super::keys`]): masked inputs, the unmasking request and its answers; and the envelopes
//! that carry each step's messages on the wire with the round they belong to
//! ([`crate::convert`] maps them to `fedtune.v1` messages).

use std::collections::BTreeMap;

use super::shamir::Share;
use super::{EncryptedShares, RoundContext, SecAggError, SignedAgreementKey, Slot};

/// The round a wire message names: round, attempt and round-context digest. A message is only
/// used in the round it names ([`RoundRef::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundRef {
    /// The round.
    pub round: u64,
    /// The attempt.
    pub attempt: u32,
    /// The round-context digest ([`RoundContext::digest`]).
    pub context_digest: [u8; 32],
}

impl RoundRef {
    /// The reference to `ctx`'s round.
    pub fn of(ctx: &RoundContext) -> Self {
        RoundRef { round: ctx.round(), attempt: ctx.attempt(), context_digest: *ctx.digest() }
    }

    /// Refuses a message of another round, attempt or set-up than `ctx`.
    pub fn check(&self, ctx: &RoundContext) -> Result<(), SecAggError> {
        if *self == RoundRef::of(ctx) {
            Ok(())
        } else {
            Err(SecAggError::WrongRound { round: self.round, attempt: self.attempt })
        }
    }
}

/// Step 1 on the wire, client to coordinator: its signed keys, one per neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAdvertisement {
    /// The round.
    pub round: RoundRef,
    /// The keys, all of one owner, peers distinct.
    pub keys: Vec<SignedAgreementKey>,
}

/// Step 1 closed, coordinator to client: the keys neighbours made for the recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKeys {
    /// The round.
    pub round: RoundRef,
    /// The keys, all for one peer, owners distinct.
    pub keys: Vec<SignedAgreementKey>,
}

/// Step 2 on the wire, client to coordinator: its sealed bundles, one per neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareUpload {
    /// The round.
    pub round: RoundRef,
    /// The bundles, all of one sender, recipients distinct.
    pub bundles: Vec<EncryptedShares>,
}

/// Step 2 closed, coordinator to client: the bundles addressed to the recipient and who shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDelivery {
    /// The round.
    pub round: RoundRef,
    /// The bundles, all for one recipient, senders distinct.
    pub bundles: Vec<EncryptedShares>,
    /// Every client whose bundles the coordinator accepted, ascending.
    pub sharers: Vec<Slot>,
}

/// Step 4 on the wire, coordinator to client: the unmasking request and its round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundUnmaskRequest {
    /// The round.
    pub round: RoundRef,
    /// Survivors and dropped clients.
    pub request: UnmaskRequest,
}

/// Step 4 on the wire, client to coordinator: the answer and its round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundUnmaskAnswer {
    /// The round.
    pub round: RoundRef,
    /// The shares revealed.
    pub answer: UnmaskAnswer,
}

/// A client's masked vector: its quantized input plus its self-mask and its pairwise masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput {
    /// The sender.
    pub sender: Slot,
    /// One `u32` per coordinate; uniform whatever the input, to anyone without the seeds.
    pub values: Vec<u32>,
}

impl MaskedInput {
    /// The upload payload of a masked input (`UPDATE_ENCODING_MASKED_U32`): each value as four
    /// little-endian bytes, coordinate order.
    pub fn payload(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Reads an upload payload back; `None` if its length is not a whole number of values.
    pub fn from_payload(sender: Slot, payload: &[u8]) -> Option<Self> {
        if payload.len() % 4 != 0 {
            return None;
        }
        let values = payload.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Some(MaskedInput { sender, values })
    }
}

/// What a client reveals about one other client when unmasking: exactly one of the two kinds,
/// by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevealedShares {
    /// That client survived: the share of its self-mask seed.
    SelfMask(Share),
    /// That client dropped: the shares of its pairwise seeds, by the other end of each pair.
    PairwiseSeeds(BTreeMap<Slot, Share>),
}

/// A client's one answer to the unmasking request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskAnswer {
    /// Who answers (the x-coordinate of every share in it).
    pub sender: Slot,
    /// Per client whose shares the sender holds, what it reveals.
    pub shares: BTreeMap<Slot, RevealedShares>,
}

/// The coordinator's unmasking request: who sent a masked input and who shared but did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    /// Clients whose masked input is in the sum, ascending.
    pub survivors: Vec<Slot>,
    /// Clients that shared but sent no masked input, ascending.
    pub dropped: Vec<Slot>,
}
