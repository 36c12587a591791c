//! Client agents in this process with fake trainers, whose updates a test can recompute exactly.

use std::time::Duration;

use anyhow::Result;
use fedtune_client::agent::{Agent, AgentConfig, AgentError, AgentOutcome, TrainerFactory, TrainerSpec};
use fedtune_client::fake_trainer::{FakeTrainer, FakeTrainerConfig};
use fedtune_client::local_trainer::LocalTrainer;
use fedtune_client::transport::{ConnectOptions, GrpcCoordinator};
use fedtune_shared::ids::ClientId;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The fake trainer of client `site-{seed}`: `examples` training examples and 10 evaluation
/// ones. A test builds the same config again to recompute that client's update.
pub fn fake_trainer(seed: u64, examples: u64) -> FakeTrainerConfig {
    FakeTrainerConfig {
        seed,
        num_train_examples: examples,
        num_eval_examples: 10,
        ..FakeTrainerConfig::default()
    }
}

/// Spawns the agent `site-{seed}` against the coordinator at `url` (signing with its allowlisted
/// key, see [`crate::identities`]) with [`fake_trainer`]`(seed, examples)` over whatever
/// manifest the coordinator assigns. It runs until the federation finishes.
pub fn spawn_fake_agent(
    url: &str,
    seed: u64,
    examples: u64,
) -> Result<JoinHandle<Result<AgentOutcome, AgentError>>> {
    let name = format!("site-{seed}");
    let key = crate::identities::key_for(url, &name)?;
    let api = GrpcCoordinator::connect_lazy(&ConnectOptions::new(url.to_string()))?.with_identity(key, None);
    let config = AgentConfig {
        name: Some(ClientId::parse(&name)?),
        train_examples: examples,
        eval_examples: 10,
        poll_wait: Duration::from_secs(2),
        ..AgentConfig::default()
    };
    let trainer = fake_trainer(seed, examples);
    let factory: TrainerFactory = Box::new(move |spec: &TrainerSpec| {
        Ok(Box::new(FakeTrainer::new(spec.trainable.clone(), trainer)) as Box<dyn LocalTrainer>)
    });
    Ok(tokio::spawn(Agent::new(api, config, factory, CancellationToken::new()).run()))
}
