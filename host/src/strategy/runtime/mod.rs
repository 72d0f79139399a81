//! The WebAssembly runtime under the selector: one wasmtime engine ([`engine`]), compiled
//! components with their limits ([`loaded`], cached on disk by [`disk_cache`]), per-thread
//! instances ([`instance`]), the WIT bindings of each world ([`bindings`]), the host functions
//! guests import ([`guest_host`]) and the WASI sandbox ([`wasi`]).

pub mod bindings;
pub mod disk_cache;
pub mod engine;
pub mod guest_host;
pub mod instance;
pub mod loaded;
pub mod wasi;
