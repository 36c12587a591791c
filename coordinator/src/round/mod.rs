//! The round state machine: one actor task owns all round state; RPC handlers talk to it
//! through a bounded request channel ([`requests`]) and read what it publishes on `watch`
//! channels ([`events`]).
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Idle
//!     Idle --> Evaluating: initial evaluation due
//!     Idle --> Selecting: ≥ min_available live clients
//!     Idle --> Finished: all rounds done
//!     Selecting --> Training: sample recorded, tasks assigned
//!     Selecting --> Failure: sample < min_fit
//!     Training --> Aggregating: deadline or all reported, ≥ min_fit folded
//!     Training --> Unmasking: secure round, ≥ min_fit and ≥ t masked inputs folded
//!     Unmasking --> Aggregating: masks removed, sum decoded
//!     Unmasking --> Failure: too few answers or shares, implausible sum
//!     Training --> Failure: < min_fit folded by the deadline (secure: a step below t)
//!     Aggregating --> Publishing: strategy produced new weights
//!     Aggregating --> Failure: strategy kept the old model
//!     Publishing --> Evaluating: evaluation due
//!     Publishing --> Idle
//!     Publishing --> Finished: last round
//!     Evaluating --> Idle
//!     Evaluating --> Finished: last round
//!     Failure --> Idle: retry after backoff (attempt + 1)
//!     Failure --> Finished: too many consecutive failures (halted)
//!     Selecting --> Finished: strategy refuses (e.g. privacy budget spent)
//!     Finished --> Shutdown: exit_after_finished elapsed
//!     Idle --> Shutdown: cancelled (from any phase)
//!     Shutdown --> [*]
//! ```
//!
//! - **Idle** waits until enough clients are alive (heartbeats and polls keep them alive).
//! - **Selecting** draws the round's clients (seeded, recorded for audit), asks the strategy for
//!   the fit configuration, and assigns a fit task to each drawn client.
//! - **Training** accepts uploads: each is checked against the round (selection, deadline,
//!   base version, manifest, size) when its header arrives, staged on disk while every chunk is
//!   checked, and folded into the fixed-point sum only after its digest verified (off the
//!   reactor, one fold at a time, while requests keep being served). It ends at the deadline or
//!   when every drawn client has either delivered or failed.
//!   Under secure aggregation training runs the sub-steps advertising → sharing → masking
//!   first ([`phases::secure`]): masked inputs are folded into the ring sum instead.
//! - **Unmasking** (secure rounds) collects the survivors' shares, removes the masks and
//!   decodes the sum, then goes on like a plain round.
//! - **Aggregating** hands the exact weighted sum to the strategy, which chooses its
//!   denominator and steps; a privacy charge that comes back is booked with the strategy.
//! - **Publishing** writes checkpoint and strategy state, commits round record, outcomes and
//!   privacy-ledger entry in one transaction, and only then publishes the new version.
//! - **Evaluating** has drawn clients evaluate the new model and records weighted figures.
//! - **Failure** records the failed attempt and either retries after a backoff or halts.
//! - **Finished** keeps answering (downloads, status, polls get `Finished`) until shutdown.
//! - **Shutdown** marks an unfinished round as aborted and ends the actor.
//!
//! How each participant and each attempt ended is typed ([`crate::outcome`]): phases decide on
//! those values, never on their stored strings.
//!
//! Every phase serves the requests that mean the same everywhere (join, poll, heartbeat,
//! status) through [`phase::Shared::handle_common`], so clients are never left waiting on a
//! phase that does not expect them.

pub mod events;
pub(crate) mod phase;
pub(crate) mod phases;
pub mod requests;
#[cfg(feature = "test-support")]
pub(crate) mod test_pause;

use tracing::{info, Instrument};

use self::phase::{Phase, Shared};
use self::phases::{
    aggregating::Aggregating, evaluating::Evaluating, failure::Failure, finished::Finished, idle::Idle,
    publishing::Publishing, selecting::Selecting, shutdown::Shutdown, training::Training,
    unmasking::Unmasking,
};

/// The state machine: one variant per phase, each holding that phase's private state, so
/// phase-local buffers (e.g. the running sum) cannot outlive their phase.
#[derive(Debug)]
pub(crate) enum Round {
    Idle(Idle),
    Selecting(Selecting),
    Training(Training),
    Unmasking(Unmasking),
    Aggregating(Aggregating),
    Publishing(Publishing),
    Evaluating(Evaluating),
    Failure(Failure),
    Finished(Finished),
    Shutdown(Shutdown),
}

/// How the actor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActorExit {
    /// Shutdown was requested (or the federation finished and the linger elapsed).
    Stopped,
    /// The federation halted: too many failed rounds or the strategy refused to continue.
    Halted(String),
    /// An internal failure (storage) stopped it.
    Fatal(String),
}

/// Runs the actor from `start` until shutdown.
pub(crate) async fn run(mut shared: Shared, start: Round) -> ActorExit {
    let mut state = start;
    loop {
        let span = tracing::info_span!("round", round = shared.round.round, attempt = shared.round.attempt);
        state = match state {
            Round::Idle(p) => step(p, &mut shared).instrument(span).await,
            Round::Selecting(p) => step(p, &mut shared).instrument(span).await,
            Round::Training(p) => step(p, &mut shared).instrument(span).await,
            Round::Unmasking(p) => step(p, &mut shared).instrument(span).await,
            Round::Aggregating(p) => step(p, &mut shared).instrument(span).await,
            Round::Publishing(p) => step(p, &mut shared).instrument(span).await,
            Round::Evaluating(p) => step(p, &mut shared).instrument(span).await,
            Round::Failure(p) => step(p, &mut shared).instrument(span).await,
            Round::Finished(p) => step(p, &mut shared).instrument(span).await,
            Round::Shutdown(p) => {
                shared.enter(Shutdown::NAME, None);
                shared.events.set_secure(None);
                return p.finish(&mut shared).instrument(span).await;
            }
        };
        // A secure attempt lives only in training and unmasking: once the actor is elsewhere
        // its context is withdrawn, so its messages are refused at the edge.
        if !matches!(state, Round::Training(_) | Round::Unmasking(_)) {
            shared.events.clear_secure();
        }
    }
}

async fn step<P: Phase>(phase: P, shared: &mut Shared) -> Round {
    shared.enter(P::NAME, None);
    info!(phase = %P::NAME, "entering phase");
    let started = tokio::time::Instant::now();
    let next = phase.run(shared).await;
    crate::telemetry::phase_left(P::NAME, started.elapsed());
    next
}
