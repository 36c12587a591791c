//! Who is calling: the bearer session token of every call after `Join`, and the client
//! certificate the call arrived over.
//!
//! The checks themselves are behind the [`Authenticator`](crate::auth::Authenticator) and
//! [`UpdateVerifier`](crate::auth::UpdateVerifier) seams of [`crate::auth`]; this module only
//! reads the credentials off the wire.

use fedtune_shared::auth::AUTHORIZATION;
use fedtune_shared::crypto::CertificateDigest;
use tonic::metadata::MetadataMap;
use tonic::Request;

use crate::error::RoundError;

/// Extracts the token of `authorization: Bearer <token>`.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, RoundError> {
    let value = metadata.get(AUTHORIZATION).ok_or_else(|| {
        RoundError::Unauthenticated("missing `authorization: Bearer <token>` metadata".into())
    })?;
    let text = value
        .to_str()
        .map_err(|_| RoundError::Unauthenticated("the authorization metadata is not ASCII".into()))?;
    text.strip_prefix("Bearer ").map(str::trim).filter(|t| !t.is_empty()).ok_or_else(|| {
        RoundError::Unauthenticated("the authorization metadata is not `Bearer <token>`".into())
    })
}

/// The SHA-256 of the client certificate this call's connection presented (the TLS leaf), or
/// `None` without mutual TLS: what session tokens are bound to.
pub fn presented_certificate<T>(req: &Request<T>) -> Option<CertificateDigest> {
    req.peer_certs().and_then(|certs| certs.first().map(|leaf| CertificateDigest::of_der(leaf.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_metadata_must_be_well_formed() {
        let mut m = MetadataMap::new();
        assert!(bearer(&m).is_err());
        m.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer(&m).is_err());
        m.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&m).unwrap(), "abc");
    }
}
