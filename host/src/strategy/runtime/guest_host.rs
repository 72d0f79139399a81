//! What Harbor offers a 0.2 strategy (`harbor:strategy/host@0.2.0`): `log`, turned into a
//! rate-limited tracing event tagged with the strategy's name and sha, and a small key-value
//! store shared by every instance of a strategy, bounded in entries and bytes, with a TTL per
//! entry, kept across hot swaps to a strategy of the same name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::bindings::v2;
use crate::logging::RateLimitedLog;

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 << 10;
/// Longest log line kept; the rest is cut.
pub const MAX_LOG_CHARS: usize = 1024;
/// Log lines a strategy may write per period before they are dropped (and counted).
const LOG_BURST: u64 = 50;
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// A strategy's store: `max_entries` keys and `max_bytes` of keys and values at most.
pub struct KvStore {
    max_entries: usize,
    max_bytes: usize,
    inner: Mutex<KvInner>,
}

#[derive(Default)]
struct KvInner {
    map: HashMap<String, (Vec<u8>, Option<u64>)>,
    bytes: usize,
}

impl KvStore {
    pub fn new(max_entries: usize, max_bytes: usize) -> KvStore {
        KvStore { max_entries, max_bytes, inner: Mutex::new(KvInner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KvInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value under `key` at `now_ms`, unless it has expired.
    pub fn get(&self, key: &str, now_ms: u64) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        match inner.map.get(key) {
            None => None,
            Some((_, Some(expiry))) if *expiry <= now_ms => {
                if let Some((value, _)) = inner.map.remove(key) {
                    inner.bytes -= key.len() + value.len();
                }
                None
            }
            Some((value, _)) => Some(value.clone()),
        }
    }

    /// Stores `value` under `key` until `ttl_ms` from `now_ms` passes.
    pub fn set(&self, key: String, value: Vec<u8>, ttl_ms: Option<u64>, now_ms: u64) -> Result<(), String> {
        if key.len() > MAX_KEY_BYTES {
            return Err(format!("key of {} bytes: at most {MAX_KEY_BYTES}", key.len()));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(format!("value of {} bytes: at most {MAX_VALUE_BYTES}", value.len()));
        }
        let expiry = ttl_ms.map(|ttl| now_ms.saturating_add(ttl));
        let mut inner = self.lock();
        let old = inner.map.get(&key).map_or(0, |(v, _)| key.len() + v.len());
        let fits = |inner: &KvInner| {
            let entries = inner.map.len() + usize::from(!inner.map.contains_key(&key));
            entries <= self.max_entries && inner.bytes - old + key.len() + value.len() <= self.max_bytes
        };
        if !fits(&inner) {
            // Make room from what has expired before refusing.
            let expired: Vec<String> =
                inner.map.iter().filter(|(_, (_, e))| e.is_some_and(|e| e <= now_ms)).map(|(k, _)| k.clone()).collect();
            for k in expired.iter().filter(|k| **k != key) {
                if let Some((v, _)) = inner.map.remove(k) {
                    inner.bytes -= k.len() + v.len();
                }
            }
            if !fits(&inner) {
                return Err(format!(
                    "the store is full ({} entries, {} bytes; limits {} and {})",
                    inner.map.len(),
                    inner.bytes,
                    self.max_entries,
                    self.max_bytes
                ));
            }
        }
        inner.bytes = inner.bytes - old + key.len() + value.len();
        inner.map.insert(key, (value, expiry));
        Ok(())
    }

    pub fn delete(&self, key: &str) {
        let mut inner = self.lock();
        if let Some((value, _)) = inner.map.remove(key) {
            inner.bytes -= key.len() + value.len();
        }
    }

    /// Entries held now (expired ones included until touched).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The stores of a service's strategies, by strategy name: a hot swap to a strategy of the
/// same name finds its store as it left it, if it comes back within [`KEPT_UNUSED`]. A
/// service keeps at most [`MAX_STORES`] stores, so they hold at most that many times
/// `strategy_kv_bytes` together; a store no loaded strategy uses is freed after
/// [`KEPT_UNUSED`], or at once when a new one needs its place.
pub struct KvStores {
    max_entries: usize,
    max_bytes: usize,
    stores: Mutex<HashMap<String, Kept>>,
}

struct Kept {
    store: Arc<KvStore>,
    /// When it was last seen unused (no strategy holds it); `None` while used.
    unused_since: Option<crate::clock::Instant>,
}

/// Most stores a service keeps (its active, previous and shadow strategies use three).
pub const MAX_STORES: usize = 8;
/// How long the store of a strategy no longer loaded is kept for a swap back.
pub const KEPT_UNUSED: Duration = Duration::from_secs(600);

impl KvStores {
    pub fn new(max_entries: usize, max_bytes: usize) -> KvStores {
        KvStores { max_entries, max_bytes, stores: Mutex::new(HashMap::new()) }
    }

    /// The store of the strategy named `name`.
    pub fn for_strategy(&self, name: &str) -> Arc<KvStore> {
        let mut stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        Self::sweep_locked(&mut stores, crate::clock::Instant::now());
        if let Some(kept) = stores.get_mut(name) {
            kept.unused_since = None;
            return Arc::clone(&kept.store);
        }
        if stores.len() >= MAX_STORES {
            // Make room: the store unused the longest goes (one in use never does).
            let oldest =
                stores.iter().filter_map(|(name, kept)| kept.unused_since.map(|since| (since, name.clone()))).min();
            if let Some((_, name)) = oldest {
                stores.remove(&name);
            }
        }
        let store = Arc::new(KvStore::new(self.max_entries, self.max_bytes));
        stores.insert(name.to_string(), Kept { store: Arc::clone(&store), unused_since: None });
        store
    }

    /// Frees the stores unused for [`KEPT_UNUSED`]; notes when the others became unused.
    pub fn sweep(&self) {
        let mut stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        Self::sweep_locked(&mut stores, crate::clock::Instant::now());
    }

    fn sweep_locked(stores: &mut HashMap<String, Kept>, now: crate::clock::Instant) {
        stores.retain(|_, kept| {
            if Arc::strong_count(&kept.store) > 1 {
                kept.unused_since = None;
                return true;
            }
            let since = *kept.unused_since.get_or_insert(now);
            now.duration_since(since) < KEPT_UNUSED
        });
    }

    /// Stores kept now.
    pub fn len(&self) -> usize {
        self.stores.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sweeps every minute until `stop` is cancelled.
    pub fn spawn_sweeper(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let stores = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => match stores.upgrade() {
                        Some(stores) => stores.sweep(),
                        None => return,
                    },
                }
            }
        });
    }
}

/// What a strategy's instances share: its identity (for log lines), its log budget and its
/// store. The name and the store are known once the first `init` has answered.
pub struct GuestContext {
    pub service: String,
    pub sha256: String,
    name: OnceLock<String>,
    kv: OnceLock<Arc<KvStore>>,
    log: RateLimitedLog,
    pub log_dropped: Counter,
}

impl GuestContext {
    pub fn new(service: &str, sha256: &str, log_dropped: Counter) -> GuestContext {
        GuestContext {
            service: service.to_string(),
            sha256: sha256.to_string(),
            name: OnceLock::new(),
            kv: OnceLock::new(),
            log: RateLimitedLog::new(LOG_BURST, LOG_PERIOD),
            log_dropped,
        }
    }

    /// The strategy's name (from its first `init`) and store.
    pub fn bind(&self, name: &str, kv: Arc<KvStore>) {
        let _ = self.name.set(name.to_string());
        let _ = self.kv.set(kv);
    }

    /// The strategy's store, once its first `init` has answered.
    pub fn kv(&self) -> Option<&Arc<KvStore>> {
        self.kv.get()
    }

    /// One line of the strategy's log (`log`, or its stdout and stderr under WASI): a tracing
    /// event tagged with its name, sha and service, within the log's budget; lines over it
    /// are counted as dropped.
    pub fn log(&self, level: v2::LogLevel, message: &str) {
        if !self.log.allow() {
            self.log_dropped.inc();
            return;
        }
        let (name, sha, service) = (self.name(), super::short(&self.sha256), self.service.as_str());
        let message = clean(message);
        match level {
            v2::LogLevel::Trace => {
                tracing::trace!(target: "harbor::guest", strategy = name, sha256 = sha, service, "{message}")
            }
            v2::LogLevel::Debug => {
                tracing::debug!(target: "harbor::guest", strategy = name, sha256 = sha, service, "{message}")
            }
            v2::LogLevel::Info => {
                tracing::info!(target: "harbor::guest", strategy = name, sha256 = sha, service, "{message}")
            }
            v2::LogLevel::Warn => {
                tracing::warn!(target: "harbor::guest", strategy = name, sha256 = sha, service, "{message}")
            }
            v2::LogLevel::Error => {
                tracing::error!(target: "harbor::guest", strategy = name, sha256 = sha, service, "{message}")
            }
        }
    }

    fn name(&self) -> &str {
        self.name.get().map_or("(initialising)", String::as_str)
    }
}

fn clean(message: &str) -> String {
    message.chars().filter(|c| !c.is_control() || *c == '\t').take(MAX_LOG_CHARS).collect()
}

/// The facts `current-connection` answers during one pick, kept cheap: addresses are copied,
/// the peek data only when there is some.
pub struct PendingDetails {
    pub local: super::bindings::LocalAddr,
    pub proxied_client: Option<std::net::SocketAddr>,
    pub tls: Option<super::bindings::TlsFacts>,
    pub first_bytes: Vec<u8>,
}

impl PendingDetails {
    pub fn of(conn: &super::bindings::ConnectionFacts<'_>) -> PendingDetails {
        PendingDetails {
            local: conn.local,
            proxied_client: conn.proxied_client,
            tls: conn.tls.cloned(),
            first_bytes: conn.first_bytes.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_bounded_in_entries_and_bytes_and_expires_entries() {
        let store = KvStore::new(2, 100);
        store.set("a".into(), vec![1; 10], None, 0).unwrap();
        store.set("b".into(), vec![2; 10], Some(50), 0).unwrap();
        assert!(store.set("c".into(), vec![3], None, 10).unwrap_err().contains("full"));
        // Replacing a key is not a new entry.
        store.set("a".into(), vec![4; 20], None, 10).unwrap();
        assert_eq!(store.get("a", 10), Some(vec![4; 20]));
        // Once b expires, c fits.
        assert_eq!(store.get("b", 49), Some(vec![2; 10]));
        store.set("c".into(), vec![3], None, 60).unwrap();
        assert_eq!(store.get("b", 60), None);
        assert!(store.set("d".into(), vec![0; 200], None, 60).is_err());
        assert!(store.set("x".repeat(MAX_KEY_BYTES + 1), vec![], None, 0).is_err());
        store.delete("a");
        assert_eq!(store.get("a", 60), None);
        assert_eq!(store.len(), 1);
        // Bytes are given back on delete: 99 bytes fit again.
        store.set("e".into(), vec![0; 97], None, 60).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn stores_are_bounded_in_number_and_freed_when_unused_for_long() {
        let stores = KvStores::new(10, 1000);
        // Twenty strategies with different names, each loaded and then swapped away.
        for i in 0..20 {
            let store = stores.for_strategy(&format!("s{i}"));
            store.set("k".into(), vec![0; 100], None, 0).unwrap();
        }
        assert!(stores.len() <= MAX_STORES, "{} stores kept", stores.len());
        // One in use is kept however long; the unused ones go after KEPT_UNUSED.
        let used = stores.for_strategy("used");
        stores.sweep();
        tokio::time::sleep(KEPT_UNUSED + Duration::from_secs(1)).await;
        stores.sweep();
        assert_eq!(stores.len(), 1);
        assert!(Arc::ptr_eq(&used, &stores.for_strategy("used")));
    }

    #[test]
    fn a_strategy_name_finds_its_store_again() {
        let stores = KvStores::new(10, 1000);
        stores.for_strategy("maglev").set("k".into(), b"v".to_vec(), None, 0).unwrap();
        assert_eq!(stores.for_strategy("maglev").get("k", 0), Some(b"v".to_vec()));
        assert_eq!(stores.for_strategy("other").get("k", 0), None);
    }
}
