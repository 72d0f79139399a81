//! Write Harbor load-balancing strategies in Rust: implement [`Strategy`], then call
//! [`export_strategy!`]. The WIT plumbing (`wit/v0.2/strategy.wit`, the
//! `harbor:strategy@0.2.0` world) stays hidden.
//!
//! A complete strategy, "random among the healthy backends, weighted":
//!
//! ```
//! use harbor_guest_sdk::{export_strategy, Pick, Strategy};
//!
//! struct WeightedRandom;
//!
//! impl Strategy for WeightedRandom {
//!     const NAME: &'static str = "weighted-random";
//!
//!     fn init(_config: &str) -> Result<Self, String> {
//!         Ok(WeightedRandom)
//!     }
//!
//!     fn pick(&mut self, pick: &Pick<'_>) -> Option<u32> {
//!         pick.weighted_choice(pick.eligible(), pick.seed())
//!     }
//! }
//!
//! export_strategy!(WeightedRandom);
//! # fn main() {}
//! ```
//!
//! Build it for `wasm32-unknown-unknown` and wrap it as a component (`cargo xtask build`
//! does both for the strategies in this repository):
//!
//! ```text
//! cargo build --target wasm32-unknown-unknown --profile guest -p my_strategy
//! wasm-tools component new target/wasm32-unknown-unknown/guest/my_strategy.wasm -o my_strategy.wasm
//! ```
//!
//! Harbor runs one instance of the component per worker thread and replaces an instance after
//! a trap, so `self` is per-instance scratch state. Anything that must hold across instances
//! (a rotation, say) should be derived from [`Pick::sequence`] and [`Pick::seed`], or kept in
//! the store of [`kv`], which every instance shares and which survives hot swaps.
//!
//! Precompute what depends only on the backends (a hash table, a ring) in
//! [`Strategy::set_backends`]: it runs once per membership change, not per pick.
//!
//! ```
//! use harbor_guest_sdk::{export_strategy, log, BackendList, LogLevel, Pick, Strategy};
//!
//! /// Only backends tagged with the configured zone, least loaded first.
//! struct ZoneOnly { zone: String, in_zone: Vec<bool> }
//!
//! impl Strategy for ZoneOnly {
//!     const NAME: &'static str = "zone-only";
//!
//!     fn init(config: &str) -> Result<Self, String> {
//!         Ok(ZoneOnly { zone: config.trim().to_string(), in_zone: Vec::new() })
//!     }
//!
//!     fn set_backends(&mut self, backends: &BackendList<'_>) {
//!         self.in_zone = backends.iter().map(|b| b.has_tag(&self.zone)).collect();
//!         log(LogLevel::Info, &format!("{} backends in {}", self.in_zone.iter().filter(|z| **z).count(), self.zone));
//!     }
//!
//!     fn pick(&mut self, pick: &Pick<'_>) -> Option<u32> {
//!         let zoned = pick.eligible().filter(|b| self.in_zone.get(b.index as usize) == Some(&true));
//!         zoned.min_by_key(|b| b.active).or_else(|| pick.eligible().min_by_key(|b| b.active)).map(|b| b.index)
//!     }
//! }
//!
//! export_strategy!(ZoneOnly);
//! # fn main() {}
//! ```

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};

#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "strategy",
        path: "../wit/v0.2/strategy.wit",
        pub_export_macro: true,
        export_macro_name: "__export_strategy_world",
        default_bindings_module: "harbor_guest_sdk::bindings",
    });
}

use bindings::harbor::strategy::host as wit_host;
use bindings::harbor::strategy::types as wit;

/// Numbers per backend in the `stats` list of `pick` (see `wit/v0.2/strategy.wit`).
pub const STATS_STRIDE: usize = 5;

pub use wit::LogLevel;

/// Writes a line to Harbor's log, tagged with this strategy's name and sha256. Harbor
/// rate-limits it per strategy: over the limit, lines are dropped (and counted), never
/// slowing a pick.
pub fn log(level: LogLevel, message: &str) {
    wit_host::log(level, message);
}

/// A small key-value store shared by every instance of this strategy (one per Harbor worker
/// thread), kept across hot swaps to a strategy of the same name. Bounded by the operator
/// (`strategy_kv_entries`, `strategy_kv_bytes`): [`kv::set`] says when it is full. Not
/// available during the very first `init` of a load (Harbor learns the strategy's name there).
pub mod kv {
    use super::wit_host;

    /// The value under `key`, unless absent or expired.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        wit_host::kv_get(key)
    }

    /// Stores `value` under `key`, until `ttl_millis` passes (never without one).
    pub fn set(key: &str, value: &[u8], ttl_millis: Option<u64>) -> Result<(), String> {
        wit_host::kv_set(key, value, ttl_millis)
    }

    /// Removes `key`.
    pub fn delete(key: &str) {
        wit_host::kv_delete(key)
    }

    /// A `u64` under `key` (stored as 8 little-endian bytes).
    pub fn get_u64(key: &str) -> Option<u64> {
        get(key).and_then(|v| v.try_into().ok()).map(u64::from_le_bytes)
    }

    /// Stores a `u64` under `key`.
    pub fn set_u64(key: &str, value: u64, ttl_millis: Option<u64>) -> Result<(), String> {
        set(key, &value.to_le_bytes(), ttl_millis)
    }
}

/// Where a backend came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The configuration's `backends` list.
    Static,
    /// A DNS name of the configuration.
    Dns,
    /// Added through the admin API.
    Api,
}

impl From<wit::BackendSource> for Source {
    fn from(s: wit::BackendSource) -> Self {
        match s {
            wit::BackendSource::StaticList => Source::Static,
            wit::BackendSource::Dns => Source::Dns,
            wit::BackendSource::Api => Source::Api,
        }
    }
}

/// A backend's static facts, as `set-backends` gives them.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    info: &'a wit::BackendInfo,
}

impl<'a> Member<'a> {
    pub fn index(&self) -> u32 {
        self.info.index
    }
    pub fn address(&self) -> &'a str {
        &self.info.address
    }
    pub fn weight(&self) -> u32 {
        self.info.weight.max(1)
    }
    pub fn tags(&self) -> &'a [String] {
        &self.info.tags
    }
    pub fn has_tag(&self, tag: &str) -> bool {
        self.info.tags.iter().any(|t| t == tag)
    }
    pub fn source(&self) -> Source {
        self.info.source.into()
    }
}

/// The backends as `set-backends` gives them, in index order.
#[derive(Debug, Clone, Copy)]
pub struct BackendList<'a> {
    infos: &'a [wit::BackendInfo],
}

impl<'a> BackendList<'a> {
    pub fn new(infos: &'a [wit::BackendInfo]) -> Self {
        BackendList { infos }
    }
    pub fn len(&self) -> usize {
        self.infos.len()
    }
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = Member<'a>> + 'a {
        self.infos.iter().map(|info| Member { info })
    }
    pub fn get(&self, index: usize) -> Option<Member<'a>> {
        self.infos.get(index).map(|info| Member { info })
    }
}

thread_local! {
    static SERVICE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The name of the service this strategy places connections for (`default` for the one the
/// flags describe), known from `init` on.
pub fn service_name() -> String {
    SERVICE.with(|s| s.borrow().clone())
}

/// The state of a backend at pick time. Only [`BackendState::Healthy`] backends are eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// Accepting new connections.
    Healthy,
    /// A recent connect failed; not eligible until the cooldown ends.
    CoolingDown,
    /// Being removed: existing connections finish, new ones go elsewhere.
    Draining,
    /// Marked down.
    Unhealthy,
}

impl BackendState {
    fn from_ordinal(value: u32) -> Self {
        match value {
            0 => BackendState::Healthy,
            1 => BackendState::CoolingDown,
            2 => BackendState::Draining,
            _ => BackendState::Unhealthy,
        }
    }
}

/// Everything Harbor knows about one backend at pick time.
#[derive(Debug, Clone, Copy)]
pub struct Backend<'a> {
    /// The index to return from [`Strategy::pick`] to choose this backend.
    pub index: u32,
    /// The backend's address, e.g. `127.0.0.1:9001`.
    pub address: &'a str,
    /// Relative capacity, at least 1.
    pub weight: u32,
    /// Connections relayed to it right now.
    pub active: u32,
    /// Its state; only `Healthy` backends may be returned.
    pub state: BackendState,
    /// Moving average of recent connect latency, microseconds (0 before the first connect).
    pub connect_latency_micros: u32,
    /// Connect failures in a row.
    pub failures: u32,
    /// How long it has been healthy without a break, in ms (0 while not healthy): ramp a
    /// backend that just came back up with this (slow start).
    pub healthy_for_millis: u32,
    /// The operator's tags.
    pub tags: &'a [String],
    /// Where it came from.
    pub source: Source,
}

impl Backend<'_> {
    /// True if the backend may be returned by `pick`.
    pub fn is_eligible(&self) -> bool {
        self.state == BackendState::Healthy
    }

    /// True if the operator tagged it `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

fn ip_of(ip: wit::IpAddress) -> IpAddr {
    match ip {
        wit::IpAddress::Ipv4(v4) => IpAddr::from(v4.to_be_bytes()),
        wit::IpAddress::Ipv6((hi, lo)) => IpAddr::from(((u128::from(hi) << 64) | u128::from(lo)).to_be_bytes()),
    }
}

fn socket_of(addr: &wit::SocketAddress) -> SocketAddr {
    SocketAddr::new(ip_of(addr.ip), addr.port)
}

/// How a connection ended, given to [`Strategy::report`] when [`Strategy::WANTS_REPORTS`] is set.
pub type Outcome = wit::ConnectionOutcome;

/// One pick: the connection being placed and a view of every backend.
pub struct Pick<'a> {
    conn: &'a wit::Connection,
    backends: &'a [wit::BackendInfo],
    stats: &'a [u32],
    /// Asked of Harbor on first use only (`current-connection`).
    details: std::cell::OnceCell<wit::ConnectionDetails>,
}

impl<'a> Pick<'a> {
    /// Builds a pick from its parts. Harbor's exports do this for you; it is public so that
    /// strategies can be unit-tested natively.
    pub fn new(conn: &'a wit::Connection, backends: &'a [wit::BackendInfo], stats: &'a [u32]) -> Self {
        Pick { conn, backends, stats, details: std::cell::OnceCell::new() }
    }

    /// [`Pick::new`] with the connection's details given (native tests; in Harbor they are
    /// asked for on first use).
    pub fn with_details(
        conn: &'a wit::Connection,
        backends: &'a [wit::BackendInfo],
        stats: &'a [u32],
        details: wit::ConnectionDetails,
    ) -> Self {
        let pick = Pick::new(conn, backends, stats);
        let _ = pick.details.set(details);
        pick
    }

    fn details(&self) -> &wit::ConnectionDetails {
        self.details.get_or_init(wit_host::current_connection)
    }

    /// Grows by one per pick across every instance and hot swap: use it for rotations.
    pub fn sequence(&self) -> u64 {
        self.conn.sequence
    }

    /// A fresh random number for this pick.
    pub fn seed(&self) -> u64 {
        self.conn.seed
    }

    /// 0 for a connection's first try, then 1, 2, … for retries after failed connects.
    pub fn attempt(&self) -> u32 {
        self.conn.attempt
    }

    /// The client's address: the TCP peer (see [`Pick::proxied_client`] behind a proxy).
    pub fn client_ip(&self) -> IpAddr {
        ip_of(self.conn.client_ip)
    }

    /// The address and port the client connected to. (This and the peek data below are
    /// asked of Harbor on first use, once per pick: a strategy that never looks pays nothing.)
    pub fn local_addr(&self) -> SocketAddr {
        socket_of(&self.details().local)
    }

    /// The original client from a trusted PROXY protocol header, if there was one.
    pub fn proxied_client(&self) -> Option<SocketAddr> {
        self.details().proxied_client.as_ref().map(socket_of)
    }

    /// Milliseconds on a monotonic clock every instance shares, for decaying averages.
    pub fn now_millis(&self) -> u64 {
        self.conn.now_millis
    }

    /// The TLS server name (SNI), lower-cased, when the service peeks for TLS.
    pub fn server_name(&self) -> Option<&str> {
        self.details().tls.as_ref().and_then(|t| t.server_name.as_deref())
    }

    /// The ALPN protocols the client offered, when the service peeks for TLS.
    pub fn alpn(&self) -> &[String] {
        self.details().tls.as_ref().map_or(&[], |t| t.alpn.as_slice())
    }

    /// The first bytes the client sent, up to the service's `peek_bytes` (empty without a peek).
    pub fn first_bytes(&self) -> &[u8] {
        &self.details().first_bytes
    }

    /// The client's source port.
    pub fn client_port(&self) -> u16 {
        self.conn.client_port
    }

    /// A stable 64-bit hash of the client's IP (not its port): the same client lands on the
    /// same value in every instance, for session affinity.
    pub fn client_hash(&self) -> u64 {
        let bytes: u128 = match self.conn.client_ip {
            wit::IpAddress::Ipv4(v4) => u128::from(v4),
            wit::IpAddress::Ipv6((hi, lo)) => (u128::from(hi) << 64) | u128::from(lo),
        };
        mix64((bytes as u64) ^ mix64((bytes >> 64) as u64))
    }

    /// How many backends there are (eligible or not).
    pub fn len(&self) -> usize {
        self.backends.len().min(self.stats.len() / STATS_STRIDE)
    }

    /// True if there are no backends at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Backend `index`, if it exists.
    pub fn backend(&self, index: usize) -> Option<Backend<'a>> {
        let info = self.backends.get(index)?;
        let s = self.stats.get(index * STATS_STRIDE..(index + 1) * STATS_STRIDE)?;
        Some(Backend {
            index: index as u32,
            address: info.address.as_str(),
            weight: info.weight.max(1),
            active: s[0],
            state: BackendState::from_ordinal(s[1]),
            connect_latency_micros: s[2],
            failures: s[3],
            healthy_for_millis: s[4],
            tags: info.tags.as_slice(),
            source: info.source.into(),
        })
    }

    /// Every backend, in index order.
    pub fn backends(&self) -> impl Iterator<Item = Backend<'a>> + Clone + '_ {
        (0..self.len()).filter_map(move |i| self.backend(i))
    }

    /// The backends that may be returned, in index order.
    pub fn eligible(&self) -> impl Iterator<Item = Backend<'a>> + Clone + '_ {
        self.backends().filter(Backend::is_eligible)
    }

    /// The eligible backends starting at position `start` (modulo their count) and wrapping
    /// around: iterate from `pick.sequence()` so that ties do not always favour index 0.
    pub fn eligible_from(&self, start: u64) -> impl Iterator<Item = Backend<'a>> + '_ {
        let n = self.len().max(1);
        let offset = (start % n as u64) as usize;
        (0..self.len()).filter_map(move |i| self.backend((i + offset) % n)).filter(Backend::is_eligible)
    }

    /// Chooses among `candidates` in proportion to their weight, using `random`
    /// (e.g. [`Pick::seed`], or [`Pick::client_hash`] for affinity). `None` if empty.
    pub fn weighted_choice<I>(&self, candidates: I, random: u64) -> Option<u32>
    where
        I: Iterator<Item = Backend<'a>> + Clone,
    {
        let total: u64 = candidates.clone().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = mix64(random) % total;
        for b in candidates {
            let w = u64::from(b.weight);
            if point < w {
                return Some(b.index);
            }
            point -= w;
        }
        None
    }
}

/// A strong 64-bit mixer (SplitMix64's finaliser): turns sequence numbers, seeds and hashes
/// into well-spread values.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A load-balancing strategy. Implement it, then call [`export_strategy!`] with the type.
pub trait Strategy: Sized + 'static {
    /// Shown by Harbor's admin endpoint and logs.
    const NAME: &'static str;
    /// Set to true to receive [`Strategy::report`] calls (each has a cost).
    const WANTS_REPORTS: bool = false;

    /// Creates the strategy from the operator's configuration string (empty if unset).
    /// An `Err` rejects the strategy; Harbor keeps the one it had and logs the message.
    fn init(config: &str) -> Result<Self, String>;

    /// The backends changed (and once before the first pick): precompute per-backend values
    /// here, once per membership change, instead of on every pick.
    fn set_backends(&mut self, _backends: &BackendList<'_>) {}

    /// Chooses a backend: return the `index` of an eligible backend, or `None` if there is none.
    fn pick(&mut self, pick: &Pick<'_>) -> Option<u32>;

    /// A connection this strategy placed ended. Only called if `WANTS_REPORTS` is true.
    fn report(&mut self, _outcome: &Outcome) {}
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    /// Per-instance state of an exported strategy. A component instance is single-threaded.
    pub struct Slot<S> {
        strategy: Option<S>,
        backends: Vec<wit::BackendInfo>,
    }

    impl<S: Strategy> Slot<S> {
        pub const fn new() -> Self {
            Slot { strategy: None, backends: Vec::new() }
        }
    }

    impl<S: Strategy> Default for Slot<S> {
        fn default() -> Self {
            Self::new()
        }
    }

    pub fn init<S: Strategy>(
        slot: &RefCell<Slot<S>>,
        config: String,
        service: wit::ServiceInfo,
    ) -> Result<wit::StrategyInfo, String> {
        SERVICE.with(|s| *s.borrow_mut() = service.name);
        let strategy = S::init(&config)?;
        slot.borrow_mut().strategy = Some(strategy);
        Ok(wit::StrategyInfo { name: S::NAME.to_string(), wants_reports: S::WANTS_REPORTS })
    }

    pub fn set_backends<S: Strategy>(slot: &RefCell<Slot<S>>, backends: Vec<wit::BackendInfo>) {
        let mut slot = slot.borrow_mut();
        let Slot { strategy, backends: kept } = &mut *slot;
        *kept = backends;
        if let Some(strategy) = strategy.as_mut() {
            strategy.set_backends(&BackendList::new(kept));
        }
    }

    pub fn pick<S: Strategy>(slot: &RefCell<Slot<S>>, conn: wit::Connection, stats: Vec<u32>) -> Option<u32> {
        let mut slot = slot.borrow_mut();
        let Slot { strategy, backends } = &mut *slot;
        let strategy = strategy.as_mut()?;
        strategy.pick(&Pick::new(&conn, backends, &stats))
    }

    pub fn report<S: Strategy>(slot: &RefCell<Slot<S>>, outcome: wit::ConnectionOutcome) {
        if let Some(strategy) = slot.borrow_mut().strategy.as_mut() {
            strategy.report(&outcome);
        }
    }
}

/// Exports a [`Strategy`] implementation as the component's `harbor:strategy/strategy` world.
/// Call it once, at the top level of the crate.
#[macro_export]
macro_rules! export_strategy {
    ($strategy:ty) => {
        const _: () = {
            use $crate::bindings::harbor::strategy::types as __wit;

            ::std::thread_local! {
                static __HARBOR_SLOT: ::std::cell::RefCell<$crate::__private::Slot<$strategy>> =
                    const { ::std::cell::RefCell::new($crate::__private::Slot::new()) };
            }

            struct __HarborExports;

            impl $crate::bindings::Guest for __HarborExports {
                fn init(
                    config: ::std::string::String,
                    service: __wit::ServiceInfo,
                ) -> ::std::result::Result<__wit::StrategyInfo, ::std::string::String> {
                    __HARBOR_SLOT.with(|slot| $crate::__private::init::<$strategy>(slot, config, service))
                }
                fn set_backends(_generation: u64, backends: ::std::vec::Vec<__wit::BackendInfo>) {
                    __HARBOR_SLOT.with(|slot| $crate::__private::set_backends::<$strategy>(slot, backends))
                }
                fn pick(conn: __wit::Connection, stats: ::std::vec::Vec<u32>) -> ::std::option::Option<u32> {
                    __HARBOR_SLOT.with(|slot| $crate::__private::pick::<$strategy>(slot, conn, stats))
                }
                fn report(outcome: __wit::ConnectionOutcome) {
                    __HARBOR_SLOT.with(|slot| $crate::__private::report::<$strategy>(slot, outcome))
                }
            }

    $crate::bindings::__export_strategy_world!(__HarborExports with_types_in $crate::bindings);
        };
    };
}

/// WIT types, re-exported for native unit tests of strategies.
pub mod types {
    pub use super::wit::{
        BackendInfo, BackendSource, Connection, ConnectionDetails, ConnectionOutcome, IpAddress, ServiceInfo,
        SocketAddress, TlsHello,
    };
}
