//! The tables of [`crate::auth::Allowlist`] in `state.sqlite`: allowlisted keys and one-time
//! enrollment tokens (as digests), plus the federation id in `meta`.
//!
//! Typed row functions on a borrowed connection or transaction: the allowlist decides what a
//! row means (standing, token checks) and which writes share a transaction; this module only
//! reads and writes rows. Times are passed in (Unix milliseconds, or seconds for token expiry),
//! so the caller's clock is the one recorded.

use fedtune_shared::ids::ClientId;
use rusqlite::{params, Connection, OptionalExtension};

use super::{meta_get, StorageError};

/// Tables of the allowlist, created next to the coordinator's own (see
/// [`open_database`](super::open_database), which also creates `meta`).
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS allowlist (
    client_id  TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    added_ms   INTEGER NOT NULL,
    added_via  TEXT NOT NULL CHECK (added_via IN ('operator', 'enrollment')),
    revoked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    client_id  TEXT PRIMARY KEY,
    digest     BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
"#;

/// Meta key of the federation id.
const FEDERATION_ID_KEY: &str = "federation_id";

/// How a name came onto the allowlist (`allowlist.added_via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddedVia {
    /// `clients add`.
    Operator,
    /// A one-time enrollment token was used.
    Enrollment,
}

impl AddedVia {
    /// The stored string.
    pub const fn as_str(self) -> &'static str {
        match self {
            AddedVia::Operator => "operator",
            AddedVia::Enrollment => "enrollment",
        }
    }
}

/// The key row of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// The allowlisted public key as stored (not yet parsed).
    pub public_key: Vec<u8>,
    /// Whether the name was revoked.
    pub revoked: bool,
}

/// One allowlist row with whether a token is outstanding for its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowlistRow {
    /// Client name as stored.
    pub client_id: String,
    /// Public key as stored.
    pub public_key: Vec<u8>,
    /// When it was added (Unix ms).
    pub added_ms: u64,
    /// `operator` or `enrollment`.
    pub added_via: String,
    /// When it was revoked (Unix ms), if it was.
    pub revoked_ms: Option<u64>,
    /// Whether an enrollment token is outstanding for the name.
    pub token_pending: bool,
}

/// An outstanding enrollment token as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// SHA-256 digest of the token as stored.
    pub digest: Vec<u8>,
    /// Expiry (Unix seconds).
    pub expires_at: u64,
}

/// The federation id, if one was generated.
pub fn federation_id(conn: &Connection) -> Result<Option<String>, StorageError> {
    meta_get(conn, FEDERATION_ID_KEY)
}

/// Records a newly generated federation id; refuses to replace one (the caller reads first in
/// the same transaction).
pub fn insert_federation_id(conn: &Connection, id: &str) -> Result<(), StorageError> {
    conn.execute("INSERT INTO meta (key, value) VALUES (?1, ?2)", params![FEDERATION_ID_KEY, id])?;
    Ok(())
}

/// The key row of `name`. Cached statement: this is read on every authenticated call.
pub fn key_of(conn: &Connection, name: &ClientId) -> Result<Option<KeyRow>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT public_key, revoked_ms FROM allowlist WHERE client_id = ?1")?
        .query_row([name.as_str()], |r| {
            Ok(KeyRow { public_key: r.get(0)?, revoked: r.get::<_, Option<i64>>(1)?.is_some() })
        })
        .optional()?)
}

/// Allowlists `name` with `key`, replacing a revoked row of the same name.
pub fn upsert_entry(
    conn: &Connection,
    name: &ClientId,
    key: &[u8],
    via: AddedVia,
    now_ms: u64,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO allowlist (client_id, public_key, added_ms, added_via, revoked_ms) VALUES (?1, ?2, ?3, ?4, NULL) \
         ON CONFLICT(client_id) DO UPDATE SET public_key = excluded.public_key, added_ms = excluded.added_ms, \
           added_via = excluded.added_via, revoked_ms = NULL",
        params![name.as_str(), key, now_ms as i64, via.as_str()],
    )?;
    Ok(())
}

/// Marks `name` revoked at `now_ms`; returns whether an active row was revoked.
pub fn revoke(conn: &Connection, name: &ClientId, now_ms: u64) -> Result<bool, StorageError> {
    let n = conn.execute(
        "UPDATE allowlist SET revoked_ms = ?2 WHERE client_id = ?1 AND revoked_ms IS NULL",
        params![name.as_str(), now_ms as i64],
    )?;
    Ok(n > 0)
}

/// Every allowlist row (revoked ones too), by name.
pub fn entries(conn: &Connection) -> Result<Vec<AllowlistRow>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT a.client_id, a.public_key, a.added_ms, a.added_via, a.revoked_ms, \
           EXISTS (SELECT 1 FROM enrollment_tokens t WHERE t.client_id = a.client_id) \
         FROM allowlist a ORDER BY a.client_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(AllowlistRow {
            client_id: r.get(0)?,
            public_key: r.get(1)?,
            added_ms: r.get::<_, i64>(2)? as u64,
            added_via: r.get(3)?,
            revoked_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
            token_pending: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Names with an outstanding token and no allowlist row, with the token's expiry (Unix s).
pub fn pending_tokens(conn: &Connection) -> Result<Vec<(String, u64)>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT client_id, expires_at FROM enrollment_tokens t \
         WHERE NOT EXISTS (SELECT 1 FROM allowlist a WHERE a.client_id = t.client_id) ORDER BY client_id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Stores the token digest for `name`, replacing an earlier outstanding one.
pub fn upsert_token(
    conn: &Connection,
    name: &ClientId,
    digest: &[u8],
    expires_at: u64,
    now_ms: u64,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO enrollment_tokens (client_id, digest, expires_at, created_ms) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT(client_id) DO UPDATE SET digest = excluded.digest, expires_at = excluded.expires_at, \
           created_ms = excluded.created_ms",
        params![name.as_str(), digest, expires_at as i64, now_ms as i64],
    )?;
    Ok(())
}

/// The outstanding token of `name`.
pub fn token_of(conn: &Connection, name: &ClientId) -> Result<Option<TokenRow>, StorageError> {
    Ok(conn
        .query_row(
            "SELECT digest, expires_at FROM enrollment_tokens WHERE client_id = ?1",
            [name.as_str()],
            |r| Ok(TokenRow { digest: r.get(0)?, expires_at: r.get::<_, i64>(1)? as u64 }),
        )
        .optional()?)
}

/// Deletes the outstanding token of `name`; returns whether there was one.
pub fn delete_token(conn: &Connection, name: &ClientId) -> Result<bool, StorageError> {
    Ok(conn.execute("DELETE FROM enrollment_tokens WHERE client_id = ?1", [name.as_str()])? > 0)
}
