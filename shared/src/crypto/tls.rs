//! TLS material for tonic: PEM files checked up front, rustls pinned to the ring provider.
//!
//! tonic's `Identity`/`Certificate` only hold bytes; a wrong file would surface much later
//! as an opaque transport error. These helpers parse the files when the configuration is
//! built, so errors name the file and say what is wrong with it, and they check that a
//! certificate and its key belong together.
//!
//! # Crypto provider
//! tonic 0.14's client connector uses ring when no process default is installed, but its
//! server acceptor calls `rustls::ServerConfig::builder()`, which picks a provider from rustls'
//! crate features and **panics** if it cannot decide, e.g. as soon as any crate in the build
//! enables rustls' default `aws-lc-rs` feature next to ring. [`ensure_crypto_provider`]
//! installs ring as the process default once, before any configuration is built, which makes
//! both sides independent of what the rest of the dependency graph enables.

use std::path::Path;
use std::sync::Once;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::files::{read_private_file, read_public_file};
use super::CryptoError;

const CERT_EXPECTED: &str = "PEM certificate file";
const KEY_EXPECTED: &str = "PEM private key file";

/// Installs rustls' ring provider as the process-wide default, once. Safe to call from
/// anywhere, any number of times; if another provider was installed first it is left alone.
pub fn ensure_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // An Err means a default is already installed: whoever did that chose deliberately.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Parses every `CERTIFICATE` section of a PEM file, requiring at least one.
pub fn read_certificates(path: &Path) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), CryptoError> {
    let pem = read_public_file(path)?;
    let invalid = |reason: String| CryptoError::InvalidFile {
        path: path.to_path_buf(),
        expected: CERT_EXPECTED,
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("unreadable PEM ({e})")))?;
    if certs.is_empty() {
        return Err(invalid("no `CERTIFICATE` section".into()));
    }
    Ok((pem, certs))
}

/// A CA (trust root) certificate file for tonic, checked to contain at least one certificate.
pub fn load_ca_certificate(path: &Path) -> Result<Certificate, CryptoError> {
    let (pem, _) = read_certificates(path)?;
    Ok(Certificate::from_pem(pem))
}

/// A certificate chain and its private key as a tonic [`Identity`], checked to parse and to
/// belong together. A key file others can read is accepted (orchestrators commonly mount
/// secrets 0644) but logged as a warning.
pub fn load_identity(cert_path: &Path, key_path: &Path) -> Result<Identity, CryptoError> {
    let (cert_pem, chain) = read_certificates(cert_path)?;
    // Refused like a client identity key: a key others can read may already be someone else's.
    let key_pem = read_private_file(key_path)?;
    let invalid = |reason: String| CryptoError::InvalidFile {
        path: key_path.to_path_buf(),
        expected: KEY_EXPECTED,
        reason,
    };
    // The PEM parser's own error text may quote parts of the file; say only what was expected.
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| invalid("no readable PKCS#8, PKCS#1 or SEC1 private key section".into()))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| invalid(format!("unusable with the certificate in {} ({e})", cert_path.display())))?;
    Ok(Identity::from_pem(cert_pem, key_pem))
}

/// A tonic client TLS configuration that trusts only the CA in `ca_pem_path` and expects the
/// server certificate to be valid for `domain` (a DNS name or an IP address, matched against
/// the certificate's subject alternative names). `identity` is the client's own certificate
/// and key `(cert, key)` for mutual TLS.
pub fn client_tls_config(
    ca_pem_path: &Path,
    domain: &str,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, CryptoError> {
    ensure_crypto_provider();
    if rustls::pki_types::ServerName::try_from(domain).is_err() {
        return Err(CryptoError::InvalidInput(format!("`{domain}` is neither a DNS name nor an IP address")));
    }
    let mut config =
        ClientTlsConfig::new().ca_certificate(load_ca_certificate(ca_pem_path)?).domain_name(domain);
    if let Some((cert, key)) = identity {
        config = config.identity(load_identity(cert, key)?);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::crypto::files::{write_file_atomically, Overwrite, PRIVATE_FILE_MODE, PUBLIC_FILE_MODE};

    #[test]
    fn a_missing_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = client_tls_config(&dir.path().join("ca.pem"), "localhost", None).unwrap_err();
        assert!(
            matches!(err, CryptoError::FileMissing { .. }) && err.to_string().contains("ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_file_without_certificates_is_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        write_file_atomically(&path, b"hello\n", PUBLIC_FILE_MODE, Overwrite::Refuse).unwrap();
        let err = client_tls_config(&path, "localhost", None).unwrap_err().to_string();
        assert!(err.contains("ca.pem") && err.contains("CERTIFICATE"), "{err}");
    }

    /// A PEM file that parses as a certificate block (its contents are not one), for checks
    /// that must get past the certificate to reach the key.
    fn placeholder_certificate(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let cert = dir.join(name);
        let der = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"placeholder");
        write_file_atomically(
            &cert,
            format!("-----BEGIN CERTIFICATE-----\n{der}\n-----END CERTIFICATE-----\n").as_bytes(),
            PUBLIC_FILE_MODE,
            Overwrite::Refuse,
        )
        .unwrap();
        cert
    }

    #[test]
    fn a_key_file_without_a_key_is_rejected_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client.key");
        write_file_atomically(
            &key,
            b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0!!\n-----END PRIVATE KEY-----\n",
            PRIVATE_FILE_MODE,
            Overwrite::Refuse,
        )
        .unwrap();
        // The certificate is checked first, so give it a parseable (if meaningless) one.
        let cert = placeholder_certificate(dir.path(), "client.pem");
        let err = load_identity(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("client.key") && !err.contains("c2VjcmV0"), "{err}");
    }

    #[test]
    fn a_tls_key_readable_by_group_or_others_is_refused_like_a_client_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("server.key");
        write_file_atomically(&key, b"irrelevant", PRIVATE_FILE_MODE, Overwrite::Refuse).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let cert = placeholder_certificate(dir.path(), "server.pem");
        let err = load_identity(&cert, &key).unwrap_err();
        assert!(matches!(err, CryptoError::InsecureFileMode { mode: 0o640, .. }), "{err}");
    }

    #[test]
    fn a_domain_that_is_no_server_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = client_tls_config(&dir.path().join("ca.pem"), "not a host!", None).unwrap_err();
        assert!(matches!(err, CryptoError::InvalidInput(_)), "{err}");
    }

    #[test]
    fn installing_the_provider_twice_is_harmless() {
        ensure_crypto_provider();
        ensure_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
