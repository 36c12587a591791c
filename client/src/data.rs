//! Labelled text from CSV or JSON Lines files.
//!
//! Columns are configurable ([`DataOptions`]). Labels are read as text and mapped to class ids
//! by a [`LabelSet`]: the model's names, or the data's labels sorted (numerically when every
//! label is an integer), so the same data gives the same ids on every client. A file may give
//! its labels as class names or as class ids (`0`, `1`) of a model that names its classes, one
//! or the other for the whole file ([`fedtune_shared::labels`] holds the rule). An optional `split` column assigns rows to training
//! (`train`) or held-out evaluation (`test`, also `eval`/`validation`/`valid`/`dev`); without it
//! the trainer draws a seeded held-out fraction. Every problem is reported with the file, the
//! line and what is wrong with it, because a data error found after an hour of training is a
//! wasted hour.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// A problem with a data file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read (the cause is the source, printed by the chain).
    #[error("cannot read {path}")]
    Io {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The extension is neither `.csv`, `.tsv` nor `.jsonl`/`.ndjson`.
    #[error("{path}: unsupported data format (use .csv, .tsv or .jsonl)")]
    Format {
        /// File involved.
        path: String,
    },
    /// A required column is absent from the header (or from a JSON object).
    #[error("{path}:{line}: no column `{column}` (found: {found})")]
    MissingColumn {
        /// File involved.
        path: String,
        /// 1-based line.
        line: u64,
        /// Column looked for.
        column: String,
        /// Columns present.
        found: String,
    },
    /// A row is malformed or holds an unusable value.
    #[error("{path}:{line}: {problem}")]
    BadRow {
        /// File involved.
        path: String,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        problem: String,
    },
    /// The file holds no examples.
    #[error("{path}: no examples")]
    Empty {
        /// File involved.
        path: String,
    },
}

/// Where a row belongs when the file says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Used for training.
    Train,
    /// Held out for evaluation.
    Eval,
}

impl Split {
    fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "test" | "eval" | "evaluation" | "validation" | "valid" | "dev" => Some(Split::Eval),
            _ => None,
        }
    }
}

/// Which columns hold what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOptions {
    /// Column with the text to classify.
    pub text_column: String,
    /// Column with the class; `None` for unlabelled input (`predict`).
    pub label_column: Option<String>,
    /// Column assigning rows to train/test, honoured when present.
    pub split_column: String,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self { text_column: "text".into(), label_column: Some("label".into()), split_column: "split".into() }
    }
}

/// One row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The text.
    pub text: String,
    /// The class as written in the file.
    pub label: Option<String>,
    /// The split column's value, if the file has one.
    pub split: Option<Split>,
    /// 1-based line where the row starts (for error messages).
    pub line: u64,
}

/// The rows of one file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where the rows came from.
    pub path: PathBuf,
    /// Rows in file order.
    pub examples: Vec<Example>,
}

/// Class names in id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSet {
    names: Vec<String>,
}

impl LabelSet {
    /// From explicit names in id order (e.g. a model's `id2label`).
    pub fn new(names: Vec<String>) -> Self {
        Self { names }
    }

    /// The distinct labels of `examples` in class-id order
    /// ([`fedtune_shared::labels::class_order`]: numerically when all are integers, so `2` <
    /// `10`, otherwise as strings).
    pub fn from_examples<'a>(examples: impl IntoIterator<Item = &'a Example>) -> Self {
        Self {
            names: fedtune_shared::labels::class_order(
                examples.into_iter().filter_map(|e| e.label.as_deref()),
            ),
        }
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when there are no classes.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Names in id order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Id of a name.
    pub fn id(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Name of an id.
    pub fn name(&self, id: usize) -> Option<&str> {
        self.names.get(id).map(String::as_str)
    }
}

impl Dataset {
    /// Reads a `.csv`, `.tsv` or `.jsonl`/`.ndjson` file.
    pub fn load(path: &Path, options: &DataOptions) -> Result<Self, DataError> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let examples = match ext.as_str() {
            "csv" => read_csv(path, options, b',')?,
            "tsv" => read_csv(path, options, b'\t')?,
            "jsonl" | "ndjson" => read_jsonl(path, options)?,
            _ => return Err(DataError::Format { path: path.display().to_string() }),
        };
        if examples.is_empty() {
            return Err(DataError::Empty { path: path.display().to_string() });
        }
        Ok(Self { path: path.to_path_buf(), examples })
    }

    /// Wraps rows built in memory (tests, synthetic data); `name` stands in for the path.
    pub fn from_examples(name: &str, examples: Vec<Example>) -> Self {
        Self { path: PathBuf::from(name), examples }
    }

    /// True when the file assigns rows to splits.
    pub fn has_split(&self) -> bool {
        self.examples.iter().any(|e| e.split.is_some())
    }

    /// Class ids of every row under `labels`, reading the file's labels as class names or as
    /// class ids by [`fedtune_shared::labels::class_ids`] (decided once for the whole file; names
    /// win when the model's names are numbers). A row without label, with an unknown label, an
    /// id out of range or the other form than the first row is an error naming its line.
    pub fn label_ids(&self, labels: &LabelSet) -> Result<Vec<usize>, DataError> {
        let written = self
            .examples
            .iter()
            .map(|e| e.label.as_deref().ok_or_else(|| self.bad(e.line, "row has no label".into())))
            .collect::<Result<Vec<&str>, DataError>>()?;
        fedtune_shared::labels::class_ids(labels.names(), written).map_err(|e| {
            let line = self.examples.get(e.row()).map_or(0, |ex| ex.line);
            self.bad(line, e.to_string())
        })
    }

    /// Indices of training and held-out rows: the split column when the file has one,
    /// otherwise a seeded shuffle holding out `eval_fraction` of the rows (at least one row
    /// each side when there are two or more rows and the fraction is strictly between 0 and 1;
    /// 1 holds out every row).
    pub fn split_indices(&self, eval_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        if self.has_split() {
            let (mut train, mut eval) = (Vec::new(), Vec::new());
            for (i, e) in self.examples.iter().enumerate() {
                match e.split {
                    Some(Split::Eval) => eval.push(i),
                    _ => train.push(i),
                }
            }
            return (train, eval);
        }
        let n = self.examples.len();
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let mut n_eval = (eval_fraction.clamp(0.0, 1.0) * n as f64).round() as usize;
        if eval_fraction > 0.0 && eval_fraction < 1.0 && n >= 2 {
            n_eval = n_eval.clamp(1, n - 1);
        }
        let eval = idx.split_off(n - n_eval);
        idx.sort_unstable();
        let mut eval = eval;
        eval.sort_unstable();
        (idx, eval)
    }

    fn bad(&self, line: u64, problem: String) -> DataError {
        DataError::BadRow { path: self.path.display().to_string(), line, problem }
    }
}

/// Builds an example from its fields, checking each (shared by both formats).
fn make_example(
    path: &Path,
    line: u64,
    text: Option<String>,
    label: Option<Option<String>>,
    split: Option<String>,
    options: &DataOptions,
) -> Result<Example, DataError> {
    let bad = |problem: String| DataError::BadRow { path: path.display().to_string(), line, problem };
    let text = text.ok_or_else(|| bad(format!("no value in text column `{}`", options.text_column)))?;
    if text.trim().is_empty() {
        return Err(bad(format!("empty text in column `{}`", options.text_column)));
    }
    let label = match (label, &options.label_column) {
        (Some(Some(l)), Some(_)) if !l.trim().is_empty() => Some(l.trim().to_string()),
        (_, Some(column)) => return Err(bad(format!("empty or missing label in column `{column}`"))),
        (_, None) => None,
    };
    let split = match split {
        Some(s) => Some(Split::parse(&s).ok_or_else(|| {
            bad(format!("split `{s}` in column `{}` is neither train nor test", options.split_column))
        })?),
        None => None,
    };
    Ok(Example { text, label, split, line })
}

fn read_csv(path: &Path, options: &DataOptions, delimiter: u8) -> Result<Vec<Example>, DataError> {
    let shown = path.display().to_string();
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_path(path)
        .map_err(|e| csv_error(&shown, e))?;
    let headers = reader.headers().map_err(|e| csv_error(&shown, e))?.clone();
    let found = headers.iter().collect::<Vec<_>>().join(", ");
    let column = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| DataError::MissingColumn {
            path: shown.clone(),
            line: 1,
            column: name.into(),
            found: found.clone(),
        })
    };
    let text_col = column(&options.text_column)?;
    let label_col = options.label_column.as_deref().map(column).transpose()?;
    let split_col = headers.iter().position(|h| h == options.split_column);
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(&shown, e))?;
        let line = record.position().map_or(0, csv::Position::line);
        let field = |i: usize| record.get(i).map(String::from);
        out.push(make_example(
            path,
            line,
            field(text_col),
            label_col.map(field),
            split_col.and_then(field),
            options,
        )?);
    }
    Ok(out)
}

fn csv_error(path: &str, e: csv::Error) -> DataError {
    let line = e.position().map_or(0, csv::Position::line);
    match e.into_kind() {
        csv::ErrorKind::Io(source) => DataError::Io { path: path.into(), source },
        csv::ErrorKind::Utf8 { err, .. } => {
            DataError::BadRow { path: path.into(), line, problem: format!("invalid UTF-8: {err}") }
        }
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => DataError::BadRow {
            path: path.into(),
            line,
            problem: format!("row has {len} fields but the header has {expected_len}"),
        },
        other => DataError::BadRow { path: path.into(), line, problem: format!("{other:?}") },
    }
}

fn read_jsonl(path: &Path, options: &DataOptions) -> Result<Vec<Example>, DataError> {
    use std::io::BufRead;
    let shown = path.display().to_string();
    let io = |source| DataError::Io { path: shown.clone(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let n = i as u64 + 1;
        let line = line.map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                DataError::BadRow { path: shown.clone(), line: n, problem: "invalid UTF-8".into() }
            }
            _ => DataError::Io { path: shown.clone(), source: e },
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |problem: String| DataError::BadRow { path: shown.clone(), line: n, problem };
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| bad("expected a JSON object".into()))?;
        let missing = |column: &str| DataError::MissingColumn {
            path: shown.clone(),
            line: n,
            column: column.into(),
            found: obj.keys().cloned().collect::<Vec<_>>().join(", "),
        };
        let text = match obj.get(&options.text_column) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => return Err(bad(format!("`{}` is {other}, not a string", options.text_column))),
            None => return Err(missing(&options.text_column)),
        };
        let label = match &options.label_column {
            Some(column) => Some(match obj.get(column) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(x)) => Some(x.to_string()),
                Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
                Some(serde_json::Value::Null) => None,
                Some(other) => {
                    return Err(bad(format!("label `{column}` is {other}, not a string or number")))
                }
                None => return Err(missing(column)),
            }),
            None => None,
        };
        let split = match obj.get(&options.split_column) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Null) | None => None,
            Some(other) => {
                return Err(bad(format!("split `{}` is {other}, not a string", options.split_column)))
            }
        };
        out.push(make_example(path, n, Some(text), label, split, options)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(label: &str) -> Example {
        Example { text: "t".into(), label: Some(label.into()), split: None, line: 1 }
    }

    #[test]
    fn integer_labels_sort_numerically_and_others_as_text() {
        let l = LabelSet::from_examples(&[ex("10"), ex("2"), ex("0"), ex("2")]);
        assert_eq!(l.names(), ["0", "2", "10"]);
        let l = LabelSet::from_examples(&[ex("pos"), ex("neg"), ex("neutral")]);
        assert_eq!(l.names(), ["neg", "neutral", "pos"]);
    }

    #[test]
    fn a_seeded_split_is_stable_and_disjoint() {
        let d = Dataset::from_examples("mem", (0..50).map(|i| ex(&i.to_string())).collect());
        let (a_train, a_eval) = d.split_indices(0.2, 7);
        let (b_train, b_eval) = d.split_indices(0.2, 7);
        assert_eq!((a_train.clone(), a_eval.clone()), (b_train, b_eval));
        assert_eq!((a_train.len(), a_eval.len()), (40, 10));
        assert!(a_eval.iter().all(|i| !a_train.contains(i)));
    }

    #[test]
    fn a_tiny_dataset_still_holds_out_one_example() {
        let d = Dataset::from_examples("mem", vec![ex("a"), ex("b"), ex("a")]);
        let (train, eval) = d.split_indices(0.1, 0);
        assert_eq!((train.len(), eval.len()), (2, 1));
    }
}
