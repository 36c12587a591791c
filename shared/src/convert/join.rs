//! Join: opening a session.

use super::*;

impl TryFrom<pb::JoinRequest> for JoinRequest {
    type Error = ConvertError;
    fn try_from(r: pb::JoinRequest) -> Result<Self, ConvertError> {
        let name = if r.client_name.is_empty() { None } else { Some(ClientId::parse(&r.client_name)?) };
        let public_key = if r.public_key.is_empty() {
            None
        } else {
            Some(<[u8; 32]>::try_from(r.public_key.as_ref()).map_err(|_| {
                invalid("public_key", format!("an Ed25519 key has 32 bytes, got {}", r.public_key.len()))
            })?)
        };
        if r.agent_version.len() > 128 {
            return Err(invalid("agent_version", "longer than 128 bytes"));
        }
        Ok(JoinRequest {
            protocol_version: r.protocol_version,
            name,
            public_key,
            train_examples: r.train_examples,
            eval_examples: r.eval_examples,
            agent_version: r.agent_version,
        })
    }
}

impl From<JoinRequest> for pb::JoinRequest {
    fn from(r: JoinRequest) -> Self {
        pb::JoinRequest {
            protocol_version: r.protocol_version,
            client_name: r.name.map(String::from).unwrap_or_default(),
            public_key: r.public_key.map(|k| k.to_vec()).unwrap_or_default().into(),
            train_examples: r.train_examples,
            eval_examples: r.eval_examples,
            agent_version: r.agent_version,
            // The join proof is attached by `crate::auth::JoinProof::attach`, not part of the
            // domain request: it is produced per attempt, after a challenge round trip.
            ..Default::default()
        }
    }
}

impl TryFrom<pb::JoinResponse> for JoinResponse {
    type Error = ConvertError;
    fn try_from(r: pb::JoinResponse) -> Result<Self, ConvertError> {
        let limits = r.limits.ok_or(ConvertError::Missing("limits"))?;
        if limits.max_chunk_bytes == 0 || limits.max_message_bytes < limits.max_chunk_bytes {
            return Err(invalid("limits", "chunk limit must be positive and fit in a message"));
        }
        if !crate::limits::is_valid_value_bound(limits.max_abs_update_value) {
            return Err(invalid(
                "limits.max_abs_update_value",
                format!(
                    "{} is not a usable bound on update values (a finite, positive number); a coordinator \
                     that does not advertise one speaks an older protocol revision",
                    limits.max_abs_update_value
                ),
            ));
        }
        if r.session_token.is_empty() {
            return Err(ConvertError::Missing("session_token"));
        }
        Ok(JoinResponse {
            client_id: ClientId::parse(&r.client_id)?,
            session_token: r.session_token,
            protocol_version: r.protocol_version,
            heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
            liveness_timeout: Duration::from_millis(r.liveness_timeout_ms),
            model: r.model.ok_or(ConvertError::Missing("model"))?.try_into()?,
            trainable_manifest: r
                .trainable_manifest
                .ok_or(ConvertError::Missing("trainable_manifest"))?
                .try_into()?,
            limits: Limits {
                max_message_bytes: limits.max_message_bytes,
                max_chunk_bytes: limits.max_chunk_bytes,
                default_chunk_bytes: limits.default_chunk_bytes,
                max_abs_update_value: limits.max_abs_update_value,
            },
            labels: r.labels.map(|l| l.names).unwrap_or_default(),
            adapter: r.adapter.map(AdapterSpec::try_from).transpose()?,
            init_seed: r.init_seed,
        })
    }
}

impl TryFrom<pb::LoraAdapter> for AdapterSpec {
    type Error = ConvertError;
    fn try_from(a: pb::LoraAdapter) -> Result<Self, ConvertError> {
        let lora = crate::bert::lora::LoraConfig {
            rank: a.rank as usize,
            alpha: a.alpha,
            dropout: a.dropout,
            target_modules: a.target_modules,
            seed: a.seed,
        };
        if let Err(e) = lora.validate() {
            return Err(invalid("adapter", e.to_string()));
        }
        let a_digest = <[u8; 32]>::try_from(a.a_sha256.as_ref()).map_err(|_| {
            invalid("adapter.a_sha256", format!("a SHA-256 has 32 bytes, got {}", a.a_sha256.len()))
        })?;
        Ok(AdapterSpec { lora, a_digest })
    }
}

impl From<AdapterSpec> for pb::LoraAdapter {
    fn from(a: AdapterSpec) -> Self {
        pb::LoraAdapter {
            rank: a.lora.rank as u32,
            alpha: a.lora.alpha,
            dropout: a.lora.dropout,
            target_modules: a.lora.target_modules,
            seed: a.lora.seed,
            a_sha256: a.a_digest.to_vec().into(),
        }
    }
}

impl From<JoinResponse> for pb::JoinResponse {
    fn from(r: JoinResponse) -> Self {
        pb::JoinResponse {
            client_id: r.client_id.into(),
            session_token: r.session_token,
            protocol_version: r.protocol_version,
            heartbeat_interval_ms: ms(r.heartbeat_interval),
            liveness_timeout_ms: ms(r.liveness_timeout),
            model: Some(r.model.into()),
            trainable_manifest: Some((&r.trainable_manifest).into()),
            limits: Some(pb::Limits {
                max_message_bytes: r.limits.max_message_bytes,
                max_chunk_bytes: r.limits.max_chunk_bytes,
                default_chunk_bytes: r.limits.default_chunk_bytes,
                max_abs_update_value: r.limits.max_abs_update_value,
            }),
            labels: Some(pb::LabelSet { names: r.labels }),
            adapter: r.adapter.map(Into::into),
            init_seed: r.init_seed,
            // Set by the coordinator's join handler, which knows the federation.
            federation_id: String::new(),
        }
    }
}
