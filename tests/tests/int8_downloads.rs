//! 8-bit model downloads (`model.download_encoding = "int8_delta"`) through a real coordinator
//! (in this process, real gRPC on loopback): a published version is exactly the previous one
//! plus the decoded step, a client holding the previous version is sent only that step
//! (resumable by offset), any other client the f32 weights, and a restart keeps the published
//! weights and serves them in f32.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use fedtune_coordinator::CoordinatorSettings;
use fedtune_shared::chunk::PayloadView;
use fedtune_shared::compression::{apply_delta, decode, DownloadEncoding, UpdateEncoding, MODEL_STEP_BOUND};
use fedtune_shared::ids::{ModelVersion, Sha256};
use fedtune_shared::round::{ModelEncoding, ModelScope};
use fedtune_tests::fixtures::one_round_settings;
use fedtune_tests::grpc::{f32_bytes, update_values, InProcess, TestClient};

const WAIT: Duration = Duration::from_secs(20);

fn settings(dir: &Path) -> Result<CoordinatorSettings> {
    let mut s = one_round_settings(dir, 1, 1)?;
    s.model.download_encoding = DownloadEncoding::Int8Delta;
    Ok(s)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_version_is_the_previous_one_plus_its_decoded_step_and_only_the_step_is_sent(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = settings(dir.path())?;
    let coord = InProcess::start(s.clone()).await?;
    let mut c = TestClient::join(&coord.url, "site-0", 0).await?;
    let v0 = c.download_vector(ModelVersion(0), ModelScope::Trainable).await?;
    let n = v0.values().len();
    let task = c.wait_for_fit(WAIT).await?;
    let update = update_values(0, n);
    c.upload(&task, 10, &f32_bytes(&update)).await?;
    c.wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;

    let (header, step) =
        c.download_from(ModelVersion(1), ModelScope::Trainable, 0, Some(ModelVersion(0)), None).await?;
    assert_eq!(header.encoding, ModelEncoding::Int8Delta { base: ModelVersion(0) });
    assert_eq!(header.total_bytes, UpdateEncoding::Int8.payload_bytes(n));
    assert_eq!(step.len() as u64, header.total_bytes);
    assert_eq!(Sha256::of(&step), header.payload_digest);
    let (f32_header, f32_payload) = c.download(ModelVersion(1), ModelScope::Trainable, 0, None).await?;
    assert_eq!(f32_header.encoding, ModelEncoding::F32);
    let v1 = fedtune_tests::grpc::f32_values(&f32_payload);
    // What the coordinator publishes is, bit for bit, v0 plus the decoded step it sends.
    let rebuilt = apply_delta(v0.values(), &step)?;
    assert_eq!(bits(&rebuilt), bits(&v1));
    assert_eq!(PayloadView::whole(&rebuilt).digest(), f32_header.payload_digest);
    // And the step is the FedAvg step (server rate 1, one client: the update) within a
    // rounding step of its block.
    let decoded = decode(&step, n, MODEL_STEP_BOUND)?;
    let grid = update.iter().fold(0.0f32, |m, u| m.max(u.abs())) / 127.0;
    let worst = decoded.iter().zip(&update).map(|(d, u)| (d - u).abs()).fold(0.0f32, f32::max);
    assert!(worst > 0.0 && worst <= grid * 1.01, "step off by {worst} (grid {grid})");

    // Resuming a step by offset gives the rest of the same bytes.
    let (resumed, rest) =
        c.download_from(ModelVersion(1), ModelScope::Trainable, 260, Some(ModelVersion(0)), None).await?;
    assert_eq!((resumed.start_offset, resumed.encoding), (260, header.encoding));
    assert_eq!(rest, step[260..]);
    // A client holding another version gets the f32 weights, whole, whatever offset it named.
    let (other, whole) =
        c.download_from(ModelVersion(1), ModelScope::Trainable, 260, Some(ModelVersion(7)), None).await?;
    assert_eq!((other.encoding, other.start_offset), (ModelEncoding::F32, 0));
    assert_eq!(whole, f32_payload);
    coord.shutdown().await?;

    // After a restart the published weights are the checkpointed ones, and the step is gone.
    let coord = InProcess::start(s).await?;
    let mut c = TestClient::join(&coord.url, "site-0", 0).await?;
    let (after, payload) =
        c.download_from(ModelVersion(1), ModelScope::Trainable, 0, Some(ModelVersion(0)), None).await?;
    assert_eq!(after.encoding, ModelEncoding::F32);
    assert_eq!(payload, f32_payload);
    coord.shutdown().await?;
    Ok(())
}
