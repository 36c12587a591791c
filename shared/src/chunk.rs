//! Chunked payload transfer: size limits, incremental SHA-256, and checked reassembly.
//!
//! A payload is the little-endian `f32` bytes of a [`ParameterVector`] (or a subset of its
//! tensors). It is cut into chunks of at most [`MAX_CHUNK_BYTES`], sent in order, and checked
//! against a SHA-256 of the whole payload. Both directions use the same rules, so both sides
//! share these helpers.

use std::ops::Range;

use ring::digest;

use crate::ids::Sha256;
use crate::params::ParameterVector;

// The limits live with the protocol's other limits; re-exported because every chunking caller
// needs them.
pub use crate::limits::{DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, MIN_CHUNK_BYTES};

/// Errors while reassembling a chunked payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk does not start where the previous one ended.
    #[error("chunk at offset {got} does not continue the payload at offset {expected}")]
    OutOfOrder {
        /// Offset the next chunk had to start at.
        expected: u64,
        /// Offset it claimed.
        got: u64,
    },
    /// More bytes arrived than announced.
    #[error("payload exceeds its announced {limit} bytes")]
    Oversize {
        /// Announced size.
        limit: u64,
    },
    /// The stream ended before all bytes arrived.
    #[error("payload truncated: {received} of {expected} bytes arrived")]
    Truncated {
        /// Announced size.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// The bytes do not hash to the announced digest.
    #[error("payload digest mismatch: announced {expected}, computed {actual}")]
    DigestMismatch {
        /// Announced digest.
        expected: Sha256,
        /// Digest of what arrived.
        actual: Sha256,
    },
}

/// Incremental SHA-256.
#[derive(Clone)]
pub struct Sha256Stream(digest::Context);

impl std::fmt::Debug for Sha256Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256Stream")
    }
}

impl Default for Sha256Stream {
    fn default() -> Self {
        Self(digest::Context::new(&digest::SHA256))
    }
}

impl Sha256Stream {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Sha256 {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        Sha256(out)
    }
}

/// Tracks an incoming chunk stream: order, size bound and digest. It does not store the bytes
/// (callers decide where they go: a buffer, a spool file, a running sum).
#[derive(Debug)]
pub struct ChunkTracker {
    total: u64,
    next: u64,
    hasher: Sha256Stream,
}

impl ChunkTracker {
    /// Expects `total` bytes starting at offset `start` (non-zero when resuming; the digest then
    /// covers only what this tracker sees, so resumers hash the earlier part themselves).
    pub fn new(total: u64, start: u64) -> Self {
        Self { total, next: start, hasher: Sha256Stream::default() }
    }

    /// Accepts the next chunk if it continues the payload and stays within the announced size.
    pub fn accept(&mut self, offset: u64, data: &[u8]) -> Result<(), ChunkError> {
        if offset != self.next {
            return Err(ChunkError::OutOfOrder { expected: self.next, got: offset });
        }
        let end =
            self.next.checked_add(data.len() as u64).ok_or(ChunkError::Oversize { limit: self.total })?;
        if end > self.total {
            return Err(ChunkError::Oversize { limit: self.total });
        }
        self.hasher.update(data);
        self.next = end;
        Ok(())
    }

    /// Bytes received up to now (including the start offset).
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Announced total.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// True once every byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.next == self.total
    }

    /// Checks completeness and the digest of the bytes seen.
    pub fn finish(self, expected: &Sha256) -> Result<(), ChunkError> {
        if self.next != self.total {
            return Err(ChunkError::Truncated { expected: self.total, received: self.next });
        }
        let actual = self.hasher.finish();
        if &actual != expected {
            return Err(ChunkError::DigestMismatch { expected: *expected, actual });
        }
        Ok(())
    }
}

/// A payload made of some of a vector's value ranges, read as little-endian bytes on demand,
/// so a server can stream a subset of a model without materialising a second copy of it.
#[derive(Debug, Clone)]
pub struct PayloadView<'a> {
    values: &'a [f32],
    /// Value ranges of `values`, in payload order.
    segments: Vec<Range<usize>>,
    /// Prefix sums of segment lengths, in values; `starts[i]` is the payload index of segment i.
    starts: Vec<usize>,
    len: usize,
}

impl<'a> PayloadView<'a> {
    /// The whole vector.
    pub fn whole(values: &'a [f32]) -> Self {
        Self::segments(values, std::iter::once(0..values.len()).collect())
    }

    /// The given value ranges of `values`, in order.
    ///
    /// # Panics
    /// If a range lies outside `values` (a programming error: ranges come from a manifest that
    /// was checked against the buffer).
    pub fn segments(values: &'a [f32], segments: Vec<Range<usize>>) -> Self {
        let mut starts = Vec::with_capacity(segments.len());
        let mut len = 0;
        for s in &segments {
            assert!(s.end <= values.len() && s.start <= s.end, "segment {s:?} outside the buffer");
            starts.push(len);
            len += s.len();
        }
        Self { values, segments, starts, len }
    }

    /// Payload length in bytes.
    pub fn byte_len(&self) -> u64 {
        self.len as u64 * 4
    }

    /// Appends bytes `[offset, offset + len)` of the payload to `out`. Both must be multiples of
    /// 4 and inside the payload.
    pub fn read_into(&self, offset: u64, len: usize, out: &mut Vec<u8>) {
        debug_assert!(offset % 4 == 0 && len % 4 == 0);
        let mut idx = (offset / 4) as usize;
        let end = idx + len / 4;
        assert!(end <= self.len, "read past the payload");
        out.reserve(len);
        // Find the segment holding `idx`, then walk forward.
        let mut seg = match self.starts.binary_search(&idx) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        while idx < end {
            // Skip empty segments.
            while self.segments[seg].is_empty() || idx >= self.starts[seg] + self.segments[seg].len() {
                seg += 1;
            }
            let within = idx - self.starts[seg];
            let take = (self.segments[seg].len() - within).min(end - idx);
            let from = self.segments[seg].start + within;
            for v in &self.values[from..from + take] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            idx += take;
        }
    }

    /// SHA-256 of the whole payload.
    pub fn digest(&self) -> Sha256 {
        let mut h = Sha256Stream::default();
        let mut buf = Vec::with_capacity(DEFAULT_CHUNK_BYTES);
        let mut off = 0u64;
        while off < self.byte_len() {
            let n = (self.byte_len() - off).min(DEFAULT_CHUNK_BYTES as u64) as usize;
            buf.clear();
            self.read_into(off, n, &mut buf);
            h.update(&buf);
            off += n as u64;
        }
        h.finish()
    }
}

/// SHA-256 of a vector's payload bytes (same as [`ParameterVector::payload_digest`]).
pub fn payload_digest(v: &ParameterVector) -> Sha256 {
    Sha256(v.payload_digest())
}

/// Splits `[0, total)` into chunk ranges of `chunk` bytes (the last may be shorter), starting at
/// `start`.
pub fn chunk_ranges(start: u64, total: u64, chunk: usize) -> impl Iterator<Item = Range<u64>> {
    let chunk = chunk.max(4) as u64;
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= total {
            return None;
        }
        let end = (at + chunk).min(total);
        let r = at..end;
        at = end;
        Some(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{Manifest, TensorSpec};

    #[test]
    fn a_tracker_refuses_gaps_overlaps_and_excess() {
        let mut t = ChunkTracker::new(8, 0);
        assert!(t.accept(0, &[0; 4]).is_ok());
        assert_eq!(t.accept(0, &[0; 4]), Err(ChunkError::OutOfOrder { expected: 4, got: 0 }));
        assert_eq!(t.accept(8, &[0; 4]), Err(ChunkError::OutOfOrder { expected: 4, got: 8 }));
        assert_eq!(t.accept(4, &[0; 8]), Err(ChunkError::Oversize { limit: 8 }));
    }

    #[test]
    fn a_tracker_detects_truncation_and_digest_mismatch() {
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let t = ChunkTracker::new(8, 0);
        assert!(matches!(t.finish(&Sha256::of(&data)), Err(ChunkError::Truncated { .. })));
        let mut t = ChunkTracker::new(8, 0);
        t.accept(0, &data).unwrap();
        assert!(matches!(t.finish(&Sha256::of(&[0; 8])), Err(ChunkError::DigestMismatch { .. })));
        let mut t = ChunkTracker::new(8, 0);
        t.accept(0, &data[..4]).unwrap();
        t.accept(4, &data[4..]).unwrap();
        assert!(t.finish(&Sha256::of(&data)).is_ok());
    }

    #[test]
    fn a_segmented_view_reads_the_selected_tensors_in_order() {
        let values: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let view = PayloadView::segments(&values, vec![2..4, 4..4, 7..10]);
        assert_eq!(view.byte_len(), 20);
        let mut out = Vec::new();
        // Read across the segment boundary, from an unaligned (but 4-byte) offset.
        view.read_into(4, 12, &mut out);
        let back: Vec<f32> = out.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(back, vec![3.0, 7.0, 8.0]);
    }

    #[test]
    fn the_view_digest_equals_the_vector_digest() {
        let m = Manifest::new(vec![TensorSpec { name: "w".into(), shape: vec![300_000] }]).unwrap();
        let v = ParameterVector::new(m, (0..300_000).map(|i| i as f32 * 0.5).collect()).unwrap();
        assert_eq!(PayloadView::whole(v.values()).digest(), payload_digest(&v));
    }

    #[test]
    fn chunk_ranges_cover_the_payload_exactly() {
        let r: Vec<_> = chunk_ranges(4, 20, 8).collect();
        assert_eq!(r, vec![4..12, 12..20]);
        assert_eq!(chunk_ranges(0, 0, 8).count(), 0);
    }
}
