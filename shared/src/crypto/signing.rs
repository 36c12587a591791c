//! Domain-separated Ed25519 signatures: update statements and join challenges.
//!
//! What gets signed is never a raw buffer but a canonical encoding (see `Canonical` in the
//! parent module): a context label, then each field, variable-length ones prefixed with their
//! length as big-endian `u64`. The labels differ per purpose ([`UPDATE_CONTEXT`],
//! [`CHALLENGE_CONTEXT`]), so a signature a client made to answer a join challenge can never
//! be replayed as a signature over an update, and neither can be produced by re-arranging
//! field boundaries.

use std::fmt;
use std::str::FromStr;

use super::identity::{KeyPair, PublicKey};
use super::{b64_decode, b64_encode, random_bytes, Canonical, CryptoError};

/// Context label of update statements. Bump the version when the field list changes.
pub const UPDATE_CONTEXT: &str = "fedtune/v1/update";

/// Context label of the statements of masked uploads (`UPDATE_ENCODING_MASKED_U32`): the update
/// statement's fields, then the secure round's context digest. A label of its own, so a
/// signature over a plain update never verifies as one over a masked upload or the reverse.
pub const MASKED_UPDATE_CONTEXT: &str = "fedtune/v1/update/masked-u32";

/// Context label of the statements of 8-bit uploads (`UPDATE_ENCODING_INT8_BLOCK`): the update
/// statement's fields under a label of their own, so the encoding the header declares is
/// signed too (an f32 upload's signature never verifies for the same bytes read as int8
/// blocks, or the reverse).
pub const INT8_UPDATE_CONTEXT: &str = "fedtune/v1/update/int8-block";

/// Context label of join-challenge responses.
pub const CHALLENGE_CONTEXT: &str = "fedtune/v1/join-challenge";

/// What a client vouches for when it submits an update: which federation, round and attempt it
/// is for (so an update made for a failed attempt cannot be re-filed under the retry), who sent it, which tensor layout it follows, the exact payload bytes, and how many local
/// examples it claims (the FedAvg weight, so it must be covered too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateStatement {
    /// The federation the update belongs to.
    pub federation_id: String,
    /// The round the update was trained for.
    pub round: u64,
    /// The attempt of that round (a failed round is retried under the next attempt).
    pub attempt: u32,
    /// The sending client's id as registered with the coordinator.
    pub client_id: String,
    /// `Manifest::digest()` of the tensor layout the payload follows.
    pub manifest_digest: [u8; 32],
    /// SHA-256 of the complete update payload bytes as uploaded.
    pub payload_sha256: [u8; 32],
    /// Number of local training examples (weights the update in FedAvg).
    pub num_examples: u64,
    /// For a masked upload, the round-context digest of its secure round (see
    /// [`MASKED_UPDATE_CONTEXT`]); `None` for a plain `f32` delta.
    pub secagg_context: Option<[u8; 32]>,
    /// The payload is `INT8_BLOCK` encoded (signed under [`INT8_UPDATE_CONTEXT`]); never
    /// together with `secagg_context`.
    pub int8_block: bool,
}

impl UpdateStatement {
    /// The exact bytes that are signed. A plain update's bytes are those of protocol v1 before
    /// secure aggregation existed, so its signatures are unchanged.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let label = match (&self.secagg_context, self.int8_block) {
            (Some(_), _) => MASKED_UPDATE_CONTEXT,
            (None, true) => INT8_UPDATE_CONTEXT,
            (None, false) => UPDATE_CONTEXT,
        };
        let mut c = Canonical::new(label);
        c.str(&self.federation_id)
            .u64(self.round)
            .u64(u64::from(self.attempt))
            .str(&self.client_id)
            .fixed(&self.manifest_digest)
            .fixed(&self.payload_sha256)
            .u64(self.num_examples);
        if let Some(digest) = &self.secagg_context {
            c.fixed(digest);
        }
        c.finish()
    }
}

/// A server-chosen challenge a joining client signs to prove it holds the private key of the
/// public key it presents. The coordinator must accept each nonce once, for a short time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// 32 bytes from the system CSPRNG; what makes a response unrepeatable.
    pub nonce: [u8; 32],
    /// The federation being joined.
    pub federation_id: String,
    /// The name the client is joining under.
    pub client_name: String,
}

impl Challenge {
    /// A fresh challenge with a random nonce.
    pub fn new(
        federation_id: impl Into<String>,
        client_name: impl Into<String>,
    ) -> Result<Self, CryptoError> {
        Ok(Challenge {
            nonce: random_bytes()?,
            federation_id: federation_id.into(),
            client_name: client_name.into(),
        })
    }

    /// The exact bytes that are signed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        Canonical::new(CHALLENGE_CONTEXT)
            .fixed(&self.nonce)
            .str(&self.federation_id)
            .str(&self.client_name)
            .finish()
    }
}

/// An Ed25519 signature. Text form: base64url without padding (86 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature([u8; 64]);

impl Signature {
    /// Wraps 64 raw signature bytes.
    pub fn from_bytes(bytes: [u8; 64]) -> Self {
        Signature(bytes)
    }

    /// Wraps raw signature bytes received from the wire, checking the length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        <[u8; 64]>::try_from(bytes).map(Signature).map_err(|_| {
            CryptoError::InvalidSignatureEncoding(format!(
                "{} bytes, an Ed25519 signature has 64",
                bytes.len()
            ))
        })
    }

    /// The raw signature bytes.
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&b64_encode(&self.0))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = CryptoError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = b64_decode(text.trim()).map_err(CryptoError::InvalidSignatureEncoding)?;
        Signature::from_slice(&bytes)
    }
}

/// Signs an update statement with the client's identity.
pub fn sign_update(key: &KeyPair, statement: &UpdateStatement) -> Signature {
    Signature(key.sign_raw(&statement.canonical_bytes()))
}

/// Checks that `signature` was made by `public_key` over exactly this statement.
/// Fails with [`CryptoError::BadSignature`] otherwise.
pub fn verify_update(
    public_key: &PublicKey,
    statement: &UpdateStatement,
    signature: &Signature,
) -> Result<(), CryptoError> {
    public_key.verify_raw(&statement.canonical_bytes(), &signature.0)
}

/// Answers a join challenge.
pub fn sign_challenge(key: &KeyPair, challenge: &Challenge) -> Signature {
    Signature(key.sign_raw(&challenge.canonical_bytes()))
}

/// Checks a join-challenge answer. Fails with [`CryptoError::BadSignature`] otherwise.
pub fn verify_challenge(
    public_key: &PublicKey,
    challenge: &Challenge,
    signature: &Signature,
) -> Result<(), CryptoError> {
    public_key.verify_raw(&challenge.canonical_bytes(), &signature.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> UpdateStatement {
        UpdateStatement {
            federation_id: "fed-a".into(),
            round: 7,
            attempt: 0,
            client_id: "site-1".into(),
            manifest_digest: [1; 32],
            payload_sha256: [2; 32],
            num_examples: 1200,
            secagg_context: None,
            int8_block: false,
        }
    }

    fn assert_rejected(key: &PublicKey, statement: &UpdateStatement, signature: &Signature) {
        assert!(matches!(verify_update(key, statement, signature), Err(CryptoError::BadSignature)));
    }

    #[test]
    fn a_signed_update_verifies_under_the_signers_public_key() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let s = statement();
        let sig = sign_update(&key, &s);
        verify_update(&key.public_key(), &s, &sig).unwrap();
    }

    #[test]
    fn changing_any_field_of_the_statement_invalidates_the_signature() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let public = key.public_key();
        let sig = sign_update(&key, &statement());

        let mut tampered_payload = statement();
        tampered_payload.payload_sha256[31] ^= 1;
        assert_rejected(&public, &tampered_payload, &sig);

        let mut tampered_manifest = statement();
        tampered_manifest.manifest_digest[0] ^= 0x80;
        assert_rejected(&public, &tampered_manifest, &sig);

        assert_rejected(&public, &UpdateStatement { round: 8, ..statement() }, &sig);
        assert_rejected(&public, &UpdateStatement { attempt: 1, ..statement() }, &sig);
        assert_rejected(&public, &UpdateStatement { federation_id: "fed-b".into(), ..statement() }, &sig);
        assert_rejected(&public, &UpdateStatement { client_id: "site-2".into(), ..statement() }, &sig);
        assert_rejected(&public, &UpdateStatement { num_examples: 1_000_000, ..statement() }, &sig);
    }

    #[test]
    fn a_plain_update_signature_does_not_verify_as_a_masked_one_or_for_another_secure_round() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let public = key.public_key();
        let plain = sign_update(&key, &statement());
        let masked = UpdateStatement { secagg_context: Some([3; 32]), ..statement() };
        assert_rejected(&public, &masked, &plain);
        let masked_sig = sign_update(&key, &masked);
        verify_update(&public, &masked, &masked_sig).unwrap();
        assert_rejected(&public, &statement(), &masked_sig);
        assert_rejected(
            &public,
            &UpdateStatement { secagg_context: Some([4; 32]), ..statement() },
            &masked_sig,
        );
    }

    #[test]
    fn moving_a_field_boundary_invalidates_the_signature() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let s = UpdateStatement { federation_id: "fed".into(), client_id: "a-site".into(), ..statement() };
        let sig = sign_update(&key, &s);
        let shifted =
            UpdateStatement { federation_id: "feda".into(), client_id: "-site".into(), ..statement() };
        assert_rejected(&key.public_key(), &shifted, &sig);
    }

    #[test]
    fn a_signature_by_another_key_is_rejected() {
        let signer = KeyPair::generate_ephemeral().unwrap();
        let other = KeyPair::generate_ephemeral().unwrap();
        let sig = sign_update(&signer, &statement());
        assert_rejected(&other.public_key(), &statement(), &sig);
    }

    #[test]
    fn a_challenge_answer_verifies_and_cannot_be_replayed_as_an_update_signature() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let challenge = Challenge::new("fed-a", "site-1").unwrap();
        let answer = sign_challenge(&key, &challenge);
        verify_challenge(&key.public_key(), &challenge, &answer).unwrap();

        // Whatever update statement an attacker pairs the answer with, it must not verify; the
        // closest candidate reuses the challenge's own bytes as far as the fields allow.
        let mimic = UpdateStatement {
            federation_id: challenge.federation_id.clone(),
            round: 0,
            attempt: 0,
            client_id: challenge.client_name.clone(),
            manifest_digest: challenge.nonce,
            payload_sha256: challenge.nonce,
            num_examples: 0,
            secagg_context: None,
            int8_block: false,
        };
        assert_rejected(&key.public_key(), &mimic, &answer);
        assert_ne!(challenge.canonical_bytes()[..40], mimic.canonical_bytes()[..40]);

        // And the other way round: an update signature does not answer a challenge.
        let update_sig = sign_update(&key, &mimic);
        assert!(verify_challenge(&key.public_key(), &challenge, &update_sig).is_err());
    }

    #[test]
    fn a_challenge_answer_is_bound_to_its_nonce_federation_and_name() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let challenge = Challenge::new("fed-a", "site-1").unwrap();
        let answer = sign_challenge(&key, &challenge);
        let public = key.public_key();
        let fresh = Challenge::new("fed-a", "site-1").unwrap();
        assert_ne!(fresh.nonce, challenge.nonce, "nonces must be random");
        assert!(verify_challenge(&public, &fresh, &answer).is_err());
        let other_fed = Challenge { federation_id: "fed-b".into(), ..challenge.clone() };
        assert!(verify_challenge(&public, &other_fed, &answer).is_err());
        let other_name = Challenge { client_name: "site-2".into(), ..challenge.clone() };
        assert!(verify_challenge(&public, &other_name, &answer).is_err());
    }

    #[test]
    fn signature_text_round_trips_and_wrong_lengths_are_explained() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let sig = sign_update(&key, &statement());
        assert_eq!(sig.to_string().parse::<Signature>().unwrap(), sig);
        let err = Signature::from_slice(&[0u8; 63]).unwrap_err().to_string();
        assert!(err.contains("63 bytes"), "{err}");
    }
}
