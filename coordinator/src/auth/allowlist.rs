//! The allowlist: which client names may join, with which Ed25519 public key; and the
//! outstanding one-time enrollment tokens.
//!
//! It lives in the state directory's SQLite database (tables `allowlist`, `enrollment_tokens`)
//! so that `fedtune-coordinator clients add|revoke|enroll-token` work beside a running
//! coordinator: the coordinator opens its own connection and reads a client's standing on every
//! authenticated call, which is what makes a revocation take effect at once. Those reads are
//! indexed point queries on a WAL database (they never wait for a writer), so they are done
//! inline rather than on a blocking thread.
//!
//! Write transactions are `IMMEDIATE`: they take the write lock up front, so a concurrent
//! writer (the coordinator committing a round, another CLI call) makes them wait for the busy
//! timeout instead of failing on a read-to-write lock upgrade.
//!
//! Enrollment tokens are stored only as digests with an expiry ([`EnrollmentRecord`]); the
//! record is deleted in the same transaction that allowlists the key, so a token works once.
//!
//! The SQL is [`crate::storage::allowlist`]'s; this module decides what rows mean and which
//! writes go together in one transaction.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use fedtune_shared::clock::now_ms;
use fedtune_shared::crypto::{EnrollmentDigest, EnrollmentRecord, EnrollmentToken, PublicKey};
use fedtune_shared::ids::ClientId;
use rusqlite::{Connection, TransactionBehavior};

use crate::storage::allowlist::{self as rows, AddedVia, KeyRow};
use crate::storage::StorageError;

/// Errors of the allowlist. Messages name clients and files, never keys or tokens.
#[derive(Debug, thiserror::Error)]
pub enum AllowlistError {
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The state directory cannot be created.
    #[error("{}: {source}", path.display())]
    Io {
        /// Folder.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `add` for a name that is allowlisted and not revoked.
    #[error("client `{0}` is already allowlisted; revoke it first to change its key")]
    AlreadyAllowlisted(ClientId),
    /// `revoke` for a name that is not (or no longer) allowlisted.
    #[error("client `{0}` is not allowlisted")]
    NotAllowlisted(ClientId),
    /// No enrollment token is outstanding for this name.
    #[error("no enrollment token is outstanding for `{0}`")]
    NoToken(ClientId),
    /// The presented enrollment token is not the one issued for this name.
    #[error("the enrollment token does not match the one issued for `{0}`")]
    TokenMismatch(ClientId),
    /// The enrollment token's lifetime is over.
    #[error("the enrollment token for `{0}` has expired; ask the operator for a new one")]
    TokenExpired(ClientId),
    /// The system random generator failed.
    #[error("cannot generate a token: {0}")]
    Crypto(#[from] fedtune_shared::crypto::CryptoError),
}

impl From<rusqlite::Error> for AllowlistError {
    fn from(e: rusqlite::Error) -> Self {
        AllowlistError::Storage(StorageError::Sqlite(e))
    }
}

/// How a name may authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Allowlisted with this key.
    Allowed(PublicKey),
    /// Was allowlisted, and revoked.
    Revoked,
    /// Never allowlisted.
    Unknown,
}

/// One allowlist row, for `clients list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowlistEntry {
    /// Client name.
    pub name: ClientId,
    /// Its key.
    pub public_key: PublicKey,
    /// When it was added (Unix ms).
    pub added_ms: u64,
    /// `operator` (clients add) or `enrollment` (a token was used).
    pub added_via: String,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
    /// Whether an enrollment token is outstanding for the name.
    pub token_pending: bool,
}

/// Unix seconds now (enrollment tokens are wall-clock: they outlive coordinator restarts).
pub use fedtune_shared::clock::now_secs as unix_now;

/// The allowlist of one state directory, on its own database connection.
#[derive(Debug)]
pub struct Allowlist {
    conn: Mutex<Connection>,
}

impl Allowlist {
    /// Opens (creating the folder, database and tables if needed) the allowlist of `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, AllowlistError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|source| AllowlistError::Io { path: state_dir.to_path_buf(), source })?;
        // A CLI command and the coordinator may open and write at the same moment: wait, do
        // not fail.
        let conn = crate::storage::open_database(state_dir, rows::SCHEMA)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn with<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, AllowlistError>,
    ) -> Result<R, AllowlistError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// The federation id of this state directory, generated on first use (`fed-` + 16 random
    /// hex digits). Update signatures and session tokens are bound to it, so neither can be
    /// replayed to another federation.
    pub fn federation_id(&self) -> Result<String, AllowlistError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = match rows::federation_id(&tx)? {
                Some(id) => id,
                None => {
                    use ring::rand::SecureRandom as _;
                    let mut raw = [0u8; 8];
                    ring::rand::SystemRandom::new()
                        .fill(&mut raw)
                        .map_err(|_| fedtune_shared::crypto::CryptoError::Rng)?;
                    let id = format!("fed-{}", hex::encode(raw));
                    rows::insert_federation_id(&tx, &id)?;
                    id
                }
            };
            tx.commit()?;
            Ok(id)
        })
    }

    /// Allowlists `name` with `key` (operator action). A revoked name may be added again, with
    /// any key; an active one must be revoked first.
    pub fn add(&self, name: &ClientId, key: &PublicKey) -> Result<(), AllowlistError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            insert(&tx, name, key, AddedVia::Operator)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Revokes `name`: its sessions stop working at once and its pending uploads are refused.
    /// Also drops an outstanding enrollment token for it.
    pub fn revoke(&self, name: &ClientId) -> Result<(), AllowlistError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let revoked = rows::revoke(&tx, name, now_ms())?;
            let token = rows::delete_token(&tx, name)?;
            if !revoked && !token {
                return Err(AllowlistError::NotAllowlisted(name.clone()));
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Every allowlisted (or revoked) client, and names with only a pending token.
    pub fn list(&self) -> Result<Vec<AllowlistEntry>, AllowlistError> {
        self.with(|c| {
            let mut out = Vec::new();
            for row in rows::entries(c)? {
                let (Ok(name), Ok(key)) =
                    (ClientId::parse(&row.client_id), PublicKey::from_slice(&row.public_key))
                else {
                    continue;
                };
                out.push(AllowlistEntry {
                    name,
                    public_key: key,
                    added_ms: row.added_ms,
                    added_via: row.added_via,
                    revoked_ms: row.revoked_ms,
                    token_pending: row.token_pending,
                });
            }
            Ok(out)
        })
    }

    /// Names with an outstanding enrollment token and no allowlist entry yet.
    pub fn pending_tokens(&self) -> Result<Vec<(ClientId, u64)>, AllowlistError> {
        self.with(|c| {
            Ok(rows::pending_tokens(c)?
                .into_iter()
                .filter_map(|(name, expires_at)| ClientId::parse(&name).ok().map(|n| (n, expires_at)))
                .collect())
        })
    }

    /// How `name` may authenticate now.
    pub fn standing(&self, name: &ClientId) -> Result<Standing, AllowlistError> {
        self.with(|c| standing_in(c, name))
    }

    /// Whether an unexpired enrollment token is outstanding for `name` at Unix time `now`.
    pub fn enrolling(&self, name: &ClientId, now: u64) -> Result<bool, AllowlistError> {
        self.with(|c| Ok(rows::token_of(c, name)?.is_some_and(|row| now < row.expires_at)))
    }

    /// Issues a one-time enrollment token for `name`, valid for `ttl`; replaces an earlier
    /// outstanding token for it. Refused while `name` is allowlisted and not revoked.
    pub fn issue_enrollment_token(
        &self,
        name: &ClientId,
        ttl: Duration,
    ) -> Result<EnrollmentToken, AllowlistError> {
        let token = EnrollmentToken::generate()?;
        let record = EnrollmentRecord::new(&token, ttl, unix_now());
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Standing::Allowed(_) = standing_in(&tx, name)? {
                return Err(AllowlistError::AlreadyAllowlisted(name.clone()));
            }
            rows::upsert_token(&tx, name, record.digest.as_bytes(), record.expires_at, now_ms())?;
            tx.commit()?;
            Ok(())
        })?;
        Ok(token)
    }

    /// Exchanges `token` for allowlisting `key` under `name`, at Unix time `now`. The token is
    /// consumed in the same transaction. An expired token is deleted too.
    pub fn enroll(
        &self,
        name: &ClientId,
        token: &EnrollmentToken,
        key: &PublicKey,
        now: u64,
    ) -> Result<(), AllowlistError> {
        self.with(|c| {
            // A plain read first: a guess for an unknown name or a wrong token is refused without
            // taking the database's write lock, so guessing cannot stall the coordinator's writes.
            token_matches(c, name, token)?;
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Checked again inside the transaction: another enrollment may have used it since.
            let row = token_matches(&tx, name, token)?;
            rows::delete_token(&tx, name)?;
            if now >= row.expires_at {
                tx.commit()?;
                return Err(AllowlistError::TokenExpired(name.clone()));
            }
            insert(&tx, name, key, AddedVia::Enrollment)?;
            tx.commit()?;
            Ok(())
        })
    }
}

/// The stored token row for `name` if `token` matches it (expiry is the caller's to check).
fn token_matches(
    c: &Connection,
    name: &ClientId,
    token: &EnrollmentToken,
) -> Result<rows::TokenRow, AllowlistError> {
    let row = rows::token_of(c, name)?.ok_or_else(|| AllowlistError::NoToken(name.clone()))?;
    let digest = <[u8; 32]>::try_from(row.digest.as_slice())
        .map(EnrollmentDigest::from_bytes)
        .map_err(|_| AllowlistError::NoToken(name.clone()))?;
    if !digest.matches(token) {
        return Err(AllowlistError::TokenMismatch(name.clone()));
    }
    Ok(row)
}

fn standing_in(c: &Connection, name: &ClientId) -> Result<Standing, AllowlistError> {
    Ok(match rows::key_of(c, name)? {
        None => Standing::Unknown,
        Some(KeyRow { revoked: true, .. }) => Standing::Revoked,
        // A corrupt key must not authenticate anyone.
        Some(KeyRow { public_key, revoked: false }) => {
            PublicKey::from_slice(&public_key).map(Standing::Allowed).unwrap_or(Standing::Revoked)
        }
    })
}

fn insert(c: &Connection, name: &ClientId, key: &PublicKey, via: AddedVia) -> Result<(), AllowlistError> {
    if let Standing::Allowed(_) = standing_in(c, name)? {
        return Err(AllowlistError::AlreadyAllowlisted(name.clone()));
    }
    rows::upsert_entry(c, name, key.as_bytes(), via, now_ms())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use fedtune_shared::crypto::KeyPair;

    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    fn key() -> PublicKey {
        KeyPair::generate_ephemeral().unwrap().public_key()
    }

    #[test]
    fn an_added_client_is_allowed_until_revoked_and_can_be_re_added_with_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let list = Allowlist::open(dir.path()).unwrap();
        let (k1, k2) = (key(), key());
        assert_eq!(list.standing(&id("a")).unwrap(), Standing::Unknown);
        list.add(&id("a"), &k1).unwrap();
        assert_eq!(list.standing(&id("a")).unwrap(), Standing::Allowed(k1));
        assert!(matches!(list.add(&id("a"), &k2), Err(AllowlistError::AlreadyAllowlisted(_))));
        list.revoke(&id("a")).unwrap();
        assert_eq!(list.standing(&id("a")).unwrap(), Standing::Revoked);
        assert!(matches!(list.revoke(&id("a")), Err(AllowlistError::NotAllowlisted(_))));
        list.add(&id("a"), &k2).unwrap();
        assert_eq!(list.standing(&id("a")).unwrap(), Standing::Allowed(k2));
        // A second connection (the CLI beside a running coordinator) sees the same state.
        let other = Allowlist::open(dir.path()).unwrap();
        other.revoke(&id("a")).unwrap();
        assert_eq!(list.standing(&id("a")).unwrap(), Standing::Revoked);
        assert_eq!(list.list().unwrap().len(), 1);
    }

    #[test]
    fn an_enrollment_token_works_once_for_its_name_and_before_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let list = Allowlist::open(dir.path()).unwrap();
        let k = key();
        let token = list.issue_enrollment_token(&id("b"), Duration::from_secs(600)).unwrap();
        let stranger = EnrollmentToken::generate().unwrap();
        assert!(matches!(
            list.enroll(&id("b"), &stranger, &k, unix_now()),
            Err(AllowlistError::TokenMismatch(_))
        ));
        assert!(matches!(list.enroll(&id("c"), &token, &k, unix_now()), Err(AllowlistError::NoToken(_))));
        list.enroll(&id("b"), &token, &k, unix_now()).unwrap();
        assert_eq!(list.standing(&id("b")).unwrap(), Standing::Allowed(k));
        assert!(matches!(list.enroll(&id("b"), &token, &k, unix_now()), Err(AllowlistError::NoToken(_))));

        let late = list.issue_enrollment_token(&id("d"), Duration::from_secs(60)).unwrap();
        let err = list.enroll(&id("d"), &late, &k, unix_now() + 61).unwrap_err();
        assert!(matches!(err, AllowlistError::TokenExpired(_)), "{err}");
        assert_eq!(list.standing(&id("d")).unwrap(), Standing::Unknown);
    }

    #[test]
    fn the_database_stores_only_the_token_digest() {
        let dir = tempfile::tempdir().unwrap();
        let list = Allowlist::open(dir.path()).unwrap();
        let token = list.issue_enrollment_token(&id("e"), Duration::from_secs(60)).unwrap();
        drop(list);
        let raw = std::fs::read(dir.path().join("state.sqlite")).unwrap();
        let wal = std::fs::read(dir.path().join("state.sqlite-wal")).unwrap_or_default();
        let secret = token.expose_secret();
        for bytes in [raw, wal] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
    }

    #[test]
    fn the_federation_id_is_stable_per_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allowlist::open(dir.path()).unwrap().federation_id().unwrap();
        let b = Allowlist::open(dir.path()).unwrap().federation_id().unwrap();
        assert_eq!(a, b);
        fedtune_shared::auth::check_federation_id(&a).unwrap();
    }
}
