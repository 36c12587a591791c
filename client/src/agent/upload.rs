//! Uploading: stream a prepared update as header → chunks → trailer.
//!
//! The payload is cut into chunks lazily from the shared update (no second copy of the whole
//! payload), optionally paced to a byte rate. Uploads do not resume: the coordinator discards a
//! broken upload whole, so a retry sends everything again, as long as the task's deadline allows.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedtune_shared::chunk::{chunk_ranges, Sha256Stream, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
use fedtune_shared::ids::Sha256;
use fedtune_shared::round::{
    Chunk, ClientActivity, FailureCode, FitTask, PrivacyMode, UpdateHeader, UpdateTrailer, UploadItem,
};
use futures::stream::{self, BoxStream, StreamExt};
use tokio::time::Instant;

use super::heartbeat::supervise;
use super::worker::FitResult;
use super::{Agent, AgentError, Pending, State, Work};
use crate::transport::{ApiError, CoordinatorApi};

/// The bytes an upload streams, read where they lie (no second copy of the whole payload).
/// Every payload is a whole number of 4-byte words and chunks start on word boundaries.
pub(super) trait UploadPayload: Send + Sync + 'static {
    /// Appends the payload bytes `range` (word-aligned) to `out`.
    fn write_bytes(&self, range: Range<usize>, out: &mut Vec<u8>);
}

impl UploadPayload for FitResult {
    fn write_bytes(&self, range: Range<usize>, out: &mut Vec<u8>) {
        match &self.update.int8 {
            Some(bytes) => out.extend_from_slice(&bytes[range]),
            None => {
                for v in &self.update.delta.values()[range.start / 4..range.end / 4] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// A secure round's masked vector.
#[derive(Debug)]
pub(super) struct MaskedPayload(pub(super) Vec<u32>);

impl MaskedPayload {
    /// SHA-256 of the bytes [`UploadPayload::write_bytes`] streams, hashed in slices.
    pub(super) fn digest(&self) -> Sha256 {
        let mut hasher = Sha256Stream::default();
        let mut buf = Vec::with_capacity(1 << 16);
        for words in self.0.chunks(1 << 14) {
            buf.clear();
            buf.extend(words.iter().flat_map(|w| w.to_le_bytes()));
            hasher.update(&buf);
        }
        hasher.finish()
    }
}

impl UploadPayload for MaskedPayload {
    fn write_bytes(&self, range: Range<usize>, out: &mut Vec<u8>) {
        for w in &self.0[range.start / 4..range.end / 4] {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
}

/// The metrics an upload's header carries: what the pipeline recorded, plus the training
/// figures when the task is not private.
pub(super) fn header_metrics(
    task: &FitTask,
    recorded: &BTreeMap<&'static str, f64>,
    train_loss: f64,
    samples_per_second: f64,
    seconds: f64,
) -> BTreeMap<String, f64> {
    let mut metrics: BTreeMap<String, f64> = recorded.iter().map(|(k, v)| ((*k).to_string(), *v)).collect();
    // Training figures depend on the client's data and are not covered by the DP noise: a
    // private update carries only what its pipeline put in (the noised clipping indicator).
    if task.privacy.mode == PrivacyMode::None {
        metrics.insert("train_loss".into(), train_loss);
        metrics.insert("samples_per_second".into(), samples_per_second);
        metrics.insert("train_seconds".into(), seconds);
    }
    metrics.retain(|_, v| v.is_finite());
    metrics
}

/// The upload stream of `result` for `task`: header, chunks of `chunk_bytes`, trailer.
/// With `rate` (bytes per second), chunks are released no faster than that.
pub(super) fn upload_items(
    task: &FitTask,
    result: Arc<FitResult>,
    chunk_bytes: usize,
    rate: Option<u64>,
) -> BoxStream<'static, UploadItem> {
    let update = &result.update;
    let metrics =
        header_metrics(task, &update.metrics, result.train_loss, result.samples_per_second, result.seconds);
    let header = UpdateHeader {
        id: task.id,
        base_version: task.model.version,
        num_examples: update.num_examples,
        metrics,
        manifest_digest: Sha256(update.delta.manifest().digest()),
        total_bytes: update.payload_len(),
        encoding: update.encoding(),
    };
    let digest = result.payload_digest;
    framed(header, digest, result, chunk_bytes, rate)
}

/// Header, the payload cut into chunks of `chunk_bytes` (paced to `rate` bytes per second if
/// given), trailer with `payload_digest`.
pub(super) fn framed<P: UploadPayload>(
    header: UpdateHeader,
    payload_digest: Sha256,
    payload: Arc<P>,
    chunk_bytes: usize,
    rate: Option<u64>,
) -> BoxStream<'static, UploadItem> {
    let total = header.total_bytes;
    let trailer = UploadItem::Trailer(UpdateTrailer {
        payload_digest,
        // Filled in by the transport, which alone knows the session the signature covers.
        signature: None,
    });
    let header = UploadItem::Header(header);
    let chunk_bytes = chunk_bytes.clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES) / 4 * 4;
    let ranges: Vec<_> = chunk_ranges(0, total, chunk_bytes).collect();
    let started = Instant::now();
    let chunks = stream::iter(ranges).then(move |range| {
        let payload = Arc::clone(&payload);
        async move {
            if let Some(rate) = rate.filter(|r| *r > 0) {
                // Release this chunk when the bytes before it have had their share of time.
                let due = started + Duration::from_secs_f64(range.start as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
            }
            let bytes = range.start as usize..range.end as usize;
            let mut data = Vec::with_capacity(bytes.len());
            payload.write_bytes(bytes, &mut data);
            UploadItem::Chunk(Chunk { offset: range.start, data: Bytes::from(data) })
        }
    });
    stream::once(async move { header }).chain(chunks).chain(stream::once(async move { trailer })).boxed()
}

impl<C: CoordinatorApi + 'static> Agent<C> {
    /// Uploading: send the pending update; on success the task is done.
    pub(super) async fn upload(&mut self, pending: Pending) -> Result<State, AgentError> {
        let Some(session) = self.session.clone() else { return Ok(State::Connecting) };
        let work = Work::Fit { task: pending.task.clone(), deadline: pending.deadline };
        if pending.result.update.num_examples == 0 {
            self.pending = None;
            self.report_failure(&work, FailureCode::TrainingFailed, "no training examples behind the update")
                .await;
            return Ok(State::Idle);
        }
        let chunk = session.limits.chunk_bytes() as usize;
        let items =
            upload_items(&pending.task, Arc::clone(&pending.result), chunk, self.config.upload_rate_limit);
        let total = pending.result.update.payload_len();
        // An upload's work is done: on shutdown give it a short grace period to land.
        let supervision =
            self.supervision(ClientActivity::Uploading, &work, Some(self.config.shutdown_grace));
        let sent = supervise(supervision, self.api.upload(items)).await;
        let outcome = match sent {
            Ok(outcome) => outcome,
            Err(stop) => return Ok(self.stopped(stop, State::Uploading(pending)).await),
        };
        match outcome {
            Ok(receipt) => {
                self.contact();
                self.pending = None;
                self.stats.updates_accepted += 1;
                self.stats.bytes_uploaded += total;
                tracing::info!(round = %receipt.id, bytes = receipt.received_bytes, "update accepted");
                Ok(if self.shutdown.is_cancelled() {
                    State::Shutdown(super::ExitReason::Shutdown)
                } else {
                    State::Idle
                })
            }
            Err(ApiError::AlreadyAccepted(_)) => {
                self.contact();
                self.pending = None;
                tracing::info!(round = %pending.task.id, "the coordinator already holds this update");
                Ok(State::Idle)
            }
            Err(e @ ApiError::Unauthenticated(_)) => {
                // Keep `self.pending`: if the coordinator hands us this task again after we
                // re-join, the update is re-sent as is.
                self.on_error(e, State::Idle, Some(&work)).await
            }
            Err(e) if e.is_transient() && Instant::now() < pending.deadline => {
                self.on_error(e, State::Uploading(pending), Some(&work)).await
            }
            Err(e) => {
                self.pending = None;
                let next = self.on_error(e, State::Idle, Some(&work)).await?;
                Ok(next)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::PreparedUpdate;
    use fedtune_shared::compression::UpdateEncoding;
    use fedtune_shared::ids::{ModelVersion, RoundId};
    use fedtune_shared::params::{Manifest, ParameterVector, TensorSpec};
    use fedtune_shared::round::{FitInstructions, ModelRef, PrivacyInstructions};

    fn task() -> FitTask {
        FitTask {
            id: RoundId::new(3, 1),
            model: ModelRef {
                version: ModelVersion(2),
                full_manifest: Sha256::default(),
                full_payload: Sha256::default(),
                trainable_manifest: Sha256::default(),
                trainable_payload: Sha256::default(),
            },
            config: FitInstructions {
                epochs: 1,
                batch_size: 8,
                learning_rate: 1e-3,
                proximal_mu: 0.0,
                max_steps: None,
                seed: 1,
                lr_schedule: fedtune_shared::schedule::LrSchedule::Constant,
                warmup_steps: 0,
                update_encoding: Default::default(),
            },
            deadline_in: Duration::from_secs(60),
            deadline_unix_ms: 0,
            privacy: PrivacyInstructions::NONE,
            secure_aggregation: None,
        }
    }

    fn result(values: usize) -> Arc<FitResult> {
        let m = Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![values] }]).unwrap();
        let delta = ParameterVector::new(m, (0..values).map(|i| i as f32).collect()).unwrap();
        let payload_digest = Sha256(delta.payload_digest());
        Arc::new(FitResult {
            update: PreparedUpdate {
                round: 3,
                delta,
                num_examples: 42,
                metrics: BTreeMap::from([("l2_norm", 1.5)]),
                int8: None,
            },
            payload_digest,
            train_loss: 0.25,
            samples_per_second: f64::NAN,
            seconds: 2.0,
        })
    }

    #[tokio::test]
    async fn an_upload_is_a_header_contiguous_chunks_and_a_trailer_covering_the_payload() {
        // 600k values = 2.4 MB: three chunks of at most 1 MiB.
        let r = result(600_000);
        let items: Vec<UploadItem> = upload_items(&task(), Arc::clone(&r), 1 << 20, None).collect().await;
        let UploadItem::Header(h) = &items[0] else { panic!("first item must be the header") };
        assert_eq!(
            (h.id, h.base_version, h.num_examples, h.total_bytes),
            (RoundId::new(3, 1), ModelVersion(2), 42, 2_400_000)
        );
        assert_eq!(h.metrics["train_loss"], 0.25);
        assert_eq!(h.metrics["l2_norm"], 1.5);
        assert!(!h.metrics.contains_key("samples_per_second"), "non-finite metrics are not sent");
        let mut tracker = fedtune_shared::chunk::ChunkTracker::new(h.total_bytes, 0);
        let chunks = &items[1..items.len() - 1];
        assert_eq!(chunks.len(), 3);
        for item in chunks {
            let UploadItem::Chunk(c) = item else { panic!("chunks between header and trailer") };
            assert!(c.data.len() <= 1 << 20);
            tracker.accept(c.offset, &c.data).unwrap();
        }
        let UploadItem::Trailer(t) = items.last().unwrap() else { panic!("last item must be the trailer") };
        tracker.finish(&t.payload_digest).unwrap();
    }

    #[tokio::test]
    async fn an_int8_upload_declares_its_encoding_and_streams_the_encoded_bytes() {
        let plain = result(600_000);
        let small: Vec<f32> = plain.update.delta.values().iter().map(|v| v * 1e-6).collect();
        let bytes =
            fedtune_shared::compression::Int8Encoder::seeded_for_tests(1).encode(&small, 256.0).unwrap();
        let mut update = plain.update.clone();
        update.int8 = Some(Arc::new(bytes.clone()));
        let r = Arc::new(FitResult { payload_digest: update.payload_digest(), update, ..(*plain).clone() });
        let items: Vec<UploadItem> = upload_items(&task(), Arc::clone(&r), 1 << 20, None).collect().await;
        let UploadItem::Header(h) = &items[0] else { panic!("first item must be the header") };
        assert_eq!((h.encoding, h.total_bytes), (UpdateEncoding::Int8, 609_440));
        let streamed: Vec<u8> = items[1..items.len() - 1]
            .iter()
            .flat_map(|i| match i {
                UploadItem::Chunk(c) => c.data.to_vec(),
                _ => panic!("chunks between header and trailer"),
            })
            .collect();
        assert_eq!(streamed, bytes);
        let UploadItem::Trailer(t) = items.last().unwrap() else { panic!("last item must be the trailer") };
        assert_eq!(t.payload_digest, Sha256::of(&bytes));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_spreads_the_chunks_over_time() {
        // 2 MiB + 4 B at 1 MiB/s: the third chunk is due after two seconds.
        let values = (2 << 20) / 4 + 1;
        let start = Instant::now();
        let items: Vec<UploadItem> =
            upload_items(&task(), result(values), 1 << 20, Some(1 << 20)).collect().await;
        assert_eq!(items.len(), 5);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
