//! Model download over loopback gRPC (the real coordinator's `DownloadModel` stream, digest
//! checked) against a raw TCP copy of the same bytes, in the same run.
//!
//! `cargo bench -p fedtune-coordinator --bench download`

mod common;

use std::time::Duration;

use common::{enroll, write_minilm_like, Client};
use fedtune_coordinator::CoordinatorSettings;
use fedtune_shared::chunk::Sha256Stream;
use fedtune_shared::ids::ModelVersion;
use fedtune_shared::pb;
use fedtune_shared::round::{DownloadItem, DownloadRequest, ModelScope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const ROUNDS: usize = 3;

async fn grpc_download(c: &mut Client) -> (u64, f64) {
    let start = Instant::now();
    let r = c.req(pb::DownloadModelRequest::from(DownloadRequest {
        version: ModelVersion(0),
        scope: ModelScope::Full,
        offset: 0,
        max_chunk_bytes: None,
        base_version: None,
    }));
    let mut stream = c.inner.download_model(r).await.expect("download").into_inner();
    let mut hasher = Sha256Stream::default();
    let mut total = 0u64;
    let mut expected = None;
    while let Some(msg) = stream.message().await.expect("stream") {
        match DownloadItem::try_from(msg).expect("item") {
            DownloadItem::Header(h) => expected = Some(h.payload_digest),
            DownloadItem::Chunk(ch) => {
                hasher.update(&ch.data);
                total += ch.data.len() as u64;
            }
        }
    }
    assert_eq!(Some(hasher.finish()), expected, "digest");
    (total, start.elapsed().as_secs_f64())
}

async fn raw_tcp_copy(payload: &'static [u8]) -> (u64, f64) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.set_nodelay(true).expect("nodelay");
        for chunk in payload.chunks(1 << 20) {
            s.write_all(chunk).await.expect("write");
        }
    });
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = Sha256Stream::default();
    let mut total = 0u64;
    loop {
        let k = s.read(&mut buf).await.expect("read");
        if k == 0 {
            break;
        }
        // Hash on the receiving side too, so both paths do the same verification work.
        hasher.update(&buf[..k]);
        total += k as u64;
    }
    std::hint::black_box(hasher.finish());
    server.await.expect("server");
    (total, start.elapsed().as_secs_f64())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = write_minilm_like(&dir.path().join("model"));
        let mut settings = CoordinatorSettings::with_paths(dir.path().join("state"), &model);
        settings.rounds.min_available = 1000; // never start a round: only downloads here
        settings.rounds.min_fit = 1;
        settings.security.insecure = true;
        let key = enroll(&settings.storage.state_dir, "bench");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let server = tokio::spawn(fedtune_coordinator::run(settings, listener, stop.clone()));
        let mut c = Client::join(&url, "bench", key).await;
        let bytes = fedtune_shared::params::ParameterVector::load_safetensors(
            &model.join("model.safetensors"),
            |_| true,
        )
        .expect("model")
        .to_le_bytes();
        let payload: &'static [u8] = Box::leak(bytes.into_boxed_slice());

        let mut grpc = f64::INFINITY;
        let mut tcp = f64::INFINITY;
        let mut size = 0;
        for _ in 0..ROUNDS {
            let (n, t) = grpc_download(&mut c).await;
            size = n;
            grpc = grpc.min(t);
            let (m, t) = raw_tcp_copy(payload).await;
            assert_eq!(m, n, "both paths move the same bytes");
            tcp = tcp.min(t);
        }
        let mbps = |t: f64| size as f64 / t / 1e6;
        println!(
            "model download over loopback: {:.1} MB (full model, 1 MiB chunks), best of {ROUNDS}",
            size as f64 / 1e6
        );
        println!("  gRPC DownloadModel stream:  {:>8.0} MB/s", mbps(grpc));
        println!("  raw TCP copy, same bytes:   {:>8.0} MB/s", mbps(tcp));
        println!("  gRPC / raw TCP:             {:>8.2}", tcp / grpc);
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    });
}
