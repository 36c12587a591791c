//! Every kind of bad upload gets a precise status, and none of them changes the aggregate: a
//! round that saw all of them publishes bit for bit the model of a round that saw none.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use fedtune_shared::chunk::DEFAULT_CHUNK_BYTES;
use fedtune_shared::ids::{ModelVersion, RoundId, Sha256};
use fedtune_shared::pb;
use fedtune_shared::round::{
    Chunk, FitTask, ModelScope, UpdateHeader, UpdateTrailer, UploadAdmission, UploadItem,
};
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{
    expect_status, f32_bytes, files_in, finish_round_two, update_values, upload_items, InProcess, TestClient,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

/// Runs two rounds with clients a, b, e (and an unselected f). In round 2, if `bad`, every bad
/// upload is tried first. Returns the bits of the round-2 model's trainable values.
async fn scenario(dir: &Path, bad: bool) -> Result<Vec<u32>> {
    let model = write_fake_model(&dir.join("model"), 2, 8)?;
    let mut s = quick_settings(&dir.join("state"), &model, 2, 3, 2);
    s.evaluation.every = 0;
    s.rounds.min_available = 3;
    s.clients.heartbeat_interval = Duration::from_secs(1);
    s.clients.liveness_timeout = Duration::from_secs(60);
    let spool = s.storage.state_dir.join("spool");
    let coord = InProcess::start(s).await?;
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    let mut b = TestClient::join(&coord.url, "b", 0).await?;
    let mut e = TestClient::join(&coord.url, "e", 0).await?;
    let n = a.trainable().numel();

    // Round 1: everyone contributes; afterwards round-1 uploads are stale.
    for (k, c) in [&mut a, &mut b, &mut e].into_iter().enumerate() {
        let t = c.wait_for_fit(WAIT).await?;
        c.upload(&t, 10 + k as u64, &f32_bytes(&update_values(k, n))).await?;
    }
    a.wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;

    let (ta, tb, te) =
        (a.wait_for_fit(WAIT).await?, b.wait_for_fit(WAIT).await?, e.wait_for_fit(WAIT).await?);
    assert_eq!(te.id, RoundId::new(2, 0));
    // f joins after round 2 was sampled: alive, but not selected.
    let mut f = TestClient::join(&coord.url, "f", 0).await?;

    if bad {
        let published = e.download(ModelVersion(1), ModelScope::Trainable, 0, None).await?.0.payload_digest;
        try_everything_bad(&coord.url, &mut e, &mut f, &te, n).await?;
        // The published model is untouched and nothing is left staged.
        assert_eq!(
            e.download(ModelVersion(1), ModelScope::Trainable, 0, None).await?.0.payload_digest,
            published
        );
        assert!(files_in(&spool).is_empty(), "left in the spool: {:?}", files_in(&spool));
        let status = a.status().await?;
        assert_eq!((status.model_version, status.accepted_updates), (ModelVersion(1), 0));
    }
    finish_round_two(coord, (&mut a, &ta), (&mut b, &tb), (&mut e, &te), bad).await
}

fn with(header: &UpdateHeader, edit: impl FnOnce(&mut UpdateHeader)) -> UpdateHeader {
    let mut h = header.clone();
    edit(&mut h);
    h
}

async fn try_everything_bad(
    url: &str,
    e: &mut TestClient,
    f: &mut TestClient,
    t: &FitTask,
    n: usize,
) -> Result<()> {
    let good = f32_bytes(&update_values(6, n));
    let header = e.header(t, 17, good.len() as u64);
    let digest = Sha256::of(&good);
    let items =
        |h: &UpdateHeader, payload: &[u8]| upload_items(h, payload, DEFAULT_CHUNK_BYTES, Sha256::of(payload));

    // Who is calling.
    let mut anonymous = TestClient::connect(url).await?;
    expect_status(
        anonymous.upload_raw(items(&header, &good)).await,
        Code::Unauthenticated,
        &["authorization"],
    );
    anonymous.set_token(Some("not-a-session".into()));
    expect_status(anonymous.upload_raw(items(&header, &good)).await, Code::Unauthenticated, &["join again"]);
    let f_header = f.header(t, 17, good.len() as u64);
    expect_status(
        f.upload_raw(items(&f_header, &good)).await,
        Code::FailedPrecondition,
        &["`f`", "not selected"],
    );

    // Admission: an upload stream needs a live ReserveUpload grant for the attempt it names,
    // and is refused at its header without one, before a byte is staged.
    expect_status(
        e.upload_raw_ungranted(items(&header, &good)).await,
        Code::FailedPrecondition,
        &["`e`", "no upload grant", "round 2 (attempt 0)", "ReserveUpload"],
    );
    let granted = e.reserve_upload(t.id, Duration::from_secs(5)).await?;
    assert!(matches!(granted, UploadAdmission::Granted { .. }), "{granted:?}");
    let other_attempt = with(&header, |h| h.id = RoundId::new(2, 1));
    expect_status(
        e.upload_raw_ungranted(items(&other_attempt, &good)).await,
        Code::FailedPrecondition,
        &["no upload grant", "round 2 (attempt 1)"],
    );

    // Which round.
    let stale = with(&header, |h| h.id = RoundId::new(1, 0));
    expect_status(
        e.upload_raw(items(&stale, &good)).await,
        Code::FailedPrecondition,
        &["round 1 (attempt 0)", "stale"],
    );
    let future = with(&header, |h| h.id = RoundId::new(3, 0));
    expect_status(
        e.upload_raw(items(&future, &good)).await,
        Code::FailedPrecondition,
        &["round 3", "not started"],
    );
    let old_base = with(&header, |h| h.base_version = ModelVersion(0));
    expect_status(e.upload_raw(items(&old_base, &good)).await, Code::FailedPrecondition, &["v0", "v1"]);

    // Layout and size.
    let other_manifest = with(&header, |h| h.manifest_digest = Sha256([7; 32]));
    expect_status(e.upload_raw(items(&other_manifest, &good)).await, Code::InvalidArgument, &["manifest"]);
    let short = with(&header, |h| h.total_bytes -= 4);
    expect_status(e.upload_raw(items(&short, &good[4..])).await, Code::InvalidArgument, &["announces"]);
    let long = with(&header, |h| h.total_bytes += 4);
    expect_status(
        e.upload_raw(items(&long, &[good.clone(), vec![0; 4]].concat())).await,
        Code::ResourceExhausted,
        &["exceeds"],
    );
    let zero = with(&header, |h| h.num_examples = 0);
    expect_status(e.upload_raw(items(&zero, &good)).await, Code::InvalidArgument, &["num_examples"]);

    // Values.
    let first_tensor = e.trainable().tensors[0].name.clone();
    for (bad_value, needle) in [(f32::NAN, "non-finite"), (f32::INFINITY, "non-finite"), (1e6, "outside")] {
        let mut v = update_values(6, n);
        v[5] = bad_value;
        let payload = f32_bytes(&v);
        expect_status(
            e.upload_raw(items(&header, &payload)).await,
            Code::InvalidArgument,
            &[needle, &first_tensor],
        );
    }

    // Streams.
    let mut oversize = items(&header, &good);
    let trailer = oversize.pop().expect("trailer");
    oversize.push(UploadItem::Chunk(Chunk { offset: good.len() as u64, data: vec![0u8; 8].into() }).into());
    oversize.push(trailer);
    expect_status(e.upload_raw(oversize).await, Code::ResourceExhausted, &["exceeds"]);
    let mut truncated = items(&header, &good);
    truncated.truncate(2);
    expect_status(e.upload_raw(truncated).await, Code::DataLoss, &["truncated"]);
    let wrong_digest = upload_items(&header, &good, DEFAULT_CHUNK_BYTES, Sha256::of(b"something else"));
    expect_status(e.upload_raw(wrong_digest).await, Code::DataLoss, &["digest mismatch"]);
    let misaligned = vec![
        pb::UploadUpdateRequest::from(UploadItem::Header(header.clone())),
        UploadItem::Chunk(Chunk { offset: 0, data: good[..3].to_vec().into() }).into(),
    ];
    expect_status(e.upload_raw(misaligned).await, Code::InvalidArgument, &["multiple of 4"]);
    let out_of_order = vec![
        pb::UploadUpdateRequest::from(UploadItem::Header(header.clone())),
        UploadItem::Chunk(Chunk { offset: 4, data: good[4..8].to_vec().into() }).into(),
    ];
    expect_status(e.upload_raw(out_of_order).await, Code::InvalidArgument, &["does not continue"]);
    let headless = items(&header, &good)[1..].to_vec();
    expect_status(e.upload_raw(headless).await, Code::InvalidArgument, &["must start with its header"]);
    let mut two_headers = items(&header, &good);
    two_headers.insert(2, UploadItem::Header(header.clone()).into());
    expect_status(e.upload_raw(two_headers).await, Code::InvalidArgument, &["second header"]);
    let huge = vec![
        pb::UploadUpdateRequest::from(UploadItem::Header(header.clone())),
        UploadItem::Chunk(Chunk { offset: 0, data: vec![0u8; 5 << 20].into() }).into(),
        UploadItem::Trailer(UpdateTrailer { payload_digest: digest, signature: None }).into(),
    ];
    expect_status(e.upload_raw(huge).await, Code::ResourceExhausted, &["too large"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_upload_gets_a_precise_status_and_leaves_the_aggregate_bitwise_unchanged() -> Result<()> {
    let with_bad = tempfile::tempdir()?;
    let without = tempfile::tempdir()?;
    let after_bad = scenario(with_bad.path(), true).await?;
    let clean = scenario(without.path(), false).await?;
    assert_eq!(after_bad, clean, "the bad uploads changed the published model");
    Ok(())
}
