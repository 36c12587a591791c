//! The flags of `fedtune-client run`: the top layer of the client's configuration.
//!
//! Every flag is optional and, when given, overrides one key of [`ClientSettings`] (file, then
//! environment, then flags); the values themselves are checked once, by the settings. Each flag
//! says which key it sets, so `--help` doubles as the map between the two.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use fedtune_shared::crypto::EnrollmentToken;
use fedtune_shared::settings::{format_duration, parse_duration, SettingsError};

use crate::device::{DeviceChoice, PrecisionChoice};
use crate::privacy_floor::RequiredPrivacy;
use crate::settings::ClientSettings;

/// `fedtune-client run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// TOML configuration file (`deploy/config/client.example.toml` lists every key). Then
    /// FEDTUNE_CLIENT__SECTION__KEY variables, then these flags, override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (after every layer, validated) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Coordinator URL, e.g. https://coordinator.example:50051 (with --ca); http:// only with
    /// --insecure [coordinator.url].
    #[arg(long, value_name = "URL")]
    pub coordinator: Option<String>,
    /// Labelled data file (.csv, .tsv, .jsonl); rows of its split column's test values are held
    /// out [data.path].
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Base model folder: config.json, model.safetensors, tokenizer.json or vocab.txt (the same
    /// base model the coordinator was started from) [model.dir].
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Name to join under ([A-Za-z0-9._-], up to 64); default: the coordinator assigns one
    /// [identity.name].
    #[arg(long)]
    pub name: Option<String>,
    /// Column holding the text [data.text_column].
    #[arg(long)]
    pub text_column: Option<String>,
    /// Column holding the class [data.label_column].
    #[arg(long)]
    pub label_column: Option<String>,
    /// Column assigning rows to train/test, honoured when present [data.split_column].
    #[arg(long)]
    pub split_column: Option<String>,
    /// Longest token sequence [model.max_len].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Fraction of rows held out for evaluation when the data has no split column
    /// [data.eval_fraction].
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Seed of the held-out split (when the data has no split column) [data.seed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// AdamW weight decay [training.weight_decay].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Gradient L2-norm limit, 0 disables [training.max_grad_norm].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Longest single wait for work, e.g. 20s [agent.poll_wait].
    #[arg(long, value_parser = parse_duration)]
    pub poll_wait: Option<Duration>,
    /// Stop after this long without reaching the coordinator (default: retry forever)
    /// [agent.give_up_after].
    #[arg(long, value_parser = parse_duration)]
    pub give_up_after: Option<Duration>,
    /// Longest pause between retries while the coordinator is unreachable [agent.max_backoff].
    #[arg(long, value_parser = parse_duration)]
    pub max_backoff: Option<Duration>,
    /// Longest one call to the coordinator may take before it is retried, e.g. 30s (the long
    /// poll gets --poll-wait on top); also paces the keep-alive pings that end a stream over a
    /// dead link [agent.request_timeout].
    #[arg(long, value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Upload pacing in bytes per second (default: unpaced) [agent.upload_rate_limit].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub upload_rate_limit: Option<u64>,
    /// Refuse fit tasks weaker than this: none, central (central or distributed noise) or local
    /// (noise added here, private against the coordinator too) [privacy.require].
    #[arg(long, value_name = "MODE")]
    pub require_privacy: Option<RequiredPrivacy>,
    /// Refuse fit tasks whose noise multiplier is below Z (local: the noise this site adds;
    /// central/distributed: what the coordinator declares it accounts) [privacy.min_noise_multiplier].
    #[arg(long, value_name = "Z")]
    pub min_noise_multiplier: Option<f64>,
    /// CA certificate (PEM) to trust for an https coordinator [coordinator.tls_ca].
    #[arg(long, visible_alias = "ca", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Connect over plaintext http:// (no TLS): tests and a single trusted machine only
    /// [coordinator.insecure].
    #[arg(long)]
    pub insecure: bool,
    /// This client's Ed25519 identity key (from `fedtune-client keygen`, mode 0600). Joins are
    /// answered and updates signed with it; its public key must be allowlisted for --name (or
    /// be enrolled with --enroll-token) [identity.key].
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// One-time enrollment token (from `fedtune-coordinator clients enroll-token`): allowlists
    /// this client's key on first join. Not a configuration key: a spent secret has no place in
    /// a file.
    #[arg(
        long,
        env = "FEDTUNE_ENROLL_TOKEN",
        hide_env_values = true,
        allow_hyphen_values = true,
        value_parser = parse_enroll_token
    )]
    pub enroll_token: Option<EnrollmentToken>,
    /// Name the coordinator's certificate must carry (default: the URL's host)
    /// [coordinator.tls_domain].
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Client certificate (PEM) for mutual TLS [coordinator.tls_cert].
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS [coordinator.tls_key].
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N [runtime.device].
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// auto (bf16 on CUDA, f32 on CPU), f32 or bf16 [runtime.precision].
    #[arg(long)]
    pub precision: Option<PrecisionChoice>,
    /// libtorch CPU threads (default: one per core) [runtime.threads].
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar [runtime.progress = false].
    #[arg(long, short)]
    pub quiet: bool,
    /// Test harness: train with the deterministic fake trainer instead of BERT
    /// [fake_trainer.enabled].
    #[cfg(feature = "test-support")]
    #[arg(long, hide = true)]
    pub fake_trainer: bool,
    /// Test harness: wall time of one fake fit, in milliseconds [fake_trainer.fit_ms].
    #[cfg(feature = "test-support")]
    #[arg(long, hide = true)]
    pub fake_fit_ms: Option<u64>,
}

impl RunArgs {
    /// The settings these flags select: `--config`'s file, then the `FEDTUNE_CLIENT__…`
    /// variables of `env`, then the flags; validated. An error names the key (and the flag,
    /// when a flag set it).
    pub fn settings(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ClientSettings, SettingsError> {
        let overrides = self.overrides();
        let pairs: Vec<(&str, toml::Value)> = overrides.iter().map(|(key, _, v)| (*key, v.clone())).collect();
        ClientSettings::load(self.config.as_deref(), env, &pairs).map_err(|e| match e {
            SettingsError::Invalid { key, reason } => match overrides.iter().find(|(k, _, _)| *k == key) {
                Some((_, flag, _)) => {
                    SettingsError::Invalid { key, reason: format!("{reason} (set by {flag})") }
                }
                None => SettingsError::Invalid { key, reason },
            },
            other => other,
        })
    }

    /// `(key, flag, value)` for every flag given.
    fn overrides(&self) -> Vec<(&'static str, &'static str, toml::Value)> {
        use toml::Value;
        let text = |s: &str| Value::String(s.to_string());
        let path = |p: &PathBuf| Value::String(p.display().to_string());
        let duration = |d: &Duration| Value::String(format_duration(*d));
        let int = |n: u64| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        let out: Vec<(&'static str, &'static str, Option<Value>)> = vec![
            ("coordinator.url", "--coordinator", self.coordinator.as_deref().map(text)),
            ("coordinator.tls_ca", "--tls-ca", self.tls_ca.as_ref().map(path)),
            ("coordinator.tls_domain", "--tls-domain", self.tls_domain.as_deref().map(text)),
            ("coordinator.tls_cert", "--tls-cert", self.tls_cert.as_ref().map(path)),
            ("coordinator.tls_key", "--tls-key", self.tls_key.as_ref().map(path)),
            ("coordinator.insecure", "--insecure", self.insecure.then_some(Value::Boolean(true))),
            ("identity.name", "--name", self.name.as_deref().map(text)),
            ("identity.key", "--key", self.key.as_ref().map(path)),
            ("data.path", "--data", self.data.as_ref().map(path)),
            ("data.text_column", "--text-column", self.text_column.as_deref().map(text)),
            ("data.label_column", "--label-column", self.label_column.as_deref().map(text)),
            ("data.split_column", "--split-column", self.split_column.as_deref().map(text)),
            ("data.eval_fraction", "--eval-fraction", self.eval_fraction.map(Value::Float)),
            ("data.seed", "--seed", self.seed.map(int)),
            ("model.dir", "--model", self.model.as_ref().map(path)),
            ("model.max_len", "--max-len", self.max_len.map(|n| int(n as u64))),
            ("training.weight_decay", "--weight-decay", self.weight_decay.map(Value::Float)),
            ("training.max_grad_norm", "--max-grad-norm", self.max_grad_norm.map(Value::Float)),
            ("runtime.device", "--device", self.device.map(|d| text(&d.to_string()))),
            ("runtime.precision", "--precision", self.precision.map(|p| text(&p.to_string()))),
            ("runtime.threads", "--threads", self.threads.map(|n| int(n as u64))),
            ("runtime.progress", "--quiet", self.quiet.then_some(Value::Boolean(false))),
            ("agent.poll_wait", "--poll-wait", self.poll_wait.as_ref().map(duration)),
            ("agent.give_up_after", "--give-up-after", self.give_up_after.as_ref().map(duration)),
            ("agent.max_backoff", "--max-backoff", self.max_backoff.as_ref().map(duration)),
            ("agent.request_timeout", "--request-timeout", self.request_timeout.as_ref().map(duration)),
            ("agent.upload_rate_limit", "--upload-rate-limit", self.upload_rate_limit.map(int)),
            ("privacy.require", "--require-privacy", self.require_privacy.map(|r| text(&r.to_string()))),
            (
                "privacy.min_noise_multiplier",
                "--min-noise-multiplier",
                self.min_noise_multiplier.map(Value::Float),
            ),
        ];
        #[cfg(feature = "test-support")]
        let out = {
            let mut out = out;
            out.extend([
                ("fake_trainer.enabled", "--fake-trainer", self.fake_trainer.then_some(Value::Boolean(true))),
                ("fake_trainer.fit_ms", "--fake-fit-ms", self.fake_fit_ms.map(int)),
            ]);
            out
        };
        out.into_iter().filter_map(|(key, flag, value)| Some((key, flag, value?))).collect()
    }
}

/// Parses `--enroll-token` into a type whose `Debug` redacts it (so `RunArgs` can be logged).
fn parse_enroll_token(text: &str) -> Result<EnrollmentToken, String> {
    text.parse().map_err(|e: fedtune_shared::crypto::CryptoError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(argv: &[&str]) -> RunArgs {
        let argv = ["fedtune-client", "run"].iter().chain(argv).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => *a,
            other => panic!("parsed {other:?}"),
        }
    }

    const REQUIRED: [&str; 9] = [
        "--coordinator",
        "http://127.0.0.1:1",
        "--insecure",
        "--data",
        "d.csv",
        "--key",
        "k",
        "--model",
        "m",
    ];

    #[test]
    fn flags_alone_make_a_complete_configuration() {
        let s = parse(&REQUIRED).settings(Vec::new()).unwrap();
        assert_eq!(s.coordinator.url, "http://127.0.0.1:1");
        assert_eq!(s.data.path, PathBuf::from("d.csv"));
        assert_eq!(s.agent.poll_wait, Duration::from_secs(20));
    }

    #[test]
    fn a_flag_overrides_the_environment_and_an_error_names_key_and_flag() {
        let env = || vec![("FEDTUNE_CLIENT__AGENT__POLL_WAIT".to_string(), "7s".to_string())];
        assert_eq!(parse(&REQUIRED).settings(env()).unwrap().agent.poll_wait, Duration::from_secs(7));
        let args = parse(&[&REQUIRED[..], &["--poll-wait", "3s", "-q"]].concat());
        let s = args.settings(env()).unwrap();
        assert_eq!((s.agent.poll_wait, s.runtime.progress), (Duration::from_secs(3), false));
        let err = parse(&[&REQUIRED[..], &["--poll-wait", "0s"]].concat()).settings(env()).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("agent.poll_wait") && err.contains("--poll-wait"), "{err}");
    }

    #[test]
    fn the_privacy_floor_flags_set_the_privacy_keys_and_a_negative_minimum_is_refused() {
        let s = parse(&REQUIRED).settings(Vec::new()).unwrap();
        assert_eq!(s.privacy.floor(), crate::privacy_floor::PrivacyFloor::default());
        let args = parse(
            &[&REQUIRED[..], &["--require-privacy", "local", "--min-noise-multiplier", "1.5"]].concat(),
        );
        let s = args.settings(Vec::new()).unwrap();
        assert_eq!((s.privacy.require, s.privacy.min_noise_multiplier), (RequiredPrivacy::Local, 1.5));
        let env = vec![("FEDTUNE_CLIENT__PRIVACY__REQUIRE".to_string(), "central".to_string())];
        assert_eq!(parse(&REQUIRED).settings(env).unwrap().privacy.require, RequiredPrivacy::Central);
        let err = parse(&[&REQUIRED[..], &["--min-noise-multiplier=-1"]].concat())
            .settings(Vec::new())
            .unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("privacy.min_noise_multiplier") && err.contains("--min-noise-multiplier"),
            "{err}"
        );
        let cli = ["fedtune-client", "run", "--require-privacy", "distributed"];
        assert!(Cli::try_parse_from(cli).is_err(), "distributed is a task mode, not a floor");
    }

    #[test]
    fn request_timeout_sets_the_agent_key_and_a_sub_second_one_is_refused_naming_key_and_flag() {
        assert_eq!(
            parse(&REQUIRED).settings(Vec::new()).unwrap().agent.request_timeout,
            Duration::from_secs(30)
        );
        let s = parse(&[&REQUIRED[..], &["--request-timeout", "3s"]].concat()).settings(Vec::new()).unwrap();
        assert_eq!(s.agent.request_timeout, Duration::from_secs(3));
        let err = parse(&[&REQUIRED[..], &["--request-timeout", "500ms"]].concat())
            .settings(Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.request_timeout") && err.contains("--request-timeout"), "{err}");
    }

    #[test]
    fn an_enrollment_token_starting_with_a_dash_is_a_value_not_a_flag() {
        let token = std::iter::repeat_with(|| EnrollmentToken::generate().unwrap())
            .find(|t| t.expose_secret().starts_with('-'))
            .unwrap();
        let args = parse(&[&REQUIRED[..], &["--enroll-token", &token.expose_secret()]].concat());
        assert_eq!(args.enroll_token.map(|t| t.expose_secret()), Some(token.expose_secret()));
    }
}
