//! Binding a mutual-TLS client certificate to the client name it joins or enrolls as.
//!
//! Mutual TLS alone only proves that the caller holds *some* certificate from the client CA, and
//! the Ed25519 join proof that it holds the key allowlisted for the name. Requiring the
//! certificate to be issued to that same name (as a DNS subject alternative name, which is how
//! `fedtune-coordinator certs init` issues them) means a site whose certificate leaked still
//! cannot join as another site, and a site whose Ed25519 key leaked cannot be impersonated from
//! a machine without that site's certificate.
//!
//! The operator certificate (`certs init` issues `operator.pem`) is the other role a certificate
//! from the client CA can have: it unlocks `GetStatus`'s operator view like the operator token,
//! and it can never join or enroll. Roles are told apart by [`OPERATOR_CERTIFICATE_URI`] (see
//! there for why a URI and not a name).

use fedtune_shared::ids::ClientId;
use rustls::pki_types::{CertificateDer, ServerName};

pub use crate::certs::OPERATOR_CERTIFICATE_URI;
use crate::error::RoundError;

/// Whether `leaf`, a certificate the TLS handshake already verified against the client CA, is
/// an operator certificate: it carries [`OPERATOR_CERTIFICATE_URI`] as a URI subject
/// alternative name. A certificate that cannot be read is not one.
pub fn is_operator_certificate(leaf: &CertificateDer<'_>) -> bool {
    webpki::EndEntityCert::try_from(leaf)
        .map(|cert| cert.valid_uri_names().any(|uri| uri == OPERATOR_CERTIFICATE_URI))
        .unwrap_or(false)
}

/// Whether the caller presented an operator certificate (the first of `peer_certs` is the leaf).
pub fn presents_operator_certificate(peer_certs: Option<&[CertificateDer<'static>]>) -> bool {
    peer_certs.and_then(<[_]>::first).is_some_and(is_operator_certificate)
}

/// Checks that `leaf`, the certificate the caller presented, is issued to `client`.
///
/// The chain and validity were already checked by the TLS handshake; this only reads names.
pub fn check_certificate_names(leaf: &CertificateDer<'_>, client: &ClientId) -> Result<(), RoundError> {
    let refuse = |why: String| RoundError::Forbidden(why);
    let name = ServerName::try_from(client.as_str()).map_err(|_| {
        refuse(format!(
            "client `{client}` cannot be named in a certificate (not a DNS-style name), so it cannot \
             join over mutual TLS with security.bind_client_certificates on"
        ))
    })?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| refuse(format!("the client certificate cannot be read: {e}")))?;
    cert.verify_is_valid_for_subject_name(&name).map_err(|_| {
        refuse(format!(
            "the client certificate is not issued to `{client}` (its DNS subject alternative names \
             must include the client name)"
        ))
    })
}

/// Refuses a call made over the operator certificate: what `JoinChallenge`, `Join` and
/// `Enroll` check first, so the operator certificate never starts a client's handshake.
pub fn refuse_operator_certificate(peer_certs: Option<&[CertificateDer<'static>]>) -> Result<(), RoundError> {
    if presents_operator_certificate(peer_certs) {
        return Err(RoundError::Forbidden(
            "the operator certificate cannot join or enroll as a client: it only reads the \
             operator status view; a site needs a client certificate issued to its name"
                .into(),
        ));
    }
    Ok(())
}

/// The certificate check of `Join` and `Enroll`: the operator certificate is always refused
/// (whatever else it names, and with binding off too); otherwise nothing is checked where no
/// client certificate was presented (no mutual TLS) or binding is off.
pub fn check_peer(
    peer_certs: Option<&[CertificateDer<'static>]>,
    bind: bool,
    client: Option<&ClientId>,
) -> Result<(), RoundError> {
    refuse_operator_certificate(peer_certs)?;
    let Some(leaf) = peer_certs.and_then(<[_]>::first).filter(|_| bind) else {
        return Ok(());
    };
    match client {
        Some(client) => check_certificate_names(leaf, client),
        None => Err(RoundError::Forbidden(
            "over mutual TLS a client must join under the name its certificate is issued to".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject as _;

    use super::*;
    use crate::certs::init_dev_pki;

    fn id(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    #[test]
    fn a_certificate_from_certs_init_serves_only_the_client_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init_dev_pki(dir.path(), &[], &["site-1".into(), "site-2".into()], false).unwrap();
        let leaf = CertificateDer::from_pem_file(&pki.clients[0].cert).unwrap();
        check_certificate_names(&leaf, &id("site-1")).unwrap();
        let err = check_certificate_names(&leaf, &id("site-2")).unwrap_err().to_string();
        assert!(err.contains("not issued to `site-2`"), "{err}");
        // Names are matched whole, not as prefixes or suffixes.
        assert!(check_certificate_names(&leaf, &id("site-10")).is_err());
        assert!(check_certificate_names(&leaf, &id("a.site-1")).is_err());
    }

    #[test]
    fn without_a_client_certificate_or_with_binding_off_nothing_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init_dev_pki(dir.path(), &[], &["site-1".into()], false).unwrap();
        let certs = vec![CertificateDer::from_pem_file(&pki.clients[0].cert).unwrap()];
        check_peer(None, true, Some(&id("anyone"))).unwrap();
        check_peer(Some(&certs), false, Some(&id("site-2"))).unwrap();
        check_peer(Some(&certs), true, Some(&id("site-1"))).unwrap();
        assert!(check_peer(Some(&certs), true, Some(&id("site-2"))).is_err());
        let err = check_peer(Some(&certs), true, None).unwrap_err().to_string();
        assert!(err.contains("name its certificate is issued to"), "{err}");
    }

    #[test]
    fn only_the_operator_certificate_is_an_operator_and_it_never_passes_as_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init_dev_pki(dir.path(), &[], &["site-1".into()], false).unwrap();
        let client = vec![CertificateDer::from_pem_file(&pki.clients[0].cert).unwrap()];
        let server = vec![CertificateDer::from_pem_file(&pki.server_cert).unwrap()];
        let operator = vec![CertificateDer::from_pem_file(&pki.operator.cert).unwrap()];
        assert!(presents_operator_certificate(Some(&operator)));
        assert!(!presents_operator_certificate(Some(&client)));
        assert!(!presents_operator_certificate(Some(&server)));
        assert!(!presents_operator_certificate(None));
        // It names no client, and it is refused before names are even compared, binding or not.
        assert!(check_certificate_names(&operator[0], &id("operator")).is_err());
        for bind in [true, false] {
            for name in [Some(&id("site-1")), Some(&id("operator")), None] {
                let err = check_peer(Some(&operator), bind, name).unwrap_err().to_string();
                assert!(err.contains("operator certificate cannot join"), "{err}");
            }
        }
    }
}
