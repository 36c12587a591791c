//! The privacy ledger: one [`LedgerRecord`] per completed round that charged privacy, the one
//! type from the DP decorator that computes it to the `privacy_ledger` row that keeps it.
//!
//! The row has flat columns for humans and SQL, and a `detail` column with the whole record as
//! JSON (`{"entry": …, "expected_clients": …, "next_clip_norm": …, "local_epsilon": …}`), which
//! is what the accountant replays at start. [`insert`] runs inside the round's commit transaction
//! ([`super::commit_round`]).
//!
//! Under distributed noise with secure aggregation a round is charged when its sum is released
//! for unmasking ([`record_release`], table `privacy_releases`); the published attempt's charge
//! moves to its ledger row in the commit, and [`load`] returns both kinds, so an attempt that
//! was unmasked and then failed still counts.
//!
//! Under local noise each client's local ε is read from the draw records instead ([`exposures`]):
//! `samples` (who was drawn into each attempt) and `draw_noise` (the multiplier of the attempt,
//! written with the draw by [`super::insert_sample`]).

use std::collections::BTreeMap;

use fedtune_shared::ids::{ClientId, ModelVersion, RoundId};
use fedtune_shared::privacy::{NoisePlacement, PrivacyLedgerEntry};
use rusqlite::{params, Connection, TransactionBehavior};
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
    /// Under local noise: the worst-off client's local ε after this round (its draws so far,
    /// failed attempts included, composed without amplification). Absent in other modes and in
    /// rows written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_epsilon: Option<f64>,
    /// Composed when the round's sum was released for unmasking (distributed noise under secure
    /// aggregation), not when it was published: the coordinator could learn the sum from then
    /// on. Such a record is first kept in `privacy_releases` and moves to the ledger row of its
    /// round when that attempt is published.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub charged_at_release: bool,
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
    let detail = encode(&format!("ledger row for version {version}"), r)?;
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

fn decode(what: &str, detail: &str) -> Result<LedgerRecord, StorageError> {
    serde_json::from_str(detail).map_err(|e| StorageError::Mismatch {
        dir: Default::default(),
        reason: format!("privacy {what} is unreadable: {e}"),
    })
}

fn encode(what: &str, r: &LedgerRecord) -> Result<String, StorageError> {
    serde_json::to_string(r).map_err(|e| StorageError::Mismatch {
        dir: Default::default(),
        reason: format!("privacy {what} cannot be encoded: {e}"),
    })
}

/// Keeps the charge of a secure attempt whose sum is about to be released for unmasking, in its
/// own transaction, before the request goes out: a crash from then on cannot lose it.
pub fn record_release(conn: &mut Connection, id: RoundId, r: &LedgerRecord) -> Result<(), StorageError> {
    let what = format!("release of round {} attempt {}", id.round, id.attempt);
    let detail = encode(&what, r)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT OR REPLACE INTO privacy_releases (round, attempt, detail) VALUES (?1, ?2, ?3)",
        params![id.round as i64, id.attempt, detail],
    )?;
    tx.commit()?;
    Ok(())
}

/// Inside the commit of attempt `id`: its release row (if any) is now the ledger row.
pub(super) fn settle_release(conn: &Connection, id: RoundId) -> Result<(), StorageError> {
    conn.execute(
        "DELETE FROM privacy_releases WHERE round = ?1 AND attempt = ?2",
        params![id.round as i64, id.attempt],
    )?;
    Ok(())
}

/// Every charge, oldest first: the ledger rows of published rounds and the releases of secure
/// attempts that were unmasked but never published (each released before its round's
/// publication). A row whose detail cannot be read is an error: silently skipping it would
/// under-report ε.
pub fn load(conn: &mut Connection) -> Result<Vec<LedgerRecord>, StorageError> {
    // (round, 0 = release before the round's publication / 1 = publication, attempt)
    let mut keyed: Vec<((u64, u8, u32), LedgerRecord)> = Vec::new();
    let mut stmt = conn.prepare("SELECT version, detail FROM privacy_ledger ORDER BY version")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (version, detail) = row?;
        let record = decode(&format!("ledger row for version {version}"), &detail)?;
        keyed.push(((record.entry.round, 1, 0), record));
    }
    let mut stmt =
        conn.prepare("SELECT round, attempt, detail FROM privacy_releases ORDER BY round, attempt")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, u32>(1)?, r.get::<_, String>(2)?)))?;
    for row in rows {
        let (round, attempt, detail) = row?;
        let record = decode(&format!("release of round {round} attempt {attempt}"), &detail)?;
        keyed.push(((round, 0, attempt), record));
    }
    keyed.sort_by_key(|(k, _)| *k);
    Ok(keyed.into_iter().map(|(_, r)| r).collect())
}

/// What the coordinator has seen of one client under local noise: the fit attempts it was drawn
/// into (failed attempts included: its noised update may have reached the coordinator) and the
/// noise multipliers of those attempts, as the sum of `z⁻²` that its local ε composes
/// (`crate::privacy::local_epsilon`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Exposure {
    /// Fit attempts the client was drawn into.
    pub participations: u64,
    /// `Σ z⁻²` over the attempts whose multiplier is recorded (`draw_noise`).
    pub inverse_variance: f64,
    /// Attempts drawn before multipliers were recorded: their `z` is not known here.
    pub unrecorded: u64,
}

impl Exposure {
    /// `Σ z⁻²` over all its attempts, counting an unrecorded one at `fallback_z`.
    pub fn inverse_variance_with(&self, fallback_z: f64) -> f64 {
        self.inverse_variance + self.unrecorded as f64 * fallback_z.powi(-2)
    }

    /// This exposure after one more attempt at multiplier `z`.
    pub fn with_attempt(self, z: f64) -> Self {
        Self {
            participations: self.participations + 1,
            inverse_variance: self.inverse_variance + z.powi(-2),
            unrecorded: self.unrecorded,
        }
    }
}

/// The exposures of a draw: those of the clients it drew and of everyone else with a draw
/// record, before this draw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposures {
    /// Clients in the draw (a drawn client never drawn before has a zero exposure).
    pub drawn: Vec<Exposure>,
    /// Every other client that has been drawn before.
    pub others: Vec<Exposure>,
}

/// Each client's [`Exposure`], from the draw records (`samples`, `draw_noise`). This is what the
/// coordinator knows about each client's participation, so a client's local ε (no amplification:
/// see `fedtune_shared::privacy::epsilon_unamplified`) composes over it. A draw that failed
/// below `rounds.min_fit` before releasing any task is counted too: that can only overstate ε,
/// never hide a participation.
pub fn exposures_by_client(conn: &Connection) -> Result<BTreeMap<String, Exposure>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT s.client_id, COUNT(*), \
           TOTAL(CASE WHEN n.noise_multiplier IS NULL THEN 0.0 \
                      ELSE 1.0 / (n.noise_multiplier * n.noise_multiplier) END), \
           SUM(n.noise_multiplier IS NULL) \
         FROM samples s LEFT JOIN draw_noise n ON n.round = s.round AND n.attempt = s.attempt \
         WHERE s.kind = 'fit' GROUP BY s.client_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Exposure {
                participations: r.get::<_, i64>(1)? as u64,
                inverse_variance: r.get(2)?,
                unrecorded: r.get::<_, i64>(3)? as u64,
            },
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The [`Exposures`] of a draw of `selected` (before it is recorded).
pub fn exposures(conn: &Connection, selected: &[ClientId]) -> Result<Exposures, StorageError> {
    let mut all = exposures_by_client(conn)?;
    let drawn = selected.iter().map(|c| all.remove(c.as_str()).unwrap_or_default()).collect();
    Ok(Exposures { drawn, others: all.into_values().collect() })
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
