//! The process-wide wasmtime engine: epoch ticker for wall-clock deadlines, a linker that
//! provides nothing (no WASI), and a cache of compiled components keyed by content hash.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, StoreLimits};

/// Instructions (roughly) one call may execute: ~10-40 ms of guest work, 100x what a
/// Python or JavaScript strategy needs per pick.
pub const FUEL_PER_CALL: u64 = 20_000_000;
/// `init` may do more (build tables, parse configuration).
pub const FUEL_PER_INIT: u64 = 20 * FUEL_PER_CALL;

/// How often the epoch advances. A call's deadline is a whole number of ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Host state of one guest store.
pub struct GuestState {
    pub limits: StoreLimits,
}

/// Shared compilation machinery.
pub struct StrategyEngine {
    pub engine: Engine,
    pub linker: Linker<GuestState>,
    compiled: Mutex<HashMap<String, Component>>,
}

/// Most components kept compiled in memory (swapping back to one of them is instant).
const COMPILED_CACHE_ENTRIES: usize = 32;

impl StrategyEngine {
    /// The engine every Harbor in this process shares; created on first use.
    pub fn global() -> &'static Arc<StrategyEngine> {
        static ENGINE: OnceLock<Arc<StrategyEngine>> = OnceLock::new();
        ENGINE.get_or_init(|| Arc::new(StrategyEngine::new()))
    }

    fn new() -> StrategyEngine {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Fuel bounds a call's work deterministically (a busy loop ends after the same number of
        // instructions however loaded the machine is); the epoch deadline bounds wall-clock time.
        config.consume_fuel(true);
        config.max_wasm_stack(512 * 1024);
        // Guests are small; don't reserve 4 GiB of address space per instance.
        config.memory_reservation(64 << 20);
        config.memory_guard_size(64 << 10);
        let engine = match Engine::new(&config) {
            Ok(engine) => engine,
            // Only reachable if the settings above are unsupported on this platform: fall back
            // to defaults with deadlines, which every wasmtime platform supports.
            Err(_) => Engine::new(Config::new().epoch_interruption(true).consume_fuel(true)).unwrap_or_default(),
        };
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("harbor-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .ok();
        let linker = Linker::new(&engine);
        StrategyEngine { engine, linker, compiled: Mutex::new(HashMap::new()) }
    }

    /// Compiles `bytes` (blocking: call from a blocking thread), reusing an earlier compile of
    /// the same content.
    pub fn compile(&self, sha256: &str, bytes: &[u8]) -> wasmtime::Result<Component> {
        if let Some(hit) = self.compiled.lock().ok().and_then(|c| c.get(sha256).cloned()) {
            return Ok(hit);
        }
        let component = Component::new(&self.engine, bytes)?;
        if let Ok(mut cache) = self.compiled.lock() {
            if cache.len() >= COMPILED_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(sha256.to_string(), component.clone());
        }
        Ok(component)
    }

    /// The names of everything the component imports that Harbor does not provide. Type-only
    /// imports of Harbor's own `types` interface are fine.
    pub fn foreign_imports(&self, component: &Component) -> Vec<String> {
        component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .filter(|name| !name.starts_with("harbor:strategy/types"))
            .collect()
    }
}

/// Ticks for a wall-clock deadline of `timeout` (at least 2, so a call that starts just before
/// a tick still gets one whole tick).
pub fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}
