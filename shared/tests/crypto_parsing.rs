//! Parsers of untrusted text and bytes (tokens, keys, signatures, key files) must answer every
//! input with `Ok` or `Err`, never a panic, and must never accept something that was not
//! produced by the matching encoder.

use std::time::Duration;

use fedtune_shared::crypto::files::{write_file_atomically, Overwrite, PRIVATE_FILE_MODE};
use fedtune_shared::crypto::{
    load_keypair, EnrollmentDigest, EnrollmentRecord, EnrollmentToken, KeyPair, PublicKey, SessionAuthority,
    SessionSecret, Signature,
};
use proptest::prelude::*;

const NOW: u64 = 1_750_000_000;

fn authority() -> SessionAuthority {
    SessionAuthority::new(&SessionSecret::from_bytes([9; 32]), "fed-a")
}

/// Strings drawn mostly from the token alphabet so that many inputs get past the first checks.
fn tokenish() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[A-Za-z0-9_.=+/-]{0,200}", "[A-Za-z0-9_-]{0,120}\\.[A-Za-z0-9_-]{0,60}",]
}

proptest! {
    #[test]
    fn public_key_parsing_never_panics_and_accepts_only_canonical_text(text in tokenish()) {
        if let Ok(key) = text.parse::<PublicKey>() {
            prop_assert_eq!(key.to_string(), text.trim());
        }
    }

    #[test]
    fn public_keys_of_any_byte_length_but_32_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let text = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &bytes);
        let parsed = text.parse::<PublicKey>();
        prop_assert_eq!(parsed.is_ok(), bytes.len() == 32);
        prop_assert_eq!(PublicKey::from_slice(&bytes).is_ok(), bytes.len() == 32);
    }

    #[test]
    fn signature_and_digest_parsing_never_panic(text in tokenish()) {
        let _ = text.parse::<Signature>();
        let _ = text.parse::<EnrollmentDigest>();
    }

    #[test]
    fn arbitrary_text_is_never_a_valid_session_token(text in tokenish()) {
        prop_assert!(authority().verify(&text, NOW).is_err());
    }

    #[test]
    fn changing_one_character_of_a_real_session_token_always_invalidates_it(
        position in any::<prop::sample::Index>(),
        replacement in prop::char::any(),
    ) {
        let auth = authority();
        let token = auth.issue("site-1", None, Duration::from_secs(60), NOW).unwrap();
        let text = token.expose_secret();
        let i = position.index(text.len());
        prop_assume!(text.as_bytes()[i] as char != replacement);
        let mut altered = String::with_capacity(text.len() + 4);
        altered.push_str(&text[..i]);
        altered.push(replacement);
        altered.push_str(&text[i + 1..]);
        prop_assert!(auth.verify(&altered, NOW).is_err());
    }

    #[test]
    fn arbitrary_text_never_passes_as_an_enrollment_token(text in tokenish()) {
        let _ = text.parse::<EnrollmentToken>();
        let record = EnrollmentRecord::new(&EnrollmentToken::generate().unwrap(), Duration::from_secs(60), NOW);
        prop_assert!(record.verify(&text, NOW).is_err());
    }
}

proptest! {
    // Each case writes a file, so fewer cases.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn arbitrary_key_file_contents_are_rejected_without_panicking(
        contents in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            "[A-Za-z0-9+/=\n]{0,200}".prop_map(|body| format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n").into_bytes()),
        ]
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_file_atomically(&path, &contents, PRIVATE_FILE_MODE, Overwrite::Refuse).unwrap();
        prop_assert!(load_keypair(&path).is_err());
    }
}

#[test]
fn the_generators_do_reach_the_accepting_paths() {
    // Guards the properties above against vacuity: real values do parse.
    let key = KeyPair::generate_ephemeral().unwrap().public_key();
    assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
    let auth = authority();
    let token = auth.issue("site-1", None, Duration::from_secs(60), NOW).unwrap();
    assert!(auth.verify(token.expose_secret(), NOW).is_ok());
}
