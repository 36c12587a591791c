//! [`ModelCache`] against a coordinator in memory that serves one version: its f32 weights,
//! and the 8-bit step that defines it from the version before when the request names that one.
//! What is checked is what the cache hands the trainer, what it asked for, and what it received.

use std::sync::Mutex;

use bytes::Bytes;
use fedtune_shared::bert::initial::{self, InitialSpec};
use fedtune_shared::bert::lora::LoraConfig;
use fedtune_shared::chunk::payload_digest;
use fedtune_shared::compression::{apply_delta, Int8Encoder, MODEL_STEP_BOUND};
use fedtune_shared::ids::{ModelVersion, Sha256};
use fedtune_shared::params::{Manifest, ParameterVector};
use fedtune_shared::round::*;
use fedtune_shared::secagg::{
    AwaitedStep, KeyAdvertisement, RoundContext, RoundUnmaskAnswer, ShareUpload, StepInput,
};
use futures::stream::{self, BoxStream, StreamExt};

use super::download::{InitialSource, ModelCache};
use crate::transport::{ApiError, CoordinatorApi, DownloadStream};

fn tiny_bert() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert")
}

fn labels() -> Vec<String> {
    ["negative", "neutral", "positive"].map(String::from).to_vec()
}

/// The head of the tiny checkpoint: what a federation training `train_top_layers = 0` would
/// not be, but enough tensors to tell two models apart.
fn head(params: &ParameterVector) -> Manifest {
    params.manifest().subset(|n| n.starts_with("classifier.") || n.starts_with("bert.pooler."))
}

fn version_0() -> ParameterVector {
    let spec = InitialSpec { labels: &labels(), num_labels: None, init_seed: 42, lora: None };
    let model = initial::load_initial(&tiny_bert(), &spec).unwrap();
    initial::select(&model.params, &head(&model.params)).unwrap()
}

fn lora() -> LoraConfig {
    use fedtune_shared::bert::lora;
    LoraConfig {
        rank: lora::DEFAULT_RANK,
        alpha: lora::DEFAULT_ALPHA,
        dropout: lora::DEFAULT_DROPOUT,
        target_modules: lora::DEFAULT_TARGETS.map(String::from).to_vec(),
        seed: 42,
    }
}

fn model_ref(version: u64, weights: &ParameterVector) -> ModelRef {
    let digest = Sha256(weights.manifest().digest());
    ModelRef {
        version: ModelVersion(version),
        full_manifest: digest,
        full_payload: payload_digest(weights),
        trainable_manifest: digest,
        trainable_payload: payload_digest(weights),
    }
}

/// Serves `weights` in f32, and `step` (from its base version) to a request naming that base,
/// from the request's offset; the first stream breaks after `break_after` bytes if set.
#[derive(Debug)]
struct Serving {
    weights: ParameterVector,
    step: Option<(ModelVersion, Vec<u8>)>,
    requests: Mutex<Vec<DownloadRequest>>,
    break_after: Mutex<Option<usize>>,
}

impl Serving {
    fn new(weights: ParameterVector, step: Option<(ModelVersion, Vec<u8>)>) -> Self {
        Self { weights, step, requests: Mutex::default(), break_after: Mutex::default() }
    }

    fn offsets(&self) -> Vec<u64> {
        self.requests.lock().unwrap().iter().map(|r| r.offset).collect()
    }

    fn bases_asked(&self) -> Vec<Option<ModelVersion>> {
        self.requests.lock().unwrap().iter().map(|r| r.base_version).collect()
    }
}

fn not_scripted<T>() -> Result<T, ApiError> {
    Err(ApiError::Invalid("only downloads are scripted here".into()))
}

impl CoordinatorApi for Serving {
    async fn download(&self, request: DownloadRequest) -> Result<DownloadStream, ApiError> {
        self.requests.lock().unwrap().push(request);
        let step = self.step.as_ref().filter(|(base, _)| request.base_version == Some(*base));
        let (bytes, encoding) = match step {
            Some((base, bytes)) => (bytes.clone(), ModelEncoding::Int8Delta { base: *base }),
            None => (self.weights.to_le_bytes(), ModelEncoding::F32),
        };
        // As the coordinator does: a step asked for but not served comes whole.
        let start =
            if step.is_none() && request.base_version.is_some() { 0 } else { request.offset as usize };
        let header = DownloadItem::Header(ModelHeader {
            version: request.version,
            scope: request.scope,
            manifest: self.weights.manifest().clone(),
            total_bytes: bytes.len() as u64,
            payload_digest: Sha256::of(&bytes),
            start_offset: start as u64,
            encoding,
        });
        let cut = self.break_after.lock().unwrap().take();
        let end = cut.map_or(bytes.len(), |c| c.min(bytes.len()));
        let chunk = Chunk { offset: start as u64, data: Bytes::copy_from_slice(&bytes[start..end]) };
        let mut items = vec![Ok(header), Ok(DownloadItem::Chunk(chunk))];
        if cut.is_some() {
            items.push(Err(ApiError::Unavailable("stream reset".into())));
        }
        Ok(stream::iter(items).boxed())
    }

    async fn join(&self, _: JoinRequest) -> Result<JoinResponse, ApiError> {
        not_scripted()
    }
    async fn wait_for_task(&self, _: std::time::Duration) -> Result<Task, ApiError> {
        not_scripted()
    }
    async fn heartbeat(&self, _: Heartbeat) -> Result<HeartbeatReply, ApiError> {
        not_scripted()
    }
    async fn upload(&self, _: BoxStream<'static, UploadItem>) -> Result<UploadReceipt, ApiError> {
        not_scripted()
    }
    async fn upload_masked(
        &self,
        _: [u8; 32],
        _: BoxStream<'static, UploadItem>,
    ) -> Result<UploadReceipt, ApiError> {
        not_scripted()
    }
    async fn advertise_keys(&self, _: KeyAdvertisement) -> Result<(), ApiError> {
        not_scripted()
    }
    async fn send_shares(&self, _: ShareUpload) -> Result<(), ApiError> {
        not_scripted()
    }
    async fn await_secagg_step(
        &self,
        _: &RoundContext,
        _: AwaitedStep,
        _: std::time::Duration,
    ) -> Result<StepInput, ApiError> {
        not_scripted()
    }
    async fn answer_unmask(&self, _: RoundUnmaskAnswer) -> Result<(), ApiError> {
        not_scripted()
    }
    async fn report_evaluation(&self, _: EvalReport) -> Result<(), ApiError> {
        not_scripted()
    }
    async fn report_failure(&self, _: FailureReport) -> Result<(), ApiError> {
        not_scripted()
    }
    async fn leave(&self) -> Result<(), ApiError> {
        not_scripted()
    }
    async fn status(&self, _: u32) -> Result<StatusReport, ApiError> {
        not_scripted()
    }
}

fn source(init_seed: u64) -> InitialSource {
    InitialSource { dir: tiny_bert(), labels: labels(), init_seed, lora: None }
}

/// `w + decode(encode(step))` with `step` a small move of every value, and the encoded step.
fn next_version(w: &ParameterVector, encoder_seed: u64) -> (ParameterVector, Vec<u8>) {
    let step: Vec<f32> = (0..w.values().len()).map(|i| ((i % 13) as f32 - 6.0) * 1e-3).collect();
    let bytes = Int8Encoder::seeded_for_tests(encoder_seed).encode(&step, MODEL_STEP_BOUND).unwrap();
    let values = apply_delta(w.values(), &bytes).unwrap();
    (ParameterVector::new(w.manifest().clone(), values).unwrap(), bytes)
}

/// A cache that downloaded `v0` (version 0, f32) whole: the base a step applies to.
async fn cache_holding_version_0(v0: &ParameterVector) -> ModelCache {
    let mut cache = ModelCache::default();
    cache.fetch(&Serving::new(v0.clone(), None), &model_ref(0, v0), v0.manifest(), 1 << 20).await.unwrap();
    cache
}

#[tokio::test]
async fn version_0_is_rebuilt_from_the_local_model_folder_and_nothing_is_downloaded_when_the_digests_match() {
    let v0 = version_0();
    let api = Serving::new(v0.clone(), None);
    let mut cache = ModelCache::default();
    cache.rebuild_initial_from(source(42));
    let got = cache.fetch(&api, &model_ref(0, &v0), v0.manifest(), 1 << 20).await.unwrap();
    assert_eq!(*got, v0);
    assert!(api.bases_asked().is_empty(), "no download");
    assert_eq!(cache.bytes_received(), 0);
}

#[tokio::test]
async fn version_0_is_downloaded_when_the_rebuilt_weights_hash_otherwise() {
    let mut v0 = version_0();
    // The coordinator's model folder differs from this client's by one value.
    v0.values_mut()[0] += 1.0;
    let api = Serving::new(v0.clone(), None);
    let mut cache = ModelCache::default();
    cache.rebuild_initial_from(source(42));
    let got = cache.fetch(&api, &model_ref(0, &v0), v0.manifest(), 1 << 20).await.unwrap();
    assert_eq!(*got, v0);
    assert_eq!(api.bases_asked(), [None], "one f32 download");
    assert_eq!(cache.bytes_received(), v0.manifest().byte_len() as u64);
}

#[tokio::test]
async fn a_step_download_rebuilds_the_published_weights_bit_for_bit_from_the_version_held() {
    let v0 = version_0();
    let (v1, step) = next_version(&v0, 1);
    let mut cache = cache_holding_version_0(&v0).await;
    let received = cache.bytes_received();
    let api = Serving::new(v1.clone(), Some((ModelVersion(0), step.clone())));
    let got = cache.fetch(&api, &model_ref(1, &v1), v1.manifest(), 1 << 20).await.unwrap();
    let bits = |w: &ParameterVector| w.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&v1));
    assert_eq!(api.bases_asked(), [Some(ModelVersion(0))]);
    assert_eq!(cache.bytes_received() - received, step.len() as u64, "only the step travelled");
    assert!(step.len() * 3 < v1.manifest().byte_len(), "a step is about a quarter of the f32 bytes");
}

#[tokio::test]
async fn a_step_that_does_not_give_the_announced_weights_is_refused_and_the_f32_weights_are_downloaded() {
    let v0 = version_0();
    let (v1, _) = next_version(&v0, 1);
    // Another rounding of the same step: intact bytes, but not the version the reference names.
    let (_, other_step) = next_version(&v0, 2);
    let mut cache = cache_holding_version_0(&v0).await;
    let api = Serving::new(v1.clone(), Some((ModelVersion(0), other_step)));
    let got = cache.fetch(&api, &model_ref(1, &v1), v1.manifest(), 1 << 20).await.unwrap();
    assert_eq!(*got, v1);
    assert_eq!(api.bases_asked(), [Some(ModelVersion(0)), None], "the step, then the f32 weights");
}

#[tokio::test]
async fn a_client_without_the_previous_version_gets_the_f32_weights() {
    let v0 = version_0();
    let (v1, step) = next_version(&v0, 1);
    let (v2, _) = next_version(&v1, 3);
    let mut cache = cache_holding_version_0(&v0).await;
    // v2's step starts from v1, which this client skipped.
    let api = Serving::new(v2.clone(), Some((ModelVersion(1), step)));
    let got = cache.fetch(&api, &model_ref(2, &v2), v2.manifest(), 1 << 20).await.unwrap();
    assert_eq!(*got, v2);
    assert_eq!(api.bases_asked(), [Some(ModelVersion(0))]);
    assert_eq!(cache.bytes_received(), 2 * v0.manifest().byte_len() as u64);
}

#[tokio::test]
async fn a_lora_federations_version_0_is_rebuilt_with_its_adapter() {
    let spec = InitialSpec { labels: &labels(), num_labels: None, init_seed: 42, lora: Some(&lora()) };
    let model = initial::load_initial(&tiny_bert(), &spec).unwrap();
    let trainable = model.params.manifest().subset(LoraConfig::trains);
    assert!(trainable.tensors.iter().any(|t| t.name.ends_with("lora_B.weight")), "{trainable:?}");
    let v0 = initial::select(&model.params, &trainable).unwrap();
    let api = Serving::new(v0.clone(), None);
    let mut cache = ModelCache::default();
    cache.rebuild_initial_from(InitialSource { lora: Some(lora()), ..source(42) });
    let got = cache.fetch(&api, &model_ref(0, &v0), &trainable, 1 << 20).await.unwrap();
    assert_eq!(*got, v0);
    assert!(api.bases_asked().is_empty(), "no download");
}

#[tokio::test]
async fn a_broken_step_download_resumes_from_its_offset_and_still_rebuilds_the_version() {
    let v0 = version_0();
    let (v1, step) = next_version(&v0, 1);
    let mut cache = cache_holding_version_0(&v0).await;
    let received = cache.bytes_received();
    let api = Serving::new(v1.clone(), Some((ModelVersion(0), step.clone())));
    *api.break_after.lock().unwrap() = Some(260);
    let broken = cache.fetch(&api, &model_ref(1, &v1), v1.manifest(), 1 << 20).await;
    assert!(matches!(broken, Err(ApiError::Unavailable(_))), "{broken:?}");
    let got = cache.fetch(&api, &model_ref(1, &v1), v1.manifest(), 1 << 20).await.unwrap();
    assert_eq!(*got, v1);
    assert_eq!(api.offsets(), [0, 260]);
    assert_eq!(api.bases_asked(), [Some(ModelVersion(0)); 2], "the resumed download is the step's");
    assert_eq!(cache.bytes_received() - received, step.len() as u64, "each byte once");
}

#[tokio::test]
async fn a_step_broken_off_and_lost_to_a_coordinator_restart_is_replaced_by_the_f32_weights_whole() {
    let v0 = version_0();
    let (v1, step) = next_version(&v0, 1);
    let mut cache = cache_holding_version_0(&v0).await;
    let before = Serving::new(v1.clone(), Some((ModelVersion(0), step)));
    *before.break_after.lock().unwrap() = Some(260);
    assert!(cache.fetch(&before, &model_ref(1, &v1), v1.manifest(), 1 << 20).await.is_err());
    // The restarted coordinator publishes the same v1 from its checkpoint, without the step.
    let after = Serving::new(v1.clone(), None);
    let got = cache.fetch(&after, &model_ref(1, &v1), v1.manifest(), 1 << 20).await.unwrap();
    assert_eq!(*got, v1);
    assert_eq!((after.offsets(), after.bases_asked()), (vec![260], vec![Some(ModelVersion(0))]));
}
