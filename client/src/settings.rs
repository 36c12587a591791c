//! The configuration of `fedtune-client run`: one typed tree, layered like the coordinator's (see
//! [`fedtune_shared::settings`]): a TOML file (`--config`), then `FEDTUNE_CLIENT__SECTION__KEY`
//! environment variables, then the command-line flags, and validated once by
//! [`ClientSettings::validate`] before the client loads data or dials the coordinator.
//!
//! The variables carry `FEDTUNE_CLIENT__` rather than the coordinator's `FEDTUNE__` so that a
//! client started by a coordinator (`simulate`), which inherits its environment, never reads the
//! coordinator's keys as its own (they would be unknown keys here, and vice versa).
//!
//! `deploy/config/client.example.toml` lists every key with its default; for example:
//!
//! ```toml
//! [coordinator]
//! url = "https://coordinator.example:50051"
//! tls_ca = "/etc/fedtune/ca.pem"
//! [identity]
//! name = "site-a"
//! key = "/etc/fedtune/site-a.key"
//! [data]
//! path = "/data/site-a.csv"
//! [model]
//! dir = "/models/bert-base-uncased"
//! ```
//!
//! The one-time enrollment token is deliberately not a key: a file keeps a spent secret around,
//! so it comes only from `--enroll-token` or `FEDTUNE_ENROLL_TOKEN`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedtune_shared::ids::ClientId;
use fedtune_shared::settings::{as_text, duration, optional_duration, SettingsError};
use serde::{Deserialize, Serialize};

use crate::device::{DeviceChoice, PrecisionChoice};
use crate::privacy_floor::{PrivacyFloor, RequiredPrivacy};

/// Prefix of the client's environment variables: `FEDTUNE_CLIENT__AGENT__POLL_WAIT=5s` sets
/// `agent.poll_wait`.
pub const ENV_PREFIX: &str = "FEDTUNE_CLIENT";

/// The shortest `agent.request_timeout`: below it, calls over a WAN would fail while the
/// coordinator is fine.
pub const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything `fedtune-client run` is configured with.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSettings {
    /// Where the coordinator is and how to reach it securely.
    pub coordinator: CoordinatorSettings,
    /// Who this client is.
    pub identity: IdentitySettings,
    /// The local labelled data.
    pub data: DataSettings,
    /// The local copy of the base model.
    pub model: ModelSettings,
    /// Local optimizer settings the coordinator does not send.
    pub training: TrainingSettings,
    /// Where and how libtorch runs.
    pub runtime: RuntimeSettings,
    /// Polling, retries and upload pacing.
    pub agent: AgentSettings,
    /// The weakest privacy this site trains under (see [`crate::privacy_floor`]).
    pub privacy: PrivacySettings,
    /// Test harness only: train with the deterministic fake trainer (absent from release builds).
    #[cfg(feature = "test-support")]
    pub fake_trainer: FakeTrainerSettings,
}

/// `[coordinator]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSettings {
    /// `https://host:port` (with `tls_ca`), or `http://…` only with `insecure`. Required.
    pub url: String,
    /// CA certificate (PEM) to trust for an https coordinator.
    pub tls_ca: Option<PathBuf>,
    /// Name the coordinator's certificate must carry (default: the URL's host).
    pub tls_domain: Option<String>,
    /// Client certificate (PEM) for mutual TLS; needs `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS; needs `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Allow a plaintext `http://` coordinator: tests and a single trusted machine only.
    pub insecure: bool,
}

/// `[identity]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySettings {
    /// Name to join under (`[A-Za-z0-9._-]`, up to 64); unset lets the coordinator assign one.
    pub name: Option<String>,
    /// Ed25519 identity key from `fedtune-client keygen` (mode 0600). Required.
    pub key: PathBuf,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSettings {
    /// Labelled data file (.csv, .tsv, .jsonl). Required.
    pub path: PathBuf,
    /// Column holding the text.
    pub text_column: String,
    /// Column holding the class.
    pub label_column: String,
    /// Column assigning rows to train/test, honoured when present.
    pub split_column: String,
    /// Fraction of rows held out for evaluation when the data has no split column, in [0, 1).
    pub eval_fraction: f64,
    /// Seed of the held-out split and of the initial values of tensors the checkpoint lacks.
    pub seed: u64,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            text_column: "text".into(),
            label_column: "label".into(),
            split_column: "split".into(),
            eval_fraction: 0.1,
            seed: 42,
        }
    }
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// Base model folder (config.json, model.safetensors, tokenizer): the same base model the
    /// coordinator was started from. Required.
    pub dir: PathBuf,
    /// Longest token sequence, `[CLS]` and `[SEP]` included.
    pub max_len: usize,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self { dir: PathBuf::new(), max_len: 128 }
    }
}

/// `[training]`: what stays local (the coordinator sends epochs, batch size, learning rate and its
/// schedule, warm-up included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSettings {
    /// AdamW decoupled weight decay (not applied to biases and LayerNorm weights).
    pub weight_decay: f64,
    /// Gradient L2-norm limit (0 disables clipping).
    pub max_grad_norm: f64,
}

impl Default for TrainingSettings {
    fn default() -> Self {
        Self { weight_decay: 0.01, max_grad_norm: 1.0 }
    }
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// auto, cpu, cuda or cuda:N.
    #[serde(with = "as_text")]
    pub device: DeviceChoice,
    /// auto (bf16 on CUDA, f32 on CPU), f32 or bf16.
    #[serde(with = "as_text")]
    pub precision: PrecisionChoice,
    /// libtorch CPU threads (unset: one per core).
    pub threads: Option<usize>,
    /// Draw a progress bar (only ever drawn on a terminal).
    pub progress: bool,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self { device: DeviceChoice::Auto, precision: PrecisionChoice::Auto, threads: None, progress: true }
    }
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    /// Longest single wait for work.
    #[serde(with = "duration")]
    pub poll_wait: Duration,
    /// Stop after this long without reaching the coordinator (unset: retry forever).
    #[serde(with = "optional_duration")]
    pub give_up_after: Option<Duration>,
    /// Longest pause between retries while the coordinator is unreachable.
    #[serde(with = "duration")]
    pub max_backoff: Duration,
    /// Longest one call to the coordinator may take before it fails and is retried after a
    /// backoff (the long poll gets `poll_wait` on top). A coordinator whose link is cut silently
    /// (no reset, no FIN) is noticed only through it: it also paces the HTTP/2 keep-alive
    /// pings that end an upload or download stream over a dead link (every `min(it, 20s)`,
    /// answered within `min(it, 10s)`; `transport::keep_alive`).
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Upload pacing in bytes per second (unset: unpaced).
    pub upload_rate_limit: Option<u64>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            poll_wait: Duration::from_secs(20),
            give_up_after: None,
            max_backoff: Duration::from_secs(10),
            request_timeout: crate::transport::DEFAULT_REQUEST_TIMEOUT,
            upload_rate_limit: None,
        }
    }
}

/// `[privacy]`: the site's floor; a fit task weaker than this is refused and reported as
/// `refused_privacy_floor` (see [`crate::privacy_floor`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySettings {
    /// Weakest mode accepted: none, central (central or distributed noise) or local.
    pub require: RequiredPrivacy,
    /// Least noise multiplier accepted (0: no minimum); above 0 a task without noise is refused.
    pub min_noise_multiplier: f64,
}

impl PrivacySettings {
    /// The floor these settings describe.
    pub fn floor(&self) -> PrivacyFloor {
        PrivacyFloor { require: self.require, min_noise_multiplier: self.min_noise_multiplier }
    }
}

/// `[fake_trainer]`: multi-process tests run the real binary with a deterministic trainer.
#[cfg(feature = "test-support")]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeTrainerSettings {
    /// Train with the fake trainer instead of BERT (`model.dir` is then not needed).
    pub enabled: bool,
    /// Wall time of one fake fit, in milliseconds.
    pub fit_ms: u64,
}

impl ClientSettings {
    /// Loads from an optional TOML file, `FEDTUNE_CLIENT__SECTION__KEY` variables of `env`, and
    /// flag overrides (`("agent.poll_wait", value)`), then validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(&str, toml::Value)],
    ) -> Result<Self, SettingsError> {
        let s: Self = fedtune_shared::settings::load_layered(path, ENV_PREFIX, env, overrides)?;
        s.validate()?;
        Ok(s)
    }

    /// Whether the fake trainer replaces BERT (test builds only; always false in release).
    pub fn uses_fake_trainer(&self) -> bool {
        #[cfg(feature = "test-support")]
        let enabled = self.fake_trainer.enabled;
        #[cfg(not(feature = "test-support"))]
        let enabled = false;
        enabled
    }

    /// Checks every value and cross-field rule; the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let c = &self.coordinator;
        let https = c.url.starts_with("https://");
        if c.url.is_empty() {
            return Err(SettingsError::invalid(
                "coordinator.url",
                "required: the coordinator's https:// URL",
            ));
        }
        if !https && !c.url.starts_with("http://") {
            return Err(SettingsError::invalid(
                "coordinator.url",
                format!("`{}` is not an https:// or http:// URL", c.url),
            ));
        }
        if https && c.tls_ca.is_none() {
            return Err(SettingsError::invalid(
                "coordinator.tls_ca",
                "an https:// coordinator needs the CA certificate to trust (--tls-ca FILE)",
            ));
        }
        if https && c.insecure {
            return Err(SettingsError::invalid("coordinator.insecure", "contradicts an https:// URL"));
        }
        if !https && !c.insecure {
            return Err(SettingsError::invalid(
                "coordinator.url",
                format!(
                    "`{}` is not an https:// URL: plaintext needs coordinator.insecure = true (--insecure; tests \
                     or one trusted machine only)",
                    c.url
                ),
            ));
        }
        match (&c.tls_cert, &c.tls_key) {
            (Some(_), None) => {
                return Err(SettingsError::invalid(
                    "coordinator.tls_key",
                    "mutual TLS needs tls_key with tls_cert",
                ))
            }
            (None, Some(_)) => {
                return Err(SettingsError::invalid(
                    "coordinator.tls_cert",
                    "mutual TLS needs tls_cert with tls_key",
                ))
            }
            _ => {}
        }
        if let Some(name) = &self.identity.name {
            ClientId::parse(name).map_err(|e| SettingsError::invalid("identity.name", e.to_string()))?;
        }
        if self.identity.key.as_os_str().is_empty() {
            return Err(SettingsError::invalid(
                "identity.key",
                "required: the key file from `fedtune-client keygen`",
            ));
        }
        let d = &self.data;
        if d.path.as_os_str().is_empty() {
            return Err(SettingsError::invalid("data.path", "required: the labelled data file"));
        }
        for (key, column) in [
            ("data.text_column", &d.text_column),
            ("data.label_column", &d.label_column),
            ("data.split_column", &d.split_column),
        ] {
            if column.is_empty() {
                return Err(SettingsError::invalid(key, "must not be empty"));
            }
        }
        if !(0.0..1.0).contains(&d.eval_fraction) {
            return Err(SettingsError::invalid("data.eval_fraction", "must be in [0, 1)"));
        }
        if self.model.dir.as_os_str().is_empty() && !self.uses_fake_trainer() {
            return Err(SettingsError::invalid("model.dir", "required: the base model folder"));
        }
        if self.model.max_len < 2 {
            return Err(SettingsError::invalid(
                "model.max_len",
                "must hold at least [CLS] and [SEP]: 2 or more",
            ));
        }
        let t = &self.training;
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(SettingsError::invalid("training.weight_decay", "must be a finite number ≥ 0"));
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return Err(SettingsError::invalid(
                "training.max_grad_norm",
                "must be a finite number ≥ 0 (0 disables clipping)",
            ));
        }
        if self.runtime.threads == Some(0) {
            return Err(SettingsError::invalid("runtime.threads", "must be at least 1"));
        }
        let a = &self.agent;
        if a.poll_wait.is_zero() {
            return Err(SettingsError::invalid("agent.poll_wait", "must be positive"));
        }
        if a.max_backoff.is_zero() {
            return Err(SettingsError::invalid("agent.max_backoff", "must be positive"));
        }
        if a.request_timeout < MIN_REQUEST_TIMEOUT {
            return Err(SettingsError::invalid(
                "agent.request_timeout",
                "must be at least 1s: one call carries a TLS handshake and a round trip to the coordinator",
            ));
        }
        if a.give_up_after.is_some_and(|d| d.is_zero()) {
            return Err(SettingsError::invalid(
                "agent.give_up_after",
                "must be positive (leave it unset to retry forever)",
            ));
        }
        let m = self.privacy.min_noise_multiplier;
        if !(m.is_finite() && m >= 0.0) {
            return Err(SettingsError::invalid(
                "privacy.min_noise_multiplier",
                "must be a finite number ≥ 0 (0: no minimum)",
            ));
        }
        if a.upload_rate_limit == Some(0) {
            return Err(SettingsError::invalid(
                "agent.upload_rate_limit",
                "must be at least 1 byte/s (leave it unset for unpaced)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(
        file: &str,
        env: &[(&str, &str)],
        overrides: &[(&str, toml::Value)],
    ) -> Result<ClientSettings, SettingsError> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), file).unwrap();
        let env = env.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string()));
        ClientSettings::load(Some(f.path()), env, overrides)
    }

    const MINIMAL: &str = r#"
        [coordinator]
        url = "http://127.0.0.1:50051"
        insecure = true
        [identity]
        key = "site.key"
        [data]
        path = "site.csv"
        [model]
        dir = "model"
    "#;

    fn example_file() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/client.example.toml")
    }

    #[test]
    fn a_minimal_file_takes_the_defaults_for_everything_else() {
        let s = load(MINIMAL, &[], &[]).unwrap();
        assert_eq!(s.agent, AgentSettings::default());
        assert_eq!(s.data.text_column, "text");
        assert_eq!(s.model.max_len, 128);
        assert!(s.runtime.progress);
    }

    #[test]
    fn the_environment_overrides_the_file_and_flags_override_the_environment() {
        let env = [("FEDTUNE_CLIENT__AGENT__POLL_WAIT", "5s"), ("FEDTUNE_CLIENT__MODEL__MAX_LEN", "64")];
        let s = load(MINIMAL, &env, &[]).unwrap();
        assert_eq!((s.agent.poll_wait, s.model.max_len), (Duration::from_secs(5), 64));
        let s = load(MINIMAL, &env, &[("model.max_len", toml::Value::Integer(32))]).unwrap();
        assert_eq!((s.agent.poll_wait, s.model.max_len), (Duration::from_secs(5), 32));
    }

    #[test]
    fn the_coordinators_variables_are_not_the_clients() {
        let s =
            load(MINIMAL, &[("FEDTUNE__ROUNDS__TOTAL", "3"), ("FEDTUNE_ENROLL_TOKEN", "x")], &[]).unwrap();
        assert_eq!(s, load(MINIMAL, &[], &[]).unwrap());
    }

    #[test]
    fn every_bad_value_is_refused_naming_its_key() {
        for (env, key) in [
            (("FEDTUNE_CLIENT__AGENT__POLL_WAIT", "0s"), "agent.poll_wait"),
            (("FEDTUNE_CLIENT__AGENT__POLL_WAIT", "soon"), "poll_wait"),
            (("FEDTUNE_CLIENT__MODEL__MAX_LEN", "many"), "max_len"),
            (("FEDTUNE_CLIENT__DATA__EVAL_FRACTION", "1.0"), "data.eval_fraction"),
            (("FEDTUNE_CLIENT__RUNTIME__DEVICE", "tpu"), "device"),
            (("FEDTUNE_CLIENT__RUNTIME__THREADS", "0"), "runtime.threads"),
            (("FEDTUNE_CLIENT__IDENTITY__NAME", "no spaces please"), "identity.name"),
            (("FEDTUNE_CLIENT__TRAINING__MAX_GRAD_NORM", "-1.0"), "training.max_grad_norm"),
            // The federation sets the warm-up now (`fit.warmup_steps`): a site's old key is refused.
            (("FEDTUNE_CLIENT__TRAINING__WARMUP_RATIO", "0.1"), "warmup_ratio"),
            (("FEDTUNE_CLIENT__AGENT__UPLOAD_RATE_LIMIT", "0"), "agent.upload_rate_limit"),
            (("FEDTUNE_CLIENT__AGENT__REQUEST_TIMEOUT", "999ms"), "agent.request_timeout"),
            (("FEDTUNE_CLIENT__AGENT__REQUEST_TIMEOUT", "later"), "request_timeout"),
            (("FEDTUNE_CLIENT__AGENT__TYPO", "1"), "typo"),
        ] {
            let err = load(MINIMAL, &[env], &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{env:?}: `{err}` does not name {key}");
        }
    }

    #[test]
    fn required_keys_are_named_when_missing() {
        for (key, file) in [
            ("coordinator.url", MINIMAL.replace("url = \"http://127.0.0.1:50051\"", "")),
            ("identity.key", MINIMAL.replace("key = \"site.key\"", "")),
            ("data.path", MINIMAL.replace("path = \"site.csv\"", "")),
            ("model.dir", MINIMAL.replace("dir = \"model\"", "")),
        ] {
            let err = load(&file, &[], &[]).unwrap_err().to_string();
            assert!(err.contains(key), "`{err}` does not name {key}");
        }
    }

    #[test]
    fn plaintext_needs_insecure_and_https_needs_a_ca() {
        let http = MINIMAL.replace("insecure = true", "");
        assert!(load(&http, &[], &[]).unwrap_err().to_string().contains("coordinator.url"));
        let https = http.replace("http://", "https://");
        assert!(load(&https, &[], &[]).unwrap_err().to_string().contains("coordinator.tls_ca"));
        let https_ca = https.replace("[identity]", "tls_ca = \"ca.pem\"\n[identity]");
        load(&https_ca, &[], &[]).unwrap();
        let err = load(&https_ca, &[("FEDTUNE_CLIENT__COORDINATOR__INSECURE", "true")], &[]).unwrap_err();
        assert!(err.to_string().contains("coordinator.insecure"), "{err}");
        let err =
            load(&https_ca, &[("FEDTUNE_CLIENT__COORDINATOR__TLS_CERT", "client.pem")], &[]).unwrap_err();
        assert!(err.to_string().contains("coordinator.tls_key"), "{err}");
    }

    #[test]
    fn the_example_file_is_valid_and_lists_every_key() {
        let text = std::fs::read_to_string(example_file()).unwrap();
        let s: ClientSettings = ClientSettings::load(Some(&example_file()), Vec::new(), &[]).unwrap();
        // Every key of the tree (those without a default value appear commented out).
        let all = ClientSettings {
            coordinator: CoordinatorSettings {
                tls_ca: Some("x".into()),
                tls_domain: Some("x".into()),
                tls_cert: Some("x".into()),
                tls_key: Some("x".into()),
                ..s.coordinator.clone()
            },
            identity: IdentitySettings { name: Some("x".into()), ..s.identity.clone() },
            runtime: RuntimeSettings { threads: Some(1), ..s.runtime.clone() },
            agent: AgentSettings {
                give_up_after: Some(Duration::from_secs(1)),
                upload_rate_limit: Some(1),
                ..s.agent.clone()
            },
            ..s.clone()
        };
        let tree: toml::Table = toml::from_str(&toml::to_string(&all).unwrap()).unwrap();
        for (section, keys) in &tree {
            if section == "fake_trainer" {
                continue; // test builds only, never deployed
            }
            assert!(text.contains(&format!("[{section}]")), "[{section}] is missing from the example");
            for key in keys.as_table().unwrap().keys() {
                let listed =
                    text.lines().any(|l| l.trim_start_matches(['#', ' ']).starts_with(&format!("{key} =")));
                assert!(listed, "{section}.{key} is missing from the example");
            }
        }
    }
}
