//! Connections to backends in HTTP mode, kept for reuse. HTTP/1.1: idle keep-alive
//! connections per backend, at most `backend_max_idle`, each dropped after
//! `backend_idle_timeout_ms`. HTTP/2: multiplexed connections per backend, each carrying at
//! most `backend_max_streams` streams; another is opened when they are all taken. A pooled
//! connection is checked before use; one that closed meanwhile hands the request back, so it
//! goes on a new connection, never lost. With `backend_tls` the connections are TLS, and pooled
//! apart from those made with other TLS settings (a [`Target`] is an address and the settings).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::backends::pool::{BackendPool, BackendState};
use crate::clock::Instant;
use crate::config::BackendProtocol;
use crate::metrics::ServiceMetrics;
use crate::proxy::connect::{connect, ConnectError, SocketOptions};
use crate::tls::stream::BackendStream;

/// A request body on its way to a backend: the client's, streamed, or none (a bodiless
/// request sent again after a pooled connection failed under it).
pub type Outgoing = http_body_util::Either<crate::proxy::http::body::ClientBody, http_body_util::Full<bytes::Bytes>>;

/// How a service's backend connections are made and kept.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub protocol: BackendProtocol,
    pub max_idle: usize,
    /// Streams at once on one HTTP/2 connection to a backend; more open another connection.
    pub max_streams: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub socket: SocketOptions,
}

/// A connection that can carry one request now.
pub enum Sender {
    Http1(http1::SendRequest<Outgoing>),
    /// A shared HTTP/2 connection, and the stream this request takes on it.
    Http2(http2::SendRequest<Outgoing>, Stream),
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP handshake with the backend failed: {0}")]
    Handshake(hyper::Error),
    #[error("TLS to the backend failed: {0}")]
    Tls(std::io::Error),
}

/// Where pooled connections go: a backend's address, and the TLS settings they were made with
/// (0: none).
pub type Target = (SocketAddr, u64);

/// What a new connection to a backend needs beside its address.
#[derive(Clone, Copy)]
pub struct Dial<'a> {
    pub origin: Option<&'a crate::tls::Originator>,
    /// The backend's DNS name, for TLS.
    pub host: Option<&'a str>,
}

impl Dial<'_> {
    pub fn target(&self, address: SocketAddr) -> Target {
        (address, self.origin.map_or(0, |o| o.id))
    }
}

struct Idle {
    sender: http1::SendRequest<Outgoing>,
    since: Instant,
}

/// The backend connections of one service (shared by every context of it, across reloads).
#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<Target, Vec<Idle>>>,
    /// The idle timeout of the latest context, for the sweeper.
    idle_timeout_ms: AtomicU64,
    multiplexed: Mutex<HashMap<Target, Vec<Multiplexed>>>,
    /// Held while an HTTP/2 connection to a backend is being opened.
    opening: Mutex<HashMap<Target, Arc<tokio::sync::Mutex<()>>>>,
}

/// One HTTP/2 connection to a backend, and its streams in flight.
struct Multiplexed {
    sender: http2::SendRequest<Outgoing>,
    streams: Arc<AtomicU32>,
}

/// A stream of an HTTP/2 connection, counted until its response ends.
#[derive(Debug)]
pub struct Stream(Arc<AtomicU32>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstreams {
    /// A connection to `backend`: a pooled one if one is ready (`reused` is true), else a new
    /// one.
    pub async fn checkout(
        &self,
        backend: SocketAddr,
        dial: Dial<'_>,
        limits: &PoolLimits,
        metrics: &ServiceMetrics,
    ) -> Result<(Sender, bool), UpstreamError> {
        let target = dial.target(backend);
        // Every request comes here: the pooled HTTP/1.1 connection is the common path; opening
        // one and HTTP/2 are boxed, so that a request's future stays small.
        match limits.protocol {
            BackendProtocol::Http1 => {
                while let Some(idle) = self.pop_idle(target, limits.idle_timeout, metrics) {
                    let mut sender = idle.sender;
                    if sender.is_ready() || sender.ready().await.is_ok() {
                        metrics.upstream_reused.inc();
                        return Ok((Sender::Http1(sender), true));
                    }
                }
                Ok((Sender::Http1(Box::pin(self.open_http1(backend, dial, limits, metrics)).await?), false))
            }
            BackendProtocol::Http2 => Box::pin(self.checkout_http2(backend, dial, limits, metrics)).await,
        }
    }

    /// A stream of a shared HTTP/2 connection to `backend`, on a new connection if none has one
    /// to spare.
    async fn checkout_http2(
        &self,
        backend: SocketAddr,
        dial: Dial<'_>,
        limits: &PoolLimits,
        metrics: &ServiceMetrics,
    ) -> Result<(Sender, bool), UpstreamError> {
        // The first open connection with a stream to spare; else a new one. Opening
        // is one at a time per backend, so a burst of requests shares the connection
        // being opened instead of each opening its own.
        let mut one_at_a_time = None;
        loop {
            if let Some((mut sender, stream)) = self.spare_stream(dial.target(backend), limits.max_streams) {
                if sender.ready().await.is_ok() {
                    metrics.upstream_reused.inc();
                    return Ok((Sender::Http2(sender, stream), true));
                }
            }
            if one_at_a_time.is_some() {
                break;
            }
            // Then again once this backend's opening is ours: another task may have
            // opened a connection meanwhile.
            let opening = Arc::clone(
                self.opening.lock().unwrap_or_else(PoisonError::into_inner).entry(dial.target(backend)).or_default(),
            );
            one_at_a_time = Some(opening.lock_owned().await);
        }
        let sender = self.open_http2(backend, dial, limits, metrics).await?;
        let streams = Arc::new(AtomicU32::new(1));
        let stream = Stream(Arc::clone(&streams));
        self.multiplexed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(dial.target(backend))
            .or_default()
            .push(Multiplexed { sender: sender.clone(), streams });
        Ok((Sender::Http2(sender, stream), false))
    }

    /// A stream of an open HTTP/2 connection to `backend` that has one to spare, taken.
    fn spare_stream(&self, backend: Target, max_streams: usize) -> Option<(http2::SendRequest<Outgoing>, Stream)> {
        let mut all = self.multiplexed.lock().unwrap_or_else(PoisonError::into_inner);
        let list = all.get_mut(&backend)?;
        list.retain(|m| !m.sender.is_closed());
        let spare = list.iter().find(|m| (m.streams.load(Ordering::Relaxed) as usize) < max_streams)?;
        spare.streams.fetch_add(1, Ordering::Relaxed);
        Some((spare.sender.clone(), Stream(Arc::clone(&spare.streams))))
    }

    /// Gives an HTTP/1.1 connection back once its response has ended (an HTTP/2 one stays
    /// shared). Dropped instead if the pool for its backend is full.
    pub fn give_back(
        &self,
        backend: Target,
        sender: http1::SendRequest<Outgoing>,
        limits: &PoolLimits,
        metrics: &ServiceMetrics,
    ) {
        self.idle_timeout_ms
            .store(u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        if sender.is_closed() || limits.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(backend).or_default();
        if list.len() < limits.max_idle {
            list.push(Idle { sender, since: Instant::now() });
            metrics.upstream_idle.inc();
        }
    }

    /// The most recently used idle connection that has not timed out or closed.
    fn pop_idle(&self, backend: Target, timeout: Duration, metrics: &ServiceMetrics) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&backend)?;
        while let Some(entry) = list.pop() {
            metrics.upstream_idle.dec();
            if !entry.sender.is_closed() && entry.since.elapsed() < timeout {
                return Some(entry);
            }
        }
        None
    }

    /// Drops idle connections past `timeout` or closed, and every connection to a backend not
    /// in `keep`.
    fn sweep(&self, timeout: Duration, keep: &dyn Fn(SocketAddr) -> bool, metrics: &ServiceMetrics) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|(backend, _), list| {
            let before = list.len();
            if keep(*backend) {
                list.retain(|e| !e.sender.is_closed() && e.since.elapsed() < timeout);
            } else {
                list.clear();
            }
            for _ in list.len()..before {
                metrics.upstream_idle.dec();
            }
            !list.is_empty()
        });
        drop(idle);
        self.multiplexed.lock().unwrap_or_else(PoisonError::into_inner).retain(|(backend, _), list| {
            list.retain(|m| !m.sender.is_closed());
            keep(*backend) && !list.is_empty()
        });
        self.opening.lock().unwrap_or_else(PoisonError::into_inner).retain(|(backend, _), _| keep(*backend));
    }

    /// Once a second until `stop`: drops idle connections past their timeout or closed, and
    /// every connection to a backend that left the pool, is being removed or drains.
    pub fn spawn_sweeper(
        self: &std::sync::Arc<Self>,
        pool: std::sync::Arc<arc_swap::ArcSwap<BackendPool>>,
        metrics: ServiceMetrics,
        stop: CancellationToken,
    ) {
        let upstreams = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let pool = pool.load();
                        let keep = |address: SocketAddr| {
                            pool.members().iter().any(|m| {
                                m.backend.address == address && !m.removing && m.backend.admin_state() != BackendState::Draining
                            })
                        };
                        let timeout = Duration::from_millis(upstreams.idle_timeout_ms.load(Ordering::Relaxed));
                        upstreams.sweep(timeout, &keep, &metrics);
                    }
                }
            }
        });
    }

    async fn open_http1(
        &self,
        backend: SocketAddr,
        dial: Dial<'_>,
        limits: &PoolLimits,
        metrics: &ServiceMetrics,
    ) -> Result<http1::SendRequest<Outgoing>, UpstreamError> {
        let stream = open(backend, dial, limits, metrics).await?;
        let (sender, connection) =
            http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            // With upgrades: after a 101 the connection becomes the tunnel's.
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%backend, "backend connection ended: {error}");
            }
        });
        Ok(sender)
    }

    async fn open_http2(
        &self,
        backend: SocketAddr,
        dial: Dial<'_>,
        limits: &PoolLimits,
        metrics: &ServiceMetrics,
    ) -> Result<http2::SendRequest<Outgoing>, UpstreamError> {
        let stream = open(backend, dial, limits, metrics).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%backend, "backend connection ended: {error}");
            }
        });
        Ok(sender)
    }
}

async fn open(
    backend: SocketAddr,
    dial: Dial<'_>,
    limits: &PoolLimits,
    metrics: &ServiceMetrics,
) -> Result<BackendStream, UpstreamError> {
    metrics.dials.inc();
    let tcp = connect(backend, limits.connect_timeout, &limits.socket).await?;
    let stream = match dial.origin {
        None => BackendStream::Plain(tcp),
        Some(origin) => {
            let handshake = origin.connect(tcp, dial.host, backend);
            match tokio::time::timeout(limits.connect_timeout, handshake).await {
                Ok(Ok(tls)) => BackendStream::Tls(Box::new(tls)),
                Ok(Err(error)) => return Err(UpstreamError::Tls(error)),
                Err(_) => {
                    let late =
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "no handshake within connect_timeout_ms");
                    return Err(UpstreamError::Tls(late));
                }
            }
        }
    };
    metrics.upstream_opened.inc();
    Ok(stream)
}
