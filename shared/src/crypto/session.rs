//! Session tokens: what a client presents on every RPC after it has joined.
//!
//! The coordinator issues them and is the only party that checks them, so a MAC under a
//! coordinator secret is enough (no signatures, no per-token state): HMAC-SHA256 over a
//! domain-separated encoding of the claims.
//!
//! # Token format
//! `base64url(claims) "." base64url(tag)`, both without padding, where `claims` is
//! `version (u8) | len u16 BE | client id | len u16 BE | federation id | issued_at u64 BE |
//! expires_at u64 BE | nonce (16 bytes)`, followed in version 2 by the SHA-256 of the client
//! certificate (DER of the leaf) the session was opened over, and `tag = HMAC-SHA256(secret, len
//! u64 BE | "fedtune/v1/session" | len u64 BE | claims)`. Version 1 is a session opened without
//! a client certificate. Times are unix seconds, passed in by the caller so that tests (and
//! paused-time simulations) are deterministic. The claims are readable by anyone holding the
//! token; they are not secret, only unforgeable.
//!
//! # Why a certificate binding
//! Under mutual TLS a bearer token alone would let whoever copies it (a log, a proxy, a
//! compromised neighbour with its own valid certificate) act as the client from any machine the
//! CA trusts. Binding the token to the certificate's digest means a copied token is useless
//! without that certificate's private key. The binding is in the tagged claims, so nobody
//! without the session secret can move a token to another certificate.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use ring::hmac;

use super::files::{read_private_file, write_file_atomically, Overwrite, PRIVATE_FILE_MODE};
use super::{b64_decode, b64_encode, random_bytes, Canonical, CryptoError};

/// Context label of session-token tags.
pub const SESSION_CONTEXT: &str = "fedtune/v1/session";

/// Claims of a session opened without a client certificate.
const VERSION_UNBOUND: u8 = 1;
/// Claims of a session opened over mutual TLS: version 1's fields and the certificate digest.
const VERSION_BOUND: u8 = 2;
/// Longest token text accepted; anything longer is rejected before decoding so a hostile
/// header cannot make the coordinator allocate much.
const MAX_TOKEN_LEN: usize = 2048;
/// Longest client or federation id a token can carry (bytes).
pub const MAX_ID_LEN: usize = 255;
const SECRET_EXPECTED: &str = "session secret (base64url of 32 bytes)";

/// The coordinator's 32-byte HMAC key for session tokens. Persist it (see
/// [`SessionSecret::load_or_generate`]) so tokens survive a restart; rotate it to revoke all.
#[derive(Clone)]
pub struct SessionSecret([u8; 32]);

impl SessionSecret {
    /// 32 fresh bytes from the system CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        random_bytes().map(SessionSecret)
    }

    /// Wraps stored secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SessionSecret(bytes)
    }

    /// The secret bytes, for persisting.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// Loads the secret from `path` (base64url text, mode 0600 enforced), or, when the file does
    /// not exist, generates one and writes it there atomically with mode 0600.
    pub fn load_or_generate(path: &Path) -> Result<Self, CryptoError> {
        match read_private_file(path) {
            Ok(bytes) => {
                let invalid = |reason: String| CryptoError::InvalidFile {
                    path: path.to_path_buf(),
                    expected: SECRET_EXPECTED,
                    reason,
                };
                let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not UTF-8 text".into()))?;
                let raw = b64_decode(text.trim()).map_err(invalid)?;
                let raw = <[u8; 32]>::try_from(raw.as_slice())
                    .map_err(|_| invalid(format!("{} bytes, expected 32", raw.len())))?;
                Ok(SessionSecret(raw))
            }
            Err(CryptoError::FileMissing { .. }) => {
                let secret = SessionSecret::generate()?;
                let text = format!("{}\n", b64_encode(&secret.0));
                match write_file_atomically(path, text.as_bytes(), PRIVATE_FILE_MODE, Overwrite::Refuse) {
                    Ok(()) => Ok(secret),
                    // Another process created it first: use theirs so both agree.
                    Err(CryptoError::FileExists { .. }) => SessionSecret::load_or_generate(path),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

impl fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

/// A bearer credential. Whoever holds it acts as the client, so it is never printed:
/// `Debug` redacts it and the text is reached through [`SessionToken::expose_secret`].
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(String);

impl SessionToken {
    /// The token text, to put in a request header.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl From<String> for SessionToken {
    fn from(text: String) -> Self {
        SessionToken(text)
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

/// SHA-256 of a client certificate's DER encoding (the TLS leaf): what a session opened over
/// mutual TLS is bound to. Two distinct certificates (even for the same name and key) differ.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertificateDigest(pub [u8; 32]);

impl CertificateDigest {
    /// The digest of `der`, a certificate as it travelled in the TLS handshake.
    pub fn of_der(der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        CertificateDigest(out)
    }
}

impl fmt::Debug for CertificateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertificateDigest({})", hex_prefix(&self.0))
    }
}

impl fmt::Display for CertificateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}…", hex_prefix(&self.0))
    }
}

/// The first 8 bytes in hex: enough to tell certificates apart in a message or log.
fn hex_prefix(bytes: &[u8; 32]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What a verified session token asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClaims {
    /// The client the token was issued to.
    pub client_id: String,
    /// The federation it is valid in.
    pub federation_id: String,
    /// Unix seconds at issue.
    pub issued_at: u64,
    /// Unix seconds from which it is no longer accepted.
    pub expires_at: u64,
    /// Random bytes that make every token unique (and give logs a handle on one token).
    pub nonce: [u8; 16],
    /// The client certificate the session was opened over (version 2 claims), or `None` for a
    /// session opened without one (version 1).
    pub certificate: Option<CertificateDigest>,
}

impl SessionClaims {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 4 + self.client_id.len() + self.federation_id.len() + 64);
        out.push(if self.certificate.is_some() { VERSION_BOUND } else { VERSION_UNBOUND });
        for id in [&self.client_id, &self.federation_id] {
            // Lengths were checked against MAX_ID_LEN at issue.
            out.extend_from_slice(&(id.len() as u16).to_be_bytes());
            out.extend_from_slice(id.as_bytes());
        }
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        if let Some(cert) = &self.certificate {
            out.extend_from_slice(&cert.0);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut r = Reader(bytes);
        let version = r.take(1)?[0];
        if version != VERSION_UNBOUND && version != VERSION_BOUND {
            return Err(CryptoError::Malformed(format!(
                "unknown session token version {version} (this coordinator reads versions \
                 {VERSION_UNBOUND} and {VERSION_BOUND})"
            )));
        }
        let client_id = r.string()?;
        let federation_id = r.string()?;
        let issued_at = r.u64()?;
        let expires_at = r.u64()?;
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(r.take(16)?);
        let certificate = if version == VERSION_BOUND {
            let mut digest = [0u8; 32];
            digest.copy_from_slice(r.take(32)?);
            Some(CertificateDigest(digest))
        } else {
            None
        };
        if !r.0.is_empty() {
            return Err(CryptoError::Malformed("trailing bytes after session claims".into()));
        }
        Ok(SessionClaims { client_id, federation_id, issued_at, expires_at, nonce, certificate })
    }
}

impl SessionClaims {
    /// Whether these claims may be used on a call presenting `presented` (the SHA-256 of the
    /// caller's client certificate, `None` without mutual TLS).
    ///
    /// Strict both ways: a bound token only over its own certificate, and an unbound token
    /// (issued without a client certificate) never over a connection that presents one. The
    /// second direction matters when a coordinator is moved to mutual TLS while tokens from
    /// before are still alive: they would otherwise ride on whichever certificate a thief has.
    pub fn check_certificate(&self, presented: Option<CertificateDigest>) -> Result<(), CryptoError> {
        let refuse = |why: String| Err(CryptoError::WrongCertificate(why));
        match (self.certificate, presented) {
            (Some(bound), Some(presented)) if bound == presented => Ok(()),
            (None, None) => Ok(()),
            (Some(bound), Some(presented)) => refuse(format!(
                "session token is bound to the client certificate it was issued over ({bound}), \
                 but this call presents another one ({presented})"
            )),
            (Some(bound), None) => refuse(format!(
                "session token is bound to a client certificate ({bound}), but this call presents none"
            )),
            (None, Some(_)) => refuse(
                "session token was issued without a client certificate, but this call presents one".into(),
            ),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CryptoError> {
        if self.0.len() < n {
            return Err(CryptoError::Malformed("session claims are truncated".into()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, CryptoError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn string(&mut self) -> Result<String, CryptoError> {
        let len_bytes = self.take(2)?;
        let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| CryptoError::Malformed("identifier in session claims is not UTF-8".into()))
    }
}

/// Issues and verifies the session tokens of one federation.
pub struct SessionAuthority {
    key: hmac::Key,
    federation_id: String,
}

impl fmt::Debug for SessionAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionAuthority")
            .field("federation_id", &self.federation_id)
            .field("key", &format_args!("<redacted>"))
            .finish()
    }
}

impl SessionAuthority {
    /// An authority for `federation_id` keyed with the coordinator's secret.
    pub fn new(secret: &SessionSecret, federation_id: impl Into<String>) -> Self {
        SessionAuthority {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret.0),
            federation_id: federation_id.into(),
        }
    }

    /// The federation whose tokens this authority accepts.
    pub fn federation_id(&self) -> &str {
        &self.federation_id
    }

    /// A token for `client_id`, valid from `now` (unix seconds) for `ttl` (whole seconds;
    /// sub-second parts are dropped, and a TTL under one second is refused), bound to
    /// `certificate` when the session is opened over mutual TLS (version 2 claims).
    pub fn issue(
        &self,
        client_id: &str,
        certificate: Option<CertificateDigest>,
        ttl: Duration,
        now: u64,
    ) -> Result<SessionToken, CryptoError> {
        check_id("client id", client_id)?;
        check_id("federation id", &self.federation_id)?;
        if ttl.as_secs() == 0 {
            return Err(CryptoError::InvalidInput("session TTL must be at least one second".into()));
        }
        let claims = SessionClaims {
            client_id: client_id.to_owned(),
            federation_id: self.federation_id.clone(),
            issued_at: now,
            expires_at: now.saturating_add(ttl.as_secs()),
            nonce: random_bytes()?,
            certificate,
        };
        Ok(SessionToken(self.seal(&claims.encode())))
    }

    /// `base64url(claims).base64url(tag)`: the token text for encoded claims.
    fn seal(&self, encoded: &[u8]) -> String {
        let tag = hmac::sign(&self.key, &mac_input(encoded));
        format!("{}.{}", b64_encode(encoded), b64_encode(tag.as_ref()))
    }

    /// Checks `token` at time `now` (unix seconds). In order: structure
    /// ([`CryptoError::Malformed`]), tag in constant time ([`CryptoError::BadTag`]), federation
    /// ([`CryptoError::WrongFederation`]), lifetime ([`CryptoError::Expired`]).
    pub fn verify(&self, token: &str, now: u64) -> Result<SessionClaims, CryptoError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(CryptoError::Malformed(format!(
                "session token longer than {MAX_TOKEN_LEN} characters"
            )));
        }
        let (claims_text, tag_text) = token
            .split_once('.')
            .ok_or_else(|| CryptoError::Malformed("session token has no `.` separator".into()))?;
        let encoded = b64_decode(claims_text).map_err(|e| CryptoError::Malformed(format!("claims: {e}")))?;
        let tag = b64_decode(tag_text).map_err(|e| CryptoError::Malformed(format!("tag: {e}")))?;
        if tag.len() != hmac::HMAC_SHA256.digest_algorithm().output_len() {
            return Err(CryptoError::Malformed(format!("tag has {} bytes, expected 32", tag.len())));
        }
        hmac::verify(&self.key, &mac_input(&encoded), &tag).map_err(|_| CryptoError::BadTag)?;
        let claims = SessionClaims::decode(&encoded)?;
        if claims.federation_id != self.federation_id {
            return Err(CryptoError::WrongFederation {
                expected: self.federation_id.clone(),
                found: claims.federation_id,
            });
        }
        if now >= claims.expires_at {
            return Err(CryptoError::Expired { expires_at: claims.expires_at, now });
        }
        Ok(claims)
    }
}

/// Context label of join-challenge nonce tags.
pub const CHALLENGE_CONTEXT: &str = "fedtune/v1/challenge-nonce";

impl SessionAuthority {
    /// A stateless join-challenge nonce for `client_name`, valid until `expires_at_ms` (unix
    /// milliseconds): `random (8 bytes) | expires_at_ms u64 BE | tag (16 bytes)`, where `tag` is
    /// the first 16 bytes of `HMAC-SHA256(secret, len u64 BE | "fedtune/v1/challenge-nonce" |
    /// len u64 BE | federation id | len u64 BE | client name | random | expires_at_ms u64 BE)`.
    /// The coordinator stores nothing per challenge: [`SessionAuthority::check_challenge`]
    /// recomputes the tag, so a flood of challenges costs it no memory.
    pub fn issue_challenge(&self, client_name: &str, expires_at_ms: u64) -> Result<[u8; 32], CryptoError> {
        let random: [u8; 8] = random_bytes()?;
        let mut nonce = [0u8; 32];
        nonce[..8].copy_from_slice(&random);
        nonce[8..16].copy_from_slice(&expires_at_ms.to_be_bytes());
        let tag = self.challenge_tag(client_name, &nonce[..16]);
        nonce[16..].copy_from_slice(&tag);
        Ok(nonce)
    }

    /// Checks that `nonce` was issued by this authority to `client_name` ([`CryptoError::BadTag`],
    /// compared in constant time) and is not past its expiry at `now_ms`
    /// ([`CryptoError::Expired`], times in milliseconds). Returns its expiry (unix ms).
    pub fn check_challenge(
        &self,
        nonce: &[u8; 32],
        client_name: &str,
        now_ms: u64,
    ) -> Result<u64, CryptoError> {
        let tag = self.challenge_tag(client_name, &nonce[..16]);
        if !super::constant_time_eq(&tag, &nonce[16..]) {
            return Err(CryptoError::BadTag);
        }
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&nonce[8..16]);
        let expires_at = u64::from_be_bytes(expiry);
        if now_ms >= expires_at {
            return Err(CryptoError::Expired { expires_at, now: now_ms });
        }
        Ok(expires_at)
    }

    fn challenge_tag(&self, client_name: &str, head: &[u8]) -> [u8; 16] {
        let input =
            Canonical::new(CHALLENGE_CONTEXT).str(&self.federation_id).str(client_name).fixed(head).finish();
        let full = hmac::sign(&self.key, &input);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&full.as_ref()[..16]);
        tag
    }
}

fn mac_input(encoded_claims: &[u8]) -> Vec<u8> {
    Canonical::new(SESSION_CONTEXT).bytes(encoded_claims).finish()
}

fn check_id(what: &str, id: &str) -> Result<(), CryptoError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(CryptoError::InvalidInput(format!(
            "{what} must be 1..={MAX_ID_LEN} bytes, got {}",
            id.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const NOW: u64 = 1_750_000_000;
    const HOUR: Duration = Duration::from_secs(3600);

    fn authority(fed: &str) -> SessionAuthority {
        SessionAuthority::new(&SessionSecret::from_bytes([42; 32]), fed)
    }

    /// Claims of client `c`, valid for ten seconds from [`NOW`], bound to no certificate.
    fn unbound_claims(fed: &str) -> SessionClaims {
        SessionClaims {
            client_id: "c".into(),
            federation_id: fed.into(),
            issued_at: NOW,
            expires_at: NOW + 10,
            nonce: [0; 16],
            certificate: None,
        }
    }

    #[test]
    fn a_join_challenge_nonce_verifies_only_for_its_name_federation_and_lifetime() {
        let a = authority("fed-1");
        let nonce = a.issue_challenge("site-1", NOW * 1000 + 30_000).unwrap();
        assert_eq!(a.check_challenge(&nonce, "site-1", NOW * 1000).unwrap(), NOW * 1000 + 30_000);
        assert!(matches!(a.check_challenge(&nonce, "site-2", NOW * 1000), Err(CryptoError::BadTag)));
        assert!(matches!(
            authority("fed-2").check_challenge(&nonce, "site-1", NOW * 1000),
            Err(CryptoError::BadTag)
        ));
        assert!(matches!(
            a.check_challenge(&nonce, "site-1", NOW * 1000 + 30_000),
            Err(CryptoError::Expired { .. })
        ));
        // A later expiry written into the nonce breaks its tag.
        let mut stretched = nonce;
        stretched[15] ^= 1;
        assert!(matches!(a.check_challenge(&stretched, "site-1", NOW * 1000), Err(CryptoError::BadTag)));
        assert_ne!(a.issue_challenge("site-1", NOW * 1000 + 30_000).unwrap(), nonce);
    }

    #[test]
    fn a_fresh_token_verifies_to_the_claims_it_was_issued_with() {
        let auth = authority("fed-a");
        let token = auth.issue("site-1", None, HOUR, NOW).unwrap();
        let claims = auth.verify(token.expose_secret(), NOW + 10).unwrap();
        assert_eq!(claims.client_id, "site-1");
        assert_eq!(claims.federation_id, "fed-a");
        assert_eq!((claims.issued_at, claims.expires_at), (NOW, NOW + 3600));
    }

    #[test]
    fn two_tokens_for_the_same_client_differ() {
        let auth = authority("fed-a");
        let a = auth.issue("site-1", None, HOUR, NOW).unwrap();
        let b = auth.issue("site-1", None, HOUR, NOW).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn flipping_any_bit_of_the_claims_or_tag_gives_bad_tag() {
        let auth = authority("fed-a");
        let token = auth.issue("site-1", None, HOUR, NOW).unwrap();
        let (claims_text, tag_text) = token.expose_secret().split_once('.').unwrap();
        let claims = b64_decode(claims_text).unwrap();
        let tag = b64_decode(tag_text).unwrap();
        for i in 0..claims.len() {
            let mut forged = claims.clone();
            forged[i] ^= 0x01;
            let text = format!("{}.{}", b64_encode(&forged), tag_text);
            assert!(matches!(auth.verify(&text, NOW), Err(CryptoError::BadTag)), "claims byte {i}");
        }
        for i in 0..tag.len() {
            let mut forged = tag.clone();
            forged[i] ^= 0x80;
            let text = format!("{}.{}", claims_text, b64_encode(&forged));
            assert!(matches!(auth.verify(&text, NOW), Err(CryptoError::BadTag)), "tag byte {i}");
        }
    }

    #[test]
    fn a_token_minted_with_another_secret_gives_bad_tag() {
        let ours = authority("fed-a");
        let theirs = SessionAuthority::new(&SessionSecret::from_bytes([7; 32]), "fed-a");
        let token = theirs.issue("site-1", None, HOUR, NOW).unwrap();
        assert!(matches!(ours.verify(token.expose_secret(), NOW), Err(CryptoError::BadTag)));
    }

    #[test]
    fn a_token_is_refused_from_its_expiry_second_on() {
        let auth = authority("fed-a");
        let token = auth.issue("site-1", None, HOUR, NOW).unwrap();
        auth.verify(token.expose_secret(), NOW + 3599).unwrap();
        let err = auth.verify(token.expose_secret(), NOW + 3600).unwrap_err();
        assert!(
            matches!(err, CryptoError::Expired { expires_at, now } if expires_at == NOW + 3600 && now == NOW + 3600)
        );
    }

    #[test]
    fn a_genuine_token_of_another_federation_is_refused_as_wrong_federation() {
        let token = authority("fed-b").issue("site-1", None, HOUR, NOW).unwrap();
        let err = authority("fed-a").verify(token.expose_secret(), NOW).unwrap_err();
        assert!(
            matches!(&err, CryptoError::WrongFederation { expected, found } if expected == "fed-a" && found == "fed-b"),
            "{err}"
        );
    }

    #[test]
    fn structurally_broken_tokens_are_malformed() {
        let auth = authority("fed-a");
        let token = auth.issue("site-1", None, HOUR, NOW).unwrap();
        let text = token.expose_secret();
        let (claims_text, tag_text) = text.split_once('.').unwrap();
        let short_tag = &tag_text[..10];
        for bad in [
            "",
            "no-separator",
            ".",
            "!!!.???",
            &format!("{claims_text}.{short_tag}"),
            &format!("{claims_text}+.{tag_text}"),
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(matches!(auth.verify(bad, NOW), Err(CryptoError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn correctly_tagged_but_unparseable_claims_are_malformed_not_accepted() {
        // Only someone holding the secret could produce these; decoding must still be strict.
        let auth = authority("fed-a");
        let good = unbound_claims("fed-a").encode();
        let mut trailing = good.clone();
        trailing.push(0);
        // Version 2 announces a certificate digest these claims lack: truncated, not accepted.
        let mut version = good.clone();
        version[0] = 2;
        let mut unknown = good.clone();
        unknown[0] = 3;
        for encoded in [good[..good.len() - 1].to_vec(), trailing, version, unknown] {
            assert!(matches!(auth.verify(&auth.seal(&encoded), NOW), Err(CryptoError::Malformed(_))));
        }
    }

    #[test]
    fn an_unknown_claims_version_is_refused_naming_the_versions_read() {
        let auth = authority("fed-a");
        let mut encoded = unbound_claims("fed-a").encode();
        encoded[0] = 7;
        let err = auth.verify(&auth.seal(&encoded), NOW).unwrap_err().to_string();
        assert!(err.contains("unknown session token version 7") && err.contains("versions 1 and 2"), "{err}");
    }

    #[test]
    fn a_session_without_a_certificate_gets_version_1_claims_and_reads_back_unbound() {
        let auth = authority("fed-a");
        let token = auth.issue("site-1", None, HOUR, NOW).unwrap();
        let claims = b64_decode(token.expose_secret().split_once('.').unwrap().0).unwrap();
        assert_eq!(claims[0], 1);
        assert_eq!(claims.len(), 1 + 2 + 6 + 2 + 5 + 8 + 8 + 16);
        assert_eq!(auth.verify(token.expose_secret(), NOW).unwrap().certificate, None);
    }

    #[test]
    fn a_session_over_a_certificate_gets_version_2_claims_ending_in_its_digest() {
        let auth = authority("fed-a");
        let digest = CertificateDigest::of_der(b"not really DER, any bytes will do");
        let token = auth.issue("site-1", Some(digest), HOUR, NOW).unwrap();
        let claims = b64_decode(token.expose_secret().split_once('.').unwrap().0).unwrap();
        assert_eq!(claims[0], 2);
        assert_eq!(claims.len(), 1 + 2 + 6 + 2 + 5 + 8 + 8 + 16 + 32);
        assert_eq!(&claims[claims.len() - 32..], &digest.0);
        let read = auth.verify(token.expose_secret(), NOW).unwrap();
        assert_eq!(read.certificate, Some(digest));
        assert_eq!(read.client_id, "site-1");
        // Cutting the digest off (and re-tagging would need the secret) is a bad tag, not an
        // unbound token.
        let tag = token.expose_secret().split_once('.').unwrap().1;
        let cut = format!("{}.{tag}", b64_encode(&claims[..claims.len() - 32]));
        assert!(auth.verify(&cut, NOW).is_err());
    }

    #[test]
    fn claims_serve_only_calls_presenting_the_certificate_they_were_issued_over() {
        let auth = authority("fed-a");
        let ours = CertificateDigest::of_der(b"site-1's certificate");
        let theirs = CertificateDigest::of_der(b"site-2's certificate");
        let bound = auth.issue("site-1", Some(ours), HOUR, NOW).unwrap();
        let bound = auth.verify(bound.expose_secret(), NOW).unwrap();
        bound.check_certificate(Some(ours)).unwrap();
        let other = bound.check_certificate(Some(theirs)).unwrap_err().to_string();
        assert!(other.contains("presents another one"), "{other}");
        let none = bound.check_certificate(None).unwrap_err().to_string();
        assert!(none.contains("presents none"), "{none}");
        let unbound = auth.issue("site-1", None, HOUR, NOW).unwrap();
        let unbound = auth.verify(unbound.expose_secret(), NOW).unwrap();
        unbound.check_certificate(None).unwrap();
        let over_tls = unbound.check_certificate(Some(ours)).unwrap_err().to_string();
        assert!(over_tls.contains("issued without a client certificate"), "{over_tls}");
    }

    #[test]
    fn the_certificate_digest_is_sha256_of_the_der_bytes() {
        let d = CertificateDigest::of_der(b"abc");
        let hex: String = d.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_ne!(CertificateDigest::of_der(b"abd"), d);
        assert_eq!(d.to_string(), "sha256:ba7816bf8f01cfea…");
    }

    #[test]
    fn issuing_checks_its_inputs() {
        let auth = authority("fed-a");
        assert!(matches!(auth.issue("", None, HOUR, NOW), Err(CryptoError::InvalidInput(_))));
        assert!(matches!(auth.issue(&"x".repeat(256), None, HOUR, NOW), Err(CryptoError::InvalidInput(_))));
        assert!(matches!(
            auth.issue("c", None, Duration::from_millis(999), NOW),
            Err(CryptoError::InvalidInput(_))
        ));
    }

    #[test]
    fn secrets_and_tokens_are_redacted_in_debug_output() {
        let secret = SessionSecret::from_bytes([0xab; 32]);
        let token = SessionAuthority::new(&secret, "fed-a").issue("site-1", None, HOUR, NOW).unwrap();
        for debug in [format!("{secret:?}"), format!("{token:?}"), format!("{:?}", authority("fed-a"))] {
            assert!(debug.contains("<redacted>"), "{debug}");
            assert!(!debug.contains("abab") && !debug.contains("q6ur"), "{debug}");
            assert!(!debug.contains(token.expose_secret()), "{debug}");
        }
    }

    #[test]
    fn the_session_secret_is_persisted_once_with_mode_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.secret");
        let first = SessionSecret::load_or_generate(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
        let again = SessionSecret::load_or_generate(&path).unwrap();
        assert_eq!(first.to_bytes(), again.to_bytes());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(SessionSecret::load_or_generate(&path), Err(CryptoError::InsecureFileMode { .. })));
    }
}
