//! `fedtune-coordinator simulate` end to end: the binary shards a CSV, runs its coordinator and
//! real `fedtune-client` processes, and writes the report. Needs `cargo build --workspace` first.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use fedtune_coordinator::simulate::report::RoundRow;
use fedtune_tests::fixtures::{tiny_bert, write_fake_model, write_sentiment_csv};
use fedtune_tests::process;

/// The per-round rows a finished simulation wrote to `out`, once its `stdout` showed the table.
fn report(stdout: &str, out: &Path) -> Result<Vec<RoundRow>> {
    ensure!(stdout.contains("round") && stdout.contains("accuracy"), "no table on stdout:\n{stdout}");
    let json = std::fs::read(out.join("metrics.json")).context("metrics.json")?;
    Ok(serde_json::from_slice(&json)?)
}

/// Runs `simulate ARGS --out OUT` to completion and returns its per-round rows.
fn simulate(args: &[&str], out: &Path) -> Result<Vec<RoundRow>> {
    report(&process::simulate(args, out)?, out)
}

#[test]
fn a_simulated_federation_of_fake_clients_reports_every_round_and_converges() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 16)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 200, 5)?;
    let out = dir.path().join("out");
    let stdout = process::simulate_fake(&model, &data, 3, 3, &["--partition", "by:topic"], &out)?;
    let rows = report(&stdout, &out)?;
    assert_eq!(rows.iter().map(|r| r.round).collect::<Vec<_>>(), vec![1, 2, 3]);
    for r in &rows {
        assert_eq!(r.participants, 3, "{r:?}");
        assert!(r.bytes > 0 && r.seconds > 0.0, "{r:?}");
    }
    // The fake problem has a closed-form optimum that FedAvg approaches round after round.
    let losses: Vec<f64> = rows.iter().map(|r| r.eval_loss.expect("evaluated every round")).collect();
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "eval losses {losses:?}");
    for f in
        ["metrics.csv", "metrics.svg", "shards/client-0.csv", "logs/client-2.log", "model/model.safetensors"]
    {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // by:topic keeps each topic on one client.
    let topics = |k: usize| -> Result<std::collections::BTreeSet<String>> {
        let mut r = csv::Reader::from_path(out.join(format!("shards/client-{k}.csv")))?;
        Ok(r.records().map(|rec| rec.map(|rec| rec[2].to_string())).collect::<Result<_, _>>()?)
    };
    let (a, b, c) = (topics(0)?, topics(1)?, topics(2)?);
    assert!(a.is_disjoint(&b) && a.is_disjoint(&c) && b.is_disjoint(&c), "{a:?} {b:?} {c:?}");
    Ok(())
}

#[test]
fn three_bert_clients_learn_a_sentiment_task_together_in_two_rounds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 900, 6)?;
    let out = dir.path().join("out");
    let full = ["--train-top-layers", "0", "--epochs", "2", "--lr", "3e-3"];
    let rows = simulate_bert(&out, &data, &full)?;
    assert_eq!(rows.len(), 2);
    let (first, last) = (&rows[0], &rows[1]);
    let acc = |r: &RoundRow| r.eval_accuracy.expect("evaluated");
    assert!(last.eval_loss < first.eval_loss, "eval loss {:?} → {:?}", first.eval_loss, last.eval_loss);
    assert!(acc(last) > acc(first), "accuracy {} → {}", acc(first), acc(last));
    // About 60 % of the rows are positive: well above always guessing that.
    assert!(acc(last) >= 0.8, "final accuracy {}", acc(last));
    Ok(())
}

/// Flags for SecAgg+ with t = 2 and k = 2 neighbours under distributed noise of multiplier `z`
/// (plaintext on loopback).
fn secure_under_distributed_noise(z: &str) -> Vec<&str> {
    let mut flags = vec!["--insecure", "--dp", "distributed", "--noise-multiplier", z];
    flags.extend(["--secure-aggregation", "--secagg-threshold", "2", "--secagg-degree", "2"]);
    flags
}

#[test]
fn a_secure_simulation_under_distributed_noise_reports_t_k_survivors_and_epsilon_per_round() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 16)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 120, 4)?;
    let out = dir.path().join("out");
    let secure = secure_under_distributed_noise("1.0");
    let stdout = process::simulate_fake(&model, &data, 4, 2, &secure, &out)?;
    let rows = report(&stdout, &out)?;
    println!("{stdout}");
    assert_eq!(rows.iter().map(|r| r.round).collect::<Vec<_>>(), vec![1, 2]);
    for r in &rows {
        // Every client survived: all 4 masked inputs are in each round's sum.
        let figures = (r.secagg_threshold, r.secagg_degree, r.secagg_survivors, r.secagg_clients);
        assert_eq!(figures, (Some(2), Some(2), Some(4), Some(4)), "{r:?}");
        assert_eq!(r.secagg_survivors, Some(r.participants), "{r:?}");
    }
    let eps: Vec<f64> = rows.iter().map(|r| r.epsilon.expect("ε charged every round")).collect();
    assert!(eps[0] > 0.0 && eps[1] > eps[0], "cumulative ε {eps:?}");
    assert!(stdout.contains("t/k  survivors/n"), "{stdout}");
    assert!(stdout.contains("2/2          4/4"), "{stdout}");
    assert!(
        stdout.contains(
            "secure aggregation (SecAgg+): t = 2 of n = 4, k = 2 neighbours, survivors 4; privacy: distributed DP"
        ),
        "{stdout}"
    );
    Ok(())
}

/// The tensors whose values differ between the checkpoints of rounds `a` and `b` of a
/// simulation's state folder.
fn changed_between(out: &Path, a: u64, b: u64) -> Result<Vec<String>> {
    use fedtune_shared::params::ParameterVector;
    let load = |v: u64| {
        let path = out.join("state/checkpoints").join(format!("round-{v:06}.safetensors"));
        ParameterVector::load_safetensors(&path, |_| true).with_context(|| path.display().to_string())
    };
    let (before, after) = (load(a)?, load(b)?);
    ensure!(before.manifest() == after.manifest(), "the layout changed between rounds");
    Ok(before
        .manifest()
        .ranges()
        .filter(|(_, r)| before.values()[r.clone()] != after.values()[r.clone()])
        .map(|(t, _)| t.name.clone())
        .collect())
}

/// `simulate` of three tiny-BERT clients for two rounds on the CPU, every client sampled each
/// round, plus `extra` flags (what they train, and how).
fn simulate_bert(out: &Path, data: &Path, extra: &[&str]) -> Result<Vec<RoundRow>> {
    let model = tiny_bert();
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let mut args = vec!["--model", model, "--data", data, "--clients", "3", "--rounds", "2", "--sample", "0"];
    args.extend(["--max-len", "32", "--batch-size", "16", "--device", "cpu", "--threads", "1"]);
    args.extend_from_slice(extra);
    simulate(&args, out)
}

/// [`simulate_bert`] training a rank-4 LoRA adapter, plus `extra` flags.
fn simulate_lora(out: &Path, data: &Path, extra: &[&str]) -> Result<Vec<RoundRow>> {
    let lora = ["--adapter", "lora", "--lora-rank", "4", "--lr", "5e-3"];
    simulate_bert(out, data, &[&lora[..], extra].concat())
}

#[test]
fn a_lora_federation_moves_only_b_and_the_head_and_exports_merged_and_as_a_peft_adapter() -> Result<()> {
    use fedtune_shared::bert::lora::{lora_part, LoraConfig, PEFT_PREFIX};
    let dir = tempfile::tempdir()?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 300, 6)?;
    let out = dir.path().join("out");
    let rows = simulate_lora(&out, &data, &[])?;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.participants == 3), "{rows:?}");
    // Uploads carry exactly the trainable manifest (the coordinator refuses any other), so what
    // aggregation changed is what clients sent: every B and the head, never a base weight or A.
    let changed = changed_between(&out, 0, 2)?;
    ensure!(changed.iter().any(|n| n.ends_with("lora_B.weight")), "B never moved: {changed:?}");
    for name in &changed {
        assert!(LoraConfig::trains(name), "{name} changed but is frozen under LoRA");
    }
    let merged = fedtune_shared::params::ParameterVector::load_safetensors(
        &out.join("model/model.safetensors"),
        |_| true,
    )?;
    assert!(merged.manifest().tensors.iter().all(|t| lora_part(&t.name).is_none()), "merged: no adapters");
    let adapter = fedtune_shared::params::ParameterVector::load_safetensors(
        &out.join("model-adapter/adapter_model.safetensors"),
        |_| true,
    )?;
    for t in &adapter.manifest().tensors {
        let name = t.name.strip_prefix(PEFT_PREFIX).context("peft prefix")?;
        assert!(lora_part(name).is_some() || LoraConfig::trains(name), "{name} in the adapter file");
    }
    Ok(())
}

/// Every tensor that `changed` names is one LoRA trains (a `lora_B` or the head).
fn assert_only_trained_tensors(changed: &[String]) {
    for name in changed {
        assert!(
            fedtune_shared::bert::lora::LoraConfig::trains(name),
            "{name} changed but is frozen under LoRA"
        );
    }
}

/// What noise on exactly the adapter and the head moves: nothing frozen, and every `lora_B` (two
/// layers × query, value) since noise reaches all of its coordinates.
fn assert_noise_moved_every_b_and_nothing_frozen(changed: &[String]) -> Result<()> {
    assert_only_trained_tensors(changed);
    ensure!(changed.iter().filter(|n| n.ends_with("lora_B.weight")).count() >= 4, "{changed:?}");
    Ok(())
}

/// A two-round LoRA simulation under `mode` noise (z 0.8, C 0.5), each round charged; the
/// tensors that moved between the initial model and round 2.
fn lora_under_noise(mode: &str) -> Result<Vec<String>> {
    let dir = tempfile::tempdir()?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 300, 7)?;
    let out = dir.path().join("out");
    let dp = ["--dp", mode, "--noise-multiplier", "0.8", "--clip-norm", "0.5", "--delta", "1e-5"];
    let rows = simulate_lora(&out, &data, &dp)?;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.epsilon.is_some_and(|e| e > 0.0)), "{rows:?}");
    changed_between(&out, 0, 2)
}

#[test]
fn a_lora_federation_under_central_dp_noises_only_the_adapter_and_the_head() -> Result<()> {
    // The decorator's noise lands on every coordinate of the vector it is given: had it been
    // given more than the adapter and head, a frozen tensor would move.
    assert_noise_moved_every_b_and_nothing_frozen(&lora_under_noise("central")?)
}

#[test]
fn a_lora_federation_under_local_noise_moves_only_the_adapter_and_the_head() -> Result<()> {
    // Each client noises the vector it uploads: the adapter and the head, nothing frozen.
    assert_noise_moved_every_b_and_nothing_frozen(&lora_under_noise("local")?)
}

#[test]
fn a_lora_federation_under_secure_aggregation_and_distributed_dp_moves_only_b_and_the_head() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 300, 8)?;
    let out = dir.path().join("out");
    let secure = secure_under_distributed_noise("0.5");
    let rows = simulate_lora(&out, &data, &secure)?;
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r.secagg_survivors, Some(3), "every masked adapter vector is in the sum: {r:?}");
    }
    let changed = changed_between(&out, 0, 2)?;
    assert_only_trained_tensors(&changed);
    ensure!(changed.iter().any(|n| n.ends_with("lora_B.weight")), "B never moved: {changed:?}");
    Ok(())
}

/// Two fake clients for `rounds` rounds over the same small model and data (written to `dir`),
/// once with `flag` set to each of `encodings`; each run reports to `dir/<encoding>`.
fn run_per_encoding(dir: &Path, rounds: u64, flag: &str, encodings: [&str; 2]) -> Result<[Vec<RoundRow>; 2]> {
    let model = write_fake_model(&dir.join("model"), 2, 16)?;
    let data = write_sentiment_csv(&dir.join("data.csv"), 60, 5)?;
    let run = |encoding: &str| {
        let out = dir.join(encoding);
        report(&process::simulate_fake(&model, &data, 2, rounds, &[flag, encoding], &out)?, &out)
    };
    Ok([run(encodings[0])?, run(encodings[1])?])
}

#[test]
fn simulate_update_encoding_int8_sends_fewer_bytes_than_f32_for_the_same_rounds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let [f32_rows, int8_rows] = run_per_encoding(dir.path(), 1, "--update-encoding", ["f32", "int8"])?;
    assert_eq!((f32_rows.len(), int8_rows.len()), (1, 1));
    assert_eq!((f32_rows[0].participants, int8_rows[0].participants), (2, 2));
    // Downloads are the same f32 model; only the uploads shrink.
    assert!(int8_rows[0].bytes < f32_rows[0].bytes, "int8 {:?} vs f32 {:?}", int8_rows[0], f32_rows[0]);
    Ok(())
}

#[test]
fn simulate_download_encoding_int8_delta_sends_fewer_bytes_after_round_1_and_clients_rebuild_version_0(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let [f32_rows, int8_rows] =
        run_per_encoding(dir.path(), 3, "--download-encoding", ["f32", "int8_delta"])?;
    assert_eq!((f32_rows.len(), int8_rows.len()), (3, 3));
    // Round 1 downloads nothing in either run (every client rebuilds version 0), so it moves
    // the same f32 uploads; from round 2 on a client holding the previous version gets its step.
    assert_eq!(int8_rows[0].bytes, f32_rows[0].bytes, "{:?} vs {:?}", int8_rows[0], f32_rows[0]);
    for (i, f) in int8_rows.iter().zip(&f32_rows).skip(1) {
        assert_eq!(i.participants, 2, "{i:?}");
        assert!(i.bytes < f.bytes, "int8_delta {i:?} vs f32 {f:?}");
    }
    for encoding in ["f32", "int8_delta"] {
        let log = std::fs::read_to_string(dir.path().join(encoding).join("logs/client-0.log"))?;
        ensure!(
            log.contains("model rebuilt from the local model folder"),
            "{encoding}: no rebuild in\n{log}"
        );
    }
    let log = std::fs::read_to_string(dir.path().join("int8_delta/logs/client-1.log"))?;
    ensure!(log.contains("int8 step from v1"), "no step download in\n{log}");
    Ok(())
}

#[test]
fn int8_updates_under_local_noise_complete_every_round_and_each_round_is_charged() -> Result<()> {
    // The client's pipeline puts the int8 encoding after the noise (post-processing, see
    // docs/privacy.md); here the whole federation runs that way and the ledger still grows.
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 16)?;
    let data = write_sentiment_csv(&dir.path().join("data.csv"), 60, 5)?;
    let noisy_int8 = ["--dp", "local", "--noise-multiplier", "1.0", "--update-encoding", "int8"];
    let out = dir.path().join("out");
    let rows = report(&process::simulate_fake(&model, &data, 2, 2, &noisy_int8, &out)?, &out)?;
    assert_eq!(rows.iter().map(|r| (r.round, r.participants)).collect::<Vec<_>>(), vec![(1, 2), (2, 2)]);
    let eps: Vec<f64> = rows.iter().map(|r| r.epsilon.expect("ε charged every round")).collect();
    assert!(eps[0] > 0.0 && eps[1] > eps[0], "cumulative ε {eps:?}");
    Ok(())
}
