//! The live connections of a service (HAProxy's `show sess`): each relayed connection is
//! listed from its connect to its end with its client, backend, age and bytes each way, and can
//! be closed by its id. The byte counters of the backends follow open connections too: once a
//! second the bytes moved since the last time are added, so a long transfer shows in
//! `/metrics` while it runs, not only at its end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backends::pool::Backend;
use crate::clock::Instant;
use crate::proxy::relay::{Kill, Stop};

/// Shards of the table: connections of different threads rarely share a lock.
const SHARDS: usize = 16;
/// How often open connections' bytes are added to the backends' counters.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One relayed connection.
pub struct Session {
    pub id: u64,
    pub client: SocketAddr,
    pub backend: Arc<Backend>,
    started: Instant,
    /// Bytes moved so far, each way (the relay adds to them as it goes).
    pub to_backend: AtomicU64,
    pub to_client: AtomicU64,
    /// What the backends' counters have been told of.
    counted_to_backend: AtomicU64,
    counted_to_client: AtomicU64,
    /// Set to close it (its relay ends as if cut).
    pub kill: Kill,
}

impl Session {
    /// What ends its relay early: its backend's cut, or its own kill.
    pub fn stop(&self) -> Stop<'_> {
        Stop { cut: &self.backend.cut, kill: &self.kill }
    }

    /// Adds the bytes moved since the last call to the backend's counters (at most once per
    /// byte, whichever of the flusher and the connection's end gets there first).
    fn count_bytes(&self) {
        let count = |moved: &AtomicU64, counted: &AtomicU64, counter: &prometheus_client::metrics::counter::Counter| {
            let now = moved.load(Ordering::Relaxed);
            let before = counted.fetch_max(now, Ordering::AcqRel);
            if now > before {
                counter.inc_by(now - before);
            }
        };
        count(&self.to_backend, &self.counted_to_backend, &self.backend.metrics.bytes_to_backend);
        count(&self.to_client, &self.counted_to_client, &self.backend.metrics.bytes_to_client);
    }
}

/// A connection as `GET /services/{s}/sessions` and `harbor ctl sessions` show it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub id: u64,
    pub client: String,
    pub backend: String,
    pub backend_name: String,
    pub age_ms: u64,
    pub started_unix_ms: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    /// `relaying`, or `closing` once it was told to close.
    pub state: &'static str,
}

/// The live connections of one service.
pub struct Sessions {
    shards: Vec<Mutex<HashMap<u64, Arc<Session>>>>,
    next_id: AtomicU64,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(), next_id: AtomicU64::new(1) }
    }
}

/// Keeps a session listed while it lives; at its end, its last bytes are counted.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    pub session: Arc<Session>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.session.count_bytes();
        self.sessions.shard(self.session.id).remove(&self.session.id);
    }
}

impl Sessions {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Session>>> {
        self.shards[(id as usize) % SHARDS].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lists a connection relayed from `client` to `backend`, from now until the guard drops.
    pub fn open(self: &Arc<Self>, client: SocketAddr, backend: &Arc<Backend>) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            id,
            client,
            backend: Arc::clone(backend),
            started: Instant::now(),
            to_backend: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            counted_to_backend: AtomicU64::new(0),
            counted_to_client: AtomicU64::new(0),
            kill: Kill::default(),
        });
        self.shard(id).insert(id, Arc::clone(&session));
        SessionGuard { sessions: Arc::clone(self), session }
    }

    /// Every live connection, oldest first; at most `limit`.
    pub fn list(&self, limit: usize) -> Vec<SessionView> {
        let (now, unix_now) = (Instant::now(), crate::clock::unix_ms());
        let mut all: Vec<Arc<Session>> = Vec::new();
        for shard in &self.shards {
            all.extend(shard.lock().unwrap_or_else(PoisonError::into_inner).values().cloned());
        }
        all.sort_by_key(|s| s.id);
        all.iter()
            .take(limit)
            .map(|s| {
                let age_ms = u64::try_from(now.duration_since(s.started).as_millis()).unwrap_or(u64::MAX);
                SessionView {
                    id: s.id,
                    client: s.client.to_string(),
                    backend: s.backend.address.to_string(),
                    backend_name: s.backend.label.to_string(),
                    age_ms,
                    started_unix_ms: unix_now.saturating_sub(age_ms),
                    bytes_to_backend: s.to_backend.load(Ordering::Relaxed),
                    bytes_to_client: s.to_client.load(Ordering::Relaxed),
                    state: if s.kill.is_killed() { "closing" } else { "relaying" },
                }
            })
            .collect()
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes connection `id` (its relay is cut, both sides reset); false if there is none.
    pub fn kill(&self, id: u64) -> bool {
        match self.shard(id).get(&id) {
            Some(session) => {
                session.kill.kill();
                true
            }
            None => false,
        }
    }

    /// Adds every open connection's new bytes to its backend's counters.
    pub fn count_bytes(&self) {
        for shard in &self.shards {
            let open: Vec<Arc<Session>> =
                shard.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
            for session in open {
                session.count_bytes();
            }
        }
    }

    /// Counts open connections' bytes every [`FLUSH_EVERY`] until `stop` is cancelled.
    pub fn spawn_counter(self: &Arc<Self>, stop: CancellationToken) {
        let sessions = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => match sessions.upgrade() {
                        Some(sessions) => sessions.count_bytes(),
                        None => return,
                    },
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[tokio::test(start_paused = true)]
    async fn sessions_are_listed_while_they_live_and_their_bytes_are_counted_once() {
        let metrics = Metrics::new();
        let backend =
            Backend::new("127.0.0.1:7000".parse().unwrap(), "web", "b0", &metrics, false, &CancellationToken::new());
        let sessions = Arc::new(Sessions::default());
        let guard = sessions.open("127.0.0.1:5000".parse().unwrap(), &backend);
        guard.session.to_backend.fetch_add(100, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let listed = sessions.list(10);
        assert_eq!((listed.len(), listed[0].bytes_to_backend, listed[0].age_ms), (1, 100, 1500));
        // The flusher counts the 100 bytes while it is open...
        sessions.count_bytes();
        assert_eq!(backend.metrics.bytes_to_backend.get(), 100);
        // ...and its end only what came after.
        guard.session.to_backend.fetch_add(20, Ordering::Relaxed);
        sessions.count_bytes();
        sessions.count_bytes();
        drop(guard);
        assert_eq!(backend.metrics.bytes_to_backend.get(), 120);
        assert!(sessions.is_empty());
        // Killing cancels its token.
        let guard = sessions.open("127.0.0.1:5001".parse().unwrap(), &backend);
        assert!(sessions.kill(guard.session.id) && guard.session.kill.is_killed());
        assert!(!sessions.kill(999));
    }
}
