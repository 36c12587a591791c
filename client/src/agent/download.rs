//! Downloading: fetch the trainable tensors of a published model, resumably, digest-checked.
//!
//! Clients train the coordinator's trainable tensors only; the frozen rest of the model comes
//! from the client's local model folder and never changes between versions, so the agent
//! downloads `TRAINABLE` scope for every version it needs.
//!
//! A broken stream keeps the bytes received so far: the next attempt (after backoff) asks for
//! the rest from that offset, and the SHA-256 is carried across, so the digest announced in the
//! header is checked over the whole reassembled payload. Nothing is handed to the trainer until
//! that digest and the one in the task's `ModelRef` both match.

use std::sync::Arc;

use fedtune_shared::chunk::{ChunkTracker, Sha256Stream, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
use fedtune_shared::ids::{ModelVersion, Sha256};
use fedtune_shared::params::{Manifest, ParameterVector};
use fedtune_shared::round::{DownloadItem, DownloadRequest, ModelRef, ModelScope};
use futures::StreamExt;

use fedtune_shared::round::ClientActivity;

use super::heartbeat::supervise;
use super::{Agent, AgentError, State, Work};
use crate::transport::{ApiError, CoordinatorApi};

/// Bytes of an interrupted download, kept to resume it.
#[derive(Debug)]
struct Partial {
    version: ModelVersion,
    digest: Sha256,
    bytes: Vec<u8>,
    /// SHA-256 state over `bytes`, so resuming need not re-hash them.
    hasher: Sha256Stream,
}

/// The trainable weights of the latest model version the agent fetched, plus an interrupted
/// download in progress.
#[derive(Debug, Default)]
pub struct ModelCache {
    current: Option<(ModelVersion, Arc<ParameterVector>)>,
    partial: Option<Partial>,
    /// Payload bytes received over all downloads, complete or not.
    received: u64,
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

    /// Fetches the trainable tensors of `model` from the cache, or by a download that resumes
    /// an interrupted one of the same version.
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
        let mut partial = match self.partial.take() {
            Some(p) if p.version == model.version && p.digest == model.trainable_payload => p,
            _ => Partial {
                version: model.version,
                digest: model.trainable_payload,
                bytes: Vec::new(),
                hasher: Sha256Stream::default(),
            },
        };
        let before = partial.bytes.len() as u64;
        let result = download_into(api, model, trainable, chunk_bytes, &mut partial).await;
        self.received += partial.bytes.len() as u64 - before;
        match result {
            Ok(()) => {
                let total = partial.bytes.len() as u64;
                let actual = partial.hasher.finish();
                if actual != model.trainable_payload {
                    // Start over next time: these bytes are not the model.
                    return Err(ApiError::DataLoss(format!(
                        "model {} payload hashes to {actual}, expected {}",
                        model.version, model.trainable_payload
                    )));
                }
                let weights = ParameterVector::from_le_bytes(trainable.clone(), &partial.bytes)
                    .map_err(|e| ApiError::Protocol(e.to_string()))?;
                tracing::info!(model = %model.version, bytes = total, resumed_from = before, "model downloaded");
                let weights = Arc::new(weights);
                self.current = Some((model.version, Arc::clone(&weights)));
                Ok(weights)
            }
            Err(e) => {
                if !partial.bytes.is_empty() && e.is_transient() {
                    tracing::info!(model = %model.version, held = partial.bytes.len(), "download interrupted; will resume");
                    self.partial = Some(partial);
                }
                Err(e)
            }
        }
    }
}

/// Streams the rest of the payload into `partial`, checking every header field and chunk.
async fn download_into<C: CoordinatorApi>(
    api: &C,
    model: &ModelRef,
    trainable: &Manifest,
    chunk_bytes: u64,
    partial: &mut Partial,
) -> Result<(), ApiError> {
    let offset = partial.bytes.len() as u64;
    let request = DownloadRequest {
        version: model.version,
        scope: ModelScope::Trainable,
        offset,
        max_chunk_bytes: Some(chunk_bytes.clamp(MIN_CHUNK_BYTES as u64, MAX_CHUNK_BYTES as u64) as u32),
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
    if header.total_bytes != trainable.byte_len() as u64 || header.start_offset != offset {
        return bad(format!(
            "{} bytes from offset {}, expected {} from {offset}",
            header.total_bytes,
            header.start_offset,
            trainable.byte_len()
        ));
    }
    if header.payload_digest != model.trainable_payload {
        return bad("payload digest differs from the task's model reference".into());
    }
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
