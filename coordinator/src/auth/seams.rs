//! The two seams of client authentication the RPC layer calls: who is calling
//! ([`Authenticator`]: join challenge, admission, enrollment, session tokens) and whether an
//! upload is really theirs ([`UpdateVerifier`]). `serve` implements both with
//! [`ClientAuth`](super::ClientAuth); they are traits so that schemes replace each other without
//! touching the service, and so that `rpc` (above) calls `auth` (below), never the reverse.

use fedtune_shared::auth::{ChallengeGrant, ChallengeRequest, EnrollRequest, JoinProof};
use fedtune_shared::crypto::CertificateDigest;
use fedtune_shared::ids::ClientId;
use fedtune_shared::round::{JoinRequest, MaskedUpdateHeader, UpdateHeader, UpdateTrailer};

use crate::error::RoundError;

/// Issues and checks session tokens.
pub trait Authenticator: Send + Sync + 'static {
    /// Opens a session for a client that just joined over `certificate` (the digest of its
    /// mutual-TLS client certificate, `None` without one); returns the bearer token. A client
    /// has at most one session: opening a new one revokes the old token.
    fn open_session(
        &self,
        client: &ClientId,
        certificate: Option<CertificateDigest>,
    ) -> Result<String, RoundError>;
    /// The client a token belongs to, for a call presenting `certificate` (the session must
    /// have been opened over that same certificate, or over none if it is `None`).
    fn authenticate(
        &self,
        token: &str,
        certificate: Option<CertificateDigest>,
    ) -> Result<ClientId, RoundError>;
    /// Revokes a client's session.
    fn close_session(&self, client: &ClientId);
    /// Issues a join challenge (first half of the join handshake). By default joins need no
    /// challenge and the call is refused.
    fn challenge(&self, request: &ChallengeRequest) -> Result<ChallengeGrant, RoundError> {
        let _ = request;
        Err(RoundError::Refused("this coordinator does not use join challenges".into()))
    }
    /// Decides whether `join` (with its challenge answer, if any) may open a session. By
    /// default every join is admitted.
    fn admit(&self, join: &JoinRequest, proof: Option<&JoinProof>) -> Result<(), RoundError> {
        let _ = (join, proof);
        Ok(())
    }
    /// Exchanges a one-time enrollment token for allowlisting a key. Refused by default.
    fn enroll(&self, request: &EnrollRequest) -> Result<ClientId, RoundError> {
        let _ = request;
        Err(RoundError::Refused("this coordinator does not enroll clients".into()))
    }
    /// Checks an operator's bearer token (the full status view). By default there is no
    /// operator credential and every token is refused.
    fn operator(&self, token: &str) -> Result<(), RoundError> {
        let _ = token;
        Err(RoundError::Unauthenticated("this coordinator has no operator credential".into()))
    }
    /// The federation id that session tokens and update signatures are bound to, if any.
    fn federation_id(&self) -> Option<String> {
        None
    }
    /// The registered identity (Ed25519) key of an admitted client, which a secure round's
    /// roster lists. `None` by default: without a registry of keys there is no secure round.
    fn identity(&self, client: &ClientId) -> Option<fedtune_shared::crypto::PublicKey> {
        let _ = client;
        None
    }
}

/// Checks the signature in an upload's trailer.
pub trait UpdateVerifier: Send + Sync + 'static {
    /// Accepts or refuses an update whose payload digest already verified.
    fn verify(
        &self,
        client: &ClientId,
        header: &UpdateHeader,
        trailer: &UpdateTrailer,
    ) -> Result<(), RoundError>;
    /// Accepts or refuses a masked upload (secure aggregation) whose payload digest verified:
    /// its signature also covers the secure round's context, under its own label.
    fn verify_masked(
        &self,
        client: &ClientId,
        header: &MaskedUpdateHeader,
        trailer: &UpdateTrailer,
    ) -> Result<(), RoundError>;
}
