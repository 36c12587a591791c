//! Upload admission: a client reserves one of the `server.max_concurrent_uploads` slots with
//! `ReserveUpload` before it opens its `UploadUpdate` stream.
//!
//! HTTP/2 lets a client push a whole stream window (1 MiB) into the coordinator's memory before
//! anyone reads it. When uploads waited for a slot (or were refused for want of one) with their
//! streams open, every uploading client held that window: memory grew by ≈ 1 MiB per client
//! uploading at once. With admission, the waiting happens in a unary long poll that holds no
//! payload, and a well-behaved client opens its stream only with a slot: the bytes in flight
//! are bounded by the slots, not by the clients.
//!
//! A grant *is* a slot permit, held for one client and one round attempt. It is bounded in
//! number (one per slot, one per client) and in time: unused for `server.upload_idle_timeout`
//! (the same bound that closes a silent stream), it expires and the slot goes to the next
//! waiter. `UploadUpdate` takes the grant at its header; without a live one for that client and
//! attempt the upload is refused with FAILED_PRECONDITION ([`RoundError::NoUploadGrant`]).
//! Reservations waiting for a slot are bounded by `server.upload_queue`: beyond it, and when a
//! wait reaches its bound, the answer is "retry after" rather than an error.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedtune_shared::ids::{ClientId, RoundId};
use fedtune_shared::round::UploadAdmission as Admission;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::RoundError;

/// A live grant: the slot it holds, for one attempt.
#[derive(Debug)]
struct Grant {
    id: u64,
    attempt: RoundId,
    permit: OwnedSemaphorePermit,
    /// Ends the grant's expiry timer as soon as the grant leaves the map (taken by its stream,
    /// replaced, expired). Without it every grant left a sleeping task behind for the whole
    /// ttl: with 1,000 clients and rounds shorter than the ttl, thousands of them.
    _expiry: DropGuard,
}

/// Upload slots, the reservations waiting for one, and the grants holding them.
#[derive(Debug)]
pub struct UploadAdmission {
    slots: Arc<Semaphore>,
    /// Places for reservations waiting for a slot (`server.upload_queue`).
    waiting: Arc<Semaphore>,
    grants: Arc<Mutex<HashMap<ClientId, Grant>>>,
    next_id: AtomicU64,
    ttl: Duration,
    /// The pause suggested when a reservation gets no slot.
    retry_after: Duration,
    cancel: CancellationToken,
}

impl UploadAdmission {
    /// `slots` uploads at once, `waiting` reservations waiting for one, grants unused for `ttl`
    /// expire; grants and waits end with `cancel`.
    pub fn new(slots: usize, waiting: usize, ttl: Duration, cancel: CancellationToken) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            waiting: Arc::new(Semaphore::new(waiting)),
            grants: Arc::default(),
            next_id: AtomicU64::new(0),
            ttl,
            // Long enough that refused reservers do not poll in a storm, short against a round.
            retry_after: Duration::from_secs(1).min(ttl),
            cancel,
        }
    }

    /// Reserves a slot for `client`'s upload in `attempt`, waiting for one until `until` (or
    /// until `closed` completes: the attempt no longer takes uploads, answered with the error
    /// it yields). A client holds at most one grant: asking again for the same attempt keeps
    /// the grant it has (with a fresh expiry); a grant for another attempt is given up.
    pub async fn reserve(
        &self,
        client: &ClientId,
        attempt: RoundId,
        until: Instant,
        closed: impl Future<Output = RoundError>,
    ) -> Result<Admission, RoundError> {
        let held = {
            let mut grants = lock(&self.grants);
            match grants.remove(client) {
                Some(g) if g.attempt == attempt => Some(g.permit),
                _ => None,
            }
        };
        let permit = match held {
            Some(p) => p,
            None => match self.slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(TryAcquireError::Closed) => return Err(RoundError::ShuttingDown),
                Err(TryAcquireError::NoPermits) => {
                    let Ok(_place) = self.waiting.clone().try_acquire_owned() else {
                        return Ok(Admission::RetryAfter(self.retry_after));
                    };
                    tokio::pin!(closed);
                    tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => return Err(RoundError::ShuttingDown),
                        e = &mut closed => return Err(e),
                        _ = tokio::time::sleep_until(until) => return Ok(Admission::RetryAfter(self.retry_after)),
                        p = self.slots.clone().acquire_owned() => p.map_err(|_| RoundError::ShuttingDown)?,
                    }
                }
            },
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let expiry = self.cancel.child_token();
        self.expire_later(client.clone(), id, expiry.clone());
        lock(&self.grants)
            .insert(client.clone(), Grant { id, attempt, permit, _expiry: expiry.drop_guard() });
        Ok(Admission::Granted { ttl: self.ttl })
    }

    /// Takes `client`'s grant for `attempt`: the slot its upload then holds until it ends.
    pub fn take(&self, client: &ClientId, attempt: RoundId) -> Result<OwnedSemaphorePermit, RoundError> {
        let mut grants = lock(&self.grants);
        match grants.get(client) {
            Some(g) if g.attempt == attempt => Ok(grants.remove(client).expect("present").permit),
            _ => Err(RoundError::NoUploadGrant { client: client.clone(), round: attempt, ttl: self.ttl }),
        }
    }

    /// Grants held now (each holds a slot).
    pub fn grants(&self) -> usize {
        lock(&self.grants).len()
    }

    /// Frees grant `id` of `client` after the ttl unless its stream took it (or a newer grant
    /// replaced it) first. The task ends at the ttl, when the grant leaves the map (`ended`,
    /// cancelled by the grant's guard), or with the coordinator (`ended` is its child).
    fn expire_later(&self, client: ClientId, id: u64, ended: CancellationToken) {
        let (grants, ttl) = (self.grants.clone(), self.ttl);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(ttl) => {}
                _ = ended.cancelled() => return,
            }
            let mut grants = lock(&grants);
            if grants.get(&client).is_some_and(|g| g.id == id) {
                grants.remove(&client);
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);
    const ATTEMPT: RoundId = RoundId { round: 4, attempt: 1 };

    fn client(name: &str) -> ClientId {
        ClientId::parse(name).unwrap()
    }

    fn open() -> std::future::Pending<RoundError> {
        std::future::pending()
    }

    fn in_secs(s: u64) -> Instant {
        Instant::now() + Duration::from_secs(s)
    }

    #[tokio::test(start_paused = true)]
    async fn grants_are_bounded_by_the_slots_and_reservations_beyond_wait_or_are_told_to_retry() {
        let a = UploadAdmission::new(2, 1, TTL, CancellationToken::new());
        for name in ["a", "b"] {
            assert_eq!(
                a.reserve(&client(name), ATTEMPT, in_secs(5), open()).await.unwrap(),
                Admission::Granted { ttl: TTL }
            );
        }
        assert_eq!(a.grants(), 2);
        let a = Arc::new(a);
        // c takes the only waiting place; d finds none and is told to retry at once.
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.reserve(&client("c"), ATTEMPT, in_secs(5), open()).await }
        });
        tokio::task::yield_now().await;
        let started = Instant::now();
        let d = a.reserve(&client("d"), ATTEMPT, in_secs(5), open()).await.unwrap();
        assert!(matches!(d, Admission::RetryAfter(p) if !p.is_zero()), "{d:?}");
        assert_eq!(started.elapsed(), Duration::ZERO, "a full queue answers without waiting");
        // Both slots stay granted (well inside the ttl): the waiter's bound answers it.
        let c = waiter.await.unwrap().unwrap();
        assert!(matches!(c, Admission::RetryAfter(_)), "{c:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(a.grants(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_grant_expires_after_its_ttl_and_its_slot_goes_to_the_waiter() {
        let a = Arc::new(UploadAdmission::new(1, 4, TTL, CancellationToken::new()));
        a.reserve(&client("a"), ATTEMPT, in_secs(1), open()).await.unwrap();
        let started = Instant::now();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.reserve(&client("b"), ATTEMPT, in_secs(3600), open()).await }
        });
        assert_eq!(waiter.await.unwrap().unwrap(), Admission::Granted { ttl: TTL });
        assert_eq!(started.elapsed(), TTL, "the slot came free exactly when a's grant expired");
        let expired = a.take(&client("a"), ATTEMPT).unwrap_err();
        assert!(matches!(expired, RoundError::NoUploadGrant { .. }), "{expired:?}");
        let _upload = a.take(&client("b"), ATTEMPT).expect("b's grant is live");
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_taken_or_replaced_leaves_no_timer_behind_for_its_ttl() {
        let alive = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let a = UploadAdmission::new(2, 0, TTL, CancellationToken::new());
        a.reserve(&client("a"), ATTEMPT, in_secs(1), open()).await.unwrap();
        a.reserve(&client("b"), ATTEMPT, in_secs(1), open()).await.unwrap();
        assert_eq!(alive(), 2, "one expiry timer per live grant");
        // b asks again: its new grant replaces the old one, whose timer ends.
        a.reserve(&client("b"), ATTEMPT, in_secs(1), open()).await.unwrap();
        let _upload = a.take(&client("a"), ATTEMPT).expect("a's grant");
        tokio::task::yield_now().await;
        assert_eq!(alive(), 1, "only b's current grant still waits for its ttl");
        let _b = a.take(&client("b"), ATTEMPT).expect("b's grant");
        tokio::task::yield_now().await;
        assert_eq!(alive(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_is_taken_once_by_its_client_for_its_attempt_only() {
        let a = UploadAdmission::new(1, 0, TTL, CancellationToken::new());
        a.reserve(&client("a"), ATTEMPT, in_secs(1), open()).await.unwrap();
        let other_attempt = RoundId { round: 4, attempt: 2 };
        for (who, attempt) in [("b", ATTEMPT), ("a", other_attempt)] {
            let e = a.take(&client(who), attempt).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("ReserveUpload") && text.contains(&attempt.to_string()), "{text}");
        }
        let permit = a.take(&client("a"), ATTEMPT).expect("the grant");
        assert!(a.take(&client("a"), ATTEMPT).is_err(), "a grant opens one upload");
        // The upload holds the slot: nobody else is granted until it ends.
        let busy = a.reserve(&client("b"), ATTEMPT, in_secs(1), open()).await.unwrap();
        assert!(matches!(busy, Admission::RetryAfter(_)), "{busy:?}");
        drop(permit);
        assert_eq!(
            a.reserve(&client("b"), ATTEMPT, in_secs(1), open()).await.unwrap(),
            Admission::Granted { ttl: TTL }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn asking_again_keeps_the_one_grant_a_client_holds() {
        let a = UploadAdmission::new(2, 0, TTL, CancellationToken::new());
        for _ in 0..3 {
            a.reserve(&client("a"), ATTEMPT, in_secs(1), open()).await.unwrap();
        }
        assert_eq!(a.grants(), 1);
        a.reserve(&client("b"), ATTEMPT, in_secs(1), open()).await.unwrap();
        assert_eq!(a.grants(), 2, "the second slot was still free for b");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_reservation_ends_with_the_error_of_its_attempt_closing() {
        let a = UploadAdmission::new(1, 1, TTL, CancellationToken::new());
        a.reserve(&client("a"), ATTEMPT, in_secs(1), open()).await.unwrap();
        let closed = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            RoundError::RoundClosed { round: ATTEMPT, reason: "test".into() }
        };
        let e = a.reserve(&client("b"), ATTEMPT, in_secs(3600), closed).await.unwrap_err();
        assert!(matches!(e, RoundError::RoundClosed { .. }), "{e:?}");
    }
}
