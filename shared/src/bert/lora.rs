//! LoRA adapters as a federation trains them: FFA-LoRA (A frozen and shared, only B and the
//! head trained), the tensor naming both binaries and `peft` agree on, the seeded A, and the
//! merge `W + (α/r)·B·A`.
//!
//! # Why only B trains
//! A LoRA layer adds `ΔW = (α/r)·B·A` to a frozen weight `W`. Averaging A and B separately is
//! not averaging ΔW (the mean of products is not the product of means). With A frozen and the
//! same at every client, ΔW is linear in B, so the federation's weighted mean of B is exactly
//! the weighted mean of the clients' ΔW: `Σ pₖ (α/r)·Bₖ·A = (α/r)·(Σ pₖ Bₖ)·A`. Every strategy
//! (FedAvg, server optimizers) and DP mechanism works on the B vector as on any parameter
//! vector, and under DP the vector clipped and noised is exactly what was trained (Sun et al.,
//! "Improving LoRA in privacy-preserving federated learning", ICLR 2024).
//!
//! # Where A comes from
//! The coordinator adds A to its initial model once, drawn by [`LoraConfig::init_a`] from the
//! federation's `model.init_seed` (recorded in its state directory), and keeps it in every
//! checkpoint as a frozen tensor, so an export needs nothing but the checkpoint. Clients never
//! download frozen tensors (they hold the base model), so a client regenerates A with the same
//! function from the seed the coordinator sends with the adapter description, and checks it
//! against the coordinator's digest of A ([`LoraConfig::a_digest`]): pure Rust in this crate,
//! no libtorch RNG, so both sides draw the same bits on any platform, and a disagreement is
//! refused before training rather than averaged silently. The alternative, A as a downloaded
//! frozen tensor, would add a second download path for frozen tensors to the protocol.
//!
//! # Names
//! As `peft` names them inside the base model: the adapter of module
//! `bert.encoder.layer.0.attention.self.query` is `….query.lora_A.weight` (`[r, in]`) and
//! `….query.lora_B.weight` (`[out, r]`); `peft`'s own files prefix them with
//! `base_model.model.` ([`PEFT_PREFIX`]). A target module matches the modules whose path ends
//! with `.target`, as `peft` matches a list of target names; only encoder-layer linear layers
//! can be targets ([`TARGETABLE`]).

use ring::digest;

use super::TensorRole;
use crate::params::{natural_cmp, Manifest, ParameterVector, ParamsError, TensorSpec};

/// The prefix `peft` gives tensor names in an adapter file (`PeftModel.base_model.model`).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Target module names accepted: the linear layers of an encoder layer, as suffixes of their
/// paths (`output.dense` also matches `attention.output.dense`, as in `peft`). `dense` alone is
/// refused: it would also match the pooler, which trains whole as part of the head.
pub const TARGETABLE: [&str; 6] =
    ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"];

/// The defaults a federation, `simulate` and `fedtune-client train` share when a LoRA setting is
/// left out: peft's usual choice for BERT (rank 8, alpha 16, no dropout, query and value).
pub const DEFAULT_RANK: usize = 8;
/// Default scale numerator (see [`DEFAULT_RANK`]).
pub const DEFAULT_ALPHA: f64 = 16.0;
/// Default adapter dropout (see [`DEFAULT_RANK`]).
pub const DEFAULT_DROPOUT: f64 = 0.0;
/// Default target modules (see [`DEFAULT_RANK`]).
pub const DEFAULT_TARGETS: [&str; 2] = ["query", "value"];

/// The modules `peft` saves whole next to the adapter (`modules_to_save`): the head, which the
/// federation trains in full (see [`LoraConfig::trains`]).
pub const HEAD_MODULES: [&str; 2] = ["classifier", "pooler"];

/// Which of a LoRA pair a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPart {
    /// `lora_A.weight`, `[r, in]`: frozen, seeded.
    A,
    /// `lora_B.weight`, `[out, r]`: trained, starts at zero.
    B,
}

/// The module a LoRA tensor adapts and which of the pair it is, or `None` for any other name.
pub fn lora_part(name: &str) -> Option<(&str, LoraPart)> {
    if let Some(module) = name.strip_suffix(".lora_A.weight") {
        Some((module, LoraPart::A))
    } else {
        name.strip_suffix(".lora_B.weight").map(|module| (module, LoraPart::B))
    }
}

/// The name of `module`'s tensor `part` (`module` as `bert.encoder.layer.0.attention.self.query`).
pub fn lora_name(module: &str, part: LoraPart) -> String {
    match part {
        LoraPart::A => format!("{module}.lora_A.weight"),
        LoraPart::B => format!("{module}.lora_B.weight"),
    }
}

/// Why an adapter description is unusable.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A field is out of range; the text names it.
    #[error("{field}: {reason}")]
    Invalid {
        /// `rank`, `alpha`, `dropout` or `target_modules`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No linear layer of the model matches the target modules.
    #[error("no encoder linear layer matches target_modules {0:?}")]
    NoTargets(Vec<String>),
    /// Parameter vectors.
    #[error(transparent)]
    Params(#[from] ParamsError),
}

/// The LoRA flags of `fedtune-client train` and `simulate` (`--lora-rank`, `--lora-alpha`,
/// `--lora-dropout`, `--lora-targets`), declared once so both binaries take the same names and
/// defaults; the coordinator's config spells them `model.lora.*`.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct LoraArgs {
    /// LoRA rank (`model.lora.rank`).
    #[arg(long = "lora-rank", default_value_t = DEFAULT_RANK)]
    pub rank: usize,
    /// LoRA alpha: the adapter adds (alpha / rank)·B·A (`model.lora.alpha`).
    #[arg(long = "lora-alpha", default_value_t = DEFAULT_ALPHA)]
    pub alpha: f64,
    /// Dropout on the adapter input while training (`model.lora.dropout`).
    #[arg(long = "lora-dropout", default_value_t = DEFAULT_DROPOUT)]
    pub dropout: f64,
    /// Modules that get an adapter, comma-separated (query, key, value, attention.output.dense,
    /// intermediate.dense, output.dense; `model.lora.target_modules`).
    #[arg(long = "lora-targets", default_values = DEFAULT_TARGETS, value_delimiter = ',')]
    pub target_modules: Vec<String>,
}

impl LoraArgs {
    /// The adapter these flags describe, its A seeded from `seed`.
    pub fn config(&self, seed: u64) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            seed,
        }
    }
}

/// A federation's LoRA adapter: what both sides need to build the same model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank `r` of every adapter.
    pub rank: usize,
    /// Scale numerator: the adapter adds `(alpha / rank)·B·A`.
    pub alpha: f64,
    /// Dropout on the adapter's input while training (the base path has none of its own).
    pub dropout: f64,
    /// Module-name suffixes that get an adapter ([`TARGETABLE`]).
    pub target_modules: Vec<String>,
    /// Seed of A (the federation's `model.init_seed`).
    pub seed: u64,
}

impl LoraConfig {
    /// `alpha / rank`, the factor on `B·A`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks every field (rank ≥ 1, alpha finite and positive, dropout in [0, 1), targets
    /// non-empty and in [`TARGETABLE`]).
    pub fn validate(&self) -> Result<(), LoraError> {
        let invalid = |field, reason: &str| Err(LoraError::Invalid { field, reason: reason.into() });
        if self.rank == 0 {
            return invalid("rank", "must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return invalid("alpha", "must be finite and positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return invalid("dropout", "must be in [0, 1)");
        }
        if self.target_modules.is_empty() {
            return invalid("target_modules", "must name at least one module");
        }
        if let Some(t) = self.target_modules.iter().find(|t| !TARGETABLE.contains(&t.as_str())) {
            return Err(LoraError::Invalid {
                field: "target_modules",
                reason: format!("`{t}` is not one of {TARGETABLE:?}"),
            });
        }
        Ok(())
    }

    /// Whether the linear layer `module` (path without `.weight`) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        matches!(TensorRole::of(module), TensorRole::EncoderLayer(_))
            && lora_part(module).is_none()
            && self.target_modules.iter().any(|t| module.ends_with(&format!(".{t}")))
    }

    /// The trainable rule under this adapter: every `lora_B` and the head (pooler and
    /// classifier, which train in every scope); base weights and `lora_A` are frozen.
    pub fn trains(name: &str) -> bool {
        match lora_part(name) {
            Some((_, part)) => part == LoraPart::B,
            None => matches!(TensorRole::of(name), TensorRole::Classifier | TensorRole::Pooler),
        }
    }

    /// The adapter tensors for a base model manifest: for each targeted 2-D `….weight`
    /// `[out, in]`, A `[r, in]` and B `[out, r]`, in natural order.
    pub fn adapter_specs(&self, base: &Manifest) -> Result<Vec<(TensorSpec, LoraPart)>, LoraError> {
        let mut specs = Vec::new();
        for t in &base.tensors {
            let Some(module) = t.name.strip_suffix(".weight") else { continue };
            if t.shape.len() != 2 || !self.targets(module) {
                continue;
            }
            let (out, inp) = (t.shape[0], t.shape[1]);
            specs.push((
                TensorSpec { name: lora_name(module, LoraPart::A), shape: vec![self.rank, inp] },
                LoraPart::A,
            ));
            specs.push((
                TensorSpec { name: lora_name(module, LoraPart::B), shape: vec![out, self.rank] },
                LoraPart::B,
            ));
        }
        if specs.is_empty() {
            return Err(LoraError::NoTargets(self.target_modules.clone()));
        }
        specs.sort_by(|a, b| natural_cmp(&a.0.name, &b.0.name));
        Ok(specs)
    }

    /// The values of the A tensor `a_name` of shape `[r, in]`: uniform on `±1/√in`, the
    /// distribution of `peft`'s default (Kaiming-uniform with `a = √5`), from a ChaCha20 stream
    /// keyed by the seed and the name, so each tensor's values depend on nothing else.
    pub fn init_a(&self, a_name: &str, shape: &[usize]) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"fedtune lora_A v1\0");
        ctx.update(&self.seed.to_le_bytes());
        ctx.update(a_name.as_bytes());
        let key: [u8; 32] = ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes");
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(key);
        let bound = 1.0 / (shape.get(1).copied().unwrap_or(1).max(1) as f64).sqrt();
        let n: usize = shape.iter().product();
        (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
    }

    /// `base` (a whole model, natural order) with every adapter added: A from
    /// [`Self::init_a`], B zero, so the model computes exactly what `base` does.
    pub fn with_adapters(&self, base: ParameterVector) -> Result<ParameterVector, LoraError> {
        let added = self.adapter_specs(base.manifest())?;
        let (manifest, values) = base.into_parts();
        // Each tensor's values: a range of the base buffer, or freshly made ones.
        type Source = Result<std::ops::Range<usize>, Vec<f32>>;
        let mut all: Vec<(TensorSpec, Source)> = manifest.ranges().map(|(t, r)| (t.clone(), Ok(r))).collect();
        for (spec, part) in added {
            let v = match part {
                LoraPart::A => self.init_a(&spec.name, &spec.shape),
                LoraPart::B => vec![0.0; spec.numel()],
            };
            all.push((spec, Err(v)));
        }
        all.sort_by(|a, b| natural_cmp(&a.0.name, &b.0.name));
        let mut out_values = Vec::with_capacity(values.len());
        let mut specs = Vec::with_capacity(all.len());
        for (spec, src) in all {
            match src {
                Ok(r) => out_values.extend_from_slice(&values[r]),
                Err(v) => out_values.extend_from_slice(&v),
            }
            specs.push(spec);
        }
        Ok(ParameterVector::new(Manifest::new(specs)?, out_values)?)
    }

    /// SHA-256 over every A of `model` in manifest order (little-endian f32): what a client
    /// compares its regenerated A with.
    pub fn a_digest(model: &ParameterVector) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for (spec, range) in model.manifest().ranges() {
            if matches!(lora_part(&spec.name), Some((_, LoraPart::A))) {
                ctx.update(spec.name.as_bytes());
                for v in &model.values()[range] {
                    ctx.update(&v.to_le_bytes());
                }
            }
        }
        ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
    }

    /// `model` without adapters, each targeted weight replaced by `W + (α/r)·B·A` (in f64,
    /// rounded once): a plain `BertForSequenceClassification`.
    pub fn merge(&self, model: &ParameterVector) -> Result<ParameterVector, LoraError> {
        let scaling = self.scaling();
        let mut specs = Vec::new();
        let mut values = Vec::with_capacity(model.values().len());
        for (spec, range) in model.manifest().ranges() {
            if lora_part(&spec.name).is_some() {
                continue;
            }
            let w = &model.values()[range];
            let module = spec.name.strip_suffix(".weight");
            let pair = module.and_then(|m| {
                Some((model.tensor(&lora_name(m, LoraPart::A))?, model.tensor(&lora_name(m, LoraPart::B))?))
            });
            match pair {
                Some((a, b)) if spec.shape.len() == 2 => {
                    let (out, inp, r) = (spec.shape[0], spec.shape[1], self.rank);
                    if a.len() != r * inp || b.len() != out * r {
                        return Err(LoraError::Invalid {
                            field: "rank",
                            reason: format!("the adapter of `{}` does not have rank {r}", spec.name),
                        });
                    }
                    for o in 0..out {
                        for i in 0..inp {
                            let ba: f64 =
                                (0..r).map(|k| f64::from(b[o * r + k]) * f64::from(a[k * inp + i])).sum();
                            values.push((f64::from(w[o * inp + i]) + scaling * ba) as f32);
                        }
                    }
                }
                _ => values.extend_from_slice(w),
            }
            specs.push(spec.clone());
        }
        Ok(ParameterVector::new(Manifest::new(specs)?, values)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LoraConfig {
        LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["query".into(), "value".into()],
            seed: 7,
        }
    }

    fn base() -> ParameterVector {
        let m = Manifest::new(vec![
            TensorSpec { name: "bert.encoder.layer.0.attention.self.key.weight".into(), shape: vec![3, 3] },
            TensorSpec { name: "bert.encoder.layer.0.attention.self.query.bias".into(), shape: vec![3] },
            TensorSpec { name: "bert.encoder.layer.0.attention.self.query.weight".into(), shape: vec![3, 3] },
            TensorSpec { name: "bert.encoder.layer.0.attention.self.value.weight".into(), shape: vec![3, 3] },
            TensorSpec { name: "bert.pooler.dense.weight".into(), shape: vec![3, 3] },
            TensorSpec { name: "classifier.weight".into(), shape: vec![2, 3] },
        ])
        .unwrap();
        let n = m.numel();
        ParameterVector::new(m, (0..n).map(|i| i as f32 / 10.0).collect()).unwrap()
    }

    #[test]
    fn adapters_follow_peft_names_and_shapes_and_only_b_and_the_head_train() {
        let with = config().with_adapters(base()).unwrap();
        let names: Vec<&str> = with.manifest().tensors.iter().map(|t| t.name.as_str()).collect();
        let q = "bert.encoder.layer.0.attention.self.query";
        assert!(names.contains(&format!("{q}.lora_A.weight").as_str()));
        assert_eq!(with.tensor(&format!("{q}.lora_B.weight")).unwrap(), &[0.0; 6]);
        assert_eq!(with.tensor(&format!("{q}.lora_A.weight")).unwrap().len(), 6);
        assert!(!names.iter().any(|n| n.contains("key.lora")), "key is not a target");
        let trained: Vec<&str> = names.iter().copied().filter(|n| LoraConfig::trains(n)).collect();
        assert_eq!(
            trained,
            [
                "bert.encoder.layer.0.attention.self.query.lora_B.weight",
                "bert.encoder.layer.0.attention.self.value.lora_B.weight",
                "bert.pooler.dense.weight",
                "classifier.weight"
            ]
        );
        assert_eq!(lora_part(&format!("{q}.lora_A.weight")), Some((q, LoraPart::A)));
    }

    #[test]
    fn a_depends_only_on_the_seed_and_the_name_and_lies_in_the_kaiming_bound() {
        let a = config().init_a("x.lora_A.weight", &[2, 16]);
        assert_eq!(a, config().init_a("x.lora_A.weight", &[2, 16]));
        assert_ne!(a, config().init_a("y.lora_A.weight", &[2, 16]));
        assert_ne!(a, LoraConfig { seed: 8, ..config() }.init_a("x.lora_A.weight", &[2, 16]));
        assert!(a.iter().all(|v| v.abs() <= 0.25), "bound 1/sqrt(16)");
    }

    #[test]
    fn merging_adds_the_scaled_product_and_drops_the_adapters() {
        let mut with = config().with_adapters(base()).unwrap();
        let b_name = "bert.encoder.layer.0.attention.self.query.lora_B.weight";
        let (b_range, a_vals) = {
            let r = with.manifest().ranges().find(|(t, _)| t.name == b_name).unwrap().1;
            (r, with.tensor("bert.encoder.layer.0.attention.self.query.lora_A.weight").unwrap().to_vec())
        };
        let b_vals = [1.0f32, 0.0, 0.0, 1.0, 0.5, 0.5];
        with.values_mut()[b_range].copy_from_slice(&b_vals);
        let merged = config().merge(&with).unwrap();
        assert_eq!(merged.manifest(), base().manifest());
        let w = base().tensor("bert.encoder.layer.0.attention.self.query.weight").unwrap().to_vec();
        let m = merged.tensor("bert.encoder.layer.0.attention.self.query.weight").unwrap();
        for o in 0..3 {
            for i in 0..3 {
                let ba: f64 =
                    (0..2).map(|k| f64::from(b_vals[o * 2 + k]) * f64::from(a_vals[k * 3 + i])).sum();
                assert!((f64::from(m[o * 3 + i]) - (f64::from(w[o * 3 + i]) + 2.0 * ba)).abs() < 1e-6);
            }
        }
        let v = "bert.encoder.layer.0.attention.self.value.weight";
        assert_eq!(merged.tensor(v), base().tensor(v), "B = 0 leaves the weight as it was");
    }

    #[test]
    fn invalid_descriptions_name_their_field() {
        let bad = |c: LoraConfig| match c.validate() {
            Err(LoraError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(bad(LoraConfig { rank: 0, ..config() }), "rank");
        assert_eq!(bad(LoraConfig { alpha: f64::NAN, ..config() }), "alpha");
        assert_eq!(bad(LoraConfig { dropout: 1.0, ..config() }), "dropout");
        assert_eq!(bad(LoraConfig { target_modules: vec!["dense".into()], ..config() }), "target_modules");
        assert_eq!(bad(LoraConfig { target_modules: vec![], ..config() }), "target_modules");
        assert!(config().validate().is_ok());
    }

    #[test]
    fn the_a_digest_changes_with_any_a() {
        let with = config().with_adapters(base()).unwrap();
        let other = LoraConfig { seed: 8, ..config() }.with_adapters(base()).unwrap();
        assert_ne!(LoraConfig::a_digest(&with), LoraConfig::a_digest(&other));
        assert_eq!(LoraConfig::a_digest(&with), LoraConfig::a_digest(&with.clone()));
    }
}
