//! Finished: the federation is over (all rounds done, or halted). Polls answer `Finished`;
//! downloads of the final model and status keep working until shutdown.

use fedtune_shared::round::PhaseName;
use tracing::info;

use super::shutdown::Shutdown;
use crate::round::phase::{Phase, Shared, Wake};
use crate::round::Round;

/// The terminal serving state.
#[derive(Debug)]
pub(crate) struct Finished {
    reason: String,
    halted: bool,
}

impl Finished {
    /// All configured rounds completed.
    pub(crate) fn completed(shared: &Shared) -> Self {
        Self { reason: format!("all {} rounds completed", shared.settings.rounds.total), halted: false }
    }

    /// The federation ended before its configured rounds, by design (e.g. the privacy budget is
    /// spent): a clean finish, not a halt.
    pub(crate) fn ended(reason: String) -> Self {
        Self { reason, halted: false }
    }

    /// The federation stopped early.
    pub(crate) fn halted(_shared: &Shared, reason: String) -> Self {
        Self { reason, halted: true }
    }
}

impl Phase for Finished {
    const NAME: PhaseName = PhaseName::Finished;

    async fn run(self, shared: &mut Shared) -> Round {
        info!(reason = %self.reason, final_version = %shared.model.version, "federation finished");
        shared.finished = Some(self.reason.clone());
        shared.tasks.clear();
        shared.events.tasks_changed();
        let linger = shared.settings.server.exit_after_finished;
        let deadline = linger.map(|d| tokio::time::Instant::now() + d);
        let mut tick = shared.tick_interval();
        loop {
            match shared.wake(deadline, &mut tick).await {
                Wake::Request(env) => shared.handle_common(env).await,
                Wake::Tick => {}
                Wake::Deadline | Wake::Cancelled => {
                    return Round::Shutdown(if self.halted {
                        Shutdown::halted(self.reason)
                    } else {
                        Shutdown::requested()
                    })
                }
            }
        }
    }
}
