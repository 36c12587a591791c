//! Unauthenticated calls cannot make the coordinator buffer large request bodies. A file of its
//! own: it measures the resident memory of its process, which other scenarios would disturb.

use std::time::Duration;

use anyhow::Result;
use fedtune_shared::pb;
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{expect_status, InProcess, TestClient};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

/// Resident memory of this process (the in-process coordinator and its test clients), in bytes.
fn rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(kib << 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4_mb_join_challenge_is_refused_before_it_is_buffered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let coord = InProcess::start(quick_settings(&dir.path().join("state"), &model, 1, 1, 1)).await?;
    let huge = pb::JoinChallengeRequest { client_name: "x".repeat(4_400_000) };
    let one = TestClient::connect(&coord.url).await?;
    let refused = one.raw().join_challenge(huge.clone()).await;
    expect_status(refused, Code::ResourceExhausted, &["JoinChallenge", "exceeds its limit"]);

    // 8 connections × 8 streams at once, as the measured attack did (at a quarter of its scale).
    let before = rss_bytes()?;
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
    let after = rss_bytes()?;
    let grown = after.saturating_sub(before);
    println!("RSS before {} MiB, after 64 refused 4.4 MB calls {} MiB", before >> 20, after >> 20);
    // Buffering the calls would hold 64 × 4.4 MB ≈ 280 MB on the coordinator's side alone.
    assert!(grown < 128 << 20, "RSS grew by {} MiB", grown >> 20);
    coord.shutdown().await?;
    Ok(())
}
