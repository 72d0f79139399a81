//! A whole Harbor: binds every service's listeners, loads their strategies, runs the accept
//! loops, the admin server and the watchers, applies configuration reloads as a difference,
//! and drains on shutdown within the grace period.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::backends::pool::BackendPool;
use crate::config::{Config, RuntimeMode};
use crate::control::admin;
use crate::control::lifecycle::{DrainBounds, Lifecycle, Phase};
use crate::control::systemd::Notifier;
use crate::control::upgrade::Handover;
use crate::control::Control;
use crate::error::HarborError;
use crate::metrics::Metrics;
use crate::proxy::listener::{bind, BindError, ListenerOptions};
use crate::proxy::service::Service;
use crate::proxy::shards::Shards;
use crate::strategy::runtime::engine::StrategyEngine;
use crate::strategy::StrategyHost;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open when the grace period ended, and cut.
    pub cut_connections: usize,
}

/// A bound, ready Harbor.
pub struct Harbor {
    control: Arc<Control>,
    /// Bound listeners, served by `run`.
    listeners: Vec<(Arc<Service>, SocketAddr, TcpListener)>,
    admin: Option<TcpListener>,
}

impl Harbor {
    /// Binds every listener and loads every strategy. Nothing is accepted until `run`.
    pub async fn bind(config: Config) -> Result<Harbor, HarborError> {
        Harbor::bind_with(config, Handover::default()).await
    }

    /// [`Harbor::bind`], taking what was passed in: listening sockets (socket activation, or
    /// the previous process of a binary upgrade) for the listen addresses they are keyed by,
    /// the admin listener, and the backend changes made through the API.
    pub async fn bind_with(config: Config, mut handover: Handover) -> Result<Harbor, HarborError> {
        let metrics = Arc::new(Metrics::new());
        let access_log = match &config.access_log {
            None => None,
            Some(target) => Some(
                AccessLog::open(target, config.access_log_format, metrics.access_log_dropped.clone())
                    .map_err(|error| HarborError::AccessLog { target: target.clone(), error })?,
            ),
        };
        if let Err(running) = crate::strategy::runtime::deadline::set_epoch_tick(config.strategy_tick) {
            tracing::warn!(setting = "strategy_tick_ms", "{running}: this setting needs a restart");
        }
        StrategyEngine::global().map_err(HarborError::Engine)?.set_disk_cache(config.cache_dir.as_deref());
        let shards = match config.runtime {
            RuntimeMode::WorkStealing => Shards::none(),
            RuntimeMode::PerCore => Shards::start(config.workers).map_err(HarborError::Runtime)?,
        };
        let inherited_admin = handover.admin.take();
        let changes = std::mem::take(&mut handover.changes);
        let control = Arc::new(Control {
            services: ArcSwap::from_pointee(Vec::new()),
            metrics,
            access_log,
            #[cfg(target_os = "linux")]
            kernel_relay: load_kernel_relay(&config),
            tracker: TaskTracker::new(),
            lifecycle: Lifecycle::new(),
            config: Mutex::new(config.clone()),
            source: Mutex::new(None),
            resolver: Mutex::new(None),
            notifier: Mutex::new(Notifier::none()),
            reload_lock: tokio::sync::Mutex::new(()),
            upgrade_lock: tokio::sync::Mutex::new(()),
            admin_handoff: Mutex::new(None),
            handover: Mutex::new(handover),
            started_at: crate::clock::wall(),
            history: Default::default(),
            shards,
        });
        let mut listeners = Vec::new();
        let mut services = Vec::new();
        for cfg in &config.services {
            let service = control.build_service(cfg, config.workers).await?;
            for addr in &cfg.listen {
                listeners.push((
                    Arc::clone(&service),
                    *addr,
                    control.bind_or_inherit(*addr, ListenerOptions::of(&cfg.tunables)).await?,
                ));
            }
            if let Some(made) = changes.get(&cfg.name) {
                tracing::info!(service = %cfg.name, added = made.added.len(), changed = made.overrides.len(), removed = made.deleted.len(), "backend changes made through the API before the upgrade are kept");
                service.membership.restore(made);
            }
            services.push(service);
        }
        for name in changes.keys().filter(|n| !config.services.iter().any(|s| &s.name == *n)) {
            tracing::warn!(service = %name, "backend changes handed over for a service no longer configured: dropped");
        }
        let admin = match (config.admin, inherited_admin) {
            (None, _) => None,
            (Some(addr), Some((configured, listener))) if configured == addr => {
                Some(TcpListener::from_std(listener).map_err(|source| BindError { addr, source })?)
            }
            (Some(addr), _) => Some(bind(addr, ListenerOptions::default()).await?),
        };
        if let (Some(addr), Some(listener)) = (config.admin, admin.as_ref()) {
            match listener.as_fd().try_clone_to_owned() {
                Ok(fd) => *control.admin_handoff.lock().unwrap_or_else(PoisonError::into_inner) = Some((addr, fd)),
                Err(error) => tracing::warn!("cannot keep the admin socket for a binary upgrade: {error}"),
            }
        }
        control.services.store(Arc::new(services));
        // Watch from here on, so nothing that lands after `bind` returns is missed.
        for service in control.services.load().iter() {
            control.start_watcher(service)?;
        }
        Ok(Harbor { control, listeners, admin })
    }

    /// The first address clients connect to (of the first service).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners
            .first()
            .map(|(_, configured, l)| l.local_addr().unwrap_or(*configured))
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Every bound address of every service.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|(s, configured, l)| (s.name.clone(), l.local_addr().unwrap_or(*configured)))
            .collect()
    }

    /// The admin server's address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The shared state, for reloads and the admin server.
    pub fn control(&self) -> Arc<Control> {
        Arc::clone(&self.control)
    }

    /// Serves until `shutdown` is cancelled, then drains: connections in flight get the grace
    /// period to finish, and are cut after it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<DrainReport, HarborError> {
        let Harbor { control, listeners, admin } = self;
        let admin_task =
            admin.map(|l| tokio::spawn(admin::serve(l, Arc::clone(&control), control.lifecycle.admin_token())));
        for (service, configured, listener) in listeners {
            let passed_in = control.take_passed_in(configured);
            service.serve(listener, configured, passed_in, &control.tracker, &control.shards);
        }
        for service in control.services.load().iter() {
            tracing::info!(service = %service.name, listen = %crate::logging::list(&service.local_addrs()), backends = service.membership.views().len(), strategy = %service.context.load().strategy.status().name, "harbor is serving");
        }
        {
            let mut handover = control.lock_handover();
            let unclaimed: Vec<SocketAddr> = handover.listeners.drain(..).map(|(a, _)| a).collect();
            if !unclaimed.is_empty() {
                tracing::warn!(?unclaimed, "sockets passed in for no configured listen address: closed");
            }
            if handover.is_upgrade() {
                tracing::info!(pid = std::process::id(), "upgrade: serving; the previous process stops accepting");
            }
            handover.announce_ready();
        }
        control.enter(Phase::Serving);
        crate::control::status_page::spawn_history(Arc::clone(&control));

        shutdown.cancelled().await;
        control.enter(Phase::Draining);
        // Refuse new connections from here on; no reload may start.
        let _serial = control.reload_lock.lock().await;
        let mut accepted = Ok(());
        for service in control.services.load().iter() {
            if let Err(error) = service.stop_listening().await {
                accepted = Err(error);
            }
            service.context.load().strategy.stop_loading();
        }
        let tracker = &control.tracker;
        tracker.close();
        let in_flight = tracker.len();
        let bounds = {
            let config = control.lock_config();
            DrainBounds { grace: config.shutdown_grace, after_upgrade: config.upgrade_drain }
        };
        if in_flight > 0 {
            tracing::info!(in_flight, ?bounds, "draining connections");
        }
        let report = DrainReport { cut_connections: control.lifecycle.drain(tracker, bounds).await };
        control.enter(Phase::Stopped);
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        for service in control.services.load().iter() {
            let watcher = service.watcher.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(task) = watcher {
                // It may be waiting for a file to hold still: stop it where it is.
                task.abort();
                let _ = task.await;
            }
        }
        accepted.map_err(HarborError::Accept)?;
        tracing::info!("drained; bye");
        Ok(report)
    }

    /// Runs on a spawned task; the handle stops it.
    pub fn spawn(self) -> RunningHarbor {
        let addr = self.local_addr();
        let addrs = self.local_addrs();
        let admin_addr = self.admin_addr();
        let control = Arc::clone(&self.control);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.run(shutdown.clone()));
        RunningHarbor { addr, addrs, admin_addr, control, shutdown, task }
    }
}

/// A Harbor running on a task.
pub struct RunningHarbor {
    /// The first listening address of the first service.
    pub addr: SocketAddr,
    /// Every listening address at start, by service.
    pub addrs: Vec<(String, SocketAddr)>,
    pub admin_addr: Option<SocketAddr>,
    pub control: Arc<Control>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<DrainReport, HarborError>>,
}

impl RunningHarbor {
    /// The default (or only) service.
    pub fn service(&self) -> Arc<Service> {
        match self.control.default_service() {
            Some(service) => service,
            None => panic!("no default service"),
        }
    }

    /// The default service's strategy host.
    pub fn strategy(&self) -> Arc<StrategyHost> {
        Arc::clone(&self.service().context.load().strategy)
    }

    /// The default service's pool of the moment.
    pub fn pool(&self) -> Arc<BackendPool> {
        self.service().context.load().pool.load_full()
    }

    /// The first address of a service, as bound at start.
    pub fn addr_of(&self, service: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(s, _)| s == service).map(|(_, a)| *a)
    }

    /// Starts the drain and waits for it.
    pub async fn stop(self) -> Result<DrainReport, HarborError> {
        self.shutdown.cancel();
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(HarborError::Task(join.to_string())),
        }
    }
}

/// Loads the kernel relay if the configuration asks for it. When it cannot be had, says why
/// in one line and leaves every connection to the user-space relay.
#[cfg(target_os = "linux")]
fn load_kernel_relay(config: &Config) -> Option<Arc<crate::proxy::kernel_relay::KernelRelay>> {
    if config.relay != crate::config::RelayMode::Kernel {
        return None;
    }
    // Room for every service's connection cap (a reload that raises one beyond it sends the
    // extra connections through the user-space relay).
    let connections: usize = config.services.iter().map(|s| s.tunables.max_connections as usize).sum();
    match crate::proxy::kernel_relay::KernelRelay::load(connections) {
        Ok(relay) => {
            tracing::info!(
                connections,
                "relay = kernel: relayed bytes go socket to socket in the kernel (BPF sockhash)"
            );
            Some(Arc::new(relay))
        }
        Err(error) => {
            tracing::warn!("relay = kernel is not available, relaying in user space: {error}");
            None
        }
    }
}
