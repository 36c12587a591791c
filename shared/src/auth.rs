//! Authentication messages of the wire protocol, and the one definition of what an update
//! signature covers.
//!
//! The join handshake is `JoinChallenge` → sign → `Join`: the coordinator hands out a nonce, the
//! client signs it (with the federation id and its name, see [`crate::crypto::Challenge`]) and
//! returns nonce and signature in its `JoinRequest` ([`JoinProof`]). `Enroll` exchanges a
//! one-time token for a place on the allowlist ([`EnrollRequest`]). Every conversion from a wire
//! message validates lengths and identifiers here, at the edge, like [`crate::convert`] does for
//! the round protocol.
//!
//! [`update_statement`] is shared by the signing client and the verifying coordinator, so both
//! always build the statement from the same header and trailer fields; [`bearer_metadata`] is
//! how every caller puts a token on a call.

use std::fmt;
use std::time::Duration;

use crate::convert::ConvertError;
use crate::crypto::{
    sign_update, verify_update, CryptoError, EnrollmentToken, KeyPair, PublicKey, Signature, UpdateStatement,
};
use crate::ids::{ClientId, Sha256};
use crate::pb;
use crate::round::{MaskedUpdateHeader, UpdateHeader, UpdateSignature};

/// The metadata key every authenticated call carries its bearer token under.
pub const AUTHORIZATION: &str = "authorization";

/// `Bearer <token>` as call metadata (a session token, or the operator token), or `None` when
/// the token is not valid header text. Marked sensitive, so HTTP/2 sends it as a never-indexed
/// literal (RFC 7541 §7.1.3): the secret never enters either side's HPACK table, where someone
/// who sees the sizes of compressed headers could probe it byte by byte (as CRIME did).
pub fn bearer_metadata(token: &str) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    let mut value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The only signature scheme of update trailers.
pub const SIGNATURE_SCHEME: &str = "ed25519";

/// Longest federation id accepted from the wire.
pub const MAX_FEDERATION_ID_LEN: usize = crate::limits::MAX_NAME_LEN;

fn invalid(field: &'static str, reason: impl Into<String>) -> ConvertError {
    ConvertError::Invalid { field, reason: reason.into() }
}

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], ConvertError> {
    <[u8; N]>::try_from(bytes).map_err(|_| invalid(field, format!("expected {N} bytes, got {}", bytes.len())))
}

/// Checks a federation id: the same alphabet as client ids ([A-Za-z0-9._-], 1–64), so it is
/// safe in logs and file names and has one encoding.
pub fn check_federation_id(id: &str) -> Result<(), ConvertError> {
    if crate::limits::is_valid_name(id) {
        Ok(())
    } else {
        Err(invalid("federation_id", "must be 1-64 characters of [A-Za-z0-9._-]"))
    }
}

/// A client asks for a join challenge for `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeRequest {
    /// The name the client will join under.
    pub name: ClientId,
}

impl TryFrom<pb::JoinChallengeRequest> for ChallengeRequest {
    type Error = ConvertError;
    fn try_from(r: pb::JoinChallengeRequest) -> Result<Self, ConvertError> {
        if r.client_name.is_empty() {
            return Err(ConvertError::Missing("client_name"));
        }
        Ok(ChallengeRequest { name: ClientId::parse(&r.client_name)? })
    }
}

impl From<&ChallengeRequest> for pb::JoinChallengeRequest {
    fn from(r: &ChallengeRequest) -> Self {
        pb::JoinChallengeRequest { client_name: r.name.as_str().to_owned() }
    }
}

/// A challenge the coordinator issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeGrant {
    /// The nonce to sign.
    pub nonce: [u8; 32],
    /// The federation being joined.
    pub federation_id: String,
    /// How long the nonce stays valid.
    pub expires_in: Duration,
}

impl ChallengeGrant {
    /// The challenge a client named `name` signs.
    pub fn challenge(&self, name: &ClientId) -> crate::crypto::Challenge {
        crate::crypto::Challenge {
            nonce: self.nonce,
            federation_id: self.federation_id.clone(),
            client_name: name.as_str().to_owned(),
        }
    }
}

impl TryFrom<pb::JoinChallengeResponse> for ChallengeGrant {
    type Error = ConvertError;
    fn try_from(r: pb::JoinChallengeResponse) -> Result<Self, ConvertError> {
        check_federation_id(&r.federation_id)?;
        Ok(ChallengeGrant {
            nonce: fixed("nonce", &r.nonce)?,
            federation_id: r.federation_id,
            expires_in: Duration::from_millis(r.expires_in_ms),
        })
    }
}

impl From<&ChallengeGrant> for pb::JoinChallengeResponse {
    fn from(g: &ChallengeGrant) -> Self {
        pb::JoinChallengeResponse {
            nonce: g.nonce.to_vec().into(),
            federation_id: g.federation_id.clone(),
            expires_in_ms: u64::try_from(g.expires_in.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// The answer to a join challenge, carried in `JoinRequest`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinProof {
    /// The nonce that was signed.
    pub nonce: [u8; 32],
    /// The client's signature over the challenge.
    pub signature: Signature,
}

impl fmt::Debug for JoinProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The nonce is single-use and short-lived, but there is no reason to log it either.
        f.write_str("JoinProof(<redacted>)")
    }
}

impl JoinProof {
    /// Answers `grant` as `name` with `key`.
    pub fn answer(key: &KeyPair, grant: &ChallengeGrant, name: &ClientId) -> Self {
        JoinProof {
            nonce: grant.nonce,
            signature: crate::crypto::sign_challenge(key, &grant.challenge(name)),
        }
    }

    /// The proof in a join request: `None` when both fields are empty, an error when only one is
    /// set or a length is wrong.
    pub fn from_request(r: &pb::JoinRequest) -> Result<Option<Self>, ConvertError> {
        match (r.challenge_nonce.is_empty(), r.challenge_signature.is_empty()) {
            (true, true) => Ok(None),
            (false, false) => Ok(Some(JoinProof {
                nonce: fixed("challenge_nonce", &r.challenge_nonce)?,
                signature: Signature::from_bytes(fixed("challenge_signature", &r.challenge_signature)?),
            })),
            _ => Err(invalid("challenge_signature", "a join proof needs both the nonce and the signature")),
        }
    }

    /// Writes the proof into a join request.
    pub fn attach(&self, r: &mut pb::JoinRequest) {
        r.challenge_nonce = self.nonce.to_vec().into();
        r.challenge_signature = self.signature.as_bytes().to_vec().into();
    }
}

/// A request to put a public key on the allowlist with a one-time token.
#[derive(Clone)]
pub struct EnrollRequest {
    /// The name the token was issued for.
    pub name: ClientId,
    /// The key to allowlist.
    pub public_key: PublicKey,
    /// The token (secret: `Debug` redacts it).
    pub token: EnrollmentToken,
}

impl fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .field("token", &self.token)
            .finish()
    }
}

impl TryFrom<pb::EnrollRequest> for EnrollRequest {
    type Error = ConvertError;
    fn try_from(r: pb::EnrollRequest) -> Result<Self, ConvertError> {
        if r.client_name.is_empty() {
            return Err(ConvertError::Missing("client_name"));
        }
        let name = ClientId::parse(&r.client_name)?;
        let public_key = PublicKey::from_bytes(fixed("public_key", &r.public_key)?);
        // Parsing never echoes the token text into the error.
        let token = r
            .enrollment_token
            .parse()
            .map_err(|e: CryptoError| invalid("enrollment_token", e.to_string()))?;
        Ok(EnrollRequest { name, public_key, token })
    }
}

impl From<&EnrollRequest> for pb::EnrollRequest {
    fn from(r: &EnrollRequest) -> Self {
        pb::EnrollRequest {
            client_name: r.name.as_str().to_owned(),
            public_key: r.public_key.as_bytes().to_vec().into(),
            enrollment_token: r.token.expose_secret(),
        }
    }
}

/// What an upload's signature covers: the federation, the round and attempt, the sender, the tensor layout,
/// the exact payload, the example count (its FedAvg weight) and the payload's encoding (by the
/// statement's label), all from the upload's header and trailer. Both sides build it with this function.
pub fn update_statement(
    federation_id: &str,
    client: &ClientId,
    header: &UpdateHeader,
    payload_digest: &Sha256,
) -> UpdateStatement {
    UpdateStatement {
        federation_id: federation_id.to_owned(),
        round: header.id.round,
        attempt: header.id.attempt,
        client_id: client.as_str().to_owned(),
        manifest_digest: header.manifest_digest.0,
        payload_sha256: payload_digest.0,
        num_examples: header.num_examples,
        secagg_context: None,
        int8_block: header.encoding == crate::compression::UpdateEncoding::Int8,
    }
}

/// What a masked upload's signature covers: everything [`update_statement`] covers, plus the
/// secure round's context digest, under its own label.
pub fn masked_update_statement(
    federation_id: &str,
    client: &ClientId,
    header: &MaskedUpdateHeader,
    payload_digest: &Sha256,
) -> UpdateStatement {
    UpdateStatement {
        secagg_context: Some(header.secagg_context),
        int8_block: false,
        ..update_statement(federation_id, client, &header.header, payload_digest)
    }
}

/// Signs an upload (for the trailer).
pub fn sign_upload(
    key: &KeyPair,
    federation_id: &str,
    client: &ClientId,
    header: &UpdateHeader,
    payload_digest: &Sha256,
) -> UpdateSignature {
    let sig = sign_update(key, &update_statement(federation_id, client, header, payload_digest));
    UpdateSignature { scheme: SIGNATURE_SCHEME.to_owned(), bytes: sig.as_bytes().to_vec().into() }
}

/// Signs a masked upload (for the trailer).
pub fn sign_masked_upload(
    key: &KeyPair,
    federation_id: &str,
    client: &ClientId,
    header: &MaskedUpdateHeader,
    payload_digest: &Sha256,
) -> UpdateSignature {
    let sig = sign_update(key, &masked_update_statement(federation_id, client, header, payload_digest));
    UpdateSignature { scheme: SIGNATURE_SCHEME.to_owned(), bytes: sig.as_bytes().to_vec().into() }
}

/// Checks an upload's trailer signature against `key`: scheme, length, then the signature.
pub fn verify_upload(
    key: &PublicKey,
    federation_id: &str,
    client: &ClientId,
    header: &UpdateHeader,
    payload_digest: &Sha256,
    signature: Option<&UpdateSignature>,
) -> Result<(), CryptoError> {
    verify_statement(key, &update_statement(federation_id, client, header, payload_digest), signature)
}

/// Checks a masked upload's trailer signature against `key`, like [`verify_upload`].
pub fn verify_masked_upload(
    key: &PublicKey,
    federation_id: &str,
    client: &ClientId,
    header: &MaskedUpdateHeader,
    payload_digest: &Sha256,
    signature: Option<&UpdateSignature>,
) -> Result<(), CryptoError> {
    verify_statement(key, &masked_update_statement(federation_id, client, header, payload_digest), signature)
}

fn verify_statement(
    key: &PublicKey,
    statement: &UpdateStatement,
    signature: Option<&UpdateSignature>,
) -> Result<(), CryptoError> {
    let sig =
        signature.ok_or_else(|| CryptoError::InvalidSignatureEncoding("the update is not signed".into()))?;
    if sig.scheme != SIGNATURE_SCHEME {
        return Err(CryptoError::InvalidSignatureEncoding(format!(
            "scheme `{}` is not supported (expected `{SIGNATURE_SCHEME}`)",
            sig.scheme.chars().take(32).collect::<String>()
        )));
    }
    let signature = Signature::from_slice(&sig.bytes)?;
    verify_update(key, statement, &signature)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ids::{ModelVersion, RoundId};

    #[test]
    fn a_bearer_token_travels_as_a_sensitive_header_never_indexed_by_hpack() {
        let value = bearer_metadata("s3cr3t-token").expect("valid header text");
        assert_eq!(value.to_str().unwrap(), "Bearer s3cr3t-token");
        assert!(value.is_sensitive(), "HPACK must not index a credential");
        assert!(bearer_metadata("line\nbreak").is_none(), "not header text");
    }

    fn header() -> UpdateHeader {
        UpdateHeader {
            id: RoundId::new(3, 0),
            base_version: ModelVersion(2),
            num_examples: 17,
            metrics: BTreeMap::new(),
            manifest_digest: Sha256([7; 32]),
            total_bytes: 8,
            encoding: crate::compression::UpdateEncoding::F32,
        }
    }

    #[test]
    fn a_masked_upload_signature_covers_the_secure_round_and_is_no_plain_upload_signature() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let pk = key.public_key();
        let me = ClientId::parse("site-1").unwrap();
        let digest = Sha256([9; 32]);
        let masked = MaskedUpdateHeader { header: header(), secagg_context: [5; 32] };
        let sig = sign_masked_upload(&key, "fed", &me, &masked, &digest);
        verify_masked_upload(&pk, "fed", &me, &masked, &digest, Some(&sig)).unwrap();
        let other_round = MaskedUpdateHeader { secagg_context: [6; 32], ..masked.clone() };
        assert!(verify_masked_upload(&pk, "fed", &me, &other_round, &digest, Some(&sig)).is_err());
        let heavier =
            MaskedUpdateHeader { header: UpdateHeader { num_examples: 18, ..header() }, ..masked.clone() };
        assert!(verify_masked_upload(&pk, "fed", &me, &heavier, &digest, Some(&sig)).is_err());
        assert!(verify_upload(&pk, "fed", &me, &header(), &digest, Some(&sig)).is_err(), "not plain");
        let plain = sign_upload(&key, "fed", &me, &header(), &digest);
        assert!(verify_masked_upload(&pk, "fed", &me, &masked, &digest, Some(&plain)).is_err());
    }

    #[test]
    fn an_upload_signature_verifies_only_for_the_same_header_payload_and_identity() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let me = ClientId::parse("site-1").unwrap();
        let digest = Sha256([9; 32]);
        let sig = sign_upload(&key, "fed", &me, &header(), &digest);
        let pk = key.public_key();
        verify_upload(&pk, "fed", &me, &header(), &digest, Some(&sig)).unwrap();
        let other = ClientId::parse("site-2").unwrap();
        assert!(verify_upload(&pk, "fed", &other, &header(), &digest, Some(&sig)).is_err());
        assert!(verify_upload(&pk, "fed2", &me, &header(), &digest, Some(&sig)).is_err());
        assert!(verify_upload(&pk, "fed", &me, &header(), &Sha256([8; 32]), Some(&sig)).is_err());
        let more = UpdateHeader { num_examples: 18, ..header() };
        assert!(verify_upload(&pk, "fed", &me, &more, &digest, Some(&sig)).is_err());
        let later = UpdateHeader { id: RoundId::new(4, 0), ..header() };
        assert!(verify_upload(&pk, "fed", &me, &later, &digest, Some(&sig)).is_err());
        // An update made for a failed attempt cannot be re-filed under the round's retry.
        let retry = UpdateHeader { id: RoundId::new(3, 1), ..header() };
        assert!(verify_upload(&pk, "fed", &me, &retry, &digest, Some(&sig)).is_err());
        // The declared encoding is signed: the same bytes cannot be re-read as int8 blocks.
        let int8 = UpdateHeader { encoding: crate::compression::UpdateEncoding::Int8, ..header() };
        assert!(verify_upload(&pk, "fed", &me, &int8, &digest, Some(&sig)).is_err());
        let int8_sig = sign_upload(&key, "fed", &me, &int8, &digest);
        verify_upload(&pk, "fed", &me, &int8, &digest, Some(&int8_sig)).unwrap();
        assert!(verify_upload(&pk, "fed", &me, &header(), &digest, Some(&int8_sig)).is_err());
        assert!(verify_upload(&pk, "fed", &me, &header(), &digest, None).is_err());
        let wrong_scheme = UpdateSignature { scheme: "rsa".into(), ..sig };
        assert!(verify_upload(&pk, "fed", &me, &header(), &digest, Some(&wrong_scheme)).is_err());
    }

    #[test]
    fn a_join_proof_round_trips_through_the_wire_request() {
        let key = KeyPair::generate_ephemeral().unwrap();
        let name = ClientId::parse("site-1").unwrap();
        let grant = ChallengeGrant {
            nonce: [5; 32],
            federation_id: "fed".into(),
            expires_in: Duration::from_secs(30),
        };
        let proof = JoinProof::answer(&key, &grant, &name);
        let mut req = pb::JoinRequest::default();
        assert_eq!(JoinProof::from_request(&req).unwrap(), None);
        proof.attach(&mut req);
        assert_eq!(JoinProof::from_request(&req).unwrap(), Some(proof.clone()));
        crate::crypto::verify_challenge(&key.public_key(), &grant.challenge(&name), &proof.signature)
            .unwrap();
        req.challenge_signature = vec![1; 63].into();
        assert!(JoinProof::from_request(&req).is_err());
        req.challenge_signature = Default::default();
        assert!(JoinProof::from_request(&req).is_err());
    }

    #[test]
    fn an_enroll_request_never_shows_its_token() {
        let token = EnrollmentToken::generate().unwrap();
        let secret = token.expose_secret();
        let wire = pb::EnrollRequest {
            client_name: "site-1".into(),
            public_key: vec![1; 32].into(),
            enrollment_token: secret.clone(),
        };
        let req = EnrollRequest::try_from(wire).unwrap();
        assert!(!format!("{req:?}").contains(&secret));
        let bad =
            pb::EnrollRequest { enrollment_token: format!("{secret}x"), ..pb::EnrollRequest::from(&req) };
        let err = EnrollRequest::try_from(bad).unwrap_err().to_string();
        assert!(!err.contains(&secret), "{err}");
    }

    #[test]
    fn federation_ids_are_checked() {
        assert!(check_federation_id("fed-1.a_b").is_ok());
        assert!(check_federation_id("").is_err());
        assert!(check_federation_id("a b").is_err());
        assert!(check_federation_id(&"x".repeat(65)).is_err());
    }
}
