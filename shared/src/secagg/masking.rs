//! Masks over Z_{2^32}: 32-byte seeds expanded into one `u32` per coordinate, added with
//! wrap-around.
//!
//! Arithmetic modulo 2^32 is what the hardware does with `wrapping_add`, so masking and folding
//! cost one instruction per coordinate, a masked value travels in the same four bytes as an
//! `f32` does today, and any mask is a one-time pad over the ring: a masked value is uniform
//! whatever the input was.
//!
//! # Expansion
//! The mask of a seed is the ChaCha20 keystream (20 rounds, the original 64-bit-counter variant,
//! nonce 0, counter from 0) keyed by the seed, read as consecutive little-endian `u32`s: word `i`
//! masks coordinate `i`. It comes from `rand_chacha`'s `ChaCha20Rng`, which produces exactly that
//! stream (pinned by a known-answer test below) and is already in the tree for DP noise. ring has
//! no raw stream cipher API; its ChaCha20-Poly1305 sealing a zero buffer would give a keystream
//! too, but also a Poly1305 pass and a model-sized zero buffer for nothing.

use std::fmt;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::Slot;

/// A 32-byte seed that a mask is expanded from (a self-mask seed b_u or a pairwise seed s_{u,v}).
#[derive(Clone, PartialEq, Eq)]
pub struct MaskSeed([u8; 32]);

impl MaskSeed {
    /// Wraps seed bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MaskSeed(bytes)
    }

    /// The seed bytes; only secret sharing needs them.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for MaskSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MaskSeed(<redacted>)")
    }
}

/// Whether a mask is added to or taken from the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskSign {
    /// `values[i] += mask[i]` (mod 2^32).
    Add,
    /// `values[i] -= mask[i]` (mod 2^32).
    Subtract,
}

impl MaskSign {
    /// The opposite sign: what removes a mask applied with `self`.
    pub fn inverse(self) -> Self {
        match self {
            MaskSign::Add => MaskSign::Subtract,
            MaskSign::Subtract => MaskSign::Add,
        }
    }
}

/// The sign with which `owner` applies the mask it shares with `peer`: + towards higher slots,
/// − towards lower ones, so the two cancel in a sum.
pub fn pairwise_sign(owner: Slot, peer: Slot) -> MaskSign {
    if owner < peer {
        MaskSign::Add
    } else {
        MaskSign::Subtract
    }
}

/// Keystream bytes drawn per refill; 4 KiB keeps the buffer in L1 and the calls few.
const BLOCK_BYTES: usize = 4096;

/// Adds or subtracts the mask expanded from `seed` to `values`, modulo 2^32.
pub fn apply_mask(values: &mut [u32], seed: &MaskSeed, sign: MaskSign) {
    let mut rng = ChaCha20Rng::from_seed(seed.0);
    let mut block = [0u8; BLOCK_BYTES];
    for chunk in values.chunks_mut(BLOCK_BYTES / 4) {
        let bytes = &mut block[..chunk.len() * 4];
        rng.fill_bytes(bytes);
        let words = bytes.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        match sign {
            MaskSign::Add => chunk.iter_mut().zip(words).for_each(|(v, m)| *v = v.wrapping_add(m)),
            MaskSign::Subtract => chunk.iter_mut().zip(words).for_each(|(v, m)| *v = v.wrapping_sub(m)),
        }
    }
}

/// The first `len` mask words of `seed` (for tests and tools; masking uses [`apply_mask`]).
pub fn expand_mask(seed: &MaskSeed, len: usize) -> Vec<u32> {
    let mut out = vec![0u32; len];
    apply_mask(&mut out, seed, MaskSign::Add);
    out
}

/// `acc[i] += values[i]` modulo 2^32: how masked vectors are folded into the running sum.
/// The caller has checked the lengths match.
pub fn fold_into(acc: &mut [u32], values: &[u32]) {
    acc.iter_mut().zip(values).for_each(|(a, v)| *a = a.wrapping_add(*v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_words_are_the_chacha20_keystream_of_the_seed() {
        // ChaCha20, key 0^32, nonce 0^8, block 0: first bytes 76 b8 e0 ad a0 f1 3d 90
        // (draft-agl-tls-chacha20poly1305-04 §7, test vector 1).
        let mask = expand_mask(&MaskSeed::from_bytes([0; 32]), 2);
        assert_eq!(mask, vec![0xade0_b876, 0x903d_f1a0]);
    }

    #[test]
    fn subtracting_a_mask_undoes_adding_it_at_any_length() {
        for len in [0, 1, 1023, 1024, 1025, 5000] {
            let original: Vec<u32> = (0..len as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
            let mut v = original.clone();
            let seed = MaskSeed::from_bytes([len as u8; 32]);
            apply_mask(&mut v, &seed, MaskSign::Add);
            if len > 8 {
                assert_ne!(v, original);
            }
            apply_mask(&mut v, &seed, MaskSign::Add.inverse());
            assert_eq!(v, original);
        }
    }

    #[test]
    fn a_mask_prefix_does_not_depend_on_the_vector_length() {
        let seed = MaskSeed::from_bytes([3; 32]);
        assert_eq!(expand_mask(&seed, 5000)[..1500], expand_mask(&seed, 1500)[..]);
    }

    #[test]
    fn folding_wraps_around_modulo_2_pow_32() {
        let mut acc = vec![u32::MAX, 5];
        fold_into(&mut acc, &[2, u32::MAX]);
        assert_eq!(acc, vec![1, 4]);
    }
}
