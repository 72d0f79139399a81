//! The control plane's shared state: the running services, the configuration, the lifecycle
//! and what an upgrade hands over. The admin API ([`admin`]), the status page
//! ([`status_page`]), reloads ([`reload`]), binary upgrades ([`upgrade`]) and the service
//! manager ([`systemd`]) all work on one [`Control`]; connections never see it.

pub(crate) mod admin;
pub(crate) mod lifecycle;
pub(crate) mod pidfile;
pub(crate) mod reload;
pub(crate) mod status_page;
pub(crate) mod systemd;
pub(crate) mod upgrade;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use hickory_resolver::TokioResolver;

use crate::access_log::AccessLog;
use crate::backends::discovery;
use crate::backends::membership::Membership;
use crate::config::{Config, ServiceConfig, DEFAULT_SERVICE};
use crate::logging::RateLimitedLog;
use crate::metrics::Metrics;
use crate::proxy::context::{ConnectionLimits, ServiceContext};
use crate::proxy::listener::{bind, BindError, ListenerOptions};
use crate::proxy::service::Service;
use crate::proxy::shards::Shards;
use crate::strategy::watch::{spawn_watcher, WatchTarget};
use crate::strategy::{GuestLimits, StrategyHost};

use upgrade::Handover;

use crate::error::HarborError;
pub use admin::{HEADER_DEADLINE, MAX_ADMIN_CONNECTIONS};
pub use lifecycle::{DrainBounds, Lifecycle, Phase};
pub use reload::{watch_config_file, ConfigSource, ReloadReport};
pub use systemd::{take_listen_fds, Notifier};
pub use upgrade::{take_handover, upgrade, upgrade_on_signal, UpgradeError, Upgrader};

/// The state the admin server and reloads work on. Connections never see it: each gets its
/// service's [`ServiceContext`].
pub struct Control {
    pub services: ArcSwap<Vec<Arc<Service>>>,
    pub metrics: Arc<Metrics>,
    /// Every connection of every service, for the drain.
    pub(crate) tracker: TaskTracker,
    /// Starting, serving, draining, stopped: the one phase everything reads.
    pub lifecycle: Lifecycle,
    pub(crate) config: Mutex<Config>,
    pub(crate) source: Mutex<Option<Arc<ConfigSource>>>,
    /// The resolver of DNS backends, made when a service first needs one.
    pub(crate) resolver: Mutex<Option<Arc<TokioResolver>>>,
    /// Tells a service manager (systemd) about readiness, reloads and draining.
    pub(crate) notifier: Mutex<Notifier>,
    /// The access log, if on (opened at start; a reload cannot turn it on or off).
    pub(crate) access_log: Option<Arc<AccessLog>>,
    /// The kernel relay (`relay = "kernel"`), loaded at start; `None` when off or unavailable.
    #[cfg(target_os = "linux")]
    pub(crate) kernel_relay: Option<Arc<crate::proxy::kernel_relay::KernelRelay>>,
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
    /// Held while a binary upgrade runs: one at a time.
    pub(crate) upgrade_lock: tokio::sync::Mutex<()>,
    /// A second descriptor of the admin listener (and its configured address), for an upgrade.
    pub(crate) admin_handoff: Mutex<Option<(SocketAddr, OwnedFd)>>,
    /// What the previous process handed over; its readiness pipe is written once serving.
    pub(crate) handover: Mutex<Handover>,
    /// When this process started serving, for the status page.
    pub started_at: std::time::SystemTime,
    /// The last minutes of every backend, for the status page.
    pub(crate) history: status_page::History,
    /// The per-core runtimes that accept and relay (`runtime = "per-core"`); none otherwise.
    pub(crate) shards: Shards,
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
        self.lifecycle.is_draining()
    }

    /// Moves the lifecycle forward to `phase` and tells the service manager.
    pub(crate) fn enter(&self, phase: Phase) {
        if self.lifecycle.enter(phase) {
            let pidfile = self.lock_config().pidfile.clone();
            match phase {
                Phase::Serving => {
                    self.notifier().ready();
                    if let Some(path) = pidfile {
                        if let Err(error) = pidfile::claim(&path) {
                            tracing::error!(pidfile = %path.display(), "cannot write the pid file: {error}");
                        }
                    }
                }
                Phase::Draining => self.notifier().stopping(),
                Phase::Stopped => {
                    if let Some(path) = pidfile {
                        pidfile::release(&path);
                    }
                }
                Phase::Starting => {}
            }
        }
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
        self.lifecycle.hand_over();
    }

    /// Cancelled once stopped: background work ends.
    pub fn background_token(&self) -> CancellationToken {
        self.lifecycle.background().clone()
    }

    /// The bearer token admin writes need, if one is configured.
    pub fn admin_token(&self) -> Option<String> {
        self.lock_config().admin_token.clone()
    }

    /// True if the admin listener is on a loopback address.
    pub fn admin_is_loopback(&self) -> bool {
        self.lock_config().admin.is_none_or(|a| a.ip().is_loopback())
    }

    pub(crate) fn lock_config(&self) -> std::sync::MutexGuard<'_, Config> {
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets where reloads read the configuration from.
    pub fn set_config_source(&self, source: ConfigSource) {
        *self.source.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(source));
    }

    /// Sets where readiness, reloads and draining are announced.
    pub fn set_notifier(&self, notifier: Notifier) {
        *self.notifier.lock().unwrap_or_else(PoisonError::into_inner) = notifier;
    }

    pub(crate) fn lock_handover(&self) -> std::sync::MutexGuard<'_, Handover> {
        self.handover.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn notifier(&self) -> Notifier {
        self.notifier.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A listener for `addr`: the socket passed in for it, if there is one, else a new one.
    pub(crate) async fn bind_or_inherit(
        &self,
        addr: SocketAddr,
        options: ListenerOptions,
    ) -> Result<TcpListener, HarborError> {
        let taken = {
            let mut handover = self.handover.lock().unwrap_or_else(PoisonError::into_inner);
            let inherited = &mut handover.listeners;
            inherited.iter().position(|(a, _)| *a == addr).map(|i| inherited.remove(i).1)
        };
        match taken {
            Some(listener) => {
                tracing::info!(listen = %addr, "listening on a socket passed in (socket activation or upgrade)");
                let bind_error = |source| BindError { addr, source };
                crate::proxy::listener::set_defer_accept(&listener, options.defer_accept_secs).map_err(bind_error)?;
                Ok(TcpListener::from_std(listener).map_err(bind_error)?)
            }
            None => Ok(bind(addr, options).await?),
        }
    }

    /// The other sockets passed in for `configured` after [`Self::bind_or_inherit`] took the
    /// first: a per-core Harbor hands over one per shard.
    pub(crate) fn take_passed_in(&self, configured: SocketAddr) -> Vec<std::net::TcpListener> {
        let mut handover = self.lock_handover();
        let (taken, rest) = handover.listeners.drain(..).partition(|(a, _)| *a == configured);
        handover.listeners = rest;
        taken.into_iter().map(|(_, socket)| socket).collect()
    }

    /// The shared resolver, if `cfg` has DNS backends.
    pub(crate) fn resolver_for(&self, cfg: &ServiceConfig) -> Result<Option<Arc<TokioResolver>>, HarborError> {
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

    pub(crate) fn strategy_host(
        &self,
        cfg: &ServiceConfig,
        workers: usize,
        kv: Option<Arc<crate::strategy::runtime::guest_host::KvStores>>,
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
    pub(crate) async fn build_service(&self, cfg: &ServiceConfig, workers: usize) -> Result<Arc<Service>, HarborError> {
        let strategy = self.strategy_host(cfg, workers, None)?;
        reload::load_strategy(&strategy, cfg).await?;
        // Before anything that runs in the background: a bad certificate leaves nothing behind.
        let tls = match &cfg.tls {
            None => None,
            Some(settings) => {
                let mode = cfg.tunables.mode;
                Some(Arc::new(crate::tls::Terminator::build(&cfg.name, settings, mode, &self.metrics, None)?))
            }
        };
        let origin = crate::tls::Originator::for_service(cfg, None)?;
        let background = self.lifecycle.background().child_token();
        let membership = Membership::new(
            &cfg.name,
            &cfg.backends,
            crate::backends::membership::Upkeep::of(cfg),
            Arc::clone(&self.metrics),
            self.lifecycle.cut_token().clone(),
            background.clone(),
        );
        membership.spawn_reaper();
        membership.follow_dns(&cfg.dns, self.resolver_for(cfg)?, cfg.tunables.dns_refresh());
        // The key-value stores outlive a reload's new strategy host (it takes them over).
        strategy.kv_stores().spawn_sweeper(background.clone());
        let sessions = Arc::new(crate::proxy::sessions::Sessions::default());
        sessions.spawn_counter(background.clone());
        let upstreams = Arc::new(crate::proxy::http::Upstreams::default());
        let metrics = self.metrics.service(&cfg.name);
        upstreams.spawn_sweeper(membership.pool(), metrics.clone(), background.clone());
        if let Some(terminator) = &tls {
            crate::tls::watch_files(terminator, background.clone());
            crate::tls::acme::spawn(terminator, background.clone());
        }
        let context = ServiceContext {
            name: Arc::from(cfg.name.as_str()),
            pool: membership.pool(),
            strategy,
            limits: ConnectionLimits::from_tunables(&cfg.tunables),
            metrics,
            hot_path_log: Arc::new(RateLimitedLog::new(10, Duration::from_secs(10))),
            access_log: self.access_log.clone(),
            sessions,
            upstreams,
            retry_budget: Arc::default(),
            ends: crate::proxy::http::Ends {
                draining: self.lifecycle.draining_token().clone(),
                cut: self.lifecycle.cut_token().clone(),
            },
            tls,
            origin,
            #[cfg(target_os = "linux")]
            kernel_relay: self.kernel_relay.clone(),
        };
        Ok(Arc::new(Service::new(context, cfg.clone(), membership, background)))
    }

    pub(crate) fn start_watcher_or_log(&self, service: &Arc<Service>) {
        if let Err(error) = self.start_watcher(service) {
            tracing::error!(service = %service.name, "cannot watch the strategy: {error}");
        }
    }

    /// Watches the service's strategy file or directory (replacing a watcher it had).
    pub(crate) fn start_watcher(&self, service: &Arc<Service>) -> Result<(), HarborError> {
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
