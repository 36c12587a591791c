//! Secure aggregation (SecAgg+) end to end: a real coordinator in this process with
//! `[secure_aggregation] enabled`, and protocol-level clients that run the real client state
//! machines of `fedtune_shared::secagg` over the real RPCs. The coordinator sees masked vectors
//! only, yet publishes exactly the model a plain fixed-point mean of the same encoded updates
//! gives.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fedtune_coordinator::aggregate::FixedPointSum;
use fedtune_coordinator::CoordinatorSettings;
use fedtune_shared::auth::sign_masked_upload;
use fedtune_shared::chunk::DEFAULT_CHUNK_BYTES;
use fedtune_shared::convert::awaited_step_to_pb;
use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::{ModelVersion, RoundId, Sha256};
use fedtune_shared::pb;
use fedtune_shared::privacy::NoiseSource;
use fedtune_shared::round::{
    Chunk, FitTask, MaskedUpdateHeader, ModelScope, StatusReport, UpdateTrailer, UploadItem,
};
use fedtune_shared::secagg::{
    AwaitedStep, InputMasked, KeyAdvertisement, KeysAdvertised, MaskedInput, RoundContext, RoundRef,
    RoundUnmaskAnswer, RoundUnmaskRequest, ShareUpload, SharesSent, StepInput,
};
use fedtune_tests::fixtures::one_round_settings;
use fedtune_tests::grpc::{expect_status, f32_bytes, files_in, update_values, InProcess, TestClient};
use tonic::{Code, Status};

const WAIT: Duration = Duration::from_secs(20);

fn settings(dir: &Path, clients: usize, min_fit: usize) -> Result<CoordinatorSettings> {
    let mut s = one_round_settings(dir, clients, min_fit)?;
    s.secure_aggregation.enabled = true;
    s.secure_aggregation.step_timeout = Duration::from_secs(10);
    s.secure_aggregation.unmask_timeout = Duration::from_secs(10);
    // Above the norm of every test update (the clients here do not clip).
    s.secure_aggregation.clip_norm = 100.0;
    Ok(s)
}

/// One client's view of a secure round.
struct Party {
    c: TestClient,
    task: FitTask,
    ctx: Arc<RoundContext>,
    round: RoundRef,
}

impl Party {
    async fn new(mut c: TestClient) -> Result<Self> {
        let task = c.wait_for_fit(WAIT).await?;
        let secure = task.secure_aggregation.clone().context("the fit task is not secure")?;
        let ctx = Arc::new(RoundContext::new(secure.setup.clone())?);
        let round = RoundRef::of(&ctx);
        Ok(Self { c, task, ctx, round })
    }

    fn key(&self) -> Arc<KeyPair> {
        self.c.key.clone().expect("joined")
    }

    async fn advertise(&mut self) -> Result<KeysAdvertised> {
        let me = self.ctx.slot_of(self.c.id.as_ref().unwrap()).context("not in the roster")?;
        let (state, keys) = KeysAdvertised::start(self.ctx.clone(), me, &self.key())?;
        let msg = pb::AdvertiseKeysRequest::from(&KeyAdvertisement { round: self.round, keys });
        self.c.raw().advertise_keys(self.c.authed(msg)).await?;
        Ok(state)
    }

    async fn await_step(&mut self, step: AwaitedStep) -> Result<StepInput, Status> {
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = pb::AwaitSecAggStepRequest {
                round: Some((&self.round).into()),
                step: awaited_step_to_pb(step) as i32,
                max_wait_ms: 2_000,
            };
            let resp = self.c.raw().await_sec_agg_step(self.c.authed(msg)).await?.into_inner();
            let input = StepInput::from_pb(resp, &self.ctx).map_err(|e| Status::internal(e.to_string()))?;
            if input != StepInput::Pending || tokio::time::Instant::now() >= until {
                return Ok(input);
            }
        }
    }

    async fn share(&mut self, state: KeysAdvertised) -> Result<SharesSent> {
        let StepInput::PeerKeys(peer) = self.await_step(AwaitedStep::PeerKeys).await? else {
            bail!("expected peer keys")
        };
        let (state, bundles) = state.share(&peer.keys)?;
        let msg = pb::SendSharesRequest::from(&ShareUpload { round: self.round, bundles });
        self.c.raw().send_shares(self.c.authed(msg)).await?;
        Ok(state)
    }

    /// Encodes update `k` on the round's grid, masks it and uploads it; returns the encoded
    /// integers (what the unmasked sum must add up to).
    async fn mask_and_upload(&mut self, state: SharesSent, k: usize) -> Result<(InputMasked, Vec<i64>)> {
        let (state, ints, _) = self.mask_and_upload_keeping(state, k).await?;
        Ok((state, ints))
    }

    /// [`Self::mask_and_upload`], also returning the uploaded masked payload.
    async fn mask_and_upload_keeping(
        &mut self,
        state: SharesSent,
        k: usize,
    ) -> Result<(InputMasked, Vec<i64>, Vec<u8>)> {
        let StepInput::Shares(delivery) = self.await_step(AwaitedStep::Shares).await? else {
            bail!("expected shares")
        };
        let secure = self.task.secure_aggregation.clone().unwrap();
        let encoding = secure.encoding()?;
        let update = update_values(k, self.ctx.vector_len());
        let ints = encoding.encode_integers(&update, &NoiseSource::seeded_for_tests(k as u64))?;
        let ring = fedtune_shared::secagg::encoding::to_ring(&ints);
        let (state, masked) = state.mask(&delivery.bundles, &delivery.sharers, &ring)?;
        self.upload_masked(&masked, *self.ctx.digest()).await?;
        Ok((state, ints, masked.payload()))
    }

    async fn upload_masked(&mut self, masked: &MaskedInput, context: [u8; 32]) -> Result<(), Status> {
        let payload = masked.payload();
        let header = MaskedUpdateHeader {
            header: self.c.header(&self.task, 10, payload.len() as u64),
            secagg_context: context,
        };
        let digest = Sha256::of(&payload);
        let signature = sign_masked_upload(
            &self.key(),
            self.c.federation_id.as_ref().unwrap(),
            self.c.id.as_ref().unwrap(),
            &header,
            &digest,
        );
        let mut items = vec![pb::UploadUpdateRequest {
            item: Some(pb::upload_update_request::Item::Header((&header).into())),
        }];
        for (i, c) in payload.chunks(DEFAULT_CHUNK_BYTES).enumerate() {
            let chunk = Chunk { offset: (i * DEFAULT_CHUNK_BYTES) as u64, data: c.to_vec().into() };
            items.push(UploadItem::Chunk(chunk).into());
        }
        let trailer = UpdateTrailer { payload_digest: digest, signature: Some(signature) };
        items.push(UploadItem::Trailer(trailer).into());
        self.c.signing = false;
        let out = self.c.upload_raw(items).await.map(|_| ());
        self.c.signing = true;
        out
    }

    async fn unmask(&mut self, state: InputMasked) -> Result<RoundUnmaskRequest> {
        let StepInput::Unmask(request) = self.await_step(AwaitedStep::Unmask).await? else {
            bail!("expected the unmasking request")
        };
        let answer = state.unmask(&request.request)?;
        let msg = pb::UnmaskAnswer::from(&RoundUnmaskAnswer { round: self.round, answer });
        self.c.raw().answer_unmask(self.c.authed(msg)).await?;
        Ok(request)
    }
}

async fn join_all(url: &str, n: usize) -> Result<Vec<TestClient>> {
    let mut out = Vec::new();
    for k in 0..n {
        out.push(TestClient::join(url, &format!("site-{k}"), 0).await?);
    }
    Ok(out)
}

/// `n` clients joined, each holding the round's secure fit task.
async fn parties(url: &str, n: usize) -> Result<Vec<Party>> {
    let mut out = Vec::new();
    for c in join_all(url, n).await? {
        out.push(Party::new(c).await?);
    }
    Ok(out)
}

/// Every party advertises its keys, then every party shares: the states ready to mask.
async fn advertise_and_share(parties: &mut [Party]) -> Result<Vec<SharesSent>> {
    let mut states = Vec::new();
    for p in parties.iter_mut() {
        states.push(p.advertise().await?);
    }
    let mut shared = Vec::new();
    for (p, s) in parties.iter_mut().zip(states) {
        shared.push(p.share(s).await?);
    }
    Ok(shared)
}

/// The model a plain round would publish from these encoded contributions: the fixed-point
/// mean of their exact sum, added to the old model.
fn expected_model(v0: &[f32], contributions: &[Vec<i64>], grid_log2: i32) -> Vec<u32> {
    let sum: Vec<i64> = (0..v0.len()).map(|j| contributions.iter().map(|c| c[j]).sum()).collect();
    let fixed = FixedPointSum::from_grid_integers(&sum, grid_log2, contributions.len() as u32).unwrap();
    let mean = fixed.mean().unwrap();
    v0.iter().zip(&mean).map(|(x, d)| (x + d).to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unmasked_sum_is_the_exact_sum_of_the_encoded_updates_and_nothing_individual_is_kept(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let coord = InProcess::start(settings(dir.path(), 3, 3)?).await?;
    let mut parties = parties(&coord.url, 3).await?;
    let v0 = parties[0].c.download_vector(ModelVersion(0), ModelScope::Trainable).await?;
    let grid = parties[0].task.secure_aggregation.as_ref().unwrap().grid_log2;
    let shared = advertise_and_share(&mut parties).await?;
    let (mut masked, mut contributions, mut payloads) = (Vec::new(), Vec::new(), Vec::new());
    for (k, (p, s)) in parties.iter_mut().zip(shared).enumerate() {
        let (state, ints, payload) = p.mask_and_upload_keeping(s, k).await?;
        masked.push(state);
        contributions.push(ints);
        payloads.push(payload);
    }
    let spool = dir.path().join("state").join("spool");
    for (p, s) in parties.iter_mut().zip(masked) {
        let request = p.unmask(s).await?;
        assert_eq!(request.request.survivors.len(), 3);
        assert!(request.request.dropped.is_empty());
    }
    let status = parties[0].c.wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;
    let v1 = parties[0].c.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    let got: Vec<u32> = v1.values().iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, expected_model(v0.values(), &contributions, grid), "bit for bit");
    let round = status.recent_rounds.iter().find(|r| r.id == RoundId::new(1, 0)).context("round 1")?;
    assert_eq!(round.accepted, 3);
    // No staged masked vector is left, and no stored byte sequence is any client's vector.
    assert!(files_in(&spool).is_empty(), "spool holds {:?}", files_in(&spool));
    coord.shutdown().await?;
    for file in walk(&dir.path().join("state")) {
        let bytes = std::fs::read(&file)?;
        for (k, p) in payloads.iter().enumerate() {
            let probe = &p[..64.min(p.len())];
            assert!(
                !bytes.windows(probe.len()).any(|w| w == probe),
                "{} holds client {k}'s masked vector",
                file.display()
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropping_after_sharing_leaves_a_round_of_the_survivors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // n = 3: default t = 2, so two survivors still unmask.
    let coord = InProcess::start(settings(dir.path(), 3, 2)?).await?;
    let mut parties = parties(&coord.url, 3).await?;
    let v0 = parties[0].c.download_vector(ModelVersion(0), ModelScope::Trainable).await?;
    let grid = parties[0].task.secure_aggregation.as_ref().unwrap().grid_log2;
    let mut shared = advertise_and_share(&mut parties).await?;
    let dropped = shared.pop().unwrap();
    drop(dropped);
    let task = parties[2].task.clone();
    parties[2].c.report_fit_failure(&task, "gone after sharing").await?;
    let (mut masked, mut contributions) = (Vec::new(), Vec::new());
    for (k, (p, s)) in parties.iter_mut().zip(shared).enumerate() {
        let (state, ints) = p.mask_and_upload(s, k).await?;
        masked.push(state);
        contributions.push(ints);
    }
    for (p, s) in parties.iter_mut().zip(masked) {
        let request = p.unmask(s).await?;
        assert_eq!(request.request.dropped.len(), 1, "the third client is dropped");
    }
    parties[0].c.wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;
    let v1 = parties[0].c.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    let got: Vec<u32> = v1.values().iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, expected_model(v0.values(), &contributions, grid));
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_threshold_the_attempt_fails_and_the_retry_starts_over_with_fresh_keys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let coord = InProcess::start(settings(dir.path(), 3, 2)?).await?;
    let mut parties = parties(&coord.url, 3).await?;
    // Two of three give up before advertising: one advertiser is below t = 2.
    for p in parties.iter_mut().skip(1) {
        let task = p.task.clone();
        p.c.report_fit_failure(&task, "not today").await?;
    }
    let first = parties[0].advertise().await?;
    let old_round = parties[0].round;
    let ended = parties[0].await_step(AwaitedStep::PeerKeys).await;
    let status = match ended {
        Err(s) => s,
        Ok(other) => bail!("expected the attempt to end, got {other:?}"),
    };
    assert!(
        matches!(status.code(), Code::Aborted | Code::FailedPrecondition),
        "{:?}: {}",
        status.code(),
        status.message()
    );
    // The retry runs with a new roster digest: a message of attempt 0 is refused.
    let mut retry = Vec::new();
    for p in parties {
        retry.push(Party::new(p.c).await?);
    }
    assert_eq!(retry[0].task.id, RoundId::new(1, 1));
    let s = retry[0].c.status().await?;
    let failed = s.recent_rounds.iter().find(|r| r.id == RoundId::new(1, 0)).context("attempt 0 recorded")?;
    assert!(failed.reason.contains("secure aggregation"), "{}", failed.reason);
    assert_ne!(retry[0].round, old_round);
    drop(first);
    let me = retry[0].ctx.slot_of(retry[0].c.id.as_ref().unwrap()).unwrap();
    let stale_ctx = retry[0].ctx.clone();
    let (_, keys) = KeysAdvertised::start(stale_ctx, me, &retry[0].key())?;
    let replay = pb::AdvertiseKeysRequest::from(&KeyAdvertisement { round: old_round, keys });
    let refused = retry[0].c.raw().advertise_keys(retry[0].c.authed(replay)).await;
    expect_status(refused, Code::Aborted, &["round 1 (attempt 0)"]);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_secure_inputs_are_refused_with_precise_statuses_and_leave_the_sum_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let coord = InProcess::start(settings(dir.path(), 3, 3)?).await?;
    let mut parties = parties(&coord.url, 3).await?;
    let v0 = parties[0].c.download_vector(ModelVersion(0), ModelScope::Trainable).await?;
    let grid = parties[0].task.secure_aggregation.as_ref().unwrap().grid_log2;

    // A forged key: signed with an identity that is not the roster's for this slot.
    let me = parties[0].ctx.slot_of(parties[0].c.id.as_ref().unwrap()).unwrap();
    let (_, mut forged) = KeysAdvertised::start(parties[0].ctx.clone(), me, &parties[0].key())?;
    let (_, other) = KeysAdvertised::start(
        parties[1].ctx.clone(),
        parties[1].ctx.slot_of(parties[1].c.id.as_ref().unwrap()).unwrap(),
        &parties[1].key(),
    )?;
    forged[0].signature = other[0].signature;
    let msg = pb::AdvertiseKeysRequest::from(&KeyAdvertisement { round: parties[0].round, keys: forged });
    let refused = parties[0].c.raw().advertise_keys(parties[0].c.authed(msg)).await;
    expect_status(refused, Code::InvalidArgument, &["signature"]);

    // A plain upload in a secure round.
    let n = parties[0].ctx.vector_len();
    let task = parties[0].task.clone();
    let plain = parties[0].c.upload(&task, 10, &f32_bytes(&update_values(0, n))).await;
    expect_status(plain, Code::InvalidArgument, &["header.encoding"]);

    let shared = advertise_and_share(&mut parties).await?;
    // A masked vector of the wrong length is refused at its header.
    let short = MaskedInput { sender: me, values: vec![7; n - 1] };
    let digest = *parties[0].ctx.digest();
    let refused = parties[0].upload_masked(&short, digest).await;
    expect_status(refused, Code::InvalidArgument, &["announces"]);
    // A masked upload naming another round context.
    let full = MaskedInput { sender: me, values: vec![7; n] };
    let refused = parties[0].upload_masked(&full, [9; 32]).await;
    expect_status(refused, Code::FailedPrecondition, &["secagg_context"]);

    let (mut masked, mut contributions) = (Vec::new(), Vec::new());
    for (k, (p, s)) in parties.iter_mut().zip(shared).enumerate() {
        let (state, ints) = p.mask_and_upload(s, k).await?;
        masked.push(state);
        contributions.push(ints);
    }
    let mut answers = Vec::new();
    for (p, s) in parties.iter_mut().zip(masked) {
        let StepInput::Unmask(request) = p.await_step(AwaitedStep::Unmask).await? else {
            bail!("no request")
        };
        let answer = s.unmask(&request.request)?;
        answers.push(pb::UnmaskAnswer::from(&RoundUnmaskAnswer { round: p.round, answer }));
    }
    // Two of three answer; the first answers twice.
    for (p, a) in parties.iter_mut().zip(&answers).take(2) {
        p.c.raw().answer_unmask(p.c.authed(a.clone())).await?;
    }
    let again = parties[0].c.raw().answer_unmask(parties[0].c.authed(answers[0].clone())).await;
    expect_status(again, Code::AlreadyExists, &["second"]);
    // Someone else's answer under this client's session.
    let theirs = parties[0].c.raw().answer_unmask(parties[0].c.authed(answers[2].clone())).await;
    expect_status(theirs, Code::InvalidArgument, &["not the caller"]);
    parties[2].c.raw().answer_unmask(parties[2].c.authed(answers[2].clone())).await?;
    parties[0].c.wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;
    let v1 = parties[0].c.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    let got: Vec<u32> = v1.values().iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, expected_model(v0.values(), &contributions, grid), "the refusals changed nothing");
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_bundles_may_exceed_16_kib_but_not_the_secagg_request_limit() -> Result<()> {
    use fedtune_shared::limits::MAX_SECAGG_REQUEST_BYTES;
    let dir = tempfile::tempdir()?;
    let coord = InProcess::start(settings(dir.path(), 3, 3)?).await?;
    let c = TestClient::join(&coord.url, "site-0", 0).await?;
    let bundle = |len: usize| pb::SendSharesRequest {
        round: Some(pb::SecAggRoundRef { round: 1, attempt: 0, context_sha256: vec![0; 32].into() }),
        bundles: vec![pb::SealedShares { sender: 0, recipient: 1, ciphertext: vec![0; len].into() }],
    };
    // Above 16 KiB and below the SecAgg limit: past the body limit, refused for what it says.
    let sized = c.raw().send_shares(c.authed(bundle(64 << 10))).await;
    let status = sized.expect_err("no secure round takes it");
    assert_ne!(status.code(), Code::ResourceExhausted, "{}", status.message());
    let over = c.raw().send_shares(c.authed(bundle(MAX_SECAGG_REQUEST_BYTES + 1))).await;
    expect_status(over, Code::ResourceExhausted, &["SendShares", "exceeds its limit"]);
    let advert = pb::AdvertiseKeysRequest {
        round: Some(pb::SecAggRoundRef { round: 1, attempt: 0, context_sha256: vec![0; 32].into() }),
        keys: vec![pb::AgreementKey {
            owner: 0,
            peer: 1,
            public_key: vec![0; 64 << 10].into(),
            signature: vec![].into(),
        }],
    };
    let over = c.raw().advertise_keys(c.authed(advert)).await;
    expect_status(over, Code::ResourceExhausted, &["AdvertiseKeys", "exceeds its limit"]);
    coord.shutdown().await?;
    Ok(())
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_never_resumes_a_secure_attempt() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let coord = InProcess::start(settings(dir.path(), 3, 3)?).await?;
    let mut parties = parties(&coord.url, 3).await?;
    let old = parties[0].round;
    assert_eq!((old.round, old.attempt), (1, 0));
    let _advertised = parties[0].advertise().await?;
    coord.shutdown().await?;

    // Its secure state was in memory only: the attempt is over, the next one has fresh keys.
    let coord = InProcess::start(settings(dir.path(), 3, 3)?).await?;
    let mut again = Vec::new();
    for k in 0..3 {
        let c = TestClient::join(&coord.url, &format!("site-{k}"), 0).await?;
        again.push(c);
    }
    let mut parties = Vec::new();
    for c in again {
        parties.push(Party::new(c).await?);
    }
    let new = parties[0].round;
    assert_eq!((new.round, new.attempt), (1, 1));
    assert_ne!(new.context_digest, old.context_digest);
    let s = parties[0].c.status().await?;
    let aborted = s.recent_rounds.iter().find(|r| r.id == RoundId::new(1, 0)).context("attempt 0")?;
    assert_eq!(aborted.status, "aborted");
    let me = parties[0].ctx.slot_of(parties[0].c.id.as_ref().unwrap()).unwrap();
    let (_, keys) = KeysAdvertised::start(parties[0].ctx.clone(), me, &parties[0].key())?;
    let replay = pb::AdvertiseKeysRequest::from(&KeyAdvertisement { round: old, keys });
    let refused = parties[0].c.raw().advertise_keys(parties[0].c.authed(replay)).await;
    expect_status(refused, Code::Aborted, &["round 1 (attempt 0)"]);
    coord.shutdown().await?;
    Ok(())
}

/// Runs a round of three in which only the first `answering` survivors answer the unmasking
/// request; returns the contributions and the status after the unmasking timeout.
async fn round_with_silent_survivors(
    dir: &Path,
    threshold: usize,
    answering: usize,
) -> Result<(Vec<Vec<i64>>, InProcess, Vec<Party>)> {
    let mut s = settings(dir, 3, 3)?;
    s.secure_aggregation.threshold = Some(threshold);
    s.secure_aggregation.unmask_timeout = Duration::from_millis(500);
    let coord = InProcess::start(s).await?;
    let mut parties = parties(&coord.url, 3).await?;
    let shared = advertise_and_share(&mut parties).await?;
    let (mut masked, mut contributions) = (Vec::new(), Vec::new());
    for (k, (p, s)) in parties.iter_mut().zip(shared).enumerate() {
        let (state, ints) = p.mask_and_upload(s, k).await?;
        masked.push(state);
        contributions.push(ints);
    }
    for (p, s) in parties.iter_mut().zip(masked).take(answering) {
        p.unmask(s).await?;
    }
    Ok((contributions, coord, parties))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_unmasking_timeout_t_answers_suffice_and_fewer_fail_the_attempt_cleanly() -> Result<()> {
    let a = tempfile::tempdir()?;
    let (contributions, coord, mut parties) = round_with_silent_survivors(a.path(), 2, 2).await?;
    let v0 = parties[0].c.download_vector(ModelVersion(0), ModelScope::Trainable).await?;
    let grid = parties[0].task.secure_aggregation.as_ref().unwrap().grid_log2;
    parties[0].c.wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;
    let v1 = parties[0].c.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    let got: Vec<u32> = v1.values().iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, expected_model(v0.values(), &contributions, grid), "all three inputs, two answers");
    coord.shutdown().await?;

    let b = tempfile::tempdir()?;
    let (_, coord, mut parties) = round_with_silent_survivors(b.path(), 3, 2).await?;
    let attempt_failed =
        |s: &StatusReport| s.recent_rounds.iter().any(|r| r.id == RoundId::new(1, 0) && r.status == "failed");
    let s = parties[0].c.wait_status(WAIT, attempt_failed).await?;
    assert_eq!(s.model_version, ModelVersion(0), "nothing published");
    let failed = s.recent_rounds.iter().find(|r| r.id == RoundId::new(1, 0)).context("attempt 0")?;
    assert!(failed.reason.contains("shares"), "{}", failed.reason);
    coord.shutdown().await?;
    Ok(())
}
