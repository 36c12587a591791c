//! The client's identity: its Ed25519 key file (`keygen`), and what the key signs.
//!
//! The key proves who the client is twice: when joining (it signs the coordinator's challenge)
//! and on every upload (it signs the statement built by `fedtune_shared::auth::update_statement`:
//! federation, round, client id, manifest digest, payload SHA-256 and example count). Signing
//! happens in the transport, on the upload stream's trailer: that is where the final payload
//! digest, the header and the session's federation and client id are all known, so no agent
//! or pipeline code handles key material.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedtune_shared::auth::{sign_masked_upload, sign_upload};
use fedtune_shared::crypto::{generate_keypair_file, load_keypair, CryptoError, KeyPair};
use fedtune_shared::ids::ClientId;
use fedtune_shared::round::{MaskedUpdateHeader, UpdateHeader, UploadItem};
use futures::stream::{BoxStream, StreamExt};

/// `fedtune-client keygen`.
#[derive(Debug, Clone, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the private key (PEM, PKCS#8, mode 0600). Refuses to overwrite.
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes a new key pair to `args.out` and prints the public key (base64url) for
/// `fedtune-coordinator clients add --public-key`.
pub fn keygen(args: &KeygenArgs, out: &mut impl Write) -> Result<(), CryptoError> {
    let pair = generate_keypair_file(&args.out)?;
    writeln!(out, "{}", pair.public_key())
        .map_err(|e| CryptoError::Io { path: "stdout".into(), source: e })?;
    Ok(())
}

/// Loads the key at `path` (refusing a file group or others can read).
pub fn load(path: &Path) -> Result<Arc<KeyPair>, CryptoError> {
    load_keypair(path).map(Arc::new)
}

/// Signs an upload stream: passes items through, remembering the header, and fills the trailer's
/// signature over the statement for `federation_id` and `client`. With `secagg_context` the
/// upload is a secure round's masked one, signed under the masked label over that round too, so
/// the signature cannot be replayed as a plain upload or into another round.
pub fn sign_upload_stream(
    items: BoxStream<'static, UploadItem>,
    key: Arc<KeyPair>,
    federation_id: String,
    client: ClientId,
    secagg_context: Option<[u8; 32]>,
) -> BoxStream<'static, UploadItem> {
    items
        .scan(None::<UpdateHeader>, move |header, item| {
            let item = match item {
                UploadItem::Header(h) => {
                    *header = Some(h.clone());
                    UploadItem::Header(h)
                }
                UploadItem::Trailer(mut t) => {
                    // A trailer without a header is a protocol error the coordinator reports;
                    // there is nothing meaningful to sign then.
                    if let Some(h) = header.as_ref() {
                        t.signature = Some(match secagg_context {
                            None => sign_upload(&key, &federation_id, &client, h, &t.payload_digest),
                            Some(context) => {
                                let masked =
                                    MaskedUpdateHeader { header: h.clone(), secagg_context: context };
                                sign_masked_upload(&key, &federation_id, &client, &masked, &t.payload_digest)
                            }
                        });
                    }
                    UploadItem::Trailer(t)
                }
                other => other,
            };
            futures::future::ready(Some(item))
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt as _;

    use fedtune_shared::auth::{verify_masked_upload, verify_upload};
    use fedtune_shared::ids::{ModelVersion, RoundId, Sha256};
    use fedtune_shared::round::{Chunk, UpdateTrailer};

    use super::*;

    #[test]
    fn keygen_writes_a_private_key_file_and_prints_its_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.key");
        let mut out = Vec::new();
        keygen(&KeygenArgs { out: path.clone() }, &mut out).unwrap();
        let printed = String::from_utf8(out).unwrap();
        let key = load(&path).unwrap();
        assert_eq!(printed.trim(), key.public_key().to_string());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Never overwritten; and a key others can read is refused.
        assert!(keygen(&KeygenArgs { out: path.clone() }, &mut Vec::new()).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[tokio::test]
    async fn the_signed_trailer_verifies_for_the_header_it_follows_and_a_masked_one_only_for_its_round() {
        let key = Arc::new(KeyPair::generate_ephemeral().unwrap());
        let me = ClientId::parse("site-1").unwrap();
        let header = UpdateHeader {
            id: RoundId::new(2, 0),
            base_version: ModelVersion(1),
            num_examples: 9,
            metrics: BTreeMap::new(),
            manifest_digest: Sha256([3; 32]),
            total_bytes: 4,
            encoding: Default::default(),
        };
        let digest = Sha256::of(&[0, 0, 128, 63]);
        let items = vec![
            UploadItem::Header(header.clone()),
            UploadItem::Chunk(Chunk { offset: 0, data: vec![0, 0, 128, 63].into() }),
            UploadItem::Trailer(UpdateTrailer { payload_digest: digest, signature: None }),
        ];
        let signed = |context| {
            let items = futures::stream::iter(items.clone()).boxed();
            sign_upload_stream(items, key.clone(), "fed-x".into(), me.clone(), context).collect::<Vec<_>>()
        };
        let out = signed(None).await;
        assert_eq!(out.len(), 3);
        let UploadItem::Trailer(t) = &out[2] else { panic!("trailer last") };
        verify_upload(&key.public_key(), "fed-x", &me, &header, &digest, t.signature.as_ref()).unwrap();

        // A masked upload is signed over its secure round, under a label of its own.
        let out = signed(Some([5; 32])).await;
        let UploadItem::Trailer(t) = &out[2] else { panic!("trailer last") };
        let masked = MaskedUpdateHeader { header: header.clone(), secagg_context: [5; 32] };
        let pk = key.public_key();
        verify_masked_upload(&pk, "fed-x", &me, &masked, &digest, t.signature.as_ref()).unwrap();
        assert!(verify_upload(&pk, "fed-x", &me, &header, &digest, t.signature.as_ref()).is_err());
        let other_round = MaskedUpdateHeader { secagg_context: [6; 32], ..masked };
        assert!(verify_masked_upload(&pk, "fed-x", &me, &other_round, &digest, t.signature.as_ref()).is_err());
    }
}
