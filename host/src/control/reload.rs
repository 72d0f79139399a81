//! Reload: a new configuration applied as a difference to the running one, on SIGHUP, from
//! the admin API, or when the config file changes (`watch_config = true`: the file's directory
//! is watched, so an editor's write-and-rename is seen, and a burst of events is one reload).

use crate::logging::list;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use tokio::net::TcpListener;

use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult};
use tokio::sync::mpsc;

use crate::config::settings::{Change, Reload};
use crate::config::{Config, ConfigError, ServiceConfig};
use crate::control::lifecycle::Phase;
use crate::control::Control;
use crate::error::HarborError;
use crate::proxy::context::{ConnectionLimits, ServiceContext};
use crate::proxy::listener::{bind, ListenerOptions};
use crate::proxy::service::Service;
use crate::strategy::{LoadSource, Report, StrategyHost};

/// Events closer together than this are one change.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Why the config file cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct ConfigWatchError {
    path: PathBuf,
    source: notify::Error,
}

/// Reloads `control` each time `file` changes, until Harbor stops.
pub fn watch_config_file(control: Arc<Control>, file: PathBuf) -> Result<(), ConfigWatchError> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let touched = events.iter().any(|e| e.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name));
        if touched {
            let _ = tx.try_send(());
        }
    })
    .map_err(|source| ConfigWatchError { path: file.clone(), source })?;
    debouncer
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| ConfigWatchError { path: dir.clone(), source })?;
    let stop = control.background_token();
    tokio::spawn(async move {
        let _debouncer = debouncer; // watching until this task ends
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = rx.recv() => match changed {
                    None => return,
                    Some(()) => {
                        tracing::info!("the config file changed: reloading");
                        let _ = control.reload().await;
                    }
                },
            }
        }
    });
    Ok(())
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
    /// A new TLS termination, when `[service.tls]` or the mode changed.
    tls: Option<Option<Arc<crate::tls::Terminator>>>,
    /// TLS to backends as the new settings say (the running one, if they are the same).
    origin: Option<Arc<crate::tls::Originator>>,
    is_new: bool,
}

impl Control {
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
                Err(join) => Err(HarborError::Task(join.to_string())),
            },
        };
        match &result {
            Ok(report) => {
                self.metrics.config_reload("applied");
                tracing::info!(
                    added = %list(&report.added),
                    removed = %list(&report.removed),
                    changed = %list(&report.changed),
                    "configuration reloaded"
                );
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
        if self.lifecycle.is_draining() {
            return Err(HarborError::Draining);
        }
        for change in self.lock_config().globals.changes(&new.globals) {
            if change.needs == Reload::Restart {
                tracing::warn!(setting = change.key, "this setting needs a restart: the running value stays");
            }
        }
        let current = self.services.load_full();
        let workers = self.lock_config().workers;

        // Prepare: bind and load everything new. A failure (or the start of a drain) drops
        // what was prepared, and stops the background work of services built for it.
        let mut prepared = Vec::new();
        let outcome = tokio::select! {
            _ = self.lifecycle.reached(Phase::Draining) => Err(HarborError::Draining),
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
            let Prepared { service, config, listeners, strategy, resolver, tls, origin, is_new } = p;
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
                let changes = service_changes(&old, &config);
                let described: Vec<String> =
                    changes.iter().map(|c| format!("{} ({})", c.key, c.needs.as_str())).collect();
                tracing::info!(service = %service.name, changed = %list(&described), "service settings changed");
                for change in changes.iter().filter(|c| c.needs == Reload::Rebind && c.key != "listen") {
                    tracing::warn!(service = %service.name, setting = change.key, "applies to listeners bound from now on: the open ones keep their value");
                }
            }
            service.membership.reconfigure(&config.backends, crate::backends::membership::Upkeep::of(&config));
            if old.dns != config.dns || old.tunables.dns_refresh_ms != config.tunables.dns_refresh_ms {
                service.membership.follow_dns(&config.dns, resolver, config.tunables.dns_refresh());
            }
            service.admission.update(&config.tunables);
            if old.tunables.defer_accept_secs != config.tunables.defer_accept_secs {
                service.set_defer_accept(config.tunables.defer_accept_secs);
            }
            let context = service.context.load_full();
            let tls = match tls {
                Some(new) => {
                    if let Some(terminator) = &new {
                        crate::tls::watch_files(terminator, service.background.clone());
                        crate::tls::acme::spawn(terminator, service.background.clone());
                    }
                    new
                }
                None => {
                    // The same settings: SIGHUP reads the files again.
                    if let Some(terminator) = &context.tls {
                        let terminator = Arc::clone(terminator);
                        let _ = tokio::task::spawn_blocking(move || terminator.reload_files()).await;
                    }
                    context.tls.clone()
                }
            };
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
                sessions: Arc::clone(&context.sessions),
                upstreams: Arc::clone(&context.upstreams),
                retry_budget: Arc::clone(&context.retry_budget),
                ends: context.ends.clone(),
                tls,
                origin,
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
                    let tls = match (&cfg.tls, old.tls == cfg.tls && old.tunables.mode == cfg.tunables.mode) {
                        (_, true) => None,
                        (None, false) => Some(None),
                        (Some(settings), false) => {
                            let context = service.context.load();
                            let previous = context.tls.as_deref();
                            let mode = cfg.tunables.mode;
                            let built =
                                crate::tls::Terminator::build(&cfg.name, settings, mode, &self.metrics, previous)?;
                            Some(Some(Arc::new(built)))
                        }
                    };
                    let origin = crate::tls::Originator::for_service(cfg, service.context.load().origin.as_ref())?;
                    out.push(Prepared {
                        service: Arc::clone(service),
                        config: cfg.clone(),
                        listeners,
                        strategy,
                        resolver,
                        tls,
                        origin,
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
                        tls: None,
                        origin: None,
                        is_new: true,
                    });
                }
            }
        }
        Ok(())
    }
}

/// What a reload changes in one service, setting by setting, with what each change needs:
/// the diff of the two resolutions, by the tags of `settings!`.
fn service_changes(old: &ServiceConfig, new: &ServiceConfig) -> Vec<Change> {
    let mut changes = old.definition.changes(&new.definition);
    changes.extend(old.tunables.changes(&new.tunables));
    if old.tls != new.tls {
        changes.push(Change { key: "tls", needs: Reload::NewConnections });
    }
    changes
}

/// True if the service's strategy must be loaded again.
fn strategy_changed(old: &ServiceConfig, new: &ServiceConfig) -> bool {
    service_changes(old, new).iter().any(|c| c.needs == Reload::Strategy)
}

/// Loads a service's strategy: a named file must load; in a watched directory the newest
/// file that loads wins, and none is only a warning.
pub(crate) async fn load_strategy(host: &StrategyHost, cfg: &ServiceConfig) -> Result<(), HarborError> {
    if let Some(path) = &cfg.strategy {
        host.load(LoadSource::File(path), Report::CountAndLog)
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
