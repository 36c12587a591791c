//! Connecting: join (or re-join) the federation, and build the trainer after the first join.

use std::time::Duration;

use fedtune_shared::ids::ClientId;
use fedtune_shared::params::Manifest;
use fedtune_shared::pb::PROTOCOL_VERSION;
use fedtune_shared::round::{AdapterSpec, JoinRequest, Limits};

use super::download::InitialSource;
use super::{worker, Agent, AgentError, State, TrainerSpec};
use crate::transport::{ApiError, CoordinatorApi};

/// What the agent keeps from the latest join.
#[derive(Debug, Clone)]
pub(super) struct Session {
    /// Our id.
    pub(super) client_id: ClientId,
    /// Heartbeat period while busy.
    pub(super) heartbeat_interval: Duration,
    /// The tensors we train and upload.
    pub(super) trainable: Manifest,
    /// Connection limits (chunk sizes).
    pub(super) limits: Limits,
    /// Label names of the head.
    pub(super) labels: Vec<String>,
    /// The federation's LoRA adapter, if any.
    pub(super) adapter: Option<AdapterSpec>,
}

impl<C: CoordinatorApi + 'static> Agent<C> {
    /// Joins; on the first join also builds the trainer and checks that it trains exactly the
    /// tensors the coordinator expects.
    pub(super) async fn connect(&mut self) -> Result<State, AgentError> {
        let (train_examples, eval_examples) = self.config.join_counts();
        let request = JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            name: self.session.as_ref().map(|s| s.client_id.clone()).or_else(|| self.config.name.clone()),
            public_key: None,
            train_examples,
            eval_examples,
            agent_version: self.config.agent_version.clone(),
        };
        let joined = match self.api.join(request).await {
            Ok(joined) => joined,
            Err(ApiError::Denied(why)) => return Err(AgentError::Denied(why)),
            Err(ApiError::Config(why)) => return Err(AgentError::Config(why)),
            Err(e) => return Ok(State::Backoff { then: Box::new(State::Connecting), cause: e }),
        };
        self.contact();
        self.stats.joins += 1;
        if joined.protocol_version != PROTOCOL_VERSION {
            return Err(AgentError::Protocol { theirs: joined.protocol_version, ours: PROTOCOL_VERSION });
        }
        if let Some(previous) = &self.session {
            // A re-join after a coordinator restart must describe the same federation, or the
            // trainer we built (and any update we hold) would be for another model.
            if previous.trainable != joined.trainable_manifest
                || previous.labels != joined.labels
                || previous.adapter != joined.adapter
            {
                return Err(AgentError::Incompatible(
                    "after re-joining, the coordinator serves a different model (trainable tensors, labels or \
                     adapter changed)"
                        .into(),
                ));
            }
        }
        tracing::info!(
            client_id = %joined.client_id,
            model = %joined.model.version,
            trainable_tensors = joined.trainable_manifest.tensors.len(),
            trainable_values = joined.trainable_manifest.numel(),
            "joined the federation"
        );
        let init_seed = joined.init_seed;
        let session = Session {
            client_id: joined.client_id,
            heartbeat_interval: joined.heartbeat_interval.max(Duration::from_millis(50)),
            trainable: joined.trainable_manifest,
            limits: joined.limits,
            labels: joined.labels,
            adapter: joined.adapter,
        };
        if self.worker.is_none() {
            let spec = TrainerSpec {
                labels: session.labels.clone(),
                trainable: session.trainable.clone(),
                adapter: session.adapter.clone(),
            };
            let factory = self.factory.take().ok_or(AgentError::WorkerGone)?;
            tracing::info!("building the local trainer");
            let (worker, manifest) = worker::Worker::start(factory, spec).await?;
            if manifest != session.trainable {
                return Err(AgentError::Incompatible(format!(
                    "the local trainer trains {} tensors ({} values) but the coordinator expects {} tensors ({} \
                     values); first difference: {}",
                    manifest.tensors.len(),
                    manifest.numel(),
                    session.trainable.tensors.len(),
                    session.trainable.numel(),
                    manifest.ensure_same(&session.trainable).err().map(|e| e.to_string()).unwrap_or_default()
                )));
            }
            self.worker = Some(worker);
        }
        if let (Some(dir), Some(init_seed)) = (&self.config.model_dir, init_seed) {
            self.cache.rebuild_initial_from(InitialSource {
                dir: dir.clone(),
                labels: session.labels.clone(),
                init_seed,
                lora: session.adapter.as_ref().map(|a| a.lora.clone()),
            });
        }
        self.session = Some(session);
        Ok(State::Idle)
    }
}
