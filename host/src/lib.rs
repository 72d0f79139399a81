//! Harbor: an L4 (TCP) load balancer whose backend choice is made by a sandboxed,
//! hot-swappable WebAssembly component.
//!
//! The path of one connection, by file: `accept.rs` (accept loop, connection cap) →
//! `connection.rs` (one client, start to end) → `strategy/` (which backend?) → `connect.rs`
//! (dial under a timeout; retries and cooldown in `connection.rs` and `backend.rs`) →
//! `relay.rs` (bytes both ways, half-close, deadlines; `splice.rs` for bulk) → back in `connection.rs` to count and
//! report. `server.rs` ties it together and drains on shutdown.

pub mod accept;
pub mod admin;
pub mod backend;
pub mod config;
pub mod connect;
pub mod connection;
pub mod echo;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod server;
pub mod source_limit;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod strategy;

pub use config::{Config, RunArgs};
pub use server::{DrainReport, Harbor, HarborError, RunningHarbor};
