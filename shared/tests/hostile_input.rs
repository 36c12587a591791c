//! Every message either side accepts from the network, decoded from arbitrary bytes and then
//! validated (`TryFrom`), must be answered with `Ok` or `Err`, never a panic or an unbounded
//! allocation. Inputs are random bytes and mutations (flips, truncations, insertions) of valid
//! encodings, so the validation paths behind a successful decode are reached too.
//!
//! The secure-aggregation messages are checked against one fixed round's context (their slots
//! only mean something within a roster), seeded with the messages of a real run of that round.
//!
//! Bounded: 4096 cases per property by default (about a second in total) so every test run
//! includes it; `.ci/run` runs it again with `FEDTUNE_FUZZ_CASES` set for a longer (about a
//! minute) bounded search on every change.

use std::sync::{Arc, OnceLock};

use fedtune_shared::auth::{ChallengeGrant, ChallengeRequest, EnrollRequest, JoinProof};
use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::ClientId;
use fedtune_shared::pb;
use fedtune_shared::round::{
    DownloadItem, DownloadRequest, EvalReport, FailureReport, Heartbeat, HeartbeatReply, JoinRequest,
    JoinResponse, MaskedUpdateHeader, StatusReport, Task, UpdateHeader, UploadItem, UploadReceipt,
};
use fedtune_shared::secagg::{
    Aggregator, KeyAdvertisement, KeysAdvertised, PeerKeys, RoundContext, RoundRef, RoundSetup,
    RoundUnmaskAnswer, RoundUnmaskRequest, ShareDelivery, ShareUpload, Slot,
};
use proptest::prelude::*;
use prost::Message;

/// A secure round of 4 clients (slot 3 drops after sharing) whose context the secure-aggregation
/// messages are checked against, and valid encodings of each of its messages, for mutation.
struct SecureRound {
    ctx: Arc<RoundContext>,
    seeds: Vec<Vec<u8>>,
}

fn secure_round() -> &'static SecureRound {
    static ROUND: OnceLock<SecureRound> = OnceLock::new();
    ROUND.get_or_init(|| {
        let ids: Vec<KeyPair> = (0..4).map(|_| KeyPair::generate_ephemeral().unwrap()).collect();
        let ctx = Arc::new(
            RoundContext::new(RoundSetup {
                federation_id: "fed-1".into(),
                round: 2,
                attempt: 0,
                members: ids
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (ClientId::parse(&format!("site-{i}")).unwrap(), k.public_key()))
                    .collect(),
                threshold: 3,
                degree: 3,
                graph_seed: [1; 32],
                vector_len: 4,
            })
            .unwrap(),
        );
        let here = RoundRef::of(&ctx);
        let mut seeds = vec![pb::SecAggSetup::from(ctx.as_ref()).encode_to_vec()];
        let mut agg = Aggregator::new(ctx.clone());
        let mut states = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (state, keys) = KeysAdvertised::start(ctx.clone(), Slot(i as u32), id).unwrap();
            seeds.push(
                pb::AdvertiseKeysRequest::from(&KeyAdvertisement { round: here, keys: keys.clone() })
                    .encode_to_vec(),
            );
            agg.accept_keys(Slot(i as u32), keys).unwrap();
            states.push(state);
        }
        agg.close_advertising().unwrap();
        let mut shared = Vec::new();
        for (i, state) in states.into_iter().enumerate() {
            let keys = agg.keys_for(Slot(i as u32));
            seeds.push(pb::PeerKeys::from(&PeerKeys { round: here, keys: keys.clone() }).encode_to_vec());
            let (next, bundles) = state.share(&keys).unwrap();
            seeds.push(
                pb::SendSharesRequest::from(&ShareUpload { round: here, bundles: bundles.clone() })
                    .encode_to_vec(),
            );
            agg.accept_shares(Slot(i as u32), bundles).unwrap();
            shared.push(next);
        }
        let sharers = agg.close_sharing().unwrap();
        let mut masked = Vec::new();
        for (i, state) in shared.into_iter().enumerate() {
            let bundles = agg.shares_for(Slot(i as u32));
            let delivery = ShareDelivery { round: here, bundles, sharers: sharers.clone() };
            seeds.push(pb::DeliveredShares::from(&delivery).encode_to_vec());
            let (next, input) = state.mask(&delivery.bundles, &sharers, &[1, 2, 3, 4]).unwrap();
            if i < 3 {
                agg.accept_masked_input(input).unwrap();
                masked.push(next);
            }
        }
        let request = agg.close_masking().unwrap();
        seeds.push(
            pb::UnmaskRequest::from(&RoundUnmaskRequest { round: here, request: request.clone() })
                .encode_to_vec(),
        );
        for state in masked {
            let answer = state.unmask(&request).unwrap();
            seeds.push(pb::UnmaskAnswer::from(&RoundUnmaskAnswer { round: here, answer }).encode_to_vec());
        }
        SecureRound { ctx, seeds }
    })
}

/// Decodes `bytes` as `$pb` and, if that works, converts it with every validation that applies.
macro_rules! check {
    ($bytes:expr, $pb:ty $(, $convert:expr)*) => {{
        if let Ok(msg) = <$pb>::decode($bytes) {
            $( let _ = ($convert)(msg.clone()); )*
            // Re-encoding what was accepted must work too (the server echoes parts of requests).
            let _ = msg.encode_to_vec();
        }
    }};
}

fn check_all(bytes: &[u8]) {
    // Coordinator side: requests.
    check!(bytes, pb::JoinRequest, |m: pb::JoinRequest| JoinProof::from_request(&m), JoinRequest::try_from);
    check!(bytes, pb::JoinChallengeRequest, ChallengeRequest::try_from);
    check!(bytes, pb::EnrollRequest, EnrollRequest::try_from);
    check!(bytes, pb::WaitForTaskRequest);
    check!(bytes, pb::HeartbeatRequest, Heartbeat::try_from);
    check!(bytes, pb::DownloadModelRequest, DownloadRequest::try_from);
    check!(bytes, pb::UploadUpdateRequest, UploadItem::try_from);
    check!(bytes, pb::ReportEvaluationRequest, EvalReport::try_from);
    check!(bytes, pb::ReportFailureRequest, FailureReport::try_from);
    check!(bytes, pb::LeaveRequest);
    check!(bytes, pb::GetStatusRequest);
    check!(bytes, pb::UpdateHeader, UpdateHeader::try_from, MaskedUpdateHeader::try_from);
    let ctx = secure_round().ctx.as_ref();
    check!(bytes, pb::AdvertiseKeysRequest, |m| KeyAdvertisement::from_pb(m, ctx));
    check!(bytes, pb::SendSharesRequest, |m| ShareUpload::from_pb(m, ctx));
    check!(bytes, pb::UnmaskAnswer, |m| RoundUnmaskAnswer::from_pb(m, ctx));
    // Client side: responses.
    check!(bytes, pb::JoinResponse, JoinResponse::try_from);
    check!(bytes, pb::JoinChallengeResponse, ChallengeGrant::try_from);
    check!(bytes, pb::EnrollResponse);
    check!(bytes, pb::WaitForTaskResponse, Task::try_from);
    check!(bytes, pb::HeartbeatResponse, HeartbeatReply::try_from);
    check!(bytes, pb::DownloadModelResponse, DownloadItem::try_from);
    check!(bytes, pb::UploadUpdateResponse, UploadReceipt::from);
    check!(bytes, pb::GetStatusResponse, StatusReport::try_from);
    check!(bytes, pb::SecAggSetup, |m| RoundSetup::try_from(m).map(RoundContext::new));
    check!(bytes, pb::PeerKeys, |m| PeerKeys::from_pb(m, ctx));
    check!(bytes, pb::DeliveredShares, |m| ShareDelivery::from_pb(m, ctx));
    check!(bytes, pb::UnmaskRequest, |m| RoundUnmaskRequest::from_pb(m, ctx));
}

/// Valid encodings of realistic messages, for mutation.
fn seeds() -> Vec<Vec<u8>> {
    let manifest = pb::Manifest {
        tensors: vec![pb::TensorSpec {
            name: "classifier.weight".into(),
            shape: vec![2, 8],
            ..Default::default()
        }],
    };
    let header = pb::UpdateHeader {
        round: 3,
        attempt: 1,
        base_model_version: 2,
        num_examples: 40,
        metrics: [("train_loss".to_string(), 0.5)].into_iter().collect(),
        manifest_sha256: vec![7; 32].into(),
        total_bytes: 64,
        encoding: pb::UpdateEncoding::F32Delta as i32,
        secagg_context_sha256: Default::default(),
    };
    let upload = |item| pb::UploadUpdateRequest { item: Some(item) };
    let masked_header = pb::UpdateHeader {
        encoding: pb::UpdateEncoding::MaskedU32 as i32,
        secagg_context_sha256: secure_round().ctx.digest().to_vec().into(),
        ..header.clone()
    };
    let mut seeds = secure_round().seeds.clone();
    seeds.push(masked_header.encode_to_vec());
    seeds.extend([
        pb::JoinRequest {
            protocol_version: 1,
            client_name: "site-1".into(),
            public_key: vec![1; 32].into(),
            train_examples: 10,
            eval_examples: 2,
            agent_version: "x".into(),
            challenge_nonce: vec![2; 32].into(),
            challenge_signature: vec![3; 64].into(),
        }
        .encode_to_vec(),
        pb::EnrollRequest {
            client_name: "site-1".into(),
            public_key: vec![1; 32].into(),
            enrollment_token: "A".repeat(43),
        }
        .encode_to_vec(),
        pb::JoinChallengeResponse {
            nonce: vec![4; 32].into(),
            federation_id: "fed-1".into(),
            expires_in_ms: 30_000,
        }
        .encode_to_vec(),
        upload(pb::upload_update_request::Item::Header(header)).encode_to_vec(),
        upload(pb::upload_update_request::Item::Chunk(pb::Chunk { offset: 8, data: vec![0; 16].into() }))
            .encode_to_vec(),
        upload(pb::upload_update_request::Item::Trailer(pb::UpdateTrailer {
            payload_sha256: vec![5; 32].into(),
            signature_scheme: "ed25519".into(),
            signature: vec![6; 64].into(),
        }))
        .encode_to_vec(),
        pb::JoinResponse {
            client_id: "site-1".into(),
            session_token: "t".into(),
            protocol_version: 1,
            heartbeat_interval_ms: 1000,
            liveness_timeout_ms: 5000,
            trainable_manifest: Some(manifest),
            limits: Some(pb::Limits {
                max_message_bytes: 8 << 20,
                max_chunk_bytes: 4 << 20,
                default_chunk_bytes: 1 << 20,
                max_abs_update_value: 256.0,
            }),
            federation_id: "fed-1".into(),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::ReportEvaluationRequest {
            round: 1,
            model_version: 1,
            num_examples: 3,
            loss: 0.3,
            accuracy: 0.9,
            metrics: [("macro_f1".to_string(), 0.8)].into_iter().collect(),
        }
        .encode_to_vec(),
    ]);
    seeds
}

/// A mutation of a seed: flip bytes, cut, or splice random bytes in.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let n = seeds().len();
    (0..n, proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..8)).prop_map(|(i, edits)| {
        let mut b = seeds()[i].clone();
        for (pos, byte, kind) in edits {
            if b.is_empty() {
                b.push(byte);
                continue;
            }
            let p = pos as usize % b.len();
            match kind {
                0 => b[p] ^= byte | 1,
                1 => b.truncate(p),
                _ => b.insert(p, byte),
            }
        }
        b
    })
}

/// Cases per property: `FEDTUNE_FUZZ_CASES`, or 4096.
fn fuzz_cases() -> u32 {
    std::env::var("FEDTUNE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(4096)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder_or_validator(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_all(&bytes);
    }

    #[test]
    fn mutated_valid_messages_never_panic_any_decoder_or_validator(bytes in mutated()) {
        check_all(&bytes);
    }

    #[test]
    fn arbitrary_field_values_in_uploads_and_joins_are_refused_or_accepted_without_panic(
        round in any::<u64>(), attempt in any::<u32>(), examples in any::<u64>(), total in any::<u64>(),
        digest in proptest::collection::vec(any::<u8>(), 0..40), metric in any::<f64>(),
        key in proptest::collection::vec(any::<u8>(), 0..40), name in ".{0,80}", token in ".{0,60}",
        offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let header = pb::UpdateHeader {
            round, attempt, base_model_version: round, num_examples: examples,
            metrics: [(name.clone(), metric)].into_iter().collect(),
            manifest_sha256: digest.clone().into(), total_bytes: total, encoding: attempt as i32,
            secagg_context_sha256: key.clone().into(),
        };
        let _ = UploadItem::try_from(pb::UploadUpdateRequest { item: Some(pb::upload_update_request::Item::Header(header)) });
        let chunk = pb::Chunk { offset, data: data.into() };
        let _ = UploadItem::try_from(pb::UploadUpdateRequest { item: Some(pb::upload_update_request::Item::Chunk(chunk)) });
        let trailer = pb::UpdateTrailer { payload_sha256: digest.clone().into(), signature_scheme: name.clone(), signature: key.clone().into() };
        let _ = UploadItem::try_from(pb::UploadUpdateRequest { item: Some(pb::upload_update_request::Item::Trailer(trailer)) });
        let join = pb::JoinRequest {
            client_name: name.clone(), public_key: key.clone().into(), challenge_nonce: digest.clone().into(),
            challenge_signature: key.clone().into(), agent_version: token.clone(), ..Default::default()
        };
        let _ = JoinProof::from_request(&join);
        let _ = JoinRequest::try_from(join);
        let _ = EnrollRequest::try_from(pb::EnrollRequest { client_name: name.clone(), public_key: key.into(), enrollment_token: token });
        let _ = ChallengeRequest::try_from(pb::JoinChallengeRequest { client_name: name.clone() });
        let _ = ChallengeGrant::try_from(pb::JoinChallengeResponse { nonce: digest.into(), federation_id: name, expires_in_ms: offset });
    }
}
