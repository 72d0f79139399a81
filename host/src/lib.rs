//! Harbor: a load balancer whose backend choice is made by a sandboxed, hot-swappable
//! WebAssembly component.
//!
//! The crate is in layers; read it in this order.
//! - [`config`]: every setting declared once (flag, variable, file key, default, range, help),
//!   turned from a typed file into a validated [`Config`].
//! - `server`: a whole [`Harbor`]: binds, serves, and drains at the end of its lifecycle.
//! - `proxy`: the data plane, one connection from accept to close (accept → connection →
//!   strategy → connect → relay → report).
//! - `strategy`: which backend a connection gets. The selector (pick, judge, fallback, revert,
//!   shadow, watch) sits on `strategy::runtime`, the wasmtime engine and its guests.
//! - `tls`: TLS termination: certificates by SNI, reloaded live, handshakes counted.
//! - `backends`: the fleet's picture: the pool, membership, DNS discovery and health checks.
//! - `control`: the control plane: shared state, reload, admin API, status page, binary
//!   upgrade, systemd.
//! - Beside them: `metrics`, `logging` and `access_log`, used by every layer.

pub(crate) mod access_log;
pub mod backends;
mod clock;
pub mod config;
pub mod control;
pub mod echo;
mod error;
pub mod logging;
pub(crate) mod metrics;
pub mod proxy;
mod server;
pub mod strategy;
pub mod tls;

pub use config::{Config, RunArgs};
pub use error::HarborError;
pub use metrics::Metrics;
pub use server::{DrainReport, Harbor, RunningHarbor};
