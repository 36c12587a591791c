//! Tracing set-up shared by both binaries, so logs look the same on every machine.

use std::io::IsTerminal;

use tracing_subscriber::fmt::format::{DefaultFields, Format, Json, JsonFields};
use tracing_subscriber::fmt::{self, MakeWriter, SubscriberBuilder};
use tracing_subscriber::EnvFilter;

/// Output format of the log (`--log-format` on both binaries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal and `NO_COLOR` is unset.
    #[default]
    Text,
    /// One JSON object per event, for log collectors: `timestamp`, `level`, `fields` (with
    /// `message`), and `span`/`spans` carrying the fields of the enclosing spans (round,
    /// attempt, client), so one search finds everything logged inside them.
    Json,
}

impl LogFormat {
    /// The names `--log-format` accepts.
    pub const NAMES: [&'static str; 2] = ["text", "json"];
}

/// `--log-format` names a format that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("unknown log format {0:?}: expected text or json")]
pub struct UnknownLogFormat(String);

impl std::str::FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            // `pretty` was the text format's first name.
            "text" | "pretty" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(UnknownLogFormat(other.to_string())),
        }
    }
}

/// Installs the global tracing subscriber (stderr). `RUST_LOG` overrides `default_filter`.
/// Calling it twice is harmless: the second call keeps the first subscriber.
pub fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Escape codes in a file or a journal are noise that breaks searches: colour is for people
    // looking at a terminal, and https://no-color.org lets them refuse it there too.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = match format {
        LogFormat::Text => text(filter, ansi, std::io::stderr).try_init(),
        LogFormat::Json => json(filter, std::io::stderr).try_init(),
    };
}

fn text<W>(filter: EnvFilter, ansi: bool, writer: W) -> SubscriberBuilder<DefaultFields, Format, EnvFilter, W>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    fmt::Subscriber::builder().with_env_filter(filter).with_writer(writer).with_target(false).with_ansi(ansi)
}

fn json<W>(filter: EnvFilter, writer: W) -> SubscriberBuilder<JsonFields, Format<Json>, EnvFilter, W>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    text(filter, false, writer).json().with_current_span(true).with_span_list(true)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, PoisonError};

    use super::*;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()).unwrap()
        }
    }

    fn log_a_round() {
        let span = tracing::info_span!("round", round = 7, attempt = 2);
        let _entered = span.enter();
        tracing::info!(client = "site-a", accepted = true, "update accepted");
    }

    #[test]
    fn every_json_line_is_an_object_with_level_message_and_the_enclosing_span_fields() {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = json(EnvFilter::new("info"), move || sink.clone()).finish();
        tracing::subscriber::with_default(subscriber, log_a_round);
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let event: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(event["level"], "INFO");
        assert!(event["timestamp"].is_string(), "{event}");
        assert_eq!(event["fields"]["message"], "update accepted");
        assert_eq!(event["fields"]["client"], "site-a");
        assert_eq!(event["span"]["name"], "round");
        assert_eq!(event["span"]["round"], 7);
        assert_eq!(event["spans"][0]["attempt"], 2);
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    #[test]
    fn text_without_a_terminal_has_no_escape_codes_and_with_one_it_does() {
        for ansi in [false, true] {
            let out = Captured::default();
            let sink = out.clone();
            let subscriber = text(EnvFilter::new("info"), ansi, move || sink.clone()).finish();
            tracing::subscriber::with_default(subscriber, log_a_round);
            let text = out.text();
            assert!(text.contains("update accepted"), "{text}");
            // The enclosing span's fields are on the line (field names are styled when coloured).
            assert!(text.contains("round") && text.contains('7'), "{text}");
            assert_eq!(text.contains("\u{1b}["), ansi, "ansi {ansi}: {text:?}");
        }
    }

    #[test]
    fn log_format_names_parse_and_others_are_refused_by_name() {
        for name in LogFormat::NAMES {
            assert!(name.parse::<LogFormat>().is_ok(), "{name}");
        }
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("pretty".parse::<LogFormat>().unwrap(), LogFormat::Text);
        let err = "yaml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(err.contains("\"yaml\"") && err.contains("text or json"), "{err}");
    }
}
