//! What a simulation reports: a per-round table on stdout, and `metrics.csv`, `metrics.json`
//! and `metrics.svg` (loss, accuracy and privacy ε per round) in the output folder. Under
//! secure aggregation every output also carries each round's threshold t, graph degree k,
//! roster size n and survivors.

use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// Errors writing the report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// CSV encoding error.
    #[error("{path}: {source}")]
    Csv {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: csv::Error,
    },
    /// JSON encoding error.
    #[error("{path}: {source}")]
    Json {
        /// File involved.
        path: String,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The chart could not be drawn.
    #[error("{path}: drawing the chart failed: {reason}")]
    Chart {
        /// File involved.
        path: String,
        /// What plotters reported.
        reason: String,
    },
}

/// One completed round, as the simulation reports it. Metrics a round did not produce (no
/// evaluation that round) are `None`, written as an empty CSV cell and a JSON `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    /// Round number (1-based, as the coordinator numbers completed rounds).
    pub round: u64,
    /// Clients whose updates were aggregated.
    pub participants: u32,
    /// Example-weighted mean training loss of the participants.
    pub train_loss: Option<f64>,
    /// Example-weighted mean held-out loss of the published model.
    pub eval_loss: Option<f64>,
    /// Example-weighted held-out accuracy of the published model.
    pub eval_accuracy: Option<f64>,
    /// Bytes of model and update payload moved over the network in the round.
    pub bytes: u64,
    /// Wall-clock seconds the round took.
    pub seconds: f64,
    /// Cumulative differential-privacy ε of the published models after the round (central ε;
    /// `None` without DP).
    pub epsilon: Option<f64>,
    /// Under local noise: the worst-off client's local ε against the coordinator after the
    /// round (no amplification; `None` in other modes).
    pub local_epsilon: Option<f64>,
    /// The evaluation figures (`eval_loss`, `eval_accuracy`) were computed under DP and are
    /// outside the privacy guarantee (`evaluation.enabled_under_dp = true`).
    pub eval_outside_privacy_guarantee: bool,
    /// The run's privacy model, e.g. `central DP, δ = 1e-5`, or `no privacy guarantee`.
    pub privacy: String,
    /// Under secure aggregation (SecAgg+): n, the clients in the round's roster (`None` for a
    /// plain round, as are the other `secagg_` fields).
    pub secagg_clients: Option<u32>,
    /// t: how many of a secret's holders had to answer; fewer survivors fail the attempt.
    pub secagg_threshold: Option<u32>,
    /// k: each client's number of neighbours in the masking graph (n − 1: complete).
    pub secagg_degree: Option<u32>,
    /// The survivors: clients whose masked input is in the unmasked sum (the participants).
    pub secagg_survivors: Option<u32>,
}

/// Which optional columns the per-round table shows (fixed for a run, known from its first
/// status).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableColumns {
    /// Local noise: a `local_eps` column beside the central `epsilon`.
    pub local_epsilon: bool,
    /// Evaluation under DP: the evaluation columns are marked `*`, outside the guarantee.
    pub eval_outside_guarantee: bool,
    /// Secure aggregation: `t/k` and `survivors/n` columns.
    pub secure: bool,
}

impl TableColumns {
    /// The columns of a run whose privacy status is `p`, with secure aggregation or not.
    pub fn of(p: &fedtune_shared::round::PrivacyStatus, secure: bool) -> Self {
        Self {
            local_epsilon: p.local_epsilon.is_some(),
            eval_outside_guarantee: p.evaluation_outside_guarantee,
            secure,
        }
    }
}

/// `3` when every value is 3, `3–4` when they range; `-` for none.
fn span(values: impl Iterator<Item = u32>) -> String {
    let (min, max) = values.fold((u32::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
    match (min, max) {
        (u32::MAX, _) => "-".to_string(),
        (lo, hi) if lo == hi => lo.to_string(),
        (lo, hi) => format!("{lo}–{hi}"),
    }
}

/// A secure run's figures over its rounds, e.g. `t = 3 of n = 5, k = 4 neighbours, survivors
/// 4–5` (each a range where rounds differed); `None` when no row ran under secure aggregation.
pub fn secure_figures(rows: &[RoundRow]) -> Option<String> {
    let secure: Vec<&RoundRow> = rows.iter().filter(|r| r.secagg_clients.is_some()).collect();
    if secure.is_empty() {
        return None;
    }
    let of = |f: fn(&RoundRow) -> Option<u32>| span(secure.iter().filter_map(|r| f(r)));
    Some(format!(
        "t = {} of n = {}, k = {} neighbours, survivors {}",
        of(|r| r.secagg_threshold),
        of(|r| r.secagg_clients),
        of(|r| r.secagg_degree),
        of(|r| r.secagg_survivors)
    ))
}

/// The footer line of a secure run: what secure aggregation ran with, and the privacy mode
/// (`none`, `central`, `local` or `distributed`) beside it.
pub fn secure_line(rows: &[RoundRow], mode: &str) -> String {
    let figures = secure_figures(rows).unwrap_or_else(|| "no round completed".to_string());
    let privacy = if mode == "none" { "no DP".to_string() } else { format!("{mode} DP") };
    format!("secure aggregation (SecAgg+): {figures}; privacy: {privacy}")
}

/// The legend and footnote text of evaluation figures outside the privacy guarantee.
fn outside_label() -> String {
    format!("(* {})", fedtune_shared::round::PrivacyStatus::EVALUATION_OUTSIDE)
}

/// Paths of the files [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// `metrics.csv`.
    pub csv: PathBuf,
    /// `metrics.json`.
    pub json: PathBuf,
    /// `metrics.svg`.
    pub svg: PathBuf,
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// Human-readable size: 1.5 MB, 312 kB.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The header of the per-round table [`table_line`] continues.
pub fn table_header(columns: TableColumns) -> String {
    let mark = if columns.eval_outside_guarantee { "*" } else { "" };
    let mut header = format!(
        "{:>5}  {:>12}  {:>10}  {:>10}  {:>9}  {:>10}  {:>8}  {:>9}",
        "round",
        "participants",
        "train_loss",
        format!("eval_loss{mark}"),
        format!("accuracy{mark}"),
        "bytes",
        "seconds",
        "epsilon"
    );
    if columns.local_epsilon {
        header.push_str(&format!("  {:>9}", "local_eps"));
    }
    if columns.secure {
        header.push_str(&format!("  {:>7}  {:>11}", "t/k", "survivors/n"));
    }
    if columns.eval_outside_guarantee {
        header.push_str(&format!("  {}", outside_label()));
    }
    header
}

/// The line above and below the table that states the privacy model of the run.
pub fn privacy_line(privacy: &str) -> String {
    format!("privacy: {privacy}")
}

/// One row of the per-round table, aligned under [`table_header`].
pub fn table_line(r: &RoundRow, columns: TableColumns) -> String {
    let mut line = format!(
        "{:>5}  {:>12}  {:>10}  {:>10}  {:>9}  {:>10}  {:>8.1}  {:>9}",
        r.round,
        r.participants,
        cell(r.train_loss, 4),
        cell(r.eval_loss, 4),
        cell(r.eval_accuracy.map(|a| a * 100.0), 1),
        human_bytes(r.bytes),
        r.seconds,
        cell(r.epsilon, 3)
    );
    if columns.local_epsilon {
        line.push_str(&format!("  {:>9}", cell(r.local_epsilon, 3)));
    }
    if columns.secure {
        let pair = |a: Option<u32>, b: Option<u32>| match (a, b) {
            (Some(a), Some(b)) => format!("{a}/{b}"),
            _ => "-".to_string(),
        };
        line.push_str(&format!(
            "  {:>7}  {:>11}",
            pair(r.secagg_threshold, r.secagg_degree),
            pair(r.secagg_survivors, r.secagg_clients)
        ));
    }
    line
}

/// Writes `metrics.csv`, `metrics.json` and `metrics.svg` into `dir` (created if needed).
pub fn write_report(rows: &[RoundRow], dir: &Path) -> Result<ReportFiles, ReportError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let files = ReportFiles {
        csv: dir.join("metrics.csv"),
        json: dir.join("metrics.json"),
        svg: dir.join("metrics.svg"),
    };

    let csv_err = |source| ReportError::Csv { path: files.csv.display().to_string(), source };
    let mut w = csv::Writer::from_path(&files.csv).map_err(csv_err)?;
    for row in rows {
        w.serialize(row).map_err(csv_err)?;
    }
    w.flush().map_err(io(&files.csv))?;

    let json = serde_json::to_vec_pretty(rows)
        .map_err(|source| ReportError::Json { path: files.json.display().to_string(), source })?;
    let mut f = std::fs::File::create(&files.json).map_err(io(&files.json))?;
    f.write_all(&json).and_then(|()| f.write_all(b"\n")).map_err(io(&files.json))?;

    draw_chart(rows, &files.svg)
        .map_err(|reason| ReportError::Chart { path: files.svg.display().to_string(), reason })?;
    Ok(files)
}

/// Two panels side by side: losses (train, eval) and eval accuracy, against the round.
/// One series: a line with a dot per round, and its legend entry.
fn draw_line<DB: DrawingBackend, X: Ranged<ValueType = u64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    points: &[(u64, f64)],
    colour: RGBColor,
    label: impl Into<String>,
) -> Result<(), String> {
    chart
        .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
        .map_err(|e| e.to_string())?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn draw_chart(rows: &[RoundRow], path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, (1500, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, rest) = root.split_horizontally(500);
    let (right, privacy) = rest.split_horizontally(500);
    let last_round = rows.iter().map(|r| r.round).max().unwrap_or(1).max(1);
    let rounds = 0u64..last_round + 1;

    let series = |f: fn(&RoundRow) -> Option<f64>| -> Vec<(u64, f64)> {
        rows.iter().filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.round, v))).collect()
    };
    let train = series(|r| r.train_loss);
    let eval = series(|r| r.eval_loss);
    let accuracy = series(|r| r.eval_accuracy);

    let max_loss = train.iter().chain(&eval).map(|p| p.1).fold(0.0f64, f64::max).max(1e-6) * 1.1;
    let mut chart = ChartBuilder::on(&left)
        .caption("loss", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(rounds.clone(), 0.0..max_loss)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("round").draw().map_err(|e| e.to_string())?;
    let outside = rows.iter().any(|r| r.eval_outside_privacy_guarantee);
    let eval_label = if outside { format!("eval {}", outside_label()) } else { "eval".to_string() };
    for (points, colour, label) in [(&train, BLUE, "train".to_string()), (&eval, RED, eval_label)] {
        draw_line(&mut chart, points, colour, label)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;

    let accuracy_caption =
        if outside { format!("eval accuracy {}", outside_label()) } else { "eval accuracy".to_string() };
    let mut chart = ChartBuilder::on(&right)
        .caption(accuracy_caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(rounds, 0.0..1.0f64)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("round").draw().map_err(|e| e.to_string())?;
    let green = RGBColor(0, 140, 60);
    chart
        .draw_series(LineSeries::new(accuracy.iter().copied(), green.stroke_width(2)))
        .map_err(|e| e.to_string())?
        .label(if outside { format!("accuracy {}", outside_label()) } else { "accuracy".to_string() })
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], green.stroke_width(2)));
    chart
        .draw_series(accuracy.iter().map(|&p| Circle::new(p, 3, green.filled())))
        .map_err(|e| e.to_string())?;
    if outside {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }

    // Privacy spent: cumulative central ε per round and, under local noise, the worst-off
    // client's local ε beside it; or the statement that there is no guarantee.
    let epsilon = series(|r| r.epsilon);
    let local = series(|r| r.local_epsilon);
    let label = rows.first().map(|r| r.privacy.clone()).unwrap_or_default();
    let max_eps = epsilon.iter().chain(&local).map(|p| p.1).fold(0.0f64, f64::max).max(1e-6) * 1.1;
    let mut chart = ChartBuilder::on(&privacy)
        .caption(
            if epsilon.is_empty() { format!("ε: {label}") } else { "privacy ε (cumulative)".into() },
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(0u64..last_round + 1, 0.0..max_eps)
        .map_err(|e| e.to_string())?;
    // A secure run names what the sum was protected with under the rounds it covers.
    let x_desc =
        secure_figures(rows).map_or_else(|| "round".to_string(), |f| format!("round  (SecAgg+ {f})"));
    chart.configure_mesh().x_desc(x_desc).draw().map_err(|e| e.to_string())?;
    let purple = RGBColor(120, 40, 160);
    let orange = RGBColor(220, 110, 0);
    for (points, colour, name) in
        [(&epsilon, purple, "central ε (published models)"), (&local, orange, "local ε (worst-off client)")]
    {
        if !points.is_empty() {
            draw_line(&mut chart, points, colour, name)?;
        }
    }
    if !local.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<RoundRow> {
        vec![
            RoundRow {
                round: 1,
                participants: 3,
                train_loss: Some(0.69),
                eval_loss: Some(0.61),
                eval_accuracy: Some(0.7),
                bytes: 2_500_000,
                seconds: 40.5,
                epsilon: Some(0.5),
                local_epsilon: None,
                eval_outside_privacy_guarantee: false,
                privacy: "central DP, δ = 1e-5".into(),
                secagg_clients: None,
                secagg_threshold: None,
                secagg_degree: None,
                secagg_survivors: None,
            },
            RoundRow {
                round: 2,
                participants: 2,
                train_loss: Some(0.52),
                eval_loss: None,
                eval_accuracy: None,
                bytes: 1_700_000,
                seconds: 38.0,
                epsilon: Some(0.75),
                local_epsilon: None,
                eval_outside_privacy_guarantee: false,
                privacy: "central DP, δ = 1e-5".into(),
                secagg_clients: None,
                secagg_threshold: None,
                secagg_degree: None,
                secagg_survivors: None,
            },
        ]
    }

    #[test]
    fn the_report_writes_csv_json_and_an_svg_chart() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_report(&rows(), &dir.path().join("out")).unwrap();

        let csv = std::fs::read_to_string(&files.csv).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some(
                "round,participants,train_loss,eval_loss,eval_accuracy,bytes,seconds,epsilon,local_epsilon,\
                 eval_outside_privacy_guarantee,privacy,secagg_clients,secagg_threshold,secagg_degree,\
                 secagg_survivors"
            )
        );
        assert_eq!(
            lines.next(),
            Some("1,3,0.69,0.61,0.7,2500000,40.5,0.5,,false,\"central DP, δ = 1e-5\",,,,")
        );
        assert_eq!(lines.next(), Some("2,2,0.52,,,1700000,38.0,0.75,,false,\"central DP, δ = 1e-5\",,,,"));

        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
        assert_eq!(json[0]["round"], 1);
        assert_eq!(json[0]["eval_accuracy"], 0.7);
        assert_eq!(json[1]["epsilon"], 0.75);
        assert!(json[1]["eval_loss"].is_null());
        let back: Vec<RoundRow> = serde_json::from_value(json).unwrap();
        assert_eq!(back, rows());

        let svg = std::fs::read_to_string(&files.svg).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("eval accuracy") && svg.contains("<polyline"));
    }

    #[test]
    fn an_empty_run_still_writes_a_valid_report() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_report(&[], dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&files.json).unwrap().trim(), "[]");
        assert!(std::fs::read_to_string(&files.svg).unwrap().contains("</svg>"));
    }

    #[test]
    fn table_lines_align_with_the_header_and_show_missing_metrics_as_dashes() {
        let r = rows();
        let columns = TableColumns::default();
        let header = table_header(columns);
        let line = table_line(&r[1], columns);
        assert_eq!(header.len(), line.len(), "{header}\n{line}");
        assert!(line.contains("1.7 MB") && line.contains('-'), "{line}");
        assert!(table_line(&r[0], columns).contains("70.0"));
        assert!(!header.contains("local_eps") && !header.contains('*'), "{header}");
    }

    /// A local-noise run whose evaluation ran under DP.
    fn local_rows() -> Vec<RoundRow> {
        rows()
            .into_iter()
            .enumerate()
            .map(|(i, r)| RoundRow {
                local_epsilon: Some(4.0 + i as f64),
                eval_outside_privacy_guarantee: true,
                privacy: "local DP, δ = 1e-5".into(),
                ..r
            })
            .collect()
    }

    #[test]
    fn under_local_noise_the_table_csv_json_and_chart_carry_the_local_epsilon_beside_the_central_one() {
        let columns = TableColumns { local_epsilon: true, eval_outside_guarantee: false, secure: false };
        let header = table_header(columns);
        let line = table_line(&local_rows()[1], columns);
        assert!(header.ends_with("epsilon  local_eps"), "{header}");
        assert!(line.ends_with("    0.750      5.000"), "{line}");
        assert_eq!(header.len(), line.len(), "{header}\n{line}");

        let dir = tempfile::tempdir().unwrap();
        let files = write_report(&local_rows(), dir.path()).unwrap();
        let csv = std::fs::read_to_string(&files.csv).unwrap();
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let headers = reader.headers().unwrap().clone();
        let local = headers.iter().position(|h| h == "local_epsilon").unwrap();
        let central = headers.iter().position(|h| h == "epsilon").unwrap();
        let second = reader.records().nth(1).unwrap().unwrap();
        assert_eq!((&second[central], &second[local]), ("0.75", "5.0"));
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
        assert_eq!((json[1]["epsilon"].as_f64(), json[1]["local_epsilon"].as_f64()), (Some(0.75), Some(5.0)));
        let svg = std::fs::read_to_string(&files.svg).unwrap();
        assert!(svg.contains("central ε (published models)") && svg.contains("local ε (worst-off client)"));
        // The local series is drawn (its colour), not only named in the legend.
        assert!(svg.to_ascii_uppercase().matches("#DC6E00").count() > 2, "local ε series");
    }

    #[test]
    fn evaluation_under_dp_is_labelled_outside_the_guarantee_in_the_table_csv_json_and_chart_legend() {
        let columns = TableColumns { local_epsilon: true, eval_outside_guarantee: true, secure: false };
        let header = table_header(columns);
        assert!(header.contains("eval_loss*") && header.contains("accuracy*"), "{header}");
        assert!(header.ends_with("(* outside the privacy guarantee)"), "{header}");
        // The marked columns stay aligned; the footnote follows the last column.
        let line = table_line(&local_rows()[0], columns);
        assert_eq!(
            line.len() + "  (* outside the privacy guarantee)".len(),
            header.len(),
            "{header}\n{line}"
        );

        let dir = tempfile::tempdir().unwrap();
        let files = write_report(&local_rows(), dir.path()).unwrap();
        let csv = std::fs::read_to_string(&files.csv).unwrap();
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let flag =
            reader.headers().unwrap().iter().position(|h| h == "eval_outside_privacy_guarantee").unwrap();
        assert!(reader.records().all(|r| &r.unwrap()[flag] == "true"));
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
        assert_eq!(json[0]["eval_outside_privacy_guarantee"], true);
        let svg = std::fs::read_to_string(&files.svg).unwrap();
        assert!(svg.contains("eval (* outside the privacy guarantee)"), "legend of the loss panel");
        assert!(svg.contains("eval accuracy (* outside the privacy guarantee)"), "accuracy caption");
        // Without the flag nothing is labelled.
        let files = write_report(&rows(), &dir.path().join("plain")).unwrap();
        assert!(!std::fs::read_to_string(&files.svg).unwrap().contains("outside the privacy guarantee"));
    }

    /// A secure run under distributed noise: round 2 lost a client after masking.
    fn secure_rows() -> Vec<RoundRow> {
        rows()
            .into_iter()
            .map(|r| RoundRow {
                secagg_clients: Some(3),
                secagg_threshold: Some(2),
                secagg_degree: Some(2),
                secagg_survivors: Some(r.participants),
                privacy: "distributed DP, δ = 1e-5".into(),
                ..r
            })
            .collect()
    }

    #[test]
    fn a_secure_runs_table_shows_t_k_and_survivors_of_n_per_round_and_a_plain_runs_does_not() {
        let columns = TableColumns { secure: true, ..TableColumns::default() };
        let header = table_header(columns);
        assert!(header.ends_with("epsilon      t/k  survivors/n"), "{header}");
        let lines: Vec<String> = secure_rows().iter().map(|r| table_line(r, columns)).collect();
        assert!(lines[0].ends_with("    0.500      2/2          3/3"), "{}", lines[0]);
        assert!(lines[1].ends_with("    0.750      2/2          2/3"), "{}", lines[1]);
        assert!(lines.iter().all(|l| l.len() == header.len()), "{header}\n{lines:?}");

        let plain = table_header(TableColumns::default());
        assert!(!plain.contains("t/k") && !plain.contains("survivors"), "{plain}");
        assert!(!table_line(&rows()[0], TableColumns::default()).contains('/'));

        assert_eq!(
            secure_line(&secure_rows(), "distributed"),
            "secure aggregation (SecAgg+): t = 2 of n = 3, k = 2 neighbours, survivors 2–3; privacy: distributed DP"
        );
        assert_eq!(secure_figures(&rows()), None);
    }

    #[test]
    fn a_secure_runs_csv_json_and_chart_carry_its_figures_and_a_plain_runs_leave_them_empty() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_report(&secure_rows(), dir.path()).unwrap();
        let csv = std::fs::read_to_string(&files.csv).unwrap();
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let headers = reader.headers().unwrap().clone();
        let at = |name: &str| headers.iter().position(|h| h == name).unwrap();
        let second = reader.records().nth(1).unwrap().unwrap();
        let figures = |r: &csv::StringRecord| {
            [at("secagg_threshold"), at("secagg_degree"), at("secagg_survivors"), at("secagg_clients")]
                .map(|i| r[i].to_string())
        };
        assert_eq!(figures(&second), ["2", "2", "2", "3"]);
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
        assert_eq!(json[1]["secagg_threshold"], 2);
        assert_eq!(json[1]["secagg_survivors"], 2);
        assert_eq!(json[1]["epsilon"], 0.75);
        let back: Vec<RoundRow> = serde_json::from_value(json).unwrap();
        assert_eq!(back, secure_rows());
        let svg = std::fs::read_to_string(&files.svg).unwrap();
        assert!(svg.contains("SecAgg+ t = 2 of n = 3, k = 2 neighbours, survivors 2–3"), "chart annotation");

        let files = write_report(&rows(), &dir.path().join("plain")).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
        assert!(json[0]["secagg_threshold"].is_null() && json[0]["secagg_survivors"].is_null());
        assert!(!std::fs::read_to_string(&files.svg).unwrap().contains("SecAgg+"));
    }

    #[test]
    fn metrics_json_from_before_secure_aggregation_still_reads() {
        let old = r#"[{"round":1,"participants":3,"train_loss":null,"eval_loss":null,"eval_accuracy":null,
            "bytes":1,"seconds":1.0,"epsilon":null,"local_epsilon":null,
            "eval_outside_privacy_guarantee":false,"privacy":"no privacy guarantee"}]"#;
        let rows: Vec<RoundRow> = serde_json::from_str(old).unwrap();
        assert_eq!((rows[0].secagg_clients, rows[0].secagg_survivors), (None, None));
    }
}
