//! Client identities: Ed25519 key pairs kept in owner-only files.
//!
//! # Key file format
//! PEM, label `PRIVATE KEY`, containing the PKCS#8 v2 (RFC 5958 `OneAsymmetricKey`, with the
//! public key embedded) encoding that `ring` generates; one comment line above the `BEGIN`
//! line says what the file is. `openssl pkey -in key.pem -pubout` reads it. Files are created
//! with mode 0600 and refused on load when group or others have any access.
//!
//! # Public key text form
//! The 32 raw key bytes in base64url without padding: always 43 characters, e.g. for the
//! registry, configuration files and logs.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::files::{read_private_file, write_file_atomically, Overwrite, PRIVATE_FILE_MODE};
use super::{b64_decode, b64_encode, CryptoError};

const KEY_FILE_EXPECTED: &str = "Ed25519 PKCS#8 v2 private key (PEM, label PRIVATE KEY)";
const KEY_FILE_PREAMBLE: &str =
    "fedtune identity: Ed25519 private key (PKCS#8 v2). Keep this file private (mode 0600).\n";

/// An Ed25519 signing key pair: a client's long-term identity.
///
/// There is deliberately no method to sign arbitrary bytes: signatures are made only through
/// [`super::signing`], whose context labels keep them from being reused across purposes.
pub struct KeyPair {
    inner: Ed25519KeyPair,
}

impl KeyPair {
    /// A fresh key pair that lives only in memory (simulations and tests; real clients use
    /// [`generate_keypair_file`] so the identity survives restarts).
    pub fn generate_ephemeral() -> Result<Self, CryptoError> {
        let (pair, _pkcs8) = generate_pkcs8()?;
        Ok(pair)
    }

    /// Parses a PKCS#8 v2 document (DER), as produced by `ring` and stored in key files.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, CryptoError> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(|inner| KeyPair { inner })
            .map_err(|e| CryptoError::InvalidInput(format!("not an Ed25519 PKCS#8 v2 key: {e}")))
    }

    /// The public half, which identifies this client to the coordinator.
    pub fn public_key(&self) -> PublicKey {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.inner.public_key().as_ref());
        PublicKey(bytes)
    }

    /// Signs an already domain-separated message; only [`super::signing`] and
    /// [`crate::secagg::keys`] (agreement keys) build those.
    pub(crate) fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.inner.sign(message).as_ref());
        out
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public_key())
            .field("secret", &format_args!("<redacted>"))
            .finish()
    }
}

fn generate_pkcs8() -> Result<(KeyPair, Vec<u8>), CryptoError> {
    let rng = ring::rand::SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| CryptoError::Rng)?;
    let pair = KeyPair::from_pkcs8_der(doc.as_ref())?;
    Ok((pair, doc.as_ref().to_vec()))
}

fn pkcs8_to_pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = String::from(KEY_FILE_PREAMBLE);
    pem.push_str("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        // base64 output is ASCII, so any chunk boundary is a char boundary.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}

/// Generates a new identity and writes it to `path` (format in the module docs), mode 0600,
/// atomically and fsynced. Refuses to replace an existing file: losing a key means losing the
/// client's registration.
pub fn generate_keypair_file(path: &Path) -> Result<KeyPair, CryptoError> {
    let (pair, der) = generate_pkcs8()?;
    write_file_atomically(path, pkcs8_to_pem(&der).as_bytes(), PRIVATE_FILE_MODE, Overwrite::Refuse)?;
    Ok(pair)
}

/// Loads the identity at `path`, refusing a missing file, a file group or others can access
/// (the error names the path and the mode and suggests `chmod 600`), and anything that is not
/// an Ed25519 PKCS#8 v2 PEM key.
pub fn load_keypair(path: &Path) -> Result<KeyPair, CryptoError> {
    let bytes = read_private_file(path)?;
    let invalid = |reason: String| CryptoError::InvalidFile {
        path: path.to_path_buf(),
        expected: KEY_FILE_EXPECTED,
        reason,
    };
    let der = PrivatePkcs8KeyDer::from_pem_slice(&bytes)
        .map_err(|e| invalid(format!("no PEM `PRIVATE KEY` section ({e})")))?;
    Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map(|inner| KeyPair { inner })
        .map_err(|e| invalid(format!("ring rejected the key: {e}")))
}

/// An Ed25519 public key: how the coordinator knows a client.
///
/// Text form (`Display`/`FromStr`, serde): base64url without padding of the 32 key bytes.
/// Parsing checks the encoding and length only; a malformed curve point simply never verifies.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps 32 raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    /// Wraps raw key bytes received from the wire, checking the length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        <[u8; 32]>::try_from(bytes).map(PublicKey).map_err(|_| {
            CryptoError::InvalidPublicKey(format!("{} bytes, an Ed25519 public key has 32", bytes.len()))
        })
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks an Ed25519 signature over an already domain-separated message.
    pub(crate) fn verify_raw(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), CryptoError> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .map_err(|_| CryptoError::BadSignature)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&b64_encode(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = CryptoError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err(CryptoError::InvalidPublicKey("empty text".into()));
        }
        let bytes = b64_decode(text).map_err(CryptoError::InvalidPublicKey)?;
        PublicKey::from_slice(&bytes)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_generated_key_file_has_mode_0600_and_loads_to_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        let generated = generate_keypair_file(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("-----BEGIN PRIVATE KEY-----"), "{text}");
        let loaded = load_keypair(&path).unwrap();
        assert_eq!(loaded.public_key(), generated.public_key());
    }

    #[test]
    fn generating_over_an_existing_key_file_is_refused_and_the_old_key_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        let first = generate_keypair_file(&path).unwrap();
        assert!(matches!(generate_keypair_file(&path), Err(CryptoError::FileExists { .. })));
        assert_eq!(load_keypair(&path).unwrap().public_key(), first.public_key());
    }

    #[test]
    fn loading_a_key_file_readable_by_others_is_refused_naming_path_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        generate_keypair_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_keypair(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CryptoError::InsecureFileMode { mode: 0o644, .. }), "{msg}");
        assert!(msg.contains(&path.display().to_string()) && msg.contains("0644"), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");
    }

    #[test]
    fn loading_a_missing_key_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.key");
        let err = load_keypair(&path).unwrap_err();
        assert!(matches!(err, CryptoError::FileMissing { .. }));
        assert!(err.to_string().contains("absent.key"));
    }

    #[test]
    fn a_file_that_is_not_an_ed25519_key_is_rejected_without_echoing_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.key");
        write_file_atomically(&path, b"hunter2-not-a-key", PRIVATE_FILE_MODE, Overwrite::Refuse).unwrap();
        let msg = load_keypair(&path).unwrap_err().to_string();
        assert!(msg.contains("junk.key") && !msg.contains("hunter2"), "{msg}");

        // A well-formed PKCS#8 PEM of another algorithm (P-256) is refused too.
        let p256 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let other = dir.path().join("p256.key");
        write_file_atomically(
            &other,
            pkcs8_to_pem(p256.as_ref()).as_bytes(),
            PRIVATE_FILE_MODE,
            Overwrite::Refuse,
        )
        .unwrap();
        assert!(matches!(load_keypair(&other), Err(CryptoError::InvalidFile { .. })));
    }

    #[test]
    fn debug_of_a_key_pair_redacts_the_secret() {
        let pair = KeyPair::generate_ephemeral().unwrap();
        let debug = format!("{pair:?}");
        assert!(debug.contains("<redacted>") && debug.contains(&pair.public_key().to_string()), "{debug}");
    }

    #[test]
    fn public_key_text_round_trips_and_is_43_url_safe_characters() {
        let key = KeyPair::generate_ephemeral().unwrap().public_key();
        let text = key.to_string();
        assert_eq!(text.len(), 43);
        assert!(text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{text}");
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
        assert_eq!(format!("  {text}\n").parse::<PublicKey>().unwrap(), key);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), key);
    }

    #[test]
    fn public_key_parsing_explains_what_is_wrong() {
        let short = b64_encode(&[7u8; 31]);
        let err = short.parse::<PublicKey>().unwrap_err().to_string();
        assert!(err.contains("31 bytes") && err.contains("32"), "{err}");
        let err = "not base64!".parse::<PublicKey>().unwrap_err().to_string();
        assert!(err.contains("base64url"), "{err}");
        assert!("".parse::<PublicKey>().is_err());
        // Standard-alphabet padding is not the documented form.
        let padded = STANDARD.encode([0xfbu8; 32]);
        assert!(padded.parse::<PublicKey>().is_err());
    }
}
