//! The state directory: SQLite for records, safetensors files for checkpoints.
//!
//! ```text
//! <state_dir>/state.sqlite          clients, rounds, sampling records, per-client outcomes,
//!                                   evaluations, checkpoints, privacy ledger, meta
//! <state_dir>/checkpoints/round-000007.safetensors   full model after round 7 (0 = initial)
//! <state_dir>/checkpoints/strategy-000007.safetensors server-optimizer state after round 7
//! <state_dir>/spool/                in-flight uploads (cleared at start)
//! ```
//!
//! # Crash consistency
//! For round r the checkpoint (and strategy state) files are written first (temp file, fsync,
//! rename), then one SQLite transaction records the round as completed, the checkpoint row, the
//! per-client outcomes and the privacy-ledger entry. Only after that commit is version r
//! published. A crash before the commit leaves an orphan file that the next completion of round
//! r overwrites; a crash after it loses nothing. On start, rounds still marked `running` become
//! `aborted`, and the coordinator resumes from the newest committed checkpoint.
//!
//! The connection lives behind a `std::sync::Mutex` and is only used from blocking threads
//! ([`Storage::call`]), so SQLite's fsyncs never stall the async reactor.
//!
//! # Layout
//! Every SQL statement of the crate is in this module; other modules call its typed functions.
//! - this file: rounds, samples (with `draw_noise` and `secure_rounds`), outcomes, checkpoints, evaluations, clients, meta.
//! - `database`: [`open_database`], the `meta` table, the coordinator's schema.
//! - [`ledger`]: the privacy ledger ([`LedgerRecord`]), each client's exposure from the draw
//!   records (its local ε under local noise), and the recorded privacy mode.
//! - [`allowlist`]: the allowlist and enrollment-token tables behind [`crate::auth::Allowlist`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedtune_shared::ids::{ClientId, ModelVersion, RoundId, Sha256};
use fedtune_shared::round::{RoundSummary, SecureRoundFigures};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::outcome::{AttemptFailure, AttemptStatus, ParticipantOutcome};

pub mod allowlist;
mod database;
pub mod ledger;

pub(crate) use database::open_database;
use database::{BUSY_WAIT, SCHEMA};
pub use ledger::LedgerRecord;

/// Errors of the state directory. They are infrastructure failures, not protocol outcomes: the
/// round actor treats them as fatal.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// SQLite.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Files.
    #[error("{path}: {source}")]
    Io {
        /// File or folder.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state directory belongs to a different setup.
    #[error("state directory {dir}: {reason}")]
    Mismatch {
        /// Folder.
        dir: PathBuf,
        /// What differs.
        reason: String,
    },
    /// A blocking task died.
    #[error("storage task failed: {0}")]
    Join(String),
}

/// Milliseconds since the Unix epoch (wall clock, for records only; deadlines use tokio time).
pub use fedtune_shared::clock::now_ms;

/// A client as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredClient {
    /// Id.
    pub id: ClientId,
    /// Pinned Ed25519 key.
    pub public_key: Option<[u8; 32]>,
    /// Completed rounds it contributed to.
    pub rounds_contributed: u64,
}

/// The audit record of one draw.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRecord {
    /// Round and attempt.
    pub id: RoundId,
    /// `fit` or `evaluate`.
    pub kind: &'static str,
    /// Scheme with its parameter, e.g. `poisson(q=0.5)`.
    pub scheme: String,
    /// Seed of the draw (hex).
    pub seed: String,
    /// Eligible clients.
    pub candidates: usize,
    /// Drawn clients.
    pub selected: Vec<ClientId>,
    /// Under local noise, the noise multiplier the drawn clients add in this attempt (what their
    /// local ε composes); `None` otherwise.
    pub local_noise_multiplier: Option<f64>,
    /// Under secure aggregation, the fit attempt's roster size, threshold and graph degree;
    /// `None` otherwise.
    pub secure: Option<SecureRoundFigures>,
}

/// How a sampled client's participation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientOutcome {
    /// Client.
    pub client: ClientId,
    /// How its task ended.
    pub outcome: ParticipantOutcome,
    /// Example count of an accepted update.
    pub num_examples: Option<u64>,
    /// Its metrics as JSON.
    pub metrics: serde_json::Value,
}

/// What a completed round commits.
#[derive(Debug, Clone)]
pub struct RoundCommit {
    /// Round and attempt.
    pub id: RoundId,
    /// Checkpoint file (already durable).
    pub checkpoint: PathBuf,
    /// Strategy-state file, if the strategy has state.
    pub strategy_state: Option<PathBuf>,
    /// Digest of the full payload.
    pub full_sha256: Sha256,
    /// Per-client outcomes.
    pub outcomes: Vec<ClientOutcome>,
    /// Accepted updates.
    pub accepted: u32,
    /// Failed participants.
    pub failed: u32,
    /// Examples behind accepted updates.
    pub total_examples: u64,
    /// Weighted mean training loss, if reported.
    pub train_loss: Option<f64>,
    /// Model bytes sent since the previous round closed.
    pub bytes_sent: u64,
    /// Update bytes received since the previous round closed.
    pub bytes_received: u64,
}

/// An evaluation result as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationRecord {
    /// Model version evaluated.
    pub version: ModelVersion,
    /// Reporting clients.
    pub clients: u32,
    /// Held-out examples.
    pub num_examples: u64,
    /// Weighted mean loss.
    pub loss: f64,
    /// Weighted mean accuracy.
    pub accuracy: f64,
    /// Further weighted metrics.
    pub metrics: serde_json::Value,
    /// Per-client reports: (client, examples, loss, accuracy, metrics).
    pub per_client: Vec<(ClientId, u64, f64, f64, serde_json::Value)>,
}

/// Reads a `CheckpointRow` from `SELECT version, path, strategy_path, full_sha256`.
fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CheckpointRow> {
    Ok(CheckpointRow {
        version: ModelVersion(r.get::<_, i64>(0)? as u64),
        path: PathBuf::from(r.get::<_, String>(1)?),
        strategy_path: r.get::<_, Option<String>>(2)?.map(PathBuf::from),
        full_sha256: r.get(3)?,
    })
}

/// The newest committed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    /// Version.
    pub version: ModelVersion,
    /// Model file.
    pub path: PathBuf,
    /// Strategy state file.
    pub strategy_path: Option<PathBuf>,
    /// Full payload digest (hex).
    pub full_sha256: String,
}

/// Handle to the state directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

impl Storage {
    /// Opens (creating if needed) the state directory and its database, and empties the spool.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StorageError::Io { path, source }
        };
        std::fs::create_dir_all(dir.join("checkpoints")).map_err(io(dir))?;
        let spool = dir.join("spool");
        if spool.exists() {
            std::fs::remove_dir_all(&spool).map_err(io(&spool))?;
        }
        std::fs::create_dir_all(&spool).map_err(io(&spool))?;
        // The state directory holds the session secret, the operator token, the allowlist and
        // staged updates: owner only, whatever umask created it.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        }
        let conn = open_database(dir, SCHEMA)?;
        // synchronous=FULL (with WAL): each commit is durable once it returns.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(Self { dir: dir.to_path_buf(), conn: Arc::new(Mutex::new(conn)) })
    }

    /// Opens an existing state directory without touching its spool (for tools that run
    /// beside a live coordinator, e.g. `export`).
    pub fn open_existing(dir: &Path) -> Result<Self, StorageError> {
        let db = dir.join("state.sqlite");
        if !db.is_file() {
            return Err(StorageError::Mismatch {
                dir: dir.to_path_buf(),
                reason: "no state.sqlite: not a state directory".into(),
            });
        }
        let conn = Connection::open(db)?;
        conn.busy_timeout(BUSY_WAIT)?;
        Ok(Self { dir: dir.to_path_buf(), conn: Arc::new(Mutex::new(conn)) })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Folder of in-flight uploads.
    pub fn spool_dir(&self) -> PathBuf {
        self.dir.join("spool")
    }

    /// Path of the checkpoint of `version`.
    pub fn checkpoint_path(&self, version: ModelVersion) -> PathBuf {
        self.dir.join("checkpoints").join(format!("round-{:06}.safetensors", version.0))
    }

    /// Path of the strategy state after `version`.
    pub fn strategy_path(&self, version: ModelVersion) -> PathBuf {
        self.dir.join("checkpoints").join(format!("strategy-{:06}.safetensors", version.0))
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StorageError> + Send + 'static,
    ) -> Result<R, StorageError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StorageError::Join(e.to_string()))?
    }

    /// Runs `f` with the connection on the current thread (CLI tools, tests).
    pub fn call_sync<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StorageError>,
    ) -> Result<R, StorageError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

/// Reads a meta value.
pub fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>, StorageError> {
    Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

/// Writes a meta value.
pub fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

/// Marks rounds left `running` by a previous process as `aborted`; returns how many.
pub fn abort_running(conn: &Connection) -> Result<usize, StorageError> {
    Ok(conn.execute(
        "UPDATE rounds SET status = ?2, finished_ms = ?1, reason = 'coordinator stopped mid-round' \
         WHERE status = ?3",
        params![now_ms() as i64, AttemptStatus::Aborted.as_str(), AttemptStatus::Running.as_str()],
    )?)
}

/// The newest committed checkpoint.
pub fn latest_checkpoint(conn: &Connection) -> Result<Option<CheckpointRow>, StorageError> {
    Ok(conn
        .query_row(
            "SELECT version, path, strategy_path, full_sha256 FROM checkpoints ORDER BY version DESC LIMIT 1",
            [],
            checkpoint_row,
        )
        .optional()?)
}

/// The checkpoint of one version.
pub fn checkpoint_of(
    conn: &Connection,
    version: ModelVersion,
) -> Result<Option<CheckpointRow>, StorageError> {
    Ok(conn
        .query_row(
            "SELECT version, path, strategy_path, full_sha256 FROM checkpoints WHERE version = ?1",
            [version.0 as i64],
            checkpoint_row,
        )
        .optional()?)
}

/// Records the initial model (version 0) and the meta data that fixes this federation.
pub fn commit_initial(
    conn: &mut Connection,
    checkpoint: &Path,
    full_sha256: Sha256,
    meta: &[(&str, String)],
) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (k, v) in meta {
        meta_set(&tx, k, v)?;
    }
    tx.execute(
        "INSERT INTO checkpoints (version, round, attempt, path, strategy_path, full_sha256, created_ms) \
         VALUES (0, 0, 0, ?1, NULL, ?2, ?3)",
        params![checkpoint.display().to_string(), full_sha256.to_hex(), now_ms() as i64],
    )?;
    tx.commit()?;
    Ok(())
}

/// Inserts or refreshes a client on join.
pub fn upsert_client(
    conn: &Connection,
    id: &ClientId,
    public_key: Option<[u8; 32]>,
    train_examples: u64,
    eval_examples: u64,
) -> Result<(), StorageError> {
    let now = now_ms() as i64;
    conn.execute(
        "INSERT INTO clients (client_id, public_key, first_joined_ms, last_joined_ms, train_examples, eval_examples) \
         VALUES (?1, ?2, ?3, ?3, ?4, ?5) \
         ON CONFLICT(client_id) DO UPDATE SET last_joined_ms = excluded.last_joined_ms, \
           public_key = COALESCE(clients.public_key, excluded.public_key), \
           train_examples = excluded.train_examples, eval_examples = excluded.eval_examples",
        params![id.as_str(), public_key.map(|k| k.to_vec()), now, train_examples as i64, eval_examples as i64],
    )?;
    Ok(())
}

/// Every known client with its pinned key and contribution count.
pub fn load_clients(conn: &Connection) -> Result<Vec<StoredClient>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT c.client_id, c.public_key, \
           (SELECT COUNT(*) FROM round_clients rc JOIN rounds r ON r.round = rc.round AND r.attempt = rc.attempt \
             WHERE rc.client_id = c.client_id AND rc.outcome = ?1 AND r.status = ?2) \
         FROM clients c ORDER BY c.client_id",
    )?;
    let accepted = ParticipantOutcome::Accepted.to_string();
    let rows = stmt.query_map(params![accepted, AttemptStatus::Completed.as_str()], |r| {
        let id: String = r.get(0)?;
        let key: Option<Vec<u8>> = r.get(1)?;
        let n: i64 = r.get(2)?;
        Ok((id, key, n))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, key, n) = row?;
        let Ok(id) = ClientId::parse(&id) else { continue };
        out.push(StoredClient {
            id,
            public_key: key.and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok()),
            rounds_contributed: n as u64,
        });
    }
    Ok(out)
}

/// Number of completed rounds.
pub fn completed_rounds(conn: &Connection) -> Result<u64, StorageError> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM rounds WHERE status = ?1",
        [AttemptStatus::Completed.as_str()],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

/// The attempt number the next try of `round` should use.
pub fn next_attempt(conn: &Connection, round: u64) -> Result<u32, StorageError> {
    let max: Option<i64> =
        conn.query_row("SELECT MAX(attempt) FROM rounds WHERE round = ?1", [round as i64], |r| r.get(0))?;
    Ok(max.map(|m| m as u32 + 1).unwrap_or(0))
}

/// Consecutive failed or aborted attempts at the end of the record (for the retry policy after
/// a restart).
pub fn trailing_failures(conn: &Connection, round: u64) -> Result<u32, StorageError> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM rounds WHERE round = ?1 AND status = ?2",
        params![round as i64, AttemptStatus::Failed.as_str()],
        |r| r.get(0),
    )?;
    Ok(n as u32)
}

/// Records the start of an attempt and its sampling record in one transaction.
pub fn begin_round(
    conn: &mut Connection,
    id: RoundId,
    base: ModelVersion,
    sample: &SampleRecord,
) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO rounds (round, attempt, base_version, status, started_ms, selected) \
         VALUES (?1, ?2, ?3, ?6, ?4, ?5)",
        params![
            id.round as i64,
            id.attempt,
            base.0 as i64,
            now_ms() as i64,
            sample.selected.len() as i64,
            AttemptStatus::Running.as_str()
        ],
    )?;
    insert_sample(&tx, sample)?;
    tx.commit()?;
    Ok(())
}

/// Records a draw.
pub fn insert_sample(conn: &Connection, s: &SampleRecord) -> Result<(), StorageError> {
    let mut stmt = conn.prepare(
        "INSERT OR REPLACE INTO samples (round, attempt, kind, scheme, seed, candidates, client_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for c in &s.selected {
        stmt.execute(params![
            s.id.round as i64,
            s.id.attempt,
            s.kind,
            s.scheme,
            s.seed,
            s.candidates as i64,
            c.as_str()
        ])?;
    }
    if let Some(z) = s.local_noise_multiplier {
        conn.execute(
            "INSERT OR REPLACE INTO draw_noise (round, attempt, noise_multiplier) VALUES (?1, ?2, ?3)",
            params![s.id.round as i64, s.id.attempt, z],
        )?;
    }
    if let Some(f) = s.secure {
        conn.execute(
            "INSERT OR REPLACE INTO secure_rounds (round, attempt, clients, threshold, degree) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![s.id.round as i64, s.id.attempt, f.clients, f.threshold, f.degree],
        )?;
    }
    Ok(())
}

/// The clients drawn for an attempt (audit).
pub fn sampled_clients(
    conn: &Connection,
    id: RoundId,
    kind: &str,
) -> Result<Vec<(ClientId, String)>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT client_id, seed FROM samples WHERE round = ?1 AND attempt = ?2 AND kind = ?3 ORDER BY client_id",
    )?;
    let rows = stmt.query_map(params![id.round as i64, id.attempt, kind], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (c, seed) = row?;
        if let Ok(c) = ClientId::parse(&c) {
            out.push((c, seed));
        }
    }
    Ok(out)
}

/// How each participant's slot of an attempt ended, by client id (operators' audit; tests).
pub fn participant_outcomes(
    conn: &Connection,
    id: RoundId,
) -> Result<Vec<(ClientId, ParticipantOutcome)>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT client_id, outcome FROM round_clients WHERE round = ?1 AND attempt = ?2 ORDER BY client_id",
    )?;
    let rows = stmt.query_map(params![id.round as i64, id.attempt], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (c, outcome) = row?;
        if let (Ok(c), Ok(outcome)) = (ClientId::parse(&c), outcome.parse()) {
            out.push((c, outcome));
        }
    }
    Ok(out)
}

fn insert_outcomes(conn: &Connection, id: RoundId, outcomes: &[ClientOutcome]) -> Result<(), StorageError> {
    let mut stmt = conn.prepare(
        "INSERT OR REPLACE INTO round_clients (round, attempt, client_id, outcome, num_examples, metrics) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for o in outcomes {
        stmt.execute(params![
            id.round as i64,
            id.attempt,
            o.client.as_str(),
            o.outcome.to_string(),
            o.num_examples.map(|n| n as i64),
            o.metrics.to_string()
        ])?;
    }
    Ok(())
}

/// Records a failed attempt.
pub fn fail_round(
    conn: &mut Connection,
    id: RoundId,
    reason: &AttemptFailure,
    outcomes: &[ClientOutcome],
    accepted: u32,
    traffic: (u64, u64),
) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let failed = outcomes.iter().filter(|o| !o.outcome.is_accepted()).count() as i64;
    tx.execute(
        "UPDATE rounds SET status = ?9, finished_ms = ?3, reason = ?4, accepted = ?5, failed = ?6, \
           bytes_sent = ?7, bytes_received = ?8 WHERE round = ?1 AND attempt = ?2",
        params![
            id.round as i64,
            id.attempt,
            now_ms() as i64,
            reason.to_string(),
            accepted,
            failed,
            traffic.0 as i64,
            traffic.1 as i64,
            AttemptStatus::Failed.as_str()
        ],
    )?;
    insert_outcomes(&tx, id, outcomes)?;
    tx.commit()?;
    Ok(())
}

/// Commits a completed round: round record, outcomes, checkpoint row and ledger entry, in one
/// transaction (the files must already be durable).
pub fn commit_round(
    conn: &mut Connection,
    c: &RoundCommit,
    ledger: Option<&LedgerRecord>,
) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version = c.id.produces();
    tx.execute(
        "UPDATE rounds SET status = ?10, finished_ms = ?3, accepted = ?4, failed = ?5, \
           total_examples = ?6, train_loss = ?7, bytes_sent = ?8, bytes_received = ?9 \
         WHERE round = ?1 AND attempt = ?2",
        params![
            c.id.round as i64,
            c.id.attempt,
            now_ms() as i64,
            c.accepted,
            c.failed,
            c.total_examples as i64,
            c.train_loss,
            c.bytes_sent as i64,
            c.bytes_received as i64,
            AttemptStatus::Completed.as_str()
        ],
    )?;
    insert_outcomes(&tx, c.id, &c.outcomes)?;
    tx.execute(
        "INSERT OR REPLACE INTO checkpoints (version, round, attempt, path, strategy_path, full_sha256, created_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            version.0 as i64,
            c.id.round as i64,
            c.id.attempt,
            c.checkpoint.display().to_string(),
            c.strategy_state.as_ref().map(|p| p.display().to_string()),
            c.full_sha256.to_hex(),
            now_ms() as i64
        ],
    )?;
    if let Some(l) = ledger {
        ledger::insert(&tx, version, l)?;
        ledger::settle_release(&tx, c.id)?;
    }
    tx.commit()?;
    Ok(())
}

/// Records a federated evaluation.
pub fn record_evaluation(conn: &mut Connection, e: &EvaluationRecord) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT OR REPLACE INTO evaluations (version, clients, num_examples, loss, accuracy, metrics, created_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            e.version.0 as i64,
            e.clients,
            e.num_examples as i64,
            e.loss,
            e.accuracy,
            e.metrics.to_string(),
            now_ms() as i64
        ],
    )?;
    for (c, n, loss, acc, m) in &e.per_client {
        tx.execute(
            "INSERT OR REPLACE INTO evaluation_clients (version, client_id, num_examples, loss, accuracy, metrics) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![e.version.0 as i64, c.as_str(), *n as i64, loss, acc, m.to_string()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Versions that have an evaluation record.
pub fn evaluated(conn: &Connection, version: ModelVersion) -> Result<bool, StorageError> {
    let n: i64 =
        conn.query_row("SELECT COUNT(*) FROM evaluations WHERE version = ?1", [version.0 as i64], |r| {
            r.get(0)
        })?;
    Ok(n > 0)
}

/// The `n` most recent round attempts, newest first, with evaluation figures of the versions
/// they produced and, for secure attempts, their secure-aggregation figures.
pub fn recent_rounds(conn: &Connection, n: usize) -> Result<Vec<RoundSummary>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT r.round, r.attempt, r.status, r.selected, r.accepted, r.failed, r.total_examples, r.train_loss, \
           e.loss, e.accuracy, e.num_examples, r.started_ms, r.finished_ms, r.reason, \
           r.bytes_sent, r.bytes_received, p.epsilon, json_extract(p.detail, '$.local_epsilon'), \
           s.clients, s.threshold, s.degree \
         FROM rounds r LEFT JOIN evaluations e ON e.version = r.round AND r.status = ?2 \
         LEFT JOIN privacy_ledger p ON p.version = r.round AND r.status = ?2 \
         LEFT JOIN secure_rounds s ON s.round = r.round AND s.attempt = r.attempt \
         ORDER BY r.round DESC, r.attempt DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map(params![n as i64, AttemptStatus::Completed.as_str()], |r| {
        let started: i64 = r.get(11)?;
        let finished: Option<i64> = r.get(12)?;
        let status: String = r.get(2)?;
        let status: AttemptStatus = status.parse().map_err(|e: crate::outcome::UnknownOutcome| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
        })?;
        Ok(RoundSummary {
            id: RoundId::new(r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u32),
            status: status.to_string(),
            selected: r.get::<_, i64>(3)? as u32,
            accepted: r.get::<_, i64>(4)? as u32,
            failed: r.get::<_, i64>(5)? as u32,
            total_examples: r.get::<_, i64>(6)? as u64,
            train_loss: r.get::<_, Option<f64>>(7)?.unwrap_or(f64::NAN),
            eval_loss: r.get::<_, Option<f64>>(8)?.unwrap_or(f64::NAN),
            eval_accuracy: r.get::<_, Option<f64>>(9)?.unwrap_or(f64::NAN),
            eval_examples: r.get::<_, Option<i64>>(10)?.unwrap_or(0) as u64,
            duration: Duration::from_millis(finished.map(|f| (f - started).max(0) as u64).unwrap_or(0)),
            reason: r.get::<_, Option<String>>(13)?.unwrap_or_default(),
            bytes_sent: r.get::<_, i64>(14)? as u64,
            bytes_received: r.get::<_, i64>(15)? as u64,
            epsilon: r.get(16)?,
            local_epsilon: r.get(17)?,
            secure: match (r.get::<_, Option<u32>>(18)?, r.get(19)?, r.get(20)?) {
                (Some(clients), Some(threshold), Some(degree)) => {
                    Some(SecureRoundFigures { clients, threshold, degree })
                }
                _ => None,
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Checkpoint rows older than the newest `keep` (never version 0), for pruning.
pub fn prunable_checkpoints(conn: &Connection, keep: usize) -> Result<Vec<CheckpointRow>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT version, path, strategy_path, full_sha256 FROM checkpoints WHERE version > 0 \
         ORDER BY version DESC LIMIT -1 OFFSET ?1",
    )?;
    let rows = stmt.query_map([keep as i64], |r| {
        Ok(CheckpointRow {
            version: ModelVersion(r.get::<_, i64>(0)? as u64),
            path: PathBuf::from(r.get::<_, String>(1)?),
            strategy_path: r.get::<_, Option<String>>(2)?.map(PathBuf::from),
            full_sha256: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Forgets a pruned checkpoint row (its files are removed by the caller).
pub fn delete_checkpoint_row(conn: &Connection, version: ModelVersion) -> Result<(), StorageError> {
    conn.execute("DELETE FROM checkpoints WHERE version = ?1", [version.0 as i64])?;
    Ok(())
}

#[cfg(test)]
mod tests;
