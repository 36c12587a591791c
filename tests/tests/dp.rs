//! Differential privacy end to end (issue #4): real coordinators over real gRPC on loopback,
//! in-process agents with fake trainers whose updates are known exactly, protocol-level test
//! clients, and the `fedtune-coordinator` binary (planning CLI, `kill -9` and restart).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use fedtune_client::agent::{Agent, AgentConfig, ExitReason, TrainerFactory, TrainerSpec};
use fedtune_client::fake_trainer::{FakeTrainer, FakeTrainerConfig};
use fedtune_client::local_trainer::{FitConfig, LocalTrainer};
use fedtune_client::transport::{ApiError, ConnectOptions, CoordinatorApi, DownloadStream, GrpcCoordinator};
use fedtune_coordinator::cli::{export, ExportArgs};
use fedtune_coordinator::outcome::ParticipantOutcome;
use fedtune_coordinator::privacy::{DpMode, PrivacySettings};
use fedtune_coordinator::settings::SamplingSettings;
use fedtune_coordinator::{CoordinatorSettings, RunError};
use fedtune_shared::ids::{ClientId, ModelVersion};
use fedtune_shared::params::{Manifest, ParameterVector};
use fedtune_shared::privacy::{
    clip_l2, default_grid_log2, epsilon_for_rounds, l2_norm_upper_bound, widened_sensitivity, Adjacency,
    SamplingScheme,
};
use fedtune_shared::round::{
    DownloadRequest, EvalReport, FailureCode, FailureReport, Heartbeat, HeartbeatReply, JoinRequest,
    JoinResponse, PhaseName, StatusReport, Task, UploadItem, UploadReceipt,
};
use fedtune_shared::secagg::{
    AwaitedStep, KeyAdvertisement, RoundContext, RoundUnmaskAnswer, ShareUpload, StepInput,
};
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{f32_bytes, InProcess, TestClient};
use fedtune_tests::process::{binary, simulate_fake, wait_for_status, CoordinatorProc};
use futures::stream::{BoxStream, StreamExt};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const DELTA: f64 = 1e-5;

fn privacy(mode: DpMode, z: f64, clip: f64) -> PrivacySettings {
    PrivacySettings {
        mode,
        noise_multiplier: Some(z),
        clip_norm: clip,
        delta: DELTA,
        ..PrivacySettings::default()
    }
}

fn fake(seed: u64) -> FakeTrainerConfig {
    FakeTrainerConfig {
        seed,
        num_train_examples: 10 * seed,
        num_eval_examples: 10,
        ..FakeTrainerConfig::default()
    }
}

fn factory(config: FakeTrainerConfig) -> TrainerFactory {
    Box::new(move |spec: &TrainerSpec| {
        Ok(Box::new(FakeTrainer::new(spec.trainable.clone(), config)) as Box<dyn LocalTrainer>)
    })
}

/// What went over the wire in one upload.
#[derive(Debug, Clone, Default)]
struct Sent {
    num_examples: u64,
    metrics: Vec<String>,
    payload: Vec<u8>,
}

/// The real gRPC transport, recording every upload it sends.
#[derive(Debug, Clone)]
struct Recording {
    inner: Arc<GrpcCoordinator>,
    sent: Arc<Mutex<Vec<Sent>>>,
}

impl CoordinatorApi for Recording {
    async fn join(&self, request: JoinRequest) -> Result<JoinResponse, ApiError> {
        self.inner.join(request).await
    }
    async fn wait_for_task(&self, max_wait: Duration) -> Result<Task, ApiError> {
        self.inner.wait_for_task(max_wait).await
    }
    async fn heartbeat(&self, beat: Heartbeat) -> Result<HeartbeatReply, ApiError> {
        self.inner.heartbeat(beat).await
    }
    async fn download(&self, request: DownloadRequest) -> Result<DownloadStream, ApiError> {
        self.inner.download(request).await
    }
    async fn upload(&self, items: BoxStream<'static, UploadItem>) -> Result<UploadReceipt, ApiError> {
        let slot = Arc::new(Mutex::new(Sent::default()));
        let tap = Arc::clone(&slot);
        let items = items
            .inspect(move |item| {
                let mut s = tap.lock().unwrap();
                match item {
                    UploadItem::Header(h) => {
                        s.num_examples = h.num_examples;
                        s.metrics = h.metrics.keys().cloned().collect();
                    }
                    UploadItem::Chunk(c) => s.payload.extend_from_slice(&c.data),
                    UploadItem::Trailer(_) => {}
                }
            })
            .boxed();
        let receipt = self.inner.upload(items).await?;
        self.sent.lock().unwrap().push(slot.lock().unwrap().clone());
        Ok(receipt)
    }
    async fn upload_masked(
        &self,
        secagg_context: [u8; 32],
        items: BoxStream<'static, UploadItem>,
    ) -> Result<UploadReceipt, ApiError> {
        self.inner.upload_masked(secagg_context, items).await
    }
    async fn advertise_keys(&self, keys: KeyAdvertisement) -> Result<(), ApiError> {
        self.inner.advertise_keys(keys).await
    }
    async fn send_shares(&self, shares: ShareUpload) -> Result<(), ApiError> {
        self.inner.send_shares(shares).await
    }
    async fn await_secagg_step(
        &self,
        ctx: &RoundContext,
        step: AwaitedStep,
        max_wait: Duration,
    ) -> Result<StepInput, ApiError> {
        self.inner.await_secagg_step(ctx, step, max_wait).await
    }
    async fn answer_unmask(&self, answer: RoundUnmaskAnswer) -> Result<(), ApiError> {
        self.inner.answer_unmask(answer).await
    }
    async fn report_evaluation(&self, report: EvalReport) -> Result<(), ApiError> {
        self.inner.report_evaluation(report).await
    }
    async fn report_failure(&self, report: FailureReport) -> Result<(), ApiError> {
        self.inner.report_failure(report).await
    }
    async fn leave(&self) -> Result<(), ApiError> {
        self.inner.leave().await
    }
    async fn status(&self, recent_rounds: u32) -> Result<StatusReport, ApiError> {
        self.inner.status(recent_rounds).await
    }
}

/// The trainable model of `version`, exported from the state directory.
fn published(state: &Path, round: u64, manifest: &Manifest, out: &Path) -> Result<ParameterVector> {
    export(&ExportArgs { state_dir: state.to_path_buf(), round, out: out.to_path_buf(), init_dir: None })?;
    Ok(ParameterVector::load_safetensors(&out.join("model.safetensors"), |_| true)?.select(manifest)?)
}

/// One round by three in-process agents (fake trainers, seeds 1–3) under `privacy`; returns the
/// published model of version 1, the clipped deltas the clients computed, every upload as sent,
/// and the final status.
struct Outcome {
    global: Vec<f32>,
    published: Vec<f32>,
    clipped: Vec<Vec<f32>>,
    sent: Vec<Sent>,
    status: StatusReport,
}

async fn one_round_with_agents(dir: &Path, privacy: PrivacySettings) -> Result<Outcome> {
    let model = write_fake_model(&dir.join("model"), 2, 8)?;
    let state = dir.join("state");
    let mut settings = quick_settings(&state, &model, 1, 3, 3);
    settings.evaluation.every = 0;
    settings.server.exit_after_finished = Some(Duration::from_secs(60));
    let clip = privacy.clip_norm;
    let dp = privacy.enabled();
    settings.privacy = privacy;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    fedtune_tests::identities::register(&url, &state);
    let server = tokio::spawn(fedtune_coordinator::run(settings, listener, stop.clone()));

    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut agents = Vec::new();
    for seed in 1..=3u64 {
        let name = format!("site-{seed}");
        let key = fedtune_tests::identities::key_for(&url, &name)?;
        let api = GrpcCoordinator::connect_lazy(&ConnectOptions::new(url.clone()))?.with_identity(key, None);
        let api = Recording { inner: Arc::new(api), sent: Arc::clone(&sent) };
        let config = AgentConfig {
            name: Some(ClientId::parse(&name)?),
            train_examples: 10 * seed,
            eval_examples: 10,
            poll_wait: Duration::from_secs(2),
            ..AgentConfig::default()
        };
        agents
            .push(tokio::spawn(Agent::new(api, config, factory(fake(seed)), CancellationToken::new()).run()));
    }
    for agent in agents {
        let outcome = tokio::time::timeout(Duration::from_secs(60), agent).await???;
        assert!(matches!(outcome.reason, ExitReason::Finished { .. }), "{outcome:?}");
        assert_eq!(outcome.stats.updates_accepted, 1, "{outcome:?}");
    }
    let status = wait_for_status(&url, WAIT, |s| s.phase == PhaseName::Finished).await?;
    stop.cancel();
    server.await??;

    let initial = ParameterVector::load_safetensors(&model.join("model.safetensors"), |_| true)?;
    let global = published(&state, 0, initial.manifest(), &dir.join("v0"))?;
    let manifest = global.manifest().clone();
    let mut clipped = Vec::new();
    for seed in 1..=3u64 {
        let mut trainer = FakeTrainer::new(manifest.clone(), fake(seed));
        let local = trainer.fit(&global, &FitConfig::default())?.weights;
        let mut d: Vec<f32> = local.values().iter().zip(global.values()).map(|(l, g)| l - g).collect();
        if dp {
            clip_l2(&mut d, clip);
        }
        clipped.push(d);
    }
    let got = published(&state, 1, &manifest, &dir.join("v1"))?;
    let sent = sent.lock().unwrap().clone();
    Ok(Outcome { global: global.values().to_vec(), published: got.values().to_vec(), clipped, sent, status })
}

/// Mean and standard deviation of `published − global − Σ clipped / n̄` per coordinate.
fn residual(o: &Outcome, n_bar: f64) -> (f64, f64, usize) {
    let d = o.global.len();
    let r: Vec<f64> = (0..d)
        .map(|j| {
            let sum: f64 = o.clipped.iter().map(|c| f64::from(c[j])).sum();
            f64::from(o.published[j]) - f64::from(o.global[j]) - sum / n_bar
        })
        .collect();
    let mean = r.iter().sum::<f64>() / d as f64;
    let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d as f64;
    (mean, var.sqrt(), d)
}

/// Sample-std tolerance: 6 standard errors of a std estimated from `d` Gaussian draws.
fn assert_std(std: f64, sigma: f64, d: usize) {
    let tol = 6.0 / (2.0 * d as f64).sqrt();
    assert!(
        (std / sigma - 1.0).abs() < tol,
        "residual std {std:e}, expected σ = {sigma:e} (±{:.1}%)",
        tol * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_dp_publishes_the_clipped_sum_plus_gaussian_noise_over_the_fixed_denominator() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (z, clip) = (1.0, 0.01);
    let o = one_round_with_agents(dir.path(), privacy(DpMode::Central, z, clip)).await?;
    // On the wire: clipped to C, one example each, no side information beyond nothing.
    assert_eq!(o.sent.len(), 3);
    for s in &o.sent {
        let values = fedtune_tests::grpc::f32_values(&s.payload);
        assert!(
            l2_norm_upper_bound(&values) <= clip,
            "an upload left with norm {}",
            l2_norm_upper_bound(&values)
        );
        assert_eq!(s.num_examples, 1);
        assert!(s.metrics.is_empty(), "a private upload carried {:?}", s.metrics);
    }
    let (mean, std, d) = residual(&o, 3.0);
    let sigma = z * clip / 3.0;
    assert_std(std, sigma, d);
    assert!(mean.abs() < 6.0 * sigma / (d as f64).sqrt(), "noise is centred: mean {mean:e}");
    assert_eq!(o.status.privacy.mode, "central");
    let eps = epsilon_for_rounds(Adjacency::ReplaceOne, SamplingScheme::FixedSize, 1.0, z, 1, DELTA)?;
    assert!((o.status.privacy.epsilon / eps - 1.0).abs() < 1e-9, "{} vs {eps}", o.status.privacy.epsilon);
    assert_eq!(o.status.recent_rounds[0].epsilon, Some(o.status.privacy.epsilon));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dp_every_client_noises_its_clipped_update_and_the_coordinator_adds_nothing_more() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let (z, clip) = (0.5, 0.01);
    let o = one_round_with_agents(dir.path(), privacy(DpMode::Local, z, clip)).await?;
    let d = o.global.len();
    // Each client adds σ = z·C' on the grid the coordinator announced; three shares over n̄ = 3.
    let k = default_grid_log2(clip, d)?;
    let per_client = z * widened_sensitivity(clip, k, d)?;
    let (mean, std, d) = residual(&o, 3.0);
    assert_std(std, per_client * 3f64.sqrt() / 3.0, d);
    assert!(mean.abs() < 6.0 * per_client / (d as f64).sqrt());
    for s in &o.sent {
        let values = fedtune_tests::grpc::f32_values(&s.payload);
        // Noised on the wire: the norm is about σ√d, far beyond the clip bound.
        assert!(l2_norm_upper_bound(&values) > clip * 5.0);
        assert_eq!(s.num_examples, 1);
    }
    assert_eq!(o.status.privacy.mode, "local");
    // One round, every client drawn once: against the coordinator each client's local ε is one
    // unamplified Gaussian round, beside the central ε of the published model.
    assert_eq!(o.status.privacy.max_participations, 1);
    let local = o.status.privacy.local_epsilon.context("local ε in status")?;
    assert_eq!(local, fedtune_shared::privacy::epsilon_unamplified(z, 1, DELTA)?);
    // Both numbers per round too: the round's central ε and the worst-off client's local ε.
    assert_eq!(o.status.recent_rounds[0].epsilon, Some(o.status.privacy.epsilon));
    assert_eq!(o.status.recent_rounds[0].local_epsilon, Some(local));
    assert!(o.status.privacy.guarantee.contains("local ε"), "{}", o.status.privacy.guarantee);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dp_the_mean_is_exact_and_every_report_says_there_is_no_privacy_guarantee() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let o = one_round_with_agents(dir.path(), PrivacySettings::default()).await?;
    // Example-weighted FedAvg, no noise: the published model is the weighted mean to f32 precision.
    let weights = [10.0, 20.0, 30.0];
    let worst = (0..o.global.len())
        .map(|j| {
            let mean: f64 =
                o.clipped.iter().zip(weights).map(|(c, w)| w * f64::from(c[j])).sum::<f64>() / 60.0;
            (f64::from(o.published[j]) - f64::from(o.global[j]) - mean).abs()
        })
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "published model is off the exact mean by {worst}");
    assert!(o.sent.iter().all(|s| s.num_examples > 1), "without DP the example counts travel");
    assert_eq!(o.status.privacy.guarantee, "no privacy guarantee");
    assert_eq!(o.status.recent_rounds[0].epsilon, None);
    let out = Command::new(binary("fedtune-coordinator")?)
        .args(["privacy", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no privacy guarantee"));
    Ok(())
}

/// Settings for protocol-level scenarios: `clients` test clients, full participation.
fn full_participation(
    dir: &Path,
    rounds: u64,
    clients: usize,
    p: PrivacySettings,
) -> Result<CoordinatorSettings> {
    let model = write_fake_model(&dir.join("model"), 2, 8)?;
    let mut s = quick_settings(&dir.join("state"), &model, rounds, clients, clients);
    s.evaluation.every = 0;
    s.rounds.min_available = clients;
    s.sampling = SamplingSettings::Fraction { fraction: 1.0 };
    s.privacy = p;
    Ok(s)
}

/// Every client uploads a small update for its current fit task.
async fn play_round(clients: &mut [TestClient], n: usize) -> Result<()> {
    for (k, c) in clients.iter_mut().enumerate() {
        let task = c.wait_for_fit(WAIT).await?;
        let update: Vec<f32> = (0..n).map(|j| ((j + k) % 7) as f32 * 1e-4).collect();
        c.upload(&task, 5, &f32_bytes(&update)).await.context("upload")?;
    }
    Ok(())
}

/// Joins `site-0` and `site-1` and plays two rounds with them; returns them and the update size.
async fn two_sites_after_two_rounds(url: &str) -> Result<(Vec<TestClient>, usize)> {
    let mut clients =
        vec![TestClient::join(url, "site-0", 0).await?, TestClient::join(url, "site-1", 0).await?];
    let n = clients[0].trainable().numel();
    for _ in 0..2 {
        play_round(&mut clients, n).await?;
    }
    Ok((clients, n))
}

fn full_epsilon(z: f64, rounds: u64) -> f64 {
    epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Full, 1.0, z, rounds, DELTA).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_with_a_small_budget_stops_cleanly_when_the_next_round_would_exceed_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let z = 2.0;
    let mut p = privacy(DpMode::Central, z, 1.0);
    p.target_epsilon = Some((full_epsilon(z, 2) + full_epsilon(z, 3)) / 2.0);
    let coord = InProcess::start(full_participation(dir.path(), 10, 2, p)?).await?;
    let (mut clients, _) = two_sites_after_two_rounds(&coord.url).await?;
    let status = clients[0].wait_status(WAIT, |s| s.phase == PhaseName::Finished).await?;
    assert_eq!(status.model_version, ModelVersion(2));
    let reason = status.finished_reason.clone().unwrap_or_default();
    assert!(reason.contains("privacy budget exhausted"), "{reason}");
    assert_eq!(status.privacy.rounds_charged, 2);
    assert!(status.privacy.epsilon <= status.privacy.target_epsilon.unwrap());
    assert!((status.privacy.epsilon / full_epsilon(z, 2) - 1.0).abs() < 1e-9);
    assert_eq!(clients[0].wait_finished(WAIT).await?, ModelVersion(2));
    // The last model is the result: it exports, and the coordinator stops without error.
    let files = export(&ExportArgs {
        state_dir: dir.path().join("state"),
        round: 2,
        out: dir.path().join("final"),
        init_dir: None,
    })?;
    assert!(!files.is_empty());
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropout_that_lowers_distributed_noise_past_the_budget_publishes_nothing_and_ends_the_federation(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let z = 2.0;
    let mut p = privacy(DpMode::Distributed, z, 1.0);
    p.allow_distributed_without_secure_aggregation = true;
    // The budget admits a round at the nominal z (every share in the sum), not one at the
    // ≈ z·√(2/3) that two of three shares give.
    p.target_epsilon = Some(full_epsilon(0.9 * z, 1));
    let mut s = full_participation(dir.path(), 3, 3, p)?;
    s.rounds.min_fit = 2;
    let coord = InProcess::start(s).await?;
    let mut clients = Vec::new();
    for k in 0..3 {
        clients.push(TestClient::join(&coord.url, &format!("site-{k}"), 0).await?);
    }
    let n = clients[0].trainable().numel();
    for (k, c) in clients.iter_mut().enumerate() {
        let task = c.wait_for_fit(WAIT).await?;
        if k == 2 {
            // The third site drops out: its share of the noise never reaches the sum.
            c.report_fit_failure(&task, "training_failed").await?;
        } else {
            c.upload(&task, 1, &f32_bytes(&vec![1e-4; n])).await.context("upload")?;
        }
    }
    let status = clients[0].wait_status(WAIT, |s| s.phase == PhaseName::Finished).await?;
    let reason = status.finished_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("privacy budget exhausted") && reason.contains("nothing of it is published"),
        "{reason}"
    );
    assert!(reason.contains("of the 2 updates that arrived"), "{reason}");
    // Nothing published, nothing charged: the ledger accounts published models only.
    assert_eq!(status.model_version, ModelVersion(0));
    assert_eq!((status.privacy.rounds_charged, status.privacy.epsilon), (0, 0.0));
    // The attempt is on record as failed, with the reason; it was not retried.
    let attempts: Vec<_> =
        status.recent_rounds.iter().map(|r| (r.id.round, r.id.attempt, r.status.as_str())).collect();
    assert_eq!(attempts, vec![(1, 0, "failed")], "{:?}", status.recent_rounds);
    assert!(status.recent_rounds[0].reason.contains("privacy budget exhausted"));
    assert_eq!(status.recent_rounds[0].epsilon, None);
    assert_eq!(clients[1].wait_finished(WAIT).await?, ModelVersion(0));
    // A clean end: the coordinator stops without error.
    coord.shutdown().await?;
    let rows = ledger(&dir.path().join("state"))?;
    assert_eq!(rows["rounds"].as_array().map(Vec::len), Some(0), "{rows}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_dp_a_poisson_draw_below_min_fit_is_not_redrawn_and_the_round_is_charged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = full_participation(dir.path(), 2, 2, privacy(DpMode::Central, 1.0, 1.0))?;
    // q = 10⁻⁶ with two clients: the draws are (almost surely) empty, far below min_fit = 2.
    s.sampling = SamplingSettings::Poisson { rate: 1e-6 };
    s.rounds.max_consecutive_failures = 1;
    let coord = InProcess::start(s).await?;
    let mut clients =
        [TestClient::join(&coord.url, "site-0", 0).await?, TestClient::join(&coord.url, "site-1", 0).await?];
    // Both rounds run as drawn (one failed attempt halts the federation, so a redraw cannot hide)
    // and each is charged at the configured q, whatever the draw's size.
    assert_eq!(clients[0].wait_finished(WAIT).await?, ModelVersion(2));
    let status = clients[1].wait_status(WAIT, |s| s.phase == PhaseName::Finished).await?;
    assert_eq!(status.privacy.rounds_charged, 2);
    let expected = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Poisson, 1e-6, 1.0, 2, DELTA)?;
    assert!(
        (status.privacy.epsilon - expected).abs() <= 1e-9 * expected,
        "{} vs {expected}",
        status.privacy.epsilon
    );
    coord.shutdown().await?;
    let rows = ledger(&dir.path().join("state"))?;
    let rounds = rows["rounds"].as_array().context("ledger rounds")?;
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| r["sampled"] == 0 && r["sampling_rate"] == 1e-6), "{rounds:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_noise_is_refused_without_the_explicit_override() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = full_participation(dir.path(), 1, 2, privacy(DpMode::Distributed, 1.0, 1.0))?;
    let err = settings.validate().unwrap_err().to_string();
    assert!(err.contains("privacy.mode") && err.contains("secure aggregation"), "{err}");
    let coord = InProcess::start(settings).await?;
    match coord.task.await? {
        Err(RunError::Settings(e)) => assert!(e.to_string().contains("secure aggregation"), "{e}"),
        other => panic!("the coordinator must refuse to start, got {other:?}"),
    }

    let mut p = privacy(DpMode::Distributed, 1.0, 1.0);
    p.allow_distributed_without_secure_aggregation = true;
    let dir = tempfile::tempdir()?;
    let coord = InProcess::start(full_participation(dir.path(), 1, 2, p)?).await?;
    let mut a = TestClient::join(&coord.url, "site-0", 0).await?;
    let _b = TestClient::join(&coord.url, "site-1", 0).await?;
    let task = a.wait_for_fit(WAIT).await?;
    // Two shares: each client adds 1/√2 of the noise.
    let n = a.trainable().numel();
    let full = widened_sensitivity(1.0, default_grid_log2(1.0, n)?, n)?;
    assert!((task.privacy.noise_stddev * 2f64.sqrt() / full - 1.0).abs() < 1e-9, "{:?}", task.privacy);
    coord.shutdown().await?;
    Ok(())
}

#[test]
fn the_planning_commands_print_what_the_accountant_computes() -> Result<()> {
    let bin = binary("fedtune-coordinator")?;
    let out = Command::new(&bin)
        .args(["privacy", "--sample-rate", "0.05", "--noise-multiplier", "1.1", "--rounds", "200"])
        .args(["--delta", "1e-6", "--json"])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let lib = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Poisson, 0.05, 1.1, 200, 1e-6)?;
    assert_eq!(v["epsilon"].as_f64(), Some(lib));

    let out = Command::new(&bin)
        .args([
            "calibrate",
            "--target-epsilon",
            "2",
            "--delta",
            "1e-6",
            "--rounds",
            "200",
            "--sample-rate",
            "0.05",
        ])
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let z: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let eps = epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Poisson, 0.05, z, 200, 1e-6)?;
    assert!(eps <= 2.0 && eps > 1.99, "z = {z} gives ε = {eps}");
    Ok(())
}

fn ledger(state: &Path) -> Result<serde_json::Value> {
    let out = Command::new(binary("fedtune-coordinator")?)
        .args(["privacy", "--json", "--state-dir"])
        .arg(state)
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_survives_kill_9_and_never_shows_less_than_was_published() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let z = 1.5;
    let settings = full_participation(dir.path(), 3, 2, privacy(DpMode::Central, z, 1.0))?;
    let state = settings.storage.state_dir.clone();
    let mut coord = CoordinatorProc::start(settings, dir.path())?;
    wait_for_status(&coord.url, WAIT, |_| true).await?;
    let (mut clients, n) = two_sites_after_two_rounds(&coord.url).await?;
    wait_for_status(&coord.url, WAIT, |s| s.model_version == ModelVersion(2)).await?;
    // Round 3: one update folded, then the coordinator dies before it could publish.
    let task = clients[0].wait_for_fit(WAIT).await?;
    clients[0].upload(&task, 5, &f32_bytes(&vec![1e-4; n])).await?;
    coord.kill9();

    let after_crash = ledger(&state)?;
    assert_eq!(after_crash["rounds"].as_array().map(Vec::len), Some(2), "{after_crash:#}");
    let eps2 = after_crash["epsilon"].as_f64().unwrap();
    assert!((eps2 / full_epsilon(z, 2) - 1.0).abs() < 1e-9, "{eps2}");

    coord.restart()?;
    let status = wait_for_status(&coord.url, WAIT, |_| true).await?;
    assert_eq!(status.privacy.epsilon, eps2, "the accountant is rebuilt from the ledger");
    assert_eq!(status.privacy.rounds_charged, 2);
    for (k, c) in clients.iter_mut().enumerate() {
        c.rejoin(&format!("site-{k}"), 0).await?;
    }
    play_round(&mut clients, n).await?;
    let status = wait_for_status(&coord.url, WAIT, |s| s.model_version == ModelVersion(3)).await?;
    let eps3 = full_epsilon(z, 3);
    assert!((status.privacy.epsilon / eps3 - 1.0).abs() < 1e-9, "{} vs {eps3}", status.privacy.epsilon);
    let after = ledger(&state)?;
    let rounds: Vec<u64> =
        after["rounds"].as_array().unwrap().iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, vec![1, 2, 3]);
    coord.kill9();
    Ok(())
}

#[test]
fn simulate_reports_epsilon_per_round_and_stops_at_the_budget() -> Result<()> {
    use fedtune_tests::fixtures::write_sentiment_csv;
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 16)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 200, 5)?;
    let out = dir.path().join("out");
    let z = 2.0;
    // Full participation of 3 clients: the budget covers two rounds, not three.
    let budget = (full_epsilon(z, 2) + full_epsilon(z, 3)) / 2.0;
    let budget = budget.to_string();
    let dp =
        ["--insecure", "--dp", "central", "--noise-multiplier", "2", "--clip-norm", "0.5", "--delta", "1e-5"];
    let stdout =
        simulate_fake(&model, &data, 3, 4, &[&dp[..], &["--target-epsilon", &budget]].concat(), &out)?;
    assert!(stdout.contains("epsilon") && stdout.contains("privacy: central DP"), "{stdout}");
    assert!(stdout.contains("privacy budget exhausted"), "{stdout}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(out.join("metrics.json"))?)?;
    let eps: Vec<f64> = rows.iter().map(|r| r["epsilon"].as_f64().unwrap()).collect();
    assert_eq!(eps.len(), 2, "{rows:?}");
    for (t, e) in eps.iter().enumerate() {
        assert!((e / full_epsilon(z, t as u64 + 1) - 1.0).abs() < 1e-9, "round {}: ε = {e}", t + 1);
    }
    assert!(std::fs::read_to_string(out.join("metrics.csv"))?.lines().next().unwrap().contains("epsilon"));
    assert!(std::fs::read_to_string(out.join("metrics.svg"))?.contains("privacy ε"));

    // Without DP, the same run says so in its table and files.
    let out = dir.path().join("plain");
    let stdout = simulate_fake(&model, &data, 2, 1, &["--insecure"], &out)?;
    assert!(stdout.contains("privacy: no privacy guarantee"), "{stdout}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(out.join("metrics.json"))?)?;
    assert_eq!(rows[0]["privacy"], "no privacy guarantee");
    assert!(rows[0]["epsilon"].is_null());
    Ok(())
}

/// How each client's slot of round 1 (attempt 0) ended, from the coordinator's state database.
#[test]
fn simulate_under_local_noise_shows_both_epsilons_and_labels_evaluation_outside_the_guarantee() -> Result<()>
{
    use fedtune_tests::fixtures::write_sentiment_csv;
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 16)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 200, 5)?;
    let out = dir.path().join("out");
    let z = 2.0;
    let dp =
        ["--insecure", "--dp", "local", "--noise-multiplier", "2", "--clip-norm", "0.5", "--delta", "1e-5"];
    let stdout = simulate_fake(&model, &data, 2, 2, &[&dp[..], &["--evaluate-under-dp"]].concat(), &out)?;
    let header = stdout.lines().find(|l| l.trim_start().starts_with("round")).context("table header")?;
    assert!(header.contains("epsilon  local_eps") && header.contains("eval_loss*"), "{stdout}");
    assert!(header.ends_with("(* outside the privacy guarantee)"), "{stdout}");
    assert!(stdout.contains("evaluation (* columns) is outside the privacy guarantee"), "{stdout}");
    assert!(stdout.contains("evaluation results are outside the privacy guarantee"), "{stdout}");
    // Full participation: after round t every client has t unamplified rounds at z; the
    // published models are accounted as full participation too (no amplification either).
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(out.join("metrics.json"))?)?;
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (t, r) in rows.iter().enumerate() {
        let local = r["local_epsilon"].as_f64().context("local ε per round")?;
        let expected = fedtune_shared::privacy::epsilon_unamplified(z, t as u64 + 1, DELTA)?;
        assert!((local / expected - 1.0).abs() < 1e-9, "round {}: local ε = {local}", t + 1);
        assert!(r["epsilon"].as_f64().is_some(), "{r}");
        assert_eq!(r["eval_outside_privacy_guarantee"], true, "{r}");
        assert!(r["eval_accuracy"].as_f64().is_some(), "evaluation ran under DP: {r}");
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv"))?;
    let head = csv.lines().next().unwrap_or_default();
    assert!(head.contains(",epsilon,local_epsilon,eval_outside_privacy_guarantee,"), "{head}");
    let svg = std::fs::read_to_string(out.join("metrics.svg"))?;
    assert!(svg.contains("local ε (worst-off client)") && svg.contains("central ε (published models)"));
    assert!(svg.contains("eval (* outside the privacy guarantee)"));
    Ok(())
}

fn round_one_outcomes(state: &Path) -> Result<Vec<(String, ParticipantOutcome)>> {
    use fedtune_coordinator::storage::{participant_outcomes, Storage};
    let storage = Storage::open_existing(state)?;
    let rows = storage.call_sync(|c| participant_outcomes(c, fedtune_shared::ids::RoundId::new(1, 0)))?;
    Ok(rows.into_iter().map(|(c, o)| (c.to_string(), o)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_refuses_a_task_below_its_privacy_floor_and_the_coordinator_records_the_refusal() -> Result<()>
{
    use fedtune_client::privacy_floor::{PrivacyFloor, RequiredPrivacy};
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let state = dir.path().join("state");
    // Central noise at z = 0.8; both sites are drawn, one good update is enough for the round.
    let mut settings = quick_settings(&state, &model, 1, 2, 1);
    settings.rounds.min_available = 2;
    settings.evaluation.every = 0;
    settings.privacy = privacy(DpMode::Central, 0.8, 1.0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    fedtune_tests::identities::register(&url, &state);
    let server = tokio::spawn(fedtune_coordinator::run(settings, listener, stop.clone()));

    // site-1 asks for local noise (a weaker task than asked: refused); site-2 asks for central
    // noise at z ≥ 0.8 (satisfied: trains).
    let floors = [
        ("site-1", PrivacyFloor { require: RequiredPrivacy::Local, min_noise_multiplier: 0.0 }),
        ("site-2", PrivacyFloor { require: RequiredPrivacy::Central, min_noise_multiplier: 0.8 }),
    ];
    let mut agents = Vec::new();
    for (seed, (name, floor)) in (1u64..).zip(floors) {
        let key = fedtune_tests::identities::key_for(&url, name)?;
        let api = GrpcCoordinator::connect_lazy(&ConnectOptions::new(url.clone()))?.with_identity(key, None);
        let config = AgentConfig {
            name: Some(ClientId::parse(name)?),
            train_examples: 10,
            eval_examples: 10,
            privacy_floor: floor,
            poll_wait: Duration::from_secs(2),
            ..AgentConfig::default()
        };
        agents
            .push(tokio::spawn(Agent::new(api, config, factory(fake(seed)), CancellationToken::new()).run()));
    }
    let mut stats = Vec::new();
    for agent in agents {
        let outcome = tokio::time::timeout(Duration::from_secs(60), agent).await???;
        assert!(matches!(outcome.reason, ExitReason::Finished { .. }), "{outcome:?}");
        stats.push(outcome.stats);
    }
    stop.cancel();
    server.await??;

    assert_eq!((stats[0].fits, stats[0].bytes_downloaded, stats[0].tasks_dropped), (0, 0, 1), "{stats:?}");
    assert_eq!((stats[1].fits, stats[1].updates_accepted), (1, 1), "{stats:?}");
    let outcomes = round_one_outcomes(&state)?;
    let of = |name: &str| outcomes.iter().find(|(c, _)| c == name).map(|(_, o)| o.clone());
    // A private task: the coordinator hears the stable code and nothing else.
    let refusal = ParticipantOutcome::Failed(FailureCode::RefusedPrivacyFloor.as_str().into());
    assert_eq!(of("site-1"), Some(refusal), "{outcomes:?}");
    assert_eq!(of("site-2"), Some(ParticipantOutcome::Accepted), "{outcomes:?}");
    Ok(())
}

/// One round of central DP with one agent and evaluation after every round as configured;
/// returns how many evaluations the agent reported.
/// Runs one round with evaluation under DP on or off; returns the evaluations the site ran and
/// the final status.
async fn evaluations_under_dp(dir: &Path, enabled_under_dp: bool) -> Result<(u64, StatusReport)> {
    let model = write_fake_model(&dir.join("model"), 2, 8)?;
    let state = dir.join("state");
    let mut settings = quick_settings(&state, &model, 1, 1, 1);
    assert_eq!(settings.evaluation.every, 1);
    settings.evaluation.enabled_under_dp = enabled_under_dp;
    settings.privacy = privacy(DpMode::Central, 1.0, 1.0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    fedtune_tests::identities::register(&url, &state);
    let server = tokio::spawn(fedtune_coordinator::run(settings, listener, stop.clone()));
    let key = fedtune_tests::identities::key_for(&url, "site-1")?;
    let api = GrpcCoordinator::connect_lazy(&ConnectOptions::new(url.clone()))?.with_identity(key, None);
    let config = AgentConfig {
        name: Some(ClientId::parse("site-1")?),
        train_examples: 10,
        eval_examples: 10,
        poll_wait: Duration::from_secs(2),
        ..AgentConfig::default()
    };
    let agent = Agent::new(api, config, factory(fake(1)), CancellationToken::new()).run();
    let outcome = tokio::time::timeout(Duration::from_secs(60), agent).await??;
    assert!(matches!(outcome.reason, ExitReason::Finished { .. }), "{outcome:?}");
    assert_eq!(outcome.stats.updates_accepted, 1, "{outcome:?}");
    let status = wait_for_status(&url, WAIT, |s| s.phase == PhaseName::Finished).await?;
    stop.cancel();
    server.await??;
    Ok((outcome.stats.evaluations, status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_dp_clients_evaluate_only_when_the_operator_asks_for_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (evaluations, status) = evaluations_under_dp(&dir.path().join("default"), false).await?;
    assert_eq!(evaluations, 0);
    assert!(!status.privacy.evaluation_outside_guarantee);
    assert!(!status.privacy.guarantee.contains("outside"), "{}", status.privacy.guarantee);
    // Asked for, evaluation runs, and status says its figures are outside the guarantee.
    let (evaluations, status) = evaluations_under_dp(&dir.path().join("asked"), true).await?;
    assert_eq!(evaluations, 1);
    assert!(status.privacy.evaluation_outside_guarantee);
    assert!(
        status.privacy.guarantee.ends_with("evaluation results are outside the privacy guarantee"),
        "{}",
        status.privacy.guarantee
    );
    Ok(())
}
