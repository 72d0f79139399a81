//! The host state of one guest's store: its memory limiter, its call clock, what the 0.2
//! host functions answer from (the strategy's context, the connection being placed) and its
//! WASI sandbox.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtxView, WasiView};

use super::bindings::{self, v2};
use super::deadline::CallClock;
use super::guest_host::{GuestContext, PendingDetails};
use super::wasi::Sandbox;

/// Bytes one table element is counted as, towards the instance's memory limit.
const TABLE_ELEMENT_BYTES: usize = 16;

/// Counts of core instances, tables and memories an instance may create. Generous:
/// componentize-py and componentize-js components link dozens of core instances and tables.
const MAX_INSTANCES: usize = 256;
const MAX_TABLES: usize = 256;
const MAX_MEMORIES: usize = 16;

/// Limits every linear memory and table of one store *together*: the sum of their sizes may
/// not pass `limit_bytes` (wasmtime's `StoreLimits` caps each memory on its own, so a guest
/// with 16 memories could take 16 times the limit). A refused growth traps.
#[derive(Debug)]
pub struct GuestLimiter {
    limit_bytes: usize,
    used_bytes: usize,
}

impl GuestLimiter {
    pub fn new(limit_bytes: usize) -> GuestLimiter {
        GuestLimiter { limit_bytes, used_bytes: 0 }
    }

    /// Bytes of memory and table the instance holds now.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// Bytes the instance may hold at most.
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    fn grow(&mut self, what: &str, by_bytes: usize) -> wasmtime::Result<bool> {
        let total = self.used_bytes.saturating_add(by_bytes);
        if total > self.limit_bytes {
            return Err(wasmtime::Error::msg(format!(
                "{what} growth refused: the instance would hold {total} bytes of memory and tables, over its limit of {} bytes",
                self.limit_bytes
            )));
        }
        self.used_bytes = total;
        Ok(true)
    }
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.grow("memory", desired.saturating_sub(current))
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.grow("table", desired.saturating_sub(current).saturating_mul(TABLE_ELEMENT_BYTES))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Host state of one guest store.
pub struct GuestState {
    pub limiter: GuestLimiter,
    /// The strategy's log budget, name and store (0.2 imports).
    pub context: Option<Arc<GuestContext>>,
    /// The connection being placed, for `current-connection` (0.2, during `pick` only).
    pub details: Option<PendingDetails>,
    /// The WASI sandbox of a component that imports WASI; `None` for a pure one.
    pub sandbox: Option<Box<Sandbox>>,
    /// The running call's deadline.
    pub clock: CallClock,
}
impl v2::harbor::strategy::types::Host for GuestState {}

impl v2::Host for GuestState {
    fn log(&mut self, level: v2::LogLevel, message: String) {
        if let Some(context) = self.context.as_ref() {
            context.log(level, &message);
        }
    }

    fn current_connection(&mut self) -> v2::ConnectionDetails {
        let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        let nowhere = bindings::LocalAddr::Known(unspecified);
        let details = self.details.as_ref();
        let facts = bindings::ConnectionFacts {
            sequence: 0,
            seed: 0,
            client: unspecified,
            attempt: 0,
            local: details.map_or(nowhere, |d| d.local),
            proxied_client: details.and_then(|d| d.proxied_client),
            now_millis: 0,
            tls: details.and_then(|d| d.tls.as_ref()),
            first_bytes: details.map_or(&[], |d| d.first_bytes.as_slice()),
        };
        facts.v2_details()
    }

    fn kv_get(&mut self, key: String) -> Option<Vec<u8>> {
        let store = self.context.as_ref()?.kv()?;
        store.get(&key, super::now_millis())
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>, ttl_millis: Option<u64>) -> Result<(), String> {
        let Some(store) = self.context.as_ref().and_then(|c| c.kv()) else {
            return Err("the store is not available during a strategy's first init".into());
        };
        store.set(key, value, ttl_millis, super::now_millis())
    }

    fn kv_delete(&mut self, key: String) {
        if let Some(store) = self.context.as_ref().and_then(|c| c.kv()) {
            store.delete(&key);
        }
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        // Every sandboxed instance has one from the start; an empty one stands in otherwise,
        // so this never fails.
        let sandbox = self.sandbox.get_or_insert_with(|| Box::new(Sandbox::new(None)));
        sandbox.view()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_sums_every_memory_and_table() {
        let mut limiter = GuestLimiter::new(8 << 20);
        // Three memories of 2 MiB each fit; a fourth 3 MiB does not, though it alone would.
        for _ in 0..3 {
            assert!(limiter.memory_growing(0, 2 << 20, None).unwrap());
        }
        assert!(limiter.memory_growing(0, 3 << 20, None).is_err());
        assert_eq!(limiter.used_bytes(), 6 << 20);
        // Tables count too: 2 MiB / 16 bytes per element is the rest.
        assert!(limiter.table_growing(0, (2 << 20) / TABLE_ELEMENT_BYTES, None).unwrap());
        assert!(limiter.table_growing(10, 11, None).is_err());
    }
}
