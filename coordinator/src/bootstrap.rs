//! Start-up: a fresh state directory gets the initial model (version 0) built from the Hugging
//! Face checkpoint; an existing one resumes after its last committed round.
//!
//! The state directory fixes the federation: the trainable split, the labels and the strategy are
//! recorded at creation, and `serve` refuses to resume with settings that would change them
//! (clients would otherwise upload updates for a different layout than the checkpoints hold).

use std::path::PathBuf;

use fedtune_shared::bert::lora::LoraConfig;
use fedtune_shared::bert::num_encoder_layers;
use fedtune_shared::chunk::PayloadView;
use fedtune_shared::ids::{ModelVersion, RoundId, Sha256};
use fedtune_shared::params::{Manifest, ParameterVector};
use fedtune_shared::round::AdapterSpec;
use tracing::{info, warn};

use crate::model::{self, GlobalModel, ModelError, TrainableLayout};
use crate::settings::CoordinatorSettings;
use crate::storage::{self, Storage, StorageError, StoredClient};
use crate::strategy::{self, Strategy};

/// Meta keys of the state database.
mod keys {
    pub(super) const SCHEMA: &str = "schema";
    pub(super) const INIT_DIR: &str = "init_dir";
    pub(super) const INIT_SEED: &str = "init_seed";
    pub(super) const INITIALISED: &str = "initialised_tensors";
    pub(super) const LABELS: &str = "labels";
    pub(super) const FULL_MANIFEST: &str = "full_manifest_sha256";
    pub(super) const TRAINABLE_MANIFEST: &str = "trainable_manifest_sha256";
    pub(super) const STRATEGY: &str = "strategy";
    pub(super) const ADAPTER: &str = crate::model::ADAPTER_META_KEY;
}

/// Errors at start-up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// State directory.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Model files.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The state directory does not fit the settings or is damaged.
    #[error("state directory {dir}: {reason}")]
    Inconsistent {
        /// Folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What the round actor starts from.
pub struct Booted {
    /// The published model.
    pub model: GlobalModel,
    /// Label names.
    pub labels: Vec<String>,
    /// The LoRA adapter clients build (A's seed is the recorded `init_seed`), if any.
    pub adapter: Option<AdapterSpec>,
    /// The recorded `model.init_seed`, which clients need to rebuild version 0.
    pub init_seed: u64,
    /// The strategy, with restored state.
    pub strategy: Box<dyn Strategy>,
    /// Known clients.
    pub clients: Vec<StoredClient>,
    /// The next round to attempt.
    pub next: RoundId,
    /// Failed attempts of that round so far.
    pub consecutive_failures: u32,
    /// Whether version 0 was evaluated already.
    pub initial_evaluated: bool,
    /// True when this start created the state directory.
    pub fresh: bool,
}

impl std::fmt::Debug for Booted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Booted")
            .field("version", &self.model.version)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// Number of encoder layers named in a manifest.
fn num_layers(m: &Manifest) -> usize {
    num_encoder_layers(m.tensors.iter().map(|t| t.name.as_str()))
}

/// Opens or creates the federation state. Blocking (reads and hashes the model).
pub fn bootstrap(settings: &CoordinatorSettings, store: &Storage) -> Result<Booted, BootError> {
    let inconsistent = |reason: String| BootError::Inconsistent { dir: store.dir().to_path_buf(), reason };
    let latest = store.call_sync(|c| storage::latest_checkpoint(c))?;
    let mut strategy = strategy::from_settings(&settings.strategy);
    let (model, labels, lora, init_seed, fresh) = match latest {
        None => {
            let lora = settings.model.lora_config(settings.model.init_seed);
            let init = model::load_initial(&settings.model)?;
            let layout = TrainableLayout::new(
                init.params.manifest().clone(),
                model::trainable_rule(&settings.model, num_layers(init.params.manifest())),
            );
            if layout.trainable.tensors.is_empty() {
                return Err(inconsistent("no tensor is trainable with these model settings".into()));
            }
            let global = GlobalModel::new(ModelVersion(0), init.params, layout.into());
            let path = store.checkpoint_path(ModelVersion(0));
            global.params.save_safetensors(&path).map_err(ModelError::from)?;
            let meta = vec![
                (keys::SCHEMA, "1".to_string()),
                (keys::INIT_DIR, settings.model.init_dir.display().to_string()),
                (keys::INIT_SEED, settings.model.init_seed.to_string()),
                (keys::INITIALISED, serde_json::json!(init.initialised).to_string()),
                (keys::LABELS, serde_json::json!(init.labels).to_string()),
                (keys::FULL_MANIFEST, global.model_ref.full_manifest.to_hex()),
                (keys::TRAINABLE_MANIFEST, global.model_ref.trainable_manifest.to_hex()),
                (keys::STRATEGY, strategy.name().to_string()),
                (keys::ADAPTER, model::adapter_meta(lora.as_ref())),
            ];
            let digest = global.model_ref.full_payload;
            store.call_sync(|c| storage::commit_initial(c, &path, digest, &meta))?;
            info!(
                tensors = global.layout.full.tensors.len(),
                values = global.layout.full.numel(),
                trainable_values = global.layout.trainable.numel(),
                initialised = ?init.initialised,
                "initial model created"
            );
            (global, init.labels, lora, settings.model.init_seed, true)
        }
        Some(row) => {
            let meta = |k: &'static str| {
                store.call_sync(|c| storage::meta_get(c, k)).and_then(|v| {
                    v.ok_or_else(|| StorageError::Mismatch {
                        dir: store.dir().into(),
                        reason: format!("meta `{k}` missing"),
                    })
                })
            };
            // A state directory from before adapters records none: it has no adapter.
            let recorded_adapter = store.call_sync(|c| storage::meta_get(c, keys::ADAPTER))?;
            let lora = model::recorded_adapter(recorded_adapter.as_deref()).map_err(inconsistent)?;
            let seed = meta(keys::INIT_SEED)?
                .parse::<u64>()
                .map_err(|e| inconsistent(format!("meta `init_seed`: {e}")))?;
            if lora != settings.model.lora_config(seed) {
                return Err(inconsistent(
                    "model.adapter / model.lora differ from when this state directory was created; use \
                     those settings or a new state directory"
                        .into(),
                ));
            }
            let params = ParameterVector::load_safetensors(&row.path, |_| true).map_err(ModelError::from)?;
            if Sha256(params.manifest().digest()).to_hex() != meta(keys::FULL_MANIFEST)? {
                return Err(inconsistent(format!(
                    "checkpoint {} has another tensor layout",
                    row.path.display()
                )));
            }
            let actual = PayloadView::whole(params.values()).digest();
            if actual.to_hex() != row.full_sha256 {
                return Err(inconsistent(format!(
                    "checkpoint {} does not match its recorded digest (damaged?)",
                    row.path.display()
                )));
            }
            let layout = TrainableLayout::new(
                params.manifest().clone(),
                model::trainable_rule(&settings.model, num_layers(params.manifest())),
            );
            if Sha256(layout.trainable.digest()).to_hex() != meta(keys::TRAINABLE_MANIFEST)? {
                return Err(inconsistent(
                    "model.train_top_layers / model.freeze_embeddings differ from when this state directory \
                     was created; use those settings or a new state directory"
                        .into(),
                ));
            }
            let recorded = meta(keys::STRATEGY)?;
            if recorded != strategy.name() {
                return Err(inconsistent(format!(
                    "strategy `{}` configured, but this federation runs `{recorded}`",
                    strategy.name()
                )));
            }
            if let Some(sp) = &row.strategy_path {
                let state = ParameterVector::load_safetensors(sp, |_| true).map_err(ModelError::from)?;
                let state_manifest = state.manifest().clone();
                let values = state.into_parts().1;
                // load_safetensors sorts names; the strategies' own state order is m, v.
                let ordered = ParameterVector::new(state_manifest, values).map_err(ModelError::from)?;
                strategy.restore_state(ordered).map_err(|e| inconsistent(e.to_string()))?;
            }
            let labels: Vec<String> = serde_json::from_str(&meta(keys::LABELS)?)
                .map_err(|e| inconsistent(format!("labels: {e}")))?;
            if !settings.model.labels.is_empty() && settings.model.labels != labels {
                warn!(recorded = ?labels, "model.labels differ from the recorded labels; the recorded ones stay");
            }
            info!(version = %row.version, "resuming from the last committed round");
            (GlobalModel::new(row.version, params, layout.into()), labels, lora, seed, false)
        }
    };
    // Differential privacy wraps whichever strategy runs, its accountant rebuilt from the ledger.
    let strategy =
        strategy::dp::wrap_strategy(settings, strategy, store, model.layout.trainable.numel(), fresh)
            .map_err(|e| inconsistent(format!("privacy: {e}")))?;
    let version = model.version;
    let round = version.0 + 1;
    let (clients, attempt, failures, initial_evaluated) = store.call_sync(|c| {
        let aborted = storage::abort_running(c)?;
        if aborted > 0 {
            warn!(rounds = aborted, "rounds interrupted by the previous stop are marked aborted");
        }
        Ok((
            storage::load_clients(c)?,
            storage::next_attempt(c, round)?,
            storage::trailing_failures(c, round)?,
            storage::evaluated(c, ModelVersion(0))? || version.0 > 0,
        ))
    })?;
    let adapter = lora.map(|lora| AdapterSpec { a_digest: LoraConfig::a_digest(&model.params), lora });
    Ok(Booted {
        model,
        labels,
        adapter,
        init_seed,
        strategy,
        clients,
        next: RoundId::new(round, attempt),
        consecutive_failures: failures,
        initial_evaluated,
        fresh,
    })
}

#[cfg(test)]
mod tests {
    use fedtune_shared::params::TensorSpec;

    use super::*;
    use crate::settings::AdapterKind;

    /// A one-layer BERT-like checkpoint with a query projection, and settings training a LoRA
    /// adapter on it.
    fn lora_federation(root: &std::path::Path) -> CoordinatorSettings {
        let model = root.join("model");
        std::fs::create_dir_all(&model).unwrap();
        let m = Manifest::new(vec![
            TensorSpec { name: "bert.encoder.layer.0.attention.self.query.weight".into(), shape: vec![4, 4] },
            TensorSpec { name: "bert.encoder.layer.0.attention.self.value.weight".into(), shape: vec![4, 4] },
        ])
        .unwrap();
        let n = m.numel();
        ParameterVector::new(m, (0..n).map(|i| i as f32 / 100.0).collect())
            .unwrap()
            .save_safetensors(&model.join("model.safetensors"))
            .unwrap();
        std::fs::write(model.join("config.json"), r#"{"hidden_size": 4, "num_hidden_layers": 1}"#).unwrap();
        let mut s = CoordinatorSettings::with_paths(root.join("state"), &model);
        s.model.num_labels = Some(2);
        s.model.adapter = AdapterKind::Lora;
        s.model.lora.rank = 2;
        s
    }

    #[test]
    fn a_lora_federation_advertises_its_a_digest_and_refuses_to_resume_with_another_adapter() {
        let root = tempfile::tempdir().unwrap();
        let settings = lora_federation(root.path());
        let store = Storage::open(&settings.storage.state_dir).unwrap();
        let booted = bootstrap(&settings, &store).unwrap();
        let adapter = booted.adapter.clone().expect("an adapter");
        assert_eq!(adapter.lora, settings.model.lora_config(settings.model.init_seed).unwrap());
        assert_eq!(adapter.a_digest, LoraConfig::a_digest(&booted.model.params));
        drop(booted);

        let resumed = bootstrap(&settings, &store).unwrap();
        assert_eq!(resumed.adapter, Some(adapter));
        for changed in [
            CoordinatorSettings {
                model: crate::settings::ModelSettings {
                    adapter: AdapterKind::None,
                    ..settings.model.clone()
                },
                ..settings.clone()
            },
            {
                let mut s = settings.clone();
                s.model.lora.alpha = 32.0;
                s
            },
        ] {
            let err = bootstrap(&changed, &store).unwrap_err().to_string();
            assert!(err.contains("model.adapter"), "{err}");
        }
    }
}
