//! Splitting one labelled CSV into per-client shards, the way federated benchmarks do.
//!
//! Three schemes, chosen with `--partition`:
//! - `iid`: rows shuffled and dealt round-robin, so shard sizes differ by at most one row;
//! - `dirichlet:ALPHA`: label skew. For each label a share vector `p ~ Dir(α·1)` over clients is
//!   drawn and that label's rows are cut in those proportions (small α: each client sees mostly
//!   one label; large α: close to IID). This is the split of Hsu et al. 2019 used across the FL
//!   literature (Flower's `DirichletPartitioner`);
//! - `by:COLUMN`: natural non-IID split; rows sharing a value of `COLUMN` (a movie, a product, a
//!   source site) stay on one client, and groups go largest-first to the currently smallest
//!   shard, which balances sizes within one group of the optimum.
//!
//! Rows of the train and test splits are partitioned separately with the same scheme (and, for
//! Dirichlet, the same label shares), so every client holds out data drawn like its own training
//! data and the clients' held-out sets together are exactly the input's test split.
//!
//! Every random choice comes from a ChaCha generator seeded by `--seed`: the same seed gives the
//! same shards on every machine and every `rand` version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Errors from reading, partitioning or writing the data.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// `--partition` could not be parsed.
    #[error("unknown partition scheme `{0}`: expected iid, dirichlet:ALPHA (ALPHA > 0) or by:COLUMN")]
    Scheme(String),
    /// A column the scheme needs is absent from the header.
    #[error("{path}: no column `{column}` (columns: {available})")]
    MissingColumn {
        /// File read.
        path: String,
        /// Column wanted.
        column: String,
        /// Columns present, comma-separated.
        available: String,
    },
    /// The data cannot give every client something to train on.
    #[error("cannot split {rows} training rows into {clients} non-empty shards: {why}")]
    TooFewRows {
        /// Training rows available.
        rows: usize,
        /// Clients asked for.
        clients: usize,
        /// Which constraint failed.
        why: String,
    },
    /// CSV syntax or I/O error.
    #[error("{path}: {source}")]
    Csv {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: csv::Error,
    },
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// How rows are assigned to clients.
#[derive(Debug, Clone, PartialEq)]
pub enum Scheme {
    /// Uniformly at random, equal sizes.
    Iid,
    /// Label skew with concentration `alpha` (> 0).
    Dirichlet {
        /// Concentration: small is skewed, large is close to IID.
        alpha: f64,
    },
    /// Whole groups of equal values of a column.
    ByColumn(String),
}

impl FromStr for Scheme {
    type Err = PartitionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PartitionError::Scheme(s.to_string());
        match s.split_once(':') {
            None if s == "iid" => Ok(Scheme::Iid),
            Some(("dirichlet", alpha)) => match alpha.parse::<f64>() {
                Ok(alpha) if alpha.is_finite() && alpha > 0.0 => Ok(Scheme::Dirichlet { alpha }),
                _ => Err(bad()),
            },
            Some(("by", column)) if !column.is_empty() => Ok(Scheme::ByColumn(column.to_string())),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scheme::Iid => f.write_str("iid"),
            Scheme::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
            Scheme::ByColumn(c) => write!(f, "by:{c}"),
        }
    }
}

/// A CSV file held in memory: header plus rows, kept as raw strings so shards are written back
/// byte-for-byte in the same columns.
#[derive(Debug, Clone)]
pub struct Table {
    /// Where it came from (for messages).
    pub path: String,
    /// Column names.
    pub headers: csv::StringRecord,
    /// Data rows.
    pub rows: Vec<csv::StringRecord>,
}

impl Table {
    /// Reads a CSV with a header row.
    pub fn read(path: &Path) -> Result<Self, PartitionError> {
        let p = path.display().to_string();
        let csv_err = |source| PartitionError::Csv { path: p.clone(), source };
        let mut reader = csv::Reader::from_path(path).map_err(csv_err)?;
        let headers = reader.headers().map_err(csv_err)?.clone();
        let rows = reader.records().collect::<Result<Vec<_>, _>>().map_err(csv_err)?;
        Ok(Self { path: p, headers, rows })
    }

    /// Index of `column`, or an error naming the columns there are.
    pub fn column(&self, column: &str) -> Result<usize, PartitionError> {
        self.headers.iter().position(|h| h == column).ok_or_else(|| PartitionError::MissingColumn {
            path: self.path.clone(),
            column: column.to_string(),
            available: self.headers.iter().collect::<Vec<_>>().join(","),
        })
    }

    /// Keeps a seeded random sample of at most `max_rows` rows (all of them if fewer), in their
    /// original order, so a CPU demo can train on a few thousand rows of a larger set.
    pub fn sample(&mut self, max_rows: usize, seed: u64) {
        if self.rows.len() <= max_rows {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x005a_3f1e);
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.shuffle(&mut rng);
        let mut keep = vec![false; self.rows.len()];
        for i in order.into_iter().take(max_rows) {
            keep[i] = true;
        }
        let rows = std::mem::take(&mut self.rows);
        self.rows = rows.into_iter().zip(keep).filter_map(|(r, k)| k.then_some(r)).collect();
    }
}

/// Options of one partitioning.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionSpec {
    /// The scheme.
    pub scheme: Scheme,
    /// Number of shards.
    pub clients: usize,
    /// Label column (Dirichlet uses it).
    pub label_column: String,
    /// Column marking `train`/`test` rows; if the file has no such column every row is treated
    /// as training data and the trainer makes its own held-out split.
    pub split_column: String,
    /// Seed of every random choice.
    pub seed: u64,
}

/// Row indices (into [`Table::rows`]) of each client's shard, in input order.
pub type Shards = Vec<Vec<usize>>;

/// Assigns every row to exactly one client.
pub fn partition(table: &Table, spec: &PartitionSpec) -> Result<Shards, PartitionError> {
    let n = spec.clients;
    if n == 0 {
        return Err(PartitionError::TooFewRows {
            rows: table.rows.len(),
            clients: 0,
            why: "no clients".into(),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    // Group row indices by split value; BTreeMap so iteration (and thus the RNG stream) is
    // deterministic.
    let split_col = table.column(&spec.split_column).ok();
    let mut by_split: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
    for (i, row) in table.rows.iter().enumerate() {
        by_split.entry(split_of(split_col, row)).or_default().push(i);
    }
    let train_rows = by_split.get("train").map_or(0, Vec::len);
    if train_rows < n {
        return Err(PartitionError::TooFewRows {
            rows: train_rows,
            clients: n,
            why: "every client needs at least one training row".into(),
        });
    }

    let mut shards: Shards = vec![Vec::new(); n];
    match &spec.scheme {
        Scheme::Iid => {
            for rows in by_split.values() {
                let mut rows = rows.clone();
                rows.shuffle(&mut rng);
                // Start each split's deal at the client with the fewest rows so far, so that
                // the ±1 imbalances of the splits do not pile up on client 0.
                let start = (0..n).min_by_key(|&c| (shards[c].len(), c)).unwrap_or(0);
                for (k, row) in rows.into_iter().enumerate() {
                    shards[(start + k) % n].push(row);
                }
            }
        }
        Scheme::Dirichlet { alpha } => {
            let label_col = table.column(&spec.label_column)?;
            shards = dirichlet(table, &by_split, label_col, *alpha, n, &mut rng)?;
        }
        Scheme::ByColumn(column) => {
            let col = table.column(column)?;
            shards = by_column(table, col, n)?;
            if let Some(empty) = shards.iter().position(|s| !has_train_row(table, split_col, s)) {
                return Err(PartitionError::TooFewRows {
                    rows: train_rows,
                    clients: n,
                    why: format!("client {empty} received groups of `{column}` without training rows"),
                });
            }
        }
    }
    for shard in &mut shards {
        shard.sort_unstable();
    }
    Ok(shards)
}

/// `"test"` for rows the client holds out, `"train"` for the rest, with the client's reading of
/// the split column (`fedtune_client::data`): test, eval, evaluation, validation, valid and dev
/// (any case) are held out, anything else trains.
fn split_of(split_col: Option<usize>, row: &csv::StringRecord) -> &'static str {
    let value = split_col.and_then(|c| row.get(c)).unwrap_or("").trim().to_ascii_lowercase();
    match value.as_str() {
        "test" | "eval" | "evaluation" | "validation" | "valid" | "dev" => "test",
        _ => "train",
    }
}

fn has_train_row(table: &Table, split_col: Option<usize>, shard: &[usize]) -> bool {
    shard.iter().any(|&i| split_of(split_col, &table.rows[i]) == "train")
}

/// Label-skewed shards; redraws (up to a bound) until every client has a training row.
fn dirichlet(
    table: &Table,
    by_split: &BTreeMap<&str, Vec<usize>>,
    label_col: usize,
    alpha: f64,
    n: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Shards, PartitionError> {
    // Labels in a fixed order so that share vectors are drawn reproducibly.
    let mut labels: Vec<&str> = table.rows.iter().filter_map(|r| r.get(label_col)).collect();
    labels.sort_unstable();
    labels.dedup();
    const ATTEMPTS: usize = 1000;
    for _ in 0..ATTEMPTS {
        let shares: BTreeMap<&str, Vec<f64>> =
            labels.iter().map(|&l| (l, (0..n).map(|_| gamma(alpha, rng)).collect::<Vec<_>>())).collect();
        let mut shards: Shards = vec![Vec::new(); n];
        let mut train_sizes = vec![0usize; n];
        for (&split, rows) in by_split {
            for &label in &labels {
                let mut of_label: Vec<usize> =
                    rows.iter().copied().filter(|&i| table.rows[i].get(label_col) == Some(label)).collect();
                of_label.shuffle(rng);
                for (client, part) in cut(&of_label, &shares[label]).into_iter().enumerate() {
                    if split == "train" {
                        train_sizes[client] += part.len();
                    }
                    shards[client].extend_from_slice(part);
                }
            }
        }
        if train_sizes.iter().all(|&s| s > 0) {
            return Ok(shards);
        }
    }
    Err(PartitionError::TooFewRows {
        rows: by_split.get("train").map_or(0, Vec::len),
        clients: n,
        why: format!(
            "{ATTEMPTS} Dirichlet(α={alpha}) draws all left a client empty; raise α or use fewer clients"
        ),
    })
}

/// Cuts `rows` into consecutive pieces proportional to `weights` (which need not sum to 1),
/// using cumulative rounding so the pieces cover every row exactly once.
fn cut<'a>(rows: &'a [usize], weights: &[f64]) -> Vec<&'a [usize]> {
    let total: f64 = weights.iter().sum();
    let mut out = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    let mut start = 0;
    for (k, w) in weights.iter().enumerate() {
        acc += w;
        let end = if k + 1 == weights.len() {
            rows.len()
        } else {
            ((acc / total) * rows.len() as f64).round().clamp(start as f64, rows.len() as f64) as usize
        };
        out.push(&rows[start..end]);
        start = end;
    }
    out
}

/// One Gamma(shape, 1) draw (Marsaglia & Tsang 2000). Normalising `n` such draws gives a
/// Dirichlet sample; for shape < 1 the usual boost `G(a) = G(a+1)·U^(1/a)` applies.
fn gamma(shape: f64, rng: &mut ChaCha8Rng) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        return gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Box–Muller: one standard normal draw.
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Whole groups, largest first, each to the currently smallest shard.
fn by_column(table: &Table, col: usize, n: usize) -> Result<Shards, PartitionError> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, row) in table.rows.iter().enumerate() {
        groups.entry(row.get(col).unwrap_or("")).or_default().push(i);
    }
    if groups.len() < n {
        return Err(PartitionError::TooFewRows {
            rows: table.rows.len(),
            clients: n,
            why: format!("column `{}` has only {} distinct values", &table.headers[col], groups.len()),
        });
    }
    let mut groups: Vec<(&str, Vec<usize>)> = groups.into_iter().collect();
    // Largest first; ties by value so the result does not depend on hash or input order.
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    let mut shards: Shards = vec![Vec::new(); n];
    for (_, rows) in groups {
        let smallest = (0..n).min_by_key(|&c| (shards[c].len(), c)).unwrap_or(0);
        shards[smallest].extend(rows);
    }
    Ok(shards)
}

/// Writes each shard as `DIR/client-<k>.csv` (same header as the input) and returns the paths.
pub fn write_shards(table: &Table, shards: &Shards, dir: &Path) -> Result<Vec<PathBuf>, PartitionError> {
    std::fs::create_dir_all(dir)
        .map_err(|source| PartitionError::Io { path: dir.display().to_string(), source })?;
    let mut paths = Vec::with_capacity(shards.len());
    for (k, shard) in shards.iter().enumerate() {
        let path = dir.join(format!("client-{k}.csv"));
        let p = path.display().to_string();
        let csv_err = |source| PartitionError::Csv { path: p.clone(), source };
        let mut w = csv::Writer::from_path(&path).map_err(csv_err)?;
        w.write_record(&table.headers).map_err(csv_err)?;
        for &i in shard {
            w.write_record(&table.rows[i]).map_err(csv_err)?;
        }
        w.flush().map_err(|source| PartitionError::Io { path: p.clone(), source })?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rows` rows: label alternates 0/1 (or follows `label`), group `g<i % groups>`, 80/20 split.
    fn table(rows: usize, groups: usize) -> Table {
        let headers = csv::StringRecord::from(vec!["text", "label", "movie", "split"]);
        let rows = (0..rows)
            .map(|i| {
                let split = if i % 5 == 4 { "test" } else { "train" };
                csv::StringRecord::from(vec![
                    format!("row {i}"),
                    (i % 2).to_string(),
                    format!("g{}", i % groups),
                    split.to_string(),
                ])
            })
            .collect();
        Table { path: "mem.csv".into(), headers, rows }
    }

    fn spec(scheme: Scheme, clients: usize, seed: u64) -> PartitionSpec {
        PartitionSpec { scheme, clients, label_column: "label".into(), split_column: "split".into(), seed }
    }

    fn assert_exact_cover(shards: &Shards, rows: usize) {
        let mut all: Vec<usize> = shards.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..rows).collect::<Vec<_>>(), "every row exactly once");
    }

    #[test]
    fn schemes_parse_from_their_command_line_spelling() {
        assert_eq!("iid".parse::<Scheme>().unwrap(), Scheme::Iid);
        assert_eq!("dirichlet:0.3".parse::<Scheme>().unwrap(), Scheme::Dirichlet { alpha: 0.3 });
        assert_eq!("by:movie".parse::<Scheme>().unwrap(), Scheme::ByColumn("movie".into()));
        for bad in ["", "iid:2", "dirichlet:0", "dirichlet:-1", "dirichlet:x", "by:", "random"] {
            assert!(bad.parse::<Scheme>().is_err(), "{bad} should be refused");
        }
        assert_eq!(Scheme::Dirichlet { alpha: 0.5 }.to_string(), "dirichlet:0.5");
    }

    #[test]
    fn iid_shards_cover_every_row_once_and_differ_in_size_by_at_most_one() {
        let t = table(103, 7);
        let shards = partition(&t, &spec(Scheme::Iid, 4, 1)).unwrap();
        assert_exact_cover(&shards, 103);
        let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        // Each client gets its share of held-out rows too.
        for s in &shards {
            assert!(s.iter().any(|&i| t.rows[i].get(3) == Some("test")));
        }
    }

    #[test]
    fn dirichlet_is_reproducible_from_its_seed() {
        let t = table(400, 7);
        let s = spec(Scheme::Dirichlet { alpha: 0.5 }, 3, 42);
        let a = partition(&t, &s).unwrap();
        assert_eq!(a, partition(&t, &s).unwrap());
        assert_ne!(a, partition(&t, &PartitionSpec { seed: 43, ..s }).unwrap());
        assert_exact_cover(&a, 400);
    }

    #[test]
    fn a_small_dirichlet_alpha_skews_labels_more_than_a_large_one() {
        let t = table(2000, 7);
        // Mean over clients of |share of label 1 − 0.5|: 0 for perfectly balanced shards.
        let skew = |alpha: f64| {
            let shards = partition(&t, &spec(Scheme::Dirichlet { alpha }, 4, 7)).unwrap();
            shards
                .iter()
                .map(|s| {
                    let ones = s.iter().filter(|&&i| t.rows[i].get(1) == Some("1")).count();
                    (ones as f64 / s.len() as f64 - 0.5).abs()
                })
                .sum::<f64>()
                / 4.0
        };
        let (skewed, balanced) = (skew(0.1), skew(100.0));
        assert!(skewed > 0.25 && balanced < 0.1, "α=0.1 → {skewed}, α=100 → {balanced}");
    }

    #[test]
    fn by_column_keeps_every_group_on_one_client_and_balances_sizes() {
        let t = table(300, 10);
        let shards = partition(&t, &spec(Scheme::ByColumn("movie".into()), 3, 0)).unwrap();
        assert_exact_cover(&shards, 300);
        let owner = |g: &str| {
            shards
                .iter()
                .enumerate()
                .filter(|(_, s)| s.iter().any(|&i| t.rows[i].get(2) == Some(g)))
                .map(|(c, _)| c)
                .collect::<Vec<_>>()
        };
        for g in 0..10 {
            assert_eq!(owner(&format!("g{g}")).len(), 1, "group g{g} split across clients");
        }
        // 10 groups of 30 over 3 clients: 4/3/3 groups is the best possible.
        let mut sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![90, 90, 120]);
    }

    #[test]
    fn by_column_with_fewer_groups_than_clients_is_refused() {
        let t = table(50, 2);
        let err = partition(&t, &spec(Scheme::ByColumn("movie".into()), 3, 0)).unwrap_err();
        assert!(err.to_string().contains("only 2 distinct values"), "{err}");
    }

    #[test]
    fn a_missing_column_is_named_in_the_error() {
        let t = table(50, 2);
        let err = partition(&t, &spec(Scheme::ByColumn("product".into()), 2, 0)).unwrap_err();
        assert!(err.to_string().contains("`product`") && err.to_string().contains("movie"), "{err}");
    }

    #[test]
    fn sampling_keeps_the_requested_number_of_rows_in_input_order() {
        let mut t = table(1000, 3);
        t.sample(250, 9);
        assert_eq!(t.rows.len(), 250);
        let ids: Vec<usize> = t.rows.iter().map(|r| r[0][4..].parse().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn shards_are_written_as_csv_files_with_the_input_header() {
        let t = table(20, 2);
        let shards = partition(&t, &spec(Scheme::Iid, 2, 0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(&t, &shards, dir.path()).unwrap();
        let back = Table::read(&paths[1]).unwrap();
        assert_eq!(back.headers, t.headers);
        assert_eq!(back.rows.len(), shards[1].len());
        assert_eq!(back.rows[0], t.rows[shards[1][0]]);
    }
}
