//! The client's side of a secure round, one type per step.
//!
//! Each step consumes the previous state, so a client cannot go back, redo a step with other
//! inputs, or answer the unmasking request twice: the compiler enforces the order. Secrets a
//! step no longer needs are dropped with the state that held them (the self-mask and pairwise
//! seeds are gone once the masked input is made).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ring::rand::SecureRandom as _;

use super::keys::{PairSecrets, PendingAgreement, ShareBundle};
use super::masking::{apply_mask, pairwise_sign, MaskSeed, MaskSign};
use super::messages::{MaskedInput, RevealedShares, UnmaskAnswer, UnmaskRequest};
use super::shamir::Scheme;
use super::{EncryptedShares, RoundContext, SecAggError, SignedAgreementKey, Slot};
use crate::crypto::KeyPair;

/// Step 1 done: agreement keys advertised, private halves waiting for the peers' keys.
#[derive(Debug)]
pub struct KeysAdvertised {
    ctx: Arc<RoundContext>,
    me: Slot,
    pending: BTreeMap<Slot, PendingAgreement>,
}

impl KeysAdvertised {
    /// Starts the round for the client in slot `me`: one fresh key pair per neighbour, each
    /// public key signed with `identity`, which must be the identity the roster lists for `me`.
    pub fn start(
        ctx: Arc<RoundContext>,
        me: Slot,
        identity: &KeyPair,
    ) -> Result<(Self, Vec<SignedAgreementKey>), SecAggError> {
        let registered = ctx.identity(me).ok_or(SecAggError::UnknownClient { what: "own slot", slot: me })?;
        if *registered != identity.public_key() {
            return Err(SecAggError::InvalidParameters(format!(
                "the roster lists another identity for {me} than the key this client signs with"
            )));
        }
        let mut pending = BTreeMap::new();
        let mut keys = Vec::with_capacity(ctx.graph().degree());
        for &peer in ctx.graph().neighbours(me) {
            let (private, signed) = PendingAgreement::generate(&ctx, identity, me, peer)?;
            pending.insert(peer, private);
            keys.push(signed);
        }
        Ok((KeysAdvertised { ctx, me, pending }, keys))
    }

    /// Step 2: verifies the neighbours' keys addressed to this client, agrees with each, draws
    /// the self-mask seed, and shares it and every pairwise seed t-of-(those neighbours and
    /// itself). Returns one sealed bundle per neighbour. Fails if fewer than t − 1 neighbours
    /// advertised: the client's secrets could then never be recovered.
    pub fn share(
        self,
        peer_keys: &[SignedAgreementKey],
    ) -> Result<(SharesSent, Vec<EncryptedShares>), SecAggError> {
        let KeysAdvertised { ctx, me, mut pending } = self;
        let mut pairs: BTreeMap<Slot, PairSecrets> = BTreeMap::new();
        for key in peer_keys {
            if key.peer != me {
                return Err(SecAggError::UnknownClient { what: "agreement key recipient", slot: key.peer });
            }
            key.verify(&ctx)?;
            if pairs.contains_key(&key.owner) {
                return Err(SecAggError::Duplicate { what: "agreement key", slot: key.owner });
            }
            let private = pending
                .remove(&key.owner)
                .ok_or(SecAggError::UnknownClient { what: "agreement key owner", slot: key.owner })?;
            pairs.insert(key.owner, private.agree(&ctx, me, key.owner, &key.public_key)?);
        }
        let holders: Vec<Slot> =
            pairs.keys().copied().chain([me]).collect::<BTreeSet<_>>().into_iter().collect();
        let t = ctx.threshold();
        if holders.len() < t {
            return Err(SecAggError::BelowThreshold { stage: "sharing", have: holders.len(), need: t });
        }
        let scheme = Scheme::new(t, holders.iter().map(|h| h.share_x()))?;
        let mut self_seed = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut self_seed).map_err(|_| SecAggError::Rng)?;
        let self_seed = MaskSeed::from_bytes(self_seed);

        // One bundle per holder, filled secret by secret; `split` returns holders ascending.
        let mut bundles: Vec<ShareBundle> = scheme
            .split(self_seed.expose_secret())?
            .into_iter()
            .map(|self_mask| ShareBundle { self_mask, pairwise: BTreeMap::new() })
            .collect();
        for (&peer, pair) in &pairs {
            for (bundle, share) in bundles.iter_mut().zip(scheme.split(pair.mask_seed.expose_secret())?) {
                bundle.pairwise.insert(peer, share);
            }
        }
        let mut own = None;
        let mut sealed = Vec::with_capacity(pairs.len());
        for (holder, bundle) in holders.iter().zip(bundles) {
            if *holder == me {
                own = Some(bundle);
            } else if let Some(pair) = pairs.get_mut(holder) {
                sealed.push(pair.seal(&ctx, me, *holder, &bundle)?);
            }
        }
        let own = own.ok_or(SecAggError::WrongStep("sharing without an own share"))?;
        Ok((SharesSent { ctx, me, self_seed, pairs, held: BTreeMap::from([(me, own)]) }, sealed))
    }
}

/// Step 2 done: bundles sent, seeds kept until the input is masked.
#[derive(Debug)]
pub struct SharesSent {
    ctx: Arc<RoundContext>,
    me: Slot,
    self_seed: MaskSeed,
    pairs: BTreeMap<Slot, PairSecrets>,
    held: BTreeMap<Slot, ShareBundle>,
}

impl SharesSent {
    /// Step 3: opens the bundles neighbours sent, then masks `input` with the self-mask and with
    /// the pairwise mask of every neighbour in `sharers` (the clients the coordinator says shared).
    /// Refuses a bundle from a client it has no agreement with, a second bundle from one sender,
    /// and a `sharers` list that omits this client, names a neighbour whose bundle did not come,
    /// or leaves fewer than t holders of this client's secrets.
    pub fn mask(
        self,
        incoming: &[EncryptedShares],
        sharers: &[Slot],
        input: &[u32],
    ) -> Result<(InputMasked, MaskedInput), SecAggError> {
        self.mask_in_place(incoming, sharers, input.to_vec())
    }

    /// [`SharesSent::mask`] over an owned input, masked where it lies: a client whose vector has
    /// tens of millions of coordinates keeps one copy of it, not two.
    pub fn mask_in_place(
        self,
        incoming: &[EncryptedShares],
        sharers: &[Slot],
        input: Vec<u32>,
    ) -> Result<(InputMasked, MaskedInput), SecAggError> {
        let SharesSent { ctx, me, self_seed, mut pairs, mut held } = self;
        if input.len() != ctx.vector_len() {
            return Err(SecAggError::WrongLength { expected: ctx.vector_len(), got: input.len() });
        }
        let sharers = ctx.distinct_slots("sharer", sharers)?;
        if !sharers.contains(&me) {
            return Err(SecAggError::Inconsistent(format!(
                "{me} shared but is not listed among the sharers"
            )));
        }
        for sealed in incoming {
            if sealed.recipient != me {
                return Err(SecAggError::UnknownClient {
                    what: "share bundle recipient",
                    slot: sealed.recipient,
                });
            }
            let pair = pairs
                .get_mut(&sealed.sender)
                .ok_or(SecAggError::UnknownClient { what: "share bundle sender", slot: sealed.sender })?;
            if held.contains_key(&sealed.sender) {
                return Err(SecAggError::Duplicate { what: "share bundle", slot: sealed.sender });
            }
            let bundle = pair.open(&ctx, me, sealed)?;
            if let Some(&peer) = bundle
                .pairwise
                .keys()
                .find(|&&p| p == sealed.sender || !ctx.graph().are_neighbours(sealed.sender, p))
            {
                return Err(SecAggError::UnknownClient { what: "pairwise share peer", slot: peer });
            }
            held.insert(sealed.sender, bundle);
        }
        let mut partners = Vec::new();
        for &v in &sharers {
            if v != me && pairs.contains_key(&v) {
                if !held.contains_key(&v) {
                    return Err(SecAggError::Inconsistent(format!(
                        "{v} is listed as a sharer but sent {me} nothing"
                    )));
                }
                partners.push(v);
            }
        }
        if let Some(&stray) = held.keys().find(|s| !sharers.contains(s)) {
            return Err(SecAggError::Inconsistent(format!(
                "{stray} sent shares but is not listed as a sharer"
            )));
        }
        let t = ctx.threshold();
        if partners.len() + 1 < t {
            return Err(SecAggError::BelowThreshold { stage: "masking", have: partners.len() + 1, need: t });
        }
        let mut values = input;
        apply_mask(&mut values, &self_seed, MaskSign::Add);
        for v in &partners {
            let seed = &pairs[v].mask_seed;
            apply_mask(&mut values, seed, pairwise_sign(me, *v));
        }
        Ok((InputMasked { ctx, me, sharers, held }, MaskedInput { sender: me, values }))
    }
}

/// Step 3 done: the masked input is sent; only the shares held for others remain.
#[derive(Debug)]
pub struct InputMasked {
    ctx: Arc<RoundContext>,
    me: Slot,
    sharers: BTreeSet<Slot>,
    held: BTreeMap<Slot, ShareBundle>,
}

impl InputMasked {
    /// Step 4, once: per client whose shares this client holds, reveals the self-mask share if
    /// the request lists it as a survivor, the pairwise-seed shares if it lists it as dropped.
    /// Refuses a request that does not split exactly the sharers into survivors and dropped, that
    /// counts this client as dropped, or that leaves fewer than t survivors among the clients
    /// whose shares it holds (then the sum would cover too few inputs to hide them).
    pub fn unmask(self, request: &UnmaskRequest) -> Result<UnmaskAnswer, SecAggError> {
        let InputMasked { ctx, me, sharers, held } = self;
        let survivors = ctx.distinct_slots("survivor", &request.survivors)?;
        let dropped = ctx.distinct_slots("dropped client", &request.dropped)?;
        if let Some(both) = survivors.intersection(&dropped).next() {
            return Err(SecAggError::Inconsistent(format!("{both} is listed as both survivor and dropped")));
        }
        if survivors.union(&dropped).copied().collect::<BTreeSet<_>>() != sharers {
            return Err(SecAggError::Inconsistent("survivors and dropped do not make up the sharers".into()));
        }
        if !survivors.contains(&me) {
            return Err(SecAggError::Inconsistent(format!(
                "{me} sent its masked input but is listed as dropped"
            )));
        }
        let surviving_holders = held.keys().filter(|s| survivors.contains(s)).count();
        if surviving_holders < ctx.threshold() {
            return Err(SecAggError::BelowThreshold {
                stage: "unmasking",
                have: surviving_holders,
                need: ctx.threshold(),
            });
        }
        let shares = held
            .into_iter()
            .map(|(owner, bundle)| {
                let revealed = if survivors.contains(&owner) {
                    RevealedShares::SelfMask(bundle.self_mask)
                } else {
                    RevealedShares::PairwiseSeeds(bundle.pairwise)
                };
                (owner, revealed)
            })
            .collect();
        Ok(UnmaskAnswer { sender: me, shares })
    }
}
