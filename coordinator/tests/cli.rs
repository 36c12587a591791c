//! The `fedtune-coordinator` binary: configuration errors, `status`, `export`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fedtune_coordinator::CoordinatorSettings;
use fedtune_shared::params::{Manifest, ParameterVector, TensorSpec};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_fedtune-coordinator");

fn write_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let m = Manifest::new(vec![
        TensorSpec { name: "bert.embeddings.word_embeddings.weight".into(), shape: vec![4, 4] },
        TensorSpec { name: "bert.encoder.layer.0.output.dense.weight".into(), shape: vec![4, 4] },
    ])
    .unwrap();
    ParameterVector::new(m, vec![0.25; 32])
        .unwrap()
        .save_safetensors(&dir.join("model.safetensors"))
        .unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_size": 4, "num_hidden_layers": 1, "id2label": {"0": "no", "1": "yes"}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
}

#[test]
fn an_invalid_config_exits_64_naming_the_key_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    write_model(&dir.path().join("model"));
    // Hold the port: had serve tried to bind, it would fail with another message and status.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\nstate_dir = \"{}\"\n[model]\ninit_dir = \"{}\"\n[rounds]\nmin_fit = 0\n[security]\ninsecure = true\n",
            dir.path().join("state").display(),
            dir.path().join("model").display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rounds.min_fit"), "{stderr}");
    assert!(!dir.path().join("state").exists(), "nothing may be created for an invalid config");

    // An environment override is validated the same way.
    std::fs::write(
        &config,
        format!(
            "[storage]\nstate_dir = \"{}\"\n[model]\ninit_dir = \"{}\"\n[security]\ninsecure = true\n",
            dir.path().join("state").display(),
            dir.path().join("model").display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("FEDTUNE__SAMPLING__SCHEME", "lottery")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lottery"));
}

#[tokio::test]
async fn serve_refuses_to_start_when_max_connections_does_not_fit_under_the_file_descriptor_limit() {
    let dir = tempfile::tempdir().unwrap();
    write_model(&dir.path().join("model"));
    let config = dir.path().join("c.toml");
    let write = |max_connections: usize| {
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nstate_dir = \"{}\"\n[model]\ninit_dir = \"{}\"\n\
                 [security]\ninsecure = true\n[security.limits]\nmax_connections_per_address = 16\n\
                 max_connections = {max_connections}\n",
                dir.path().join("state").display(),
                dir.path().join("model").display()
            ),
        )
        .unwrap()
    };
    // `ulimit -n` without -S or -H sets both limits: serve cannot raise the soft one past 256.
    let serve_under_256 = || {
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(r#"ulimit -n 256 && exec "$0" serve --config "$1""#).arg(BIN).arg(&config);
        sh
    };
    write(1024);
    let refused = tokio::process::Command::from(serve_under_256()).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(60), refused).await.expect("serve exits").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("security.limits.max_connections = 1024"), "{stderr}");
    assert!(stderr.contains("RLIMIT_NOFILE"), "{stderr}");
    assert!(!dir.path().join("state").exists(), "nothing may be created before the check");

    // What the error says fits does start (and is stopped here, once it logged the bound).
    let fits = stderr.split("at most ").nth(1).and_then(|t| t.split(',').next()).unwrap();
    write(fits.parse().unwrap());
    let mut child = tokio::process::Command::from(serve_under_256())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let mut seen = String::new();
    let started = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("coordinator serving") {
                return;
            }
        }
    })
    .await;
    let _ = child.kill().await;
    assert!(started.is_ok(), "serve did not start within 60 s:\n{seen}");
    assert!(seen.contains("limit=256") && seen.contains("coordinator serving"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_running_coordinator_and_export_writes_a_loadable_hf_directory() {
    let dir = tempfile::tempdir().unwrap();
    write_model(&dir.path().join("model"));
    let mut settings = CoordinatorSettings::with_paths(dir.path().join("state"), dir.path().join("model"));
    settings.security.insecure = true;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(fedtune_coordinator::run(settings, listener, stop.clone()));

    let mut status = None;
    for _ in 0..100 {
        let out = tokio::process::Command::new(BIN)
            .args(["status", "--json", "--addr", &url])
            .output()
            .await
            .unwrap();
        if out.status.success() {
            status = Some(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("status answered");
    assert_eq!(status["phase"], "idle");
    assert_eq!(status["model_version"], 0);
    assert_eq!(status["strategy"], "fedavg");

    let out_dir = dir.path().join("export");
    let out = tokio::process::Command::new(BIN)
        .args(["export", "--round", "0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_labels"], 2);
    assert_eq!(cfg["id2label"]["1"], "yes");
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert!(out_dir.join("tokenizer.json").is_file());
    let model = ParameterVector::load_safetensors(&out_dir.join("model.safetensors"), |_| true).unwrap();
    // The coordinator completed the checkpoint with an initialised pooler and classifier.
    assert_eq!(model.tensor("classifier.weight").map(<[f32]>::len), Some(8));
    assert!(model.tensor("bert.pooler.dense.weight").is_some());

    let missing = tokio::process::Command::new(BIN)
        .args(["export", "--round", "3", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--out")
        .arg(dir.path().join("x"))
        .output()
        .await
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("round 3"));

    stop.cancel();
    server.await.unwrap().unwrap();
}

/// What a Kubernetes `grpc:` probe sees: the standard health service, on the coordinator's own
/// port and on the plaintext `server.health_listen` port (which serves nothing else), answers
/// SERVING for the server and for the coordinator service while it runs, and a watcher hears
/// NOT_SERVING as soon as shutdown begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_health_service_answers_serving_on_both_ports_while_running_and_not_serving_on_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let dir = tempfile::tempdir().unwrap();
    write_model(&dir.path().join("model"));
    let mut settings = CoordinatorSettings::with_paths(dir.path().join("state"), dir.path().join("model"));
    settings.security.insecure = true;
    settings.server.drain_grace = Duration::from_secs(2);
    // The plaintext health-only listener, on a port that was free a moment ago.
    let health_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    settings.server.health_listen = Some(([127, 0, 0, 1], health_port).into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(fedtune_coordinator::run(settings, listener, stop.clone()));

    let connect = |url: String| async move {
        for _ in 0..100 {
            if let Ok(c) = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nothing accepts connections at {url}");
    };
    let ask = |service: &str| HealthCheckRequest { service: service.into() };
    let health_url = format!("http://127.0.0.1:{health_port}");
    for url in [&url, &health_url] {
        let mut health = HealthClient::new(connect(url.clone()).await);
        for service in ["", "fedtune.v1.Coordinator"] {
            let status = health.check(ask(service)).await.unwrap().into_inner().status;
            assert_eq!(status, ServingStatus::Serving as i32, "service {service:?} at {url}");
        }
        let unknown = health.check(ask("no.such.Service")).await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    }
    // The health port serves health and nothing else.
    let mut coordinator =
        fedtune_shared::pb::coordinator_client::CoordinatorClient::new(connect(health_url).await);
    let refused = coordinator.get_status(fedtune_shared::pb::GetStatusRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);

    let mut health = HealthClient::new(connect(url.clone()).await);

    let mut watch = health.watch(ask("")).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap();
    assert_eq!(first.map(|r| r.status), Some(ServingStatus::Serving as i32));
    stop.cancel();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap();
    assert_eq!(next.map(|r| r.status), Some(ServingStatus::NotServing as i32));
    drop(watch);
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
}

/// Starts `serve` with `--log-format FORMAT` and stderr on a pipe (not a terminal), waits until
/// it serves, stops it with SIGTERM and returns everything it wrote to stderr.
fn serve_log(dir: &Path, format: &str) -> String {
    use std::io::BufRead;
    use std::process::Stdio;

    let config = dir.join(format!("{format}.toml"));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nstate_dir = \"{}\"\n[model]\ninit_dir = \"{}\"\n[security]\ninsecure = true\n",
            dir.join(format!("state-{format}")).display(),
            dir.join("model").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--log-format", format, "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("serve logs that it is serving");
        let serving = line.contains("coordinator serving");
        lines.push(line);
        if serving {
            break;
        }
    }
    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    // At most 30 s in steps of 20 ms.
    for step in 0.. {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(step < 1500, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    lines.join("\n")
}

#[test]
fn logs_on_a_pipe_have_no_colour_codes_and_json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    write_model(&dir.path().join("model"));

    let text = serve_log(dir.path(), "text");
    assert!(text.contains("coordinator serving"), "{text}");
    assert!(!text.contains("\u{1b}["), "{text:?}");

    let json = serve_log(dir.path(), "json");
    assert!(!json.contains("\u{1b}["), "{json:?}");
    let events: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(events.len() >= 2, "{json}");
    for e in &events {
        assert!(e["timestamp"].is_string() && e["level"].is_string(), "{e}");
        assert!(e["fields"]["message"].is_string(), "{e}");
    }
    assert!(events.iter().any(|e| e["fields"]["message"] == "coordinator serving"), "{json}");
    assert!(events.iter().any(|e| e["fields"]["message"] == "coordinator stopped"), "{json}");
}
