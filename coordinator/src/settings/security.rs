//! The `[security]` section: TLS files, the plaintext opt-out, token lifetimes and the limits
//! that keep one client from exhausting the coordinator.
//!
//! ```toml
//! [security]
//! tls_cert = "/etc/fedtune/server.pem"
//! tls_key = "/etc/fedtune/server.key"
//! client_ca = "/etc/fedtune/ca.pem"   # optional: require client certificates (mutual TLS)
//! bind_client_certificates = true     # a certificate serves only the client it names
//! session_ttl = "1h"
//! [security.limits]
//! calls_per_second = 50.0
//! ```
//!
//! [`SecuritySettings::validate`] checks consistency only; whether TLS is configured at all is
//! checked when `serve` starts ([`SecuritySettings::require_transport`]), so settings for
//! tools that never serve (export, simulate's own checks) need no certificates.

use std::path::PathBuf;
use std::time::Duration;

use fedtune_shared::settings::{duration, SettingsError};
use serde::{Deserialize, Serialize};

/// Transport security, client authentication lifetimes and abuse limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Server certificate chain (PEM). With `tls_key`, the endpoint speaks TLS only.
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) whose certificates clients must present: mutual TLS. Needs `tls_cert`/`tls_key`.
    pub client_ca: Option<PathBuf>,
    /// Under mutual TLS, a client may join or enroll only under a name its certificate is issued
    /// to (a DNS subject alternative name, as `certs init` issues them). On by default.
    pub bind_client_certificates: bool,
    /// Serve plaintext gRPC without TLS. Only for tests and a single trusted machine: anyone on
    /// the path can then read updates and steal session tokens. Logged as a warning at start.
    pub insecure: bool,
    /// Lifetime of a session token; clients join again when it expires.
    #[serde(with = "duration")]
    pub session_ttl: Duration,
    /// Lifetime of a join challenge nonce.
    #[serde(with = "duration")]
    pub challenge_ttl: Duration,
    /// Per-client and global limits on calls.
    pub limits: LimitSettings,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        Self {
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            bind_client_certificates: true,
            insecure: false,
            session_ttl: Duration::from_secs(3600),
            challenge_ttl: Duration::from_secs(30),
            limits: LimitSettings::default(),
        }
    }
}

/// Limits on calls, per client and global. Calls over a limit are refused with
/// `RESOURCE_EXHAUSTED` at once (never queued), so a flooding client cannot make honest
/// clients wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Sustained calls per second one authenticated client may make (token bucket refill).
    pub calls_per_second: f64,
    /// Calls one client may make in a burst (token bucket size).
    pub burst: u32,
    /// Calls one client may have in progress at once (long-polls, downloads and uploads count).
    pub concurrent_calls_per_client: usize,
    /// Sustained unauthenticated calls (JoinChallenge, Join, Enroll, GetStatus, and calls whose
    /// session token is refused) per second from one IP address.
    pub anonymous_calls_per_second: f64,
    /// Burst of unauthenticated calls from one IP address.
    pub anonymous_burst: u32,
    /// Model downloads streaming at once, over all clients; one more waits for a slot (up to
    /// `server.long_poll`). Each streaming download holds a few chunks in memory (≈ 3 MB each
    /// with 1 MiB chunks, measured by the load bench), so this bounds download memory whatever
    /// the number of clients; on the 2-core development machine 16 served 1000 clients in the
    /// same CPU time per round as 64.
    pub max_concurrent_downloads: usize,
    /// Used join challenges remembered at once, over all clients (a challenge is stateless
    /// until a join spends it; the spent nonce is kept until it expires, to refuse replays).
    pub max_pending_challenges: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// TCP connections open at once from one IP address; a further one is closed at once. An
    /// agent uses one (two while it reconnects), so this admits many sites behind one NAT
    /// address. `simulate`, whose clients all share the loopback address, raises it to fit.
    pub max_connections_per_address: usize,
    /// TCP connections open at once in all; a further one is closed at once. With its margin
    /// (`fd_limit::margin`) it must fit under the process's file-descriptor limit, or `serve`
    /// refuses to start.
    pub max_connections: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            calls_per_second: 50.0,
            burst: 100,
            concurrent_calls_per_client: 8,
            // Generous: many sites may share one NAT address, and every join costs two calls.
            anonymous_calls_per_second: 50.0,
            anonymous_burst: 200,
            max_concurrent_downloads: 16,
            max_pending_challenges: 4096,
            max_streams_per_connection: 32,
            max_connections_per_address: 128,
            max_connections: 4096,
        }
    }
}

impl SecuritySettings {
    /// Checks values and combinations; the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(SettingsError::invalid("security.tls_key", "is required with security.tls_cert"))
            }
            (None, Some(_)) => {
                return Err(SettingsError::invalid("security.tls_cert", "is required with security.tls_key"))
            }
            _ => {}
        }
        if self.client_ca.is_some() && self.tls_cert.is_none() {
            return Err(SettingsError::invalid(
                "security.client_ca",
                "mutual TLS needs security.tls_cert and security.tls_key",
            ));
        }
        if self.insecure && self.tls_cert.is_some() {
            return Err(SettingsError::invalid(
                "security.insecure",
                "contradicts security.tls_cert: choose TLS or plaintext",
            ));
        }
        if self.session_ttl < Duration::from_secs(1) {
            return Err(SettingsError::invalid("security.session_ttl", "must be at least 1s"));
        }
        super::duration_up_to("security.challenge_ttl", self.challenge_ttl, Duration::from_secs(600))?;
        let l = &self.limits;
        let rate = |v: f64| v.is_finite() && v > 0.0;
        if !rate(l.calls_per_second) {
            return Err(SettingsError::invalid(
                "security.limits.calls_per_second",
                "must be finite and positive",
            ));
        }
        if !rate(l.anonymous_calls_per_second) {
            return Err(SettingsError::invalid(
                "security.limits.anonymous_calls_per_second",
                "must be finite and positive",
            ));
        }
        for (key, v) in [
            ("security.limits.burst", l.burst as usize),
            ("security.limits.anonymous_burst", l.anonymous_burst as usize),
            ("security.limits.concurrent_calls_per_client", l.concurrent_calls_per_client),
            ("security.limits.max_concurrent_downloads", l.max_concurrent_downloads),
            ("security.limits.max_pending_challenges", l.max_pending_challenges),
            ("security.limits.max_streams_per_connection", l.max_streams_per_connection as usize),
            ("security.limits.max_connections_per_address", l.max_connections_per_address),
            ("security.limits.max_connections", l.max_connections),
        ] {
            if v == 0 {
                return Err(SettingsError::invalid(key, "must be at least 1"));
            }
        }
        if l.max_connections_per_address > l.max_connections {
            return Err(SettingsError::invalid(
                "security.limits.max_connections_per_address",
                "must not exceed security.limits.max_connections",
            ));
        }
        Ok(())
    }

    /// Refuses to serve without transport security unless plaintext was asked for explicitly;
    /// the error names the missing keys and the flags that set them.
    pub fn require_transport(&self) -> Result<(), SettingsError> {
        if self.tls_cert.is_none() && !self.insecure {
            return Err(SettingsError::invalid(
                "security.tls_cert",
                "no TLS certificate configured: set security.tls_cert and security.tls_key \
                 (--tls-cert/--tls-key; `fedtune-coordinator certs init` makes a development PKI), \
                 or pass --insecure (security.insecure = true) to serve plaintext",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_tls_or_insecure_serving_is_refused_naming_the_keys() {
        let s = SecuritySettings::default();
        s.validate().unwrap();
        let err = s.require_transport().unwrap_err().to_string();
        assert!(err.contains("security.tls_cert") && err.contains("--insecure"), "{err}");
        let plain = SecuritySettings { insecure: true, ..SecuritySettings::default() };
        plain.require_transport().unwrap();
    }

    #[test]
    fn inconsistent_tls_settings_are_named() {
        let cases = [
            (SecuritySettings { tls_cert: Some("c".into()), ..Default::default() }, "security.tls_key"),
            (SecuritySettings { client_ca: Some("ca".into()), ..Default::default() }, "security.client_ca"),
            (
                SecuritySettings {
                    tls_cert: Some("c".into()),
                    tls_key: Some("k".into()),
                    insecure: true,
                    ..Default::default()
                },
                "security.insecure",
            ),
            (
                SecuritySettings {
                    limits: LimitSettings { burst: 0, ..Default::default() },
                    ..Default::default()
                },
                "security.limits.burst",
            ),
        ];
        for (s, key) in cases {
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(key), "`{err}` should name {key}");
        }
    }
}
