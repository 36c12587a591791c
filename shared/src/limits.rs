//! The protocol's limits: every bound that both binaries (and the wire contract) must agree on,
//! defined once.
//!
//! The coordinator enforces these and advertises the ones a client must respect before it sends
//! anything in `JoinResponse.limits` ([`crate::round::Limits`]); a client checks against what
//! the coordinator it talks to advertised, never against its own copy, so a coordinator that
//! tightens a limit is obeyed by clients built before the change.

/// Largest `|value|` of an uploaded update (a delta `local − global`), inclusive.
///
/// The coordinator sums updates in fixed point on a 2⁻²⁴ grid in `i64`: with `|x| ≤ 2⁸` and a
/// round's total weight below 2³¹, no sum can overflow (`2⁸ · 2²⁴ · 2³¹ = 2⁶³`). Raising this
/// bound breaks that argument; the coordinator checks it at compile time. Fine-tuning deltas are
/// many orders of magnitude smaller: a value beyond the bound is a diverged client or an attack
/// and is refused, never clamped.
pub const MAX_ABS_UPDATE_VALUE: f32 = 256.0;

/// Most coordinates a securely aggregated vector may have: 2^28 (1 GiB of `u32`s, over ten times
/// the 22.7M-parameter models fedtune trains). Every client expands one mask per neighbour over
/// the whole vector and the coordinator holds the masked sum in memory, so the bound keeps a
/// hostile round set-up from asking either side for unbounded work or memory.
pub const MAX_SECAGG_VECTOR_LEN: usize = 1 << 28;

/// Most clients in one secure round's roster. Every client receives the whole roster (ids and
/// identity keys, about 100 bytes each) to compute the round-context digest, and the unmasking
/// request lists every sharer: 10,000 keeps both at about a megabyte and 20 KB, within
/// [`MAX_MESSAGE_BYTES`].
pub const MAX_SECAGG_CLIENTS: usize = 10_000;

/// Most neighbours one client of a secure round may have (the graph degree k). The largest
/// secure-aggregation messages grow as k² (a share bundle holds k pairwise shares and a client
/// sends k bundles): at k = 128 a client's share upload is about 750 KB. The suggested degree
/// ([`crate::secagg::graph::suggested_degree`]) stays below it up to 2^42 clients; a round of
/// more than 129 clients must therefore use a sparse graph, not the complete one.
pub const MAX_SECAGG_DEGREE: usize = 128;

/// Largest request a client sends in a secure round: its share upload (k sealed bundles of up
/// to k shares each) or its unmasking answer (up to k dropped neighbours' k pairwise shares
/// each), both about 750 KB at [`MAX_SECAGG_DEGREE`] (`shared/tests/secagg_wire.rs` measures
/// them). Far above the coordinator's cap on other unary calls (16 KiB, which the share upload
/// already exceeds at 1,000 clients and the suggested degree 30), so the calls that carry them
/// need this cap of their own.
pub const MAX_SECAGG_REQUEST_BYTES: usize = 1 << 20;

/// Smallest chunk a sender uses (except for the last chunk of a payload). Smaller chunks waste
/// per-message overhead on 100+ MB payloads.
pub const MIN_CHUNK_BYTES: usize = 1 << 20;

/// Largest chunk either side accepts (4 MiB).
pub const MAX_CHUNK_BYTES: usize = 4 << 20;

/// Chunk size used unless a client asks for another one.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// gRPC message size limit on both sides, set explicitly (never unlimited): the largest chunk
/// plus room for the message framing and a header with a manifest of ~1000 tensors.
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_BYTES + (256 << 10);

/// Largest example count one update or evaluation may claim (its FedAvg weight): below 2³¹, so
/// weights sum in fixed point without overflow.
pub const MAX_NUM_EXAMPLES: u64 = (1 << 31) - 1;

/// Longest client or federation name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Whether `name` is a valid client or federation name: 1 to [`MAX_NAME_LEN`] characters of
/// `[A-Za-z0-9._-]`. The alphabet keeps names safe in file names, log lines, SQL and
/// certificate names without escaping, and gives each name one encoding.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `bound` is usable as an advertised update value bound: finite and positive. Zero
/// is what a coordinator that does not advertise one sends (proto3's default), and a NaN bound
/// would let every value through a `>` comparison.
pub fn is_valid_value_bound(bound: f32) -> bool {
    bound.is_finite() && bound > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_a_portable_alphabet_of_at_most_64_characters() {
        for ok in ["site-1", "a", "Hospital_7.eu", &"x".repeat(MAX_NAME_LEN)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "site 1", "ü", "a/b", "a:b", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_value_bound_must_be_finite_and_positive() {
        assert!(is_valid_value_bound(MAX_ABS_UPDATE_VALUE));
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(!is_valid_value_bound(bad), "{bad}");
        }
    }

    #[test]
    fn the_chunk_limits_fit_in_a_message() {
        const { assert!(MIN_CHUNK_BYTES <= DEFAULT_CHUNK_BYTES && DEFAULT_CHUNK_BYTES <= MAX_CHUNK_BYTES) };
        const { assert!(MAX_CHUNK_BYTES < MAX_MESSAGE_BYTES) };
        const { assert!(MAX_SECAGG_REQUEST_BYTES < MAX_MESSAGE_BYTES) };
        // Sparse graphs round an odd degree up: an even bound is never overshot by rounding.
        const { assert!(MAX_SECAGG_DEGREE % 2 == 0) };
    }
}
