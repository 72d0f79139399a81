//! A whole Harbor: binds every service's listeners, loads their strategies, runs the accept
//! loops, the admin server and the watchers, applies configuration reloads as a difference,
//! and drains on shutdown within the grace period.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use hickory_resolver::TokioResolver;

use crate::access_log::AccessLog;
use crate::backend::BackendPool;
use crate::config::{Config, ConfigError, RuntimeMode, ServiceConfig, DEFAULT_SERVICE};
use crate::listener::{bind, ListenerOptions};
use crate::logging::RateLimitedLog;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::service::{ConnectionLimits, Service, ServiceContext};
use crate::shards::Shards;
use crate::strategy::engine::StrategyEngine;
use crate::strategy::watch::{spawn_watcher, WatchError, WatchTarget};
use crate::strategy::{GuestLimits, StrategyError, StrategyHost};
use crate::systemd::Notifier;
use crate::upgrade::Handover;
use crate::{admin, discovery};

/// Why Harbor could not start, could not apply a reload, or had to stop.
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
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("Harbor is draining")]
    Draining,
    #[error("cannot open the access log {target}: {error}")]
    AccessLog { target: String, error: std::io::Error },
    #[error("cannot set up the DNS resolver: {0}")]
    Dns(hickory_resolver::ResolveError),
    #[error("cannot start the per-core runtimes: {0}")]
    Runtime(std::io::Error),
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open when the grace period ended, and cut.
    pub cut_connections: usize,
}

/// Reads the configuration again, for a reload (SIGHUP, `watch_config`, tests).
pub type ConfigSource = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// What a reload binds and loads before it changes anything.
struct Prepared {
    service: Arc<Service>,
    config: ServiceConfig,
    listeners: Vec<(SocketAddr, TcpListener)>,
    strategy: Option<Arc<StrategyHost>>,
    resolver: Option<Arc<TokioResolver>>,
    is_new: bool,
}

/// The state the admin server and reloads work on. Connections never see it: each gets its
/// service's [`ServiceContext`].
pub struct Control {
    pub services: ArcSwap<Vec<Arc<Service>>>,
    pub metrics: Arc<Metrics>,
    /// Every connection of every service, for the drain.
    tracker: TaskTracker,
    /// Cancelled when the grace period ends: every relay still running is cut.
    cut: CancellationToken,
    /// True once shutdown has begun (`/healthz` answers 503).
    pub draining: AtomicBool,
    /// Stops the admin server, watchers, probes and reapers once draining is over.
    background: CancellationToken,
    config: Mutex<Config>,
    source: Mutex<Option<Arc<ConfigSource>>>,
    /// The resolver of DNS backends, made when a service first needs one.
    resolver: Mutex<Option<Arc<TokioResolver>>>,
    /// Tells a service manager (systemd) about readiness, reloads and draining.
    notifier: Mutex<Notifier>,
    /// The access log, if on (opened at start; a reload cannot turn it on or off).
    access_log: Option<Arc<AccessLog>>,
    /// The kernel relay (`relay = "kernel"`), loaded at start; `None` when off or unavailable.
    #[cfg(target_os = "linux")]
    kernel_relay: Option<Arc<crate::kernel_relay::KernelRelay>>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Cancelled when draining begins: a reload still preparing (binding, compiling) gives up.
    stopping: CancellationToken,
    /// Held while a binary upgrade runs: one at a time.
    pub(crate) upgrade_lock: tokio::sync::Mutex<()>,
    /// A second descriptor of the admin listener (and its configured address), for an upgrade.
    admin_handoff: Mutex<Option<(SocketAddr, OwnedFd)>>,
    /// Stops the admin server: at the end of the drain, or at once when an upgrade hands over.
    admin_stop: CancellationToken,
    /// What the previous process handed over; its readiness pipe is written once serving.
    handover: Mutex<Handover>,
    /// When this process started serving, for the status page.
    pub started_at: std::time::SystemTime,
    /// The per-core runtimes that accept and relay (`runtime = "per-core"`); none otherwise.
    shards: Shards,
}

impl Control {
    /// The service named `name`.
    pub fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.services.load().iter().find(|s| s.name == name).cloned()
    }

    /// The service the single-service endpoints (`/backends`, `/strategy`) show: `default`,
    /// or the only one.
    pub fn default_service(&self) -> Option<Arc<Service>> {
        let services = self.services.load();
        services.iter().find(|s| s.name == DEFAULT_SERVICE).cloned().or_else(|| match services.as_slice() {
            [only] => Some(Arc::clone(only)),
            _ => None,
        })
    }

    /// True once draining has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.stopping.is_cancelled()
    }

    /// A new descriptor of the admin listener, by configured address, for an upgrade.
    pub fn admin_handoff(&self) -> std::io::Result<Option<(SocketAddr, OwnedFd)>> {
        let slot = self.admin_handoff.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.as_ref() {
            None => Ok(None),
            Some((configured, fd)) => Ok(Some((*configured, fd.try_clone()?))),
        }
    }

    /// A binary upgrade succeeded: process `pid` serves now. The service manager is told that
    /// it is the main process, this process announces nothing more, and its admin server
    /// stops so that every admin request reaches the new process.
    pub fn hand_over(&self, pid: u32) {
        let notifier = self.notifier();
        notifier.notify(&format!("MAINPID={pid}\nREADY=1\nSTATUS=serving (upgraded)"));
        self.set_notifier(Notifier::none());
        self.admin_stop.cancel();
    }

    /// Cancelled once draining is over: background work stops.
    pub fn background_token(&self) -> CancellationToken {
        self.background.clone()
    }

    /// The bearer token admin writes need, if one is configured.
    pub fn admin_token(&self) -> Option<String> {
        self.lock_config().admin_token.clone()
    }

    /// True if the admin listener is on a loopback address.
    pub fn admin_is_loopback(&self) -> bool {
        self.lock_config().admin.is_none_or(|a| a.ip().is_loopback())
    }

    fn lock_config(&self) -> std::sync::MutexGuard<'_, Config> {
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets where reloads read the configuration from.
    pub fn set_config_source(&self, source: ConfigSource) {
        *self.source.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(source));
    }

    /// Reads the configuration again and applies it. A bad file, or one that cannot be
    /// applied (a listen address taken, a strategy that does not load), changes nothing: it
    /// is logged, counted as rejected, and the running configuration stays.
    pub async fn reload(&self) -> Result<ReloadReport, HarborError> {
        let source = self.source.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let notifier = self.notifier();
        notifier.reloading();
        let result = match source {
            None => Err(HarborError::Config(ConfigError::Invalid {
                setting: "config".into(),
                message: "no configuration source to reload from".into(),
            })),
            Some(source) => match tokio::task::spawn_blocking(move || source()).await {
                Ok(Ok(config)) => self.apply(config).await,
                Ok(Err(error)) => Err(HarborError::Config(error)),
                Err(join) => Err(HarborError::Accept(std::io::Error::other(join.to_string()))),
            },
        };
        match &result {
            Ok(report) => {
                self.metrics.config_reload("applied");
                tracing::info!(added = ?report.added, removed = ?report.removed, changed = ?report.changed, "configuration reloaded");
            }
            Err(error) => {
                self.metrics.config_reload("rejected");
                tracing::error!("configuration reload rejected, the running configuration stays: {error}");
            }
        }
        notifier.reloaded(if result.is_ok() { "applied" } else { "rejected" });
        result
    }

    /// Applies a validated configuration as a difference: added services start listening,
    /// removed ones stop accepting and drain, a changed listen address is bound before the
    /// old one closes, backends change as membership changes do, and new limits apply to new
    /// connections. Nothing in flight is touched. Everything that can fail (binding, loading
    /// a strategy) is done before anything changes.
    pub async fn apply(&self, new: Config) -> Result<ReloadReport, HarborError> {
        let _serial = self.reload_lock.lock().await;
        if self.draining.load(Ordering::Relaxed) {
            return Err(HarborError::Draining);
        }
        {
            let old = self.lock_config();
            for (what, changed) in [
                ("admin", old.admin != new.admin),
                ("workers", old.workers != new.workers),
                ("dns_servers", old.dns_servers != new.dns_servers),
                ("access_log", old.access_log != new.access_log || old.access_log_format != new.access_log_format),
                ("log_format", old.log_format != new.log_format),
                ("log_level", old.log_level != new.log_level),
                ("relay", old.relay != new.relay),
                ("strategy_tick_ms", old.strategy_tick != new.strategy_tick),
                ("runtime", old.runtime != new.runtime),
            ] {
                if changed {
                    tracing::warn!(setting = what, "this setting needs a restart: the running value stays");
                }
            }
        }
        let current = self.services.load_full();
        let workers = self.lock_config().workers;

        // Prepare: bind and load everything new. A failure (or the start of a drain) drops
        // what was prepared, and stops the background work of services built for it.
        let mut prepared = Vec::new();
        let outcome = tokio::select! {
            _ = self.stopping.cancelled() => Err(HarborError::Draining),
            result = self.prepare(&new, &current, workers, &mut prepared) => result,
        };
        if let Err(error) = outcome {
            for p in prepared.iter().filter(|p| p.is_new) {
                p.service.background.cancel();
                p.service.membership.stop();
            }
            return Err(error);
        }

        // Commit: nothing below fails.
        let mut report = ReloadReport::default();
        let mut next: Vec<Arc<Service>> = Vec::new();
        for p in prepared {
            let Prepared { service, config, listeners, strategy, resolver, is_new } = p;
            if is_new {
                report.added.push(service.name.clone());
                for (configured, listener) in listeners {
                    service.serve(listener, configured, Vec::new(), &self.tracker, &self.shards);
                }
                self.start_watcher_or_log(&service);
                next.push(service);
                continue;
            }
            let old = service.config.load_full();
            if *old != config {
                report.changed.push(service.name.clone());
            }
            service.membership.reconfigure(&config.backends, config.health.clone(), config.tunables.drain_timeout());
            if old.dns != config.dns || old.tunables.dns_refresh_ms != config.tunables.dns_refresh_ms {
                service.membership.follow_dns(&config.dns, resolver, config.tunables.dns_refresh());
            }
            service.admission.update(&config.tunables);
            if old.tunables.defer_accept_secs != config.tunables.defer_accept_secs {
                service.set_defer_accept(config.tunables.defer_accept_secs);
            }
            let context = service.context.load_full();
            let replaced = strategy.is_some();
            let strategy = strategy.unwrap_or_else(|| Arc::clone(&context.strategy));
            service.context.store(Arc::new(ServiceContext {
                name: Arc::clone(&context.name),
                pool: Arc::clone(&context.pool),
                strategy,
                limits: ConnectionLimits::from_tunables(&config.tunables),
                metrics: context.metrics.clone(),
                hot_path_log: Arc::clone(&context.hot_path_log),
                access_log: context.access_log.clone(),
                #[cfg(target_os = "linux")]
                kernel_relay: context.kernel_relay.clone(),
            }));
            let retired_addrs: Vec<SocketAddr> =
                old.listen.iter().filter(|a| !config.listen.contains(a)).copied().collect();
            service.config.store(Arc::new(config));
            // New addresses accept before old ones close.
            for (configured, listener) in listeners {
                service.serve(listener, configured, Vec::new(), &self.tracker, &self.shards);
            }
            for addr in retired_addrs {
                service.stop_listening_on(addr).await;
            }
            if replaced {
                context.strategy.stop_loading();
                self.start_watcher_or_log(&service);
            }
            next.push(service);
        }
        for service in current.iter() {
            if !next.iter().any(|s| s.name == service.name) {
                report.removed.push(service.name.clone());
                // Stop accepting; its connections run on and drain like any other.
                let _ = service.stop_listening().await;
                service.context.load().strategy.stop_loading();
                service.background.cancel();
                service.membership.stop();
            }
        }
        self.services.store(Arc::new(next));
        *self.lock_config() = new;
        Ok(report)
    }

    /// Sets where readiness, reloads and draining are announced.
    pub fn set_notifier(&self, notifier: Notifier) {
        *self.notifier.lock().unwrap_or_else(PoisonError::into_inner) = notifier;
    }

    fn lock_handover(&self) -> std::sync::MutexGuard<'_, Handover> {
        self.handover.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notifier(&self) -> Notifier {
        self.notifier.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A listener for `addr`: the socket passed in for it, if there is one, else a new one.
    async fn bind_or_inherit(&self, addr: SocketAddr, options: ListenerOptions) -> Result<TcpListener, HarborError> {
        let taken = {
            let mut handover = self.handover.lock().unwrap_or_else(PoisonError::into_inner);
            let inherited = &mut handover.listeners;
            inherited.iter().position(|(a, _)| *a == addr).map(|i| inherited.remove(i).1)
        };
        match taken {
            Some(listener) => {
                tracing::info!(listen = %addr, "listening on a socket passed in (socket activation or upgrade)");
                let bind_error = |error| HarborError::Bind { addr, error };
                crate::listener::set_defer_accept(&listener, options.defer_accept_secs).map_err(bind_error)?;
                TcpListener::from_std(listener).map_err(bind_error)
            }
            None => bind(addr, options).await,
        }
    }

    /// The other sockets passed in for `configured` after [`Self::bind_or_inherit`] took the
    /// first: a per-core Harbor hands over one per shard.
    fn take_passed_in(&self, configured: SocketAddr) -> Vec<std::net::TcpListener> {
        let mut handover = self.lock_handover();
        let (taken, rest) = handover.listeners.drain(..).partition(|(a, _)| *a == configured);
        handover.listeners = rest;
        taken.into_iter().map(|(_, socket)| socket).collect()
    }

    /// The shared resolver, if `cfg` has DNS backends.
    fn resolver_for(&self, cfg: &ServiceConfig) -> Result<Option<Arc<TokioResolver>>, HarborError> {
        if cfg.dns.is_empty() {
            return Ok(None);
        }
        let mut slot = self.resolver.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(resolver) = slot.as_ref() {
            return Ok(Some(Arc::clone(resolver)));
        }
        let servers = self.lock_config().dns_servers.clone();
        let resolver = Arc::new(discovery::resolver(&servers).map_err(HarborError::Dns)?);
        *slot = Some(Arc::clone(&resolver));
        Ok(Some(resolver))
    }

    /// Binds and loads what `new` needs beyond what runs now, into `out`.
    async fn prepare(
        &self,
        new: &Config,
        current: &[Arc<Service>],
        workers: usize,
        out: &mut Vec<Prepared>,
    ) -> Result<(), HarborError> {
        for cfg in &new.services {
            match current.iter().find(|s| s.name == cfg.name) {
                Some(service) => {
                    let old = service.config.load_full();
                    let mut listeners = Vec::new();
                    for addr in cfg.listen.iter().filter(|a| !old.listen.contains(a)) {
                        listeners.push((*addr, bind(*addr, ListenerOptions::of(&cfg.tunables)).await?));
                    }
                    let resolver = self.resolver_for(cfg)?;
                    let strategy = if strategy_changed(&old, cfg) {
                        let host =
                            self.strategy_host(cfg, workers, Some(service.context.load().strategy.kv_stores()))?;
                        load_strategy(&host, cfg).await?;
                        host.continue_sequence_of(&service.context.load().strategy);
                        Some(host)
                    } else {
                        None
                    };
                    out.push(Prepared {
                        service: Arc::clone(service),
                        config: cfg.clone(),
                        listeners,
                        strategy,
                        resolver,
                        is_new: false,
                    });
                }
                None => {
                    let mut listeners = Vec::new();
                    for addr in &cfg.listen {
                        listeners.push((*addr, self.bind_or_inherit(*addr, ListenerOptions::of(&cfg.tunables)).await?));
                    }
                    let service = self.build_service(cfg, workers).await?;
                    out.push(Prepared {
                        service,
                        config: cfg.clone(),
                        listeners,
                        strategy: None,
                        resolver: None,
                        is_new: true,
                    });
                }
            }
        }
        Ok(())
    }

    fn strategy_host(
        &self,
        cfg: &ServiceConfig,
        workers: usize,
        kv: Option<Arc<crate::strategy::guest_host::KvStores>>,
    ) -> Result<Arc<StrategyHost>, HarborError> {
        let limits = GuestLimits {
            call_timeout: cfg.tunables.strategy_timeout(),
            memory_bytes: cfg.tunables.strategy_memory_bytes(),
            ready_instances: workers,
            kv_entries: cfg.tunables.strategy_kv_entries as usize,
            kv_bytes: cfg.tunables.strategy_kv_bytes as usize,
        };
        let host = StrategyHost::new(limits, cfg.strategy_config.clone(), Arc::clone(&self.metrics), &cfg.name)
            .map_err(HarborError::Engine)?;
        // Same limits: the stores go on (a change of limits starts them afresh).
        let same_limits = kv.is_some()
            && self.service(&cfg.name).is_some_and(|s| {
                let old = s.config.load();
                old.tunables.strategy_kv_entries == cfg.tunables.strategy_kv_entries
                    && old.tunables.strategy_kv_bytes == cfg.tunables.strategy_kv_bytes
            });
        Ok(Arc::new(match kv {
            Some(kv) if same_limits => host.with_kv_stores(kv),
            _ => host,
        }))
    }

    /// Builds a service: its strategy (loaded), membership, context and reaper. It accepts
    /// nothing until its listeners are served.
    async fn build_service(&self, cfg: &ServiceConfig, workers: usize) -> Result<Arc<Service>, HarborError> {
        let strategy = self.strategy_host(cfg, workers, None)?;
        load_strategy(&strategy, cfg).await?;
        let background = self.background.child_token();
        let membership = Membership::new(
            &cfg.name,
            &cfg.backends,
            cfg.health.clone(),
            cfg.tunables.drain_timeout(),
            Arc::clone(&self.metrics),
            self.cut.clone(),
            background.clone(),
        );
        membership.spawn_reaper();
        membership.follow_dns(&cfg.dns, self.resolver_for(cfg)?, cfg.tunables.dns_refresh());
        let context = ServiceContext {
            name: Arc::from(cfg.name.as_str()),
            pool: membership.pool(),
            strategy,
            limits: ConnectionLimits::from_tunables(&cfg.tunables),
            metrics: self.metrics.service(&cfg.name),
            hot_path_log: Arc::new(RateLimitedLog::new(10, Duration::from_secs(10))),
            access_log: self.access_log.clone(),
            #[cfg(target_os = "linux")]
            kernel_relay: self.kernel_relay.clone(),
        };
        Ok(Arc::new(Service::new(context, cfg.clone(), membership, background)))
    }

    fn start_watcher_or_log(&self, service: &Arc<Service>) {
        if let Err(error) = self.start_watcher(service) {
            tracing::error!(service = %service.name, "cannot watch the strategy: {error}");
        }
    }

    /// Watches the service's strategy file or directory (replacing a watcher it had).
    fn start_watcher(&self, service: &Arc<Service>) -> Result<(), HarborError> {
        let cfg = service.config.load();
        let target = match (&cfg.watch, &cfg.strategy) {
            (Some(dir), _) => Some(WatchTarget::Dir(dir.clone())),
            (None, Some(file)) => Some(WatchTarget::File(file.clone())),
            (None, None) => None,
        };
        let handle = match target {
            Some(target) => {
                Some(spawn_watcher(Arc::clone(&service.context.load().strategy), target, service.background.clone())?)
            }
            None => None,
        };
        let mut slot = service.watcher.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = std::mem::replace(&mut *slot, handle) {
            old.abort();
        }
        Ok(())
    }
}

fn strategy_changed(old: &ServiceConfig, new: &ServiceConfig) -> bool {
    old.strategy != new.strategy
        || old.watch != new.watch
        || old.strategy_config != new.strategy_config
        || old.tunables.strategy_timeout_ms != new.tunables.strategy_timeout_ms
        || old.tunables.strategy_memory_mb != new.tunables.strategy_memory_mb
        || old.tunables.strategy_kv_entries != new.tunables.strategy_kv_entries
        || old.tunables.strategy_kv_bytes != new.tunables.strategy_kv_bytes
        || old.shadow != new.shadow
        || old.tunables.shadow_sample != new.tunables.shadow_sample
}

/// Loads a service's strategy: a named file must load; in a watched directory the newest
/// file that loads wins, and none is only a warning.
async fn load_strategy(host: &StrategyHost, cfg: &ServiceConfig) -> Result<(), HarborError> {
    if let Some(path) = &cfg.strategy {
        host.load_file(path)
            .await
            .map_err(|error| HarborError::Strategy { path: path.display().to_string(), error })?;
    } else if let Some(dir) = &cfg.watch {
        if host.load_newest_in(dir).await.is_none() {
            tracing::warn!(service = %cfg.name, dir = %dir.display(), "no loadable strategy in the watched directory yet: built-in round-robin until one lands");
        }
    }
    if let Some(path) = &cfg.shadow {
        host.load_shadow_file(path, cfg.tunables.shadow_sample as u32)
            .await
            .map_err(|error| HarborError::Strategy { path: format!("{} (shadow)", path.display()), error })?;
    }
    Ok(())
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
        if let Err(running) = crate::strategy::engine::set_epoch_tick(config.strategy_tick) {
            tracing::warn!(setting = "strategy_tick_ms", "{running}: this setting needs a restart");
        }
        StrategyEngine::global().map_err(HarborError::Engine)?.set_disk_cache(config.cache_dir.as_deref());
        let shards = match config.runtime {
            RuntimeMode::WorkStealing => Shards::none(),
            RuntimeMode::PerCore => Shards::start(config.workers).map_err(HarborError::Runtime)?,
        };
        let inherited_admin = handover.admin.take();
        let changes = std::mem::take(&mut handover.changes);
        let background = CancellationToken::new();
        let control = Arc::new(Control {
            services: ArcSwap::from_pointee(Vec::new()),
            metrics,
            access_log,
            #[cfg(target_os = "linux")]
            kernel_relay: load_kernel_relay(&config),
            tracker: TaskTracker::new(),
            cut: CancellationToken::new(),
            draining: AtomicBool::new(false),
            admin_stop: background.child_token(),
            background,
            config: Mutex::new(config.clone()),
            source: Mutex::new(None),
            resolver: Mutex::new(None),
            notifier: Mutex::new(Notifier::none()),
            reload_lock: tokio::sync::Mutex::new(()),
            stopping: CancellationToken::new(),
            upgrade_lock: tokio::sync::Mutex::new(()),
            admin_handoff: Mutex::new(None),
            handover: Mutex::new(handover),
            started_at: std::time::SystemTime::now(),
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
                Some(TcpListener::from_std(listener).map_err(|error| HarborError::Bind { addr, error })?)
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
        let admin_task = admin.map(|l| tokio::spawn(admin::serve(l, Arc::clone(&control), control.admin_stop.clone())));
        for (service, configured, listener) in listeners {
            let passed_in = control.take_passed_in(configured);
            service.serve(listener, configured, passed_in, &control.tracker, &control.shards);
        }
        for service in control.services.load().iter() {
            tracing::info!(service = %service.name, listen = ?service.local_addrs(), backends = service.membership.views().len(), strategy = %service.context.load().strategy.status().name, "harbor is serving");
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
        control.notifier().ready();

        shutdown.cancelled().await;
        control.notifier().stopping();
        control.stopping.cancel();
        // Refuse new connections from here on; no reload may start.
        let _serial = control.reload_lock.lock().await;
        control.draining.store(true, Ordering::Relaxed);
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
        let grace = control.lock_config().shutdown_grace;
        if in_flight > 0 {
            tracing::info!(in_flight, ?grace, "draining connections");
        }
        let mut report = DrainReport { cut_connections: 0 };
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            report.cut_connections = tracker.len();
            tracing::warn!(cut = report.cut_connections, "grace period over: cutting the remaining connections");
            control.cut.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        }
        control.background.cancel();
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
            Err(join) => Err(HarborError::Accept(std::io::Error::other(join.to_string()))),
        }
    }
}

/// Loads the kernel relay if the configuration asks for it. When it cannot be had, says why
/// in one line and leaves every connection to the user-space relay.
#[cfg(target_os = "linux")]
fn load_kernel_relay(config: &Config) -> Option<Arc<crate::kernel_relay::KernelRelay>> {
    if config.relay != crate::config::RelayMode::Kernel {
        return None;
    }
    // Room for every service's connection cap (a reload that raises one beyond it sends the
    // extra connections through the user-space relay).
    let connections: usize = config.services.iter().map(|s| s.tunables.max_connections as usize).sum();
    match crate::kernel_relay::KernelRelay::load(connections) {
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
