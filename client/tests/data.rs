//! Data files load with configurable columns, and every bad row or file is reported with its
//! file, line and problem.

use std::path::{Path, PathBuf};

use fedtune_client::data::{DataOptions, Dataset, LabelSet, Split};

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn load_err(name: &str, content: &str, options: &DataOptions) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, content);
    let err = Dataset::load(&path, options).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "error does not name the file: {err}");
    err
}

#[test]
fn csv_with_custom_columns_and_a_split_column_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.csv",
        "review,stars,split,extra\n\"Great, really\",pos,train,x\nDull,neg,test,y\n\"multi\nline\",pos,train,z\n",
    );
    let options = DataOptions {
        text_column: "review".into(),
        label_column: Some("stars".into()),
        ..DataOptions::default()
    };
    let d = Dataset::load(&path, &options).unwrap();
    assert_eq!(d.examples.len(), 3);
    assert_eq!(d.examples[0].text, "Great, really");
    assert_eq!(d.examples[1].split, Some(Split::Eval));
    assert_eq!(d.examples[2].text, "multi\nline");
    assert_eq!(d.examples[2].line, 4, "a record's line is where it starts");
    let (train, eval) = d.split_indices(0.5, 1);
    assert_eq!((train, eval), (vec![0, 2], vec![1]), "the split column wins over the fraction");
    let labels = LabelSet::from_examples(&d.examples);
    assert_eq!(labels.names(), ["neg", "pos"]);
    assert_eq!(d.label_ids(&labels).unwrap(), vec![1, 0, 1]);
}

#[test]
fn jsonl_accepts_string_and_numeric_labels() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.jsonl",
        "{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\", \"label\": \"0\"}\n",
    );
    let d = Dataset::load(&path, &DataOptions::default()).unwrap();
    assert_eq!(d.examples.len(), 2);
    assert_eq!(d.examples[0].label.as_deref(), Some("1"));
    assert_eq!(d.examples[1].line, 3);
}

#[test]
fn a_csv_row_with_too_many_fields_names_its_line() {
    let err = load_err("d.csv", "text,label\nfine,1\nbroken,1,extra\n", &DataOptions::default());
    assert!(err.contains(":3:") && err.contains("3 fields"), "{err}");
}

#[test]
fn a_missing_column_is_named_with_the_columns_found() {
    let err = load_err("d.csv", "sentence,label\nfine,1\n", &DataOptions::default());
    assert!(err.contains("`text`") && err.contains("sentence, label"), "{err}");
}

#[test]
fn an_empty_label_names_its_line() {
    let err = load_err("d.csv", "text,label\nfine,1\nno label,\n", &DataOptions::default());
    assert!(err.contains(":3:") && err.contains("label"), "{err}");
}

#[test]
fn an_empty_text_names_its_line() {
    let err = load_err("d.tsv", "text\tlabel\nfine\t1\n  \t0\n", &DataOptions::default());
    assert!(err.contains(":3:") && err.contains("empty text"), "{err}");
}

#[test]
fn an_unknown_split_value_names_its_line() {
    let err = load_err("d.csv", "text,label,split\na,1,train\nb,0,holdout\n", &DataOptions::default());
    assert!(err.contains(":3:") && err.contains("holdout"), "{err}");
}

#[test]
fn invalid_json_names_its_line() {
    let err =
        load_err("d.jsonl", "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \n", &DataOptions::default());
    assert!(err.contains(":2:") && err.contains("invalid JSON"), "{err}");
}

#[test]
fn a_non_string_text_names_its_line() {
    let err = load_err("d.jsonl", "{\"text\": 5, \"label\": 1}\n", &DataOptions::default());
    assert!(err.contains(":1:") && err.contains("not a string"), "{err}");
}

#[test]
fn a_missing_json_key_names_its_line() {
    let err =
        load_err("d.jsonl", "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n", &DataOptions::default());
    assert!(err.contains(":2:") && err.contains("`label`"), "{err}");
}

#[test]
fn invalid_utf8_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.csv");
    std::fs::write(&path, b"text,label\nok,1\nbad \xff byte,0\n").unwrap();
    let err = Dataset::load(&path, &DataOptions::default()).unwrap_err().to_string();
    assert!(err.contains(":3:") && err.contains("UTF-8"), "{err}");
}

#[test]
fn an_unsupported_extension_and_an_empty_file_are_refused() {
    let err = load_err("d.parquet", "whatever", &DataOptions::default());
    assert!(err.contains("unsupported"), "{err}");
    let err = load_err("d.csv", "text,label\n", &DataOptions::default());
    assert!(err.contains("no examples"), "{err}");
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let err =
        Dataset::load(Path::new("/nonexistent/d.csv"), &DataOptions::default()).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/d.csv"), "{err}");
}

#[test]
fn a_label_the_model_does_not_know_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.csv", "text,label\na,pos\nb,meh\n");
    let d = Dataset::load(&path, &DataOptions::default()).unwrap();
    let err = d.label_ids(&LabelSet::new(vec!["neg".into(), "pos".into()])).unwrap_err().to_string();
    assert!(err.contains(":3:") && err.contains("meh"), "{err}");
}

#[test]
fn unlabelled_input_needs_no_label_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.csv", "text\nhello\n");
    let options = DataOptions { label_column: None, ..DataOptions::default() };
    assert_eq!(Dataset::load(&path, &options).unwrap().examples[0].label, None);
}

fn named(names: &[&str]) -> LabelSet {
    LabelSet::new(names.iter().map(|s| s.to_string()).collect())
}

fn label_ids_of(content: &str, labels: &LabelSet) -> Result<Vec<usize>, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.csv", content);
    let d = Dataset::load(&path, &DataOptions::default()).unwrap();
    d.label_ids(labels).map_err(|e| {
        let e = e.to_string();
        assert!(e.contains(&path.display().to_string()), "error does not name the file: {e}");
        e
    })
}

#[test]
fn a_file_of_class_ids_maps_them_to_the_model_s_named_classes() {
    let model = named(&["neg", "pos"]);
    assert_eq!(label_ids_of("text,label\na,1\nb,0\nc,1\n", &model), Ok(vec![1, 0, 1]));
    assert_eq!(label_ids_of("text,label\na,pos\nb,neg\n", &model), Ok(vec![1, 0]), "names still work");
    // JSON Lines numbers are ids too.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", "{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\",\"label\":0}\n");
    let d = Dataset::load(&path, &DataOptions::default()).unwrap();
    assert_eq!(d.label_ids(&model).unwrap(), [1, 0]);
}

#[test]
fn a_file_mixing_names_and_ids_is_refused_naming_the_row() {
    let model = named(&["neg", "pos"]);
    let err = label_ids_of("text,label\na,0\nb,1\nc,pos\n", &model).unwrap_err();
    assert!(err.contains(":4:") && err.contains("`pos`") && err.contains("first labelled row"), "{err}");
    let err = label_ids_of("text,label\na,neg\nb,1\n", &model).unwrap_err();
    assert!(err.contains(":3:") && err.contains("`1` is a class id"), "{err}");
}

#[test]
fn an_id_out_of_range_is_refused_naming_the_row() {
    let err = label_ids_of("text,label\na,0\nb,2\n", &named(&["neg", "pos"])).unwrap_err();
    assert!(err.contains(":3:") && err.contains("class id `2` is out of range"), "{err}");
    let err = label_ids_of("text,label\na,-1\n", &named(&["neg", "pos"])).unwrap_err();
    assert!(err.contains(":2:") && err.contains("out of range"), "{err}");
}

#[test]
fn digit_label_names_are_matched_as_names() {
    // The model's class with id 0 is named "1": names win, so `1` in the file is that class.
    let model = named(&["1", "0"]);
    assert_eq!(label_ids_of("text,label\na,1\nb,0\n", &model), Ok(vec![0, 1]));
    let err = label_ids_of("text,label\na,1\nb,2\n", &model).unwrap_err();
    assert!(err.contains(":3:") && err.contains("not one of the model's labels"), "{err}");
}
