//! Issue #5 end to end, on real servers over loopback: who may join, who is calling, whether an
//! update is really theirs, TLS and mutual TLS, and limits. Every refusal gets the status that
//! fits, and none of them changes the aggregate: a round that saw every attack publishes bit for
//! bit the model of a round that saw none, while the honest clients keep being served.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use fedtune_coordinator::auth::Allowlist;
use fedtune_coordinator::certs::init_dev_pki;
use fedtune_shared::auth::{sign_upload, ChallengeGrant, JoinProof};
use fedtune_shared::chunk::DEFAULT_CHUNK_BYTES;
use fedtune_shared::crypto::{client_tls_config, KeyPair, SessionAuthority, SessionSecret};
use fedtune_shared::ids::{ClientId, ModelVersion, RoundId, Sha256};
use fedtune_shared::params::ParameterVector;
use fedtune_shared::pb;
use fedtune_shared::round::{FitTask, ModelScope, UpdateHeader, UpdateTrailer, UploadItem};
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{
    expect_status, f32_bytes, finish_round_two, update_values, upload_items, InProcess, TestClient,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

fn id(s: &str) -> ClientId {
    ClientId::parse(s).unwrap()
}

fn unix_now() -> u64 {
    fedtune_coordinator::auth::allowlist::unix_now()
}

/// Upload items for `header`/`payload` whose trailer carries `signature` exactly as given.
fn forged(
    header: &UpdateHeader,
    payload: &[u8],
    signature: Option<fedtune_shared::round::UpdateSignature>,
) -> Vec<pb::UploadUpdateRequest> {
    let mut items = upload_items(header, payload, DEFAULT_CHUNK_BYTES, Sha256::of(payload));
    items.pop();
    items.push(UploadItem::Trailer(UpdateTrailer { payload_digest: Sha256::of(payload), signature }).into());
    items
}

/// Two rounds with clients a, b, e (and an allowlisted, unselected f). In round 2, if `hostile`,
/// every identity and signature attack is tried first. Returns the bits of the round-2 model.
async fn scenario(dir: &Path, hostile: bool) -> Result<Vec<u32>> {
    let model = write_fake_model(&dir.join("model"), 2, 8)?;
    let mut s = quick_settings(&dir.join("state"), &model, 2, 3, 3);
    s.evaluation.every = 0;
    s.clients.heartbeat_interval = Duration::from_secs(1);
    s.clients.liveness_timeout = Duration::from_secs(60);
    let state = s.storage.state_dir.clone();
    let coord = InProcess::start(s).await?;
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    let mut b = TestClient::join(&coord.url, "b", 0).await?;
    let mut e = TestClient::join(&coord.url, "e", 0).await?;
    let n = a.trainable().numel();

    let mut round1_items = Vec::new();
    for (k, c) in [&mut a, &mut b, &mut e].into_iter().enumerate() {
        let t = c.wait_for_fit(WAIT).await?;
        if k == 2 {
            // Kept to replay in round 2, signature and all.
            let payload = f32_bytes(&update_values(k, n));
            let header = c.header(&t, 12, payload.len() as u64);
            let sig = sign_upload(
                c.key.as_ref().unwrap(),
                c.federation_id.as_ref().unwrap(),
                &id("e"),
                &header,
                &Sha256::of(&payload),
            );
            round1_items = forged(&header, &payload, Some(sig));
            c.upload_raw(round1_items.clone()).await?;
        } else {
            c.upload(&t, 10 + k as u64, &f32_bytes(&update_values(k, n))).await?;
        }
    }
    a.wait_status(WAIT, |s| s.model_version == ModelVersion(1)).await?;

    let (ta, tb, te) =
        (a.wait_for_fit(WAIT).await?, b.wait_for_fit(WAIT).await?, e.wait_for_fit(WAIT).await?);
    assert_eq!(te.id, RoundId::new(2, 0));
    if hostile {
        try_every_attack(&coord.url, &state, &mut e, &te, n, &round1_items).await?;
        let status = a.status().await?;
        assert_eq!((status.model_version, status.accepted_updates), (ModelVersion(1), 0));
    }
    // When hostile, the same signed update is also replayed within the round.
    finish_round_two(coord, (&mut a, &ta), (&mut b, &tb), (&mut e, &te), hostile).await
}

async fn try_every_attack(
    url: &str,
    state: &Path,
    e: &mut TestClient,
    t: &FitTask,
    n: usize,
    round1_items: &[pb::UploadUpdateRequest],
) -> Result<()> {
    let payload = f32_bytes(&update_values(6, n));
    let digest = Sha256::of(&payload);
    let header = e.header(t, 17, payload.len() as u64);
    let fed = e.federation_id.clone().unwrap();
    let key = e.key.clone().unwrap();

    // --- Joining.
    // A key nobody allowlisted.
    let mut mallory = TestClient::connect(url).await?;
    mallory.key = Some(Arc::new(KeyPair::generate_ephemeral()?));
    expect_status(mallory.try_join("mallory", 0).await, Code::PermissionDenied, &["not allowlisted"]);
    // An allowlisted name with someone else's key.
    let mut impostor = TestClient::connect(url).await?;
    impostor.key = Some(Arc::new(KeyPair::generate_ephemeral()?));
    expect_status(impostor.try_join("e", 0).await, Code::Unauthenticated, &["does not verify"]);
    // No challenge answer at all, and a replayed one.
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(url.to_string()).await?;
    let plain = pb::JoinRequest {
        protocol_version: pb::PROTOCOL_VERSION,
        client_name: "e".into(),
        ..Default::default()
    };
    expect_status(raw.join(plain.clone()).await, Code::Unauthenticated, &["challenge"]);
    // Allowlisted first: a name that is neither allowlisted nor enrolling gets no challenge.
    let f_key = fedtune_tests::identities::key_for(url, "f")?;
    let grant = raw.join_challenge(pb::JoinChallengeRequest { client_name: "f".into() }).await?.into_inner();
    let grant = ChallengeGrant::try_from(grant)?;
    let mut answered = pb::JoinRequest { client_name: "f".into(), ..plain.clone() };
    JoinProof::answer(&f_key, &grant, &id("f")).attach(&mut answered);
    raw.join(answered.clone()).await?;
    expect_status(raw.join(answered).await, Code::Unauthenticated, &["already used"]);
    // A challenge issued to one name cannot be answered for another.
    let grant = ChallengeGrant::try_from(
        raw.join_challenge(pb::JoinChallengeRequest { client_name: "f".into() }).await?.into_inner(),
    )?;
    let mut crossed = pb::JoinRequest { client_name: "e".into(), ..plain };
    JoinProof::answer(&key, &grant, &id("e")).attach(&mut crossed);
    expect_status(raw.join(crossed).await, Code::Unauthenticated, &["challenge"]);

    // --- Sessions.
    let mut forged_session = e.clone();
    let token = e.token().unwrap();
    let flipped: String = token.chars().rev().collect();
    forged_session.set_token(Some(flipped));
    expect_status(
        forged_session.poll(Duration::from_millis(10)).await,
        Code::Unauthenticated,
        &["join again"],
    );
    let secret = SessionSecret::load_or_generate(&state.join("session.key"))?;
    let expired = SessionAuthority::new(&secret, fed.clone()).issue(
        "e",
        None,
        Duration::from_secs(60),
        unix_now() - 3600,
    )?;
    forged_session.set_token(Some(expired.expose_secret().to_string()));
    let s = expect_status(
        forged_session.poll(Duration::from_millis(10)).await,
        Code::Unauthenticated,
        &["expired"],
    );
    assert!(!s.message().contains(expired.expose_secret()), "a token must never be echoed");
    // A client revoked while holding a live session: refused at once, on every call.
    let mut f = TestClient::join(url, "f", 0).await?;
    Allowlist::open(state)?.revoke(&id("f"))?;
    expect_status(f.poll(Duration::from_millis(10)).await, Code::PermissionDenied, &["revoked"]);
    expect_status(f.try_join("f", 0).await, Code::PermissionDenied, &["revoked"]);

    // --- Updates.
    e.signing = false;
    let stranger = KeyPair::generate_ephemeral()?;
    let cases: Vec<(&str, Vec<pb::UploadUpdateRequest>)> = vec![
        ("unsigned", forged(&header, &payload, None)),
        (
            "wrong key",
            forged(&header, &payload, Some(sign_upload(&stranger, &fed, &id("e"), &header, &digest))),
        ),
        (
            "another federation",
            forged(&header, &payload, Some(sign_upload(&key, "fed-elsewhere", &id("e"), &header, &digest))),
        ),
        (
            "another client",
            forged(&header, &payload, Some(sign_upload(&key, &fed, &id("a"), &header, &digest))),
        ),
        ("another round", {
            let r1 = UpdateHeader { id: RoundId::new(1, 0), ..header.clone() };
            forged(&header, &payload, Some(sign_upload(&key, &fed, &id("e"), &r1, &digest)))
        }),
        ("more examples claimed", {
            let signed = sign_upload(&key, &fed, &id("e"), &header, &digest);
            let heavier = UpdateHeader { num_examples: 1000, ..header.clone() };
            forged(&heavier, &payload, Some(signed))
        }),
        ("tampered payload", {
            let signed = sign_upload(&key, &fed, &id("e"), &header, &digest);
            let mut tampered = update_values(6, n);
            tampered[3] += 0.5;
            forged(&header, &f32_bytes(&tampered), Some(signed))
        }),
    ];
    for (what, items) in cases {
        let res = e.upload_raw(items).await;
        assert!(matches!(&res, Err(s) if s.code() == Code::Unauthenticated), "{what}: {res:?}");
        expect_status(res, Code::Unauthenticated, &["signature"]);
    }
    // A genuine round-1 update replayed in round 2: refused as stale before its bytes count.
    expect_status(e.upload_raw(round1_items.to_vec()).await, Code::FailedPrecondition, &["stale"]);
    e.signing = true;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_signature_attacks_are_refused_and_leave_the_aggregate_bitwise_unchanged() -> Result<()>
{
    let hostile = tempfile::tempdir()?;
    let quiet = tempfile::tempdir()?;
    let attacked = scenario(hostile.path(), true).await?;
    let clean = scenario(quiet.path(), false).await?;
    assert_eq!(attacked, clean, "an attack changed the published model");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_revoked_mid_upload_is_refused_and_the_round_completes_without_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let mut s = quick_settings(&dir.path().join("state"), &model, 1, 3, 2);
    s.evaluation.every = 0;
    // All three are sampled; two updates are enough to complete the round.
    s.rounds.min_available = 3;
    let state = s.storage.state_dir.clone();
    let coord = InProcess::start(s).await?;
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    let mut b = TestClient::join(&coord.url, "b", 0).await?;
    let mut r = TestClient::join(&coord.url, "r", 0).await?;
    let v0 = a.download_vector(ModelVersion(0), ModelScope::Trainable).await?;
    let n = v0.values().len();
    let (ta, tb, tr) =
        (a.wait_for_fit(WAIT).await?, b.wait_for_fit(WAIT).await?, r.wait_for_fit(WAIT).await?);

    // r's upload is streaming when the operator revokes it; its trailer arrives afterwards.
    let payload = f32_bytes(&update_values(9, n));
    let items = upload_items(
        &r.header(&tr, 50, payload.len() as u64),
        &payload,
        DEFAULT_CHUNK_BYTES,
        Sha256::of(&payload),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(items.len());
    let mut r_up = r.clone();
    let upload =
        tokio::spawn(
            async move { r_up.upload_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await },
        );
    let last = items.len() - 1;
    for item in items.iter().take(last).cloned() {
        tx.send(item).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Allowlist::open(&state)?.revoke(&id("r"))?;
    tx.send(items[last].clone()).await?;
    drop(tx);
    expect_status(upload.await?, Code::PermissionDenied, &["revoked"]);
    expect_status(r.poll(Duration::from_millis(10)).await, Code::PermissionDenied, &["revoked"]);

    // The honest clients finish the round; r is dropped as silent, its bytes never counted.
    let (da, db) = (update_values(1, n), update_values(2, n));
    a.upload(&ta, 10, &f32_bytes(&da)).await?;
    b.upload(&tb, 30, &f32_bytes(&db)).await?;
    assert_eq!(a.wait_finished(Duration::from_secs(40)).await?, ModelVersion(1));
    let v1 = a.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    let worst = v1
        .values()
        .iter()
        .zip(v0.values())
        .zip(da.iter().zip(&db))
        .map(|((got, base), (x, y))| (got - (base + (10.0 * x + 30.0 * y) / 40.0)).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "the published model is not the mean of a and b alone (off by {worst})");
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_token_allowlists_one_key_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 1, 8)?;
    let s = quick_settings(&dir.path().join("state"), &model, 1, 1, 1);
    let state = s.storage.state_dir.clone();
    let coord = InProcess::start(s).await?;
    let token = Allowlist::open(&state)?.issue_enrollment_token(&id("new-site"), Duration::from_secs(600))?;
    let key = Arc::new(KeyPair::generate_ephemeral()?);
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(coord.url.clone()).await?;
    let enroll = |name: &str, key: &KeyPair, token: String| pb::EnrollRequest {
        client_name: name.into(),
        public_key: key.public_key().as_bytes().to_vec().into(),
        enrollment_token: token,
    };
    let wrong = fedtune_shared::crypto::EnrollmentToken::generate()?.expose_secret();
    expect_status(
        raw.enroll(enroll("new-site", &key, wrong)).await,
        Code::PermissionDenied,
        &["enrollment refused: no valid enrollment token"],
    );
    expect_status(
        raw.enroll(enroll("other", &key, token.expose_secret())).await,
        Code::PermissionDenied,
        &["enrollment refused: no valid enrollment token"],
    );
    raw.enroll(enroll("new-site", &key, token.expose_secret())).await?;
    let thief = KeyPair::generate_ephemeral()?;
    expect_status(
        raw.enroll(enroll("new-site", &thief, token.expose_secret())).await,
        Code::PermissionDenied,
        &["enrollment refused"],
    );

    let mut c = TestClient::connect(&coord.url).await?;
    c.key = Some(key);
    c.rejoin("new-site", 0).await?;
    assert_eq!(c.contribute_and_finish(5, 1).await?, ModelVersion(1));
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_plaintext_and_mutual_tls_refuses_clients_without_a_valid_certificate_for_their_name(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 1, 8)?;
    let pki = init_dev_pki(&dir.path().join("pki"), &[], &["site-1".to_string()], false)?;
    let foreign = init_dev_pki(&dir.path().join("foreign"), &[], &["site-1".to_string()], false)?;

    // Serving without TLS and without --insecure is refused, naming the keys.
    let mut plain = quick_settings(&dir.path().join("state0"), &model, 1, 1, 1);
    plain.security.insecure = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let err = fedtune_coordinator::run(plain, listener, Default::default()).await.unwrap_err().to_string();
    assert!(err.contains("security.tls_cert") && err.contains("--insecure"), "{err}");

    let mut s = quick_settings(&dir.path().join("state"), &model, 1, 1, 1);
    s.security.insecure = false;
    s.security.tls_cert = Some(pki.server_cert.clone());
    s.security.tls_key = Some(pki.server_key.clone());
    s.security.client_ca = Some(pki.ca_cert.clone());
    let coord = InProcess::start(s).await?;
    let port = coord.url.rsplit(':').next().unwrap().to_string();

    // Plaintext to the TLS port: no call gets through.
    let plaintext = format!("http://127.0.0.1:{port}");
    match TestClient::connect(&plaintext).await {
        Err(_) => {}
        Ok(mut c) => assert!(c.status().await.is_err(), "a plaintext call was answered"),
    }
    // TLS without a client certificate, or with one from another CA: refused by mutual TLS.
    let no_cert = client_tls_config(&pki.ca_cert, "localhost", None)?;
    match TestClient::connect_with(&coord.url, Some(no_cert)).await {
        Err(_) => {}
        Ok(mut c) => assert!(c.status().await.is_err(), "a client without a certificate was answered"),
    }
    let theirs = &foreign.clients[0];
    let wrong_ca = client_tls_config(&pki.ca_cert, "localhost", Some((&theirs.cert, &theirs.key)))?;
    match TestClient::connect_with(&coord.url, Some(wrong_ca)).await {
        Err(_) => {}
        Ok(mut c) => assert!(c.status().await.is_err(), "a client with a foreign certificate was answered"),
    }
    // The server is not trusted under another CA either.
    let ours = &pki.clients[0];
    let distrust = client_tls_config(&foreign.ca_cert, "localhost", Some((&ours.cert, &ours.key)))?;
    match TestClient::connect_with(&coord.url, Some(distrust)).await {
        Err(_) => {}
        Ok(mut c) => {
            assert!(c.status().await.is_err(), "a server certificate from an untrusted CA was accepted")
        }
    }
    // A valid certificate serves only the client it names: site-1's machine cannot join as
    // site-2, even with site-2's allowlisted key.
    let good = client_tls_config(&pki.ca_cert, "localhost", Some((&ours.cert, &ours.key)))?;
    let mut other = TestClient::connect_with(&coord.url, Some(good.clone())).await?;
    let refused = other.try_join("site-2", 0).await;
    expect_status(refused, Code::PermissionDenied, &["not issued to `site-2`"]);
    // With the right certificate: a whole round over mutual TLS.
    let mut c = TestClient::connect_with(&coord.url, Some(good)).await?;
    c.rejoin("site-1", 0).await?;
    assert_eq!(c.contribute_and_finish(5, 1).await?, ModelVersion(1));
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_calls_is_throttled_while_the_others_complete_their_round() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 2, 8)?;
    let mut s = quick_settings(&dir.path().join("state"), &model, 1, 3, 3);
    s.evaluation.every = 0;
    s.security.limits.calls_per_second = 5.0;
    s.security.limits.burst = 10;
    // The flooder is silent while its bucket refills (its refused calls prove no liveness):
    // long enough a liveness timeout that it is still in the round afterwards.
    s.clients.liveness_timeout = Duration::from_secs(30);
    let coord = InProcess::start(s).await?;
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    let mut b = TestClient::join(&coord.url, "b", 0).await?;
    let mut flood = TestClient::join(&coord.url, "flood", 0).await?;
    let n = a.trainable().numel();
    let (ta, tb, tf) =
        (a.wait_for_fit(WAIT).await?, b.wait_for_fit(WAIT).await?, flood.wait_for_fit(WAIT).await?);

    // The flooder hammers the upload RPC with stale uploads, 20 at a time.
    let payload = f32_bytes(&update_values(7, n));
    let stale = UpdateHeader { id: RoundId::new(0, 0), ..flood.header(&tf, 1, payload.len() as u64) };
    let mut calls = Vec::new();
    for _ in 0..60 {
        let mut c = flood.clone();
        let items = upload_items(&stale, &payload, DEFAULT_CHUNK_BYTES, Sha256::of(&payload));
        calls.push(tokio::spawn(async move { c.upload_raw(items).await }));
    }
    // Meanwhile the honest clients are served.
    a.upload(&ta, 10, &f32_bytes(&update_values(1, n))).await?;
    b.upload(&tb, 20, &f32_bytes(&update_values(2, n))).await?;
    let mut throttled = 0;
    for c in calls {
        if let Err(s) = c.await? {
            if s.code() == Code::ResourceExhausted {
                assert!(s.message().contains("calls"), "{}", s.message());
                throttled += 1;
            }
        }
    }
    assert!(throttled >= 40, "only {throttled} of 60 flood calls were throttled");
    // Once its bucket refills, the flooder is an ordinary client again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    flood.upload(&tf, 5, &f32_bytes(&update_values(3, n))).await?;
    assert_eq!(a.wait_finished(WAIT).await?, ModelVersion(1));
    let v1: ParameterVector = a.download_vector(ModelVersion(1), ModelScope::Trainable).await?;
    assert_eq!(v1.values().len(), n);
    coord.shutdown().await?;
    Ok(())
}
