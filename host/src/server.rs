//! A whole Harbor: binds the listeners, loads the strategy, runs the accept loop, the admin
//! server and the watcher, and drains on shutdown within the grace period.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::accept_loop;
use crate::admin;
use crate::backend::BackendPool;
use crate::config::Config;
use crate::connect::SocketOptions;
use crate::logging::RateLimitedLog;
use crate::metrics::Metrics;
use crate::relay::RelayLimits;
use crate::source_limit::SourceLimiter;
use crate::strategy::watch::{spawn_watcher, WatchError, WatchTarget};
use crate::strategy::{GuestLimits, StrategyError, StrategyHost};

/// Why Harbor could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum HarborError {
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("strategy {path}: {error}")]
    Strategy { path: String, error: StrategyError },
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("{0}")]
    Engine(StrategyError),
    #[error("accepting connections failed: {0}")]
    Accept(std::io::Error),
}

/// State every connection task shares.
pub struct Shared {
    pub config: Config,
    pub pool: ArcSwap<BackendPool>,
    pub strategy: Arc<StrategyHost>,
    pub metrics: Arc<Metrics>,
    pub socket_options: SocketOptions,
    pub relay_limits: RelayLimits,
    /// Cancelled when the grace period ends: relays still running are cut.
    pub cut: CancellationToken,
    /// True once shutdown has begun (`/healthz` answers 503).
    pub draining: AtomicBool,
    pub hot_path_log: RateLimitedLog,
    /// The per-source cap, if one is set.
    pub source_limiter: Option<Arc<SourceLimiter>>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open when the grace period ended, and cut.
    pub cut_connections: usize,
}

/// A bound, ready Harbor.
pub struct Harbor {
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    /// Stops the admin server and the watcher once draining is over.
    background: CancellationToken,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Harbor {
    /// Binds the listeners and loads the strategy (if any). Nothing is accepted until `run`.
    pub async fn bind(config: Config) -> Result<Harbor, HarborError> {
        let metrics = Arc::new(Metrics::new());
        let limits = GuestLimits {
            call_timeout: config.strategy_timeout,
            memory_bytes: config.strategy_memory_bytes,
            ready_instances: config.workers,
        };
        let strategy = Arc::new(
            StrategyHost::new(limits, config.strategy_config.clone(), Arc::clone(&metrics))
                .map_err(HarborError::Engine)?,
        );
        if let Some(path) = &config.strategy {
            // Named by the operator: it must load.
            strategy
                .load_file(path)
                .await
                .map_err(|error| HarborError::Strategy { path: path.display().to_string(), error })?;
        } else if let Some(dir) = &config.watch {
            // A drop box: the newest file that loads wins; a bad newer file (refused at run
            // time) never stops a restart.
            if strategy.load_newest_in(dir).await.is_none() {
                tracing::warn!(dir = %dir.display(), "no loadable strategy in the watched directory yet: built-in round-robin until one lands");
            }
        }
        let listener = bind(config.listen, config.nodelay).await?;
        let admin = match config.admin {
            Some(addr) => Some(bind(addr, false).await?),
            None => None,
        };
        let pool = BackendPool::new(&config.backends, &metrics, 1);
        let shared = Arc::new(Shared {
            socket_options: SocketOptions { nodelay: config.nodelay, keepalive: config.keepalive },
            relay_limits: RelayLimits {
                idle: config.idle_timeout,
                lifetime: config.max_lifetime,
                half_close: config.half_close_timeout,
            },
            pool: ArcSwap::from_pointee(pool),
            strategy,
            metrics,
            cut: CancellationToken::new(),
            draining: AtomicBool::new(false),
            hot_path_log: RateLimitedLog::new(10, Duration::from_secs(10)),
            source_limiter: (config.max_connections_per_source > 0)
                .then(|| Arc::new(SourceLimiter::new(config.max_connections_per_source, config.source_ipv6_prefix))),
            config,
        });
        // Watch from here on, so nothing that lands after `bind` returns is missed.
        let background = CancellationToken::new();
        let watch_target = match (&shared.config.watch, &shared.config.strategy) {
            (Some(dir), _) => Some(WatchTarget::Dir(dir.clone())),
            (None, Some(file)) => Some(WatchTarget::File(file.clone())),
            (None, None) => None,
        };
        let watcher = match watch_target {
            Some(target) => Some(spawn_watcher(Arc::clone(&shared.strategy), target, background.clone())?),
            None => None,
        };
        Ok(Harbor { shared, listener, admin, background, watcher })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.shared.config.listen)
    }

    /// The admin server's address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled, then drains: connections in flight get the grace
    /// period to finish, and are cut after it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<DrainReport, HarborError> {
        let Harbor { shared, listener, admin, background, watcher } = self;
        let admin_task = admin.map(|l| tokio::spawn(admin::serve(l, Arc::clone(&shared), background.clone())));
        tracing::info!(listen = %shared.config.listen, backends = shared.config.backends.len(), strategy = %shared.strategy.status().name, "harbor is serving");

        let tracker = TaskTracker::new();
        let accepted = accept_loop(&listener, Arc::clone(&shared), &tracker, &shutdown).await;
        drop(listener); // refuse new connections from here on
        shared.draining.store(true, Ordering::Relaxed);
        shared.strategy.stop_loading();
        tracker.close();
        let in_flight = tracker.len();
        if in_flight > 0 {
            tracing::info!(in_flight, grace = ?shared.config.shutdown_grace, "draining connections");
        }
        let mut report = DrainReport { cut_connections: 0 };
        if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait()).await.is_err() {
            report.cut_connections = tracker.len();
            tracing::warn!(cut = report.cut_connections, "grace period over: cutting the remaining connections");
            shared.cut.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        }
        background.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        if let Some(task) = watcher {
            // It may be waiting for a file to hold still: stop it where it is.
            task.abort();
            let _ = task.await;
        }
        accepted.map_err(HarborError::Accept)?;
        tracing::info!("drained; bye");
        Ok(report)
    }

    /// Runs on a spawned task; the handle stops it.
    pub fn spawn(self) -> RunningHarbor {
        let addr = self.local_addr();
        let admin_addr = self.admin_addr();
        let shared = Arc::clone(&self.shared);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.run(shutdown.clone()));
        RunningHarbor { addr, admin_addr, shared, shutdown, task }
    }
}

/// A Harbor running on a task.
pub struct RunningHarbor {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<DrainReport, HarborError>>,
}

impl RunningHarbor {
    /// Starts the drain and waits for it.
    pub async fn stop(self) -> Result<DrainReport, HarborError> {
        self.shutdown.cancel();
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(HarborError::Accept(std::io::Error::other(join.to_string()))),
        }
    }
}

/// Binds a listener. With `nodelay`, TCP_NODELAY is set on the listening socket: accepted
/// sockets inherit it on Linux, which saves one setsockopt per connection.
async fn bind(addr: SocketAddr, nodelay: bool) -> Result<TcpListener, HarborError> {
    let bind_error = |error| HarborError::Bind { addr, error };
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    if nodelay {
        socket.set_nodelay(true).map_err(bind_error)?;
    }
    socket.bind(addr).map_err(bind_error)?;
    socket.listen(4096).map_err(bind_error)
}
