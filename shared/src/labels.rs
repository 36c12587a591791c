//! Class labels: which id each class name gets.
//!
//! Every client of a federation must give the same class the same id, and the coordinator's
//! `simulate` must predict the ids clients will use, so the order is a rule of its own: the
//! distinct labels sorted numerically when every one is an integer (so `2` comes before `10`),
//! otherwise as text.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_labels_sort_numerically_and_others_as_text() {
        assert_eq!(class_order(["10", "2", "0", "2"]), ["0", "2", "10"]);
        assert_eq!(class_order(["pos", "neg", "neutral", "pos"]), ["neg", "neutral", "pos"]);
        assert_eq!(class_order(["10", "x", "2"]), ["10", "2", "x"], "one non-integer: all as text");
        assert!(class_order([]).is_empty());
    }
}
