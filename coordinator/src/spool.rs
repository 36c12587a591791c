//! Staging of in-flight uploads on disk ("validate, then mutate").
//!
//! An update must be fully checked — every value finite and in range, the whole payload matching
//! its SHA-256, the signature valid — before it may touch the round's running sum, so that a
//! rejected or broken-off upload leaves the aggregate bitwise unchanged. That needs the bytes
//! somewhere until the trailer arrives. Keeping them in memory would make coordinator memory
//! O(concurrent uploads × model); instead each upload streams into a spool file in the state
//! directory while it is hashed and checked chunk by chunk (memory per upload: one chunk), and
//! only a verified spool file is folded, then deleted. The operating system's page cache usually
//! keeps these files in RAM without counting them against the process, and evicts them under
//! pressure rather than failing.
//!
//! All methods here block (file I/O, hashing): call them on a blocking thread.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedtune_shared::chunk::{ChunkTracker, MIN_CHUNK_BYTES};
use fedtune_shared::ids::Sha256;
use fedtune_shared::params::Manifest;

use fedtune_shared::compression::{Int8StreamCheck, UpdateEncoding};

use crate::aggregate::{check_values, MAX_ABS_VALUE};
use crate::error::RoundError;

/// An upload being received into a spool file. Dropping it deletes the file.
#[derive(Debug)]
pub struct SpoolWriter {
    path: PathBuf,
    /// Unbuffered: chunks are 1–4 MiB already, and a buffer per upload would only add churn.
    file: Option<std::fs::File>,
    tracker: ChunkTracker,
    /// What every byte is checked against.
    check: Check,
    sumsq: f64,
}

/// How a spooled payload's values are checked as they arrive.
#[derive(Debug)]
enum Check {
    /// f32 values against the layout (finite, within the value bound).
    F32(Arc<Manifest>),
    /// `INT8_BLOCK` blocks (scales, codes, padding), across chunk boundaries.
    Int8(Box<Int8StreamCheck>),
    /// A masked input: its values are uniform in Z_{2^32} and have nothing to check (only
    /// order, size and digest).
    Masked,
}

impl SpoolWriter {
    /// Creates `dir/name.upload` for an f32 payload of `total` bytes following `manifest`.
    pub fn create(dir: &Path, name: &str, total: u64, manifest: Arc<Manifest>) -> Result<Self, RoundError> {
        Self::open(dir, name, total, Check::F32(manifest))
    }

    /// Creates `dir/name.upload` for a payload of `total` bytes in `encoding` over `manifest`.
    pub fn create_encoded(
        dir: &Path,
        name: &str,
        total: u64,
        manifest: Arc<Manifest>,
        encoding: UpdateEncoding,
    ) -> Result<Self, RoundError> {
        let check = match encoding {
            UpdateEncoding::F32 => Check::F32(manifest),
            UpdateEncoding::Int8 => {
                Check::Int8(Box::new(Int8StreamCheck::new(manifest.numel(), MAX_ABS_VALUE)?))
            }
        };
        Self::open(dir, name, total, check)
    }

    /// Creates `dir/name.upload` for a masked input of `total` bytes (secure aggregation).
    pub fn create_masked(dir: &Path, name: &str, total: u64) -> Result<Self, RoundError> {
        Self::open(dir, name, total, Check::Masked)
    }

    fn open(dir: &Path, name: &str, total: u64, check: Check) -> Result<Self, RoundError> {
        let path = dir.join(format!("{name}.upload"));
        // 0600: a staged update is a client's contribution before any noise the server adds.
        let file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create(true).truncate(true),
            0o600,
        )
        .open(&path)
        .map_err(|e| RoundError::Internal(format!("cannot create spool file {}: {e}", path.display())))?;
        Ok(Self { path, file: Some(file), tracker: ChunkTracker::new(total, 0), check, sumsq: 0.0 })
    }

    /// Checks and stores the next chunk: order and size bound, whole 4-byte words, every value
    /// finite and within range (for int8 blocks: every scale and code); feeds the digest and
    /// the norm.
    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<(), RoundError> {
        if data.len() % 4 != 0 {
            return Err(RoundError::Misaligned { offset, len: data.len() });
        }
        // Only the last chunk may be short: tiny chunks would cost a message, a blocking-thread
        // hop and a check per few bytes, which a hostile sender could use to burn receive CPU.
        let ends_payload = offset.saturating_add(data.len() as u64) >= self.tracker.total();
        if offset == self.tracker.position() && data.len() < MIN_CHUNK_BYTES && !ends_payload {
            return Err(RoundError::ChunkTooSmall { offset, len: data.len(), min: MIN_CHUNK_BYTES });
        }
        // Order and size first, so a value index is only computed for a well-placed chunk.
        self.tracker.accept(offset, data).map_err(|e| match e {
            fedtune_shared::chunk::ChunkError::Oversize { limit } => {
                RoundError::TooLarge { size: offset + data.len() as u64, limit }
            }
            other => RoundError::Chunk(other),
        })?;
        match &mut self.check {
            Check::F32(manifest) => self.sumsq += check_values(manifest, (offset / 4) as usize, data)?,
            Check::Int8(check) => {
                check.feed(data)?;
                self.sumsq = check.sum_of_squares();
            }
            Check::Masked => {}
        }
        let file = self.file.as_mut().expect("open until finished");
        file.write_all(data)
            .map_err(|e| RoundError::Internal(format!("spool write {}: {e}", self.path.display())))?;
        Ok(())
    }

    /// Bytes received.
    pub fn received(&self) -> u64 {
        self.tracker.position()
    }

    /// Verifies completeness and digest and hands over the staged file.
    pub fn finish(mut self, digest: &Sha256) -> Result<StagedUpdate, RoundError> {
        let received = self.tracker.position();
        let tracker = std::mem::replace(&mut self.tracker, ChunkTracker::new(0, 0));
        tracker.finish(digest)?;
        if let Check::Int8(check) = &self.check {
            check.finish()?;
        }
        // Nothing to flush (unbuffered); the file is only read back by this process, so no fsync.
        drop(self.file.take());
        let path = std::mem::take(&mut self.path);
        Ok(StagedUpdate { path, bytes: received, l2_norm: self.sumsq.sqrt() })
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A verified update waiting to be folded. Dropping it deletes the file.
#[derive(Debug)]
pub struct StagedUpdate {
    path: PathBuf,
    bytes: u64,
    l2_norm: f64,
}

impl StagedUpdate {
    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Payload bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// L2 norm of the update as received.
    pub fn l2_norm(&self) -> f64 {
        self.l2_norm
    }
}

impl Drop for StagedUpdate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_shared::params::TensorSpec;

    fn manifest() -> Arc<Manifest> {
        Arc::new(Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![4] }]).unwrap())
    }

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A manifest one minimum chunk plus four values long, so a payload takes two chunks.
    fn two_chunk_manifest() -> Arc<Manifest> {
        let n = MIN_CHUNK_BYTES / 4 + 4;
        Arc::new(Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![n] }]).unwrap())
    }

    #[test]
    fn a_verified_upload_is_staged_and_its_file_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut values = vec![0.0; MIN_CHUNK_BYTES / 4 + 4];
        values[0] = 3.0;
        values[1] = 4.0;
        let data = bytes(&values);
        let mut w = SpoolWriter::create(dir.path(), "u1", data.len() as u64, two_chunk_manifest()).unwrap();
        w.write_chunk(0, &data[..MIN_CHUNK_BYTES]).unwrap();
        w.write_chunk(MIN_CHUNK_BYTES as u64, &data[MIN_CHUNK_BYTES..]).unwrap();
        let staged = w.finish(&Sha256::of(&data)).unwrap();
        assert_eq!(std::fs::read(staged.path()).unwrap(), data);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(staged.path()).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "a staged update is readable by the owner only");
        assert!((staged.l2_norm() - 5.0).abs() < 1e-12);
        let path = staged.path().to_path_buf();
        drop(staged);
        assert!(!path.exists());
    }

    #[test]
    fn a_broken_off_upload_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let total = (MIN_CHUNK_BYTES + 16) as u64;
        let mut w = SpoolWriter::create(dir.path(), "u2", total, two_chunk_manifest()).unwrap();
        w.write_chunk(0, &vec![0u8; MIN_CHUNK_BYTES]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn bad_chunks_are_refused_precisely() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::create(dir.path(), "u3", 16, manifest()).unwrap();
        assert!(matches!(w.write_chunk(0, &[0u8; 3]), Err(RoundError::Misaligned { .. })));
        assert!(matches!(w.write_chunk(4, &bytes(&[1.0])), Err(RoundError::Chunk(_))));
        assert!(matches!(
            w.write_chunk(0, &bytes(&[f32::INFINITY, 0.0, 0.0, 0.0])),
            Err(RoundError::Value(_))
        ));
        let mut w = SpoolWriter::create(dir.path(), "u3b", 16, manifest()).unwrap();
        assert!(matches!(w.write_chunk(0, &bytes(&[0.0; 5])), Err(RoundError::TooLarge { .. })));
        let data = vec![0u8; MIN_CHUNK_BYTES + 16];
        let mut w = SpoolWriter::create(dir.path(), "u4", data.len() as u64, two_chunk_manifest()).unwrap();
        w.write_chunk(0, &data[..MIN_CHUNK_BYTES]).unwrap();
        assert!(matches!(w.finish(&Sha256::of(&data)), Err(RoundError::Chunk(_))));
    }

    #[test]
    fn only_the_last_chunk_may_be_smaller_than_the_minimum() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![0u8; MIN_CHUNK_BYTES + 16];
        let mut w = SpoolWriter::create(dir.path(), "u5", data.len() as u64, two_chunk_manifest()).unwrap();
        let small = w.write_chunk(0, &data[..4]);
        assert!(
            matches!(small, Err(RoundError::ChunkTooSmall { offset: 0, len: 4, min: MIN_CHUNK_BYTES })),
            "{small:?}"
        );
        w.write_chunk(0, &data[..MIN_CHUNK_BYTES]).unwrap();
        w.write_chunk(MIN_CHUNK_BYTES as u64, &data[MIN_CHUNK_BYTES..]).unwrap();
        w.finish(&Sha256::of(&data)).unwrap();
    }

    #[test]
    fn an_int8_payload_is_checked_across_chunks_and_a_nan_scale_is_refused() {
        use fedtune_shared::compression::{Int8Encoder, BLOCK_BYTES};
        let dir = tempfile::tempdir().unwrap();
        // At one byte per value, a million values make a payload of two chunks.
        let n = MIN_CHUNK_BYTES + 1000;
        let manifest =
            Arc::new(Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![n] }]).unwrap());
        let values: Vec<f32> = (0..manifest.numel()).map(|i| (i % 7) as f32 * 1e-3).collect();
        let data = Int8Encoder::seeded_for_tests(1).encode(&values, MAX_ABS_VALUE).unwrap();
        let open = |name: &str| {
            SpoolWriter::create_encoded(
                dir.path(),
                name,
                data.len() as u64,
                manifest.clone(),
                UpdateEncoding::Int8,
            )
            .unwrap()
        };
        // A minimum-sized first chunk ends inside a block: the block is checked across the cut.
        let mut w = open("i1");
        w.write_chunk(0, &data[..MIN_CHUNK_BYTES]).unwrap();
        w.write_chunk(MIN_CHUNK_BYTES as u64, &data[MIN_CHUNK_BYTES..]).unwrap();
        let staged = w.finish(&Sha256::of(&data)).unwrap();
        assert_eq!(std::fs::read(staged.path()).unwrap(), data);
        // The scale of the first block that starts in the second chunk.
        let at = MIN_CHUNK_BYTES.next_multiple_of(BLOCK_BYTES);
        let mut bad = data.clone();
        bad[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let mut w = open("i2");
        w.write_chunk(0, &bad[..MIN_CHUNK_BYTES]).unwrap();
        let err = w.write_chunk(MIN_CHUNK_BYTES as u64, &bad[MIN_CHUNK_BYTES..]).unwrap_err();
        assert!(matches!(err, RoundError::Int8(_)), "{err}");
        assert!(err.to_string().contains("scale NaN"), "{err}");
    }
}
