//! Shamir secret sharing of 32-byte secrets over the prime field GF(2^61 − 1).
//!
//! # Why a small module and not a crate
//! The crates looked at either cap the number of holders at 255 (byte-wise sharing over
//! GF(2^8), as `sharks` and most "split a password" crates do), or, like `vsss-rs`, are generic
//! over an elliptic-curve scalar field (`ff::PrimeField`), which would bring a curve crate and
//! the `ff`/`group`/`elliptic-curve` family into a tree that otherwise uses ring alone, for the
//! twenty lines of field arithmetic that Shamir needs. SecAgg+ neighbourhoods are sized by the
//! operator and may exceed 255 (the complete graph at a few hundred clients), so the holder
//! index must be wide. A Mersenne prime keeps the arithmetic to one `u128` product and two
//! folds, with no big-integer code to review.
//!
//! # Encoding
//! A secret of 32 bytes is cut into [`CHUNKS`] chunks of 7 bytes (the last one 4 bytes), each
//! read as a little-endian integer below 2^56 < p, and every chunk is shared with its own
//! independent random polynomial of degree `threshold − 1`. A share is the holder's index `x`
//! (never 0: the secret sits at `x = 0`) and the [`CHUNKS`] polynomial values at `x`. Sharing each
//! chunk independently keeps Shamir's perfect secrecy per chunk, hence for the whole secret.
//!
//! Reconstruction checks that every chunk decodes below 2^56; with fewer than `threshold` honest
//! shares the interpolated value is uniformly random, so it decodes at all with probability
//! (2^56/p)^4 · 2^32/p ≈ 2^-49, and is refused otherwise (never equal to the secret but by chance). Shares are not authenticated here: the
//! protocol delivers them inside AEAD-sealed messages, and a holder lying in the unmasking step
//! is outside the honest-but-curious model (see `docs/secure-aggregation.md`).

use std::collections::BTreeSet;
use std::fmt;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The field modulus, the Mersenne prime 2^61 − 1.
pub const MODULUS: u64 = (1 << 61) - 1;

/// Bytes of secret per field element: 7 bytes = 56 bits < 61 bits.
const CHUNK_BYTES: usize = 7;

/// Field elements per share of a 32-byte secret.
pub const CHUNKS: usize = 32usize.div_ceil(CHUNK_BYTES);

/// Encoded size of one share's values (without its index): [`CHUNKS`] little-endian `u64`s.
pub const SHARE_VALUE_BYTES: usize = CHUNKS * 8;

/// What can go wrong when sharing or reconstructing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShamirError {
    /// The threshold is 0 or larger than the number of holders.
    #[error("threshold {threshold} is impossible with {holders} holders (need 1 ≤ threshold ≤ holders)")]
    BadThreshold {
        /// The threshold asked for.
        threshold: usize,
        /// How many holders there are.
        holders: usize,
    },
    /// A holder index is 0 (the secret's own position) or not below the field modulus.
    #[error("holder index {0} is invalid: indices are 1 ≤ x < 2^61 − 1")]
    BadIndex(u64),
    /// The same holder index appears twice among holders or among the shares offered.
    #[error("holder index {0} appears twice")]
    DuplicateIndex(u64),
    /// A share's index is not one of the holders the secret was shared to.
    #[error("share index {0} does not belong to any holder of this secret")]
    UnknownIndex(u64),
    /// Fewer shares than the threshold were offered.
    #[error("{have} shares offered, {need} needed")]
    NotEnoughShares {
        /// Shares offered.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// A share value is not a field element, or its encoding has the wrong length.
    #[error("malformed share: {0}")]
    Malformed(String),
    /// The interpolated value is not the encoding of any 32-byte secret: the shares are not
    /// `threshold` consistent shares of one secret.
    #[error("the shares do not interpolate to a valid secret")]
    Inconsistent,
}

/// One holder's share of one 32-byte secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    x: u64,
    values: [u64; CHUNKS],
}

impl Share {
    /// The holder index this share was evaluated at.
    pub fn index(&self) -> u64 {
        self.x
    }

    /// The share values, [`SHARE_VALUE_BYTES`] bytes (the index is implied by who holds it).
    pub fn value_bytes(&self) -> [u8; SHARE_VALUE_BYTES] {
        let mut out = [0u8; SHARE_VALUE_BYTES];
        for (dst, v) in out.chunks_exact_mut(8).zip(self.values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Rebuilds a share from its holder index and value bytes, checking every value is a field
    /// element.
    pub fn from_value_bytes(x: u64, bytes: &[u8]) -> Result<Self, ShamirError> {
        if x == 0 || x >= MODULUS {
            return Err(ShamirError::BadIndex(x));
        }
        if bytes.len() != SHARE_VALUE_BYTES {
            return Err(ShamirError::Malformed(format!(
                "{} value bytes, a share has {SHARE_VALUE_BYTES}",
                bytes.len()
            )));
        }
        let mut values = [0u64; CHUNKS];
        for (v, src) in values.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(src);
            *v = u64::from_le_bytes(word);
            if *v >= MODULUS {
                return Err(ShamirError::Malformed("a value is not below 2^61 − 1".into()));
            }
        }
        Ok(Share { x, values })
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share").field("x", &self.x).field("values", &format_args!("<redacted>")).finish()
    }
}

/// A threshold and the set of holder indices one secret is shared to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheme {
    threshold: usize,
    holders: BTreeSet<u64>,
}

impl Scheme {
    /// `threshold`-of-`holders` sharing; holders are distinct indices in `1..2^61−1`.
    pub fn new(threshold: usize, holders: impl IntoIterator<Item = u64>) -> Result<Self, ShamirError> {
        let mut set = BTreeSet::new();
        for x in holders {
            if x == 0 || x >= MODULUS {
                return Err(ShamirError::BadIndex(x));
            }
            if !set.insert(x) {
                return Err(ShamirError::DuplicateIndex(x));
            }
        }
        if threshold == 0 || threshold > set.len() {
            return Err(ShamirError::BadThreshold { threshold, holders: set.len() });
        }
        Ok(Scheme { threshold, holders: set })
    }

    /// How many shares reconstruct.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The holder indices, ascending.
    pub fn holders(&self) -> impl Iterator<Item = u64> + '_ {
        self.holders.iter().copied()
    }

    /// Splits `secret` into one share per holder, in ascending holder order. The polynomial
    /// coefficients come from a ChaCha20 generator seeded by the operating system.
    pub fn split(&self, secret: &[u8; 32]) -> Result<Vec<Share>, ShamirError> {
        let mut rng = os_seeded_rng()?;
        let chunks = encode(secret);
        // coefficients[c][j]: coefficient of x^j of chunk c's polynomial; [c][0] is the chunk.
        let coefficients: Vec<Vec<u64>> = chunks
            .iter()
            .map(|&c| {
                let mut poly = Vec::with_capacity(self.threshold);
                poly.push(c);
                poly.extend((1..self.threshold).map(|_| random_element(&mut rng)));
                poly
            })
            .collect();
        Ok(self
            .holders
            .iter()
            .map(|&x| {
                let mut values = [0u64; CHUNKS];
                for (v, poly) in values.iter_mut().zip(&coefficients) {
                    // Horner's rule from the highest coefficient down.
                    *v = poly.iter().rev().fold(0, |acc, &a| add(mul(acc, x), a));
                }
                Share { x, values }
            })
            .collect())
    }

    /// Reconstructs the secret from at least `threshold` shares of distinct holders of this
    /// scheme (only the first `threshold` are used).
    pub fn combine(&self, shares: &[Share]) -> Result<[u8; 32], ShamirError> {
        let mut seen = BTreeSet::new();
        for s in shares {
            if !self.holders.contains(&s.x) {
                return Err(ShamirError::UnknownIndex(s.x));
            }
            if !seen.insert(s.x) {
                return Err(ShamirError::DuplicateIndex(s.x));
            }
        }
        if shares.len() < self.threshold {
            return Err(ShamirError::NotEnoughShares { have: shares.len(), need: self.threshold });
        }
        interpolate_at_zero(&shares[..self.threshold])
    }
}

/// Lagrange interpolation at 0 of shares with distinct non-zero indices, then decoding.
fn interpolate_at_zero(shares: &[Share]) -> Result<[u8; 32], ShamirError> {
    let mut chunks = [0u64; CHUNKS];
    for (i, si) in shares.iter().enumerate() {
        // λ_i = Π_{j≠i} x_j / (x_j − x_i)
        let (mut num, mut den) = (1u64, 1u64);
        for (j, sj) in shares.iter().enumerate() {
            if i != j {
                num = mul(num, sj.x);
                den = mul(den, sub(sj.x, si.x));
            }
        }
        let lambda = mul(num, inverse(den));
        for (c, v) in chunks.iter_mut().zip(si.values) {
            *c = add(*c, mul(lambda, v));
        }
    }
    decode(&chunks)
}

fn encode(secret: &[u8; 32]) -> [u64; CHUNKS] {
    let mut out = [0u64; CHUNKS];
    for (o, bytes) in out.iter_mut().zip(secret.chunks(CHUNK_BYTES)) {
        let mut word = [0u8; 8];
        word[..bytes.len()].copy_from_slice(bytes);
        *o = u64::from_le_bytes(word);
    }
    out
}

fn decode(chunks: &[u64; CHUNKS]) -> Result<[u8; 32], ShamirError> {
    let mut out = [0u8; 32];
    for (dst, &c) in out.chunks_mut(CHUNK_BYTES).zip(chunks) {
        let bytes = c.to_le_bytes();
        if bytes[dst.len()..].iter().any(|&b| b != 0) {
            return Err(ShamirError::Inconsistent);
        }
        dst.copy_from_slice(&bytes[..dst.len()]);
    }
    Ok(out)
}

fn os_seeded_rng() -> Result<ChaCha20Rng, ShamirError> {
    use ring::rand::SecureRandom as _;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| ShamirError::Malformed("the operating system's random generator failed".into()))?;
    Ok(ChaCha20Rng::from_seed(seed))
}

/// A uniform field element: 61 random bits, rejected when equal to the modulus itself.
fn random_element(rng: &mut ChaCha20Rng) -> u64 {
    loop {
        let v = rng.next_u64() & MODULUS;
        if v < MODULUS {
            return v;
        }
    }
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b; // both < 2^61, no overflow
    if s >= MODULUS {
        s - MODULUS
    } else {
        s
    }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b {
        a - b
    } else {
        a + MODULUS - b
    }
}

fn mul(a: u64, b: u64) -> u64 {
    let z = u128::from(a) * u128::from(b);
    // 2^61 ≡ 1 (mod p): fold the high bits onto the low ones, twice to get below 2^62.
    let folded = (z as u64 & MODULUS) + (z >> 61) as u64;
    let folded = (folded & MODULUS) + (folded >> 61);
    if folded >= MODULUS {
        folded - MODULUS
    } else {
        folded
    }
}

/// Multiplicative inverse by Fermat's little theorem (a^(p−2)); `a` is non-zero here because
/// holder indices are distinct and non-zero.
fn inverse(a: u64) -> u64 {
    let (mut base, mut exp, mut acc) = (a, MODULUS - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(tag: u8) -> [u8; 32] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(tag))
    }

    #[test]
    fn field_arithmetic_agrees_with_u128_reference() {
        let samples = [0, 1, 2, MODULUS - 1, MODULUS - 2, 1 << 60, 123_456_789_012_345, (1 << 61) - 3];
        for &a in &samples {
            for &b in &samples {
                let p = u128::from(MODULUS);
                assert_eq!(u128::from(mul(a, b)), u128::from(a) * u128::from(b) % p, "{a}·{b}");
                assert_eq!(u128::from(add(a, b)), (u128::from(a) + u128::from(b)) % p);
                assert_eq!(u128::from(sub(a, b)), (u128::from(a) + p - u128::from(b)) % p);
                if a != 0 {
                    assert_eq!(mul(a, inverse(a)), 1);
                }
            }
        }
    }

    #[test]
    fn any_threshold_many_shares_reconstruct_the_secret() {
        let scheme = Scheme::new(3, 1..=5).unwrap();
        let shares = scheme.split(&secret(1)).unwrap();
        assert_eq!(shares.len(), 5);
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let pick = [shares[a].clone(), shares[b].clone(), shares[c].clone()];
                    assert_eq!(scheme.combine(&pick).unwrap(), secret(1), "shares {a},{b},{c}");
                }
            }
        }
        assert_eq!(scheme.combine(&shares).unwrap(), secret(1), "more than the threshold is fine");
    }

    #[test]
    fn holder_indices_well_above_255_work() {
        let holders: Vec<u64> = (1..=600).map(|i| i * 997).collect();
        let scheme = Scheme::new(400, holders).unwrap();
        let shares = scheme.split(&secret(9)).unwrap();
        let last: Vec<Share> = shares[200..].to_vec();
        assert_eq!(scheme.combine(&last).unwrap(), secret(9));
    }

    #[test]
    fn fewer_than_threshold_shares_do_not_give_the_secret() {
        let scheme = Scheme::new(4, 1..=6).unwrap();
        let shares = scheme.split(&secret(2)).unwrap();
        assert_eq!(scheme.combine(&shares[..3]), Err(ShamirError::NotEnoughShares { have: 3, need: 4 }));
        // Interpolating the 3 shares as if the threshold were 3 yields some other value (or an
        // undecodable one), never the secret.
        let weaker = Scheme::new(3, 1..=6).unwrap();
        assert_ne!(weaker.combine(&shares[..3]), Ok(secret(2)));
    }

    #[test]
    fn duplicate_and_unknown_share_indices_are_refused() {
        let scheme = Scheme::new(2, [3, 5, 7]).unwrap();
        let shares = scheme.split(&secret(3)).unwrap();
        assert_eq!(
            scheme.combine(&[shares[0].clone(), shares[0].clone()]),
            Err(ShamirError::DuplicateIndex(3))
        );
        let stranger = Share::from_value_bytes(4, &shares[1].value_bytes()).unwrap();
        assert_eq!(scheme.combine(&[shares[0].clone(), stranger]), Err(ShamirError::UnknownIndex(4)));
        assert_eq!(Scheme::new(2, [1, 1, 2]), Err(ShamirError::DuplicateIndex(1)));
        assert_eq!(Scheme::new(2, [0, 1, 2]), Err(ShamirError::BadIndex(0)));
        assert_eq!(Scheme::new(4, [1, 2, 3]), Err(ShamirError::BadThreshold { threshold: 4, holders: 3 }));
    }

    #[test]
    fn share_bytes_round_trip_and_reject_non_field_values() {
        let scheme = Scheme::new(2, [1, 2]).unwrap();
        let share = scheme.split(&secret(4)).unwrap().remove(0);
        assert_eq!(Share::from_value_bytes(1, &share.value_bytes()).unwrap(), share);
        let mut bad = share.value_bytes();
        bad[..8].copy_from_slice(&MODULUS.to_le_bytes());
        assert!(matches!(Share::from_value_bytes(1, &bad), Err(ShamirError::Malformed(_))));
        assert!(matches!(Share::from_value_bytes(1, &bad[..10]), Err(ShamirError::Malformed(_))));
    }

    #[test]
    fn two_splits_of_one_secret_use_fresh_randomness() {
        let scheme = Scheme::new(2, [1, 2]).unwrap();
        assert_ne!(scheme.split(&secret(5)).unwrap(), scheme.split(&secret(5)).unwrap());
    }
}
