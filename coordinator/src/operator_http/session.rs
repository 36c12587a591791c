//! Who may read the status page: a request presenting the operator token
//! (`Authorization: Bearer <token>`, checked by the [`Authenticator`] seam exactly like
//! `GetStatus`, in constant time), or a browser holding a session cookie the login form issued.
//!
//! The cookie never holds the token: it is an expiry and a random nonce, MACed (HMAC-SHA-256)
//! under a key drawn at start-up, so it proves the holder typed the token recently, cannot be
//! forged or extended, and dies with the process. It is `HttpOnly` (no script reads it) and
//! `SameSite=Strict` (no other site's page sends it), and not `Secure`, because the operator
//! port speaks plain HTTP on a private network.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use fedtune_shared::crypto::OperatorCheck;

use crate::auth::Authenticator;

/// The session cookie's name.
pub const COOKIE: &str = "fedtune_operator";

/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

const NONCE_BYTES: usize = 16;
const TAG_BYTES: usize = 32;

/// Issues and checks operator session cookies.
pub struct Sessions {
    key: hmac::Key,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions(<key redacted>)")
    }
}

/// The random source failed (no session can be issued).
#[derive(Debug, thiserror::Error)]
#[error("the system random source failed")]
pub struct RandomFailed;

impl Sessions {
    /// Sessions under a fresh random key.
    pub fn new() -> Result<Self, RandomFailed> {
        let rng = SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| RandomFailed)?;
        Ok(Self { key, rng })
    }

    /// A cookie value valid until `now + SESSION_TTL`: hex of expiry (u64 s, big-endian) ‖ nonce ‖
    /// HMAC(expiry ‖ nonce).
    pub fn issue(&self, now: SystemTime) -> Result<String, RandomFailed> {
        let expiry = unix_secs(now) + SESSION_TTL.as_secs();
        let mut body = [0u8; 8 + NONCE_BYTES];
        body[..8].copy_from_slice(&expiry.to_be_bytes());
        self.rng.fill(&mut body[8..]).map_err(|_| RandomFailed)?;
        let tag = hmac::sign(&self.key, &body);
        Ok(format!("{}{}", hex::encode(body), hex::encode(tag.as_ref())))
    }

    /// Whether `value` is a cookie this process issued and it has not expired (the tag is
    /// compared in constant time by `ring::hmac::verify`).
    pub fn verify(&self, value: &str, now: SystemTime) -> bool {
        let Ok(raw) = hex::decode(value) else { return false };
        if raw.len() != 8 + NONCE_BYTES + TAG_BYTES {
            return false;
        }
        let (body, tag) = raw.split_at(8 + NONCE_BYTES);
        if hmac::verify(&self.key, body, tag).is_err() {
            return false;
        }
        let expiry = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
        unix_secs(now) < expiry
    }

    /// The `Set-Cookie` value for a new session.
    pub fn set_cookie(&self, now: SystemTime) -> Result<String, RandomFailed> {
        Ok(format!(
            "{COOKIE}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict",
            self.issue(now)?,
            SESSION_TTL.as_secs()
        ))
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

/// Whether the request is the operator's: a bearer token the authenticator accepts as the
/// operator token, or a valid session cookie. A bearer token that is not the operator token
/// refuses the request even with a valid cookie, as `GetStatus` refuses rather than downgrades.
pub fn is_operator(
    headers: &HeaderMap,
    auth: &dyn Authenticator,
    sessions: &Sessions,
    now: SystemTime,
) -> bool {
    if headers.contains_key(header::AUTHORIZATION) {
        return bearer(headers).is_some_and(|t| auth.operator(t).is_ok());
    }
    cookie(headers, COOKIE).is_some_and(|c| sessions.verify(c, now))
}

/// The request's bearer token (`Authorization: Bearer <token>`), if it has a non-empty one.
/// Both credentials of this port are read through it: the operator token here, the metrics
/// token by `/metrics`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    Some(value.strip_prefix("Bearer ")?.trim()).filter(|t| !t.is_empty())
}

/// Whether the request presents the metrics token as its bearer token, compared in constant
/// time like the operator token (the same [`OperatorCheck`]).
pub fn is_scraper(headers: &HeaderMap, metrics_token: &OperatorCheck) -> bool {
    bearer(headers).is_some_and(|t| metrics_token.matches(t))
}

#[cfg(test)]
mod tests {
    use fedtune_shared::crypto::CertificateDigest;
    use fedtune_shared::ids::ClientId;

    use super::*;
    use crate::error::RoundError;

    /// An authenticator whose operator token is `right`.
    struct Operator(&'static str);

    impl Authenticator for Operator {
        fn open_session(&self, _: &ClientId, _: Option<CertificateDigest>) -> Result<String, RoundError> {
            unreachable!("no client sessions here")
        }
        fn authenticate(&self, _: &str, _: Option<CertificateDigest>) -> Result<ClientId, RoundError> {
            Err(RoundError::Unauthenticated("no clients".into()))
        }
        fn close_session(&self, _: &ClientId) {}
        fn operator(&self, token: &str) -> Result<(), RoundError> {
            if token == self.0 {
                Ok(())
            } else {
                Err(RoundError::Unauthenticated("not the operator token".into()))
            }
        }
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (k.clone(), v.parse().unwrap())).collect()
    }

    #[test]
    fn only_the_operator_bearer_token_or_a_live_session_cookie_is_the_operator() {
        let sessions = Sessions::new().unwrap();
        let auth = Operator("right");
        let now = SystemTime::now();
        let cookie = sessions.issue(now).unwrap();
        let ok = |h: &HeaderMap| is_operator(h, &auth, &sessions, now);
        assert!(ok(&headers(&[(header::AUTHORIZATION, "Bearer right")])));
        assert!(!ok(&headers(&[(header::AUTHORIZATION, "Bearer wrong")])));
        assert!(!ok(&headers(&[(header::AUTHORIZATION, "right")])));
        assert!(!ok(&headers(&[])));
        assert!(ok(&headers(&[(header::COOKIE, &format!("a=b; {COOKIE}={cookie}"))])));
        // A wrong bearer token is refused even beside a valid cookie.
        let both = [(header::AUTHORIZATION, "Bearer wrong"), (header::COOKIE, &format!("{COOKIE}={cookie}"))];
        assert!(!ok(&headers(&both)));
        // The token itself is not a session cookie.
        assert!(!ok(&headers(&[(header::COOKIE, &format!("{COOKIE}=right"))])));
    }

    #[test]
    fn only_the_metrics_bearer_token_is_a_scraper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.token");
        let token = fedtune_shared::crypto::OperatorToken::load_or_generate(&path).unwrap();
        let check = token.check().unwrap();
        let text = token.expose_secret();
        let ok = |h: &HeaderMap| is_scraper(h, &check);
        assert!(ok(&headers(&[(header::AUTHORIZATION, &format!("Bearer {text}"))])));
        assert!(!ok(&headers(&[(header::AUTHORIZATION, &format!("Bearer {}", &text[1..]))])));
        assert!(!ok(&headers(&[(header::AUTHORIZATION, text)])), "the Bearer scheme is required");
        assert!(!ok(&headers(&[(header::AUTHORIZATION, "Bearer ")])));
        assert!(!ok(&headers(&[])));
    }

    #[test]
    fn a_session_cookie_is_not_the_token_and_cannot_be_forged_extended_or_reused_after_expiry() {
        let sessions = Sessions::new().unwrap();
        let now = SystemTime::now();
        let value = sessions.issue(now).unwrap();
        assert!(!value.contains("right"));
        assert_ne!(value, sessions.issue(now).unwrap(), "each login gets its own nonce");
        assert!(sessions.verify(&value, now));
        assert!(!sessions.verify(&value, now + SESSION_TTL));
        // Moving the expiry forward breaks the tag.
        let mut raw = hex::decode(&value).unwrap();
        raw[7] = raw[7].wrapping_add(1);
        assert!(!sessions.verify(&hex::encode(&raw), now));
        // Another process (another key) did not issue it.
        assert!(!Sessions::new().unwrap().verify(&value, now));
        let set = sessions.set_cookie(now).unwrap();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    }
}
