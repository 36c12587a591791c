//! Class labels: which id each class name gets, and how a data file's labels name classes.
//!
//! Every client of a federation must give the same class the same id, and the coordinator's
//! `simulate` must predict the ids clients will use, so the order is a rule of its own: the
//! distinct labels sorted numerically when every one is an integer (so `2` comes before `10`),
//! otherwise as text.
//!
//! A data file names each row's class in one of two ways, decided once per file by its first
//! labelled row ([`class_ids`]):
//! - **names**: the label is one of the model's class names (`neg`, `pos`);
//! - **ids**: the label is a whole number, the class id itself (`0`, `1`), as most public data
//!   sets ship and as `transformers` reads them against a model whose `config.json` names its
//!   classes (`id2label`). Every id must be below the number of classes.
//!
//! A file that mixes the two is refused at the first row that differs from the first, because
//! guessing which rows meant which would silently train on wrong classes. Names win: when any of
//! the model's class names is itself a number (`"0"`, `"1"`), every label is read as a name, so
//! a label `1` always means the class named `1` and never "whichever class has id 1".

use std::collections::BTreeSet;

/// The distinct labels among `labels`, in class-id order (see the module docs).
pub fn class_order<'a>(labels: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let distinct: BTreeSet<&str> = labels.into_iter().collect();
    let mut names: Vec<String> = distinct.into_iter().map(String::from).collect();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        // Stable: integers written differently ("01", "1") keep their text order.
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
    }
    names
}

/// Why a row's label does not name one of the model's classes. `row` counts the labels given
/// to [`class_ids`] from 0; callers turn it into a line of their file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// Neither one of the class names nor (where ids are allowed) a class id.
    #[error("label `{label}` is not one of the model's labels {names:?}")]
    Unknown {
        /// Index of the row among the labels checked.
        row: usize,
        /// The label as written.
        label: String,
        /// The model's class names in id order.
        names: Vec<String>,
    },
    /// The row uses the other form than the file's first labelled row.
    #[error(
        "label `{label}` is a class {this} but the file's first labelled row uses a class {first}; \
         a file gives every label as a name or every label as an id"
    )]
    Mixed {
        /// Index of the row among the labels checked.
        row: usize,
        /// The label as written.
        label: String,
        /// What this row's label is (`name` or `id`).
        this: LabelForm,
        /// What the first row's label is.
        first: LabelForm,
    },
    /// A class id not below the number of classes (or negative).
    #[error("class id `{label}` is out of range: the model has {count} labels, ids 0 to {}", count.saturating_sub(1))]
    OutOfRange {
        /// Index of the row among the labels checked.
        row: usize,
        /// The label as written.
        label: String,
        /// Number of classes.
        count: usize,
    },
}

impl LabelError {
    /// Index of the offending row among the labels checked.
    pub fn row(&self) -> usize {
        match self {
            LabelError::Unknown { row, .. }
            | LabelError::Mixed { row, .. }
            | LabelError::OutOfRange { row, .. } => *row,
        }
    }
}

/// How a file names its classes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelForm {
    /// Labels are class names.
    Name,
    /// Labels are class ids.
    Id,
}

impl std::fmt::Display for LabelForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LabelForm::Name => "name",
            LabelForm::Id => "id",
        })
    }
}

/// The class id of every label in `labels` (one per row, in file order) under the class
/// `names` (id order), by the rule in the module docs; the first row that breaks it is the
/// error.
pub fn class_ids<'a>(
    names: &[String],
    labels: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<usize>, LabelError> {
    // Names win: with a numeric class name, a number in the file is that name, never an id.
    let ids_allowed = !names.iter().any(|n| n.parse::<i64>().is_ok());
    let mut file_form = None;
    let mut out = Vec::new();
    for (row, label) in labels.into_iter().enumerate() {
        let by_name = names.iter().position(|n| n == label);
        let as_id = if ids_allowed { label.parse::<i64>().ok() } else { None };
        let this = match (by_name, as_id) {
            (Some(_), _) => LabelForm::Name,
            (None, Some(_)) => LabelForm::Id,
            (None, None) => {
                return Err(LabelError::Unknown { row, label: label.into(), names: names.to_vec() });
            }
        };
        let first = *file_form.get_or_insert(this);
        if this != first {
            return Err(LabelError::Mixed { row, label: label.into(), this, first });
        }
        out.push(match (by_name, as_id) {
            (Some(id), _) => id,
            (None, Some(id)) => usize::try_from(id)
                .ok()
                .filter(|&id| id < names.len())
                .ok_or_else(|| LabelError::OutOfRange { row, label: label.into(), count: names.len() })?,
            (None, None) => unreachable!("refused above"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn integer_labels_sort_numerically_and_others_as_text() {
        assert_eq!(class_order(["10", "2", "0", "2"]), ["0", "2", "10"]);
        assert_eq!(class_order(["pos", "neg", "neutral", "pos"]), ["neg", "neutral", "pos"]);
        assert_eq!(class_order(["10", "x", "2"]), ["10", "2", "x"], "one non-integer: all as text");
        assert!(class_order([]).is_empty());
    }

    #[test]
    fn class_ids_name_the_model_s_classes_by_position() {
        let model = names(&["neg", "pos"]);
        assert_eq!(class_ids(&model, ["1", "0", "1"]), Ok(vec![1, 0, 1]));
        assert_eq!(class_ids(&model, ["pos", "neg"]), Ok(vec![1, 0]));
    }

    #[test]
    fn the_first_row_decides_and_a_differing_row_is_refused() {
        let model = names(&["neg", "pos"]);
        let err = class_ids(&model, ["0", "1", "pos"]).unwrap_err();
        assert_eq!(
            err,
            LabelError::Mixed { row: 2, label: "pos".into(), this: LabelForm::Name, first: LabelForm::Id }
        );
        let err = class_ids(&model, ["neg", "1"]).unwrap_err();
        assert_eq!(err.row(), 1);
        assert!(err
            .to_string()
            .contains("label `1` is a class id but the file's first labelled row uses a class name"));
    }

    #[test]
    fn an_id_not_below_the_class_count_is_out_of_range() {
        let model = names(&["neg", "pos"]);
        assert_eq!(
            class_ids(&model, ["0", "2"]),
            Err(LabelError::OutOfRange { row: 1, label: "2".into(), count: 2 })
        );
        assert_eq!(class_ids(&model, ["-1"]).unwrap_err().row(), 0);
        assert_eq!(
            class_ids(&model, ["0", "2"]).unwrap_err().to_string(),
            "class id `2` is out of range: the model has 2 labels, ids 0 to 1"
        );
    }

    #[test]
    fn numeric_class_names_are_matched_as_names_never_as_ids() {
        // Id order "1", "0": with names winning, `0` is the class named 0 (id 1), not id 0.
        let model = names(&["1", "0"]);
        assert_eq!(class_ids(&model, ["0", "1"]), Ok(vec![1, 0]));
        let err = class_ids(&model, ["0", "2"]).unwrap_err();
        assert!(matches!(err, LabelError::Unknown { row: 1, .. }), "{err}");
    }

    #[test]
    fn a_label_that_is_neither_a_name_nor_an_id_is_unknown() {
        let err = class_ids(&names(&["neg", "pos"]), ["neg", "meh"]).unwrap_err();
        assert_eq!(err.to_string(), "label `meh` is not one of the model's labels [\"neg\", \"pos\"]");
        assert_eq!(err.row(), 1);
    }
}
