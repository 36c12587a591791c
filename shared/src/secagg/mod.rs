//! Secure aggregation (SecAgg+): the coordinator learns the sum of the clients' quantized
//! updates and nothing else about any one of them, even when clients drop out mid-round.
//!
//! This module is the protocol core, free of I/O: message types, the client's state machine
//! ([`client`]) and the coordinator's ([`server`]). The wire, storage and round actors call it.
//! The threat model, the parameters and their costs are in `docs/secure-aggregation.md`.
//!
//! # The protocol (Bonawitz et al. CCS 2017, with Bell et al. CCS 2020's sparse graph)
//! The round's roster (client ids with their Ed25519 identities), threshold t, graph degree k,
//! graph seed and vector length form a [`RoundContext`]; its digest is inside every signature and
//! AEAD tag of the round, so no message of one round or attempt is accepted in another.
//! Clients sit in *slots*, their positions in the roster sorted by client id.
//!
//! 1. **Advertise.** Each client makes one fresh X25519 key pair per neighbour and signs each
//!    public key with its identity, binding round, owner and peer ([`keys`]).
//! 2. **Share.** Each client agrees a secret with every neighbour that advertised and derives
//!    from it, with HKDF, one AEAD key per direction and the pairwise mask seed s_{u,v} = s_{v,u}.
//!    It draws a self-mask seed b_u, and Shamir-shares b_u and every s_{u,v} t-of-(its advertised
//!    neighbours and itself) ([`shamir`]), sending each neighbour its shares sealed under their
//!    pair key. The coordinator only routes the sealed bundles.
//! 3. **Masked input.** Each client adds to its quantized vector x_u (in Z_{2^32}) the mask of
//!    b_u and, for each neighbour v that shared, + the mask of s_{u,v} if u's slot is below v's,
//!    − otherwise ([`masking`]). Pairwise masks cancel in the sum of any set containing both ends.
//!    The coordinator folds the masked vectors into a running sum as they arrive.
//! 4. **Unmask.** The coordinator names the survivors (masked input received) and the dropped
//!    (shared, no masked input). Each survivor answers with, per client whose shares it holds,
//!    the share of b if that client survived or the shares of its pairwise seeds if it dropped,
//!    never both; the type of the answer makes "both" unrepresentable and a client answers once.
//!    From t shares per secret the coordinator removes the survivors' self-masks and the dropped
//!    clients' pairwise masks with survivors: what remains is Σ_{survivors} x_u, bit for bit.
//!
//! # Why one X25519 key per neighbour
//! Bonawitz et al. secret-share each client's long-lived agreement private key, so the pairwise
//! seeds of a dropped client can be recomputed. ring, the one crypto backend of this tree, only
//! offers ephemeral X25519 keys: `agree_ephemeral` consumes the private key and it cannot be
//! exported, so it cannot be shared. Making one key pair per neighbour, each used for exactly one
//! agreement, and sharing the derived seeds s_{u,v} instead gives the coordinator exactly what it
//! would have derived from a recovered key (the dropped client's pairwise seeds) and nothing more,
//! at the cost of k public keys and signatures per client instead of one (96 bytes per neighbour).
//!
//! # Layout
//! - [`graph`]: who is whose neighbour (complete, or a random Harary graph from a public seed).
//! - [`keys`]: signed agreement keys, HKDF derivation of pair keys and seeds, sealed bundles.
//! - [`shamir`]: t-of-n sharing of 32-byte secrets over GF(2^61 − 1).
//! - [`encoding`]: clipped `f32` update → rounded, noised grid integers → Z_{2^32}, and back;
//!   the grid and the stated wrap-around probability.
//! - [`masking`]: seed → ChaCha20 mask, wrapping arithmetic in Z_{2^32}.
//! - [`messages`]: masked inputs, the unmasking request and answers, the wire envelopes.
//! - [`client`], [`server`]: the two sides' state machines.

pub mod client;
pub mod encoding;
mod error;
pub mod graph;
pub mod keys;
pub mod masking;
pub mod messages;
pub mod server;
pub mod shamir;

use std::collections::BTreeSet;
use std::fmt;

pub use client::{InputMasked, KeysAdvertised, SharesSent};
pub use encoding::{Encoding, EncodingError, EncodingLimits};
pub use error::SecAggError;
pub use graph::NeighbourGraph;
pub use keys::{EncryptedShares, SignedAgreementKey};
pub use messages::{
    AwaitedStep, KeyAdvertisement, MaskedInput, PeerKeys, RevealedShares, RoundRef, RoundUnmaskAnswer,
    RoundUnmaskRequest, SecureTask, ShareDelivery, ShareUpload, StepInput, UnmaskAnswer, UnmaskRequest,
};
pub use server::Aggregator;

use crate::crypto::{Canonical, PublicKey};
use crate::ids::ClientId;
use crate::limits::{MAX_SECAGG_CLIENTS, MAX_SECAGG_DEGREE, MAX_SECAGG_VECTOR_LEN};

/// Context label of the round-context digest.
pub const ROUND_CONTEXT_LABEL: &str = "fedtune/v1/secagg/round";

/// A client's position in the round's roster sorted by client id. Slots order the pairwise mask
/// signs, and `slot + 1` is the client's Shamir holder index.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(pub u32);

impl Slot {
    /// The position as an index.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The x-coordinate of the shares this client holds (never 0).
    pub(crate) fn share_x(self) -> u64 {
        u64::from(self.0) + 1
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What the coordinator decides before a secure round starts; the same for every party.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSetup {
    /// The federation.
    pub federation_id: String,
    /// The round.
    pub round: u64,
    /// The attempt of the round (a retry runs with fresh keys under the next attempt).
    pub attempt: u32,
    /// The sampled clients and their registered identities, in any order.
    pub members: Vec<(ClientId, PublicKey)>,
    /// t: how many shares reconstruct a secret, and the fewest clients that may remain.
    pub threshold: usize,
    /// k: neighbours per client (see [`graph::suggested_degree`]); ≥ n − 1 means all.
    pub degree: usize,
    /// The public seed of the neighbour graph.
    pub graph_seed: [u8; 32],
    /// Coordinates of every input vector.
    pub vector_len: usize,
}

/// A validated [`RoundSetup`]: the roster in slot order, the graph, and the digest every
/// signature and sealed bundle of the round is bound to.
#[derive(Debug)]
pub struct RoundContext {
    federation_id: String,
    round: u64,
    attempt: u32,
    members: Vec<(ClientId, PublicKey)>,
    threshold: usize,
    vector_len: usize,
    graph: NeighbourGraph,
    graph_seed: [u8; 32],
    digest: [u8; 32],
}

impl RoundContext {
    /// Validates the set-up: distinct ids and identities, at most [`MAX_SECAGG_CLIENTS`] clients
    /// and [`MAX_SECAGG_DEGREE`] neighbours each (what the wire carries), 2 ≤ t ≤ k + 1 (a secret
    /// is shared to a client's k neighbours and itself; t = 1 would hand each neighbour the secret
    /// outright), and 1 ≤ vector length ≤ [`MAX_SECAGG_VECTOR_LEN`].
    pub fn new(setup: RoundSetup) -> Result<Self, SecAggError> {
        let RoundSetup {
            federation_id,
            round,
            attempt,
            mut members,
            threshold,
            degree,
            graph_seed,
            vector_len,
        } = setup;
        members.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = members.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(SecAggError::InvalidParameters(format!("client `{}` is listed twice", w[0].0)));
        }
        let identities: BTreeSet<_> = members.iter().map(|m| m.1).collect();
        if identities.len() != members.len() {
            return Err(SecAggError::InvalidParameters("two clients share one identity key".into()));
        }
        if members.len() > MAX_SECAGG_CLIENTS {
            return Err(SecAggError::InvalidParameters(format!(
                "{} clients, a secure round has at most {MAX_SECAGG_CLIENTS}",
                members.len()
            )));
        }
        // Checked before the graph is built: a complete graph of many clients is large.
        // (The graph rounds an odd degree up to even; MAX_SECAGG_DEGREE is even.)
        let neighbours = degree.min(members.len().saturating_sub(1));
        if neighbours > MAX_SECAGG_DEGREE {
            return Err(SecAggError::InvalidParameters(format!(
                "{neighbours} neighbours per client, a secure round has at most {MAX_SECAGG_DEGREE}"
            )));
        }
        let graph = NeighbourGraph::new(members.len(), degree, &graph_seed)?;
        let holders = graph.degree() + 1;
        if threshold < 2 || threshold > holders {
            return Err(SecAggError::InvalidParameters(format!(
                "threshold {threshold} is outside 2..={holders} (each secret has degree + 1 = {holders} holders)"
            )));
        }
        if vector_len == 0 || vector_len > MAX_SECAGG_VECTOR_LEN {
            return Err(SecAggError::InvalidParameters(format!(
                "vector length {vector_len} is outside 1..={MAX_SECAGG_VECTOR_LEN}"
            )));
        }
        let mut ctx = RoundContext {
            federation_id,
            round,
            attempt,
            members,
            threshold,
            vector_len,
            graph,
            graph_seed,
            digest: [0; 32],
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, &ctx.canonical_bytes());
        ctx.digest.copy_from_slice(digest.as_ref());
        Ok(ctx)
    }

    /// The bytes the round-context digest is the SHA-256 of (layout in `docs/protocol.md`).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut c = Canonical::new(ROUND_CONTEXT_LABEL);
        c.str(&self.federation_id)
            .u64(self.round)
            .u64(u64::from(self.attempt))
            .u64(self.members.len() as u64);
        for (id, key) in &self.members {
            c.str(id.as_str()).fixed(key.as_bytes());
        }
        c.u64(self.threshold as u64)
            .u64(self.graph.degree() as u64)
            .fixed(&self.graph_seed)
            .u64(self.vector_len as u64);
        c.finish()
    }

    /// The federation.
    pub fn federation_id(&self) -> &str {
        &self.federation_id
    }

    /// The round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Number of clients in the roster.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a round has at least two clients.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The threshold t.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Coordinates of every input vector.
    pub fn vector_len(&self) -> usize {
        self.vector_len
    }

    /// The public seed the neighbour graph was drawn from.
    pub fn graph_seed(&self) -> &[u8; 32] {
        &self.graph_seed
    }

    /// The roster in slot order: client ids and their identity keys.
    pub fn members(&self) -> &[(ClientId, PublicKey)] {
        &self.members
    }

    /// The neighbour graph.
    pub fn graph(&self) -> &NeighbourGraph {
        &self.graph
    }

    /// SHA-256 of everything in the set-up; bound into every signature and sealed bundle.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The slot of a client, if it is in the roster.
    pub fn slot_of(&self, client: &ClientId) -> Option<Slot> {
        self.members.binary_search_by(|m| m.0.cmp(client)).ok().map(|i| Slot(i as u32))
    }

    /// The client in a slot.
    pub fn client_id(&self, slot: Slot) -> Option<&ClientId> {
        self.members.get(slot.index()).map(|m| &m.0)
    }

    /// The identity key of the client in a slot.
    pub fn identity(&self, slot: Slot) -> Option<&PublicKey> {
        self.members.get(slot.index()).map(|m| &m.1)
    }

    /// All slots, ascending.
    pub fn slots(&self) -> impl Iterator<Item = Slot> {
        (0..self.members.len() as u32).map(Slot)
    }

    /// Checks that `slot` is in the roster.
    pub(crate) fn check_slot(&self, what: &'static str, slot: Slot) -> Result<(), SecAggError> {
        if slot.index() < self.members.len() {
            Ok(())
        } else {
            Err(SecAggError::UnknownClient { what, slot })
        }
    }
    /// A list of slots as a set, refusing slots outside the roster and repetitions.
    pub(crate) fn distinct_slots(
        &self,
        what: &'static str,
        slots: &[Slot],
    ) -> Result<BTreeSet<Slot>, SecAggError> {
        let mut set = BTreeSet::new();
        for &s in slots {
            self.check_slot(what, s)?;
            if !set.insert(s) {
                return Err(SecAggError::Inconsistent(format!("{s} is listed twice as {what}")));
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyPair;

    fn setup(n: usize, threshold: usize) -> RoundSetup {
        RoundSetup {
            federation_id: "fed".into(),
            round: 1,
            attempt: 0,
            members: (0..n)
                .map(|i| {
                    (
                        ClientId::parse(&format!("c{i}")).unwrap(),
                        KeyPair::generate_ephemeral().unwrap().public_key(),
                    )
                })
                .collect(),
            threshold,
            degree: n,
            graph_seed: [0; 32],
            vector_len: 4,
        }
    }

    #[test]
    fn slots_follow_client_id_order_whatever_the_listing_order() {
        let mut s = setup(3, 2);
        s.members.reverse();
        let ctx = RoundContext::new(s).unwrap();
        let names: Vec<_> =
            ctx.slots().map(|slot| ctx.client_id(slot).unwrap().as_str().to_owned()).collect();
        assert_eq!(names, ["c0", "c1", "c2"]);
        assert_eq!(ctx.slot_of(&ClientId::parse("c2").unwrap()), Some(Slot(2)));
    }

    type Mutation = fn(&mut RoundSetup);

    #[test]
    fn impossible_set_ups_are_refused() {
        let cases: [(Mutation, &str); 7] = [
            (|s| s.threshold = 1, "t = 1"),
            (|s| s.threshold = 4, "t > k + 1"),
            (|s| s.vector_len = 0, "empty vector"),
            (|s| s.vector_len = MAX_SECAGG_VECTOR_LEN + 1, "vector too long"),
            (|s| s.members[1].0 = s.members[0].0.clone(), "duplicate id"),
            (|s| s.members[1].1 = s.members[0].1, "duplicate identity"),
            (|s| s.members.truncate(1), "one client"),
        ];
        for (mutate, what) in cases {
            let mut s = setup(3, 2);
            mutate(&mut s);
            assert!(matches!(RoundContext::new(s), Err(SecAggError::InvalidParameters(_))), "{what}");
        }
    }

    #[test]
    fn a_graph_denser_than_the_wire_carries_is_refused() {
        let n = MAX_SECAGG_DEGREE + 2;
        let complete = RoundContext::new(setup(n, 2));
        assert!(matches!(complete, Err(SecAggError::InvalidParameters(m)) if m.contains("neighbours")));
        let sparse = RoundContext::new(RoundSetup { degree: MAX_SECAGG_DEGREE, ..setup(n, 2) }).unwrap();
        assert_eq!(sparse.graph().degree(), MAX_SECAGG_DEGREE);
    }

    #[test]
    fn the_digest_changes_with_every_parameter() {
        let base = setup(3, 2);
        let d = *RoundContext::new(base.clone()).unwrap().digest();
        let variants: [fn(&mut RoundSetup); 7] = [
            |s| s.round = 2,
            |s| s.attempt = 1,
            |s| s.federation_id = "other".into(),
            |s| s.threshold = 3,
            |s| s.graph_seed = [1; 32],
            |s| s.vector_len = 5,
            |s| s.members[0].1 = KeyPair::generate_ephemeral().unwrap().public_key(),
        ];
        for mutate in variants {
            let mut s = base.clone();
            mutate(&mut s);
            assert_ne!(*RoundContext::new(s).unwrap().digest(), d);
        }
    }
}
