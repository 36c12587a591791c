//! Shutdown: mark an unfinished round as aborted, withdraw tasks, end the actor.

use fedtune_shared::round::PhaseName;
use tracing::{info, warn};

use crate::round::phase::Shared;
use crate::round::ActorExit;
use crate::storage;

/// The actor's last phase.
#[derive(Debug)]
pub(crate) struct Shutdown {
    exit: ActorExit,
}

impl Shutdown {
    /// Shutdown was asked for.
    pub(crate) fn requested() -> Self {
        Self { exit: ActorExit::Stopped }
    }

    /// The federation halted.
    pub(crate) fn halted(reason: String) -> Self {
        Self { exit: ActorExit::Halted(reason) }
    }

    /// An internal failure.
    pub(crate) fn fatal(reason: String) -> Self {
        Self { exit: ActorExit::Fatal(reason) }
    }

    /// Phase name (the shutdown phase runs once and ends the actor, so it is not a `Phase`).
    pub(crate) const NAME: PhaseName = PhaseName::Shutdown;

    /// Cleans up and returns how the actor ended.
    pub(crate) async fn finish(self, shared: &mut Shared) -> ActorExit {
        shared.tasks.clear();
        shared.events.tasks_changed();
        match shared.storage.call(|c| storage::abort_running(c)).await {
            Ok(0) => {}
            Ok(n) => info!(rounds = n, "unfinished round marked as aborted"),
            Err(e) => warn!(cause = %e, "cannot mark the unfinished round as aborted"),
        }
        self.exit
    }
}
