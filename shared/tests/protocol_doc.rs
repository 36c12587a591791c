//! docs/protocol.md gives every signed statement and digest byte by byte, each with a worked
//! example in a ```` ```wire-example NAME ```` block: `key = value` lines (a value continues on
//! indented lines; `# comments`, whitespace and line breaks inside hex are not part of it). This
//! test reads the document as compiled in and checks every block against the code, so the
//! document cannot drift from it: a block that is missing, duplicated, unknown, holds a key no
//! check reads, or gives a value the code does not reproduce fails the test.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use fedtune_shared::auth::{
    masked_update_statement, sign_masked_upload, sign_upload, update_statement, SIGNATURE_SCHEME,
};
use fedtune_shared::crypto::{
    sign_challenge, sign_update, verify_challenge, verify_update, CertificateDigest, Challenge,
    EnrollmentDigest, EnrollmentToken, KeyPair, PublicKey, SessionAuthority, SessionClaims, SessionSecret,
    Signature, UpdateStatement,
};
use fedtune_shared::ids::{ClientId, ModelVersion, RoundId, Sha256};
use fedtune_shared::params::{Manifest, ParameterVector, TensorSpec};
use fedtune_shared::round::{MaskedUpdateHeader, UpdateHeader};
use fedtune_shared::secagg::keys::bundle_associated_data;
use fedtune_shared::secagg::{RoundContext, RoundSetup, SignedAgreementKey, Slot};
use ring::{digest, hmac};

const DOC: &str = include_str!("../../docs/protocol.md");
const DOC_PATH: &str = "docs/protocol.md";

/// Every worked example the document must hold, once each.
const EXPECTED: [&str; 15] = [
    "ed25519-key",
    "manifest-digest",
    "payload-digest",
    "join-challenge",
    "update-statement",
    "session-token",
    "session-token-bound",
    "enrollment-digest",
    "secagg-round-context",
    "secagg-agreement-key",
    "secagg-bundle-aad",
    "masked-update-statement",
    "int8-block",
    "int8-update-statement",
    "int8-delta-download",
];

/// One `wire-example` block.
#[derive(Debug)]
struct Example {
    name: String,
    /// 1-based line of the opening fence.
    line: usize,
    fields: Vec<(String, String)>,
    read: RefCell<BTreeSet<String>>,
}

/// Cuts a `# comment` that is not inside a `"…"` string.
fn strip_comment(line: &str) -> &str {
    let mut in_string = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_string = !in_string,
            '#' if !in_string => return &line[..i],
            _ => {}
        }
    }
    line
}

fn parse_examples(doc: &str) -> Vec<Example> {
    let mut examples = Vec::new();
    let mut current: Option<Example> = None;
    for (i, line) in doc.lines().enumerate() {
        let n = i + 1;
        let trimmed = line.trim();
        if let Some(mut ex) = current.take() {
            if trimmed == "```" {
                examples.push(ex);
                continue;
            }
            let text = strip_comment(line);
            if text.trim().is_empty() {
                current = Some(ex);
                continue;
            }
            if text.starts_with([' ', '\t']) {
                let (_, value) = ex
                    .fields
                    .last_mut()
                    .unwrap_or_else(|| panic!("{DOC_PATH}:{n}: a continuation line before any `key =`"));
                if !value.is_empty() {
                    value.push(' ');
                }
                value.push_str(text.trim());
            } else {
                let (key, value) = text
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{DOC_PATH}:{n}: expected `key = value`, found {line:?}"));
                let key = key.trim().to_owned();
                assert!(
                    !ex.fields.iter().any(|(k, _)| *k == key),
                    "{DOC_PATH}:{n}: `{key}` given twice in example `{}`",
                    ex.name
                );
                ex.fields.push((key, value.trim().to_owned()));
            }
            current = Some(ex);
        } else if let Some(name) = trimmed.strip_prefix("```wire-example") {
            let name = name.trim();
            assert!(!name.is_empty(), "{DOC_PATH}:{n}: a wire-example block needs a name");
            current = Some(Example {
                name: name.to_owned(),
                line: n,
                fields: Vec::new(),
                read: RefCell::new(BTreeSet::new()),
            });
        }
    }
    if let Some(ex) = current {
        panic!("{DOC_PATH}:{}: example `{}` is never closed with ```", ex.line, ex.name);
    }
    examples
}

/// The document's example `name`; fails when it is absent or given twice.
fn example(name: &str) -> Example {
    let mut found: Vec<Example> = parse_examples(DOC).into_iter().filter(|e| e.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "{DOC_PATH} must hold exactly one ```wire-example {name}``` block, it holds {}",
        found.len()
    );
    found.remove(0)
}

impl Example {
    fn raw(&self, key: &str) -> &str {
        self.read.borrow_mut().insert(key.to_owned());
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_else(|| {
            panic!("{DOC_PATH}:{}: example `{}` has no `{key} =` line", self.line, self.name)
        })
    }

    fn fail(&self, key: &str, why: impl std::fmt::Display) -> ! {
        panic!("{DOC_PATH}:{}: example `{}`, `{key}`: {why}", self.line, self.name)
    }

    fn hex(&self, key: &str) -> Vec<u8> {
        let text: String = self.raw(key).chars().filter(|c| !c.is_whitespace()).collect();
        hex::decode(&text).unwrap_or_else(|e| self.fail(key, format!("not hex ({e})")))
    }

    fn hex32(&self, key: &str) -> [u8; 32] {
        let bytes = self.hex(key);
        <[u8; 32]>::try_from(bytes.as_slice())
            .unwrap_or_else(|_| self.fail(key, format!("{} bytes, expected 32", bytes.len())))
    }

    fn string(&self, key: &str) -> String {
        let raw = self.raw(key);
        match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            Some(s) if !s.contains('"') => s.to_owned(),
            _ => self.fail(key, format!("expected a \"string\", found {raw}")),
        }
    }

    fn u64(&self, key: &str) -> u64 {
        let raw = self.raw(key);
        raw.parse().unwrap_or_else(|e| self.fail(key, format!("{raw} is not a u64 ({e})")))
    }

    fn list<T: std::str::FromStr>(&self, key: &str) -> Vec<T> {
        let raw = self.raw(key);
        let inner = raw
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or_else(|| self.fail(key, format!("expected [a, b, …], found {raw}")));
        inner
            .split(',')
            .map(|item| item.trim().parse().unwrap_or_else(|_| self.fail(key, format!("bad item {item:?}"))))
            .collect()
    }

    /// Compares bytes the code produced with the document's, showing both in hex.
    fn check_bytes(&self, key: &str, from_code: &[u8], documented: &[u8]) {
        assert!(
            from_code == documented,
            "{DOC_PATH}:{}: example `{}`, `{key}`:\n  the code gives {}\n  the document  {}",
            self.line,
            self.name,
            hex::encode(from_code),
            hex::encode(documented)
        );
    }

    /// Every key of the block was checked: a documented value no check reads could drift.
    fn done(&self) {
        let read = self.read.borrow();
        let unread: Vec<&str> =
            self.fields.iter().map(|(k, _)| k.as_str()).filter(|k| !read.contains(*k)).collect();
        assert!(
            unread.is_empty(),
            "{DOC_PATH}:{}: example `{}` has keys no check reads: {unread:?}",
            self.line,
            self.name
        );
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The key of the `ed25519-key` example, loaded the way clients load theirs: a PKCS#8 v2
/// document (RFC 5958; seed and public key, the layout `ring` writes).
fn documented_key() -> (KeyPair, [u8; 32]) {
    let ex = example("ed25519-key");
    let seed = ex.hex32("seed");
    let public = ex.hex32("public_key");
    ex.raw("public_key_text");
    let mut der = hex::decode("3053020101300506032b657004220420").unwrap();
    der.extend_from_slice(&seed);
    der.extend_from_slice(&hex::decode("a123032100").unwrap());
    der.extend_from_slice(&public);
    let key = KeyPair::from_pkcs8_der(&der)
        .unwrap_or_else(|e| ex.fail("public_key", format!("is not the public key of the seed ({e})")));
    (key, public)
}

#[test]
fn the_document_holds_every_worked_example_once_and_no_other() {
    let examples = parse_examples(DOC);
    let names: Vec<&str> = examples.iter().map(|e| e.name.as_str()).collect();
    for want in EXPECTED {
        let count = names.iter().filter(|n| **n == want).count();
        assert_eq!(count, 1, "{DOC_PATH} must hold one ```wire-example {want}``` block, found {count}");
    }
    let unknown: Vec<&&str> = names.iter().filter(|n| !EXPECTED.contains(n)).collect();
    assert!(unknown.is_empty(), "{DOC_PATH} has wire-example blocks this test does not check: {unknown:?}");
    assert_eq!(examples.len(), EXPECTED.len());
}

#[test]
fn the_ed25519_key_example_is_one_key_pair() {
    let ex = example("ed25519-key");
    let seed = ex.hex32("seed");
    let public = ex.hex32("public_key");
    let from_seed = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
    ex.check_bytes("public_key", ring::signature::KeyPair::public_key(&from_seed).as_ref(), &public);
    let (key, _) = documented_key();
    ex.check_bytes("public_key", key.public_key().as_bytes(), &public);
    let text = ex.string("public_key_text");
    assert_eq!(key.public_key().to_string(), text, "public_key_text");
    assert_eq!(text.parse::<PublicKey>().unwrap(), PublicKey::from_bytes(public));
    ex.done();
}

fn documented_manifest(ex: &Example) -> Manifest {
    let mut tensors = Vec::new();
    while ex.fields.iter().any(|(k, _)| *k == format!("tensor.{}.name", tensors.len())) {
        let i = tensors.len();
        tensors.push(TensorSpec {
            name: ex.string(&format!("tensor.{i}.name")),
            shape: ex.list(&format!("tensor.{i}.shape")),
        });
    }
    assert!(!tensors.is_empty(), "example `{}` lists no tensor.0.name", ex.name);
    Manifest::new(tensors).unwrap()
}

#[test]
fn the_manifest_digest_example_matches_manifest_digest() {
    let ex = example("manifest-digest");
    let manifest = documented_manifest(&ex);
    let bytes = ex.hex("bytes");
    let documented = ex.hex32("sha256");
    ex.check_bytes("sha256", &sha256(&bytes), &documented);
    // The code's digest equals SHA-256 of the documented bytes: the code hashes exactly them.
    ex.check_bytes("sha256", &manifest.digest(), &documented);
    ex.done();
}

#[test]
fn the_payload_digest_example_matches_parameter_vector() {
    let ex = example("payload-digest");
    let manifest = documented_manifest(&example("manifest-digest"));
    let values: Vec<f32> = ex.list("values");
    let vector = ParameterVector::new(manifest, values).unwrap();
    ex.check_bytes("payload", &vector.to_le_bytes(), &ex.hex("payload"));
    let documented = ex.hex32("sha256");
    ex.check_bytes("sha256", &vector.payload_digest(), &documented);
    ex.check_bytes("sha256", &Sha256::of(&ex.hex("payload")).0, &documented);
    ex.done();
}

#[test]
fn the_join_challenge_example_matches_challenge_signing() {
    let ex = example("join-challenge");
    let (key, public) = documented_key();
    let challenge = Challenge {
        nonce: ex.hex32("nonce"),
        federation_id: ex.string("federation_id"),
        client_name: ex.string("client_name"),
    };
    ex.check_bytes("message", &challenge.canonical_bytes(), &ex.hex("message"));
    let signature = ex.hex("signature");
    let signed = sign_challenge(&key, &challenge);
    ex.check_bytes("signature", signed.as_bytes(), &signature);
    let documented = Signature::from_slice(&signature).unwrap();
    verify_challenge(&PublicKey::from_bytes(public), &challenge, &documented).unwrap();
    ex.done();
}

#[test]
fn the_update_statement_example_matches_update_signing() {
    let ex = example("update-statement");
    let (key, public) = documented_key();
    let federation_id = ex.string("federation_id");
    let client = ClientId::parse(&ex.string("client_id")).unwrap();
    let round = ex.u64("round");
    let attempt =
        u32::try_from(ex.u64("attempt")).unwrap_or_else(|_| ex.fail("attempt", "is a u32 on the wire"));
    let manifest_sha256 = ex.hex32("manifest_sha256");
    let payload_sha256 = ex.hex32("payload_sha256");
    let num_examples = ex.u64("num_examples");
    let message = ex.hex("message");
    let signature = ex.hex("signature");

    // The digests are those of the manifest-digest and payload-digest examples, as it says.
    ex.check_bytes("manifest_sha256", &example("manifest-digest").hex32("sha256"), &manifest_sha256);
    ex.check_bytes("payload_sha256", &example("payload-digest").hex32("sha256"), &payload_sha256);

    let statement = UpdateStatement {
        federation_id: federation_id.clone(),
        round,
        attempt,
        client_id: client.as_str().to_owned(),
        manifest_digest: manifest_sha256,
        payload_sha256,
        num_examples,
        secagg_context: None,
        int8_block: false,
    };
    ex.check_bytes("message", &statement.canonical_bytes(), &message);
    ex.check_bytes("signature", sign_update(&key, &statement).as_bytes(), &signature);
    let documented = Signature::from_slice(&signature).unwrap();
    verify_update(&PublicKey::from_bytes(public), &statement, &documented).unwrap();

    // The same bytes come out of the path the agent uses: the upload's header and trailer.
    let header = UpdateHeader {
        id: RoundId::new(round, attempt),
        base_version: ModelVersion(round - 1),
        num_examples,
        metrics: Default::default(),
        manifest_digest: Sha256(manifest_sha256),
        total_bytes: 32,
        encoding: Default::default(),
    };
    let payload = Sha256(payload_sha256);
    assert_eq!(update_statement(&federation_id, &client, &header, &payload), statement);
    let trailer = sign_upload(&key, &federation_id, &client, &header, &payload);
    assert_eq!(trailer.scheme, SIGNATURE_SCHEME);
    assert_eq!(SIGNATURE_SCHEME, "ed25519", "the document names the scheme `ed25519`");
    ex.check_bytes("signature", &trailer.bytes, &signature);
    ex.done();
}

/// What both session-token examples document, read and checked alike: the tag is HMAC-SHA256 of
/// the documented MAC input, the token is `base64url(claims).base64url(tag)`, and the coordinator
/// accepts it and reads back the documented inputs.
struct TokenExample {
    secret: [u8; 32],
    client_id: String,
    issued_at: u64,
    expires_at: u64,
    token: String,
    claims: Vec<u8>,
    mac_input: Vec<u8>,
    key: hmac::Key,
    authority: SessionAuthority,
    read: SessionClaims,
}

fn token_example(ex: &Example) -> TokenExample {
    let secret = ex.hex32("secret");
    let client_id = ex.string("client_id");
    let federation_id = ex.string("federation_id");
    let issued_at = ex.u64("issued_at");
    let expires_at = ex.u64("expires_at");
    let nonce = ex.hex("nonce");
    let claims = ex.hex("claims");
    let mac_input = ex.hex("mac_input");
    let tag = ex.hex("hmac_sha256");
    let token = ex.string("token");

    let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
    ex.check_bytes("hmac_sha256", hmac::sign(&key, &mac_input).as_ref(), &tag);
    assert_eq!(format!("{}.{}", b64(&claims), b64(&tag)), token, "token is base64url(claims).base64url(tag)");

    // The coordinator accepts it (so its MAC input for these claims is the documented one) and
    // reads back the documented inputs.
    let authority = SessionAuthority::new(&SessionSecret::from_bytes(secret), federation_id.clone());
    let read = authority
        .verify(&token, issued_at)
        .unwrap_or_else(|e| ex.fail("token", format!("the session authority refuses it: {e}")));
    assert_eq!(read.client_id, client_id);
    assert_eq!(read.federation_id, federation_id);
    assert_eq!((read.issued_at, read.expires_at), (issued_at, expires_at));
    ex.check_bytes("nonce", &read.nonce, &nonce);
    TokenExample { secret, client_id, issued_at, expires_at, token, claims, mac_input, key, authority, read }
}

impl TokenExample {
    /// A token the coordinator issued for the same inputs has the documented claims but for the
    /// random nonce (16 bytes at `nonce_at`), and the documented MAC construction.
    fn check_issued_alike(&self, ex: &Example, issued: &str, nonce_at: usize) {
        let (claims_text, tag_text) = issued.split_once('.').unwrap();
        let issued_claims = URL_SAFE_NO_PAD.decode(claims_text).unwrap();
        assert_eq!(issued_claims.len(), self.claims.len(), "claims length");
        ex.check_bytes("claims", &issued_claims[..nonce_at], &self.claims[..nonce_at]);
        ex.check_bytes("claims", &issued_claims[nonce_at + 16..], &self.claims[nonce_at + 16..]);
        let mut issued_mac_input = self.mac_input[..self.mac_input.len() - self.claims.len()].to_vec();
        issued_mac_input.extend_from_slice(&issued_claims);
        ex.check_bytes(
            "hmac_sha256",
            &URL_SAFE_NO_PAD.decode(tag_text).unwrap(),
            hmac::sign(&self.key, &issued_mac_input).as_ref(),
        );
    }

    fn lifetime(&self) -> Duration {
        Duration::from_secs(self.expires_at - self.issued_at)
    }
}

#[test]
fn the_session_token_example_is_accepted_and_issued_by_the_session_authority() {
    let ex = example("session-token");
    let t = token_example(&ex);
    assert_eq!(t.read.certificate, None, "version 1 claims are bound to no certificate");
    assert!(t.authority.verify(&t.token, t.expires_at).is_err(), "refused from expires_at on");

    let issued = t.authority.issue(&t.client_id, None, t.lifetime(), t.issued_at).unwrap();
    t.check_issued_alike(&ex, issued.expose_secret(), t.claims.len() - 16);

    // session.key holds the secret as base64url text.
    let secret_text = ex.string("secret_text");
    assert_eq!(b64(&t.secret), secret_text, "secret_text");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.key");
    std::fs::write(&path, format!("{secret_text}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    ex.check_bytes("secret_text", &SessionSecret::load_or_generate(&path).unwrap().to_bytes(), &t.secret);
    ex.done();
}

#[test]
fn the_bound_session_token_example_is_accepted_over_its_certificate_and_issued_alike() {
    let ex = example("session-token-bound");
    let t = token_example(&ex);
    let certificate = CertificateDigest(ex.hex32("certificate_sha256"));
    assert_eq!(t.read.certificate, Some(certificate), "certificate_sha256");
    t.read.check_certificate(Some(certificate)).unwrap();
    assert!(t.read.check_certificate(None).is_err(), "refused over no certificate");
    assert!(t.read.check_certificate(Some(CertificateDigest([0; 32]))).is_err(), "refused over another");

    // Over the same certificate the nonce sits 16 bytes before the 32-byte digest.
    let issued = t.authority.issue(&t.client_id, Some(certificate), t.lifetime(), t.issued_at).unwrap();
    t.check_issued_alike(&ex, issued.expose_secret(), t.claims.len() - 32 - 16);
    ex.done();
}

#[test]
fn the_enrollment_digest_example_matches_enrollment_token_hash() {
    let ex = example("enrollment-digest");
    let token = ex.hex32("token");
    let text = ex.string("token_text");
    assert_eq!(b64(&token), text, "token_text is base64url of token");
    let message = ex.hex("message");
    let documented = ex.hex32("sha256");
    ex.check_bytes("sha256", &sha256(&message), &documented);
    let parsed: EnrollmentToken = text.parse().unwrap();
    ex.check_bytes("sha256", parsed.hash().as_bytes(), &documented);
    assert_eq!(parsed.hash(), EnrollmentDigest::from_bytes(documented));
    assert_eq!(parsed.hash().to_string(), hex::encode(documented), "its text form is lowercase hex");
    ex.done();
}

#[test]
fn the_example_parser_reads_continuations_comments_and_strings() {
    let doc = "text\n```wire-example t\n# c\na = \"x # y\"  # z\nb =\n  01 02  # one\n  03\n```\n";
    let ex = &parse_examples(doc)[0];
    assert_eq!(ex.string("a"), "x # y");
    assert_eq!(ex.hex("b"), vec![1, 2, 3]);
    ex.done();
}

/// The round context of the `secagg-round-context` example: two clients, the first with the key
/// of the ed25519-key example.
fn documented_round_context() -> RoundContext {
    let ex = example("secagg-round-context");
    let (_, public) = documented_key();
    let attempt =
        u32::try_from(ex.u64("attempt")).unwrap_or_else(|_| ex.fail("attempt", "is a u32 on the wire"));
    let member = |key: &str| ClientId::parse(&ex.string(key)).unwrap_or_else(|e| ex.fail(key, e));
    RoundContext::new(RoundSetup {
        federation_id: ex.string("federation_id"),
        round: ex.u64("round"),
        attempt,
        members: vec![
            (member("member_1"), PublicKey::from_bytes(ex.hex32("member_1_key"))),
            (member("member_0"), PublicKey::from_bytes(public)),
        ],
        threshold: ex.u64("threshold") as usize,
        degree: ex.u64("degree") as usize,
        graph_seed: ex.hex32("graph_seed"),
        vector_len: ex.u64("vector_len") as usize,
    })
    .unwrap_or_else(|e| ex.fail("threshold", e))
}

#[test]
fn the_secagg_round_context_example_matches_the_round_context_digest() {
    let ctx = documented_round_context();
    let ex = example("secagg-round-context");
    ex.check_bytes("message", &ctx.canonical_bytes(), &ex.hex("message"));
    ex.check_bytes("sha256", ctx.digest(), &ex.hex32("sha256"));
    ex.check_bytes("sha256", &sha256(&ex.hex("message")), &ex.hex32("sha256"));
    // Slots follow client-id order whatever order the set-up lists them in.
    assert_eq!(ctx.client_id(Slot(0)).unwrap().as_str(), ex.string("member_0"));
    // The inputs were read and used by documented_round_context(), from its own parse of the
    // block: mark them read in this one too.
    for key in [
        "federation_id",
        "round",
        "attempt",
        "member_0",
        "member_1",
        "member_1_key",
        "threshold",
        "degree",
        "graph_seed",
        "vector_len",
    ] {
        ex.raw(key);
    }
    ex.done();
}

#[test]
fn the_secagg_agreement_key_example_matches_agreement_key_signing() {
    let ctx = documented_round_context();
    let ex = example("secagg-agreement-key");
    let (_, public) = documented_key();
    let slot =
        |key: &str| Slot(u32::try_from(ex.u64(key)).unwrap_or_else(|_| ex.fail(key, "is a u32 on the wire")));
    ex.check_bytes("round_context", ctx.digest(), &ex.hex32("round_context"));
    let key = SignedAgreementKey {
        owner: slot("owner"),
        peer: slot("peer"),
        public_key: ex.hex32("x25519_public_key"),
        signature: Signature::from_slice(&ex.hex("signature")).unwrap_or_else(|e| ex.fail("signature", e)),
    };
    let message = ex.hex("message");
    ex.check_bytes("message", &key.signed_bytes(&ctx), &message);
    let seed = example("ed25519-key").hex32("seed");
    let signer = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
    ex.check_bytes("signature", signer.sign(&message).as_ref(), key.signature.as_bytes());
    assert_eq!(
        ctx.identity(key.owner),
        Some(&PublicKey::from_bytes(public)),
        "the owner signs with its identity"
    );
    key.verify(&ctx).unwrap_or_else(|e| ex.fail("signature", e));
    ex.done();
}

#[test]
fn the_secagg_bundle_aad_example_matches_the_sealing_associated_data() {
    let ctx = documented_round_context();
    let ex = example("secagg-bundle-aad");
    let slot =
        |key: &str| Slot(u32::try_from(ex.u64(key)).unwrap_or_else(|_| ex.fail(key, "is a u32 on the wire")));
    ex.check_bytes("round_context", ctx.digest(), &ex.hex32("round_context"));
    let aad = bundle_associated_data(&ctx, slot("sender"), slot("recipient"));
    ex.check_bytes("associated_data", &aad, &ex.hex("associated_data"));
    ex.done();
}

#[test]
fn the_masked_update_statement_example_matches_masked_upload_signing() {
    let ex = example("masked-update-statement");
    let plain = example("update-statement");
    let (key, public) = documented_key();
    let federation_id = plain.string("federation_id");
    let client = ClientId::parse(&plain.string("client_id")).unwrap();
    let round = plain.u64("round");
    let attempt = u32::try_from(plain.u64("attempt")).unwrap();
    let header = MaskedUpdateHeader {
        header: UpdateHeader {
            id: RoundId::new(round, attempt),
            base_version: ModelVersion(round - 1),
            num_examples: plain.u64("num_examples"),
            metrics: Default::default(),
            manifest_digest: Sha256(plain.hex32("manifest_sha256")),
            total_bytes: 32,
            encoding: Default::default(),
        },
        secagg_context: ex.hex32("secagg_context_sha256"),
    };
    ex.check_bytes("secagg_context_sha256", documented_round_context().digest(), &header.secagg_context);
    let payload = Sha256(plain.hex32("payload_sha256"));
    let statement = masked_update_statement(&federation_id, &client, &header, &payload);
    ex.check_bytes("message", &statement.canonical_bytes(), &ex.hex("message"));
    let signature = ex.hex("signature");
    ex.check_bytes("signature", sign_update(&key, &statement).as_bytes(), &signature);
    ex.check_bytes(
        "signature",
        &sign_masked_upload(&key, &federation_id, &client, &header, &payload).bytes,
        &signature,
    );
    verify_update(&PublicKey::from_bytes(public), &statement, &Signature::from_slice(&signature).unwrap())
        .unwrap();
    ex.done();
}

#[test]
fn the_int8_block_example_decodes_as_the_compression_module_decodes() {
    use fedtune_shared::compression::{decode, BLOCK_BYTES};
    let ex = example("int8-block");
    let values = ex.u64("values") as usize;
    let mut block = ex.hex("block");
    block.resize(block.len() + ex.u64("padding") as usize, 0);
    assert_eq!(block.len(), BLOCK_BYTES, "{DOC_PATH}: example `int8-block` is one whole block");
    let decoded = decode(&block, values, fedtune_shared::limits::MAX_ABS_UPDATE_VALUE).unwrap();
    assert_eq!(decoded, ex.list::<f32>("decoded"));
    ex.done();
}

#[test]
fn the_int8_delta_download_example_applies_as_clients_and_the_coordinator_apply_it() {
    use fedtune_shared::compression::{apply_delta, BLOCK_BYTES};
    let ex = example("int8-delta-download");
    let mut step = ex.hex("step");
    step.resize(step.len() + ex.u64("padding") as usize, 0);
    assert_eq!(step.len(), BLOCK_BYTES, "{DOC_PATH}: example `int8-delta-download` is one whole block");
    let weights = apply_delta(&ex.list::<f32>("base"), &step).unwrap();
    assert_eq!(weights, ex.list::<f32>("weights"));
    ex.done();
}

#[test]
fn the_int8_update_statement_example_matches_int8_upload_signing() {
    use fedtune_shared::compression::UpdateEncoding;
    let ex = example("int8-update-statement");
    let plain = example("update-statement");
    let (key, public) = documented_key();
    let federation_id = plain.string("federation_id");
    let client = ClientId::parse(&plain.string("client_id")).unwrap();
    let round = plain.u64("round");
    let header = UpdateHeader {
        id: RoundId::new(round, u32::try_from(plain.u64("attempt")).unwrap()),
        base_version: ModelVersion(round - 1),
        num_examples: plain.u64("num_examples"),
        metrics: Default::default(),
        manifest_digest: Sha256(plain.hex32("manifest_sha256")),
        total_bytes: 260,
        encoding: UpdateEncoding::Int8,
    };
    let payload = Sha256(plain.hex32("payload_sha256"));
    let statement = update_statement(&federation_id, &client, &header, &payload);
    ex.check_bytes("message", &statement.canonical_bytes(), &ex.hex("message"));
    let signature = ex.hex("signature");
    ex.check_bytes(
        "signature",
        &sign_upload(&key, &federation_id, &client, &header, &payload).bytes,
        &signature,
    );
    verify_update(&PublicKey::from_bytes(public), &statement, &Signature::from_slice(&signature).unwrap())
        .unwrap();
    // Not the f32 upload's signature.
    let f32_header = UpdateHeader { encoding: UpdateEncoding::F32, ..header };
    let f32_statement = update_statement(&federation_id, &client, &f32_header, &payload);
    assert_ne!(f32_statement.canonical_bytes(), statement.canonical_bytes());
    ex.done();
}
