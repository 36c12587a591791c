//! Test-only pause points (feature `test-support`): `FEDTUNE_TEST_PAUSE_AT=<point>:<round>`
//! makes the actor stop for good at that moment of a secure round, with the process still alive,
//! so a process test can `kill -9` the coordinator exactly there (`tests/tests/secure_kill9.rs`).
//! A timing-based kill could not hit the short steps of a fast federation reliably.
//!
//! The actor logs `test pause at <point>` and then never makes progress again; requests pile up
//! in the bounded channel and their callers time out, like a coordinator that hangs.

use std::sync::OnceLock;

use tracing::info;

/// The variable naming where to pause.
pub(crate) const ENV: &str = "FEDTUNE_TEST_PAUSE_AT";

/// A moment of a secure round where the actor may pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PausePoint {
    /// The attempt is set up and its tasks assigned; advertising is open.
    Advertising,
    /// Advertising closed; sharing is open.
    Sharing,
    /// Sharing closed and at least one masked input is folded.
    Masking,
    /// The release charge is written; the unmasking request has not gone out.
    Unmasking,
    /// The masks are removed and the sum decoded; nothing is aggregated or published yet.
    Unmasked,
}

impl PausePoint {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "advertising" => Self::Advertising,
            "sharing" => Self::Sharing,
            "masking" => Self::Masking,
            "unmasking" => Self::Unmasking,
            "unmasked" => Self::Unmasked,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Advertising => "advertising",
            Self::Sharing => "sharing",
            Self::Masking => "masking",
            Self::Unmasking => "unmasking",
            Self::Unmasked => "unmasked",
        }
    }
}

/// The configured point and round, read once. A malformed value panics at the first check: a
/// test that asked for a pause must not silently run without one.
fn configured() -> Option<(PausePoint, u64)> {
    static AT: OnceLock<Option<(PausePoint, u64)>> = OnceLock::new();
    *AT.get_or_init(|| {
        let raw = std::env::var(ENV).ok()?;
        let parsed = raw.split_once(':').and_then(|(p, r)| Some((PausePoint::parse(p)?, r.parse().ok()?)));
        Some(parsed.unwrap_or_else(|| panic!("{ENV}={raw}: expected <point>:<round>")))
    })
}

/// Pauses forever if the actor reached `point` of `round` and that is the configured pause.
pub(crate) async fn at(point: PausePoint, round: u64) {
    if configured() == Some((point, round)) {
        info!("test pause at {}", point.name());
        std::future::pending::<()>().await;
    }
}
