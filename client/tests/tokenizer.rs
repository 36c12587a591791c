//! Tokenization matches transformers' BERT tokenizer, and fedtune's padding and truncation
//! policy overrides whatever a tokenizer.json has baked in.

mod common;

use common::{fixture, flat_i64, json, minilm_dir, tiny_bert};
use fedtune_client::tokenize::TextTokenizer;

fn bert_vocab() -> TextTokenizer {
    TextTokenizer::from_vocab(&fixture("bert-uncased-vocab.txt"), true, 512).unwrap()
}

#[test]
fn a_man_is_eating_food_gets_the_bert_ids() {
    let enc = bert_vocab().encode("A man is eating food.").unwrap();
    assert_eq!(enc.ids, vec![101, 1037, 2158, 2003, 5983, 2833, 1012, 102]);
    assert_eq!(enc.type_ids, vec![0; 8]);
}

#[test]
fn the_vocab_fallback_matches_transformers_on_varied_text() {
    // Accents, CJK, emoji, punctuation, long words, whitespace, the empty string.
    let expected = json(&fixture("minilm-expected.json"));
    let tok = bert_vocab();
    for case in expected["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap().ids, flat_i64(&case["input_ids"]), "text {text:?}");
    }
}

#[test]
fn baked_in_padding_and_truncation_are_overridden() {
    // The tiny tokenizer.json pads to 24 and truncates at 20; we pad to the longest in the
    // batch and truncate at max_len.
    let tok = TextTokenizer::from_model_dir(&tiny_bert(), 10).unwrap();
    let batch = tok.encode_batch(&["a man", "the movie was good"]).unwrap();
    assert_eq!((batch.batch_size, batch.seq_len), (2, 6));
    assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1]);
    assert_eq!(&batch.input_ids[4..6], &[tok.pad_id(), tok.pad_id()]);

    let long = tok.encode("the movie was good and the film was great and the story was fun").unwrap();
    assert_eq!(long.ids.len(), 10);
    assert_eq!(long.ids[0], 2, "[CLS] first");
    assert_eq!(long.ids[9], 3, "[SEP] kept last after truncation");
}

#[test]
fn a_folder_without_tokenizer_json_falls_back_to_its_vocab() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_bert().join("vocab.txt"), dir.path().join("vocab.txt")).unwrap();
    let from_vocab = TextTokenizer::from_model_dir(dir.path(), 64).unwrap();
    let from_json = TextTokenizer::from_model_dir(&tiny_bert(), 64).unwrap();
    let expected = json(&tiny_bert().join("expected.json"));
    for s in expected["sentences"].as_array().unwrap() {
        let s = s.as_str().unwrap();
        assert_eq!(from_vocab.encode(s).unwrap(), from_json.encode(s).unwrap(), "{s:?}");
    }
}

#[test]
fn a_folder_without_any_tokenizer_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = TextTokenizer::from_model_dir(dir.path(), 64).unwrap_err().to_string();
    assert!(err.contains(&dir.path().display().to_string()) && err.contains("vocab.txt"), "{err}");
}

#[test]
fn minilm_tokenizer_json_matches_transformers() {
    let dir = minilm_dir();
    let tok = TextTokenizer::from_model_dir(&dir, 512).unwrap();
    let expected = json(&fixture("minilm-expected.json"));
    for case in expected["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap().ids, flat_i64(&case["input_ids"]), "text {text:?}");
    }
    // MiniLM's tokenizer.json pads to 128; a short batch must not be.
    assert_eq!(tok.encode_batch(&["A man is eating food."]).unwrap().seq_len, 8);
}
