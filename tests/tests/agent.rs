//! Client agents in this process against a real coordinator (in this process too) over real
//! gRPC on loopback: the full protocol, with fake trainers whose updates are known exactly.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use fedtune_client::agent::ExitReason;
use fedtune_client::fake_trainer::FakeTrainer;
use fedtune_client::local_trainer::{FitConfig, LocalTrainer};
use fedtune_coordinator::cli::{export, ExportArgs};
use fedtune_shared::params::{Manifest, ParameterVector};
use fedtune_tests::agents::{fake_trainer, spawn_fake_agent};
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::InProcess;

/// The full model of version `round` from the state directory, restricted to `manifest`.
fn published(state: &Path, round: u64, manifest: &Manifest, out: &Path) -> Result<ParameterVector> {
    export(&ExportArgs { state_dir: state.to_path_buf(), round, out: out.to_path_buf(), init_dir: None })?;
    Ok(ParameterVector::load_safetensors(&out.join("model.safetensors"), |_| true)?.select(manifest)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_over_grpc_publish_the_example_weighted_mean_of_their_local_models() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let state = dir.path().join("state");
    let coord = InProcess::start(quick_settings(&state, &model, 1, 3, 3)).await?;

    let clients = [(1, 10), (2, 30), (3, 60)];
    let mut agents = Vec::new();
    for (seed, examples) in clients {
        agents.push(spawn_fake_agent(&coord.url, seed, examples)?);
    }
    for agent in agents {
        let outcome = tokio::time::timeout(Duration::from_secs(60), agent).await???;
        assert!(matches!(outcome.reason, ExitReason::Finished { .. }), "{outcome:?}");
        assert_eq!((outcome.stats.fits, outcome.stats.updates_accepted), (1, 1), "{outcome:?}");
    }
    coord.shutdown().await?;

    // Recompute round 1 by hand: every client trains from version 0; FedAvg (server rate 1)
    // moves the model by the example-weighted mean of their deltas.
    // With default settings every tensor trains, so the trainable manifest is the whole model.
    let initial = ParameterVector::load_safetensors(&model.join("model.safetensors"), |_| true)?;
    let global = published(&state, 0, initial.manifest(), &dir.path().join("v0"))?;
    let manifest = global.manifest().clone();
    let total: u64 = clients.iter().map(|c| c.1).sum();
    let mut expected = global.values().to_vec();
    for (seed, examples) in clients {
        let mut trainer = FakeTrainer::new(manifest.clone(), fake_trainer(seed, examples));
        let local = trainer.fit(&global, &FitConfig::default())?.weights;
        for ((e, l), g) in expected.iter_mut().zip(local.values()).zip(global.values()) {
            *e += (l - g) * examples as f32 / total as f32;
        }
    }
    let got = published(&state, 1, &manifest, &dir.path().join("v1"))?;
    let worst = got.values().iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "published model differs from the weighted mean by up to {worst}");
    assert_ne!(got.values(), global.values(), "round 1 changed the model");
    Ok(())
}
