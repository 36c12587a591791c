//! Agents through a secure round against an in-memory coordinator that runs the real
//! `fedtune_shared::secagg::Aggregator`: what the coordinator unmasks is the sum of what the
//! clients trained, and the ways a secure task ends early.

use std::collections::BTreeSet;
use std::sync::Mutex;

use bytes::Bytes;
use fedtune_shared::chunk::payload_digest;
use fedtune_shared::crypto::{KeyPair, PublicKey};
use fedtune_shared::ids::{ClientId, ModelVersion, RoundId, Sha256};
use fedtune_shared::params::TensorSpec;
use fedtune_shared::privacy::clip_l2;
use fedtune_shared::round::*;
use fedtune_shared::secagg::{
    encoding::from_le_bytes, Aggregator, AwaitedStep, KeyAdvertisement, MaskedInput, PeerKeys, RoundContext,
    RoundRef, RoundSetup, RoundUnmaskAnswer, RoundUnmaskRequest, SecureTask, ShareDelivery, ShareUpload,
    Slot, StepInput, UnmaskRequest,
};
use futures::stream::{self, BoxStream, StreamExt};

use super::*;
use crate::fake_trainer::{FakeTrainer, FakeTrainerConfig};
use crate::transport::DownloadStream;

const CLIP_NORM: f64 = 10.0;
const GRID_LOG2: i32 = -16;

fn manifest() -> Manifest {
    Manifest::new(vec![
        TensorSpec { name: "classifier.weight".into(), shape: vec![2, 3_000] },
        TensorSpec { name: "classifier.bias".into(), shape: vec![2] },
    ])
    .unwrap()
}

fn name(i: usize) -> ClientId {
    ClientId::parse(&format!("site-{i}")).unwrap()
}

/// What the in-memory coordinator does with the secure calls.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Run the round with the real aggregator.
    #[default]
    Aggregate,
    /// Answer every wait with `ABORTED` (the attempt ended).
    AbortWaits,
}

#[derive(Debug, Default)]
struct Round {
    aggregator: Option<Aggregator>,
    advertised: BTreeSet<Slot>,
    peer_keys_ready: bool,
    shared: BTreeSet<Slot>,
    sharers: Option<Vec<Slot>>,
    masked: BTreeSet<Slot>,
    masked_uploads: Vec<(Slot, Vec<u32>)>,
    unmask: Option<UnmaskRequest>,
    answered: BTreeSet<Slot>,
    sum: Option<Vec<u32>>,
}

/// The coordinator of one secure round for the clients in `ctx`'s roster.
#[derive(Debug)]
struct Hub {
    weights: ParameterVector,
    secure: Arc<SecureTask>,
    ctx: Arc<RoundContext>,
    script: Script,
    /// How many clients take part (the rest of the roster never shows up).
    participants: usize,
    privacy: PrivacyInstructions,
    handed_out: Mutex<BTreeSet<ClientId>>,
    round: Mutex<Round>,
    log: Mutex<Vec<String>>,
}

impl Hub {
    fn new(
        roster: Vec<(ClientId, PublicKey)>,
        participants: usize,
        sigma_grid: f64,
        script: Script,
    ) -> Arc<Self> {
        let values = (0..manifest().numel()).map(|i| (i % 7) as f32 * 0.01).collect();
        let setup = RoundSetup {
            federation_id: "fed".into(),
            round: 1,
            attempt: 0,
            members: roster,
            threshold: 2,
            degree: 2,
            graph_seed: [7; 32],
            vector_len: manifest().numel(),
        };
        let ctx = Arc::new(RoundContext::new(setup.clone()).unwrap());
        let secure = Arc::new(SecureTask {
            setup,
            grid_log2: GRID_LOG2,
            clip_norm: CLIP_NORM,
            noise_sigma_grid: sigma_grid,
            max_wrap_probability: 1e-9,
        });
        let round = Round { aggregator: Some(Aggregator::new(Arc::clone(&ctx))), ..Round::default() };
        Arc::new(Hub {
            weights: ParameterVector::new(manifest(), values).unwrap(),
            secure,
            ctx,
            script,
            participants,
            privacy: PrivacyInstructions::NONE,
            handed_out: Mutex::default(),
            round: Mutex::new(round),
            log: Mutex::default(),
        })
    }

    fn task(&self) -> FitTask {
        FitTask {
            id: RoundId::new(1, 0),
            model: ModelRef {
                version: ModelVersion(0),
                full_manifest: Sha256(manifest().digest()),
                full_payload: payload_digest(&self.weights),
                trainable_manifest: Sha256(manifest().digest()),
                trainable_payload: payload_digest(&self.weights),
            },
            config: FitInstructions {
                epochs: 1,
                batch_size: 8,
                learning_rate: 0.1,
                proximal_mu: 0.0,
                max_steps: None,
                seed: 1,
                lr_schedule: fedtune_shared::schedule::LrSchedule::Constant,
                warmup_steps: 0,
                update_encoding: Default::default(),
            },
            deadline_in: Duration::from_secs(120),
            deadline_unix_ms: 0,
            privacy: self.privacy,
            secure_aggregation: Some(Arc::clone(&self.secure)),
        }
    }

    fn note(&self, what: impl Into<String>) {
        self.log.lock().unwrap().push(what.into());
    }

    fn failures(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.starts_with("failure")).cloned().collect()
    }
}

/// One client's connection to the hub.
#[derive(Debug, Clone)]
struct Link {
    hub: Arc<Hub>,
    me: ClientId,
}

impl Link {
    fn slot(&self) -> Result<Slot, ApiError> {
        self.hub.ctx.slot_of(&self.me).ok_or_else(|| ApiError::Denied("not in the roster".into()))
    }

    fn refused(e: impl std::fmt::Display) -> ApiError {
        ApiError::Invalid(e.to_string())
    }

    /// What `step` needs, if ready.
    fn ready(&self, step: AwaitedStep) -> Result<Option<StepInput>, ApiError> {
        let slot = self.slot()?;
        let round = self.hub.round.lock().unwrap();
        let aggregator = round.aggregator.as_ref();
        let at = RoundRef::of(&self.hub.ctx);
        Ok(match step {
            AwaitedStep::PeerKeys if round.peer_keys_ready => Some(StepInput::PeerKeys(PeerKeys {
                round: at,
                keys: aggregator.map(|a| a.keys_for(slot)).unwrap_or_default(),
            })),
            AwaitedStep::Shares => round.sharers.clone().map(|sharers| {
                StepInput::Shares(ShareDelivery {
                    round: at,
                    bundles: aggregator.map(|a| a.shares_for(slot)).unwrap_or_default(),
                    sharers,
                })
            }),
            AwaitedStep::Unmask => round
                .unmask
                .clone()
                .map(|request| StepInput::Unmask(RoundUnmaskRequest { round: at, request })),
            _ => None,
        })
    }
}

impl CoordinatorApi for Link {
    async fn join(&self, _request: JoinRequest) -> Result<JoinResponse, ApiError> {
        Ok(JoinResponse {
            client_id: self.me.clone(),
            session_token: "t".into(),
            protocol_version: fedtune_shared::pb::PROTOCOL_VERSION,
            heartbeat_interval: Duration::from_millis(200),
            liveness_timeout: Duration::from_secs(10),
            model: self.hub.task().model,
            trainable_manifest: manifest(),
            limits: Limits {
                max_message_bytes: 5 << 20,
                max_chunk_bytes: 4 << 20,
                default_chunk_bytes: 1 << 20,
                max_abs_update_value: fedtune_shared::limits::MAX_ABS_UPDATE_VALUE,
            },
            labels: vec!["0".into(), "1".into()],
            adapter: None,
            init_seed: None,
        })
    }

    async fn wait_for_task(&self, _max_wait: Duration) -> Result<Task, ApiError> {
        if self.hub.handed_out.lock().unwrap().insert(self.me.clone()) {
            return Ok(Task::Fit(self.hub.task()));
        }
        Ok(Task::Finished { final_version: ModelVersion(1), reason: "script over".into() })
    }

    async fn heartbeat(&self, beat: Heartbeat) -> Result<HeartbeatReply, ApiError> {
        self.hub.note(format!("heartbeat {} {}", self.me, beat.activity));
        Ok(HeartbeatReply {
            phase: PhaseName::Training,
            round: RoundId::new(1, 0),
            model_version: ModelVersion(0),
            task_still_wanted: true,
        })
    }

    async fn download(&self, request: DownloadRequest) -> Result<DownloadStream, ApiError> {
        self.hub.note(format!("download {}", self.me));
        let bytes = self.hub.weights.to_le_bytes();
        let header = DownloadItem::Header(ModelHeader {
            version: request.version,
            scope: request.scope,
            manifest: manifest(),
            total_bytes: bytes.len() as u64,
            payload_digest: payload_digest(&self.hub.weights),
            start_offset: 0,
            encoding: ModelEncoding::F32,
        });
        let chunk = DownloadItem::Chunk(Chunk { offset: 0, data: Bytes::from(bytes) });
        Ok(stream::iter([Ok(header), Ok(chunk)]).boxed())
    }

    async fn upload(&self, _items: BoxStream<'static, UploadItem>) -> Result<UploadReceipt, ApiError> {
        Err(ApiError::Invalid("a secure round takes masked uploads only".into()))
    }

    async fn upload_masked(
        &self,
        secagg_context: [u8; 32],
        items: BoxStream<'static, UploadItem>,
    ) -> Result<UploadReceipt, ApiError> {
        let slot = self.slot()?;
        if secagg_context != *self.hub.ctx.digest() {
            return Err(ApiError::Invalid("another round's context".into()));
        }
        let items: Vec<UploadItem> = items.collect().await;
        let (UploadItem::Header(h), UploadItem::Trailer(t)) = (&items[0], &items[items.len() - 1]) else {
            return Err(ApiError::Invalid("bad framing".into()));
        };
        let mut payload = Vec::new();
        for item in &items[1..items.len() - 1] {
            let UploadItem::Chunk(c) = item else { return Err(ApiError::Invalid("bad framing".into())) };
            payload.extend_from_slice(&c.data);
        }
        if Sha256::of(&payload) != t.payload_digest || payload.len() as u64 != h.total_bytes {
            return Err(ApiError::DataLoss("digest".into()));
        }
        let values = from_le_bytes(&payload).map_err(Self::refused)?;
        let mut round = self.round.lock().unwrap();
        round.masked_uploads.push((slot, values.clone()));
        let aggregator = round.aggregator.as_mut().unwrap();
        aggregator.accept_masked_input(MaskedInput { sender: slot, values }).map_err(Self::refused)?;
        round.masked.insert(slot);
        if round.masked.len() == self.hub.participants {
            let request = round.aggregator.as_mut().unwrap().close_masking().map_err(Self::refused)?;
            round.unmask = Some(request);
        }
        Ok(UploadReceipt { id: h.id, received_bytes: payload.len() as u64 })
    }

    async fn advertise_keys(&self, keys: KeyAdvertisement) -> Result<(), ApiError> {
        let slot = self.slot()?;
        keys.round.check(&self.hub.ctx).map_err(Self::refused)?;
        let mut round = self.round.lock().unwrap();
        round.aggregator.as_mut().unwrap().accept_keys(slot, keys.keys).map_err(Self::refused)?;
        round.advertised.insert(slot);
        if round.advertised.len() == self.hub.participants {
            round.aggregator.as_mut().unwrap().close_advertising().map_err(Self::refused)?;
            round.peer_keys_ready = true;
        }
        Ok(())
    }

    async fn send_shares(&self, shares: ShareUpload) -> Result<(), ApiError> {
        let slot = self.slot()?;
        shares.round.check(&self.hub.ctx).map_err(Self::refused)?;
        let mut round = self.round.lock().unwrap();
        round.aggregator.as_mut().unwrap().accept_shares(slot, shares.bundles).map_err(Self::refused)?;
        round.shared.insert(slot);
        if round.shared.len() == self.hub.participants {
            let sharers = round.aggregator.as_mut().unwrap().close_sharing().map_err(Self::refused)?;
            round.sharers = Some(sharers);
        }
        Ok(())
    }

    async fn await_secagg_step(
        &self,
        ctx: &RoundContext,
        step: AwaitedStep,
        max_wait: Duration,
    ) -> Result<StepInput, ApiError> {
        self.hub.note(format!("await {} {step}", self.me));
        if self.hub.script == Script::AbortWaits {
            return Err(ApiError::AttemptOver("round 1 attempt 0 failed".into()));
        }
        assert_eq!(ctx.digest(), self.hub.ctx.digest(), "the client waits in the round it was given");
        let until = Instant::now() + max_wait;
        while Instant::now() < until {
            if let Some(input) = self.ready(step)? {
                return Ok(input);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(StepInput::Pending)
    }

    async fn answer_unmask(&self, answer: RoundUnmaskAnswer) -> Result<(), ApiError> {
        let slot = self.slot()?;
        answer.round.check(&self.hub.ctx).map_err(Self::refused)?;
        let mut round = self.round.lock().unwrap();
        round.aggregator.as_mut().unwrap().accept_unmask_answer(answer.answer).map_err(Self::refused)?;
        round.answered.insert(slot);
        if round.answered.len() == self.hub.participants {
            let sum = round.aggregator.take().unwrap().finish().map_err(Self::refused)?;
            round.sum = Some(sum);
        }
        Ok(())
    }

    async fn report_evaluation(&self, _report: EvalReport) -> Result<(), ApiError> {
        Ok(())
    }

    async fn report_failure(&self, report: FailureReport) -> Result<(), ApiError> {
        self.hub.note(format!("failure {}: {}", self.me, report.reason));
        Ok(())
    }

    async fn leave(&self) -> Result<(), ApiError> {
        Ok(())
    }

    async fn status(&self, _recent_rounds: u32) -> Result<StatusReport, ApiError> {
        Err(ApiError::Unavailable("not scripted".into()))
    }
}

impl std::ops::Deref for Link {
    type Target = Hub;
    fn deref(&self) -> &Hub {
        &self.hub
    }
}

fn seed(i: usize) -> u64 {
    10 + i as u64
}

fn agent(hub: &Arc<Hub>, i: usize, key: Arc<KeyPair>) -> Agent<Link> {
    slow_agent(hub, i, key, Duration::ZERO)
}

/// An agent whose training takes `fit_delay`.
fn slow_agent(hub: &Arc<Hub>, i: usize, key: Arc<KeyPair>, fit_delay: Duration) -> Agent<Link> {
    let factory: TrainerFactory = Box::new(move |spec: &TrainerSpec| {
        let config = FakeTrainerConfig { seed: seed(i), fit_delay, ..Default::default() };
        Ok(Box::new(FakeTrainer::new(spec.trainable.clone(), config)) as Box<dyn LocalTrainer>)
    });
    let config = AgentConfig {
        name: Some(name(i)),
        train_examples: 100,
        poll_wait: Duration::from_secs(2),
        identity: Some(key),
        ..AgentConfig::default()
    };
    Agent::new(Link { hub: Arc::clone(hub), me: name(i) }, config, factory, CancellationToken::new())
}

fn keys(n: usize) -> Vec<Arc<KeyPair>> {
    (0..n).map(|_| Arc::new(KeyPair::generate_ephemeral().unwrap())).collect()
}

fn roster(keys: &[Arc<KeyPair>]) -> Vec<(ClientId, PublicKey)> {
    keys.iter().enumerate().map(|(i, k)| (name(i), k.public_key())).collect()
}

/// The clipped delta client `i` computes from the hub's weights.
fn clipped_delta(hub: &Hub, i: usize) -> Vec<f32> {
    let mut trainer = FakeTrainer::new(manifest(), FakeTrainerConfig { seed: seed(i), ..Default::default() });
    let local = trainer.fit(&hub.weights, &crate::local_trainer::FitConfig::default()).unwrap().weights;
    let mut delta = crate::update::delta(&hub.weights, &local).unwrap().into_parts().1;
    clip_l2(&mut delta, CLIP_NORM);
    delta
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_complete_a_secure_round_and_the_unmasked_sum_is_the_sum_of_their_clipped_updates() {
    let keys = keys(3);
    let hub = Hub::new(roster(&keys), 3, 0.0, Script::Aggregate);
    // The third client trains slowly: the others wait for the delivered shares meanwhile.
    let delay = |i| if i == 2 { Duration::from_millis(1500) } else { Duration::ZERO };
    let runs = (0..3).map(|i| slow_agent(&hub, i, Arc::clone(&keys[i]), delay(i)).run());
    let outcomes = futures::future::join_all(runs).await;
    for outcome in outcomes {
        let outcome = outcome.unwrap();
        assert_eq!((outcome.stats.fits, outcome.stats.updates_accepted), (1, 1), "{outcome:?}");
    }
    assert!(hub.failures().is_empty(), "{:?}", hub.failures());
    let log = hub.log.lock().unwrap().clone();
    // Keys and shares go out before the model is fetched.
    let first_download = log.iter().position(|l| l.starts_with("download")).unwrap();
    let first_wait = log.iter().position(|l| l.starts_with("await")).unwrap();
    assert!(first_wait < first_download, "{log:?}");
    // Waiting for a step is work in progress: the coordinator keeps hearing from the client.
    assert!(log.iter().any(|l| l == "heartbeat site-0 uploading"), "{log:?}");

    let round = hub.round.lock().unwrap();
    let sum = round.sum.as_ref().expect("the round was unmasked");
    let encoding = hub.secure.encoding().unwrap();
    let decoded = encoding.decode(sum, 3).unwrap();
    let deltas: Vec<Vec<f32>> = (0..3).map(|i| clipped_delta(&hub, i)).collect();
    // Randomized rounding moves each client's coordinate by less than one grid step.
    let step = 2f64.powi(GRID_LOG2);
    for (j, got) in decoded.iter().enumerate() {
        let want: f64 = deltas.iter().map(|d| f64::from(d[j])).sum();
        assert!((f64::from(*got) - want).abs() <= 3.0 * step + 1e-6, "coordinate {j}: {got} vs {want}");
    }
    assert!(deltas[0].iter().any(|v| v.abs() > 100.0 * step as f32), "the updates are not trivially zero");
    // A single masked upload decodes to nothing plausible: the masks hide it.
    for (slot, masked) in &round.masked_uploads {
        assert!(encoding.decode_integers(masked, 1).is_err(), "upload of {slot} is readable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_distributed_noise_each_client_adds_its_share_in_the_ring_and_no_f32_noise() {
    let keys = keys(3);
    let sigma_grid = 40.0;
    let mut hub = Hub::new(roster(&keys), 3, sigma_grid, Script::Aggregate);
    // An f32 noise stage would add σ = 0.5 per client: thousands of grid steps, unmissable.
    Arc::get_mut(&mut hub).unwrap().privacy = PrivacyInstructions {
        mode: PrivacyMode::Distributed,
        clip_norm: CLIP_NORM,
        noise_stddev: 0.5,
        ..PrivacyInstructions::NONE
    };
    let runs = (0..3).map(|i| agent(&hub, i, Arc::clone(&keys[i])).run());
    for outcome in futures::future::join_all(runs).await {
        assert_eq!(outcome.unwrap().stats.updates_accepted, 1);
    }
    assert!(hub.failures().is_empty(), "{:?}", hub.failures());
    let round = hub.round.lock().unwrap();
    let encoding = hub.secure.encoding().unwrap();
    let sum = encoding.decode_integers(round.sum.as_ref().unwrap(), 3).unwrap();
    let deltas: Vec<Vec<f32>> = (0..3).map(|i| clipped_delta(&hub, i)).collect();
    let scale = 2f64.powi(-GRID_LOG2);
    // Residual in grid steps: three noise shares (σ_grid each) plus rounding (< 1 step each).
    let residual: Vec<f64> = sum
        .iter()
        .enumerate()
        .map(|(j, s)| *s as f64 - deltas.iter().map(|d| f64::from(d[j]) * scale).sum::<f64>())
        .collect();
    let std = (residual.iter().map(|r| r * r).sum::<f64>() / residual.len() as f64).sqrt();
    let want = 3f64.sqrt() * sigma_grid;
    assert!((std / want - 1.0).abs() < 0.1, "residual std {std} grid steps, three shares give {want}");
}

#[tokio::test]
async fn a_client_the_roster_lists_with_another_identity_reports_a_failure_naming_it_and_sends_no_keys() {
    let keys = keys(3);
    let mut listed = roster(&keys);
    listed[1].1 = KeyPair::generate_ephemeral().unwrap().public_key();
    let hub = Hub::new(listed, 3, 0.0, Script::Aggregate);
    let outcome = agent(&hub, 1, Arc::clone(&keys[1])).run().await.unwrap();
    assert_eq!((outcome.stats.fits, outcome.stats.tasks_dropped), (0, 1));
    let failures = hub.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("site-1") && failures[0].contains("another identity"), "{failures:?}");
    assert!(hub.round.lock().unwrap().advertised.is_empty());
    assert_eq!(hub.log.lock().unwrap().iter().filter(|l| l.starts_with("download")).count(), 0);
}

#[tokio::test]
async fn a_client_missing_from_the_roster_reports_a_failure_naming_itself() {
    let keys = keys(3);
    let hub = Hub::new(roster(&keys[..2]), 2, 0.0, Script::Aggregate);
    let outcome = agent(&hub, 2, Arc::clone(&keys[2])).run().await.unwrap();
    assert_eq!(outcome.stats.tasks_dropped, 1);
    let failures = hub.failures();
    assert!(
        failures.len() == 1 && failures[0].contains("roster does not list this client `site-2`"),
        "{failures:?}"
    );
}

#[tokio::test]
async fn an_aborted_attempt_ends_the_task_quietly_without_a_failure_report() {
    let keys = keys(3);
    let hub = Hub::new(roster(&keys), 3, 0.0, Script::AbortWaits);
    let outcome = agent(&hub, 0, Arc::clone(&keys[0])).run().await.unwrap();
    assert!(matches!(outcome.reason, ExitReason::Finished { .. }), "{outcome:?}");
    assert_eq!((outcome.stats.fits, outcome.stats.tasks_dropped), (0, 1));
    assert!(hub.failures().is_empty(), "{:?}", hub.failures());
    // It advertised, was told the attempt is over while waiting, and never trained.
    assert_eq!(hub.round.lock().unwrap().advertised.len(), 1);
    assert_eq!(hub.log.lock().unwrap().iter().filter(|l| l.starts_with("download")).count(), 0);
}
