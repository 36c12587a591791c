//! Who is calling: per-call session tokens, and the signature check of uploads.
//!
//! Both are traits so that schemes replace each other without touching the service. `serve`
//! uses `crate::auth::ClientAuth` for both: an allowlist of Ed25519 keys, a join challenge,
//! HMAC session tokens and signed updates. [`RandomTokens`] (opaque random bearer tokens, any
//! client may join) and [`SignaturesNotChecked`] remain for in-process harnesses that test the
//! round protocol without identities (`Seams::default`).

use std::collections::HashMap;
use std::sync::RwLock;

use fedtune_shared::auth::{ChallengeGrant, ChallengeRequest, EnrollRequest, JoinProof};
use fedtune_shared::ids::ClientId;
use fedtune_shared::round::{JoinRequest, UpdateHeader, UpdateTrailer};
use tonic::metadata::MetadataMap;

use crate::error::RoundError;

/// Issues and checks session tokens.
pub trait Authenticator: Send + Sync + 'static {
    /// Opens a session for a client that just joined; returns the bearer token. A client has at
    /// most one session: opening a new one revokes the old token.
    fn open_session(&self, client: &ClientId) -> Result<String, RoundError>;
    /// The client a token belongs to.
    fn authenticate(&self, token: &str) -> Result<ClientId, RoundError>;
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
    /// The federation id that session tokens and update signatures are bound to, if any.
    fn federation_id(&self) -> Option<String> {
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
}

/// Extracts the token of `authorization: Bearer <token>`.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, RoundError> {
    let value = metadata.get("authorization").ok_or_else(|| {
        RoundError::Unauthenticated("missing `authorization: Bearer <token>` metadata".into())
    })?;
    let text = value
        .to_str()
        .map_err(|_| RoundError::Unauthenticated("the authorization metadata is not ASCII".into()))?;
    text.strip_prefix("Bearer ").map(str::trim).filter(|t| !t.is_empty()).ok_or_else(|| {
        RoundError::Unauthenticated("the authorization metadata is not `Bearer <token>`".into())
    })
}

fn token_key(token: &str) -> [u8; 32] {
    // Only digests are kept, so a memory dump of the coordinator does not reveal live tokens.
    fedtune_shared::ids::Sha256::of(token.as_bytes()).0
}

#[derive(Debug, Default)]
struct Sessions {
    by_token: HashMap<[u8; 32], ClientId>,
    by_client: HashMap<ClientId, [u8; 32]>,
}

/// Opaque random session tokens (32 bytes from the OS CSPRNG, hex), valid until the client
/// joins again, leaves, or the coordinator restarts (agents then join again).
#[derive(Debug, Default)]
pub struct RandomTokens {
    sessions: RwLock<Sessions>,
}

impl Authenticator for RandomTokens {
    fn open_session(&self, client: &ClientId) -> Result<String, RoundError> {
        use ring::rand::SecureRandom;
        let mut raw = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| RoundError::Internal("the system random generator failed".into()))?;
        let token = hex::encode(raw);
        let key = token_key(&token);
        let mut s = self.sessions.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = s.by_client.insert(client.clone(), key) {
            s.by_token.remove(&old);
        }
        s.by_token.insert(key, client.clone());
        Ok(token)
    }

    fn authenticate(&self, token: &str) -> Result<ClientId, RoundError> {
        let s = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        s.by_token
            .get(&token_key(token))
            .cloned()
            .ok_or_else(|| RoundError::Unauthenticated("unknown or expired session token: join again".into()))
    }

    fn close_session(&self, client: &ClientId) {
        let mut s = self.sessions.write().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = s.by_client.remove(client) {
            s.by_token.remove(&key);
        }
    }
}

/// Accepts every update whose digest verified, signed or not. The default until identity keys
/// are wired in; a deployment that needs signed updates installs a verifying implementation.
#[derive(Debug, Default, Clone, Copy)]
pub struct SignaturesNotChecked;

impl UpdateVerifier for SignaturesNotChecked {
    fn verify(
        &self,
        _client: &ClientId,
        _header: &UpdateHeader,
        _trailer: &UpdateTrailer,
    ) -> Result<(), RoundError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    #[test]
    fn a_new_session_revokes_the_previous_token() {
        let a = RandomTokens::default();
        let t1 = a.open_session(&id("x")).unwrap();
        assert_eq!(a.authenticate(&t1).unwrap(), id("x"));
        let t2 = a.open_session(&id("x")).unwrap();
        assert_ne!(t1, t2);
        assert!(a.authenticate(&t1).is_err());
        assert_eq!(a.authenticate(&t2).unwrap(), id("x"));
        a.close_session(&id("x"));
        assert!(a.authenticate(&t2).is_err());
    }

    #[test]
    fn bearer_metadata_must_be_well_formed() {
        let mut m = MetadataMap::new();
        assert!(bearer(&m).is_err());
        m.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer(&m).is_err());
        m.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&m).unwrap(), "abc");
    }
}
