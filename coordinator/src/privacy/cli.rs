//! `fedtune-coordinator privacy` and `calibrate`.
//!
//! * `privacy --state-dir DIR [--json]`: the ledger of a federation, one row per charged round.
//! * `privacy --sample-rate Q --noise-multiplier Z --rounds T --delta D [--participations K]
//!   [--json]`: planning, two numbers. The **central** ε of the published models after `T`
//!   identical rounds, amplified by subsampling (it holds only while the sample is secret), and
//!   the **local** ε of one client that took part in `K` of them against an observer who knows
//!   the draw (the coordinator, in `local` mode): `K` unamplified rounds, `q = 1`
//!   ([`epsilon_unamplified`]). Without `--participations`, `K` is the expected count `⌈q·T⌉`.
//! * `calibrate --target-epsilon E --delta D --rounds T --sample-rate Q [--json]`: the smallest
//!   noise multiplier that keeps `T` rounds within `E`.
//!
//! Both planning commands use the same accountant as `serve`
//! ([`epsilon_for_rounds`], [`calibrate_for`]), so what they print is what the ledger will show.

use std::fmt::Write as _;
use std::path::PathBuf;

use fedtune_shared::privacy::{
    calibrate_for, epsilon_for_rounds, epsilon_unamplified, Adjacency, PrivacyError, SamplingScheme,
};
use fedtune_shared::round::PrivacyStatus;
use serde_json::json;

use super::{guarantee_line, local_epsilon, scheme_name, worst_exposure, DpMode};
use crate::storage::ledger::Exposures;
use crate::storage::{ledger, LedgerRecord, Storage, StorageError};

/// Sampling scheme for planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PlanSampling {
    /// Each client independently with probability Q (add/remove adjacency).
    #[default]
    Poisson,
    /// A uniformly random cohort of Q·N clients (replace-one adjacency).
    FixedSize,
}

/// `privacy` options: a state directory (the ledger), or the planning parameters.
#[derive(Debug, Clone, clap::Args)]
pub struct PrivacyArgs {
    /// State directory whose ledger to print.
    #[arg(long, conflicts_with_all = ["sample_rate", "noise_multiplier", "rounds"])]
    pub state_dir: Option<PathBuf>,
    /// Planning: sampling rate q in (0, 1].
    #[arg(long)]
    pub sample_rate: Option<f64>,
    /// Planning: noise multiplier z.
    #[arg(long)]
    pub noise_multiplier: Option<f64>,
    /// Planning: number of rounds.
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Planning: δ.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Planning: how clients are sampled.
    #[arg(long, value_enum, default_value_t = PlanSampling::Poisson)]
    pub sampling: PlanSampling,
    /// Planning: rounds one client took part in, for its local ε (default: the expected ⌈q·T⌉).
    #[arg(long, conflicts_with = "state_dir")]
    pub participations: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `calibrate` options.
#[derive(Debug, Clone, clap::Args)]
pub struct CalibrateArgs {
    /// Budget ε.
    #[arg(long)]
    pub target_epsilon: f64,
    /// δ.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Rounds the budget must cover.
    #[arg(long)]
    pub rounds: u64,
    /// Sampling rate q in (0, 1].
    #[arg(long)]
    pub sample_rate: f64,
    /// How clients are sampled.
    #[arg(long, value_enum, default_value_t = PlanSampling::Poisson)]
    pub sampling: PlanSampling,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Why a privacy command failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyCliError {
    /// The arguments do not make a request.
    #[error("{0}")]
    Usage(String),
    /// The accountant refused the parameters.
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    /// The state directory.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn accounting(sampling: PlanSampling, q: f64) -> (SamplingScheme, Adjacency) {
    match sampling {
        PlanSampling::Poisson if q >= 1.0 => (SamplingScheme::Full, Adjacency::AddRemove),
        PlanSampling::Poisson => (SamplingScheme::Poisson, Adjacency::AddRemove),
        PlanSampling::FixedSize => (SamplingScheme::FixedSize, Adjacency::ReplaceOne),
    }
}

/// Runs `privacy`; returns what to print.
pub fn privacy(args: &PrivacyArgs) -> Result<String, PrivacyCliError> {
    if let Some(dir) = &args.state_dir {
        return show_ledger(dir, args.json);
    }
    let (Some(q), Some(z), Some(t)) = (args.sample_rate, args.noise_multiplier, args.rounds) else {
        return Err(PrivacyCliError::Usage(
            "give --state-dir DIR, or --sample-rate Q --noise-multiplier Z --rounds T [--delta D]".into(),
        ));
    };
    let (sampling, adjacency) = accounting(args.sampling, q);
    let eps = epsilon_for_rounds(adjacency, sampling, q, z, t, args.delta)?;
    let k = args.participations.unwrap_or_else(|| expected_participations(q, t));
    if k > t {
        return Err(PrivacyCliError::Usage(format!("--participations {k} exceeds --rounds {t}")));
    }
    let local = epsilon_unamplified(z, k, args.delta)?;
    Ok(if args.json {
        format!(
            "{}\n",
            json!({
                "epsilon": eps,
                "central_epsilon": eps,
                "local_epsilon": local,
                "participations": k,
                "delta": args.delta,
                "rounds": t,
                "sample_rate": q,
                "noise_multiplier": z,
                "sampling": scheme_name(sampling),
            })
        )
    } else {
        format!(
            "central ε = {eps:.6} at δ = {:e} after {t} rounds ({} sampling, q = {q}, z = {z}): \
             the published models, amplified by sampling, which holds only while the sample is secret\n\
             local   ε = {local:.6} at δ = {:e} for a client that took part in {k} round(s): \
             against anyone who knows the draw (the coordinator), no amplification\n",
            args.delta,
            scheme_name(sampling),
            args.delta,
        )
    })
}

/// The expected number of rounds one client takes part in, rounded up: `⌈q·T⌉`.
fn expected_participations(q: f64, rounds: u64) -> u64 {
    ((q * rounds as f64).ceil() as u64).min(rounds)
}

/// Runs `calibrate`; returns what to print.
pub fn calibrate(args: &CalibrateArgs) -> Result<String, PrivacyCliError> {
    let q = args.sample_rate;
    let (sampling, adjacency) = accounting(args.sampling, q);
    let z = calibrate_for(args.target_epsilon, args.delta, args.rounds, q, sampling, adjacency)?;
    let eps = epsilon_for_rounds(adjacency, sampling, q, z, args.rounds, args.delta)?;
    Ok(if args.json {
        format!(
            "{}\n",
            json!({
                "noise_multiplier": z,
                "epsilon": eps,
                "target_epsilon": args.target_epsilon,
                "delta": args.delta,
                "rounds": args.rounds,
                "sample_rate": q,
                "sampling": scheme_name(sampling),
            })
        )
    } else {
        format!("{z}\n")
    })
}

/// The ledger of `dir` as text or JSON.
fn show_ledger(dir: &std::path::Path, as_json: bool) -> Result<String, PrivacyCliError> {
    let store = Storage::open_existing(dir)?;
    let mode = store.call_sync(|c| ledger::recorded_mode(c))?.unwrap_or_else(|| "none".into());
    let rows = store.call_sync(ledger::load)?;
    let exposures = store.call_sync(|c| ledger::exposures(c, &[]))?;
    Ok(render_ledger(&mode, &rows, &exposures, as_json))
}

/// The local ε of the worst-off client under local noise and its fit attempts: each attempt
/// composed with the multiplier its draw recorded, without amplification (the coordinator knows
/// who was sampled). An attempt drawn before multipliers were recorded counts at the smallest
/// multiplier any round accounted. `None` in other modes, or before any round set δ.
fn worst_local_epsilon(mode: &str, rows: &[LedgerRecord], exposures: &Exposures) -> Option<(f64, u64)> {
    if mode != "local" {
        return None;
    }
    let fallback = rows.iter().map(|r| r.entry.noise_multiplier).fold(f64::INFINITY, f64::min);
    let delta = rows.first().map(|r| r.entry.delta)?;
    let (inverse_variance, participations) = worst_exposure(exposures, None, fallback);
    Some((local_epsilon(inverse_variance, delta).unwrap_or(f64::INFINITY), participations))
}

/// Renders a ledger (`mode` as recorded at creation; `exposures`: what the draw records say the
/// coordinator has seen of each client).
pub fn render_ledger(mode: &str, rows: &[LedgerRecord], exposures: &Exposures, as_json: bool) -> String {
    let last = rows.last().map(|r| &r.entry);
    let worst = worst_local_epsilon(mode, rows, exposures);
    let (local, participations) = (worst.map(|w| w.0), worst.map_or(0, |w| w.1));
    let most = exposures.others.iter().map(|e| e.participations).max().unwrap_or(0);
    let participations = if worst.is_some() { participations } else { most };
    let guarantee = match (mode, last) {
        ("none", _) => PrivacyStatus::NO_GUARANTEE.to_string(),
        (_, None) => format!("{mode} noise, no round charged yet (ε = 0)"),
        (_, Some(e)) => {
            let mode_enum = match mode {
                "local" => DpMode::Local,
                "distributed" => DpMode::Distributed,
                _ => DpMode::Central,
            };
            guarantee_line(
                mode_enum,
                e.epsilon_after,
                e.delta,
                rows.len() as u64,
                local.map(|l| (l, participations)),
                // The ledger says nothing of evaluation; status and `simulate` label it.
                false,
            )
        }
    };
    if as_json {
        let rounds: Vec<_> = rows
            .iter()
            .map(|r| {
                let e = &r.entry;
                json!({
                    "round": e.round,
                    "version": r.version().0,
                    "mechanism": r.mechanism(),
                    "sampling": scheme_name(e.sampling),
                    "sampling_rate": e.sampling_rate,
                    "noise_multiplier": e.noise_multiplier,
                    "clip_norm": e.clip_norm,
                    "next_clip_norm": r.next_clip_norm,
                    "expected_clients": r.expected_clients,
                    "sampled": e.sampled,
                    "reported": e.reported,
                    "epsilon": e.epsilon_after,
                    "local_epsilon": r.local_epsilon,
                    "delta": e.delta,
                })
            })
            .collect();
        return format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({
                "mode": mode,
                "guarantee": guarantee,
                "epsilon": last.map(|e| e.epsilon_after).unwrap_or(0.0),
                "central_epsilon": last.map(|e| e.epsilon_after).unwrap_or(0.0),
                "local_epsilon": local,
                "max_participations": participations,
                "delta": last.map(|e| e.delta),
                "rounds": rounds,
            }))
            .unwrap_or_default()
        );
    }
    let mut out = format!("privacy: {guarantee}\n");
    if mode != "none" {
        let _ = writeln!(out, "most fit attempts any client was drawn into: {most}");
    }
    if rows.is_empty() {
        return out;
    }
    // Under local noise each round shows both numbers: the central ε of the published models and
    // the worst-off client's local ε after the round.
    let local_column = mode == "local";
    let _ = write!(
        out,
        "{:>5}  {:<22} {:<10} {:>8} {:>9} {:>9} {:>7} {:>8} {:>10}",
        "round", "mechanism", "sampling", "q", "z", "C", "sampled", "reported", "epsilon"
    );
    let _ = writeln!(out, "{}", if local_column { format!(" {:>10}", "local_eps") } else { String::new() });
    for r in rows {
        let e = &r.entry;
        let _ = write!(
            out,
            "{:>5}  {:<22} {:<10} {:>8.4} {:>9.4} {:>9.4} {:>7} {:>8} {:>10.4}",
            e.round,
            r.mechanism(),
            scheme_name(e.sampling),
            e.sampling_rate,
            e.noise_multiplier,
            e.clip_norm,
            e.sampled,
            e.reported,
            e.epsilon_after
        );
        let local = r.local_epsilon.map_or_else(|| "-".to_string(), |l| format!("{l:.4}"));
        let _ = writeln!(out, "{}", if local_column { format!(" {local:>10}") } else { String::new() });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ledger::Exposure;
    use fedtune_shared::privacy::epsilon_unamplified_composed;

    fn plan(q: f64, z: f64, t: u64) -> PrivacyArgs {
        PrivacyArgs {
            state_dir: None,
            sample_rate: Some(q),
            noise_multiplier: Some(z),
            rounds: Some(t),
            delta: 1e-5,
            sampling: PlanSampling::Poisson,
            participations: None,
            json: true,
        }
    }

    fn printed(out: &str, label: &str) -> String {
        let line = out.lines().find(|l| l.starts_with(label)).unwrap();
        let value = line.split("ε = ").nth(1).unwrap().split(' ').next().unwrap();
        format!("{:.2}", value.parse::<f64>().unwrap())
    }

    #[test]
    fn planning_prints_the_amplified_central_and_the_unamplified_local_epsilon() {
        // q = 0.01, z = 1, T = 1000, δ = 1e-5: the published models are (2.10, 1e-5)-DP, but a
        // client sampled in 10 rounds is (17.86, 1e-5)-DP against whoever knows the draw.
        let mut args = plan(0.01, 1.0, 1000);
        args.participations = Some(10);
        args.json = false;
        let out = privacy(&args).unwrap();
        assert_eq!(printed(&out, "central"), "2.10", "{out}");
        assert_eq!(printed(&out, "local"), "17.86", "{out}");
        let full = plan(1.0, 1.0, 10);
        let v: serde_json::Value = serde_json::from_str(&privacy(&full).unwrap()).unwrap();
        assert_eq!(format!("{:.2}", v["central_epsilon"].as_f64().unwrap()), "17.86");
    }

    #[test]
    fn the_local_epsilon_defaults_to_the_expected_participations() {
        let v: serde_json::Value = serde_json::from_str(&privacy(&plan(0.01, 1.0, 1000)).unwrap()).unwrap();
        assert_eq!(v["participations"], 10);
        assert_eq!(v["local_epsilon"].as_f64().unwrap(), epsilon_unamplified(1.0, 10, 1e-5).unwrap());
    }

    #[test]
    fn more_participations_than_rounds_is_a_usage_error() {
        let mut args = plan(0.1, 1.0, 5);
        args.participations = Some(6);
        assert!(matches!(privacy(&args), Err(PrivacyCliError::Usage(_))));
    }

    #[test]
    fn planning_prints_the_accountants_epsilon() {
        let out = privacy(&plan(0.1, 1.1, 100)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let lib =
            epsilon_for_rounds(Adjacency::AddRemove, SamplingScheme::Poisson, 0.1, 1.1, 100, 1e-5).unwrap();
        assert_eq!(v["epsilon"].as_f64().unwrap(), lib);
    }

    #[test]
    fn calibration_round_trips_through_planning() {
        let args = CalibrateArgs {
            target_epsilon: 3.0,
            delta: 1e-5,
            rounds: 50,
            sample_rate: 0.2,
            sampling: PlanSampling::Poisson,
            json: false,
        };
        let z: f64 = calibrate(&args).unwrap().trim().parse().unwrap();
        let eps: f64 = serde_json::from_str::<serde_json::Value>(&privacy(&plan(0.2, z, 50)).unwrap())
            .unwrap()["epsilon"]
            .as_f64()
            .unwrap();
        assert!(eps <= 3.0 && eps > 2.99, "ε = {eps} for z = {z}");
    }

    #[test]
    fn planning_without_parameters_explains_the_usage() {
        let mut args = plan(0.1, 1.0, 1);
        args.rounds = None;
        assert!(matches!(privacy(&args), Err(PrivacyCliError::Usage(_))));
    }

    fn local_rows(rounds: u64, q: f64, z: f64) -> Vec<LedgerRecord> {
        let mut acc = fedtune_shared::privacy::Accountant::new(1e-5, Adjacency::AddRemove).unwrap();
        (1..=rounds)
            .map(|round| LedgerRecord {
                entry: acc
                    .record(fedtune_shared::privacy::PrivacyLedgerEntry {
                        round,
                        sampling: SamplingScheme::Poisson,
                        placement: fedtune_shared::privacy::NoisePlacement::Local,
                        sampling_rate: q,
                        noise_multiplier: z,
                        clip_norm: 1.0,
                        sampled: 1,
                        reported: 1,
                        delta: 1e-5,
                        epsilon_after: 0.0,
                    })
                    .unwrap(),
                expected_clients: 1.0,
                next_clip_norm: 1.0,
                charged_at_release: false,
                local_epsilon: Some(local_epsilon(z.powi(-2) * round as f64, 1e-5).unwrap()),
            })
            .collect()
    }

    fn seen(participations: u64, inverse_variance: f64, unrecorded: u64) -> Exposures {
        Exposures {
            drawn: vec![],
            others: vec![
                Exposure { participations: 1, inverse_variance: 1.0, unrecorded: 0 },
                Exposure { participations, inverse_variance, unrecorded },
            ],
        }
    }

    #[test]
    fn a_local_ledger_shows_the_worst_off_clients_unamplified_epsilon_beside_the_central_one() {
        let rows = local_rows(1000, 0.01, 1.0);
        let exposures = seen(10, 10.0, 0);
        let v: serde_json::Value =
            serde_json::from_str(&render_ledger("local", &rows, &exposures, true)).unwrap();
        assert_eq!(format!("{:.2}", v["central_epsilon"].as_f64().unwrap()), "2.10");
        assert_eq!(format!("{:.2}", v["local_epsilon"].as_f64().unwrap()), "17.86");
        assert_eq!(v["max_participations"], 10);
        let text = render_ledger("local", &rows, &exposures, false);
        assert!(text.contains("local ε = 17.8566"), "{text}");
        let central: serde_json::Value =
            serde_json::from_str(&render_ledger("central", &rows, &exposures, true)).unwrap();
        assert!(central["local_epsilon"].is_null());
    }

    #[test]
    fn a_local_ledger_table_carries_a_local_epsilon_column_per_round() {
        let rows = local_rows(10, 0.5, 1.0);
        let text = render_ledger("local", &rows, &seen(10, 10.0, 0), false);
        let header = text.lines().find(|l| l.trim_start().starts_with("round")).unwrap();
        assert!(header.ends_with("local_eps"), "{text}");
        let last = text.lines().last().unwrap();
        assert!(last.ends_with("17.8566"), "{text}");
        let v: serde_json::Value =
            serde_json::from_str(&render_ledger("local", &rows, &seen(10, 10.0, 0), true)).unwrap();
        assert_eq!(format!("{:.2}", v["rounds"][9]["local_epsilon"].as_f64().unwrap()), "17.86");
        let central = render_ledger("central", &rows, &seen(10, 10.0, 0), false);
        assert!(!central.contains("local_eps"), "{central}");
    }

    #[test]
    fn a_local_ledger_composes_each_attempt_with_its_recorded_multiplier() {
        // Three attempts at z = 1 and two at z = 0.8 (e.g. the multiplier lowered on a restart).
        let rows = local_rows(5, 0.5, 0.8);
        let recorded = 3.0 + 2.0 * 0.8f64.powi(-2);
        let v: serde_json::Value =
            serde_json::from_str(&render_ledger("local", &rows, &seen(5, recorded, 0), true)).unwrap();
        let expected = epsilon_unamplified_composed(recorded, 1e-5).unwrap();
        assert_eq!(v["local_epsilon"].as_f64().unwrap(), expected);
        assert!(expected > epsilon_unamplified(1.0, 5, 1e-5).unwrap());
        // Attempts drawn before multipliers were recorded count at the smallest one accounted.
        let v: serde_json::Value =
            serde_json::from_str(&render_ledger("local", &rows, &seen(5, 3.0, 2), true)).unwrap();
        assert_eq!(v["local_epsilon"].as_f64().unwrap(), expected);
    }

    #[test]
    fn an_empty_ledger_without_dp_says_there_is_no_guarantee() {
        let none = Exposures::default();
        assert!(render_ledger("none", &[], &none, false).contains("no privacy guarantee"));
        let v: serde_json::Value = serde_json::from_str(&render_ledger("none", &[], &none, true)).unwrap();
        assert_eq!(v["guarantee"], "no privacy guarantee");
    }
}
