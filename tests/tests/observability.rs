//! Observability with the real tools (issue 12): a federation of three in-process agents (fake
//! trainers) under central DP runs to its end with the operator port open; then Debian's
//! `prometheus` scrapes it and the test asks Prometheus's query API for what the coordinator's
//! operator status says, `promtool check metrics` lints the exposition, the status page's
//! authentication and `/metrics`' token (`server.metrics_token_file`, which Prometheus presents
//! through `authorization: { credentials_file }`) are checked over HTTP, and headless Chromium
//! signs in through the page's form and renders it. `target/test-artifacts/` keeps what CI uploads: `status-page.png` (the
//! screenshot), `status-page.html` (the rendered DOM) and `metrics.txt` (the exposition).
//!
//! One federation for every check, in one test: the `metrics` recorder is process-wide, so a
//! second coordinator in this binary would add to the same counters.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use fedtune_client::agent::{Agent, AgentConfig, ExitReason, TrainerFactory, TrainerSpec};
use fedtune_client::fake_trainer::{FakeTrainer, FakeTrainerConfig};
use fedtune_client::local_trainer::LocalTrainer;
use fedtune_client::transport::{ConnectOptions, GrpcCoordinator};
use fedtune_coordinator::privacy::{DpMode, PrivacySettings};
use fedtune_shared::crypto::{OperatorToken, OPERATOR_TOKEN_FILE};
use fedtune_shared::ids::{ClientId, ModelVersion};
use fedtune_shared::round::{PhaseName, StatusReport};
use fedtune_tests::chromium::Chromium;
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{InProcess, TestClient};
use fedtune_tests::http;
use fedtune_tests::process::free_port;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const ROUNDS: u64 = 3;
const SITES: u64 = 3;
const WAIT: Duration = Duration::from_secs(120);

/// Where tests keep what CI uploads (`target/test-artifacts/`).
fn artifacts() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn fake_factory(seed: u64) -> TrainerFactory {
    let config = FakeTrainerConfig {
        seed,
        num_train_examples: 10 * seed,
        num_eval_examples: 20,
        ..FakeTrainerConfig::default()
    };
    Box::new(move |spec: &TrainerSpec| {
        Ok(Box::new(FakeTrainer::new(spec.trainable.clone(), config)) as Box<dyn LocalTrainer>)
    })
}

/// A finished federation with its operator port at `operator`.
struct Federation {
    coordinator: InProcess,
    operator: String,
    /// The operator token.
    token: String,
    /// `server.metrics_token_file`, which the coordinator wrote at start, and its token.
    metrics_token_file: PathBuf,
    metrics_token: String,
    status: StatusReport,
}

async fn run_federation(dir: &Path) -> Result<Federation> {
    let model = write_fake_model(&dir.join("model"), 2, 8)?;
    let state = dir.join("state");
    let mut settings = quick_settings(&state, &model, ROUNDS, SITES as usize, SITES as usize);
    settings.evaluation.every = 1;
    settings.evaluation.enabled_under_dp = true;
    settings.privacy = PrivacySettings {
        mode: DpMode::Central,
        noise_multiplier: Some(2.0),
        clip_norm: 1.0,
        delta: 1e-5,
        target_epsilon: Some(40.0),
        ..PrivacySettings::default()
    };
    let operator = format!("127.0.0.1:{}", free_port()?);
    settings.server.operator_listen = Some(operator.parse()?);
    // Absent at start: the coordinator makes it, as an operator relying on that would.
    let metrics_token_file = dir.join("metrics.token");
    settings.server.metrics_token_file = Some(metrics_token_file.clone());
    let coordinator = InProcess::start(settings).await?;
    let url = coordinator.url.clone();
    let mut agents = Vec::new();
    for seed in 1..=SITES {
        let name = format!("site-{seed}");
        let key = fedtune_tests::identities::key_for(&url, &name)?;
        let api = GrpcCoordinator::connect_lazy(&ConnectOptions::new(url.clone()))?.with_identity(key, None);
        let config = AgentConfig {
            name: Some(ClientId::parse(&name)?),
            train_examples: 10 * seed,
            eval_examples: 20,
            poll_wait: Duration::from_secs(2),
            ..AgentConfig::default()
        };
        agents
            .push(tokio::spawn(Agent::new(api, config, fake_factory(seed), CancellationToken::new()).run()));
    }
    for agent in agents {
        let outcome = tokio::time::timeout(WAIT, agent).await???;
        ensure!(matches!(outcome.reason, ExitReason::Finished { .. }), "{outcome:?}");
    }
    let mut client = TestClient::connect(&url).await?;
    let status = client.wait_status(WAIT, |s| s.phase == PhaseName::Finished).await?;
    ensure!(status.model_version == ModelVersion(ROUNDS), "{status:?}");
    let token = OperatorToken::load(&state.join(OPERATOR_TOKEN_FILE))?.expose_secret().to_string();
    let metrics_token = OperatorToken::load(&metrics_token_file)?.expose_secret().to_string();
    ensure!(metrics_token != token, "the metrics token is not the operator token");
    Ok(Federation { coordinator, operator, token, metrics_token_file, metrics_token, status })
}

/// Percent-encodes a query parameter.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A running Prometheus server, killed on drop.
struct Prometheus {
    child: std::process::Child,
    addr: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` every second, presenting the bearer token in
    /// `credentials_file` as a Prometheus operator configures it.
    fn start(dir: &Path, target: &str, credentials_file: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: fedtune\n    authorization:\n      type: Bearer\n      \
                 credentials_file: '{}'\n    static_configs:\n      - targets: ['{target}']\n",
                credentials_file.display()
            ),
        )?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::OpenOptions::new().append(true).open(&log)?))
            .spawn()
            .context("starting `prometheus`: run scripts/system-deps.sh (Debian package `prometheus`)")?;
        Ok(Self { child, addr, log })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until Prometheus reports the target up after a scrape.
    async fn wait_target_up(&self, within: Duration) -> Result<()> {
        let until = tokio::time::Instant::now() + within;
        loop {
            if let Ok(a) = http::get(&self.addr, "/api/v1/targets", &[]).await {
                let v: Value = serde_json::from_str(&a.body).unwrap_or_default();
                let targets = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
                if targets.iter().any(|t| t["health"] == "up") {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= until {
                bail!("the scrape target was not up within {within:?}; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The single value of an instant query.
    async fn value(&self, query: &str) -> Result<f64> {
        let a = http::get(&self.addr, &format!("/api/v1/query?query={}", encode(query)), &[]).await?;
        let v: Value = serde_json::from_str(&a.body).with_context(|| a.body.clone())?;
        ensure!(v["status"] == "success", "{query}: {v}");
        let result = v["data"]["result"].as_array().context("no result")?;
        ensure!(result.len() == 1, "{query}: expected one series, got {v}");
        let text = result[0]["value"][1].as_str().context("no value")?;
        Ok(text.parse()?)
    }
}

/// Prometheus answers, over its query API, what the coordinator's operator status reports.
async fn prometheus_reports_what_the_status_reports(f: &Federation, dir: &Path) -> Result<()> {
    let prometheus = Prometheus::start(dir, &f.operator, &f.metrics_token_file)?;
    prometheus.wait_target_up(Duration::from_secs(60)).await?;
    let s = &f.status;
    let completed = s.recent_rounds.iter().filter(|r| r.status == "completed").count() as f64;
    let failed = s.recent_rounds.iter().filter(|r| r.status == "failed").count() as f64;
    let accepted: u32 = s.recent_rounds.iter().filter(|r| r.status == "completed").map(|r| r.accepted).sum();
    let expectations = [
        ("fedtune_rounds_completed_total", completed),
        ("fedtune_round_attempts_total{outcome=\"completed\"}", completed),
        ("fedtune_round_attempts_total{outcome=\"failed\"}", failed),
        ("fedtune_model_version", s.model_version.0 as f64),
        ("fedtune_uploads_accepted_total", accepted as f64),
        ("fedtune_clients_known", s.clients.len() as f64),
        ("fedtune_privacy_epsilon_spent", s.privacy.epsilon),
        ("fedtune_privacy_epsilon_budget", s.privacy.target_epsilon.context("a budget is set")?),
        ("fedtune_privacy_epsilon_budget_left", s.privacy.target_epsilon.unwrap_or(0.0) - s.privacy.epsilon),
        ("fedtune_phase{phase=\"finished\"}", 1.0),
    ];
    for (query, expected) in expectations {
        let got = prometheus.value(query).await?;
        // ε travels as text twice (exposition, then the API): both print the shortest exact form.
        ensure!(got == expected, "{query}: Prometheus has {got}, the status says {expected}");
    }
    ensure!(completed == ROUNDS as f64 && s.privacy.epsilon > 0.0, "{s:?}");
    // Histograms arrive as buckets: every attempt's duration was observed.
    let observed = prometheus.value("sum(fedtune_round_duration_seconds_count)").await?;
    ensure!(observed == completed + failed, "round durations observed: {observed}");
    let rss = prometheus.value("fedtune_process_resident_memory_bytes").await?;
    ensure!(rss > 1e6, "resident memory {rss}");
    let uploads = prometheus
        .value("sum(fedtune_rpc_duration_seconds_count{method=\"UploadUpdate\",code=\"ok\"})")
        .await?;
    ensure!(uploads == accepted as f64, "UploadUpdate calls answered OK: {uploads}");
    Ok(())
}

/// With `server.metrics_token_file` set, `/metrics` answers only its bearer token (or the
/// operator's): an anonymous scrape, a wrong token and the token without the Bearer scheme get
/// 401, a body that says what is missing, and no metric.
async fn metrics_need_the_metrics_token(f: &Federation) -> Result<()> {
    let refused = |a: &http::Answer| {
        a.status == 401
            && a.body.contains("server.metrics_token_file")
            && !a.body.contains("fedtune_")
            && a.header("www-authenticate").is_some_and(|h| h.starts_with("Bearer"))
    };
    let anonymous = http::get(&f.operator, "/metrics", &[]).await?;
    ensure!(refused(&anonymous), "{anonymous:?}");
    let wrong = http::get(&f.operator, "/metrics", &["Authorization: Bearer not-the-token"]).await?;
    ensure!(refused(&wrong), "{wrong:?}");
    let no_scheme =
        http::get(&f.operator, "/metrics", &[&format!("Authorization: {}", f.metrics_token)]).await?;
    ensure!(refused(&no_scheme), "{no_scheme:?}");
    for token in [&f.metrics_token, &f.token] {
        let a = http::get(&f.operator, "/metrics", &[&format!("Authorization: Bearer {token}")]).await?;
        ensure!(a.status == 200 && a.body.contains("fedtune_model_version"), "{a:?}");
    }
    Ok(())
}

/// `promtool check metrics` accepts the exposition.
async fn promtool_accepts_the_exposition(f: &Federation) -> Result<()> {
    let bearer = format!("Authorization: Bearer {}", f.metrics_token);
    let a = http::get(&f.operator, "/metrics", &[&bearer]).await?;
    ensure!(a.status == 200, "{a:?}");
    ensure!(a.header("content-type").is_some_and(|t| t.starts_with("text/plain")), "{a:?}");
    std::fs::write(artifacts()?.join("metrics.txt"), &a.body)?;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `promtool`: run scripts/system-deps.sh (Debian package `prometheus`)")?;
    use std::io::Write as _;
    child.stdin.take().context("stdin")?.write_all(a.body.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Only the operator token (as a bearer token, or through the sign-in form's cookie) opens the
/// status page; everything else gets 401 and no federation data.
async fn the_status_page_is_the_operators_alone(f: &Federation) -> Result<()> {
    let no_data = |a: &http::Answer| {
        a.status == 401
            && !a.body.contains("id=\"rounds\"")
            && !a.body.contains("site-1")
            && a.body.contains("id=\"login\"")
    };
    let anonymous = http::get(&f.operator, "/status", &[]).await?;
    ensure!(no_data(&anonymous), "{anonymous:?}");
    let wrong = http::get(&f.operator, "/status", &["Authorization: Bearer not-the-token"]).await?;
    ensure!(no_data(&wrong), "{wrong:?}");
    let forged =
        http::get(&f.operator, "/status", &[&format!("Cookie: fedtune_operator={}", f.token)]).await?;
    ensure!(no_data(&forged), "the token itself is not a session cookie: {forged:?}");
    let bearer = http::get(&f.operator, "/status", &[&format!("Authorization: Bearer {}", f.token)]).await?;
    ensure!(bearer.status == 200 && bearer.body.contains("id=\"rounds\""), "{bearer:?}");

    let refused = http::post_form(&f.operator, "/login", "token=guess").await?;
    ensure!(refused.status == 401 && refused.header("set-cookie").is_none(), "{refused:?}");
    let login = http::post_form(&f.operator, "/login", &format!("token={}", encode(&f.token))).await?;
    ensure!(login.status == 303 && login.header("location") == Some("/status"), "{login:?}");
    let cookie = login.header("set-cookie").context("no session cookie")?;
    ensure!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let pair = cookie.split(';').next().unwrap_or_default();
    ensure!(!pair.contains(&f.token), "the cookie must not carry the token: {cookie}");
    let page = http::get(&f.operator, "/status", &[&format!("Cookie: {pair}")]).await?;
    ensure!(page.status == 200 && page.body.contains("id=\"rounds\""), "{page:?}");
    Ok(())
}

/// Headless Chromium signs in through the form and renders the rounds, the accuracy chart,
/// one row per client and the budget bar; before signing in it renders no federation data.
fn chromium_renders_the_status_page(f: &Federation, dir: &Path) -> Result<()> {
    let mut browser = Chromium::start(dir, 1100, 1500)?;
    let url = format!("http://{}/status", f.operator);
    browser.navigate(&url)?;
    let loaded = "document.readyState === 'complete' && location.pathname === '/status'";
    browser.wait_for(
        &format!("{loaded} && document.getElementById('login') !== null"),
        Duration::from_secs(30),
    )?;
    let anonymous = browser.dom()?;
    ensure!(
        !anonymous.contains("id=\"rounds\"")
            && !anonymous.contains("site-1")
            && !anonymous.contains("budget-bar"),
        "an unauthenticated load shows federation data:\n{anonymous}"
    );
    // Sign in as a person would: type the token, submit the form (POST, 303, cookie, GET).
    browser.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('login').submit(); true",
        serde_json::to_string(&f.token)?
    ))?;
    browser.wait_for(
        &format!("{loaded} && document.getElementById('rounds') !== null"),
        Duration::from_secs(30),
    )?;
    let dom = browser.dom()?;
    std::fs::write(artifacts()?.join("status-page.html"), &dom)?;
    let png = browser.screenshot()?;
    ensure!(png.starts_with(b"\x89PNG"), "not a PNG screenshot");
    std::fs::write(artifacts()?.join("status-page.png"), &png)?;

    let s = &f.status;
    let count = |needle: &str| dom.matches(needle).count();
    ensure!(count("<tr class=\"round\"") == s.recent_rounds.len(), "round rows:\n{dom}");
    for r in &s.recent_rounds {
        let row = format!(
            "data-round=\"{}\" data-attempt=\"{}\" data-status=\"{}\"",
            r.id.round, r.id.attempt, r.status
        );
        ensure!(dom.contains(&row), "no row for round {} attempt {}:\n{dom}", r.id.round, r.id.attempt);
    }
    let evaluated: Vec<_> = s.recent_rounds.iter().filter(|r| r.eval_accuracy.is_finite()).collect();
    ensure!(evaluated.len() == ROUNDS as usize, "every round was evaluated: {s:?}");
    ensure!(dom.contains("<svg id=\"accuracy-chart\""), "no chart:\n{dom}");
    for r in evaluated {
        let point = format!("data-round=\"{}\" data-accuracy=\"{}\"", r.id.round, r.eval_accuracy);
        ensure!(dom.contains(&point), "no accuracy point for round {}:\n{dom}", r.id.round);
    }
    ensure!(
        count("<tr class=\"client\"") == s.clients.len() && s.clients.len() == SITES as usize,
        "client rows"
    );
    for c in &s.clients {
        ensure!(dom.contains(&format!("data-client=\"{}\"", c.client_id)), "no row for {}", c.client_id);
    }
    ensure!(dom.contains("id=\"budget-bar\" class=\"bar\""), "no budget bar:\n{dom}");
    ensure!(dom.contains(&format!("data-epsilon=\"{}\"", s.privacy.epsilon)), "the bar's ε:\n{dom}");
    ensure!(dom.contains("id=\"phase\">finished<"), "phase:\n{dom}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_federation_is_observed_by_prometheus_promtool_and_a_headless_browser() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let f = run_federation(dir.path()).await?;
    the_status_page_is_the_operators_alone(&f).await?;
    metrics_need_the_metrics_token(&f).await?;
    promtool_accepts_the_exposition(&f).await?;
    prometheus_reports_what_the_status_reports(&f, &dir.path().join("prometheus")).await?;
    let browser_dir = dir.path().join("chromium");
    let operator = &f;
    tokio::task::block_in_place(|| chromium_renders_the_status_page(operator, &browser_dir))?;
    f.coordinator.shutdown().await?;
    Ok(())
}
