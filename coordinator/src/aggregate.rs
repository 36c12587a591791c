//! Pure numeric kernels of streaming aggregation: value checks and the fixed-point running sum.
//!
//! # Fixed-point accumulation
//!
//! Every accepted update `x` (an f32 delta) is quantized to the grid 2⁻²⁴ with
//! round-to-nearest-even, `q = rne(s·x·2²⁴)` (`s` ∈ (0, 1] is a per-update scale, 1 unless a
//! server-side clipping decorator asks otherwise), multiplied by its integer weight `w` (the
//! example count) and added into an `i64` per parameter. Integer addition is associative, so
//! the sum — and the mean `Σ w·q / Σ w · 2⁻²⁴` derived from it — is **bitwise independent of the
//! order in which updates arrive**, and an integer sum is what secure aggregation (masking
//! modulo 2⁶⁴) will need later.
//!
//! Resolution: each update is off by at most 2⁻²⁵ per value, so the mean is within 2⁻²⁵ of the
//! exact weighted mean of the inputs, plus the final rounding to f32.
//!
//! Overflow bound: values are refused unless |x| ≤ [`MAX_ABS_VALUE`] = 2⁸, so |q| ≤ 2³²; the
//! total weight of a round is capped at [`MAX_TOTAL_WEIGHT`] = 2³¹ − 1, so
//! |Σ w·q| ≤ (2³¹ − 1)·2³² < 2⁶³. No sum can overflow. (Fine-tuning deltas are many orders of
//! magnitude below 256; a value beyond it is a bug or an attack and is refused, not clamped.)
//!
//! `quantize` uses the "add 1.5·2⁵² and subtract it" trick for round-to-nearest-even, exact for
//! |v| < 2⁵¹ (here |v| ≤ 2³²), branch-free and vectorizable.

use std::ops::Range;
use std::path::Path;

use fedtune_shared::compression::{decode_value, split_block, UpdateEncoding, BLOCK_BYTES, BLOCK_VALUES};
use fedtune_shared::params::Manifest;

/// Bits of fraction of the fixed-point grid.
pub const SCALE_BITS: i32 = 24;
/// 2²⁴.
const SCALE: f64 = (1u64 << SCALE_BITS) as f64;
/// Largest accepted |value| of an update: the protocol's bound, advertised to clients.
pub use fedtune_shared::limits::MAX_ABS_UPDATE_VALUE as MAX_ABS_VALUE;
/// Largest total weight (sum of example counts) of one round.
pub const MAX_TOTAL_WEIGHT: u64 = (1 << 31) - 1;
// The overflow argument of the module docs, checked where the bound is defined elsewhere: a
// larger protocol bound must not compile into a sum that can overflow.
const _: () = assert!((MAX_ABS_VALUE as f64) * SCALE * (MAX_TOTAL_WEIGHT as f64) < 9.223_372_036_854_776e18);
/// 1.5·2⁵²: adding and subtracting it rounds an f64 of magnitude < 2⁵¹ to the nearest integer
/// (ties to even) under the default rounding mode.
const RNE_MAGIC: f64 = 6_755_399_441_055_744.0;

/// A value that may not be folded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// NaN or infinity.
    #[error("tensor `{tensor}` holds a non-finite value at index {index}")]
    NonFinite {
        /// Tensor name.
        tensor: String,
        /// Flat index within the update.
        index: usize,
    },
    /// Beyond the fixed-point range.
    #[error("tensor `{tensor}` holds {value} at index {index}, outside ±{MAX_ABS_VALUE}")]
    OutOfRange {
        /// Tensor name.
        tensor: String,
        /// Flat index within the update.
        index: usize,
        /// The value.
        value: f32,
    },
}

/// Checks little-endian f32 `bytes` that start at flat value index `start` of an update
/// following `manifest`, and returns their sum of squares (for norms). `bytes.len()` must be a
/// multiple of 4.
pub fn check_values(manifest: &Manifest, start: usize, bytes: &[u8]) -> Result<f64, ValueError> {
    let mut sumsq = 0.0f64;
    let mut bad = None;
    for (i, b) in bytes.chunks_exact(4).enumerate() {
        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if v.is_nan() || v.abs() > MAX_ABS_VALUE {
            bad = Some((start + i, v));
            break;
        }
        sumsq += f64::from(v) * f64::from(v);
    }
    match bad {
        None => Ok(sumsq),
        Some((index, value)) => {
            let tensor = tensor_at(manifest, index);
            Err(if value.is_finite() {
                ValueError::OutOfRange { tensor, index, value }
            } else {
                ValueError::NonFinite { tensor, index }
            })
        }
    }
}

fn tensor_at(manifest: &Manifest, index: usize) -> String {
    manifest
        .ranges()
        .find(|(_, r)| r.contains(&index))
        .map(|(t, _)| t.name.clone())
        .unwrap_or_else(|| "<beyond manifest>".into())
}

/// Quantizes one value onto the 2⁻²⁴ grid (see the module docs). `scale` ∈ (0, 1].
#[inline(always)]
pub fn quantize(x: f32, scale: f32) -> i64 {
    let v = f64::from(x * scale) * SCALE;
    ((v + RNE_MAGIC) - RNE_MAGIC) as i64
}

/// The running weighted sum of one round's updates, in fixed point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedPointSum {
    sum: Vec<i64>,
    total_weight: u64,
    updates: u32,
}

impl FixedPointSum {
    /// An empty sum over `len` parameters.
    pub fn new(len: usize) -> Self {
        Self { sum: vec![0; len], total_weight: 0, updates: 0 }
    }

    /// Parameters summed.
    pub fn len(&self) -> usize {
        self.sum.len()
    }

    /// True for a sum over zero parameters.
    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// Sum of the weights folded so far.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// Updates folded so far.
    pub fn updates(&self) -> u32 {
        self.updates
    }

    /// The raw integer sums (for tests and secure aggregation).
    pub fn raw(&self) -> &[i64] {
        &self.sum
    }

    /// True if folding `weight` more stays within [`MAX_TOTAL_WEIGHT`].
    pub fn can_take(&self, weight: u64) -> bool {
        self.total_weight.checked_add(weight).is_some_and(|t| t <= MAX_TOTAL_WEIGHT)
    }

    /// Folds a whole update given as values. Values must have passed [`check_values`].
    ///
    /// # Panics
    /// If the length differs or the weight would exceed [`MAX_TOTAL_WEIGHT`] (callers check both
    /// before mutating anything).
    pub fn fold_values(&mut self, values: &[f32], weight: u64, scale: f32) {
        assert_eq!(values.len(), self.sum.len(), "update length differs from the sum");
        self.admit(weight);
        let w = weight as i64;
        for (s, &x) in self.sum.iter_mut().zip(values) {
            *s += w * quantize(x, scale);
        }
    }

    /// Folds a whole update stored as little-endian f32 in `path` (a spool file), reading it in
    /// blocks on up to `threads` threads, each owning a disjoint slice of the sum. Blocking: run
    /// it on a blocking thread. On an I/O error the sum may be partially updated, so callers fold
    /// into a copy or treat the error as fatal; spool files are local and already verified.
    pub fn fold_file(&mut self, path: &Path, weight: u64, scale: f32, threads: usize) -> std::io::Result<()> {
        self.fold_encoded(path, UpdateEncoding::F32, weight, threads, |sum, bytes, w| {
            fold_le(sum, bytes, w, scale)
        })
    }

    /// Folds a whole `INT8_BLOCK` update stored in `path` (a spool file whose every block
    /// [`fedtune_shared::compression::Int8StreamCheck`] accepted), decoding block by block
    /// while reading, like [`FixedPointSum::fold_file`]: each value is decoded by the format's
    /// one rule ([`decode_value`]) and then quantized exactly as an f32 upload's value is, so
    /// the sum equals folding the decoded f32 vector, which is never materialised.
    pub fn fold_int8_file(
        &mut self,
        path: &Path,
        weight: u64,
        scale: f32,
        threads: usize,
    ) -> std::io::Result<()> {
        self.fold_encoded(path, UpdateEncoding::Int8, weight, threads, |sum, bytes, w| {
            for (part, block) in sum.chunks_mut(BLOCK_VALUES).zip(bytes.chunks_exact(BLOCK_BYTES)) {
                let (block_scale, codes) = split_block(block);
                for (s, &c) in part.iter_mut().zip(codes) {
                    *s += w * quantize(decode_value(c as i8, block_scale), scale);
                }
            }
        })
    }

    /// The threaded, blocked read of both encodings: the sum is cut into slices of whole
    /// int8 blocks, each thread reads the bytes of its slice's values in pieces and hands each
    /// piece to `kernel` with the matching part of the sum.
    fn fold_encoded(
        &mut self,
        path: &Path,
        encoding: UpdateEncoding,
        weight: u64,
        threads: usize,
        kernel: impl Fn(&mut [i64], &[u8], i64) + Sync,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let expected = encoding.payload_bytes(self.sum.len());
        if len != expected {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("spool file has {len} bytes, expected {expected} ({encoding})"),
            ));
        }
        self.admit(weight);
        let w = weight as i64;
        let threads = threads.clamp(1, 16);
        // Values per read: 64 KiB blocks of f32 stay below glibc's mmap threshold, so folding does
        // not raise it (a raised threshold makes every later MiB-sized buffer come from, and
        // fragment, the heap arenas). A multiple of the int8 block, so every piece but the last
        // is whole int8 blocks.
        const BLOCK: usize = 1 << 14;
        const _: () = assert!(BLOCK % BLOCK_VALUES == 0);
        let per = self.sum.len().div_ceil(threads).max(1 << 16).next_multiple_of(BLOCK);
        // Byte offset of (and, for a piece's length, bytes spanned by) a count of values that
        // is a multiple of the int8 block, or the update's end.
        let bytes_of = |values: usize| encoding.payload_bytes(values) as usize;
        let kernel = &kernel;
        std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for (t, part) in self.sum.chunks_mut(per).enumerate() {
                let file = &file;
                handles.push(scope.spawn(move || -> std::io::Result<()> {
                    let base = t * per;
                    let mut buf = vec![0u8; bytes_of(BLOCK.min(part.len()))];
                    for (b, block) in part.chunks_mut(BLOCK).enumerate() {
                        let bytes = &mut buf[..bytes_of(block.len())];
                        file.read_exact_at(bytes, bytes_of(base + b * BLOCK) as u64)?;
                        kernel(block, bytes, w);
                    }
                    Ok(())
                }));
            }
            handles.into_iter().try_for_each(|h| h.join().expect("fold thread panicked"))
        })
    }

    fn admit(&mut self, weight: u64) {
        assert!(self.can_take(weight), "total weight would exceed {MAX_TOTAL_WEIGHT}");
        self.total_weight += weight;
        self.updates += 1;
    }

    /// The sum of a secure round: the unmasked, decoded sum of `updates` contributions given as
    /// integers on the grid `2^grid_log2`, each contribution weighing 1 (the ring sum carries no
    /// per-client weights).
    ///
    /// Exactness: a grid integer `v` is the value `v·2^k`, which is `v·2^(k+24)` units of this
    /// sum. For `k ≥ −24` that is an exact integer shift (refused if it would leave `i64`); for a
    /// finer grid each coordinate is rounded once, to nearest with ties to even, to the 2⁻²⁴
    /// units every plain round is kept in: the same resolution as a plain round's per-update
    /// quantization, applied once to the sum instead of to each update.
    pub fn from_grid_integers(values: &[i64], grid_log2: i32, updates: u32) -> Result<Self, ValueError> {
        let shift = grid_log2 + SCALE_BITS;
        let sum = if shift >= 0 {
            let factor = 1i64.checked_shl(shift as u32).filter(|_| shift < 63);
            values
                .iter()
                .enumerate()
                .map(|(index, v)| {
                    factor.and_then(|f| v.checked_mul(f)).ok_or(ValueError::OutOfRange {
                        tensor: "(secure sum)".into(),
                        index,
                        value: (*v as f64 * 2f64.powi(grid_log2)) as f32,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            let down = (-shift).min(63) as u32;
            values.iter().map(|&v| round_shift_even(v, down)).collect()
        };
        Ok(Self { sum, total_weight: u64::from(updates), updates })
    }

    /// The weighted mean `Σ w·q / Σ w · 2⁻²⁴` as f32, or `None` before any update.
    pub fn mean(&self) -> Option<Vec<f32>> {
        if self.total_weight == 0 {
            return None;
        }
        Some(self.scaled(self.total_weight as f64))
    }

    /// The sum divided by `denominator`, `Σ w·q · 2⁻²⁴ / denominator`, rounded once to f32.
    pub fn scaled(&self, denominator: f64) -> Vec<f32> {
        let inv = 1.0 / (denominator * SCALE);
        self.sum.iter().map(|&s| (s as f64 * inv) as f32).collect()
    }

    /// The integer sums, for mechanisms that work on the grid itself (central noise now, masks
    /// of secure aggregation later). One unit is 2⁻²⁴ of a value.
    pub fn grid_mut(&mut self) -> &mut [i64] {
        &mut self.sum
    }
}

/// `v / 2^shift` rounded to nearest, ties to even, in integers.
fn round_shift_even(v: i64, shift: u32) -> i64 {
    if shift == 0 {
        return v;
    }
    let v = i128::from(v);
    let q = v >> shift; // floor
    let rem = v - (q << shift);
    let half = 1i128 << (shift - 1);
    let up = rem > half || (rem == half && q & 1 == 1);
    (q + i128::from(up)) as i64
}

/// `sum[i] += w · quantize(x[i])` for little-endian f32 `bytes`.
#[inline]
fn fold_le(sum: &mut [i64], bytes: &[u8], w: i64, scale: f32) {
    for (s, b) in sum.iter_mut().zip(bytes.chunks_exact(4)) {
        let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        *s += w * quantize(x, scale);
    }
}

/// Value ranges of the tensors of `full` that `keep` accepts, in `full`'s order.
pub fn segments_of(full: &Manifest, keep: impl Fn(&str) -> bool) -> Vec<Range<usize>> {
    full.ranges().filter(|(t, _)| keep(&t.name)).map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_shared::params::TensorSpec;

    fn manifest(n: usize) -> Manifest {
        Manifest::new(vec![
            TensorSpec { name: "a".into(), shape: vec![n / 2] },
            TensorSpec { name: "b".into(), shape: vec![n - n / 2] },
        ])
        .unwrap()
    }

    #[test]
    fn quantization_rounds_to_nearest_even_on_the_grid() {
        let step = (2.0f64).powi(-SCALE_BITS) as f32;
        assert_eq!(quantize(1.0, 1.0), 1 << 24);
        assert_eq!(quantize(-step, 1.0), -1);
        assert_eq!(quantize(step * 0.5, 1.0), 0); // tie → even (0)
        assert_eq!(quantize(step * 1.5, 1.0), 2); // tie → even (2)
        assert_eq!(quantize(MAX_ABS_VALUE, 1.0), 1i64 << 32);
        assert_eq!(quantize(2.0, 0.5), 1 << 24);
    }

    #[test]
    fn the_sum_is_bitwise_independent_of_arrival_order() {
        let updates: Vec<(Vec<f32>, u64)> = (0..5)
            .map(|k| {
                ((0..1000).map(|i| ((i * 7 + k * 13) % 97) as f32 * 1e-3 - 0.05).collect(), 1 + k as u64 * 10)
            })
            .collect();
        let mut forward = FixedPointSum::new(1000);
        for (u, w) in &updates {
            forward.fold_values(u, *w, 1.0);
        }
        let mut backward = FixedPointSum::new(1000);
        for (u, w) in updates.iter().rev() {
            backward.fold_values(u, *w, 1.0);
        }
        assert_eq!(forward, backward);
        assert_eq!(forward.mean().unwrap(), backward.mean().unwrap());
    }

    #[test]
    fn the_mean_is_within_half_a_grid_step_of_the_exact_weighted_mean() {
        let a: Vec<f32> = (0..500).map(|i| (i as f32).sin() * 0.01).collect();
        let b: Vec<f32> = (0..500).map(|i| (i as f32).cos() * 0.02).collect();
        let mut s = FixedPointSum::new(500);
        s.fold_values(&a, 3, 1.0);
        s.fold_values(&b, 5, 1.0);
        let mean = s.mean().unwrap();
        for i in 0..500 {
            let exact = (3.0 * f64::from(a[i]) + 5.0 * f64::from(b[i])) / 8.0;
            let tol = 2f64.powi(-25) + exact.abs() * 2f64.powi(-23);
            assert!((f64::from(mean[i]) - exact).abs() <= tol, "index {i}");
        }
    }

    #[test]
    fn folding_a_file_equals_folding_the_values() {
        let n = 300_001;
        let values: Vec<f32> = (0..n).map(|i| ((i % 1013) as f32 - 500.0) * 1e-4).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.bin");
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, &bytes).unwrap();
        let mut from_file = FixedPointSum::new(n);
        from_file.fold_file(&path, 7, 1.0, 3).unwrap();
        let mut from_values = FixedPointSum::new(n);
        from_values.fold_values(&values, 7, 1.0);
        assert_eq!(from_file, from_values);
    }

    #[test]
    fn folding_an_int8_file_equals_folding_its_decoded_values() {
        use fedtune_shared::compression::{decode, Int8Encoder};
        // Several threads' slices and a padded last block.
        let n = 300_001;
        let values: Vec<f32> = (0..n).map(|i| ((i % 1013) as f32 - 500.0) * 1e-4).collect();
        let bytes = Int8Encoder::seeded_for_tests(5).encode(&values, MAX_ABS_VALUE).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.bin");
        std::fs::write(&path, &bytes).unwrap();
        let mut from_file = FixedPointSum::new(n);
        from_file.fold_int8_file(&path, 7, 0.5, 3).unwrap();
        let mut from_values = FixedPointSum::new(n);
        from_values.fold_values(&decode(&bytes, n, MAX_ABS_VALUE).unwrap(), 7, 0.5);
        assert_eq!(from_file, from_values);
        // The same file read as f32 has the wrong length and changes nothing.
        let mut untouched = FixedPointSum::new(n);
        assert!(untouched.fold_file(&path, 1, 1.0, 2).is_err());
        assert_eq!(untouched, FixedPointSum::new(n));
    }

    #[test]
    fn a_spool_file_of_the_wrong_length_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.bin");
        std::fs::write(&path, [0u8; 12]).unwrap();
        let mut s = FixedPointSum::new(4);
        assert!(s.fold_file(&path, 1, 1.0, 1).is_err());
        assert_eq!(s, FixedPointSum::new(4));
    }

    #[test]
    fn value_checks_name_the_tensor_of_a_bad_value() {
        let m = manifest(10);
        let mut bytes: Vec<u8> = [0.5f32; 10].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!((check_values(&m, 0, &bytes).unwrap() - 2.5).abs() < 1e-12);
        bytes[28..32].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(check_values(&m, 0, &bytes), Err(ValueError::NonFinite { tensor: "b".into(), index: 7 }));
        bytes[28..32].copy_from_slice(&300f32.to_le_bytes());
        assert!(matches!(check_values(&m, 0, &bytes), Err(ValueError::OutOfRange { index: 7, .. })));
        // A chunk that starts mid-update reports the absolute index.
        assert!(check_values(&m, 2, &bytes[..8]).is_ok());
        assert_eq!(
            check_values(&m, 2, &bytes[24..32]),
            Err(ValueError::OutOfRange { tensor: "a".into(), index: 3, value: 300.0 })
        );
    }

    #[test]
    fn grid_integers_become_the_same_fixed_point_sum_exactly_on_grids_no_finer_than_2_pow_minus_24() {
        let ints = [3i64, -7, 0, 1 << 20];
        let sum = FixedPointSum::from_grid_integers(&ints, -20, 2).unwrap();
        assert_eq!(sum.raw(), &[3 << 4, -7 << 4, 0, 1 << 24]);
        assert_eq!((sum.total_weight(), sum.updates()), (2, 2));
        let same = FixedPointSum::from_grid_integers(&ints, -24, 1).unwrap();
        assert_eq!(same.raw(), &ints);
    }

    #[test]
    fn finer_grids_round_once_to_nearest_even_and_overflow_is_refused() {
        // Grid 2^-26: four grid steps per unit; 2 → 0.5 → 0 (even), 6 → 1.5 → 2, -6 → -1.5 → -2.
        let sum = FixedPointSum::from_grid_integers(&[2, 6, -6, 5], -26, 1).unwrap();
        assert_eq!(sum.raw(), &[0, 2, -2, 1]);
        assert!(FixedPointSum::from_grid_integers(&[1 << 40], 10, 1).is_err());
    }
}
