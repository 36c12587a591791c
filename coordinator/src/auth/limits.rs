//! Call limits: per-client token buckets and in-flight caps, per-address buckets for
//! unauthenticated calls, and a global cap on streaming downloads.
//!
//! Every limit refuses at once with [`RoundError::Limited`] (`RESOURCE_EXHAUSTED`) instead of
//! queueing: a queue would let a flooding client make honest clients wait behind it, and a
//! refused call costs the coordinator almost nothing. The bucket tables are bounded too, so
//! a stream of calls from ever-new addresses cannot grow memory without limit.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use fedtune_shared::ids::ClientId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::RoundError;
use crate::settings::LimitSettings;

/// Most entries a bucket table keeps; beyond it, buckets that have refilled completely (whose
/// owners are idle) are dropped, and if none has, new keys share one overflow bucket.
const MAX_TRACKED: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by `K`, all with the same rate and size.
#[derive(Debug)]
struct Buckets<K> {
    rate: f64,
    size: f64,
    table: HashMap<K, Bucket>,
    overflow: Bucket,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(rate: f64, size: u32) -> Self {
        let now = Instant::now();
        let size = f64::from(size);
        Self { rate, size, table: HashMap::new(), overflow: Bucket { tokens: size, at: now } }
    }

    fn refill(b: &mut Bucket, rate: f64, size: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(size);
        b.at = now;
    }

    /// Takes one token for `key`; false when its bucket is empty.
    fn take(&mut self, key: &K) -> bool {
        let now = Instant::now();
        let (rate, size) = (self.rate, self.size);
        if !self.table.contains_key(key) && self.table.len() >= MAX_TRACKED {
            self.table.retain(|_, b| {
                Self::refill(b, rate, size, now);
                b.tokens < size
            });
        }
        let bucket = if self.table.len() < MAX_TRACKED || self.table.contains_key(key) {
            self.table.entry(key.clone()).or_insert(Bucket { tokens: size, at: now })
        } else {
            &mut self.overflow
        };
        Self::refill(bucket, rate, size, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The coordinator's call limits (see [`LimitSettings`]).
#[derive(Debug)]
pub struct Limits {
    settings: LimitSettings,
    clients: Mutex<Buckets<ClientId>>,
    peers: Mutex<Buckets<Option<IpAddr>>>,
    in_flight: Arc<Mutex<HashMap<ClientId, usize>>>,
    downloads: Arc<Semaphore>,
    /// Downloads streaming per client.
    client_downloads: Arc<Mutex<HashMap<ClientId, usize>>>,
}

/// Holds one of a client's in-flight call slots; released on drop.
#[derive(Debug)]
pub struct CallSlot {
    client: ClientId,
    table: Arc<Mutex<HashMap<ClientId, usize>>>,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.client);
            }
        }
    }
}

/// Downloads one client may stream at once: a current one and a resumption racing its broken
/// predecessor. More only ties up global slots and memory.
pub const MAX_DOWNLOADS_PER_CLIENT: usize = 2;

/// Holds one of the global download slots and one of the client's; released on drop.
#[derive(Debug)]
pub struct DownloadSlot {
    _global: OwnedSemaphorePermit,
    _client: CallSlot,
}

impl Limits {
    /// Limits as configured.
    pub fn new(settings: &LimitSettings) -> Self {
        Self {
            clients: Mutex::new(Buckets::new(settings.calls_per_second, settings.burst)),
            peers: Mutex::new(Buckets::new(settings.anonymous_calls_per_second, settings.anonymous_burst)),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            downloads: Arc::new(Semaphore::new(settings.max_concurrent_downloads)),
            client_downloads: Arc::new(Mutex::new(HashMap::new())),
            settings: settings.clone(),
        }
    }

    /// Charges one call to an authenticated client and takes one of its in-flight slots.
    pub fn client_call(&self, client: &ClientId) -> Result<CallSlot, RoundError> {
        if !self.clients.lock().unwrap_or_else(|p| p.into_inner()).take(client) {
            return Err(RoundError::Limited(format!(
                "client `{client}` exceeds {} calls per second (burst {}); slow down",
                self.settings.calls_per_second, self.settings.burst
            )));
        }
        let mut t = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(client.clone()).or_insert(0);
        if *n >= self.settings.concurrent_calls_per_client {
            return Err(RoundError::Limited(format!(
                "client `{client}` already has {} calls in progress (the limit)",
                self.settings.concurrent_calls_per_client
            )));
        }
        *n += 1;
        Ok(CallSlot { client: client.clone(), table: self.in_flight.clone() })
    }

    /// Charges one unauthenticated call (or one with a refused token) to the caller's address.
    pub fn anonymous_call(&self, peer: Option<IpAddr>) -> Result<(), RoundError> {
        if self.peers.lock().unwrap_or_else(|p| p.into_inner()).take(&peer) {
            Ok(())
        } else {
            Err(RoundError::Limited(format!(
                "too many unauthenticated calls from this address (limit {} per second, burst {})",
                self.settings.anonymous_calls_per_second, self.settings.anonymous_burst
            )))
        }
    }

    /// Takes one of `client`'s download slots (at most [`MAX_DOWNLOADS_PER_CLIENT`], refused at
    /// once beyond) and a global one, waiting for the latter until `until`. Waiting costs a
    /// pending call and no payload, where a refusal costs a retry storm: at 1000 clients
    /// fetching one model, refusals made most downloads ask several times.
    pub async fn download(&self, client: &ClientId, until: Instant) -> Result<DownloadSlot, RoundError> {
        let mine = {
            let mut t = self.client_downloads.lock().unwrap_or_else(|p| p.into_inner());
            let n = t.entry(client.clone()).or_insert(0);
            if *n >= MAX_DOWNLOADS_PER_CLIENT {
                return Err(RoundError::Limited(format!(
                    "client `{client}` already has {MAX_DOWNLOADS_PER_CLIENT} downloads streaming (the limit)"
                )));
            }
            *n += 1;
            CallSlot { client: client.clone(), table: self.client_downloads.clone() }
        };
        let busy = || {
            RoundError::Limited(format!(
                "{} downloads stayed streaming for as long as this call could wait; retry shortly",
                self.settings.max_concurrent_downloads
            ))
        };
        let global = match tokio::time::timeout_at(until, self.downloads.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => return Err(RoundError::ShuttingDown),
            Err(_elapsed) => return Err(busy()),
        };
        Ok(DownloadSlot { _global: global, _client: mine })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(rate: f64, burst: u32, concurrent: usize) -> Limits {
        Limits::new(&LimitSettings {
            calls_per_second: rate,
            burst,
            concurrent_calls_per_client: concurrent,
            anonymous_calls_per_second: rate,
            anonymous_burst: burst,
            max_concurrent_downloads: 1,
            ..LimitSettings::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_over_its_rate_is_refused_while_another_is_served_and_tokens_refill() {
        let l = limits(2.0, 3, 100);
        let (a, b) = (ClientId::parse("a").unwrap(), ClientId::parse("b").unwrap());
        for _ in 0..3 {
            drop(l.client_call(&a).unwrap());
        }
        let err = l.client_call(&a).unwrap_err();
        assert!(matches!(err, RoundError::Limited(_)), "{err}");
        drop(l.client_call(&b).unwrap());
        tokio::time::advance(Duration::from_millis(500)).await;
        drop(l.client_call(&a).unwrap());
        assert!(l.client_call(&a).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_slots_are_capped_per_client_and_freed_on_drop() {
        let l = limits(1000.0, 1000, 2);
        let a = ClientId::parse("a").unwrap();
        let s1 = l.client_call(&a).unwrap();
        let _s2 = l.client_call(&a).unwrap();
        assert!(l.client_call(&a).is_err());
        drop(s1);
        let _s3 = l.client_call(&a).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn downloads_share_a_global_cap_and_anonymous_calls_a_per_address_bucket() {
        let l = limits(1.0, 1, 1);
        let (a, b) = (ClientId::parse("a").unwrap(), ClientId::parse("b").unwrap());
        let d = l.download(&a, Instant::now()).await.unwrap();
        assert!(l.download(&b, Instant::now()).await.is_err());
        drop(d);
        l.download(&b, Instant::now()).await.unwrap();
        let (x, y) = (Some(IpAddr::from([10, 0, 0, 1])), Some(IpAddr::from([10, 0, 0, 2])));
        l.anonymous_call(x).unwrap();
        assert!(l.anonymous_call(x).is_err());
        l.anonymous_call(y).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_streams_at_most_two_downloads_at_once() {
        let l = Limits::new(&LimitSettings { max_concurrent_downloads: 64, ..LimitSettings::default() });
        let (a, b) = (ClientId::parse("a").unwrap(), ClientId::parse("b").unwrap());
        let far = Instant::now() + std::time::Duration::from_secs(3600);
        let first = l.download(&a, far).await.unwrap();
        let _second = l.download(&a, far).await.unwrap();
        let started = Instant::now();
        let third = l.download(&a, far).await;
        assert!(matches!(&third, Err(RoundError::Limited(m)) if m.contains("2 downloads")), "{third:?}");
        assert_eq!(started.elapsed(), std::time::Duration::ZERO, "the per-client cap refuses at once");
        l.download(&b, far).await.unwrap();
        drop(first);
        l.download(&a, far).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_download_beyond_the_global_cap_waits_for_a_slot_up_to_its_bound() {
        let l = Arc::new(limits(1.0, 1, 1));
        let (a, b, c) =
            (ClientId::parse("a").unwrap(), ClientId::parse("b").unwrap(), ClientId::parse("c").unwrap());
        let secs = std::time::Duration::from_secs;
        let held = l.download(&a, Instant::now()).await.unwrap();
        let started = Instant::now();
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.download(&b, Instant::now() + secs(20)).await.map(|_| Instant::now()) }
        });
        tokio::time::sleep(secs(3)).await;
        drop(held);
        let served_at = waiting.await.unwrap().expect("served once the slot came free");
        assert_eq!(served_at - started, secs(3));
        let _held = l.download(&a, Instant::now()).await.unwrap();
        let refused = l.download(&c, Instant::now() + secs(20)).await;
        assert!(matches!(&refused, Err(RoundError::Limited(m)) if m.contains("retry")), "{refused:?}");
        assert_eq!(started.elapsed(), secs(23), "refused only at its bound");
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_table_stays_bounded_under_ever_new_keys() {
        let mut b: Buckets<u32> = Buckets::new(1.0, 1);
        for k in 0..(MAX_TRACKED as u32 + 100) {
            b.take(&k);
        }
        assert!(b.table.len() <= MAX_TRACKED);
    }
}
