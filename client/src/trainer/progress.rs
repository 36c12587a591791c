//! The training progress bar: steps, loss and samples/s on stderr, only for a person watching.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar that is hidden when stderr is not a terminal (logs, CI, the agent's
/// subprocesses) or when the user asked for quiet output.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `steps` optimizer steps titled `title`.
    pub fn new(steps: u64, title: &str, show: bool) -> Self {
        let bar = if show && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(title.to_string());
            bar
        } else {
            ProgressBar::hidden()
        };
        Self { bar }
    }

    /// Moves to `step` and shows the running loss and throughput.
    pub fn update(&self, step: u64, loss: f64, samples_per_second: f64) {
        self.bar.set_position(step);
        self.bar.set_message(format!("loss {loss:.4} · {samples_per_second:.1} samples/s"));
    }

    /// Removes the bar (the caller prints a summary line instead).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
