//! The coordinator's side of a secure round: it checks and routes what clients send, folds the
//! masked vectors into a running sum as they arrive, and at the end removes the masks.
//!
//! The coordinator never holds an unmasked individual vector: the running sum is all it keeps of
//! the inputs, and [`Aggregator::finish`] consumes the aggregator, so a round is unmasked at most
//! once. Every refusal leaves the state as it was: a bad message changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::masking::{apply_mask, fold_into, pairwise_sign, MaskSeed, MaskSign};
use super::messages::{MaskedInput, RevealedShares, UnmaskAnswer, UnmaskRequest};
use super::shamir::{Scheme, Share};
use super::{EncryptedShares, RoundContext, SecAggError, SignedAgreementKey, Slot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Advertising,
    Sharing,
    Masking,
    Unmasking,
}

/// The coordinator's state for one secure round.
#[derive(Debug)]
pub struct Aggregator {
    ctx: Arc<RoundContext>,
    step: Step,
    /// Per owner that advertised, its keys by peer.
    keys: BTreeMap<Slot, BTreeMap<Slot, SignedAgreementKey>>,
    /// Per client that shared, its sealed bundles by recipient.
    bundles: BTreeMap<Slot, BTreeMap<Slot, EncryptedShares>>,
    /// Per client that shared, the holders of its secrets (recipients and itself).
    holders: BTreeMap<Slot, BTreeSet<Slot>>,
    sum: Vec<u32>,
    survivors: BTreeSet<Slot>,
    answered: BTreeSet<Slot>,
    /// Per survivor, the shares of its self-mask seed received.
    self_shares: BTreeMap<Slot, Vec<Share>>,
    /// Per (dropped client, surviving peer), the shares of their pairwise seed received.
    pair_shares: BTreeMap<(Slot, Slot), Vec<Share>>,
}

impl Aggregator {
    /// A round about to collect agreement keys.
    pub fn new(ctx: Arc<RoundContext>) -> Self {
        Aggregator {
            ctx,
            step: Step::Advertising,
            keys: BTreeMap::new(),
            bundles: BTreeMap::new(),
            holders: BTreeMap::new(),
            sum: Vec::new(),
            survivors: BTreeSet::new(),
            answered: BTreeSet::new(),
            self_shares: BTreeMap::new(),
            pair_shares: BTreeMap::new(),
        }
    }

    fn expect(&self, step: Step, what: &'static str) -> Result<(), SecAggError> {
        if self.step == step {
            Ok(())
        } else {
            Err(SecAggError::WrongStep(what))
        }
    }

    /// Step 1: a client's advertisement, one signed key per neighbour, all verified.
    pub fn accept_keys(&mut self, owner: Slot, keys: Vec<SignedAgreementKey>) -> Result<(), SecAggError> {
        self.expect(Step::Advertising, "advertising keys")?;
        self.ctx.check_slot("advertiser", owner)?;
        if self.keys.contains_key(&owner) {
            return Err(SecAggError::Duplicate { what: "key advertisement", slot: owner });
        }
        let mut by_peer = BTreeMap::new();
        for key in keys {
            if key.owner != owner {
                return Err(SecAggError::UnknownClient { what: "agreement key owner", slot: key.owner });
            }
            key.verify(&self.ctx)?;
            let peer = key.peer;
            if by_peer.insert(peer, key).is_some() {
                return Err(SecAggError::Duplicate { what: "agreement key", slot: peer });
            }
        }
        if !by_peer.keys().copied().eq(self.ctx.graph().neighbours(owner).iter().copied()) {
            return Err(SecAggError::Inconsistent(format!(
                "{owner} did not advertise one key per neighbour"
            )));
        }
        self.keys.insert(owner, by_peer);
        Ok(())
    }

    /// Ends step 1; fails the round if fewer than t clients advertised.
    pub fn close_advertising(&mut self) -> Result<Vec<Slot>, SecAggError> {
        self.expect(Step::Advertising, "closing advertising")?;
        let t = self.ctx.threshold();
        if self.keys.len() < t {
            return Err(SecAggError::BelowThreshold { stage: "advertising", have: self.keys.len(), need: t });
        }
        self.step = Step::Sharing;
        Ok(self.keys.keys().copied().collect())
    }

    /// The keys to deliver to `recipient`: each advertiser's key made for it.
    pub fn keys_for(&self, recipient: Slot) -> Vec<SignedAgreementKey> {
        self.keys.values().filter_map(|by_peer| by_peer.get(&recipient).cloned()).collect()
    }

    /// Step 2: a client's sealed bundles, one for each neighbour that advertised.
    pub fn accept_shares(&mut self, sender: Slot, bundles: Vec<EncryptedShares>) -> Result<(), SecAggError> {
        self.expect(Step::Sharing, "sharing")?;
        self.ctx.check_slot("share bundle sender", sender)?;
        if !self.keys.contains_key(&sender) {
            return Err(SecAggError::UnknownClient {
                what: "share bundle sender (did not advertise)",
                slot: sender,
            });
        }
        if self.bundles.contains_key(&sender) {
            return Err(SecAggError::Duplicate { what: "share bundles", slot: sender });
        }
        let mut by_recipient = BTreeMap::new();
        for bundle in bundles {
            if bundle.sender != sender {
                return Err(SecAggError::UnknownClient { what: "share bundle sender", slot: bundle.sender });
            }
            let r = bundle.recipient;
            if !self.keys.contains_key(&r) || !self.ctx.graph().are_neighbours(sender, r) {
                return Err(SecAggError::UnknownClient { what: "share bundle recipient", slot: r });
            }
            if by_recipient.insert(r, bundle).is_some() {
                return Err(SecAggError::Duplicate { what: "share bundle", slot: r });
            }
        }
        let expected = self.ctx.graph().neighbours(sender).iter().filter(|v| self.keys.contains_key(v));
        if !by_recipient.keys().eq(expected) {
            return Err(SecAggError::Inconsistent(format!(
                "{sender} did not send one bundle to each neighbour that advertised"
            )));
        }
        self.holders.insert(sender, by_recipient.keys().copied().chain([sender]).collect());
        self.bundles.insert(sender, by_recipient);
        Ok(())
    }

    /// Ends step 2 and returns the sharers; fails the round if fewer than t clients shared.
    pub fn close_sharing(&mut self) -> Result<Vec<Slot>, SecAggError> {
        self.expect(Step::Sharing, "closing sharing")?;
        let t = self.ctx.threshold();
        if self.bundles.len() < t {
            return Err(SecAggError::BelowThreshold { stage: "sharing", have: self.bundles.len(), need: t });
        }
        self.step = Step::Masking;
        self.sum = vec![0; self.ctx.vector_len()];
        Ok(self.bundles.keys().copied().collect())
    }

    /// The bundles to deliver to `recipient`, from every sharer.
    pub fn shares_for(&self, recipient: Slot) -> Vec<EncryptedShares> {
        self.bundles.values().filter_map(|by_recipient| by_recipient.get(&recipient).cloned()).collect()
    }

    /// Step 3: folds a sharer's masked vector into the running sum.
    pub fn accept_masked_input(&mut self, input: MaskedInput) -> Result<(), SecAggError> {
        self.expect(Step::Masking, "masked input")?;
        if !self.bundles.contains_key(&input.sender) {
            return Err(SecAggError::UnknownClient {
                what: "masked input sender (did not share)",
                slot: input.sender,
            });
        }
        if self.survivors.contains(&input.sender) {
            return Err(SecAggError::Duplicate { what: "masked input", slot: input.sender });
        }
        if input.values.len() != self.sum.len() {
            return Err(SecAggError::WrongLength { expected: self.sum.len(), got: input.values.len() });
        }
        fold_into(&mut self.sum, &input.values);
        self.survivors.insert(input.sender);
        Ok(())
    }

    /// Ends step 3 and returns the unmasking request; fails the round if fewer than t masked
    /// inputs arrived (their sum would not hide them).
    pub fn close_masking(&mut self) -> Result<UnmaskRequest, SecAggError> {
        self.expect(Step::Masking, "closing masking")?;
        let t = self.ctx.threshold();
        if self.survivors.len() < t {
            return Err(SecAggError::BelowThreshold {
                stage: "masking",
                have: self.survivors.len(),
                need: t,
            });
        }
        self.step = Step::Unmasking;
        Ok(UnmaskRequest {
            survivors: self.survivors.iter().copied().collect(),
            dropped: self.bundles.keys().filter(|s| !self.survivors.contains(s)).copied().collect(),
        })
    }

    /// Step 4: a survivor's answer. Every share must come from a holder of its owner's secrets,
    /// carry the holder's index, and be of the kind the owner's fate calls for; one answer per
    /// survivor.
    pub fn accept_unmask_answer(&mut self, answer: UnmaskAnswer) -> Result<(), SecAggError> {
        self.expect(Step::Unmasking, "unmasking answer")?;
        let from = answer.sender;
        if !self.survivors.contains(&from) {
            return Err(SecAggError::UnknownClient { what: "unmasking answer sender", slot: from });
        }
        if self.answered.contains(&from) {
            return Err(SecAggError::Duplicate { what: "unmasking answer", slot: from });
        }
        let wrong_index = |s: &Share| s.index() != from.share_x();
        for (owner, revealed) in &answer.shares {
            if !self.holders.get(owner).is_some_and(|h| h.contains(&from)) {
                return Err(SecAggError::UnknownClient { what: "share owner", slot: *owner });
            }
            let survived = self.survivors.contains(owner);
            match revealed {
                RevealedShares::SelfMask(s) if survived && !wrong_index(s) => {}
                RevealedShares::PairwiseSeeds(map) if !survived => {
                    let peers = &self.holders[owner];
                    if let Some((peer, _)) = map.iter().find(|(p, s)| !peers.contains(p) || wrong_index(s)) {
                        return Err(SecAggError::Inconsistent(format!(
                            "{from} revealed a pairwise share of {owner} with {peer} it cannot hold"
                        )));
                    }
                }
                _ => {
                    return Err(SecAggError::Inconsistent(format!(
                        "{from} revealed the wrong kind of share of {owner}"
                    )))
                }
            }
        }
        for (owner, revealed) in answer.shares {
            match revealed {
                RevealedShares::SelfMask(s) => self.self_shares.entry(owner).or_default().push(s),
                RevealedShares::PairwiseSeeds(map) => {
                    for (peer, s) in map.into_iter().filter(|(p, _)| self.survivors.contains(p)) {
                        self.pair_shares.entry((owner, peer)).or_default().push(s);
                    }
                }
            }
        }
        self.answered.insert(from);
        Ok(())
    }

    /// Removes the masks and returns Σ_{survivors} x_u modulo 2^32. Fails, revealing nothing, if
    /// some secret that must be removed has fewer than t shares.
    pub fn finish(self) -> Result<Vec<u32>, SecAggError> {
        self.expect(Step::Unmasking, "finishing")?;
        let t = self.ctx.threshold();
        let none = Vec::new();
        let combine = |owner: Slot, secret: String, shares: &[Share]| -> Result<MaskSeed, SecAggError> {
            if shares.len() < t {
                return Err(SecAggError::NotEnoughShares { owner, secret, have: shares.len(), need: t });
            }
            let scheme = Scheme::new(t, self.holders[&owner].iter().map(|h| h.share_x()))?;
            Ok(MaskSeed::from_bytes(scheme.combine(shares)?))
        };
        // Reconstruct every seed before touching the sum, so a failure leaves nothing half-done.
        let mut removals = Vec::new();
        for &u in &self.survivors {
            let shares = self.self_shares.get(&u).unwrap_or(&none);
            removals.push((combine(u, "self-mask seed".into(), shares)?, MaskSign::Subtract));
        }
        for (&v, holders) in self.holders.iter().filter(|(v, _)| !self.survivors.contains(v)) {
            for &w in holders.iter().filter(|w| **w != v && self.survivors.contains(w)) {
                let shares = self.pair_shares.get(&(v, w)).unwrap_or(&none);
                let seed = combine(v, format!("pairwise seed with {w}"), shares)?;
                // w applied this mask with pairwise_sign(w, v); apply the inverse.
                removals.push((seed, pairwise_sign(w, v).inverse()));
            }
        }
        let mut sum = self.sum;
        for (seed, sign) in &removals {
            apply_mask(&mut sum, seed, *sign);
        }
        Ok(sum)
    }
}
