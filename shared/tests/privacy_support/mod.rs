//! Statistics shared by the privacy tests: exact discrete Gaussian bin probabilities and χ².
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;

/// Upper critical value of χ² with `df` degrees of freedom at p = 10⁻⁶ (Wilson–Hilferty).
pub fn chi2_critical(df: usize) -> f64 {
    let k = df as f64;
    let z = 4.753_424_308_822_899; // Φ⁻¹(1 − 10⁻⁶)
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// Bins `[lo_i, hi_i]` (inclusive integer ranges, first and last open-ended) with their exact
/// probabilities under `N_ℤ(0, σ²)`, each with expected count at least `min_expected` of `n`.
pub fn dg_bins(sigma: f64, n: usize, min_expected: f64) -> Vec<(i64, i64, f64)> {
    // Fine candidate bins first, merged until each is large enough.
    let reach = (9.0 * sigma).ceil().max(3.0) as i64;
    let width = ((2 * reach) as f64 / 400.0).ceil().max(1.0) as i64;
    let mut edges = vec![];
    let mut x = -reach;
    while x <= reach {
        edges.push(x);
        x += width;
    }
    let exact = sigma <= 1000.0;
    let z: f64 = if exact {
        let lim = (40.0 * sigma).ceil() as i64 + 10;
        (-lim..=lim).map(|x| (-(x as f64).powi(2) / (2.0 * sigma * sigma)).exp()).sum()
    } else {
        0.0
    };
    let mass = |a: i64, b: i64| -> f64 {
        if exact {
            let lim = (40.0 * sigma).ceil() as i64 + 10;
            let (a, b) = (a.max(-lim), b.min(lim));
            (a..=b).map(|x| (-(x as f64).powi(2) / (2.0 * sigma * sigma)).exp()).sum::<f64>() / z
        } else {
            // Midpoint rule error is O(σ⁻²) relative: negligible for σ > 1000.
            let hi = if b == i64::MAX { 1.0 } else { normal_cdf((b as f64 + 0.5) / sigma) };
            let lo = if a == i64::MIN { 0.0 } else { normal_cdf((a as f64 - 0.5) / sigma) };
            hi - lo
        }
    };
    let mut raw: Vec<(i64, i64)> = vec![(i64::MIN, edges[0] - 1)];
    for w in edges.windows(2) {
        raw.push((w[0], w[1] - 1));
    }
    raw.push((*edges.last().unwrap(), i64::MAX));
    let mut bins: Vec<(i64, i64, f64)> = vec![];
    let mut cur: Option<(i64, i64, f64)> = None;
    for (a, b) in raw {
        let p = mass(a, b);
        cur = Some(match cur {
            None => (a, b, p),
            Some((ca, _, cp)) => (ca, b, cp + p),
        });
        if let Some(c) = cur {
            if c.2 * n as f64 >= min_expected {
                bins.push(c);
                cur = None;
            }
        }
    }
    if let Some(c) = cur {
        let last = bins.last_mut().unwrap();
        last.1 = c.1;
        last.2 += c.2;
    }
    bins
}

/// Index of the bin holding `x`.
pub fn bin_of(bins: &[(i64, i64, f64)], x: i64) -> usize {
    bins.partition_point(|b| b.1 < x)
}

/// χ² statistic of `samples` against the exact bins; returns (statistic, degrees of freedom).
pub fn chi2_vs_exact(samples: &[i64], sigma: f64) -> (f64, usize) {
    let bins = dg_bins(sigma, samples.len(), 20.0);
    let mut counts = vec![0u64; bins.len()];
    for &s in samples {
        counts[bin_of(&bins, s)] += 1;
    }
    let n = samples.len() as f64;
    let stat = bins.iter().zip(&counts).map(|(b, &c)| (c as f64 - n * b.2).powi(2) / (n * b.2)).sum();
    (stat, bins.len() - 1)
}

/// Two-sample χ² statistic of equal-size samples over shared bins with enough mass.
pub fn chi2_two_sample(a: &[i64], b: &[i64], sigma: f64) -> (f64, usize) {
    assert_eq!(a.len(), b.len());
    let bins = dg_bins(sigma, a.len(), 20.0);
    let count = |s: &[i64]| {
        let mut c: BTreeMap<usize, f64> = BTreeMap::new();
        for &x in s {
            *c.entry(bin_of(&bins, x)).or_default() += 1.0;
        }
        c
    };
    let (ca, cb) = (count(a), count(b));
    let mut stat = 0.0;
    for i in 0..bins.len() {
        let (x, y) = (ca.get(&i).copied().unwrap_or(0.0), cb.get(&i).copied().unwrap_or(0.0));
        if x + y > 0.0 {
            stat += (x - y).powi(2) / (x + y);
        }
    }
    (stat, bins.len() - 1)
}
