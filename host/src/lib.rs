//! Harbor: an L4 (TCP) load balancer whose backend choice is made by a sandboxed,
//! hot-swappable WebAssembly component.
//!
//! The path of one connection, by file: `service.rs` (a service's listeners and the context
//! its connections get) → `accept.rs` (accept loop, connection caps) →
//! `connection.rs` (one client, start to end) → `strategy/` (which backend?) → `connect.rs`
//! (dial under a timeout; retries and cooldown in `connection.rs` and `backend.rs`) →
//! `relay.rs` (bytes both ways, half-close, deadlines; `splice.rs` for bulk) → back in `connection.rs` to count and
//! report. With `runtime = per-core`, all of it runs on the `shards.rs` thread that accepted
//! the client. Beside it: `membership.rs` (which backends a service has, drains), `discovery.rs`
//! (DNS backends),
//! `health.rs` (active checks), `admin.rs` (the admin API), `config/` (every setting, once);
//! `server.rs` ties it together, applies reloads and drains on shutdown.

pub mod accept;
pub mod access_log;
pub mod admin;
pub mod backend;
pub mod client_hello;
pub mod config;
pub mod connect;
pub mod connection;
pub mod discovery;
pub mod echo;
pub mod health;
#[cfg(target_os = "linux")]
pub mod kernel_relay;
pub mod listener;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod peek;
pub mod proxy_protocol;
pub mod relay;
pub mod reload;
pub mod server;
pub mod service;
pub mod shards;
pub mod source_limit;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod status_page;
pub mod strategy;
pub mod systemd;
pub mod upgrade;

pub use config::{Config, RunArgs};
pub use server::{DrainReport, Harbor, HarborError, RunningHarbor};
