//! Known clients, their sessions and liveness (the Flower `ClientManager` role).
//!
//! Owned by the round actor (no locks): every call from a client refreshes its `last_seen`,
//! and a client is *alive* while it has a session and was heard from within the liveness
//! timeout. Only alive clients are sampled; a sampled client that falls silent is counted as a
//! dropout by the training phase.

use std::collections::BTreeMap;
use std::time::Duration;

use fedtune_shared::ids::ClientId;
use fedtune_shared::round::{ClientActivity, ClientStatus};
use tokio::time::Instant;

/// One client as the actor tracks it.
#[derive(Debug, Clone)]
pub struct ClientEntry {
    /// Pinned Ed25519 key, if any.
    pub public_key: Option<[u8; 32]>,
    /// Has an open session (joined since the coordinator started, not left).
    pub in_session: bool,
    /// Last call from it.
    pub last_seen: Instant,
    /// Last reported activity.
    pub activity: ClientActivity,
    /// Training examples it declared.
    pub train_examples: u64,
    /// Held-out examples it declared (0 = cannot evaluate).
    pub eval_examples: u64,
    /// Completed rounds it contributed to.
    pub rounds_contributed: u64,
}

/// Registry errors (mapped to gRPC statuses in `rpc::status`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A different key is pinned for this id.
    #[error("client `{0}` is registered with a different public key")]
    KeyMismatch(ClientId),
}

/// All clients ever seen by this federation.
#[derive(Debug)]
pub struct Registry {
    clients: BTreeMap<ClientId, ClientEntry>,
    liveness_timeout: Duration,
}

impl Registry {
    /// An empty registry.
    pub fn new(liveness_timeout: Duration) -> Self {
        Self { clients: BTreeMap::new(), liveness_timeout }
    }

    /// Adds a client known from the state directory (no session until it joins again).
    pub fn restore(
        &mut self,
        id: ClientId,
        public_key: Option<[u8; 32]>,
        rounds_contributed: u64,
        now: Instant,
    ) {
        self.clients.insert(
            id,
            ClientEntry {
                public_key,
                in_session: false,
                last_seen: now,
                activity: ClientActivity::Idle,
                train_examples: 0,
                eval_examples: 0,
                rounds_contributed,
            },
        );
    }

    /// Opens (or reopens) a session. The first key seen for an id is pinned.
    pub fn join(
        &mut self,
        id: &ClientId,
        public_key: Option<[u8; 32]>,
        train_examples: u64,
        eval_examples: u64,
        now: Instant,
    ) -> Result<(), RegistryError> {
        let entry = self.clients.entry(id.clone()).or_insert_with(|| ClientEntry {
            public_key: None,
            in_session: false,
            last_seen: now,
            activity: ClientActivity::Idle,
            train_examples: 0,
            eval_examples: 0,
            rounds_contributed: 0,
        });
        match (entry.public_key, public_key) {
            (Some(pinned), Some(offered)) if pinned != offered => {
                return Err(RegistryError::KeyMismatch(id.clone()))
            }
            (Some(_), None) => return Err(RegistryError::KeyMismatch(id.clone())),
            (None, offered) => entry.public_key = offered,
            _ => {}
        }
        entry.in_session = true;
        entry.last_seen = now;
        entry.activity = ClientActivity::Idle;
        entry.train_examples = train_examples;
        entry.eval_examples = eval_examples;
        Ok(())
    }

    /// Records a call; returns false for a client without a session.
    pub fn touch(&mut self, id: &ClientId, activity: Option<ClientActivity>, now: Instant) -> bool {
        match self.clients.get_mut(id) {
            Some(e) if e.in_session => {
                e.last_seen = now;
                if let Some(a) = activity {
                    e.activity = a;
                }
                true
            }
            _ => false,
        }
    }

    /// Ends a session.
    pub fn leave(&mut self, id: &ClientId) {
        if let Some(e) = self.clients.get_mut(id) {
            e.in_session = false;
        }
    }

    /// The entry of a client.
    pub fn get(&self, id: &ClientId) -> Option<&ClientEntry> {
        self.clients.get(id)
    }

    /// Counts a completed round for each contributor.
    pub fn credit(&mut self, ids: impl IntoIterator<Item = ClientId>) {
        for id in ids {
            if let Some(e) = self.clients.get_mut(&id) {
                e.rounds_contributed += 1;
            }
        }
    }

    /// In session and heard from within the liveness timeout.
    pub fn is_alive(&self, id: &ClientId, now: Instant) -> bool {
        self.clients.get(id).is_some_and(|e| {
            e.in_session && now.saturating_duration_since(e.last_seen) < self.liveness_timeout
        })
    }

    /// Alive clients, sorted by id (the canonical order sampling draws from).
    pub fn alive(&self, now: Instant) -> Vec<ClientId> {
        self.clients.keys().filter(|id| self.is_alive(id, now)).cloned().collect()
    }

    /// Alive clients that can evaluate.
    pub fn alive_evaluators(&self, now: Instant) -> Vec<ClientId> {
        self.alive(now).into_iter().filter(|id| self.clients[id].eval_examples > 0).collect()
    }

    /// Operator view of every client.
    pub fn status(&self, now: Instant) -> Vec<ClientStatus> {
        self.clients
            .iter()
            .map(|(id, e)| ClientStatus {
                client_id: id.clone(),
                alive: self.is_alive(id, now),
                last_seen_ago: now.saturating_duration_since(e.last_seen),
                activity: e.activity,
                rounds_contributed: e.rounds_contributed,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_stops_being_alive_after_the_timeout() {
        let mut r = Registry::new(Duration::from_secs(30));
        r.join(&id("a"), None, 10, 0, Instant::now()).unwrap();
        assert_eq!(r.alive(Instant::now()), vec![id("a")]);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(r.touch(&id("a"), None, Instant::now()));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(r.is_alive(&id("a"), Instant::now()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!r.is_alive(&id("a"), Instant::now()));
    }

    #[test]
    fn a_pinned_key_cannot_be_replaced_or_dropped() {
        let mut r = Registry::new(Duration::from_secs(30));
        let now = Instant::now();
        r.join(&id("a"), Some([1; 32]), 1, 1, now).unwrap();
        assert_eq!(r.join(&id("a"), Some([2; 32]), 1, 1, now), Err(RegistryError::KeyMismatch(id("a"))));
        assert_eq!(r.join(&id("a"), None, 1, 1, now), Err(RegistryError::KeyMismatch(id("a"))));
        assert!(r.join(&id("a"), Some([1; 32]), 1, 1, now).is_ok());
    }

    #[test]
    fn restored_clients_need_to_join_before_they_count_as_alive() {
        let mut r = Registry::new(Duration::from_secs(30));
        let now = Instant::now();
        r.restore(id("a"), None, 3, now);
        assert!(r.alive(now).is_empty());
        assert!(!r.touch(&id("a"), None, now));
        r.join(&id("a"), None, 1, 0, now).unwrap();
        assert_eq!(r.alive(now), vec![id("a")]);
        assert!(r.alive_evaluators(now).is_empty());
    }
}
