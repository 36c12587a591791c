//! Domain identifiers: who ([`ClientId`]), when ([`RoundId`]), which weights ([`ModelVersion`]),
//! and the digest newtype ([`Sha256`]) every payload and manifest is checked with.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Errors from parsing identifiers that arrive from outside.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A client id is empty, too long, or holds characters outside `[A-Za-z0-9._-]`.
    #[error("client id `{0}` is invalid: use 1–64 characters from [A-Za-z0-9._-]")]
    BadClientId(String),
    /// A digest is not exactly 32 bytes.
    #[error("a SHA-256 digest has 32 bytes, got {0}")]
    BadDigestLength(usize),
}

/// A client's stable identity within a federation (its self-chosen name, or one assigned at join).
///
/// Restricted to `[A-Za-z0-9._-]{1,64}` so it is safe in file names, log lines and SQL without
/// escaping.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClientId(String);

impl ClientId {
    /// Longest accepted id.
    pub const MAX_LEN: usize = crate::limits::MAX_NAME_LEN;

    /// Validates and wraps an id (see [`crate::limits::is_valid_name`]).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if crate::limits::is_valid_name(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::BadClientId(s.chars().take(80).collect()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClientId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<ClientId> for String {
    fn from(id: ClientId) -> String {
        id.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One attempt at one federated round.
///
/// Round `r` (1-based) produces global model version `r`. When a round fails (too few updates by
/// its deadline) it is retried under the same number with the next `attempt`, so every task and
/// upload names both, and an upload meant for a failed attempt is recognisably stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoundId {
    /// Round number, 1-based.
    pub round: u64,
    /// Attempt within the round, 0-based.
    pub attempt: u32,
}

impl RoundId {
    /// Attempt `attempt` of round `round`.
    pub const fn new(round: u64, attempt: u32) -> Self {
        Self { round, attempt }
    }

    /// The model version this round produces when it completes.
    pub const fn produces(self) -> ModelVersion {
        ModelVersion(self.round)
    }
}

impl fmt::Display for RoundId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "round {} (attempt {})", self.round, self.attempt)
    }
}

/// Version of the global model: the number of completed rounds (0 = the initial model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct ModelVersion(pub u64);

impl ModelVersion {
    /// The version the next completed round will publish.
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A SHA-256 digest (payloads, manifests). Displays as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// Digest of `data` in one go.
    pub fn of(data: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    /// Parses the 32 raw bytes carried on the wire.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| IdError::BadDigestLength(bytes.len()))?;
        Ok(Self(arr))
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Twelve hex digits identify a digest in logs without flooding them.
        write!(f, "Sha256({}…)", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_accept_only_safe_characters() {
        assert!(ClientId::parse("site-01.eu_west").is_ok());
        for bad in ["", "a b", "../etc", "x;drop", &"a".repeat(65)] {
            assert!(ClientId::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_round_produces_the_version_of_its_number() {
        assert_eq!(RoundId::new(3, 2).produces(), ModelVersion(3));
        assert_eq!(RoundId::new(3, 2).to_string(), "round 3 (attempt 2)");
    }

    #[test]
    fn digests_must_have_32_bytes() {
        assert!(Sha256::from_slice(&[0; 31]).is_err());
        assert_eq!(Sha256::from_slice(&[7; 32]).unwrap(), Sha256([7; 32]));
    }
}
