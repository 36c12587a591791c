//! The messages of a secure round that are neither keys nor sealed bundles (those are in
//! [`super::keys`]): masked inputs, the unmasking request and its answers.

use std::collections::BTreeMap;

use super::shamir::Share;
use super::Slot;

/// A client's masked vector: its quantized input plus its self-mask and its pairwise masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput {
    /// The sender.
    pub sender: Slot,
    /// One `u32` per coordinate; uniform whatever the input, to anyone without the seeds.
    pub values: Vec<u32>,
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
