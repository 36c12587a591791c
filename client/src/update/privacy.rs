//! The differential-privacy stages of the upload pipeline: clip (L2), then noise.
//!
//! What each fit task's [`PrivacyInstructions`] ask for (the mechanism and its proof are in the
//! [`fedtune_shared::privacy`] docs):
//!
//! | mode          | stages                               |
//! |---------------|--------------------------------------|
//! | `None`        | range check                          |
//! | `Central`     | clip → range check                   |
//! | `Local`       | clip → noise (full σ) → range check  |
//! | `Distributed` | clip → noise (share σ) → range check |
//!
//! Under secure aggregation (the task has a secure round) the f32 noise stage never runs; the
//! update is clipped to the round's `C` and encoded for the ring ([`RingEncoder`]), which adds the
//! client's discrete Gaussian share σ_grid there, on the integers the coordinator only ever sees
//! summed:
//!
//! | mode          | stages (secure round)                         |
//! |---------------|-----------------------------------------------|
//! | `None`        | clip → ring (σ_grid as the task says)          |
//! | `Central`     | clip → ring (σ_grid as the task says)          |
//! | `Local`       | refused: local noise is not summed securely   |
//! | `Distributed` | clip → ring (σ_grid > 0 required)             |
//!
//! A secure update reports no clipping indicator: it would leave the client alone, unsummed,
//! while its noise is only a share.
//!
//! The range check comes last under DP: whether it passes is visible to the coordinator (a
//! failure report, a missing update), so it must see only what the mechanism protects. A raw
//! delta with one huge coordinate is clipped like any other; the check then only catches what
//! clipping cannot fix (NaN, or a bound `C` beyond the coordinator's value range), and the
//! coordinator hears `update_out_of_range`, never the value or its index.
//!
//! The clip stage scales the whole update (or each tensor, with equal shares of `C²`) so that its
//! L2 norm is at most `C` for the values actually sent ([`clip_l2`] checks the f32 result). Under
//! adaptive clipping it reports the centred indicator (+½ if the update was within `C`, −½ if it
//! was clipped), noised on the grid ½ℤ when the client adds noise.
//!
//! A private update must not carry unprotected side information, so the clip stage also
//! replaces the update's metrics with the indicator alone (no pre-clip norm) and reports one
//! example (DP weighs every client 1; the real count is private). The agent leaves training
//! metrics out of a private upload for the same reason.
//!
//! The noise stage rounds to the grid `2^k` the coordinator announced and adds exact discrete
//! Gaussian noise from a generator keyed by the operating system's CSPRNG, a fresh one per task.

use std::sync::Arc;

use fedtune_shared::privacy::{
    add_noise, clip_l2, clip_per_layer, default_grid_log2, AdaptiveClip, LayerBudget, NoiseSource,
};
use fedtune_shared::round::{PrivacyInstructions, PrivacyMode};
use fedtune_shared::secagg::SecureTask;

use super::{
    CheckRange, PipelineFactory, PreparedUpdate, RingEncoder, TaskContext, UpdateError, UpdatePipeline,
    UpdateStage,
};

pub use fedtune_shared::privacy::CLIP_INDICATOR_METRIC;

/// Clips the update to `clip_norm` (see the module docs).
#[derive(Debug)]
pub struct ClipStage {
    clip_norm: f64,
    per_layer: bool,
    indicator: Option<IndicatorNoise>,
}

/// How the clipping indicator is reported.
#[derive(Debug)]
struct IndicatorNoise {
    sigma: f64,
    source: Arc<NoiseSource>,
}

impl ClipStage {
    /// Clips to `clip_norm` (> 0), tensor by tensor with `per_layer`.
    pub fn new(clip_norm: f64, per_layer: bool) -> Result<Self, UpdateError> {
        if !(clip_norm.is_finite() && clip_norm > 0.0) {
            return Err(UpdateError::Unsupported(format!(
                "clip norm {clip_norm} must be finite and positive"
            )));
        }
        Ok(Self { clip_norm, per_layer, indicator: None })
    }

    /// Also reports the centred clipping indicator, with discrete Gaussian noise of std `sigma`
    /// (0: exact) drawn from `source`.
    pub fn with_indicator(mut self, sigma: f64, source: Arc<NoiseSource>) -> Self {
        self.indicator = Some(IndicatorNoise { sigma, source });
        self
    }
}

impl UpdateStage for ClipStage {
    fn name(&self) -> &'static str {
        "clip"
    }

    fn apply(&mut self, update: &mut PreparedUpdate) -> Result<(), UpdateError> {
        let refuse = |reason: String| UpdateError::Refused { stage: "clip", reason };
        let norm_before = if self.per_layer {
            let manifest = update.delta.manifest().clone();
            clip_per_layer(update.delta.values_mut(), &manifest, self.clip_norm, &LayerBudget::Equal)
                .map_err(|e| refuse(e.to_string()))?
                .norm_before
        } else {
            clip_l2(update.delta.values_mut(), self.clip_norm).norm_before
        };
        update.metrics.clear();
        if update.num_examples > 0 {
            update.num_examples = 1;
        }
        if let Some(ind) = &self.indicator {
            let centred = if norm_before <= self.clip_norm { 0.5 } else { -0.5 };
            let value = if ind.sigma > 0.0 {
                // AdaptiveClip's sampler adds N_ℤ noise on the grid ½ℤ; only σ matters here.
                let helper = AdaptiveClip::new(self.clip_norm, 0.5, 1.0, ind.sigma)
                    .map_err(|e| refuse(e.to_string()))?;
                helper
                    .noise_indicator_sum(centred, ind.sigma, &ind.source)
                    .map_err(|e| refuse(e.to_string()))?
            } else {
                centred
            };
            update.metrics.insert(CLIP_INDICATOR_METRIC, value);
        }
        Ok(())
    }
}

/// Adds discrete Gaussian noise of std `sigma` on the grid `2^grid_log2`.
#[derive(Debug)]
pub struct NoiseStage {
    sigma: f64,
    grid_log2: Option<i32>,
    clip_norm: f64,
    source: Arc<NoiseSource>,
}

impl NoiseStage {
    /// Noise of std `sigma` on the grid `2^grid_log2` (`None`: the default grid for
    /// `clip_norm` and the update's size).
    pub fn new(sigma: f64, grid_log2: Option<i32>, clip_norm: f64, source: Arc<NoiseSource>) -> Self {
        Self { sigma, grid_log2, clip_norm, source }
    }
}

impl UpdateStage for NoiseStage {
    fn name(&self) -> &'static str {
        "noise"
    }

    fn apply(&mut self, update: &mut PreparedUpdate) -> Result<(), UpdateError> {
        let refuse = |reason: String| UpdateError::Refused { stage: "noise", reason };
        let k = match self.grid_log2 {
            Some(k) => k,
            None => default_grid_log2(self.clip_norm, update.delta.values().len())
                .map_err(|e| refuse(e.to_string()))?,
        };
        add_noise(update.delta.values_mut(), self.sigma, k, &self.source)
            .map_err(|e| refuse(e.to_string()))?;
        Ok(())
    }
}

/// Pipelines for every privacy mode (see the table in the module docs). Each private task gets
/// a fresh [`NoiseSource`] keyed by the operating system's CSPRNG.
#[derive(Debug, Clone, Copy, Default)]
pub struct DpPipelines;

impl DpPipelines {
    /// The stages for `privacy` with noise from `source`, then a range check against
    /// ±`max_abs_update_value` (the coordinator's bound) on the privatized update.
    pub fn stages(
        privacy: &PrivacyInstructions,
        max_abs_update_value: f32,
        source: Arc<NoiseSource>,
    ) -> Result<UpdatePipeline, UpdateError> {
        let p = privacy;
        if p.mode == PrivacyMode::None {
            return Ok(UpdatePipeline::checked(max_abs_update_value));
        }
        let mut clip = ClipStage::new(p.clip_norm, p.per_layer_clipping)?;
        if p.report_clip_indicator {
            clip = clip.with_indicator(p.indicator_noise_stddev, Arc::clone(&source));
        }
        let pipeline = UpdatePipeline::new(vec![]).with_stage(clip);
        let check = CheckRange::after_privacy(max_abs_update_value);
        match p.mode {
            PrivacyMode::Central => Ok(pipeline.with_stage(check)),
            PrivacyMode::Local | PrivacyMode::Distributed => {
                if !(p.noise_stddev.is_finite() && p.noise_stddev > 0.0) {
                    return Err(UpdateError::Unsupported(format!(
                        "privacy mode {:?} with noise σ = {}: client-side noise must be positive",
                        p.mode, p.noise_stddev
                    )));
                }
                Ok(pipeline
                    .with_stage(NoiseStage::new(p.noise_stddev, p.grid_log2, p.clip_norm, source))
                    .with_stage(check))
            }
            PrivacyMode::None => Ok(UpdatePipeline::checked(max_abs_update_value)),
        }
    }
}

impl DpPipelines {
    /// The stages of a secure round's update (see the module docs): clip to the round's `C`,
    /// then the ring encoding with the task's σ_grid; never the f32 noise stage.
    pub fn secure_stages(
        privacy: &PrivacyInstructions,
        secure: &SecureTask,
        source: Arc<NoiseSource>,
    ) -> Result<UpdatePipeline, UpdateError> {
        let encoding = secure
            .encoding()
            .map_err(|e| UpdateError::Unsupported(format!("the secure round's encoding: {e}")))?;
        match privacy.mode {
            PrivacyMode::Local => {
                return Err(UpdateError::Unsupported(
                    "local noise under secure aggregation: the task asks for the full σ per client \
                     and a masked sum at once"
                        .into(),
                ))
            }
            PrivacyMode::Distributed if !(encoding.sigma_grid().is_finite() && encoding.sigma_grid() > 0.0) => {
                return Err(UpdateError::Unsupported(format!(
                    "distributed noise with a noise share of σ_grid = {}: each client's share must be positive",
                    encoding.sigma_grid()
                )))
            }
            _ => {}
        }
        let per_layer = privacy.mode != PrivacyMode::None && privacy.per_layer_clipping;
        let clip = ClipStage::new(encoding.clip_norm(), per_layer)?;
        Ok(UpdatePipeline::new(vec![])
            .with_stage(clip)
            .with_ring_encoding(RingEncoder::new(encoding, source)))
    }
}

impl PipelineFactory for DpPipelines {
    fn build(&self, task: &TaskContext) -> Result<UpdatePipeline, UpdateError> {
        if let Some(secure) = &task.secure {
            // Fresh per task even without DP: randomized rounding draws from it too.
            let source =
                NoiseSource::from_os_entropy().map_err(|e| UpdateError::Unsupported(e.to_string()))?;
            return Self::secure_stages(&task.privacy, secure, Arc::new(source));
        }
        if task.privacy.mode == PrivacyMode::None {
            return Ok(UpdatePipeline::checked(task.max_abs_update_value));
        }
        let source = NoiseSource::from_os_entropy().map_err(|e| UpdateError::Unsupported(e.to_string()))?;
        Self::stages(&task.privacy, task.max_abs_update_value, Arc::new(source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_shared::ids::{ClientId, RoundId};
    use fedtune_shared::limits::MAX_ABS_UPDATE_VALUE;
    use fedtune_shared::params::{Manifest, ParameterVector, TensorSpec};
    use fedtune_shared::privacy::l2_norm_upper_bound;

    fn vectors(n: usize, value: f32) -> (ParameterVector, ParameterVector) {
        let m = Manifest::new(vec![
            TensorSpec { name: "a".into(), shape: vec![n / 2] },
            TensorSpec { name: "b".into(), shape: vec![n - n / 2] },
        ])
        .unwrap();
        (ParameterVector::zeros(m.clone()), ParameterVector::new(m, vec![value; n]).unwrap())
    }

    fn instructions(mode: PrivacyMode, sigma: f64) -> PrivacyInstructions {
        PrivacyInstructions { mode, clip_norm: 1.0, noise_stddev: sigma, ..PrivacyInstructions::NONE }
    }

    fn context(privacy: PrivacyInstructions) -> TaskContext {
        TaskContext {
            client_id: ClientId::parse("site-1").unwrap(),
            round: RoundId::new(1, 0),
            privacy,
            max_abs_update_value: MAX_ABS_UPDATE_VALUE,
            secure: None,
        }
    }

    #[test]
    fn each_mode_gets_its_stages_in_order() {
        let names =
            |mode, sigma| DpPipelines.build(&context(instructions(mode, sigma))).unwrap().stage_names();
        assert_eq!(names(PrivacyMode::None, 0.0), vec!["range"]);
        assert_eq!(names(PrivacyMode::Central, 0.0), vec!["clip", "range"]);
        assert_eq!(names(PrivacyMode::Local, 0.5), vec!["clip", "noise", "range"]);
        assert_eq!(names(PrivacyMode::Distributed, 0.1), vec!["clip", "noise", "range"]);
        assert!(DpPipelines.build(&context(instructions(PrivacyMode::Local, 0.0))).is_err());
    }

    #[test]
    fn a_central_update_leaves_clipped_with_one_example_and_no_side_information() {
        let (global, local) = vectors(1000, 0.5);
        let mut p = DpPipelines.build(&context(instructions(PrivacyMode::Central, 0.0))).unwrap();
        let out = p.prepare(1, &global, &local, 250).unwrap();
        assert!(l2_norm_upper_bound(out.delta.values()) <= 1.0);
        assert!(out.delta.l2_norm() > 0.999, "clipping keeps the update on the ball, not inside it");
        assert_eq!(out.num_examples, 1);
        assert!(out.metrics.is_empty(), "{:?}", out.metrics);
    }

    #[test]
    fn under_dp_a_huge_raw_value_is_clipped_before_the_range_check_and_a_failure_names_no_value() {
        let (global, mut local) = vectors(10, 0.0);
        local.values_mut()[3] = 5000.0;
        // Clipped to norm 1 first: the raw value never meets the range check.
        let mut central = DpPipelines.build(&context(instructions(PrivacyMode::Central, 0.0))).unwrap();
        let out = central.prepare(1, &global, &local, 1).unwrap();
        assert!(l2_norm_upper_bound(out.delta.values()) <= 1.0);
        // What clipping cannot fix (a bound C beyond the coordinator's value range) is refused,
        // and the coordinator hears the code alone.
        local.values_mut()[3] = 600.0;
        let wide = PrivacyInstructions { clip_norm: 1000.0, ..instructions(PrivacyMode::Central, 0.0) };
        let err = DpPipelines.build(&context(wide)).unwrap().prepare(1, &global, &local, 1).unwrap_err();
        assert_eq!(err.failure_code(), fedtune_shared::round::FailureCode::UpdateOutOfRange, "{err}");
        assert!(err.to_string().contains("600"), "the site's own log keeps the detail: {err}");
        assert_eq!(err.failure_code().reason(true, &err.to_string()), "update_out_of_range");
    }

    #[test]
    fn per_layer_clipping_bounds_the_whole_update() {
        let (global, local) = vectors(1000, 0.5);
        let privacy =
            PrivacyInstructions { per_layer_clipping: true, ..instructions(PrivacyMode::Central, 0.0) };
        let out = DpPipelines.build(&context(privacy)).unwrap().prepare(1, &global, &local, 3).unwrap();
        assert!(l2_norm_upper_bound(out.delta.values()) <= 1.0);
    }

    #[test]
    fn local_noise_has_the_announced_standard_deviation() {
        let n = 200_000;
        let (global, local) = vectors(n, 0.0);
        let sigma = 0.05;
        let mut p = DpPipelines::stages(
            &instructions(PrivacyMode::Local, sigma),
            MAX_ABS_UPDATE_VALUE,
            Arc::new(NoiseSource::seeded_for_tests(7)),
        )
        .unwrap();
        let out = p.prepare(1, &global, &local, 10).unwrap();
        let values = out.delta.values();
        let mean = values.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (f64::from(*v) - mean).powi(2)).sum::<f64>() / n as f64;
        // 200k samples: the sample std is within ~0.3% of σ with overwhelming probability.
        assert!((var.sqrt() / sigma - 1.0).abs() < 0.01, "std {} vs σ {sigma}", var.sqrt());
        assert!(mean.abs() < 5.0 * sigma / (n as f64).sqrt());
    }

    #[test]
    fn the_clipping_indicator_says_whether_the_update_was_clipped() {
        let source = Arc::new(NoiseSource::seeded_for_tests(1));
        let privacy =
            PrivacyInstructions { report_clip_indicator: true, ..instructions(PrivacyMode::Central, 0.0) };
        let mut p = DpPipelines::stages(&privacy, MAX_ABS_UPDATE_VALUE, Arc::clone(&source)).unwrap();
        let (global, big) = vectors(100, 1.0);
        let (_, small) = vectors(100, 0.01);
        assert_eq!(p.prepare(1, &global, &big, 1).unwrap().metrics[CLIP_INDICATOR_METRIC], -0.5);
        assert_eq!(p.prepare(1, &global, &small, 1).unwrap().metrics[CLIP_INDICATOR_METRIC], 0.5);
        let noisy = PrivacyInstructions { indicator_noise_stddev: 3.0, ..privacy };
        let mut p = DpPipelines::stages(
            &PrivacyInstructions { mode: PrivacyMode::Local, noise_stddev: 0.1, ..noisy },
            MAX_ABS_UPDATE_VALUE,
            source,
        )
        .unwrap();
        let values: Vec<f64> = (0..50)
            .map(|_| p.prepare(1, &global, &small, 1).unwrap().metrics[CLIP_INDICATOR_METRIC])
            .collect();
        assert!(values.iter().any(|v| *v != 0.5), "the indicator is noised under local noise");
        assert!(values.iter().all(|v| (v * 2.0).fract() == 0.0), "noise stays on the grid ½ℤ");
    }

    fn secure_task(n: usize, sigma_grid: f64) -> Arc<SecureTask> {
        use fedtune_shared::crypto::KeyPair;
        use fedtune_shared::secagg::RoundSetup;
        let members = (0..3)
            .map(|i| {
                let id = ClientId::parse(&format!("site-{i}")).unwrap();
                (id, KeyPair::generate_ephemeral().unwrap().public_key())
            })
            .collect();
        Arc::new(SecureTask {
            setup: RoundSetup {
                federation_id: "fed".into(),
                round: 1,
                attempt: 0,
                members,
                threshold: 2,
                degree: 2,
                graph_seed: [0; 32],
                vector_len: n,
            },
            grid_log2: -10,
            clip_norm: 1.0,
            noise_sigma_grid: sigma_grid,
            max_wrap_probability: 1e-9,
        })
    }

    fn secure_context(mode: PrivacyMode, secure: Arc<SecureTask>) -> TaskContext {
        TaskContext { secure: Some(secure), ..context(instructions(mode, 0.1)) }
    }

    #[test]
    fn under_secure_aggregation_distributed_noise_is_added_in_the_ring_and_never_to_the_f32_delta() {
        let n = 100_000;
        let sigma_grid = 8.0;
        let secure = secure_task(n, sigma_grid);
        let names =
            DpPipelines.build(&secure_context(PrivacyMode::Distributed, Arc::clone(&secure))).unwrap();
        assert_eq!(names.stage_names(), vec!["clip", "ring"]);
        let mut pipeline = DpPipelines::secure_stages(
            &instructions(PrivacyMode::Distributed, 0.1),
            &secure,
            Arc::new(NoiseSource::seeded_for_tests(3)),
        )
        .unwrap();
        // A zero update: what reaches the ring is the noise alone, σ_grid grid steps wide.
        let (global, local) = vectors(n, 0.0);
        let prepared = pipeline.prepare(1, &global, &local, 5).unwrap();
        assert!(prepared.delta.values().iter().all(|v| *v == 0.0), "no f32 noise before the ring");
        let ring = pipeline.encode_for_ring(prepared).unwrap();
        assert_eq!((ring.words.len(), ring.num_examples), (n, 1));
        let ints = fedtune_shared::secagg::encoding::from_ring(&ring.words);
        let var = ints.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
        assert!((var.sqrt() / sigma_grid - 1.0).abs() < 0.02, "std {} vs σ_grid {sigma_grid}", var.sqrt());
    }

    #[test]
    fn under_secure_aggregation_without_noise_the_ring_holds_the_rounded_clipped_update() {
        let n = 1000;
        let secure = secure_task(n, 0.0);
        for mode in [PrivacyMode::None, PrivacyMode::Central] {
            let mut pipeline = DpPipelines.build(&secure_context(mode, Arc::clone(&secure))).unwrap();
            let (global, local) = vectors(n, 0.5);
            let prepared = pipeline.prepare(1, &global, &local, 7).unwrap();
            let ring = pipeline.encode_for_ring(prepared).unwrap();
            // Clipped to C = 1 (each value 1/√n), then rounded to the grid 2^-10 one way or the other.
            let want = 1.0 / (n as f64).sqrt() * 1024.0;
            let ints = fedtune_shared::secagg::encoding::from_ring(&ring.words);
            assert!(ints.iter().all(|v| (*v as f64 - want).abs() < 1.0), "{mode:?}: {:?}", &ints[..4]);
        }
    }

    #[test]
    fn secure_aggregation_refuses_local_noise_and_a_distributed_task_without_a_noise_share() {
        let secure = secure_task(10, 0.0);
        let local = DpPipelines.build(&secure_context(PrivacyMode::Local, Arc::clone(&secure))).unwrap_err();
        assert!(local.to_string().contains("local noise under secure aggregation"), "{local}");
        let silent = DpPipelines.build(&secure_context(PrivacyMode::Distributed, secure)).unwrap_err();
        assert!(silent.to_string().contains("σ_grid = 0"), "{silent}");
        // An agent without the ring encoding refuses a secure task rather than sending it plain.
        let plain =
            crate::update::PlainPipelines.build(&secure_context(PrivacyMode::None, secure_task(10, 0.0)));
        assert!(plain.is_err());
    }
}
