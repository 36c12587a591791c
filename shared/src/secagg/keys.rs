//! Agreement keys and what is derived from them.
//!
//! # Signed agreement keys
//! For each neighbour v, client u makes a fresh X25519 key pair and signs its public key with
//! its Ed25519 identity. The signed bytes are the canonical encoding (length-prefixed fields, as
//! in [`crate::crypto`]) of [`AGREEMENT_KEY_LABEL`], the round-context digest, the federation,
//! round and attempt, the owner's and the peer's client ids, and the 32 key bytes. So the
//! coordinator can route a key but not substitute its own (it has no client's identity key), move
//! it to another peer, or replay it in another round or attempt, and a key made for one purpose
//! never verifies as another fedtune signature.
//!
//! # Derivation
//! From the X25519 output of the pair, HKDF-SHA256 (salt: the round-context digest) expands:
//! - the mask seed s_{u,v} (label [`MASK_SEED_LABEL`]), with the pair in slot order so both ends
//!   get the same seed;
//! - one ChaCha20-Poly1305 key per direction (label [`BUNDLE_KEY_LABEL`], then sender and
//!   recipient), so the two bundles the pair exchanges never share a key.
//!
//! Both infos end with the two public keys in slot order, binding the outputs to this exact
//! exchange. Each AEAD key seals exactly one bundle, hence the fixed all-zero nonce is used once.

use std::collections::BTreeMap;
use std::fmt;

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::{aead, hkdf};

use super::masking::MaskSeed;
use super::shamir::{Share, SHARE_VALUE_BYTES};
use super::{RoundContext, SecAggError, Slot};
use crate::crypto::{Canonical, KeyPair, Signature};

/// Context label of a signed agreement key.
pub const AGREEMENT_KEY_LABEL: &str = "fedtune/v1/secagg/agreement-key";
/// HKDF info label of the pairwise mask seed.
pub const MASK_SEED_LABEL: &str = "fedtune/v1/secagg/mask-seed";
/// HKDF info label of a share bundle's AEAD key.
pub const BUNDLE_KEY_LABEL: &str = "fedtune/v1/secagg/bundle-key";
/// Context label of a share bundle's associated data.
pub const BUNDLE_AAD_LABEL: &str = "fedtune/v1/secagg/bundle";

/// One X25519 public key that `owner` made for `peer`, signed with the owner's identity.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedAgreementKey {
    /// The client the key belongs to.
    pub owner: Slot,
    /// The neighbour it is meant for.
    pub peer: Slot,
    /// The X25519 public key.
    pub public_key: [u8; 32],
    /// The owner's Ed25519 signature (see the module docs for what it covers).
    pub signature: Signature,
}

impl fmt::Debug for SignedAgreementKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignedAgreementKey({} for {})", self.owner, self.peer)
    }
}

impl SignedAgreementKey {
    /// Checks owner and peer are neighbours in this round and the signature is the owner's over
    /// exactly this key, round and pair.
    pub fn verify(&self, ctx: &RoundContext) -> Result<(), SecAggError> {
        let identity = ctx
            .identity(self.owner)
            .ok_or(SecAggError::UnknownClient { what: "agreement key owner", slot: self.owner })?;
        if !ctx.graph().are_neighbours(self.owner, self.peer) {
            return Err(SecAggError::UnknownClient { what: "agreement key peer", slot: self.peer });
        }
        let bytes = statement(ctx, self.owner, self.peer, &self.public_key);
        identity
            .verify_raw(&bytes, self.signature.as_bytes())
            .map_err(|_| SecAggError::BadKeySignature { owner: self.owner, peer: self.peer })
    }

    /// The exact bytes the signature covers (layout in `docs/protocol.md`).
    pub fn signed_bytes(&self, ctx: &RoundContext) -> Vec<u8> {
        statement(ctx, self.owner, self.peer, &self.public_key)
    }
}

/// The bytes an agreement key's signature covers.
fn statement(ctx: &RoundContext, owner: Slot, peer: Slot, public_key: &[u8; 32]) -> Vec<u8> {
    let name = |slot| ctx.client_id(slot).map_or("", |id| id.as_str());
    Canonical::new(AGREEMENT_KEY_LABEL)
        .fixed(ctx.digest())
        .str(ctx.federation_id())
        .u64(ctx.round())
        .u64(u64::from(ctx.attempt()))
        .str(name(owner))
        .str(name(peer))
        .fixed(public_key)
        .finish()
}

/// A private agreement key waiting for its peer's public key; used once, then gone.
pub(crate) struct PendingAgreement {
    private: EphemeralPrivateKey,
    public: [u8; 32],
}

impl PendingAgreement {
    /// A fresh key pair for `peer` and its signed public half.
    pub(crate) fn generate(
        ctx: &RoundContext,
        identity: &KeyPair,
        owner: Slot,
        peer: Slot,
    ) -> Result<(Self, SignedAgreementKey), SecAggError> {
        let rng = ring::rand::SystemRandom::new();
        let private = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| SecAggError::Rng)?;
        let mut public = [0u8; 32];
        public.copy_from_slice(private.compute_public_key().map_err(|_| SecAggError::Rng)?.as_ref());
        let signature = Signature::from_bytes(identity.sign_raw(&statement(ctx, owner, peer, &public)));
        Ok((
            PendingAgreement { private, public },
            SignedAgreementKey { owner, peer, public_key: public, signature },
        ))
    }

    /// Agrees with the peer's (already verified) key and derives the pair's secrets.
    pub(crate) fn agree(
        self,
        ctx: &RoundContext,
        me: Slot,
        peer: Slot,
        peer_public: &[u8; 32],
    ) -> Result<PairSecrets, SecAggError> {
        let (lo, hi, lo_pub, hi_pub) = if me < peer {
            (me, peer, &self.public, peer_public)
        } else {
            (peer, me, peer_public, &self.public)
        };
        let derive = |dh: &[u8]| -> Result<PairSecrets, ring::error::Unspecified> {
            let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, ctx.digest()).extract(dh);
            let (lo_b, hi_b) = (lo.0.to_be_bytes(), hi.0.to_be_bytes());
            let mut seed = [0u8; 32];
            prk.expand(&[MASK_SEED_LABEL.as_bytes(), &lo_b, &hi_b, lo_pub, hi_pub], Len32)?
                .fill(&mut seed)?;
            let bundle_key =
                |sender: Slot, recipient: Slot| -> Result<aead::LessSafeKey, ring::error::Unspecified> {
                    let (s, r) = (sender.0.to_be_bytes(), recipient.0.to_be_bytes());
                    let info: [&[u8]; 5] = [BUNDLE_KEY_LABEL.as_bytes(), &s, &r, lo_pub, hi_pub];
                    let okm = prk.expand(&info, &aead::CHACHA20_POLY1305)?;
                    Ok(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
                };
            Ok(PairSecrets {
                seal: Some(bundle_key(me, peer)?),
                open: Some(bundle_key(peer, me)?),
                mask_seed: MaskSeed::from_bytes(seed),
            })
        };
        agreement::agree_ephemeral(self.private, &UnparsedPublicKey::new(&X25519, peer_public), derive)
            .and_then(|r| r)
            .map_err(|_| SecAggError::KeyAgreement { peer })
    }
}

impl fmt::Debug for PendingAgreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PendingAgreement(<redacted>)")
    }
}

/// HKDF output length of a mask seed.
struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// What one pair of neighbours shares: the two bundle keys (each taken when used, so neither
/// seals or opens twice) and the pairwise mask seed.
pub(crate) struct PairSecrets {
    seal: Option<aead::LessSafeKey>,
    open: Option<aead::LessSafeKey>,
    pub(crate) mask_seed: MaskSeed,
}

impl fmt::Debug for PairSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairSecrets(<redacted>)")
    }
}

/// A share bundle sealed from `sender` to `recipient`; only they can read it.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptedShares {
    /// Whose shares these are.
    pub sender: Slot,
    /// Who holds them.
    pub recipient: Slot,
    /// ChaCha20-Poly1305 ciphertext and tag of the encoded bundle.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for EncryptedShares {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptedShares({} → {}, {} bytes)", self.sender, self.recipient, self.ciphertext.len())
    }
}

/// AEAD tag length of a sealed bundle (ChaCha20-Poly1305).
const TAG_BYTES: usize = 16;

/// The exact length of a sealed bundle carrying `pairwise` pairwise-seed shares: the self-mask
/// share, a `u32` count, per pairwise share a `u32` peer and its values, and the tag. A bundle
/// carries one pairwise share per neighbour the sender agreed with, the recipient included, so
/// at most the graph degree.
pub const fn sealed_bundle_len(pairwise: usize) -> usize {
    SHARE_VALUE_BYTES + 4 + pairwise * (4 + SHARE_VALUE_BYTES) + TAG_BYTES
}

/// The associated data a bundle from `sender` to `recipient` is sealed with (layout in
/// `docs/protocol.md`): it binds the bundle to the round context and to the pair's direction.
pub fn bundle_associated_data(ctx: &RoundContext, sender: Slot, recipient: Slot) -> Vec<u8> {
    Canonical::new(BUNDLE_AAD_LABEL)
        .fixed(ctx.digest())
        .u64(u64::from(sender.0))
        .u64(u64::from(recipient.0))
        .finish()
}

fn bundle_aad(ctx: &RoundContext, sender: Slot, recipient: Slot) -> aead::Aad<Vec<u8>> {
    aead::Aad::from(bundle_associated_data(ctx, sender, recipient))
}

impl PairSecrets {
    /// Seals `bundle` for the peer; the key is spent.
    pub(crate) fn seal(
        &mut self,
        ctx: &RoundContext,
        me: Slot,
        peer: Slot,
        bundle: &ShareBundle,
    ) -> Result<EncryptedShares, SecAggError> {
        let key = self.seal.take().ok_or(SecAggError::Duplicate { what: "share bundle", slot: me })?;
        let mut buf = bundle.encode();
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key([0; 12]),
            bundle_aad(ctx, me, peer),
            &mut buf,
        )
        .map_err(|_| SecAggError::BadShareBundle { sender: me, reason: "sealing failed".into() })?;
        Ok(EncryptedShares { sender: me, recipient: peer, ciphertext: buf })
    }

    /// Opens the peer's bundle to `me`; the key is spent, so a second bundle is refused.
    pub(crate) fn open(
        &mut self,
        ctx: &RoundContext,
        me: Slot,
        sealed: &EncryptedShares,
    ) -> Result<ShareBundle, SecAggError> {
        let peer = sealed.sender;
        let key = self.open.take().ok_or(SecAggError::Duplicate { what: "share bundle", slot: peer })?;
        let mut buf = sealed.ciphertext.clone();
        let plain = key
            .open_in_place(aead::Nonce::assume_unique_for_key([0; 12]), bundle_aad(ctx, peer, me), &mut buf)
            .map_err(|_| SecAggError::BadShareBundle {
                sender: peer,
                reason: "does not authenticate".into(),
            })?;
        ShareBundle::decode(plain, me.share_x())
            .map_err(|reason| SecAggError::BadShareBundle { sender: peer, reason })
    }
}

/// One holder's shares of one client's secrets: of its self-mask seed and of each of its
/// pairwise seeds (keyed by the other end of the pair).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShareBundle {
    pub(crate) self_mask: Share,
    pub(crate) pairwise: BTreeMap<Slot, Share>,
}

impl ShareBundle {
    /// Self-mask values, then the count of pairwise shares (`u32`, big-endian), then per share
    /// the peer's slot (`u32`, big-endian) and its values, peers ascending.
    fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(SHARE_VALUE_BYTES + 4 + self.pairwise.len() * (4 + SHARE_VALUE_BYTES));
        out.extend_from_slice(&self.self_mask.value_bytes());
        out.extend_from_slice(&(self.pairwise.len() as u32).to_be_bytes());
        for (peer, share) in &self.pairwise {
            out.extend_from_slice(&peer.0.to_be_bytes());
            out.extend_from_slice(&share.value_bytes());
        }
        out
    }

    /// Inverse of `encode` for the holder with share index `x`; refuses trailing bytes and
    /// peers out of order (so each bundle has one encoding).
    fn decode(bytes: &[u8], x: u64) -> Result<Self, String> {
        let share = |b: &[u8]| Share::from_value_bytes(x, b).map_err(|e| e.to_string());
        let (head, rest) = bytes.split_at_checked(SHARE_VALUE_BYTES + 4).ok_or("truncated")?;
        let self_mask = share(&head[..SHARE_VALUE_BYTES])?;
        let count = u32::from_be_bytes([head[40], head[41], head[42], head[43]]) as usize;
        const ENTRY: usize = 4 + SHARE_VALUE_BYTES;
        if rest.len() != count.checked_mul(ENTRY).ok_or("count overflows")? {
            return Err(format!("{} bytes for {count} pairwise shares", rest.len()));
        }
        let mut pairwise = BTreeMap::new();
        let mut last = None;
        for entry in rest.chunks_exact(ENTRY) {
            let peer = Slot(u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]));
            if last.is_some_and(|l| l >= peer) {
                return Err("pairwise shares out of order or repeated".into());
            }
            last = Some(peer);
            pairwise.insert(peer, share(&entry[4..])?);
        }
        Ok(ShareBundle { self_mask, pairwise })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ClientId;
    use crate::secagg::RoundSetup;

    fn context(round: u64, identities: &[KeyPair]) -> RoundContext {
        RoundContext::new(RoundSetup {
            federation_id: "fed".into(),
            round,
            attempt: 0,
            members: identities
                .iter()
                .enumerate()
                .map(|(i, k)| (ClientId::parse(&format!("c{i}")).unwrap(), k.public_key()))
                .collect(),
            threshold: 2,
            degree: 2,
            graph_seed: [0; 32],
            vector_len: 8,
        })
        .unwrap()
    }

    fn identities() -> Vec<KeyPair> {
        (0..3).map(|_| KeyPair::generate_ephemeral().unwrap()).collect()
    }

    #[test]
    fn both_ends_of_a_pair_derive_the_same_seed_and_can_exchange_bundles() {
        let ids = identities();
        let ctx = context(1, &ids);
        let (a, b) = (Slot(0), Slot(2));
        let (pa, ka) = PendingAgreement::generate(&ctx, &ids[0], a, b).unwrap();
        let (pb, kb) = PendingAgreement::generate(&ctx, &ids[2], b, a).unwrap();
        ka.verify(&ctx).unwrap();
        kb.verify(&ctx).unwrap();
        let mut sa = pa.agree(&ctx, a, b, &kb.public_key).unwrap();
        let mut sb = pb.agree(&ctx, b, a, &ka.public_key).unwrap();
        assert_eq!(sa.mask_seed, sb.mask_seed);
        let bundle = ShareBundle {
            self_mask: Share::from_value_bytes(3, &[1; SHARE_VALUE_BYTES]).unwrap(),
            pairwise: BTreeMap::from([(
                Slot(1),
                Share::from_value_bytes(3, &[2; SHARE_VALUE_BYTES]).unwrap(),
            )]),
        };
        let sealed = sa.seal(&ctx, a, b, &bundle).unwrap();
        assert_eq!(sealed.ciphertext.len(), sealed_bundle_len(1));
        assert_eq!(sb.open(&ctx, b, &sealed).unwrap(), bundle);
        assert!(matches!(sb.open(&ctx, b, &sealed), Err(SecAggError::Duplicate { .. })), "opened once");
        assert!(matches!(sa.seal(&ctx, a, b, &bundle), Err(SecAggError::Duplicate { .. })), "sealed once");
    }

    #[test]
    fn a_bundle_tampered_with_or_misaddressed_does_not_open() {
        let ids = identities();
        let ctx = context(1, &ids);
        let (a, b) = (Slot(0), Slot(1));
        let (pa, ka) = PendingAgreement::generate(&ctx, &ids[0], a, b).unwrap();
        let (pb, kb) = PendingAgreement::generate(&ctx, &ids[1], b, a).unwrap();
        let mut sa = pa.agree(&ctx, a, b, &kb.public_key).unwrap();
        let bundle = ShareBundle {
            self_mask: Share::from_value_bytes(2, &[1; SHARE_VALUE_BYTES]).unwrap(),
            pairwise: BTreeMap::new(),
        };
        let sealed = sa.seal(&ctx, a, b, &bundle).unwrap();
        let mut flipped = sealed.clone();
        flipped.ciphertext[3] ^= 1;
        let mut sb = pb.agree(&ctx, b, a, &ka.public_key).unwrap();
        assert!(matches!(sb.open(&ctx, b, &flipped), Err(SecAggError::BadShareBundle { .. })));
    }

    #[test]
    fn a_key_moved_to_another_peer_round_or_owner_fails_verification() {
        let ids = identities();
        let ctx = context(1, &ids);
        let (_, key) = PendingAgreement::generate(&ctx, &ids[0], Slot(0), Slot(1)).unwrap();
        key.verify(&ctx).unwrap();
        let moved = SignedAgreementKey { peer: Slot(2), ..key.clone() };
        assert_eq!(moved.verify(&ctx), Err(SecAggError::BadKeySignature { owner: Slot(0), peer: Slot(2) }));
        let stolen = SignedAgreementKey { owner: Slot(2), peer: Slot(1), ..key.clone() };
        assert!(matches!(stolen.verify(&ctx), Err(SecAggError::BadKeySignature { .. })));
        let next_round = context(2, &ids);
        assert!(matches!(key.verify(&next_round), Err(SecAggError::BadKeySignature { .. })));
        let to_self = SignedAgreementKey { peer: Slot(0), ..key };
        assert!(matches!(to_self.verify(&ctx), Err(SecAggError::UnknownClient { .. })));
    }

    #[test]
    fn bundle_encoding_has_one_form() {
        let s = |v| Share::from_value_bytes(5, &[v; SHARE_VALUE_BYTES]).unwrap();
        let bundle =
            ShareBundle { self_mask: s(1), pairwise: BTreeMap::from([(Slot(1), s(2)), (Slot(7), s(3))]) };
        let bytes = bundle.encode();
        assert_eq!(ShareBundle::decode(&bytes, 5).unwrap(), bundle);
        assert!(ShareBundle::decode(&bytes[..bytes.len() - 1], 5).is_err());
        let mut swapped = bytes.clone();
        let (first, second) = (44, 44 + 4 + SHARE_VALUE_BYTES);
        swapped[first..first + 4].copy_from_slice(&7u32.to_be_bytes());
        swapped[second..second + 4].copy_from_slice(&1u32.to_be_bytes());
        assert!(ShareBundle::decode(&swapped, 5).is_err(), "peers out of order");
    }
}
