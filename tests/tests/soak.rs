//! Soak: four honest sites and eight hostile peers against one real coordinator process, over
//! real gRPC, for five rounds. The hostile peers are allowlisted and join like honest ones where
//! their attack needs a session: two hang their uploads after a valid header, two claim
//! 2³¹ − 1 examples, two open downloads and never read them, one floods with 4.4 MB join
//! challenges and one with bursts of calls. Every round must complete on time with the honest
//! updates only, the final model must be bit-for-bit the one a federation of the honest sites
//! alone publishes, and the coordinator's peak resident memory must stay under
//! model size × 3 + 200 MB.
//!
//! Run with `--nocapture` to see the figures (rounds, seconds, peak memory, refusals per attack).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use fedtune_coordinator::CoordinatorSettings;
use fedtune_shared::ids::{ModelVersion, RoundId};
use fedtune_shared::pb;
use fedtune_shared::round::{ClientActivity, ModelScope, StatusReport, Task, UploadItem};
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{f32_bytes, update_values, TestClient};
use fedtune_tests::process::{completed_rounds, resident_memory, CoordinatorProc};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

const ROUNDS: u64 = 5;
const HONEST: usize = 4;
/// Hostile peers that hold a session (all but the oversize flooder), so are sampled like sites.
const HOSTILE_SESSIONS: usize = 7;
/// The fake model: 4 encoder layers of width 1024, about 21 MB of f32, all of it trainable.
const LAYERS: usize = 4;
const HIDDEN: usize = 1024;
/// Round deadline: long enough for an honest site to download and upload the model on a busy
/// 2-core machine, short enough for five rounds that the hostile peers keep open to the end.
const DEADLINE: Duration = Duration::from_secs(8);
/// Heartbeat interval of the sites, and the silence after which the coordinator drops one.
const HEARTBEAT: Duration = Duration::from_millis(300);
const LIVENESS: Duration = Duration::from_secs(3);
/// Bound on any single wait of the scenario (a join, a task, the end of the federation).
const WAIT: Duration = Duration::from_secs(90);

/// How many times each attack met each answer (gRPC code name, or `OK`).
#[derive(Debug, Clone, Default)]
struct Tally(Arc<Mutex<BTreeMap<&'static str, BTreeMap<String, u64>>>>);

impl Tally {
    fn count<T>(&self, attack: &'static str, answer: &Result<T, Status>) {
        let code = match answer {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(attack).or_default().entry(code).or_default() += 1;
    }

    fn snapshot(&self) -> BTreeMap<&'static str, BTreeMap<String, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn settings(dir: &Path, model: &Path, min_available: usize) -> CoordinatorSettings {
    let mut s = quick_settings(&dir.join("state"), model, ROUNDS, HONEST + HOSTILE_SESSIONS, HONEST);
    s.evaluation.every = 0;
    // Every session is sampled in every round (a fixed count of all of them), and each round
    // waits until all are live, so the hostile peers are in every draw (they keep polling).
    s.rounds.min_available = min_available;
    s.rounds.deadline = DEADLINE;
    s.clients.heartbeat_interval = HEARTBEAT;
    s.clients.liveness_timeout = LIVENESS;
    s.server.upload_idle_timeout = Duration::from_secs(1);
    s.server.download_send_timeout = Duration::from_secs(1);
    // The shipped per-client call limits, so the burst flooder meets them. The anonymous
    // (per-address) limits stay as quick_settings leaves them: every peer here, honest or not,
    // shares 127.0.0.1, so an address limit would throttle the honest joins and the test's own
    // status polls along with the flooders.
    let shipped = fedtune_coordinator::settings::LimitSettings::default();
    s.security.limits.calls_per_second = shipped.calls_per_second;
    s.security.limits.burst = shipped.burst;
    s.security.limits.concurrent_calls_per_client = shipped.concurrent_calls_per_client;
    s
}

/// The update honest site `k` uploads in round `r`: distinct per site and round.
fn honest_update(k: usize, r: u64, n: usize) -> Vec<f32> {
    update_values(k + 10 * r as usize, n)
}

/// An honest site: each round it takes its fit task, downloads the global model (checking its
/// digest) and uploads its update. Returns the bits of the final global trainable values.
async fn honest_site(url: String, k: usize) -> Result<Vec<u32>> {
    let mut c = TestClient::join(&url, &format!("honest-{k}"), 0).await?;
    // Heartbeats while it downloads and uploads, as an agent does; they end with this site.
    let beating = CancellationToken::new();
    let _stop_beating = beating.clone().drop_guard();
    let mut beat = c.clone();
    tokio::spawn(async move {
        let beats = async {
            loop {
                let _ = beat.heartbeat(ClientActivity::Training, None).await;
                tokio::time::sleep(HEARTBEAT).await;
            }
        };
        tokio::select! {
            _ = beats => {}
            _ = beating.cancelled() => {}
        }
    });
    for r in 1..=ROUNDS {
        let task = c.wait_for_fit(WAIT).await.with_context(|| format!("honest-{k}, round {r}"))?;
        ensure!(task.id == RoundId::new(r, 0), "honest-{k} was given {:?} for round {r}", task.id);
        let global = c.download_vector(task.model.version, ModelScope::Trainable).await?;
        let n = global.values().len();
        let receipt = c.upload(&task, 10 + 7 * k as u64, &f32_bytes(&honest_update(k, r, n))).await?;
        ensure!(receipt.id == task.id, "honest-{k}'s round-{r} update was folded into {:?}", receipt.id);
    }
    let last = c.wait_finished(WAIT).await?;
    ensure!(last == ModelVersion(ROUNDS), "honest-{k} saw the federation end at {last:?}");
    let last = c.download_vector(last, ModelScope::Trainable).await?;
    Ok(last.values().iter().map(|v| v.to_bits()).collect())
}

/// The honest sites of a federation, run to its end; returns the final global trainable values'
/// bits.
async fn honest_federation(url: &str) -> Result<Vec<u32>> {
    let mut sites = JoinSet::new();
    for k in 0..HONEST {
        sites.spawn(honest_site(url.to_string(), k));
    }
    let mut finals = Vec::new();
    while let Some(site) = sites.join_next().await {
        finals.push(site??);
    }
    ensure!(finals.windows(2).all(|w| w[0] == w[1]), "the honest sites downloaded different final models");
    finals.pop().context("no honest site")
}

/// Polls for the next fit task until `stop`; `None` once the federation or the soak is over.
async fn next_fit(c: &mut TestClient, stop: &CancellationToken) -> Option<fedtune_shared::round::FitTask> {
    while !stop.is_cancelled() {
        match c.poll(Duration::from_millis(300)).await {
            Ok(Task::Fit(t)) => return Some(t),
            Ok(Task::Finished { .. }) => return None,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    None
}

/// Sends a valid header for each fit task it gets and then nothing, keeping the stream open
/// until the coordinator ends it; again and again.
async fn hung_uploader(url: String, name: String, stop: CancellationToken, tally: Tally) -> Result<()> {
    let mut c = TestClient::join(&url, &name, 0).await?;
    let total_bytes = c.trainable().byte_len() as u64;
    while let Some(task) = next_fit(&mut c, &stop).await {
        let (tx, rx) = mpsc::channel::<pb::UploadUpdateRequest>(1);
        tx.send(UploadItem::Header(c.header(&task, 10, total_bytes)).into()).await?;
        let answer = tokio::select! {
            a = c.upload_stream(ReceiverStream::new(rx)) => a,
            _ = stop.cancelled() => break,
        };
        drop(tx);
        tally.count("hung upload", &answer);
    }
    Ok(())
}

/// Uploads a whole, well-formed update claiming 2³¹ − 1 examples for each fit task it gets.
async fn weight_inflater(
    url: String,
    name: String,
    seed: usize,
    stop: CancellationToken,
    tally: Tally,
) -> Result<()> {
    let mut c = TestClient::join(&url, &name, 0).await?;
    let payload = f32_bytes(&update_values(seed, c.trainable().numel()));
    while let Some(task) = next_fit(&mut c, &stop).await {
        let answer = c.upload(&task, (1 << 31) - 1, &payload).await;
        tally.count("weight inflation", &answer);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// Opens downloads of the current model three at a time, each time on a fresh connection, and
/// never reads them, keeping every stream and connection open until the soak ends. (Its own
/// polls keep a connection of their own: unread streams fill a connection's flow-control window,
/// after which nothing more reaches the client on it.)
async fn never_reader(url: String, name: String, stop: CancellationToken, tally: Tally) -> Result<()> {
    let mut c = TestClient::join(&url, &name, 0).await?;
    let (mut held, mut held_conns) = (Vec::new(), Vec::new());
    while let Some(task) = next_fit(&mut c, &stop).await {
        let mut conn = TestClient::connect(&url).await?;
        conn.set_token(c.token());
        for _ in 0..3 {
            let open = conn.open_download(task.model.version, ModelScope::Trainable);
            let answer = match tokio::time::timeout(Duration::from_secs(2), open).await {
                Ok(a) => a,
                Err(_) => Err(Status::deadline_exceeded("no answer to the download call")),
            };
            tally.count("never-read download", &answer);
            held.extend(answer.ok());
        }
        held_conns.push(conn);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop((held, held_conns));
    Ok(())
}

/// Without a session: join challenges carrying a 4.4 MB name, eight at a time on two
/// connections.
async fn oversize_flooder(url: String, stop: CancellationToken, tally: Tally) -> Result<()> {
    let huge = pb::JoinChallengeRequest { client_name: "x".repeat(4_400_000) };
    let conns = [TestClient::connect(&url).await?, TestClient::connect(&url).await?];
    while !stop.is_cancelled() {
        let mut calls = JoinSet::new();
        for i in 0..8 {
            let (mut stub, req) = (conns[i % 2].raw(), huge.clone());
            calls.spawn(async move { stub.join_challenge(req).await.map(|_| ()) });
        }
        while let Some(answer) = calls.join_next().await {
            tally.count("oversize JoinChallenge", &answer?);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// With a session: bursts of 150 concurrent calls (task polls and heartbeats) and 50 join
/// challenges for names nobody allowlisted, every second.
async fn burst_flooder(url: String, name: String, stop: CancellationToken, tally: Tally) -> Result<()> {
    let c = TestClient::join(&url, &name, 0).await?;
    while !stop.is_cancelled() {
        let mut calls = JoinSet::new();
        for _ in 0..150 {
            let mut c = c.clone();
            calls.spawn(async move { ("call burst", c.poll(Duration::ZERO).await.map(|_| ())) });
        }
        for i in 0..50 {
            let mut stub = c.raw();
            let req = pb::JoinChallengeRequest { client_name: format!("nobody-{i}") };
            calls.spawn(
                async move { ("unknown-name JoinChallenge", stub.join_challenge(req).await.map(|_| ())) },
            );
        }
        while let Some(done) = calls.join_next().await {
            let (attack, answer) = done?;
            tally.count(attack, &answer);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// The coordinator's (VmRSS, VmHWM) now.
fn memory_of(coord: &CoordinatorProc) -> Result<(u64, u64)> {
    resident_memory(coord.proc.as_ref().and_then(|p| p.pid()).context("coordinator not running")?)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn describe_rounds(report: &StatusReport) -> String {
    let mut rounds: Vec<_> = report.recent_rounds.iter().collect();
    rounds.sort_by_key(|r| (r.id.round, r.id.attempt));
    rounds
        .iter()
        .map(|r| {
            format!(
                "  round {} attempt {}: {} selected {} accepted {} failed {} in {:.1}s",
                r.id.round,
                r.id.attempt,
                r.status,
                r.selected,
                r.accepted,
                r.failed,
                r.duration.as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_hostile_peers_change_neither_the_rounds_nor_the_model_nor_the_coordinators_memory_bound(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), LAYERS, HIDDEN)?;
    let model_bytes = std::fs::metadata(model.join("model.safetensors"))?.len();

    // The reference: the honest sites alone, same settings, same updates.
    let quiet_dir = dir.path().join("quiet");
    std::fs::create_dir_all(&quiet_dir)?;
    let quiet = CoordinatorProc::start(settings(&quiet_dir, &model, HONEST), &quiet_dir)?;
    quiet.wait_for(WAIT, |_| true).await?;
    let reference = honest_federation(&quiet.url).await?;
    let (_, quiet_peak) = memory_of(&quiet)?;
    drop(quiet);

    let soak_dir = dir.path().join("soak");
    std::fs::create_dir_all(&soak_dir)?;
    let coord = CoordinatorProc::start(settings(&soak_dir, &model, HONEST + HOSTILE_SESSIONS), &soak_dir)?;
    coord.wait_for(WAIT, |_| true).await?;
    let (rss_at_start, _) = memory_of(&coord)?;
    let started = Instant::now();

    let (stop, tally) = (CancellationToken::new(), Tally::default());
    let mut hostile = JoinSet::new();
    let url = coord.url.clone();
    for k in 0..2 {
        hostile.spawn(hung_uploader(url.clone(), format!("hung-{k}"), stop.clone(), tally.clone()));
        let inflater =
            weight_inflater(url.clone(), format!("inflated-{k}"), 90 + k, stop.clone(), tally.clone());
        hostile.spawn(inflater);
        hostile.spawn(never_reader(url.clone(), format!("never-reads-{k}"), stop.clone(), tally.clone()));
    }
    hostile.spawn(burst_flooder(url.clone(), "burst".into(), stop.clone(), tally.clone()));
    hostile.spawn(oversize_flooder(url.clone(), stop.clone(), tally.clone()));
    // Sample the coordinator's resident memory while the soak runs.
    let sampler = {
        let (coord_pid, stop) = (coord.proc.as_ref().and_then(|p| p.pid()), stop.clone());
        tokio::spawn(async move {
            let mut max_rss = 0;
            while !stop.is_cancelled() {
                if let Some((rss, _)) = coord_pid.and_then(|pid| resident_memory(pid).ok()) {
                    max_rss = max_rss.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            max_rss
        })
    };

    let soaked = honest_federation(&url).await;
    let seconds = started.elapsed().as_secs_f64();
    let report = coord.wait_for(WAIT, |r| r.finished_reason.is_some()).await;
    stop.cancel();
    let max_sampled_rss = sampler.await?;
    let refusals = tally.snapshot();
    // A hostile peer may be stuck in a call the coordinator never answers: that is its own
    // problem once the federation is over, so it gets a grace period and is then stopped.
    let mut peer_errors = Vec::new();
    let grace = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(grace, hostile.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(Ok(())))) => {}
            Ok(Some(Ok(Err(e)))) => peer_errors.push(format!("{e:#}")),
            Ok(Some(Err(e))) => peer_errors.push(e.to_string()),
            Err(_) => {
                peer_errors.push(format!("{} hostile peers still stuck after the soak", hostile.len()));
                hostile.abort_all();
                break;
            }
        }
    }
    let (rss_at_end, peak) = memory_of(&coord)?;

    let bound = model_bytes * 3 + (200 << 20);
    println!("soak: {HONEST} honest sites, 8 hostile peers, {ROUNDS} rounds, deadline {DEADLINE:?}");
    println!("soak: {seconds:.1} s for the federation under attack");
    println!(
        "soak: model {:.1} MiB, memory bound (model × 3 + 200 MB) {:.1} MiB",
        mib(model_bytes),
        mib(bound)
    );
    println!(
        "soak: coordinator RSS under attack: at start {:.1} MiB, highest sampled {:.1} MiB, at end {:.1} \
         MiB, peak (VmHWM) {:.1} MiB; honest sites alone: peak {:.1} MiB",
        mib(rss_at_start),
        mib(max_sampled_rss),
        mib(rss_at_end),
        mib(peak),
        mib(quiet_peak)
    );
    if let Ok(report) = &report {
        println!("soak: rounds\n{}", describe_rounds(report));
    }
    for (attack, answers) in &refusals {
        println!("soak: {attack}: {answers:?}");
    }
    println!("soak: hostile peers' own errors: {peer_errors:?}");
    let (soaked, report) = (soaked?, report?);

    ensure!(
        completed_rounds(&report) == (1..=ROUNDS).collect::<Vec<_>>(),
        "rounds:\n{}",
        describe_rounds(&report)
    );
    for r in &report.recent_rounds {
        assert_eq!(r.status, "completed", "no attempt may fail: {r:?}");
        assert_eq!(r.id.attempt, 0, "no round may need a retry: {r:?}");
        assert_eq!(r.accepted as usize, HONEST, "only the honest updates are folded: {r:?}");
        assert_eq!(r.selected as usize, HONEST + HOSTILE_SESSIONS, "every session was drawn: {r:?}");
    }
    for c in &report.clients {
        let honest = c.client_id.as_str().starts_with("honest-");
        let expected = if honest { ROUNDS } else { 0 };
        assert_eq!(
            c.rounds_contributed, expected,
            "{} contributed {} rounds",
            c.client_id, c.rounds_contributed
        );
    }
    // Every attack ran and was refused at least once; those that must never succeed never did
    // (a download may open, within the two a client is allowed, and a burst call within the
    // client's limits is served).
    for attack in [
        "hung upload",
        "weight inflation",
        "never-read download",
        "oversize JoinChallenge",
        "call burst",
        "unknown-name JoinChallenge",
    ] {
        let answers = refusals.get(attack).with_context(|| format!("{attack} never ran"))?;
        ensure!(answers.keys().any(|code| code != "OK"), "{attack} was never refused: {answers:?}");
    }
    for attack in ["hung upload", "weight inflation", "oversize JoinChallenge", "unknown-name JoinChallenge"]
    {
        ensure!(!refusals[attack].contains_key("OK"), "{attack} succeeded: {:?}", refusals[attack]);
    }
    assert!(soaked == reference, "the final model differs from the honest sites' federation alone");
    assert!(
        peak < bound,
        "coordinator peak RSS {:.1} MiB is over the bound {:.1} MiB",
        mib(peak),
        mib(bound)
    );
    Ok(())
}
