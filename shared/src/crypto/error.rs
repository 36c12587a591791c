//! The one error type of [`crate::crypto`].
//!
//! Messages name files, modes, lengths and times, never key or token bytes: these errors end up
//! in logs and, mapped to a status, on the wire.

use std::path::PathBuf;

/// Everything that can go wrong in key handling, signing, tokens and TLS material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A key or secret file that must exist does not.
    #[error("{} does not exist", path.display())]
    FileMissing {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// A private file can be read or written by group or others, so the secret in it may already
    /// be known to someone else; refusing to use it forces the operator to notice.
    #[error(
        "{} has mode {mode:04o}, so group or others can access the secret in it; \
         run `chmod 600 {}` (and consider replacing the key)",
        path.display(),
        path.display()
    )]
    InsecureFileMode {
        /// The offending file.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
    /// A file that would be created exists already and overwriting was not asked for.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    FileExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Reading, writing or syncing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory being accessed.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but does not hold what it should (wrong PEM label, not a key, mismatched
    /// certificate and key, ...).
    #[error("{} is not a valid {expected}: {reason}", path.display())]
    InvalidFile {
        /// The file that was read.
        path: PathBuf,
        /// What the file should contain, e.g. "Ed25519 PKCS#8 private key (PEM)".
        expected: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The text form of a public key could not be parsed.
    #[error("invalid public key: {0}")]
    InvalidPublicKey(String),
    /// A signature has the wrong length.
    #[error("invalid signature encoding: {0}")]
    InvalidSignatureEncoding(String),
    /// A well-formed signature does not verify for this key and statement.
    #[error("signature does not verify for this key and statement")]
    BadSignature,
    /// A token is not even structurally a token of the expected kind.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// A session token is well-formed but its authentication tag is wrong: it was forged, altered,
    /// or issued under another coordinator secret.
    #[error(
        "session token authentication tag does not match (forged, altered, or issued by another coordinator)"
    )]
    BadTag,
    /// A token was valid once but its lifetime is over.
    #[error("token expired at unix time {expires_at} (now {now})")]
    Expired {
        /// Unix seconds at which the token stopped being valid.
        expires_at: u64,
        /// Unix seconds at verification.
        now: u64,
    },
    /// A genuine session token issued for another federation (the coordinator secret was shared).
    #[error("session token was issued for federation `{found}`, this is `{expected}`")]
    WrongFederation {
        /// The federation verifying the token.
        expected: String,
        /// The federation named in the token.
        found: String,
    },
    /// A genuine session token presented over another client certificate than the one it was
    /// bound to at issue, or across the line between mutual TLS and none (either way).
    #[error("{0}")]
    WrongCertificate(String),
    /// A presented enrollment token is not the one on record.
    #[error("enrollment token does not match")]
    TokenMismatch,
    /// An argument cannot be encoded (e.g. an identifier too long for its length prefix).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The operating system's random number generator failed; nothing secret can be made.
    #[error("the system random number generator failed")]
    Rng,
}

impl CryptoError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CryptoError::Io { path: path.into(), source }
    }
}
