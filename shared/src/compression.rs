//! Compressed update encodings: the one home of the `INT8_BLOCK` upload format.
//!
//! # Wire layout (`UPDATE_ENCODING_INT8_BLOCK`)
//!
//! The f32 delta of `n` values (manifest order) is cut into `⌈n / 256⌉` blocks of
//! [`BLOCK_VALUES`] = 256 values. Each block travels as [`BLOCK_BYTES`] = 260 bytes:
//!
//! ```text
//! scale: f32 little-endian (4 bytes) ‖ 256 × code: i8 (two's complement)
//! ```
//!
//! value `i` of the block decodes to `f32::from(code_i) * scale` (one f32 product, see
//! [`decode_value`]). Codes lie in `[-127, 127]` (−128 is refused, so the code range is
//! symmetric and `|decoded| ≤ 127·scale`). The last block is padded to 256 codes with zeros,
//! and a non-zero padding code is refused, so every update has exactly one length
//! ([`UpdateEncoding::payload_bytes`]) and the payload stays a whole number of 4-byte words like
//! every other upload payload. A scale must be finite, non-negative and satisfy
//! `127 · scale ≤ max_abs` (computed in f32, the coordinator's value bound ±256), so no decoded
//! value can leave the range the fixed-point sum is proven safe for.
//!
//! # Why 256 values per block
//!
//! The error of a value is below its block's scale `max|x| / 127`, so a block should be small
//! enough that one large value (a LayerNorm weight, a bias, a value beside a tensor boundary)
//! does not coarsen the grid of many small ones; 256 is below the row width of every BERT
//! matrix (384 for MiniLM, 768 for BERT-base), so a block covers at most one or two rows. It is
//! large enough that the scale costs 4 / 256 = 1.6 % on top of one byte per value: a payload
//! is 260 / 1024 ≈ 0.254 of the f32 delta's size. 4096-value blocks would save 1.5 % of the
//! bytes and widen the grid of every small block-mate of a large value sixteen times as often.
//!
//! # Rounding
//!
//! Each value is rounded to one of the two neighbouring codes of `t = x / scale` at random,
//! up with probability `t − ⌊t⌋`: `E[code] = t`, so `E[decode(encode(x))] = x` up to the f32
//! rounding of the decode product (relative 2⁻²⁴), and averaging many clients' updates
//! averages the rounding noise away instead of accumulating a bias as round-to-nearest would.
//! The per-value error is below one step, `scale`. The randomness comes from a ChaCha20
//! generator keyed from the operating system's CSPRNG ([`Int8Encoder::from_os_entropy`]), one
//! key per pipeline: the errors average out over clients and rounds only if they are
//! independent, which generators seeded alike (say from the round number) would not give.
//! Under differential privacy the encoding is post-processing of the noised update whatever
//! its randomness.
//!
//! Encoding is the client's last pipeline step (after clipping, noise and the range check);
//! the coordinator checks every block while it spools the upload ([`Int8StreamCheck`]) and
//! decodes block by block while folding.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Values per block.
pub const BLOCK_VALUES: usize = 256;
/// Bytes of a block's scale (f32 LE).
pub const SCALE_BYTES: usize = 4;
/// Bytes per block on the wire: the scale, then one code per value.
pub const BLOCK_BYTES: usize = SCALE_BYTES + BLOCK_VALUES;
/// Largest code magnitude.
pub const MAX_CODE: i8 = 127;

// A block is a whole number of 4-byte words, so a payload is one too, and the scale of every
// block lies within one 4-byte-aligned chunk.
const _: () = assert!(BLOCK_BYTES % 4 == 0);

/// How an upload's payload encodes the update (wire `UpdateEncoding`, less the masked input of
/// secure aggregation, which has its own header type). Also the federation setting
/// `fit.update_encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateEncoding {
    /// Little-endian f32 per value (`UPDATE_ENCODING_F32_DELTA`).
    #[default]
    F32,
    /// Blocks of 256 i8 codes under an f32 scale (`UPDATE_ENCODING_INT8_BLOCK`).
    Int8,
}

impl UpdateEncoding {
    /// The setting's name (`"f32"`, `"int8"`).
    pub fn name(self) -> &'static str {
        match self {
            UpdateEncoding::F32 => "f32",
            UpdateEncoding::Int8 => "int8",
        }
    }

    /// The exact payload length of an update of `values` values.
    pub fn payload_bytes(self, values: usize) -> u64 {
        match self {
            UpdateEncoding::F32 => values as u64 * 4,
            UpdateEncoding::Int8 => blocks(values) as u64 * BLOCK_BYTES as u64,
        }
    }
}

impl std::str::FromStr for UpdateEncoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [UpdateEncoding::F32, UpdateEncoding::Int8]
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| format!("unknown update encoding `{s}` (use f32 or int8)"))
    }
}

impl std::fmt::Display for UpdateEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Blocks of an update of `values` values.
pub fn blocks(values: usize) -> usize {
    values.div_ceil(BLOCK_VALUES)
}

/// Why a vector cannot be encoded, or a payload cannot be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompressionError {
    /// NaN or infinity in the update.
    #[error("value at flat index {index} is not finite")]
    NonFinite {
        /// Flat index.
        index: usize,
    },
    /// A value beyond the bound the payload must respect.
    #[error("value {value} at flat index {index} exceeds ±{bound}")]
    OutOfRange {
        /// Flat index.
        index: usize,
        /// The value.
        value: f32,
        /// The bound.
        bound: f32,
    },
    /// The payload length does not fit the update's length.
    #[error("payload of {got} bytes, an int8 update of {values} values has {expected}")]
    Length {
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        expected: u64,
        /// Values of the update.
        values: usize,
    },
    /// A block's scale is NaN, infinite, negative, or lets decoded values exceed the bound.
    #[error("block {block} has scale {scale}: scales must be finite, non-negative and at most {bound}/127")]
    BadScale {
        /// Block index.
        block: usize,
        /// The scale.
        scale: f32,
        /// The value bound.
        bound: f32,
    },
    /// The code −128 (outside the symmetric range).
    #[error("block {block} holds the code -128 at flat index {index}; codes lie in [-127, 127]")]
    BadCode {
        /// Block index.
        block: usize,
        /// Flat value index.
        index: usize,
    },
    /// A padding code of the last block is not zero.
    #[error("block {block} has a non-zero padding code at position {position}")]
    Padding {
        /// Block index.
        block: usize,
        /// Position within the block.
        position: usize,
    },
    /// The bound itself is unusable (NaN, infinite, not positive).
    #[error("value bound {0} is unusable")]
    Bound(f32),
    /// The operating system's random generator failed.
    #[error("the operating system's random generator failed")]
    Entropy,
}

/// The one decode rule: a code times its block's scale, one f32 product.
#[inline(always)]
pub fn decode_value(code: i8, scale: f32) -> f32 {
    f32::from(code) * scale
}

/// Whether `scale` is an admissible block scale under the value bound `max_abs`.
#[inline]
pub fn scale_is_valid(scale: f32, max_abs: f32) -> bool {
    scale.is_finite() && scale >= 0.0 && f32::from(MAX_CODE) * scale <= max_abs
}

fn check_bound(max_abs: f32) -> Result<(), CompressionError> {
    if max_abs.is_finite() && max_abs > 0.0 {
        Ok(())
    } else {
        Err(CompressionError::Bound(max_abs))
    }
}

/// Stochastic-rounding encoder of `INT8_BLOCK` payloads.
pub struct Int8Encoder {
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for Int8Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs: it would let anyone replay the rounding.
        f.debug_struct("Int8Encoder").finish_non_exhaustive()
    }
}

impl Int8Encoder {
    /// An encoder whose ChaCha20 key is 256 bits from the operating system's CSPRNG.
    pub fn from_os_entropy() -> Result<Self, CompressionError> {
        let mut seed = [0u8; 32];
        SystemRandom::new().fill(&mut seed).map_err(|_| CompressionError::Entropy)?;
        Ok(Self { rng: ChaCha20Rng::from_seed(seed) })
    }

    /// A reproducible encoder for tests only: its rounding is predictable from `seed`.
    pub fn seeded_for_tests(seed: u64) -> Self {
        Self { rng: ChaCha20Rng::seed_from_u64(seed) }
    }

    /// Encodes `values`, each of which must be finite and within ±`max_abs` (the coordinator's
    /// value bound), into an `INT8_BLOCK` payload.
    pub fn encode(&mut self, values: &[f32], max_abs: f32) -> Result<Vec<u8>, CompressionError> {
        check_bound(max_abs)?;
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(CompressionError::NonFinite { index });
        }
        if let Some(index) = values.iter().position(|v| v.abs() > max_abs) {
            return Err(CompressionError::OutOfRange { index, value: values[index], bound: max_abs });
        }
        let mut out = Vec::with_capacity(UpdateEncoding::Int8.payload_bytes(values.len()) as usize);
        for block in values.chunks(BLOCK_VALUES) {
            let scale = block_scale(block, max_abs);
            out.extend_from_slice(&scale.to_le_bytes());
            let inverse = if scale > 0.0 { 1.0 / f64::from(scale) } else { 0.0 };
            for &x in block {
                out.push(self.round(f64::from(x) * inverse) as u8);
            }
            out.resize(out.len() + BLOCK_VALUES - block.len(), 0);
        }
        Ok(out)
    }

    /// `⌊t⌋ + 1` with probability `t − ⌊t⌋`, else `⌊t⌋`, for `t` clamped to ±127 (it can
    /// exceed 127 by a rounding error of the scale only).
    #[inline]
    fn round(&mut self, t: f64) -> i8 {
        let t = t.clamp(-f64::from(MAX_CODE), f64::from(MAX_CODE));
        let floor = t.floor();
        // 53 random bits: u uniform on [0, 1) with a step of 2⁻⁵³, so P(u < p) = p up to 2⁻⁵³.
        let u = (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let up = u < t - floor;
        (floor as i8).saturating_add(i8::from(up))
    }
}

/// `max|x| / 127`, lowered by ulps until `127 · scale ≤ max_abs` holds in f32 (division and
/// product each round, and at the bound itself the product may land one ulp above it).
fn block_scale(block: &[f32], max_abs: f32) -> f32 {
    let largest = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut scale = largest / f32::from(MAX_CODE);
    while scale > 0.0 && !scale_is_valid(scale, max_abs) {
        scale = f32::from_bits(scale.to_bits() - 1);
    }
    scale
}

/// Decodes an `INT8_BLOCK` payload of an update of `values` values, checking every block
/// against the value bound `max_abs`.
pub fn decode(bytes: &[u8], values: usize, max_abs: f32) -> Result<Vec<f32>, CompressionError> {
    let mut check = Int8StreamCheck::new(values, max_abs)?;
    check.feed(bytes)?;
    check.finish()?;
    let mut out = Vec::with_capacity(values);
    for block in bytes.chunks_exact(BLOCK_BYTES) {
        let (scale, codes) = split_block(block);
        let take = (values - out.len()).min(BLOCK_VALUES);
        out.extend(codes[..take].iter().map(|&c| decode_value(c as i8, scale)));
    }
    Ok(out)
}

/// One block's scale and codes (`block` is [`BLOCK_BYTES`] long; checked by
/// [`Int8StreamCheck`] before anything is decoded).
#[inline]
pub fn split_block(block: &[u8]) -> (f32, &[u8]) {
    let scale = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    (scale, &block[SCALE_BYTES..BLOCK_BYTES])
}

/// Checks an `INT8_BLOCK` payload as it arrives in pieces of any length (a block may straddle
/// two upload chunks): every scale, every code, the padding, and at the end the length. Also
/// sums the squares of the decoded values (the update's norm as received).
#[derive(Debug, Clone)]
pub struct Int8StreamCheck {
    values: usize,
    max_abs: f32,
    position: u64,
    scale_bytes: [u8; SCALE_BYTES],
    scale: f32,
    sumsq: f64,
}

impl Int8StreamCheck {
    /// A check of the payload of an update of `values` values under the value bound `max_abs`.
    pub fn new(values: usize, max_abs: f32) -> Result<Self, CompressionError> {
        check_bound(max_abs)?;
        Ok(Self { values, max_abs, position: 0, scale_bytes: [0; SCALE_BYTES], scale: 0.0, sumsq: 0.0 })
    }

    /// Checks the next `data` of the payload.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), CompressionError> {
        let expected = UpdateEncoding::Int8.payload_bytes(self.values);
        if self.position + data.len() as u64 > expected {
            return Err(CompressionError::Length {
                got: (self.position + data.len() as u64) as usize,
                expected,
                values: self.values,
            });
        }
        for &byte in data {
            let block = (self.position / BLOCK_BYTES as u64) as usize;
            let within = (self.position % BLOCK_BYTES as u64) as usize;
            self.position += 1;
            if within < SCALE_BYTES {
                self.scale_bytes[within] = byte;
                if within == SCALE_BYTES - 1 {
                    let scale = f32::from_le_bytes(self.scale_bytes);
                    if !scale_is_valid(scale, self.max_abs) {
                        return Err(CompressionError::BadScale { block, scale, bound: self.max_abs });
                    }
                    self.scale = scale;
                }
                continue;
            }
            let position = within - SCALE_BYTES;
            let index = block * BLOCK_VALUES + position;
            let code = byte as i8;
            if index >= self.values {
                if code != 0 {
                    return Err(CompressionError::Padding { block, position });
                }
            } else if code == i8::MIN {
                return Err(CompressionError::BadCode { block, index });
            } else {
                let v = f64::from(decode_value(code, self.scale));
                self.sumsq += v * v;
            }
        }
        Ok(())
    }

    /// Refuses a payload that ended early.
    pub fn finish(&self) -> Result<(), CompressionError> {
        let expected = UpdateEncoding::Int8.payload_bytes(self.values);
        if self.position != expected {
            return Err(CompressionError::Length {
                got: self.position as usize,
                expected,
                values: self.values,
            });
        }
        Ok(())
    }

    /// Sum of the squared decoded values seen so far.
    pub fn sum_of_squares(&self) -> f64 {
        self.sumsq
    }
}

/// How a federation publishes model versions to clients that hold the previous one (the
/// setting `model.download_encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadEncoding {
    /// Every download is the f32 weights.
    #[default]
    F32,
    /// Version v ≥ 1 is published as `w_{v−1} + decode(encode(w_v − w_{v−1}))` ([`apply_delta`])
    /// and a client holding `w_{v−1}` downloads only the encoded step (`INT8_BLOCK` layout).
    Int8Delta,
}

impl DownloadEncoding {
    /// The setting's name (`"f32"`, `"int8_delta"`).
    pub fn name(self) -> &'static str {
        match self {
            DownloadEncoding::F32 => "f32",
            DownloadEncoding::Int8Delta => "int8_delta",
        }
    }
}

impl std::str::FromStr for DownloadEncoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [DownloadEncoding::F32, DownloadEncoding::Int8Delta]
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| format!("unknown download encoding `{s}` (use f32 or int8_delta)"))
    }
}

impl std::fmt::Display for DownloadEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The value bound of a published model step: any finite f32. A step is not a client's
/// update, so the coordinator's update bound does not apply; a non-finite step cannot be
/// encoded and the version is then published in f32 only.
pub const MODEL_STEP_BOUND: f32 = f32::MAX;

/// The one rule that turns a base and an encoded step into weights: value `i` is
/// `base[i] + decode(step)[i]`, one f32 addition. The coordinator defines each 8-bit published
/// version with it and clients rebuild that version with it, so both hold the same bits.
pub fn apply_delta(base: &[f32], step: &[u8]) -> Result<Vec<f32>, CompressionError> {
    let decoded = decode(step, base.len(), MODEL_STEP_BOUND)?;
    Ok(base.iter().zip(decoded).map(|(&b, d)| b + d).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BOUND: f32 = crate::limits::MAX_ABS_UPDATE_VALUE;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| ((rand::RngCore::next_u32(&mut rng) as f64 / u32::MAX as f64) * 2.0 - 1.0) as f32 * 1e-3)
            .collect()
    }

    #[test]
    fn a_payload_is_260_bytes_per_256_values_and_the_last_block_is_padded() {
        assert_eq!(UpdateEncoding::Int8.payload_bytes(0), 0);
        assert_eq!(UpdateEncoding::Int8.payload_bytes(1), 260);
        assert_eq!(UpdateEncoding::Int8.payload_bytes(256), 260);
        assert_eq!(UpdateEncoding::Int8.payload_bytes(257), 520);
        assert_eq!(UpdateEncoding::F32.payload_bytes(257), 1028);
        let bytes = Int8Encoder::seeded_for_tests(1).encode(&values(300, 1), BOUND).unwrap();
        assert_eq!(bytes.len(), 520);
        assert!(bytes[260 + 4 + 44..].iter().all(|&b| b == 0), "padding is zero");
    }

    #[test]
    fn the_documented_block_decodes_to_code_times_scale() {
        // scale 0.5, codes 2, -3, 127, -127, then padding: values 1, -1.5, 63.5, -63.5.
        let mut block = 0.5f32.to_le_bytes().to_vec();
        block.extend([2u8, (-3i8) as u8, 127, (-127i8) as u8]);
        block.resize(BLOCK_BYTES, 0);
        assert_eq!(decode(&block, 4, BOUND).unwrap(), vec![1.0, -1.5, 63.5, -63.5]);
    }

    #[test]
    fn the_mean_of_many_encodings_converges_to_the_input() {
        // Each decode is x plus a zero-mean error of at most one step s (variance ≤ s²/4), so the
        // mean of N decodes is within 6·s/(2·√N) of x with overwhelming probability; with
        // N = 4000 that is 0.048·s. A biased rounding (to nearest, or always down) is off by up
        // to s/2 for most values and fails this.
        let x = values(512, 3);
        let mut encoder = Int8Encoder::seeded_for_tests(4);
        let n = 4000;
        let mut mean = vec![0f64; x.len()];
        let mut scales = [0f32; 2];
        for _ in 0..n {
            let bytes = encoder.encode(&x, BOUND).unwrap();
            for (b, block) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
                scales[b] = split_block(block).0;
            }
            for (m, v) in mean.iter_mut().zip(decode(&bytes, x.len(), BOUND).unwrap()) {
                *m += f64::from(v) / f64::from(n);
            }
        }
        for (i, (m, x)) in mean.iter().zip(&x).enumerate() {
            let step = f64::from(scales[i / BLOCK_VALUES]);
            let tolerance = 3.0 * step / (f64::from(n)).sqrt() + f64::from(x.abs()) * 1e-6;
            assert!((m - f64::from(*x)).abs() <= tolerance, "index {i}: mean {m} vs {x} (step {step})");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_decoded_value_is_within_one_step_of_its_input(
            xs in proptest::collection::vec(-300.0f32..300.0, 1..700),
            seed in any::<u64>(),
        ) {
            let xs: Vec<f32> = xs.into_iter().map(|v| v.clamp(-BOUND, BOUND)).collect();
            let bytes = Int8Encoder::seeded_for_tests(seed).encode(&xs, BOUND).unwrap();
            prop_assert_eq!(bytes.len() as u64, UpdateEncoding::Int8.payload_bytes(xs.len()));
            let decoded = decode(&bytes, xs.len(), BOUND).unwrap();
            for (i, (x, d)) in xs.iter().zip(&decoded).enumerate() {
                let (scale, _) = split_block(&bytes[i / BLOCK_VALUES * BLOCK_BYTES..]);
                prop_assert!(scale_is_valid(scale, BOUND));
                prop_assert!(d.abs() <= BOUND);
                // One step, plus the f32 rounding of the decode product.
                prop_assert!((x - d).abs() <= scale * (1.0 + 1e-6), "index {}: {} vs {} (scale {})", i, x, d, scale);
            }
        }

        #[test]
        fn a_payload_checked_in_pieces_is_checked_as_a_whole(
            xs in proptest::collection::vec(-1.0f32..1.0, 1..900),
            cut in 0usize..2000,
        ) {
            let bytes = Int8Encoder::seeded_for_tests(0).encode(&xs, BOUND).unwrap();
            let cut = cut.min(bytes.len());
            let mut pieces = Int8StreamCheck::new(xs.len(), BOUND).unwrap();
            pieces.feed(&bytes[..cut]).unwrap();
            pieces.feed(&bytes[cut..]).unwrap();
            pieces.finish().unwrap();
            let whole: f64 = decode(&bytes, xs.len(), BOUND).unwrap().iter().map(|v| f64::from(*v).powi(2)).sum();
            prop_assert!((pieces.sum_of_squares() - whole).abs() <= whole * 1e-12);
        }
    }

    #[test]
    fn nan_and_infinite_values_and_values_beyond_the_bound_are_refused() {
        let mut encoder = Int8Encoder::seeded_for_tests(0);
        let mut x = vec![0.1f32; 10];
        x[3] = f32::NAN;
        assert_eq!(encoder.encode(&x, BOUND), Err(CompressionError::NonFinite { index: 3 }));
        x[3] = f32::NEG_INFINITY;
        assert_eq!(encoder.encode(&x, BOUND), Err(CompressionError::NonFinite { index: 3 }));
        x[3] = 2.0;
        assert!(matches!(encoder.encode(&x, 1.0), Err(CompressionError::OutOfRange { index: 3, .. })));
        assert!(matches!(encoder.encode(&[0.1], f32::NAN), Err(CompressionError::Bound(_))));
        // Values at the bound itself encode, with a scale the bound admits.
        let bytes = encoder.encode(&[BOUND, -BOUND, 1.0], BOUND).unwrap();
        assert!(scale_is_valid(split_block(&bytes).0, BOUND));
    }

    #[test]
    fn nan_infinite_negative_and_oversized_scales_are_refused() {
        let good = Int8Encoder::seeded_for_tests(0).encode(&values(10, 2), BOUND).unwrap();
        for scale in [f32::NAN, f32::INFINITY, -1.0, 3.0] {
            let mut bad = good.clone();
            bad[..4].copy_from_slice(&scale.to_le_bytes());
            let err = decode(&bad, 10, BOUND).unwrap_err();
            assert!(matches!(err, CompressionError::BadScale { block: 0, .. }), "{scale}: {err}");
        }
    }

    #[test]
    fn wrong_lengths_a_code_of_minus_128_and_non_zero_padding_are_refused() {
        let good = Int8Encoder::seeded_for_tests(0).encode(&values(300, 2), BOUND).unwrap();
        assert!(matches!(decode(&good[..516], 300, BOUND), Err(CompressionError::Length { .. })));
        let mut longer = good.clone();
        longer.extend([0u8; 4]);
        assert!(matches!(decode(&longer, 300, BOUND), Err(CompressionError::Length { .. })));
        assert!(matches!(decode(&good, 600, BOUND), Err(CompressionError::Length { .. })));
        let mut minus128 = good.clone();
        minus128[260 + 4 + 7] = 0x80;
        assert_eq!(decode(&minus128, 300, BOUND), Err(CompressionError::BadCode { block: 1, index: 263 }));
        let mut padded = good;
        padded[260 + 4 + 50] = 1;
        assert_eq!(decode(&padded, 300, BOUND), Err(CompressionError::Padding { block: 1, position: 50 }));
    }

    #[test]
    fn the_setting_reads_f32_and_int8() {
        #[derive(Deserialize)]
        struct S {
            e: UpdateEncoding,
        }
        assert_eq!(toml::from_str::<S>("e = \"int8\"").unwrap().e, UpdateEncoding::Int8);
        assert_eq!(toml::from_str::<S>("e = \"f32\"").unwrap().e, UpdateEncoding::F32);
        assert!(toml::from_str::<S>("e = \"int4\"").is_err());
        assert_eq!("int8".parse::<UpdateEncoding>(), Ok(UpdateEncoding::Int8));
        assert!("int4".parse::<UpdateEncoding>().unwrap_err().contains("int4"));
    }
}
