//! The data plane: from a listening socket to bytes relayed both ways, for one connection.
//!
//! A connection's path: [`service`] (a service's listeners and the context each connection
//! gets) → [`accept`] (accept loop, caps) → [`connection`] (one client, start to end: preamble,
//! placement, relay, report) → the strategy (`crate::strategy`) → [`connect`] (dial under a
//! deadline) → [`relay`] (both ways, half-close, deadlines; [`splice`] for bulk bursts, or
//! [`kernel_relay`] with `relay = "kernel"`). Before placing, [`proxy_protocol`] reads a trusted
//! PROXY header and [`peek`] reads the first bytes ([`client_hello`] for TLS). [`source_limit`]
//! caps connections per client network; [`shards`] runs all of it thread-per-core.

pub mod accept;
pub mod admission;
pub mod client_hello;
pub mod connect;
pub mod connection;
pub mod context;
#[cfg(target_os = "linux")]
pub mod kernel_relay;
pub mod listener;
pub mod peek;
pub mod proxy_protocol;
pub mod relay;
pub mod service;
pub mod shards;
pub mod source_limit;
#[cfg(target_os = "linux")]
pub mod splice;
