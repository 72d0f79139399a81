//! One service at run time: the small context each of its connections gets (pool, strategy,
//! limits, metrics), its admission caps, and the accept loops of its listeners.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::backends::membership::Membership;
use crate::backends::pool::BackendPool;
use crate::config::{parse_cidr, AllUnhealthy, PeekMode, ProxyVersion, ServiceConfig, Tunables};
use crate::logging::RateLimitedLog;
use crate::metrics::ServiceMetrics;
use crate::proxy::accept::accept_loop;
use crate::proxy::connect::SocketOptions;
use crate::proxy::listener::ListenerOptions;
use crate::proxy::peek::PeekPolicy;
use crate::proxy::relay::RelayLimits;
use crate::proxy::shards::Shards;
use crate::proxy::source_limit::SourceLimiter;
use crate::strategy::StrategyHost;

/// The limits one connection runs under, fixed when it is accepted.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub connect_timeout: Duration,
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
}

/// Source addresses trusted to send a PROXY header (CIDRs).
#[derive(Debug, Clone, Default)]
pub struct TrustedSources(Vec<(std::net::IpAddr, u8)>);

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
        ConnectionLimits {
            connect_timeout: t.connect_timeout(),
            connect_attempts: t.connect_attempts as u32,
            cooldown: t.cooldown(),
            max_cooldown: t.max_cooldown(),
            relay: RelayLimits {
                idle: t.idle_timeout(),
                lifetime: t.max_lifetime(),
                half_close: t.half_close_timeout(),
            },
            socket: SocketOptions { nodelay: t.nodelay, keepalive: t.keepalive() },
            ignore_checks_when_all_fail: t.all_unhealthy == AllUnhealthy::IgnoreChecks,
            proxy_from: TrustedSources(
                t.proxy_protocol_from
                    .as_ref()
                    .map_or(Vec::new(), |l| l.0.iter().filter_map(|c| parse_cidr(c)).collect()),
            ),
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
    /// The kernel relay, when `relay = "kernel"` and it loaded.
    #[cfg(target_os = "linux")]
    pub kernel_relay: Option<Arc<crate::proxy::kernel_relay::KernelRelay>>,
}

/// A service's caps at accept: `max_connections` for the whole service (shared by its
/// listeners, resized in place by a reload) and the per-source cap.
pub struct Admission {
    pub slots: Arc<Semaphore>,
    capacity: Mutex<usize>,
    pub source_limiter: ArcSwap<Option<Arc<SourceLimiter>>>,
}

impl Admission {
    pub fn new(t: &Tunables) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(t.max_connections as usize)),
            capacity: Mutex::new(t.max_connections as usize),
            source_limiter: ArcSwap::from_pointee(source_limiter(t)),
        }
    }

    /// Applies new caps to new connections. Slots held now stay held; a smaller cap takes
    /// effect as they are given back.
    pub fn update(&self, t: &Tunables) {
        let mut capacity = self.capacity.lock().unwrap_or_else(PoisonError::into_inner);
        let want = t.max_connections as usize;
        if want > *capacity {
            self.slots.add_permits(want - *capacity);
        } else if want < *capacity {
            let mut to_forget = *capacity - want;
            to_forget -= self.slots.forget_permits(to_forget);
            if to_forget > 0 {
                // Held now: forget them as they come back.
                let slots = Arc::clone(&self.slots);
                tokio::spawn(async move {
                    if let Ok(permits) = slots.acquire_many(to_forget as u32).await {
                        permits.forget();
                    }
                });
            }
        }
        *capacity = want;
        let current = self.source_limiter.load();
        let same = match (current.as_ref(), t.max_connections_per_source) {
            (None, 0) => true,
            (Some(l), n) => l.max_per_source() == n as u32 && l.ipv6_prefix() == t.source_ipv6_prefix as u8,
            (None, _) => false,
        };
        if !same {
            self.source_limiter.store(Arc::new(source_limiter(t)));
        }
    }

    pub fn max_connections(&self) -> usize {
        *self.capacity.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn source_limiter(t: &Tunables) -> Option<Arc<SourceLimiter>> {
    (t.max_connections_per_source > 0)
        .then(|| Arc::new(SourceLimiter::new(t.max_connections_per_source as u32, t.source_ipv6_prefix as u8)))
}

/// One listening address of a service and the task accepting on it.
struct Listening {
    /// As configured (port 0 stays 0), for reloads to compare.
    configured: SocketAddr,
    /// As bound.
    addr: SocketAddr,
    stop: CancellationToken,
    /// The accept loop, or one per shard (`shards.rs`).
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// A second descriptor of each socket of the address (one, or one per shard), to hand to
    /// the process of a binary upgrade. Closed with this entry, so a retired address is not
    /// kept open.
    handoff: Vec<OwnedFd>,
}

/// A service: its current context, membership and admission, and its listeners.
pub struct Service {
    pub name: String,
    pub context: ArcSwap<ServiceContext>,
    pub config: ArcSwap<ServiceConfig>,
    pub membership: Arc<Membership>,
    pub admission: Arc<Admission>,
    listeners: Mutex<Vec<Listening>>,
    /// Stops the service's background work (watcher, probes, drains).
    pub background: CancellationToken,
    pub watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Service {
    pub fn new(
        context: ServiceContext,
        config: ServiceConfig,
        membership: Arc<Membership>,
        background: CancellationToken,
    ) -> Service {
        Service {
            name: config.name.clone(),
            admission: Arc::new(Admission::new(&config.tunables)),
            context: ArcSwap::from_pointee(context),
            config: ArcSwap::from_pointee(config),
            membership,
            listeners: Mutex::new(Vec::new()),
            background,
            watcher: Mutex::new(None),
        }
    }

    /// Starts accepting on a bound listener. Each connection runs on `tracker`: on this runtime,
    /// or with shards, on the shard that accepted it.
    ///
    /// `passed_in` are more sockets of the same address from the process before a binary
    /// upgrade (a per-core Harbor's other shard sockets): they are accepted on too, so nothing
    /// queued on them is lost. With shards and SO_REUSEPORT, every shard gets a socket of its
    /// own in the address's group, so the kernel hands each new client to one shard; without
    /// SO_REUSEPORT the shards accept on descriptors of one socket.
    pub fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        configured: SocketAddr,
        passed_in: Vec<std::net::TcpListener>,
        tracker: &TaskTracker,
        shards: &Shards,
    ) {
        let addr = listener.local_addr().unwrap_or(configured);
        let options = ListenerOptions::of(&self.config.load().tunables);
        let mut siblings: Vec<OwnedFd> = Vec::with_capacity(shards.handles().len());
        for socket in passed_in {
            if let Err(error) = crate::proxy::listener::set_defer_accept(&socket, options.defer_accept_secs) {
                tracing::warn!(service = %self.name, listen = %addr, "defer-accept-secs on a socket passed in: {error}");
            }
            siblings.push(socket.into());
        }
        if options.reuse_port {
            while 1 + siblings.len() < shards.handles().len() {
                match crate::proxy::listener::bind_socket(addr, options) {
                    Ok(socket) => siblings.push(socket.into()),
                    Err(error) => {
                        tracing::warn!(service = %self.name, listen = %addr, "cannot open a socket for every shard, some share one: {error}");
                        break;
                    }
                }
            }
        }
        let handoff = match std::iter::once(listener.as_fd())
            .chain(siblings.iter().map(AsFd::as_fd))
            .map(|fd| fd.try_clone_to_owned())
            .collect()
        {
            Ok(fds) => fds,
            Err(error) => {
                tracing::warn!(service = %self.name, listen = %addr, "cannot keep this socket for a binary upgrade: {error}");
                Vec::new()
            }
        };
        let stop = CancellationToken::new();
        let on_shards = match shards.handles() {
            [] => None,
            _ => match self.accept_on_shards(&listener, &mut siblings, addr, tracker, &stop, shards) {
                Ok(tasks) => Some(tasks),
                Err(error) => {
                    // Out of descriptors: this runtime accepts, as without shards.
                    tracing::error!(service = %self.name, listen = %addr, "cannot give the shards this socket, accepting on the main runtime: {error}");
                    None
                }
            },
        };
        let tasks = match on_shards {
            Some(tasks) => {
                // The shards hold their own descriptors; this runtime's poller must not wake
                // for every client too.
                drop(listener);
                tasks
            }
            None => {
                let on_main = |socket| tokio::spawn(self.accept_on_socket(socket, addr, tracker, &stop));
                let mut tasks: Vec<_> = siblings.drain(..).map(on_main).collect();
                tasks.push(tokio::spawn(Arc::clone(self).accept_on(listener, addr, tracker.clone(), stop.clone())));
                tasks
            }
        };
        if tasks.len() > 1 {
            tracing::info!(service = %self.name, listen = %addr, sockets = handoff.len(), accept_loops = tasks.len(), "accepting on more than one socket or shard");
        }
        self.lock_listeners().push(Listening { configured, addr, stop, tasks, handoff });
    }

    /// Spreads the sockets of one address over the shards: shard `i` accepts on sockets
    /// `i, i + n, …`, and a shard left without one on a descriptor of socket `i mod count`.
    /// If a descriptor cannot be had, returns the error and spawns nothing.
    fn accept_on_shards(
        self: &Arc<Self>,
        listener: &TcpListener,
        siblings: &mut Vec<OwnedFd>,
        addr: SocketAddr,
        tracker: &TaskTracker,
        stop: &CancellationToken,
        shards: &Shards,
    ) -> std::io::Result<Vec<tokio::task::JoinHandle<std::io::Result<()>>>> {
        let handles = shards.handles();
        debug_assert!(!handles.is_empty(), "callers accept on shards only when there are some");
        // Every descriptor first: on failure the siblings are still there for the main runtime.
        let primary = listener.as_fd().try_clone_to_owned()?;
        let count = 1 + siblings.len();
        let spare = (count..handles.len())
            .map(|i| match i % count {
                0 => primary.try_clone().map(|fd| (i, fd)),
                j => siblings[j - 1].try_clone().map(|fd| (i, fd)),
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let sockets = std::iter::once(primary).chain(siblings.drain(..));
        let assigned = sockets.enumerate().map(|(j, socket)| (j % handles.len(), socket)).chain(spare);
        Ok(assigned
            .map(|(shard, socket)| handles[shard].spawn(self.accept_on_socket(socket, addr, tracker, stop)))
            .collect())
    }

    /// Accepting on a listening socket, to run on the runtime that is to serve its clients
    /// (the socket registers with that runtime's poller when it starts).
    fn accept_on_socket(
        self: &Arc<Self>,
        socket: OwnedFd,
        addr: SocketAddr,
        tracker: &TaskTracker,
        stop: &CancellationToken,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
        let (service, tracker, stop) = (Arc::clone(self), tracker.clone(), stop.clone());
        async move {
            let listener = TcpListener::from_std(std::net::TcpListener::from(socket))?;
            service.accept_on(listener, addr, tracker, stop).await
        }
    }

    /// Accepts on `listener` until `stop`; says why if accepting failed for good.
    async fn accept_on(
        self: Arc<Self>,
        listener: TcpListener,
        addr: SocketAddr,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let result = accept_loop(&listener, &self, &tracker, &stop).await;
        if let Err(error) = &result {
            tracing::error!(service = %self.name, listen = %addr, "accepting failed for good: {error}");
        }
        result
    }

    /// A new descriptor of each listening socket, by configured address, for a binary upgrade.
    pub fn handoff_fds(&self) -> std::io::Result<Vec<(SocketAddr, OwnedFd)>> {
        let listeners = self.lock_listeners();
        let mut fds = Vec::with_capacity(listeners.len());
        for l in listeners.iter() {
            if l.handoff.is_empty() {
                return Err(std::io::Error::other(format!("no descriptor kept for {}", l.addr)));
            }
            for fd in &l.handoff {
                fds.push((l.configured, fd.try_clone()?));
            }
        }
        Ok(fds)
    }

    /// Applies a new TCP_DEFER_ACCEPT to the listeners open now; one that refuses keeps its old
    /// value and says so.
    pub fn set_defer_accept(&self, secs: u64) {
        for l in self.lock_listeners().iter() {
            let applied = match l.handoff.as_slice() {
                [] => Err(std::io::Error::other("no descriptor kept for this listener")),
                fds => fds.iter().try_for_each(|fd| crate::proxy::listener::set_defer_accept(fd, secs)),
            };
            if let Err(error) = applied {
                tracing::warn!(service = %self.name, listen = %l.addr, "defer-accept-secs stays as it was: {error}");
            }
        }
    }

    /// The addresses the service accepts on now.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.lock_listeners().iter().map(|l| l.addr).collect()
    }

    /// Stops accepting on a configured address (the socket closes once its loop returns).
    pub async fn stop_listening_on(&self, configured: SocketAddr) {
        let stopped: Vec<Listening> = {
            let mut listeners = self.lock_listeners();
            let (stop, keep) = listeners.drain(..).partition(|l| l.configured == configured);
            *listeners = keep;
            stop
        };
        for l in stopped {
            l.stop.cancel();
            for task in l.tasks {
                let _ = task.await;
            }
        }
    }

    /// Stops every accept loop and waits for each listening socket to close.
    pub async fn stop_listening(&self) -> std::io::Result<()> {
        let all: Vec<Listening> = self.lock_listeners().drain(..).collect();
        let mut outcome = Ok(());
        for l in all {
            l.stop.cancel();
            for task in l.tasks {
                match task.await {
                    Ok(Err(error)) => outcome = Err(error),
                    Ok(Ok(())) => {}
                    Err(join) => outcome = Err(std::io::Error::other(join.to_string())),
                }
            }
        }
        outcome
    }

    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, Vec<Listening>> {
        self.listeners.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
