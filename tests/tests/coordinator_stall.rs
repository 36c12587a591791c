//! No single peer stalls or locks out the coordinator's uploads: hung uploaders lose their slot,
//! waiting for a slot and streaming end with the round (at its deadline, or when it closes
//! earlier), tiny chunks and inflated weights are refused — and the honest updates of the same
//! round are folded all the same.

use std::time::Duration;

use anyhow::Result;
use fedtune_coordinator::CoordinatorSettings;
use fedtune_shared::chunk::MIN_CHUNK_BYTES;
use fedtune_shared::ids::{ModelVersion, RoundId};
use fedtune_shared::pb;
use fedtune_shared::round::{
    Chunk, ClientActivity, FitTask, ModelScope, UploadAdmission, UploadItem, UploadReceipt,
};
use fedtune_tests::fixtures::{one_round_settings, write_fake_model};
use fedtune_tests::grpc::{expect_status, f32_bytes, update_values, InProcess, TestClient};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

const WAIT: Duration = Duration::from_secs(20);

/// One upload slot, and neither the idle timeout nor liveness ends anything within a test: only
/// what the test is about (the deadline, the queue, the round closing) may end a wait.
fn one_upload_slot(s: &mut CoordinatorSettings) {
    s.server.max_concurrent_uploads = 1;
    s.server.upload_idle_timeout = Duration::from_secs(600);
    s.clients.heartbeat_interval = Duration::from_secs(1);
    s.clients.liveness_timeout = Duration::from_secs(3600);
}

/// Starts an upload that sends its header and then nothing, keeping the stream open: the
/// returned sender keeps it open until dropped.
async fn hang_after_header(
    client: &TestClient,
    task: &FitTask,
    n: usize,
) -> Result<(mpsc::Sender<pb::UploadUpdateRequest>, JoinHandle<Result<UploadReceipt, Status>>)> {
    let payload = f32_bytes(&update_values(99, n));
    let header = client.header(task, 10, payload.len() as u64);
    let (tx, rx) = mpsc::channel(4);
    tx.send(UploadItem::Header(header).into()).await?;
    let mut c = client.clone();
    Ok((tx, tokio::spawn(async move { c.upload_stream(ReceiverStream::new(rx)).await })))
}

/// `global + Σ nₖ·Δₖ / Σ nₖ` in f64, and the fixed-point tolerance (half a 2⁻²⁴ step plus f32
/// rounding).
fn assert_is_weighted_mean(global: &[f32], updates: &[(u64, Vec<f32>)], got: &[f32]) {
    let total: u64 = updates.iter().map(|(n, _)| n).sum();
    for (j, &g) in got.iter().enumerate() {
        let s: f64 = updates.iter().map(|(n, d)| *n as f64 * f64::from(d[j])).sum();
        let e = f64::from(global[j]) + s / total as f64;
        let tol = 2f64.powi(-25) + e.abs() * 2f64.powi(-23);
        assert!((f64::from(g) - e).abs() <= tol, "value {j}: got {g}, expected {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hung_uploaders_do_not_stop_an_honest_update_from_being_folded_in_the_same_round() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let mut s = one_round_settings(dir.path(), 5, 1)?;
    s.server.max_concurrent_uploads = 4;
    s.server.upload_idle_timeout = Duration::from_secs(1);
    let coord = InProcess::start(s).await?;
    let mut honest = TestClient::join(&coord.url, "honest", 0).await?;
    let mut hung = Vec::new();
    for k in 0..4 {
        hung.push(TestClient::join(&coord.url, &format!("hung-{k}"), 0).await?);
    }
    let global = honest.download_vector(ModelVersion(0), ModelScope::Trainable).await?.values().to_vec();
    let n = global.len();
    let task = honest.wait_for_fit(WAIT).await?;
    let mut streams = Vec::new();
    for c in &mut hung {
        let t = c.wait_for_fit(WAIT).await?;
        streams.push(hang_after_header(c, &t, n).await?);
    }
    // Give the hung headers time to take every upload slot before the honest client arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let update = update_values(1, n);
    let receipt = tokio::time::timeout(WAIT, honest.upload(&task, 10, &f32_bytes(&update))).await??;
    assert_eq!(receipt.id, RoundId::new(1, 0), "folded in the round it was trained for, not a retry");
    for (tx, call) in streams {
        let answer = tokio::time::timeout(WAIT, call).await??;
        expect_status(answer, Code::DeadlineExceeded, &["upload_idle_timeout"]);
        drop(tx);
    }
    assert_eq!(honest.wait_finished(WAIT).await?, ModelVersion(1));
    let v1 = honest.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    assert_is_weighted_mean(&global, &[(10, update)], v1.values());
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_an_upload_slot_and_streaming_both_end_at_the_round_deadline() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = one_round_settings(dir.path(), 2, 1)?;
    one_upload_slot(&mut s);
    s.rounds.deadline = Duration::from_secs(4);
    let coord = InProcess::start(s).await?;
    let mut holder = TestClient::join(&coord.url, "holder", 0).await?;
    let mut waiter = TestClient::join(&coord.url, "waiter", 0).await?;
    let n = holder.trainable().numel();
    let (th, tw) = (holder.wait_for_fit(WAIT).await?, waiter.wait_for_fit(WAIT).await?);
    let (tx, held) = hang_after_header(&holder, &th, n).await?;
    // Give the hung header time to take the only upload slot.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The waiter's reservation waits for the slot (well inside `server.long_poll`) until the
    // deadline ends it; no upload stream was opened.
    let waited = tokio::time::timeout(WAIT, waiter.upload(&tw, 10, &f32_bytes(&update_values(2, n)))).await?;
    expect_status(
        waited,
        Code::FailedPrecondition,
        &["round 1 (attempt 0)", "deadline passed before an upload slot came free"],
    );
    expect_status(
        tokio::time::timeout(WAIT, held).await??,
        Code::FailedPrecondition,
        &["round 1 (attempt 0)", "deadline"],
    );
    drop(tx);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_beyond_the_busy_slots_and_the_full_queue_is_told_to_retry_at_once_and_its_upload_folds_later(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = one_round_settings(dir.path(), 3, 1)?;
    one_upload_slot(&mut s);
    s.server.upload_queue = 1;
    // Far beyond the test's waits: only the queue bound can answer the third reservation in time.
    s.rounds.deadline = Duration::from_secs(120);
    s.server.long_poll = Duration::from_secs(60);
    s.server.request_timeout = Duration::from_secs(90);
    let coord = InProcess::start(s).await?;
    let mut holder = TestClient::join(&coord.url, "holder", 0).await?;
    let mut waiter = TestClient::join(&coord.url, "waiter", 0).await?;
    let mut late = TestClient::join(&coord.url, "late", 0).await?;
    let n = holder.trainable().numel();
    let th = holder.wait_for_fit(WAIT).await?;
    let tw = waiter.wait_for_fit(WAIT).await?;
    let tl = late.wait_for_fit(WAIT).await?;
    // The holder's upload takes the only slot, the waiter's reservation the only waiting place.
    let (holder_tx, held) = hang_after_header(&holder, &th, n).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = tokio::spawn({
        let mut waiter = waiter.clone();
        async move { waiter.reserve_upload(tw.id, Duration::from_secs(60)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let asked = tokio::time::Instant::now();
    let told = tokio::time::timeout(WAIT, late.reserve_upload(tl.id, Duration::from_secs(60))).await??;
    assert!(matches!(told, UploadAdmission::RetryAfter(p) if !p.is_zero()), "{told:?}");
    assert!(asked.elapsed() < Duration::from_secs(30), "answered at once, not at the end of its wait");
    assert!(!waiting.is_finished(), "the waiter still waits for the slot");

    // The hung stream ends (its client went away): the slot goes to the waiter, whose upload
    // folds; then the late client's.
    drop(holder_tx);
    assert!(tokio::time::timeout(WAIT, held).await??.is_err(), "a truncated upload is not accepted");
    let granted = tokio::time::timeout(WAIT, waiting).await???;
    assert!(matches!(granted, UploadAdmission::Granted { .. }), "{granted:?}");
    let payload = f32_bytes(&update_values(3, n));
    tokio::time::timeout(WAIT, waiter.upload(&tw, 10, &payload)).await??;
    let receipt = tokio::time::timeout(WAIT, late.upload(&tl, 10, &payload)).await??;
    assert_eq!(receipt.id, RoundId::new(1, 0), "the late upload is folded in the round it was trained for");
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_still_streaming_when_its_round_closes_is_ended() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = one_round_settings(dir.path(), 1, 1)?;
    one_upload_slot(&mut s);
    // Far beyond the test's waits: only the round closing can end the stream here.
    s.rounds.deadline = Duration::from_secs(120);
    let coord = InProcess::start(s).await?;
    let mut c = TestClient::join(&coord.url, "quitter", 0).await?;
    let n = c.trainable().numel();
    let task = c.wait_for_fit(WAIT).await?;
    let (tx, held) = hang_after_header(&c, &task, n).await?;
    c.wait_status(WAIT, |s| {
        s.clients.iter().any(|x| x.client_id.as_str() == "quitter" && x.activity == ClientActivity::Uploading)
    })
    .await?;
    // Its only participant gives up while its upload still streams: the round closes (too few
    // updates) long before its deadline, and the stream must end with it.
    c.report_fit_failure(&task, "gave up").await?;
    expect_status(
        tokio::time::timeout(WAIT, held).await??,
        Code::FailedPrecondition,
        &["round 1 (attempt 0)", "closed before the upload completed"],
    );
    // The only upload slot was given back: the retry attempt's upload is received and folded.
    let retry = c.wait_for_fit(WAIT).await?;
    assert_eq!(retry.id, RoundId::new(1, 1));
    let receipt =
        tokio::time::timeout(WAIT, c.upload(&retry, 10, &f32_bytes(&update_values(1, n)))).await??;
    assert_eq!(receipt.id, RoundId::new(1, 1));
    drop(tx);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_claiming_2_pow_31_minus_1_examples_is_refused_and_the_honest_ones_fold() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let coord = InProcess::start(one_round_settings(dir.path(), 3, 2)?).await?;
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    let mut b = TestClient::join(&coord.url, "b", 0).await?;
    let mut inflated = TestClient::join(&coord.url, "inflated", 0).await?;
    let global = a.download_vector(ModelVersion(0), ModelScope::Trainable).await?.values().to_vec();
    let n = global.len();
    let (ta, tb, ti) =
        (a.wait_for_fit(WAIT).await?, b.wait_for_fit(WAIT).await?, inflated.wait_for_fit(WAIT).await?);

    let claim = (1u64 << 31) - 1;
    let refused = inflated.upload(&ti, claim, &f32_bytes(&update_values(9, n))).await;
    expect_status(refused, Code::InvalidArgument, &["num_examples = 2147483647", "per-update cap"]);
    let (ua, ub) = (update_values(1, n), update_values(2, n));
    a.upload(&ta, 11, &f32_bytes(&ua)).await?;
    b.upload(&tb, 13, &f32_bytes(&ub)).await?;

    assert_eq!(a.wait_finished(WAIT).await?, ModelVersion(1));
    let v1 = a.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    assert_is_weighted_mean(&global, &[(11, ua), (13, ub)], v1.values());
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_final_upload_chunk_below_the_minimum_is_refused_naming_its_size() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = one_round_settings(dir.path(), 1, 1)?;
    // A model whose trainable payload spans more than one minimum-sized chunk.
    let model = write_fake_model(&dir.path().join("big-model"), 1, 600)?;
    s.model.init_dir = model;
    let coord = InProcess::start(s).await?;
    let mut c = TestClient::join(&coord.url, "tiny-chunks", 0).await?;
    let n = c.trainable().numel();
    assert!(n * 4 > MIN_CHUNK_BYTES, "the payload must need more than one chunk");
    let task = c.wait_for_fit(WAIT).await?;
    let payload = f32_bytes(&update_values(1, n));
    let items = vec![
        pb::UploadUpdateRequest::from(UploadItem::Header(c.header(&task, 10, payload.len() as u64))),
        UploadItem::Chunk(Chunk { offset: 0, data: payload[..4].to_vec().into() }).into(),
    ];
    let refused = c.upload_raw(items).await;
    expect_status(refused, Code::InvalidArgument, &["has 4 bytes", &MIN_CHUNK_BYTES.to_string()]);
    // The refusal cost the client nothing: a well-chunked upload of the same update is folded.
    c.upload(&task, 10, &payload).await?;
    assert_eq!(c.wait_finished(WAIT).await?, ModelVersion(1));
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_streams_at_most_two_downloads_and_one_it_never_reads_ends_after_the_send_timeout_but_keeps_its_slot(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = one_round_settings(dir.path(), 1, 1)?;
    // A model of a dozen chunks, more than the stream's buffers and flow-control windows hold.
    s.model.init_dir = write_fake_model(&dir.path().join("big-model"), 1, 1200)?;
    s.server.download_send_timeout = Duration::from_secs(1);
    let coord = InProcess::start(s).await?;
    let mut c = TestClient::join(&coord.url, "never-reads", 0).await?;
    let mut first = c.open_download(ModelVersion(0), ModelScope::Trainable).await?;
    let second = c.open_download(ModelVersion(0), ModelScope::Trainable).await?;
    let third = c.open_download(ModelVersion(0), ModelScope::Trainable).await;
    expect_status(third, Code::ResourceExhausted, &["2 downloads"]);

    // Past the send timeout the coordinator stops producing: read late, the stream ends with
    // DEADLINE_EXCEEDED instead of looking complete.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ended = async {
        while first.message().await?.is_some() {}
        Ok::<_, Status>(())
    };
    expect_status(
        tokio::time::timeout(WAIT, ended).await?,
        Code::DeadlineExceeded,
        &["download_send_timeout"],
    );
    // The chunks it had produced for the unread stream stay buffered until the client lets go of
    // it, and so does its slot: holding `second`, the client still may not open two more.
    drop(first);
    let reopen = async {
        loop {
            match c.open_download(ModelVersion(0), ModelScope::Trainable).await {
                Ok(stream) => return Ok(stream),
                // The slot of the stream read to its end is freed as the coordinator finishes
                // it, which may trail the client's reading of its last message by a moment.
                Err(e) if e.message().contains("2 downloads") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    };
    let _again = tokio::time::timeout(WAIT, reopen).await??;
    let over = c.open_download(ModelVersion(0), ModelScope::Trainable).await;
    expect_status(over, Code::ResourceExhausted, &["2 downloads"]);
    drop((second, _again));

    // Once it let go of them, the client may download again.
    let until = tokio::time::Instant::now() + WAIT;
    let fresh = loop {
        match c.download_vector(ModelVersion(0), ModelScope::Trainable).await {
            Ok(v) => break v,
            Err(e) if tokio::time::Instant::now() < until => {
                assert!(e.to_string().contains("2 downloads"), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.context("the released downloads never freed their slots")),
        }
    };
    assert_eq!(fresh.values().len(), c.trainable().numel());
    coord.shutdown().await?;
    Ok(())
}
