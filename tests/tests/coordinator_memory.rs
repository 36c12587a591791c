//! Unauthenticated calls cannot make the coordinator buffer large request bodies. The coordinator
//! runs as its own process so that its memory is measured apart from the test's clients, which
//! hold every 4.4 MB request they send.

use std::time::Duration;

use anyhow::{Context, Result};
use fedtune_shared::pb;
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
