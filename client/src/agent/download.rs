//! Downloading: fetch the trainable tensors of a published model, resumably, digest-checked.
//!
//! Clients train the coordinator's trainable tensors only; the frozen rest of the model comes
//! from the client's local model folder and never changes between versions, so the agent
//! downloads `TRAINABLE` scope for every version it needs, and often less than that:
//!
//! - Version 0 is rebuilt from the local model folder when the coordinator sent its
//!   `init_seed` ([`fedtune_shared::bert::initial`], the coordinator's own construction), and
//!   used only if its digest is the one the task's `ModelRef` announces; otherwise it is
//!   downloaded like any version.
//! - Holding version v − 1, the agent asks for the 8-bit step to v (`base_version`); a
//!   federation that publishes steps (`model.download_encoding = "int8_delta"`) sends it, and
//!   the weights are `apply_delta(w_{v−1}, step)` ([`fedtune_shared::compression::apply_delta`]),
//!   checked against the `ModelRef`'s digest. Any other answer is the f32 weights.
//!
//! A broken stream keeps the bytes received so far: the next attempt (after backoff) asks for
//! the rest from that offset, and the SHA-256 is carried across, so the digest announced in the
//! header is checked over the whole reassembled payload. Nothing is handed to the trainer until
//! the weights hash to the digest in the task's `ModelRef`.

use std::path::PathBuf;
use std::sync::Arc;

use fedtune_shared::bert::initial::{self, InitialSpec};
use fedtune_shared::bert::lora::LoraConfig;
use fedtune_shared::chunk::{ChunkTracker, PayloadView, Sha256Stream, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
use fedtune_shared::compression::apply_delta;
use fedtune_shared::ids::{ModelVersion, Sha256};
use fedtune_shared::params::{Manifest, ParameterVector};
use fedtune_shared::round::{DownloadItem, DownloadRequest, ModelEncoding, ModelRef, ModelScope};
use futures::StreamExt;

use fedtune_shared::round::ClientActivity;

use super::heartbeat::supervise;
use super::{Agent, AgentError, State, Work};
use crate::transport::{ApiError, CoordinatorApi};

/// Bytes of an interrupted download, kept to resume it.
#[derive(Debug)]
struct Partial {
    version: ModelVersion,
    /// The `ModelRef` digest of the weights this download is for.
    target: Sha256,
    /// What the header of the first attempt announced: the encoding and the payload's digest.
    announced: Option<(ModelEncoding, Sha256)>,
    bytes: Vec<u8>,
    /// SHA-256 state over `bytes`, so resuming need not re-hash them.
    hasher: Sha256Stream,
}

impl Partial {
    fn new(version: ModelVersion, target: Sha256) -> Self {
        Self { version, target, announced: None, bytes: Vec::new(), hasher: Sha256Stream::default() }
    }
}

/// What, besides a local model folder, fixes version 0: the coordinator's labels, `init_seed`
/// and adapter, as joined.
#[derive(Debug, Clone, PartialEq)]
pub struct InitialSource {
    /// The client's copy of the base model (`config.json`, `model.safetensors`).
    pub dir: PathBuf,
    /// Class names, in id order.
    pub labels: Vec<String>,
    /// The federation's `model.init_seed`.
    pub init_seed: u64,
    /// The federation's LoRA adapter, if any.
    pub lora: Option<LoraConfig>,
}

/// The trainable weights of the latest model version the agent fetched, plus an interrupted
/// download in progress.
#[derive(Debug, Default)]
pub struct ModelCache {
    current: Option<(ModelVersion, Arc<ParameterVector>)>,
    partial: Option<Partial>,
    /// Payload bytes received over all downloads, complete or not.
    received: u64,
    /// Where version 0 can be rebuilt from; taken by the first try.
    initial: Option<InitialSource>,
}

impl ModelCache {
    /// The cached weights if they are `version`.
    pub fn get(&self, version: ModelVersion) -> Option<Arc<ParameterVector>> {
        self.current.as_ref().filter(|(v, _)| *v == version).map(|(_, w)| Arc::clone(w))
    }

    /// Payload bytes received over all downloads so far (a resumed download counts each byte
    /// once).
    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// Lets the next fetch of version 0 rebuild it from `source` instead of downloading it.
    pub fn rebuild_initial_from(&mut self, source: InitialSource) {
        self.initial = Some(source);
    }

    /// Fetches the trainable tensors of `model` from the cache, by rebuilding version 0, or by
    /// a download (the 8-bit step from the version held, when the coordinator has one) that
    /// resumes an interrupted one of the same version.
    pub async fn fetch<C: CoordinatorApi>(
        &mut self,
        api: &C,
        model: &ModelRef,
        trainable: &Manifest,
        chunk_bytes: u64,
    ) -> Result<Arc<ParameterVector>, ApiError> {
        if let Some(hit) = self.get(model.version) {
            return Ok(hit);
        }
        if trainable.digest() != model.trainable_manifest.0 {
            return Err(ApiError::Protocol(format!(
                "model {} announces a trainable manifest other than the one this session trains",
                model.version
            )));
        }
        if model.version == ModelVersion(0) {
            if let Some(source) = self.initial.take() {
                match rebuild_initial(source, trainable.clone(), model.trainable_payload).await {
                    Ok(weights) => {
                        tracing::info!(model = %model.version, "model rebuilt from the local model folder; nothing downloaded");
                        return Ok(self.keep(model.version, weights));
                    }
                    Err(why) => {
                        tracing::info!(model = %model.version, %why, "cannot rebuild the model locally; downloading it")
                    }
                }
            }
        }
        let mut steps = true;
        loop {
            let base = self.current.clone().filter(|_| steps);
            match self.download(api, model, trainable, chunk_bytes, base).await? {
                Fetched::Weights(weights) => return Ok(self.keep(model.version, weights)),
                Fetched::StepMismatch(why) => {
                    tracing::warn!(model = %model.version, %why, "the 8-bit step does not give the announced weights; downloading them in f32");
                    steps = false;
                }
            }
        }
    }

    fn keep(&mut self, version: ModelVersion, weights: ParameterVector) -> Arc<ParameterVector> {
        let weights = Arc::new(weights);
        self.current = Some((version, Arc::clone(&weights)));
        weights
    }

    /// One download, resuming the partial one of the same version if any. `base` is the
    /// version held, whose step the coordinator may send.
    async fn download<C: CoordinatorApi>(
        &mut self,
        api: &C,
        model: &ModelRef,
        trainable: &Manifest,
        chunk_bytes: u64,
        base: Option<(ModelVersion, Arc<ParameterVector>)>,
    ) -> Result<Fetched, ApiError> {
        let mut partial = match self.partial.take() {
            Some(p) if p.version == model.version && p.target == model.trainable_payload => p,
            _ => Partial::new(model.version, model.trainable_payload),
        };
        // Ask for a step when starting afresh or resuming one; an f32 download resumes as f32.
        let ask_base = match partial.announced {
            Some((ModelEncoding::F32, _)) => None,
            Some((ModelEncoding::Int8Delta { base: b }, _)) => {
                base.as_ref().map(|(v, _)| *v).filter(|v| *v == b)
            }
            None => base.as_ref().map(|(v, _)| *v),
        };
        if partial.announced.is_some_and(|(e, _)| e != ModelEncoding::F32) && ask_base.is_none() {
            partial = Partial::new(model.version, model.trainable_payload);
        }
        let before = partial.bytes.len() as u64;
        let mut received = 0;
        let result =
            download_into(api, model, trainable, chunk_bytes, ask_base, &mut partial, &mut received).await;
        self.received += received;
        if let Err(e) = result {
            if !partial.bytes.is_empty() && e.is_transient() {
                tracing::info!(model = %model.version, held = partial.bytes.len(), "download interrupted; will resume");
                self.partial = Some(partial);
            }
            return Err(e);
        }
        let Some((encoding, digest)) = partial.announced else {
            return Err(ApiError::Protocol("download completed without a header".into()));
        };
        let total = partial.bytes.len() as u64;
        let actual = partial.hasher.finish();
        if actual != digest {
            // Start over next time: these bytes are not what the header announced.
            return Err(ApiError::DataLoss(format!(
                "model {} payload hashes to {actual}, expected {digest}",
                model.version
            )));
        }
        let weights = match encoding {
            ModelEncoding::F32 => ParameterVector::from_le_bytes(trainable.clone(), &partial.bytes)
                .map_err(|e| ApiError::Protocol(e.to_string()))?,
            ModelEncoding::Int8Delta { base: b } => {
                let Some((_, held)) = base.filter(|(v, _)| *v == b) else {
                    return Err(ApiError::Protocol(format!(
                        "the coordinator sent a step from {b}, which this client does not hold"
                    )));
                };
                let values = match apply_delta(held.values(), &partial.bytes) {
                    Ok(values) => values,
                    Err(e) => return Ok(Fetched::StepMismatch(e.to_string())),
                };
                let rebuilt = PayloadView::whole(&values).digest();
                if rebuilt != model.trainable_payload {
                    return Ok(Fetched::StepMismatch(format!(
                        "{} + step hashes to {rebuilt}, the model reference says {}",
                        b, model.trainable_payload
                    )));
                }
                ParameterVector::new(trainable.clone(), values)
                    .map_err(|e| ApiError::Protocol(e.to_string()))?
            }
        };
        let encoding = match encoding {
            ModelEncoding::F32 => "f32".to_string(),
            ModelEncoding::Int8Delta { base } => format!("int8 step from {base}"),
        };
        tracing::info!(model = %model.version, bytes = total, resumed_from = before, %encoding, "model downloaded");
        Ok(Fetched::Weights(weights))
    }
}

/// What one complete download gave.
enum Fetched {
    /// The weights of the version asked for, digest-checked.
    Weights(ParameterVector),
    /// An 8-bit step arrived intact but does not rebuild the announced weights.
    StepMismatch(String),
}

/// Version 0's trainable tensors built from the local model folder, if they hash to `expected`.
async fn rebuild_initial(
    source: InitialSource,
    trainable: Manifest,
    expected: Sha256,
) -> Result<ParameterVector, String> {
    let build = move || -> Result<ParameterVector, String> {
        let spec = InitialSpec {
            labels: &source.labels,
            num_labels: None,
            init_seed: source.init_seed,
            lora: source.lora.as_ref(),
        };
        let model = initial::load_initial(&source.dir, &spec).map_err(|e| e.to_string())?;
        let weights = initial::select(&model.params, &trainable).map_err(|e| e.to_string())?;
        let actual = PayloadView::whole(weights.values()).digest();
        if actual != expected {
            return Err(format!(
                "the rebuilt weights hash to {actual}, the coordinator announced {expected}"
            ));
        }
        Ok(weights)
    };
    tokio::task::spawn_blocking(build).await.map_err(|e| format!("rebuild task: {e}"))?
}

/// Streams the rest of the payload into `partial`, checking every header field and chunk;
/// `received` counts the payload bytes that arrived.
async fn download_into<C: CoordinatorApi>(
    api: &C,
    model: &ModelRef,
    trainable: &Manifest,
    chunk_bytes: u64,
    base_version: Option<ModelVersion>,
    partial: &mut Partial,
    received: &mut u64,
) -> Result<(), ApiError> {
    let offset = partial.bytes.len() as u64;
    let request = DownloadRequest {
        version: model.version,
        scope: ModelScope::Trainable,
        offset,
        max_chunk_bytes: Some(chunk_bytes.clamp(MIN_CHUNK_BYTES as u64, MAX_CHUNK_BYTES as u64) as u32),
        base_version,
    };
    let mut stream = api.download(request).await?;
    let header = match stream.next().await {
        Some(Ok(DownloadItem::Header(h))) => h,
        Some(Ok(DownloadItem::Chunk(_))) => {
            return Err(ApiError::Protocol("download began without a header".into()))
        }
        Some(Err(e)) => return Err(e),
        None => return Err(ApiError::Unavailable("download stream ended before its header".into())),
    };
    let bad = |what: String| Err(ApiError::Protocol(format!("download header: {what}")));
    if header.version != model.version || header.scope != ModelScope::Trainable {
        return bad(format!(
            "got {} {:?}, asked for {} trainable",
            header.version, header.scope, model.version
        ));
    }
    if &header.manifest != trainable {
        return bad("manifest differs from the session's trainable manifest".into());
    }
    match header.encoding {
        ModelEncoding::F32 if header.payload_digest != model.trainable_payload => {
            return bad("payload digest differs from the task's model reference".into());
        }
        ModelEncoding::Int8Delta { base } if Some(base) != base_version => {
            return bad(format!("a step from {base}, asked for one from {base_version:?}"));
        }
        _ => {}
    }
    let announced = (header.encoding, header.payload_digest);
    if partial.announced.is_some_and(|a| a != announced) {
        // Another payload than the one resumed (a step the coordinator no longer has, after a
        // restart): what we hold is of no use, and the coordinator sends this one whole.
        if header.start_offset != 0 {
            return bad("another payload than the one resumed, not from its start".into());
        }
        *partial = Partial::new(partial.version, partial.target);
    }
    let offset = partial.bytes.len() as u64;
    let expected = header.encoding.payload_bytes(trainable.numel());
    if header.total_bytes != expected || header.start_offset != offset {
        return bad(format!(
            "{} bytes from offset {}, expected {expected} from {offset}",
            header.total_bytes, header.start_offset
        ));
    }
    partial.announced = Some(announced);
    partial.bytes.reserve_exact(header.total_bytes as usize - partial.bytes.len());
    // Order and size are checked by a tracker; the digest by our own hasher, which already
    // covers the bytes of earlier attempts.
    let mut tracker = ChunkTracker::new(header.total_bytes, offset);
    while let Some(item) = stream.next().await {
        match item? {
            DownloadItem::Chunk(chunk) => {
                tracker.accept(chunk.offset, &chunk.data).map_err(|e| ApiError::Protocol(e.to_string()))?;
                partial.hasher.update(&chunk.data);
                partial.bytes.extend_from_slice(&chunk.data);
                *received += chunk.data.len() as u64;
            }
            DownloadItem::Header(_) => {
                return Err(ApiError::Protocol("a second header in one download".into()))
            }
        }
    }
    if !tracker.is_complete() {
        return Err(ApiError::Unavailable(format!(
            "download stream ended at byte {} of {}",
            tracker.position(),
            tracker.total()
        )));
    }
    Ok(())
}

impl<C: CoordinatorApi + 'static> Agent<C> {
    /// Downloading: fetch the model `work` needs, then train or evaluate it.
    pub(super) async fn download(&mut self, work: Work) -> Result<State, AgentError> {
        let Some(session) = self.session.clone() else { return Ok(State::Connecting) };
        let model = match &work {
            Work::Fit { task, .. } => task.model,
            Work::Evaluate { task, .. } => task.model,
        };
        let chunk = session.limits.chunk_bytes();
        let supervision = self.supervision(ClientActivity::Downloading, &work, None);
        let fetched =
            supervise(supervision, self.cache.fetch(self.api.as_ref(), &model, &session.trainable, chunk))
                .await;
        Ok(match fetched {
            Ok(Ok(weights)) => {
                self.stats.bytes_downloaded = self.cache.bytes_received();
                self.contact();
                match work {
                    Work::Fit { task, deadline } => State::Training { task, deadline, global: weights },
                    Work::Evaluate { task, deadline } => {
                        State::Evaluating { task, deadline, global: weights }
                    }
                }
            }
            Ok(Err(e)) => {
                self.stats.bytes_downloaded = self.cache.bytes_received();
                let retry = State::Downloading(work.clone());
                return self.on_error(e, retry, Some(&work)).await;
            }
            Err(stop) => self.stopped(stop, State::Downloading(work)).await,
        })
    }
}
