//! What an operator does with a federation from outside the server: ask a running coordinator
//! for its status over gRPC (`status`), and write a round's model as a Hugging Face directory
//! from a state directory (`export`).
//!
//! The `fedtune-coordinator` CLI parses into these argument structs and calls these functions;
//! `simulate` calls the same ones, so a simulation sees the federation exactly as an operator
//! does. This module sits below both and names neither.

use std::fmt::Write as _;
use std::path::PathBuf;

use fedtune_shared::auth::{bearer_metadata, AUTHORIZATION};
use fedtune_shared::chunk::MAX_MESSAGE_BYTES;
use fedtune_shared::crypto::{CryptoError, OperatorToken, OPERATOR_TOKEN_FILE};
use fedtune_shared::endpoint::{self, TlsOptions};
use fedtune_shared::ids::ModelVersion;
use fedtune_shared::params::ParameterVector;
use fedtune_shared::pb;
use fedtune_shared::round::{PrivacyStatus, RoundSummary, StatusReport};
use fedtune_shared::settings::SettingsError;

use crate::model::{self, ModelError};
use crate::storage::{self, Storage, StorageError};

/// `status` options.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Coordinator URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Rounds to show.
    #[arg(long, default_value_t = 10)]
    pub recent: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// CA certificate (PEM) to trust for an https:// coordinator.
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Name the coordinator's certificate must carry (default: the URL's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Client certificate (PEM) when the coordinator requires mutual TLS. The operator
    /// certificate (`operator.pem` from `certs init`) gets the operator view without a token;
    /// a client's certificate gets the anonymous view.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The operator token file (mode 0600) for the full view: clients, rounds, metrics.
    /// Without it (or `--state-dir`) the coordinator answers with its anonymous view.
    #[arg(long, value_name = "PATH", conflicts_with = "state_dir")]
    pub operator_token_file: Option<PathBuf>,
    /// The coordinator's state directory, to read its operator token (`operator.token`) from.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl StatusArgs {
    /// Status of the plaintext coordinator at `addr`, its last `recent` rounds, read as its
    /// operator when `state_dir` (which holds the operator token) is given (harnesses, simulate).
    pub fn plaintext(addr: &str, recent: u32, state_dir: Option<PathBuf>) -> Self {
        Self {
            addr: addr.to_string(),
            recent,
            json: false,
            ca: None,
            tls_domain: None,
            tls_cert: None,
            tls_key: None,
            operator_token_file: None,
            state_dir,
        }
    }

    /// Where the operator token is read from, if the full view is asked for.
    fn operator_token_path(&self) -> Option<PathBuf> {
        self.operator_token_file
            .clone()
            .or_else(|| self.state_dir.as_ref().map(|d| d.join(OPERATOR_TOKEN_FILE)))
    }
}

/// `export` options.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// State directory of the federation.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Round whose model to export (0 = the initial model).
    #[arg(long)]
    pub round: u64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the tokenizer and config.json come from (default: the recorded initial model
    /// directory).
    #[arg(long)]
    pub init_dir: Option<PathBuf>,
}

/// Errors of the operator commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad configuration (exit status 64).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// Connecting or calling the coordinator.
    #[error("cannot reach the coordinator at {addr}: {reason}")]
    Connect {
        /// URL.
        addr: String,
        /// Cause.
        reason: String,
    },
    /// State directory.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Model files.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Nothing to export.
    #[error("{0}")]
    NotFound(String),
    /// The operator token file cannot be used.
    #[error("operator token: {0}")]
    OperatorToken(#[from] CryptoError),
}

/// Bound on connecting for `status`: an unreachable coordinator is reported, not waited for.
const STATUS_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Calls `GetStatus` on a running coordinator.
pub async fn fetch_status(args: &StatusArgs) -> Result<StatusReport, CliError> {
    let err = |reason: String| CliError::Connect { addr: args.addr.clone(), reason };
    let tls = args
        .ca
        .as_deref()
        .map(|ca| {
            let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
            endpoint::client_tls(&args.addr, &TlsOptions { ca, domain: args.tls_domain.as_deref(), identity })
        })
        .transpose()
        .map_err(|e| err(e.to_string()))?;
    let endpoint =
        endpoint::endpoint(&args.addr, tls, STATUS_CONNECT_TIMEOUT).map_err(|e| err(e.to_string()))?;
    let channel = endpoint.connect().await.map_err(|e| err(e.to_string()))?;
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut request = tonic::Request::new(pb::GetStatusRequest { recent_rounds: args.recent });
    if let Some(path) = args.operator_token_path() {
        let token = OperatorToken::load(&path)?;
        let value = bearer_metadata(token.expose_secret())
            .ok_or_else(|| CliError::NotFound(format!("{} does not hold a token", path.display())))?;
        request.metadata_mut().insert(AUTHORIZATION, value);
    }
    let resp = client.get_status(request).await.map_err(|s| err(format!("{}: {}", s.code(), s.message())))?;
    StatusReport::try_from(resp.into_inner()).map_err(|e| err(e.to_string()))
}

fn fmt_f(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.4}")
    }
}

/// Human-readable status.
pub fn render_status(s: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "phase {}  round {} (attempt {})  model v{}  of {} rounds  strategy {}",
        s.phase, s.round.round, s.round.attempt, s.model_version.0, s.total_rounds, s.strategy
    );
    let _ = writeln!(out, "privacy: {}", s.privacy.guarantee);
    if s.privacy.evaluation_outside_guarantee {
        let _ = writeln!(
            out,
            "evaluation (eval_loss, eval_acc*): {}: un-noised figures on the clients' data \
             (evaluation.enabled_under_dp = true)",
            PrivacyStatus::EVALUATION_OUTSIDE
        );
    }
    if let Some(reason) = &s.finished_reason {
        let _ = writeln!(out, "finished: {reason}");
    }
    if let Some(d) = s.deadline_in {
        let _ = writeln!(
            out,
            "deadline in {:.1}s, {} updates accepted so far",
            d.as_secs_f64(),
            s.accepted_updates
        );
    }
    let alive = s.clients.iter().filter(|c| c.alive).count();
    let _ = writeln!(out, "\nclients: {alive} alive of {}", s.clients.len());
    for c in &s.clients {
        let _ = writeln!(
            out,
            "  {:<24} {:<5} {:<11} seen {:>7.1}s ago  rounds {}",
            c.client_id.to_string(),
            if c.alive { "alive" } else { "gone" },
            c.activity.to_string(),
            c.last_seen_ago.as_secs_f64(),
            c.rounds_contributed
        );
    }
    // `*`: the evaluation columns are outside the privacy guarantee (the line above says so).
    let mark = if s.privacy.evaluation_outside_guarantee { "*" } else { " " };
    let _ = writeln!(
        out,
        "\nround attempt status     sel acc fail  examples  train_loss  eval_loss{mark} eval_acc{mark} secs"
    );
    for r in &s.recent_rounds {
        let _ = writeln!(
            out,
            "{:>5} {:>7} {:<10} {:>3} {:>3} {:>4} {:>9} {:>11} {:>10} {:>9} {:>5.1}{}{}",
            r.id.round,
            r.id.attempt,
            r.status,
            r.selected,
            r.accepted,
            r.failed,
            r.total_examples,
            fmt_f(r.train_loss),
            fmt_f(r.eval_loss),
            fmt_f(r.eval_accuracy),
            r.duration.as_secs_f64(),
            secure_cell(r),
            if r.reason.is_empty() { String::new() } else { format!("  ({})", r.reason) }
        );
    }
    out
}

/// A secure attempt's figures after its row: `SecAgg+ t=3 k=4 survivors 4/5` (its survivors are
/// its accepted updates); nothing for a plain round.
fn secure_cell(r: &RoundSummary) -> String {
    r.secure.map_or_else(String::new, |f| {
        format!("  SecAgg+ t={} k={} survivors {}/{}", f.threshold, f.degree, r.accepted, f.clients)
    })
}

/// JSON status (for scripts).
pub fn status_json(s: &StatusReport) -> serde_json::Value {
    let num = |v: f64| if v.is_nan() { serde_json::Value::Null } else { serde_json::json!(v) };
    serde_json::json!({
        "phase": s.phase,
        "round": s.round.round,
        "attempt": s.round.attempt,
        "model_version": s.model_version.0,
        "total_rounds": s.total_rounds,
        "strategy": s.strategy,
        "deadline_in_ms": s.deadline_in.map(|d| d.as_millis() as u64),
        "accepted_updates": s.accepted_updates,
        "finished_reason": s.finished_reason,
        "privacy": {
            "mode": s.privacy.mode,
            "guarantee": s.privacy.guarantee,
            "epsilon": s.privacy.epsilon,
            "delta": s.privacy.delta,
            "target_epsilon": s.privacy.target_epsilon,
            "noise_multiplier": s.privacy.noise_multiplier,
            "clip_norm": s.privacy.clip_norm,
            "sampling": s.privacy.sampling,
            "rounds_charged": s.privacy.rounds_charged,
            "central_epsilon": s.privacy.epsilon,
            "local_epsilon": s.privacy.local_epsilon,
            "max_participations": s.privacy.max_participations,
            "evaluation_outside_guarantee": s.privacy.evaluation_outside_guarantee,
        },
        "clients": s.clients.iter().map(|c| serde_json::json!({
            "client_id": c.client_id.as_str(),
            "alive": c.alive,
            "last_seen_ms_ago": c.last_seen_ago.as_millis() as u64,
            "activity": c.activity,
            "rounds_contributed": c.rounds_contributed,
        })).collect::<Vec<_>>(),
        "recent_rounds": s.recent_rounds.iter().map(|r| serde_json::json!({
            "round": r.id.round,
            "attempt": r.id.attempt,
            "status": r.status,
            "selected": r.selected,
            "accepted": r.accepted,
            "failed": r.failed,
            "total_examples": r.total_examples,
            "train_loss": num(r.train_loss),
            "eval_loss": num(r.eval_loss),
            "eval_accuracy": num(r.eval_accuracy),
            "eval_examples": r.eval_examples,
            "duration_ms": r.duration.as_millis() as u64,
            "reason": r.reason,
            "epsilon": r.epsilon,
            "local_epsilon": r.local_epsilon,
            "secure_aggregation": r.secure.map(|f| serde_json::json!({
                "clients": f.clients,
                "threshold": f.threshold,
                "degree": f.degree,
                "survivors": r.accepted,
            })),
        })).collect::<Vec<_>>(),
    })
}

/// Exports the model after round `args.round`; returns the files written.
pub fn export(args: &ExportArgs) -> Result<Vec<PathBuf>, CliError> {
    let store = Storage::open_existing(&args.state_dir)?;
    let version = ModelVersion(args.round);
    let (row, labels, init_dir, adapter) = store.call_sync(|c| {
        Ok((
            storage::checkpoint_of(c, version)?,
            storage::meta_get(c, "labels")?,
            storage::meta_get(c, "init_dir")?,
            storage::meta_get(c, model::ADAPTER_META_KEY)?,
        ))
    })?;
    let lora = model::recorded_adapter(adapter.as_deref()).map_err(CliError::NotFound)?;
    let row = row.ok_or_else(|| {
        CliError::NotFound(format!(
            "no checkpoint for round {} in {} (not completed yet, or pruned)",
            args.round,
            args.state_dir.display()
        ))
    })?;
    let labels: Vec<String> = labels
        .and_then(|l| serde_json::from_str(&l).ok())
        .ok_or_else(|| CliError::NotFound("the state directory records no labels".into()))?;
    let init_dir =
        args.init_dir.clone().or(init_dir.map(PathBuf::from)).ok_or_else(|| {
            CliError::NotFound("no initial model directory recorded; pass --init-dir".into())
        })?;
    let params = ParameterVector::load_safetensors(&row.path, |_| true).map_err(ModelError::from)?;
    Ok(model::export_hf(&params, &labels, &init_dir, &args.out, lora.as_ref())?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fedtune_shared::ids::RoundId;
    use fedtune_shared::round::PhaseName;

    use super::*;

    fn report(outside: bool) -> StatusReport {
        StatusReport {
            protocol_version: 1,
            phase: PhaseName::Finished,
            round: RoundId::new(1, 0),
            model_version: ModelVersion(1),
            total_rounds: 1,
            strategy: "fedavg".into(),
            deadline_in: None,
            clients: vec![],
            recent_rounds: vec![RoundSummary {
                id: RoundId::new(1, 0),
                status: "completed".into(),
                selected: 2,
                accepted: 2,
                failed: 0,
                total_examples: 2,
                train_loss: f64::NAN,
                eval_loss: 0.5,
                eval_accuracy: 0.75,
                eval_examples: 10,
                duration: Duration::from_secs(1),
                reason: String::new(),
                bytes_sent: 0,
                bytes_received: 0,
                epsilon: Some(1.5),
                local_epsilon: Some(4.0),
                secure: None,
            }],
            accepted_updates: 0,
            privacy: PrivacyStatus {
                mode: "local".into(),
                guarantee: "(ε = 1.5, δ = 1e-5) …".into(),
                delta: 1e-5,
                epsilon: 1.5,
                local_epsilon: Some(4.0),
                max_participations: 1,
                evaluation_outside_guarantee: outside,
                ..PrivacyStatus::none()
            },
            finished_reason: None,
        }
    }

    #[test]
    fn status_text_labels_evaluation_under_dp_outside_the_privacy_guarantee() {
        let text = render_status(&report(true));
        assert!(text.contains("evaluation (eval_loss, eval_acc*): outside the privacy guarantee"), "{text}");
        assert!(text.contains("eval_loss* eval_acc*"), "{text}");
        let plain = render_status(&report(false));
        assert!(!plain.contains("outside the privacy guarantee") && !plain.contains("eval_acc*"), "{plain}");
    }

    #[test]
    fn status_json_flags_evaluation_outside_the_guarantee_and_carries_both_epsilons_per_round() {
        let v = status_json(&report(true));
        assert_eq!(v["privacy"]["evaluation_outside_guarantee"], true);
        assert_eq!(v["recent_rounds"][0]["epsilon"], 1.5);
        assert_eq!(v["recent_rounds"][0]["local_epsilon"], 4.0);
        assert_eq!(status_json(&report(false))["privacy"]["evaluation_outside_guarantee"], false);
    }

    #[test]
    fn status_text_and_json_show_a_secure_rounds_threshold_degree_and_survivors_and_nothing_for_plain_ones() {
        let mut secure = report(false);
        secure.recent_rounds[0].secure =
            Some(fedtune_shared::round::SecureRoundFigures { clients: 3, threshold: 2, degree: 2 });
        let text = render_status(&secure);
        assert!(text.contains("SecAgg+ t=2 k=2 survivors 2/3"), "{text}");
        assert!(!render_status(&report(false)).contains("SecAgg+"));
        let v = status_json(&secure);
        let figures = &v["recent_rounds"][0]["secure_aggregation"];
        assert_eq!((figures["threshold"].as_u64(), figures["degree"].as_u64()), (Some(2), Some(2)));
        assert_eq!((figures["survivors"].as_u64(), figures["clients"].as_u64()), (Some(2), Some(3)));
        assert!(status_json(&report(false))["recent_rounds"][0]["secure_aggregation"].is_null());
    }
}
