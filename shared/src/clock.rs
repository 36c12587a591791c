//! Wall-clock time, for what must outlive a process: records in the state database, token
//! expiry, deadlines shown to operators. Durations and timeouts inside a process use
//! `tokio::time` instead (they must test with paused time).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 for a clock set before 1970). The type is `u64`
/// because the instant cannot be negative; SQLite stores it as `i64`, which holds every such
/// value until the year 292 million.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Seconds since the Unix epoch (0 for a clock set before 1970).
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_and_seconds_tell_the_same_time() {
        let (s, ms) = (now_secs(), now_ms());
        assert!(s > 1_700_000_000, "a clock after 2023");
        assert!(ms / 1000 >= s && ms / 1000 - s <= 1);
    }
}
