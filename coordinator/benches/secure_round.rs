//! Round wall time and bytes moved with secure aggregation ÷ without, on one real workload, in
//! one run: `fedtune-coordinator simulate` (real coordinator and client processes, real BERT
//! training) runs twice with the same arguments, the second time with `--secure-aggregation`,
//! and the per-round figures of each run's `metrics.json` are compared.
//!
//! ```text
//! cargo build --release -p fedtune-coordinator -p fedtune-client
//! cargo bench -p fedtune-coordinator --bench secure_round -- [simulate arguments]
//! ```
//!
//! The simulate arguments (model, data, clients, rounds, DP flags, …) are passed to both runs
//! unchanged, so the two differ only in secure aggregation. The binaries are the release builds
//! in the target folder (or `FEDTUNE_BIN`, the coordinator's path). The first round includes
//! each client's first model download and tokenization; the ratio of the mean of rounds 2… is
//! printed beside the ratio of all rounds.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Round {
    round: u64,
    participants: u64,
    bytes: u64,
    seconds: f64,
    eval_accuracy: Option<f64>,
    epsilon: Option<f64>,
}

fn coordinator_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FEDTUNE_BIN") {
        return PathBuf::from(p);
    }
    // target/release/deps/secure_round-… → target/release/fedtune-coordinator
    let exe = std::env::current_exe().expect("bench path");
    let release = exe.ancestors().nth(2).expect("target folder").join("release");
    release.join("fedtune-coordinator")
}

fn run(binary: &Path, args: &[String], out: &Path, secure: bool) -> Vec<Round> {
    let mut cmd = Command::new(binary);
    cmd.arg("simulate").args(args).arg("--out").arg(out);
    if secure {
        cmd.arg("--secure-aggregation");
    }
    let status = cmd.status().expect("start simulate");
    assert!(
        status.success(),
        "simulate{} failed: {status}",
        if secure { " --secure-aggregation" } else { "" }
    );
    let text = std::fs::read_to_string(out.join("metrics.json")).expect("metrics.json");
    serde_json::from_str(&text).expect("metrics.json rows")
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (n, s) = v.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

fn main() {
    // `cargo bench` passes `--bench`; everything else goes to simulate.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let binary = coordinator_binary();
    assert!(binary.is_file(), "{} not found: build the release binaries first", binary.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = run(&binary, &args, &dir.path().join("plain"), false);
    let secure = run(&binary, &args, &dir.path().join("secure"), true);
    assert_eq!(plain.len(), secure.len(), "both runs must complete the same rounds");
    println!("\nround | plain s | secure s | ratio | plain MB | secure MB | plain acc | secure acc | secure ε | survivors");
    for (p, s) in plain.iter().zip(&secure) {
        let acc = |a: Option<f64>| a.map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a));
        println!(
            "{:>5} | {:>7.1} | {:>8.1} | {:>5.3} | {:>8.1} | {:>9.1} | {:>9} | {:>10} | {:>8} | {:>9}",
            p.round,
            p.seconds,
            s.seconds,
            s.seconds / p.seconds,
            p.bytes as f64 / 1e6,
            s.bytes as f64 / 1e6,
            acc(p.eval_accuracy),
            acc(s.eval_accuracy),
            s.epsilon.map_or("-".to_string(), |e| format!("{e:.3}")),
            s.participants,
        );
    }
    let all = mean(secure.iter().map(|r| r.seconds)) / mean(plain.iter().map(|r| r.seconds));
    let later =
        mean(secure.iter().skip(1).map(|r| r.seconds)) / mean(plain.iter().skip(1).map(|r| r.seconds));
    let bytes = secure.iter().map(|r| r.bytes).sum::<u64>() as f64
        / plain.iter().map(|r| r.bytes).sum::<u64>() as f64;
    println!("round wall, secure ÷ plain: {all:.3} over all rounds, {later:.3} over rounds 2…");
    println!("bytes moved (models and updates), secure ÷ plain: {bytes:.4}");
}
