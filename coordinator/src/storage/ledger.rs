//! The privacy ledger: one [`LedgerRecord`] per completed round that charged privacy, the one
//! type from the DP decorator that computes it to the `privacy_ledger` row that keeps it.
//!
//! The row has flat columns for humans and SQL, and a `detail` column with the whole record as
//! JSON (`{"entry": …, "expected_clients": …, "next_clip_norm": …}`), which is what the
//! accountant replays at start. [`insert`] runs inside the round's commit transaction
//! ([`super::commit_round`]).

use std::collections::BTreeMap;

use fedtune_shared::ids::{ClientId, ModelVersion};
use fedtune_shared::privacy::{NoisePlacement, PrivacyLedgerEntry};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use super::{meta_get, meta_set, StorageError};

/// One round's privacy charge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRecord {
    /// The accountant's record of the round (round, sampling, placement, q, z, C, sampled,
    /// reported, δ, ε after it).
    pub entry: PrivacyLedgerEntry,
    /// The fixed averaging denominator `n̄` the round used.
    pub expected_clients: f64,
    /// The clip bound the next round uses (differs from `entry.clip_norm` under adaptive
    /// clipping).
    pub next_clip_norm: f64,
}

impl LedgerRecord {
    /// The model version the round produced.
    pub fn version(&self) -> ModelVersion {
        ModelVersion(self.entry.round)
    }

    /// Mechanism label, `gaussian/<placement>` (the `mechanism` column).
    pub fn mechanism(&self) -> String {
        let placement = match self.entry.placement {
            NoisePlacement::Central => "central",
            NoisePlacement::Local => "local",
            NoisePlacement::Distributed => "distributed",
        };
        format!("gaussian/{placement}")
    }
}

/// Writes the ledger row of the round that produced `version` (inside its commit transaction).
pub(super) fn insert(conn: &Connection, version: ModelVersion, r: &LedgerRecord) -> Result<(), StorageError> {
    let detail = serde_json::to_string(r).map_err(|e| StorageError::Mismatch {
        dir: Default::default(),
        reason: format!("privacy ledger row for version {version} cannot be encoded: {e}"),
    })?;
    conn.execute(
        "INSERT OR REPLACE INTO privacy_ledger \
         (version, round, mechanism, sampling_rate, noise_multiplier, clip_norm, epsilon, delta, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            version.0 as i64,
            r.entry.round as i64,
            r.mechanism(),
            r.entry.sampling_rate,
            r.entry.noise_multiplier,
            r.entry.clip_norm,
            r.entry.epsilon_after,
            r.entry.delta,
            detail
        ],
    )?;
    Ok(())
}

/// Every ledger record, oldest first. A row whose detail cannot be read is an error: silently
/// skipping it would under-report ε.
pub fn load(conn: &mut Connection) -> Result<Vec<LedgerRecord>, StorageError> {
    let mut stmt = conn.prepare("SELECT version, detail FROM privacy_ledger ORDER BY version")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (version, detail) = row?;
        let record: LedgerRecord = serde_json::from_str(&detail).map_err(|e| StorageError::Mismatch {
            dir: Default::default(),
            reason: format!("privacy ledger row for version {version} is unreadable: {e}"),
        })?;
        out.push(record);
    }
    Ok(out)
}

/// How many fit attempts each client was drawn into, failed attempts included, from the draw
/// records (`samples`). This is what the coordinator knows about each client's participation,
/// so a client's local ε (no amplification: see `fedtune_shared::privacy::epsilon_unamplified`)
/// composes over it. A draw that failed below `rounds.min_fit` before releasing any task is
/// counted too: that can only overstate ε, never hide a participation.
pub fn participations(conn: &Connection) -> Result<BTreeMap<String, u64>, StorageError> {
    let mut stmt =
        conn.prepare("SELECT client_id, COUNT(*) FROM samples WHERE kind = 'fit' GROUP BY client_id")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The most participations of any client once `selected` is added to the record (the worst
/// client's count, for its local ε and the budget check before a draw's tasks are released).
pub fn max_participations_with(conn: &Connection, selected: &[ClientId]) -> Result<u64, StorageError> {
    let mut counts = participations(conn)?;
    for c in selected {
        *counts.entry(c.as_str().to_owned()).or_default() += 1;
    }
    Ok(counts.into_values().max().unwrap_or(0))
}

/// Meta key recording the privacy mode a federation was created with.
const MODE_KEY: &str = "privacy_mode";

/// The privacy mode the federation was created with (`None`: not recorded, i.e. created before
/// modes were recorded).
pub fn recorded_mode(conn: &Connection) -> Result<Option<String>, StorageError> {
    meta_get(conn, MODE_KEY)
}

/// Records the privacy mode of the federation.
pub fn record_mode(conn: &Connection, mode: &str) -> Result<(), StorageError> {
    meta_set(conn, MODE_KEY, mode)
}
