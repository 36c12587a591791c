//! 8-bit updates (`fit.update_encoding = "int8"`) through a real coordinator (in this process,
//! real gRPC on loopback): the round asks for them, folds exactly what they decode to, and
//! refuses a payload in the other encoding or a broken one without touching the sum.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use fedtune_client::agent::ExitReason;
use fedtune_client::fake_trainer::FakeTrainer;
use fedtune_client::local_trainer::{FitConfig, LocalTrainer};
use fedtune_coordinator::aggregate::{FixedPointSum, MAX_ABS_VALUE};
use fedtune_coordinator::cli::{export, ExportArgs};
use fedtune_coordinator::CoordinatorSettings;
use fedtune_shared::chunk::DEFAULT_CHUNK_BYTES;
use fedtune_shared::compression::{decode, Int8Encoder, UpdateEncoding, BLOCK_BYTES, BLOCK_VALUES};
use fedtune_shared::ids::{ModelVersion, Sha256};
use fedtune_shared::params::ParameterVector;
use fedtune_shared::round::{ModelScope, UpdateHeader};
use fedtune_tests::agents::{fake_trainer, spawn_fake_agent};
use fedtune_tests::fixtures::{one_round_settings, quick_settings, write_fake_model};
use fedtune_tests::grpc::{
    expect_status, f32_bytes, files_in, update_values, upload_items, InProcess, TestClient,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

fn settings(dir: &Path, encoding: UpdateEncoding, clients: usize) -> Result<CoordinatorSettings> {
    let mut s = one_round_settings(dir, clients, clients)?;
    s.fit.update_encoding = encoding;
    Ok(s)
}

fn int8(values: &[f32], seed: u64) -> Vec<u8> {
    Int8Encoder::seeded_for_tests(seed).encode(values, MAX_ABS_VALUE).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_round_publishes_exactly_the_mean_of_the_decoded_updates_and_refuses_bad_payloads(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = settings(dir.path(), UpdateEncoding::Int8, 3)?;
    let spool = s.storage.state_dir.join("spool");
    let coord = InProcess::start(s).await?;
    let mut clients = Vec::new();
    for k in 0..3 {
        clients.push(TestClient::join(&coord.url, &format!("site-{k}"), 0).await?);
    }
    let v0 = clients[0].download_vector(ModelVersion(0), ModelScope::Trainable).await?;
    let n = v0.values().len();
    assert_ne!(n % BLOCK_VALUES, 0, "the fake model's last block is padded (the padding case below)");
    let mut tasks = Vec::new();
    for c in &mut clients {
        let task = c.wait_for_fit(WAIT).await?;
        assert_eq!(task.config.update_encoding, UpdateEncoding::Int8, "the fit task asks for int8");
        tasks.push(task);
    }
    let examples = [10u64, 30, 60];
    let payloads: Vec<Vec<u8>> = (0..3).map(|k| int8(&update_values(k, n), k as u64)).collect();
    assert_eq!(payloads[0].len() as u64, UpdateEncoding::Int8.payload_bytes(n));

    // Bad uploads first, all from a selected client with a valid session and signature.
    let (c, t) = (&mut clients[2], &tasks[2]);
    let good = &payloads[2];
    let header = c.header(t, examples[2], good.len() as u64);
    let send = |h: &UpdateHeader, payload: &[u8], digest: Sha256| {
        upload_items(h, payload, DEFAULT_CHUNK_BYTES, digest)
    };
    let with = |edit: &dyn Fn(&mut UpdateHeader)| {
        let mut h = header.clone();
        edit(&mut h);
        h
    };
    // The encoding the round did not ask for.
    let f32_payload = f32_bytes(&update_values(2, n));
    let as_f32 = with(&|h| (h.encoding, h.total_bytes) = (UpdateEncoding::F32, f32_payload.len() as u64));
    expect_status(
        c.upload_raw(send(&as_f32, &f32_payload, Sha256::of(&f32_payload))).await,
        Code::InvalidArgument,
        &["header.encoding", "`f32`", "`int8`"],
    );
    // A block short, announced.
    let short = &good[..good.len() - BLOCK_BYTES];
    let announced_short = with(&|h| h.total_bytes = short.len() as u64);
    expect_status(
        c.upload_raw(send(&announced_short, short, Sha256::of(short))).await,
        Code::InvalidArgument,
        &["announces"],
    );
    // The last block cut short (not a whole number of blocks), announced.
    let cut = &good[..good.len() - 4];
    let announced_cut = with(&|h| h.total_bytes = cut.len() as u64);
    expect_status(
        c.upload_raw(send(&announced_cut, cut, Sha256::of(cut))).await,
        Code::InvalidArgument,
        &["announces"],
    );
    // A NaN scale, an oversized scale, the code -128, a non-zero padding code.
    let mut nan_scale = good.clone();
    nan_scale[BLOCK_BYTES..BLOCK_BYTES + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut big_scale = good.clone();
    big_scale[..4].copy_from_slice(&3.0f32.to_le_bytes());
    let mut minus_128 = good.clone();
    minus_128[4 + 5] = 0x80;
    let mut padding = good.clone();
    *padding.last_mut().unwrap() = 1;
    for (bad, needles) in [
        (&nan_scale, &["int8_block", "block 1", "scale NaN"][..]),
        (&big_scale, &["int8_block", "block 0", "scale 3"][..]),
        (&minus_128, &["int8_block", "-128", "flat index 5"][..]),
        (&padding, &["int8_block", "padding"][..]),
    ] {
        expect_status(
            c.upload_raw(send(&header, bad, Sha256::of(bad))).await,
            Code::InvalidArgument,
            needles,
        );
    }
    let status = clients[0].status().await?;
    assert_eq!((status.model_version, status.accepted_updates), (ModelVersion(0), 0), "nothing was folded");
    assert!(files_in(&spool).is_empty(), "left in the spool: {:?}", files_in(&spool));

    for k in 0..3 {
        clients[k].upload(&tasks[k], examples[k], &payloads[k]).await?;
    }
    clients[0].wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;
    let v1 = clients[0].download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    coord.shutdown().await?;

    // The coordinator's result, bit for bit: the decoded updates folded as f32 updates are,
    // their example-weighted mean added to the global model (FedAvg, server rate 1).
    let mut sum = FixedPointSum::new(n);
    for k in 0..3 {
        sum.fold_values(&decode(&payloads[k], n, MAX_ABS_VALUE)?, examples[k], 1.0);
    }
    let expected: Vec<u32> =
        v0.values().iter().zip(sum.mean().unwrap()).map(|(g, d)| (g + d).to_bits()).collect();
    assert_eq!(v1.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_f32_round_refuses_an_int8_upload_naming_the_encoding() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let coord = InProcess::start(settings(dir.path(), UpdateEncoding::F32, 1)?).await?;
    let mut c = TestClient::join(&coord.url, "site-0", 0).await?;
    let n = c.trainable().numel();
    let task = c.wait_for_fit(WAIT).await?;
    assert_eq!(task.config.update_encoding, UpdateEncoding::F32);
    let payload = int8(&update_values(0, n), 0);
    let mut header = c.header(&task, 10, payload.len() as u64);
    header.encoding = UpdateEncoding::Int8;
    expect_status(
        c.upload_raw(upload_items(&header, &payload, DEFAULT_CHUNK_BYTES, Sha256::of(&payload))).await,
        Code::InvalidArgument,
        &["header.encoding", "`int8`", "`f32`"],
    );
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_in_an_int8_federation_upload_a_quarter_of_the_bytes_and_the_mean_stays_within_a_step(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let state = dir.path().join("state");
    let mut settings = quick_settings(&state, &model, 1, 2, 2);
    settings.fit.update_encoding = UpdateEncoding::Int8;
    let coord = InProcess::start(settings).await?;

    let clients = [(1u64, 10u64), (2, 30)];
    let mut agents = Vec::new();
    for (seed, examples) in clients {
        agents.push(spawn_fake_agent(&coord.url, seed, examples)?);
    }
    let initial = ParameterVector::load_safetensors(&model.join("model.safetensors"), |_| true)?;
    let n = initial.values().len();
    for agent in agents {
        let outcome = tokio::time::timeout(Duration::from_secs(60), agent).await???;
        assert!(matches!(outcome.reason, ExitReason::Finished { .. }), "{outcome:?}");
        assert_eq!(outcome.stats.updates_accepted, 1, "{outcome:?}");
        assert_eq!(
            outcome.stats.bytes_uploaded,
            UpdateEncoding::Int8.payload_bytes(n),
            "int8 bytes went out"
        );
    }
    coord.shutdown().await?;

    // The f32 FedAvg step, and the largest rounding step any client's blocks can have had.
    let global = initial;
    let total: f32 = clients.iter().map(|c| c.1 as f32).sum();
    let mut expected = global.values().to_vec();
    let mut step = 0.0f32;
    for (seed, examples) in clients {
        let local = FakeTrainer::new(global.manifest().clone(), fake_trainer(seed, examples))
            .fit(&global, &FitConfig::default())?
            .weights;
        for ((e, l), g) in expected.iter_mut().zip(local.values()).zip(global.values()) {
            *e += (l - g) * examples as f32 / total;
            step = step.max((l - g).abs() / 127.0);
        }
    }
    let out = dir.path().join("v1");
    export(&ExportArgs { state_dir: state.clone(), round: 1, out: out.clone(), init_dir: None })?;
    let got = ParameterVector::load_safetensors(&out.join("model.safetensors"), |_| true)?
        .select(global.manifest())?;
    let worst = got.values().iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(step > 0.0 && worst <= step * 1.01, "published model is {worst} from the f32 mean (step {step})");
    assert_ne!(got.values(), global.values(), "round 1 changed the model");
    Ok(())
}
