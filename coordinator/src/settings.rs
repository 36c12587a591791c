//! The coordinator's configuration: one typed tree, layered from a TOML file, `FEDTUNE__…`
//! environment variables and a few CLI flags (see [`fedtune_shared::settings`]), and validated
//! once by [`CoordinatorSettings::validate`] before anything binds a port.
//!
//! This is the lowest layer of the crate: it names no other module of it, so every module may
//! read settings. Each large section has its own module, which checks its own keys: `[server]`
//! in [`server`], `[rounds]` and `[sampling]` in [`rounds`], `[fit]` and `[evaluation]` in
//! [`fit`], `[strategy]` in [`strategy`], `[model]` in [`model`], `[privacy]` in [`privacy`],
//! `[secure_aggregation]` in [`secure_aggregation`], `[security]` in [`security`]. This file keeps
//! the top-level struct, loading, the small `[storage]` and `[clients]` sections and the checks
//! that span sections.
//!
//! Example (`deploy/config/coordinator.example.toml` has the full list):
//!
//! ```toml
//! [storage]
//! state_dir = "/var/lib/fedtune"
//! [model]
//! init_dir = "/models/bert-base-uncased"
//! labels = ["negative", "positive"]
//! train_top_layers = 4
//! [rounds]
//! total = 20
//! min_fit = 3
//! deadline = "10m"
//! [sampling]
//! scheme = "poisson"
//! rate = 0.5
//! [strategy]
//! name = "fedadam"
//! server_learning_rate = 0.01
//! ```

pub mod fit;
pub mod model;
pub mod privacy;
pub mod rounds;
pub mod secure_aggregation;
pub mod security;
pub mod server;
pub mod strategy;

use std::path::PathBuf;
use std::time::Duration;

use fedtune_shared::compression::UpdateEncoding;
use fedtune_shared::settings::{duration, format_duration, SettingsError};
use serde::{Deserialize, Serialize};

pub use fit::{EvaluationSettings, FitSettings};
pub use model::{AdapterKind, LoraSettings, ModelSettings};
pub use privacy::{accounting_for, AdaptiveClipSettings, DpMode, PrivacySettings};
pub use rounds::{RoundSettings, SamplingSettings};
pub use secure_aggregation::SecureAggregationSettings;
pub use security::{LimitSettings, SecuritySettings};
pub use server::ServerSettings;
pub use strategy::{AdaptiveSettings, StrategySettings};

/// Everything the coordinator is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// Network side: listen address, limits, drain.
    #[serde(default)]
    pub server: ServerSettings,
    /// Where state lives.
    pub storage: StorageSettings,
    /// The initial model and which tensors clients train.
    pub model: ModelSettings,
    /// Round lifecycle: count, deadlines, minimums, retries.
    #[serde(default)]
    pub rounds: RoundSettings,
    /// How the clients of a round are sampled.
    #[serde(default)]
    pub sampling: SamplingSettings,
    /// Local training parameters sent to clients.
    #[serde(default)]
    pub fit: FitSettings,
    /// Federated evaluation.
    #[serde(default)]
    pub evaluation: EvaluationSettings,
    /// Aggregation strategy.
    #[serde(default)]
    pub strategy: StrategySettings,
    /// Client liveness.
    #[serde(default)]
    pub clients: ClientSettings,
    /// Differential privacy (mode, noise, clipping, budget); off by default.
    #[serde(default)]
    pub privacy: PrivacySettings,
    /// Secure aggregation (SecAgg+) of fit rounds; off by default.
    #[serde(default)]
    pub secure_aggregation: SecureAggregationSettings,
    /// TLS, client authentication lifetimes, call limits (`serve` refuses plaintext unless
    /// `security.insecure`).
    #[serde(default)]
    pub security: SecuritySettings,
}

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// State directory: `state.sqlite`, `checkpoints/`, `spool/`. `serve` on an existing one
    /// resumes after the last completed round.
    pub state_dir: PathBuf,
    /// Checkpoints to keep (newest first; the initial model is always kept). 0 keeps all.
    #[serde(default)]
    pub keep_checkpoints: usize,
}

/// Client liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSettings {
    /// Heartbeat period asked of busy clients.
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// Silence after which a client counts as gone.
    #[serde(with = "duration")]
    pub liveness_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self { heartbeat_interval: Duration::from_secs(5), liveness_timeout: Duration::from_secs(30) }
    }
}

impl CoordinatorSettings {
    /// Evaluate after every k-th round (0 = never): `evaluation.every`, or 0 under DP unless
    /// `evaluation.enabled_under_dp` asks for it.
    pub fn evaluation_every(&self) -> u64 {
        if self.privacy.enabled() && !self.evaluation.enabled_under_dp {
            0
        } else {
            self.evaluation.every
        }
    }

    /// Evaluation runs under differential privacy (`evaluation.enabled_under_dp` with evaluation
    /// on): its figures are un-noised functions of the clients' data, outside the (ε, δ)
    /// guarantee, and every output that shows them must say so.
    pub fn evaluation_outside_guarantee(&self) -> bool {
        self.privacy.enabled()
            && self.evaluation.enabled_under_dp
            && (self.evaluation.every > 0 || self.evaluation.initial)
    }

    /// Loads from an optional TOML file, `FEDTUNE__SECTION__KEY` variables of `env`, and CLI
    /// overrides (`("server.listen", value)`), then validates.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(&str, toml::Value)],
    ) -> Result<Self, SettingsError> {
        let s: Self = fedtune_shared::settings::load_layered(path, "FEDTUNE", env, overrides)?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every value and cross-field rule; the error names the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.server.validate()?;
        if self.storage.state_dir.as_os_str().is_empty() {
            return Err(SettingsError::invalid("storage.state_dir", "must not be empty"));
        }
        self.model.validate()?;
        self.rounds.validate()?;
        self.sampling.validate(self.rounds.min_fit)?;
        self.fit.validate()?;
        // Spans two sections, so it is checked here rather than in `fit`.
        if self.fit.update_encoding != UpdateEncoding::F32 && self.secure_aggregation.enabled {
            return Err(SettingsError::invalid(
                "fit.update_encoding",
                format!(
                    "`{}` cannot be used with secure_aggregation.enabled = true: a secure round's uploads are \
                     its own ring encoding (4 bytes per value, masked); use `f32` or disable secure aggregation",
                    self.fit.update_encoding
                ),
            ));
        }
        self.evaluation.validate()?;
        self.strategy.validate()?;
        let c = &self.clients;
        if c.heartbeat_interval.is_zero() {
            return Err(SettingsError::invalid("clients.heartbeat_interval", "must be positive"));
        }
        if c.liveness_timeout <= c.heartbeat_interval {
            return Err(SettingsError::invalid(
                "clients.liveness_timeout",
                "must exceed clients.heartbeat_interval",
            ));
        }
        self.privacy.validate(self)?;
        self.secure_aggregation.validate(self)?;
        self.security.validate()?;
        Ok(())
    }

    /// A settings value for tests and examples: everything default except the two paths.
    pub fn with_paths(state_dir: impl Into<PathBuf>, init_dir: impl Into<PathBuf>) -> Self {
        Self {
            server: ServerSettings::default(),
            storage: StorageSettings { state_dir: state_dir.into(), keep_checkpoints: 0 },
            model: ModelSettings {
                init_dir: init_dir.into(),
                labels: Vec::new(),
                num_labels: None,
                init_seed: model::default_init_seed(),
                train_top_layers: None,
                freeze_embeddings: false,
                adapter: AdapterKind::None,
                lora: LoraSettings::default(),
                download_encoding: Default::default(),
            },
            rounds: RoundSettings::default(),
            sampling: SamplingSettings::default(),
            fit: FitSettings::default(),
            evaluation: EvaluationSettings::default(),
            strategy: StrategySettings::default(),
            clients: ClientSettings::default(),
            privacy: PrivacySettings::default(),
            secure_aggregation: SecureAggregationSettings::default(),
            security: SecuritySettings::default(),
        }
    }
}

/// Refuses a duration that is zero or above `max`, with the wording every bounded timeout
/// shares ("must be between 1ms and 10m").
fn duration_up_to(key: &str, value: Duration, max: Duration) -> Result<(), SettingsError> {
    if value.is_zero() || value > max {
        return Err(SettingsError::invalid(key, format!("must be between 1ms and {}", format_duration(max))));
    }
    Ok(())
}

/// Refuses a rate or coefficient that is zero, negative, infinite or NaN.
fn finite_positive(key: &str, value: f64) -> Result<(), SettingsError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(SettingsError::invalid(key, "must be finite and positive"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_shared::compression::DownloadEncoding;
    use fedtune_shared::schedule::LrSchedule;

    fn model_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        std::fs::write(d.path().join("model.safetensors"), "").unwrap();
        d
    }

    fn load(toml_text: &str, env: Vec<(&str, &str)>) -> Result<CoordinatorSettings, SettingsError> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), toml_text).unwrap();
        let env = env.into_iter().map(|(k, v)| (k.to_string(), v.to_string()));
        CoordinatorSettings::load(Some(f.path()), env, &[])
    }

    fn base(dir: &tempfile::TempDir) -> String {
        format!("[storage]\nstate_dir = \"/tmp/x\"\n[model]\ninit_dir = \"{}\"\n", dir.path().display())
    }

    #[test]
    fn a_minimal_config_loads_with_defaults() {
        let d = model_dir();
        let s = load(&base(&d), vec![]).unwrap();
        assert_eq!(s.rounds.min_fit, 2);
        assert_eq!(s.sampling, SamplingSettings::Fraction { fraction: 1.0 });
        assert_eq!(s.strategy, StrategySettings::Fedavg { server_learning_rate: 1.0 });
    }

    #[test]
    fn tagged_sections_and_env_overrides_apply() {
        let d = model_dir();
        let text = format!(
            "{}[sampling]\nscheme = \"poisson\"\nrate = 0.25\n[strategy]\nname = \"fedyogi\"\ntau = 0.01\n",
            base(&d)
        );
        let s = load(&text, vec![("FEDTUNE__ROUNDS__DEADLINE", "90s")]).unwrap();
        assert_eq!(s.sampling, SamplingSettings::Poisson { rate: 0.25 });
        assert!(matches!(s.strategy, StrategySettings::Fedyogi(AdaptiveSettings { tau, .. }) if tau == 0.01));
        assert_eq!(s.rounds.deadline, Duration::from_secs(90));
    }

    #[test]
    fn a_lora_adapter_takes_peft_like_defaults_and_refuses_bad_values_naming_the_key() {
        let d = model_dir();
        let s = load(&base(&d), vec![("FEDTUNE__MODEL__ADAPTER", "lora")]).unwrap();
        let lora = s.model.lora_config(7).unwrap();
        assert_eq!((lora.rank, lora.alpha, lora.dropout, lora.seed), (8, 16.0, 0.0, 7));
        assert_eq!(lora.target_modules, ["query", "value"]);
        assert_eq!(load(&base(&d), vec![]).unwrap().model.lora_config(7), None);
        for (var, value, key) in [
            ("FEDTUNE__MODEL__ADAPTER", "prefix", "prefix"),
            ("FEDTUNE__MODEL__LORA__RANK", "0", "model.lora.rank"),
            ("FEDTUNE__MODEL__LORA__ALPHA", "0", "model.lora.alpha"),
            ("FEDTUNE__MODEL__LORA__DROPOUT", "1.5", "model.lora.dropout"),
            ("FEDTUNE__MODEL__LORA__TARGET_MODULES", "[\"dense\"]", "model.lora.target_modules"),
            ("FEDTUNE__MODEL__TRAIN_TOP_LAYERS", "2", "model.adapter"),
        ] {
            let err = load(&base(&d), vec![("FEDTUNE__MODEL__ADAPTER", "lora"), (var, value)]).unwrap_err();
            assert!(err.to_string().contains(key), "`{err}` should name `{key}`");
        }
    }

    #[test]
    fn invalid_values_are_refused_naming_the_key() {
        let d = model_dir();
        let cases = [
            ("[rounds]\nmin_fit = 3\nmin_available = 2\n", "rounds.min_available"),
            ("[sampling]\nscheme = \"fraction\"\nfraction = 1.5\n", "sampling.fraction"),
            ("[strategy]\nname = \"fedadam\"\nbeta1 = 1.0\n", "strategy.beta1"),
            (
                "[clients]\nheartbeat_interval = \"10s\"\nliveness_timeout = \"5s\"\n",
                "clients.liveness_timeout",
            ),
            ("[rounds]\nmin_fitt = 3\n", "min_fitt"),
            ("[fit]\nlr_schedule = \"step\"\n", "lr_schedule"),
            ("[fit]\nmax_steps = 10\nwarmup_steps = 10\n", "fit.warmup_steps"),
            ("[fit]\nwarmup_steps = -1\n", "warmup_steps"),
            ("[fit]\nupdate_encoding = \"int4\"\n", "update_encoding"),
            ("[strategy]\nname = \"fedsgd\"\n", "fedsgd"),
        ];
        for (extra, key) in cases {
            let err = load(&format!("{}{extra}", base(&d)), vec![]).unwrap_err().to_string();
            assert!(err.contains(key), "`{err}` should name `{key}`");
        }
        let err = load(&base(&d), vec![("FEDTUNE__SERVER__MAX_CONCURRENT_UPLOADS", "0")]).unwrap_err();
        assert!(err.to_string().contains("server.max_concurrent_uploads"), "{err}");
        for (var, value, key) in [
            ("FEDTUNE__SERVER__UPLOAD_IDLE_TIMEOUT", "0s", "server.upload_idle_timeout"),
            ("FEDTUNE__SERVER__MAX_UPDATE_WEIGHT", "0", "server.max_update_weight"),
            ("FEDTUNE__SERVER__DOWNLOAD_SEND_TIMEOUT", "0s", "server.download_send_timeout"),
            ("FEDTUNE__SERVER__HANDSHAKE_TIMEOUT", "0s", "server.handshake_timeout"),
            ("FEDTUNE__SERVER__CONNECTION_IDLE_TIMEOUT", "2h", "server.connection_idle_timeout"),
            // No longer than the long poll it must outlast (20 s by default).
            ("FEDTUNE__SERVER__REQUEST_TIMEOUT", "20s", "server.request_timeout"),
            // The default listen address is 0.0.0.0:50051.
            ("FEDTUNE__SERVER__HEALTH_LISTEN", "127.0.0.1:50051", "server.health_listen"),
            ("FEDTUNE__SERVER__OPERATOR_LISTEN", "0.0.0.0:50051", "server.operator_listen"),
            // A token for a port that is not served protects nothing.
            (
                "FEDTUNE__SERVER__METRICS_TOKEN_FILE",
                "/etc/fedtune/metrics.token",
                "server.metrics_token_file",
            ),
            ("FEDTUNE__SECURITY__LIMITS__MAX_CONNECTIONS_PER_ADDRESS", "0", "max_connections_per_address"),
            ("FEDTUNE__SECURITY__LIMITS__MAX_CONNECTIONS", "0", "security.limits.max_connections"),
        ] {
            let err = load(&base(&d), vec![(var, value)]).unwrap_err();
            assert!(err.to_string().contains(key), "`{err}` should name `{key}`");
        }
        // The operator port may share neither the clients' port nor the health port.
        let both = vec![
            ("FEDTUNE__SERVER__HEALTH_LISTEN", "127.0.0.1:9464"),
            ("FEDTUNE__SERVER__OPERATOR_LISTEN", "0.0.0.0:9464"),
        ];
        let err = load(&base(&d), both).unwrap_err().to_string();
        assert!(err.contains("server.operator_listen") && err.contains("server.health_listen"), "{err}");
        for (var, value, key) in [
            ("FEDTUNE__SECURE_AGGREGATION__THRESHOLD", "1", "secure_aggregation.threshold"),
            ("FEDTUNE__SECURE_AGGREGATION__STEP_TIMEOUT", "0s", "secure_aggregation.step_timeout"),
            ("FEDTUNE__SECURE_AGGREGATION__UNMASK_TIMEOUT", "0s", "secure_aggregation.unmask_timeout"),
            ("FEDTUNE__SECURE_AGGREGATION__CLIP_NORM", "0", "secure_aggregation.clip_norm"),
            (
                "FEDTUNE__SECURE_AGGREGATION__MAX_WRAP_PROBABILITY",
                "1",
                "secure_aggregation.max_wrap_probability",
            ),
        ] {
            let vars = vec![("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"), (var, value)];
            let err = load(&base(&d), vars).unwrap_err();
            assert!(err.to_string().contains(key), "`{err}` should name `{key}`");
        }
        let local = [("FEDTUNE__PRIVACY__MODE", "local"), ("FEDTUNE__PRIVACY__NOISE_MULTIPLIER", "1.0")];
        let one = [("FEDTUNE__ROUNDS__MIN_FIT", "1"), ("FEDTUNE__ROUNDS__MIN_AVAILABLE", "1")];
        for (vars, key) in [(&local[..], "secure_aggregation.enabled"), (&one[..], "rounds.min_fit")] {
            let mut vars = vars.to_vec();
            vars.push(("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"));
            let err = load(&base(&d), vars).unwrap_err();
            assert!(err.to_string().contains(key), "`{err}` should name `{key}`");
        }
        // Adaptive clipping's indicator is a per-client metric in the clear.
        let adaptive = vec![
            ("FEDTUNE__PRIVACY__MODE", "central"),
            ("FEDTUNE__PRIVACY__NOISE_MULTIPLIER", "1.0"),
            ("FEDTUNE__PRIVACY__ADAPTIVE_CLIPPING__COUNT_NOISE_STD", "5.0"),
        ];
        load(&base(&d), adaptive.clone()).expect("adaptive clipping alone is fine");
        let mut vars = adaptive;
        vars.push(("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"));
        let err = load(&base(&d), vars).unwrap_err();
        assert!(err.to_string().contains("privacy.adaptive_clipping"), "{err}");
    }

    #[test]
    fn distributed_noise_is_accepted_with_secure_aggregation_and_refused_without() {
        let d = model_dir();
        let dp =
            vec![("FEDTUNE__PRIVACY__MODE", "distributed"), ("FEDTUNE__PRIVACY__NOISE_MULTIPLIER", "1.0")];
        let err = load(&base(&d), dp.clone()).unwrap_err();
        assert!(err.to_string().contains("privacy.mode"), "{err}");
        let mut with = dp;
        with.push(("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"));
        let s = load(&base(&d), with).unwrap();
        assert!(s.secure_aggregation.enabled);
    }

    #[test]
    fn the_default_threshold_is_two_thirds_of_a_secrets_holders_within_bounds() {
        use super::secure_aggregation::default_threshold;
        // k = n - 1 (complete graph): holders = n.
        assert_eq!(default_threshold(2, 1), 2);
        assert_eq!(default_threshold(3, 2), 2);
        assert_eq!(default_threshold(4, 3), 3);
        assert_eq!(default_threshold(10, 9), 7);
        // A sparse graph: holders = k + 1 whatever n.
        assert_eq!(default_threshold(100, 8), 6);
        let s = SecureAggregationSettings { threshold: Some(50), ..Default::default() };
        assert_eq!(s.threshold_for(4, 3), 4, "capped at the holders");
    }

    #[test]
    fn rounds_train_at_a_constant_local_rate_unless_a_schedule_is_set() {
        let d = model_dir();
        let s = load(&base(&d), vec![]).unwrap();
        assert_eq!((s.fit.lr_schedule, s.fit.warmup_steps), (LrSchedule::Constant, 0));
        let text = format!("{}[fit]\nlr_schedule = \"cosine\"\nwarmup_steps = 4\n", base(&d));
        let s = load(&text, vec![("FEDTUNE__FIT__LR_SCHEDULE", "linear")]).unwrap();
        assert_eq!((s.fit.lr_schedule, s.fit.warmup_steps), (LrSchedule::Linear, 4));
    }

    #[test]
    fn updates_travel_as_f32_unless_int8_is_set_and_int8_is_refused_with_secure_aggregation() {
        let d = model_dir();
        assert_eq!(load(&base(&d), vec![]).unwrap().fit.update_encoding, UpdateEncoding::F32);
        let int8 = ("FEDTUNE__FIT__UPDATE_ENCODING", "int8");
        assert_eq!(load(&base(&d), vec![int8]).unwrap().fit.update_encoding, UpdateEncoding::Int8);
        let err = load(&base(&d), vec![int8, ("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true")]).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("fit.update_encoding") && err.contains("secure_aggregation"), "{err}");
    }

    #[test]
    fn downloads_are_f32_unless_int8_delta_is_set_and_an_unknown_encoding_is_refused_naming_the_key() {
        let d = model_dir();
        assert_eq!(load(&base(&d), vec![]).unwrap().model.download_encoding, DownloadEncoding::F32);
        let int8 = ("FEDTUNE__MODEL__DOWNLOAD_ENCODING", "int8_delta");
        // Post-processing of the aggregate: fine with secure aggregation and every DP mode.
        let with = vec![
            int8,
            ("FEDTUNE__PRIVACY__MODE", "distributed"),
            ("FEDTUNE__PRIVACY__NOISE_MULTIPLIER", "1.0"),
            ("FEDTUNE__SECURE_AGGREGATION__ENABLED", "true"),
        ];
        assert_eq!(load(&base(&d), with).unwrap().model.download_encoding, DownloadEncoding::Int8Delta);
        let err =
            load(&format!("{}download_encoding = \"int8\"\n", base(&d)), vec![]).unwrap_err().to_string();
        assert!(err.contains("download_encoding"), "`{err}` should name `download_encoding`");
    }

    #[test]
    fn the_example_config_in_deploy_is_valid() {
        let d = model_dir();
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/config/coordinator.example.toml");
        let init = toml::Value::String(d.path().display().to_string());
        let s = CoordinatorSettings::load(Some(&example), Vec::new(), &[("model.init_dir", init)]).unwrap();
        assert_eq!(s.model.labels, ["negative", "positive"]);
        assert_eq!(s.server, ServerSettings::default());
        assert_eq!(s.rounds, RoundSettings::default());
        assert_eq!(s.fit, FitSettings::default(), "the example shows the defaults");
        assert_eq!(s.model.download_encoding, DownloadEncoding::F32, "the example shows the default");
    }

    #[test]
    fn bounded_timeouts_and_rates_are_refused_with_the_bound_in_words() {
        let d = model_dir();
        for (var, value, text) in [
            ("FEDTUNE__SERVER__LONG_POLL", "6m", "`server.long_poll`: must be between 1ms and 5m"),
            (
                "FEDTUNE__SERVER__UPLOAD_IDLE_TIMEOUT",
                "0s",
                "`server.upload_idle_timeout`: must be between 1ms and 10m",
            ),
            (
                "FEDTUNE__SERVER__CONNECTION_IDLE_TIMEOUT",
                "2h",
                "`server.connection_idle_timeout`: must be between 1ms and 1h",
            ),
            (
                "FEDTUNE__SECURITY__CHALLENGE_TTL",
                "11m",
                "`security.challenge_ttl`: must be between 1ms and 10m",
            ),
            ("FEDTUNE__FIT__LEARNING_RATE", "0", "`fit.learning_rate`: must be finite and positive"),
        ] {
            let err = load(&base(&d), vec![(var, value)]).unwrap_err().to_string();
            assert!(err.contains(text), "`{err}` should contain `{text}`");
        }
    }

    #[test]
    fn a_model_dir_without_weights_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let err = load(
            &format!("[storage]\nstate_dir = \"/x\"\n[model]\ninit_dir = \"{}\"\n", d.path().display()),
            vec![],
        )
        .unwrap_err();
        assert!(err.to_string().contains("model.init_dir"), "{err}");
    }
}
