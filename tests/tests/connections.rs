//! No peer exhausts the coordinator's connections: one address gets at most its share, sockets
//! that never complete a handshake are closed, and healthy connections are never cut for
//! being quiet — all over real TCP and gRPC.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use fedtune_coordinator::CoordinatorSettings;
use fedtune_shared::round::Task;
use fedtune_tests::fixtures::{quick_settings, write_fake_model};
use fedtune_tests::grpc::{InProcess, TestClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// A coordinator whose first round waits for two clients (so a single client's long poll waits).
fn settings(dir: &Path) -> Result<CoordinatorSettings> {
    let model = write_fake_model(&dir.join("model"), 2, 8)?;
    let mut s = quick_settings(&dir.join("state"), &model, 1, 2, 2);
    s.evaluation.every = 0;
    Ok(s)
}

fn addr_of(url: &str) -> Result<SocketAddr> {
    Ok(url.trim_start_matches("http://").parse()?)
}

/// Waits until the peer closes `stream` (EOF or reset), within `within`.
async fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> Result<()> {
    let mut buf = [0u8; 64];
    let until = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => bail!("the coordinator kept the connection open for {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            // Whatever the server sent first (HTTP/2 settings): keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_address_limit_are_closed_and_others_still_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path())?;
    s.security.limits.max_connections_per_address = 3;
    // The held sockets below stay silent; only the limit may close anything here.
    s.server.handshake_timeout = Duration::from_secs(120);
    let coord = InProcess::start(s).await?;
    let addr = addr_of(&coord.url)?;

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await?);
    }
    // Accepted in order: the fourth from the same address finds it full and is closed at once.
    let mut fourth = TcpStream::connect(addr).await?;
    closed_by_peer(&mut fourth, WAIT).await?;
    let same_address = async { TestClient::connect(&coord.url).await?.status().await };
    assert!(same_address.await.is_err(), "a gRPC client at the full address is refused too");

    // Another address is served meanwhile.
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut neighbour = TestClient::connect_from(&coord.url, other).await?;
    neighbour.status().await?;

    // Closing one held socket gives its place back.
    drop(held.pop());
    let until = Instant::now() + WAIT;
    loop {
        match async { TestClient::connect(&coord.url).await?.status().await }.await {
            Ok(_) => break,
            Err(e) if Instant::now() >= until => bail!("the address stayed full after a close: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    drop(held);
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tcp_connection_is_closed_after_the_handshake_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path())?;
    s.server.handshake_timeout = Duration::from_secs(1);
    s.server.connection_idle_timeout = Duration::from_secs(600);
    let coord = InProcess::start(s).await?;

    let started = Instant::now();
    let mut silent = TcpStream::connect(addr_of(&coord.url)?).await?;
    closed_by_peer(&mut silent, WAIT).await?;
    assert!(started.elapsed() >= Duration::from_secs(1), "closed before its handshake time was up");

    // A client that completes its handshake and calls is served on a connection older than
    // the bound.
    let mut c = TestClient::connect(&coord.url).await?;
    c.status().await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.status().await?;
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_trickling_its_preface_is_closed_at_the_handshake_timeout_though_never_idle(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path())?;
    s.server.handshake_timeout = Duration::from_secs(1);
    s.server.connection_idle_timeout = Duration::from_secs(600);
    let coord = InProcess::start(s).await?;

    let stream = TcpStream::connect(addr_of(&coord.url)?).await?;
    let (mut r, mut w) = stream.into_split();
    // The HTTP/2 client preface, one byte every 300 ms: never silent, never done (7.2 s).
    let step = Duration::from_millis(300);
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let trickle = tokio::spawn(async move {
        for b in preface {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(step).await;
        }
        // Then hold the socket open without a request.
        tokio::time::sleep(WAIT).await;
    });
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(WAIT, r.read(&mut buf)).await? {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(
        started.elapsed() < step * preface.len() as u32,
        "closed only after {:?}, when the trickle ended",
        started.elapsed()
    );
    trickle.abort();
    coord.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_outlasting_the_connection_idle_timeout_is_answered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path())?;
    // The client sends nothing during its long poll and the server nothing until it answers:
    // only the server's keepalive pings (every third of the idle bound) and their answers
    // cross the connection.
    s.server.connection_idle_timeout = Duration::from_secs(1);
    s.server.long_poll = Duration::from_secs(4);
    s.server.request_timeout = Duration::from_secs(10);
    s.clients.liveness_timeout = Duration::from_secs(30);
    let coord = InProcess::start(s).await?;
    let mut c = TestClient::join(&coord.url, "patient", 0).await?;

    let started = Instant::now();
    let task = c.poll(Duration::from_secs(4)).await?;
    assert!(matches!(task, Task::None { .. }), "no round runs with one client: {task:?}");
    assert!(started.elapsed() >= Duration::from_secs(3), "the poll must have outlasted the idle bound");
    c.status().await?;
    coord.shutdown().await?;
    Ok(())
}

/// Forwards one connection to `to`; once `freeze` is cancelled, nothing more from the client
/// reaches the server (the sockets stay open). Returns when the server closed its side.
async fn freezing_proxy(listener: TcpListener, to: SocketAddr, freeze: CancellationToken) -> Result<()> {
    let (down, _) = listener.accept().await?;
    let up = TcpStream::connect(to).await?;
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = up.into_split();
    let client_to_server = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = tokio::select! {
                _ = freeze.cancelled() => break,
                n = down_r.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
            };
            if up_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
        // Frozen: hold the write half (no FIN) until the test ends.
        tokio::time::sleep(WAIT * 3).await;
        drop(up_w);
    });
    // Server to client until the server closes.
    let _ = tokio::io::copy(&mut up_r, &mut down_w).await;
    client_to_server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_peer_falls_silent_is_closed_after_the_idle_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path())?;
    s.server.connection_idle_timeout = Duration::from_secs(1);
    let coord = InProcess::start(s).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let freeze = CancellationToken::new();
    let proxy = tokio::spawn(freezing_proxy(listener, addr_of(&coord.url)?, freeze.clone()));

    let mut c = TestClient::connect(&url).await?;
    c.status_as(None).await?;
    // Quiet but alive, it outlasts the bound several times over.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.status_as(None).await?;
    assert!(!proxy.is_finished(), "a live connection was closed");

    // Now the peer answers nothing, not even pings: the coordinator hangs up.
    freeze.cancel();
    tokio::time::timeout(WAIT, proxy).await???;
    coord.shutdown().await?;
    Ok(())
}
