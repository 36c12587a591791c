//! The one way to open `state.sqlite`, shared by the coordinator and the `clients` commands,
//! the `meta` table both use, and the schema of the coordinator's own tables.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, TransactionBehavior};

/// Key–value facts about the federation (created with every schema: the allowlist keeps the
/// federation id here, the coordinator what fixes the federation).
const META: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#;

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS clients (
    client_id       TEXT PRIMARY KEY,
    public_key      BLOB,
    first_joined_ms INTEGER NOT NULL,
    last_joined_ms  INTEGER NOT NULL,
    train_examples  INTEGER NOT NULL DEFAULT 0,
    eval_examples   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    round          INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    base_version   INTEGER NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'aborted')),
    started_ms     INTEGER NOT NULL,
    finished_ms    INTEGER,
    selected       INTEGER NOT NULL DEFAULT 0,
    accepted       INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0,
    total_examples INTEGER NOT NULL DEFAULT 0,
    train_loss     REAL,
    reason         TEXT,
    bytes_sent     INTEGER NOT NULL DEFAULT 0,
    bytes_received INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (round, attempt)
);
-- The audit record of every draw: scheme, seed, how many were eligible, and who was drawn.
CREATE TABLE IF NOT EXISTS samples (
    round      INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('fit', 'evaluate')),
    scheme     TEXT NOT NULL,
    seed       TEXT NOT NULL,
    candidates INTEGER NOT NULL,
    client_id  TEXT NOT NULL,
    PRIMARY KEY (round, attempt, kind, client_id)
);
-- Under local noise, the noise multiplier the clients drawn into a fit attempt were told to add
-- (each client's local ε composes these over its draws; written with the draw).
CREATE TABLE IF NOT EXISTS draw_noise (
    round            INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    PRIMARY KEY (round, attempt)
);
-- Under secure aggregation, what each fit attempt was set up with: the roster size n, the
-- threshold t and the masking graph's degree k (written with the draw; the attempt's survivors are
-- its `rounds.accepted`).
CREATE TABLE IF NOT EXISTS secure_rounds (
    round     INTEGER NOT NULL,
    attempt   INTEGER NOT NULL,
    clients   INTEGER NOT NULL,
    threshold INTEGER NOT NULL,
    degree    INTEGER NOT NULL,
    PRIMARY KEY (round, attempt)
);
CREATE TABLE IF NOT EXISTS round_clients (
    round        INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    client_id    TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    num_examples INTEGER,
    metrics      TEXT,
    PRIMARY KEY (round, attempt, client_id)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    version        INTEGER PRIMARY KEY,
    round          INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    path           TEXT NOT NULL,
    strategy_path  TEXT,
    full_sha256    TEXT NOT NULL,
    created_ms     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    version      INTEGER PRIMARY KEY,
    clients      INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    loss         REAL NOT NULL,
    accuracy     REAL NOT NULL,
    metrics      TEXT NOT NULL,
    created_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluation_clients (
    version      INTEGER NOT NULL,
    client_id    TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    loss         REAL NOT NULL,
    accuracy     REAL NOT NULL,
    metrics      TEXT NOT NULL,
    PRIMARY KEY (version, client_id)
);
-- One row per completed round whose strategy charged privacy (written in the same transaction
-- as the round and its checkpoint, so ε is never under-reported after a crash).
CREATE TABLE IF NOT EXISTS privacy_ledger (
    version          INTEGER PRIMARY KEY,
    round            INTEGER NOT NULL,
    mechanism        TEXT NOT NULL,
    sampling_rate    REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    clip_norm        REAL NOT NULL,
    epsilon          REAL NOT NULL,
    delta            REAL NOT NULL,
    detail           TEXT NOT NULL
);
-- Charges taken when a secure round's sum was released for unmasking (distributed noise): one
-- row per attempt, written before the unmasking request goes out. The commit of the published
-- attempt moves its charge into privacy_ledger; rows of attempts that failed after their release
-- stay here and count towards ε.
CREATE TABLE IF NOT EXISTS privacy_releases (
    round   INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    detail  TEXT NOT NULL,
    PRIMARY KEY (round, attempt)
);
"#;

/// How long a connection waits for another connection's write lock. The coordinator and the
/// `fedtune-coordinator clients …` commands share one database and write in short transactions.
pub(super) const BUSY_WAIT: Duration = Duration::from_secs(5);

/// Opens `state.sqlite` in `dir` (creating it), in WAL mode so readers never block the writer,
/// and creates the `meta` table and what `schema` declares. Two processes may do this at the same
/// moment, e.g. a new coordinator and `clients add` on a fresh state directory.
///
/// Every write transaction on the database is `IMMEDIATE`: it takes the write lock up front,
/// where SQLite waits (up to [`BUSY_WAIT`]). A deferred transaction that reads first would have
/// to upgrade its lock later, and there SQLite answers `SQLITE_BUSY` at once instead of
/// waiting, because waiting could deadlock.
pub(crate) fn open_database(dir: &Path, schema: &str) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(dir.join("state.sqlite"))?;
    conn.busy_timeout(BUSY_WAIT)?;
    // Switching a new file to WAL is such a lock upgrade; retried like one.
    retry_while_busy(|| conn.pragma_update(None, "journal_mode", "WAL"))?;
    retry_while_busy(|| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(META)?;
        tx.execute_batch(schema)?;
        tx.commit()
    })?;
    Ok(conn)
}

/// Runs `step` again while SQLite answers `SQLITE_BUSY` without having waited, for about
/// [`BUSY_WAIT`] in all.
fn retry_while_busy<T>(mut step: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    const PAUSE: Duration = Duration::from_millis(20);
    let tries = (BUSY_WAIT.as_millis() / PAUSE.as_millis()) as u32;
    let mut tried = 1;
    loop {
        match step() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::DatabaseBusy && tried < tries =>
            {
                tried += 1;
                std::thread::sleep(PAUSE);
            }
            other => return other,
        }
    }
}
