//! LoRA adapters on the client: with B = 0 the adapted model is its base; only the B matrices
//! and the head train; the merged export loads in transformers and the adapter export loads in
//! `peft` onto the base model, both with fedtune's probabilities.

mod common;

use std::path::Path;
use std::process::Command;

use common::{cpu_options, max_abs_diff, sentiment_dataset, tiny_bert};
use fedtune_client::local_trainer::{FitConfig, LocalTrainer};
use fedtune_client::trainer::{BertTrainer, TrainerOptions};
use fedtune_shared::bert::lora::{lora_part, LoraConfig, LoraPart};
use fedtune_shared::schedule::{LrSchedule, Warmup};

fn lora() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: vec!["query".into(), "value".into(), "output.dense".into()],
        seed: 11,
    }
}

fn lora_options() -> TrainerOptions {
    TrainerOptions { adapter: Some(lora()), ..cpu_options() }
}

fn trainer(options: TrainerOptions) -> BertTrainer {
    BertTrainer::new(&tiny_bert(), sentiment_dataset(96, 5, None), options).unwrap()
}

/// A rate large enough that a few steps move B visibly.
fn fit(steps: u64) -> FitConfig {
    FitConfig {
        epochs: 1,
        batch_size: 16,
        learning_rate: 1e-2,
        max_steps: Some(steps),
        seed: 3,
        lr_schedule: LrSchedule::Constant,
        warmup: Warmup::Steps(0),
        ..FitConfig::default()
    }
}

fn texts() -> Vec<String> {
    ["the movie was very good", "this film is so awful and dull", "the music really was so nice"]
        .map(String::from)
        .to_vec()
}

#[test]
fn with_b_zero_the_adapted_model_predicts_exactly_what_its_base_does() {
    let base = trainer(cpu_options());
    let adapted = trainer(lora_options());
    let weights = adapted.all_weights().unwrap();
    let a = "bert.encoder.layer.0.attention.self.query.lora_A.weight";
    assert!(weights.tensor(a).unwrap().iter().any(|&v| v != 0.0), "A is drawn, not zero");
    assert_eq!(
        weights.tensor(a).unwrap(),
        lora().init_a(a, &[4, 32]).as_slice(),
        "A is the shared function's"
    );
    for (spec, range) in weights.manifest().ranges() {
        if matches!(lora_part(&spec.name), Some((_, LoraPart::B))) {
            assert!(weights.values()[range].iter().all(|&v| v == 0.0), "{} starts at zero", spec.name);
        }
    }
    for (ours, theirs) in base.predict(texts()).unwrap().iter().zip(adapted.predict(texts()).unwrap()) {
        assert_eq!(ours.probs, theirs.probs);
    }
}

#[test]
fn only_the_b_matrices_and_the_head_train() {
    let mut t = trainer(lora_options());
    let manifest = t.trainable_manifest();
    let names: Vec<&str> = manifest.tensors.iter().map(|n| n.name.as_str()).collect();
    assert!(names.iter().all(|n| LoraConfig::trains(n)), "{names:?}");
    // Two layers × three targets (query, value, and output.dense matching both output blocks).
    assert_eq!(names.iter().filter(|n| n.ends_with("lora_B.weight")).count(), 2 * 4, "{names:?}");
    assert!(names.contains(&"classifier.weight") && names.contains(&"bert.pooler.dense.weight"));

    let before = t.all_weights().unwrap();
    t.train(&fit(4)).unwrap();
    let after = t.all_weights().unwrap();
    for (spec, range) in before.manifest().ranges() {
        let changed = before.values()[range.clone()] != after.values()[range];
        assert_eq!(changed, LoraConfig::trains(&spec.name), "{} changed: {changed}", spec.name);
    }
}

/// Probabilities transformers (+ `peft` when `adapter` is given) computes for `texts()`.
fn python_probabilities(model: &Path, adapter: Option<&Path>) -> Vec<f32> {
    let script = r#"
import json, sys, torch
from transformers import AutoTokenizer, AutoModelForSequenceClassification
torch.set_num_threads(1)
model_dir, adapter_dir, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if adapter_dir:
    from peft import PeftModel
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    model = PeftModel.from_pretrained(base, adapter_dir)
else:
    model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
model.eval()
tok = AutoTokenizer.from_pretrained(model_dir)
enc = tok(texts, padding="longest", return_tensors="pt")
with torch.no_grad():
    probs = model(**enc).logits.softmax(-1)
print(json.dumps(probs.reshape(-1).tolist()))
"#;
    let adapter = adapter.map(|a| a.display().to_string()).unwrap_or_default();
    let args = [model.display().to_string(), adapter, serde_json::to_string(&texts()).unwrap()];
    common::flat_f32(&common::python_json(script, &args))
}

fn trained() -> (BertTrainer, Vec<f32>) {
    let mut t = trainer(lora_options());
    t.train(&fit(6)).unwrap();
    let ours: Vec<f32> = t.predict(texts()).unwrap().into_iter().flat_map(|p| p.probs).collect();
    (t, ours)
}

#[test]
fn transformers_loads_the_merged_export_with_fedtunes_probabilities() {
    let (t, ours) = trained();
    let dir = tempfile::tempdir().unwrap();
    t.export(dir.path()).unwrap();
    let exported = fedtune_shared::params::ParameterVector::load_safetensors(
        &dir.path().join("model.safetensors"),
        |_| true,
    )
    .unwrap();
    assert!(exported.manifest().tensors.iter().all(|s| lora_part(&s.name).is_none()), "a plain classifier");
    let theirs = python_probabilities(dir.path(), None);
    let diff = max_abs_diff(&ours, &theirs);
    assert!(diff <= 1e-5, "probabilities differ by {diff}: ours {ours:?}, transformers {theirs:?}");
}

#[test]
fn peft_loads_the_adapter_onto_the_base_model_with_fedtunes_probabilities() {
    let (t, ours) = trained();
    let dir = tempfile::tempdir().unwrap();
    t.export_adapter(dir.path()).unwrap();
    let config = common::json(&dir.path().join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["r"], 4);
    let theirs = python_probabilities(&tiny_bert(), Some(dir.path()));
    let diff = max_abs_diff(&ours, &theirs);
    assert!(diff <= 1e-5, "probabilities differ by {diff}: ours {ours:?}, peft {theirs:?}");
}

#[test]
fn the_cli_trains_only_the_adapter_and_head_and_exports_merged_and_for_peft() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("reviews.csv");
    common::write_sentiment_csv(&data, "text", "label", 80, 9);
    let (merged, adapter) = (dir.path().join("merged"), dir.path().join("adapter"));
    let out = Command::new(env!("CARGO_BIN_EXE_fedtune-client"))
        .args(["train", "--model"])
        .arg(tiny_bert())
        .arg("--data")
        .arg(&data)
        .args(["--adapter", "lora", "--lora-rank", "4", "--lora-targets", "query,value"])
        .args([
            "--epochs",
            "1",
            "--lr",
            "1e-2",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--max-len",
            "32",
            "--quiet",
        ])
        .arg("--out")
        .arg(&merged)
        .arg("--out-adapter")
        .arg(&adapter)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // Two layers × (query, value) × B [32, 4], the pooler [32, 32] + 32 and the head [3, 32] + 3.
    let trained = 2 * 2 * 32 * 4 + 32 * 32 + 32 + 3 * 32 + 3;
    assert!(stdout.contains(&format!("training {trained} of ")), "{stdout}");
    assert!(
        merged.join("model.safetensors").is_file() && adapter.join("adapter_model.safetensors").is_file()
    );
    let refused = Command::new(env!("CARGO_BIN_EXE_fedtune-client"))
        .args(["train", "--model"])
        .arg(tiny_bert())
        .arg("--data")
        .arg(&data)
        .args(["--adapter", "lora", "--lora-targets", "dense", "--device", "cpu", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("target_modules"), "{stderr}");
}
