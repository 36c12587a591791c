//! [`ClientAuth`]: who may join, who is calling, and whether an upload is really theirs.
//!
//! ```text
//! JoinChallenge(name) ─► allowlisted or enrolling? ─► nonce: random | expiry | HMAC tag over
//!                        (federation, name, random, expiry) under the session secret; nothing stored
//! Join(name, nonce, sig) ─► tag and expiry check ─► name allowlisted? ─► sig over (nonce,
//!                           federation, name) verifies with the allowlisted key? ─► nonce not used
//!                           before (replay set, until its expiry) ─► HMAC session token (session_ttl)
//! any call (Bearer token) ─► HMAC tag, federation, expiry ─► same client certificate as at
//!                           join (or none on both) ─► the client's current session?
//!                           ─► still allowlisted (read per call: revocation is immediate)
//! upload trailer ─► still allowlisted ─► Ed25519 signature over (federation, round, attempt, client,
//!                   manifest, payload SHA-256, examples) verifies ─► only then folded
//! ```
//!
//! Session tokens are stateless HMACs (the secret is `session.key`, 0600, in the state
//! directory), but each client has one *current* token: a new join replaces it and `Leave`
//! ends it, as the protocol promises. That table is in memory, so after a restart clients join
//! again, which they must anyway because the registry's sessions are in memory too.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fedtune_shared::auth::{
    verify_masked_upload, verify_upload, ChallengeGrant, ChallengeRequest, EnrollRequest, JoinProof,
};
use fedtune_shared::crypto::{
    verify_challenge, CertificateDigest, CryptoError, OperatorCheck, OperatorToken, SessionAuthority,
    SessionSecret, OPERATOR_TOKEN_FILE,
};
use fedtune_shared::ids::ClientId;
use fedtune_shared::round::{JoinRequest, MaskedUpdateHeader, UpdateHeader, UpdateTrailer};
use tracing::{info, warn};

use super::allowlist::{unix_now, Allowlist, AllowlistError, Standing};
use super::seams::{Authenticator, UpdateVerifier};
use crate::error::RoundError;
use crate::settings::SecuritySettings;

/// File name of the session HMAC secret in the state directory.
pub const SESSION_SECRET_FILE: &str = "session.key";

/// Errors setting up client authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// The allowlist database.
    #[error(transparent)]
    Allowlist(#[from] AllowlistError),
    /// The session secret file.
    #[error("session secret or operator token: {0}")]
    Secret(#[from] CryptoError),
}

/// Allowlist + join challenges + HMAC sessions + update signatures.
pub struct ClientAuth {
    federation_id: String,
    authority: SessionAuthority,
    operator: OperatorCheck,
    allowlist: Arc<Allowlist>,
    /// Nonces that opened a session, until they expire (unix ms): what keeps a stateless
    /// challenge single-use. Only successful joins add to it, so a flood cannot grow it.
    used_challenges: Mutex<HashMap<[u8; 32], u64>>,
    sessions: RwLock<HashMap<ClientId, [u8; 16]>>,
    session_ttl: Duration,
    challenge_ttl: Duration,
    max_pending: usize,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("federation_id", &self.federation_id)
            .field("session_ttl", &self.session_ttl)
            .finish_non_exhaustive()
    }
}

fn internal(e: AllowlistError) -> RoundError {
    RoundError::Internal(e.to_string())
}

/// The one answer to every refused enrollment (unknown name, wrong, expired or used token, a
/// name already allowlisted).
pub const ENROLLMENT_REFUSED: &str =
    "enrollment refused: no valid enrollment token for this name (unknown, wrong, expired or already used)";

/// The one answer to a join challenge for a name that may not join, whether it was never
/// allowlisted or was revoked, so the answer does not tell which names exist.
fn not_admitted(name: &ClientId) -> RoundError {
    RoundError::Forbidden(format!(
        "client `{name}` is not allowlisted (or was revoked): ask the operator to run \
         `fedtune-coordinator clients add` or to issue an enrollment token"
    ))
}

fn now_ms() -> u64 {
    fedtune_shared::clock::now_ms()
}

impl ClientAuth {
    /// Join challenges this gate holds state for (nonces that opened a session and have not
    /// expired yet). Issuing challenges adds nothing, so a flood of them leaves this unchanged.
    pub fn stored_challenges(&self) -> usize {
        self.used_challenges.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Opens the allowlist of `state_dir`, loads (or creates, 0600) its session secret and its
    /// operator token, and reads (or creates) its federation id.
    pub fn open(state_dir: &Path, settings: &SecuritySettings) -> Result<Self, AuthSetupError> {
        let allowlist = Arc::new(Allowlist::open(state_dir)?);
        let federation_id = allowlist.federation_id()?;
        let secret = SessionSecret::load_or_generate(&state_dir.join(SESSION_SECRET_FILE))?;
        let operator = OperatorToken::load_or_generate(&state_dir.join(OPERATOR_TOKEN_FILE))?.check()?;
        Ok(Self {
            authority: SessionAuthority::new(&secret, federation_id.clone()),
            operator,
            federation_id,
            allowlist,
            used_challenges: Mutex::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
            session_ttl: settings.session_ttl,
            challenge_ttl: settings.challenge_ttl,
            max_pending: settings.limits.max_pending_challenges,
        })
    }

    /// The allowlist this gate reads.
    pub fn allowlist(&self) -> &Arc<Allowlist> {
        &self.allowlist
    }

    fn allowed_key(&self, client: &ClientId) -> Result<fedtune_shared::crypto::PublicKey, RoundError> {
        match self.allowlist.standing(client).map_err(internal)? {
            Standing::Allowed(key) => Ok(key),
            Standing::Revoked => Err(RoundError::Forbidden(format!("client `{client}` has been revoked"))),
            Standing::Unknown => Err(RoundError::Forbidden(format!(
                "client `{client}` is not allowlisted: ask the operator to run `fedtune-coordinator clients add` \
                 or to issue an enrollment token"
            ))),
        }
    }
}

impl Authenticator for ClientAuth {
    fn identity(&self, client: &ClientId) -> Option<fedtune_shared::crypto::PublicKey> {
        // Read at selection: a client revoked since it joined is left out of the roster.
        match self.allowlist.standing(client) {
            Ok(Standing::Allowed(key)) => Some(key),
            _ => None,
        }
    }

    fn challenge(&self, request: &ChallengeRequest) -> Result<ChallengeGrant, RoundError> {
        let name = &request.name;
        let may_join = matches!(self.allowlist.standing(name).map_err(internal)?, Standing::Allowed(_))
            || self.allowlist.enrolling(name, unix_now()).map_err(internal)?;
        if !may_join {
            return Err(not_admitted(name));
        }
        let expires_at = now_ms().saturating_add(self.challenge_ttl.as_millis() as u64);
        let nonce = self
            .authority
            .issue_challenge(name.as_str(), expires_at)
            .map_err(|e| RoundError::Internal(e.to_string()))?;
        Ok(ChallengeGrant {
            nonce,
            federation_id: self.federation_id.clone(),
            expires_in: self.challenge_ttl,
        })
    }

    fn admit(&self, join: &JoinRequest, proof: Option<&JoinProof>) -> Result<(), RoundError> {
        let name = join.name.as_ref().ok_or_else(|| {
            RoundError::Unauthenticated(
                "joining needs a client name (the one allowlisted for your key)".into(),
            )
        })?;
        let proof = proof.ok_or_else(|| {
            RoundError::Unauthenticated(
                "joining needs a signed challenge: call JoinChallenge and sign its nonce with your key"
                    .into(),
            )
        })?;
        let stale = || {
            RoundError::Unauthenticated(
                "unknown, already used, expired or foreign join challenge: request a new one".into(),
            )
        };
        let expires_at =
            self.authority.check_challenge(&proof.nonce, name.as_str(), now_ms()).map_err(|_| stale())?;
        let key = self.allowed_key(name)?;
        if join.public_key.is_some_and(|offered| offered != *key.as_bytes()) {
            return Err(RoundError::Forbidden(format!("a different public key is allowlisted for `{name}`")));
        }
        let challenge = fedtune_shared::crypto::Challenge {
            nonce: proof.nonce,
            federation_id: self.federation_id.clone(),
            client_name: name.as_str().to_owned(),
        };
        verify_challenge(&key, &challenge, &proof.signature).map_err(|_| {
            warn!(client = %name, "join challenge signature does not verify");
            RoundError::Unauthenticated(format!(
                "the challenge signature does not verify with the key allowlisted for `{name}`"
            ))
        })?;
        // Spent only by a join that passed every check, so nobody but the key holder can fill
        // this set; inserting under the lock also settles two racing joins with one nonce.
        let now = now_ms();
        let mut used = self.used_challenges.lock().unwrap_or_else(|p| p.into_inner());
        if used.len() >= self.max_pending {
            used.retain(|_, expiry| *expiry > now);
            if used.len() >= self.max_pending {
                return Err(RoundError::Limited(format!(
                    "{} joins within one challenge lifetime; retry shortly",
                    self.max_pending
                )));
            }
        }
        if used.insert(proof.nonce, expires_at).is_some() {
            return Err(stale());
        }
        Ok(())
    }

    fn enroll(&self, request: &EnrollRequest) -> Result<ClientId, RoundError> {
        match self.allowlist.enroll(&request.name, &request.token, &request.public_key, unix_now()) {
            Ok(()) => {
                info!(client = %request.name, key = %request.public_key, "client enrolled with a one-time token");
                Ok(request.name.clone())
            }
            Err(e @ (AllowlistError::Storage(_) | AllowlistError::Io { .. } | AllowlistError::Crypto(_))) => {
                Err(internal(e))
            }
            Err(e) => {
                // The reason stays in the log: the caller learns nothing about which names
                // exist or hold tokens.
                warn!(client = %request.name, reason = %e, "enrollment refused");
                Err(RoundError::Forbidden(ENROLLMENT_REFUSED.into()))
            }
        }
    }

    fn operator(&self, token: &str) -> Result<(), RoundError> {
        if self.operator.matches(token) {
            Ok(())
        } else {
            warn!("a GetStatus call presented a token that is not the operator token");
            Err(RoundError::Unauthenticated(format!(
                "not the operator token (the coordinator keeps it in <state_dir>/{OPERATOR_TOKEN_FILE})"
            )))
        }
    }

    fn federation_id(&self) -> Option<String> {
        Some(self.federation_id.clone())
    }

    fn open_session(
        &self,
        client: &ClientId,
        certificate: Option<CertificateDigest>,
    ) -> Result<String, RoundError> {
        let token = self
            .authority
            .issue(client.as_str(), certificate, self.session_ttl, unix_now())
            .map_err(|e| RoundError::Internal(e.to_string()))?;
        let claims = self
            .authority
            .verify(token.expose_secret(), unix_now())
            .map_err(|e| RoundError::Internal(e.to_string()))?;
        self.sessions.write().unwrap_or_else(|p| p.into_inner()).insert(client.clone(), claims.nonce);
        Ok(token.expose_secret().to_owned())
    }

    fn authenticate(
        &self,
        token: &str,
        certificate: Option<CertificateDigest>,
    ) -> Result<ClientId, RoundError> {
        let claims = self.authority.verify(token, unix_now()).map_err(|e| match e {
            CryptoError::Expired { .. } => {
                RoundError::Unauthenticated(format!("session token {e}: join again"))
            }
            other => RoundError::Unauthenticated(format!("invalid session token ({other}): join again")),
        })?;
        let client = ClientId::parse(&claims.client_id).map_err(|_| {
            RoundError::Unauthenticated("invalid session token (bad client id): join again".into())
        })?;
        claims.check_certificate(certificate).map_err(|e| {
            warn!(client = %client, reason = %e, "session token presented over the wrong client certificate");
            RoundError::Unauthenticated(format!(
                "{e}: a session token is valid only over the client certificate it was issued over; \
                 join again over this connection"
            ))
        })?;
        let current = self.sessions.read().unwrap_or_else(|p| p.into_inner()).get(&client).copied();
        if current != Some(claims.nonce) {
            return Err(RoundError::Unauthenticated(
                "session token was replaced by a newer join, closed, or predates a coordinator restart: join again"
                    .into(),
            ));
        }
        self.allowed_key(&client)?;
        Ok(client)
    }

    fn close_session(&self, client: &ClientId) {
        self.sessions.write().unwrap_or_else(|p| p.into_inner()).remove(client);
    }
}

impl ClientAuth {
    /// Checks an upload's signature with `check` against the client's allowlisted key, read
    /// again at the trailer: a client revoked while its upload streamed is refused here.
    fn check_upload<E: std::fmt::Display>(
        &self,
        client: &ClientId,
        round: u64,
        what: &str,
        check: impl FnOnce(&fedtune_shared::crypto::PublicKey) -> Result<(), E>,
    ) -> Result<(), RoundError> {
        let key = self.allowed_key(client)?;
        check(&key).map_err(|e| {
            warn!(client = %client, round, reason = %e, "{what} signature refused");
            RoundError::BadSignature(e.to_string())
        })
    }
}

impl UpdateVerifier for ClientAuth {
    fn verify(
        &self,
        client: &ClientId,
        header: &UpdateHeader,
        trailer: &UpdateTrailer,
    ) -> Result<(), RoundError> {
        self.check_upload(client, header.id.round, "update", |key| {
            verify_upload(
                key,
                &self.federation_id,
                client,
                header,
                &trailer.payload_digest,
                trailer.signature.as_ref(),
            )
        })
    }

    fn verify_masked(
        &self,
        client: &ClientId,
        header: &MaskedUpdateHeader,
        trailer: &UpdateTrailer,
    ) -> Result<(), RoundError> {
        self.check_upload(client, header.header.id.round, "masked update", |key| {
            verify_masked_upload(
                key,
                &self.federation_id,
                client,
                header,
                &trailer.payload_digest,
                trailer.signature.as_ref(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fedtune_shared::auth::sign_upload;
    use fedtune_shared::crypto::KeyPair;
    use fedtune_shared::ids::{ModelVersion, RoundId, Sha256};
    use fedtune_shared::pb::PROTOCOL_VERSION;

    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    fn join(name: &str) -> JoinRequest {
        JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            name: Some(id(name)),
            public_key: None,
            train_examples: 1,
            eval_examples: 0,
            agent_version: String::new(),
        }
    }

    fn gate(dir: &Path) -> ClientAuth {
        ClientAuth::open(dir, &SecuritySettings::default()).unwrap()
    }

    fn admitted(g: &ClientAuth, key: &KeyPair, name: &str) -> Result<(), RoundError> {
        let grant = g.challenge(&ChallengeRequest { name: id(name) }).unwrap();
        g.admit(&join(name), Some(&JoinProof::answer(key, &grant, &id(name))))
    }

    #[tokio::test]
    async fn only_an_allowlisted_key_answering_a_fresh_challenge_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let g = gate(dir.path());
        let (key, stranger) =
            (KeyPair::generate_ephemeral().unwrap(), KeyPair::generate_ephemeral().unwrap());
        // Neither allowlisted nor enrolling: no challenge at all, with one answer for an unknown
        // and a revoked name.
        let unknown = g.challenge(&ChallengeRequest { name: id("a") }).unwrap_err();
        assert!(matches!(unknown, RoundError::Forbidden(_)), "{unknown}");
        g.allowlist().add(&id("r"), &key.public_key()).unwrap();
        g.allowlist().revoke(&id("r")).unwrap();
        let revoked = g.challenge(&ChallengeRequest { name: id("r") }).unwrap_err();
        assert_eq!(revoked.to_string(), unknown.to_string().replace("`a`", "`r`"));
        g.allowlist().issue_enrollment_token(&id("enrolling"), Duration::from_secs(60)).unwrap();
        g.challenge(&ChallengeRequest { name: id("enrolling") }).unwrap();
        g.allowlist().add(&id("a"), &key.public_key()).unwrap();
        admitted(&g, &key, "a").unwrap();
        assert!(matches!(admitted(&g, &stranger, "a"), Err(RoundError::Unauthenticated(_))));
        assert!(matches!(g.admit(&join("a"), None), Err(RoundError::Unauthenticated(_))));

        // A nonce works once, and only for the name it was issued to.
        let grant = g.challenge(&ChallengeRequest { name: id("a") }).unwrap();
        let proof = JoinProof::answer(&key, &grant, &id("a"));
        g.admit(&join("a"), Some(&proof)).unwrap();
        assert!(matches!(g.admit(&join("a"), Some(&proof)), Err(RoundError::Unauthenticated(_))));
        g.allowlist().add(&id("b"), &key.public_key()).unwrap();
        let grant = g.challenge(&ChallengeRequest { name: id("a") }).unwrap();
        let proof = JoinProof::answer(&key, &grant, &id("b"));
        assert!(matches!(g.admit(&join("b"), Some(&proof)), Err(RoundError::Unauthenticated(_))));
    }

    #[tokio::test]
    async fn a_session_dies_on_rejoin_leave_and_revocation_and_forgeries_fail() {
        let dir = tempfile::tempdir().unwrap();
        let g = gate(dir.path());
        let key = KeyPair::generate_ephemeral().unwrap();
        g.allowlist().add(&id("a"), &key.public_key()).unwrap();
        let t1 = g.open_session(&id("a"), None).unwrap();
        assert_eq!(g.authenticate(&t1, None).unwrap(), id("a"));
        let t2 = g.open_session(&id("a"), None).unwrap();
        assert!(matches!(g.authenticate(&t1, None), Err(RoundError::Unauthenticated(_))));
        let mut forged = t2.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert!(matches!(
            g.authenticate(&String::from_utf8(forged).unwrap(), None),
            Err(RoundError::Unauthenticated(_))
        ));
        // A token from another coordinator (another secret) is refused.
        let other = tempfile::tempdir().unwrap();
        let elsewhere = gate(other.path());
        elsewhere.allowlist().add(&id("a"), &key.public_key()).unwrap();
        let foreign = elsewhere.open_session(&id("a"), None).unwrap();
        assert!(matches!(g.authenticate(&foreign, None), Err(RoundError::Unauthenticated(_))));

        g.allowlist().revoke(&id("a")).unwrap();
        assert!(matches!(g.authenticate(&t2, None), Err(RoundError::Forbidden(_))));
        g.allowlist().add(&id("a"), &key.public_key()).unwrap();
        g.authenticate(&t2, None).unwrap();
        g.close_session(&id("a"));
        assert!(matches!(g.authenticate(&t2, None), Err(RoundError::Unauthenticated(_))));
    }

    #[tokio::test]
    async fn a_session_opened_over_a_certificate_serves_only_calls_over_that_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let g = gate(dir.path());
        let key = KeyPair::generate_ephemeral().unwrap();
        g.allowlist().add(&id("a"), &key.public_key()).unwrap();
        let ours = CertificateDigest::of_der(b"a's certificate");
        let token = g.open_session(&id("a"), Some(ours)).unwrap();
        assert_eq!(g.authenticate(&token, Some(ours)).unwrap(), id("a"));
        for presented in [Some(CertificateDigest::of_der(b"b's certificate")), None] {
            let err = g.authenticate(&token, presented).unwrap_err();
            assert!(matches!(err, RoundError::Unauthenticated(_)), "{err}");
            assert!(err.to_string().contains("valid only over the client certificate"), "{err}");
        }
        let unbound = g.open_session(&id("a"), None).unwrap();
        let err = g.authenticate(&unbound, Some(ours)).unwrap_err();
        assert!(err.to_string().contains("issued without a client certificate"), "{err}");
    }

    #[tokio::test]
    async fn an_expired_session_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let g = gate(dir.path());
        let key = KeyPair::generate_ephemeral().unwrap();
        g.allowlist().add(&id("a"), &key.public_key()).unwrap();
        g.open_session(&id("a"), None).unwrap();
        // A genuine token for `a` issued long ago, under the persisted secret.
        let secret = SessionSecret::load_or_generate(&dir.path().join(SESSION_SECRET_FILE)).unwrap();
        let old = SessionAuthority::new(&secret, g.federation_id().unwrap())
            .issue("a", None, Duration::from_secs(60), unix_now() - 3600)
            .unwrap();
        let err = g.authenticate(old.expose_secret(), None).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(!err.to_string().contains(old.expose_secret()));
    }

    #[tokio::test]
    async fn an_update_must_be_signed_by_the_allowlisted_key_for_this_federation() {
        let dir = tempfile::tempdir().unwrap();
        let g = gate(dir.path());
        let (key, stranger) =
            (KeyPair::generate_ephemeral().unwrap(), KeyPair::generate_ephemeral().unwrap());
        g.allowlist().add(&id("a"), &key.public_key()).unwrap();
        let header = UpdateHeader {
            id: RoundId::new(1, 0),
            base_version: ModelVersion(0),
            num_examples: 5,
            metrics: BTreeMap::new(),
            manifest_digest: Sha256([1; 32]),
            total_bytes: 4,
            encoding: Default::default(),
        };
        let digest = Sha256([2; 32]);
        let fed = g.federation_id().unwrap();
        let trailer = |sig| UpdateTrailer { payload_digest: digest, signature: Some(sig) };
        g.verify(&id("a"), &header, &trailer(sign_upload(&key, &fed, &id("a"), &header, &digest))).unwrap();
        let wrong = [
            sign_upload(&stranger, &fed, &id("a"), &header, &digest),
            sign_upload(&key, "fed-other", &id("a"), &header, &digest),
        ];
        for sig in wrong {
            assert!(matches!(g.verify(&id("a"), &header, &trailer(sig)), Err(RoundError::BadSignature(_))));
        }
        let unsigned = UpdateTrailer { payload_digest: digest, signature: None };
        assert!(matches!(g.verify(&id("a"), &header, &unsigned), Err(RoundError::BadSignature(_))));
        g.allowlist().revoke(&id("a")).unwrap();
        let good = trailer(sign_upload(&key, &fed, &id("a"), &header, &digest));
        assert!(matches!(g.verify(&id("a"), &header, &good), Err(RoundError::Forbidden(_))));
    }
}
