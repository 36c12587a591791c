//! Cryptographic building blocks: client identities, signed update statements, join
//! challenges, session and enrollment tokens, TLS configuration. All primitives come from
//! `ring` (and rustls on its ring provider): one audited backend, no hand-rolled crypto.
//!
//! # Layout
//! - [`identity`]: Ed25519 key pairs in 0600 PEM files, [`PublicKey`] text form.
//! - [`signing`]: domain-separated signatures over update statements and join challenges.
//! - [`session`]: HMAC-SHA256 session tokens issued and checked by the coordinator.
//! - [`enrollment`]: one-time enrollment tokens, stored by the coordinator only as digests.
//! - [`operator`]: the operator token that unlocks the full status view, checked in constant time.
//! - [`tls`]: tonic client TLS configuration from PEM files, rustls provider set-up.
//! - [`files`]: atomic, permission-checked reading and writing of secret files.
//!
//! # Conventions
//! - Binary values in text (keys, tokens, signatures) are base64url without padding
//!   (RFC 4648 §5): safe in file names, URLs, TOML and gRPC metadata without quoting.
//! - Every signed or MACed message starts with a length-prefixed context label
//!   (`fedtune/v1/...`), so a signature made for one purpose never verifies for another.
//! - `Debug` of anything secret prints `<redacted>`; secret text is reached only through
//!   methods named `expose_secret`.

pub mod enrollment;
mod error;
pub mod files;
pub mod identity;
pub mod operator;
pub mod session;
pub mod signing;
pub mod tls;

pub use enrollment::{EnrollmentDigest, EnrollmentRecord, EnrollmentToken};
pub use error::CryptoError;
pub use identity::{generate_keypair_file, load_keypair, KeyPair, PublicKey};
pub use operator::{OperatorCheck, OperatorToken, OPERATOR_TOKEN_FILE};
pub use session::{CertificateDigest, SessionAuthority, SessionClaims, SessionSecret, SessionToken};
pub use signing::{
    sign_challenge, sign_update, verify_challenge, verify_update, Challenge, Signature, UpdateStatement,
};
pub use tls::{client_tls_config, ensure_crypto_provider};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};

/// Text form of every binary value in this module (see the module docs).
pub(crate) fn b64_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Inverse of [`b64_encode`]; the error text describes the problem without echoing the input.
pub(crate) fn b64_decode(text: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD.decode(text).map_err(|e| format!("not base64url without padding ({e})"))
}

/// Fills a fresh array from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    SystemRandom::new().fill(&mut out).map_err(|_| CryptoError::Rng)?;
    Ok(out)
}

/// Builds the canonical byte strings that get signed or MACed: each variable-length field is
/// preceded by its length as a big-endian `u64`, fixed-size fields are written as they are, so
/// no two different field sequences encode to the same bytes.
#[derive(Debug, Default)]
pub(crate) struct Canonical(Vec<u8>);

impl Canonical {
    /// Starts a message with its context label.
    pub(crate) fn new(context: &str) -> Self {
        let mut c = Canonical(Vec::with_capacity(128));
        c.bytes(context.as_bytes());
        c
    }

    /// A variable-length field.
    pub(crate) fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(value.len() as u64).to_be_bytes());
        self.0.extend_from_slice(value);
        self
    }

    /// A variable-length text field.
    pub(crate) fn str(&mut self, value: &str) -> &mut Self {
        self.bytes(value.as_bytes())
    }

    /// A fixed-size field.
    pub(crate) fn fixed(&mut self, value: &[u8]) -> &mut Self {
        self.0.extend_from_slice(value);
        self
    }

    /// A 64-bit integer, big-endian.
    pub(crate) fn u64(&mut self, value: u64) -> &mut Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Compares two equal-length secrets without an early exit, so the time taken does not
/// reveal how long a matching prefix is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold back into a short-circuiting compare.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_encoding_separates_fields_that_concatenate_alike() {
        let ab_c = Canonical::new("ctx").str("ab").str("c").finish();
        let a_bc = Canonical::new("ctx").str("a").str("bc").finish();
        assert_ne!(ab_c, a_bc);
        assert_ne!(Canonical::new("ctx1").finish(), Canonical::new("ctx").fixed(b"1").finish());
    }

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
