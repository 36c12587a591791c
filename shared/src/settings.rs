//! Layered configuration shared by both binaries: a TOML file, then `PREFIX__SECTION__KEY`
//! environment variables, then CLI overrides, deserialized once into a typed settings struct.
//!
//! Validation of *values* (ranges, cross-field rules) belongs to each binary's settings type;
//! this module only layers and deserializes, and makes every error name the offending key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

/// A configuration that cannot be loaded. Binaries print it and exit with status 64 (EX_USAGE)
/// before binding any port.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message (names line and key).
        message: String,
    },
    /// An environment variable cannot be placed in the configuration tree.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// Variable name.
        var: String,
        /// What is wrong.
        reason: String,
    },
    /// The merged configuration does not fit the settings type (unknown key, wrong type).
    #[error("invalid configuration: {0}")]
    Shape(String),
    /// A value is out of range or inconsistent with another one.
    #[error("invalid configuration key `{key}`: {reason}")]
    Invalid {
        /// Dotted key path, e.g. `rounds.min_fit`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl SettingsError {
    /// Shorthand for [`SettingsError::Invalid`].
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { key: key.into(), reason: reason.into() }
    }
}

/// Loads `T` from an optional TOML file, environment variables named `{prefix}__A__B` (setting
/// key `a.b`; values are parsed as TOML and fall back to plain strings), and finally
/// `overrides` (`("a.b", value)` pairs from CLI flags). Unknown keys are errors when `T` uses
/// `#[serde(deny_unknown_fields)]`, which every settings type should.
pub fn load_layered<T: DeserializeOwned>(
    path: Option<&Path>,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(&str, toml::Value)],
) -> Result<T, SettingsError> {
    let mut root = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|source| SettingsError::Read { path: p.into(), source })?;
            text.parse::<toml::Table>()
                .map_err(|e| SettingsError::Parse { path: p.into(), message: e.to_string() })?
        }
        None => toml::Table::new(),
    };
    let env_prefix = format!("{prefix}__");
    let mut env: Vec<(String, String)> =
        env.into_iter().filter(|(k, _)| k.starts_with(&env_prefix)).collect();
    env.sort();
    for (var, raw) in env {
        let path: Vec<String> = var[env_prefix.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            return Err(SettingsError::Env { var, reason: "empty key segment".into() });
        }
        let value = parse_env_value(&raw);
        set_path(&mut root, &path, value)
            .map_err(|reason| SettingsError::Env { var: var.clone(), reason })?;
    }
    for (key, value) in overrides {
        let path: Vec<String> = key.split('.').map(String::from).collect();
        set_path(&mut root, &path, value.clone())
            .map_err(|reason| SettingsError::invalid(key.to_string(), reason))?;
    }
    // Round-trip through text so the deserializer reports the key path of a bad value.
    let text = toml::to_string(&root).map_err(|e| SettingsError::Shape(e.to_string()))?;
    toml::from_str(&text).map_err(|e| SettingsError::Shape(one_line(&e.to_string())))
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "|").collect::<Vec<_>>().join(" ")
}

fn parse_env_value(raw: &str) -> toml::Value {
    // `x = <raw>` parses numbers, booleans, arrays and quoted strings; anything else is a string.
    match format!("x = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("x").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut table = root;
    for (i, seg) in parents.iter().enumerate() {
        let entry = table.entry(seg.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table =
            entry.as_table_mut().ok_or_else(|| format!("`{}` is not a section", parents[..=i].join(".")))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

/// Parses a human duration: an integer or decimal followed by `ms`, `s`, `m` or `h`
/// (`"250ms"`, `"1.5s"`, `"10m"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit; write e.g. 250ms, 30s, 10m or 1h"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` does not start with a number"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown duration unit `{other}` in `{s}` (use ms, s, m, h)")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Serde helper for `Duration` fields written as human strings (`#[serde(with = "duration")]`).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as e.g. `"30s"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    /// Deserializes from e.g. `"30s"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Serde helper for optional `Duration` fields (`#[serde(default, with = "optional_duration")]`):
/// a human string when set, the key left out (or `None`) when not.
pub mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `Some` as e.g. `"2m"` and `None` as nothing.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes from e.g. `"2m"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map(Some).map_err(serde::de::Error::custom)
    }
}

/// Serde helper for values written as their `Display`/`FromStr` text (`device = "cuda:1"`),
/// so a setting parses exactly as its command-line flag does.
pub mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes through `Display`.
    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    /// Deserializes through `FromStr`, its error becoming the serde error.
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        rounds: Rounds,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Rounds {
        total: u64,
        #[serde(with = "duration")]
        deadline: Duration,
        #[serde(default)]
        name: String,
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn env_overrides_the_file_and_flags_override_env() {
        let f = write("[rounds]\ntotal = 3\ndeadline = \"10s\"\n");
        let env = vec![
            ("FEDTUNE__ROUNDS__TOTAL".to_string(), "7".to_string()),
            ("FEDTUNE__ROUNDS__NAME".to_string(), "plain text".to_string()),
            ("OTHER__ROUNDS__TOTAL".to_string(), "9".to_string()),
        ];
        let d: Demo = load_layered(Some(f.path()), "FEDTUNE", env.clone(), &[]).unwrap();
        assert_eq!(d.rounds.total, 7);
        assert_eq!(d.rounds.name, "plain text");
        let d: Demo =
            load_layered(Some(f.path()), "FEDTUNE", env, &[("rounds.total", toml::Value::Integer(11))])
                .unwrap();
        assert_eq!(d.rounds.total, 11);
    }

    #[test]
    fn errors_name_the_offending_key() {
        let f = write("[rounds]\ntotal = 3\ndeadline = \"10s\"\ntypo = 1\n");
        let err = load_layered::<Demo>(Some(f.path()), "FEDTUNE", vec![], &[]).unwrap_err().to_string();
        assert!(err.contains("typo"), "{err}");
        let f = write("[rounds]\ntotal = \"many\"\ndeadline = \"10s\"\n");
        let err = load_layered::<Demo>(Some(f.path()), "FEDTUNE", vec![], &[]).unwrap_err().to_string();
        assert!(err.contains("total"), "{err}");
        let f = write("[rounds]\ntotal = 1\ndeadline = \"10 parsecs\"\n");
        let err = load_layered::<Demo>(Some(f.path()), "FEDTUNE", vec![], &[]).unwrap_err().to_string();
        assert!(err.contains("deadline") && err.contains("parsecs"), "{err}");
    }

    #[test]
    fn durations_parse_and_format_symmetrically() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("3 weeks").is_err());
        for d in [Duration::from_millis(250), Duration::from_secs(30), Duration::from_secs(3600)] {
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }
}
