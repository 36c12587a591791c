//! Crash and dropout scenarios with the real binaries: `fedtune-coordinator serve` and
//! `fedtune-client run --fake-trainer` processes on loopback, killed with SIGKILL at the worst
//! moments. Needs `cargo build --workspace` first (scripts/test.sh does it).

use std::time::Duration;

use anyhow::Result;
use fedtune_shared::pb;
use fedtune_shared::round::{ClientActivity, PhaseName, RoundSummary, StatusReport};
use fedtune_tests::fixtures::{quick_settings, write_fake_model, write_sentiment_csv};
use fedtune_tests::grpc::{expect_status, TestClient};
use fedtune_tests::process::{completed_rounds, start_client, CoordinatorProc, Proc};
use tonic::Code;

/// Client flags for fast scenarios: fake training taking `fit_ms`, quick retries.
fn client_args(fit_ms: &str) -> Vec<&str> {
    vec![
        "--fake-trainer",
        "--fake-fit-ms",
        fit_ms,
        "--poll-wait",
        "2s",
        "--max-backoff",
        "500ms",
        "--give-up-after",
        "90s",
    ]
}

fn completed(report: &StatusReport, round: u64) -> Option<RoundSummary> {
    report.recent_rounds.iter().find(|r| r.id.round == round && r.status == "completed").cloned()
}

/// Every client exits by itself, successfully, once the federation is finished; returns their logs.
async fn all_exit_cleanly(clients: &mut [Proc]) -> Result<Vec<String>> {
    let mut logs = Vec::new();
    for c in clients.iter_mut() {
        let status = c.wait(Duration::from_secs(60)).await?;
        assert!(status.success(), "client exited with {status}:\n{}", c.log_text());
        logs.push(c.log_text());
    }
    Ok(logs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_round_resumes_and_its_clients_carry_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 60, 1)?;
    let mut coordinator =
        CoordinatorProc::start(quick_settings(&dir.path().join("state"), &model, 4, 3, 3), dir.path())?;
    let mut clients = (0..3)
        .map(|k| {
            start_client(&coordinator.url, &format!("site-{k}"), &data, &client_args("1500"), dir.path())
        })
        .collect::<Result<Vec<_>>>()?;

    // Round 2 is under way: its clients are training.
    let before = coordinator
        .wait_for(Duration::from_secs(60), |s| {
            completed(s, 1).is_some() && s.round.round == 2 && s.phase == PhaseName::Training
        })
        .await?;
    coordinator.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    coordinator.restart()?;

    let after = coordinator.wait_for(Duration::from_secs(120), |s| s.phase == PhaseName::Finished).await?;
    assert_eq!(completed_rounds(&after), vec![1, 2, 3, 4], "{after:#?}");
    // The round completed before the crash is the same record, not a redo.
    let (r1_before, r1_after) = (completed(&before, 1).unwrap(), completed(&after, 1).unwrap());
    assert_eq!((r1_before.id, r1_before.total_examples), (r1_after.id, r1_after.total_examples));
    assert_eq!(r1_before.train_loss.to_bits(), r1_after.train_loss.to_bits());
    // Clients found the restarted coordinator by themselves: each joined twice.
    for log in all_exit_cleanly(&mut clients).await? {
        assert!(log.matches("joined the federation").count() >= 2, "{log}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_between_rounds_loses_no_completed_round() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 60, 2)?;
    let mut coordinator =
        CoordinatorProc::start(quick_settings(&dir.path().join("state"), &model, 4, 3, 3), dir.path())?;
    let mut clients = (0..3)
        .map(|k| start_client(&coordinator.url, &format!("site-{k}"), &data, &client_args("300"), dir.path()))
        .collect::<Result<Vec<_>>>()?;

    // Round 2 has just been committed and published.
    let before = coordinator.wait_for(Duration::from_secs(60), |s| completed(s, 2).is_some()).await?;
    coordinator.kill9();
    coordinator.restart()?;

    // Straight after the restart the published version is still at least 2.
    let resumed = coordinator.wait_for(Duration::from_secs(30), |_| true).await?;
    assert!(resumed.model_version.0 >= 2, "version {} after restart", resumed.model_version);
    let after = coordinator.wait_for(Duration::from_secs(120), |s| s.phase == PhaseName::Finished).await?;
    assert_eq!(completed_rounds(&after), vec![1, 2, 3, 4]);
    for round in [1, 2] {
        let (b, a) = (completed(&before, round).unwrap(), completed(&after, round).unwrap());
        assert_eq!(
            (b.id, b.accepted, b.total_examples),
            (a.id, a.accepted, a.total_examples),
            "round {round}"
        );
    }
    all_exit_cleanly(&mut clients).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_upload_does_not_stop_a_round_that_still_has_min_fit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // ~3 MB of trainable weights; the victim uploads at 200 kB/s, so it is caught mid-stream.
    let model = write_fake_model(&dir.path().join("model"), 2, 512)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 60, 3)?;
    // One round, which starts only once all four are there and must end with the three left.
    let mut settings = quick_settings(&dir.path().join("state"), &model, 1, 4, 3);
    settings.rounds.min_available = 4;
    let coordinator = CoordinatorProc::start(settings, dir.path())?;
    let url = coordinator.url.clone();
    let mut healthy = (0..3)
        .map(|k| start_client(&url, &format!("site-{k}"), &data, &client_args("200"), dir.path()))
        .collect::<Result<Vec<_>>>()?;
    let mut victim_args = client_args("200");
    victim_args.extend(["--upload-rate-limit", "200000"]);
    let mut victim = start_client(&url, "victim", &data, &victim_args, dir.path())?;

    coordinator
        .wait_for(Duration::from_secs(60), |s| {
            s.clients
                .iter()
                .any(|c| c.client_id.as_str() == "victim" && c.activity == ClientActivity::Uploading)
        })
        .await?;
    victim.kill9();

    let after = coordinator.wait_for(Duration::from_secs(120), |s| s.phase == PhaseName::Finished).await?;
    let round1 = completed(&after, 1).expect("round 1 completed");
    assert_eq!(round1.accepted, 3, "{round1:#?}");
    assert!(round1.failed >= 1, "the victim counts as a failure: {round1:#?}");
    assert_eq!(completed_rounds(&after), vec![1]);
    all_exit_cleanly(&mut healthy).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_waiting_client_promptly_and_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 30, 4)?;
    // Three clients needed: a lone client joins and then waits for work that never comes.
    let coordinator =
        CoordinatorProc::start(quick_settings(&dir.path().join("state"), &model, 1, 3, 3), dir.path())?;
    let mut client = start_client(&coordinator.url, "lonely", &data, &client_args("100"), dir.path())?;
    coordinator
        .wait_for(Duration::from_secs(30), |s| {
            s.clients.iter().any(|c| c.client_id.as_str() == "lonely" && c.alive)
        })
        .await?;
    client.terminate()?;
    let status = client.wait(Duration::from_secs(10)).await?;
    assert!(status.success(), "{status}:\n{}", client.log_text());
    // Its log went to a file: no colour codes, and the last line is the sentence saying why.
    let log = client.log_text();
    assert!(!log.contains("\u{1b}["), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.starts_with("fedtune-client: stopped on request (SIGINT or SIGTERM); "), "{log}");
    Ok(())
}

/// Whether a JSON log line was written inside the span of `client`'s fit task of `round`.
fn in_fit_span(line: &serde_json::Value, client: &str, round: u64) -> bool {
    line["spans"].as_array().is_some_and(|spans| {
        spans.iter().any(|s| {
            s["name"] == "task"
                && s["client"] == client
                && s["kind"] == "fit"
                && s["round"] == round
                && s["attempt"].is_u64()
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_json_log_puts_everything_it_did_for_a_round_under_one_task_span() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 60, 4)?;
    let coordinator =
        CoordinatorProc::start(quick_settings(&dir.path().join("state"), &model, 2, 2, 2), dir.path())?;
    let mut args = client_args("100");
    args.extend(["--log-format", "json"]);
    let mut clients = (0..2)
        .map(|k| start_client(&coordinator.url, &format!("site-{k}"), &data, &args, dir.path()))
        .collect::<Result<Vec<_>>>()?;
    coordinator.wait_for(Duration::from_secs(60), |s| s.phase == PhaseName::Finished).await?;
    let logs = all_exit_cleanly(&mut clients).await?;
    // Every line but the closing sentence is one JSON object.
    let lines: Vec<serde_json::Value> =
        logs[0].lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(lines.len() + 1 >= logs[0].lines().count(), "{}", logs[0]);
    for round in [1, 2] {
        let steps = lines.iter().filter(|l| in_fit_span(l, "site-0", round)).count();
        assert!(steps >= 2, "round {round}: {steps} lines in site-0's fit span:\n{}", logs[0]);
        assert!(
            !lines.iter().any(|l| in_fit_span(l, "site-1", round)),
            "site-1's span in site-0's log:\n{}",
            logs[0]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_call_is_logged_in_a_span_naming_the_client_and_the_call() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let settings = quick_settings(&dir.path().join("state"), &model, 1, 3, 3);
    let coordinator = CoordinatorProc::start_with_flags(settings, dir.path(), &["--log-format", "json"])?;
    coordinator.wait_for(Duration::from_secs(30), |_| true).await?;
    let client = TestClient::join(&coordinator.url, "curious", 0).await?;
    // A plain federation has no secure attempt to advertise keys to.
    let refused = client.raw().advertise_keys(client.authed(pb::AdvertiseKeysRequest::default())).await;
    let status = expect_status(refused, Code::FailedPrecondition, &[]);
    coordinator.wait_for_log("call refused", Duration::from_secs(10)).await?;
    let log = coordinator.log_text();
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "call refused")
        .expect("waited for it above");
    assert_eq!(line["span"]["name"], "call", "{line}");
    assert_eq!(line["span"]["method"], "advertise_keys", "{line}");
    assert_eq!(line["span"]["client"], "curious", "{line}");
    assert_eq!(line["fields"]["reason"], status.message(), "{line}");
    Ok(())
}
