//! The operator token: the credential that unlocks the coordinator's full status view.
//!
//! The coordinator generates it at first start into its state directory (32 random bytes,
//! base64url, mode 0600, [`OPERATOR_TOKEN_FILE`]); whoever can read that file is the operator.
//! `fedtune-coordinator status` sends it as `authorization: Bearer <token>` on `GetStatus`.
//! The coordinator compares what it receives in constant time ([`OperatorCheck`]), so response
//! timing does not reveal how much of a guess was right.

use std::fmt;
use std::path::Path;

use ring::hmac;

use super::files::{read_private_file, write_file_atomically, Overwrite, PRIVATE_FILE_MODE};
use super::{b64_decode, b64_encode, random_bytes, CryptoError};

/// File name of the operator token in the coordinator's state directory.
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";

const TOKEN_EXPECTED: &str = "operator token (base64url of 32 bytes)";

/// The operator's bearer credential. `Debug` redacts it; the text is reached through
/// [`OperatorToken::expose_secret`].
#[derive(Clone, PartialEq, Eq)]
pub struct OperatorToken(String);

impl OperatorToken {
    /// Reads the token from `path` (mode 0600 enforced); a missing file is
    /// [`CryptoError::FileMissing`].
    pub fn load(path: &Path) -> Result<Self, CryptoError> {
        let bytes = read_private_file(path)?;
        let invalid = |reason: String| CryptoError::InvalidFile {
            path: path.to_path_buf(),
            expected: TOKEN_EXPECTED,
            reason,
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not UTF-8 text".into()))?.trim();
        let raw = b64_decode(text).map_err(invalid)?;
        if raw.len() != 32 {
            return Err(invalid(format!("{} bytes, expected 32", raw.len())));
        }
        Ok(OperatorToken(text.to_owned()))
    }

    /// Loads the token from `path`, or, when the file does not exist, generates one and writes
    /// it there atomically with mode 0600. Two processes racing to create it agree on one.
    pub fn load_or_generate(path: &Path) -> Result<Self, CryptoError> {
        match Self::load(path) {
            Err(CryptoError::FileMissing { .. }) => {
                let text = b64_encode(&random_bytes::<32>()?);
                match write_file_atomically(
                    path,
                    format!("{text}\n").as_bytes(),
                    PRIVATE_FILE_MODE,
                    Overwrite::Refuse,
                ) {
                    Ok(()) => Ok(OperatorToken(text)),
                    Err(CryptoError::FileExists { .. }) => Self::load(path),
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    /// The token text, to put in a request header.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// A checker for presented tokens.
    pub fn check(&self) -> Result<OperatorCheck, CryptoError> {
        OperatorCheck::new(self)
    }
}

impl fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OperatorToken(<redacted>)")
    }
}

/// Compares presented tokens with the operator token in constant time.
///
/// It keeps an HMAC tag of the token under a random per-process key and checks a presented
/// token with `ring::hmac::verify`, whose tag comparison is constant-time; comparing tags rather
/// than the texts also makes the work independent of the presented token's length.
pub struct OperatorCheck {
    key: hmac::Key,
    tag: hmac::Tag,
}

impl OperatorCheck {
    fn new(token: &OperatorToken) -> Result<Self, CryptoError> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &random_bytes::<32>()?);
        let tag = hmac::sign(&key, token.0.as_bytes());
        Ok(Self { key, tag })
    }

    /// Whether `presented` is the operator token.
    pub fn matches(&self, presented: &str) -> bool {
        hmac::verify(&self.key, presented.as_bytes(), self.tag.as_ref()).is_ok()
    }
}

impl fmt::Debug for OperatorCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OperatorCheck(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_operator_token_is_generated_once_with_mode_0600_and_read_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OPERATOR_TOKEN_FILE);
        assert!(matches!(OperatorToken::load(&path), Err(CryptoError::FileMissing { .. })));
        let first = OperatorToken::load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(OperatorToken::load_or_generate(&path).unwrap(), first);
        assert_eq!(OperatorToken::load(&path).unwrap(), first);
        assert!(!format!("{first:?}").contains(first.expose_secret()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(OperatorToken::load(&path), Err(CryptoError::InsecureFileMode { .. })));
    }

    #[test]
    fn only_the_exact_operator_token_matches() {
        let dir = tempfile::tempdir().unwrap();
        let token = OperatorToken::load_or_generate(&dir.path().join(OPERATOR_TOKEN_FILE)).unwrap();
        let check = token.check().unwrap();
        assert!(check.matches(token.expose_secret()));
        let text = token.expose_secret();
        assert!(!check.matches(&text[..text.len() - 1]));
        assert!(!check.matches(&format!("{text}A")));
        assert!(!check.matches(""));
        let other = tempfile::tempdir().unwrap();
        let foreign = OperatorToken::load_or_generate(&other.path().join(OPERATOR_TOKEN_FILE)).unwrap();
        assert!(!check.matches(foreign.expose_secret()));
    }
}
