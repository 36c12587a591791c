//! Models and data the scenarios create for themselves: nothing is downloaded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use fedtune_coordinator::settings::{CoordinatorSettings, SamplingSettings};
use fedtune_shared::params::{Manifest, ParameterVector, TensorSpec};
use rand::{Rng, SeedableRng};

/// The tiny random `BertForSequenceClassification` (2 layers, hidden 32, labels
/// negative/neutral/positive, a vocabulary holding the synthetic sentiment words) that the
/// client's parity tests use.
pub fn tiny_bert() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/tests/fixtures/tiny-bert")
}

/// A BERT-shaped checkpoint whose values never matter, for federations of fake trainers:
/// `layers` encoder layers of width `hidden` (one `hidden × hidden` matrix each), a pooler and a
/// two-label classifier. Returns the folder (`config.json`, `model.safetensors`).
pub fn write_fake_model(dir: &Path, layers: usize, hidden: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut specs =
        vec![TensorSpec { name: "bert.embeddings.word_embeddings.weight".into(), shape: vec![16, hidden] }];
    for l in 0..layers {
        specs.push(TensorSpec {
            name: format!("bert.encoder.layer.{l}.output.dense.weight"),
            shape: vec![hidden, hidden],
        });
        specs.push(TensorSpec {
            name: format!("bert.encoder.layer.{l}.output.dense.bias"),
            shape: vec![hidden],
        });
    }
    specs.push(TensorSpec { name: "bert.pooler.dense.weight".into(), shape: vec![hidden, hidden] });
    specs.push(TensorSpec { name: "bert.pooler.dense.bias".into(), shape: vec![hidden] });
    specs.push(TensorSpec { name: "classifier.weight".into(), shape: vec![2, hidden] });
    specs.push(TensorSpec { name: "classifier.bias".into(), shape: vec![2] });
    let manifest = Manifest::new(specs)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let values = (0..manifest.numel()).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    ParameterVector::new(manifest, values)?.save_safetensors(&dir.join("model.safetensors"))?;
    std::fs::write(
        dir.join("config.json"),
        format!(
            r#"{{"model_type": "bert", "hidden_size": {hidden}, "num_hidden_layers": {layers}, "id2label": {{"0": "negative", "1": "positive"}}}}"#
        ),
    )?;
    Ok(dir.to_path_buf())
}

const POSITIVE: [&str; 6] = ["good", "great", "wonderful", "excellent", "nice", "brilliant"];
const NEGATIVE: [&str; 6] = ["bad", "terrible", "awful", "horrible", "poor", "dull"];
const SUBJECTS: [&str; 5] = ["the movie", "this film", "the story", "the acting", "the music"];
const VERBS: [&str; 3] = ["was", "is", "really was"];

/// Writes `n` learnable sentiment rows (`text,label,topic,split`; positive iff the sentence holds
/// a positive word; about 60 % positive; every fifth row held out; `topic` the sentence's
/// subject, for `by:topic` partitions). Every word is in [`tiny_bert`]'s vocabulary.
pub fn write_sentiment_csv(path: &Path, n: usize, seed: u64) -> Result<PathBuf> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(["text", "label", "topic", "split"])?;
    for i in 0..n {
        let positive = rng.random_bool(0.6);
        let words = if positive { &POSITIVE } else { &NEGATIVE };
        let subject = SUBJECTS[rng.random_range(0..SUBJECTS.len())];
        let text = format!(
            "{subject} {} {} {}",
            VERBS[rng.random_range(0..VERBS.len())],
            if rng.random_bool(0.5) { "very" } else { "so" },
            words[rng.random_range(0..words.len())]
        );
        let label = if positive { "positive" } else { "negative" };
        let split = if i % 5 == 4 { "test" } else { "train" };
        w.write_record([text.as_str(), label, subject, split])?;
    }
    w.flush()?;
    Ok(path.to_path_buf())
}

/// Coordinator settings for fast scenarios: `rounds` rounds needing `min_fit` updates, quick
/// heartbeats and liveness (so a killed client is noticed within seconds), evaluation after
/// every round, state in `state_dir`.
pub fn quick_settings(
    state_dir: &Path,
    model: &Path,
    rounds: u64,
    clients: usize,
    min_fit: usize,
) -> CoordinatorSettings {
    let mut s = CoordinatorSettings::with_paths(state_dir, model);
    s.server.long_poll = Duration::from_secs(2);
    s.server.drain_grace = Duration::from_secs(2);
    s.rounds.total = rounds;
    s.rounds.min_available = min_fit;
    s.rounds.min_fit = min_fit;
    s.rounds.deadline = Duration::from_secs(60);
    s.rounds.retry_backoff = Duration::from_millis(200);
    s.sampling = SamplingSettings::Fixed { count: clients };
    s.fit.learning_rate = 0.1;
    s.evaluation.every = 1;
    s.evaluation.deadline = Duration::from_secs(30);
    s.clients.heartbeat_interval = Duration::from_millis(300);
    s.clients.liveness_timeout = Duration::from_secs(2);
    // Plaintext on loopback (clients still authenticate with allowlisted keys and sign), and
    // limits far above what a scenario does: status polling from one address is frequent.
    s.security.insecure = true;
    s.security.limits.calls_per_second = 10_000.0;
    s.security.limits.burst = 10_000;
    s.security.limits.anonymous_calls_per_second = 10_000.0;
    s.security.limits.anonymous_burst = 10_000;
    s
}

/// [`quick_settings`] for one round over a small fake model (2 layers, hidden 8) written under
/// `dir`: `clients` clients sampled once they have all joined, `min_fit` updates needed, no
/// evaluation, state in `dir/state`. The scenarios that drive the protocol by hand start here.
pub fn one_round_settings(dir: &Path, clients: usize, min_fit: usize) -> Result<CoordinatorSettings> {
    let model = write_fake_model(&dir.join("model"), 2, 8)?;
    let mut s = quick_settings(&dir.join("state"), &model, 1, clients, min_fit);
    s.evaluation.every = 0;
    s.rounds.min_available = clients;
    Ok(s)
}
