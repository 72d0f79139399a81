//! The fleet's picture: which backends a service has and what state each is in.
//!
//! [`pool`] is the immutable set a connection is placed from (rebuilt whole and swapped);
//! [`membership`] owns a service's backends and rebuilds the pool on every change (config,
//! admin API, DNS, checks, drains); [`discovery`] follows DNS names; [`health`] runs the active
//! checks, each probe by [`probe`] (TCP, send/expect, HTTP, Redis, PostgreSQL, MySQL), and
//! [`agent`] asks each backend's agent for its state and weight.

pub(crate) mod agent;
pub(crate) mod discovery;
pub(crate) mod health;
pub(crate) mod membership;
pub(crate) mod pool;
pub(crate) mod probe;

pub use pool::{cooldown_after, BackendPool, BackendState, Health};
