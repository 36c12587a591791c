//! Classification metrics: accuracy, macro-F1 and the majority-class baseline.

/// Fraction of `pred` equal to `truth` (0 for no examples).
pub fn accuracy(truth: &[usize], pred: &[usize]) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    truth.iter().zip(pred).filter(|(t, p)| t == p).count() as f64 / truth.len() as f64
}

/// Unweighted mean of per-class F1 over the classes that occur in `truth` or `pred` (as
/// scikit-learn's `f1_score(average="macro")`; a class with no true or predicted positive
/// counts as F1 = 0 only when it occurs on one side).
pub fn macro_f1(truth: &[usize], pred: &[usize], num_classes: usize) -> f64 {
    let mut tp = vec![0usize; num_classes];
    let mut fp = vec![0usize; num_classes];
    let mut fn_ = vec![0usize; num_classes];
    for (&t, &p) in truth.iter().zip(pred) {
        if t == p {
            tp[t] += 1;
        } else {
            fp[p] += 1;
            fn_[t] += 1;
        }
    }
    let present: Vec<usize> = (0..num_classes).filter(|&c| tp[c] + fp[c] + fn_[c] > 0).collect();
    if present.is_empty() {
        return 0.0;
    }
    let f1 = |c: usize| {
        let denom = 2 * tp[c] + fp[c] + fn_[c];
        if denom == 0 {
            0.0
        } else {
            2.0 * tp[c] as f64 / denom as f64
        }
    };
    present.iter().map(|&c| f1(c)).sum::<f64>() / present.len() as f64
}

/// The most frequent class of `train` (lowest id on ties), and the accuracy of always predicting
/// it on `eval`: the number a trained model has to beat.
pub fn majority_baseline(train: &[usize], eval: &[usize], num_classes: usize) -> (usize, f64) {
    let mut counts = vec![0usize; num_classes.max(1)];
    for &c in train {
        counts[c] += 1;
    }
    let majority =
        counts.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(c, _)| c);
    (majority, accuracy(eval, &vec![majority; eval.len()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_predictions_score_one() {
        assert_eq!(accuracy(&[0, 1, 2], &[0, 1, 2]), 1.0);
        assert_eq!(macro_f1(&[0, 1, 2], &[0, 1, 2], 3), 1.0);
    }

    #[test]
    fn macro_f1_averages_classes_equally() {
        // Class 0: tp=2, fp=1, fn=0 → F1 = 4/5; class 1: tp=0, fp=0, fn=1 → F1 = 0.
        let f = macro_f1(&[0, 0, 1], &[0, 0, 0], 2);
        assert!((f - 0.4).abs() < 1e-12, "{f}");
    }

    #[test]
    fn the_majority_baseline_predicts_the_commonest_training_class() {
        let (class, acc) = majority_baseline(&[1, 1, 0], &[1, 0, 0, 0], 2);
        assert_eq!(class, 1);
        assert_eq!(acc, 0.25);
    }
}
