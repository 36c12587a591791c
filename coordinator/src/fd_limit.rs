//! The file-descriptor budget: how many descriptors a coordinator configured by `settings` may
//! need at once, checked against the process's `RLIMIT_NOFILE` at start-up.
//!
//! Every admitted connection is a socket, so `security.limits.max_connections` is most of the
//! bound; a coordinator whose limit is below it would not refuse the extra connections cleanly
//! at admission (`rpc/connections.rs`) but fail `accept` with `EMFILE`, and then fail whatever
//! else needed a descriptor at that moment — a spool file, a checkpoint, SQLite's journal — in
//! the middle of a round. So `run` first raises its soft limit to the hard one (a process may
//! without privileges; the soft default of 1024 is a relic of `select`), then refuses to start
//! when the bound still does not fit, naming the key to lower.
//!
//! The bound is [`required`]: the connections plus [`margin`], which is derived from the same
//! settings here and nowhere else.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tracing::info;

use crate::settings::CoordinatorSettings;

/// Descriptors held whatever the configuration: stdin, stdout and stderr (logs), the async
/// runtime's epoll and wake-up descriptors, the gRPC listener, SQLite's database, WAL and
/// shared-memory files for each of its connections (storage and allowlist), a checkpoint
/// being written and its folder's fsync, the model and TLS files read at start, and room for
/// a library that opens something we did not count (`/dev/urandom`, `/proc/self/…`).
pub const BASE_DESCRIPTORS: u64 = 64;

/// Connections the operator port (`server.operator_listen`) is given room for: it admits no
/// fixed number, but its callers are one Prometheus and a few operators' browsers.
pub const OPERATOR_PORT_DESCRIPTORS: u64 = 32;

/// Connections the plaintext health port (`server.health_listen`) is given room for: a
/// kubelet's probes, each a short call.
pub const HEALTH_PORT_DESCRIPTORS: u64 = 16;

/// The coordinator's descriptors beyond its client connections, from `settings`: the
/// [`BASE_DESCRIPTORS`], one spool file per upload slot (`server.max_concurrent_uploads`) and
/// the one being folded, and each optional listener with room for its own callers.
pub fn margin(settings: &CoordinatorSettings) -> u64 {
    let s = &settings.server;
    let spool = s.max_concurrent_uploads as u64 + 1;
    let operator = s.operator_listen.map_or(0, |_| 1 + OPERATOR_PORT_DESCRIPTORS);
    let health = s.health_listen.map_or(0, |_| 1 + HEALTH_PORT_DESCRIPTORS);
    BASE_DESCRIPTORS + spool + operator + health
}

/// Every descriptor the coordinator may hold at once: `security.limits.max_connections` plus
/// [`margin`].
pub fn required(settings: &CoordinatorSettings) -> u64 {
    (settings.security.limits.max_connections as u64).saturating_add(margin(settings))
}

/// The bound does not fit under the process's file-descriptor limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "security.limits.max_connections = {max_connections} needs {required} file descriptors \
     ({max_connections} connections + {margin} for listeners, spool files, SQLite and logs), but \
     this process may open only {limit} (RLIMIT_NOFILE, already raised to its hard limit): \
     lower security.limits.max_connections to at most {fits}, or raise the hard limit \
     (`ulimit -Hn`, systemd's LimitNOFILE=, the container runtime's nofile ulimit)"
)]
pub struct FdLimitError {
    /// `security.limits.max_connections`.
    pub max_connections: u64,
    /// Descriptors other than client connections ([`margin`]).
    pub margin: u64,
    /// [`required`].
    pub required: u64,
    /// The process's limit.
    pub limit: u64,
    /// The largest `max_connections` that would fit (0 when nothing does).
    pub fits: u64,
}

/// Whether a coordinator configured by `settings` fits under a limit of `limit` descriptors;
/// `Ok` carries the bound it needs.
pub fn check(limit: u64, settings: &CoordinatorSettings) -> Result<u64, FdLimitError> {
    let required = required(settings);
    if required <= limit {
        return Ok(required);
    }
    let margin = margin(settings);
    Err(FdLimitError {
        max_connections: settings.security.limits.max_connections as u64,
        margin,
        required,
        limit,
        fits: limit.saturating_sub(margin),
    })
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit, then [`check`]s `settings`
/// against it and logs both numbers. The raised limit is kept on success and failure alike
/// (processes this one starts, such as `simulate`'s clients, inherit it).
pub fn raise_and_check(settings: &CoordinatorSettings) -> Result<u64, FdLimitError> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        // Failure leaves the soft limit as it was; the check below judges that one.
        let _ = setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum });
    }
    // `None` is RLIM_INFINITY, which Linux never grants for descriptors (fs.nr_open caps it).
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let required = check(soft, settings)?;
    info!(
        limit = soft,
        required,
        max_connections = settings.security.limits.max_connections,
        "file descriptors: the bound fits under RLIMIT_NOFILE"
    );
    Ok(required)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_connections: usize) -> CoordinatorSettings {
        let mut s = CoordinatorSettings::with_paths("/unused", "/unused");
        s.security.limits.max_connections = max_connections;
        s
    }

    #[test]
    fn the_bound_is_the_connections_plus_a_margin_that_grows_with_upload_slots_and_listeners() {
        let mut s = settings(1000);
        let base = required(&s);
        assert_eq!(base, 1000 + margin(&s));
        assert!(margin(&s) >= BASE_DESCRIPTORS + s.server.max_concurrent_uploads as u64);
        s.server.max_concurrent_uploads += 10;
        assert_eq!(required(&s), base + 10, "one spool file per upload slot");
        s.server.operator_listen = Some("127.0.0.1:9464".parse().unwrap());
        assert_eq!(required(&s), base + 10 + 1 + OPERATOR_PORT_DESCRIPTORS);
        s.server.health_listen = Some("127.0.0.1:50052".parse().unwrap());
        assert_eq!(required(&s), base + 10 + 2 + OPERATOR_PORT_DESCRIPTORS + HEALTH_PORT_DESCRIPTORS);
    }

    #[test]
    fn a_bound_within_the_limit_is_accepted_up_to_the_last_descriptor() {
        let s = settings(4096);
        let needed = required(&s);
        assert_eq!(check(needed, &s), Ok(needed));
        assert_eq!(check(1 << 20, &s), Ok(needed));
        assert!(check(needed - 1, &s).is_err());
    }

    #[test]
    fn a_bound_above_the_limit_is_refused_naming_the_key_the_limit_and_what_would_fit() {
        let s = settings(4096);
        let err = check(256, &s).unwrap_err();
        assert_eq!(err.fits, 256 - margin(&s));
        let text = err.to_string();
        assert!(text.contains("security.limits.max_connections = 4096"), "{text}");
        assert!(text.contains("only 256"), "{text}");
        assert!(text.contains(&format!("at most {}", 256 - margin(&s))), "{text}");
        // Lowering the key to what the error suggests is enough.
        assert!(check(256, &settings(err.fits as usize)).is_ok());
    }

    #[test]
    fn a_limit_below_the_margin_fits_no_connection_at_all() {
        let err = check(10, &settings(1)).unwrap_err();
        assert_eq!(err.fits, 0);
    }
}
