//! Neither unauthenticated calls with large request bodies nor a client that opens downloads and
//! never reads them can make the coordinator hold memory. The coordinator runs as its own process
//! so that its memory is measured apart from the test's clients, which hold every 4.4 MB request
//! they send and every download they leave unread.

use std::time::Duration;

use anyhow::{Context, Result};
use fedtune_shared::ids::ModelVersion;
use fedtune_shared::pb;
use fedtune_shared::round::ModelScope;
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{expect_status, TestClient};
use fedtune_tests::process::{resident_memory, CoordinatorProc};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4_mb_join_challenge_is_refused_before_it_is_buffered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let coord =
        CoordinatorProc::start(quick_settings(&dir.path().join("state"), &model, 1, 1, 1), dir.path())?;
    coord.wait_for(WAIT, |_| true).await?;
    let pid = coord.proc.as_ref().and_then(|p| p.pid()).context("coordinator not running")?;

    let huge = pb::JoinChallengeRequest { client_name: "x".repeat(4_400_000) };
    let one = TestClient::connect(&coord.url).await?;
    let refused = one.raw().join_challenge(huge.clone()).await;
    expect_status(refused, Code::ResourceExhausted, &["JoinChallenge", "exceeds its limit"]);

    // 8 connections × 8 streams at once, as the measured attack did (at a quarter of its scale).
    let (before, _) = resident_memory(pid)?;
    let mut calls = Vec::new();
    for _ in 0..8 {
        let conn = TestClient::connect(&coord.url).await?;
        for _ in 0..8 {
            let (mut c, req) = (conn.raw(), huge.clone());
            calls.push(tokio::spawn(async move { c.join_challenge(req).await.map(|_| ()) }));
        }
    }
    for call in calls {
        let answer = tokio::time::timeout(WAIT, call).await??;
        expect_status(answer, Code::ResourceExhausted, &["exceeds its limit"]);
    }
    let (after, peak) = resident_memory(pid)?;
    println!(
        "coordinator RSS before {} MiB, after 64 refused 4.4 MB calls {} MiB, peak {} MiB",
        before >> 20,
        after >> 20,
        peak >> 20
    );
    // Buffering the calls would hold 64 × 4.4 MB ≈ 280 MB; the peak counts even if it was freed.
    let grown = peak.saturating_sub(before);
    assert!(grown < 96 << 20, "the coordinator's peak RSS grew by {} MiB", grown >> 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_a_client_never_reads_hold_its_two_slots_and_no_more_memory_however_often_it_opens_them(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // About 5.8 MB of trainable values: six 1 MiB chunks, more than a stream buffers ahead.
    let model = write_fake_model(&dir.path().join("model"), 1, 1200)?;
    let mut s = quick_settings(&dir.path().join("state"), &model, 1, 2, 2);
    s.server.download_send_timeout = Duration::from_millis(300);
    let coord = CoordinatorProc::start(s, dir.path())?;
    coord.wait_for(WAIT, |_| true).await?;
    let pid = coord.proc.as_ref().and_then(|p| p.pid()).context("coordinator not running")?;
    let client = TestClient::join(&coord.url, "never-reads", 0).await?;

    // Every second, two more downloads on a fresh connection, none of them ever read, every
    // stream and connection kept open.
    let (before, _) = resident_memory(pid)?;
    let (mut held, mut conns, mut opened) = (Vec::new(), Vec::new(), 0);
    for _ in 0..12 {
        let mut conn = TestClient::connect(&coord.url).await?;
        conn.set_token(client.token());
        for _ in 0..2 {
            match conn.open_download(ModelVersion(0), ModelScope::Trainable).await {
                Ok(stream) => {
                    opened += 1;
                    held.push(stream);
                }
                Err(e) => {
                    expect_status(Err::<(), _>(e), Code::ResourceExhausted, &["2 downloads"]);
                }
            }
        }
        conns.push(conn);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (after, peak) = resident_memory(pid)?;
    println!(
        "{opened} unread downloads opened; coordinator RSS before {} MiB, after {} MiB, peak {} MiB",
        before >> 20,
        after >> 20,
        peak >> 20
    );
    assert_eq!(opened, 2, "a client that never reads its two downloads gets no third");
    let grown = after.saturating_sub(before);
    assert!(grown < 24 << 20, "the coordinator's RSS grew by {} MiB", grown >> 20);

    // Once it lets go of them, the client may download again.
    drop((held, conns));
    let mut reader = client.clone();
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        match reader.download_vector(ModelVersion(0), ModelScope::Trainable).await {
            Ok(v) => break assert_eq!(v.values().len(), reader.trainable().numel()),
            Err(e) if tokio::time::Instant::now() < until => {
                assert!(e.to_string().contains("2 downloads"), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.context("the released downloads never freed their slots")),
        }
    }
    Ok(())
}
