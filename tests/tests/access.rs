//! Issue #10, who may see and ask what, over real gRPC: the status view an anonymous caller gets
//! and the operator's, join challenges under a flood, and enrollment refusals.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use fedtune_coordinator::auth::{Allowlist, ClientAuth};
use fedtune_coordinator::operator::{fetch_status, StatusArgs};
use fedtune_coordinator::{run_with, Seams};
use fedtune_shared::crypto::{EnrollmentToken, KeyPair};
use fedtune_shared::ids::{ClientId, ModelVersion};
use fedtune_shared::pb;
use fedtune_shared::round::PhaseName;
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{expect_status, InProcess, TestClient};
use tonic::Code;

fn id(s: &str) -> ClientId {
    ClientId::parse(s).unwrap()
}

fn status_args(url: &str, state_dir: Option<std::path::PathBuf>) -> StatusArgs {
    StatusArgs::plaintext(url, 10, state_dir)
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
