//! The messages of a secure round that are neither keys nor sealed bundles (those are in
//! [`super::keys`]): masked inputs, the unmasking request and its answers; and the envelopes
//! that carry each step's messages on the wire with the round they belong to
//! ([`crate::convert`] maps them to `fedtune.v1` messages).

use std::collections::BTreeMap;
use std::fmt;

use super::encoding::{Encoding, EncodingError};
use super::shamir::Share;
use super::{EncryptedShares, RoundContext, RoundSetup, SecAggError, SignedAgreementKey, Slot};

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

/// What a client waits for between its steps ([`StepInput`] is the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AwaitedStep {
    /// The keys neighbours made for it (advertising closed).
    PeerKeys,
    /// The bundles addressed to it and the sharers (sharing closed).
    Shares,
    /// The unmasking request (masked inputs closed).
    Unmask,
}

impl fmt::Display for AwaitedStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AwaitedStep::PeerKeys => "peer keys",
            AwaitedStep::Shares => "delivered shares",
            AwaitedStep::Unmask => "unmasking request",
        })
    }
}

/// The coordinator's answer to a client waiting for a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepInput {
    /// [`AwaitedStep::PeerKeys`] is ready.
    PeerKeys(PeerKeys),
    /// [`AwaitedStep::Shares`] is ready.
    Shares(ShareDelivery),
    /// [`AwaitedStep::Unmask`] is ready.
    Unmask(RoundUnmaskRequest),
    /// Not ready before the wait ran out: ask again.
    Pending,
}

impl StepInput {
    /// Which step this input is for (`None` for [`StepInput::Pending`]).
    pub fn step(&self) -> Option<AwaitedStep> {
        match self {
            StepInput::PeerKeys(_) => Some(AwaitedStep::PeerKeys),
            StepInput::Shares(_) => Some(AwaitedStep::Shares),
            StepInput::Unmask(_) => Some(AwaitedStep::Unmask),
            StepInput::Pending => None,
        }
    }
}

/// The secure-aggregation part of a fit task: the round set-up and the encoding parameters every
/// party derives the same [`Encoding`] from.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureTask {
    /// The round set-up (its digest binds every message of the round).
    pub setup: RoundSetup,
    /// Grid exponent k.
    pub grid_log2: i32,
    /// Clip bound C of each update.
    pub clip_norm: f64,
    /// Each client's noise share, in grid steps (0 unless distributed noise).
    pub noise_sigma_grid: f64,
    /// The wrap-around probability β the encoding is held to.
    pub max_wrap_probability: f64,
}

impl SecureTask {
    /// The round's encoding: the vector length from the set-up, the bound covering every member.
    /// The coordinator and each client call this with the same task, so they agree on the grid,
    /// the norm check and the decoding band.
    pub fn encoding(&self) -> Result<Encoding, EncodingError> {
        Encoding::new(
            self.clip_norm,
            self.grid_log2,
            self.setup.vector_len,
            self.setup.members.len(),
            self.noise_sigma_grid,
            self.max_wrap_probability,
        )
    }
}
