//! Shared by the coordinator benchmarks: a 22.7M-parameter BERT-shaped checkpoint (the shape of
//! a 6-layer, 384-wide MiniLM) and a minimal protocol client on the generated stubs.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use fedtune_coordinator::auth::allowlist::Allowlist;
use fedtune_shared::auth::{bearer_metadata, sign_upload, ChallengeGrant, JoinProof, AUTHORIZATION};
use fedtune_shared::chunk::{DEFAULT_CHUNK_BYTES, MAX_MESSAGE_BYTES};
use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::{ClientId, Sha256};
use fedtune_shared::params::{Manifest, ParameterVector, TensorSpec};
use fedtune_shared::pb::{self, coordinator_client::CoordinatorClient};
use fedtune_shared::round::{
    Chunk, FitTask, JoinRequest, JoinResponse, Task, UpdateHeader, UpdateTrailer, UploadAdmission,
    UploadItem, UploadReservation,
};
use tonic::transport::Channel;
use tonic::Request;

/// Writes `model.safetensors` + `config.json` of a 6-layer, 384-wide BERT (vocabulary 30522):
/// 22.7M parameters with pooler and a 2-label classifier.
pub fn write_minilm_like(dir: &Path) -> PathBuf {
    write_bert_like(
        dir,
        BertShape { hidden: 384, intermediate: 1536, layers: 6, vocab: 30522, positions: 512 },
    )
}

/// The sizes of a generated BERT-shaped checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct BertShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub vocab: usize,
    pub positions: usize,
}

/// Writes `model.safetensors` + `config.json` of a BERT of `shape` with pooler and a 2-label
/// classifier (deterministic small weights: no training happens in the benchmarks).
pub fn write_bert_like(dir: &Path, shape: BertShape) -> PathBuf {
    std::fs::create_dir_all(dir).expect("model dir");
    let BertShape { hidden: h, intermediate: inter, layers, vocab, positions } = shape;
    let mut specs = vec![
        TensorSpec { name: "bert.embeddings.word_embeddings.weight".into(), shape: vec![vocab, h] },
        TensorSpec { name: "bert.embeddings.position_embeddings.weight".into(), shape: vec![positions, h] },
        TensorSpec { name: "bert.embeddings.token_type_embeddings.weight".into(), shape: vec![2, h] },
        TensorSpec { name: "bert.embeddings.LayerNorm.weight".into(), shape: vec![h] },
        TensorSpec { name: "bert.embeddings.LayerNorm.bias".into(), shape: vec![h] },
    ];
    for l in 0..layers {
        let p = format!("bert.encoder.layer.{l}");
        for m in
            ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
        {
            specs.push(TensorSpec { name: format!("{p}.{m}.weight"), shape: vec![h, h] });
            specs.push(TensorSpec { name: format!("{p}.{m}.bias"), shape: vec![h] });
        }
        specs.push(TensorSpec { name: format!("{p}.attention.output.LayerNorm.weight"), shape: vec![h] });
        specs.push(TensorSpec { name: format!("{p}.attention.output.LayerNorm.bias"), shape: vec![h] });
        specs.push(TensorSpec { name: format!("{p}.intermediate.dense.weight"), shape: vec![inter, h] });
        specs.push(TensorSpec { name: format!("{p}.intermediate.dense.bias"), shape: vec![inter] });
        specs.push(TensorSpec { name: format!("{p}.output.dense.weight"), shape: vec![h, inter] });
        specs.push(TensorSpec { name: format!("{p}.output.dense.bias"), shape: vec![h] });
        specs.push(TensorSpec { name: format!("{p}.output.LayerNorm.weight"), shape: vec![h] });
        specs.push(TensorSpec { name: format!("{p}.output.LayerNorm.bias"), shape: vec![h] });
    }
    specs.push(TensorSpec { name: "bert.pooler.dense.weight".into(), shape: vec![h, h] });
    specs.push(TensorSpec { name: "bert.pooler.dense.bias".into(), shape: vec![h] });
    specs.push(TensorSpec { name: "classifier.weight".into(), shape: vec![2, h] });
    specs.push(TensorSpec { name: "classifier.bias".into(), shape: vec![2] });
    let m = Manifest::new(specs).expect("unique names");
    let n = m.numel();
    let values = (0..n).map(|i| ((i % 1999) as f32 - 999.0) * 2e-5).collect();
    ParameterVector::new(m, values)
        .expect("sizes")
        .save_safetensors(&dir.join("model.safetensors"))
        .expect("save");
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"model_type": "bert", "hidden_size": {h}, "num_hidden_layers": {layers}, "intermediate_size": {inter}, "vocab_size": {vocab}, "max_position_embeddings": {positions}, "id2label": {{"0": "neg", "1": "pos"}}}}"#),
    )
    .expect("config");
    dir.to_path_buf()
}

/// A fresh Ed25519 identity for `name`, put on the allowlist of `state_dir` (works before the
/// coordinator starts: the allowlist lives in the state database).
pub fn enroll(state_dir: &Path, name: &str) -> KeyPair {
    let key = KeyPair::generate_ephemeral().expect("key");
    Allowlist::open(state_dir)
        .expect("allowlist")
        .add(&ClientId::parse(name).expect("name"), &key.public_key())
        .expect("allowlist add");
    key
}

/// A joined protocol client.
#[derive(Debug)]
pub struct Client {
    pub inner: CoordinatorClient<Channel>,
    pub token: String,
    pub joined: JoinResponse,
    key: KeyPair,
    federation_id: String,
}

pub async fn connect(url: &str) -> CoordinatorClient<Channel> {
    for _ in 0..200 {
        if let Ok(c) = CoordinatorClient::connect(url.to_string()).await {
            return c
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("coordinator at {url} did not come up");
}

impl Client {
    /// JoinChallenge, sign with `key`, Join.
    pub async fn join(url: &str, name: &str, key: KeyPair) -> Self {
        let mut inner = connect(url).await;
        let id = ClientId::parse(name).expect("name");
        let grant = inner
            .join_challenge(pb::JoinChallengeRequest { client_name: name.to_string() })
            .await
            .expect("challenge")
            .into_inner();
        let grant = ChallengeGrant::try_from(grant).expect("grant");
        let req = JoinRequest {
            protocol_version: pb::PROTOCOL_VERSION,
            name: Some(id.clone()),
            public_key: None,
            train_examples: 100,
            eval_examples: 0,
            agent_version: "bench".into(),
        };
        let mut wire = pb::JoinRequest::from(req);
        JoinProof::answer(&key, &grant, &id).attach(&mut wire);
        let resp = inner.join(wire).await.expect("join").into_inner();
        let federation_id = resp.federation_id.clone();
        let joined = JoinResponse::try_from(resp).expect("join response");
        Self { inner, token: joined.session_token.clone(), joined, key, federation_id }
    }

    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(AUTHORIZATION, bearer_metadata(&self.token).expect("ascii"));
        r
    }

    pub async fn fit_task(&mut self) -> FitTask {
        loop {
            let r = self.req(pb::WaitForTaskRequest { max_wait_ms: 1000 });
            let t = self.inner.wait_for_task(r).await.expect("poll").into_inner();
            if let Task::Fit(f) = Task::try_from(t).expect("task") {
                return f;
            }
        }
    }

    /// Uploads `payload` (shared, sliced without copying) for `task`.
    pub async fn upload(&mut self, task: &FitTask, payload: Bytes, digest: Sha256) {
        let header = UpdateHeader {
            id: task.id,
            base_version: task.model.version,
            num_examples: 10,
            metrics: Default::default(),
            manifest_digest: Sha256(self.joined.trainable_manifest.digest()),
            total_bytes: payload.len() as u64,
            encoding: Default::default(),
        };
        let mut items: Vec<pb::UploadUpdateRequest> = vec![UploadItem::Header(header.clone()).into()];
        let mut at = 0;
        while at < payload.len() {
            let end = (at + DEFAULT_CHUNK_BYTES).min(payload.len());
            items.push(UploadItem::Chunk(Chunk { offset: at as u64, data: payload.slice(at..end) }).into());
            at = end;
        }
        let signature = sign_upload(&self.key, &self.federation_id, &self.joined.client_id, &header, &digest);
        items.push(
            UploadItem::Trailer(UpdateTrailer { payload_digest: digest, signature: Some(signature) }).into(),
        );
        // A slot first, as every uploader does (one client at a time here: granted at once).
        let ask = UploadReservation { id: task.id, max_wait: Duration::from_secs(20) };
        let reply =
            self.inner.reserve_upload(self.req(pb::ReserveUploadRequest::from(ask))).await.expect("reserve");
        let admission = UploadAdmission::try_from(reply.into_inner()).expect("admission");
        assert!(matches!(admission, UploadAdmission::Granted { .. }), "{admission:?}");
        let r = self.req(tokio_stream::iter(items));
        self.inner.upload_update(r).await.expect("upload");
    }

    pub async fn status(&mut self) -> pb::GetStatusResponse {
        status(&mut self.inner).await
    }
}

/// `GetStatus` (needs no session).
pub async fn status(inner: &mut CoordinatorClient<Channel>) -> pb::GetStatusResponse {
    inner.get_status(pb::GetStatusRequest { recent_rounds: 1 }).await.expect("status").into_inner()
}

/// Starts `binary serve --config config` as its own process (a benchmark measures it from
/// outside), logging warnings and worse to `log`.
pub fn spawn_serve(binary: &Path, config: &Path, log: &Path) -> std::process::Child {
    let log = std::fs::File::create(log).expect("log");
    std::process::Command::new(binary)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log))
        .spawn()
        .expect("spawn coordinator")
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}
