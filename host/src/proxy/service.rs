//! One service at run time: the small context each of its connections gets (pool, strategy,
//! limits, metrics), its admission caps, and the accept loops of its listeners.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::membership::Membership;
use crate::config::ServiceConfig;
use crate::proxy::accept::accept_loop;
use crate::proxy::admission::Admission;
use crate::proxy::context::ServiceContext;
use crate::proxy::listener::ListenerOptions;
use crate::proxy::shards::Shards;

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
        let result = accept_loop(&listener, &self.admission, &self.context, &tracker, &stop).await;
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
