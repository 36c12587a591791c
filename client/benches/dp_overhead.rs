//! What differential privacy costs per round for the default demo model (all-MiniLM-L6-v2's
//! shape, ~22.7M parameters), against the local training it follows.
//!
//! Times, on this machine, the stages an update passes through (range check + norm, L2 clip,
//! per-layer clip, discrete Gaussian noise on the grid, as `DpPipelines` runs them) and the
//! coordinator's central noise on the sum, then a few real training steps of the tch trainer on
//! the same model to put them in proportion to one local epoch.
//!
//! ```text
//! cargo bench -p fedtune-client --bench dp_overhead -- [--batch 32] [--seq 64] [--steps 5]
//!     [--examples 1000] [--threads N] [--repeats 3]
//! ```

use std::sync::Arc;

use anyhow::Context;
use fedtune_client::model::{BertClassifier, BertConfig, ModelInput};
use fedtune_client::trainer::engine::train_step;
use fedtune_client::trainer::optim::{AdamW, AdamWConfig};
use fedtune_client::update::privacy::DpPipelines;
use fedtune_shared::limits::MAX_ABS_UPDATE_VALUE;
use fedtune_shared::params::{Manifest, ParameterVector, TensorSpec};
use fedtune_shared::privacy::{
    add_noise, clip_l2, clip_per_layer, default_grid_log2, l2_norm_upper_bound, widened_sensitivity,
    LayerBudget, NoiseSource,
};
use fedtune_shared::round::{PrivacyInstructions, PrivacyMode};
use tch::{Device, Kind, Tensor};
use tokio::time::Instant;

struct Args {
    batch: usize,
    seq: usize,
    steps: usize,
    examples: usize,
    threads: usize,
    repeats: usize,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        batch: 32,
        seq: 64,
        steps: 5,
        examples: 1000,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        repeats: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let n: usize = value.parse().with_context(|| format!("{flag} {value}"))?;
        match flag.as_str() {
            "--batch" => a.batch = n,
            "--seq" => a.seq = n,
            "--steps" => a.steps = n,
            "--examples" => a.examples = n,
            "--threads" => a.threads = n,
            "--repeats" => a.repeats = n,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// Best of `repeats` wall times of `f`, in seconds.
fn best(repeats: usize, mut f: impl FnMut()) -> f64 {
    (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    tch::set_num_threads(a.threads as i32);
    let config = BertConfig::minilm_l6();
    let model = BertClassifier::random(&config, 2, Device::Cpu, 0);
    let vars = model.named_variables();
    let specs: Vec<TensorSpec> = vars
        .iter()
        .map(|(name, t)| TensorSpec {
            name: name.clone(),
            shape: t.size().iter().map(|d| *d as usize).collect(),
        })
        .collect();
    let manifest = Manifest::new(specs)?;
    let d = manifest.numel();
    println!(
        "model: MiniLM-L6 shape, {} tensors, {d} parameters; {} threads",
        manifest.tensors.len(),
        a.threads
    );

    // A plausible fine-tuning delta: small values, norm well above a typical clip bound.
    let delta: Vec<f32> =
        (0..d).map(|i| ((i.wrapping_mul(2_654_435_761) % 2001) as f32 - 1000.0) * 1e-6).collect();
    let clip = 0.1;
    println!("update norm {:.4}, clip bound C = {clip}", l2_norm_upper_bound(&delta));

    let mut buf = delta.clone();
    let t_norm = best(a.repeats, || {
        std::hint::black_box(l2_norm_upper_bound(&buf));
    });
    let t_clip = best(a.repeats, || {
        buf.copy_from_slice(&delta);
        clip_l2(&mut buf, clip);
    });
    let t_copy = best(a.repeats, || buf.copy_from_slice(&delta));
    let t_clip_layers = best(a.repeats, || {
        buf.copy_from_slice(&delta);
        clip_per_layer(&mut buf, &manifest, clip, &LayerBudget::Equal).expect("manifest fits");
    });
    let k = default_grid_log2(clip, d)?;
    let sigma = widened_sensitivity(clip, k, d)?;
    let source = NoiseSource::from_os_entropy()?.with_threads(a.threads);
    let t_noise = best(a.repeats, || {
        add_noise(&mut buf, sigma, k, &source).expect("values fit the grid");
    });
    let single = NoiseSource::from_os_entropy()?.with_threads(1);
    let t_noise_1 = best(1, || {
        add_noise(&mut buf, sigma, k, &single).expect("values fit the grid");
    });

    // The whole client pipeline as an agent runs it (range check, clip, noise), local DP.
    let global = ParameterVector::zeros(manifest.clone());
    let local = ParameterVector::new(manifest.clone(), delta.clone())?;
    let instructions = PrivacyInstructions {
        mode: PrivacyMode::Local,
        clip_norm: clip,
        noise_stddev: sigma,
        grid_log2: Some(k),
        ..PrivacyInstructions::NONE
    };
    let shared = Arc::new(NoiseSource::from_os_entropy()?.with_threads(a.threads));
    let t_pipeline = best(a.repeats, || {
        let mut p = DpPipelines::stages(&instructions, MAX_ABS_UPDATE_VALUE, Arc::clone(&shared))
            .expect("valid instructions");
        std::hint::black_box(p.prepare(1, &global, &local, 100).expect("update prepared"));
    });
    let central = PrivacyInstructions { mode: PrivacyMode::Central, noise_stddev: 0.0, ..instructions };
    let t_pipeline_central = best(a.repeats, || {
        let mut p = DpPipelines::stages(&central, MAX_ABS_UPDATE_VALUE, Arc::clone(&shared))
            .expect("valid instructions");
        std::hint::black_box(p.prepare(1, &global, &local, 100).expect("update prepared"));
    });
    drop((buf, delta));

    // Local training on the same model: a few timed steps after one warm-up.
    let mut opt = AdamW::new(&vars, AdamWConfig::default())?;
    tch::manual_seed(0);
    let shape = [a.batch as i64, a.seq as i64];
    let input = ModelInput {
        input_ids: Tensor::randint_low(1, config.vocab_size as i64, shape, (Kind::Int64, Device::Cpu)),
        attention_mask: Tensor::ones(shape, (Kind::Int64, Device::Cpu)),
        token_type_ids: Tensor::zeros(shape, (Kind::Int64, Device::Cpu)),
    };
    let labels = Tensor::randint(2, [a.batch as i64], (Kind::Int64, Device::Cpu));
    let _ = train_step(&model, &mut opt, &input, &labels, 5e-5, 1.0, None)?;
    let t = Instant::now();
    for _ in 0..a.steps {
        let _ = train_step(&model, &mut opt, &input, &labels, 5e-5, 1.0, None)?;
    }
    let per_step = t.elapsed().as_secs_f64() / a.steps.max(1) as f64;
    let steps_per_epoch = a.examples.div_ceil(a.batch);
    let epoch = per_step * steps_per_epoch as f64;

    let ms = |s: f64| s * 1e3;
    println!();
    println!("{:<46} {:>10}", "stage (22.7M values)", "ms");
    println!("{:<46} {:>10.1}", "copy (baseline)", ms(t_copy));
    println!("{:<46} {:>10.1}", "L2 norm bound (range stage)", ms(t_norm));
    println!("{:<46} {:>10.1}", "clip whole update (incl. copy)", ms(t_clip));
    println!("{:<46} {:>10.1}", "clip per layer (incl. copy)", ms(t_clip_layers));
    println!("{:<46} {:>10.1}", format!("discrete Gaussian noise, {} threads", a.threads), ms(t_noise));
    println!("{:<46} {:>10.1}", "discrete Gaussian noise, 1 thread", ms(t_noise_1));
    println!("{:<46} {:>10.1}", "client pipeline, central (range+clip)", ms(t_pipeline_central));
    println!("{:<46} {:>10.1}", "client pipeline, local (range+clip+noise)", ms(t_pipeline));
    println!("{:<46} {:>10.1}", "coordinator central noise on the sum", ms(t_noise));
    println!();
    println!(
        "local training: {:.0} ms per step (batch {} × seq {}), {} steps per epoch of {} examples = {:.1} s",
        ms(per_step),
        a.batch,
        a.seq,
        steps_per_epoch,
        a.examples,
        epoch
    );
    println!(
        "share of a round spent on DP (client, local noise): {:.2}% of one local epoch; central: {:.2}% (client) + {:.2}% (coordinator)",
        100.0 * t_pipeline / (epoch + t_pipeline),
        100.0 * t_pipeline_central / (epoch + t_pipeline_central),
        100.0 * t_noise / (epoch + t_noise)
    );
    Ok(())
}
