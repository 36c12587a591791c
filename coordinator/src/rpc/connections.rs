//! Connections: admitted per address and in all, each bounded in time before and after its
//! handshake.
//!
//! Limits on calls ([`crate::auth::Limits`]) act only once a connection carries requests. A
//! peer that opens thousands of TCP connections, or opens one and never speaks, costs the
//! coordinator a socket, a task and (under TLS) a handshake buffer each without ever making a
//! call. Here, below TLS and HTTP/2:
//!
//! - [`Connections::incoming`] wraps the accepted sockets: a connection beyond
//!   `security.limits.max_connections_per_address` from its IP address, or beyond
//!   `security.limits.max_connections` in all, is closed at once (never queued, never handed to
//!   TLS), and refusals are logged at most once per [`REFUSAL_LOG_EVERY`] with their count.
//! - Each admitted socket is a [`TrackedIo`]: it gives its place back when it is dropped, and its
//!   reads fail with `TimedOut` once the connection has not completed its handshake (TLS, the
//!   HTTP/2 preface and a first request) within `server.handshake_timeout`, or once the peer has
//!   sent no byte for `server.connection_idle_timeout`. Either error makes tonic drop the
//!   connection.
//! - [`MarkServed`] wraps the service and marks a connection's handshake complete at its first
//!   request: below TLS the bytes are ciphertext, so the request is the first point where the
//!   handshake is known to be over.
//!
//! Healthy idle connections are never cut: the server pings every [`keepalive_interval`] (less
//! than a third of the idle bound) and a live peer's acknowledgement is a read.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming, TlsConnectInfo};
use tracing::{debug, warn};

/// Refused connections are logged at most this often (with how many there were), so a flood
/// cannot turn into a flood of log lines.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Longest pause between HTTP/2 keepalive pings, whatever the idle bound.
const MAX_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Interval of the server's HTTP/2 keepalive pings for a connection idle bound of `idle`: at most
/// a third of it, so a live peer's acknowledgement (a read) always arrives well before the bound
/// even if one ping is slow, and at most [`MAX_KEEPALIVE_INTERVAL`].
pub fn keepalive_interval(idle: Duration) -> Duration {
    (idle / 3).min(MAX_KEEPALIVE_INTERVAL)
}

/// What the connection admission enforces (from `security.limits` and `server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once from one IP address.
    pub per_address: usize,
    /// Connections open at once in all.
    pub total: usize,
    /// Longest a connection may take from accept to its first request.
    pub handshake_timeout: Duration,
    /// Longest a connection may go without a byte from its peer.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits configured in `settings`.
    pub fn from_settings(settings: &crate::settings::CoordinatorSettings) -> Self {
        Self {
            per_address: settings.security.limits.max_connections_per_address,
            total: settings.security.limits.max_connections,
            handshake_timeout: settings.server.handshake_timeout,
            idle_timeout: settings.server.connection_idle_timeout,
        }
    }
}

/// Open connections, counted per address and in all.
#[derive(Debug, Default)]
struct Table {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
    /// Whether each open connection has completed its handshake, by peer address (a live TCP
    /// connection's address and port are unique while it is open).
    handshakes: HashMap<SocketAddr, Arc<AtomicBool>>,
}

#[derive(Debug)]
struct Shared {
    limits: ConnectionLimits,
    table: Mutex<Table>,
    /// Refusals since the last warning, and when that was.
    refused: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

/// The coordinator's connection admission (see the module docs). Clones share one table.
#[derive(Debug, Clone)]
pub struct Connections {
    shared: Arc<Shared>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    PerAddress,
    Total,
}

impl Connections {
    /// Admission with `limits`.
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            shared: Arc::new(Shared {
                limits,
                table: Mutex::new(Table::default()),
                refused: AtomicU64::new(0),
                last_warning: Mutex::new(None),
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.shared.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open now, in all and from `ip`.
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let t = self.table();
        (t.total, t.by_ip.get(&ip.to_canonical()).copied().unwrap_or(0))
    }

    /// Admits `io` from `peer`, or `None` (and the caller closes it) when its address or the
    /// coordinator is at its limit.
    pub fn admit<IO>(&self, io: IO, peer: SocketAddr) -> Option<TrackedIo<IO>> {
        let ip = peer.ip().to_canonical();
        let limits = self.shared.limits;
        let handshake_done = Arc::new(AtomicBool::new(false));
        let refusal = {
            let mut t = self.table();
            let mine = t.by_ip.get(&ip).copied().unwrap_or(0);
            if t.total >= limits.total {
                Some(Refusal::Total)
            } else if mine >= limits.per_address {
                Some(Refusal::PerAddress)
            } else {
                t.total += 1;
                *t.by_ip.entry(ip).or_insert(0) += 1;
                t.handshakes.insert(peer, handshake_done.clone());
                None
            }
        };
        if let Some(r) = refusal {
            self.log_refusal(r, ip);
            return None;
        }
        let now = Instant::now();
        Some(TrackedIo {
            inner: io,
            handshake_done,
            handshake: Box::pin(tokio::time::sleep_until(now + limits.handshake_timeout)),
            idle: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            last_read: now,
            idle_timeout: limits.idle_timeout,
            _place: Place { connections: self.clone(), peer, ip },
        })
    }

    fn release(&self, peer: SocketAddr, ip: IpAddr) {
        let mut t = self.table();
        t.total -= 1;
        t.handshakes.remove(&peer);
        if let Some(n) = t.by_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                t.by_ip.remove(&ip);
            }
        }
    }

    /// Marks the connection from `peer` as past its handshake: from now on only the idle bound
    /// applies to it.
    pub fn mark_served(&self, peer: SocketAddr) {
        if let Some(done) = self.table().handshakes.get(&peer) {
            done.store(true, Ordering::Relaxed);
        }
    }

    fn log_refusal(&self, refusal: Refusal, ip: IpAddr) {
        let n = self.shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let mut last = self.shared.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY) {
            debug!(%ip, ?refusal, "connection refused");
            return;
        }
        *last = Some(now);
        self.shared.refused.fetch_sub(n, Ordering::Relaxed);
        let l = self.shared.limits;
        warn!(
            refused = n,
            latest_from = %ip,
            per_address = l.per_address,
            total = l.total,
            "closed new connections beyond security.limits.max_connections_per_address or \
             security.limits.max_connections (count since the last such warning)"
        );
    }

    /// The sockets `listener` accepts, with TCP keepalive and no-delay set, admitted here: a
    /// connection over a limit is closed before TLS or HTTP/2 sees it.
    pub fn incoming(
        &self,
        listener: TcpIncoming,
    ) -> impl Stream<Item = io::Result<TrackedIo<TcpStream>>> + Send + 'static {
        use futures::StreamExt;
        let connections = self.clone();
        listener.filter_map(move |accepted| {
            let admitted = match accepted {
                Ok(stream) => match stream.peer_addr() {
                    Ok(peer) => connections.admit(stream, peer).map(Ok),
                    // Already gone (reset before we looked): nothing to serve.
                    Err(_) => None,
                },
                // Accept errors (EMFILE, …) go to tonic, which backs off or stops.
                Err(e) => Some(Err(e)),
            };
            std::future::ready(admitted)
        })
    }
}

/// A connection's place in the table; given back when the connection is dropped.
#[derive(Debug)]
struct Place {
    connections: Connections,
    peer: SocketAddr,
    ip: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.connections.release(self.peer, self.ip);
    }
}

/// An admitted connection: counted until dropped, and whose reads time out before the handshake
/// completes and when the peer falls silent (see the module docs).
#[derive(Debug)]
pub struct TrackedIo<IO> {
    inner: IO,
    handshake_done: Arc<AtomicBool>,
    handshake: Pin<Box<Sleep>>,
    /// Fires at `last_read + idle_timeout` at the earliest; re-armed lazily (when it fires
    /// early) rather than at every read.
    idle: Pin<Box<Sleep>>,
    last_read: Instant,
    idle_timeout: Duration,
    _place: Place,
}

impl<IO> TrackedIo<IO> {
    /// Whether the peer has run out of time, given that no bytes are available now.
    fn poll_timeouts(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if !self.handshake_done.load(Ordering::Relaxed) && self.handshake.as_mut().poll(cx).is_ready() {
            debug!(
                "closing a connection that did not complete its handshake in time (server.handshake_timeout)"
            );
            return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "handshake timeout"));
        }
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last_read + self.idle_timeout;
            if Instant::now() >= due {
                debug!("closing a connection silent for server.connection_idle_timeout");
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle timeout"));
            }
            self.idle.as_mut().reset(due);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for TrackedIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.poll_timeouts(cx).map(Err),
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TrackedIo<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The wrapped socket's own connection info, so `remote_addr()` and `peer_certs()` of a request
/// work as on a bare `TcpStream`.
impl<IO: Connected> Connected for TrackedIo<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Wraps a gRPC service so that each request marks its connection's handshake complete.
#[derive(Debug, Clone)]
pub struct MarkServed<S> {
    inner: S,
    connections: Connections,
}

impl<S> MarkServed<S> {
    /// Marks the connections of `inner`'s requests in `connections`.
    pub fn new(inner: S, connections: Connections) -> Self {
        Self { inner, connections }
    }
}

impl<S: NamedService> NamedService for MarkServed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for MarkServed<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ext = req.extensions();
        let peer = ext
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr()));
        if let Some(peer) = peer {
            self.connections.mark_served(peer);
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn limits(per_address: usize, total: usize) -> ConnectionLimits {
        ConnectionLimits {
            per_address,
            total,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    fn peer(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    #[tokio::test]
    async fn an_address_at_its_limit_is_refused_until_one_of_its_connections_closes() {
        let c = Connections::new(limits(2, 100));
        let a = c.admit((), peer([10, 0, 0, 1], 1)).expect("first");
        let _b = c.admit((), peer([10, 0, 0, 1], 2)).expect("second");
        assert!(c.admit((), peer([10, 0, 0, 1], 3)).is_none(), "third from the same address");
        let _other = c.admit((), peer([10, 0, 0, 2], 1)).expect("another address is not affected");
        assert_eq!(c.open(IpAddr::from([10, 0, 0, 1])), (3, 2));
        drop(a);
        assert_eq!(c.open(IpAddr::from([10, 0, 0, 1])), (2, 1));
        c.admit((), peer([10, 0, 0, 1], 4)).expect("a place was given back");
    }

    #[tokio::test]
    async fn the_total_cap_refuses_every_address_once_reached() {
        let c = Connections::new(limits(10, 2));
        let _a = c.admit((), peer([10, 0, 0, 1], 1)).unwrap();
        let b = c.admit((), peer([10, 0, 0, 2], 1)).unwrap();
        assert!(c.admit((), peer([10, 0, 0, 3], 1)).is_none());
        drop(b);
        assert!(c.admit((), peer([10, 0, 0, 3], 1)).is_some());
    }

    #[tokio::test]
    async fn an_ipv4_mapped_ipv6_peer_counts_as_its_ipv4_address() {
        let c = Connections::new(limits(1, 10));
        let _v4 = c.admit((), peer([10, 0, 0, 1], 1)).unwrap();
        let mapped = SocketAddr::new(IpAddr::V6(std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()), 2);
        assert!(c.admit((), mapped).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_its_reads_at_the_handshake_timeout() {
        let c = Connections::new(limits(10, 10));
        let (server, _client) = tokio::io::duplex(64);
        let mut io = c.admit(server, peer([10, 0, 0, 1], 1)).unwrap();
        let started = Instant::now();
        let err = io.read_u8().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10), "paused clock: exactly the bound");
    }

    #[tokio::test(start_paused = true)]
    async fn once_served_a_connection_is_bound_only_by_idleness_and_reads_restart_the_clock() {
        let c = Connections::new(limits(10, 10));
        let (server, mut client) = tokio::io::duplex(64);
        let p = peer([10, 0, 0, 1], 1);
        let mut io = c.admit(server, p).unwrap();
        c.mark_served(p);
        // A byte every 50 s keeps it open far beyond the handshake bound.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            client.write_u8(7).await.unwrap();
            assert_eq!(io.read_u8().await.unwrap(), 7);
        }
        let silent_from = Instant::now();
        let err = io.read_u8().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(silent_from.elapsed(), Duration::from_secs(60));
        drop(io);
        assert_eq!(c.open(p.ip()), (0, 0), "the closed connection gave its place back");
    }

    #[test]
    fn keepalive_pings_come_at_least_three_times_per_idle_bound() {
        assert_eq!(keepalive_interval(Duration::from_secs(120)), Duration::from_secs(30));
        assert_eq!(keepalive_interval(Duration::from_secs(3)), Duration::from_secs(1));
    }
}
