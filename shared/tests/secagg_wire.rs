//! Secure aggregation over the wire (`secure_aggregation.proto`, and the masked upload header):
//! a whole round whose every message is encoded, decoded and converted back gives the same sum
//! as the survivors' inputs; every message converts back to what was sent; malformed messages
//! are refused naming the field; and the largest honest messages fit the limits.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedtune_shared::convert::ConvertError;
use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::{ClientId, ModelVersion, RoundId, Sha256};
use fedtune_shared::limits::{MAX_MESSAGE_BYTES, MAX_SECAGG_DEGREE, MAX_SECAGG_REQUEST_BYTES};
use fedtune_shared::pb;
use fedtune_shared::round::{MaskedUpdateHeader, UpdateHeader};
use fedtune_shared::secagg::graph::suggested_degree;
use fedtune_shared::secagg::keys::sealed_bundle_len;
use fedtune_shared::secagg::shamir::SHARE_VALUE_BYTES;
use fedtune_shared::secagg::{
    Aggregator, KeyAdvertisement, KeysAdvertised, MaskedInput, PeerKeys, RoundContext, RoundRef, RoundSetup,
    RoundUnmaskAnswer, RoundUnmaskRequest, SecAggError, ShareDelivery, ShareUpload, Slot,
};
use prost::Message;

/// The body cap `coordinator/src/rpc/body_limit.rs` puts on every unary call today.
const COORDINATOR_UNARY_CAP: usize = 16 << 10;

fn context(n: usize, threshold: usize, degree: usize) -> (Arc<RoundContext>, Vec<KeyPair>) {
    let identities: Vec<KeyPair> = (0..n).map(|_| KeyPair::generate_ephemeral().unwrap()).collect();
    let ctx = RoundContext::new(RoundSetup {
        federation_id: "fed-wire".into(),
        round: 3,
        attempt: 1,
        members: identities
            .iter()
            .enumerate()
            .map(|(i, k)| (ClientId::parse(&format!("site-{i:04}")).unwrap(), k.public_key()))
            .collect(),
        threshold,
        degree,
        graph_seed: [5; 32],
        vector_len: 16,
    })
    .unwrap();
    (Arc::new(ctx), identities)
}

/// Encodes, decodes and converts back with the round's context, as the receiving side does.
fn over_the_wire<M: Message + Default, T>(
    msg: M,
    ctx: &RoundContext,
    from_pb: fn(M, &RoundContext) -> Result<T, ConvertError>,
) -> T {
    let bytes = msg.encode_to_vec();
    from_pb(M::decode(bytes.as_slice()).unwrap(), ctx).unwrap()
}

/// Every message of one round of 5 clients (threshold 3), slot 4 dropping after sharing so the
/// unmasking answers carry both kinds of shares, as it went over the wire.
struct WireRound {
    ctx: Arc<RoundContext>,
    adverts: Vec<KeyAdvertisement>,
    peer_keys: Vec<PeerKeys>,
    uploads: Vec<ShareUpload>,
    deliveries: Vec<ShareDelivery>,
    request: RoundUnmaskRequest,
    answers: Vec<RoundUnmaskAnswer>,
    sum: Vec<u32>,
    expected: Vec<u32>,
}

fn wire_round() -> WireRound {
    let (ctx, ids) = context(5, 3, 4);
    let here = RoundRef::of(&ctx);
    let inputs: Vec<Vec<u32>> = (0..5u32).map(|i| (0..16).map(|j| i * 1000 + j).collect()).collect();
    let mut agg = Aggregator::new(ctx.clone());

    let mut states = Vec::new();
    let mut adverts = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (state, keys) = KeysAdvertised::start(ctx.clone(), Slot(i as u32), id).unwrap();
        let sent = KeyAdvertisement { round: here, keys };
        let got = over_the_wire((&sent).into(), &ctx, KeyAdvertisement::from_pb);
        assert_eq!(got, sent);
        got.round.check(&ctx).unwrap();
        agg.accept_keys(Slot(i as u32), got.keys.clone()).unwrap();
        adverts.push(got);
        states.push(state);
    }
    agg.close_advertising().unwrap();

    let (mut peer_keys, mut uploads, mut shared) = (Vec::new(), Vec::new(), Vec::new());
    for (i, state) in states.into_iter().enumerate() {
        let me = Slot(i as u32);
        let sent = PeerKeys { round: here, keys: agg.keys_for(me) };
        let got = over_the_wire((&sent).into(), &ctx, PeerKeys::from_pb);
        assert_eq!(got, sent);
        let (next, bundles) = state.share(&got.keys).unwrap();
        let upload =
            over_the_wire((&ShareUpload { round: here, bundles }).into(), &ctx, ShareUpload::from_pb);
        agg.accept_shares(me, upload.bundles.clone()).unwrap();
        peer_keys.push(got);
        uploads.push(upload);
        shared.push(next);
    }
    let sharers = agg.close_sharing().unwrap();

    let (mut deliveries, mut masked) = (Vec::new(), Vec::new());
    for (i, state) in shared.into_iter().enumerate() {
        let me = Slot(i as u32);
        let sent = ShareDelivery { round: here, bundles: agg.shares_for(me), sharers: sharers.clone() };
        let got = over_the_wire((&sent).into(), &ctx, ShareDelivery::from_pb);
        assert_eq!(got, sent);
        let (next, input) = state.mask(&got.bundles, &got.sharers, &inputs[i]).unwrap();
        deliveries.push(got);
        if i == 4 {
            continue; // drops after sharing
        }
        let back = MaskedInput::from_payload(me, &input.payload()).unwrap();
        assert_eq!(back, input);
        agg.accept_masked_input(back).unwrap();
        masked.push(next);
    }
    let request = RoundUnmaskRequest { round: here, request: agg.close_masking().unwrap() };
    let request = over_the_wire((&request).into(), &ctx, RoundUnmaskRequest::from_pb);
    let mut answers = Vec::new();
    for state in masked {
        let answer = RoundUnmaskAnswer { round: here, answer: state.unmask(&request.request).unwrap() };
        let got = over_the_wire((&answer).into(), &ctx, RoundUnmaskAnswer::from_pb);
        assert_eq!(got, answer);
        agg.accept_unmask_answer(got.answer.clone()).unwrap();
        answers.push(got);
    }
    let expected = (0..16).map(|j| inputs[..4].iter().fold(0u32, |a, v| a.wrapping_add(v[j]))).collect();
    WireRound {
        ctx,
        adverts,
        peer_keys,
        uploads,
        deliveries,
        request,
        answers,
        sum: agg.finish().unwrap(),
        expected,
    }
}

#[test]
fn a_round_run_over_the_wire_encodings_unmasks_the_survivors_sum() {
    let r = wire_round();
    assert_eq!(r.sum, r.expected);
    assert_eq!(r.request.request.dropped, [Slot(4)]);
}

#[test]
fn the_set_up_converts_back_to_the_same_round_context() {
    let (ctx, _) = context(5, 3, 4);
    let wire = pb::SecAggSetup::from(ctx.as_ref());
    let decoded = pb::SecAggSetup::decode(wire.encode_to_vec().as_slice()).unwrap();
    let back = RoundContext::new(RoundSetup::try_from(decoded).unwrap()).unwrap();
    assert_eq!(back.digest(), ctx.digest());
    assert_eq!(pb::SecAggSetup::from(&back), wire);
}

#[test]
fn a_message_for_another_attempt_or_set_up_is_refused_as_another_round() {
    let (ctx, _) = context(5, 3, 4);
    let here = RoundRef::of(&ctx);
    for other in [
        RoundRef { attempt: 2, ..here },
        RoundRef { round: 4, ..here },
        RoundRef { context_digest: [0; 32], ..here },
    ] {
        assert_eq!(
            other.check(&ctx),
            Err(SecAggError::WrongRound { round: other.round, attempt: other.attempt })
        );
    }
}

/// An edit of a wire message and the field its refusal must name.
type Case<M> = (fn(&mut M), &'static str);

/// Converts `msg` after each case's edit and expects a refusal naming the case's field.
fn refused<M: Clone, T: std::fmt::Debug>(
    msg: &M,
    ctx: &RoundContext,
    from_pb: fn(M, &RoundContext) -> Result<T, ConvertError>,
    cases: Vec<Case<M>>,
) {
    for (mutate, field) in cases {
        let mut m = msg.clone();
        mutate(&mut m);
        let err = from_pb(m, ctx).expect_err(field).to_string();
        assert!(err.contains(&format!("`{field}`")), "{err} should name `{field}`");
    }
}

#[test]
fn malformed_key_messages_are_refused_naming_the_field() {
    let r = wire_round();
    let advert = pb::AdvertiseKeysRequest::from(&r.adverts[0]);
    refused(
        &advert,
        &r.ctx,
        KeyAdvertisement::from_pb,
        vec![
            (|m| m.round = None, "round"),
            (|m| m.round.as_mut().unwrap().round = 0, "round.round"),
            (|m| m.round.as_mut().unwrap().context_sha256 = vec![1; 31].into(), "round.context_sha256"),
            (|m| m.keys[0].peer = 5, "keys[].peer"),
            (|m| m.keys[0].owner = 1_000, "keys[].owner"),
            (|m| m.keys[0].peer = m.keys[0].owner, "keys[].peer"),
            (|m| m.keys[1].owner = 3, "keys[].owner"),
            (|m| m.keys[1].peer = m.keys[0].peer, "keys[].peer"),
            (|m| m.keys[0].public_key = vec![1; 33].into(), "keys[].public_key"),
            (|m| m.keys[0].signature = vec![1; 63].into(), "keys[].signature"),
            (|m| m.keys.push(m.keys[0].clone()), "keys"),
        ],
    );
    let delivered = pb::PeerKeys::from(&r.peer_keys[0]);
    refused(
        &delivered,
        &r.ctx,
        PeerKeys::from_pb,
        vec![
            (|m| m.keys[1].owner = m.keys[0].owner, "keys[].owner"),
            (|m| m.keys[1].peer = 3, "keys[].peer"),
        ],
    );
}

#[test]
fn malformed_share_messages_are_refused_naming_the_field() {
    let r = wire_round();
    let upload = pb::SendSharesRequest::from(&r.uploads[0]);
    refused(
        &upload,
        &r.ctx,
        ShareUpload::from_pb,
        vec![
            (|m| m.bundles[0].recipient = 9, "bundles[].recipient"),
            (|m| m.bundles[0].recipient = m.bundles[0].sender, "bundles[].recipient"),
            (|m| m.bundles[1].recipient = m.bundles[0].recipient, "bundles[].recipient"),
            (|m| m.bundles[1].sender = 3, "bundles[].sender"),
            (|m| m.bundles[0].ciphertext = m.bundles[0].ciphertext.slice(1..), "bundles[].ciphertext"),
            (|m| m.bundles[0].ciphertext = vec![0; sealed_bundle_len(5)].into(), "bundles[].ciphertext"),
            (|m| m.bundles.push(m.bundles[0].clone()), "bundles"),
        ],
    );
    let delivery = pb::DeliveredShares::from(&r.deliveries[0]);
    refused(
        &delivery,
        &r.ctx,
        ShareDelivery::from_pb,
        vec![
            (|m| m.bundles[1].sender = m.bundles[0].sender, "bundles[].sender"),
            (|m| m.bundles[1].recipient = 2, "bundles[].recipient"),
            (|m| m.sharers.swap(0, 1), "sharers"),
            (|m| m.sharers[1] = m.sharers[0], "sharers"),
            (|m| m.sharers.push(5), "sharers"),
        ],
    );
}

#[test]
fn malformed_unmasking_messages_are_refused_naming_the_field() {
    let r = wire_round();
    let request = pb::UnmaskRequest::from(&r.request);
    refused(
        &request,
        &r.ctx,
        RoundUnmaskRequest::from_pb,
        vec![
            (|m| m.survivors.push(m.survivors[0]), "survivors"),
            (|m| m.survivors[0] = 7, "survivors"),
            (|m| m.dropped.insert(0, m.survivors[0]), "dropped"),
        ],
    );
    let answer = pb::UnmaskAnswer::from(&r.answers[0]);
    refused(
        &answer,
        &r.ctx,
        RoundUnmaskAnswer::from_pb,
        vec![
            (|m| m.sender = 5, "sender"),
            (|m| m.revealed[0].kind = None, "revealed[].kind"),
            (|m| m.revealed.swap(0, 1), "revealed[].owner"),
            (|m| m.revealed[0].owner = 50, "revealed[].owner"),
            (
                |m| m.revealed[0].kind = Some(pb::revealed_shares::Kind::SelfMask(vec![0; 39].into())),
                "revealed[].self_mask",
            ),
            (
                |m| {
                    m.revealed[0].kind =
                        Some(pb::revealed_shares::Kind::SelfMask(vec![0xff; SHARE_VALUE_BYTES].into()))
                },
                "revealed[].self_mask",
            ),
            (|m| m.revealed.extend(std::iter::repeat_n(m.revealed[0].clone(), 5)), "revealed"),
        ],
    );
    // The pairwise shares of slot 4, which dropped, entry by entry.
    fn edit(m: &mut pb::UnmaskAnswer, f: impl FnOnce(&mut pb::PairwiseShares)) {
        let r = m.revealed.iter_mut().find(|r| r.owner == 4).unwrap();
        match r.kind.as_mut() {
            Some(pb::revealed_shares::Kind::Pairwise(p)) => f(p),
            other => panic!("slot 4 dropped, yet {other:?} is revealed of it"),
        }
    }
    refused(
        &answer,
        &r.ctx,
        RoundUnmaskAnswer::from_pb,
        vec![
            (|m| edit(m, |p| p.shares[0].peer = 4), "revealed[].pairwise.shares[].peer"),
            (|m| edit(m, |p| p.shares[1].peer = p.shares[0].peer), "revealed[].pairwise.shares[].peer"),
            (|m| edit(m, |p| p.shares[0].value = vec![0; 41].into()), "revealed[].pairwise.shares[].value"),
            (
                |m| edit(m, |p| p.shares.extend(std::iter::repeat_n(p.shares[0].clone(), 4))),
                "revealed[].pairwise.shares",
            ),
        ],
    );
}

#[test]
fn malformed_set_ups_are_refused_naming_the_field() {
    let (ctx, _) = context(5, 3, 4);
    let setup = pb::SecAggSetup::from(ctx.as_ref());
    let cases: Vec<Case<pb::SecAggSetup>> = vec![
        (|s| s.federation_id = "a b".into(), "setup.federation_id"),
        (|s| s.round = 0, "setup.round"),
        (|s| s.members.truncate(1), "setup.members"),
        (|s| s.members[1].client_id = s.members[0].client_id.clone(), "setup.members[].client_id"),
        (|s| s.members[1].client_id = "no/slash".into(), "setup.members[].client_id"),
        (|s| s.members[1].public_key = vec![1; 31].into(), "setup.members[].public_key"),
        (|s| s.graph_seed = vec![1; 16].into(), "setup.graph_seed"),
        (|s| s.vector_len = 0, "setup.vector_len"),
    ];
    for (mutate, field) in cases {
        let mut s = setup.clone();
        mutate(&mut s);
        let err = RoundSetup::try_from(s).unwrap_err().to_string();
        assert!(err.contains(&format!("`{field}`")), "{err} should name `{field}`");
    }
}

#[test]
fn a_masked_upload_header_keeps_the_plain_header_and_names_the_round_context() {
    let (ctx, _) = context(5, 3, 4);
    let header = MaskedUpdateHeader {
        header: UpdateHeader {
            id: RoundId::new(ctx.round(), ctx.attempt()),
            base_version: ModelVersion(2),
            num_examples: 40,
            metrics: BTreeMap::new(),
            manifest_digest: Sha256([1; 32]),
            total_bytes: 4 * ctx.vector_len() as u64,
            encoding: Default::default(),
        },
        secagg_context: *ctx.digest(),
    };
    let wire = pb::UpdateHeader::from(&header);
    assert_eq!(wire.encoding, pb::UpdateEncoding::MaskedU32 as i32);
    assert_eq!(MaskedUpdateHeader::try_from(wire.clone()).unwrap(), header);
    let err = UpdateHeader::try_from(wire).unwrap_err().to_string();
    assert!(err.contains("`header.encoding`"), "a plain upload path refuses masked values: {err}");
}

/// The largest honest message of each kind for a round of `n` clients of degree `k` (slots
/// near n so their varints are as long as they get), checked to convert, and its size.
fn largest_messages(n: usize, k: usize) -> Vec<(&'static str, bool, usize)> {
    let (ctx, _) = context(n, 2, k);
    assert_eq!(ctx.graph().degree(), k);
    let round = Some(pb::SecAggRoundRef::from(&RoundRef::of(&ctx)));
    let hi = n as u32 - 1;
    let key = |peer: u32| pb::AgreementKey {
        owner: hi,
        peer,
        public_key: vec![1; 32].into(),
        signature: vec![2; 64].into(),
    };
    let bundle = |recipient: u32| pb::SealedShares {
        sender: hi,
        recipient,
        ciphertext: vec![3; sealed_bundle_len(k)].into(),
    };
    let value = || bytes::Bytes::from(vec![0u8; SHARE_VALUE_BYTES]);
    let peers: Vec<u32> = (hi - k as u32..hi).collect();
    let advert =
        pb::AdvertiseKeysRequest { round: round.clone(), keys: peers.iter().map(|&p| key(p)).collect() };
    KeyAdvertisement::from_pb(advert.clone(), &ctx).unwrap();
    let delivered = pb::PeerKeys {
        round: round.clone(),
        keys: peers.iter().map(|&p| pb::AgreementKey { owner: p, peer: hi, ..key(0) }).collect(),
    };
    PeerKeys::from_pb(delivered.clone(), &ctx).unwrap();
    let upload =
        pb::SendSharesRequest { round: round.clone(), bundles: peers.iter().map(|&p| bundle(p)).collect() };
    ShareUpload::from_pb(upload.clone(), &ctx).unwrap();
    let delivery = pb::DeliveredShares {
        round: round.clone(),
        bundles: peers.iter().map(|&p| pb::SealedShares { sender: p, ..bundle(hi) }).collect(),
        sharers: (0..n as u32).collect(),
    };
    ShareDelivery::from_pb(delivery.clone(), &ctx).unwrap();
    let request = pb::UnmaskRequest {
        round: round.clone(),
        survivors: (0..n as u32).step_by(2).collect(),
        dropped: (1..n as u32).step_by(2).collect(),
    };
    RoundUnmaskRequest::from_pb(request.clone(), &ctx).unwrap();
    // Worst case: every neighbour dropped after sharing, each with k pairwise shares.
    let mut revealed: Vec<pb::RevealedShares> = peers
        .iter()
        .map(|&owner| pb::RevealedShares {
            owner,
            kind: Some(pb::revealed_shares::Kind::Pairwise(pb::PairwiseShares {
                shares: (0..n as u32)
                    .filter(|&p| p != owner)
                    .take(k)
                    .map(|peer| pb::PairwiseShare { peer, value: value() })
                    .collect(),
            })),
        })
        .collect();
    revealed.push(pb::RevealedShares { owner: hi, kind: Some(pb::revealed_shares::Kind::SelfMask(value())) });
    let answer = pb::UnmaskAnswer { round, sender: hi, revealed };
    RoundUnmaskAnswer::from_pb(answer.clone(), &ctx).unwrap();
    let setup = pb::SecAggSetup {
        members: (0..n)
            .map(|i| pb::SecAggMember { client_id: format!("{i:064}"), public_key: vec![4; 32].into() })
            .collect(),
        ..pb::SecAggSetup::from(ctx.as_ref())
    };
    RoundSetup::try_from(setup.clone()).unwrap();
    // gRPC frames each message with 5 bytes; `true` marks what a client sends.
    vec![
        ("AdvertiseKeysRequest", true, advert.encoded_len() + 5),
        ("SendSharesRequest", true, upload.encoded_len() + 5),
        ("UnmaskAnswer", true, answer.encoded_len() + 5),
        ("PeerKeys", false, delivered.encoded_len() + 5),
        ("DeliveredShares", false, delivery.encoded_len() + 5),
        ("UnmaskRequest", false, request.encoded_len() + 5),
        ("SecAggSetup", false, setup.encoded_len() + 5),
    ]
}

#[test]
fn the_largest_honest_messages_fit_the_limits() {
    let n = 1000;
    let k = suggested_degree(n);
    let at_1000 = largest_messages(n, k);
    let at_max = largest_messages(n, MAX_SECAGG_DEGREE);
    for ((name, from_client, size), (_, _, size_max)) in at_1000.iter().zip(&at_max) {
        eprintln!("{name}: {size} bytes at n = {n}, k = {k}; {size_max} at k = {MAX_SECAGG_DEGREE}");
        assert!(*size_max <= MAX_MESSAGE_BYTES, "{name}");
        if *from_client {
            assert!(*size_max <= MAX_SECAGG_REQUEST_BYTES, "{name}");
        }
    }
    // What the coordinator's unary body cap admits as it is: the key advertisement, at any
    // degree the wire carries; the share upload and the unmasking answer need
    // MAX_SECAGG_REQUEST_BYTES (k sealed bundles of k shares each, k² shares in all).
    let size = |list: &[(&str, bool, usize)], name: &str| list.iter().find(|m| m.0 == name).unwrap().2;
    assert!(size(&at_max, "AdvertiseKeysRequest") <= COORDINATOR_UNARY_CAP);
    assert!(size(&at_1000, "SendSharesRequest") > COORDINATOR_UNARY_CAP);
}
