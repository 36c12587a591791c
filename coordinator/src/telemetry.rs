//! The coordinator's Prometheus metrics: every name, kind, unit and help text lives here, and
//! each recording function is called where its event happens (round phases, the RPC layer, the
//! upload handler, the fold).
//!
//! Recording goes through the `metrics` facade; `metrics-exporter-prometheus` renders the text
//! exposition format, served by the operator port (`operator_http`), not by the exporter's own
//! listener, so one port, one shutdown path and one place that decides who may listen. Without
//! `server.operator_listen` no recorder is installed and every call here is a no-op: nothing
//! accumulates that nobody scrapes.
//!
//! Counters and histograms are recorded at their events. Gauges that describe a state the round
//! actor already reports (clients known and alive, ε spent, budget left, the published version)
//! and the process's resident memory are sampled when `/metrics` is scraped, from the same
//! [`StatusReport`] the operator status returns, so the two can never disagree.

use std::sync::OnceLock;
use std::time::Duration;

use fedtune_shared::round::{PhaseName, StatusReport};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::outcome::AttemptStatus;

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets with the process).
    Counter,
    /// A current value.
    Gauge,
    /// Observations in buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One metric: its name (with its unit), kind, unit and help text.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The exposed name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Its unit (already part of the name).
    pub unit: Unit,
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn m(name: &'static str, kind: Kind, unit: Unit, help: &'static str) -> Metric {
    Metric { name, kind, unit, help }
}

/// Round attempts ended, by `outcome` (`completed`, `failed`).
pub const ROUND_ATTEMPTS: &str = "fedtune_round_attempts_total";
/// Rounds completed (their model published) by this process.
pub const ROUNDS_COMPLETED: &str = "fedtune_rounds_completed_total";
/// The phase the round actor is in: 1 for the current `phase`, 0 for the others.
pub const PHASE: &str = "fedtune_phase";
/// The round in progress (or the next one).
pub const ROUND: &str = "fedtune_round_number";
/// The published model version (= rounds completed in the whole federation, restarts included).
pub const MODEL_VERSION: &str = "fedtune_model_version";
/// Clients the registry knows.
pub const CLIENTS_KNOWN: &str = "fedtune_clients_known";
/// Clients whose heartbeat is within the liveness timeout.
pub const CLIENTS_ALIVE: &str = "fedtune_clients_alive";
/// Clients drawn for the current attempt.
pub const CLIENTS_SELECTED: &str = "fedtune_clients_selected";
/// Uploads accepted (folded into the round's sum).
pub const UPLOADS_ACCEPTED: &str = "fedtune_uploads_accepted_total";
/// Uploads refused, by `reason` (the gRPC status class, e.g. `failed_precondition`).
pub const UPLOADS_REFUSED: &str = "fedtune_uploads_refused_total";
/// Update payload bytes received.
pub const BYTES_RECEIVED: &str = "fedtune_received_bytes_total";
/// Model payload bytes sent.
pub const BYTES_SENT: &str = "fedtune_sent_bytes_total";
/// Update bytes folded into a round's sum.
pub const FOLDED_BYTES: &str = "fedtune_folded_bytes_total";
/// Time per fold.
pub const FOLD_DURATION: &str = "fedtune_fold_duration_seconds";
/// Time per round attempt, from its draw to its commit or failure.
pub const ROUND_DURATION: &str = "fedtune_round_duration_seconds";
/// Time per phase, by `phase`.
pub const PHASE_DURATION: &str = "fedtune_phase_duration_seconds";
/// gRPC call latency until the answer's end, by `method` and `code`.
pub const RPC_DURATION: &str = "fedtune_rpc_duration_seconds";
/// ε spent (central, or the worst-off client's local ε under local noise).
pub const EPSILON_SPENT: &str = "fedtune_privacy_epsilon_spent";
/// ε left of `privacy.target_epsilon` (absent without a budget).
pub const EPSILON_LEFT: &str = "fedtune_privacy_epsilon_budget_left";
/// The budget itself (absent without one).
pub const EPSILON_BUDGET: &str = "fedtune_privacy_epsilon_budget";
/// Resident set size of the coordinator process.
pub const RSS: &str = "fedtune_process_resident_memory_bytes";

/// Every metric the coordinator exposes (README's table lists exactly these).
pub const METRICS: &[Metric] = &[
    m(ROUND_ATTEMPTS, Kind::Counter, Unit::Count, "Round attempts ended, by outcome (completed, failed)."),
    m(ROUNDS_COMPLETED, Kind::Counter, Unit::Count, "Rounds completed (model published) by this process."),
    m(PHASE, Kind::Gauge, Unit::Count, "1 for the phase the round actor is in, 0 for the others."),
    m(ROUND, Kind::Gauge, Unit::Count, "The round in progress, or the next one."),
    m(
        MODEL_VERSION,
        Kind::Gauge,
        Unit::Count,
        "The published model version (rounds completed in the federation).",
    ),
    m(CLIENTS_KNOWN, Kind::Gauge, Unit::Count, "Clients the coordinator knows."),
    m(
        CLIENTS_ALIVE,
        Kind::Gauge,
        Unit::Count,
        "Clients whose last heartbeat is within the liveness timeout.",
    ),
    m(CLIENTS_SELECTED, Kind::Gauge, Unit::Count, "Clients drawn for the current attempt."),
    m(UPLOADS_ACCEPTED, Kind::Counter, Unit::Count, "Uploads accepted into a round's sum."),
    m(UPLOADS_REFUSED, Kind::Counter, Unit::Count, "Uploads refused, by reason (gRPC status class)."),
    m(BYTES_RECEIVED, Kind::Counter, Unit::Bytes, "Update payload bytes received from clients."),
    m(BYTES_SENT, Kind::Counter, Unit::Bytes, "Model payload bytes sent to clients."),
    m(FOLDED_BYTES, Kind::Counter, Unit::Bytes, "Update bytes folded into a round's sum."),
    m(FOLD_DURATION, Kind::Histogram, Unit::Seconds, "Time to fold one update into the round's sum."),
    m(ROUND_DURATION, Kind::Histogram, Unit::Seconds, "Round attempt duration, draw to commit or failure."),
    m(PHASE_DURATION, Kind::Histogram, Unit::Seconds, "Time spent in a phase, by phase."),
    m(
        RPC_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "gRPC call latency until the answer ended, by method and code.",
    ),
    m(EPSILON_SPENT, Kind::Gauge, Unit::Count, "Privacy loss epsilon spent so far (0 without DP)."),
    m(EPSILON_LEFT, Kind::Gauge, Unit::Count, "Epsilon left of privacy.target_epsilon."),
    m(EPSILON_BUDGET, Kind::Gauge, Unit::Count, "privacy.target_epsilon, the budget."),
    m(RSS, Kind::Gauge, Unit::Bytes, "Resident set size of the coordinator process."),
];

/// Every phase, so the phase gauge shows one 1 and zeros, never a stale 1.
const PHASES: [PhaseName; 10] = [
    PhaseName::Idle,
    PhaseName::Selecting,
    PhaseName::Training,
    PhaseName::Unmasking,
    PhaseName::Aggregating,
    PhaseName::Publishing,
    PhaseName::Evaluating,
    PhaseName::Failure,
    PhaseName::Finished,
    PhaseName::Shutdown,
];

/// Buckets for durations: 1 ms to about 1 h, roughly ×3 apart (phases and rounds run for
/// minutes, RPCs and folds for milliseconds).
const DURATION_BUCKETS: [f64; 16] =
    [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// The process-wide recorder's handle, installed on first use. `metrics` has one global
/// recorder per process: a process running several coordinators (tests) shares it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_enable_unit_suffix(false)
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &DURATION_BUCKETS)
                .expect("duration buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics shows only what it renders");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    for metric in METRICS {
        match metric.kind {
            Kind::Counter => describe_counter!(metric.name, metric.unit, metric.help),
            Kind::Gauge => describe_gauge!(metric.name, metric.unit, metric.help),
            Kind::Histogram => describe_histogram!(metric.name, metric.unit, metric.help),
        }
    }
    // Series exist from the start (at 0), so `rate()` and the status comparison see them
    // before the first round ends.
    for outcome in [AttemptStatus::Completed, AttemptStatus::Failed] {
        counter!(ROUND_ATTEMPTS, "outcome" => outcome.as_str()).absolute(0);
    }
    for name in [ROUNDS_COMPLETED, UPLOADS_ACCEPTED, BYTES_RECEIVED, BYTES_SENT, FOLDED_BYTES] {
        counter!(name).absolute(0);
    }
}

/// The round actor entered `phase`.
pub fn phase_entered(phase: PhaseName) {
    for p in PHASES {
        gauge!(PHASE, "phase" => p.to_string()).set(if p == phase { 1.0 } else { 0.0 });
    }
}

/// The round actor left `phase` after `elapsed`.
pub fn phase_left(phase: PhaseName, elapsed: Duration) {
    histogram!(PHASE_DURATION, "phase" => phase.to_string()).record(elapsed.as_secs_f64());
}

/// An attempt drew `selected` clients.
pub fn clients_selected(selected: usize) {
    gauge!(CLIENTS_SELECTED).set(selected as f64);
}

/// An attempt ended as `outcome` after `elapsed` (since its draw, when this process drew it).
pub fn attempt_ended(outcome: AttemptStatus, elapsed: Option<Duration>) {
    counter!(ROUND_ATTEMPTS, "outcome" => outcome.as_str()).increment(1);
    if outcome == AttemptStatus::Completed {
        counter!(ROUNDS_COMPLETED).increment(1);
    }
    if let Some(elapsed) = elapsed {
        histogram!(ROUND_DURATION).record(elapsed.as_secs_f64());
    }
}

/// An upload call ended: accepted (`None`), or refused with gRPC `code`.
pub fn upload_ended(refused: Option<tonic::Code>) {
    match refused {
        None => counter!(UPLOADS_ACCEPTED).increment(1),
        Some(code) => counter!(UPLOADS_REFUSED, "reason" => code_label(code)).increment(1),
    }
}

/// Model bytes streamed to a client.
pub fn bytes_sent(n: u64) {
    counter!(BYTES_SENT).increment(n);
}

/// Update bytes received from a client.
pub fn bytes_received(n: u64) {
    counter!(BYTES_RECEIVED).increment(n);
}

/// One update of `bytes` folded in `elapsed` (throughput is the ratio of the two rates).
pub fn folded(bytes: u64, elapsed: Duration) {
    counter!(FOLDED_BYTES).increment(bytes);
    histogram!(FOLD_DURATION).record(elapsed.as_secs_f64());
}

/// A gRPC call to `method` (its last path segment) ended with `code` after `elapsed`.
pub fn rpc_ended(method: &str, code: tonic::Code, elapsed: Duration) {
    histogram!(RPC_DURATION, "method" => method.to_string(), "code" => code_label(code))
        .record(elapsed.as_secs_f64());
}

/// Samples the gauges that describe the actor's state, from the operator status.
pub fn sample_status(report: &StatusReport) {
    gauge!(CLIENTS_KNOWN).set(report.clients.len() as f64);
    gauge!(CLIENTS_ALIVE).set(report.clients.iter().filter(|c| c.alive).count() as f64);
    gauge!(MODEL_VERSION).set(report.model_version.0 as f64);
    gauge!(ROUND).set(report.round.round as f64);
    let p = &report.privacy;
    let spent = p.local_epsilon.unwrap_or(p.epsilon);
    gauge!(EPSILON_SPENT).set(spent);
    if let Some(budget) = p.target_epsilon {
        gauge!(EPSILON_BUDGET).set(budget);
        gauge!(EPSILON_LEFT).set((budget - spent).max(0.0));
    }
}

/// Samples the process's resident memory (`VmRSS` of `/proc/self/status`; nothing where
/// there is no such file).
pub fn sample_process() {
    if let Some(bytes) = std::fs::read_to_string("/proc/self/status").ok().as_deref().and_then(vm_rss_bytes) {
        gauge!(RSS).set(bytes as f64);
    }
}

/// `VmRSS:   1234 kB` → bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// A gRPC code as a label value: `ok`, `failed_precondition`, …
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "ok",
        C::Cancelled => "cancelled",
        C::Unknown => "unknown",
        C::InvalidArgument => "invalid_argument",
        C::DeadlineExceeded => "deadline_exceeded",
        C::NotFound => "not_found",
        C::AlreadyExists => "already_exists",
        C::PermissionDenied => "permission_denied",
        C::ResourceExhausted => "resource_exhausted",
        C::FailedPrecondition => "failed_precondition",
        C::Aborted => "aborted",
        C::OutOfRange => "out_of_range",
        C::Unimplemented => "unimplemented",
        C::Internal => "internal",
        C::Unavailable => "unavailable",
        C::DataLoss => "data_loss",
        C::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_starts_with_fedtune_and_ends_with_its_unit() {
        for metric in METRICS {
            assert!(metric.name.starts_with("fedtune_"), "{}", metric.name);
            let suffix = match (metric.kind, metric.unit) {
                (Kind::Counter, Unit::Bytes) => Some("_bytes_total"),
                (Kind::Counter, _) => Some("_total"),
                (_, Unit::Seconds) => Some("_seconds"),
                (_, Unit::Bytes) => Some("_bytes"),
                _ => None,
            };
            if let Some(suffix) = suffix {
                assert!(metric.name.ends_with(suffix), "{} should end with {suffix}", metric.name);
            }
        }
    }

    #[test]
    fn every_metric_is_listed_in_the_readme_and_the_readme_lists_no_other() {
        let readme = include_str!("../../README.md");
        let table = readme
            .split_once("<!-- metrics:")
            .and_then(|(_, rest)| rest.split_once("<!-- /metrics -->"))
            .map(|(table, _)| table)
            .expect("README.md has the metrics table between its markers");
        let listed: std::collections::BTreeSet<&str> =
            table.lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split('`').next()).collect();
        let ours: std::collections::BTreeSet<&str> = METRICS.iter().map(|m| m.name).collect();
        assert_eq!(listed, ours, "README.md's metrics table and telemetry::METRICS differ");
    }

    #[test]
    fn resident_memory_is_read_from_the_vm_rss_line() {
        let status = "Name:\tx\nVmPeak:\t  900 kB\nVmRSS:\t  1234 kB\nThreads: 3\n";
        assert_eq!(vm_rss_bytes(status), Some(1234 * 1024));
        assert_eq!(vm_rss_bytes("Name: x\n"), None);
    }
}
