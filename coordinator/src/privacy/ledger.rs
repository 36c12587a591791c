//! The privacy ledger as stored: one `privacy_ledger` row per completed round that charged
//! privacy, written by [`storage::commit_round`](crate::storage::commit_round) in the round's
//! commit transaction. The flat columns serve humans and SQL; the `detail` column holds the
//! full [`PrivacyLedgerEntry`] (what the accountant replays) and the adaptive clip bound the
//! next round starts from.

use fedtune_shared::privacy::PrivacyLedgerEntry;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::storage::{LedgerEntry, StorageError};

/// What the `detail` column holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerDetail {
    /// The accountant's record of the round.
    pub entry: PrivacyLedgerEntry,
    /// The fixed averaging denominator used.
    pub expected_clients: f64,
    /// The clip bound the next round uses (differs from `entry.clip_norm` under adaptive
    /// clipping).
    pub next_clip_norm: f64,
}

/// One round of the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRecord {
    /// Model version the round produced.
    pub version: u64,
    /// Mechanism label, e.g. `gaussian/central`.
    pub mechanism: String,
    /// Everything else.
    pub detail: LedgerDetail,
}

/// The storage row for a round.
pub fn to_row(detail: &LedgerDetail) -> LedgerEntry {
    let e = &detail.entry;
    LedgerEntry {
        mechanism: mechanism(e),
        sampling_rate: e.sampling_rate,
        noise_multiplier: e.noise_multiplier,
        clip_norm: e.clip_norm,
        epsilon: e.epsilon_after,
        delta: e.delta,
        detail: serde_json::to_value(detail).unwrap_or(serde_json::Value::Null),
    }
}

/// `gaussian/<placement>`.
pub fn mechanism(e: &PrivacyLedgerEntry) -> String {
    let placement = serde_json::to_value(e.placement).ok().and_then(|v| v.as_str().map(str::to_string));
    format!("gaussian/{}", placement.unwrap_or_default())
}

/// Every ledger row, oldest first. A row whose detail cannot be read is an error: silently
/// skipping it would under-report ε.
pub fn load(conn: &mut Connection) -> Result<Vec<LedgerRecord>, StorageError> {
    let mut stmt = conn.prepare("SELECT version, mechanism, detail FROM privacy_ledger ORDER BY version")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (version, mechanism, detail) = row?;
        let detail: LedgerDetail = serde_json::from_str(&detail).map_err(|e| StorageError::Mismatch {
            dir: Default::default(),
            reason: format!("privacy ledger row for version {version} is unreadable: {e}"),
        })?;
        out.push(LedgerRecord { version, mechanism, detail });
    }
    Ok(out)
}
