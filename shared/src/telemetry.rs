//! Tracing set-up shared by both binaries, so logs look the same on every machine.

use tracing_subscriber::{fmt, EnvFilter};

/// Output format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per event, for log collectors.
    Json,
}

/// Installs the global tracing subscriber (stderr). `RUST_LOG` overrides `default_filter`.
/// Calling it twice is harmless: the second call keeps the first subscriber.
pub fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
