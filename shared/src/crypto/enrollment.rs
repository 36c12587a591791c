//! One-time enrollment tokens: how an operator lets a new client join.
//!
//! The coordinator generates a token, prints it once for the operator to hand to the client,
//! and stores only an [`EnrollmentRecord`]: the token's SHA-256 and an expiry. A leaked
//! database therefore does not leak usable tokens (256 random bits cannot be recovered from
//! their hash), and comparing digests in constant time means timing reveals nothing about the
//! token either. The coordinator deletes the record when the token is used: that is what makes
//! it one-time.
//!
//! Text form: base64url without padding of 32 random bytes (43 characters).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use ring::digest;

use super::{b64_decode, b64_encode, constant_time_eq, random_bytes, Canonical, CryptoError};

/// Context label hashed in front of the token bytes, so the stored digest is not a bare
/// SHA-256 that some other system might also compute over the same bytes.
pub const ENROLLMENT_CONTEXT: &str = "fedtune/v1/enrollment";

/// A one-time enrollment token. Its text is a secret: `Debug` redacts it and it is reached only
/// through [`EnrollmentToken::expose_secret`].
/// No `PartialEq`: comparing tokens directly would not be constant-time; compare digests with
/// [`EnrollmentDigest::matches`].
#[derive(Clone)]
pub struct EnrollmentToken([u8; 32]);

impl EnrollmentToken {
    /// 32 fresh bytes from the system CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        random_bytes().map(EnrollmentToken)
    }

    /// The token text to show the operator (once) or to send when enrolling.
    pub fn expose_secret(&self) -> String {
        b64_encode(&self.0)
    }

    /// The digest the coordinator stores instead of the token.
    pub fn hash(&self) -> EnrollmentDigest {
        let message = Canonical::new(ENROLLMENT_CONTEXT).fixed(&self.0).finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, &message).as_ref());
        EnrollmentDigest(out)
    }
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentToken(<redacted>)")
    }
}

impl FromStr for EnrollmentToken {
    type Err = CryptoError;

    /// Parses token text; errors describe the problem without echoing the input.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        // 43 characters encode 32 bytes; checking first avoids decoding arbitrary-size input.
        if text.len() != 43 {
            return Err(CryptoError::Malformed(format!(
                "enrollment token has {} characters, expected 43",
                text.len()
            )));
        }
        let bytes = b64_decode(text).map_err(|e| CryptoError::Malformed(format!("enrollment token: {e}")))?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(EnrollmentToken)
            .map_err(|_| CryptoError::Malformed("enrollment token does not decode to 32 bytes".into()))
    }
}

/// SHA-256 of an enrollment token (with [`ENROLLMENT_CONTEXT`]); safe to store and log.
/// Text form: lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnrollmentDigest([u8; 32]);

impl EnrollmentDigest {
    /// Wraps stored digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        EnrollmentDigest(bytes)
    }

    /// The digest bytes, for storage.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `token` hashes to this digest, compared in constant time.
    pub fn matches(&self, token: &EnrollmentToken) -> bool {
        constant_time_eq(&self.0, &token.hash().0)
    }
}

impl fmt::Display for EnrollmentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EnrollmentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnrollmentDigest({self})")
    }
}

impl FromStr for EnrollmentDigest {
    type Err = CryptoError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out)
            .map_err(|e| CryptoError::Malformed(format!("enrollment digest is not 64 hex digits ({e})")))?;
        Ok(EnrollmentDigest(out))
    }
}

/// What the coordinator keeps for an outstanding enrollment token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollmentRecord {
    /// Digest of the token.
    pub digest: EnrollmentDigest,
    /// Unix seconds from which the token is no longer accepted.
    pub expires_at: u64,
}

impl EnrollmentRecord {
    /// A record for `token`, valid from `now` (unix seconds) for `ttl` (whole seconds).
    pub fn new(token: &EnrollmentToken, ttl: Duration, now: u64) -> Self {
        EnrollmentRecord { digest: token.hash(), expires_at: now.saturating_add(ttl.as_secs()) }
    }

    /// Checks presented token text at `now`: [`CryptoError::Malformed`] if it is not token
    /// text, [`CryptoError::TokenMismatch`] if it is another token, [`CryptoError::Expired`] if
    /// it is this token but too late. The caller deletes the record on success.
    pub fn verify(&self, presented: &str, now: u64) -> Result<(), CryptoError> {
        let token: EnrollmentToken = presented.parse()?;
        if !self.digest.matches(&token) {
            return Err(CryptoError::TokenMismatch);
        }
        if now >= self.expires_at {
            return Err(CryptoError::Expired { expires_at: self.expires_at, now });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_750_000_000;
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_right_token_is_accepted_before_expiry() {
        let token = EnrollmentToken::generate().unwrap();
        let record = EnrollmentRecord::new(&token, DAY, NOW);
        record.verify(&token.expose_secret(), NOW + 86_399).unwrap();
    }

    #[test]
    fn another_token_is_refused_as_a_mismatch() {
        let token = EnrollmentToken::generate().unwrap();
        let other = EnrollmentToken::generate().unwrap();
        let record = EnrollmentRecord::new(&token, DAY, NOW);
        assert!(matches!(record.verify(&other.expose_secret(), NOW), Err(CryptoError::TokenMismatch)));
    }

    #[test]
    fn the_right_token_is_refused_once_expired() {
        let token = EnrollmentToken::generate().unwrap();
        let record = EnrollmentRecord::new(&token, DAY, NOW);
        assert!(matches!(
            record.verify(&token.expose_secret(), NOW + 86_400),
            Err(CryptoError::Expired { .. })
        ));
    }

    #[test]
    fn text_that_is_not_a_token_is_malformed() {
        let record = EnrollmentRecord::new(&EnrollmentToken::generate().unwrap(), DAY, NOW);
        for bad in ["", "short", &"*".repeat(43), &"A".repeat(44)] {
            assert!(matches!(record.verify(bad, NOW), Err(CryptoError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn the_stored_digest_round_trips_through_hex_and_differs_from_the_token() {
        let token = EnrollmentToken::generate().unwrap();
        let digest = token.hash();
        let stored = digest.to_string();
        assert_eq!(stored.len(), 64);
        assert_eq!(stored.parse::<EnrollmentDigest>().unwrap(), digest);
        assert!(digest.matches(&token.expose_secret().parse().unwrap()));
        assert_ne!(digest.as_bytes(), &token.0);
    }

    #[test]
    fn debug_output_never_contains_the_token() {
        let token = EnrollmentToken::generate().unwrap();
        let debug = format!("{token:?} {:?}", EnrollmentRecord::new(&token, DAY, NOW));
        assert!(debug.contains("<redacted>") && !debug.contains(&token.expose_secret()), "{debug}");
    }
}
