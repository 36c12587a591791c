//! Issue #10, who may see and ask what, over real gRPC: the status view an anonymous caller gets
//! and the operator's (by token, and by the operator certificate under mutual TLS), join
//! challenges under a flood, enrollment refusals, and session tokens bound to the client
//! certificate they were issued over.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use fedtune_coordinator::auth::{Allowlist, ClientAuth};
use fedtune_coordinator::certs::{init_dev_pki, PkiPaths};
use fedtune_coordinator::operator::{fetch_status, StatusArgs};
use fedtune_coordinator::{run_with, Seams};
use fedtune_shared::auth::{ChallengeGrant, JoinProof};
use fedtune_shared::crypto::{client_tls_config, EnrollmentToken, KeyPair};
use fedtune_shared::ids::{ClientId, ModelVersion};
use fedtune_shared::pb;
use fedtune_shared::round::{JoinRequest, PhaseName};
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{expect_status, InProcess, TestClient};
use tonic::Code;

fn id(s: &str) -> ClientId {
    ClientId::parse(s).unwrap()
}

fn status_args(url: &str, state_dir: Option<std::path::PathBuf>) -> StatusArgs {
    StatusArgs::plaintext(url, 10, state_dir)
}

/// A coordinator under mutual TLS with a development PKI for `site-1` and `site-2` (and the
/// operator certificate `certs init` always issues); one round that waits for both sites.
async fn mutual_tls_coordinator(dir: &std::path::Path, bind_names: bool) -> Result<(InProcess, PkiPaths)> {
    let model = write_fake_model(&dir.join("model"), 1, 8)?;
    let pki = init_dev_pki(&dir.join("pki"), &[], &["site-1".into(), "site-2".into()], false)?;
    let mut s = quick_settings(&dir.join("state"), &model, 1, 2, 2);
    s.evaluation.every = 0;
    s.security.insecure = false;
    s.security.tls_cert = Some(pki.server_cert.clone());
    s.security.tls_key = Some(pki.server_key.clone());
    s.security.client_ca = Some(pki.ca_cert.clone());
    s.security.bind_client_certificates = bind_names;
    Ok((InProcess::start(s).await?, pki))
}

/// A connection to `coord` presenting the certificate `cert`/`key`.
async fn over_certificate(
    coord: &InProcess,
    pki: &PkiPaths,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<TestClient> {
    let tls = client_tls_config(&pki.ca_cert, "localhost", Some((cert, key)))?;
    TestClient::connect_with(&coord.url, Some(tls)).await
}

/// `status` as the CLI runs it, over mutual TLS with `cert`/`key` and no operator token.
fn status_over_certificate(
    url: &str,
    pki: &PkiPaths,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> StatusArgs {
    StatusArgs {
        ca: Some(pki.ca_cert.clone()),
        tls_cert: Some(cert.to_path_buf()),
        tls_key: Some(key.to_path_buf()),
        ..StatusArgs::plaintext(url, 10, None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_token_replayed_over_another_clients_certificate_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (coord, pki) = mutual_tls_coordinator(dir.path(), true).await?;
    let (one, two) = (&pki.clients[0], &pki.clients[1]);
    let mut site1 = over_certificate(&coord, &pki, &one.cert, &one.key).await?;
    site1.rejoin("site-1", 0).await?;
    let mut site2 = over_certificate(&coord, &pki, &two.cert, &two.key).await?;
    site2.rejoin("site-2", 0).await?;
    let stolen = site1.token().expect("joined");
    let own = site2.token().expect("joined");

    // site-2's machine holds a valid certificate of the same CA and a session of its own, yet
    // site-1's token is no use over it; nor over the operator certificate.
    site2.set_token(Some(stolen.clone()));
    let refused = expect_status(
        site2.poll(Duration::ZERO).await,
        Code::Unauthenticated,
        &["bound to the client certificate it was issued over", "presents another one"],
    );
    assert!(!refused.message().contains(&stolen), "{}", refused.message());
    let mut operator = over_certificate(&coord, &pki, &pki.operator.cert, &pki.operator.key).await?;
    operator.set_token(Some(stolen.clone()));
    expect_status(operator.poll(Duration::ZERO).await, Code::Unauthenticated, &["presents another one"]);

    // The owner keeps its session over its own certificate, also on a fresh connection (the
    // binding is to the certificate, not the TCP connection), and both sites finish the round.
    site1.poll(Duration::ZERO).await?;
    let mut site1_again = over_certificate(&coord, &pki, &one.cert, &one.key).await?;
    site1_again.set_token(Some(stolen));
    site1_again.poll(Duration::ZERO).await?;
    site2.set_token(Some(own));
    let (t1, t2) = (
        site1.wait_for_fit(Duration::from_secs(20)).await?,
        site2.wait_for_fit(Duration::from_secs(20)).await?,
    );
    let n = site1.trainable().numel();
    site1.upload(&t1, 5, &fedtune_tests::grpc::f32_bytes(&vec![0.01; n])).await?;
    site2.upload(&t2, 5, &fedtune_tests::grpc::f32_bytes(&vec![0.02; n])).await?;
    assert_eq!(site1.wait_finished(Duration::from_secs(20)).await?, ModelVersion(1));
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_certificate_sees_the_operator_view_and_a_client_certificate_does_not() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (coord, pki) = mutual_tls_coordinator(dir.path(), true).await?;
    let one = &pki.clients[0];
    let mut site1 = over_certificate(&coord, &pki, &one.cert, &one.key).await?;
    site1.rejoin("site-1", 0).await?;

    // The operator certificate alone, no token: every client, from the CLI's code path as well.
    let mut operator = over_certificate(&coord, &pki, &pki.operator.cert, &pki.operator.key).await?;
    let full = operator.status_as(None).await?;
    assert_eq!(full.clients.iter().map(|c| c.client_id.to_string()).collect::<Vec<_>>(), ["site-1"]);
    let full =
        fetch_status(&status_over_certificate(&coord.url, &pki, &pki.operator.cert, &pki.operator.key))
            .await?;
    assert_eq!(full.clients.len(), 1);

    // A client certificate of the same CA gets the anonymous view, from the CLI too; with its
    // session token as the bearer it is refused, as without mutual TLS.
    let anonymous = site1.status_as(None).await?;
    assert!(anonymous.clients.is_empty() && anonymous.recent_rounds.is_empty(), "{anonymous:?}");
    let anonymous = fetch_status(&status_over_certificate(&coord.url, &pki, &one.cert, &one.key)).await?;
    assert!(anonymous.clients.is_empty() && anonymous.recent_rounds.is_empty(), "{anonymous:?}");
    let session = site1.token().expect("joined");
    expect_status(site1.status_as(Some(&session)).await, Code::Unauthenticated, &["not the operator token"]);
    // The operator certificate does not make a wrong token right: still refused, not downgraded.
    expect_status(
        operator.status_as(Some("stale")).await,
        Code::Unauthenticated,
        &["not the operator token"],
    );
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_certificate_cannot_join_as_a_client() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Binding names to certificates is off, so nothing but the operator marker can refuse it.
    let (coord, pki) = mutual_tls_coordinator(dir.path(), false).await?;
    let mut operator = over_certificate(&coord, &pki, &pki.operator.cert, &pki.operator.key).await?;
    for name in ["site-1", "operator"] {
        expect_status(
            operator.try_join(name, 0).await,
            Code::PermissionDenied,
            &["operator certificate cannot join or enroll as a client"],
        );
    }
    // Nor does a challenge fetched over site-1's own connection help: `Join` itself refuses the
    // operator certificate, with site-1's allowlisted key and a valid answer.
    let one = &pki.clients[0];
    let mut site1 = over_certificate(&coord, &pki, &one.cert, &one.key).await?;
    let grant = site1
        .raw()
        .join_challenge(pb::JoinChallengeRequest { client_name: "site-1".into() })
        .await?
        .into_inner();
    let grant = ChallengeGrant::try_from(grant)?;
    let key = fedtune_tests::identities::key_for(&coord.url, "site-1")?;
    let mut join = pb::JoinRequest::from(JoinRequest {
        protocol_version: pb::PROTOCOL_VERSION,
        name: Some(id("site-1")),
        public_key: None,
        train_examples: 1,
        eval_examples: 0,
        agent_version: "fedtune-tests".into(),
    });
    JoinProof::answer(&key, &grant, &id("site-1")).attach(&mut join);
    expect_status(
        operator.raw().join(join).await,
        Code::PermissionDenied,
        &["operator certificate cannot join or enroll as a client"],
    );
    let state = fedtune_tests::identities::state_dir_of(&coord.url)?;
    let token = Allowlist::open(&state)?.issue_enrollment_token(&id("new-site"), Duration::from_secs(600))?;
    let key = KeyPair::generate_ephemeral()?;
    let enroll = pb::EnrollRequest {
        client_name: "new-site".into(),
        public_key: key.public_key().as_bytes().to_vec().into(),
        enrollment_token: token.expose_secret(),
    };
    expect_status(
        operator.raw().enroll(enroll).await,
        Code::PermissionDenied,
        &["operator certificate cannot join or enroll"],
    );
    // Nothing was admitted: no client is known, and the sites still join over their own
    // certificates.
    assert!(operator.status_as(None).await?.clients.is_empty());
    site1.rejoin("site-1", 0).await?;
    assert_eq!(operator.status_as(None).await?.clients.len(), 1);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_status_shows_nothing_per_client_a_wrong_token_is_unauthenticated_and_the_operator_sees_all(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 1, 8)?;
    let mut s = quick_settings(&dir.path().join("state"), &model, 1, 1, 1);
    s.evaluation.every = 0;
    let state = s.storage.state_dir.clone();
    let coord = InProcess::start(s).await?;
    let mut a = TestClient::join(&coord.url, "a", 0).await?;
    assert_eq!(a.contribute_and_finish(5, 1).await?, ModelVersion(1));

    // No credentials: progress and the privacy line, nothing per client or per round, on the wire.
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(coord.url.clone()).await?;
    let wire = raw.get_status(pb::GetStatusRequest { recent_rounds: 20 }).await?.into_inner();
    assert!(wire.clients.is_empty(), "{:?}", wire.clients);
    assert!(wire.recent_rounds.is_empty(), "{:?}", wire.recent_rounds);
    assert_eq!(wire.accepted_updates, 0);
    assert_eq!(wire.model_version, 1);
    let mut anon = TestClient::connect(&coord.url).await?;
    let view = anon.status_as(None).await?;
    assert_eq!(view.phase, PhaseName::Finished);
    assert!(view.clients.is_empty() && view.recent_rounds.is_empty());
    assert!(!view.privacy.guarantee.is_empty());
    let view = fetch_status(&status_args(&coord.url, None)).await?;
    assert!(view.clients.is_empty() && view.recent_rounds.is_empty());

    // A wrong token, and a client's own session token, are refused rather than downgraded.
    expect_status(
        anon.status_as(Some("not-the-operator-token")).await,
        Code::Unauthenticated,
        &["not the operator token"],
    );
    let session = a.token().expect("joined");
    expect_status(anon.status_as(Some(&session)).await, Code::Unauthenticated, &["not the operator token"]);
    let err = fetch_status(&StatusArgs {
        operator_token_file: Some(dir.path().join("missing.token")),
        ..status_args(&coord.url, None)
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("missing.token"), "{err}");

    // The operator token from the state directory unlocks everything.
    let full = fetch_status(&status_args(&coord.url, Some(state.clone()))).await?;
    let clients: Vec<_> = full.clients.iter().map(|c| (c.client_id.clone(), c.rounds_contributed)).collect();
    assert_eq!(clients, vec![(id("a"), 1)]);
    assert_eq!(full.recent_rounds.len(), 1);
    let token_file = state.join(fedtune_shared::crypto::OPERATOR_TOKEN_FILE);
    let by_file = fetch_status(&StatusArgs {
        operator_token_file: Some(token_file.clone()),
        ..status_args(&coord.url, None)
    })
    .await?;
    assert_eq!(by_file.clients.len(), 1);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&token_file)?.permissions().mode() & 0o777, 0o600);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_join_challenges_stores_nothing_refuses_unknown_names_and_an_honest_client_still_joins(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 1, 8)?;
    let mut s = quick_settings(&dir.path().join("state"), &model, 1, 1, 1);
    s.evaluation.every = 0;
    s.security.limits.max_pending_challenges = 16;
    let state = s.storage.state_dir.clone();
    // The gate is kept here so the test can count what it stores.
    let gate = Arc::new(ClientAuth::open(&state, &s.security)?);
    let seams = Seams { authenticator: gate.clone(), verifier: gate.clone(), tls: None };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    fedtune_tests::identities::register(&url, &state);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(run_with(s, listener, stop.clone(), seams));
    let coord = InProcess { url: url.clone(), stop, task };
    let a_key = fedtune_tests::identities::key_for(&url, "a")?;
    Allowlist::open(&state)?.add(&id("gone"), &KeyPair::generate_ephemeral()?.public_key())?;
    Allowlist::open(&state)?.revoke(&id("gone"))?;

    let mut raw = pb::coordinator_client::CoordinatorClient::connect(url.clone()).await?;
    // Far more challenges for one allowlisted name than the old table had room for.
    for _ in 0..500 {
        raw.join_challenge(pb::JoinChallengeRequest { client_name: "a".into() }).await?;
    }
    // Unknown and revoked names get no challenge, and the same answer.
    let mut answers = std::collections::BTreeSet::new();
    for k in 0..500 {
        let name = if k % 50 == 0 { "gone".to_string() } else { format!("stranger-{k}") };
        let refused = raw.join_challenge(pb::JoinChallengeRequest { client_name: name.clone() }).await;
        let status = expect_status(refused, Code::PermissionDenied, &["is not allowlisted (or was revoked)"]);
        answers.insert(status.message().replace(&name, "NAME"));
    }
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(gate.stored_challenges(), 0);

    let mut a = TestClient::connect(&url).await?;
    a.key = Some(a_key);
    a.rejoin("a", 0).await?;
    assert_eq!(gate.stored_challenges(), 1);
    assert_eq!(a.contribute_and_finish(5, 1).await?, ModelVersion(1));
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_enrollment_gets_the_same_answer_and_a_valid_token_still_works_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = write_fake_model(&dir.path().join("model"), 1, 8)?;
    let s = quick_settings(&dir.path().join("state"), &model, 1, 1, 1);
    let state = s.storage.state_dir.clone();
    let coord = InProcess::start(s).await?;
    let list = Allowlist::open(&state)?;
    let token = list.issue_enrollment_token(&id("new-site"), Duration::from_secs(600))?;
    let key = KeyPair::generate_ephemeral()?;
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(coord.url.clone()).await?;
    let enroll = |name: &str, token: String| pb::EnrollRequest {
        client_name: name.into(),
        public_key: key.public_key().as_bytes().to_vec().into(),
        enrollment_token: token,
    };
    let mut answers = Vec::new();
    // Wrong token, unknown name.
    answers.push(raw.enroll(enroll("new-site", EnrollmentToken::generate()?.expose_secret())).await);
    answers.push(raw.enroll(enroll("nobody", token.expose_secret())).await);
    raw.enroll(enroll("new-site", token.expose_secret())).await?;
    // Already used.
    answers.push(raw.enroll(enroll("new-site", token.expose_secret())).await);
    // Expired (a zero lifetime ends the moment it is issued).
    let short = list.issue_enrollment_token(&id("late-site"), Duration::ZERO)?;
    answers.push(raw.enroll(enroll("late-site", short.expose_secret())).await);
    let messages: std::collections::BTreeSet<_> = answers
        .into_iter()
        .map(|a| expect_status(a, Code::PermissionDenied, &["enrollment refused"]).message().to_string())
        .collect();
    assert_eq!(messages.len(), 1, "{messages:?}");
    coord.shutdown().await?;
    Ok(())
}
