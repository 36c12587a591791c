//! A development PKI for TLS and mutual TLS, and the coordinator's tonic server TLS
//! configuration.
//!
//! [`init_dev_pki`] makes, with rcgen on ring, everything a test federation needs:
//!
//! | file | what | mode |
//! |---|---|---|
//! | `ca.pem`, `ca.key` | self-signed CA (may sign leaves only, path length 0), valid 10 years | 0644, 0600 |
//! | `server.pem`, `server.key` | server certificate, SANs = the server names (DNS or IP), `serverAuth`, valid 1 year | 0644, 0600 |
//! | `client-<name>.pem`, `client-<name>.key` | one per client, CN = name, `clientAuth`, valid 1 year | 0644, 0600 |
//! | `operator.pem`, `operator.key` | the operator's, URI SAN [`OPERATOR_CERTIFICATE_URI`] and no DNS name, `clientAuth`, valid 1 year | 0644, 0600 |
//!
//! Keys are ECDSA P-256 in PKCS#8 PEM. This is for development and tests: a production
//! deployment brings certificates from its own PKI, and only [`server_tls_config`] and
//! `fedtune_shared::crypto::client_tls_config` are needed then.
//!
//! Existing files are never replaced unless `force` is set; with `force` each file is replaced
//! atomically. [`issue_client_cert`] adds a client to an existing development PKI.

use std::path::{Path, PathBuf};

use fedtune_shared::crypto::files::{
    read_private_file, write_file_atomically, Overwrite, PRIVATE_FILE_MODE, PUBLIC_FILE_MODE,
};
use fedtune_shared::crypto::tls::{ensure_crypto_provider, load_ca_certificate, load_identity};
use fedtune_shared::crypto::CryptoError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::ServerTlsConfig;

/// Server names used when none are given: what a local coordinator is reached by.
pub const DEFAULT_SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// Subject common name of the development CA. [`issue_client_cert`] rebuilds the issuer from
/// it, so it must not change between runs.
pub const DEV_CA_COMMON_NAME: &str = "fedtune development CA";

/// The subject alternative name that makes a certificate from the client CA the operator's
/// (`GetStatus` operator view under mutual TLS, see `auth::peer`).
///
/// A URI rather than a reserved client-like name: clients are bound to their certificates by
/// DNS subject alternative names, and every client name is a DNS-style name, so a URI can never
/// be mistaken for (or wildcard-matched as) a client name, and no choice of client name can
/// reserve or collide with it. The operator certificate carries no DNS name at all, so it names
/// no client; and the coordinator refuses any certificate bearing this URI at `Join` and
/// `Enroll` even if another PKI gave it DNS names too, so the two roles never meet in one
/// certificate. Client certificates from [`init_dev_pki`] and [`issue_client_cert`] carry no URI.
pub const OPERATOR_CERTIFICATE_URI: &str = "urn:fedtune:operator";

/// Subject common name of the operator certificate (for people reading it; roles are decided
/// by [`OPERATOR_CERTIFICATE_URI`] only).
const OPERATOR_COMMON_NAME: &str = "fedtune operator";

const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 365;
/// Certificates start an hour in the past so a peer whose clock is slightly behind accepts them.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// Errors of the development PKI and of building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading, writing or validating a file failed; the error names the file.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A PKI file is already there and `force` was not given.
    #[error("{} already exists; pass force to replace the development PKI", path.display())]
    Exists {
        /// The first existing file found.
        path: PathBuf,
    },
    /// A server or client name cannot be put in a certificate (or a file name).
    #[error("invalid {what} `{name}`: {reason}")]
    InvalidName {
        /// "server name" or "client name".
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why.
        reason: String,
    },
    /// rcgen could not generate a key or certificate.
    #[error("generating the {what} failed: {source}")]
    Generate {
        /// Which key or certificate.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

/// Where a client's certificate and key were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertPaths {
    /// The client name (certificate CN).
    pub name: String,
    /// `client-<name>.pem`.
    pub cert: PathBuf,
    /// `client-<name>.key`, mode 0600.
    pub key: PathBuf,
}

/// Where the operator certificate and its key were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorCertPaths {
    /// `operator.pem`: present it with `fedtune-coordinator status --tls-cert`.
    pub cert: PathBuf,
    /// `operator.key`, mode 0600.
    pub key: PathBuf,
}

/// Where [`init_dev_pki`] wrote everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiPaths {
    /// CA certificate: the trust root to give clients (and the server, for mTLS).
    pub ca_cert: PathBuf,
    /// CA private key, mode 0600; needed only to issue more certificates.
    pub ca_key: PathBuf,
    /// Server certificate.
    pub server_cert: PathBuf,
    /// Server private key, mode 0600.
    pub server_key: PathBuf,
    /// One entry per requested client, in the order given.
    pub clients: Vec<ClientCertPaths>,
    /// The operator certificate (the operator view of `GetStatus` under mutual TLS).
    pub operator: OperatorCertPaths,
}

/// Creates a development CA, a server certificate for `server_names` (DNS names and IP
/// addresses; [`DEFAULT_SERVER_NAMES`] when empty), a client certificate per entry of
/// `clients` and the operator certificate, all in `out_dir` (created if missing). See the module docs for the files.
/// Refuses to touch an existing PKI file unless `force`.
pub fn init_dev_pki(
    out_dir: &Path,
    server_names: &[String],
    clients: &[String],
    force: bool,
) -> Result<PkiPaths, CertError> {
    let server_names: Vec<String> = if server_names.is_empty() {
        DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        server_names.to_vec()
    };
    for name in &server_names {
        validate_server_name(name)?;
    }
    for (i, name) in clients.iter().enumerate() {
        validate_client_name(name)?;
        if clients[..i].contains(name) {
            return Err(invalid_client(name, "listed twice"));
        }
    }

    let paths = PkiPaths {
        ca_cert: out_dir.join("ca.pem"),
        ca_key: out_dir.join("ca.key"),
        server_cert: out_dir.join("server.pem"),
        server_key: out_dir.join("server.key"),
        clients: clients.iter().map(|name| client_paths(out_dir, name)).collect(),
        operator: OperatorCertPaths { cert: out_dir.join("operator.pem"), key: out_dir.join("operator.key") },
    };
    let overwrite = if force { Overwrite::Replace } else { Overwrite::Refuse };
    if !force {
        let mut all = vec![&paths.ca_cert, &paths.ca_key, &paths.server_cert, &paths.server_key];
        all.extend(paths.clients.iter().flat_map(|c| [&c.cert, &c.key]));
        all.extend([&paths.operator.cert, &paths.operator.key]);
        if let Some(existing) = all.into_iter().find(|p| p.symlink_metadata().is_ok()) {
            return Err(CertError::Exists { path: existing.clone() });
        }
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| CryptoError::Io { path: out_dir.to_path_buf(), source: e })?;

    let ca_key = generate_key("CA key")?;
    let ca_params = ca_params();
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| gen_err("CA certificate", e))?;
    // The key first: a CA certificate without its key would be a PKI nobody can extend.
    write_file_atomically(&paths.ca_key, ca_key.serialize_pem().as_bytes(), PRIVATE_FILE_MODE, overwrite)?;
    write_file_atomically(&paths.ca_cert, ca_cert.pem().as_bytes(), PUBLIC_FILE_MODE, overwrite)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = generate_key("server key")?;
    let server_cert =
        leaf_params(&server_names[0], server_names.clone(), ExtendedKeyUsagePurpose::ServerAuth)?
            .signed_by(&server_key, &issuer)
            .map_err(|e| gen_err("server certificate", e))?;
    write_file_atomically(
        &paths.server_key,
        server_key.serialize_pem().as_bytes(),
        PRIVATE_FILE_MODE,
        overwrite,
    )?;
    write_file_atomically(&paths.server_cert, server_cert.pem().as_bytes(), PUBLIC_FILE_MODE, overwrite)?;

    for client in &paths.clients {
        write_client_cert(&issuer, client, overwrite)?;
    }
    write_operator_cert(&issuer, &paths.operator, overwrite)?;
    Ok(paths)
}

/// Issues a certificate for one more client, signed by the CA in `pki_dir` (which must have
/// been made by [`init_dev_pki`]; its `ca.key` must be mode 0600). Refuses to replace an
/// existing certificate for that name unless `force`.
pub fn issue_client_cert(pki_dir: &Path, name: &str, force: bool) -> Result<ClientCertPaths, CertError> {
    validate_client_name(name)?;
    let (ca_cert_path, ca_key_path) = (pki_dir.join("ca.pem"), pki_dir.join("ca.key"));
    let ca_key_pem = read_private_file(&ca_key_path)?;
    let invalid_key = |reason: String| CryptoError::InvalidFile {
        path: ca_key_path.clone(),
        expected: "PEM private key of the development CA",
        reason,
    };
    let ca_key_pem = String::from_utf8(ca_key_pem).map_err(|_| invalid_key("not UTF-8 text".into()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| invalid_key(e.to_string()))?;
    // Proves ca.pem and ca.key belong together, so the rebuilt issuer signs for that CA.
    load_identity(&ca_cert_path, &ca_key_path)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let paths = client_paths(pki_dir, name);
    let overwrite = if force { Overwrite::Replace } else { Overwrite::Refuse };
    if !force {
        if let Some(existing) = [&paths.cert, &paths.key].into_iter().find(|p| p.symlink_metadata().is_ok()) {
            return Err(CertError::Exists { path: existing.clone() });
        }
    }
    write_client_cert(&issuer, &paths, overwrite)?;
    Ok(paths)
}

/// The coordinator's tonic server TLS configuration from PEM files. With `client_ca`, clients
/// must present a certificate chaining to it (mutual TLS); without, any client may connect
/// and authenticates by other means. Files are parsed now, so a bad one is reported by name
/// before the server binds, and the certificate/key pair is checked to match.
pub fn server_tls_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, CertError> {
    ensure_crypto_provider();
    let mut config = ServerTlsConfig::new().identity(load_identity(cert, key)?);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(load_ca_certificate(ca)?).client_auth_optional(false);
    }
    Ok(config)
}

fn client_paths(dir: &Path, name: &str) -> ClientCertPaths {
    ClientCertPaths {
        name: name.to_owned(),
        cert: dir.join(format!("client-{name}.pem")),
        key: dir.join(format!("client-{name}.key")),
    }
}

fn write_client_cert(
    issuer: &Issuer<'_, KeyPair>,
    paths: &ClientCertPaths,
    overwrite: Overwrite,
) -> Result<(), CertError> {
    let what = format!("certificate of client `{}`", paths.name);
    let key = generate_key(&what)?;
    // The client name as a DNS subject alternative name: with
    // `security.bind_client_certificates` the coordinator serves this certificate only to the
    // client of that name (see `auth::peer`).
    let cert = leaf_params(&paths.name, vec![paths.name.clone()], ExtendedKeyUsagePurpose::ClientAuth)?
        .signed_by(&key, issuer)
        .map_err(|e| gen_err(&what, e))?;
    write_file_atomically(&paths.key, key.serialize_pem().as_bytes(), PRIVATE_FILE_MODE, overwrite)?;
    write_file_atomically(&paths.cert, cert.pem().as_bytes(), PUBLIC_FILE_MODE, overwrite)?;
    Ok(())
}

fn write_operator_cert(
    issuer: &Issuer<'_, KeyPair>,
    paths: &OperatorCertPaths,
    overwrite: Overwrite,
) -> Result<(), CertError> {
    let what = "operator certificate";
    let key = generate_key(what)?;
    let mut params = leaf_params(OPERATOR_COMMON_NAME, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?;
    let uri = OPERATOR_CERTIFICATE_URI.try_into().map_err(|e| gen_err(what, e))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let cert = params.signed_by(&key, issuer).map_err(|e| gen_err(what, e))?;
    write_file_atomically(&paths.key, key.serialize_pem().as_bytes(), PRIVATE_FILE_MODE, overwrite)?;
    write_file_atomically(&paths.cert, cert.pem().as_bytes(), PUBLIC_FILE_MODE, overwrite)?;
    Ok(())
}

/// The CA's parameters. Deterministic except for validity, which an [`Issuer`] does not use,
/// so [`issue_client_cert`] can rebuild the issuer of an existing CA from its key alone.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, DEV_CA_COMMON_NAME);
    params.distinguished_name.push(DnType::OrganizationName, "fedtune");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    params
}

fn leaf_params(
    common_name: &str,
    subject_alt_names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, CertError> {
    let mut params =
        CertificateParams::new(subject_alt_names).map_err(|e| gen_err("certificate parameters", e))?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.distinguished_name.push(DnType::OrganizationName, "fedtune");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(LEAF_VALIDITY_DAYS);
    Ok(params)
}

fn generate_key(what: &str) -> Result<KeyPair, CertError> {
    KeyPair::generate().map_err(|e| gen_err(what, e))
}

fn gen_err(what: &str, source: rcgen::Error) -> CertError {
    CertError::Generate { what: what.to_owned(), source }
}

fn validate_server_name(name: &str) -> Result<(), CertError> {
    rustls::pki_types::ServerName::try_from(name).map(drop).map_err(|e| CertError::InvalidName {
        what: "server name",
        name: name.to_owned(),
        reason: format!("not a DNS name or IP address ({e})"),
    })
}

fn invalid_client(name: &str, reason: &str) -> CertError {
    CertError::InvalidName { what: "client name", name: name.to_owned(), reason: reason.to_owned() }
}

/// Client names become file names and DNS names in certificates: the protocol's name alphabet
/// ([`fedtune_shared::limits::is_valid_name`]), not starting with `.`, and a DNS-style name.
fn validate_client_name(name: &str) -> Result<(), CertError> {
    use fedtune_shared::limits::{is_valid_name, MAX_NAME_LEN};
    if !is_valid_name(name) || name.starts_with('.') {
        return Err(invalid_client(
            name,
            &format!("use 1..={MAX_NAME_LEN} letters, digits, `-`, `_` and `.` (not first)"),
        ));
    }
    // The name goes into the certificate as a DNS name, which the coordinator matches on join.
    if rustls::pki_types::DnsName::try_from(name).is_err() {
        return Err(invalid_client(
            name,
            "must be a DNS-style name: dot-separated labels that do not start or end with `-`, \
             the last one not all digits",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The PKI is proven by real TLS handshakes: a tonic server configured with
    //! [`server_tls_config`] answers a unary gRPC call from a tonic client configured with
    //! `client_tls_config`, or refuses it.

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use fedtune_shared::crypto::client_tls_config;
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
    use tonic::transport::{ClientTlsConfig, Endpoint, Server};
    use tonic_prost::ProstCodec;

    use super::*;

    /// The unary handler: answers `()` with `()`.
    #[derive(Clone)]
    struct Pong;

    impl Service<tonic::Request<()>> for Pong {
        type Response = tonic::Response<()>;
        type Error = tonic::Status;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: tonic::Request<()>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new(())))
        }
    }

    /// A one-method gRPC service written the way tonic-build generates them, so the test needs
    /// no proto file.
    #[derive(Clone)]
    struct PingServer;

    impl Service<http::Request<tonic::body::Body>> for PingServer {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Infallible>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<(), ()>::default());
                Ok(grpc.unary(Pong, request).await)
            })
        }
    }

    impl tonic::server::NamedService for PingServer {
        const NAME: &'static str = "fedtune.test.Ping";
    }

    struct RunningServer {
        addr: SocketAddr,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    async fn serve(tls: ServerTlsConfig) -> RunningServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = Server::builder().tls_config(tls).unwrap().add_service(PingServer);
        tokio::spawn(router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = stopped.await;
            },
        ));
        RunningServer { addr, _stop: stop }
    }

    /// One unary call over a fresh connection; `Err` carries the reason as text.
    async fn ping(addr: SocketAddr, tls: ClientTlsConfig) -> Result<(), String> {
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| format!("ready: {e:?}"))?;
        grpc.unary(
            tonic::Request::new(()),
            PathAndQuery::from_static("/fedtune.test.Ping/Ping"),
            ProstCodec::<(), ()>::default(),
        )
        .await
        .map(drop)
        .map_err(|status| format!("call: {status:?}"))
    }

    /// The call failed, and for the expected reason (not, say, a refused connection).
    fn assert_refused(result: Result<(), String>, reason: &str) {
        match result {
            Ok(()) => panic!("the call succeeded; expected a TLS refusal ({reason})"),
            Err(e) => assert!(e.contains(reason), "expected {reason}, got {e}"),
        }
    }

    fn pki(dir: &Path, clients: &[&str]) -> PkiPaths {
        let clients: Vec<String> = clients.iter().map(|c| c.to_string()).collect();
        init_dev_pki(dir, &[], &clients, false).unwrap()
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn init_writes_every_file_with_keys_private_and_certificates_public() {
        let dir = tempfile::tempdir().unwrap();
        let paths = pki(&dir.path().join("pki"), &["site-1", "site-2"]);
        let keys = [&paths.ca_key, &paths.server_key, &paths.clients[0].key, &paths.clients[1].key];
        for key in keys.into_iter().chain([&paths.operator.key]) {
            assert_eq!(mode_of(key), 0o600, "{}", key.display());
        }
        let certs = [&paths.ca_cert, &paths.server_cert, &paths.clients[0].cert, &paths.clients[1].cert];
        for cert in certs.into_iter().chain([&paths.operator.cert]) {
            assert_eq!(mode_of(cert), 0o644, "{}", cert.display());
            assert!(std::fs::read_to_string(cert).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        }
        assert_eq!(paths.clients[1].cert, dir.path().join("pki/client-site-2.pem"));
        assert_eq!(paths.operator.cert, dir.path().join("pki/operator.pem"));
    }

    #[test]
    fn init_refuses_to_overwrite_an_existing_pki_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let first = pki(dir.path(), &["site-1"]);
        let ca_before = std::fs::read(&first.ca_cert).unwrap();
        let err = init_dev_pki(dir.path(), &[], &["site-1".into()], false).unwrap_err();
        assert!(matches!(&err, CertError::Exists { path } if *path == first.ca_cert), "{err}");
        assert_eq!(std::fs::read(&first.ca_cert).unwrap(), ca_before);

        init_dev_pki(dir.path(), &[], &["site-1".into()], true).unwrap();
        assert_ne!(std::fs::read(&first.ca_cert).unwrap(), ca_before, "force must replace the CA");
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        for (servers, clients) in [
            (vec!["not a host!".to_string()], vec![]),
            (vec![], vec!["../escape".to_string()]),
            (vec![], vec!["".to_string()]),
            (vec![], vec!["a".to_string(), "a".to_string()]),
            // Not DNS-style, so they could not be named in a certificate.
            (vec![], vec!["-lead".to_string()]),
            (vec![], vec!["2024".to_string()]),
        ] {
            let err = init_dev_pki(dir.path(), &servers, &clients, false).unwrap_err();
            assert!(matches!(err, CertError::InvalidName { .. }), "{err}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn server_tls_config_names_a_missing_or_mismatched_file() {
        let dir = tempfile::tempdir().unwrap();
        let paths = pki(dir.path(), &["site-1"]);
        let err = server_tls_config(&dir.path().join("nope.pem"), &paths.server_key, None).unwrap_err();
        assert!(err.to_string().contains("nope.pem"), "{err}");
        let err = server_tls_config(&paths.server_cert, &paths.clients[0].key, None).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("client-site-1.key") && msg.contains("server.pem"), "{msg}");
        let err =
            server_tls_config(&paths.server_cert, &paths.server_key, Some(&paths.server_key)).unwrap_err();
        assert!(err.to_string().contains("server.key"), "{err}");
    }

    #[tokio::test]
    async fn a_client_trusting_the_ca_completes_a_tls_call_by_dns_name_and_by_ip() {
        let dir = tempfile::tempdir().unwrap();
        let paths = pki(dir.path(), &[]);
        let server = serve(server_tls_config(&paths.server_cert, &paths.server_key, None).unwrap()).await;
        for domain in ["localhost", "127.0.0.1"] {
            let tls = client_tls_config(&paths.ca_cert, domain, None).unwrap();
            ping(server.addr, tls).await.unwrap_or_else(|e| panic!("{domain}: {e}"));
        }
    }

    #[tokio::test]
    async fn a_client_refuses_a_server_from_another_ca_or_for_another_name() {
        let dir = tempfile::tempdir().unwrap();
        let ours = pki(&dir.path().join("ours"), &[]);
        let theirs = pki(&dir.path().join("theirs"), &[]);
        let server = serve(server_tls_config(&theirs.server_cert, &theirs.server_key, None).unwrap()).await;
        // Both CAs have the same subject, so the chain is built and fails on the signature.
        let tls = client_tls_config(&ours.ca_cert, "localhost", None).unwrap();
        assert_refused(ping(server.addr, tls).await, "InvalidCertificate(BadSignature)");

        let tls = client_tls_config(&theirs.ca_cert, "coordinator.example.org", None).unwrap();
        assert_refused(ping(server.addr, tls).await, "NotValidForName");
    }

    #[tokio::test]
    async fn mutual_tls_admits_a_client_certificate_from_the_ca_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let paths = pki(&dir.path().join("ours"), &["site-1"]);
        let stranger = pki(&dir.path().join("theirs"), &["site-1"]);
        let server =
            serve(server_tls_config(&paths.server_cert, &paths.server_key, Some(&paths.ca_cert)).unwrap())
                .await;
        let ours = &paths.clients[0];
        let theirs = &stranger.clients[0];

        let with_our_cert =
            client_tls_config(&paths.ca_cert, "localhost", Some((&ours.cert, &ours.key))).unwrap();
        ping(server.addr, with_our_cert).await.unwrap();

        let without_cert = client_tls_config(&paths.ca_cert, "localhost", None).unwrap();
        assert_refused(ping(server.addr, without_cert).await, "CertificateRequired");

        let with_foreign_cert =
            client_tls_config(&paths.ca_cert, "localhost", Some((&theirs.cert, &theirs.key))).unwrap();
        // rustls reports a chain whose signature fails as the `decrypt_error` alert.
        assert_refused(ping(server.addr, with_foreign_cert).await, "DecryptError");

        // A server certificate is not a client certificate (no clientAuth usage).
        let server_as_client =
            client_tls_config(&paths.ca_cert, "localhost", Some((&paths.server_cert, &paths.server_key)))
                .unwrap();
        assert_refused(ping(server.addr, server_as_client).await, "UnsupportedCertificate");

        // The operator certificate is a client certificate of the same CA as far as TLS goes;
        // its role is read by the coordinator (`auth::peer`).
        let operator =
            client_tls_config(&paths.ca_cert, "localhost", Some((&paths.operator.cert, &paths.operator.key)))
                .unwrap();
        ping(server.addr, operator).await.unwrap();
    }

    #[tokio::test]
    async fn a_client_issued_later_by_the_same_ca_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let paths = pki(dir.path(), &[]);
        let late = issue_client_cert(dir.path(), "site-9", false).unwrap();
        assert_eq!(mode_of(&late.key), 0o600);
        assert!(matches!(issue_client_cert(dir.path(), "site-9", false), Err(CertError::Exists { .. })));

        let server =
            serve(server_tls_config(&paths.server_cert, &paths.server_key, Some(&paths.ca_cert)).unwrap())
                .await;
        let tls = client_tls_config(&paths.ca_cert, "localhost", Some((&late.cert, &late.key))).unwrap();
        ping(server.addr, tls).await.unwrap();
    }

    #[test]
    fn issuing_a_client_certificate_requires_a_private_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        let paths = pki(dir.path(), &[]);
        std::fs::set_permissions(&paths.ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = issue_client_cert(dir.path(), "site-1", false).unwrap_err();
        assert!(matches!(err, CertError::Crypto(CryptoError::InsecureFileMode { .. })), "{err}");
    }
}
