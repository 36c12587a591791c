//! Secure aggregation (`secure_aggregation.proto`): the round set-up, keys, sealed bundles and
//! the unmasking exchange, to and from [`crate::secagg`]'s types.
//!
//! Slots only mean something within a roster, so inbound conversions of the step messages take
//! the [`RoundContext`] and refuse, naming the field, a slot outside the roster, more entries
//! than a client has neighbours, an entry listed twice, entries of two senders (or for two
//! recipients) in one message, and a key, signature, share or sealed bundle of the wrong length.
//! They do not check that the message is for the round in progress ([`RoundRef::check`]: a
//! stale message is a precondition failure, not a malformed one) nor anything the protocol
//! core checks with its state (signatures, who is whose neighbour, who advertised or shared).

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::crypto::{PublicKey, Signature};
use crate::limits::{is_valid_name, MAX_SECAGG_CLIENTS, MAX_SECAGG_VECTOR_LEN};
use crate::secagg::keys::sealed_bundle_len;
use crate::secagg::messages::{RoundUnmaskAnswer, RoundUnmaskRequest};
use crate::secagg::shamir::{Share, SHARE_VALUE_BYTES};
use crate::secagg::{
    AwaitedStep, EncryptedShares, KeyAdvertisement, PeerKeys, RevealedShares, RoundContext, RoundRef,
    RoundSetup, SecureTask, ShareDelivery, ShareUpload, SignedAgreementKey, Slot, StepInput, UnmaskAnswer,
    UnmaskRequest,
};

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], ConvertError> {
    <[u8; N]>::try_from(bytes).map_err(|_| invalid(field, format!("{} bytes, expected {N}", bytes.len())))
}

fn slot(field: &'static str, value: u32, ctx: &RoundContext) -> Result<Slot, ConvertError> {
    if (value as usize) < ctx.len() {
        Ok(Slot(value))
    } else {
        Err(invalid(field, format!("slot {value} is outside the roster of {} clients", ctx.len())))
    }
}

/// At most `max` entries: more than a client has neighbours (or the roster has clients) is
/// refused before any entry is looked at.
fn at_most(field: &'static str, len: usize, max: usize, what: &str) -> Result<(), ConvertError> {
    if len > max {
        return Err(invalid(field, format!("{len} entries, {what} has at most {max}")));
    }
    Ok(())
}

/// Slots strictly ascending and in the roster (so none is listed twice).
fn ascending_slots(
    field: &'static str,
    values: &[u32],
    ctx: &RoundContext,
) -> Result<Vec<Slot>, ConvertError> {
    at_most(field, values.len(), ctx.len(), "the roster")?;
    let mut out = Vec::with_capacity(values.len());
    for &v in values {
        let s = slot(field, v, ctx)?;
        if out.last().is_some_and(|last: &Slot| *last >= s) {
            return Err(invalid(field, format!("slot {v} is repeated or out of ascending order")));
        }
        out.push(s);
    }
    Ok(out)
}

/// Every entry names the same value (the owner of advertised keys, the recipient of delivered
/// bundles, ...).
fn same<T: Copy + PartialEq + std::fmt::Debug>(
    field: &'static str,
    mut values: impl Iterator<Item = T>,
) -> Result<(), ConvertError> {
    let Some(first) = values.next() else { return Ok(()) };
    if let Some(other) = values.find(|v| *v != first) {
        return Err(invalid(
            field,
            format!("entries name both {first:?} and {other:?}; one message has one"),
        ));
    }
    Ok(())
}

/// No value twice.
fn distinct<T: Ord + std::fmt::Debug>(
    field: &'static str,
    values: impl Iterator<Item = T>,
) -> Result<(), ConvertError> {
    let mut seen = BTreeSet::new();
    for v in values {
        if seen.contains(&v) {
            return Err(invalid(field, format!("{v:?} is listed twice")));
        }
        seen.insert(v);
    }
    Ok(())
}

impl RoundRef {
    /// Reads the round a message names (`round` must be present).
    pub fn from_pb(r: Option<pb::SecAggRoundRef>) -> Result<Self, ConvertError> {
        let r = r.ok_or(ConvertError::Missing("round"))?;
        if r.round == 0 {
            return Err(invalid("round.round", "rounds start at 1"));
        }
        Ok(RoundRef {
            round: r.round,
            attempt: r.attempt,
            context_digest: fixed("round.context_sha256", &r.context_sha256)?,
        })
    }
}

impl From<&RoundRef> for pb::SecAggRoundRef {
    fn from(r: &RoundRef) -> Self {
        pb::SecAggRoundRef {
            round: r.round,
            attempt: r.attempt,
            context_sha256: r.context_digest.to_vec().into(),
        }
    }
}

impl TryFrom<pb::SecAggSetup> for RoundSetup {
    type Error = ConvertError;
    /// The set-up as announced; [`RoundContext::new`] then checks the parameters against each
    /// other (threshold against degree, distinct identities).
    fn try_from(s: pb::SecAggSetup) -> Result<Self, ConvertError> {
        if !is_valid_name(&s.federation_id) {
            return Err(invalid("setup.federation_id", "not a valid federation id"));
        }
        if s.round == 0 {
            return Err(invalid("setup.round", "rounds start at 1"));
        }
        if s.members.len() < 2 || s.members.len() > MAX_SECAGG_CLIENTS {
            return Err(invalid(
                "setup.members",
                format!("{} members, a secure round has 2..={MAX_SECAGG_CLIENTS}", s.members.len()),
            ));
        }
        let mut members = Vec::with_capacity(s.members.len());
        for m in s.members {
            let id = ClientId::parse(&m.client_id)
                .map_err(|e| invalid("setup.members[].client_id", e.to_string()))?;
            let key = PublicKey::from_bytes(fixed("setup.members[].public_key", &m.public_key)?);
            members.push((id, key));
        }
        distinct("setup.members[].client_id", members.iter().map(|m| m.0.as_str()))?;
        if s.vector_len == 0 || s.vector_len > MAX_SECAGG_VECTOR_LEN as u64 {
            return Err(invalid(
                "setup.vector_len",
                format!("{} is outside 1..={MAX_SECAGG_VECTOR_LEN}", s.vector_len),
            ));
        }
        Ok(RoundSetup {
            federation_id: s.federation_id,
            round: s.round,
            attempt: s.attempt,
            members,
            threshold: s.threshold as usize,
            degree: s.degree as usize,
            graph_seed: fixed("setup.graph_seed", &s.graph_seed)?,
            vector_len: s.vector_len as usize,
        })
    }
}

impl From<&RoundContext> for pb::SecAggSetup {
    /// The set-up a context was built from (the degree as the graph has it), so a client that
    /// converts it back computes the same digest.
    fn from(ctx: &RoundContext) -> Self {
        pb::SecAggSetup {
            federation_id: ctx.federation_id().to_owned(),
            round: ctx.round(),
            attempt: ctx.attempt(),
            members: ctx
                .members()
                .iter()
                .map(|(id, key)| pb::SecAggMember {
                    client_id: id.as_str().to_owned(),
                    public_key: key.as_bytes().to_vec().into(),
                })
                .collect(),
            threshold: ctx.threshold() as u32,
            degree: ctx.graph().degree() as u32,
            graph_seed: ctx.graph_seed().to_vec().into(),
            vector_len: ctx.vector_len() as u64,
        }
    }
}

fn agreement_key(k: pb::AgreementKey, ctx: &RoundContext) -> Result<SignedAgreementKey, ConvertError> {
    let owner = slot("keys[].owner", k.owner, ctx)?;
    let peer = slot("keys[].peer", k.peer, ctx)?;
    if owner == peer {
        return Err(invalid("keys[].peer", format!("{peer} is the key's own owner")));
    }
    let signature =
        Signature::from_slice(&k.signature).map_err(|e| invalid("keys[].signature", e.to_string()))?;
    Ok(SignedAgreementKey { owner, peer, public_key: fixed("keys[].public_key", &k.public_key)?, signature })
}

fn agreement_keys(
    keys: Vec<pb::AgreementKey>,
    ctx: &RoundContext,
) -> Result<Vec<SignedAgreementKey>, ConvertError> {
    at_most("keys", keys.len(), ctx.graph().degree(), "a client's neighbourhood")?;
    keys.into_iter().map(|k| agreement_key(k, ctx)).collect()
}

impl From<&SignedAgreementKey> for pb::AgreementKey {
    fn from(k: &SignedAgreementKey) -> Self {
        pb::AgreementKey {
            owner: k.owner.0,
            peer: k.peer.0,
            public_key: k.public_key.to_vec().into(),
            signature: k.signature.as_bytes().to_vec().into(),
        }
    }
}

impl KeyAdvertisement {
    /// Step 1 as a client sent it: one owner, each peer once.
    pub fn from_pb(m: pb::AdvertiseKeysRequest, ctx: &RoundContext) -> Result<Self, ConvertError> {
        let round = RoundRef::from_pb(m.round)?;
        let keys = agreement_keys(m.keys, ctx)?;
        same("keys[].owner", keys.iter().map(|k| k.owner))?;
        distinct("keys[].peer", keys.iter().map(|k| k.peer))?;
        Ok(KeyAdvertisement { round, keys })
    }
}

impl From<&KeyAdvertisement> for pb::AdvertiseKeysRequest {
    fn from(a: &KeyAdvertisement) -> Self {
        pb::AdvertiseKeysRequest {
            round: Some((&a.round).into()),
            keys: a.keys.iter().map(Into::into).collect(),
        }
    }
}

impl PeerKeys {
    /// Step 1's keys as the coordinator delivered them: one peer, each owner once.
    pub fn from_pb(m: pb::PeerKeys, ctx: &RoundContext) -> Result<Self, ConvertError> {
        let round = RoundRef::from_pb(m.round)?;
        let keys = agreement_keys(m.keys, ctx)?;
        same("keys[].peer", keys.iter().map(|k| k.peer))?;
        distinct("keys[].owner", keys.iter().map(|k| k.owner))?;
        Ok(PeerKeys { round, keys })
    }
}

impl From<&PeerKeys> for pb::PeerKeys {
    fn from(p: &PeerKeys) -> Self {
        pb::PeerKeys { round: Some((&p.round).into()), keys: p.keys.iter().map(Into::into).collect() }
    }
}

fn sealed_shares(b: pb::SealedShares, ctx: &RoundContext) -> Result<EncryptedShares, ConvertError> {
    let sender = slot("bundles[].sender", b.sender, ctx)?;
    let recipient = slot("bundles[].recipient", b.recipient, ctx)?;
    if sender == recipient {
        return Err(invalid("bundles[].recipient", format!("{recipient} is the bundle's own sender")));
    }
    // A bundle holds the self-mask share and one pairwise share per neighbour that advertised.
    let (base, entry) = (sealed_bundle_len(0), sealed_bundle_len(1) - sealed_bundle_len(0));
    let len = b.ciphertext.len();
    let pairwise = len.checked_sub(base).filter(|extra| extra % entry == 0).map(|extra| extra / entry);
    if pairwise.is_none_or(|p| p > ctx.graph().degree()) {
        return Err(invalid(
            "bundles[].ciphertext",
            format!(
                "{len} bytes; a sealed bundle has {base} + {entry} per pairwise share, at most {} shares",
                ctx.graph().degree()
            ),
        ));
    }
    Ok(EncryptedShares { sender, recipient, ciphertext: b.ciphertext.to_vec() })
}

fn sealed_bundles(
    bundles: Vec<pb::SealedShares>,
    ctx: &RoundContext,
) -> Result<Vec<EncryptedShares>, ConvertError> {
    at_most("bundles", bundles.len(), ctx.graph().degree(), "a client's neighbourhood")?;
    bundles.into_iter().map(|b| sealed_shares(b, ctx)).collect()
}

impl From<&EncryptedShares> for pb::SealedShares {
    fn from(b: &EncryptedShares) -> Self {
        pb::SealedShares {
            sender: b.sender.0,
            recipient: b.recipient.0,
            ciphertext: b.ciphertext.clone().into(),
        }
    }
}

impl ShareUpload {
    /// Step 2 as a client sent it: one sender, each recipient once.
    pub fn from_pb(m: pb::SendSharesRequest, ctx: &RoundContext) -> Result<Self, ConvertError> {
        let round = RoundRef::from_pb(m.round)?;
        let bundles = sealed_bundles(m.bundles, ctx)?;
        same("bundles[].sender", bundles.iter().map(|b| b.sender))?;
        distinct("bundles[].recipient", bundles.iter().map(|b| b.recipient))?;
        Ok(ShareUpload { round, bundles })
    }
}

impl From<&ShareUpload> for pb::SendSharesRequest {
    fn from(u: &ShareUpload) -> Self {
        pb::SendSharesRequest {
            round: Some((&u.round).into()),
            bundles: u.bundles.iter().map(Into::into).collect(),
        }
    }
}

impl ShareDelivery {
    /// Step 2's bundles as the coordinator delivered them: one recipient, each sender once, and
    /// the sharers ascending.
    pub fn from_pb(m: pb::DeliveredShares, ctx: &RoundContext) -> Result<Self, ConvertError> {
        let round = RoundRef::from_pb(m.round)?;
        let bundles = sealed_bundles(m.bundles, ctx)?;
        same("bundles[].recipient", bundles.iter().map(|b| b.recipient))?;
        distinct("bundles[].sender", bundles.iter().map(|b| b.sender))?;
        let sharers = ascending_slots("sharers", &m.sharers, ctx)?;
        Ok(ShareDelivery { round, bundles, sharers })
    }
}

impl From<&ShareDelivery> for pb::DeliveredShares {
    fn from(d: &ShareDelivery) -> Self {
        pb::DeliveredShares {
            round: Some((&d.round).into()),
            bundles: d.bundles.iter().map(Into::into).collect(),
            sharers: d.sharers.iter().map(|s| s.0).collect(),
        }
    }
}

impl RoundUnmaskRequest {
    /// Step 4's request: survivors and dropped each ascending, no client in both.
    pub fn from_pb(m: pb::UnmaskRequest, ctx: &RoundContext) -> Result<Self, ConvertError> {
        let round = RoundRef::from_pb(m.round)?;
        let survivors = ascending_slots("survivors", &m.survivors, ctx)?;
        let dropped = ascending_slots("dropped", &m.dropped, ctx)?;
        if let Some(both) = dropped.iter().find(|d| survivors.binary_search(d).is_ok()) {
            return Err(invalid("dropped", format!("{both} is listed as a survivor too")));
        }
        Ok(RoundUnmaskRequest { round, request: UnmaskRequest { survivors, dropped } })
    }
}

impl From<&RoundUnmaskRequest> for pb::UnmaskRequest {
    fn from(r: &RoundUnmaskRequest) -> Self {
        pb::UnmaskRequest {
            round: Some((&r.round).into()),
            survivors: r.request.survivors.iter().map(|s| s.0).collect(),
            dropped: r.request.dropped.iter().map(|s| s.0).collect(),
        }
    }
}

fn share(field: &'static str, holder: Slot, bytes: &[u8]) -> Result<Share, ConvertError> {
    if bytes.len() != SHARE_VALUE_BYTES {
        return Err(invalid(field, format!("{} bytes, a share has {SHARE_VALUE_BYTES}", bytes.len())));
    }
    Share::from_value_bytes(holder.share_x(), bytes).map_err(|e| invalid(field, e.to_string()))
}

impl RoundUnmaskAnswer {
    /// Step 4's answer: owners ascending, one kind of share each, every share of the right
    /// length and evaluated at the sender's index (slot + 1).
    pub fn from_pb(m: pb::UnmaskAnswer, ctx: &RoundContext) -> Result<Self, ConvertError> {
        use pb::revealed_shares::Kind;
        let round = RoundRef::from_pb(m.round)?;
        let sender = slot("sender", m.sender, ctx)?;
        let degree = ctx.graph().degree();
        // The sender holds shares of each neighbour that shared with it, and its own.
        at_most("revealed", m.revealed.len(), degree + 1, "a client's neighbourhood and itself")?;
        let mut shares = BTreeMap::new();
        for r in m.revealed {
            let owner = slot("revealed[].owner", r.owner, ctx)?;
            if shares.last_key_value().is_some_and(|(last, _)| *last >= owner) {
                return Err(invalid(
                    "revealed[].owner",
                    format!("{owner} is repeated or out of ascending order"),
                ));
            }
            let revealed = match r.kind.ok_or(ConvertError::Missing("revealed[].kind"))? {
                Kind::SelfMask(bytes) => {
                    RevealedShares::SelfMask(share("revealed[].self_mask", sender, &bytes)?)
                }
                Kind::Pairwise(p) => {
                    let field = "revealed[].pairwise.shares";
                    at_most(field, p.shares.len(), degree, "a client's neighbourhood")?;
                    let mut map = BTreeMap::new();
                    for s in p.shares {
                        let peer = slot("revealed[].pairwise.shares[].peer", s.peer, ctx)?;
                        if peer == owner || map.last_key_value().is_some_and(|(last, _)| *last >= peer) {
                            return Err(invalid(
                                "revealed[].pairwise.shares[].peer",
                                format!("{peer} is the owner, repeated or out of ascending order"),
                            ));
                        }
                        map.insert(peer, share("revealed[].pairwise.shares[].value", sender, &s.value)?);
                    }
                    RevealedShares::PairwiseSeeds(map)
                }
            };
            shares.insert(owner, revealed);
        }
        Ok(RoundUnmaskAnswer { round, answer: UnmaskAnswer { sender, shares } })
    }
}

impl From<&RoundUnmaskAnswer> for pb::UnmaskAnswer {
    fn from(a: &RoundUnmaskAnswer) -> Self {
        use pb::revealed_shares::Kind;
        let revealed = a
            .answer
            .shares
            .iter()
            .map(|(owner, r)| pb::RevealedShares {
                owner: owner.0,
                kind: Some(match r {
                    RevealedShares::SelfMask(s) => Kind::SelfMask(s.value_bytes().to_vec().into()),
                    RevealedShares::PairwiseSeeds(map) => Kind::Pairwise(pb::PairwiseShares {
                        shares: map
                            .iter()
                            .map(|(peer, s)| pb::PairwiseShare {
                                peer: peer.0,
                                value: s.value_bytes().to_vec().into(),
                            })
                            .collect(),
                    }),
                }),
            })
            .collect();
        pb::UnmaskAnswer { round: Some((&a.round).into()), sender: a.answer.sender.0, revealed }
    }
}

impl From<&RoundSetup> for pb::SecAggSetup {
    fn from(s: &RoundSetup) -> Self {
        pb::SecAggSetup {
            federation_id: s.federation_id.clone(),
            round: s.round,
            attempt: s.attempt,
            members: s
                .members
                .iter()
                .map(|(id, key)| pb::SecAggMember {
                    client_id: id.as_str().to_owned(),
                    public_key: key.as_bytes().to_vec().into(),
                })
                .collect(),
            threshold: s.threshold as u32,
            degree: s.degree as u32,
            graph_seed: s.graph_seed.to_vec().into(),
            vector_len: s.vector_len as u64,
        }
    }
}

impl TryFrom<pb::SecureAggregationTask> for SecureTask {
    type Error = ConvertError;
    /// The secure part of a fit task. The encoding parameters are checked for range here; whether
    /// they admit an encoding at all ([`SecureTask::encoding`]) is the client's first step.
    fn try_from(t: pb::SecureAggregationTask) -> Result<Self, ConvertError> {
        let setup = t.setup.ok_or(ConvertError::Missing("secure_aggregation.setup"))?.try_into()?;
        if !(-200..=200).contains(&t.grid_log2) {
            return Err(invalid(
                "secure_aggregation.grid_log2",
                format!("{} is outside [-200, 200]", t.grid_log2),
            ));
        }
        if !(t.clip_norm.is_finite() && t.clip_norm > 0.0) {
            return Err(invalid("secure_aggregation.clip_norm", "must be finite and positive"));
        }
        if !(t.noise_sigma_grid.is_finite() && t.noise_sigma_grid >= 0.0) {
            return Err(invalid("secure_aggregation.noise_sigma_grid", "must be finite and non-negative"));
        }
        let beta = t.max_wrap_probability;
        if !(beta.is_finite() && beta > 0.0 && beta <= 1.0) {
            return Err(invalid("secure_aggregation.max_wrap_probability", "must be in (0, 1]"));
        }
        Ok(SecureTask {
            setup,
            grid_log2: t.grid_log2,
            clip_norm: t.clip_norm,
            noise_sigma_grid: t.noise_sigma_grid,
            max_wrap_probability: beta,
        })
    }
}

impl From<&SecureTask> for pb::SecureAggregationTask {
    fn from(t: &SecureTask) -> Self {
        pb::SecureAggregationTask {
            setup: Some((&t.setup).into()),
            grid_log2: t.grid_log2,
            clip_norm: t.clip_norm,
            noise_sigma_grid: t.noise_sigma_grid,
            max_wrap_probability: t.max_wrap_probability,
        }
    }
}

/// Wire value of a step.
pub fn awaited_step_to_pb(s: AwaitedStep) -> pb::SecAggStep {
    match s {
        AwaitedStep::PeerKeys => pb::SecAggStep::PeerKeys,
        AwaitedStep::Shares => pb::SecAggStep::Shares,
        AwaitedStep::Unmask => pb::SecAggStep::Unmask,
    }
}

/// The step a wire value names; unspecified or unknown values are refused naming `step`.
pub fn awaited_step_from_pb(v: i32) -> Result<AwaitedStep, ConvertError> {
    match pb::SecAggStep::try_from(v) {
        Ok(pb::SecAggStep::PeerKeys) => Ok(AwaitedStep::PeerKeys),
        Ok(pb::SecAggStep::Shares) => Ok(AwaitedStep::Shares),
        Ok(pb::SecAggStep::Unmask) => Ok(AwaitedStep::Unmask),
        _ => Err(invalid("step", format!("unknown or unspecified step {v}"))),
    }
}

impl StepInput {
    /// The coordinator's answer to a wait for a step of the round `ctx`.
    pub fn from_pb(m: pb::AwaitSecAggStepResponse, ctx: &RoundContext) -> Result<Self, ConvertError> {
        use pb::await_sec_agg_step_response::Outcome;
        Ok(match m.outcome.ok_or(ConvertError::Missing("outcome"))? {
            Outcome::PeerKeys(k) => StepInput::PeerKeys(PeerKeys::from_pb(k, ctx)?),
            Outcome::Shares(s) => StepInput::Shares(ShareDelivery::from_pb(s, ctx)?),
            Outcome::Unmask(u) => StepInput::Unmask(RoundUnmaskRequest::from_pb(u, ctx)?),
            Outcome::Pending(_) => StepInput::Pending,
        })
    }
}

impl From<&StepInput> for pb::AwaitSecAggStepResponse {
    fn from(i: &StepInput) -> Self {
        use pb::await_sec_agg_step_response::Outcome;
        let outcome = match i {
            StepInput::PeerKeys(k) => Outcome::PeerKeys(k.into()),
            StepInput::Shares(s) => Outcome::Shares(s.into()),
            StepInput::Unmask(u) => Outcome::Unmask(u.into()),
            StepInput::Pending => Outcome::Pending(pb::SecAggPending {}),
        };
        pb::AwaitSecAggStepResponse { outcome: Some(outcome) }
    }
}
