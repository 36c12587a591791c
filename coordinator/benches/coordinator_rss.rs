//! Coordinator peak memory with 2 vs 32 clients uploading full updates of a 22.7M-parameter
//! model at the same time: streaming aggregation keeps it O(model), so the ratio stays near 1.
//!
//! The real `fedtune-coordinator` binary runs as a child process; its peak resident set
//! (`VmHWM` in `/proc/<pid>/status`) is read after the round is published.
//! `cargo bench -p fedtune-coordinator --bench coordinator_rss`

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::{connect, enroll, free_port, spawn_serve, status, write_minilm_like, Client};
use fedtune_shared::ids::Sha256;
use tokio::time::Instant;

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

async fn run(clients: usize, model: &std::path::Path, payload: Bytes, digest: Sha256) -> (u64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:{port}"
[storage]
state_dir = "{state}"
[model]
init_dir = "{model}"
[rounds]
total = 1
min_available = {clients}
min_fit = {clients}
deadline = "30m"
[sampling]
scheme = "fixed"
count = {clients}
[evaluation]
every = 0
[clients]
heartbeat_interval = "10s"
liveness_timeout = "10m"
[security]
insecure = true
"#,
            state = dir.path().join("state").display(),
            model = model.display()
        ),
    )
    .expect("config");
    let keys: Vec<_> =
        (0..clients).map(|k| enroll(&dir.path().join("state"), &format!("client-{k:02}"))).collect();
    let binary = Path::new(env!("CARGO_BIN_EXE_fedtune-coordinator"));
    let mut child = spawn_serve(binary, &config, &dir.path().join("coordinator.log"));
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let mut handles = Vec::new();
    for (k, key) in keys.into_iter().enumerate() {
        let (url, payload) = (url.clone(), payload.clone());
        handles.push(tokio::spawn(async move {
            let mut c = Client::join(&url, &format!("client-{k:02}"), key).await;
            let task = c.fit_task().await;
            c.upload(&task, payload, digest).await;
        }));
    }
    for h in handles {
        h.await.expect("client");
    }
    let mut observer = connect(&url).await;
    while status(&mut observer).await.model_version < 1 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let hwm = vm_hwm_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (hwm, secs)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = write_minilm_like(&dir.path().join("model"));
        // Default settings train every tensor, so a delta has as many values as the model.
        let n = fedtune_shared::params::ParameterVector::load_safetensors(
            &model.join("model.safetensors"),
            |_| true,
        )
        .expect("model")
        .values()
        .len();
        let delta: Vec<u8> = (0..n).flat_map(|i| (((i % 977) as f32 - 488.0) * 1e-6).to_le_bytes()).collect();
        let digest = Sha256::of(&delta);
        let payload = Bytes::from(delta);
        println!(
            "coordinator peak RSS: {n} parameters, full-model updates of {:.1} MB each",
            payload.len() as f64 / 1e6
        );
        let (small, t_small) = run(2, &model, payload.clone(), digest).await;
        println!("  2 clients:  VmHWM {:>8.1} MB  (round in {t_small:.1} s)", small as f64 / 1024.0);
        let (large, t_large) = run(32, &model, payload.clone(), digest).await;
        println!("  32 clients: VmHWM {:>8.1} MB  (round in {t_large:.1} s)", large as f64 / 1024.0);
        println!(
            "  ratio 32/2: {:.3}  (model {:.1} MB; {:.1} MB of updates received in the 32-client round)",
            large as f64 / small as f64,
            payload.len() as f64 / 1e6,
            32.0 * payload.len() as f64 / 1e6
        );
    });
}
