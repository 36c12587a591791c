//! `fedtune-client run`: take part in a federation until it finishes or a signal arrives.
//!
//! The client brings its data and a local copy of the base model (config, tokenizer, frozen
//! weights); the coordinator decides everything that must agree across clients: which tensors
//! train (the trainer is built to train exactly the coordinator's trainable manifest), the label
//! set, and each round's training parameters (epochs, batch size, learning rate, seed).
//!
//! It works from validated [`ClientSettings`] (the command line, environment and file are
//! layered into them by the caller), so it knows nothing of flags.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fedtune_shared::crypto::EnrollmentToken;
use fedtune_shared::endpoint::TlsOptions;
use fedtune_shared::ids::ClientId;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentConfig, AgentError, AgentOutcome, ExitReason, TrainerFactory, TrainerSpec};
use crate::backoff::BackoffPolicy;
use crate::data::{DataError, DataOptions, Dataset};
use crate::local_trainer::{LocalTrainer, TrainerError};
use crate::model::config::BertConfig;
use crate::settings::ClientSettings;
use crate::trainer::{AdamWConfig, BertTrainer, TrainScope, TrainerOptions};
use crate::transport::{ConnectOptions, GrpcCoordinator};

/// Errors of `run` before or after the agent's own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The data file could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The configuration names something unusable (a key or certificate file, a URL without a
    /// host): the binary exits with status 64, like for an invalid key.
    #[error("{0}")]
    Usage(String),
    /// The async runtime could not be started.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The agent stopped with an error.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

fn data_options(settings: &ClientSettings) -> DataOptions {
    let d = &settings.data;
    DataOptions {
        text_column: d.text_column.clone(),
        label_column: Some(d.label_column.clone()),
        split_column: d.split_column.clone(),
    }
}

/// Transport options for `settings.coordinator` (already validated: scheme, CA, insecure) and
/// the agent's call bound: loads the TLS material.
fn connect_options(settings: &ClientSettings) -> Result<ConnectOptions, RunError> {
    let c = &settings.coordinator;
    let mut options = ConnectOptions::new(c.url.clone());
    options.request_timeout = settings.agent.request_timeout;
    if c.insecure {
        tracing::warn!(
            url = %c.url,
            "connecting over PLAINTEXT (coordinator.insecure): the network can read updates and session tokens"
        );
    }
    if let Some(ca) = c.tls_ca.as_ref().filter(|_| c.url.starts_with("https://")) {
        let identity = c.tls_cert.as_deref().zip(c.tls_key.as_deref());
        let tls = TlsOptions { ca, domain: c.tls_domain.as_deref(), identity };
        options.tls = Some(
            fedtune_shared::endpoint::client_tls(&c.url, &tls).map_err(|e| RunError::Usage(e.to_string()))?,
        );
    }
    Ok(options)
}

fn bert_factory(settings: &ClientSettings, dataset: Dataset) -> TrainerFactory {
    let model = settings.model.dir.clone();
    let (t, r) = (&settings.training, &settings.runtime);
    let options = TrainerOptions {
        max_len: settings.model.max_len,
        eval_fraction: settings.data.eval_fraction,
        seed: settings.data.seed,
        adamw: AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() },
        max_grad_norm: t.max_grad_norm,
        device: r.device,
        precision: r.precision,
        threads: r.threads,
        progress: r.progress,
        ..TrainerOptions::default()
    };
    Box::new(move |spec: &TrainerSpec| {
        let config = BertConfig::from_file(&model.join("config.json"))
            .map_err(|e| TrainerError::Failed(format!("{}: {e}", model.join("config.json").display())))?;
        let options = TrainerOptions {
            scope: TrainScope::of_trainable(
                spec.trainable.tensors.iter().map(|t| t.name.as_str()),
                config.num_hidden_layers,
            ),
            adapter: spec.adapter.as_ref().map(|a| a.lora.clone()),
            labels: (!spec.labels.is_empty()).then(|| spec.labels.clone()),
            ..options
        };
        let trainer = BertTrainer::new(&model, dataset, options)?;
        if let Some(adapter) = &spec.adapter {
            // A is never sent: ours must be the coordinator's, or averaging B would average
            // updates of different models.
            if trainer.adapter_digest()? != adapter.a_digest {
                return Err(TrainerError::Incompatible(
                    "the LoRA A matrices built from the coordinator's seed differ from the coordinator's \
                     (another fedtune version, or another base model?)"
                        .into(),
                ));
            }
        }
        let s = trainer.summary();
        tracing::info!(
            train = s.num_train,
            held_out = s.num_eval,
            device = %s.device,
            trainable = s.trainable_parameters,
            total = s.total_parameters,
            majority_baseline = s.majority_baseline_accuracy,
            "BERT trainer ready"
        );
        Ok(Box::new(trainer) as Box<dyn LocalTrainer>)
    })
}

/// The deterministic fake trainer of the multi-process tests (`fake_trainer.enabled`): each
/// client's behaviour follows from its name, so a test can predict every update.
#[cfg(feature = "test-support")]
fn fake_factory(settings: &ClientSettings, train_examples: usize, eval_examples: usize) -> TrainerFactory {
    use crate::fake_trainer::{FakeTrainer, FakeTrainerConfig};
    let config = FakeTrainerConfig {
        seed: crate::agent::name_seed(settings.identity.name.as_deref().unwrap_or("anonymous")),
        num_train_examples: train_examples as u64,
        num_eval_examples: eval_examples as u64,
        fit_delay: Duration::from_millis(settings.fake_trainer.fit_ms),
        ..FakeTrainerConfig::default()
    };
    Box::new(move |spec: &TrainerSpec| {
        Ok(Box::new(FakeTrainer::new(spec.trainable.clone(), config)) as Box<dyn LocalTrainer>)
    })
}

/// Joins the federation at `settings.coordinator` and works until it finishes, `shutdown` is
/// cancelled, or an unrecoverable error. `enroll_token` allowlists the key on the first join.
pub async fn run(
    settings: &ClientSettings,
    enroll_token: Option<EnrollmentToken>,
    shutdown: CancellationToken,
) -> Result<AgentOutcome, RunError> {
    let name = settings
        .identity
        .name
        .as_deref()
        .map(ClientId::parse)
        .transpose()
        .map_err(|e| RunError::Usage(format!("identity.name: {e}")))?;
    let data = &settings.data;
    let dataset = Dataset::load(&data.path, &data_options(settings))?;
    let (train, eval) = dataset.split_indices(data.eval_fraction, data.seed);
    tracing::info!(data = %data.path.display(), train = train.len(), held_out = eval.len(), "data loaded");
    #[cfg(feature = "test-support")]
    let factory = if settings.uses_fake_trainer() {
        fake_factory(settings, train.len(), eval.len())
    } else {
        bert_factory(settings, dataset)
    };
    #[cfg(not(feature = "test-support"))]
    let factory = bert_factory(settings, dataset);
    let key_file: &Path = &settings.identity.key;
    let key = crate::identity::load(key_file)
        .map_err(|e| RunError::Usage(format!("identity.key ({}): {e}", key_file.display())))?;
    let api = GrpcCoordinator::connect_lazy(&connect_options(settings)?)
        .map_err(|e| RunError::Usage(e.to_string()))?
        .with_identity(Arc::clone(&key), enroll_token);
    let agent = &settings.agent;
    if settings.privacy.floor().expects_privacy() {
        tracing::info!(
            require = %settings.privacy.require,
            min_noise_multiplier = settings.privacy.min_noise_multiplier,
            "privacy floor: weaker fit tasks are refused"
        );
    }
    let config = AgentConfig {
        name,
        train_examples: train.len() as u64,
        eval_examples: eval.len() as u64,
        privacy_floor: settings.privacy.floor(),
        poll_wait: agent.poll_wait,
        backoff: BackoffPolicy { max: agent.max_backoff, ..BackoffPolicy::default() },
        give_up_after: agent.give_up_after,
        upload_rate_limit: agent.upload_rate_limit,
        identity: Some(key),
        model_dir: Some(settings.model.dir.clone()),
        ..AgentConfig::default()
    };
    Ok(Agent::new(api, config, factory, shutdown).run().await?)
}

/// `run` for the binary: its own multi-threaded runtime, SIGINT/SIGTERM as the shutdown
/// signal, and a summary line at the end.
pub fn run_blocking(
    settings: &ClientSettings,
    enroll_token: Option<EnrollmentToken>,
) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fedtune-agent")
        .build()
        .map_err(RunError::Runtime)?;
    let result = runtime.block_on(async {
        let shutdown = fedtune_shared::shutdown::shutdown_token();
        run(settings, enroll_token, shutdown).await
    });
    // The trainer thread may still be busy with a step the agent abandoned: do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    eprintln!("{}", summary(&result?));
    Ok(())
}

/// The last line a `run` prints: a sentence an operator reads in a journal, on either log
/// format (why it stopped, then what it did).
fn summary(outcome: &AgentOutcome) -> String {
    let why = match &outcome.reason {
        ExitReason::Finished { final_version, reason } => {
            format!("the federation finished with model {final_version} ({reason})")
        }
        ExitReason::Shutdown => "stopped on request (SIGINT or SIGTERM)".to_string(),
    };
    let s = &outcome.stats;
    format!(
        "fedtune-client: {why}; this client trained {} round(s), had {} update(s) accepted, reported \
         {} evaluation(s), joined {} time(s), downloaded {} B and uploaded {} B.",
        s.fits, s.updates_accepted, s.evaluations, s.joins, s.bytes_downloaded, s.bytes_uploaded
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentStats;
    use fedtune_shared::ids::ModelVersion;

    #[test]
    fn the_final_line_is_a_sentence_naming_why_the_client_stopped_and_what_it_did() {
        let stats =
            AgentStats { fits: 3, updates_accepted: 2, evaluations: 4, joins: 1, ..AgentStats::default() };
        let finished = summary(&AgentOutcome {
            reason: ExitReason::Finished { final_version: ModelVersion(5), reason: "all rounds done".into() },
            stats: stats.clone(),
        });
        assert_eq!(
            finished,
            "fedtune-client: the federation finished with model v5 (all rounds done); this client trained \
             3 round(s), had 2 update(s) accepted, reported 4 evaluation(s), joined 1 time(s), downloaded \
             0 B and uploaded 0 B."
        );
        let stopped = summary(&AgentOutcome { reason: ExitReason::Shutdown, stats });
        assert!(stopped.starts_with("fedtune-client: stopped on request (SIGINT or SIGTERM); "), "{stopped}");
        for line in [finished, stopped] {
            assert!(
                !line.contains('{') && !line.contains("Finished") && !line.contains("Shutdown"),
                "{line}"
            );
        }
    }

    fn settings(url: &str, extra: &[(&str, &str)]) -> ClientSettings {
        let mut env = vec![
            ("FEDTUNE_CLIENT__COORDINATOR__URL".to_string(), url.to_string()),
            ("FEDTUNE_CLIENT__IDENTITY__KEY".into(), "k".into()),
            ("FEDTUNE_CLIENT__DATA__PATH".into(), "d.csv".into()),
            ("FEDTUNE_CLIENT__MODEL__DIR".into(), "m".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())));
        ClientSettings::load(None, env, &[]).unwrap()
    }

    #[test]
    fn an_unreadable_ca_certificate_is_a_usage_error_naming_the_file() {
        let insecure = settings("http://127.0.0.1:1", &[("FEDTUNE_CLIENT__COORDINATOR__INSECURE", "true")]);
        assert!(connect_options(&insecure).unwrap().tls.is_none());
        let https = settings(
            "https://localhost:1",
            &[("FEDTUNE_CLIENT__COORDINATOR__TLS_CA", "/nonexistent/ca.pem")],
        );
        let err = connect_options(&https).unwrap_err();
        assert!(matches!(&err, RunError::Usage(m) if m.contains("ca.pem")), "{err}");
    }

    #[test]
    fn the_transport_bounds_its_calls_by_agent_request_timeout() {
        let insecure = ("FEDTUNE_CLIENT__COORDINATOR__INSECURE", "true");
        let default = settings("http://127.0.0.1:1", &[insecure]);
        assert_eq!(connect_options(&default).unwrap().request_timeout, Duration::from_secs(30));
        let set =
            settings("http://127.0.0.1:1", &[insecure, ("FEDTUNE_CLIENT__AGENT__REQUEST_TIMEOUT", "4s")]);
        assert_eq!(connect_options(&set).unwrap().request_timeout, Duration::from_secs(4));
    }

    /// How `main` prints an error: the anyhow chain, each layer's message joined by `: `.
    fn printed(err: RunError) -> String {
        format!("{:#}", anyhow::Error::from(err))
    }

    #[test]
    fn a_trainer_failure_prints_its_cause_once() {
        let cause = "d.csv:3: label `meh` is not one of the model's labels";
        let err = RunError::Agent(AgentError::Trainer(TrainerError::Failed(cause.into())));
        let shown = printed(err);
        assert_eq!(shown.matches(cause).count(), 1, "{shown}");
        assert_eq!(shown, format!("building the trainer failed: trainer failed: {cause}"));
    }

    #[test]
    fn a_missing_data_file_prints_its_io_cause_once() {
        let err = Dataset::load(Path::new("/nonexistent/d.csv"), &DataOptions::default()).unwrap_err();
        let cause = std::error::Error::source(&err).expect("the I/O error is the source").to_string();
        let shown = printed(RunError::Data(err));
        assert_eq!(shown.matches(&cause).count(), 1, "{shown}");
        assert!(shown.contains("/nonexistent/d.csv"), "{shown}");
    }

    /// Builds the BERT trainer of a LoRA federation whose coordinator advertised `a_digest`.
    fn build_lora_trainer(a_digest: Option<[u8; 32]>) -> Result<(), TrainerError> {
        use fedtune_shared::bert::lora::LoraConfig;
        use fedtune_shared::params::{Manifest, ParameterVector};
        use fedtune_shared::round::AdapterSpec;
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.csv");
        let rows = "text,label\ngood film,positive\nbad film,negative\nfine,positive\nawful,negative\n";
        std::fs::write(&data, rows).unwrap();
        let env = [
            ("FEDTUNE_CLIENT__COORDINATOR__URL", "http://127.0.0.1:1"),
            ("FEDTUNE_CLIENT__COORDINATOR__INSECURE", "true"),
            ("FEDTUNE_CLIENT__IDENTITY__KEY", "k"),
            ("FEDTUNE_CLIENT__DATA__PATH", data.to_str().unwrap()),
            ("FEDTUNE_CLIENT__MODEL__DIR", model.to_str().unwrap()),
        ];
        let settings =
            ClientSettings::load(None, env.map(|(k, v)| (k.to_string(), v.to_string())), &[]).unwrap();
        let dataset = Dataset::load(&data, &DataOptions::default()).unwrap();
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["query".into(), "value".into()],
            seed: 3,
        };
        // What the coordinator advertises: the digest of the A it drew onto the same base.
        let base = ParameterVector::load_safetensors(&model.join("model.safetensors"), |_| true).unwrap();
        let theirs = LoraConfig::a_digest(&lora.with_adapters(base).unwrap());
        let adapter = AdapterSpec { lora, a_digest: a_digest.unwrap_or(theirs) };
        let spec =
            TrainerSpec { labels: vec![], trainable: Manifest::new(vec![]).unwrap(), adapter: Some(adapter) };
        bert_factory(&settings, dataset)(&spec).map(drop)
    }

    #[test]
    fn a_lora_trainer_starts_only_when_its_regenerated_a_is_the_coordinators() {
        build_lora_trainer(None).expect("the same seed and base give the coordinator's A");
        let err = build_lora_trainer(Some([7; 32])).expect_err("another A is refused");
        assert!(matches!(&err, TrainerError::Incompatible(m) if m.contains("LoRA A matrices")), "{err}");
    }
}
