//! Agent behaviour against an in-memory coordinator that can inject faults a real one cannot
//! produce on demand: refused connections, broken download streams, lost sessions. The
//! end-to-end behaviour against the real coordinator over gRPC is tested in `fedtune-tests`.
//!
//! Tests that train run on real time: the trainer works on its own OS thread, and a paused
//! tokio clock would jump to the next timer (a task deadline) while that thread computes.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use fedtune_shared::chunk::payload_digest;
use fedtune_shared::ids::{ClientId, ModelVersion, RoundId, Sha256};
use fedtune_shared::params::TensorSpec;
use fedtune_shared::round::*;
use fedtune_shared::schedule::{LrSchedule, Warmup};
use fedtune_shared::secagg::{
    AwaitedStep, KeyAdvertisement, RoundContext, RoundUnmaskAnswer, ShareUpload, StepInput,
};
use futures::stream::{self, BoxStream, StreamExt};

use super::*;
use crate::fake_trainer::{FakeTrainer, FakeTrainerConfig};
use crate::local_trainer::{EvalOutcome, FitConfig, FitOutcome};
use crate::privacy_floor::RequiredPrivacy;
use crate::transport::DownloadStream;

fn manifest() -> Manifest {
    Manifest::new(vec![
        TensorSpec { name: "classifier.weight".into(), shape: vec![2, 300_000] },
        TensorSpec { name: "classifier.bias".into(), shape: vec![2] },
    ])
    .unwrap()
}

fn model_ref(version: u64, weights: &ParameterVector) -> ModelRef {
    ModelRef {
        version: ModelVersion(version),
        full_manifest: Sha256(weights.manifest().digest()),
        full_payload: payload_digest(weights),
        trainable_manifest: Sha256(weights.manifest().digest()),
        trainable_payload: payload_digest(weights),
    }
}

fn fit_task(round: u64, model: ModelRef) -> Task {
    Task::Fit(FitTask {
        id: RoundId::new(round, 0),
        model,
        config: FitInstructions {
            epochs: 1,
            batch_size: 8,
            learning_rate: 0.1,
            proximal_mu: 0.0,
            max_steps: None,
            seed: round,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            update_encoding: Default::default(),
        },
        deadline_in: Duration::from_secs(600),
        deadline_unix_ms: 0,
        privacy: PrivacyInstructions::NONE,
        secure_aggregation: None,
    })
}

/// Faults to inject, each consumed once.
#[derive(Debug, Default)]
struct Faults {
    /// Joins refused as unavailable before one succeeds.
    refused_joins: u32,
    /// Break the next download after this many bytes.
    break_download_after: Option<usize>,
    /// Answer the next upload with "unknown session" (as after a coordinator restart).
    lose_session_on_upload: bool,
    /// Advertise this update value bound at join instead of the protocol's.
    max_abs_update_value: Option<f32>,
}

/// A single-client coordinator in memory.
#[derive(Debug)]
struct Scripted {
    weights: ParameterVector,
    tasks: Mutex<VecDeque<Task>>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<String>>,
    uploads: Mutex<Vec<(RoundId, ParameterVector)>>,
    evaluations: Mutex<Vec<EvalReport>>,
    download_offsets: Mutex<Vec<u64>>,
}

impl Scripted {
    fn new(tasks: Vec<Task>, faults: Faults) -> Self {
        let values = (0..manifest().numel()).map(|i| (i % 7) as f32 * 0.01).collect();
        Self {
            weights: ParameterVector::new(manifest(), values).unwrap(),
            tasks: Mutex::new(tasks.into()),
            faults: Mutex::new(faults),
            log: Mutex::default(),
            uploads: Mutex::default(),
            evaluations: Mutex::default(),
            download_offsets: Mutex::default(),
        }
    }

    fn note(&self, what: impl Into<String>) {
        self.log.lock().unwrap().push(what.into());
    }

    fn calls(&self, prefix: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.starts_with(prefix)).count()
    }
}

impl CoordinatorApi for Arc<Scripted> {
    async fn join(&self, request: JoinRequest) -> Result<JoinResponse, ApiError> {
        self.note("join");
        self.note(format!("counts {} {}", request.train_examples, request.eval_examples));
        let max_abs_update_value = {
            let mut f = self.faults.lock().unwrap();
            if f.refused_joins > 0 {
                f.refused_joins -= 1;
                return Err(ApiError::Unavailable("connection refused".into()));
            }
            f.max_abs_update_value.unwrap_or(fedtune_shared::limits::MAX_ABS_UPDATE_VALUE)
        };
        Ok(JoinResponse {
            client_id: ClientId::parse("site-a").unwrap(),
            session_token: "t".into(),
            protocol_version: fedtune_shared::pb::PROTOCOL_VERSION,
            heartbeat_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(10),
            model: model_ref(0, &self.weights),
            trainable_manifest: manifest(),
            limits: Limits {
                max_message_bytes: 5 << 20,
                max_chunk_bytes: 4 << 20,
                default_chunk_bytes: 1 << 20,
                max_abs_update_value,
            },
            labels: vec!["0".into(), "1".into()],
            adapter: None,
            init_seed: None,
        })
    }

    async fn wait_for_task(&self, _max_wait: Duration) -> Result<Task, ApiError> {
        self.note("poll");
        Ok(self
            .tasks
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Task::Finished { final_version: ModelVersion(9), reason: "script over".into() }))
    }

    async fn heartbeat(&self, beat: Heartbeat) -> Result<HeartbeatReply, ApiError> {
        self.note("heartbeat");
        Ok(HeartbeatReply {
            phase: PhaseName::Training,
            round: RoundId::new(beat.round.unwrap_or(0), 0),
            model_version: ModelVersion(0),
            task_still_wanted: true,
        })
    }

    async fn download(&self, request: DownloadRequest) -> Result<DownloadStream, ApiError> {
        self.note("download");
        self.download_offsets.lock().unwrap().push(request.offset);
        let bytes = self.weights.to_le_bytes();
        let header = DownloadItem::Header(ModelHeader {
            version: request.version,
            scope: request.scope,
            manifest: manifest(),
            total_bytes: bytes.len() as u64,
            payload_digest: payload_digest(&self.weights),
            start_offset: request.offset,
            encoding: ModelEncoding::F32,
        });
        let cut = self.faults.lock().unwrap().break_download_after.take();
        let end = cut.map_or(bytes.len(), |c| c.min(bytes.len()));
        let mut items: Vec<Result<DownloadItem, ApiError>> = vec![Ok(header)];
        let mut at = request.offset as usize;
        while at < end {
            let n = (end - at).min(1 << 20);
            items.push(Ok(DownloadItem::Chunk(Chunk {
                offset: at as u64,
                data: Bytes::copy_from_slice(&bytes[at..at + n]),
            })));
            at += n;
        }
        if cut.is_some() {
            items.push(Err(ApiError::Unavailable("stream reset".into())));
        }
        Ok(stream::iter(items).boxed())
    }

    async fn upload(&self, items: BoxStream<'static, UploadItem>) -> Result<UploadReceipt, ApiError> {
        self.note("upload");
        let items: Vec<UploadItem> = items.collect().await;
        if std::mem::take(&mut self.faults.lock().unwrap().lose_session_on_upload) {
            return Err(ApiError::Unauthenticated("unknown session".into()));
        }
        let (UploadItem::Header(h), UploadItem::Trailer(t)) = (&items[0], &items[items.len() - 1]) else {
            return Err(ApiError::Invalid("bad framing".into()));
        };
        let mut payload = Vec::new();
        for item in &items[1..items.len() - 1] {
            let UploadItem::Chunk(c) = item else { return Err(ApiError::Invalid("bad framing".into())) };
            payload.extend_from_slice(&c.data);
        }
        if Sha256::of(&payload) != t.payload_digest {
            return Err(ApiError::DataLoss("digest".into()));
        }
        let delta = ParameterVector::from_le_bytes(manifest(), &payload).unwrap();
        self.uploads.lock().unwrap().push((h.id, delta));
        Ok(UploadReceipt { id: h.id, received_bytes: payload.len() as u64 })
    }

    async fn upload_masked(
        &self,
        _secagg_context: [u8; 32],
        _items: BoxStream<'static, UploadItem>,
    ) -> Result<UploadReceipt, ApiError> {
        Err(ApiError::Invalid("this script runs no secure round (see secure_tests)".into()))
    }

    async fn advertise_keys(&self, _keys: KeyAdvertisement) -> Result<(), ApiError> {
        Err(ApiError::Invalid("this script runs no secure round (see secure_tests)".into()))
    }

    async fn send_shares(&self, _shares: ShareUpload) -> Result<(), ApiError> {
        Err(ApiError::Invalid("this script runs no secure round (see secure_tests)".into()))
    }

    async fn await_secagg_step(
        &self,
        _ctx: &RoundContext,
        _step: AwaitedStep,
        _max_wait: Duration,
    ) -> Result<StepInput, ApiError> {
        Err(ApiError::Invalid("this script runs no secure round (see secure_tests)".into()))
    }

    async fn answer_unmask(&self, _answer: RoundUnmaskAnswer) -> Result<(), ApiError> {
        Err(ApiError::Invalid("this script runs no secure round (see secure_tests)".into()))
    }

    async fn report_evaluation(&self, report: EvalReport) -> Result<(), ApiError> {
        self.note("evaluation");
        self.evaluations.lock().unwrap().push(report);
        Ok(())
    }

    async fn report_failure(&self, report: FailureReport) -> Result<(), ApiError> {
        self.note(format!("failure {}", report.reason));
        Ok(())
    }

    async fn leave(&self) -> Result<(), ApiError> {
        self.note("leave");
        Ok(())
    }

    async fn status(&self, _recent_rounds: u32) -> Result<StatusReport, ApiError> {
        Err(ApiError::Unavailable("not scripted".into()))
    }
}

fn fake_factory(seed: u64) -> TrainerFactory {
    Box::new(move |spec: &TrainerSpec| {
        let trainer =
            FakeTrainer::new(spec.trainable.clone(), FakeTrainerConfig { seed, ..Default::default() });
        Ok(Box::new(trainer) as Box<dyn LocalTrainer>)
    })
}

fn config() -> AgentConfig {
    AgentConfig {
        name: Some(ClientId::parse("site-a").unwrap()),
        train_examples: 100,
        eval_examples: 20,
        backoff: BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.0,
        },
        ..AgentConfig::default()
    }
}

async fn run(coordinator: &Arc<Scripted>) -> AgentOutcome {
    Agent::new(Arc::clone(coordinator), config(), fake_factory(1), CancellationToken::new())
        .run()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_agent_trains_uploads_the_delta_and_stops_when_the_federation_finishes() {
    let c = Arc::new(Scripted::new(vec![], Faults::default()));
    let model = model_ref(0, &c.weights);
    c.tasks.lock().unwrap().extend([fit_task(1, model)]);
    let outcome = run(&c).await;
    assert!(matches!(outcome.reason, ExitReason::Finished { .. }), "{outcome:?}");
    assert_eq!((outcome.stats.fits, outcome.stats.updates_accepted), (1, 1));

    // The upload is exactly local − global, with local what the trainer computes.
    let mut trainer = FakeTrainer::new(manifest(), FakeTrainerConfig { seed: 1, ..Default::default() });
    let local = trainer.fit(&c.weights, &FitConfig::default()).unwrap().weights;
    let expected = crate::update::delta(&c.weights, &local).unwrap();
    let uploads = c.uploads.lock().unwrap();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].0, RoundId::new(1, 0));
    assert_eq!(uploads[0].1, expected);
    assert_eq!(c.calls("leave"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_coordinator_is_retried_with_backoff_until_it_answers() {
    let c = Arc::new(Scripted::new(vec![], Faults { refused_joins: 4, ..Faults::default() }));
    let start = Instant::now();
    let outcome = run(&c).await;
    assert_eq!(c.calls("join"), 5);
    assert_eq!(outcome.stats.joins, 1);
    // 100 + 200 + 400 + 800 ms of backoff, no jitter, on the paused clock.
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
}

#[tokio::test]
async fn a_broken_download_resumes_from_the_bytes_already_held() {
    let c =
        Arc::new(Scripted::new(vec![], Faults { break_download_after: Some(3 << 19), ..Faults::default() }));
    let model = model_ref(0, &c.weights);
    c.tasks.lock().unwrap().extend([fit_task(1, model)]);
    let outcome = run(&c).await;
    assert_eq!(*c.download_offsets.lock().unwrap(), vec![0, 3 << 19]);
    // Every byte crossed the wire once.
    assert_eq!(outcome.stats.bytes_downloaded, manifest().byte_len() as u64);
    assert_eq!(outcome.stats.updates_accepted, 1);
}

#[tokio::test]
async fn after_losing_its_session_mid_upload_the_agent_rejoins_and_resends_without_retraining() {
    let c = Arc::new(Scripted::new(vec![], Faults { lose_session_on_upload: true, ..Faults::default() }));
    let model = model_ref(0, &c.weights);
    // The restarted coordinator hands out the same round again.
    c.tasks.lock().unwrap().extend([fit_task(1, model), fit_task(1, model)]);
    let outcome = run(&c).await;
    assert_eq!(outcome.stats.joins, 2);
    assert_eq!(outcome.stats.fits, 1, "the prepared update is reused");
    assert_eq!(c.calls("upload"), 2);
    assert_eq!(c.uploads.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_model_whose_bytes_do_not_match_the_task_digest_is_never_trained_on() {
    let c = Arc::new(Scripted::new(vec![], Faults::default()));
    let mut model = model_ref(0, &c.weights);
    model.trainable_payload = Sha256([9; 32]);
    c.tasks.lock().unwrap().extend([fit_task(1, model)]);
    let outcome = run(&c).await;
    assert_eq!(outcome.stats.fits, 0);
    assert!(c.uploads.lock().unwrap().is_empty());
    assert!(c.calls("failure") >= 1, "the task is reported failed: {:?}", c.log.lock().unwrap());
}

/// The fake trainer, keeping every configuration a fit was asked to train with.
#[derive(Debug)]
struct Recording {
    inner: FakeTrainer,
    fits: Arc<Mutex<Vec<FitConfig>>>,
}

impl LocalTrainer for Recording {
    fn trainable_manifest(&self) -> Manifest {
        self.inner.trainable_manifest()
    }

    fn fit(&mut self, global: &ParameterVector, config: &FitConfig) -> Result<FitOutcome, TrainerError> {
        self.fits.lock().unwrap().push(config.clone());
        self.inner.fit(global, config)
    }

    fn evaluate(&mut self, global: &ParameterVector) -> Result<EvalOutcome, TrainerError> {
        self.inner.evaluate(global)
    }
}

#[tokio::test]
async fn the_fit_tasks_learning_rate_schedule_reaches_the_trainer() {
    let c = Arc::new(Scripted::new(vec![], Faults::default()));
    let mut task = fit_task(1, model_ref(0, &c.weights));
    if let Task::Fit(fit) = &mut task {
        (fit.config.lr_schedule, fit.config.warmup_steps) = (LrSchedule::Cosine, 5);
    }
    c.tasks.lock().unwrap().push_back(task);
    let fits = Arc::new(Mutex::new(Vec::new()));
    let recorder = Arc::clone(&fits);
    let factory: TrainerFactory = Box::new(move |spec: &TrainerSpec| {
        let inner = FakeTrainer::new(spec.trainable.clone(), FakeTrainerConfig::default());
        Ok(Box::new(Recording { inner, fits: recorder }) as Box<dyn LocalTrainer>)
    });
    let outcome =
        Agent::new(Arc::clone(&c), config(), factory, CancellationToken::new()).run().await.unwrap();
    assert_eq!(outcome.stats.fits, 1);
    let fits = fits.lock().unwrap();
    assert_eq!(fits.len(), 1);
    assert_eq!((fits[0].lr_schedule, fits[0].warmup), (LrSchedule::Cosine, Warmup::Steps(5)));
    assert_eq!((fits[0].learning_rate, fits[0].round), (0.1, 1), "the rest of the task came along");
}

#[tokio::test]
async fn an_evaluation_task_reports_the_trainer_metrics_for_that_model_version() {
    let c = Arc::new(Scripted::new(vec![], Faults::default()));
    let model = model_ref(0, &c.weights);
    c.tasks.lock().unwrap().push_back(Task::Evaluate(EvaluateTask {
        round: 0,
        model,
        batch_size: 8,
        deadline_in: Duration::from_secs(60),
        deadline_unix_ms: 0,
    }));
    let outcome = run(&c).await;
    assert_eq!(outcome.stats.evaluations, 1);
    let mut trainer = FakeTrainer::new(manifest(), FakeTrainerConfig { seed: 1, ..Default::default() });
    let expected = trainer.evaluate(&c.weights).unwrap();
    let reports = c.evaluations.lock().unwrap();
    assert_eq!(reports[0].model_version, ModelVersion(0));
    assert_eq!((reports[0].num_examples, reports[0].loss), (expected.num_examples, expected.loss));
}

#[tokio::test]
async fn a_task_asking_for_privacy_this_agent_cannot_provide_is_refused_not_sent_raw() {
    let c = Arc::new(Scripted::new(vec![], Faults::default()));
    let model = model_ref(0, &c.weights);
    let Task::Fit(mut task) = fit_task(1, model) else { unreachable!() };
    // Local noise with σ = 0 cannot be honoured: the update would leave un-noised.
    task.privacy = PrivacyInstructions {
        mode: PrivacyMode::Local,
        clip_norm: 1.0,
        noise_stddev: 0.0,
        ..PrivacyInstructions::NONE
    };
    c.tasks.lock().unwrap().push_back(Task::Fit(task));
    let outcome = run(&c).await;
    assert_eq!(outcome.stats.fits, 0);
    assert!(c.uploads.lock().unwrap().is_empty());
    // A private task: the coordinator hears the code alone.
    assert_eq!(c.calls("failure update_refused"), 1, "{:?}", c.log.lock().unwrap());
    assert_eq!(c.calls("failure update_refused:"), 0, "{:?}", c.log.lock().unwrap());
}

#[tokio::test]
async fn a_task_below_the_privacy_floor_is_refused_before_download_and_reported_as_a_refusal() {
    let c = Arc::new(Scripted::new(vec![], Faults::default()));
    let model = model_ref(0, &c.weights);
    let Task::Fit(mut task) = fit_task(1, model) else { unreachable!() };
    // Central noise at z = 0.5 where the site asks for local noise at z ≥ 1.
    task.privacy = PrivacyInstructions {
        mode: PrivacyMode::Central,
        clip_norm: 1.0,
        noise_multiplier: 0.5,
        ..PrivacyInstructions::NONE
    };
    c.tasks.lock().unwrap().push_back(Task::Fit(task));
    let floor = PrivacyFloor { require: RequiredPrivacy::Local, min_noise_multiplier: 1.0 };
    let cfg = AgentConfig { privacy_floor: floor, ..config() };
    let outcome =
        Agent::new(Arc::clone(&c), cfg, fake_factory(1), CancellationToken::new()).run().await.unwrap();
    let log = c.log.lock().unwrap().clone();
    assert_eq!((outcome.stats.fits, outcome.stats.tasks_dropped), (0, 1), "{log:?}");
    assert_eq!(c.calls("download"), 0, "{log:?}");
    assert!(log.contains(&"failure refused_privacy_floor".to_string()), "{log:?}");
    // A site that expects privacy says only that it has examples, not how many.
    assert!(log.contains(&"counts 1 1".to_string()), "{log:?}");
}

#[tokio::test]
async fn without_a_floor_the_join_sends_the_example_counts() {
    let c = Arc::new(Scripted::new(vec![], Faults::default()));
    run(&c).await;
    assert_eq!(c.calls("counts 100 20"), 1, "{:?}", c.log.lock().unwrap());
}

#[tokio::test]
async fn an_update_beyond_the_bound_the_coordinator_advertised_is_refused_before_streaming() {
    // A coordinator stricter than any update: the agent checks against what it advertised, not
    // against a bound of its own.
    let faults = Faults { max_abs_update_value: Some(1e-12), ..Faults::default() };
    let c = Arc::new(Scripted::new(vec![], faults));
    let model = model_ref(0, &c.weights);
    c.tasks.lock().unwrap().extend([fit_task(1, model)]);
    let outcome = run(&c).await;
    assert!(matches!(outcome.reason, ExitReason::Finished { .. }), "{outcome:?}");
    assert!(c.uploads.lock().unwrap().is_empty(), "nothing is streamed");
    // No DP: the detail travels with the code.
    assert_eq!(c.calls("failure update_out_of_range: "), 1, "{:?}", c.log.lock().unwrap());
}

#[tokio::test(start_paused = true)]
async fn shutdown_while_waiting_for_work_leaves_cleanly() {
    let c = Arc::new(Scripted::new(vec![], Faults { refused_joins: u32::MAX, ..Faults::default() }));
    let token = CancellationToken::new();
    let agent = Agent::new(Arc::clone(&c), config(), fake_factory(1), token.clone());
    let handle = tokio::spawn(agent.run());
    tokio::time::sleep(Duration::from_secs(30)).await;
    token.cancel();
    let outcome = handle.await.unwrap().unwrap();
    assert_eq!(outcome.reason, ExitReason::Shutdown);
    assert_eq!(outcome.stats.joins, 0);
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_reaches_the_coordinator_gives_up_when_told_to() {
    let c = Arc::new(Scripted::new(vec![], Faults { refused_joins: u32::MAX, ..Faults::default() }));
    let cfg = AgentConfig { give_up_after: Some(Duration::from_secs(5)), ..config() };
    let err =
        Agent::new(Arc::clone(&c), cfg, fake_factory(1), CancellationToken::new()).run().await.unwrap_err();
    assert!(matches!(err, AgentError::GaveUp(_)), "{err}");
}
