//! What one connection runs with: its service's [`ServiceContext`] (pool, strategy, limits,
//! metrics, logs), fixed when it is accepted; a reload builds a new one.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::access_log::AccessLog;
use crate::backends::pool::BackendPool;
use crate::config::{parse_cidr, AllUnhealthy, Mode, PeekMode, ProxyVersion, Tunables};
use crate::logging::RateLimitedLog;
use crate::metrics::ServiceMetrics;
use crate::proxy::connect::SocketOptions;
use crate::proxy::http::{Ends, HttpLimits, Upstreams};
use crate::proxy::peek::PeekPolicy;
use crate::proxy::relay::RelayLimits;
use crate::strategy::StrategyHost;

/// The limits one connection runs under, fixed when it is accepted.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub connect_timeout: Duration,
    /// How long a client waits for a slot of a full backend.
    pub queue_timeout: Duration,
    pub connect_attempts: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    pub relay: RelayLimits,
    pub socket: SocketOptions,
    /// `all_unhealthy = "ignore-checks"`: when the checks fail every backend, ignore them.
    pub ignore_checks_when_all_fail: bool,
    /// What to read from the client before choosing.
    pub peek: PeekPolicy,
    /// Sources whose connections start with a PROXY header, and the time they have to send it.
    pub proxy_from: TrustedSources,
    pub proxy_timeout: Duration,
    /// The PROXY header sent to backends.
    pub proxy_to_backend: ProxyVersion,
    /// Connections relayed as bytes, or HTTP requests each placed on its own.
    pub mode: Mode,
    pub http: HttpLimits,
}

/// Source addresses trusted to send a PROXY header, or forwarding headers (CIDRs).
#[derive(Debug, Clone, Default)]
pub struct TrustedSources(Vec<(std::net::IpAddr, u8)>);

impl TrustedSources {
    /// The CIDRs of a setting as written (checked when the configuration was loaded).
    pub fn of(list: Option<&crate::config::AddressList>) -> TrustedSources {
        TrustedSources(list.map_or(Vec::new(), |l| l.0.iter().filter_map(|c| parse_cidr(c)).collect()))
    }
}

impl TrustedSources {
    /// True if `ip` is in one of the CIDRs (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        if self.0.is_empty() {
            return false;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|(net, bits)| match (ip, net) {
            (IpAddr::V4(a), IpAddr::V4(n)) => {
                let mask = if *bits == 0 { 0 } else { u32::MAX << (32 - u32::from(*bits)) };
                u32::from(a) & mask == u32::from(*n) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(n)) => {
                let mask = if *bits == 0 { 0 } else { u128::MAX << (128 - u32::from(*bits)) };
                u128::from(a) & mask == u128::from(*n) & mask
            }
            _ => false,
        })
    }
}

impl ConnectionLimits {
    pub fn from_tunables(t: &Tunables) -> Self {
        let socket = SocketOptions { nodelay: t.nodelay, keepalive: t.keepalive() };
        ConnectionLimits {
            mode: t.mode,
            http: HttpLimits::from_tunables(t, socket),
            connect_timeout: t.connect_timeout(),
            queue_timeout: t.queue_timeout(),
            connect_attempts: t.connect_attempts as u32,
            cooldown: t.cooldown(),
            max_cooldown: t.max_cooldown(),
            relay: RelayLimits {
                idle: t.idle_timeout(),
                lifetime: t.max_lifetime(),
                half_close: t.half_close_timeout(),
            },
            socket,
            ignore_checks_when_all_fail: t.all_unhealthy == AllUnhealthy::IgnoreChecks,
            proxy_from: TrustedSources::of(t.proxy_protocol_from.as_ref()),
            proxy_timeout: Duration::from_millis(t.proxy_protocol_timeout_ms),
            proxy_to_backend: t.proxy_protocol,
            peek: PeekPolicy {
                tls: t.peek == PeekMode::Tls,
                bytes: t.peek_bytes as usize,
                timeout: Duration::from_millis(t.peek_timeout_ms),
            },
        }
    }
}

/// Everything one connection needs, and nothing more. A reload builds a new context; a
/// connection keeps the one it was accepted with.
pub struct ServiceContext {
    pub name: Arc<str>,
    pub pool: Arc<ArcSwap<BackendPool>>,
    pub strategy: Arc<StrategyHost>,
    pub limits: ConnectionLimits,
    pub metrics: ServiceMetrics,
    pub hot_path_log: Arc<RateLimitedLog>,
    /// Where each connection's line goes at its end, if the access log is on.
    pub access_log: Option<Arc<AccessLog>>,
    /// The live connections (kept across reloads: every context of a service shares them).
    pub sessions: Arc<crate::proxy::sessions::Sessions>,
    /// HTTP mode: the backend connections kept for reuse (shared across reloads).
    pub upstreams: Arc<Upstreams>,
    /// HTTP mode: the requests in flight and those retrying (shared across reloads).
    pub retry_budget: Arc<crate::proxy::http::RetryBudget>,
    /// When HTTP connections are told to finish, and when they are cut.
    pub ends: Ends,
    /// TLS termination, if the service has `[service.tls]`.
    pub tls: Option<Arc<crate::tls::Terminator>>,
    /// TLS to backends, if `backend_tls`.
    pub origin: Option<Arc<crate::tls::Originator>>,
    /// The kernel relay, when `relay = "kernel"` and it loaded.
    #[cfg(target_os = "linux")]
    pub kernel_relay: Option<Arc<crate::proxy::kernel_relay::KernelRelay>>,
}
