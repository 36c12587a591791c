//! Reaching a coordinator: the one place a URL and TLS options become a tonic [`Endpoint`],
//! used by the client agent's transport and by the coordinator's own `status` and `simulate`.
//!
//! An `https` URL is verified against a CA the caller names (never the system roots: a
//! federation runs its own PKI), for the URL's host unless another name is given; a client
//! certificate and key make it mutual TLS.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::crypto::client_tls_config;

/// Why no endpoint could be built. The messages name what to change.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The URL does not parse as an `http(s)://host:port` URI.
    #[error("coordinator URL `{url}`: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS was asked for but the URL names no host to verify, and no name was given.
    #[error("no host in `{0}` to verify the coordinator's certificate against; pass --tls-domain")]
    NoHost(String),
    /// The CA, the client identity or the name to verify is unusable.
    #[error("TLS: {0}")]
    Tls(String),
}

/// TLS settings for reaching a coordinator over `https`.
#[derive(Debug, Clone, Copy)]
pub struct TlsOptions<'a> {
    /// CA (PEM) the coordinator's certificate must chain to.
    pub ca: &'a Path,
    /// Name the certificate must carry; `None` takes the URL's host.
    pub domain: Option<&'a str>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub identity: Option<(&'a Path, &'a Path)>,
}

/// The host of `scheme://host:port/…`, brackets of an IPv6 literal removed; `None` when empty.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// The client TLS configuration for reaching `url` with `tls` (see the module docs).
pub fn client_tls(url: &str, tls: &TlsOptions<'_>) -> Result<ClientTlsConfig, EndpointError> {
    let domain = match tls.domain {
        Some(d) => d.to_string(),
        None => url_host(url).ok_or_else(|| EndpointError::NoHost(url.to_string()))?,
    };
    client_tls_config(tls.ca, &domain, tls.identity).map_err(|e| EndpointError::Tls(e.to_string()))
}

/// An endpoint for `url` (not connected yet), with TLS when `tls` is given and a bound on
/// establishing the connection, so that an unreachable coordinator fails fast.
pub fn endpoint(
    url: &str,
    tls: Option<ClientTlsConfig>,
    connect_timeout: Duration,
) -> Result<Endpoint, EndpointError> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| EndpointError::Url { url: url.to_string(), reason: e.to_string() })?
        .connect_timeout(connect_timeout);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| EndpointError::Tls(e.to_string()))?;
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_taken_from_the_url() {
        assert_eq!(url_host("https://coord.example:50051").as_deref(), Some("coord.example"));
        assert_eq!(url_host("https://[::1]:50051/x").as_deref(), Some("::1"));
        assert_eq!(url_host("http://127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(url_host("coord:1").as_deref(), Some("coord"));
        assert_eq!(url_host("https://:443"), None);
    }

    #[test]
    fn tls_without_a_host_to_verify_asks_for_a_name() {
        let tls = TlsOptions { ca: Path::new("/nonexistent/ca.pem"), domain: None, identity: None };
        let err = client_tls("https://:443", &tls).unwrap_err();
        assert!(err.to_string().contains("--tls-domain"), "{err}");
    }

    #[test]
    fn a_bad_url_or_ca_is_named_in_the_error() {
        let err = endpoint("not a url", None, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("not a url"), "{err}");
        let tls = TlsOptions { ca: Path::new("/nonexistent/ca.pem"), domain: None, identity: None };
        let err = client_tls("https://coord.example:1", &tls).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_plaintext_endpoint_keeps_the_url() {
        let e = endpoint("http://127.0.0.1:1", None, Duration::from_secs(1)).unwrap();
        assert_eq!(e.uri().to_string(), "http://127.0.0.1:1/");
    }
}
