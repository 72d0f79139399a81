//! The WebAssembly runtime under the selector: one wasmtime engine ([`engine`]), compiled
//! components with their limits ([`loaded`], cached on disk by [`disk_cache`]), per-thread
//! instances ([`instance`]) with their store's state ([`store`]) and call deadlines
//! ([`deadline`]), the WIT bindings of each world ([`bindings`]), the host functions guests
//! import ([`guest_host`]) and the WASI sandbox ([`wasi`]).

pub(crate) mod bindings;
pub(crate) mod deadline;
pub(crate) mod disk_cache;
pub(crate) mod engine;
pub(crate) mod guest_host;
pub(crate) mod instance;
pub(crate) mod loaded;
pub(crate) mod store;
pub(crate) mod wasi;

pub use bindings::{BackendFacts, ConnectionFacts, LocalAddr, TlsFacts, World};
pub use engine::{fuel_per_call, CompiledFrom, StrategyEngine, CACHE_ENTRIES, SET_BACKENDS_FACTOR};
pub use guest_host::KvStore;
pub use instance::{CallFault, Instance, InstanceFault};
pub use loaded::sha256_hex;

use std::path::PathBuf;
use std::time::Duration;

/// Why a strategy could not be loaded or run. Each message says what to fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StrategyError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("the file is empty")]
    Empty,
    #[error("the file is {0} bytes, more than the 64 MiB limit")]
    TooLarge(u64),
    #[error("not a WebAssembly component: the file has no \\0asm header (and is not component text)")]
    NotWasm,
    #[error("this is a core wasm module, not a component: build for wasm32-unknown-unknown and wrap it with `wasm-tools component new` (or wit-component)")]
    CoreModule,
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("the component imports what Harbor does not provide ({0}); a strategy may import Harbor's interfaces and WASI 0.2 (cli, clocks, io, random; filesystem and sockets, which deny everything; http, whose calls trap), nothing else")]
    ForeignImports(String),
    #[error("the component does not implement the world it names: {0}")]
    WrongWorld(String),
    #[error("instantiation failed: {0}")]
    Instantiate(String),
    #[error("init rejected the configuration: {0}")]
    InitRejected(String),
    #[error("init trapped: {0}")]
    InitTrapped(String),
    #[error("set-backends faulted: {0}")]
    SetBackends(String),
    #[error("the wasm engine is not usable: {0}")]
    Engine(String),
    #[error("compiling took longer than {0:?}; the load is abandoned")]
    CompileTimeout(Duration),
    #[error("Harbor is shutting down; the load is abandoned")]
    ShuttingDown,
}

pub(crate) fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// Milliseconds on the clock every strategy instance shares (`now-millis`): monotonic, from
/// the first reading in this process.
pub fn now_millis() -> u64 {
    static START: std::sync::OnceLock<crate::clock::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(crate::clock::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}
