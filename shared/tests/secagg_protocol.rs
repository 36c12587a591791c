//! Secure aggregation, whole protocol in memory: the unmasked sum is the plain wrapping sum of
//! the survivors' quantized vectors, bit for bit, whoever drops out at whichever step, as long as
//! t clients see the round through; below t the round fails without a sum; bad messages are
//! refused and change nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::ClientId;
use fedtune_shared::secagg::graph::suggested_degree;
use fedtune_shared::secagg::{
    Aggregator, InputMasked, KeysAdvertised, RevealedShares, RoundContext, RoundSetup, SecAggError,
    SharesSent, Slot, UnmaskAnswer, UnmaskRequest,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// When a client leaves the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Sees the round through.
    Stays,
    /// Never sends its keys.
    BeforeAdvertising,
    /// Sends keys, never its share bundles.
    BeforeSharing,
    /// Sends its bundles, never its masked input (its pairwise masks must be recovered).
    AfterSharing,
    /// Sends its masked input, then is gone before the unmasking request.
    AfterMaskedUpload,
    /// Computes its unmasking answer, which never reaches the coordinator.
    DuringUnmasking,
}

const FATES: [Fate; 6] = [
    Fate::Stays,
    Fate::BeforeAdvertising,
    Fate::BeforeSharing,
    Fate::AfterSharing,
    Fate::AfterMaskedUpload,
    Fate::DuringUnmasking,
];

/// One round's parties, driven step by step so tests can step in between.
struct Round {
    ctx: Arc<RoundContext>,
    identities: Vec<KeyPair>,
    inputs: Vec<Vec<u32>>,
    aggregator: Aggregator,
    advertised: BTreeMap<Slot, KeysAdvertised>,
    shared: BTreeMap<Slot, SharesSent>,
    sharers: Vec<Slot>,
    masked: BTreeMap<Slot, InputMasked>,
    request: Option<UnmaskRequest>,
}

impl Round {
    /// n clients with fixed-seed inputs (uniform `u32`s: quantized values wrap like any other)
    /// and a fixed graph seed.
    fn new(n: usize, threshold: usize, degree: usize, vector_len: usize, seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let identities: Vec<KeyPair> = (0..n).map(|_| KeyPair::generate_ephemeral().unwrap()).collect();
        let mut graph_seed = [0u8; 32];
        rng.fill_bytes(&mut graph_seed);
        let ctx = Arc::new(
            RoundContext::new(RoundSetup {
                federation_id: "fed-secagg".into(),
                round: 7,
                attempt: 0,
                // Zero-padded names: slot i is client i.
                members: identities
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (ClientId::parse(&format!("site-{i:03}")).unwrap(), k.public_key()))
                    .collect(),
                threshold,
                degree,
                graph_seed,
                vector_len,
            })
            .unwrap(),
        );
        let inputs = (0..n).map(|_| (0..vector_len).map(|_| rng.next_u32()).collect()).collect();
        Round {
            aggregator: Aggregator::new(ctx.clone()),
            ctx,
            identities,
            inputs,
            advertised: BTreeMap::new(),
            shared: BTreeMap::new(),
            sharers: Vec::new(),
            masked: BTreeMap::new(),
            request: None,
        }
    }

    fn slots(&self) -> Vec<Slot> {
        self.ctx.slots().collect()
    }

    fn advertise(&mut self, stays: impl Fn(Slot) -> bool) -> Result<(), SecAggError> {
        for slot in self.slots().into_iter().filter(|s| stays(*s)) {
            let (state, keys) =
                KeysAdvertised::start(self.ctx.clone(), slot, &self.identities[slot.index()])?;
            self.aggregator.accept_keys(slot, keys)?;
            self.advertised.insert(slot, state);
        }
        self.aggregator.close_advertising()?;
        Ok(())
    }

    fn share(&mut self, stays: impl Fn(Slot) -> bool) -> Result<(), SecAggError> {
        for (slot, state) in std::mem::take(&mut self.advertised).into_iter().filter(|(s, _)| stays(*s)) {
            let (state, bundles) = state.share(&self.aggregator.keys_for(slot))?;
            self.aggregator.accept_shares(slot, bundles)?;
            self.shared.insert(slot, state);
        }
        self.sharers = self.aggregator.close_sharing()?;
        Ok(())
    }

    fn mask(&mut self, stays: impl Fn(Slot) -> bool) -> Result<(), SecAggError> {
        for (slot, state) in std::mem::take(&mut self.shared).into_iter().filter(|(s, _)| stays(*s)) {
            let incoming = self.aggregator.shares_for(slot);
            let (state, masked) = state.mask(&incoming, &self.sharers, &self.inputs[slot.index()])?;
            self.aggregator.accept_masked_input(masked)?;
            self.masked.insert(slot, state);
        }
        self.request = Some(self.aggregator.close_masking()?);
        Ok(())
    }

    /// `answers` says who answers; `delivered` whether an answer reaches the coordinator.
    fn unmask(
        &mut self,
        answers: impl Fn(Slot) -> bool,
        delivered: impl Fn(Slot) -> bool,
    ) -> Result<(), SecAggError> {
        let request = self.request.clone().expect("masking closed");
        for (slot, state) in std::mem::take(&mut self.masked).into_iter().filter(|(s, _)| answers(*s)) {
            let answer = state.unmask(&request)?;
            if delivered(slot) {
                self.aggregator.accept_unmask_answer(answer)?;
            }
        }
        Ok(())
    }

    /// The plain wrapping sum of the survivors' inputs: what the protocol must reproduce.
    fn expected(&self) -> Vec<u32> {
        let mut sum = vec![0u32; self.ctx.vector_len()];
        for s in &self.request.as_ref().expect("masking closed").survivors {
            for (acc, v) in sum.iter_mut().zip(&self.inputs[s.index()]) {
                *acc = acc.wrapping_add(*v);
            }
        }
        sum
    }

    /// Runs the whole round with each client's fate; returns (unmasked sum, expected sum).
    fn run(mut self, fates: &[Fate]) -> Result<(Vec<u32>, Vec<u32>), SecAggError> {
        let fate = |s: Slot| fates[s.index()];
        self.advertise(|s| fate(s) != Fate::BeforeAdvertising)?;
        self.share(|s| fate(s) != Fate::BeforeSharing)?;
        self.mask(|s| fate(s) != Fate::AfterSharing)?;
        self.unmask(|s| fate(s) != Fate::AfterMaskedUpload, |s| fate(s) != Fate::DuringUnmasking)?;
        let expected = self.expected();
        Ok((self.aggregator.finish()?, expected))
    }
}

fn assert_exact(outcome: Result<(Vec<u32>, Vec<u32>), SecAggError>, what: &str) {
    let (sum, expected) = outcome.unwrap_or_else(|e| panic!("{what}: round failed: {e}"));
    assert!(sum == expected, "{what}: unmasked sum differs from the plain sum");
}

fn assert_failed_below_threshold(outcome: Result<(Vec<u32>, Vec<u32>), SecAggError>, what: &str) {
    match outcome {
        Err(SecAggError::BelowThreshold { .. } | SecAggError::NotEnoughShares { .. }) => {}
        Err(other) => panic!("{what}: failed, but not for lack of clients: {other}"),
        Ok(_) => panic!("{what}: produced a sum with fewer than t clients seeing it through"),
    }
}

/// Random fates for `n` clients, `dropouts` of them leaving at a random step.
fn random_fates(rng: &mut ChaCha20Rng, n: usize, dropouts: usize) -> Vec<Fate> {
    let mut fates = vec![Fate::Stays; n];
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    for &i in &order[..dropouts] {
        fates[i] = FATES[rng.random_range(1..FATES.len())];
    }
    fates
}

#[test]
fn three_clients_every_dropout_pattern_sums_exactly_or_fails_below_threshold() {
    // Complete graph, t = 2: the round must succeed exactly when 2 clients see it to the end.
    let mut patterns = 0;
    for a in FATES {
        for b in FATES {
            for c in FATES {
                let fates = [a, b, c];
                let outcome = Round::new(3, 2, 2, 33, 3).run(&fates);
                let staying = fates.iter().filter(|f| **f == Fate::Stays).count();
                if staying >= 2 {
                    assert_exact(outcome, &format!("{fates:?}"));
                } else {
                    assert_failed_below_threshold(outcome, &format!("{fates:?}"));
                }
                patterns += 1;
            }
        }
    }
    assert_eq!(patterns, 216);
}

#[test]
fn ten_clients_survive_up_to_n_minus_t_dropouts_at_each_step() {
    let (n, t) = (10, 6);
    for (step, fate) in FATES.iter().enumerate().skip(1) {
        for dropped in 0..=n - t + 1 {
            let mut fates = vec![Fate::Stays; n];
            // A different set of clients for every case, fixed by the case.
            for i in 0..dropped {
                fates[(i * 3 + step + dropped) % n] = *fate;
            }
            let outcome = Round::new(n, t, n, 100, (step * 100 + dropped) as u64).run(&fates);
            let what = format!("{dropped} clients drop {fate:?}");
            if n - dropped >= t {
                assert_exact(outcome, &what);
            } else {
                assert_failed_below_threshold(outcome, &what);
            }
        }
    }
}

#[test]
fn ten_clients_with_dropouts_spread_over_every_step_sum_exactly() {
    let mut rng = ChaCha20Rng::seed_from_u64(10);
    for case in 0..12 {
        let fates = random_fates(&mut rng, 10, case % 5);
        assert_exact(Round::new(10, 6, 9, 257, case as u64).run(&fates), &format!("{fates:?}"));
    }
}

#[test]
fn fifty_clients_on_a_sparse_graph_sum_exactly_with_dropouts_at_every_step() {
    // k = 20 neighbours, t = 11: every secret has 21 holders, so any 10 dropouts leave t of them.
    let (n, k, t) = (50, suggested_degree(50), 11);
    assert_eq!(k, 20);
    let mut rng = ChaCha20Rng::seed_from_u64(50);
    for case in 0..3 {
        let fates = random_fates(&mut rng, n, 10);
        let round = Round::new(n, t, k, 1000, 500 + case);
        assert!(!round.ctx.graph().is_complete());
        assert_exact(round.run(&fates), &format!("case {case}: {fates:?}"));
    }
    for fate in &FATES[1..] {
        let mut fates = vec![Fate::Stays; n];
        fates.iter_mut().step_by(5).for_each(|f| *f = *fate);
        assert_exact(Round::new(n, t, k, 64, 7).run(&fates), &format!("10 clients drop {fate:?}"));
    }
}

#[test]
fn fifty_clients_fail_cleanly_when_too_many_drop() {
    let (n, k, t) = (50, 20, 11);
    let mut fates = vec![Fate::Stays; n];
    fates.iter_mut().take(40).for_each(|f| *f = Fate::AfterSharing);
    assert_failed_below_threshold(Round::new(n, t, k, 16, 8).run(&fates), "40 of 50 drop after sharing");
}

#[test]
fn below_threshold_the_coordinator_never_gets_to_ask_for_shares() {
    let mut round = Round::new(5, 4, 4, 8, 9);
    round.advertise(|_| true).unwrap();
    round.share(|_| true).unwrap();
    let err = round.mask(|s| s.0 < 3).unwrap_err();
    assert_eq!(err, SecAggError::BelowThreshold { stage: "masking", have: 3, need: 4 });
    assert!(round.request.is_none(), "no unmasking request, so no share is ever revealed");
}

// ---- bad input: refused with a precise error, and the sum is unchanged ----

fn round_of_four() -> Round {
    Round::new(4, 3, 3, 40, 44)
}

#[test]
fn a_forged_or_substituted_agreement_key_is_refused_by_coordinator_and_client() {
    let mut round = round_of_four();
    let (state, mut keys) = KeysAdvertised::start(round.ctx.clone(), Slot(0), &round.identities[0]).unwrap();
    let honest = keys.clone();
    keys[0].public_key[0] ^= 1; // the coordinator (or anyone) swaps in another key
    assert_eq!(
        round.aggregator.accept_keys(Slot(0), keys.clone()),
        Err(SecAggError::BadKeySignature { owner: Slot(0), peer: keys[0].peer })
    );
    // A client refuses it too, should a coordinator forward it anyway.
    let (victim, _) = KeysAdvertised::start(round.ctx.clone(), keys[0].peer, &round.identities[1]).unwrap();
    assert!(matches!(victim.share(&keys[..1]), Err(SecAggError::BadKeySignature { .. })));
    // The refusal left no trace: the honest advertisement is accepted and the round is exact.
    round.aggregator.accept_keys(Slot(0), honest).unwrap();
    round.advertised.insert(Slot(0), state);
    for slot in 1..4 {
        let (s, k) =
            KeysAdvertised::start(round.ctx.clone(), Slot(slot), &round.identities[slot as usize]).unwrap();
        round.aggregator.accept_keys(Slot(slot), k).unwrap();
        round.advertised.insert(Slot(slot), s);
    }
    round.aggregator.close_advertising().unwrap();
    finish_honestly_after_advertising(round);
}

fn finish_honestly_after_advertising(mut round: Round) {
    round.share(|_| true).unwrap();
    round.mask(|_| true).unwrap();
    round.unmask(|_| true, |_| true).unwrap();
    let expected = round.expected();
    assert!(round.aggregator.finish().unwrap() == expected);
}

#[test]
fn a_key_signed_by_another_client_or_replayed_from_another_round_is_refused() {
    let round = round_of_four();
    // Client 2 signs a key claiming to be client 0's: the signature is not client 0's.
    let (_, mut keys) = KeysAdvertised::start(round.ctx.clone(), Slot(2), &round.identities[2]).unwrap();
    keys.retain(|k| k.peer == Slot(1));
    keys[0].owner = Slot(0);
    let (victim, _) = KeysAdvertised::start(round.ctx.clone(), Slot(1), &round.identities[1]).unwrap();
    assert!(matches!(victim.share(&keys), Err(SecAggError::BadKeySignature { .. })));

    // A key from round 7 is worthless in the retry (attempt 1) of the same round.
    let old = round_of_four();
    let retry = Arc::new(
        RoundContext::new(RoundSetup {
            federation_id: "fed-secagg".into(),
            round: 7,
            attempt: 1,
            members: (0..4)
                .map(|i| (ClientId::parse(&format!("site-{i:03}")).unwrap(), old.identities[i].public_key()))
                .collect(),
            threshold: 3,
            degree: 3,
            graph_seed: [0; 32],
            vector_len: 40,
        })
        .unwrap(),
    );
    let (_, old_keys) = KeysAdvertised::start(old.ctx.clone(), Slot(0), &old.identities[0]).unwrap();
    let mut aggregator = Aggregator::new(retry);
    assert!(matches!(aggregator.accept_keys(Slot(0), old_keys), Err(SecAggError::BadKeySignature { .. })));
}

#[test]
fn shares_for_an_unknown_client_are_refused_and_change_nothing() {
    let mut round = round_of_four();
    round.advertise(|s| s != Slot(3)).unwrap(); // client 3 never advertised
    let (state, mut bundles) =
        round.advertised.remove(&Slot(0)).unwrap().share(&round.aggregator.keys_for(Slot(0))).unwrap();
    let honest = bundles.clone();
    bundles[0].recipient = Slot(3);
    assert_eq!(
        round.aggregator.accept_shares(Slot(0), bundles.clone()),
        Err(SecAggError::UnknownClient { what: "share bundle recipient", slot: Slot(3) })
    );
    bundles[0].recipient = Slot(9);
    assert!(matches!(
        round.aggregator.accept_shares(Slot(0), bundles),
        Err(SecAggError::UnknownClient { .. })
    ));
    round.aggregator.accept_shares(Slot(0), honest).unwrap();
    round.shared.insert(Slot(0), state);
    for slot in [1, 2] {
        let (s, b) = round
            .advertised
            .remove(&Slot(slot))
            .unwrap()
            .share(&round.aggregator.keys_for(Slot(slot)))
            .unwrap();
        round.aggregator.accept_shares(Slot(slot), b).unwrap();
        round.shared.insert(Slot(slot), s);
    }
    round.sharers = round.aggregator.close_sharing().unwrap();

    // Client side: a bundle from a client it has no agreement with (3 never advertised).
    let mut stray = round.aggregator.shares_for(Slot(1));
    stray[0].sender = Slot(3);
    let client1 = round.shared.remove(&Slot(1)).unwrap();
    assert!(matches!(
        client1.mask(&stray, &round.sharers, &round.inputs[1]),
        Err(SecAggError::UnknownClient { what: "share bundle sender", slot: Slot(3) })
    ));
}

#[test]
fn a_masked_vector_of_the_wrong_length_or_sent_twice_is_refused_and_the_sum_stays_exact() {
    let mut round = round_of_four();
    round.advertise(|_| true).unwrap();
    round.share(|_| true).unwrap();
    let mut masked_inputs = Vec::new();
    for (slot, state) in std::mem::take(&mut round.shared) {
        let (state, masked) = state
            .mask(&round.aggregator.shares_for(slot), &round.sharers, &round.inputs[slot.index()])
            .unwrap();
        round.masked.insert(slot, state);
        masked_inputs.push(masked);
    }
    let mut short = masked_inputs[0].clone();
    short.values.pop();
    assert_eq!(
        round.aggregator.accept_masked_input(short),
        Err(SecAggError::WrongLength { expected: 40, got: 39 })
    );
    let mut long = masked_inputs[1].clone();
    long.values.push(0);
    assert_eq!(
        round.aggregator.accept_masked_input(long),
        Err(SecAggError::WrongLength { expected: 40, got: 41 })
    );
    for m in &masked_inputs {
        round.aggregator.accept_masked_input(m.clone()).unwrap();
    }
    assert_eq!(
        round.aggregator.accept_masked_input(masked_inputs[2].clone()),
        Err(SecAggError::Duplicate { what: "masked input", slot: masked_inputs[2].sender })
    );
    round.request = Some(round.aggregator.close_masking().unwrap());
    round.unmask(|_| true, |_| true).unwrap();
    let expected = round.expected();
    assert!(round.aggregator.finish().unwrap() == expected);

    // A client refuses to mask an input of the wrong length.
    let mut other = round_of_four();
    other.advertise(|_| true).unwrap();
    other.share(|_| true).unwrap();
    let state = other.shared.remove(&Slot(0)).unwrap();
    assert_eq!(
        state.mask(&other.aggregator.shares_for(Slot(0)), &other.sharers, &[0; 39]).unwrap_err(),
        SecAggError::WrongLength { expected: 40, got: 39 }
    );
}

fn round_ready_to_unmask(dropped_after_sharing: Slot) -> Round {
    let mut round = Round::new(5, 3, 4, 24, 55);
    round.advertise(|_| true).unwrap();
    round.share(|_| true).unwrap();
    round.mask(|s| s != dropped_after_sharing).unwrap();
    round
}

#[test]
fn a_second_unmasking_answer_is_refused_and_the_sum_stays_exact() {
    let mut round = round_ready_to_unmask(Slot(4));
    let request = round.request.clone().unwrap();
    let mut answers = Vec::new();
    for (_, state) in std::mem::take(&mut round.masked) {
        answers.push(state.unmask(&request).unwrap());
    }
    round.aggregator.accept_unmask_answer(answers[0].clone()).unwrap();
    assert_eq!(
        round.aggregator.accept_unmask_answer(answers[0].clone()),
        Err(SecAggError::Duplicate { what: "unmasking answer", slot: answers[0].sender })
    );
    for a in &answers[1..] {
        round.aggregator.accept_unmask_answer(a.clone()).unwrap();
    }
    let expected = round.expected();
    assert!(round.aggregator.finish().unwrap() == expected);
}

#[test]
fn an_answer_revealing_the_wrong_kind_of_share_is_refused() {
    let mut round = round_ready_to_unmask(Slot(4));
    let request = round.request.clone().unwrap();
    let answer = round.masked.remove(&Slot(0)).unwrap().unmask(&request).unwrap();
    // Claim client 1 (a survivor) dropped: offer "pairwise shares" in place of its self-mask share.
    let mut forged = answer.clone();
    forged.shares.insert(Slot(1), RevealedShares::PairwiseSeeds(BTreeMap::new()));
    assert!(matches!(round.aggregator.accept_unmask_answer(forged), Err(SecAggError::Inconsistent(_))));
    // Claim a share index that is not the sender's.
    let borrowed = round.masked.remove(&Slot(2)).unwrap().unmask(&request).unwrap();
    let mut mixed: UnmaskAnswer = answer.clone();
    mixed.shares.insert(Slot(1), borrowed.shares[&Slot(1)].clone());
    assert!(matches!(round.aggregator.accept_unmask_answer(mixed), Err(SecAggError::Inconsistent(_))));
    round.aggregator.accept_unmask_answer(answer).unwrap();
}

#[test]
fn a_client_never_reveals_both_kinds_of_share_for_one_client() {
    // Client 4 shared but sent no masked input; the honest request is {0,1,2,3} survive, 4 dropped.
    let survivors = vec![Slot(0), Slot(1), Slot(2), Slot(3)];
    let bad_requests = [
        (UnmaskRequest { survivors: survivors.clone(), dropped: vec![Slot(1), Slot(4)] }, "1 both ways"),
        (
            UnmaskRequest { survivors: vec![Slot(1), Slot(2), Slot(3)], dropped: vec![Slot(0), Slot(4)] },
            "self dropped",
        ),
        (UnmaskRequest { survivors: survivors.clone(), dropped: vec![] }, "a sharer left out"),
        (UnmaskRequest { survivors: survivors.clone(), dropped: vec![Slot(4), Slot(4)] }, "listed twice"),
    ];
    for (bad, what) in &bad_requests {
        let mut round = round_ready_to_unmask(Slot(4));
        let state = round.masked.remove(&Slot(0)).unwrap();
        assert!(matches!(state.unmask(bad), Err(SecAggError::Inconsistent(_))), "{what}: refused");
    }
    // An honest answer holds, per client, the kind its fate calls for, and nothing else.
    let mut round = round_ready_to_unmask(Slot(4));
    let request = round.request.clone().unwrap();
    assert_eq!(request, UnmaskRequest { survivors, dropped: vec![Slot(4)] });
    let answer = round.masked.remove(&Slot(0)).unwrap().unmask(&request).unwrap();
    assert_eq!(answer.shares.len(), 5, "client 0 holds shares of all five (complete graph)");
    for (owner, revealed) in &answer.shares {
        match revealed {
            RevealedShares::SelfMask(_) => assert!(request.survivors.contains(owner)),
            RevealedShares::PairwiseSeeds(_) => assert!(request.dropped.contains(owner)),
        }
    }
}

#[test]
fn a_client_refuses_to_unmask_when_too_few_of_its_holders_survive() {
    // n = 5, t = 3: a request naming only two survivors (one of them the answerer) is refused by
    // the client even though the coordinator's own check was bypassed.
    let round = round_ready_to_unmask(Slot(4));
    let mut masked = round.masked;
    let request =
        UnmaskRequest { survivors: vec![Slot(0), Slot(1)], dropped: vec![Slot(2), Slot(3), Slot(4)] };
    assert_eq!(
        masked.remove(&Slot(0)).unwrap().unmask(&request).unwrap_err(),
        SecAggError::BelowThreshold { stage: "unmasking", have: 2, need: 3 }
    );
}
