//! A curious coordinator learns the survivors' sum and nothing that recovers any one client's
//! input. The spy here follows the protocol (honest but curious), keeps every message it
//! routes or receives, and then does the most it can with them: it reconstructs every secret for
//! which it holds at least t shares and strips every mask it can from every masked vector it has,
//! including the masked vector of a client that arrived after the client was declared dropped.
//! What is left of each individual vector still carries a mask the spy cannot remove; only the
//! sum comes out clean.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::ClientId;
use fedtune_shared::secagg::masking::{apply_mask, pairwise_sign, MaskSeed, MaskSign};
use fedtune_shared::secagg::shamir::{Scheme, Share};
use fedtune_shared::secagg::{
    Aggregator, EncryptedShares, KeysAdvertised, MaskedInput, RevealedShares, RoundContext, RoundSetup, Slot,
    UnmaskAnswer,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

const LEN: usize = 4096;

/// Everything the coordinator saw of one round.
#[derive(Default)]
struct Transcript {
    /// Sealed bundles it routed, by (sender, recipient): who holds whose shares.
    bundles: Vec<EncryptedShares>,
    /// Masked vectors it received, folded or (late) not.
    masked: BTreeMap<Slot, Vec<u32>>,
    /// Unmasking answers it received.
    answers: Vec<UnmaskAnswer>,
}

/// Runs a round of `n` clients (complete graph, threshold `t`) in which `late` sends its masked
/// vector only after the coordinator declared it dropped; returns the context, the inputs and
/// the coordinator's transcript, with the unmasked sum.
fn spied_round(
    n: usize,
    t: usize,
    late: Slot,
    seed: u64,
) -> (Arc<RoundContext>, Vec<Vec<u32>>, Transcript, Vec<u32>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let identities: Vec<KeyPair> = (0..n).map(|_| KeyPair::generate_ephemeral().unwrap()).collect();
    let ctx = Arc::new(
        RoundContext::new(RoundSetup {
            federation_id: "fed-spy".into(),
            round: 3,
            attempt: 0,
            members: identities
                .iter()
                .enumerate()
                .map(|(i, k)| (ClientId::parse(&format!("site-{i:03}")).unwrap(), k.public_key()))
                .collect(),
            threshold: t,
            degree: n - 1,
            graph_seed: rng.random(),
            vector_len: LEN,
        })
        .unwrap(),
    );
    // Quantized updates look like small signed integers in two's complement: the structure a
    // spy would look for.
    let inputs: Vec<Vec<u32>> =
        (0..n).map(|_| (0..LEN).map(|_| rng.random_range(-1000i32..=1000) as u32).collect()).collect();
    let mut seen = Transcript::default();
    let mut aggregator = Aggregator::new(ctx.clone());

    let mut advertised = BTreeMap::new();
    for slot in ctx.slots() {
        let (state, keys) = KeysAdvertised::start(ctx.clone(), slot, &identities[slot.index()]).unwrap();
        aggregator.accept_keys(slot, keys).unwrap();
        advertised.insert(slot, state);
    }
    aggregator.close_advertising().unwrap();
    let mut shared = BTreeMap::new();
    for (slot, state) in advertised {
        let (state, bundles) = state.share(&aggregator.keys_for(slot)).unwrap();
        seen.bundles.extend(bundles.iter().cloned());
        aggregator.accept_shares(slot, bundles).unwrap();
        shared.insert(slot, state);
    }
    let sharers = aggregator.close_sharing().unwrap();
    let mut masked_states = BTreeMap::new();
    let mut late_input = None;
    for (slot, state) in shared {
        let (state, masked) =
            state.mask(&aggregator.shares_for(slot), &sharers, &inputs[slot.index()]).unwrap();
        if slot == late {
            // Arrives after the coordinator closed the masked inputs: kept, never folded.
            late_input = Some(masked);
            continue;
        }
        seen.masked.insert(slot, masked.values.clone());
        aggregator.accept_masked_input(masked).unwrap();
        masked_states.insert(slot, state);
    }
    let request = aggregator.close_masking().unwrap();
    assert_eq!(request.dropped, vec![late]);
    let MaskedInput { sender, values } = late_input.unwrap();
    seen.masked.insert(sender, values);
    for (_, state) in masked_states {
        let answer = state.unmask(&request).unwrap();
        seen.answers.push(answer.clone());
        aggregator.accept_unmask_answer(answer).unwrap();
    }
    let sum = aggregator.finish().unwrap();
    (ctx, inputs, seen, sum)
}

/// Every seed the spy can rebuild from the shares it holds: self-mask seeds by owner, pairwise
/// seeds by (owner, peer).
fn reconstruct(
    ctx: &RoundContext,
    seen: &Transcript,
) -> (BTreeMap<Slot, MaskSeed>, BTreeMap<(Slot, Slot), MaskSeed>) {
    let mut holders: BTreeMap<Slot, BTreeSet<u64>> = BTreeMap::new();
    for b in &seen.bundles {
        holders
            .entry(b.sender)
            .or_default()
            .extend([u64::from(b.sender.0) + 1, u64::from(b.recipient.0) + 1]);
    }
    let mut self_shares: BTreeMap<Slot, Vec<Share>> = BTreeMap::new();
    let mut pair_shares: BTreeMap<(Slot, Slot), Vec<Share>> = BTreeMap::new();
    for answer in &seen.answers {
        for (owner, revealed) in &answer.shares {
            match revealed {
                RevealedShares::SelfMask(s) => self_shares.entry(*owner).or_default().push(s.clone()),
                RevealedShares::PairwiseSeeds(map) => {
                    for (peer, s) in map {
                        pair_shares.entry((*owner, *peer)).or_default().push(s.clone());
                    }
                }
            }
        }
    }
    let t = ctx.threshold();
    let combine = |owner: &Slot, shares: &[Share]| {
        (shares.len() >= t).then(|| {
            let scheme = Scheme::new(t, holders[owner].iter().copied()).unwrap();
            MaskSeed::from_bytes(scheme.combine(shares).unwrap())
        })
    };
    let selves = self_shares.iter().filter_map(|(o, s)| Some((*o, combine(o, s)?))).collect();
    let pairs = pair_shares.iter().filter_map(|(k, s)| Some((*k, combine(&k.0, s)?))).collect();
    (selves, pairs)
}

/// What the spy makes of `owner`'s masked vector: every mask it can rebuild, removed.
fn strip(
    owner: Slot,
    masked: &[u32],
    selves: &BTreeMap<Slot, MaskSeed>,
    pairs: &BTreeMap<(Slot, Slot), MaskSeed>,
) -> Vec<u32> {
    let mut v = masked.to_vec();
    if let Some(seed) = selves.get(&owner) {
        apply_mask(&mut v, seed, MaskSign::Subtract);
    }
    for ((a, b), seed) in pairs {
        // A pairwise seed is rebuilt from either end's shares; the owner applied it with its sign.
        if *a == owner {
            apply_mask(&mut v, seed, pairwise_sign(owner, *b).inverse());
        } else if *b == owner {
            apply_mask(&mut v, seed, pairwise_sign(owner, *a).inverse());
        }
    }
    v
}

/// Fraction of coordinates where the spy's guess equals the input, and where it even falls in
/// the inputs' range (|v| ≤ 1000): both ≈ 0 for a vector still masked by a uniform mask.
fn resemblance(guess: &[u32], input: &[u32]) -> (f64, f64) {
    let equal = guess.iter().zip(input).filter(|(g, x)| g == x).count();
    let small = guess.iter().filter(|g| (**g as i32).unsigned_abs() <= 1000).count();
    (equal as f64 / guess.len() as f64, small as f64 / guess.len() as f64)
}

#[test]
fn a_curious_coordinator_learns_the_sum_but_no_single_input_even_with_a_late_masked_vector() {
    let (n, t) = (10, 6);
    let late = Slot(4);
    let (ctx, inputs, seen, sum) = spied_round(n, t, late, 11);
    let (selves, pairs) = reconstruct(&ctx, &seen);
    let survivors: Vec<Slot> = ctx.slots().filter(|s| *s != late).collect();

    // The spy did rebuild what the protocol reveals: every survivor's self-mask, every pairwise
    // seed of the dropped client with a survivor, and so the sum of the survivors' inputs.
    assert_eq!(selves.keys().copied().collect::<Vec<_>>(), survivors);
    assert!(!selves.contains_key(&late), "a dropped client's self-mask is never revealed");
    assert_eq!(pairs.len(), survivors.len(), "the dropped client's seed with each survivor");
    let mut stripped_sum = vec![0u32; LEN];
    for s in &survivors {
        let guess = strip(*s, &seen.masked[s], &selves, &pairs);
        for (acc, v) in stripped_sum.iter_mut().zip(&guess) {
            *acc = acc.wrapping_add(*v);
        }
    }
    assert_eq!(stripped_sum, sum, "the spy's own stripping reproduces the released sum");
    let mut plain = vec![0u32; LEN];
    for s in &survivors {
        for (acc, v) in plain.iter_mut().zip(&inputs[s.index()]) {
            *acc = acc.wrapping_add(*v);
        }
    }
    assert_eq!(sum, plain);

    // Yet no individual vector comes out: each survivor's keeps its pairwise masks with the
    // other survivors, the late client's keeps its self-mask.
    for s in ctx.slots() {
        let guess = strip(s, &seen.masked[&s], &selves, &pairs);
        let (equal, small) = resemblance(&guess, &inputs[s.index()]);
        assert!(equal < 0.001 && small < 0.001, "{s}: {equal} of the coordinates equal, {small} in range");
    }
}

#[test]
fn the_bundles_the_coordinator_routes_do_not_contain_the_shares_in_the_clear() {
    let (ctx, _inputs, seen, _sum) = spied_round(5, 3, Slot(0), 12);
    // Every share later revealed to the coordinator was routed earlier inside a sealed bundle:
    // its bytes must not appear in any ciphertext.
    for answer in &seen.answers {
        for revealed in answer.shares.values() {
            let shares: Vec<&Share> = match revealed {
                RevealedShares::SelfMask(s) => vec![s],
                RevealedShares::PairwiseSeeds(map) => map.values().collect(),
            };
            for share in shares {
                let bytes = share.value_bytes();
                for bundle in &seen.bundles {
                    assert!(
                        !bundle.ciphertext.windows(bytes.len()).any(|w| w == bytes),
                        "a share travels in the clear in the bundle {} → {}",
                        bundle.sender,
                        bundle.recipient
                    );
                }
            }
        }
    }
    assert_eq!(seen.bundles.len(), ctx.len() * (ctx.len() - 1));
}
