//! The tch model computes what Hugging Face transformers computes: hidden states, pooler output
//! and logits within 1e-4, on a tiny random model and on the real all-MiniLM-L6-v2 (which
//! `scripts/test.sh` fetches; without it the MiniLM test fails, naming what is missing).
//! Expected values come from scripts/parity/make_fixtures.py.

mod common;

use common::{flat_f32, flat_i64, json, max_abs_diff, minilm_dir, tiny_bert};
use fedtune_client::model::{BertClassifier, ModelInput};
use fedtune_client::tokenize::TextTokenizer;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f32 = 1e-4;

fn values(t: &Tensor) -> Vec<f32> {
    Vec::try_from(&t.to_kind(Kind::Float).contiguous().view([-1])).unwrap()
}

fn input_from(case: &serde_json::Value) -> ModelInput {
    let rows = case["input_ids"].as_array().unwrap().len() as i64;
    let t = |key: &str| Tensor::from_slice(&flat_i64(&case[key])).view([rows, -1]);
    ModelInput {
        input_ids: t("input_ids"),
        attention_mask: t("attention_mask"),
        token_type_ids: t("token_type_ids"),
    }
}

fn tiny() -> BertClassifier {
    tch::set_num_threads(1);
    BertClassifier::load(&tiny_bert(), 3, Device::Cpu, 0).unwrap().0
}

fn assert_close(what: &str, got: &Tensor, expected: &serde_json::Value) {
    let expected = flat_f32(expected);
    let diff = max_abs_diff(&values(got), &expected);
    assert!(diff <= TOLERANCE, "{what}: max |Δ| = {diff} > {TOLERANCE}");
}

#[test]
fn the_tiny_model_matches_transformers_on_a_padded_batch() {
    let expected = json(&tiny_bert().join("expected.json"));
    let case = &expected["cases"][0];
    assert_eq!(case["name"], "batch");
    // Tokenize ourselves: the ids (and so the padding) must be transformers' too.
    let sentences: Vec<&str> =
        expected["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let tokenizer = TextTokenizer::from_model_dir(&tiny_bert(), 64).unwrap();
    let batch = tokenizer.encode_batch(&sentences).unwrap();
    assert_eq!(batch.input_ids, flat_i64(&case["input_ids"]));
    assert_eq!(batch.attention_mask, flat_i64(&case["attention_mask"]));

    let model = tiny();
    let out = tch::no_grad(|| model.forward(&input_from(case), false));
    assert_close("last_hidden_state", &out.bert.last_hidden_state, &case["last_hidden_state"]);
    assert_close("pooler_output", &out.bert.pooler_output, &case["pooler_output"]);
    assert_close("logits", &out.logits, &case["logits"]);
}

#[test]
fn token_type_ids_of_a_sentence_pair_are_honoured() {
    let expected = json(&tiny_bert().join("expected.json"));
    let case = &expected["cases"][1];
    assert_eq!(case["name"], "pair");
    assert!(flat_i64(&case["token_type_ids"]).contains(&1), "the fixture must exercise segment 1");
    let model = tiny();
    let out = tch::no_grad(|| model.forward(&input_from(case), false));
    assert_close("pair last_hidden_state", &out.bert.last_hidden_state, &case["last_hidden_state"]);
    assert_close("pair logits", &out.logits, &case["logits"]);
}

#[test]
fn dropout_is_active_in_training_only() {
    let expected = json(&tiny_bert().join("expected.json"));
    let input = input_from(&expected["cases"][0]);
    let model = tiny();
    tch::no_grad(|| {
        let eval_a = values(&model.forward(&input, false).logits);
        let eval_b = values(&model.forward(&input, false).logits);
        assert_eq!(eval_a, eval_b);
        let train = values(&model.forward(&input, true).logits);
        assert!(max_abs_diff(&train, &eval_a) > 1e-3, "training forward ignored dropout");
    });
}

#[test]
fn a_checkpoint_without_the_bert_prefix_loads_and_the_head_is_initialized_from_the_seed() {
    // Rewrite the tiny checkpoint as a bare BertModel saves it (no `bert.` prefix, no
    // classifier, a position_ids buffer), as sentence-transformers checkpoints are.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "vocab.txt", "tokenizer.json"] {
        std::fs::copy(tiny_bert().join(f), dir.path().join(f)).unwrap();
    }
    let full = Tensor::read_safetensors(tiny_bert().join("model.safetensors")).unwrap();
    let mut bare: Vec<(String, Tensor)> = full
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix("bert.").map(|n| (n.to_string(), t)))
        .collect();
    bare.push((
        "embeddings.position_ids".into(),
        Tensor::arange(64, (Kind::Int64, Device::Cpu)).unsqueeze(0),
    ));
    Tensor::write_safetensors(&bare, dir.path().join("model.safetensors")).unwrap();

    let (model, report) = BertClassifier::load(dir.path(), 2, Device::Cpu, 7).unwrap();
    assert_eq!(report.missing, vec!["classifier.bias".to_string(), "classifier.weight".to_string()]);
    assert!(report.unused.is_empty(), "position_ids is a buffer, not an unused weight: {:?}", report.unused);

    let expected = json(&tiny_bert().join("expected.json"));
    let case = &expected["cases"][0];
    let out = tch::no_grad(|| model.forward(&input_from(case), false));
    assert_close("bare last_hidden_state", &out.bert.last_hidden_state, &case["last_hidden_state"]);

    let vars: std::collections::HashMap<String, Tensor> = model.named_variables().into_iter().collect();
    let w = &vars["classifier.weight"];
    let std = f64::try_from(w.std(true)).unwrap();
    assert!((0.01..0.04).contains(&std), "classifier init std {std}, transformers uses 0.02");
    assert_eq!(f64::try_from(vars["classifier.bias"].abs().sum(Kind::Float)).unwrap(), 0.0);
    let again = BertClassifier::load(dir.path(), 2, Device::Cpu, 7).unwrap().0;
    let other = BertClassifier::load(dir.path(), 2, Device::Cpu, 8).unwrap().0;
    let weight = |m: &BertClassifier| {
        values(&m.named_variables().into_iter().find(|(n, _)| n == "classifier.weight").unwrap().1)
    };
    assert_eq!(weight(&again), values(w), "same seed, same head");
    assert_ne!(weight(&other), values(w), "another seed, another head");
}

#[test]
fn minilm_matches_transformers() {
    let dir = minilm_dir();
    tch::set_num_threads(2);
    let expected = json(&common::fixture("minilm-expected.json"));
    let sentences: Vec<&str> =
        expected["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let tokenizer = TextTokenizer::from_model_dir(&dir, 128).unwrap();
    let batch = tokenizer.encode_batch(&sentences).unwrap();
    assert_eq!(batch.input_ids, flat_i64(&expected["input_ids"]));
    assert_eq!(&batch.input_ids[..8], &[101, 1037, 2158, 2003, 5983, 2833, 1012, 102]);

    let (model, report) = BertClassifier::load(&dir, 2, Device::Cpu, 0).unwrap();
    assert!(report.missing.iter().all(|n| n.starts_with("classifier.")), "{:?}", report.missing);
    let shape = [batch.batch_size as i64, batch.seq_len as i64];
    let input = ModelInput {
        input_ids: Tensor::from_slice(&batch.input_ids).view(shape),
        attention_mask: Tensor::from_slice(&batch.attention_mask).view(shape),
        token_type_ids: Tensor::from_slice(&batch.token_type_ids).view(shape),
    };
    let out = tch::no_grad(|| model.forward(&input, false));
    assert_close("minilm last_hidden_state", &out.bert.last_hidden_state, &expected["last_hidden_state"]);
    assert_close("minilm pooler_output", &out.bert.pooler_output, &expected["pooler_output"]);
    let first = values(&out.bert.last_hidden_state.get(0).get(0).narrow(0, 0, 4));
    let known = [-0.0026f32, 0.1177, 0.0037, 0.2447];
    assert!(max_abs_diff(&first, &known) < 1e-4 + 5e-5, "{first:?} vs {known:?}");
}

#[test]
fn bf16_matrix_products_stay_close_to_f32_and_train_f32_master_weights() {
    use fedtune_client::model::Precision;
    use fedtune_client::trainer::engine::train_step;
    use fedtune_client::trainer::optim::{AdamW, AdamWConfig};

    let expected = json(&tiny_bert().join("expected.json"));
    let input = input_from(&expected["cases"][0]);
    let mut model = tiny();
    let exact = tch::no_grad(|| values(&model.forward(&input, false).logits));
    model.precision = Precision::Bf16;
    let out = tch::no_grad(|| model.forward(&input, false));
    assert_eq!(out.logits.kind(), Kind::Float, "logits come back in f32");
    assert_eq!(out.bert.last_hidden_state.kind(), Kind::Float, "LayerNorm runs in f32");
    let diff = max_abs_diff(&values(&out.logits), &exact);
    assert!(diff > 0.0 && diff < 0.05, "bf16 logits differ from f32 by {diff}");

    let params = model.named_variables();
    let before = values(&params.iter().find(|(n, _)| n == "classifier.weight").unwrap().1);
    let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
    let labels = Tensor::from_slice(&[0i64, 2, 1, 2]);
    let loss =
        f64::try_from(train_step(&model, &mut opt, &input, &labels, 1e-3, 1.0, None).unwrap()).unwrap();
    assert!(loss.is_finite());
    let (_, w) = model.named_variables().into_iter().find(|(n, _)| n == "classifier.weight").unwrap();
    assert_eq!(w.kind(), Kind::Float, "master weights stay f32");
    assert_ne!(values(&w), before, "the bf16 step updated the weights");
}
