//! `kill -9` of the coordinator at each step of a secure round (issue #11), with the real
//! binaries: `fedtune-coordinator serve` under secure aggregation with distributed noise, and
//! three `fedtune-client run --fake-trainer` processes. The coordinator is stopped exactly at the
//! step under test by its test-only pause point (`FEDTUNE_TEST_PAUSE_AT`, feature
//! `test-support`), killed there, and restarted without it.
//!
//! What must hold at every step: the federation resumes and completes every round (the killed
//! round is retried as a fresh attempt, with fresh keys), and ε is never under-reported: a sum
//! released for unmasking stays charged whether or not its round was published, and what status
//! reports is what the ledger holds. Needs `cargo build --workspace` first.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use fedtune_coordinator::cli::{export, ExportArgs};
use fedtune_coordinator::privacy::{DpMode, PrivacySettings};
use fedtune_shared::ids::ModelVersion;
use fedtune_shared::round::{PhaseName, StatusReport};
use fedtune_tests::fixtures::{quick_settings, write_fake_model, write_sentiment_csv};
use fedtune_tests::process::{binary, completed_rounds, start_client, CoordinatorProc, Proc};

const ROUNDS: u64 = 3;
const CLIENTS: usize = 3;
/// The round whose secure attempt is killed.
const KILLED_ROUND: u64 = 2;

/// Client flags: quick fake training and quick retries, so they find the restarted coordinator
/// within a second or two.
const CLIENT_ARGS: [&str; 9] = [
    "--fake-trainer",
    "--fake-fit-ms",
    "100",
    "--poll-wait",
    "2s",
    "--max-backoff",
    "500ms",
    "--give-up-after",
    "90s",
];

/// What the ledger (`fedtune-coordinator privacy --json --state-dir`) says.
struct Ledger {
    /// The round of each charge, oldest first.
    rounds: Vec<u64>,
    epsilon: f64,
}

fn ledger(state: &Path) -> Result<Ledger> {
    let out = Command::new(binary("fedtune-coordinator")?)
        .args(["privacy", "--json", "--state-dir"])
        .arg(state)
        .output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rounds = json["rounds"]
        .as_array()
        .context("no rounds in the ledger")?
        .iter()
        .map(|r| r["round"].as_u64().context("a charge without its round"))
        .collect::<Result<Vec<u64>>>()?;
    // An empty ledger has ε = 0.
    let epsilon = json["epsilon"].as_f64().unwrap_or(0.0);
    Ok(Ledger { rounds, epsilon })
}

/// How the killed federation ended.
struct Outcome {
    /// The ledger right after the kill, before the restart.
    at_kill: Ledger,
    /// Status once the restarted coordinator answered for the first time.
    resumed: StatusReport,
    /// Status once the federation finished.
    finished: StatusReport,
    /// The ledger once the federation finished.
    after: Ledger,
}

/// Runs a secure, distributed-noise federation whose coordinator is killed at `point` of round
/// 2, restarts it, and waits for the federation to finish.
async fn kill_at(point: &str) -> Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 60, 3)?;
    let state = dir.path().join("state");
    let mut s = quick_settings(&state, &model, ROUNDS, CLIENTS, CLIENTS);
    // Under DP clients evaluate only when asked; the rounds are what is under test.
    s.evaluation.every = 0;
    s.rounds.deadline = Duration::from_secs(30);
    s.secure_aggregation.enabled = true;
    s.secure_aggregation.step_timeout = Duration::from_secs(5);
    s.secure_aggregation.unmask_timeout = Duration::from_secs(5);
    s.privacy = PrivacySettings {
        mode: DpMode::Distributed,
        noise_multiplier: Some(1.0),
        clip_norm: 1.0,
        delta: 1e-5,
        ..PrivacySettings::default()
    };
    let pause = format!("{point}:{KILLED_ROUND}");
    let mut coord = CoordinatorProc::start_with_env(s, dir.path(), &[("FEDTUNE_TEST_PAUSE_AT", &pause)])?;
    let mut clients = (0..CLIENTS)
        .map(|k| start_client(&coord.url, &format!("site-{k}"), &data, &CLIENT_ARGS, dir.path()))
        .collect::<Result<Vec<Proc>>>()?;

    coord.wait_for_log(&format!("test pause at {point}"), Duration::from_secs(60)).await?;
    coord.kill9();
    let at_kill = ledger(&state)?;

    coord.restart()?;
    let resumed = coord.wait_for(Duration::from_secs(30), |_| true).await?;
    let finished = coord.wait_for(Duration::from_secs(120), |s| s.phase == PhaseName::Finished).await?;
    let after = ledger(&state)?;

    // The last published model is on disk and exports.
    let out = dir.path().join("export");
    export(&ExportArgs { state_dir: state.clone(), round: ROUNDS, out: out.clone(), init_dir: None })?;
    ensure!(out.join("model.safetensors").is_file(), "round {ROUNDS} exported no model");

    for c in clients.iter_mut() {
        let status = c.wait(Duration::from_secs(60)).await?;
        ensure!(status.success(), "client exited with {status}:\n{}", c.log_text());
    }
    Ok(Outcome { at_kill, resumed, finished, after })
}

/// What holds whatever step the coordinator was killed at: every round completed, the killed
/// round by a later attempt than the one that was running, and status reports the ledger's ε.
fn assert_resumed(o: &Outcome) {
    let f = &o.finished;
    assert_eq!(completed_rounds(f), (1..=ROUNDS).collect::<Vec<_>>(), "{f:#?}");
    assert_eq!(f.model_version, ModelVersion(ROUNDS));
    let attempts = |status: &str| {
        f.recent_rounds
            .iter()
            .filter(|r| r.id.round == KILLED_ROUND && r.status == status)
            .map(|r| r.id.attempt)
            .collect::<Vec<_>>()
    };
    let (aborted, completed) = (attempts("aborted"), attempts("completed"));
    assert_eq!(aborted.len(), 1, "the killed attempt is recorded as aborted: {f:#?}");
    assert_eq!(completed.len(), 1, "{f:#?}");
    assert!(
        completed[0] > aborted[0],
        "round {KILLED_ROUND} completed by attempt {} after {}",
        completed[0],
        aborted[0]
    );
    // The ledger counts the round-1 publication, and a release only from the unmasking point on.
    assert_eq!(o.at_kill.rounds[0], 1);
    assert_eq!(o.resumed.privacy.epsilon, o.at_kill.epsilon, "the accountant is rebuilt from the ledger");
    assert_eq!(o.resumed.privacy.rounds_charged, o.at_kill.rounds.len() as u64);
    assert_eq!(f.privacy.epsilon, o.after.epsilon, "status shows the ledger's ε");
    assert_eq!(f.privacy.rounds_charged, o.after.rounds.len() as u64);
    assert!(o.after.epsilon > o.at_kill.epsilon, "{} after {}", o.after.epsilon, o.at_kill.epsilon);
}

/// Killed before anything was released: nothing of the killed attempt is charged, and each
/// published round is charged exactly once.
async fn killed_before_the_release(point: &str) -> Result<()> {
    let o = kill_at(point).await?;
    assert_resumed(&o);
    assert_eq!(o.at_kill.rounds, vec![1], "nothing of round {KILLED_ROUND} was released before the kill");
    assert_eq!(o.after.rounds, vec![1, 2, 3]);
    Ok(())
}

/// Killed after the sum was released for unmasking: the release was written before the request
/// could go out, so it is on the ledger at the kill and stays charged beside the round's
/// publication by its next attempt.
async fn killed_after_the_release(point: &str) -> Result<()> {
    let o = kill_at(point).await?;
    assert_resumed(&o);
    assert_eq!(o.at_kill.rounds, vec![1, KILLED_ROUND], "the release is on the ledger before the kill");
    assert_eq!(o.after.rounds, vec![1, 2, 2, 3], "the killed attempt's release still counts");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_while_keys_are_advertised_resumes_with_a_fresh_attempt_and_charges_nothing_extra(
) -> Result<()> {
    killed_before_the_release("advertising").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_while_shares_are_sent_resumes_with_a_fresh_attempt_and_charges_nothing_extra(
) -> Result<()> {
    killed_before_the_release("sharing").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_while_masked_inputs_are_folded_resumes_and_charges_nothing_extra() -> Result<()>
{
    killed_before_the_release("masking").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_once_the_sum_is_released_for_unmasking_keeps_that_release_charged() -> Result<()>
{
    killed_after_the_release("unmasking").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_after_unmasking_but_before_publishing_keeps_the_release_charged() -> Result<()>
{
    killed_after_the_release("unmasked").await
}
