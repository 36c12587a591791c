//! The upload pipeline: from locally trained weights to the update that leaves the machine.
//!
//! ```text
//! local, global ─► delta = local − global ─► stage ─► stage ─► … ─► PreparedUpdate ─► upload
//!                                            (check finite, clip (L2), noise (DP))
//! ```
//!
//! Computing the delta is fixed; everything after it is an ordered list of [`UpdateStage`]s, so
//! that differential privacy (clip, then noise) plugs in as stages without the agent changing.
//! Order matters and is the caller's to choose: clipping must precede noise. Signing is not a
//! stage: the signature covers the upload header and the session's federation and client id,
//! which only the transport knows, so `identity::sign_upload_stream` signs the trailer there.
//! The plain pipeline ([`UpdatePipeline::checked`]) only checks that every value is finite and
//! within the bound the coordinator advertised at join (`JoinResponse.limits.max_abs_update_value`):
//! a diverged client must not poison the global model, and the coordinator would reject the
//! upload anyway, after it was streamed.
//!
//! Which stages a task needs depends on its privacy instructions, so the agent asks a
//! [`PipelineFactory`] for a fresh pipeline per fit task. [`PlainPipelines`] serves tasks without
//! privacy and refuses the others: an agent that cannot clip and noise must not upload a raw
//! update that the federation believes is private.
//!
//! [`privacy::DpPipelines`] serves every privacy mode (clip, then noise; see [`privacy`]).
//!
//! When the task asks for 8-bit updates (`FitInstructions::update_encoding`, the federation's
//! `fit.update_encoding = "int8"`), the pipeline ends in [`Int8Encoding`]
//! ([`UpdatePipeline::with_update_encoding`]): after every stage, so after the range check and,
//! under DP, after clip and noise (post-processing), the delta is encoded into the
//! `INT8_BLOCK` payload that is uploaded instead of the f32 values.
//!
//! In a secure round ([`TaskContext::secure`]) the pipeline ends in a [`RingEncoder`] instead:
//! [`UpdatePipeline::encode_for_ring`] turns the clipped f32 delta into the round's `u32` ring
//! vector (randomized rounding, exact norm check, the client's share of discrete Gaussian noise)
//! and drops the f32 values; the agent then masks that vector in place. Which of the two a task
//! gets is decided in one place, [`privacy::DpPipelines`].
//!
//! The pipeline runs on the agent's trainer thread: noising or hashing 10⁸ values is CPU work
//! that must stay off the async reactor.

pub mod privacy;

use std::collections::BTreeMap;
use std::sync::Arc;

use fedtune_shared::compression::{Int8Encoder, UpdateEncoding};
use fedtune_shared::ids::{ClientId, RoundId, Sha256};
use fedtune_shared::params::{Manifest, ParameterVector, ParamsError};
use fedtune_shared::privacy::NoiseSource;
use fedtune_shared::round::{FailureCode, PrivacyInstructions, PrivacyMode};
use fedtune_shared::secagg::{Encoding, SecureTask};

/// Why an update could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Local and global weights do not describe the same tensors.
    #[error("local weights do not match the global model: {0}")]
    Mismatch(#[source] ParamsError),
    /// The task asks for a transformation this agent does not have (e.g. a privacy mode).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A stage refused the update.
    #[error("stage `{stage}` refused the update: {reason}")]
    Refused {
        /// The stage's name.
        stage: &'static str,
        /// Why.
        reason: String,
    },
}

impl UpdateError {
    /// The code the coordinator is told (the detail stays in the site's log under DP).
    pub fn failure_code(&self) -> FailureCode {
        match self {
            UpdateError::Refused { stage: CheckRange::NAME, .. } => FailureCode::UpdateOutOfRange,
            _ => FailureCode::UpdateRefused,
        }
    }
}

/// An update on its way out: the (possibly clipped, noised) delta plus what travels with it.
#[derive(Debug, Clone)]
pub struct PreparedUpdate {
    /// Federated round the update belongs to.
    pub round: u64,
    /// `local − global` over the trainable tensors, as transformed by the stages so far.
    pub delta: ParameterVector,
    /// Training examples behind the update (its FedAvg weight).
    pub num_examples: u64,
    /// Figures stages record for logs and the coordinator's metrics, e.g. `l2_norm` before
    /// clipping; keyed by a stable name so adding a stage never changes the struct.
    pub metrics: BTreeMap<&'static str, f64>,
    /// The `INT8_BLOCK` payload, when the task asked for 8-bit updates: made from `delta` by
    /// the pipeline's last step ([`UpdatePipeline::with_update_encoding`]); `None`: the payload
    /// is `delta` as little-endian f32.
    pub int8: Option<Arc<Vec<u8>>>,
}

impl PreparedUpdate {
    /// The payload's encoding.
    pub fn encoding(&self) -> UpdateEncoding {
        if self.int8.is_some() {
            UpdateEncoding::Int8
        } else {
            UpdateEncoding::F32
        }
    }

    /// Bytes of the payload as uploaded.
    pub fn payload_len(&self) -> u64 {
        self.encoding().payload_bytes(self.delta.manifest().numel())
    }

    /// SHA-256 of the payload as uploaded (the trailer's digest).
    pub fn payload_digest(&self) -> Sha256 {
        match &self.int8 {
            Some(bytes) => Sha256::of(bytes),
            None => fedtune_shared::chunk::payload_digest(&self.delta),
        }
    }
}

/// The 8-bit encoding step (`fedtune_shared::compression`): the last of a pipeline, after
/// clipping, noise and the range check, so under DP it is post-processing of the privatized
/// update. Its rounding draws from a ChaCha20 generator keyed from the OS, one per pipeline.
#[derive(Debug)]
pub struct Int8Encoding {
    encoder: Int8Encoder,
    max_abs: f32,
}

impl Int8Encoding {
    /// The step's name in logs.
    pub const NAME: &'static str = "int8";

    /// Encodes with an OS-seeded generator under the coordinator's value bound `max_abs`.
    pub fn new(max_abs: f32) -> Result<Self, UpdateError> {
        let encoder = Int8Encoder::from_os_entropy()
            .map_err(|e| UpdateError::Refused { stage: Self::NAME, reason: e.to_string() })?;
        Ok(Self { encoder, max_abs })
    }

    fn apply(&mut self, update: &mut PreparedUpdate) -> Result<(), UpdateError> {
        let bytes = self
            .encoder
            .encode(update.delta.values(), self.max_abs)
            .map_err(|e| UpdateError::Refused { stage: Self::NAME, reason: e.to_string() })?;
        update.int8 = Some(Arc::new(bytes));
        Ok(())
    }
}

/// A secure round's update: the clipped delta encoded into the ring, one `u32` per coordinate,
/// ready to be masked in place. The f32 delta is gone by then.
#[derive(Debug)]
pub struct RingUpdate {
    /// Federated round the update belongs to.
    pub round: u64,
    /// The tensors the words cover, in order (the upload header names its digest).
    pub manifest: Manifest,
    /// The encoded (later: masked) vector.
    pub words: Vec<u32>,
    /// The update's weight as the stages left it (1: a secure sum is unweighted).
    pub num_examples: u64,
    /// Figures the stages recorded.
    pub metrics: BTreeMap<&'static str, f64>,
}

/// The last step of a secure round's pipeline: [`Encoding::encode`] with noise from `source`.
#[derive(Debug)]
pub struct RingEncoder {
    encoding: Encoding,
    source: Arc<NoiseSource>,
}

impl RingEncoder {
    /// Encodes with `encoding` (whose σ_grid is this client's noise share) drawing from `source`.
    pub fn new(encoding: Encoding, source: Arc<NoiseSource>) -> Self {
        Self { encoding, source }
    }

    /// The encoding this encoder applies.
    pub fn encoding(&self) -> &Encoding {
        &self.encoding
    }
}

/// One transformation or check of an outgoing update.
///
/// `&mut self` because real stages carry state (a noise generator, a key); `Send` because the
/// pipeline moves onto the trainer's blocking thread.
pub trait UpdateStage: Send + std::fmt::Debug {
    /// Short stable name for logs and errors (`"clip"`, `"noise"`).
    fn name(&self) -> &'static str;
    /// Transforms or checks `update` in place; an error abandons the upload.
    fn apply(&mut self, update: &mut PreparedUpdate) -> Result<(), UpdateError>;
}

/// Refuses deltas holding NaN, infinity or values beyond ±`max_abs` (the bound the
/// coordinator advertised), and records the delta's L2 norm (`l2_norm`), which a clipping
/// stage placed after it compares with its bound.
///
/// Under differential privacy the check runs last, on the clipped and noised update
/// ([`CheckRange::after_privacy`]): its verdict leaves the site (as a failure report, or as the
/// absence of an update), so it must be a function of what the mechanism protects, never of the
/// raw delta; and it records no norm there.
#[derive(Debug, Clone, Copy)]
pub struct CheckRange {
    max_abs: f32,
    measure: bool,
}

impl CheckRange {
    /// The stage's name, also what [`UpdateError::failure_code`] recognises.
    pub const NAME: &'static str = "range";

    /// A check against ±`max_abs` (the coordinator's `max_abs_update_value`).
    pub fn new(max_abs: f32) -> Self {
        Self { max_abs, measure: true }
    }

    /// The check at the end of a private pipeline: the same bound, no `l2_norm` metric.
    pub fn after_privacy(max_abs: f32) -> Self {
        Self { max_abs, measure: false }
    }
}

impl UpdateStage for CheckRange {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn apply(&mut self, update: &mut PreparedUpdate) -> Result<(), UpdateError> {
        let refuse = |reason: String| UpdateError::Refused { stage: Self::NAME, reason };
        let max_abs = self.max_abs;
        // A NaN bound would let every value through the comparison below.
        if !fedtune_shared::limits::is_valid_value_bound(max_abs) {
            return Err(refuse(format!("the coordinator's update value bound {max_abs} is unusable")));
        }
        update.delta.ensure_finite().map_err(|e| refuse(e.to_string()))?;
        if let Some(i) = update.delta.values().iter().position(|v| v.abs() > max_abs) {
            return Err(refuse(format!(
                "value {} at flat index {i} exceeds the coordinator's bound ±{max_abs}",
                update.delta.values()[i]
            )));
        }
        if self.measure {
            update.metrics.insert("l2_norm", update.delta.l2_norm());
        }
        Ok(())
    }
}

/// The ordered stages an update passes through after the delta is computed.
#[derive(Debug)]
pub struct UpdatePipeline {
    stages: Vec<Box<dyn UpdateStage>>,
    ring: Option<RingEncoder>,
    int8: Option<Int8Encoding>,
}

impl UpdatePipeline {
    /// The pipeline without privacy: only [`CheckRange`] against ±`max_abs`.
    pub fn checked(max_abs: f32) -> Self {
        Self { stages: vec![Box::new(CheckRange::new(max_abs))], ring: None, int8: None }
    }

    /// A pipeline with exactly `stages`, in order.
    pub fn new(stages: Vec<Box<dyn UpdateStage>>) -> Self {
        Self { stages, ring: None, int8: None }
    }

    /// Ends the pipeline in the upload encoding the task asked for: nothing more for `f32`,
    /// the 8-bit encoding under the value bound `max_abs` for `int8`. Refused on a secure
    /// round's pipeline, whose upload is its ring encoding.
    pub fn with_update_encoding(
        mut self,
        encoding: UpdateEncoding,
        max_abs: f32,
    ) -> Result<Self, UpdateError> {
        match encoding {
            UpdateEncoding::F32 => self.int8 = None,
            UpdateEncoding::Int8 if self.ring.is_some() => {
                return Err(UpdateError::Unsupported(
                    "int8 updates cannot be used in a secure round (its upload is the ring encoding)".into(),
                ))
            }
            UpdateEncoding::Int8 => self.int8 = Some(Int8Encoding::new(max_abs)?),
        }
        Ok(self)
    }

    /// Ends the pipeline in the ring encoding of a secure round (see the module docs).
    pub fn with_ring_encoding(mut self, encoder: RingEncoder) -> Self {
        self.ring = Some(encoder);
        self
    }

    /// The ring encoder, if this pipeline serves a secure round.
    pub fn ring_encoder(&self) -> Option<&RingEncoder> {
        self.ring.as_ref()
    }

    /// Appends a stage (e.g. clip, then noise).
    pub fn with_stage(mut self, stage: impl UpdateStage + 'static) -> Self {
        self.stages.push(Box::new(stage));
        self
    }

    /// Names of the stages in order, for the start-up log.
    pub fn stage_names(&self) -> Vec<&'static str> {
        let ring = self.ring.as_ref().map(|_| "ring");
        let int8 = self.int8.as_ref().map(|_| Int8Encoding::NAME);
        self.stages.iter().map(|s| s.name()).chain(ring).chain(int8).collect()
    }

    /// A secure round's last step: encodes `update` (which [`UpdatePipeline::prepare`] made)
    /// for the ring and drops its f32 values. Refused with [`UpdateError::Refused`] (stage
    /// `ring`) when the encoding refuses it (wrong length, non-finite value, norm bound), and
    /// with [`UpdateError::Unsupported`] by a pipeline that does not serve a secure round.
    pub fn encode_for_ring(&self, update: PreparedUpdate) -> Result<RingUpdate, UpdateError> {
        let Some(ring) = &self.ring else {
            return Err(UpdateError::Unsupported("this pipeline does not encode for a secure round".into()));
        };
        let PreparedUpdate { round, delta, num_examples, metrics, .. } = update;
        let (manifest, values) = delta.into_parts();
        let words = ring
            .encoding
            .encode(&values, &ring.source)
            .map_err(|e| UpdateError::Refused { stage: "ring", reason: e.to_string() })?;
        drop(values);
        Ok(RingUpdate { round, manifest, words, num_examples, metrics })
    }

    /// Computes `local − global` and runs every stage over it.
    ///
    /// `global` may hold more tensors than `local` (a partially fine-tuned model): the delta covers
    /// exactly `local`'s tensors, so frozen tensors never travel.
    pub fn prepare(
        &mut self,
        round: u64,
        global: &ParameterVector,
        local: &ParameterVector,
        num_examples: u64,
    ) -> Result<PreparedUpdate, UpdateError> {
        let delta = delta(global, local)?;
        let mut update = PreparedUpdate { round, delta, num_examples, metrics: BTreeMap::new(), int8: None };
        for stage in &mut self.stages {
            stage.apply(&mut update)?;
        }
        if let Some(int8) = &mut self.int8 {
            int8.apply(&mut update)?;
        }
        Ok(update)
    }
}

/// What a [`PipelineFactory`] knows about the fit task it builds a pipeline for.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskContext {
    /// Our id at the coordinator.
    pub client_id: ClientId,
    /// Round and attempt of the task.
    pub round: RoundId,
    /// How the coordinator wants the update privatized.
    pub privacy: PrivacyInstructions,
    /// Largest `|value|` the coordinator accepts in an update (advertised at join).
    pub max_abs_update_value: f32,
    /// The task's secure round, if its update is summed under secure aggregation.
    pub secure: Option<Arc<SecureTask>>,
}

/// Builds the pipeline one fit task needs (clip and noise per its privacy instructions).
pub trait PipelineFactory: Send + Sync + std::fmt::Debug {
    /// A fresh pipeline for `task`, or [`UpdateError::Unsupported`] if this agent cannot
    /// honour the task's instructions.
    fn build(&self, task: &TaskContext) -> Result<UpdatePipeline, UpdateError>;
}

/// Pipelines for federations without client-side privacy: [`CheckRange`] only. Tasks that ask
/// for clipping or noise are refused rather than served with a raw update.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainPipelines;

impl PipelineFactory for PlainPipelines {
    fn build(&self, task: &TaskContext) -> Result<UpdatePipeline, UpdateError> {
        if task.secure.is_some() {
            return Err(UpdateError::Unsupported(
                "secure aggregation needs the ring encoding this agent was not built with".into(),
            ));
        }
        match task.privacy.mode {
            PrivacyMode::None => Ok(UpdatePipeline::checked(task.max_abs_update_value)),
            mode => Err(UpdateError::Unsupported(format!(
                "privacy mode {mode:?} (clip {} / noise σ {}) needs clipping and noise stages this agent was \
                 not built with",
                task.privacy.clip_norm, task.privacy.noise_stddev
            ))),
        }
    }
}

/// `local − global`, over `local`'s tensors (looked up by name and shape in `global`).
pub fn delta(global: &ParameterVector, local: &ParameterVector) -> Result<ParameterVector, UpdateError> {
    // The usual case (the global model is exactly what the client trains) subtracts in place of
    // first copying the matching part of a model-sized vector.
    let selected;
    let base = if global.manifest() == local.manifest() {
        global
    } else {
        selected = global.select(local.manifest()).map_err(UpdateError::Mismatch)?;
        &selected
    };
    let values = local.values().iter().zip(base.values()).map(|(l, g)| l - g).collect();
    ParameterVector::new(local.manifest().clone(), values).map_err(UpdateError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_shared::limits::MAX_ABS_UPDATE_VALUE;
    use fedtune_shared::params::{Manifest, TensorSpec};

    fn spec(name: &str, n: usize) -> TensorSpec {
        TensorSpec { name: name.into(), shape: vec![n] }
    }

    #[test]
    fn the_delta_covers_only_the_trained_tensors() {
        let global = ParameterVector::new(
            Manifest::new(vec![spec("frozen", 2), spec("head", 3)]).unwrap(),
            vec![9.0, 9.0, 1.0, 2.0, 3.0],
        )
        .unwrap();
        let local =
            ParameterVector::new(Manifest::new(vec![spec("head", 3)]).unwrap(), vec![1.5, 2.0, 2.0]).unwrap();
        let d = delta(&global, &local).unwrap();
        assert_eq!(d.manifest(), local.manifest());
        assert_eq!(d.values(), &[0.5, 0.0, -1.0]);
    }

    #[test]
    fn a_local_tensor_the_global_model_lacks_is_a_mismatch() {
        let global = ParameterVector::zeros(Manifest::new(vec![spec("a", 2)]).unwrap());
        let local = ParameterVector::zeros(Manifest::new(vec![spec("b", 2)]).unwrap());
        assert!(matches!(delta(&global, &local), Err(UpdateError::Mismatch(_))));
    }

    #[test]
    fn the_default_pipeline_refuses_a_diverged_update_and_measures_a_healthy_one() {
        let m = Manifest::new(vec![spec("w", 2)]).unwrap();
        let global = ParameterVector::zeros(m.clone());
        let mut pipeline = UpdatePipeline::checked(MAX_ABS_UPDATE_VALUE);

        let ok = pipeline
            .prepare(4, &global, &ParameterVector::new(m.clone(), vec![3.0, 4.0]).unwrap(), 10)
            .unwrap();
        assert_eq!((ok.round, ok.num_examples), (4, 10));
        assert_eq!(ok.metrics["l2_norm"], 5.0);

        let bad = ParameterVector::new(m, vec![f32::NAN, 0.0]).unwrap();
        let err = pipeline.prepare(4, &global, &bad, 10).unwrap_err();
        assert!(matches!(err, UpdateError::Refused { stage: "range", .. }), "{err}");

        let huge = ParameterVector::new(global.manifest().clone(), vec![0.0, 2048.0]).unwrap();
        let err = pipeline.prepare(4, &global, &huge, 10).unwrap_err();
        assert!(err.to_string().contains("2048"), "{err}");
    }

    #[test]
    fn the_range_check_uses_the_bound_the_coordinator_advertised() {
        let m = Manifest::new(vec![spec("w", 1)]).unwrap();
        let global = ParameterVector::zeros(m.clone());
        // Beyond the coordinator's fixed-point range, though well within what an older client
        // build assumed (±1024): refused before a single byte is streamed.
        let local = ParameterVector::new(m, vec![300.0]).unwrap();
        let err = UpdatePipeline::checked(MAX_ABS_UPDATE_VALUE).prepare(1, &global, &local, 1).unwrap_err();
        assert!(err.to_string().contains("±256"), "{err}");
        // A coordinator advertising a tighter bound is obeyed.
        let small = ParameterVector::new(global.manifest().clone(), vec![2.0]).unwrap();
        assert!(UpdatePipeline::checked(1.0).prepare(1, &global, &small, 1).is_err());
        assert!(UpdatePipeline::checked(f32::NAN).prepare(1, &global, &small, 1).is_err());
    }

    #[test]
    fn plain_pipelines_refuse_tasks_that_ask_for_privacy() {
        let mut task = TaskContext {
            client_id: ClientId::parse("site-1").unwrap(),
            round: RoundId::new(1, 0),
            privacy: PrivacyInstructions::NONE,
            max_abs_update_value: MAX_ABS_UPDATE_VALUE,
            secure: None,
        };
        assert_eq!(PlainPipelines.build(&task).unwrap().stage_names(), vec!["range"]);
        task.privacy = PrivacyInstructions {
            mode: PrivacyMode::Local,
            clip_norm: 1.0,
            noise_stddev: 0.1,
            ..PrivacyInstructions::NONE
        };
        assert!(matches!(PlainPipelines.build(&task), Err(UpdateError::Unsupported(_))));
    }

    /// Scales the delta: a stand-in for a transforming stage, to check ordering.
    #[derive(Debug)]
    struct Scale(f32);
    impl UpdateStage for Scale {
        fn name(&self) -> &'static str {
            "scale"
        }
        fn apply(&mut self, update: &mut PreparedUpdate) -> Result<(), UpdateError> {
            update.delta.values_mut().iter_mut().for_each(|v| *v *= self.0);
            Ok(())
        }
    }

    #[test]
    fn an_int8_pipeline_encodes_after_every_stage_what_the_range_check_passed() {
        let m = Manifest::new(vec![spec("w", 300)]).unwrap();
        let global = ParameterVector::zeros(m.clone());
        let local = ParameterVector::new(m, (0..300).map(|i| i as f32 * 1e-3).collect()).unwrap();
        let mut pipeline = UpdatePipeline::new(vec![])
            .with_stage(Scale(2.0))
            .with_stage(CheckRange::new(MAX_ABS_UPDATE_VALUE))
            .with_update_encoding(UpdateEncoding::Int8, MAX_ABS_UPDATE_VALUE)
            .unwrap();
        assert_eq!(pipeline.stage_names(), vec!["scale", "range", "int8"]);
        let out = pipeline.prepare(1, &global, &local, 1).unwrap();
        assert_eq!(out.encoding(), UpdateEncoding::Int8);
        assert_eq!(out.payload_len(), 520);
        let bytes = out.int8.as_ref().unwrap();
        assert_eq!(out.payload_digest(), Sha256::of(bytes));
        // The encoded update is the scaled delta (the stage before it), within one step.
        let decoded = fedtune_shared::compression::decode(bytes, 300, MAX_ABS_UPDATE_VALUE).unwrap();
        let step = 2.0 * 0.299 / 127.0 * 1.001;
        assert!(decoded.iter().zip(out.delta.values()).all(|(d, x)| (d - x).abs() <= step));
        // The range check still refuses what it refused: nothing is encoded.
        let huge = ParameterVector::new(global.manifest().clone(), vec![300.0; 300]).unwrap();
        assert!(pipeline.prepare(1, &global, &huge, 1).is_err());
    }

    #[test]
    fn stages_run_in_the_order_they_were_added() {
        let m = Manifest::new(vec![spec("w", 1)]).unwrap();
        let global = ParameterVector::zeros(m.clone());
        let local = ParameterVector::new(m, vec![2.0]).unwrap();
        let mut pipeline =
            UpdatePipeline::new(vec![]).with_stage(Scale(3.0)).with_stage(CheckRange::new(256.0));
        assert_eq!(pipeline.stage_names(), vec!["scale", "range"]);
        let out = pipeline.prepare(1, &global, &local, 1).unwrap();
        // The range stage saw the scaled delta.
        assert_eq!(out.metrics["l2_norm"], 6.0);
    }
}
