//! Round lifecycle of a real coordinator (in this process, real gRPC on loopback), driven by
//! protocol-level test clients whose updates are known exactly.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use fedtune_coordinator::CoordinatorSettings;
use fedtune_shared::ids::{ModelVersion, RoundId};
use fedtune_shared::pb;
use fedtune_shared::round::{Chunk, ModelScope, PhaseName, UpdateTrailer, UploadItem};
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{expect_status, f32_bytes, files_in, update_values, InProcess, TestClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

/// `global + Σ nₖ·Δₖ / Σ nₖ`, computed independently of the coordinator, in f64.
fn weighted_mean_step(global: &[f32], updates: &[(u64, Vec<f32>)]) -> Vec<f64> {
    let total: u64 = updates.iter().map(|(n, _)| n).sum();
    (0..global.len())
        .map(|j| {
            let s: f64 = updates.iter().map(|(n, d)| *n as f64 * f64::from(d[j])).sum();
            f64::from(global[j]) + s / total as f64
        })
        .collect()
}

/// Tolerance of the fixed-point mean: half a grid step (2⁻²⁵) from quantization, plus f32
/// rounding of the mean and of the final addition.
fn assert_close(got: &[f32], expected: &[f64]) {
    assert_eq!(got.len(), expected.len());
    for (j, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let tol = 2f64.powi(-25) + e.abs() * 2f64.powi(-23);
        assert!((f64::from(g) - e).abs() <= tol, "value {j}: got {g}, expected {e} (tolerance {tol:e})");
    }
}

fn settings(dir: &Path, rounds: u64, clients: usize, min_fit: usize) -> Result<CoordinatorSettings> {
    let model = write_fake_model(&dir.join("model"), 2, 8)?;
    let mut s = quick_settings(&dir.join("state"), &model, rounds, clients, min_fit);
    s.evaluation.every = 0;
    // Start only once every scenario client joined, so each is sampled.
    s.rounds.min_available = clients;
    Ok(s)
}

/// Runs one round in which clients upload in `order`; returns the trainable model before and
/// after, and the per-client (examples, delta).
async fn one_round(dir: &Path, order: &[usize]) -> Result<(Vec<f32>, Vec<f32>, Vec<(u64, Vec<f32>)>)> {
    let coord = InProcess::start(settings(dir, 1, 3, 3)?).await?;
    let examples = [10u64, 30, 60];
    let mut clients = Vec::new();
    for k in 0..3 {
        clients.push(TestClient::join(&coord.url, &format!("site-{k}"), 0).await?);
    }
    let v0 = clients[0].download_vector(ModelVersion(0), ModelScope::Trainable).await?;
    let n = v0.values().len();
    let mut tasks = Vec::new();
    for c in &mut clients {
        tasks.push(c.wait_for_fit(WAIT).await?);
    }
    for &k in order {
        let receipt = clients[k].upload(&tasks[k], examples[k], &f32_bytes(&update_values(k, n))).await?;
        assert_eq!(receipt.id, RoundId::new(1, 0));
    }
    clients[0].wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;
    let v1 = clients[0].download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    coord.shutdown().await?;
    let updates = (0..3).map(|k| (examples[k], update_values(k, n))).collect();
    Ok((v0.values().to_vec(), v1.values().to_vec(), updates))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_global_is_the_example_weighted_mean_whatever_the_arrival_order() -> Result<()> {
    let a = tempfile::tempdir()?;
    let (v0, v1, updates) = one_round(a.path(), &[0, 1, 2]).await?;
    assert_close(&v1, &weighted_mean_step(&v0, &updates));

    // Fixed-point accumulation: another arrival order gives the same bits.
    let b = tempfile::tempdir()?;
    let (v0b, v1b, _) = one_round(b.path(), &[2, 0, 1]).await?;
    assert_eq!(v0, v0b);
    assert_eq!(
        v1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        v1b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_at_the_next_round_without_losing_a_completed_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = settings(dir.path(), 2, 2, 2)?;

    let coord = InProcess::start(s.clone()).await?;
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    let mut b = TestClient::join(&coord.url, "b", 0).await?;
    let n = a.trainable().numel();
    let (ta, tb) = (a.wait_for_fit(WAIT).await?, b.wait_for_fit(WAIT).await?);
    a.upload(&ta, 5, &f32_bytes(&update_values(0, n))).await?;
    b.upload(&tb, 7, &f32_bytes(&update_values(1, n))).await?;
    a.wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;
    let v1 = a.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    coord.shutdown().await?;

    // Same state directory, new process state.
    let coord = InProcess::start(s).await?;
    let mut old_session = a.clone();
    old_session.set_token(a.joined.as_ref().map(|j| j.session_token.clone()));
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    let status = a.status().await?;
    assert_eq!(status.model_version, ModelVersion(1), "round 1 survived the restart");
    // Round 2 had started before the stop (its attempt 0 is now recorded as aborted), so the
    // resumed coordinator retries round 2 with the next attempt number.
    assert_eq!(status.round.round, 2, "the coordinator resumes at round 2");
    let aborted: Vec<RoundId> =
        status.recent_rounds.iter().filter(|r| r.status == "aborted").map(|r| r.id).collect();
    assert!(aborted.iter().all(|id| id.round == 2 && id.attempt < status.round.attempt), "{aborted:?}");
    assert_eq!(status.recent_rounds.iter().filter(|r| r.status == "completed").count(), 1);
    let v1_again = a.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    assert_eq!(v1_again, v1, "the resumed model is bit-identical");

    // A token from before the restart is not honoured; the agent must join again.
    let mut stale = TestClient::connect(&coord.url).await?;
    stale.set_token(old_session.joined.as_ref().map(|j| j.session_token.clone()));
    expect_status(stale.poll(Duration::ZERO).await, Code::Unauthenticated, &["join again"]);

    let mut b = TestClient::join(&coord.url, "b", 0).await?;
    let (ta, tb) = (a.wait_for_fit(WAIT).await?, b.wait_for_fit(WAIT).await?);
    assert_eq!(ta.id.round, 2);
    assert_eq!(ta.model.version, ModelVersion(1));
    a.upload(&ta, 5, &f32_bytes(&update_values(2, n))).await?;
    b.upload(&tb, 7, &f32_bytes(&update_values(3, n))).await?;
    assert_eq!(a.wait_finished(WAIT).await?, ModelVersion(2));
    let status = a.status().await?;
    let completed: Vec<u64> =
        status.recent_rounds.iter().filter(|r| r.status == "completed").map(|r| r.id.round).collect();
    assert_eq!(completed, vec![2, 1]);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_breaks_off_mid_upload_is_dropped_and_the_round_completes_with_the_others() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path(), 1, 3, 2)?;
    s.clients.heartbeat_interval = Duration::from_millis(200);
    s.clients.liveness_timeout = Duration::from_secs(1);
    let spool = s.storage.state_dir.join("spool");
    let coord = InProcess::start(s).await?;
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    let mut b = TestClient::join(&coord.url, "b", 0).await?;
    let mut c = TestClient::join(&coord.url, "c", 0).await?;
    let v0 = a.download_vector(ModelVersion(0), ModelScope::Trainable).await?;
    let n = v0.values().len();
    let (ta, tb, tc) =
        (a.wait_for_fit(WAIT).await?, b.wait_for_fit(WAIT).await?, c.wait_for_fit(WAIT).await?);

    c.upload_and_break_off(&tc, 1000, &f32_bytes(&update_values(9, n)), 1).await;
    a.upload(&ta, 10, &f32_bytes(&update_values(0, n))).await?;
    b.upload(&tb, 30, &f32_bytes(&update_values(1, n))).await?;

    // c went silent: after the liveness timeout it is a dropout, and the round closes with 2.
    let status = a.wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;
    let round = &status.recent_rounds[0];
    assert_eq!((round.status.as_str(), round.accepted, round.failed), ("completed", 2, 1));
    let v1 = a.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    assert_close(
        v1.values(),
        &weighted_mean_step(v0.values(), &[(10, update_values(0, n)), (30, update_values(1, n))]),
    );
    assert!(files_in(&spool).is_empty(), "the broken upload left {:?}", files_in(&spool));
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_straggler_past_the_deadline_is_excluded_and_told_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path(), 1, 4, 2)?;
    s.rounds.deadline = Duration::from_secs(60);
    // Liveness far beyond the deadline: only the deadline may exclude anyone here.
    s.clients.heartbeat_interval = Duration::from_secs(1);
    s.clients.liveness_timeout = Duration::from_secs(3600);
    // Nor may the idle timeout between upload messages.
    s.server.upload_idle_timeout = Duration::from_secs(600);
    let coord = InProcess::start(s).await?;
    let mut clients = Vec::new();
    for name in ["a", "b", "late-start", "slow-upload"] {
        clients.push(TestClient::join(&coord.url, name, 0).await?);
    }
    let n = clients[0].trainable().numel();
    let mut tasks = Vec::new();
    for c in &mut clients {
        tasks.push(c.wait_for_fit(WAIT).await?);
    }
    clients[0].upload(&tasks[0], 10, &f32_bytes(&update_values(0, n))).await?;
    clients[1].upload(&tasks[1], 10, &f32_bytes(&update_values(1, n))).await?;

    // "slow-upload" starts in time but is still streaming at the deadline: its stream ends then.
    let payload = f32_bytes(&update_values(3, n));
    let header = clients[3].header(&tasks[3], 10, payload.len() as u64);
    let (tx, rx) = mpsc::channel(4);
    let mut slow = clients[3].clone();
    tx.send(pb::UploadUpdateRequest::from(UploadItem::Header(header))).await?;
    let call = tokio::spawn(async move { slow.upload_stream(ReceiverStream::new(rx)).await });

    tokio::time::sleep(Duration::from_secs(61)).await;

    // The coordinator may have closed the stream already; what is sent now must not count.
    let _ = tx.send(UploadItem::Chunk(Chunk { offset: 0, data: payload.clone().into() }).into()).await;
    let _ = tx
        .send(
            UploadItem::Trailer(UpdateTrailer {
                payload_digest: fedtune_shared::ids::Sha256::of(&payload),
                signature: None,
            })
            .into(),
        )
        .await;
    drop(tx);
    expect_status(call.await?, Code::FailedPrecondition, &["round 1 (attempt 0)", "deadline"]);

    // "late-start" only now begins its upload.
    let late = clients[2].upload(&tasks[2], 10, &f32_bytes(&update_values(2, n))).await;
    expect_status(late, Code::FailedPrecondition, &["round 1 (attempt 0)", "deadline"]);

    let status = clients[0].wait_status(WAIT, |s| s.phase == PhaseName::Finished).await?;
    let round = &status.recent_rounds[0];
    assert_eq!((round.status.as_str(), round.accepted, round.failed), ("completed", 2, 2));
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_from_an_offset_and_matches_the_published_digest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 4, 512)?;
    let s = quick_settings(&dir.path().join("state"), &model, 1, 1, 1);
    let coord = InProcess::start(s).await?;
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    // Several chunks' worth: 4 layers of 512×512 f32 ≈ 4.2 MB.
    let (header, first) = a.download(ModelVersion(0), ModelScope::Full, 0, Some(2)).await?;
    assert!(header.total_bytes > 4 * (1 << 20));
    assert_eq!(first.len(), 2 << 20, "two 1 MiB chunks before the break");
    let (resumed, rest) = a.download(ModelVersion(0), ModelScope::Full, first.len() as u64, None).await?;
    assert_eq!(resumed.start_offset, first.len() as u64);
    assert_eq!(resumed.payload_digest, header.payload_digest, "the digest covers the whole payload");
    let whole = [first, rest].concat();
    assert_eq!(whole.len() as u64, header.total_bytes);
    assert_eq!(fedtune_shared::ids::Sha256::of(&whole), header.payload_digest);
    assert_eq!(Some(header.payload_digest), a.joined.as_ref().map(|j| j.model.full_payload));

    // Another version than the published one is refused, naming the current one.
    let err = a.download(ModelVersion(5), ModelScope::Full, 0, None).await;
    expect_status(err, Code::FailedPrecondition, &["v5", "v0"]);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_evaluation_records_example_weighted_figures_per_round() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path(), 1, 2, 2)?;
    s.evaluation.every = 1;
    s.evaluation.min_clients = 2;
    let coord = InProcess::start(s).await?;
    let mut a = TestClient::join(&coord.url, "a", 10).await?;
    let mut b = TestClient::join(&coord.url, "b", 30).await?;
    let n = a.trainable().numel();
    let (ta, tb) = (a.wait_for_fit(WAIT).await?, b.wait_for_fit(WAIT).await?);
    a.upload(&ta, 5, &f32_bytes(&update_values(0, n))).await?;
    b.upload(&tb, 5, &f32_bytes(&update_values(1, n))).await?;
    for (c, examples, loss, acc) in [(&mut a, 10u64, 1.0, 0.5), (&mut b, 30, 2.0, 0.9)] {
        let task = loop {
            match c.poll(Duration::from_millis(500)).await? {
                fedtune_shared::round::Task::Evaluate(e) => break e,
                fedtune_shared::round::Task::Finished { .. } => anyhow::bail!("finished before evaluating"),
                _ => {}
            }
        };
        assert_eq!(task.model.version, ModelVersion(1));
        let report = fedtune_shared::round::EvalReport {
            round: task.round,
            model_version: task.model.version,
            num_examples: examples,
            loss,
            accuracy: acc,
            metrics: [("macro_f1".to_string(), acc)].into_iter().collect(),
        };
        c.report_evaluation(&report).await?;
        // A second report for the same task is refused.
        expect_status(c.report_evaluation(&report).await, Code::FailedPrecondition, &["no evaluation task"]);
    }
    let status = a.wait_status(WAIT, |s| s.phase == PhaseName::Finished).await?;
    let r = &status.recent_rounds[0];
    assert!((r.eval_loss - 1.75).abs() < 1e-12, "weighted loss {}", r.eval_loss);
    assert!((r.eval_accuracy - 0.8).abs() < 1e-12, "weighted accuracy {}", r.eval_accuracy);
    assert_eq!(r.eval_examples, 40);
    coord.shutdown().await?;
    Ok(())
}
