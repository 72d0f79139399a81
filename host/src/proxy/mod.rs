//! The data plane: from a listening socket to bytes relayed both ways, for one connection.
//!
//! A connection's path: [`service`] (a service's listeners and the context each connection
//! gets) → [`accept`] (accept loop, caps) → [`connection`] (one client, start to end: preamble,
//! placement, relay, report) → the strategy (`crate::strategy`) → [`connect`] (dial under a
//! deadline) → [`relay`] (both ways, half-close, deadlines; [`splice`] for bulk bursts, or
//! [`kernel_relay`] with `relay = "kernel"`). Before placing, [`proxy_protocol`] reads a trusted
//! PROXY header and [`peek`] reads the first bytes ([`client_hello`] for TLS). [`source_limit`]
//! caps connections per client network; [`shards`] runs all of it thread-per-core. With
//! `[service.tls]` the client's side is terminated first (`crate::tls`) and relayed by
//! [`stream_relay`].

pub(crate) mod accept;
pub(crate) mod admission;
pub mod client_hello;
pub(crate) mod connect;
pub(crate) mod connection;
pub(crate) mod context;
pub(crate) mod http;
#[cfg(target_os = "linux")]
pub(crate) mod kernel_relay;
pub(crate) mod listener;
pub(crate) mod peek;
pub mod proxy_protocol;
pub(crate) mod queue;
pub(crate) mod relay;
pub(crate) mod service;
pub(crate) mod sessions;
pub(crate) mod shards;
pub(crate) mod source_limit;
#[cfg(target_os = "linux")]
pub(crate) mod splice;
pub(crate) mod stream_relay;

pub use relay::RelayEnd;
