//! Client authentication, transport security and call limits of `serve` (issue #5).
//!
//! # Layout
//! - [`seams`]: the [`Authenticator`] and [`UpdateVerifier`] traits the RPC layer calls.
//! - The `[security]` section (TLS files, `insecure`, token lifetimes, limits) is
//!   [`crate::settings::security`].
//! - [`allowlist`]: allowlisted Ed25519 keys and one-time enrollment tokens in `state.sqlite`
//!   (shared with the `clients` CLI, so changes apply to a running coordinator at once).
//! - [`gate`]: [`ClientAuth`], the `Authenticator` + `UpdateVerifier` of `serve`: join challenge,
//!   HMAC session tokens, per-call allowlist check, update signature check.
//! - [`limits`]: per-client and per-address token buckets, in-flight caps, download cap.
//! - [`operator`]: what an anonymous `GetStatus` caller sees (the operator token or the operator
//!   certificate unlocks the rest).
//! - [`peer`]: a mutual-TLS client certificate must be issued to the name the client joins as;
//!   the operator certificate is told apart and never joins.
//!
//! # What each layer stops
//! TLS keeps a network attacker from reading or altering traffic and from stealing session
//! tokens; mutual TLS (optional) keeps machines without a client certificate from even reaching
//! the gRPC service, and a certificate serves only the client it names. The allowlist and join challenge make sure only holders of allowlisted
//! private keys get sessions; update signatures make each folded update attributable to, and
//! bound to, one client, round and federation, independently of the transport. Limits stop an
//! authenticated or anonymous caller from exhausting the coordinator.

pub mod allowlist;
pub mod gate;
pub mod limits;
pub mod operator;
pub mod peer;
pub mod seams;

pub use allowlist::{Allowlist, AllowlistEntry, AllowlistError, Standing};
pub use gate::{AuthSetupError, ClientAuth};
pub use limits::Limits;
pub use seams::{Authenticator, UpdateVerifier};

pub use crate::settings::{LimitSettings, SecuritySettings};

use tonic::transport::ServerTlsConfig;

use crate::certs::{server_tls_config, CertError};

/// The server TLS configuration `settings` asks for: `None` for plaintext (only with
/// `insecure`, checked by [`SecuritySettings::require_transport`]).
pub fn tls_config(settings: &SecuritySettings) -> Result<Option<ServerTlsConfig>, CertError> {
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(server_tls_config(cert, key, settings.client_ca.as_deref())?)),
        _ => Ok(None),
    }
}
